"""The four kinds of training data, each named after its folder in a data dir and after a stage's `data`:

| kind         | folder         | read                               | one row of the dataset                          |
|--------------|----------------|------------------------------------|-------------------------------------------------|
| `PRETRAIN`   | `pretrain/`    | `.jsonl` {"text"} and `.txt`       | a window of block_size + 1 packed tokens        |
| `SFT`        | `sft/`         | conversations (several formats)    | one conversation (or several, data.packing)     |
|              |                | or plain text {"text"}             | (plain text: every token a target)              |
| `PREFERENCE` | `preference/`  | prompt + chosen + rejected         | the chosen and the rejected sequence            |
| `PROMPTS`    | `prompts/`     | a prompt and the fields rules read | a prompt, left-padded in a batch for generation |

A kind says how its records are read (minillm/data/records.py), tokenized and packed (batched functions for
`Dataset.map`) and collated into batches. The per-record encoders (`encode_chat`, `encode_pair`,
`encode_prompt`) are plain functions: evaluation uses them without a data module. No Lightning here.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from minillm.data.records import (
    BadRecords,
    read_conversations,
    read_preferences,
    read_prompts,
    read_texts,
    to_sft_record,
    to_preference,
    to_prompt,
    to_text,
)
from minillm.generate import left_pad
from minillm.losses import IGNORE_INDEX
from minillm.tokenizer import Tokenizer, apply_chat_template


# ---- per-record encoders ----
def encode_chat(tokenizer: Tokenizer, messages: list[dict], window: int) -> tuple[list[int], list[int], bool]:
    """(ids, labels, truncated) of one conversation in at most `window` tokens.

    Too long: drop the oldest whole exchanges (a system prompt stays) while another assistant turn remains;
    still too long: cut the end off, or — when that would leave no assistant token — the start.
    """
    system = messages[:1] if messages[0]["role"] == "system" else []
    rest = messages[len(system) :]
    truncated = False
    while True:
        enc = apply_chat_template(tokenizer, system + rest)
        first_answer = next(i for i, m in enumerate(rest) if m["role"] == "assistant")
        if len(enc.ids) <= window or not any(m["role"] == "assistant" for m in rest[first_answer + 1 :]):
            break
        rest, truncated = rest[first_answer + 1 :], True
    ids, mask = enc.ids, enc.assistant_mask
    if len(ids) > window:
        truncated = True
        ids, mask = (ids[:window], mask[:window]) if any(mask[:window]) else (ids[-window:], mask[-window:])
    return ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask)], truncated


def encode_sft(tokenizer: Tokenizer, record: list[dict] | dict, window: int) -> tuple[list[int], list[int], bool]:
    """(ids, labels, truncated) of one SFT record: a conversation (`encode_chat`), or plain text {"text"}: its
    tokens and EOS, every one a target as in pretraining (the first `window` tokens kept)."""
    if isinstance(record, list):
        return encode_chat(tokenizer, record, window)
    ids = tokenizer.encode(record["text"]) + [tokenizer.eos_id]
    return ids[:window], ids[:window], len(ids) > window


def encode_pair(tokenizer: Tokenizer, pair: dict, lengths: tuple[int, int]) -> dict:
    """Prompt (chat template, open assistant turn; its end kept) + each completion (its start kept, with
    <|im_end|>). Labels are -100 on the prompt, so only completion tokens enter the log-probs."""
    max_prompt, max_completion = lengths
    prompt = apply_chat_template(tokenizer, pair["prompt"], add_generation_prompt=True).ids
    truncated = len(prompt) > max_prompt
    prompt = prompt[-max_prompt:]
    out = {"truncated": truncated}
    for side in ("chosen", "rejected"):
        completion = tokenizer.encode(pair[side]) + [tokenizer.im_end_id]
        out["truncated"] = out["truncated"] or len(completion) > max_completion
        completion = completion[:max_completion]
        out[f"{side}_ids"] = prompt + completion
        out[f"{side}_labels"] = [IGNORE_INDEX] * len(prompt) + completion
    return out


def encode_prompt(tokenizer: Tokenizer, prompt: str | list[dict], max_length: int) -> tuple[list[int], bool]:
    """(ids, truncated): the chat template with an open assistant turn; the end of a too long prompt is kept."""
    ids = apply_chat_template(tokenizer, prompt, add_generation_prompt=True).ids
    return ids[-max_length:], len(ids) > max_length


# ---- the kinds ----
class Kind:
    """What a data folder holds and how it becomes batches. Subclasses fill in the hooks."""

    name = ""  # the folder in a data dir, the stage's `data`
    patterns: tuple[str, ...] = ("*.jsonl",)
    targets = True  # rows count their target tokens (`n_targets`) and truncation: stats and weighting
    weighted = False  # the sampler weights each micro-batch by the target tokens of its optimizer step
    perplexity = True  # the validation loss is a per-token loss (val/ppl is logged)
    read: Callable[[Path, BadRecords], Iterator[str]]  # a file's records, as stored in the records table
    normalise: Callable[[dict], object]  # one object (a dataset row) -> our record, or a str: what is wrong

    def record_text(self, record) -> str:
        """How a normalised record is stored in the records table: its JSON text (pretraining: the text)."""
        return json.dumps(record, ensure_ascii=False)

    def check(self, block_size: int, lengths: tuple[int, int]) -> None:
        """Refuse settings that cannot fit (called when the data module is made)."""

    def tokenize(self, batch: dict, tokenizer: Tokenizer, window: int, lengths: tuple[int, int]) -> dict:
        raise NotImplementedError

    def packs(self, packing: bool) -> bool:
        """Whether rows are packed into windows (`pack`) after tokenizing."""
        return False

    def pack(self, batch: dict, window: int, eos: int) -> dict:
        raise NotImplementedError

    def collate(self, rows: list[dict], tokenizer: Tokenizer) -> dict:
        return collate_padded(rows, tokenizer)

    def collates(self) -> bool:
        """False: the loader's default collate stacks the (equal-length) rows."""
        return True

    def tokens_per_record(self, length: int) -> int:
        """Tokens a record adds to the stats' token counts."""
        return length

    def packing_efficiency(self, rows: int, tokens: int, block_size: int, packing: bool) -> float | None:
        return None  # padded per batch

    def __repr__(self) -> str:
        return f"<data kind {self.name}>"

    def __reduce__(self):  # pickled by name (Dataset.map with several processes)
        return (kind_named, (self.name,))


