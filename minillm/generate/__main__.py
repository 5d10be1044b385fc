"""`minillm generate` (or `python -m minillm.generate`): complete prompts with a trained model. The command
over the library in `minillm/generate/__init__.py`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from minillm.cli import Command
from minillm.config import GenerationConfig, generation_config
from minillm.progress import batch_starts


@dataclass
class GenerateCommand(GenerationConfig):
    """`minillm generate` (conf/generate.yaml): a model, prompts, and every GenerationConfig field.

    `prompt` may be a list (prompt='["To be","你好"]') or `prompt_file=FILE` (one per line), decoded
    `batch_size` at a time;
    `chat=true` sends each prompt as a user message through the chat template (for SFT models). Values are parsed
    as Hydra overrides, so quote commas, `!` and non-ASCII text.
    """

    model_path: str = "???"  # a final/ folder, an export, or a training checkpoint
    prompt: Any = ""  # a string or a list of strings
    prompt_file: Optional[str] = None
    chat: bool = False
    device: str = "auto"  # auto: CUDA, then MPS, then the CPU (minillm.device.best_device)
    dtype: str = "auto"  # the weights' dtype: auto (fp32 on CPU, bf16 on CUDA), float32, bfloat16, float16
    compile: bool = False  # decode through a compiled fixed-shape step (faster after the first call)
    batch_size: int = 16  # prompts decoded together (left-padded); a longer list goes batch by batch

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch_size < 1:
            raise ValueError(f"invalid generation config: batch_size must be >= 1, got {self.batch_size}")


def run(command: GenerateCommand) -> None:
    from minillm.generate import generate, load_model

    prompt = command.prompt
    if command.prompt_file is not None:  # one prompt per line
        with open(command.prompt_file, encoding="utf-8") as f:
            prompt = [line.rstrip("\n") for line in f if line.strip()]
    try:
        model, tokenizer = load_model(command.model_path, command.device, command.dtype, command.compile)
    except Exception as e:  # a missing folder, an unreadable checkpoint: say which
        raise SystemExit(f"error: {e}") from None
    prompts = [str(p) for p in prompt] if isinstance(prompt, (list, tuple)) else [str(prompt)]
    inputs = [[{"role": "user", "content": p}] for p in prompts] if command.chat else prompts
    config, size = generation_config(command), command.batch_size
    for start in batch_starts(len(prompts), size, "generate"):  # each batch printed as soon as it is decoded
        texts = generate(model, tokenizer, inputs[start : start + size], config)
        for p, text in zip(prompts[start : start + size], texts):
            print(f"{p}\n→ {text}\n" if command.chat else f"{p}{text}\n", flush=True)


COMMAND = Command("generate", GenerateCommand, run)
cli, main = COMMAND.cli, COMMAND.main  # main(argv): the same command from Python


if __name__ == "__main__":
    cli()
