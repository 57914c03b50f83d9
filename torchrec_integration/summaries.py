"""Data-free summaries of TorchRec values for ``node.meta["mari_fx.value"]``.

:class:`mari_fx.analysis.example_prop.ExampleProp` records one per node; the rules read key
order and widths from them, i.e. from the module that actually ran on the example
(a sharded EmbeddingBagCollection orders its KeyedTensor keys by sharding type, not
by table config).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
from torchrec.distributed.types import LazyAwaitable
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from mari_fx.analysis.example_prop import summarize

from .extension import EXTENSION


@dataclass(frozen=True)
class KJTInfo:
    """A KeyedJaggedTensor: its keys (in order) and batch size."""

    keys: Tuple[str, ...]
    stride: int
    weighted: bool


@dataclass(frozen=True)
class KeyedTensorInfo:
    """A KeyedTensor: keys and their widths in ``values()`` column order, and the values' shape."""

    keys: Tuple[str, ...]
    length_per_key: Tuple[int, ...]
    shape: Tuple[int, ...]
    dtype: torch.dtype

    def span(self, key: str) -> Tuple[int, int]:
        """Columns ``[start, stop)`` of ``key`` in ``values()``."""
        pos = 0
        for k, w in zip(self.keys, self.length_per_key):
            if k == key:
                return pos, pos + w
            pos += w
        raise KeyError(key)


@dataclass(frozen=True)
class JaggedTensorInfo:
    """A JaggedTensor: its number of bags (rows) and the shape of its values."""

    rows: int
    values_shape: Tuple[int, ...]
    weighted: bool


def _kjt(v: KeyedJaggedTensor) -> KJTInfo:
    return KJTInfo(tuple(v.keys()), v.stride(), v.weights_or_none() is not None)


def _kt(v: KeyedTensor) -> KeyedTensorInfo:
    return KeyedTensorInfo(tuple(v.keys()), tuple(v.length_per_key()), tuple(v.values().shape), v.values().dtype)


def _jt(v: JaggedTensor) -> JaggedTensorInfo:
    return JaggedTensorInfo(v.lengths().numel(), tuple(v.values().shape), v.weights_or_none() is not None)


def register() -> None:
    EXTENSION.summary(lambda v: isinstance(v, KeyedJaggedTensor), _kjt)
    EXTENSION.summary(lambda v: isinstance(v, KeyedTensor), _kt)
    EXTENSION.summary(lambda v: isinstance(v, JaggedTensor), _jt)
    # a sharded module returns a LazyAwaitable: summarize what it resolves to
    EXTENSION.summary(lambda v: isinstance(v, LazyAwaitable), lambda v: summarize(LazyAwaitable._wait_async(v)))
