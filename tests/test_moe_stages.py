"""A mixture-of-experts model keeps its load-balancing loss in every stage: the loss each stage optimizes carries
the router's balance term (scaled by model.aux_loss_coef as in pretraining), so switching the coefficient off
changes the router's gradient in SFT, DPO, the reward model and RLHF (PPO's policy and critic, GRPO)."""

import pytest
import torch

from minillm.reward_rules import register_reward
from minillm.train import build
from tests.conftest import micro_overrides, pair_overrides

MOE = ("model.n_experts=4", "model.n_experts_per_tok=2")


@register_reward("zero_moe_test")
def zero(completions, completion_ids, **fields):
    return [0.0] * len(completions)


@pytest.fixture(scope="module")
def moe_pretrained(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("moe")
    assert build(micro_overrides(root, data_dir, "trainer.max_steps=1", *MOE)).fit() == 0
    return root / "run" / "final"


def routers(model: torch.nn.Module) -> list[torch.Tensor]:
    return [m.gate.weight for m in model.modules() if hasattr(m, "experts")]


def router_grads(loss_fn, coef: float, *models: torch.nn.Module) -> list[torch.Tensor]:
    """Each model's routers' gradient of the stage's loss with model.aux_loss_coef = coef in every model."""
    for m in models:
        m.zero_grad()
        m.config.aux_loss_coef = coef
    loss_fn().backward()
    return [torch.cat([w.grad.flatten() for w in routers(m)]) for m in models]


def assert_aux_reaches_the_routers(loss_fn, *models):
    without, with_aux = router_grads(loss_fn, 0.0, *models), router_grads(loss_fn, 1.0, *models)
    assert without[0].abs().sum() > 0  # the main loss reaches the policy's router too (through the expert weights)
    for a, b in zip(without, with_aux):  # (a fresh critic's zero head passes its router no main-loss gradient)
        assert (b - a).abs().max() > 1e-6, "the load-balancing loss does not reach the router"


@pytest.mark.parametrize("stage", ["sft", "dpo", "reward"])
def test_supervised_stages_add_the_load_balancing_loss(tmp_path, stage, chat_dir, pref_dir, moe_pretrained):
    if stage == "sft":
        overrides = micro_overrides(tmp_path, chat_dir, f"init_from={moe_pretrained}", *MOE, stage=stage)
    else:
        overrides = pair_overrides(tmp_path, pref_dir, moe_pretrained, *MOE, stage=stage)
    run = build(overrides)
    module = run.module.train()
    batch = next(iter(run.datamodule.train_dataloader()))
    assert routers(module.model)
    assert_aux_reaches_the_routers(lambda: module.training_step(batch, 0), module.model)


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_rlhf_updates_add_the_load_balancing_loss(tmp_path, algorithm, prompt_dir, moe_pretrained):
    overrides = micro_overrides(
        tmp_path,
        prompt_dir,
        f"init_from={moe_pretrained}",
        *MOE,
        f"stage.algorithm={algorithm}",
        "stage.reward=zero_moe_test",
        "stage.max_prompt_length=20",
        "stage.max_completion_length=12",
        stage="rlhf",
    )
    run = build(overrides)
    module = run.module.train()
    batch = next(iter(run.datamodule.train_dataloader()))
    r = module.rollout(batch, module.generation(seed=0))
    r.scores = torch.linspace(-1, 1, len(r.scores))  # distinct scores: a non-zero advantage for every group
    (module._ppo_prepare if algorithm == "ppo" else module._grpo_prepare)(r)
    update = module._ppo_update if algorithm == "ppo" else module._grpo_update
    losses = []
    module._step = lambda loss: losses.append(loss) or {}  # the loss the optimizer would step on (no ptx stats)
    rows = torch.arange(len(r.scores))

    def loss():
        losses.clear()
        update(r, rows)
        return losses[0]

    critic = (module.value,) if algorithm == "ppo" else ()  # PPO: the critic's router too
    assert_aux_reaches_the_routers(loss, module.model, *critic)
