"""MoE training metrics for metrics.jsonl: megatron's auxiliary losses (load balancing, router z-loss; turned on
by its own flags --moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff, --moe-z-loss-coeff) and the
expert load imbalance of every MoE layer (max tokens per expert / mean; 1.0 is perfectly balanced).

Megatron's aux losses add their gradient through MoEAuxLossAutoScaler, once per micro-batch and rank; slime sums
gradients over micro-batches and data-parallel ranks, so the scale is 1 / (micro-batches x DP ranks): the
gradient of the mean aux loss. Counts come from a forward hook on each router, during training steps only.
"""

from __future__ import annotations

import torch


class MoeStats:
    def __init__(self, model: torch.nn.Module):
        from megatron.core.transformer.moe.router import TopKRouter

        self.routers = [m for m in model.modules() if isinstance(m, TopKRouter)]
        self.counting = False
        self.tokens_per_expert = [None] * len(self.routers)
        for index, router in enumerate(self.routers):
            router.register_forward_hook(self._hook(index))

    def _hook(self, index: int):
        def count(module, inputs, output) -> None:
            if self.counting:
                routing_map = output[1].detach()
                loads = routing_map.reshape(-1, routing_map.shape[-1]).sum(0).double().cpu()
                previous = self.tokens_per_expert[index]
                self.tokens_per_expert[index] = loads if previous is None else previous + loads

        return count

    def begin_step(self, micro_batches: int, dp_size: int) -> None:
        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, clear_aux_losses_tracker

        MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / max(1, micro_batches * dp_size)))
        clear_aux_losses_tracker()
        self.tokens_per_expert = [None] * len(self.routers)
        self.counting = True

    def end_step(self, micro_batches: int, dp_group) -> dict[str, float]:
        """Metrics over the whole step and every data-parallel rank (a collective over dp_group)."""
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        self.counting = False
        dp_size = torch.distributed.get_world_size(dp_group)
        tracker = get_moe_layer_wise_logging_tracker()
        names = sorted(tracker)
        experts = self.routers[0].config.num_moe_experts if self.routers else 0
        empty = torch.zeros(experts, dtype=torch.float64)
        loads = torch.stack([t if t is not None else empty for t in self.tokens_per_expert]).double()
        losses = [tracker[n]["values"].detach().double().cpu() for n in names]
        flat = torch.cat([loads.flatten()] + losses)
        torch.distributed.all_reduce(flat, group=dp_group)
        loads = flat[: loads.numel()].view_as(loads)
        metrics: dict[str, float] = {}
        layers = [r.layer_number for r in self.routers]
        offset = loads.numel()
        for name, values in zip(names, losses):
            per_layer = flat[offset : offset + values.numel()] / max(1, micro_batches * dp_size)
            offset += values.numel()
            metrics[f"moe/{name}"] = float(per_layer[[n - 1 for n in layers]].mean())
        imbalance = loads.max(dim=1).values / loads.mean(dim=1).clamp_min(1e-9)
        for layer, value in zip(layers, imbalance.tolist()):
            metrics[f"moe/load_imbalance_layer{layer - 1}"] = value
        if layers:
            metrics["moe/load_imbalance"] = float(imbalance.mean())
        return metrics
