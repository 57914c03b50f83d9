"""Sequence models as users write them: padding masks, causal masks, einsum attention, jagged bags.

Every model is checked lossless at U in {1, 3}, N in {1, 7, 500}, with its whole user-side encoder
at U rows (node rows of the transformed graph), and FLOPs after the transform equal to the
analytic minimum (user-only work at U rows, the rest at N rows)."""
import math

import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import mari_fx
from mari_fx.runtime.jagged import JaggedBag, bag_take
from mari_fx.analysis.tags import ROWS_KEY

D, L, H, FF, HID, VOCAB = 8, 6, 2, 16, 12, 40
CELLS = [(1, 1), (1, 7), (1, 500), (3, 7), (3, 500)]


def hist_batch(rows: int, g: torch.Generator) -> torch.Tensor:
    """Histories of item ids padded with 0 at the tail; every row has >= 1 real item."""
    hist = torch.randint(1, VOCAB, (rows, L), generator=g)
    lengths = torch.randint(1, L + 1, (rows,), generator=g)
    hist[torch.arange(L)[None, :] >= lengths[:, None]] = 0
    return hist


def ragged(users: int, n: int, g: torch.Generator) -> torch.Tensor:
    idx = torch.cat([torch.arange(users), torch.randint(users, (n - users,), generator=g)])
    return idx[torch.randperm(n, generator=g)]


def rows_of(T, target):
    return {n.meta.get(ROWS_KEY) for n in T.graph.nodes if n.target == target or n.name == target}


def lin(rows, i, o):
    return 2 * rows * i * o


def encoder_layer_flops(seqs):
    """One TransformerEncoderLayer(D, H, FF) over ``seqs`` sequences of length L."""
    return (lin(seqs * L, D, 3 * D) + 2 * 2 * seqs * L * L * D + lin(seqs * L, D, D)
            + lin(seqs * L, D, FF) + lin(seqs * L, FF, D))


def top_flops(users, n, user_cols, item_cols):
    """A 2-layer head whose first Linear is split: user columns at U rows, item columns at N."""
    return lin(users, user_cols, HID) + lin(n, item_cols, HID) + lin(n, HID, 1)


def masked_mean(h, keep):
    keep = keep.unsqueeze(-1).to(h.dtype)
    return (h * keep).sum(1) / keep.sum(1).clamp(min=1)


# --------------------------------------------------------------------------- models
class EncoderRanker(nn.Module):
    """User history -> TransformerEncoder with a key padding mask (and optionally a causal mask)."""

    def __init__(self, causal=False, layers=2):
        super().__init__()
        self.causal = causal
        self.emb = nn.Embedding(VOCAB, D, padding_idx=0)
        self.pos = nn.Parameter(torch.randn(L, D) * 0.1)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(D, H, FF, dropout=0.0, batch_first=True), layers)
        self.item = nn.Embedding(VOCAB, D)
        self.top = nn.Sequential(nn.Linear(2 * D, HID), nn.ReLU(), nn.Linear(HID, 1))

    def forward(self, hist, item_id):
        pad = hist == 0
        x = self.emb(hist) + self.pos
        if self.causal:
            n = hist.size(1)
            mask = torch.ones((n, n), dtype=torch.bool).triu(1)
            h = self.enc(x, mask=mask, src_key_padding_mask=pad, is_causal=True)
        else:
            h = self.enc(x, src_key_padding_mask=pad)
        u = masked_mean(h, ~pad)
        return self.top(torch.cat([u, self.item(item_id)], dim=-1)).squeeze(-1)

    def min_flops(self, users, n):
        return len(self.enc.layers) * encoder_layer_flops(users) + top_flops(users, n, D, D)


class HandAttentionRanker(nn.Module):
    """Self-attention written by hand: q/k/v Linears, ``masked_fill`` of the padding (and a causal
    mask), softmax, weighted sum."""

    def __init__(self, causal=False):
        super().__init__()
        self.causal = causal
        self.emb = nn.Embedding(VOCAB, D, padding_idx=0)
        self.qkv = nn.Linear(D, 3 * D)
        self.item = nn.Embedding(VOCAB, D)
        self.top = nn.Sequential(nn.Linear(2 * D, HID), nn.ReLU(), nn.Linear(HID, 1))

    def forward(self, hist, item_id):
        keep = hist != 0
        q, k, v = self.qkv(self.emb(hist)).chunk(3, dim=-1)
        scores = q @ k.transpose(1, 2) / math.sqrt(D)                     # [B, L, L]
        scores = scores.masked_fill(~keep.unsqueeze(1), float("-inf"))    # padded keys
        if self.causal:
            n = hist.size(1)
            future = torch.ones((n, n), dtype=torch.bool).triu(1)
            scores = scores.masked_fill(future & keep.unsqueeze(1), -1e4)  # a causal, padding-aware mask
        h = torch.softmax(scores, dim=-1) @ v
        u = masked_mean(h, keep)
        return self.top(torch.cat([u, self.item(item_id)], dim=-1)).squeeze(-1)

    def min_flops(self, users, n):
        return lin(users * L, D, 3 * D) + 2 * 2 * users * L * L * D + top_flops(users, n, D, D)


