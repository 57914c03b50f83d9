"""Transform pass: rewrite a tagged pair-shaped graph into a request-shaped one.

Every original node is re-emitted into a new graph at the *level* its tag allows:

* ``U`` -- USER-tagged values run at one row per user;
* ``C`` -- CONST values run once, as before;
* ``N`` -- everything else runs at N rows, exactly as in the pair-shaped model,
  on inputs *materialised* to N rows.

A column-segmented value is kept as :class:`Pieces` (its column blocks, user
blocks at U rows) until a consumer needs it whole; a Linear / matmul against a
parameter consumes pieces directly and is split (:class:`~mari_fx.modules.SplitLinear`).
User values are gathered to N rows (``index_select`` by ``user_index``) lazily,
once each, where they first meet item data.
"""
from __future__ import annotations

import copy
import dataclasses
import operator
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from . import rules
from .capture import copy_model
from .errors import MariError
from .example_prop import VALUE_KEY, TensorInfo
from .inputs import USER_INDEX, RequestSpec
from .modules import SplitLinear
from .record import BroadcastRecord, LayerRecord, Record, RefusalRecord
from .runtime import check_request
from .tags import NOTE_KEY, ROWS_KEY, TAG_KEY, SeqTag, Side, TensorTag

U, N, C = "U", "N", "C"
# VALUE_KEY is ported for its feature dims; its dim 0 is the pair example's row count.
_META_TO_PORT = ("stack_trace", "nn_module_stack", "source_fn_stack", "torch_fn", TAG_KEY, NOTE_KEY, VALUE_KEY)


@dataclass(frozen=True, eq=False)
class Rows:
    """One lowered value: ``node`` in the new graph, at ``level`` U, N or C."""

    node: Any
    level: str
    orig: Optional[fx.Node] = None  # set where the value may need re-emitting at N


@dataclass(frozen=True, eq=False)
class Pieces:
    """A tensor kept as column blocks along its last dim: ``(level, width, Rows)`` each."""

    parts: Tuple[Tuple[str, int, Rows], ...]


@dataclass(frozen=True, eq=False)
class Combo:
    """A MIXED tensor kept as ``sum(c * term)`` of U- and N-row tensors of its own shape
    (``q - k``, ``a + 2 * b``), so a Linear over it can fold the coefficients into its
    weight blocks: the user terms' share then runs at U rows (linearity through add/sub)."""

    orig: fx.Node
    terms: Tuple[Tuple[float, Rows], ...]


@dataclass(frozen=True, eq=False)
class Lazy:
    """A MIXED value not emitted yet: whoever needs it gets ``orig`` computed at N rows.
    Lets a consumer that knows better (see :mod:`mari_fx.interactions`) skip it."""

    orig: fx.Node


@dataclass(frozen=True, eq=False)
class Blocks:
    """A MIXED tensor kept as blocks along a non-batch, non-last dim ``dim``, e.g. the
    field axis of ``cat([user_fields, item_fields], dim=1)``: user blocks at U rows."""

    orig: fx.Node
    dim: int
    parts: Tuple[Tuple[str, int, Rows], ...]


@dataclass(frozen=True, eq=False)
class Seq:
    items: Tuple[Any, ...]


Value = Union[Rows, Pieces, Combo, Lazy, Blocks, Seq]


@dataclass(frozen=True)
class LowerOptions:
    split_matmuls: bool = True
    check_requests: bool = True


