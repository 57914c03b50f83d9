"""Analysis pass: tag every node USER / ITEM / MIXED / CONST (the graph colouring).

Walks the graph in order; placeholders take their side from the declaration,
parameters are CONST, and every other node asks its rule in
:mod:`mari_fx.analysis.rules`.  Writes ``node.meta["mari_fx.tag"]`` (and
``"mari_fx.note"`` where a rule refused to keep user-only work user-only).
"""
from __future__ import annotations

import torch.fx as fx

from .elements import propagate_elements
from .example_prop import VALUE_KEY, TensorInfo
from ..frontend.inputs import RequestSpec
from .rules import RuleContext, lookup, unknown
from .tags import CONST, NOTE_KEY, TAG_KEY, Side, TensorTag


def propagate_tags(gm: fx.GraphModule, spec: RequestSpec) -> fx.GraphModule:
    """Tag every node of a flat-input graph that :class:`ExampleProp` has run on.

    Example:
        >>> import torch, torch.fx as fx
        >>> from mari_fx.frontend.inputs import flatten_inputs
        >>> from mari_fx.analysis.example_prop import ExampleProp
        >>> class M(torch.nn.Module):
        ...     def forward(self, u, i):
        ...         return torch.cat([u.relu(), i], -1)
        >>> gm = fx.symbolic_trace(M())
        >>> spec, ex = flatten_inputs(gm, ["u"], {"u": torch.ones(2, 3), "i": torch.ones(2, 4)})
        >>> _ = ExampleProp(gm).run(*ex.values())
        >>> _ = propagate_tags(gm, spec)
        >>> [str(n.meta["mari_fx.tag"]) for n in gm.graph.nodes if n.op != "output"]
        ['user', 'item', 'user', '[user:3, item:4]']
    """
    sides = {s.name: s.side for s in spec.inputs}
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        node.meta.pop(NOTE_KEY, None)
        if node.op == "placeholder":
            value = node.meta.get(VALUE_KEY)
            width = value.shape[-1] if isinstance(value, TensorInfo) and value.ndim >= 2 else None
            node.meta[TAG_KEY] = TensorTag.uniform(sides.get(node.target, Side.ITEM), width)
        elif node.op == "get_attr":
            node.meta[TAG_KEY] = CONST
        elif node.op == "output":
            continue
        else:
            module = modules.get(node.target) if node.op == "call_module" else None
            rule = lookup(node, module) or unknown
            node.meta[TAG_KEY] = rule(RuleContext(node, module))
    propagate_elements(gm)  # element maps where user data left the last dim (field layouts)
    return gm
