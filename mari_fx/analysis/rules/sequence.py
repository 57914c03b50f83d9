"""Sequence models: attention (``scaled_dot_product_attention``, ``MultiheadAttention``,
Transformer layers), RNNs, masks folded with the batch (:func:`batch_major_fold`)."""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .base import (aten, join_all, register, rowwise, rowwise_in, RuleContext, SeqTag, Side, Tag, TensorInfo,
    _uniform_like, VALUE_KEY)
from .shapes import _is_batched_node


# What each argument of the attention modules is, so that every argument (masks passed by keyword
# included) is checked for what it is: a sequence [B, L, E], a key padding mask [B, S] (one row per
# sample), an attention mask ([L, S]: shared by every sample, so batch-free; [B*H, L, S]: the batch
# folded with the heads) or a flag.
_SEQ, _PAD, _ATTN, _FLAG = "sequence", "key padding mask", "attention mask", "flag"
_DECODER_ARGS = (("tgt", _SEQ), ("memory", _SEQ), ("tgt_mask", _ATTN), ("memory_mask", _ATTN),
                 ("tgt_key_padding_mask", _PAD), ("memory_key_padding_mask", _PAD), ("tgt_is_causal", _FLAG),
                 ("memory_is_causal", _FLAG))
ATTENTION_ARGS: Dict[type, Tuple[Tuple[str, str], ...]] = {
    nn.MultiheadAttention: (("query", _SEQ), ("key", _SEQ), ("value", _SEQ), ("key_padding_mask", _PAD),
                            ("need_weights", _FLAG), ("attn_mask", _ATTN), ("average_attn_weights", _FLAG),
                            ("is_causal", _FLAG)),
    nn.TransformerEncoderLayer: (("src", _SEQ), ("src_mask", _ATTN), ("src_key_padding_mask", _PAD),
                                 ("is_causal", _FLAG)),
    nn.TransformerEncoder: (("src", _SEQ), ("mask", _ATTN), ("src_key_padding_mask", _PAD), ("is_causal", _FLAG)),
    nn.TransformerDecoderLayer: _DECODER_ARGS,
    nn.TransformerDecoder: _DECODER_ARGS,
    nn.Transformer: (("src", _SEQ), ("tgt", _SEQ), ("src_mask", _ATTN), ("tgt_mask", _ATTN), ("memory_mask", _ATTN),
                     ("src_key_padding_mask", _PAD), ("tgt_key_padding_mask", _PAD),
                     ("memory_key_padding_mask", _PAD), ("src_is_causal", _FLAG), ("tgt_is_causal", _FLAG),
                     ("memory_is_causal", _FLAG)),
}


def _batch_first_twin(module: nn.Module) -> bool:
    return getattr(type(module), "batch_first_call", False)


def attention_args(node: fx.Node, module: nn.Module) -> Optional[Dict[str, Tuple[str, Any]]]:
    """``{name: (kind, value)}`` of an attention module call's arguments (positional and keyword),
    kind one of "sequence", "key padding mask", "attention mask", "flag"; None for a subclass with
    its own ``forward`` or an argument the module does not take."""
    base = next((c for c in type(module).__mro__ if c in ATTENTION_ARGS), None)
    if base is None or (type(module).forward is not base.forward and not _batch_first_twin(module)):
        return None
    schema = ATTENTION_ARGS[base]
    if len(node.args) > len(schema) or any(k not in dict(schema) for k in node.kwargs):
        return None
    kinds = dict(schema)
    bound = {name: (kind, a) for (name, kind), a in zip(schema, node.args)}
    bound.update({k: (kinds[k], v) for k, v in node.kwargs.items()})
    return bound


