"""Model families beyond MLPs: target attention, cross networks, multi-task heads, sequence encoders."""
import operator

import pytest
import torch
import torch.nn as nn

import mari_fx
from mari_fx.testing.examples import DCNRanker, DINRanker, MMoERanker
from mari_fx.runtime.modules import SplitLinear

from helpers import ragged_index

SHAPES = [(1, 1), (1, 9), (3, 9)]


def run_request(T, model, user, item, U, N, idx):
    """Build pair inputs from per-user and per-candidate rows and compare T with the model."""
    pairs = [u[idx] for u in user] + list(item)
    request = mari_fx.pairs_to_request(T, *pairs, user_index=idx)
    got, want = T(**request), model(*pairs)
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        torch.testing.assert_close(g, w)


def rows_of(T, name, request):
    seen = {}
    h = T.get_submodule(name).register_forward_hook(lambda m, a, o: seen.setdefault("rows", a[0].shape[0]) and None)
    T(**request)
    h.remove()
    return seen["rows"]


@pytest.mark.parametrize("reassociate", [False, True])
@pytest.mark.parametrize("encoder", [False, True])
@pytest.mark.parametrize("U,N", SHAPES)
def test_din_target_attention(encoder, U, N, reassociate):
    model = DINRanker(encoder=encoder).eval()
    ex = (torch.randint(50, (4, 10)), torch.randint(20, (4,)), torch.randint(50, (4,)))
    T = mari_fx.transform(model, ["hist", "user_id"], ex, reassociate=reassociate)
    idx = ragged_index(U, N)
    hist, uid, iid = torch.randint(50, (U, 10)), torch.randint(20, (U,)), torch.randint(50, (N,))
    run_request(T, model, [hist, uid], [iid], U, N, idx)
    record = T.meta["mari_fx.record"]
    assert record.split_layers == ("att.0", "top.0")
    att = T.get_submodule("att.0")
    assert isinstance(att, SplitLinear)
    W = model.att[0].weight
    call = next(n for n in T.graph.nodes if n.target == "att.0")
    assert call.args[3].target == "unsqueeze"  # q.unsqueeze(1): [N, 1, D], not the [N, S, D] expand
    has_sub = any(n.target in ("sub", torch.sub) or getattr(n.target, "__name__", "") == "sub" for n in T.graph.nodes)
    if reassociate:
        # cat([q, k, q - k, q * k]): k's block and q - k's k-part are folded into one U-row block;
        # q's block and q - k's q-part into one block applied to q before its expand over the
        # sequence (once per candidate); only q * k runs at N x S rows
        assert (att.weight_user.shape[1], att.weight_item.shape[1], att.weight_broadcast.shape[1]) == (8, 8, 8)
        torch.testing.assert_close(att.weight_user, W[:, 8:16] - W[:, 16:24])
        torch.testing.assert_close(att.weight_item, W[:, 24:32])
        torch.testing.assert_close(att.weight_broadcast, W[:, 0:8] + W[:, 16:24])
        assert not has_sub
    else:
        # exact by default: q - k is computed as the model does (at N x S rows), k's own block
        # runs at U rows and q's block before the expand
        assert (att.weight_user.shape[1], att.weight_item.shape[1], att.weight_broadcast.shape[1]) == (8, 16, 8)
        torch.testing.assert_close(att.weight_user, W[:, 8:16])
        torch.testing.assert_close(att.weight_item, W[:, 16:32])
        torch.testing.assert_close(att.weight_broadcast, W[:, 0:8])
        assert has_sub
    if encoder:  # the user-only sequence encoder runs once per user
        request = {"hist": hist, "user_id": uid, "item_id": iid, "user_index": idx}
        assert rows_of(T, "encoder", request) == U
        assert "encoder" in record.hoisted


@pytest.mark.parametrize("low_rank", [None, 4])
@pytest.mark.parametrize("U,N", SHAPES)
def test_cross_network_first_layer_split(low_rank, U, N):
    model = DCNRanker(low_rank=low_rank).eval()
    T = mari_fx.transform(model, ["user"], (torch.randn(4, 12), torch.randn(4, 6)))
    idx = ragged_index(U, N)
    run_request(T, model, [torch.randn(U, 12)], [torch.randn(N, 6)], U, N, idx)
    first = "cross.0.0" if low_rank else "cross.0"
    assert T.meta["mari_fx.record"].split_layers == (first, "deep.0")
    later = "cross.1.0" if low_rank else "cross.1"
    assert isinstance(T.get_submodule(later), nn.Linear)  # x_1 is mixed: untouched


