"""Row operations on TorchRec's jagged and keyed types, in plain torch.

Transformed graphs call these at run time (building the KJT a request feeds the
embedding modules, taking the U user rows of a pooled result, gathering user rows
to N), and the request helpers use them to split, de-duplicate and rebuild KJTs.
A *row* is one sample: one bag per key of a ``KeyedJaggedTensor``, one bag of a
``JaggedTensor``, one row of a ``KeyedTensor``'s values.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torchrec.distributed.types import LazyAwaitable
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from mari_fx.errors import RequestError
from mari_fx.runtime import graph_function

Bag = Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]  # values, weights, lengths [B] of one key


@graph_function
def wait(x: Any) -> Any:
    """The value of a sharded module's ``LazyAwaitable`` result (other values as they are)."""
    return LazyAwaitable._wait_async(x)


def per_key(kjt: KeyedJaggedTensor) -> Dict[str, Bag]:
    """``{key: (values, weights or None, lengths [B])}`` of a KJT with one batch size."""
    keys, stride = kjt.keys(), kjt.stride()
    if not keys:
        return {}
    lengths = kjt.lengths().view(len(keys), stride)
    split = [int(n) for n in lengths.sum(1).tolist()]
    values = kjt.values().split(split)
    w = kjt.weights_or_none()
    weights = w.split(split) if w is not None else [None] * len(keys)
    return {k: (values[i], weights[i], lengths[i]) for i, k in enumerate(keys)}


def from_bags(keys: Sequence[str], bags: Dict[str, Bag], stride: int) -> KeyedJaggedTensor:
    """A KJT of ``keys`` (in that order) from per-key bags, each padded with empty bags to ``stride`` rows."""
    values, weights, lengths = [], [], []
    for k in keys:
        v, w, l = bags[k]
        values.append(v)
        weights.append(w)
        if l.numel() < stride:
            l = torch.cat([l, l.new_zeros(stride - l.numel())])
        lengths.append(l)
    weighted = [w is not None for w in weights]
    if any(weighted) and not all(weighted):
        raise RequestError(f"keys {list(keys)} mix weighted and unweighted features")
    return KeyedJaggedTensor(
        keys=list(keys),
        values=torch.cat(values) if values else torch.empty(0, dtype=torch.int64),
        weights=torch.cat(weights) if values and all(weighted) else None,
        lengths=torch.cat(lengths) if lengths else torch.empty(0, dtype=torch.int32),
        stride=stride,
    )


def select_keys(kjt: KeyedJaggedTensor, keys: Sequence[str], name: str = "KeyedJaggedTensor") -> KeyedJaggedTensor:
    """The KJT of ``keys`` only, in that order; a missing key is a :class:`RequestError` naming it."""
    if not isinstance(kjt, KeyedJaggedTensor):
        raise RequestError(f"{name} must be a KeyedJaggedTensor, got {type(kjt).__name__}")
    if list(kjt.keys()) == list(keys):
        return kjt
    bags = per_key(kjt)
    for k in keys:
        if k not in bags:
            raise RequestError(f"{name} has no key {k!r}; its keys are {kjt.keys()}")
    return from_bags(keys, bags, kjt.stride())


def merge(kjts: Sequence[Optional[KeyedJaggedTensor]], keys: Sequence[str], stride: Optional[int] = None) -> KeyedJaggedTensor:
    """One KJT of ``keys`` (in that order) from KJTs holding disjoint key sets; every key's
    bags are padded with empty bags to ``stride`` rows (default: the largest batch)."""
    bags: Dict[str, Bag] = {}
    present = [k for k in kjts if k is not None]
    for kjt in present:
        bags.update(per_key(kjt))
    if stride is None:
        stride = max(k.stride() for k in present)
    return from_bags(keys, bags, stride)


