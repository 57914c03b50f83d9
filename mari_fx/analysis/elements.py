"""Element tags: which side every element of a sample is on, where column segments cannot say.

The column-segment tags of :mod:`mari_fx.analysis.tags` follow user columns along the last dim.
Field layouts move user data elsewhere: per-feature embeddings ``[B, 1, E]`` stacked on
dim 1 and flattened, field stacks reshaped to ``[B, F, D]``, pairwise products
``bmm(X, X.transpose(1, 2))`` gathered at ``[:, triu_i, triu_j]``.  For those values the
pass below writes an :class:`ElementTag` in ``node.meta["mari_fx.elements"]``: a small
``int8`` map shaped like *one sample* (all non-batch dims) with the side flags of
:class:`~mari_fx.analysis.tags.Side` per element (``CONST 0, USER 1, ITEM 2, MIXED 3``; join is
bitwise OR).

How each op transforms the map (every rule keeps this invariant: an element is USER only
if it depends on the user inputs of its own row alone, and CONST only if it depends on
no request data):

* **layout ops** (view/reshape/flatten/permute/cat/stack/split/indexing with constant
  indices incl. constant index tensors, expand/repeat, ... and helper functions built only
  from them, e.g. ``torch.fx.wrap``-ed ones) run *the same op* on a batch of 2 element ids;
  each output element is the input element whose id it carries.  An output that is not
  ``[2, *sample]`` or that takes an id from another row crosses the batch: no map;
* **elementwise ops** OR the broadcast maps (batched operands of the output's rank only);
* **reductions** (``sum(dim)``, ``mean``, ...) OR over the reduced dims, ops coupled along a
  dim (``softmax``, ``cumsum``, ``layer_norm``) OR along it and broadcast back;
* **contractions** (``bmm``, ``matmul``, ``einsum``, ``tensordot``, Linear, embedding lookups)
  OR over the contracted elements: ``out[i, j] = OR_k a[i, k] | b[k, j]``.

Maps are computed only for nodes whose tag is MIXED or segmented and that read user
elements, so wide 2-D models pay nothing.  A node without a map reads its map off its
tag.  Every map produced by a rule here is *exact* in the sense the lowering relies on
(:mod:`mari_fx.lowering.ops.field_split`): re-running the node's op at U rows on inputs whose USER and
CONST elements are right (everything else arbitrary) yields right USER and CONST elements.
"""
from __future__ import annotations

import builtins
import operator
import types
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from . import rules
from .. import targets
from .arguments import bind, nodes_in
from .example_prop import VALUE_KEY, TensorInfo
from .tags import TAG_KEY, SeqTag, Side, TensorTag

from ..meta import ELEM_KEY  # noqa: F401 (re-exported)
aten = torch.ops.aten
_MAX_ELEMS = 1 << 20  # per-sample maps larger than this are not built (the tag stays)


@dataclass(frozen=True, eq=False)
class ElementTag:
    """Side flags of every element of one sample (``map`` is int8, shaped like the sample;
    never mutated).  ``rule`` names the kind of rule that produced it (for the report).

    Example:
        >>> t = ElementTag(torch.tensor([[1, 2], [1, 3]], dtype=torch.int8), "layout")
        >>> str(t), t.side
        ('elements[user:2, item:1, mixed:1]', <Side.MIXED: 3>)
    """

    map: torch.Tensor
    rule: str

    @property
    def side(self) -> Side:
        return Side(int(_or_all(self.map))) if self.map.numel() else Side.CONST

    def count(self, side: Side) -> int:
        return int((self.map == int(side)).sum())

    def __str__(self) -> str:
        parts = [f"{s}:{self.count(s)}" for s in (Side.USER, Side.ITEM, Side.MIXED, Side.CONST) if self.count(s)]
        return "elements[" + ", ".join(parts) + "]"


Elem = Union[ElementTag, Tuple[Any, ...], None]


def _or_all(m: torch.Tensor) -> int:
    return int((m & 1).amax()) | int((m & 2).amax()) if m.numel() else 0


