"""Soundness of values: batch sizes are the pair count N, integer/bool arithmetic keeps its dtype
and exact semantics, and float rewrites keep fp32 round-off of what the model computes."""
import pytest
import torch
import torch.nn as nn

import mari_fx
from mari_fx.analysis.tags import ROWS_KEY

aten = torch.ops.aten

from helpers import ragged_index

SHAPES = [(U, N) for U in (1, 2, 3, 4) for N in (1, 2, 5, 7) if N >= U]


def _check(model, user_inputs, make_user, make_item, U, N, example_users=3, example_n=6, atol=None, rtol=None):
    """Transform on a pair example, then compare T and M on a fresh request (values and dtype)."""
    ex_idx = ragged_index(example_users, example_n, seed=1)
    ex_u, ex_i = make_user(example_users), make_item(example_n)
    T = mari_fx.transform(model, user_inputs, (*[t[ex_idx] for t in ex_u], *ex_i))
    idx = ragged_index(U, N, seed=2)
    us, its = make_user(U), make_item(N)
    pairs = (*[t[idx] for t in us], *its)
    want = model(*pairs)
    got = T(**mari_fx.pairs_to_request(T, *pairs, user_index=idx))
    assert got.dtype == want.dtype
    if atol is None:
        torch.testing.assert_close(got, want)
    else:
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    return T


def _rows(T, pred):
    return [n.meta.get(ROWS_KEY) for n in T.graph.nodes if pred(n)]


