"""python -m minillm.eval model_path=DIR [eval.tasks=[bpb,verifiable,preference,reward,samples]] [eval.text=FILE]

Evaluates a model folder (or checkpoint), prints a table and writes `eval.json` next to it; the tasks are
described in minillm/evaluation.py. Every key is an `EvalConfig` field; values are parsed like Hydra overrides
(`eval.limit=50`, `eval.tasks=[bpb,samples]`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from minillm.evaluation import EvalConfig, evaluate, headline, output_path
from minillm.generate import parse_cli


def main(argv: list[str]) -> None:
    from omegaconf import OmegaConf

    values = parse_cli(argv)
    if "model_path" not in values:
        raise SystemExit(
            "usage: python -m minillm.eval model_path=DIR [eval.tasks=[...]] [eval.text=FILE] "
            "[eval.limit=N] ... (EvalConfig fields)"
        )
    model_path = Path(str(values.pop("model_path")))
    unknown = sorted(k for k in values if not k.startswith("eval."))
    if unknown:
        raise SystemExit(f"error: unknown keys {unknown}: evaluation settings are eval.<EvalConfig field>")
    try:
        overrides = OmegaConf.from_dotlist([f"{k.removeprefix('eval.')}={_dot(v)}" for k, v in values.items()])
        config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(EvalConfig), overrides))
        result = evaluate(model_path, config)
    except Exception as e:  # an unknown key, a wrong type, a missing file: say which
        raise SystemExit(f"error: {e}") from None
    out = output_path(model_path, config)
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
    print(f"{model_path} ({result['kind']})")
    for name, value in headline(result).items():
        print(f"  {name:<32} {value:.4f}")
    print(f"wrote {out}")


def _dot(value) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


if __name__ == "__main__":
    main(sys.argv[1:])
