"""Make megatron-core 0.16 train on CPU: redirect the handful of calls that hard-code the CUDA device.

This is the one place in slime that patches another library. `apply()` is called only by
`select_backend("cpu").prepare_megatron()`, never at `import slime`, and is idempotent.

Each redirect keeps megatron's behaviour and changes only where tensors live:
  * RotaryEmbedding.get_emb moves `inv_freq` to `torch.cuda.current_device()` on first use.
  * The default causal mask (fused_softmax / transformer.utils) is built with device="cuda".
  * The model-parallel RNG tracker stores and swaps CUDA generator states; on CPU it swaps the CPU
    generator's state instead, so `fork()` (used by attention dropout and weight init) still works.
  * Grad-norm / grad-clip / zero-count helpers allocate on "cuda" and assert `torch.cuda.FloatTensor`.
  * FP32Optimizer.__init__ allocates its unit loss scale with device="cuda".
  * GlobalMemoryBuffer.get_tensor (attention's baddbmm scratch) allocates on the current CUDA device.
  * MoE: the router moves its weight to the current CUDA device on first use; the all-to-all dispatcher
    creates a CUDA side stream for its device-to-host copies of the split sizes and syncs on an event;
    moe_utils names `te_general_gemm` only when Transformer Engine imports; the expert-parallel gathers,
    reduce-scatters and all-to-alls (and TopKRouter's optional buffers) allocate on
    `torch.cuda.current_device()`, which answers "cpu" for the duration of those calls only.

The trainer does its own data-parallel gradient all-reduce instead of megatron's DDP wrapper: the
gradient buffers there are allocated on `torch.cuda.current_device()` at many sites and the
distributed optimizer does not run on CPU at all.

When megatron-core is upgraded, test/registered/training/test_megatron_cpu.py runs forward,
backward and an optimizer step; a new CUDA-only call on that path fails there loudly.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
from torch.overrides import TorchFunctionMode

SUPPORTED_MEGATRON = "0.16"
_applied = False


class _CudaFactoriesOnCpu(TorchFunctionMode):
    """Rewrites an explicit `device="cuda"` on tensor factory calls to the CPU while active."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


@contextlib.contextmanager
def _current_device_is_cpu():
    """While active, `torch.cuda.current_device()` answers "cpu" (megatron passes it as a `device=`)."""
    original = torch.cuda.current_device
    torch.cuda.current_device = lambda: "cpu"
    try:
        yield
    finally:
        torch.cuda.current_device = original


def _with_cpu_current_device(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _current_device_is_cpu():
            return fn(*args, **kwargs)

    return wrapper


def _run_on_cpu(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _CudaFactoriesOnCpu():
            return fn(*args, **kwargs)

    return wrapper


# ---- rotary embedding ---------------------------------------------------------------------------
def _rotary_get_emb(self, max_seq_len: int, offset: int = 0) -> torch.Tensor:
    """megatron's RotaryEmbedding.get_emb without the move of inv_freq to the current CUDA device."""
    freqs = self.get_freqs_non_repeated(max_seq_len, offset)
    if not self.rotary_interleaved:
        emb = torch.cat((freqs, freqs), dim=-1)
    else:
        emb = torch.stack((freqs.view(-1, 1), freqs.view(-1, 1)), dim=-1).view(freqs.shape[0], -1)
    return emb[:, None, None, :]


# ---- causal masks -------------------------------------------------------------------------------
def _default_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def _sliding_window_causal_mask(sq: int, skv: int, window_size) -> torch.Tensor:
    m = torch.ones(sq, skv, dtype=torch.bool)
    upper = torch.triu(m, diagonal=skv - sq - window_size[0])
    return ~torch.tril(upper, diagonal=skv - sq + window_size[1])


# ---- RNG tracker --------------------------------------------------------------------------------
def _cpu_get_rng_state(device="cpu", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device=-1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def _make_cpu_tracker_class(base):
    class CpuRNGStatesTracker(base):
        """Named RNG streams on the CPU generator (megatron keeps them on the CUDA generator)."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            original = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(original)

        @contextlib.contextmanager
        def fork(self, name="model-parallel-rng"):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            original = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(original)

    return CpuRNGStatesTracker


# ---- scratch buffers ----------------------------------------------------------------------------
def _memory_buffer_get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None) -> torch.Tensor:
    required = math.prod(tensor_shape)
    cached = self.buffer.get((name, dtype))
    if cached is None or cached.numel() < required:
        self.buffer[(name, dtype)] = cached = torch.empty(required, dtype=dtype, requires_grad=False)
    return cached[:required].view(*tensor_shape)


# ---- gradient statistics ------------------------------------------------------------------------
def _grad_norm_fp32(grads_for_norm, norm_type=2, grad_stats_parallel_group=None) -> float:
    """Same contract as megatron's get_grad_norm_fp32 (sum of norm**p over the group), on CPU."""
    if isinstance(grads_for_norm, torch.Tensor):
        grads_for_norm = [grads_for_norm]
    norm_type = float(norm_type)
    if norm_type == float("inf"):
        local = max((float(g.abs().max()) for g in grads_for_norm), default=0.0)
        total = torch.tensor([local], dtype=torch.float)
        torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.MAX, group=grad_stats_parallel_group)
        return float(total[0])
    total = torch.zeros(1, dtype=torch.float)
    for grad in grads_for_norm:
        total += torch.linalg.vector_norm(grad.float(), norm_type) ** norm_type
    torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM, group=grad_stats_parallel_group)
    return float(total[0]) ** (1.0 / norm_type)


def _clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False) -> None:
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff >= 1.0:
        return
    for param in parameters:
        grad = param.decoupled_grad if use_decoupled_grad else param.grad
        if grad is not None:
            grad.detach().mul_(clip_coeff)


