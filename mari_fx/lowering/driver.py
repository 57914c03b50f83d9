"""The lowering driver: walks the tagged graph in order and lowers every node through the
context (:mod:`mari_fx.lowering.context`): the lowerings registered for its target first
(:mod:`mari_fx.lowering.ops`, extensions), then the structured-value builders, then the default
(the node emitted at its tag's level).  It imports its lowerings; they never import it."""
from __future__ import annotations

import operator
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.fx as fx

from .. import registry
from ..analysis import rules
from ..analysis.example_prop import VALUE_KEY, TensorInfo
from ..analysis.tags import NOTE_KEY, ROWS_KEY, TAG_KEY, SeqTag, Side
from ..meta import SEQ_FIRST_KEY
from ..errors import MariError
from ..frontend.capture import copy_model
from ..frontend.functionalize import is_mutating
from ..frontend.inputs import USER_INDEX, RequestSpec
from ..report.record import Record, RefusalRecord
from ..runtime.checks import Retracer, check_inference, check_request
from ..runtime.paths import BoundGraphModule, bind_paths
from . import ops  # noqa: F401  (the core lowerings register themselves in the tables)
from .context import LAZY_BUILDERS, LOWERINGS, LowerOptions, LoweringContext
from .values import C, N, U, Blocks, Combo, Lazy, Pieces, Rows, Seq, Value


class Lowerer(LoweringContext):
    """The lowering driver: builds the request-shaped graph; see the module docstring."""

    def run(self) -> Tuple[fx.Graph, Record]:
        sides = {s.name: s.side for s in self.spec.inputs}
        nodes = list(self.gm.graph.nodes)
        for node in nodes:
            if node.op == "placeholder":
                # a class annotation (not a string one, which fx cannot resolve) for TorchScript
                new = self.graph.placeholder(node.target, type_expr=node.type if isinstance(node.type, type) else None)
                self.port_meta(node, new)
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
                out = fx.node.map_arg(node.args[0], lambda a: self.materialize(self.value(a)))
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
                rows = next(iter(registry.ROW_TENSORS.matching(info)), None)
                if rows is not None:  # [rows] int64 offsets
                    checked.append((v, self.graph.call_function(rows, (v.node,)), [-1], torch.int64))
        by = {lvl: [c for c in checked if c[0].level == lvl] for lvl in (U, N)}
        self.graph.call_function(check_request, (
            self.user_index, [t for _, t, _, _ in by[U]], [t for _, t, _, _ in by[N]],
            [v.node.target for v, _, _, _ in by[U]], [v.node.target for v, _, _, _ in by[N]],
            [s for _, _, s, _ in by[U]], [s for _, _, s, _ in by[N]],
            [d for _, _, _, d in by[U]], [d for _, _, _, d in by[N]]))

    def _lower(self, node: fx.Node) -> Value:
        tag = node.meta[TAG_KEY]
        read = rules.size_read(node)
        if read is not None:
            value = self._lower_size_read(node, *read)
            if value is not None:
                return value
        module = self.modules.get(node.target) if node.op == "call_module" else None
        key = type(module) if module is not None else node.target
        for special in LOWERINGS.values(key) if node.op != "get_attr" else ():
            value = special(self, node, module)
            if value is not None:
                return value
        level = _level_of(tag)
        if level == U:
            return self.emit(node, U, self.as_is)
        if level == C:  # batch-free (e.g. a feature size): read it off whatever level its input has
            return self.emit(node, C, lambda v: v.node if isinstance(v, Rows) else self.materialize(v))
        for build in (e.value for e in LAZY_BUILDERS.all()):  # keep structure (linear combinations, field blocks) when possible
            lazy = build(self, node)
            if lazy is not None:
                return lazy
        return self.emit(node, N, self.materialize)

    def _lower_size_read(self, node: fx.Node, kind: str, src: fx.Node) -> Optional[Value]:
        """A size of a batched tensor (:func:`mari_fx.analysis.rules.size_read`) at N rows, read off
        ``user_index`` or the U-row tensor: never a tensor gathered to N rows just for its size."""
        if kind == "batch":
            return Rows(self.num_candidates(), N, node)
        v = self.value(src)
        if not (isinstance(v, Rows) and v.level == U):
            return None  # an N-row value has the pair model's shape already
        if kind == "shape" and all(_reads_feature_dim(u) for u in node.users):
            return self.emit(node, N, lambda a: a.node)  # only feature sizes are read off it
        out = self.graph.call_function(batch_shape if kind == "shape" else batch_numel, (v.node, self.num_candidates()))
        self.port_meta(node, out)
        out.meta[ROWS_KEY] = N
        return Rows(out, N, node)

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
            at_u = (isinstance(v, Rows) and v.level == U) or (
                isinstance(v, Seq) and v.items and all(isinstance(i, Rows) and i.level == U for i in v.items))
            if at_u and _is_compute(n):
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
    :mod:`mari_fx.analysis.elements`) holds user elements that its MIXED tag does not show; else ``""``.
    Asked only for nodes a lowering computed at U rows by their element map."""
    from ..analysis.elements import ELEM_KEY, has_user

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


def _describe(n: fx.Node, modules) -> str:
    return rules.describe_target(n, modules.get(n.target) if n.op == "call_module" else None)


def _qualname(n: fx.Node) -> str:
    # a batch-first twin's call is the model's seq-first module (mari_fx.analysis.seq_first)
    return n.meta.get(SEQ_FIRST_KEY, n.target) if n.op == "call_module" else n.name


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


def lower(gm: fx.GraphModule, spec: RequestSpec, options: LowerOptions = LowerOptions()) -> fx.GraphModule:
    """Rewrite a tagged pair-shaped graph (from :func:`mari_fx.trace`) into the
    request-shaped module; ``gm`` is left as it was, except for the split modules it gains.

    Example:
        >>> import torch, mari_fx
        >>> from mari_fx.testing.examples import CoarseRanker
        >>> u, i, idx = torch.randn(2, 16), torch.randn(3, 8), torch.tensor([0, 1, 1])
        >>> tagged = mari_fx.trace(CoarseRanker().eval(), user_inputs=["user"], example_inputs=(u[idx], i))
        >>> T = lower(tagged, tagged.meta["mari_fx.request"])
        >>> [l.name for l in T.meta["mari_fx.record"].layers if l.action == "split"]
        ['fusion.0']
    """
    root = copy_model(gm)  # split modules replace Linears in the copy only
    graph, record = Lowerer(root, spec, options).run()
    out = BoundGraphModule(root, graph, class_name="MariModule")
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
    return bind_paths(out)  # submodule calls without nn.Module.__getattr__ (runtime/paths.py)
