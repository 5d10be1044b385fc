"""The run directory: which checkpoint to resume, refusing to mix runs, and the config snapshot.

<run_dir>/checkpoints/   step-000400.ckpt, last.ckpt, best.ckpt, minillm.json, tokenizer.model
<run_dir>/final/         the exported model (a completed fit only)
<run_dir>/finished.json  what final/ was trained with (a later resume=auto with the same settings does nothing)
<run_dir>/logs/          metrics.csv (CSV logger), tb/ (TensorBoard)
<run_dir>/training_config_snapshot.json  dataset_stats.json  loss.png  train.log
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from minillm.files import file_sha256, weight_files, write_text_atomic

if TYPE_CHECKING:
    from minillm.model import MiniGPT, RewardModel
    from minillm.tokenizer import Tokenizer

log = logging.getLogger(__name__)
SNAPSHOT = "training_config_snapshot.json"
FINISHED = "finished.json"
# Keys that may change between an interrupted run and its resume without changing what is trained.
RESUME_FREE_KEYS = (
    "resume",
    "resume_allow_changes",
    "overwrite",
    "debug",
    "prompt",
    "optimized_metric",
    "data.num_workers",
    "data.num_proc",
    "data.cache_dir",
    "data.dir",
    "tokenizer.retrain",
    "tokenizer.cache_dir",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "callbacks.progress",
    "callbacks.device_stats",
    "callbacks.early_stopping",
    "logger",
    "final",  # which weights final/ gets
    "callbacks.final",  # writes final/ and the files beside the checkpoints: no effect on training
    "export",  # the earlier names of final and callbacks.final: runs started before the rename still resume
    "callbacks.export",
    # where the run lives: a run dir that was moved or copied still resumes
    "run_dir",
    "callbacks.checkpoint.dirpath",
    "callbacks.best_checkpoint.dirpath",
    "callbacks.best_checkpoint._target_",  # lightning's ModelCheckpoint before BestCheckpoint: the same best.ckpt
    "callbacks.interrupt.dirpath",
    "callbacks.loss_plot.run_dir",
)
SHAPE_KEYS = (
    "vocab_size",
    "n_layer",
    "n_embd",
    "n_head",
    "n_kv_head",
    "intermediate_size",
    "n_experts",
    "n_shared_experts",
    "tie_embeddings",
    "attention_bias",
)
# what the model computes besides its shape: taken from the init weights with it (init_architecture)
ARCHITECTURE_KEYS = SHAPE_KEYS + ("rope_theta", "norm_eps", "n_experts_per_tok", "max_position_embeddings")


class ResumeError(ValueError):
    pass


def stage_dir(stage: str, model_name: str, root: Path = Path("outputs")) -> Path:
    """<outputs>/<stage>_<model>: where `python -m minillm.train stage=<stage> model=<model>` writes by default
    (conf/train.yaml's run_dir, `outputs` its root); its final/ is what the next stage starts from."""
    return Path(root) / f"{stage}_{model_name}"


def final_dir(stage: str, model_name: str, root: Path = Path("outputs")) -> Path:
    return stage_dir(stage, model_name, root) / "final"


@dataclass
class StageInputs:
    """What a stage starts from besides its data, resolved from the run config and the stage's `Needs`."""

    tokenizer: Tokenizer
    init_dir: Path | None = None
    init_model: MiniGPT | None = None  # the parent's weights (also the frozen reference's)
    init_sha256: str | None = None
    reward_model: RewardModel | None = None
    data_dir: Path | None = None  # the data dir the run reads (held-out eval records live under it)
    settings: dict[str, object] = field(default_factory=dict)  # config keys these inputs decide -> values

    def check_shape(self, model: dict) -> None:
        if self.init_model is not None:
            check_same_shape(asdict(self.init_model.config), model, self.init_dir)


def inputs_for(config, needs, data_dir: Path | None, files: list, explicit: Collection[str] = ()) -> StageInputs:
    """The tokenizer (the init weights' own, or trained on `files` when there are none), the init weights, and
    the reward model when `needs` says so. `settings` records what they decide in the run config: init_from and
    its sha256, the architecture (`init_architecture`; `explicit`: the model keys the command line set), the
    vocabulary size, the reward model and its sha256."""
    from minillm.data.datamodule import corpus_tokenizer
    from minillm.pretrained import load_pretrained, load_reward_model

    init_dir = resolve_init(config.init_from, config.stage.parent, config.model.name, Path(config.outputs))
    settings: dict[str, object] = {}
    if init_dir is None:  # only pretraining trains a tokenizer
        inputs = StageInputs(tokenizer=corpus_tokenizer(files, config.tokenizer, config.data.streaming))
    else:  # later stages take the tokenizer saved with their init weights
        model, tokenizer = load_pretrained(init_dir)
        inputs = StageInputs(tokenizer, init_dir, model, weights_sha256(init_dir))
        settings |= {"init_from": str(init_dir), "init_sha256": inputs.init_sha256}
        settings |= init_architecture(asdict(model.config), asdict(config.model), explicit, init_dir)
        if config.tokenizer.vocab_size != tokenizer.vocab_size:  # the snapshot records the tokenizer really used
            log.warning(
                "tokenizer.vocab_size=%d is not used: the tokenizer comes with init_from=%s (%d pieces)",
                config.tokenizer.vocab_size,
                init_dir,
                tokenizer.vocab_size,
            )
            settings["tokenizer.vocab_size"] = tokenizer.vocab_size
    # the init weights' table (a Hugging Face model's may have more rows than its tokenizer has tokens), else the
    # tokenizer's size
    vocab = inputs.tokenizer.vocab_size if inputs.init_model is None else inputs.init_model.config.vocab_size
    if config.model.vocab_size not in (0, vocab):
        raise ValueError(
            f"model.vocab_size={config.model.vocab_size} but the tokenizer has {inputs.tokenizer.vocab_size} "
            "pieces; leave model.vocab_size at 0 (taken from the tokenizer) or set tokenizer.vocab_size"
        )
    settings["model.vocab_size"] = vocab
    if needs.reward_model:
        reward_dir = resolve_reward_model(config.stage.reward_model, config.model.name, Path(config.outputs))
        inputs.reward_model, reward_tokenizer = load_reward_model(reward_dir)
        if reward_tokenizer.sha256 != inputs.tokenizer.sha256:
            raise ValueError(
                f"the reward model {reward_dir} was trained with another tokenizer than the policy {init_dir}; "
                "train both from the same pretraining run"
            )
        settings |= {"stage.reward_model": str(reward_dir), "stage.reward_model_sha256": weights_sha256(reward_dir)}
    inputs.settings, inputs.data_dir = settings, data_dir
    return inputs


def resolve_init(
    init_from: str | None, parent: str | None, model_name: str, outputs: Path = Path("outputs")
) -> Path | None:
    """The weights a stage starts from: its parent stage's final/ (init_from=auto), a given path, or none.

    `parent` may list alternatives, "dpo|sft": the first whose final/ exists."""
    if init_from in (None, "", "none", "null") or (init_from == "auto" and parent is None):
        return None
    if init_from == "auto":
        parents = parent.split("|")
        paths = [final_dir(p, model_name, outputs) for p in parents]
        found = next((p for p in paths if (p / "minillm.json").is_file()), None)
        if found is None:
            raise FileNotFoundError(
                f"init_from=auto needs the {' or '.join(parents)} stage's weights, but "
                f"{' and '.join(map(str, paths))} do not exist. Run `python -m minillm.train stage={parents[-1]} "
                f"model={model_name}` first, or set init_from=<exported folder or .ckpt>"
            )
        return found
    path = Path(init_from)
    if path.exists():
        return path
    from minillm.pretrained import find_model, is_model_id  # a model id: its snapshot in the Hugging Face cache

    if not is_model_id(init_from):
        raise FileNotFoundError(f"init_from={init_from}: no such folder or checkpoint")
    try:
        return find_model(init_from)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"init_from={init_from}: {e}") from None


