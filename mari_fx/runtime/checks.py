"""Functions that transformed graphs call at run time (TorchScript-compatible).

:func:`check_request` validates a request before the model runs.  Shape, ndim and
dtype checks read tensor metadata only.  The one value check (``user_index`` in
``0 .. U-1`` with ``max + 1 == U``) reads no Python number per call in eager mode:
it is a tensor-side assert (``torch._assert_async``), and only when it fails are the
offending values read to write the precise message.  On CPU the assert raises at
once; on CUDA it is a device-side assert (asynchronous, see docs/deploy.md).
"""
import functools
import json
from typing import Any, Callable, List, Optional

import torch

from .. import registry
from ..errors import RequestError


def _dtype_name(dtype: torch.dtype) -> str:
    # str(dtype) is a number under TorchScript; name the common ones in both modes
    names = ["float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool"]
    dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
              torch.int8, torch.uint8, torch.bool]
    for k in range(len(dtypes)):
        if dtype == dtypes[k]:
            return "torch." + names[k]
    return str(dtype)


def _shape_text(side_dim: str, shape: List[int]) -> str:
    return "[" + ", ".join([side_dim] + [str(d) for d in shape]) + "]"


def _given_shape(x: torch.Tensor) -> str:
    return "[" + ", ".join([str(d) for d in x.shape]) + "]"


def _check_input(x: torch.Tensor, side: str, name: str, shape: Optional[List[int]],
                 dtype: Optional[torch.dtype]) -> None:
    """Metadata checks of one request tensor (no data is read)."""
    rows = "U" if side == "user" else "N"
    if not torch.jit.is_scripting():
        if not isinstance(x, torch.Tensor):
            want = "a tensor" if shape is None else "a tensor of shape " + _shape_text(rows, shape[1:])
            raise RequestError(side + " input '" + name + "' must be " + want + ", got "
                               + ("None" if x is None else type(x).__name__))
    if shape is not None:  # the example's shape, -1 for the row dim (never an empty list: TorchScript)
        ok = x.dim() == len(shape)
        if ok:
            for d in range(1, len(shape)):
                if x.size(d) != shape[d]:
                    ok = False
        if not ok:
            msg = side + " input '" + name + "' has shape " + _given_shape(x) + ", expected " + _shape_text(rows, shape[1:])
            if dtype is not None:
                msg += " (dtype " + _dtype_name(dtype).replace("torch.", "") + ")"
            raise RequestError(msg)
    elif x.dim() < 1:
        raise RequestError(side + " input '" + name + "' is a 0-d tensor; it needs one row per "
                           + ("user" if side == "user" else "candidate"))
    if dtype is not None:
        if x.dtype != dtype:
            raise RequestError(side + " input '" + name + "' has dtype " + _dtype_name(x.dtype) + ", expected " + _dtype_name(dtype))


def _rows_message(name: str, rows: int, hi: int) -> str:
    return ("user input '" + name + "' has " + str(rows) + " rows but user_index refers to "
            + str(hi + 1) + " users (0.." + str(hi) + "): pass one row per user (U rows); "
            "mari_fx.pairs_to_request builds a request from pair-shaped inputs")


def _check_values_scripted(user_index: torch.Tensor, users: int, name: str) -> None:
    # TorchScript drops a bare _assert_async (no outputs), so it reads the bounds (in C++).
    lo = int(user_index.min())
    hi = int(user_index.max())
    if lo < 0:
        raise RequestError("user_index has a negative value " + str(lo))
    if users != hi + 1:
        raise RequestError(_rows_message(name, users, hi))


