"""mari_fx.precompute_items: item-only work cached per catalog item, gathered by item_row."""
import copy
import io
import warnings

import pytest
import torch

import mari_fx
from mari_fx.errors import DeclarationError, RequestError
from mari_fx.testing.examples import CoarseRanker, DictRanker, DINRanker
from mari_fx.deploy.precompute import ITEM_ROW

M = 6000


def _coarse():
    torch.manual_seed(0)
    model = CoarseRanker().eval()
    T = mari_fx.transform(model, ["user"], (torch.randn(4, 16), torch.randn(4, 8)))
    catalog = {"item": torch.randn(M, 8)}

    def users(u):
        return {"user": torch.randn(u, 16)}

    def pairs(req, rows, idx):
        return (req["user"][idx], catalog["item"][rows])
    return model, T, catalog, users, pairs


def _din(reassociate):
    torch.manual_seed(0)
    model = DINRanker().eval()
    ex = (torch.randint(50, (4, 10)), torch.randint(20, (4,)), torch.randint(50, (4,)))
    T = mari_fx.transform(model, ["hist", "user_id"], ex, reassociate=reassociate)
    catalog = {"item_id": torch.randint(50, (M,))}

    def users(u):
        return {"hist": torch.randint(50, (u, 10)), "user_id": torch.randint(20, (u,))}

    def pairs(req, rows, idx):
        return (req["hist"][idx], req["user_id"][idx], catalog["item_id"][rows])
    return model, T, catalog, users, pairs


CASES = {"coarse": _coarse, "din": lambda: _din(False), "din_reassociate": lambda: _din(True)}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    model, T, catalog, users, pairs = CASES[request.param]()
    P = mari_fx.precompute_items(T, catalog)
    return request.param, model, T, P, catalog, users, pairs


def _request(users, u, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    req = users(u)
    idx = torch.cat([torch.arange(u), torch.randint(u, (n - u,), generator=g)]) if n >= u else torch.arange(n)
    rows = torch.randint(M, (n,), generator=g)
    rows[0] = M - 1  # the last catalog row is reachable
    return req, rows, idx


@pytest.mark.parametrize("u,n", [(1, 1), (1, 1000), (3, 3), (3, 1000)])
def test_equivalence(case, u, n):
    _, model, T, P, catalog, users, pairs = case
    req, rows, idx = _request(users, u, n)
    with torch.no_grad():
        want = model(*pairs(req, rows, idx))
        got = P(**req, **{ITEM_ROW: rows, "user_index": idx})
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want)


def test_flops_are_T_minus_item_only_work(case):
    name, model, T, P, catalog, users, pairs = case
    n = 1000
    req, rows, idx = _request(users, 3, n)
    item_req = {k: v[rows] for k, v in catalog.items()}
    before = mari_fx.count_flops(T, **req, **item_req, user_index=idx)
    after = mari_fx.count_flops(P, **req, item_row=rows, user_index=idx)
    cache = P.meta["mari_fx.record"].item_cache
    # hand count of the item-only work of each model, per candidate
    item_only = {"coarse": 2 * 8 * 64,                 # fusion.0's item product: 8 item columns -> 64
                 "din": 2 * 8 * 16,                    # att.0's product of the broadcast candidate q: 8 -> 16
                 "din_reassociate": 2 * 8 * 16}[name]
    assert before - after == n * item_only
    assert sum(c.flops_saved_per_candidate for c in cache) == item_only


def test_structure(case):
    name, model, T, P, catalog, users, pairs = case
    placeholders = [n.target for n in P.graph.nodes if n.op == "placeholder"]
    assert ITEM_ROW in placeholders and not set(catalog) & set(placeholders)
    gathers = [n for n in P.graph.nodes if n.target is torch.index_select and n.args[2].target == ITEM_ROW]
    cache = P.meta["mari_fx.record"].item_cache
    assert sorted(g.args[0].target for g in gathers) == sorted(c.name for c in cache)
    assert all(dict(P.named_buffers())[c.name].shape == (M, *c.shape) for c in cache)
    assert all(c.bytes == M * c.bytes_per_row for c in cache)
    split_item_arg = {n.target: n.args[1:] for n in P.graph.nodes if n.op == "call_module"
                      and isinstance(P.get_submodule(n.target), mari_fx.SplitLinear)}
    if name == "coarse":
        assert [c.source for c in cache] == ["fusion.0 (item product)"]
        assert split_item_arg["fusion.0"][0] is None  # the item product comes from the cache, added after
    else:
        assert [c.source for c in cache] == ["item_emb", "att.0 (broadcast product)"]
        assert split_item_arg["att.0"][2] is None     # the candidate's broadcast product is gathered
        assert split_item_arg["top.0"][0] is not None  # top.0's item input mixes in the attention result
    assert P.meta["mari_fx.record"].catalog_size == M
    assert P.meta["mari_fx.record"].catalog_inputs == tuple(catalog)
    # T is unchanged
    assert all(n.target != ITEM_ROW for n in T.graph.nodes)
    assert "item_cache" not in T.code


