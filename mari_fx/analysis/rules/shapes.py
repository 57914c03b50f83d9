"""Shapes and sizes: views and reshapes that keep the batch dim, batch-size reads (and where a
batch size sits in a shape), ``getitem`` and ATen slicing, column indices that keep segments."""
from __future__ import annotations

import builtins
import operator
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn

from .base import (aten, CONST, constant_if_constant, _dims, elementwise, join_all, refuse_with, register,
    RuleContext, SeqTag, Side, static_int, Tag, TAG_KEY, TensorInfo, TensorTag, unknown, VALUE_KEY)


# In the pair-shaped model the batch size of every batched tensor is the number of pairs N, so
# a size read off a batched tensor (``x.size(0)``, ``x.shape``, ``x.numel()``, ``len(x)``) is
# tagged ITEM: it depends on the request's N, whatever side the tensor is on, and a consumer
# that uses it as a value runs at N rows.  The one exception is the *batch position of a shape*
# (:func:`batch_dim_size_slot`): there a batch size only says "as many rows as the batch", and
# the lowering passes the row count the op runs at (U for a USER op).


def _is_batched_node(a: Any) -> bool:
    return (isinstance(a, fx.Node) and TAG_KEY in a.meta and a.meta[TAG_KEY].side != Side.CONST
            and isinstance(a.meta.get(VALUE_KEY), TensorInfo) and a.meta[VALUE_KEY].ndim >= 1
            and a.meta[VALUE_KEY].shape[0] in (_example_rows(a.graph), None))


def _example_rows(graph: fx.Graph) -> Optional[int]:
    """The example's pair count (dim 0 of the tensor inputs): a tensor whose dim 0 has another size
    in the example (the batch folded into it, ``[B * L, d]``, or moved) has no batch size to read."""
    for p in graph.nodes:
        if p.op != "placeholder":
            break
        info = p.meta.get(VALUE_KEY)
        if isinstance(info, TensorInfo) and info.ndim >= 1:
            return info.shape[0]
    return None


def size_read(a: Any) -> Optional[Tuple[str, fx.Node]]:
    """``(kind, t)`` if ``a`` reads the size of a batched tensor ``t``: kind ``"batch"`` for its
    batch size (``t.size(0)``, ``t.shape[0]``, ``t.shape[-ndim]``, ``len(t)``,
    ``aten.sym_size.int(t, 0)``), ``"shape"`` for its whole shape (``t.shape``, ``t.size()``),
    ``"numel"`` for ``t.numel()``; None for anything else (feature sizes included).

    Example:
        >>> import torch, mari_fx
        >>> from mari_fx.analysis.rules import size_read
        >>> class M(torch.nn.Module):
        ...     def forward(self, u, i):
        ...         return u * u.size(0) + u.shape[1] + i
        >>> gm = mari_fx.trace(M(), ["u"], (torch.randn(4, 3), torch.randn(4, 3)))
        >>> [(n.name, size_read(n)[0]) for n in gm.graph.nodes if size_read(n)]
        [('size', 'batch'), ('getattr_1', 'shape')]
    """
    if not isinstance(a, fx.Node) or a.op not in ("call_function", "call_method") or not a.args:
        return None
    t, target = a.args[0], a.target
    if target == "size" and a.op == "call_method" or target is aten.sym_size.int:
        if not _is_batched_node(t):
            return None
        d = a.args[1] if len(a.args) > 1 else a.kwargs.get("dim")
        if d is None:
            return ("shape", t)
        return ("batch", t) if isinstance(d, int) and d % t.meta[VALUE_KEY].ndim == 0 else None
    if target is builtins.getattr and len(a.args) > 1 and a.args[1] == "shape":
        return ("shape", t) if _is_batched_node(t) else None
    if target in ("numel", torch.numel, aten.sym_numel.default):
        return ("numel", t) if _is_batched_node(t) else None
    if target is builtins.len:
        return ("batch", t) if _is_batched_node(t) else None
    if target is operator.getitem and isinstance(a.args[1], int) and not isinstance(a.args[1], bool):
        read = size_read(t)
        if read is not None and read[0] == "shape" and a.args[1] % read[1].meta[VALUE_KEY].ndim == 0:
            return ("batch", read[1])
    return None


