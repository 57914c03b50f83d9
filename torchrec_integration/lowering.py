"""Lowering TorchRec nodes: user-side sparse features looked up once per user.

The request's KJT (the ``pair_kjt`` node that glues the user-side and item-side
KJTs back together) becomes one KJT of batch N in which each *user* key holds the
U users' bags followed by N - U empty bags (``request_kjt(..., pad=True)``).  Every
embedding module is called on it once, unchanged (sharded or not): user tables
look up the U users' ids only, and in the pooled ``KeyedTensor`` the user keys'
columns are valid in rows ``[:U]``.  The accessors then slice per key: user keys at
U rows (``values[:U, a:b]``), item keys at N rows, as column pieces that a Linear
splits (:class:`mari_fx.SplitLinear`).

A padded result is only handed to consumers lowered here (``values()``,
``kt[key]``, ``to_dict()[key]``, ``KeyedTensor.regroup``); an embedding module with
any other consumer gets the exact pair-shaped KJT instead (user bags gathered to N
rows), so nothing downstream ever sees the padding.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
from torchrec.sparse import jagged_tensor as jt_mod
from torchrec.sparse.jagged_tensor import KeyedTensor

from mari_fx.analysis.example_prop import VALUE_KEY
from mari_fx.lowering.context import LoweringContext
from mari_fx.lowering.values import C, N, U, Rows, Seq
from mari_fx.registry import Registry
from mari_fx.analysis.tags import ROWS_KEY, TAG_KEY, SeqTag, Side

from . import jagged
from .extension import EXTENSION
from .rules import POOLED, REGROUPS, KeyedTag, source_of
from .summaries import KeyedTensorInfo

EMBEDDING_KINDS = Registry("torchrec.embedding_kinds", "embedding module class -> POOLED / SEQUENCE (see registry)")
_KEY_STRUCTURE = ("keys", "length_per_key", "offset_per_key", "key_dim")


@dataclass(frozen=True, eq=False)
class KeyedSeq(Seq):
    """A lowered dict (``to_dict()``, ``regroup_as_dict``): one value per key."""

    keys: Tuple[str, ...] = ()

    def get(self, key: str) -> Any:
        return self.items[self.keys.index(key)]


@dataclass
class _State:
    padded: Dict[fx.Node, Tuple[fx.Node, fx.Node]]  # pair_kjt node -> (padded KJT, U) in the new graph
    padded_out: Dict[fx.Node, fx.Node]  # embedding node whose user keys are valid in rows [:U] -> U
    values: Dict[fx.Node, fx.Node]  # new KeyedTensor node -> its values() node


def _state(lw: LoweringContext) -> _State:
    return lw.state("torchrec", lambda: _State({}, {}, {}))


def _new_node(lw: LoweringContext, kind: str, target: Any, args: tuple, level: str) -> fx.Node:
    node = lw.graph.create_node(kind, target, args)
    node.meta[ROWS_KEY] = level
    return node


# --------------------------------------------------------------------------- which consumers take padding
def _getitem_by_key(use: fx.Node, base: fx.Node) -> bool:
    return (use.op == "call_function" and use.target is operator.getitem and use.args[0] is base
            and isinstance(use.args[1], str))


def _only_keyed_reads(node: fx.Node) -> bool:
    return all(_getitem_by_key(u, node) for u in node.users)


def _kt_use_lowered(use: fx.Node, kt: fx.Node) -> bool:
    """``use`` of a pooled KeyedTensor is one the lowerings here take padded input for."""
    if use.target in _KEY_STRUCTURE or _getitem_by_key(use, kt):
        return True
    if use.op == "call_method" and use.target == "values" and use.args == (kt,):
        return True
    if use.op == "call_method" and use.target == "to_dict" and use.args == (kt,):
        return _only_keyed_reads(use)
    if use.op == "call_function" and use.target in REGROUPS:  # lowered where the rule read the layout
        return isinstance(use.meta.get(TAG_KEY), SeqTag)
    if use.op == "call_function" and use.target is KeyedTensor.regroup_as_dict:
        return isinstance(use.meta.get(TAG_KEY), KeyedTag) and _only_keyed_reads(use)
    return use.op == "call_function" and use.target is jt_mod._all_keys_used_once


def takes_padding(lw: LoweringContext, node: fx.Node) -> bool:
    """An embedding module call whose consumers all cope with user rows valid in ``[:U]`` only."""
    if node.op != "call_module" or EMBEDDING_KINDS.first(type(lw.modules.get(node.target))) is None:
        return False
    tag = node.meta[TAG_KEY]
    if tag.side != Side.MIXED:
        return True  # user-only: cut to U rows right away; item-only: exact
    if EMBEDDING_KINDS.first(type(lw.modules[node.target])) == POOLED:
        return all(_kt_use_lowered(u, node) for u in node.users)
    return _only_keyed_reads(node)


# --------------------------------------------------------------------------- the request's KJT
@EXTENSION.lowering(jagged.pair_kjt)
def _lower_pair_kjt(lw: LoweringContext, node: fx.Node, _module: Any) -> Rows:
    user, item, keys = node.args[:3]
    u = lw.value(user).node if user is not None else None
    i = lw.value(item).node if item is not None else None
    checked = None
    if lw.options.check_requests:
        spec = {s.name: s for s in lw.spec.inputs}
        arg = spec[(user if user is not None else item).target].arg
        names = tuple(p.target if p is not None else "" for p in (user, item))
        side_keys = [list(spec[p.target].keys) if p is not None else [] for p in (user, item)]
        checked = lw.graph.call_function(jagged.check_request_kjt, (u, i, lw.user_index, arg, names, *side_keys))

    def request(pad: bool, level: str) -> fx.Node:
        return _new_node(lw, "call_function", jagged.request_kjt, (u, i, keys, lw.user_index, pad, checked), level)

    if user is None or item is None:
        level = N if user is None else U
        return Rows(request(False, level), level, node)
    padded_users = [c for c in node.users if takes_padding(lw, c)]
    exact = None
    if any(c not in padded_users and c.meta[TAG_KEY].side != Side.CONST for c in node.users):
        exact = request(False, N)
    if padded_users or exact is None:
        padded = request(True, N)
        _state(lw).padded[node] = (padded, _new_node(lw, "call_function", jagged.num_users, (u, lw.user_index, _dense_user(lw)), C))
    return Rows(exact if exact is not None else padded, N, node)


def _dense_user(lw: LoweringContext) -> Optional[fx.Node]:
    """A user-side tensor input of the request (U rows), if there is one."""
    names = [s.name for s in lw.spec.inputs if s.side == Side.USER and s.kind == "tensor"]
    return next((n for n in lw.graph.nodes if n.op == "placeholder" and n.target in names), None)


# --------------------------------------------------------------------------- embedding modules
def lower_embedding(lw: LoweringContext, node: fx.Node, module: Any) -> Optional[Rows]:
    """Call the module once on the padded KJT; cut user-only results to their U rows."""
    src = lw.arg(node, 0, "features")
    pad = _state(lw).padded.get(src)
    if pad is None or not takes_padding(lw, node):
        return None
    padded, users = pad
    call = lw.graph.call_module(node.target, (padded,))
    lw.port_meta(node, call)
    call.meta[ROWS_KEY] = N
    side = node.meta[TAG_KEY].side
    if side == Side.USER:
        take = jagged.take_kt_rows if EMBEDDING_KINDS.first(type(module)) == POOLED else jagged.take_jt_dict_rows
        return Rows(_new_node(lw, "call_function", take, (call, users), U), U, node)
    if side == Side.MIXED:
        _state(lw).padded_out[node] = users
    return Rows(call, N, node)


# --------------------------------------------------------------------------- KeyedTensor accessors
def key_slices(lw: LoweringContext, kt: fx.Node, keys: List[str]) -> List[Tuple[str, int, Rows]]:
    """Column pieces ``(level, width, Rows)`` of ``keys`` of a lowered KeyedTensor, adjacent
    columns of one level merged: user keys of a padded result at rows ``[:U]``."""
    info: KeyedTensorInfo = kt.meta[VALUE_KEY]
    tag = kt.meta[TAG_KEY]
    value = lw.value(kt)
    state = _state(lw)
    users = state.padded_out.get(kt)
    runs: List[List[Any]] = []  # [level, lo, hi]
    for key in keys:
        lo, hi = info.span(key)
        side = tag.get(key).side if isinstance(tag, KeyedTag) else tag.side
        level = value.level if users is None else U if side == Side.USER else N
        if runs and runs[-1][0] == level and runs[-1][2] == lo:
            runs[-1][2] = hi
        else:
            runs.append([level, lo, hi])
    if value.node not in state.values:
        state.values[value.node] = _new_node(lw, "call_method", "values", (value.node,), value.level)
    values = state.values[value.node]
    out = []
    for level, lo, hi in runs:
        rows = slice(None, users) if users is not None and level == U else slice(None)
        if rows == slice(None) and lo == 0 and hi == info.shape[-1]:
            out.append((level, hi - lo, Rows(values, level)))
            continue
        if rows == slice(None):
            part = _new_node(lw, "call_function", operator.getitem, (values, (rows, slice(lo, hi))), level)
        else:  # the users' rows [:U]: a view whose contiguity torch.export would guard on (U == 1)
            head = _new_node(lw, "call_function", operator.getitem, (values, rows), level)
            part = _new_node(lw, "call_function", torch.narrow, (head, 1, lo, hi - lo), level)
        out.append((level, hi - lo, Rows(part, level)))
    return out


def _padded(lw: LoweringContext, base: Any) -> bool:
    return isinstance(base, fx.Node) and base in _state(lw).padded_out


@EXTENSION.lowering("values")
def _lower_values(lw: LoweringContext, node: fx.Node, _module: Any):
    base = node.args[0]
    if not _padded(lw, base):
        return None
    return lw.from_parts(key_slices(lw, base, list(base.meta[VALUE_KEY].keys)))


@EXTENSION.lowering("to_dict")
def _lower_to_dict(lw: LoweringContext, node: fx.Node, _module: Any):
    base = node.args[0]
    if not _padded(lw, base):
        return None
    keys = tuple(base.meta[VALUE_KEY].keys)
    return KeyedSeq(tuple(key_slices(lw, base, [k])[0][2] for k in keys), keys)


@EXTENSION.lowering(operator.getitem, priority=10)  # before the core's column pieces
def _lower_getitem(lw: LoweringContext, node: fx.Node, _module: Any):
    base, key = node.args
    if not isinstance(key, str):
        return None
    value = lw.value(base)
    if isinstance(value, KeyedSeq):
        return value.get(key)
    if not _padded(lw, base):
        return None
    if isinstance(base.meta[VALUE_KEY], KeyedTensorInfo):
        return key_slices(lw, base, [key])[0][2]
    # an EmbeddingCollection's dict of JaggedTensors: a user key's first U bags are its users'
    bag = _new_node(lw, "call_function", operator.getitem, (value.node, key), N)
    if base.meta[TAG_KEY].get(key).side != Side.USER:
        return Rows(bag, N, node)
    users = _state(lw).padded_out[base]
    return Rows(_new_node(lw, "call_function", jagged.take_jt_rows, (bag, users), U), U, node)


def _regroup_parts(lw: LoweringContext, keyed_tensors: List[fx.Node], group: List[str]):
    parts, run_src, run_keys = [], None, []
    for key in group + [None]:
        src = source_of(lambda kt: kt.meta[VALUE_KEY], keyed_tensors, key) if key is not None else None
        if run_keys and (src is not run_src or key is None):
            parts += key_slices(lw, run_src, run_keys)
            run_keys = []
        run_src = src
        if key is not None:
            run_keys.append(key)
    return lw.from_parts(parts)


@EXTENSION.lowering(*REGROUPS, KeyedTensor.regroup_as_dict)
def _lower_regroup(lw: LoweringContext, node: fx.Node, _module: Any):
    keyed_tensors, groups = lw.arg(node, 0, "keyed_tensors"), lw.arg(node, 1, "groups")
    if not isinstance(node.meta[TAG_KEY], KeyedTag if node.target is KeyedTensor.regroup_as_dict else SeqTag):
        return None  # the rule found no KeyedTensor layout: computed as in the pair model
    items = tuple(_regroup_parts(lw, list(keyed_tensors), list(g)) for g in groups)
    if node.target is KeyedTensor.regroup_as_dict:
        return KeyedSeq(items, tuple(lw.arg(node, 2, "keys")))
    return Seq(items)
