"""The PPO critic: the same megatron backbone with a scalar value head instead of the LM head.

Value of response token t is read at the position that predicts it (the state before t is generated),
aligned with the policy's log-probs. The head is replicated across tensor-parallel ranks and starts at 0.
"""

from __future__ import annotations

import torch

from slime.training import losses
from slime.training.batch import TrainBatch, collate
from slime.training.model_trainer import MegatronTrainer


class ValueHead(torch.nn.Module):
    """Called by GPTModel in place of its output layer: [s, b, h] -> ([s, b, 1], None)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1, bias=True)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, hidden_states, weight=None, runtime_gather_output=None):
        return self.linear(hidden_states), None


class CriticTrainer(MegatronTrainer):
    def _attach_head(self) -> None:
        self.model.output_layer = ValueHead(self.hf_config.hidden_size)
        self.model.share_embeddings_and_output_weights = False

    def _values(self, micro) -> torch.Tensor:
        """[rows, longest response] values, zero-padded: the value at the position that predicts each token."""
        return self._responses(micro, self._forward(micro)[..., 0].float(), shift=1)

    @torch.no_grad()
    def compute_values(self, batch: TrainBatch) -> list[torch.Tensor]:
        self.model.eval()
        out: list[torch.Tensor] = [torch.empty(0)] * len(batch)
        for indices in self._micro_batches(batch):
            micro = collate(batch, indices)
            values = self._values(micro).float().cpu()
            for row, (i, n) in enumerate(zip(indices, micro.response_lengths)):
                out[i] = values[row, :n].clone()
        return out

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One optimizer step of the clipped value loss against batch.returns (old values: batch.values)."""
        if batch.values is None:
            raise ValueError("batch.values is empty: call compute_values(batch) before training the critic")
        denominator = self.global_denominator(batch)
        self.model.train()
        totals = {"value_loss": 0.0, "vf_clip_frac": 0.0}
        for indices in self._micro_batches(batch):
            micro = collate(batch, indices)
            values = self._values(micro)
            old = micro.pad_responses([batch.values[i] for i in indices]).to(self.device)
            returns = micro.pad_responses([batch.returns[i] for i in indices]).to(self.device)
            loss, metrics = losses.value_loss(
                values,
                old,
                returns,
                micro.response_mask.to(self.device),
                self.config.value_clip,
                self.config.loss_reduction,
                denominator,
            )
            with self._autocast():
                loss.backward()
            totals["value_loss"] += float(loss.detach())
            totals["vf_clip_frac"] += float(metrics["vf_clip_frac"])
        metrics = self._reduce_metrics(totals)
        grad_norm, lr = self._optimizer_step()
        metrics.update(grad_norm=grad_norm, lr=lr, step=float(self.step))
        return metrics
