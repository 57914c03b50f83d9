"""Lowering of feature-interaction layers (FM, bi-interaction, DLRM dot interactions).

Interaction layers stack user and item field embeddings along a field axis,
``e = cat([user_fields, item_fields], dim=1)`` ([B, F, K]).  The tags call ``e``
MIXED; the lowering keeps it as :class:`~mari_fx.lowering.Blocks` so that

* elementwise ops (``e * e``) run per block, user blocks at U rows;
* ``e.sum(1)`` becomes the combination ``sum(user blocks) + sum(item blocks)``, and
  products of such sums expand so that user x user terms run at U rows (FM);
* ``bmm(e, e.transpose(1, 2))`` is computed block by block: the user x user block at
  U rows, user x item and item x item blocks at N rows (DLRM);
* ``bmm(X, X.transpose(1, 2))[:, I, J]`` (pairs picked by constant indices, DLRM's triu
  gather, PNN) for any field stack ``X`` whose fields the element map of
  :mod:`mari_fx.analysis.elements` calls user-only or not: the user x user pairs come from the
  Gram matrix of the user fields at U rows, every other pair from the rows of the
  non-user fields, ``bmm(X[:, R], X.transpose(1, 2))`` at N rows (the Gram matrix is
  symmetric), and the result stays column pieces so the Linear over it splits.

Anything else reading a block value gets it concatenated at N rows, as in the pair model.
"""
from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.fx as fx

from ... import targets
from ...analysis import rules
from ...analysis.example_prop import VALUE_KEY, TensorInfo
from ..context import LAZY_BUILDERS, LoweringContext, register_lowering
from ..values import C, N, U, Blocks, Combo, Lazy, Pieces, Rows, Value
from ...analysis.tags import ROWS_KEY

_ELEMENTWISE = targets.ELEMENTWISE
aten = torch.ops.aten
_TRANSPOSES = targets.TRANSPOSE + targets.PERMUTE


def _ndim(a: Any) -> Optional[int]:
    info = a.meta.get(VALUE_KEY) if isinstance(a, fx.Node) else None
    return info.ndim if isinstance(info, TensorInfo) else None


def _as_blocks(lw: LoweringContext, node: fx.Node) -> Optional[Value]:
    if node.op not in ("call_function", "call_method"):
        return None
    t = node.target
    if t in targets.CAT:
        return _cat_blocks(lw, node)
    if t in _ELEMENTWISE:
        return _elementwise_blocks(lw, node)
    if t in targets.SUM:
        return _sum_blocks(lw, node)
    if t in _TRANSPOSES and _is_blocks(lw, lw.arg(node, 0, "input", None)):
        return Lazy(node)  # wait: a block product may not need it concatenated
    if t in targets.FLATTEN:
        return _flatten_blocks(lw, node)
    return None


def _is_blocks(lw: LoweringContext, a: Any) -> bool:
    return isinstance(a, fx.Node) and isinstance(lw.value(a), Blocks)


def _flatten_blocks(lw: LoweringContext, node: fx.Node) -> Optional[Pieces]:
    """``e.flatten(1)`` of [B, F, K] field blocks is column pieces (a Linear over it splits)."""
    src = lw.arg(node, 0, "input")
    v = lw.value(src) if isinstance(src, fx.Node) else None
    start, end = lw.arg(node, 1, "start_dim", 0), lw.arg(node, 2, "end_dim", -1)
    if not (isinstance(v, Blocks) and v.dim == 1 and _ndim(src) == 3 and start == 1 and end in (-1, 2)):
        return None
    k = src.meta[VALUE_KEY].shape[2]
    parts = []
    for level, size, rows in v.parts:
        new = lw.graph.call_method("flatten", (rows.node, 1))
        new.meta[ROWS_KEY] = level
        parts.append((level, size * k, Rows(new, level)))
    return Pieces(tuple(parts))


