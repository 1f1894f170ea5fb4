"""What a ZeRO-3 parameter is and which slice of it this rank holds (DeepSpeed 0.19's partition layout)."""
from __future__ import annotations

import torch


def is_zero3_param(p: torch.Tensor) -> bool:
    """A ZeRO-3 parameter (built inside `deepspeed.zero.Init` or partitioned by the engine): its own tensor is
    empty outside a gather, `ds_tensor` is this rank's slice."""
    return hasattr(p, "ds_id")


def local_range(w: torch.Tensor) -> tuple[int, int, torch.Tensor]:
    """(start, n, partition) of a ZeRO-3 parameter on this rank: rank r holds the flat elements
    [r * n, (r + 1) * n) of the tensor (n = partition size, the last rank's tail is padding)."""
    import torch.distributed as dist

    part = w.ds_tensor
    if hasattr(part, "ds_quant_scale") or getattr(part, "final_location", None) is not None:
        raise NotImplementedError("quantised or NVMe-offloaded ZeRO-3 weights are not supported")
    n = part.numel()
    return dist.get_rank(group=w.ds_process_group) * n, n, part
