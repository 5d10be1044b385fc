import math

import pytest
import torch

from minillm.generate import (
    GenerationConfig,
    TextGenerator,
    apply_repetition_penalty,
    generate,
    left_pad,
    stream,
    stream_rows,
    top_k_filter,
    top_p_filter,
)
from minillm.model import MiniGPT, ModelOutput
from tests.conftest import micro_config

NO_EOS = dict(eos_token_ids=[])  # untrained models may emit EOS at any time; some tests need full lengths


class ScriptedModel(MiniGPT):
    """A MiniGPT whose next token is dictated by a script (one entry per generation step)."""

    def __init__(self, config, script: list[int]):
        super().__init__(config)
        self.script, self.calls = script, 0

    def forward(self, input_ids, position_ids=None, attention_mask=None, cache=None, last_only=False):
        if cache is not None and cache.length == 0:  # a new generation (its prefill) starts the script again
            self.calls = 0
        out = super().forward(input_ids, position_ids, attention_mask, cache, last_only)  # keeps the cache going
        return ModelOutput(logits=self._scripted(out.logits), aux_loss=out.aux_loss, cache=out.cache)

    def step(self, token, position, cache, slot, key_mask):  # each decoding step after the prefill
        return self._scripted(super().step(token, position, cache, slot, key_mask))

    def _scripted(self, logits):
        logits = torch.full_like(logits, -1e4)
        logits[..., self.script[min(self.calls, len(self.script) - 1)]] = 0.0
        self.calls += 1
        return logits


class TransitionModel(MiniGPT):
    """Next-token probabilities that depend only on the previous token (`table[prev] = {next: p}`), decoded through
    the real path (prefill, KV cache, `step`), so a test can build a sequence greedy decoding cannot find."""

    def __init__(self, config, table: dict[int, dict[int, float]]):
        super().__init__(config)
        self.table = table

    def _from(self, previous: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """logits (..., V) of the positions whose input tokens are `previous` (...)."""
        out = torch.full_like(logits, -40.0)
        flat = out.view(-1, out.shape[-1])
        for position, token in enumerate(previous.reshape(-1).tolist()):
            for nxt, p in self.table.get(token, {}).items():
                flat[position, nxt] = math.log(p)
        return out

    def forward(self, input_ids, position_ids=None, attention_mask=None, cache=None, last_only=False):
        out = super().forward(input_ids, position_ids, attention_mask, cache, last_only)
        previous = input_ids[:, -out.logits.shape[1] :]  # every position, or the last one (last_only)
        return ModelOutput(logits=self._from(previous, out.logits), aux_loss=out.aux_loss, cache=out.cache)

    def step(self, token, position, cache, slot, key_mask):
        return self._from(token[:, 0], super().step(token, position, cache, slot, key_mask))


# A greedy trap: after the prompt's last token P, A (0.55) beats B (0.45), but every continuation of A is at 0.2
# while B is followed by C at 0.99. Greedy takes A then a 0.2 token (0.11); two beams find B C (0.446).
P, A, B, C, D, E = 40, 41, 42, 43, 44, 49
TRAP = {P: {A: 0.55, B: 0.45}, A: {D + i: 0.2 for i in range(5)}, B: {C: 0.99, D: 0.01}, C: {E: 1.0}}
TRAP |= {D + i: {E: 1.0} for i in range(5)} | {E: {E: 1.0}}


def trap_model(tokenizer):
    torch.manual_seed(0)
    return TransitionModel(micro_config(tokenizer.vocab_size), TRAP)


def scripted(tokenizer, script):
    torch.manual_seed(0)
    return ScriptedModel(micro_config(tokenizer.vocab_size), script)


def byte_ids(tokenizer, text):
    return [tokenizer.sp.piece_to_id(f"<0x{b:02X}>") for b in text.encode("utf-8")]


# ---- logit processors on hand-made distributions ----


def kept(logits):
    return set(torch.isfinite(logits[0]).nonzero().flatten().tolist())


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, -2.0, 4.0]])
    assert kept(top_k_filter(logits, 2)) == {1, 4}
    assert kept(top_k_filter(logits, 3)) == {1, 2, 4}
    assert kept(top_k_filter(logits, 0)) == {0, 1, 2, 3, 4}


@pytest.mark.parametrize(
    "p, expected", [(0.4, {0}), (0.75, {0, 1}), (0.79, {0, 1}), (0.81, {0, 1, 2}), (1.0, {0, 1, 2, 3, 4})]
)
def test_top_p_keeps_the_smallest_set_reaching_p(p, expected):
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.06, 0.04]])
    shuffled = torch.tensor([3, 0, 4, 1, 2])  # the filter must not depend on token order
    logits = probs.log()[:, shuffled]
    assert {int(shuffled[i]) for i in kept(top_p_filter(logits, p))} == expected


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0]]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=0), "temperature must be > 0"),
        (dict(top_p=0), "top_p must be in"),
        (dict(num_beams=2), "beam search is deterministic"),
        (dict(repetition_penalty=0), "repetition_penalty must be > 0"),
    ],
)
def test_generation_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GenerationConfig(**kwargs)


