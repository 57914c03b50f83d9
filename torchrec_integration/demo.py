"""``python -m torchrec_integration.demo``: a TorchRec ranker transformed, with FLOPs and lookups.

The ranker reads a KeyedJaggedTensor through an EmbeddingBagCollection whose user and
item tables are interleaved in table order, and feeds ``kt.values()`` to its over-arch.
Prints the split layers, dense FLOPs before/after per request (U users, N candidates),
the ids each user table looks up before/after, and the max output difference.
"""
from __future__ import annotations

import argparse

import torch
from tabulate import tabulate

import mari_fx
import torchrec_integration  # noqa: F401  (teaches mari_fx TorchRec's types)
from torchrec_integration.examples import ITEM_KEYS, USER_KEYS, RankerBatch, TorchRecRanker
from torchrec_integration.lookups import count_lookups

TABLES = {
    "t_user_id": ("user_id", "user", 64),
    "t_item_id": ("item_id", "item", 64),
    "t_user_hist": ("user_hist", "user", 32),
    "t_item_cat": ("item_cat", "item", 32),
}
USER_DENSE, ITEM_DENSE, TOWER, OVER = 256, 32, (512, 256), (256, 128)


def main(users: int = 1, candidates: int = 1000) -> None:
    torch.manual_seed(0)
    kw = dict(num_embeddings=1000)
    model = TorchRecRanker(user_dense=USER_DENSE, item_dense=ITEM_DENSE, tower=TOWER, over=OVER,
                           tables=TABLES, **kw).eval()
    batch_kw = dict(user_dense=USER_DENSE, item_dense=ITEM_DENSE, keys=[k for k, _, _ in TABLES.values()], **kw)
    example = RankerBatch.random(2, 4, seed=1, **batch_kw)
    T = mari_fx.transform(model, ["user_dense"] + [f"features[{k}]" for k in USER_KEYS], example.pairs())
    record = T.meta["mari_fx.record"]
    print(f"TorchRecRanker: EmbeddingBagCollection over {list(TABLES)} (user/item interleaved), "
          f"user tower {USER_DENSE} -> {TOWER}, over-arch over [tower | kt.values() | item dense] -> {OVER} -> 1\n")
    print(tabulate([(l.name, f"{l.in_features}->{l.out_features}", l.user_columns, l.item_columns + l.mixed_columns,
                     l.action) for l in record.layers],
                   headers=["layer", "in->out", "user cols", "item/mixed cols", "rewrite"]))

    batch = RankerBatch.random(users, candidates, seed=2, **batch_kw)
    pairs = batch.pairs()
    request = mari_fx.pairs_to_request(T, *pairs, user_index=batch.user_index)
    before, after = mari_fx.count_flops(model, *pairs), mari_fx.count_flops(T, **request)
    seen_before = count_lookups(model, lambda: model(*pairs))
    seen_after = count_lookups(T, lambda: T(**request))
    with torch.no_grad():
        diff = (T(**request) - model(*pairs)).abs().max().item()
    print(f"\nper request at U={users} user(s), N={candidates} candidates:")
    rows = [("dense FLOPs", f"{before:,}", f"{after:,}", f"{before / after:.2f}x")]
    for key in USER_KEYS + ITEM_KEYS:
        b, a = seen_before[key], seen_after[key]
        rows.append((f"ids looked up: {key}", f"{b.ids:,} ({b.rows} rows)", f"{a.ids:,} ({a.rows} rows)",
                     f"{b.ids / max(a.ids, 1):.2f}x"))
    print(tabulate(rows, headers=["", "pair model", "transformed", "ratio"]))
    print(f"\nmax |diff| vs the original model: {diff:.1e}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=1)
    p.add_argument("--candidates", type=int, default=1000)
    a = p.parse_args()
    main(a.users, a.candidates)
