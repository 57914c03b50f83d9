"""Tag rules for TorchRec values: KJTs into embedding modules, KeyedTensors and dicts out.

A keyed value (the request's KJT, a pooled ``KeyedTensor``, the dict of
``to_dict()``, an ``EmbeddingCollection``'s dict of ``JaggedTensor`` s) carries a
:class:`KeyedTag`: one tag per key, in the key order of the value that actually
ran.  Keys keep their side through the embedding lookup (a pooled bag depends on
its own row's ids only), and the per-key tags become column segments where the
dense part reads the keys as one tensor: ``values()``, ``KeyedTensor.regroup``
(traced as ``_regroup_keyed_tensors``) -- so a Linear over user and item keys
interleaved is split like a neat layout.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from torchrec.sparse import jagged_tensor as jt_mod
from torchrec.sparse.jagged_tensor import KeyedTensor

from mari_fx.analysis.rules import PRIORITY_BEFORE, RuleContext, unknown
from mari_fx.analysis.tags import CONST, Segment, SeqTag, Side, Tag, TensorTag, join_all

from . import jagged
from .extension import EXTENSION
from .summaries import JaggedTensorInfo, KeyedTensorInfo, KJTInfo

_KJT_OUTSIDE = "a KeyedJaggedTensor read outside an embedding module is computed at N rows"
POOLED, SEQUENCE = "pooled", "sequence"  # embedding module kinds: KeyedTensor out, or dict of JaggedTensor out


@dataclass(frozen=True)
class KeyedTag:
    """Tag of a keyed value: one tag per key, in the value's key order.

    Example:
        >>> t = KeyedTag(("u", "i"), (TensorTag.uniform(Side.USER, 4), TensorTag.uniform(Side.ITEM, 3)))
        >>> str(t), str(t.side), str(t.as_columns())
        ('{u: user, i: item}', 'mixed', '[user:4, item:3]')
    """

    keys: Tuple[str, ...]
    tags: Tuple[TensorTag, ...]

    def get(self, key: Any) -> Optional[TensorTag]:
        return dict(zip(self.keys, self.tags)).get(key)

    @property
    def side(self) -> Side:
        return join_all(t.side for t in self.tags)

    is_segmented = False  # as a whole, a keyed value is one (non-tensor) value ...
    has_user_columns = False
    width = None

    @property
    def segments(self) -> Tuple[Segment, ...]:
        return (Segment(self.side, None),)  # ... its columns are per key (as_columns)

    def as_columns(self) -> TensorTag:
        """The tag of the keys' values side by side (a KeyedTensor's ``values()``)."""
        return TensorTag.of_segments(Segment(t.side, t.width) for t in self.tags)

    def __str__(self) -> str:
        return "{" + ", ".join(f"{k}: {t}" for k, t in zip(self.keys, self.tags)) + "}"


def key_tag(ctx: RuleContext, node: Any, key: str) -> TensorTag:
    """The tag of ``key`` of a keyed node (its side for all keys when it has no KeyedTag)."""
    tag = ctx.tag(node)
    if isinstance(tag, KeyedTag):
        return tag.get(key) or TensorTag.uniform(Side.MIXED)
    return TensorTag.uniform(tag.side)


# --------------------------------------------------------------------------- the request's KJT
@EXTENSION.rule(jagged.pair_kjt)
def _pair_kjt(ctx: RuleContext) -> Tag:
    tags: Dict[str, TensorTag] = {}
    for part in ctx.args[:2]:
        if part is not None:
            for k in ctx.value(part).keys:
                tags[k] = TensorTag.uniform(ctx.side(part))
    keys = tuple(ctx.arg(2))
    return KeyedTag(keys, tuple(tags[k] for k in keys))


# --------------------------------------------------------------------------- embedding modules
def embedding_rule(ctx: RuleContext) -> Tag:
    """An embedding collection: each output key has the side of its input feature."""
    features = ctx.arg(0, "features")
    out = ctx.out
    if isinstance(out, KeyedTensorInfo):
        return KeyedTag(out.keys, tuple(TensorTag.uniform(key_tag(ctx, features, k).side, w)
                                        for k, w in zip(out.keys, out.length_per_key)))
    if hasattr(out, "keys") and all(isinstance(v, JaggedTensorInfo) for v in out.values()):
        keys = tuple(out.keys())
        return KeyedTag(keys, tuple(TensorTag.uniform(key_tag(ctx, features, k).side) for k in keys))
    return ctx.refuse("an embedding module whose output is neither a KeyedTensor nor a dict of JaggedTensors")


# --------------------------------------------------------------------------- KeyedTensor / dict accessors
@EXTENSION.rule("values", priority=PRIORITY_BEFORE)
def _values(ctx: RuleContext) -> Optional[Tag]:
    base = ctx.arg(0)
    if isinstance(ctx.value(base), KeyedTensorInfo):
        tag = ctx.tag(base)
        if isinstance(tag, KeyedTag):
            return tag.as_columns()
        return ctx.result(tag.side)
    if isinstance(ctx.value(base), (KJTInfo, JaggedTensorInfo)):
        return ctx.refuse("values() of a jagged tensor: its rows are ids, not samples")
    return None


@EXTENSION.rule("to_dict", priority=PRIORITY_BEFORE)
def _to_dict(ctx: RuleContext) -> Optional[Tag]:
    base = ctx.arg(0)
    info = ctx.value(base)
    if isinstance(info, KeyedTensorInfo):
        return KeyedTag(info.keys, tuple(TensorTag.uniform(key_tag(ctx, base, k).side, w)
                                         for k, w in zip(info.keys, info.length_per_key)))
    if isinstance(info, KJTInfo):
        return ctx.refuse(_KJT_OUTSIDE)
    return None


@EXTENSION.rule(operator.getitem, priority=PRIORITY_BEFORE)
def _getitem(ctx: RuleContext) -> Optional[Tag]:
    base, key = ctx.arg(0), ctx.arg(1)
    tag = ctx.tag(base)
    if isinstance(ctx.value(base), KJTInfo):
        return ctx.refuse(_KJT_OUTSIDE)
    if isinstance(tag, KeyedTag) and isinstance(key, str):
        return tag.get(key) or ctx.refuse(f"key {key!r} is not among {list(tag.keys)}")
    return None


@EXTENSION.rule("keys", "length_per_key", "offset_per_key", "key_dim", jt_mod._all_keys_used_once, priority=PRIORITY_BEFORE)
def _key_structure(ctx: RuleContext) -> Optional[Tag]:
    """Key names and widths: the same for every request."""
    if any(isinstance(ctx.value(n), (KeyedTensorInfo, KJTInfo)) or isinstance(ctx.tag(n), KeyedTag)
           for n in ctx.inputs()):
        return CONST
    return None


def _group_tags(ctx: RuleContext, keyed_tensors: List[Any], groups: List[List[str]]) -> Optional[List[TensorTag]]:
    tags = []
    for group in groups:
        segments = []
        for key in group:
            src = source_of(ctx.value, keyed_tensors, key)
            if src is None:
                return None
            lo, hi = ctx.value(src).span(key)
            segments.append(Segment(key_tag(ctx, src, key).side, hi - lo))
        tags.append(TensorTag.of_segments(segments))
    return tags


def source_of(value_of: Any, keyed_tensors: List[Any], key: str) -> Any:
    """The last of ``keyed_tensors`` holding ``key`` (the one ``KeyedTensor.regroup`` reads), or None."""
    return next((kt for kt in reversed(keyed_tensors) if key in value_of(kt).keys), None)


def _all_keyed(ctx: RuleContext, keyed_tensors: Any) -> bool:
    return isinstance(keyed_tensors, (list, tuple)) and all(
        isinstance(ctx.value(kt), KeyedTensorInfo) for kt in keyed_tensors)


REGROUPS = (jt_mod._regroup_keyed_tensors, jt_mod._fbgemm_permute_pooled_embs, KeyedTensor.regroup)


@EXTENSION.rule(*REGROUPS)
def _regroup(ctx: RuleContext) -> Tag:
    keyed_tensors, groups = ctx.arg(0, "keyed_tensors"), ctx.arg(1, "groups")
    tags = _group_tags(ctx, keyed_tensors, groups) if _all_keyed(ctx, keyed_tensors) else None
    return unknown(ctx) if tags is None else SeqTag(tuple(tags))


@EXTENSION.rule(KeyedTensor.regroup_as_dict)
def _regroup_as_dict(ctx: RuleContext) -> Tag:
    keyed_tensors, groups, keys = ctx.arg(0, "keyed_tensors"), ctx.arg(1, "groups"), ctx.arg(2, "keys")
    tags = _group_tags(ctx, keyed_tensors, groups) if _all_keyed(ctx, keyed_tensors) else None
    return unknown(ctx) if tags is None else KeyedTag(tuple(keys), tuple(tags))


# --------------------------------------------------------------------------- JaggedTensor (sequence embeddings)
@EXTENSION.rule("to_padded_dense", priority=PRIORITY_BEFORE)
def _to_padded_dense(ctx: RuleContext) -> Optional[Tag]:
    """``jt.to_padded_dense(L)``: one [L, D] block per bag, so row b depends on bag b only."""
    if isinstance(ctx.value(ctx.arg(0)), JaggedTensorInfo):
        return ctx.rowwise()
    return None
