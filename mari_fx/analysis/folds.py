"""Batch folds: a batch dim merged with the dims after it, run through row-wise ops, unfolded.

Sequence models often fold the sequence into the batch to run an MLP per (sample,
position): ``x`` ``[B, L, d]`` becomes ``x.view(-1, d)`` (or ``reshape(B * L, d)``,
``flatten(0, 1)``) ``[B * L, d]``, goes through Linear / activation layers, and comes
back as ``s.view(B, L)``.  A folded tensor has no batch dim of its own (its rows are
(sample, position) pairs), so no tag can say which of its columns are user-only.

This pass, run on the traced graph before tagging, *sinks* such a fold past the ops
that act on each row alone, where it cancels against the reshape that unfolds it:

* the fold ``F = fold(x)`` must merge dim 0 (the pair batch) with the dims right after it,
  batch-major, keeping every later dim: ``F.shape == (B * L, *x.shape[2:])`` -- so
  ``F == x.flatten(0, 1)`` exactly;
* a node joins the *row region* when it is row-wise -- for every row-wise ``f``,
  ``f(x.flatten(0, 1)) == f(x).flatten(0, 1)`` -- and every tensor it reads is in the
  region or a batch-free tensor that broadcasts over its trailing dims only: Linear /
  ``F.linear`` / ``x @ W`` with a 2-d parameter, elementwise ops, normalisations and
  reductions over negative (trailing) dims, ``squeeze`` / ``unsqueeze`` of a trailing dim;
* region nodes then read the unfolded tensors (they compute the same values, with the
  leading dims kept apart); a ``view`` / ``reshape`` of a region value reads the unfolded
  value as it is (a reshape depends only on the row-major element order, which the fold
  does not change); any other reader gets ``flatten(0, 1)`` of it: the folded value again.

Every rewrite is an identity on values, so the pass is sound whatever the region;
it pays off when the region holds a Linear over user and item columns (target
attention), which then splits with the user rows at ``U * L`` rows.  Nodes of a region
carry ``node.meta["mari_fx.unfolded"]`` (the fold's name).
"""
from __future__ import annotations

import operator
from typing import Any, Dict, List, Optional, Set

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .. import targets
from . import rules
from .example_prop import VALUE_KEY, TensorInfo

from ..meta import UNFOLDED_KEY  # noqa: E402
aten = torch.ops.aten

