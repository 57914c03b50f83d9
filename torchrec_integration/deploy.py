"""Serving transformed TorchRec models: TorchScript and ``torch.export``.

TorchScript: ``torch.jit.script(T)`` works as it is for models whose embedding collections
TorchScript compiles (``EmbeddingBagCollection``, ``EmbeddingCollection``).  A quantized collection
(``torchrec.inference.modules.quantize_inference_model``) does not script as a module -- TorchRec
itself only scripts it after ``torchrec.fx.symbolic_trace`` has inlined its forward -- so
:func:`script` does the same to ``T``: it retraces ``T`` with TorchRec's tracer (the functions
``T`` calls stay calls; the collections' forwards are inlined) and scripts the result.

torch.export: see docs/torchrec.md ("Serving").
"""
from __future__ import annotations

import types
import warnings
from typing import List, Set

import torch
import torch.fx as fx
import torchrec.fx

from mari_fx.errors import DeclarationError

from .lowering import EMBEDDING_KINDS


class _Retracer(torchrec.fx.Tracer):
    """TorchRec's tracer, keeping the Python functions a transformed graph calls as calls."""

    def __init__(self, keep: List[object], leaves: Set[str]):
        fx.Tracer.__init__(self, autowrap_functions=tuple(keep))
        self._leaf_modules = []
        self.leaves = leaves

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.leaves or super().is_leaf_module(m, module_qualified_name)


def inline_collections(T: fx.GraphModule) -> fx.GraphModule:
    """``T`` retraced by TorchRec's tracer: the embedding collections' forwards inlined (their
    tables and buffers shared with ``T``, not copied), every function ``T`` calls kept as one call.
    The result computes what ``T`` does and keeps ``T.meta``.

    Example:
        >>> import mari_fx, torch
        >>> from torchrec.inference.modules import quantize_inference_model
        >>> from torchrec_integration.examples import RankerBatch, TorchRecRanker, USER_KEYS
        >>> model = quantize_inference_model(TorchRecRanker().eval())
        >>> T = mari_fx.transform(model, ["user_dense"] + [f"features[{k}]" for k in USER_KEYS],
        ...                       RankerBatch.random(2, 4, seed=1).pairs())
        >>> G = inline_collections(T)
        >>> "ebc" in [n.target for n in T.graph.nodes], "ebc" in [n.target for n in G.graph.nodes]
        (True, False)
    """
    if not (isinstance(T, fx.GraphModule) and "mari_fx.request" in getattr(T, "meta", {})):
        raise DeclarationError(f"expected a module made by mari_fx.transform, got {type(T).__name__}")
    keep = [n.target for n in T.graph.nodes
            if n.op == "call_function" and isinstance(n.target, types.FunctionType)
            and not n.target.__module__.startswith(("torch.", "_operator"))]
    modules = dict(T.named_modules())
    leaves = {n.target for n in T.graph.nodes
              if n.op == "call_module" and EMBEDDING_KINDS.first(type(modules[n.target])) is None}
    tracer = _Retracer(keep, leaves)
    graph = tracer.trace(T)
    G = fx.GraphModule(tracer.root, graph, T.__class__.__name__)
    G.meta.update(T.meta)
    return G


def script(T: fx.GraphModule) -> torch.jit.ScriptModule:
    """TorchScript of a transformed TorchRec model, quantized collections included
    (``torch.jit.script(inline_collections(T))``); save it with ``torch.jit.save``.

    Example:
        >>> import io, mari_fx, torch
        >>> from torchrec.inference.modules import quantize_inference_model
        >>> from torchrec_integration.examples import RankerBatch, TorchRecRanker, USER_KEYS
        >>> model = quantize_inference_model(TorchRecRanker().eval())
        >>> T = mari_fx.transform(model, ["user_dense"] + [f"features[{k}]" for k in USER_KEYS],
        ...                       RankerBatch.random(2, 4, seed=1).pairs())
        >>> buf = io.BytesIO(); torch.jit.save(script(T), buf); _ = buf.seek(0)
        >>> batch = RankerBatch.random(users=1, candidates=3)
        >>> request = mari_fx.pairs_to_request(T, *batch.pairs(), user_index=batch.user_index)
        >>> torch.equal(torch.jit.load(buf)(**request), T(**request))
        True
    """
    G = inline_collections(T)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The TorchScript type system doesn't support instance-level")
        return torch.jit.script(G)

