"""Split a Linear over any set of user element positions (field layouts).

Where the column-piece split of :mod:`mari_fx.lowering.ops.split` finds no user columns -- the input
was reshaped, stacked or gathered, so its tag is MIXED -- the element map of
:mod:`mari_fx.analysis.elements` may still prove columns that are USER (or CONST) at every leading
position: ``C_u``.  The Linear then becomes a :class:`~mari_fx.runtime.modules.SplitLinear`:

* ``x[..., C_u]`` at U rows, computed by re-emitting ``x``'s backward cone at U rows:
  values already at U rows are used as they are, values with no USER or CONST element are
  replaced by zeros (none of their elements is read by a user element), and every other
  node is re-emitted with the same op -- sound because every element rule guarantees that
  user output elements read only user/const input elements;
* ``x[..., C_i]`` (the remaining columns) at N rows, ``x`` computed as the model does;
* ``W[:, C_u]`` and ``W[:, C_i]`` gathered at transform time, the bias once.

The N-row matmul shrinks from ``K`` to ``|C_i|`` columns; no N-row matmul work is added.
"""
from __future__ import annotations

import operator
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.fx as fx

from ... import targets
from ...analysis import rules
from ...analysis.elements import ELEM_KEY, element_map, has_user
from ...analysis.example_prop import VALUE_KEY, TensorInfo
from ..context import LoweringContext, register_lowering
from ..values import C, N, U, Combo, Pieces, Rows, Seq, Value
from ...runtime.modules import SplitLinear, SplitSource
from ...report.record import LayerRecord
from .split import _linear_view, _module_name
from ...analysis.tags import ROWS_KEY, TAG_KEY, Side


class _NoSplit(Exception):
    pass


def _lower_field_linear(lw: LoweringContext, node: fx.Node, module) -> Optional[Value]:
    if not lw.options.split_matmuls:
        return None
    view = _linear_view(lw, node, module)
    if view is None or view.why_not or view.weight is None or not isinstance(view.x, fx.Node):
        return None
    x = view.x
    xv = lw.value(x)
    if isinstance(xv, Combo) and any(r.level == U for _, r in xv.terms):
        return None  # the linear-combination split handles it (q - k folds into q and k)
    if isinstance(xv, Rows) and xv.level != N or node.meta[TAG_KEY].side != Side.MIXED:
        return None
    m = element_map(x)
    if not isinstance(m, torch.Tensor) or m.ndim < 1 or not has_user(m):
        return None
    K = m.shape[-1]
    flat = m.reshape(-1, K)
    user = ((flat & 2) == 0).all(0)  # USER or CONST at every leading position
    if not (user & ((flat & 1) != 0).any(0)).any():
        return None
    if isinstance(xv, Pieces) and int(user.sum()) <= sum(w for lvl, w, _ in xv.parts if lvl == U):
        return None  # the column-piece split proves as much, without re-emitting anything
    cu = user.nonzero().flatten().tolist()
    ci = (~user).nonzero().flatten().tolist()
    try:
        xu = user_cone(lw).value(x)
    except _NoSplit:
        return None
    w = view.weight.detach()
    user_in = _columns(lw, xu, cu, K, U, f"{view.name}_user_cols")
    item_in = _columns(lw, lw.materialize(xv), ci, K, N, f"{view.name}_item_cols") if ci else None
    mod = SplitLinear(w[:, cu].contiguous(), w[:, ci].contiguous(),
                      None if view.bias is None else view.bias.detach().clone())
    weight, bias, transposed = view.source
    if weight is not None:  # how to re-derive the blocks from the pair-shaped model (mari_fx.refresh)
        mod.source = SplitSource(weight, bias, transposed, _runs(cu), _runs(ci), ())
    name = _module_name(lw, view.name, node)
    mod._mari_fx_name = name
    lw.add_submodule(name, mod)
    out = lw.graph.call_module(name, (user_in, item_in, lw.user_index))
    lw.port_meta(node, out)
    out.meta[ROWS_KEY] = N
    item_cols = int(((flat == int(Side.ITEM)) | (flat == int(Side.CONST))).all(0).logical_and(~user).sum())
    info = x.meta.get(VALUE_KEY)
    lw.record_layer(LayerRecord(
        name=view.name, op=rules.describe_target(node, module), in_features=K, out_features=w.shape[0],
        user_columns=len(cu), item_columns=item_cols, mixed_columns=len(ci) - item_cols,
        rows_per_sample=flat.shape[0] if isinstance(info, TensorInfo) and info.ndim > 2 else 1,
        action="split", split_user_features=len(cu), split_item_features=len(ci)))
    return Rows(out, N, node)


