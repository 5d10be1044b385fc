"""RLHF: the policy (init: the DPO model, else the SFT model) generates, a reward scores, the policy is updated.

Every training step is one rollout batch: B prompts (GRPO: each G times) → sampled completions y with the KV
cache (`minillm.generate`) → a score s(x, y) from the trained reward model (`stage.reward=model`, read at the
completion's last token) or a rule (`minillm.reward_rules`) → `num_ppo_epochs` passes of `num_mini_batches` updates
(manual optimization; budgets count rollouts, Lightning's global_step counts updates). The frozen reference
π_ref is the init policy; reference and reward model live outside the module tree (not optimized, not
checkpointed: recorded by sha256) and are moved to the policy's device and dtype when fit starts.

PPO (Schulman et al. 2017; Ouyang et al. 2022; the "N implementation details of RLHF with PPO"):
    per-token reward   r_t = -β (log π_old(y_t) - log π_ref(y_t))  + [t = last] · s(x, y)
    GAE                δ_t = r_t + γ V(t+1) - V(t),   A_t = δ_t + γλ A_{t+1},   R_t = A_t + V(t)
    advantages are whitened over the batch's completion tokens, then per mini-batch
    L = mean_t max(-A_t ρ_t, -A_t clip(ρ_t, 1±ε)) + c_v · ½ mean_t max((V - R)², (V_clip - R)²) - c_H · H
    with ρ_t = π(y_t) / π_old(y_t). The critic V is a separate network (trunk + scalar head, as TRL): initialised
    from the reward model when there is one, else from the init policy with a zero head. A separate critic
    costs a second forward/backward but keeps value regression from pulling on the policy's features — on a
    6M-parameter model the shared-trunk variant is cheaper but the two losses fight over the same weights.
GRPO (Shao et al. 2024): G completions per prompt, no critic, sequence advantage
    A_i = (s_i - mean_group(s)) / scale  (`stage.scale_rewards`), per token
    ℓ_t = -min(ρ_t A_i, clip(ρ_t, 1±ε) A_i) + β KL_k3(π ‖ π_ref)_t, aggregated by `stage.loss_type`.
PPO-ptx (Ouyang et al. 2022; `stage.ptx_coef` γ > 0, either algorithm): every update adds γ · the SFT loss of a
batch of conversations from `stage.ptx_sources` (sft/ files, their training split), so that optimizing the reward
does not unlearn the supervised tasks.
Rollouts are sampled with a seed made of (seed, rollout index, rank), so a resumed run draws the same completions
as an uninterrupted one and every rank draws its own; ptx batches with one made of (seed, update index, rank).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import torch
from torchmetrics import MeanMetric

from minillm import reward_rules
from minillm.config import Config, RLHFConfig
from minillm.data.kinds import PROMPTS, collate_padded, encode_sft
from minillm.data.records import BadRecords, is_held_out, read_conversations
from minillm.generate import GenerationConfig, generate_ids
from minillm.losses import (
    entropy_from_logits,
    gae,
    group_advantages,
    grpo_loss,
    lm_loss,
    masked_mean,
    ppo_policy_loss,
    ppo_value_loss,
    token_logprobs,
    whiten,
)
from minillm.model import MiniGPT, RewardModel
from minillm.rundir import StageInputs
from minillm.stages.base import LMModule, Needs, disable_dropout

log = logging.getLogger(__name__)


@dataclass
class Rollout:
    """One batch of completions and everything its updates read. Rows are completions (B = prompts × G);
    columns of the (B, L) tensors are completion positions, of `ids`/`attention`/`positions` the prompt and then
    the completion (P + L)."""

    ids: torch.Tensor  # (B, P + L) prompt (left-padded) and completion (right-padded)
    attention: torch.Tensor  # (B, P + L)
    positions: torch.Tensor  # (B, P + L) position ids that skip the left padding
    tokens: torch.Tensor  # (B, L) completion tokens
    mask: torch.Tensor  # (B, L) real completion tokens of scored completions (what every loss averages over)
    ended: torch.Tensor  # (B,) the completion ends with EOS / <|im_end|> (else it hit the length limit)
    prompt_len: int  # P
    completions: list[list[int]]
    records: list[dict]  # the prompt records (rule rewards read their answers)
    lengths: torch.Tensor | None = None  # (B,) completion lengths
    scores: torch.Tensor | None = None  # (B,) s(x, y), 0 where unscored
    scored: torch.Tensor | None = None  # (B,) a rule had an opinion (a reward model always has)
    old_logps: torch.Tensor | None = None  # (B, L) log π_old(y_t), before the updates
    ref_logps: torch.Tensor | None = None  # (B, L) log π_ref(y_t)
    old_values: torch.Tensor | None = None  # (B, L) PPO: V_old(t)
    advantages: torch.Tensor | None = None  # PPO (B, L) whitened GAE; GRPO (B,) group-normalised
    returns: torch.Tensor | None = None  # (B, L) PPO: GAE returns

    def scored_mean(self) -> torch.Tensor:
        """Mean score of the completions that were scored (0 when none was)."""
        return self.scores[self.scored].mean() if bool(self.scored.any()) else self.scores.new_zeros(())


class RLHFModule(LMModule):
    schema = RLHFConfig
    data = PROMPTS
    needs = Needs(reference=True, reward_model=True)

    @classmethod
    def needs_for(cls, stage: RLHFConfig) -> Needs:
        return Needs(reference=True, reward_model=stage.reward == "model")  # a rule needs no reward model

    def __init__(self, config: Config, plain_config: dict, tokenizer_sha256: str = "") -> None:
        super().__init__(config, plain_config, tokenizer_sha256)
        self.automatic_optimization = False  # several updates per rollout batch
        self.rl: RLHFConfig = config.stage
        self.seed = config.seed
        block = config.model.block_size
        if self.rl.max_prompt_length + self.rl.max_completion_length > block:
            raise ValueError(
                f"stage.max_prompt_length + stage.max_completion_length = "
                f"{self.rl.max_prompt_length + self.rl.max_completion_length} exceeds model.block_size = {block}"
            )
        if self.rl.reward != "model":
            reward_rules.get_reward(self.rl.reward)  # an unknown name fails now, not after the first rollout
        disable_dropout(self.model)
        self.value = RewardModel(self.model.config) if self.rl.algorithm == "ppo" else None
        self.val_reward = MeanMetric()
        self.rollouts = 0  # rollout batches done (in checkpoints)
        self.__dict__["reward_model"] = None
        self.data_config = config.data
        self.ptx: list[dict[str, torch.Tensor]] = []  # attach(): PPO-ptx's conversations, rows as SFT batches them

    @classmethod
    def compiles_rollouts(cls, stage: RLHFConfig) -> bool:
        return stage.compile_rollouts

    @classmethod
    def updates_per_batch(cls, stage: RLHFConfig) -> int:
        return stage.updates_per_rollout

    def attach(self, inputs: StageInputs, resuming: bool) -> None:
        """The reward model first: a fresh run's critic starts from it (`initialise`)."""
        if inputs.reward_model is not None:
            self.set_reward_model(inputs.reward_model)
        super().attach(inputs, resuming)
        if self.rl.ptx_coef > 0:
            self.ptx = self._read_ptx()

    def _read_ptx(self) -> list[dict[str, torch.Tensor]]:
        """Each conversation of the stage.ptx_sources files outside this run's validation split, encoded as SFT
        encodes it: a row of `collate_padded` (input_ids, labels, truncated)."""
        if self.data_dir is None:
            raise ValueError("stage.ptx_coef > 0 reads sft/ files of a data dir: set data.dir (or unset ptx_coef)")
        bad, out = BadRecords(self.data_config.skip_bad_records), []
        for stem in self.rl.ptx_sources:
            path = self.data_dir / "sft" / f"{stem}.jsonl"
            if not path.is_file():
                have = sorted(f.stem for f in (self.data_dir / "sft").glob("*.jsonl"))
                raise FileNotFoundError(
                    f"stage.ptx_sources names {stem!r}, but {path} does not exist (sft/ has {have})"
                )
            for text in read_conversations(path, bad):
                if not is_held_out(text, self.data_config.val_ratio):  # a superset of a lower ratio's split
                    ids, labels, cut = encode_sft(self.tokenizer, json.loads(text), self.model.config.block_size + 1)
                    out.append(
                        {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "truncated": torch.tensor(cut)}
                    )
        if not out:
            raise ValueError(f"stage.ptx_sources {list(self.rl.ptx_sources)} hold no training conversations")
        log.info("PPO-ptx: %d conversations of sft/%s, coefficient %g", len(out), self.rl.ptx_sources, self.rl.ptx_coef)
        return out

    # ---- the frozen models: plain attributes, outside the module tree ----
    def set_reward_model(self, model: RewardModel) -> None:
        model = model.eval().requires_grad_(False)
        disable_dropout(model)
        self.__dict__["reward_model"] = model

    def initialise(self, init_model: MiniGPT) -> None:
        """Policy from the init weights; critic from the reward model, else the init trunk with a zero head."""
        super().initialise(init_model)
        if self.value is None:
            return
        if self.reward_model is not None:  # its trunk and head (the critic reads no likelihood term)
            self.value.model.load_state_dict(self.reward_model.model.state_dict())
            self.value.score.load_state_dict(self.reward_model.score.state_dict())
        else:
            self.value.model.load_state_dict(init_model.state_dict())
            torch.nn.init.zeros_(self.value.score.weight)

    def on_fit_start(self) -> None:
        if self.reference is None or self.tokenizer is None:
            raise RuntimeError("RLHF needs a reference model and the tokenizer: build() sets them")
        if self.rl.reward == "model" and self.reward_model is None:
            raise RuntimeError("stage.reward=model needs a reward model: build() loads it")
        dtype = next(self.model.parameters()).dtype
        for frozen in (self.reference, self.reward_model):
            if frozen is not None:
                frozen.to(device=self.device, dtype=dtype)

    # ---- checkpoints: the rollout counter (the rollout RNG is a function of it) ----
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["rlhf"] = {"rollouts": self.rollouts}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.rollouts = int(checkpoint.get("rlhf", {}).get("rollouts", 0))

    # ---- rollouts ----
    def generation(self, seed: int, greedy: bool = False) -> GenerationConfig:
        return GenerationConfig(
            max_new_tokens=self.rl.max_completion_length,
            do_sample=not greedy,
            temperature=self.rl.temperature,
            top_k=self.rl.top_k,
            top_p=self.rl.top_p,
            seed=seed,
        )

    @torch.no_grad()
    def rollout(self, batch: dict, generation: GenerationConfig, score_only: bool = False) -> Rollout:
        """Generate, then everything the update needs: ids, masks, scores, old and reference log-probs and (PPO)
        old values. `score_only`: stop after the scores (validation, samples)."""
        G = self.rl.group_size if generation.do_sample else 1
        prompt_ids = batch["input_ids"].repeat_interleave(G, 0)
        prompt_mask = batch["attention_mask"].repeat_interleave(G, 0)
        records = [r for r in batch["records"] for _ in range(G)]
        completions = generate_ids(self.model, self.tokenizer, prompt_ids, prompt_mask, generation)
        B, P = prompt_ids.shape
        L = max(1, max(len(c) for c in completions))
        tokens = torch.full((B, L), self.tokenizer.pad_id, dtype=torch.long, device=self.device)
        mask = torch.zeros((B, L), dtype=torch.long, device=self.device)
        for i, c in enumerate(completions):
            tokens[i, : len(c)] = torch.tensor(c, dtype=torch.long)
            mask[i, : len(c)] = 1
        eos = {self.tokenizer.eos_id, self.tokenizer.im_end_id}
        ended = torch.tensor([bool(c) and c[-1] in eos for c in completions], device=self.device)
        attention = torch.cat([prompt_mask, mask], 1)  # (B, P + L)
        r = Rollout(
            ids=torch.cat([prompt_ids, tokens], 1),
            attention=attention,
            positions=(attention.cumsum(1) - 1).clamp(min=0),
            tokens=tokens,
            mask=mask,
            ended=ended,
            prompt_len=P,
            completions=completions,
            records=records,
        )
        scores = self.score(r)
        r.lengths = mask.sum(1)
        r.scored = torch.isfinite(scores)  # a rule may return None (NaN) for a prompt it cannot judge
        r.scores = scores.nan_to_num(0.0)
        r.mask = mask * r.scored[:, None]  # unscored completions stay out of every loss and statistic
        if score_only:
            return r
        r.old_logps = self._policy(r, slice(None))[0]
        r.ref_logps = self._policy(r, slice(None), model=self.reference)[0]
        if self.value is not None:
            r.old_values = self._values(r, slice(None))[0]
        return r

    def score(self, r: Rollout) -> torch.Tensor:
        """s(x, y) per completion, (B,)."""
        if self.rl.reward == "model":
            last = r.prompt_len + r.mask.sum(1) - 1  # the completion's last token (the prompt's if empty)
            first = torch.full_like(last, r.prompt_len)  # prompts are left-padded to one length
            scores = self.reward_model.sequence_scores(r.ids, last, r.attention, r.positions, first=first)
        else:
            texts = [self.tokenizer.decode(c) for c in r.completions]
            values = reward_rules.score(self.rl.reward, texts, r.completions, r.records)
            scores = torch.tensor(values, dtype=torch.float32, device=self.device)
        if self.rl.missing_eos_penalty is not None:
            scores = scores - self.rl.missing_eos_penalty * (~r.ended).float()
        if self.rl.short_completion_penalty is not None:  # the EOS token is not content
            content = torch.tensor([len(c) for c in r.completions], device=self.device) - r.ended.long()
            scores = scores - self.rl.short_completion_penalty * (content < self.rl.min_completion_length).float()
        return scores

    def _policy(self, r: Rollout, rows, model: MiniGPT | None = None) -> tuple[torch.Tensor, ...]:
        """(log π(y_t), logits, MoE load-balancing loss) at the completion positions of the selected rows: (b, L),
        (b, L, V), (). The logits are
        divided by the sampling temperature: the ratio, the KL and the entropy are those of the policy that drew
        the completions (as TRL does)."""
        model = self.model if model is None else model
        P = r.prompt_len
        out = model(r.ids[rows], position_ids=r.positions[rows], attention_mask=r.attention[rows])
        logits = out.logits[:, P - 1 : -1] / self.rl.temperature  # position t predicts completion token t
        return token_logprobs(logits, r.tokens[rows]), logits, out.aux_loss

    def _values(self, r: Rollout, rows) -> tuple[torch.Tensor, torch.Tensor]:
        """(V(t) at the completion positions of the selected rows (b, L), the critic's MoE load-balancing loss)."""
        P = r.prompt_len
        values, aux = self.value.scores_and_aux(r.ids[rows], r.attention[rows], r.positions[rows])
        return values[:, P - 1 : -1], aux

    # ---- the update ----
    def training_step(self, batch: dict, batch_idx: int) -> dict:
        """One rollout batch and its updates; returns the metrics and prompts for callbacks (RLHFMonitor)."""
        r = self.rollout(batch, self.generation(seed=self.rollout_seed()))
        prepare, update = (
            (self._ppo_prepare, self._ppo_update) if self.value is not None else (self._grpo_prepare, self._grpo_update)
        )
        metrics = prepare(r)
        order = torch.Generator().manual_seed(self.seed + self.rollouts)  # mini-batch shuffling, resumable
        B = len(r.completions)
        sums: dict[str, float] = {}
        for _ in range(self.rl.num_ppo_epochs):
            for rows in torch.randperm(B, generator=order).chunk(self.rl.num_mini_batches):
                rows = rows.to(self.device)
                stats = update(r, rows)
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
        updates = self.rl.updates_per_rollout
        metrics |= {k: v / updates for k, v in sums.items()}
        self.lr_schedulers().step()
        self.rollouts += 1
        metrics = {k: float(v) for k, v in (metrics | self._completion_stats(r)).items()}
        metrics["train/reward"] = float(r.scored_mean())
        self._log_rollout(metrics)
        self._tokens = int(r.attention.sum()) * (1 + updates)
        self.log_rate()
        return {"metrics": metrics, "prompts": self._prompt_batch(r)}

    def rollout_seed(self) -> int:
        """The sampling seed of this rollout: (seed, rollout index, rank), so a resumed run draws the same completions
        and the ranks of a multi-process run draw independent ones."""
        return self.seed * 1_000_003 + self.rollouts + (self.global_rank << 32)

    def ptx_loss(self, update: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(the SFT loss of stage.ptx_batch_size conversations drawn for optimizer step `update` — mean over their
        assistant tokens —, the MoE load-balancing loss). The draw depends on (seed, update, rank) only."""
        draw = torch.Generator().manual_seed(self.seed * 1_000_003 + update * 997 + self.global_rank)
        rows = [self.ptx[i] for i in torch.randint(len(self.ptx), (self.rl.ptx_batch_size,), generator=draw).tolist()]
        batch = collate_padded(rows, self.tokenizer)  # right padding: causal attention never reads it
        ids, labels = batch["input_ids"].to(self.device), batch["labels"].to(self.device)
        out = self.model(ids[:, :-1])
        return lm_loss(out.logits, labels[:, 1:]), out.aux_loss

    def _step(self, loss: torch.Tensor) -> dict[str, torch.Tensor]:
        """One optimizer step on `loss` (plus PPO-ptx's term when on); returns the ptx loss for the metrics."""
        stats = {}
        if self.ptx:
            ptx, aux = self.ptx_loss(self.global_step)
            loss = loss + self.rl.ptx_coef * ptx + aux
            stats["loss/ptx_avg"] = ptx.detach()
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self._last_loss = loss.detach()  # the non-finite guard in on_before_optimizer_step reads it
        self.manual_backward(loss)
        self.clip_gradients(optimizer, gradient_clip_val=self.rl.max_grad_norm, gradient_clip_algorithm="norm")
        optimizer.step()
        return stats

    def _ppo_prepare(self, r: Rollout) -> dict[str, torch.Tensor]:
        mask = r.mask
        kl = (r.old_logps - r.ref_logps) * mask  # k1 per token
        non_score = -self.rl.beta * kl
        per_token = non_score.clone()
        last = (mask.sum(1) - 1).clamp(min=0)
        per_token[torch.arange(len(last), device=self.device), last] += r.scores
        advantages, returns = gae(per_token, r.old_values, mask, self.rl.gamma, self.rl.lam)
        r.advantages, r.returns = whiten(advantages, mask), returns
        return {
            "objective/kl": kl.sum(1).mean(),
            "objective/entropy": (-r.old_logps * mask).sum(1).mean(),
            "objective/non_score_reward": non_score.sum(1).mean(),
            "objective/rlhf_reward": r.scored_mean() + non_score.sum(1).mean(),
            "objective/scores": r.scored_mean(),
        }

    def _ppo_update(self, r: Rollout, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        mask = r.mask[rows]
        logps, logits, aux = self._policy(r, rows)
        pg_loss, pg = ppo_policy_loss(logps, r.old_logps[rows], r.advantages[rows], mask, self.rl.cliprange)
        values, value_aux = self._values(r, rows)
        vf_loss, vf = ppo_value_loss(values, r.old_values[rows], r.returns[rows], mask, self.rl.cliprange_value)
        entropy = masked_mean(entropy_from_logits(logits), mask)
        loss = pg_loss + self.rl.vf_coef * vf_loss - self.rl.entropy_coef * entropy
        ptx = self._step(loss + aux + value_aux)  # MoE load balancing for the policy's and the critic's routers
        return ptx | {
            "policy/approxkl_avg": pg["approxkl"],
            "policy/clipfrac_avg": pg["clipfrac"],
            "loss/policy_avg": pg_loss.detach(),
            "loss/value_avg": vf_loss.detach(),
            "value/clipfrac_avg": vf["clipfrac"],
            "policy/entropy_avg": entropy.detach(),
            "value/ratio": pg["ratio"],
            "train/loss": loss.detach(),
        }

    def _grpo_prepare(self, r: Rollout) -> dict[str, torch.Tensor]:
        G, scores = self.rl.group_size, r.scores
        r.advantages = group_advantages(scores, G, self.rl.scale_rewards)
        group_std = scores.view(-1, G).std(1)
        kl = (r.old_logps - r.ref_logps) * r.mask
        return {
            "reward": r.scored_mean(),
            "reward_std": group_std.mean(),
            "frac_reward_zero_std": torch.isclose(group_std, torch.zeros_like(group_std)).float().mean(),
            f"rewards/{self.rl.reward}/mean": r.scored_mean(),
            f"rewards/{self.rl.reward}/std": scores.std(),
            "objective/kl": kl.sum(1).mean(),
        }

    def _grpo_update(self, r: Rollout, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        mask = r.mask[rows]
        logps, logits, aux = self._policy(r, rows)
        loss, stats = grpo_loss(
            logps,
            r.old_logps[rows],
            r.ref_logps[rows],
            r.advantages[rows],
            mask,
            beta=self.rl.beta,
            clip=self.rl.cliprange,
            loss_type=self.rl.loss_type,
            max_completion_length=self.rl.max_completion_length,
        )
        entropy = masked_mean(entropy_from_logits(logits), mask)
        ptx = self._step(loss - self.rl.entropy_coef * entropy + aux)
        return stats | ptx | {"entropy": entropy.detach(), "train/loss": loss.detach()}

    # ---- logging, alarms and samples ----
    def _completion_stats(self, r: Rollout) -> dict[str, float]:
        lengths = r.lengths.float()
        ended = r.ended
        return {
            "frac_unscored": float((~r.scored).float().mean()),
            "completions/mean_length": float(lengths.mean()),
            "completions/min_length": float(lengths.min()),
            "completions/max_length": float(lengths.max()),
            "completions/clipped_ratio": float((~ended).float().mean()),
            "completions/mean_terminated_length": float(lengths[ended].mean()) if bool(ended.any()) else 0.0,
            "value/num_eos_tokens": float(ended.sum()),
            "num_tokens": float(r.attention.sum()),
            "episode": float(self.rollouts * len(r.completions)),
        }

    def _log_rollout(self, metrics: dict) -> None:
        self.log("train/loss", metrics["train/loss"], prog_bar=True)
        self.log("train/reward", metrics["train/reward"], prog_bar=True)
        self.log_dict({k: v for k, v in metrics.items() if k not in ("train/loss", "train/reward")})

    def sample_table(self, prompts: dict, n: int) -> list[tuple[str, str, float]]:
        """The first n prompts of a rollout batch (`training_step`'s "prompts") completed again with the run's
        fixed seed: (prompt, completion, score) rows for the samples table (RLHFMonitor)."""
        batch = {k: v[:n] for k, v in prompts.items()}
        r = self.rollout(batch, self.generation(seed=self.seed), score_only=True)
        return [
            (record["prompt"][-1]["content"], self.tokenizer.decode(completion), score)
            for record, completion, score in zip(r.records, r.completions, r.scores.tolist())
        ]

    def _prompt_batch(self, r: Rollout) -> dict:
        """The rollout's prompts, once each (what the samples table completes again)."""
        G, P = self.rl.group_size, r.prompt_len
        return {"input_ids": r.ids[::G, :P], "attention_mask": r.attention[::G, :P], "records": r.records[::G]}

    # ---- validation: greedy completions of held-out prompts, their mean score ----
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        r = self.rollout(batch, self.generation(seed=self.seed, greedy=True), score_only=True)
        size = len(r.completions)
        if bool(r.scored.any()):
            self.val_reward.update(r.scored_mean(), weight=int(r.scored.sum()))
        self.log("val/mean_length", r.lengths.float().mean(), batch_size=size)

    def on_validation_epoch_end(self) -> None:
        scored = self.val_reward.update_count > 0  # else the rule had no opinion on any held-out prompt: NaN
        self.log("val/reward", self.val_reward.compute() if scored else float("nan"), prog_bar=True)
        self.val_reward.reset()
