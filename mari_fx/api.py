"""The public pipeline: ``trace`` (capture, declare, run example, tag) and
``transform`` (trace, then lower, then optionally verify)."""
from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Type, Union

import torch
import torch.fx as fx
import torch.nn as nn

from .frontend.capture import capture, check_state, guard_state, private_state, state_versions
from .errors import DeclarationError
from .analysis.example_prop import ExampleProp
from .analysis.folds import index_masked_selects, index_row_picks, unfold_batch_folds
from .analysis.seq_first import batch_first_calls, sink_swaps
from .frontend.functionalize import functionalize
from .frontend.inputs import REQUEST_KEY, Selector, batch_ops, bind_example, flatten_inputs
from .lowering import LowerOptions, lower
from .analysis.propagate import propagate_tags
from .analysis.tags import TAG_KEY

from .meta import EXAMPLE_KEY, EXTENSIONS_KEY, RECORD_KEY
from .registry import Extension, extensions_of, use_extensions
log = logging.getLogger("mari_fx")


@contextlib.contextmanager
def quiet_capture():
    """Hold back torch's warnings and log output while a model is captured (dynamo and
    export print whole graphs when a route fails; mari_fx reports its own one-line
    reason).  They are shown when the ``mari_fx`` logger is at DEBUG level
    (``logging.getLogger("mari_fx").setLevel(logging.DEBUG)``; the CLI's ``--debug``):
    then nothing is held back."""
    if 0 < log.level <= logging.DEBUG:  # the logger's own level: a DEBUG root (e.g. pytest) does not count
        yield
        return
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            yield
    finally:
        logging.disable(previous)


def trace(
    model: nn.Module,
    user_inputs: Sequence[Union[str, Selector]],
    example_inputs: Sequence[Any] = (),
    example_kwargs: Optional[Mapping[str, Any]] = None,
    *,
    leaf_modules: Optional[Iterable[Type[nn.Module]]] = None,
    extensions: Sequence[Extension] = (),
) -> fx.GraphModule:
    """Capture ``model`` and tag every node USER / ITEM / MIXED / CONST, without rewriting.

    Args:
        model: the pair-shaped model (one row per (user, candidate) pair); not mutated.
        user_inputs: selectors of the user-side inputs (see :mod:`mari_fx.frontend.inputs`).
        example_inputs / example_kwargs: one pair-shaped batch (>= 2 rows) to read shapes from.
        leaf_modules: extra module classes to keep as calls instead of tracing through.
        extensions: :class:`~mari_fx.registry.Extension` objects (rules, lowerings, input
            kinds ...) active for this call and wherever the result is used.

    Returns:
        A GraphModule whose placeholders are the flat inputs, with ``node.meta["mari_fx.tag"]``
        on every node; ``mari_fx.transform`` accepts it as it is.

    Example:
        >>> import torch, mari_fx
        >>> from mari_fx.testing.examples import CoarseRanker
        >>> gm = mari_fx.trace(CoarseRanker().eval(), ["user"], (torch.randn(4, 16), torch.randn(4, 8)))
        >>> str(gm.get_submodule("fusion.0").__class__.__name__), str(next(
        ...     n for n in gm.graph.nodes if n.target == "fusion.0").args[0].meta["mari_fx.tag"])
        ('Linear', '[user:32, item:8]')
    """
    if isinstance(user_inputs, str):  # one selector given bare: "user" means ["user"], not ["u", "s", ...]
        user_inputs = [user_inputs]
    if isinstance(model, fx.GraphModule) and RECORD_KEY in getattr(model, "meta", {}):
        raise DeclarationError("this module is already transformed by mari_fx.transform (it takes requests, not "
                               "pair-shaped batches): transform the original pair-shaped model instead; "
                               "mari_fx.refresh(T, model) updates T's weights")
    check_inference_mode(model)
    with use_extensions(extensions):
        return _trace(model, user_inputs, example_inputs, example_kwargs, leaf_modules, tuple(extensions))


