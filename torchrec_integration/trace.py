"""Tracing TorchRec models with their embedding collections kept as single calls."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch.fx as fx
import torch.nn as nn
import torchrec.fx
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.types import ShardedModule

from .lowering import EMBEDDING_KINDS


def symbolic_trace(model: nn.Module, concrete_args: Optional[Dict[str, Any]] = None) -> fx.GraphModule:
    """``torchrec.fx.symbolic_trace`` with every embedding collection (and sharded module) of
    ``model`` as a leaf; a ``DistributedModelParallel`` is traced through its ``.module``.

    (``torchrec.fx.symbolic_trace`` alone inlines an unsharded EmbeddingBagCollection into
    per-table ``nn.EmbeddingBag`` calls, which mari_fx keeps at N rows.)

    Example:
        >>> from torchrec_integration.examples import TorchRecRanker
        >>> gm = symbolic_trace(TorchRecRanker())
        >>> [n.target for n in gm.graph.nodes if n.op == "call_module"][:1]
        ['ebc']
    """
    if isinstance(model, DistributedModelParallel):
        model = model.module
    leaves = tuple(EMBEDDING_KINDS.keys()) + (ShardedModule,)
    names = sorted({type(m).__name__ for m in model.modules() if isinstance(m, leaves)})
    return torchrec.fx.symbolic_trace(model, concrete_args=concrete_args, leaf_modules=names)


def capture_hook(model: nn.Module) -> Optional[nn.Module]:
    """What :func:`mari_fx.frontend.capture.capture` traces for a ``DistributedModelParallel``: the
    GraphModule :func:`symbolic_trace` makes of it, which calls the sharded modules of
    ``dmp.module`` themselves (shared, never copied).  Installed by ``import torchrec_integration``,
    so ``mari_fx.transform(dmp, ...)`` takes the model users hold."""
    return symbolic_trace(model) if isinstance(model, DistributedModelParallel) else None
