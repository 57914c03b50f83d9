"""The tag lattice: which side of a request every value depends on.

A *side* says what a value depends on:

* ``CONST``  -- nothing from the request (parameters, literals, feature-dim sizes);
* ``USER``   -- user-side inputs only: one row per user is enough (U rows);
* ``ITEM``   -- item-side inputs only (N rows);
* ``MIXED``  -- both, or anything mari_fx cannot prove row-wise: computed exactly
  as in the pair-shaped model, at N rows.

Sides form a join-semilattice: ``CONST`` is the bottom, ``MIXED`` the top and
``USER | ITEM == MIXED``.

A tensor's tag is a tuple of :class:`Segment` s along its last dimension, so a
concatenation of user and item features keeps exact column tags through
``cat``, slicing and ``split``.  Tuple-valued nodes (``split``, ``chunk``)
carry a :class:`SeqTag` with one tag per element.  Both are frozen: they live in
``node.meta[TAG_KEY]`` and are never mutated.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Iterable, Optional, Tuple, Union

from ..meta import NOTE_KEY, ROWS_KEY, TAG_KEY  # noqa: F401 (re-exported)


class Side(enum.IntEnum):
    CONST = 0
    USER = 1
    ITEM = 2
    MIXED = 3

    def join(self, other: "Side") -> "Side":
        if self == other or other == Side.CONST:
            return self
        if self == Side.CONST:
            return other
        return Side.MIXED

    def __str__(self) -> str:
        return self.name.lower()


def join_all(sides: Iterable[Side]) -> Side:
    out = Side.CONST
    for s in sides:
        out = out.join(s)
    return out


@dataclass(frozen=True)
class Segment:
    side: Side
    width: int


@dataclass(frozen=True)
class TensorTag:
    """Tag of one value: its segments along the last dimension.

    ``segments`` has one entry for a uniformly tagged value; ``width`` is
    ``None`` where the value has no column structure (scalars, sizes, 0-d or
    1-d tensors whose only dimension is the batch).
    """

    segments: Tuple[Segment, ...]

    @staticmethod
    def uniform(side: Side, width: Optional[int] = None) -> "TensorTag":
        return TensorTag((Segment(side, width),))  # type: ignore[arg-type]

    @staticmethod
    def of_segments(segments: Iterable[Segment]) -> "TensorTag":
        """Canonical form: adjacent segments of the same side are merged."""
        merged: list = []
        for seg in segments:
            if seg.width == 0:
                continue
            if merged and merged[-1].side == seg.side:
                merged[-1] = Segment(seg.side, merged[-1].width + seg.width)
            else:
                merged.append(seg)
        return TensorTag(tuple(merged) or (Segment(Side.CONST, 0),))

    @property
    def side(self) -> Side:
        return join_all(s.side for s in self.segments)

    @property
    def is_segmented(self) -> bool:
        return len(self.segments) > 1

    @property
    def has_user_columns(self) -> bool:
        """Some columns are USER and some are not: lowered as column pieces."""
        sides = {s.side for s in self.segments}
        return Side.USER in sides and len(sides) > 1

    @property
    def width(self) -> Optional[int]:
        if any(s.width is None for s in self.segments):
            return None
        return sum(s.width for s in self.segments)

    def columns(self, side: Side) -> int:
        return sum(s.width or 0 for s in self.segments if s.side == side)

    def slice(self, start: int, stop: int) -> "TensorTag":
        """Tag of columns ``[start, stop)`` of the last dimension."""
        out, pos = [], 0
        for seg in self.segments:
            lo, hi = max(start, pos), min(stop, pos + seg.width)
            if lo < hi:
                out.append(Segment(seg.side, hi - lo))
            pos += seg.width
        return TensorTag.of_segments(out)

    def __str__(self) -> str:
        if not self.is_segmented:
            return str(self.side)
        return "[" + ", ".join(f"{s.side}:{s.width}" for s in self.segments) + "]"


@dataclass(frozen=True)
class SeqTag:
    """Tag of a tuple/list-valued node: one tag per element."""

    items: Tuple["Tag", ...]

    @property
    def side(self) -> Side:
        return join_all(t.side for t in self.items)

    @property
    def is_segmented(self) -> bool:
        return False

    @property
    def has_user_columns(self) -> bool:
        return False

    def __str__(self) -> str:
        return "(" + ", ".join(str(t) for t in self.items) + ")"


Tag = Union[TensorTag, SeqTag]

CONST = TensorTag.uniform(Side.CONST)
MIXED = TensorTag.uniform(Side.MIXED)