def _trace(model, user_inputs, example_inputs, example_kwargs, leaf_modules, extensions) -> fx.GraphModule:
    """:func:`trace` after its argument checks, with the extensions active."""
    with quiet_capture():
        gm = capture(model, leaf_modules, example_inputs, example_kwargs)
    gm.meta[EXTENSIONS_KEY] = extensions
    example = bind_example(gm, example_inputs, example_kwargs or {})
    spec, flat = flatten_inputs(gm, user_inputs, example)
    _check_pair_rows(flat)
    gm.meta[EXAMPLE_KEY] = flat
    # gm shares parameters and buffers with the caller's model: run on private clones of them
    with private_state(gm), guard_state(gm):
        state = state_versions(gm)
        gm = _functionalize_pass()(gm)
        with torch.no_grad():  # on clones: the example tensors are the caller's
            ExampleProp(gm).run(*[_clone(flat[n.target]) for n in gm.graph.nodes if n.op == "placeholder"])
            first = next(iter(flat.values()), None)
            for fold_pass in (sink_swaps, batch_first_calls, sink_swaps, index_masked_selects, index_row_picks,
                              unfold_batch_folds):
                if first is not None and fold_pass(gm, batch_ops(first).rows(first)):  # new shapes
                    # a batch-first twin is a new path to tensors the snapshot holds already
                    known = {v[0] for v in state.values()}
                    state.update((k, v) for k, v in state_versions(gm).items() if k not in state and v[0] in known)
                    ExampleProp(gm).run(*[_clone(flat[n.target]) for n in gm.graph.nodes if n.op == "placeholder"])
        check_state(gm, state, "running the model on the example")
    propagate_tags(gm, spec)
    return gm


def _functionalize_pass():
    # ``mari_fx.api.functionalize`` or ``mari_fx.frontend.functionalize.functionalize``, whichever was
    # replaced (tests swap the pass out to show what it protects against)
    from .frontend import functionalize as module

    return functionalize if functionalize is not _FUNCTIONALIZE else module.functionalize


_FUNCTIONALIZE = functionalize


def _clone(value: Any) -> Any:
    return fx.node.map_aggregate(value, lambda v: v.clone() if isinstance(v, torch.Tensor) else v)


def training_modules(model: nn.Module) -> List[Tuple[str, str]]:
    """``(path, class name)`` of the modules in training mode whose behaviour depends on it.

    A module depends on training mode when code of its class (other than ``nn.Module``'s own)
    reads ``.training``: Dropout, BatchNorm, RNNs and attention with dropout, and user modules
    that branch on ``self.training``.  Modules in training mode that never read the flag
    (Linear, ReLU, containers) are not listed: they compute the same either way.

    Example:
        >>> import torch.nn as nn
        >>> training_modules(nn.Sequential(nn.Linear(2, 2), nn.Dropout(), nn.BatchNorm1d(2)))
        [('1', 'Dropout'), ('2', 'BatchNorm1d')]
        >>> training_modules(nn.Sequential(nn.Linear(2, 2), nn.Dropout()).eval())
        []
    """
    return [(path, type(m).__name__) for path, m in model.named_modules()
            if m.training and _reads_training(type(m))]


def check_inference_mode(model: nn.Module) -> None:
    """Raise :class:`DeclarationError` naming the modules in training mode (see :func:`training_modules`)."""
    found = training_modules(model) if isinstance(model, nn.Module) else []
    if found:
        names = ", ".join(f"{path or '<root>'!r} ({cls})" for path, cls in found[:8])
        more = f" and {len(found) - 8} more" if len(found) > 8 else ""
        raise DeclarationError(
            f"modules in training mode: {names}{more}: call model.eval() first (mari_fx transforms "
            "inference forwards; in training mode they draw per-row randomness or use batch statistics)")


_READS_TRAINING: Dict[type, bool] = {}


def _reads_training(cls: type) -> bool:
    if cls not in _READS_TRAINING:
        def reads(code: Any) -> bool:
            return "training" in code.co_names or any(
                reads(c) for c in code.co_consts if hasattr(c, "co_names"))

        found = False
        for klass in cls.__mro__:
            if klass in (nn.Module, object):
                continue
            for name, fn in vars(klass).items():
                if name in ("train", "eval", "__init__", "extra_repr", "__setstate__", "__getstate__"):
                    continue
                code = getattr(getattr(fn, "__func__", fn), "__code__", None)
                if code is not None and reads(code):
                    found = True
        _READS_TRAINING[cls] = found
    return _READS_TRAINING[cls]


