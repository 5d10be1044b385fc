"""The decoding behind `minillm.generate` (its API, re-exported there): logit processing, the prefill and the
fixed-shape decode step, sampling, beam search, streaming, loading a model."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Optional, Union

import torch

from minillm.config import GenerationConfig
from minillm.model import MiniGPT
from minillm.pretrained import load_pretrained
from minillm.tokenizer import Tokenizer, apply_chat_template

log = logging.getLogger(__name__)


# ---- logit processing: pure functions on (B, V) float logits ----


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Tokens already seen: positive logits are divided by the penalty, negative ones multiplied."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row, set the rest to -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (nucleus sampling)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
    drop_sorted = mass_before >= p  # the top token has mass_before 0 and is always kept
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def process_logits(logits: torch.Tensor, seen: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
    logits = apply_repetition_penalty(logits, seen, config.repetition_penalty)
    if not config.do_sample:
        return logits
    logits = logits / config.temperature
    return top_p_filter(top_k_filter(logits, config.top_k), config.top_p)


def sample(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per row of (B, V) probabilities, by inverting each row's cumulative distribution at one uniform
    draw (B random numbers; `torch.multinomial` draws B × V exponentials, a quarter of a decoding step at B = 16,
    V = 8192 on a CPU). Tokens of probability 0 (filtered by top-k / top-p) are never drawn."""
    wide = torch.float32 if probs.device.type == "mps" else torch.float64  # MPS has no float64
    cdf = probs.to(wide).cumsum(-1)  # fp64: the tail of an 8192-way sum keeps its resolution
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=wide) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=probs.shape[-1] - 1)


# ---- decoding ----


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _eos_ids(tokenizer: Tokenizer, config: GenerationConfig) -> list[int]:
    if config.eos_token_ids is not None:
        return list(config.eos_token_ids)
    return [tokenizer.eos_id, tokenizer.im_end_id]


def _prepare(model: MiniGPT, input_ids: torch.Tensor, attention_mask: torch.Tensor, config: GenerationConfig):
    """Fit prompt + new tokens into block_size: cap the new tokens, drop the oldest prompt tokens if needed."""
    max_new_tokens = config.new_tokens(input_ids.shape[1])
    block = model.config.block_size
    if input_ids.shape[1] >= block:
        log.warning(
            "prompt of %d tokens does not fit block_size %d: keeping the last %d", input_ids.shape[1], block, block - 1
        )
        input_ids, attention_mask = input_ids[:, -(block - 1) :], attention_mask[:, -(block - 1) :]
    return input_ids, attention_mask, min(max_new_tokens, block - input_ids.shape[1])


def _seen_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    counts = torch.zeros(input_ids.shape[0], vocab_size, device=input_ids.device)
    return counts.scatter_add_(1, input_ids, attention_mask.float()) > 0  # (B, V)


