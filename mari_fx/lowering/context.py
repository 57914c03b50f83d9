"""The lowering context: what a lowering sees while a tagged pair-shaped graph is rewritten
into a request-shaped one (the driver, :mod:`mari_fx.lowering.driver`, walks the graph).

Every original node is re-emitted into a new graph at the *level* its tag allows:

* ``U`` -- USER-tagged values run at one row per user;
* ``C`` -- CONST values run once, as before;
* ``N`` -- everything else runs at N rows, exactly as in the pair-shaped model,
  on inputs *materialised* to N rows.

A column-segmented value is kept as :class:`Pieces` (its column blocks, user
blocks at U rows) until a consumer needs it whole; a Linear / matmul against a
parameter consumes pieces directly and is split (:class:`~mari_fx.runtime.modules.SplitLinear`).
User values are gathered to N rows (``index_select`` by ``user_index``) lazily,
once each, where they first meet item data.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
import torch.nn as nn

from .. import registry
from ..analysis import rules
from ..analysis.arguments import bind
from ..analysis.example_prop import VALUE_KEY, TensorInfo
from ..analysis.tags import NOTE_KEY, ROWS_KEY, TAG_KEY
from ..errors import MariError
from ..frontend.inputs import RequestSpec
from ..report.record import BroadcastRecord, LayerRecord
from .values import C, N, U, Blocks, Combo, Lazy, Pieces, Rows, Seq, Value

_MISSING = object()
# VALUE_KEY is ported for its feature dims; its dim 0 is the pair example's row count.
_META_TO_PORT = ("stack_trace", "nn_module_stack", "source_fn_stack", "torch_fn", TAG_KEY, NOTE_KEY, VALUE_KEY)


@dataclass(frozen=True)
class LowerOptions:
    split_matmuls: bool = True
    check_requests: bool = True
    # Fold a Linear over a combination (W(q - k) = Wq - Wk). Exact in real arithmetic, but its fp32
    # rounding scales with |Wq| + |Wk|, not |W(q - k)|: opt-in, like -ffast-math.
    reassociate: bool = False
    # Refuse a split whose gather and extra kernels cost more than the GEMM work it saves (cost.py);
    # False splits wherever it is exact (tests of the rewrite itself on tiny models).
    cost_model: bool = True


class LoweringContext:
    """What a lowering sees of the request-shaped graph being built: the public surface
    every lowering (core and extensions) uses, see docs/architecture.md.

    Attributes (read-only for lowerings): ``graph`` (the new ``fx.Graph``), ``gm`` (the copy
    of the tagged module that becomes ``T``'s root), ``modules`` (its submodules by path),
    ``options`` (:class:`LowerOptions`), ``spec`` (the request spec) and ``user_index`` (the
    ``[N]`` placeholder mapping candidates to users).

    Methods: :meth:`value` (an original node's lowered value), :meth:`materialize` (a value
    at N rows, as the pair-shaped model has it), :meth:`emit` / :meth:`emit_on` (re-emit an
    original node at a level / with one input replaced), :meth:`parts_of`,
    :meth:`from_parts`, :meth:`select_columns`, :meth:`select_column` (column pieces),
    :meth:`cat`, :meth:`weighted_sum`, :meth:`node_of`, :meth:`port_meta`,
    :meth:`num_users`, :meth:`num_candidates`, :meth:`add_submodule`, :meth:`call_count`,
    :meth:`record_layer`, and :meth:`state` (per-lowering state of an extension).
    """

    def __init__(self, gm: fx.GraphModule, spec: RequestSpec, options: LowerOptions):
        self.gm, self.spec, self.options = gm, spec, options
        self.graph = fx.Graph()
        self.modules = dict(gm.named_modules())
        self.env: Dict[fx.Node, Value] = {}
        self.materialized: Dict[int, Any] = {}
        self.gathered: Dict[Any, Any] = {}  # U-row node -> its index_select to N rows
        self.cats: Dict[Tuple[Any, ...], Any] = {}  # (level, *nodes) -> the cat of those nodes
        self.reemitted: Dict[fx.Node, Any] = {}
        self.layers: List[LayerRecord] = []
        self.broadcasts: List[BroadcastRecord] = []
        self.call_counts: Dict[str, int] = {}
        for n in gm.graph.nodes:
            if n.op == "call_module":
                self.call_counts[n.target] = self.call_counts.get(n.target, 0) + 1
        self._consumer: Optional[fx.Node] = None
        self._states: Dict[str, Any] = {}
        # Original MIXED nodes whose user elements a lowering computed at U rows (by element maps):
        # a tag rule's refusal there is no loss (the driver's record lists it as recovered).
        self.elements_at_u: set = set()

    def emit(self, node: fx.Node, level: str, convert: Optional[Callable[[Value], Any]] = None) -> Rows:
        """``node`` re-emitted at ``level`` (U, N or C), each input converted by ``convert``
        (default: as it is at U and C, :meth:`materialize`-d at N)."""
        if convert is None:
            convert = self.materialize if level == N else (
                lambda v: v.node if isinstance(v, Rows) else self.materialize(v))
        new = self._copy(node, lambda a: convert(self.value(a)), level)
        self.port_meta(node, new)
        new.meta[ROWS_KEY] = level
        return Rows(new, level, node)

    def emit_on(self, node: fx.Node, src: fx.Node, part: Any, level: str) -> Rows:
        """``node`` re-emitted with ``src`` replaced by ``part`` (one piece, block or term of it)
        and every other input as it is: how structured values apply an op piece by piece."""
        new = self._copy(node, lambda a: part if a is src else self.as_is(self.value(a)), level)
        self.port_meta(node, new)
        new.meta[ROWS_KEY] = level
        return Rows(new, level)

    def _copy(self, node: fx.Node, arg_transform, level: str) -> fx.Node:
        """``graph.node_copy``, except that at U rows a batch size in the batch position of a shape
        (:func:`mari_fx.analysis.rules.batch_dim_size_slot`, the predicate the rules use) becomes the
        number of users; a batch size anywhere else is the value N."""
        path = rules.batch_dim_size_slot(node) if level == U else None
        if path is None:
            return self.graph.node_copy(node, arg_transform)
        args, kwargs = rules.replace_at(node.args, node.kwargs, path, None)
        args, kwargs = fx.node.map_arg(args, arg_transform), fx.node.map_arg(kwargs, arg_transform)
        args, kwargs = rules.replace_at(args, kwargs, path, self.num_users())
        return self.graph.create_node(node.op, node.target, args, kwargs, node.name, node.type)

    def value(self, a: fx.Node) -> Value:
        """The lowered value of original node ``a`` (lowered already: nodes go in order)."""
        return self.env[a]

    def as_is(self, v: Value) -> Any:
        """A U- or C-row value's node as it is (an error for N-row values: they cannot run at U rows)."""
        if isinstance(v, Seq):
            return tuple(self.as_is(i) for i in v.items)
        if isinstance(v, Pieces) or v.level == N:
            raise MariError(f"internal: an N-row value reached {self._consumer.format_node()}, run at U rows")
        return v.node

    def materialize(self, v: Value) -> Any:
        """The value at N rows (as in the pair-shaped model); cached per value."""
        if isinstance(v, Seq):
            return tuple(self.materialize(i) for i in v.items)
        key = id(v)
        if key in self.materialized:
            return self.materialized[key][1]
        if isinstance(v, Pieces):
            out = self._materialize_pieces(v)
        elif isinstance(v, Blocks):
            out = self.graph.call_function(torch.cat, ([self.materialize(r) for _, _, r in v.parts], v.dim))
        elif isinstance(v, Combo):
            out = self._materialize_combo(v)
        elif isinstance(v, Lazy):  # compute it as the pair model does
            out = self.emit(v.orig, N, self.materialize).node
        elif v.level != U:
            return v.node
        elif _is_batched_tensor(v) and _from_sizes_only(v.orig):
            # torch.zeros(b, k) and the like: built at N rows it costs one write, less than
            # building it at U rows and gathering it (and it is what the pair model computes)
            out = self._reemit(v.orig)
        elif _is_batched_tensor(v) or _row_gather(v) is not None:
            gather = _row_gather(v)  # an extension's gather for a non-tensor value (e.g. a KeyedTensor)
            out = (self.graph.call_function(torch.index_select, (v.node, 0, self.user_index)) if gather is None
                   else self.graph.call_function(gather, (v.node, self.user_index)))
            out.meta[ROWS_KEY] = N
            self.broadcasts.append(BroadcastRecord(
                source=v.orig.name if v.orig is not None else v.node.name,
                at=self._consumer.name if self._consumer is not None else "output"))
        else:  # sizes and other non-tensors derived from user values: recompute at N
            out = self._reemit(v.orig)
        self.materialized[key] = (v, out)  # keep v alive so its id stays unique
        return out

    def _materialize_pieces(self, v: Pieces) -> Any:
        """Pieces at N rows.  Several user pieces are concatenated at U rows (sharing the cat a
        split layer already made of them) and gathered once; each run of adjacent user pieces is
        then a column view of that gather: one gather kernel instead of one per piece."""
        user = [r for lvl, _, r in v.parts if lvl == U]
        groupable = len(user) > 1 and all(isinstance(r, Rows) and _is_batched_tensor(r) and _row_gather(r) is None
                                          for r in user)
        if not groupable:
            return self.cat([self.materialize(r) for _, _, r in v.parts], N)
        gathered = self._gather(self.cat([r.node for r in user], U),
                                [r.orig.name if r.orig is not None else r.node.name for r in user])
        total = sum(w for lvl, w, _ in v.parts if lvl == U)
        nodes, pos, k = [], 0, 0
        parts = list(v.parts)
        while k < len(parts):
            lvl, w, r = parts[k]
            if lvl != U:
                nodes.append(self.materialize(r))
                k += 1
                continue
            start = pos
            while k < len(parts) and parts[k][0] == U:
                pos += parts[k][1]
                k += 1
            if start == 0 and pos == total:
                nodes.append(gathered)
            else:
                view = self.graph.call_function(operator.getitem, (gathered, (Ellipsis, slice(start, pos))))
                view.meta[ROWS_KEY] = N
                nodes.append(view)
        return self.cat(nodes, N)

    def _gather(self, node: Any, sources: List[str]) -> Any:
        """``node`` (a U-row tensor) at N rows: one ``index_select`` per node, recorded per source."""
        if node not in self.gathered:
            out = self.graph.call_function(torch.index_select, (node, 0, self.user_index))
            out.meta[ROWS_KEY] = N
            self.gathered[node] = out
        at = self._consumer.name if self._consumer is not None else "output"
        self.broadcasts.extend(BroadcastRecord(source=s, at=at) for s in sources)
        return self.gathered[node]

    def _materialize_combo(self, v: Combo) -> Any:
        if all(isinstance(self.value(a), Rows) for a in v.orig.all_input_nodes):
            return self.emit(v.orig, N, self.materialize).node  # as the pair model computes it
        # A combination of combinations: sum the user terms at U rows, gather once, add the rest.
        user = self.weighted_sum([(c, t.node) for c, t in v.terms if t.level == U], U)
        rest = [(c, self.materialize(t)) for c, t in v.terms if t.level != U]
        if user is not None:
            rest.insert(0, (1.0, self.materialize(Rows(user, U))))
        return self.weighted_sum(rest, N)

    def weighted_sum(self, terms: List[Tuple[float, Any]], level: str) -> Any:
        """``sum(c * t)`` of new-graph nodes ``t`` at ``level`` (no node for a single unit term)."""
        out = None
        for coeff, t in terms:
            # combinations are float-only (see combos); an int coefficient keeps any other dtype exact
            coeff = int(coeff) if float(coeff).is_integer() else coeff
            if out is None:
                out = t if coeff == 1.0 else self.graph.call_function(operator.mul, (t, coeff))
            elif coeff in (1.0, -1.0):
                out = self.graph.call_function(operator.add if coeff == 1.0 else operator.sub, (out, t))
            else:
                out = self.graph.call_function(operator.add, (out, self.graph.call_function(operator.mul, (t, coeff))))
            if isinstance(out, fx.Node):
                out.meta.setdefault(ROWS_KEY, level)
        return out

    def node_of(self, v: Union[Rows, Combo]) -> Any:
        """A part's node as it is (a combination materialised)."""
        return v.node if isinstance(v, Rows) else self.materialize(v)

    def _reemit(self, orig: fx.Node) -> Any:
        if orig not in self.reemitted:
            self.reemitted[orig] = self.emit(orig, N, self.materialize).node
        return self.reemitted[orig]

    def num_users(self) -> fx.Node:
        """The request's U (a ``size(0)`` node, emitted once)."""
        if self.u_rows is None:
            first_user = next(v.node for v in self.env.values() if isinstance(v, Rows) and v.level == U
                              and v.node.op == "placeholder")
            self.u_rows = self.graph.call_method("size", (first_user, 0))
        return self.u_rows

    def num_candidates(self) -> fx.Node:
        """The request's N (``user_index.size(0)``, emitted once)."""
        if self.n_rows is None:
            self.n_rows = self.graph.call_method("size", (self.user_index, 0))
        return self.n_rows

    def cat(self, nodes: Sequence[Any], level: str) -> Any:
        """``torch.cat(nodes, -1)`` at ``level`` (adjacent slices of one tensor rejoined; one node as is)."""
        nodes = _unslice(list(nodes))
        if len(nodes) == 1:
            return nodes[0]
        key = (level, *nodes)  # the same pieces joined twice (two split layers over one input): one cat
        if all(isinstance(n, fx.Node) for n in nodes) and key in self.cats:
            return self.cats[key]
        out = self.graph.call_function(torch.cat, (list(nodes), -1))
        out.meta[ROWS_KEY] = level
        if all(isinstance(n, fx.Node) for n in nodes):
            self.cats[key] = out
        return out

    def port_meta(self, src: fx.Node, dst: fx.Node) -> None:
        """Copy the allow-listed meta keys of original ``src`` onto new ``dst``."""
        dst.meta = {k: src.meta[k] for k in _META_TO_PORT if k in src.meta}

    def parts_of(self, a: Any) -> List[Tuple[str, int, Rows]]:
        """``a``'s column pieces ``(level, width, Rows)``; one piece for a value without pieces."""
        v = self.value(a)
        if isinstance(v, Pieces):
            return list(v.parts)
        if isinstance(v, (Lazy, Blocks)):
            v = Rows(self.materialize(v), N)
        return [(N if isinstance(v, Combo) else v.level, a.meta[VALUE_KEY].shape[-1], v)]

    def from_parts(self, parts: List[Tuple[str, int, Rows]]) -> Value:
        """A value from column pieces: one Rows when they share a level, else :class:`Pieces`."""
        levels = {lvl for lvl, _, _ in parts}
        if len(levels) == 1:
            (level,) = levels
            node = self.cat([self.node_of(r) for _, _, r in parts], level)
            if isinstance(node, fx.Node):
                node.meta.setdefault(ROWS_KEY, level)
            return parts[0][2] if len(parts) == 1 else Rows(node, level)
        return Pieces(tuple(parts))

    def select_columns(self, a: fx.Node, lo: int, hi: int, index_prefix: Tuple[Any, ...]) -> Value:
        """Columns [lo, hi) of a pieces value, each part sliced with ``index_prefix`` first."""
        out, pos = [], 0
        for level, width, rows in self.parts_of(a):
            s, e = max(lo, pos), min(hi, pos + width)
            if s < e:
                if s == pos and e == pos + width and all(i == slice(None) for i in index_prefix):
                    out.append((level, width, rows))
                else:
                    idx = index_prefix + (slice(s - pos, e - pos),)
                    node = self.graph.call_function(operator.getitem, (self.node_of(rows), idx))
                    node.meta[ROWS_KEY] = level
                    out.append((level, e - s, Rows(node, level)))
            pos += width
        return self.from_parts(out)

    def select_column(self, a: fx.Node, col: int, index_prefix: Tuple[Any, ...]) -> Value:
        """Column ``col`` of a pieces value (the last dim dropped), ``index_prefix`` applied first."""
        pos = 0
        for level, width, rows in self.parts_of(a):
            if pos <= col < pos + width:
                node = self.graph.call_function(operator.getitem, (self.node_of(rows), index_prefix + (col - pos,)))
                node.meta[ROWS_KEY] = level
                return Rows(node, level)
            pos += width
        raise MariError(f"internal: column {col} out of range at {a.format_node()}")

    def arg(self, node: fx.Node, i: int, name: Union[None, str, Tuple[str, ...]] = None, default: Any = _MISSING) -> Any:
        """Argument ``name`` of ``node`` (or the first of several spellings), read by name whatever mix
        of positional and keyword arguments the model used (:func:`mari_fx.analysis.arguments.bind`, as the
        rules read it); the ``i``-th positional argument where the signature is unknown."""
        module = self.modules.get(node.target) if node.op == "call_module" else None
        if default is _MISSING:
            return rules.RuleContext(node, module).arg(i, name)
        return rules.RuleContext(node, module).arg(i, name, default)

    def args(self, node: fx.Node) -> Optional[Dict[str, Any]]:
        """All of ``node``'s arguments by parameter name, defaults filled in; None where its
        signature is unknown (:func:`mari_fx.analysis.arguments.bind`)."""
        return bind(node, self.modules.get(node.target) if node.op == "call_module" else None)

    def lowered(self, a: Any) -> Optional[Value]:
        """The lowered value of ``a``, or None (not a node, or not lowered yet)."""
        return self.env.get(a) if isinstance(a, fx.Node) else None

    def mark_user_elements(self, node: fx.Node) -> None:
        """Note that the user elements of MIXED original ``node`` were computed at U rows (by its
        element map): the record then lists a rule's refusal there as recovered, not lost."""
        self.elements_at_u.add(node)

    def state(self, key: str, factory: Callable[[], Any]) -> Any:
        """Per-lowering state of an extension, created by ``factory()`` on first use (one
        lowering pass = one state; nothing is kept on the context's attributes)."""
        if key not in self._states:
            self._states[key] = factory()
        return self._states[key]

    def add_submodule(self, name: str, module: nn.Module) -> None:
        """Add ``module`` at path ``name`` of the new module (e.g. a :class:`SplitLinear`)."""
        self.gm.add_submodule(name, module)
        self.modules[name] = module

    def call_count(self, path: str) -> int:
        """How many ``call_module`` nodes of the original graph call the module at ``path``."""
        return self.call_counts.get(path, 0)

    def record_layer(self, record: LayerRecord) -> None:
        """Report what happened to a Linear-like layer (``T.meta["mari_fx.record"].layers``)."""
        self.layers.append(record)


def _is_batched_tensor(v: Rows) -> bool:
    """New nodes without an original (pieces, gathers) are always row tensors."""
    if v.orig is None:
        return True
    info = v.orig.meta.get(VALUE_KEY)
    return isinstance(info, TensorInfo) and info.ndim >= 1


def _is_data_free(info: Any) -> bool:
    if isinstance(info, tuple):
        return all(_is_data_free(i) for i in info)
    return isinstance(info, (int, float, bool, str, type(None), torch.dtype, torch.device, torch.Size))


def _from_sizes_only(orig: Optional[fx.Node]) -> bool:
    """A tensor computed from no tensor at all: a factory over sizes and constants
    (``torch.zeros(x.size(0), 4)``); its input nodes are sizes, not data."""
    if orig is None or orig.op != "call_function" or not orig.all_input_nodes:
        return False
    return all(VALUE_KEY in a.meta and _is_data_free(a.meta[VALUE_KEY]) for a in orig.all_input_nodes)


def _unslice(nodes: List[Any]) -> List[Any]:
    """``[x[..., 0:2], x[..., 2:5]]`` covering all of ``x`` in order -> ``[x]`` (no copy)."""
    if len(nodes) < 2 or not all(_col_slice(n) for n in nodes):
        return nodes
    srcs = {_col_slice(n)[0] for n in nodes}
    if len(srcs) != 1:
        return nodes
    (src,) = srcs
    pos = 0
    for n in nodes:
        _, s, e = _col_slice(n)
        if s != pos:
            return nodes
        pos = e
    info = src.meta.get(VALUE_KEY)
    placeholder_width = info.shape[-1] if isinstance(info, TensorInfo) else None
    return [src] if placeholder_width == pos else nodes


def _col_slice(n: Any):
    if not (isinstance(n, fx.Node) and n.op == "call_function" and n.target is operator.getitem):
        return None
    idx, src = n.args[1], n.args[0]
    if not (isinstance(idx, tuple) and len(idx) == 2 and isinstance(idx[1], slice) and idx[1].step is None
            and isinstance(src, fx.Node)):
        return None
    info = src.meta.get(VALUE_KEY)
    last = idx[0] is Ellipsis or (idx[0] == slice(None) and isinstance(info, TensorInfo) and info.ndim == 2)
    start, stop = idx[1].start or 0, idx[1].stop
    if last and isinstance(start, int) and start >= 0 and (stop is None or (isinstance(stop, int) and stop >= 0)):
        if stop is None and isinstance(info, TensorInfo):
            stop = info.shape[-1]
        return (src, start, stop) if stop is not None else None
    return None


# --------------------------------------------------------------------------- op lowerings
LOWERINGS = registry.LOWERINGS
LAZY_BUILDERS = registry.LAZY_BUILDERS


def register_lowering(*targets, priority: int = 0, override: bool = False):
    """Add ``fn(ctx: LoweringContext, node, module) -> Value or None`` as a core lowering of
    each target (a function, a method name, or a module class, matched along the MRO).  A
    target's lowerings are tried highest ``priority`` first; returning None defers to the next,
    then to the default (emit the node at its tag's level).  The registry policy (duplicates,
    ``override``) is :mod:`mari_fx.registry`'s."""

    def deco(fn):
        for t in targets:
            LOWERINGS.add(t, fn, priority=priority, override=override)
        return fn

    return deco


def register_row_gather(predicate, gather, rows=None, priority: int = 0) -> None:
    """Materialize a USER value whose example summary (``node.meta["mari_fx.value"]``) matches
    ``predicate`` at N rows as ``gather(value, user_index)`` (tensors use ``index_select``).
    ``rows(value)``, if given, is a tensor with one row per row of such a value: the request
    check then checks the row count of inputs of that type too."""
    registry.ROW_GATHERS.add(predicate, gather, priority=priority)
    if rows is not None:
        registry.ROW_TENSORS.add(predicate, rows, priority=priority)


def _row_gather(v: Rows):
    info = v.orig.meta.get(VALUE_KEY) if v.orig is not None else None
    return next(iter(registry.ROW_GATHERS.matching(info)), None) if info is not None else None
