"""The policy trainer: log-probs for the policy / reference / old weights, the RL step and the SFT step.

One instance per rank, after `init_distributed`. Every method that runs the model is a collective over
the rank's tensor-parallel group (and `train_step` / `sft_step` over the data-parallel group), so all
ranks call them in the same order. Each rank passes its own data-parallel share of the batch
(`batch.split_for_dp(layout.dp_rank, layout.dp_size)`).
"""

from __future__ import annotations

import torch

from slime.training import losses
from slime.training.batch import TrainBatch, collate, unpad_rows
from slime.training.model_trainer import MegatronTrainer

WEIGHT_NAMES = ("actor", "ref", "old")


class PolicyTrainer(MegatronTrainer):
    def _log_probs(self, micro, with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probs (and entropies) of the response tokens, [rows, longest response] zero-padded, via the
        backend's kernel op (chunked over the vocabulary slice, Triton on GPU backends) on the response positions
        only; `slime.training.log_probs` is the plain formula it matches."""
        from slime.kernels import get_op

        logits = self._forward(micro)
        index, valid = self._response_positions(micro, shift=1)
        index, valid = index.to(self.device), valid.to(self.device)
        rows, longest = index.shape
        local_vocab = logits.shape[-1]
        # float32 from here (a no-op unless --bf16): the log-softmax over the vocabulary needs its precision
        response_logits = logits.gather(1, index.unsqueeze(-1).expand(rows, longest, local_vocab)).float()
        targets = micro.input_ids.to(self.device).gather(1, (index + 1).clamp(max=logits.shape[1] - 1))
        op = get_op("vocab_parallel_logprobs_and_entropy", backend=self.backend)
        log_probs, entropy = op(
            response_logits.reshape(-1, local_vocab),
            targets.reshape(-1),
            self.tp_group,
            temperature=self.config.rollout_temperature,
        )
        real = valid.to(log_probs.dtype)
        log_probs = log_probs.view(rows, longest) * real
        return log_probs, entropy.view(rows, longest) * real if with_entropy else None

    @torch.no_grad()
    def compute_log_probs(
        self, batch: TrainBatch, weights: str = "actor"
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-sample log-probs and entropies of the response tokens under the named weights."""
        if weights not in WEIGHT_NAMES and not self.has_snapshot(weights):
            raise ValueError(f"weights={weights!r}: expected one of {', '.join(WEIGHT_NAMES)} or a snapshot name")
        self.model.eval()
        log_probs: list[torch.Tensor] = [torch.empty(0)] * len(batch)
        entropies: list[torch.Tensor] = [torch.empty(0)] * len(batch)
        with self.use_weights(weights):
            for indices in self._micro_batches(batch):
                micro = collate(batch, indices)
                lp, ent = self._log_probs(micro, with_entropy=True)
                _scatter_rows(log_probs, entropies, indices, micro.response_lengths, lp, ent)
        return log_probs, entropies

    def train_step(self, batch: TrainBatch, keep_log_probs: bool = False) -> dict[str, float]:
        """One optimizer step of the RL loss over this rank's share of the global batch. `keep_log_probs`: leave
        the share's detached log-probs and entropies, as computed before the update, in `last_log_probs` (with
        one step per rollout they are the old log-probs: no separate pass is needed for checks)."""
        cfg = self.config
        kept_lp: list[torch.Tensor] = [torch.empty(0)] * len(batch)
        kept_ent: list[torch.Tensor] = [torch.empty(0)] * len(batch)
        if cfg.use_kl_loss and batch.ref_log_probs is None:
            raise ValueError(
                "use_kl_loss is on but batch.ref_log_probs is empty: call compute_log_probs(batch, 'ref') first"
            )
        if cfg.use_tis and any(r is None for r in batch.rollout_log_probs):
            raise ValueError("use_tis is on but some samples have no rollout_log_probs")
        denominator = self.global_denominator(batch)
        batch, trained_share = self._rows_with_signal(batch, keep_log_probs, denominator)
        self.model.train()
        self._moe_step_begin(batch)
        totals = {
            "loss": 0.0,
            "pg_loss": 0.0,
            "kl": 0.0,
            "entropy": 0.0,
            "clip_frac": 0.0,
            "ppo_kl": 0.0,
            "tis_weight": 0.0,
        }
        for indices in self._micro_batches(batch):
            micro = collate(batch, indices)
            log_probs, entropy = self._log_probs(micro, with_entropy=True)
            if keep_log_probs:
                _scatter_rows(kept_lp, kept_ent, indices, micro.response_lengths, log_probs, entropy)
            mask = micro.response_mask.to(self.device)
            old = (
                log_probs.detach()
                if batch.old_log_probs is None
                else micro.pad_responses([batch.old_log_probs[i] for i in indices]).to(self.device)
            )
            advantages = micro.pad_responses([batch.advantages[i] for i in indices]).to(self.device)
            weights = None
            if cfg.use_tis:
                rollout = micro.pad_responses([batch.rollout_log_probs[i] for i in indices]).to(self.device)
                weights = losses.truncated_importance_weights(old, rollout, mask, cfg.tis_clip)
                totals["tis_weight"] += float(losses.reduce(weights, mask, cfg.loss_reduction, denominator))
            pg_loss, pg_metrics = losses.policy_loss(
                log_probs, old, advantages, mask,
                eps_clip=cfg.eps_clip, eps_clip_high=cfg.eps_clip_high, eps_clip_c=cfg.eps_clip_c,
                ratio_type=cfg.ratio_type, reduction=cfg.loss_reduction,
                importance_weights=weights, denominator=denominator,
            )  # fmt: skip
            entropy_mean = losses.entropy_bonus(entropy, mask, cfg.loss_reduction, denominator)
            loss = pg_loss - cfg.entropy_coef * entropy_mean
            if cfg.use_kl_loss:
                ref = micro.pad_responses([batch.ref_log_probs[i] for i in indices]).to(self.device)
                kl = losses.reduce(
                    losses.kl_penalty(log_probs, ref, cfg.kl_loss_type), mask, cfg.loss_reduction, denominator
                )
                loss = loss + cfg.kl_loss_coef * kl
                totals["kl"] += float(kl.detach())
            with self._autocast():
                loss.backward()
            totals["loss"] += float(loss.detach())
            totals["pg_loss"] += float(pg_loss.detach())
            totals["entropy"] += float(entropy_mean.detach())
            totals["clip_frac"] += float(pg_metrics["pg_clip_frac"])
            totals["ppo_kl"] += float(pg_metrics["ppo_kl"])
        self.last_log_probs = (kept_lp, kept_ent) if keep_log_probs else None
        for name in ("entropy", "tis_weight"):  # means over the rows trained on, not over the whole batch
            totals[name] /= trained_share
        return self._finish_step(totals, batch)

    def _rows_with_signal(
        self, batch: TrainBatch, keep_log_probs: bool, denominator: float
    ) -> tuple[TrainBatch, float]:
        """The share without the samples whose loss has no gradient: advantages all exactly zero (a GRPO group
        whose rewards were all equal), no KL or entropy term, a dense model (a MoE router's auxiliary loss sees
        every token). The loss keeps the whole batch's denominator, so the gradient is the same, computed on
        fewer rows. Returns (rows to train, their share of the denominator); one row stays so every rank steps."""
        cfg = self.config
        if keep_log_probs or cfg.use_kl_loss or cfg.entropy_coef or self._moe_stats is not None:
            return batch, 1.0
        rows = batch.rows_with_nonzero("advantages") or [0]
        trained = batch.select(rows) if len(rows) < len(batch) else batch
        return trained, self.global_denominator(trained) / denominator  # a collective: every rank calls it

    def sft_step(self, batch: TrainBatch, lr: float | None = None) -> dict[str, float]:
        """One optimizer step of the NLL of the masked response tokens (warm-up SFT); an explicit `lr` is used
        instead of the schedule, which it leaves untouched."""
        denominator = self.global_denominator(batch)
        self.model.train()
        self._moe_step_begin(batch)
        totals = {"loss": 0.0}
        for indices in self._micro_batches(batch):
            micro = collate(batch, indices)
            log_probs, _ = self._log_probs(micro, with_entropy=False)
            loss = losses.sft_loss(
                log_probs, micro.response_mask.to(self.device), self.config.loss_reduction, denominator
            )
            with self._autocast():
                loss.backward()
            totals["loss"] += float(loss.detach())
        return self._finish_step(totals, batch, lr)

    def _finish_step(self, totals: dict[str, float], batch: TrainBatch, lr: float | None = None) -> dict[str, float]:
        metrics = self._reduce_metrics({**totals, "tokens": float(batch.num_tokens())})
        metrics.update(self._moe_step_metrics())
        grad_norm, lr = self._optimizer_step(lr)
        metrics.update(grad_norm=grad_norm, lr=lr, step=float(self.step))
        return metrics


def _scatter_rows(log_probs: list, entropies: list, indices: list[int], lengths: list[int], lp, ent) -> None:
    """A micro-batch's padded [rows, longest] log-probs and entropies into the per-sample lists, at `indices`."""
    rows_lp = unpad_rows(lp.detach().float().cpu(), lengths)
    rows_ent = unpad_rows(ent.detach().float().cpu(), lengths)
    for i, row_lp, row_ent in zip(indices, rows_lp, rows_ent):
        log_probs[i], entropies[i] = row_lp, row_ent
