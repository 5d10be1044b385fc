import json

import pytest
import torch

from minillm.config import RewardConfig, compose, to_config
from minillm.generate import load_model
from minillm.model import RewardModel, first_token_index, last_token_index
from minillm.pretrained import load_reward_model, save_pretrained
from minillm.rundir import ResumeError
from minillm.train import build
from tests.conftest import micro_config, pair_overrides


def reward(root, pref_dir, pretrained, *extra):
    return pair_overrides(root, pref_dir, pretrained, *extra, stage="reward")


def test_reward_schema_and_parent():
    cfg = to_config(compose(["stage=reward"]))
    assert isinstance(cfg.stage, RewardConfig) and cfg.stage.parent == "sft"
    with pytest.raises(ValueError, match="center_rewards_coefficient"):
        to_config(compose(["stage=reward", "stage.center_rewards_coefficient=-1"]))
    assert cfg.stage.likelihood_weight is None  # the head alone unless a recipe asks
    with pytest.raises(ValueError, match="likelihood_weight"):
        to_config(compose(["stage=reward", "stage.likelihood_weight=nan"]))


def test_reward_is_read_at_each_rows_last_real_token(tokenizer):
    torch.manual_seed(0)
    model = RewardModel(micro_config(tokenizer.vocab_size)).eval()
    ids = torch.randint(6, 100, (2, 7))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [6, 2]
    scores = model(ids)
    alone = model(ids[1:, :3])  # right padding cannot change earlier positions under causal attention
    torch.testing.assert_close(scores[1, 2], alone[0, 2])


def test_the_likelihood_term_is_the_weighted_mean_log_prob_of_each_completion(tokenizer):
    torch.manual_seed(0)
    model = RewardModel(micro_config(tokenizer.vocab_size), likelihood_weight=0.7).eval()
    ids = torch.randint(6, 100, (2, 9))
    first, last = torch.tensor([4, 6]), torch.tensor([8, 7])  # row 1: right padding after position 7
    logits = model.model(ids).logits.float()  # the trunk as a language model
    expected = []
    for row in range(2):
        logps = [
            torch.log_softmax(logits[row, t - 1], -1)[ids[row, t]] for t in range(int(first[row]), int(last[row]) + 1)
        ]
        head = model(ids)[row, last[row]]
        expected.append(head + 0.7 * sum(logps) / len(logps))
    torch.testing.assert_close(model.sequence_scores(ids, last, first=first), torch.stack(expected))
    with pytest.raises(ValueError, match="first"):
        model.sequence_scores(ids, last)
    assert first_token_index(torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0]])).tolist() == [2, 4]


def test_a_reward_model_with_the_likelihood_term_learns_it_and_keeps_it(tmp_path, pref_dir, pretrained):
    run = build(reward(tmp_path, pref_dir, pretrained, "trainer.max_steps=6", "stage.likelihood_weight=0.5"))
    assert run.fit() == 0
    learned = float(run.module.likelihood_weight.detach())
    assert learned != 0.5  # a parameter, trained with the head
    final = tmp_path / "run" / "final"
    for source in (final, tmp_path / "run" / "checkpoints" / "last.ckpt"):
        loaded, _ = load_reward_model(source)
        assert float(loaded.likelihood_weight) == pytest.approx(learned)
    batch = next(iter(run.datamodule.val_dataloader()))
    chosen, _, _ = run.module.eval().rewards(batch)
    completion = batch["chosen_labels"] != -100
    first, last = first_token_index(completion), last_token_index(completion)
    scores = load_reward_model(final)[0].sequence_scores(batch["chosen_ids"], last, first=first)
    torch.testing.assert_close(scores, chosen, atol=1e-5, rtol=1e-5)
    head_only = load_reward_model(final)[0]
    head_only.likelihood_weight = None
    assert not torch.allclose(head_only.sequence_scores(batch["chosen_ids"], last), chosen)  # the term counts
    without = reward(tmp_path, pref_dir, pretrained, "trainer.max_steps=8", "resume=auto", "resume_allow_changes=true")
    with pytest.raises(ResumeError, match="trained with stage.likelihood_weight, this run is without one"):
        build(without)  # its checkpoint holds a tensor this run does not have: a named error, not a key mismatch


