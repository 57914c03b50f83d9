"""Deploying a transformed module: ``torch.export``, TorchScript and ``torch.compile``.

``mari_fx.export(T, example_request)`` returns a ``torch.export.ExportedProgram``
whose user-side inputs have a dynamic row count U and whose item-side inputs and
``user_index`` share a dynamic row count N (both ``>= 1``).  See docs/deploy.md.

Why :func:`traceable` exists: a transformed module ``T`` starts with
:func:`mari_fx.runtime.check_request`, which reads ``int(user_index.max())``.
That is a data-dependent Python integer: ``torch.export`` turns it into an
unbacked symbol whose relation to U (``u0 + 1 == U`` with ``U >= 2`` assumed
while tracing) becomes a runtime assertion that rejects U = 1; ``torch.compile``
breaks the graph there.  :func:`traceable` swaps that call for
:func:`assert_request`, which checks the same facts with tensor ops
(``torch._assert_async``) that trace into the program without specialising
any size -- or drops the check (``check_requests=False``).

``mari_fx.export`` is :func:`export`; the other public functions of this module are
also its attributes (``mari_fx.export.load``, ``mari_fx.export.traceable``,
``mari_fx.export.dynamic_shapes`` ...), as they were when ``mari_fx.export`` was this module.
"""
from __future__ import annotations

import json
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch
import torch.fx as fx

from .. import registry
from ..registry import with_extensions_of_arguments
from ..errors import DeclarationError, MariError, RequestError
from ..frontend.inputs import USER_INDEX, InputSpec, _request_spec, batch_ops
from ..runtime.checks import _spec_text, check_request, check_request_op  # noqa: F401
from ..analysis.tags import Side

__all__ = ["ExportError", "ServedProgram", "assert_request", "dynamic_shapes", "export", "load", "script",
           "traceable", "widen_request"]

# Row-carrying input kinds whose dim 0 is U (user side) or N (item side).  Other
# kinds (e.g. jagged values whose length is a sum of lengths) get Dim.AUTO.
_ROW_KINDS = ("tensor", "dict", "packed")

# Input kinds an extension adds (e.g. "kjt"): kind -> fn(spec, rows, example value) giving the
# ``dynamic_shapes`` entry of such an input whose batch is ``rows`` (a Dim: U or N).
DYNAMIC_KINDS = registry.DYNAMIC_KINDS


def register_dynamic_kind(kind: str, shapes: Callable[[InputSpec, Any, Any], Any]) -> None:
    """Teach :func:`dynamic_shapes` (and :func:`widen_request`) an input kind an extension adds:
    ``shapes(spec, rows, example)`` returns the ``dynamic_shapes`` entry of an input of that kind
    (matching its pytree structure), its batch being ``rows``; ``example`` is its value in the
    transform's example (None if unknown).  Such inputs are widened with the kind's registered
    batch operations (:func:`mari_fx.frontend.inputs.register_batch_type`)."""
    DYNAMIC_KINDS.add(kind, shapes, override=True)  # re-registering a kind replaces it


def assert_request(user_index: torch.Tensor, user_inputs: List[torch.Tensor], item_inputs: List[torch.Tensor]) -> None:
    """The checks of :func:`mari_fx.runtime.check_request` as traceable tensor ops.

    ``user_index`` values must be >= 0 and ``max + 1`` must equal the row count of
    every user input; every item input has ``len(user_index)`` rows.  A failed
    check raises ``RuntimeError`` (``torch._assert_async``; on CUDA it is a
    device-side assert, reported asynchronously).  No Python int is read from a
    tensor, so export and compile keep U and N dynamic down to 1.

    Example:
        >>> import torch
        >>> assert_request(torch.tensor([0, 1, 1]), [torch.ones(2, 4)], [torch.ones(3, 5)])
        >>> assert_request(torch.tensor([0, 1, 1]), [torch.ones(3, 4)], [torch.ones(3, 5)])
        Traceback (most recent call last):
        ...
        RuntimeError: mari_fx request check: every user input needs user_index.max() + 1 rows (one per user)
    """
    n = user_index.size(0)
    for x in item_inputs:
        torch._check(x.size(0) == n, lambda: "mari_fx request check: every item input needs len(user_index) rows")
    if n == 0:  # min/max of an empty tensor raise; an empty request has nothing to check
        return
    torch._assert_async(user_index.min() >= 0, "mari_fx request check: user_index has a negative value")
    users = user_index.max() + 1
    for x in user_inputs:
        torch._assert_async(users == x.size(0),
                            "mari_fx request check: every user input needs user_index.max() + 1 rows (one per user)")


