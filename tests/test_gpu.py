"""GPU smoke suite: `pytest -m gpu` (or `benchmarks/gpu.sh`, which runs it first). A few steps of every stage on
CUDA in bf16-mixed, eager and compiled; KV-cache decoding against the full forward; FSDP on one device; the
fused attention paths a GPU takes (flash SDPA, FlexAttention for packed rows).

Without CUDA every test is skipped, except in a GPU session: with MINILLM_EXPECT_GPU=1 a missing GPU fails the
suite instead. MINILLM_GPU_TESTS_ON_CPU=1 runs the same tests on the CPU in fp32 (to check the suite itself on a
machine without a GPU; nothing GPU-specific is proven then).
"""

import csv
import math
import os

import pytest
import torch

import minillm.model as model_lib
from minillm.config import TASKS, EvalConfig
from minillm.evaluation import evaluate
from minillm.generate import GenerationConfig, generate_ids
from minillm.model import MiniGPT, RewardModel
from minillm.pretrained import save_pretrained
from minillm.train import build

from .conftest import micro_config, micro_overrides, pair_overrides

pytestmark = pytest.mark.gpu
ON_CPU = os.environ.get("MINILLM_GPU_TESTS_ON_CPU") == "1"


@pytest.fixture(scope="module")
def device() -> str:
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = False  # exact comparisons below are fp32 against fp32
        torch.backends.cudnn.allow_tf32 = False
        return "cuda"
    if os.environ.get("MINILLM_EXPECT_GPU") == "1":
        pytest.fail("MINILLM_EXPECT_GPU=1 but torch sees no CUDA device: the GPU suite would prove nothing")
    if ON_CPU:
        return "cpu"
    pytest.skip("no CUDA device (set MINILLM_EXPECT_GPU=1 in a GPU session to make this a failure)")


def on_device(device: str, precision: str = "bf16-mixed") -> list[str]:
    if device == "cpu":
        return ["trainer.accelerator=cpu", "trainer.devices=1", "trainer.precision=32-true"]
    return ["trainer.accelerator=gpu", "trainer.devices=1", f"trainer.precision={precision}"]


def train_losses(run_dir) -> list[float]:
    with open(run_dir / "logs" / "metrics.csv", newline="") as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


STAGES = {
    "pretrain": lambda root, d, init: micro_overrides(root, d["data"]),
    "sft": lambda root, d, init: micro_overrides(root, d["chat"], f"init_from={init}", stage="sft"),
    "sft_packed": lambda root, d, init: micro_overrides(
        root, d["chat"], f"init_from={init}", "data.packing=true", stage="sft"
    ),
    "dpo": lambda root, d, init: pair_overrides(root, d["pref"], init, stage="dpo"),
    "reward": lambda root, d, init: pair_overrides(root, d["pref"], init, stage="reward"),
    "rlhf": lambda root, d, init: micro_overrides(
        root,
        d["prompt"],
        f"init_from={init}",
        "stage.max_prompt_length=20",
        "stage.max_completion_length=12",
        "stage.reward=verifiable",
        "callbacks.rlhf_monitor.sample_every=0",
        stage="rlhf",
    ),
}


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("stage", STAGES)
def test_stage_trains_on_the_device(stage, compiled, device, tmp_path, data_dir, chat_dir, pref_dir, prompt_dir):
    dirs = {"data": data_dir, "chat": chat_dir, "pref": pref_dir, "prompt": prompt_dir}
    init = tmp_path / "init" / "run" / "final"
    if stage != "pretrain":  # a parent of the right shape, trained here in a few steps
        assert build(micro_overrides(tmp_path / "init", data_dir, "trainer.max_steps=2")).fit() == 0
    overrides = STAGES[stage](tmp_path / "stage", dirs, init)
    run = build(overrides + on_device(device) + [f"compile={compiled}", "trainer.max_steps=3"])
    assert run.fit() == 0
    assert run.module.device.type == device
    losses = train_losses(tmp_path / "stage" / "run")
    assert losses and all(math.isfinite(x) for x in losses)
    assert (tmp_path / "stage" / "run" / "final").is_dir()


