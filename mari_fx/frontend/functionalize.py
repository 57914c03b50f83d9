"""Functionalization pass: rewrite every mutation in a captured graph into pure ops.

The tagging and lowering passes reason about values: a node's tag says which rows its
*value* depends on, and the lowering re-emits each node at U or N rows, gathers user
values, splits layers and drops what nothing reads.  An in-place op breaks all of that:
``h.relu_()`` changes a value other nodes already hold (it would run on a gathered copy,
or be dropped as dead code), ``v = h[:, :4]; v.add_(1)`` changes ``h`` too, and
``nn.ReLU(inplace=True)`` over column pieces would write into the caller's tensors.
:func:`functionalize` therefore runs right after capture and leaves a graph of pure ops:

* every in-place op (``x.add_(y)``, ``torch.relu_(x)``, ``F.relu(x, inplace=True)``,
  ``h += x``, ``h[:, 0] = 0``, modules with ``inplace=True``, mutable aten overloads,
  ``out=`` arguments) becomes its out-of-place form, cast back to the mutated tensor's
  dtype where the out-of-place form would promote;
* later readers of the mutated tensor read the new value; a mutation through a view
  (slicing, ``select``, ``narrow``, ``view``/``reshape``, ``unsqueeze``, ``transpose``,
  ``permute``, ``split``/``chunk``/``unbind`` items, ``detach``, or any op that returned
  its input itself) rebuilds the base with ``torch.slice_scatter`` /
  ``torch.select_scatter`` / an inverse view, and later readers of the base or of its
  other views read views of the rebuilt base;
* which values alias is taken from one run of the graph on the example (values that share
  storage there); the graph's own view ops say how they alias.

Refused, with the node and the fix in the message:

* mutation of a parameter or buffer (``self.count.add_(1)``, an EMA update) --
  :class:`~mari_fx.errors.DeclarationError` naming it: mari_fx transforms stateless
  inference forwards;
* mutation through an alias mari_fx cannot invert (a write into an ``expand`` view, ``as_strided``,
  an opaque call that returned a view) when the base or another view is read afterwards,
  in-place ops without an out-of-place form (``resize_``, ``unsqueeze_``, random fills),
  mutation of a Python list, a write into memory a non-tensor value holds (``kt.values().mul_(2)``
  on a KeyedTensor: later ``kt.values()`` calls are fresh reads the pass cannot redirect) --
  :class:`~mari_fx.errors.TraceError`.
"""
from __future__ import annotations

import builtins
import copy
import inspect
import operator
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..errors import DeclarationError, MariError, TraceError

from ..meta import EXAMPLE_KEY, FACT_KEY, FUNCTIONALIZED_KEY  # noqa: F401 (re-exported)

aten = torch.ops.aten

_IOPS = {
    operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
    operator.itruediv: operator.truediv, operator.ifloordiv: operator.floordiv, operator.imod: operator.mod,
    operator.ipow: operator.pow, operator.iand: operator.and_, operator.ior: operator.or_,
    operator.ixor: operator.xor, operator.ilshift: operator.lshift, operator.irshift: operator.rshift,
    operator.imatmul: operator.matmul,
}
# In-place methods that change a tensor's shape, storage or draw random numbers: no pure
# out-of-place twin with the same meaning (``bernoulli`` exists but reads self as probabilities).
_NO_TWIN = {
    "resize_", "resize_as_", "set_", "as_strided_", "squeeze_", "unsqueeze_", "t_", "transpose_", "swapdims_",
    "swapaxes_", "uniform_", "normal_", "bernoulli_", "exponential_", "geometric_", "log_normal_", "cauchy_",
    "random_", "map_", "apply_", "map2_", "share_memory_", "record_stream",
}
# In-place methods that leave the values as they are.
_NO_VALUE_CHANGE = {"requires_grad_", "retain_grad", "detach_"}


def _inplace_function_twins() -> Dict[Any, Any]:
    twins: Dict[Any, Any] = {}
    for ns in (torch, F, torch._C._nn):
        for name in dir(ns):
            if not name.endswith("_") or name.startswith("_") or name[:-1] in ("", "zero"):
                continue
            fn = getattr(ns, name, None)
            if not callable(fn) or isinstance(fn, type):
                continue
            base = name[:-1]
            twin = getattr(torch, base, None) or getattr(F, base, None) or getattr(ns, base, None)
            if callable(twin):
                twins[fn] = twin
    return twins


_FUNCTION_TWINS = _inplace_function_twins()


def _where(node: fx.Node) -> str:
    """The node and, when recorded, the model source line it comes from."""
    text = node.format_node()
    lines = [l.strip() for l in (node.meta.get("stack_trace") or "").splitlines()]
    lines = [l for l in lines if l and set(l) - set("^~ ")]  # drop the caret lines under the code
    internal = (os.path.dirname(torch.__file__), os.path.dirname(__file__))
    files = [k for k, l in enumerate(lines) if l.startswith("File ") and not any(d in l for d in internal)]
    if files:
        k = files[-1]
        text += f" ({lines[k]}: {lines[k + 1]})" if k + 1 < len(lines) else f" ({lines[k]})"
    return text


def _refuse(node: fx.Node, why: str) -> TraceError:
    return TraceError(f"cannot make {_where(node)} functional: {why}; write it out of place "
                      "(e.g. `h = h.relu()` instead of `h.relu_()`, `h = torch.cat(...)` instead of `h[:, 0] = ...`)")


# --------------------------------------------------------------------------- what a node mutates
@dataclass
class _Mutation:
    """``node`` replaces the value of ``target`` (an fx node) by what ``build(rw)`` emits."""

    node: fx.Node
    target: fx.Node
    build: Callable[["_Rewriter"], Any]


