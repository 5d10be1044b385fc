"""Decoding speed: minillm.generate (KV cache, fixed-shape decode step) in fp32 and bf16 weights, eager and
compiled, and with int8 weight-only linears, against our own no-cache loop and HF transformers `generate` on the
same weights (our final/ folders are in the HF layout); greedy, a fixed number of new tokens, batch 1 and 8.

    python benchmarks/generation.py [--model-path outputs/pretrain_tiny/final] [--new-tokens 240]

Every row states its distance to the memory limit: a decoding step reads every matmul weight once, so tokens/s
cannot exceed batch × (measured memory read bandwidth) ÷ (bytes of matmul weights). "same tokens" compares each
row's greedy tokens with those of the no-cache loop in fp32 (the full forward for every token). Without
--model-path a randomly initialised model=tiny is used (speed does not depend on the weights). EOS is disabled,
so each row generates exactly --new-tokens tokens. HF runs only where transformers is installed (the `ref`
extra: make bench runs this file in .venv-ref). llama.cpp (llama-cpp-python, also in the `ref` extra) decodes
the same weights exported to GGUF f32 (`minillm export format=gguf`) at batch 1 with as many threads as torch
uses: the best CPU inference engine, the anchor the "vs llama.cpp" column measures every batch-1 row against.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import matmul_params, measure_bandwidth, print_table, write
from minillm.generate import GenerationConfig, generate_ids, load_model


def ours(model, tokenizer, ids, mask, new_tokens: int) -> list[list[int]]:
    config = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, eos_token_ids=[])
    rows = generate_ids(model, tokenizer, ids, mask, config)
    assert all(len(r) == new_tokens for r in rows)
    return rows


class Int8Linear(nn.Module):
    """Weight-only int8 (per output channel scales) through torch's own CPU kernel `_weight_int8pack_mm`: a
    quarter of fp32's bytes per token, activations stay in float."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(1).clamp(min=1e-8) / 127
        self.register_buffer("weight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), self.weight, self.scale)
        return out.view(*x.shape[:-1], -1)


def int8_weights(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear(child))
    return model


@torch.inference_mode()
def no_cache(model, tokenizer, ids, mask, new_tokens: int) -> list[list[int]]:
    """The whole sequence through the model for every new token (what the KV cache saves); the new tokens."""
    prompt = ids.shape[1]
    for _ in range(new_tokens):
        logits = model(ids, attention_mask=mask).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
    return ids[:, prompt:].tolist()


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


def llama_cpp_generate(llm, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy tokens from llama.cpp (EOS not special here: exactly `new_tokens`)."""
    out = []
    for token in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(token)
        if len(out) == new_tokens:
            break
    return out


def llama_cpp_engine(model, tokenizer, folder: Path):
    """llama.cpp on the GGUF f32 export of `model`, or None without llama-cpp-python."""
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is not installed (the `ref` extra): skipping the llama.cpp row")
        return None
    from minillm.gguf_writer import write_gguf

    path = write_gguf(model, tokenizer, folder / "model-f32.gguf", "f32")
    threads = torch.get_num_threads()
    return llama_cpp.Llama(str(path), n_ctx=model.config.block_size, n_threads=threads, verbose=False)


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


def variants(model, compile: bool) -> dict:
    """name -> (model, bytes of matmul weights read per step)."""
    n = matmul_params(model.config)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    out = {"minillm fp32": (model, 4 * n), "minillm bf16": (bf16, 2 * n)}
    if compile:
        for name in list(out):
            compiled = copy.deepcopy(out[name][0])
            compiled.compile_decoding(dynamic=False)
            out[f"{name} compiled"] = (compiled, out[name][1])
    if hasattr(torch, "_weight_int8pack_mm") and next(model.parameters()).device.type == "cpu":
        out["minillm int8 weight-only"] = (int8_weights(model), n)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--new-tokens", type=int, default=240)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="compiled rows too")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out-dir", default="outputs/bench")
    args = parser.parse_args(argv)
    bandwidth = measure_bandwidth(device=args.device)
    print(f"memory read bandwidth: {bandwidth / 1e9:.1f} GB/s")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.model_path) if args.model_path else random_tiny(Path(tmp) / "tiny")
        model, tokenizer = load_model(str(path), args.device, dtype="float32")
        new = min(args.new_tokens, model.config.block_size - args.prompt_tokens)
        try:
            from transformers import AutoModelForCausalLM

            hf = AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32).to(args.device).eval()
        except ImportError:
            hf = None
            print("transformers is not installed (the `ref` extra): skipping the HF row")
        engines = variants(model, args.compile)
        llm = llama_cpp_engine(model, tokenizer, Path(tmp))
        rows = []
        for batch in args.batches:
            gen = torch.Generator().manual_seed(batch)
            ids = torch.randint(6, model.config.vocab_size, (batch, args.prompt_tokens), generator=gen).to(args.device)
            mask = torch.ones_like(ids)
            reference = no_cache(model, tokenizer, ids, mask, new)  # greedy without a cache, fp32
            times = {}
            for name, (engine, weight_bytes) in engines.items():
                times[name] = timed(partial(ours, engine, tokenizer, ids, mask, new), args.repeats)
                same = ours(engine, tokenizer, ids, mask, new) == reference
                rows.append(row(batch, name, new, times[name], weight_bytes, bandwidth, same))
            rows.append(
                row(batch, "no-cache loop", new, timed(partial(no_cache, model, tokenizer, ids, mask, new), 1), 0, 0)
            )
            if hf is not None:
                times["HF"] = timed(partial(hf_generate, hf, ids, mask, new), args.repeats)
                rows.append(
                    row(batch, "HF generate fp32", new, times["HF"], 4 * matmul_params(model.config), bandwidth)
                )
            if llm is not None and batch == 1:
                prompt = ids[0].tolist()
                times["llama.cpp"] = timed(partial(llama_cpp_generate, llm, prompt, new), args.repeats)
                same = llama_cpp_generate(llm, prompt, new) == reference[0]
                weight_bytes = 4 * matmul_params(model.config)
                rows.append(row(batch, "llama.cpp fp32 (GGUF)", new, times["llama.cpp"], weight_bytes, bandwidth, same))
            for r in rows:
                if r["batch"] == batch and "HF" in times:
                    r["vs HF"] = times["HF"] / (r["ms/step"] * new / 1000)
                if r["batch"] == batch and "llama.cpp" in times:
                    r["vs llama.cpp"] = times["llama.cpp"] / (r["ms/step"] * new / 1000)
    columns = ["batch", "engine", "tok/s", "ms/step", "vs HF", "vs llama.cpp", "limit tok/s", "of limit", "same tokens"]
    print()
    print_table(rows, columns)
    payload = {"model_path": str(args.model_path or "random model=tiny"), "bandwidth": bandwidth, "rows": rows}
    write("generation", payload, Path(args.out_dir))
    return payload


def row(batch, engine, new, seconds, weight_bytes, bandwidth, same=None) -> dict:
    limit = batch * bandwidth / weight_bytes if weight_bytes else None
    rate = batch * new / seconds
    return {
        "batch": batch,
        "engine": engine,
        "tok/s": rate,
        "ms/step": 1000 * seconds / new,
        "limit tok/s": limit,
        "of limit": rate / limit if limit else None,
        "same tokens": same,
    }


if __name__ == "__main__":
    main()
