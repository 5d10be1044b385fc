"""minillm chat model_path=outputs/sft_tiny/final [temperature=0.7 top_p=0.9 ...]

Interactive chat with history: each turn is rendered with the same chat template as training, the reply is
streamed and stops at <|im_end|>. `/reset` clears the history, `/exit` (or end of input) quits. Keys other
than model_path, system and device are GenerationConfig fields (defaults in conf/chat.yaml). Bytes that are not
UTF-8 are replaced; a turn that fails (or Ctrl-C during a reply) leaves the conversation as it was. Reading
from a pipe works too: `printf 'Hello\\n/exit\\n' | minillm chat model_path=...` (the input is echoed).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional

from minillm.cli import Command
from minillm.config import GenerationConfig, generation_config


def readable(text: str) -> str:
    """`text` as valid UTF-8: bytes that were not (read back as lone surrogates) become U+FFFD."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # a surrogate no decoder wrote
        return text.encode("utf-8", "replace").decode("utf-8")


@dataclass
class ChatCommand(GenerationConfig):
    """`minillm chat` (conf/chat.yaml): a model, an optional system message, GenerationConfig fields."""

    model_path: str = "???"
    system: Optional[str] = None
    device: str = "auto"  # auto: CUDA, then MPS, then the CPU (minillm.device.best_device)
    dtype: str = "auto"  # the weights' dtype: auto (fp32 on CPU, bf16 on CUDA), float32, bfloat16, float16
    compile: bool = False  # decode through a compiled fixed-shape step


def run(command: ChatCommand, stdin=sys.stdin, out=sys.stdout) -> None:
    from minillm.generate import load_model, stream

    config, system, model_path = generation_config(command), command.system, command.model_path
    try:
        model, tokenizer = load_model(model_path, command.device, command.dtype, command.compile)
    except Exception as e:
        raise SystemExit(f"error: {e}") from None
    if hasattr(stdin, "reconfigure"):  # a byte that is not UTF-8 is replaced, never a crash that loses the chat
        stdin.reconfigure(errors="surrogateescape")
    echo = not stdin.isatty()
    history: list[dict] = [{"role": "system", "content": str(system)}] if system else []
    where = f"{model.lm_head.weight.device.type}, {str(model.lm_head.weight.dtype).removeprefix('torch.')}"
    out.write(f"chatting with {model_path} ({model.num_parameters():,} parameters, {where}); /reset, /exit\n")
    while True:
        out.write("you> ")
        out.flush()
        line = stdin.readline()
        if not line:
            out.write("\n")
            return
        text = readable(line.rstrip("\n"))
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
        out.write("bot> ")
        reply = ""
        try:
            for piece in stream(model, tokenizer, [*history, {"role": "user", "content": text}], config):
                reply += piece
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:  # Ctrl-C stops this reply; the conversation goes on without the turn
            out.write(" (stopped)\n")
            continue
        except Exception as e:  # the turn failed: say why, keep the conversation as it was
            out.write(f"\nerror: {type(e).__name__}: {e} (the conversation so far is kept)\n")
            continue
        out.write("\n")
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]


COMMAND = Command("chat", ChatCommand, run)
cli = COMMAND.cli


def main(argv: list[str], stdin=sys.stdin, out=sys.stdout) -> None:
    run(COMMAND.compose(argv), stdin, out)


if __name__ == "__main__":
    cli()
