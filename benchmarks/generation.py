"""Decoding speed: minillm.generate (KV cache) against our own no-cache loop and HF transformers `generate` on the
same weights (our final/ folders are in the HF layout), greedy, a fixed number of new tokens, batch 1 and 8.

    python benchmarks/generation.py [--model-path outputs/pretrain_tiny/final] [--new-tokens 256]

Without --model-path a randomly initialised model=tiny is used (speed does not depend on the weights). EOS is
disabled on every side, so each row generates exactly --new-tokens tokens. HF runs only where transformers is
installed (the `ref` extra: make bench runs this file in .venv-ref).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from benchmarks.common import print_table, write
from minillm.generate import GenerationConfig, generate_ids, load_model


def ours(model, tokenizer, ids, mask, new_tokens: int) -> None:
    config = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, eos_token_ids=[])
    rows = generate_ids(model, tokenizer, ids, mask, config)
    assert all(len(r) == new_tokens for r in rows)


@torch.inference_mode()
def no_cache(model, tokenizer, ids, mask, new_tokens: int) -> None:
    """The whole sequence through the model for every new token (what the KV cache saves)."""
    for _ in range(new_tokens):
        logits = model(ids, attention_mask=mask).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)


def hf_generate(hf_model, ids, mask, new_tokens: int) -> None:
    with torch.inference_mode():
        out = hf_model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    assert out.shape[1] == ids.shape[1] + new_tokens


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def random_tiny(folder: Path) -> Path:
    from minillm.config import DataConfig, TokenizerConfig, model_preset
    from minillm.data.datamodule import corpus_tokenizer, find_files, resolve_data_dir
    from minillm.data.kinds import PRETRAIN
    from minillm.model import MiniGPT
    from minillm.pretrained import save_pretrained

    tokenizer = corpus_tokenizer(find_files(resolve_data_dir(DataConfig()), PRETRAIN), TokenizerConfig())
    torch.manual_seed(0)
    return save_pretrained(MiniGPT(model_preset("tiny", vocab_size=tokenizer.vocab_size)), tokenizer, folder)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out-dir", default="outputs/bench")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.model_path) if args.model_path else random_tiny(Path(tmp) / "tiny")
        model, tokenizer = load_model(str(path))
        new = min(args.new_tokens, model.config.block_size - args.prompt_tokens)
        try:
            from transformers import AutoModelForCausalLM

            hf = AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32).eval()
        except ImportError:
            hf = None
            print("transformers is not installed (the `ref` extra): skipping the HF column")
        rows = []
        for batch in args.batches:
            gen = torch.Generator().manual_seed(batch)
            ids = torch.randint(6, model.config.vocab_size, (batch, args.prompt_tokens), generator=gen)
            mask = torch.ones_like(ids)
            row = {"batch": batch, "new tokens": new}
            t_ours = timed(partial(ours, model, tokenizer, ids, mask, new), args.repeats)
            t_plain = timed(partial(no_cache, model, tokenizer, ids, mask, new), max(1, args.repeats - 2))
            row |= {
                "ours tok/s": batch * new / t_ours,
                "no-cache tok/s": batch * new / t_plain,
                "ours / no-cache": t_plain / t_ours,
                "ms/token (ours)": 1000 * t_ours / new,
            }
            if hf is not None:
                t_hf = timed(partial(hf_generate, hf, ids, mask, new), args.repeats)
                row |= {"HF tok/s": batch * new / t_hf, "ours / HF": t_hf / t_ours}
            rows.append(row)
            print_table([row], list(row))
    print()
    print_table(rows, list(rows[-1]))
    payload = {"model_path": str(args.model_path or "random model=tiny"), "rows": rows}
    write("generation", payload, Path(args.out_dir))
    return payload


if __name__ == "__main__":
    main()