# --------------------------------------------------------------------------- batch size is N
class SizeAsValue(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how, self.lin, self.head = how, nn.Linear(4, 4), nn.Linear(7, 1)

    def forward(self, u, i):
        h = self.lin(u)
        how = self.how
        if how == "size0":
            h = h * h.size(0)
        elif how == "shape0":
            h = h / h.shape[0]
        elif how == "numel":
            h = h / h.numel()
        elif how == "shape_neg2":
            h = h * h.shape[-2]
        elif how == "arange":
            h = h + torch.arange(h.size(0)).unsqueeze(1)
        elif how == "size_neg2":
            h = h * h.size(-2)
        elif how == "size_tuple":
            h = h * h.size()[0]
        elif how == "float_size":
            h = h * float(h.size(0)) / 2
        return self.head(torch.cat([h, i], -1))


@pytest.mark.parametrize("how", ["size0", "shape0", "numel", "shape_neg2", "arange", "size_neg2", "size_tuple",
                                 "float_size"])
@pytest.mark.parametrize("U,N", SHAPES)
def test_batch_size_as_value_is_n(how, U, N):
    model = SizeAsValue(how).eval()
    T = _check(model, ["u"], lambda k: [torch.randn(k, 4)], lambda k: [torch.randn(k, 3)], U, N)
    # the size is read off user_index, never off a user tensor gathered to N rows
    gathers = [n for n in T.graph.nodes if n.target is torch.index_select]
    assert len(gathers) == 1  # h gathered once, where it meets the batch size


class LenAsValue(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.head = nn.Linear(4, 4), nn.Linear(7, 1)

    def forward(self, u, i):
        h = self.lin(u)
        return self.head(torch.cat([h * len(h), i], -1))


@pytest.mark.parametrize("U,N", SHAPES)
def test_len_as_value_is_n(U, N):
    _check(LenAsValue().eval(), ["u"], lambda k: [torch.randn(k, 4)], lambda k: [torch.randn(k, 3)], U, N)


class SizeAsShape(nn.Module):
    """Batch sizes in the batch position of a shape: the user work stays at U rows.
    ``torch.zeros(x.size(0), k)`` is captured by torch.export (fx cannot trace it)."""

    def __init__(self, with_factory):
        super().__init__()
        self.with_factory, self.lin, self.head = with_factory, nn.Linear(4, 6), nn.Linear(9, 1)

    def forward(self, u, i):
        h = self.lin(u)
        v = h.view(h.size(0), -1) + h.new_zeros(h.shape[0], 6) + h.reshape(i.size(0), -1)
        w = v.unsqueeze(1).expand(h.size(0), 2, 6).sum(1)
        if self.with_factory:
            w = w + torch.zeros(h.size(0), 6)
        return self.head(torch.cat([w, i], -1))


_SHAPE_OPS = {"fx": ("view", "new_zeros", "reshape", "expand"),
              "torch.export": (aten.view.default, aten.new_zeros.default, aten.reshape.default,
                               aten.expand.default, aten.zeros.default)}


@pytest.mark.parametrize("with_factory", [False, True])
@pytest.mark.parametrize("U,N", SHAPES)
def test_batch_size_as_shape_stays_at_u(with_factory, U, N):
    T = _check(SizeAsShape(with_factory).eval(), ["u"], lambda k: [torch.randn(k, 4)],
               lambda k: [torch.randn(k, 3)], U, N)
    capture = T.meta["mari_fx.record"].capture
    assert capture == ("torch.export" if with_factory else "torch.fx")
    for target in _SHAPE_OPS["torch.export" if with_factory else "fx"]:
        assert _rows(T, lambda n, t=target: n.target == t) == ["U"], target
    # the shape ops were passed the number of users, not N
    num_users = [n for n in T.graph.nodes if n.target == "size" and n.args[0].target == "u"]
    assert len(num_users) == 1 and len(num_users[0].users) >= 4


class SizeElsewhere(nn.Module):
    """A batch size in a non-batch position of a shape is a value: N, not substituted."""

    def __init__(self, how):
        super().__init__()
        self.how, self.lin, self.wide = how, nn.Linear(4, 4), nn.Linear(4, 420)

    def forward(self, u, i):
        h = self.lin(u)
        if self.how == "view":  # merges the batch: computed as the model does
            return h.view(-1, h.size(0)).t() + i
        if self.how == "expand":  # B copies of each row along dim 1
            return h.unsqueeze(1).expand(-1, h.size(0), -1).sum(1) + i
        if self.how == "unflatten":  # width 420 splits into (B, 420 / B) for every B <= 7
            return self.wide(u).unflatten(1, (h.size(0), -1)).amax(1).sum(1, keepdim=True) + i
        raise ValueError(self.how)


@pytest.mark.parametrize("how", ["view", "expand", "unflatten"])
@pytest.mark.parametrize("U,N", SHAPES)
def test_batch_size_elsewhere_is_n(how, U, N):
    _check(SizeElsewhere(how).eval(), ["u"], lambda k: [torch.randn(k, 4)], lambda k: [torch.randn(k, 4)], U, N)


# --------------------------------------------------------------------------- integer and bool arithmetic
class IntCross(nn.Module):
    """Integer crosses of user and item ids, computed exactly in int64 (beyond 2**24)."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.emb = nn.Embedding(1009, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, uid, iid, cid):
        how = self.how
        if how == "hash":
            return (uid * 1000003 + iid) * 3 + 1
        if how == "mod":
            return ((uid * 1000 + iid) * 31 + cid) % 1009
        if how == "square":
            return (uid - iid) * (uid - iid)
        if how == "bool_sum":
            s = (uid > 5) + (iid > 5)
            return s * s
        if how == "embedding":  # a hashed user x item cross looked up in a table
            return self.head(self.emb(((uid * 1000 + iid) * 31 + cid) % 1009))
        raise ValueError(how)


@pytest.mark.parametrize("how", ["hash", "mod", "square", "bool_sum", "embedding"])
@pytest.mark.parametrize("U,N", SHAPES)
def test_integer_crosses_exact(how, U, N):
    big = 10 ** 7  # ids whose products exceed 2**24: float32 would round them
    user = lambda k: [torch.randint(0, big, (k,))]
    item = lambda k: [torch.randint(0, big, (k,)), torch.randint(0, 1000, (k,))]
    model = IntCross(how).eval()
    T = _check(model, ["uid"], user, item, U, N)
    if how in ("hash", "mod", "square"):  # exact, not just close
        idx = ragged_index(U, N, seed=3)
        us, its = user(U), item(N)
        got = T(**mari_fx.pairs_to_request(T, us[0][idx], *its, user_index=idx))
        want = model(us[0][idx], *its)
        assert got.dtype == torch.int64 and torch.equal(got, want)
        # the user share uid * 1000003 (or uid * 1000) is computed once per user, in int64
        if how != "square":
            assert any(n.meta.get(ROWS_KEY) == "U" and n.target in (torch.mul, "mul", aten.mul.Tensor, __import__("operator").mul)
                       for n in T.graph.nodes)


# --------------------------------------------------------------------------- precision
class SquaredDiff(nn.Module):
    """``head((u - i) ** 2)`` written as ``d * d``: expanding it as ``u*u - 2*u*i + i*i`` cancels in
    fp32 when u ~ i are large."""

    def __init__(self, how="mul"):
        super().__init__()
        self.how, self.head = how, nn.Linear(4, 3)

    def forward(self, u, i):
        d = u - i
        if self.how == "sum":  # a combination of combinations: (u - i) + (u + i)
            d = d + (u + i) - 2.0 * u
        return self.head(d * d)


@pytest.mark.parametrize("how", ["mul", "sum"])
@pytest.mark.parametrize("U,N", SHAPES)
def test_squared_difference_keeps_fp32_round_off(how, U, N):
    model = SquaredDiff(how).eval()
    big = lambda k: [1000.0 + torch.randn(k, 4)]  # |u| ~ |i| ~ 1000, u - i ~ 1
    T = _check(model, ["u"], big, big, U, N)  # default fp32 tolerances against the fp32 model
    idx = ragged_index(U, N, seed=3)
    u, i = big(U)[0], big(N)[0]
    got = T(**mari_fx.pairs_to_request(T, u[idx], i, user_index=idx))
    want64 = model.double()(u[idx].double(), i.double())
    model.float()
    torch.testing.assert_close(got.double(), want64, rtol=1e-5, atol=1e-5)
    # no product of user and item values was expanded: d * d is one product, at N rows
    muls = [n for n in T.graph.nodes if n.target in (__import__("operator").mul, torch.mul, "mul", aten.mul.Tensor)
            and all(isinstance(a, torch.fx.Node) for a in n.args)]
    assert [n.meta.get(ROWS_KEY) for n in muls] == ["N"]


def test_full_like_filled_with_the_batch_size_is_the_pair_count():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.head = nn.Linear(8, 8), nn.Linear(12, 1)

        def forward(self, u, i):
            h = self.lin(u)
            return self.head(torch.cat([h + torch.full_like(h, u.size(0)), i], -1))

    m = M().eval()
    T = mari_fx.transform(m, ["u"], (torch.randn(3, 8)[torch.tensor([0, 0, 1, 2])], torch.randn(4, 4)))
    for U, N in [(1, 1), (2, 5), (3, 7)]:
        u, i = torch.randn(U, 8), torch.randn(N, 4)
        idx = torch.cat([torch.arange(U), torch.randint(U, (N - U,))])[torch.randperm(N)]
        got, want = T(u=u, i=i, user_index=idx), m(u[idx], i)
        torch.testing.assert_close(got, want)
    fill = next(n for n in T.graph.nodes if n.target is torch.full_like)
    assert fill.meta["mari_fx.rows"] == "N"  # filled with N, not U
