"""Elementwise ops, masks and logical ops, dropout: row-wise, column-exact where one operand
carries column segments (the ops of :data:`mari_fx.targets.PIECEWISE`)."""
from __future__ import annotations

from typing import Optional

import torch

from .base import (aten, CONST, constant_if_constant, elementwise, register, register_before, rowwise,
    RuleContext, RULES, Side, Tag, targets)


_UNARY_FUNCS, _UNARY_METHODS, _UNARY_MODULES = targets.UNARY_FUNCS, targets.UNARY_METHODS, targets.UNARY_MODULES
_BINARY_FUNCS, _BINARY_METHODS = targets.BINARY_FUNCS, targets.BINARY_METHODS
register(*_UNARY_FUNCS, *_UNARY_METHODS, *_UNARY_MODULES)(constant_if_constant(elementwise))
register(*_BINARY_FUNCS, *_BINARY_METHODS)(constant_if_constant(elementwise))
_DROPOUTS = targets.DROPOUTS


@register_before(torch.where)
def _where_indices(ctx: RuleContext) -> Optional[Tag]:
    """``torch.where(cond)`` alone is ``nonzero(cond, as_tuple=True)``: indices into the whole batch."""
    if len(ctx.args) + len(ctx.kwargs) == 1 and ctx.input_side() != Side.CONST:
        return ctx.refuse("torch.where(condition) with one argument returns indices into the whole batch")
    return None



# --------------------------------------------------------------------------- masks and logical ops
# Boolean masks (``hist == 0``, ``~pad``, ``a & b``, ``torch.where(m, x, y)``) are elementwise: the
# generic rule applies, including its rank check (a [B, L] mask against [B, H, L, L] scores would
# line the batch up with dim 2; its message names the mask).
_LOGICAL_FUNCS, _LOGICAL_METHODS = targets.LOGICAL_FUNCS, targets.LOGICAL_METHODS
register(*_LOGICAL_FUNCS, *_LOGICAL_METHODS)(constant_if_constant(elementwise))


@register(torch.tril, torch.triu, "tril", "triu", aten.tril.default, aten.triu.default)
def _triangle(ctx: RuleContext) -> Tag:
    """Causal masks: ``tril`` / ``triu`` act on the last two dims, so on a batched tensor of
    >= 3 dims they are row-wise (a batch-free ``torch.ones(L, L).tril()`` is CONST)."""
    if ctx.input_side() == Side.CONST:
        return ctx.result(Side.CONST)
    if (ctx.ndim(ctx.arg(0)) or 0) < 3:
        return ctx.refuse("tril/triu of a 2-d batched tensor takes the batch as a matrix dimension")
    return rowwise(ctx)


@register(torch.repeat_interleave, "repeat_interleave", aten.repeat_interleave.self_int)
def _repeat_interleave(ctx: RuleContext) -> Tag:
    """Row-wise when it repeats along a non-batch dim by a constant count; along dim 0 it makes
    several rows per row (a batch-major fold: see :func:`batch_major_fold`)."""
    if ctx.input_side() == Side.CONST:
        return ctx.result(Side.CONST)
    dim = ctx.norm_dim(ctx.arg(2, "dim", None), ctx.ndim(ctx.arg(0)))
    if dim in (0, None) or ctx.side(ctx.arg(1, "repeats")) != Side.CONST:
        return ctx.refuse("repeat_interleave along the batch dimension (or by batched counts) repeats rows")
    return ctx.rowwise()


@register(*_DROPOUTS[:4])
def _dropout_module(ctx: RuleContext) -> Tag:
    if ctx.module.training and ctx.module.p > 0:
        return ctx.refuse("Dropout in training mode is random per row: call model.eval() first")
    return elementwise(ctx)


@register(*_DROPOUTS[4:])
def _dropout_fn(ctx: RuleContext) -> Tag:
    training = ctx.arg(2, ("training", "train"), True)
    if training and ctx.arg(1, "p", 0.5) > 0:
        return ctx.refuse("dropout with training=True is random per row")
    return elementwise(ctx)

# torch.export (ATen) spellings of the same ops
register(aten.dropout.default)(_dropout_fn)


# Comparisons and selections follow their operands; metadata asserts return nothing (no data).
_MORE_ATEN_ELEMENTWISE = targets.ATEN_MORE_ELEMENTWISE
register(*[t for t in _MORE_ATEN_ELEMENTWISE if t not in RULES])(constant_if_constant(elementwise))
register(*[t for t in (aten._assert_tensor_metadata.default, aten._assert_scalar.default,
                       aten.sym_constrain_range_for_size.default) if t not in RULES])(lambda ctx: CONST)
