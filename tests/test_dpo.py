import csv
import json
import math

import pytest
import torch

from minillm.config import DPOConfig, compose, to_config
from minillm.data.kinds import encode_pair
from minillm.data.records import DataError
from minillm.generate import load_model
from minillm.losses import IGNORE_INDEX
from minillm.train import build
from tests.conftest import pair_overrides


def dpo(root, pref_dir, pretrained, *extra):
    return pair_overrides(root, pref_dir, pretrained, *extra, stage="dpo")


def test_dpo_schema_types_stage_options():
    cfg = to_config(compose(["stage=dpo", "stage.beta=0.3"]))
    assert isinstance(cfg.stage, DPOConfig) and cfg.stage.beta == 0.3 and cfg.stage.parent == "sft"
    with pytest.raises(ValueError, match="stage.beta must be > 0"):
        to_config(compose(["stage=dpo", "stage.beta=0"]))
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="stage.betta"):
        compose(["stage=dpo", "stage.betta=1"])


def test_only_completion_tokens_are_labelled(tokenizer):
    pair = {"prompt": [{"role": "user", "content": "What is 2 + 3?"}], "chosen": "5", "rejected": "7"}
    enc = encode_pair(tokenizer, pair, (64, 16))
    for side in ("chosen", "rejected"):
        learned = [t for t in enc[f"{side}_labels"] if t != IGNORE_INDEX]
        assert learned == tokenizer.encode(pair[side]) + [tokenizer.im_end_id]
    assert enc["chosen_ids"][: -len(learned)] == enc["rejected_ids"][: -len(learned)]  # the same prompt
    short = encode_pair(tokenizer, pair, (4, 1))
    assert short["truncated"] and len(short["chosen_ids"]) == 5


def test_dpo_starts_at_ln2_moves_the_policy_and_never_the_reference(tmp_path, pref_dir, pretrained):
    run = build(dpo(tmp_path, pref_dir, pretrained, "trainer.max_steps=6", "model.dropout=0.2", "optim.lr=1e-3"))
    reference = {k: v.clone() for k, v in run.module.reference.state_dict().items()}
    start = {k: v.clone() for k, v in run.module.model.state_dict().items()}
    assert run.fit() == 0
    with (tmp_path / "run" / "logs" / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    assert float(rows[0]["train/loss"]) == pytest.approx(math.log(2), abs=1e-6)  # dropout is off: policy == ref
    assert float(rows[0]["rewards/margins"]) == pytest.approx(0.0, abs=1e-6)
    assert all(torch.equal(v, run.module.reference.state_dict()[k]) for k, v in reference.items())
    assert any(not torch.equal(v, run.module.model.state_dict()[k]) for k, v in start.items())
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert not [k for k in ckpt["state_dict"] if "reference" in k]
    assert all(k.startswith(("model.", "val_loss")) for k in ckpt["state_dict"])
    assert "val/rewards/accuracies" in run.trainer.callback_metrics
    stats = json.loads((tmp_path / "run" / "dataset_stats.json").read_text())
    assert stats["kind"] == "preference" and set(stats["sources"]) == {"sums", "greetings"}


def test_rpo_alpha_adds_the_mean_nll_of_the_chosen_replies(tmp_path, pref_dir, pretrained):
    import torch.nn.functional as F

    run = build(dpo(tmp_path, pref_dir, pretrained, "stage.rpo_alpha=0.5"))
    run.datamodule.setup("fit")
    batch = next(iter(run.datamodule.train_dataloader()))
    with torch.no_grad():
        loss, metrics, _ = run.module._step(batch)
        logits = run.module.model(batch["chosen_ids"][:, :-1]).logits  # computed apart, as a token-mean cross-entropy
        nll = F.cross_entropy(logits.flatten(0, 1), batch["chosen_labels"][:, 1:].flatten(), ignore_index=IGNORE_INDEX)
    assert float(metrics["nll_loss"]) == pytest.approx(float(nll), rel=1e-5)
    assert float(loss) == pytest.approx(math.log(2) + 0.5 * float(nll), rel=1e-5)  # policy == reference: DPO is ln 2
    with pytest.raises(ValueError, match="stage.rpo_alpha must be >= 0"):
        to_config(compose(["stage=dpo", "stage.rpo_alpha=-1"]))


def test_dpo_learns_the_preferences(tmp_path, pref_dir, pretrained):
    run = build(
        dpo(
            tmp_path,
            pref_dir,
            pretrained,
            "trainer.max_steps=25",
            "trainer.val_check_interval=25",
            "optim.lr=2e-3",
            "data.val_ratio=0.2",
            "trainer.limit_val_batches=null",
        )
    )
    assert run.fit() == 0
    metrics = run.trainer.callback_metrics
    assert float(metrics["val/loss"]) < math.log(2) - 0.1  # held-out pairs, ln 2 before training
    assert float(metrics["val/rewards/margins"]) > 0.3 and float(metrics["val/rewards/accuracies"]) > 0.55
    model, _ = load_model(str(tmp_path / "run" / "final"))
    assert model.config.n_layer == 2


def test_a_pair_with_identical_answers_names_file_and_line(tmp_path, pretrained, pref_dir):
    bad = tmp_path / "data" / "preference"
    bad.mkdir(parents=True)
    lines = (pref_dir / "preference" / "sums.jsonl").read_text().splitlines()
    lines[3] = json.dumps({"prompt": "x", "chosen": "same", "rejected": "same"})
    (bad / "sums.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"sums\.jsonl:4: chosen and rejected are the same"):
        build(dpo(tmp_path, tmp_path / "data", pretrained))
    run = build(dpo(tmp_path, tmp_path / "data", pretrained, "data.skip_bad_records=true"), inspect=True)
    assert run.datamodule.stats["sources"]["sums"]["bad_records"] == 1


def test_too_long_prompt_plus_completion_for_the_block_is_an_error(tmp_path, pref_dir, pretrained):
    with pytest.raises(ValueError, match="exceeds model.block_size"):
        build(dpo(tmp_path, pref_dir, pretrained, "stage.max_prompt_length=30"))
