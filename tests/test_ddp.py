"""Multi-process training on Lightning's DDP (ddp_spawn, 2 CPU processes over gloo), slow."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from minillm.train import build
from tests.conftest import micro_overrides, pair_overrides
from tests.test_rlhf import rlhf  # also registers its test rewards (quarter_tokens) in every spawned rank


class RankProbe(L.Callback):
    """Records the first tokens of every sample each rank trains on, to <out>/rank<r>.json; `stop_at` ends the
    fit after that many steps (an interruption that keeps every other setting, max_steps included)."""

    def __init__(self, out: str, stop_at: int = 0) -> None:
        self.out, self.stop_at, self.seen = Path(out), stop_at, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        ids = batch["input_ids"] if "input_ids" in batch else batch["chosen_ids"]  # preference stages: pairs
        self.seen.append(ids[:, :4].tolist())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.stop_at and trainer.global_step >= self.stop_at:
            trainer.should_stop = True

    def on_train_end(self, trainer, pl_module) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.seen))


class GradDump(L.Callback):
    """Writes the first optimizer step's gradients (after DDP's all-reduce) to <out>/grads<rank>.pt."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}
            torch.save(grads, self.out / f"grads{trainer.global_rank}.pt")


def same_first_step(single: Path, ddp: Path, label: str) -> None:
    """Both ranks' first all-reduced gradient (GradDump) equals the 1-process run's with the same global batch (the
    gradient, not the weights after it: Adam's first step is ~lr * sign(g), blind to a scale)."""
    want = torch.load(single / "grads" / "grads0.pt")
    for rank in (0, 1):
        got = torch.load(ddp / "grads" / f"grads{rank}.pt")
        assert got.keys() == want.keys() and len(want) > 0
        for k, g in want.items():
            torch.testing.assert_close(got[k], g, atol=1e-6, rtol=1e-4, msg=f"{label}, rank {rank}: {k}")


def rank_samples(probe: Path) -> tuple[list, list]:
    """What RankProbe recorded on rank 0 and rank 1."""
    r0, r1 = (json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1))
    return r0, r1


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def ddp(root: Path, data_dir: Path, *extra: str, stop_at: int = 0) -> list[str]:
    probe = f"+callbacks.probe={{_target_:tests.test_ddp.RankProbe,out:{root}/probe,stop_at:{stop_at}}}"
    return micro_overrides(
        root,
        data_dir,
        "trainer=ddp_spawn",
        "trainer.accelerator=cpu",
        "trainer.max_steps=6",
        "model.dropout=0",
        probe,
        *extra,
    )


