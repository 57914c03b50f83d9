"""The MaRI matmul split: a Linear / ``F.linear`` / ``x @ W`` / ``addmm`` against a parameter
whose input is column pieces or a linear combination becomes a :class:`SplitLinear`: the user
share of the weight runs at U rows, the item share at N rows, the bias once."""
from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ... import targets
from .. import cost
from ...analysis import rules
from ...analysis.example_prop import VALUE_KEY, TensorInfo
from ..context import LoweringContext, _unslice, register_lowering
from ..values import N, U, Combo, Pieces, Rows, Value
from ...runtime.modules import SplitLinear, SplitSource
from ...report.record import LayerRecord
from ...analysis.tags import ROWS_KEY, TAG_KEY, Side, TensorTag

@dataclass(frozen=True)
class _LinearView:
    """A Linear-like call seen as ``x @ weight.T + bias`` with ``weight`` [out, in]."""

    x: fx.Node
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    name: str
    why_not: str = ""
    source: Tuple[Optional[str], Optional[str], bool] = (None, None, False)  # weight path, bias path, transposed


def _param(lw: LoweringContext, a: Any) -> Optional[torch.Tensor]:
    """The tensor a ``get_attr`` node reads (parameter, buffer or constant), else None."""
    if not (isinstance(a, fx.Node) and a.op == "get_attr"):
        return None
    obj = lw.gm
    for part in a.target.split("."):
        obj = getattr(obj, part)
    return obj if isinstance(obj, torch.Tensor) else None


def _path(a: Any) -> Optional[str]:
    return a.target if isinstance(a, fx.Node) and a.op == "get_attr" else None


def _linear_view(lw: LoweringContext, node: fx.Node, module) -> Optional[_LinearView]:
    if isinstance(module, nn.Linear):
        return _LinearView(lw.arg(node, 0, "input"), module.weight, module.bias, node.target, source=(
            f"{node.target}.weight", None if module.bias is None else f"{node.target}.bias", False))
    t, args = node.target, lw.args(node)  # by name, as the rules read them
    if args is None:
        return None
    if t in targets.LINEAR:
        w, b_arg = _param(lw, args["weight"]), args.get("bias")
        b = _param(lw, b_arg) if b_arg is not None else None
        bad = w is None or (b_arg is not None and b is None)
        return _LinearView(args["input"], w, b, node.name, "weight or bias is not a parameter" if bad else "",
                           (_path(args["weight"]), _path(b_arg), False))
    if t in targets.MATMUL:
        w_arg = args.get("other", args.get("mat2"))
        w, transposed, w_node = _right_weight(lw, w_arg)
        ok = w is not None and w.dim() == 2
        return _LinearView(args["input"], (w.t() if transposed else w) if ok else None, None, node.name,
                           "" if ok else "right operand is not a 2-d parameter (or its transpose)",
                           (_path(w_node), None, transposed))
    if t in targets.ADDMM:
        b = _param(lw, args["input"])
        w, transposed, w_node = _right_weight(lw, args["mat2"])
        ok = w is not None and b is not None and args.get("beta", 1) == 1 and args.get("alpha", 1) == 1
        return _LinearView(args["mat1"], (w.t() if transposed else w) if ok else None, b, node.name,
                           "" if ok else "addmm operands are not parameters (or beta/alpha given)",
                           (_path(w_node), _path(args["input"]), transposed))
    return None


_SWAPS = ("t", torch.t, "transpose", torch.transpose, "swapaxes", "swapdims")


def _right_weight(lw: LoweringContext, a: Any) -> Tuple[Optional[torch.Tensor], bool, Any]:
    """``(tensor, transposed, get_attr node)`` of the right operand of ``x @ a``: a 2-d parameter
    ``W`` (``[in, out]``: transposed) or its transpose ``W.t()`` / ``W.T`` / ``W.transpose(0, 1)``
    (``W`` is ``[out, in]``, as ``F.linear`` takes it); ``(None, True, a)`` for anything else."""
    w = _param(lw, a)
    if w is not None or not (isinstance(a, fx.Node) and a.op in ("call_method", "call_function") and a.args):
        return w, True, a
    src, rest = a.args[0], list(a.args[1:])
    swap = ((a.target in _SWAPS and (not rest or sorted(d % 2 for d in rest if isinstance(d, int)) == [0, 1])
             and len(rest) in (0, 2) and not a.kwargs)
            or (a.target is getattr and rest in (["T"], ["mT"])))
    p = _param(lw, src) if swap else None
    if p is None or p.dim() != 2:
        return None, True, a
    return p, False, src


