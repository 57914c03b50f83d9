"""The audit: what MaRI could still save, measured on data, and where the proof lost it.

The tagging pass *proves* which input columns of every Linear / matmul are user-only;
the audit *measures* them.  It runs the pair-shaped traced graph (from
:func:`mari_fx.trace`) on a ragged probe batch -- several users, each with its own
number of candidates, fresh random rows drawn like the example (ids within the
example's range per column, floats with its mean and std per column) -- and records,
for every node whose value is a batched tensor, which of its elements are
**user-derivable**: equal across all pairs of each user, and not constant over the
pairs of users with >= 2 pairs (a dead ReLU unit or a padding column is a data
accident, not user data).

Per layer (one per :class:`~mari_fx.report.record.LayerRecord`):

* ``measured_user_columns``: input features user-derivable at every position of a
  sample (a 3-d input ``[B, L, E]`` counts feature ``e`` only if all ``L`` positions are);
* ``lost_at``: where ``measured`` exceeds what the rewrite runs at U rows (the proof's
  ``user_columns``, or a split's ``split_user_features`` when larger), the node upstream
  where the proof lost the user elements: the first node, walking up from the layer's
  input through nodes whose measured user elements are tagged other than USER, none of
  whose own inputs lost any (e.g. an op with no rule);
* ``flops_attainable``: the layer's FLOPs if every measured user column ran at U rows.

``realised = (before - after) / (before - attainable)`` over the layer rows.  The probe
is a measurement, not a proof: the audit never drives a rewrite.  Two probes with
different seeds are run; an element counts only if it is equal per user in both (and
varies in at least one).  See docs/report.md.
"""
from __future__ import annotations

import operator
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..registry import with_extensions_of_arguments
from .. import registry
from ..errors import DeclarationError
from ..analysis.example_prop import VALUE_KEY, TensorInfo
from ..frontend.inputs import REQUEST_KEY, USER_INDEX, RequestSpec, batch_ops
from .record import RECORD_KEY, LayerRecord, Record
from ..analysis.rules import describe_target
from ..analysis.tags import TAG_KEY, Side, TensorTag

from ..meta import EXAMPLE_KEY

PROBE_USERS = 48
MAX_CANDIDATES = 6  # user k gets 1 + k % MAX_CANDIDATES candidates: 168 pairs for 48 users
PROBE_SEEDS = 2  # probes with seeds seed, seed + 1, ...: an element must be equal per user in all of them


# --------------------------------------------------------------------------- results
@dataclass(frozen=True)
class LayerAudit:
    """One layer of the record, proved against measured.

    ``user_columns`` is the proof's count (the record's), ``measured_user_columns`` the
    probe's; ``flops_*`` are per request at the audit's U users, N candidates.
    """

    name: str
    op: str
    in_features: int
    out_features: int
    action: str
    user_columns: int
    measured_user_columns: int
    lost_at: str
    short: bool  # measured user columns the rewrite does not run at U rows
    flops_before: int
    flops_after: int
    flops_attainable: int


