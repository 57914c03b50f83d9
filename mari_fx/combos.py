"""Linear combinations: ``a + b``, ``a - b``, ``-a``, ``c * a`` of U- and N-row tensors kept as
:class:`~mari_fx.lower.Combo` terms (sums over non-batch dims distributed), so a Linear over them
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

from .example_prop import VALUE_KEY, TensorInfo
from .lower import LAZY_BUILDERS, N, U, Combo, Lowerer, Rows

_LINEAR_OPS = {
    operator.add: (1.0, 1.0), torch.add: (1.0, 1.0), "add": (1.0, 1.0), "__add__": (1.0, 1.0),
    torch.ops.aten.add.Tensor: (1.0, 1.0),
    operator.sub: (1.0, -1.0), torch.sub: (1.0, -1.0), "sub": (1.0, -1.0), "__sub__": (1.0, -1.0),
    torch.ops.aten.sub.Tensor: (1.0, -1.0),
}
_NEG_OPS = (operator.neg, torch.neg, "neg", "__neg__", torch.ops.aten.neg.default)
_MUL_OPS = (operator.mul, torch.mul, "mul", "__mul__", "__rmul__", torch.ops.aten.mul.Tensor)
_DIV_OPS = (operator.truediv, torch.div, "div", "__truediv__", torch.ops.aten.div.Tensor)
_SUM_OPS = (torch.sum, "sum", torch.ops.aten.sum.dim_IntList)


def _as_combo(lw: Lowerer, node: fx.Node) -> Optional[Combo]:
    return _linear_combo(lw, node) or _reduced_combo(lw, node)


def _floating(*nodes: Any) -> bool:
    """Every node is a floating-point tensor: the only values whose arithmetic may be regrouped."""
    return all(isinstance(n, fx.Node) and isinstance(n.meta.get(VALUE_KEY), TensorInfo)
               and n.meta[VALUE_KEY].dtype.is_floating_point for n in nodes)


def _reduced_combo(lw: Lowerer, node: fx.Node) -> Optional[Combo]:
    """``combo.sum(dim)`` over a non-batch dim is the combination of the terms' sums."""
    if node.target not in _SUM_OPS or not node.args or not isinstance(lw._value(node.args[0]), Combo):
        return None
    if not _floating(node, node.args[0]):
        return None
    src, info = node.args[0], node.args[0].meta.get(VALUE_KEY)
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    dims = list(dims) if isinstance(dims, (list, tuple)) else [dims]
    if info is None or not dims or any(not isinstance(d, int) or d % info.ndim == 0 for d in dims):
        return None
    return Combo(node, tuple((c, lw._emit_on(node, src, t.node, t.level)) for c, t in lw._value(src).terms))


def _linear_combo(lw: Lowerer, node: fx.Node) -> Optional[Combo]:
    """``a + b``, ``a - b``, ``-a``, ``a * 2``, ``a / 2`` of same-shaped U/N-row tensors, as a Combo."""
    if node.op not in ("call_function", "call_method") or node.kwargs:
        return None
    t, args = node.target, node.args
    if t in _LINEAR_OPS and len(args) == 2:
        ca, cb = _LINEAR_OPS[t]
        operands = [(ca, args[0]), (cb, args[1])]
    elif t in _NEG_OPS and len(args) == 1:
        operands = [(-1.0, args[0])]
    elif t in _MUL_OPS and len(args) == 2:
        scalar = [a for a in args if isinstance(a, (int, float)) and not isinstance(a, bool)]
        tensors = [a for a in args if isinstance(a, fx.Node)]
        if len(scalar) != 1 or len(tensors) != 1:
            return None
        operands = [(float(scalar[0]), tensors[0])]
    elif t in _DIV_OPS and len(args) == 2:
        if not (isinstance(args[1], (int, float)) and not isinstance(args[1], bool) and args[1] != 0):
            return None
        operands = [(1.0 / args[1], args[0])]
    else:
        return None
    out_info = node.meta.get(VALUE_KEY)
    if not _floating(node, *(a for _, a in operands)):
        return None  # integer / bool arithmetic is computed as written (exact, in its dtype)
    terms: List[Tuple[float, Rows]] = []
    for coeff, a in operands:
        if not isinstance(a, fx.Node) or a.meta.get(VALUE_KEY) != out_info:
            return None  # broadcasting or a scalar term: not a plain linear combination
        v = lw._value(a)
        if isinstance(v, Combo):
            terms += [(coeff * c, r) for c, r in v.terms]
        elif isinstance(v, Rows) and v.level in (U, N):
            terms.append((coeff, v))
        else:
            return None
    levels = {r.level for _, r in terms}
    return Combo(node, tuple(terms)) if U in levels else None


LAZY_BUILDERS.append(_as_combo)