def resolve_reward_model(reward_model: str | None, model_name: str, outputs: Path = Path("outputs")) -> Path:
    """stage.reward_model, or <outputs>/reward_<model>/final; a missing one says how to train it."""
    path = Path(reward_model) if reward_model else final_dir("reward", model_name, outputs)
    if not path.exists():
        raise FileNotFoundError(
            f"stage.reward=model needs a trained reward model, but {path} does not exist. Train it first: "
            f"`python -m minillm.train stage=reward model={model_name}` (or set stage.reward_model=<folder>, or "
            "use a rule-based reward: stage.reward=verifiable)"
        )
    return path


def weights_sha256(path: Path) -> str:
    """sha256 of the weights of a model folder (of model.safetensors; of a sharded folder's shard hashes in
    order) or of a checkpoint file."""
    if not path.is_dir():
        return file_sha256(path)
    files = weight_files(path) or [path / "model.safetensors"]
    if len(files) == 1:
        return file_sha256(files[0])
    return hashlib.sha256("".join(file_sha256(f) for f in files).encode()).hexdigest()


def shape(model: dict) -> dict:
    """The shape keys of a model config with derived values filled in (intermediate_size 0 = derived)."""
    from minillm.model import ModelConfig

    known = {k: v for k, v in model.items() if k in ModelConfig.__dataclass_fields__}
    return {k: model.get(k, False if k == "attention_bias" else None) for k in SHAPE_KEYS} | {
        "intermediate_size": ModelConfig(**known).ffn_dim
    }