@dataclass(frozen=True)
class AuditResult:
    """The audit of one transformed module (see the module docstring).

    ``flops_before`` / ``flops_after`` / ``flops_attainable`` are sums over the layer rows
    (the report's ``flops.layers_before`` / ``flops.layers_after``).
    """

    layers: Tuple[LayerAudit, ...]
    probe_users: int
    probe_pairs: int
    probe_data: str  # "fresh" (drawn like the example) or "resampled" (rows of the example)
    users: int
    candidates: int
    flops_before: int
    flops_after: int
    flops_attainable: int

    @property
    def realised(self) -> float:
        """``(before - after) / (before - attainable)``; 1.0 when nothing is attainable."""
        room = self.flops_before - self.flops_attainable
        return 1.0 if room <= 0 else (self.flops_before - self.flops_after) / room

    @property
    def layers_short(self) -> Tuple[str, ...]:
        """Layers with more measured user columns than the rewrite runs at U rows."""
        return tuple(l.name for l in self.layers if l.short)

    def to_dict(self) -> Dict[str, Any]:
        """The report's ``audit`` object, plus the per-layer rows under ``layers``."""
        return {
            "probe": {"users": self.probe_users, "pairs": self.probe_pairs, "probes": PROBE_SEEDS,
                      "data": self.probe_data},
            "flops_after_attainable": self.flops_attainable,
            "realised": self.realised,
            "layers_short": list(self.layers_short),
            "layers": [asdict(l) for l in self.layers],
        }

    def table(self) -> str:
        """One line per layer: name, proved and measured user columns, where the proof lost them."""
        w = max([5] + [len(l.name) for l in self.layers])
        lines = [f"{'layer':<{w}} {'in':>6} {'proved':>7} {'measured':>9}  lost at"]
        for l in self.layers:
            lines.append(f"{l.name:<{w}} {l.in_features:>6} {l.user_columns:>7} {l.measured_user_columns:>9}  {l.lost_at}".rstrip())
        lines.append(f"realised {self.realised:.3f} of the attainable saving (layer FLOPs at U={self.users}, "
                     f"N={self.candidates}: before {self.flops_before:,}, after {self.flops_after:,}, "
                     f"attainable {self.flops_attainable:,})")
        return "\n".join(lines)


# --------------------------------------------------------------------------- public entry
def audit(model: Any, user_inputs: Optional[Sequence[Any]] = None, example_inputs: Sequence[Any] = (),
          example_kwargs: Optional[Mapping[str, Any]] = None, *, T: Optional[fx.GraphModule] = None,
          users: int = 1, candidates: int = 1000, probe_users: int = PROBE_USERS, seed: int = 0,
          split_matmuls: bool = True, leaf_modules: Optional[Sequence[type]] = None) -> AuditResult:
    """Measure how many user-only input columns every Linear / matmul has, next to what mari_fx proved.

    Args:
        model: the pair-shaped model (with ``user_inputs`` and an example, as for
            :func:`mari_fx.transform`), or a GraphModule from :func:`mari_fx.trace`.
        T: the transformed module to judge (default: ``mari_fx.transform`` of the trace);
            it must come from the same model and declarations.
        users / candidates: U and N of the request the FLOPs are counted for.
        probe_users: users in each probe batch (user k has ``1 + k % 6`` candidates).
        seed: seed of the first probe (the second uses ``seed + 1``).
        split_matmuls: passed to ``transform`` when ``T`` is not given.
        leaf_modules: passed to :func:`mari_fx.trace` (as ``T`` was made).

    Returns:
        An :class:`AuditResult`: per layer ``user_columns`` (proved) and
        ``measured_user_columns``, ``lost_at``, and ``realised``.  Never changes a rewrite.

    Example:
        >>> import torch
        >>> from mari_fx.testing.examples import CoarseRanker
        >>> a = audit(CoarseRanker().eval(), ["user"], (torch.randn(4, 16), torch.randn(4, 8)))
        >>> [(l.name, l.user_columns, l.measured_user_columns) for l in a.layers]
        [('user_tower.0', 16, 16), ('user_tower.2', 64, 64), ('fusion.0', 32, 32), ('fusion.2', 0, 0), ('fusion.4', 0, 0)]
        >>> round(a.realised, 3), a.layers_short
        (1.0, ())
    """
    from ..api import is_tagged, trace, transform

    if is_tagged(model):
        if user_inputs is not None:
            raise DeclarationError("this GraphModule is already tagged by mari_fx.trace: call audit(gm) without "
                                   "user_inputs (declarations were fixed when it was traced)")
        tagged = model
    else:
        if user_inputs is None:
            raise DeclarationError("user_inputs is required unless model comes from mari_fx.trace")
        tagged = trace(model, user_inputs, example_inputs, example_kwargs, leaf_modules=leaf_modules)
    if T is None:
        T = transform(tagged, split_matmuls=split_matmuls)
    return measure(tagged, T, users=users, candidates=candidates, probe_users=probe_users, seed=seed)


