"""At each validation: exact match of greedy replies on the first `limit` records of the held-out family
`<data dir>/eval/<family>.jsonl`, logged as `val/exact_match` (the same function as `python -m minillm.eval`).
Greedy decoding with the KV cache, in inference mode, train/eval mode restored and no global RNG touched: it
never changes the loss curve. Skipped (said once) when the data dir has no such file."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L

from minillm.data.datamodule import resolve_data_dir
from minillm.eval import exact_match, load_family

log = logging.getLogger(__name__)


class TaskEval(L.Callback):
    def __init__(self, family: str = "verifiable", limit: int = 32, max_new_tokens: int = 16) -> None:
        self.family, self.limit, self.max_new_tokens = family, limit, max_new_tokens
        self._records: list[dict] | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = resolve_data_dir(trainer.datamodule.config) / "eval" / f"{self.family}.jsonl"
        if not Path(path).is_file():
            log.info("task eval: no %s, val/exact_match is not logged", path)
            self._records = []
            return
        self._records = load_family(Path(path), self.limit)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._records or trainer.sanity_checking or not trainer.is_global_zero:
            return
        result = exact_match(
            pl_module.model,
            trainer.datamodule.tokenizer,
            self._records,
            batch_size=self.limit,
            max_new_tokens=self.max_new_tokens,
        )
        pl_module.log("val/exact_match", result["exact_match"], rank_zero_only=True)
