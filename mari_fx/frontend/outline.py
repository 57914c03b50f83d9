"""Module calls recovered from a torch.export graph.

torch.export inlines every module into ATen ops.  For the sequence modules mari_fx has rules for
(attention, Transformer layers, RNNs), the inlined ops lose what the rules know: an RNN becomes
``aten.gru.input`` over a zeros state with the batch in dim 1, ``MultiheadAttention`` folds the
batch with the heads and transposes it.  So these modules are exported with their call
signature preserved (``preserve_module_call_signature``), and :func:`outline_module_calls`
replaces each one's ops by one ``call_module`` of the model's own module, as torch.fx would have
traced it: the arguments and results are the ones the signature names.

A call is outlined only when its ops form a closed region (nothing outside reads an op inside
but its results) that can sit where its last argument is computed; anything else stays inlined
(correct, only less reach).
"""
from __future__ import annotations

import operator
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn as nn

# Module classes whose calls are kept whole: they have call rules (mari_fx.analysis.rules.sequence)
# that their ATen ops do not have.  Modules whose ATen ops carry their rules (Linear, LayerNorm,
# Embedding, Conv) need no preserving: export fails more often the more signatures it keeps.
LEAF_CALLS: Tuple[type, ...] = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerEncoder,
                                nn.TransformerDecoderLayer, nn.TransformerDecoder, nn.Transformer, nn.RNN, nn.GRU,
                                nn.LSTM)


def leaf_calls(model: nn.Module) -> Tuple[str, ...]:
    """Paths of the outermost modules of :data:`LEAF_CALLS` classes (own ``forward`` only: a
    subclass that redefines it is traced through) in ``model``.

    Example:
        >>> enc = nn.TransformerEncoderLayer(4, 1, batch_first=True)
        >>> leaf_calls(nn.Sequential(nn.Linear(4, 4), nn.TransformerEncoder(enc, 2), nn.GRU(4, 4)))
        ('1', '2')
    """
    found: List[str] = []
    for path, m in model.named_modules():
        if not path or any(path.startswith(p + ".") for p in found):
            continue
        base = next((c for c in LEAF_CALLS if isinstance(m, c)), None)
        if base is not None and type(m).forward is base.forward:
            found.append(path)
    return tuple(found)


def called_once(model: nn.Module, paths: Sequence[str], run: Callable[[], Any]) -> Tuple[str, ...]:
    """The modules of ``paths`` that ``run()`` (one forward of ``model``) calls exactly once: export
    cannot keep the signature of a module called several times (one GRU over two histories).

    Example:
        >>> m = nn.ModuleDict({"gru": nn.GRU(2, 2, batch_first=True)})
        >>> x = torch.randn(1, 3, 2)
        >>> called_once(m, ["gru"], lambda: m["gru"](x)), called_once(m, ["gru"], lambda: (m["gru"](x), m["gru"](x)))
        (('gru',), ())
    """
    if not paths:
        return ()  # nothing to count: no forward run
    counts = dict.fromkeys(paths, 0)

    def counter(path: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            counts[path] += 1
        return hook

    handles = [model.get_submodule(p).register_forward_pre_hook(counter(p)) for p in paths]
    try:
        run()
    except Exception:
        return ()
    finally:
        for h in handles:
            h.remove()
    return tuple(p for p in paths if counts[p] == 1)


def outline_module_calls(gm: fx.GraphModule, ep: Any, model: nn.Module, paths: Sequence[str]) -> List[str]:
    """Replace the inlined ops of each module call in ``paths`` (preserved when ``ep`` was exported
    from ``model``; ``gm = ep.module()``) by a ``call_module`` of ``model``'s module; returns the
    paths outlined.  :func:`mari_fx.frontend.capture.capture_with_export` calls it.

    Example:
        >>> from mari_fx.frontend.capture import capture_with_export
        >>> class M(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.gru = nn.GRU(2, 2, batch_first=True)
        ...     def forward(self, x):
        ...         return self.gru(x)[0] * len(x)   # len() of a traced value: torch.fx fails
        >>> gm = capture_with_export(M(), (torch.randn(3, 4, 2),), {})
        >>> [n.target for n in gm.graph.nodes if n.op == "call_module"]
        ['gru']
    """
    done: List[str] = []
    replaced: Dict[str, fx.Node] = {}  # results of outlined calls, by the names later signatures know them by
    for entry in ep.module_call_graph:
        if entry.fqn in paths and entry.signature is not None and _outline(gm, entry.fqn, entry.signature, replaced):
            parent, _, name = entry.fqn.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, name, model.get_submodule(entry.fqn))
            done.append(entry.fqn)
    if done:
        for n in reversed(list(gm.graph.nodes)):  # sizes only the outlined ops read
            if n.op == "call_function" and _is_size(n) and not n.users:
                gm.graph.erase_node(n)
        gm.graph.lint()
        gm.recompile()
    return done


