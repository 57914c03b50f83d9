"""The TorchRec row: ``torchrec_integration.examples.TorchRecRanker`` (an EmbeddingBagCollection over
a KeyedJaggedTensor, a user tower, an over-arch over ``[tower | kt.values() | item dense]``).

``layout="fragmented"`` is the example's own table order (user and item tables interleaved);
``layout="neat"`` puts the user tables first.  Full sizes are those of
``python -m torchrec_integration.demo``.  :func:`hand_written` builds the hand-written
rewrite: the user keys' tables called on the user KJT (U rows), the item keys' on the item KJT,
the over-arch's first Linear split into user and item column blocks (TorchScript-compatible,
so its ``script`` row is the same code).

Everything here imports ``torchrec_integration`` lazily, so the rest of the benchmark runs
without it; :func:`make_case` raises if the integration or its example is missing.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch
import torch.nn as nn

# the demo's sizes (torchrec_integration/demo.py); "tiny": the example's defaults
FULL = dict(user_dense=256, item_dense=32, tower=(512, 256), over=(256, 128), num_embeddings=1000,
            dims={"user_id": 64, "item_id": 64, "user_hist": 32, "item_cat": 32})
TINY = dict(user_dense=8, item_dense=4, tower=(32, 16), over=(64, 32), num_embeddings=100,
            dims={"user_id": 16, "item_id": 16, "user_hist": 8, "item_cat": 8})


def tables(layout: str, dims: Dict[str, int]) -> Dict[str, Tuple[str, str, int]]:
    fragmented = ["user_id", "item_id", "user_hist", "item_cat"]
    order = fragmented if layout == "fragmented" else ["user_id", "user_hist", "item_id", "item_cat"]
    return {f"t_{k}": (k, k.split("_")[0], dims[k]) for k in order}


def make_case(layout: str, sizes: str) -> Dict[str, Any]:
    """model, user selectors, example pairs, ``make_inputs(U, N, seed) -> (request, pairs)``, ``min_flops``."""
    import mari_fx
    import torchrec_integration  # noqa: F401  (teaches mari_fx TorchRec's types)
    from torchrec_integration.examples import RankerBatch, TorchRecRanker

    cfg = FULL if sizes == "full" else TINY
    tabs = tables(layout, cfg["dims"])
    keys = [k for k, _, _ in tabs.values()]
    user_keys = [k for k, side, _ in tabs.values() if side == "user"]
    item_keys = [k for k, side, _ in tabs.values() if side == "item"]
    torch.manual_seed(0)
    model = TorchRecRanker(num_embeddings=cfg["num_embeddings"], user_dense=cfg["user_dense"],
                           item_dense=cfg["item_dense"], tower=cfg["tower"], over=cfg["over"], tables=tabs).eval()
    batch_kw = dict(user_dense=cfg["user_dense"], item_dense=cfg["item_dense"], keys=keys, user_keys=user_keys,
                    item_keys=item_keys, num_embeddings=cfg["num_embeddings"])
    selectors = ["user_dense"] + [f"features[{k}]" for k in user_keys]
    example = RankerBatch.random(2, 4, seed=1, **batch_kw).pairs()
    T_holder: List[Any] = []

    def make_inputs(users: int, candidates: int, seed: int = 0):
        batch = RankerBatch.random(users, candidates, seed=seed % (2**31), **batch_kw)
        pairs = batch.pairs()
        request = mari_fx.pairs_to_request(T_holder[0], *pairs, user_index=batch.user_index)
        return request, tuple(pairs)

    user_width = cfg["tower"][-1] + sum(d for _, side, d in tabs.values() if side == "user")

    def min_flops(users: int, candidates: int) -> int:
        lin = [m for m in model.over if isinstance(m, nn.Linear)]
        tower = sum(2 * users * m.in_features * m.out_features for m in model.user_tower if isinstance(m, nn.Linear))
        first = 2 * lin[0].out_features * (users * user_width + candidates * (lin[0].in_features - user_width))
        return tower + first + sum(2 * candidates * m.in_features * m.out_features for m in lin[1:])

    return {"model": model, "selectors": selectors, "example": example, "make_inputs": make_inputs,
            "min_flops": min_flops, "bind": T_holder.append, "handwritten": hand_written(model, tabs)}


def hand_written(model: nn.Module, tabs: Dict[str, Tuple[str, str, int]]) -> nn.Module:
    """The request-shaped rewrite of ``TorchRecRanker`` an engineer would write (shares its modules)."""
    from .torchrec_hand import HandTorchRec

    return HandTorchRec(model, tabs).eval()
