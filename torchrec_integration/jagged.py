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

from torchrec.pt2.checks import is_pt2_compiling

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


def _names(keys: List[str]) -> str:
    """``['a', 'b']``, as Python prints a list of keys (TorchScript prints lists differently)."""
    return "[" + ", ".join(["'" + k + "'" for k in keys]) + "]"


def _order(have: List[str], want: List[str], name: str) -> List[int]:
    """Positions in ``have`` of the keys ``want``; a missing key is a :class:`RequestError` naming it."""
    order: List[int] = []
    for k in want:
        if k not in have:
            raise RequestError(name + " has no key '" + k + "'; its keys are " + _names(have))
        order.append(have.index(k))
    return order


def _exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(x, 0) - x


def _ranges(starts: torch.Tensor, lengths: torch.Tensor, total: int) -> torch.Tensor:
    """``cat([arange(s, s + l) for s, l in zip(starts, lengths)])`` (``total`` = its length) without a loop."""
    return (torch.arange(total, device=lengths.device)
            + torch.repeat_interleave(starts - _exclusive_cumsum(lengths), lengths, output_size=total))


def _row_key(count: int, stride: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(key, row)`` of each entry of a flat per-key lengths tensor of ``count`` entries."""
    flat = torch.arange(count, device=device)
    return torch.div(flat, stride, rounding_mode="floor"), torch.remainder(flat, stride)


def _regroup_keys(lengths: torch.Tensor, num_keys: int, values: torch.Tensor, weights: Optional[torch.Tensor],
                  order: List[int], keys: List[str], stride: int) -> KeyedJaggedTensor:
    """The KJT of ``keys`` whose key ``j`` is key ``order[j]`` of ``lengths`` (flat [num_keys * stride],
    key-major), its ids being that key's segment of ``values``.  Only 1-d ops, and sizes follow from
    the inputs' sizes (no id count is read as a Python int when ``order`` keeps every key): under
    ``torch.export`` the batch and id counts stay symbolic, with no guard on a batch of 1."""
    perm = torch.tensor(order, dtype=torch.int64, device=lengths.device)
    key, row = _row_key(lengths.size(0), stride, lengths.device)
    per_key = torch.zeros(num_keys, dtype=torch.int64, device=lengths.device).index_add(0, key, lengths.long())
    sizes = per_key.index_select(0, perm)
    total = values.size(0) if len(order) == num_keys else int(sizes.sum())
    pos = _ranges(_exclusive_cumsum(per_key).index_select(0, perm), sizes, total)
    out_key, out_row = _row_key(len(order) * stride, stride, lengths.device)
    return KeyedJaggedTensor(
        keys=keys, values=values.index_select(0, pos),
        weights=None if weights is None else weights.index_select(0, pos),
        lengths=lengths.index_select(0, perm.index_select(0, out_key) * stride + out_row), stride=stride)


def select_keys(kjt: KeyedJaggedTensor, keys: List[str], name: str = "KeyedJaggedTensor") -> KeyedJaggedTensor:
    """The KJT of ``keys`` only, in that order; a missing key is a :class:`RequestError` naming it."""
    if not isinstance(kjt, KeyedJaggedTensor):
        raise RequestError(name + " must be a KeyedJaggedTensor")
    keys = list(keys)  # the request helpers pass a spec's tuple
    have = kjt.keys()
    if have == keys:
        return kjt
    order = _order(have, keys, name)
    return _regroup_keys(kjt.lengths(), len(have), kjt.values(), kjt.weights_or_none(), order, keys, kjt.stride())


def glue(user: KeyedJaggedTensor, item: KeyedJaggedTensor, keys: List[str], rows: int) -> KeyedJaggedTensor:
    """One KJT of ``keys`` (in that order) and batch ``rows`` from a KJT of some keys (``user``,
    at most ``rows`` rows, padded with empty bags) and a KJT of the others (``item``, ``rows`` rows)."""
    ku, ki = user.keys(), item.keys()
    lu = user.lengths()
    # index_copy, not cat with zeros(rows - U): no size relation between U and N for torch.export
    key, row = _row_key(lu.size(0), user.stride(), lu.device)
    padded = lu.new_zeros(len(ku) * rows).index_copy(0, key * rows + row, lu)
    lengths = torch.cat([padded, item.lengths().to(lu.dtype)])
    uw, iw = user.weights_or_none(), item.weights_or_none()
    weights: Optional[torch.Tensor] = None
    if uw is not None and iw is not None:
        weights = torch.cat([uw, iw])
    elif uw is not None or iw is not None:
        raise RequestError("keys " + _names(keys) + " mix weighted and unweighted features")
    order = _order(ku + ki, keys, "the request")
    return _regroup_keys(lengths, len(ku) + len(ki), torch.cat([user.values(), item.values()]), weights, order,
                         keys, rows)


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


def _select_jagged(values: torch.Tensor, weights: Optional[torch.Tensor], lengths: torch.Tensor, index: torch.Tensor
                   ) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """Bags ``index`` of each row of ``lengths`` ([K, B]): (values, weights, lengths [K * M])."""
    flat = lengths.long().reshape(-1)
    starts = _exclusive_cumsum(flat).view(lengths.shape)
    sel_len = lengths.long().index_select(1, index).reshape(-1)
    pos = _ranges(starts.index_select(1, index).reshape(-1), sel_len, int(sel_len.sum()))
    return values[pos], (None if weights is None else weights[pos]), sel_len.to(lengths.dtype)


@graph_function
def kjt_select_rows(kjt: KeyedJaggedTensor, index: torch.Tensor) -> KeyedJaggedTensor:
    """Rows ``index`` (int64 [M]) of every key, in that order: a KJT of batch M."""
    keys = kjt.keys()
    lengths = kjt.lengths().view(len(keys), kjt.stride())
    values, weights, new_lengths = _select_jagged(kjt.values(), kjt.weights_or_none(), lengths, index)
    return KeyedJaggedTensor(keys=keys, values=values, weights=weights, lengths=new_lengths, stride=index.numel())


def jt_select_rows(jt: JaggedTensor, index: torch.Tensor) -> JaggedTensor:
    """Bags ``index`` of a JaggedTensor."""
    values, weights, lengths = _select_jagged(jt.values(), jt.weights_or_none(), jt.lengths().view(1, -1), index)
    return JaggedTensor(values=values, weights=weights, lengths=lengths)


def kt_select_rows(kt: KeyedTensor, index: torch.Tensor) -> KeyedTensor:
    """Rows ``index`` of a KeyedTensor."""
    return KeyedTensor(keys=kt.keys(), length_per_key=kt.length_per_key(),
                       values=kt.values().index_select(0, index), key_dim=kt.key_dim())


def jt_dict_select_rows(d: Dict[str, JaggedTensor], index: torch.Tensor) -> Dict[str, JaggedTensor]:
    """Bags ``index`` of each JaggedTensor of a dict (an EmbeddingCollection's result)."""
    out: Dict[str, JaggedTensor] = {}
    for k, v in d.items():
        out[k] = jt_select_rows(v, index)
    return out


def tensor_dict_select_rows(d: Dict[str, torch.Tensor], index: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Rows ``index`` of each tensor of a dict (``KeyedTensor.to_dict()``)."""
    out: Dict[str, torch.Tensor] = {}
    for k, v in d.items():
        out[k] = v.index_select(0, index)
    return out


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
def take_kt_rows(kt: KeyedTensor, n: int) -> KeyedTensor:
    """The first ``n`` rows of a KeyedTensor."""
    return KeyedTensor(keys=kt.keys(), length_per_key=kt.length_per_key(), values=kt.values()[:n],
                       key_dim=kt.key_dim())


@graph_function
def take_jt_rows(jt: JaggedTensor, n: int) -> JaggedTensor:
    """The first ``n`` bags of a JaggedTensor whose later bags are empty (a user key's bags in a
    padded request's result): its values stay whole, so no id count is read (torch.export)."""
    return JaggedTensor(values=jt.values(), weights=jt.weights_or_none(), lengths=jt.lengths()[:n])


@graph_function
def take_jt_dict_rows(d: Dict[str, JaggedTensor], n: int) -> Dict[str, JaggedTensor]:
    """The first ``n`` bags of each JaggedTensor of a dict."""
    out: Dict[str, JaggedTensor] = {}
    for k, v in d.items():
        out[k] = take_jt_rows(v, n)
    return out


@graph_function
def take_rows(value: Any, n: int) -> Any:
    """The first ``n`` rows of a KeyedTensor, JaggedTensor, tensor, or a dict of those.

    (Transformed graphs call the typed ``take_*_rows`` instead, which TorchScript compiles.)"""
    value = wait(value)
    if isinstance(value, KeyedTensor):
        return take_kt_rows(value, n)
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
    user tables look up U rows (their pooled rows ``[:U]`` are the users').
    ``pad=False``: user bags are gathered to the N candidates (exactly the pair-shaped KJT).
    ``checked``: the result of :func:`check_request_kjt`, taken so that the check runs first.
    TorchScript compiles this (and everything transformed graphs call from this module).

    Example:
        >>> u = KeyedJaggedTensor(["uid"], torch.tensor([5, 6]), lengths=torch.tensor([1, 1]), stride=2)
        >>> i = KeyedJaggedTensor(["iid"], torch.tensor([7, 8, 9]), lengths=torch.tensor([1, 1, 1]), stride=3)
        >>> kjt = request_kjt(u, i, ["iid", "uid"], torch.tensor([0, 1, 1]), pad=True)
        >>> kjt.lengths().tolist(), kjt.values().tolist()
        ([1, 1, 1, 1, 1, 0], [7, 8, 9, 5, 6])
    """
    if user is None:
        assert item is not None
        return select_keys(item, keys)
    if item is None:
        return select_keys(user, keys)
    if not pad:
        user = kjt_select_rows(user, user_index)
    return glue(user, item, keys, user_index.size(0))


@graph_function
def num_users(user: KeyedJaggedTensor, user_index: torch.Tensor, dense: Optional[torch.Tensor] = None) -> int:
    """U, the rows of the user-side KJT: ``user.stride()``.

    Under ``torch.export`` / ``torch.compile`` it is read elsewhere (the request checks assert the
    counts equal): the stride is ``len(lengths) // K``, a symbolic expression that can be 1, and
    slicing ``[:U]`` with it makes export guard on ``U != 1``.  A dense user input's row count
    (``dense``) is a plain symbol; without one, ``user_index.max() + 1`` is a data-dependent count.
    """
    if torch.jit.is_scripting() or not is_pt2_compiling():
        return user.stride()
    else:
        if dense is not None:
            return dense.size(0)
        users = (user_index.max() + 1).item()
        torch._check(users >= 1)
        torch._check(users <= user_index.size(0))
        return users


def _check_side(kjt: Optional[KeyedJaggedTensor], name: str, side: str, own: List[str], other: List[str],
                arg: str) -> KeyedJaggedTensor:
    other_side = "item" if side == "user" else "user"
    if kjt is None or not isinstance(kjt, KeyedJaggedTensor):
        raise RequestError(side + " input '" + name + "' must be a KeyedJaggedTensor of '" + arg + "''s "
                           + side + "-side keys " + _names(own))
    if kjt.variable_stride_per_key():
        raise RequestError(side + " KJT '" + name + "' has a variable batch size per key; give every key one "
                           "batch size")
    for k in kjt.keys():
        if k in other:
            raise RequestError("key '" + k + "' is declared " + other_side + "-side but the " + side + " KJT '"
                               + name + "' carries it: each key of '" + arg + "' goes in one KJT only")
        if k not in own:
            raise RequestError("the " + side + " KJT '" + name + "' carries key '" + k + "', which is not a key of '"
                               + arg + "' (keys: " + _names(own + other) + ")")
    missing: List[str] = []
    for k in own:
        if k not in kjt.keys():
            missing.append(k)
    if len(missing) > 0:
        raise RequestError("the " + side + " KJT '" + name + "' lacks " + side + "-side key(s) "
                           + _names(missing) + " of '" + arg + "'")
    return kjt


@graph_function
def check_request_kjt(user: Optional[KeyedJaggedTensor], item: Optional[KeyedJaggedTensor], user_index: torch.Tensor,
                      arg: str, names: Tuple[str, str], user_keys: List[str], item_keys: List[str]) -> None:
    """Raise :class:`RequestError` unless ``user`` holds exactly the user keys of ``arg`` at U rows
    (``U = user_index.max() + 1``) and ``item`` exactly its item keys at N rows (``N = len(user_index)``).

    Under ``torch.export`` / ``torch.compile`` the row checks are tensor asserts
    (``torch._assert_async``) that read no Python int from ``user_index``, so U and N stay symbolic.
    """
    n = user_index.size(0)
    u_kjt: Optional[KeyedJaggedTensor] = None
    if len(user_keys) > 0:
        u_kjt = _check_side(user, names[0], "user", user_keys, item_keys, arg)
    if len(item_keys) > 0:
        i_kjt = _check_side(item, names[1], "item", item_keys, user_keys, arg)
        if i_kjt.stride() != n:
            raise RequestError("the item KJT '" + names[1] + "' (keys " + _names(i_kjt.keys()) + ") has "
                               + str(i_kjt.stride()) + " rows but user_index has " + str(n)
                               + " entries (one per candidate)")
    if u_kjt is None or n == 0:
        return
    rows = u_kjt.stride()
    if not torch.jit.is_scripting() and is_pt2_compiling():
        torch._assert_async(user_index.max() + 1 == rows, "mari_fx request check: the user KJT '" + names[0]
                            + "' needs user_index.max() + 1 rows (one per user)")
        if len(item_keys) > 0:
            torch._assert_async(user_index.max() < n, "mari_fx request check: more users than candidates")
        return
    u = int(user_index.max()) + 1
    if rows != u:
        raise RequestError("the user KJT '" + names[0] + "' (keys " + _names(u_kjt.keys()) + ") has "
                           + str(rows) + " rows but user_index refers to " + str(u) + " users (0.." + str(u - 1)
                           + "): pass one row per user")
    if len(item_keys) > 0 and u > n:
        raise RequestError("user_index refers to " + str(u) + " users but has only " + str(n) + " entries: '" + arg
                           + "' is looked up as one KJT of N rows, so every user needs a candidate (drop users "
                           "without candidates)")


# --------------------------------------------------------------------------- item catalogs (precompute_items)
@graph_function
def empty_bags(keys: List[str], like: KeyedJaggedTensor, user_index: torch.Tensor) -> KeyedJaggedTensor:
    """A KJT of ``keys`` with N = ``len(user_index)`` empty bags each (dtypes and weights as ``like``):
    what a request that reads its item keys from a cache feeds the embedding modules instead."""
    n = user_index.size(0)
    w = like.weights_or_none()
    return KeyedJaggedTensor(keys=keys, values=like.values().new_zeros(0),
                             weights=None if w is None else w.new_zeros(0),
                             lengths=like.lengths().new_zeros(len(keys) * n), stride=n)


@graph_function
def with_empty_keys(kjt: KeyedJaggedTensor, keys: List[str]) -> KeyedJaggedTensor:
    """``kjt`` with every other key of ``keys`` added as empty bags, in ``keys`` order (same batch)."""
    n = kjt.stride()
    others: List[str] = []
    for k in keys:
        if k not in kjt.keys():
            others.append(k)
    w = kjt.weights_or_none()
    empty = KeyedJaggedTensor(keys=others, values=kjt.values().new_zeros(0),
                              weights=None if w is None else w.new_zeros(0),
                              lengths=kjt.lengths().new_zeros(len(others) * n), stride=n)
    return glue(empty, kjt, keys, n)


def kjt_rows(kjt: KeyedJaggedTensor, start: int, stop: int) -> KeyedJaggedTensor:
    """Rows ``[start, stop)`` of every key: a KJT of batch ``stop - start``."""
    return kjt_select_rows(kjt, torch.arange(start, stop, device=kjt.lengths().device))
