"""Functions that transformed graphs call at run time (TorchScript-compatible)."""
from typing import List

import torch

from .errors import RequestError


def check_request(
    user_index: torch.Tensor,
    user_inputs: List[torch.Tensor],
    item_inputs: List[torch.Tensor],
    user_names: List[str],
    item_names: List[str],
) -> None:
    """Raise :class:`RequestError` unless the inputs form a request of U users and N candidates.

    ``user_index`` must be int64 of shape [N] with ``max + 1 == U``; every user
    input has U rows and every item input N rows.  Example:

        >>> import torch
        >>> check_request(torch.tensor([0, 0, 1]), [torch.ones(2, 4)], [torch.ones(3, 5)], ["u"], ["i"])
        >>> check_request(torch.tensor([0, 0, 1]), [torch.ones(3, 4)], [torch.ones(3, 5)], ["u"], ["i"])
        Traceback (most recent call last):
        ...
        mari_fx.errors.RequestError: user input 'u' has 3 rows but user_index refers to 2 users (0..1): pass one row per user (U rows); mari_fx.pairs_to_request builds a request from pair-shaped inputs
    """
    if user_index.dtype != torch.int64:
        raise RequestError("user_index must have dtype torch.int64, got " + str(user_index.dtype))
    if user_index.dim() != 1:
        raise RequestError("user_index must be 1-d ([N]), got " + str(user_index.dim()) + " dims")
    n = user_index.size(0)
    for k in range(len(item_inputs)):
        if item_inputs[k].size(0) != n:
            raise RequestError(
                "item input '" + item_names[k] + "' has " + str(item_inputs[k].size(0))
                + " rows but user_index has " + str(n) + " entries (one per candidate)"
            )
    if n == 0:
        return
    lo = int(user_index.min())
    hi = int(user_index.max())
    if lo < 0:
        raise RequestError("user_index has a negative value " + str(lo))
    for k in range(len(user_inputs)):
        rows = user_inputs[k].size(0)
        if rows != hi + 1:
            raise RequestError(
                "user input '" + user_names[k] + "' has " + str(rows) + " rows but user_index refers to "
                + str(hi + 1) + " users (0.." + str(hi) + "): pass one row per user (U rows); "
                "mari_fx.pairs_to_request builds a request from pair-shaped inputs"
            )


def check_inference(training: bool) -> None:
    """Raise :class:`RequestError` when a transformed module is called in training mode.

    A transformed module computes user-only work once per user; in training mode Dropout
    would draw one mask per user instead of one per pair and BatchNorm would mix rows, so
    ``T.train()`` is refused at the first call.  Example:

        >>> check_inference(False)
        >>> check_inference(True)
        Traceback (most recent call last):
        ...
        mari_fx.errors.RequestError: this module was made by mari_fx.transform for inference and is in training mode: call .eval() on it (train the pair-shaped model, then transform it again)
    """
    if training:
        raise RequestError("this module was made by mari_fx.transform for inference and is in training mode: "
                           "call .eval() on it (train the pair-shaped model, then transform it again)")
