"""mari_fx: lossless MaRI (matrix re-parameterized inference) for ranking models on torch.fx.

    T = mari_fx.transform(model, user_inputs=["user_dense", "x[user_id]", "X[:, 0:3]"],
                          example_inputs=pair_batch)
    T(**mari_fx.pairs_to_request(T, *pair_batch, user_index=idx)) == model(*pair_batch)
"""
from . import _aliases
from .api import is_tagged, refresh, trace, transform
from .errors import DeclarationError, MariError, RequestError, TraceError, VerificationError
from .report.flops import count_flops
from .frontend.inputs import Arg, Bag, Columns, Key, pairs_to_request, request_to_pairs
from .runtime.jagged import JaggedBag
from .runtime.modules import SplitLinear
from .deploy import PrecomputedModule, precompute_items
from .report.record import Record
from .analysis.tags import Side
from .report.verify import random_request, verify
from .deploy import export  # a function: mari_fx.export(T, request); mari_fx.export.load(path) ...

__all__ = [
    "Arg", "Bag", "Columns", "DeclarationError", "JaggedBag", "Key", "MariError", "PrecomputedModule", "Record",
    "RequestError", "Side",
    "SplitLinear", "TraceError", "VerificationError", "count_flops", "export", "is_tagged", "pairs_to_request",
    "precompute_items", "random_request", "refresh", "request_to_pairs", "trace", "transform", "verify",
]
__version__ = "0.1.0"
_aliases.install()  # the flat layout's module paths (mari_fx.analysis.rules ...) as aliases of the new ones
