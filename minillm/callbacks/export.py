"""Beside the checkpoints: the model config and tokenizer (so a .ckpt opens with `load_model`); at the end of a
completed fit: `<run_dir>/final/`, the exported model folder. Never after an interrupt or a halt."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L

from minillm.pretrained import save_pretrained

log = logging.getLogger(__name__)


class ExportCallback(L.Callback):
    def __init__(self, run_dir: str) -> None:
        self.run_dir = Path(run_dir)

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
        if trainer.is_global_zero:
            out = save_pretrained(pl_module.exported_model(), pl_module.tokenizer, self.run_dir / "final")
            log.info("exported the final model to %s", out)
