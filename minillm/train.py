"""minillm train stage=<stage> model=<preset> [overrides] (or python -m minillm.train) — and `build()` for notebooks.

run = build(["stage=pretrain", "model=tiny", "trainer.max_steps=50"])
batch = next(iter(run.datamodule.train_dataloader()))
run.fit()
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from omegaconf import DictConfig, OmegaConf

from minillm import rundir
from minillm.cli import check_config_dirs, show_help
from minillm.config import CONF_DIR, Config, compose, register, resolved_dict, to_config
from minillm.signals import CommandSignals

if TYPE_CHECKING:  # torch and Lightning load when a run is built, not for `--help` or a refused override
    import lightning as L

    from minillm.data.datamodule import MiniLLMDataModule
    from minillm.stages import LMModule

log = logging.getLogger("minillm")


@dataclass
class Run:
    """Everything `fit` needs, built exactly as the command line builds it. A run that `resume=auto` finds
    finished (`finished`: its record, rundir.finished_run) has no data, module or trainer: `fit` does nothing."""

    config: DictConfig
    datamodule: MiniLLMDataModule | None
    module: LMModule | None
    trainer: L.Trainer | None
    ckpt_path: Path | None
    run_dir: Path
    finished: dict | None = None

    def fit(self) -> int:
        """Train; returns the process exit code (0, 130/143 after an interrupt, 1 after a non-finite halt)."""
        if self.finished is not None:
            rundir.unlock_run_dir(self.run_dir)
            log.info(
                "%s is finished (step %d, final/ unchanged since): nothing to do. overwrite=true trains it again; "
                "other settings (trainer.max_steps, final.weights, ...) continue it",
                self.run_dir,
                self.finished["global_step"],
            )
            return 0
        try:
            self.trainer.fit(self.module, datamodule=self.datamodule, ckpt_path=self.ckpt_path)
        finally:
            rundir.unlock_run_dir(self.run_dir)
        from minillm.callbacks.interrupt import InterruptCallback

        interrupt = next((c for c in self.trainer.callbacks if isinstance(c, InterruptCallback)), None)
        if interrupt is not None and interrupt.received:
            return interrupt.exit_code
        return 1 if self.module.stop_reason == "nonfinite" else 0

    @property
    def metric(self) -> float | None:
        """The objective a sweep optimizes: the best `optimized_metric` the run logged (lowest for a loss, highest
        otherwise: `minillm.sweeps.objective_direction`), else its last value."""
        from minillm.sweeps import best_logged

        best = best_logged(self.run_dir / "logs" / "metrics.csv", self.config.optimized_metric)
        if best is not None:
            return best[0]
        if self.finished is not None:
            return self.finished.get("metric")
        value = self.trainer.callback_metrics.get(self.config.optimized_metric)
        return None if value is None else float(value)


def build(overrides: Sequence[str] = (), cfg: DictConfig | None = None, inspect: bool = False) -> Run:
    """Compose (or take) the config, check the run dir, resolve the stage's inputs, then build data, trainer and
    stage module. Nothing here knows a stage by name: a stage declares its schema, data kind and needs.

    `inspect=True` (debug, notebooks): no run-dir checks, no files written, no loggers or callbacks.
    """
    import lightning as L
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from minillm.accelerator import training_precision
    from minillm.checkpoint_io import remove_stale_tmp
    from minillm.data.datamodule import MiniLLMDataModule, find_sources
    from minillm.stages import stage_module

    command_line = list(overrides) if cfg is None or not HydraConfig.initialized() else HydraConfig.get().overrides.task
    cfg = compose(overrides) if cfg is None else cfg
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        cfg.run_dir = HydraConfig.get().runtime.output_dir  # one directory per sweep job
    typed = to_config(cfg)  # validates every schema value
    if cfg.trainer.get("precision") == "auto":  # resolved into the run config: snapshots and resumes see the value
        cfg.trainer.precision = training_precision("auto", cfg.trainer.get("accelerator", "auto"))[0]
    stage_cls = stage_module(typed.stage.name)
    if cfg.trainer.get("max_steps") == 0:
        raise ValueError(
            "trainer.max_steps=0 trains nothing (and would export untrained weights); set a number of steps, or "
            "trainer.max_steps=-1 with trainer.max_epochs=N to train by epochs"
        )
    if typed.data.streaming and (cfg.trainer.get("max_steps") or -1) < 0:
        raise ValueError(
            "data.streaming=true has no length to count epochs by: set trainer.max_steps (the steps to train)"
        )
    if typed.data.streaming and isinstance(cfg.trainer.get("limit_train_batches"), int):
        raise ValueError(
            "data.streaming=true with an integer trainer.limit_train_batches would cut passes short of the stream "
            "(and resume could not count them): leave trainer.limit_train_batches unset"
        )
    if typed.compile:
        check_compiler()
    run_dir = Path(typed.run_dir)
    rundir.check_run_dir(run_dir)
    for key, folder in (("tokenizer.cache_dir", typed.tokenizer.cache_dir), ("data.cache_dir", typed.data.cache_dir)):
        rundir.check_cache_dir(Path(folder), key)
    took_lock = False
    try:
        ckpt_path = None if inspect else rundir.resolve_resume(run_dir, typed.resume, typed.overwrite)
        data_dir, files = find_sources(typed.data, stage_cls.data)  # files of the data dir, Hugging Face datasets
        needs = stage_cls.needs_for(typed.stage)
        inputs = rundir.inputs_for(typed, needs, data_dir, files, explicit=model_keys(command_line))
        for key, value in inputs.settings.items():  # what the inputs decide is recorded in the run config
            OmegaConf.update(cfg, key, value)
        typed, config = to_config(cfg), resolved_dict(cfg)
        finished = (
            None if inspect or typed.resume != "auto" else rundir.finished_run(run_dir, config, typed.final.weights)
        )
        if finished is not None:  # the same settings and inputs as the fit that wrote final/: nothing to redo
            took_lock = rundir.lock_run_dir(run_dir)
            return Run(cfg, None, None, None, ckpt_path, run_dir, finished)
        if ckpt_path is not None:  # first: a resume with other init weights is named as such
            rundir.check_resume(ckpt_path, config, inputs.tokenizer.sha256, typed.resume_allow_changes)
        inputs.check_shape(config["model"])

        updates = stage_cls.updates_per_batch(typed.stage)  # RLHF: several optimizer steps per rollout batch
        callbacks, loggers = ([], []) if inspect else _callbacks_and_loggers(cfg, typed, updates)
        trainer_kwargs = {"callbacks": callbacks, "logger": loggers or False, "default_root_dir": str(run_dir)}
        trainer_kwargs |= _per_update(cfg.trainer, "max_steps", updates)
        precision, why = training_precision(
            cfg.trainer.get("precision", "32-true"), cfg.trainer.get("accelerator", "auto")
        )
        if why:
            log.warning(why)
        if precision != cfg.trainer.get("precision"):
            trainer_kwargs["precision"] = precision
        if inspect:
            trainer_kwargs |= {
                "enable_checkpointing": False,
                "enable_progress_bar": False,
                "enable_model_summary": False,
            }
        trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, **trainer_kwargs)

        L.seed_everything(typed.seed, workers=True, verbose=False)
        datamodule = MiniLLMDataModule(
            typed.data,
            files,
            inputs.tokenizer,
            typed.model.block_size,
            typed.seed,
            kind=stage_cls.data,
            accumulate=int(cfg.trainer.accumulate_grad_batches),
            lengths=typed.stage.lengths,
        )
        datamodule.setup("fit")
        if typed.data.val_ratio > 0 and len(datamodule.val) == 0:
            raise ValueError(
                f"the validation split is empty (data.val_ratio={typed.data.val_ratio}); raise "
                "data.val_ratio, or set data.val_ratio=0 to train without validation"
            )
        if len(datamodule.val) == 0:  # no validation: checkpoints and interrupts must not wait for one that never runs
            trainer.limit_val_batches = 0
        # one writer from here on, before the first write to the run dir (Run.fit gives it up); an input refused
        # above leaves no run dir behind
        took_lock = not inspect and rundir.lock_run_dir(run_dir)
        if not inspect and ckpt_path is None and typed.overwrite:
            rundir.clear_for_overwrite(run_dir)
        if not inspect:
            remove_stale_tmp(run_dir / "checkpoints")
        module = stage_cls(typed, config, inputs.tokenizer.sha256)
        module.attach(inputs, resuming=ckpt_path is not None)
        if typed.compile:
            compile_backbones(module)
        elif stage_cls.compiles_rollouts(typed.stage):
            compile_rollouts(module)
        if not inspect and trainer.is_global_zero:
            rundir.write_snapshot(run_dir, config, device=trainer.strategy.root_device.type)
            datamodule.write_stats(run_dir / "dataset_stats.json")
    except BaseException:  # a refused build leaves the run dir free for the next command
        if took_lock:
            rundir.unlock_run_dir(run_dir)
        raise
    return Run(cfg, datamodule, module, trainer, ckpt_path, run_dir)


def model_keys(overrides: Sequence[str]) -> set[str]:
    """The model settings a command line sets itself (`model.n_layer=3`, `+model.x=…`, `++model.x=…`)."""
    keys = (item.split("=", 1)[0].lstrip("+~") for item in overrides)
    return {key.removeprefix("model.").split(".")[0] for key in keys if key.startswith("model.")}


CXX_CANDIDATES = ("g++", "clang++", "c++")


def cxx_compiler() -> str | None:
    """The C++ compiler torch.compile's inductor would build with ($CXX first), or None when there is none."""
    import shutil

    return next((c for c in (os.environ.get("CXX"), *CXX_CANDIDATES) if c and shutil.which(c)), None)


