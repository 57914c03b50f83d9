"""Model factories: how the ``mari-fx`` command line gets a model and a pair-shaped example.

The convention
--------------
A TARGET is ``package.module:function`` (or ``path/to/file.py:function``), or a
``.pt2`` file (see :func:`load_exported_program`); the function is called with
no arguments and returns one of

* ``(model, example_args)``
* ``(model, example_args, example_kwargs)``

where ``model`` is the pair-shaped ``nn.Module`` in the mode you serve it in
(usually ``.eval()``), ``example_args`` is a tuple (or list) of positional
forward arguments and ``example_kwargs`` a dict of keyword arguments, together
one pair-shaped batch with >= 2 rows -- exactly what ``mari_fx.transform``
takes as ``example_inputs`` / ``example_kwargs``.  ``function`` may be a dotted
path inside the module (``module:Class.make``).

The built-in factories below cover the example rankers of :mod:`mari_fx.testing.examples`;
their weights are seeded, so every call returns the same model.

* ``mari_fx.testing.factories:coarse_ranker`` -- ``--user user``
* ``mari_fx.testing.factories:interleaved_ranker`` -- ``--user user``
* ``mari_fx.testing.factories:demo_ranker`` -- ``--user user`` (the sizes of ``make demo``)
* ``mari_fx.testing.factories:dict_ranker`` -- ``--user 'x[user_id]' 'x[user_age]' 'x[hist_item_ids]'``
* ``mari_fx.testing.factories:packed_ranker`` -- ``--user 'X[:, 0:3]' 'X[:, 5:9]'``
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Any, Callable, Dict, Mapping, Tuple

import torch
import torch.nn as nn

from ..errors import MariError
from .examples import CoarseRanker, DictRanker, PackedRanker

Factory = Callable[[], Tuple[Any, ...]]


class TargetError(MariError, ValueError):
    """A TARGET could not be loaded, or its factory broke the convention."""


def _seeded(build: Callable[[], Tuple[Any, ...]], seed: int = 0) -> Tuple[Any, ...]:
    # fork_rng: the factories must not disturb the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def coarse_ranker() -> Tuple[nn.Module, Tuple[torch.Tensor, torch.Tensor]]:
    """:class:`~mari_fx.testing.examples.CoarseRanker` (neat layout) and a 4-pair example; ``--user user``.

    Example:
        >>> model, (user, item) = coarse_ranker()
        >>> model(user, item).shape
        torch.Size([4])
    """
    return _seeded(lambda: (CoarseRanker().eval(), (torch.randn(4, 16), torch.randn(4, 8))))


def interleaved_ranker() -> Tuple[nn.Module, Tuple[torch.Tensor, torch.Tensor]]:
    """:class:`~mari_fx.testing.examples.CoarseRanker` with the fragmented (interleaved) fusion layout; ``--user user``.

    Example:
        >>> model, example = interleaved_ranker()
        >>> model.layout
        'interleaved'
    """
    return _seeded(lambda: (CoarseRanker(layout="interleaved").eval(), (torch.randn(4, 16), torch.randn(4, 8))))


def demo_ranker() -> Tuple[nn.Module, Tuple[torch.Tensor, torch.Tensor]]:
    """The coarse ranker at the sizes of ``make demo`` (user 256 -> tower 512, 256; fusion 256, 128); ``--user user``.

    Example:
        >>> model, (user, item) = demo_ranker()
        >>> user.shape, item.shape
        (torch.Size([4, 256]), torch.Size([4, 64]))
    """
    from .demo import FUSION, ITEM_DIM, TOWER, USER_DIM

    return _seeded(lambda: (CoarseRanker(USER_DIM, ITEM_DIM, TOWER, FUSION).eval(),
                            (torch.randn(4, USER_DIM), torch.randn(4, ITEM_DIM))))


def dict_ranker() -> Tuple[nn.Module, Tuple[Dict[str, torch.Tensor]]]:
    """:class:`~mari_fx.testing.examples.DictRanker` (dict input ``x``) and a 6-pair example.

    ``--user 'x[user_id]' 'x[user_age]' 'x[hist_item_ids]'``.

    Example:
        >>> model, (x,) = dict_ranker()
        >>> sorted(x)
        ['hist_item_ids', 'item_id', 'item_price', 'user_age', 'user_id']
    """
    return _seeded(lambda: (DictRanker().eval(), (DictRanker.example_batch(6),)))


def packed_ranker() -> Tuple[nn.Module, Tuple[torch.Tensor]]:
    """:class:`~mari_fx.testing.examples.PackedRanker` (one packed tensor ``X``, 12 columns) and a 4-pair example.

    ``--user 'X[:, 0:3]' 'X[:, 5:9]'``.

    Example:
        >>> model, (X,) = packed_ranker()
        >>> model.user_selectors()
        ['X[:, 0:3]', 'X[:, 5:9]']
    """
    return _seeded(lambda: (PackedRanker().eval(), (torch.randn(4, 12),)))


def load(target: str) -> Tuple[nn.Module, Tuple[Any, ...], Dict[str, Any]]:
    """Import ``package.module:function`` (or ``file.py:function``), call it, check the result.

    Returns ``(model, example_args, example_kwargs)``.  Raises :class:`TargetError`
    with a one-line reason when the target cannot be imported or returns
    something else than the convention above.

    Example:
        >>> model, args, kwargs = load("mari_fx.testing.factories:coarse_ranker")
        >>> type(model).__name__, len(args), kwargs
        ('CoarseRanker', 2, {})
    """
    if target.endswith(".pt2") and ":" not in os.path.basename(target):
        return load_exported_program(target)
    where, sep, name = target.rpartition(":")
    if not sep or not where or not name:
        raise TargetError(f"TARGET {target!r} must be 'package.module:function' (or 'path/to/file.py:function')")
    module = _import(where)
    fn: Any = module
    for part in name.split("."):
        if not hasattr(fn, part):
            raise TargetError(f"{where!r} has no attribute {name!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise TargetError(f"{target!r} is a {type(fn).__name__}, not a function")
    try:
        result = fn()
    except MariError:
        raise
    except Exception as e:
        raise TargetError(f"factory {target!r} raised {type(e).__name__}: {_first_line(e)}") from e
    return _check_result(target, result)


def load_exported_program(path: str) -> Tuple[nn.Module, Tuple[Any, ...], Dict[str, Any]]:
    """A saved pair-shaped ``ExportedProgram`` (``torch.export.save``) as ``(model, example_args, example_kwargs)``.

    The program must have been saved with its example inputs (the default) and
    exported with dim 0 (the pair batch) of every input dynamic: it is
    re-captured through :func:`mari_fx.frontend.capture.capture_with_export`, which makes
    that dim dynamic again and gives the graph one placeholder per forward
    argument.  The model is that GraphModule: the same ATen graph as the program.

    Example:
        >>> import io, torch
        >>> from torch.export import Dim
        >>> from mari_fx.testing.examples import CoarseRanker
        >>> batch = Dim("batch", min=2)
        >>> ep = torch.export.export(CoarseRanker().eval(), (torch.randn(4, 16), torch.randn(4, 8)),
        ...                          dynamic_shapes=({0: batch}, {0: batch}))
        >>> import tempfile, os; path = os.path.join(tempfile.mkdtemp(), "ranker.pt2")
        >>> torch.export.save(ep, path)
        >>> model, args, kwargs = load_exported_program(path)
        >>> [n.target for n in model.graph.nodes if n.op == "placeholder"], args[0].shape
        (['user', 'item'], torch.Size([4, 16]))
        >>> model(torch.randn(7, 16), torch.randn(7, 8)).shape  # any batch size
        torch.Size([7])
    """
    from ..frontend.capture import capture_with_export

    if not os.path.isfile(path):
        raise TargetError(f"no such file {path!r}")
    try:
        ep = torch.export.load(path)
    except Exception as e:
        raise TargetError(f"cannot load {path!r} as an ExportedProgram: {type(e).__name__}: {_first_line(e)}") from e
    if ep.example_inputs is None:
        raise TargetError(f"{path!r} was saved without example inputs; export it again with torch.export.export "
                          "(which keeps them) or pass a factory 'package.module:function'")
    args, kwargs = ep.example_inputs
    try:
        model = capture_with_export(ep.module(), tuple(args), dict(kwargs))
    except Exception as e:
        raise TargetError(
            f"cannot re-capture {path!r} with a dynamic batch dimension ({type(e).__name__}: {_first_line(e)}); "
            "export the pair-shaped model with dim 0 of every input dynamic, e.g. "
            "dynamic_shapes=({0: Dim('batch', min=2)}, ...), or pass a factory") from e
    return model, tuple(args), dict(kwargs)


def _import(where: str) -> Any:
    if where.endswith(".py") or os.sep in where:
        path = os.path.abspath(where)
        if not os.path.isfile(path):
            raise TargetError(f"no such file {where!r}")
        name = "_mari_fx_target_" + os.path.splitext(os.path.basename(path))[0]
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses / pickling look modules up by name
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[name]
            raise TargetError(f"importing {where!r} raised {type(e).__name__}: {_first_line(e)}") from e
        return module
    try:
        return importlib.import_module(where)
    except Exception as e:  # ImportError, or anything the module raises at import time
        raise TargetError(f"cannot import {where!r}: {type(e).__name__}: {_first_line(e)}") from e


def _check_result(target: str, result: Any) -> Tuple[nn.Module, Tuple[Any, ...], Dict[str, Any]]:
    want = "(model, example_args) or (model, example_args, example_kwargs)"
    if not isinstance(result, (tuple, list)) or len(result) not in (2, 3):
        raise TargetError(f"factory {target!r} returned {type(result).__name__}; it must return {want}")
    model, args = result[0], result[1]
    kwargs = result[2] if len(result) == 3 else {}
    if not isinstance(model, nn.Module):
        raise TargetError(f"factory {target!r} returned a {type(model).__name__} as the model; expected an nn.Module")
    if not isinstance(args, (tuple, list)):
        raise TargetError(f"factory {target!r}: example_args is a {type(args).__name__}; expected a tuple of "
                          "forward arguments, e.g. (user, item) or (batch,)")
    if not isinstance(kwargs, Mapping):
        raise TargetError(f"factory {target!r}: example_kwargs is a {type(kwargs).__name__}; expected a dict")
    return model, tuple(args), dict(kwargs)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
