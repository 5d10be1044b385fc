"""python -m minillm.chat model_path=outputs/sft_tiny/final [temperature=0.7 top_p=0.9 ...]

Interactive chat with history: each turn is rendered with the same chat template as training, the reply is
streamed and stops at <|im_end|>. `/reset` clears the history, `/exit` (or end of input) quits. Keys other
than model_path, system and device are GenerationConfig fields. Reading from a pipe works too:
`printf 'Hello\\n/exit\\n' | python -m minillm.chat model_path=...` (the input is echoed).
"""

from __future__ import annotations

import sys

from minillm.generate import config_from, load_model, parse_cli, stream

DEFAULTS = {"max_new_tokens": 128, "temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.1}


def main(argv: list[str], stdin=sys.stdin, out=sys.stdout) -> None:
    values = parse_cli(argv)
    if "model_path" not in values:
        raise SystemExit('usage: python -m minillm.chat model_path=DIR [system="..."] [GenerationConfig fields]')
    model_path, device = str(values.pop("model_path")), str(values.pop("device", "cpu"))
    system = values.pop("system", None)
    try:
        config = config_from(values, **DEFAULTS)
        model, tokenizer = load_model(model_path, device)
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


if __name__ == "__main__":
    main(sys.argv[1:])
