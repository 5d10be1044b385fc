"""minillm debug stage=<stage> model=<preset> ['prompt="你好，MiniGPT！"'] — the whole stack, one step.

Composes the same config and builds the same data module and stage module as `minillm.train`, prints the
first batch (raw text, token ids, loss mask, shapes), runs one optimizer step through the stage's own
training_step and prints the loss and gradient norm, then generates from `prompt`. Writes only the config
snapshot it describes, to `<run_dir>/debug/training_config_snapshot.json` (never the run's own snapshot,
checkpoints or logs).
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig

from minillm.cli import Command
from minillm.config import resolved_dict
from minillm.device import best_device
from minillm.generate import GenerationConfig, generate
from minillm.losses import IGNORE_INDEX
from minillm.rundir import write_snapshot
from minillm.train import build


class _FirstStep(L.Callback):
    """Records the loss and gradient norm of the one debug step."""

    def __init__(self) -> None:
        self.loss: float | None = None
        self.grad_norm: float | None = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad.detach().float() for p in pl_module.parameters() if p.grad is not None]
        self.grad_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.loss = float(outputs["loss"])


def run(cfg: DictConfig) -> None:
    logging.getLogger().setLevel(logging.WARNING)  # the batch and the step, not Lightning's set-up messages
    cfg.trainer.max_steps = 1
    cfg.trainer.limit_val_batches = 0
    run = build(cfg=cfg, inspect=True)
    snapshot = write_snapshot(Path(run.run_dir) / "debug", resolved_dict(run.config), best_device())
    tok = run.datamodule.tokenizer
    batch = next(iter(run.datamodule.train_dataloader()))
    ids = batch["input_ids"]
    targets = batch.get("labels", ids)[:, 1:]  # chat stages: -100 outside the assistant tokens
    n = cfg.debug.show_tokens
    print(f"== config: stage={cfg.stage.name} model={cfg.model.name} ({run.module.model.num_parameters():,} params)")
    print(
        f"== first batch: input_ids {tuple(ids.shape)} {ids.dtype}, inputs {tuple(ids[:, :-1].shape)}, "
        f"targets {tuple(targets.shape)}"
    )
    print(f"-- raw text of row 0 (first {n} tokens):\n{tok.decode(ids[0, :n].tolist())!r}")
    print(f"-- token ids: {ids[0, :n].tolist()}")
    print(f"-- loss mask (1 = trained on): {(targets[0, :n] != IGNORE_INDEX).int().tolist()}")
    step = _FirstStep()
    run.trainer.callbacks.append(step)
    run.trainer.fit(run.module, datamodule=run.datamodule)
    print(f"== one optimizer step: loss {step.loss:.4f}, grad norm {step.grad_norm:.4f}")
    text = generate(
        run.module.model, tok, cfg.prompt, GenerationConfig(max_new_tokens=cfg.debug.max_new_tokens, seed=0)
    )
    print(f"== generate({cfg.prompt!r}) -> {text!r}")
    print(f"== config snapshot: {snapshot}")


COMMAND = Command("debug", None, run)  # conf/debug.yaml: the train config; only <run_dir>/debug/ is written
cli, main = COMMAND.cli, COMMAND.main  # main(argv): the same command from Python


if __name__ == "__main__":
    cli()