def _runs(cols: List[int]) -> Tuple[Tuple[Tuple[float, int, int], ...], ...]:
    """SplitSource blocks of a sorted column list: one ``((1.0, first, width),)`` per run."""
    out: List[List[int]] = []
    for c in cols:
        if out and out[-1][0] + out[-1][1] == c:
            out[-1][1] += 1
        else:
            out.append([c, 1])
    return tuple(((1.0, a, n),) for a, n in out)


def _columns(lw: LoweringContext, x: Any, cols: List[int], width: int, level: str, name: str) -> Any:
    """``x[..., cols]``: a slice when the columns are contiguous, else a gather by a buffer."""
    if cols == list(range(cols[0], cols[-1] + 1)):
        if len(cols) == width:
            return x
        out = lw.graph.call_function(_getitem, (x, (Ellipsis, slice(cols[0], cols[-1] + 1))))
    else:
        attr, k = name.replace(".", "_"), 0
        while hasattr(lw.gm, attr):
            k += 1
            attr = f"{name.replace('.', '_')}{k}"
        lw.gm.register_buffer(attr, torch.tensor(cols, dtype=torch.int64))
        out = lw.graph.call_function(torch.index_select, (x, -1, lw.graph.get_attr(attr)))
    out.meta[ROWS_KEY] = level
    return out


_getitem = operator.getitem


def _split_module(lw: LoweringContext, v: Any) -> Optional[Tuple[str, SplitLinear]]:
    """``(path, module)`` when the lowered value ``v`` is the output of a SplitLinear."""
    node = v.node if isinstance(v, Rows) else None
    if isinstance(node, fx.Node) and node.op == "call_module" and isinstance(lw.modules.get(node.target), SplitLinear):
        return node.target, lw.modules[node.target]
    return None


def _block_columns(mod: SplitLinear) -> Optional[Tuple[List[int], List[int], List[int]]]:
    """The input columns of ``weight_user`` / ``weight_item`` / ``weight_broadcast``, in block order,
    when every block is one column range of the original weight with coefficient 1 and the blocks
    cover every column once (no folded combinations); else None."""
    src = mod.source
    if src is None:
        return None
    out = []
    for blocks in (src.user, src.item, src.broadcast):
        cols: List[int] = []
        for terms in blocks:
            if len(terms) != 1 or terms[0][0] != 1.0:
                return None
            _, first, width = terms[0]
            cols += range(first, first + width)
        out.append(cols)
    flat = out[0] + out[1] + out[2]
    if sorted(flat) != list(range(len(flat))) or len(flat) != mod.in_features + (
            0 if mod.weight_broadcast is None else mod.weight_broadcast.shape[1]):
        return None
    return out[0], out[1], out[2]


def user_cone(lw: LoweringContext) -> "_UserCone":
    """The lowerer's :class:`_UserCone` (one per lowering, so a value's U-row form is emitted once)."""
    return lw.state("field_split.user_cone", lambda: _UserCone(lw))


