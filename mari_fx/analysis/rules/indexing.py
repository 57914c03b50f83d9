"""Indexing by tensors: index_select, gather, take_along_dim along non-batch dims; one_hot; PReLU."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import aten, register, rowwise, rowwise_in, RuleContext, Side, static_int, Tag


@register(torch.index_select, "index_select", aten.index_select.default)
def _index_select(ctx: RuleContext) -> Tag:
    """Along a non-batch dim with a batch-free index: row-wise in the input.  Along dim 0 of a
    batch-free table with a batched 1-d index: a table lookup, row-wise in the index."""
    x, index = ctx.arg(0, "input"), ctx.arg(2, "index")
    dim = ctx.norm_dim(static_int(ctx.arg(1, "dim")), ctx.ndim(x))
    if ctx.input_side() == Side.CONST:
        return ctx.result(Side.CONST)
    if dim not in (0, None) and ctx.side(index) == Side.CONST:
        return rowwise(ctx, ("input",))
    if dim == 0 and ctx.side(x) == Side.CONST and ctx.ndim(index) == 1:
        return rowwise(ctx, ("index",))
    return ctx.refuse("index_select picks rows of the batch dimension (or a batched index picks columns)")


@register(torch.gather, "gather", aten.gather.default)
def _gather(ctx: RuleContext) -> Tag:
    """``out[b, j] = x[b, index[b, j]]`` along a non-batch dim: row-wise when input and index are
    batched alike (gather does not broadcast: a batch-free index would keep its own row count)."""
    x, index = ctx.arg(0, "input"), ctx.arg(2, "index")
    if ctx.input_side() == Side.CONST:
        return ctx.result(Side.CONST)
    if ctx.norm_dim(static_int(ctx.arg(1, "dim")), ctx.ndim(x)) in (0, None):
        return ctx.refuse("gather along the batch dimension")
    if ctx.side(x) == Side.CONST or ctx.side(index) == Side.CONST:
        return ctx.refuse("gather of a batched tensor by a batch-free index (or the reverse) pairs rows by position")
    return rowwise(ctx, ("input", "index"))


@register(torch.take_along_dim, "take_along_dim", aten.take_along_dim.default)
def _take_along_dim(ctx: RuleContext) -> Tag:
    x = ctx.arg(0, "input")
    if ctx.input_side() == Side.CONST:
        return ctx.result(Side.CONST)
    if ctx.norm_dim(static_int(ctx.arg(2, "dim", None)), ctx.ndim(x)) in (0, None):
        return ctx.refuse("take_along_dim along the batch dimension (or of the flattened input)")
    return rowwise(ctx, ("input", "indices"))  # broadcasts like an elementwise op


@register(F.one_hot, aten.one_hot.default)
def _one_hot(ctx: RuleContext) -> Tag:
    """Row-wise with a constant ``num_classes``; without one (-1) the width is the largest id in the
    whole batch plus one: a value of every row."""
    if ctx.input_side() == Side.CONST:
        return ctx.result(Side.CONST)
    k = static_int(ctx.arg(1, "num_classes", -1))
    if not isinstance(k, int) or k < 0:
        return ctx.refuse("one_hot without num_classes sizes its output by the largest id in the batch")
    return rowwise(ctx, ("input",), min_ndim=1)


register(nn.PReLU)(rowwise_in("input"))
register(*{F.prelu, torch.prelu, "prelu", aten.prelu.default})(rowwise_in("input"))  # the weight is per channel (dim 1): batch-free
