"""Soundness of the op rules (issue 9, causes 5 and 7): arguments are read by name, every tensor
argument is checked (only an op's per-row data operands may depend on the batch), ops whose batch
semantics differ by arity are told apart, and the rules and lowerings agree on column pieces."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mari_fx
from mari_fx.analysis.arguments import bind
from mari_fx.analysis.tags import NOTE_KEY, ROWS_KEY, TAG_KEY, Side

from helpers import ragged_index

# U users, N >= U candidates, every user with >= 1 candidate (ragged lists)
SIZES = [(u, n) for u in (1, 2, 3, 4) for n in (1, 2, 5, 7) if n >= u]
EXAMPLE_INDEX = torch.tensor([0, 0, 1, 2, 2, 3, 1])


class Fn(nn.Module):
    """A pair-shaped model ``fn(self, u, uid, i)``: user features ``u`` [B, 8], user ids ``uid``
    [B] (int64, < 4) and item features ``i`` [B, 4], with a few parameters to use."""

    def __init__(self, fn, **modules):
        super().__init__()
        self.fn = fn
        self.lin = nn.Linear(8, 8)
        self.head = nn.Linear(12, 1)
        self.head8 = nn.Linear(8, 1)
        self.head6 = nn.Linear(6, 1)
        self.w = nn.Parameter(torch.randn(8, 8) / 3)
        self.w3 = nn.Parameter(torch.randn(2, 8, 8) / 3)
        self.table = nn.Parameter(torch.randn(4, 8))
        self.vec = nn.Parameter(torch.randn(8))
        for k, m in modules.items():
            setattr(self, k, m)

    def forward(self, u, uid, i):
        return self.fn(self, u, uid, i)


def _inputs(users, rows):
    g = torch.Generator().manual_seed(users * 100 + rows)
    return torch.randn(users, 8, generator=g), torch.randint(0, 4, (users,), generator=g), torch.randn(rows, 4, generator=g)


def _assert_same(got, want):
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, equal_nan=True)
    elif isinstance(want, (tuple, list)):
        assert type(got) is type(want) and len(got) == len(want)
        for g, w in zip(got, want):
            _assert_same(g, w)
    elif isinstance(want, dict):
        assert list(got) == list(want)
        for k in want:
            _assert_same(got[k], want[k])
    else:
        assert got == want


def check(fn, **modules):
    """Transform, then check equivalence with the pair model at every size; returns
    ``(T, tagged pair graph)``."""
    model = Fn(fn, **modules).eval()
    u, uid, _ = _inputs(4, 0)
    example = (u[EXAMPLE_INDEX], uid[EXAMPLE_INDEX], torch.randn(len(EXAMPLE_INDEX), 4))
    # tiny layers: the cost model would keep some splits that these tests check the rewrite of
    T = mari_fx.transform(model, ["u", "uid"], example, cost_model=False)
    T.graph.lint()
    for users, rows in SIZES:
        u, uid, i = _inputs(users, rows)
        idx = ragged_index(users, rows)
        want = model(u[idx], uid[idx], i)
        got = T(**mari_fx.pairs_to_request(T, u[idx], uid[idx], i, user_index=idx))
        _assert_same(got, want)
    return T, mari_fx.trace(model, ["u", "uid"], example)


def node(gm, name):
    (n,) = [n for n in gm.graph.nodes if n.name == name]
    return n


def assert_refused(gm, name, reason):
    n = node(gm, name)
    assert n.meta[TAG_KEY].side == Side.MIXED
    assert reason in n.meta[NOTE_KEY], n.meta[NOTE_KEY]


def assert_user(gm, name):
    n = node(gm, name)
    assert n.meta[TAG_KEY].side == Side.USER and NOTE_KEY not in n.meta


def rows_of(T, name):
    """Rows a node of the transformed graph runs at ("U", "N" or "C")."""
    return node(T, name).meta[ROWS_KEY]


# --------------------------------------------------------------------------- arguments by name
def test_bind_reads_methods_functions_and_modules_alike():
    def fn(s, u, uid, i):
        return (u.norm(2, 0), torch.norm(u, p=2, dim=1), u.std(1, True), u.narrow(1, start=2, length=3),
                u.where(u > 0, i[:, :1]), s.lin(input=u))

    gm = mari_fx.trace(Fn(fn).eval(), ["u", "uid"], _inputs(3, 3)).graph
    got = {n.name: bind(n, Fn(fn).lin if n.op == "call_module" else None) for n in gm.nodes
           if n.op in ("call_method", "call_function", "call_module")}
    assert (got["norm"]["p"], got["norm"]["dim"]) == (2, 0)
    assert (got["norm_1"]["p"], got["norm_1"]["dim"]) == (2, 1)
    assert (got["std"]["dim"], got["std"]["unbiased"]) == (1, True)
    assert (got["narrow"]["dim"], got["narrow"]["start"], got["narrow"]["length"]) == (1, 2, 3)
    assert got["where"]["input"].name == "u" and got["where"]["condition"].name == "gt"
    assert got["lin"]["input"].name == "u"


# --------------------------------------------------------------------------- reductions read by name
@pytest.mark.parametrize("expr,name", [
    (lambda h: h.norm(2, 0), "norm"),
    (lambda h: torch.norm(h, 2, 0), "norm"),
    (lambda h: h.std(0, True), "std"),
    (lambda h: h.var(0, False, keepdim=True), "var"),
    (lambda h: h.topk(1, 0).values, "topk"),
    (lambda h: h.sort(0).values, "sort"),
    (lambda h: h.cumsum(0), "cumsum"),
    (lambda h: h.softmax(0), "softmax"),
    (lambda h: F.softmax(h, 0), "softmax"),
    (lambda h: h.logsumexp(0, True), "logsumexp"),
    (lambda h: h.max(0, True)[0], "max_1"),
    (lambda h: F.normalize(h, 2, 0), "normalize"),
])
def test_reduction_over_the_batch_refused_whatever_the_spelling(expr, name):
    T, tagged = check(lambda s, u, uid, i: s.head(torch.cat([s.lin(u) * 0.5 + expr(s.lin(u)).mean(), i], -1)))
    assert_refused(tagged, name, "batch dimension")


@pytest.mark.parametrize("expr,name", [
    (lambda h: h.norm(2, 1, keepdim=True), "norm"),
    (lambda h: torch.norm(h, 2, -1, True), "norm"),
    (lambda h: h.std(1, True, keepdim=True), "std"),
    (lambda h: h.topk(2).values.sum(-1, keepdim=True), "topk"),      # dim defaults to -1
    (lambda h: h.sort().values[:, :1], "sort"),
    (lambda h: F.normalize(h).sum(1, keepdim=True), "normalize"),     # dim defaults to 1
    (lambda h: h.max(-1, keepdim=True)[0], "max_1"),
])
def test_reduction_over_features_stays_user(expr, name):
    T, tagged = check(lambda s, u, uid, i: s.head(torch.cat([s.lin(u) * expr(s.lin(u)), i], -1)))
    assert_user(tagged, name)
    assert rows_of(T, name) == "U"
    assert T.meta["mari_fx.record"].split_layers == ("head",)


# --------------------------------------------------------------------------- weights, tables, shapes
REFUSED = {
    "linear_weight_batched": (lambda s, u, uid, i: s.head(torch.cat([F.linear(u, u).sum(1, keepdim=True) * u, i], -1)),
                              "linear", "'weight'"),
    "linear_bias_batched": (lambda s, u, uid, i: s.head(torch.cat([F.linear(u, s.w, u), i], -1)),
                            "linear", "'bias'"),
    "linear_bias_kw_batched": (lambda s, u, uid, i: s.head(torch.cat([F.linear(u, weight=s.w, bias=u * 2), i], -1)),
                               "linear", "'bias'"),
    "addmm_mat2_batched": (lambda s, u, uid, i: s.head(torch.cat([torch.addmm(s.vec[:1], u, u.T).sum(1, keepdim=True) * u, i], -1)),
                           "addmm", "'mat2'"),
    "bilinear_weight_batched": (lambda s, u, uid, i: s.head(torch.cat([F.bilinear(u, u, s.w3 * u.sum()).sum(1, keepdim=True) * u, i], -1)),
                                "bilinear", "'weight'"),
    "embedding_batched_table": (lambda s, u, uid, i: s.head(torch.cat([F.embedding(uid * 0, u), i], -1)),
                                "embedding", "'weight'"),
    "layer_norm_shape_is_batch": (lambda s, u, uid, i: s.head(torch.cat([F.layer_norm(u, u.shape), i], -1)),
                                  "layer_norm", "normalized_shape"),
    "layer_norm_weight_batched": (lambda s, u, uid, i: s.head(torch.cat([F.layer_norm(u, (8,), u.sum(0)), i], -1)),
                                  "layer_norm", "'weight'"),
    "batch_norm_stats_batched": (lambda s, u, uid, i: s.head(torch.cat([F.batch_norm(u, u.mean(0), u.var(0) + 1), i], -1)),
                                 "batch_norm", "'running_mean'"),
    "group_norm_weight_batched": (lambda s, u, uid, i: s.head(torch.cat([F.group_norm(u, 2, u.sum(0)), i], -1)),
                                  "group_norm", "'weight'"),
    "prelu_weight_batched": (lambda s, u, uid, i: s.head(torch.cat([F.prelu(u, u.mean(0)), i], -1)),
                             "prelu", "'weight'"),
    "where_one_argument": (lambda s, u, uid, i: s.head(torch.cat([u * torch.where(u > 0)[0].float().mean(), i], -1)),
                           "where", "indices"),
    "index_select_rows": (lambda s, u, uid, i: s.head(torch.cat([u.index_select(0, torch.zeros_like(uid)), i], -1)),
                          "index_select", "rows of the batch"),
    "gather_rows": (lambda s, u, uid, i: s.head(torch.cat([u.gather(0, torch.zeros_like(uid)[:, None].expand(-1, 8)), i], -1)),
                    "gather", "batch dimension"),
    "gather_const_index": (lambda s, u, uid, i: s.head(torch.cat([u.gather(1, torch.zeros(1, 8, dtype=torch.long)).sum() * u, i], -1)),
                           "gather", "batch-free index"),
    "take_along_flattened": (lambda s, u, uid, i: s.head(torch.cat([torch.take_along_dim(u, u.argmax(1, keepdim=True)).sum() * u, i], -1)),
                             "take_along_dim", "batch dimension"),
    "sdpa_2d_attends_across_batch": (lambda s, u, uid, i: s.head(torch.cat([F.scaled_dot_product_attention(u, u, u), i], -1)),
                                     "scaled_dot_product_attention", "< 3 dims"),
    "mha_unbatched_2d_input": (lambda s, u, uid, i: s.head(torch.cat([s.mha(u, u, u)[0], i], -1)),
                               "mha", "not a batched [B, L, E] sequence"),
    "gru_unbatched_2d_input": (lambda s, u, uid, i: s.head(torch.cat([s.gru(u)[0], i], -1)),
                               "gru", ">= 3 dims"),
    "nonzero": (lambda s, u, uid, i: s.head(torch.cat([u * torch.nonzero(u > 0).float().mean(), i], -1)),
                "nonzero", "no mari_fx rule"),
    "masked_select": (lambda s, u, uid, i: s.head(torch.cat([u * u.masked_select(u > 0).mean(), i], -1)),
                      "masked_select", "no mari_fx rule"),
    "embedding_bag_batched_weights": (lambda s, u, uid, i: s.head(torch.cat([F.embedding_bag(
        torch.stack([uid * 0, uid * 0], 1), u), i], -1)), "embedding_bag", "'weight'"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_batched_parameter_operand_refused(case):
    fn, name, reason = REFUSED[case]
    T, tagged = check(fn, mha=nn.MultiheadAttention(8, 2, batch_first=True), gru=nn.GRU(8, 8, batch_first=True))
    assert_refused(tagged, name, reason)
    assert rows_of(T, name) == "N"


ROWWISE = {
    "linear_param": (lambda s, u, uid, i: s.head(torch.cat([F.linear(u, s.w, s.vec), i], -1)), "linear"),
    "embedding_param_table": (lambda s, u, uid, i: s.head(torch.cat([F.embedding(uid, s.table), i], -1)), "embedding"),
    "layer_norm_static_shape": (lambda s, u, uid, i: s.head(torch.cat([F.layer_norm(u, u.shape[1:], s.vec), i], -1)),
                                "layer_norm"),
    "where_three_arguments": (lambda s, u, uid, i: s.head(torch.cat([torch.where(u > 0, u, 0.5), i], -1)), "where"),
    "where_method": (lambda s, u, uid, i: s.head(torch.cat([u.where(u > 0, s.vec), i], -1)), "where"),
    "index_select_columns": (lambda s, u, uid, i: s.head(torch.cat([u.index_select(1, torch.arange(7, -1, -1)), i], -1)),
                             "index_select"),
    "index_select_table_lookup": (lambda s, u, uid, i: s.head(torch.cat([torch.index_select(s.table, 0, uid), i], -1)),
                                  "index_select"),
    "gather_columns": (lambda s, u, uid, i: s.head(torch.cat([u.gather(1, u.argsort(1)), i], -1)), "gather"),
    "take_along_columns": (lambda s, u, uid, i: s.head(torch.cat([torch.take_along_dim(u, u.argsort(1), dim=1), i], -1)),
                           "take_along_dim"),
    "prelu_param": (lambda s, u, uid, i: s.head(torch.cat([F.prelu(u, s.vec), i], -1)), "prelu"),
    "clamp_min_tensor": (lambda s, u, uid, i: s.head(torch.cat([torch.clamp(u, min=u.mean(1, keepdim=True)), i], -1)),
                         "clamp"),
    "baddbmm_const_input": (lambda s, u, uid, i: s.head(torch.cat([torch.baddbmm(s.w[None], u[:, :, None], u[:, None, :]).sum(-1), i], -1)),
                            "baddbmm"),
    "sdpa_batched_3d_mask": (lambda s, u, uid, i: s.head(torch.cat([F.scaled_dot_product_attention(
        u.view(-1, 2, 4), u.view(-1, 2, 4), u.view(-1, 2, 4), attn_mask=u.view(-1, 2, 4)[:, :, :2] > 0).flatten(1), i], -1)),
        "scaled_dot_product_attention"),
    "mha_key_padding_mask": (lambda s, u, uid, i: s.head(torch.cat([s.mha(
        u.view(-1, 2, 4).repeat(1, 1, 2), u.view(-1, 2, 4).repeat(1, 1, 2), u.view(-1, 2, 4).repeat(1, 1, 2),
        key_padding_mask=torch.stack([u[:, 0] > 5, u[:, 1] > 5], 1))[0].sum(1), i], -1)), "mha"),
}


@pytest.mark.parametrize("case", sorted(ROWWISE))
def test_row_wise_with_batch_free_parameters(case):
    fn, name = ROWWISE[case]
    T, tagged = check(fn, mha=nn.MultiheadAttention(8, 2, batch_first=True))
    assert_user(tagged, name)
    assert rows_of(T, name) == "U"


def test_clamp_with_item_tensor_bound_runs_at_pairs():
    T, tagged = check(lambda s, u, uid, i: s.head(torch.cat([torch.clamp(u, min=i[:, :1]), i], -1)))
    assert node(tagged, "clamp").meta[TAG_KEY].side == Side.MIXED and rows_of(T, "clamp") == "N"


# --------------------------------------------------------------------------- lowerings read by name
def test_narrow_with_keyword_start_keeps_the_split():
    T, tagged = check(lambda s, u, uid, i: s.head8(torch.cat([s.lin(u), i], -1).narrow(1, start=2, length=8)))
    assert str(node(tagged, "narrow").meta[TAG_KEY]) == "[user:6, item:2]"
    assert T.meta["mari_fx.record"].split_layers == ("head8",)


@pytest.mark.parametrize("split,head", [
    (lambda h: h.split(6, dim=1), "head"), (lambda h: torch.split(h, [4, 8], dim=-1), "head"),
    (lambda h: h.chunk(2, dim=-1), "head"), (lambda h: torch.narrow(h, dim=1, start=-6, length=6).split(3, 1), "head6"),
])
def test_split_forms_keep_pieces(split, head):
    def fn(s, u, uid, i):
        parts = split(torch.cat([s.lin(u), i], -1))
        return getattr(s, head)(torch.cat([parts[1], parts[0]], -1))

    T, _ = check(fn)
    assert T.meta["mari_fx.record"].split_layers == (head,)


def test_addmm_and_linear_with_keyword_weights_split():
    T, _ = check(lambda s, u, uid, i: torch.addmm(s.vec, torch.cat([s.lin(u)[:, :4], i], -1), mat2=s.w)
                 + F.linear(torch.cat([s.lin(u)[:, 4:], i], -1), weight=s.w))
    assert len(T.meta["mari_fx.record"].split_layers) == 2


# --------------------------------------------------------------------------- transform-time crashes (cause 7)
@pytest.mark.parametrize("out", [
    lambda y: (y, 3),
    lambda y: {"version": 2, "y": y, "none": None},
    lambda y: [y, None, "tag", 1.5],
])
def test_python_constants_in_the_output(out):
    T, _ = check(lambda s, u, uid, i: out(s.head(torch.cat([s.lin(u), i], -1))))
    assert T.meta["mari_fx.record"].split_layers == ("head",)


@pytest.mark.parametrize("index,head", [
    ((slice(None), None, slice(None)), "head"), ((Ellipsis, None, slice(None)), "head"),
    ((slice(None), True), "head"), ((slice(None), None, slice(2, 10)), "head8"),
    ((Ellipsis, True, slice(-6, None)), "head6"), ((slice(None), None, 3), None),
])
def test_new_axis_indexing_of_pieces_keeps_the_split(index, head):
    def fn(s, u, uid, i):
        x = torch.cat([s.lin(u), i], -1)[index]
        return x * 2 if head is None else getattr(s, head)(x)

    T, tagged = check(fn)
    if head is None:  # one column: a user column, computed at U rows
        assert node(tagged, "getitem").meta[TAG_KEY].side == Side.USER and rows_of(T, "getitem") == "U"
    else:
        assert node(tagged, "getitem").meta[TAG_KEY].is_segmented
        assert T.meta["mari_fx.record"].split_layers == (head,)  # the Linear after the index is still split


def test_false_index_adds_an_empty_axis():
    T, _ = check(lambda s, u, uid, i: s.head(torch.cat([s.lin(u), i], -1)[:, False]).sum(1))
    assert T.meta["mari_fx.record"].split_layers == ("head",)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16])
def test_dtype_view_of_pieces(dtype):
    T, tagged = check(lambda s, u, uid, i: s.head(torch.cat([s.lin(u), i], -1).view(dtype).view(torch.float32)))
    assert tagged is not None
    if dtype == torch.int32:  # same element size: per piece, the Linear is still split
        assert str(node(tagged, "view").meta[TAG_KEY]) == "[user:8, item:4]"
        assert T.meta["mari_fx.record"].split_layers == ("head",)
    else:
        assert not node(tagged, "view").meta[TAG_KEY].is_segmented


@pytest.mark.parametrize("index", [(slice(None), slice(-3, 9)), (slice(None), slice(5, 5))])
def test_empty_column_selection(index):
    T, _ = check(lambda s, u, uid, i: (torch.cat([s.lin(u), i], -1)[index] * 2, s.head(torch.cat([u, i], -1))))
    assert T.meta["mari_fx.record"].split_layers == ("head",)


# --------------------------------------------------------------------------- rule / lowering agreement fuzz
def _random_indices(count, seed=0):
    import random

    rng = random.Random(seed)
    pool = [0, 1, -1, None, True, False, Ellipsis, slice(None), slice(None), slice(1, None), slice(-3, None),
            slice(None, 3), slice(2, 9), slice(-3, 9), slice(None, None, 2)]
    out = []
    while len(out) < count:
        index = (slice(None),) + tuple(rng.choice(pool) for _ in range(rng.randint(0, 3)))
        if sum(i is Ellipsis for i in index) <= 1 and index not in out:
            out.append(index)
    return out


@pytest.mark.parametrize("index", _random_indices(40))
def test_indexing_forms_on_pieces_agree_with_their_rule(index):
    """Any basic index of column pieces either keeps pieces the lowering builds, or is computed
    whole: never an internal error, never a different answer."""
    model = Fn(lambda s, u, uid, i: torch.cat([s.lin(u), i], -1).unsqueeze(1).expand(-1, 3, -1)[index] * 2).eval()
    try:
        model(*_inputs(1, 1))  # the model itself must accept the index
    except IndexError:
        pytest.skip("not a valid index for this model")
    check(model.fn)
