"""Exact resume as a user meets it: `python -m minillm.train` in a subprocess, stopped by SIGTERM/SIGINT at steps
that do and do not line up with validation and the checkpoint interval, or SIGKILLed at random moments, then
`resume=auto` to the end. The log rows, `last.ckpt` and `final/` must equal an uninterrupted run's."""

from __future__ import annotations

import csv
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import micro_overrides

pytestmark = pytest.mark.slow

# 24 steps, validation after every 6th, a step checkpoint every 4th, a log row every 4th (labels 3, 7, ...). A
# signal when step N + 1 starts stops the run after step N + 1: the cases below stop after a plain step (7, off the
# log schedule) and a validation-and-checkpoint step (12); the copied-dir case after step 10, SFT after steps 7 and 6.
RUN = (
    "trainer.max_steps=24",
    "trainer.val_check_interval=6",
    "callbacks.checkpoint.every_n_train_steps=4",
    "trainer.log_every_n_steps=4",
    "seed=7",
)


def train(root: Path, data: Path, *extra: str, stage: str = "pretrain", env: dict | None = None, popen=False):
    cmd = [sys.executable, "-m", "minillm.train", *micro_overrides(root, data, *RUN, *extra, stage=stage)]
    full_env = os.environ | (env or {})
    if popen:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=full_env)
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env)


WALL_CLOCK = ("train/tokens_per_s", "train/mfu")


def rows(run_dir: Path) -> list[dict]:
    """Every row of metrics.csv, without the wall-clock columns (tokens/s and the MFU computed from it)."""
    with (run_dir / "logs" / "metrics.csv").open(newline="") as f:
        return [{k: v for k, v in r.items() if v and k not in WALL_CLOCK} for r in csv.DictReader(f)]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_same_run(resumed: Path, straight: Path) -> None:
    got, want = rows(resumed), rows(straight)
    assert [(r["step"], r.get("train/loss")) for r in got] == [(r["step"], r.get("train/loss")) for r in want]
    assert got == want  # every column: validation rows, learning rate, gradient norms, epoch
    last = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert digest(resumed / "final" / "model.safetensors") == digest(straight / "final" / "model.safetensors")
    assert not list((resumed / "checkpoints").glob("*-v[0-9]*.ckpt"))  # no versioned last-v1/best-v1


def val_steps(run_dir: Path) -> list[str]:
    return [r["step"] for r in rows(run_dir) if "val/loss" in r]


def interrupt_then_resume(
    root: Path, data: Path, step: int, sig: str, straight: Path, *extra: str, stage: str = "pretrain", copy=False
) -> Path:
    """Stop after step `step` + 1 with `sig`, then resume=auto to the end (in a copy of the run dir elsewhere with
    copy=True); returns the run dir that finished."""
    env = {"MINILLM_FAULT_SIGNAL_AT_STEP": str(step), "MINILLM_FAULT_SIGNAL": sig}
    first = train(root, data, *extra, stage=stage, env=env)
    assert first.returncode == 128 + signal.Signals[sig], first.stderr[-3000:]
    assert set(val_steps(root / "run")) <= set(val_steps(straight))  # no validation forced by the stop
    ckpts = root / "run" / "checkpoints"
    saved = ckpts / f"interrupt-step-{step + 1:06d}.ckpt"
    assert saved.is_file() and digest(ckpts / "last.ckpt") == digest(saved)  # last.ckpt is the newest state
    assert not (root / "run" / "final").exists()
    run_dir = root / "run"
    if copy:  # resume a copy elsewhere: its checkpoints name the original folder
        run_dir = root / "copy"
        shutil.copytree(root / "run", run_dir)
        saved, extra = run_dir / "checkpoints" / saved.name, (*extra, f"run_dir={run_dir}")
    again = train(root, data, *extra, "resume=auto", stage=stage)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {saved}" in again.stdout + again.stderr
    return run_dir