def check_compiler() -> None:
    """compile=true: torch.compile's inductor builds C++, so a working compiler must be there; said before the
    data set-up (the alternative is a long InductorError traceback at the first step)."""
    if cxx_compiler() is None:
        candidates = [c for c in (os.environ.get("CXX"), *CXX_CANDIDATES) if c]
        raise ValueError(
            f"compile=true needs a C++ compiler (torch.compile builds C++ code) and none was found "
            f"({', '.join(candidates)}): install one (e.g. apt-get install g++) or set compile=false"
        )


def use_inductor_cache() -> None:
    """Compiled code is cached under data/cache/torchinductor (or $TORCHINDUCTOR_CACHE_DIR): a second run starts
    fast."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path("data/cache/torchinductor").resolve()))


def compile_rollouts(module: LMModule) -> None:
    """The policy's decode step compiled for the rollouts (stage.compile_rollouts), its code cached as
    compile=true's is; without a compiler the rollouts decode eagerly, with a warning."""
    if cxx_compiler() is None:
        log.warning(
            "rollouts decode eagerly (slower): torch.compile needs a C++ compiler and none was found; install one "
            "(e.g. apt-get install g++), or set stage.compile_rollouts=false to decode eagerly without this warning"
        )
        return
    use_inductor_cache()
    module.model.compile_decoding(dynamic=False)