class EinsumDIN(nn.Module):
    """BST/DIN-style: the history encoded by einsum self-attention (user-only), then target
    attention of the candidate over it with einsum (user x item)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D, padding_idx=0)
        self.qkv = nn.Linear(D, 3 * D)
        self.top = nn.Sequential(nn.Linear(3 * D, HID), nn.ReLU(), nn.Linear(HID, 1))

    def forward(self, hist, item_id):
        pad = hist == 0
        q, k, v = self.qkv(self.emb(hist)).chunk(3, dim=-1)
        s = torch.einsum("bld,bmd->blm", q, k) / math.sqrt(D)
        s = torch.where(pad.unsqueeze(1), torch.full_like(s, float("-inf")), s)
        enc = torch.einsum("blm,bmd->bld", torch.softmax(s, dim=-1), v)                # [B, L, D]: user-only
        pooled = masked_mean(enc, ~pad)
        cand = self.emb(item_id)                                                         # [B, D]
        t = torch.einsum("bd,bld->bl", cand, enc).masked_fill(pad, float("-inf"))
        interest = torch.einsum("bl,bld->bd", torch.softmax(t, dim=1), enc)
        return self.top(torch.cat([pooled, interest, cand], dim=-1)).squeeze(-1)

    def min_flops(self, users, n):
        encoder = lin(users * L, D, 3 * D) + 2 * 2 * users * L * L * D
        target = 2 * 2 * n * L * D
        return encoder + target + top_flops(users, n, D, 2 * D)


class BagRanker(nn.Module):
    """User tags as flat ids + offsets (+ weights) into an EmbeddingBag; item tags the same way."""

    def __init__(self):
        super().__init__()
        self.tags = nn.EmbeddingBag(VOCAB, D, mode="sum")
        self.item_tags = nn.EmbeddingBag(VOCAB, D, mode="mean")
        self.tower = nn.Sequential(nn.Linear(D, D), nn.ReLU())
        self.item = nn.Embedding(VOCAB, D)
        self.top = nn.Sequential(nn.Linear(3 * D, HID), nn.ReLU(), nn.Linear(HID, 1))

    def forward(self, tag_ids, tag_offsets, tag_weights, item_id, item_tag_ids, item_tag_offsets):
        u = self.tower(self.tags(tag_ids, tag_offsets, per_sample_weights=tag_weights))
        i = self.item_tags(item_tag_ids, item_tag_offsets)
        return self.top(torch.cat([u, self.item(item_id), i], dim=-1)).squeeze(-1)

    def min_flops(self, users, n):
        return lin(users, D, D) + top_flops(users, n, D, 2 * D)


def bags(rows, g, weights=False):
    lengths = torch.randint(1, 4, (rows,), generator=g)
    ids = torch.randint(VOCAB, (int(lengths.sum()),), generator=g)
    w = torch.rand(ids.numel(), generator=g) if weights else None
    return JaggedBag(ids, torch.cumsum(lengths, 0) - lengths, w)


# --------------------------------------------------------------------------- harness
def build(cls, **kw):
    torch.manual_seed(0)
    return cls(**kw).eval()


def seq_case(model):
    g = torch.Generator().manual_seed(1)
    idx = torch.tensor([0, 0, 1, 2, 2])
    example = (hist_batch(3, g)[idx], torch.randint(VOCAB, (5,), generator=g))
    T = mari_fx.transform(model, ["hist"], example)

    def cell(users, n, seed):
        g = torch.Generator().manual_seed(seed)
        hist, item, idx = hist_batch(users, g), torch.randint(VOCAB, (n,), generator=g), ragged(users, n, g)
        return {"hist": hist, "item_id": item, "user_index": idx}, (hist[idx], item)

    return T, cell


def bag_case(model):
    g = torch.Generator().manual_seed(1)
    idx = torch.tensor([0, 0, 1, 2, 2])
    ub, ib = bag_take(bags(3, g, weights=True), idx), bags(5, g)
    example = dict(tag_ids=ub.ids, tag_offsets=ub.offsets, tag_weights=ub.per_sample_weights,
                   item_id=torch.randint(VOCAB, (5,), generator=g), item_tag_ids=ib.ids, item_tag_offsets=ib.offsets)
    T = mari_fx.transform(model, [mari_fx.Bag("tag_ids", "tag_offsets", "tag_weights")], example_kwargs=example)

    def cell(users, n, seed):
        g = torch.Generator().manual_seed(seed)
        ub, ib, idx = bags(users, g, weights=True), bags(n, g), ragged(users, n, g)
        item = torch.randint(VOCAB, (n,), generator=g)
        request = {"tag": ub, "item_id": item, "item_tag": ib, "user_index": idx}
        pb = bag_take(ub, idx)
        pairs = (pb.ids, pb.offsets, pb.per_sample_weights, item, ib.ids, ib.offsets)
        return request, pairs

    return T, cell


CASES = {
    "encoder_padding": (lambda: build(EncoderRanker), seq_case, ["emb", "enc"]),
    "encoder_causal": (lambda: build(EncoderRanker, causal=True), seq_case, ["emb", "enc"]),
    "hand_attention_padding": (lambda: build(HandAttentionRanker), seq_case, ["qkv", "masked_fill", "softmax", "matmul_1"]),
    "hand_attention_causal": (lambda: build(HandAttentionRanker, causal=True), seq_case,
                              ["qkv", "masked_fill_1", "softmax", "matmul_1"]),
    "einsum_din": (lambda: build(EinsumDIN), seq_case, ["qkv", "einsum", "where", "softmax", "einsum_1", "truediv_1"]),
    "embedding_bag": (lambda: build(BagRanker), bag_case, ["tags", "tower.0", "tower.1"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_lossless_user_encoder_at_u_rows_and_minimum_flops(case):
    make, setup, user_nodes = CASES[case]
    model = make()
    T, cell = setup(model)
    record = T.meta["mari_fx.record"]
    assert not record.refused, record.refused
    for node in user_nodes:  # the whole user-side encoder runs once per user
        assert rows_of(T, node) == {"U"}, (node, rows_of(T, node))
    assert "top.0" in record.split_layers
    for users, n in CELLS:
        request, pairs = cell(users, n, seed=users * 1000 + n)
        with torch.no_grad():
            want, got = model(*pairs), T(**request)
        assert got.dtype == want.dtype and got.shape == (n,)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert mari_fx.count_flops(T, **request) == model.min_flops(users, n), (users, n)
    # the pair-shaped model does all of it at N rows
    request, pairs = cell(3, 500, seed=0)
    assert mari_fx.count_flops(model, *pairs) > model.min_flops(3, 500)


def test_encoder_with_padding_mask_is_hoisted_and_verify_passes():
    model = build(EncoderRanker)
    T, _ = seq_case(model)
    assert "enc" in T.meta["mari_fx.record"].hoisted
    assert mari_fx.verify(model, T, num_users=3, num_candidates=9) < 1e-5


# --------------------------------------------------------------------------- masks, one by one
class MHARanker(nn.Module):
    """MultiheadAttention over the history with a per-sample [B*H, L, L] mask built in ``how``."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.emb = nn.Embedding(VOCAB, D, padding_idx=0)
        self.mha = nn.MultiheadAttention(D, H, batch_first=True)
        self.item = nn.Embedding(VOCAB, D)
        self.top = nn.Linear(2 * D, 1)

    def forward(self, hist, item_id):
        pad = hist == 0
        n = hist.size(1)
        m = torch.ones((n, n), dtype=torch.bool).triu(1).unsqueeze(0) | pad.unsqueeze(1)      # [B, L, L]
        m = m & ~torch.eye(n, dtype=torch.bool)  # a row may always see itself
        if self.how == "repeat_interleave":
            m = m.repeat_interleave(H, dim=0)
        elif self.how == "expand_reshape":
            m = m.unsqueeze(1).expand(-1, H, -1, -1).reshape(-1, n, n)
        elif self.how == "head_major":
            m = m.repeat(H, 1, 1)
        elif self.how == "key_padding":
            x = self.emb(hist)
            h, _ = self.mha(x, x, x, key_padding_mask=pad, need_weights=False)
            return self.top(torch.cat([h[:, 0], self.item(item_id)], -1)).squeeze(-1)
        x = self.emb(hist)
        h, _ = self.mha(x, x, x, attn_mask=m, need_weights=False)
        return self.top(torch.cat([h[:, 0], self.item(item_id)], -1)).squeeze(-1)


