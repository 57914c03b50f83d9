"""Equivalence checking: the transformed module against the pair-shaped model."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten, keystr, tree_flatten_with_path

from .errors import VerificationError
from .inputs import USER_INDEX, Side, _request_spec, batch_ops, pairs_to_request, request_to_pairs


def random_request(T: fx.GraphModule, num_users: int = 3, num_candidates: int = 7, seed: int = 0) -> Dict[str, torch.Tensor]:
    """A ragged request drawn from the example rows ``T`` was traced with.

    Each user gets >= 1 candidate; user rows and item rows are resampled from
    the example (so embedding ids stay in range).

    Example:
        >>> import torch, mari_fx
        >>> from mari_fx.examples import CoarseRanker
        >>> T = mari_fx.transform(CoarseRanker().eval(), ["user"], (torch.randn(4, 16), torch.randn(4, 8)))
        >>> req = random_request(T, num_users=2, num_candidates=5)
        >>> req["user"].shape[0], req["item"].shape[0], int(req["user_index"].max())
        (2, 5, 1)
    """
    if num_candidates < num_users:
        raise ValueError(f"num_candidates ({num_candidates}) must be >= num_users ({num_users})")
    example = T.meta.get("mari_fx.example")
    if not example:
        raise ValueError("T carries no example inputs: pass pair-shaped inputs and user_index to verify()")
    g = torch.Generator().manual_seed(seed)
    idx = torch.cat([torch.arange(num_users), torch.randint(num_users, (num_candidates - num_users,), generator=g)])
    idx = idx[torch.randperm(num_candidates, generator=g)]
    spec = _request_spec(T)
    request = {}
    for s in spec.inputs:
        ex, ops = example[s.name], batch_ops(example[s.name])
        rows = num_users if s.side == Side.USER else num_candidates
        request[s.name] = ops.take(ex, torch.randint(ops.rows(ex), (rows,), generator=g))
    request[USER_INDEX] = idx
    return request


def verify(model: Any, T: fx.GraphModule, *args: Any, user_index: Optional[torch.Tensor] = None,
           request: Optional[Dict[str, torch.Tensor]] = None, num_users: int = 3, num_candidates: int = 7,
           seed: int = 0, rtol: Optional[float] = None, atol: Optional[float] = None, **kwargs: Any) -> float:
    """Check ``T(request) == model(pairs)``; raise :class:`VerificationError` on the first difference.

    Give pair-shaped inputs plus ``user_index``, or a ``request``, or nothing (a random
    ragged request of ``num_users`` x ``num_candidates``).  Returns the max abs difference.

    Example:
        >>> import torch, mari_fx
        >>> from mari_fx.examples import CoarseRanker
        >>> model = CoarseRanker().eval()
        >>> T = mari_fx.transform(model, ["user"], (torch.randn(4, 16), torch.randn(4, 8)))
        >>> mari_fx.verify(model, T) < 1e-4
        True
    """
    if args or kwargs:
        if user_index is None:
            raise ValueError("pair-shaped inputs need user_index")
        request = pairs_to_request(T, *args, user_index=user_index, **kwargs)
    elif request is None:
        request = random_request(T, num_users, num_candidates, seed)
    if isinstance(model, fx.GraphModule) and "mari_fx.request" in model.meta:
        pairs = {s.name: (batch_ops(request[s.name]).take(request[s.name], request[USER_INDEX])
                          if s.side == Side.USER else request[s.name]) for s in _request_spec(model).inputs}
    else:
        pairs = request_to_pairs(T, request)
    with torch.no_grad():
        expected = model(**pairs)
        got = T(**request)
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
