"""python -m minillm.eval model_path=DIR [family=verifiable] [limit=200] [data_dir=data/builtin]
python -m minillm.eval model_path=DIR prompts=FILE reward=verifiable      # mean reward of greedy completions
python -m minillm.eval model_path=DIR prompts=FILE reward=model reward_model_path=DIR   # ... under a reward model
python -m minillm.eval reward_model=DIR family=reviews_zh                 # reward model: pairwise accuracy

Exact-match accuracy on a held-out chat family (`<data dir>/eval/<family>.jsonl`): greedy decoding through
the chat template, the reply compared with the record's `answer` after stripping whitespace. With `prompts=`:
the mean score under a named reward function (minillm.rewards) of greedy completions of RL prompt records. With
`reward_model=`: the fraction of held-out preference pairs (`eval/<family>.jsonl`) whose chosen completion the
reward model scores above the rejected one. (The evaluation issue grows this into bits-per-byte and a report.)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from minillm import rewards
from minillm.generate import GenerationConfig, generate, load_model, parse_cli
from minillm.model import MiniGPT, RewardModel
from minillm.tokenizer import Tokenizer, apply_chat_template


def load_family(path: Path, limit: int | None = None) -> list[dict]:
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return records[:limit] if limit else records


def exact_match(
    model: MiniGPT, tokenizer: Tokenizer, records: list[dict], batch_size: int = 32, max_new_tokens: int = 32
) -> dict:
    """Accuracy of greedy replies to each record's conversation minus its last (assistant) message."""
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens)
    correct, examples = 0, []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        prompts = [r["conversations"][:-1] for r in chunk]
        for record, reply in zip(chunk, generate(model, tokenizer, prompts, config)):
            hit = reply.strip() == record["answer"].strip()
            correct += hit
            if len(examples) < 5:
                examples.append(
                    {
                        "question": record["conversations"][-2]["content"],
                        "answer": record["answer"],
                        "reply": reply,
                        "correct": hit,
                    }
                )
    return {"n": len(records), "exact_match": correct / max(len(records), 1), "examples": examples}


def mean_reward(
    model: MiniGPT,
    tokenizer: Tokenizer,
    records: list[dict],
    reward: str | RewardModel,
    batch_size: int = 32,
    max_new_tokens: int = 48,
) -> dict:
    """Mean score of greedy completions of RL prompt records (any format) under a named reward function or a
    reward model (read at the completion's <|im_end|>, as in training). Unscored completions (None) are left
    out of the mean."""
    from minillm.data.records import to_prompt

    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens)
    prompts = [to_prompt(r) for r in records]
    bad = next((p for p in prompts if isinstance(p, str)), None)
    if bad is not None:
        raise ValueError(f"not a prompt record: {bad}")
    scores, examples = [], []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        replies = generate(model, tokenizer, [p["prompt"] for p in chunk], config)
        ids = [tokenizer.encode(r) for r in replies]
        if isinstance(reward, RewardModel):
            chunk_scores = _reward_model_scores(reward, tokenizer, chunk, ids)
        else:
            chunk_scores = rewards.score(reward, replies, ids, chunk)
        scores += [s for s in chunk_scores if s == s]  # NaN: not scored
        examples += [
            {"prompt": p["prompt"][-1]["content"], "reply": r, "score": s}
            for p, r, s in zip(chunk, replies, chunk_scores)
        ][: max(0, 5 - len(examples))]
    name = reward if isinstance(reward, str) else "model"
    return {"n": len(scores), "reward": name, "mean_reward": sum(scores) / max(len(scores), 1), "examples": examples}


@torch.no_grad()
def _reward_model_scores(model: RewardModel, tokenizer: Tokenizer, prompts: list[dict], completions: list) -> list:
    rows = [
        apply_chat_template(tokenizer, p["prompt"], add_generation_prompt=True).ids + c + [tokenizer.im_end_id]
        for p, c in zip(prompts, completions)
    ]
    return [float(model(torch.tensor([row]))[0, -1]) for row in rows]


@torch.no_grad()
def pairwise_accuracy(model: RewardModel, tokenizer: Tokenizer, pairs: list[dict], batch_size: int = 16) -> dict:
    """Fraction of preference pairs whose chosen completion scores above the rejected one."""
    from minillm.data.datamodule import encode_pair
    from minillm.data.records import to_preference

    wins, margins = 0, []
    block = model.config.block_size
    for start in range(0, len(pairs), batch_size):
        encoded = [
            encode_pair(tokenizer, to_preference(p), (block // 2, block - block // 2))
            for p in pairs[start : start + batch_size]
        ]
        side_scores = []
        for side in ("chosen", "rejected"):
            rows = [e[f"{side}_ids"] for e in encoded]
            ids = torch.full((len(rows), max(map(len, rows))), tokenizer.pad_id)  # right-padded
            for i, row in enumerate(rows):
                ids[i, : len(row)] = torch.tensor(row)
            last = torch.tensor([len(row) - 1 for row in rows])  # the completion's <|im_end|>
            side_scores.append(model(ids).gather(1, last[:, None]).squeeze(1))  # causal: padding after is unseen
        margin = side_scores[0] - side_scores[1]
        wins += int((margin > 0).sum())
        margins += margin.tolist()
    return {"n": len(pairs), "accuracy": wins / max(len(pairs), 1), "margin": sum(margins) / max(len(margins), 1)}


def _eval_set(data_dir: Path, family: str) -> Path:
    path = data_dir / "eval" / f"{family}.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: no evaluation set at {path}")
    return path


def main(argv: list[str]) -> None:
    values = parse_cli(argv)
    if "model_path" not in values and "reward_model" not in values:
        raise SystemExit(
            "usage: python -m minillm.eval model_path=DIR [family=verifiable] [limit=N] | model_path=DIR "
            "prompts=FILE reward=NAME | reward_model=DIR family=PAIRS"
        )
    data_dir = Path(str(values.get("data_dir", "data/builtin")))
    limit = values.get("limit")
    if "reward_model" in values:
        from minillm.pretrained import load_reward_model

        family = str(values.get("family", "reviews_zh"))
        path = _eval_set(data_dir, family)
        model, tokenizer = load_reward_model(str(values["reward_model"]))
        result = {"family": family, **pairwise_accuracy(model, tokenizer, load_family(path, limit))}
    elif "prompts" in values:
        path = Path(str(values["prompts"]))
        model, tokenizer = load_model(str(values["model_path"]))
        reward = str(values.get("reward", "verifiable"))
        if reward == "model":
            from minillm.pretrained import load_reward_model

            reward = load_reward_model(str(values.get("reward_model_path", "outputs/reward_tiny/final")))[0]
        result = mean_reward(model, tokenizer, load_family(path, limit), reward)
        result = {"prompts": str(path), **result}
    else:
        family = str(values.get("family", "verifiable"))
        path = _eval_set(data_dir, family)
        model, tokenizer = load_model(str(values["model_path"]))
        result = {"family": family, **exact_match(model, tokenizer, load_family(path, limit))}
    print(
        json.dumps(
            {"model_path": str(values.get("model_path", values.get("reward_model"))), **result},
            indent=2,
            ensure_ascii=False,
        )
    )


if __name__ == "__main__":
    main(sys.argv[1:])