def _check_is_transformed(T: Any) -> None:
    if not (isinstance(T, fx.GraphModule) and "mari_fx.request" in getattr(T, "meta", {})):
        raise DeclarationError(
            f"expected a module made by mari_fx.transform, got {type(T).__name__}: transform the model first")


def traceable(T: fx.GraphModule, check_requests: bool = True) -> fx.GraphModule:
    """``T`` with its request check made traceable (or removed); weights are shared, not copied.

    Use it for ``torch.export`` (:func:`export` calls it) and for
    ``torch.compile(..., fullgraph=True)``.  ``T`` itself is left as it is.

    Args:
        T: a module from :func:`mari_fx.transform`.
        check_requests: True replaces ``check_request`` by :func:`assert_request`;
            False drops it (a module transformed with ``check_requests=False`` has none).

    Example:
        >>> import torch, mari_fx
        >>> from mari_fx.testing.examples import CoarseRanker
        >>> T = mari_fx.transform(CoarseRanker().eval(), ["user"], (torch.randn(4, 16), torch.randn(4, 8)))
        >>> G = traceable(T)
        >>> "mari_fx.check_request" in G.code and "mari_fx_runtime_check_request(" not in G.code
        True
        >>> req = mari_fx.random_request(T, 2, 5)
        >>> torch.equal(G(**req), T(**req))
        True
    """
    _check_is_transformed(T)
    graph = fx.Graph()
    env: Dict[fx.Node, fx.Node] = {}
    for node in T.graph.nodes:
        if node.op == "call_function" and node.target is check_request:
            if check_requests:
                user_index, users, items = (fx.node.map_arg(a, env.__getitem__) for a in node.args[:3])
                rest = list(node.args[3:]) + [None] * (9 - len(node.args))
                env[node] = graph.call_function(torch.ops.mari_fx.check_request.default,
                                                (user_index, users, items, _spec_text(*rest)))
            continue
        env[node] = graph.node_copy(node, env.__getitem__)
    # GraphModule(root, graph) references T's submodules and parameters (no copy).
    out = fx.GraphModule(T, graph, class_name="MariModule")
    out.meta.update(T.meta)
    return out


def dynamic_shapes(T: fx.GraphModule, users: Any = None, candidates: Any = None) -> Dict[str, Dict[int, Any]]:
    """The ``dynamic_shapes`` argument for ``torch.export`` of a request-shaped module.

    Dim 0 of every user-side input is ``users`` (default ``Dim("users", min=1)``), dim 0
    of every item-side input and of ``user_index`` is ``candidates`` (default
    ``Dim("candidates", min=1)``); every other dim is static.  Inputs of kinds that
    extensions add get what they registered (:func:`register_dynamic_kind`).  (Not
    ``Dim("N")``: torch.export reads dim names as sympy symbols, and ``N`` is sympy's
    numeric-evaluation function, which breaks derived dims such as a KJT's ``K * N`` lengths.)

    Example:
        >>> import torch, mari_fx
        >>> from mari_fx.testing.examples import CoarseRanker
        >>> T = mari_fx.transform(CoarseRanker().eval(), ["user"], (torch.randn(4, 16), torch.randn(4, 8)))
        >>> {k: {d: dim.__name__ for d, dim in v.items()} for k, v in dynamic_shapes(T).items()}
        {'user': {0: 'users'}, 'item': {0: 'candidates'}, 'user_index': {0: 'candidates'}}
    """
    from torch.export import Dim

    users = Dim("users", min=1) if users is None else users
    candidates = Dim("candidates", min=1) if candidates is None else candidates
    spec = _request_spec(T)
    example = T.meta.get("mari_fx.example") or {}
    shapes: Dict[str, Dict[int, Any]] = {}
    for s in spec.inputs:
        if s.kind in DYNAMIC_KINDS:
            shapes[s.name] = DYNAMIC_KINDS.first(s.kind)(s, users if s.side == Side.USER else candidates, example.get(s.name))
        elif s.kind not in _ROW_KINDS:
            shapes[s.name] = {0: Dim.AUTO}
        else:
            shapes[s.name] = {0: users if s.side == Side.USER else candidates}
    shapes[USER_INDEX] = {0: candidates}
    return shapes