@pytest.mark.parametrize("how", ["repeat_interleave", "expand_reshape", "key_padding"])
def test_mha_with_batch_major_mask_runs_at_u_rows(how):
    model = build(MHARanker, how=how)
    T, cell = seq_case(model)
    assert rows_of(T, "mha") == {"U"}
    assert not T.meta["mari_fx.record"].refused  # the fold itself is read at U rows, never computed at N
    for users, n in [(1, 1), (3, 7), (3, 500)]:
        request, pairs = cell(users, n, seed=n)
        with torch.no_grad():
            torch.testing.assert_close(T(**request), model(*pairs), rtol=1e-5, atol=1e-5)


def test_head_major_mask_is_refused_naming_the_mask():
    model = build(MHARanker, how="head_major")
    T, cell = seq_case(model)
    assert rows_of(T, "mha") == {"N"}
    (refusal,) = [r for r in T.meta["mari_fx.record"].refused if r.node == "mha"]
    assert "attn_mask 'repeat'" in refusal.reason and "batch-major" in refusal.reason
    request, pairs = cell(3, 7, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(T(**request), model(*pairs))


class ItemMaskEncoder(nn.Module):
    """The padding mask depends on the candidate (mask out the candidate itself): item-side."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D, padding_idx=0)
        self.enc = nn.TransformerEncoderLayer(D, H, FF, dropout=0.0, batch_first=True)
        self.top = nn.Linear(D, 1)

    def forward(self, hist, item_id):
        # never the first position (every history has one real item): no row is all padding
        pad = ((hist == 0) | (hist == item_id.unsqueeze(1))) & (torch.arange(hist.size(1)) > 0)
        return self.top(self.enc(self.emb(hist), src_key_padding_mask=pad)[:, 0]).squeeze(-1)


def test_item_side_padding_mask_runs_at_n_rows_and_names_the_mask():
    model = build(ItemMaskEncoder)
    T, cell = seq_case(model)
    assert rows_of(T, "emb") == {"U"} and rows_of(T, "enc") == {"N"}
    (refusal,) = [r for r in T.meta["mari_fx.record"].refused if r.node == "enc"]
    assert "src_key_padding_mask 'setitem'" in refusal.reason or "src_key_padding_mask" in refusal.reason
    assert "mixed-side" in refusal.reason and "broadcast" not in refusal.reason
    for users, n in [(1, 1), (3, 7)]:
        request, pairs = cell(users, n, seed=n)
        with torch.no_grad():
            torch.testing.assert_close(T(**request), model(*pairs))


class RankMismatch(nn.Module):
    def forward(self, scores, mask, item):
        return scores.masked_fill(mask, 0.0).sum(-1).sum(-1) + item


def test_mask_of_lower_rank_is_named_in_the_refusal():
    g = torch.Generator().manual_seed(0)
    scores, mask = torch.randn(4, 4, 4, generator=g), torch.rand(4, 4, generator=g) > 0.5
    T = mari_fx.transform(RankMismatch(), ["scores", "mask"], (scores, mask, torch.randn(4)))
    (refusal,) = T.meta["mari_fx.record"].refused
    assert "'mask' (2-d)" in refusal.reason


class TwoDUserMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(D, H, batch_first=True)

    def forward(self, x, m, item):
        return self.mha(x, x, x, attn_mask=m, need_weights=False)[0][:, 0, 0] + item


def test_user_dependent_2d_attn_mask_is_refused():
    g = torch.Generator().manual_seed(0)
    x, m = torch.randn(4, 4, D, generator=g), torch.rand(4, 4, generator=g) > 0.7
    T = mari_fx.transform(build(TwoDUserMask), ["x", "m"], (x, m, torch.randn(4)))
    (refusal,) = T.meta["mari_fx.record"].refused
    assert "attn_mask 'm'" in refusal.reason and "shared by every sample" in refusal.reason


class SDPA(nn.Module):
    def forward(self, q, pad, item):
        m = ~pad[:, None, None, :]  # [B, 1, 1, L]
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=m)
        return out[:, :, 0].sum(-1).sum(-1) + item


def test_sdpa_with_a_user_mask_of_full_rank_runs_at_u_rows():
    g = torch.Generator().manual_seed(0)
    q, pad = torch.randn(3, H, L, 4, generator=g), hist_batch(3, g) == 0
    idx = torch.tensor([0, 1, 1, 2])
    T = mari_fx.transform(SDPA(), ["q", "pad"], (q[idx], pad[idx], torch.randn(4)))
    assert rows_of(T, "scaled_dot_product_attention") == {"U"}
    item = torch.randn(4)
    torch.testing.assert_close(T(q=q, pad=pad, item=item, user_index=idx), SDPA()(q[idx], pad[idx], item))


@pytest.mark.parametrize("equation, ok", [
    ("bld,de->ble", True), ("...d,de->...e", True), ("bld,bd->bl", True),
    ("bld,bld->ld", False),   # contracts over the batch
    ("bld,de->lbe", False),   # the output moves the batch
    ("bld,bde->ble", False),  # a constant operand carrying b (see the test body: W is batch-free)
])
def test_einsum_rule(equation, ok):
    class E(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(D, 5))
            self.w3 = nn.Parameter(torch.randn(1, D, 5))

        def forward(self, x, y, item):
            if equation == "bld,bd->bl":
                return torch.einsum(equation, x, y).sum(-1) + item
            if equation == "bld,bld->ld":
                return torch.einsum(equation, x, x).sum() + item
            if equation == "bld,de->lbe":
                return torch.einsum(equation, x, self.w).sum(-1).sum(0) + item
            w = self.w3 if equation == "bld,bde->ble" else self.w
            return torch.einsum(equation, x, w).sum(-1).sum(-1) + item

    g = torch.Generator().manual_seed(0)
    x, y, item = torch.randn(4, 3, D, generator=g), torch.randn(4, D, generator=g), torch.randn(4)
    model = E()
    T = mari_fx.transform(model, ["x", "y"], (x, y, item))
    rows = rows_of(T, "einsum")
    assert rows == ({"U"} if ok else {"N"}), rows
    if not ok:
        assert any("einsum" in r.reason for r in T.meta["mari_fx.record"].refused)
    idx = torch.tensor([0, 0, 1, 3, 2])
    item = torch.randn(5)
    torch.testing.assert_close(T(x=x, y=y, item=item, user_index=idx), model(x[idx], y[idx], item))


# --------------------------------------------------------------------------- bags: declaration and requests
def test_bag_selector_string_and_request_round_trip():
    model = build(BagRanker)
    T, cell = bag_case(model)
    spec = T.meta["mari_fx.request"]
    assert [(s.name, str(s.side), s.kind) for s in spec.inputs] == [
        ("tag", "user", "bag"), ("item_id", "item", "tensor"), ("item_tag", "item", "bag")]
    assert mari_fx.frontend.inputs.parse_selector("bag(tag_ids, tag_offsets, tag_weights)") == mari_fx.Bag(
        "tag_ids", "tag_offsets", "tag_weights")
    request, pairs = cell(3, 7, seed=5)
    names = ("tag_ids", "tag_offsets", "tag_weights", "item_id", "item_tag_ids", "item_tag_offsets")
    rebuilt = mari_fx.pairs_to_request(T, **dict(zip(names, pairs)), user_index=request["user_index"])
    assert rebuilt["tag"].rows == 3 and rebuilt["item_tag"].rows == 7
    back = mari_fx.request_to_pairs(T, rebuilt)
    for k, v in zip(names, pairs):
        assert torch.equal(back[k], v), k
    assert mari_fx.verify(model, T) < 1e-5


def test_bag_requests_are_checked():
    model = build(BagRanker)
    T, cell = bag_case(model)
    request, _ = cell(3, 7, seed=5)
    request["tag"] = bag_take(request["tag"], torch.tensor([0, 1]))  # 2 bags for 3 users
    with pytest.raises(mari_fx.RequestError, match="'tag' has 2 rows"):
        T(**request)


def test_bag_pairs_must_repeat_per_user():
    model = build(BagRanker)
    T, cell = bag_case(model)
    request, pairs = cell(2, 4, seed=5)
    pairs = list(pairs)
    pairs[0] = pairs[0].clone()
    pairs[0][-1] = (pairs[0][-1] + 1) % VOCAB  # the last pair's user bag differs from its user's others
    names = ("tag_ids", "tag_offsets", "tag_weights", "item_id", "item_tag_ids", "item_tag_offsets")
    idx = torch.tensor([0, 1, 1, 1])
    pb = bag_take(request["tag"], idx)
    kwargs = dict(zip(names, pairs), tag_ids=pb.ids.clone(), tag_offsets=pb.offsets, tag_weights=pb.per_sample_weights)
    kwargs["tag_ids"][-1] += 1
    with pytest.raises(mari_fx.RequestError, match="bag\\(tag_ids, tag_offsets, tag_weights\\)"):
        mari_fx.pairs_to_request(T, **kwargs, user_index=idx)


def test_undeclared_flat_ids_are_explained():
    model = build(BagRanker)
    g = torch.Generator().manual_seed(1)
    ub, ib = bags(4, g, weights=True), bags(4, g)
    example = dict(tag_ids=ub.ids, tag_offsets=ub.offsets, tag_weights=ub.per_sample_weights,
                   item_id=torch.randint(VOCAB, (4,), generator=g), item_tag_ids=ib.ids, item_tag_offsets=ib.offsets)
    with pytest.raises(mari_fx.DeclarationError, match="tag_ids.*Bag\\('ids', 'offsets'\\)"):
        mari_fx.transform(model, ["tag_ids", "tag_offsets"], example_kwargs=example)
    with pytest.raises(mari_fx.DeclarationError, match="'nope', which forward does not take"):
        mari_fx.transform(model, ["bag(tag_ids, nope)"], example_kwargs=example)
    with pytest.raises(mari_fx.DeclarationError, match="declared both"):
        mari_fx.transform(model, ["bag(tag_ids, tag_offsets)", "tag_ids"], example_kwargs=example)


# --------------------------------------------------------------------------- FLOPs count what runs
def _slow_path_flops(fn):
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as c:
            fn()
    finally:
        torch.backends.mha.set_fastpath_enabled(before)
    return c.get_total_flops()


def test_report_flops_of_encoder_models_count_the_encoder():
    from mari_fx.report import build_report

    model = build(EncoderRanker)
    T, _ = seq_case(model)
    r = build_report(model, T, users=1, candidates=50)
    request = mari_fx.random_request(T, 1, 50, 0)
    pairs = mari_fx.request_to_pairs(T, request)
    assert r["flops"]["before"] == _slow_path_flops(lambda: model(**pairs))
    assert r["flops"]["after"] == _slow_path_flops(lambda: T(**request)) == model.min_flops(1, 50)
    with torch.no_grad(), FlopCounterMode(display=False) as fast:
        model(**pairs)
    assert fast.get_total_flops() < r["flops"]["before"] // 2  # what the fast path used to hide


def test_coverage_flops_of_the_bst_family_count_the_encoder(monkeypatch):
    from mari_fx import coverage

    fams = [f for f in coverage._families() if "BST" in f[0] or "padding mask" in f[0]]
    assert len(fams) == 2
    monkeypatch.setattr(coverage, "_families", lambda: fams)
    counts = []

    def checked(module, *args, **kwargs):
        n = mari_fx.report.flops.count_flops(module, *args, **kwargs)
        assert n == _slow_path_flops(lambda: module(*args, **kwargs))
        counts.append(n)
        return n

    monkeypatch.setattr(coverage.mari_fx, "count_flops", checked)
    for row, (before, after) in zip(coverage.coverage_rows(), zip(counts[::2], counts[1::2])):
        assert (row[1], row[2]) == (f"{before / 1e6:.2f}", f"{after / 1e6:.2f}")
        # the encoder (user-only) runs at U = 1 row after, at N = 1000 rows before
        assert before / after > 3 and row[6] == 0  # nothing refused, the mask included


# --------------------------------------------------------------------------- seq-first modules
class SeqFirstRanker(nn.Module):
    """torch's default layout: seq-first attention modules (``batch_first=False``) reached with
    ``h.transpose(0, 1)`` / ``h.permute(1, 0, 2)`` and back; ``kind="batch_as_seq"`` hands the
    ``[B, L, E]`` tensor to a seq-first layer as it is, so the layer attends across the batch."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.emb = nn.Embedding(VOCAB, D)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(D, H, FF, dropout=0.0), 2,
                                         enable_nested_tensor=False)
        self.layer = nn.TransformerEncoderLayer(D, H, FF, dropout=0.0)
        self.mha = nn.MultiheadAttention(D, H)
        self.top = nn.Sequential(nn.Linear(2 * D, HID), nn.ReLU(), nn.Linear(HID, 1))

    def forward(self, hist, item):
        pad = hist == 0
        h = self.emb(hist)
        if self.kind == "encoder":
            s = self.enc(h.transpose(0, 1), src_key_padding_mask=pad).transpose(0, 1)
        elif self.kind == "layer_permute":
            s = self.layer(h.permute(1, 0, 2), src_key_padding_mask=pad).permute(1, 0, 2)
        elif self.kind == "mha":
            hs = h.transpose(0, 1)
            s = self.mha(hs, hs, hs, key_padding_mask=pad)[0].transpose(0, 1)
        elif self.kind in ("first_position", "mean_over_dim0"):  # pooled while still seq-first
            s = self.enc(h.transpose(0, 1), src_key_padding_mask=pad)
            pooled = s[0] if self.kind == "first_position" else s.mean(0)
            return self.top(torch.cat([pooled, self.emb(item)], -1)).squeeze(-1)
        elif self.kind == "target_mha":  # the candidate as a one-position query [1, B, E]
            hs = h.transpose(0, 1)
            att = self.mha(self.emb(item).unsqueeze(0), hs, hs, key_padding_mask=pad)[0].squeeze(0)
            return self.top(torch.cat([att, masked_mean(h, ~pad)], -1)).squeeze(-1)
        else:  # batch_as_seq
            s = self.layer(h)
        return self.top(torch.cat([masked_mean(s, ~pad), self.emb(item)], -1)).squeeze(-1)


