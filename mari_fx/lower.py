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

import operator
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx

from . import rules
from .capture import copy_model
from .errors import MariError
from .example_prop import VALUE_KEY, TensorInfo
from .inputs import USER_INDEX, RequestSpec
from .record import BroadcastRecord, LayerRecord, Record, RefusalRecord
from .functionalize import is_mutating
from .runtime import Retracer, check_inference, check_request
from .tags import NOTE_KEY, ROWS_KEY, TAG_KEY, SeqTag, Side

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
    # Fold a Linear over a combination (W(q - k) = Wq - Wk). Exact in real arithmetic, but its fp32
    # rounding scales with |Wq| + |Wk|, not |W(q - k)|: opt-in, like -ffast-math.
    reassociate: bool = False
    # Refuse a split whose gather and extra kernels cost more than the GEMM work it saves (cost.py);
    # False splits wherever it is exact (tests of the rewrite itself on tiny models).
    cost_model: bool = True


class Lowerer:
    """Builds the request-shaped graph; see the module docstring."""

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
        # Original MIXED nodes whose user elements a lowering computed at U rows (by element maps):
        # a tag rule's refusal there is no loss (see _record).
        self.elements_at_u: set = set()

    # ----------------------------------------------------------------- driver
    def run(self) -> Tuple[fx.Graph, Record]:
        sides = {s.name: s.side for s in self.spec.inputs}
        nodes = list(self.gm.graph.nodes)
        for node in nodes:
            if node.op == "placeholder":
                # a class annotation (not a string one, which fx cannot resolve) for TorchScript
                new = self.graph.placeholder(node.target, type_expr=node.type if isinstance(node.type, type) else None)
                self._port_meta(node, new)
                level = U if sides.get(node.target) == Side.USER else N
                new.meta[ROWS_KEY] = level
                self.env[node] = Rows(new, level, node)
        self.user_index = self.graph.placeholder(USER_INDEX)
        self.user_index.meta[ROWS_KEY] = N
        # T is an inference artefact: hoisted Dropout would draw one mask per user in training mode
        self.graph.call_function(check_inference, (self.graph.get_attr("training"),))
        if self.options.check_requests:
            self._emit_check()
        self.n_rows = self.u_rows = None
        for node in nodes:
            if node.op == "placeholder":
                continue
            self._consumer = node
            if node.op == "output":
                # only nodes: Python constants in the output (``return y, 3``) stay as they are
                out = fx.node.map_arg(node.args[0], lambda a: self._materialize(self._value(a)))
                self.graph.output(out)
                continue
            value = self._lower(node)
            self._check_level(node, value)
            self.env[node] = value
        self.graph.lint()
        return self.graph, self._record(nodes)

    def _emit_check(self) -> None:
        # tensors, and types with a registered row tensor (bags); extensions check their other
        # input kinds (e.g. KJTs) where they lower them.  Each with the example's shape (-1: the
        # row dim) and dtype, checked as metadata on every call.
        checked = []  # (value, tensor checked, shape, dtype)
        for p, v in self.env.items():
            info = p.meta.get(VALUE_KEY)
            if isinstance(info, TensorInfo):
                checked.append((v, v.node, [-1] + list(info.shape[1:]), info.dtype))
            else:
                rows = next((f for pred, f in _ROW_TENSORS if pred(info)), None)
                if rows is not None:  # [rows] int64 offsets
                    checked.append((v, self.graph.call_function(rows, (v.node,)), [-1], torch.int64))
        by = {lvl: [c for c in checked if c[0].level == lvl] for lvl in (U, N)}
        self.graph.call_function(check_request, (
            self.user_index, [t for _, t, _, _ in by[U]], [t for _, t, _, _ in by[N]],
            [v.node.target for v, _, _, _ in by[U]], [v.node.target for v, _, _, _ in by[N]],
            [s for _, _, s, _ in by[U]], [s for _, _, s, _ in by[N]],
            [d for _, _, _, d in by[U]], [d for _, _, _, d in by[N]]))

    # ----------------------------------------------------------------- lowering
    def _lower(self, node: fx.Node) -> Value:
        tag = node.meta[TAG_KEY]
        read = rules.size_read(node)
        if read is not None:
            value = self._lower_size_read(node, *read)
            if value is not None:
                return value
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
        new = self._copy(node, lambda a: convert(self._value(a)), level)
        self._port_meta(node, new)
        new.meta[ROWS_KEY] = level
        return Rows(new, level, node)

    def _emit_on(self, node: fx.Node, src: fx.Node, part: Any, level: str) -> Rows:
        """``node`` re-emitted with ``src`` replaced by ``part`` (one piece, block or term of it)
        and every other input as it is: how structured values apply an op piece by piece."""
        new = self._copy(node, lambda a: part if a is src else self._as_is(self._value(a)), level)
        self._port_meta(node, new)
        new.meta[ROWS_KEY] = level
        return Rows(new, level)

    def _copy(self, node: fx.Node, arg_transform, level: str) -> fx.Node:
        """``graph.node_copy``, except that at U rows a batch size in the batch position of a shape
        (:func:`mari_fx.rules.batch_dim_size_slot`, the predicate the rules use) becomes the
        number of users; a batch size anywhere else is the value N."""
        path = rules.batch_dim_size_slot(node) if level == U else None
        if path is None:
            return self.graph.node_copy(node, arg_transform)
        args, kwargs = rules.replace_at(node.args, node.kwargs, path, None)
        args, kwargs = fx.node.map_arg(args, arg_transform), fx.node.map_arg(kwargs, arg_transform)
        args, kwargs = rules.replace_at(args, kwargs, path, self._num_users())
        return self.graph.create_node(node.op, node.target, args, kwargs, node.name, node.type)

    def _lower_size_read(self, node: fx.Node, kind: str, src: fx.Node) -> Optional[Value]:
        """A size of a batched tensor (:func:`mari_fx.rules.size_read`) at N rows, read off
        ``user_index`` or the U-row tensor: never a tensor gathered to N rows just for its size."""
        if kind == "batch":
            return Rows(self._num_candidates(), N, node)
        v = self._value(src)
        if not (isinstance(v, Rows) and v.level == U):
            return None  # an N-row value has the pair model's shape already
        if kind == "shape" and all(_reads_feature_dim(u) for u in node.users):
            return self._emit(node, N, lambda a: a.node)  # only feature sizes are read off it
        out = self.graph.call_function(batch_shape if kind == "shape" else batch_numel, (v.node, self._num_candidates()))
        self._port_meta(node, out)
        out.meta[ROWS_KEY] = N
        return Rows(out, N, node)

    def _value(self, a: fx.Node) -> Value:
        return self.env[a]

    def _as_is(self, v: Value) -> Any:
        if isinstance(v, Seq):
            return tuple(self._as_is(i) for i in v.items)
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
            out = self._materialize_pieces(v)
        elif isinstance(v, Blocks):
            out = self.graph.call_function(torch.cat, ([self._materialize(r) for _, _, r in v.parts], v.dim))
        elif isinstance(v, Combo):
            out = self._materialize_combo(v)
        elif isinstance(v, Lazy):  # compute it as the pair model does
            out = self._emit(v.orig, N, self._materialize).node
        elif v.level != U:
            return v.node
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
            return self._cat([self._materialize(r) for _, _, r in v.parts], N)
        gathered = self._gather(self._cat([r.node for r in user], U),
                                [r.orig.name if r.orig is not None else r.node.name for r in user])
        total = sum(w for lvl, w, _ in v.parts if lvl == U)
        nodes, pos, k = [], 0, 0
        parts = list(v.parts)
        while k < len(parts):
            lvl, w, r = parts[k]
            if lvl != U:
                nodes.append(self._materialize(r))
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
        return self._cat(nodes, N)

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
        key = (level, *nodes)  # the same pieces joined twice (two split layers over one input): one cat
        if all(isinstance(n, fx.Node) for n in nodes) and key in self.cats:
            return self.cats[key]
        out = self.graph.call_function(torch.cat, (list(nodes), -1))
        out.meta[ROWS_KEY] = level
        if all(isinstance(n, fx.Node) for n in nodes):
            self.cats[key] = out
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
        refusals, recovered, hoisted = [], [], []
        for n in nodes:
            if n.op in ("placeholder", "output", "get_attr"):
                continue
            note = n.meta.get(NOTE_KEY)
            v = self.env.get(n)
            if isinstance(v, Lazy) and id(v) not in self.materialized:
                note = None  # never computed (e.g. a mask fold an attention module read at U rows)
            if note:
                kept = _kept_elements(n) if n in self.elements_at_u else ""
                (recovered if kept else refusals).append(RefusalRecord(
                    node=n.name, op=_describe(n, self.modules), location=_location(n),
                    reason=f"{note}; the element map kept its user elements ({kept}), computed at U rows" if kept
                    else note))
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
            recovered=tuple(recovered),
        )