# ---- decoding with a real (untrained) model ----


def reference_greedy(model, ids, n):
    """Greedy decoding by full forward passes, no cache."""
    ids = list(ids)
    for _ in range(n):
        logits = model(torch.tensor([ids])).logits[0, -1]
        ids.append(int(logits.argmax()))
    return ids


def test_greedy_equals_argmax_of_full_forward_passes(micro_model, tokenizer):
    prompt = tokenizer.encode("To be, or not")
    gen = TextGenerator(micro_model, tokenizer)
    out = gen.sample_generate(
        torch.tensor([prompt]), config=GenerationConfig(max_new_tokens=12, do_sample=False, **NO_EOS)
    )
    with torch.no_grad():
        assert out[0].tolist() == reference_greedy(micro_model, prompt, 12)


def test_batched_left_padded_greedy_equals_each_prompt_alone(micro_model, tokenizer):
    prompts = ["In the beginning God created", "你好", "The quick brown fox jumps over"]
    config = GenerationConfig(max_new_tokens=10, do_sample=False, repetition_penalty=1.3, **NO_EOS)
    batched = generate(micro_model, tokenizer, prompts, config)
    assert batched == [generate(micro_model, tokenizer, p, config) for p in prompts]


def test_one_beam_is_greedy(micro_model, tokenizer):
    prompts = ["To be", "And God said, Let there be"]
    greedy = generate(micro_model, tokenizer, prompts, GenerationConfig(max_new_tokens=10, do_sample=False))
    beam = generate(micro_model, tokenizer, prompts, GenerationConfig(max_new_tokens=10, do_sample=False, num_beams=1))
    assert beam == greedy


def sequence_logprob(model, prompt, new):
    ids = torch.tensor([prompt + new])
    with torch.no_grad():
        logp = model(ids).logits[0, :-1].log_softmax(-1)
    return sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(new))


def test_beam_search_finds_the_likelier_sequence_that_greedy_misses(tokenizer):
    model = trap_model(tokenizer)
    gen = TextGenerator(model, tokenizer)
    prompt = [7, P]
    news, logps = {}, {}
    for beams in (1, 2, 4):
        cfg = GenerationConfig(max_new_tokens=3, do_sample=False, num_beams=beams, **NO_EOS)
        news[beams] = gen.sample_generate(torch.tensor([prompt]), config=cfg)[0, len(prompt) :].tolist()
        logps[beams] = sequence_logprob(model, prompt, news[beams])
    assert news[1][:2] == [A, D]  # greedy falls into the trap: 0.55 x 0.2
    assert news[2] == news[4] == [B, C, E]  # 0.45 x 0.99
    assert logps[2] == pytest.approx(math.log(0.45 * 0.99), abs=1e-3)
    assert logps[2] > logps[1] + 1.0


def test_batched_beam_search_equals_each_prompt_alone(micro_model, tokenizer):
    prompts = ["To be", "你好，世界"]
    config = GenerationConfig(max_new_tokens=8, do_sample=False, num_beams=3, **NO_EOS)
    assert generate(micro_model, tokenizer, prompts, config) == [
        generate(micro_model, tokenizer, p, config) for p in prompts
    ]
    # the trap prompt beside a shorter, left-padded one: the batch still finds B C, not greedy's A
    ids, mask = left_pad([[9, 7, 3, P], [5, P]], tokenizer.pad_id)
    cfg = GenerationConfig(max_new_tokens=2, do_sample=False, num_beams=2, **NO_EOS)
    assert TextGenerator(trap_model(tokenizer), tokenizer).sample_generate(ids, mask, cfg)[:, -2:].tolist() == [
        [B, C],
        [B, C],
    ]


def test_same_seed_same_sample_and_global_rng_untouched(micro_model, tokenizer):
    config = GenerationConfig(max_new_tokens=20, seed=123, **NO_EOS)
    torch.manual_seed(0)
    rng_before = torch.get_rng_state()
    first = generate(micro_model, tokenizer, "To be", config)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert generate(micro_model, tokenizer, "To be", config) == first
    others = {
        generate(micro_model, tokenizer, "To be", GenerationConfig(max_new_tokens=20, seed=s, **NO_EOS))
        for s in range(4)
    }
    assert len(others) > 1
    unseeded = GenerationConfig(max_new_tokens=20, **NO_EOS)
    generate(micro_model, tokenizer, "To be", unseeded)
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_sample_draws_each_token_at_its_probability_and_never_a_filtered_one():
    from minillm.generate import sample

    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])
    generator = torch.Generator().manual_seed(0)
    n = 20000
    draws = torch.stack([sample(probs, generator) for _ in range(n)])  # (n, 2)
    counts = torch.bincount(draws[:, 0], minlength=6).double() / n
    # four binomial standard errors of n draws (at most 0.014): a sampler off by one token moves 0.2 or more
    assert counts.tolist() == pytest.approx(probs[0].tolist(), abs=4 * (0.25 / n) ** 0.5)
    assert set(draws[:, 0].tolist()) == {1, 3, 4} and set(draws[:, 1].tolist()) == {5}


