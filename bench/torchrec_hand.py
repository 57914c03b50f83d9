"""The TorchRec row's hand-written rewrite (see :mod:`bench.torchrec_case`); imports torchrec, so
it is imported only when that row runs.  No postponed annotations: TorchScript compiles ``forward``."""
from typing import Dict, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchrec import KeyedJaggedTensor


class HandTorchRec(nn.Module):
    """User tables on the user KJT (U rows), item tables on the item KJT; the over-arch's first
    Linear split into user / item column blocks, the broadcast fused into ``addmm_``."""

    def __init__(self, model: nn.Module, tabs: Dict[str, Tuple[str, str, int]]):
        super().__init__()
        self.tower = model.user_tower
        self.bags = model.ebc.embedding_bags  # table name -> nn.EmbeddingBag, in table order
        self.user_keys = {t: k for t, (k, side, _) in tabs.items() if side == "user"}
        self.item_keys = {t: k for t, (k, side, _) in tabs.items() if side == "item"}
        first = model.over[0]
        tw = model.user_tower[-2].out_features
        user_cols, item_cols, pos = list(range(tw)), [], tw
        for _, (_, side, dim) in tabs.items():
            (user_cols if side == "user" else item_cols).extend(range(pos, pos + dim))
            pos += dim
        item_cols += list(range(pos, first.in_features))
        frozen = lambda t: nn.Parameter(t.detach().clone().contiguous(), requires_grad=False)  # noqa: E731
        self.w_user, self.w_item = frozen(first.weight[:, user_cols]), frozen(first.weight[:, item_cols])
        self.bias = frozen(first.bias)
        self.rest = model.over[1:]

    def forward(self, user_dense: torch.Tensor, item_dense: torch.Tensor, features_user: KeyedJaggedTensor,
                features_item: KeyedJaggedTensor, user_index: torch.Tensor) -> torch.Tensor:
        users = features_user.to_dict()
        items = features_item.to_dict()
        u: List[torch.Tensor] = [self.tower(user_dense)]
        i: List[torch.Tensor] = []
        for table, bag in self.bags.items():  # table order, as the EBC pools
            if table in self.user_keys:
                jt = users[self.user_keys[table]]
                u.append(bag(jt.values(), jt.offsets()))  # the U users' ids only
            else:
                jt = items[self.item_keys[table]]
                i.append(bag(jt.values(), jt.offsets()))
        i.append(item_dense)
        h = F.linear(torch.cat(u, 1), self.w_user, self.bias).index_select(0, user_index)
        return self.rest(h.addmm_(torch.cat(i, 1), self.w_item.t())).squeeze(-1)