class Lowerer:
    """Builds the request-shaped graph; see the module docstring."""

    def __init__(self, gm: fx.GraphModule, spec: RequestSpec, options: LowerOptions):
        self.gm, self.spec, self.options = gm, spec, options
        self.graph = fx.Graph()
        self.modules = dict(gm.named_modules())
        self.env: Dict[fx.Node, Value] = {}
        self.materialized: Dict[int, Any] = {}
        self.reemitted: Dict[fx.Node, Any] = {}
        self.layers: List[LayerRecord] = []
        self.broadcasts: List[BroadcastRecord] = []
        self.call_counts: Dict[str, int] = {}
        for n in gm.graph.nodes:
            if n.op == "call_module":
                self.call_counts[n.target] = self.call_counts.get(n.target, 0) + 1
        self._consumer: Optional[fx.Node] = None

    # ----------------------------------------------------------------- driver
    def run(self) -> Tuple[fx.Graph, Record]:
        sides = {s.name: s.side for s in self.spec.inputs}
        nodes = list(self.gm.graph.nodes)
        for node in nodes:
            if node.op == "placeholder":
                new = self.graph.placeholder(node.target)
                self._port_meta(node, new)
                level = U if sides.get(node.target) == Side.USER else N
                new.meta[ROWS_KEY] = level
                self.env[node] = Rows(new, level, node)
        self.user_index = self.graph.placeholder(USER_INDEX)
        self.user_index.meta[ROWS_KEY] = N
        if self.options.check_requests:
            self._emit_check()
        self.n_rows = self.u_rows = None
        for node in nodes:
            if node.op == "placeholder":
                continue
            self._consumer = node
            if node.op == "output":
                out = fx.node.map_aggregate(node.args[0], lambda a: self._materialize(self._value(a)))
                self.graph.output(out)
                continue
            value = self._lower(node)
            self._check_level(node, value)
            self.env[node] = value
        self.graph.lint()
        return self.graph, self._record(nodes)

    def _emit_check(self) -> None:
        # tensors only: extensions check their own input kinds (e.g. KJTs) where they lower them
        tensors = [p for p in self.env if isinstance(p.meta.get(VALUE_KEY), TensorInfo)]
        users = [self.env[p] for p in tensors if self.env[p].level == U]
        items = [self.env[p] for p in tensors if self.env[p].level == N]
        self.graph.call_function(check_request, (
            self.user_index, [v.node for v in users], [v.node for v in items],
            [v.node.target for v in users], [v.node.target for v in items]))

    # ----------------------------------------------------------------- lowering
    def _lower(self, node: fx.Node) -> Value:
        tag = node.meta[TAG_KEY]
        module = self.modules.get(node.target) if node.op == "call_module" else None
        special = _LOWERINGS.get(type(module) if module is not None else node.target) if node.op != "get_attr" else None
        if special is not None:
            value = special(self, node, module)
            if value is not None:
                return value
        level = _level_of(tag)
        if level == U:
            return self._emit(node, U, self._as_is)
        if level == C:  # batch-free (e.g. a feature size): read it off whatever level its input has
            return self._emit(node, C, lambda v: v.node if isinstance(v, Rows) else self._materialize(v))
        for build in LAZY_BUILDERS:  # keep structure (linear combinations, field blocks) when possible
            lazy = build(self, node)
            if lazy is not None:
                return lazy
        return self._emit(node, N, self._materialize)

    def _emit(self, node: fx.Node, level: str, convert) -> Rows:
        new = self.graph.node_copy(node, lambda a: convert(self._value(a)))
        self._port_meta(node, new)
        new.meta[ROWS_KEY] = level
        return Rows(new, level, node)

    def _emit_on(self, node: fx.Node, src: fx.Node, part: Any, level: str) -> Rows:
        """``node`` re-emitted with ``src`` replaced by ``part`` (one piece, block or term of it)
        and every other input as it is: how structured values apply an op piece by piece."""
        new = self.graph.node_copy(node, lambda a: part if a is src else self._as_is(self._value(a)))
        self._port_meta(node, new)
        new.meta[ROWS_KEY] = level
        return Rows(new, level)

    def _value(self, a: fx.Node) -> Value:
        return self.env[a]

    def _as_is(self, v: Value) -> Any:
        if isinstance(v, Seq):
            return tuple(self._as_is(i) for i in v.items)
        if isinstance(v, Rows) and v.level == N and v.orig is not None and rules.is_batch_size_node(v.orig):
            return self._num_users()  # a batch size read off N-row data, used at U rows
        if isinstance(v, Pieces) or v.level == N:
            raise MariError(f"internal: an N-row value reached {self._consumer.format_node()}, run at U rows")
        return v.node

    def _materialize(self, v: Value) -> Any:
        """The value at N rows (as in the pair-shaped model); cached per value."""
        if isinstance(v, Seq):
            return tuple(self._materialize(i) for i in v.items)
        key = id(v)
        if key in self.materialized:
            return self.materialized[key][1]
        if isinstance(v, Pieces):
            out = self._cat([self._materialize(r) for _, _, r in v.parts], N)
        elif isinstance(v, Blocks):
            out = self.graph.call_function(torch.cat, ([self._materialize(r) for _, _, r in v.parts], v.dim))
        elif isinstance(v, Combo):
            out = self._materialize_combo(v)
        elif isinstance(v, Lazy):  # compute it as the pair model does
            out = self._emit(v.orig, N, self._materialize).node
        elif v.level != U:
            return v.node
        elif v.orig is not None and rules.is_batch_size_node(v.orig):
            out = self._num_candidates()
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

    def _materialize_combo(self, v: Combo) -> Any:
        if all(isinstance(self._value(a), Rows) for a in v.orig.all_input_nodes):
            return self._emit(v.orig, N, self._materialize).node  # as the pair model computes it
        # A combination of combinations: sum the user terms at U rows, gather once, add the rest.
        user = self._weighted_sum([(c, t.node) for c, t in v.terms if t.level == U], U)
        rest = [(c, self._materialize(t)) for c, t in v.terms if t.level != U]
        if user is not None:
            rest.insert(0, (1.0, self._materialize(Rows(user, U))))
        return self._weighted_sum(rest, N)

    def _weighted_sum(self, terms: List[Tuple[float, Any]], level: str) -> Any:
        out = None
        for coeff, t in terms:
            if out is None:
                out = t if coeff == 1.0 else self.graph.call_function(operator.mul, (t, coeff))
            elif coeff in (1.0, -1.0):
                out = self.graph.call_function(operator.add if coeff == 1.0 else operator.sub, (out, t))
            else:
                out = self.graph.call_function(operator.add, (out, self.graph.call_function(operator.mul, (t, coeff))))
            if isinstance(out, fx.Node):
                out.meta.setdefault(ROWS_KEY, level)
        return out

    def _node_of(self, v: Union[Rows, Combo]) -> Any:
        return v.node if isinstance(v, Rows) else self._materialize(v)

    def _reemit(self, orig: fx.Node) -> Any:
        if orig not in self.reemitted:
            self.reemitted[orig] = self._emit(orig, N, self._materialize).node
        return self.reemitted[orig]

    def _num_users(self) -> fx.Node:
        if self.u_rows is None:
            first_user = next(v.node for v in self.env.values() if isinstance(v, Rows) and v.level == U
                              and v.node.op == "placeholder")
            self.u_rows = self.graph.call_method("size", (first_user, 0))
        return self.u_rows

    def _num_candidates(self) -> fx.Node:
        if self.n_rows is None:
            self.n_rows = self.graph.call_method("size", (self.user_index, 0))
        return self.n_rows

    def _cat(self, nodes: Sequence[Any], level: str) -> Any:
        nodes = _unslice(list(nodes))
        if len(nodes) == 1:
            return nodes[0]
        out = self.graph.call_function(torch.cat, (list(nodes), -1))
        out.meta[ROWS_KEY] = level
        return out

    def _port_meta(self, src: fx.Node, dst: fx.Node) -> None:
        dst.meta = {k: src.meta[k] for k in _META_TO_PORT if k in src.meta}

    def _check_level(self, node: fx.Node, value: Value) -> None:
        tag = node.meta[TAG_KEY]
        if isinstance(tag, SeqTag) or isinstance(value, Seq):
            return
        want = "pieces" if tag.has_user_columns else _level_of(tag)
        got = "pieces" if isinstance(value, Pieces) else N if isinstance(value, (Combo, Lazy, Blocks)) else value.level
        # A value may be more precise than its tag (field blocks flattened into column pieces):
        # N-row consumers materialise it; only a claim of U rows must be backed by U rows.
        if want != got and want != N:
            raise MariError(f"internal: {node.format_node()} tagged {tag} was lowered to {got}, not {want}")

    # ----------------------------------------------------------------- pieces
    def _parts_of(self, a: Any) -> List[Tuple[str, int, Rows]]:
        v = self._value(a)
        if isinstance(v, Pieces):
            return list(v.parts)
        if isinstance(v, (Lazy, Blocks)):
            v = Rows(self._materialize(v), N)
        return [(N if isinstance(v, Combo) else v.level, a.meta[VALUE_KEY].shape[-1], v)]

    def _from_parts(self, parts: List[Tuple[str, int, Rows]]) -> Value:
        levels = {lvl for lvl, _, _ in parts}
        if len(levels) == 1:
            (level,) = levels
            node = self._cat([self._node_of(r) for _, _, r in parts], level)
            if isinstance(node, fx.Node):
                node.meta.setdefault(ROWS_KEY, level)
            return parts[0][2] if len(parts) == 1 else Rows(node, level)
        return Pieces(tuple(parts))

    def _select_columns(self, a: fx.Node, lo: int, hi: int, index_prefix: Tuple[Any, ...]) -> Value:
        """Columns [lo, hi) of a pieces value, each part sliced with ``index_prefix`` first."""
        out, pos = [], 0
        for level, width, rows in self._parts_of(a):
            s, e = max(lo, pos), min(hi, pos + width)
            if s < e:
                if s == pos and e == pos + width and all(i == slice(None) for i in index_prefix):
                    out.append((level, width, rows))
                else:
                    idx = index_prefix + (slice(s - pos, e - pos),)
                    node = self.graph.call_function(operator.getitem, (self._node_of(rows), idx))
                    node.meta[ROWS_KEY] = level
                    out.append((level, e - s, Rows(node, level)))
            pos += width
        return self._from_parts(out)

    def _select_column(self, a: fx.Node, col: int, index_prefix: Tuple[Any, ...]) -> Value:
        pos = 0
        for level, width, rows in self._parts_of(a):
            if pos <= col < pos + width:
                node = self.graph.call_function(operator.getitem, (self._node_of(rows), index_prefix + (col - pos,)))
                node.meta[ROWS_KEY] = level
                return Rows(node, level)
            pos += width
        raise MariError(f"internal: column {col} out of range at {a.format_node()}")

    # ----------------------------------------------------------------- records
    def _record(self, nodes: List[fx.Node]) -> Record:
        refusals, hoisted = [], []
        for n in nodes:
            if n.op in ("placeholder", "output", "get_attr"):
                continue
            note = n.meta.get(NOTE_KEY)
            if note:
                refusals.append(RefusalRecord(node=n.name, op=_describe(n, self.modules), reason=note,
                                              location=_location(n)))
            v = self.env.get(n)
            if isinstance(v, Rows) and v.level == U and _is_compute(n):
                hoisted.append(_qualname(n))
        return Record(
            inputs=self.spec.inputs,
            layers=tuple(self.layers),
            hoisted=tuple(hoisted),
            broadcasts=tuple(self.broadcasts),
            refused=tuple(refusals),
            split_matmuls=self.options.split_matmuls,
            capture=self.gm.meta.get("mari_fx.capture", "torch.fx"),
        )


