"""Batched next-token sampling: temperature, top-k, top-p, min-p, greedy rows, per-row noise.

Pure functions over tensors. The returned log-prob of a token is taken from log_softmax(logits / T) over
the full vocabulary (T = 1 for greedy rows): after temperature, before truncation (see base.py).

Sampling inverts the cumulative distribution with one uniform draw per row: the first token whose
cumulative probability exceeds u * total. The uniforms are an input, so a request with a seed draws its
own from its own generator and its samples do not depend on the other rows in the batch (one draw per
row also costs far less than a noise tensor the size of the vocabulary).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BatchSampling:
    """Per-row sampling parameters as tensors [n]. top_k <= 0 means off."""

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    greedy: torch.Tensor  # bool
    all_greedy: bool
    any_greedy: bool
    unit_temperature: bool  # every row reports log-probs at temperature 1 (T = 1 or greedy): skip the division
    any_filter: bool  # some row uses top-k, top-p or min-p


def logprob_temperature(temperature: torch.Tensor) -> torch.Tensor:
    """The temperature the log-probs are reported under: T, or 1 where T == 0 (greedy)."""
    return torch.where(temperature > 0, temperature, torch.ones_like(temperature))


def filtered_log_probs(log_probs: torch.Tensor, params: BatchSampling) -> torch.Tensor:
    """Set truncated tokens to -inf: top-k, then top-p on the untruncated cumulative mass, then min-p.

    As SGLang's reference sampler: sort once, mask in sorted order, scatter back. The token with the
    highest probability always survives.
    """
    sorted_lp, order = log_probs.sort(dim=-1, descending=True)
    sorted_p = sorted_lp.exp()
    vocab = log_probs.shape[-1]
    rank = torch.arange(vocab, device=log_probs.device).view(1, vocab)
    k = torch.where(params.top_k > 0, params.top_k, torch.full_like(params.top_k, vocab)).view(-1, 1)
    drop = rank >= k
    mass_before = sorted_p.cumsum(dim=-1) - sorted_p
    drop |= mass_before > params.top_p.view(-1, 1)
    drop |= sorted_p < (sorted_p[:, :1] * params.min_p.view(-1, 1))
    drop[:, 0] = False
    sorted_lp = sorted_lp.masked_fill(drop, float("-inf"))
    return torch.empty_like(log_probs).scatter_(1, order, sorted_lp)


def sample_tokens(
    logits: torch.Tensor, params: BatchSampling, uniform: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [n, V] (fp32) -> (token ids [n], their log-probs [n]).

    uniform: U[0, 1) draws [n]; unused (may be None) when every row is greedy.
    """
    scaled = logits if params.unit_temperature else logits / logprob_temperature(params.temperature).view(-1, 1)
    log_probs = torch.log_softmax(scaled, dim=-1)
    if params.all_greedy:
        tokens = logits.argmax(dim=-1)
    else:
        if uniform is None:
            raise ValueError("sample_tokens: uniform draws are required when some row samples")
        candidates = filtered_log_probs(log_probs, params) if params.any_filter else log_probs
        tokens = inverse_cdf_sample(candidates.exp(), uniform)
        if params.any_greedy:
            tokens = torch.where(params.greedy, logits.argmax(dim=-1), tokens)
    return tokens, log_probs.gather(1, tokens.view(-1, 1)).view(-1)


def inverse_cdf_sample(weights: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Row-wise categorical draw from unnormalized weights [n, V] >= 0 with uniforms [n] in [0, 1).

    right=True finds the first index whose cumulative weight is strictly above the target, so a zero-weight
    token (equal cumulative sum to its predecessor) can never be drawn.
    """
    cdf = weights.cumsum(dim=-1)
    # u just below 1 keeps the target strictly under the total, so a token with weight is always found.
    target = (uniform.clamp(max=1.0 - 1e-7) * cdf[:, -1]).unsqueeze(1)
    picked = torch.searchsorted(cdf, target, right=True).squeeze(1)
    return picked.clamp_(max=weights.shape[-1] - 1)
