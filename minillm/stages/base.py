"""LMModule: what every stage shares — the backbone, AdamW with warmup + cosine, logging, the non-finite step
guard and RNG state in checkpoints. A stage subclasses it once, declares what it is made of, and writes its
training/validation steps:

    class DPOModule(LMModule):
        schema = DPOConfig            # its typed `stage` config (conf/stage/dpo.yaml holds only values)
        data = PREFERENCE             # its data kind, named after the data folder (minillm/data/kinds.py)
        needs = Needs(reference=True) # what it starts from besides its parent's weights

`train.build()` reads these declarations and nothing else about a stage: it asks `rundir.inputs_for` for the
inputs (`StageInputs`) and hands them to `attach`.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import nn
from torchmetrics import MeanMetric

from minillm import loop_state, lora
from minillm.config import Config, StageConfig
from minillm.data.kinds import PRETRAIN, Kind
from minillm.flops import device_peak, flops_per_token, precision_dtype
from minillm.model import Attention, MiniGPT
from minillm.rundir import StageInputs

log = logging.getLogger(__name__)


def disable_dropout(model: nn.Module) -> None:
    """Dropout probability 0 everywhere (as TRL does for preference and RL stages: `.eval()` would be undone
    after validation)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(module, Attention):
            module.dropout = 0.0


@dataclass(frozen=True)
class Needs:
    """What a stage starts from besides its data and its parent's weights (`stage.parent`, `init_from`)."""

    reference: bool = False  # a frozen copy of the init weights
    reward_model: bool = False  # the trained reward model (for RLHF: only when stage.reward=model)