@with_extensions_of_arguments
def measure(tagged: fx.GraphModule, T: fx.GraphModule, *, users: int = 1, candidates: int = 1000,
            probe_users: int = PROBE_USERS, seed: int = 0) -> AuditResult:
    """The audit of ``T`` measured on ``tagged``, the traced graph ``T`` was lowered from."""
    record: Optional[Record] = getattr(T, "meta", {}).get(RECORD_KEY)
    if record is None:
        raise DeclarationError(f"{type(T).__name__} carries no mari_fx record: pass a module made by mari_fx.transform")
    if not 1 <= users <= candidates:
        raise DeclarationError(f"need 1 <= users <= candidates, got users={users}, candidates={candidates}")
    if probe_users < 2:
        raise DeclarationError(f"probe_users must be >= 2 (user data is told apart across users), got {probe_users}")
    masks, pairs, data = _measure_elements(tagged, probe_users, seed)
    nodes = _layer_nodes(tagged)
    modules = dict(tagged.named_modules())
    layers = []
    for rec in record.layers:
        found = nodes.get(rec.name)
        x = found.pop(0) if found else None
        measured = _user_columns(x, masks) if x is not None else 0
        short = measured > _covered(rec)
        lost = _lost_at(x, masks, modules) if x is not None and short else ""
        before, after = rec.flops(users, candidates, False), rec.flops(users, candidates, True)
        layers.append(LayerAudit(
            name=rec.name, op=rec.op, in_features=rec.in_features, out_features=rec.out_features, action=rec.action,
            user_columns=rec.user_columns, measured_user_columns=measured, lost_at=lost, short=short, flops_before=before,
            flops_after=after, flops_attainable=_attainable(rec, max(measured, rec.user_columns), users, candidates,
                                                             after)))
    return AuditResult(
        layers=tuple(layers), probe_users=probe_users, probe_pairs=pairs, probe_data=data, users=users,
        candidates=candidates, flops_before=sum(l.flops_before for l in layers),
        flops_after=sum(l.flops_after for l in layers), flops_attainable=sum(l.flops_attainable for l in layers))


def retrace(model: nn.Module, T: fx.GraphModule, user_inputs: Sequence[Any] = ()) -> fx.GraphModule:
    """``mari_fx.trace`` of ``model`` as ``T`` was made: its declarations (``user_inputs``, or
    read off ``T``'s request spec) and its example inputs (kept in ``T.meta``)."""
    from ..api import is_tagged, trace
    from ..frontend.inputs import request_to_pairs

    if is_tagged(model):
        return model
    example = getattr(T, "meta", {}).get(EXAMPLE_KEY)
    if not example:
        raise DeclarationError("T carries no example inputs: pass a module made by mari_fx.transform")
    spec: RequestSpec = T.meta[REQUEST_KEY]
    rows = next(batch_ops(v).rows(v) for v in example.values())
    kwargs = request_to_pairs(spec, {**example, USER_INDEX: torch.arange(rows)})
    return trace(model, list(user_inputs) or _selectors(spec), (), kwargs)


def _selectors(spec: RequestSpec) -> List[Any]:
    """Selectors that declare the user-side inputs of ``spec`` again."""
    from ..frontend.inputs import Arg, Columns, Key

    out: List[Any] = []
    for s in spec.user_inputs:
        keys = getattr(s, "keys", None)
        if keys:  # an extension's keyed input (e.g. a KJT): its keys, one selector each
            out += [Key(s.arg, k) for k in keys]
        elif s.key is not None:
            out.append(Key(s.arg, s.key))
        elif s.columns is not None:
            for a, b in _runs(s.columns):
                out.append(Columns(s.arg, a, b))
        else:
            out.append(Arg(s.arg))
    return out


