"""Embedding lookups: per-row ids into batch-free tables; EmbeddingBag over bags of one row each."""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .base import aten, bag_ids, bag_offsets, bag_weights, register, rowwise_in, RuleContext, Side, Tag


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

# torch.export (ATen) spellings of the same ops
register(aten.embedding.default)(rowwise_in("indices"))  # (weight, indices)