# ---- mixture of experts -------------------------------------------------------------------------
class _NoStream:
    """Stands in for the all-to-all dispatcher's device-to-host side stream: on CPU the split sizes already
    live on the host, so there is nothing to copy or wait for."""


def _router_gating(self, input: torch.Tensor) -> torch.Tensor:
    """megatron's Router.gating without the move of the weight to the current CUDA device."""
    from megatron.core.transformer.moe.moe_utils import router_gating_linear

    router_dtype = {"fp32": torch.float32, "fp64": torch.float64}.get(self.config.moe_router_dtype, input.dtype)
    return router_gating_linear(input, self.weight, self.bias, router_dtype)


def _alltoall_host_splits(self, point: str, tokens_per_expert: torch.Tensor | None = None):
    """megatron's _maybe_dtoh_and_synchronize on CPU: the split sizes become host lists at the same point."""
    if not self.drop_and_pad and point == self.cuda_dtoh_point:
        for name in ("input_splits", "output_splits", "output_splits_tp"):
            value = getattr(self, name)
            if torch.is_tensor(value):
                setattr(self, name, value.numpy())
    return tokens_per_expert


def _apply_moe() -> None:
    from megatron.core.tensor_parallel import mappings
    from megatron.core.transformer.moe import moe_utils, router, token_dispatcher

    # expert-parallel gathers / all-to-alls allocate their outputs on torch.cuda.current_device()
    for name in ("_gather_along_last_dim", "_gather_along_first_dim", "_reduce_scatter_along_first_dim"):
        setattr(mappings, name, _with_cpu_current_device(getattr(mappings, name)))
    mappings._AllToAll.forward = staticmethod(_with_cpu_current_device(mappings._AllToAll.forward))
    router.TopKRouter.__init__ = _with_cpu_current_device(router.TopKRouter.__init__)

    if not moe_utils.HAVE_TE:
        moe_utils.te_general_gemm = None
    router.Router.gating = _router_gating
    dispatcher = token_dispatcher.MoEAlltoAllTokenDispatcher
    dispatcher.cuda_dtoh_stream = _NoStream()
    dispatcher._maybe_dtoh_and_synchronize = _alltoall_host_splits


def apply() -> None:
    """Install the CPU redirects into megatron-core. Safe to call more than once."""
    global _applied
    if _applied:
        return
    import megatron.core
    from megatron.core import utils as megatron_utils
    from megatron.core.fusions import fused_softmax
    from megatron.core.models.common.embeddings import rotary_pos_embedding
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as megatron_optimizer
    from megatron.core.tensor_parallel import random as megatron_random
    from megatron.core.transformer import utils as transformer_utils

    if not megatron.core.__version__.startswith(SUPPORTED_MEGATRON):
        raise RuntimeError(
            f"slime's CPU compatibility layer is written for megatron-core {SUPPORTED_MEGATRON}.x, found "
            f"{megatron.core.__version__}: pip install 'megatron-core=={SUPPORTED_MEGATRON}.1'"
        )

    rotary_pos_embedding.RotaryEmbedding.get_emb = _rotary_get_emb

    megatron_utils.GlobalMemoryBuffer.get_tensor = _memory_buffer_get_tensor

    for module in (transformer_utils, fused_softmax):
        module.get_default_causal_mask = _default_causal_mask
        module.get_sliding_window_causal_mask = _sliding_window_causal_mask

    megatron_random._get_cuda_rng_state = _cpu_get_rng_state
    megatron_random._set_cuda_rng_state = _cpu_set_rng_state
    megatron_random.CudaRNGStatesTracker = _make_cpu_tracker_class(megatron_random.CudaRNGStatesTracker)
    megatron_random.initialize_rng_tracker(force_reset=True)

    for module in (clip_grads, megatron_optimizer):
        module.get_grad_norm_fp32 = _grad_norm_fp32
        module.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32
    clip_grads.count_zeros_fp32 = _run_on_cpu(clip_grads.count_zeros_fp32)
    megatron_optimizer.count_zeros_fp32 = clip_grads.count_zeros_fp32
    megatron_optimizer.FP32Optimizer.__init__ = _run_on_cpu(megatron_optimizer.FP32Optimizer.__init__)
    _apply_moe()
    _applied = True


def is_applied() -> bool:
    return _applied
