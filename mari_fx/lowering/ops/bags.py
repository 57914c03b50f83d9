"""Jagged bag inputs (``Bag("tag_ids", "tag_offsets")``): declaration, request helpers, lowering.

* Declaration (:func:`_group_bags`, an input group of :mod:`mari_fx.frontend.inputs`): a declared bag's
  forward arguments become one flat placeholder holding a :class:`~mari_fx.runtime.jagged.JaggedBag`;
  the model's uses of ``ids`` / ``offsets`` / ``weights`` read it back through
  :func:`~mari_fx.runtime.jagged.bag_ids` etc.  Undeclared (ids, offsets) argument pairs read together by
  an ``EmbeddingBag`` become item-side bags.
* Request helpers: a bag's rows are its bags (``BatchOps``), and ``pairs_to_request`` /
  ``request_to_pairs`` read and rebuild both arguments (``RequestKind(spans_args=True)``).
* Tags: a part of a user-side bag is not one row per user (its ids are all users' ids), so it is
  MIXED (read off the pair-shaped bag, rebuilt at N rows, if anything but an ``EmbeddingBag``
  reads it); ``EmbeddingBag(bag_ids(b), bag_offsets(b))`` gives one row per bag: USER.
* Lowering: that ``EmbeddingBag`` runs on the U users' bags; its output is gathered to N rows
  where it meets item data.  A user bag needed at N rows is gathered bag by bag
  (:func:`~mari_fx.runtime.jagged.bag_take`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ...errors import DeclarationError
from ...analysis.example_prop import register_summary
from ...frontend.inputs import (Bag, BatchOps, InputSpec, RequestKind, _new_placeholder, register_batch_type,
                     register_input_group, register_request_kind)
from ...runtime.jagged import JaggedBag, bag_first_difference, bag_ids, bag_offsets, bag_rows, bag_take, bag_weights
from ..context import LAZY_BUILDERS, LoweringContext, register_lowering, register_row_gather
from ..values import U, Lazy, Rows
from ...analysis.tags import ROWS_KEY, TAG_KEY, Side

KIND = "bag"
PARTS = (bag_ids, bag_offsets, bag_weights)


@dataclass(frozen=True)
class BagInfo:
    """Example summary of a :class:`JaggedBag` (``node.meta["mari_fx.value"]``)."""

    rows: int
    ids_dtype: torch.dtype
    weighted: bool
    include_last_offset: bool


@dataclass(frozen=True)
class BagInputSpec(InputSpec):
    """A flat bag input: the forward arguments it carries."""

    ids: str = ""
    offsets: str = ""
    weights: Optional[str] = None
    include_last_offset: bool = False

    @property
    def source(self) -> str:
        return f"bag({', '.join(a for a in (self.ids, self.offsets, self.weights) if a)})"


# --------------------------------------------------------------------------- declaration
def _bag_calls(gm: fx.GraphModule) -> List[Tuple[fx.Node, Any, Any, Any, bool]]:
    """``(node, ids, offsets, weights, include_last_offset)`` of every EmbeddingBag call with offsets."""
    modules = dict(gm.named_modules())
    out = []
    for n in gm.graph.nodes:
        m = modules.get(n.target) if n.op == "call_module" else None
        if isinstance(m, nn.EmbeddingBag):
            get = lambda i, k, d=None: n.args[i] if len(n.args) > i else n.kwargs.get(k, d)  # noqa: E731
            out.append((n, get(0, "input"), get(1, "offsets"), get(2, "per_sample_weights"), m.include_last_offset))
        elif n.op == "call_function" and n.target is F.embedding_bag:
            get = lambda i, k, d=None: n.args[i] if len(n.args) > i else n.kwargs.get(k, d)  # noqa: E731
            out.append((n, get(0, "input"), get(2, "offsets"), get(8, "per_sample_weights"),
                        bool(get(9, "include_last_offset", False))))
    return [c for c in out if c[2] is not None]


def _check_example(bag: Bag, example: Dict[str, Any], include_last: bool) -> JaggedBag:
    def tensor(name: str, what: str) -> torch.Tensor:
        v = example[name]
        if not isinstance(v, torch.Tensor) or v.dim() != 1:
            raise DeclarationError(f"{bag}: example {what} {name!r} must be a 1-d tensor, got "
                                   f"{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}")
        return v

    ids, offsets = tensor(bag.ids, "ids"), tensor(bag.offsets, "offsets")
    weights = tensor(bag.weights, "weights") if bag.weights else None
    if ids.is_floating_point() or offsets.is_floating_point():
        raise DeclarationError(f"{bag}: ids and offsets must be integer tensors")
    if weights is not None and weights.shape != ids.shape:
        raise DeclarationError(f"{bag}: weights {bag.weights!r} has {weights.numel()} entries but ids "
                               f"{bag.ids!r} has {ids.numel()}")
    if offsets.numel() and (int(offsets[0]) != 0 or bool((offsets[1:] < offsets[:-1]).any())
                            or int(offsets[-1]) > ids.numel()
                            or (include_last and int(offsets[-1]) != ids.numel())):
        raise DeclarationError(f"{bag}: example offsets {bag.offsets!r} must start at 0, never decrease and stay "
                               f"within the {ids.numel()} ids" + (" (ending at their count: include_last_offset)"
                                                                   if include_last else ""))
    return JaggedBag(ids, offsets, weights, include_last)


def _group_bags(gm: fx.GraphModule, selectors: List[Any], example: Dict[str, Any], flat_example, taken):
    declared = [s for s in selectors if isinstance(s, Bag)]
    rest = [s for s in selectors if not isinstance(s, Bag)]
    calls = _bag_calls(gm)
    placeholders = {n.target: n for n in gm.graph.nodes if n.op == "placeholder"}
    others = {getattr(s, "arg", None) or getattr(s, "name", None) for s in rest}
    bags: List[Tuple[Bag, Side]] = []
    seen: Dict[str, Bag] = {}
    for b in declared:
        for a in b.args:
            if a not in placeholders:
                raise DeclarationError(f"{b} names {a!r}, which forward does not take; arguments are "
                                       f"{list(placeholders)}")
            if a in others:
                raise DeclarationError(f"{a!r} is declared both in {b} and on its own")
            if a in seen:
                raise DeclarationError(f"{a!r} is in two bags: {seen[a]} and {b}")
            seen[a] = b
        bags.append((b, Side.USER))
    # undeclared (ids, offsets) arguments read together by an EmbeddingBag: an item-side bag
    for _, ids, offsets, weights, _ in calls:
        args = [a for a in (ids, offsets, weights) if a is not None]
        if all(isinstance(a, fx.Node) and a.op == "placeholder" for a in args) and not any(
                a.target in seen or a.target in others for a in args):
            b = Bag(ids.target, offsets.target, weights.target if weights is not None else None)
            for a in b.args:
                seen[a] = b
            bags.append((b, Side.ITEM))
    grouped: Dict[str, List[InputSpec]] = {}
    for b, side in bags:
        modes = {last for _, i, o, _, last in calls if o is placeholders[b.offsets] and i is placeholders[b.ids]}
        if len(modes) > 1:
            raise DeclarationError(f"{b}: EmbeddingBags read its offsets both with and without include_last_offset")
        include_last = modes.pop() if modes else False
        value = _check_example(b, example, include_last)
        first = placeholders[b.ids]
        node = _new_placeholder(gm, first, b.flat_name, taken)
        flat_example[node.target] = value
        body = next(n for n in gm.graph.nodes if n.op != "placeholder")
        for part, a in zip(PARTS, (b.ids, b.offsets, b.weights)):
            if a is None:
                continue
            with gm.graph.inserting_before(body):
                read = gm.graph.call_function(part, (node,))
            placeholders[a].replace_all_uses_with(read)
            gm.graph.erase_node(placeholders[a])
            grouped[a] = []
        grouped[b.ids] = [BagInputSpec(node.target, b.ids, side, kind=KIND, ids=b.ids, offsets=b.offsets,
                                       weights=b.weights, include_last_offset=include_last)]
    return rest, grouped


register_input_group(_group_bags)


# --------------------------------------------------------------------------- request helpers
def _extract(spec: BagInputSpec, bound: Dict[str, Any]) -> JaggedBag:
    w = bound[spec.weights] if spec.weights else None
    return JaggedBag(bound[spec.ids], bound[spec.offsets], w, spec.include_last_offset)


def _assemble(parts: List[Tuple[BagInputSpec, JaggedBag]]) -> Dict[str, torch.Tensor]:
    (spec, bag), = parts
    out = {spec.ids: bag.ids, spec.offsets: bag.offsets}
    if spec.weights:
        out[spec.weights] = bag.per_sample_weights
    return out


register_request_kind(KIND, RequestKind(_extract, _assemble, spans_args=True))
register_batch_type(lambda v: isinstance(v, JaggedBag), BatchOps(lambda b: b.rows, bag_take, bag_first_difference))
register_summary(lambda v: isinstance(v, JaggedBag),
                 lambda b: BagInfo(b.rows, b.ids.dtype, b.per_sample_weights is not None, b.include_last_offset))


# --------------------------------------------------------------------------- lowering
def _is_bag(info: Any) -> bool:
    return isinstance(info, BagInfo)


register_row_gather(_is_bag, bag_take, rows=bag_rows)


def _user_bag_part(lw: LoweringContext, a: Any) -> Optional[fx.Node]:
    """The U-row bag placeholder ``a`` reads a part of, if ``a`` is such a part."""
    if isinstance(a, fx.Node) and a.op == "call_function" and a.target in PARTS:
        v = lw.lowered(a.args[0])
        if isinstance(v, Rows) and v.level == U:
            return v.node
    return None


def _lazy_part(lw: LoweringContext, node: fx.Node):
    """Parts of a user bag are rebuilt at N rows only if something needs them there."""
    return Lazy(node) if _user_bag_part(lw, node) is not None else None


LAZY_BUILDERS.add("bag_parts", _lazy_part, priority=-10)  # after the mask fold


def _lower_embedding_bag(lw: LoweringContext, node: fx.Node, module):
    """``EmbeddingBag`` over a user bag's parts, tagged USER: run it on the U users' bags."""
    if node.meta[TAG_KEY].side != Side.USER:
        return None
    if not any(_user_bag_part(lw, a) is not None for a in node.all_input_nodes):
        return None

    def at_u(a: fx.Node) -> Any:
        bag = _user_bag_part(lw, a)
        if bag is None:
            return lw.as_is(lw.value(a))
        part = lw.graph.call_function(a.target, (bag,))
        part.meta[ROWS_KEY] = U
        return part

    new = lw.graph.node_copy(node, at_u)
    lw.port_meta(node, new)
    new.meta[ROWS_KEY] = U
    return Rows(new, U, node)


register_lowering(nn.EmbeddingBag, F.embedding_bag)(_lower_embedding_bag)
