"""Field-layout ranking models (per-feature embeddings, field stacks, pairwise interactions,
crosses) and TorchRec's DLRM family, each with its user-side selectors and a pair-batch maker.

A case is ``Case(name, build, selectors, pairs)``: ``build()`` returns the eval-mode model,
``pairs(U, N, seed)`` returns ``(args, user_index)`` -- pair-shaped forward arguments where every
pair of a user carries that user's features, and the ragged ``user_index``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Sequence, Tuple

import torch
import torch.nn as nn

from helpers import mlp, ragged_index

E = 8  # embedding dim of every field
V = 50  # ids per field


@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]
    selectors: Sequence[str]
    pairs: Callable[[int, int, int], Tuple[tuple, torch.Tensor]]


# --------------------------------------------------------------------------- own CTR models
class PerFeatureCTR(nn.Module):
    """Per-feature embeddings ``[B, 1, E]`` of interleaved user and item fields, stacked and
    flattened into an MLP; ``style`` picks how the stack is built and flattened."""

    def __init__(self, style: str, fu: int = 2, fi: int = 2):
        super().__init__()
        self.style, self.fu, self.fi = style, fu, fi
        self.emb = nn.ModuleList(nn.Embedding(V, E) for _ in range(fu + fi))
        self.dense_u = nn.Linear(3, E)
        f = fu + fi
        self.mlp = mlp([f * E + E, 32, 16])
        self.out = nn.Linear(16, 1)

    def fields(self, user_ids, item_ids):
        out = []
        for k in range(max(self.fu, self.fi)):  # interleaved: u0, i0, u1, i1, ...
            if k < self.fu:
                out.append(self.emb[2 * k](user_ids[:, k:k + 1]))
            if k < self.fi:
                out.append(self.emb[2 * k + 1](item_ids[:, k:k + 1]))
        return out  # each [B, 1, E]

    def forward(self, user_ids, item_ids, user_dense):
        fs = self.fields(user_ids, item_ids)
        B = user_ids.shape[0]
        f = len(fs)
        if self.style == "cat1_flatten":
            x = torch.flatten(torch.cat(fs, dim=1), start_dim=1)
        elif self.style == "catlast_view":
            x = torch.cat(fs, dim=-1).view(-1, f * E)
        elif self.style == "cat1_reshape":
            x = torch.cat(fs, dim=1).reshape(B, -1)
        else:
            raise ValueError(self.style)
        x = torch.cat([x, self.dense_u(user_dense)], dim=1)
        return self.out(self.mlp(x)).squeeze(-1)


class FieldInteractions(nn.Module):
    """A field stack ``[B, F, E]`` with FM, PNN inner products (triu gather), a DCN cross via
    tensordot and a low-rank cross, all feeding one MLP."""

    def __init__(self, fu: int = 3, fi: int = 2):
        super().__init__()
        f = fu + fi
        self.fu, self.fi = fu, fi
        self.emb = nn.ModuleList(nn.Embedding(V, E) for _ in range(f))
        iu, ju = torch.triu_indices(f, f, offset=1)
        self.register_buffer("iu", iu)
        self.register_buffer("ju", ju)
        self.cross_w = nn.Parameter(torch.randn(f * E, f * E) * 0.05)
        self.cross_b = nn.Parameter(torch.zeros(f * E))
        self.V = nn.Linear(f * E, 4, bias=False)
        self.Uo = nn.Linear(4, f * E)
        self.mlp = mlp([f * E + f * (f - 1) // 2 + 1 + f * E + f * E, 32])
        self.out = nn.Linear(32, 1)

    def forward(self, user_ids, item_ids):
        B = user_ids.shape[0]
        fs = [self.emb[k](user_ids[:, k]) for k in range(self.fu)]
        fs += [self.emb[self.fu + k](item_ids[:, k]) for k in range(self.fi)]
        order = [fs[0], fs[self.fu], *fs[1:self.fu], *fs[self.fu + 1:]]  # user and item fields interleaved
        X = torch.stack(order, dim=1)  # [B, F, E]
        flat = X.reshape(B, -1)
        s = X.sum(dim=1)
        fm = 0.5 * (s * s - (X * X).sum(dim=1)).sum(dim=1, keepdim=True)
        gram = torch.bmm(X, X.transpose(1, 2))
        pnn = gram[:, self.iu, self.ju]
        cross = flat * (torch.tensordot(flat, self.cross_w, dims=([1], [0])) + self.cross_b) + flat
        low = flat * self.Uo(self.V(flat)) + flat
        h = self.mlp(torch.cat([flat, pnn, fm, cross, low], dim=1))
        return self.out(h).squeeze(-1)


class TargetAttention(nn.Module):
    """DIN-style target attention with the sequence folded into the batch dim: the candidate
    ``q`` expanded over the user's history ``k``, ``cat([q, k, q - k, q * k])`` folded to
    ``[B * L, 4E]`` (``view(-1, 4E)`` or ``reshape(B * L, 4E)``) through an MLP, unfolded to
    ``[B, L]`` scores, masked softmax, weighted sum of ``k``."""

    def __init__(self, style: str = "view", L: int = 6):
        super().__init__()
        self.style, self.L = style, L
        self.emb = nn.Embedding(V, E)
        self.att = mlp([4 * E, 16, 1], last_act=False)
        self.mlp = mlp([3 * E, 16])
        self.out = nn.Linear(16, 1)

    def forward(self, user_hist, item_ids):
        B, L = user_hist.shape
        k = self.emb(user_hist)  # [B, L, E]
        q = self.emb(item_ids[:, 0])  # [B, E]
        qe = q.unsqueeze(1).expand(-1, L, -1)
        x = torch.cat([qe, k, qe - k, qe * k], dim=-1)
        if self.style == "view":
            s = self.att(x.view(-1, 4 * E)).view(B, L)
        else:
            s = self.att(x.reshape(B * L, 4 * E)).squeeze(-1).reshape(B, L)
        w = torch.softmax(s.masked_fill(user_hist == 0, -1e9), dim=1)
        pooled = (w.unsqueeze(-1) * k).sum(1)
        return self.out(self.mlp(torch.cat([pooled, q, k.mean(1)], dim=-1))).squeeze(-1)


class FieldCrossStack(nn.Module):
    """Chained DCN-v2 crosses over field rows: every field's embedding next to a user context
    (``x0 = cat([fields, ctx.expand(-1, F, -1)], -1)``, [B, F, E + D]), two cross layers
    ``x_{l+1} = x0 * c_l(x_l) + x_l`` applied per field row, flattened into an MLP.  ``c0`` splits
    on the context columns; its output rows at user fields are user-only, so the MLP's split
    re-computes them at U rows through ``c0``'s split."""

    def __init__(self, fu: int = 2, fi: int = 2, D: int = 4):
        super().__init__()
        self.fu, self.fi = fu, fi
        self.emb = nn.ModuleList(nn.Embedding(V, E) for _ in range(fu + fi))
        self.ctx = nn.Linear(3, D)
        self.c0 = nn.Linear(E + D, E + D)
        self.c1 = nn.Linear(E + D, E + D)
        self.mlp = mlp([(fu + fi) * (E + D), 16])
        self.out = nn.Linear(16, 1)

    def forward(self, user_ids, item_ids, user_dense):
        fs = []
        for k in range(max(self.fu, self.fi)):  # u0, i0, u1, i1
            if k < self.fu:
                fs.append(self.emb[2 * k](user_ids[:, k]))
            if k < self.fi:
                fs.append(self.emb[2 * k + 1](item_ids[:, k]))
        X = torch.stack(fs, dim=1)
        ctx = self.ctx(user_dense)
        x0 = torch.cat([X, ctx.unsqueeze(1).expand(-1, X.shape[1], -1)], dim=-1)
        x1 = x0 * self.c0(x0) + x0
        x2 = x0 * self.c1(x1) + x1
        return self.out(self.mlp(x2.flatten(1))).squeeze(-1)


