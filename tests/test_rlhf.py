import csv
import json
import math
import shutil

import pytest
import torch

from minillm.config import RLHFConfig, compose, to_config
from minillm.data.kinds import encode_chat
from minillm.data.records import is_held_out, to_messages
from minillm.generate import load_model
from minillm.reward_rules import register_reward
from minillm.rundir import ResumeError
from minillm.stages.rlhf import Rollout
from minillm.train import build
from tests.conftest import micro_overrides, pair_overrides


@register_reward("zero")
def zero(completions, completion_ids, **fields):
    return [0.0] * len(completions)


@register_reward("none_test")
def none_test(completions, completion_ids, **fields):
    return [None] * len(completions)


@register_reward("quarter_tokens")
def quarter_tokens(completions, completion_ids, **fields):
    """A dense toy reward: the fraction of completion tokens whose id is a multiple of 4 (~1/4 at the start)."""
    return [sum(t % 4 == 0 for t in ids) / max(len(ids), 1) for ids in completion_ids]


@pytest.fixture(scope="session")
def reward_model(tmp_path_factory, pref_dir, pretrained):
    root = tmp_path_factory.mktemp("reward")
    overrides = pair_overrides(root, pref_dir, pretrained, "trainer.max_steps=4", stage="reward")
    assert build(overrides).fit() == 0
    return root / "run" / "final"


def rlhf(root, prompt_dir, pretrained, *extra):
    return micro_overrides(
        root,
        prompt_dir,
        f"init_from={pretrained}",
        "stage.max_prompt_length=20",
        "stage.max_completion_length=12",
        "callbacks.rlhf_monitor.sample_every=0",
        "optim.lr=1e-3",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        *extra,
        stage="rlhf",
    )


def metrics_rows(run_dir):
    with (run_dir / "logs" / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def test_rlhf_schema_run_dirs_and_checks():
    cfg = to_config(compose(["stage=rlhf"]))
    assert isinstance(cfg.stage, RLHFConfig) and cfg.stage.parent == "dpo|sft" and cfg.run_dir == "outputs/rlhf_tiny"
    grpo = to_config(compose(["stage=rlhf", "stage.algorithm=grpo"]))
    assert grpo.run_dir == "outputs/rlhf-grpo_tiny"
    with pytest.raises(ValueError, match="num_generations must be >= 2 for GRPO"):
        to_config(compose(["stage=rlhf", "stage.algorithm=grpo", "stage.num_generations=1"]))
    with pytest.raises(ValueError, match="stage.algorithm"):
        to_config(compose(["stage=rlhf", "stage.algorithm=a2c"]))


def test_grpo_runs_logs_trl_metrics_and_keeps_frozen_models_out(tmp_path, prompt_dir, pretrained):
    run = build(rlhf(tmp_path, prompt_dir, pretrained, "stage.algorithm=grpo", "stage.reward=quarter_tokens"))
    reference = {k: v.clone() for k, v in run.module.reference.state_dict().items()}
    start = {k: v.clone() for k, v in run.module.model.state_dict().items()}
    assert run.fit() == 0
    assert run.trainer.global_step == 4 * 2  # 4 rollouts x (2 epochs x 1 mini-batch) updates
    assert run.module.rollouts == 4
    rows = [r for r in metrics_rows(tmp_path / "run") if r.get("reward")]
    assert len(rows) == 4
    for key in (
        "reward",
        "reward_std",
        "frac_reward_zero_std",
        "kl",
        "entropy",
        "completions/mean_length",
        "clip_ratio/region_mean",
        "rewards/quarter_tokens/mean",
        "train/loss",
    ):
        assert math.isfinite(float(rows[-1][key])), key
    assert float(rows[0]["objective/kl"]) == pytest.approx(0.0, abs=1e-5)  # the first rollout is the reference
    assert all(torch.equal(v, run.module.reference.state_dict()[k]) for k, v in reference.items())
    assert any(not torch.equal(v, run.module.model.state_dict()[k]) for k, v in start.items())
    assert "val/reward" in run.trainer.callback_metrics
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(k.startswith(("model.", "val_")) for k in ckpt["state_dict"])  # no reference, no critic in GRPO
    assert ckpt["rlhf"]["rollouts"] == 4
    model, _ = load_model(str(tmp_path / "run" / "final"))
    assert model.config.n_layer == 2


def test_ppo_with_zero_advantages_and_coefficients_leaves_parameters_unchanged(tmp_path, prompt_dir, pretrained):
    overrides = rlhf(
        tmp_path,
        prompt_dir,
        pretrained,
        "stage.reward=zero",
        "stage.beta=0",
        "stage.vf_coef=0",
        "stage.entropy_coef=0",
        "optim.weight_decay=0",
        "trainer.max_steps=2",
    )
    run = build(overrides)
    before = {k: v.clone() for k, v in run.module.state_dict().items()}
    assert run.fit() == 0
    assert run.trainer.global_step == 2 * 2
    after = run.module.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items() if not k.startswith("val_"))


