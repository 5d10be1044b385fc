"""Lightning callbacks, one concern per file. They never touch weights or the optimizer; what they remember
across a resume goes in their `state_dict`."""
