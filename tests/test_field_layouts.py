"""Field layouts: per-feature [B, 1, E] embeddings, field stacks, pairwise interactions, crosses
and TorchRec's DLRM family -- lossless, and the Linear layers over user elements split."""
import pytest
import torch
import torch.nn as nn

import mari_fx
from field_models import Case, own_cases, realised, torchrec_cases
from mari_fx.analysis.elements import ELEM_KEY
from mari_fx.runtime.modules import SplitLinear
from mari_fx.analysis.tags import ROWS_KEY

SHAPES = [(1, 1), (1, 300), (3, 300), (3, 5)]
CASES = {c.name: c for c in own_cases() + torchrec_cases()}
# Linear layers whose input holds user elements after a reshape / stack / gather: (path, user columns at U rows)
EXPECTED_SPLITS = {
    "per_feature_cat1_flatten": {"mlp.0": 24},
    "per_feature_catlast_view": {"mlp.0": 24},
    "per_feature_cat1_reshape": {"mlp.0": 24},
    "field_interactions": {"V": 24, "mlp.0": 27},  # 3 user fields x 8 (+ their 3 pair products)
    "DLRM": {"over_arch.model.0._mlp.0._linear": 1},  # the user_id . user_hist product
    "DLRM_DCN": {"linear": 16},  # the low-rank cross's first V over [dense | fields]
    "DLRM_Projection": {"inter_arch.interaction_branch1.model._mlp.0._linear": 16,
                        "inter_arch.interaction_branch2.model._mlp.0._linear": 16},
    "SimpleDeepFMNN": {"inter_arch.deep_fm.dense_module.0": 16},  # through the fx.wrap-ed _get_flatten_input
    # the fold [B * L, 4E] sunk past the attention MLP: k's block (8) at U * L rows, q's before its expand
    # c0 splits on the user context; mlp.0's user fields (2 x 12) re-computed at U rows through c0's split
    "field_cross_stack": {"c0": 4, "mlp.0": 24},
    # heads split off with stack(split(.., dim=2)) and merged with cat(split(..)): a cat over a
    # tuple another op made (no pieces); the DNN beside it splits on the 2 user fields
    "autoint_heads": {"mlp.0": 16},
    # masked_select(gram, triu).view(-1, K) read as gram[:, triu]: 2 user fields x 8 + their 1 pair
    "masked_select_pnn": {"mlp.0": 17},
    "target_attention_view": {"att.0": 8, "mlp.0": 8},
    "target_attention_reshape": {"att.0": 8, "mlp.0": 8},
}
_T = {}


def transformed(case: Case):
    # these models are tiny: the cost model would rightly keep some splits (a 1-column user block),
    # so it is off here, where the rewrite itself is under test
    if case.name not in _T:
        model = case.build()
        _T[case.name] = model, mari_fx.transform(model, case.selectors, case.pairs(2, 6, 1)[0], cost_model=False)
    return _T[case.name]


@pytest.mark.parametrize("U,N", SHAPES)
@pytest.mark.parametrize("name", list(CASES))
def test_lossless(name, U, N):
    case = CASES[name]
    model, T = transformed(case)
    args, idx = case.pairs(U, N, seed=U * 1000 + N)
    request = mari_fx.pairs_to_request(T, *args, user_index=idx)
    with torch.no_grad():
        got, want = T(**request), model(*args)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", list(CASES))
def test_splits_and_reach(name):
    case = CASES[name]
    model, T = transformed(case)
    layers = {l.name: l for l in T.meta["mari_fx.record"].layers}
    for path, cols in EXPECTED_SPLITS[name].items():
        assert layers[path].action == "split" and layers[path].split_user_features == cols, layers[path]
    split_mods = [m for m in T.modules() if isinstance(m, SplitLinear)]
    assert sum(m.weight_user.shape[1] for m in split_mods) >= sum(EXPECTED_SPLITS[name].values())
    # each split layer reads its user columns at U rows (the re-emitted cone) and the rest at N rows
    calls = {n.target.replace("_split", ""): n for n in T.graph.nodes  # functional linears get a "_split" module
             if n.op == "call_module" and n.target.replace("_split", "") in EXPECTED_SPLITS[name]}
    assert set(calls) == set(EXPECTED_SPLITS[name])
    for n in calls.values():
        assert n.args[0].meta[ROWS_KEY] == "U" and n.args[1].meta[ROWS_KEY] == "N"
    args, idx = case.pairs(5, 120, seed=3)
    assert realised(model, T, args, idx) >= 0.9


