"""Equivalence + structure of the core rewrite on the built-in rankers."""
import pytest
import torch
import torch.nn as nn

import mari_fx
from mari_fx.testing.examples import CoarseRanker, DictRanker, PackedRanker
from mari_fx.runtime.modules import SplitLinear
from mari_fx.analysis.tags import ROWS_KEY

from helpers import ragged_index

SHAPES = [(1, 1), (1, 7), (3, 7), (3, 3), (2, 50)]


def rows_seen(module: nn.Module, names, call):
    """Row count of the input each named submodule saw during ``call()``."""
    seen, hooks = {}, []
    for name in names:
        sub = module.get_submodule(name)

        def hook(m, args, out, name=name):
            seen.setdefault(name, args[0].shape[0])

        hooks.append(sub.register_forward_hook(hook))
    try:
        call()
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("layout", ["neat", "interleaved"])
@pytest.mark.parametrize("U,N", SHAPES)
def test_coarse_ranker(layout, U, N):
    model = CoarseRanker(layout=layout).eval()
    u, i, idx = torch.randn(U, 16), torch.randn(N, 8), ragged_index(U, N)
    T = mari_fx.transform(model, user_inputs=["user"], example_inputs=(torch.randn(4, 16), torch.randn(4, 8)))
    T.graph.lint()
    torch.testing.assert_close(T(user=u, item=i, user_index=idx), model(u[idx], i))
    # structure: exactly the first fusion layer was split, the tower runs on U rows
    assert T.meta["mari_fx.record"].split_layers == ("fusion.0",)
    assert isinstance(T.get_submodule("fusion.0"), SplitLinear)
    assert isinstance(T.get_submodule("fusion.2"), nn.Linear)
    seen = rows_seen(T, ["user_tower.0", "user_tower.2", "fusion.2"], lambda: T(user=u, item=i, user_index=idx))
    assert seen == {"user_tower.0": U, "user_tower.2": U, "fusion.2": N}
    # the split layer's weights are the original columns (permuted for the interleaved layout)
    split, orig = T.get_submodule("fusion.0"), model.fusion[0]
    assert split.weight_user.shape == (64, 32) and split.weight_item.shape == (64, 8)
    if layout == "neat":
        user_cols, item_cols = list(range(32)), list(range(32, 40))
    else:  # cat([u[:, :16], i[:, :4], u[:, 16:], i[:, 4:]])
        user_cols, item_cols = list(range(16)) + list(range(20, 36)), list(range(16, 20)) + list(range(36, 40))
    assert torch.equal(split.weight_user, orig.weight[:, user_cols])
    assert torch.equal(split.weight_item, orig.weight[:, item_cols])


def test_original_model_not_mutated():
    model = CoarseRanker().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mari_fx.transform(model, ["user"], (torch.randn(4, 16), torch.randn(4, 8)))
    assert isinstance(model.fusion[0], nn.Linear)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def _dict_pairs(U, N, idx):
    ub, ib = DictRanker.example_batch(U, seed=1), DictRanker.example_batch(N, seed=2)
    return {k: (ub[k][idx] if k in ("user_id", "user_age", "hist_item_ids") else ib[k]) for k in ub}


@pytest.mark.parametrize("U,N", SHAPES)
def test_dict_input_model(U, N):
    model = DictRanker().eval()
    idx = ragged_index(U, N)
    pairs = _dict_pairs(U, N, idx)
    T = mari_fx.transform(model, ["x[user_id]", "x['user_age']", "x[hist_item_ids]"],
                          (DictRanker.example_batch(6),))
    request = mari_fx.pairs_to_request(T, pairs, user_index=idx)
    assert request["x_user_id"].shape[0] == U and request["x_item_id"].shape[0] == N
    torch.testing.assert_close(T(**request), model(pairs))
    record = T.meta["mari_fx.record"]
    assert record.split_layers == ("head.0",)
    assert {"user_emb", "user_mlp.0"} <= set(record.hoisted)
    # the item embedding table serves both the user history (U rows) and the candidate (N rows)
    calls = [n for n in T.graph.nodes if n.target == "item_emb"]
    assert sorted(n.meta[ROWS_KEY] for n in calls) == ["N", "U"]


