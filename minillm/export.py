"""python -m minillm.export model_path=outputs/sft_tiny/final out=hf_model/

A self-contained copy of a model for sharing, in the transformers layout: config.json (LlamaForCausalLM, or
LlamaForSequenceClassification for a reward model), model.safetensors, tokenizer.model with
tokenizer_config.json (ChatML chat template, no extra BOS, no dummy prefix), special_tokens_map.json and
generation_config.json. `model_path` may be a final/ folder or a training checkpoint. The copy loads with
`AutoModelForCausalLM.from_pretrained(out)` / `AutoTokenizer.from_pretrained(out)`, and back with
`minillm.generate.load_model(out)` (also after it was saved again by transformers, without minillm.json).
Mixture-of-experts models are not exportable to transformers yet (their router layout has no Llama
equivalent): they stay usable as minillm folders.
"""

from __future__ import annotations

import sys
from pathlib import Path

from minillm.generate import parse_cli
from minillm.pretrained import _load, save_pretrained


def export(model_path: str | Path, out: str | Path) -> Path:
    from minillm.model import RewardModel

    model, tokenizer, score = _load(Path(model_path), "cpu")
    if model.config.is_moe:
        raise ValueError(
            f"{model_path} is a mixture-of-experts model: exporting it to the transformers format is not supported "
            "yet; use the minillm folder itself with minillm.generate / minillm.chat"
        )
    if score is not None:
        head = RewardModel(model.config, trunk=model).score
        head.weight.data.copy_(score)
        model = RewardModel(model.config, trunk=model, score=head)
    return save_pretrained(model, tokenizer, out)


def main(argv: list[str]) -> None:
    values = parse_cli(argv)
    if "model_path" not in values or "out" not in values:
        raise SystemExit("usage: python -m minillm.export model_path=DIR_OR_CKPT out=DIR")
    try:
        out = export(str(values["model_path"]), str(values["out"]))
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"exported {values['model_path']} to {out} (transformers layout)")


if __name__ == "__main__":
    main(sys.argv[1:])
