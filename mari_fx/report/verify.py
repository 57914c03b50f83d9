"""Equivalence checking: the transformed module against the pair-shaped model."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten, keystr, tree_flatten_with_path

from ..meta import EXAMPLE_KEY, REQUEST_KEY
from ..registry import with_extensions_of_arguments
from ..errors import DeclarationError, RequestError, VerificationError
from ..frontend.inputs import USER_INDEX, Side, _request_spec, batch_ops, pairs_to_request, request_to_pairs


def ragged_index(users: int, candidates: int, seed: int = 0, contiguous: bool = False) -> torch.Tensor:
    """A ragged ``user_index``: every user has >= 1 candidate, lists of different lengths;
    shuffled, or each user's candidates next to each other (``contiguous=True``, as a
    serving batch lays them out).

    Example:
        >>> ragged_index(3, 8, contiguous=True).bincount().tolist()
        [3, 2, 3]
        >>> sorted(ragged_index(3, 8).tolist()) == ragged_index(3, 8, contiguous=True).tolist()
        True
    """
    return _ragged_index(users, candidates, torch.Generator().manual_seed(seed), contiguous)


def _ragged_index(users: int, candidates: int, g: torch.Generator, contiguous: bool = False) -> torch.Tensor:
    """:func:`ragged_index` drawing from generator ``g``."""
    if candidates < users:
        raise RequestError(f"{users} users need >= {users} candidates (num_candidates >= num_users), "
                           f"got {candidates}")
    extra = torch.randint(users, (candidates - users,), generator=g)
    if contiguous:
        counts = torch.ones(users, dtype=torch.int64) + torch.bincount(extra, minlength=users)
        return torch.repeat_interleave(torch.arange(users), counts)
    idx = torch.cat([torch.arange(users), extra])
    return idx[torch.randperm(candidates, generator=g)]


@with_extensions_of_arguments
def random_request(T: fx.GraphModule, num_users: int = 3, num_candidates: int = 7, seed: int = 0) -> Dict[str, torch.Tensor]:
    """A ragged request drawn from the example rows ``T`` was traced with.

    Each user gets >= 1 candidate; user rows and item rows are resampled from
    the example (so embedding ids stay in range).

    Example:
        >>> import torch, mari_fx
        >>> from mari_fx.testing.examples import CoarseRanker
        >>> T = mari_fx.transform(CoarseRanker().eval(), ["user"], (torch.randn(4, 16), torch.randn(4, 8)))
        >>> req = random_request(T, num_users=2, num_candidates=5)
        >>> req["user"].shape[0], req["item"].shape[0], int(req["user_index"].max())
        (2, 5, 1)
    """
    example = T.meta.get(EXAMPLE_KEY)
    if not example:
        raise DeclarationError("T carries no example inputs: pass pair-shaped inputs and user_index to verify()")
    g = torch.Generator().manual_seed(seed)
    idx = _ragged_index(num_users, num_candidates, g)
    spec = _request_spec(T)
    request = {}
    for s in spec.inputs:
        ex, ops = example[s.name], batch_ops(example[s.name])
        rows = num_users if s.side == Side.USER else num_candidates
        request[s.name] = ops.take(ex, torch.randint(ops.rows(ex), (rows,), generator=g))
    request[USER_INDEX] = idx
    return request


@with_extensions_of_arguments
def verify(model: Any, T: fx.GraphModule, *args: Any, user_index: Optional[torch.Tensor] = None,
           request: Optional[Dict[str, torch.Tensor]] = None, num_users: int = 3, num_candidates: int = 7,
           seed: int = 0, rtol: Optional[float] = None, atol: Optional[float] = None, **kwargs: Any) -> float:
    """Check ``T(request) == model(pairs)``; raise :class:`VerificationError` on the first difference.

    Give pair-shaped inputs plus ``user_index``, or a ``request``, or nothing (a random
    ragged request of ``num_users`` x ``num_candidates``).  Returns the max abs difference.

    Example:
        >>> import torch, mari_fx
        >>> from mari_fx.testing.examples import CoarseRanker
        >>> model = CoarseRanker().eval()
        >>> T = mari_fx.transform(model, ["user"], (torch.randn(4, 16), torch.randn(4, 8)))
        >>> mari_fx.verify(model, T) < 1e-4
        True
    """
    if args or kwargs:
        if user_index is None:
            raise RequestError("pair-shaped inputs need user_index: verify(model, T, *pairs, user_index=idx)")
        request = pairs_to_request(T, *args, user_index=user_index, **kwargs)
    elif request is None:
        request = random_request(T, num_users, num_candidates, seed)
    if isinstance(model, fx.GraphModule) and REQUEST_KEY in model.meta:
        pairs = {s.name: (batch_ops(request[s.name]).take(request[s.name], request[USER_INDEX])
                          if s.side == Side.USER else request[s.name]) for s in _request_spec(model).inputs}
    else:
        pairs = request_to_pairs(T, request)
    with torch.no_grad():
        expected = model(**pairs)
        got = T(**request)
    return compare_outputs(expected, got, rtol=rtol, atol=atol)


def compare_outputs(expected: Any, got: Any, rtol: Optional[float] = None, atol: Optional[float] = None) -> float:
    """Check ``got`` against ``expected`` leaf by leaf (``torch.testing.assert_close``); raise
    :class:`VerificationError` naming the first leaf that differs.  Returns the max abs difference.

    Example:
        >>> compare_outputs({"a": torch.ones(2)}, {"a": torch.ones(2)})
        0.0
        >>> compare_outputs({"a": torch.ones(2)}, {"a": torch.zeros(2)})
        Traceback (most recent call last):
        ...
        mari_fx.errors.VerificationError: output['a'] differs from the original model:
        ...
    """
    exp_leaves, exp_struct = tree_flatten_with_path(expected)
    got_leaves, got_struct = tree_flatten(got)
    if exp_struct != got_struct:
        raise VerificationError(f"output structure differs: model gives {exp_struct}, transformed gives {got_struct}")
    worst = 0.0
    for (path, e), g in zip(exp_leaves, got_leaves):
        where = "output" + keystr(path)
        try:
            torch.testing.assert_close(g, e, rtol=rtol, atol=atol)
        except AssertionError as err:
            raise VerificationError(f"{where} differs from the original model:\n{err}") from None
        if isinstance(e, torch.Tensor) and e.is_floating_point() and e.numel():
            worst = max(worst, float((g - e).abs().max()))
    return worst
