"""Lowering of attention modules whose ``[B*H, L, S]`` attention mask folds the batch with the
heads (:func:`mari_fx.analysis.rules.batch_major_fold`).

The fold itself merges the batch dimension, so its own node is not USER (it is computed at N rows
if anything else reads it).  An attention module tagged USER reads it at U rows instead: the fold
is re-emitted on the U-row source (``src.flatten(0, k)`` / ``src.repeat_interleave(H, dim=0)``),
which is row ``u * H + h`` for user ``u``, exactly the layout the module expects for U samples.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from ...analysis import rules
from ..context import LAZY_BUILDERS, LoweringContext, register_lowering
from ..values import U, Lazy, Rows
from ...analysis.tags import ROWS_KEY, TAG_KEY, Side


def _lower_attention(lw: LoweringContext, node: fx.Node, module: nn.Module):
    if node.meta[TAG_KEY].side != Side.USER:
        return None
    args = rules.attention_args(node, module)
    folds = {}
    for kind, a in (args or {}).values():
        v = lw.lowered(a) if isinstance(a, fx.Node) else None
        if kind == rules._ATTN and isinstance(v, Rows) and v.level == U:
            continue
        fold = rules.batch_major_fold(a) if kind == rules._ATTN else None
        if fold is not None:
            folds[a] = fold
    if not folds:
        return None

    def at_u(a: Any) -> Any:
        if a in folds:
            src, how, k = folds[a]
            src_u = lw.as_is(lw.value(src))
            out = (lw.graph.call_function(torch.flatten, (src_u, 0, k)) if how == "flatten"
                   else lw.graph.call_function(torch.repeat_interleave, (src_u, k), {"dim": 0}))
            out.meta[ROWS_KEY] = U
            return out
        return lw.as_is(lw.value(a))

    new = lw.graph.node_copy(node, at_u)
    lw.port_meta(node, new)
    new.meta[ROWS_KEY] = U
    return Rows(new, U, node)


register_lowering(nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerEncoder,
                  nn.TransformerDecoderLayer, nn.TransformerDecoder, nn.Transformer)(_lower_attention)


def _lazy_fold(lw: LoweringContext, node: fx.Node):
    """A fold of a U-row value stays unemitted until something needs it at N rows: an attention
    module at U rows re-emits it on the U-row source instead (no gather)."""
    fold = rules.batch_major_fold(node)
    if fold is not None and isinstance(lw.lowered(fold[0]), Rows) and lw.lowered(fold[0]).level == U:
        return Lazy(node)
    return None


LAZY_BUILDERS.add("mask_fold", _lazy_fold, priority=0)  # after combinations and field blocks
