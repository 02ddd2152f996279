"""Core attention through torch's scaled_dot_product_attention, for megatron's local layer spec.

megatron's local DotProductAttention materialises the [b, heads, s, s] scores with baddbmm + softmax;
SDPA picks a fused kernel for the device (flash / memory-efficient / CPU flash), which is what HF
transformers uses too. Same inputs, outputs and module interface, so it drops into the layer spec.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

# Rows up to this many tokens attend in float32 on a CPU host when the model computes in 16 bits. torch's CPU
# flash kernel in bfloat16 rounds the probabilities to 16 bits before P @ V, and its backward is slow at short
# rows: forward + backward of [64 rows, 4 heads, 22 tokens, 64] took 26.8 ms in bfloat16 against 7.2 ms with the
# inputs cast to float32 (1 thread, casts included), and the float32 path's gradients are closer to a float64
# reference (max error 1.4e-2 against 2.8e-2). At 256 tokens the two take the same time; beyond, bfloat16 wins
# (at 2,048 tokens 147 ms against 361 ms, where the CPU has AMX).
FLOAT32_ATTENTION_MAX_TOKENS = 256


def _float32_attention_for(query: torch.Tensor) -> torch.dtype | None:
    """For megatron's [s, b, heads, d] query: the 16-bit dtype the model computes attention in (autocast's when
    on, else the query's) when this row should attend in float32 instead, else None."""
    device = query.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype
    short_row = query.shape[0] <= FLOAT32_ATTENTION_MAX_TOKENS
    return dtype if device == "cpu" and dtype in (torch.bfloat16, torch.float16) and short_row else None


class SdpaCoreAttention(DotProductAttention):
    def forward(
        self,
        query,
        key,
        value,
        attention_mask,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SdpaCoreAttention: packed sequences / attention bias are not supported")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = attention_mask is None and mask_type == AttnMaskType.causal
        # [s, b, heads, d] -> [b, heads, s, d], made contiguous: the CPU kernel walks each (batch, head) block,
        # which megatron's sequence-major layout scatters (measured ~15% slower on its forward and backward)
        sixteen_bit = _float32_attention_for(query)
        dtype = torch.float32 if sixteen_bit else query.dtype
        q, k, v = (t.permute(1, 2, 0, 3).to(dtype, memory_format=torch.contiguous_format) for t in (query, key, value))
        groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        mask = None if attention_mask is None else ~attention_mask  # megatron: True = masked out
        # autocast would cast the float32 inputs back to 16 bits: SDPA is on its lower-precision list
        with torch.autocast(q.device.type, enabled=False) if sixteen_bit else contextlib.nullcontext():
            context = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.attention_dropout.p if self.training else 0.0,
                is_causal=causal, scale=self.softmax_scale, enable_gqa=groups > 1,
            )  # fmt: skip
        context = context.to(sixteen_bit) if sixteen_bit else context
        # [b, heads, s, d] -> [s, b, heads * d]
        return context.permute(2, 0, 1, 3).reshape(context.shape[2], context.shape[0], self.hidden_size_per_partition)