def _check_pair_rows(flat: Mapping[str, torch.Tensor]) -> None:
    rows = {name: batch_ops(t).rows(t) for name, t in flat.items()}
    n = next(iter(rows.values()), None)
    for name, r in rows.items():
        if r != n:
            jagged = any(isinstance(t, torch.Tensor) and t.dim() == 1 for t in (flat[name], next(iter(flat.values()))))
            raise DeclarationError(
                f"example input {name!r} has {r} rows but {next(iter(rows))!r} has {n}: pair-shaped "
                "examples have one row per (user, candidate) pair in every input"
                + ("; flat jagged ids + offsets (one bag per pair, for an EmbeddingBag) are declared together "
                   "as one bag input: mari_fx.Bag('ids', 'offsets') or 'bag(ids, offsets)'" if jagged else "")
            )
    if n is not None and n < 2:
        raise DeclarationError(
            f"the example batch has {n} row(s); give >= 2 pairs so the batch dimension can be told apart "
            "from feature dimensions of size 1"
        )


def is_tagged(gm: Any) -> bool:
    """True for a GraphModule produced by :func:`trace`."""
    return isinstance(gm, fx.GraphModule) and REQUEST_KEY in getattr(gm, "meta", {}) and all(
        TAG_KEY in n.meta for n in gm.graph.nodes if n.op != "output")


def transform(
    model: nn.Module,
    user_inputs: Optional[Sequence[Union[str, Selector]]] = None,
    example_inputs: Sequence[Any] = (),
    example_kwargs: Optional[Mapping[str, Any]] = None,
    *,
    split_matmuls: bool = True,
    reassociate: bool = False,
    cost_model: bool = True,
    check_requests: bool = True,
    verify: bool = False,
    leaf_modules: Optional[Iterable[Type[nn.Module]]] = None,
    extensions: Sequence[Extension] = (),
) -> fx.GraphModule:
    """Rewrite a pair-shaped model into a request-shaped one with the same outputs.

    Stages: capture -> declare inputs -> run example -> tag -> lower [-> verify].

    Args:
        model: an ``nn.Module``, a plain ``GraphModule`` (both need ``user_inputs`` and an
            example) or a GraphModule from :func:`trace` (taken as it is).
        user_inputs: selectors of the user-side inputs.
        example_inputs / example_kwargs: one pair-shaped batch (>= 2 rows).
        split_matmuls: False keeps only the hoisting of user-only subgraphs (the
            paper's "user-side one-shot" baseline).
        reassociate: also split a Linear over a sum or difference of user and item terms
            (``W(q - k) = Wq - Wk``, target attention). Off by default: its fp32 rounding scales
            with the terms, not with their difference, so it is not the model's round-off.
        cost_model: refuse a split that would cost more at N rows (gathers, extra kernels) than
            it saves (``mari_fx/lowering/cost.py``); False splits wherever it is exact.
        check_requests: validate ``user_index`` and row counts on every call.
        verify: run :func:`mari_fx.verify` on a random ragged request before returning.
        leaf_modules: extra module classes to keep as calls instead of tracing through.
        extensions: :class:`~mari_fx.registry.Extension` objects (rules, lowerings, input
            kinds ...) active for this call; ``T`` keeps them (``pairs_to_request``, ``verify``
            and ``export`` of ``T`` use them too).  See docs/architecture.md.

    Returns:
        ``T``, a GraphModule called as ``T(**request)``: user-side inputs at U rows,
        item-side inputs at N rows, and ``user_index`` ([N] int64).
        ``T.meta["mari_fx.record"]`` records what was split, hoisted and refused.

    Example:
        >>> import torch, mari_fx
        >>> from mari_fx.testing.examples import CoarseRanker
        >>> model = CoarseRanker().eval()
        >>> u, i, idx = torch.randn(2, 16), torch.randn(5, 8), torch.tensor([0, 0, 0, 1, 1])
        >>> T = mari_fx.transform(model, user_inputs=["user"], example_inputs=(u[idx], i))
        >>> torch.allclose(T(user=u, item=i, user_index=idx), model(u[idx], i), atol=1e-5)
        True
        >>> T.meta["mari_fx.record"].split_layers
        ('fusion.0',)
    """
    if isinstance(model, fx.GraphModule) and RECORD_KEY in getattr(model, "meta", {}):
        raise DeclarationError("this module is already transformed by mari_fx.transform (it takes requests, not "
                               "pair-shaped batches): transform the original pair-shaped model instead; "
                               "mari_fx.refresh(T, model) updates T's weights")
    extensions = tuple(dict.fromkeys(extensions_of(model) + tuple(extensions)))
    with use_extensions(extensions):
        return _transform(model, user_inputs, example_inputs, example_kwargs, split_matmuls, reassociate,
                          cost_model, check_requests, verify, leaf_modules, extensions)