class MaskedSelectPNN(nn.Module):
    """Inner-product PNN as FuxiCTR writes it: the upper triangle of the field Gram matrix picked by
    ``torch.masked_select(bmm(e, e^T), triu_mask).view(-1, K)`` (a fold of the batch into one dim),
    next to the flattened fields, into an MLP."""

    def __init__(self, fu: int = 2, fi: int = 2):
        super().__init__()
        self.fu, self.fi = fu, fi
        f = fu + fi
        self.pairs = f * (f - 1) // 2
        self.emb = nn.ModuleList(nn.Embedding(V, E) for _ in range(f))
        self.triu_mask = nn.Parameter(torch.triu(torch.ones(f, f), 1).bool(), requires_grad=False)
        self.mlp = mlp([f * E + self.pairs, 16])
        self.out = nn.Linear(16, 1)

    def forward(self, user_ids, item_ids):
        fs = [self.emb[k](user_ids[:, k]) for k in range(self.fu)]
        fs += [self.emb[self.fu + k](item_ids[:, k]) for k in range(self.fi)]
        e = torch.stack(fs, dim=1)  # [B, F, E]: user fields first
        inner = torch.masked_select(torch.bmm(e, e.transpose(1, 2)), self.triu_mask).view(-1, self.pairs)
        return self.out(self.mlp(torch.cat([e.flatten(start_dim=1), inner], dim=1))).squeeze(-1)