def is_batch_size_node(a: Any) -> bool:
    """``a`` is the batch size of a batched tensor (``t.size(0)``, ``t.shape[0]``, ``len(t)``)."""
    read = size_read(a)
    return read is not None and read[0] == "batch"


def is_batch_size(ctx: RuleContext, a: Any) -> bool:
    return is_batch_size_node(a)


# target -> (position, keyword) of its size argument(s); the first size is the batch position.
_SHAPE_SLOTS: Dict[Any, Tuple[int, str]] = {
    "view": (1, "size"), "reshape": (1, "shape"), "expand": (1, "size"), torch.reshape: (1, "shape"),
    "repeat": (1, "repeats"), aten.repeat.default: (1, "repeats"),
    "new_zeros": (1, "size"), "new_ones": (1, "size"), "new_empty": (1, "size"), "new_full": (1, "size"),
    torch.zeros: (0, "size"), torch.ones: (0, "size"), torch.empty: (0, "size"), torch.full: (0, "size"),
    aten.view.default: (1, "size"), aten.reshape.default: (1, "shape"), aten._unsafe_view.default: (1, "size"),
    aten.expand.default: (1, "size"), aten.zeros.default: (0, "size"), aten.ones.default: (0, "size"),
    aten.empty.memory_format: (0, "size"), aten.full.default: (0, "size"), aten.new_zeros.default: (1, "size"),
    aten.new_ones.default: (1, "size"), aten.new_empty.default: (1, "size"), aten.new_full.default: (1, "size"),
}


def batch_dim_size_slot(node: fx.Node) -> Optional[Tuple[Any, ...]]:
    """Where ``node`` passes a batch size as the batch dimension of a shape: the path
    (``("args", i)``, ``("args", i, 0)`` or ``("kwargs", name, 0)``) of its *first* size argument,
    if that is a batch size (:func:`is_batch_size_node`); else None.

    Rules and lowering share this one predicate: only this argument adapts to the rows the op runs
    at (the lowering gives U at U rows); a batch size anywhere else is the value N.

    Example:
        >>> import torch, mari_fx
        >>> from mari_fx.analysis.rules import batch_dim_size_slot
        >>> class M(torch.nn.Module):
        ...     def forward(self, u, i):
        ...         return u.view(u.size(0), -1) + u.unsqueeze(1).expand(-1, u.size(0), -1).sum(1) + i
        >>> gm = mari_fx.trace(M(), ["u"], (torch.randn(4, 3), torch.randn(4, 3)))
        >>> {n.target: batch_dim_size_slot(n) for n in gm.graph.nodes if n.target in ("view", "expand")}
        {'view': ('args', 1), 'expand': None}
    """
    slot = _SHAPE_SLOTS.get(node.target) if node.op in ("call_function", "call_method") else None
    if slot is None:
        return None
    pos, name = slot
    if pos < len(node.args):
        path: Tuple[Any, ...] = ("args", pos)
        first = node.args[pos]
    elif name in node.kwargs:
        path, first = ("kwargs", name), node.kwargs[name]
    else:
        return None
    if isinstance(first, (list, tuple)):
        if not first:
            return None
        path, first = path + (0,), first[0]
    return path if is_batch_size_node(first) else None


def replace_at(args: Tuple[Any, ...], kwargs: Dict[str, Any], path: Tuple[Any, ...], new: Any):
    """``(args, kwargs)`` with the argument at ``path`` (from :func:`batch_dim_size_slot`) replaced by ``new``."""
    args, kwargs = list(args), dict(kwargs)
    holder, key = (args, path[1]) if path[0] == "args" else (kwargs, path[1])
    if len(path) == 3:
        seq = list(holder[key])
        seq[path[2]] = new
        holder[key] = type(holder[key])(seq) if isinstance(holder[key], tuple) else seq
    else:
        holder[key] = new
    return tuple(args), kwargs


