"""At each validation: exact match of greedy replies on the first `limit` records of the held-out family
`<data dir>/eval/<family>.jsonl` (the stage module says where: `eval_records`), logged as `val/exact_match` (the
same function as `python -m minillm.eval`). Greedy decoding with the KV cache, in inference mode, train/eval mode
restored and no global RNG touched: it never changes the loss curve. Skipped (said once) when the data dir has no
such file."""

from __future__ import annotations

import logging

import lightning as L

from minillm.evaluation import exact_match_rate, load_family

log = logging.getLogger(__name__)


class TaskEval(L.Callback):
    def __init__(self, family: str = "verifiable", limit: int = 32, max_new_tokens: int = 16) -> None:
        self.family, self.limit, self.max_new_tokens = family, limit, max_new_tokens
        self._records: list[dict] | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = pl_module.eval_records(self.family)
        if path is None or not path.is_file():
            log.info("task eval: no %s, val/exact_match is not logged", path or f"eval/{self.family}.jsonl")
            self._records = []
            return
        self._records = load_family(path, self.limit)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._records or trainer.sanity_checking or not trainer.is_global_zero:
            return
        result = exact_match_rate(
            pl_module.model,
            pl_module.tokenizer,
            self._records,
            batch_size=self.limit,
            max_new_tokens=self.max_new_tokens,
        )
        pl_module.log("val/exact_match", result["exact_match"], rank_zero_only=True)