class _Decoder:
    """The prompt through the model into a KV cache (prefill), then one fixed-shape step per new token
    (`MiniGPT.step`, or its compiled form after `compile_decoding`). Holds the cache, the mask of cache slots
    each row attends to (left padding off) and each row's next RoPE position. A compiled step runs as many rows as
    `MiniGPT.decode_rows` says: a batch a little smaller than one it has run gets filler rows (one token each,
    never read), so a last partial batch reuses that graph instead of compiling another."""

    def __init__(self, model: MiniGPT, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new: int) -> None:
        B, P = input_ids.shape
        compiled = model.decoding_compiled
        max_len = model.config.block_size if compiled else P + max_new  # compiled: one shape for every call
        self.rows, width = B, model.decode_rows(B)
        if width > B:
            filler = torch.zeros(width - B, P, dtype=attention_mask.dtype, device=attention_mask.device)
            filler[:, -1] = 1
            input_ids = torch.cat([input_ids, torch.zeros_like(filler, dtype=input_ids.dtype)])
            attention_mask = torch.cat([attention_mask, filler])
        positions = (attention_mask.long().cumsum(1) - 1).clamp(min=0)  # (width, P), left padding -> start at 0
        padded = not bool(attention_mask.all())
        self.model, self.cache = model, model.new_cache(width, max_len)
        out = model(
            input_ids,
            position_ids=positions,
            attention_mask=attention_mask if padded else None,
            cache=self.cache,
            last_only=True,
        )
        self.logits = out.logits[:B, -1]  # (B, V) scores of the first new token
        self.key_mask = torch.zeros(width, max_len, dtype=torch.bool, device=input_ids.device)
        self.key_mask[:, :P] = attention_mask.bool()
        self.positions = positions[:, -1:] + 1  # (width, 1)

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Feed one token per row, (B,); returns the next (B, V) logits."""
        slot = self.cache.length
        self.key_mask[:, slot] = True
        slot_tensor = torch.tensor([slot], device=token.device)
        if len(self.positions) > self.rows:
            token = torch.cat([token, token.new_zeros(len(self.positions) - self.rows)])
        logits = self.model.decode_step(token[:, None], self.positions, self.cache, slot_tensor, self.key_mask)
        self.logits = logits[: self.rows]
        self.cache.length += 1
        self.positions = self.positions + 1
        return self.logits

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` (beam search); filler rows stay where they are."""
        filler = torch.arange(self.rows, len(self.positions), device=index.device)
        index = torch.cat([index, filler])
        self.cache.reorder(index)
        self.key_mask, self.positions = self.key_mask[index], self.positions[index]