def compile_backbones(module: LMModule) -> None:
    """compile=true: every backbone the stage trains (policy, value or reward trunk) runs its forwards without a
    KV cache, and its decode step (RLHF rollouts, evaluation callbacks), through torch.compile. The compiled code
    is cached under data/cache/torchinductor (or $TORCHINDUCTOR_CACHE_DIR), so a second run starts fast."""
    use_inductor_cache()
    from minillm.model import MiniGPT

    for model in module.modules():
        if isinstance(model, MiniGPT):
            model.compile_layers()
            model.compile_decoding(dynamic=False)


def _callbacks_and_loggers(cfg: DictConfig, typed: Config, updates: int) -> tuple[list, list]:
    """Lightning objects first: a bad value fails before any tensor exists."""
    callback_cfgs = {k: v for k, v in cfg.callbacks.items() if v is not None}
    if typed.data.val_ratio == 0:  # nothing to monitor
        callback_cfgs = {k: v for k, v in callback_cfgs.items() if not str(v.get("monitor", "")).startswith("val/")}
    if not cfg.trainer.get("enable_progress_bar", True):  # Lightning refuses a bar callback then
        callback_cfgs = {k: v for k, v in callback_cfgs.items() if not v["_target_"].endswith("ProgressBar")}
    callbacks = [
        hydra.utils.instantiate(c, **_per_update(c, "every_n_train_steps", updates)) for c in callback_cfgs.values()
    ]
    return callbacks, [hydra.utils.instantiate(c) for c in cfg.logger.values() if c is not None]


def _per_update(cfg: DictConfig, key: str, updates: int) -> dict:
    """`key` (a step count in training batches) in optimizer steps, when a batch makes several of them."""
    value = cfg.get(key)
    return {key: value * updates} if updates > 1 and isinstance(value, int) and value > 0 else {}


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.get().mode == RunMode.MULTIRUN:
        return sweep_job(cfg)
    try:
        run = build(cfg=cfg)
    except (ValueError, FileNotFoundError) as e:  # errors a user can cause: the message says what to do
        log.error("error: %s", e)
        sys.exit(2)
    code = fit_or_explain(run)
    if code:
        sys.exit(code)
    return run.metric


INTERRUPTED = (130, 143)  # the exit codes of Ctrl-C and SIGTERM (InterruptCallback)


