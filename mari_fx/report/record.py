"""The machine-readable record a transformed module carries: what was split,
hoisted to the user batch, broadcast, and refused (with the reason).

``T.meta["mari_fx.record"]`` holds a :class:`Record`; ``record.to_dict()`` is
JSON-ready with stable keys (see docs/report.md).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Tuple

from ..frontend.inputs import InputSpec

from ..meta import RECORD_KEY  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class LayerRecord:
    """One Linear / matmul against a parameter.

    ``action``: ``split`` (user columns at U rows, item columns at N rows),
    ``hoisted`` (user-only input: whole layer at U rows), ``kept`` (N rows, as
    before) or ``const``.  ``reason`` says why a layer with user columns was kept.
    ``rows_per_sample`` counts the rows each sample feeds the matmul (sequence
    length for 3-d inputs).
    """

    name: str
    op: str
    in_features: int
    out_features: int
    user_columns: int
    item_columns: int
    mixed_columns: int
    rows_per_sample: int
    action: str
    reason: str = ""
    split_user_features: int = 0  # after a split: weight columns applied at U rows ...
    split_item_features: int = 0  # ... and at N rows (fewer than the input's when q - k folds into q and k)
    split_broadcast_features: int = 0  # ... and at N rows before the model's expand (once per sample)

    def flops(self, users: int, candidates: int, transformed: bool) -> int:
        """Multiply-add FLOPs (2 per MAC) of this layer for one request."""
        per_row = 2 * self.out_features * self.rows_per_sample
        if not transformed or self.action == "kept":
            return per_row * candidates * self.in_features
        if self.action == "hoisted":
            return per_row * users * self.in_features
        if self.action == "split":
            return (per_row * (users * self.split_user_features + candidates * self.split_item_features)
                    + 2 * self.out_features * candidates * self.split_broadcast_features)
        return per_row * self.in_features  # const: once per request


@dataclass(frozen=True)
class BroadcastRecord:
    """A user value gathered to N rows (``source``) where node ``at`` needed it."""

    source: str
    at: str


@dataclass(frozen=True)
class RefusalRecord:
    """A node kept at N rows although only user data reached it, and why."""

    node: str
    op: str
    reason: str
    location: str


@dataclass(frozen=True)
class CacheRecord:
    """One value :func:`mari_fx.precompute_items` caches per catalog item (a buffer of ``P``).

    ``source``: the layer or node it comes from (``"fusion.0 (item product)"`` for the item
    product of a split Linear); ``shape`` / ``width``: its per-item shape and element count;
    ``bytes_per_row`` is also what one candidate gathers; ``bytes``: the buffer, M rows;
    ``flops_saved_per_candidate``: item-only FLOPs no longer computed per candidate.
    """

    name: str
    source: str
    shape: Tuple[int, ...]
    width: int
    dtype: str
    bytes_per_row: int
    bytes: int
    flops_saved_per_candidate: int


@dataclass(frozen=True)
class Record:
    inputs: Tuple[InputSpec, ...]
    layers: Tuple[LayerRecord, ...]
    hoisted: Tuple[str, ...]
    broadcasts: Tuple[BroadcastRecord, ...]
    refused: Tuple[RefusalRecord, ...]
    split_matmuls: bool
    capture: str = "torch.fx"  # or "torch.export", for models torch.fx cannot trace
    # set by mari_fx.precompute_items on P: the catalog inputs, M, and the cached values
    catalog_inputs: Tuple[str, ...] = ()
    catalog_size: int = 0
    item_cache: Tuple[CacheRecord, ...] = ()
    byte_cost: float = 0.0
    # Ops a tag rule called MIXED whose user elements the element map kept (mari_fx.analysis.elements):
    # the reason says what was kept; they are not losses, so they are not in ``refused``.
    recovered: Tuple[RefusalRecord, ...] = ()

    @property
    def split_layers(self) -> Tuple[str, ...]:
        return tuple(l.name for l in self.layers if l.action == "split")

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["inputs"] = [input_spec_dict(s) for s in self.inputs]
        return d


def input_spec_dict(s: InputSpec) -> Dict[str, Any]:
    """One declared input as the JSON report and ``Record.to_dict()`` write it."""
    return {"name": s.name, "source": s.source, "side": str(s.side), "kind": s.kind}