def _batch_dim_size_arg(ctx: RuleContext) -> Optional[fx.Node]:
    path = batch_dim_size_slot(ctx.node)
    if path is None:
        return None
    holder = ctx.args if path[0] == "args" else ctx.kwargs
    value = holder[path[1]]
    return value[path[2]] if len(path) == 3 else value


def _shape_args(ctx: RuleContext, start: int, name: str) -> List[Any]:
    rest = list(ctx.args[start:])
    if len(rest) == 1 and isinstance(rest[0], (list, tuple, torch.Size)):
        return list(rest[0])
    if not rest and name in ctx.kwargs:
        return list(ctx.kwargs[name])
    return rest


def _side_beside_batch_size(ctx: RuleContext) -> Side:
    """Side of a shape op on a batched tensor, not counting a batch size in the batch position:
    it adapts to the rows the op runs at (the lowering passes U or N), so ``u.view(i.size(0), -1)``
    stays USER.  A batch size in any other position is the value N (ITEM)."""
    inputs = ctx.inputs()
    size = _batch_dim_size_arg(ctx)
    if size is not None and ctx.side(ctx.arg(0)) != Side.CONST:
        inputs.remove(size)  # this one occurrence only
    return join_all(ctx.side(n) for n in inputs)


def _keeps_batch(ctx: RuleContext, first: Any) -> bool:
    src, out = ctx.value(ctx.arg(0)), ctx.out
    if not (isinstance(src, TensorInfo) and isinstance(out, TensorInfo) and src.ndim >= 1 and out.ndim >= 1):
        return False
    return (first == -1 or is_batch_size(ctx, first)) and out.shape[0] == src.shape[0]


@register("view", "reshape", torch.reshape)
def _reshape(ctx: RuleContext) -> Tag:
    if ctx.input_side() == Side.CONST:
        return ctx.result(Side.CONST)
    shape = _shape_args(ctx, 1, "shape")
    if ctx.node.target == "view" and shape and isinstance(shape[0], torch.dtype):
        return elementwise(ctx)
    if not shape or not _keeps_batch(ctx, shape[0]):
        return ctx.refuse("reshape does not keep dim 0 as the batch (first size must be -1 or x.size(0))")
    return ctx.result(_side_beside_batch_size(ctx))


def _uniform_rows(ctx: RuleContext, sizes: List[Any]) -> Optional[Tag]:
    """``c.expand(x.size(0), ...)`` / ``c.repeat(x.size(0), 1, ...)`` of a batch-free ``c`` whose
    dim 0 is new or of size 1 (a learned query, a CLS token, a context vector per sample): every
    row is ``c``, like ``torch.zeros(x.size(0), k)``: USER, built at U rows (the batch size in the
    batch position becomes U there) and gathered where it meets item data.  None when it is
    not that (the generic rules decide)."""
    src, size = ctx.value(ctx.arg(0)), _batch_dim_size_arg(ctx)
    if ctx.side(ctx.arg(0)) != Side.CONST or size is None or not isinstance(src, TensorInfo):
        return None
    rest = ctx.inputs()
    rest.remove(size)  # this one occurrence only
    if any(ctx.side(n) != Side.CONST for n in rest):
        return None
    if len(sizes) > src.ndim or (len(sizes) == src.ndim and src.ndim >= 1 and src.shape[0] == 1):
        return ctx.result(Side.USER)
    return None


@register("expand")
def _expand(ctx: RuleContext) -> Tag:
    sizes = _shape_args(ctx, 1, "size")
    if ctx.input_side() == Side.CONST:
        return ctx.result(Side.CONST)
    uniform = _uniform_rows(ctx, sizes)
    if uniform is not None:
        return uniform
    if len(sizes) != ctx.ndim(ctx.arg(0)) or not _keeps_batch(ctx, sizes[0]):
        return ctx.refuse("expand changes the batch dimension")
    return ctx.result(_side_beside_batch_size(ctx))


