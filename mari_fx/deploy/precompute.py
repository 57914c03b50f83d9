"""Item-side precompute: item-only work once per catalog item instead of once per request.

After MaRI's split, the item part of a request is a function of the candidate alone: item
embeddings, item towers, and the item product ``i @ W_i.T`` of every split Linear.
:func:`precompute_items` evaluates that part once over a *catalog* (one row per item) and
stores it in buffers of a new module ``P``; ``P`` takes ``item_row`` ([N] int64, each
candidate's catalog row) instead of the catalog inputs and gathers the cached rows.

How the cached values are found, on the transformed module ``T``'s graph:

* *catalog-only* nodes: a catalog input, or a node run at N rows (``node.meta["mari_fx.rows"]``)
  that is row-wise on item data (tag side ITEM, or a column op the lowering added) and whose
  inputs are catalog-only, weights, batch-free constants (rows ``C``) or the batch size N read as
  a size (``h.view(N, -1)``; read as a value, ``h * N``, it is a request value, not an item's).
  A split Linear whose item input is catalog-only has its item product taken out of the
  :class:`~mari_fx.runtime.modules.SplitLinear` call (``F.linear(item, W_i)``, added after) so it can
  be cached too; the module of ``T`` is not changed.
* *what to cache* is a minimum cut of the catalog-only subgraph between the catalog inputs and
  the nodes that read it (the frontier): every value the rest of the graph reads is cached
  (gathered at request time) or recomputed from cached values, at the least per-candidate cost.
  Costs, per candidate row, in FLOP-equivalents: gathering a value costs ``byte_cost`` (default 4)
  per byte (a random-row read from an M-row table); recomputing a node costs its FLOPs plus 1 per
  byte it writes (a streaming write), ``byte_cost`` per byte for a lookup (no FLOPs, reads
  weights: an embedding is a gather too), nothing for a view.
  Both are measured on a sample of catalog rows (``torch.utils.flop_counter``).

``P.refresh(catalog)`` recomputes the buffers after a catalog or weight update, using ``P``'s
current weights.  ``P`` is a :class:`PrecomputedModule` (an ``fx.GraphModule`` subclass); it
survives ``copy.deepcopy`` and ``torch.save`` / ``torch.load(weights_only=False)`` with its
buffers, its ``meta`` (record, request spec) and ``refresh``; per-node ``meta`` does not survive
pickling (torch re-traces a GraphModule's code on load).  See docs/precompute.md.
"""
from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ..report.flops import count_flops as _count_flops  # noqa: F401  (registers the in-place GEMMs with the flop counter)
from ..frontend.capture import copy_model
from ..errors import DeclarationError, MariError, RequestError
from ..analysis.example_prop import VALUE_KEY, TensorInfo
from ..frontend.inputs import REQUEST_KEY, USER_INDEX, InputSpec, RequestSpec, _request_spec
from ..runtime.modules import SplitLinear
from ..runtime.checks import Retracer, check_request
from ..runtime.paths import BoundGraphModule, bind_paths
from ..report.record import RECORD_KEY, CacheRecord, Record
from ..analysis.tags import ROWS_KEY, TAG_KEY, SeqTag, Side
from ..registry import CATALOG_KINDS

ITEM_ROW = "item_row"
from ..meta import ITEM_PRODUCT_KEY as _PRODUCT, PRECOMPUTE_KEY  # noqa: E402  (P.meta: what refresh needs)
CACHE_PREFIX = "item_cache_"
BYTE_COST = 4.0  # FLOP-equivalents per gathered byte; a written byte counts 1 (see module docstring)
CHUNK_ROWS = 16384
_SAMPLE_ROWS = 61  # rows the costs are measured on (odd, so a batch dim is unlikely to equal a feature dim)
_INF = float("inf")
_EPS = 1e-6  # ties: recompute nothing that costs the same to cache

__all__ = ["ITEM_ROW", "CatalogKind", "PrecomputedModule", "check_item_row", "plan_item_cache", "precompute_items", "refresh"]


# --------------------------------------------------------------------------- run-time check
def check_item_row(item_row: torch.Tensor, user_index: torch.Tensor, cache: torch.Tensor) -> None:
    """Raise :class:`RequestError` unless ``item_row`` is int64 ``[N]`` with values in ``[0, M)``.

    ``M`` is the row count of ``cache`` (a cached buffer), ``N`` the length of ``user_index``.
    Under ``torch.export`` / ``torch.compile`` the range check is a tensor-side assert
    (``torch._assert_async``: no host sync, no data-dependent size); eagerly and in TorchScript
    it reads the min and max.

    Example:
        >>> import torch
        >>> check_item_row(torch.tensor([0, 4]), torch.tensor([0, 0]), torch.zeros(5, 3))
        >>> check_item_row(torch.tensor([0, 5]), torch.tensor([0, 0]), torch.zeros(5, 3))
        Traceback (most recent call last):
        ...
        mari_fx.errors.RequestError: item_row has value 5 but the catalog has 5 rows (0..4): item_row gives each candidate's row in the catalog P was built from
    """
    if item_row.dtype != torch.int64:
        raise RequestError("item_row must have dtype torch.int64, got " + str(item_row.dtype))
    if item_row.dim() != 1:
        raise RequestError("item_row must be 1-d ([N]), got " + str(item_row.dim()) + " dims")
    n = user_index.size(0)
    if item_row.size(0) != n:
        raise RequestError("item_row has " + str(item_row.size(0)) + " entries but user_index has " + str(n)
                           + " (one catalog row per candidate)")
    m = cache.size(0)
    if torch.jit.is_scripting() or not torch.compiler.is_compiling():
        if n > 0:
            lo = int(item_row.min())
            hi = int(item_row.max())
            if lo < 0:
                raise RequestError("item_row has a negative value " + str(lo))
            if hi >= m:
                raise RequestError("item_row has value " + str(hi) + " but the catalog has " + str(m) + " rows (0.."
                                   + str(m - 1) + "): item_row gives each candidate's row in the catalog P was built from")
    else:
        torch._assert_async(((item_row >= 0) & (item_row < m)).all(), "mari_fx: item_row out of range [0, M)")


