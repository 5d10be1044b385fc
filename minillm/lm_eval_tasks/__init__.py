"""lm-evaluation-harness task YAMLs for the built-in held-out families (`--include_path minillm/lm_eval_tasks`)."""
