"""Attention kernels per device, activation checkpointing and torch.compile: each fast path computes what the
plain one does."""

import copy
import csv
import pickle

import pytest
import torch

import minillm.model as model_lib
from minillm.flops import measure_peak
from minillm.generate import GenerationConfig, generate_ids
from minillm.model import (
    Attention,
    MiniGPT,
    apply_rope,
    attention_bias,
    attention_kernel,
    packed_kernel,
    rope_tables,
    sdpa_gqa,
)
from minillm.train import build

from .conftest import micro_config, micro_overrides

V = 101


# ---- which kernel runs where ----


@pytest.mark.parametrize(
    "device, dtype, training, expected",
    [
        ("cuda", torch.bfloat16, True, "sdpa"),  # flash / memory-efficient: never a (T, S) score tensor on a GPU
        ("cuda", torch.float16, True, "sdpa"),
        ("cuda", torch.float32, True, "sdpa"),
        ("cuda", torch.bfloat16, False, "sdpa"),
        ("cpu", torch.bfloat16, True, "explicit"),  # CPU SDPA's bf16 backward is the slow one
        ("cpu", torch.bfloat16, False, "sdpa"),
        ("cpu", torch.float32, True, "sdpa"),
        ("mps", torch.bfloat16, True, "sdpa"),
    ],
)
def test_attention_kernel_per_device_dtype_and_mode(device, dtype, training, expected):
    assert attention_kernel(device, dtype, training) == expected


def test_packed_kernel_per_device():
    assert packed_kernel("cuda", 0.0) == "flex"
    assert packed_kernel("cuda", 0.1) == "dense"  # FlexAttention has no dropout
    assert packed_kernel("cpu", 0.0) == "dense"  # no FlexAttention backward on CPU


@pytest.mark.parametrize(
    "device, dtype, masked, expected",
    [
        ("cuda", torch.bfloat16, False, True),  # FlashAttention takes grouped K/V
        ("cuda", torch.float16, False, True),
        ("cuda", torch.float32, False, False),  # memory-efficient kernel: refuses enable_gqa, so K/V repeated
        ("cuda", torch.bfloat16, True, False),  # a mask rules Flash out: the same
        ("cpu", torch.float32, True, True),
        ("cpu", torch.bfloat16, False, True),
    ],
)
def test_grouped_kv_go_to_sdpa_as_they_are_only_where_the_kernel_takes_them(device, dtype, masked, expected):
    assert sdpa_gqa(device, dtype, masked) is expected


# ---- every path equals a reference written from first principles ----