@torch.jit.unused
def _check_values_eager(user_index: torch.Tensor, users: int, name: str) -> None:
    lo, hi = torch.aminmax(user_index)
    if user_index.is_cpu:
        # On CPU reading the bounds is no device sync and the cheapest check (2 us vs 5 us
        # for the assert below at N = 10, see docs/deploy.md), and the message is exact.
        lo_i, hi_i = int(lo), int(hi)
        if lo_i < 0:
            raise RequestError("user_index has a negative value " + str(lo_i))
        if hi_i + 1 != users:
            raise RequestError(_rows_message(name, users, hi_i))
        return
    # On an accelerator no Python number is read: one tensor-side assert (on CUDA a
    # device-side assert, reported asynchronously).
    torch._assert_async((lo >= 0) & (hi == users - 1),
                        "mari_fx.errors.RequestError: user_index must lie in 0..U-1 and max(user_index) + 1 "
                        "must equal the rows of user input '" + name + "' (one row per user)")


@torch.jit.unused
def _request_ok(user_index: torch.Tensor, user_inputs: List[torch.Tensor], item_inputs: List[torch.Tensor],
                user_shapes: Optional[List[List[int]]], item_shapes: Optional[List[List[int]]],
                user_dtypes: Optional[List[torch.dtype]], item_dtypes: Optional[List[torch.dtype]]) -> bool:
    """True if the eager request passes every check of :func:`check_request`; False when any
    may fail (then the full checks run and raise the precise message).  The same facts in
    fewer Python steps: it runs on every call, where the full checks cost 20 us at N = 10."""
    try:
        if user_index.dtype is not torch.int64 or user_index.dim() != 1 or not user_inputs:
            return False
        n = user_index.shape[0]
        u = user_inputs[0].shape[0]
        if n == 0:
            return False
        for inputs, shapes, dtypes, rows in ((item_inputs, item_shapes, item_dtypes, n),
                                             (user_inputs, user_shapes, user_dtypes, u)):
            for k, x in enumerate(inputs):
                size = x.shape
                if size[0] != rows or (dtypes is not None and x.dtype is not dtypes[k]):
                    return False
                if shapes is not None:
                    if len(size) != len(shapes[k]) or list(size[1:]) != shapes[k][1:]:
                        return False
        lo, hi = torch.aminmax(user_index)
        # CPU: reading the bounds is no device sync; elsewhere the full check asserts on the device
        return user_index.is_cpu and int(lo) >= 0 and int(hi) + 1 == u
    except (AttributeError, IndexError, TypeError):  # not a tensor, a 0-d tensor ...
        return False