def sweep_job(cfg: DictConfig) -> float | None:
    """One job of `minillm train -m`: its record in job.json (minillm/sweeps.py) and the sweep's summary rewritten
    when it ends. A failed job is logged and recorded, and the sweep goes on to the next one (it returns None, which
    a search sweeper counts as a failed trial); an interrupt records the job and stops the sweep."""
    from hydra.core.hydra_config import HydraConfig

    from minillm.sweeps import SweepJob

    hydra_cfg = HydraConfig.get()
    job = SweepJob.start(
        Path(hydra_cfg.runtime.output_dir), hydra_cfg.job.num, list(hydra_cfg.overrides.task), cfg.optimized_metric
    )
    try:
        run = build(cfg=cfg)
        code = fit_or_explain(run)
    except (Exception, SystemExit) as e:  # every failure is this job's, not the sweep's
        if isinstance(e, (ValueError, FileNotFoundError, SystemExit)):
            log.error("error: %s", e)
        else:
            log.exception("error: job %d failed", hydra_cfg.job.num)
        job.end("failed", e)
        return None
    if code in INTERRUPTED:
        job.end("interrupted")
        sys.exit(code)
    if code:
        nonfinite = run.module is not None and run.module.stop_reason == "nonfinite"
        job.end("failed", "non-finite loss: training stopped" if nonfinite else f"exit code {code} (see train.log)")
        return None
    job.end("skipped" if run.finished is not None else "done")
    return run.metric


OUT_OF_MEMORY_HINT = (
    "lower data.batch_size and raise trainer.accumulate_grad_batches by the same factor (the same batch per "
    "optimizer step), or lower model.block_size, or set model.gradient_checkpointing=true; a smaller batch without "
    "accumulation sees fewer tokens per step: raise trainer.max_steps to match. Checkpoints on disk are intact: "
    "resume=auto continues from the last one"
)


def is_out_of_memory(error: BaseException) -> bool:
    """A CUDA/MPS allocator failure, or a CPU allocation torch could not make."""
    import torch

    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def fit_or_explain(run: Run) -> int:
    """`run.fit()`; a failure the user can act on (a full disk, memory) is one `error:` line saying what to do,
    and the exit code 1. Anything else propagates."""
    try:
        return run.fit()
    except OSError as e:  # disk full, a folder that vanished: checkpoints are written atomically, none is lost
        log.error(
            "error: %s. Checkpoints already on disk are intact (written atomically); fix the cause and continue "
            "with resume=auto",
            e,
        )
        return 1
    except (RuntimeError, MemoryError) as e:
        if not is_out_of_memory(e):
            raise
        log.error("error: out of memory (%s): %s", str(e).splitlines()[0][:200], OUT_OF_MEMORY_HINT)
        return 1


def check_before_hydra(argv: Sequence[str]) -> None:
    """Hydra creates the run dir and its train.log before `main` runs: check the run dir first, so that a
    refused command writes nothing and says why (instead of a raw OSError from Hydra's logging set-up)."""
    search = next((a.split("=", 1)[1] for a in argv if a.startswith("hparams_search=")), None)
    if search is not None and (CONF_DIR / "hparams_search" / f"{search}.yaml").is_file():
        import importlib.util

        if importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None:  # our presets use it
            print(
                f"error: hparams_search={search} needs Hydra's Optuna sweeper, the search extra: "
                "pip install 'minillm-lab[search]' (in a checkout: pip install -e '.[search]')",
                file=sys.stderr,
            )
            sys.exit(2)
    if any(a.startswith("-") for a in argv) or search is not None:  # --help, --cfg, a sweep (-m or a search
        return  # preset: a run dir per job): Hydra's own
    try:
        run_dir = Path(to_config(compose(argv)).run_dir)  # a bad value is refused before the run dir is touched
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception:  # a bad override: Hydra reports it with its own message
        return
    try:
        rundir.check_run_dir(run_dir)
        rundir.lock_run_dir(run_dir)  # before Hydra's train.log: a refused command writes nothing there
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def cli() -> None:
    """`minillm train` / `python -m minillm.train`: Hydra's command line over conf/train.yaml."""
    with CommandSignals():  # Ctrl-C / kill outside the training loop (InterruptCallback's handler inside it)
        check_config_dirs(sys.argv[1:])
        show_help("train", sys.argv[1:])
        check_before_hydra(sys.argv[1:])
        register()  # Hydra's app composes conf/train.yaml with our schemas and resolvers
        main()


if __name__ == "__main__":
    cli()