def test_whole_dict_declared_user():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(6, 2)

        def forward(self, user, item):
            return self.l(torch.cat([user["a"], user["b"], item], -1))

    model = M().eval()
    U, N = 2, 5
    idx = ragged_index(U, N)
    ua, ub, it = torch.randn(U, 2), torch.randn(U, 1), torch.randn(N, 3)
    T = mari_fx.transform(model, ["user"], ({"a": ua[idx], "b": ub[idx]}, it))
    torch.testing.assert_close(T(user_a=ua, user_b=ub, item=it, user_index=idx),
                               model({"a": ua[idx], "b": ub[idx]}, it))
    assert T.meta["mari_fx.record"].split_layers == ("l",)


@pytest.mark.parametrize("U,N", SHAPES)
def test_packed_single_tensor_model(U, N):
    model = PackedRanker().eval()
    idx = ragged_index(U, N)
    user_rows, X = torch.randn(U, 12), torch.randn(N, 12)
    user_cols = [0, 1, 2, 5, 6, 7, 8]
    X[:, user_cols] = user_rows[idx][:, user_cols]
    T = mari_fx.transform(model, model.user_selectors(), (torch.randn(4, 12),))
    request = mari_fx.pairs_to_request(T, X, user_index=idx)
    assert request["X_user"].shape == (U, 7) and request["X_item"].shape == (N, 5)
    torch.testing.assert_close(T(**request), model(X))
    record = T.meta["mari_fx.record"]
    # the wide layer reads X with user and item columns interleaved: split with permuted weights
    assert record.split_layers == ("wide", "head.0")
    assert "user_proj" in record.hoisted
    wide = T.get_submodule("wide")
    torch.testing.assert_close(wide.weight_user, model.wide.weight[:, user_cols])
    torch.testing.assert_close(wide.weight_item, model.wide.weight[:, [3, 4, 9, 10, 11]])


def test_request_roundtrip():
    model = PackedRanker().eval()
    T = mari_fx.transform(model, model.user_selectors(), (torch.randn(4, 12),))
    idx = ragged_index(3, 8)
    req = mari_fx.random_request(T, 3, 8)
    pairs = mari_fx.request_to_pairs(T, req)
    back = mari_fx.pairs_to_request(T, **pairs, user_index=req["user_index"])
    for k in req:
        torch.testing.assert_close(back[k], req[k])


def test_hoist_only_option_keeps_linears_whole():
    model = CoarseRanker().eval()
    ex = (torch.randn(4, 16), torch.randn(4, 8))
    T = mari_fx.transform(model, ["user"], ex, split_matmuls=False)
    record = T.meta["mari_fx.record"]
    assert record.split_layers == ()
    assert {l.name: l.reason for l in record.layers}["fusion.0"] == "split_matmuls=False"
    assert not any(isinstance(m, SplitLinear) for m in T.modules())
    u, i, idx = torch.randn(3, 16), torch.randn(9, 8), ragged_index(3, 9)
    torch.testing.assert_close(T(user=u, item=i, user_index=idx), model(u[idx], i))
    # the tower still runs on U rows and is broadcast where it meets the item features
    assert [b.source for b in record.broadcasts] == ["user_tower_3"]
    seen = rows_seen(T, ["user_tower.0", "fusion.0"], lambda: T(user=u, item=i, user_index=idx))
    assert seen == {"user_tower.0": 3, "fusion.0": 9}


