"""The values a lowering produces for each original node (see :mod:`mari_fx.lowering.context`).

A value lives at a *level*: ``U`` (one row per user), ``N`` (one row per candidate, as in the
pair-shaped model) or ``C`` (batch-free, computed once).  Structured values keep a MIXED tensor
apart until a consumer needs it whole: :class:`Pieces` (column blocks), :class:`Combo` (a linear
combination of U- and N-row terms), :class:`Blocks` (blocks along a field axis), :class:`Lazy`
(not emitted yet) and :class:`Seq` (tuples).

Example:
    >>> Pieces(((U, 3, Rows("u", U)), (N, 2, Rows("i", N)))).parts[0][:2]
    ('U', 3)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Tuple, Union

import torch.fx as fx

U, N, C = "U", "N", "C"


@dataclass(frozen=True, eq=False)
class Rows:
    """One lowered value: ``node`` in the new graph, at ``level`` U, N or C."""

    node: Any
    level: str
    orig: Optional[fx.Node] = None  # set where the value may need re-emitting at N


@dataclass(frozen=True, eq=False)
class Pieces:
    """A tensor kept as column blocks along its last dim: ``(level, width, Rows)`` each."""

    parts: Tuple[Tuple[str, int, Rows], ...]


@dataclass(frozen=True, eq=False)
class Combo:
    """A MIXED tensor kept as ``sum(c * term)`` of U- and N-row tensors of its own shape
    (``q - k``, ``a + 2 * b``), so a Linear over it can fold the coefficients into its
    weight blocks: the user terms' share then runs at U rows (linearity through add/sub)."""

    orig: fx.Node
    terms: Tuple[Tuple[float, Rows], ...]


@dataclass(frozen=True, eq=False)
class Lazy:
    """A MIXED value not emitted yet: whoever needs it gets ``orig`` computed at N rows.
    Lets a consumer that knows better (see :mod:`mari_fx.lowering.ops.interactions`) skip it."""

    orig: fx.Node


@dataclass(frozen=True, eq=False)
class Blocks:
    """A MIXED tensor kept as blocks along a non-batch, non-last dim ``dim``, e.g. the
    field axis of ``cat([user_fields, item_fields], dim=1)``: user blocks at U rows."""

    orig: fx.Node
    dim: int
    parts: Tuple[Tuple[str, int, Rows], ...]


@dataclass(frozen=True, eq=False)
class Seq:
    items: Tuple[Any, ...]


Value = Union[Rows, Pieces, Combo, Lazy, Blocks, Seq]
