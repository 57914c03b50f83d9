"""The tagging pass: column-exact tags, row-coupling ops refused, unknown ops explicit."""
import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mari_fx
from mari_fx.runtime.modules import SplitLinear
from mari_fx.analysis.rules import RULES, register, rowwise
from mari_fx.analysis.tags import NOTE_KEY, TAG_KEY, Segment, Side, TensorTag

from helpers import ragged_index


def mystery(x):
    return x.clone()


def scale(x):
    return x * 3


torch.fx.wrap("mystery")
torch.fx.wrap("scale")


class Fn(nn.Module):
    def __init__(self, fn, **modules):
        super().__init__()
        self.fn = fn
        for k, m in modules.items():
            setattr(self, k, m)

    def forward(self, u, i):
        return self.fn(self, u, i)


def tagged(fn, u_shape=(4, 3), i_shape=(4, 5), train=False, **modules):
    model = Fn(fn, **modules).train(train)
    gm = mari_fx.trace(model, ["u"], (torch.randn(*u_shape), torch.randn(*i_shape)))
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    return gm, out


def check_equivalent(fn, u_shape=(3,), i_shape=(5,), U=3, N=8, **modules):
    model = Fn(fn, **modules).eval()
    T = mari_fx.transform(model, ["u"], (torch.randn(4, *u_shape), torch.randn(4, *i_shape)))
    idx = ragged_index(U, N)
    u, i = torch.randn(U, *u_shape), torch.randn(N, *i_shape)
    torch.testing.assert_close(T(u=u, i=i, user_index=idx), model(u[idx], i))
    return T


def test_cat_keeps_column_segments_through_slice_split_narrow():
    def fn(m, u, i):
        x = torch.cat([u, i, u * 2], dim=-1)  # [user:3, item:5, user:3]
        a, b = torch.split(x, [4, 7], dim=1)
        return x[:, 1:4], x[..., 8:], a, b, x.narrow(1, 3, 5), torch.chunk(x, 2, dim=-1)[0], x[:, 9]

    gm, out = tagged(fn)
    tags = [str(n.meta[TAG_KEY]) for n in out]
    assert tags == ["[user:2, item:1]", "user", "[user:3, item:1]", "[item:4, user:3]", "item",
                    "[user:3, item:3]", "user"]
    check_equivalent(fn)


def test_batch_coupling_ops_are_refused_and_reported():
    def fn(m, u, i):
        return (torch.softmax(u, dim=0), u.sum(), u.mean(0), u.t(), u.view(-1), u.flatten(),
                torch.cat([u, u], dim=0), u.squeeze(), m.bn(u))

    # without running statistics BatchNorm normalises with batch statistics in eval mode too
    gm, out = tagged(fn, bn=nn.BatchNorm1d(3, track_running_stats=False))
    for node in out:
        assert node.meta[TAG_KEY].side == Side.MIXED, node
        assert node.meta[NOTE_KEY], node
    model = Fn(fn, bn=nn.BatchNorm1d(3, track_running_stats=False)).eval()
    T = mari_fx.transform(model, ["u"], (torch.randn(4, 3), torch.randn(4, 5)))
    reasons = {r.node: r.reason for r in T.meta["mari_fx.record"].refused}
    assert "batch dimension (dim 0)" in reasons["mean"]
    assert "batch statistics" in reasons["bn"]


def test_training_mode_is_refused_not_recorded():
    def fn(m, u, i):
        return m.lin(torch.cat([m.drop(m.bn(u)), i], -1))

    mods = dict(bn=nn.BatchNorm1d(3), drop=nn.Dropout(0.3), lin=nn.Linear(8, 2))
    with pytest.raises(mari_fx.DeclarationError, match=r"'bn' \(BatchNorm1d\), 'drop' \(Dropout\)"):
        tagged(fn, train=True, **mods)


def test_rowwise_ops_on_user_data_stay_user():
    def fn(m, u, i):
        v = m.ln(torch.relu(u)).unsqueeze(1).transpose(1, 2).flatten(1).view(u.size(0), -1)
        w = torch.softmax(v, dim=-1).sum(-1, keepdim=True) + v.reshape(-1, 3).amax(dim=1, keepdim=True)
        return w * i

    gm, out = tagged(fn, ln=nn.LayerNorm(3))
    users = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")][:-1]
    # u.size(0) is the number of pairs N (item-like); as the batch size of view() it still lets v stay USER
    (size,) = [n for n in users if n.target == "size"]
    assert size.meta[TAG_KEY].side == Side.ITEM
    users.remove(size)
    assert all(n.meta[TAG_KEY].side in (Side.USER, Side.CONST) for n in users), [
        (n.name, str(n.meta[TAG_KEY])) for n in users]
    assert out.meta[TAG_KEY].side == Side.MIXED
    T = check_equivalent(fn, ln=nn.LayerNorm(3))
    assert [b.at for b in T.meta["mari_fx.record"].broadcasts] == ["mul"]


