"""Tag rules: what side an op's output is on, given its inputs' tags.

One small rule per op, registered by target: a function (``torch.relu``), a method
name (``"view"``) or a module class (``nn.Linear``, looked up along the MRO).  A
target with no rule is *unknown*: its output is MIXED and the report says so.

The soundness argument every rule must keep: an output may be tagged USER only
if the op is *row-wise* -- ``f(x[idx]) == f(x)[idx]`` for every row index
``idx`` -- because USER values are computed at U rows and gathered to N rows
later.  Ops that couple rows across the batch (reductions or softmax over dim 0,
batch statistics, reshapes that merge the batch dimension) refuse: their output
is MIXED, i.e. computed exactly as in the pair-shaped model.

Segmented (column-exact) tags survive only the ops whose lowering in
:mod:`mari_fx.lowering` handles pieces: ``cat`` / slicing / ``split`` on the last
dimension, and elementwise ops with one column-structured operand.

To add a rule::

    from mari_fx.analysis.rules import register, rowwise
    register(my_lib.fused_gelu)(rowwise)   # or a function (ctx) -> Tag

See docs/rules.md.
"""
from __future__ import annotations

import builtins
import operator
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .. import registry as _registry, targets
from .arguments import bind, nodes_in
from .example_prop import VALUE_KEY, TensorInfo
from ..runtime.jagged import bag_ids, bag_offsets, bag_weights
from .tags import CONST, NOTE_KEY, TAG_KEY, Segment, SeqTag, Side, Tag, TensorTag, join_all

Target = Union[Callable, str, type]
Rule = Callable[["RuleContext"], Tag]
_MISSING = object()

RULES = _registry.RULES  # the core table; extensions add theirs (mari_fx.registry)
PRIORITY_BEFORE = 10  # register_before's priority: tried before the op's own rule


def register(*targets: Target, priority: int = 0, override: bool = False) -> Callable[[Rule], Rule]:
    """Register ``rule`` for each target in the core table; a second rule for a target at the
    same priority is an error (:class:`~mari_fx.errors.RegistrationError`, a ValueError) unless
    ``override=True``.  See :mod:`mari_fx.registry` for the policy and for extension objects.

    Example:
        >>> import torch
        >>> from mari_fx.analysis.rules import register, rowwise, RULES
        >>> def my_op(x): return x * 2
        >>> _ = register(my_op)(rowwise)
        >>> RULES[my_op] is rowwise
        True
        >>> del RULES[my_op]
    """

    def deco(rule: Rule) -> Rule:
        for t in targets:
            RULES.add(t, rule, priority=priority, override=override)
        return rule

    return deco


def register_before(*targets: Target) -> Callable[[Callable[["RuleContext"], Optional[Tag]]], Callable]:
    """Put ``rule`` in front of each target's own rule (or :func:`unknown`): it returns a Tag,
    or None to defer.  For extensions that teach an op with a rule (``operator.getitem``)
    about a new value type, e.g. indexing a KeyedTensor by key."""
    return register(*targets, priority=PRIORITY_BEFORE)


def target_name(target: Any) -> str:
    if isinstance(target, str):
        return f"Tensor.{target}"
    if isinstance(target, type):
        return f"{target.__module__}.{target.__qualname__}"
    mod = getattr(target, "__module__", None) or ""
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", repr(target))
    if mod in ("_operator", "operator"):
        mod = "operator"
    elif mod.startswith("torch._C") or mod == "":
        mod = "torch"
    return f"{mod}.{name}"


def lookup(node: fx.Node, module: Optional[nn.Module] = None) -> Optional[Rule]:
    """The rule for ``node``'s target: its entries tried in order (module classes matched along
    the MRO, see :mod:`mari_fx.registry`), a rule returning None deferring to the next."""
    key = type(module) if node.op == "call_module" else node.target
    try:
        found = RULES.values(key)
    except TypeError:  # an unhashable target: no rule
        return None
    if len(found) <= 1:
        return found[0] if found else None

    def chained(ctx: "RuleContext") -> Tag:
        for rule in found:
            tag = rule(ctx)
            if tag is not None:
                return tag
        return unknown(ctx)

    return chained


def describe_target(node: fx.Node, module: Optional[nn.Module] = None) -> str:
    if node.op == "call_module":
        return target_name(type(module))
    return target_name(node.target)


# --------------------------------------------------------------------------- context
class RuleContext:
    """What a rule sees: the node, its module (for call_module), tags and example shapes."""

    def __init__(self, node: fx.Node, module: Optional[nn.Module] = None):
        self.node = node
        self.module = module
        # call_module nodes have no ``self`` argument; call_method nodes have it first.
        self.args = node.args
        self.kwargs = node.kwargs
        self._named: Any = _MISSING

    # -- inputs
    @property
    def named(self) -> Optional[Dict[str, Any]]:
        """Every argument by parameter name, defaults filled in (:func:`mari_fx.analysis.arguments.bind`);
        None when the op's signature is unknown."""
        if self._named is _MISSING:
            self._named = bind(self.node, self.module)
        return self._named

    def arg(self, i: int, name: Union[None, str, Tuple[str, ...]] = None, default: Any = _MISSING) -> Any:
        """Argument ``name`` (or the first of several spellings) read by name whatever way the model
        passed it; the ``i``-th positional argument where the signature is unknown."""
        names = (name,) if isinstance(name, str) else tuple(name or ())
        named = self.named
        if names and named is not None:
            for n in names:
                if n in named:
                    return named[n]
            if default is not _MISSING:
                return default
        if i < len(self.args):
            return self.args[i]
        for n in names:
            if n in self.kwargs:
                return self.kwargs[n]
        if default is _MISSING:
            raise IndexError(f"{self.node.format_node()} has no argument {name or i}")
        return default

    def inputs(self) -> List[fx.Node]:
        found: List[fx.Node] = []
        fx.node.map_arg((self.args, self.kwargs), lambda n: found.append(n))
        return found

    def tag(self, a: Any) -> Tag:
        return a.meta[TAG_KEY] if isinstance(a, fx.Node) else CONST

    def side(self, a: Any) -> Side:
        return self.tag(a).side

    def value(self, a: Any) -> Any:
        return a.meta.get(VALUE_KEY) if isinstance(a, fx.Node) else a

    def ndim(self, a: Any) -> Optional[int]:
        v = self.value(a)
        return v.ndim if isinstance(v, TensorInfo) else None

    @property
    def out(self) -> Any:
        return self.node.meta.get(VALUE_KEY)

    def input_side(self) -> Side:
        return join_all(self.side(n) for n in self.inputs())

    # -- outputs
    def result(self, side: Side) -> Tag:
        """A uniform tag of ``side`` shaped like the node's output (SeqTag for tuples)."""
        return _uniform_like(self.out, side)

    def rowwise(self) -> Tag:
        return self.result(self.input_side())

    def refuse(self, reason: str) -> Tag:
        """MIXED output; the reason is kept for the report when user data was involved."""
        if self.input_side() == Side.CONST:
            return self.result(Side.CONST)
        if any(self.side(n) == Side.USER for n in self.inputs()):
            self.node.meta[NOTE_KEY] = reason
        return self.result(Side.MIXED)

    def norm_dim(self, dim: Any, ndim: Optional[int]) -> Optional[int]:
        if not isinstance(dim, int) or ndim is None:
            return None
        return dim + ndim if dim < 0 else dim


def _uniform_like(value: Any, side: Side) -> Tag:
    if isinstance(value, TensorInfo):
        return TensorTag.uniform(side, value.shape[-1] if value.ndim >= 2 else None)
    if isinstance(value, tuple) and not isinstance(value, torch.Size):
        return SeqTag(tuple(_uniform_like(v, side) for v in value))
    return TensorTag.uniform(side)


# --------------------------------------------------------------------------- generic rules
def _batched(ctx: RuleContext) -> List[fx.Node]:
    return [n for n in ctx.inputs() if ctx.side(n) != Side.CONST]


def rowwise(ctx: RuleContext, data: Optional[Sequence[str]] = None, min_ndim: int = 0,
            per_row: Sequence[str] = ()) -> Tag:
    """Rule for ops where each output row depends only on the same row of the *data* operands.

    ``data`` names the per-row operands (parameter names as :func:`mari_fx.analysis.arguments.bind` reads
    them); None makes every argument a data operand (elementwise ops).  Every other argument
    holding a node -- weights, tables, shapes, indices, masks -- must be batch-free (CONST), else
    the op is refused: ``F.linear(h, h)`` contracts over the batch, ``F.embedding(i, h)`` reads
    rows of a batched table.  Batched data operands must share a rank (>= ``min_ndim``) and
    batch-free data operands may neither add leading dims nor have a dim 0 of size > 1 at that
    rank, so that broadcasting never lines the batch up with another axis.  ``per_row`` names
    operands the op reads row by row without broadcasting them against the data (a
    ``[batch, seq]`` key padding mask): they may be batched, and the caller checks their shape.

    Register it with the data operands named via :func:`rowwise_in`.
    """
    if data is None:
        operands = ctx.inputs()
    else:
        named = ctx.named
        if named is None:
            return ctx.refuse(f"the arguments of {describe_target(ctx.node, ctx.module)} could not be read by name")
        operands = []
        for name, value in named.items():
            found = nodes_in(value)
            if name in data:
                operands += found
            elif name in per_row:
                continue
            elif any(ctx.side(n) != Side.CONST for n in found):
                return ctx.refuse(
                    f"argument '{name}' of {describe_target(ctx.node, ctx.module)} depends on the batch: only "
                    f"{' / '.join(data)} may (a batched weight, table, shape or index couples rows)")
    batched = [n for n in operands if ctx.side(n) != Side.CONST and ctx.ndim(n) is not None]
    ranks = {ctx.ndim(n) for n in batched}
    if len(ranks) > 1:
        # name the culprit (typically a mask of fewer dims): its batch lines up with another dim
        low = ", ".join(f"'{n.name}' ({ctx.ndim(n)}-d)" for n in batched if ctx.ndim(n) < max(ranks))
        return ctx.refuse(f"batched operands of different rank: broadcasting could move the batch dimension "
                          f"of {low} against {max(ranks)}-d operands; give it the same rank (e.g. "
                          f"mask[:, None, None, :])")
    if ranks:
        (rank,) = ranks
        if rank < min_ndim:
            return ctx.refuse(f"{describe_target(ctx.node, ctx.module)} of a {rank}-d batched operand (needs >= "
                              f"{min_ndim} dims): the batch dimension would be one the op mixes")
        for n in operands:
            v = ctx.value(n)
            if ctx.side(n) != Side.CONST or not isinstance(v, TensorInfo):
                continue
            if v.ndim > rank:
                return ctx.refuse("a constant operand adds leading dimensions in front of the batch")
            if v.ndim == rank and rank and v.shape[0] != 1:
                return ctx.refuse("a constant operand has a dim 0 of size > 1 that lines up with the batch")
    return ctx.rowwise()