def _runs(cols: Sequence[int]) -> List[Tuple[int, int]]:
    runs: List[List[int]] = []
    for c in cols:
        if runs and runs[-1][1] == c:
            runs[-1][1] = c + 1
        else:
            runs.append([c, c + 1])
    return [(a, b) for a, b in runs]


def _covered(rec: LayerRecord) -> int:
    """Input columns the rewrite already runs at U rows: the proof's, or more where a lowering
    split structure the column tags do not show (field blocks: ``split_user_features``)."""
    if rec.action == "hoisted":
        return rec.in_features
    if rec.action == "split":
        return max(rec.user_columns, rec.split_user_features)
    return rec.user_columns


# --------------------------------------------------------------------------- FLOPs
def _attainable(rec: LayerRecord, user_cols: int, users: int, candidates: int, after: int) -> int:
    """The layer's FLOPs with ``user_cols`` input columns at U rows and the rest at N rows;
    never more than what the rewrite already achieves (a split may fold columns, e.g. q - k)."""
    per_row = 2 * rec.out_features * rec.rows_per_sample
    if rec.in_features and user_cols >= rec.in_features:
        best = per_row * users * rec.in_features
    else:
        best = per_row * (users * user_cols + candidates * (rec.in_features - user_cols))
    return min(after, best)


# --------------------------------------------------------------------------- probe
Masks = Dict[fx.Node, Tuple[torch.Tensor, torch.Tensor]]  # node -> (equal per user, varies) per element


def _measure_elements(tagged: fx.GraphModule, probe_users: int, seed: int) -> Tuple[Masks, int, str]:
    """Per batched-tensor node, ``(equal per user in every probe, varies in some probe)``."""
    out: Masks = {}
    pairs, data = 0, "fresh"
    for k in range(PROBE_SEEDS):
        flat, index, data_k = _run_probe(tagged, probe_users, seed + k)
        pairs = int(index.numel())
        data = "resampled" if data_k == "resampled" else data
        for node, (eq, var) in flat.items():
            if k == 0:
                out[node] = (eq, var)
            elif node in out:
                eq0, var0 = out[node]
                if eq0.shape != eq.shape:  # e.g. padded to the batch's longest sequence: not comparable
                    out[node] = (torch.zeros_like(eq0), var0)
                else:
                    out[node] = (eq0 & eq, var0 | var)
    return out, pairs, data


def _run_probe(tagged: fx.GraphModule, probe_users: int, seed: int) -> Tuple[Masks, torch.Tensor, str]:
    index = _user_index(probe_users, seed)
    inputs = probe_inputs(tagged, index, seed, fresh=True)
    rec = _ElementRecorder(tagged, index)
    try:
        with torch.no_grad():
            rec.run(*inputs)
        return rec.masks, index, "fresh"
    except Exception:  # fresh values the model rejects (e.g. ids a lookup needs sorted): use example rows
        rec = _ElementRecorder(tagged, index)
        with torch.no_grad():
            rec.run(*probe_inputs(tagged, index, seed, fresh=False))
        return rec.masks, index, "resampled"


def _user_index(probe_users: int, seed: int) -> torch.Tensor:
    """Ragged: user k has ``1 + k % MAX_CANDIDATES`` candidates; pairs in random order."""
    g = torch.Generator().manual_seed(seed)
    counts = 1 + torch.arange(probe_users) % MAX_CANDIDATES
    index = torch.repeat_interleave(torch.arange(probe_users), counts)
    return index[torch.randperm(index.numel(), generator=g)]


