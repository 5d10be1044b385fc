"""LoRA fine-tuning (minillm/lora.py): adapters that start as a no-op, train alone, merge exactly, resume exactly,
serve as their own reference, and export in PEFT's layout."""

import csv
import json
import math
import signal

import pytest
import torch
from safetensors.torch import load_file

from minillm import lora
from minillm.config import compose, to_config
from minillm.generate import load_model
from minillm.model import MiniGPT, RewardModel
from minillm.rundir import ResumeError
from minillm.train import build
from tests.conftest import micro_config, micro_overrides, pair_overrides
from tests.test_rlhf import rlhf
from tests.test_train import SignalAt

LORA = ("model.lora.r=4", "model.lora.alpha=8", "optim.lr=5e-3")


def sft(root, chat_dir, pretrained, *extra):
    return micro_overrides(root, chat_dir, f"init_from={pretrained}", *extra, stage="sft")


def trained_adapters(model: MiniGPT, config: lora.LoRAConfig, seed: int = 1) -> None:
    """Adapters with a non-zero B, as after training."""
    lora.add_adapters(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.adapters(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator) * 0.05)


def test_config_checks_and_the_valid_names():
    cfg = to_config(compose(["stage=sft", "model.lora.r=8", "model.lora.target_modules=[q_proj,v_proj]"]))
    assert (
        cfg.model.lora.r == 8
        and cfg.model.lora.scaling == 16 / 8
        and cfg.model.lora.target_modules
        == [
            "q_proj",
            "v_proj",
        ]
    )
    with pytest.raises(ValueError, match="valid names are q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj"):
        to_config(compose(["stage=sft", "model.lora.r=8", "model.lora.target_modules=[q_proj,qkv]"]))
    with pytest.raises(ValueError, match="lora.r must be >= 0"):
        to_config(compose(["stage=sft", "model.lora.r=-1"]))


def test_a_fresh_adapter_leaves_the_logits_unchanged_and_merging_is_exact(tokenizer):
    torch.manual_seed(0)
    base = MiniGPT(micro_config(tokenizer.vocab_size)).eval()
    ids = torch.randint(0, tokenizer.vocab_size, (2, 12))
    before = base(ids).logits
    model = MiniGPT(micro_config(tokenizer.vocab_size)).eval()
    model.load_state_dict(base.state_dict())
    config = lora.LoRAConfig(r=4, alpha=8)
    lora.add_adapters(model, config)
    assert len(lora.adapters(model)) == 2 * 7  # every target layer of both blocks
    assert torch.equal(model(ids).logits, before)  # B = 0: the adapter adds exactly nothing
    trained_adapters(model, config)
    after = model(ids).logits
    assert (after - before).abs().max() > 1e-3  # the adapters now change the outputs...
    merged = lora.merged(model)
    assert merged.config.lora.r == 0 and not lora.adapters(merged)
    torch.testing.assert_close(merged(ids).logits, after, atol=1e-5, rtol=1e-5)  # ...and merging keeps them
    with lora.adapters_off(model):
        assert torch.equal(model(ids).logits, before)  # the frozen base is untouched
    assert torch.equal(lora.WithoutAdapters(model)(ids).logits, before)