def rowwise_in(*data: str, min_ndim: int = 0) -> Rule:
    """:func:`rowwise` with the per-row operands named (every other argument must be CONST).

    Example:
        >>> from mari_fx.analysis.rules import RULES, register, rowwise_in
        >>> def scale_rows(x, weight):   # x per row; weight must not depend on the batch
        ...     return x * weight
        >>> rule = register(scale_rows)(rowwise_in("x", min_ndim=2))
        >>> RULES[scale_rows] is rule
        True
        >>> del RULES[scale_rows]
    """

    def rule(ctx: RuleContext) -> Tag:
        return rowwise(ctx, data, min_ndim)

    return rule


def unknown(ctx: RuleContext) -> Tag:
    """The rule of every op without one: MIXED, reported."""
    ctx.node.meta[NOTE_KEY] = f"no mari_fx rule for {describe_target(ctx.node, ctx.module)}: treated as mixed"
    return ctx.result(Side.MIXED)


def elementwise(ctx: RuleContext) -> Tag:
    """Row-wise, and column-exact when one operand carries column segments and every
    other operand is a scalar (so it applies to every column alike)."""
    tag = rowwise(ctx)
    if tag.side == Side.MIXED and ctx.node.meta.get(NOTE_KEY):
        return tag
    if (type(ctx.module) if ctx.module is not None else ctx.node.target) not in PIECEWISE:
        return tag  # the lowering could not apply it piece by piece
    seg = [n for n in ctx.inputs() if ctx.tag(n).is_segmented]
    if len(seg) == 1 and _is_scalar_others(ctx, seg[0]):
        src = ctx.tag(seg[0])
        if isinstance(ctx.out, TensorInfo) and ctx.out.shape[-1] == src.width and ctx.out.ndim == ctx.ndim(seg[0]):
            return src
    return tag


def _is_scalar_others(ctx: RuleContext, keep: fx.Node) -> bool:
    def scalar(a: Any) -> bool:
        if isinstance(a, fx.Node):
            v = ctx.value(a)
            return ctx.side(a) == Side.CONST and isinstance(v, TensorInfo) and all(d == 1 for d in v.shape)
        return isinstance(a, (int, float, bool, str, torch.dtype, type(None)))

    others = [a for a in list(ctx.args) + list(ctx.kwargs.values()) if a is not keep]
    return all(scalar(a) for a in others)


def _dims(arg: Any) -> Optional[List[Any]]:
    if arg is None:
        return None
    return list(arg) if isinstance(arg, (list, tuple)) else [arg]


def reduction(dim_pos: int = 1, dim_name: str = "dim") -> Rule:
    """Rule for reductions / normalisations over ``dim``: row-wise unless ``dim`` is the batch."""

    def rule(ctx: RuleContext) -> Tag:
        ndim = ctx.ndim(ctx.arg(0))
        dims = _dims(ctx.arg(dim_pos, dim_name, None))
        dims = dims and [static_int(d) for d in dims]
        if dims and not all(isinstance(d, int) for d in dims):
            return ctx.refuse("reduction dims are not constants")
        if ndim is not None and ndim <= 1 or not dims:
            return ctx.refuse("reduces over the batch dimension (no dim given, or a 1-d input)")
        if 0 in [ctx.norm_dim(d, ndim) for d in dims]:
            return ctx.refuse("reduces over the batch dimension (dim 0)")
        return rowwise(ctx, ("input",))

    return rule


def refuse_with(reason: str) -> Rule:
    def rule(ctx: RuleContext) -> Tag:
        return ctx.refuse(reason)

    return rule


def constant_if_constant(rule: Rule) -> Rule:
    def wrapped(ctx: RuleContext) -> Tag:
        return ctx.result(Side.CONST) if ctx.input_side() == Side.CONST else rule(ctx)

    return wrapped


# --------------------------------------------------------------------------- elementwise
_UNARY_FUNCS, _UNARY_METHODS, _UNARY_MODULES = targets.UNARY_FUNCS, targets.UNARY_METHODS, targets.UNARY_MODULES
_BINARY_FUNCS, _BINARY_METHODS = targets.BINARY_FUNCS, targets.BINARY_METHODS
aten = torch.ops.aten
register(*_UNARY_FUNCS, *_UNARY_METHODS, *_UNARY_MODULES)(constant_if_constant(elementwise))
register(*_BINARY_FUNCS, *_BINARY_METHODS)(constant_if_constant(elementwise))
_DROPOUTS = targets.DROPOUTS
PIECEWISE = targets.PIECEWISE


@register_before(torch.where)
def _where_indices(ctx: RuleContext) -> Optional[Tag]:
    """``torch.where(cond)`` alone is ``nonzero(cond, as_tuple=True)``: indices into the whole batch."""
    if len(ctx.args) + len(ctx.kwargs) == 1 and ctx.input_side() != Side.CONST:
        return ctx.refuse("torch.where(condition) with one argument returns indices into the whole batch")
    return None



# --------------------------------------------------------------------------- masks and logical ops
# Boolean masks (``hist == 0``, ``~pad``, ``a & b``, ``torch.where(m, x, y)``) are elementwise: the
# generic rule applies, including its rank check (a [B, L] mask against [B, H, L, L] scores would
# line the batch up with dim 2; its message names the mask).
_LOGICAL_FUNCS, _LOGICAL_METHODS = targets.LOGICAL_FUNCS, targets.LOGICAL_METHODS
register(*_LOGICAL_FUNCS, *_LOGICAL_METHODS)(constant_if_constant(elementwise))


@register(torch.tril, torch.triu, "tril", "triu", aten.tril.default, aten.triu.default)
def _triangle(ctx: RuleContext) -> Tag:
    """Causal masks: ``tril`` / ``triu`` act on the last two dims, so on a batched tensor of
    >= 3 dims they are row-wise (a batch-free ``torch.ones(L, L).tril()`` is CONST)."""
    if ctx.input_side() == Side.CONST:
        return ctx.result(Side.CONST)
    if (ctx.ndim(ctx.arg(0)) or 0) < 3:
        return ctx.refuse("tril/triu of a 2-d batched tensor takes the batch as a matrix dimension")
    return rowwise(ctx)


@register(torch.repeat_interleave, "repeat_interleave", aten.repeat_interleave.self_int)
def _repeat_interleave(ctx: RuleContext) -> Tag:
    """Row-wise when it repeats along a non-batch dim by a constant count; along dim 0 it makes
    several rows per row (a batch-major fold: see :func:`batch_major_fold`)."""
    if ctx.input_side() == Side.CONST:
        return ctx.result(Side.CONST)
    dim = ctx.norm_dim(ctx.arg(2, "dim", None), ctx.ndim(ctx.arg(0)))
    if dim in (0, None) or ctx.side(ctx.arg(1, "repeats")) != Side.CONST:
        return ctx.refuse("repeat_interleave along the batch dimension (or by batched counts) repeats rows")
    return ctx.rowwise()


@register(*_DROPOUTS[:4])
def _dropout_module(ctx: RuleContext) -> Tag:
    if ctx.module.training and ctx.module.p > 0:
        return ctx.refuse("Dropout in training mode is random per row: call model.eval() first")
    return elementwise(ctx)


@register(*_DROPOUTS[4:])
def _dropout_fn(ctx: RuleContext) -> Tag:
    training = ctx.arg(2, ("training", "train"), True)
    if training and ctx.arg(1, "p", 0.5) > 0:
        return ctx.refuse("dropout with training=True is random per row")
    return elementwise(ctx)


# --------------------------------------------------------------------------- reductions, softmax
register(
    torch.sum, torch.mean, torch.prod, torch.amax, torch.amin, torch.logsumexp, torch.std, torch.var,
    torch.norm, torch.all, torch.any, torch.count_nonzero, torch.argmax, torch.argmin, torch.cumsum,
    torch.cumprod, torch.softmax, torch.log_softmax, F.softmax, F.log_softmax,
    "sum", "mean", "prod", "amax", "amin", "logsumexp", "std", "var", "norm", "all", "any",
    "argmax", "argmin", "cumsum", "cumprod", "softmax", "log_softmax", "count_nonzero",
)(constant_if_constant(reduction()))
register(torch.max, torch.min, "max", "min")(constant_if_constant(
    lambda ctx: elementwise(ctx) if isinstance(ctx.arg(1, "other", None), fx.Node) else reduction()(ctx)))
