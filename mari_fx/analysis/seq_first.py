"""Seq-first attention modules called batch-first.

``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder`` are
seq-first by default (``batch_first=False``): their sequences are ``[L, B, E]``, the batch in dim 1,
and model code reaches them with ``h.transpose(0, 1)`` (or ``permute(1, 0, 2)``) and back.  No tag
can follow a batch in dim 1, so such a module would run at N rows even over a user-only sequence.

This pass, run on the traced graph (with example values) before tagging, rewrites each call of
such a module whose sequences are ``[L, B, E]`` into a call of a *batch-first twin*: a
:class:`BatchFirstCall` subclass of the module's class sharing its parameters and submodules,
which transposes its ``[B, L, E]`` sequences to ``[L, B, E]``, runs the module's own forward with
``batch_first=False`` -- the computation the model does, slow path included -- and transposes the
sequence output back.  A ``transpose(0, 1)`` next to the call cancels against the one the pass
inserts (``x.transpose(0, 1).transpose(0, 1)`` is ``x``, values and strides), so
``enc(h.transpose(0, 1)).transpose(0, 1)`` becomes ``twin(h)``: batch-first, tagged by the attention
rule like any batch-first module.  Key padding masks (``[B, S]``) and attention masks (``[L, S]``,
``[B*H, L, S]``) have the same layout in both conventions and are passed as they are; the
attention weights of ``MultiheadAttention`` are ``[B, L, S]`` in both.

The twin is a fiction of the analysis: the lowering emits the transposes and a call of the model's
own module (at its own path, ``node.meta["mari_fx.seq_first"]``), so a transformed module holds and
calls stock modules only (state dict, TorchScript, export unchanged).  A twin's fast path would not
match: the module keeps ``batch_first=False``, so it takes the slow path the model takes (the fused
fast path gives NaN for a fully padded sequence where the slow path does not).
"""
from __future__ import annotations

import copy
import operator
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import targets
from ..meta import SEQ_FIRST_KEY
from .example_prop import VALUE_KEY
from .folds import _batched_nodes, _in_place, _info
from .rules.base import aten, register
from .rules.sequence import _SEQ, _attention_module, attention_args


class BatchFirstCall:
    """Marks a batch-first twin of a seq-first module (see the module docstring)."""

    batch_first_call = True


class BatchFirstMultiheadAttention(BatchFirstCall, nn.MultiheadAttention):
    """``nn.MultiheadAttention(batch_first=False)`` called with ``[B, L, E]`` query / key / value."""

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        q = query.transpose(0, 1)
        k = q if key is query else key.transpose(0, 1)  # self-attention: one tensor, as the model passed it
        v = k if value is key else q if value is query else value.transpose(0, 1)
        out, weights = nn.MultiheadAttention.forward(self, q, k, v, key_padding_mask, need_weights, attn_mask,
                                                     average_attn_weights, is_causal)
        return out.transpose(0, 1), weights