# --------------------------------------------------------------------------- catalog input kinds
@dataclass(frozen=True)
class CatalogKind:
    """How a non-tensor item input kind (``InputSpec.kind``, e.g. TorchRec's ``"kjt"``) can be a
    catalog input; registered in ``mari_fx.registry.CATALOG_KINDS`` (an extension's
    ``ext.add(CATALOG_KINDS, kind, CatalogKind(...))``).

    * ``expected(spec, info)``: what a catalog value must match (``info``: the placeholder's
      ``node.meta["mari_fx.value"]``); stored in ``P`` for :func:`refresh` (picklable).
    * ``rows(name, value, expected)``: the value's row count M; raises :class:`DeclarationError`
      naming ``catalog[name]`` (and the key at fault) when it does not match.
    * ``take(value, start, stop)``: rows ``[start, stop)``, a value of the same kind.
    * ``prepare(work, placeholder, spec, user_index)`` (optional): rewrites a copy of ``T``'s graph
      so that the item-only work on this input is computed by nodes that read it alone (e.g. an
      embedding module called on the item keys only), before the catalog-only nodes are found.

    Example (a list-of-rows kind; TorchRec's ``"kjt"`` entry is ``torchrec_integration.catalog.CATALOG``):
        >>> kind = CatalogKind(expected=lambda spec, info: None, rows=lambda name, v, want: len(v),
        ...                    take=lambda v, a, b: v[a:b])
        >>> kind.rows("ids", [[1], [], [2, 3]], None), kind.take([[1], [], [2, 3]], 1, 3)
        (3, [[], [2, 3]])
    """

    expected: Callable[[InputSpec, Any], Any]
    rows: Callable[[str, Any, Any], int]
    take: Callable[[Any, int, int], Any]
    prepare: Optional[Callable[[fx.GraphModule, fx.Node, InputSpec, fx.Node], None]] = None


def _take(kind: Optional[str], value: Any, start: int, stop: int) -> Any:
    if kind is None:
        return value[start:stop]
    return CATALOG_KINDS.first(kind).take(value, start, stop)


# --------------------------------------------------------------------------- the module
@dataclass
class _CatalogProgram:
    """What :meth:`PrecomputedModule.refresh` needs: the catalog program (catalog inputs ->
    cached values; its graph is re-bound to ``P``'s current weights on every refresh) and the
    expected catalog inputs (name -> (feature shape, dtype))."""

    program: fx.GraphModule
    inputs: Dict[str, Tuple[Tuple[int, ...], torch.dtype]]
    buffers: Tuple[str, ...]
    chunk_rows: int
    kinds: Dict[str, str] = field(default_factory=dict)  # catalog inputs of a CatalogKind: name -> kind


class PrecomputedModule(BoundGraphModule):
    """The module :func:`precompute_items` returns: ``T`` with item-only work read from buffers.

    Called like ``T`` except that the catalog inputs are replaced by ``item_row``.
    """

    def refresh(self, catalog: Mapping[str, torch.Tensor], *, chunk_rows: Optional[int] = None,
                progress: Optional[bool] = None) -> "PrecomputedModule":
        """Recompute every cached buffer from ``catalog`` (same keys as at build time; the row
        count may change) with ``P``'s current weights; returns ``self``.  Module-level spelling:
        :func:`refresh`."""
        return refresh(self, catalog, chunk_rows=chunk_rows, progress=progress)

    def __reduce__(self):
        # GraphModule pickles as a plain GraphModule re-traced from its code and drops ``meta``:
        # keep the class and the meta (record, request spec, catalog program).
        fn, args = super().__reduce__()
        return (_unpickle_precomputed, (fn, args, dict(self.meta)))


class _Retracer(Retracer):
    """The tracer torch re-traces a pickled GraphModule's code with: mari_fx's run-time checks
    (control flow on tensor values) stay calls instead of being traced through."""

    def __init__(self, *args: Any, **kwargs: Any):
        from .programs import assert_request

        from ..runtime.checks import GRAPH_FUNCTIONS

        kwargs.setdefault("autowrap_functions", (check_item_row, check_request, assert_request, *GRAPH_FUNCTIONS))
        super().__init__(*args, **kwargs)


def _unpickle_precomputed(fn: Callable, args: Tuple, meta: Dict[str, Any]) -> PrecomputedModule:
    gm = fn(*args)
    P = PrecomputedModule(gm, gm.graph, class_name="MariPrecomputed")
    P._tracer_cls = _Retracer
    P.meta.update(meta)
    return bind_paths(P)


