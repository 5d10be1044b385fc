"""logger=wandb: offline unless the user is logged in (the resolver, fast), and a real offline run (ref venv,
which has the wandb extra)."""

import pytest

from minillm.config import _wandb_offline, compose
from minillm.train import build
from tests.conftest import micro_overrides


def test_wandb_is_offline_unless_logged_in(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    assert _wandb_offline() is True
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password secret-key\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert _wandb_offline() is False
    (tmp_path / ".netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", "secret-key")
    assert _wandb_offline() is False
    cfg = compose(["logger=[default,wandb]"])
    assert set(cfg.logger) == {"csv", "wandb"} and cfg.logger.wandb.offline is False


def test_tensorboard_is_an_opt_in_beside_the_csv_log(tmp_path, data_dir):
    plain = build(micro_overrides(tmp_path / "a", data_dir))
    assert [type(lg).__name__ for lg in plain.trainer.loggers] == ["CSVLogger"]
    run = build(micro_overrides(tmp_path / "b", data_dir, "logger=[default,tensorboard]"))
    assert run.fit() == 0
    assert list((tmp_path / "b" / "run" / "logs" / "tb").glob("events.out.tfevents.*"))
    assert (tmp_path / "b" / "run" / "logs" / "metrics.csv").is_file()


@pytest.mark.ref
def test_wandb_preset_logs_a_run_offline(tmp_path, data_dir, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = build(micro_overrides(tmp_path, data_dir, "logger=[default,wandb]"))
    assert run.fit() == 0
    (offline,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    assert list(offline.glob("*.wandb")) and (tmp_path / "run" / "logs" / "metrics.csv").is_file()