class _UserCone:
    """Re-emits a value's backward cone at U rows, right at its USER and CONST elements."""

    def __init__(self, lw: LoweringContext):
        self.lw = lw
        self.cache: Dict[fx.Node, Any] = {}

    def value(self, a: Any) -> Any:
        if not isinstance(a, fx.Node):
            return a
        if a not in self.cache:
            self.cache[a] = self._value(a)
        return self.cache[a]

    def _value(self, a: fx.Node) -> Any:
        lw = self.lw
        v = lw.value(a)
        if isinstance(v, Rows) and v.level in (U, C):
            return v.node
        if rules.is_batch_size_node(a):
            return lw.num_users()
        info, m = a.meta.get(VALUE_KEY), element_map(a)
        if isinstance(info, TensorInfo) and isinstance(m, torch.Tensor) and bool(((m & 2) != 0).all()):
            return self._zeros(info.shape[1:], info.dtype)  # no element of it is read by a user element
        if isinstance(v, Pieces) and isinstance(info, TensorInfo) and isinstance(m, torch.Tensor):
            pieces = self._pieces(v, m, info)
            if pieces is not None:
                lw.mark_user_elements(a)
                return pieces
        split = _split_module(lw, v)
        if split is not None:
            out = self._through_split(a, *split)
            lw.mark_user_elements(a)
            return out
        if a.meta.get(ELEM_KEY) is None or isinstance(v, Seq) and not isinstance(info, tuple):
            raise _NoSplit
        if a.op == "call_module" and type(lw.modules.get(a.target)) is not type(lw.gm.get_submodule(a.target)):
            raise _NoSplit
        if a.op == "call_module" and isinstance(lw.modules.get(a.target), SplitLinear):
            raise _NoSplit  # the module at this path was rewritten
        new = lw.graph.node_copy(a, self.value)
        lw.port_meta(a, new)
        new.meta[ROWS_KEY] = U
        lw.mark_user_elements(a)
        return new

    def _through_split(self, a: fx.Node, name: str, mod: SplitLinear) -> fx.Node:
        """A Linear that was split already (a chained cross), at U rows: ``x @ W.T + b`` on the
        U-row cone of its input, with ``W``'s columns read off the split's blocks (the Linear's
        user output elements are rows whose every input element is USER or CONST)."""
        lw = self.lw
        order = _block_columns(mod)
        x = a.args[1] if a.target in (torch.addmm, torch.ops.aten.addmm.default) else (
            a.args[0] if a.args else a.kwargs.get("input"))
        if order is None or not isinstance(x, fx.Node):
            raise _NoSplit
        xu = self.value(x)
        info = x.meta.get(VALUE_KEY)
        width = info.shape[-1] if isinstance(info, TensorInfo) and info.ndim else None
        out = None
        for attr, cols in zip(("weight_user", "weight_item", "weight_broadcast"), order):
            if not cols:
                continue
            part = _columns(lw, xu, cols, width, U, f"{name}_{attr}_cols") if cols != list(range(width)) else xu
            w = lw.graph.get_attr(f"{name}.{attr}")
            bias = lw.graph.get_attr(f"{name}.bias") if out is None and mod.bias is not None else None
            y = lw.graph.call_function(torch.nn.functional.linear, (part, w, bias))
            out = y if out is None else lw.graph.call_function(operator.add, (out, y))
            for n in (w, y, out):
                n.meta[ROWS_KEY] = C if n is w else U
        if bias is not None:
            bias.meta[ROWS_KEY] = C
        return out

    def _zeros(self, sample, dtype) -> fx.Node:
        lw = self.lw
        out = lw.graph.call_method("new_zeros", (lw.user_index, (lw.num_users(), *sample)), {"dtype": dtype})
        out.meta[ROWS_KEY] = U
        return out

    def _pieces(self, v: Pieces, m: torch.Tensor, info: TensorInfo) -> Optional[fx.Node]:
        """A column-pieces value at U rows from its U pieces as they are, its N pieces as zeros --
        when no USER or CONST element lies in an N piece (else None: re-emit the node)."""
        flat, pos, parts = m.reshape(-1, m.shape[-1]), 0, []
        for level, width, rows in v.parts:
            if level == U and isinstance(rows, Rows):
                parts.append(rows.node)
            elif level == N and bool(((flat[:, pos:pos + width] & 2) != 0).all()):
                parts.append(self._zeros((*info.shape[1:-1], width), info.dtype))
            else:
                return None
            pos += width
        out = self.lw.cat(parts, U)
        if isinstance(out, fx.Node):
            out.meta[ROWS_KEY] = U
        return out


register_lowering(*targets.LINEAR_LIKE, priority=20)(_lower_field_linear)  # before the gram and piece splits
