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
