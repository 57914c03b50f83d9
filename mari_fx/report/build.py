"""The data behind ``mari-fx report``: what MaRI rewrote in a model and what it saves.

:func:`build_report` turns a transformed module's :class:`~mari_fx.report.record.Record`
plus measured FLOPs into a plain, JSON-ready dict; ``mari-fx report`` prints it
as tables (:mod:`mari_fx.cli`) or as JSON (``--json``).  The keys are stable
(``schema`` names the version) and documented in docs/report.md.

Two FLOPs figures are given, and they answer different questions:

* ``flops.before`` / ``flops.after`` are *measured* with ``torch.utils.flop_counter``
  (:func:`mari_fx.count_flops`): the pair-shaped model on N pair rows, and the
  transformed module on a random ragged request of U users and N candidates.
  They cover every op the counter knows (matmuls, convolutions, attention).
* ``flops.layers_before`` / ``flops.layers_after`` add up the per-layer figures
  (:meth:`~mari_fx.report.record.LayerRecord.flops`, 2 FLOPs per multiply-add) of the
  Linear / matmul rows of the table.

``audit=True`` adds what a probe batch measures next to what was proved
(:mod:`mari_fx.report.audit`): per layer ``measured_user_columns`` and ``lost_at``, and the
top-level ``audit`` object with ``realised``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import DeclarationError
from .flops import count_flops
from ..frontend.inputs import request_to_pairs
from .record import RECORD_KEY, Record, input_spec_dict
from ..analysis.rules import describe_target
from ..analysis.tags import ROWS_KEY, TAG_KEY

SCHEMA = "mari_fx.report/1"



def build_report(model: nn.Module, T: fx.GraphModule, *, users: int = 1, candidates: int = 1000, seed: int = 0,
                 include_nodes: bool = False, target: Optional[str] = None,
                 user_inputs: Sequence[str] = (), audit: bool = False,
                 traced: Optional[fx.GraphModule] = None, catalog_size: Optional[int] = None,
                 catalog_inputs: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """The report of ``T`` (made from ``model`` by :func:`mari_fx.transform`) at U users, N candidates.

    Args:
        model: the pair-shaped model ``T`` was made from (its FLOPs are the "before").
        T: the transformed module; its record and example inputs are read.
        users / candidates: U and N of the request the FLOPs are given for (1 <= U <= N).
        seed: seed of the random ragged request used to measure FLOPs.
        include_nodes: add ``nodes``: every node of ``T`` with the rows it runs at.
        target / user_inputs: echoed into the report (what the command line was given).
        audit: measure every layer's user columns on a probe batch (:mod:`mari_fx.report.audit`): adds
            ``measured_user_columns`` and ``lost_at`` to each layer and the ``audit`` object.
        traced: for the audit, the GraphModule from :func:`mari_fx.trace` that ``T`` was lowered
            from (default: ``model`` traced again with ``user_inputs``, or the declarations read
            off ``T``, and ``T``'s example inputs).
        catalog_size / catalog_inputs: add ``item_cache``: what :func:`mari_fx.precompute_items`
            would cache for a catalog of ``catalog_size`` items over ``catalog_inputs`` (default:
            every item input), planned on ``T``'s example rows (:func:`item_cache_report`).

    Returns:
        A JSON-ready dict; keys documented in docs/report.md.

    Example:
        >>> import torch, mari_fx
        >>> from mari_fx.testing.examples import CoarseRanker
        >>> model = CoarseRanker().eval()
        >>> T = mari_fx.transform(model, ["user"], (torch.randn(4, 16), torch.randn(4, 8)))
        >>> r = build_report(model, T, users=1, candidates=100)
        >>> [(l["name"], l["action"]) for l in r["layers"]][:3]
        [('user_tower.0', 'hoisted'), ('user_tower.2', 'hoisted'), ('fusion.0', 'split')]
        >>> r["layers"][2]["flops_before"], r["layers"][2]["flops_after"]  # 2*64*(100*40) vs 2*64*(1*32 + 100*8)
        (512000, 106496)
        >>> r["flops"]["before"] > r["flops"]["after"]
        True
        >>> a = build_report(model, T, candidates=100, audit=True)
        >>> a["layers"][2]["measured_user_columns"], a["audit"]["realised"], a["audit"]["layers_short"]
        (32, 1.0, [])
    """
    record: Optional[Record] = getattr(T, "meta", {}).get(RECORD_KEY)
    if record is None:
        raise DeclarationError(f"{type(T).__name__} carries no mari_fx record: pass a module made by mari_fx.transform")
    if not 1 <= users <= candidates:
        raise DeclarationError(f"need 1 <= users <= candidates, got users={users}, candidates={candidates}")

    layers: List[Dict[str, Any]] = []
    for layer in record.layers:
        row = dataclasses.asdict(layer)  # every LayerRecord field, under its own name
        row["rewritten"] = layer.action in ("split", "hoisted")
        row["reason"] = _why_not(layer)
        row["flops_before"] = layer.flops(users, candidates, transformed=False)
        row["flops_after"] = layer.flops(users, candidates, transformed=True)
        layers.append(row)

    before, after = _measure(model, T, users, candidates, seed)
    layers_before = sum(l["flops_before"] for l in layers)
    layers_after = sum(l["flops_after"] for l in layers)
    report: Dict[str, Any] = {
        "schema": SCHEMA,
        "model": type(model).__name__,
        "target": target,
        "user_inputs": list(user_inputs),
        "users": users,
        "candidates": candidates,
        "split_matmuls": record.split_matmuls,
        "inputs": [input_spec_dict(s) for s in record.inputs],
        "layers": layers,
        "split_layers": list(record.split_layers),
        "hoisted": list(record.hoisted),
        "broadcasts": [{"source": b.source, "at": b.at} for b in record.broadcasts],
        "refused": [{"node": r.node, "op": r.op, "location": r.location, "reason": r.reason} for r in record.refused],
        "recovered": [{"node": r.node, "op": r.op, "location": r.location, "reason": r.reason}
                      for r in getattr(record, "recovered", ())],
        "flops": {
            "method": "torch.utils.flop_counter",
            "before": before,
            "after": after,
            "speedup": before / after if after else None,
            "layers_before": layers_before,
            "layers_after": layers_after,
            "layers_speedup": layers_before / layers_after if layers_after else None,
        },
    }
    if audit:
        _add_audit(report, model, T, traced, users, candidates, seed, user_inputs)
    if catalog_size is not None:
        report["item_cache"] = item_cache_report(T, catalog_size, catalog_inputs, candidates=candidates,
                                                 flops_after=after)
    if include_nodes:
        report["nodes"] = _nodes(T)
    return report


def item_cache_report(T: fx.GraphModule, catalog_size: int, catalog_inputs: Optional[Sequence[str]] = None, *,
                      candidates: int = 1000, flops_after: Optional[int] = None) -> Dict[str, Any]:
    """The trade-off of an item cache (:func:`mari_fx.precompute_items`) for ``catalog_size`` items:
    per cached value its width, bytes for M rows and FLOPs saved per candidate, planned on ``T``'s
    example item rows (nothing is evaluated over a catalog).

    Example:
        >>> import torch, mari_fx
        >>> from mari_fx.testing.examples import CoarseRanker
        >>> T = mari_fx.transform(CoarseRanker().eval(), ["user"], (torch.randn(4, 16), torch.randn(4, 8)))
        >>> r = item_cache_report(T, 100_000)
        >>> [(v["source"], v["width"], v["bytes"], v["flops_saved_per_candidate"]) for v in r["values"]]
        [('fusion.0 (item product)', 64, 25600000, 1024)]
    """
    from ..deploy.precompute import BYTE_COST, plan_item_cache
    from ..analysis.tags import Side

    if catalog_size < 1:
        raise DeclarationError(f"the catalog size must be >= 1, got {catalog_size}")
    spec = T.meta["mari_fx.request"]
    names = list(catalog_inputs) if catalog_inputs else [
        s.name for s in spec.inputs if s.side != Side.USER and s.kind in ("tensor", "dict", "packed")]
    by_source = {s.source: s.name for s in spec.inputs}
    names = [by_source.get(n, n) for n in names]
    example = T.meta.get("mari_fx.example") or {}
    unknown = [n for n in names if n not in example or any(s.name == n and s.side == Side.USER for s in spec.inputs)]
    if unknown or not names:
        raise DeclarationError(f"catalog input(s) {unknown} are not item inputs of the model; item inputs: "
                               f"{[s.name for s in spec.inputs if s.side != Side.USER]}")
    plan = plan_item_cache(T, names, {n: example[n] for n in names})
    values = [dict(dataclasses.asdict(r), bytes=r.bytes_per_row * catalog_size) for r in plan.records]
    saved = sum(v["flops_saved_per_candidate"] for v in values)
    return {
        "catalog_size": catalog_size,
        "catalog_inputs": names,
        "byte_cost": BYTE_COST,
        "values": values,
        "bytes": sum(v["bytes"] for v in values),
        "gather_bytes_per_candidate": sum(v["bytes_per_row"] for v in values),
        "flops_saved_per_candidate": saved,
        "flops_after_with_cache": None if flops_after is None else flops_after - candidates * saved,
    }


def _add_audit(report: Dict[str, Any], model: nn.Module, T: fx.GraphModule, traced: Optional[fx.GraphModule],
               users: int, candidates: int, seed: int, user_inputs: Sequence[str]) -> None:
    from .audit import measure, retrace

    result = measure(traced if traced is not None else retrace(model, T, user_inputs), T, users=users,
                     candidates=candidates, seed=seed)
    for row, layer in zip(report["layers"], result.layers):
        row["measured_user_columns"] = layer.measured_user_columns
        row["lost_at"] = layer.lost_at
        row["flops_attainable"] = layer.flops_attainable
    summary = result.to_dict()
    del summary["layers"]  # merged into the layer rows above
    report["audit"] = summary


def _why_not(layer) -> str:
    """The record's reason, filled in for layers the record leaves blank: a reader
    of the table should never see a kept layer without an explanation."""
    if layer.reason:
        return layer.reason
    if layer.action == "kept" and layer.user_columns == 0 and layer.mixed_columns == 0:
        return "item-only input"
    if layer.action == "const":
        return "constant input (runs once per request)"
    return ""


def _measure(model: nn.Module, T: fx.GraphModule, users: int, candidates: int, seed: int) -> tuple:
    from .verify import random_request

    request = random_request(T, users, candidates, seed)
    pairs = request_to_pairs(T, request)
    return count_flops(model, **pairs), count_flops(T, **request)


def _nodes(T: fx.GraphModule) -> List[Dict[str, Any]]:
    modules = dict(T.named_modules())
    out = []
    for n in T.graph.nodes:
        if n.op in ("output", "get_attr"):
            continue
        tag = n.meta.get(TAG_KEY)
        out.append({
            "name": n.target if n.op == "placeholder" else n.name,  # placeholders: the request key
            "op": n.op if n.op == "placeholder" else describe_target(n, modules.get(n.target)),
            "target": str(n.target) if n.op in ("placeholder", "call_module", "call_method") else None,
            "rows": n.meta.get(ROWS_KEY),
            "tag": str(tag) if tag is not None else None,
        })
    return out


def report(model: nn.Module, user_inputs: Sequence[str], example_inputs: Sequence[Any] = (),
           example_kwargs: Optional[Dict[str, Any]] = None, *, users: int = 1, candidates: int = 1000,
           split_matmuls: bool = True, include_nodes: bool = False, target: Optional[str] = None,
           audit: bool = False) -> Dict[str, Any]:
    """Transform ``model`` and build its report in one call (what ``mari-fx report`` does);
    ``audit=True`` adds the measured audit (see :func:`build_report`).

    Example:
        >>> import torch
        >>> from mari_fx.testing.examples import CoarseRanker
        >>> r = report(CoarseRanker().eval(), ["user"], (torch.randn(4, 16), torch.randn(4, 8)), candidates=10)
        >>> r["split_layers"], r["hoisted"]
        (['fusion.0'], ['user_tower.0', 'user_tower.1', 'user_tower.2', 'user_tower.3'])
    """
    from ..api import trace, transform

    traced = trace(model, list(user_inputs), example_inputs, example_kwargs) if audit else None
    if traced is not None:
        T = transform(traced, split_matmuls=split_matmuls)
    else:
        T = transform(model, list(user_inputs), example_inputs, example_kwargs, split_matmuls=split_matmuls)
    with torch.no_grad():
        return build_report(model, T, users=users, candidates=candidates, include_nodes=include_nodes,
                            target=target, user_inputs=user_inputs, audit=audit, traced=traced)
