"""What the policy and the critic trainers share: one megatron GPTModel per rank built from an HF folder,
megatron's FP32 optimizer + LR scheduler, data-parallel gradient all-reduce, weight snapshots,
checkpoints and HF export.

Data parallelism: losses are normalised by *global* counts (tokens or samples over all DP ranks and
micro-batches), so gradients are summed (not averaged) across DP ranks and micro-batches, and the
result does not depend on how the batch was split.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from slime.backends import Backend
from slime.models import bridge_class_for, load_hf_config
from slime.training import checkpoint
from slime.training.batch import MicroBatch, TrainBatch
from slime.training.buckets import bucketed
from slime.training.config import TrainerConfig
from slime.training.distributed import current_layout


def _is_per_head_norm(param_name: str) -> bool:
    return param_name.endswith(("self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight"))


class MegatronTrainer:
    """Base: subclasses define the head (LM logits or value) and the step."""

    def __init__(self, config: TrainerConfig, backend: Backend):
        from megatron.core import parallel_state

        self.config = config
        self.backend = backend
        self.layout = current_layout()
        if self.layout.tp_size != config.tensor_parallel_size:
            raise ValueError(
                f"tensor_parallel_size={config.tensor_parallel_size} but the process group was set up with "
                f"{self.layout.tp_size}; pass the same value to init_distributed"
            )
        self.device = torch.device(backend.torch_device())  # the local device this rank was bound to
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.dp_group = parallel_state.get_data_parallel_group()
        self.hf_config = load_hf_config(config.hf_checkpoint)
        self.bridge = bridge_class_for(self.hf_config)(
            self.hf_config,
            self.layout.tp_size,
            self.layout.tp_rank,
            make_vocab_size_divisible_by=config.make_vocab_size_divisible_by,
            expert_parallel_size=self.layout.ep_size,
            expert_parallel_rank=self.layout.ep_rank,
        )
        self.model = self.bridge.build_model(**self._model_overrides())
        self.bridge.load_hf(self.model, config.hf_checkpoint)
        self._attach_head()
        self.adapters = self._attach_lora()  # {} without LoRA
        self.model.to(self.device)
        self.between_layers: Callable[[], None] | None = None  # set per call (slime.cores.CoreLease)
        self._call_between_layers()
        self._moe_stats = self._routing = None
        if self.bridge.has_experts:
            from slime.training.moe_metrics import MoeStats
            from slime.training.routing_replay import RoutingReplay

            self._moe_stats = MoeStats(self.model)
            self._routing = RoutingReplay(
                self.model.config.moe_router_topk, config.use_rollout_routing_replay, self.bridge.sparse_layers()
            )
        self._moe_micro_batches = 0
        self.optimizer, self.scheduler = self._build_optimizer()
        self.step = 0
        self._snapshots: dict[str, dict[str, torch.Tensor]] = {}

    # ---- construction -------------------------------------------------------------------------
    def _attach_head(self) -> None:
        """Hook for the critic, which replaces the LM head with a value head."""

    def _attach_lora(self) -> dict:
        """--lora-rank: base weights frozen, adapters on the targeted linears (slime.training.lora)."""
        if self.config.lora is None:
            return {}
        from slime.training import lora

        return lora.attach(self.model, self.bridge, self.config.lora, self.tp_group)

    def _trained_params(self) -> dict[str, torch.Tensor]:
        """What a checkpoint or a snapshot holds: every parameter, or with LoRA the adapters alone (the frozen
        base is the HF checkpoint, read again at start)."""
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad or not self.adapters}

    def _call_between_layers(self) -> None:
        """`between_layers`, while set, runs before each transformer layer's forward and its backward, on the
        working thread (a CPU backward runs on the thread that calls it)."""

        def poll(*_) -> None:
            if self.between_layers is not None:
                self.between_layers()

        def after(_module, _args, output) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            if self.between_layers is not None and hidden.requires_grad:
                hidden.register_hook(poll)

        for layer in self.model.decoder.layers:
            layer.register_forward_pre_hook(poll)
            layer.register_forward_hook(after)

    def _model_overrides(self) -> dict:
        """Pass-through TransformerConfig fields; for MoE models the backend's token dispatcher first (a flag wins)."""
        if not self.bridge.has_experts:
            return self._overrides("transformer")
        if self.layout.tp_size > 1:
            raise ValueError(
                f"{self.config.hf_checkpoint}: MoE models train at --tensor-model-parallel-size 1 (megatron needs "
                "sequence parallelism for MoE x TP, which slime's local layers lack); use --expert-model-parallel-size"
            )
        from megatron.core.transformer.moe.router_replay import RouterReplay

        RouterReplay.clear_global_router_replay_instances()  # megatron keeps them process-wide, one per router
        dispatch = self.backend.moe_dispatch_config(expert_comm_ranks=self.layout.tp_size * self.layout.ep_size)
        return {**dispatch, "moe_enable_routing_replay": True, **self._overrides("transformer")}

    def _overrides(self, kind: str) -> dict:
        """The pass-through fields of megatron's TransformerConfig ("transformer") or OptimizerConfig ("optimizer");
        a field both have (e.g. barrier_with_L1_time) goes to both; --bf16 is slime's own flag (`_autocast`)."""
        import dataclasses

        from megatron.core.optimizer import OptimizerConfig
        from megatron.core.transformer import TransformerConfig

        owner = OptimizerConfig if kind == "optimizer" else TransformerConfig
        names = {f.name for f in dataclasses.fields(owner)}
        return {k: v for k, v in self.config.megatron_overrides if k in names}

    def _build_optimizer(self):
        from megatron.core.optimizer import OptimizerConfig
        from megatron.core.optimizer.optimizer import FP32Optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        cfg = self.config
        settings = dict(
            optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay, adam_beta1=cfg.adam_beta1,
            adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps, clip_grad=cfg.clip_grad, use_distributed_optimizer=False,
        )  # fmt: skip
        settings.update(self._overrides("optimizer"))  # pass-through flags win, and reach the torch optimizer too
        opt_config = OptimizerConfig(**settings)
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                (no_decay if param.ndim == 1 or name.endswith(".bias") else decay).append(param)
        groups = [
            # the flags are megatron's param-group identity (matched on optimizer state load)
            {
                "params": decay,
                "weight_decay": opt_config.weight_decay,
                "wd_mult": 1.0,
                "lr_mult": 1.0,
                "is_expert_parallel": False,
                "is_decoupled_lr": False,
            },
            {
                "params": no_decay,
                "weight_decay": 0.0,
                "wd_mult": 0.0,
                "lr_mult": 1.0,
                "is_expert_parallel": False,
                "is_decoupled_lr": False,
            },
        ]
        groups = [g for g in groups if g["params"]]
        adam = torch.optim.AdamW(
            groups,
            lr=opt_config.lr,
            betas=(opt_config.adam_beta1, opt_config.adam_beta2),
            eps=opt_config.adam_eps,
            weight_decay=opt_config.weight_decay,
            # one kernel per parameter instead of ~10 passes over it: on the 4.7M-parameter benchmark model's 50
            # parameters, 5.9 ms a step against 29 ms for torch's default on host tensors (results within 1 ulp)
            fused=True,
        )
        if self.layout.ep_size > 1:
            from slime.training.experts import ExpertParallelFP32Optimizer, expert_param_ids

            optimizer = ExpertParallelFP32Optimizer(
                adam,
                opt_config,
                expert_param_ids(self.model),
                self.layout.dp_rank == 0,
                self.layout.expert_dp_rank == 0,
            )
        else:
            optimizer = FP32Optimizer(adam, opt_config, init_state_fn=None)
        scheduler = OptimizerParamScheduler(
            optimizer,
            init_lr=0.0 if cfg.lr_warmup_steps > 0 else opt_config.lr,
            max_lr=opt_config.lr,
            min_lr=opt_config.min_lr,
            lr_warmup_steps=cfg.lr_warmup_steps,
            lr_decay_steps=cfg.lr_decay_steps,
            lr_decay_style=cfg.lr_decay_style,
            start_wd=opt_config.weight_decay,
            end_wd=opt_config.weight_decay,
            wd_incr_steps=cfg.lr_decay_steps,
            wd_incr_style="constant",
        )
        return optimizer, scheduler

    # ---- forward helpers ----------------------------------------------------------------------
    def _forward(self, micro: MicroBatch) -> torch.Tensor:
        """Model output [rows, seq, out] for this rank (vocab slice for the policy, 1 for the critic); a MoE
        model's forwards replay (or record) the engine's routed experts and count the tokens without them."""

        def run():
            with self._autocast():
                return self.model(micro.input_ids.to(self.device), micro.position_ids.to(self.device), None)

        if self._routing is None:
            return run()
        return self._routing.forward(self.model, micro, run)

    def _autocast(self):
        """--bf16: matmuls and attention in bfloat16, the float32 weights cast per op; otherwise a no-op. Wraps the
        forward and the backward too: megatron's linear layers run their own backward, which autocast reaches
        only while it is on (their autocast hooks are for one device type)."""
        if self.config.compute_dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=getattr(torch, self.config.compute_dtype))

    @staticmethod
    def _response_positions(micro: MicroBatch, shift: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[rows, longest response] index into the positions of each response token (shift=1: the position that
        predicts it, 0: its own), clamped on padding, and the mask of real (non-padding) entries."""
        longest = micro.response_mask.shape[1]
        offsets = torch.arange(longest)
        starts = torch.tensor(micro.response_starts) - shift
        valid = offsets.unsqueeze(0) < torch.tensor(micro.response_lengths).unsqueeze(1)
        index = (starts.unsqueeze(1) + offsets.unsqueeze(0)).clamp(max=micro.input_ids.shape[1] - 1)
        return index, valid

    def _responses(self, micro: MicroBatch, per_position: torch.Tensor, shift: int) -> torch.Tensor:
        """Each sample's response tokens out of a [rows, positions, ...] tensor, as [rows, longest response, ...]
        zero-padded on the right: one gather, whatever the number of rows."""
        index, valid = self._response_positions(micro, shift)
        index, valid = index.to(per_position.device), valid.to(per_position.device)
        trailing = per_position.shape[2:]
        gathered = per_position.gather(
            1, index.view(*index.shape, *([1] * len(trailing))).expand(*index.shape, *trailing)
        )
        return gathered * valid.view(*valid.shape, *([1] * len(trailing))).to(gathered.dtype)

    def _micro_batch_groups(self, batch: TrainBatch) -> list[list[int]]:
        return batch.micro_batch_indices(self.config.max_tokens_per_micro_batch, self.config.micro_batch_size)

    def _micro_batches(self, batch: TrainBatch) -> Iterator[list[int]]:
        groups = self._micro_batch_groups(batch)
        if self.layout.ep_size == 1:
            return iter(groups)
        from slime.training.experts import equal_micro_batches

        return equal_micro_batches(self.model, groups, self.device)

    def _moe_step_begin(self, batch: TrainBatch) -> None:
        """Before a training step of a MoE model: aux-loss gradient scale, fresh counters (no-op for dense)."""
        if self._moe_stats is None:
            return
        count = torch.tensor([len(self._micro_batch_groups(batch))], dtype=torch.int64)
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX, group=self.dp_group)
        self._moe_micro_batches = int(count[0])
        self._moe_stats.begin_step(self._moe_micro_batches, self.layout.dp_size)

    def _moe_step_metrics(self) -> dict[str, float]:
        if self._moe_stats is None:
            return {}
        metrics = self._moe_stats.end_step(self._moe_micro_batches, self.dp_group)
        return {**metrics, **self._routing.step_metrics(self.dp_group)}

    def global_denominator(self, batch: TrainBatch) -> float:
        """Loss tokens (or samples) in the whole global batch, over all data-parallel ranks."""
        local = float(batch.num_loss_tokens()) if self.config.loss_reduction == "token" else float(len(batch))
        total = torch.tensor([local], dtype=torch.float64)
        torch.distributed.all_reduce(total, group=self.dp_group)
        return max(float(total[0]), 1.0)

    def _reduce_grads(self) -> None:
        """Sum partial grads: q/k layernorm over TP (each rank normalises only its own heads), all over DP."""
        if self.layout.tp_size > 1:
            partial = [p.grad for n, p in self.model.named_parameters() if p.grad is not None and _is_per_head_norm(n)]
            if partial:
                flat = _flatten_dense_tensors(partial)
                torch.distributed.all_reduce(flat, group=self.tp_group)
                for grad, reduced in zip(partial, _unflatten_dense_tensors(flat, partial)):
                    grad.copy_(reduced)
        if self.layout.ep_size > 1:
            from slime.training.experts import reduce_expert_parallel_grads

            reduce_expert_parallel_grads(self.model, self.dp_group)
            return
        if self.layout.dp_size == 1:
            return
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        flat = _flatten_dense_tensors(grads)
        torch.distributed.all_reduce(flat, group=self.dp_group)
        for grad, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            grad.copy_(reduced)

    def _optimizer_step(self, lr: float | None = None) -> tuple[float, float]:
        """All-reduce grads over DP, clip, step, advance the LR schedule. Returns (grad_norm, lr used).

        An explicit `lr` (the SFT warm-up) is used for this step only and leaves the schedule where it is."""
        self._reduce_grads()
        fixed_lr = lr is not None
        if fixed_lr:
            for group in self.optimizer.param_groups:
                group["lr"] = lr * group.get("lr_mult", 1.0)
        used_lr = self.optimizer.param_groups[0]["lr"]
        success, grad_norm, _ = self.optimizer.step()
        if not success:
            raise RuntimeError(f"optimizer step {self.step} failed (non-finite gradients)")
        self.optimizer.zero_grad()
        if not fixed_lr:
            self.scheduler.step(increment=1)
        self.step += 1
        return float(grad_norm or 0.0), float(used_lr)

    def reset_optimizer(self) -> None:
        """Fresh optimizer state and LR schedule, step counter back to 0 (after the SFT warm-up: RL starts
        from the warmed-up weights with its own schedule and no SFT moments)."""
        self.optimizer, self.scheduler = self._build_optimizer()
        self.step = 0

    # ---- colocation ---------------------------------------------------------------------------
    def offload(self) -> None:
        """Move weights, gradients and optimizer state to host memory (colocate: the rollout engine runs next).
        A no-op when the trainer already lives in host memory."""
        self._move_state(torch.device("cpu"))
        self.backend.empty_cache()

    def onload(self) -> None:
        self._move_state(self.device)

    def _move_state(self, device: torch.device) -> None:
        if self.device.type == "cpu":
            return
        for param in self.model.parameters():
            param.data = param.data.to(device, non_blocking=True)
            if param.grad is not None:
                param.grad = param.grad.to(device, non_blocking=True)
        for state in self.optimizer.optimizer.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    state[key] = value.to(device, non_blocking=True)
        self.backend.synchronize()

    def _reduce_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Sum per-rank contributions over DP (each is already normalised by the global count)."""
        names = sorted(metrics)
        values = torch.tensor([metrics[n] for n in names], dtype=torch.float64)
        torch.distributed.all_reduce(values, group=self.dp_group)
        return dict(zip(names, values.tolist()))

    # ---- weight snapshots ---------------------------------------------------------------------
    def snapshot(self, name: str) -> None:
        """Keep a host copy of the current weights under `name` (e.g. "ref", "old")."""
        if name == "actor":
            raise ValueError('"actor" names the live weights; choose another snapshot name')
        self._snapshots[name] = {n: p.detach().to("cpu", copy=True) for n, p in self._trained_params().items()}

    def has_snapshot(self, name: str) -> bool:
        return name in self._snapshots

    @contextlib.contextmanager
    def use_weights(self, name: str = "actor"):
        """Temporarily swap a snapshot's tensors into the model (pointer swap: no second model resident)."""
        if name == "actor":
            yield
            return
        if name not in self._snapshots:
            raise KeyError(
                f"no weight snapshot {name!r}; call snapshot({name!r}) first (have: {', '.join(self._snapshots) or 'none'})"
            )
        live = {}
        params = dict(self.model.named_parameters())
        for n, saved in self._snapshots[name].items():
            live[n] = params[n].data
            params[n].data = saved.to(params[n].device)
        try:
            yield
        finally:
            for n, data in live.items():
                params[n].data = data

    # ---- checkpoints --------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike, step: int | None = None, extra: dict | None = None) -> Path:
        """Atomically write a checkpoint under `directory`, in the folder of `step` (default: the optimizer
        step); returns its folder. `extra` (JSON: the loop's own state) is written beside it by rank 0, inside
        the same atomic rename, so a checkpoint and the loop state that goes with it never disagree."""
        root = Path(directory)
        step = self.step if step is None else step
        is_rank0 = self.layout.rank == 0
        tmp = checkpoint.begin_save(root, step, is_rank0, torch.distributed.barrier)
        # one writer per distinct set of weights: DP rank 0, or with split experts each expert rank's first replica
        writes = self.layout.expert_dp_rank == 0 if self.layout.ep_size > 1 else self.layout.dp_rank == 0
        if writes:
            torch.save(
                {
                    "model": {n: p.detach().clone() for n, p in self._trained_params().items()},
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "step": self.step,
                    "snapshots": self._snapshots,
                },
                tmp / self._model_file(),
            )
        torch.save(checkpoint.rng_state(), tmp / f"rng_rank{self.layout.rank}.pt")
        if is_rank0 and extra is not None:
            checkpoint.write_extra(tmp, extra)
        meta = {
            "tp_size": self.layout.tp_size,
            "dp_size": self.layout.dp_size,
            "ep_size": self.layout.ep_size,
            "hf_checkpoint": str(self.config.hf_checkpoint),
            "lora_rank": self.config.lora.rank if self.config.lora else 0,  # the model file holds adapters alone
        }
        return checkpoint.finish_save(
            root, tmp, step, meta, self.config.keep_last_n, is_rank0, torch.distributed.barrier
        )

    def load(self, directory: str | os.PathLike) -> int:
        """Load the newest complete checkpoint under `directory` (or that step folder); returns its step."""
        import json

        folder = checkpoint.resolve_checkpoint(directory)
        meta = json.loads((folder / "meta.json").read_text())
        if meta["tp_size"] != self.layout.tp_size:
            raise ValueError(
                f"{folder}: saved with tensor_parallel_size={meta['tp_size']}, running with {self.layout.tp_size}"
            )
        if meta.get("ep_size", 1) != self.layout.ep_size:
            raise ValueError(
                f"{folder}: saved with expert_model_parallel_size={meta.get('ep_size', 1)}, running with {self.layout.ep_size}"
            )
        lora_rank = self.config.lora.rank if self.config.lora else 0
        if meta.get("lora_rank", 0) != lora_rank:
            raise ValueError(f"{folder}: saved with --lora-rank {meta.get('lora_rank', 0)}, running with {lora_rank}")
        state = torch.load(folder / self._model_file(), weights_only=False)
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in state["model"].items():
                if params[name].shape != tensor.shape:
                    raise ValueError(
                        f"{folder}: tensor {name} has shape {tuple(tensor.shape)}, model has {tuple(params[name].shape)}"
                    )
                params[name].copy_(tensor)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        self._snapshots = state.get("snapshots", {})
        rng_file = folder / f"rng_rank{self.layout.rank}.pt"
        if rng_file.is_file():
            checkpoint.set_rng_state(torch.load(rng_file, weights_only=False))
        return self.step

    def _model_file(self) -> str:
        """One file per tensor-parallel rank, and per expert-parallel rank when experts are split."""
        ep = f"_ep{self.layout.ep_rank}" if self.layout.ep_size > 1 else ""
        return f"model_tp{self.layout.tp_rank}{ep}.pt"

    # ---- HF export ----------------------------------------------------------------------------
    def _gather_tp(self, local: torch.Tensor) -> list[torch.Tensor]:
        shards = [torch.empty_like(local) for _ in range(self.layout.tp_size)]
        torch.distributed.all_gather(shards, local.contiguous(), group=self.tp_group)
        return shards

    def _gather_ep(self, local: torch.Tensor) -> list[torch.Tensor]:
        from megatron.core import parallel_state

        parts = [torch.empty_like(local) for _ in range(self.layout.ep_size)]
        torch.distributed.all_gather(parts, local.contiguous(), group=parallel_state.get_expert_model_parallel_group())
        return parts

    def hf_named_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Full HF-named tensors; a collective: every TP (and expert-parallel) rank must iterate it to the end."""
        params = None
        if self.adapters:  # LoRA: W + (alpha / r) B A, per rank from its own shards
            from slime.training.lora import merged_params

            params = merged_params(self.model, self.adapters)
        yield from self.bridge.export_hf(self.model, self._gather_tp, self._gather_ep, params=params)

    def hf_adapter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """LoRA: full PEFT-named A and B of every adapter (a collective over TP, like hf_named_tensors)."""
        from slime.training.lora import export_adapters

        yield from export_adapters(self.adapters, self._gather_tp, self.layout.tp_size)

    def save_lora(self, directory: str | os.PathLike) -> Path:
        """--save-lora: the adapters in PEFT's format (rank 0 writes; every rank gathers)."""
        from slime.models.lora import write_peft

        tensors = {name: t.cpu() for name, t in self.hf_adapter_tensors()}
        target = Path(directory)
        if self.layout.rank == 0:
            write_peft(target, self.config.lora, tensors, self.config.hf_checkpoint)
        torch.distributed.barrier()
        return target

    def hf_weight_buckets(self, bucket_bytes: int = 512 << 20) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """HF-named full tensors grouped into lists of at most bucket_bytes (a larger tensor goes alone); with
        LoRA synced as adapters, the PEFT-named A and B and the scaling (slime.models.lora.AdapterMerger)."""
        if self.adapters and self.config.lora.sync == "adapters":
            from slime.models.lora import SCALING_NAME

            scaling = torch.tensor([self.config.lora.scaling], dtype=torch.float32)
            yield from bucketed([*self.hf_adapter_tensors(), (SCALING_NAME, scaling)], bucket_bytes)
            return
        yield from bucketed(self.hf_named_tensors(), bucket_bytes)

    def save_hf(self, directory: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
        """Write a folder transformers loads: config, safetensors weights, tokenizer files (atomic rename)."""
        target = Path(directory)
        tensors = {name: t.to(dtype or t.dtype).contiguous().cpu() for name, t in self.hf_named_tensors()}
        if self.layout.rank == 0:
            checkpoint.write_hf_folder(target, tensors, self.config.hf_checkpoint, self.hf_config)
        torch.distributed.barrier()
        return target
