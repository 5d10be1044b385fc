"""RLHF monitoring: alarms and a table of sample completions, from each rollout's metrics.

Alarms (warnings, at most one per kind every `alarm_every` rollouts): the mean KL to the reference above
`kl_alarm` nats per completion, every group with identical rewards (GRPO: no learning signal), nothing scored
by a rule, completions collapsing to length 0, every completion hitting the length limit. Every `sample_every`
rollouts, `num_samples` prompts of the batch are completed again with a fixed seed and written as a
(prompt, completion, score) table to the log and TensorBoard (`samples`). Sampling uses its own generator and
`generate_ids` restores train/eval mode: the table never changes the loss curve (tested).
"""

from __future__ import annotations

import logging

import lightning as L

log = logging.getLogger(__name__)


class RLHFMonitor(L.Callback):
    def __init__(self, sample_every: int = 25, num_samples: int = 4, kl_alarm: float = 20.0, alarm_every: int = 25):
        self.sample_every, self.num_samples = sample_every, num_samples
        self.kl_alarm, self.alarm_every = kl_alarm, alarm_every
        self._last: dict[str, int] = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not outputs or "metrics" not in outputs:
            return
        metrics, stage, step = outputs["metrics"], pl_module.rl, pl_module.rollouts
        if metrics["objective/kl"] > self.kl_alarm:
            self._alarm(
                step,
                "kl",
                f"mean KL to the reference is {metrics['objective/kl']:.1f} nats per completion "
                f"(> kl_alarm={self.kl_alarm}): the policy is drifting; raise stage.beta or lower optim.lr",
            )
        if metrics.get("frac_reward_zero_std", 0.0) == 1.0:
            self._alarm(
                step,
                "zero_std",
                "every group got identical rewards: no learning signal this step (the task "
                "is too hard or too easy for the policy; raise stage.num_generations or stage.temperature)",
            )
        if metrics["frac_unscored"] == 1.0:
            self._alarm(
                step,
                "unscored",
                f"stage.reward={stage.reward} could score none of this batch's completions "
                "(prompts of another task): select prompt files with data.sources",
            )
        if metrics["completions/mean_length"] < 1:
            self._alarm(step, "empty", "completions collapsed to length 0 (the policy ends at once)")
        if metrics["completions/clipped_ratio"] == 1.0:
            self._alarm(
                step,
                "long",
                f"every completion hit stage.max_completion_length={stage.max_completion_length} without ending",
            )
        if self.sample_every and step % self.sample_every == 0 and trainer.is_global_zero:
            self.log_samples(trainer, pl_module, outputs["prompts"])

    def _alarm(self, step: int, name: str, message: str) -> None:
        if step - self._last.get(name, -self.alarm_every) >= self.alarm_every:
            self._last[name] = step
            log.warning("rollout %d: %s", step, message)

    def log_samples(self, trainer: L.Trainer, pl_module, prompts: dict) -> list[tuple[str, str, float]]:
        rows = pl_module.sample_table(prompts, self.num_samples)
        table = "\n".join(f"| {p!r} | {c!r} | {s:.3f} |" for p, c, s in rows)
        log.info("rollout %d samples:\n| prompt | completion | score |\n%s", pl_module.rollouts, table)
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_text"):  # TensorBoard
                markdown = "| prompt | completion | score |\n|---|---|---|\n" + table
                experiment.add_text("samples", markdown, global_step=pl_module.rollouts)
        return rows
