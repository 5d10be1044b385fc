import json
import math

import pytest
import torch

from minillm import eval as eval_cli
from minillm import evaluation as ev
from minillm.model import MiniGPT, RewardModel
from minillm.pretrained import save_pretrained
from tests.conftest import micro_config


def uniform_model(vocab_size: int) -> MiniGPT:
    """All weights zero: every logit is 0, every next-token distribution uniform."""
    model = MiniGPT(micro_config(vocab_size))
    for p in model.parameters():
        torch.nn.init.zeros_(p)
    return model.eval()


def test_bits_per_byte_by_hand(tokenizer):
    model = uniform_model(tokenizer.vocab_size)
    texts = ["To be, or not to be", "你好，世界！ " * 30]  # the second is longer than one 64-token window
    result = ev.bits_per_byte(model, tokenizer, texts)
    n_tokens = sum(len(tokenizer.encode(t)) for t in texts)  # each token predicted once (after </s>)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert result["tokens"] == n_tokens and result["bytes"] == n_bytes
    assert result["loss"] == pytest.approx(math.log(tokenizer.vocab_size), rel=1e-5)  # uniform: ln V per token
    assert result["bpb"] == pytest.approx(n_tokens * math.log2(tokenizer.vocab_size) / n_bytes, rel=1e-5)


def test_distinct_n_by_hand():
    assert ev.distinct_n([[1, 2, 1, 2]], 1) == 0.5
    assert ev.distinct_n([[1, 2, 1, 2]], 2) == pytest.approx(2 / 3)
    assert ev.distinct_n([[1, 2, 3], [4]], 2) == 1.0
    assert ev.distinct_n([[1]], 2) == 0.0


def test_degenerate_replies_by_hand():
    assert ev.is_degenerate([7, 1, 1, 1, 1]) and not ev.is_degenerate([7, 1, 1, 1, 2])  # a token 4 times in a row
    assert ev.is_degenerate([5, 1, 2, 1, 2, 1, 2, 1, 2])  # "I't't't't": a bigram 4 times
    assert not ev.is_degenerate([5, 1, 2, 1, 2, 1, 2, 1, 3]) and not ev.is_degenerate([])
    assert not ev.is_degenerate([1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3])  # longer cycles are distinct-2's to catch


def test_preference_accuracy_by_hand():
    policy = torch.tensor([[-1.0, -2.0], [-3.0, -1.0]])  # margins +1, -2
    assert ev.preference_accuracy(policy) == {"n": 2, "accuracy": 0.5, "margin": -0.5}
    reference = torch.tensor([[-1.0, -3.0], [-3.0, -2.0]])  # margins +2, -1: the policy gained -1 on both
    relative = ev.preference_accuracy(policy, reference)
    assert relative["accuracy"] == 0.5 and relative["reward_accuracy"] == 0.0 and relative["reward_margin"] == -1.0


def test_preference_accuracy_per_task_by_hand():
    policy = torch.tensor([[-1.0, -2.0], [-3.0, -1.0], [-2.0, -4.0]])  # margins +1, -2, +2
    reference = torch.tensor([[-1.0, -1.0], [-1.0, -1.0], [-1.0, -5.0]])  # margins 0, 0, +4
    pairs = [{"task": "cut"}, {"task": "other"}, {"task": "other"}]
    out = ev.preference_by_task(policy, reference, pairs)
    assert out["accuracy"] == pytest.approx(2 / 3) and out["reward_accuracy"] == pytest.approx(1 / 3)
    assert out["tasks"]["cut"] == {"n": 1, "accuracy": 1.0, "margin": 1.0, "reward_accuracy": 1.0, "reward_margin": 1.0}
    other = out["tasks"]["other"]  # gains over the reference: -2 and -2
    assert other["n"] == 2 and other["accuracy"] == 0.5 and other["reward_accuracy"] == 0.0
    assert other["reward_margin"] == pytest.approx(-2.0)
    assert "tasks" not in ev.preference_by_task(policy, None, [{}, {}, {}])  # pairs without a task: no breakdown


