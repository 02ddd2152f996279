"""Rollout routing replay for MoE models, through megatron-core's own RouterReplay (moe_enable_routing_replay).

The engine reports, for every token it ran on, the experts each layer chose: SGLang's routed_experts, int32
[tokens - 1, num_hidden_layers, top_k] (every layer, zeros in the dense ones; the embedded engine writes the
same). `decode_routes` keeps the MoE layers, by the model's own rule (slime.models.moe.sparse_layer_flags), in
the order megatron built their routers. With --use-rollout-routing-replay the trainer's routers take those
choices in its log-prob and training forwards (REPLAY_FORWARD: the weights are the router's own probabilities
of the replayed experts), so training and rollout route alike. Without replay, the training forwards record
their own choices and count the tokens whose expert set differs from the engine's in any layer.

Megatron's routers see the hidden states as [seq, batch, hidden] flattened, so a layer's target is laid out
sequence-major; positions nothing trains on (padding, each sample's last token) get experts 0..k-1 (causal
attention: they affect no trained position).

Megatron replays every token or none, so a micro-batch in which a sample lacks routes for some of its tokens
(the engine was not asked, or answered fewer rows) routes by the trainer's own router, and those tokens count
in routing_replay/missing_tokens. A step with replay on and no routes at all is an error, not a silent
fallback.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slime.errors import FlagError


class MissingRoutes(FlagError):
    """--use-rollout-routing-replay, but the engines returned no routed experts for a whole step."""


def decode_routes(flat: torch.Tensor, sparse_layers: list[bool], top_k: int) -> torch.Tensor:
    """SGLang's flat [tokens - 1, num_hidden_layers, top_k] ids -> [tokens - 1, MoE layers, top_k] (long)."""
    per_token = len(sparse_layers) * top_k
    if flat.numel() % per_token:
        raise ValueError(
            f"routed experts: {flat.numel()} ids are not a whole number of tokens x num_hidden_layers "
            f"({len(sparse_layers)}) x top_k ({top_k}), SGLang's [tokens - 1, num_hidden_layers, top_k]"
        )
    return flat.view(-1, len(sparse_layers), top_k)[:, torch.tensor(sparse_layers)].long()


@dataclass
class Targets:
    experts: torch.Tensor  # [MoE layers, seq * rows, k], sequence-major as megatron's routers see tokens
    known: torch.Tensor  # [seq * rows]: positions the engine reported
    needed: int  # positions that feed a trained token: each sample's tokens but its last
    missing: int  # of those, positions the engine did not report


def _routed(run, replay_data: list[torch.Tensor] | None = None) -> tuple[object, list[torch.Tensor]]:
    """run() with every router replaying `replay_data` (one [tokens, k] per MoE layer), or recording its own
    choice when None; the output and what the routers recorded."""
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

    action = RouterReplayAction.RECORD
    if replay_data is not None:
        RouterReplay.set_replay_data(replay_data)
        action = RouterReplayAction.REPLAY_FORWARD
    RouterReplay.set_global_router_replay_action(action)
    try:
        output = run()
        return output, RouterReplay.get_recorded_data()
    finally:
        RouterReplay.clear_global_router_replay_action()
        RouterReplay.clear_global_indices()


class RoutingReplay:
    def __init__(self, top_k: int, replay: bool, sparse_layers: list[bool]):
        from megatron.core.transformer.moe.router_replay import RouterReplay

        if len(RouterReplay.global_router_replay_instances) != sum(sparse_layers):
            raise RuntimeError(
                f"routing replay: {len(RouterReplay.global_router_replay_instances)} routers for "
                f"{sum(sparse_layers)} MoE layers"
            )
        self.top_k = top_k
        self.replay = replay
        self.sparse_layers = sparse_layers
        self.mismatched_tokens = self.compared_tokens = 0
        self.missing_tokens = self.reported_tokens = self.replayed_tokens = 0

    def targets(self, routed: list[torch.Tensor | None] | None, lengths: list[int], seq: int) -> Targets:
        """The engine's experts for one micro-batch of rows with `lengths` real tokens, padded to `seq`."""
        layers = sum(self.sparse_layers)
        out = torch.arange(self.top_k, dtype=torch.long).expand(len(lengths), seq, layers, self.top_k).clone()
        known = torch.zeros(len(lengths), seq, dtype=torch.bool)
        needed = sum(n - 1 for n in lengths)
        for row, flat in enumerate(routed or [None] * len(lengths)):
            if flat is None:
                continue
            ids = decode_routes(flat, self.sparse_layers, self.top_k)
            if ids.shape[0] > lengths[row]:
                raise ValueError(f"routed experts cover {ids.shape[0]} tokens but the sample has {lengths[row]}")
            out[row, : ids.shape[0]] = ids
            known[row, : ids.shape[0]] = True
        reported = sum(min(int(known[row].sum()), n - 1) for row, n in enumerate(lengths))
        experts = out.permute(2, 1, 0, 3).reshape(layers, seq * len(lengths), self.top_k)
        return Targets(experts, known.t().reshape(-1), needed, needed - reported)

    def forward(self, model: torch.nn.Module, micro, run):
        """run() under replay (or recording) of the micro-batch's routed experts."""
        if not self.replay and micro.routed_experts is None:
            return run()  # nothing to compare the trainer's routing with
        lengths = [start + n for start, n in zip(micro.response_starts, micro.response_lengths)]
        target = self.targets(micro.routed_experts, lengths, micro.input_ids.shape[1])
        if not self.replay:
            output, recorded = _routed(run)
            if model.training:
                self._count(recorded, target)
            return output
        if model.training:
            self.missing_tokens += target.missing
            self.reported_tokens += target.needed - target.missing
            self.replayed_tokens += 0 if target.missing else target.needed
        if target.missing:
            return run()
        return _routed(run, list(target.experts))[0]

    def _count(self, recorded: list[torch.Tensor], target: Targets) -> None:
        ours = torch.stack([r.detach().cpu().long() for r in recorded]).sort(-1).values
        differs = (ours != target.experts.sort(-1).values).any(-1).any(0)  # [seq * rows]
        self.mismatched_tokens += int((differs & target.known).sum())
        self.compared_tokens += int(target.known.sum())

    def step_metrics(self, dp_group) -> dict[str, float]:
        """Counts since the last call, summed over data-parallel ranks: under replay the tokens replayed and
        those without the engine's routes; without it, the tokens routed unlike the engine."""
        names = ("mismatched_tokens", "compared_tokens", "missing_tokens", "reported_tokens", "replayed_tokens")
        counts = torch.tensor([getattr(self, n) for n in names], dtype=torch.float64)
        torch.distributed.all_reduce(counts, group=dp_group)
        for name in names:
            setattr(self, name, 0)
        mismatched, compared, missing, reported, replayed = counts.tolist()
        if self.replay:
            if reported == 0 and missing > 0:
                raise MissingRoutes(
                    f"--use-rollout-routing-replay: the engines returned no routed experts for any of this step's "
                    f"{missing:.0f} tokens (an SGLang server returns them only with --enable-return-routed-experts)"
                )
            return {"routing_replay/missing_tokens": missing, "routing_replay/replayed_tokens": replayed}
        if compared == 0:
            return {}
        return {"moe/routing_mismatch_tokens": mismatched, "moe/routing_mismatch_frac": mismatched / compared}
