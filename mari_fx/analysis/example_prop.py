"""Analysis pass: run the pair-shaped graph once on an example and record a summary
of every node's value in ``node.meta["mari_fx.value"]`` (shapes, not data).

The tag rules need shapes (to normalise ``dim=-1``, to know column widths and to
check that a reshape keeps the batch dimension); they never need tensor data.
"""
from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any, Callable, List, Tuple

import torch
import torch.fx as fx

from .. import registry
from ..errors import MariError, TraceError

from ..meta import VALUE_KEY  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class TensorInfo:
    shape: Tuple[int, ...]
    dtype: torch.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)


@dataclass(frozen=True)
class Opaque:
    """A value of a type the rules do not look into (e.g. a KeyedTensor)."""

    type_name: str


_SUMMARIES = registry.SUMMARIES


def register_summary(predicate: Callable[[Any], bool], summary: Callable[[Any], Any], priority: int = 0) -> None:
    """Summarize values matching ``predicate`` with ``summary(value)`` (an immutable, data-free
    object the rules can read, e.g. a KeyedTensor's keys and widths) instead of :class:`Opaque`."""
    _SUMMARIES.add(predicate, summary, priority=priority)


def summarize(value: Any) -> Any:
    """Immutable, data-free summary of an example value."""
    if isinstance(value, torch.Tensor):
        return TensorInfo(tuple(value.shape), value.dtype)
    if isinstance(value, torch.Size):
        return value
    if isinstance(value, (int, float, bool, str, type(None), torch.dtype, torch.device)):
        return value
    if isinstance(value, (tuple, list)):
        return tuple(summarize(v) for v in value)
    if isinstance(value, dict):
        return types.MappingProxyType({k: summarize(v) for k, v in value.items()})
    for summary in _SUMMARIES.matching(value):
        return summary(value)
    return Opaque(type(value).__name__)


class ExampleProp(fx.Interpreter):
    """Runs ``gm`` on example inputs, writing :data:`VALUE_KEY` on every node.

    Example:
        >>> import torch, torch.fx as fx
        >>> gm = fx.symbolic_trace(torch.nn.Linear(3, 2))
        >>> _ = ExampleProp(gm).run(torch.ones(4, 3))
        >>> [n.meta[VALUE_KEY].shape for n in gm.graph.nodes if n.op != "output"]  # x, weight, bias, out
        [(4, 3), (2, 3), (2,), (4, 2)]
    """

    def run_node(self, n: fx.Node) -> Any:
        inputs: List[torch.Tensor] = []
        fx.node.map_aggregate(self.fetch_args_kwargs_from_env(n) if n.op != "placeholder" else (),
                              lambda v: inputs.append(v) if isinstance(v, torch.Tensor) else None)
        versions = [t._version for t in inputs]
        try:
            result = super().run_node(n)
        except MariError as e:  # e.g. guard_state refusing a write into a buffer: keep its type
            raise type(e)(f"{e} (at node {n.name}: {n.format_node()})") from e
        except Exception as e:
            raise TraceError(
                f"running the model on the example inputs failed at node {n.format_node()}: "
                f"{type(e).__name__}: {e}"
            ) from e
        if any(t._version != v for t, v in zip(inputs, versions)):
            # mari_fx.frontend.functionalize rewrote every mutation it knows; this op hides one (e.g. a leaf
            # module or wrapped function that writes into its input)
            raise TraceError(
                f"{n.format_node()} changed one of its input tensors in place while running the example: "
                "mari_fx needs pure ops (a mutation would run on copies after the rewrite); write it out of place")
        n.meta[VALUE_KEY] = summarize(result)
        return result
