"""Modules that rewritten graphs call."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Tuple

from ..errors import MariError

import torch
import torch.nn as nn
import torch.nn.functional as F


Terms = Tuple[Tuple[float, int, int], ...]  # (coefficient, first column, width) of the source weight


@dataclass(frozen=True)
class SplitSource:
    """Where a :class:`SplitLinear`'s blocks come from in the pair-shaped model, so
    :func:`mari_fx.refresh` can re-derive them without re-tracing.

    ``weight`` / ``bias``: parameter paths in the model (``weight`` is ``[out, in]``, or
    ``[in, out]`` when ``transposed``, as in ``x @ W``).  ``user`` / ``item`` /
    ``broadcast``: per column block of ``weight_user`` / ``weight_item`` /
    ``weight_broadcast``, the sum of ``coefficient * weight[:, first:first + width]``.
    """

    weight: str
    bias: Optional[str]
    transposed: bool
    user: Tuple[Terms, ...]
    item: Tuple[Terms, ...]
    broadcast: Tuple[Terms, ...]

    def blocks(self, weight: torch.Tensor, which: str) -> Optional[torch.Tensor]:
        w = weight.detach().t() if self.transposed else weight.detach()
        parts = [sum(c * w[:, p:p + n] for c, p, n in terms) for terms in getattr(self, which)]
        return torch.cat(parts, 1) if parts else None


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

    source = None  # a SplitSource, set by mari_fx.transform (see mari_fx.refresh)
    __jit_ignored_attributes__ = ["source", "_mari_fx_name"]  # Python-side bookkeeping, not scripted

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

    def refresh_from(self, params: Mapping[str, torch.Tensor]) -> None:
        """Re-derive the blocks (in place) from the pair-shaped model's parameters ``params``."""
        if self.source is None:
            raise MariError("this SplitLinear records no source weight: re-transform the model")
        missing = [p for p in (self.source.weight, self.source.bias) if p is not None and p not in params]
        if missing:
            raise MariError(f"the model has no parameter {missing[0]!r}, which split layer weights come from: "
                            "refresh with the model that was transformed (or re-transform)")
        w = params[self.source.weight]
        with torch.no_grad():
            for name, which in (("weight_user", "user"), ("weight_item", "item"), ("weight_broadcast", "broadcast")):
                target, new = getattr(self, name), self.source.blocks(w, which)
                if target is not None and new is not None:
                    target.copy_(new)
            if self.bias is not None and self.source.bias is not None:
                self.bias.copy_(params[self.source.bias])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A pair-shaped state dict holds the original weight, not the blocks: loading it would
        # silently keep stale blocks (with strict=False), so say what to do instead.
        own = getattr(self, "_mari_fx_name", None)
        if self.source is not None and own is not None and prefix.endswith(own + "."):
            root = prefix[: len(prefix) - len(own) - 1]
            if root + self.source.weight in state_dict and prefix + "weight_user" not in state_dict:
                raise MariError(
                    f"the state dict is the pair-shaped model's: split layer {own!r} holds blocks derived from "
                    f"{self.source.weight!r}; call mari_fx.refresh(T, model) to update a transformed module's weights")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

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
            if item.dim() == 2 and out.dim() == 2:
                out.addmm_(item, self.weight_item.t())  # the common case, without the view ops below
            elif item.shape[:-1] == out.shape[:-1]:
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
