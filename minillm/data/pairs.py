"""On-policy preference pairs (the library of `minillm pairs`, minillm/pairs.py): the model answers the questions of `<data_dir>/sft/<family>.jsonl` (the training
split only — held-out questions are never asked) greedily, and each wrong answer becomes a pair with the
reference answer chosen and the model's own reply rejected. DPO then learns from the mistakes this model
actually makes, and the reward model gets hard negatives (near misses of the policy it will judge). Empty replies
are counted and skipped (a pair needs two completions). The file is rewritten only when the model is newer than
it, so `make demo` can run this every time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from minillm import reward_rules
from minillm.evaluation import load_family
from minillm.progress import batch_starts
from minillm.generate import GenerationConfig, generate, load_model


def onpolicy_pairs(model, tokenizer, records: list[dict], max_new_tokens: int = 32, batch_size: int = 32) -> dict:
    """{"pairs": [...], "asked": n, "wrong": n, "empty": n} for chat records with an `answer`."""
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens)
    pairs, wrong, empty = [], 0, 0
    for start in batch_starts(len(records), batch_size, "on-policy pairs"):
        chunk = records[start : start + batch_size]
        replies = generate(model, tokenizer, [r["conversations"][:-1] for r in chunk], config)
        hits = reward_rules.exact_match(replies, None, answer=[r["answer"] for r in chunk])
        for record, reply, hit in zip(chunk, replies, hits):
            if hit:
                continue
            wrong += 1
            if not reply.strip():
                empty += 1
                continue
            extra = {k: v for k, v in record.items() if k not in ("conversations", "answer")}
            prompt = record["conversations"][:-1]
            question = prompt[0]["content"] if len(prompt) == 1 and prompt[0]["role"] == "user" else prompt
            pairs.append({"prompt": question, "chosen": record["answer"], "rejected": reply.strip(), **extra})
    return {"pairs": pairs, "asked": len(records), "wrong": wrong, "empty": empty}