SEQ_FIRST_KINDS = {"encoder": "enc", "layer_permute": "layer", "mha": "mha", "first_position": "enc",
                   "mean_over_dim0": "enc", "target_mha": "mha", "batch_as_seq": "layer"}


@pytest.mark.parametrize("kind", list(SEQ_FIRST_KINDS))
def test_seq_first_modules_run_at_u_rows_as_the_model_calls_them(kind):
    model = SeqFirstRanker(kind).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    ex = hist_batch(4, g)
    T = mari_fx.transform(model, ["hist"], (ex, torch.randint(VOCAB, (4,), generator=g)))
    path = SEQ_FIRST_KINDS[kind]
    # the caller's model is untouched: its classes, flags and tensors
    assert [type(m) for m in model.modules()] == [type(m) for m in SeqFirstRanker(kind).modules()]
    assert not any(a.batch_first for a in model.modules() if isinstance(a, nn.MultiheadAttention))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # the model's own module, called at its own path; no twin class or path left in T
    assert rows_of(T, path) == ({"N"} if kind in ("batch_as_seq", "target_mha") else {"U"})
    if kind in ("first_position", "mean_over_dim0"):  # pooled at U rows: the first Linear splits
        (top,) = [l for l in T.meta["mari_fx.record"].layers if l.name == "top.0"]
        assert top.action == "split" and top.split_user_features == D, top
    assert {type(m).__module__.split(".")[0] for _, m in T.named_modules() if _} <= {"torch", "mari_fx"}
    assert not any("batch_first" in k for k in T.state_dict())
    assert not any(type(m).__name__.startswith("BatchFirst") for m in T.modules())
    for U, N in CELLS:
        hist = hist_batch(U, g)
        hist[0] = 0  # a user with an empty history: a fully padded sequence (the slow path's values)
        item, idx = torch.randint(VOCAB, (N,), generator=g), ragged(U, N, g)
        with torch.no_grad():
            torch.testing.assert_close(T(hist=hist, item=item, user_index=idx), model(hist[idx], item),
                                       equal_nan=True)


