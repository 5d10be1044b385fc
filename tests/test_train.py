import csv
import json
import logging
import os
import re
import signal

import lightning as L
import pytest
import torch

from minillm.callbacks.interrupt import InterruptCallback
from minillm.generate import load_model
from minillm.train import build
from tests.conftest import micro_overrides


def train_losses(run_dir):
    with (run_dir / "logs" / "metrics.csv").open() as f:
        return [(int(r["step"]), r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


class SignalAt(L.Callback):
    """Sends a real signal to this process at the start of a given batch."""

    def __init__(self, batch: int, sig=signal.SIGTERM):
        self.batch, self.sig = batch, sig

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.batch:
            os.kill(os.getpid(), self.sig)


def test_tiny_pretrain_learns_and_writes_the_run_directory(tmp_path, data_dir):
    run = build(micro_overrides(tmp_path, data_dir, "trainer.max_steps=12", "optim.lr=3e-3"))
    before = {k: v.clone() for k, v in run.module.model.state_dict().items()}
    assert run.fit() == 0
    run_dir = tmp_path / "run"
    losses = [float(v) for _, v in train_losses(run_dir)]
    assert len(losses) == 12 and all(map(lambda x: x == x, losses))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3  # it learns
    with (run_dir / "logs" / "metrics.csv").open() as f:  # MFU against this CPU's measured peak, every step
        mfu = [float(r["train/mfu"]) for r in csv.DictReader(f) if r.get("train/mfu")]
    assert len(mfu) == 11 and all(0 < x < 1 for x in mfu)  # from the second step: a rate needs two clocks
    after = run.module.model.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before)  # every parameter trained
    for name in (
        "training_config_snapshot.json",
        "dataset_stats.json",
        "loss.png",
        "final/model.safetensors",
        "checkpoints/last.ckpt",
        "checkpoints/best.ckpt",
        "checkpoints/tokenizer.model",
        "logs/metrics.csv",
    ):
        assert (run_dir / name).is_file(), name
    snapshot = json.loads((run_dir / "training_config_snapshot.json").read_text())
    assert snapshot["config"]["optim"]["lr"] == 3e-3 and snapshot["versions"]["torch"] == torch.__version__
    stats = json.loads((run_dir / "dataset_stats.json").read_text())
    assert set(stats["sources"]) == {"verses", "prose"}
    assert stats["sources"]["verses"]["raw_records"] == 300
    verses = stats["sources"]["verses"]
    assert verses["train_records"] + verses["val_records"] == 300 and verses["val_records"] > 0
    assert 0.9 < stats["packing_efficiency"] <= 1.0
    steps = sorted(int(p.stem.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*.ckpt"))
    assert steps == [8, 10, 12]  # every 2 steps, the last 3 kept
    model, tokenizer = load_model(str(run_dir / "final"))
    with torch.no_grad():
        ids = torch.tensor([tokenizer.encode("In the beginning")])
        torch.testing.assert_close(model(ids).logits, run.module.model.eval()(ids).logits)
    ckpt_model, _ = load_model(str(run_dir / "checkpoints" / "last.ckpt"))
    torch.testing.assert_close(ckpt_model(ids).logits, model(ids).logits)


def test_interrupt_then_resume_reproduces_the_uninterrupted_losses(tmp_path, data_dir):
    common = ["trainer.max_steps=8", "model.dropout=0.1", "trainer.val_check_interval=4"]
    straight = build(micro_overrides(tmp_path / "a", data_dir, *common))
    assert straight.fit() == 0
    expected = train_losses(tmp_path / "a" / "run")

    interrupted = build(micro_overrides(tmp_path / "b", data_dir, *common))
    interrupted.trainer.callbacks.append(SignalAt(5))
    assert interrupted.fit() == 128 + signal.SIGTERM
    interrupt = next(c for c in interrupted.trainer.callbacks if isinstance(c, InterruptCallback))
    assert interrupt.saved_to.name == "interrupt-step-000006.ckpt" and interrupt.saved_to.is_file()
    assert not (tmp_path / "b" / "run" / "final").exists()  # no export after an interrupt
    assert signal.getsignal(signal.SIGTERM) is not interrupt._handle  # handlers restored

    resumed = build(micro_overrides(tmp_path / "b", data_dir, *common, "resume=auto"))
    assert torch.load(resumed.ckpt_path, weights_only=True)["global_step"] == 6
    assert resumed.fit() == 0
    assert train_losses(tmp_path / "b" / "run") == expected  # bitwise: same floats, same steps
    assert (tmp_path / "b" / "run" / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize(("fast", "expected"), [(False, "32-true"), (True, "bf16-mixed")])
def test_bf16_on_a_cpu_without_a_fast_bf16_kernel_trains_in_fp32(
    tmp_path, data_dir, caplog, monkeypatch, fast, expected
):
    monkeypatch.setattr("minillm.accelerator.cpu_has_fast_bf16", lambda: fast)
    run = build(micro_overrides(tmp_path, data_dir, "trainer.precision=bf16-mixed", "trainer.accelerator=cpu"))
    assert run.trainer.precision == expected
    assert ("training in 32-true instead" in caplog.text) == (not fast)


@pytest.mark.parametrize(
    ("avx512", "avx512_bf16", "amx", "fast"),
    [
        (False, False, False, False),  # AVX2 only: bf16 matmuls in a plain loop (1.0 vs 18.9 GFLOP/s fp32)
        (True, False, False, False),  # AVX-512 without bf16 instructions (63 vs 347 GFLOP/s fp32, measured)
        (True, True, False, True),  # Zen 4 / Cooper Lake: AVX512_BF16 (869 vs 211)
        (True, False, True, True),  # Sapphire Rapids: AMX
    ],
)
def test_fast_bf16_needs_native_bf16_instructions(monkeypatch, avx512, avx512_bf16, amx, fast):
    from minillm import accelerator

    monkeypatch.setattr(accelerator.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_is_avx512_supported", lambda: avx512)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert accelerator.cpu_has_fast_bf16() is fast


def test_resume_auto_without_checkpoints_starts_fresh(tmp_path, data_dir, caplog):
    caplog.set_level("INFO")
    run = build(micro_overrides(tmp_path, data_dir, "resume=auto", "trainer.max_steps=2"))
    assert run.ckpt_path is None
    assert "no checkpoint" in caplog.text and "starting fresh" in caplog.text


def test_a_fresh_run_never_mixes_with_existing_checkpoints(tmp_path, data_dir):
    assert build(micro_overrides(tmp_path, data_dir, "trainer.max_steps=2")).fit() == 0
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    stamp = ckpt.stat().st_mtime_ns
    with pytest.raises(ValueError, match="already holds checkpoints.*resume=auto.*run_dir=.*overwrite=true"):
        build(micro_overrides(tmp_path, data_dir, "trainer.max_steps=2"))
    assert ckpt.stat().st_mtime_ns == stamp
    run = build(micro_overrides(tmp_path, data_dir, "trainer.max_steps=2", "overwrite=true"))
    assert not ckpt.exists() and run.ckpt_path is None


def test_resume_with_changed_hyperparameters_names_them(tmp_path, data_dir):
    assert build(micro_overrides(tmp_path, data_dir, "trainer.max_steps=2")).fit() == 0
    with pytest.raises(ValueError, match=r"optim\.lr: 0\.001 -> 0\.002(.|\n)*trainer\.max_steps: 2 -> 4"):
        build(micro_overrides(tmp_path, data_dir, "resume=auto", "optim.lr=2e-3", "trainer.max_steps=4"))
    run = build(micro_overrides(tmp_path, data_dir, "resume=auto", "trainer.max_steps=4", "resume_allow_changes=true"))
    assert run.fit() == 0 and run.trainer.global_step == 4
    with pytest.raises(ValueError, match="different model shape.*model.n_layer: 2 -> 3"):
        build(micro_overrides(tmp_path, data_dir, "resume=auto", "model.n_layer=3", "resume_allow_changes=true"))


def test_a_finished_run_is_not_redone_until_a_setting_or_its_final_weights_change(tmp_path, data_dir, caplog):
    caplog.set_level("INFO")
    assert build(micro_overrides(tmp_path, data_dir, "trainer.max_steps=2")).fit() == 0
    final = tmp_path / "run" / "final" / "model.safetensors"
    stamp = final.stat().st_mtime_ns
    again = build(micro_overrides(tmp_path, data_dir, "trainer.max_steps=2", "resume=auto"))
    assert again.finished is not None and again.trainer is None
    assert again.fit() == 0 and "is finished (step 2" in caplog.text
    assert final.stat().st_mtime_ns == stamp  # final/ is not rewritten: the next stage's inputs stay the same
    # what final/ holds is asked to change: the run resumes (nothing to train) and exports again
    best = build(micro_overrides(tmp_path, data_dir, "trainer.max_steps=2", "resume=auto", "final.weights=best"))
    assert best.finished is None and best.fit() == 0 and final.stat().st_mtime_ns != stamp
    # more steps: it continues from its checkpoint
    longer = micro_overrides(tmp_path, data_dir, "trainer.max_steps=3", "resume=auto", "resume_allow_changes=true")
    run = build(longer)
    assert run.finished is None and run.fit() == 0 and run.trainer.global_step == 3
    assert build(longer).finished["global_step"] == 3
    # final/ replaced by hand: not the weights the record names, so the run is not taken as done
    final.write_bytes(final.read_bytes()[:-8] + bytes(8))
    assert build(longer).finished is None


def test_resume_auto_skips_a_truncated_newest_checkpoint(tmp_path, data_dir, caplog):
    assert build(micro_overrides(tmp_path, data_dir, "trainer.max_steps=4")).fit() == 0
    (tmp_path / "run" / "finished.json").unlink()  # as if killed before its export
    ckpts = tmp_path / "run" / "checkpoints"
    (ckpts / "last.ckpt").unlink()
    (ckpts / "best.ckpt").unlink()
    newest = ckpts / "step-000004.ckpt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    newest.rename(ckpts / "step-000004.truncated.ckpt")
    run = build(micro_overrides(tmp_path, data_dir, "trainer.max_steps=4", "resume=auto"))
    assert run.ckpt_path.name == "step-000002.ckpt"
    assert "does not load" in caplog.text


@pytest.mark.parametrize("resume, message", [("missing.ckpt", "no checkpoint at"), ("bad.ckpt", "cannot load")])
def test_resume_from_a_bad_path_is_a_clear_error(tmp_path, data_dir, resume, message):
    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=message):
        build(micro_overrides(tmp_path, data_dir, f"resume={tmp_path / resume}"))
    assert (tmp_path / "bad.ckpt").read_bytes() == b"not a checkpoint"


def test_nonfinite_steps_are_skipped_then_training_halts_with_a_checkpoint(tmp_path, data_dir):
    run = build(
        micro_overrides(tmp_path, data_dir, "trainer.max_steps=10", "callbacks.grad_monitor.halt_on_nonfinite=2")
    )

    class PoisonLoss(L.Callback):  # makes every step from step 3 on produce a NaN loss
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step >= 3:
                pl_module.model.embed_tokens.weight.grad = None
                batch["input_ids"][:] = 0
                pl_module.model.norm.eps = float("nan")

    run.trainer.callbacks.append(PoisonLoss())
    weights = {}

    class Snapshot(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            weights[trainer.global_step] = pl_module.model.layers[0].mlp.up_proj.weight.detach().clone()

    run.trainer.callbacks.append(Snapshot())
    assert run.fit() == 1
    assert run.module.stop_reason == "nonfinite" and run.module.skipped_steps == 2
    assert torch.equal(weights[3], weights[5])  # skipped steps did not move the weights
    assert (tmp_path / "run" / "checkpoints" / "halt-step-000005.ckpt").is_file()
    assert not (tmp_path / "run" / "final").exists()


def test_weights_that_break_are_never_checkpointed_or_exported(tmp_path, data_dir, caplog):
    """A step that leaves NaN weights (what optim.lr=inf did): no checkpoint of them, no final/, exit 1, and the
    error names the last good checkpoint, which holds finite weights."""
    run = build(micro_overrides(tmp_path, data_dir, "trainer.max_steps=6", "trainer.val_check_interval=6"))

    class BreakWeights(L.Callback):  # after step 3's update, one weight becomes NaN
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:
                with torch.no_grad():
                    pl_module.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")

    run.trainer.callbacks.insert(0, BreakWeights())
    caplog.set_level(logging.ERROR, logger="minillm")
    assert run.fit() == 1 and run.module.stop_reason == "nonfinite"
    checkpoints = tmp_path / "run" / "checkpoints"
    assert not (tmp_path / "run" / "final").exists()
    assert sorted(p.name for p in checkpoints.glob("*.ckpt")) == ["last.ckpt", "step-000002.ckpt"]
    last = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 2 and all(torch.isfinite(t).all() for t in last["state_dict"].values())
    assert f"The last good state is {checkpoints / 'last.ckpt'}" in caplog.text


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=inf", "optim.lr=inf: every number in the config must be finite"),
        ("trainer.gradient_clip_val=nan", "trainer.gradient_clip_val=nan: every number"),
        ("trainer.max_steps=1.5", "trainer.max_steps=1.5: a count must be a whole number"),
        ("trainer.accumulate_grad_batches=2.0", "trainer.accumulate_grad_batches=2.0: a count"),
    ],
)
def test_non_finite_numbers_and_fractional_counts_are_refused_at_start(tmp_path, data_dir, override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build(micro_overrides(tmp_path, data_dir, override))
    assert not (tmp_path / "run").exists()


def test_resume_with_another_tokenizer_is_refused(tmp_path, data_dir):
    assert build(micro_overrides(tmp_path, data_dir, "trainer.max_steps=2")).fit() == 0
    with pytest.raises(ValueError, match="trained with tokenizer sha256 .* this run's tokenizer is"):
        build(
            micro_overrides(
                tmp_path, data_dir, "resume=auto", "tokenizer.character_coverage=0.999", "resume_allow_changes=true"
            )
        )


def test_resume_with_another_vocabulary_names_its_cause_not_the_preset(tmp_path, data_dir):
    assert build(micro_overrides(tmp_path, data_dir, "trainer.max_steps=2")).fit() == 0
    with pytest.raises(ValueError, match=r"vocabulary of 512 tokens, this run's is 600: tokenizer.vocab_size=600") as e:
        build(micro_overrides(tmp_path, data_dir, "resume=auto", "tokenizer.vocab_size=600"))
    assert "model preset" not in str(e.value)


def test_grad_monitor_warns_on_a_spike_naming_the_step(caplog):
    from types import SimpleNamespace

    from minillm.callbacks.grad_monitor import GradMonitor

    monitor = GradMonitor(spike_factor=5.0, window=20)
    weight = torch.nn.Parameter(torch.zeros(4))
    logged = {}
    module = SimpleNamespace(parameters=lambda: [weight], log_dict=logged.update)
    for step, scale in enumerate([1.0] * 12 + [50.0]):
        weight.grad = torch.full((4,), scale / 2)  # norm = scale
        monitor.on_before_optimizer_step(SimpleNamespace(global_step=step), module, None)
    assert logged["grad/total_norm"] == pytest.approx(50.0) and logged["grad/nonfinite"] == 0
    assert monitor.spikes == [12] and "step 12: gradient norm 50" in caplog.text
    assert "try a lower optim.lr or a longer optim.warmup_steps" in caplog.text  # what to do about it
    weight.grad = torch.tensor([1.0, float("nan"), 0.0, 0.0])
    monitor.on_before_optimizer_step(SimpleNamespace(global_step=13), module, None)
    assert logged["grad/nonfinite"] == 1 and len(monitor.history) == 13  # non-finite norms stay out of the median
    restored = GradMonitor()
    restored.load_state_dict(monitor.state_dict())
    assert restored.history == monitor.history and restored.spikes == [12]


def test_grad_monitor_after_steps_without_gradient_does_not_divide_by_zero():
    """GRPO: a group whose rewards are all equal has zero advantages and no gradient; the first step with one
    after ten such steps is no spike (there is no baseline), and must not stop training (it raised
    ZeroDivisionError in `make quality`)."""
    from types import SimpleNamespace

    from minillm.callbacks.grad_monitor import GradMonitor

    monitor = GradMonitor(spike_factor=5.0, window=20)
    weight = torch.nn.Parameter(torch.zeros(4))
    module = SimpleNamespace(parameters=lambda: [weight], log_dict=lambda d: None)
    for step, scale in enumerate([0.0] * 10 + [3.0]):
        weight.grad = torch.full((4,), scale / 2)
        monitor.on_before_optimizer_step(SimpleNamespace(global_step=step), module, None)
    assert monitor.spikes == [] and monitor.history[-1] == pytest.approx(3.0)


def test_a_setting_added_since_the_checkpoint_at_its_default_is_no_change():
    from minillm.config import compose, resolved_dict
    from minillm.rundir import config_differences

    new = resolved_dict(compose(["stage=pretrain", "model=tiny"]))
    old = {**new, "tokenizer": {k: v for k, v in new["tokenizer"].items() if k != "max_chars"}}
    assert config_differences(old, new) == []  # an older minillm's checkpoint resumes
    changed = resolved_dict(compose(["stage=pretrain", "model=tiny", "tokenizer.max_chars=1000"]))
    assert config_differences(old, changed) == ["tokenizer.max_chars: '<unset>' -> 1000"]
    assert config_differences(new, changed) == ["tokenizer.max_chars: None -> 1000"]
    rlhf = resolved_dict(compose(["stage=rlhf", "model=tiny"]))  # a stage's own key, added since
    before = {**rlhf, "stage": {k: v for k, v in rlhf["stage"].items() if k != "compile_rollouts"}}
    assert config_differences(before, rlhf) == []
    compiled = resolved_dict(compose(["stage=rlhf", "model=tiny", "stage.compile_rollouts=true"]))
    assert config_differences(before, compiled) == ["stage.compile_rollouts: '<unset>' -> True"]


def test_without_matplotlib_a_run_draws_nothing_and_says_so(tmp_path, data_dir, monkeypatch, caplog):
    import logging
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    caplog.set_level(logging.INFO, logger="minillm")
    assert build(micro_overrides(tmp_path, data_dir)).fit() == 0
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file() and not (tmp_path / "run" / "loss.png").exists()
    assert "loss.png not drawn: matplotlib is not installed (pip install 'minillm-lab[plots]'" in caplog.text


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried"),
    ],
)
def test_out_of_memory_is_one_error_line_naming_the_knobs(tmp_path, data_dir, caplog, monkeypatch, error):
    from minillm.train import fit_or_explain

    run = build(micro_overrides(tmp_path, data_dir, "trainer.max_steps=3"))

    def explode(batch, batch_idx):
        raise error

    monkeypatch.setattr(run.module, "training_step", explode)
    caplog.set_level(logging.ERROR, logger="minillm")
    assert fit_or_explain(run) == 1
    (line,) = [
        r.getMessage() for r in caplog.records if r.levelno == logging.ERROR and "out of memory" in r.getMessage()
    ]
    for knob in ("data.batch_size", "trainer.accumulate_grad_batches", "model.block_size", "trainer.max_steps"):
        assert knob in line, knob
    other = build(micro_overrides(tmp_path / "other", data_dir, "trainer.max_steps=3"))
    monkeypatch.setattr(other.module, "training_step", lambda batch, batch_idx: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # not a memory error: it propagates as it is
        fit_or_explain(other)


def test_the_run_dir_lock_is_one_writer_and_gives_way_when_released(tmp_path, data_dir):
    import fcntl

    from minillm import rundir

    run = build(micro_overrides(tmp_path, data_dir, "trainer.max_steps=2"))
    lock = tmp_path / "run" / ".lock"
    assert lock.read_text().startswith(f"PID {os.getpid()} on ")
    build(micro_overrides(tmp_path, data_dir, "trainer.max_steps=2"))  # the same process: its own lock, no refusal
    with open(lock) as f:  # another holder (another open file, as another process would have) is refused
        with pytest.raises(OSError):
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert run.fit() == 0  # fit gives the lock up
    with open(lock) as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(rundir.RunDirBusy, match=r"run_dir=.* is in use by PID \d+ on .*another run_dir="):
            build(micro_overrides(tmp_path, data_dir, "trainer.max_steps=2", "overwrite=true"))


def test_without_validation_checkpoints_and_interrupts_hold_where_validation_would_have_run(tmp_path, data_dir):
    """data.val_ratio=0 with checkpoints and the validation schedule on the same steps (every 2): every step
    checkpoint and last.ckpt are written, a signal at such a step saves and stops there, and a crash just before a
    checkpoint step resumes from the one before; both resumes reproduce the uninterrupted losses."""
    common = ["data.val_ratio=0", "trainer.max_steps=6", "trainer.val_check_interval=2"]
    straight = build(micro_overrides(tmp_path / "a", data_dir, *common))
    assert straight.fit() == 0
    expected = train_losses(tmp_path / "a" / "run")
    names = sorted(p.name for p in (tmp_path / "a" / "run" / "checkpoints").glob("*.ckpt"))
    assert names == ["last.ckpt", "step-000002.ckpt", "step-000004.ckpt", "step-000006.ckpt"]

    interrupted = build(micro_overrides(tmp_path / "b", data_dir, *common))
    interrupted.trainer.callbacks.append(SignalAt(3))  # handled at the end of step 4, a validation step
    assert interrupted.fit() == 128 + signal.SIGTERM
    interrupt = next(c for c in interrupted.trainer.callbacks if isinstance(c, InterruptCallback))
    assert interrupt.saved_to.name == "interrupt-step-000004.ckpt" and interrupt.saved_to.is_file()
    assert build(micro_overrides(tmp_path / "b", data_dir, *common, "resume=auto")).fit() == 0
    assert train_losses(tmp_path / "b" / "run") == expected

    class Crash(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:  # the step before checkpoint 4: step-000002 is the newest
                raise RuntimeError("simulated crash")

    crashed = build(micro_overrides(tmp_path / "c", data_dir, *common))
    crashed.trainer.callbacks.append(Crash())
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.fit()
    resumed = build(micro_overrides(tmp_path / "c", data_dir, *common, "resume=auto"))
    assert torch.load(resumed.ckpt_path, weights_only=True)["global_step"] == 2
    assert resumed.fit() == 0
    assert train_losses(tmp_path / "c" / "run") == expected


def test_compile_without_a_compiler_is_refused_before_the_data_set_up(tmp_path, data_dir, monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(ValueError, match=r"compile=true needs a C\+\+ compiler .* or set compile=false"):
        build(micro_overrides(tmp_path, data_dir, "compile=true"))
    assert not (tmp_path / "datasets").exists()  # refused before the data was read


def test_a_refused_build_leaves_the_run_dir_free(tmp_path, data_dir, monkeypatch):
    from minillm import rundir

    with pytest.raises(FileNotFoundError, match="init_from=.*nowhere: no such folder"):  # before the lock: no run dir
        build(micro_overrides(tmp_path, data_dir, "init_from=" + str(tmp_path / "nowhere")))
    assert not (tmp_path / "run").exists()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rundir, "write_snapshot", full_disk)  # a failure after the lock was taken
    with pytest.raises(OSError, match="No space left"):
        build(micro_overrides(tmp_path, data_dir))
    assert (tmp_path / "run" / ".lock").is_file() and (tmp_path / "run").resolve() not in rundir._HELD


def test_the_default_precision_is_bf16_on_a_bf16_gpu_and_fp32_elsewhere(tmp_path, data_dir, monkeypatch):
    from minillm import accelerator

    run = build(micro_overrides(tmp_path, data_dir))  # trainer.precision=auto (the default) on this CPU
    assert run.trainer.precision == "32-true" and run.config.trainer.precision == "32-true"  # recorded as resolved
    monkeypatch.setattr(accelerator, "best_device", lambda: "cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert accelerator.training_precision("auto", "auto") == ("bf16-mixed", None)
    assert accelerator.training_precision("auto", "gpu") == ("bf16-mixed", None)
    assert accelerator.training_precision("auto", "cpu")[0] == "32-true"  # asked for the CPU on a GPU machine
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # a V100, a T4
    assert accelerator.training_precision("auto", "auto")[0] == "32-true"