def refresh(P: PrecomputedModule, catalog: Mapping[str, torch.Tensor], *, chunk_rows: Optional[int] = None,
            progress: Optional[bool] = None) -> PrecomputedModule:
    """Recompute ``P``'s cached buffers from ``catalog`` with ``P``'s current weights (in place).

    Example:
        >>> import torch, mari_fx
        >>> from mari_fx.testing.examples import CoarseRanker
        >>> T = mari_fx.transform(CoarseRanker().eval(), ["user"], (torch.randn(4, 16), torch.randn(4, 8)))
        >>> P = mari_fx.precompute_items(T, {"item": torch.randn(100, 8)})
        >>> new_items = torch.randn(120, 8)
        >>> _ = refresh(P, {"item": new_items})
        >>> u, rows = torch.randn(1, 16), torch.tensor([3, 119])
        >>> idx = torch.zeros(2, dtype=torch.int64)
        >>> torch.allclose(P(user=u, item_row=rows, user_index=idx), T(user=u, item=new_items[rows], user_index=idx), atol=1e-5)
        True
    """
    info = P.meta.get(PRECOMPUTE_KEY) if isinstance(P, fx.GraphModule) else None
    if not isinstance(info, _CatalogProgram):
        raise DeclarationError(f"expected a module made by mari_fx.precompute_items, got {type(P).__name__}")
    missing = sorted(set(info.inputs) - set(catalog))
    if missing:
        raise DeclarationError(f"catalog lacks {missing}: refresh needs every catalog input P was built from "
                               f"({sorted(info.inputs)})")
    extra = sorted(set(catalog) - set(info.inputs))
    if extra:
        raise DeclarationError(f"catalog key(s) {extra} are not catalog inputs of P ({sorted(info.inputs)}); "
                               "to cache other inputs, build P again from T with precompute_items")
    kinds = getattr(info, "kinds", {})
    m = _check_catalog({k: catalog[k] for k in info.inputs}, info.inputs, kinds)
    program = fx.GraphModule(P, info.program.graph)  # P's current weights, by name
    values = _evaluate(program, [catalog[k] for k in info.inputs], m, chunk_rows or info.chunk_rows, progress,
                       [kinds.get(k) for k in info.inputs])
    for name, value in zip(info.buffers, values):
        old = getattr(P, name)
        if value.shape[1:] != old.shape[1:] or value.dtype != old.dtype:
            raise MariError(f"internal: refreshed cache {name} is {tuple(value.shape)} {value.dtype}, "
                            f"was {tuple(old.shape)} {old.dtype}")
        P.register_buffer(name, value)
    record = P.meta.get(RECORD_KEY)
    if isinstance(record, Record):
        P.meta[RECORD_KEY] = replace(record, catalog_size=m, item_cache=tuple(
            replace(c, bytes=c.bytes_per_row * m) for c in record.item_cache))
    return P


# --------------------------------------------------------------------------- the plan
@dataclass
class _Plan:
    work: fx.GraphModule           # a copy of T, split products exposed
    catalog: Tuple[str, ...]       # catalog input names, in T's order
    cset: List[fx.Node]            # catalog-only nodes of work, in graph order
    cached: List[fx.Node]          # the cut
    recomputed: Set[fx.Node]       # catalog-only nodes P computes from cached values
    records: List[CacheRecord]     # per cached value (bytes for 0 rows; set per catalog size)


def plan_item_cache(T: fx.GraphModule, catalog_inputs: Sequence[str], sample: Mapping[str, torch.Tensor], *,
                    byte_cost: float = BYTE_COST, kinds: Optional[Mapping[str, str]] = None) -> _Plan:
    """Which values of ``T`` to cache for ``catalog_inputs``, with costs measured on ``sample``
    (a few catalog rows per input).  :func:`precompute_items` and ``mari-fx report
    --catalog-size`` use it; ``plan.records`` lists the cached values.  ``kinds``: the catalog
    inputs of a :class:`CatalogKind` (name -> ``InputSpec.kind``); the others are tensors.

    Example:
        >>> import torch, mari_fx
        >>> from mari_fx.testing.examples import CoarseRanker
        >>> T = mari_fx.transform(CoarseRanker().eval(), ["user"], (torch.randn(4, 16), torch.randn(4, 8)))
        >>> [(r.source, r.width, r.flops_saved_per_candidate) for r in plan_item_cache(T, ["item"], {"item": torch.randn(8, 8)}).records]
        [('fusion.0 (item product)', 64, 1024)]
    """
    work = copy_model(T)
    names = tuple(catalog_inputs)
    graph = work.graph
    ph = {n.target: n for n in graph.nodes if n.op == "placeholder"}
    user_index = ph.get(USER_INDEX)
    if user_index is None:
        raise DeclarationError("T has no user_index input: pass a module made by mari_fx.transform")
    kinds = dict(kinds or {})
    specs = {s.name: s for s in _request_spec(T).inputs}
    for k in names:
        prepare = CATALOG_KINDS.first(kinds[k]).prepare if k in kinds else None
        if prepare is not None:
            prepare(work, ph[k], specs[k], user_index)
    modules = dict(work.named_modules())

    cset = _catalog_only(graph, {ph[k] for k in names}, user_index)
    _expose_split_products(work, graph, modules, cset)
    cset = _catalog_only(graph, {ph[k] for k in names}, user_index)
    order = [n for n in graph.nodes if n in cset]
    frontier = [n for n in order if any(u not in cset and not _foldable(u) and not _is_check(u) for u in n.users)]

    costs = _measure(work, order, names, user_index, sample, kinds)
    cached, recomputed = _min_cut(order, cset, frontier, costs, byte_cost)
    _unexpose(graph, [n for n in order if n.meta.get(_PRODUCT) and n not in cached], cset)
    order = [n for n in order if n in cset]
    recomputed &= cset
    records = _records(order, cached, recomputed, costs, modules)
    return _Plan(work, names, order, cached, recomputed, records)




def _is_split_call(n: fx.Node, modules) -> bool:
    return n.op == "call_module" and isinstance(modules.get(n.target), SplitLinear)