def test_split_weights_are_the_user_element_columns():
    """DLRM's over-arch: [dense 8 | 10 pair products], the one user x user product at column 8 + 4."""
    model, T = transformed(CASES["DLRM"])
    orig = model.over_arch.model[0]._mlp[0]._linear
    split = T.get_submodule("over_arch.model.0._mlp.0._linear")
    # triu pairs of [dense, user_id, item_id, user_hist, item_cat]: (1, 3) is the 5th pair
    torch.testing.assert_close(split.weight_user, orig.weight[:, [8 + 5]])
    torch.testing.assert_close(split.weight_item, orig.weight[:, [c for c in range(18) if c != 13]])


class BatchFold(nn.Module):
    """Folds the batch into the rows of a Linear and back: no element map may cross it."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 4)
        self.lin = nn.Linear(4, 4)
        self.head = nn.Linear(12, 1)

    def forward(self, user_ids, item_ids):
        B = user_ids.shape[0]
        x = torch.cat([self.emb(user_ids), self.emb(item_ids)], dim=1)  # [B, 3, 4]
        y = self.lin(x.view(-1, 4)).view(B, -1)
        z = x.transpose(0, 1).reshape(B, -1)  # crosses rows: must stay mixed
        return self.head(y + z).squeeze(-1)


class Opaque(nn.Module):
    """A helper that computes (not only moves data) is not traced through."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 4)
        self.head = nn.Linear(12, 1)

    def forward(self, user_ids, item_ids):
        x = _scaled_flat([self.emb(user_ids), self.emb(item_ids)])
        return self.head(x).squeeze(-1)


@torch.fx.wrap
def _scaled_flat(xs):
    return torch.cat([x.flatten(1) * 2 for x in xs], dim=1)


@pytest.mark.parametrize("cls", [BatchFold, Opaque])
def test_cross_row_and_computing_helpers_stay_mixed_and_exact(cls):
    model = cls().eval()
    ex_idx = torch.tensor([0, 0, 1, 1])
    T = mari_fx.transform(model, ["user_ids"], (torch.randint(50, (2, 2))[ex_idx], torch.randint(50, (4, 1))))
    assert T.meta["mari_fx.record"].split_layers == ()
    idx = torch.tensor([0, 1, 1, 2, 0, 2, 2])
    u, i = torch.randint(50, (3, 2)), torch.randint(50, (7, 1))
    with torch.no_grad():
        torch.testing.assert_close(T(user_ids=u, item_ids=i, user_index=idx), model(u[idx], i))


def test_element_tags_of_a_field_stack():
    model, _ = transformed(CASES["field_interactions"])
    tagged = mari_fx.trace(model, ["user_ids"], CASES["field_interactions"].pairs(2, 6, 1)[0])
    tags = {n.name: n.meta.get(ELEM_KEY) for n in tagged.graph.nodes}
    # [B, F=5, E=8] with fields (u0, i0, u1, u2, i1)
    assert tags["stack"].map[:, 0].tolist() == [1, 2, 1, 1, 2]
    # 10 field pairs: 3 user x user (u0u1, u0u2, u1u2), 1 item x item, 6 mixed
    assert sorted(tags["getitem_6"].map.tolist()) == [1, 1, 1, 2, 3, 3, 3, 3, 3, 3]
    assert str(tags["sum_1"]) == "elements[mixed:8]"  # the FM sum over fields mixes them


