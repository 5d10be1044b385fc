"""python -m minillm.eval model_path=DIR [family=verifiable] [limit=200] [data_dir=data/builtin]

Exact-match accuracy on a held-out chat family (`<data dir>/eval/<family>.jsonl`): greedy decoding through
the chat template, the reply compared with the record's `answer` after stripping whitespace. (The evaluation
issue grows this into bits-per-byte, preference and reward accuracy and a report.)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from minillm.generate import GenerationConfig, generate, load_model, parse_cli
from minillm.model import MiniGPT
from minillm.tokenizer import Tokenizer


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


def main(argv: list[str]) -> None:
    values = parse_cli(argv)
    if "model_path" not in values:
        raise SystemExit("usage: python -m minillm.eval model_path=DIR [family=verifiable] [limit=N]")
    family = str(values.get("family", "verifiable"))
    path = Path(str(values.get("data_dir", "data/builtin"))) / "eval" / f"{family}.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: no evaluation set at {path}")
    model, tokenizer = load_model(str(values["model_path"]))
    result = exact_match(model, tokenizer, load_family(path, values.get("limit")))
    print(
        json.dumps({"family": family, "model_path": str(values["model_path"]), **result}, indent=2, ensure_ascii=False)
    )


if __name__ == "__main__":
    main(sys.argv[1:])
