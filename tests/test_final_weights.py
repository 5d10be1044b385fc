"""Which weights become final/ (final.weights=last|best, named in the closing log line, with an overfit warning),
and the Lightning conveniences that decide when training ends or what it logs (callbacks presets)."""

import json
import logging
from types import SimpleNamespace

import pytest
import torch

from minillm.callbacks.final import FinalCallback
from minillm.generate import load_model
from minillm.model import LoRAConfig, MiniGPT
from minillm.train import build
from tests.conftest import micro_config, micro_overrides


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_export_weights_best_puts_best_ckpt_in_final(tmp_path, data_dir, caplog):
    caplog.set_level(logging.INFO, logger="minillm")
    run = build(micro_overrides(tmp_path, data_dir, "final.weights=best", "trainer.max_steps=7"))
    assert run.fit() == 0
    final, _ = load_model(str(tmp_path / "run" / "final"))
    best, _ = load_model(str(tmp_path / "run" / "checkpoints" / "best.ckpt"))
    last, _ = load_model(str(tmp_path / "run" / "checkpoints" / "last.ckpt"))
    assert same_weights(final, best) and not same_weights(best, last)  # best: step 6, the last validation; last: step 7
    assert "final/ holds the best weights (best.ckpt, val/loss" in caplog.text


def fake_fit(tokenizer, weights, last_loss, best_loss, best_path=""):
    model = MiniGPT(micro_config(tokenizer.vocab_size))
    best = SimpleNamespace(monitor="val/loss", best_model_path=best_path, best_model_score=torch.tensor(best_loss))
    trainer = SimpleNamespace(
        is_global_zero=True,
        checkpoint_callbacks=[SimpleNamespace(monitor="step"), best],
        callback_metrics={"val/loss": torch.tensor(last_loss)},
        global_step=900,
    )
    module = SimpleNamespace(
        stop_reason=None,
        exported_model=lambda: model,
        tokenizer=tokenizer,
        lora=LoRAConfig(),
        hparams={"config": {"optimized_metric": "val/loss"}},
    )
    return trainer, module


@pytest.mark.parametrize("last_loss, warned", [(2.44, True), (2.21, False)])
def test_the_closing_line_names_the_weights_and_warns_when_val_loss_ended_well_above_its_best(
    tmp_path, tokenizer, caplog, last_loss, warned
):
    caplog.set_level(logging.INFO, logger="minillm")
    trainer, module = fake_fit(tokenizer, "last", last_loss=last_loss, best_loss=2.20, best_path="x/best.ckpt")
    FinalCallback(str(tmp_path), weights="last").on_fit_end(trainer, module)
    assert f"final/ holds the last weights (step 900, val/loss {last_loss:.4f})" in caplog.text
    assert ("well above its best 2.2000 (best.ckpt)" in caplog.text) == warned
    assert (tmp_path / "final" / "model.safetensors").is_file()
    record = json.loads((tmp_path / "finished.json").read_text())
    assert record["global_step"] == 900 and record["metric"] == pytest.approx(last_loss)


def test_export_weights_is_checked(tmp_path, data_dir):
    with pytest.raises(ValueError, match="final.weights must be last or best, got 'first'"):
        build(micro_overrides(tmp_path, data_dir, "final.weights=first"))


def test_early_stopping_and_device_stats_presets(tmp_path, data_dir):
    """callbacks=[default,early_stopping,device_stats]: Lightning's own callbacks, off unless asked for."""
    import csv

    presets = ["callbacks=[default,early_stopping,device_stats]", "callbacks.early_stopping.patience=1"]
    never_enough = "callbacks.early_stopping.min_delta=100"  # no validation after the first improves by 100
    run = build(micro_overrides(tmp_path, data_dir, *presets, never_enough, "trainer.max_steps=12"))
    assert run.fit() == 0
    assert run.trainer.global_step == 6  # validations at 3 and 6: stopped after the second, not at 12
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()  # a stop, not a failure: exported
    with open(tmp_path / "run" / "logs" / "metrics.csv") as f:
        columns = next(csv.reader(f))
    assert any("cpu_percent" in c for c in columns)
    default = build(micro_overrides(tmp_path / "d", data_dir))
    names = {type(c).__name__ for c in default.trainer.callbacks}
    assert not names & {"EarlyStopping", "DeviceStatsMonitor"}