@register("repeat")
def _repeat(ctx: RuleContext) -> Tag:
    sizes = _shape_args(ctx, 1, "repeats")
    uniform = _uniform_rows(ctx, sizes) if ctx.input_side() != Side.CONST else None
    if uniform is not None:
        return uniform
    if ctx.input_side() != Side.CONST and (len(sizes) != ctx.ndim(ctx.arg(0)) or sizes[0] != 1):
        return ctx.refuse("repeat along the batch dimension")
    return ctx.rowwise()


@register("reshape_as", "view_as", aten.reshape_as.default, aten.view_as.default)
def _reshape_as(ctx: RuleContext) -> Tag:
    """``c.reshape_as(p)`` / ``c.view_as(p)``: row-wise when ``c``, ``p`` and the result all keep
    the rows in dim 0 (the sizes are read from ``p`` at run time, so U or N rows alike)."""
    src, like = ctx.arg(0), ctx.arg(1, "other")
    if ctx.input_side() == Side.CONST:
        return ctx.result(Side.CONST)
    shapes = [ctx.value(src), ctx.value(like), ctx.out]
    if not all(getattr(v, "ndim", 0) >= 1 for v in shapes) or len({v.shape[0] for v in shapes}) != 1:
        return ctx.refuse("reshape_as does not keep dim 0 as the batch")
    if ctx.side(src) == Side.CONST:  # a batch-free tensor whose dim 0 happens to be the example's batch size
        return ctx.refuse("reshape_as of a batch-free tensor to a batched shape (its rows would become pairs)")
    return ctx.rowwise()


@register("expand_as", aten.expand_as.default)
def _expand_as(ctx: RuleContext) -> Tag:
    """``c.expand_as(p)``: ``c``'s values at ``p``'s shape; ``p`` gives the row count only.

    A batch-free ``c`` whose dim 0 is new or of size 1 (positions per sample:
    ``arange(L).unsqueeze(0).expand_as(seq)``) is the same row for every pair: it takes ``p``'s
    side, so it is built wherever ``p`` lives (U rows beside a user sequence).  A batched ``c``
    keeps its rows when ``p`` is batched at the same rank: row-wise over both (a user ``c``
    meets an item ``p`` at N rows)."""
    src, like = ctx.arg(0), ctx.arg(1, "other")
    if ctx.input_side() == Side.CONST:
        return ctx.result(Side.CONST)
    s, p = ctx.value(src), ctx.value(like)
    if not (isinstance(s, TensorInfo) and isinstance(p, TensorInfo) and _is_batched_node(like)):
        return ctx.refuse("expand_as to a shape whose dim 0 is not the batch")
    if ctx.side(src) == Side.CONST:
        if s.ndim < p.ndim or (s.ndim >= 1 and s.shape[0] == 1):
            return ctx.result(ctx.side(like))
        return ctx.refuse("expand_as of a batch-free tensor with rows of its own to the batch")
    if s.ndim != p.ndim or not _is_batched_node(src):
        return ctx.refuse("expand_as changes the batch dimension")
    return ctx.rowwise()


@register(torch.flatten, "flatten", nn.Flatten)
def _flatten(ctx: RuleContext) -> Tag:
    if ctx.module is not None:
        start = ctx.module.start_dim
    else:
        start = ctx.arg(1, "start_dim", 0)
    if ctx.input_side() != Side.CONST and ctx.norm_dim(start, ctx.ndim(ctx.arg(0))) in (0, None):
        return ctx.refuse("flatten merges the batch dimension (use start_dim=1)")
    return ctx.rowwise()


@register(nn.Unflatten, torch.unflatten, "unflatten")
def _unflatten(ctx: RuleContext) -> Tag:
    dim = ctx.module.dim if ctx.module is not None else ctx.arg(1, "dim")
    if ctx.input_side() != Side.CONST and ctx.norm_dim(dim, ctx.ndim(ctx.arg(0))) in (0, None):
        return ctx.refuse("unflatten splits the batch dimension")
    return ctx.rowwise()