# --------------------------------------------------------------------------- helpers
def batch_shape(x: torch.Tensor, n: int) -> List[int]:
    """The shape ``x`` has in the pair-shaped model: ``x``'s, with the batch size ``n``.

    Example:
        >>> batch_shape(torch.zeros(2, 3, 4), 7)
        torch.Size([7, 3, 4])
    """
    shape = [n] + list(x.shape[1:])
    if torch.jit.is_scripting():  # TorchScript's sizes are List[int]
        return shape
    return torch.Size(shape)


def batch_numel(x: torch.Tensor, n: int) -> int:
    """``x.numel()`` in the pair-shaped model, where ``x`` has ``n`` rows.

    Example:
        >>> batch_numel(torch.zeros(2, 3, 4), 7)
        84
    """
    out = n
    for d in x.shape[1:]:
        out = out * d
    return out


def _kept_elements(n: fx.Node) -> str:
    """``"elements[user:1, ...]"`` when ``n``'s element map (exact where it exists, see
    :mod:`mari_fx.elements`) holds user elements that its MIXED tag does not show; else ``""``.
    Asked only for nodes a lowering computed at U rows by their element map."""
    from .elements import ELEM_KEY, has_user

    e = n.meta.get(ELEM_KEY)
    items = e if isinstance(e, tuple) else (e,)
    kept = [x for x in items if x is not None and hasattr(x, "map") and has_user(x.map)]
    return ", ".join(str(x) for x in kept)