def test_kl_to_the_reference_by_hand(tokenizer):
    torch.manual_seed(0)
    sharp = MiniGPT(micro_config(tokenizer.vocab_size)).eval()
    with torch.no_grad():
        sharp.lm_head.weight.mul_(300.0)  # near-deterministic: log π(y_t) ≈ 0 for the tokens it samples
    uniform = uniform_model(tokenizer.vocab_size)  # log π_ref(y_t) = -ln V
    prompts = [{"prompt": f"What is {i} + 1?"} for i in range(4)]
    assert ev.kl_to_reference(sharp, sharp, tokenizer, prompts, max_new_tokens=6)["kl"] == 0.0
    result = ev.kl_to_reference(sharp, uniform, tokenizer, prompts, max_new_tokens=6)
    assert result["n"] == 4 and result["mean_length"] > 0
    assert result["kl"] == pytest.approx(result["mean_length"] * math.log(tokenizer.vocab_size), rel=0.02)


def test_eval_json_has_every_field(tmp_path, tokenizer, eval_data, capsys):
    torch.manual_seed(0)
    folder = save_pretrained(MiniGPT(micro_config(tokenizer.vocab_size)), tokenizer, tmp_path / "m")
    eval_cli.main(
        [
            f"model_path={folder}",
            f"eval.data_dir={eval_data}",
            "eval.pairs=[sums]",
            "eval.max_new_tokens=4",
            "eval.limit=50",
            "device=cpu",
        ]
    )
    result = json.loads((folder / "eval.json").read_text())
    tasks = result["tasks"]
    assert set(tasks) == {"bpb", "verifiable", "preference", "reward", "samples"} and result["kind"] == "lm"
    assert result["device"] == "cpu" and "device" not in result["config"]  # a cache key of settings only
    assert tasks["bpb"]["documents"] > 0 and tasks["bpb"]["bpb"] > 0 and tasks["bpb"]["loss"] > 0
    assert tasks["verifiable"]["n"] == 5 and 0 <= tasks["verifiable"]["exact_match"] <= 1
    assert tasks["verifiable"]["tasks"]["add"] == {"n": 5, "exact_match": tasks["verifiable"]["exact_match"]}
    assert tasks["preference"]["n"] == 4 and set(tasks["preference"]["files"]) == {"sums"}
    assert tasks["reward"]["n"] == 5 and tasks["reward"]["reward"] == "verifiable"
    assert 0 <= tasks["reward"]["median_length"] <= 4 and 0 <= tasks["reward"]["empty_fraction"] <= 1
    assert "kl" not in tasks  # the KL needs eval.reference
    assert len(tasks["samples"]["samples"]) == len(ev.SAMPLE_PROMPTS) and 0 <= tasks["samples"]["distinct_2"] <= 1
    out = capsys.readouterr().out
    assert "bpb" in out and "exact match" in out and "eval.json" in out

    # other settings never overwrite an eval.json made with these (the report's cache): they go beside it
    before = (folder / "eval.json").read_bytes()
    eval_cli.main([f"model_path={folder}", f"eval.data_dir={eval_data}", "eval.tasks=[bpb]", "eval.limit=7"])
    (other,) = folder.glob("eval-*.json")
    assert (folder / "eval.json").read_bytes() == before and f"wrote {other}" in capsys.readouterr().out
    assert json.loads(other.read_text())["config"]["limit"] == 7
    same = [f"model_path={folder}", f"eval.data_dir={eval_data}", "eval.pairs=[sums]", "eval.max_new_tokens=4"]
    eval_cli.main([*same, "eval.limit=50"])  # the same settings as eval.json's: it is rewritten in place
    assert f"wrote {folder / 'eval.json'}" in capsys.readouterr().out and len(list(folder.glob("eval*.json"))) == 2

    reward = save_pretrained(RewardModel(micro_config(tokenizer.vocab_size)), tokenizer, tmp_path / "rm")
    eval_cli.main([f"model_path={reward}", f"eval.data_dir={eval_data}", "eval.pairs=[sums]"])
    result = json.loads((reward / "eval.json").read_text())
    assert result["kind"] == "reward" and result["tasks"]["reward_model"]["sums"]["n"] == 4
    with pytest.raises(SystemExit, match=r"is a reward model: .* not by eval.tasks=\['verifiable'\]"):
        eval_cli.main([f"model_path={reward}", f"eval.data_dir={eval_data}", "eval.tasks=[verifiable]"])


