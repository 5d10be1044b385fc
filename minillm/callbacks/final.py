"""Beside the checkpoints: the model config and tokenizer (so a .ckpt opens with `load_model`); at the end of a
completed fit: `<run_dir>/final/`, the trained model folder. Never after an interrupt or a halt. A LoRA run
(`model.lora.r > 0`) exports its adapters merged into the weights, and the adapters alone in `final/adapter/`
(PEFT's files, minillm/lora.py). Then `<run_dir>/finished.json` records what final/ was trained with, so a later
`resume=auto` with the same settings and inputs finds the stage done (train.build).

`final.weights`: `last` (the weights at the end) or `best` (best.ckpt, the lowest val/loss). The closing log
line says which weights final/ holds and their val/loss, and warns when validation loss ended well above its
best (on a small corpus the last step is often not the best)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import torch

from minillm import lora, rundir
from minillm.callbacks.checkpoint import weights_finite
from minillm.pretrained import save_pretrained

log = logging.getLogger(__name__)


OVERFIT_WARNING = 1.05  # warn when the last val/loss is this many times its best


class FinalCallback(L.Callback):
    def __init__(self, run_dir: str, weights: str = "last") -> None:
        if weights not in ("last", "best"):
            raise ValueError(f"final.weights must be last or best, got {weights!r}")
        self.run_dir, self.weights = Path(run_dir), weights

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        folder = self.run_dir / "checkpoints"
        folder.mkdir(parents=True, exist_ok=True)
        pl_module.tokenizer.save(folder)
        config = {
            "model": pl_module.hparams["config"]["model"],
            "tokenizer_sha256": pl_module.hparams["tokenizer_sha256"],
        }
        (folder / "minillm.json").write_text(json.dumps(config, indent=2))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.stop_reason is not None:
            log.info("training stopped early (%s): no final/ export", pl_module.stop_reason)
            return
        if not weights_finite(pl_module.exported_model()):  # a step that overflowed: not exported, the run fails
            pl_module.stop_reason = "nonfinite"
            last = self.run_dir / "checkpoints" / "last.ckpt"
            log.error(
                "the weights at step %d are not finite (NaN or inf): no final/ export. The last good state is %s; "
                "lower optim.lr or try trainer.precision=32-true, then resume=auto or retrain",
                trainer.global_step,
                last if last.is_file() else "not on disk (no checkpoint was written before the weights broke)",
            )
            return
        if not trainer.is_global_zero:
            return
        best = next((c for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None) == "val/loss"), None)
        best_path = Path(best.best_model_path) if best is not None and best.best_model_path else None
        if best_path is None and (self.run_dir / "checkpoints" / "best.ckpt").is_file():  # a run dir moved since
            best_path = self.run_dir / "checkpoints" / "best.ckpt"
        best_loss = float(best.best_model_score) if best is not None and best.best_model_score is not None else None
        last_loss = trainer.callback_metrics.get("val/loss")
        last_loss = None if last_loss is None else float(last_loss)
        if self.weights == "best" and best_path is not None and best_path.is_file():
            if pl_module.lora.enabled:  # the checkpoint holds the adapters: load them into the finished module
                state = torch.load(best_path, map_location=pl_module.device, weights_only=True)["state_dict"]
                pl_module.load_state_dict(state, strict=False)
                model = pl_module.exported_model()
            else:
                model = _weights_of(best_path)
            loss = "" if best_loss is None else f", val/loss {best_loss:.4f}"
            which = f"the best weights ({best_path.name}{loss})"
        else:
            if self.weights == "best":
                log.warning(
                    "final.weights=best, but there is no best.ckpt in %s (no validation ran?): final/ holds the last "
                    "weights",
                    self.run_dir / "checkpoints",
                )
            model = pl_module.exported_model()
            loss = "" if last_loss is None else f", val/loss {last_loss:.4f}"
            which = f"the last weights (step {trainer.global_step}{loss})"
        if pl_module.lora.enabled:
            base = None if pl_module.init_dir is None else str(pl_module.init_dir)
            lora.save_adapter(model, pl_module.lora, self.run_dir / "final" / lora.ADAPTER_DIR, base=base)
            model = lora.merged(model)
        out = save_pretrained(model, pl_module.tokenizer, self.run_dir / "final")
        config = pl_module.hparams["config"]
        metric = trainer.callback_metrics.get(config.get("optimized_metric", "val/loss"))
        rundir.record_finished(
            self.run_dir, config, trainer.global_step, self.weights, None if metric is None else float(metric)
        )
        log.info("final/ holds %s: %s", which, out)
        if self.weights == "last" and None not in (last_loss, best_loss) and last_loss > best_loss * OVERFIT_WARNING:
            log.warning(
                "validation loss ended at %.4f, well above its best %.4f (%s): the model may have overfit; "
                "final.weights=best makes final/ that checkpoint",
                last_loss,
                best_loss,
                best_path.name if best_path else "best.ckpt",
            )


def _weights_of(checkpoint: Path):
    """The exportable model of a training checkpoint (a reward model with its head)."""
    from minillm.model import RewardModel
    from minillm.pretrained import load_parts

    model, _, head = load_parts(checkpoint, "cpu")
    return RewardModel.from_trunk(model, *head) if head is not None else model
