"""minillm export model_path=outputs/sft_tiny/final out=hf_model/ [overwrite=true] [format=gguf gguf.type=q8_0]

A self-contained copy of a model for sharing, in the transformers layout: config.json (LlamaForCausalLM, or
LlamaForSequenceClassification for a reward model), model.safetensors, tokenizer.model with
tokenizer_config.json (ChatML chat template, no extra BOS, no dummy prefix), special_tokens_map.json and
generation_config.json. `model_path` may be a final/ folder or a training checkpoint. The copy loads with
`AutoModelForCausalLM.from_pretrained(out)` / `AutoTokenizer.from_pretrained(out)`, and back with
`minillm.generate.load_model(out)` (also after it was saved again by transformers, without minillm.json).
Mixture-of-experts models are not exportable to transformers yet (their router layout has no Llama
equivalent): they stay usable as minillm folders.

`format=gguf` writes one `.gguf` file for llama.cpp / ollama instead (minillm/gguf_writer.py; `out` is the file,
or a folder to write `model-<type>.gguf` into; `gguf.type` f32, f16, bf16 or q8_0).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from minillm.cli import Command
from minillm.config import GGUF_TYPES
from minillm.progress import phase


def export(model_path: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    from minillm.model import RewardModel
    from minillm.pretrained import load_parts, save_pretrained

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out={out} is a file, not a folder; choose a folder path (new or empty)")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held and not overwrite:
        raise ValueError(
            f"out={out} already holds files ({', '.join(held[:5])}{'…' if len(held) > 5 else ''}); choose a new or "
            "empty folder, or add overwrite=true to write the export over them"
        )
    model, tokenizer, head = load_parts(Path(model_path), "cpu")
    if model.config.is_moe:
        raise ValueError(
            f"{model_path} is a mixture-of-experts model: exporting it to the transformers format is not supported "
            "yet; use the minillm folder itself with minillm.generate / minillm.chat"
        )
    if head is not None:
        model = RewardModel.from_trunk(model, *head)
    return save_pretrained(model, tokenizer, out)


def export_gguf(model_path: str | Path, out: str | Path, dtype: str = "f32", overwrite: bool = False) -> Path:
    from minillm.gguf_writer import write_gguf
    from minillm.pretrained import load_parts

    out = Path(out)
    if out.suffix != ".gguf" and out.exists() and not out.is_dir():
        raise ValueError(
            f"out={out} is an existing file, not a .gguf path or a folder: name a new file ending in .gguf "
            f"(out={out}.gguf) or a folder to write model-{dtype}.gguf into"
        )
    if out.suffix != ".gguf":
        out = out / f"model-{dtype}.gguf"
    if out.exists() and not overwrite:
        raise ValueError(f"out={out} exists; choose another path, or add overwrite=true to replace it")
    model, tokenizer, head = load_parts(Path(model_path), "cpu")
    if head is not None:
        raise ValueError(
            f"{model_path} is a reward model (a scalar head, not a language model head): llama.cpp has no "
            "architecture that reads it; export it with format=hf (LlamaForSequenceClassification)"
        )
    return write_gguf(model, tokenizer, out, dtype, name=Path(model_path).resolve().parent.name)


@dataclass
class GGUFOptions:
    type: str = "f32"  # f32 | f16 | bf16 | q8_0

    def __post_init__(self) -> None:
        if self.type not in GGUF_TYPES:
            raise ValueError(f"gguf.type must be one of {', '.join(GGUF_TYPES)}, got {self.type!r}")


@dataclass
class ExportCommand:
    """`minillm export` (conf/export.yaml)."""

    model_path: str = "???"  # a final/ folder or a training checkpoint
    out: str = "???"  # a new or empty folder (format=gguf: a .gguf file, or a folder)
    overwrite: bool = False  # write over the files already in `out`
    format: str = "hf"  # hf (the transformers layout) | gguf (llama.cpp, ollama)
    gguf: GGUFOptions = field(default_factory=GGUFOptions)

    def __post_init__(self) -> None:
        if self.format not in ("hf", "gguf"):
            raise ValueError(f"format must be hf or gguf, got {self.format!r}")


def run(command: ExportCommand) -> None:
    phase(f"export: reading {command.model_path}, writing {command.out} ({command.format})")
    try:
        if command.format == "gguf":
            out = export_gguf(command.model_path, command.out, command.gguf.type, overwrite=command.overwrite)
        else:
            out = export(command.model_path, command.out, overwrite=command.overwrite)
    except (ValueError, FileNotFoundError) as e:  # a user error: the message says what to do
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    layout = f"GGUF, {command.gguf.type}" if command.format == "gguf" else "transformers layout"
    print(f"exported {command.model_path} to {out} ({layout})")


COMMAND = Command("export", ExportCommand, run)
cli, main = COMMAND.cli, COMMAND.main  # main(argv): the same command from Python


if __name__ == "__main__":
    cli()