def _expose_split_products(work: fx.GraphModule, graph: fx.Graph, modules, cset: Set[fx.Node]) -> None:
    """``split(u, i, idx[, b])`` with a catalog-only ``i`` or ``b`` -> ``split(u, None, idx[, None])
    + F.linear(i, W_i) [+ F.linear(b, W_b)]``: the products become nodes that can be cached."""
    for n in list(graph.nodes):
        if not _is_split_call(n, modules) or n.kwargs:
            continue
        args = list(n.args) + [None] * (4 - len(n.args))
        parts = [(1, "item", "weight_item"), (3, "broadcast", "weight_broadcast")]
        take = [(k, kind, w) for k, kind, w in parts if isinstance(args[k], fx.Node) and args[k] in cset
                and getattr(modules[n.target], w) is not None]
        if not take:
            continue
        users = list(n.users)
        out = n
        new_args = list(args)
        for k, kind, wname in take:
            with graph.inserting_after(out):
                w = graph.get_attr(f"{n.target}.{wname}")
            with graph.inserting_after(w):
                prod = graph.call_function(F.linear, (args[k], w))
            with graph.inserting_after(prod):
                add = graph.call_function(operator.add, (out, prod))
            prod.meta.update({ROWS_KEY: "N", _PRODUCT: (n, kind), VALUE_KEY: None})
            add.meta.update({ROWS_KEY: "N", _PRODUCT + ".add": prod})
            new_args[k] = None
            out = add
        n.args = tuple(new_args[:len(n.args)])
        for u in users:
            u.replace_input_with(n, out)


def _unexpose(graph: fx.Graph, products: List[fx.Node], cset: Set[fx.Node]) -> None:
    """Put back the products the cut does not cache: the split call computes them fused."""
    for prod in reversed(products):
        call, kind = prod.meta[_PRODUCT]
        add = next(u for u in prod.users if u.meta.get(_PRODUCT + ".add") is prod)
        args = list(call.args)
        args[1 if kind == "item" else 3] = prod.args[0]
        call.args = tuple(args)
        add.replace_all_uses_with(add.args[0])
        w = prod.args[1]
        graph.erase_node(add)
        graph.erase_node(prod)
        graph.erase_node(w)
        cset.discard(prod)


def _n_size(n: Any, user_index: fx.Node) -> bool:
    """``user_index.size(0)``: the batch size N the lowering reads off ``user_index``."""
    return (isinstance(n, fx.Node) and n.op == "call_method" and n.target == "size"
            and tuple(n.args) == (user_index, 0) and not n.kwargs)


# Ops whose every positional argument after the tensor is a size: N read there shapes the
# value (``h.view(N, -1)``, ``torch.zeros(N, k)``), and the catalog program reads its own row count
_SIZE_ARG_METHODS = {"view", "reshape", "expand", "unflatten", "new_zeros", "new_ones", "new_empty"}
_SIZE_ARG_FUNCTIONS = {torch.reshape, torch.zeros, torch.ones, torch.empty, torch.ops.aten.view.default,
                       torch.ops.aten.reshape.default, torch.ops.aten.expand.default, torch.ops.aten.zeros.default,
                       torch.ops.aten.ones.default, torch.ops.aten.empty.memory_format,
                       torch.ops.aten.new_zeros.default, torch.ops.aten.new_ones.default,
                       torch.ops.aten.new_empty.default}


def _n_as_size(n: fx.Node, a: fx.Node) -> bool:
    """``a`` (the batch size N) is read by ``n`` only as a size.  Read as a value (``h * N``,
    ``torch.full(..., N)``) it makes ``n`` depend on the request, not on the item alone."""
    sized = (n.op == "call_method" and n.target in _SIZE_ARG_METHODS) or (
        n.op == "call_function" and n.target in _SIZE_ARG_FUNCTIONS)
    in_kwargs: List[fx.Node] = []
    fx.node.map_arg(n.kwargs, in_kwargs.append)
    return sized and a not in in_kwargs and (n.op != "call_method" or n.args[0] is not a)


def _foldable(n: fx.Node) -> bool:
    """A batch-free size (rows ``C``) with a known value, e.g. ``item.size(1)``: P folds it."""
    if n.meta.get(ROWS_KEY) != "C" or n.op not in ("call_method", "call_function"):
        return False
    v = n.meta.get(VALUE_KEY)
    return isinstance(v, (int, float, bool)) or (isinstance(v, tuple) and all(isinstance(x, int) for x in v))


def _is_check(n: fx.Node) -> bool:
    """A request check the lowering added (no tag, no rows, nothing reads it)."""
    return n.op == "call_function" and TAG_KEY not in n.meta and ROWS_KEY not in n.meta and not n.users


def _row_value(n: fx.Node) -> bool:
    """A tensor with rows (a size or count of item tensors, ``i.numel()``, is the request's, not
    an item's); nodes the lowering added carry no value summary and are tensors."""
    value = n.meta.get(VALUE_KEY)
    return value is None or (isinstance(value, TensorInfo) and value.ndim >= 1)


def _catalog_only(graph: fx.Graph, catalog: Set[fx.Node], user_index: fx.Node) -> Set[fx.Node]:
    """Forward pass: nodes that depend on catalog inputs only, row-wise in the item dimension."""
    out: Set[fx.Node] = set(catalog)
    for n in graph.nodes:
        if n in out or n.op not in ("call_function", "call_method", "call_module") or n.meta.get(ROWS_KEY) != "N":
            continue
        tag = n.meta.get(TAG_KEY)
        if tag is not None and (isinstance(tag, SeqTag) or tag.side != Side.ITEM):
            continue  # ITEM tags are row-wise (rules refuse batch coupling as MIXED); untagged: lowering's column ops
        if not _row_value(n):
            continue
        inputs = n.all_input_nodes
        if any(a in out for a in inputs) and all(
                a in out or a.op == "get_attr" or (_n_size(a, user_index) and _n_as_size(n, a))
                or (a.meta.get(ROWS_KEY) == "C" and _foldable(a))
                for a in inputs):
            out.add(n)
    return out


