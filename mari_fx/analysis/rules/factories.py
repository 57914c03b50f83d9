"""Factories: ``zeros`` / ``new_zeros`` / ``*_like`` and Python ``int`` / ``len``: CONST unless
their size reads the batch."""
from __future__ import annotations

import builtins

import torch
import torch.fx as fx

from .base import aten, constant_if_constant, refuse_with, register, RuleContext, Side, Tag, TensorTag
from .shapes import _batch_dim_size_arg, _size_tag


_NEW_METHODS = ("new_zeros", "new_ones", "new_empty", "new_full", aten.new_zeros.default, aten.new_ones.default,
                aten.new_empty.default, aten.new_full.default)


@register(torch.zeros, torch.ones, torch.empty, torch.full, torch.rand, torch.randn, torch.arange, *_NEW_METHODS,
          aten.zeros.default, aten.ones.default, aten.empty.memory_format, aten.full.default, aten.arange.default,
          aten.arange.start, aten.arange.start_step)
def _factory(ctx: RuleContext) -> Tag:
    """A factory whose batch-position size is a batch size (``torch.zeros(x.size(0), k)``,
    ``x.new_zeros(x.size(0), k)``) makes the same row for every pair: USER (U rows, gathered where
    it meets item data), or the side of ``self`` for ``new_*``.  Any other batch-dependent argument
    (``arange(x.size(0))``, ``randn(x.size(0), k)``: a value per row; ``zeros(k, x.size(0))``) is
    the value N: MIXED, computed as the model does."""
    inputs = ctx.inputs()
    size = _batch_dim_size_arg(ctx)
    if size is not None:
        inputs.remove(size)  # this one occurrence only
    carrier = ctx.arg(0) if ctx.node.target in _NEW_METHODS else None
    if isinstance(carrier, fx.Node):
        inputs.remove(carrier)  # self gives dtype and device only
    if any(ctx.side(n) != Side.CONST for n in inputs):
        return ctx.refuse("a factory sized or filled by a batch size outside the batch position "
                          "(arange/rand of x.size(0), or a size in another dim)")
    if size is None:
        return ctx.result(Side.CONST)
    # Every row is the same, so one per user is enough whichever tensor the size was read off
    # (torch.export reads every batch size off one input); new_* runs at the rows of self.
    carrier_side = ctx.side(carrier)
    return ctx.result(Side.USER if carrier_side == Side.CONST else carrier_side)


# shaped like arg 0; a node fill value (full_like(x, x.size(0))) joins in
register(torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like)(lambda ctx: ctx.result(ctx.input_side()))
register(torch.eye, aten.eye.default)(constant_if_constant(refuse_with("eye sized by a batch size")))


# int arithmetic on sizes, python builtins
register(builtins.int, builtins.float)(lambda ctx: TensorTag.uniform(ctx.input_side()))
register(builtins.len)(_size_tag)

# torch.export (ATen) spellings of the same ops
register(aten.zeros_like.default, aten.ones_like.default, aten.empty_like.default, aten.full_like.default)(
    lambda ctx: ctx.result(ctx.input_side()))