register(torch.topk, "topk")(constant_if_constant(reduction(2, "dim")))
register(torch.sort, "sort", torch.argsort, "argsort")(constant_if_constant(reduction(1, "dim")))
register(F.normalize)(constant_if_constant(reduction(2, "dim")))  # dim defaults to 1 (filled in by name)


@register(nn.Softmax, nn.LogSoftmax, nn.Softmin)
def _softmax_module(ctx: RuleContext) -> Tag:
    dim, ndim = ctx.module.dim, ctx.ndim(ctx.arg(0))
    if dim is None or ctx.norm_dim(dim, ndim) == 0:
        return ctx.refuse(f"{type(ctx.module).__name__}(dim={dim}) runs over the batch dimension")
    return rowwise(ctx)


# --------------------------------------------------------------------------- normalisation
@register(nn.LayerNorm, nn.RMSNorm, F.layer_norm, F.rms_norm)
def _layer_norm(ctx: RuleContext) -> Tag:
    """Row-wise when the normalised trailing dims leave dim 0 alone; the shape, weight and bias
    must be batch-free (``F.layer_norm(h, h.shape)`` normalises over the batch)."""
    shape = ctx.module.normalized_shape if ctx.module is not None else ctx.arg(1, "normalized_shape")
    if any(ctx.side(n) != Side.CONST for n in nodes_in(shape)):
        return ctx.refuse("layer_norm's normalized_shape depends on the batch (e.g. h.shape): it covers dim 0")
    value = ctx.value(shape) if isinstance(shape, fx.Node) else shape
    n_norm = len(value) if isinstance(value, (tuple, list, torch.Size)) else 1
    ndim = ctx.ndim(ctx.arg(0, "input"))
    if ndim is None or n_norm >= ndim:
        return ctx.refuse("normalises over the batch dimension")
    return rowwise(ctx, ("input",))


@register(nn.modules.batchnorm._BatchNorm)
def _batch_norm(ctx: RuleContext) -> Tag:
    m = ctx.module
    if m.training or not m.track_running_stats or m.running_mean is None:
        return ctx.refuse(f"{type(m).__name__} in training mode normalises with batch statistics: call model.eval()")
    return rowwise(ctx, ("input",), min_ndim=2)


@register(F.batch_norm)
def _batch_norm_fn(ctx: RuleContext) -> Tag:
    """Also ``aten.batch_norm``: the same parameter names in another order."""
    if ctx.arg(5, "training", False) or ctx.arg(1, "running_mean", None) is None:
        return ctx.refuse("batch_norm with training=True normalises with batch statistics")
    return rowwise(ctx, ("input",), min_ndim=2)  # running stats, weight and bias batch-free


@register(nn.GroupNorm, F.group_norm)
def _group_norm(ctx: RuleContext) -> Tag:
    return rowwise(ctx, ("input",), min_ndim=2)  # (N, C, *) only; weight and bias batch-free


@register(nn.modules.instancenorm._InstanceNorm)
def _instance_norm(ctx: RuleContext) -> Tag:
    # An input without a batch dim ((C, L) for InstanceNorm1d) would make the batch the channels.
    return rowwise(ctx, ("input",), min_ndim=ctx.module._get_no_batch_dim() + 1)


# --------------------------------------------------------------------------- linear algebra
# Row-wise over the input rows only: weights and biases must be batch-free (F.linear(h, h) contracts
# over the batch); a 1-d batched input would be contracted with the weight.  A column-segmented
# input is split in the lowering.
_linear = rowwise_in("input", min_ndim=2)
register(nn.Linear, F.linear)(_linear)
register(torch.addmm)(rowwise_in("input", "mat1", min_ndim=2))  # input is the (broadcast) bias
register(nn.Bilinear, F.bilinear)(rowwise_in("input1", "input2", min_ndim=2))


@register(torch.matmul, operator.matmul, torch.mm, "matmul", "mm", "__matmul__")
def _matmul(ctx: RuleContext) -> Tag:
    a, b = ctx.arg(0, "input"), ctx.arg(1, ("other", "mat2"))
    if ctx.side(b) != Side.CONST and (ctx.ndim(b) or 0) < 3:
        return ctx.refuse("matmul whose right operand is batched and <3-d contracts over the batch dimension")
    if ctx.side(a) != Side.CONST and (ctx.ndim(a) or 0) < 2:
        return ctx.refuse("matmul of a 1-d batched vector contracts over the batch dimension")
    return rowwise(ctx, ("input", "other", "mat2"))


register(torch.bmm, "bmm")(rowwise_in("input", "mat2", min_ndim=3))
register(torch.baddbmm, "baddbmm")(rowwise_in("input", "batch1", "batch2", min_ndim=3))


# --------------------------------------------------------------------------- embeddings
# Rows of a batch-free table, one per index: row-wise in the index.  A batched table
# (F.embedding(ids, h)) would read other rows' data.
register(nn.Embedding, F.embedding)(rowwise_in("input"))


@register(nn.EmbeddingBag, F.embedding_bag)
def _embedding_bag(ctx: RuleContext) -> Tag:
    """2-d input: one bag per row.  1-d input + offsets: row-wise only over the parts of one
    declared bag input (``Bag("ids", "offsets")``), whose rows are its bags."""
    fn = ctx.module is None  # F.embedding_bag(input, weight, offsets, ..., per_sample_weights at 8)
    ids = ctx.arg(0, "input")
    offsets = ctx.arg(2 if fn else 1, "offsets", None)
    weights = ctx.arg(8 if fn else 2, "per_sample_weights", None)
    last = ctx.arg(9, "include_last_offset", False) if fn else ctx.module.include_last_offset
    if fn and ctx.side(ctx.arg(1, "weight")) != Side.CONST:
        return ctx.refuse("embedding_bag's weight 'weight' is batched: rows of a per-sample table")
    if offsets is not None:
        bag = _bag_of(ids, bag_ids)
        if bag is None:
            return ctx.refuse(f"EmbeddingBag with 1-d input '{getattr(ids, 'name', ids)}' and offsets: bags are not "
                              "rows; declare the pair as one bag input, e.g. Bag('ids', 'offsets')")
        info = ctx.value(bag)
        if _bag_of(offsets, bag_offsets) is not bag or (weights is not None and _bag_of(weights, bag_weights) is not bag):
            return ctx.refuse(f"EmbeddingBag reads the ids of bag input '{bag.name}' with offsets or weights "
                              "that are not that bag's")
        if bool(last) != getattr(info, "include_last_offset", False):
            return ctx.refuse(f"EmbeddingBag's include_last_offset differs from bag input '{bag.name}'")
        return ctx.result(ctx.side(bag))
    if ctx.ndim(ids) != 2:
        return ctx.refuse("EmbeddingBag with a 1-d input and no offsets")
    return ctx.result(ctx.side(ids).join(ctx.side(weights)))


def _bag_of(a: Any, part: Callable) -> Optional[fx.Node]:
    """The bag input ``a`` reads with ``part`` (``bag_ids(bag)``), if it does."""
    if isinstance(a, fx.Node) and a.op == "call_function" and a.target is part:
        return a.args[0]
    return None


@register(bag_ids, bag_offsets, bag_weights)
def _bag_part(ctx: RuleContext) -> Tag:
    """A part of a bag input is not one row per row (its ids are every bag's ids): MIXED for a
    user bag (rebuilt from the pair-shaped bag at N rows if anything but an EmbeddingBag reads
    it); an item bag's parts are item-side, as in the pair model."""
    side = ctx.side(ctx.arg(0))
    return ctx.result(Side.MIXED if side == Side.USER else side)


# --------------------------------------------------------------------------- indexing by tensors
@register(torch.index_select, "index_select")
def _index_select(ctx: RuleContext) -> Tag:
    """Along a non-batch dim with a batch-free index: row-wise in the input.  Along dim 0 of a
    batch-free table with a batched 1-d index: a table lookup, row-wise in the index."""
    x, index = ctx.arg(0, "input"), ctx.arg(2, "index")
    dim = ctx.norm_dim(static_int(ctx.arg(1, "dim")), ctx.ndim(x))
    if ctx.input_side() == Side.CONST:
        return ctx.result(Side.CONST)
    if dim not in (0, None) and ctx.side(index) == Side.CONST:
        return rowwise(ctx, ("input",))
    if dim == 0 and ctx.side(x) == Side.CONST and ctx.ndim(index) == 1:
        return rowwise(ctx, ("index",))
    return ctx.refuse("index_select picks rows of the batch dimension (or a batched index picks columns)")


@register(torch.gather, "gather")
def _gather(ctx: RuleContext) -> Tag:
    """``out[b, j] = x[b, index[b, j]]`` along a non-batch dim: row-wise when input and index are
    batched alike (gather does not broadcast: a batch-free index would keep its own row count)."""
    x, index = ctx.arg(0, "input"), ctx.arg(2, "index")
    if ctx.input_side() == Side.CONST:
        return ctx.result(Side.CONST)
    if ctx.norm_dim(static_int(ctx.arg(1, "dim")), ctx.ndim(x)) in (0, None):
        return ctx.refuse("gather along the batch dimension")
    if ctx.side(x) == Side.CONST or ctx.side(index) == Side.CONST:
        return ctx.refuse("gather of a batched tensor by a batch-free index (or the reverse) pairs rows by position")
    return rowwise(ctx, ("input", "index"))


@register(torch.take_along_dim, "take_along_dim")
def _take_along_dim(ctx: RuleContext) -> Tag:
    x = ctx.arg(0, "input")
    if ctx.input_side() == Side.CONST:
        return ctx.result(Side.CONST)
    if ctx.norm_dim(static_int(ctx.arg(2, "dim", None)), ctx.ndim(x)) in (0, None):
        return ctx.refuse("take_along_dim along the batch dimension (or of the flattened input)")
    return rowwise(ctx, ("input", "indices"))  # broadcasts like an elementwise op


