"""Counting what embedding collections look up: ids and bag rows per feature key."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Set

import torch
import torch.nn as nn
from torchrec.distributed.types import ShardedModule
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from .lowering import EMBEDDING_KINDS


@dataclass
class Lookups:
    """Per feature key, summed over the calls seen: ``ids`` looked up, and ``rows``, the
    number of leading batch rows that hold all non-empty bags (U for a padded user key)."""

    ids: int = 0
    rows: int = 0


def feature_names(module: nn.Module) -> Optional[Set[str]]:
    """The KJT keys an embedding collection looks up (None where it does not say)."""
    for attr in ("embedding_bag_configs", "embedding_configs", "_embedding_bag_configs", "_embedding_configs"):
        configs = getattr(module, attr, None)
        if configs is not None:
            configs = configs() if callable(configs) else configs
            return {f for c in configs for f in c.feature_names}
    return None


def count_lookups(module: nn.Module, call: Callable[[], Any]) -> Dict[str, Lookups]:
    """Run ``call()`` and count, per KJT key, what the embedding collections of ``module``
    (unsharded, quantized or sharded) were asked to look up.

    Example:
        >>> from torchrec_integration.examples import TorchRecRanker, RankerBatch
        >>> model, batch = TorchRecRanker(), RankerBatch.random(users=2, candidates=5)
        >>> seen = count_lookups(model, lambda: model(*batch.pairs()))
        >>> seen["user_id"].rows
        5
    """
    counts: Dict[str, Lookups] = {}
    kinds = tuple(EMBEDDING_KINDS) + (ShardedModule,)

    def hook(m, args, kwargs):
        kjt = args[0] if args else next(iter(kwargs.values()))
        if not isinstance(kjt, KeyedJaggedTensor):
            return
        looked_up = feature_names(m)
        lengths = kjt.lengths().view(len(kjt.keys()), kjt.stride())
        for key, row_lengths in zip(kjt.keys(), lengths):
            if looked_up is not None and key not in looked_up:
                continue
            c = counts.setdefault(key, Lookups())
            c.ids += int(row_lengths.sum())
            nonempty = torch.nonzero(row_lengths)
            c.rows += int(nonempty[-1]) + 1 if nonempty.numel() else 0

    outermost: Dict[str, nn.Module] = {}  # a collection inside another (feature-processed EBC) is not counted twice
    for name, m in module.named_modules():
        if isinstance(m, kinds) and not any(name.startswith(p + ".") for p in outermost):
            outermost[name] = m
    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in outermost.values()]
    try:
        with torch.no_grad():
            call()
    finally:
        for h in handles:
            h.remove()
    return counts