def _cat_blocks(lw: LoweringContext, node: fx.Node) -> Optional[Blocks]:
    tensors = lw.arg(node, 0, "tensors")
    if not isinstance(tensors, (list, tuple)):  # torch.cat(x.split(...)): a tuple-valued node
        return None
    ndim = _ndim(tensors[0]) if tensors else None
    dim = lw.arg(node, 1, "dim", 0)
    if ndim is None or not isinstance(dim, int) or dim % ndim in (0, ndim - 1):
        return None
    values = [lw.value(x) for x in tensors]
    if not all(isinstance(v, Rows) and v.level in (U, N) for v in values):
        return None
    if {v.level for v in values} != {U, N}:
        return None
    return Blocks(node, dim % ndim, tuple((v.level, x.meta[VALUE_KEY].shape[dim], v) for v, x in zip(values, tensors)))


def _elementwise_blocks(lw: LoweringContext, node: fx.Node) -> Optional[Blocks]:
    blocks = {id(lw.value(a)) for a in node.all_input_nodes if isinstance(lw.value(a), Blocks)}
    if len(blocks) != 1 or node.kwargs:
        return None
    src = next(lw.value(a) for a in node.all_input_nodes if isinstance(lw.value(a), Blocks))
    if any(not isinstance(a, (fx.Node, int, float)) or (isinstance(a, fx.Node) and lw.value(a) is not src)
           for a in node.args):
        return None  # every operand is the block value itself or a Python scalar
    if node.meta.get(VALUE_KEY) != src.orig.meta.get(VALUE_KEY):
        return None
    (orig,) = node.all_input_nodes  # e * e reads one node, maybe twice
    parts = [(level, size, lw.emit_on(node, orig, rows.node, level)) for level, size, rows in src.parts]
    return Blocks(node, src.dim, tuple(parts))


def _sum_blocks(lw: LoweringContext, node: fx.Node) -> Optional[Combo]:
    args = lw.args(node)
    src = args.get("input") if args is not None else None
    v = lw.value(src) if isinstance(src, fx.Node) else None
    if not isinstance(v, Blocks):
        return None
    dim = args.get("dim")
    if isinstance(dim, (list, tuple)) and len(dim) == 1:
        dim = dim[0]
    if not isinstance(dim, int) or dim % _ndim(src) != v.dim or args.get("keepdim") or args.get("dtype") is not None:
        return None
    return Combo(node, tuple((1.0, lw.emit_on(node, src, rows.node, level)) for level, _, rows in v.parts))


def _is_transpose_of(lw: LoweringContext, b: fx.Node, a: fx.Node) -> bool:
    if not (isinstance(b, fx.Node) and b.op in ("call_function", "call_method") and b.target in _TRANSPOSES
            and lw.arg(b, 0, "input") is a):
        return False
    ndim = _ndim(a)
    if b.target in targets.TRANSPOSE:
        dims = (lw.arg(b, 1, "dim0"), lw.arg(b, 2, "dim1"))
        return ndim == 3 and all(isinstance(d, int) for d in dims) and {d % 3 for d in dims} == {1, 2}
    if b.target in targets.PERMUTE:
        dims = b.args[1] if len(b.args) == 2 and isinstance(b.args[1], (list, tuple)) else b.args[1:]
        return ndim == 3 and list(dims) == [0, 2, 1]
    return False


def _lower_gram(lw: LoweringContext, node: fx.Node, _module) -> Optional[Value]:
    """``bmm(e, e.transpose(1, 2))`` block by block; the user x user block at U rows."""
    args = lw.args(node)
    if args is None or set(args) - {"input", "other", "mat2", "out"} or args.get("out") is not None:
        return None
    a, b = args.get("input"), args.get("mat2", args.get("other"))
    va = lw.value(a) if isinstance(a, fx.Node) else None
    if not (isinstance(va, Blocks) and va.dim == 1 and _ndim(a) == 3 and _is_transpose_of(lw, b, a)):
        return None
    parts = va.parts
    grid = {}
    for i, (li, _, ri) in enumerate(parts):
        for j, (lj, _, rj) in enumerate(parts):
            if j < i:
                continue
            level = U if li == U and lj == U else N
            x, y = (ri.node, rj.node) if level == U else (lw.materialize(ri), lw.materialize(rj))
            block = lw.graph.call_function(torch.bmm, (x, lw.graph.call_method("transpose", (y, 1, 2))))
            block.meta[ROWS_KEY] = level
            grid[i, j] = lw.materialize(Rows(block, level))
    rows = []
    for i in range(len(parts)):
        row = [grid[i, j] if j >= i else lw.graph.call_method("transpose", (grid[j, i], 1, 2))
               for j in range(len(parts))]
        rows.append(lw.graph.call_function(torch.cat, (row, 2)))
    out = lw.graph.call_function(torch.cat, (rows, 1))
    lw.port_meta(node, out)
    out.meta[ROWS_KEY] = N
    return Rows(out, N, node)