# --------------------------------------------------------------------------- helpers
def _level_of(tag) -> str:
    if isinstance(tag, SeqTag):
        # A tuple with some USER items is computed at U rows; its non-USER items (e.g. an RNN's
        # final state, batch in dim 1) are recomputed at N rows by whoever reads them.
        sides = {t.side for t in tag.items}
        side = Side.USER if Side.USER in sides else tag.side
    else:
        side = tag.side
    return U if side == Side.USER else C if side == Side.CONST else N


def _is_batched_tensor(v: Rows) -> bool:
    info = v.orig.meta.get(VALUE_KEY) if v.orig is not None else None
    if v.orig is None:
        return True
    return isinstance(info, TensorInfo) and info.ndim >= 1


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
    idx = n.args[1]
    if (isinstance(idx, tuple) and len(idx) == 2 and idx[0] is Ellipsis and isinstance(idx[1], slice)
            and idx[1].step is None and isinstance(n.args[0], fx.Node)):
        return n.args[0], idx[1].start or 0, idx[1].stop
    return None


def _describe(n: fx.Node, modules) -> str:
    return rules.describe_target(n, modules.get(n.target) if n.op == "call_module" else None)


def _qualname(n: fx.Node) -> str:
    return n.target if n.op == "call_module" else n.name