class _Pretrain(Kind):
    """Documents packed into windows of block_size + 1 tokens with EOS between documents."""

    name = "pretrain"
    patterns = ("*.jsonl", "*.txt")
    targets = False
    read = staticmethod(read_texts)
    normalise = staticmethod(to_text)

    def record_text(self, record) -> str:
        return record["text"]

    def tokenize(self, batch, tokenizer, window, lengths):
        ids = tokenizer.encode_batch(batch["text"])
        return {"ids": ids, "length": [len(x) for x in ids]}

    def packs(self, packing: bool) -> bool:
        return True

    def pack(self, batch, window, eos):
        """Concatenate documents with EOS after each and cut full windows; windows overlap by one token, so every
        token is a target exactly once."""
        stream: list[int] = []
        for ids in batch["ids"]:
            stream.extend(ids)
            stream.append(eos)
        step = window - 1
        n = (len(stream) - 1) // step
        return {"input_ids": [stream[i * step : i * step + window] for i in range(n)]}

    def collates(self) -> bool:
        return False

    def tokens_per_record(self, length: int) -> int:
        return length + 1  # + the EOS separator

    def packing_efficiency(self, rows, tokens, block_size, packing):
        return rows * block_size / max(tokens, 1)  # windows share one token: each adds block_size targets


class _SFT(Kind):
    """One conversation per row, labels -100 outside the assistant tokens; with data.packing several per window
    (positions restart at 0 for each, so the model's block-diagonal mask keeps them apart)."""

    name = "sft"
    weighted = True
    read = staticmethod(read_conversations)
    normalise = staticmethod(to_sft_record)

    def tokenize(self, batch, tokenizer, window, lengths):
        out = {"input_ids": [], "labels": [], "truncated": [], "length": [], "n_targets": []}
        for text in batch["text"]:
            ids, labels, truncated = encode_sft(tokenizer, json.loads(text), window)
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["truncated"].append(truncated)
            out["length"].append(len(ids))
            out["n_targets"].append(sum(label != IGNORE_INDEX for label in labels[1:]))  # targets after the shift
        return out

    def packs(self, packing: bool) -> bool:
        return packing

    def pack(self, batch, window, eos):
        """Greedily put consecutive conversations into windows of at most `window` tokens."""
        out = {"input_ids": [], "labels": [], "position_ids": [], "truncated": [], "n_targets": []}
        current = {k: [] for k in out}

        def flush() -> None:
            if current["input_ids"]:
                for k in ("input_ids", "labels", "position_ids"):
                    out[k].append(current[k])
                out["truncated"].append(any(current["truncated"]))
                out["n_targets"].append(sum(label != IGNORE_INDEX for label in current["labels"][1:]))
            for k in current:
                current[k] = []

        for ids, labels, truncated in zip(batch["input_ids"], batch["labels"], batch["truncated"]):
            if len(current["input_ids"]) + len(ids) > window:
                flush()
            current["input_ids"] += ids
            current["labels"] += labels
            current["position_ids"] += list(range(len(ids)))
            current["truncated"].append(truncated)
        flush()
        return out

    def packing_efficiency(self, rows, tokens, block_size, packing):
        return tokens / max(rows * (block_size + 1), 1) if packing else None  # window slots filled


