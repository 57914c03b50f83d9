"""Hand-written red-team probes: code real ranking models contain, next to user and item data.

Every probe must come out of ``mari_fx.transform`` exact on ragged, shuffled requests (U in
1..4, a user's candidates scattered) or be refused with a :class:`MariError`; the model's
parameters, buffers, modules and hooks are never changed.  Half of the probes also run
through the torch.export capture (a Python loop over a size makes torch.fx fail).  The
positive control tags batch reductions and reorderings row-wise and shows that the probes
then find a wrong answer.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mari_fx
from mari_fx.analysis.rules import RULES, rowwise
from mari_fx.errors import MariError

DU, DI = 6, 5


class Probe(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body
        self.lu, self.li, self.lf = nn.Linear(DU, 8), nn.Linear(DI, 8), nn.Linear(DU + DI, 4)
        self.emb = nn.Embedding(1000, 4)
        self.register_buffer("buf", torch.randn(DU))

    def forward(self, u, uid, i, iid):
        return self.body(self, u, uid, i, iid)


def untraceable(h):
    """1.0 per row, through a Python loop over a size: torch.fx cannot trace it (export can)."""
    return sum(h[:, k:k + 1] * 0.0 for k in range(h.shape[1])) + 1.0


def _setitem(s, u, uid, i, iid):
    x = u.clone()
    x[:, 0] = i[:, 0]
    return s.lf(torch.cat([x, i], 1))


def _inplace_add(s, u, uid, i, iid):
    h = s.lu(u)
    h.add_(s.li(i))
    return h + s.lu(u)


def _view_relu_(s, u, uid, i, iid):
    h = s.lu(u)
    h.view(-1, 8).relu_()
    return h * s.li(i)


def _index_add_(s, u, uid, i, iid):
    h = s.lu(u).clone()
    h.index_add_(0, iid % h.shape[0], s.li(i))
    return h


def _masked_fill_(s, u, uid, i, iid):
    h = s.lu(u)
    h.masked_fill_(s.li(i) > 0, 0.0)
    return s.lu(u) + h


PROBES = {
    # in-place writes
    "setitem_item_into_user": _setitem,
    "add_item_into_user": _inplace_add,
    "relu_through_a_view": _view_relu_,
    "index_add_by_item_ids": _index_add_,
    "masked_fill_by_item": _masked_fill_,
    "data_write": lambda s, u, uid, i, iid: s.lu(u).data.add_(1.0) + s.li(i),
    # the batch size as a value
    "times_batch_size": lambda s, u, uid, i, iid: s.lf(torch.cat([u, i], 1)) * u.shape[0],
    "over_len": lambda s, u, uid, i, iid: s.lu(u) / len(u) + s.li(i),
    "arange_rows": lambda s, u, uid, i, iid: s.lu(u) + torch.arange(u.size(0)).float()[:, None] + s.li(i),
    "full_of_batch_size": lambda s, u, uid, i, iid: s.li(i) + torch.full((u.shape[0], 1), float(u.shape[0])),
    "buffer_expanded_to_rows": lambda s, u, uid, i, iid: s.lf(torch.cat([u * s.buf.expand(u.size(0), -1), i], 1)),
    "buffer_repeated_to_rows": lambda s, u, uid, i, iid: s.lf(torch.cat([u + s.buf.repeat(u.size(0), 1), i], 1)),
    "two_rows_repeated_and_cut": lambda s, u, uid, i, iid: s.lf(torch.cat(
        [u * s.buf.view(2, 3).repeat(u.size(0), 2)[: u.size(0)], i], 1)),
    "half_split_rows": lambda s, u, uid, i, iid: torch.cat([s.lu(u)[: len(u) // 2], s.lu(u)[len(u) // 2:]]) + s.li(i),
    # integer feature crosses (int64 and int32 overflow, shifts, floor division)
    "hash_cross": lambda s, u, uid, i, iid: s.emb((uid * 31 + iid) % 1000) + s.lu(u)[:, :4],
    "int32_overflow_cross": lambda s, u, uid, i, iid: s.emb(
        (uid.int() * 2000000003 + iid.int()).remainder(1000).long()),
    "int64_lcg_cross": lambda s, u, uid, i, iid: s.emb(
        ((uid * 6364136223846793005 + iid * 1442695040888963407) >> 33).abs() % 1000),
    "xor_shift_cross": lambda s, u, uid, i, iid: s.emb(((uid << 3) ^ iid) % 1000),
    "floor_div_cross": lambda s, u, uid, i, iid: s.emb(torch.div(uid * 7 + iid, 3, rounding_mode="floor") % 1000),
    # reductions and reorderings over the batch
    "minus_batch_mean": lambda s, u, uid, i, iid: s.lu(u) - s.lu(u).mean(0, keepdim=True) + s.li(i),
    "softmax_over_batch": lambda s, u, uid, i, iid: torch.softmax(s.lu(u), 0) + s.li(i),
    "cumsum_over_batch": lambda s, u, uid, i, iid: torch.cumsum(s.lu(u), 0) + s.li(i),
    "flip_batch": lambda s, u, uid, i, iid: s.lu(u).flip(0) + s.li(i),
    "first_row": lambda s, u, uid, i, iid: s.lu(u)[0:1] + s.li(i),
    "gather_rows_by_item": lambda s, u, uid, i, iid: s.lu(u)[iid % len(u)] + s.li(i),
    "bincount_of_ids": lambda s, u, uid, i, iid: torch.bincount(uid % 7, minlength=7).float() + s.li(i)[:, :7],
    # batched tensors where weights go
    "batch_gram_weight": lambda s, u, uid, i, iid: s.lf(torch.cat([u @ (u.t() @ u), i], 1)),
    "rows_as_linear_weight": lambda s, u, uid, i, iid: F.linear(i, u[:, :DI]),
    "rows_as_embedding_table": lambda s, u, uid, i, iid: F.embedding(iid % len(u), s.lu(u)) + s.li(i),
    "row_as_layer_norm_weight": lambda s, u, uid, i, iid: F.layer_norm(s.li(i), (8,), weight=s.lu(u)[0]),
    "outer_over_batch": lambda s, u, uid, i, iid: torch.einsum("bi,cj->bj", s.lu(u), s.li(i)),
    # the same hazards through the torch.export capture
    "export_times_batch_size": lambda s, u, uid, i, iid: s.lf(torch.cat([u, i], 1)) * untraceable(u) * u.shape[0],
    "export_add_item_into_user": lambda s, u, uid, i, iid: _inplace_add(s, u * untraceable(u), uid, i, iid),
    "export_setitem": lambda s, u, uid, i, iid: _setitem(s, u * untraceable(i), uid, i, iid),
    "export_minus_batch_mean": lambda s, u, uid, i, iid: (s.lu(u) * untraceable(u)).mean(0) - s.lu(u) + s.li(i),
    "export_first_row": lambda s, u, uid, i, iid: s.lu(u * untraceable(u))[0:1] + s.li(i),
    "export_rows_as_weight": lambda s, u, uid, i, iid: F.linear(i * untraceable(i), u[:, :DI]),
    "export_split": lambda s, u, uid, i, iid: s.lf(torch.cat([u * untraceable(u), i], 1)),
}

REORDERING = ("minus_batch_mean", "softmax_over_batch", "cumsum_over_batch", "flip_batch")


def _pairs(U, N, seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.cat([torch.arange(U), torch.randint(0, U, (N - U,), generator=g)])[torch.randperm(N, generator=g)]
    u, uid = torch.randn(U, DU, generator=g), torch.randint(0, 50, (U,), generator=g)
    i, iid = torch.randn(N, DI, generator=g), torch.randint(0, 50, (N,), generator=g)
    return (u[idx], uid[idx], i, iid), idx


def _state(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: (type(m), m.training, len(m._forward_hooks), len(m._forward_pre_hooks))
             for n, m in model.named_modules()})


def verdict(name):
    """'exact', 'refused' or the first wrong request, for probe ``name``."""
    torch.manual_seed(0)
    model = Probe(PROBES[name]).eval()
    before = _state(model)
    try:
        T = mari_fx.transform(model, ["u", "uid"], _pairs(3, 8, 0)[0])
    except MariError:
        return "refused"
    finally:
        after = _state(model)
        assert after[1] == before[1], f"{name}: transform changed the model's modules"
        assert all(torch.equal(after[0][k], v) for k, v in before[0].items()), f"{name}: transform wrote the model"
    for seed in range(2):
        for U, N in ((1, 5), (3, 9), (4, 4), (2, 7)):
            pairs, idx = _pairs(U, N, seed + 10)
            with torch.no_grad():
                want = model(*pairs)
                got = T(**mari_fx.pairs_to_request(T, *pairs, user_index=idx))
            if (got.shape != want.shape or got.dtype != want.dtype
                    or not torch.allclose(got, want, rtol=1e-5, atol=1e-5)):
                return f"wrong at U={U} N={N}"
    return "exact"


@pytest.mark.parametrize("name", sorted(PROBES))
def test_probe_is_exact_or_refused(name):
    assert verdict(name) in ("exact", "refused")


def test_probes_split_and_hoist_where_they_can():
    """The probes are not passed by refusing everything: the plain split is split (on both capture
    routes) and a user-only subgraph beside a batch hazard still runs at U rows."""
    for name in ("export_split", "hash_cross"):
        model = Probe(PROBES[name]).eval()
        T = mari_fx.transform(model, ["u", "uid"], _pairs(3, 8, 0)[0], cost_model=False)
        record = T.meta["mari_fx.record"]
        if name == "export_split":
            assert record.capture == "torch.export" and record.split_layers == ("linear",)
        else:
            assert any(n.meta.get("mari_fx.rows") == "U" and n.op == "call_module" for n in T.graph.nodes)


def test_batch_free_tensor_broadcast_to_rows_stays_user_side():
    """``buf.expand(B, -1)`` / ``buf.repeat(B, 1)`` (a learned context per sample) is the same row for
    every pair: built at U rows, so the Linear over ``u * ctx`` still splits on u's columns."""
    for name in ("buffer_expanded_to_rows", "buffer_repeated_to_rows"):
        model = Probe(PROBES[name]).eval()
        T = mari_fx.transform(model, ["u", "uid"], _pairs(3, 8, 0)[0], cost_model=False)
        (layer,) = T.meta["mari_fx.record"].layers  # lf (captured by torch.export: "linear")
        assert layer.action == "split" and layer.split_user_features == DU, layer
        broadcast = [n for n in T.graph.nodes if n.target in (
            "expand", "repeat", torch.ops.aten.expand.default, torch.ops.aten.repeat.default)]
        assert broadcast and all(n.meta["mari_fx.rows"] == "U" for n in broadcast)


