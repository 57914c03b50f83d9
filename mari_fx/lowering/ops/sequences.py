"""Lowering of attention modules whose ``[B*H, L, S]`` attention mask folds the batch with the
heads (:func:`mari_fx.analysis.rules.batch_major_fold`).

The fold itself merges the batch dimension, so its own node is not USER (it is computed at N rows
if anything else reads it).  An attention module tagged USER reads it at U rows instead: the fold
is re-emitted on the U-row source (``src.flatten(0, k)`` / ``src.repeat_interleave(H, dim=0)``),
which is row ``u * H + h`` for user ``u``, exactly the layout the module expects for U samples.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from ...analysis import rules
from ..context import LAZY_BUILDERS, LoweringContext, register_lowering
from ..values import N, U, Lazy, Rows, Seq, Value
from ...analysis.seq_first import TWINS
from ...analysis.tags import ROWS_KEY, TAG_KEY, Side
from ...meta import SEQ_FIRST_KEY


def _lower_attention(lw: LoweringContext, node: fx.Node, module: nn.Module):
    if node.meta[TAG_KEY].side != Side.USER:
        return None
    folds = _folds(lw, rules.attention_args(node, module))
    if not folds:
        return None
    new = lw.graph.node_copy(node, _attention_input(lw, folds))
    lw.port_meta(node, new)
    new.meta[ROWS_KEY] = U
    return Rows(new, U, node)


def _folds(lw: LoweringContext, args) -> dict:
    """The batch-major ``[B*H, L, S]`` masks among an attention call's arguments that are not
    at U rows already: ``{mask: (src, how, k)}``."""
    folds = {}
    for kind, a in (args or {}).values():
        v = lw.lowered(a) if isinstance(a, fx.Node) else None
        if kind == rules._ATTN and isinstance(v, Rows) and v.level == U:
            continue
        fold = rules.batch_major_fold(a) if kind == rules._ATTN else None
        if fold is not None:
            folds[a] = fold
    return folds


def _attention_input(lw: LoweringContext, folds: dict):
    """How a USER attention call reads an argument at U rows: a batch-major mask fold (of
    :func:`_folds`) re-emitted on its U-row source, anything else as it is."""

    def at_u(a: Any) -> Any:
        if a in folds:
            src, how, k = folds[a]
            src_u = lw.as_is(lw.value(src))
            out = (lw.graph.call_function(torch.flatten, (src_u, 0, k)) if how == "flatten"
                   else lw.graph.call_function(torch.repeat_interleave, (src_u, k), {"dim": 0}))
            out.meta[ROWS_KEY] = U
            return out
        return lw.as_is(lw.value(a))

    return at_u


register_lowering(nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerEncoder,
                  nn.TransformerDecoderLayer, nn.TransformerDecoder, nn.Transformer)(_lower_attention)


@register_lowering(*TWINS.values())
def _lower_batch_first_twin(lw: LoweringContext, node: fx.Node, module: nn.Module) -> Value:
    """A batch-first twin (:mod:`mari_fx.analysis.seq_first`) becomes what the model computes: its
    sequences transposed to ``[L, B, E]``, the model's own seq-first module (``node.meta
    ["mari_fx.seq_first"]``), the sequence output transposed back -- all at the call's level (U rows
    for a user-only call), so the transformed module calls stock modules only."""
    level = U if node.meta[TAG_KEY].side == Side.USER else N
    args = rules.attention_args(node, module)
    convert = _attention_input(lw, _folds(lw, args)) if level == U else (lambda a: lw.materialize(lw.value(a)))
    seqs = {a for kind, a in args.values() if kind == rules._SEQ}
    seq_first: dict = {}

    def arg(a: Any) -> Any:
        v = convert(a)
        if a in seqs:
            if a not in seq_first:  # one transpose per tensor: self-attention passes one tensor thrice
                seq_first[a] = _at(lw, lw.graph.call_method("transpose", (v, 0, 1)), level)
            return seq_first[a]
        return v

    call = _at(lw, lw.graph.call_module(node.meta[SEQ_FIRST_KEY], fx.node.map_arg(node.args, arg),
                                        fx.node.map_arg(node.kwargs, arg)), level)
    if isinstance(module, nn.MultiheadAttention):  # (output [L, B, E], weights [B, L, S] or None)
        out = _at(lw, lw.graph.call_function(operator.getitem, (call, 0)), level)
        weights = _at(lw, lw.graph.call_function(operator.getitem, (call, 1)), level)
        return Seq((Rows(_at(lw, lw.graph.call_method("transpose", (out, 0, 1)), level), level), Rows(weights, level)))
    return Rows(_at(lw, lw.graph.call_method("transpose", (call, 0, 1)), level), level, node)


def _at(lw: LoweringContext, n: fx.Node, level: str) -> fx.Node:
    n.meta[ROWS_KEY] = level
    return n


def _lazy_fold(lw: LoweringContext, node: fx.Node):
    """A fold of a U-row value stays unemitted until something needs it at N rows: an attention
    module at U rows re-emits it on the U-row source instead (no gather)."""
    fold = rules.batch_major_fold(node)
    if fold is not None and isinstance(lw.lowered(fold[0]), Rows) and lw.lowered(fold[0]).level == U:
        return Lazy(node)
    return None


LAZY_BUILDERS.add("mask_fold", _lazy_fold, priority=0)  # after combinations and field blocks
