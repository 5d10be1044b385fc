"""Evaluation as a library: `evaluate(model_path, EvalConfig)` and the task functions it is made of (also used
by the `TaskEval` callback and the report). The entry point is `python -m minillm.eval` (minillm/eval.py).

Tasks:

    bpb          per-token loss and bits per byte (loss x tokens / UTF-8 bytes / ln 2) on `eval.text` (any .txt or
                 .jsonl file) or, by default, the pretraining records held out by hash (data.val_ratio 0.01)
    verifiable   exact match of greedy chat replies on `<data dir>/eval/<eval.family>.jsonl`
    preference   preference accuracy on held-out pairs (`eval.pairs`): the fraction where the policy gives the
                 chosen completion a higher summed log-prob than the rejected one; with `eval.reference=DIR`
                 also `reward_accuracy`, the fraction with a higher log-prob *gain over the reference* (DPO's
                 rewards/accuracies: what DPO optimizes)
    reward       mean score of greedy completions of `eval.prompts` under the rule `eval.reward` (and under the
                 reward model `eval.reward_model` when given), their median length and the share left empty
    kl           with `eval.reference=DIR`: KL(policy ‖ reference) per reply, Σ_t log π(y_t) - log π_ref(y_t)
                 averaged over replies sampled from the policy (temperature 1, seeded) to `eval.prompts`
    samples      completions of a fixed prompt list (seeded sampling) and their distinct-1/2
A reward model (`kind: reward`) gets `reward_model`: pairwise accuracy on the held-out pairs. Every key is an
`EvalConfig` field.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import torch

from minillm import reward_rules
from minillm.config import EVAL_VERSION, TASKS, EvalConfig, headline, output_path  # noqa: F401 (re-exported)
from minillm.generate import GenerationConfig, generate, generate_ids, load_model
from minillm.model import MiniGPT, RewardModel
from minillm.progress import batch_starts, progress
from minillm.tokenizer import Tokenizer, apply_chat_template

SAMPLE_PROMPTS = ["To be, or not to be", "In the beginning", "中共中央", "What is 12 + 7?", "写一条好评。"]


def load_family(path: Path, limit: int | None = None) -> list[dict]:
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return records[:limit] if limit else records


def exact_match_rate(
    model: MiniGPT, tokenizer: Tokenizer, records: list[dict], batch_size: int = 32, max_new_tokens: int = 32
) -> dict:
    """Accuracy of greedy replies to each record's conversation minus its last (assistant) message, judged by
    the `exact_match` rule (the one RLHF rewards with)."""
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens)
    correct, examples, per_task = 0, [], {}
    for start in batch_starts(len(records), batch_size, "exact match"):
        chunk = records[start : start + batch_size]
        prompts = [r["conversations"][:-1] for r in chunk]
        replies = generate(model, tokenizer, prompts, config)
        hits = reward_rules.exact_match(replies, None, answer=[r["answer"] for r in chunk])
        for record, reply, hit in zip(chunk, replies, hits):
            hit = bool(hit)
            correct += hit
            if "task" in record:  # generated families name their task (add, reverse, ...)
                task = per_task.setdefault(record["task"], [0, 0])
                task[0], task[1] = task[0] + hit, task[1] + 1
            if len(examples) < 5:
                examples.append(
                    {
                        "question": record["conversations"][-2]["content"],
                        "answer": record["answer"],
                        "reply": reply,
                        "correct": hit,
                    }
                )
    tasks = {name: {"n": n, "exact_match": hit / n} for name, (hit, n) in sorted(per_task.items())}
    return {"n": len(records), "exact_match": correct / max(len(records), 1), "tasks": tasks, "examples": examples}


def mean_reward(
    model: MiniGPT,
    tokenizer: Tokenizer,
    records: list[dict],
    reward: str | RewardModel,
    batch_size: int = 32,
    max_new_tokens: int = 48,
    reward_model: RewardModel | None = None,
    gold_model: RewardModel | None = None,
) -> dict:
    """Mean score of greedy completions of RL prompt records (any format) under a named reward function or a
    reward model (read at the completion's <|im_end|>, as in training); with `reward_model` as well, the same
    completions' mean reward-model score too, and with `gold_model` their score under that held-apart reward model
    (`gold_score`). Unscored completions (None) are left out of the mean. Also: the share of degenerate replies
    (`is_degenerate`) and distinct-2 over all replies."""
    from minillm.data.records import to_prompt

    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens)
    prompts = [to_prompt(r) for r in records]
    bad = next((p for p in prompts if isinstance(p, str)), None)
    if bad is not None:
        raise ValueError(f"not a prompt record: {bad}")
    scores, model_scores, gold_scores, examples, lengths, all_ids = [], [], [], [], [], []
    for start in batch_starts(len(prompts), batch_size, "reward"):
        chunk = prompts[start : start + batch_size]
        replies = generate(model, tokenizer, [p["prompt"] for p in chunk], config)
        ids = [tokenizer.encode(r) for r in replies]
        lengths += [len(i) for i in ids]
        all_ids += ids
        if isinstance(reward, RewardModel):
            chunk_scores = _reward_model_scores(reward, tokenizer, chunk, ids)
        else:
            chunk_scores = reward_rules.score(reward, replies, ids, chunk)
        if reward_model is not None:
            model_scores += _reward_model_scores(reward_model, tokenizer, chunk, ids)
        if gold_model is not None:
            gold_scores += _reward_model_scores(gold_model, tokenizer, chunk, ids)
        scores += [s for s in chunk_scores if s == s]  # NaN: not scored
        examples += [
            {"prompt": p["prompt"][-1]["content"], "reply": r, "score": s}
            for p, r, s in zip(chunk, replies, chunk_scores)
        ][: max(0, 5 - len(examples))]
    name = reward if isinstance(reward, str) else "model"
    out = {
        "n": len(scores),
        "reward": name,
        "mean_reward": sum(scores) / max(len(scores), 1),
        "median_length": float(torch.tensor(lengths, dtype=torch.float).median()) if lengths else 0.0,
        "empty_fraction": sum(n == 0 for n in lengths) / max(len(lengths), 1),
        "degenerate_fraction": sum(map(is_degenerate, all_ids)) / max(len(all_ids), 1),
        "distinct_2": distinct_n(all_ids, 2),
        "examples": examples,
    }
    if reward_model is not None:
        out["reward_model_score"] = sum(model_scores) / max(len(model_scores), 1)
    if gold_model is not None:
        out["gold_score"] = sum(gold_scores) / max(len(gold_scores), 1)
    return out


def _on(model: torch.nn.Module, data) -> torch.Tensor:
    """`data` as a tensor on the model's device."""
    return torch.tensor(data, device=next(model.parameters()).device)


@torch.no_grad()
def _reward_model_scores(model: RewardModel, tokenizer: Tokenizer, prompts: list[dict], completions: list) -> list:
    prompt_ids = [apply_chat_template(tokenizer, p["prompt"], add_generation_prompt=True).ids for p in prompts]
    rows = [p + c + [tokenizer.im_end_id] for p, c in zip(prompt_ids, completions)]
    return [
        float(model.sequence_scores(_on(model, [row]), _on(model, [len(row) - 1]), first=_on(model, [len(p)]))[0])
        for p, row in zip(prompt_ids, rows)
    ]


@torch.no_grad()
def pairwise_accuracy(model: RewardModel, tokenizer: Tokenizer, pairs: list[dict], batch_size: int = 16) -> dict:
    """Fraction of preference pairs whose chosen completion scores above the rejected one; with a `task` field on
    the pairs, the same per task too (`tasks`)."""
    from minillm.data.kinds import encode_pair
    from minillm.data.records import to_preference
    from minillm.losses import IGNORE_INDEX

    wins, margins = 0, []
    block = model.config.block_size
    for start in batch_starts(len(pairs), batch_size, "pairwise accuracy"):
        encoded = [
            encode_pair(tokenizer, to_preference(p), (block // 2, block - block // 2))
            for p in pairs[start : start + batch_size]
        ]
        side_scores = []
        for side in ("chosen", "rejected"):
            rows = [e[f"{side}_ids"] for e in encoded]
            width = max(map(len, rows))
            ids = _on(model, [row + [tokenizer.pad_id] * (width - len(row)) for row in rows])  # right-padded
            last = _on(model, [len(row) - 1 for row in rows])  # the completion's <|im_end|>
            first = _on(model, [[t != IGNORE_INDEX for t in e[f"{side}_labels"]].index(True) for e in encoded])
            side_scores.append(model.sequence_scores(ids, last, first=first))
        margin = side_scores[0] - side_scores[1]
        wins += int((margin > 0).sum())
        margins += margin.tolist()
    out = {"n": len(pairs), "accuracy": wins / max(len(pairs), 1), "margin": sum(margins) / max(len(margins), 1)}
    if rows := rows_by_task(pairs):
        out["tasks"] = {t: {"n": len(i), "accuracy": sum(margins[j] > 0 for j in i) / len(i)} for t, i in rows.items()}
    return out


def _eval_set(data_dir: Path, family: str) -> Path:
    path = data_dir / "eval" / f"{family}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"no evaluation set at {path}: build the corpus (python -m minillm.data) or set eval.data_dir"
        )
    return path


# ---- bits per byte, distinct-n, preference accuracy ----


def heldout_pretraining_texts(data_dir: Path, val_ratio: float = 0.01) -> list[str]:
    """The pretraining records a run with data.val_ratio=`val_ratio` holds out (the same hash split)."""
    from minillm.data.records import BadRecords, is_held_out, read_texts

    texts = []
    for path in sorted((data_dir / "pretrain").glob("*")):
        if path.suffix in (".jsonl", ".txt"):
            texts += [t for t in read_texts(path, BadRecords(skip=True)) if is_held_out(t, val_ratio)]
    return texts


def read_eval_text(path: Path) -> list[str]:
    """Documents of a .txt file (paragraph groups) or a .jsonl file (its "text" fields)."""
    from minillm.data.records import BadRecords, read_texts

    return list(read_texts(path, BadRecords(skip=False)))


@torch.no_grad()
def bits_per_byte(model: MiniGPT, tokenizer: Tokenizer, texts: list[str]) -> dict:
    """Next-token loss over every token of each text (each starting after the </s> separator, as in
    pretraining), in windows of block_size, and bits per byte = Σ loss / Σ UTF-8 bytes / ln 2."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    block = model.config.block_size
    loss_sum, tokens, n_bytes = 0.0, 0, 0
    for text in progress(texts, "bits per byte", unit="text"):
        ids = [tokenizer.eos_id] + tokenizer.encode(text)
        for start in range(0, len(ids) - 1, block):  # window i predicts ids[start + 1 : start + block + 1]
            window = torch.tensor(ids[start : start + block + 1], device=device)[None]
            logits = model(window[:, :-1]).logits.float()
            loss_sum += float(torch.nn.functional.cross_entropy(logits[0], window[0, 1:], reduction="sum"))
            tokens += window.shape[1] - 1
        n_bytes += len(text.encode("utf-8"))
    model.train(was_training)
    return {
        "documents": len(texts),
        "tokens": tokens,
        "bytes": n_bytes,
        "loss": loss_sum / max(tokens, 1),
        "bpb": loss_sum / max(n_bytes, 1) / math.log(2),
    }


def distinct_n(token_lists: list[list[int]], n: int) -> float:
    """Distinct n-grams / all n-grams over a set of generations (1.0: no repetition; token-level, so it means the
    same for Chinese and English)."""
    grams = [tuple(t[i : i + n]) for t in token_lists for i in range(len(t) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def is_degenerate(ids: list[int], repeats: int = 3) -> bool:
    """Whether a reply repeats one token or one bigram more than `repeats` times in a row ("I't't't't…")."""
    for width in (1, 2):
        span = width * (repeats + 1)
        for i in range(len(ids) - span + 1):
            if all(ids[i + j] == ids[i + j % width] for j in range(width, span)):
                return True
    return False


@torch.no_grad()
def completion_logps(model: MiniGPT, tokenizer: Tokenizer, pairs: list[dict]) -> torch.Tensor:
    """Summed log-probs of the chosen and rejected completions of each pair: (N, 2)."""
    from minillm.data.kinds import encode_pair
    from minillm.data.records import to_preference
    from minillm.losses import sequence_logprobs

    model.eval()
    block = model.config.block_size
    out = []
    for p in progress(pairs, "pair log-probs", unit="pair"):
        enc = encode_pair(tokenizer, to_preference(p), (block // 2, block - block // 2))
        row = []
        for side in ("chosen", "rejected"):
            ids, labels = _on(model, [enc[f"{side}_ids"]]), _on(model, [enc[f"{side}_labels"]])
            row.append(float(sequence_logprobs(model(ids[:, :-1]).logits, labels[:, 1:])[0]))
        out.append(row)
    return torch.tensor(out).view(-1, 2)


def preference_accuracy(policy_logps: torch.Tensor, reference_logps: torch.Tensor | None = None) -> dict:
    """Fraction of pairs whose chosen completion wins by log-prob (`accuracy`, `margin`) and, given the
    reference's log-probs, by log-prob gain over the reference (`reward_accuracy`, `reward_margin`: DPO's
    implicit reward, what DPO's rewards/accuracies counts)."""
    margins = policy_logps[:, 0] - policy_logps[:, 1]
    out = {"n": len(margins), **_wins(margins, "")}
    if reference_logps is not None:
        out |= _wins(margins - (reference_logps[:, 0] - reference_logps[:, 1]), "reward_")
    return out


def preference_by_task(policy_logps: torch.Tensor, reference_logps: torch.Tensor | None, pairs: list[dict]) -> dict:
    """`preference_accuracy` of all the pairs, and of each `task` the pairs name under "tasks" (a sum against a
    near miss; a dialogue reply against another dialogue's or a cut one, ...)."""
    out = preference_accuracy(policy_logps, reference_logps)
    if rows := rows_by_task(pairs):
        out["tasks"] = {
            task: preference_accuracy(policy_logps[i], None if reference_logps is None else reference_logps[i])
            for task, i in rows.items()
        }
    return out


def rows_by_task(records: list[dict]) -> dict[str, list[int]]:
    """The indices of the records of each `task` they name, tasks sorted ({} when none names one)."""
    rows: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        if "task" in r:
            rows.setdefault(r["task"], []).append(i)
    return dict(sorted(rows.items()))


def _wins(margins: torch.Tensor, prefix: str) -> dict[str, float]:
    return {
        f"{prefix}accuracy": float((margins > 0).float().mean()) if len(margins) else 0.0,
        f"{prefix}margin": float(margins.mean()) if len(margins) else 0.0,
    }


@torch.no_grad()
def kl_to_reference(
    model: MiniGPT, reference: MiniGPT, tokenizer: Tokenizer, records: list[dict], max_new_tokens: int = 48, seed=0
) -> dict:
    """KL(π ‖ π_ref) per reply, estimated on replies y ~ π (temperature 1, seeded) to each prompt record:
    mean over replies of Σ_t log π(y_t | x, y_<t) - log π_ref(y_t | x, y_<t) (RLHF's objective/kl)."""
    from minillm.data.records import to_prompt
    from minillm.losses import token_logprobs

    model.eval()
    reference.eval()
    totals, lengths = [], []
    for i, record in enumerate(progress(records, "KL", unit="reply")):
        context = apply_chat_template(tokenizer, to_prompt(record)["prompt"], add_generation_prompt=True).ids
        context = context[-(model.config.block_size - max_new_tokens) :]  # room for the reply
        config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=1.0, seed=seed + i)
        prompt = _on(model, [context])
        (completion,) = generate_ids(model, tokenizer, prompt, torch.ones_like(prompt), config)
        lengths.append(len(completion))
        if not completion:
            totals.append(0.0)
            continue
        ids = _on(model, [context + completion])
        gap = [
            token_logprobs(m(ids[:, :-1]).logits[:, len(context) - 1 :], ids[:, len(context) :])
            for m in (model, reference)
        ]
        totals.append(float((gap[0] - gap[1]).sum()))
    n = max(len(totals), 1)
    return {"n": len(totals), "kl": sum(totals) / n, "mean_length": sum(lengths) / n}


# ---- the whole evaluation ----


def evaluate(model_path: str | Path, config: EvalConfig, device: str = "cpu") -> dict:
    """Run the configured tasks on one model; returns what eval.json holds. Every model is loaded on `device`
    ("auto": CUDA, then MPS, then the CPU) in float32, so the numbers depend on the weights, not on the
    decoding dtype; the device is recorded beside the config, not in it (a cached result stays valid)."""
    from minillm.pretrained import META_FILE, load_reward_model

    if device == "auto":
        from minillm.accelerator import best_device

        device = best_device()

    def lm(path: str) -> MiniGPT:
        return load_model(path, device, "float32")[0]

    def rm(path: str) -> RewardModel:
        return load_reward_model(path)[0].to(device)

    model_path = Path(model_path)
    meta = model_path / META_FILE
    kind = json.loads(meta.read_text()).get("kind", "lm") if meta.is_file() else "lm"
    data_dir = Path(config.data_dir)
    result: dict = {
        "eval_version": EVAL_VERSION,
        "model_path": str(model_path),
        "kind": kind,
        "config": asdict(config),
        "device": str(device),
        "tasks": {},
    }
    if kind == "reward":
        asked = set(config.tasks)
        if asked != set(EvalConfig().tasks) and "preference" not in asked:
            raise ValueError(
                f"{model_path} is a reward model: it is evaluated by pairwise accuracy on eval.pairs, not by "
                f"eval.tasks={list(config.tasks)} (language-model tasks); leave eval.tasks unset or include preference"
            )
        model, tokenizer = load_reward_model(model_path)
        model = model.to(device)
        result["tasks"]["reward_model"] = {
            name: pairwise_accuracy(model, tokenizer, load_family(_eval_set(data_dir, name), config.limit))
            for name in config.pairs
        }
        return result
    model, tokenizer = load_model(str(model_path), device, "float32")
    tasks = result["tasks"]
    if "bpb" in config.tasks:
        texts = read_eval_text(Path(config.text)) if config.text else heldout_pretraining_texts(data_dir)
        tasks["bpb"] = {
            "source": config.text or f"{data_dir}/pretrain (held out)",
            **bits_per_byte(model, tokenizer, texts[: config.limit]),
        }
    if "verifiable" in config.tasks:
        records = load_family(_eval_set(data_dir, config.family), config.limit)
        tasks["verifiable"] = {
            "family": config.family,
            **exact_match_rate(model, tokenizer, records, config.batch_size, config.max_new_tokens),
        }
    if "preference" in config.tasks:
        reference = lm(config.reference) if config.reference else None
        per = {}
        for name in config.pairs:
            pairs = load_family(_eval_set(data_dir, name), config.limit)
            ref = completion_logps(reference, tokenizer, pairs) if reference is not None else None
            per[name] = preference_by_task(completion_logps(model, tokenizer, pairs), ref, pairs)
        n = sum(v["n"] for v in per.values())
        keys = ("accuracy", "reward_accuracy") if reference is not None else ("accuracy",)
        tasks["preference"] = {
            **{k: sum(v[k] * v["n"] for v in per.values()) / max(n, 1) for k in keys},
            "n": n,
            "reference": config.reference,
            "files": per,
        }
    if "reward" in config.tasks:
        prompts = Path(config.prompts) if config.prompts else _eval_set(data_dir, config.family)
        records = load_family(prompts, config.limit)
        scorer = rm(config.reward_model) if config.reward_model else None  # scores the same replies
        gold = rm(config.gold_reward_model) if config.gold_reward_model else None
        tasks["reward"] = {
            "prompts": str(prompts),
            "reward_model": config.reward_model,
            "gold_reward_model": config.gold_reward_model,
            **mean_reward(
                model, tokenizer, records, config.reward, config.batch_size, config.max_new_tokens, scorer, gold
            ),
        }
    if "kl" in config.tasks and config.reference:
        prompts = Path(config.prompts) if config.prompts else _eval_set(data_dir, config.family)
        reference = lm(config.reference)
        tasks["kl"] = {
            "prompts": str(prompts),
            "reference": config.reference,
            **kl_to_reference(
                model,
                reference,
                tokenizer,
                load_family(prompts, config.limit),
                config.max_new_tokens,
                config.seed,
            ),
        }
    if "samples" in config.tasks:
        generation = GenerationConfig(
            max_new_tokens=config.max_new_tokens, temperature=0.8, top_p=0.9, seed=config.seed
        )
        texts = generate(model, tokenizer, SAMPLE_PROMPTS, generation)
        ids = [tokenizer.encode(t) for t in texts]
        tasks["samples"] = {
            "distinct_1": distinct_n(ids, 1),
            "distinct_2": distinct_n(ids, 2),
            "samples": [{"prompt": p, "text": t} for p, t in zip(SAMPLE_PROMPTS, texts)],
        }
    return result