def test_low_temperature_sampling_is_greedy(micro_model, tokenizer):
    greedy = generate(micro_model, tokenizer, "To be", GenerationConfig(max_new_tokens=10, do_sample=False, **NO_EOS))
    cold = generate(
        micro_model, tokenizer, "To be", GenerationConfig(max_new_tokens=10, temperature=1e-4, seed=5, **NO_EOS)
    )
    top1 = generate(micro_model, tokenizer, "To be", GenerationConfig(max_new_tokens=10, top_k=1, seed=6, **NO_EOS))
    assert greedy == cold == top1


def test_generation_restores_training_mode(micro_model, tokenizer):
    micro_model.train()
    generate(micro_model, tokenizer, "x", GenerationConfig(max_new_tokens=3))
    assert micro_model.training


def test_prompt_longer_than_block_size_keeps_its_end(micro_model, tokenizer, caplog):
    long_prompt = "To be, or not to be, that is the question. " * 20
    inputs = []  # what the model is given: the prompt's last block_size - 1 tokens, then one new token at a time
    hook = micro_model.register_forward_pre_hook(lambda module, args, kwargs: inputs.append(args[0]), with_kwargs=True)
    try:
        text = generate(
            micro_model, tokenizer, long_prompt, GenerationConfig(max_new_tokens=5, do_sample=False, **NO_EOS)
        )
    finally:
        hook.remove()
    block = micro_model.config.block_size
    assert inputs[0][0].tolist() == tokenizer.encode(long_prompt)[-(block - 1) :]
    assert len(tokenizer.encode(text)) >= 1  # the one new token that still fits
    assert "does not fit block_size" in caplog.text


# ---- stopping and streaming, with scripted models ----


def test_eos_ends_generation_and_finished_rows_are_padded(tokenizer):
    body = tokenizer.encode("ok then")
    model = scripted(tokenizer, body + [tokenizer.eos_id] + tokenizer.encode(" never"))
    gen = TextGenerator(model, tokenizer)
    out = gen.sample_generate(torch.tensor([[7, 8]]), config=GenerationConfig(max_new_tokens=20, do_sample=False))
    assert out[0].tolist() == [7, 8] + body + [tokenizer.eos_id]
    assert gen.generate("hi", GenerationConfig(max_new_tokens=20, do_sample=False)) == "ok then"


def test_stop_strings_cut_the_text_and_stop_the_row(tokenizer):
    script = tokenizer.encode("The answer. STOP then more words follow")
    model = scripted(tokenizer, script)
    text = generate(
        model, tokenizer, "q", GenerationConfig(max_new_tokens=40, do_sample=False, stop=["STOP"], **NO_EOS)
    )
    assert text == "The answer. "
    assert model.calls < len(script)  # stopped right after the stop string appeared


def test_stream_yields_an_emoji_whole(tokenizer):
    script = tokenizer.encode("Hi ") + byte_ids(tokenizer, "😀") + tokenizer.encode(" ok") + [tokenizer.eos_id]
    model = scripted(tokenizer, script)
    pieces = list(stream(model, tokenizer, "x", GenerationConfig(max_new_tokens=50, do_sample=False)))
    assert "".join(pieces) == "Hi 😀 ok"
    assert "😀" in pieces or any(p.startswith("😀") for p in pieces)
    assert not any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("The answer.\n\nUser: and more words", "The answer."),  # the stop string arrives token by token
        ("The answer. Use it well", "The answer. Use it well"),  # a tail that began the stop string, released
    ],
)
def test_stream_with_a_multi_token_stop_string_yields_what_generate_returns(tokenizer, script, expected):
    ids = tokenizer.encode(script)
    config = GenerationConfig(max_new_tokens=len(ids), do_sample=False, stop=["\n\nUser:"], **NO_EOS)
    assert len(tokenizer.encode("\n\nUser:")) > 1
    assert generate(scripted(tokenizer, ids), tokenizer, "q", config) == expected
    pieces = list(stream(scripted(tokenizer, ids), tokenizer, "q", config))
    assert "".join(pieces) == expected


