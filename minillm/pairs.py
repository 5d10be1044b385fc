"""minillm pairs model_path=DIR [data_dir=data/builtin] [family=verifiable] [limit=1000]
[max_new_tokens=32] [batch_size=32] [out=<data_dir>/preference/<family>_onpolicy.jsonl]

Writes the on-policy preference pairs of minillm/data/pairs.py: each wrong greedy answer of the model to a
training question becomes a pair (reference answer chosen, the model's reply rejected). The file is rewritten only
when the model is newer than it, so `make demo` can run this every time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from minillm.cli import Command
from minillm.files import write_text_atomic


@dataclass
class PairsCommand:
    """`minillm pairs` (conf/pairs.yaml)."""

    model_path: str = "???"
    data_dir: str = "data/builtin"
    family: str = "verifiable"  # <data_dir>/sft/<family>.jsonl: the questions (training split)
    limit: int = 1000
    max_new_tokens: int = 32
    batch_size: int = 32
    out: Optional[str] = None  # None: <data_dir>/preference/<family>_onpolicy.jsonl
    device: str = "auto"  # auto: CUDA, then MPS, then the CPU; greedy answers in fp32 on any device


def run(command: PairsCommand) -> None:
    from minillm.data.pairs import onpolicy_pairs
    from minillm.evaluation import load_family
    from minillm.generate import load_model

    model_path, data_dir, family = Path(command.model_path), Path(command.data_dir), command.family
    limit, max_new_tokens, batch_size = command.limit, command.max_new_tokens, command.batch_size
    out = Path(command.out) if command.out else data_dir / "preference" / f"{family}_onpolicy.jsonl"
    source = data_dir / "sft" / f"{family}.jsonl"
    if not source.is_file():
        raise SystemExit(f"error: no training questions at {source}: build the corpus or set data_dir/family")
    weights = model_path / "model.safetensors"
    if out.is_file() and weights.is_file() and out.stat().st_mtime >= weights.stat().st_mtime:
        print(f"{out} is newer than {weights}: kept")
        return
    records = [r for r in load_family(source, limit) if "answer" in r]
    model, tokenizer = load_model(str(model_path), command.device, "float32")
    print(f"answering on {model.lm_head.weight.device}")
    result = onpolicy_pairs(model, tokenizer, records, max_new_tokens, batch_size)
    if not result["pairs"]:  # an empty preference file would be a data error for DPO: write none
        out.unlink(missing_ok=True)
        print(f"{model_path}: no non-empty wrong answers to {result['asked']} {family} training questions; no pairs")
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in result["pairs"]))
    print(
        f"{model_path} answered {result['asked'] - result['wrong']} of {result['asked']} {family} training "
        f"questions; {len(result['pairs'])} wrong answers written as pairs to {out} ({result['empty']} empty, skipped)"
    )


COMMAND = Command("pairs", PairsCommand, run)
cli, main = COMMAND.cli, COMMAND.main  # main(argv): the same command from Python


if __name__ == "__main__":
    cli()