def _or_reduce(m: torch.Tensor, dims: Sequence[int], keepdim: bool) -> torch.Tensor:
    if not dims:
        return m
    return ((m & 1).amax(dim=tuple(dims), keepdim=keepdim) | (m & 2).amax(dim=tuple(dims), keepdim=keepdim))


def has_user(m: Any) -> bool:
    if isinstance(m, torch.Tensor):
        return bool(((m & 1) != 0).logical_and((m & 2) == 0).any())
    if isinstance(m, tuple):
        return any(has_user(x) for x in m)
    return False


# --------------------------------------------------------------------------- reading maps
def tag_map(tag: Any, value: Any) -> Any:
    """The per-sample map a (segment) tag implies: segments along the last dim, the same
    side along every other dim; a tuple for tuple values; None for non-tensors."""
    if isinstance(tag, SeqTag) and isinstance(value, tuple):
        return tuple(tag_map(t, v) for t, v in zip(tag.items, value))
    if not (isinstance(tag, TensorTag) and isinstance(value, TensorInfo)) or value.ndim == 0:
        return None
    sample = value.shape[1:]
    if len(sample) and tag.is_segmented and tag.width == sample[-1]:
        cols = torch.cat([torch.full((s.width,), int(s.side), dtype=torch.int8) for s in tag.segments])
        return cols.expand(sample).clone()
    return torch.full(sample, int(tag.side), dtype=torch.int8)


def element_map(node: Any) -> Any:
    """``node``'s per-sample side map: its element tag if the pass wrote one, else its tag's."""
    if not isinstance(node, fx.Node):
        return None
    e = node.meta.get(ELEM_KEY)
    if e is not None:
        return _maps(e)
    return tag_map(node.meta.get(TAG_KEY), node.meta.get(VALUE_KEY))


def _maps(e: Any) -> Any:
    if isinstance(e, ElementTag):
        return e.map
    if isinstance(e, tuple):
        return tuple(_maps(x) for x in e)
    return None


def _wrap(m: Any, rule: str) -> Any:
    if isinstance(m, torch.Tensor):
        return ElementTag(m.to(torch.int8).contiguous(), rule)
    if isinstance(m, (tuple, list)):
        return tuple(_wrap(x, rule) for x in m)
    return None


# --------------------------------------------------------------------------- the pass
def propagate_elements(gm: fx.GraphModule) -> fx.GraphModule:
    """Write :class:`ElementTag` s on the nodes of a tagged graph where they say more than the tag.

    Example:
        >>> import torch, mari_fx
        >>> class M(torch.nn.Module):
        ...     def forward(self, u, i):   # two [B, 1, E] fields stacked and flattened
        ...         return torch.cat([u.unsqueeze(1), i.unsqueeze(1)], dim=1).flatten(1)
        >>> gm = mari_fx.trace(M(), ["u"], (torch.ones(2, 3), torch.ones(2, 3)))
        >>> [(n.name, str(n.meta.get("mari_fx.elements", "-"))) for n in gm.graph.nodes if n.op.startswith("call")]
        [('unsqueeze', '-'), ('unsqueeze_1', '-'), ('cat', 'elements[user:3, item:3]'), ('flatten', 'elements[user:3, item:3]')]
    """
    consts = _Consts(gm)
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        node.meta.pop(ELEM_KEY, None)
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        tag = node.meta.get(TAG_KEY)
        if not _worth_it(tag) or not any(has_user(element_map(a)) for a in node.all_input_nodes):
            continue
        module = modules.get(node.target) if node.op == "call_module" else None
        try:
            got = _rule(node, module, consts)
        except Exception:  # a rule that cannot run on maps leaves the tag as it is
            got = None
        if got is not None:
            node.meta[ELEM_KEY] = _wrap(got[0], got[1])
    return gm


def _worth_it(tag: Any) -> bool:
    if isinstance(tag, SeqTag):
        return any(_worth_it(t) for t in tag.items)
    return isinstance(tag, TensorTag) and (tag.side == Side.MIXED or tag.is_segmented)