def _ranges(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``cat([arange(s, s + l) for s, l in zip(starts, lengths)])`` without a Python loop."""
    total = int(lengths.sum()) if lengths.numel() else 0
    if total == 0:
        return torch.empty(0, dtype=torch.int64)
    first = torch.cumsum(lengths, 0) - lengths
    return torch.arange(total) + torch.repeat_interleave(starts - first, lengths, output_size=total)


def _select_jagged(values: torch.Tensor, weights: Optional[torch.Tensor], lengths: torch.Tensor, index: torch.Tensor):
    """Bags ``index`` of each row of ``lengths`` ([K, B]): (values, weights, lengths [K * M])."""
    flat = lengths.long().reshape(-1)
    starts = (torch.cumsum(flat, 0) - flat).view(lengths.shape)
    sel_len = lengths.long()[:, index].reshape(-1)
    pos = _ranges(starts[:, index].reshape(-1), sel_len)
    return values[pos], (None if weights is None else weights[pos]), sel_len.to(lengths.dtype)


@graph_function
def kjt_select_rows(kjt: KeyedJaggedTensor, index: torch.Tensor) -> KeyedJaggedTensor:
    """Rows ``index`` (int64 [M]) of every key, in that order: a KJT of batch M."""
    keys = kjt.keys()
    lengths = kjt.lengths().view(len(keys), kjt.stride())
    values, weights, new_lengths = _select_jagged(kjt.values(), kjt.weights_or_none(), lengths, index)
    return KeyedJaggedTensor(keys=keys, values=values, weights=weights, lengths=new_lengths, stride=index.numel())


def jt_select_rows(jt: JaggedTensor, index: torch.Tensor) -> JaggedTensor:
    values, weights, lengths = _select_jagged(jt.values(), jt.weights_or_none(), jt.lengths().view(1, -1), index)
    return JaggedTensor(values=values, weights=weights, lengths=lengths)


def kt_select_rows(kt: KeyedTensor, index: torch.Tensor) -> KeyedTensor:
    return KeyedTensor(keys=kt.keys(), length_per_key=kt.length_per_key(),
                       values=kt.values().index_select(0, index), key_dim=kt.key_dim())


@graph_function
def select_rows(value: Any, index: torch.Tensor) -> Any:
    """Rows ``index`` of a KJT, JaggedTensor, KeyedTensor, tensor, or a dict of those.

    Example:
        >>> kt = KeyedTensor(["a", "b"], [1, 2], torch.arange(9.).view(3, 3))
        >>> select_rows(kt, torch.tensor([2, 2])).values()
        tensor([[6., 7., 8.],
                [6., 7., 8.]])
    """
    value = wait(value)
    if isinstance(value, KeyedJaggedTensor):
        return kjt_select_rows(value, index)
    if isinstance(value, JaggedTensor):
        return jt_select_rows(value, index)
    if isinstance(value, KeyedTensor):
        return kt_select_rows(value, index)
    if isinstance(value, dict):
        return {k: select_rows(v, index) for k, v in value.items()}
    return value.index_select(0, index)


@graph_function
def take_rows(value: Any, n: int) -> Any:
    """The first ``n`` rows of a KeyedTensor, JaggedTensor, tensor, or a dict of those."""
    value = wait(value)
    if isinstance(value, KeyedTensor):
        return KeyedTensor(keys=value.keys(), length_per_key=value.length_per_key(),
                           values=value.values()[:n], key_dim=value.key_dim())
    if isinstance(value, JaggedTensor):
        lengths = value.lengths()[:n]
        end = int(lengths.sum())
        w = value.weights_or_none()
        return JaggedTensor(values=value.values()[:end], weights=None if w is None else w[:end], lengths=lengths)
    if isinstance(value, dict):
        return {k: take_rows(v, n) for k, v in value.items()}
    return value[:n]


def kjt_first_difference(a: KeyedJaggedTensor, b: KeyedJaggedTensor) -> Optional[Tuple[int, str]]:
    """``(row, "key 'k'")`` of the first row where two KJTs of the same keys and batch differ."""
    first: Optional[Tuple[int, str]] = None
    bags_b = per_key(b)
    for key, (va, wa, la) in per_key(a).items():
        vb, wb, lb = bags_b[key]
        rows = la != lb
        if not rows.any():
            owner = torch.repeat_interleave(torch.arange(la.numel()), la.long())
            bad = va != vb
            if wa is not None:
                bad = bad | (wa != wb)
            rows = torch.zeros_like(rows).index_fill_(0, owner[bad], True)
        if rows.any():
            row = int(rows.nonzero()[0])
            if first is None or row < first[0]:
                first = (row, f"key {key!r}")
    return first


# --------------------------------------------------------------------------- request entry
@graph_function
def pair_kjt(user: Optional[KeyedJaggedTensor], item: Optional[KeyedJaggedTensor], keys: List[str]) -> KeyedJaggedTensor:
    """The pair-shaped graph's KJT: its user-side and item-side keys back in one KJT, in the original key order."""
    if user is None or item is None:
        return select_keys(user if item is None else item, keys)
    if user.stride() != item.stride():
        raise RequestError(f"the user-side KJT has {user.stride()} rows and the item-side KJT {item.stride()}: "
                           "pair-shaped inputs have one row per pair in both")
    return merge([user, item], keys)


@graph_function
def request_kjt(user: Optional[KeyedJaggedTensor], item: Optional[KeyedJaggedTensor], keys: List[str],
                user_index: torch.Tensor, pad: bool, checked: None = None) -> KeyedJaggedTensor:
    """The KJT a transformed graph feeds its embedding modules, batch N (the candidates).

    ``pad=True``: each user key holds the U users' bags followed by N - U empty bags, so
    user tables look up U rows (their pooled rows ``[:U]`` are the users'); when U > N the
    batch is U and item keys get the empty bags (their rows ``[:N]`` are the candidates').
    ``pad=False``: user bags are gathered to the N candidates (exactly the pair-shaped KJT).
    ``checked``: the result of :func:`check_request_kjt`, taken so that the check runs first.
    """
    if user is None:
        return select_keys(item, keys)
    if item is None:
        return select_keys(user, keys)
    if not pad:
        return merge([kjt_select_rows(user, user_index), item], keys, stride=user_index.numel())
    # U > N (users without a candidate) needs U rows: item keys then get empty bags past N
    return merge([user, item], keys, stride=max(user_index.numel(), user.stride()))


@graph_function
def check_request_kjt(user: Optional[KeyedJaggedTensor], item: Optional[KeyedJaggedTensor], user_index: torch.Tensor,
                      arg: str, names: Tuple[str, str], user_keys: List[str], item_keys: List[str]) -> None:
    """Raise :class:`RequestError` unless ``user`` holds exactly the user keys of ``arg`` at U rows
    (``U = user_index.max() + 1``) and ``item`` exactly its item keys at N rows (``N = len(user_index)``)."""
    n = user_index.numel()
    u = int(user_index.max()) + 1 if n else 0
    for kjt, name, side, own, other, rows, what in (
        (user, names[0], "user", user_keys, item_keys, u, f"user_index refers to {u} users (0..{u - 1}): pass one row per user"),
        (item, names[1], "item", item_keys, user_keys, n, f"user_index has {n} entries (one per candidate)"),
    ):
        if not own:
            continue
        if not isinstance(kjt, KeyedJaggedTensor):
            raise RequestError(f"{side} input {name!r} must be a KeyedJaggedTensor of {arg!r}'s {side}-side keys "
                               f"{own}, got {type(kjt).__name__}")
        if kjt.variable_stride_per_key():
            raise RequestError(f"{side} KJT {name!r} has a variable batch size per key; give every key {rows} rows")
        for k in kjt.keys():
            if k in other:
                raise RequestError(f"key {k!r} is declared {'item' if side == 'user' else 'user'}-side but the "
                                   f"{side} KJT {name!r} carries it: each key of {arg!r} goes in one KJT only")
            if k not in own:
                raise RequestError(f"the {side} KJT {name!r} carries key {k!r}, which is not a key of {arg!r} "
                                   f"(keys: {user_keys + item_keys})")
        missing = [k for k in own if k not in kjt.keys()]
        if missing:
            raise RequestError(f"the {side} KJT {name!r} lacks {side}-side key(s) {missing} of {arg!r}")
        if kjt.stride() != rows:
            raise RequestError(f"the {side} KJT {name!r} (keys {list(kjt.keys())}) has {kjt.stride()} rows but {what}")