def test_eval_cli_names_bad_settings(tmp_path, tokenizer, eval_data):
    folder = save_pretrained(MiniGPT(micro_config(tokenizer.vocab_size)), tokenizer, tmp_path / "m")
    with pytest.raises(SystemExit, match="eval.tasks: unknown \\['perplexity'\\]"):
        eval_cli.main([f"model_path={folder}", "eval.tasks=[perplexity]"])
    with pytest.raises(SystemExit, match="limt"):
        eval_cli.main([f"model_path={folder}", "eval.limt=3"])
    with pytest.raises(SystemExit, match="no evaluation set"):
        eval_cli.main([f"model_path={folder}", f"eval.data_dir={tmp_path}", "eval.tasks=[verifiable]"])


def test_report_tabulates_each_stage_against_its_start_and_draws_a_chart(tmp_path, tokenizer, eval_data, capsys):
    from minillm import report

    out = tmp_path / "outputs"
    torch.manual_seed(0)
    with (eval_data / "eval" / "rephrased.jsonl").open("w") as f:  # GRPO's family: other questions
        for i in range(3):
            msgs = [{"role": "user", "content": f"Add {i} and 2."}, {"role": "assistant", "content": str(i + 2)}]
            f.write(json.dumps({"conversations": msgs, "answer": str(i + 2), "task": "add"}) + "\n")
    stages = (("pretrain", None), ("sft", "pretrain"), ("dpo", "sft"), ("rlhf", "dpo"), ("rlhf-grpo", "dpo"))
    for stage, parent in stages:
        save_pretrained(MiniGPT(micro_config(tokenizer.vocab_size)), tokenizer, out / f"{stage}_micro" / "final")
        init = str(out / f"{parent}_micro" / "final") if parent else None
        snapshot = {"config": {"init_from": init}}
        (out / f"{stage}_micro" / "training_config_snapshot.json").write_text(json.dumps(snapshot))
    save_pretrained(RewardModel(micro_config(tokenizer.vocab_size)), tokenizer, out / "reward_micro" / "final")
    args = ["model_name=micro", f"out_dir={out}", f"eval.data_dir={eval_data}", "eval.pairs=[sums]"]
    args += ["eval.max_new_tokens=4", "grpo_family=rephrased"]
    report.main(args)
    text = (out / "report.md").read_text()
    rows = {}  # the first table: stage -> its row
    for line in text.splitlines():
        if line.startswith("| "):
            rows.setdefault(line.split(" | ")[0].strip("| "), line)
    sft = json.loads((out / "sft_micro" / "final" / "eval.json").read_text())["tasks"]
    pre = json.loads((out / "pretrain_micro" / "final" / "eval.json").read_text())["tasks"]
    gain = sft["verifiable"]["exact_match"] - pre["verifiable"]["exact_match"]
    assert f"| exact match {sft['verifiable']['exact_match']:.3f} ({gain:+.3f} vs pretrain) |" in rows["sft"]
    dpo = json.loads((out / "dpo_micro" / "final" / "eval.json").read_text())
    assert dpo["config"]["reference"] == str(out / "sft_micro" / "final")  # DPO's reward accuracy: vs its start
    assert f"| reward accuracy {dpo['tasks']['preference']['reward_accuracy']:.3f} vs sft;" in rows["dpo"]
    rlhf = json.loads((out / "rlhf_micro" / "final" / "eval.json").read_text())["tasks"]
    assert rlhf["kl"]["reference"] == str(out / "dpo_micro" / "final") and f"KL {rlhf['kl']['kl']:.2f}" in rows["rlhf"]
    assert "reward-model score" in rows["rlhf"] and "median length" in rows["rlhf"]
    assert "pairwise accuracy ≥" in rows["reward"]
    rm = json.loads((out / "reward_micro" / "final" / "eval.json").read_text())["tasks"]["reward_model"]
    dpo_sums = dpo["tasks"]["preference"]["files"]["sums"]["reward_accuracy"]
    assert "| stage | metric | sums |" in text  # no dataset_stats.json: every family counts as trained on
    assert f"| dpo | reward accuracy vs sft | {dpo_sums:.3f}* |" in text
    assert f"| reward | pairwise accuracy | {rm['sums']['accuracy']:.3f}* |" in text
    assert "| stage | add |" in text  # exact match per task
    # GRPO: exact match, KL and length on its own family, against its start asked the same questions
    grpo = json.loads((out / "rlhf-grpo_micro" / "final" / "eval.json").read_text())
    start = json.loads((out / "dpo_micro" / "final" / "eval_rephrased.json").read_text())
    assert grpo["config"]["family"] == start["config"]["family"] == "rephrased" and grpo["config"]["prompts"] is None
    assert grpo["tasks"]["verifiable"]["n"] == start["tasks"]["verifiable"]["n"] == 3
    assert grpo["tasks"]["kl"]["prompts"].endswith("eval/rephrased.jsonl")
    assert list(start["tasks"]) == ["verifiable", "reward"]
    em, was = grpo["tasks"]["verifiable"]["exact_match"], start["tasks"]["verifiable"]["exact_match"]
    assert f"| exact match on rephrased {em:.3f} ({em - was:+.3f} vs dpo)" in rows["rlhf-grpo"]
    length = start["tasks"]["reward"]["median_length"]
    assert start["tasks"]["reward"]["prompts"].endswith("eval/rephrased.jsonl")
    assert f"(dpo {length:.0f})" in rows["rlhf-grpo"]
    assert "| dpo on rephrased |" in text and "the rephrased family" in text
    targets = text.split("Targets (demo), ")[1].splitlines()[1:]
    assert targets[0].startswith("- sft exact match") and any(t.startswith("- dpo reward accuracy") for t in targets)
    assert any(t.startswith("- rlhf KL") for t in targets) and any(t.startswith("- sft bpb") for t in targets)
    header = [c.strip(" |") for c in text.splitlines()[2].split(" | ")]
    assert header[2:4] == ["bpb", "bpb ratio"] and "degenerate" in header and "distinct-2" in header
    replies = rlhf["reward"]
    assert 0 <= replies["degenerate_fraction"] <= 1 and 0 < replies["distinct_2"] <= 1
    assert (out / "report.png").stat().st_size > 1000
    first = (out / "sft_micro" / "final" / "eval.json").stat().st_mtime_ns
    report.main(args)  # eval.json newer than the weights: reused
    assert (out / "sft_micro" / "final" / "eval.json").stat().st_mtime_ns == first