def batch_major_fold(a: Any) -> Optional[Tuple[fx.Node, str, int]]:
    """``(src, how, k)`` if ``a`` is a batched tensor ``src`` with its batch folded into dim 0
    *batch-major* (row ``b * H + h`` belongs to sample ``b``), the layout of a ``[B*H, L, S]``
    attention mask: ``("flatten", k)`` for ``src.flatten(0, k)`` or a reshape / view that merges
    dims ``0..k`` (``src.reshape(-1, L, S)`` of ``[B, H, L, S]``), ``("repeat", H)`` for
    ``src.repeat_interleave(H, dim=0)``.  None for anything else (``src.repeat(H, 1, 1)`` is
    head-major: sample ``b``'s rows are not contiguous).

    Example:
        >>> import torch, mari_fx
        >>> from mari_fx.analysis.rules import batch_major_fold
        >>> class M(torch.nn.Module):
        ...     def forward(self, m, x):
        ...         return m.unsqueeze(1).expand(-1, 2, -1, -1).reshape(-1, 3, 3), m.repeat(2, 1, 1), x
        >>> gm = mari_fx.trace(M(), ["m"], (torch.ones(4, 3, 3), torch.ones(4, 1)))
        >>> [batch_major_fold(n)[1:] if batch_major_fold(n) else None for n in gm.graph.nodes
        ...  if n.target in ("reshape", "repeat")]
        [('flatten', 1), None]
    """
    if not (isinstance(a, fx.Node) and a.op in ("call_function", "call_method") and a.args):
        return None
    src, out = a.args[0], a.meta.get(VALUE_KEY)
    if not (_is_batched_node(src) and isinstance(out, TensorInfo)):
        return None
    shape = src.meta[VALUE_KEY].shape
    if a.target in ("flatten", torch.flatten, aten.flatten.using_ints):
        start = a.args[1] if len(a.args) > 1 else a.kwargs.get("start_dim", 0)
        end = a.args[2] if len(a.args) > 2 else a.kwargs.get("end_dim", -1)
        if start == 0 and isinstance(end, int) and 1 <= end % len(shape):
            return src, "flatten", end % len(shape)
        return None
    if a.target in ("reshape", "view", torch.reshape, aten.view.default, aten.reshape.default,
                    aten._unsafe_view.default):
        for k in range(1, len(shape)):
            rows = 1
            for d in shape[:k + 1]:
                rows *= d
            if out.shape[0] == rows and tuple(out.shape[1:]) == tuple(shape[k + 1:]):
                return src, "flatten", k
        return None
    if a.target in ("repeat_interleave", torch.repeat_interleave, aten.repeat_interleave.self_int):
        reps = a.args[1] if len(a.args) > 1 else a.kwargs.get("repeats")
        dim = a.args[2] if len(a.args) > 2 else a.kwargs.get("dim")
        if isinstance(reps, int) and dim == 0 and a.kwargs.get("output_size") is None:
            return src, "repeat", reps
    return None


@register(nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.TransformerEncoder,
          nn.TransformerDecoder, nn.Transformer)
def _attention_module(ctx: RuleContext) -> Tag:
    """Attention within each sample's own sequence is row-wise when the batch comes first; each
    argument is checked for what it is (see :data:`ATTENTION_ARGS`), and a refusal names the
    argument at fault (typically a mask)."""
    m = ctx.module
    name = type(m).__name__
    # Transformer layers keep the flag on their attention submodules; a twin of a seq-first module
    # (mari_fx.analysis.seq_first) takes batch-first tensors whatever its flags say.
    batch_first = _batch_first_twin(m) or all(a.batch_first for a in m.modules() if isinstance(a, nn.MultiheadAttention))
    if not batch_first:
        return ctx.refuse(f"{name}(batch_first=False) keeps the batch in dim 1")
    if m.training and any(getattr(d, "p", 0) > 0 for d in m.modules() if isinstance(d, nn.Dropout)):
        return ctx.refuse(f"{name} in training mode applies dropout: call model.eval()")
    args = attention_args(ctx.node, m)
    if args is None:
        return rowwise(ctx)
    sides: Dict[str, Side] = {}
    for arg, (kind, a) in args.items():
        side, ndim = ctx.side(a), ctx.ndim(a)
        culprit = f"{name}'s {arg} '{a.name if isinstance(a, fx.Node) else a}'"
        if side == Side.CONST:
            continue
        if kind == _FLAG:
            return ctx.refuse(f"{culprit} depends on the request: pass a constant flag")
        if kind == _SEQ and ndim != 3:
            return ctx.refuse(f"{culprit} is {ndim}-d, not a batched [B, L, E] sequence")
        if kind == _PAD and ndim != 2:
            return ctx.refuse(f"{culprit} ({kind}) is {ndim}-d, not [B, S] with one row per sample")
        if kind == _ATTN:
            if ndim == 3:
                fold = batch_major_fold(a)
                if fold is None:
                    return ctx.refuse(
                        f"{culprit} ({kind}, [B*H, L, S]) folds the batch with the heads in a layout mari_fx "
                        f"cannot prove batch-major: build it as m.repeat_interleave(num_heads, dim=0) from "
                        f"[B, L, S] or m.flatten(0, 1) from [B, H, L, S]")
                side = ctx.side(fold[0])
            else:
                return ctx.refuse(f"{culprit} ({kind}) is {ndim}-d: a 2-d mask is shared by every sample "
                                  f"and must not depend on the request; pass [B*H, L, S] for a mask per sample")
        sides[arg] = side
    out = join_all(sides.values())
    seq = join_all(s for arg, s in sides.items() if args[arg][0] == _SEQ)
    masks = [arg for arg, s in sides.items() if args[arg][0] != _SEQ and s.join(seq) != seq]
    if out == Side.MIXED and seq == Side.USER and masks:  # name the mask that keeps it off U rows
        arg = masks[0]
        return ctx.refuse(f"{name}'s {arg} '{args[arg][1].name}' ({args[arg][0]}) is {sides[arg]}-side but its "
                          f"sequences are user-only: the {name} runs at N rows (declare the mask's inputs "
                          "user-side if they are)")
    return ctx.result(out)