def _bind(fn: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Optional[inspect.BoundArguments]:
    try:
        return inspect.signature(fn).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None


def mutation_kind(node: fx.Node, gm: Optional[fx.GraphModule] = None) -> Optional[str]:
    """Why ``node`` may mutate one of its inputs ("method", "function", "inplace", "iop",
    "setitem", "module", "aten", "out"), or None for a node that does not.

    Example:
        >>> import torch
        >>> from mari_fx.frontend.capture import capture
        >>> class M(torch.nn.Module):
        ...     def forward(self, x):
        ...         y = x * 2
        ...         y.relu_()
        ...         y[:, 0] = 0          # recorded as operator.setitem by mari_fx's tracer
        ...         return torch.nn.functional.relu(y, inplace=True)
        >>> gm = capture(M())
        >>> [mutation_kind(n, gm) for n in gm.graph.nodes if n.op.startswith("call")]
        [None, 'method', 'setitem', 'inplace']
    """
    if node.op == "call_method":
        name = node.target
        return "method" if name.endswith("_") and not name.startswith("__") else (
            "iop" if name.startswith("__i") and name.endswith("__") else None)
    if node.op == "call_module":
        mod = gm.get_submodule(node.target) if gm is not None else None
        return "module" if getattr(mod, "inplace", False) is True else None
    if node.op != "call_function":
        return None
    t = node.target
    if t in _IOPS:
        return "iop"
    if t is operator.setitem:
        return "setitem"
    if isinstance(t, torch._ops.OpOverload):
        return "aten" if t._schema.is_mutable else None
    if node.kwargs.get("out") is not None:
        return "out"
    if t in _FUNCTION_TWINS:
        return "function"
    name = getattr(t, "__name__", "")
    if getattr(t, "__objclass__", None) is torch._C.TensorBase or (
            name.endswith("_") and not name.startswith("_") and getattr(torch.Tensor, name, None) is t):
        return "method" if name.endswith("_") and not name.startswith("__") else None
    if "inplace" in node.kwargs:
        return "inplace" if node.kwargs["inplace"] is True else None
    if callable(t) and any(a is True for a in node.args):
        bound = _bind(t, node.args, dict(node.kwargs))
        if bound is not None and bound.arguments.get("inplace") is True:
            return "inplace"
    return None


# --------------------------------------------------------------------------- view geometry
# A view is described as primitive steps from its base, each with a forward op (to re-read
# the view from a rebuilt base) and an inverse (to write a new view value back into it).
@dataclass(frozen=True)
class _Step:
    kind: str  # slice | select | unsqueeze | squeeze | transpose | permute | reshape | expand | identity
    args: Tuple[Any, ...] = ()
    orig: Optional[fx.Node] = None  # reshape: the node to re-emit


_BIG = 2 ** 62


def _index_steps(index: Any, ndim: int) -> Optional[List[_Step]]:
    """Basic indexing (ints, slices, None, Ellipsis) as primitive steps; None otherwise."""
    items = list(index) if isinstance(index, tuple) else [index]
    if any(isinstance(i, bool) or not (isinstance(i, (int, slice, fx.Node)) or i is None or i is Ellipsis)
           for i in items):
        return None
    if any(isinstance(i, fx.Node) and not _is_int_node(i) for i in items):
        return None
    if sum(i is Ellipsis for i in items) > 1:
        return None
    consuming = sum(1 for i in items if i is not None and i is not Ellipsis)
    expanded: List[Any] = []
    for i in items:
        expanded += [slice(None)] * (ndim - consuming) if i is Ellipsis else [i]
    steps, dim = [], 0
    for i in expanded:
        if i is None:
            steps.append(_Step("unsqueeze", (dim,)))
            dim += 1
        elif isinstance(i, slice):
            if not (i.start in (None, 0) and i.stop is None and i.step in (None, 1)):
                steps.append(_Step("slice", (dim, i.start, i.stop, i.step if i.step is not None else 1)))
            dim += 1
        else:
            steps.append(_Step("select", (dim, i)))
    return steps


def _is_int_node(n: fx.Node) -> bool:
    return isinstance(n.meta.get(FACT_KEY), int)


def _norm(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


_RESHAPES = {"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as", torch.reshape, torch.flatten,
             torch.unflatten, aten.view.default, aten._unsafe_view.default, aten.reshape.default,
             aten.flatten.using_ints, aten.unflatten.int}
_IDENTITIES = {"detach", "alias", "view_as_self", torch.detach, aten.alias.default, aten.detach.default}
_SPLITS = {"split": "split", "chunk": "split", "tensor_split": "split", "split_with_sizes": "split",
           torch.split: "split", torch.chunk: "split", torch.tensor_split: "split",
           aten.split.Tensor: "split", aten.split_with_sizes.default: "split", aten.chunk.default: "split",
           "unbind": "unbind", torch.unbind: "unbind", aten.unbind.int: "unbind"}


def _arg(node: fx.Node, i: int, name: str, default: Any) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


class _Facts:
    """What one run of the original graph on the example showed: every node's value."""

    def __init__(self, values: Dict[fx.Node, Any]):
        self.values = values

    def tensor(self, n: Any) -> Optional[torch.Tensor]:
        v = self.values.get(n) if isinstance(n, fx.Node) else None
        return v if isinstance(v, torch.Tensor) else None

    def value(self, a: Any) -> Any:
        return fx.node.map_aggregate(a, lambda x: self.values.get(x) if isinstance(x, fx.Node) else x)


def _storage(t: torch.Tensor) -> Optional[int]:
    try:
        s = t.untyped_storage()
        return s.data_ptr() if s.nbytes() else None
    except Exception:  # tensors without storage (sparse, nested, subclasses)
        return None


def _held_tensors(value: Any) -> List[torch.Tensor]:
    """Tensors an object that is not itself a tensor or a plain container holds as attributes
    (one level, and in lists / tuples / dicts there)."""
    if isinstance(value, (torch.Tensor, list, tuple, dict, str, bytes, int, float, bool, type(None))):
        return []
    attrs = getattr(value, "__dict__", None)
    if not isinstance(attrs, dict):
        return []
    out: List[torch.Tensor] = []
    for v in attrs.values():
        items = v.values() if isinstance(v, dict) else v if isinstance(v, (list, tuple)) else [v]
        out.extend(t for t in items if isinstance(t, torch.Tensor))
    return out


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
            and a.storage_offset() == b.storage_offset() and _storage(a) == _storage(b))


def _view_steps(node: fx.Node, facts: _Facts) -> Optional[Tuple[fx.Node, List[_Step]]]:
    """``(base, steps)`` when ``node`` is a view of tensor ``base`` the graph says how to invert."""
    t = node.target
    out = facts.tensor(node)
    if node.op not in ("call_method", "call_function") or not node.args or out is None:
        return None
    base = node.args[0]
    if t is operator.getitem and isinstance(base, fx.Node):
        src = base
        if src.op in ("call_method", "call_function") and src.target in _SPLITS and src.args:
            k = node.args[1]
            items = facts.values.get(src)
            if not isinstance(k, int) or not isinstance(items, (tuple, list)):
                return None
            x = facts.tensor(src.args[0])
            if x is None:
                return None
            if _SPLITS[src.target] == "unbind":
                dim = _norm(_arg(src, 1, "dim", 0), x.ndim)
                return src.args[0], [_Step("select", (dim, k % len(items)))]
            dim = _norm(_arg(src, 2, "dim", 0), x.ndim)
            if dim == 0:  # offsets would be baked for the example's batch size
                return None
            k %= len(items)
            off = sum(int(items[j].shape[dim]) for j in range(k))
            return src.args[0], [_Step("slice", (dim, off, off + int(items[k].shape[dim]), 1))]
        x = facts.tensor(base)
        if x is None:
            return None
        steps = _index_steps(node.args[1], x.ndim)
        return (base, steps) if steps is not None else None
    if not isinstance(base, fx.Node) or facts.tensor(base) is None:
        return None
    x = facts.tensor(base)
    name = t if isinstance(t, str) else getattr(t, "__name__", None)
    if t in ("narrow", torch.narrow, aten.narrow.default):
        dim, start, length = _arg(node, 1, "dim", 0), _arg(node, 2, "start", 0), _arg(node, 3, "length", 0)
        if not all(isinstance(v, int) for v in (dim, start, length)):
            return None
        dim = _norm(dim, x.ndim)
        start = start + x.shape[dim] if start < 0 else start
        return base, [_Step("slice", (dim, start, start + length, 1))]
    if t in ("select", torch.select, aten.select.int):
        dim, i = _arg(node, 1, "dim", 0), _arg(node, 2, "index", 0)
        return (base, [_Step("select", (_norm(dim, x.ndim), i))]) if isinstance(dim, int) else None
    if t is aten.slice.Tensor:
        dim, start, end, step = (_arg(node, 1, "dim", 0), _arg(node, 2, "start", None), _arg(node, 3, "end", None),
                                 _arg(node, 4, "step", 1))
        if not isinstance(dim, int):
            return None
        dim = _norm(dim, x.ndim)
        full = start in (None, 0) and (end is None or (isinstance(end, int) and end >= _BIG)) and step == 1
        return base, ([] if full else [_Step("slice", (dim, start, end, step))])
    if t in ("unsqueeze", torch.unsqueeze, aten.unsqueeze.default):
        d = _arg(node, 1, "dim", 0)
        return (base, [_Step("unsqueeze", (_norm(d, out.ndim),))]) if isinstance(d, int) else None
    if t in ("squeeze", torch.squeeze, aten.squeeze.dim) and len(node.args) + len(node.kwargs) == 2:
        d = _arg(node, 1, "dim", 0)
        if not isinstance(d, int):
            return None
        d = _norm(d, x.ndim)
        return base, ([_Step("squeeze", (d,))] if x.shape[d] == 1 else [])
    if t in ("transpose", "swapaxes", "swapdims", torch.transpose, torch.swapaxes, torch.swapdims, aten.transpose.int):
        a, b = _arg(node, 1, "dim0", 0), _arg(node, 2, "dim1", 1)
        return base, [_Step("transpose", (_norm(a, x.ndim), _norm(b, x.ndim)))]
    if t in ("t", torch.t, aten.t.default):
        return base, ([_Step("transpose", (0, 1))] if x.ndim == 2 else [])
    if t in ("permute", torch.permute, aten.permute.default):
        dims = list(node.args[1:]) if len(node.args) > 2 else list(_arg(node, 1, "dims", ()))
        if not all(isinstance(d, int) for d in dims):
            return None
        return base, [_Step("permute", tuple(_norm(d, x.ndim) for d in dims))]
    if t is builtins.getattr and node.args[1] in ("T", "mT", "data"):
        which = node.args[1]
        if which == "data":
            return base, []
        if which == "mT":
            return base, [_Step("transpose", (x.ndim - 2, x.ndim - 1))]
        return base, [_Step("permute", tuple(reversed(range(x.ndim))))]
    if t in _RESHAPES or name in ("view", "reshape") and node.op == "call_method":
        if len(node.args) > 1 and isinstance(node.args[1], torch.dtype):
            return None  # a reinterpretation of the bytes, not a reshape
        return base, [_Step("reshape", (), node)]
    if t in ("expand", "expand_as", aten.expand.default):
        # read-only: a later read of it after a write into its base re-expands the new base, but a
        # write through it (several elements share one memory location) has no inverse
        return base, [_Step("expand", (), node)]
    if t in _IDENTITIES:
        return base, []
    return None


# --------------------------------------------------------------------------- the rewrite
class _Group:
    """Values that share one storage on the example: a root and views of it."""

    def __init__(self, root: fx.Node, value: fx.Node):
        self.root = root
        self.current: Optional[fx.Node] = value  # the root's current value in the new graph
        self.version = 0
        self.broken_by: Optional[fx.Node] = None  # a mutation that could not be written back
        self.last_mutation: Optional[fx.Node] = None
        self.key: Optional[int] = None  # the storage it stands for


class _Rewriter:
    def __init__(self, gm: fx.GraphModule, facts: _Facts):
        self.gm, self.facts = gm, facts
        self.graph = fx.Graph()
        self.env: Dict[fx.Node, Any] = {}
        self.group: Dict[fx.Node, _Group] = {}
        self.path: Dict[fx.Node, Optional[List[_Step]]] = {}
        self.cur: Dict[fx.Node, Tuple[Any, int]] = {}
        self.by_storage: Dict[int, _Group] = {}
        self.seqs: Dict[fx.Node, Dict[_Group, int]] = {}  # tuple-valued nodes holding views
        self.state = {}
        for kind, items in (("parameter", gm.named_parameters()), ("buffer", gm.named_buffers())):
            for name, t in items:
                key = _storage(t)
                if key is not None:
                    self.state.setdefault(key, f"{kind} {name!r}")
        # memory held inside non-tensor values (a KeyedTensor's values, a KJT's ids): views of it
        # come out of method calls the pass cannot see through (``kt.values()``, ``kt.to_dict()``,
        # a regroup that copies), so a write into it cannot be followed to later readers
        self.opaque: Dict[int, fx.Node] = {}
        for node, value in facts.values.items():
            for t in _held_tensors(value):
                key = _storage(t)
                if key is not None:
                    self.opaque.setdefault(key, node)
        self._node: Optional[fx.Node] = None

    # -- reading old values in the new graph
    def read(self, a: Any) -> Any:
        return fx.node.map_arg(a, self._read_node)

    def _read_node(self, a: fx.Node) -> Any:
        seen = self.seqs.get(a)
        if seen is not None and any(g.version != v for g, v in seen.items()):
            # a tuple of views (``h.chunk(2, 1)`` read whole after a write into h): view them again
            new = self.graph.node_copy(a, self._read_node)
            self.seqs[a] = {g: g.version for g in seen}
            self.env[a] = new
            return new
        g = self.group.get(a)
        if g is None:
            return self.env[a]
        node, version = self.cur[a]
        if version == g.version:
            return node
        path = self.path[a]
        if g.broken_by is not None or path is None:
            culprit = g.broken_by or g.last_mutation
            raise _refuse(culprit, f"it changes a tensor that {a.format_node()} (read later by {self._node.format_node()}) "
                                   "shares memory with, through an op mari_fx cannot invert")
        node = g.current
        for step in path:
            node = self._forward(step, node)
        self.cur[a] = (node, g.version)
        return node

    # -- emitting
    def call(self, op: str, target: Any, args: Tuple[Any, ...], kwargs: Optional[Dict[str, Any]] = None) -> fx.Node:
        new = self.graph.create_node(op, target, tuple(args), dict(kwargs or {}))
        src = self._node
        if src is not None:
            for k in ("stack_trace", "nn_module_stack", "source_fn_stack"):
                if k in src.meta:
                    new.meta[k] = src.meta[k]
            new.meta[FUNCTIONALIZED_KEY] = src.format_node()
        return new

    def _forward(self, step: _Step, x: Any) -> Any:
        k, a = step.kind, step.args
        if k == "slice":
            dim, start, stop, st = a
            return self.call("call_function", operator.getitem,
                             (x, (slice(None),) * dim + (slice(self.read(start), self.read(stop), self.read(st)),)))
        if k == "select":
            return self.call("call_function", operator.getitem, (x, (slice(None),) * a[0] + (self.read(a[1]),)))
        if k in ("unsqueeze", "squeeze", "transpose"):
            return self.call("call_method", k, (x, *a))
        if k == "permute":
            return self.call("call_method", "permute", (x, *a))
        if k in ("reshape", "expand"):
            orig = step.orig
            return self.call(orig.op, orig.target, (x, *self.read(tuple(orig.args[1:]))), self.read(dict(orig.kwargs)))
        return x

    def _inverse(self, step: _Step, parent: Any, child: Any) -> Any:
        k, a = step.kind, step.args
        if k == "slice":
            dim, start, stop, st = a
            return self.call("call_function", torch.slice_scatter,
                             (parent, child, dim, self.read(start), self.read(stop), self.read(st)))
        if k == "select":
            return self.call("call_function", torch.select_scatter, (parent, child, a[0], self.read(a[1])))
        if k == "unsqueeze":
            return self.call("call_method", "squeeze", (child, a[0]))
        if k == "squeeze":
            return self.call("call_method", "unsqueeze", (child, a[0]))
        if k == "transpose":
            return self.call("call_method", "transpose", (child, *a))
        if k == "permute":
            inv = [0] * len(a)
            for i, d in enumerate(a):
                inv[d] = i
            return self.call("call_method", "permute", (child, *inv))
        if k == "reshape":  # sizes read at run time: right at U rows, N rows or any batch size
            return self.call("call_method", "reshape_as", (child, parent))
        return child

    # -- mutations
    def mutate(self, target: fx.Node, new: Any) -> None:
        """From now on ``target`` (and every alias of it) holds ``new``."""
        g = self.group.get(target)
        if g is None:
            self.env[target] = new
            return
        if g.key in self.state:
            raise DeclarationError(
                f"{_where(self._node)} updates {self.state[g.key]} in place: mari_fx transforms stateless "
                "inference forwards; move the update out of forward (or compute the new value out of place "
                "and return it)")
        owner = self.opaque.get(g.key)
        if owner is not None:
            raise _refuse(self._node, f"it writes into memory that {owner.format_node()} (a "
                                      f"{type(self.facts.values[owner]).__name__}) holds, which later reads of it "
                                      "would not see")
        g.last_mutation = self._node
        path = self.path[target]
        if path is None or g.broken_by is not None or any(step.kind == "expand" for step in path):
            g.version += 1
            g.broken_by = self._node
            self.cur[target] = (new, g.version)
            return
        parents = [g.current]
        for step in path[:-1]:
            parents.append(self._forward(step, parents[-1]))
        value = new
        for i in range(len(path) - 1, -1, -1):
            value = self._inverse(path[i], parents[i], value)
        g.current = value
        g.version += 1
        self.cur[target] = (new, g.version)

    # -- the pass
    def run(self) -> fx.Graph:
        for node in self.gm.graph.nodes:
            self._node = node
            kind = mutation_kind(node, self.gm)
            if node.op == "output":
                self.graph.output(self.read(node.args[0]))
                continue
            if node.op == "placeholder":
                new = self.graph.node_copy(node, lambda a: a)
            elif kind is not None:
                mutation = _describe_mutation(node, kind, self)
                if isinstance(mutation, _Mutation):
                    self._apply(mutation)
                    continue
                new = mutation if mutation is not None else self.graph.node_copy(node, self._read_node)
            else:
                new = self.graph.node_copy(node, self._read_node)
            self.env[node] = new
            self._place(node, new)
        self.graph.lint()
        return self.graph

    def _apply(self, m: _Mutation) -> None:
        target = m.target
        new = m.build(self)
        self.mutate(target, new)
        node = m.node
        value = self.facts.values.get(node)
        self.env[node] = None if value is None else new
        if value is not None and value is self.facts.tensor(target) and target in self.group:
            # ``y = x.add_(1)`` returns x itself: y is one more name of the mutated value
            self.group[node], self.path[node], self.cur[node] = self.group[target], self.path[target], self.cur[target]

    def _place(self, node: fx.Node, new: fx.Node) -> None:
        """Put a fresh node into the alias group of the values it shares storage with."""
        t = self.facts.tensor(node)
        if t is None and isinstance(self.facts.values.get(node), (tuple, list)):
            items = [v for v in self.facts.values[node] if isinstance(v, torch.Tensor)]
            groups = {self.by_storage[k] for k in map(_storage, items) if k in self.by_storage}
            if groups:
                self.seqs[node] = {g: g.version for g in groups}
            return
        key = _storage(t) if t is not None else None
        if key is None:
            return
        g = self.by_storage.get(key)
        if g is None:
            self.by_storage[key] = g = _Group(node, new)
            g.key = key
            self.group[node], self.path[node], self.cur[node] = g, [], (new, 0)
            return
        self.group[node], self.cur[node] = g, (new, g.version)
        view = _view_steps(node, self.facts)
        if view is not None and self.group.get(view[0]) is g and self.path.get(view[0]) is not None:
            self.path[node] = self.path[view[0]] + view[1]
            return
        root = self.facts.tensor(g.root)
        if root is not None and _same_view(t, root):
            self.path[node] = []  # the same memory as the root (e.g. `.to()` that returned its input)
            return
        base = next((a for a in node.all_input_nodes if self.facts.tensor(a) is not None
                     and _same_view(t, self.facts.tensor(a)) and self.path.get(a) is not None
                     and self.group.get(a) is g), None)
        self.path[node] = list(self.path[base]) if base is not None else None


def _replay(step: _Step, x: torch.Tensor, facts: _Facts) -> torch.Tensor:
    k, a = step.kind, step.args
    if k == "slice":
        dim, start, stop, st = (facts.value(v) for v in a)
        return x[(slice(None),) * dim + (slice(start, stop, st),)]
    if k == "select":
        return x.select(a[0], facts.value(a[1]))
    if k == "unsqueeze":
        return x.unsqueeze(a[0])
    if k == "squeeze":
        return x.squeeze(a[0])
    if k == "transpose":
        return x.transpose(*a)
    if k == "permute":
        return x.permute(*a)
    if k == "reshape":
        return facts.tensor(step.orig)
    return x


# --------------------------------------------------------------------------- new values
def _cast(rw: _Rewriter, new: fx.Node, dtype_now: Optional[torch.dtype], want: torch.dtype, aten_graph: bool) -> fx.Node:
    if dtype_now == want:
        return new
    if aten_graph:
        return rw.call("call_function", aten._to_copy.default, (new,), {"dtype": want})
    return rw.call("call_method", "to", (new, want))


def _probe(fn: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Optional[torch.dtype]:
    """dtype of the out-of-place op on the example values (they have the right dtypes and shapes)."""
    try:
        with torch.no_grad():
            out = fn(*args, **kwargs)
    except Exception:
        return None
    return out.dtype if isinstance(out, torch.Tensor) else None


def _describe_mutation(node: fx.Node, kind: str, rw: _Rewriter) -> Any:
    """The mutation ``node`` performs; or, when it turns out to mutate nothing, the pure node
    emitted in its place, or None to copy it as it is."""
    facts = rw.facts
    if kind == "module":
        mod = rw.gm.get_submodule(node.target)
        pure = copy.copy(mod)  # shallow: shares parameters, own ``inplace`` flag
        pure.inplace = False
        rw.gm.set_submodule(node.target, pure)
        return _Mutation(node, node.args[0], lambda r: r.call("call_module", node.target, r.read(node.args),
                                                                r.read(dict(node.kwargs))))
    if kind == "iop":
        fn = _iop_twin(node)
        target = node.args[0]
        value = facts.values.get(target)
        if isinstance(value, torch.Tensor):
            return _Mutation(node, target, lambda r: _pure_call(r, node, "call_function", fn, node.args, {}, target))
        if isinstance(value, (list, dict, set, bytearray)):
            raise _refuse(node, f"it extends a {type(value).__name__} in place")
        return rw.call("call_function", fn, rw.read(node.args))  # ints, tuples: plain rebinding
    if kind == "setitem":
        return _setitem(node, rw)
    if kind == "inplace":
        bound = _bind(node.target, node.args, dict(node.kwargs))
        first = next(iter(bound.arguments.values())) if bound is not None else node.args[0]
        args, kwargs = node.args, dict(node.kwargs)
        if "inplace" in kwargs:
            kwargs["inplace"] = False
        else:
            params = list(inspect.signature(node.target).parameters)
            pos = params.index("inplace")
            args = tuple(False if i == pos else a for i, a in enumerate(args))
        return _Mutation(node, first, lambda r: r.call("call_function", node.target, r.read(args), r.read(kwargs)))
    if kind == "out":
        target = node.kwargs["out"]
        kwargs = {k: v for k, v in node.kwargs.items() if k != "out"}
        t, fn_out = facts.tensor(target), _probe_shape(node.target, facts.value(node.args), facts.value(kwargs))
        if t is None or fn_out is None or tuple(fn_out) != tuple(t.shape):
            raise _refuse(node, "out= is not one tensor of the result's shape")
        return _Mutation(node, target, lambda r: _pure_call(r, node, "call_function", node.target, node.args, kwargs,
                                                              target))
    if kind == "aten":
        schema = node.target._schema
        written = [i for i, a in enumerate(schema.arguments) if a.alias_info is not None and a.alias_info.is_write]
        if written != [0]:
            raise _refuse(node, f"{node.target} writes to argument(s) {written}")
        name = node.target._schema.name.split("::")[-1]
        special = _special_method(node, name, node.args[0], node.args[1:], dict(node.kwargs), aten_graph=True)
        if special is not None:
            return special
        packet = getattr(aten, name[:-1], None) if name.endswith("_") else None
        twin = getattr(packet, node.target._overloadname, None) if packet is not None else None
        if twin is None or twin._schema.is_mutable:
            raise _refuse(node, f"{node.target} has no out-of-place form")
        return _Mutation(node, node.args[0], lambda r: _pure_call(r, node, "call_function", twin, node.args,
                                                                    dict(node.kwargs), node.args[0], aten_graph=True))
    # "method" / "function"
    if kind == "method":
        name = node.target if node.op == "call_method" else node.target.__name__
        target, rest = node.args[0], node.args[1:]
        if facts.tensor(target) is None:
            return None  # not a tensor method call after all (e.g. a dict's ``update_``)
        special = _special_method(node, name, target, rest, dict(node.kwargs), aten_graph=False)
        if special is not None:
            return special
        if name in _NO_TWIN or not hasattr(torch.Tensor, name[:-1]):
            raise _refuse(node, f"Tensor.{name} has no out-of-place form mari_fx can use")
        return _Mutation(node, target, lambda r: _pure_call(r, node, "call_method", name[:-1], node.args,
                                                              dict(node.kwargs), target))
    twin = _FUNCTION_TWINS[node.target]
    name = getattr(node.target, "__name__", "")
    target = node.args[0] if node.args else next(iter(node.kwargs.values()))
    special = _special_method(node, name, target, node.args[1:], dict(node.kwargs), aten_graph=False)
    if special is not None:
        return special
    if name in _NO_TWIN:
        raise _refuse(node, f"{name} has no out-of-place form mari_fx can use")
    return _Mutation(node, target, lambda r: _pure_call(r, node, "call_function", twin, node.args,
                                                          dict(node.kwargs), target))


def _iop_twin(node: fx.Node) -> Any:
    if node.op == "call_function":
        return _IOPS[node.target]
    name = node.target[3:-2]  # "__iadd__" -> "add"
    fn = getattr(operator, name, None) or getattr(operator, name + "_", None)
    if fn is None:
        raise _refuse(node, f"no out-of-place form of {node.target}")
    return fn


def _probe_shape(fn: Any, args: Any, kwargs: Dict[str, Any]) -> Optional[torch.Size]:
    try:
        with torch.no_grad():
            out = fn(*args, **kwargs)
    except Exception:
        return None
    return out.shape if isinstance(out, torch.Tensor) else None


def _pure_call(rw: _Rewriter, node: fx.Node, op: str, fn: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any],
               target: fx.Node, aten_graph: bool = False) -> fx.Node:
    new = rw.call(op, fn, rw.read(tuple(args)), rw.read(kwargs))
    want = rw.facts.tensor(target).dtype
    call = (lambda *a, **k: getattr(a[0], fn)(*a[1:], **k)) if op == "call_method" else fn
    return _cast(rw, new, _probe(call, rw.facts.value(tuple(args)), rw.facts.value(kwargs)), want, aten_graph)


def _special_method(node: fx.Node, name: str, target: fx.Node, rest: Tuple[Any, ...], kwargs: Dict[str, Any],
                    aten_graph: bool) -> Optional[_Mutation]:
    """``zero_``, ``fill_``, ``copy_`` (no same-named pure twin) and ops that change no value."""
    if name in _NO_VALUE_CHANGE:
        return _Mutation(node, target, lambda r: r.read(target))
    if name == "zero_":
        return _Mutation(node, target, lambda r: r.call("call_function", torch.zeros_like, (r.read(target),)))
    if name in ("fill_", "copy_"):
        src = rest[0] if rest else kwargs.get("value", kwargs.get("src"))
        return _Mutation(node, target, lambda r: _overwrite(r, r.read(target), target, src, whole=name == "copy_"))
    return None


def _overwrite(rw: _Rewriter, dest: Any, dest_fact_node: Any, value: Any, whole: bool = False,
               dest_fact: Optional[torch.Tensor] = None) -> Any:
    """A tensor like ``dest`` filled with ``value`` (broadcast, cast to dest's dtype)."""
    d = dest_fact if dest_fact is not None else rw.facts.tensor(dest_fact_node)
    v = rw.facts.value(value)
    if not isinstance(v, torch.Tensor):
        return rw.call("call_function", torch.full_like, (dest, rw.read(value)))
    if tuple(v.shape) == tuple(d.shape):
        new = rw.read(value)
        dtype = v.dtype
    else:
        mask = rw.call("call_function", torch.ones_like, (dest,), {"dtype": torch.bool})
        new = rw.call("call_function", torch.where, (mask, rw.read(value), dest))
        dtype = torch.result_type(v, d)
    if v.device != d.device:
        new = rw.call("call_method", "to", (new, d.device))
    return _cast(rw, new, dtype, d.dtype, aten_graph=False)


def _setitem(node: fx.Node, rw: _Rewriter) -> Optional[_Mutation]:
    target, index, value = node.args[0], node.args[1], node.args[2]
    x = rw.facts.tensor(target)
    if x is None:
        v = rw.facts.values.get(target)
        if isinstance(v, (list, dict)):
            raise _refuse(node, f"it assigns into a {type(v).__name__}")
        return None
    steps = _index_steps(index, x.ndim)
    if steps is not None:
        def build(r: _Rewriter) -> Any:
            parents, fact = [r.read(target)], x
            facts_along = [x]
            for s in steps:
                parents.append(r._forward(s, parents[-1]))
                fact = _replay(s, fact, r.facts)
                facts_along.append(fact)
            out = _overwrite(r, parents[-1], None, value, dest_fact=facts_along[-1])
            for i in range(len(steps) - 1, -1, -1):
                out = r._inverse(steps[i], parents[i], out)
            return out
        return _Mutation(node, target, build)
    idx = index if isinstance(index, tuple) else (index,)
    v = rw.facts.value(value)
    mask = rw.facts.tensor(idx[0]) if len(idx) == 1 and isinstance(idx[0], fx.Node) else None
    if (mask is not None and mask.dtype == torch.bool and tuple(mask.shape) == tuple(x.shape[:mask.ndim])
            and (not isinstance(v, torch.Tensor) or v.ndim == 0)):
        def build_mask(r: _Rewriter) -> Any:
            m = r.read(idx[0])
            for _ in range(x.ndim - mask.ndim):
                m = r.call("call_method", "unsqueeze", (m, -1))
            return r.call("call_method", "masked_fill", (r.read(target), m, r.read(value)))
        return _Mutation(node, target, build_mask)
    # advanced indexing: index_put with None for the whole-dim slices
    if Ellipsis in idx or any(isinstance(i, slice) and i != slice(None) for i in idx) or not all(
            isinstance(i, slice) or isinstance(rw.facts.values.get(i) if isinstance(i, fx.Node) else None, torch.Tensor)
            for i in idx):
        raise _refuse(node, "it assigns through an index that mixes tensors with ints or partial slices")

    def build_put(r: _Rewriter) -> Any:
        indices = [None if isinstance(i, slice) else r.read(i) for i in idx]
        vals = r.read(value)
        if isinstance(v, torch.Tensor):
            vals = _cast(r, vals, v.dtype, x.dtype, aten_graph=False)
        else:
            vals = r.call("call_function", torch.scalar_tensor, (vals,), {"dtype": x.dtype})
        return r.call("call_function", aten.index_put.default, (r.read(target), indices, vals))
    return _Mutation(node, target, build_put)


# --------------------------------------------------------------------------- driver
class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm, garbage_collect_values=False)
        self.values: Dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        try:
            out = super().run_node(n)
        except MariError as e:  # e.g. guard_state refusing a write into a buffer: keep its type
            raise type(e)(f"{e} (at node {n.name}: {n.format_node()})") from e
        except Exception as e:
            raise TraceError(f"running the model on the example inputs failed at node {_where(n)}: "
                             f"{type(e).__name__}: {e}") from e
        self.values[n] = out
        if isinstance(out, (int, float, bool)):
            n.meta[FACT_KEY] = out
        return out