@pytest.mark.parametrize("U,N", SHAPES)
def test_multi_task_experts_and_gates_split(U, N):
    model = MMoERanker().eval()
    T = mari_fx.transform(model, ["user"], (torch.randn(4, 10), torch.randn(4, 6)))
    idx = ragged_index(U, N)
    run_request(T, model, [torch.randn(U, 10)], [torch.randn(N, 6)], U, N, idx)
    assert set(T.meta["mari_fx.record"].split_layers) == {
        "experts.0.0", "experts.1.0", "experts.2.0", "gates.0", "gates.1"}
    # the fused input is never materialised at N rows: no user gather feeds a cat
    assert not any(n.target is torch.index_select for n in T.graph.nodes)


class SeqEncoders(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.gru = nn.GRU(8, 8, batch_first=True)
        self.seq_first = nn.MultiheadAttention(8, 2)  # batch_first=False: called batch-first, at U rows
        self.out = nn.Linear(24, 1)

    def forward(self, seq, item):
        h, _ = self.mha(seq, seq, seq)
        o, hn = self.gru(h)
        t = seq.transpose(0, 1)
        s, _ = self.seq_first(t, t, t)
        return self.out(torch.cat([o.mean(1), hn[-1] + item, s.mean(0)], -1))


@pytest.mark.parametrize("U,N", SHAPES)
def test_sequence_encoders(U, N):
    model = SeqEncoders().eval()
    T = mari_fx.transform(model, ["seq"], (torch.randn(4, 5, 8), torch.randn(4, 8)))
    idx = ragged_index(U, N)
    run_request(T, model, [torch.randn(U, 5, 8)], [torch.randn(N, 8)], U, N, idx)
    record = T.meta["mari_fx.record"]
    # the seq-first module over seq.transpose(0, 1), read by s.mean(0): no transpose left to refuse
    assert {"mha", "gru", "seq_first"} <= set(record.hoisted)
    assert not any("transpose" in r.node for r in record.refused)


@pytest.mark.parametrize("kind", ["fm", "bi", "dot"])
@pytest.mark.parametrize("U,N", SHAPES)
def test_interaction_layers(kind, U, N):
    from mari_fx.testing.examples import InteractionRanker
    from mari_fx.analysis.tags import ROWS_KEY

    model = InteractionRanker(kind).eval()
    T = mari_fx.transform(model, ["user_ids"], (torch.randint(100, (4, 4)), torch.randint(100, (4, 2))))
    idx = ragged_index(U, N)
    run_request(T, model, [torch.randint(100, (U, 4))], [torch.randint(100, (N, 2))], U, N, idx)
    record = T.meta["mari_fx.record"]
    # the first-order Linear over the flattened fields is split: 4 user fields x 8 at U rows
    first = T.get_submodule("linear")
    assert isinstance(first, SplitLinear) and first.weight_user.shape[1] == 32 and first.weight_item.shape[1] == 16
    at_u = [n for n in T.graph.nodes if n.meta.get(ROWS_KEY) == "U"]
    if kind == "dot":  # the user x user block of e e^T runs once per user
        assert any(n.target is torch.bmm for n in at_u)
        # uu at U; the item fields' rows against all fields (ui and ii) in one bmm at N rows, the triu
        # pairs picked off them (the Linear over the pair products reads the uu pairs at U rows)
        assert sum(n.target is torch.bmm and n.meta.get(ROWS_KEY) == "N" for n in T.graph.nodes) == 1
    else:  # (s_u + s_i)^2 expanded: s_u * s_u at U rows
        assert any(n.target is operator.mul and n.args[0] is n.args[1] for n in at_u)
    if kind == "bi":
        # 0.5 * (s * s - sum(e * e)) cancels: by default the MLP runs on it as the model computes it;
        # reassociate=True could fold the user fields' share of sum(e * e) into a U-row block, but the
        # item terms still need all 8 columns at N rows: the split saves no N-row work (mari_fx.lowering.cost)
        assert "mlp.0" not in record.split_layers
        T2 = mari_fx.transform(model, ["user_ids"], (torch.randint(100, (4, 4)), torch.randint(100, (4, 2))),
                               reassociate=True)
        run_request(T2, model, [torch.randint(100, (U, 4))], [torch.randint(100, (N, 2))], U, N, idx)
        mlp0 = {l.name: l for l in T2.meta["mari_fx.record"].layers}["mlp.0"]
        assert mlp0.action == "kept" and mlp0.reason.startswith("splitting would not reduce the work at N rows")