class LMModule(L.LightningModule):
    schema: type[StageConfig] = StageConfig
    data: Kind = PRETRAIN
    needs = Needs()

    @classmethod
    def needs_for(cls, stage: StageConfig) -> Needs:
        """The needs of a run of this stage (a stage whose needs depend on its settings overrides this)."""
        return cls.needs

    def __init__(self, config: Config, plain_config: dict, tokenizer_sha256: str = "") -> None:
        """`config`: the typed run config. `plain_config`: the same as plain dicts, the one thing saved in
        checkpoints besides tensors (they load with weights_only=True)."""
        super().__init__()
        self.save_hyperparameters({"config": plain_config, "tokenizer_sha256": tokenizer_sha256})
        self.stage_name = config.stage.name
        self.optim = config.optim
        self.max_steps = int(config.trainer.get("max_steps") or -1)
        self.model = MiniGPT(config.model)
        self.val_loss = MeanMetric()  # stages update it per batch, weighted by target tokens
        self.stop_reason: str | None = None  # set by callbacks that end training early (interrupt, non-finite)
        self.nonfinite_streak = 0
        self.skipped_steps = 0
        self._rng_to_restore: dict | None = None
        self._log_to_replay: dict | None = None
        self._last_loss: torch.Tensor | None = None
        self._tokens = 0
        self._clock: float | None = None
        self._peak = self._flops_per_token = 0.0  # on_train_start: MFU against the device this run trains on
        self.__dict__["reference"] = None  # set_reference(): a plain attribute, outside the module tree
        self.__dict__["tokenizer"] = None  # attach(): for the stage and the callbacks that decode or generate
        self.data_dir: Path | None = None  # attach(): the data dir the run reads
        self.init_dir: Path | None = None  # attach(): the weights this run started from
        self.lora = config.model.lora
        self.strict_loading = not self.lora.enabled  # a LoRA checkpoint holds the trainable tensors only

    def eval_records(self, family: str) -> Path | None:
        """The held-out records of a task family (`<data dir>/eval/<family>.jsonl`), for evaluation callbacks."""
        return None if self.data_dir is None else self.data_dir / "eval" / f"{family}.jsonl"

    def attach(self, inputs: StageInputs, resuming: bool) -> None:
        """Take what `rundir.inputs_for` resolved: the tokenizer, the init weights (a fresh run starts from them;
        a resume loads its checkpoint instead, but for LoRA's frozen base, which comes from them again) and, when
        the stage needs one, a frozen reference (with LoRA: the policy with its adapters off)."""
        self.__dict__["tokenizer"] = inputs.tokenizer
        self.data_dir, self.init_dir = inputs.data_dir, inputs.init_dir
        if self.lora.enabled and inputs.init_model is None:
            raise ValueError(
                f"model.lora.r={self.lora.r} fine-tunes existing weights through adapters, but stage="
                f"{self.stage_name} starts from none: set init_from (or train without model.lora)"
            )
        if self.needs.reference and inputs.init_model is None:
            raise ValueError(f"stage={self.stage_name} compares against a reference model: set init_from")
        if self.needs.reference and not self.lora.enabled:
            self.set_reference(inputs.init_model)
        if inputs.init_model is not None and (not resuming or self.lora.enabled):
            self.initialise(inputs.init_model)
            log.info("initialised from %s (sha256 %s…)", inputs.init_dir, inputs.init_sha256[:12])
        if self.lora.enabled:
            lora.add_adapters(self, self.lora)  # every backbone of the stage (policy, critic); heads stay trainable
            if self.needs.reference:
                self.__dict__["reference"] = lora.WithoutAdapters(self.model)
            trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
            log.info(
                "LoRA r=%d on %s: %s of %s parameters train",
                self.lora.r,
                ",".join(self.lora.target_modules),
                f"{trainable:,}",
                f"{sum(p.numel() for p in self.parameters()):,}",
            )

    def set_reference(self, model: MiniGPT) -> None:
        """A frozen copy of the init weights, held outside the module tree: not optimized, not in checkpoints,
        not DDP-wrapped; moved to the policy's device when fit starts."""
        reference = copy.deepcopy(model).eval().requires_grad_(False)
        disable_dropout(reference)
        self.__dict__["reference"] = reference

    def initialise(self, init_model: MiniGPT) -> None:
        """Start from the init weights (a fresh run; a resume loads its checkpoint instead)."""
        self.model.load_state_dict(init_model.state_dict())

    @classmethod
    def compiles_rollouts(cls, stage) -> bool:
        """Whether training decodes so many batches (RLHF's rollouts) that its decode step is compiled."""
        return False

    @classmethod
    def updates_per_batch(cls, stage) -> int:
        """Optimizer steps per training batch: Lightning's global_step counts these (1 but for RLHF)."""
        return 1

    def exported_model(self) -> nn.Module:
        """What `final/` holds (save_pretrained's argument; with LoRA the export callback merges it)."""
        return self.model

    # ---- optimizer and schedule ----
    def configure_optimizers(self):
        decay = [p for p in self.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.optim.lr,
            betas=tuple(self.optim.betas),
            eps=self.optim.eps,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def lr_factor(self, step: int) -> float:
        """Linear warmup to 1, then cosine down to min_lr_ratio at max_steps (constant after)."""
        warmup, floor = self.optim.warmup_steps, self.optim.min_lr_ratio
        if step < warmup:
            return (step + 1) / warmup
        if self.max_steps <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / (self.max_steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    # ---- logging shared by stages ----
    def log_train(self, loss: torch.Tensor, tokens: int, **extra: torch.Tensor) -> None:
        self._last_loss = loss.detach()
        self._tokens = tokens
        self.log("train/loss", loss.detach(), prog_bar=True)
        for name, value in extra.items():
            self.log(f"train/{name}", value)
        self.log_rate()

    def log_rate(self) -> None:
        """Tokens per second since the previous step, and the learning rate of this step's update. Logged from
        training_step, so a checkpoint written at the end of the step holds the step's whole row."""
        if self._trainer is None:  # training_step outside Lightning (a bare loop): nothing is logged
            return
        now = time.perf_counter()
        if self._clock is not None:
            rate = self._tokens / max(now - self._clock, 1e-9)
            self.log("train/tokens_per_s", rate, prog_bar=True)
            if self._peak:
                self.log("train/mfu", rate * self._flops_per_token / self._peak)
        self._clock = now
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.log("val/loss", loss, prog_bar=True)
        if self.data.perplexity:  # a perplexity of a preference loss means nothing
            self.log("val/ppl", torch.exp(loss))
        self.val_loss.reset()

    # ---- the non-finite guard: skip the update, the same decision on every rank ----
    def on_before_optimizer_step(self, optimizer) -> None:
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        checks = [torch.isfinite(g).all() for g in grads]
        if self._last_loss is not None:
            checks.append(torch.isfinite(self._last_loss))
        finite = bool(torch.stack(checks).all()) if checks else True  # one device sync
        finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            self.nonfinite_streak = 0
            return
        for p in self.parameters():
            p.grad = None  # AdamW leaves parameters without gradients untouched: the step is skipped
        self.nonfinite_streak += 1
        self.skipped_steps += 1
        log.warning(
            "step %d: non-finite loss or gradient, update skipped (%d in a row)",
            self.global_step,
            self.nonfinite_streak,
        )

    # ---- exact resume: RNG states and the logger's position travel in the checkpoint (plain lists, tensors) ----
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        loop_state.annotate(self.trainer, checkpoint)
        if self.lora.enabled:  # the frozen base is init_from's weights: only what trains is saved
            checkpoint["state_dict"] = lora.trainable_state(checkpoint["state_dict"])
            checkpoint["lora"] = {"r": self.lora.r, "target_modules": list(self.lora.target_modules)}
        version, state, gauss = random.getstate()
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        checkpoint["rng"] = {
            "python": [version, list(state), gauss],
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._rng_to_restore = checkpoint.get("rng")
        self._log_to_replay = checkpoint.get(loop_state.KEY)

    def on_train_start(self) -> None:
        # MFU (train/mfu): training FLOPs per token (minillm/flops.py, at block_size) × tokens/s ÷ the matmul
        # peak measured on this device in the precision's dtype (per process, at start-up).
        self._peak = device_peak(self.device, precision_dtype(self.trainer.precision))
        self._flops_per_token = flops_per_token(self.model.config, self.model.config.block_size)
        log_state, self._log_to_replay = self._log_to_replay, None
        loop_state.replay(self.trainer, log_state)
        rng, self._rng_to_restore = self._rng_to_restore, None
        if rng is None:
            return
        version, state, gauss = rng["python"]
        random.setstate((version, tuple(state), gauss))
        kind, keys, pos, has_gauss, cached = rng["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
