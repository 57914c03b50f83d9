"""The benchmark's pair-shaped ranking models (one row per (user, candidate) pair).

Three models, each in two layouts of the columns that meet in the first fusion
layer (``layout="neat"``: every user block, then every item block;
``layout="fragmented"``: user and item feature blocks interleaved, the layout
that cost the MaRI paper ~38%):

* :class:`CoarseRanker` -- paper-like coarse ranker: a heavy user side (many user
  sparse features through ``nn.Embedding``, a pooled behaviour sequence through
  ``nn.EmbeddingBag(mode="mean")``, dense features, a user tower) and a light item
  side, joined by a wide first fusion layer.
* :class:`FineRanker` -- a fine ranker with DIN-style target attention of the
  candidate over a 100-item user behaviour sequence (activation unit over
  ``cat([q, k, q - k, q * k])``, masked weighted sum), then a fusion MLP.
* :class:`DCNv2` -- a DCN-v2 parallel network: full-rank cross layers
  ``x_{l+1} = x0 * (W_l x_l + b_l) + x_l`` next to a deep MLP, over the
  concatenated user and item feature embeddings.

Every model takes fixed-size 2-D tensors (ids as int64) positionally:
``user_sparse, user_dense, user_hist, item_sparse, item_dense``; the first three
are the user side (``Model.USER_INPUTS``).  ``Model.analytic_min_flops(U, N)``
gives the FLOPs of one request when every user-only matmul runs at U rows and every
matmul over user and item columns is split (see each class for the exact rule);
``bench.handwritten`` builds exactly that by hand.

Sizes come from a :class:`Sizes` preset: ``SIZES["full"]`` for the benchmark,
``SIZES["tiny"]`` for ``--quick`` and the tests.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn as nn

from mari_fx.report.verify import ragged_index as _ragged_index
from mari_fx.testing.examples import mlp

LAYOUTS = ("neat", "fragmented")
USER_INPUTS = ("user_sparse", "user_dense", "user_hist")
ITEM_INPUTS = ("item_sparse", "item_dense")


@dataclass(frozen=True)
class Sizes:
    emb_dim: int = 16            # per sparse feature
    seq_dim: int = 32            # behaviour sequence / item-id embedding
    vocab: int = 10_000          # per user / item sparse feature
    item_vocab: int = 100_000    # item ids (candidates and behaviour sequences)
    user_dense: int = 32
    item_dense: int = 8
    # coarse ranker
    coarse_user_sparse: int = 16
    coarse_item_sparse: int = 4
    coarse_hist_len: int = 50
    coarse_tower: Tuple[int, ...] = (512, 256)
    coarse_fusion: Tuple[int, ...] = (1024, 64)
    # fine ranker (DIN target attention)
    fine_user_sparse: int = 8
    fine_item_sparse: int = 3
    fine_hist_len: int = 100
    fine_att: Tuple[int, ...] = (64, 32)
    fine_tower: Tuple[int, ...] = (256, 128)
    fine_fusion: Tuple[int, ...] = (256, 128)
    # DCN-v2
    dcn_user_sparse: int = 12
    dcn_item_sparse: int = 4
    dcn_hist_len: int = 50
    dcn_cross: int = 3
    dcn_deep: Tuple[int, ...] = (512, 256)
    # masked-sequence ranker (transformer encoder over a padded history)
    seq_user_sparse: int = 8
    seq_item_sparse: int = 3
    seq_hist_len: int = 50
    seq_layers: int = 2
    seq_heads: int = 2
    seq_ff: int = 64
    seq_tower: Tuple[int, ...] = (256, 128)
    seq_fusion: Tuple[int, ...] = (512, 256)


SIZES: Dict[str, Sizes] = {
    "full": Sizes(),
    "tiny": Sizes(emb_dim=4, seq_dim=6, vocab=50, item_vocab=200, user_dense=5, item_dense=3,
                  coarse_user_sparse=5, coarse_item_sparse=2, coarse_hist_len=7, coarse_tower=(24, 12),
                  coarse_fusion=(16, 8), fine_user_sparse=3, fine_item_sparse=2, fine_hist_len=9,
                  fine_att=(8, 4), fine_tower=(12, 8), fine_fusion=(12, 6), dcn_user_sparse=4,
                  dcn_item_sparse=2, dcn_hist_len=5, dcn_cross=2, dcn_deep=(16, 8), seq_user_sparse=3,
                  seq_item_sparse=2, seq_hist_len=7, seq_layers=1, seq_heads=2, seq_ff=8, seq_tower=(12, 8),
                  seq_fusion=(12, 6)),
}


def block_order(user_blocks: Sequence[str], item_blocks: Sequence[str], layout: str) -> List[str]:
    """The order of named feature blocks entering the fusion layer.

    ``neat``: all user blocks, then all item blocks.  ``fragmented``: item blocks
    spread evenly between the user blocks (u, i, u, u, i, ...), never two
    item blocks adjacent when there are enough user blocks.

    Example:
        >>> block_order(["u0", "u1", "u2", "u3"], ["i0", "i1"], "fragmented")
        ['u0', 'i0', 'u1', 'u2', 'i1', 'u3']
    """
    if layout == "neat":
        return [*user_blocks, *item_blocks]
    if layout != "fragmented":
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    nu, ni = len(user_blocks), len(item_blocks)
    after = [int((k + 1) * nu / (ni + 1) + 0.5) for k in range(ni)]  # item k goes after this many user blocks
    out: List[str] = []
    for j in range(nu + 1):
        out += [item_blocks[k] for k in range(ni) if after[k] == j]
        if j < nu:
            out.append(user_blocks[j])
    return out


def linear_flops(rows: int, layer: nn.Linear, in_features: int = None) -> int:
    return 2 * rows * (layer.in_features if in_features is None else in_features) * layer.out_features


def mlp_flops(rows: int, seq: nn.Sequential) -> int:
    return sum(linear_flops(rows, l) for l in seq if isinstance(l, nn.Linear))


class _Base(nn.Module):
    """Common pieces: per-feature embedding tables and the fusion-block bookkeeping."""

    USER_INPUTS = USER_INPUTS
    ITEM_INPUTS = ITEM_INPUTS
    NAME = "?"
    MLP_STYLE = True

    def _tables(self, n: int, vocab: int, dim: int) -> nn.ModuleList:
        return nn.ModuleList(nn.Embedding(vocab, dim) for _ in range(n))

    def _widths(self) -> Dict[str, int]:
        raise NotImplementedError

    def fusion_columns(self) -> Tuple[List[int], List[int]]:
        """(user column indices, item column indices) of the fusion input, in layout order."""
        widths, user_cols, item_cols, pos = self._widths(), [], [], 0
        for name in self.order:
            w = widths[name]
            (user_cols if name in self.user_blocks else item_cols).extend(range(pos, pos + w))
            pos += w
        return user_cols, item_cols

    def neat_permutation(self) -> List[int]:
        """Fusion-input column indices in neat order (user blocks, then item blocks)."""
        u, i = self.fusion_columns()
        return u + i

    # -- inputs
    def random_inputs(self, users: int, seed: int = 0) -> Dict[str, torch.Tensor]:
        """One row per user of every user input (``user_*``), and a generator for items."""
        raise NotImplementedError

    def example_pairs(self, n: int = 4, seed: int = 0) -> Tuple[torch.Tensor, ...]:
        u = self.user_batch(n, seed)
        i = self.item_batch(n, seed + 1)
        return tuple(u[k] for k in USER_INPUTS) + tuple(i[k] for k in ITEM_INPUTS)

    def user_batch(self, users: int, seed: int = 0) -> Dict[str, torch.Tensor]:
        s = self.sizes
        g = torch.Generator().manual_seed(seed)
        hist = torch.randint(1, s.item_vocab, (users, self.hist_len), generator=g)
        if self.padded_hist:  # ragged histories: a padded tail of id 0
            lengths = torch.randint(self.hist_len // 2, self.hist_len + 1, (users,), generator=g)
            hist[torch.arange(self.hist_len)[None, :] >= lengths[:, None]] = 0
        return {
            "user_sparse": torch.randint(s.vocab, (users, self.n_user_sparse), generator=g),
            "user_dense": torch.randn(users, s.user_dense, generator=g),
            "user_hist": hist,
        }

    def item_batch(self, n: int, seed: int = 1) -> Dict[str, torch.Tensor]:
        s = self.sizes
        g = torch.Generator().manual_seed(seed)
        sparse = torch.randint(s.vocab, (n, self.n_item_sparse), generator=g)
        sparse[:, 0] = torch.randint(s.item_vocab, (n,), generator=g)  # feature 0: the item id
        return {"item_sparse": sparse, "item_dense": torch.randn(n, s.item_dense, generator=g)}

    padded_hist = False


class CoarseRanker(_Base):
    """Paper-like coarse ranker (heavy user side, light item side, wide fusion).

    User side: ``coarse_user_sparse`` sparse features (one ``nn.Embedding`` each,
    ``emb_dim``), ``user_dense``, a behaviour sequence of ``coarse_hist_len`` item
    ids pooled by ``nn.EmbeddingBag(mode="mean")``; a user tower over all of them.
    Item side: ``coarse_item_sparse`` sparse features (feature 0 is the item id),
    ``item_dense``.  Fusion input: the tower output, the raw user features and the
    item features (order set by ``layout``), then ``coarse_fusion`` -> 1.

    Analytic minimum: the user tower at U rows; the first fusion layer's user
    columns at U rows and its item columns at N rows; the rest at N rows.
    """

    NAME = "coarse"

    def __init__(self, sizes: Sizes = SIZES["full"], layout: str = "neat"):
        super().__init__()
        s, self.sizes, self.layout = sizes, sizes, layout
        self.n_user_sparse, self.n_item_sparse, self.hist_len = s.coarse_user_sparse, s.coarse_item_sparse, s.coarse_hist_len
        self.user_emb = self._tables(s.coarse_user_sparse, s.vocab, s.emb_dim)
        self.hist_emb = nn.EmbeddingBag(s.item_vocab, s.seq_dim, mode="mean")
        self.item_emb = nn.ModuleList(
            [nn.Embedding(s.item_vocab, s.emb_dim)] + [nn.Embedding(s.vocab, s.emb_dim) for _ in range(s.coarse_item_sparse - 1)])
        raw_user = s.coarse_user_sparse * s.emb_dim + s.user_dense + s.seq_dim
        self.user_tower = mlp([raw_user, *s.coarse_tower])
        self.user_blocks = ["tower", *[f"u{k}" for k in range(s.coarse_user_sparse)], "user_dense", "hist"]
        self.item_blocks = [*[f"i{k}" for k in range(s.coarse_item_sparse)], "item_dense"]
        self.order = block_order(self.user_blocks, self.item_blocks, layout)
        width = sum(self._widths().values())
        self.fusion = mlp([width, *s.coarse_fusion, 1], last_act=False)

    def _widths(self) -> Dict[str, int]:
        s = self.sizes
        w = {"tower": s.coarse_tower[-1], "user_dense": s.user_dense, "hist": s.seq_dim, "item_dense": s.item_dense}
        w.update({f"u{k}": s.emb_dim for k in range(s.coarse_user_sparse)})
        w.update({f"i{k}": s.emb_dim for k in range(s.coarse_item_sparse)})
        return w

    def user_features(self, user_sparse, user_dense, user_hist) -> Dict[str, torch.Tensor]:
        blocks = {f"u{k}": emb(user_sparse[:, k]) for k, emb in enumerate(self.user_emb)}
        blocks["user_dense"] = user_dense
        blocks["hist"] = self.hist_emb(user_hist)
        raw = torch.cat([blocks[f"u{k}"] for k in range(len(self.user_emb))] + [user_dense, blocks["hist"]], dim=-1)
        blocks["tower"] = self.user_tower(raw)
        return blocks

    def item_features(self, item_sparse, item_dense) -> Dict[str, torch.Tensor]:
        blocks = {f"i{k}": emb(item_sparse[:, k]) for k, emb in enumerate(self.item_emb)}
        blocks["item_dense"] = item_dense
        return blocks

    def forward(self, user_sparse, user_dense, user_hist, item_sparse, item_dense):
        blocks = self.user_features(user_sparse, user_dense, user_hist)
        blocks.update(self.item_features(item_sparse, item_dense))
        x = torch.cat([blocks[name] for name in self.order], dim=-1)
        return self.fusion(x).squeeze(-1)

    def analytic_min_flops(self, users: int, candidates: int) -> int:
        first, *rest = [l for l in self.fusion if isinstance(l, nn.Linear)]
        u_cols = len(self.fusion_columns()[0])
        return (mlp_flops(users, self.user_tower)
                + linear_flops(users, first, u_cols) + linear_flops(candidates, first, first.in_features - u_cols)
                + sum(linear_flops(candidates, l) for l in rest))


class FineRanker(_Base):
    """Fine ranker with DIN-style target attention over a ``fine_hist_len`` behaviour sequence.

    ``q = item_id_emb(item id)`` (the candidate), ``k = item_id_emb(user_hist)`` (the
    user's sequence, padded with id 0).  The activation unit scores every position
    with an MLP over ``cat([q, k, q - k, q * k])`` (``fine_att`` -> 1, sigmoid);
    the masked scores weight a sum of ``k``.  A user tower over the user sparse and
    dense features; the fusion MLP reads ``[tower, pooled, q, item features]``
    (order set by ``layout``).

    Analytic minimum (what ``bench.handwritten`` does): the tower and the
    sequence embeddings at U rows; in the first attention layer,
    ``W_q q + W_k k + W_d (q - k) + W_p (q * k) = (W_q + W_d) q + (W_k - W_d) k + W_p (q * k)``:
    the ``q`` term at N rows, the ``k`` term at U x L rows, the ``q * k`` term at
    N x L rows; the other attention layers at N x L rows; the first fusion layer
    split (tower columns at U rows); the rest at N rows.  Plain column splitting
    (MaRI's rule) only reaches the ``k`` term.
    """

    NAME = "fine"
    MLP_STYLE = False
    padded_hist = True

    def __init__(self, sizes: Sizes = SIZES["full"], layout: str = "neat"):
        super().__init__()
        s, self.sizes, self.layout = sizes, sizes, layout
        self.n_user_sparse, self.n_item_sparse, self.hist_len = s.fine_user_sparse, s.fine_item_sparse, s.fine_hist_len
        self.user_emb = self._tables(s.fine_user_sparse, s.vocab, s.emb_dim)
        self.item_id_emb = nn.Embedding(s.item_vocab, s.seq_dim)  # candidates and the behaviour sequence
        self.item_emb = self._tables(s.fine_item_sparse - 1, s.vocab, s.emb_dim)  # item features 1..
        self.user_tower = mlp([s.fine_user_sparse * s.emb_dim + s.user_dense, *s.fine_tower])
        att = mlp([4 * s.seq_dim, *s.fine_att, 1], last_act=False)
        att_layers = [m for m in att if isinstance(m, nn.Linear)]
        self.att = nn.Sequential(*[m for pair in zip(att_layers, [nn.Sigmoid()] * len(att_layers)) for m in pair])
        self.user_blocks = ["tower"]
        self.item_blocks = ["pooled", "q", *[f"i{k}" for k in range(1, s.fine_item_sparse)], "item_dense"]
        if layout == "fragmented":  # the user block in the middle of the item blocks
            mid = len(self.item_blocks) // 2
            self.order = [*self.item_blocks[:mid], "tower", *self.item_blocks[mid:]]
        elif layout == "neat":
            self.order = [*self.user_blocks, *self.item_blocks]
        else:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.fusion = mlp([sum(self._widths().values()), *s.fine_fusion, 1], last_act=False)

    def _widths(self) -> Dict[str, int]:
        s = self.sizes
        w = {"tower": s.fine_tower[-1], "pooled": s.seq_dim, "q": s.seq_dim, "item_dense": s.item_dense}
        w.update({f"i{k}": s.emb_dim for k in range(1, s.fine_item_sparse)})
        return w

    def forward(self, user_sparse, user_dense, user_hist, item_sparse, item_dense):
        u = torch.cat([emb(user_sparse[:, k]) for k, emb in enumerate(self.user_emb)] + [user_dense], dim=-1)
        blocks = {"tower": self.user_tower(u)}
        keys = self.item_id_emb(user_hist)                                  # [B, L, d]
        mask = (user_hist > 0).unsqueeze(-1).to(keys.dtype)                # [B, L, 1]
        q = self.item_id_emb(item_sparse[:, 0])                             # [B, d]
        qe = q.unsqueeze(1).expand(-1, keys.shape[1], -1)                   # [B, L, d]
        scores = self.att(torch.cat([qe, keys, qe - keys, qe * keys], dim=-1)) * mask
        blocks["pooled"] = (scores * keys).sum(dim=1)
        blocks["q"] = q
        for k, emb in enumerate(self.item_emb, start=1):
            blocks[f"i{k}"] = emb(item_sparse[:, k])
        blocks["item_dense"] = item_dense
        x = torch.cat([blocks[name] for name in self.order], dim=-1)
        return self.fusion(x).squeeze(-1)

    def analytic_min_flops(self, users: int, candidates: int) -> int:
        s, L, d = self.sizes, self.hist_len, self.sizes.seq_dim
        first, *rest = [l for l in self.att if isinstance(l, nn.Linear)]
        att = (linear_flops(candidates, first, d) + linear_flops(users * L, first, d) + linear_flops(candidates * L, first, d)
               + sum(linear_flops(candidates * L, l) for l in rest))
        f_first, *f_rest = [l for l in self.fusion if isinstance(l, nn.Linear)]
        u_cols = s.fine_tower[-1]
        return (mlp_flops(users, self.user_tower) + att
                + linear_flops(users, f_first, u_cols) + linear_flops(candidates, f_first, f_first.in_features - u_cols)
                + sum(linear_flops(candidates, l) for l in f_rest))


class DCNv2(_Base):
    """DCN-v2 (parallel): full-rank cross layers next to a deep MLP over ``x0``.

    ``x0`` is the concatenation of the user feature embeddings (``dcn_user_sparse``
    tables, ``user_dense``, a mean-pooled behaviour sequence) and the item ones, in
    the order set by ``layout``.  ``x_{l+1} = x0 * cross_l(x_l) + x_l`` for
    ``dcn_cross`` layers; ``deep = mlp(x0)``; ``out = head(cat([x_L, deep]))``.

    Analytic minimum: the first cross layer and the first deep layer split
    (user columns of ``x0`` at U rows), everything else at N rows.
    """

    NAME = "dcn"

    def __init__(self, sizes: Sizes = SIZES["full"], layout: str = "neat"):
        super().__init__()
        s, self.sizes, self.layout = sizes, sizes, layout
        self.n_user_sparse, self.n_item_sparse, self.hist_len = s.dcn_user_sparse, s.dcn_item_sparse, s.dcn_hist_len
        self.user_emb = self._tables(s.dcn_user_sparse, s.vocab, s.emb_dim)
        self.hist_emb = nn.EmbeddingBag(s.item_vocab, s.seq_dim, mode="mean")
        self.item_emb = nn.ModuleList(
            [nn.Embedding(s.item_vocab, s.emb_dim)] + [nn.Embedding(s.vocab, s.emb_dim) for _ in range(s.dcn_item_sparse - 1)])
        self.user_blocks = [*[f"u{k}" for k in range(s.dcn_user_sparse)], "user_dense", "hist"]
        self.item_blocks = [*[f"i{k}" for k in range(s.dcn_item_sparse)], "item_dense"]
        self.order = block_order(self.user_blocks, self.item_blocks, layout)
        width = sum(self._widths().values())
        self.cross = nn.ModuleList(nn.Linear(width, width) for _ in range(s.dcn_cross))
        self.deep = mlp([width, *s.dcn_deep])
        self.head = nn.Linear(width + s.dcn_deep[-1], 1)

    def _widths(self) -> Dict[str, int]:
        s = self.sizes
        w = {"user_dense": s.user_dense, "hist": s.seq_dim, "item_dense": s.item_dense}
        w.update({f"u{k}": s.emb_dim for k in range(s.dcn_user_sparse)})
        w.update({f"i{k}": s.emb_dim for k in range(s.dcn_item_sparse)})
        return w

    def forward(self, user_sparse, user_dense, user_hist, item_sparse, item_dense):
        blocks = {f"u{k}": emb(user_sparse[:, k]) for k, emb in enumerate(self.user_emb)}
        blocks["user_dense"] = user_dense
        blocks["hist"] = self.hist_emb(user_hist)
        blocks.update({f"i{k}": emb(item_sparse[:, k]) for k, emb in enumerate(self.item_emb)})
        blocks["item_dense"] = item_dense
        x0 = torch.cat([blocks[name] for name in self.order], dim=-1)
        x = x0
        for layer in self.cross:
            x = x0 * layer(x) + x
        return self.head(torch.cat([x, self.deep(x0)], dim=-1)).squeeze(-1)

    def analytic_min_flops(self, users: int, candidates: int) -> int:
        u_cols = len(self.fusion_columns()[0])
        first_cross, *rest_cross = self.cross
        d_first, *d_rest = [l for l in self.deep if isinstance(l, nn.Linear)]
        split = sum(linear_flops(users, l, u_cols) + linear_flops(candidates, l, l.in_features - u_cols)
                    for l in (first_cross, d_first))
        return (split + sum(linear_flops(candidates, l) for l in rest_cross)
                + sum(linear_flops(candidates, l) for l in d_rest) + linear_flops(candidates, self.head))


def encoder_flops(sequences: int, length: int, d: int, ff: int, layers: int) -> int:
    """FLOPs of ``layers`` TransformerEncoderLayers (width ``d``, feed-forward ``ff``) over
    ``sequences`` sequences of ``length`` (q/k/v and output projections, the two attention
    matmuls, the feed-forward), as counted with the fast path off."""
    rows = sequences * length
    per_layer = 2 * rows * d * 3 * d + 2 * 2 * sequences * length * length * d + 2 * rows * d * d + 2 * 2 * rows * d * ff
    return layers * per_layer


class SeqRanker(_Base):
    """Masked-sequence ranker: a transformer encoder over the user's padded behaviour sequence.

    ``user_hist`` (``seq_hist_len`` item ids, padded with 0) is embedded (``item_id_emb`` plus a
    learned position embedding), encoded by ``nn.TransformerEncoder`` (``seq_layers`` layers,
    ``batch_first``, ``src_key_padding_mask = user_hist == 0``) and mean-pooled over its real
    items; a user tower reads the user sparse and dense features.  The fusion MLP reads
    ``[tower, pooled, q, item features]`` (order set by ``layout``), ``q`` the candidate's id
    embedding.

    Analytic minimum: the tower and the whole encoder at U rows; the first fusion layer split
    (tower and pooled columns at U rows); the rest at N rows.  The encoder lives inside one
    module, so the record's per-layer FLOPs leave it out: :meth:`unrecorded_flops` adds it.
    """

    NAME = "seq"
    padded_hist = True

    def __init__(self, sizes: Sizes = SIZES["full"], layout: str = "neat"):
        super().__init__()
        s, self.sizes, self.layout = sizes, sizes, layout
        self.n_user_sparse, self.n_item_sparse, self.hist_len = s.seq_user_sparse, s.seq_item_sparse, s.seq_hist_len
        self.user_emb = self._tables(s.seq_user_sparse, s.vocab, s.emb_dim)
        self.item_id_emb = nn.Embedding(s.item_vocab, s.seq_dim, padding_idx=0)
        self.pos = nn.Parameter(torch.randn(s.seq_hist_len, s.seq_dim) * 0.1)
        layer = nn.TransformerEncoderLayer(s.seq_dim, s.seq_heads, s.seq_ff, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, s.seq_layers, enable_nested_tensor=False)
        self.item_emb = self._tables(s.seq_item_sparse - 1, s.vocab, s.emb_dim)
        self.user_tower = mlp([s.seq_user_sparse * s.emb_dim + s.user_dense, *s.seq_tower])
        self.user_blocks = ["tower", "pooled"]
        self.item_blocks = ["q", *[f"i{k}" for k in range(1, s.seq_item_sparse)], "item_dense"]
        self.order = block_order(self.user_blocks, self.item_blocks, layout)
        self.fusion = mlp([sum(self._widths().values()), *s.seq_fusion, 1], last_act=False)

    def _widths(self) -> Dict[str, int]:
        s = self.sizes
        w = {"tower": s.seq_tower[-1], "pooled": s.seq_dim, "q": s.seq_dim, "item_dense": s.item_dense}
        w.update({f"i{k}": s.emb_dim for k in range(1, s.seq_item_sparse)})
        return w

    def user_features(self, user_sparse, user_dense, user_hist) -> Dict[str, torch.Tensor]:
        u = torch.cat([emb(user_sparse[:, k]) for k, emb in enumerate(self.user_emb)] + [user_dense], dim=-1)
        pad = user_hist == 0
        h = self.encoder(self.item_id_emb(user_hist) + self.pos, src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        return {"tower": self.user_tower(u), "pooled": (h * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1)}

    def item_features(self, item_sparse, item_dense) -> Dict[str, torch.Tensor]:
        blocks = {"q": self.item_id_emb(item_sparse[:, 0]), "item_dense": item_dense}
        for k, emb in enumerate(self.item_emb, start=1):
            blocks[f"i{k}"] = emb(item_sparse[:, k])
        return blocks

    def forward(self, user_sparse, user_dense, user_hist, item_sparse, item_dense):
        blocks = self.user_features(user_sparse, user_dense, user_hist)
        blocks.update(self.item_features(item_sparse, item_dense))
        x = torch.cat([blocks[name] for name in self.order], dim=-1)
        return self.fusion(x).squeeze(-1)

    def unrecorded_flops(self, users: int, candidates: int, transformed: bool) -> int:
        """The encoder's FLOPs (at U rows transformed, at N rows in the pair-shaped model)."""
        s = self.sizes
        return encoder_flops(users if transformed else candidates, s.seq_hist_len, s.seq_dim, s.seq_ff, s.seq_layers)

    def analytic_min_flops(self, users: int, candidates: int) -> int:
        first, *rest = [l for l in self.fusion if isinstance(l, nn.Linear)]
        u_cols = len(self.fusion_columns()[0])
        return (mlp_flops(users, self.user_tower) + self.unrecorded_flops(users, candidates, True)
                + linear_flops(users, first, u_cols) + linear_flops(candidates, first, first.in_features - u_cols)
                + sum(linear_flops(candidates, l) for l in rest))


MODELS = {"coarse": CoarseRanker, "fine": FineRanker, "dcn": DCNv2, "seq": SeqRanker}


def build(name: str, layout: str = "neat", sizes: str = "full", seed: int = 0) -> _Base:
    """A model in eval mode with deterministic weights (embedding tables scaled down so that
    activations stay in a sensible range)."""
    torch.manual_seed(seed)
    model = MODELS[name](SIZES[sizes], layout)
    for m in model.modules():
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
            nn.init.normal_(m.weight, std=0.1)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
    return model.eval()


def ragged_index(users: int, candidates: int, seed: int = 0) -> torch.Tensor:
    """``user_index`` of a request: every user has >= 1 candidate, lists of different
    lengths (drawn at random), candidates of a user contiguous (as a serving batch
    lays them out).  ``users == 1`` gives all zeros.

    Example:
        >>> ragged_index(3, 8).bincount().tolist()
        [3, 2, 3]
    """
    return _ragged_index(users, candidates, seed, contiguous=True)


def request_inputs(model: _Base, users: int, candidates: int, seed: int = 0):
    """(request dict for a transformed / hand-written module, pair-shaped args for the model)."""
    idx = ragged_index(users, candidates, seed)
    request = {**model.user_batch(users, seed), **model.item_batch(candidates, seed + 1)}
    request["user_index"] = idx
    pairs = tuple(request[k].index_select(0, idx) for k in USER_INPUTS) + tuple(request[k] for k in ITEM_INPUTS)
    return request, pairs