def _location(n: fx.Node) -> str:
    stack = n.meta.get("nn_module_stack")
    if stack:
        return list(stack.values())[-1][0] if isinstance(list(stack.values())[-1], tuple) else str(list(stack)[-1])
    return n.target if n.op == "call_module" else n.name


_NOT_COMPUTE = ("getitem", "getattr", "size", "dim", "view", "reshape", "slice", "select", "squeeze", "flatten",
                "contiguous", "expand", "permute", "transpose", "float", ".to", "sym_size", "alias", "detach")


def _is_compute(n: fx.Node) -> bool:
    """Nodes worth listing as hoisted (not views, sizes or indexing)."""
    if n.op == "call_module":
        return True
    name = rules.target_name(n.target)
    return n.op in ("call_function", "call_method") and not any(k in name for k in _NOT_COMPUTE)


# --------------------------------------------------------------------------- op lowerings
_LOWERINGS: Dict[Any, Any] = {}


def _lowering(*targets):
    def deco(fn):
        for t in targets:
            _LOWERINGS[t] = fn
        return fn

    return deco


def register_lowering(*targets):
    """Add ``fn(lowerer, node, module) -> Value or None`` as the lowering of each target (a
    function, a method name, or a module class matched exactly), tried before the lowering
    already registered for it; returning None defers to that one, then to the default
    (emit the node at its tag's level)."""

    def deco(fn):
        for t in targets:
            prev = _LOWERINGS.get(t)

            def chained(lw, node, module, fn=fn, prev=prev):
                value = fn(lw, node, module)
                return value if value is not None or prev is None else prev(lw, node, module)

            _LOWERINGS[t] = chained
        return fn

    return deco


_ROW_GATHERS: List[Tuple[Any, Any]] = []


def register_row_gather(predicate, gather) -> None:
    """Materialize a USER value whose example summary (``node.meta["mari_fx.value"]``) matches
    ``predicate`` at N rows as ``gather(value, user_index)`` (tensors use ``index_select``)."""
    _ROW_GATHERS.insert(0, (predicate, gather))


