"""The benchmark models re-parameterized by hand, as an engineer would (the practical limit).

Each class wraps a model from :mod:`bench.models` and shares its modules (embedding
tables, towers, later layers); the first fusion layer's weight is sliced once into
contiguous user and item column blocks (frozen copies, like ``mari_fx.SplitLinear``).
They take the request format of ``mari_fx.transform``: user inputs at U rows, item
inputs at N rows, ``user_index`` [N] int64, by keyword.

The idioms used (what a performance-minded engineer writes by hand):

* every user-only op at U rows;
* ``per_user = F.linear(u, W_u, b).index_select(0, user_index)`` followed by an
  *in-place* ``per_user.addmm_(i, W_i.T)`` (the broadcast-add fused into the
  GEMM's accumulate, no extra copy);
* for the fine ranker, the DIN activation unit's first layer factored as
  ``(W_q + W_d) q + (W_k - W_d) k + W_p (q * k)`` (q at N rows, k at U x L rows);
* for DCN-v2, the cross network run in neat column order (weights permuted at
  construction), so a fragmented layout costs nothing.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F

from .models import CoarseRanker, DCNv2, FineRanker, SeqRanker


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().clone().contiguous(), requires_grad=False)


class HandCoarse(nn.Module):
    def __init__(self, model: CoarseRanker):
        super().__init__()
        self.m = model
        u_cols, i_cols = model.fusion_columns()
        first = model.fusion[0]
        self.w_user, self.w_item = _frozen(first.weight[:, u_cols]), _frozen(first.weight[:, i_cols])
        self.bias = _frozen(first.bias)
        self.user_order = [b for b in model.order if b in model.user_blocks]
        self.item_order = [b for b in model.order if b in model.item_blocks]
        self.rest = model.fusion[1:]

    def forward(self, user_sparse, user_dense, user_hist, item_sparse, item_dense, user_index):
        ub = self.m.user_features(user_sparse, user_dense, user_hist)          # U rows
        ib = self.m.item_features(item_sparse, item_dense)                      # N rows
        u = torch.cat([ub[b] for b in self.user_order], dim=-1)
        i = torch.cat([ib[b] for b in self.item_order], dim=-1)
        h = F.linear(u, self.w_user, self.bias).index_select(0, user_index).addmm_(i, self.w_item.t())
        return self.rest(h).squeeze(-1)


class HandFine(nn.Module):
    def __init__(self, model: FineRanker):
        super().__init__()
        self.m = model
        d = model.sizes.seq_dim
        first = model.att[0]
        w = first.weight  # columns: [q | k | q - k | q * k]
        wq, wk, wd, wp = (w[:, j * d:(j + 1) * d] for j in range(4))
        self.w_q, self.w_k, self.w_p = _frozen(wq + wd), _frozen(wk - wd), _frozen(wp)
        self.b_att = _frozen(first.bias)
        self.att_rest = model.att[1:]  # Sigmoid, Linear, ...
        u_cols, i_cols = model.fusion_columns()
        f = model.fusion[0]
        self.wf_user, self.wf_item, self.bf = _frozen(f.weight[:, u_cols]), _frozen(f.weight[:, i_cols]), _frozen(f.bias)
        self.item_order = [b for b in model.order if b in model.item_blocks]
        self.fusion_rest = model.fusion[1:]

    def forward(self, user_sparse, user_dense, user_hist, item_sparse, item_dense, user_index):
        m = self.m
        u = torch.cat([emb(user_sparse[:, k]) for k, emb in enumerate(m.user_emb)] + [user_dense], dim=-1)
        tower = m.user_tower(u)                                                  # [U, T]
        keys = m.item_id_emb(user_hist)                                          # [U, L, d]
        mask = (user_hist > 0).unsqueeze(-1).to(keys.dtype)                     # [U, L, 1]
        a_k = F.linear(keys, self.w_k, self.b_att)                               # [U, L, H]
        q = m.item_id_emb(item_sparse[:, 0])                                     # [N, d]
        keys_n = keys.index_select(0, user_index)                                # [N, L, d]
        h = a_k.index_select(0, user_index)                                      # [N, L, H]
        n, L, H = h.shape
        h.view(n * L, H).addmm_((q.unsqueeze(1) * keys_n).view(n * L, -1), self.w_p.t())
        h += F.linear(q, self.w_q).unsqueeze(1)
        scores = self.att_rest(h) * mask.index_select(0, user_index)
        blocks = {"pooled": (scores * keys_n).sum(dim=1), "q": q, "item_dense": item_dense}
        for k, emb in enumerate(m.item_emb, start=1):
            blocks[f"i{k}"] = emb(item_sparse[:, k])
        i = torch.cat([blocks[b] for b in self.item_order], dim=-1)
        x = F.linear(tower, self.wf_user, self.bf).index_select(0, user_index).addmm_(i, self.wf_item.t())
        return self.fusion_rest(x).squeeze(-1)


class HandDCN(nn.Module):
    def __init__(self, model: DCNv2):
        super().__init__()
        self.m = model
        perm = model.neat_permutation()      # layout columns listed in neat order
        nu = len(model.fusion_columns()[0])
        self.user_order = [b for b in model.order if b in model.user_blocks]
        self.item_order = [b for b in model.order if b in model.item_blocks]
        first, *rest = model.cross
        w1 = first.weight[perm][:, perm]
        self.c1_user, self.c1_item, self.c1_bias = _frozen(w1[:, :nu]), _frozen(w1[:, nu:]), _frozen(first.bias[perm])
        self.cross_w = nn.ParameterList([_frozen(l.weight[perm][:, perm]) for l in rest])
        self.cross_b = nn.ParameterList([_frozen(l.bias[perm]) for l in rest])
        d1 = model.deep[0]
        wd = d1.weight[:, perm]
        self.d1_user, self.d1_item, self.d1_bias = _frozen(wd[:, :nu]), _frozen(wd[:, nu:]), _frozen(d1.bias)
        self.deep_rest = model.deep[1:]
        width = len(perm)
        self.head_w = _frozen(torch.cat([model.head.weight[:, perm], model.head.weight[:, width:]], dim=1))
        self.head_b = _frozen(model.head.bias)

    def forward(self, user_sparse, user_dense, user_hist, item_sparse, item_dense, user_index):
        m = self.m
        ub = {f"u{k}": emb(user_sparse[:, k]) for k, emb in enumerate(m.user_emb)}
        ub["user_dense"], ub["hist"] = user_dense, m.hist_emb(user_hist)
        ib = {f"i{k}": emb(item_sparse[:, k]) for k, emb in enumerate(m.item_emb)}
        ib["item_dense"] = item_dense
        u = torch.cat([ub[b] for b in self.user_order], dim=-1)                 # [U, Du]
        i = torch.cat([ib[b] for b in self.item_order], dim=-1)                 # [N, Di]
        x0 = torch.cat([u.index_select(0, user_index), i], dim=-1)              # neat order
        xw = F.linear(u, self.c1_user, self.c1_bias).index_select(0, user_index).addmm_(i, self.c1_item.t())
        x = x0 * xw + x0
        for w, b in zip(self.cross_w, self.cross_b):
            x = x0 * F.linear(x, w, b) + x
        deep = F.linear(u, self.d1_user, self.d1_bias).index_select(0, user_index).addmm_(i, self.d1_item.t())
        deep = self.deep_rest(deep)
        return F.linear(torch.cat([x, deep], dim=-1), self.head_w, self.head_b).squeeze(-1)


HANDWRITTEN = {CoarseRanker: HandCoarse, FineRanker: HandFine, DCNv2: HandDCN, SeqRanker: HandCoarse}  # the masked-sequence ranker has the coarse one's structure:
# tower and encoder at U rows (user_features), first fusion layer split


def handwritten(model: nn.Module) -> nn.Module:
    """The hand-written request-shaped rewrite of ``model`` (eval mode, sharing its modules)."""
    for cls in type(model).__mro__:
        if cls in HANDWRITTEN:
            return HANDWRITTEN[cls](model).eval()
    raise KeyError(f"no hand-written rewrite for {type(model).__name__}")


def names() -> List[str]:
    return [c.__name__ for c in HANDWRITTEN.values()]