def test_seq_first_encoder_deploys_as_stock_modules():
    model = SeqFirstRanker("encoder").eval()
    g = torch.Generator().manual_seed(1)
    T = mari_fx.transform(model, ["hist"], (hist_batch(4, g), torch.randint(VOCAB, (4,), generator=g)))
    request = dict(hist=hist_batch(3, g), item=torch.randint(VOCAB, (9,), generator=g), user_index=ragged(3, 9, g))
    with torch.no_grad():
        want = T(**request)
        torch.testing.assert_close(mari_fx.export(T, request).module()(**request), want)
        torch.testing.assert_close(mari_fx.export.script(T)(**request), want)


def test_control_seq_first_module_read_as_batch_first(monkeypatch):
    """Positive control: with every attention module read as batch-first (the batch_first=False
    check dropped), the layer handed [B, L, E] -- attending across the batch -- is computed per
    user, and the batch_as_seq check above sees a wrong answer."""
    from mari_fx.analysis.rules import sequence

    monkeypatch.setattr(sequence, "_batch_first_twin", lambda module: True)
    model = SeqFirstRanker("batch_as_seq").eval()
    g = torch.Generator().manual_seed(2)
    T = mari_fx.transform(model, ["hist"], (hist_batch(4, g), torch.randint(VOCAB, (4,), generator=g)))
    assert rows_of(T, "layer") == {"U"}
    hist, item, idx = hist_batch(3, g), torch.randint(VOCAB, (7,), generator=g), ragged(3, 7, g)
    with torch.no_grad():
        assert not torch.allclose(T(hist=hist, item=item, user_index=idx), model(hist[idx], item), atol=1e-4)