def test_unknown_op_is_mixed_and_reported():
    def fn(m, u, i):
        return mystery(u) + i

    gm, out = tagged(fn, i_shape=(4, 3))
    node = next(n for n in gm.graph.nodes if n.name == "mystery")
    assert node.meta[TAG_KEY].side == Side.MIXED
    assert "no mari_fx rule for" in node.meta[NOTE_KEY]
    model = Fn(fn)
    T = mari_fx.transform(model, ["u"], (torch.randn(4, 3), torch.randn(4, 3)))
    (refusal,) = T.meta["mari_fx.record"].refused
    assert refusal.op.endswith("mystery") and "no mari_fx rule" in refusal.reason


def test_dropout_and_batchnorm_in_eval_mode_are_rowwise():
    def fn(m, u, i):
        return m.lin(torch.cat([m.drop(m.bn(u)), i], -1))

    mods = dict(bn=nn.BatchNorm1d(3), drop=nn.Dropout(0.3), lin=nn.Linear(8, 2))
    gm, out = tagged(fn, **mods)
    assert str(out.args[0].meta[TAG_KEY]) == "[user:3, item:5]"
    T = check_equivalent(fn, **mods)
    assert T.meta["mari_fx.record"].split_layers == ("lin",)


def test_embedding_and_embedding_bag_follow_their_index():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.bag = nn.Embedding(10, 4), nn.EmbeddingBag(10, 4, mode="mean")
            self.lin = nn.Linear(12, 1)

        def forward(self, uid, hist, iid):
            return self.lin(torch.cat([self.emb(uid), self.bag(hist), self.emb(iid)], -1))

    model = M().eval()
    ex = (torch.randint(10, (4,)), torch.randint(10, (4, 6)), torch.randint(10, (4,)))
    gm = mari_fx.trace(model, ["uid", "hist"], ex)
    lin = next(n for n in gm.graph.nodes if n.target == "lin")
    assert lin.args[0].meta[TAG_KEY] == TensorTag((Segment(Side.USER, 8), Segment(Side.ITEM, 4)))
    T = mari_fx.transform(model, ["uid", "hist"], ex)
    idx = ragged_index(2, 6)
    uid, hist, iid = torch.randint(10, (2,)), torch.randint(10, (2, 6)), torch.randint(10, (6,))
    torch.testing.assert_close(T(uid=uid, hist=hist, iid=iid, user_index=idx), model(uid[idx], hist[idx], iid))


def test_matmul_against_parameter_and_functional_linear_are_split():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(29, 8))
            self.w2 = nn.Parameter(torch.randn(4, 29))
            self.b2 = nn.Parameter(torch.randn(4))

        def forward(self, u, i):
            x = torch.cat([i[:, :2], u, i[:, 2:]], -1)
            return (x @ self.w, F.linear(x, self.w2, self.b2), torch.addmm(self.b2, x, self.w2.t()),
                    x @ self.w2.T, torch.matmul(x, self.w2.transpose(0, 1)), x @ (self.w * 2.0))

    model = M().eval()
    # 24 user columns: enough for the split to pay for its gather and kernels (mari_fx.lowering.cost)
    T = mari_fx.transform(model, ["u"], (torch.randn(4, 24), torch.randn(4, 5)))
    layers = {l.name: l for l in T.meta["mari_fx.record"].layers}
    # x @ W, F.linear, and x @ W.t() / W.T / W.transpose(0, 1) of a parameter (inside addmm too)
    assert all(layers[n].action == "split" for n in ("matmul", "linear", "addmm", "matmul_1", "matmul_2")), layers
    # a weight computed from a parameter is kept whole, with the reason
    assert layers["matmul_3"].action == "kept" and "not a 2-d parameter" in layers["matmul_3"].reason
    split = {n.target: m for n in T.graph.nodes if n.op == "call_module"
             for m in [T.get_submodule(n.target)] if isinstance(m, SplitLinear)}
    assert all(m.source.weight == "w2" and not m.source.transposed for k, m in split.items() if "addmm" in k)
    idx = ragged_index(3, 7)
    u, i = torch.randn(3, 24), torch.randn(7, 5)
    for got, want in zip(T(u=u, i=i, user_index=idx), model(u[idx], i)):
        torch.testing.assert_close(got, want)


def test_batch_size_int_used_on_item_side_is_recomputed():
    def fn(m, u, i):
        n = u.size(0)  # the batch size read off a user tensor ...
        return i.view(n, -1) + i.new_zeros(u.shape[0], 1)  # ... sizes item-side tensors (N rows)

    T = check_equivalent(fn)
    assert any(n.op == "call_method" and n.target == "size" and n.args[0].name == "user_index"
               for n in T.graph.nodes)


def test_register_rejects_duplicates_and_custom_rule_applies():
    with pytest.raises(ValueError, match="already registered"):
        register(torch.relu)(rowwise)

    register(scale)(rowwise)
    try:
        gm, out = tagged(lambda m, u, i: scale(u))
        assert out.meta[TAG_KEY].side == Side.USER
    finally:
        del RULES[scale]
