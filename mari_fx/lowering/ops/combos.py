"""Linear combinations: ``a + b``, ``a - b``, ``-a``, ``c * a`` of U- and N-row tensors kept as
:class:`~mari_fx.lowering.Combo` terms (sums over non-batch dims distributed), so a Linear over them
folds coefficients into its weight blocks.

Only floating-point arithmetic is rewritten: integer and bool ops (hashed id crosses, masks) are
computed exactly as the model writes them, in their own dtype.  Products are never expanded:
``(u - i) * (u - i)`` as ``u*u - 2*u*i + i*i`` cancels catastrophically in fp32 when ``u ~ i``,
and the contract is fp32 round-off of what the model computes."""
from __future__ import annotations

import operator
from typing import Any, List, Optional, Tuple

import torch
import torch.fx as fx

from ... import targets
from ...analysis.example_prop import VALUE_KEY, TensorInfo
from ..context import LAZY_BUILDERS, LoweringContext
from ..values import N, U, Combo, Rows

_LINEAR_OPS = {**{t: (1.0, 1.0) for t in targets.ADD}, **{t: (1.0, -1.0) for t in targets.SUB}}
_NEG_OPS, _MUL_OPS, _DIV_OPS, _SUM_OPS = targets.NEG, targets.MUL, targets.DIV, targets.SUM


def _as_combo(lw: LoweringContext, node: fx.Node) -> Optional[Combo]:
    return _linear_combo(lw, node) or _reduced_combo(lw, node)


def _floating(*nodes: Any) -> bool:
    """Every node is a floating-point tensor: the only values whose arithmetic may be regrouped."""
    return all(isinstance(n, fx.Node) and isinstance(n.meta.get(VALUE_KEY), TensorInfo)
               and n.meta[VALUE_KEY].dtype.is_floating_point for n in nodes)


def _reduced_combo(lw: LoweringContext, node: fx.Node) -> Optional[Combo]:
    """``combo.sum(dim)`` over a non-batch dim is the combination of the terms' sums."""
    if node.target not in _SUM_OPS:
        return None
    args = lw.args(node)
    src = args.get("input") if args is not None else None
    if not isinstance(src, fx.Node) or not isinstance(lw.value(src), Combo) or not _floating(node, src):
        return None
    if args.get("keepdim") or args.get("dtype") is not None:
        return None  # the terms' sums would need the same: computed as written
    info, dims = src.meta.get(VALUE_KEY), args.get("dim")
    dims = list(dims) if isinstance(dims, (list, tuple)) else [dims]
    if info is None or not dims or any(not isinstance(d, int) or d % info.ndim == 0 for d in dims):
        return None
    return Combo(node, tuple((c, lw.emit_on(node, src, t.node, t.level)) for c, t in lw.value(src).terms))


def _linear_combo(lw: LoweringContext, node: fx.Node) -> Optional[Combo]:
    """``a + b``, ``a - b``, ``-a``, ``a * 2``, ``a / 2`` of same-shaped U/N-row tensors, as a Combo."""
    t = node.target
    if node.op not in ("call_function", "call_method") or not (
            t in _LINEAR_OPS or t in _NEG_OPS or t in _MUL_OPS or t in _DIV_OPS):
        return None
    named = lw.args(node)  # by name: the same reading as the rules
    if named is None or named.get("alpha", 1) != 1 or named.get("rounding_mode") is not None or named.get("out") is not None:
        return None
    a, b = named.get("input"), named.get("other")
    if t in _LINEAR_OPS:
        ca, cb = _LINEAR_OPS[t]
        operands = [(ca, a), (cb, b)]
    elif t in _NEG_OPS:
        operands = [(-1.0, a)]
    elif t in _MUL_OPS:
        scalar = [x for x in (a, b) if isinstance(x, (int, float)) and not isinstance(x, bool)]
        tensors = [x for x in (a, b) if isinstance(x, fx.Node)]
        if len(scalar) != 1 or len(tensors) != 1:
            return None
        operands = [(float(scalar[0]), tensors[0])]
    else:
        if not (isinstance(b, (int, float)) and not isinstance(b, bool) and b != 0):
            return None
        operands = [(1.0 / b, a)]
    out_info = node.meta.get(VALUE_KEY)
    if not _floating(node, *(a for _, a in operands)):
        return None  # integer / bool arithmetic is computed as written (exact, in its dtype)
    terms: List[Tuple[float, Rows]] = []
    for coeff, a in operands:
        if not isinstance(a, fx.Node) or a.meta.get(VALUE_KEY) != out_info:
            return None  # broadcasting or a scalar term: not a plain linear combination
        v = lw.value(a)
        if isinstance(v, Combo):
            terms += [(coeff * c, r) for c, r in v.terms]
        elif isinstance(v, Rows) and v.level in (U, N):
            terms.append((coeff, v))
        else:
            return None
    levels = {r.level for _, r in terms}
    return Combo(node, tuple(terms)) if U in levels else None


LAZY_BUILDERS.add("combinations", _as_combo, priority=20)  # before the field blocks
