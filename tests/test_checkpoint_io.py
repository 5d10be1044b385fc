import errno
import os
import subprocess
import sys

import pytest
import torch

from minillm.checkpoint_io import KILL_ENV, AtomicCheckpointIO, remove_stale_tmp
from minillm.train import build
from tests.conftest import micro_overrides


def test_the_trainer_writes_through_the_atomic_plugin(tmp_path, data_dir):
    run = build(micro_overrides(tmp_path, data_dir))
    assert isinstance(run.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_a_failed_write_leaves_existing_checkpoints_and_no_tmp(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    before = path.read_bytes()

    def disk_full(cls, f, data):
        f.write(data[:10])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(AtomicCheckpointIO, "_write", classmethod(disk_full))
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    assert path.read_bytes() == before  # the old checkpoint is whole
    assert not list(path.parent.glob("*.tmp"))
    assert torch.load(path, weights_only=True)["step"] == 1


def test_stale_tmp_files_are_removed(tmp_path):
    (tmp_path / "step-000004.ckpt.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / "last.ckpt").write_bytes(b"kept")
    assert [p.name for p in remove_stale_tmp(tmp_path)] == ["step-000004.ckpt.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


@pytest.mark.slow
def test_a_kill_at_any_byte_of_a_save_never_leaves_a_truncated_checkpoint(tmp_path, data_dir):
    """SIGKILL the trainer in the middle of its 2nd, 3rd and 4th checkpoint write (fault injection); each time
    every .ckpt on disk loads, and resume=auto continues to the end."""

    def train(root, *extra, kill_after=None):
        env = {**os.environ, KILL_ENV: str(kill_after or 0)}
        args = micro_overrides(
            root, data_dir, "trainer.max_steps=8", "callbacks.checkpoint.every_n_train_steps=2", *extra
        )
        return subprocess.run(
            [sys.executable, "-m", "minillm.train", *args], cwd=tmp_path, env=env, capture_output=True, text=True
        )

    assert train(tmp_path / "probe").returncode == 0
    size = (tmp_path / "probe" / "run" / "checkpoints" / "step-000004.ckpt").stat().st_size
    for cut in (size + size // 3, 2 * size + 17, 3 * size + size // 2):
        root = tmp_path / f"cut{cut}"
        killed = train(root, kill_after=cut)
        assert killed.returncode == -9, killed.stderr[-2000:]
        folder = root / "run" / "checkpoints"
        assert list(folder.glob("*.tmp")), "the kill happened mid-write"
        for ckpt in folder.glob("*.ckpt"):
            torch.load(ckpt, map_location="cpu", weights_only=True)  # never truncated
        resumed = train(root, "resume=auto")
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert "resume=auto: resuming from" in resumed.stdout + resumed.stderr
        assert not list(folder.glob("*.tmp")) and (root / "run" / "final" / "model.safetensors").is_file()