class _Preference(Kind):
    """Prompt + chosen and prompt + rejected, completion tokens as targets."""

    name = "preference"
    perplexity = False
    read = staticmethod(read_preferences)
    normalise = staticmethod(to_preference)

    def check(self, block_size, lengths):
        if sum(lengths) > block_size + 1:
            raise ValueError(
                f"stage.max_prompt_length + stage.max_completion_length = {sum(lengths)} exceeds "
                f"model.block_size + 1 = {block_size + 1}"
            )

    def tokenize(self, batch, tokenizer, window, lengths):
        keys = ("chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels", "truncated")
        out: dict[str, list] = {k: [] for k in (*keys, "length", "n_targets")}
        for text in batch["text"]:
            enc = encode_pair(tokenizer, json.loads(text), lengths)
            for k in keys:
                out[k].append(enc[k])
            out["length"].append(len(enc["chosen_ids"]) + len(enc["rejected_ids"]))
            out["n_targets"].append(sum(t != IGNORE_INDEX for t in enc["chosen_labels"] + enc["rejected_labels"]))
        return out


class _Prompts(Kind):
    """Prompts for generation (RLHF), with the record's fields for rule rewards."""

    name = "prompts"
    read = staticmethod(read_prompts)
    normalise = staticmethod(to_prompt)

    def tokenize(self, batch, tokenizer, window, lengths):
        out = {"prompt_ids": [], "truncated": [], "length": [], "n_targets": []}
        for text in batch["text"]:
            ids, truncated = encode_prompt(tokenizer, json.loads(text)["prompt"], lengths[0])
            out["truncated"].append(truncated)
            out["prompt_ids"].append(ids)
            out["length"].append(len(ids))
            out["n_targets"].append(0)
        return out

    def collate(self, rows, tokenizer):
        """Prompts left-padded for generation: input_ids and attention_mask (B, P), and the records (dicts)
        for reward rules that read their fields."""
        ids, mask = left_pad([r["prompt_ids"].tolist() for r in rows], tokenizer.pad_id)
        return {"input_ids": ids, "attention_mask": mask, "records": [json.loads(r["text"]) for r in rows]}


PRETRAIN, SFT, PREFERENCE, PROMPTS = _Pretrain(), _SFT(), _Preference(), _Prompts()
KINDS: dict[str, Kind] = {k.name: k for k in (PRETRAIN, SFT, PREFERENCE, PROMPTS)}


def kind_named(name: str) -> Kind:
    if name not in KINDS:
        raise ValueError(f"unknown data kind {name!r}; the kinds are {sorted(KINDS)}")
    return KINDS[name]


def collate_padded(rows: list[dict], tokenizer: Tokenizer) -> dict[str, torch.Tensor]:
    """Right-pad rows to the longest sequence in the batch (chosen and rejected share one width): pad id for
    ids, -100 for labels, position 0 for positions."""
    fill = {
        "input_ids": tokenizer.pad_id,
        "labels": IGNORE_INDEX,
        "position_ids": 0,
        "chosen_ids": tokenizer.pad_id,
        "chosen_labels": IGNORE_INDEX,
        "rejected_ids": tokenizer.pad_id,
        "rejected_labels": IGNORE_INDEX,
    }
    keys = [k for k in fill if k in rows[0]]
    width = max(len(r[k]) for r in rows for k in keys)
    batch = {k: torch.stack([F.pad(r[k], (0, width - len(r[k])), value=fill[k]) for r in rows]) for k in keys}
    batch["truncated"] = torch.stack([r["truncated"] for r in rows])
    if "window_tokens" in rows[0]:
        batch["window_tokens"] = torch.tensor([r["window_tokens"] for r in rows])
    return batch