def test_cost_choice_caches_the_cheaper_cut():
    torch.manual_seed(0)
    model = CoarseRanker(item_dim=4, fusion=(512, 32)).eval()
    T = mari_fx.transform(model, ["user"], (torch.randn(4, 16), torch.randn(4, 4)))
    catalog = {"item": torch.randn(500, 4)}
    # a 512-wide product of 4 item columns: gathering 2048 bytes costs more than gathering 16 and recomputing
    P = mari_fx.precompute_items(T, catalog)
    assert [c.source for c in P.meta["mari_fx.record"].item_cache] == ["input item"]
    split = next(n for n in P.graph.nodes if n.target == "fusion.0")
    assert split.args[1].target is torch.index_select  # the split Linear keeps its fused item GEMM
    # when a gathered byte is cheap, the product is cached instead
    Q = mari_fx.precompute_items(T, catalog, byte_cost=0.5)
    assert [c.source for c in Q.meta["mari_fx.record"].item_cache] == ["fusion.0 (item product)"]
    u, rows, idx = torch.randn(2, 16), torch.tensor([0, 499, 7]), torch.tensor([0, 1, 1])
    for X in (P, Q):
        torch.testing.assert_close(X(user=u, item_row=rows, user_index=idx), model(u[idx], catalog["item"][rows]))


def test_embedding_is_cached_not_its_ids_and_other_item_inputs_stay():
    torch.manual_seed(0)
    model = DictRanker().eval()
    T = mari_fx.transform(model, ["x[user_id]", "x[user_age]", "x[hist_item_ids]"], (DictRanker.example_batch(6),))
    ids = torch.randint(200, (M,))
    P = mari_fx.precompute_items(T, {"x[item_id]": ids})
    assert [c.source for c in P.meta["mari_fx.record"].item_cache] == ["item_emb"]
    names = [n.target for n in P.graph.nodes if n.op == "placeholder"]
    assert names == ["x_user_id", "x_user_age", "x_hist_item_ids", ITEM_ROW, "x_item_price", "user_index"]
    b = DictRanker.example_batch(1000, seed=1)
    idx = torch.arange(1000) % 3
    rows = torch.randint(M, (1000,))
    req = {"x_user_id": b["user_id"][:3], "x_user_age": b["user_age"][:3], "x_hist_item_ids": b["hist_item_ids"][:3],
           "item_row": rows, "x_item_price": b["item_price"], "user_index": idx}
    pairs = {"user_id": b["user_id"][:3][idx], "user_age": b["user_age"][:3][idx],
             "hist_item_ids": b["hist_item_ids"][:3][idx], "item_id": ids[rows], "item_price": b["item_price"]}
    torch.testing.assert_close(P(**req), model(pairs))
    assert set(mari_fx.random_request(P, 2, 5)) == set(req)


def test_refresh_after_weight_and_catalog_update():
    model, T, catalog, users, pairs = _coarse()
    P = mari_fx.precompute_items(T, catalog)
    with torch.no_grad():
        getattr(P.fusion, "0").weight_item.mul_(2)
        model.fusion[0].weight[:, 32:].mul_(2)
    new = torch.randn(M + 10, 8)
    assert P.refresh({"item": new}) is P
    u, rows, idx = torch.randn(2, 16), torch.tensor([0, M + 9, 5]), torch.tensor([0, 1, 1])
    torch.testing.assert_close(P(user=u, item_row=rows, user_index=idx), model(u[idx], new[rows]))
    assert P.meta["mari_fx.record"].catalog_size == M + 10
    assert P.meta["mari_fx.record"].item_cache[0].bytes == (M + 10) * 256
    with pytest.raises(DeclarationError, match=r"catalog\['item'\] has shape \(5, 3\)"):
        P.refresh({"item": torch.randn(5, 3)})
    with pytest.raises(DeclarationError, match="catalog lacks \\['item'\\]"):
        P.refresh({})