# --------------------------------------------------------------------------- constants
class _Consts:
    """Values of batch-free tensor nodes (parameters, buffers, ``triu_indices`` and what is
    computed from them only), evaluated on demand."""

    def __init__(self, gm: fx.GraphModule):
        self.gm, self.cache = gm, {}

    def get(self, node: fx.Node) -> Any:
        if node in self.cache:
            return self.cache[node]
        tag = node.meta.get(TAG_KEY)
        if not (isinstance(tag, TensorTag) and tag.side == Side.CONST):
            raise _NoMap
        if node.op == "get_attr":
            obj = self.gm
            for part in node.target.split("."):
                obj = getattr(obj, part)
            val = obj
        elif node.op in ("call_function", "call_method"):
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), self.get)
            info = node.meta.get(VALUE_KEY)
            if isinstance(info, TensorInfo) and torch.Size(info.shape).numel() > _MAX_ELEMS:
                raise _NoMap
            val = (node.target(*args, **kwargs) if node.op == "call_function"
                   else getattr(args[0], node.target)(*args[1:], **kwargs))
        else:
            raise _NoMap
        if isinstance(val, torch.Tensor):
            val = val.detach()
        self.cache[node] = val
        return val


class _NoMap(Exception):
    pass


# --------------------------------------------------------------------------- rules
def _info(a: Any) -> Any:
    return a.meta.get(VALUE_KEY) if isinstance(a, fx.Node) else None


def _batched(a: Any) -> bool:
    if not isinstance(a, fx.Node):
        return False
    tag = a.meta.get(TAG_KEY)
    return tag is not None and not (isinstance(tag, TensorTag) and tag.side == Side.CONST) and isinstance(
        _info(a), TensorInfo) and _info(a).ndim >= 1


def _only_data_batched(node: fx.Node, module: Optional[nn.Module], data: Sequence[str]) -> bool:
    """The argument policy of :func:`mari_fx.analysis.rules.rowwise`: only the named data operands may be
    batched (a batched weight, normalised shape or table couples rows, as in ``F.linear(h, h)``)."""
    named = bind(node, module)
    if named is None:
        return False
    return not any(_batched(a) for k, v in named.items() if k not in data for a in nodes_in(v))


def _rule(node: fx.Node, module: Optional[nn.Module], consts: _Consts) -> Optional[Tuple[Any, str]]:
    t = type(module) if module is not None else node.target
    if t is operator.getitem and isinstance(_info(node.args[0]), tuple):
        m = element_map(node.args[0])
        return (m[node.args[1]], "layout") if isinstance(m, tuple) and isinstance(node.args[1], int) else None
    for kinds, fn in _KINDS:
        if t in kinds:
            return fn(node, module, consts)
    if module is None and node.op == "call_function" and _is_python_helper(node.target):
        return _layout(node, module, consts, helper=True)
    return None


def _is_python_helper(fn: Any) -> bool:
    """A plain Python function (e.g. ``torch.fx.wrap``-ed) that no tag rule knows."""
    return (isinstance(fn, types.FunctionType) and fn not in rules.RULES
            and not (getattr(fn, "__module__", "") or "").startswith("torch."))