class AutoIntCTR(nn.Module):
    """AutoInt as CTR libraries write it: per-feature ``[B, 1, E]`` fields of interleaved user and
    item features, an interacting layer whose heads are split off with
    ``torch.stack(torch.split(q, e, dim=2))`` ([H, B, F, e]: the batch in dim 1) and merged with
    ``torch.cat(torch.split(r, 1), dim=-1)``, next to a DNN over the flattened fields."""

    def __init__(self, fu: int = 2, fi: int = 2, heads: int = 2):
        super().__init__()
        self.fu, self.fi, self.heads = fu, fi, heads
        self.emb = nn.ModuleList(nn.Embedding(V, E) for _ in range(fu + fi))
        self.W = nn.ParameterDict({k: nn.Parameter(torch.randn(E, E) * 0.3) for k in ("Q", "K", "V", "R")})
        self.mlp = mlp([(fu + fi) * E, 16])
        self.out = nn.Linear((fu + fi) * E + 16, 1)

    def forward(self, user_ids, item_ids):
        fs = []
        for k in range(max(self.fu, self.fi)):  # u0, i0, u1, i1
            if k < self.fu:
                fs.append(self.emb[2 * k](user_ids[:, k:k + 1]))
            if k < self.fi:
                fs.append(self.emb[2 * k + 1](item_ids[:, k:k + 1]))
        x = torch.cat(fs, dim=1)  # [B, F, E]
        e = E // self.heads
        q, k, v = (torch.stack(torch.split(torch.tensordot(x, self.W[n], dims=([-1], [0])), e, dim=2))
                   for n in "QKV")
        att = torch.softmax(torch.einsum("bnik,bnjk->bnij", q, k), dim=-1)
        r = torch.cat(torch.split(torch.matmul(att, v), 1), dim=-1).squeeze(dim=0)
        r = torch.relu(r + torch.tensordot(x, self.W["R"], dims=([-1], [0])))
        deep = self.mlp(torch.flatten(x, start_dim=1))
        return self.out(torch.cat([torch.flatten(r, start_dim=1), deep], dim=-1)).squeeze(-1)


def _hist_pairs(L: int = 6):
    def pairs(U: int, N: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        idx = ragged_index(U, N, seed)
        hist = torch.randint(V, (U, L), generator=g)
        hist[:, -1] = 0  # padding: masked out
        return (hist[idx], torch.randint(1, V, (N, 1), generator=g)), idx

    return pairs


def _ids_pairs(fu: int, fi: int, dense: int = 0):
    def pairs(U: int, N: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        idx = ragged_index(U, N, seed)
        u = torch.randint(V, (U, fu), generator=g)
        i = torch.randint(V, (N, fi), generator=g)
        args = (u[idx], i)
        if dense:
            args += (torch.randn(U, dense, generator=g)[idx],)
        return args, idx

    return pairs


def own_cases() -> List[Case]:
    cases = [Case(f"per_feature_{s}", lambda s=s: PerFeatureCTR(s).eval(), ["user_ids", "user_dense"],
                  _ids_pairs(2, 2, dense=3)) for s in ("cat1_flatten", "catlast_view", "cat1_reshape")]
    cases.append(Case("field_interactions", lambda: FieldInteractions().eval(), ["user_ids"], _ids_pairs(3, 2)))
    cases.append(Case("masked_select_pnn", lambda: MaskedSelectPNN().eval(), ["user_ids"], _ids_pairs(2, 2)))
    cases.append(Case("autoint_heads", lambda: AutoIntCTR().eval(), ["user_ids"], _ids_pairs(2, 2)))
    cases.append(Case("field_cross_stack", lambda: FieldCrossStack().eval(), ["user_ids", "user_dense"],
                      _ids_pairs(2, 2, dense=3)))
    cases += [Case(f"target_attention_{s}", lambda s=s: TargetAttention(s).eval(), ["user_hist"], _hist_pairs())
              for s in ("view", "reshape")]
    return cases


# --------------------------------------------------------------------------- torchrec DLRM family
KEYS = ["user_id", "item_id", "user_hist", "item_cat"]  # user and item keys interleaved
USER_KEYS = ["user_id", "user_hist"]
ITEM_KEYS = ["item_id", "item_cat"]
DENSE, DENSE_USER = 8, 4  # dense columns 0:4 are user-side (packed)
TR_SELECTORS = [f"dense_features[:, 0:{DENSE_USER}]"] + [f"sparse_features[{k}]" for k in USER_KEYS]


def _ebc():
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

    return EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name=f"t_{k}", embedding_dim=E, num_embeddings=V, feature_names=[k]) for k in KEYS])