def check_request(
    user_index: torch.Tensor,
    user_inputs: List[torch.Tensor],
    item_inputs: List[torch.Tensor],
    user_names: List[str],
    item_names: List[str],
    user_shapes: Optional[List[List[int]]] = None,
    item_shapes: Optional[List[List[int]]] = None,
    user_dtypes: Optional[List[torch.dtype]] = None,
    item_dtypes: Optional[List[torch.dtype]] = None,
) -> None:
    """Raise :class:`RequestError` unless the inputs form a request of U users and N candidates.

    ``user_index`` must be int64 of shape [N] with ``max + 1 == U`` and no negative
    value; every user input has U rows and every item input N rows.  With
    ``*_shapes`` / ``*_dtypes`` (per input: the example's shape with -1 for the row
    dim, and its dtype) each input's ndim, per-sample shape and dtype are checked too.  For N = 0
    the user inputs need only agree with each other on U (the output is empty).
    Example:

        >>> import torch
        >>> check_request(torch.tensor([0, 0, 1]), [torch.ones(2, 4)], [torch.ones(3, 5)], ["u"], ["i"])
        >>> check_request(torch.tensor([0, 0, 1]), [torch.ones(3, 4)], [torch.ones(3, 5)], ["u"], ["i"])
        Traceback (most recent call last):
        ...
        mari_fx.errors.RequestError: user input 'u' has 3 rows but user_index refers to 2 users (0..1): pass one row per user (U rows); mari_fx.pairs_to_request builds a request from pair-shaped inputs
        >>> check_request(torch.tensor([0, 0, 1]), [torch.ones(2, 4)], [torch.ones(3, 7)], ["u"], ["i"],
        ...               [[-1, 4]], [[-1, 5]], [torch.float32], [torch.float32])
        Traceback (most recent call last):
        ...
        mari_fx.errors.RequestError: item input 'i' has shape [3, 7], expected [N, 5] (dtype float32)
    """
    if not torch.jit.is_scripting():
        if isinstance(user_index, torch.fx.Proxy):
            # T's code is being re-traced (unpickling a GraphModule): record the call, do not run it
            user_index.tracer.create_proxy("call_function", check_request, (
                user_index, user_inputs, item_inputs, user_names, item_names, user_shapes, item_shapes,
                user_dtypes, item_dtypes), {})
            return
        if not torch.compiler.is_compiling() and _request_ok(
                user_index, user_inputs, item_inputs, user_shapes, item_shapes, user_dtypes, item_dtypes):
            return
        # the request is bad (or empty): the checks below name the culprit
        if not isinstance(user_index, torch.Tensor):
            raise RequestError("user_index must be a tensor ([N] int64: the user of each candidate), got "
                               + ("None" if user_index is None else type(user_index).__name__))
    if user_index.dtype != torch.int64:
        raise RequestError("user_index must have dtype torch.int64, got " + _dtype_name(user_index.dtype))
    if user_index.dim() != 1:
        raise RequestError("user_index must be 1-d ([N]), got " + str(user_index.dim()) + " dims")
    n = user_index.size(0)
    for k in range(len(item_inputs)):
        _check_input(item_inputs[k], "item", item_names[k], None if item_shapes is None else item_shapes[k],
                     None if item_dtypes is None else item_dtypes[k])
        if item_inputs[k].size(0) != n:
            raise RequestError(
                "item input '" + item_names[k] + "' has " + str(item_inputs[k].size(0))
                + " rows but user_index has " + str(n) + " entries (one per candidate)"
            )
    for k in range(len(user_inputs)):
        _check_input(user_inputs[k], "user", user_names[k], None if user_shapes is None else user_shapes[k],
                     None if user_dtypes is None else user_dtypes[k])
        if user_inputs[k].size(0) != user_inputs[0].size(0):
            raise RequestError(
                "user input '" + user_names[k] + "' has " + str(user_inputs[k].size(0)) + " rows but user input '"
                + user_names[0] + "' has " + str(user_inputs[0].size(0)) + ": every user input has one row per user"
            )
    if n == 0 or len(user_inputs) == 0:
        return  # an empty request has no user_index value to check; its output is empty
    if torch.jit.is_scripting():
        _check_values_scripted(user_index, user_inputs[0].size(0), user_names[0])
    elif torch.compiler.is_compiling():
        # shapes were checked above (dynamo guards on them); the value check is one opaque
        # operator call: no graph break, and the eager messages at run time
        torch.ops.mari_fx.check_request.default(user_index, list(user_inputs), list(item_inputs), _spec_text(
            user_names, item_names, user_shapes, item_shapes, user_dtypes, item_dtypes))
    else:
        _check_values_eager(user_index, user_inputs[0].size(0), user_names[0])


@torch._dynamo.assume_constant_result  # built while compiling, a constant of the graph
def _spec_text(user_names, item_names, user_shapes, item_shapes, user_dtypes, item_dtypes) -> str:
    def dt(ds):
        return None if ds is None else [str(d).replace("torch.", "") for d in ds]
    return json.dumps({"user_names": list(user_names), "item_names": list(item_names), "user_shapes": user_shapes,
                       "item_shapes": item_shapes, "user_dtypes": dt(user_dtypes), "item_dtypes": dt(item_dtypes)})