def test_report_targets_by_hand():
    from minillm.report import Targets, add_bpb_ratios, targets_met

    rows = {
        "pretrain": {"exact match": 0.0, "bpb": 2.0},
        "sft": {"exact match": 0.35, "bpb": 2.2, "degenerate": 0.0, "distinct-2": 0.95},
        "dpo": {"exact match": 0.30, "reward accuracy": 0.9, "bpb": 2.4, "degenerate": 0.01, "distinct-2": 0.85},
        "reward": {"pairwise accuracy a": 0.9, "pairwise accuracy b": 0.6},
        "rlhf": {"reward-model score": 0.5, "KL": 3.0, "median length": 2.0, "exact match": 0.29},
    }
    rows["dpo"] |= {"reward-model score": 0.3, "median length": 10.0, "gold score": 1.0}
    rows["rlhf"] |= {"gold score": 1.05}
    add_bpb_ratios(rows)
    assert rows["sft"]["bpb ratio"] == pytest.approx(1.1) and rows["dpo"]["bpb ratio"] == pytest.approx(1.2)
    parents = {"sft": "pretrain", "dpo": "sft", "reward": "sft", "rlhf": "dpo"}
    targets = Targets(rlhf_gain=0.5, rlhf_gold_gain=0.1, bpb_ratio=1.15, degenerate=True, distinct_2=0.9)
    checks = dict(targets_met(rows, parents, targets))
    verdicts = {what.split(" (")[0]: ok for what, ok in checks.items()}
    assert verdicts == {
        "sft exact match +0.350 vs its start": True,  # ≥ +0.30
        "dpo reward accuracy 0.900": True,
        "dpo exact match 0.300": False,  # below SFT's 0.35
        "reward model on a 0.900": True,
        "reward model on b 0.600": False,  # < 0.85
        "rlhf reward-model score 0.500": True,  # ≥ 0.3 x 1.5
        "rlhf gold reward-model score 1.050": False,  # < 1.0 x 1.1: the proxy's gain did not carry over
        "rlhf exact match 0.290": False,  # below DPO's 0.30: the score was bought with wrong answers
        "rlhf KL 3.00": True,
        "rlhf median reply length 2": False,  # < half of 10: collapsed
        "sft bpb 1.100x the pretrained model's": True,
        "dpo bpb 1.200x the pretrained model's": False,  # > 1.15x: the language model was lost
        "sft degenerate replies 0.000": True,
        "dpo degenerate replies 0.010": False,
        "sft distinct-2 of its replies 0.950": True,
        "dpo distinct-2 of its replies 0.850": False,
    }
    rows["rlhf"]["exact match"] = 0.30  # kept the answers it started with
    assert ("rlhf exact match 0.300 (≥ its start's 0.300)", True) in targets_met(rows, parents, targets)
    rows["rlhf"]["gold score"] = 1.1
    assert dict(targets_met(rows, parents, targets))["rlhf gold reward-model score 1.100 (≥ 1.100, from 1.000)"]