def test_bad_catalog_and_bad_item_row():
    model, T, catalog, users, pairs = _coarse()
    code = T.code
    for bad, match in [({"user": torch.randn(5, 16)}, "'user' is a user input"),
                       ({"nope": catalog["item"]}, "'nope' is not an input of T"),
                       ({"item": catalog["item"][:, :4]}, r"needs \[M, 8\]"),
                       ({"item": catalog["item"].double()}, "dtype torch.float64"),
                       ({"item": catalog["item"][:0]}, "catalog is empty"),
                       ({}, "catalog is empty")]:
        with pytest.raises(DeclarationError, match=match):
            mari_fx.precompute_items(T, bad)
    assert T.code == code
    P = mari_fx.precompute_items(T, catalog)
    with pytest.raises(DeclarationError, match="already reads an item cache"):
        mari_fx.precompute_items(P, {"item": catalog["item"]})
    u, idx = torch.randn(1, 16), torch.zeros(3, dtype=torch.int64)
    for rows, match in [(torch.tensor([0, 1, 2], dtype=torch.int32), "item_row must have dtype torch.int64"),
                        (torch.tensor([0, 1, M]), f"item_row has value {M} but the catalog has {M} rows"),
                        (torch.tensor([0, -1, 2]), "item_row has a negative value -1"),
                        (torch.tensor([0, 1]), "item_row has 2 entries but user_index has 3")]:
        with pytest.raises(RequestError, match=match):
            P(user=u, item_row=rows, user_index=idx)


def test_two_catalog_inputs_must_agree_on_rows():
    torch.manual_seed(0)
    model = DictRanker().eval()
    T = mari_fx.transform(model, ["x[user_id]", "x[user_age]", "x[hist_item_ids]"], (DictRanker.example_batch(6),))
    with pytest.raises(DeclarationError, match=r"catalog\['x_item_price'\] has 9 rows but catalog\['x_item_id'\] has 10"):
        mari_fx.precompute_items(T, {"x[item_id]": torch.randint(200, (10,)), "x_item_price": torch.rand(9, 1)})
    P = mari_fx.precompute_items(T, {"x[item_id]": torch.randint(200, (10,)), "x_item_price": torch.rand(10, 1)})
    assert [n.target for n in P.graph.nodes if n.op == "placeholder"][-2:] == [ITEM_ROW, "user_index"]


def test_deepcopy_and_save_load_keep_refresh():
    model, T, catalog, users, pairs = _coarse()
    P = mari_fx.precompute_items(T, catalog)
    u, rows, idx = torch.randn(2, 16), torch.tensor([3, M - 1, 5]), torch.tensor([0, 1, 1])
    want = model(u[idx], catalog["item"][rows])
    buf = io.BytesIO()
    torch.save(P, buf)
    buf.seek(0)
    for Q in (copy.deepcopy(P), torch.load(buf, weights_only=False)):
        assert isinstance(Q, mari_fx.PrecomputedModule)
        torch.testing.assert_close(Q(user=u, item_row=rows, user_index=idx), want)
        with torch.no_grad():
            getattr(Q.fusion, "0").weight_item.zero_()
        Q.refresh(catalog)  # reads Q's weights, not P's
        assert not torch.equal(Q(user=u, item_row=rows, user_index=idx), want)
        with pytest.raises(RequestError, match="item_row has value"):
            Q(user=u, item_row=rows + M, user_index=idx)
    torch.testing.assert_close(P(user=u, item_row=rows, user_index=idx), want)


