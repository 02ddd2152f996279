"""CUDA-IPC handles for SGLang's `/update_weights_from_tensor` (colocated trainer and engine on one GPU).

SGLang reads `serialized_named_tensors[tp_rank]` with its MultiprocessingSerializer: base64 of a
ForkingPickler pickle of [(name, tensor)], or of one flattened bucket (load_format "flattened_bucket"). A CUDA tensor pickles as torch's `rebuild_cuda_tensor` with an IPC
handle, so the engine maps the trainer's memory without a copy. torch writes the sender's device *index* into
that call; the engine sees other visible devices than the trainer, so SGLang's receiving side also accepts the
device's UUID in that slot (sglang.srt.utils.patch_torch) and maps it back to its own index. This pickler
writes the UUID, without patching torch: the substitution lives in this pickler's reducer_override only.
ROCm builds expose HIP devices through the same torch API, so the ROCm backend uses this module too.
"""

from __future__ import annotations

import base64
import io
import pickle
from multiprocessing.reduction import ForkingPickler

# Position of the device index in the arguments of torch.multiprocessing.reductions.rebuild_cuda_tensor
# (stable for years; SGLang relies on the same position).
DEVICE_ARG_INDEX = 6


def device_uuid(index: int) -> str:
    import torch

    return str(torch.cuda.get_device_properties(index).uuid)


class _UuidPickler(ForkingPickler):
    def reducer_override(self, obj):
        import torch
        from torch.multiprocessing import reductions

        if isinstance(obj, torch.Tensor) and obj.is_cuda:
            rebuild, args = reductions.reduce_tensor(obj)
            if rebuild is reductions.rebuild_cuda_tensor:
                args = (*args[:DEVICE_ARG_INDEX], device_uuid(args[DEVICE_ARG_INDEX]), *args[DEVICE_ARG_INDEX + 1 :])
            return rebuild, args
        return NotImplemented


def serialize_ipc_named_tensors(payload: object) -> str:
    """A bucket holding device tensors ([(name, tensor)] or a flattened bucket dict) -> the base64 string SGLang
    expects for one tensor-parallel rank.

    The tensors must stay alive until the engine has answered: the handles point at their memory."""
    import torch.multiprocessing  # noqa: F401  (registers torch's reductions with ForkingPickler)

    buffer = io.BytesIO()
    _UuidPickler(buffer, pickle.HIGHEST_PROTOCOL).dump(payload)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
