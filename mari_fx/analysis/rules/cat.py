"""``cat`` / ``stack`` / ``split`` / ``chunk`` / ``narrow`` / ``unbind``: column segments through
concatenation and slicing of the last dim."""
from __future__ import annotations

from typing import Any, List, Tuple

import torch
import torch.fx as fx

from .base import (aten, NOTE_KEY, register, rowwise, Rule, RuleContext, RULES, Segment, SeqTag, Side,
    static_int, Tag, TensorInfo, TensorTag)


def _sequence(ctx: RuleContext, arg: Any) -> Tuple[List[Tag], List[Any]]:
    """Tags and example values of the tensors in a list argument, or in a tuple-valued node
    (``torch.cat(x.split(4, -1), -1)``)."""
    if isinstance(arg, fx.Node):
        tag, value = ctx.tag(arg), ctx.value(arg)
        if isinstance(tag, SeqTag) and isinstance(value, tuple) and len(value) == len(tag.items):
            return list(tag.items), list(value)
        return [tag], [None]  # unknown: one opaque batched entry
    return [ctx.tag(t) for t in arg], [ctx.value(t) for t in arg]


@register(torch.cat, torch.concat, torch.concatenate)
def _cat(ctx: RuleContext) -> Tag:
    tensors = ctx.arg(0, "tensors")
    tags, values = _sequence(ctx, tensors)
    ndim = values[0].ndim if values and isinstance(values[0], TensorInfo) else None
    dim = ctx.norm_dim(static_int(ctx.arg(1, "dim", 0)), ndim)
    sides = [t.side for t in tags]
    if all(s == Side.CONST for s in sides):
        return ctx.result(Side.CONST)
    if dim in (0, None):
        return ctx.refuse("cat along the batch dimension")
    if Side.CONST in sides:
        return ctx.refuse("cat of batched tensors with a batch-free constant")
    if isinstance(tensors, fx.Node):  # the pieces lowering reads list arguments only
        return ctx.rowwise()
    if dim == ndim - 1:
        segments: List[Segment] = []
        for t in tensors:
            tag = ctx.tag(t)
            if tag.width is None:
                segments.append(Segment(tag.side, ctx.value(t).shape[-1]))
            else:
                segments += list(tag.segments)
        return TensorTag.of_segments(segments)
    return ctx.rowwise()


@register(torch.stack)
def _stack(ctx: RuleContext) -> Tag:
    tags, values = _sequence(ctx, ctx.arg(0, "tensors"))
    ndim = values[0].ndim if values and isinstance(values[0], TensorInfo) else None
    dim = ctx.norm_dim(static_int(ctx.arg(1, "dim", 0)), None if ndim is None else ndim + 1)
    if all(t.side == Side.CONST for t in tags):
        return ctx.result(Side.CONST)
    if dim in (0, None) or any(t.side == Side.CONST for t in tags):
        return ctx.refuse("stack along the batch dimension, or with a batch-free constant")
    return ctx.rowwise()


def _split_rule(dim_pos: int) -> Rule:
    def rule(ctx: RuleContext) -> Tag:
        x = ctx.arg(0)
        if ctx.input_side() == Side.CONST:
            return ctx.result(Side.CONST)
        ndim = ctx.ndim(x)
        dim = ctx.norm_dim(static_int(ctx.arg(dim_pos, "dim", 0)), ndim)
        if dim in (0, None):
            return ctx.refuse("split along the batch dimension")
        tag = rowwise(ctx, ("input", "tensor"))  # split sizes must be batch-free
        if tag.side == Side.MIXED and ctx.node.meta.get(NOTE_KEY):
            return tag
        tag = ctx.tag(x)
        if (dim == ndim - 1 and isinstance(tag, TensorTag) and tag.is_segmented and isinstance(ctx.out, tuple)
                and all(part.shape[-1] > 0 for part in ctx.out)):  # as mari_fx.lowering.ops.pieces lowers it
            pos, items = 0, []
            for part in ctx.out:
                w = part.shape[-1]
                items.append(tag.slice(pos, pos + w))
                pos += w
            return SeqTag(tuple(items))
        return ctx.rowwise()

    return rule


register(torch.split, "split", torch.chunk, "chunk", torch.tensor_split, "tensor_split")(_split_rule(2))
register(torch.unbind, "unbind")(
    lambda ctx: ctx.refuse("unbind along the batch dimension")
    if ctx.norm_dim(ctx.arg(1, "dim", 0), ctx.ndim(ctx.arg(0))) in (0, None) and ctx.input_side() != Side.CONST
    else ctx.rowwise())


@register(torch.narrow, "narrow")
def _narrow(ctx: RuleContext) -> Tag:
    x = ctx.arg(0)
    ndim = ctx.ndim(x)
    dim = ctx.norm_dim(static_int(ctx.arg(1, "dim")), ndim)
    if ctx.input_side() == Side.CONST:
        return ctx.result(Side.CONST)
    if dim in (0, None):
        return ctx.refuse("narrow along the batch dimension")
    tag, start, length = ctx.tag(x), static_int(ctx.arg(2, "start")), static_int(ctx.arg(3, "length"))
    if dim == ndim - 1 and tag.is_segmented and isinstance(start, int) and isinstance(length, int) and length > 0:
        start %= ctx.value(x).shape[-1]  # narrow(-1, -3, 2) counts from the end
        return tag.slice(start, start + length)
    return rowwise(ctx, ("input",))  # a batched start (tensor) is refused

# torch.export (ATen) spellings of the same ops
register(aten.cat.default)(_cat)


register(aten.stack.default)(_stack)


register(aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.tensor_split.sections)(_split_rule(2))


register(aten.narrow.default)(_narrow)


register(aten.unbind.int)(lambda ctx: RULES[torch.unbind](ctx))