register(nn.PReLU)(rowwise_in("input"))
register(*{F.prelu, torch.prelu, "prelu"})(rowwise_in("input"))  # the weight is per channel (dim 1): batch-free


# --------------------------------------------------------------------------- shapes and sizes
# In the pair-shaped model the batch size of every batched tensor is the number of pairs N, so
# a size read off a batched tensor (``x.size(0)``, ``x.shape``, ``x.numel()``, ``len(x)``) is
# tagged ITEM: it depends on the request's N, whatever side the tensor is on, and a consumer
# that uses it as a value runs at N rows.  The one exception is the *batch position of a shape*
# (:func:`batch_dim_size_slot`): there a batch size only says "as many rows as the batch", and
# the lowering passes the row count the op runs at (U for a USER op).


def _is_batched_node(a: Any) -> bool:
    return (isinstance(a, fx.Node) and TAG_KEY in a.meta and a.meta[TAG_KEY].side != Side.CONST
            and isinstance(a.meta.get(VALUE_KEY), TensorInfo) and a.meta[VALUE_KEY].ndim >= 1
            and a.meta[VALUE_KEY].shape[0] in (_example_rows(a.graph), None))


def _example_rows(graph: fx.Graph) -> Optional[int]:
    """The example's pair count (dim 0 of the tensor inputs): a tensor whose dim 0 has another size
    in the example (the batch folded into it, ``[B * L, d]``, or moved) has no batch size to read."""
    for p in graph.nodes:
        if p.op != "placeholder":
            break
        info = p.meta.get(VALUE_KEY)
        if isinstance(info, TensorInfo) and info.ndim >= 1:
            return info.shape[0]
    return None


def size_read(a: Any) -> Optional[Tuple[str, fx.Node]]:
    """``(kind, t)`` if ``a`` reads the size of a batched tensor ``t``: kind ``"batch"`` for its
    batch size (``t.size(0)``, ``t.shape[0]``, ``t.shape[-ndim]``, ``len(t)``,
    ``aten.sym_size.int(t, 0)``), ``"shape"`` for its whole shape (``t.shape``, ``t.size()``),
    ``"numel"`` for ``t.numel()``; None for anything else (feature sizes included).

    Example:
        >>> import torch, mari_fx
        >>> from mari_fx.analysis.rules import size_read
        >>> class M(torch.nn.Module):
        ...     def forward(self, u, i):
        ...         return u * u.size(0) + u.shape[1] + i
        >>> gm = mari_fx.trace(M(), ["u"], (torch.randn(4, 3), torch.randn(4, 3)))
        >>> [(n.name, size_read(n)[0]) for n in gm.graph.nodes if size_read(n)]
        [('size', 'batch'), ('getattr_1', 'shape')]
    """
    if not isinstance(a, fx.Node) or a.op not in ("call_function", "call_method") or not a.args:
        return None
    t, target = a.args[0], a.target
    if target == "size" and a.op == "call_method" or target is aten.sym_size.int:
        if not _is_batched_node(t):
            return None
        d = a.args[1] if len(a.args) > 1 else a.kwargs.get("dim")
        if d is None:
            return ("shape", t)
        return ("batch", t) if isinstance(d, int) and d % t.meta[VALUE_KEY].ndim == 0 else None
    if target is builtins.getattr and len(a.args) > 1 and a.args[1] == "shape":
        return ("shape", t) if _is_batched_node(t) else None
    if target in ("numel", torch.numel, aten.sym_numel.default):
        return ("numel", t) if _is_batched_node(t) else None
    if target is builtins.len:
        return ("batch", t) if _is_batched_node(t) else None
    if target is operator.getitem and isinstance(a.args[1], int) and not isinstance(a.args[1], bool):
        read = size_read(t)
        if read is not None and read[0] == "shape" and a.args[1] % read[1].meta[VALUE_KEY].ndim == 0:
            return ("batch", read[1])
    return None


def is_batch_size_node(a: Any) -> bool:
    """``a`` is the batch size of a batched tensor (``t.size(0)``, ``t.shape[0]``, ``len(t)``)."""
    read = size_read(a)
    return read is not None and read[0] == "batch"


def is_batch_size(ctx: RuleContext, a: Any) -> bool:
    return is_batch_size_node(a)


# target -> (position, keyword) of its size argument(s); the first size is the batch position.
_SHAPE_SLOTS: Dict[Any, Tuple[int, str]] = {
    "view": (1, "size"), "reshape": (1, "shape"), "expand": (1, "size"), torch.reshape: (1, "shape"),
    "new_zeros": (1, "size"), "new_ones": (1, "size"), "new_empty": (1, "size"), "new_full": (1, "size"),
    torch.zeros: (0, "size"), torch.ones: (0, "size"), torch.empty: (0, "size"), torch.full: (0, "size"),
    aten.view.default: (1, "size"), aten.reshape.default: (1, "shape"), aten._unsafe_view.default: (1, "size"),
    aten.expand.default: (1, "size"), aten.zeros.default: (0, "size"), aten.ones.default: (0, "size"),
    aten.empty.memory_format: (0, "size"), aten.full.default: (0, "size"), aten.new_zeros.default: (1, "size"),
    aten.new_ones.default: (1, "size"), aten.new_empty.default: (1, "size"), aten.new_full.default: (1, "size"),
}


def batch_dim_size_slot(node: fx.Node) -> Optional[Tuple[Any, ...]]:
    """Where ``node`` passes a batch size as the batch dimension of a shape: the path
    (``("args", i)``, ``("args", i, 0)`` or ``("kwargs", name, 0)``) of its *first* size argument,
    if that is a batch size (:func:`is_batch_size_node`); else None.

    Rules and lowering share this one predicate: only this argument adapts to the rows the op runs
    at (the lowering gives U at U rows); a batch size anywhere else is the value N.

    Example:
        >>> import torch, mari_fx
        >>> from mari_fx.analysis.rules import batch_dim_size_slot
        >>> class M(torch.nn.Module):
        ...     def forward(self, u, i):
        ...         return u.view(u.size(0), -1) + u.unsqueeze(1).expand(-1, u.size(0), -1).sum(1) + i
        >>> gm = mari_fx.trace(M(), ["u"], (torch.randn(4, 3), torch.randn(4, 3)))
        >>> {n.target: batch_dim_size_slot(n) for n in gm.graph.nodes if n.target in ("view", "expand")}
        {'view': ('args', 1), 'expand': None}
    """
    slot = _SHAPE_SLOTS.get(node.target) if node.op in ("call_function", "call_method") else None
    if slot is None:
        return None
    pos, name = slot
    if pos < len(node.args):
        path: Tuple[Any, ...] = ("args", pos)
        first = node.args[pos]
    elif name in node.kwargs:
        path, first = ("kwargs", name), node.kwargs[name]
    else:
        return None
    if isinstance(first, (list, tuple)):
        if not first:
            return None
        path, first = path + (0,), first[0]
    return path if is_batch_size_node(first) else None


def replace_at(args: Tuple[Any, ...], kwargs: Dict[str, Any], path: Tuple[Any, ...], new: Any):
    """``(args, kwargs)`` with the argument at ``path`` (from :func:`batch_dim_size_slot`) replaced by ``new``."""
    args, kwargs = list(args), dict(kwargs)
    holder, key = (args, path[1]) if path[0] == "args" else (kwargs, path[1])
    if len(path) == 3:
        seq = list(holder[key])
        seq[path[2]] = new
        holder[key] = type(holder[key])(seq) if isinstance(holder[key], tuple) else seq
    else:
        holder[key] = new
    return tuple(args), kwargs


def _batch_dim_size_arg(ctx: RuleContext) -> Optional[fx.Node]:
    path = batch_dim_size_slot(ctx.node)
    if path is None:
        return None
    holder = ctx.args if path[0] == "args" else ctx.kwargs
    value = holder[path[1]]
    return value[path[2]] if len(path) == 3 else value


def _shape_args(ctx: RuleContext, start: int, name: str) -> List[Any]:
    rest = list(ctx.args[start:])
    if len(rest) == 1 and isinstance(rest[0], (list, tuple, torch.Size)):
        return list(rest[0])
    if not rest and name in ctx.kwargs:
        return list(ctx.kwargs[name])
    return rest


def _side_beside_batch_size(ctx: RuleContext) -> Side:
    """Side of a shape op on a batched tensor, not counting a batch size in the batch position:
    it adapts to the rows the op runs at (the lowering passes U or N), so ``u.view(i.size(0), -1)``
    stays USER.  A batch size in any other position is the value N (ITEM)."""
    inputs = ctx.inputs()
    size = _batch_dim_size_arg(ctx)
    if size is not None and ctx.side(ctx.arg(0)) != Side.CONST:
        inputs.remove(size)  # this one occurrence only
    return join_all(ctx.side(n) for n in inputs)


def _keeps_batch(ctx: RuleContext, first: Any) -> bool:
    src, out = ctx.value(ctx.arg(0)), ctx.out
    if not (isinstance(src, TensorInfo) and isinstance(out, TensorInfo) and src.ndim >= 1 and out.ndim >= 1):
        return False
    return (first == -1 or is_batch_size(ctx, first)) and out.shape[0] == src.shape[0]


