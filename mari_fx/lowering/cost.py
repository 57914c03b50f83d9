"""The cost model that decides whether a matmul split pays for itself.

A split (:class:`~mari_fx.runtime.modules.SplitLinear`) removes the user columns' share of a
Linear at N rows, but adds N-row work of its own: the user product is gathered to N
rows (``index_select``, its bytes), several item pieces are joined (``cat``), and it
runs more kernels.  Keeping the Linear whole costs its FLOPs at N rows, plus -- when
nothing else reads the input at N rows -- building that input (gathering the user
columns, joining the pieces).  The split is done only when its cost is lower.

Cost, in FLOP equivalents, of one request of ``REFERENCE_USERS`` users and
``REFERENCE_CANDIDATES`` candidates::

    cost = FLOPs + FLOPS_PER_BYTE * bytes written + FLOPS_PER_KERNEL * kernels

The constants lean towards splitting: one byte written costs one FLOP, one extra
kernel 20,000 FLOPs (about 0.2 us at 100 GFLOP/s).  Measured on one core of the
development machine (``Linear(64, out)`` at N = 1000, its input needed elsewhere), a
split broke even at about 4 user columns for ``out = 256`` and about 12 for ``out = 32``;
the rule below splits from 3 columns on, so it refuses only splits that cannot pay off and
keeps every split that the test models' small layers exercise.  Everything is here, in
one place, so that it can be read, tested and re-tuned.

Threshold, for a Linear ``[in -> out]`` over ``cat([u, i])`` (``Du`` user columns, one
user and one item piece) whose input is also needed at N rows elsewhere (so the split
cannot save building it): the split adds the gather of its ``[N, out]`` output
(``itemsize * out`` bytes per candidate) and two kernels, and saves ``2 * Du * out``
FLOPs per candidate (less the U-row share), so it is done when
``Du > itemsize * FLOPS_PER_BYTE / 2 + FLOPS_PER_KERNEL / (out * N)``: more than 2 user
columns in fp32 (2 of 64 columns into ``Linear(64, 256)`` is refused).  When the Linear
is the input's only reader, keeping it whole also pays for gathering the user columns
and joining the input, and the split wins unless its output is much wider than its input.
"""
from __future__ import annotations

from dataclasses import dataclass

FLOPS_PER_BYTE = 1.0
FLOPS_PER_KERNEL = 20_000  # one extra op (a lower bound on eager dispatch)
REFERENCE_CANDIDATES = 1000  # N at which a split is judged ...
REFERENCE_USERS = 1          # ... and U (one user per request: the common case)


@dataclass(frozen=True)
class Work:
    """FLOPs, bytes written and kernels of some computation; ``cost`` in FLOP equivalents.

    Example:
        >>> (Work(flops=1000, bytes=10, kernels=1) + Work(kernels=1)).cost
        41010.0
    """

    flops: float = 0.0
    bytes: float = 0.0
    kernels: int = 0

    def __add__(self, other: "Work") -> "Work":
        return Work(self.flops + other.flops, self.bytes + other.bytes, self.kernels + other.kernels)

    @property
    def cost(self) -> float:
        return self.flops + FLOPS_PER_BYTE * self.bytes + FLOPS_PER_KERNEL * self.kernels


@dataclass(frozen=True)
class LinearShape:
    """What the cost of one split decision depends on.

    ``rows``: rows per sample (e.g. sequence length); ``user`` / ``item`` / ``broadcast``:
    weight columns applied at U rows, at N rows, and at N rows before the model's expand
    (once per sample); ``*_sources``: how many tensors feed each (more than one means a
    ``cat``); ``input_user_columns`` / ``input_user_sources``: the input's user columns and
    pieces; ``input_shared``: the input is needed at N rows by another op anyway (another Linear over
    the same input, a sibling tower, is judged as splitting too: it does not count).
    """

    in_features: int
    out_features: int
    rows: int
    user: int
    item: int
    broadcast: int
    user_sources: int
    item_sources: int
    input_user_columns: int
    input_user_sources: int
    input_shared: bool
    itemsize: int = 4


def kept_work(s: LinearShape, users: int = REFERENCE_USERS, candidates: int = REFERENCE_CANDIDATES) -> Work:
    """N-row work of the Linear kept whole: its GEMM, and building its input at N rows
    unless another op needs that anyway (one gather of the user columns, one cat)."""
    nr = candidates * s.rows
    work = Work(flops=2 * nr * s.in_features * s.out_features, kernels=1)
    if not s.input_shared and s.input_user_columns:
        work += Work(bytes=s.itemsize * nr * (s.input_user_columns + s.in_features),
                     kernels=2 + (s.input_user_sources > 1))
    return work


def split_work(s: LinearShape, users: int = REFERENCE_USERS, candidates: int = REFERENCE_CANDIDATES) -> Work:
    """Work of the split: the user GEMM at U rows, its gather to N rows (bytes), the item GEMM
    accumulating into it, a cat per side with several pieces, the broadcast GEMM and add."""
    nr, ur = candidates * s.rows, users * s.rows
    work = Work(flops=2 * s.out_features * (ur * s.user + nr * s.item),
                bytes=s.itemsize * nr * s.out_features, kernels=3)
    if s.user_sources > 1:
        work += Work(bytes=s.itemsize * ur * s.user, kernels=1)
    if s.item_sources > 1:
        work += Work(bytes=s.itemsize * nr * s.item, kernels=1)
    if s.broadcast:
        work += Work(flops=2 * s.out_features * candidates * s.broadcast,
                     bytes=s.itemsize * nr * s.out_features, kernels=2)
    return work


def split_pays(s: LinearShape) -> bool:
    """Whether splitting costs less than keeping the Linear whole, at the reference request.

    Example (``Linear(64, 256)`` over 2 user and 62 item columns, input needed elsewhere):
        >>> shape = LinearShape(64, 256, 1, user=2, item=62, broadcast=0, user_sources=1, item_sources=1,
        ...                     input_user_columns=2, input_user_sources=1, input_shared=True)
        >>> split_pays(shape), split_pays(LinearShape(64, 256, 1, 3, 61, 0, 1, 1, 3, 1, True))
        (False, True)
    """
    return split_work(s).cost < kept_work(s).cost