def init_architecture(init: dict, model: dict, explicit: Collection[str], where: Path) -> dict[str, object]:
    """The model settings the init weights decide: each architecture key (ARCHITECTURE_KEYS) where they differ
    from the preset's, so `init_from=<folder>` needs no matching `model=` (a Hugging Face folder brings its own
    shape, RoPE base and norm epsilon). A key the command line set (`explicit`, e.g. model.n_layer=3) is kept, and
    `check_same_shape` then names the conflict."""
    a = {k: init.get(k) for k in ARCHITECTURE_KEYS} | shape(init)
    b = {k: model.get(k) for k in ARCHITECTURE_KEYS} | shape(model)
    adopted = {
        f"model.{k}": a[k] for k in ARCHITECTURE_KEYS if k != "vocab_size" and a[k] != b[k] and k not in explicit
    }
    if adopted:
        log.info(
            "the architecture comes with init_from=%s: %s",
            where,
            ", ".join(f"{k} {b[k.removeprefix('model.')]!r} -> {v!r}" for k, v in adopted.items()),
        )
    return adopted


def check_same_shape(init: dict, model: dict, where: Path) -> None:
    a, b = shape(init), shape(model)
    diffs = [f"{k}: {a[k]!r} (init) vs {b[k]!r}" for k in SHAPE_KEYS if a[k] != b[k]]
    if diffs:
        raise ResumeError(
            f"init_from={where} has a different architecture ({'; '.join(diffs)}); use the model "
            f"preset it was trained with (model=..., or model.<key>=... for each key above), or set init_from to "
            "weights of this shape"
        )


def checkpoint_files(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob("*.ckpt"))


def read_checkpoint(path: Path) -> dict:
    """The checkpoint's contents (tensors memory-mapped), loaded safely; a clear error when it can't be."""
    if not path.is_file():
        raise ResumeError(f"resume: no checkpoint at {path}; use resume=auto or an existing .ckpt file")
    try:
        import torch

        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:  # objects that only unpickling (running code) would rebuild
        raise ResumeError(
            f"resume: {path} holds pickled Python objects besides tensors, which minillm never writes and will not "
            "load (loading them runs code from the file). Resume from a checkpoint minillm.train wrote. Nothing was "
            "changed."
        ) from e
    except Exception as e:  # truncated, corrupt
        raise ResumeError(
            f"resume: cannot load {path} ({type(e).__name__}: {str(e)[:300]}); "
            "the file is corrupt or not a minillm checkpoint. Nothing was changed."
        ) from e


# resume=auto: the highest step; at the same step a file written at the step's end before one written in the
# middle of a fit; never best.ckpt (a file for export and evaluation, whatever step it holds).
RESUME_PREFERENCE = ("interrupt-", "halt-", "last", "step-")