def test_deploy_export_script_compile():
    model, T, catalog, users, pairs = _din(True)
    P = mari_fx.precompute_items(T, catalog)
    ep = mari_fx.export(P, mari_fx.random_request(P, 2, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = mari_fx.export.script(P)
    compiled = torch.compile(P)
    for u, n in [(1, 1), (3, 1000)]:
        req, rows, idx = _request(users, u, n, seed=1)
        want = model(*pairs(req, rows, idx))
        for run in (ep.module(), scripted, compiled):
            torch.testing.assert_close(run(**req, item_row=rows, user_index=idx), want)
    req, rows, idx = _request(users, 1, 3)
    with pytest.raises(RuntimeError, match="item_row out of range"):
        ep.module()(**req, item_row=rows + M, user_index=idx)
    with pytest.raises(torch.jit.Error, match="item_row has value"):
        scripted(**req, item_row=rows + M, user_index=idx)


def test_report_catalog_size(capsys):
    import json

    from mari_fx.cli import main

    assert main(["report", "mari_fx.testing.factories:demo_ranker", "--user", "user", "--catalog-size", "100000"]) == 0
    text = capsys.readouterr().out
    row = next(line.split() for line in text.splitlines() if line.startswith("fusion.0 (item product)"))
    # 256 outputs of the 64 item columns of fusion.0: 1,024 bytes per item, 2 * 64 * 256 FLOPs per candidate
    assert row[3:] == ["256", "float32", "1,024", "102,400,000", "32,768"]
    assert main(["report", "mari_fx.testing.factories:demo_ranker", "--user", "user", "--catalog-size", "10", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    cache = data["item_cache"]
    assert cache["catalog_inputs"] == ["item"] and cache["bytes"] == 10 * 1024
    assert cache["flops_after_with_cache"] == data["flops"]["after"] - 1000 * 32768


def test_docs_example_runs():
    import pathlib
    import re

    text = (pathlib.Path(__file__).parent.parent / "docs" / "precompute.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 2  # the dense ranker and the TorchRec KJT catalog
    for code in blocks:
        exec(compile(code, "docs/precompute.md", "exec"), {"print": lambda *a: None})


class _ItemBatchSize(torch.nn.Module):
    """The item tower's output viewed with N as a size (row-wise: still per item), then scaled by
    N read as a value (``i.shape[0]``) or divided by ``i.numel()``: request values, not an item's."""

    def __init__(self, count):
        super().__init__()
        self.count = count
        self.user, self.item, self.head = torch.nn.Linear(6, 8), torch.nn.Linear(5, 8), torch.nn.Linear(16, 1)

    def forward(self, u, i):
        h = self.item(i).view(i.shape[0], 2, 4).flatten(1)
        h = h / i.numel() if self.count == "numel" else h * i.shape[0]
        return self.head(torch.cat([self.user(u), h], 1))


def _batch_size_case(count):
    torch.manual_seed(0)
    model = _ItemBatchSize(count).eval()
    catalog = torch.randn(500, 5)
    T = mari_fx.transform(model, ["u"], (torch.randn(4, 6), catalog[:4]))
    P = mari_fx.precompute_items(T, {"i": catalog})
    worst = 0.0
    for U, N in ((1, 1), (2, 7), (3, 40)):
        idx = torch.cat([torch.arange(U), torch.randint(U, (N - U,))])
        u, rows = torch.randn(U, 6), torch.randint(500, (N,))
        got = P(u=u, item_row=rows, user_index=idx)
        worst = max(worst, (got - model(u[idx], catalog[rows])).abs().max().item())
    return P, worst


@pytest.mark.parametrize("count", ["shape", "numel"])
def test_batch_size_read_as_a_value_is_not_cached_per_item(count):
    P, worst = _batch_size_case(count)
    assert worst < 1e-4
    if count == "shape":
        assert [c.source for c in P.meta["mari_fx.record"].item_cache] == ["flatten"]  # view(N, ...) kept


def test_control_batch_size_value_cached(monkeypatch):
    """Positive control: taking N read as a value for a size caches ``h * M``: wrong."""
    from mari_fx.deploy import precompute

    monkeypatch.setattr(precompute, "_n_as_size", lambda n, a: True)
    assert _batch_size_case("shape")[1] > 1e-3


def test_control_item_count_cached(monkeypatch):
    """Positive control: taking ``i.numel()`` for a per-item value caches ``h / (5 M)``: wrong."""
    from mari_fx.deploy import precompute

    monkeypatch.setattr(precompute, "_row_value", lambda n: True)
    assert _batch_size_case("numel")[1] > 1e-3
