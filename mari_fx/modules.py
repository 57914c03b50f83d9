"""Modules that rewritten graphs call."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class SplitLinear(nn.Module):
    """``Linear(cat([u, i]))`` re-parameterized: ``(u @ W_u.T + b)[user_index] + i @ W_i.T``.

    ``weight_user`` / ``weight_item`` hold the original weight's user and item
    columns, already permuted into the order the pieces arrive in, so a
    fragmented (interleaved) input layout costs nothing at run time.  The user
    product and the bias run at U rows; the broadcast-add is fused into the
    item GEMM (``addmm``) for 2-d inputs.

    Example:
        >>> lin = torch.nn.Linear(5, 2)
        >>> split = SplitLinear.from_weight(lin.weight, lin.bias, user_cols=[0, 3], item_cols=[1, 2, 4])
        >>> u, i, idx = torch.randn(2, 2), torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
        >>> pairs = torch.empty(4, 5); pairs[:, [0, 3]] = u[idx]; pairs[:, [1, 2, 4]] = i
        >>> torch.allclose(split(u, i, idx), lin(pairs), atol=1e-6)
        True
    """

    def __init__(self, weight_user: torch.Tensor, weight_item: torch.Tensor, bias: Optional[torch.Tensor],
                 weight_broadcast: Optional[torch.Tensor] = None):
        super().__init__()
        self.weight_user = nn.Parameter(weight_user, requires_grad=False)
        self.weight_item = nn.Parameter(weight_item, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        # Columns of item tensors that were broadcast (expand) before the matmul in the model:
        # applied to the un-expanded tensor, their product broadcasts in the sum.
        self.weight_broadcast = None if weight_broadcast is None else nn.Parameter(weight_broadcast, requires_grad=False)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: Optional[torch.Tensor], user_cols, item_cols) -> "SplitLinear":
        """Slice ``weight`` ([out, in]) into user and item column blocks (copies)."""
        w = weight.detach()
        b = None if bias is None else bias.detach().clone()
        return cls(w[:, list(user_cols)].contiguous(), w[:, list(item_cols)].contiguous(), b)

    @property
    def in_features(self) -> int:
        return self.weight_user.shape[1] + self.weight_item.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight_user.shape[0]

    def forward(self, user: torch.Tensor, item: Optional[torch.Tensor], user_index: torch.Tensor,
                item_broadcast: Optional[torch.Tensor] = None) -> torch.Tensor:
        out = F.linear(user, self.weight_user, self.bias).index_select(0, user_index)  # a fresh tensor
        if item is not None:
            if item.shape[:-1] == out.shape[:-1]:
                # one GEMM over all leading dims, the broadcast-add fused into it (in place)
                flat = out.view(-1, out.shape[-1])
                flat.addmm_(item.reshape(-1, item.shape[-1]), self.weight_item.t())
            else:
                out = out.add_(F.linear(item, self.weight_item))
        if item_broadcast is not None and self.weight_broadcast is not None:
            out = out.add_(F.linear(item_broadcast, self.weight_broadcast))
        return out

    def extra_repr(self) -> str:
        bcast = "" if self.weight_broadcast is None else f", broadcast_features={self.weight_broadcast.shape[1]}"
        return (f"user_features={self.weight_user.shape[1]}, item_features={self.weight_item.shape[1]}{bcast}, "
                f"out_features={self.out_features}, bias={self.bias is not None}")
