"""Capture stage: turn a model into a torch.fx GraphModule (never mutating it)."""
from __future__ import annotations

import copy
from typing import Iterable, List, Optional, Type

import torch.fx as fx
import torch.nn as nn

from .errors import TraceError

_HINTS = (
    ("cannot be used as inputs to control flow",
     "data-dependent Python control flow (if/for on a tensor value); move it out of forward or pass "
     "the value through concrete_args"),
    ("object of type 'Proxy' has no len()", "Python len() on a traced value; use x.size(0) / x.shape[0]"),
    ("is not installed as a submodule", "a module called without being registered; assign it as an attribute "
     "(self.layer = ...) in __init__"),
    ("Proxy object cannot be iterated", "iteration over a traced value (e.g. `for row in x`, or unpacking); "
     "use torch.unbind / split with a constant size"),
)


LEAF_MODULES: List[Type[nn.Module]] = []  # always kept as calls (extensions add theirs)
SHARED_MODULES: List[Type[nn.Module]] = []  # shared, not deep-copied, by copies of a model


def register_leaf_module(*classes: Type[nn.Module], share: bool = False) -> None:
    """Always trace instances of ``classes`` as single calls; with ``share=True`` copies
    mari_fx makes of a model (capture, lower) share these modules instead of deep-copying
    them (embedding tables, process groups)."""
    LEAF_MODULES.extend(classes)
    if share:
        SHARED_MODULES.extend(classes)


def copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)``, sharing the submodules of :data:`SHARED_MODULES` classes."""
    shared = tuple(SHARED_MODULES)
    memo = {id(m): m for m in model.modules() if shared and isinstance(m, shared)}
    return copy.deepcopy(model, memo)


class MariTracer(fx.Tracer):
    """``torch.fx.Tracer`` whose leaves are torch.nn modules plus ``leaf_modules`` and
    the classes of :func:`register_leaf_module`."""

    def __init__(self, leaf_modules: Iterable[Type[nn.Module]] = ()):
        super().__init__()
        self.extra_leaves = tuple(leaf_modules) + tuple(LEAF_MODULES)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self.extra_leaves) or super().is_leaf_module(m, module_qualified_name)


def capture(model: nn.Module, leaf_modules: Optional[Iterable[Type[nn.Module]]] = None) -> fx.GraphModule:
    """Trace ``model`` with :class:`MariTracer` (a GraphModule is deep-copied instead).

    Example:
        >>> import torch
        >>> gm = capture(torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU()))
        >>> [n.op for n in gm.graph.nodes]
        ['placeholder', 'call_module', 'call_module', 'output']
    """
    if isinstance(model, fx.GraphModule):
        return copy_model(model)
    if not isinstance(model, nn.Module):
        raise TraceError(f"expected an nn.Module or fx.GraphModule, got {type(model).__name__}")
    tracer = MariTracer(leaf_modules or ())
    try:
        graph = tracer.trace(model)
    except Exception as e:  # torch.fx raises many types; all mean "cannot trace"
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        why = next((hint for key, hint in _HINTS if key in str(e)), None)
        raise TraceError(
            f"torch.fx cannot trace {type(model).__name__}: {msg}"
            + (f"\n  cause: {why}" if why else "")
        ) from e
    return fx.GraphModule(tracer.root, graph, type(model).__name__)