def _lower_linear(lw: LoweringContext, node: fx.Node, module) -> Optional[Value]:
    view = _linear_view(lw, node, module)
    if view is None:
        return None
    x_tag, x_val = view.x.meta[TAG_KEY], lw.value(view.x)
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
    if isinstance(x_val, Combo) and any(r.level == U for _, r in x_val.terms) and lw.options.reassociate:
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
        user, item, bcast = _split_sources(lw, x_val, view.weight)
        item_width = sum(w.shape[1] for _, w, _ in item + bcast)
        if not user or item_width > in_features:
            split, reason = False, "splitting would not reduce the work at N rows"
        else:
            shape = _cost_shape(lw, view, node, info, x_val, cols[Side.USER], in_features, out_features,
                                rows_per_sample, user, item, bcast)
            if lw.options.cost_model and not cost.split_pays(shape):
                kept, done = cost.kept_work(shape).cost, cost.split_work(shape).cost
                split, reason = False, (
                    f"splitting would not reduce the work at N rows (cost model, mari_fx/lowering/cost.py: split "
                    f"{done / 1e6:.3g}M vs kept {kept / 1e6:.3g}M FLOP-equivalents at U={cost.REFERENCE_USERS}, "
                    f"N={cost.REFERENCE_CANDIDATES})")
        if not split:
            record = dataclasses.replace(record, action=action if action != "split" else "kept", reason=reason)
    if not split:
        lw.record_layer(record)
        return None
    out = _split_linear(lw, node, view, user, item, bcast)
    mod = lw.modules[out.node.target]
    lw.record_layer(dataclasses.replace(
        record, split_user_features=mod.weight_user.shape[1], split_item_features=mod.weight_item.shape[1],
        split_broadcast_features=0 if mod.weight_broadcast is None else mod.weight_broadcast.shape[1]))
    return out


def _cost_shape(lw: LoweringContext, view: _LinearView, node: fx.Node, info, x_val: Pieces, user_columns: int, in_features: int,
                out_features: int, rows_per_sample: int, user: List, item: List, bcast: List) -> cost.LinearShape:
    """What :mod:`mari_fx.lowering.cost` needs to judge this split."""
    itemsize = info.dtype.itemsize if isinstance(info, TensorInfo) and info.dtype is not None else 4
    return cost.LinearShape(
        in_features=in_features, out_features=out_features, rows=rows_per_sample,
        user=sum(w.shape[1] for _, w, _ in user), item=sum(w.shape[1] for _, w, _ in item),
        broadcast=sum(w.shape[1] for _, w, _ in bcast), user_sources=len(_unslice([n for n, _, _ in user])),
        item_sources=len(_unslice([n for n, _, _ in item])),
        input_user_columns=user_columns, input_user_sources=sum(1 for lvl, _, _ in x_val.parts if lvl == U),
        # another reader needs the input at N rows anyway: keeping the Linear whole saves no gather
        input_shared=any(u is not node and not _sibling_linear(lw, u, view.x) for u in view.x.users),
        itemsize=itemsize)


def _sibling_linear(lw: LoweringContext, reader: fx.Node, x: fx.Node) -> bool:
    """``reader`` is another Linear over ``x`` with parameter weights (the towers or experts of a
    multi-task model over one shared input): judged as splitting too, so it does not count as a
    reason to build ``x`` at N rows (if it keeps its Linear whole, x is built for it anyway)."""
    module = lw.gm.get_submodule(reader.target) if reader.op == "call_module" else None
    if isinstance(module, SplitLinear):
        return True  # split already (lowered before this Linear): it reads x's pieces, not x
    if not (isinstance(module, nn.Linear) or (reader.op == "call_function" and reader.target in targets.LINEAR_LIKE)):
        return False
    view = _linear_view(lw, reader, module)
    return view is not None and view.x is x and view.weight is not None and not view.why_not