def test_report_rate_targets_need_their_margin():
    """With margin_se, a rate must clear its bar by that many binomial standard errors at the bar, on its own
    held-out set's size: the same 0.70 meets a 0.60 bar on 400 questions and misses it on 40."""
    from minillm.report import Targets, rate_check, targets_met

    assert rate_check("x", 0.70, 0.60, 400, 2.0) == ("x, margin +0.100 (needs 0.049: 2 SE of 400)", True)
    assert rate_check("x", 0.70, 0.60, 40, 2.0) == ("x, margin +0.100 (needs 0.155: 2 SE of 40)", False)
    assert rate_check("x", 0.61, 0.60, 40, 0.0) == ("x", True)  # no margin asked: a plain comparison
    assert rate_check("x", 0.61, 0.60, None, 2.0) == ("x", True)  # no size known
    rows = {"pretrain": {"exact match": 0.0}}
    rows["sft"] = {"exact match": 0.8, "n exact match": 200, "exact match add": 0.7, "n exact match add": 40}
    rows["sft"] |= {"exact match sort": 0.7, "n exact match sort": 400}
    checks = dict(targets_met(rows, {"sft": "pretrain"}, Targets(sft_task_min=0.6, margin_se=2.0)))
    verdicts = {what.split(" (")[0]: ok for what, ok in checks.items()}
    assert verdicts == {
        "sft exact match +0.800 vs its start": True,
        "sft exact match on add 0.700": False,  # 40 questions: 0.10 is within 2 SE of the bar
        "sft exact match on sort 0.700": True,
    }


def test_report_targets_read_only_the_families_a_stage_trained_on(tmp_path):
    from minillm.report import Targets, family_accuracies, markdown, targets_met, trained_families

    run = tmp_path / "dpo_tiny"
    run.mkdir()
    stats = {"sources": {"a": {"train_records": 10}, "b": {"train_records": 0}}}  # b: sample_ratio 0
    (run / "dataset_stats.json").write_text(json.dumps(stats))
    assert trained_families("dpo", "tiny", tmp_path) == {"a"} and trained_families("sft", "tiny", tmp_path) is None
    dpo = {
        "tasks": {
            "preference": {
                "files": {
                    "a": {"n": 30, "reward_accuracy": 0.9},
                    "b": {"n": 10, "reward_accuracy": 0.5},
                    "c": {"n": 10, "reward_accuracy": 1.0},
                }
            }
        }
    }
    rm = {"tasks": {"reward_model": {"a": {"n": 30, "accuracy": 0.95}, "b": {"n": 10, "accuracy": 0.6}}}}
    families = {"dpo": family_accuracies(dpo, {"a", "c"}), "reward": family_accuracies(rm, {"a"})}
    assert families["dpo"] == {"a": (0.9, 30, True), "b": (0.5, 10, False), "c": (1.0, 10, True)}
    rows = {
        "sft": {"exact match": 0.5},
        "dpo": {"exact match": 0.5, "reward accuracy": 0.8},  # pooled over a, b, c: (27 + 5 + 10) / 50 = 0.84
        "reward": {"pairwise accuracy a": 0.95, "pairwise accuracy b": 0.6},
    }
    parents = {"dpo": "sft", "reward": "sft"}
    targets = Targets()  # no margins: the families alone decide
    checks = dict(targets_met(rows, parents, targets, families=families))
    assert checks["dpo reward accuracy on the families it trained on 0.925 (≥ 0.80)"]  # (27 + 10) / 40
    assert checks["reward model on a 0.950 (≥ 0.85)"] and not any("on b" in c for c in checks)  # b: not trained on
    assert not dict(targets_met(rows, parents, targets))["reward model on b 0.600 (≥ 0.85)"]  # every family in the row
    text = markdown(rows, parents, targets, families=families)
    assert "| dpo | reward accuracy vs sft | 0.900* | 0.500 | 1.000* |" in text
    assert "| reward | pairwise accuracy | 0.950* | 0.600 | – |" in text
    assert "reward accuracy on the families it trained on 0.925 vs sft" in text