@register("view", "reshape", torch.reshape)
def _reshape(ctx: RuleContext) -> Tag:
    if ctx.input_side() == Side.CONST:
        return ctx.result(Side.CONST)
    shape = _shape_args(ctx, 1, "shape")
    if ctx.node.target == "view" and shape and isinstance(shape[0], torch.dtype):
        return elementwise(ctx)
    if not shape or not _keeps_batch(ctx, shape[0]):
        return ctx.refuse("reshape does not keep dim 0 as the batch (first size must be -1 or x.size(0))")
    return ctx.result(_side_beside_batch_size(ctx))


@register("expand")
def _expand(ctx: RuleContext) -> Tag:
    if ctx.input_side() == Side.CONST:
        return ctx.result(Side.CONST)
    sizes = _shape_args(ctx, 1, "size")
    if len(sizes) != ctx.ndim(ctx.arg(0)) or not _keeps_batch(ctx, sizes[0]):
        return ctx.refuse("expand changes the batch dimension")
    return ctx.result(_side_beside_batch_size(ctx))


@register("repeat")
def _repeat(ctx: RuleContext) -> Tag:
    sizes = _shape_args(ctx, 1, "repeats")
    if ctx.input_side() != Side.CONST and (len(sizes) != ctx.ndim(ctx.arg(0)) or sizes[0] != 1):
        return ctx.refuse("repeat along the batch dimension")
    return ctx.rowwise()


@register(torch.flatten, "flatten", nn.Flatten)
def _flatten(ctx: RuleContext) -> Tag:
    if ctx.module is not None:
        start = ctx.module.start_dim
    else:
        start = ctx.arg(1, "start_dim", 0)
    if ctx.input_side() != Side.CONST and ctx.norm_dim(start, ctx.ndim(ctx.arg(0))) in (0, None):
        return ctx.refuse("flatten merges the batch dimension (use start_dim=1)")
    return ctx.rowwise()


@register(nn.Unflatten, torch.unflatten, "unflatten")
def _unflatten(ctx: RuleContext) -> Tag:
    dim = ctx.module.dim if ctx.module is not None else ctx.arg(1, "dim")
    if ctx.input_side() != Side.CONST and ctx.norm_dim(dim, ctx.ndim(ctx.arg(0))) in (0, None):
        return ctx.refuse("unflatten splits the batch dimension")
    return ctx.rowwise()


@register(torch.unsqueeze, "unsqueeze")
def _unsqueeze(ctx: RuleContext) -> Tag:
    ndim = ctx.ndim(ctx.arg(0))
    d = ctx.norm_dim(ctx.arg(1, "dim"), None if ndim is None else ndim + 1)
    if ctx.input_side() != Side.CONST and d in (0, None):
        return ctx.refuse("unsqueeze(0) puts a new dimension in front of the batch")
    return ctx.rowwise()


@register(torch.squeeze, "squeeze")
def _squeeze(ctx: RuleContext) -> Tag:
    dims = _dims(ctx.arg(1, "dim", None))
    ndim = ctx.ndim(ctx.arg(0))
    if ctx.input_side() != Side.CONST and (not dims or 0 in [ctx.norm_dim(d, ndim) for d in dims]):
        return ctx.refuse("squeeze without a dim (or of dim 0) drops the batch dimension of a 1-row batch")
    return ctx.rowwise()


@register(torch.permute, "permute")
def _permute(ctx: RuleContext) -> Tag:
    dims = _shape_args(ctx, 1, "dims")
    if ctx.input_side() != Side.CONST and (not dims or ctx.norm_dim(dims[0], ctx.ndim(ctx.arg(0))) != 0):
        return ctx.refuse("permute moves the batch dimension")
    return ctx.rowwise()


@register(torch.transpose, "transpose", torch.swapaxes, "swapaxes")
def _transpose(ctx: RuleContext) -> Tag:
    ndim = ctx.ndim(ctx.arg(0))
    dims = [ctx.norm_dim(ctx.arg(1, ("dim0", "axis0")), ndim), ctx.norm_dim(ctx.arg(2, ("dim1", "axis1")), ndim)]
    if ctx.input_side() != Side.CONST and (0 in dims or None in dims):
        return ctx.refuse("transpose moves the batch dimension")
    return ctx.rowwise()


register("t", torch.t)(constant_if_constant(refuse_with("t() swaps the batch dimension")))


def _size_tag(ctx: RuleContext) -> Tag:
    """A size read off a batched tensor is N (ITEM); see :func:`size_read`."""
    if ctx.input_side() == Side.CONST:
        return CONST
    read = size_read(ctx.node)
    return TensorTag.uniform(Side.ITEM if read is not None else Side.MIXED)


@register("size")
def _size(ctx: RuleContext) -> Tag:
    dim = ctx.arg(1, "dim", None)
    if dim is not None and ctx.norm_dim(dim, ctx.ndim(ctx.arg(0))) != 0:
        return CONST
    return _size_tag(ctx)


register("dim", "ndimension", "is_contiguous", "element_size")(lambda ctx: CONST)
register("numel", torch.numel, aten.sym_numel.default)(_size_tag)


@register(builtins.getattr)
def _getattr(ctx: RuleContext) -> Tag:
    name = ctx.arg(1)
    if name in ("dtype", "device", "ndim", "is_cuda", "layout", "requires_grad"):
        return CONST
    if name == "shape":
        return _size_tag(ctx)
    if name == "mT" and (ctx.ndim(ctx.arg(0)) or 0) >= 3:
        return ctx.rowwise()
    tag = ctx.tag(ctx.arg(0))
    if name in ("values", "indices") and isinstance(tag, SeqTag) and len(tag.items) == 2:
        return tag.items[name == "indices"]  # (values, indices) of topk / sort / max(dim)
    return unknown(ctx)


@register(operator.getitem)
def _getitem(ctx: RuleContext) -> Tag:
    base, index = ctx.arg(0), ctx.arg(1)
    tag, value = ctx.tag(base), ctx.value(base)
    if isinstance(tag, SeqTag):
        if isinstance(index, int):
            return tag.items[index]
        if isinstance(index, slice):
            return SeqTag(tag.items[index])
        return unknown(ctx)
    if isinstance(value, (torch.Size, tuple)):  # indexing a shape
        if isinstance(index, int) and index % max(len(value), 1) != 0:
            return CONST
        if isinstance(index, slice) and (index.start or 0) >= 1:
            return CONST
        return TensorTag.uniform(tag.side)
    if not isinstance(value, TensorInfo):
        return unknown(ctx)
    if ctx.input_side() == Side.CONST:
        return ctx.result(Side.CONST)
    plan = normalize_index(index, value.ndim)
    if plan is None:
        return ctx.refuse("indexing with tensors or lists, or with a new axis in front of the batch")
    per_dim, _ = plan
    if per_dim[0] != slice(None):
        return ctx.refuse("indexing selects rows of the batch dimension")
    cols = column_index(index, value.ndim, value.shape[-1])
    if isinstance(tag, TensorTag) and tag.is_segmented and cols is not None:
        last = cols[1]
        if isinstance(last, slice):
            return tag.slice(*last.indices(value.shape[-1])[:2])
        col = last % value.shape[-1]
        return ctx.result(tag.slice(col, col + 1).side)
    return ctx.rowwise()


def static_int(a: Any) -> Any:
    """A batch-free int node (e.g. ``x.shape[1] // 2``) as its value; other values as they are."""
    if isinstance(a, fx.Node) and a.meta.get(TAG_KEY) == CONST and isinstance(a.meta.get(VALUE_KEY), int):
        return a.meta[VALUE_KEY]
    return a


def _new_axis(i: Any) -> bool:
    return i is None or isinstance(i, bool)  # x[:, True] adds an axis of size 1, like None


def expand_index(index: Any, ndim: int) -> Optional[List[Any]]:
    """A basic (int/slice/None/bool/...) index as a list: the ``...`` expanded, one entry per
    input dim plus the new axes (None / bools) where they stand.  None for indices the rules
    do not analyse (tensors, lists, batch-dependent bounds, or a new axis in front of the
    batch).  Batch-free int nodes in the index are replaced by their (static) values."""
    items = list(index) if isinstance(index, tuple) else [index]
    items = [slice(static_int(i.start), static_int(i.stop), static_int(i.step)) if isinstance(i, slice)
             else static_int(i) for i in items]
    if any(isinstance(b, fx.Node) for i in items if isinstance(i, slice) for b in (i.start, i.stop, i.step)):
        return None
    if any(isinstance(i, (fx.Node, list, torch.Tensor)) for i in items):
        return None
    n_ellipsis = sum(i is Ellipsis for i in items)
    consuming = sum(1 for i in items if not _new_axis(i) and i is not Ellipsis)
    if n_ellipsis > 1 or consuming > ndim:
        return None
    expanded: List[Any] = []
    for i in items:
        expanded += [slice(None)] * (ndim - consuming) if i is Ellipsis else [i]
    if not n_ellipsis:
        expanded += [slice(None)] * (ndim - consuming)
    if not expanded or _new_axis(expanded[0]):
        return None
    return expanded


def normalize_index(index: Any, ndim: int) -> Optional[Tuple[List[Any], bool]]:
    """One entry per input dim of a basic index (see :func:`expand_index`), and whether a
    new axis lands after the last dim."""
    expanded = expand_index(index, ndim)
    if expanded is None:
        return None
    return [i for i in expanded if not _new_axis(i)], _new_axis(expanded[-1])