def _lower_gram_gather(lw: LoweringContext, node: fx.Node, _module) -> Optional[Value]:
    """``bmm(X, X.transpose(1, 2))[:, I, J]`` with constant ``I``, ``J``: user x user pairs at U
    rows off the user fields' Gram matrix, the rest at N rows off the non-user fields' rows."""
    from ...analysis.elements import element_map

    if not lw.options.split_matmuls:
        return None  # the one-shot baseline: user-only subgraphs hoisted, no matmul split
    gram, pairs = _gram_gather_args(lw, node)
    if gram is None:
        return None
    x = gram.args[0]
    m = element_map(x)
    if not isinstance(m, torch.Tensor) or m.ndim != 2:
        return None
    user = ((m & 2) == 0).all(1).tolist()  # fields whose every element is USER or CONST
    if all(user) or not any(user):
        return None  # a USER or an all-item stack: the default lowering is as good
    if not all(_gram_gather_args(lw, g)[0] is gram for u in gram.users for g in _past_batch_slices(u)):
        return None  # the full Gram matrix is needed anyway
    fields = len(user)
    rest = [f for f in range(fields) if not user[f]]
    ufields = [f for f in range(fields) if user[f]]
    pos_r, pos_u = {f: k for k, f in enumerate(rest)}, {f: k for k, f in enumerate(ufields)}
    levels, item_at, user_at = [], ([], []), ([], [])
    for i, j in pairs:
        if user[i] and user[j]:
            levels.append(U)
            user_at[0].append(pos_u[i]), user_at[1].append(pos_u[j])
        else:
            levels.append(N)
            r, c = (i, j) if not user[i] else (j, i)  # G[i, j] == G[j, i]: read it off a non-user row
            item_at[0].append(pos_r[r]), item_at[1].append(c)
    t_user = None
    if U in levels:
        from .field_split import _NoSplit, user_cone

        try:
            xu = user_cone(lw).value(x)
        except _NoSplit:
            return None
        t_user = _pick(lw, _emit_gram(lw, _rows(lw, xu, ufields, fields, U, "gram_user_fields"), U), user_at, U,
                       "gram_user_pairs")
        lw.mark_user_elements(node)
    t_item = None
    if N in levels:
        xn = lw.materialize(lw.value(x))
        t_item = _pick(lw, _emit_gram(lw, _rows(lw, xn, rest, fields, N, "gram_item_fields"), N, xn), item_at, N,
                       "gram_item_pairs")
    parts, pos = [], {U: 0, N: 0}
    for k, level in enumerate(levels):
        if parts and parts[-1][0] == level:
            parts[-1][1] += 1
        else:
            parts.append([level, 1, pos[level]])
        pos[level] += 1
    out = []
    for level, width, start in parts:
        src = t_user if level == U else t_item
        if width == pos[level]:
            out.append((level, width, Rows(src, level)))
            continue
        sl = lw.graph.call_function(operator.getitem, (src, (Ellipsis, slice(start, start + width))))
        sl.meta[ROWS_KEY] = level
        out.append((level, width, Rows(sl, level)))
    if len(out) == 1:
        return out[0][2]
    return Pieces(tuple(out))


aten_index = aten.index.Tensor
_GATHERS = (operator.getitem, aten_index)
_GRAMS = targets.BMM + targets.MATMUL