# --------------------------------------------------------------------------- costs
@dataclass
class _Cost:
    flops: float          # per row
    bytes: float          # per row of the output (a tensor), else inf
    view: bool            # shares storage with an input: free to recompute
    lookup: bool          # no FLOPs, reads weights (an embedding lookup): recomputing it is a gather
    row_tensor: bool      # a tensor with the catalog rows in dim 0: can be cached and gathered
    shape: Tuple[int, ...]
    dtype: Optional[torch.dtype]


def _program(work: fx.GraphModule, nodes: Sequence[fx.Node], names: Sequence[str], user_index: fx.Node,
             outputs: Sequence[fx.Node], root: Optional[torch.nn.Module] = None) -> fx.GraphModule:
    """The catalog program: catalog inputs -> ``outputs``, computing ``nodes`` (catalog-only)."""
    g = fx.Graph()
    env: Dict[fx.Node, Any] = {}
    first = None
    for n in work.graph.nodes:
        if n.op == "placeholder" and n.target in names:
            env[n] = g.placeholder(n.target)
            first = first if first is not None else env[n]
    keep = set(nodes)

    def arg(a: fx.Node) -> Any:
        if a in env:
            return env[a]
        if a.op == "get_attr":
            env[a] = g.get_attr(a.target)
        elif _n_size(a, user_index):
            env[a] = g.call_method("size", (first, 0))
        elif _foldable(a):
            return a.meta[VALUE_KEY]
        else:
            raise MariError(f"internal: catalog program reads {a.format_node()}")
        return env[a]

    for n in work.graph.nodes:
        if n in keep and n.op != "placeholder":
            env[n] = g.node_copy(n, arg)
    g.output(tuple(env[o] for o in outputs))
    return fx.GraphModule(root if root is not None else work, g, class_name="MariCatalogProgram")


