"""Serving throughput: requests/s and tokens/s of `minillm serve` with 1 client and with N concurrent clients
(the server batches concurrent requests on the KV cache), through the official `openai` client over HTTP.

    python benchmarks/serve.py [--model-path outputs/sft_tiny/final] [--clients 1 8] [--requests 16]

Each client sends its requests one after another (greedy chat completions of --max-tokens tokens, EOS left on:
the count is the tokens the server reports). Without --model-path a randomly initialised model=tiny is used.
Needs the serve extra and openai (make installs both in .venv).
"""

from __future__ import annotations

import argparse
import socket
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.common import print_table, write
from benchmarks.generation import random_tiny
from minillm.generate import load_model


def serve_in_thread(app):
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    return server, f"http://127.0.0.1:{port}/v1"


def load(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    tokens = [0] * clients

    def work(c: int) -> None:
        for r in range(requests):
            messages = [{"role": "user", "content": f"Question {c}.{r}: what is {c} + {r}?"}]
            reply = client.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=max_tokens)
            tokens[c] += reply.usage.completion_tokens

    threads = [threading.Thread(target=work, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    return {"requests/s": clients * requests / seconds, "tokens/s": sum(tokens) / seconds, "seconds": seconds}


def main(argv: list[str] | None = None) -> dict:
    from minillm.serve import create_app

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--requests", type=int, default=8, help="per client")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--out-dir", default="outputs/bench")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.model_path) if args.model_path else random_tiny(Path(tmp) / "tiny")
        model, tokenizer = load_model(str(path))
        app = create_app(model, tokenizer, "m", max_batch=args.max_batch, default_max_tokens=args.max_tokens)
        server, url = serve_in_thread(app)
        load(url, 1, 1, 4)  # warm-up
        rows = []
        for clients in args.clients:
            batches = app.state.batcher.batches
            seen = len(batches)
            result = load(url, clients, args.requests, args.max_tokens)
            decoded = batches[seen:]
            rows.append({"clients": clients, **result, "mean batch": sum(decoded) / max(len(decoded), 1)})
        server.should_exit = True
    base = rows[0]
    for r in rows:
        r["vs 1 client"] = r["tokens/s"] / base["tokens/s"]
    print_table(rows, ["clients", "requests/s", "tokens/s", "mean batch", "vs 1 client", "seconds"])
    payload = {"model_path": str(args.model_path or "random model=tiny"), "max_tokens": args.max_tokens, "rows": rows}
    write("serve", payload, Path(args.out_dir))
    return payload


if __name__ == "__main__":
    main()