def column_index(index: Any, ndim: int, width: int) -> Optional[Tuple[Tuple[Any, ...], Any]]:
    """``(prefix, last)`` for a basic index that keeps every row and whose last entry indexes the
    last input dim (of size ``width``) with a non-empty step-1 slice or an int: ``prefix`` is the rest of the expanded index
    (new axes included).  Exactly the indices whose column segments the rule keeps and the
    lowering (:mod:`mari_fx.lowering.ops.pieces`) applies piece by piece, with ``last`` shifted per piece.

    Example:
        >>> from mari_fx.analysis.rules import column_index
        >>> column_index((Ellipsis, None, slice(0, 4)), 2, 12)
        ((slice(None, None, None), None), slice(0, 4, None))
        >>> column_index((slice(None), True), 2, 12)         # x[:, True] adds an axis, like None
        ((slice(None, None, None), True), slice(None, None, None))
        >>> column_index((slice(None), slice(None), None), 2, 12) is None   # a trailing new axis
        True
    """
    expanded = expand_index(index, ndim)
    if expanded is None or expanded[0] != slice(None):
        return None
    last = expanded[-1]
    if isinstance(last, slice) and last.step in (None, 1) and len(range(*last.indices(width))) > 0:
        return tuple(expanded[:-1]), last
    if isinstance(last, int) and not isinstance(last, bool):
        return tuple(expanded[:-1]), last
    return None  # other steps, or no columns at all (an empty [rows, 0] result)


# --------------------------------------------------------------------------- cat / stack / split
def _sequence(ctx: RuleContext, arg: Any) -> Tuple[List[Tag], List[Any]]:
    """Tags and example values of the tensors in a list argument, or in a tuple-valued node
    (``torch.cat(x.split(4, -1), -1)``)."""
    if isinstance(arg, fx.Node):
        tag, value = ctx.tag(arg), ctx.value(arg)
        if isinstance(tag, SeqTag) and isinstance(value, tuple) and len(value) == len(tag.items):
            return list(tag.items), list(value)
        return [tag], [None]  # unknown: one opaque batched entry
    return [ctx.tag(t) for t in arg], [ctx.value(t) for t in arg]


@register(torch.cat, torch.concat, torch.concatenate)
def _cat(ctx: RuleContext) -> Tag:
    tensors = ctx.arg(0, "tensors")
    tags, values = _sequence(ctx, tensors)
    ndim = values[0].ndim if values and isinstance(values[0], TensorInfo) else None
    dim = ctx.norm_dim(static_int(ctx.arg(1, "dim", 0)), ndim)
    sides = [t.side for t in tags]
    if all(s == Side.CONST for s in sides):
        return ctx.result(Side.CONST)
    if dim in (0, None):
        return ctx.refuse("cat along the batch dimension")
    if Side.CONST in sides:
        return ctx.refuse("cat of batched tensors with a batch-free constant")
    if isinstance(tensors, fx.Node):  # the pieces lowering reads list arguments only
        return ctx.rowwise()
    if dim == ndim - 1:
        segments: List[Segment] = []
        for t in tensors:
            tag = ctx.tag(t)
            if tag.width is None:
                segments.append(Segment(tag.side, ctx.value(t).shape[-1]))
            else:
                segments += list(tag.segments)
        return TensorTag.of_segments(segments)
    return ctx.rowwise()


@register(torch.stack)
def _stack(ctx: RuleContext) -> Tag:
    tags, values = _sequence(ctx, ctx.arg(0, "tensors"))
    ndim = values[0].ndim if values and isinstance(values[0], TensorInfo) else None
    dim = ctx.norm_dim(static_int(ctx.arg(1, "dim", 0)), None if ndim is None else ndim + 1)
    if all(t.side == Side.CONST for t in tags):
        return ctx.result(Side.CONST)
    if dim in (0, None) or any(t.side == Side.CONST for t in tags):
        return ctx.refuse("stack along the batch dimension, or with a batch-free constant")
    return ctx.rowwise()


def _split_rule(dim_pos: int) -> Rule:
    def rule(ctx: RuleContext) -> Tag:
        x = ctx.arg(0)
        if ctx.input_side() == Side.CONST:
            return ctx.result(Side.CONST)
        ndim = ctx.ndim(x)
        dim = ctx.norm_dim(static_int(ctx.arg(dim_pos, "dim", 0)), ndim)
        if dim in (0, None):
            return ctx.refuse("split along the batch dimension")
        tag = rowwise(ctx, ("input", "tensor"))  # split sizes must be batch-free
        if tag.side == Side.MIXED and ctx.node.meta.get(NOTE_KEY):
            return tag
        tag = ctx.tag(x)
        if (dim == ndim - 1 and isinstance(tag, TensorTag) and tag.is_segmented and isinstance(ctx.out, tuple)
                and all(part.shape[-1] > 0 for part in ctx.out)):  # as mari_fx.lowering.ops.pieces lowers it
            pos, items = 0, []
            for part in ctx.out:
                w = part.shape[-1]
                items.append(tag.slice(pos, pos + w))
                pos += w
            return SeqTag(tuple(items))
        return ctx.rowwise()

    return rule


register(torch.split, "split", torch.chunk, "chunk", torch.tensor_split, "tensor_split")(_split_rule(2))
register(torch.unbind, "unbind")(
    lambda ctx: ctx.refuse("unbind along the batch dimension")
    if ctx.norm_dim(ctx.arg(1, "dim", 0), ctx.ndim(ctx.arg(0))) in (0, None) and ctx.input_side() != Side.CONST
    else ctx.rowwise())


@register(torch.narrow, "narrow")
def _narrow(ctx: RuleContext) -> Tag:
    x = ctx.arg(0)
    ndim = ctx.ndim(x)
    dim = ctx.norm_dim(static_int(ctx.arg(1, "dim")), ndim)
    if ctx.input_side() == Side.CONST:
        return ctx.result(Side.CONST)
    if dim in (0, None):
        return ctx.refuse("narrow along the batch dimension")
    tag, start, length = ctx.tag(x), static_int(ctx.arg(2, "start")), static_int(ctx.arg(3, "length"))
    if dim == ndim - 1 and tag.is_segmented and isinstance(start, int) and isinstance(length, int) and length > 0:
        start %= ctx.value(x).shape[-1]  # narrow(-1, -3, 2) counts from the end
        return tag.slice(start, start + length)
    return rowwise(ctx, ("input",))  # a batched start (tensor) is refused


# --------------------------------------------------------------------------- factories
_NEW_METHODS = ("new_zeros", "new_ones", "new_empty", "new_full", aten.new_zeros.default, aten.new_ones.default,
                aten.new_empty.default, aten.new_full.default)


@register(torch.zeros, torch.ones, torch.empty, torch.full, torch.rand, torch.randn, torch.arange, *_NEW_METHODS,
          aten.zeros.default, aten.ones.default, aten.empty.memory_format, aten.full.default)
def _factory(ctx: RuleContext) -> Tag:
    """A factory whose batch-position size is a batch size (``torch.zeros(x.size(0), k)``,
    ``x.new_zeros(x.size(0), k)``) makes the same row for every pair: USER (U rows, gathered where
    it meets item data), or the side of ``self`` for ``new_*``.  Any other batch-dependent argument
    (``arange(x.size(0))``, ``randn(x.size(0), k)``: a value per row; ``zeros(k, x.size(0))``) is
    the value N: MIXED, computed as the model does."""
    inputs = ctx.inputs()
    size = _batch_dim_size_arg(ctx)
    if size is not None:
        inputs.remove(size)  # this one occurrence only
    carrier = ctx.arg(0) if ctx.node.target in _NEW_METHODS else None
    if isinstance(carrier, fx.Node):
        inputs.remove(carrier)  # self gives dtype and device only
    if any(ctx.side(n) != Side.CONST for n in inputs):
        return ctx.refuse("a factory sized or filled by a batch size outside the batch position "
                          "(arange/rand of x.size(0), or a size in another dim)")
    if size is None:
        return ctx.result(Side.CONST)
    # Every row is the same, so one per user is enough whichever tensor the size was read off
    # (torch.export reads every batch size off one input); new_* runs at the rows of self.
    carrier_side = ctx.side(carrier)
    return ctx.result(Side.USER if carrier_side == Side.CONST else carrier_side)


# shaped like arg 0; a node fill value (full_like(x, x.size(0))) joins in
register(torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like)(lambda ctx: ctx.result(ctx.input_side()))
register(torch.eye, aten.eye.default)(constant_if_constant(refuse_with("eye sized by a batch size")))


# int arithmetic on sizes, python builtins
register(builtins.int, builtins.float)(lambda ctx: TensorTag.uniform(ctx.input_side()))
register(builtins.len)(_size_tag)


# --------------------------------------------------------------------------- sequence models
# What each argument of the attention modules is, so that every argument (masks passed by keyword
# included) is checked for what it is: a sequence [B, L, E], a key padding mask [B, S] (one row per
# sample), an attention mask ([L, S]: shared by every sample, so batch-free; [B*H, L, S]: the batch
# folded with the heads) or a flag.
_SEQ, _PAD, _ATTN, _FLAG = "sequence", "key padding mask", "attention mask", "flag"
_DECODER_ARGS = (("tgt", _SEQ), ("memory", _SEQ), ("tgt_mask", _ATTN), ("memory_mask", _ATTN),
                 ("tgt_key_padding_mask", _PAD), ("memory_key_padding_mask", _PAD), ("tgt_is_causal", _FLAG),
                 ("memory_is_causal", _FLAG))
