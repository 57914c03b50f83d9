"""FLOP counting with ``torch.utils.flop_counter`` (matmuls, convolutions, attention).

The fused fast paths of ``nn.TransformerEncoderLayer`` / ``nn.MultiheadAttention`` (taken under
``no_grad`` in eval mode) run kernels the counter does not see, so a model with a transformer
encoder would be under-counted by its whole encoder.  :func:`count_flops` counts with those fast
paths disabled (:func:`attention_fastpath_off`): the same math through ops the counter knows.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry

# flop_counter knows addmm / baddbmm but not their in-place forms, which SplitLinear and
# hand-written rewrites use to fuse the broadcast-add into the GEMM: count them alike.
for _inplace, _op in ((torch.ops.aten.addmm_, torch.ops.aten.addmm), (torch.ops.aten.baddbmm_, torch.ops.aten.baddbmm)):
    flop_registry.setdefault(_inplace, flop_registry[_op])
# nor the CPU flash-attention kernel that scaled_dot_product_attention dispatches to on CPU:
# count it as the other SDPA kernels are (the two batched matmuls, q k^T and p v).
flop_registry.setdefault(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu,
                         flop_registry[torch.ops.aten._scaled_dot_product_flash_attention])


@contextlib.contextmanager
def attention_fastpath_off() -> Iterator[None]:
    """Run ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` / ``nn.TransformerEncoder``
    without their fused fast paths (``torch.backends.mha.set_fastpath_enabled(False)``), restoring
    the previous setting on exit.

    Example:
        >>> with attention_fastpath_off():
        ...     torch.backends.mha.get_fastpath_enabled()
        False
        >>> torch.backends.mha.get_fastpath_enabled()
        True
    """
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def count_flops(module: Any, *args: Any, **kwargs: Any) -> int:
    """FLOPs of one call ``module(*args, **kwargs)`` (no grad), attention fast paths off so that
    every matmul of a transformer encoder is counted.

    Example:
        >>> count_flops(torch.nn.Linear(4, 3), torch.ones(10, 4))
        240
        >>> enc = torch.nn.TransformerEncoderLayer(8, 2, 16, batch_first=True).eval()
        >>> count_flops(enc, torch.ones(3, 5, 8))  # qkv, scores, values, out-proj, feed-forward
        17760
    """
    with torch.no_grad(), attention_fastpath_off(), FlopCounterMode(display=False) as counter:
        module(*args, **kwargs)
    return counter.get_total_flops()