class SASRecBlocks(nn.Module):
    """pmixer/SASRec.pytorch's ``log2feats`` as the user encoder of a ranker: per block, seq-first
    ``MultiheadAttention`` between transposes with a LayerNorm-ed query and a residual computed
    seq-first (``Q = norm(seqs.T)``, ``seqs = Q + mha(Q, seqs.T, seqs.T)[0]``), a point-wise
    feed-forward of ``Conv1d(kernel_size=1)`` over ``seqs.transpose(-1, -2)``, in-place masking."""

    def __init__(self, blocks: int = 2):
        super().__init__()
        self.item_emb, self.pos_emb = nn.Embedding(VOCAB, D, padding_idx=0), nn.Embedding(L, D)
        self.norm_q = nn.ModuleList(nn.LayerNorm(D, eps=1e-8) for _ in range(blocks))
        self.attn = nn.ModuleList(nn.MultiheadAttention(D, H, 0.2) for _ in range(blocks))
        self.norm_f = nn.ModuleList(nn.LayerNorm(D, eps=1e-8) for _ in range(blocks))
        self.conv1 = nn.ModuleList(nn.Conv1d(D, D, 1) for _ in range(blocks))
        self.conv2 = nn.ModuleList(nn.Conv1d(D, D, 1) for _ in range(blocks))
        self.last = nn.LayerNorm(D, eps=1e-8)
        self.register_buffer("positions", torch.arange(L))
        self.top = nn.Sequential(nn.Linear(2 * D, HID), nn.ReLU(), nn.Linear(HID, 1))

    def forward(self, hist, item):
        seqs = self.item_emb(hist)
        seqs *= D ** 0.5
        seqs += self.pos_emb(self.positions)
        keep = ~(hist == 0).unsqueeze(-1)
        seqs *= keep
        causal = ~torch.tril(torch.ones((L, L), dtype=torch.bool))
        for norm_q, attn, norm_f, conv1, conv2 in zip(self.norm_q, self.attn, self.norm_f, self.conv1, self.conv2):
            seqs = torch.transpose(seqs, 0, 1)
            Q = norm_q(seqs)
            out, _ = attn(Q, seqs, seqs, attn_mask=causal)
            seqs = torch.transpose(Q + out, 0, 1)
            seqs = norm_f(seqs)
            ff = conv2(torch.relu(conv1(seqs.transpose(-1, -2)))).transpose(-1, -2)
            seqs = (ff + seqs) * keep
        return self.top(torch.cat([self.last(seqs)[:, -1, :], self.item_emb(item)], -1)).squeeze(-1)