# ---- layout: run the op on element ids
_LAYOUT_METHODS = {
    "view", "reshape", "flatten", "unflatten", "unsqueeze", "squeeze", "permute", "transpose", "swapaxes",
    "expand", "repeat", "narrow", "select", "split", "chunk", "tensor_split", "unbind", "contiguous", "clone",
    "index_select", "flip", "roll", "movedim", "tile", "__getitem__", "getitem", "cat", "concat", "concatenate",
    "stack", "hstack", "vstack", "detach", "view_as", "reshape_as", "expand_as", "t", "mT", "T",
}
_LAYOUT_FUNCS = {
    torch.reshape, torch.flatten, torch.unflatten, torch.unsqueeze, torch.squeeze, torch.permute, torch.transpose,
    torch.swapaxes, torch.movedim, torch.cat, torch.concat, torch.concatenate, torch.stack, torch.split, torch.chunk,
    torch.tensor_split, torch.narrow, torch.select, torch.index_select, torch.unbind, torch.flip, torch.roll,
    torch.tile, operator.getitem, nn.Flatten, nn.Unflatten, nn.Identity,
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
    aten.unflatten.int, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.permute.default,
    aten.transpose.int, aten.expand.default, aten.repeat.default, aten.cat.default, aten.stack.default,
    aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.narrow.default, aten.select.int,
    aten.slice.Tensor, aten.index.Tensor, aten.index_select.default, aten.clone.default, aten.alias.default,
    aten.contiguous.default, aten.detach.default, aten.unbind.int,
}
# arguments that are indices, not data: constant tensors there keep their values
_INDEX_ARGS = {operator.getitem: (1,), torch.index_select: (2,), "index_select": (2,),  # x.index_select(dim, index)
               aten.index.Tensor: (1,), aten.index_select.default: (2,)}


def _layout(node: fx.Node, module: Optional[nn.Module], consts: _Consts, helper: bool = False):
    inputs: List[Tuple[fx.Node, torch.Tensor]] = []
    total = [0]
    index_args = _INDEX_ARGS.get(node.target, ())

    def convert(a: Any, in_index: bool) -> Any:
        if isinstance(a, fx.Node):
            info = _info(a)
            if _batched(a):
                m = element_map(a)
                if not isinstance(m, torch.Tensor) or m.numel() > _MAX_ELEMS:
                    raise _NoMap
                n = 2 * m.numel()
                ids = torch.arange(total[0], total[0] + n).reshape(2, *m.shape)
                total[0] += n
                inputs.append((a, m))
                return ids
            if rules.is_batch_size_node(a):
                return 2
            if isinstance(info, TensorInfo):
                if not in_index:
                    raise _NoMap  # a batch-free tensor used as data
                return consts.get(a)
            tag = a.meta.get(TAG_KEY)
            if isinstance(tag, TensorTag) and tag.side == Side.CONST:
                return info
            if isinstance(info, torch.Size) and _is_shape_of_batched(a):
                return torch.Size((2, *info[1:]))
            raise _NoMap
        if isinstance(a, (list, tuple)):
            out = [convert(x, in_index) for x in a]
            return type(a)(out) if not isinstance(a, torch.Size) else torch.Size(out)
        if isinstance(a, slice):
            return slice(convert(a.start, in_index), convert(a.stop, in_index), convert(a.step, in_index))
        if isinstance(a, dict):
            return {k: convert(v, in_index) for k, v in a.items()}
        return a

    args = tuple(convert(a, i in index_args) for i, a in enumerate(node.args))
    kwargs = {k: convert(v, False) for k, v in node.kwargs.items()}
    if not inputs:
        return None
    if module is not None:
        out = module(*args, **kwargs)
    elif node.op == "call_method":
        out = getattr(args[0], node.target)(*args[1:], **kwargs)
    elif helper:
        with _LayoutOnly():
            out = node.target(*args, **kwargs)
    else:
        out = node.target(*args, **kwargs)
    sides = torch.cat([m.reshape(1, -1).expand(2, -1).reshape(-1) for _, m in inputs])
    rows = torch.cat([torch.arange(2).repeat_interleave(m.numel()) for _, m in inputs])
    return _decode(out, node.meta.get(VALUE_KEY), sides, rows, total[0]), "layout"


def _is_shape_of_batched(a: fx.Node) -> bool:
    src = a.args[0] if a.args else None
    if a.op == "call_function" and a.target is builtins.getattr and a.args[1:] == ("shape",):
        return _batched(src)
    return a.op == "call_method" and a.target == "size" and len(a.args) == 1 and _batched(src)


