"""One command line for every entry point: `minillm <command> [key=value ...]`, or `python -m minillm.<module>`.

Every command is a Hydra app over the package's config tree: `conf/<command>.yaml` holds its values, a
dataclass its schema (registered in Hydra's ConfigStore as `<command>_schema`). So each one has the same
conventions as `minillm train`: `--help` shows its keys, `--cfg job` prints the composed config, a typo or a
wrong type is Hydra's error naming the key, `-m` sweeps (`minillm eval -m model_path=a,b`), and a folder of your
own presets joins the search path with `--config-dir DIR` (or `hydra.searchpath=[file://DIR]`).

This module and the command modules it names are the command layer: they import the libraries (model, data,
generate, evaluation, ...), never the reverse (tests/test_layers.py).

Tests and notebooks call `<module>.main([...])`: the same config through Hydra's compose API, user errors raised
as `SystemExit("error: ...")`.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# command -> module with a `cli()`; `python -m <module>` runs the same app
COMMANDS = {
    "train": ("minillm.train", "train a stage: minillm train stage=sft model=tiny"),
    "debug": ("minillm.debug", "one step of a stage, printed in full; writes nothing"),
    "device": ("minillm.device", "the accelerator training would use; writes the run's config snapshot"),
    "generate": ("minillm.generate.__main__", "complete prompts with a trained model"),
    "chat": ("minillm.chat", "chat with a trained model (streamed, with history)"),
    "eval": ("minillm.eval", "evaluate a model on held-out data (eval.json)"),
    "report": ("minillm.report", "the report card of a chain of stages (report.md)"),
    "export": ("minillm.export", "a model in the transformers layout"),
    "serve": ("minillm.serve", "an OpenAI-compatible HTTP server (the serve extra)"),
    "pairs": ("minillm.pairs", "on-policy preference pairs from a model's wrong answers"),
    "sweep": ("minillm.sweep", "the summary table of a multirun: minillm sweep summarize DIR"),
    "data": ("minillm.data.__main__", "build the built-in corpus (data/builtin)"),
}


@dataclass(frozen=True)
class Command:
    """A command's config (conf/<name>.yaml, typed by `schema`) and what it runs with the typed config.
    `schema=None`: the command composes the train config (debug, device) and `run` gets it as composed, to build
    the run exactly as `minillm train` does."""

    name: str
    schema: type | None
    run: Callable[[Any], Any]

    def register(self) -> None:
        from hydra.core.config_store import ConfigStore

        from minillm.config import register

        register()  # the train config's schemas and our resolvers (debug and device compose the train config)
        if self.schema is not None:
            ConfigStore.instance().store(name=f"{self.name}_schema", node=self.schema)

    def typed(self, cfg) -> Any:
        """The schema's dataclass (every `__post_init__` check run); a bad value is a SystemExit naming it."""
        from omegaconf import OmegaConf

        if self.schema is None:
            return cfg
        try:
            return OmegaConf.to_object(cfg)
        except Exception as e:
            raise SystemExit(f"error: {e}") from None

    def compose(self, argv: Sequence[str]) -> Any:
        """The typed config `minillm <name> <argv>` would run with (Hydra's compose API, same overrides)."""
        from minillm.config import compose

        self.register()
        try:
            cfg = compose(argv, config_name=self.name)
        except Exception as e:  # Hydra: an unknown key, a wrong type, a bad override
            raise SystemExit(f"error: {e}") from None
        return self.typed(cfg)

    def main(self, argv: Sequence[str] = ()) -> Any:
        """`minillm <name> <argv>` from Python: compose, then run (the module's `main`)."""
        return self.run(self.compose(argv))

    def sweep_job(self, cfg) -> Any:
        """One job of `minillm <name> -m ...`: recorded in its job dir's job.json (with `eval`'s headline numbers)
        and the sweep's summary rewritten (minillm/sweeps.py); a failed job is reported and the sweep goes on."""
        from hydra.core.hydra_config import HydraConfig

        from minillm.config import headline
        from minillm.sweeps import SweepJob

        hydra_cfg = HydraConfig.get()
        job = SweepJob.start(Path(hydra_cfg.runtime.output_dir), hydra_cfg.job.num, list(hydra_cfg.overrides.task))
        try:
            result = self.run(self.typed(cfg))
        except (Exception, SystemExit) as e:  # every failure is this job's, not the sweep's
            print(f"error: {str(e).removeprefix('error: ')}", file=sys.stderr)
            job.end("failed", e)
            return None
        job.end("done", result=headline(result) if isinstance(result, dict) and "tasks" in result else None)
        return result

    def cli(self) -> Any:
        """Hydra's own command line (`python -m minillm.<x>` and `minillm <name>`)."""
        import hydra

        from minillm.config import CONF_DIR

        self.register()
        check_config_dirs(sys.argv[1:])
        show_help(self.name, sys.argv[1:])

        def task(cfg):
            from hydra.core.hydra_config import HydraConfig
            from hydra.types import RunMode

            if HydraConfig.get().mode == RunMode.MULTIRUN:
                return self.sweep_job(cfg)
            try:
                return self.run(self.typed(cfg))
            except BrokenPipeError:  # `minillm sweep | head`: the reader left, nothing to report
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                return None

        return hydra.main(config_path=str(CONF_DIR), config_name=self.name, version_base="1.3")(task)()