@with_extensions_of_arguments
def probe_inputs(tagged: fx.GraphModule, user_index: torch.Tensor, seed: int = 0, fresh: bool = True) -> List[Any]:
    """Pair-shaped flat inputs of ``tagged`` (placeholder order) for the users of ``user_index``.

    One row per user for user-side inputs, gathered by ``user_index``; one row per pair for
    item-side ones.  ``fresh``: drawn like the example (per column: integer ids uniform within
    the example's min..max, floats with its mean and std, bools with its rate); else rows
    resampled from the example.

    Example:
        >>> import torch, mari_fx
        >>> from mari_fx.testing.examples import CoarseRanker
        >>> gm = mari_fx.trace(CoarseRanker().eval(), ["user"], (torch.randn(4, 16), torch.randn(4, 8)))
        >>> user, item = probe_inputs(gm, torch.tensor([0, 1, 1, 2]))
        >>> torch.equal(user[1], user[2]), torch.equal(user[0], user[1]), item.shape
        (True, False, torch.Size([4, 8]))
    """
    spec: RequestSpec = tagged.meta[REQUEST_KEY]
    example = tagged.meta[EXAMPLE_KEY]
    g = torch.Generator().manual_seed(seed)
    num_users = int(user_index.max()) + 1
    by_name: Dict[str, Any] = {}
    for s in spec.inputs:
        ex = example[s.name]
        ops = batch_ops(ex)
        rows = num_users if s.side == Side.USER else user_index.numel()
        if fresh:
            value = _fresh(ex, rows, g)
        else:
            value = ops.take(ex, torch.randint(ops.rows(ex), (rows,), generator=g))
        by_name[s.name] = ops.take(value, user_index) if s.side == Side.USER else value
    return [by_name[n.target] for n in tagged.graph.nodes if n.op == "placeholder"]


_FRESH = registry.PROBE_TYPES


def register_probe_type(predicate: Callable[[Any], bool], fresh: Callable[[Any, int, torch.Generator], Any],
                        priority: int = 0) -> None:
    """Teach the probe to draw ``rows`` fresh rows like the example value ``v`` of a non-tensor
    input type: ``fresh(v, rows, generator)``.  Unknown types are resampled from the example."""
    _FRESH.add(predicate, fresh, priority=priority)


def _fresh(ex: Any, rows: int, g: torch.Generator) -> Any:
    if isinstance(ex, torch.Tensor):
        return _fresh_tensor(ex, rows, g)
    for fresh in _FRESH.matching(ex):
        return fresh(ex, rows, g)
    ops = batch_ops(ex)
    return ops.take(ex, torch.randint(ops.rows(ex), (rows,), generator=g))


def _fresh_tensor(ex: torch.Tensor, rows: int, g: torch.Generator) -> torch.Tensor:
    shape = (rows,) + tuple(ex.shape[1:])
    if ex.numel() == 0 or ex.is_complex():
        return ex.new_zeros(shape) if ex.numel() == 0 else ex[torch.randint(ex.shape[0], (rows,), generator=g)]
    cols = ex.reshape(-1, ex.shape[-1]) if ex.dim() >= 2 else ex.reshape(-1, 1)
    stat_shape = (ex.shape[-1],) if ex.dim() >= 2 else ()
    u = torch.rand(shape, generator=g, dtype=torch.float64)
    if ex.dtype == torch.bool:
        return u < cols.double().mean(0).reshape(stat_shape)
    if not ex.is_floating_point():  # ids and codes: uniform within the example's range, per column
        lo, hi = cols.amin(0).double().reshape(stat_shape), cols.amax(0).double().reshape(stat_shape)
        return torch.minimum(lo + torch.floor(u * (hi - lo + 1)), hi).to(ex.dtype)
    c = cols.double()
    mean, std = c.mean(0).reshape(stat_shape), (c.std(0) if c.shape[0] > 1 else torch.zeros_like(c[0]))
    return (torch.randn(shape, generator=g, dtype=torch.float64) * std.reshape(stat_shape) + mean).to(ex.dtype)


def _is_kjt(v: Any) -> bool:
    return type(v).__name__ == "KeyedJaggedTensor" and hasattr(v, "to_dict")


