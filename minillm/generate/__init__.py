"""Text generation with a trained MiniGPT: plain PyTorch, no Lightning.

    model, tokenizer = load_model("outputs/pretrain_tiny/final")
    generate(model, tokenizer, "Once upon a time", GenerationConfig(max_new_tokens=50, top_p=0.9, seed=0))
    for piece in stream(model, tokenizer, "你好", GenerationConfig(do_sample=False)): print(piece, end="")

Each step: repetition penalty -> temperature -> top-k -> top-p -> sample (or argmax when do_sample=False).
Batches are left-padded and decoded with the model's KV cache; `num_beams > 1` runs beam search. Sampling
draws from a private `torch.Generator` seeded from `seed`, so generating never touches the global RNG (and
cannot change a training run it is called from).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from minillm.config import GenerationConfig, generation_config

# The API below lives in decoding.py and is imported on first use (PEP 562), so that the commands over this
# package (`minillm generate --help`, a typo) answer without loading torch.
API = (
    "DTYPES",
    "Prompt",
    "TextGenerator",
    "apply_repetition_penalty",
    "decode_dtype",
    "generate",
    "generate_ids",
    "left_pad",
    "load_model",
    "process_logits",
    "sample",
    "stream",
    "stream_rows",
    "top_k_filter",
    "top_p_filter",
)
__all__ = ["GenerationConfig", "generation_config", *API]

if TYPE_CHECKING:
    from minillm.generate.decoding import (  # noqa: F401
        DTYPES,
        Prompt,
        TextGenerator,
        apply_repetition_penalty,
        decode_dtype,
        generate,
        generate_ids,
        left_pad,
        load_model,
        process_logits,
        sample,
        stream,
        stream_rows,
        top_k_filter,
        top_p_filter,
    )


def __getattr__(name: str):
    if name in API:
        from minillm.generate import decoding

        return getattr(decoding, name)
    raise AttributeError(f"module 'minillm.generate' has no attribute {name!r}")