def config_dirs(argv: Sequence[str]) -> list[Path]:
    """The preset folders a command line adds: `--config-dir DIR` / `-cd DIR` (or `--config-dir=DIR`)."""
    dirs = []
    for i, arg in enumerate(argv):
        if arg in ("--config-dir", "-cd") and i + 1 < len(argv):
            dirs.append(Path(argv[i + 1]))
        elif arg.startswith("--config-dir="):
            dirs.append(Path(arg.split("=", 1)[1]))
    return dirs


def check_config_dirs(argv: Sequence[str]) -> None:
    """A YAML syntax error in a preset of the user's own is one line naming file:line:column and the problem,
    before Hydra composes (whose report is a long traceback)."""
    import yaml

    for folder in config_dirs(argv):
        for path in sorted(folder.rglob("*.yaml")) if folder.is_dir() else []:
            try:
                yaml.safe_load(path.read_text(encoding="utf-8"))
            except yaml.YAMLError as e:
                mark = getattr(e, "problem_mark", None)
                where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
                problem = getattr(e, "problem", None) or str(e).splitlines()[0]
                print(f"error: {where}: {problem} (YAML syntax); fix the file and run again", file=sys.stderr)
                sys.exit(2)


HELP_FLAGS = ("--help", "-h")
TRAIN_CONFIG = ("train", "debug", "device")  # the commands over the train config and its groups


def show_help(name: str, argv: Sequence[str]) -> None:
    """`--help`: what the command does, the config groups to pick from (the train config's), and the config
    composed with the other arguments; then exit 0. Our own page rather than Hydra's, which lists every group
    of the search path by deep-copying the config repository for each (seconds); with `--config-dir` (presets of
    your own) Hydra's page answers, since it knows that search path."""
    if not any(a in HELP_FLAGS for a in argv) or config_dirs(argv):
        return
    from omegaconf import OmegaConf

    from minillm.config import CONF_DIR, compose

    overrides = [a for a in argv if a not in HELP_FLAGS]
    try:
        cfg = compose(overrides, config_name=name)
    except Exception as e:  # Hydra: an unknown key, a wrong type, a bad override
        raise SystemExit(f"error: {e}") from None
    module, what = COMMANDS[name]
    if name in TRAIN_CONFIG:
        lines = [
            f"minillm {name} stage=<stage> model=<preset> [group=option ...] [key=value ...]  (python -m {module}): "
            f"{what}.",
            "Pick an option of each group below, override any key of the config; --cfg job prints the composed config.",
            "",
            "== Configuration groups ==",
        ]
        for group in sorted(p for p in CONF_DIR.iterdir() if p.is_dir() and p.name not in ("hydra", "__pycache__")):
            lines.append(f"{group.name}: {', '.join(sorted(f.stem for f in group.glob('*.yaml')))}")
    else:
        lines = [
            f"minillm {name} [key=value ...]: {what}. Override any key of the config below on the command line",
            f"(python -m {module.removesuffix('.__main__')} takes the same arguments); --cfg job prints the composed "
            "config.",
        ]
    text = "\n".join([*lines, "", "== Config ==", OmegaConf.to_yaml(cfg).rstrip(), "", "Docs: README.md and docs/."])
    try:
        print(text, flush=True)
    except BrokenPipeError:  # `minillm train --help | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(0)


def usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = [f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items()]
    return (
        "usage: minillm <command> [key=value ...] [--help] [--cfg job] [-m]\n\ncommands:\n"
        + "\n".join(lines)
        + "\n\n`minillm <command> --help` lists a command's keys; `python -m <module>` runs the same command."
    )


def main(argv: Sequence[str] | None = None) -> Any:
    """The `minillm` console script: dispatch to a command's Hydra app."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return None
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    module = importlib.import_module(COMMANDS[name][0])
    sys.argv = [f"minillm {name}", *rest]  # Hydra reads its overrides from sys.argv
    return module.cli()


if __name__ == "__main__":
    main()