def _resume_rank(path: Path) -> int:
    return next((len(RESUME_PREFERENCE) - i for i, p in enumerate(RESUME_PREFERENCE) if path.name.startswith(p)), 0)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The loadable checkpoint with the highest step (an unreadable newer one is skipped with a warning)."""
    best: tuple[int, int, Path] | None = None
    for path in checkpoint_files(run_dir):
        if _resume_rank(path) == 0:  # best.ckpt, or a file minillm did not write
            continue
        try:
            step = int(read_checkpoint(path).get("global_step", -1))
        except ResumeError as e:
            log.warning("resume=auto: skipping %s, it does not load (%s)", path, e.__cause__)
            continue
        rank = (step, _resume_rank(path), path)
        best = rank if best is None or rank[:2] > best[:2] else best
    return best[2] if best else None


def _writable(folder: Path) -> bool:
    """Whether a file can be created in `folder` (tried: permission bits do not stop root, a read-only mount does)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


LOCK = ".lock"
_HELD: dict[Path, int] = {}  # run dir -> the open, flock'ed lock file of this process


class RunDirBusy(ValueError):
    """Another process is writing this run dir."""


def launched_rank() -> int:
    """This process's global rank as its launcher set it (torchrun, SLURM, Lightning's ddp): 0 when alone."""
    for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def lock_run_dir(run_dir: Path) -> bool:
    """One writer per run dir: an exclusive OS lock (flock) on `<run_dir>/.lock`, which names its holder (PID,
    host, start). The OS drops the lock when the process ends however it ends, so a lock file left by a dead
    process never blocks. A second command on a held run dir is refused naming the holder; taking a lock this
    process holds already is a no-op. Other ranks of a multi-process run share rank 0's lock. Returns whether this
    call took the lock."""
    import fcntl
    import socket

    key = Path(run_dir).resolve()
    if key in _HELD or launched_rank() != 0:
        return False
    key.mkdir(parents=True, exist_ok=True)
    fd = os.open(key / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 300).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        raise RunDirBusy(
            f"run_dir={run_dir} is in use by {holder}: two commands must not write one run dir. Wait for it to "
            "finish (or stop it), or give this command another run_dir="
        ) from None
    os.ftruncate(fd, 0)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    os.write(fd, f"PID {os.getpid()} on {socket.gethostname()} (since {started})\n".encode())
    _HELD[key] = fd
    return True


def unlock_run_dir(run_dir: Path) -> None:
    """Give up this process's lock of `run_dir` (no-op when it holds none)."""
    import fcntl

    fd = _HELD.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def check_run_dir(run_dir: Path) -> None:
    """A run dir must be (or be creatable as) a writable folder: no part of its path may be an existing file.
    Called before Hydra creates the folder and its train.log (see train.py), so a refused command writes nothing."""
    for part in [run_dir, *run_dir.parents]:
        if not part.exists():
            continue
        if not part.is_dir():
            raise ValueError(f"run_dir={run_dir}: {part} is a file, not a folder; choose another run_dir")
        if _writable(part):
            for sub in ("checkpoints", "logs"):  # a run dir copied read-only keeps read-only subfolders
                if (run_dir / sub).is_dir() and not _writable(run_dir / sub):
                    raise ValueError(_read_only(run_dir, run_dir / sub))
            return
        if part == run_dir:
            raise ValueError(_read_only(run_dir, run_dir))
        raise ValueError(
            f"run_dir={run_dir}: {part} is not writable (a read-only disk or folder); choose a run_dir on a "
            "writable disk"
        )


def check_cache_dir(folder: Path, key: str) -> None:
    """A cache folder (`key`: the config key that names it) must be writable, or creatable under a writable
    folder; else an error naming the key (a read-only working folder, where the default data/ caches go)."""
    for part in [folder, *folder.parents]:
        if part.exists():
            if part.is_dir() and _writable(part):
                return
            raise ValueError(
                f"{key}={folder}: {part} is not writable (a read-only folder or disk; relative paths are under "
                f"{Path.cwd()}); run from a writable folder or set {key}= to a writable place"
            )


def _read_only(run_dir: Path, folder: Path) -> str:
    return (
        f"run_dir={run_dir}: {folder} is not writable (a read-only disk or folder). To continue this run, copy the "
        "run dir to a writable place and resume the copy: run_dir=<copy> resume=auto (a copied run dir resumes "
        "exactly)"
    )


