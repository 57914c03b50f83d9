"""``make demo``: transform the built-in coarse ranker and show what MaRI buys.

Prints which layers were split or hoisted, FLOPs before/after at U=1, N=1000
against the analytic minimum, the same for the interleaved column layout, and
a check that the outputs match the original model.
"""
from __future__ import annotations

import torch
from tabulate import tabulate

import mari_fx
from mari_fx.testing.examples import CoarseRanker

USER_DIM, ITEM_DIM, TOWER, FUSION = 256, 64, (512, 256), (256, 128)


def analytic_min_flops(model: CoarseRanker, users: int, candidates: int) -> int:
    """Every user-only matmul at U rows; the fusion layer's user columns at U rows."""
    flops = 0
    for layer in model.user_tower:
        if isinstance(layer, torch.nn.Linear):
            flops += 2 * users * layer.in_features * layer.out_features
    first, *rest = [l for l in model.fusion if isinstance(l, torch.nn.Linear)]
    user_cols = TOWER[-1]
    flops += 2 * first.out_features * (users * user_cols + candidates * (first.in_features - user_cols))
    for layer in rest:
        flops += 2 * candidates * layer.in_features * layer.out_features
    return flops


def main(users: int = 1, candidates: int = 1000) -> None:
    torch.manual_seed(0)
    rows = []
    for layout in ("neat", "interleaved"):
        model = CoarseRanker(USER_DIM, ITEM_DIM, TOWER, FUSION, layout=layout).eval()
        u, i = torch.randn(users, USER_DIM), torch.randn(candidates, ITEM_DIM)
        idx = torch.randint(users, (candidates,))
        idx[:users] = torch.arange(users)
        example = (torch.randn(4, USER_DIM), torch.randn(4, ITEM_DIM))
        T = mari_fx.transform(model, user_inputs=["user"], example_inputs=example)
        record = T.meta["mari_fx.record"]
        if layout == "neat":
            print(f"CoarseRanker: user {USER_DIM} -> tower {TOWER}; fusion over [tower | item {ITEM_DIM}] -> {FUSION} -> 1\n")
            print(tabulate(
                [(l.name, f"{l.in_features}->{l.out_features}", l.user_columns, l.item_columns + l.mixed_columns,
                  l.action, l.reason) for l in record.layers],
                headers=["layer", "in->out", "user cols", "item/mixed cols", "rewrite", "why not"]))
            print()
        request = {"user": u, "item": i, "user_index": idx}
        before = mari_fx.count_flops(model, u[idx], i)
        after = mari_fx.count_flops(T, **request)
        minimum = analytic_min_flops(model, users, candidates)
        with torch.no_grad():
            diff = (T(**request) - model(u[idx], i)).abs().max().item()
        torch.testing.assert_close(T(**request), model(u[idx], i))
        rows.append((layout, record.split_layers, f"{before:,}", f"{after:,}", f"{minimum:,}",
                     "yes" if after == minimum else "NO", f"{before / after:.2f}x", f"{diff:.1e}"))
    print(f"FLOPs per request at U={users} user(s), N={candidates} candidates:")
    print(tabulate(rows, headers=["layout", "split", "before", "after", "analytic min", "= min",
                                  "FLOPs ratio", "max |diff|"]))
    print("\noutputs match the original model (torch.testing.assert_close): yes")


if __name__ == "__main__":
    main()