def test_control_batch_reorderings_tagged_rowwise(monkeypatch):
    """Positive control: with mean / softmax / cumsum / flip over the batch tagged row-wise, the
    probes see wrong answers (so they would catch such a rule)."""
    for t in ("mean", torch.mean, torch.softmax, "softmax", torch.cumsum, "cumsum", torch.flip, "flip"):
        monkeypatch.setitem(RULES, t, rowwise)
    verdicts = {n: verdict(n) for n in REORDERING}
    assert all(v.startswith("wrong") for v in verdicts.values()), verdicts


RANDOM = {
    "randn_like_of_user": lambda s, u, uid, i, iid: s.lu(u) + torch.randn_like(s.lu(u)) + s.li(i),
    "rand_rows_by_batch_size": lambda s, u, uid, i, iid: s.lu(u) * torch.rand(u.shape[0], 1) + s.li(i),
    "bernoulli_of_user": lambda s, u, uid, i, iid: torch.bernoulli(torch.sigmoid(s.lu(u))) + s.li(i),
    "dropout_training_true": lambda s, u, uid, i, iid: F.dropout(s.lu(u), 0.5, training=True) + s.li(i),
}


@pytest.mark.parametrize("name", sorted(RANDOM))
def test_random_ops_draw_per_pair(name):
    """A random op over user data is never hoisted (a user's pairs would share one draw): it runs at
    N rows, so with the same seed T draws exactly what the model draws."""
    torch.manual_seed(0)
    model = Probe(RANDOM[name]).eval()
    T = mari_fx.transform(model, ["u", "uid"], _pairs(3, 8, 0)[0])
    for U, N in ((1, 5), (3, 9)):
        pairs, idx = _pairs(U, N, 4)
        with torch.no_grad():
            torch.manual_seed(7)
            want = model(*pairs)
            torch.manual_seed(7)
            got = T(**mari_fx.pairs_to_request(T, *pairs, user_index=idx))
        torch.testing.assert_close(got, want)
    draws = [n for n in T.graph.nodes if getattr(n.target, "__name__", n.target) in (
        "randn_like", "rand", "bernoulli", "dropout", "randn_like.default", "rand.default", "bernoulli.default",
        "dropout.default")]
    assert draws and all(n.meta["mari_fx.rows"] == "N" for n in draws), [(n.target, n.meta.get("mari_fx.rows")) for n in draws]


@pytest.mark.parametrize("how", ["view_as", "reshape_as"])
def test_batch_free_tensor_shaped_like_the_batch_stays_batch_free(how):
    """``table.view_as(u)`` of a parameter whose dim 0 equals the example's batch size (8): the model
    only runs at that batch size, its rows pairing with pairs by position.  Read as row-wise it was
    built per user and gathered, a silent wrong answer once 8 users came with a pair each."""
    def body(s, u, uid, i, iid):
        table = s.lf.weight[:, :DU].repeat(2, 1)  # [8, 6]
        return s.li(i) + getattr(table, how)(u).sum(1, keepdim=True)

    model = Probe(body).eval()
    T = mari_fx.transform(model, ["u", "uid"], _pairs(3, 8, 0)[0])
    pairs, idx = _pairs(8, 8, 5)  # one pair per user, in shuffled order
    with torch.no_grad():
        torch.testing.assert_close(T(**mari_fx.pairs_to_request(T, *pairs, user_index=idx)), model(*pairs))
