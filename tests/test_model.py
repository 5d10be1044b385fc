import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.errors import ConfigCompositionException

from minillm.config import compose, model_preset
from minillm.model import MiniGPT, ModelConfig, apply_rope, document_index, explicit_attention, rope_tables

from .conftest import micro_config

V = 101
VARIANTS = {
    "mha": dict(n_kv_head=4),
    "gqa": dict(n_kv_head=2),
    "moe": dict(n_experts=4, n_experts_per_tok=2, n_shared_experts=1),
}


def model(**overrides) -> MiniGPT:
    torch.manual_seed(0)
    return MiniGPT(micro_config(V, **overrides)).eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_kv_cache_decoding_matches_full_forward(variant):
    m = model(**VARIANTS[variant])
    ids = torch.randint(0, V, (2, 20))
    full = m(ids).logits
    cache = m.new_cache(2)
    pieces = [m(ids[:, :7], cache=cache).logits]  # prefill
    pieces += [m(ids[:, t : t + 1], cache=cache).logits for t in range(7, 20)]  # one token at a time
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_changing_a_token_changes_no_earlier_logits(variant):
    m = model(**VARIANTS[variant])
    ids = torch.randint(0, V, (1, 16))
    changed = ids.clone()
    changed[0, 9] = (ids[0, 9] + 1) % V
    a, b = m(ids).logits, m(changed).logits
    torch.testing.assert_close(a[:, :9], b[:, :9], atol=1e-6, rtol=0)
    assert (a[:, 9:] - b[:, 9:]).abs().amax() > 1e-4


def test_left_padded_rows_match_unpadded_forward():
    m = model()
    short, long = torch.randint(1, V, (1, 5)), torch.randint(1, V, (1, 9))
    ids = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])
    mask = torch.tensor([[0] * 4 + [1] * 5, [1] * 9])
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    out = m(ids, position_ids=positions, attention_mask=mask).logits
    assert torch.isfinite(out).all()  # padding rows attend to themselves, never to nothing
    torch.testing.assert_close(out[0, 4:], m(short).logits[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], m(long).logits[0], atol=1e-5, rtol=0)


def test_packed_documents_are_independent():
    m = model()
    doc_a, doc_b = torch.randint(0, V, (1, 6)), torch.randint(0, V, (1, 10))
    packed = torch.cat([doc_a, doc_b], 1)
    positions = torch.cat([torch.arange(6), torch.arange(10)])[None]
    out = m(packed, position_ids=positions, document_ids=document_index(positions)).logits
    torch.testing.assert_close(out[:, :6], m(doc_a).logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:, 6:], m(doc_b).logits, atol=1e-5, rtol=0)


def test_rope_scores_depend_only_on_relative_position():
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m, n):
        cq, sq = rope_tables(16, torch.tensor([[m]]), 10000.0)
        ck, sk = rope_tables(16, torch.tensor([[n]]), 10000.0)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    torch.testing.assert_close(score(7, 3), score(104, 100))
    assert not torch.allclose(score(7, 3), score(7, 4))
    cos, sin = rope_tables(16, torch.tensor([[0]]), 10000.0)
    torch.testing.assert_close(apply_rope(q, cos, sin), q)  # position 0 is the identity


def test_moe_aux_loss_is_positive_scaled_and_trains_the_router():
    m = model(**VARIANTS["moe"]).train()
    out = m(torch.randint(0, V, (2, 16)))
    assert out.aux_loss.item() > 0
    out.aux_loss.backward()
    router = m.layers[0].mlp.gate.weight.grad
    assert router is not None and router.abs().sum() > 0
    no_coef = model(**VARIANTS["moe"], aux_loss_coef=0.0)
    assert no_coef(torch.randint(0, V, (2, 16))).aux_loss.item() == 0.0
    assert model()(torch.randint(0, V, (1, 4))).aux_loss.item() == 0.0  # dense


def test_tied_embeddings_share_one_tensor_and_count_once():
    tied, untied = model(), model(tie_embeddings=False)
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert untied.num_parameters() - tied.num_parameters() == V * 64


def test_residual_projections_get_depth_scaled_init():
    m = MiniGPT(micro_config(V, n_layer=8, n_embd=256, n_head=4, n_kv_head=4))
    std_q = m.layers[0].self_attn.q_proj.weight.std().item()
    std_o = m.layers[0].self_attn.o_proj.weight.std().item()
    assert std_q == pytest.approx(0.02, rel=0.05)
    assert std_o == pytest.approx(0.02 / 4, rel=0.05)  # 1 / sqrt(2 * 8)


