"""Built-in example rankers (pair-shaped, as they are trained) for the demo, docs and tests."""
from __future__ import annotations

from typing import Dict, Sequence

import torch
import torch.nn as nn


def mlp(dims: Sequence[int], last_act: bool = True) -> nn.Sequential:
    layers = []
    for k, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if last_act or k < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class CoarseRanker(nn.Module):
    """An MLP coarse ranker: a user tower, then a fusion MLP over ``cat([user_tower(u), item])``.

    ``layout="interleaved"`` feeds the fusion layer a fragmented column order
    (half the user columns, half the item columns, the rest of each) -- the
    layout that cost the MaRI paper ~38% when not permuted away.

    Example:
        >>> CoarseRanker()(torch.randn(3, 16), torch.randn(3, 8)).shape
        torch.Size([3])
    """

    def __init__(self, user_dim: int = 16, item_dim: int = 8, tower: Sequence[int] = (64, 32),
                 fusion: Sequence[int] = (64, 32), layout: str = "neat"):
        super().__init__()
        if layout not in ("neat", "interleaved"):
            raise ValueError(f"layout must be 'neat' or 'interleaved', got {layout!r}")
        self.layout = layout
        self.user_tower = mlp([user_dim, *tower])
        self.fusion = mlp([tower[-1] + item_dim, *fusion, 1], last_act=False)

    def forward(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        u = self.user_tower(user)
        if self.layout == "neat":
            x = torch.cat([u, item], dim=-1)
        else:
            h, k = u.shape[1] // 2, item.shape[1] // 2
            x = torch.cat([u[:, :h], item[:, :k], u[:, h:], item[:, k:]], dim=-1)
        return self.fusion(x).squeeze(-1)


class DictRanker(nn.Module):
    """Dict-of-tensors input, as public CTR libraries pass it: sparse ids and dense features by name.

    User keys: ``user_id``, ``user_age``, ``hist_item_ids`` (a pooled behaviour sequence);
    item keys: ``item_id``, ``item_price``.

    Example:
        >>> m = DictRanker()
        >>> m(DictRanker.example_batch(4)).shape
        torch.Size([4, 1])
    """

    def __init__(self, num_users: int = 100, num_items: int = 200, dim: int = 8):
        super().__init__()
        self.user_emb = nn.Embedding(num_users, dim)
        self.item_emb = nn.Embedding(num_items, dim)
        self.user_mlp = mlp([2 * dim + 1, 32])
        self.head = mlp([32 + dim + 1, 32, 1], last_act=False)

    def forward(self, x: Dict[str, torch.Tensor]) -> torch.Tensor:
        hist = self.item_emb(x["hist_item_ids"]).mean(dim=1)
        u = self.user_mlp(torch.cat([self.user_emb(x["user_id"]), hist, x["user_age"]], dim=-1))
        i = self.item_emb(x["item_id"])
        return torch.sigmoid(self.head(torch.cat([u, i, x["item_price"]], dim=-1)))

    @staticmethod
    def example_batch(n: int, num_users: int = 100, num_items: int = 200, seed: int = 0) -> Dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return {
            "user_id": torch.randint(num_users, (n,), generator=g),
            "user_age": torch.rand(n, 1, generator=g),
            "hist_item_ids": torch.randint(num_items, (n, 5), generator=g),
            "item_id": torch.randint(num_items, (n,), generator=g),
            "item_price": torch.rand(n, 1, generator=g),
        }


class PackedRanker(nn.Module):
    """Every feature packed into one 2-D tensor and sliced by a feature -> columns map.

    ``columns`` maps feature name to its ``(start, stop)`` columns in ``X``; user
    features (``user_*``) may be interleaved with item features.

    Example:
        >>> PackedRanker()(torch.randn(4, 12)).shape
        torch.Size([4, 1])
    """

    DEFAULT_COLUMNS = {"user_a": (0, 3), "item_a": (3, 5), "user_b": (5, 9), "item_b": (9, 12)}

    def __init__(self, columns: Dict[str, tuple] = None, hidden: int = 16):
        super().__init__()
        self.columns = dict(columns or self.DEFAULT_COLUMNS)
        width = max(stop for _, stop in self.columns.values())
        user_width = sum(b - a for k, (a, b) in self.columns.items() if k.startswith("user"))
        self.user_proj = nn.Linear(user_width, hidden)
        self.wide = nn.Linear(width, hidden)
        self.head = mlp([2 * hidden, hidden, 1], last_act=False)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        user = torch.cat([X[:, a:b] for k, (a, b) in self.columns.items() if k.startswith("user")], dim=1)
        u = torch.relu(self.user_proj(user))
        w = torch.relu(self.wide(X))
        return self.head(torch.cat([u, w], dim=1))

    def user_selectors(self):
        return [f"X[:, {a}:{b}]" for k, (a, b) in self.columns.items() if k.startswith("user")]


class DINRanker(nn.Module):
    """A fine ranker with DIN-style target attention of the candidate over the user's behaviour
    sequence, optionally encoded first by a (user-only) transformer layer, BST-style.

    Inputs: ``hist`` [B, S] item ids the user interacted with, ``user_id`` [B], ``item_id`` [B].

    Example:
        >>> DINRanker()(torch.randint(50, (3, 10)), torch.randint(20, (3,)), torch.randint(50, (3,))).shape
        torch.Size([3, 1])
    """

    def __init__(self, num_items: int = 50, num_users: int = 20, dim: int = 8, att_hidden: int = 16,
                 encoder: bool = True, padding_mask: bool = False, seq_first: bool = False):
        super().__init__()
        self.padding_mask = padding_mask  # item id 0 pads the history: the encoder masks it out
        self.seq_first = seq_first  # the encoder in torch's default layout, [S, B, D], reached by transposes
        self.item_emb = nn.Embedding(num_items, dim)
        self.user_emb = nn.Embedding(num_users, dim)
        self.encoder = (nn.TransformerEncoderLayer(dim, 2, 2 * dim, dropout=0.0, batch_first=not seq_first)
                        if encoder else None)
        self.att = mlp([4 * dim, att_hidden, 1], last_act=False)
        self.top = mlp([3 * dim, 32, 1], last_act=False)

    def forward(self, hist: torch.Tensor, user_id: torch.Tensor, item_id: torch.Tensor) -> torch.Tensor:
        k = self.item_emb(hist)                                     # [B, S, D]   user-only
        if self.encoder is not None and self.seq_first:
            mask = hist == 0 if self.padding_mask else None
            k = self.encoder(k.transpose(0, 1), src_key_padding_mask=mask).transpose(0, 1)
        elif self.encoder is not None and self.padding_mask:
            k = self.encoder(k, src_key_padding_mask=hist == 0)     # user-only, with a user-side mask
        elif self.encoder is not None:
            k = self.encoder(k)                                     # user-only sequence encoder
        q = self.item_emb(item_id)                                  # [B, D]      the candidate
        qe = q.unsqueeze(1).expand(-1, k.size(1), -1)               # [B, S, D]
        scores = self.att(torch.cat([qe, k, qe - k, qe * k], dim=-1)).squeeze(-1)
        weights = torch.softmax(scores, dim=1)                      # over the sequence, per row
        interest = (weights.unsqueeze(-1) * k).sum(dim=1)           # [B, D]
        return self.top(torch.cat([self.user_emb(user_id), interest, q], dim=-1))


class DCNRanker(nn.Module):
    """DCN-v2 (``low_rank=None``) or DCN-Mix-style low-rank cross network over ``x0 = cat([user, item])``,
    next to a deep tower: ``x_{l+1} = x0 * W_l(x_l) + x_l``.

    Example:
        >>> DCNRanker()(torch.randn(3, 12), torch.randn(3, 6)).shape
        torch.Size([3, 1])
    """

    def __init__(self, user_dim: int = 12, item_dim: int = 6, layers: int = 2, low_rank: int = None,
                 deep: Sequence[int] = (32,)):
        super().__init__()
        d = user_dim + item_dim
        if low_rank:
            self.cross = nn.ModuleList(nn.Sequential(nn.Linear(d, low_rank, bias=False), nn.Linear(low_rank, d))
                                       for _ in range(layers))
        else:
            self.cross = nn.ModuleList(nn.Linear(d, d) for _ in range(layers))
        self.deep = mlp([d, *deep])
        self.head = nn.Linear(d + deep[-1], 1)

    def forward(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        x0 = torch.cat([user, item], dim=-1)
        x = x0
        for layer in self.cross:
            x = x0 * layer(x) + x
        return self.head(torch.cat([x, self.deep(x0)], dim=-1))


class MMoERanker(nn.Module):
    """Multi-task MMoE: experts and per-task gates over the shared fused input ``cat([user, item])``.

    Example:
        >>> [t.shape for t in MMoERanker()(torch.randn(3, 10), torch.randn(3, 6))]
        [torch.Size([3, 1]), torch.Size([3, 1])]
    """

    def __init__(self, user_dim: int = 10, item_dim: int = 6, experts: int = 3, tasks: int = 2, hidden: int = 16):
        super().__init__()
        d = user_dim + item_dim
        self.experts = nn.ModuleList(mlp([d, hidden, hidden]) for _ in range(experts))
        self.gates = nn.ModuleList(nn.Linear(d, experts) for _ in range(tasks))
        self.towers = nn.ModuleList(mlp([hidden, hidden, 1], last_act=False) for _ in range(tasks))

    def forward(self, user: torch.Tensor, item: torch.Tensor):
        x = torch.cat([user, item], dim=-1)
        experts = torch.stack([e(x) for e in self.experts], dim=1)          # [B, E, H]
        outs = []
        for gate, tower in zip(self.gates, self.towers):
            w = torch.softmax(gate(x), dim=-1).unsqueeze(-1)               # [B, E, 1]
            outs.append(tower((w * experts).sum(dim=1)))
        return tuple(outs)


class InteractionRanker(nn.Module):
    """Factorization-style interactions over user and item field embeddings ``e`` [B, F, K].

    ``kind``: ``"fm"`` (FM second-order term ``0.5 * sum((sum e)^2 - sum e^2)``), ``"bi"``
    (NFM bi-interaction pooling, then an MLP) or ``"dot"`` (DLRM: all pairwise inner products
    ``e e^T`` above the diagonal, then an MLP).

    Example:
        >>> InteractionRanker("dot")(torch.randint(100, (3, 4)), torch.randint(100, (3, 2))).shape
        torch.Size([3, 1])
    """

    def __init__(self, kind: str = "fm", user_fields: int = 4, item_fields: int = 2, vocab: int = 100, k: int = 8):
        super().__init__()
        self.kind = kind
        self.user_emb = nn.Embedding(vocab, k)
        self.item_emb = nn.Embedding(vocab, k)
        f = user_fields + item_fields
        self.linear = nn.Linear(f * k, 1)
        if kind == "bi":
            self.mlp = mlp([k, 16, 1], last_act=False)
        elif kind == "dot":
            li, lj = torch.triu_indices(f, f, offset=1)
            self.register_buffer("li", li, persistent=False)
            self.register_buffer("lj", lj, persistent=False)
            self.mlp = mlp([f * (f - 1) // 2, 16, 1], last_act=False)

    def forward(self, user_ids: torch.Tensor, item_ids: torch.Tensor) -> torch.Tensor:
        e = torch.cat([self.user_emb(user_ids), self.item_emb(item_ids)], dim=1)     # [B, F, K]
        first_order = self.linear(e.flatten(1))
        if self.kind == "dot":
            z = torch.bmm(e, e.transpose(1, 2))                                     # [B, F, F]
            return first_order + self.mlp(z[:, self.li, self.lj])
        s = e.sum(dim=1)
        bi = 0.5 * (s * s - (e * e).sum(dim=1))                                       # [B, K]
        if self.kind == "bi":
            return first_order + self.mlp(bi)
        return first_order + bi.sum(dim=-1, keepdim=True)