def _sample_steps(
    model: MiniGPT,
    tokenizer: Tokenizer,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    config: GenerationConfig,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,), until all rows stopped; rows already stopped get -1."""
    input_ids, attention_mask, max_new = _prepare(model, input_ids, attention_mask, config)
    if max_new <= 0:
        return
    device = input_ids.device
    generator = torch.Generator(device=device)
    generator.manual_seed(config.seed if config.seed is not None else int.from_bytes(os.urandom(7), "little"))
    eos = torch.tensor(_eos_ids(tokenizer, config), device=device)
    seen = _seen_tokens(input_ids, attention_mask, model.config.vocab_size)
    decoder = _Decoder(model, input_ids, attention_mask, max_new)
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=device)
    new_tokens: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    for step in range(max_new):
        scores = process_logits(decoder.logits.float(), seen, config)  # (B, V)
        if config.do_sample:
            token = sample(scores.softmax(-1), generator)
        else:
            token = scores.argmax(-1)
        yield token.masked_fill(finished, -1)
        token = token.masked_fill(finished, tokenizer.pad_id)
        seen[torch.arange(len(token), device=device), token] = True
        finished |= torch.isin(token, eos)
        if config.stop:
            for row, t in enumerate(token.tolist()):
                new_tokens[row].append(t)
                if not finished[row] and any(s in tokenizer.decode(new_tokens[row]) for s in config.stop):
                    finished[row] = True
        if bool(finished.all()) or step == max_new - 1:
            return
        decoder.step(token)


def _beam_search(
    model: MiniGPT,
    tokenizer: Tokenizer,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    config: GenerationConfig,
) -> list[list[int]]:
    """Best continuation per row. A row is done once num_beams hypotheses ended in EOS (early stopping)."""
    input_ids, attention_mask, max_new = _prepare(model, input_ids, attention_mask, config)
    B, K, V = input_ids.shape[0], config.num_beams, model.config.vocab_size
    if max_new <= 0:
        return [[] for _ in range(B)]
    eos = set(_eos_ids(tokenizer, config))
    input_ids, attention_mask = input_ids.repeat_interleave(K, 0), attention_mask.repeat_interleave(K, 0)
    seen = _seen_tokens(input_ids, attention_mask, V)
    decoder = _Decoder(model, input_ids, attention_mask, max_new)
    beam_scores = torch.full((B, K), float("-inf"), device=input_ids.device)
    beam_scores[:, 0] = 0.0  # all beams start identical: expand only the first
    beams: list[list[int]] = [[] for _ in range(B * K)]
    hypotheses: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    done = [False] * B

    def finish(b: int, score: float, tokens: list[int]) -> None:
        hypotheses[b].append((score / max(len(tokens), 1) ** config.length_penalty, tokens))

    for step in range(max_new):
        logp = apply_repetition_penalty(decoder.logits.float(), seen, config.repetition_penalty).log_softmax(-1)
        candidates = (beam_scores.view(-1, 1) + logp).view(B, K * V)
        top_scores, top_index = candidates.topk(2 * K, dim=1)  # (B, 2K)
        next_scores = torch.full((B, K), float("-inf"), device=logp.device)
        next_beam = torch.arange(K, device=logp.device).repeat(B, 1)
        next_token = torch.full((B, K), tokenizer.pad_id, dtype=torch.long, device=logp.device)
        for b in range(B):
            if done[b]:
                continue
            kept = 0
            for rank, (score, index) in enumerate(zip(top_scores[b].tolist(), top_index[b].tolist())):
                beam, token = divmod(index, V)
                if token in eos:
                    if rank < K:
                        finish(b, score, beams[b * K + beam] + [token])
                    continue
                next_scores[b, kept], next_beam[b, kept], next_token[b, kept] = score, beam, token
                kept += 1
                if kept == K:
                    break
            done[b] = len(hypotheses[b]) >= K
        source = (torch.arange(B, device=logp.device)[:, None] * K + next_beam).view(-1)  # (B*K,)
        beams = [beams[s] + [t] for s, t in zip(source.tolist(), next_token.view(-1).tolist())]
        beam_scores = next_scores
        if all(done) or step == max_new - 1:
            break
        decoder.reorder(source)
        seen = seen[source]
        seen[torch.arange(B * K, device=logp.device), next_token.view(-1)] = True
        decoder.step(next_token.view(-1))
    for b in range(B):
        if not done[b]:  # ran out of tokens: alive beams compete with finished ones
            for k in range(K):
                if beam_scores[b, k] > float("-inf"):
                    finish(b, float(beam_scores[b, k]), beams[b * K + k])
    return [max(h, key=lambda x: x[0])[1] if h else [] for h in hypotheses]


def _generate_ids(
    model: MiniGPT,
    tokenizer: Tokenizer,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    config: GenerationConfig,
) -> list[list[int]]:
    """New token ids per row, ending with the EOS token when one was produced (no padding)."""
    if config.num_beams > 1:
        return _beam_search(model, tokenizer, input_ids, attention_mask, config)
    rows: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    for token in _sample_steps(model, tokenizer, input_ids, attention_mask, config):
        for row, t in enumerate(token.tolist()):
            if t >= 0:
                rows[row].append(t)
    return rows


def generate_ids(
    model: MiniGPT,
    tokenizer: Tokenizer,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    config: GenerationConfig,
) -> list[list[int]]:
    """New token ids of each row of left-padded (B, P) prompt ids (the EOS token included when produced).
    The model is put in eval mode and back; nothing is recorded for autograd."""
    with _eval_mode(model):
        return _generate_ids(model, tokenizer, input_ids, attention_mask, config)


Prompt = Union[str, list[dict]]  # plain text, or a conversation [{"role", "content"}, ...]


def _is_conversation(prompt: object) -> bool:
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict)


def _as_batch(prompts: Prompt | Sequence[Prompt]) -> tuple[list[Prompt], bool]:
    """(list of prompts, whether a single prompt was given)."""
    if isinstance(prompts, str) or _is_conversation(prompts):
        return [prompts], True
    return list(prompts), False


def _encode_prompts(tokenizer: Tokenizer, prompts: Sequence[Prompt], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (B, P) ids and mask. A conversation is rendered with the chat template, ending with an open
    assistant turn. An empty prompt starts from </s>, the document separator of pretraining."""
    encoded = [
        apply_chat_template(tokenizer, p, add_generation_prompt=True).ids
        if _is_conversation(p)
        else tokenizer.encode(p) or [tokenizer.eos_id]
        for p in prompts
    ]
    return left_pad(encoded, tokenizer.pad_id, device)


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        if s:
            ids[i, width - len(s) :] = torch.tensor(list(s), dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


def _to_text(tokenizer: Tokenizer, ids: list[int], config: GenerationConfig) -> str:
    return _cut(tokenizer.decode(ids), config.stop)  # control tokens (</s>, <|im_end|>) decode to nothing


def _cut(text: str, stops: Sequence[str]) -> str:
    """`text` up to the first stop string in it."""
    cuts = [text.find(s) for s in stops if s in text]
    return text[: min(cuts)] if cuts else text


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that begins a stop string: text that may still become one."""
    longest = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def generate(
    model: MiniGPT, tokenizer: Tokenizer, prompts: Prompt | Sequence[Prompt], config: Optional[GenerationConfig] = None
) -> str | list[str]:
    """Continue one prompt (returns a string) or a batch (returns a list); only the new text. A prompt is text
    or a conversation (a list of {"role", "content"} messages), which gets the assistant's reply."""
    config = config or GenerationConfig()
    batch, single = _as_batch(prompts)
    with _eval_mode(model):
        input_ids, attention_mask = _encode_prompts(tokenizer, batch, _device(model))
        rows = _generate_ids(model, tokenizer, input_ids, attention_mask, config)
    texts = [_to_text(tokenizer, row, config) for row in rows]
    return texts[0] if single else texts


def stream(
    model: MiniGPT, tokenizer: Tokenizer, prompt: Prompt, config: Optional[GenerationConfig] = None
) -> Iterator[str]:
    """Yield the continuation of one prompt (text or conversation) piece by piece as it is generated.

    A character spelled by several byte-fallback tokens (an emoji, a rare Chinese character) is held back
    until all its bytes have arrived, so every yielded piece is whole text; so is a tail that could still grow
    into a stop string (`config.stop`), so the pieces join to exactly what `generate` returns.
    """
    for _, piece, _, _ in stream_rows(model, tokenizer, [prompt], config):
        if piece:
            yield piece


def stream_rows(
    model: MiniGPT, tokenizer: Tokenizer, prompts: Sequence[Prompt], config: Optional[GenerationConfig] = None
) -> Iterator[tuple[int, str, Optional[str], int]]:
    """Batched streaming (what `minillm serve` decodes concurrent requests with): (row, piece, finish, tokens)
    events as the batch is decoded together. `finish` is None while a row goes on; its last event says why it
    ended: "stop" (EOS or a stop string) or "length" (max_new_tokens or the context); `tokens` counts the row's new
    tokens so far. Pieces are whole text (as in `stream`), and a row's pieces join to what `generate` returns."""
    config = config or GenerationConfig()
    if config.num_beams > 1:
        raise ValueError("stream() samples or decodes greedily; beam search needs the whole output: use generate()")
    eos = set(_eos_ids(tokenizer, config))
    rows = [_RowText(tokenizer, config) for _ in prompts]
    with _eval_mode(model):
        input_ids, attention_mask = _encode_prompts(tokenizer, list(prompts), _device(model))
        for tokens in _sample_steps(model, tokenizer, input_ids, attention_mask, config):
            for i, t in enumerate(tokens.tolist()):
                row = rows[i]
                if row.finished:
                    continue
                if t in eos or t < 0:
                    row.finished = True
                    yield i, row.rest(), "stop", len(row.ids)
                    continue
                piece = row.add(t)
                if row.stopped():
                    row.finished = True
                    yield i, piece + row.rest(), "stop", len(row.ids)
                elif piece:
                    yield i, piece, None, len(row.ids)
    for i, row in enumerate(rows):
        if not row.finished:
            yield i, row.rest(), "length", len(row.ids)


class _RowText:
    """The text of one generated row, released as whole pieces: an unfinished UTF-8 character (U+FFFD while its
    byte-fallback tokens arrive) and a tail that could still become a stop string are held back."""

    def __init__(self, tokenizer: Tokenizer, config: GenerationConfig) -> None:
        self.tokenizer, self.config = tokenizer, config
        self.ids: list[int] = []
        self.text = ""  # the decoded ids, uncut
        self.emitted = ""
        self.finished = False

    def add(self, token: int) -> str:
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids)  # decoded once per token: `stopped` reads it too
        complete = _cut(self.text, self.config.stop).rstrip("\ufffd")
        complete = complete[: len(complete) - _stop_prefix_len(complete, self.config.stop)]
        if len(complete) <= len(self.emitted):
            return ""
        piece, self.emitted = complete[len(self.emitted) :], complete
        return piece

    def stopped(self) -> bool:
        return any(s in self.text for s in self.config.stop)

    def rest(self) -> str:
        """What is left to emit of the final text (cut at a stop string)."""
        final = _to_text(self.tokenizer, self.ids, self.config)
        rest = final[len(self.emitted) :] if len(final) > len(self.emitted) else ""
        self.emitted = final
        return rest