def _transform(model, user_inputs, example_inputs, example_kwargs, split_matmuls, reassociate, cost_model,
               check_requests, verify, leaf_modules, extensions) -> fx.GraphModule:
    """:func:`transform` with the extensions active."""
    if is_tagged(model):
        if user_inputs is not None:
            raise DeclarationError("this GraphModule is already tagged by mari_fx.trace: call transform(gm) "
                                   "without user_inputs (declarations were fixed when it was traced)")
        tagged = model
    else:
        if user_inputs is None:
            raise DeclarationError("user_inputs is required unless model comes from mari_fx.trace")
        tagged = trace(model, user_inputs, example_inputs, example_kwargs, leaf_modules=leaf_modules,
                       extensions=extensions)
    T = lower(tagged, tagged.meta[REQUEST_KEY], LowerOptions(split_matmuls, check_requests, reassociate, cost_model))
    T.meta[EXAMPLE_KEY] = tagged.meta.get(EXAMPLE_KEY)
    T.meta[EXTENSIONS_KEY] = extensions
    if verify:
        from .report.verify import verify as _verify

        _verify(tagged if is_tagged(model) else model, T)
    return T


def refresh(T: fx.GraphModule, model: nn.Module) -> fx.GraphModule:
    """Update ``T``'s weights from the pair-shaped ``model`` it was made from, without re-tracing.

    ``T`` shares every parameter and buffer with ``model`` (docs/deploy.md); only the
    :class:`~mari_fx.SplitLinear` blocks are derived copies.  ``refresh`` re-derives
    each block from the columns of the model's current weight it came from (recorded
    at transform time), and copies into ``T`` any tensor the model has replaced
    (e.g. after ``load_state_dict(..., assign=True)``).  Returns ``T`` (updated in place).

    Example:
        >>> import torch, mari_fx
        >>> from mari_fx.testing.examples import CoarseRanker
        >>> model = CoarseRanker().eval()
        >>> T = mari_fx.transform(model, ["user"], (torch.randn(4, 16), torch.randn(4, 8)))
        >>> with torch.no_grad():
        ...     _ = model.fusion[0].weight.mul_(2)  # the model is retrained ...
        >>> T = mari_fx.refresh(T, model)           # ... and T follows
        >>> u, i, idx = torch.randn(2, 16), torch.randn(3, 8), torch.tensor([0, 1, 1])
        >>> torch.allclose(T(user=u, item=i, user_index=idx), model(u[idx], i), atol=1e-5)
        True
    """
    from .runtime.modules import SplitLinear

    if not (isinstance(T, fx.GraphModule) and REQUEST_KEY in getattr(T, "meta", {})):
        raise DeclarationError(f"refresh expects a module made by mari_fx.transform, got {type(T).__name__}")
    params = dict(model.named_parameters(remove_duplicate=False))
    params.update(model.named_buffers(remove_duplicate=False))
    model_modules = dict(model.named_modules(remove_duplicate=False))
    with torch.no_grad():
        for name, mod in T.named_modules(remove_duplicate=False):
            if isinstance(mod, SplitLinear):
                mod.refresh_from(params)
                continue
            if model_modules.get(name) is mod:
                continue  # the model's own module (shared), e.g. a TorchRec collection
            for attr, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
                src = params.get(f"{name}.{attr}" if name else attr)
                if src is None or src is t:
                    continue
                if src.shape != t.shape:
                    raise DeclarationError(f"the model's {name}.{attr} has shape {tuple(src.shape)}, T's "
                                           f"{tuple(t.shape)}: the model's architecture changed; re-transform it")
                t.copy_(src)
    return T