def widen_request(T: fx.GraphModule, request: Mapping[str, torch.Tensor], min_users: int = 2) -> Dict[str, torch.Tensor]:
    """A request with >= ``min_users`` users and more candidates than users, made of ``request``'s rows.

    ``torch.export`` specialises a dimension whose example size is 0 or 1, so an
    example request for :func:`export` needs U >= 2 and N >= 2; N > U is asked
    for too, as in real requests, so the example records no accidental U == N.
    Rows are reused cyclically, so ids stay in range; a request that already
    fits is returned as it is.

    Example:
        >>> import torch, mari_fx
        >>> from mari_fx.testing.examples import CoarseRanker
        >>> T = mari_fx.transform(CoarseRanker().eval(), ["user"], (torch.randn(4, 16), torch.randn(4, 8)))
        >>> wide = widen_request(T, mari_fx.random_request(T, 1, 1))
        >>> wide["user"].shape[0], wide["item"].shape[0], wide["user_index"].tolist()
        (2, 3, [0, 1, 0])
    """
    spec = _request_spec(T)
    idx = request[USER_INDEX]
    users = next((batch_ops(request[s.name]).rows(request[s.name]) for s in spec.inputs if s.side == Side.USER), None)
    n = idx.shape[0]
    if users is None:
        users = int(idx.max()) + 1 if n else 0
    if users >= min_users and n > users:
        return dict(request)
    if users == 0 or n == 0:
        raise RequestError("the example request is empty: give at least one user and one candidate")
    new_u = max(users, min_users)
    new_n = max(n, new_u + 1)
    out: Dict[str, torch.Tensor] = {}
    for s in spec.inputs:
        value = request[s.name]
        if s.kind not in _ROW_KINDS and s.kind not in DYNAMIC_KINDS:
            raise RequestError(f"cannot widen input {s.name!r} of kind {s.kind!r}: give an example request "
                               "with >= 2 users and more candidates than users")
        rows = new_u if s.side == Side.USER else new_n
        ops = batch_ops(value)
        out[s.name] = ops.take(value, torch.arange(rows) % ops.rows(value))
    out[USER_INDEX] = torch.arange(new_n, dtype=torch.int64) % new_u
    return out


@with_extensions_of_arguments
def export(T: fx.GraphModule, example_request: Optional[Mapping[str, torch.Tensor]] = None, *,
           check_requests: bool = True, dynamic: Optional[Dict[str, Dict[int, Any]]] = None,
           strict: bool = False) -> "torch.export.ExportedProgram":
    """``torch.export`` a transformed module with dynamic U (users) and N (candidates).

    The program takes the same keyword inputs as ``T`` (``T(**request)``) and is
    valid for every U >= 1 and N >= 1, U = 1 and N = 1 included: the example is
    widened (:func:`widen_request`) so no dimension is specialised, and the request
    check is the traceable :func:`assert_request` (``check_requests=False``
    drops it).  Save and load with ``torch.export.save`` / ``torch.export.load``.

    Args:
        T: a module from :func:`mari_fx.transform`.
        example_request: a request for ``T`` (default: ``mari_fx.random_request(T, 2, 5)``).
        check_requests: keep the request check in the program (as ``RuntimeError`` asserts).
        dynamic: ``dynamic_shapes`` for ``torch.export`` (default :func:`dynamic_shapes`).
        strict: passed to ``torch.export.export``.

    Example:
        >>> import io, torch, mari_fx
        >>> from mari_fx.testing.examples import CoarseRanker
        >>> model = CoarseRanker().eval()
        >>> T = mari_fx.transform(model, ["user"], (torch.randn(4, 16), torch.randn(4, 8)))
        >>> ep = mari_fx.export(T, mari_fx.random_request(T, 3, 7))
        >>> buf = io.BytesIO(); torch.export.save(ep, buf); _ = buf.seek(0)
        >>> loaded = torch.export.load(buf).module()
        >>> u, i, idx = torch.randn(1, 16), torch.randn(1, 8), torch.tensor([0])
        >>> torch.allclose(loaded(user=u, item=i, user_index=idx), model(u[idx], i), atol=1e-6)
        True
    """
    from ..report.verify import random_request

    _check_is_transformed(T)
    request = random_request(T, 2, 5) if example_request is None else widen_request(T, example_request)
    G = traceable(T, check_requests)
    shapes = dynamic_shapes(T) if dynamic is None else dynamic
    try:
        return torch.export.export(G, (), dict(request), dynamic_shapes=shapes, strict=strict)
    except MariError:
        raise
    except Exception as e:  # torch.export raises many types; all mean "this graph did not export"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"torch.export failed on the transformed module: {type(e).__name__}: {first}") from e


