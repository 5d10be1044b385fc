"""Sweeps (minillm/sweeps.py): each job's record, the summary table and chart, resumable sweeps, eval sweeps."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minillm.config import find_sweep, new_or_resumed_sweep_dir
from minillm.plots import have_matplotlib
from minillm.sweeps import SweepJob, objective_direction, write_summary
from tests.conftest import micro_overrides

REPO = Path(__file__).parents[1]


def fake_job(sweep: Path, num: int, overrides: list[str], losses: list[float] | None, status: str, **record) -> Path:
    """A job dir as a train job leaves it: job.json and logs/metrics.csv (val/loss at steps 2, 4, ...)."""
    job = SweepJob(sweep / str(num), num, overrides, "val/loss", status=status, **record)
    job.write()
    if losses is not None:
        (job.dir / "logs").mkdir()
        with (job.dir / "logs" / "metrics.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "train/loss", "train/tokens_per_s", "val/loss"])
            for i, loss in enumerate(losses):
                w.writerow([2 * i + 1, loss + 0.5, 1000 + i, ""])
                w.writerow([2 * i + 2, "", "", loss])
    return job.dir


def test_the_summary_sorts_by_the_best_objective_and_names_what_each_job_did(tmp_path):
    sweep = tmp_path / "sweep"
    fake_job(sweep, 0, ["model=tiny", "prompt=To be", "optim.lr=1e-3"], [3.0, 2.5, 2.6], "done", wall_s=10.0)
    fake_job(sweep, 1, ["model=tiny", "prompt=To be", "optim.lr=3e-3"], [2.8, 2.2, 2.4], "done", wall_s=11.0)
    fake_job(
        sweep,
        2,
        ["model=tiny", "prompt=To be", "optim.lr=1"],
        None,
        "failed",
        error="trainer.max_steps=0 trains nothing",
    )
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    fake_job(sweep, 3, ["model=tiny", "prompt=To be", "optim.lr=3"], [2.9], "running", pid=int(dead.stdout))  # gone
    rows, written = write_summary(sweep)
    assert [r["job"] for r in rows] == [1, 0, 3, 2]  # best val/loss first: 2.2 < 2.5 < 2.9, no value last
    assert [r["status"] for r in rows] == ["done", "done", "interrupted", "failed"]
    assert (rows[0]["best"], rows[0]["best_step"], rows[0]["final"], rows[0]["final_step"]) == (2.2, 4, 2.4, 6)
    assert rows[0]["tokens_per_s"] == 1001 and rows[3]["error"] == "trainer.max_steps=0 trains nothing"
    assert {p.name for p in written} >= {"summary.csv", "summary.md"}
    table = (sweep / "summary.md").read_text()
    assert "Every job: model=tiny prompt=To be" in table and "| job | optim.lr | status |" in table  # the swept key
    assert "| 1 | 3e-3 | done | 2.2000 | 4 | 2.4000 | 6 | 1001 |" in table
    assert "failed: trainer.max_steps=0 trains nothing" in table
    with (sweep / "summary.csv").open(newline="") as f:
        assert [r["job"] for r in csv.DictReader(f)] == ["1", "0", "3", "2"]
    if have_matplotlib():  # the plots extra, which `make` installs
        assert (sweep / "summary.png").stat().st_size > 1000


def test_objectives_have_a_direction_and_a_maximized_one_sorts_highest_first(tmp_path):
    assert objective_direction("val/loss") == objective_direction("val/ppl") == "min"
    assert objective_direction("val/reward") == objective_direction("val/exact_match") == "max"
    sweep = tmp_path / "s"
    for num, rewards in enumerate([[0.1, 0.3], [0.2, 0.5], [0.4, 0.1]]):
        job = SweepJob(sweep / str(num), num, [f"stage.kl_coef={num}"], "val/reward", status="done")
        job.write()
        (job.dir / "logs").mkdir()
        (job.dir / "logs" / "metrics.csv").write_text(
            "step,val/reward\n" + "".join(f"{i},{r}\n" for i, r in enumerate(rewards))
        )
    rows, _ = write_summary(sweep)
    assert [(r["job"], r["best"]) for r in rows] == [(1, 0.5), (2, 0.4), (0, 0.3)]


def test_resume_auto_finds_the_newest_sweep_of_the_same_overrides(tmp_path):
    base = tmp_path / "sweeps" / "pretrain_tiny"
    for name, overrides in [
        ("2026-01-01_00-00-00", ["optim.lr=1e-3,3e-3"]),
        ("2026-01-02_00-00-00", ["optim.lr=1e-3,3e-3", "trainer.max_steps=9"]),
        ("2026-01-03_00-00-00", ["optim.lr=1e-3,3e-3", "resume=auto"]),  # itself a resumed run of the first
        ("2026-01-04_00-00-00", ["optim.lr=1e-2"]),
    ]:
        (base / name).mkdir(parents=True)
        (base / name / "multirun.yaml").write_text(json.dumps({"hydra": {"overrides": {"task": overrides}}}))
    asked = ["resume=auto", "optim.lr=1e-3,3e-3", "hydra.verbose=true"]  # how to run it does not change the sweep
    assert find_sweep(base, asked) == base / "2026-01-03_00-00-00"
    assert new_or_resumed_sweep_dir(base, asked) == base / "2026-01-03_00-00-00"
    fresh = new_or_resumed_sweep_dir(base, ["optim.lr=1e-3,3e-3"])  # without resume=auto: a new sweep
    assert fresh.parent == base and not fresh.exists()
    assert new_or_resumed_sweep_dir(base, ["optim.lr=5e-3", "resume=auto"]).parent == base  # none to resume: new


def sweep_cmd(tmp_path: Path, data_dir: Path, *extra: str) -> list[str]:
    overrides = [o for o in micro_overrides(tmp_path, data_dir) if not o.startswith(("run_dir=", "trainer.max_steps"))]
    return [sys.executable, "-m", "minillm.train", "-m", *overrides, *extra, f"outputs={tmp_path}/outputs"]


def summary_rows(sweep: Path) -> dict[int, dict]:
    with (sweep / "summary.csv").open(newline="") as f:
        return {int(r["job"]): r for r in csv.DictReader(f)}


@pytest.mark.slow
def test_a_sweep_summarizes_every_job_goes_on_after_a_failure_and_resumes(tmp_path, data_dir):
    command = sweep_cmd(tmp_path, data_dir, "trainer.max_steps=4,6,0")  # job 2 fails: max_steps=0 trains nothing
    sweeps_dir = tmp_path / "outputs" / "sweeps" / "pretrain_tiny"

    # Ctrl-C during job 0 (at its step 3): the job is recorded as interrupted and the sweep stops
    env = os.environ | {"MINILLM_FAULT_SIGNAL_AT_STEP": "3", "MINILLM_FAULT_SIGNAL": "SIGINT"}
    stopped = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=900, env=env)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    (sweep,) = sweeps_dir.iterdir()
    assert {j: r["status"] for j, r in summary_rows(sweep).items()} == {0: "interrupted"}

    # the same command with resume=auto: the same sweep dir; job 0 continues from its checkpoint, job 2 fails and
    # the others still run; the table is printed and written, and the exit code names the failure
    done = subprocess.run([*command, "resume=auto"], capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "1 of 3 jobs did not finish: 2 (failed)" in done.stderr
    assert list(sweeps_dir.iterdir()) == [sweep]
    assert "resume=auto: resuming from" in (sweep / "0" / "train.log").read_text()
    rows = summary_rows(sweep)
    assert [rows[j]["status"] for j in (0, 1, 2)] == ["done", "done", "failed"]
    assert rows[2]["error"].startswith("trainer.max_steps=0 trains nothing")
    for j, validations in ((0, 1), (1, 2)):  # val_check_interval=3: after step 3, and after step 6
        with (sweep / str(j) / "logs" / "metrics.csv").open(newline="") as f:
            curve = [(int(r["step"]), float(r["val/loss"])) for r in csv.DictReader(f) if r["val/loss"]]
        assert len(curve) == validations
        assert (int(rows[j]["final_step"]), float(rows[j]["final"])) == curve[-1]
        assert float(rows[j]["best"]) == min(v for _, v in curve)
        assert float(rows[j]["tokens_per_s"]) > 0 and float(rows[j]["wall_s"]) > 0
    assert "| job | trainer.max_steps | status |" in (sweep / "summary.md").read_text()
    assert "| job | trainer.max_steps | status |" in done.stdout  # the table is printed at the end too
    assert (sweep / "summary.png").stat().st_size > 1000

    # once more: the finished jobs are skipped, and say so
    final_1 = (sweep / "1" / "final" / "model.safetensors").read_bytes()
    again = subprocess.run([*command, "resume=auto"], capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert again.returncode == 1, again.stderr[-3000:]
    assert [summary_rows(sweep)[j]["status"] for j in (0, 1, 2)] == ["skipped", "skipped", "failed"]
    assert (sweep / "1" / "final" / "model.safetensors").read_bytes() == final_1


@pytest.mark.slow
def test_an_eval_sweep_tabulates_each_model(tmp_path, tokenizer, eval_data):
    import torch

    from minillm.model import MiniGPT
    from minillm.pretrained import save_pretrained
    from tests.conftest import micro_config

    torch.manual_seed(0)
    a = save_pretrained(MiniGPT(micro_config(tokenizer.vocab_size)), tokenizer, tmp_path / "a")
    command = [sys.executable, "-m", "minillm.eval", "-m", f"model_path={a},{tmp_path}/missing"]
    command += [f"eval.data_dir={eval_data}", "eval.tasks=[bpb,verifiable]", "eval.limit=5", "device=cpu"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600, env=os.environ)
    assert done.returncode == 1, done.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "sweeps" / "eval").iterdir()
    with (sweep / "summary.csv").open(newline="") as f:
        rows = {int(r["job"]): r for r in csv.DictReader(f)}
    assert rows[0]["status"] == "done" and rows[1]["status"] == "failed" and "missing" in rows[1]["error"]
    result = json.loads((a / "eval.json").read_text())
    assert float(rows[0]["bpb"]) == pytest.approx(result["tasks"]["bpb"]["bpb"], rel=1e-6)


@pytest.mark.slow
def test_the_search_preset_runs_optuna_trials_and_gets_each_ones_best_val_loss(tmp_path, data_dir):
    import yaml

    command = sweep_cmd(tmp_path, data_dir, "trainer.max_steps=6", "trainer.val_check_interval=2")
    command = [c for c in command[:3] + command[4:] if c != "data.batch_size=4"]  # no -m; the preset picks the batch
    command += ["hparams_search=tiny_optuna", "hydra.sweeper.n_trials=3"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "sweeps" / "pretrain_tiny").iterdir()
    with (sweep / "summary.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and all(r["status"] == "done" for r in rows)
    for row in rows:
        values = dict(o.split("=", 1) for o in row["overrides"].split())
        assert 3e-4 <= float(values["optim.lr"]) <= 1e-2 and values["data.batch_size"] in {"8", "16", "32"}
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    # what each trial returned to the sampler is its best val/loss: the best of them is the summary's first row
    assert results["best_value"] == pytest.approx(float(rows[0]["best"]), rel=1e-6)


def test_the_sweep_command_rebuilds_the_summary_of_a_dir_or_the_newest(tmp_path, capsys):
    from minillm import sweep

    old, new = tmp_path / "sweeps" / "a" / "old", tmp_path / "sweeps" / "b" / "new"
    fake_job(old, 0, ["optim.lr=1"], [3.0], "done")
    fake_job(new, 0, ["optim.lr=2"], [2.0], "done")
    fake_job(new, 1, ["optim.lr=3"], [1.0], "done")
    os.utime(old, (1, 1))  # the older sweep
    rows = sweep.main([f"sweeps={tmp_path / 'sweeps'}"])
    assert [r["job"] for r in rows] == [1, 0] and (new / "summary.md").is_file() and not (old / "summary.md").exists()
    assert "| 1 | 3 | done | 1.0000 |" in capsys.readouterr().out
    done = subprocess.run(  # the spelling: minillm sweep summarize DIR
        [sys.executable, "-m", "minillm.sweep", "summarize", str(old)], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 0 and f"wrote {old / 'summary.csv'}" in done.stdout and (old / "summary.md").is_file()
    with pytest.raises(SystemExit, match="holds no sweep jobs"):
        sweep.main([f"dir={tmp_path}"])
    with pytest.raises(SystemExit, match="no sweep under"):
        sweep.main([f"sweeps={tmp_path / 'nothing'}"])


def test_a_search_preset_without_the_optuna_sweeper_says_which_extra_to_install(monkeypatch, capsys):
    import importlib.util

    from minillm import train

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if "optuna" in name else real(name, *a))
    with pytest.raises(SystemExit) as exit_:
        train.check_before_hydra(["stage=pretrain", "hparams_search=tiny_optuna"])
    assert exit_.value.code == 2 and "pip install 'minillm-lab[search]'" in capsys.readouterr().err
