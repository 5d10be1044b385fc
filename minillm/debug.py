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

from omegaconf import DictConfig

from minillm.accelerator import best_device
from minillm.cli import Command
from minillm.config import GenerationConfig, resolved_dict
from minillm.rundir import write_snapshot
from minillm.train import build


def show_batch(batch: dict, tok, n: int) -> None:
    """The first row of the stage's own batch: text, ids, what the loss reads."""
    from minillm.losses import IGNORE_INDEX

    if "chosen_ids" in batch:  # preference pairs (DPO, reward model): prompt + chosen, prompt + rejected
        print(f"== first batch: {len(batch['chosen_ids'])} pairs, chosen {tuple(batch['chosen_ids'].shape)}")
        for side in ("chosen", "rejected"):
            ids, labels = batch[f"{side}_ids"][0], batch[f"{side}_labels"][0]
            ids = ids[ids != tok.pad_id]  # right padding
            print(f"-- prompt + {side} of row 0: {tok.decode(ids.tolist())!r}")
            print(f"-- {side} loss mask (1 = scored): {(labels[: len(ids)] != IGNORE_INDEX).int().tolist()[:n]}")
        return
    if "records" in batch:  # RL prompts, left-padded for generation
        ids, mask = batch["input_ids"], batch["attention_mask"]
        print(f"== first batch: {len(batch['records'])} prompts, input_ids {tuple(ids.shape)} (left-padded)")
        print(f"-- prompt of row 0: {tok.decode(ids[0][mask[0].bool()].tolist())!r}")
        print(f"-- its record: {batch['records'][0]}")
        return
    ids = batch["input_ids"]
    targets = batch.get("labels", ids)[:, 1:]  # chat stages: -100 outside the assistant tokens
    print(
        f"== first batch: input_ids {tuple(ids.shape)} {ids.dtype}, inputs {tuple(ids[:, :-1].shape)}, "
        f"targets {tuple(targets.shape)}"
    )
    print(f"-- raw text of row 0 (first {n} tokens):\n{tok.decode(ids[0, :n].tolist())!r}")
    print(f"-- token ids: {ids[0, :n].tolist()}")
    print(f"-- loss mask (1 = trained on): {(targets[0, :n] != IGNORE_INDEX).int().tolist()}")


def run(cfg: DictConfig) -> None:
    from minillm.callbacks.first_step import FirstStep
    from minillm.generate import generate

    logging.getLogger().setLevel(logging.WARNING)  # the batch and the step, not Lightning's set-up messages
    cfg.trainer.max_steps = 1
    cfg.trainer.limit_val_batches = 0
    try:
        run = build(cfg=cfg, inspect=True)
    except (ValueError, FileNotFoundError) as e:  # what `train` says in one line, said the same way
        raise SystemExit(f"error: {e}") from None
    snapshot = write_snapshot(Path(run.run_dir) / "debug", resolved_dict(run.config), best_device())
    tok = run.datamodule.tokenizer
    batch = next(iter(run.datamodule.train_dataloader()))
    print(f"== config: stage={cfg.stage.name} model={cfg.model.name} ({run.module.model.num_parameters():,} params)")
    show_batch(batch, tok, cfg.debug.show_tokens)
    step = FirstStep()
    run.trainer.callbacks.append(step)
    run.trainer.fit(run.module, datamodule=run.datamodule)
    norm = "–" if step.grad_norm is None else f"{step.grad_norm:.4f}"
    if step.loss is not None:
        print(f"== one optimizer step: loss {step.loss:.4f}, grad norm {norm}")
    else:  # RLHF: a rollout (generate, score) and its updates
        shown = ", ".join(f"{k} {v:.4f}" for k, v in sorted(step.metrics.items()) if not k.endswith("tokens_per_s"))
        print(f"== one rollout and its updates: {shown}; last grad norm {norm}")
    text = generate(
        run.module.model, tok, cfg.prompt, GenerationConfig(max_new_tokens=cfg.debug.max_new_tokens, seed=0)
    )
    print(f"== generate({cfg.prompt!r}) -> {text!r}")
    print(f"== config snapshot: {snapshot}")


COMMAND = Command("debug", None, run)  # conf/debug.yaml: the train config; only <run_dir>/debug/ is written
cli, main = COMMAND.cli, COMMAND.main  # main(argv): the same command from Python


if __name__ == "__main__":
    cli()
