"""Plain attribute paths to the submodules a transformed module's forward calls.

fx writes a call of submodule ``user_emb.0`` as ``getattr(self.user_emb, "0")(x)``.  Each
step is a registered submodule, which Python finds only after the normal lookup has failed,
through ``nn.Module.__getattr__`` (a Python frame): about 0.5 us a step, 1-1.5 us a call.  On
the bench models at N = 10 that was 35-40 us of a 400 us forward, the larger part of the
transformed module's gap to a hand-written rewrite (docs/bench.md).

:func:`bind_paths` also stores each step in the owner's ``__dict__``, where the normal lookup
finds it first.  The registration (``_modules``, hence ``state_dict``, ``named_modules``,
TorchScript's view) is unchanged, and :class:`BoundPaths` keeps the two in step: assigning,
deleting or re-registering a submodule drops its plain attribute, so a stale module is never
called (the call then takes the slow path).  Only modules of mari_fx's own classes are given
such attributes: the transformed module and the namespace modules fx creates on a submodule
path; the model's own modules are never touched.
"""
from __future__ import annotations

from typing import Any, Optional

import torch.fx as fx
import torch.nn as nn


def _unbind(module: nn.Module, name: str) -> None:
    modules = module.__dict__.get("_modules")
    if modules is not None and name in modules:
        module.__dict__.pop(name, None)


class BoundPaths:
    """Mixin of an ``nn.Module`` whose registered submodules may also be plain attributes
    (:func:`bind_paths`): every ``nn.Module`` API that changes a registration drops the
    plain attribute first."""

    def add_module(self, name: str, module: Optional[nn.Module]) -> None:  # register_module calls it
        _unbind(self, name)
        super().add_module(name, module)

    def __setattr__(self, name: str, value: Any) -> None:
        _unbind(self, name)
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        _unbind(self, name)
        super().__delattr__(name)


class ModulePath(BoundPaths, nn.Module):
    """A namespace module on a submodule path (fx creates these as plain ``nn.Module``)."""


class BoundGraphModule(BoundPaths, fx.GraphModule):
    """A GraphModule whose forward reaches its submodules through plain attributes.

    Example:
        >>> import torch, mari_fx
        >>> from mari_fx.testing.examples import CoarseRanker
        >>> T = mari_fx.transform(CoarseRanker().eval(), ["user"], (torch.randn(4, 16), torch.randn(4, 8)))
        >>> "fusion" in T.__dict__ and "fusion" in T._modules   # a plain attribute, still registered
        True
        >>> T.fusion = torch.nn.Sequential()                    # re-assigning drops the plain attribute
        >>> "fusion" in T.__dict__
        False
    """

    def __deepcopy__(self, memo: Any) -> "BoundGraphModule":
        return bind_paths(super().__deepcopy__(memo))

    def __reduce__(self) -> Any:
        # torch pickles a GraphModule as a plain one re-traced from its code: bind that one again
        return (_unpickle_bound, super().__reduce__())


def _unpickle_bound(fn: Any, args: Any) -> fx.GraphModule:
    gm = fn(*args)
    return bind_paths(BoundGraphModule(gm, gm.graph, class_name=type(gm).__name__))


def bind_paths(gm: fx.GraphModule) -> fx.GraphModule:
    """Store every step of the paths of ``gm``'s called submodules (and of the modules holding
    its ``get_attr`` values) as a plain attribute of its owner, where that owner is ``gm``
    itself or a namespace module fx created; returns ``gm``.  A no-op unless ``gm`` is a
    :class:`BoundGraphModule`."""
    if not isinstance(gm, BoundPaths):
        return gm
    for n in gm.graph.nodes:
        if n.op not in ("call_module", "get_attr"):
            continue
        steps = n.target.split(".")
        if n.op == "get_attr":
            steps = steps[:-1]  # the value itself is a parameter, buffer or constant
        owner: nn.Module = gm
        for name in steps:
            child = owner._modules.get(name)
            if child is None or not isinstance(owner, BoundPaths):
                break
            if type(child) is nn.Module:  # a namespace fx made on a path: T's own, never the model's
                child.__class__ = ModulePath
            object.__setattr__(owner, name, child)
            owner = child
    return gm