def _gram_gather_args(lw: LoweringContext, node: fx.Node):
    """``(gram node, [(i, j), ...])`` if ``node`` picks pairs of a Gram matrix by constant indices."""
    from ...analysis.elements import _Consts

    if len(node.args) != 2 or node.kwargs or node.op != "call_function" or node.target not in _GATHERS:
        return None, None
    gram, index = node.args
    if _is_batch_slice(gram):
        gram = gram.args[0]  # torch.export writes g[:, I, J] as index(slice(g, 0, 0, INT64_MAX), [None, I, J])
    if not (isinstance(gram, fx.Node) and gram.op in ("call_function", "call_method") and len(gram.args) == 2
            and not gram.kwargs and gram.target in _GRAMS):
        return None, None
    a, b = gram.args
    if not (isinstance(a, fx.Node) and _ndim(a) == 3 and _is_transpose_of(lw, b, a)):
        return None, None
    if node.target is operator.getitem:
        ok = isinstance(index, tuple) and len(index) == 3 and index[0] == slice(None)
    else:
        ok = isinstance(index, (list, tuple)) and len(index) == 3 and index[0] is None
    if not ok or not all(isinstance(t, fx.Node) for t in index[1:]):
        return None, None
    consts = lw.state("interactions.consts", lambda: _Consts(lw.gm))  # constant index tensors, read once
    try:
        iv, jv = (consts.get(t) for t in index[1:])
    except Exception:
        return None, None
    if not (isinstance(iv, torch.Tensor) and isinstance(jv, torch.Tensor) and iv.dim() == jv.dim() == 1
            and iv.shape == jv.shape and not iv.is_floating_point() and not jv.is_floating_point()
            and iv.dtype != torch.bool and jv.dtype != torch.bool):
        return None, None
    fields = a.meta[VALUE_KEY].shape[1]
    if iv.numel() and (min(iv.min(), jv.min()) < -fields or max(iv.max(), jv.max()) >= fields):
        return None, None
    return gram, [(int(i) % fields, int(j) % fields) for i, j in zip(iv.tolist(), jv.tolist())]


def _is_batch_slice(n: Any) -> bool:
    """``aten.slice(x, 0, 0, INT64_MAX)``: all rows, the value itself."""
    if not (isinstance(n, fx.Node) and n.op == "call_function" and n.target is aten.slice.Tensor):
        return False
    _, dim, start, stop, step = rules.aten_slice_args(n)
    return dim == 0 and start in (None, 0) and (stop is None or stop >= rules.ALL_ROWS) and step == 1


def _past_batch_slices(n: fx.Node):
    """``n`` itself, or the readers of an all-rows slice ``n``."""
    return list(n.users) if _is_batch_slice(n) else [n]


def _buffer(lw: LoweringContext, name: str, values) -> fx.Node:
    attr, k = name, 0
    while hasattr(lw.gm, attr):
        k += 1
        attr = f"{name}{k}"
    lw.gm.register_buffer(attr, torch.tensor(values, dtype=torch.int64))
    out = lw.graph.get_attr(attr)
    out.meta[ROWS_KEY] = C
    return out


def _rows(lw: LoweringContext, x: Any, fields, total: int, level: str, name: str) -> Any:
    """``x[:, fields]`` (a slice when they are contiguous)."""
    if fields == list(range(fields[0], fields[-1] + 1)):
        if len(fields) == total:
            return x
        out = lw.graph.call_function(operator.getitem, (x, (slice(None), slice(fields[0], fields[-1] + 1))))
    else:
        out = lw.graph.call_function(torch.index_select, (x, 1, _buffer(lw, name, fields)))
    out.meta[ROWS_KEY] = level
    return out


def _emit_gram(lw: LoweringContext, rows: Any, level: str, full: Any = None) -> Any:
    """``bmm(rows, full.transpose(1, 2))`` (``full`` defaults to ``rows``)."""
    t = lw.graph.call_method("transpose", (rows if full is None else full, 1, 2))
    out = lw.graph.call_function(torch.bmm, (rows, t))
    t.meta[ROWS_KEY] = out.meta[ROWS_KEY] = level
    return out


def _pick(lw: LoweringContext, g: Any, at, level: str, name: str) -> Any:
    out = lw.graph.call_function(operator.getitem, (g, (slice(None), _buffer(lw, f"{name}_i", at[0]),
                                                       _buffer(lw, f"{name}_j", at[1]))))
    out.meta[ROWS_KEY] = level
    return out


LAZY_BUILDERS.add("field_blocks", _as_blocks, priority=10)
register_lowering(operator.getitem, aten.index.Tensor, priority=10)(_lower_gram_gather)  # before column pieces
register_lowering(*targets.BMM, *targets.MATMUL, priority=10)(_lower_gram)  # before the column-piece split