def resolve_resume(run_dir: Path, resume: str | None, overwrite: bool) -> Path | None:
    """The checkpoint to resume from, or None for a fresh start. Checks only; changes nothing on disk."""
    if resume == "auto":
        path = latest_checkpoint(run_dir)
        if path is None:
            log.info("resume=auto: no checkpoint in %s, starting fresh", run_dir / "checkpoints")
        else:
            log.info("resume=auto: resuming from %s", path)
        return path
    if resume:
        read_checkpoint(Path(resume))
        return Path(resume)
    existing = checkpoint_files(run_dir)
    if existing and not overwrite:
        raise ResumeError(
            f"{run_dir} already holds checkpoints ({', '.join(p.name for p in existing[:4])}…). Continue it with "
            "resume=auto, start elsewhere with run_dir=<new dir>, or replace it with overwrite=true"
        )
    return None


def clear_for_overwrite(run_dir: Path) -> None:
    for name in ("checkpoints", "final", "logs"):
        shutil.rmtree(run_dir / name, ignore_errors=True)
    (run_dir / FINISHED).unlink(missing_ok=True)
    log.warning("overwrite=true: removed the previous checkpoints, logs and final/ of %s", run_dir)


def _flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(old: dict, new: dict) -> list[str]:
    """`key: old -> new` for every trained-on setting that differs. A key the checkpoint's config lacks (a
    setting added by a later minillm) at its schema default is no difference: old runs keep resuming."""
    from omegaconf import OmegaConf

    from minillm.config import STAGES, Config

    a, b = _flatten(old), _flatten(new)
    defaults = _flatten(OmegaConf.to_container(OmegaConf.structured(Config)))
    if b.get("stage.name") in STAGES:  # the stage's own keys have their own schema
        stage = OmegaConf.to_container(OmegaConf.structured(STAGES[b["stage.name"]]))
        defaults |= _flatten({"stage": stage})

    def free(key: str) -> bool:
        return any(key == k or key.startswith(k + ".") for k in RESUME_FREE_KEYS)

    def added_at_default(key: str) -> bool:
        return key not in a and key in defaults and b.get(key) == defaults[key]

    return [
        f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}"
        for k in sorted(set(a) | set(b))
        if not free(k) and a.get(k) != b.get(k) and not added_at_default(k)
    ]


