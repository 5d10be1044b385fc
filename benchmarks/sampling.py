"""Sampled decoding at the shapes the stages decode with (RLHF rollouts: 16 rows, temperature 0.7, 48 new tokens;
chat: 1 row; evaluation: 64 rows), side by side in one process: our sampler (one uniform draw per row, inverting
the row's CDF) against `torch.multinomial` (what it replaced: B × V exponential draws per step), eagerly and
through the compiled decode step, in fp32 and under bf16 autocast (what RLHF decodes in when it trains
bf16-mixed). EOS is disabled, so every row decodes exactly --new-tokens tokens.

    python benchmarks/sampling.py [--model-path outputs/dpo_tiny/final] [--batches 1 16 64]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import tempfile
from pathlib import Path

import torch

from benchmarks.common import print_table, write
from benchmarks.generation import random_tiny, timed
from minillm.generate import GenerationConfig, decoding, generate_ids, load_model


def multinomial(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The sampler before: torch.multinomial (B × V exponentials a step)."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default=None, help="default: a randomly initialised model=tiny")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64])
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--prompt-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="compiled rows too")
    parser.add_argument("--out-dir", default="outputs/bench")
    args = parser.parse_args(argv)
    if args.model_path is None:
        args.model_path = str(random_tiny(Path(tempfile.mkdtemp()) / "tiny"))
    model, tokenizer = load_model(args.model_path)
    compiled = copy.deepcopy(model)
    if args.compile:
        compiled.compile_decoding(dynamic=False)
    config = GenerationConfig(temperature=0.7, max_new_tokens=args.new_tokens, eos_token_ids=[], seed=0)
    ours = decoding.sample
    rows = []
    for precision in ("fp32", "bf16 autocast"):
        autocast = (
            (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision != "fp32" else contextlib.nullcontext
        )
        for batch in args.batches:
            ids = torch.randint(10, model.config.vocab_size, (batch, args.prompt_tokens))
            mask = torch.ones_like(ids)
            engines = [("eager, multinomial", model, multinomial), ("eager, ours", model, ours)]
            if args.compile:
                engines.append(("compiled, ours", compiled, ours))
            base = None
            for name, net, sampler in engines:
                decoding.sample = sampler

                def run(net=net, autocast=autocast, ids=ids, mask=mask):
                    with autocast():
                        generate_ids(net, tokenizer, ids, mask, config)

                try:
                    seconds = timed(run, args.repeats)
                finally:
                    decoding.sample = ours
                rate = batch * args.new_tokens / seconds
                base = base or rate
                rows.append(
                    {
                        "precision": precision,
                        "batch": batch,
                        "engine": name,
                        "tokens/s": rate,
                        "vs multinomial": rate / base,
                    }
                )
    print_table(rows, ["precision", "batch", "engine", "tokens/s", "vs multinomial"])
    payload = {"model_path": args.model_path, "new_tokens": args.new_tokens, "rows": rows}
    write("sampling", payload, Path(args.out_dir))
    return payload


if __name__ == "__main__":
    main()