def _fresh_kjt(kjt: Any, rows: int, g: torch.Generator) -> Any:
    """Per key: bag lengths within the example's min..max, ids within its min..max (weights: mean, std)."""
    d = kjt.to_dict()
    weighted = kjt.weights_or_none() is not None
    values, weights, lengths = [], [], []
    for k in kjt.keys():
        jt = d[k]
        ln, v = jt.lengths(), jt.values()
        lo, hi = (int(ln.min()), int(ln.max())) if ln.numel() else (0, 0)
        l = torch.randint(lo, hi + 1, (rows,), generator=g).to(ln.dtype)
        n = int(l.sum())
        vlo, vhi = (int(v.min()), int(v.max())) if v.numel() else (0, 0)
        values.append(torch.randint(vlo, vhi + 1, (n,), generator=g).to(v.dtype))
        lengths.append(l)
        if weighted:
            w = jt.weights()
            mean, std = (float(w.mean()), float(w.std())) if w.numel() > 1 else (float(w.sum()), 0.0)
            weights.append((torch.randn(n, generator=g, dtype=torch.float64) * std + mean).to(w.dtype))
    return type(kjt)(keys=list(kjt.keys()), values=torch.cat(values), lengths=torch.cat(lengths),
                     weights=torch.cat(weights) if weighted else None, stride=rows)


register_probe_type(_is_kjt, _fresh_kjt)


class _ElementRecorder(fx.Interpreter):
    """Runs a pair-shaped traced graph and keeps, per node whose value is a batched tensor
    (dim 0 is the pair batch), which elements are equal across the pairs of each user and
    which vary over the batch.  Keeps masks, not values."""

    def __init__(self, gm: fx.GraphModule, user_index: torch.Tensor):
        super().__init__(gm)
        self.pairs = user_index.numel()
        num_users = int(user_index.max()) + 1
        first = torch.full((num_users,), self.pairs, dtype=torch.int64)
        first.scatter_reduce_(0, user_index, torch.arange(self.pairs), reduce="amin")
        self.rep = first[user_index]  # each pair's user's first pair
        # Variation counts only among users with >= 2 pairs: a mixed value that is constant except
        # on single-pair users (a ReLU unit that rarely fires) would otherwise pass as user data.
        self.multi = (torch.bincount(user_index, minlength=num_users) >= 2)[user_index]
        example = next(iter(gm.meta.get(EXAMPLE_KEY, {}).values()), None)
        self.example_rows = batch_ops(example).rows(example) if example is not None else None
        self.masks: Masks = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if n.op != "output" and self._is_batched(n, result):
            self.masks[n] = _element_masks(result, self.rep, self.multi)
        return result

    def _is_batched(self, n: fx.Node, value: Any) -> bool:
        """dim 0 is the pair batch: it has the probe's size here and had the example's when traced."""
        if not (isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == self.pairs):
            return False
        if getattr(n.meta.get(TAG_KEY), "side", Side.MIXED) == Side.CONST:
            return False
        info = n.meta.get(VALUE_KEY)
        return not isinstance(info, TensorInfo) or self.example_rows is None or info.shape[:1] == (self.example_rows,)