ATTENTION_ARGS: Dict[type, Tuple[Tuple[str, str], ...]] = {
    nn.MultiheadAttention: (("query", _SEQ), ("key", _SEQ), ("value", _SEQ), ("key_padding_mask", _PAD),
                            ("need_weights", _FLAG), ("attn_mask", _ATTN), ("average_attn_weights", _FLAG),
                            ("is_causal", _FLAG)),
    nn.TransformerEncoderLayer: (("src", _SEQ), ("src_mask", _ATTN), ("src_key_padding_mask", _PAD),
                                 ("is_causal", _FLAG)),
    nn.TransformerEncoder: (("src", _SEQ), ("mask", _ATTN), ("src_key_padding_mask", _PAD), ("is_causal", _FLAG)),
    nn.TransformerDecoderLayer: _DECODER_ARGS,
    nn.TransformerDecoder: _DECODER_ARGS,
    nn.Transformer: (("src", _SEQ), ("tgt", _SEQ), ("src_mask", _ATTN), ("tgt_mask", _ATTN), ("memory_mask", _ATTN),
                     ("src_key_padding_mask", _PAD), ("tgt_key_padding_mask", _PAD),
                     ("memory_key_padding_mask", _PAD), ("src_is_causal", _FLAG), ("tgt_is_causal", _FLAG),
                     ("memory_is_causal", _FLAG)),
}


def attention_args(node: fx.Node, module: nn.Module) -> Optional[Dict[str, Tuple[str, Any]]]:
    """``{name: (kind, value)}`` of an attention module call's arguments (positional and keyword),
    kind one of "sequence", "key padding mask", "attention mask", "flag"; None for a subclass with
    its own ``forward`` or an argument the module does not take."""
    base = next((c for c in type(module).__mro__ if c in ATTENTION_ARGS), None)
    if base is None or type(module).forward is not base.forward:
        return None
    schema = ATTENTION_ARGS[base]
    if len(node.args) > len(schema) or any(k not in dict(schema) for k in node.kwargs):
        return None
    kinds = dict(schema)
    bound = {name: (kind, a) for (name, kind), a in zip(schema, node.args)}
    bound.update({k: (kinds[k], v) for k, v in node.kwargs.items()})
    return bound


def batch_major_fold(a: Any) -> Optional[Tuple[fx.Node, str, int]]:
    """``(src, how, k)`` if ``a`` is a batched tensor ``src`` with its batch folded into dim 0
    *batch-major* (row ``b * H + h`` belongs to sample ``b``), the layout of a ``[B*H, L, S]``
    attention mask: ``("flatten", k)`` for ``src.flatten(0, k)`` or a reshape / view that merges
    dims ``0..k`` (``src.reshape(-1, L, S)`` of ``[B, H, L, S]``), ``("repeat", H)`` for
    ``src.repeat_interleave(H, dim=0)``.  None for anything else (``src.repeat(H, 1, 1)`` is
    head-major: sample ``b``'s rows are not contiguous).

    Example:
        >>> import torch, mari_fx
        >>> from mari_fx.analysis.rules import batch_major_fold
        >>> class M(torch.nn.Module):
        ...     def forward(self, m, x):
        ...         return m.unsqueeze(1).expand(-1, 2, -1, -1).reshape(-1, 3, 3), m.repeat(2, 1, 1), x
        >>> gm = mari_fx.trace(M(), ["m"], (torch.ones(4, 3, 3), torch.ones(4, 1)))
        >>> [batch_major_fold(n)[1:] if batch_major_fold(n) else None for n in gm.graph.nodes
        ...  if n.target in ("reshape", "repeat")]
        [('flatten', 1), None]
    """
    if not (isinstance(a, fx.Node) and a.op in ("call_function", "call_method") and a.args):
        return None
    src, out = a.args[0], a.meta.get(VALUE_KEY)
    if not (_is_batched_node(src) and isinstance(out, TensorInfo)):
        return None
    shape = src.meta[VALUE_KEY].shape
    if a.target in ("flatten", torch.flatten, aten.flatten.using_ints):
        start = a.args[1] if len(a.args) > 1 else a.kwargs.get("start_dim", 0)
        end = a.args[2] if len(a.args) > 2 else a.kwargs.get("end_dim", -1)
        if start == 0 and isinstance(end, int) and 1 <= end % len(shape):
            return src, "flatten", end % len(shape)
        return None
    if a.target in ("reshape", "view", torch.reshape, aten.view.default, aten.reshape.default,
                    aten._unsafe_view.default):
        for k in range(1, len(shape)):
            rows = 1
            for d in shape[:k + 1]:
                rows *= d
            if out.shape[0] == rows and tuple(out.shape[1:]) == tuple(shape[k + 1:]):
                return src, "flatten", k
        return None
    if a.target in ("repeat_interleave", torch.repeat_interleave, aten.repeat_interleave.self_int):
        reps = a.args[1] if len(a.args) > 1 else a.kwargs.get("repeats")
        dim = a.args[2] if len(a.args) > 2 else a.kwargs.get("dim")
        if isinstance(reps, int) and dim == 0 and a.kwargs.get("output_size") is None:
            return src, "repeat", reps
    return None


@register(nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.TransformerEncoder,
          nn.TransformerDecoder, nn.Transformer)
def _attention_module(ctx: RuleContext) -> Tag:
    """Attention within each sample's own sequence is row-wise when the batch comes first; each
    argument is checked for what it is (see :data:`ATTENTION_ARGS`), and a refusal names the
    argument at fault (typically a mask)."""
    m = ctx.module
    name = type(m).__name__
    # Transformer layers keep the flag on their attention submodules.
    batch_first = all(a.batch_first for a in m.modules() if isinstance(a, nn.MultiheadAttention))
    if not batch_first:
        return ctx.refuse(f"{name}(batch_first=False) keeps the batch in dim 1")
    if m.training and any(getattr(d, "p", 0) > 0 for d in m.modules() if isinstance(d, nn.Dropout)):
        return ctx.refuse(f"{name} in training mode applies dropout: call model.eval()")
    args = attention_args(ctx.node, m)
    if args is None:
        return rowwise(ctx)
    sides: Dict[str, Side] = {}
    for arg, (kind, a) in args.items():
        side, ndim = ctx.side(a), ctx.ndim(a)
        culprit = f"{name}'s {arg} '{a.name if isinstance(a, fx.Node) else a}'"
        if side == Side.CONST:
            continue
        if kind == _FLAG:
            return ctx.refuse(f"{culprit} depends on the request: pass a constant flag")
        if kind == _SEQ and ndim != 3:
            return ctx.refuse(f"{culprit} is {ndim}-d, not a batched [B, L, E] sequence")
        if kind == _PAD and ndim != 2:
            return ctx.refuse(f"{culprit} ({kind}) is {ndim}-d, not [B, S] with one row per sample")
        if kind == _ATTN:
            if ndim == 3:
                fold = batch_major_fold(a)
                if fold is None:
                    return ctx.refuse(
                        f"{culprit} ({kind}, [B*H, L, S]) folds the batch with the heads in a layout mari_fx "
                        f"cannot prove batch-major: build it as m.repeat_interleave(num_heads, dim=0) from "
                        f"[B, L, S] or m.flatten(0, 1) from [B, H, L, S]")
                side = ctx.side(fold[0])
            else:
                return ctx.refuse(f"{culprit} ({kind}) is {ndim}-d: a 2-d mask is shared by every sample "
                                  f"and must not depend on the request; pass [B*H, L, S] for a mask per sample")
        sides[arg] = side
    out = join_all(sides.values())
    seq = join_all(s for arg, s in sides.items() if args[arg][0] == _SEQ)
    masks = [arg for arg, s in sides.items() if args[arg][0] != _SEQ and s.join(seq) != seq]
    if out == Side.MIXED and seq == Side.USER and masks:  # name the mask that keeps it off U rows
        arg = masks[0]
        return ctx.refuse(f"{name}'s {arg} '{args[arg][1].name}' ({args[arg][0]}) is {sides[arg]}-side but its "
                          f"sequences are user-only: the {name} runs at N rows (declare the mask's inputs "
                          "user-side if they are)")
    return ctx.result(out)


@register(nn.RNN, nn.GRU, nn.LSTM)
def _rnn(ctx: RuleContext) -> Tag:
    """Row-wise output sequence; the final hidden state has the batch in dim 1 (MIXED, recomputed)."""
    m = ctx.module
    if not m.batch_first:
        return ctx.refuse(f"{type(m).__name__}(batch_first=False) keeps the batch in dim 1")
    if len(ctx.inputs()) > 1:
        return ctx.refuse(f"{type(m).__name__} with an initial state (batch in dim 1)")
    tag = rowwise(ctx, ("input",), min_ndim=3)  # a 2-d input is one unbatched sequence: the batch
    if isinstance(tag, SeqTag) and tag.side != Side.MIXED:
        return SeqTag((tag.items[0], _uniform_like(ctx.out[1], Side.MIXED)))
    return tag


@register(F.scaled_dot_product_attention)
def _sdpa(ctx: RuleContext) -> Tag:
    """Row-wise over batched ``[B, ..., L, E]`` q / k / v of one rank; a batched ``attn_mask``
    must have that rank too (dim 0 its batch), a lower-rank mask must be batch-free."""
    if ctx.arg(4, "dropout_p", 0.0):
        return ctx.refuse("scaled_dot_product_attention with dropout")
    qkv = [ctx.arg(i, n) for i, n in enumerate(("query", "key", "value"))]
    ranks = {ctx.ndim(a) for a in qkv if ctx.side(a) != Side.CONST}
    if len(ranks) > 1 or (ranks and min(ranks) < 3):
        return ctx.refuse("scaled_dot_product_attention of batched query/key/value of different ranks or < 3 dims")
    rank = max(ranks) if ranks else max(ctx.ndim(a) or 0 for a in qkv)
    mask = ctx.arg(3, "attn_mask", None)
    if isinstance(mask, fx.Node):
        if ctx.side(mask) != Side.CONST and ctx.ndim(mask) != rank:
            return ctx.refuse(f"scaled_dot_product_attention's attn_mask '{mask.name}' is {ctx.ndim(mask)}-d "
                              f"against {rank}-d query/key/value: its batch would line up with another dim; "
                              f"give it {rank} dims (e.g. mask[:, None, None, :])")
        if ctx.side(mask) == Side.CONST and (ctx.ndim(mask) or 0) > rank:
            return ctx.refuse(f"scaled_dot_product_attention's attn_mask '{mask.name}' adds leading dims")
    for k, flag in ((5, "is_causal"), (6, "scale"), (7, "enable_gqa")):
        if ctx.side(ctx.arg(k, flag, None)) != Side.CONST:
            return ctx.refuse(f"scaled_dot_product_attention's {flag} depends on the request")
    return ctx.rowwise()


