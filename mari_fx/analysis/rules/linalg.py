"""Linear algebra: Linear, matmul against batch-free operands, bmm / baddbmm per sample, Bilinear,
convolutions."""
from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import aten, register, rowwise, rowwise_in, RuleContext, RULES, Side, Tag


# Row-wise over the input rows only: weights and biases must be batch-free (F.linear(h, h) contracts
# over the batch); a 1-d batched input would be contracted with the weight.  A column-segmented
# input is split in the lowering.
_linear = rowwise_in("input", min_ndim=2)
register(nn.Linear, F.linear)(_linear)
register(torch.addmm)(rowwise_in("input", "mat1", min_ndim=2))  # input is the (broadcast) bias
register(nn.Bilinear, F.bilinear, aten.bilinear.default)(rowwise_in("input1", "input2", min_ndim=2))


@register(torch.matmul, operator.matmul, torch.mm, "matmul", "mm", "__matmul__")
def _matmul(ctx: RuleContext) -> Tag:
    a, b = ctx.arg(0, "input"), ctx.arg(1, ("other", "mat2"))
    if ctx.side(b) != Side.CONST and (ctx.ndim(b) or 0) < 3:
        return ctx.refuse("matmul whose right operand is batched and <3-d contracts over the batch dimension")
    if ctx.side(a) != Side.CONST and (ctx.ndim(a) or 0) < 2:
        return ctx.refuse("matmul of a 1-d batched vector contracts over the batch dimension")
    return rowwise(ctx, ("input", "other", "mat2"))


register(torch.bmm, "bmm")(rowwise_in("input", "mat2", min_ndim=3))

# Convolutions compute each sample from its own [C, *spatial] input with batch-free weights; the
# input must be batched ([B, C, L] for conv1d): an unbatched [C, L] input has no batch dim, its
# dim 0 would be the channels.  Channels and positions mix, so no column segment survives.
_CONV1D, _CONV2D, _CONV3D = (rowwise_in("input", min_ndim=n) for n in (3, 4, 5))
register(nn.Conv1d, F.conv1d)(_CONV1D)
register(nn.Conv2d, F.conv2d)(_CONV2D)
register(nn.Conv3d, F.conv3d)(_CONV3D)
register(torch.baddbmm, "baddbmm")(rowwise_in("input", "batch1", "batch2", min_ndim=3))

# torch.export (ATen) spellings of the same ops
register(aten.linear.default)(_linear)


register(aten.addmm.default)(RULES[torch.addmm])


register(aten.matmul.default, aten.mm.default)(_matmul)


register(aten.bmm.default)(RULES[torch.bmm])


register(aten.conv1d.default)(_CONV1D)


register(aten.conv2d.default)(_CONV2D)


register(aten.conv3d.default)(_CONV3D)


register(aten.baddbmm.default)(RULES[torch.baddbmm])