class _Meter(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.flops: Dict[str, int] = {}
        self.views: Dict[str, bool] = {}
        self.values: Dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        with FlopCounterMode(display=False) as fc:
            out = super().run_node(n)
        self.flops[n.name] = fc.get_total_flops()
        ins = [self.env[a] for a in n.all_input_nodes if isinstance(self.env.get(a), torch.Tensor)]
        self.views[n.name] = isinstance(out, torch.Tensor) and any(
            x.untyped_storage().data_ptr() == out.untyped_storage().data_ptr() for x in ins)
        self.values[n.name] = out
        return out


def _measure(work, order, names, user_index, sample, kinds) -> Dict[fx.Node, _Cost]:
    rows = {_check_catalog({name: sample[name]}, None, kinds) for name in names}
    k = min(rows) if rows else 0
    k = min(k, _SAMPLE_ROWS)
    if k < 1:
        raise DeclarationError("the catalog sample has no rows")
    program = _program(work, order, names, user_index, [n for n in order if n.op != "placeholder"])
    meter = _Meter(program)
    by_name = {n.name: n for n in program.graph.nodes}
    taken = {name: _take(kinds.get(name), sample[name], 0, k) for name in names}
    with torch.no_grad():
        meter.run(*[taken[name] for name in names])
    costs: Dict[fx.Node, _Cost] = {}
    for n in order:
        value = meter.values[by_name[n.name].name] if n.op != "placeholder" else taken[n.target]
        tensor = isinstance(value, torch.Tensor)
        row = tensor and value.dim() >= 1 and value.shape[0] == k
        costs[n] = _Cost(
            flops=meter.flops.get(n.name, 0) / k if n.op != "placeholder" else _INF,
            bytes=value.numel() * value.element_size() / k if row else _INF,
            view=meter.views.get(n.name, False), row_tensor=row,
            lookup=n.op != "placeholder" and meter.flops.get(n.name, 0) == 0 and _reads_weights(work, n),
            shape=tuple(value.shape[1:]) if row else (), dtype=value.dtype if tensor else None)
    return costs


def _reads_weights(work: fx.GraphModule, n: fx.Node) -> bool:
    if n.op == "call_module":
        mod = work.get_submodule(n.target)
        return any(True for _ in mod.parameters()) or any(True for _ in mod.buffers())
    return any(a.op == "get_attr" for a in n.all_input_nodes)


# --------------------------------------------------------------------------- the cut
def _min_cut(order, cset, frontier, costs, byte_cost) -> Tuple[List[fx.Node], Set[fx.Node]]:
    """Minimum-cost choice of cached (S) and recomputed (R) catalog-only nodes.

    A minimum-weight closure: variables ``need[v]`` (v in S or R) and ``redo[v]`` (v in R), with
    ``redo[v] => need[v]``, ``redo[v] => need[w]`` for each catalog-only input ``w``, ``need[f]``
    for each frontier node ``f``, and for a value that cannot be gathered ``need[v] => redo[v]``.
    Weight: ``need[v]``: gather cost; ``redo[v]``: recompute cost minus gather cost."""
    big = 1e15
    weight: Dict[Tuple[str, fx.Node], float] = {}
    edges: List[Tuple[Any, Any]] = []
    for v in order:
        c = costs[v]
        gather = byte_cost * c.bytes if c.row_tensor else big
        write = byte_cost if c.lookup else 1.0
        redo = big if v.op == "placeholder" else (0.0 if c.view else c.flops + write * min(c.bytes, big)) + _EPS
        if c.row_tensor:
            weight[("need", v)], weight[("redo", v)] = gather, redo - gather
        else:
            weight[("need", v)], weight[("redo", v)] = 0.0, redo
            edges.append((("need", v), ("redo", v)))
        edges.append((("redo", v), ("need", v)))
        edges += [(("redo", v), ("need", w)) for w in v.all_input_nodes if w in cset]
    closure = _min_closure(weight, edges, [("need", f) for f in frontier])
    cached = [v for v in order if ("need", v) in closure and ("redo", v) not in closure]
    recomputed = {v for v in order if ("redo", v) in closure}
    if any(v.op == "placeholder" for v in recomputed) or any(not costs[v].row_tensor for v in cached):
        raise DeclarationError("no way to cache the item-only values of T for this catalog: a catalog-only value "
                               "that the rest of the graph reads has no row per item")
    return cached, recomputed


def _min_closure(weight: Dict[Any, float], edges: List[Tuple[Any, Any]], forced: List[Any]) -> Set[Any]:
    """The minimum-weight set closed under ``edges`` (a => b) containing ``forced``: a min s-t cut."""
    cap: Dict[Any, Dict[Any, float]] = {}

    def add(a, b, c):
        cap.setdefault(a, {}).setdefault(b, 0.0)
        cap[a][b] += c
        cap.setdefault(b, {}).setdefault(a, 0.0)

    s, t = ("s",), ("t",)
    for x, w in weight.items():
        if w < 0:
            add(s, x, -w)
        elif w > 0:
            add(x, t, w)
    for a, b in edges:
        add(a, b, _INF)
    for f in forced:
        add(s, f, _INF)
    while True:  # Edmonds-Karp: these graphs have tens of nodes
        parent = {s: None}
        queue = [s]
        for x in queue:
            for y, c in cap.get(x, {}).items():
                if c > 1e-12 and y not in parent:
                    parent[y] = x
                    queue.append(y)
        if t not in parent:
            break
        path, y = [], t
        while parent[y] is not None:
            path.append((parent[y], y))
            y = parent[y]
        f = min(cap[a][b] for a, b in path)
        if math.isinf(f):
            raise MariError("internal: unbounded cut in the item-cache plan")
        for a, b in path:
            cap[a][b] -= f
            cap[b][a] += f
    return {x for x in parent if x not in (s, t)}


def _describe(n: fx.Node, modules) -> str:
    prod = n.meta.get(_PRODUCT)
    if prod is not None:
        call, kind = prod
        return f"{call.target} ({kind} product)"
    if n.op == "call_module":
        return str(n.target)
    if n.op == "placeholder":
        return f"input {n.target}"
    return n.name


def _records(order, cached, recomputed, costs, modules) -> List[CacheRecord]:
    """Per cached value: its width and the FLOPs per candidate no longer spent at request time
    (each catalog-only node the cut leaves to the catalog program, counted once, under the first
    cached value it feeds)."""
    counted: Set[fx.Node] = set(recomputed)
    out, taken = [], set()
    for v in cached:
        source = _describe(v, modules)
        base = CACHE_PREFIX + "".join(ch if ch.isalnum() else "_" for ch in source.replace(" product)", "").replace(" (", "_")).strip("_")
        name, k = base, 1
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        taken.add(name)
        saved, stack = 0.0, [v]
        while stack:
            x = stack.pop()
            if x in counted or x not in costs:
                continue
            counted.add(x)
            if x.op != "placeholder":
                saved += costs[x].flops
            stack += [w for w in x.all_input_nodes if w in costs]
        c = costs[v]
        out.append(CacheRecord(
            name=name, source=source, shape=c.shape,
            width=int(math.prod(c.shape)), dtype=str(c.dtype).replace("torch.", ""),
            bytes_per_row=int(c.bytes), bytes=0, flops_saved_per_candidate=int(round(saved))))
    return out


# --------------------------------------------------------------------------- building P
def _check_catalog(catalog: Mapping[str, Any], expected: Optional[Mapping[str, Any]],
                   kinds: Optional[Mapping[str, str]] = None) -> int:
    """The catalog's row count M, after checking every value against ``expected`` (None: only
    count the rows)."""
    m = None
    first = None
    kinds = kinds or {}
    for name in (expected if expected is not None else catalog):
        t = catalog[name]
        if name in kinds:
            rows = CATALOG_KINDS.first(kinds[name]).rows(name, t, expected[name] if expected is not None else None)
            if m is None:
                m, first = rows, name
            elif rows != m:
                raise DeclarationError(f"catalog[{name!r}] has {rows} rows but catalog[{first!r}] has {m}: "
                                       "every catalog input has one row per catalog item")
            continue
        if expected is None:
            m = t.shape[0] if m is None else min(m, t.shape[0])
            continue
        shape, dtype = expected[name]
        if not isinstance(t, torch.Tensor):
            raise DeclarationError(f"catalog[{name!r}] must be a tensor, got {type(t).__name__}")
        if t.dim() != len(shape) + 1 or tuple(t.shape[1:]) != tuple(shape):
            raise DeclarationError(f"catalog[{name!r}] has shape {tuple(t.shape)}; T's input {name!r} needs "
                                   f"[M{''.join(', ' + str(d) for d in shape)}] (one row per catalog item)")
        if t.dtype != dtype:
            raise DeclarationError(f"catalog[{name!r}] has dtype {t.dtype}; T's input {name!r} has {dtype}")
        if m is None:
            m, first = t.shape[0], name
        elif t.shape[0] != m:
            raise DeclarationError(f"catalog[{name!r}] has {t.shape[0]} rows but catalog[{first!r}] has {m}: "
                                   "every catalog input has one row per catalog item")
    if not m:
        raise DeclarationError("the catalog is empty: give at least one item row")
    return m


def _evaluate(program: fx.GraphModule, inputs: List[Any], m: int, chunk_rows: int,
              progress: Optional[bool], kinds: Optional[Sequence[Optional[str]]] = None) -> List[torch.Tensor]:
    chunks: List[List[torch.Tensor]] = []
    starts = range(0, m, max(1, chunk_rows))
    show = progress if progress is not None else m > 4 * chunk_rows
    if show:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="mari_fx: precomputing item cache", unit="chunk")
    with torch.no_grad():
        for s in starts:
            out = program(*[_take(kind, t, s, min(s + chunk_rows, m)) for kind, t in zip(kinds or [None] * len(inputs), inputs)])
            chunks.append(list(out))
    return [torch.cat([c[k] for c in chunks]) for k in range(len(chunks[0]))]