class ServedProgram(torch.nn.Module):
    """An exported program that validates each request as eager ``T`` does before running.

    ``torch.export``'s own input guards run before any operator of the program, so on a
    bad shape they raise ``AssertionError: Guard failed: ...`` (or ``IndexError`` for a
    wrong ndim) before the program's ``mari_fx::check_request`` can; this wrapper runs the
    same check first, so every bad request gets the eager ``RequestError``.
    """

    def __init__(self, program: "torch.export.ExportedProgram"):
        super().__init__()
        node = next((n for n in program.graph.nodes if n.target is torch.ops.mari_fx.check_request.default), None)
        if node is None:
            raise DeclarationError("this exported program has no mari_fx request check (exported with "
                                   "check_requests=False?): use torch.export.load(...).module() directly")
        s = json.loads(node.args[3])
        self.program = program.module()
        self.spec = (s["user_names"], s["item_names"], s["user_shapes"], s["item_shapes"],
                     None if s["user_dtypes"] is None else [getattr(torch, d) for d in s["user_dtypes"]],
                     None if s["item_dtypes"] is None else [getattr(torch, d) for d in s["item_dtypes"]])

    def forward(self, **request: Any) -> Any:
        users, items = self.spec[0], self.spec[1]
        missing = [k for k in users + items + [USER_INDEX] if k not in request]
        if missing:
            raise RequestError(f"the request lacks input(s) {missing}; the program takes {users + items + [USER_INDEX]}")
        check_request(request[USER_INDEX], [request[k] for k in users], [request[k] for k in items], *self.spec)
        return self.program(**request)


def load(f: Any) -> ServedProgram:
    """``torch.export.load(f)`` of a program from :func:`export`, as a module that checks each
    request with the eager messages (:class:`ServedProgram`) before running the program.

    Example:
        >>> import io, torch, mari_fx
        >>> from mari_fx.testing.examples import CoarseRanker
        >>> T = mari_fx.transform(CoarseRanker().eval(), ["user"], (torch.randn(4, 16), torch.randn(4, 8)))
        >>> buf = io.BytesIO(); torch.export.save(mari_fx.export(T), buf); _ = buf.seek(0)
        >>> served = mari_fx.export.load(buf)
        >>> req = mari_fx.random_request(T, 2, 5)
        >>> torch.allclose(served(**req), T(**req))
        True
        >>> served(**{**req, "item": req["item"][:, :7]})
        Traceback (most recent call last):
        ...
        mari_fx.errors.RequestError: item input 'item' has shape [5, 7], expected [N, 8] (dtype float32)
    """
    return ServedProgram(torch.export.load(f))


class ExportError(MariError):
    """``torch.export`` could not export a transformed module."""


def script(T: fx.GraphModule) -> torch.jit.ScriptModule:
    """``torch.jit.script(T)``, without the noise torch emits while scripting any GraphModule.

    The request check scripts as it is: a bad request raises ``torch.jit.Error``
    whose message is the :class:`~mari_fx.errors.RequestError` message.  TorchScript
    is deprecated upstream (torch >= 2.11), so the DeprecationWarning is kept.

    Example:
        >>> import io, torch, mari_fx
        >>> from mari_fx.testing.examples import CoarseRanker
        >>> T = mari_fx.transform(CoarseRanker().eval(), ["user"], (torch.randn(4, 16), torch.randn(4, 8)))
        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore", DeprecationWarning)
        ...     s = script(T)
        >>> buf = io.BytesIO(); torch.jit.save(s, buf); _ = buf.seek(0)
        >>> req = mari_fx.random_request(T, 3, 7)
        >>> torch.equal(torch.jit.load(buf)(**req), T(**req))
        True
    """
    _check_is_transformed(T)
    with warnings.catch_warnings():
        # torch's own GraphModule.__init__ annotates ``self.meta``; the scripting
        # checker warns about it for every GraphModule.  Not actionable by users.
        warnings.filterwarnings("ignore", message="The TorchScript type system doesn't support instance-level")
        return torch.jit.script(T)



# ``mari_fx.export`` is the function; its helpers hang off it, so ``mari_fx.export.load(path)``,
# ``mari_fx.export.traceable(T)`` ... read as before (the module is ``mari_fx.deploy.programs``).
for _helper in (load, traceable, dynamic_shapes, widen_request, script, assert_request, register_dynamic_kind):
    setattr(export, _helper.__name__, _helper)
export.ExportError = ExportError
export.ServedProgram = ServedProgram
