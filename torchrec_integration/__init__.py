"""mari_fx for TorchRec models: KJT inputs, embedding collections, KeyedTensors.

Importing this package teaches mari_fx TorchRec's types; then the usual calls work::

    import mari_fx, torchrec_integration
    T = mari_fx.transform(model, user_inputs=["user_dense", "features[user_id]", "features[user_hist]"],
                          example_inputs=(dense, kjt))          # pair-shaped, >= 2 rows
    request = mari_fx.pairs_to_request(T, dense, kjt, user_index=idx)
    T(**request)  # features_user: KJT of U rows, features_item: KJT of N rows

Importing installs :data:`EXTENSION` (a :class:`mari_fx.registry.Extension`) for every
call; ``mari_fx.transform(..., extensions=[torchrec_integration.EXTENSION])`` names it
explicitly (see docs/architecture.md).

Embedding collections (unsharded, quantized, or sharded by DistributedModelParallel)
stay single calls; the user keys of the request's KJT are looked up once per user
(see :mod:`torchrec_integration.lowering` and docs/torchrec.md).
"""
from .extension import EXTENSION
from .inputs import KJTInputSpec, KJTKeys
from .jagged import kjt_select_rows, select_rows
from .registry import DEFAULT_EMBEDDING_MODULES, register_all, register_embedding_module
from .rules import KeyedTag
from .trace import symbolic_trace

register_all()  # installs EXTENSION: the usual calls then know TorchRec's types (docs/torchrec.md)

from . import deploy  # noqa: E402  (tri.deploy.script: TorchScript with quantized collections)

__all__ = [
    "DEFAULT_EMBEDDING_MODULES", "EXTENSION", "KJTInputSpec", "KJTKeys", "KeyedTag", "kjt_select_rows",
    "register_embedding_module", "select_rows", "symbolic_trace",
]