def _row_gather(v: Rows):
    info = v.orig.meta.get(VALUE_KEY) if v.orig is not None else None
    return next((g for pred, g in _ROW_GATHERS if pred(info)), None) if info is not None else None


@_lowering(torch.cat, torch.concat, torch.concatenate, torch.ops.aten.cat.default)
def _lower_cat(lw: Lowerer, node: fx.Node, _m) -> Optional[Value]:
    if not node.meta[TAG_KEY].has_user_columns:
        return None
    parts: List = []
    for t in node.args[0] if node.args else node.kwargs["tensors"]:
        parts += lw._parts_of(t)
    return Pieces(tuple(parts))


@_lowering(operator.getitem)
def _lower_getitem(lw: Lowerer, node: fx.Node, _m) -> Optional[Value]:
    base, index = node.args
    v = lw._value(base)
    if isinstance(v, Seq):
        return v.items[index] if isinstance(index, int) else Seq(tuple(v.items[index]))
    if not isinstance(v, Pieces):
        return None
    plan = rules.normalize_index(index, base.meta[VALUE_KEY].ndim)
    if plan is None or plan[1] or plan[0][0] != slice(None):
        return None
    per_dim = plan[0]
    if isinstance(index, tuple) and any(i is None for i in index):
        return None
    prefix = tuple(per_dim[:-1])
    last = per_dim[-1]
    width = base.meta[VALUE_KEY].shape[-1]
    if isinstance(last, slice) and last.step in (None, 1):
        lo, hi, _ = last.indices(width)
        return lw._select_columns(base, lo, max(lo, hi), prefix)
    if isinstance(last, int):
        return lw._select_column(base, last % width, prefix)
    return None


@_lowering(torch.ops.aten.slice.Tensor)
def _lower_aten_slice(lw: Lowerer, node: fx.Node, _m) -> Optional[Value]:
    x, dim, start, stop, step = rules.aten_slice_args(node)
    v = lw._value(x)
    ndim = x.meta[VALUE_KEY].ndim
    if any(isinstance(a, fx.Node) for a in (start, stop, step)) or step != 1:
        return None
    if dim % ndim == 0 and (start or 0) == 0 and (stop is None or stop >= rules.ALL_ROWS):
        return v  # x[:] on the batch: the same value, whatever its level
    if not isinstance(v, Pieces) or dim % ndim != ndim - 1:
        return None
    lo, hi, _ = slice(start, stop).indices(x.meta[VALUE_KEY].shape[-1])
    return lw._select_columns(x, lo, max(lo, hi), (slice(None),) * (ndim - 1))


@_lowering(torch.ops.aten.select.int)
def _lower_aten_select(lw: Lowerer, node: fx.Node, _m) -> Optional[Value]:
    x, dim, index = node.args[:3]
    ndim = x.meta[VALUE_KEY].ndim
    if not isinstance(lw._value(x), Pieces) or not isinstance(index, int) or dim % ndim != ndim - 1:
        return None
    return lw._select_column(x, index % x.meta[VALUE_KEY].shape[-1], (slice(None),) * (ndim - 1))


def _split_bounds(node: fx.Node) -> List[Tuple[int, int]]:
    bounds, pos = [], 0
    for part in node.meta[VALUE_KEY]:
        w = part.shape[-1]
        bounds.append((pos, pos + w))
        pos += w
    return bounds


@_lowering(torch.split, "split", torch.chunk, "chunk", torch.tensor_split, "tensor_split",
           torch.ops.aten.split.Tensor, torch.ops.aten.split_with_sizes.default, torch.ops.aten.chunk.default)
def _lower_split(lw: Lowerer, node: fx.Node, _m) -> Optional[Value]:
    x = node.args[0]
    if not isinstance(lw._value(x), Pieces):
        return None
    ndim = x.meta[VALUE_KEY].ndim
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    if dim % ndim != ndim - 1:
        return None
    prefix = (slice(None),) * (ndim - 1)
    return Seq(tuple(lw._select_columns(x, lo, hi, prefix) for lo, hi in _split_bounds(node)))


@_lowering(torch.narrow, "narrow", torch.ops.aten.narrow.default)
def _lower_narrow(lw: Lowerer, node: fx.Node, _m) -> Optional[Value]:
    x = node.args[0]
    if not isinstance(lw._value(x), Pieces):
        return None
    ndim = x.meta[VALUE_KEY].ndim
    dim, start, length = (list(node.args[1:]) + [node.kwargs.get(k) for k in ("dim", "start", "length")])[:3]
    if not (isinstance(start, int) and isinstance(length, int)) or dim % ndim != ndim - 1:
        return None
    return lw._select_columns(x, start, start + length, (slice(None),) * (ndim - 1))