def test_fsdp_on_one_device_trains(device, tmp_path, data_dir):
    if device == "cpu":
        pytest.skip("trainer=fsdp is a GPU preset")
    run = build(micro_overrides(tmp_path, data_dir, "trainer=fsdp", "trainer.devices=1", "trainer.max_steps=3"))
    assert run.trainer.strategy.__class__.__name__ == "FSDPStrategy"
    assert run.fit() == 0
    losses = train_losses(tmp_path / "run")
    assert losses and all(math.isfinite(x) for x in losses)
    from torch.distributed.fsdp import FullyShardedDataParallel

    units = [m for m in run.trainer.strategy.model.modules() if isinstance(m, FullyShardedDataParallel)]
    assert len(units) == run.module.model.config.n_layer + 1  # each block, and the root (embeddings, head)
    resumed = build(
        micro_overrides(tmp_path, data_dir, "trainer=fsdp", "trainer.devices=1", "trainer.max_steps=5", "resume=auto")
    )
    assert resumed.fit() == 0 and resumed.trainer.global_step == 5  # the full checkpoint resumes


def test_kv_cache_greedy_equals_the_full_forward(device, tokenizer):
    torch.manual_seed(0)
    model = MiniGPT(micro_config(tokenizer.vocab_size)).to(device).eval()
    ids = torch.randint(6, 200, (3, 7), device=device)
    config = GenerationConfig(do_sample=False, max_new_tokens=24, eos_token_ids=[])
    cached = generate_ids(model, tokenizer, ids, torch.ones_like(ids), config)
    with torch.no_grad():
        full = ids
        for _ in range(24):
            full = torch.cat([full, model(full).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert cached == full[:, 7:].tolist()
    model.compile_decoding(dynamic=False)
    assert generate_ids(model, tokenizer, ids, torch.ones_like(ids), config) == cached


def test_causal_bf16_training_runs_on_the_flash_kernel(device):
    """With only FlashAttention allowed, a bf16 training forward and backward must still run: the model hands
    SDPA nothing (no dense mask, no K/V copies) that would force the O(T²) math fallback."""
    if device == "cpu":
        pytest.skip("FlashAttention is a CUDA kernel")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    model = MiniGPT(micro_config(512, n_embd=128, n_head=4, n_kv_head=2, block_size=256)).to(device).train()
    ids = torch.randint(0, 512, (4, 256), device=device)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(ids).logits.float().logsumexp(-1).mean()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_fp32_and_padded_attention_run_without_the_math_kernel(device):
    """fp32 training and left-padded scoring must reach the fused kernels (flash / memory-efficient), not SDPA's
    math fallback with its (T, S) score tensor: grouped K/V are repeated where the efficient kernel needs it."""
    if device == "cpu":
        pytest.skip("flash / memory-efficient are CUDA kernels")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    model = MiniGPT(micro_config(512, n_embd=128, n_head=4, n_kv_head=2, block_size=128)).to(device).train()
    ids = torch.randint(0, 512, (2, 128), device=device)
    mask = torch.ones_like(ids)
    mask[0, :40] = 0  # left padding
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        model(ids).logits.float().logsumexp(-1).mean().backward()  # fp32, causal
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert torch.isfinite(model(ids, attention_mask=mask).logits.float()).all()  # padded


def test_flex_packed_rows_equal_the_dense_mask_with_gradients(device):
    if device == "cpu":
        pytest.skip("FlexAttention has no CPU backward")
    torch.manual_seed(0)
    dense_model = MiniGPT(micro_config(512, block_size=128)).to(device).train()
    flex_model = MiniGPT(micro_config(512, block_size=128)).to(device).train()
    flex_model.load_state_dict(dense_model.state_dict())
    positions = torch.cat([torch.arange(50), torch.arange(30), torch.arange(48)]).to(device).expand(2, 128)
    documents = model_lib.document_index(positions)
    ids = torch.randint(0, 512, (2, 128), device=device)
    assert model_lib.packed_kernel(device, 0.0) == "flex"
    flex = flex_model(ids, position_ids=positions, document_ids=documents).logits
    original = model_lib.packed_kernel
    model_lib.packed_kernel = lambda *a: "dense"
    try:
        dense = dense_model(ids, position_ids=positions, document_ids=documents).logits
    finally:
        model_lib.packed_kernel = original
    torch.testing.assert_close(flex, dense, atol=2e-4, rtol=1e-3)
    flex.logsumexp(-1).mean().backward()
    dense.logsumexp(-1).mean().backward()
    for a, b in zip(dense_model.parameters(), flex_model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=2e-4, rtol=1e-3)


def test_mfu_is_measured_against_this_device(device, tmp_path, data_dir):
    run = build(micro_overrides(tmp_path, data_dir, *on_device(device), "trainer.max_steps=4"))
    assert run.fit() == 0
    with open(tmp_path / "run" / "logs" / "metrics.csv", newline="") as f:
        mfu = [float(r["train/mfu"]) for r in csv.DictReader(f) if r.get("train/mfu")]
    assert mfu and all(0 < x < 1 for x in mfu)


def test_eval_on_the_device_equals_the_cpu(device, tmp_path, tokenizer, eval_data):
    """`minillm eval`/`report` default to device=auto: on a GPU every task must give the CPU's numbers (fp32 both)."""
    torch.manual_seed(0)
    lm = save_pretrained(MiniGPT(micro_config(tokenizer.vocab_size)), tokenizer, tmp_path / "lm")
    ref = save_pretrained(MiniGPT(micro_config(tokenizer.vocab_size)), tokenizer, tmp_path / "ref")
    rm = save_pretrained(RewardModel(micro_config(tokenizer.vocab_size)), tokenizer, tmp_path / "rm")
    config = EvalConfig(
        tasks=[*TASKS], data_dir=str(eval_data), pairs=["sums"], reference=str(ref), reward_model=str(rm),
        gold_reward_model=str(rm), max_new_tokens=6, limit=20,
    )  # fmt: skip
    on_cpu, here = evaluate(lm, config, "cpu"), evaluate(lm, config, device)
    assert on_cpu["device"] == "cpu" and here["device"].startswith(device)
    a, b = on_cpu["tasks"], here["tasks"]
    assert b["bpb"]["bpb"] == pytest.approx(a["bpb"]["bpb"], rel=1e-4)
    assert b["verifiable"]["exact_match"] == a["verifiable"]["exact_match"]
    assert b["preference"]["reward_accuracy"] == a["preference"]["reward_accuracy"]
    assert b["reward"]["reward_model_score"] == pytest.approx(a["reward"]["reward_model_score"], abs=1e-4)
    assert math.isfinite(b["kl"]["kl"])  # sampled replies: CUDA's generator draws other numbers than the CPU's
    rm_cpu, rm_here = evaluate(rm, config, "cpu"), evaluate(rm, config, device)
    assert rm_here["tasks"]["reward_model"]["sums"]["margin"] == pytest.approx(
        rm_cpu["tasks"]["reward_model"]["sums"]["margin"], abs=1e-4
    )


def test_a_hub_model_fine_tunes_on_the_device_with_the_default_precision(device, tmp_path, chat_dir, monkeypatch):
    """`init_from=<hub id>` of a Qwen2-layout folder (q/k/v biases, sharded safetensors, a tokenizer.json with its
    ChatML template) from the local Hugging Face cache: SFT trains on the device in the default precision (auto:
    bf16-mixed on a CUDA GPU with bf16), and load_model(device="auto") decodes it there in bf16."""
    from huggingface_hub import constants

    from minillm.generate import load_model
    from minillm.hf_tokenizer import open_tokenizer
    from tests.test_hf_tokenizer import CHATML, hf_tokenizer_folder
    from tests.test_pretrained import as_transformers_saves_it

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    repo = cache / "models--Qwen--Qwen2.5-0.5B-Instruct"
    tok = open_tokenizer(hf_tokenizer_folder(tmp_path / "tok", CHATML))
    torch.manual_seed(0)
    model = MiniGPT(micro_config(tok.vocab_size, attention_bias=True, rope_theta=1e6))
    as_transformers_saves_it(save_pretrained(model, tok, repo / "snapshots" / "abc123"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    overrides = micro_overrides(tmp_path, chat_dir, "init_from=Qwen/Qwen2.5-0.5B-Instruct", stage="sft")
    placement = [o for o in on_device(device) if not o.startswith("trainer.precision")]  # the default: auto
    run = build([o for o in overrides if not o.startswith("model.")] + placement + ["trainer.max_steps=3"])
    bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
    assert run.config.trainer.precision == ("bf16-mixed" if bf16 else "32-true")
    assert run.module.model.config.attention_bias and run.module.model.config.rope_theta == 1e6
    assert run.fit() == 0 and run.module.device.type == device
    losses = train_losses(tmp_path / "run")
    assert losses and all(math.isfinite(x) for x in losses)
    loaded, _ = load_model(str(tmp_path / "run" / "final"), device="auto")
    weight = loaded.lm_head.weight
    assert weight.device.type == device and weight.dtype == (torch.bfloat16 if bf16 else torch.float32)