def test_only_adapters_train_and_the_checkpoint_holds_only_them(tmp_path, chat_dir, pretrained):
    run = build(sft(tmp_path, chat_dir, pretrained, *LORA, "trainer.max_steps=4"))
    start = {k: v.clone() for k, v in run.module.state_dict().items()}
    trainable = {n for n, p in run.module.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert run.fit() == 0
    end = run.module.state_dict()
    changed = {k for k in start if not torch.equal(start[k], end[k])}
    assert changed and changed <= trainable  # the base weights never move
    assert any(".lora_B." in k for k in changed)  # B leaves zero: the adapter learned
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert set(ckpt["state_dict"]) == trainable and ckpt["lora"]["r"] == 4
    full = sum(v.numel() for v in start.values())
    assert sum(v.numel() for v in ckpt["state_dict"].values()) < 0.2 * full
    with pytest.raises(ValueError, match="LoRA training checkpoint: it holds the adapters only"):
        load_model(str(tmp_path / "run" / "checkpoints" / "last.ckpt"))


def test_final_holds_the_merged_model_and_a_peft_adapter(tmp_path, chat_dir, pretrained):
    run = build(sft(tmp_path, chat_dir, pretrained, *LORA, "trainer.max_steps=4"))
    assert run.fit() == 0
    final = tmp_path / "run" / "final"
    merged, _ = load_model(str(final))
    assert merged.config.lora.r == 0 and not lora.adapters(merged)
    ids = torch.randint(0, merged.config.vocab_size, (2, 10))
    policy = run.module.model.eval()
    torch.testing.assert_close(merged(ids).logits, policy(ids).logits, atol=1e-5, rtol=1e-5)
    config = json.loads((final / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"]) == (4, 8) and config["base_model_name_or_path"] == str(pretrained)
    tensors = load_file(final / "adapter" / "adapter_model.safetensors")
    assert len(tensors) == 2 * 2 * 7
    a = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"]
    assert a.shape == (4, merged.config.n_embd) and b.shape == (merged.config.n_embd, 4)
    assert torch.equal(b, policy.layers[1].mlp.down_proj.lora_B.weight.detach())


def test_interrupt_then_resume_is_exact(tmp_path, chat_dir, pretrained):
    common = (*LORA, "trainer.max_steps=8", "trainer.val_check_interval=4", "model.lora.dropout=0.1")

    def losses(root):
        with (root / "run" / "logs" / "metrics.csv").open() as f:
            return [(r["step"], r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]

    assert build(sft(tmp_path / "a", chat_dir, pretrained, *common)).fit() == 0
    interrupted = build(sft(tmp_path / "b", chat_dir, pretrained, *common))
    interrupted.trainer.callbacks.append(SignalAt(5))
    assert interrupted.fit() == 128 + signal.SIGTERM
    resumed = build(sft(tmp_path / "b", chat_dir, pretrained, *common, "resume=auto"))
    assert resumed.fit() == 0
    assert losses(tmp_path / "b") == losses(tmp_path / "a")  # bitwise
    a = load_file(tmp_path / "a" / "run" / "final" / "model.safetensors")
    b = load_file(tmp_path / "b" / "run" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_lora_checkpoint_resumed_without_lora_is_a_named_error(tmp_path, chat_dir, pretrained):
    assert build(sft(tmp_path, chat_dir, pretrained, *LORA, "trainer.max_steps=2")).fit() == 0
    again = ("trainer.max_steps=4", "resume=auto", "resume_allow_changes=true")
    with pytest.raises(
        ResumeError, match=r"trained with LoRA adapters \(model.lora.r=4, .*this run has model.lora.r=0"
    ):
        build(sft(tmp_path, chat_dir, pretrained, *again))
    with pytest.raises(ResumeError, match=r"target_modules=.*this run has model.lora.r=4, target_modules=q_proj"):
        build(sft(tmp_path, chat_dir, pretrained, *again, *LORA, "model.lora.target_modules=[q_proj]"))


def test_pretraining_with_lora_is_refused(tmp_path, data_dir):
    with pytest.raises(ValueError, match="set init_from"):
        build(micro_overrides(tmp_path, data_dir, "model.lora.r=4"))


def test_dpo_reference_is_the_base_without_a_second_copy(tmp_path, pref_dir, pretrained):
    run = build(pair_overrides(tmp_path, pref_dir, pretrained, *LORA, "trainer.max_steps=4", stage="dpo"))
    assert isinstance(run.module.reference, lora.WithoutAdapters) and run.module.reference.model is run.module.model
    base, _ = load_model(str(pretrained))
    ids = torch.randint(0, base.config.vocab_size, (2, 10))
    assert run.fit() == 0
    policy = run.module.model.eval()
    torch.testing.assert_close(run.module.reference(ids).logits, base(ids).logits, atol=1e-6, rtol=1e-6)
    assert (policy(ids).logits - base(ids).logits).abs().max() > 1e-4  # the policy moved, the reference did not
    with (tmp_path / "run" / "logs" / "metrics.csv").open() as f:
        first = next(r for r in csv.DictReader(f) if r.get("train/loss"))
    assert float(first["train/loss"]) == pytest.approx(math.log(2), abs=1e-6)  # a fresh adapter: policy == reference


def test_reward_model_trains_adapters_and_its_head(tmp_path, pref_dir, pretrained):
    run = build(pair_overrides(tmp_path, pref_dir, pretrained, *LORA, "trainer.max_steps=4", stage="reward"))
    trainable = {n for n, p in run.module.named_parameters() if p.requires_grad}
    assert "score.weight" in trainable and all(n == "score.weight" or ".lora_" in n for n in trainable)
    assert run.fit() == 0
    from minillm.pretrained import load_reward_model

    reward, _ = load_reward_model(tmp_path / "run" / "final")
    ids = torch.randint(0, reward.config.vocab_size, (2, 10))
    live = run.module.exported_model().eval()
    torch.testing.assert_close(reward(ids), live(ids), atol=1e-5, rtol=1e-5)
    adapter = load_file(tmp_path / "run" / "final" / "adapter" / "adapter_model.safetensors")
    assert torch.equal(adapter["base_model.model.score.weight"], run.module.score.weight.detach())
    with pytest.raises(ValueError, match="likelihood_weight with model.lora"):  # no place for it in an adapter
        build(
            pair_overrides(tmp_path / "lik", pref_dir, pretrained, *LORA, "stage.likelihood_weight=1.0", stage="reward")
        )


def test_ppo_with_lora_trains_policy_and_critic_adapters_only(tmp_path, prompt_dir, pretrained, reward_model):
    run = build(rlhf(tmp_path, prompt_dir, pretrained, *LORA, f"stage.reward_model={reward_model}"))
    assert isinstance(run.module.value, RewardModel) and lora.adapters(run.module.value)
    start = {k: v.clone() for k, v in run.module.state_dict().items()}
    assert run.fit() == 0
    end = run.module.state_dict()
    changed = {k for k in start if not torch.equal(start[k], end[k])}
    assert any(k.startswith("model.") for k in changed) and any(k.startswith("value.") for k in changed)
    assert all(".lora_" in k or k == "value.score.weight" for k in changed)


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory, pref_dir, pretrained):
    root = tmp_path_factory.mktemp("reward_lora")
    assert build(pair_overrides(root, pref_dir, pretrained, "trainer.max_steps=2", stage="reward")).fit() == 0
    return root / "run" / "final"


@pytest.mark.ref
def test_peft_loads_the_adapter_onto_the_transformers_export_of_the_base(tmp_path, chat_dir, pretrained):
    import peft  # the ref venv has it: a missing one fails, never skips
    import transformers

    from minillm.export import main as export

    assert build(sft(tmp_path, chat_dir, pretrained, *LORA, "trainer.max_steps=4")).fit() == 0
    export([f"model_path={pretrained}", f"out={tmp_path / 'base_hf'}"])  # the parent, in the transformers layout
    base = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "base_hf", attn_implementation="eager", dtype=torch.float32
    )
    tuned = peft.PeftModel.from_pretrained(base, tmp_path / "run" / "final" / "adapter").eval()
    merged, tokenizer = load_model(str(tmp_path / "run" / "final"))
    ids = torch.tensor([tokenizer.encode("What is 2 + 3? 你好")])
    with torch.no_grad():
        ours, theirs = merged(ids).logits, tuned(ids).logits
        torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
        with tuned.disable_adapter():  # and the adapter is what makes the difference
            assert (tuned(ids).logits - ours).abs().max() > 1e-3


def test_adapters_on_biased_projections_keep_the_bias_and_merge_exactly(tokenizer):
    """Qwen2's q/k/v have biases: the adapter adds to the biased layer, and merging folds only the weights."""
    from minillm.model import LoRAConfig

    torch.manual_seed(0)
    model = MiniGPT(micro_config(tokenizer.vocab_size, attention_bias=True)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(std=0.5)
    ids = torch.randint(0, tokenizer.vocab_size, (2, 10))
    before = model(ids).logits
    lora.add_adapters(model, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.testing.assert_close(model(ids).logits, before, atol=0, rtol=0)  # B = 0: the biased layer as it was
    with torch.no_grad():
        for layer in lora.adapters(model).values():
            layer.lora_B.weight.normal_(std=0.1)
    adapted = model(ids).logits
    assert not torch.allclose(adapted, before, atol=1e-3)
    plain = lora.merged(model)
    assert plain.layers[0].self_attn.q_proj.bias is not None
    torch.testing.assert_close(plain(ids).logits, adapted, atol=1e-5, rtol=1e-5)