def test_sasrec_blocks_run_at_u_rows():
    """The swaps around seq-first attention are sunk past the LayerNorm and the residual add
    (mari_fx.analysis.seq_first.sink_swaps) and cancel: the whole encoder, Conv1d feed-forward
    included, runs once per user, and the top layer splits on its 8 user columns."""
    model = SASRecBlocks().eval()
    g = torch.Generator().manual_seed(3)
    T = mari_fx.transform(model, ["hist"], (hist_batch(4, g), torch.randint(VOCAB, (4,), generator=g)))
    encoder = [n for n in T.graph.nodes if n.op == "call_module" and n.target.split(".")[0] in
               ("norm_q", "attn", "norm_f", "conv1", "conv2", "last")]
    assert len(encoder) == 11 and all(n.meta[ROWS_KEY] == "U" for n in encoder)
    (top,) = [l for l in T.meta["mari_fx.record"].layers if l.name == "top.0"]
    assert top.action == "split" and top.split_user_features == D
    for U, N in CELLS:
        hist, item, idx = hist_batch(U, g), torch.randint(VOCAB, (N,), generator=g), ragged(U, N, g)
        with torch.no_grad():
            torch.testing.assert_close(T(hist=hist, item=item, user_index=idx), model(hist[idx], item))


class SeqFirstViews(nn.Module):
    """``view`` of a seq-first value the model had contiguous (a Linear's or an attention module's
    output), merging the sequence with the batch: the rewrite must hand it the same layout."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.lin = nn.Linear(D, D)
        self.mha = nn.MultiheadAttention(D, H)
        self.enc = nn.TransformerEncoderLayer(D, H, FF, dropout=0.0)
        self.top = nn.Linear(L * D, 1)

    def forward(self, h, item):
        s = h.transpose(0, 1)  # [L, B, D]
        y = {"linear": lambda: self.lin(s), "mha": lambda: self.mha(s, s, s)[0], "encoder": lambda: self.enc(s)}[self.kind]()
        y = y.view(-1, D).view(L, -1, D)  # only a contiguous [L, B, D] views as [L * B, D]
        return self.top(y.transpose(0, 1).reshape(-1, L * D) + item.repeat(1, L)).squeeze(-1)


@pytest.mark.parametrize("kind", ["linear", "mha", "encoder"])
def test_views_of_rewritten_seq_first_values_get_their_layout(kind):
    model = SeqFirstViews(kind).eval()
    g = torch.Generator().manual_seed(5)
    T = mari_fx.transform(model, ["h"], (torch.randn(4, L, D, generator=g), torch.randn(4, D, generator=g)))
    assert rows_of(T, {"linear": "lin", "mha": "mha", "encoder": "enc"}[kind]) == {"U"}
    for U, N in CELLS:
        h, item, idx = torch.randn(U, L, D, generator=g), torch.randn(N, D, generator=g), ragged(U, N, g)
        with torch.no_grad():
            torch.testing.assert_close(T(h=h, item=item, user_index=idx), model(h[idx], item))


class RecBoleSASRec(nn.Module):
    """RecBole's SASRec as a ranker's user encoder: positions ``arange(L).unsqueeze(0).expand_as(seq)``,
    an extended attention mask, ``nn.Softmax`` built inside forward (torch.fx cannot trace that, so
    it is captured by torch.export, in ATen ops), and ``gather_indexes`` of the last real item."""

    def __init__(self):
        super().__init__()
        self.item_emb, self.pos = nn.Embedding(VOCAB, D, padding_idx=0), nn.Embedding(L, D)
        self.q, self.k, self.v, self.dense = (nn.Linear(D, D) for _ in range(4))
        self.ln = nn.LayerNorm(D)
        self.head = nn.Sequential(nn.Linear(2 * D + 3, HID), nn.ReLU(), nn.Linear(HID, 1))

    def heads(self, x):
        return x.view(x.size()[:-1] + (H, D // H)).permute(0, 2, 1, 3)

    def forward(self, hist, hist_len, item, feat):
        pos = torch.arange(hist.size(1), dtype=torch.long).unsqueeze(0).expand_as(hist)
        h = self.ln(self.item_emb(hist) + self.pos(pos))
        mask = torch.tril((hist > 0).long().unsqueeze(1).unsqueeze(2).expand(-1, -1, hist.size(-1), -1))
        mask = torch.where(mask.bool(), 0.0, -10000.0)
        scores = torch.matmul(self.heads(self.q(h)), self.heads(self.k(h)).transpose(-1, -2)) / math.sqrt(D // H)
        c = torch.matmul(nn.Softmax(dim=-1)(scores + mask), self.heads(self.v(h))).permute(0, 2, 1, 3)
        h = self.ln(self.dense(c.contiguous().view(c.size()[:-2] + (D,))) + h)
        last = h.gather(dim=1, index=(hist_len - 1).view(-1, 1, 1).expand(-1, -1, D)).squeeze(1)
        return self.head(torch.cat([last, self.item_emb(item), feat], 1))


def test_export_captured_sasrec_runs_its_encoder_at_u_rows():
    """The ATen spellings (``expand_as``, ``arange``, ``gather``) have the rules of the torch ones:
    the export-captured encoder and the last-item gather run at U rows, the head splits."""
    g = torch.Generator().manual_seed(0)

    def batch(users, n):
        idx = ragged(users, n, g)
        hist = hist_batch(users, g)
        return (hist[idx], (hist > 0).sum(1)[idx], torch.randint(1, VOCAB, (n,), generator=g),
                torch.randn(n, 3, generator=g)), idx

    model = RecBoleSASRec().eval()
    T = mari_fx.transform(model, ["hist", "hist_len"], batch(3, 8)[0])
    record = T.meta["mari_fx.record"]
    assert record.capture == "torch.export"
    (layer,) = [l for l in record.layers if l.action == "split"]
    assert layer.split_user_features == D, layer
    for op in (torch.ops.aten.expand_as.default, torch.ops.aten.gather.default, torch.ops.aten.softmax.int):
        assert rows_of(T, op) == {"U"}, op
    for users, n in CELLS[1:]:
        pairs, idx = batch(users, n)
        with torch.no_grad():
            torch.testing.assert_close(T(**mari_fx.pairs_to_request(T, *pairs, user_index=idx)), model(*pairs))


class Untraceable(nn.Module):
    """``model`` behind a Python loop over a size: torch.fx fails, so it is captured by torch.export."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, hist, item):
        ones = sum(hist[:, k:k + 1] * 0 for k in range(hist.shape[1])) + 1
        return self.model(hist * ones, item)