def check_resume(path: Path, config: dict, tokenizer_sha256: str, allow_changes: bool) -> None:
    """Refuse a resume whose model shape or tokenizer differ, or (unless allowed) whose hyper-parameters do."""
    hparams = read_checkpoint(path).get("hyper_parameters") or {}
    old = hparams.get("config")
    if not isinstance(old, dict):
        raise ResumeError(f"{path} carries no minillm config: it was not written by minillm.train")
    a, b = shape(old["model"]), shape(config["model"])
    changed = [f"model.{k}: {a[k]!r} -> {b[k]!r}" for k in SHAPE_KEYS if a[k] != b[k]]
    if changed == [f"model.vocab_size: {a['vocab_size']!r} -> {b['vocab_size']!r}"]:  # the tokenizer, not the preset
        was, now = old.get("init_from"), config.get("init_from")
        source = (
            f"init_from={now} brings its own tokenizer (the checkpoint's run started from init_from={was})"
            if now not in (None, "auto") or was not in (None, "auto")
            else f"tokenizer.vocab_size={config.get('tokenizer', {}).get('vocab_size')} builds another tokenizer"
        )
        raise ResumeError(
            f"{path} was trained with a vocabulary of {a['vocab_size']} tokens, this run's is {b['vocab_size']}: "
            f"{source}. Resume with the settings the run started with, or start a new run_dir"
        )
    if changed:
        raise ResumeError(
            f"{path} is a checkpoint of a different model shape ({'; '.join(changed)}); resume it with "
            "the same model preset, or start a new run_dir"
        )
    old_lora, new_lora = _lora_of(old["model"]), _lora_of(config["model"])
    if old_lora != new_lora:  # adapters or not, and which: the checkpoint's tensors are these
        was = f"with LoRA adapters ({old_lora})" if old_lora else "without LoRA (all weights)"
        raise ResumeError(
            f"{path} was trained {was}, this run has {new_lora or 'model.lora.r=0'}: resume it with the model.lora "
            "settings it was trained with, or start a new run_dir"
        )
    had, has = ((c.get("stage") or {}).get("likelihood_weight") is not None for c in (old, config))
    if had != has:  # the reward model's tensors: with a likelihood weight or without
        raise ResumeError(
            f"{path} is a reward model trained {'with' if had else 'without'} stage.likelihood_weight, this run "
            f"is {'with' if has else 'without'} one: resume it with the setting it was trained with, or start a new "
            "run_dir"
        )
    if hparams.get("tokenizer_sha256") != tokenizer_sha256:
        raise ResumeError(
            f"{path} was trained with tokenizer sha256 {str(hparams.get('tokenizer_sha256'))[:12]}…, "
            f"this run's tokenizer is {tokenizer_sha256[:12]}… (the corpus or tokenizer settings "
            "changed); resume with the original data, or start a new run_dir"
        )
    if old.get("init_sha256") != config.get("init_sha256"):
        raise ResumeError(
            f"{path} started from init weights with sha256 {str(old.get('init_sha256'))[:12]}…, but "
            f"{config.get('init_from')} now has {str(config.get('init_sha256'))[:12]}… (the parent "
            "stage was retrained); start a new run_dir, or point init_from at the original weights"
        )
    old_reward = (old.get("stage") or {}).get("reward_model_sha256")
    new_reward = (config.get("stage") or {}).get("reward_model_sha256")
    if old_reward != new_reward:
        raise ResumeError(
            f"{path} was trained against a reward model with sha256 {str(old_reward)[:12]}…, but "
            f"{config['stage'].get('reward_model')} now has {str(new_reward)[:12]}… (the reward model was "
            "retrained); start a new run_dir, or point stage.reward_model at the original weights"
        )
    diffs = config_differences(old, config)
    if diffs and not allow_changes:
        raise ResumeError(
            f"resuming {path} with changed settings:\n  "
            + "\n  ".join(diffs)
            + "\nUse the original values, or add resume_allow_changes=true to resume anyway"
        )
    for d in diffs:
        log.warning("resume with a changed setting: %s", d)


def _lora_of(model: dict) -> str:
    """The adapter settings a checkpoint's tensors depend on, as text ('' without LoRA)."""
    lora = model.get("lora") or {}
    if not lora.get("r"):
        return ""
    return f"model.lora.r={lora['r']}, target_modules={','.join(lora.get('target_modules') or [])}"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def record_finished(run_dir: Path, config: dict, step: int, weights: str, metric: float | None) -> Path:
    """After final/ is written: the resolved config it was trained with (inputs' sha256 included), the step, which
    weights it holds and the sha256 of its weights file. `finished_run` reads it back."""
    record = {
        "config": config,
        "global_step": step,
        "final_weights": weights,
        "weights_sha256": weights_sha256(run_dir / "final"),
        "metric": metric,
        "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    path = run_dir / FINISHED
    write_text_atomic(path, json.dumps(record, indent=2, ensure_ascii=False))
    return path


def finished_run(run_dir: Path, config: dict, weights: str) -> dict | None:
    """The record of a completed fit of this very run (same trained-on settings, same inputs, final/ holding the
    `weights` it recorded, untouched since), or None: then resume=auto continues or restarts as usual."""
    path = run_dir / FINISHED
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if record["final_weights"] != weights or config_differences(record["config"], config):
            return None
        if weights_sha256(run_dir / "final") != record["weights_sha256"]:
            return None
    except (OSError, ValueError, KeyError, TypeError):  # no record, an unreadable one, or no final/ any more
        return None
    return record


def write_snapshot(run_dir: Path, config: dict, device: str) -> Path:
    import lightning
    import torch

    from minillm import __version__

    run_dir.mkdir(parents=True, exist_ok=True)
    snapshot = {
        "config": config,
        "versions": {
            "minillm": __version__,
            "torch": torch.__version__,
            "lightning": lightning.__version__,
            "python": platform.python_version(),
        },
        "device": device,
        "git_commit": _git_commit(),
        "command": sys.argv,
        "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    path = run_dir / SNAPSHOT
    path.write_text(json.dumps(snapshot, indent=2, ensure_ascii=False), encoding="utf-8")
    return path
