"""Core attention through torch's scaled_dot_product_attention, for megatron's local layer spec.

megatron's local DotProductAttention materialises the [b, heads, s, s] scores with baddbmm + softmax;
SDPA picks a fused kernel for the device (flash / memory-efficient / CPU flash), which is what HF
transformers uses too. Same inputs, outputs and module interface, so it drops into the layer spec.
"""

from __future__ import annotations

import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


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
        q, k, v = (t.permute(1, 2, 0, 3).contiguous() for t in (query, key, value))
        groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        mask = None if attention_mask is None else ~attention_mask  # megatron: True = masked out
        context = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.attention_dropout.p if self.training else 0.0,
            is_causal=causal, scale=self.softmax_scale, enable_gqa=groups > 1,
        )  # fmt: skip
        # [b, heads, s, d] -> [s, b, heads * d]
        return context.permute(2, 0, 1, 3).reshape(context.shape[2], context.shape[0], self.hidden_size_per_partition)