def test_task_eval_logs_exact_match_during_training_and_leaves_the_loss_curve(
    tmp_path, chat_dir, pretrained, eval_data
):
    import csv

    from minillm.train import build
    from tests.conftest import micro_overrides

    data = tmp_path / "d"
    data.mkdir()
    (data / "sft").symlink_to(chat_dir / "sft")
    (data / "eval").symlink_to(eval_data / "eval")
    curves = []
    for setting in ("callbacks.task_eval.limit=4", "callbacks.task_eval=null"):
        root = tmp_path / setting.split("=")[-1]
        run = build(micro_overrides(root, data, f"init_from={pretrained}", setting, stage="sft"))
        assert run.fit() == 0
        with (root / "run" / "logs" / "metrics.csv").open() as f:
            rows = list(csv.DictReader(f))
        curves.append([r["train/loss"] for r in rows if r.get("train/loss")])
        logged = [r["val/exact_match"] for r in rows if r.get("val/exact_match")]
        assert len(logged) == (2 if setting.endswith("=4") else 0)  # validation at steps 3 and 6
    assert curves[0] == curves[1] and len(curves[0]) == 6


def test_quality_targets_by_hand():
    from minillm.report import targets_met, targets_preset

    rows = {
        "pretrain": {"exact match": 0.0},
        "sft": {"exact match": 0.92, "exact match add": 0.8, "exact match sort": 0.7},
        "rlhf-grpo": {"exact match": 0.95, "reward-model score": 9.0},
    }
    checks = targets_met(rows, {"sft": "pretrain", "rlhf-grpo": "sft"}, targets_preset("quality"))
    verdicts = {what.split(" (")[0]: ok for what, ok in checks}
    assert verdicts == {
        "sft exact match +0.920 vs its start": True,
        "sft exact match 0.920": True,  # ≥ 0.90
        "sft exact match on add 0.800": True,
        "sft exact match on sort 0.700": False,  # < 0.75
        "rlhf-grpo exact match 0.950": False,  # GRPO is judged on exact match: +0.03 < +0.10
    }
    # GRPO on its own family: judged against its start asked the same questions, not the start's row
    starts = {"rlhf-grpo": {"exact match": 0.80, "family": "rephrased"}}
    checks = targets_met(rows, {"sft": "pretrain", "rlhf-grpo": "sft"}, targets_preset("quality"), starts)
    assert ("rlhf-grpo exact match on rephrased 0.950 (≥ 0.900)", True) in checks


def test_headline_leaves_out_a_mean_reward_nothing_was_scored_by():
    scored = {"tasks": {"reward": {"n": 3, "mean_reward": 0.5, "median_length": 4.0}}}
    unscored = {"tasks": {"reward": {"n": 0, "mean_reward": 0.0, "median_length": 4.0}}}  # the rule judged none
    assert ev.headline(scored)["mean reward"] == 0.5
    assert "mean reward" not in ev.headline(unscored) and ev.headline(unscored)["median length"] == 4.0
