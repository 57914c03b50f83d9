"""Which TorchRec modules mari_fx treats as embedding collections, and the one-time
registration of everything this package teaches mari_fx."""
from __future__ import annotations

import types
from typing import Type

import torch
import torch.nn as nn
from torchrec.distributed.embedding import ShardedEmbeddingCollection
from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection
from torchrec.distributed.fp_embeddingbag import ShardedFeatureProcessedEmbeddingBagCollection
from torchrec.distributed.quant_embedding import ShardedQuantEmbeddingCollection
from torchrec.distributed.quant_embeddingbag import ShardedQuantEmbeddingBagCollection
from torchrec.distributed.types import ShardedModule
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.modules.fp_embedding_modules import FeatureProcessedEmbeddingBagCollection
from torchrec.quant import embedding_modules as quant
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mari_fx.analysis.example_prop import TensorInfo
from mari_fx.registry import CATALOG_KINDS, install

from . import catalog, inputs, jagged, lowering, summaries, trace
from .extension import EXTENSION
from .rules import POOLED, SEQUENCE, embedding_rule

DEFAULT_EMBEDDING_MODULES = {
    EmbeddingBagCollection: POOLED,
    EmbeddingCollection: SEQUENCE,
    FeatureProcessedEmbeddingBagCollection: POOLED,
    quant.EmbeddingBagCollection: POOLED,
    quant.FeatureProcessedEmbeddingBagCollection: POOLED,
    quant.EmbeddingCollection: SEQUENCE,
    ShardedEmbeddingBagCollection: POOLED,
    ShardedFeatureProcessedEmbeddingBagCollection: POOLED,
    ShardedEmbeddingCollection: SEQUENCE,
    ShardedQuantEmbeddingBagCollection: POOLED,
    ShardedQuantEmbeddingCollection: SEQUENCE,
}


def register_embedding_module(cls: Type[nn.Module], kind: str = POOLED) -> None:
    """Treat ``cls`` as an embedding collection: ``forward(features: KeyedJaggedTensor)``
    returning a ``KeyedTensor`` (``kind="pooled"``) or a dict of ``JaggedTensor``
    (``kind="sequence"``) with one entry per feature key, each row depending on its own
    row's bags only.  It is traced as one call, shared (not copied) by transformed
    modules, and called once per request on the padded KJT.

    Example:
        >>> import torchrec_integration as tri
        >>> class MyEBC(EmbeddingBagCollection): ...
        >>> tri.register_embedding_module(MyEBC)
        >>> tri.lowering.EMBEDDING_KINDS[MyEBC]
        'pooled'
        >>> tri.EXTENSION.table("rules")[MyEBC] is tri.rules.embedding_rule
        True
    """
    if kind not in (POOLED, SEQUENCE):
        raise ValueError(f"kind must be {POOLED!r} or {SEQUENCE!r}, got {kind!r}")
    if cls in lowering.EMBEDDING_KINDS.keys():
        return
    lowering.EMBEDDING_KINDS.add(cls, kind)
    EXTENSION.leaf_module(cls, share=True)
    EXTENSION.rule(cls)(embedding_rule)
    EXTENSION.lowering(cls)(lowering.lower_embedding)


def _gathered(info) -> bool:
    keyed = (summaries.KJTInfo, summaries.KeyedTensorInfo, summaries.JaggedTensorInfo)
    if isinstance(info, types.MappingProxyType):
        return bool(info) and all(isinstance(v, keyed) or hasattr(v, "shape") for v in info.values())
    return isinstance(info, keyed)


def _mapping_of(info, info_type) -> bool:
    """A dict summary whose values are all ``info_type`` summaries (None: all tensors)."""
    if not isinstance(info, types.MappingProxyType) or not info:
        return False
    if info_type is None:
        return all(isinstance(v, TensorInfo) for v in info.values())
    return all(isinstance(v, info_type) for v in info.values())


def register_all() -> None:
    """Fill :data:`EXTENSION` (once) and install it: what ``import torchrec_integration`` does."""
    if not EXTENSION.table("leaf_modules").keys():
        _fill()
    install(EXTENSION)
    # a .pt2 program stores its example inputs (KJTs): let torch.export.load read them with
    # weights_only=True instead of falling back to an unsafe load (with a warning)
    torch.serialization.add_safe_globals([KeyedJaggedTensor])


def _fill() -> None:
    """Every entry of :data:`EXTENSION`."""
    summaries.register()
    inputs.register()
    for cls, kind in DEFAULT_EMBEDDING_MODULES.items():
        register_embedding_module(cls, kind)
    EXTENSION.leaf_module(ShardedModule, share=True)  # any other sharded module: one call, never copied
    EXTENSION.row_gather(_gathered, jagged.select_rows)
    # typed gathers where the summary tells the type: these TorchScript compiles
    for info_type, gather in ((summaries.KJTInfo, jagged.kjt_select_rows),
                              (summaries.KeyedTensorInfo, jagged.kt_select_rows),
                              (summaries.JaggedTensorInfo, jagged.jt_select_rows)):
        EXTENSION.row_gather(lambda info, t=info_type: isinstance(info, t), gather)
    EXTENSION.row_gather(lambda info: _mapping_of(info, summaries.JaggedTensorInfo), jagged.jt_dict_select_rows)
    EXTENSION.row_gather(lambda info: _mapping_of(info, None), jagged.tensor_dict_select_rows)
    EXTENSION.capture_hook(trace.capture_hook)  # mari_fx.transform(dmp, ...)
    EXTENSION.add(CATALOG_KINDS, inputs.KIND, catalog.CATALOG)  # precompute_items(T, {"features_item": kjt})