def _clone_example(value: Any) -> Any:
    return fx.node.map_aggregate(value, lambda v: v.clone() if isinstance(v, torch.Tensor) else v)


def functionalize(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite ``gm`` in place into pure ops (see the module docstring) and return it.

    Graphs without mutations are returned untouched.  Otherwise the graph is run once on
    ``gm.meta["mari_fx.example"]`` (the flat example inputs by placeholder name, which
    :func:`mari_fx.trace` sets), on clones and under ``torch.no_grad()``, to learn dtypes
    and which values share memory.

    Example:
        >>> import torch
        >>> from mari_fx.frontend.capture import capture
        >>> class M(torch.nn.Module):
        ...     def forward(self, x):
        ...         h = x * 2
        ...         v = h[:, :2]
        ...         v.add_(1.0)   # changes h too
        ...         h[:, 2] = 5.0
        ...         return h
        >>> gm = capture(M())
        >>> gm.meta["mari_fx.example"] = {"x": torch.zeros(2, 3)}
        >>> gm = functionalize(gm)
        >>> any(mutation_kind(n, gm) for n in gm.graph.nodes)
        False
        >>> gm(torch.zeros(1, 3)).tolist()
        [[1.0, 1.0, 5.0]]
        >>> print(gm.code.strip())  # doctest: +NORMALIZE_WHITESPACE
        def forward(self, x):
            mul = x * 2;  x = None
            getitem = mul[(slice(None, None, None), slice(None, 2, None))]
            add = getitem.add(1.0);  getitem = None
            slice_scatter = torch.slice_scatter(mul, add, 1, None, 2, 1);  mul = add = None
            getitem_1 = slice_scatter[(slice(None, None, None), 2)]
            full_like = torch.full_like(getitem_1, 5.0);  getitem_1 = None
            select_scatter = torch.select_scatter(slice_scatter, full_like, 1, 2);  slice_scatter = full_like = None
            return select_scatter
    """
    if not any(mutation_kind(n, gm) is not None for n in gm.graph.nodes):
        return gm
    example = gm.meta.get(EXAMPLE_KEY)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if example is None or any(p.target not in example for p in placeholders):
        raise TraceError("functionalize needs the example inputs in gm.meta['mari_fx.example'] "
                         "(a dict by placeholder name) to make the graph's in-place ops functional")
    _refuse_state_mutations_statically(gm)
    recorder = _Recorder(gm)
    with torch.no_grad():
        recorder.run(*[_clone_example(example[p.target]) for p in placeholders])
    graph = _Rewriter(gm, _Facts(recorder.values)).run()
    for n in gm.graph.nodes:
        n.meta.pop(FACT_KEY, None)
    for n in graph.nodes:
        n.meta.pop(FACT_KEY, None)
    gm.graph = graph
    gm.recompile()
    return gm


def _refuse_state_mutations_statically(gm: fx.GraphModule) -> None:
    """Name a mutated parameter / buffer before anything runs (shared tables are the user's own)."""
    for node in gm.graph.nodes:
        kind = mutation_kind(node, gm)
        if kind is None:
            continue
        target = node.kwargs.get("out") if kind == "out" else node.args[0] if node.args else None
        while isinstance(target, fx.Node):
            if target.op == "get_attr":
                raise DeclarationError(
                    f"{_where(node)} updates {target.target!r} in place: mari_fx transforms stateless inference "
                    "forwards; move the update out of forward (or compute the new value out of place and return it)")
            if target.op in ("call_method", "call_function") and target.args and _static_alias(target):
                target = target.args[0]
            else:
                break


def _static_alias(node: fx.Node) -> bool:
    """Ops that always return a view (ops that only sometimes do are checked on the example)."""
    t = node.target
    if t is operator.getitem:
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        return not any(isinstance(i, (fx.Node, list)) for i in index)
    return (t in ("narrow", "select", "unsqueeze", "squeeze", "transpose", "t", "permute", "view", "detach",
                  "view_as", "expand", "expand_as", torch.narrow, torch.select, torch.unsqueeze, torch.squeeze,
                  torch.transpose, torch.t, torch.permute, torch.detach, aten.slice.Tensor, aten.select.int,
                  aten.view.default, aten.alias.default, aten.detach.default, aten.unsqueeze.default,
                  aten.transpose.int, aten.permute.default, aten.expand.default)
            or t is builtins.getattr and node.args[1] in ("T", "mT", "data"))


def is_mutating(node: fx.Node) -> bool:
    """True for a node that may change one of its inputs (dead-code elimination must keep it)."""
    gm = node.graph.owning_module
    try:
        return mutation_kind(node, gm) is not None
    except AttributeError:
        return True


# --------------------------------------------------------------------------- tag rules of the ops this pass emits
def _scatter_rule(ctx: Any) -> Any:
    """``slice_scatter`` / ``select_scatter`` write a view value back into its base: row-wise
    when they write along a non-batch dim and ``src`` keeps its rows in dim 0."""
    from ..analysis.tags import Side, join_all

    base, src = ctx.arg(0), ctx.arg(1, "src")
    if ctx.input_side() == Side.CONST:
        return ctx.result(Side.CONST)
    nd = ctx.ndim(base)
    dim = ctx.norm_dim(ctx.arg(2, "dim", 0), nd)
    select = ctx.node.target in (torch.select_scatter, aten.select_scatter.default)
    if dim is None or dim == 0:
        start, end, step = (ctx.arg(3, "start", None), ctx.arg(4, "end", None), ctx.arg(5, "step", 1))
        if select or dim != 0 or not (start in (None, 0) and (end is None or isinstance(end, int) and end >= _BIG)
                                      and step == 1):
            return ctx.refuse("writes rows of the batch dimension")
    batched = [n for n in (base, src) if ctx.side(n) != Side.CONST]
    if isinstance(src, fx.Node) and ctx.side(src) != Side.CONST and ctx.ndim(src) != (nd - 1 if select else nd):
        return ctx.refuse("src's dims do not line up with the base's batch dimension")
    return ctx.result(join_all(ctx.side(n) for n in batched))


def _register_rules() -> None:
    from ..analysis.rules import register

    register(torch.slice_scatter, torch.select_scatter, aten.slice_scatter.default,
             aten.select_scatter.default)(_scatter_rule)


_register_rules()