@register(torch.unsqueeze, "unsqueeze")
def _unsqueeze(ctx: RuleContext) -> Tag:
    ndim = ctx.ndim(ctx.arg(0))
    d = ctx.norm_dim(ctx.arg(1, "dim"), None if ndim is None else ndim + 1)
    if ctx.input_side() != Side.CONST and d in (0, None):
        return ctx.refuse("unsqueeze(0) puts a new dimension in front of the batch")
    return ctx.rowwise()


@register(torch.squeeze, "squeeze")
def _squeeze(ctx: RuleContext) -> Tag:
    dims = _dims(ctx.arg(1, "dim", None))
    ndim = ctx.ndim(ctx.arg(0))
    if ctx.input_side() != Side.CONST and (not dims or 0 in [ctx.norm_dim(d, ndim) for d in dims]):
        return ctx.refuse("squeeze without a dim (or of dim 0) drops the batch dimension of a 1-row batch")
    return ctx.rowwise()


@register(torch.permute, "permute")
def _permute(ctx: RuleContext) -> Tag:
    dims = _shape_args(ctx, 1, "dims")
    if ctx.input_side() != Side.CONST and (not dims or ctx.norm_dim(dims[0], ctx.ndim(ctx.arg(0))) != 0):
        return ctx.refuse("permute moves the batch dimension")
    return ctx.rowwise()


@register(torch.transpose, "transpose", torch.swapaxes, "swapaxes")
def _transpose(ctx: RuleContext) -> Tag:
    ndim = ctx.ndim(ctx.arg(0))
    dims = [ctx.norm_dim(ctx.arg(1, ("dim0", "axis0")), ndim), ctx.norm_dim(ctx.arg(2, ("dim1", "axis1")), ndim)]
    if ctx.input_side() != Side.CONST and (0 in dims or None in dims):
        return ctx.refuse("transpose moves the batch dimension")
    return ctx.rowwise()


register("t", torch.t)(constant_if_constant(refuse_with("t() swaps the batch dimension")))


def _size_tag(ctx: RuleContext) -> Tag:
    """A size read off a batched tensor is N (ITEM); see :func:`size_read`."""
    if ctx.input_side() == Side.CONST:
        return CONST
    read = size_read(ctx.node)
    return TensorTag.uniform(Side.ITEM if read is not None else Side.MIXED)


@register("size")
def _size(ctx: RuleContext) -> Tag:
    dim = ctx.arg(1, "dim", None)
    if dim is not None and ctx.norm_dim(dim, ctx.ndim(ctx.arg(0))) != 0:
        return CONST
    return _size_tag(ctx)


register("dim", "ndimension", "is_contiguous", "element_size")(lambda ctx: CONST)
register("numel", torch.numel, aten.sym_numel.default)(_size_tag)


@register(builtins.getattr)
def _getattr(ctx: RuleContext) -> Tag:
    name = ctx.arg(1)
    if name in ("dtype", "device", "ndim", "is_cuda", "layout", "requires_grad"):
        return CONST
    if name == "shape":
        return _size_tag(ctx)
    if name == "mT" and (ctx.ndim(ctx.arg(0)) or 0) >= 3:
        return ctx.rowwise()
    tag = ctx.tag(ctx.arg(0))
    if name in ("values", "indices") and isinstance(tag, SeqTag) and len(tag.items) == 2:
        return tag.items[name == "indices"]  # (values, indices) of topk / sort / max(dim)
    return unknown(ctx)