class ExportedMasked(nn.Module):
    """Captured through torch.export (``len()``): per-feature embeddings masked by ``ids != 0``
    (``aten.ne.Scalar``), stacked into [B, 1, 4E] and flattened with ``view(-1, 4E)``."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.mlp = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, user_ids, item_ids):
        assert len(user_ids) > 0
        ids = torch.stack([user_ids[:, 0], item_ids[:, 0], user_ids[:, 1], item_ids[:, 1]], dim=1)
        e = self.emb(ids) * (ids != 0).unsqueeze(-1).to(torch.float32)  # [B, 4, 8]
        return self.mlp(torch.cat(e.unbind(1), dim=-1).unsqueeze(1).view(-1, 32)).squeeze(-1)


def test_export_fallback_keeps_field_elements():
    model = ExportedMasked().eval()
    pairs = own_cases()[0].pairs  # ids of 2 user and 2 item fields (+ unused dense)
    ex, _ = pairs(2, 6, 1)
    T = mari_fx.transform(model, ["user_ids"], ex[:2])
    assert T.meta["mari_fx.record"].capture == "torch.export"
    assert [(l.name, l.split_user_features) for l in T.meta["mari_fx.record"].layers if l.action == "split"] == [
        ("linear", 16)]
    for U, N in [(1, 1), (3, 300)]:
        args, idx = pairs(U, N, seed=N)
        with torch.no_grad():
            torch.testing.assert_close(T(**mari_fx.pairs_to_request(T, *args[:2], user_index=idx)), model(*args[:2]))
    args, idx = pairs(5, 120, seed=3)
    assert realised(model, T, args[:2], idx) >= 0.9


def _dlrm_hand_flops(U: int, N: int) -> int:
    """DLRM (tests' sizes) rewritten by hand: dense arch split (4 user columns), the user x user
    Gram block at U rows, the rows of the 3 non-user fields (dense, item_id, item_cat) against all
    5 fields at N rows, over-arch split (1 user pair product)."""
    D, F, Fu = E_DIM, 5, 2
    dense = 2 * 16 * 4 * (U + N) + 2 * N * 16 * 8
    gram = 2 * U * Fu * Fu * D + 2 * N * (F - Fu) * F * D
    over = 2 * 32 * (U * 1 + N * 17) + 2 * N * 32
    return dense + gram + over


E_DIM = 8


def test_dlrm_interaction_flops_are_the_hand_written_minimum():
    model, T = transformed(CASES["DLRM"])
    bmms = [n for n in T.graph.nodes if n.target is torch.bmm]
    assert sorted(n.meta[ROWS_KEY] for n in bmms) == ["N", "U"]  # no full-size Gram matrix, at any level
    for U, N in [(1, 1000), (3, 300)]:
        args, idx = CASES["DLRM"].pairs(U, N, seed=N)
        request = mari_fx.pairs_to_request(T, *args, user_index=idx)
        assert mari_fx.count_flops(T, **request) == _dlrm_hand_flops(U, N)
        # the pair model: the same layers at N rows and the full 5 x 5 Gram matrix
        assert mari_fx.count_flops(model, *args) == _dlrm_hand_flops(N, N) + 2 * N * (2 * 5 - 2 * 2) * E_DIM


class ExportedGram(nn.Module):
    """Captured through torch.export: fields [u0, i0, u1, i1] stacked, their Gram matrix's
    triu pairs (``aten.index.Tensor`` after an all-rows slice) next to the flattened fields."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        iu, ju = torch.triu_indices(4, 4, offset=1)
        self.register_buffer("iu", iu)
        self.register_buffer("ju", ju)
        self.mlp = nn.Sequential(nn.Linear(32 + 6, 16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, user_ids, item_ids):
        assert len(user_ids) > 0
        X = self.emb(torch.stack([user_ids[:, 0], item_ids[:, 0], user_ids[:, 1], item_ids[:, 1]], dim=1))
        p = torch.bmm(X, X.transpose(1, 2))[:, self.iu, self.ju]
        return self.mlp(torch.cat([X.flatten(1), p], dim=1)).squeeze(-1)


def test_exported_gram_gather_splits_its_user_pairs():
    model = ExportedGram().eval()
    pairs = own_cases()[0].pairs
    T = mari_fx.transform(model, ["user_ids"], pairs(2, 6, 1)[0][:2])
    assert T.meta["mari_fx.record"].capture == "torch.export"
    # 2 user fields x 8 + the one user x user pair (u0 . u1)
    assert [(l.name, l.split_user_features) for l in T.meta["mari_fx.record"].layers if l.action == "split"] == [
        ("linear", 17)]
    bmms = [n for n in T.graph.nodes if n.target in (torch.bmm, torch.ops.aten.bmm.default)]
    assert sorted(n.meta[ROWS_KEY] for n in bmms) == ["N", "U"]
    for U, N in [(1, 1), (3, 300)]:
        args, idx = pairs(U, N, seed=N)
        with torch.no_grad():
            got, want = T(**mari_fx.pairs_to_request(T, *args[:2], user_index=idx)), model(*args[:2])
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want)
    args, idx = pairs(5, 120, seed=3)
    assert realised(model, T, args[:2], idx) >= 1.0  # the Gram matrix's user rows are saved too
    # aten.index.Tensor has no tag rule (MIXED), but its element map kept the u0 . u1 pair: not a loss
    record = T.meta["mari_fx.record"]
    assert [r.node for r in record.refused] == []
    (kept,) = record.recovered
    assert kept.node == "index" and "elements[user:1, item:1, mixed:4]" in kept.reason


def test_report_does_not_claim_recovered_ops_as_losses():
    """SimpleDeepFMNN's fx.wrap-ed _get_flatten_input has no tag rule; the element map traces through it.
    Its deep-FM call feeds a split Linear, whose user columns it computes at U rows: recovered, not a
    loss. Its FM call feeds the FM's sums, which run at N rows: still a refusal."""
    from mari_fx.cli import format_report
    from mari_fx.report import build_report

    case = CASES["SimpleDeepFMNN"]
    model, T = transformed(case)
    record = T.meta["mari_fx.record"]
    assert [(r.node, r.location) for r in record.refused] == [("_get_flatten_input_1", "inter_arch.fm")]
    (kept,) = record.recovered
    assert (kept.node, kept.location) == ("_get_flatten_input", "inter_arch.deep_fm")
    assert "elements[user:16, item:16, mixed:8]" in kept.reason
    data = build_report(model, T, candidates=8)
    assert [r["node"] for r in data["refused"]] == ["_get_flatten_input_1"]
    assert [r["node"] for r in data["recovered"]] == ["_get_flatten_input"]
    text = format_report(data)
    assert "not a loss): _get_flatten_input (" in text
    blocked = text.split("ops that blocked a rewrite")[1].split("not a loss")[0]
    rows = [l.split()[0] for l in blocked.splitlines()[3:] if l.strip()]  # the table's node column
    assert rows[:1] == ["_get_flatten_input_1"] and "_get_flatten_input" not in rows


@pytest.mark.parametrize("style", ["view", "reshape"])
def test_batch_fold_is_sunk_past_the_row_wise_mlp(style):
    """``att(x.view(-1, 4E)).view(B, L)``: the attention MLP runs on [B, L, .] rows (the fold and
    unfold cancel), its first Linear splits: k at U rows ([U, L, E]), q once per candidate
    before the expand ([N, 1, E]), q - k and q * k at N rows unless reassociate=True folds q - k."""
    case = CASES[f"target_attention_{style}"]
    model = case.build()
    ex = case.pairs(2, 6, 1)[0]
    tagged = mari_fx.trace(model, case.selectors, ex)
    unfolded = [n.target for n in tagged.graph.nodes if n.meta.get("mari_fx.unfolded") not in (None, "refold")]
    assert unfolded[:3] == ["att.0", "att.1", "att.2"]
    # reassociate: W_k k + W_d (q - k) = (W_k - W_d) k + W_d q -- one block per source (k, q, q * k)
    for reassociate, user_cols, item_cols in [(False, 8, 16), (True, 8, 8)]:
        T = mari_fx.transform(model, case.selectors, ex, reassociate=reassociate)
        (att,) = [n for n in T.graph.nodes if n.target == "att.0"]
        user, item, _, bcast = att.args
        assert user.meta[ROWS_KEY] == "U" and item.meta[ROWS_KEY] == "N" and bcast.meta[ROWS_KEY] == "N"
        mod = T.get_submodule("att.0")
        assert (mod.weight_user.shape[1], mod.weight_item.shape[1], mod.weight_broadcast.shape[1]) == (
            user_cols, item_cols, 8)
        for U, N in [(1, 1), (1, 300), (3, 300), (3, 3)]:
            args, idx = case.pairs(U, N, seed=U + N)
            with torch.no_grad():
                got, want = T(**mari_fx.pairs_to_request(T, *args, user_index=idx)), model(*args)
            assert got.dtype == want.dtype
            torch.testing.assert_close(got, want)
        args, idx = case.pairs(5, 120, seed=3)
        assert realised(model, T, args, idx) >= 0.9


class NotRowWise(nn.Module):
    """Folds whose readers mix rows: a softmax over the folded rows, a sum over all of them."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 4)
        self.lin = nn.Linear(4, 1)

    def forward(self, user_ids, item_ids):
        B, L = user_ids.shape
        x = self.emb(user_ids) * self.emb(item_ids)  # [B, L, 4]
        f = x.reshape(B * L, 4)
        a = torch.softmax(self.lin(f), dim=0).view(B, L)  # across rows: the fold stays
        b = self.lin(f).relu()  # row-wise ...
        return a + b.sum() + b.view(B, L)  # ... but summed over all rows: refolded for the sum


def test_fold_readers_that_mix_rows_see_the_folded_value():
    model = NotRowWise().eval()
    idx = torch.tensor([0, 0, 1, 1, 1])
    ex = (torch.randint(50, (2, 3))[idx], torch.randint(50, (5, 3)))
    tagged = mari_fx.trace(model, ["user_ids"], ex)
    marks = {n.name: n.meta.get("mari_fx.unfolded") for n in tagged.graph.nodes}
    assert marks.get("softmax") is None and marks["relu"] == "reshape" and marks["flatten"] == "refold"
    T = mari_fx.transform(model, ["user_ids"], ex)
    for U, N in [(1, 1), (3, 7)]:
        idx = torch.arange(N) % U
        u, i = torch.randint(50, (U, 3)), torch.randint(50, (N, 3))
        with torch.no_grad():
            torch.testing.assert_close(T(user_ids=u, item_ids=i, user_index=idx), model(u[idx], i))


def test_chained_split_reads_the_upstream_split_at_u_rows():
    """field_cross_stack: mlp.0's U-row cone passes through c0, already a SplitLinear: it runs
    F.linear on the U-row cone with the split's own blocks (so mari_fx.refresh keeps it current)."""
    case = CASES["field_cross_stack"]
    model, T = transformed(case)
    at_u = [n for n in T.graph.nodes if n.target is torch.nn.functional.linear and n.meta.get(ROWS_KEY) == "U"]
    assert sorted(n.args[1].target for n in at_u) == ["c0.weight_item", "c0.weight_user"]
    with torch.no_grad():
        model.c0.weight.mul_(1.5)
    mari_fx.refresh(T, model)
    args, idx = case.pairs(3, 300, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(T(**mari_fx.pairs_to_request(T, *args, user_index=idx)), model(*args))
    _T.pop(case.name)  # the model changed


def test_field_split_layers_refresh():
    """A field split records its weight columns (SplitSource): refresh re-derives its blocks."""
    case = CASES["per_feature_cat1_flatten"]
    model = case.build()
    T = mari_fx.transform(model, case.selectors, case.pairs(2, 6, 1)[0])
    with torch.no_grad():
        model.mlp[0].weight.mul_(-2)
    mari_fx.refresh(T, model)
    args, idx = case.pairs(3, 30, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(T(**mari_fx.pairs_to_request(T, *args, user_index=idx)), model(*args))


class FoldVariants(nn.Module):
    """Folds written every way: F.linear and ``@`` on a 2-d fold, a reshape of a non-contiguous
    tensor read by an elementwise op and a ``view`` exit, squeeze / unsqueeze of trailing dims,
    a size read of a region value, and the folded value as an output."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 4)
        self.w = nn.Parameter(torch.randn(3, 8) * 0.3)
        self.b = nn.Parameter(torch.randn(3) * 0.1)
        self.m = nn.Parameter(torch.randn(3, 1) * 0.3)

    def forward(self, user_ids, item_ids):
        B, L = user_ids.shape
        k, q = self.emb(user_ids), self.emb(item_ids[:, :1]).expand(-1, L, -1)
        x = torch.cat([k, q], dim=-1)  # [B, L, 8]
        h = torch.nn.functional.linear(x.reshape(-1, 8), self.w, self.b).relu()  # [B * L, 3]
        s = (h @ self.m).squeeze(-1).unsqueeze(-1) * 2  # [B * L, 1]
        xt = x.transpose(1, 2).transpose(1, 2).transpose(0, 0)  # same layout, via views
        y = torch.sigmoid(x.permute(0, 2, 1).reshape(B, 8, L).transpose(1, 2).reshape(B * L, 8))
        n = h.size(0)  # a size read of a region value: the folded count
        return s.view(B, L).sum(1) + y.view(B, L, 8).mean((1, 2)) * n / (B * L) + xt.sum((1, 2)), h


def test_fold_variants_are_exact():
    model = FoldVariants().eval()
    idx = torch.tensor([0, 0, 1, 1, 1, 1])
    ex = (torch.randint(50, (2, 5))[idx], torch.randint(50, (6, 1)))
    tagged = mari_fx.trace(model, ["user_ids"], ex)
    marked = {n.name for n in tagged.graph.nodes if n.meta.get("mari_fx.unfolded") not in (None, "refold")}
    assert {"linear", "relu", "matmul", "squeeze", "unsqueeze", "mul", "sigmoid"} <= marked
    T = mari_fx.transform(model, ["user_ids"], ex)
    assert T.meta["mari_fx.record"].split_layers == ("linear",)  # k's columns at U * L rows
    for U, N in [(1, 1), (3, 7), (3, 300)]:
        idx = torch.arange(N) % U
        u, i = torch.randint(50, (U, 5)), torch.randint(50, (N, 1))
        with torch.no_grad():
            got, want = T(user_ids=u, item_ids=i, user_index=idx), model(u[idx], i)
        for g, w in zip(got, want):
            assert g.shape == w.shape and g.dtype == w.dtype
            torch.testing.assert_close(g, w)


class FoldedSizeRead(nn.Module):
    """``h.size(0)`` of a folded ``[B * L, 3]`` tensor is B * L, not the batch size (main returned
    ``h.sum() / N`` here: a silent wrong answer)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 4)
        self.lin = nn.Linear(8, 3)

    def forward(self, user_ids, item_ids):
        B, L = user_ids.shape
        x = torch.cat([self.emb(user_ids), self.emb(item_ids[:, :1]).expand(-1, L, -1)], -1)
        h = self.lin(x.reshape(-1, 8))
        return h.sum() / h.size(0) + h.view(B, L, 3).sum((1, 2))


def test_size_of_a_folded_tensor_is_not_a_batch_size():
    model = FoldedSizeRead().eval()
    idx = torch.tensor([0, 0, 1, 1, 1, 1])
    T = mari_fx.transform(model, ["user_ids"], (torch.randint(50, (2, 5))[idx], torch.randint(50, (6, 1))))
    u, i, idx = torch.randint(50, (2, 5)), torch.randint(50, (3, 1)), torch.tensor([0, 1, 1])
    with torch.no_grad():
        torch.testing.assert_close(T(user_ids=u, item_ids=i, user_index=idx), model(u[idx], i))


class MaskedSelectBroadcast(nn.Module):
    """A mask that broadcasts over more than the batch ([F] against [B, F, F]) or depends on the
    request: not a per-row pick, so masked_select stays as written (and is computed at N rows)."""

    def __init__(self, per_request: bool):
        super().__init__()
        self.per_request = per_request
        self.register_buffer("keep", torch.tensor([True, False, True]))
        self.lin = nn.Linear(6, 1)

    def forward(self, u, i):
        g = torch.bmm(u, i.transpose(1, 2)) + u.sum(2, keepdim=True)  # [B, 3, 3]
        m = (u.sum(2, keepdim=True) > 0).expand(-1, -1, 3) if self.per_request else self.keep
        picked = torch.masked_select(g, m)
        return picked.sum() + self.lin(torch.masked_select(g, self.keep).view(-1, 6))


@pytest.mark.parametrize("per_request", [False, True])
def test_masked_select_is_rewritten_only_for_a_per_row_mask(per_request):
    model = MaskedSelectBroadcast(per_request).eval()
    u, i, idx = torch.randn(3, 3, 4), torch.randn(7, 3, 4), torch.tensor([0, 2, 1, 1, 0, 2, 2])
    T = mari_fx.transform(model, ["u"], (u[idx[:4]], i[:4]))
    assert "masked_select" in T.code  # the [F] mask against [B, F, F] broadcasts over the rows too
    with torch.no_grad():
        torch.testing.assert_close(T(u=u, i=i, user_index=idx), model(u[idx], i))


def test_control_masked_select_with_a_broadcasting_mask_read_per_row(monkeypatch):
    """Positive control: with the mask-shape guard off, the [F] mask is read as ``g[:, keep]`` (rows of
    each sample, not columns) and the lossless check above sees a wrong answer."""
    from mari_fx.analysis import folds

    monkeypatch.setattr(folds, "_per_row_mask", lambda x, m: m.dtype == torch.bool)
    model = MaskedSelectBroadcast(False).eval()
    u, i, idx = torch.randn(3, 3, 4), torch.randn(7, 3, 4), torch.tensor([0, 2, 1, 1, 0, 2, 2])
    T = mari_fx.transform(model, ["u"], (u[idx[:4]], i[:4]))
    with torch.no_grad():
        assert not torch.allclose(T(u=u, i=i, user_index=idx), model(u[idx], i))


class ColumnPick(nn.Module):
    """Columns of ``cat([u, i])`` picked (and reordered) by a constant index: method and function form."""

    def __init__(self, method: bool):
        super().__init__()
        self.method = method
        self.register_buffer("order", torch.tensor([9, 0, 1, 7, 2, 3, 4, 5, 8, 6]))
        self.lin = nn.Linear(10, 3)

    def forward(self, u, i):
        x = torch.cat([u, i], 1)
        picked = x.index_select(1, self.order) if self.method else torch.index_select(x, 1, self.order)
        return self.lin(picked)


@pytest.mark.parametrize("method", [True, False])
def test_columns_picked_by_index_select_keep_their_sides(method):
    model = ColumnPick(method).eval()
    u, i, idx = torch.randn(3, 6), torch.randn(8, 4), torch.tensor([0, 2, 1, 1, 0, 2, 2, 0])
    T = mari_fx.transform(model, ["u"], (u[idx[:4]], i[:4]), cost_model=False)
    (layer,) = T.meta["mari_fx.record"].layers
    assert layer.action == "split" and layer.split_user_features == 6, layer  # u's 6 columns, wherever they went
    with torch.no_grad():
        torch.testing.assert_close(T(u=u, i=i, user_index=idx), model(u[idx], i))


class BatchNormOverFields(nn.Module):
    """Input BatchNorm over user and item columns, and over a field stack (channels = fields): in
    eval mode an affine map per channel, so each element keeps its side; ``train_stats`` normalises
    the stack with batch statistics (rows coupled) instead."""

    def __init__(self, train_stats: bool = False):
        super().__init__()
        self.train_stats = train_stats
        self.bn_cols, self.bn_fields = nn.BatchNorm1d(7), nn.BatchNorm1d(2)
        for bn in (self.bn_cols, self.bn_fields):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
        self.cols, self.fields = nn.Linear(7, 5), nn.Linear(6, 5)

    def forward(self, u, i):
        stack = torch.stack([u[:, :3], i[:, :3]], 1)  # [B, 2 fields, 3]
        if self.train_stats:
            normed = nn.functional.batch_norm(stack, None, None, training=True)
        else:
            normed = self.bn_fields(stack)
        return self.cols(self.bn_cols(torch.cat([u, i], 1))) + self.fields(normed.flatten(1))


def _bn_case(train_stats):
    model = BatchNormOverFields(train_stats).eval()
    idx = torch.tensor([0, 1, 1, 2, 0, 2, 2, 2])
    u, i = torch.randn(3, 4), torch.randn(8, 3)
    T = mari_fx.transform(model, ["u"], (u[idx], i), cost_model=False)
    ok = torch.allclose(T(u=u, i=i, user_index=idx), model(u[idx], i), atol=1e-5)
    return {l.name: l for l in T.meta["mari_fx.record"].layers}, ok


def test_batch_norm_in_eval_mode_keeps_element_sides():
    layers, ok = _bn_case(train_stats=False)
    assert ok
    assert layers["cols"].action == "split" and layers["cols"].split_user_features == 4, layers["cols"]
    assert layers["fields"].action == "split" and layers["fields"].split_user_features == 3, layers["fields"]
    layers, ok = _bn_case(train_stats=True)  # batch statistics: the stack's elements are mixed
    assert ok and layers["fields"].action == "kept", layers["fields"]


def test_control_batch_norm_elements_ignoring_the_training_flag(monkeypatch):
    """Positive control: element maps of BatchNorm that ignore the training flag compute the
    user field of the batch-statistics stack per user: a wrong answer."""
    from mari_fx.analysis import elements

    kinds = [(k, elements._elementwise if fn is elements._batch_norm_eval else fn) for k, fn in elements._KINDS]
    monkeypatch.setattr(elements, "_KINDS", kinds)
    assert not _bn_case(train_stats=True)[1]
