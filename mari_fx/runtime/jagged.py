"""Jagged bags: flat ``ids`` + ``offsets`` (+ ``per_sample_weights``) as one value per request side.

A model that feeds ``nn.EmbeddingBag(ids, offsets)`` from its forward arguments takes one bag
per pair as two (or three) tensors whose lengths differ from the row count.  Declared with
:class:`mari_fx.frontend.inputs.Bag`, they travel together as one :class:`JaggedBag` (one bag per row), so
a request carries U users' bags and ``take`` selects whole bags.  The graph reads the parts back
with :func:`bag_ids` / :func:`bag_offsets` / :func:`bag_weights`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


class JaggedBag:
    """One bag per row: ``ids`` [T] (all bags' ids, concatenated), ``offsets`` (bag starts, [rows],
    or [rows + 1] with the total at the end when ``include_last_offset``), ``per_sample_weights``
    [T] or None.

    Example:
        >>> b = JaggedBag(torch.tensor([3, 4, 5]), torch.tensor([0, 2]))
        >>> b.rows, bag_take(b, torch.tensor([1, 1, 0])).ids.tolist()
        (2, [5, 5, 3, 4])
    """

    __slots__ = ("ids", "offsets", "per_sample_weights", "include_last_offset")

    def __init__(self, ids: torch.Tensor, offsets: torch.Tensor, per_sample_weights: Optional[torch.Tensor] = None,
                 include_last_offset: bool = False):
        self.ids, self.offsets, self.per_sample_weights = ids, offsets, per_sample_weights
        self.include_last_offset = include_last_offset

    @property
    def rows(self) -> int:
        return self.offsets.numel() - int(self.include_last_offset)

    def bounds(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(start, end) of every bag in ``ids``."""
        if self.include_last_offset:
            return self.offsets[:-1], self.offsets[1:]
        ends = torch.cat([self.offsets[1:], self.offsets.new_tensor([self.ids.numel()])])
        return self.offsets, ends

    def __repr__(self) -> str:
        w = ", weighted" if self.per_sample_weights is not None else ""
        return f"JaggedBag({self.rows} bags, {self.ids.numel()} ids{w})"


def bag_ids(bag: JaggedBag) -> torch.Tensor:
    """The flat ids of ``bag`` (what the model's ``ids`` argument was)."""
    return bag.ids


def bag_offsets(bag: JaggedBag) -> torch.Tensor:
    """The offsets of ``bag`` (what the model's ``offsets`` argument was)."""
    return bag.offsets


def bag_weights(bag: JaggedBag) -> torch.Tensor:
    """The per-sample weights of ``bag`` (what the model's weights argument was)."""
    return bag.per_sample_weights


def bag_take(bag: JaggedBag, index: torch.Tensor) -> JaggedBag:
    """The bags ``index`` (int64 [M]) of ``bag``, in that order (repeats allowed).

    Example:
        >>> b = JaggedBag(torch.tensor([3, 4, 5]), torch.tensor([0, 2, 3]), torch.tensor([.1, .2, .3]), True)
        >>> t = bag_take(b, torch.tensor([1, 0]))
        >>> t.ids.tolist(), t.offsets.tolist(), t.per_sample_weights.tolist()
        ([5, 3, 4], [0, 1, 3], [0.30000001192092896, 0.10000000149011612, 0.20000000298023224])
    """
    start, end = bag.bounds()
    start, lengths = start[index], (end - start)[index]
    new_start = torch.cumsum(lengths, 0) - lengths
    total = int(lengths.sum()) if lengths.numel() else 0
    pos = torch.repeat_interleave(start - new_start, lengths, output_size=total) + torch.arange(
        total, dtype=start.dtype, device=start.device)
    offsets = torch.cat([new_start, new_start.new_tensor([total])]) if bag.include_last_offset else new_start
    weights = bag.per_sample_weights[pos] if bag.per_sample_weights is not None else None
    return JaggedBag(bag.ids[pos], offsets.to(bag.offsets.dtype), weights, bag.include_last_offset)


def bag_rows(bag: JaggedBag) -> torch.Tensor:
    """A tensor with one row per bag (for row-count checks)."""
    return bag.offsets[:bag.rows]


def bag_first_difference(a: JaggedBag, b: JaggedBag) -> Optional[Tuple[int, str]]:
    """``(row, what)`` of the first bag where ``a`` and ``b`` (equal bag counts) differ, or None."""
    (sa, ea), (sb, eb) = a.bounds(), b.bounds()
    for r in range(a.rows):
        x, y = slice(int(sa[r]), int(ea[r])), slice(int(sb[r]), int(eb[r]))
        if not torch.equal(a.ids[x], b.ids[y]):
            return r, "ids"
        wa, wb = a.per_sample_weights, b.per_sample_weights
        if (wa is None) != (wb is None) or (wa is not None and not torch.equal(wa[x], wb[y])):
            return r, "weights"
    return None
