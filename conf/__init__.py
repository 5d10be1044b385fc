"""The Hydra config tree, shipped in the wheel as `minillm.conf` (pyproject.toml maps this folder there)."""
