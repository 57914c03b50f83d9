"""Serving overhead: the split cost model (mari_fx.lowering.cost), the generated code's gathers and cats,
and ``mari-fx bench`` / ``mari_fx.report.timing.compare``.  No timing asserts (shared machines)."""
import json

import pytest
import torch
import torch.nn as nn

import mari_fx
from mari_fx.lowering import cost
from mari_fx.cli import main
from mari_fx.runtime.modules import SplitLinear
from mari_fx.analysis.tags import ROWS_KEY
from mari_fx.report.timing import compare, format_table

from helpers import ragged_index


class Packed(nn.Module):
    """One packed input X: ``user_cols`` user columns, the rest item columns, into a Linear;
    with ``shared`` the packed input is also read at N rows (a residual)."""

    def __init__(self, width=64, out=256, shared=False):
        super().__init__()
        self.lin, self.shared = nn.Linear(width, out), shared
        self.head = nn.Linear(out + (width if shared else 0), 1)

    def forward(self, X):
        h = torch.relu(self.lin(X))
        return self.head(torch.cat([h, X], -1) if self.shared else h)


def _transform(model, user_cols, width=64):
    return mari_fx.transform(model, [f"X[:, 0:{user_cols}]"], (torch.randn(6, width),))


def _layer(T, name):
    return {l.name: l for l in T.meta["mari_fx.record"].layers}[name]


def test_little_user_work_is_not_split():
    """2 user columns of 64 into Linear(64, 256): the split would gather a [N, 256] output to save
    2 of 64 columns' FLOPs; the cost model refuses it and says why (threshold: docs of mari_fx.lowering.cost)."""
    model = Packed(shared=True).eval()
    T = _transform(model, 2)
    lin = _layer(T, "lin")
    assert lin.action == "kept" and lin.reason.startswith("splitting would not reduce the work at N rows")
    assert "cost model" in lin.reason and not isinstance(T.get_submodule("lin"), SplitLinear)
    _check_request(T, model, 2)


def test_enough_user_work_is_split():
    model = Packed(shared=True).eval()
    T = _transform(model, 16)  # 16 of 64 columns: well above the threshold
    assert _layer(T, "lin").action == "split" and isinstance(T.get_submodule("lin"), SplitLinear)
    _check_request(T, model, 16)


def _check_request(T, model, user_cols, U=3, N=11):
    idx = ragged_index(U, N)
    xu, xi = torch.randn(U, user_cols), torch.randn(N, 64 - user_cols)
    got = T(X_user=xu, X_item=xi, user_index=idx)
    want = model(torch.cat([xu[idx], xi], -1))
    torch.testing.assert_close(got, want)
    assert got.dtype == want.dtype


def test_cost_threshold_is_as_documented():
    def shape(du, out=256, shared=True):
        return cost.LinearShape(64, out, 1, user=du, item=64 - du, broadcast=0, user_sources=1, item_sources=1,
                                input_user_columns=du, input_user_sources=1, input_shared=shared)

    # shared input: split from Du > itemsize * FLOPS_PER_BYTE / 2 + FLOPS_PER_KERNEL / (out * N) = 2.08 columns
    assert [cost.split_pays(shape(d)) for d in (1, 2, 3, 8)] == [False, False, True, True]
    # a split is never judged cheaper than a layer without user columns
    assert not cost.split_pays(shape(0))
    # keeping the Linear whole also pays for building its input when nothing else needs it
    assert cost.kept_work(shape(2, shared=False)).cost > cost.kept_work(shape(2)).cost


def test_pieces_gathered_once_and_cats_shared():
    """DCN-style: x0 = cat(interleaved user / item fields) feeds two split layers and an N-row product.
    The user fields are joined at U rows once (shared by both splits) and gathered with one index_select."""

    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.d, self.head = nn.Linear(24, 24), nn.Linear(24, 16), nn.Linear(40, 1)

        def forward(self, u1, u2, u3, i1, i2):
            x0 = torch.cat([u1, i1, u2, u3, i2], -1)
            x = x0 * self.c(x0) + x0
            return self.head(torch.cat([x, self.d(x0)], -1))

    model = Cross().eval()
    widths = {"u1": 4, "u2": 6, "u3": 4, "i1": 5, "i2": 5}
    ex = tuple(torch.randn(5, w) for w in widths.values())
    T = mari_fx.transform(model, ["u1", "u2", "u3"], ex)
    assert set(T.meta["mari_fx.record"].split_layers) == {"c", "d"}
    gathers = [n for n in T.graph.nodes if n.target is torch.index_select]
    assert len(gathers) == 1 and gathers[0].args[0].target is torch.cat  # the U-row join, gathered once
    cats = [n for n in T.graph.nodes if n.target is torch.cat]
    assert sum(n.meta.get(ROWS_KEY) == "U" for n in cats) == 1  # one user join for both split layers
    assert len({tuple(n.args[0]) for n in cats}) == len(cats)  # no cat of the same pieces twice
    U, N = 3, 10
    idx = ragged_index(U, N)
    req = {k: torch.randn(U if k.startswith("u") else N, w) for k, w in widths.items()}
    got = T(**req, user_index=idx)
    want = model(*[req[k][idx] if k.startswith("u") else req[k] for k in widths])
    torch.testing.assert_close(got, want)