@register(operator.getitem)
def _getitem(ctx: RuleContext) -> Tag:
    base, index = ctx.arg(0), ctx.arg(1)
    tag, value = ctx.tag(base), ctx.value(base)
    if isinstance(tag, SeqTag):
        if isinstance(index, int):
            return tag.items[index]
        if isinstance(index, slice):
            return SeqTag(tag.items[index])
        return unknown(ctx)
    if isinstance(value, (torch.Size, tuple)):  # indexing a shape
        if isinstance(index, int) and index % max(len(value), 1) != 0:
            return CONST
        if isinstance(index, slice) and (index.start or 0) >= 1:
            return CONST
        return TensorTag.uniform(tag.side)
    if not isinstance(value, TensorInfo):
        return unknown(ctx)
    if ctx.input_side() == Side.CONST:
        return ctx.result(Side.CONST)
    plan = normalize_index(index, value.ndim)
    if plan is None:
        return ctx.refuse("indexing with tensors or lists, or with a new axis in front of the batch")
    per_dim, _ = plan
    if per_dim[0] != slice(None):
        return ctx.refuse("indexing selects rows of the batch dimension")
    cols = column_index(index, value.ndim, value.shape[-1])
    if isinstance(tag, TensorTag) and tag.is_segmented and cols is not None:
        last = cols[1]
        if isinstance(last, slice):
            return tag.slice(*last.indices(value.shape[-1])[:2])
        col = last % value.shape[-1]
        return ctx.result(tag.slice(col, col + 1).side)
    return ctx.rowwise()


def _new_axis(i: Any) -> bool:
    return i is None or isinstance(i, bool)  # x[:, True] adds an axis of size 1, like None


def expand_index(index: Any, ndim: int) -> Optional[List[Any]]:
    """A basic (int/slice/None/bool/...) index as a list: the ``...`` expanded, one entry per
    input dim plus the new axes (None / bools) where they stand.  None for indices the rules
    do not analyse (tensors, lists, batch-dependent bounds, or a new axis in front of the
    batch).  Batch-free int nodes in the index are replaced by their (static) values."""
    items = list(index) if isinstance(index, tuple) else [index]
    items = [slice(static_int(i.start), static_int(i.stop), static_int(i.step)) if isinstance(i, slice)
             else static_int(i) for i in items]
    if any(isinstance(b, fx.Node) for i in items if isinstance(i, slice) for b in (i.start, i.stop, i.step)):
        return None
    if any(isinstance(i, (fx.Node, list, torch.Tensor)) for i in items):
        return None
    n_ellipsis = sum(i is Ellipsis for i in items)
    consuming = sum(1 for i in items if not _new_axis(i) and i is not Ellipsis)
    if n_ellipsis > 1 or consuming > ndim:
        return None
    expanded: List[Any] = []
    for i in items:
        expanded += [slice(None)] * (ndim - consuming) if i is Ellipsis else [i]
    if not n_ellipsis:
        expanded += [slice(None)] * (ndim - consuming)
    if not expanded or _new_axis(expanded[0]):
        return None
    return expanded


def normalize_index(index: Any, ndim: int) -> Optional[Tuple[List[Any], bool]]:
    """One entry per input dim of a basic index (see :func:`expand_index`), and whether a
    new axis lands after the last dim."""
    expanded = expand_index(index, ndim)
    if expanded is None:
        return None
    return [i for i in expanded if not _new_axis(i)], _new_axis(expanded[-1])


def column_index(index: Any, ndim: int, width: int) -> Optional[Tuple[Tuple[Any, ...], Any]]:
    """``(prefix, last)`` for a basic index that keeps every row and whose last entry indexes the
    last input dim (of size ``width``) with a non-empty step-1 slice or an int: ``prefix`` is the rest of the expanded index
    (new axes included).  Exactly the indices whose column segments the rule keeps and the
    lowering (:mod:`mari_fx.lowering.ops.pieces`) applies piece by piece, with ``last`` shifted per piece.

    Example:
        >>> from mari_fx.analysis.rules import column_index
        >>> column_index((Ellipsis, None, slice(0, 4)), 2, 12)
        ((slice(None, None, None), None), slice(0, 4, None))
        >>> column_index((slice(None), True), 2, 12)         # x[:, True] adds an axis, like None
        ((slice(None, None, None), True), slice(None, None, None))
        >>> column_index((slice(None), slice(None), None), 2, 12) is None   # a trailing new axis
        True
    """
    expanded = expand_index(index, ndim)
    if expanded is None or expanded[0] != slice(None):
        return None
    last = expanded[-1]
    if isinstance(last, slice) and last.step in (None, 1) and len(range(*last.indices(width))) > 0:
        return tuple(expanded[:-1]), last
    if isinstance(last, int) and not isinstance(last, bool):
        return tuple(expanded[:-1]), last
    return None  # other steps, or no columns at all (an empty [rows, 0] result)

