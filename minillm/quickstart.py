"""`make demo` until the training pipeline lands: built-in corpus -> tokenizer -> the generate API.

    python -m minillm.quickstart [model=tiny] [seed=0]

Builds the built-in corpus, trains (or reuses) the tokenizer, initialises a fresh model from the preset, saves
it in the exported-folder format, loads it back with `load_model` and runs every generation mode. The model is
untrained, so the text is noise: this shows the plumbing, not quality.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from minillm.config import compose
from minillm.data.builtin import build_builtin
from minillm.generate import GenerationConfig, TextGenerator, generate, load_model, stream
from minillm.model import MiniGPT
from minillm.pretrained import save_pretrained
from minillm.tokenizer import get_tokenizer


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = OmegaConf.to_object(compose(argv))
    t0 = time.perf_counter()
    data_dir = build_builtin()
    tokenizer = get_tokenizer(sorted((data_dir / "pretrain").glob("*.jsonl")), cfg.tokenizer)
    print(f"data + tokenizer: {time.perf_counter() - t0:.1f}s -> {tokenizer}")

    torch.manual_seed(cfg.seed)
    cfg.model.vocab_size = tokenizer.vocab_size
    out = Path("outputs") / "quickstart" / "init"
    save_pretrained(MiniGPT(cfg.model), tokenizer, out)
    model, tokenizer = load_model(str(out))
    print(f"model: {model.num_parameters():,} parameters, saved to and loaded from {out}/ (untrained)\n")

    prompts = ["To be, or not to be", "In the beginning", "你好，MiniGPT！"]
    modes = {
        "greedy": GenerationConfig(max_new_tokens=24, do_sample=False),
        "sample t=0.8 top_k=50 top_p=0.9 rep=1.1": GenerationConfig(
            max_new_tokens=24, temperature=0.8, top_k=50, top_p=0.9, repetition_penalty=1.1, seed=cfg.seed
        ),
        "beam search, 3 beams": GenerationConfig(max_new_tokens=24, do_sample=False, num_beams=3),
    }
    for name, gen in modes.items():
        t = time.perf_counter()
        texts = generate(model, tokenizer, prompts, gen)  # one batch, left-padded, KV cache
        print(f"[{name}] ({time.perf_counter() - t:.2f}s for the batch)")
        for p, text in zip(prompts, texts):
            print(f"  {p!r} -> {text!r}")
    print("[stream]", end=" ", flush=True)
    for piece in stream(model, tokenizer, prompts[0], GenerationConfig(max_new_tokens=16, seed=cfg.seed)):
        print(piece, end="", flush=True)
    ids = torch.tensor([tokenizer.encode(prompts[1])])
    new = TextGenerator(model, tokenizer).sample_generate(ids, config=GenerationConfig(max_new_tokens=8, seed=0))
    print(f"\n[TextGenerator.sample_generate] ids {ids.tolist()[0]} -> {new.tolist()[0]}")


if __name__ == "__main__":
    main(sys.argv[1:])