def _tr_pairs(U: int, N: int, seed: int):
    from torchrec_integration import jagged
    from torchrec_integration.examples import random_kjt

    g = torch.Generator().manual_seed(seed)
    idx = ragged_index(U, N, seed)
    dense = torch.cat([torch.randn(U, DENSE_USER, generator=g)[idx], torch.randn(N, DENSE - DENSE_USER, generator=g)], 1)
    user = random_kjt(USER_KEYS, U, V, generator=g)
    item = random_kjt(ITEM_KEYS, N, V, generator=g)
    kjt = jagged.merge([jagged.kjt_select_rows(user, idx), item], KEYS)
    return (dense, kjt), idx


def torchrec_cases() -> List[Case]:
    from torchrec.models.deepfm import SimpleDeepFMNN
    from torchrec.models.dlrm import DLRM, DLRM_DCN, DLRM_Projection

    def dlrm():
        return DLRM(_ebc(), DENSE, [16, E], [32, 1]).eval()

    def dcn():
        return DLRM_DCN(_ebc(), DENSE, [16, E], [32, 1], dcn_num_layers=2, dcn_low_rank_dim=4).eval()

    def proj():
        return DLRM_Projection(_ebc(), DENSE, [16, E], [32, 1], interaction_branch1_layer_sizes=[24, 3 * E],
                               interaction_branch2_layer_sizes=[24, 2 * E]).eval()

    def deepfm():
        return SimpleDeepFMNN(DENSE, _ebc(), hidden_layer_size=16, deep_fm_dimension=8).eval()

    return [Case(n, b, TR_SELECTORS, _tr_pairs) for n, b in
            [("DLRM", dlrm), ("DLRM_DCN", dcn), ("DLRM_Projection", proj), ("SimpleDeepFMNN", deepfm)]]


# --------------------------------------------------------------------------- the reach measurement
def measured_user_columns(model: nn.Module, args: tuple, idx: torch.Tensor) -> List[Tuple[int, int, int]]:
    """Per ``F.linear`` call (``nn.Linear`` included): ``(user-derivable input columns, rows per
    sample, out features)``.  A column is user-derivable when it is equal across all pairs of
    each user at every position and not constant over the whole batch (a measurement on data)."""
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    seen = []

    class Linears(TorchFunctionMode):
        def __torch_function__(self, func, types, a=(), kw=None):
            kw = kw or {}
            if func is F.linear:
                w = a[1] if len(a) > 1 else kw["weight"]
                seen.append((a[0].detach(), w.shape[0]))
            return func(*a, **kw)

    with torch.no_grad(), Linears():
        model(*args)
    first = torch.zeros(int(idx.max()) + 1, dtype=torch.long)
    first.scatter_reduce_(0, idx, torch.arange(idx.numel()), reduce="amin", include_self=False)
    out = []
    P = idx.numel()
    for x, out_features in seen:
        if x.ndim < 2 or x.shape[0] % P:
            out.append((0, 1, out_features))
            continue
        x3 = x.reshape(P, -1, x.shape[-1])  # rows beyond P: a batch-major fold [P * L, K]
        per_user = (x3 == x3[first[idx]]).all(0).all(0)
        varies = (x3 != x3[:1]).any(0).any(0)
        out.append((int((per_user & varies).sum()), x3.shape[1], out_features))
    return out


def realised(model: nn.Module, T, args: tuple, idx: torch.Tensor) -> float:
    """(FLOPs saved by ``T``) / (FLOPs saved if every measured user column were split)."""
    import mari_fx

    request = mari_fx.pairs_to_request(T, *args, user_index=idx)
    U, N = int(idx.max()) + 1, idx.numel()
    before, after = mari_fx.count_flops(model, *args), mari_fx.count_flops(T, **request)
    attainable = sum(2 * out * rows * (N - U) * c for c, rows, out in measured_user_columns(model, args, idx))
    return (before - after) / attainable