def test_paired_ratio_is_per_round():
    """A round where both sides ran 4x slower leaves the speedup alone; the medians alone would not."""
    from mari_fx.report.timing import paired_ratio

    orig = [[1.1, 1.1], [4.4, 4.4, 4.4]]
    trans = [[1.0, 1.0, 1.0], [4.0, 4.0]]
    assert paired_ratio(orig, trans) == pytest.approx(1.1)
    flat_o, flat_t = sorted(sum(orig, [])), sorted(sum(trans, []))
    assert flat_o[2] / flat_t[2] == pytest.approx(4.4)


def test_compare_times_both_sides():
    from mari_fx.testing.factories import coarse_ranker

    model, example = coarse_ranker()
    T = mari_fx.transform(model, ["user"], example)
    rows = compare(model, T, users=[1, 8], candidates=[4, 16], rounds=2, round_s=0.001, progress=False)
    assert [(r["users"], r["candidates"]) for r in rows] == [(1, 4), (1, 16), (8, 16)]  # U <= N only
    for r in rows:
        assert r["original_median_ms"] > 0 and r["transformed_median_ms"] > 0 and r["original_calls"] >= 2
        assert r["speedup"] > 0
        assert r["flops_ratio"] > 1  # the tower runs once per user
    assert "FLOPs ratio" in format_table(rows)


def test_cli_bench(capsys):
    code = main(["bench", "mari_fx.testing.factories:coarse_ranker", "--user", "user", "--candidates", "10,20",
                 "--users", "1", "--rounds", "2", "--round-ms", "1", "--threads", "1", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "1 threads" in out and "load average" in out
    table = [l.split() for l in out.splitlines() if l.startswith("eager")]
    assert [(r[1], r[2]) for r in table] == [("1", "10"), ("1", "20")]
    assert all(r[-2].endswith("x") and r[-1].endswith("x") for r in table)
    code = main(["bench", "mari_fx.testing.factories:coarse_ranker", "--user", "user", "--candidates", "10", "--users", "1",
                 "--rounds", "1", "--round-ms", "1", "--json", "--no-progress"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and data["schema"] == "mari_fx.bench/1" and data["rows"][0]["candidates"] == 10
    # bad lists are usage errors (exit 2) with one line on stderr
    assert main(["bench", "mari_fx.testing.factories:coarse_ranker", "--user", "user", "--candidates", "ten"]) == 2
    assert "mari-fx: error:" in capsys.readouterr().err


def test_size_only_factories_built_at_n_rows_not_gathered():
    """``torch.zeros(x.shape[0], k)`` read at N rows is built at N rows (one write), not built at U
    rows and gathered; at U rows (inside the user tower) it stays at U rows."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.tower, self.head = nn.Linear(8, 8), nn.Linear(13, 1)

        def forward(self, u, i):
            b = u.shape[0]
            h = self.tower(u + torch.ones(b, 8))             # user tower: ones at U rows
            return self.head(torch.cat([h, i], -1)) + torch.zeros(b, 1, dtype=torch.float64)

    model = Model().eval()
    idx = ragged_index(3, 9)
    T = mari_fx.transform(model, ["u"], (torch.randn(3, 8)[idx], torch.randn(9, 5)), cost_model=False)
    factories = [n for n in T.graph.nodes if "ones" in str(n.target) or "zeros" in str(n.target)]
    rows = {"ones" if "ones" in str(n.target) else "zeros": n.meta.get(ROWS_KEY) for n in factories}
    assert len(factories) == 2 and rows == {"ones": "U", "zeros": "N"}, rows
    gathered = {n.args[0] for n in T.graph.nodes if n.target is torch.index_select}
    assert not gathered & set(factories)  # no factory output is gathered
    for U, N in ((1, 1), (3, 9), (4, 20)):
        idx = ragged_index(U, N)
        u, i = torch.randn(U, 8), torch.randn(N, 5)
        got = T(u=u, i=i, user_index=idx)
        want = model(u[idx], i)
        assert got.dtype == want.dtype == torch.float64
        torch.testing.assert_close(got, want)


class Towers(nn.Module):
    """Two small task towers over one shared input (ESMM / MMoE style); ``shared`` adds a reader
    that is not a Linear (it needs the input at N rows whatever the towers do)."""

    def __init__(self, shared):
        super().__init__()
        self.shared = shared
        self.ctr, self.cvr = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, u, i):
        x = torch.cat([u, i], -1)
        out = self.ctr(x) * self.cvr(x)
        return out + x.sum(-1, keepdim=True) if self.shared else out


def test_sibling_towers_over_one_input_are_judged_together():
    """Each tower alone barely pays for its split if the input is built at N rows anyway; but when
    every reader is a Linear that splits, nobody needs the input at N rows: both split.  A reader
    that needs the input (``x.sum``) keeps the towers whole."""
    idx = ragged_index(3, 11)
    for shared, action in ((False, "split"), (True, "kept")):
        model = Towers(shared).eval()
        T = mari_fx.transform(model, ["u"], (torch.randn(3, 4)[idx], torch.randn(11, 4)))
        assert [_layer(T, n).action for n in ("ctr", "cvr")] == [action, action], shared
        u, i = torch.randn(3, 4), torch.randn(11, 4)
        torch.testing.assert_close(T(u=u, i=i, user_index=idx), model(u[idx], i))
