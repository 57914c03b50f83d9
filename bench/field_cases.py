"""Field-layout rows: TorchRec's ``DLRM`` and a per-feature-embedding CTR model.

* ``dlrm`` -- ``torchrec.models.dlrm.DLRM`` over an EmbeddingBagCollection of user and item
  keys (``layout="fragmented"``: keys interleaved, ``"neat"``: user keys first), dense features
  packed as ``[user | item]`` columns (a packed selector).  Its interaction is the DLRM dot
  product ``bmm(X, X.T)[:, triu]`` over ``[dense_arch(dense), emb_0, emb_1, ...]``.
* ``ctr`` -- per-feature embeddings ``[B, 1, E]`` (one table per field, as CTR libraries
  write them) stacked with ``cat(dim=1)``, flattened with ``view(-1, F * E)``, next to a
  user dense projection, into an MLP (``fragmented``: user and item fields interleaved).

``min_flops(U, N)`` is the hand-written minimum (see each builder); there is no hand-written
module (as for the ``torchrec`` row).  ``make_case`` returns the same dict as
:func:`bench.torchrec_case.make_case`.
"""
from __future__ import annotations

from typing import Any, Dict, List

import torch
import torch.nn as nn

NAMES = ("dlrm", "ctr")

DLRM_SIZES = {"full": dict(keys=6, E=64, dense_user=8, dense_item=8, dense_arch=[256, 64], over=[512, 256, 1],
                           num_embeddings=1000),
              "tiny": dict(keys=2, E=8, dense_user=4, dense_item=4, dense_arch=[16, 8], over=[32, 1],
                           num_embeddings=50)}
CTR_SIZES = {"full": dict(fu=16, fi=8, E=16, dense=32, mlp=[512, 256], vocab=1000),
             "tiny": dict(fu=3, fi=2, E=4, dense=3, mlp=[16, 8], vocab=50)}


def make_case(name: str, layout: str, sizes: str) -> Dict[str, Any]:
    """model, user selectors, example pairs, ``make_inputs(U, N, seed) -> (request, pairs)``, ``min_flops``."""
    return {"dlrm": _dlrm, "ctr": _ctr}[name](layout, sizes)


def _mlp_flops(rows: int, sizes: List[int]) -> int:
    return sum(2 * rows * a * b for a, b in zip(sizes, sizes[1:]))


# --------------------------------------------------------------------------- DLRM
def _dlrm(layout: str, sizes: str) -> Dict[str, Any]:
    import mari_fx
    import torchrec_integration  # noqa: F401  (teaches mari_fx TorchRec's types)
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.models.dlrm import DLRM
    from torchrec_integration import jagged
    from torchrec_integration.examples import random_kjt

    cfg = DLRM_SIZES[sizes]
    n, E, du, di, V = cfg["keys"], cfg["E"], cfg["dense_user"], cfg["dense_item"], cfg["num_embeddings"]
    user_keys, item_keys = [f"user_{k}" for k in range(n)], [f"item_{k}" for k in range(n)]
    keys = ([k for pair in zip(user_keys, item_keys) for k in pair] if layout == "fragmented"
            else user_keys + item_keys)
    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name=f"t_{k}", embedding_dim=E, num_embeddings=V,
                                                            feature_names=[k]) for k in keys])
    model = DLRM(ebc, du + di, cfg["dense_arch"], cfg["over"]).eval()
    selectors = [f"dense_features[:, 0:{du}]"] + [f"sparse_features[{k}]" for k in user_keys]
    T_holder: List[Any] = []

    def pairs(U: int, N: int, seed: int):
        from bench.models import ragged_index

        g = torch.Generator().manual_seed(seed)
        idx = ragged_index(U, N, seed)
        dense = torch.cat([torch.randn(U, du, generator=g)[idx], torch.randn(N, di, generator=g)], 1)
        user, item = random_kjt(user_keys, U, V, generator=g), random_kjt(item_keys, N, V, generator=g)
        return (dense, jagged.merge([jagged.kjt_select_rows(user, idx), item], keys)), idx

    def make_inputs(users: int, candidates: int, seed: int = 0):
        args, idx = pairs(users, candidates, seed % (2**31))
        return mari_fx.pairs_to_request(T_holder[0], *args, user_index=idx), args

    F, Fu = 1 + 2 * n, n  # the dense arch's output is mixed (dense user and item columns meet in it)
    h = cfg["dense_arch"]
    over_in = h[-1] + F * (F - 1) // 2
    over_user = Fu * (Fu - 1) // 2

    def min_flops(U: int, N: int) -> int:
        """Dense arch: first Linear split (user columns at U rows); the Gram matrix's user x user
        block at U rows and its non-user rows against all fields at N rows; over-arch: first
        Linear split (the user x user pair products at U rows); the rest at N rows."""
        dense = 2 * h[0] * (U * du + N * di) + _mlp_flops(N, h)
        gram = 2 * U * Fu * Fu * E + 2 * N * (F - Fu) * F * E
        o = cfg["over"]
        over = 2 * o[0] * (U * over_user + N * (over_in - over_user)) + _mlp_flops(N, o)
        return dense + gram + over

    return {"model": model, "selectors": selectors, "example": pairs(2, 4, 1)[0], "make_inputs": make_inputs,
            "min_flops": min_flops, "bind": T_holder.append}


