"""Entry points: debug and device in-process; train as a real subprocess (exit codes, signals, multirun)."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from minillm import debug, device
from tests.conftest import micro_overrides


def test_debug_prints_the_batch_one_step_and_a_generation(tmp_path, data_dir, capsys):
    debug.main(micro_overrides(tmp_path, data_dir, 'prompt="你好，MiniGPT！"'))
    out = capsys.readouterr().out
    assert "input_ids (4, 33)" in out and "targets (4, 32)" in out
    assert "-- raw text of row 0" in out and "-- token ids: [" in out and "-- loss mask (1 = trained on): [1, 1" in out
    loss = float(out.split("one optimizer step: loss ")[1].split(",")[0])
    grad = float(out.split("grad norm ")[1].split()[0])
    assert 0 < loss < 20 and 0 < grad < 1e3
    assert "generate('你好，MiniGPT！') -> " in out
    snapshot = tmp_path / "run" / "debug" / "training_config_snapshot.json"  # the config it described, and no more
    assert f"== config snapshot: {snapshot}" in out
    assert json.loads(snapshot.read_text())["config"]["stage"]["name"] == "pretrain"
    assert sorted(p.relative_to(tmp_path / "run").as_posix() for p in (tmp_path / "run").rglob("*")) == [
        "debug",
        "debug/training_config_snapshot.json",
    ]


def test_device_reports_and_writes_a_snapshot(tmp_path, capsys, monkeypatch):
    """What `minillm device` says follows what it detects (forced here, so the test holds on any machine)."""
    monkeypatch.setattr("minillm.device.best_device", lambda: "cpu")
    for fast, word in ((True, "available"), (False, "unavailable")):
        monkeypatch.setattr("minillm.device.cpu_has_fast_bf16", lambda fast=fast: fast)
        device.main([f"run_dir={tmp_path / word}", "trainer.max_steps=7"])
        out = capsys.readouterr().out
        assert out.startswith(f"device: cpu; torch {torch.__version__}; bf16-mixed {word}\n"), out
        snapshot = json.loads((tmp_path / word / "training_config_snapshot.json").read_text())
        assert snapshot["device"] == "cpu" and snapshot["config"]["trainer"]["max_steps"] == 7


def train_cmd(root, data, *extra):
    return [sys.executable, "-m", "minillm.train", *micro_overrides(root, data, *extra)]


@pytest.mark.slow
def test_sigterm_saves_exits_143_and_resume_auto_finishes(tmp_path, data_dir):
    proc = subprocess.Popen(
        train_cmd(tmp_path, data_dir, "trainer.max_steps=100000", "trainer.val_check_interval=1000"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics = tmp_path / "run" / "logs" / "metrics.csv"
    deadline = time.time() + 120
    while not (tmp_path / "run" / "checkpoints" / "step-000004.ckpt").exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out[-3000:]
    assert "received interrupt signal — checkpoint saved to" in out and "rerun with resume=auto" in out
    assert not (tmp_path / "run" / "final").exists()
    interrupted_at = max(int(r["step"]) for r in csv.DictReader(metrics.open()) if r.get("train/loss"))

    done = subprocess.run(
        train_cmd(
            tmp_path, data_dir, f"trainer.max_steps={interrupted_at + 4}", "resume=auto", "resume_allow_changes=true"
        ),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


DOUBLE_CTRL_C = """
import os, signal, sys, time
from minillm.callbacks.interrupt import InterruptCallback
cb = InterruptCallback(sys.argv[1])
cb.on_train_start(None, None)
os.kill(os.getpid(), signal.SIGINT)
print("first handled, received", cb.received, flush=True)
os.kill(os.getpid(), signal.SIGINT)
time.sleep(5)
print("not reached", flush=True)
"""


def test_a_second_ctrl_c_exits_130_at_once_without_a_checkpoint(tmp_path):
    """The first SIGINT only asks for a checkpoint after the step; the second leaves at once (exit 130)."""
    out = subprocess.run(
        [sys.executable, "-c", DOUBLE_CTRL_C, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 130, out.stderr[-2000:]
    assert f"first handled, received {int(signal.SIGINT)}" in out.stdout and "not reached" not in out.stdout
    assert "received SIGINT: saving a checkpoint after this step" in out.stderr
    assert "second interrupt: exiting now, without a checkpoint" in out.stderr
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.slow
def test_bad_override_exits_with_hydra_message(tmp_path, data_dir):
    done = subprocess.run(train_cmd(tmp_path, data_dir, "optim.lrr=1"), capture_output=True, text=True)
    assert done.returncode != 0 and "optim.lrr" in done.stderr


@pytest.mark.slow
def test_fresh_run_into_a_used_run_dir_exits_2_with_the_way_out(tmp_path, data_dir):
    first = subprocess.run(train_cmd(tmp_path, data_dir, "trainer.max_steps=2"), capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-2000:]
    again = subprocess.run(train_cmd(tmp_path, data_dir, "trainer.max_steps=2"), capture_output=True, text=True)
    assert again.returncode == 2 and "resume=auto" in again.stdout + again.stderr


@pytest.mark.slow
def test_multirun_sweep_makes_one_directory_per_job(tmp_path, data_dir):
    overrides = [o for o in micro_overrides(tmp_path, data_dir, "trainer.max_steps=3") if not o.startswith("run_dir=")]
    env = dict(os.environ)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "minillm.train",
            "-m",
            *overrides,
            "optim.lr=1e-3,3e-3",
            f"hydra.sweep.dir={tmp_path}/sweep",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1"]
    lrs = set()
    for job in jobs:
        assert (job / "final" / "model.safetensors").is_file() and (job / "logs" / "metrics.csv").is_file()

        lrs.add(json.loads((job / "training_config_snapshot.json").read_text())["config"]["optim"]["lr"])
    assert lrs == {1e-3, 3e-3}
    assert not (tmp_path / "outputs").exists()  # nothing escaped into the default run dir


@pytest.mark.slow
def test_a_second_command_on_a_run_dir_in_use_is_refused_naming_the_holder(tmp_path, data_dir):
    """Two real processes, one run dir: the second refuses before writing anything; once the first is gone (even
    killed, its lock file left behind) the run dir is free again."""
    first = subprocess.Popen(
        train_cmd(tmp_path, data_dir, "trainer.max_steps=100000", "trainer.val_check_interval=1000"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    lock = tmp_path / "run" / ".lock"
    try:
        deadline = time.time() + 120
        while not (tmp_path / "run" / "checkpoints" / "step-000002.ckpt").exists() and time.time() < deadline:
            time.sleep(0.2)  # the first is training
        assert f"PID {first.pid} " in lock.read_text()
        log_before = (tmp_path / "run" / "train.log").read_text()
        second = subprocess.run(train_cmd(tmp_path, data_dir, "resume=auto"), capture_output=True, text=True)
        assert second.returncode == 2
        assert f"is in use by PID {first.pid} on " in second.stderr and "another run_dir=" in second.stderr
        assert (tmp_path / "run" / "train.log").read_text().startswith(log_before)  # nothing of the second in it
    finally:
        first.kill()
        first.wait()
    assert f"PID {first.pid} " in lock.read_text()  # left behind by the killed process: not a lock any more
    third = subprocess.run(train_cmd(tmp_path, data_dir, "trainer.max_steps=2", "overwrite=true"), capture_output=True)
    assert third.returncode == 0, third.stderr[-2000:]