class TextGenerator:
    """A model + tokenizer on a device, with the generation calls of the original project."""

    def __init__(self, model: MiniGPT, tokenizer: Tokenizer, device: str | torch.device | None = None) -> None:
        self.device = torch.device(device) if device is not None else _device(model)
        self.model = model.to(self.device)
        self.tokenizer = tokenizer

    def sample_generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        config: Optional[GenerationConfig] = None,
    ) -> torch.Tensor:
        """(B, P) prompt ids (left-padded when attention_mask is given) -> (B, P + N) prompt + new ids.

        Rows that stopped early are padded with the pad id after their EOS token.
        """
        config = config or GenerationConfig()
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        input_ids = input_ids.to(self.device)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(self.device)
        rows = generate_ids(self.model, self.tokenizer, input_ids, mask, config)
        width = max((len(r) for r in rows), default=0)
        new = torch.full((input_ids.shape[0], width), self.tokenizer.pad_id, dtype=torch.long, device=self.device)
        for i, r in enumerate(rows):
            new[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return torch.cat([input_ids, new], dim=1)

    def generate(
        self, prompts: Prompt | Sequence[Prompt], config: Optional[GenerationConfig] = None
    ) -> str | list[str]:
        return generate(self.model, self.tokenizer, prompts, config)

    def stream(self, prompt: Prompt, config: Optional[GenerationConfig] = None) -> Iterator[str]:
        return stream(self.model, self.tokenizer, prompt, config)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def decode_dtype(device: str | torch.device) -> torch.dtype:
    """The weights' dtype `dtype="auto"` picks for generation, by measurement (benchmarks/generation.py, README
    Performance): bf16 on CUDA; fp32 on CPU, where bf16 weights decode faster only at batch 1 and only with
    native bf16 matmuls, are slower at batch 8 on CPUs without AVX-512 bf16, and change greedy tokens."""
    return torch.bfloat16 if torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


def load_model(
    path: str, device: str | torch.device = "cpu", dtype: str | torch.dtype = "auto", compile: bool = False
) -> tuple[MiniGPT, Tokenizer]:
    """(model in eval mode on `device`, tokenizer) from an exported folder or a training checkpoint. `device`
    "auto": CUDA, then MPS, then the CPU.

    `dtype`: the weights' dtype for generation, "auto" (`decode_dtype(device)`), "float32", "bfloat16" or
    "float16". `compile=True` decodes through a torch.compile'd fixed-shape step (`MiniGPT.compile_decoding`:
    the first call of each batch size compiles, later ones are faster)."""
    if device == "auto":
        from minillm.accelerator import best_device

        device = best_device()
    if isinstance(dtype, str):
        if dtype != "auto" and dtype not in DTYPES:
            raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {dtype!r}")
        dtype = decode_dtype(device) if dtype == "auto" else DTYPES[dtype]
    model, tokenizer = load_pretrained(path, map_location="cpu")
    model = model.to(device=device, dtype=dtype)
    if compile:
        model.compile_decoding(dynamic=False)
    return model, tokenizer
