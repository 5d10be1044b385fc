import math

import pytest
import torch

from minillm.losses import IGNORE_INDEX, dpo_loss, lm_loss, sequence_logprobs


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


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    pc, pr = torch.tensor([-4.0], requires_grad=True), torch.tensor([-4.0], requires_grad=True)
    loss, _ = dpo_loss(pc, pr, torch.tensor([-4.0]), torch.tensor([-4.0]))
    loss.backward()
    assert pc.grad.item() < 0 < pr.grad.item()  # descent raises log π(chosen), lowers log π(rejected)


def test_unknown_dpo_loss_type_is_named():
    with pytest.raises(ValueError, match="stage.loss_type must be one of"):
        dpo_loss(*logps(0.0, 0.0, 0.0, 0.0), loss_type="kto")