def _reads_feature_dim(user: fx.Node) -> bool:
    """``shape[k]`` of a non-batch dim, or the batch size (which reads ``user_index`` instead)."""
    return (user.target is operator.getitem and TAG_KEY in user.meta
            and (user.meta[TAG_KEY].side == Side.CONST or rules.is_batch_size_node(user)))


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
    """New nodes without an original (pieces, gathers) are always row tensors."""
    if v.orig is None:
        return True
    info = v.orig.meta.get(VALUE_KEY)
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


def _describe(n: fx.Node, modules) -> str:
    return rules.describe_target(n, modules.get(n.target) if n.op == "call_module" else None)


def _qualname(n: fx.Node) -> str:
    return n.target if n.op == "call_module" else n.name


def _location(n: fx.Node) -> str:
    """Where a node sits in the model: its innermost module's path (torch.export records it)."""
    stack = n.meta.get("nn_module_stack")
    if stack:
        innermost = list(stack.values())[-1]  # (qualified path, module class)
        return innermost[0] if isinstance(innermost, tuple) else str(list(stack)[-1])
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
_ROW_TENSORS: List[Tuple[Any, Any]] = []


def register_row_gather(predicate, gather, rows=None) -> None:
    """Materialize a USER value whose example summary (``node.meta["mari_fx.value"]``) matches
    ``predicate`` at N rows as ``gather(value, user_index)`` (tensors use ``index_select``).
    ``rows(value)``, if given, is a tensor with one row per row of such a value: the request
    check then checks the row count of inputs of that type too."""
    _ROW_GATHERS.insert(0, (predicate, gather))
    if rows is not None:
        _ROW_TENSORS.insert(0, (predicate, rows))


def _row_gather(v: Rows):
    info = v.orig.meta.get(VALUE_KEY) if v.orig is not None else None
    return next((g for pred, g in _ROW_GATHERS if pred(info)), None) if info is not None else None


LAZY_BUILDERS: List[Any] = []  # (lowerer, node) -> a structured value, or None


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
    # Drop what nothing reads any more (e.g. an unused tuple element), but keep the checks (and any
    # op that could write into its input: functionalize leaves none, this is the safety net).
    out.graph.eliminate_dead_code(is_impure_node=lambda n: n.target in (check_request, check_inference)
                                  or n.is_impure() or is_mutating(n))
    out.recompile()
    out._tracer_cls = Retracer  # unpickling re-traces forward: keep run-time functions as calls
    # An inference artefact (its guard refuses training mode); only the root's flag: submodules
    # may be shared with the caller's model (embedding tables) and keep theirs.
    out.training = False
    out.meta["mari_fx.request"] = spec
    out.meta["mari_fx.record"] = record
    return out


# The op lowerings register themselves (order matters: the split before the interactions that chain on matmul).
from . import pieces, split, combos, interactions, field_split, sequences, bags  # noqa: E402,F401
