import math

import pytest
import torch

from minillm.losses import (
    IGNORE_INDEX,
    bt_loss,
    dpo_loss,
    gae,
    group_advantages,
    grpo_loss,
    kl_k3,
    lm_loss,
    ppo_policy_loss,
    ppo_value_loss,
    sequence_logprobs,
    whiten,
)


def test_lm_loss_ignores_masked_targets():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    targets = torch.randint(0, 7, (2, 5))
    masked = targets.clone()
    masked[:, :2] = IGNORE_INDEX
    other = logits.clone()
    other[:, :2] += 100 * torch.randn(2, 2, 7)  # the masked positions' logits do not move the loss
    assert torch.equal(lm_loss(logits, masked), lm_loss(other, masked))
    by_hand = -torch.log_softmax(logits[:, 2:], -1).gather(-1, targets[:, 2:, None]).mean()
    torch.testing.assert_close(lm_loss(logits, masked), by_hand)


def test_sequence_logprobs_sums_only_labelled_tokens():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]]))
    labels = torch.tensor([[0, IGNORE_INDEX, 2]])
    torch.testing.assert_close(sequence_logprobs(logits, labels), torch.tensor([math.log(0.5) + math.log(0.6)]))


def logps(pc, pr, rc, rr):
    return [torch.tensor([x]) for x in (pc, pr, rc, rr)]


def test_dpo_is_ln2_with_zero_margins_when_policy_equals_reference():
    loss, m = dpo_loss(*logps(-3.0, -5.0, -3.0, -5.0), beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert m["rewards/margins"].item() == 0 and m["rewards/accuracies"].item() == 0


@pytest.mark.parametrize(
    "loss_type, smoothing, expected",
    [
        # h = (-2 - -6) - (-3 - -5) = 2, beta = 0.5 -> beta*h = 1
        ("sigmoid", 0.0, -math.log(1 / (1 + math.exp(-1)))),
        ("sigmoid", 0.2, -0.8 * math.log(1 / (1 + math.exp(-1))) - 0.2 * math.log(1 / (1 + math.exp(1)))),
        ("ipo", 0.0, (2 - 1 / (2 * 0.5)) ** 2),
        ("hinge", 0.0, max(0.0, 1 - 1.0)),
    ],
)
def test_dpo_loss_types_match_hand_computed_values(loss_type, smoothing, expected):
    loss, m = dpo_loss(*logps(-2.0, -6.0, -3.0, -5.0), beta=0.5, loss_type=loss_type, label_smoothing=smoothing)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert m["rewards/chosen"].item() == pytest.approx(0.5 * (-2 + 3))
    assert m["rewards/rejected"].item() == pytest.approx(0.5 * (-6 + 5))
    assert m["rewards/margins"].item() == pytest.approx(1.0) and m["rewards/accuracies"].item() == 1.0
    assert (m["logps/chosen"].item(), m["logps/rejected"].item()) == (-2.0, -6.0)


def test_hinge_dpo_off_its_kink_scales_the_margin_by_beta():
    """h = (-2 + 6) - (-3 + 5) = 2: with β = 0.2 the hinge is 1 - 0.4 = 0.6 (a loss without β would be 0); with
    β = 0.05 it is 0.9, and its gradient moves the policy's log-probs by β per unit."""
    for beta, expected in ((0.2, 0.6), (0.05, 0.9)):
        loss, _ = dpo_loss(*logps(-2.0, -6.0, -3.0, -5.0), beta=beta, loss_type="hinge")
        assert loss.item() == pytest.approx(expected, rel=1e-6)
    pc, pr = torch.tensor([-2.0], requires_grad=True), torch.tensor([-6.0], requires_grad=True)
    dpo_loss(pc, pr, torch.tensor([-3.0]), torch.tensor([-5.0]), beta=0.2, loss_type="hinge")[0].backward()
    assert (pc.grad.item(), pr.grad.item()) == pytest.approx((-0.2, 0.2))


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    pc, pr = torch.tensor([-4.0], requires_grad=True), torch.tensor([-4.0], requires_grad=True)
    loss, _ = dpo_loss(pc, pr, torch.tensor([-4.0]), torch.tensor([-4.0]))
    loss.backward()
    assert pc.grad.item() < 0 < pr.grad.item()  # descent raises log π(chosen), lowers log π(rejected)


def test_unknown_dpo_loss_type_is_named():
    with pytest.raises(ValueError, match="stage.loss_type must be one of"):
        dpo_loss(*logps(0.0, 0.0, 0.0, 0.0), loss_type="kto")


def test_bradley_terry_loss_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])  # margins +1 and -1
    loss, stats = bt_loss(chosen, rejected)
    expected = (math.log1p(math.exp(-1)) + math.log1p(math.exp(1))) / 2  # -log σ(1), -log σ(-1)
    assert float(loss) == pytest.approx(expected) and float(loss) == pytest.approx(0.813262, abs=1e-6)
    assert float(stats["accuracy"]) == 0.5 and float(stats["margin"]) == 0.0
    centered, _ = bt_loss(chosen, rejected, center_coef=0.1)  # + 0.1 * mean(3², 1²)
    assert float(centered) == pytest.approx(expected + 0.5)