def with_doubles(root, prompt_dir):
    """A data dir with prompt_dir's prompts and sft/doubles.jsonl (200 conversations) for PPO-ptx."""
    data = root / "data"
    shutil.copytree(prompt_dir / "prompts", data / "prompts")
    (data / "sft").mkdir()
    records = [
        {"conversations": [{"role": "user", "content": f"Double {i}"}, {"role": "assistant", "content": str(2 * i)}]}
        for i in range(200)
    ]
    (data / "sft" / "doubles.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return data, records


def test_ptx_follows_the_sft_loss_of_its_training_conversations(tmp_path, prompt_dir, pretrained):
    """PPO-ptx: with a zero reward, no KL and no value loss the updates leave the weights unchanged (test above);
    with stage.ptx_coef they lower the SFT loss of the stage.ptx_sources conversations. Only the training split is
    read, and a draw's loss is the mean -log p of its assistant tokens."""
    data, records = with_doubles(tmp_path, prompt_dir)
    zero = ("stage.reward=zero", "stage.beta=0", "stage.vf_coef=0", "stage.entropy_coef=0", "optim.weight_decay=0")
    ptx = ("stage.ptx_coef=1.0", "stage.ptx_sources=[doubles]", "stage.ptx_batch_size=8", "trainer.max_steps=3")
    run = build(rlhf(tmp_path, data, pretrained, *zero, *ptx))
    module = run.module
    conversations = [to_messages(r) for r in records]
    val_ratio = run.config.data.val_ratio
    training = [m for m in conversations if not is_held_out(json.dumps(m, ensure_ascii=False), val_ratio)]
    assert 0 < len(training) < len(records)
    expected = [encode_chat(module.tokenizer, m, module.model.config.block_size + 1)[:2] for m in training]
    assert [(r["input_ids"].tolist(), r["labels"].tolist()) for r in module.ptx] == expected

    draw = torch.randint(
        len(expected), (8,), generator=torch.Generator().manual_seed(run.config.seed * 1_000_003 + 7 * 997)
    )
    nll, count = 0.0, 0
    for i in draw.tolist():
        ids, labels = (torch.tensor(x) for x in expected[i])
        logp = torch.log_softmax(module.model(ids[None, :-1]).logits[0].float(), -1)
        targets = labels[1:]
        kept = targets != -100
        nll, count = nll - logp[kept].gather(1, targets[kept][:, None]).sum(), count + int(kept.sum())
    torch.testing.assert_close(module.ptx_loss(7)[0], nll / count)

    def sft_loss() -> float:
        with torch.no_grad():
            return float(sum(module.ptx_loss(update)[0] for update in range(1000, 1010)))

    before = sft_loss()
    drawn, draw = [], module.ptx_loss
    module.ptx_loss = lambda update: drawn.append(update) or draw(update)
    assert run.fit() == 0
    assert drawn == list(range(3 * 2))  # one draw per optimizer step, named by the step (a resume continues it)
    module.ptx_loss = draw
    assert sft_loss() < before - 0.1
    rows = metrics_rows(run.run_dir)
    assert any(row.get("loss/ptx_avg") for row in rows)


def test_ptx_settings_are_checked(tmp_path, prompt_dir, pretrained):
    with pytest.raises(ValueError, match="ptx_sources"):
        to_config(compose(["stage=rlhf", "stage.ptx_coef=0.5"]))
    with pytest.raises(ValueError, match="ptx_coef"):
        to_config(compose(["stage=rlhf", "stage.ptx_coef=-1", "stage.ptx_sources=[a]"]))
    with pytest.raises(FileNotFoundError, match="ptx_sources names 'nowhere'"):
        build(
            rlhf(
                tmp_path, prompt_dir, pretrained, "stage.reward=zero", "stage.ptx_coef=1", "stage.ptx_sources=[nowhere]"
            )
        )


def test_ppo_against_a_reward_model(tmp_path, prompt_dir, pretrained, reward_model):
    run = build(rlhf(tmp_path, prompt_dir, pretrained, f"stage.reward_model={reward_model}"))
    assert run.module.value is not None and run.module.reward_model is not None
    critic = {k: v.clone() for k, v in run.module.value.state_dict().items()}
    rm = run.module.reward_model.state_dict()
    assert all(torch.equal(v, rm[k]) for k, v in critic.items())  # the critic starts as the reward model
    assert run.fit() == 0
    rows = [r for r in metrics_rows(tmp_path / "run") if r.get("objective/scores")]
    for key in (
        "objective/kl",
        "objective/entropy",
        "objective/rlhf_reward",
        "policy/approxkl_avg",
        "policy/clipfrac_avg",
        "loss/policy_avg",
        "loss/value_avg",
        "value/clipfrac_avg",
    ):
        assert math.isfinite(float(rows[-1][key])), key
    assert any(not torch.equal(v, run.module.value.state_dict()[k]) for k, v in critic.items())  # the critic learns
    assert all(torch.equal(v, run.module.reward_model.state_dict()[k]) for k, v in rm.items())  # frozen
    snapshot = json.loads((tmp_path / "run" / "training_config_snapshot.json").read_text())
    assert len(snapshot["config"]["stage"]["reward_model_sha256"]) == 64
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert any(k.startswith("value.") for k in ckpt["state_dict"])  # the critic is trained: it is saved
    assert not any(k.startswith(("reward_model.", "reference.")) for k in ckpt["state_dict"])

    changed = tmp_path / "other_reward"
    shutil.copytree(reward_model, changed)
    from safetensors.torch import load_file, save_file

    tensors = load_file(changed / "model.safetensors")
    tensors["score.weight"] = tensors["score.weight"] + 1
    save_file(tensors, changed / "model.safetensors")
    with pytest.raises(ResumeError, match="reward model"):
        build(rlhf(tmp_path, prompt_dir, pretrained, f"stage.reward_model={changed}", "resume=auto"))


def test_ppo_scores_each_reply_with_the_likelihood_of_its_own_tokens(tmp_path, pref_dir, prompt_dir, pretrained):
    """A reward model with the likelihood term reads, in a rollout, the mean log-likelihood of the completion's
    tokens only (not the prompt's, not the left padding's): the score of each row equals that of the same
    prompt and reply scored alone, unpadded."""
    from minillm.pretrained import load_reward_model

    rm_run = pair_overrides(
        tmp_path / "rm", pref_dir, pretrained, "trainer.max_steps=2", "stage.likelihood_weight=1.0", stage="reward"
    )
    assert build(rm_run).fit() == 0
    rm_dir = tmp_path / "rm" / "run" / "final"
    run = build(
        rlhf(
            tmp_path,
            prompt_dir,
            pretrained,
            f"stage.reward_model={rm_dir}",
            "stage.short_completion_penalty=null",
            "stage.max_prompt_length=24",
            "stage.max_completion_length=8",
        )
    )
    module = run.module
    batch = next(b for b in run.datamodule.train_dataloader() if b["attention_mask"].min() == 0)  # left-padded
    r = module.rollout(batch, module.generation(seed=3), score_only=True)
    rm, _ = load_reward_model(rm_dir)
    for i, completion in enumerate(r.completions):
        prompt = r.ids[i, : r.prompt_len][r.attention[i, : r.prompt_len].bool()]
        row = torch.cat([prompt, torch.tensor(completion, dtype=torch.long)])[None]
        alone = rm.sequence_scores(row, torch.tensor([row.shape[1] - 1]), first=torch.tensor([len(prompt)]))
        assert float(r.scores[i]) == pytest.approx(float(alone), abs=1e-4)


def test_a_missing_reward_model_names_the_command(tmp_path, prompt_dir, pretrained):
    with pytest.raises(FileNotFoundError, match=r"python -m minillm.train stage=reward model=tiny"):
        build(rlhf(tmp_path, prompt_dir, pretrained))
    with pytest.raises(ValueError, match="unknown reward"):
        build(rlhf(tmp_path, prompt_dir, pretrained, "stage.reward=nonsense"))


def test_logging_samples_never_changes_the_loss_curve(tmp_path, prompt_dir, pretrained):
    curves = []
    for every in (0, 1):
        root = tmp_path / f"every{every}"
        run = build(
            rlhf(
                root,
                prompt_dir,
                pretrained,
                "stage.algorithm=grpo",
                "stage.reward=verifiable",
                f"callbacks.rlhf_monitor.sample_every={every}",
                "model.dropout=0.1",
            )
        )
        assert run.fit() == 0
        curves.append([r["train/loss"] for r in metrics_rows(root / "run") if r.get("train/loss")])
    assert len(curves[0]) == 4 and curves[0] == curves[1]


PTX = ("stage.ptx_coef=1.0", "stage.ptx_sources=[doubles]", "stage.ptx_batch_size=4")


@pytest.mark.parametrize(("algorithm", "extra"), [("ppo", ()), ("ppo", PTX), ("grpo", PTX)])
def test_rlhf_resume_is_exact(tmp_path, prompt_dir, pretrained, algorithm, extra):
    """Stopped after 2 rollouts and resumed, the run ends with the weights of an uninterrupted one: with PPO-ptx too
    (its batches are drawn by optimizer step, so a resumed run draws what the uninterrupted one drew)."""
    if extra:
        prompt_dir, _ = with_doubles(tmp_path, prompt_dir)
    base = (f"stage.algorithm={algorithm}", "stage.reward=quarter_tokens", "callbacks.checkpoint.every_n_train_steps=2")
    base += extra
    full = build(rlhf(tmp_path / "full", prompt_dir, pretrained, *base))
    assert full.fit() == 0
    half = build(rlhf(tmp_path / "half", prompt_dir, pretrained, *base, "trainer.max_steps=2"))
    assert half.fit() == 0
    resumed = build(rlhf(tmp_path / "half", prompt_dir, pretrained, *base, "resume=auto", "resume_allow_changes=true"))
    assert resumed.ckpt_path is not None
    assert resumed.fit() == 0
    for k, v in full.module.state_dict().items():
        torch.testing.assert_close(resumed.module.state_dict()[k], v, msg=k)


@pytest.mark.parametrize(
    ("algorithm", "extra", "key"),
    [("grpo", ("data.batch_size=4",), "reward"), ("ppo", ("data.batch_size=16",), "objective/scores")],
)
def test_rl_raises_a_toy_reward(tmp_path, prompt_dir, pretrained, algorithm, extra, key):
    """The micro policy is near uniform over 512 tokens, so ~1/4 of its tokens earn reward at the start."""
    overrides = rlhf(
        tmp_path,
        prompt_dir,
        pretrained,
        f"stage.algorithm={algorithm}",
        "stage.reward=quarter_tokens",
        "stage.beta=0.01",
        "optim.lr=1e-2",
        "optim.warmup_steps=0",
        "trainer.max_steps=25",
        "trainer.val_check_interval=25",
        *extra,
    )
    assert build(overrides).fit() == 0
    rewards = [float(r[key]) for r in metrics_rows(tmp_path / "run") if r.get(key)]
    start, end = sum(rewards[:3]) / 3, sum(rewards[-5:]) / 5
    assert start < 0.4 and end > start + 0.3, rewards


def test_completions_a_rule_cannot_score_stay_out_of_the_update(tmp_path, prompt_dir, pretrained):
    """A rule returning None for every completion (prompts of another task) leaves the policy where it was."""
    run = build(
        rlhf(tmp_path, prompt_dir, pretrained, "stage.algorithm=grpo", "stage.reward=none_test", "trainer.max_steps=2")
    )
    start = {k: v.clone() for k, v in run.module.model.state_dict().items()}
    assert run.fit() == 0
    assert all(torch.equal(v, run.module.model.state_dict()[k]) for k, v in start.items())
    rows = [r for r in metrics_rows(tmp_path / "run") if r.get("frac_unscored")]
    assert float(rows[-1]["frac_unscored"]) == 1.0


def test_alarms_warn_about_kl_and_identical_group_rewards(tmp_path, prompt_dir, pretrained, caplog):
    overrides = rlhf(
        tmp_path,
        prompt_dir,
        pretrained,
        "stage.algorithm=grpo",
        "stage.reward=zero",
        "callbacks.rlhf_monitor.kl_alarm=-1",
        "trainer.max_steps=2",
    )
    with caplog.at_level("WARNING", logger="minillm.callbacks.rlhf_monitor"):
        assert build(overrides).fit() == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("mean KL to the reference" in w for w in warnings)
    assert any("every group got identical rewards" in w for w in warnings)
    assert sum("identical rewards" in w for w in warnings) == 1  # once, not every rollout


def test_bf16_old_log_probs_match_the_update_forward(tmp_path, prompt_dir, pretrained, monkeypatch):
    """Old log-probs (no grad) and the first update's (with grad) go through the same attention path: ratio 1."""
    monkeypatch.setattr("minillm.accelerator.cpu_has_fast_bf16", lambda: True)  # bf16 even on a CPU without native bf16
    overrides = rlhf(
        tmp_path,
        prompt_dir,
        pretrained,
        "stage.reward=quarter_tokens",
        "stage.num_ppo_epochs=1",
        "trainer.max_steps=1",
        "trainer.precision=bf16-mixed",
    )
    run = build(overrides)
    assert run.trainer.precision == "bf16-mixed"
    assert run.fit() == 0
    (row,) = [r for r in metrics_rows(tmp_path / "run") if r.get("value/ratio")]
    assert float(row["value/ratio"]) == 1.0 and float(row["policy/approxkl_avg"]) == 0.0


def test_log_probs_are_those_of_the_sampling_temperature(tmp_path, prompt_dir, pretrained):
    """Completions drawn at temperature 0.7 are scored as π(y|x) = softmax(logits / 0.7): old, reference and
    update log-probs, so the first update's ratio is 1 for the policy that actually sampled."""
    overrides = rlhf(tmp_path, prompt_dir, pretrained, "stage.temperature=0.7", "stage.reward=quarter_tokens")
    run = build(overrides)
    module = run.module
    batch = next(iter(run.datamodule.train_dataloader()))
    r = module.rollout(batch, module.generation(seed=3))
    with torch.no_grad():
        logits = module.model(r.ids, position_ids=r.positions, attention_mask=r.attention).logits
        logits = logits[:, r.prompt_len - 1 : -1].float()
    sampled = torch.log_softmax(logits / 0.7, -1).gather(-1, r.tokens[..., None]).squeeze(-1)
    untempered = torch.log_softmax(logits, -1).gather(-1, r.tokens[..., None]).squeeze(-1)
    mask = r.mask.bool()
    assert mask.sum() > 10
    torch.testing.assert_close(r.old_logps[mask], sampled[mask])
    torch.testing.assert_close(r.ref_logps[mask], sampled[mask])  # the reference is the init policy
    assert (r.old_logps[mask] - untempered[mask]).abs().max() > 1e-2  # the test can tell the two apart
    logps = module._policy(r, slice(None))[0]  # the update's forward (with grad)
    torch.testing.assert_close(logps[mask].detach(), r.old_logps[mask])


@pytest.mark.parametrize(("minimum", "expected"), [(1, [-1.0, 0.0, 0.0]), (2, [-1.0, -1.0, 0.0]), (0, [0.0, 0.0, 0.0])])
def test_short_replies_are_penalised_before_eos(tmp_path, prompt_dir, pretrained, minimum, expected):
    """The reward-hacking guard: a reply with fewer than min_completion_length tokens before its EOS (an empty
    one by default) loses short_completion_penalty; the EOS token itself is not content."""
    overrides = rlhf(tmp_path, prompt_dir, pretrained, "stage.reward=zero", f"stage.min_completion_length={minimum}")
    module = build(overrides).module
    eos = module.tokenizer.im_end_id
    completions = [[eos], [7, eos], [7, 8]]  # empty, one token, two tokens without EOS
    r = Rollout(
        ids=torch.zeros(3, 4, dtype=torch.long),
        attention=torch.ones(3, 4, dtype=torch.long),
        positions=torch.arange(4).repeat(3, 1),
        tokens=torch.zeros(3, 2, dtype=torch.long),
        mask=torch.ones(3, 2, dtype=torch.long),
        ended=torch.tensor([True, True, False]),
        prompt_len=2,
        completions=completions,
        records=[{"prompt": [{"role": "user", "content": "x"}]}] * 3,
    )
    assert module.score(r).tolist() == expected


@pytest.mark.parametrize("stage", ["dpo", "reward", "rlhf"])
def test_debug_shows_each_stage_its_own_batch_and_step(stage, tmp_path, pref_dir, prompt_dir, pretrained, capsys):
    from minillm import debug

    if stage == "rlhf":
        overrides = rlhf(tmp_path, prompt_dir, pretrained, "stage.algorithm=grpo", "stage.reward=quarter_tokens")
    else:
        overrides = pair_overrides(tmp_path, pref_dir, pretrained, stage=stage)
    debug.main(overrides)
    out = capsys.readouterr().out
    if stage == "rlhf":
        assert "prompts, input_ids (" in out and "-- prompt of row 0: '" in out
        assert "-- its record: {" in out and "== one rollout and its updates: " in out and "train/reward" in out
    else:
        assert "pairs, chosen (" in out and "-- prompt + rejected of row 0: " in out
        mask = json.loads(out.split("-- chosen loss mask (1 = scored): ")[1].split("\n")[0])
        assert mask[0] == 0 and 1 in mask  # the prompt is not scored, the completion is
        assert "== one optimizer step: loss" in out
    assert "== generate(" in out and not (tmp_path / "run" / "checkpoints").exists()


def test_debug_says_a_bad_input_in_one_line(tmp_path, pref_dir, capsys):
    from minillm import debug

    with pytest.raises(SystemExit, match=r"^error: .*init_from"):
        debug.main(pair_overrides(tmp_path, pref_dir, tmp_path / "no_such_model", stage="dpo"))
