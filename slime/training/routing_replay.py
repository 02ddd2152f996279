"""Rollout routing replay for MoE models, through megatron-core's own RouterReplay (moe_enable_routing_replay).

The engine reports, for every token it ran on, the experts each MoE layer chose (SGLang's routed_experts:
all tokens but the last, [tokens - 1, moe layers, top-k]). With --use-rollout-routing-replay the trainer's
routers take those choices in its log-prob and training forwards (REPLAY_FORWARD: the weights are the router's
own probabilities of the replayed experts), so training and rollout route alike. Without replay, the training
forwards record their own choices and count the tokens whose expert set differs from the engine's in any layer.

Megatron's routers see the hidden states as [seq, batch, hidden] flattened, so a layer's target is laid out
sequence-major; positions the engine did not report (padding, each sample's last token) get experts 0..k-1,
which affect nothing that is trained (causal attention; those positions carry no loss).
"""

from __future__ import annotations

import torch


class RoutingReplay:
    def __init__(self, top_k: int, replay: bool):
        self.top_k = top_k
        self.replay = replay
        self.mismatched_tokens = 0
        self.compared_tokens = 0

    def targets(
        self, routed: list[torch.Tensor | None], rows: int, seq: int, layers: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[layers, seq * rows, k] expert ids for one micro-batch, and [seq * rows]: which the engine reported."""
        out = torch.arange(self.top_k, dtype=torch.long).expand(rows, seq, layers, self.top_k).clone()
        known = torch.zeros(rows, seq, dtype=torch.bool)
        for row, flat in enumerate(routed):
            if flat is None:
                continue
            ids = flat.view(-1, layers, self.top_k).long()
            if ids.shape[0] > seq:
                raise ValueError(f"routed experts cover {ids.shape[0]} tokens but the sample has {seq} or fewer")
            out[row, : ids.shape[0]] = ids
            known[row, : ids.shape[0]] = True
        return out.permute(2, 1, 0, 3).reshape(layers, seq * rows, self.top_k), known.t().reshape(-1)

    def forward(self, model: torch.nn.Module, micro, run):
        """run() under replay (or recording) of the micro-batch's routed experts."""
        from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

        layers = len(RouterReplay.global_router_replay_instances)
        rows, seq = micro.input_ids.shape
        target, known = self.targets(micro.routed_experts, rows, seq, layers)
        action = RouterReplayAction.REPLAY_FORWARD if self.replay else RouterReplayAction.RECORD
        if self.replay:
            RouterReplay.set_replay_data(list(target))
        RouterReplay.set_global_router_replay_action(action)
        try:
            output = run()
            if not self.replay and model.training:
                self._count(RouterReplay.get_recorded_data(), target, known)
        finally:
            RouterReplay.clear_global_router_replay_action()
            RouterReplay.clear_global_indices()
        return output

    def _count(self, recorded: list[torch.Tensor], target: torch.Tensor, known: torch.Tensor) -> None:
        ours = torch.stack([r.detach().cpu().long() for r in recorded]).sort(-1).values
        differs = (ours != target.sort(-1).values).any(-1).any(0)  # [seq * rows]
        self.mismatched_tokens += int((differs & known).sum())
        self.compared_tokens += int(known.sum())

    def step_metrics(self, dp_group) -> dict[str, float]:
        """Counts since the last call, summed over data-parallel ranks (empty under replay)."""
        if self.replay:
            return {}
        counts = torch.tensor([self.mismatched_tokens, self.compared_tokens], dtype=torch.float64)
        torch.distributed.all_reduce(counts, group=dp_group)
        self.mismatched_tokens = self.compared_tokens = 0
        if counts[1] == 0:
            return {}
        return {
            "moe/routing_mismatch_tokens": float(counts[0]),
            "moe/routing_mismatch_frac": float(counts[0] / counts[1]),
        }
