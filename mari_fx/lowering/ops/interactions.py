"""Lowering of feature-interaction layers (FM, bi-interaction, DLRM dot interactions).

Interaction layers stack user and item field embeddings along a field axis,
``e = cat([user_fields, item_fields], dim=1)`` ([B, F, K]).  The tags call ``e``
MIXED; the lowering keeps it as :class:`~mari_fx.lowering.Blocks` so that

* elementwise ops (``e * e``) run per block, user blocks at U rows;
* ``e.sum(1)`` becomes the combination ``sum(user blocks) + sum(item blocks)``, and
  products of such sums expand so that user x user terms run at U rows (FM);
* ``bmm(e, e.transpose(1, 2))`` is computed block by block: the user x user block at
  U rows, user x item and item x item blocks at N rows (DLRM).

Anything else reading a block value gets it concatenated at N rows, as in the pair model.
"""
from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.fx as fx

from ...analysis import rules
from ... import targets
from ...analysis.example_prop import VALUE_KEY, TensorInfo
from ..context import LAZY_BUILDERS, LoweringContext, register_lowering
from ..values import N, U, Blocks, Combo, Lazy, Pieces, Rows, Value
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


LAZY_BUILDERS.add("field_blocks", _as_blocks, priority=10)
register_lowering(*targets.BMM, *targets.MATMUL, priority=10)(_lower_gram)  # before the column-piece split