@pytest.fixture(scope="module")
def straight_pretrain(tmp_path_factory, data_dir) -> Path:
    root = tmp_path_factory.mktemp("straight")
    done = train(root, data_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "run"


@pytest.mark.parametrize(
    ("step", "sig"),
    [(6, "SIGTERM"), (11, "SIGTERM")],
    ids=["plain-step", "validation-and-checkpoint-step"],
)
def test_pretrain_interrupted_by_a_signal_resumes_exactly(tmp_path, data_dir, straight_pretrain, step, sig):
    interrupt_then_resume(tmp_path, data_dir, step, sig, straight_pretrain)
    assert_same_run(tmp_path / "run", straight_pretrain)


def test_sigint_then_resume_in_a_copied_run_dir_is_exact(tmp_path, data_dir, straight_pretrain):
    copy = interrupt_then_resume(tmp_path, data_dir, 9, "SIGINT", straight_pretrain, copy=True)
    assert_same_run(copy, straight_pretrain)


def test_pretrain_killed_three_times_at_random_moments_resumes_exactly(tmp_path, data_dir, straight_pretrain):
    rng = random.Random(0)
    ckpts = tmp_path / "run" / "checkpoints"
    for attempt in range(3):
        proc = train(tmp_path, data_dir, *(["resume=auto"] if attempt else []), popen=True)
        seen = {p.name for p in ckpts.glob("*.ckpt")} if ckpts.is_dir() else set()
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:  # wait until it writes a new checkpoint
            if ckpts.is_dir() and {p.name for p in ckpts.glob("*.ckpt")} - seen:
                break
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.0))  # then kill it somewhere in the following steps
        proc.kill()
        proc.wait()
    done = train(tmp_path, data_dir, "resume=auto")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(tmp_path / "run", straight_pretrain)


def test_sft_interrupted_at_a_plain_and_a_validation_step_resumes_exactly(tmp_path, chat_dir, pretrained):
    sft = (f"init_from={pretrained}",)
    straight = train(tmp_path / "straight", chat_dir, *sft, stage="sft")
    assert straight.returncode == 0, straight.stderr[-3000:]
    for step in (6, 5):
        interrupt_then_resume(
            tmp_path / f"at{step}", chat_dir, step, "SIGTERM", tmp_path / "straight" / "run", *sft, stage="sft"
        )
        assert_same_run(tmp_path / f"at{step}" / "run", tmp_path / "straight" / "run")


@pytest.mark.parametrize("stage", ["dpo", "reward"])
def test_preference_stages_interrupted_at_a_plain_and_a_validation_step_resume_exactly(
    stage, tmp_path, pref_dir, pretrained
):
    pairs = (f"init_from={pretrained}", "stage.max_prompt_length=20", "stage.max_completion_length=12")
    straight = train(tmp_path / "straight", pref_dir, *pairs, stage=stage)
    assert straight.returncode == 0, straight.stderr[-3000:]
    for step in (6, 5):
        interrupt_then_resume(
            tmp_path / f"at{step}", pref_dir, step, "SIGTERM", tmp_path / "straight" / "run", *pairs, stage=stage
        )
        assert_same_run(tmp_path / f"at{step}" / "run", tmp_path / "straight" / "run")


def test_rlhf_interrupted_between_rollouts_resumes_exactly(tmp_path, prompt_dir, pretrained):
    grpo = (
        f"init_from={pretrained}",
        "stage.algorithm=grpo",
        "stage.reward=verifiable",
        "stage.max_prompt_length=20",
        "stage.max_completion_length=8",
        "callbacks.rlhf_monitor.sample_every=0",
        "trainer.max_steps=6",
        "trainer.val_check_interval=3",
        "callbacks.checkpoint.every_n_train_steps=4",
        "stage.compile_rollouts=true",  # rollouts through the compiled decode step resume exactly too
    )
    straight = train(tmp_path / "straight", prompt_dir, *grpo, stage="rlhf")
    assert straight.returncode == 0, straight.stderr[-3000:]
    straight_dir = tmp_path / "straight" / "run"
    env = {"MINILLM_FAULT_SIGNAL_AT_STEP": "4"}  # global_step counts updates: 2 per rollout here
    first = train(tmp_path / "cut", prompt_dir, *grpo, stage="rlhf", env=env)
    assert first.returncode == 143, first.stderr[-3000:]
    again = train(tmp_path / "cut", prompt_dir, *grpo, "resume=auto", stage="rlhf")
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_run(tmp_path / "cut" / "run", straight_dir)
