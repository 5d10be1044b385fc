"""minillm chat model_path=outputs/sft_tiny/final [temperature=0.7 top_p=0.9 ...]

Interactive chat with history: each turn is rendered with the same chat template as training, the reply is
streamed and stops at <|im_end|>. `/reset` clears the history, `/exit` (or end of input) quits. Keys other
than model_path, system and device are GenerationConfig fields (defaults in minillm/conf/chat.yaml). Reading
from a pipe works too: `printf 'Hello\\n/exit\\n' | minillm chat model_path=...` (the input is echoed).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional

from minillm.cli import Command
from minillm.generate import GenerationConfig, generation_config, load_model, stream


@dataclass
class ChatCommand(GenerationConfig):
    """`minillm chat` (minillm/conf/chat.yaml): a model, an optional system message, GenerationConfig fields."""

    model_path: str = "???"
    system: Optional[str] = None
    device: str = "cpu"
    dtype: str = "auto"  # the weights' dtype: auto (fp32 on CPU, bf16 on CUDA), float32, bfloat16, float16
    compile: bool = False  # decode through a compiled fixed-shape step


def run(command: ChatCommand, stdin=sys.stdin, out=sys.stdout) -> None:
    config, system, model_path = generation_config(command), command.system, command.model_path
    try:
        model, tokenizer = load_model(model_path, command.device, command.dtype, command.compile)
    except Exception as e:
        raise SystemExit(f"error: {e}") from None
    echo = not stdin.isatty()
    history: list[dict] = [{"role": "system", "content": str(system)}] if system else []
    out.write(f"chatting with {model_path} ({model.num_parameters():,} parameters); /reset, /exit\n")
    while True:
        out.write("you> ")
        out.flush()
        line = stdin.readline()
        if not line:
            out.write("\n")
            return
        text = line.rstrip("\n")
        if echo:
            out.write(text + "\n")
        if text.strip() == "/exit":
            return
        if text.strip() == "/reset":
            history = history[:1] if system else []
            out.write("(history cleared)\n")
            continue
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        out.write("bot> ")
        reply = ""
        for piece in stream(model, tokenizer, history, config):
            reply += piece
            out.write(piece)
            out.flush()
        out.write("\n")
        history.append({"role": "assistant", "content": reply})


COMMAND = Command("chat", ChatCommand, run)
cli = COMMAND.cli


def main(argv: list[str], stdin=sys.stdin, out=sys.stdout) -> None:
    run(COMMAND.compose(argv), stdin, out)


if __name__ == "__main__":
    cli()
