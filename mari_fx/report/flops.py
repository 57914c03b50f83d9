"""FLOP counting with ``torch.utils.flop_counter`` (matmuls, convolutions, attention)."""
from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry

# flop_counter knows addmm / baddbmm but not their in-place forms, which SplitLinear and
# hand-written rewrites use to fuse the broadcast-add into the GEMM: count them alike.
for _inplace, _op in ((torch.ops.aten.addmm_, torch.ops.aten.addmm), (torch.ops.aten.baddbmm_, torch.ops.aten.baddbmm)):
    flop_registry.setdefault(_inplace, flop_registry[_op])


def count_flops(module: Any, *args: Any, **kwargs: Any) -> int:
    """FLOPs of one call ``module(*args, **kwargs)`` (no grad).

    Example:
        >>> count_flops(torch.nn.Linear(4, 3), torch.ones(10, 4))
        240
    """
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*args, **kwargs)
    return counter.get_total_flops()
