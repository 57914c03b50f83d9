"""FLOPs of the transformed coarse ranker equal the analytic minimum (every user-only op at U rows)."""
import pytest
import torch

import mari_fx
from mari_fx.testing.examples import CoarseRanker

from helpers import ragged_index


def analytic(model, U, N, split=True):
    """Hand count: tower at U rows; fusion.0's user columns at U rows (or all at N if not split)."""
    tower = sum(2 * U * l.in_features * l.out_features for l in model.user_tower if hasattr(l, "weight"))
    first, *rest = [l for l in model.fusion if hasattr(l, "weight")]
    user_cols = model.user_tower[-2].out_features
    if split:
        fusion0 = 2 * first.out_features * (U * user_cols + N * (first.in_features - user_cols))
    else:
        fusion0 = 2 * N * first.in_features * first.out_features
    return tower + fusion0 + sum(2 * N * l.in_features * l.out_features for l in rest)


@pytest.mark.parametrize("U,N", [(1, 1000), (8, 1000)])
def test_flops_equal_analytic_minimum_and_layout_is_free(U, N):
    flops = {}
    for layout in ("neat", "interleaved"):
        model = CoarseRanker(64, 16, (128, 64), (64, 32), layout=layout).eval()
        T = mari_fx.transform(model, ["user"], (torch.randn(4, 64), torch.randn(4, 16)))
        u, i, idx = torch.randn(U, 64), torch.randn(N, 16), ragged_index(U, N)
        flops[layout] = mari_fx.count_flops(T, user=u, item=i, user_index=idx)
        assert flops[layout] == analytic(model, U, N)
        before = mari_fx.count_flops(model, u[idx], i)
        assert before == analytic(model, N, N, split=False)
        # the record predicts the same numbers
        rec = T.meta["mari_fx.record"]
        assert sum(l.flops(U, N, transformed=True) for l in rec.layers) == flops[layout]
        assert sum(l.flops(U, N, transformed=False) for l in rec.layers) == before
    assert flops["neat"] == flops["interleaved"]


def test_hoist_only_flops():
    model = CoarseRanker(64, 16, (128, 64), (64, 32)).eval()
    T = mari_fx.transform(model, ["user"], (torch.randn(4, 64), torch.randn(4, 16)), split_matmuls=False)
    U, N = 1, 1000
    idx = torch.zeros(N, dtype=torch.long)
    got = mari_fx.count_flops(T, user=torch.randn(U, 64), item=torch.randn(N, 16), user_index=idx)
    assert got == analytic(model, U, N, split=False)
