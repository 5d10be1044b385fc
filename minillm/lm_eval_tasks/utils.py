"""Helpers the task YAMLs of this folder name with `!function utils.<name>` (lm-evaluation-harness)."""

from minillm.reward_rules import exact_match


def exact_match_results(doc: dict, results: list[str]) -> dict:
    """The `exact_match` rule of minillm eval and GRPO on the greedy reply."""
    (reply,) = results
    return {"exact_match": exact_match([reply], None, answer=[doc["answer"]])[0]}