def _lower_elementwise(lw: Lowerer, node: fx.Node, _m) -> Optional[Value]:
    if not node.meta[TAG_KEY].has_user_columns:
        return None
    (src,) = [a for a in node.all_input_nodes if isinstance(lw._value(a), Pieces)]
    parts = []
    for level, width, rows in lw._parts_of(src):
        parts.append((level, width, lw._emit_on(node, src, lw._node_of(rows), level)))
    return Pieces(tuple(parts))


for _t in (rules._UNARY_FUNCS + rules._UNARY_METHODS + rules._UNARY_MODULES + rules._BINARY_FUNCS
           + rules._BINARY_METHODS + [nn.Dropout, nn.AlphaDropout, nn.Dropout1d, nn.Dropout2d, F.dropout,
                                      torch.dropout, "dropout"]):
    _LOWERINGS[_t] = _lower_elementwise


# ----------------------------------------------------------------- the matmul split
@dataclass(frozen=True)
class _LinearView:
    """A Linear-like call seen as ``x @ weight.T + bias`` with ``weight`` [out, in]."""

    x: fx.Node
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    name: str
    why_not: str = ""


def _param(lw: Lowerer, a: Any) -> Optional[torch.Tensor]:
    if isinstance(a, fx.Node) and a.op == "get_attr":
        return lw.gm.get_parameter(a.target) if _is_param(lw.gm, a.target) else _get_attr(lw.gm, a.target)
    return None


def _is_param(gm, target: str) -> bool:
    try:
        gm.get_parameter(target)
        return True
    except AttributeError:
        return False


