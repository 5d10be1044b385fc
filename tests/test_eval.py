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


def test_preference_accuracy_by_hand():
    policy = torch.tensor([[-1.0, -2.0], [-3.0, -1.0]])  # margins +1, -2
    assert ev.preference_accuracy(policy) == {"n": 2, "accuracy": 0.5, "margin": -0.5}
    reference = torch.tensor([[-1.0, -3.0], [-3.0, -2.0]])  # margins +2, -1: the policy gained -1 on both
    assert ev.preference_accuracy(policy, reference)["accuracy"] == 0.0


@pytest.fixture
def eval_data(tmp_path):
    root = tmp_path / "data"
    (root / "eval").mkdir(parents=True)
    (root / "pretrain").mkdir()
    with (root / "pretrain" / "t.jsonl").open("w") as f:
        for i in range(400):
            f.write(json.dumps({"text": f"Line {i}: to be or not to be."}) + "\n")
    with (root / "eval" / "verifiable.jsonl").open("w") as f:
        for i in range(5):
            msgs = [{"role": "user", "content": f"What is {i} + 1?"}, {"role": "assistant", "content": str(i + 1)}]
            f.write(json.dumps({"conversations": msgs, "answer": str(i + 1)}) + "\n")
    with (root / "eval" / "sums.jsonl").open("w") as f:
        for i in range(4):
            f.write(json.dumps({"prompt": f"What is {i} + 1?", "chosen": str(i + 1), "rejected": "no"}) + "\n")
    return root


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
        ]
    )
    result = json.loads((folder / "eval.json").read_text())
    tasks = result["tasks"]
    assert set(tasks) == {"bpb", "verifiable", "preference", "reward", "samples"} and result["kind"] == "lm"
    assert tasks["bpb"]["documents"] > 0 and tasks["bpb"]["bpb"] > 0 and tasks["bpb"]["loss"] > 0
    assert tasks["verifiable"]["n"] == 5 and 0 <= tasks["verifiable"]["exact_match"] <= 1
    assert tasks["preference"]["n"] == 4 and set(tasks["preference"]["files"]) == {"sums"}
    assert tasks["reward"]["n"] == 5 and tasks["reward"]["reward"] == "verifiable"
    assert len(tasks["samples"]["samples"]) == len(ev.SAMPLE_PROMPTS) and 0 <= tasks["samples"]["distinct_2"] <= 1
    out = capsys.readouterr().out
    assert "bpb" in out and "exact match" in out and "eval.json" in out

    reward = save_pretrained(RewardModel(micro_config(tokenizer.vocab_size)), tokenizer, tmp_path / "rm")
    eval_cli.main([f"model_path={reward}", f"eval.data_dir={eval_data}", "eval.pairs=[sums]"])
    result = json.loads((reward / "eval.json").read_text())
    assert result["kind"] == "reward" and result["tasks"]["reward_model"]["sums"]["n"] == 4


def test_eval_cli_names_bad_settings(tmp_path, tokenizer, eval_data):
    folder = save_pretrained(MiniGPT(micro_config(tokenizer.vocab_size)), tokenizer, tmp_path / "m")
    with pytest.raises(SystemExit, match="eval.tasks: unknown \\['perplexity'\\]"):
        eval_cli.main([f"model_path={folder}", "eval.tasks=[perplexity]"])
    with pytest.raises(SystemExit, match="limt"):
        eval_cli.main([f"model_path={folder}", "eval.limt=3"])
    with pytest.raises(SystemExit, match="no evaluation set"):
        eval_cli.main([f"model_path={folder}", f"eval.data_dir={tmp_path}", "eval.tasks=[verifiable]"])


def test_report_tabulates_each_stage_and_draws_a_chart(tmp_path, tokenizer, eval_data, capsys):
    from minillm import report

    out = tmp_path / "outputs"
    torch.manual_seed(0)
    for stage in ("pretrain", "sft"):
        save_pretrained(MiniGPT(micro_config(tokenizer.vocab_size)), tokenizer, out / f"{stage}_micro" / "final")
    save_pretrained(RewardModel(micro_config(tokenizer.vocab_size)), tokenizer, out / "reward_micro" / "final")
    args = ["model=micro", f"out_dir={out}", f"eval.data_dir={eval_data}", "eval.pairs=[sums]", "eval.max_new_tokens=4"]
    report.main(args)
    text = (out / "report.md").read_text()
    assert "| pretrain |" in text and "| sft |" in text and "| dpo |" not in text  # only stages that exist
    assert "bpb" in text and "Reward model, held-out pairwise accuracy: sums" in text
    sft = json.loads((out / "sft_micro" / "final" / "eval.json").read_text())
    assert isinstance(sft["tasks"]["reward"]["reward_model_score"], float)  # the reward model scored the replies
    assert text.count("–") == 0  # every column filled for both stages
    assert (out / "report.png").stat().st_size > 1000
    first = (out / "sft_micro" / "final" / "eval.json").stat().st_mtime_ns
    report.main(args)  # eval.json newer than the weights: reused
    assert (out / "sft_micro" / "final" / "eval.json").stat().st_mtime_ns == first


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