# --------------------------------------------------------------------------- per-feature CTR
class PerFeatureCTR(nn.Module):
    """One embedding table per field, each looked up as ``[B, 1, E]``; fields stacked on dim 1
    (user and item fields interleaved when ``fragmented``), ``view(-1, F * E)``, next to a user
    dense projection, into an MLP."""

    def __init__(self, fu: int, fi: int, E: int, dense: int, mlp: List[int], vocab: int, layout: str):
        super().__init__()
        self.fu, self.fi, self.E, self.layout = fu, fi, E, layout
        self.user_emb = nn.ModuleList(nn.Embedding(vocab, E) for _ in range(fu))
        self.item_emb = nn.ModuleList(nn.Embedding(vocab, E) for _ in range(fi))
        self.dense = nn.Linear(dense, E)
        sizes = [(fu + fi) * E + E] + list(mlp)
        layers: List[nn.Module] = []
        for a, b in zip(sizes, sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.mlp = nn.Sequential(*layers)
        self.out = nn.Linear(sizes[-1], 1)

    def forward(self, user_ids, user_dense, item_ids):
        u = [emb(user_ids[:, k:k + 1]) for k, emb in enumerate(self.user_emb)]
        i = [emb(item_ids[:, k:k + 1]) for k, emb in enumerate(self.item_emb)]
        if self.layout == "fragmented":
            fields = [f for k in range(max(self.fu, self.fi)) for f in (u[k:k + 1] + i[k:k + 1])]
        else:
            fields = u + i
        x = torch.cat(fields, dim=1).view(-1, len(fields) * self.E)
        return self.out(self.mlp(torch.cat([x, self.dense(user_dense)], dim=1))).squeeze(-1)


def _ctr(layout: str, sizes: str) -> Dict[str, Any]:
    import mari_fx

    cfg = CTR_SIZES[sizes]
    torch.manual_seed(0)
    model = PerFeatureCTR(layout=layout, **cfg).eval()
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.1)
    T_holder: List[Any] = []

    def pairs(U: int, N: int, seed: int):
        from bench.models import ragged_index

        g = torch.Generator().manual_seed(seed)
        idx = ragged_index(U, N, seed)
        user = torch.randint(cfg["vocab"], (U, cfg["fu"]), generator=g)
        dense = torch.randn(U, cfg["dense"], generator=g)
        item = torch.randint(cfg["vocab"], (N, cfg["fi"]), generator=g)
        return (user[idx], dense[idx], item), idx

    def make_inputs(users: int, candidates: int, seed: int = 0):
        args, idx = pairs(users, candidates, seed % (2**31))
        return mari_fx.pairs_to_request(T_holder[0], *args, user_index=idx), args

    E, fu, fi = cfg["E"], cfg["fu"], cfg["fi"]
    sizes = [(fu + fi) * E + E] + cfg["mlp"]

    def min_flops(U: int, N: int) -> int:
        """The dense projection at U rows; the first MLP Linear split (user fields and the dense
        projection at U rows, item fields at N rows); the rest at N rows."""
        first = 2 * sizes[1] * (U * (fu * E + E) + N * fi * E)
        return 2 * U * cfg["dense"] * E + first + _mlp_flops(N, sizes[1:] + [1])

    return {"model": model, "selectors": ["user_ids", "user_dense"], "example": pairs(2, 4, 1)[0],
            "make_inputs": make_inputs, "min_flops": min_flops, "bind": T_holder.append}