def _decode(out: Any, info: Any, sides: torch.Tensor, rows: torch.Tensor, total: int) -> Any:
    if isinstance(out, (tuple, list)) and isinstance(info, tuple):
        if len(out) != len(info):
            raise _NoMap
        return tuple(_decode(o, i, sides, rows, total) for o, i in zip(out, info))
    if not (isinstance(out, torch.Tensor) and isinstance(info, TensorInfo)):
        raise _NoMap
    if out.dtype != torch.int64 or tuple(out.shape) != (2, *info.shape[1:]):
        raise _NoMap  # the batch was folded, moved or changed
    if out.numel() and (out.min() < 0 or out.max() >= total):
        raise _NoMap
    if not torch.equal(rows[out], torch.arange(2).view(2, *[1] * (out.ndim - 1)).expand_as(out)):
        raise _NoMap  # an element came from another row
    return sides[out[0]]


class _LayoutOnly(TorchFunctionMode):
    """Lets a helper function run on ids only if every torch op it calls moves data."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name not in _LAYOUT_METHODS and name not in ("size", "dim", "__get__", "numel", "__len__"):
            raise _NoMap
        return func(*args, **(kwargs or {}))


# ---- elementwise: OR of the broadcast maps
def _elementwise(node: fx.Node, module, consts) -> Optional[Tuple[Any, str]]:
    out = _info(node)
    if not isinstance(out, TensorInfo) or out.ndim < 1:
        return None
    acc = torch.zeros((1, *out.shape[1:]), dtype=torch.int8)
    for a in node.all_input_nodes:
        info = _info(a)
        if not isinstance(info, TensorInfo):
            if _batched(a) or not (isinstance(a.meta.get(TAG_KEY), TensorTag) and a.meta[TAG_KEY].side == Side.CONST):
                return None
            continue
        if _batched(a):
            m = element_map(a)
            if info.ndim != out.ndim or not isinstance(m, torch.Tensor):
                return None  # broadcasting could line the batch up with another dim
            acc = acc | m.unsqueeze(0)
        elif info.ndim > out.ndim or (info.ndim == out.ndim and info.shape[0] != 1):
            return None
    return acc[0].expand(out.shape[1:]).clone(), "elementwise"


def _batch_norm_eval(node: fx.Node, module, consts) -> Optional[Tuple[Any, str]]:
    """BatchNorm with running statistics (eval mode) is an affine map of each element by constants
    of its channel: elementwise in its input.  With batch statistics it couples the rows: no map."""
    if module is not None:
        uses_running = not module.training and module.running_mean is not None
    else:
        named = bind(node, module)
        uses_running = named is not None and named.get("training") is False and named.get("running_mean") is not None
    if not uses_running or not _only_data_batched(node, module, ("input",)):
        return None
    return _elementwise(node, module, consts)


# ---- reductions and ops coupled along dims
def _dims_arg(node: fx.Node, pos: int, name: str, ndim: int, default: Any = None) -> Optional[List[int]]:
    d = node.args[pos] if len(node.args) > pos else node.kwargs.get(name, default)
    d = rules.static_int(d)
    if isinstance(d, int):
        d = [d]
    if not isinstance(d, (list, tuple)) or not d or not all(isinstance(x, int) for x in d):
        return None
    dims = sorted({x % ndim for x in d})
    return None if 0 in dims else dims


def _reduction(node: fx.Node, module, consts) -> Optional[Tuple[Any, str]]:
    x = node.args[0] if node.args else node.kwargs.get("input")
    info = _info(x)
    if not (_batched(x) and isinstance(info, TensorInfo)) or not _only_data_batched(node, module, ("input",)):
        return None
    dims = _dims_arg(node, 1, "dim", info.ndim)
    keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if dims is None or not isinstance(keep, bool) or set(node.kwargs) - {"dim", "keepdim", "dtype"}:
        return None
    m = element_map(x).unsqueeze(0)
    return _or_reduce(m, dims, keep)[0], "reduction"


def _coupled(dim_pos: int, name: str = "dim", default: Any = None, last: bool = False):
    """Same-shape output, each element depending on its whole line along ``dim`` (or on the
    normalised trailing dims for ``last``)."""

    def rule(node: fx.Node, module, consts) -> Optional[Tuple[Any, str]]:
        x = node.args[0] if node.args else node.kwargs.get("input")
        info, out = _info(x), _info(node)
        if not (_batched(x) and isinstance(out, TensorInfo) and out.shape == info.shape):
            return None
        if not _only_data_batched(node, module, ("input",)):  # e.g. a batched layer_norm weight
            return None
        if last:
            n = _norm_len(node, module)
            if n is None or n >= info.ndim:
                return None
            dims = list(range(info.ndim - n, info.ndim))
        elif module is not None:
            dim = getattr(module, "dim", None)
            dims = [dim % info.ndim] if isinstance(dim, int) and dim % info.ndim else None
        else:
            dims = _dims_arg(node, dim_pos, name, info.ndim, default)
        if not dims:
            return None
        m = element_map(x).unsqueeze(0)
        return _or_reduce(m, dims, True).expand_as(m)[0].clone(), "coupled"

    return rule


def _norm_len(node: fx.Node, module) -> Optional[int]:
    shape = getattr(module, "normalized_shape", None) if module is not None else (
        node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape"))
    if isinstance(shape, int):
        return 1
    return len(shape) if isinstance(shape, (tuple, list, torch.Size)) else None


# ---- contractions
def _rowor(m: torch.Tensor) -> torch.Tensor:
    return _or_reduce(m, [m.ndim - 1], True)


def _linear(node: fx.Node, module, consts) -> Optional[Tuple[Any, str]]:
    """``x @ W.T + b`` with W, b batch-free: each output element ORs its row of x."""
    x = node.args[0] if node.args else node.kwargs.get("input")
    if not _batched(x) or not _only_data_batched(node, module, ("input",)) or _info(x).ndim < 2:
        return None  # F.linear(h, h): the weight is the input itself
    out = _info(node)
    return _rowor(element_map(x)).expand(out.shape[1:]).clone(), "contraction"


def _addmm(node: fx.Node, module, consts) -> Optional[Tuple[Any, str]]:
    b, x, w = node.args[:3]
    if not _batched(x) or not _only_data_batched(node, module, ("mat1",)) or node.kwargs:
        return None
    return _rowor(element_map(x)).expand(_info(node).shape[1:]).clone(), "contraction"


def _matmul(node: fx.Node, module, consts) -> Optional[Tuple[Any, str]]:
    a, b = node.args[:2]
    ia, ib, out = _info(a), _info(b), _info(node)
    if not (isinstance(ia, TensorInfo) and isinstance(ib, TensorInfo) and isinstance(out, TensorInfo)):
        return None
    if _batched(a) and not _batched(b) and ib.ndim == 2 and ia.ndim >= 2:
        return _rowor(element_map(a)).expand(out.shape[1:]).clone(), "contraction"
    if _batched(a) and _batched(b) and ia.ndim == ib.ndim == out.ndim >= 3:
        ma, mb = element_map(a), element_map(b)  # [..., n, k], [..., k, m]
        left = _rowor(ma)  # [..., n, 1]
        right = _or_reduce(mb, [mb.ndim - 2], True)  # [..., 1, m]
        return (left | right).expand(out.shape[1:]).clone(), "contraction"
    return None


def _tensordot(node: fx.Node, module, consts) -> Optional[Tuple[Any, str]]:
    a, b = node.args[:2]
    dims = node.args[2] if len(node.args) > 2 else node.kwargs.get("dims", 2)
    ia, ib, out = _info(a), _info(b), _info(node)
    if not (_batched(a) and not _batched(b) and isinstance(ib, TensorInfo) and isinstance(out, TensorInfo)):
        return None
    if isinstance(dims, int):
        da = list(range(ia.ndim - dims, ia.ndim))
    elif isinstance(dims, (list, tuple)) and len(dims) == 2:
        da = [d % ia.ndim for d in (dims[0] if isinstance(dims[0], (list, tuple)) else [dims[0]])]
    else:
        return None
    if 0 in da or not all(isinstance(d, int) for d in da):
        return None
    m = _or_reduce(element_map(a).unsqueeze(0), da, False)  # [1, free dims of a]
    m = m.reshape(*m.shape, *[1] * (out.ndim - m.ndim))
    return m.expand((1, *out.shape[1:]))[0].clone(), "contraction"


def _einsum(node: fx.Node, module, consts) -> Optional[Tuple[Any, str]]:
    eq, *ops = node.args
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = list(ops[0])
    if not isinstance(eq, str) or "..." in eq or "->" not in eq or node.kwargs:
        return None
    lhs, rhs = eq.replace(" ", "").split("->")
    subs = lhs.split(",")
    out = _info(node)
    if len(subs) != len(ops) or not rhs or not isinstance(out, TensorInfo):
        return None
    batch = rhs[0]
    for s, o in zip(subs, ops):
        if _batched(o) != (s[:1] == batch) or (not _batched(o) and batch in s):
            return None  # the batch letter leads every batched operand and the output only
    if not any(_batched(o) for o in ops):
        return None
    ones = [torch.ones((1, *_info(o).shape[1:]) if _batched(o) else _info(o).shape) for o in ops]
    acc = torch.zeros((1, *out.shape[1:]), dtype=torch.int8)
    for bit in (1, 2):
        total = torch.zeros((1, *out.shape[1:]))
        for j, o in enumerate(ops):
            if _batched(o):
                ind = ((element_map(o) & bit) != 0).float().unsqueeze(0)
                total = total + torch.einsum(eq, *[ind if k == j else ones[k] for k in range(len(ops))])
        acc = acc | ((total > 0).to(torch.int8) * bit)
    return acc[0], "contraction"


def _embedding(node: fx.Node, module, consts) -> Optional[Tuple[Any, str]]:
    if node.target is aten.embedding.default:  # (weight, indices, ...)
        idx = node.args[1]
    else:
        idx = node.args[0] if node.args else node.kwargs.get("input")
    others = [a for a in node.all_input_nodes if a is not idx]
    if not _batched(idx) or any(_batched(a) for a in others) or (module is not None and not isinstance(
            module, nn.Embedding)):
        return None
    out = _info(node)
    return element_map(idx).unsqueeze(-1).expand(out.shape[1:]).clone(), "contraction"


_KINDS = [
    (_LAYOUT_FUNCS | _LAYOUT_METHODS - {"getitem", "__getitem__"}, _layout),
    ((targets.ELEMENTWISE | set(targets.UNARY_MODULES)) - {"to", "type", "type_as"}, _elementwise),
    ({torch.sum, torch.mean, torch.amax, torch.amin, torch.prod, "sum", "mean", "amax", "amin", "prod",
      aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.amin.default}, _reduction),
    ({torch.softmax, F.softmax, torch.log_softmax, F.log_softmax, "softmax", "log_softmax", torch.cumsum,
      "cumsum", aten._softmax.default, aten.softmax.int, aten._log_softmax.default, aten.cumsum.default,
      nn.Softmax, nn.LogSoftmax}, _coupled(1)),
    ({F.normalize}, _coupled(2, "dim", 1)),
    ({nn.LayerNorm, F.layer_norm, aten.layer_norm.default}, _coupled(0, last=True)),
    ({nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, F.batch_norm}, _batch_norm_eval),
    ({nn.Linear, F.linear, aten.linear.default}, _linear),
    ({torch.addmm, aten.addmm.default}, _addmm),
    ({torch.matmul, operator.matmul, "matmul", "__matmul__", torch.bmm, "bmm", aten.bmm.default,
      aten.matmul.default, torch.mm, "mm", aten.mm.default}, _matmul),
    ({torch.tensordot}, _tensordot),
    ({torch.einsum}, _einsum),
    ({nn.Embedding, F.embedding, aten.embedding.default}, _embedding),
]
