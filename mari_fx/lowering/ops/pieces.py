"""Lowerings that keep column pieces apart: ``cat`` / indexing / ``split`` / ``narrow`` on the
last dim select pieces, and elementwise ops apply piece by piece (user pieces at U rows)."""
from __future__ import annotations

import operator
from typing import List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ... import targets
from ...analysis import rules
from ...analysis.example_prop import VALUE_KEY
from ..context import LoweringContext, register_lowering
from ..values import Pieces, Seq, Value
from ...analysis.tags import TAG_KEY

@register_lowering(*targets.CAT)
def _lower_cat(lw: LoweringContext, node: fx.Node, _m) -> Optional[Value]:
    tensors = lw.arg(node, 0, "tensors")
    if not isinstance(tensors, (list, tuple)):  # cat(x.split(k)): a list made by another op, not pieces
        return None
    if not node.meta[TAG_KEY].has_user_columns and not _pieces_on_last_dim(lw, node, tensors):
        return None
    parts: List = []
    for t in tensors:
        parts += lw.parts_of(t)
    return Pieces(tuple(parts))


def _pieces_on_last_dim(lw: LoweringContext, node: fx.Node, tensors) -> bool:
    """A MIXED cat along the last dim of a value a lowering kept as pieces (e.g. pair products of
    user fields at U rows): keep the pieces, a Linear over it can still split."""
    info = node.meta.get(VALUE_KEY)
    dim = lw.arg(node, 1, "dim", 0)
    return (getattr(info, "ndim", 0) >= 2 and isinstance(dim, int) and dim % info.ndim == info.ndim - 1
            and any(isinstance(t, fx.Node) and isinstance(lw.value(t), Pieces) for t in tensors)
            and all(isinstance(t, fx.Node) and getattr(t.meta.get(VALUE_KEY), "ndim", None) == info.ndim
                    for t in tensors))


@register_lowering(operator.getitem)
def _lower_getitem(lw: LoweringContext, node: fx.Node, _m) -> Optional[Value]:
    base, index = node.args
    v = lw.value(base)
    if isinstance(v, Seq):
        return v.items[index] if isinstance(index, int) else Seq(tuple(v.items[index]))
    if not isinstance(v, Pieces):
        return None
    width = base.meta[VALUE_KEY].shape[-1]
    cols = rules.column_index(index, base.meta[VALUE_KEY].ndim, width)  # the rule's predicate
    if cols is None:
        return None
    prefix, last = cols  # the rest of the index (new axes included) applies to every piece
    if isinstance(last, slice):
        lo, hi, _ = last.indices(width)
        return lw.select_columns(base, lo, max(lo, hi), prefix)
    return lw.select_column(base, last % width, prefix)


@register_lowering(torch.ops.aten.slice.Tensor)
def _lower_aten_slice(lw: LoweringContext, node: fx.Node, _m) -> Optional[Value]:
    x, dim, start, stop, step = rules.aten_slice_args(node)
    v = lw.value(x)
    ndim = x.meta[VALUE_KEY].ndim
    if any(isinstance(a, fx.Node) for a in (start, stop, step)) or step != 1:
        return None
    if dim % ndim == 0 and (start or 0) == 0 and (stop is None or stop >= rules.ALL_ROWS):
        return v  # x[:] on the batch: the same value, whatever its level
    if not isinstance(v, Pieces) or dim % ndim != ndim - 1:
        return None
    lo, hi, _ = slice(start, stop).indices(x.meta[VALUE_KEY].shape[-1])
    if hi <= lo:
        return None
    return lw.select_columns(x, lo, hi, (slice(None),) * (ndim - 1))


@register_lowering(torch.ops.aten.select.int)
def _lower_aten_select(lw: LoweringContext, node: fx.Node, _m) -> Optional[Value]:
    x, dim, index = (lw.arg(node, i, n) for i, n in enumerate(("input", "dim", "index")))
    ndim = x.meta[VALUE_KEY].ndim
    if not isinstance(lw.value(x), Pieces) or not isinstance(index, int) or dim % ndim != ndim - 1:
        return None
    return lw.select_column(x, index % x.meta[VALUE_KEY].shape[-1], (slice(None),) * (ndim - 1))


def _split_bounds(node: fx.Node) -> List[Tuple[int, int]]:
    bounds, pos = [], 0
    for part in node.meta[VALUE_KEY]:
        w = part.shape[-1]
        bounds.append((pos, pos + w))
        pos += w
    return bounds


def _arg(node: fx.Node, i: int, name: str, default=None):
    """An argument read exactly as the rules read it (by name, static ints as values)."""
    return rules.static_int(rules.RuleContext(node).arg(i, name, default))


@register_lowering(*targets.SPLIT, *targets.ATEN_SPLIT)
def _lower_split(lw: LoweringContext, node: fx.Node, _m) -> Optional[Value]:
    x = lw.arg(node, 0, ("input", "tensor"))
    if not isinstance(x, fx.Node) or not isinstance(lw.value(x), Pieces):
        return None
    ndim = x.meta[VALUE_KEY].ndim
    dim = _arg(node, 2, "dim", 0)
    if not isinstance(dim, int) or dim % ndim != ndim - 1:
        return None
    prefix = (slice(None),) * (ndim - 1)
    bounds = _split_bounds(node)
    if any(hi <= lo for lo, hi in bounds):
        return None  # an empty part: the rule keeps no segments either
    return Seq(tuple(lw.select_columns(x, lo, hi, prefix) for lo, hi in bounds))


@register_lowering(*targets.NARROW)
def _lower_narrow(lw: LoweringContext, node: fx.Node, _m) -> Optional[Value]:
    x, dim, start, length = (_arg(node, i, n) for i, n in enumerate(("input", "dim", "start", "length")))
    if not isinstance(x, fx.Node) or not isinstance(lw.value(x), Pieces):
        return None
    ndim = x.meta[VALUE_KEY].ndim
    if not all(isinstance(a, int) for a in (dim, start, length)) or dim % ndim != ndim - 1 or length <= 0:
        return None
    start %= x.meta[VALUE_KEY].shape[-1]
    return lw.select_columns(x, start, start + length, (slice(None),) * (ndim - 1))


def _lower_elementwise(lw: LoweringContext, node: fx.Node, _m) -> Optional[Value]:
    if not node.meta[TAG_KEY].has_user_columns:
        return None
    (src,) = [a for a in node.all_input_nodes if isinstance(lw.value(a), Pieces)]
    parts = []
    for level, width, rows in lw.parts_of(src):
        parts.append((level, width, lw.emit_on(node, src, lw.node_of(rows), level)))
    return Pieces(tuple(parts))


register_lowering(*(t for t in targets.PIECEWISE if t != "view"))(_lower_elementwise)


@register_lowering("view")
def _lower_view_dtype(lw: LoweringContext, node: fx.Node, _m) -> Optional[Value]:
    """``x.view(torch.int32)`` of pieces: per piece (the rule keeps segments only when the element
    size, hence every column boundary, is unchanged)."""
    if len(node.args) == 2 and isinstance(node.args[1], torch.dtype):
        return _lower_elementwise(lw, node, _m)
    return None