@register(nn.RNN, nn.GRU, nn.LSTM)
def _rnn(ctx: RuleContext) -> Tag:
    """Row-wise output sequence; the final hidden state has the batch in dim 1 (MIXED, recomputed)."""
    m = ctx.module
    if not m.batch_first:
        return ctx.refuse(f"{type(m).__name__}(batch_first=False) keeps the batch in dim 1")
    if len(ctx.inputs()) > 1:
        return ctx.refuse(f"{type(m).__name__} with an initial state (batch in dim 1)")
    tag = rowwise(ctx, ("input",), min_ndim=3)  # a 2-d input is one unbatched sequence: the batch
    if isinstance(tag, SeqTag) and tag.side != Side.MIXED:
        return SeqTag((tag.items[0], _uniform_like(ctx.out[1], Side.MIXED)))
    return tag


# A recurrent cell steps each sample alone: its input [B, E] and state [B, H] (a tuple (h, c) for
# LSTMCell) are rows of the batch; a 1-d input is one unbatched sample (its dim 0 is the features).
register(nn.RNNCell, nn.GRUCell, nn.LSTMCell, aten.rnn_tanh_cell.default, aten.rnn_relu_cell.default, aten.gru_cell.default,
         aten.lstm_cell.default)(rowwise_in("input", "hx", min_ndim=2))


@register(F.scaled_dot_product_attention)
def _sdpa(ctx: RuleContext) -> Tag:
    """Row-wise over batched ``[B, ..., L, E]`` q / k / v of one rank; a batched ``attn_mask``
    must have that rank too (dim 0 its batch), a lower-rank mask must be batch-free."""
    if ctx.arg(4, "dropout_p", 0.0):
        return ctx.refuse("scaled_dot_product_attention with dropout")
    qkv = [ctx.arg(i, n) for i, n in enumerate(("query", "key", "value"))]
    ranks = {ctx.ndim(a) for a in qkv if ctx.side(a) != Side.CONST}
    if len(ranks) > 1 or (ranks and min(ranks) < 3):
        return ctx.refuse("scaled_dot_product_attention of batched query/key/value of different ranks or < 3 dims")
    rank = max(ranks) if ranks else max(ctx.ndim(a) or 0 for a in qkv)
    mask = ctx.arg(3, "attn_mask", None)
    if isinstance(mask, fx.Node):
        if ctx.side(mask) != Side.CONST and ctx.ndim(mask) != rank:
            return ctx.refuse(f"scaled_dot_product_attention's attn_mask '{mask.name}' is {ctx.ndim(mask)}-d "
                              f"against {rank}-d query/key/value: its batch would line up with another dim; "
                              f"give it {rank} dims (e.g. mask[:, None, None, :])")
        if ctx.side(mask) == Side.CONST and (ctx.ndim(mask) or 0) > rank:
            return ctx.refuse(f"scaled_dot_product_attention's attn_mask '{mask.name}' adds leading dims")
    for k, flag in ((5, "is_causal"), (6, "scale"), (7, "enable_gqa")):
        if ctx.side(ctx.arg(k, flag, None)) != Side.CONST:
            return ctx.refuse(f"scaled_dot_product_attention's {flag} depends on the request")
    return ctx.rowwise()

# torch.export (ATen) spellings of the same ops
register(aten.scaled_dot_product_attention.default)(_sdpa)
