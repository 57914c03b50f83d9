"""An op's arguments by parameter name, whatever mix of positional and keyword arguments the
model used: ``h.norm(2, 0)``, ``torch.norm(h, 2, 0)`` and ``torch.norm(h, p=2, dim=0)`` all read
as ``{"input": h, "p": 2, "dim": 0, "keepdim": False, ...}``.

Rules (:mod:`mari_fx.analysis.rules`) and lowerings read arguments through :func:`bind`, so the two always
agree on which argument is which.  Sources, in order:

* ``call_module``: the module's ``forward`` signature;
* explicit signatures in :data:`SIGNATURES` (operators, and Tensor methods whose torch function
  does not take ``self`` first, e.g. ``x.where(c, y) == torch.where(c, x, y)``);
* ``torch.fx.operator_schemas.normalize_function`` for torch functions, ``F.*`` and aten
  overloads, with argument types taken from the example run to pick an overload
  (``std(x, 1)`` binds ``dim``, ``std(x, True)`` binds ``unbiased``); a Tensor method is read as
  the torch function of the same name with ``self`` first.

Defaults are filled in.  ``None`` where no signature is known: callers must then be conservative.
"""
from __future__ import annotations

import inspect
import operator
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.fx as fx
from torch.fx.operator_schemas import normalize_function

from .example_prop import VALUE_KEY, TensorInfo

Target = Any


def _sig(*names: str, **defaults: Any) -> inspect.Signature:
    params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]
    params += [inspect.Parameter(k, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=v) for k, v in defaults.items()]
    return inspect.Signature(params)


_BINARY = _sig("input", "other")
# Targets normalize_function cannot read (operators) or reads wrongly (methods whose torch
# function takes another argument first).
SIGNATURES: Dict[Target, inspect.Signature] = {
    **{op: _BINARY for op in (
        operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.pow,
        operator.mod, operator.matmul, operator.eq, operator.ne, operator.lt, operator.le, operator.gt,
        operator.ge, operator.and_, operator.or_)},
    **{m: _BINARY for m in (
        "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__",
        "__matmul__", "type_as")},
    operator.neg: _sig("input"), operator.pos: _sig("input"),
    "where": _sig("input", "condition", "other"),
    "size": _sig("input", dim=None),
}


def bind(node: fx.Node, module: Optional[torch.nn.Module] = None) -> Optional[Dict[str, Any]]:
    """``node``'s arguments as ``{parameter name: value}`` with defaults filled in, or None when
    its signature is unknown.  ``module`` is the called module for ``call_module`` nodes.

    Example:
        >>> import torch, torch.fx as fx
        >>> class M(torch.nn.Module):
        ...     def forward(self, h):
        ...         return h.norm(2, 0), h.narrow(1, start=0, length=2)
        >>> gm = fx.symbolic_trace(M())
        >>> from mari_fx.analysis.example_prop import ExampleProp
        >>> _ = ExampleProp(gm).run(torch.ones(3, 4))   # example types pick overloads
        >>> norm, narrow = [n for n in gm.graph.nodes if n.op == "call_method"]
        >>> {k: bind(norm)[k] for k in ("p", "dim")}
        {'p': 2, 'dim': 0}
        >>> {k: bind(narrow)[k] for k in ("dim", "start", "length")}
        {'dim': 1, 'start': 0, 'length': 2}
    """
    args, kwargs = tuple(node.args), dict(node.kwargs)
    if node.op == "call_module":
        if module is None:
            return None
        try:
            return _bind_signature(inspect.signature(module.forward), args, kwargs)
        except (TypeError, ValueError):
            return None
    if node.op not in ("call_function", "call_method"):
        return None
    sig = SIGNATURES.get(node.target)
    if sig is not None:
        return _bind_signature(sig, args, kwargs)
    target: Optional[Callable] = node.target if node.op == "call_function" else getattr(torch, node.target, None)
    if not callable(target):
        return None
    try:
        found = normalize_function(target, args, kwargs, arg_types=tuple(_type_of(a) for a in args),
                                   kwarg_types={k: _type_of(v) for k, v in kwargs.items()},
                                   normalize_to_only_use_kwargs=True)
    except Exception:  # ambiguous or unsupported schemas: unknown
        found = None
    return dict(found.kwargs) if found is not None else None


def _bind_signature(sig: inspect.Signature, args: tuple, kwargs: dict) -> Optional[Dict[str, Any]]:
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    out: Dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        else:  # *args stays a tuple under its own name
            out[name] = value
    return out


def _type_of(a: Any) -> Any:
    """The Python type of an argument (nodes: of their example value), to pick an overload."""
    v = a.meta.get(VALUE_KEY, a) if isinstance(a, fx.Node) else a
    if isinstance(v, (TensorInfo, torch.Tensor)):
        return torch.Tensor
    if isinstance(v, fx.Node):
        return object
    if isinstance(v, torch.Size):
        return List[int]
    if isinstance(v, (list, tuple)):
        kinds = {_type_of(x) for x in v}
        return List[kinds.pop()] if len(kinds) == 1 and inspect.isclass(next(iter(kinds), None)) else object
    return type(v)


def nodes_in(value: Any) -> List[fx.Node]:
    """The nodes inside an argument value (a node, or lists / tuples / dicts of them)."""
    found: List[fx.Node] = []
    fx.node.map_arg(value, found.append)
    return found