def reference(q, k, v, allowed):
    """fp64 softmax(q kᵀ/√D) v with a (B, T, S) bool `allowed`; K/V heads repeated for GQA."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q @ k.transpose(-2, -1)) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return (scores.softmax(-1) @ v).float()


def case(kind: str):
    """(positions, model mask argument, allowed[b, t, s]) for 2 rows of 12 tokens."""
    T = 12
    causal = torch.ones(T, T, dtype=torch.bool).tril()[None].expand(2, T, T)
    if kind == "causal":
        return torch.arange(T).expand(2, T), "causal", causal
    if kind == "padded":  # row 0 left-padded by 3
        real = torch.ones(2, T, dtype=torch.long)
        real[0, :3] = 0
        positions = (real.cumsum(1) - 1).clamp(min=0)
        allowed = causal & real.bool()[:, None, :] | torch.eye(T, dtype=torch.bool)  # padding sees itself
        return positions, attention_bias(real, T, 0, "cpu"), allowed
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4]])
    documents = model_lib.document_index(positions)
    allowed = causal & (documents[:, :, None] == documents[:, None, :])
    return positions, documents, allowed


PATHS = [(p, k) for p in ("sdpa_gqa", "sdpa_repeat", "explicit") for k in ("causal", "padded", "packed")]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("path, kind", PATHS + [("flex", "packed")])  # FlexAttention serves packed rows only
def test_every_attention_path_equals_the_reference(path, kind, monkeypatch):
    torch.manual_seed(0)
    config = micro_config(V)
    attn = Attention(config).eval()
    positions, mask, allowed = case(kind)
    x = torch.randn(2, 12, config.n_embd)
    cos, sin = rope_tables(config.head_dim, positions, config.rope_theta)
    B, T, _ = x.shape
    q = apply_rope(attn.q_proj(x).view(B, T, config.n_head, -1).transpose(1, 2), cos, sin)
    k = apply_rope(attn.k_proj(x).view(B, T, config.n_kv_head, -1).transpose(1, 2), cos, sin)
    v = attn.v_proj(x).view(B, T, config.n_kv_head, -1).transpose(1, 2)
    expected = attn.o_proj(reference(q, k, v, allowed).transpose(1, 2).reshape(B, T, -1))

    if kind == "packed":  # the mask the model builds for packed rows: dense, or a FlexAttention block mask
        documents = mask
        mask = attention_bias(documents[:, :, None] == documents[:, None, :], T, 0, "cpu")
        if path == "flex":
            mask = model_lib.document_block_mask(documents)
            # the eager FlexAttention on CPU (forward only): the same mask_mod the compiled CUDA kernel runs
            monkeypatch.setattr(model_lib, "compiled_flex_attention", lambda: model_lib.flex_attention)
    if path == "explicit":
        monkeypatch.setattr(model_lib, "attention_kernel", lambda *a: "explicit")
    if path == "sdpa_repeat":
        monkeypatch.setattr(model_lib, "SDPA_GQA", False)
    with torch.no_grad():
        got = attn(x, cos, sin, mask, 0, None)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_packed_forward_without_a_dense_mask_on_flex_devices(monkeypatch):
    """Where packed_kernel says flex, the model hands attention a block mask, not a (B, 1, T, T) tensor."""
    seen = []
    monkeypatch.setattr(model_lib, "packed_kernel", lambda *a: "flex")
    monkeypatch.setattr(model_lib, "compiled_flex_attention", lambda: model_lib.flex_attention)
    original = Attention.forward

    def spy(self, x, cos, sin, mask, *rest):
        seen.append(type(mask).__name__)
        return original(self, x, cos, sin, mask, *rest)

    monkeypatch.setattr(Attention, "forward", spy)
    torch.manual_seed(0)
    m = MiniGPT(micro_config(V)).eval()
    positions, documents, _ = case("packed")
    ids = torch.randint(0, V, (2, 12))
    with torch.no_grad():
        flex = m(ids, position_ids=positions, document_ids=documents).logits
    assert seen and set(seen) == {"BlockMask"}
    monkeypatch.setattr(model_lib, "packed_kernel", lambda *a: "dense")
    with torch.no_grad():
        dense = m(ids, position_ids=positions, document_ids=documents).logits
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-4)


# ---- activation checkpointing ----


def test_gradient_checkpointing_recomputes_blocks_and_keeps_gradients():
    torch.manual_seed(0)
    plain = MiniGPT(micro_config(V)).train()
    checkpointed = MiniGPT(micro_config(V, gradient_checkpointing=True)).train()
    checkpointed.load_state_dict(plain.state_dict())
    calls = []
    checkpointed.layers[0].register_forward_pre_hook(lambda *a: calls.append(1))
    ids = torch.randint(0, V, (2, 16))
    for m in (plain, checkpointed):
        m(ids).logits.logsumexp(-1).mean().backward()
    assert len(calls) == 2  # the forward, then the recomputation in the backward
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-6, rtol=1e-5, msg=name)


# ---- torch.compile ----


def test_a_compiled_model_travels_without_its_compiled_code():
    """ddp_spawn pickles the module, DPO's reference is a deep copy: each copy must compile its own methods."""
    model = MiniGPT(micro_config(V))
    model.compile_layers()
    model.compile_decoding(dynamic=False)
    assert model.decode_step._torchdynamo_orig_callable.__self__ is model
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert twin.decoding_compiled and twin._compiled_layers is not None  # the request travels
        assert twin.decode_step._torchdynamo_orig_callable.__self__ is twin  # its own weights, not model's
        assert twin._compiled_layers._torchdynamo_orig_callable.__self__ is twin
    moe = MiniGPT(micro_config(V, n_experts=4))
    moe.compile_decoding(dynamic=False)  # data-dependent expert shapes: the decode step stays eager
    assert not moe.decoding_compiled and moe.decode_step == moe.step


