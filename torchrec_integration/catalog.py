"""Item-side KJTs as catalog inputs of ``mari_fx.precompute_items`` (ids -> rows).

``precompute_items(T, {"features_item": kjt})`` with one bag per catalog item for every item key
(M rows) caches the item keys' pooled embeddings and the item-only work downstream of them.

In ``T`` every embedding module is called once on the request's KJT: user keys padded to N rows,
item keys at N rows (see ``lowering.py``); the item keys' columns are read off it at N rows.
:func:`prepare` splits that call on a copy of ``T``'s graph: the module is called a second time
on the item KJT alone (user keys as empty bags: ``jagged.with_empty_keys``), which is
catalog-only, and the N-row reads of item columns move to it; the first call gets empty item
bags (``jagged.empty_bags``).  Per-key pooling makes the item columns the same bag by bag.
"""
from __future__ import annotations

import operator
from typing import Any, Tuple

import torch.fx as fx
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mari_fx.analysis.tags import ROWS_KEY
from mari_fx.deploy.precompute import CatalogKind
from mari_fx.errors import DeclarationError

from . import jagged
from .inputs import KIND, KJTInputSpec


def expected(spec: KJTInputSpec, info: Any) -> Tuple[Tuple[str, ...], bool]:
    """(item keys in order, weighted) of the request's item KJT."""
    return tuple(spec.keys), bool(getattr(info, "weighted", False))


def rows(name: str, kjt: Any, want: Any) -> int:
    """M, the batch of a catalog KJT; errors name the key at fault."""
    if not isinstance(kjt, KeyedJaggedTensor):
        raise DeclarationError(f"catalog[{name!r}] must be a KeyedJaggedTensor of the item keys, got {type(kjt).__name__}")
    if kjt.variable_stride_per_key():
        raise DeclarationError(f"catalog[{name!r}] has a variable batch size per key: give every item key one bag "
                               "per catalog item")
    if want is not None:
        keys, weighted = want
        have = list(kjt.keys())
        for k in have:
            if k not in keys:
                raise DeclarationError(f"catalog[{name!r}] carries key {k!r}, which is not an item key of T's input "
                                       f"{name!r} (item keys: {list(keys)}); leave user keys out of the catalog")
        for k in keys:
            if k not in have:
                raise DeclarationError(f"catalog[{name!r}] lacks item key {k!r}: give one bag per catalog item for "
                                       f"every item key {list(keys)}")
        if (kjt.weights_or_none() is not None) != weighted:
            raise DeclarationError(f"catalog[{name!r}] is {'' if kjt.weights_or_none() is not None else 'un'}weighted; "
                                   f"T's input {name!r} is {'' if weighted else 'un'}weighted")
    lengths = kjt.lengths()
    stride = kjt.stride()
    if lengths.numel() != len(kjt.keys()) * stride:
        raise DeclarationError(f"catalog[{name!r}] has {lengths.numel()} lengths for {len(kjt.keys())} keys of "
                               f"{stride} rows")
    return stride


def _is_request_kjt(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target is jagged.request_kjt


def prepare(work: fx.GraphModule, ph: fx.Node, spec: KJTInputSpec, user_index: fx.Node) -> None:
    """Move the item keys' lookups of ``ph`` (the item KJT) to calls that read it alone."""
    graph = work.graph
    first = next(n for n in graph.nodes if n.op != "placeholder")
    item_keys = list(spec.keys)
    for r in [u for u in ph.users if _is_request_kjt(u)]:
        user, item, keys, idx, pad, checked = r.args
        if user is None:
            continue  # an item-only KJT: its lookups are catalog-only already
        if item is not ph or not pad:
            raise DeclarationError(f"the embedding modules reading {r.format_node()} look up {spec.name!r}'s item "
                                   "keys with the user keys gathered to N rows (the pair-shaped lookup, for a "
                                   "consumer of the pooled result that mari_fx does not split by key): "
                                   f"{spec.name!r} cannot be a catalog input")
        with graph.inserting_before(first):
            alone = graph.call_function(jagged.with_empty_keys, (ph, list(keys)))
            empty = graph.call_function(jagged.empty_bags, (item_keys, user, user_index))
        alone.meta[ROWS_KEY] = "N"
        for e in [c for c in r.users if c.op == "call_module"]:
            with graph.inserting_after(e):
                e_item = graph.call_module(e.target, (alone,))
            e_item.meta[ROWS_KEY] = "N"
            at = e_item
            for x in list(e.users):
                if x.op == "call_method" and x.target == "values" and x.args == (e,):
                    readers = [y for y in x.users if y.meta.get(ROWS_KEY) == "N"]
                    if not readers:
                        continue
                    with graph.inserting_after(at):
                        v_item = at = graph.call_method("values", (e_item,))
                    v_item.meta[ROWS_KEY] = "N"
                    for y in readers:
                        y.replace_input_with(x, v_item)
                elif (x.op == "call_function" and x.target is operator.getitem and x.args[1] in item_keys
                      and x.meta.get(ROWS_KEY) == "N"):
                    x.replace_input_with(e, e_item)
        for c in list(ph.users):
            if c is r or (c.op == "call_function" and c.target is jagged.check_request_kjt):
                c.replace_input_with(ph, empty)
    left = [u for u in ph.users if u.target not in (jagged.with_empty_keys, jagged.request_kjt)]
    if left:
        raise DeclarationError(f"{', '.join(u.format_node() for u in left)} reads the item KJT {spec.name!r} "
                               f"itself: {spec.name!r} cannot be a catalog input")


CATALOG = CatalogKind(expected=expected, rows=rows, take=jagged.kjt_rows, prepare=prepare)