_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def _element_masks(x: torch.Tensor, rep: torch.Tensor, multi: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(equal per user, varies)`` per element of a sample (shape ``x.shape[1:]``): equal across
    the pairs of each user; not constant over the pairs of users with >= 2 pairs (``multi``).

    Floats compare within a relative tolerance of the element's largest magnitude over the
    batch: identical rows may round differently in different positions of a GEMM."""
    if x.dtype == torch.bool:
        x = x.to(torch.uint8)
    if not x.is_floating_point():
        xm = x[multi]
        return (x == x[rep]).all(0), (xm != xm[:1]).any(0)
    xd = x.double()
    nan = torch.isnan(xd)
    scale = torch.nan_to_num(xd.abs(), nan=0.0, posinf=0.0).amax(0)
    tol = _RTOL.get(x.dtype, 1e-5) * scale
    same = ((xd - xd[rep]).abs() <= tol) | (xd == xd[rep]) | (nan & nan[rep])
    xm, nm = torch.nan_to_num(xd[multi], nan=0.0), nan[multi]
    spread = (xm.amax(0) - xm.amin(0)) if xm.shape[0] else torch.zeros_like(scale)
    var = (spread > tol) | (nm.any(0) & ~nm.all(0))
    return same.all(0), var


def _user_derivable(masks: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    eq, var = masks
    return eq & var


def _user_columns(x: fx.Node, masks: Masks) -> int:
    """Features (last dim) equal per user at every position of a sample, and varying at some
    position or proved USER: a proved-USER feature that the probe finds constant (a dead unit)
    is still user data, while constancy screens out data accidents among the others."""
    m = masks.get(x)
    if m is None or m[0].dim() == 0:
        return 0
    eq, var = m
    c = eq.shape[-1]
    proved = _proved_user(x, tuple(eq.shape)).reshape(-1, c).all(0)
    return int((eq.reshape(-1, c).all(0) & (var.reshape(-1, c).any(0) | proved)).sum())


# --------------------------------------------------------------------------- layers and losses
_MATMULS = {torch.matmul, operator.matmul, torch.mm, "matmul", "mm", "__matmul__", torch.ops.aten.matmul.default,
            torch.ops.aten.mm.default}


def _linear_input(n: fx.Node, modules: Mapping[str, nn.Module]) -> Optional[fx.Node]:
    """The input ``x`` of a Linear-like node (as the split sees it), else None."""
    def arg(i: int, name: str) -> Any:
        return n.args[i] if len(n.args) > i else n.kwargs.get(name)

    if n.op == "call_module" and isinstance(modules.get(n.target), nn.Linear):
        x = arg(0, "input")
    elif n.op in ("call_function", "call_method") and n.target in (F.linear, torch.ops.aten.linear.default):
        x = arg(0, "input")
    elif n.op in ("call_function", "call_method") and n.target in _MATMULS:
        x = arg(0, "input")
    elif n.op == "call_function" and n.target is torch.addmm:
        x = arg(1, "mat1")
    else:
        return None
    return x if isinstance(x, fx.Node) else None


def _layer_nodes(gm: fx.GraphModule) -> Dict[str, List[fx.Node]]:
    """Layer name (as the record names it: module path, else node name) -> inputs, in graph order."""
    modules = dict(gm.named_modules())
    out: Dict[str, List[fx.Node]] = {}
    for n in gm.graph.nodes:
        x = _linear_input(n, modules)
        if x is not None:
            out.setdefault(n.target if n.op == "call_module" else n.name, []).append(x)
    return out


def _proved_user(n: fx.Node, shape: Tuple[int, ...]) -> torch.Tensor:
    """Per element of a sample: does ``n``'s tag prove it USER?"""
    tag = n.meta.get(TAG_KEY)
    if isinstance(tag, TensorTag) and tag.is_segmented and len(shape) >= 1 and tag.width == shape[-1]:
        cols = torch.tensor([s.side == Side.USER for s in tag.segments for _ in range(s.width)])
        return cols.expand(shape)
    return torch.full(shape, getattr(tag, "side", Side.MIXED) == Side.USER)


def _lost(n: fx.Node, masks: Masks) -> bool:
    m = masks.get(n)
    if m is None:
        return False
    ud = _user_derivable(m)
    return bool((ud & ~_proved_user(n, tuple(ud.shape))).any())


def _lost_at(x: fx.Node, masks: Masks, modules: Mapping[str, nn.Module]) -> str:
    """``"node (op)"``: where the user elements reaching ``x`` stopped being proved USER."""
    if not _lost(x, masks):
        return ""
    node, seen = x, {x}
    while True:
        up = next((a for a in node.all_input_nodes if a not in seen and _lost(a, masks)), None)
        if up is None:
            break
        seen.add(up)
        node = up
    if node.op == "placeholder":
        return f"{node.name} (input)"
    return f"{node.name} ({describe_target(node, modules.get(node.target) if node.op == 'call_module' else None)})"