def readme_param_counts() -> dict[str, int]:
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `(\w+)` \|.*?\| ([\d,]+) \|", readme, flags=re.M)
    return {name: int(count.replace(",", "")) for name, count in rows}


@pytest.mark.parametrize("preset", ["tiny", "small", "medium", "moe"])
def test_preset_parameter_counts_are_as_documented(preset):
    documented = readme_param_counts()
    assert preset in documented, "README's preset table lists every preset"
    config = model_preset(preset, vocab_size=8192)
    with torch.device("meta"):
        assert MiniGPT(config).num_parameters() == documented[preset]


def test_tiny_preset_is_cpu_sized():
    config = model_preset("tiny", vocab_size=8192)
    with torch.device("meta"):
        assert 5e6 <= MiniGPT(config).num_parameters() <= 8e6


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(n_head=8, n_kv_head=3), "n_kv_head (3) must divide n_head (8)"),
        (dict(n_embd=60, n_head=8), "n_embd (60) must be divisible by n_head (8)"),
        (dict(n_experts=2, n_experts_per_tok=3), "n_experts_per_tok (3) must be in 1..n_experts (2)"),
    ],
)
def test_invalid_model_config_names_the_problem(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ModelConfig(**(dict(vocab_size=V) | overrides))


def test_missing_vocab_size_is_an_error():
    with pytest.raises(ValueError, match="vocab_size must be set"):
        MiniGPT(ModelConfig())


def test_unknown_preset_and_typo_fail_at_compose_time():
    with pytest.raises(ConfigCompositionException, match="nope"):
        compose(["model=nope"])
    with pytest.raises(ConfigCompositionException, match="n_layr"):
        compose(["model.n_layr=3"])
    with pytest.raises(ConfigCompositionException):
        compose(["model.n_layer=three"])


@pytest.mark.parametrize("kind", ["causal", "padded"])
def test_explicit_attention_matches_sdpa(kind):
    import torch.nn.functional as F

    from minillm.model import attention_bias, explicit_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 6, 8) for _ in range(3))
    if kind == "causal":
        mask = "causal"
    else:
        padding = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
        mask = attention_bias(padding, 6, 0, q.device)
    expected = F.scaled_dot_product_attention(
        q, k, v, attn_mask=None if mask == "causal" else mask, is_causal=mask == "causal"
    )
    torch.testing.assert_close(explicit_attention(q, k, v, mask, 0.0), expected, atol=1e-5, rtol=1e-5)


def test_written_out_attention_equals_sdpa_in_fp32():
    """The attention bf16 CPU training runs (explicit_attention) is SDPA's function: causal, a bool mask, none."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 7, 16) for _ in range(3))
    allowed = torch.rand(2, 1, 7, 7) > 0.3
    allowed[..., 0] = True  # every query attends somewhere
    for mask, sdpa in (
        ("causal", F.scaled_dot_product_attention(q, k, v, is_causal=True)),
        (allowed, F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)),
        (None, F.scaled_dot_product_attention(q, k, v)),
    ):
        torch.testing.assert_close(explicit_attention(q, k, v, mask, 0.0), sdpa, atol=1e-5, rtol=1e-5)


def test_bf16_training_attention_matches_the_sdpa_path_of_the_same_model(tokenizer):
    """In bf16 a training forward (written-out attention) and an eval forward (SDPA) agree to bf16 rounding
    (observed 0.004 on logits of scale ~1; a forward that ignored the causal mask differs by 0.34)."""
    torch.manual_seed(0)
    model = MiniGPT(micro_config(tokenizer.vocab_size))
    ids = torch.randint(6, 100, (2, 10))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        explicit = model.train()(ids).logits.float()  # train mode + bf16: the written-out attention
        sdpa = model.eval()(ids).logits.float()  # eval mode (validation, generation): SDPA
    torch.testing.assert_close(explicit, sdpa, atol=0.01, rtol=0)


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989.4e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA GeForce RTX 4090", 165.2e12),
        ("Tesla T4", None),  # not in the table: MFU against the measured peak
        ("NVIDIA L40", None),
    ],
)
def test_mfu_on_a_known_gpu_is_against_its_spec_sheet_bf16_peak(name, peak):
    from minillm.flops import spec_peak

    assert spec_peak(name, torch.bfloat16) == peak
    assert spec_peak(name, torch.float32) is None  # fp32 (TF32 or not) is measured
