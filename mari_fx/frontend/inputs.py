"""Declaring user-side inputs, and the request format of a transformed module.

Four shapes of user-side input occur in ranking models; a selector names each:

=====================  ==========================  =====================================
selector string        selector object             meaning
=====================  ==========================  =====================================
``"user_dense"``       ``Arg("user_dense")``        a whole tensor argument (or a whole dict)
``"x[user_id]"``       ``Key("x", "user_id")``      one key of a dict-of-tensors argument
``"feats[0]"``         ``Key("feats", "0")``        one element of a list / tuple of tensors
``"X[:, 0:3]"``        ``Columns("X", 0, 3)``       columns ``[0, 3)`` of a packed 2-D input
``"bag(ids, offs)"``   ``Bag("ids", "offs")``       a jagged bag per row: flat ``ids`` + ``offsets``
                                                   (+ weights: ``"bag(ids, offs, w)"``) feeding
                                                   ``nn.EmbeddingBag(ids, offs)``
(KJT keys)             see ``torchrec_integration``
=====================  ==========================  =====================================

A bag input is one flat input, a :class:`mari_fx.runtime.jagged.JaggedBag` named after the common
prefix of its arguments (``bag(tag_ids, tag_offsets)`` -> ``tag``): a request carries U users'
bags.  Item-side bags need no declaration: an (ids, offsets) pair of forward arguments read
together by an ``EmbeddingBag`` is grouped into an item-side bag of N bags.

Forward arguments that are Python constants (``mask=None`` left at its default, ``return_user=False``,
``scale=2.0`` in the example) are fixed when the model is captured
(:func:`mari_fx.frontend.capture.constant_args`, ``RequestSpec.fixed``): a request carries tensors only.

Everything not declared user-side is item-side.  Declaring inputs rewrites the
pair-shaped graph so that every placeholder is one plain tensor with one side
(:func:`flatten_inputs`): dict keys become their own placeholders, and a packed
tensor becomes ``X_user`` (its user columns, in order) and ``X_item``, glued back
into the original column order with a ``cat`` that the tagging pass sees through.

The transformed module takes those flat tensors by name, user-side ones at U rows
and item-side ones at N rows, plus ``user_index`` ([N] int64: the user of each
candidate).  :func:`pairs_to_request` builds that from pair-shaped inputs and
:func:`request_to_pairs` goes back.
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx

from ..registry import with_extensions_of_arguments
from .. import registry
from ..errors import DeclarationError, RequestError
from ..analysis.tags import Side

USER_INDEX = "user_index"
from ..meta import FIXED_ARGS_KEY, REQUEST_KEY  # noqa: F401 (re-exported)


# --------------------------------------------------------------------------- selectors
@dataclass(frozen=True)
class Arg:
    """A whole forward argument (a tensor, or a dict whose every key is then user-side)."""

    name: str

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Key:
    """One key of a dict-of-tensors forward argument."""

    arg: str
    key: str

    def __str__(self) -> str:
        return f"{self.arg}[{self.key}]"


@dataclass(frozen=True)
class Columns:
    """Columns ``[start, stop)`` of the last dimension of a packed tensor argument."""

    arg: str
    start: int
    stop: int

    def __str__(self) -> str:
        return f"{self.arg}[:, {self.start}:{self.stop}]"


@dataclass(frozen=True)
class Bag:
    """A jagged bag per row, given as flat forward arguments: ``ids`` (all bags' ids), ``offsets``
    (bag starts, as ``nn.EmbeddingBag`` takes them) and optionally ``weights``
    (``per_sample_weights``).  ``name`` names the flat input (default: the arguments' common
    prefix, e.g. ``tag`` for ``tag_ids`` / ``tag_offsets``).

    Example:
        >>> parse_selector("bag(tag_ids, tag_offsets)")
        Bag(ids='tag_ids', offsets='tag_offsets', weights=None, name=None)
        >>> Bag("tag_ids", "tag_offsets").flat_name
        'tag'
    """

    ids: str
    offsets: str
    weights: Optional[str] = None
    name: Optional[str] = None

    @property
    def args(self) -> Tuple[str, ...]:
        return (self.ids, self.offsets) + ((self.weights,) if self.weights else ())

    @property
    def flat_name(self) -> str:
        if self.name:
            return self.name
        prefix = self.ids
        for a in self.args[1:]:
            while not a.startswith(prefix):
                prefix = prefix[:-1]
        prefix = prefix.rstrip("_")
        return prefix if prefix and prefix not in self.args else f"{self.ids}_bag"

    def __str__(self) -> str:
        return f"bag({', '.join(self.args)})"


Selector = Union[Arg, Key, Columns, Bag]

_ARG_RE = re.compile(r"^\s*([A-Za-z_]\w*)\s*$")
_KEY_RE = re.compile(r"""^\s*([A-Za-z_]\w*)\s*\[\s*(['"]?)([^'":\]]+)\2\s*\]\s*$""")
_BAG_RE = re.compile(r"^\s*bag\s*\(\s*([A-Za-z_]\w*)\s*,\s*([A-Za-z_]\w*)\s*(?:,\s*([A-Za-z_]\w*)\s*)?\)\s*$")
_COLS_RE = re.compile(r"^\s*([A-Za-z_]\w*)\s*\[\s*(?::\s*,|\.\.\.\s*,)\s*(\d*)\s*:\s*(\d*)\s*\]\s*$")


def parse_selector(sel: Union[str, Selector]) -> Selector:
    """Parse ``"name"``, ``"name[key]"`` or ``"name[:, a:b]"`` into a selector.

    Example:
        >>> parse_selector("X[:, 0:3]")
        Columns(arg='X', start=0, stop=3)
        >>> parse_selector("feats['user_id']")
        Key(arg='feats', key='user_id')
    """
    if not isinstance(sel, str):
        if hasattr(sel, "arg") or hasattr(sel, "name"):
            return sel
        raise DeclarationError(f"cannot use {sel!r} as an input selector")
    if m := _BAG_RE.match(sel):
        return Bag(m.group(1), m.group(2), m.group(3))
    if m := _COLS_RE.match(sel):
        if not m.group(3):
            raise DeclarationError(f"selector {sel!r}: give an explicit end column, e.g. 'X[:, 0:3]'")
        return Columns(m.group(1), int(m.group(2) or 0), int(m.group(3)))
    if m := _KEY_RE.match(sel):
        return Key(m.group(1), m.group(3).strip())
    if m := _ARG_RE.match(sel):
        return Arg(m.group(1))
    raise DeclarationError(
        f"cannot parse input selector {sel!r}: use 'arg', 'arg[key]', 'arg[:, start:stop]' or 'bag(ids, offsets)'"
    )


# --------------------------------------------------------------------------- flat inputs
@dataclass(frozen=True)
class InputSpec:
    """One placeholder of the flat graph: where it comes from and which side it is.

    ``key`` is set for a dict key; ``columns`` (original column indices, in the
    placeholder's column order) for a part of a packed tensor.
    """

    name: str
    arg: str
    side: Side
    key: Optional[str] = None
    columns: Optional[Tuple[int, ...]] = None
    kind: str = "tensor"  # "tensor", "dict" or "packed"; extensions add their own

    @property
    def source(self) -> str:
        if self.key is not None:
            return f"{self.arg}[{self.key}]"
        if self.columns is not None:
            return f"{self.arg}[:, {_ranges(self.columns)}]"
        return self.arg


@dataclass(frozen=True)
class RequestSpec:
    """The request format of a transformed module: original args -> flat inputs.

    ``fixed``: forward arguments fixed when the model was captured (Python constants, see
    :func:`mari_fx.frontend.capture.constant_args`), as ``(name, value)``: requests do not carry them,
    pair-shaped calls may (with the same value) and :func:`request_to_pairs` puts them back.
    """

    args: Tuple[str, ...]
    inputs: Tuple[InputSpec, ...]
    fixed: Tuple[Tuple[str, Any], ...] = ()

    @property
    def user_inputs(self) -> Tuple[InputSpec, ...]:
        return tuple(s for s in self.inputs if s.side == Side.USER)

    @property
    def item_inputs(self) -> Tuple[InputSpec, ...]:
        return tuple(s for s in self.inputs if s.side != Side.USER)


def _ranges(cols: Sequence[int]) -> str:
    runs, start = [], None
    for i, c in enumerate(cols):
        if start is None:
            start = c
        if i + 1 == len(cols) or cols[i + 1] != c + 1:
            runs.append(f"{start}:{c + 1}")
            start = None
    return ",".join(runs)


def _identifier(text: str) -> str:
    out = re.sub(r"\W", "_", text)
    return out if out and not out[0].isdigit() else "_" + out


# An input handler turns one original placeholder into flat placeholders.  The
# TorchRec integration registers one for KeyedJaggedTensor.
InputHandler = Callable[..., List[InputSpec]]
_INPUT_HANDLERS = registry.INPUT_KINDS


def register_input_kind(predicate: Callable[[Any], bool], handler: InputHandler, priority: int = 0) -> None:
    """Teach :func:`flatten_inputs` a new kind of forward argument (e.g. a KJT).

    ``handler(gm, placeholder, example, selectors, flat_example, taken)`` must replace
    ``placeholder`` by flat tensor placeholders, fill ``flat_example`` and return
    their specs.
    """
    _INPUT_HANDLERS.add(predicate, handler, priority=priority)


# An input group turns several original placeholders into one flat input (e.g. a jagged bag's ids
# and offsets): ``group(gm, selectors, example, flat_example, taken) -> (remaining selectors,
# {placeholder name: specs})``; a placeholder mapped to [] is consumed by a group listed elsewhere.
_INPUT_GROUPS = registry.INPUT_GROUPS


def register_input_group(group: Callable[..., Tuple[List[Any], Dict[str, List[InputSpec]]]], priority: int = 0) -> None:
    """Teach :func:`flatten_inputs` a kind of input spread over several forward arguments."""
    _INPUT_GROUPS.add(group, group, priority=priority)


def bind_example(gm: fx.GraphModule, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Dict[str, Any]:
    """Map each placeholder name of ``gm`` to its example value."""
    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    if any(str(n).startswith("*") for n in names):
        raise DeclarationError("models with *args / **kwargs in forward are not supported; name the inputs")
    params, fixed = gm.meta.get(FIXED_ARGS_KEY, (tuple(names), {}))  # constants fixed when captured
    if len(args) > len(params):
        raise DeclarationError(f"{len(args)} example inputs given but forward takes {len(params)}: {list(params)}")
    bound = dict(zip(params, args))
    for k, v in kwargs.items():
        if k not in params:
            raise DeclarationError(f"example input {k!r} is not an argument of forward {list(params)}")
        if k in bound:
            raise DeclarationError(f"example input {k!r} given twice")
        bound[k] = v
    bound = {k: v for k, v in bound.items() if k not in fixed}
    missing = [n for n in names if n not in bound]
    if missing:
        raise DeclarationError(f"no example value for forward argument(s) {missing}: pass them in example_inputs")
    return bound


def flatten_inputs(
    gm: fx.GraphModule,
    user_inputs: Sequence[Union[str, Selector]],
    example: Mapping[str, Any],
) -> Tuple[RequestSpec, Dict[str, torch.Tensor]]:
    """Rewrite ``gm`` in place so that every placeholder is one tensor of one side.

    Returns the :class:`RequestSpec` and the flat example inputs (pair-shaped).

    Example:
        >>> import torch, torch.fx as fx
        >>> class M(torch.nn.Module):
        ...     def forward(self, x):
        ...         return x["u"] * x["i"]
        >>> gm = fx.symbolic_trace(M())
        >>> spec, ex = flatten_inputs(gm, ["x[u]"], {"x": {"u": torch.ones(2, 3), "i": torch.ones(2, 3)}})
        >>> [(s.name, str(s.side)) for s in spec.inputs]
        [('x_u', 'user'), ('x_i', 'item')]
    """
    selectors = [parse_selector(s) for s in user_inputs]
    if not selectors:
        raise DeclarationError("user_inputs is empty: declare at least one user-side input")
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    taken = {p.target for p in placeholders}
    flat_example: Dict[str, torch.Tensor] = {}
    grouped: Dict[str, List[InputSpec]] = {}
    for group in _INPUT_GROUPS.keys():
        selectors, found = group(gm, selectors, example, flat_example, taken)
        grouped.update(found)
    by_arg: Dict[str, List[Selector]] = {}
    for sel in selectors:
        arg = getattr(sel, "arg", None) or getattr(sel, "name")
        if arg not in example:
            raise DeclarationError(
                f"declared user input {str(sel)!r} names argument {arg!r}, which forward does not take; "
                f"arguments are {list(example)}"
            )
        by_arg.setdefault(arg, []).append(sel)
    _check_duplicates(by_arg)

    specs: List[InputSpec] = []
    for ph in placeholders:
        if ph.target in grouped:
            specs += grouped[ph.target]
            continue
        value, sels = example[ph.target], by_arg.get(ph.target, [])
        handler = _handler_for(value)
        if handler is None:
            raise DeclarationError(
                f"forward argument {ph.target!r} is a {type(value).__name__}; mari_fx takes tensors, "
                "dicts, lists and tuples of tensors and (with torchrec_integration) KeyedJaggedTensors"
            )
        specs += handler(gm, ph, value, sels, flat_example, taken)
    gm.graph.lint()
    gm.recompile()
    params, fixed = gm.meta.get(FIXED_ARGS_KEY, (tuple(p.target for p in placeholders), {}))
    spec = RequestSpec(tuple(params), tuple(specs), tuple(fixed.items()))
    gm.meta[REQUEST_KEY] = spec
    return spec, flat_example


def _check_duplicates(by_arg: Mapping[str, List[Selector]]) -> None:
    for arg, sels in by_arg.items():
        kinds = {type(s) for s in sels}
        if Arg in kinds and len(sels) > 1:
            raise DeclarationError(f"input {arg!r} is declared whole and also by {[str(s) for s in sels if not isinstance(s, Arg)]}")
        seen: Dict[Any, Selector] = {}
        for s in sels:
            for c in ([s.key] if isinstance(s, Key) else range(s.start, s.stop) if isinstance(s, Columns) else []):
                if c in seen:
                    raise DeclarationError(f"user inputs {str(seen[c])!r} and {str(s)!r} overlap (both cover {arg}:{c})")
                seen[c] = s


def _handler_for(value: Any) -> Optional[InputHandler]:
    return next(iter(_INPUT_HANDLERS.matching(value)), None)


def _new_placeholder(gm: fx.GraphModule, before: fx.Node, name: str, taken: set) -> fx.Node:
    base, k = _identifier(name), 0
    name = base
    while name in taken or name == USER_INDEX:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    with gm.graph.inserting_before(before):
        return gm.graph.placeholder(name)


def _tensor_input(gm, ph, value, sels, flat_example, taken) -> List[InputSpec]:
    cols = [s for s in sels if isinstance(s, Columns)]
    if any(isinstance(s, Key) for s in sels):
        raise DeclarationError(f"input {ph.target!r} is a tensor, not a dict: select columns as '{ph.target}[:, a:b]'")
    if not cols:
        side = Side.USER if sels else Side.ITEM
        flat_example[ph.target] = value
        return [InputSpec(ph.target, ph.target, side)]
    return _packed_input(gm, ph, value, cols, flat_example, taken)


def _packed_input(gm, ph, value: torch.Tensor, cols: List[Columns], flat_example, taken) -> List[InputSpec]:
    if value.dim() < 2:
        raise DeclarationError(f"input {ph.target!r} has shape {tuple(value.shape)}; column selectors need >= 2 dims")
    width = value.shape[-1]
    for c in cols:
        if not 0 <= c.start < c.stop <= width:
            raise DeclarationError(f"columns {str(c)!r} are out of range: {ph.target!r} has {width} columns")
    user_cols = tuple(sorted(i for c in cols for i in range(c.start, c.stop)))
    if len(user_cols) == width:
        flat_example[ph.target] = value
        return [InputSpec(ph.target, ph.target, Side.USER)]
    item_cols = tuple(i for i in range(width) if i not in set(user_cols))
    parts = {}
    for side, part_cols in ((Side.USER, user_cols), (Side.ITEM, item_cols)):
        node = _new_placeholder(gm, ph, f"{ph.target}_{side}", taken)
        parts[side] = (node, part_cols)
        flat_example[node.target] = value[..., list(part_cols)].contiguous()
    # Glue the parts back into the original column order: one slice per run.
    runs: List[Tuple[Side, int, int]] = []  # side, start, stop within that part
    pos = {Side.USER: 0, Side.ITEM: 0}
    user_set = set(user_cols)
    for i in range(width):
        side = Side.USER if i in user_set else Side.ITEM
        if runs and runs[-1][0] == side:
            runs[-1] = (side, runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((side, pos[side], pos[side] + 1))
        pos[side] += 1
    first_op = next(n for n in gm.graph.nodes if n.op != "placeholder")
    with gm.graph.inserting_before(first_op):
        pieces = []
        for side, lo, hi in runs:
            node, part_cols = parts[side]
            if lo == 0 and hi == len(part_cols):
                pieces.append(node)
            else:
                pieces.append(gm.graph.call_function(operator.getitem, (node, (Ellipsis, slice(lo, hi)))))
        glued = gm.graph.call_function(torch.cat, (pieces, -1))
    ph.replace_all_uses_with(glued)
    gm.graph.erase_node(ph)
    return [
        InputSpec(parts[s][0].target, ph.target, s, columns=parts[s][1], kind="packed")
        for s in (Side.USER, Side.ITEM)
    ]


def _dict_input(gm, ph, value: Mapping[str, Any], sels, flat_example, taken) -> List[InputSpec]:
    whole_user = any(isinstance(s, Arg) for s in sels)
    user_keys = {s.key for s in sels if isinstance(s, Key)}
    if any(isinstance(s, Columns) for s in sels):
        raise DeclarationError(f"input {ph.target!r} is a dict: select keys as '{ph.target}[key]'")
    for k in user_keys:
        if k not in value:
            raise DeclarationError(
                f"declared user input '{ph.target}[{k}]' is not a key of the example dict; keys are {list(value)}"
            )
    uses = list(ph.users)
    for use in uses:
        if not (use.op == "call_function" and use.target is operator.getitem and use.args[0] is ph
                and isinstance(use.args[1], str)):
            raise DeclarationError(
                f"dict input {ph.target!r} is used by {use.format_node()}; mari_fx needs every use to be "
                f"{ph.target}[<constant key>] (iterate over a fixed key list in the model instead)"
            )
        if use.args[1] not in value:
            raise DeclarationError(f"the model reads '{ph.target}[{use.args[1]}]', which the example dict lacks")
    specs = []
    for key in value:  # example order: stable and what the user wrote
        key_uses = [u for u in uses if u.args[1] == key]
        if not key_uses:
            continue
        if not isinstance(value[key], torch.Tensor):
            raise DeclarationError(f"'{ph.target}[{key}]' is a {type(value[key]).__name__}, not a tensor")
        node = _new_placeholder(gm, ph, f"{ph.target}_{key}", taken)
        side = Side.USER if whole_user or key in user_keys else Side.ITEM
        specs.append(InputSpec(node.target, ph.target, side, key=key, kind="dict"))
        flat_example[node.target] = value[key]
        for u in key_uses:
            u.replace_all_uses_with(node)
            gm.graph.erase_node(u)
    gm.graph.erase_node(ph)
    return specs


def _list_input(gm, ph, value: Sequence[Any], sels, flat_example, taken) -> List[InputSpec]:
    """A list (or tuple) of tensors: one flat input per element, ``feats[0]`` selecting element 0.
    The model may read elements (``feats[0]``) or hand the whole list to an op (``torch.cat(feats, 1)``):
    either reads the element placeholders."""
    kind = "tuple" if isinstance(value, tuple) else "list"
    if any(isinstance(s, Columns) for s in sels):
        raise DeclarationError(f"input {ph.target!r} is a {kind}: select elements as '{ph.target}[0]'")
    whole_user = any(isinstance(s, Arg) for s in sels)
    user_keys = set()
    for s in sels:
        if isinstance(s, Key):
            if not (s.key.isdigit() and int(s.key) < len(value)):
                raise DeclarationError(f"declared user input '{ph.target}[{s.key}]': the example {kind} has "
                                       f"elements 0..{len(value) - 1}")
            user_keys.add(int(s.key))
    for k, v in enumerate(value):
        if not isinstance(v, torch.Tensor):
            raise DeclarationError(f"'{ph.target}[{k}]' is a {type(v).__name__}, not a tensor")
    nodes, specs = [], []
    for k, v in enumerate(value):
        node = _new_placeholder(gm, ph, f"{ph.target}_{k}", taken)
        side = Side.USER if whole_user or k in user_keys else Side.ITEM
        specs.append(InputSpec(node.target, ph.target, side, key=k, kind=kind))
        flat_example[node.target] = v
        nodes.append(node)
    _read_as(gm, ph, list(nodes) if kind == "list" else tuple(nodes))
    gm.graph.erase_node(ph)
    return specs


def _read_as(gm: fx.GraphModule, node: fx.Node, value: Sequence[fx.Node]) -> None:
    """Make every reader of ``node`` (a list / tuple argument) read ``value``, its elements'
    placeholders: constant indexing is folded (``feats[0]``, ``feats[1:]``, ``feats[1:][0]``), any
    other reader (``torch.cat(feats, 1)``) takes the sequence of placeholders."""
    for use in list(node.users):
        if use.op == "call_function" and use.target is operator.getitem and use.args[0] is node \
                and isinstance(use.args[1], (int, slice)):
            part = value[use.args[1]]
            if isinstance(part, fx.Node):
                use.replace_all_uses_with(part)
            else:
                _read_as(gm, use, part)
            gm.graph.erase_node(use)
        else:
            use.args = fx.node.map_aggregate(use.args, lambda a: value if a is node else a)
            use.kwargs = fx.node.map_aggregate(use.kwargs, lambda a: value if a is node else a)


def _sequence_extract(s: InputSpec, value: Any) -> Any:
    if not isinstance(value, (list, tuple)) or s.key >= len(value):
        raise RequestError(f"input '{s.arg}' must be a {s.kind} with element {s.key}")
    return value[s.key]


register_input_kind(lambda v: isinstance(v, Mapping), _dict_input)
register_input_kind(lambda v: isinstance(v, torch.Tensor), _tensor_input)
register_input_kind(lambda v: isinstance(v, (list, tuple)) and len(v) > 0, _list_input)


# --------------------------------------------------------------------------- extension kinds
@dataclass(frozen=True)
class BatchOps:
    """How the request helpers treat a flat input value that is not a tensor (e.g. a KJT).

    ``rows(v)``: its batch size; ``take(v, index)``: rows ``index`` (int64 [M]) in that
    order; ``first_difference(a, b)``: ``(row, what)`` of the first row where two
    values of equal batch size differ (``what`` names the part, e.g. a key), or None.
    """

    rows: Callable[[Any], Optional[int]]
    take: Callable[[Any, torch.Tensor], Any]
    first_difference: Callable[[Any, Any], Optional[Tuple[int, str]]]


def _tensor_first_difference(a: torch.Tensor, b: torch.Tensor) -> Optional[Tuple[int, str]]:
    differs = (a != b).reshape(a.shape[0], -1).any(1)
    return (int(differs.nonzero()[0]), "") if differs.any() else None


_TENSOR_OPS = BatchOps(lambda t: t.shape[0] if t.dim() else None, lambda t, i: t.index_select(0, i),
                       _tensor_first_difference)
_BATCH_OPS = registry.BATCH_TYPES


def register_batch_type(predicate: Callable[[Any], bool], ops: BatchOps, priority: int = 0) -> None:
    """Teach the request helpers (pairs_to_request, request_to_pairs, random_request, verify)
    a flat input value type other than a tensor."""
    _BATCH_OPS.add(predicate, ops, priority=priority)


def batch_ops(value: Any) -> BatchOps:
    """The :class:`BatchOps` of ``value`` (tensor ops unless an extension registered its type)."""
    return next(iter(_BATCH_OPS.matching(value)), _TENSOR_OPS)


@dataclass(frozen=True)
class RequestKind:
    """How the request helpers read and rebuild forward arguments of an ``InputSpec.kind``
    an extension adds: ``extract(spec, arg_value)`` gives the flat value of ``spec``;
    ``assemble(parts)`` rebuilds the argument from ``[(spec, flat value), ...]``."""

    extract: Callable[[InputSpec, Any], Any]
    assemble: Callable[[List[Tuple[InputSpec, Any]]], Any]
    # True for a kind spread over several arguments (a bag's ids and offsets): extract then gets
    # every bound argument by name and assemble returns {argument: value}.
    spans_args: bool = False


_REQUEST_KINDS = registry.REQUEST_KINDS


def register_request_kind(kind: str, request_kind: RequestKind) -> None:
    """Register the :class:`RequestKind` of ``InputSpec.kind == kind``."""
    _REQUEST_KINDS.add(kind, request_kind, override=True)  # re-registering a kind replaces it


# list and tuple arguments: rebuilt in element order
for _kind, _seq in (("list", list), ("tuple", tuple)):
    register_request_kind(_kind, RequestKind(
        _sequence_extract, lambda parts, seq=_seq: seq(v for _, v in sorted(parts, key=lambda p: p[0].key))))


# --------------------------------------------------------------------------- requests
def _bind(spec: RequestSpec, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Dict[str, Any]:
    if len(args) > len(spec.args):
        raise RequestError(f"{len(args)} inputs given; the model takes {list(spec.args)}")
    bound = dict(zip(spec.args, args))
    bound.update(kwargs)
    fixed = dict(spec.fixed)
    for name, value in fixed.items():
        if name in bound and not (bound[name] is value or bound[name] == value):
            raise RequestError(f"argument {name!r} is {bound[name]!r}, but it was fixed to {value!r} when the model "
                               "was transformed: transform again with that value in the example")
        bound.pop(name, None)
    missing = [a for a in spec.args if a not in bound and a not in fixed]
    if missing:
        raise RequestError(f"missing input(s) {missing}; the model takes {list(spec.args)}")
    return bound


def _extract(s: InputSpec, bound: Mapping[str, Any]) -> torch.Tensor:
    value = bound[s.arg]
    if s.kind in _REQUEST_KINDS:
        kind = _REQUEST_KINDS[s.kind]
        return kind.extract(s, bound if kind.spans_args else value)
    if s.key is not None:
        if s.key not in value:
            raise RequestError(f"input '{s.arg}' has no key {s.key!r}")
        return value[s.key]
    if s.columns is not None:
        return value[..., list(s.columns)]
    return value


def check_user_index(user_index: Any, n: Optional[int] = None) -> torch.Tensor:
    """Validate ``user_index`` (1-d int64, values >= 0, length ``n`` if given)."""
    if not isinstance(user_index, torch.Tensor):
        raise RequestError(f"user_index must be a torch.int64 tensor, got {type(user_index).__name__}")
    if user_index.dtype != torch.int64:
        raise RequestError(f"user_index must have dtype torch.int64, got {user_index.dtype}")
    if user_index.dim() != 1:
        raise RequestError(f"user_index must be 1-d ([N]), got shape {tuple(user_index.shape)}")
    if n is not None and user_index.numel() != n:
        raise RequestError(f"user_index has {user_index.numel()} entries but the item inputs have {n} rows")
    if user_index.numel() and int(user_index.min()) < 0:
        raise RequestError(f"user_index has a negative value {int(user_index.min())}")
    return user_index


@with_extensions_of_arguments
def pairs_to_request(spec_or_module: Any, *args: Any, user_index: torch.Tensor, **kwargs: Any) -> Dict[str, torch.Tensor]:
    """Build a transformed module's request from pair-shaped inputs.

    User-side inputs keep one row per user (the first pair of each user); every
    pair of a user must carry the same user features, else this raises naming
    the input.  Users are ``0 .. user_index.max()``, each with >= 1 candidate.

    Example:
        >>> import torch, mari_fx
        >>> from mari_fx.testing.examples import CoarseRanker
        >>> model = CoarseRanker().eval()
        >>> u, i = torch.randn(2, 16), torch.randn(5, 8)
        >>> idx = torch.tensor([0, 0, 1, 1, 1])
        >>> T = mari_fx.transform(model, user_inputs=["user"], example_inputs=(u[idx], i))
        >>> req = mari_fx.pairs_to_request(T, u[idx], i, user_index=idx)
        >>> req["user"].shape, req["item"].shape
        (torch.Size([2, 16]), torch.Size([5, 8]))
    """
    spec = _request_spec(spec_or_module)
    bound = _bind(spec, args, kwargs)
    flat = {s.name: _extract(s, bound) for s in spec.inputs}
    n = next((batch_ops(v).rows(v) for v in flat.values()), None)
    check_user_index(user_index, n)
    num_users = int(user_index.max()) + 1 if user_index.numel() else 0
    first = torch.full((num_users,), user_index.numel(), dtype=torch.int64)
    first.scatter_reduce_(0, user_index, torch.arange(user_index.numel()), reduce="amin")
    if num_users and (first == user_index.numel()).any():
        missing = int((first == user_index.numel()).nonzero()[0])
        raise RequestError(f"user {missing} has no candidate in user_index; users must be 0..U-1, each with >= 1 candidate")
    request = {}
    for s in spec.inputs:
        value = flat[s.name]
        if s.side == Side.USER:
            ops = batch_ops(value)
            dedup = ops.take(value, first)
            diff = ops.first_difference(ops.take(dedup, user_index), value)
            if diff is not None:
                row, what = diff
                raise RequestError(
                    f"user input {s.source!r}{' ' + what if what else ''} differs between pairs of user "
                    f"{int(user_index[row])} (pair row {row}): "
                    "a user-side input must be identical for all candidates of a user"
                )
            value = dedup
        request[s.name] = value
    request[USER_INDEX] = user_index
    return request


@with_extensions_of_arguments
def request_to_pairs(spec_or_module: Any, request: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """Inverse of :func:`pairs_to_request`: the pair-shaped forward arguments, by name.

    Example:
        >>> import torch, mari_fx
        >>> from mari_fx.testing.examples import CoarseRanker
        >>> u, i, idx = torch.randn(2, 16), torch.randn(3, 8), torch.tensor([0, 1, 1])
        >>> T = mari_fx.transform(CoarseRanker().eval(), user_inputs=["user"], example_inputs=(u[idx], i))
        >>> pairs = mari_fx.request_to_pairs(T, {"user": u, "item": i, "user_index": idx})
        >>> torch.equal(pairs["user"], u[idx])
        True
    """
    spec = _request_spec(spec_or_module)
    idx = request[USER_INDEX]
    out: Dict[str, Any] = {}
    custom: Dict[str, List[Tuple[InputSpec, Any]]] = {}
    for s in spec.inputs:
        if s.name not in request:
            raise RequestError(f"request lacks input {s.name!r} ({s.source})")
        v = request[s.name]
        if s.side == Side.USER:
            v = batch_ops(v).take(v, idx)
        if s.kind in _REQUEST_KINDS:
            custom.setdefault(s.arg, []).append((s, v))
        elif s.key is not None:
            out.setdefault(s.arg, {})[s.key] = v
        elif s.columns is not None:
            out.setdefault(s.arg, []).append((s.columns, v))
        else:
            out[s.arg] = v
    for arg, parts in list(out.items()):
        if isinstance(parts, list):
            width = sum(len(c) for c, _ in parts)
            ref = parts[0][1]
            full = ref.new_empty(ref.shape[:-1] + (width,))
            for cols, v in parts:
                full[..., list(cols)] = v
            out[arg] = full
    for arg, parts in custom.items():
        kind = _REQUEST_KINDS[parts[0][0].kind]
        if kind.spans_args:
            out.update(kind.assemble(parts))
        else:
            out[arg] = kind.assemble(parts)
    out.update(spec.fixed)  # the constants the model was transformed with
    return out


def _request_spec(obj: Any) -> RequestSpec:
    if isinstance(obj, RequestSpec):
        return obj
    meta = getattr(obj, "meta", None)
    if isinstance(meta, dict) and REQUEST_KEY in meta:
        return meta[REQUEST_KEY]
    raise RequestError(f"{type(obj).__name__} carries no request spec: pass a module made by mari_fx.transform/trace")