# torch.export (ATen) spellings of the same ops
register(aten.view.default, aten.reshape.default, aten._unsafe_view.default)(_reshape)


register(aten.expand.default)(_expand)


register(aten.repeat.default)(_repeat)


register(aten.flatten.using_ints)(_flatten)


register(aten.unflatten.int)(_unflatten)


register(aten.unsqueeze.default)(_unsqueeze)


register(aten.squeeze.dim, aten.squeeze.dims)(_squeeze)


register(aten.squeeze.default)(constant_if_constant(refuse_with("squeeze() without a dim may drop the batch")))


register(aten.permute.default)(_permute)


register(aten.transpose.int)(_transpose)


register(aten.t.default)(constant_if_constant(refuse_with("t() swaps the batch dimension")))


@register(aten.sym_size.int)
def _sym_size(ctx: RuleContext) -> Tag:
    if ctx.norm_dim(ctx.arg(1), ctx.ndim(ctx.arg(0))) != 0:
        return CONST
    return _size_tag(ctx)


ALL_ROWS = 2 ** 62  # torch.export writes x[:, a:b] as slice(x, 0, 0, INT64_MAX) then slice(.., 1, a, b)


def aten_slice_args(ctx_or_node: Any):
    """``(x, dim, start, stop, step)`` of an ``aten.slice.Tensor`` node, with defaults."""
    node = ctx_or_node.node if isinstance(ctx_or_node, RuleContext) else ctx_or_node
    args = list(node.args) + [None] * (5 - len(node.args))
    x, dim, start, stop, step = args[:5]
    kw = node.kwargs
    return (x, kw.get("dim", dim if dim is not None else 0), kw.get("start", start),
            kw.get("end", stop), kw.get("step", step if step is not None else 1))


@register(aten.slice.Tensor)
def _aten_slice(ctx: RuleContext) -> Tag:
    x, dim, start, stop, step = aten_slice_args(ctx)
    value, tag = ctx.value(x), ctx.tag(x)
    if ctx.input_side() == Side.CONST:
        return ctx.result(Side.CONST)
    if not isinstance(value, TensorInfo) or any(isinstance(a, fx.Node) for a in (start, stop, step)):
        return ctx.refuse("slice with batch-dependent bounds")
    d = ctx.norm_dim(dim, value.ndim)
    if d == 0:
        if (start or 0) == 0 and (stop is None or stop >= ALL_ROWS) and step == 1:
            return tag  # x[:] keeps every row
        return ctx.refuse("slicing selects rows of the batch dimension")
    if d == value.ndim - 1 and isinstance(tag, TensorTag) and tag.is_segmented and step == 1:
        lo, hi, _ = slice(start, stop).indices(value.shape[-1])
        if hi > lo:  # an empty [rows, 0] slice keeps no segments (nor does its lowering)
            return tag.slice(lo, hi)
    return ctx.rowwise()


@register(aten.select.int)
def _aten_select(ctx: RuleContext) -> Tag:
    x, dim, index = ctx.arg(0, "input"), ctx.arg(1, "dim"), ctx.arg(2, "index")
    value, tag = ctx.value(x), ctx.tag(x)
    if ctx.input_side() == Side.CONST:
        return ctx.result(Side.CONST)
    d = ctx.norm_dim(dim, value.ndim if isinstance(value, TensorInfo) else None)
    if d in (0, None):
        return ctx.refuse("select() picks one row of the batch dimension")
    if d == value.ndim - 1 and isinstance(tag, TensorTag) and tag.is_segmented and isinstance(index, int):
        col = index % value.shape[-1]
        return ctx.result(tag.slice(col, col + 1).side)
    return ctx.rowwise()
