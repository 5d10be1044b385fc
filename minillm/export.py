"""minillm export model_path=outputs/sft_tiny/final out=hf_model/ [overwrite=true]

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
from dataclasses import dataclass
from pathlib import Path

from minillm.cli import Command
from minillm.pretrained import _load, save_pretrained


def export(model_path: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    from minillm.model import RewardModel

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out={out} is a file, not a folder; choose a folder path (new or empty)")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held and not overwrite:
        raise ValueError(
            f"out={out} already holds files ({', '.join(held[:5])}{'…' if len(held) > 5 else ''}); choose a new or "
            "empty folder, or add overwrite=true to write the export over them"
        )
    model, tokenizer, score = _load(Path(model_path), "cpu")
    if model.config.is_moe:
        raise ValueError(
            f"{model_path} is a mixture-of-experts model: exporting it to the transformers format is not supported "
            "yet; use the minillm folder itself with minillm.generate / minillm.chat"
        )
    if score is not None:
        model = RewardModel.from_trunk(model, score)
    return save_pretrained(model, tokenizer, out)


@dataclass
class ExportCommand:
    """`minillm export` (minillm/conf/export.yaml)."""

    model_path: str = "???"  # a final/ folder or a training checkpoint
    out: str = "???"  # a new or empty folder
    overwrite: bool = False  # write over the files already in `out`


def run(command: ExportCommand) -> None:
    try:
        out = export(command.model_path, command.out, overwrite=command.overwrite)
    except (ValueError, FileNotFoundError) as e:  # a user error: the message says what to do
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"exported {command.model_path} to {out} (transformers layout)")


COMMAND = Command("export", ExportCommand, run)
cli, main = COMMAND.cli, COMMAND.main  # main(argv): the same command from Python


if __name__ == "__main__":
    cli()