def _split_sources(self: LoweringContext, x: Pieces, weight: torch.Tensor) -> Tuple[List, List, List]:
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
        if isinstance(part, Combo) and not self.options.reassociate:
            part = Rows(self.materialize(part), N)  # W(q - k) as the model computes it: no new rounding
        terms = part.terms if isinstance(part, Combo) else ((1.0, part),)
        for level in (U, N):
            group = [(c, t) for c, t in terms if (t.level == U) == (level == U)]
            if not group:
                continue
            if len(group) == 1:
                (coeff, rows), node = group[0], group[0][1].node
            else:
                coeff, rows = 1.0, None
                node = self.weighted_sum([(c, t.node) for c, t in group], level)
            entry = blocks.setdefault(id(node), [node, level, torch.zeros_like(w), rows, []])
            entry[2] = entry[2] + coeff * w
            entry[4].append((float(coeff), pos, width))  # where the block comes from (mari_fx.refresh)
        pos += width
    user = [(n, w, terms) for n, lvl, w, _, terms in blocks.values() if lvl == U]
    item, bcast, bcast_shape = [], [], None
    for n, lvl, w, rows, terms in blocks.values():
        if lvl == U:
            continue
        pre = _before_expand(self, rows)
        if pre is not None and bcast_shape in (None, pre[1]):
            bcast_shape = pre[1]
            bcast.append((pre[0], w, terms))
        else:
            item.append((n, w, terms))
    return user, item, bcast


def _before_expand(self: LoweringContext, rows: Optional[Rows]):
    """``(node, shape)`` of the N-row tensor that ``rows`` expands along size-1 middle dims."""
    orig = rows.orig if isinstance(rows, Rows) else None
    if orig is None or orig.target not in ("expand", torch.ops.aten.expand.default):
        return None
    src = orig.args[0]
    v = self.value(src) if isinstance(src, fx.Node) else None
    s_in, s_out = src.meta.get(VALUE_KEY), orig.meta.get(VALUE_KEY)
    if not (isinstance(v, Rows) and v.level == N and isinstance(s_in, TensorInfo) and isinstance(s_out, TensorInfo)):
        return None
    a, b = s_in.shape, s_out.shape
    if len(a) != len(b) or a[0] != b[0] or a[-1] != b[-1] or any(x != y and x != 1 for x, y in zip(a, b)):
        return None
    return v.node, a[1:]


def _split_linear(self: LoweringContext, node: fx.Node, view: _LinearView, user: List, item: List, bcast: List) -> Rows:
    def weights(sources):
        return torch.cat([w for _, w, _ in sources], 1).contiguous() if sources else None

    w_item = weights(item)
    mod = SplitLinear(weights(user), w_item if w_item is not None else view.weight.new_zeros(view.weight.shape[0], 0),
                      None if view.bias is None else view.bias.detach().clone(), weights(bcast))
    weight, bias, transposed = view.source
    if weight is not None:  # how to re-derive the blocks from the pair-shaped model (mari_fx.refresh)
        mod.source = SplitSource(weight, bias, transposed, tuple(tuple(t) for _, _, t in user),
                                 tuple(tuple(t) for _, _, t in item), tuple(tuple(t) for _, _, t in bcast))
    name = _module_name(self, view.name, node)
    mod._mari_fx_name = name  # its path in T (to read state dicts relative to T)
    self.add_submodule(name, mod)
    args = [self.cat([n for n, _, _ in user], U), self.cat([n for n, _, _ in item], N) if item else None,
            self.user_index]
    if bcast:
        args.append(self.cat([n for n, _, _ in bcast], N))
    out = self.graph.call_module(name, tuple(args))
    self.port_meta(node, out)
    out.meta[ROWS_KEY] = N
    return Rows(out, N, node)


def _module_name(self: LoweringContext, base: str, node: fx.Node) -> str:
    """Reuse the Linear's own path when it is called once; else a fresh sibling name."""
    if node.op == "call_module" and self.call_count(base) == 1:
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


register_lowering(*targets.LINEAR_LIKE)(_lower_linear)