@pytest.mark.slow
def test_compiled_decoding_gives_the_same_tokens(tokenizer):
    torch.manual_seed(0)
    model = MiniGPT(micro_config(tokenizer.vocab_size)).eval()
    ids = torch.randint(6, 200, (2, 5))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # a left-padded row
    config = GenerationConfig(do_sample=False, max_new_tokens=20, eos_token_ids=[])
    eager = generate_ids(model, tokenizer, ids, mask, config)
    model.compile_decoding(dynamic=False)
    compiled = generate_ids(model, tokenizer, ids, mask, config)
    assert compiled == eager and all(len(r) == 20 for r in compiled)


@pytest.mark.slow
def test_one_compiled_step_serves_smaller_batches_and_sees_weights_updated_in_place(tokenizer):
    """RLHF decodes its rollouts through the compiled step between optimizer steps; eval's last batch is smaller."""
    torch.manual_seed(0)
    model = MiniGPT(micro_config(tokenizer.vocab_size)).eval()
    eager = copy.deepcopy(model)
    model.compile_decoding(dynamic=False)
    ids = torch.randint(6, 200, (4, 5))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    config = GenerationConfig(do_sample=False, max_new_tokens=12, eos_token_ids=[])
    before = generate_ids(model, tokenizer, ids, mask, config)
    assert before == generate_ids(eager, tokenizer, ids, mask, config)
    compiled = torch._dynamo.utils.counters["frames"]["ok"]
    assert generate_ids(model, tokenizer, ids[1:], mask[1:], config) == before[1:]
    assert torch._dynamo.utils.counters["frames"]["ok"] == compiled  # 3 rows ran in the 4-row graph
    assert model.decode_rows(1) == 1 and model.decode_rows(2) == 4  # 1 row would be 4x the work: its own graph
    with torch.no_grad():  # what an optimizer step does between two rollouts: weights changed in place
        for p, q in zip(model.parameters(), eager.parameters()):
            change = 0.5 * p.std() * torch.randn_like(p)
            p.add_(change)
            q.add_(change)
        model.norm.weight.neg_()  # a random micro model repeats its input: flip the logits so greedy changes
        eager.norm.weight.neg_()
    after = generate_ids(model, tokenizer, ids, mask, config)
    assert after != before and after == generate_ids(eager, tokenizer, ids, mask, config)


def losses(run_dir):
    with open(run_dir / "logs" / "metrics.csv", newline="") as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


@pytest.mark.slow
def test_compiled_pretraining_follows_the_eager_loss_curve(tmp_path, data_dir):
    curves = {}
    for name, flag in (("eager", "false"), ("compiled", "true")):
        run = build(micro_overrides(tmp_path / name, data_dir, f"compile={flag}", "trainer.max_steps=4"))
        assert run.fit() == 0
        curves[name] = losses(tmp_path / name / "run")
        if flag == "true":
            assert run.module.model._compiled_layers is not None
    assert len(curves["eager"]) == 4
    assert curves["compiled"] == pytest.approx(curves["eager"], rel=1e-4)


def test_measuring_the_matmul_peak_leaves_the_random_stream_alone():
    """train/mfu's peak is measured in on_train_start: that must not change a run's dropout or sampling."""
    torch.manual_seed(0)
    before = torch.get_rng_state()
    assert measure_peak(torch.float32, n=64, repeats=1) > 0
    assert torch.equal(torch.get_rng_state(), before)