def test_reward_model_learns_held_out_preferences_and_exports(tmp_path, pref_dir, pretrained):
    overrides = reward(
        tmp_path,
        pref_dir,
        pretrained,
        "trainer.max_steps=30",
        "trainer.val_check_interval=30",
        "optim.lr=1e-3",
        "data.val_ratio=0.2",
        "trainer.limit_val_batches=null",
    )
    run = build(overrides)
    start = {k: v.clone() for k, v in run.module.model.state_dict().items()}
    assert run.fit() == 0
    metrics = run.trainer.callback_metrics
    # held-out pairs; an untrained head scores ln 2 = 0.69 and accuracy 0.5. The greeting pairs are easy,
    # the arithmetic ones are beyond a micro model: the loss falls far, the accuracy only part way.
    assert float(metrics["val/loss"]) < 0.55
    assert float(metrics["val/accuracy"]) > 0.6 and float(metrics["val/margin"]) > 0.5
    assert any(not torch.equal(v, run.module.model.state_dict()[k]) for k, v in start.items())  # the trunk learns
    final = tmp_path / "run" / "final"
    assert json.loads((final / "minillm.json").read_text())["kind"] == "reward"
    hf = json.loads((final / "config.json").read_text())
    assert hf["architectures"] == ["LlamaForSequenceClassification"] and hf["num_labels"] == 1
    loaded, tokenizer = load_reward_model(final)
    batch = next(iter(run.datamodule.val_dataloader()))
    chosen, _, _ = run.module.eval().rewards(batch)
    ids = batch["chosen_ids"]
    end = last_token_index(batch["chosen_labels"] != -100)
    torch.testing.assert_close(loaded(ids).gather(1, end[:, None]).squeeze(1), chosen, atol=1e-5, rtol=1e-5)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert "score.weight" in ckpt["state_dict"]
    assert load_reward_model(tmp_path / "run" / "checkpoints" / "last.ckpt")[0].score.weight.shape == (1, 64)
    trunk, _ = load_model(str(final))  # the trunk alone opens as a language model
    assert trunk.config.n_layer == 2


def test_a_language_model_is_not_a_reward_model(tmp_path, tokenizer):
    folder = save_pretrained(RewardModel(micro_config(tokenizer.vocab_size)).model, tokenizer, tmp_path / "lm")
    with pytest.raises(ValueError, match="not a reward model.*stage=reward"):
        load_reward_model(folder)


@pytest.mark.parametrize("likelihood_weight", [None, 3.0])
def test_eval_pairwise_accuracy_matches_the_scores(tokenizer, likelihood_weight):
    from minillm.data.kinds import encode_pair
    from minillm.evaluation import pairwise_accuracy
    from minillm.tokenizer import apply_chat_template

    torch.manual_seed(1)
    model = RewardModel(micro_config(tokenizer.vocab_size), likelihood_weight=likelihood_weight).eval()
    pairs = [
        {"prompt": f"What is {i} + 1?", "chosen": str(i + 1), "rejected": f"no idea {i}", "task": "ab"[i % 2]}
        for i in range(6)
    ]
    expected = []
    for p in pairs:
        enc = encode_pair(tokenizer, {**p, "prompt": [{"role": "user", "content": p["prompt"]}]}, (32, 32))
        user = [{"role": "user", "content": p["prompt"]}]
        prompt = len(apply_chat_template(tokenizer, user, add_generation_prompt=True).ids)
        chosen, rejected = (
            model.sequence_scores(
                torch.tensor([enc[f"{s}_ids"]]), torch.tensor([len(enc[f"{s}_ids"]) - 1]), first=torch.tensor([prompt])
            )[0]
            for s in ("chosen", "rejected")
        )
        expected.append(float(chosen > rejected))
    result = pairwise_accuracy(model, tokenizer, pairs, batch_size=4)
    assert result["n"] == 6 and result["accuracy"] == pytest.approx(sum(expected) / 6)
    for i, task in enumerate("ab"):  # per task: the pairs of that task only
        assert result["tasks"][task] == {"n": 3, "accuracy": pytest.approx(sum(expected[i::2]) / 3)}


def test_eval_mean_reward_of_greedy_completions(tokenizer, micro_model):
    from minillm.evaluation import mean_reward
    from minillm.generate import GenerationConfig, generate

    records = [{"prompt": "What is 1 + 1?", "answer": "2"}, {"prompt": "Hello", "answer": "x"}]
    replies = generate(
        micro_model,
        tokenizer,
        [[{"role": "user", "content": r["prompt"]}] for r in records],
        GenerationConfig(do_sample=False, max_new_tokens=8),
    )
    records[1]["answer"] = replies[1]  # the second reply is right by construction
    result = mean_reward(micro_model, tokenizer, records, "exact_match", max_new_tokens=8)
    assert result["n"] == 2 and result["mean_reward"] == pytest.approx((replies[0].strip() == "2") / 2 + 0.5)
