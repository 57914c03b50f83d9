"""Declaring user-side KJT keys, and the KJTs of a transformed module's request.

A ``KeyedJaggedTensor`` forward argument ``features`` whose keys are partly
declared user-side (``"features[user_id]"``, or :class:`KJTKeys`) becomes two
placeholders: ``features_user`` (the user keys, U rows in a request) and
``features_item`` (the other keys, N rows), glued back into the original key order
by a ``pair_kjt`` node that the embedding modules read.  A KJT with keys of one side
only keeps its name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import torch.fx as fx
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mari_fx.errors import DeclarationError
from mari_fx.frontend.inputs import Arg, BatchOps, Columns, InputSpec, Key, RequestKind, _new_placeholder
from mari_fx.analysis.tags import Side

from . import jagged
from .extension import EXTENSION

KIND = "kjt"


@dataclass(frozen=True)
class KJTKeys:
    """Declare the keys of KJT argument ``arg``: ``user`` keys, and optionally the ``item``
    keys (then every key must be in exactly one list).

    Example:
        >>> KJTKeys("features", user=["user_id"], item=["item_id"])
        KJTKeys(arg='features', user=('user_id',), item=('item_id',))
    """

    arg: str
    user: Tuple[str, ...] = ()
    item: Optional[Tuple[str, ...]] = None

    def __post_init__(self):
        object.__setattr__(self, "user", tuple(self.user))
        if self.item is not None:
            object.__setattr__(self, "item", tuple(self.item))
            both = [k for k in self.user if k in self.item]
            if both:
                raise DeclarationError(f"key {both[0]!r} of {self.arg!r} is declared both user-side and item-side")

    def __str__(self) -> str:
        return f"{self.arg}[{', '.join(self.user)}]"


@dataclass(frozen=True)
class KJTInputSpec(InputSpec):
    """A flat KJT input: the keys of ``arg`` it carries (``keys``) and all of ``arg``'s keys in order."""

    keys: Tuple[str, ...] = ()
    arg_keys: Tuple[str, ...] = ()

    @property
    def source(self) -> str:
        return f"{self.arg}[{', '.join(self.keys)}]"


def _declared(arg: str, keys: Sequence[str], sels: Sequence[Any]) -> List[str]:
    """The user keys ``sels`` declare, in KJT order; errors name the key at fault."""
    user, item = set(), None
    for s in sels:
        if isinstance(s, Arg):
            user |= set(keys)
        elif isinstance(s, Key):
            user.add(s.key)
        elif isinstance(s, KJTKeys):
            user |= set(s.user)
            if s.item is not None:
                item = (item or set()) | set(s.item)
        elif isinstance(s, Columns):
            raise DeclarationError(f"input {arg!r} is a KeyedJaggedTensor: declare keys as '{arg}[key]'")
        else:
            raise DeclarationError(f"cannot use {s!r} to declare keys of the KeyedJaggedTensor {arg!r}")
    for k in sorted(user | (item or set())):
        if k not in keys:
            raise DeclarationError(f"declared key {k!r} is not a key of the example KeyedJaggedTensor {arg!r}; "
                                   f"its keys are {list(keys)}")
    if item is not None:
        both = sorted(user & item)
        if both:
            raise DeclarationError(f"key {both[0]!r} of {arg!r} is declared both user-side and item-side")
        neither = [k for k in keys if k not in user | item]
        if neither:
            raise DeclarationError(f"key {neither[0]!r} of {arg!r} is declared neither user-side nor item-side")
    return [k for k in keys if k in user]


def _kjt_input(gm: fx.GraphModule, ph: fx.Node, value: KeyedJaggedTensor, sels, flat_example, taken) -> List[InputSpec]:
    keys = list(value.keys())
    if value.variable_stride_per_key():
        raise DeclarationError(f"example KJT {ph.target!r} has a variable batch size per key; give every key "
                               "one row per pair")
    user_keys = _declared(ph.target, keys, sels)
    item_keys = [k for k in keys if k not in user_keys]
    parts, specs = {}, []
    for side, part_keys in ((Side.USER, user_keys), (Side.ITEM, item_keys)):
        if not part_keys:
            continue
        two = user_keys and item_keys
        node = _new_placeholder(gm, ph, f"{ph.target}_{side}", taken) if two else ph
        node.type = KeyedJaggedTensor  # the forward's annotation, which TorchScript needs
        parts[side] = node
        flat_example[node.target] = jagged.select_keys(value, part_keys) if two else value
        specs.append(KJTInputSpec(node.target, ph.target, side, kind=KIND, keys=tuple(part_keys),
                                  arg_keys=tuple(keys)))
    first_op = next(n for n in gm.graph.nodes if n.op != "placeholder")
    with gm.graph.inserting_before(first_op):
        glued = gm.graph.call_function(jagged.pair_kjt, (parts.get(Side.USER), parts.get(Side.ITEM), keys))
    ph.replace_all_uses_with(glued, delete_user_cb=lambda n: n is not glued)
    if ph not in parts.values():
        gm.graph.erase_node(ph)
    return specs


def _extract(spec: KJTInputSpec, value: Any) -> KeyedJaggedTensor:
    return jagged.select_keys(value, spec.keys, name=f"input {spec.arg!r}")


def _assemble(parts: List[Tuple[KJTInputSpec, KeyedJaggedTensor]]) -> KeyedJaggedTensor:
    return jagged.merge([v for _, v in parts], parts[0][0].arg_keys)


def dynamic_kjt(spec: KJTInputSpec, rows: Any, example: Any = None) -> List[Any]:
    """The ``dynamic_shapes`` entry of a KJT input (one per field of the KJT's pytree): ``lengths``
    has ``len(keys) * rows`` entries, ``values`` (and ``weights``, if the example had them) a count
    of its own, ``Dim("<input>_ids", min=0)``; offsets are left out (pass KJTs built from lengths).

    Example:
        >>> from torch.export import Dim
        >>> spec = KJTInputSpec("features_user", "features", "user", kind=KIND, keys=("a", "b"))
        >>> [None if d is None else str(d[0].__name__) for d in dynamic_kjt(spec, Dim("users", min=1))]
        ['features_user_ids', None, '2*users', None, None, None]
    """
    from torch.export import Dim

    ids = Dim(f"{spec.name}_ids", min=0)
    weighted = isinstance(example, KeyedJaggedTensor) and example.weights_or_none() is not None
    fields = {"_values": {0: ids}, "_weights": {0: ids} if weighted else None, "_lengths": {0: len(spec.keys) * rows}}
    return [fields.get(f) for f in KeyedJaggedTensor._fields]


def register() -> None:
    EXTENSION.dynamic_kind(KIND, dynamic_kjt)
    EXTENSION.input_kind(lambda v: isinstance(v, KeyedJaggedTensor), _kjt_input)
    EXTENSION.request_kind(KIND, RequestKind(_extract, _assemble))
    EXTENSION.batch_type(lambda v: isinstance(v, KeyedJaggedTensor),
                         BatchOps(lambda v: v.stride(), jagged.kjt_select_rows, jagged.kjt_first_difference))