# --------------------------------------------------------------------------- einsum
def _einsum_tokens(term: str) -> Optional[List[str]]:
    out, i = [], 0
    while i < len(term):
        if term.startswith("...", i):
            out.append("...")
            i += 3
        elif term[i].isalpha():
            out.append(term[i])
            i += 1
        else:
            return None
    return out


def parse_einsum(equation: str, n_operands: int) -> Optional[Tuple[List[List[str]], List[str]]]:
    """``(operand index lists, output index list)`` of an einsum equation (``"..."`` one token;
    an implicit output is the indices used once, sorted, after any ``...``); None if malformed.

    Example:
        >>> parse_einsum("bld, bd -> bl", 2)
        ([['b', 'l', 'd'], ['b', 'd']], ['b', 'l'])
        >>> parse_einsum("...d,de", 2)
        ([['...', 'd'], ['d', 'e']], ['...', 'e'])
    """
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    terms = [_einsum_tokens(t) for t in lhs.split(",")]
    if len(terms) != n_operands or any(t is None for t in terms):
        return None
    if arrow:
        out = _einsum_tokens(rhs)
        if out is None:
            return None
    else:
        letters = [c for t in terms for c in t if c != "..."]
        out = (["..."] if any("..." in t for t in terms) else []) + sorted(c for c in set(letters) if letters.count(c) == 1)
    return terms, out


@register(torch.einsum, aten.einsum.default)
def _einsum(ctx: RuleContext) -> Tag:
    """Row-wise when one index is the batch: the first index of every batched operand and of the
    output, used once in each, never contracted and carried by no constant operand."""
    equation = ctx.arg(0, "equation")
    ops = list(ctx.args[1:])
    if ctx.node.target is aten.einsum.default or (len(ops) == 1 and isinstance(ops[0], (list, tuple))):
        ops = list(ops[0])
    if ctx.input_side() == Side.CONST:
        return ctx.result(Side.CONST)
    parsed = parse_einsum(equation, len(ops)) if isinstance(equation, str) else None
    if parsed is None:
        return ctx.refuse("einsum in sublist form or with a malformed equation")
    terms, out = parsed
    batched = [k for k, o in enumerate(ops) if ctx.side(o) != Side.CONST]
    b = terms[batched[0]][0] if terms[batched[0]] else None
    if b is None:
        return ctx.refuse(f"einsum {equation!r}: a batched operand is 0-d")
    for k, (term, o) in enumerate(zip(terms, ops)):
        if k in batched and (term[:1] != [b] or term.count(b) != 1):
            return ctx.refuse(f"einsum {equation!r}: batched operand {k} does not have the batch index "
                              f"{b!r} first (exactly once)")
        if k not in batched and b in term:
            return ctx.refuse(f"einsum {equation!r}: constant operand {k} carries the batch index {b!r}")
    if out[:1] != [b] or out.count(b) != 1:
        return ctx.refuse(f"einsum {equation!r}: the output does not keep the batch index {b!r} first "
                          "(it is contracted or moved)")
    if b == "...":  # the batch is the ellipsis' first dim: the ellipses must line up exactly
        widths = {ctx.ndim(ops[k]) - (len(terms[k]) - 1) for k in batched}
        if len(widths) != 1:
            return ctx.refuse(f"einsum {equation!r}: batched operands' '...' cover different numbers of dims")
    return ctx.rowwise()


# --------------------------------------------------------------------------- torch.export (aten) spellings
register(aten.dropout.default)(_dropout_fn)
register(aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.amin.default, aten.softmax.int,
         aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default, aten.logsumexp.default,
         aten.cumsum.default, aten.argmax.default, aten.var.correction, aten.std.correction)(
    constant_if_constant(reduction()))
register(aten.sum.default, aten.mean.default)(constant_if_constant(refuse_with("reduces over all dims, batch included")))
register(aten.layer_norm.default, aten.rms_norm.default)(_layer_norm)
register(aten.linear.default)(_linear)
register(aten.addmm.default)(RULES[torch.addmm])
register(aten.matmul.default, aten.mm.default)(_matmul)
register(aten.bmm.default)(RULES[torch.bmm])
register(aten.baddbmm.default)(RULES[torch.baddbmm])
register(aten.scaled_dot_product_attention.default)(_sdpa)
register(aten.view.default, aten.reshape.default, aten._unsafe_view.default)(_reshape)
register(aten.expand.default)(_expand)
register(aten.repeat.default)(_repeat)
register(aten.flatten.using_ints)(_flatten)
register(aten.unflatten.int)(_unflatten)
register(aten.unsqueeze.default)(_unsqueeze)
register(aten.squeeze.dim, aten.squeeze.dims)(_squeeze)
register(aten.squeeze.default)(constant_if_constant(refuse_with("squeeze() without a dim may drop the batch")))
register(aten.permute.default)(_permute)
register(aten.transpose.int)(_transpose)
register(aten.t.default)(constant_if_constant(refuse_with("t() swaps the batch dimension")))
register(aten.cat.default)(_cat)
register(aten.stack.default)(_stack)
register(aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.tensor_split.sections)(_split_rule(2))
register(aten.narrow.default)(_narrow)
register(aten.unbind.int)(lambda ctx: RULES[torch.unbind](ctx))
register(aten.zeros_like.default, aten.ones_like.default, aten.empty_like.default, aten.full_like.default)(
    lambda ctx: ctx.result(ctx.input_side()))


@register(aten.sym_size.int)
def _sym_size(ctx: RuleContext) -> Tag:
    if ctx.norm_dim(ctx.arg(1), ctx.ndim(ctx.arg(0))) != 0:
        return CONST
    return _size_tag(ctx)


register(aten.embedding.default)(rowwise_in("indices"))  # (weight, indices)
register(aten._native_batch_norm_legit_no_training.default)(rowwise_in("input", min_ndim=2))
register(aten.batch_norm.default)(_batch_norm_fn)


ALL_ROWS = 2 ** 62  # torch.export writes x[:, a:b] as slice(x, 0, 0, INT64_MAX) then slice(.., 1, a, b)


def aten_slice_args(ctx_or_node: Any):
    """``(x, dim, start, stop, step)`` of an ``aten.slice.Tensor`` node, with defaults."""
    node = ctx_or_node.node if isinstance(ctx_or_node, RuleContext) else ctx_or_node
    args = list(node.args) + [None] * (5 - len(node.args))
    x, dim, start, stop, step = args[:5]
    kw = node.kwargs
    return (x, kw.get("dim", dim if dim is not None else 0), kw.get("start", start),
            kw.get("end", stop), kw.get("step", step if step is not None else 1))


@register(aten.slice.Tensor)
def _aten_slice(ctx: RuleContext) -> Tag:
    x, dim, start, stop, step = aten_slice_args(ctx)
    value, tag = ctx.value(x), ctx.tag(x)
    if ctx.input_side() == Side.CONST:
        return ctx.result(Side.CONST)
    if not isinstance(value, TensorInfo) or any(isinstance(a, fx.Node) for a in (start, stop, step)):
        return ctx.refuse("slice with batch-dependent bounds")
    d = ctx.norm_dim(dim, value.ndim)
    if d == 0:
        if (start or 0) == 0 and (stop is None or stop >= ALL_ROWS) and step == 1:
            return tag  # x[:] keeps every row
        return ctx.refuse("slicing selects rows of the batch dimension")
    if d == value.ndim - 1 and isinstance(tag, TensorTag) and tag.is_segmented and step == 1:
        lo, hi, _ = slice(start, stop).indices(value.shape[-1])
        if hi > lo:  # an empty [rows, 0] slice keeps no segments (nor does its lowering)
            return tag.slice(lo, hi)
    return ctx.rowwise()


@register(aten.select.int)
def _aten_select(ctx: RuleContext) -> Tag:
    x, dim, index = ctx.arg(0, "input"), ctx.arg(1, "dim"), ctx.arg(2, "index")
    value, tag = ctx.value(x), ctx.tag(x)
    if ctx.input_side() == Side.CONST:
        return ctx.result(Side.CONST)
    d = ctx.norm_dim(dim, value.ndim if isinstance(value, TensorInfo) else None)
    if d in (0, None):
        return ctx.refuse("select() picks one row of the batch dimension")
    if d == value.ndim - 1 and isinstance(tag, TensorTag) and tag.is_segmented and isinstance(index, int):
        col = index % value.shape[-1]
        return ctx.result(tag.slice(col, col + 1).side)
    return ctx.rowwise()


# --------------------------------------------------------------------------- more torch.export spellings
# Comparisons and selections follow their operands; metadata asserts return nothing (no data).
_MORE_ATEN_ELEMENTWISE = targets.ATEN_MORE_ELEMENTWISE
register(*[t for t in _MORE_ATEN_ELEMENTWISE if t not in RULES])(constant_if_constant(elementwise))
register(*[t for t in (aten._assert_tensor_metadata.default, aten._assert_scalar.default,
                       aten.sym_constrain_range_for_size.default) if t not in RULES])(lambda ctx: CONST)
