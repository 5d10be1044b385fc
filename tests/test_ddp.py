"""Multi-process training on Lightning's DDP (ddp_spawn, 2 CPU processes over gloo), slow."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from minillm.train import build
from tests.conftest import micro_overrides


class RankProbe(L.Callback):
    """Records the first tokens of every sample each rank trains on, to <out>/rank<r>.json; `stop_at` ends the
    fit after that many steps (an interruption that keeps every other setting, max_steps included)."""

    def __init__(self, out: str, stop_at: int = 0) -> None:
        self.out, self.stop_at, self.seen = Path(out), stop_at, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append(batch["input_ids"][:, :4].tolist())

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
    # the first step's gradient (not the weights after it: Adam's first step is ~lr * sign(g), blind to a scale)
    want = torch.load(tmp_path / "single" / "grads" / "grads0.pt")
    for rank in (0, 1):
        got = torch.load(tmp_path / "ddp" / "grads" / f"grads{rank}.pt")
        assert got.keys() == want.keys() and len(want) > 0
        for k, g in want.items():
            torch.testing.assert_close(got[k], g, atol=1e-6, rtol=1e-4, msg=f"rank {rank}: {k}")

    r0, r1 = (json.loads((tmp_path / "ddp" / "probe" / f"rank{r}.json").read_text()) for r in (0, 1))
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