_RESHAPES = {"view", "reshape", torch.reshape, aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_FLATTENS = set(targets.FLATTEN)
_ROW_MODULES = tuple(targets.UNARY_MODULES) + (nn.Linear, nn.Dropout, nn.LayerNorm)
_ELEMENTWISE = set(targets.ELEMENTWISE) - {
    "to", "type", "type_as"}  # their arguments may be tensors read for a dtype: kept out to stay simple
_LINEARS = {F.linear, aten.linear.default}
_MATMULS = {torch.matmul, operator.matmul, "matmul", "__matmul__", aten.matmul.default}
_DIM_OPS = {  # position of the dim argument in node.args (a method's self is args[0]), its keyword
    torch.softmax: (1, "dim"), F.softmax: (1, "dim"), "softmax": (1, "dim"), torch.log_softmax: (1, "dim"),
    F.log_softmax: (1, "dim"), "log_softmax": (1, "dim"), torch.sum: (1, "dim"), "sum": (1, "dim"),
    torch.mean: (1, "dim"), "mean": (1, "dim"), torch.amax: (1, "dim"), "amax": (1, "dim"),
    torch.squeeze: (1, "dim"), "squeeze": (1, "dim"), torch.unsqueeze: (1, "dim"), "unsqueeze": (1, "dim"),
    F.normalize: (2, "dim"),
}
_NORMS = {F.layer_norm}


def _info(a: Any) -> Optional[TensorInfo]:
    v = a.meta.get(VALUE_KEY) if isinstance(a, fx.Node) else None
    return v if isinstance(v, TensorInfo) else None


def _fold_source(node: fx.Node, rows: int, batched: Set[fx.Node]) -> Optional[fx.Node]:
    """``x`` when ``node`` is ``x.flatten(0, 1)`` of a batched ``x`` (written as a view, reshape or flatten)."""
    if node.op not in ("call_function", "call_method") or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    x = node.args[0]
    xi, oi = _info(x), _info(node)
    if xi is None or oi is None or xi.ndim < 3 or xi.shape[0] != rows or x not in batched:
        return None
    if node.target in _FLATTENS:
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        if not (start == 0 and isinstance(end, int) and end % xi.ndim == 1):
            return None
    elif node.target not in _RESHAPES:
        return None
    if tuple(oi.shape) != (xi.shape[0] * xi.shape[1], *xi.shape[2:]) or oi.dtype != xi.dtype:
        return None
    return x


def _batched_nodes(gm: fx.GraphModule) -> Set[fx.Node]:
    """Nodes with a placeholder upstream (the rest are parameters, buffers, constants)."""
    out: Set[fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder" or any(a in out for a in n.all_input_nodes):
            out.add(n)
    return out


def _trailing_dims(node: fx.Node, ndim: int) -> bool:
    """The op's dim arguments (if any) name trailing dims only (negative, and not the rows dim)."""
    pos, kw = _DIM_OPS[node.target]
    d = node.args[pos] if len(node.args) > pos else node.kwargs.get(kw)
    if node.target in (torch.unsqueeze, "unsqueeze"):
        return isinstance(d, int) and -ndim - 1 < d < 0
    dims = [d] if isinstance(d, int) else list(d) if isinstance(d, (list, tuple)) else None
    return bool(dims) and all(isinstance(x, int) and -ndim < x < 0 for x in dims)


def _row_wise(node: fx.Node, region: Set[fx.Node], modules: Dict[str, nn.Module], batched: Set[fx.Node]) -> bool:
    """``node`` acts on each row of its region inputs alone (see the module docstring)."""
    ins = [a for a in node.all_input_nodes if a in region]
    if not ins or node.op not in ("call_function", "call_method", "call_module"):
        return False
    nd = _info(ins[0]).ndim if _info(ins[0]) is not None else None
    if nd is None or any(_info(a) is None or _info(a).ndim != nd for a in ins):
        return False
    out = _info(node)
    if out is None or out.ndim < 1:
        return False
    t = node.target
    if node.op != "call_module" and (t in _LINEARS or t in _MATMULS):
        # the weight (and bias) are parameters; on a 1-d value the "features" would be the rows
        w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        rest = [a for a in node.all_input_nodes if a is not node.args[0]]
        return (node.args[0] in region and nd >= 2 and not any(a in region or a in batched for a in rest)
                and (t in _LINEARS or (_info(w) is not None and _info(w).ndim == 2)))
    for a in node.all_input_nodes:  # every other tensor: batch-free, broadcasting over trailing dims only
        if a in region:
            continue
        ai = _info(a)
        if a in batched or ai is not None and (ai.ndim > nd or ai.ndim == nd and ai.shape[0] != 1):
            return False
    if node.op == "call_module":
        mod = modules.get(node.target)
        if isinstance(mod, nn.LayerNorm):
            return len(mod.normalized_shape) < nd
        if isinstance(mod, nn.Linear) and nd < 2:
            return False
        return isinstance(mod, _ROW_MODULES) and ins == [node.args[0]] and len(node.args) == 1
    if t in _NORMS:
        shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
        return node.args[0] in region and isinstance(shape, (list, tuple)) and len(shape) < nd
    if t in _DIM_OPS:
        return ins == [node.args[0]] and _trailing_dims(node, nd)
    if t in _ELEMENTWISE:
        return out.ndim == nd
    return False


def unfold_batch_folds(gm: fx.GraphModule, rows: int) -> List[str]:
    """Sink every batch fold of ``gm`` (example batch of ``rows`` rows) past its row-wise readers.

    Returns the names of the folds rewritten.  ``gm``'s example shapes (``node.meta["mari_fx.value"]``)
    are stale afterwards where a region node now keeps its leading dims apart: re-run the example.

    Example:
        >>> import torch, mari_fx
        >>> class M(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.lin = torch.nn.Linear(4, 1)
        ...     def forward(self, x, u):                   # x: [B, L, 4]
        ...         B, L = x.shape[0], x.shape[1]
        ...         return self.lin(x.view(-1, 4)).relu().view(B, L) + u
        >>> gm = mari_fx.trace(M(), ["u"], (torch.randn(2, 3, 4), torch.randn(2, 1)))
        >>> [(n.name, tuple(n.meta["mari_fx.value"].shape)) for n in gm.graph.nodes if "mari_fx.unfolded" in n.meta]
        [('lin', (2, 3, 1)), ('relu', (2, 3, 1))]
    """
    if any(_in_place(n) for n in gm.graph.nodes):
        return []  # aliasing through views would matter: keep the graph as written
    modules = dict(gm.named_modules())
    batched = _batched_nodes(gm)
    done: List[str] = []
    for fold in list(gm.graph.nodes):
        if fold.graph is not gm.graph or fold.meta.get(UNFOLDED_KEY) == "refold":
            continue
        x = _fold_source(fold, rows, batched)
        if x is None:
            continue
        region: Set[fx.Node] = {fold}
        order = []
        for n in _after(fold):
            if any(a in region for a in n.all_input_nodes) and _row_wise(n, region, modules, batched):
                region.add(n)
                order.append(n)
        if not order:
            continue  # nothing row-wise to keep apart
        _rewrite(gm, fold, x, region, order)
        done.append(fold.name)
    if done:
        gm.graph.eliminate_dead_code(is_impure_node=lambda n: n.op in ("placeholder", "output") or n.is_impure())
        gm.recompile()
    return done


def _in_place(n: fx.Node) -> bool:
    if n.op == "call_method":
        name = n.target
    elif n.op == "call_function":
        name = getattr(n.target, "__name__", "")
        if n.target in (operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem):
            return True
    else:
        return False
    return isinstance(name, str) and name.endswith("_") and not name.endswith("__")


def _after(node: fx.Node):
    n = node.next
    while n.op != "root":
        yield n
        n = n.next


def _rewrite(gm: fx.GraphModule, fold: fx.Node, x: fx.Node, region: Set[fx.Node], order: List[fx.Node]) -> None:
    # A reshape / flatten fold may have copied a non-contiguous x, where a later `view` of the folded
    # values worked; on the unfolded values (same strides as x) it might not: such exits reshape.
    relax = fold.target not in ("view", aten.view.default)
    for n in order:
        n.meta[UNFOLDED_KEY] = fold.name
        n.replace_input_with(fold, x)
    for v in [fold] + order:
        unfolded, refold = x if v is fold else v, None
        for c in list(v.users):
            if c in region:
                continue
            if c.op in ("call_function", "call_method") and c.target in _RESHAPES and c.args[0] is v:
                c.replace_input_with(v, unfolded)  # a reshape reads the row-major order, which is the same
                if relax and c.target in ("view", aten.view.default):
                    c.target = "reshape" if c.op == "call_method" else aten.reshape.default
            elif v is not fold:  # the fold itself stays for readers outside the region
                if refold is None:
                    with gm.graph.inserting_after(v):
                        refold = gm.graph.call_method("flatten", (v, 0, 1))
                    refold.meta[UNFOLDED_KEY] = "refold"
                c.replace_input_with(v, refold)


_MASKED_SELECTS = {torch.masked_select, "masked_select"}


def _per_row_mask(x: TensorInfo, m: TensorInfo) -> bool:
    """``m`` picks from each row of ``x`` alone: a boolean of exactly ``x``'s per-row shape (a mask
    that broadcasts, e.g. ``[F]`` against ``[B, F, F]``, would pick along other dims in ``x[:, m]``)."""
    return m.dtype == torch.bool and tuple(m.shape) == tuple(x.shape[1:])


def index_masked_selects(gm: fx.GraphModule, rows: int) -> List[str]:
    """Rewrite ``torch.masked_select(x, m).view(-1, K)`` as ``x[:, m].view(-1, K)`` (example batch of
    ``rows`` rows), a batch fold CTR libraries use to pick the upper triangle of a field Gram matrix.

    ``masked_select`` of a batched ``x`` by a batch-free boolean ``m`` of shape ``x.shape[1:]`` lists,
    row by row, the elements ``m`` selects, in row-major order: exactly the elements of ``x[:, m]``
    (one row per sample) in the same order, flattened.  A ``view`` / ``reshape`` reads only that
    order, so where every reader is one giving ``[rows, K]`` it can read ``x[:, m]`` instead, which
    keeps the batch dim (and the rules then follow which selected elements are user-only).
    Returns the names of the rewritten nodes; re-run the example afterwards.

    Example:
        >>> import torch, mari_fx
        >>> class M(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.register_buffer("upper", torch.ones(3, 3).triu(1).bool())
        ...     def forward(self, e):                    # e: [B, 3, 4] field embeddings
        ...         g = torch.bmm(e, e.transpose(1, 2))
        ...         return torch.masked_select(g, self.upper).view(-1, 3)
        >>> gm = mari_fx.trace(M(), ["e"], (torch.randn(2, 3, 4),))
        >>> [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")][-2:]
        [<built-in function getitem>, 'view']
    """
    batched = _batched_nodes(gm)
    done: List[str] = []
    for n in list(gm.graph.nodes):
        if n.op not in ("call_function", "call_method") or n.target not in _MASKED_SELECTS or n.kwargs:
            continue
        if len(n.args) != 2 or not all(isinstance(a, fx.Node) for a in n.args):
            continue
        x, m = n.args
        xi, mi, oi = _info(x), _info(m), _info(n)
        if (xi is None or mi is None or oi is None or x not in batched or m in batched or xi.ndim < 2
                or xi.shape[0] != rows or not _per_row_mask(xi, mi)):
            continue
        per_row = oi.shape[0] // rows if rows else 0
        readers = list(n.users)
        if not readers or not all(
                c.op in ("call_function", "call_method") and c.target in _RESHAPES and c.args[0] is n
                and _info(c) is not None and tuple(_info(c).shape) == (rows, per_row) for c in readers):
            continue
        with gm.graph.inserting_after(n):
            picked = gm.graph.call_function(operator.getitem, (x, (slice(None), m)))
        for c in readers:
            c.replace_input_with(n, picked)
        gm.graph.erase_node(n)
        done.append(picked.name)
    if done:
        gm.recompile()
    return done


# --------------------------------------------------------------------------- row picks
_ARANGES = {torch.arange, aten.arange.default}
_ARANGE_KWARGS = {"device", "dtype", "layout", "pin_memory", "requires_grad"}


def _row_arange(a: Any, rows: int) -> bool:
    """``a`` is ``torch.arange(n)`` of a batch size ``n`` read off a tensor (example value ``rows``)."""
    if not (isinstance(a, fx.Node) and a.op == "call_function" and a.target in _ARANGES and len(a.args) == 1):
        return False
    if set(a.kwargs) - _ARANGE_KWARGS or a.kwargs.get("dtype") not in (None, torch.int64):
        return False
    n = a.args[0]
    return isinstance(n, fx.Node) and n.meta.get(VALUE_KEY) == rows and not isinstance(n.meta.get(VALUE_KEY), bool)


def _row_pick(n: fx.Node, rows: int) -> Optional[tuple]:
    """``(x, idx)`` when ``n`` is ``x[torch.arange(B), idx]`` (``x[arange, idx, :]``, ``aten.index``)."""
    if n.op != "call_function" or len(n.args) != 2 or n.kwargs:
        return None
    x, index = n.args
    if not ((n.target is operator.getitem and isinstance(index, tuple))
            or (n.target is aten.index.Tensor and isinstance(index, (list, tuple)))):
        return None
    parts = list(index)
    if len(parts) < 2 or not _row_arange(parts[0], rows) or any(p != slice(None) for p in parts[2:]):
        return None
    idx, xi, ii, oi = parts[1], _info(x), _info(parts[1]), _info(n)
    if xi is None or ii is None or oi is None or xi.ndim < len(parts) or xi.shape[0] != rows:
        return None
    if tuple(ii.shape) != (rows,) or ii.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        return None
    if tuple(oi.shape) != (rows, *xi.shape[2:]):
        return None
    return x, idx


def index_row_picks(gm: fx.GraphModule, rows: int) -> List[str]:
    """Rewrite ``x[torch.arange(B), idx]`` (``B`` the batch size, ``idx`` one position per row: the
    last valid step of a padded sequence, ``o[torch.arange(B), lengths - 1]``) as the gather it
    is, ``x.gather(1, idx)`` over dim 1 (negative positions counted from the end, as indexing
    does).  Indexing by ``arange(B)`` pairs every row with itself, but reads as a batch-sized index
    (a value per pair); the gather keeps the batch dim, so a user-only ``x`` and ``idx`` stay user-side.
    Every rewrite is an identity on values (an out-of-range position still raises).  Returns the
    names of the rewritten nodes; re-run the example afterwards.

    Example:
        >>> import torch, mari_fx
        >>> class M(torch.nn.Module):
        ...     def forward(self, o, lengths):                 # o: [B, L, E] (a GRU's outputs)
        ...         return o[torch.arange(o.size(0)), lengths - 1]
        >>> gm = mari_fx.trace(M(), ["o", "lengths"], (torch.randn(3, 4, 2), torch.tensor([1, 4, 2])))
        >>> [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")][-2:]
        [<built-in method gather of type object at ...>, 'squeeze']
    """
    g = gm.graph
    done: List[str] = []
    for n in list(g.nodes):
        found = _row_pick(n, rows)
        if found is None:
            continue
        x, idx = found
        xi, ii = _info(x), _info(idx)
        with g.inserting_before(n):
            pos = idx if ii.dtype == torch.int64 else g.call_method("long", (idx,))
            pos = g.call_function(torch.where, (g.call_function(operator.lt, (pos, 0)),
                                                g.call_function(operator.add, (pos, xi.shape[1])), pos))
            pos = g.call_method("view", (pos, -1, 1, *[1] * (xi.ndim - 2)))
            pos = g.call_method("expand", (pos, -1, 1, *xi.shape[2:]))
            picked = g.call_method("squeeze", (g.call_function(torch.gather, (x, 1, pos)), 1))
        n.replace_all_uses_with(picked)
        g.erase_node(n)
        done.append(picked.name)
    if done:
        g.lint()
        gm.recompile()
    return done