def test_transform_accepts_tagged_graph_module_and_plain_graph_module():
    model = CoarseRanker().eval()
    ex = (torch.randn(4, 16), torch.randn(4, 8))
    tagged = mari_fx.trace(model, ["user"], ex)
    assert mari_fx.is_tagged(tagged)
    T1 = mari_fx.transform(tagged)
    T2 = mari_fx.transform(torch.fx.symbolic_trace(model), ["user"], ex)
    assert isinstance(tagged.get_submodule("fusion.0"), nn.Linear)  # trace's graph untouched by lowering
    u, i, idx = torch.randn(2, 16), torch.randn(5, 8), ragged_index(2, 5)
    for T in (T1, T2):
        assert T.meta["mari_fx.record"].split_layers == ("fusion.0",)
        torch.testing.assert_close(T(user=u, item=i, user_index=idx), model(u[idx], i))


def test_transform_verify_option_and_verify_detects_difference():
    model = CoarseRanker().eval()
    ex = (torch.randn(4, 16), torch.randn(4, 8))
    T = mari_fx.transform(model, ["user"], ex, verify=True)
    other = CoarseRanker().eval()  # different weights
    with pytest.raises(mari_fx.VerificationError, match="output"):
        mari_fx.verify(other, T)


def test_output_that_is_user_only_is_broadcast():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.u = nn.Linear(4, 3)
            self.i = nn.Linear(2, 3)

        def forward(self, user, item):
            uu = self.u(user)
            return uu, uu + self.i(item), user.shape[0]

    model = M().eval()
    U, N = 2, 6
    idx = ragged_index(U, N)
    u, i = torch.randn(U, 4), torch.randn(N, 2)
    T = mari_fx.transform(model, ["user"], (torch.randn(3, 4), torch.randn(3, 2)))
    got, want = T(user=u, item=i, user_index=idx), model(u[idx], i)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    assert got[2] == want[2] == N
    # one gather of the user projection serves both uses
    gathers = [n for n in T.graph.nodes if n.target is torch.index_select]
    assert len(gathers) == 1


class ListInputs(nn.Module):
    """Features passed as a list (``feats[0]`` the user's), read by element, by slice or handed whole
    to ``torch.cat``; ``loop`` iterates over the list (torch.fx cannot: torch.export flattens it)."""

    def __init__(self, loop=False):
        super().__init__()
        self.loop = loop
        self.user_tower = nn.Linear(3, 3)
        self.head = nn.Linear(9, 2)

    def forward(self, feats):
        if self.loop:
            return self.head(torch.cat([f * 2.0 for f in feats], 1))
        rest = torch.cat(feats[1:], 1)  # a slice of the list, read by an op
        return self.head(torch.cat([self.user_tower(feats[0]), rest], 1)) + self.head(torch.cat(feats, 1))


@pytest.mark.parametrize("loop", [False, True])
@pytest.mark.parametrize("container", [list, tuple])
def test_list_and_tuple_inputs(loop, container):
    model = ListInputs(loop).eval()
    idx = ragged_index(3, 7)
    u, i, d = torch.randn(3, 3), torch.randn(7, 3), torch.randn(7, 3)
    T = mari_fx.transform(model, ["feats[0]"], (container([u[idx[:4]], i[:4], d[:4]]),))
    spec = T.meta["mari_fx.request"]
    assert [(s.name, str(s.side)) for s in spec.inputs] == [("feats_0", "user"), ("feats_1", "item"), ("feats_2", "item")]
    assert T.meta["mari_fx.record"].capture == ("torch.export" if loop else "torch.fx")
    assert {l.name for l in T.meta["mari_fx.record"].layers if l.action == "split"}  # the head splits on feats[0]
    want = model(container([u[idx], i, d]))
    torch.testing.assert_close(T(feats_0=u, feats_1=i, feats_2=d, user_index=idx), want)
    request = mari_fx.pairs_to_request(T, container([u[idx], i, d]), user_index=idx)
    pairs = mari_fx.request_to_pairs(T, request)
    assert type(pairs["feats"]) is container
    torch.testing.assert_close(model(**pairs), want)
    if not loop:  # the user tower runs once per user
        assert {n.meta.get(ROWS_KEY) for n in T.graph.nodes if n.target == "user_tower"} == {"U"}
