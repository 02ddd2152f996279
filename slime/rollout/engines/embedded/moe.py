"""The sparse MLP of Qwen3-MoE for the embedded engine: token-choice top-k routing, no capacity limit (no
token is ever dropped), the same arithmetic as transformers' Qwen3MoeSparseMoeBlock.

Expert weights live in two stacked buffers ([experts, 2 * ffn, hidden] for gate+up, [experts, hidden, ffn] for
down); each HF per-expert tensor is a view into them, so an HF-named weight update is an in-place copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class SparseMlp:
    def __init__(self, experts: int, top_k: int, ffn: int, hidden: int, norm_topk_prob: bool, device, dtype):
        self.top_k = top_k
        self.ffn = ffn
        self.norm_topk_prob = norm_topk_prob
        self.router = torch.empty(experts, hidden, device=device, dtype=dtype)
        self.gate_up = torch.empty(experts, 2 * ffn, hidden, device=device, dtype=dtype)
        self.down = torch.empty(experts, hidden, ffn, device=device, dtype=dtype)

    def hf_views(self, prefix: str) -> dict[str, torch.Tensor]:
        views = {f"{prefix}.mlp.gate.weight": self.router}
        for e in range(self.router.shape[0]):
            views[f"{prefix}.mlp.experts.{e}.gate_proj.weight"] = self.gate_up[e, : self.ffn]
            views[f"{prefix}.mlp.experts.{e}.up_proj.weight"] = self.gate_up[e, self.ffn :]
            views[f"{prefix}.mlp.experts.{e}.down_proj.weight"] = self.down[e]
        return views

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, H] -> (weights [N, k] in x's dtype, expert ids [N, k]), as HF: softmax in fp32 over all experts,
        top-k, renormalised when norm_topk_prob."""
        probs = F.softmax(F.linear(x, self.router), dim=-1, dtype=torch.float)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), experts

    def __call__(self, x: torch.Tensor, routed: list | None = None) -> torch.Tensor:
        """x [..., H] -> [..., H]. When `routed` is a list, the chosen expert ids [N, k] are appended to it."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, experts = self.route(flat)
        if routed is not None:
            routed.append(experts)
        out = torch.zeros_like(flat)
        for expert in torch.unique(experts).tolist():
            token, slot = torch.where(experts == expert)
            gate, up = F.linear(flat[token], self.gate_up[expert]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.down[expert]) * weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out.view(shape)