class BatchFirstTransformerEncoderLayer(BatchFirstCall, nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer(batch_first=False)`` called with a ``[B, L, E]`` src."""

    def forward(self, src: Tensor, src_mask: Optional[Tensor] = None, src_key_padding_mask: Optional[Tensor] = None,
                is_causal: bool = False) -> Tensor:
        return nn.TransformerEncoderLayer.forward(self, src.transpose(0, 1), src_mask, src_key_padding_mask,
                                                  is_causal).transpose(0, 1)


class BatchFirstTransformerEncoder(BatchFirstCall, nn.TransformerEncoder):
    """``nn.TransformerEncoder`` of seq-first layers called with a ``[B, L, E]`` src."""

    def forward(self, src: Tensor, mask: Optional[Tensor] = None, src_key_padding_mask: Optional[Tensor] = None,
                is_causal: Optional[bool] = None) -> Tensor:
        return nn.TransformerEncoder.forward(self, src.transpose(0, 1), mask, src_key_padding_mask,
                                             is_causal).transpose(0, 1)


TWINS = {nn.MultiheadAttention: BatchFirstMultiheadAttention,
         nn.TransformerEncoderLayer: BatchFirstTransformerEncoderLayer,
         nn.TransformerEncoder: BatchFirstTransformerEncoder}
# A twin has a forward of its own, so the rules of its base class do not reach it through the MRO
# (mari_fx.registry): it gets the attention rule, which reads it as batch-first.
register(*TWINS.values())(_attention_module)


def _seq_first(m: nn.Module) -> bool:
    """A stock module (its class's own forward) whose attention is seq-first throughout."""
    if type(m) not in TWINS:
        return False
    attn = [a for a in m.modules() if isinstance(a, nn.MultiheadAttention)]
    return bool(attn) and not any(a.batch_first for a in attn)


def _rewritable(node: fx.Node, m: nn.Module, rows: int) -> bool:
    args = attention_args(node, m)
    if args is None:
        return False
    for kind, a in args.values():
        if kind != _SEQ:
            continue
        info = _info(a)
        if info is None or info.ndim != 3 or info.shape[1] != rows:
            return False  # an unbatched [L, E] sequence, or not the pair batch in dim 1
    if isinstance(m, nn.MultiheadAttention):  # a (output, weights) tuple: read by index only
        return all(u.op == "call_function" and u.target is operator.getitem and u.args[1] in (0, 1)
                   for u in node.users)
    return True


def batch_first_calls(gm: fx.GraphModule, rows: int) -> List[str]:
    """Rewrite the calls of seq-first attention modules over ``[L, B, E]`` sequences (example batch
    of ``rows`` rows) into calls of their batch-first twins; returns the module paths rewritten.
    Re-run the example afterwards.

    Example:
        >>> import torch, mari_fx
        >>> class M(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.enc = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)  # seq-first
        ...     def forward(self, hist, i):                                        # hist: [B, L, 8]
        ...         return self.enc(hist.transpose(0, 1)).transpose(0, 1).mean(1) + i
        >>> gm = mari_fx.trace(M().eval(), ["hist"], (torch.randn(4, 5, 8), torch.randn(4, 8)))
        >>> [(n.target, str(n.meta["mari_fx.tag"])) for n in gm.graph.nodes if n.op == "call_module"]
        [('enc_batch_first', 'user')]
    """
    modules = dict(gm.named_modules())
    calls: Dict[str, List[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module" and _seq_first(modules.get(n.target)):
            calls.setdefault(n.target, []).append(n)
    done = []
    for path, nodes in calls.items():
        m = modules[path]
        if not all(_rewritable(n, m, rows) for n in nodes):
            continue  # every call reads the same module: all or none
        twin = copy.copy(m)  # shares parameters, buffers and submodules (one set of dicts)
        twin.__class__ = TWINS[type(m)]
        twin_path = _free_name(gm, path.replace(".", "_") + "_batch_first")
        gm.add_submodule(twin_path, twin)
        for n in nodes:
            _rewrite(gm, n, twin_path, path)
        done.append(path)
    if done:
        gm.graph.eliminate_dead_code(is_impure_node=lambda n: n.op in ("placeholder", "output") or n.is_impure())
        gm.recompile()
    return done


def _free_name(gm: fx.GraphModule, name: str) -> str:
    k, out = 0, name
    while hasattr(gm, out):
        k += 1
        out = f"{name}_{k}"
    return out


def _rewrite(gm: fx.GraphModule, node: fx.Node, twin_path: str, path: str) -> None:
    g = gm.graph
    seqs = {a for kind, a in attention_args(node, gm.get_submodule(path)).values() if kind == _SEQ}
    batch_first: Dict[fx.Node, fx.Node] = {}
    with g.inserting_before(node):
        for a in seqs:
            batch_first[a] = _swap_source(a, set()) or _unsqueezed_first(g, a) or g.call_method("transpose", (a, 0, 1))
    convert = lambda a: batch_first.get(a, a)  # noqa: E731
    with g.inserting_after(node):
        new = g.call_module(twin_path, fx.node.map_arg(node.args, convert), fx.node.map_arg(node.kwargs, convert))
    new.meta = dict(node.meta)
    new.meta[SEQ_FIRST_KEY] = path
    outputs = [u for u in node.users if u.args[1] == 0] if isinstance(gm.get_submodule(path), nn.MultiheadAttention) \
        else [node]
    for out in outputs:
        if out is node:
            bf = new
        else:
            with g.inserting_after(new):
                bf = g.call_function(operator.getitem, (new, 0))
        with g.inserting_after(bf):
            sf = g.call_method("transpose", (bf, 0, 1))
        length = _info(out).shape[0] if _info(out) is not None and _info(out).ndim == 3 else None
        out.replace_all_uses_with(sf)
        for reader in list(sf.users):  # a reader that reads the output batch-first: no transpose at all
            with g.inserting_before(reader):
                same = _read_batch_first(g, reader, sf, bf, length)
            if same is not None:
                reader.replace_all_uses_with(same)
        _contiguous_for_views(g, sf)
    for u in list(node.users):  # the weights (MultiheadAttention's element 1), [B, L, S] either way
        u.replace_input_with(node, new)
    g.erase_node(node)


_POOLS = {"mean", "sum", "amax", "amin", torch.mean, torch.sum, torch.amax, torch.amin}
_ATEN_POOLS = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default}  # dims as a list


def _read_batch_first(g: fx.Graph, reader: fx.Node, sf: fx.Node, bf: fx.Node, length: Optional[int]) -> Optional[fx.Node]:
    """``reader`` of ``sf`` (``bf.transpose(0, 1)``, ``[L, B, E]``) as an op on ``bf``: the same
    elements with the batch in dim 0 -- ``sf.transpose(0, 1)`` is ``bf``, ``sf[k]`` is ``bf[:, k]``
    (a CLS / last position), ``sf.mean(0)`` / ``sum`` / ``amax`` / ``amin`` are ``bf.mean(1)`` ...
    (one sum in another order: fp32 round-off), ``sf.squeeze(0)`` of ``L == 1`` is ``bf.squeeze(1)``;
    None for anything else (it reads ``sf``, MIXED through the refused transpose)."""
    if reader.op not in ("call_method", "call_function") or not reader.args or reader.args[0] is not sf:
        return None
    if _is_swap(reader):
        return bf
    t, rest, kw = reader.target, list(reader.args[1:]), dict(reader.kwargs)
    if t is operator.getitem and len(rest) == 1 and isinstance(rest[0], int) and not kw:
        return g.call_function(operator.getitem, (bf, (slice(None), rest[0])))
    if t is aten.select.int and len(rest) == 2 and rest[0] in (0, -3) and isinstance(rest[1], int) and not kw:
        return g.call_function(operator.getitem, (bf, (slice(None), rest[1])))
    if t in _ATEN_POOLS and rest and list(rest[0]) in ([0], [-3]) and rest[1:] in ([], [False]) and not kw:
        return g.call_function(t, (bf, [1]))
    if t in _POOLS:
        dim = rest[0] if rest else kw.pop("dim", None)
        if dim in (0, -3) and len(rest) <= 1 and not kw:
            return g.create_node(reader.op, t, (bf, 1))
    if t in ("squeeze", torch.squeeze, aten.squeeze.dim) and rest in ([0], [-3]) and not kw and length == 1:
        return g.create_node(reader.op, t, (bf, 1))
    return None


def _unsqueezed_first(g: fx.Graph, a: fx.Node) -> Optional[fx.Node]:
    """``x.unsqueeze(1)`` when ``a`` is ``x.unsqueeze(0)`` of a 2-d ``x`` (a one-position query
    ``[1, B, E]``, e.g. the candidate in target attention), which is ``a.transpose(0, 1)``."""
    if a.op not in ("call_method", "call_function") or a.target not in ("unsqueeze", torch.unsqueeze, aten.unsqueeze.default):
        return None
    x, rest = a.args[0], list(a.args[1:]) + list(a.kwargs.values())
    if not isinstance(x, fx.Node) or _info(x) is None or _info(x).ndim != 2 or rest not in ([0], [-3]):
        return None
    return g.call_method("unsqueeze", (x, 1))


def _is_swap(n: fx.Node) -> bool:
    """``n`` swaps dims 0 and 1 of a 3-d tensor (its input's example value may not be known yet)."""
    rest = list(n.args[1:])
    if n.kwargs or n.op not in ("call_method", "call_function"):
        return False
    if n.target in ("transpose", "swapaxes", "swapdims", torch.transpose, torch.swapaxes, torch.swapdims,
                    aten.transpose.int):
        return len(rest) == 2 and sorted(d % 3 if isinstance(d, int) else -1 for d in rest) == [0, 1] and all(
            isinstance(d, int) and -3 <= d < 3 for d in rest)
    if n.target in ("permute", torch.permute, aten.permute.default):
        dims = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
        return len(dims) == 3 and all(isinstance(d, int) for d in dims) and [d % 3 for d in dims] == [1, 0, 2]
    return False


# --------------------------------------------------------------------------- swaps sunk past per-position ops
_POSITION_MODULES = tuple(targets.UNARY_MODULES) + (nn.Linear, nn.Dropout)
# "to" / "type" may read a tensor for its dtype; contiguous exists for its layout, which a sunk swap changes
_LAYOUT_SENSITIVE = ("to", "type", "type_as", "contiguous", torch.ops.aten.contiguous.default)
_VIEWS = ("view", "view_as", torch.ops.aten.view.default)
_LAYER_NORMS = (F.layer_norm, aten.layer_norm.default)
_SOFTMAXES = (torch.softmax, F.softmax, "softmax", torch.log_softmax, F.log_softmax, "log_softmax", aten.softmax.int,
              aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default)


def _contiguous_for_views(g: fx.Graph, swap: fx.Node) -> None:
    """Readers that need the layout the model had (``view`` of a Linear's contiguous output) read
    ``swap.contiguous()``: a swap inserted here is a strided view, the model's value was not."""
    views = [r for r in swap.users if r.op in ("call_method", "call_function") and r.target in _VIEWS]
    if views:
        with g.inserting_after(swap):
            dense = g.call_method("contiguous", (swap,))
        for r in views:
            r.replace_input_with(swap, dense)


def sink_swaps(gm: fx.GraphModule, rows: int) -> List[str]:
    """Move each swap of dims 0 and 1 (``x.transpose(0, 1)`` of a 3-d ``x``) past the ops that
    compute every position of those dims from that position alone -- ``f(x.transpose(0, 1)) ==
    f(x).transpose(0, 1)`` -- and cancel two swaps in a row.  Seq-first code computes between its
    transposes (SASRec: ``Q = layernorm(seqs.transpose(0, 1))``, ``seqs = Q + mha(Q, ...)[0]``);
    sunk, those ops run batch-first and the transposes meet the ones around the attention module
    (:func:`batch_first_calls`).  Every rewrite is an identity on values.  Returns the names of the
    nodes moved; re-run the example afterwards.

    Per-position ops: Linear / ``F.linear`` (batch-free weights), LayerNorm over the last dim,
    activations, Dropout in eval mode, softmax over the last dim, elementwise ops whose every
    other tensor operand is batch-free with all dims but the last of size 1.

    Example:
        >>> import torch, mari_fx
        >>> class M(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.norm = torch.nn.LayerNorm(8)
        ...     def forward(self, h, i):                                      # h: [B, L, 8]
        ...         s = self.norm(h.transpose(0, 1)).relu()                   # seq-first
        ...         return s.transpose(0, 1).mean(1) + i
        >>> gm = mari_fx.trace(M().eval(), ["h"], (torch.randn(4, 5, 8), torch.randn(4, 8)))
        >>> [n.target for n in gm.graph.nodes if n.op in ("call_module", "call_method")]
        ['norm', 'relu', 'mean']
    """
    if any(_in_place(n) for n in gm.graph.nodes):
        return []  # aliasing through the views would matter: keep the graph as written
    modules = dict(gm.named_modules())
    batched = _batched_nodes(gm)
    g = gm.graph
    made: set = set()  # swaps this pass inserted (no example value yet): transpose(x, 0, 1) of 3-d x
    moved: List[str] = []
    work = [n for n in g.nodes if _swap_source(n, made) is not None]
    while work:
        swap = work.pop(0)
        if swap.graph is not g:
            continue
        for reader in list(swap.users):
            if reader.graph is not g or not _per_position(reader, modules, batched, made):
                continue
            with g.inserting_after(reader):
                moved_node = g.node_copy(reader, lambda a: _swap_source(a, made) or a)
            moved_node.meta = {k: v for k, v in reader.meta.items() if k != VALUE_KEY}
            with g.inserting_after(moved_node):
                new_swap = g.call_method("transpose", (moved_node, 0, 1))
            made.add(new_swap)
            reader.replace_all_uses_with(new_swap)
            g.erase_node(reader)
            moved.append(moved_node.name)
            work.append(new_swap)
    for n in made:
        if n.graph is g:
            _contiguous_for_views(g, n)
    for n in list(g.nodes):  # two swaps in a row: the tensor itself (values and strides)
        src = _swap_source(n, made)
        inner = _swap_source(src, made) if src is not None else None
        if inner is not None:
            n.replace_all_uses_with(inner)
            moved.append(n.name)
    if moved:
        g.eliminate_dead_code(is_impure_node=lambda n: n.op in ("placeholder", "output") or n.is_impure())
        gm.recompile()
    return moved


def _swap_source(n: Any, made: set) -> Optional[fx.Node]:
    """``x`` when ``n`` swaps dims 0 and 1 of a 3-d ``x`` (known from the example, or a swap
    :func:`sink_swaps` made of a 3-d value)."""
    if not isinstance(n, fx.Node) or n.op not in ("call_method", "call_function") or not n.args:
        return None
    x = n.args[0]
    if not isinstance(x, fx.Node) or not _is_swap(n):
        return None
    three_d = n in made or any(_info(v) is not None and _info(v).ndim == 3 for v in (n, x))
    return x if three_d else None


def _per_position(n: fx.Node, modules: Dict[str, nn.Module], batched, made: set) -> bool:
    """``n`` computes each position of dims 0 and 1 from that position of its swapped inputs alone,
    so it commutes with swapping them (see :func:`sink_swaps`)."""
    out = _info(n)
    if out is None or out.ndim != 3 or n.op not in ("call_module", "call_method", "call_function"):
        return False
    swapped = [a for a in n.all_input_nodes if _swap_source(a, made) is not None]
    others = [a for a in n.all_input_nodes if a not in swapped]
    if not swapped:
        return False
    if n.op == "call_module":
        m = modules.get(n.target)
        if isinstance(m, nn.LayerNorm):
            ok = len(m.normalized_shape) == 1
        else:
            ok = isinstance(m, _POSITION_MODULES) and not (isinstance(m, nn.Dropout) and m.training)
        return ok and len(n.args) == 1 and not n.kwargs
    t = n.target
    if t in targets.LINEAR or t in _LAYER_NORMS:  # weights: any batch-free tensors
        if t in _LAYER_NORMS:
            shape = n.args[1] if len(n.args) > 1 else n.kwargs.get("normalized_shape")
            if not isinstance(shape, (list, tuple)) or len(shape) != 1:
                return False
        return swapped == [n.args[0]] and not any(a in batched for a in others)
    if t in _SOFTMAXES:
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
        return dim in (-1, 2) and swapped == [n.args[0]] and not others
    # elementwise: every other operand broadcasts over the last dim only, so it meets the same
    # element of every position whichever of dims 0 and 1 comes first
    return t in targets.ELEMENTWISE and t not in _LAYOUT_SENSITIVE and all(_trailing_only(a) for a in others)


def _trailing_only(a: fx.Node) -> bool:
    """A tensor whose dims but the last are all of size 1 (a bias, a scale, a 0-d tensor), or a
    number (an int or float node)."""
    v = a.meta.get(VALUE_KEY)
    info = _info(a)
    if info is not None:
        return all(d == 1 for d in info.shape[:-1])
    return isinstance(v, (int, float, bool)) and not isinstance(v, torch.Size)