def test_gae_on_a_four_step_example_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0], [0.0, 1.0, 5.0, 5.0]])
    values = torch.tensor([[0.5, 0.6, 0.7, 0.8], [0.5, 0.6, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])  # row 2 ends after two tokens: the rest is padding
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # row 1: δ3 = 1 - .8 = .2; δ2 = .9*.8 - .7 = .02; δ1 = .9*.7 - .6 = .03; δ0 = .9*.6 - .5 = .04
    # and A_t = δ_t + .45 A_t+1
    torch.testing.assert_close(advantages[0], torch.tensor([0.075775, 0.0795, 0.11, 0.2]))
    torch.testing.assert_close(returns[0], torch.tensor([0.575775, 0.6795, 0.81, 1.0]))
    # row 2: δ1 = 1 - .6 = .4 (nothing after the end); δ0 = .04; A0 = .04 + .45 * .4
    torch.testing.assert_close(advantages[1], torch.tensor([0.22, 0.4, 0.0, 0.0]))


def test_clipped_policy_loss_by_hand():
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios
    advantages = torch.tensor([[1.0, 1.0, -1.0]])
    loss, stats = ppo_policy_loss(new, old, advantages, torch.ones(1, 3), clip=0.2)
    # max(-A ρ, -A clip(ρ)): 1.5 -> max(-1.5, -1.2) = -1.2 (clipped); 0.5 -> max(-.5, -.8) = -.5; 1.1 -> 1.1
    assert float(loss) == pytest.approx((-1.2 - 0.5 + 1.1) / 3)
    assert float(stats["clipfrac"]) == pytest.approx(1 / 3)
    assert float(stats["approxkl"]) == pytest.approx(0.5 * float((new**2).mean()))
    masked, _ = ppo_policy_loss(new, old, advantages, torch.tensor([[1, 1, 0]]), clip=0.2)
    assert float(masked) == pytest.approx((-1.2 - 0.5) / 2)


def test_clipped_value_loss_by_hand():
    values, old, returns = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5]]), torch.tensor([[2.0, 0.0]])
    loss, stats = ppo_value_loss(values, old, returns, torch.ones(1, 2), clip=0.2)
    # clipped values .7 and .3: max((1-2)², (.7-2)²) = 1.69, max(0, .3²) = .09
    assert float(loss) == pytest.approx(0.5 * (1.69 + 0.09) / 2)
    assert float(stats["clipfrac"]) == 1.0


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    group_std = math.sqrt(1 / 3)  # unbiased std of (1, 0, 0, 1)
    signs = torch.tensor([1.0, -1.0, -1.0, 1.0])
    group = group_advantages(rewards, 4, "group")
    torch.testing.assert_close(group[:4], 0.5 * signs / (group_std + 1e-4))
    assert torch.equal(group[4:], torch.zeros(4))  # a group of equal rewards teaches nothing
    torch.testing.assert_close(group_advantages(rewards, 4, "none")[:4], 0.5 * signs)
    batch_std = math.sqrt(5.5 / 7)  # unbiased std of all eight rewards (mean 1.25)
    torch.testing.assert_close(group_advantages(rewards, 4, "batch")[:4], 0.5 * signs / (batch_std + 1e-4))
    with pytest.raises(ValueError, match="stage.scale_rewards"):
        group_advantages(rewards, 4, "sometimes")


@pytest.mark.parametrize(("loss_type", "expected"), [("grpo", 0.5), ("dapo", -0.25), ("dr_grpo", -0.125)])
def test_grpo_loss_aggregations_by_hand(loss_type, expected):
    logps = torch.zeros(2, 3)  # ratio 1 everywhere: each token's loss is -A
    advantages = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    loss, stats = grpo_loss(
        logps, logps, None, advantages, mask, beta=0.0, loss_type=loss_type, max_completion_length=4
    )
    # row losses: -1, -1, -1 and +2. grpo: mean(-1, 2) = .5; dapo: (-3 + 2) / 4; dr_grpo: (-3 + 2) / (2 * 4)
    assert float(loss) == pytest.approx(expected)
    assert float(stats["clip_ratio/region_mean"]) == 0.0


def test_grpo_kl_term_and_clipping():
    assert float(kl_k3(torch.tensor(math.log(0.5)), torch.tensor(math.log(0.25)))) == pytest.approx(
        0.5 + math.log(0.5) * -1 - 1
    )
    assert float(kl_k3(torch.tensor(-1.3), torch.tensor(-1.3))) == 0.0
    logps = torch.log(torch.tensor([[1.5, 0.5]]))  # ratios against old = 0
    ref = torch.zeros(1, 2)
    loss, stats = grpo_loss(
        logps, torch.zeros(1, 2), ref, torch.tensor([1.0]), torch.ones(1, 2), beta=0.1, loss_type="grpo"
    )
    kl = kl_k3(logps, ref)
    expected = ((-1.2 + 0.1 * kl[0, 0]) + (-0.5 + 0.1 * kl[0, 1])) / 2  # min(ρA, clip(ρ)A) with A = 1
    assert float(loss) == pytest.approx(float(expected))
    assert float(stats["clip_ratio/high_mean"]) == 0.5 and float(stats["clip_ratio/low_mean"]) == 0.0
    assert float(stats["kl"]) == pytest.approx(float(kl.mean()))


def test_whiten_gives_zero_mean_unit_variance_on_the_mask():
    torch.manual_seed(0)
    x, mask = torch.randn(3, 5) * 4 + 2, torch.tensor([[1, 1, 1, 1, 0]] * 3)
    w = whiten(x, mask)
    kept = w[mask.bool()]
    assert float(kept.mean()) == pytest.approx(0.0, abs=1e-6) and float(kept.std()) == pytest.approx(1.0, abs=1e-4)
    assert torch.equal(w[:, 4], torch.zeros(3))
