"""minillm eval model_path=DIR [eval.tasks=[bpb,verifiable,preference,reward,samples]] [eval.text=FILE]

Evaluates a model folder (or checkpoint), prints a table and writes `eval.json` next to it; the tasks are
described in minillm/evaluation.py. The keys under `eval.` are `EvalConfig` fields (`eval.limit=50`,
`eval.tasks=[bpb,samples]`); several models in one sweep: `minillm eval -m model_path=DIR_A,DIR_B`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from minillm.cli import Command
from minillm.config import EvalConfig


@dataclass
class EvalCommand:
    """`minillm eval` (conf/eval.yaml)."""

    model_path: str = "???"  # a final/ folder, an export, or a training checkpoint
    eval: EvalConfig = field(default_factory=EvalConfig)
    device: str = "auto"  # auto: CUDA, then MPS, then the CPU; models are evaluated in fp32 on any device


def run(command: EvalCommand) -> dict:
    from minillm.evaluation import evaluate, headline, output_path

    model_path, config = Path(command.model_path), command.eval
    try:
        result = evaluate(model_path, config, command.device)
    except Exception as e:  # a missing file, an unreadable model: say which
        raise SystemExit(f"error: {e}") from None
    out = output_path(model_path, config)
    if (
        not config.out
        and out.is_file()
        and json.loads(out.read_text(encoding="utf-8")).get("config") != result["config"]
    ):
        # the report's cache (or another run's) with other settings: kept; this result goes beside it
        digest = hashlib.sha256(json.dumps(result["config"], sort_keys=True).encode()).hexdigest()[:8]
        out = out.with_name(f"eval-{digest}.json")
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
    print(f"{model_path} ({result['kind']}, on {result['device']})")
    for name, value in headline(result).items():
        print(f"  {name:<32} {value:.4f}")
    print(f"wrote {out}")
    return result


COMMAND = Command("eval", EvalCommand, run)
cli, main = COMMAND.cli, COMMAND.main  # main(argv): the same command from Python


if __name__ == "__main__":
    cli()