@pytest.mark.parametrize("kind", ["encoder", "layer_permute", "mha", "first_position", "mean_over_dim0"])
def test_seq_first_modules_run_at_u_rows_under_export(kind):
    """The export route reaches the seq-first rewrites too: the module calls are kept whole
    (mari_fx.frontend.outline) and the ATen transposes, selects and pools around them are read
    like their torch spellings."""
    model = Untraceable(SeqFirstRanker(kind)).eval()
    g = torch.Generator().manual_seed(0)
    T = mari_fx.transform(model, ["hist"], (hist_batch(4, g), torch.randint(VOCAB, (4,), generator=g)))
    assert T.meta["mari_fx.record"].capture == "torch.export"
    assert rows_of(T, "model." + SEQ_FIRST_KINDS[kind]) == {"U"}
    for U, N in CELLS:
        hist, item, idx = hist_batch(U, g), torch.randint(VOCAB, (N,), generator=g), ragged(U, N, g)
        with torch.no_grad():
            torch.testing.assert_close(T(hist=hist, item=item, user_index=idx), model(hist[idx], item))


class LastStepPick(nn.Module):
    """GRU4Rec as many implementations pick the last valid step: ``o[torch.arange(B), lengths - 1]``
    (``pos="item"`` picks a step chosen by the candidate: mixed, at N rows)."""

    def __init__(self, pos: str = "user"):
        super().__init__()
        self.pos = pos
        self.emb = nn.Embedding(VOCAB, D, padding_idx=0)
        self.gru = nn.GRU(D, D, batch_first=True)
        self.top = nn.Sequential(nn.Linear(2 * D, HID), nn.ReLU(), nn.Linear(HID, 1))

    def forward(self, hist, item):
        o, _ = self.gru(self.emb(hist))
        step = (hist > 0).sum(1) - 1 if self.pos == "user" else item % L - L  # negative: from the end
        return self.top(torch.cat([o[torch.arange(hist.size(0)), step], self.emb(item)], -1)).squeeze(-1)


@pytest.mark.parametrize("pos", ["user", "item"])
def test_last_step_picked_by_arange_indexing(pos):
    """``x[torch.arange(B), idx]`` pairs every row with itself: read as ``x.gather(1, idx)``
    (mari_fx.analysis.folds.index_row_picks), a user-only pick stays at U rows and the top splits."""
    model = LastStepPick(pos).eval()
    g = torch.Generator().manual_seed(4)
    T = mari_fx.transform(model, ["hist"], (hist_batch(4, g), torch.randint(1, VOCAB, (4,), generator=g)))
    (top,) = [l for l in T.meta["mari_fx.record"].layers if l.name == "top.0"]
    gathers = [n for n in T.graph.nodes if n.target is torch.gather]
    assert rows_of(T, "gru") == {"U"} and len(gathers) == 1
    if pos == "user":
        assert gathers[0].meta[ROWS_KEY] == "U" and top.action == "split" and top.split_user_features == D, top
    else:
        assert gathers[0].meta[ROWS_KEY] == "N"
    for U, N in CELLS:
        hist, item, idx = hist_batch(U, g), torch.randint(1, VOCAB, (N,), generator=g), ragged(U, N, g)
        with torch.no_grad():
            torch.testing.assert_close(T(hist=hist, item=item, user_index=idx), model(hist[idx], item))