@pytest.mark.slow
def test_two_processes_split_the_data_match_one_process_and_resume_exactly(tmp_path, data_dir):
    # one process with the same global batch: data.batch_size is per process, so 2 ranks × 4 == 1 × 8
    dump = "+callbacks.grads={{_target_:tests.test_ddp.GradDump,out:{}/grads}}"
    single = build(
        micro_overrides(
            tmp_path / "single",
            data_dir,
            "trainer.max_steps=6",
            "model.dropout=0",
            "data.batch_size=8",
            dump.format(tmp_path / "single"),
        )
    )
    assert single.fit() == 0
    run = build(ddp(tmp_path / "ddp", data_dir, dump.format(tmp_path / "ddp")))
    assert run.fit() == 0
    same_first_step(tmp_path / "single", tmp_path / "ddp", "pretrain")

    r0, r1 = rank_samples(tmp_path / "ddp" / "probe")
    assert len(r0) == len(r1) == 6
    assert all(a != b for a, b in zip(r0, r1))  # different samples on the two ranks
    single_ref = weights(tmp_path / "single" / "run" / "final")
    for k, v in weights(tmp_path / "ddp" / "run" / "final").items():
        torch.testing.assert_close(v, single_ref[k], atol=2e-4, rtol=1e-3, msg=k)

    outputs = sorted(p.name for p in (tmp_path / "ddp").iterdir())
    assert outputs == ["datasets", "grads", "probe", "run", "tokenizers"]  # one run dir, no per-rank copies
    ckpts = sorted(p.name for p in (tmp_path / "ddp" / "run" / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in ckpts and not any("rank" in c for c in ckpts)

    # exact resume under DDP: 3 steps + 3 resumed == 6
    every = "callbacks.checkpoint.every_n_train_steps=3"
    assert build(ddp(tmp_path / "half", data_dir, every, stop_at=3)).fit() == 0
    resumed = build(ddp(tmp_path / "half", data_dir, every, "resume=auto", "resume_allow_changes=true"))  # stop_at
    assert resumed.fit() == 0
    full = weights(tmp_path / "ddp" / "run" / "final")
    for k, v in weights(tmp_path / "half" / "run" / "final").items():
        torch.testing.assert_close(v, full[k], atol=1e-6, rtol=1e-6, msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "dpo", "reward"])
def test_every_stage_that_starts_from_weights_trains_on_two_processes(tmp_path, stage, pretrained, chat_dir, pref_dir):
    """SFT, DPO (with its frozen reference on each rank) and the reward model on 2 CPU processes: the ranks see
    different samples, the first step's all-reduced gradient equals a 1-process run with the same global batch, and
    only rank 0 writes (one run dir, one final/)."""

    def overrides(root: Path, *extra: str) -> list[str]:
        common = ("trainer.max_steps=3", "model.dropout=0", *extra)
        if stage == "sft":
            return micro_overrides(root, chat_dir, f"init_from={pretrained}", *common, stage="sft")
        return pair_overrides(root, pref_dir, pretrained, *common, stage=stage)

    dump = "+callbacks.grads={{_target_:tests.test_ddp.GradDump,out:{}/grads}}"
    single = build(overrides(tmp_path / "single", "data.batch_size=8", dump.format(tmp_path / "single")))
    assert single.fit() == 0
    probe = f"+callbacks.probe={{_target_:tests.test_ddp.RankProbe,out:{tmp_path}/ddp/probe,stop_at:0}}"
    both = ["trainer=ddp_spawn", "trainer.accelerator=cpu", probe, dump.format(tmp_path / "ddp")]
    assert build(overrides(tmp_path / "ddp", *both)).fit() == 0
    same_first_step(tmp_path / "single", tmp_path / "ddp", stage)
    r0, r1 = rank_samples(tmp_path / "ddp" / "probe")
    assert len(r0) == len(r1) == 3 and all(a != b for a, b in zip(r0, r1))
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == ["datasets", "grads", "probe", "run"]
    assert (tmp_path / "ddp" / "run" / "final" / "model.safetensors").is_file()
    assert not any("rank" in p.name for p in (tmp_path / "ddp" / "run").rglob("*"))


class WeightsDigest(L.Callback):
    """Writes each rank's policy weights at the end of training to <out>/weights<rank>.pt."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_train_end(self, trainer, pl_module) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}
        torch.save(state, self.out / f"weights{trainer.global_rank}.pt")


class RolloutSeeds(L.Callback):
    """Writes the sampling seed of each of a rank's rollouts to <out>/seeds<rank>.json."""

    def __init__(self, out: str) -> None:
        self.out, self.seeds = Path(out), []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seeds.append(pl_module.rollout_seed())

    def on_train_end(self, trainer, pl_module) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"seeds{trainer.global_rank}.json").write_text(json.dumps(self.seeds))


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_rlhf_on_two_processes_keeps_the_ranks_in_step(tmp_path, algorithm, prompt_dir, pretrained):
    """PPO (with its critic) and GRPO under DDP: each rank rolls out its own prompts with its own sampling seeds, the
    manual optimization's updates are all-reduced so both ranks end with the same weights (and they moved), and only
    rank 0 writes."""
    probe = f"+callbacks.probe={{_target_:tests.test_ddp.RankProbe,out:{tmp_path}/probe,stop_at:0}}"
    digest = f"+callbacks.digest={{_target_:tests.test_ddp.WeightsDigest,out:{tmp_path}/weights}}"
    seeds = f"+callbacks.seeds={{_target_:tests.test_ddp.RolloutSeeds,out:{tmp_path}/seeds}}"
    extra = ["trainer=ddp_spawn", "trainer.accelerator=cpu", "trainer.max_steps=2", "model.dropout=0"]
    extra += [f"stage.algorithm={algorithm}", "stage.reward=quarter_tokens", probe, digest, seeds]
    assert build(rlhf(tmp_path, prompt_dir, pretrained, *extra)).fit() == 0
    s0, s1 = (json.loads((tmp_path / "seeds" / f"seeds{r}.json").read_text()) for r in (0, 1))
    assert len(s0) == len(s1) == 2 and not set(s0) & set(s1)  # each rank samples with its own seeds
    r0, r1 = rank_samples(tmp_path / "probe")
    assert len(r0) == len(r1) == 2 and all(a != b for a, b in zip(r0, r1))  # each rank its own prompts
    w0, w1 = (torch.load(tmp_path / "weights" / f"weights{r}.pt") for r in (0, 1))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    start = weights(pretrained)
    assert any(not torch.equal(w0[k], start["model." + k]) for k in w0 if "model." + k in start)
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    assert not any("rank" in p.name for p in (tmp_path / "run").rglob("*"))


@pytest.mark.slow
def test_torchrun_starts_the_ranks_and_trainer_ddp_joins_them(tmp_path, data_dir):
    """The launch a GPU node uses, on 2 CPU processes: torchrun starts every rank from outside, `trainer=ddp`
    joins them, they train together, and rank 0 alone writes the run."""
    import subprocess
    import sys

    probe = f"+callbacks.probe={{_target_:tests.test_ddp.RankProbe,out:{tmp_path}/probe,stop_at:0}}"
    args = micro_overrides(tmp_path, data_dir, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", probe)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "minillm.train", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = rank_samples(tmp_path / "probe")
    assert len(r0) == len(r1) == 6 and all(a != b for a, b in zip(r0, r1))  # one global batch, split
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    assert not any("rank" in p.name for p in (tmp_path / "run").rglob("*"))