def check_request_op(user_index: torch.Tensor, user_inputs: List[torch.Tensor], item_inputs: List[torch.Tensor],
                     spec: str) -> None:
    """:func:`mari_fx.runtime.check_request` as an operator, so exported programs keep the
    eager check and its messages (``RequestError`` naming the input).  ``spec`` is JSON:
    input names, per-sample shapes and dtypes.  Programs that use it need ``import mari_fx``
    before they are loaded (the operator is registered on import).

    Example:
        >>> import torch
        >>> spec = _spec_text(["u"], ["i"], [[-1, 4]], [[-1, 5]], [torch.float32], [torch.float32])
        >>> torch.ops.mari_fx.check_request(torch.tensor([0, 1]), [torch.ones(2, 4)], [torch.ones(2, 5).double()], spec)
        Traceback (most recent call last):
        ...
        mari_fx.errors.RequestError: item input 'i' has dtype torch.float64, expected torch.float32
    """
    check_request(user_index, user_inputs, item_inputs, *_parse_spec(spec))


@functools.lru_cache(maxsize=64)
def _parse_spec(spec: str) -> tuple:
    """The arguments of :func:`check_request` from a spec text (parsed once per spec: the
    operator runs on every call of a compiled or exported module)."""
    s = json.loads(spec)

    def dt(ds):
        return None if ds is None else [getattr(torch, d) for d in ds]

    return (s["user_names"], s["item_names"], s["user_shapes"], s["item_shapes"], dt(s["user_dtypes"]),
            dt(s["item_dtypes"]))


# A plain operator (schema + one kernel for every backend), not torch.library.custom_op: the
# latter's Python wrappers (autograd, alias checks) cost 14 us a call, this one about 6 us, and the
# operator runs on every call of a compiled or exported module.
_LIB = torch.library.Library("mari_fx", "FRAGMENT")
_LIB.define("check_request(Tensor user_index, Tensor[] user_inputs, Tensor[] item_inputs, str spec) -> ()")
_LIB.impl("check_request", check_request_op, "CompositeExplicitAutograd")


@torch.library.register_fake("mari_fx::check_request", lib=_LIB)
def _(user_index, user_inputs, item_inputs, spec) -> None:
    return None


torch.fx.node.has_side_effect(torch.ops.mari_fx.check_request.default)  # returns nothing: keep it in graphs


GRAPH_FUNCTIONS = registry.GRAPH_FUNCTIONS  # extension functions transformed graphs call (global)


def graph_function(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark ``fn`` as a function transformed graphs call, so it survives re-tracing: unpickling
    a GraphModule (``pickle``, ``torch.load``) traces its code again with :class:`Retracer`, and a
    function with Python control flow on its inputs would fail on the proxies; a marked one stays a
    call.  ``fn`` itself is returned unchanged (TorchScript compiles it as it is).

    Example:
        >>> @graph_function
        ... def first_rows(x, n):
        ...     return x[:n] if x.size(0) > n else x
        >>> class M(torch.nn.Module):
        ...     def forward(self, x):
        ...         return first_rows(x, 2)
        >>> [n.op for n in Retracer().trace(M()).nodes]
        ['placeholder', 'call_function', 'output']
    """
    GRAPH_FUNCTIONS.add(fn, fn, override=True)
    return fn


class Retracer(torch.fx.Tracer):
    """The tracer torch re-traces a pickled transformed module's code with (``T._tracer_cls``):
    the run-time functions of :data:`GRAPH_FUNCTIONS` stay calls instead of being traced through."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("autowrap_functions", tuple(GRAPH_FUNCTIONS.keys()))
        super().__init__(*args, **kwargs)


def check_inference(training: bool) -> None:
    """Raise :class:`RequestError` when a transformed module is called in training mode.

    A transformed module computes user-only work once per user; in training mode Dropout
    would draw one mask per user instead of one per pair and BatchNorm would mix rows, so
    ``T.train()`` is refused at the first call.  Example:

        >>> check_inference(False)
        >>> check_inference(True)
        Traceback (most recent call last):
        ...
        mari_fx.errors.RequestError: this module was made by mari_fx.transform for inference and is in training mode: call .eval() on it (train the pair-shaped model, then transform it again)
    """
    if training:
        raise RequestError("this module was made by mari_fx.transform for inference and is in training mode: "
                           "call .eval() on it (train the pair-shaped model, then transform it again)")