def test_stream_matches_generate(micro_model, tokenizer):
    config = GenerationConfig(max_new_tokens=15, seed=3, top_p=0.9)
    assert "".join(stream(micro_model, tokenizer, "你好", config)) == generate(micro_model, tokenizer, "你好", config)


def test_batched_stream_rows_join_to_generate_per_row_with_finish_reasons(micro_model, tokenizer):
    """What the server decodes concurrent requests with: every row's pieces join to generate()'s text for it,
    and the row's last event says why it ended."""
    prompts = ["In the beginning", "你好", [{"role": "user", "content": "Hello"}]]
    for config in (GenerationConfig(max_new_tokens=12, do_sample=False), GenerationConfig(max_new_tokens=9, seed=5)):
        expected = generate(micro_model, tokenizer, prompts, config)
        stop = next((t[2:4] for t in expected if len(t.strip()) > 4), None)  # a stop string one reply contains
        configs = [config] + ([GenerationConfig(**{**config.__dict__, "stop": [stop]})] if stop else [])
        for cfg in configs:
            expected = generate(micro_model, tokenizer, prompts, cfg)
            texts, finishes, counts = ["", "", ""], [None] * 3, [0] * 3
            for row, piece, finish, tokens in stream_rows(micro_model, tokenizer, prompts, cfg):
                assert finishes[row] is None  # nothing after a row's last event
                texts[row] += piece
                finishes[row], counts[row] = finish, tokens
            assert texts == expected and all(f in ("stop", "length") for f in finishes)
            for finish, count in zip(finishes, counts):
                assert count <= cfg.max_new_tokens
                assert count == cfg.max_new_tokens or finish == "stop"  # ended early: EOS or a stop string
    # each reason from a scripted row: the budget ("length"), EOS ("stop"), a stop string ("stop")
    words = tokenizer.encode("one two three")
    for script, cfg, reason, count in (
        (words, GenerationConfig(max_new_tokens=2, do_sample=False, **NO_EOS), "length", 2),
        (words + [tokenizer.eos_id], GenerationConfig(max_new_tokens=20, do_sample=False), "stop", len(words)),
        (words, GenerationConfig(max_new_tokens=20, do_sample=False, stop=["two"], **NO_EOS), "stop", None),
    ):
        events = list(stream_rows(scripted(tokenizer, script), tokenizer, ["q"], cfg))
        assert events[-1][2] == reason and (count is None or events[-1][3] == count)
    script = tokenizer.encode("one two three")  # scripted: exactly these tokens, then EOS
    done = list(
        stream_rows(
            scripted(tokenizer, script + [tokenizer.eos_id]),
            tokenizer,
            ["q"],
            GenerationConfig(max_new_tokens=20, do_sample=False),
        )
    )
    assert "".join(p for _, p, _, _ in done) == "one two three" and done[-1][2:] == ("stop", len(script))


def test_the_original_quick_start_runs_verbatim(micro_model, tokenizer):
    """The generation snippet of the quick-start the project was created from, unchanged after our imports:
    `max_length` is transformers' (prompt + new tokens) and the output holds the prompt."""
    model, prompt = micro_model, "In the beginning"
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=True)
    output_ids = TextGenerator(model, tokenizer, device="cpu").sample_generate(
        input_ids=torch.tensor([prompt_ids]), config=GenerationConfig(max_length=40, top_p=0.9, temperature=0.8)
    )
    text = tokenizer.decode(output_ids[0].tolist())
    assert output_ids.shape[1] <= 40 and output_ids[0, : len(prompt_ids)].tolist() == prompt_ids
    assert text.startswith(prompt)
    full = TextGenerator(model, tokenizer).sample_generate(
        torch.tensor([prompt_ids]), config=GenerationConfig(max_length=40, seed=0, max_new_tokens=3, **NO_EOS)
    )
    assert full.shape[1] == 40  # max_length decides, max_new_tokens is not read


def test_left_pad_helper():
    ids, mask = left_pad([[5, 6, 7], [9]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 9]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_inference_commands_default_to_the_best_device(pretrained, monkeypatch, capsys):
    """generate, chat and serve take device=auto: CUDA, then MPS, then the CPU, and say which they run on."""
    import io

    from minillm import accelerator, chat
    from minillm.generate import load_model
    from minillm.generate.__main__ import GenerateCommand
    from minillm.serve import ServeCommand

    assert GenerateCommand.device == chat.ChatCommand.device == ServeCommand.device == "auto"
    asked = []
    monkeypatch.setattr(accelerator, "best_device", lambda: asked.append(1) or "cpu")
    model, _ = load_model(str(pretrained), "auto")
    assert asked and model.lm_head.weight.device.type == "cpu"
    out = io.StringIO()
    chat.run(chat.ChatCommand(model_path=str(pretrained)), stdin=io.StringIO("/exit\n"), out=out)
    assert "parameters, cpu, float32)" in out.getvalue()
