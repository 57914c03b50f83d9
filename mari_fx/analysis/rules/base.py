"""The rule machinery every family uses: the registry functions (:func:`register`,
:func:`register_before`, :func:`lookup`), :class:`RuleContext` and the generic rules
(:func:`rowwise`, :func:`elementwise`, :func:`reduction`, :func:`refuse_with`, :func:`unknown`)."""
from __future__ import annotations

import builtins
import operator
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ... import registry as _registry, targets
from ..arguments import bind, nodes_in
from ..example_prop import VALUE_KEY, TensorInfo
from ...runtime.jagged import bag_ids, bag_offsets, bag_weights
from ..tags import CONST, NOTE_KEY, TAG_KEY, Segment, SeqTag, Side, Tag, TensorTag, join_all

Target = Union[Callable, str, type]
Rule = Callable[["RuleContext"], Tag]
_MISSING = object()

RULES = _registry.RULES  # the core table; extensions add theirs (mari_fx.registry)
# The ops the column-piece lowering applies piece by piece (mari_fx.targets): only their
# outputs keep column segments, so a rule never promises pieces the lowering lacks.
PIECEWISE = targets.PIECEWISE
aten = torch.ops.aten
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


def static_int(a: Any) -> Any:
    """A batch-free int node (e.g. ``x.shape[1] // 2``) as its value; other values as they are."""
    if isinstance(a, fx.Node) and a.meta.get(TAG_KEY) == CONST and isinstance(a.meta.get(VALUE_KEY), int):
        return a.meta[VALUE_KEY]
    return a
