"""Capture stage: turn a model into a torch.fx GraphModule (never mutating it)."""
from __future__ import annotations

import contextlib
import copy
import inspect
import operator
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Type

import torch
import torch.fx as fx
import torch.nn as nn

from .. import registry
from ..errors import DeclarationError, TraceError
from .outline import called_once, leaf_calls, outline_module_calls

_HINTS = (
    ("cannot be used as inputs to control flow",
     "data-dependent Python control flow (if/for on a tensor value); move it out of forward or pass "
     "the value through concrete_args"),
    ("object of type 'Proxy' has no len()", "Python len() on a traced value; use x.size(0) / x.shape[0]"),
    ("'len' is not supported in symbolic tracing", "Python len() on a traced value; use x.size(0) / x.shape[0]"),
    ("is not installed as a submodule", "a module called without being registered; assign it as an attribute "
     "(self.layer = ...) in __init__"),
    ("Proxy object cannot be iterated", "iteration over a traced value (e.g. `for row in x`, or unpacking); "
     "use torch.unbind / split with a constant size"),
    ("__cuda_array_interface__", "a traced value read as data outside torch ops (pack_padded_sequence's "
     "lengths, .tolist(), .numpy()); for an RNN over padded sequences run it on the padded tensor and "
     "pick each row's last valid step with torch.gather, or keep the module that packs as a call "
     "(leaf_modules=[ThatModule])"),
)


LEAF_MODULES = registry.LEAF_MODULES  # class -> share: always kept as calls (extensions add theirs)


def shared_modules() -> Tuple[Type[nn.Module], ...]:
    """The leaf classes that copies of a model share instead of deep-copying."""
    return tuple(e.key for e in LEAF_MODULES.all() if e.value)


def register_leaf_module(*classes: Type[nn.Module], share: bool = False) -> None:
    """Always trace instances of ``classes`` as single calls; with ``share=True`` copies
    mari_fx makes of a model (capture, lower) share these modules instead of deep-copying
    them (embedding tables, process groups)."""
    for cls in classes:  # registering a class again updates its sharing
        LEAF_MODULES.add(cls, share, override=True)


def copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)`` of the module structure only: parameters and buffers, and the
    submodules of :func:`shared_modules` classes, are shared with ``model`` (the sharing policy
    of transformed modules, see docs/deploy.md; ``mari_fx.refresh`` re-derives what is not shared)."""
    shared = shared_modules()
    memo = {id(m): m for m in model.modules() if shared and isinstance(m, shared)}
    for t in list(model.parameters()) + list(model.buffers()):
        memo[id(t)] = t
    return copy.deepcopy(model, memo)


CAPTURE_HOOKS = registry.CAPTURE_HOOKS  # see register_capture_hook


def register_capture_hook(hook: Callable[[nn.Module], Optional[nn.Module]], priority: int = 0) -> None:
    """Let :func:`capture` hand a model to ``hook`` first: it returns what to capture instead
    (the module a wrapper holds, or a GraphModule traced its own way), or None to pass.
    Hooks are tried until none applies, so wrappers of wrappers unwrap.  Extensions use it
    for the wrappers users hold (``torchrec_integration`` traces a ``DistributedModelParallel``
    with TorchRec's tracer); the result must share the wrapped model's modules, not copy them.

    Example:
        >>> import torch
        >>> class Holder(torch.nn.Module):
        ...     def __init__(self, inner):
        ...         super().__init__(); self.inner = inner
        ...     def forward(self, *args):       # *args: torch.fx cannot trace through this
        ...         return self.inner(*args)
        >>> def hook(m):
        ...     return m.inner if isinstance(m, Holder) else None
        >>> register_capture_hook(hook)
        >>> inner = torch.nn.Sequential(torch.nn.Linear(3, 2))
        >>> gm = capture(Holder(inner))
        >>> [n.op for n in gm.graph.nodes], gm.get_submodule("0").weight is inner[0].weight  # a copy sharing tensors
        (['placeholder', 'call_module', 'output'], True)
        >>> CAPTURE_HOOKS.remove(hook)  # hooks are global: this example cleans up
    """
    CAPTURE_HOOKS.add(hook, hook, priority=priority)


def unwrap(model: nn.Module) -> nn.Module:
    """``model`` after the :func:`register_capture_hook` hooks that apply to it."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        for hook in [e.value for e in CAPTURE_HOOKS.all()]:
            inner = hook(model)
            if inner is not None and inner is not model:
                model = inner
                break
    return model


def _unwrap_data_parallel(model: nn.Module) -> Optional[nn.Module]:
    # torch's own data-parallel wrappers run ``.module`` unchanged on each replica
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    return model.module if isinstance(model, (DataParallel, DistributedDataParallel)) else None


register_capture_hook(_unwrap_data_parallel)


def _unwrap_compiled(model: nn.Module) -> Optional[nn.Module]:
    # torch.compile(model) computes what model computes; mari_fx rewrites the model itself
    from torch._dynamo.eval_frame import OptimizedModule

    return model._orig_mod if isinstance(model, OptimizedModule) else None


register_capture_hook(_unwrap_compiled)


def _hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


def refuse_hooks(model: nn.Module, leaf_modules: Iterable[Type[nn.Module]] = ()) -> None:
    """Raise :class:`TraceError` for forward hooks the captured graph would not follow: on the
    model itself (tracing runs ``forward``, not the hooks around it), global module hooks, and
    hooks on modules that stay calls in the graph (registered leaf modules, the submodules a
    GraphModule calls), which ``T`` would call at other rows or replace by a split layer.
    Hooks on other torch.nn modules are traced with them (:class:`MariTracer`).

    Example:
        >>> m = torch.nn.Linear(2, 2)
        >>> _ = m.register_forward_hook(lambda mod, inp, out: out * 2)
        >>> refuse_hooks(m)
        Traceback (most recent call last):
        ...
        mari_fx.errors.TraceError: the model (Linear) has a forward hook or pre-hook: mari_fx captures forward(), which does not run it, so the transformed module would not either; remove the hook (or call the model from a wrapper module whose forward runs it)
    """
    from torch.nn.modules import module as nn_module

    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        raise TraceError("global module forward hooks are registered (torch.nn.modules.module."
                         "register_module_forward_hook / _pre_hook): they would run on the transformed module's "
                         "calls at other rows; remove them before mari_fx.transform")
    if _hooks(model):
        raise TraceError(f"the model ({type(model).__name__}) has a forward hook or pre-hook: mari_fx captures "
                         "forward(), which does not run it, so the transformed module would not either; remove the "
                         "hook (or call the model from a wrapper module whose forward runs it)")
    leaves = tuple(leaf_modules) + tuple(LEAF_MODULES.keys())
    called = ({n.target for n in model.graph.nodes if n.op == "call_module"}
              if isinstance(model, fx.GraphModule) else set())
    for name, m in model.named_modules():
        if name and _hooks(m) and (isinstance(m, leaves) or name in called):
            raise TraceError(f"module {name!r} ({type(m).__name__}) has a forward hook or pre-hook, and mari_fx "
                             "keeps it a call it does not look into: the hook would run at other rows or be lost "
                             "in a split layer; remove the hook")


class _AutocastRegion(TraceError):
    """Raised while tracing: not a reason to try torch.export (its graph asserts the autocast
    dtypes, which the example run outside autocast then fails)."""


def _autocast_state() -> Tuple[Any, ...]:
    return tuple((torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cpu", "cuda"))


class MariTracer(fx.Tracer):
    """``torch.fx.Tracer`` whose leaves are torch.nn modules plus ``leaf_modules`` and
    the classes of :func:`register_leaf_module`."""

    def __init__(self, leaf_modules: Iterable[Type[nn.Module]] = ()):
        super().__init__()
        self.extra_leaves = tuple(leaf_modules) + tuple(LEAF_MODULES.keys())
        self.record_stack_traces = True  # errors about a node quote the model's source line
        self._autocast: Optional[Tuple[Any, ...]] = None  # the autocast state trace() started in

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self.extra_leaves):
            return True
        # a torch.nn module with forward hooks is traced through (fx runs its hooks while tracing
        # a non-leaf): as a leaf, a split or a U-row call would lose or misplace the hooks' code
        return not _hooks(m) and super().is_leaf_module(m, module_qualified_name)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def trace(self, root, concrete_args=None):
        self._autocast = _autocast_state()
        return super().trace(root, concrete_args)

    def create_node(self, *args, **kwargs) -> fx.Node:
        # torch.autocast runs as Python while fx traces: its regions leave no node, so the graph
        # would compute in another dtype than the model (torch.export records them)
        if self._autocast is not None and _autocast_state() != self._autocast:
            raise _AutocastRegion(
                "forward enters a torch.autocast region: torch.fx does not record it, so the captured graph "
                "would compute in another dtype than the model; write the casts out (`h = lin(x.to(torch.bfloat16))`"
                " with the layer in that dtype) or keep autocast outside the model")
        return super().create_node(*args, **kwargs)


class _Proxy(fx.Proxy):
    """Records ``h[idx] = v`` as ``operator.setitem`` (plain fx proxies refuse item assignment) and
    ``y += v`` as ``operator.iadd`` (plain fx proxies fall back to ``y = y + v``, which loses the write
    into the tensor ``y`` names: ``h = lin(u); y = h; y += v; return h`` would return the old ``h``);
    :func:`mari_fx.frontend.functionalize.functionalize` then makes them functional."""

    def __setitem__(self, index: Any, value: Any) -> None:
        self.tracer.create_proxy("call_function", operator.setitem, (self, index, value), {})


def _augmented(op: Callable[[Any, Any], Any]) -> Callable[[_Proxy, Any], fx.Proxy]:
    def method(self: _Proxy, other: Any) -> fx.Proxy:
        return self.tracer.create_proxy("call_function", op, (self, other), {})

    return method


for _op in (operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
            operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift,
            operator.imatmul):
    setattr(_Proxy, f"__{_op.__name__}__", _augmented(_op))


def capture(
    model: nn.Module,
    leaf_modules: Optional[Iterable[Type[nn.Module]]] = None,
    example_args: Sequence[Any] = (),
    example_kwargs: Optional[Mapping[str, Any]] = None,
) -> fx.GraphModule:
    """Trace ``model`` with :class:`MariTracer` (a GraphModule is deep-copied instead),
    after unwrapping it with the :func:`register_capture_hook` hooks.

    Models torch.fx cannot trace (``len()`` on a traced value, data-dependent shapes that
    torch.export can still capture) fall back to :func:`capture_with_export` when an example
    is given; if both fail, the error names fx's reason, its likely cause and export's reason.

    Example:
        >>> import torch
        >>> gm = capture(torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU()))
        >>> [n.op for n in gm.graph.nodes]
        ['placeholder', 'call_module', 'call_module', 'output']
    """
    if isinstance(model, nn.Module):
        model = unwrap(model)  # wrappers users hold (DistributedDataParallel, extensions' own)
    if not isinstance(model, nn.Module):
        raise TraceError(f"expected an nn.Module or fx.GraphModule, got {type(model).__name__}")
    refuse_hooks(model, leaf_modules or ())
    _refuse_reserved_names(model)
    # Everything after capture (in-place modules made out of place, split layers) happens on a
    # copy: the model the caller holds is never changed.
    try:
        model = copy_model(model)
    except Exception as e:
        raise TraceError(
            f"cannot copy {type(model).__name__} ({type(e).__name__}: {e}): mari_fx works on a copy so the "
            "model is never changed; register modules that must not be copied with "
            "mari_fx.frontend.capture.register_leaf_module(cls, share=True)") from e
    if isinstance(model, fx.GraphModule):
        return model
    params, fixed = constant_args(model, example_args, example_kwargs or {})
    tracer = MariTracer(leaf_modules or ())
    try:
        with private_state(model), guard_state(model):
            before = state_versions(model)
            graph = tracer.trace(model, concrete_args=fixed or None)
            _refuse_state_assignments(model)
            # torch.fx runs ``self.count.add_(1)`` on a buffer as Python while tracing: no node records it
            check_state(model, before, "tracing the model")
    except _AutocastRegion as e:
        raise TraceError(f"cannot capture {type(model).__name__}: {e}") from e
    except Exception as e:  # torch.fx raises many types; all mean "cannot trace"
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        why = next((hint for key, hint in _HINTS if key in str(e)), None)
        error = f"torch.fx cannot trace {type(model).__name__}: {msg}" + (f"\n  cause: {why}" if why else "")
        if not example_args and not example_kwargs:
            raise TraceError(error) from e
        try:
            gm = capture_with_export(model, example_args, example_kwargs or {})
        except Exception as e2:
            reason = next((l for l in str(e2).splitlines() if l.strip()), type(e2).__name__)
            raise TraceError(f"{error}\n  torch.export also failed: {reason}") from e2
        gm.meta[ROUTE_KEY] = "torch.export"
        return _drop_fixed(gm, params, fixed, by_name=True)
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.meta[ROUTE_KEY] = "torch.fx"
    return _drop_fixed(gm, params, fixed, by_name=False)


_CONSTANTS = (type(None), bool, int, float, str)


def constant_args(model: nn.Module, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Tuple[Tuple[str, ...], Dict[str, Any]]:
    """``(forward's argument names, {name: value})`` of the arguments that are Python constants: given
    as ``None`` / a bool / a number / a string in the example, or left out where forward has a default
    (``mask=None``, ``return_embeddings=False``).  They are fixed at those values when captured, as
    torch.fx's ``concrete_args`` and torch.export do; the request takes the tensors only.  Nothing is
    fixed without an example.

    Example:
        >>> class M(nn.Module):
        ...     def forward(self, x, mask=None, scale: float = 2.0):
        ...         return x * scale
        >>> constant_args(M(), (torch.ones(2, 1),), {"scale": 3.0})
        (('x', 'mask', 'scale'), {'mask': None, 'scale': 3.0})
    """
    try:
        sig = inspect.signature(model.forward)
        bound = sig.bind_partial(*args, **kwargs).arguments
    except (TypeError, ValueError):
        return (), {}
    if not args and not kwargs or any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in sig.parameters.values()):
        return (), {}
    rows = next((t.shape[0] for t in torch.utils._pytree.tree_leaves((args, kwargs))
                 if isinstance(t, torch.Tensor) and t.dim()), None)
    fixed = {}
    for name, p in sig.parameters.items():
        if name in bound:
            value = bound[name]
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value == rows:
                # a batch size passed as a value: fixed, T would keep the example's for every request
                raise DeclarationError(
                    f"forward argument {name!r} is {value!r}, the example's number of pairs: a batch size passed "
                    f"as a value cannot be fixed (every request has its own). Read it from a tensor in the model "
                    f"(x.size(0)), or give another value (or example size) if it is a constant")
            if isinstance(value, _CONSTANTS):
                fixed[name] = value
        elif p.default is not p.empty and isinstance(p.default, _CONSTANTS):
            fixed[name] = p.default  # every call that leaves it out gets the default: fixing it is exact
    return tuple(sig.parameters), fixed


def _drop_fixed(gm: fx.GraphModule, params: Tuple[str, ...], fixed: Dict[str, Any], by_name: bool) -> fx.GraphModule:
    """Remove the placeholders of fixed constant arguments (and the checks torch.fx adds that they keep
    their value); record them in ``gm.meta[FIXED_ARGS_KEY]`` for binding examples and requests."""
    if not fixed:
        return gm
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if by_name:
        nodes = {n.target: n for n in placeholders}
    else:  # torch.fx makes one placeholder per forward argument, in order (renaming concrete ones)
        nodes = dict(zip(params, placeholders)) if len(placeholders) == len(params) else {}
    dropped = {}
    for name, value in fixed.items():
        node = nodes.get(name)
        if node is None:
            if by_name:  # left out of the export call: export used the default
                dropped[name] = value
            continue
        chain = _checks_of(node)
        if chain is None:
            continue  # read by the model's own ops: it stays an input (and is refused as one)
        for n in reversed(chain):
            gm.graph.erase_node(n)
        gm.graph.erase_node(node)
        dropped[name] = value
    gm.graph.lint()
    gm.recompile()
    gm.meta[FIXED_ARGS_KEY] = (params, dropped)
    return gm


def _checks_of(node: fx.Node) -> Optional[List[fx.Node]]:
    """The nodes that only check ``node``'s value (``_assert_is_none``, ``torch._assert(x == c)``), in
    graph order, or None if anything else reads it."""
    checks = {torch._assert, operator.eq, getattr(fx._symbolic_trace, "_assert_is_none", None)}
    found, work = [], list(node.users)
    while work:
        n = work.pop()
        if n in found:
            continue
        if not (n.op == "call_function" and n.target in checks):
            return None
        found.append(n)
        work += list(n.users)
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return sorted(found, key=order.get)


@contextlib.contextmanager
def private_state(model: nn.Module):
    """Within, ``model``'s parameters, buffers and tensor attributes are private clones (outside
    :func:`shared_modules`); the originals are put back on exit.

    Copies mari_fx makes share their tensors with the caller's model, and a composite op can
    write into a parameter from C++ where no Python-level guard sees it (``F.embedding`` with
    ``max_norm`` renormalises its table in place): tracing and example runs happen on clones,
    so the caller's model is never changed, whatever the forward does.

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(2, 2)
        >>> w = lin.weight
        >>> with private_state(lin):
        ...     lin.weight is w, torch.equal(lin.weight, w)
        (False, True)
        >>> lin.weight is w
        True
    """
    shared = shared_modules()
    clones: Dict[int, torch.Tensor] = {}
    swapped: List[Any] = []

    def clone(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in clones:
            c = t.detach().clone()
            clones[id(t)] = nn.Parameter(c, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else c
        return clones[id(t)]

    def private(m: nn.Module) -> None:
        if shared and isinstance(m, shared):
            return
        for table in (m._parameters, m._buffers):
            for name, t in list(table.items()):
                if t is not None:
                    swapped.append((table, name, t))
                    table[name] = clone(t)
        for name, t in list(vars(m).items()):
            if isinstance(t, torch.Tensor) and not isinstance(t, fx.Proxy):
                swapped.append((vars(m), name, t))
                vars(m)[name] = clone(t)
        for child in m.children():
            private(child)

    private(model)
    try:
        yield model
    finally:
        for table, name, t in reversed(swapped):
            table[name] = t


def state_versions(model: nn.Module) -> Dict[str, Any]:
    """Identity, version counter and requires_grad of every parameter and buffer (cheap: no copies),
    except inside :func:`shared_modules` (embedding tables keep their own bookkeeping, e.g. TorchRec's
    bounds-check counters, and are the extension's to keep stateless)."""
    shared = shared_modules()
    skip = tuple(f"{path}." for path, m in model.named_modules() if shared and isinstance(m, shared))
    return {name: (id(t), t._version, t.requires_grad) for name, t in
            [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
            if not name.startswith(skip) or not skip}


def check_state(model: nn.Module, before: Mapping[str, Any], during: str) -> None:
    """Refuse a forward that updated its own parameters or buffers (also inside opaque leaf modules)."""

    after = state_versions(model)
    changed = [name for name in before if after.get(name) != before[name]] + [n for n in after if n not in before]
    if changed:
        raise DeclarationError(
            f"{during} changed the model's state: {', '.join(repr(c) for c in changed)}; mari_fx transforms "
            "stateless inference forwards: move state updates (counters, running statistics, EMA buffers) "
            "out of forward, and call model.eval()")


class guard_state(torch.overrides.TorchFunctionMode):
    """While active, an in-place write into a parameter or buffer of ``model`` (or a view of one)
    raises :class:`~mari_fx.errors.DeclarationError` naming it *before* it happens.

    Copies mari_fx makes share parameters and buffers with the caller's model, so tracing
    (torch.fx runs ``self.count.add_(1)`` as Python) and example runs would otherwise change
    the caller's state.  Writes from C++ kernels are not seen here; :func:`check_state`
    compares version counters afterwards.

    Example:
        >>> import torch
        >>> bn = torch.nn.BatchNorm1d(2)
        >>> with guard_state(bn):
        ...     bn.running_mean.add_(1)
        Traceback (most recent call last):
        ...
        mari_fx.errors.DeclarationError: the forward writes into buffer 'running_mean' in place (Tensor.add_): mari_fx transforms stateless inference forwards; move state updates (counters, running statistics, EMA buffers) out of forward, and call model.eval()
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        shared = shared_modules()
        skip = tuple(f"{path}." for path, m in model.named_modules() if shared and isinstance(m, shared))
        self.protected: Dict[int, str] = {}
        for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
            for name, t in items:
                key = _storage_key(t)
                if key is not None and not (skip and name.startswith(skip)):
                    self.protected.setdefault(key, f"{kind} {name!r}")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        written = None
        if (name.endswith("_") and not name.startswith("_")) or name == "__setitem__" or (
                name.startswith("__i") and name.endswith("__")):
            written = args[0] if args else None
        elif kwargs.get("out") is not None:
            written = kwargs["out"]
        elif kwargs.get("inplace") is True or any(a is True for a in args[1:]) and _binds_inplace(func, args, kwargs):
            written = args[0] if args else kwargs.get("input")
        key = _storage_key(written) if isinstance(written, torch.Tensor) and not isinstance(written, fx.Proxy) else None
        if key in self.protected:

            raise DeclarationError(
                f"the forward writes into {self.protected[key]} in place ({_qualified(func)}): mari_fx transforms "
                "stateless inference forwards; move state updates (counters, running statistics, EMA buffers) "
                "out of forward, and call model.eval()")
        return func(*args, **kwargs)


def _binds_inplace(func: Any, args: Any, kwargs: Any) -> bool:
    try:  # F.relu(x, True): the mode sees F.relu, not the torch.relu_ it calls
        return inspect.signature(func).bind(*args, **kwargs).arguments.get("inplace") is True
    except (TypeError, ValueError):
        return False


def _qualified(func: Any) -> str:
    owner = getattr(func, "__objclass__", None)
    return f"Tensor.{func.__name__}" if owner is not None else getattr(func, "__name__", str(func))


def _storage_key(t: Any) -> Optional[int]:
    try:
        s = t.untyped_storage()
        return s.data_ptr() if s.nbytes() else None
    except Exception:  # fake, sparse or nested tensors
        return None


# Attributes a GraphModule sets on itself (``meta``) or defines (``graph``, ``code``, ...): a captured
# graph's root holds the model's own top-level parameters, buffers and submodules under their names.
_GRAPH_MODULE_NAMES = frozenset({"meta", "shape_env"} | {n for n in set(dir(fx.GraphModule)) - set(dir(nn.Module))
                                                         if not n.startswith("__")})


def _refuse_reserved_names(model: nn.Module) -> None:
    """A top-level parameter, buffer or submodule named like a GraphModule attribute (an AutoDis
    model's ``self.meta`` embeddings) cannot be held by the captured graph module."""
    if isinstance(model, fx.GraphModule):
        return
    names = [n for n, _ in [*model.named_parameters(recurse=False), *model.named_buffers(recurse=False),
                            *model.named_children()] if n in _GRAPH_MODULE_NAMES]
    if names:
        raise TraceError(
            f"{type(model).__name__} has a top-level parameter, buffer or submodule named {names[0]!r}, a name "
            f"torch.fx's GraphModule uses for itself: rename it (e.g. self.{names[0]}_) or move it into a "
            "submodule, then transform")


def _refuse_state_assignments(model: nn.Module) -> None:
    """A forward that stores a traced value on a module (``self.last = h``) updates its own state."""

    for path, m in model.named_modules():
        for attr, v in vars(m).items():
            if isinstance(v, fx.Proxy):
                name = f"{path}.{attr}" if path else attr
                raise DeclarationError(
                    f"forward assigns a computed value to the module attribute {name!r}: mari_fx transforms "
                    "stateless inference forwards; return the value instead of storing it")


from ..meta import FIXED_ARGS_KEY, ROUTE_KEY  # noqa: F401 (re-exported)


def capture_with_export(model: nn.Module, args: Sequence[Any], kwargs: Mapping[str, Any]) -> fx.GraphModule:
    """Capture through ``torch.export`` (strict, dim 0 of every input dynamic) and give the
    graph the shape an fx trace has: one placeholder per forward argument, dict inputs read
    with ``getitem``; the nodes are aten ops, for which :mod:`mari_fx.analysis.rules` has rules too.

    Example:
        >>> import torch
        >>> class M(torch.nn.Module):
        ...     def forward(self, x):
        ...         return x["a"] * len(x["a"])   # len() of a traced value: fx cannot trace this
        >>> gm = capture_with_export(M(), ({"a": torch.ones(3, 2)},), {})
        >>> [n.target for n in gm.graph.nodes if n.op == "placeholder"]
        ['x']
    """
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.export import Dim, export
    from torch.utils._pytree import MappingKey, SequenceKey, tree_flatten_with_path, tree_map, tree_unflatten

    names = list(inspect.signature(model.forward).parameters)
    batch = Dim("batch", min=2)
    bound = dict(zip(names, args), **kwargs)
    dynamic = {k: tree_map(lambda v: {0: batch} if isinstance(v, torch.Tensor) and v.dim() else None, v)
               for k, v in bound.items()}
    def forward() -> Any:
        with private_state(model), torch.no_grad():  # on clones: the caller's tensors are never written
            return model(*args, **kwargs)

    keep = called_once(model, leaf_calls(model), forward)

    def run(strict: bool, keep: Tuple[str, ...]) -> Any:
        ep = export(model, tuple(args), dict(kwargs), dynamic_shapes=dynamic, strict=strict,
                    preserve_module_call_signature=keep)
        if strict and any(isinstance(v, FakeTensor) for v in ep.constants.values()):
            # strict export keeps a constant made in forward from a numpy array
            # (``x.new_tensor(np_offsets)``) as a fake tensor, without its values
            raise TraceError("strict torch.export kept a constant without its values")
        return ep

    # strict (dynamo) keeps len() symbolic; non-strict copes with unregistered modules; the sequence
    # modules' calls are kept (see mari_fx.frontend.outline) where export can keep them
    attempts = [(True, keep), (False, keep)] + ([(True, ()), (False, ())] if keep else [])
    for k, (strict, kept) in enumerate(attempts):
        try:
            ep = run(strict, kept)
            break
        except Exception:
            if k == len(attempts) - 1:
                raise
    gm = ep.module()
    outline_module_calls(gm, ep, model, kept)
    graph = gm.graph
    leaves = [path for path, _ in tree_flatten_with_path((tuple(args), dict(kwargs)))[0]]
    old = [n for n in graph.nodes if n.op == "placeholder"]
    if len(leaves) != len(old):
        raise TraceError(f"torch.export gave {len(old)} inputs for {len(leaves)} example leaves")
    sources = []
    for path in leaves:
        top, where, *rest = path
        arg = names[where.idx] if isinstance(top, SequenceKey) and top.idx == 0 else where.key
        if rest and not (len(rest) == 1 and isinstance(rest[0], (MappingKey, SequenceKey))):
            raise TraceError(f"input {arg!r} nests deeper than a dict, list or tuple of tensors")
        sources.append((arg, (rest[0].key if isinstance(rest[0], MappingKey) else rest[0].idx) if rest else None))
    first = next(iter(graph.nodes))
    new: Dict[str, fx.Node] = {}
    with graph.inserting_before(first):
        for arg in [n for n in names if n in {a for a, _ in sources}]:
            new[arg] = graph.placeholder(arg)
    anchor = next(n for n in graph.nodes if n.op != "placeholder")
    for node, (arg, key) in zip(old, sources):
        if key is None:
            node.replace_all_uses_with(new[arg])
        else:
            with graph.inserting_before(anchor):
                node.replace_all_uses_with(graph.call_function(operator.getitem, (new[arg], key)))
        graph.erase_node(node)
    for node in [n for n in graph.nodes if n.op == "call_module" and n.target == "_guards_fn"]:
        graph.erase_node(node)  # export's own input checks: mari_fx checks requests itself
    output = next(n for n in graph.nodes if n.op == "output")
    output.args = (tree_unflatten(list(output.args[0]), gm._out_spec),)  # the model's own output structure
    graph.set_codegen(fx.graph.CodeGen())
    for attr in ("_in_spec", "_out_spec"):  # export's pytree specs no longer describe forward
        gm.__dict__.pop(attr, None)
    # ... and neither do the hooks ep.module() adds (they check inputs against _in_spec)
    gm._forward_pre_hooks.clear()
    gm._forward_pre_hooks_with_kwargs.clear()
    gm._forward_hooks.clear()
    gm._forward_hooks_always_called.clear()
    graph.lint()
    gm.recompile()
    return gm
