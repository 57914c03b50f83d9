"""A TorchRec ranker (pair-shaped, as trained) and request data for the demo, docs and tests."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torchrec import (EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection, EmbeddingConfig,
                     KeyedJaggedTensor, KeyedTensor)

from mari_fx.testing.examples import mlp

from . import jagged

# table name -> (feature key, side, embedding dim); user and item tables interleaved in table order
TABLES: Dict[str, Tuple[str, str, int]] = {
    "t_user_id": ("user_id", "user", 16),
    "t_item_id": ("item_id", "item", 16),
    "t_user_hist": ("user_hist", "user", 8),
    "t_item_cat": ("item_cat", "item", 8),
}
USER_KEYS = [k for k, side, _ in TABLES.values() if side == "user"]
ITEM_KEYS = [k for k, side, _ in TABLES.values() if side == "item"]


def table_configs(num_embeddings: int = 100, tables: Dict[str, Tuple[str, str, int]] = TABLES) -> List[EmbeddingBagConfig]:
    return [EmbeddingBagConfig(name=name, embedding_dim=dim, num_embeddings=num_embeddings, feature_names=[key])
            for name, (key, _, dim) in tables.items()]


class TorchRecRanker(nn.Module):
    """A DLRM-style ranker over a KeyedJaggedTensor of user and item sparse features.

    ``ebc`` pools every key; ``head="values"`` feeds ``kt.values()`` (user and item keys
    interleaved in table order) to the over-arch, ``head="regroup"`` regroups the keys
    with ``KeyedTensor.regroup`` (order-independent, as sharded models need) and
    ``head="dict"`` reads them one by one with ``to_dict()``.  Dense user features go
    through a user tower; dense item features join at the over-arch.

    Example:
        >>> batch = RankerBatch.random(users=2, candidates=5)
        >>> TorchRecRanker()(*batch.pairs()).shape
        torch.Size([5])
    """

    def __init__(self, num_embeddings: int = 100, user_dense: int = 8, item_dense: int = 4,
                 tower: Sequence[int] = (32, 16), over: Sequence[int] = (64, 32), head: str = "values",
                 tables: Dict[str, Tuple[str, str, int]] = TABLES, device: Optional[torch.device] = None):
        super().__init__()
        if head not in ("values", "regroup", "dict"):
            raise ValueError(f"head must be 'values', 'regroup' or 'dict', got {head!r}")
        self.head = head
        self.keys = [key for key, _, _ in tables.values()]
        self.ebc = EmbeddingBagCollection(tables=table_configs(num_embeddings, tables), device=device)
        self.user_tower = mlp([user_dense, *tower])
        width = tower[-1] + sum(dim for _, _, dim in tables.values()) + item_dense
        self.over = mlp([width, *over, 1], last_act=False)

    def forward(self, user_dense: torch.Tensor, item_dense: torch.Tensor, features: KeyedJaggedTensor) -> torch.Tensor:
        kt = self.ebc(features)
        if self.head == "values":
            sparse = kt.values()
        elif self.head == "regroup":
            sparse = KeyedTensor.regroup([kt], [self.keys])[0]
        else:
            d = kt.to_dict()
            sparse = torch.cat([d[k] for k in self.keys], dim=1)
        x = torch.cat([self.user_tower(user_dense), sparse, item_dense], dim=1)
        return self.over(x).squeeze(-1)


def random_kjt(keys: Sequence[str], rows: int, num_embeddings: int = 100, max_len: int = 3,
               generator: Optional[torch.Generator] = None) -> KeyedJaggedTensor:
    """A KJT of ``rows`` rows: per key and row a bag of 0..max_len ids (>= 1 for ``*_id`` keys)."""
    lengths = []
    for k in keys:
        low = 1 if k.endswith("_id") else 0
        lengths.append(torch.randint(low, max_len + 1, (rows,), generator=generator))
    lengths_t = torch.cat(lengths) if lengths else torch.empty(0, dtype=torch.int64)
    values = torch.randint(num_embeddings, (int(lengths_t.sum()),), generator=generator)
    return KeyedJaggedTensor(keys=list(keys), values=values, lengths=lengths_t, stride=rows)


@dataclass
class RankerBatch:
    """One request for :class:`TorchRecRanker`: U users, N candidates, ``user_index`` [N]."""

    user_dense: torch.Tensor
    item_dense: torch.Tensor
    user_kjt: KeyedJaggedTensor
    item_kjt: KeyedJaggedTensor
    user_index: torch.Tensor
    keys: Sequence[str]

    @staticmethod
    def random(users: int, candidates: int, seed: int = 0, user_dense: int = 8, item_dense: int = 4,
               user_keys: Sequence[str] = USER_KEYS, item_keys: Sequence[str] = ITEM_KEYS,
               keys: Optional[Sequence[str]] = None, num_embeddings: int = 100) -> "RankerBatch":
        g = torch.Generator().manual_seed(seed)
        idx = torch.cat([torch.arange(users), torch.randint(users, (candidates - users,), generator=g)])
        idx = idx[torch.randperm(candidates, generator=g)]
        return RankerBatch(
            torch.randn(users, user_dense, generator=g), torch.randn(candidates, item_dense, generator=g),
            random_kjt(user_keys, users, num_embeddings, generator=g),
            random_kjt(item_keys, candidates, num_embeddings, generator=g), idx,
            list(keys) if keys is not None else [k for k, _, _ in TABLES.values()])

    def pairs(self) -> Tuple[torch.Tensor, torch.Tensor, KeyedJaggedTensor]:
        """The pair-shaped inputs (one row per candidate) the original model takes."""
        kjt = jagged.merge([jagged.kjt_select_rows(self.user_kjt, self.user_index), self.item_kjt], self.keys)
        return self.user_dense[self.user_index], self.item_dense, kjt


def ranker_factory() -> Tuple[nn.Module, Tuple[torch.Tensor, torch.Tensor, KeyedJaggedTensor]]:
    """``mari-fx`` TARGET ``torchrec_integration.examples:ranker_factory`` (seeded weights):
    ``--user user_dense 'features[user_id]' 'features[user_hist]'``.

    Example:
        >>> model, example = ranker_factory()
        >>> model(*example).shape
        torch.Size([4])
    """
    torch.manual_seed(0)
    return TorchRecRanker().eval(), RankerBatch.random(2, 4, seed=1).pairs()


class SequenceRanker(nn.Module):
    """An EmbeddingCollection over the user's behaviour sequence (padded to L, mean-pooled in the
    user tower) and the candidate's id, plus an EBC over user and item features (no dense input:
    an exported program reads U from ``user_index``)."""

    def __init__(self, L: int = 4):
        super().__init__()
        self.L = L
        self.ec = EmbeddingCollection(tables=[
            EmbeddingConfig(name="t_seq", embedding_dim=8, num_embeddings=100, feature_names=["user_seq"]),
            EmbeddingConfig(name="t_cand", embedding_dim=8, num_embeddings=100, feature_names=["item_seq"])])
        self.ebc = EmbeddingBagCollection(tables=[
            EmbeddingBagConfig(name="t_u", embedding_dim=8, num_embeddings=100, feature_names=["user_id"]),
            EmbeddingBagConfig(name="t_i", embedding_dim=8, num_embeddings=100, feature_names=["item_id"])])
        self.user_tower = mlp([8 + 8, 16])
        self.over = mlp([16 + 16 + 8, 16, 1], last_act=False)

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        seq = self.ec(features)
        kt = self.ebc(features)
        hist = seq["user_seq"].to_padded_dense(self.L).mean(dim=1)
        cand = seq["item_seq"].to_padded_dense(1).squeeze(1)
        u = self.user_tower(torch.cat([hist, kt["user_id"]], dim=1))
        return self.over(torch.cat([u, kt.values(), cand], dim=1)).squeeze(-1)