class _Skip(Exception):
    pass


def _is_size(node: fx.Node) -> bool:
    return node.target is torch.ops.aten.sym_size.int or isinstance(
        node.meta.get("val"), (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool))


def _in_module(node: fx.Node, path: str) -> bool:
    stack = node.meta.get("nn_module_stack") or {}
    return any(p == path or p.startswith(path + ".") for p, _ in stack.values())


def _outline(gm: fx.GraphModule, path: str, sig: Any, replaced: Dict[str, fx.Node]) -> bool:
    from torch.export.graph_signature import ConstantArgument, TensorArgument
    from torch.utils._pytree import tree_flatten_with_path, tree_unflatten

    graph = gm.graph
    nodes = {**{n.name: n for n in graph.nodes}, **replaced}

    def leaf(a: Any) -> Any:
        if isinstance(a, ConstantArgument):
            return a.value
        if isinstance(a, TensorArgument) and a.name in nodes:
            return nodes[a.name]
        raise _Skip

    try:
        flat_in, outs = [leaf(a) for a in sig.inputs], [leaf(a) for a in sig.outputs]
    except _Skip:
        return False
    filed = [n for n in graph.nodes if n.op == "call_function" and _in_module(n, path)]
    # sizes and size arithmetic are shared between modules (export computes each once): one that
    # code outside reads stays (those left unread go afterwards)
    in_module = set(filed)
    region = [n for n in filed if not (_is_size(n) and any(u not in in_module for u in n.users))]
    inside = set(region)
    results = {o for o in outs if isinstance(o, fx.Node) and o in inside}
    if not region or any(u not in inside for n in region if n not in results for u in n.users):
        return False
    if any(isinstance(a, fx.Node) and a in inside for a in flat_in):
        return False  # an argument computed by ops export filed under the module itself
    order = {n: i for i, n in enumerate(graph.nodes)}
    args_at = max([order[a] for a in flat_in if isinstance(a, fx.Node)], default=-1)
    first_read = min([order[u] for r in results for u in r.users if u not in inside], default=len(order))
    if args_at >= first_read:  # the call cannot sit between its arguments and its readers
        return False
    anchor = next(n for n in graph.nodes if order[n] == args_at) if args_at >= 0 else \
        next(n for n in graph.nodes if n.op != "placeholder")
    args, kwargs = tree_unflatten(flat_in, sig.in_spec)
    with graph.inserting_after(anchor):
        call = graph.call_module(path, tuple(args), dict(kwargs))
    last = call
    for key_path, i in tree_flatten_with_path(tree_unflatten(list(range(len(outs))), sig.out_spec))[0]:
        out = outs[i]
        if out not in results:
            continue  # a constant, or an argument handed back: its readers keep it
        value = call
        for key in key_path:
            with graph.inserting_after(last):
                value = last = graph.call_function(operator.getitem, (value, getattr(key, "idx", getattr(key, "key", None))))
        out.replace_all_uses_with(value, delete_user_cb=lambda u: u not in inside)
        replaced[out.name] = value
    for n in reversed(region):  # graph order is topological: readers go first
        graph.erase_node(n)
    return True