def _resolve(T: fx.GraphModule, spec: RequestSpec, key: str) -> InputSpec:
    by_name = {s.name: s for s in spec.inputs}
    by_source = {s.source: s for s in spec.inputs}
    s = by_name.get(key) or by_source.get(key)
    if s is None:
        raise DeclarationError(f"catalog key {key!r} is not an input of T; T's item inputs: "
                               f"{[i.name for i in spec.inputs if i.side != Side.USER]}")
    if s.side == Side.USER:
        raise DeclarationError(f"catalog key {key!r} is a user input of T; a catalog holds item-side inputs "
                               f"({[i.name for i in spec.inputs if i.side != Side.USER]})")
    if s.kind not in ("tensor", "dict", "packed") and s.kind not in CATALOG_KINDS:  # flat inputs of these kinds are tensors
        raise DeclarationError(f"catalog key {key!r} is a {s.kind!r} input: only tensor item inputs and inputs of a "
                               "kind registered in mari_fx.registry.CATALOG_KINDS can be catalog inputs")
    return s


def precompute_items(T: fx.GraphModule, catalog: Mapping[str, torch.Tensor], *, byte_cost: float = BYTE_COST,
                     chunk_rows: int = CHUNK_ROWS, progress: Optional[bool] = None) -> PrecomputedModule:
    """Compute ``T``'s item-only work once per catalog item; return ``P`` that gathers it by ``item_row``.

    Args:
        T: a module from :func:`mari_fx.transform` (left as it is; ``P`` holds a copy of its weights).
        catalog: item-side input name (or source, e.g. ``"x[item_id]"``) -> tensor with one row per
            catalog item (M rows, T's feature shape and dtype).  Item inputs not in the catalog stay
            request inputs of ``P``.
        byte_cost: FLOP-equivalents of one gathered byte (a written byte counts 1), for the choice
            of what to cache: cache where gathering is cheaper than recomputing.
        chunk_rows: catalog rows evaluated at a time; ``progress``: a tqdm bar (default: when M is large).

    Returns:
        ``P`` (:class:`PrecomputedModule`), called as ``P(**request)`` where ``request`` is T's minus
        the catalog inputs plus ``item_row`` ([N] int64, each candidate's catalog row).  Its buffers
        ``item_cache_*`` hold the cached values ([M, ...]); ``P.meta["mari_fx.record"].item_cache``
        lists them (width, bytes, FLOPs saved per candidate); ``P.refresh(catalog)`` recomputes them.

    Example:
        >>> import torch, mari_fx
        >>> from mari_fx.testing.examples import CoarseRanker
        >>> model = CoarseRanker().eval()
        >>> T = mari_fx.transform(model, ["user"], (torch.randn(4, 16), torch.randn(4, 8)))
        >>> items = torch.randn(1000, 8)                       # the catalog: one row per item
        >>> P = mari_fx.precompute_items(T, {"item": items})
        >>> u, rows, idx = torch.randn(2, 16), torch.tensor([7, 42, 999]), torch.tensor([0, 1, 1])
        >>> torch.allclose(P(user=u, item_row=rows, user_index=idx), model(u[idx], items[rows]), atol=1e-5)
        True
        >>> [(c.source, c.width, c.bytes) for c in P.meta["mari_fx.record"].item_cache]
        [('fusion.0 (item product)', 64, 256000)]
    """
    if not (isinstance(T, fx.GraphModule) and REQUEST_KEY in getattr(T, "meta", {})):
        raise DeclarationError(f"expected a module made by mari_fx.transform, got {type(T).__name__}")
    if PRECOMPUTE_KEY in T.meta:
        raise DeclarationError("T already reads an item cache (made by precompute_items): build P from the "
                               "transformed module T")
    if not catalog:
        raise DeclarationError("the catalog is empty: map at least one item input of T to a tensor")
    spec = _request_spec(T)
    resolved = {_resolve(T, spec, k).name: v for k, v in catalog.items()}
    if any(s.name == ITEM_ROW for s in spec.inputs if s.name not in resolved):
        raise DeclarationError(f"T already has an input named {ITEM_ROW!r}: rename it before precompute_items")
    example = T.meta.get("mari_fx.example") or {}
    phs = {n.target: n for n in T.graph.nodes if n.op == "placeholder"}
    names = tuple(s.name for s in spec.inputs if s.name in resolved)
    expected = {}
    specs = {s.name: s for s in spec.inputs}
    kinds = {name: specs[name].kind for name in names if specs[name].kind in CATALOG_KINDS}
    for name in names:
        info = phs[name].meta.get(VALUE_KEY)
        if name in kinds:
            expected[name] = CATALOG_KINDS.first(kinds[name]).expected(specs[name], info)
            continue
        if not isinstance(info, TensorInfo):
            raise DeclarationError(f"T's input {name!r} has no recorded shape: transform the model again")
        expected[name] = (tuple(info.shape[1:]), info.dtype)
    catalog = {k: resolved[k] for k in names}
    m = _check_catalog(catalog, expected, kinds)

    plan = plan_item_cache(T, names, catalog, byte_cost=byte_cost, kinds=kinds)
    work, graph = plan.work, plan.work.graph
    ph = {n.target: n for n in graph.nodes if n.op == "placeholder"}
    user_index = ph[USER_INDEX]
    buffers = [r.name for r in plan.records]
    program = _program(work, plan.cset, names, user_index, plan.cached, root=work)
    values = _evaluate(program, [catalog[k] for k in names], m, chunk_rows, progress, [kinds.get(k) for k in names])
    for name, value in zip(buffers, values):
        work.register_buffer(name, value)

    # item_row replaces the first catalog input; the check and the gathers come right after the inputs
    with graph.inserting_before(ph[names[0]]):
        item_row = graph.placeholder(ITEM_ROW)
    item_row.meta[ROWS_KEY] = "N"
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    program_only = set(plan.cset) - plan.recomputed
    with graph.inserting_after(last):
        first_buf = graph.get_attr(buffers[0])
    with graph.inserting_after(first_buf):
        check = graph.call_function(check_item_row, (item_row, user_index, first_buf))
    at = check
    for v, name in zip(plan.cached, buffers):
        buf = first_buf
        if name != buffers[0]:
            with graph.inserting_after(at):
                buf = at = graph.get_attr(name)
        with graph.inserting_after(at):
            gathered = graph.call_function(torch.index_select, (buf, 0, item_row))
        gathered.meta.update({ROWS_KEY: "N", VALUE_KEY: v.meta.get(VALUE_KEY), "mari_fx.cached": v.name})
        at = gathered
        for u in list(v.users):
            if u not in program_only and not _is_check(u):
                u.replace_input_with(v, gathered)
    for n in graph.nodes:  # split(...) + gathered product: add into the split's fresh output in place
        prod = n.meta.get(_PRODUCT + ".add")
        if prod is not None and len(n.args[0].users) == 1 and n.args[0].op == "call_module":
            n.op, n.target = "call_method", "add_"
    for n in list(graph.nodes):  # sizes read off catalog values: constants (the catalog's feature shape is checked)
        if _foldable(n) and any(a in program_only for a in n.all_input_nodes):
            value = n.meta[VALUE_KEY]
            for u in list(n.users):
                u.args, u.kwargs = fx.node.map_arg((u.args, u.kwargs), lambda a: value if a is n else a)
            graph.erase_node(n)
    for n in list(graph.nodes):
        if _is_check(n) and n is not check and n.target is check_request:
            _strip_inputs(n, {ph[k] for k in names})
    for n in reversed(list(graph.nodes)):
        if (n in program_only or n.op == "get_attr") and not n.users and n.op != "placeholder":
            graph.erase_node(n)
    for k in names:
        if ph[k].users:
            raise MariError(f"internal: {', '.join(u.format_node() for u in ph[k].users)} still reads catalog "
                            f"input {k!r}")
        graph.erase_node(ph[k])
    graph.lint()

    P = bind_paths(PrecomputedModule(work, graph, class_name="MariPrecomputed"))
    P._tracer_cls = _Retracer  # read by torch when it unpickles P (see __reduce__)
    P.meta.update(T.meta)
    new_inputs = []
    for s in spec.inputs:
        if s.name == names[0]:
            new_inputs.append(InputSpec(name=ITEM_ROW, arg=ITEM_ROW, side=Side.ITEM))
        if s.name not in names:
            new_inputs.append(s)
    args = tuple(dict.fromkeys(s.arg for s in new_inputs))
    P.meta[REQUEST_KEY] = RequestSpec(args=args, inputs=tuple(new_inputs), fixed=spec.fixed)
    if example:
        rows = example[USER_INDEX].shape[0] if USER_INDEX in example else next(
            v.shape[0] for v in example.values() if isinstance(v, torch.Tensor))
        ex = {k: v for k, v in example.items() if k not in names}
        ex[ITEM_ROW] = torch.arange(rows, dtype=torch.int64) % m
        P.meta["mari_fx.example"] = ex
    record = T.meta.get(RECORD_KEY)
    cache = tuple(replace(r, bytes=r.bytes_per_row * m) for r in plan.records)
    if isinstance(record, Record):
        P.meta[RECORD_KEY] = replace(record, inputs=tuple(new_inputs), catalog_inputs=names, catalog_size=m,
                                     item_cache=cache, byte_cost=byte_cost)
    P.meta[PRECOMPUTE_KEY] = _CatalogProgram(program=program, inputs=expected, buffers=tuple(buffers),
                                             chunk_rows=chunk_rows, kinds=kinds)
    return P


def _strip_inputs(check: fx.Node, removed: Set[fx.Node]) -> None:
    """Drop catalog inputs from a request check's input lists, with the names, shapes and dtypes at
    the same places: ``check_request(user_index, user_inputs, item_inputs, user_names, item_names,
    user_shapes, item_shapes, user_dtypes, item_dtypes)``, user lists at odd positions, item at even."""
    args = list(check.args)
    for side in (1, 2):
        inputs = args[side]
        keep = [j for j, x in enumerate(inputs) if x not in removed]
        for pos in range(side, len(args), 2):
            if isinstance(args[pos], (list, tuple)):
                args[pos] = type(args[pos])(args[pos][j] for j in keep)
    check.args = tuple(args)