def _get_attr(gm, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj if isinstance(obj, torch.Tensor) else None


def _linear_view(lw: Lowerer, node: fx.Node, module) -> Optional[_LinearView]:
    if isinstance(module, nn.Linear):
        return _LinearView(node.args[0], module.weight, module.bias, node.target)
    t, args = node.target, node.args
    if t in (F.linear, torch.ops.aten.linear.default):
        w, b = _param(lw, args[1] if len(args) > 1 else node.kwargs.get("weight")), None
        b_arg = args[2] if len(args) > 2 else node.kwargs.get("bias")
        b = _param(lw, b_arg) if b_arg is not None else None
        bad = w is None or (b_arg is not None and b is None)
        return _LinearView(args[0], w, b, node.name, "weight or bias is not a parameter" if bad else "")
    if t in (torch.matmul, operator.matmul, torch.mm, "matmul", "mm", "__matmul__", torch.ops.aten.matmul.default,
             torch.ops.aten.mm.default):
        w = _param(lw, args[1])
        ok = w is not None and w.dim() == 2
        return _LinearView(args[0], w.t() if ok else None, None, node.name, "" if ok else "right operand is not a 2-d parameter")
    if t is torch.addmm:
        b, w = _param(lw, args[0]), _param(lw, args[2])
        ok = w is not None and b is not None and not node.kwargs
        return _LinearView(args[1], w.t() if ok else None, b, node.name,
                           "" if ok else "addmm operands are not parameters (or beta/alpha given)")
    return None


def _lower_linear(lw: Lowerer, node: fx.Node, module) -> Optional[Value]:
    view = _linear_view(lw, node, module)
    if view is None:
        return None
    x_tag, x_val = view.x.meta[TAG_KEY], lw._value(view.x)
    info = view.x.meta.get(VALUE_KEY)
    rows_per_sample = 1
    if isinstance(info, TensorInfo):
        for d in info.shape[1:-1]:
            rows_per_sample *= d
    out_info = node.meta.get(VALUE_KEY)
    in_features = info.shape[-1] if isinstance(info, TensorInfo) and info.ndim else 0
    out_features = out_info.shape[-1] if isinstance(out_info, TensorInfo) and out_info.ndim else 0
    cols = {s: x_tag.columns(s) if isinstance(x_tag, TensorTag) and x_tag.width else 0 for s in Side}
    if isinstance(x_tag, TensorTag) and not x_tag.is_segmented and x_tag.width:
        cols = {s: (x_tag.width if s == x_tag.side else 0) for s in Side}
    if isinstance(x_val, Combo) and any(r.level == U for _, r in x_val.terms):
        x_val = Pieces(((N, in_features, x_val),))  # W (sum c t) = sum c (W t): fold like column blocks
    split = isinstance(x_val, Pieces)
    reason = ""
    if split and not lw.options.split_matmuls:
        split, reason = False, "split_matmuls=False"
    elif split and view.why_not:
        split, reason = False, view.why_not
    side = node.meta[TAG_KEY].side
    action = "split" if split else "hoisted" if side == Side.USER else "const" if side == Side.CONST else "kept"
    if not split and not reason and action == "kept" and cols[Side.USER] == 0 and x_tag.side == Side.MIXED:
        reason = "input has no user-only columns"
    record = LayerRecord(
        name=view.name, op=rules.describe_target(node, module), in_features=in_features,
        out_features=out_features, user_columns=cols[Side.USER], item_columns=cols[Side.ITEM],
        mixed_columns=cols[Side.MIXED], rows_per_sample=rows_per_sample, action=action, reason=reason)
    if split:
        user, item, bcast = lw._split_sources(x_val, view.weight)
        item_width = sum(w.shape[1] for _, w in item + bcast)
        if not user or item_width > in_features:
            split, reason = False, "splitting would not reduce the work at N rows"
            record = dataclasses.replace(record, action=action if action != "split" else "kept", reason=reason)
    if not split:
        lw.layers.append(record)
        return None
    out = lw._split_linear(node, view, user, item, bcast)
    mod = lw.modules[out.node.target]
    lw.layers.append(dataclasses.replace(
        record, split_user_features=mod.weight_user.shape[1], split_item_features=mod.weight_item.shape[1],
        split_broadcast_features=0 if mod.weight_broadcast is None else mod.weight_broadcast.shape[1]))
    return out


def _split_sources(self: Lowerer, x: Pieces, weight: torch.Tensor) -> Tuple[List, List, List]:
    """``(node, weight block)`` lists at U rows, at N rows, and at N rows before a broadcast,
    whose products sum to ``x @ weight.T``.

    Within a column block, terms of one level are summed first (one source each); a source
    used by several blocks (``k`` in ``cat([q, k, q - k])``) gets the coefficient-weighted sum
    of their weights, so it is multiplied once.  An N-row source that the model expanded
    (``q.unsqueeze(1).expand(-1, S, -1)``) is multiplied before the expand.
    """
    blocks: Dict[int, List] = {}  # id(source node) -> [node, level, weight block, source Rows]
    pos = 0
    for _, width, part in x.parts:
        w = weight.detach()[:, pos:pos + width]
        terms = part.terms if isinstance(part, Combo) else ((1.0, part),)
        for level in (U, N):
            group = [(c, t) for c, t in terms if (t.level == U) == (level == U)]
            if not group:
                continue
            if len(group) == 1:
                (coeff, rows), node = group[0], group[0][1].node
            else:
                coeff, rows = 1.0, None
                node = self._weighted_sum([(c, t.node) for c, t in group], level)
            entry = blocks.setdefault(id(node), [node, level, torch.zeros_like(w), rows])
            entry[2] = entry[2] + coeff * w
        pos += width
    user = [(n, w) for n, lvl, w, _ in blocks.values() if lvl == U]
    item, bcast, bcast_shape = [], [], None
    for n, lvl, w, rows in blocks.values():
        if lvl == U:
            continue
        pre = _before_expand(self, rows)
        if pre is not None and bcast_shape in (None, pre[1]):
            bcast_shape = pre[1]
            bcast.append((pre[0], w))
        else:
            item.append((n, w))
    return user, item, bcast


def _before_expand(self: Lowerer, rows: Optional[Rows]):
    """``(node, shape)`` of the N-row tensor that ``rows`` expands along size-1 middle dims."""
    orig = rows.orig if isinstance(rows, Rows) else None
    if orig is None or orig.target not in ("expand", torch.ops.aten.expand.default):
        return None
    src = orig.args[0]
    v = self._value(src) if isinstance(src, fx.Node) else None
    s_in, s_out = src.meta.get(VALUE_KEY), orig.meta.get(VALUE_KEY)
    if not (isinstance(v, Rows) and v.level == N and isinstance(s_in, TensorInfo) and isinstance(s_out, TensorInfo)):
        return None
    a, b = s_in.shape, s_out.shape
    if len(a) != len(b) or a[0] != b[0] or a[-1] != b[-1] or any(x != y and x != 1 for x, y in zip(a, b)):
        return None
    return v.node, a[1:]


def _split_linear(self: Lowerer, node: fx.Node, view: _LinearView, user: List, item: List, bcast: List) -> Rows:
    def weights(sources):
        return torch.cat([w for _, w in sources], 1).contiguous() if sources else None

    w_item = weights(item)
    mod = SplitLinear(weights(user), w_item if w_item is not None else view.weight.new_zeros(view.weight.shape[0], 0),
                      None if view.bias is None else view.bias.detach().clone(), weights(bcast))
    name = self._module_name(view.name, node)
    self.gm.add_submodule(name, mod)
    self.modules[name] = mod
    args = [self._cat([n for n, _ in user], U), self._cat([n for n, _ in item], N) if item else None, self.user_index]
    if bcast:
        args.append(self._cat([n for n, _ in bcast], N))
    out = self.graph.call_module(name, tuple(args))
    self._port_meta(node, out)
    out.meta[ROWS_KEY] = N
    return Rows(out, N, node)


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
    return _linear_combo(lw, node) or _product_combo(lw, node) or _reduced_combo(lw, node)


def _combo_terms(lw: Lowerer, a: Any) -> Optional[List[Tuple[float, Rows]]]:
    v = lw._value(a) if isinstance(a, fx.Node) else None
    if isinstance(v, Combo):
        return list(v.terms)
    if isinstance(v, Rows) and v.level in (U, N):
        return [(1.0, v)]
    return None


def _product_combo(lw: Lowerer, node: fx.Node) -> Optional[Combo]:
    """``(su + si) * (su + si)`` expanded: user x user products at U rows, the rest at N rows."""
    if node.target not in _MUL_OPS or node.kwargs or len(node.args) != 2:
        return None
    a, b = node.args
    if not all(isinstance(x, fx.Node) and x.meta.get(VALUE_KEY) == node.meta.get(VALUE_KEY) for x in (a, b)):
        return None
    if not any(isinstance(lw._value(x), Combo) for x in (a, b)):
        return None
    ta, tb = _combo_terms(lw, a), _combo_terms(lw, b)
    if ta is None or tb is None:
        return None
    products: Dict[frozenset, List] = {}
    for ca, ra in ta:
        for cb, rb in tb:
            key = frozenset((id(ra.node), id(rb.node))) if ra.node is not rb.node else frozenset((id(ra.node),))
            if key in products:
                products[key][0] += ca * cb
                continue
            level = U if ra.level == U and rb.level == U else N
            x, y = (ra.node, rb.node) if level == U else (lw._materialize(ra), lw._materialize(rb))
            prod = lw.graph.call_function(operator.mul, (x, y))
            prod.meta[ROWS_KEY] = level
            products[key] = [ca * cb, Rows(prod, level)]
    return Combo(node, tuple((c, r) for c, r in products.values() if c != 0.0))


def _reduced_combo(lw: Lowerer, node: fx.Node) -> Optional[Combo]:
    """``combo.sum(dim)`` over a non-batch dim is the combination of the terms' sums."""
    if node.target not in _SUM_OPS or not node.args or not isinstance(lw._value(node.args[0]), Combo):
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


def _module_name(self: Lowerer, base: str, node: fx.Node) -> str:
    """Reuse the Linear's own path when it is called once; else a fresh sibling name."""
    if node.op == "call_module" and self.call_counts.get(base) == 1:
        return base
    name, k = f"{base}_split".replace(".", "_") if node.op != "call_module" else f"{base}_split", 0
    while _has_attr_path(self.gm, name):
        k += 1
        name = f"{base}_split{k}"
    return name


def _has_attr_path(gm, path: str) -> bool:
    obj = gm
    for part in path.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


LAZY_BUILDERS: List[Any] = [_as_combo]

Lowerer._split_linear = _split_linear
Lowerer._split_sources = _split_sources
Lowerer._module_name = _module_name

for _t in (nn.Linear, F.linear, torch.matmul, operator.matmul, torch.mm, "matmul", "mm", "__matmul__", torch.addmm,
           torch.ops.aten.linear.default, torch.ops.aten.matmul.default, torch.ops.aten.mm.default):
    _LOWERINGS[_t] = _lower_linear


def lower(gm: fx.GraphModule, spec: RequestSpec, options: LowerOptions = LowerOptions()) -> fx.GraphModule:
    """Rewrite a tagged pair-shaped graph (from :func:`mari_fx.trace`) into the
    request-shaped module; ``gm`` is left as it was, except for the split modules it gains.

    Example:
        >>> import torch, mari_fx
        >>> from mari_fx.examples import CoarseRanker
        >>> u, i, idx = torch.randn(2, 16), torch.randn(3, 8), torch.tensor([0, 1, 1])
        >>> tagged = mari_fx.trace(CoarseRanker().eval(), user_inputs=["user"], example_inputs=(u[idx], i))
        >>> T = lower(tagged, tagged.meta["mari_fx.request"])
        >>> [l.name for l in T.meta["mari_fx.record"].layers if l.action == "split"]
        ['fusion.0']
    """
    root = copy_model(gm)  # split modules replace Linears in the copy only
    graph, record = Lowerer(root, spec, options).run()
    out = fx.GraphModule(root, graph, class_name="MariModule")
    # Drop what nothing reads any more (e.g. an unused tuple element), but keep the request check.
    out.graph.eliminate_dead_code(is_impure_node=lambda n: n.target is check_request or n.is_impure())
    out.recompile()
    out.meta["mari_fx.request"] = spec
    out.meta["mari_fx.record"] = record
    return out
