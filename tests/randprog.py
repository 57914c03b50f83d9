"""Random pair-shaped programs for the soundness property tests (tests/test_property_soundness.py).

A *program* is a list of steps; each step reads entries of a pool of values and (mostly) appends
one.  The pool starts with the model's inputs ``X`` [B, 6], ``t`` [B, 4] (float) and ``uid``,
``iid`` [B] (int64 ids).  :class:`RandomNet` interprets a program in ``forward``, so torch.fx traces
it into a plain graph of the ops drawn (the program is Python data, not traced).

Ops are grouped in *families* (``base``, ``inplace``, ``batch``, ``int``, ``mag``, ``args``,
``field``); a family test draws its own ops mixed with the ``base`` ops.  Adding an op is one
:func:`op`-decorated class with ``draw`` (pick operands and parameters from the pool, or return
None where it does not apply), optional ``build`` (modules / buffers) and ``run`` (the forward).

Pool entries carry a :class:`Meta`: the kind (``f`` [B, w] float, ``g`` [B, F, E] float, ``i``
[B] int64, ``b`` [B] bool), the shape past the batch dim, whether in-place ops may write it
(``root``: the pool index of the computed tensor whose storage it shares, -1 for inputs and their
views; ``writable``: False for expands and split outputs, which autograd or overlap rules forbid writing),
contiguity (for ``view``) and, for ints, a bound on the magnitude (so products never overflow).

:func:`check` runs one drawn example end to end and raises a :class:`Failure` subclass naming the
kind of failure: a silent wrong answer (:class:`Mismatch`, :class:`DtypeMismatch`,
:class:`ShapeMismatch`, :class:`RequestMutated`), a structural disagreement (:class:`RecordMismatch`),
or an error on a valid model (:class:`Crash`).

Run ``python tests/randprog.py FAMILY COUNT`` to harvest failing cases (grouped by failure).
"""
from __future__ import annotations

import copy
import math
import operator
import sys
import traceback
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

import mari_fx
from mari_fx.runtime.modules import SplitLinear

X_WIDTH, T_WIDTH = 6, 4
N_INPUTS = 4  # X, t, uid, iid
ID_RANGE = 100_000  # ids up to 1e5: uid * 1000003 is far beyond 2**24, products fit int64
EXAMPLE_ROWS = 5
FAMILIES = ("base", "inplace", "setitem", "batch", "int", "mag", "args", "field", "conv")


# --------------------------------------------------------------------------- pool metadata
@dataclass(frozen=True)
class Meta:
    kind: str  # "f" [B, w] float, "g" [B, F, E] float, "i" [B] int64, "b" [B] bool
    shape: Tuple[int, ...] = ()  # past the batch dim
    root: int = -1  # pool index of the computed tensor whose storage this shares; -1: an input's
    writable: bool = True
    contig: bool = True
    bound: int = 0  # ints: max |value|

    @property
    def width(self) -> int:
        return self.shape[-1]


def fresh(kind: str, shape: Tuple[int, ...] = (), k: int = 0, bound: int = 0) -> Meta:
    return Meta(kind, shape, root=k, contig=True, bound=bound)


def view_of(m: Meta, shape: Tuple[int, ...], contig: bool) -> Meta:
    return Meta(m.kind, shape, root=m.root, contig=contig and m.contig, bound=m.bound, writable=m.writable)


INPUT_METAS = [Meta("f", (X_WIDTH,)), Meta("f", (T_WIDTH,)), Meta("i", bound=ID_RANGE), Meta("i", bound=ID_RANGE)]


class Gen:
    """What an op's ``draw`` sees: the hypothesis ``draw``, the pool metas and the step index."""

    def __init__(self, draw, metas: List[Meta], focus: Optional[int], used: set):
        self.draw, self.metas, self.focus, self.used = draw, metas, focus, used

    @property
    def k(self) -> int:  # the pool index the step's output gets
        return len(self.metas)

    def pick(self, pred: Callable[[Meta], bool], prefer_focus: bool = True) -> Optional[int]:
        """Index of a pool entry satisfying ``pred``: the last mutated entry or one no step has
        read yet half of the time (so that most values reach an output)."""
        cands = [j for j, m in enumerate(self.metas) if pred(m)]
        if not cands:
            return None
        if prefer_focus and self.focus in cands and self.draw(st.booleans()):
            j = self.focus
        else:
            unread = [j for j in cands if j not in self.used]
            j = self.draw(st.sampled_from(unread if unread and self.draw(st.booleans()) else cands))
        self.used.add(j)
        return j

    def int_(self, lo: int, hi: int) -> int:
        return self.draw(st.integers(lo, hi))

    def choice(self, seq: Sequence[Any]) -> Any:
        return self.draw(st.sampled_from(list(seq)))


def is_f(m: Meta) -> bool:
    return m.kind == "f"


def is_g(m: Meta) -> bool:
    return m.kind == "g"


def is_int(m: Meta) -> bool:
    return m.kind in ("i", "b")


def writable_f(m: Meta) -> bool:
    return m.kind == "f" and m.root >= N_INPUTS and m.writable


def apart(g: "Gen", a: int) -> Callable[[Meta], bool]:
    """Entries that share no storage with entry ``a`` (the source of a write into a view of a)."""
    return lambda m: is_f(m) and (m.root < N_INPUTS or m.root != g.metas[a].root)


# --------------------------------------------------------------------------- op registry
class Op:
    families: Tuple[str, ...] = ()
    statement = False  # mutates an entry; the step appends that entry (a read of the mutated value)

    def draw(self, g: Gen) -> Optional[Tuple[tuple, Meta]]:
        raise NotImplementedError

    def build(self, net: "RandomNet", k: int, p: tuple) -> None:
        pass

    def run(self, net: "RandomNet", k: int, pool: List[Any], p: tuple) -> Any:
        raise NotImplementedError


OPS: Dict[str, Op] = {}


def op(name: str, *families: str):
    def deco(cls):
        inst = cls()
        inst.name, inst.families = name, families
        OPS[name] = inst
        return cls

    return deco


def ops_of(families: Sequence[str]) -> List[str]:
    return sorted(n for n, o in OPS.items() if set(o.families) & set(families))


# --------------------------------------------------------------------------- base: 2-D float ops
UNARY = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "double": lambda x: x * 2.0,
         "neg": lambda x: -x, "gelu": F.gelu}


@op("unary", "base")
class Unary(Op):
    table = UNARY

    def draw(self, g):
        a = g.pick(is_f)
        return (a, g.choice(sorted(self.table))), fresh("f", g.metas[a].shape, g.k)

    def run(self, net, k, pool, p):
        return self.table[p[1]](pool[p[0]])


# more elementwise ops, smooth where the generated values fall (no jump that round-off could cross)
UNARY2 = {"atan": torch.atan, "sinh": lambda x: torch.sinh(x.clamp(-3, 3)), "softsign": F.softsign,
          "log2": lambda x: torch.log2(x.abs() + 1.0), "clamp_min": lambda x: x.clamp_min(-0.5),
          "softshrink": F.softshrink, "expit": torch.special.expit}
BINARY2 = {"atan2": lambda x, y: torch.atan2(x, y.abs() + 0.5), "hypot": torch.hypot,
           "xlogy": lambda x, y: torch.xlogy(x, y.abs() + 1.0)}


@op("unary2", "base")
class Unary2(Unary):
    table = UNARY2


@op("binary2", "base")
class Binary2(Op):
    def draw(self, g):
        a = g.pick(is_f)
        b = g.pick(lambda m: is_f(m) and m.shape == g.metas[a].shape, prefer_focus=False)
        return (a, b, g.choice(sorted(BINARY2))), fresh("f", g.metas[a].shape, g.k)

    def run(self, net, k, pool, p):
        return BINARY2[p[2]](pool[p[0]], pool[p[1]])


@op("binary", "base")
class Binary(Op):
    def draw(self, g):
        a = g.pick(is_f)
        b = g.pick(lambda m: is_f(m) and m.shape == g.metas[a].shape, prefer_focus=False)
        return (a, b, g.choice(["add", "mul", "sub"])), fresh("f", g.metas[a].shape, g.k)

    def run(self, net, k, pool, p):
        x, y = pool[p[0]], pool[p[1]]
        return x + y if p[2] == "add" else x * y if p[2] == "mul" else x - y * 0.5


@op("cat", "base")
class Cat(Op):
    def draw(self, g):
        a = g.pick(is_f)
        others = [g.pick(is_f, prefer_focus=False) for _ in range(g.int_(1, 2))]
        w = sum(g.metas[j].width for j in [a] + others)
        return (a, tuple(others)), fresh("f", (w,), g.k)

    def run(self, net, k, pool, p):
        return torch.cat([pool[p[0]]] + [pool[j] for j in p[1]], dim=-1)


@op("slice", "base")
class Slice(Op):
    def draw(self, g):
        a = g.pick(is_f)
        w = g.metas[a].width
        lo = g.int_(0, w - 1)
        hi = g.int_(lo + 1, w)
        how = g.choice(["slice", "narrow"])
        return (a, lo, hi, how), view_of(g.metas[a], (hi - lo,), contig=(lo == 0 and hi == w))

    def run(self, net, k, pool, p):
        a, lo, hi, how = p
        return pool[a][:, lo:hi] if how == "slice" else pool[a].narrow(-1, lo, hi - lo)


@op("split", "base")
class Split(Op):
    def draw(self, g):
        a = g.pick(lambda m: is_f(m) and m.width >= 2)
        if a is None:
            return None
        w = g.metas[a].width
        first = g.int_(1, w - 1)
        part = g.int_(0, 1)
        # split outputs are multi-output views: autograd refuses in-place writes to them
        return (a, first, part, w), Meta("f", (first if part == 0 else w - first,), root=g.metas[a].root, contig=False, writable=False)

    def run(self, net, k, pool, p):
        a, first, part, w = p
        return torch.split(pool[a], [first, w - first], dim=-1)[part]


@op("rnncell", "base")
class RNNCellStep(Op):
    """One step of a recurrent cell: ``GRUCell(a, b)`` / ``RNNCell(a, b)`` (input a, state b), or
    ``LSTMCell(a, (b, b))``'s new state."""

    def draw(self, g):
        a = g.pick(is_f)
        b = g.pick(is_f, prefer_focus=False)
        return (a, b, g.metas[a].width, g.metas[b].width, g.choice(["gru", "rnn", "lstm"])), fresh("f", (g.metas[b].width,), g.k)

    def build(self, net, k, p):
        cell = {"gru": nn.GRUCell, "rnn": nn.RNNCell, "lstm": nn.LSTMCell}[p[4]]
        net.mods[f"m{k}"] = cell(p[2], p[3])

    def run(self, net, k, pool, p):
        a, b, how = p[0], p[1], p[4]
        cell = net.mods[f"m{k}"]
        return cell(pool[a], (pool[b], pool[b]))[1] if how == "lstm" else cell(pool[a], pool[b])


@op("linear", "base", "field")
class Lin(Op):
    def draw(self, g):
        a = g.pick(is_f)
        out = g.int_(1, 5)
        return (a, g.metas[a].width, out), fresh("f", (out,), g.k)

    def build(self, net, k, p):
        net.mods[f"m{k}"] = nn.Linear(p[1], p[2])

    def run(self, net, k, pool, p):
        return net.mods[f"m{k}"](pool[p[0]])


@op("layernorm", "base")
class LayerNorm(Op):
    def draw(self, g):
        a = g.pick(is_f)
        return (a, g.metas[a].width), fresh("f", g.metas[a].shape, g.k)

    def build(self, net, k, p):
        net.mods[f"m{k}"] = nn.LayerNorm(p[1])

    def run(self, net, k, pool, p):
        return net.mods[f"m{k}"](pool[p[0]])


@op("matmul", "base")
class MatmulParam(Op):
    def draw(self, g):
        a = g.pick(is_f)
        out = g.int_(1, 5)
        return (a, g.metas[a].width, out), fresh("f", (out,), g.k)

    def build(self, net, k, p):
        net.register_parameter(f"w{k}", nn.Parameter(torch.randn(p[1], p[2]) / p[1] ** 0.5))

    def run(self, net, k, pool, p):
        return pool[p[0]] @ getattr(net, f"w{k}")


@op("rowsum", "base")
class RowSum(Op):
    def draw(self, g):
        a = g.pick(is_f)
        w = g.int_(1, 3)
        return (a, w), Meta("f", (w,), root=g.k, contig=False, writable=False)  # an expand

    def run(self, net, k, pool, p):
        return pool[p[0]].sum(-1, keepdim=True).expand(-1, p[1])


@op("softmax", "base")
class Softmax(Op):
    def draw(self, g):
        a = g.pick(is_f)
        return (a, g.choice([0, 1, -1])), fresh("f", g.metas[a].shape, g.k)

    def run(self, net, k, pool, p):
        return torch.softmax(pool[p[0]], dim=p[1])


@op("batchmean", "base")
class BatchMean(Op):
    """Couples rows: must never be computed per user (the positive control for reductions)."""

    def draw(self, g):
        a = g.pick(is_f)
        return (a,), fresh("f", g.metas[a].shape, g.k)

    def run(self, net, k, pool, p):
        x = pool[p[0]]
        return x - x.mean(dim=0, keepdim=True)


@op("fm2", "base")
class FM2(Op):
    """FM / gram over a [B, 2, w] stack of two same-width entries."""

    def draw(self, g):
        a = g.pick(is_f)
        b = g.pick(lambda m: is_f(m) and m.shape == g.metas[a].shape, prefer_focus=False)
        kind = g.choice(["fm", "gram"])
        return (a, b, kind), fresh("f", g.metas[a].shape if kind == "fm" else (4,), g.k)

    def run(self, net, k, pool, p):
        e = torch.cat([pool[p[0]].unsqueeze(1), pool[p[1]].unsqueeze(1)], dim=1)
        if p[2] == "fm":
            s = e.sum(dim=1)
            return 0.5 * (s * s - (e * e).sum(dim=1))
        return torch.bmm(e, e.transpose(1, 2)).flatten(1)


@op("din2", "base")
class Din2(Op):
    """Target attention: the candidate a over a length-3 "sequence" made of b."""

    def draw(self, g):
        a = g.pick(is_f)
        b = g.pick(lambda m: is_f(m) and m.shape == g.metas[a].shape, prefer_focus=False)
        out = g.int_(1, 4)
        return (a, b, g.metas[a].width, out), fresh("f", (out,), g.k)

    def build(self, net, k, p):
        net.mods[f"m{k}"] = nn.Linear(4 * p[2], p[3])
        net.register_buffer(f"s{k}", torch.randn(1, 3, 1))

    def run(self, net, k, pool, p):
        qe = pool[p[0]].unsqueeze(1).expand(-1, 3, -1)
        k_ = pool[p[1]].unsqueeze(1) * getattr(net, f"s{k}")
        return net.mods[f"m{k}"](torch.cat([qe, k_, qe - k_, qe * k_], dim=-1)).sum(dim=1)


# --------------------------------------------------------------------------- in-place (issue 9, cause 1)
@op("relu_", "inplace")
class ReluStmt(Op):
    """``h.relu_()`` (or sigmoid_/tanh_/add_/mul_ by a scalar) as a statement, result unused."""

    statement = True

    def draw(self, g):
        a = g.pick(writable_f)
        if a is None:
            return None
        how = g.choice(["relu_", "sigmoid_", "tanh_", "add_", "mul_"])
        return (a, how, g.choice([0.5, -1.5, 2.0])), g.metas[a]

    def run(self, net, k, pool, p):
        a, how, c = p
        h = pool[a]
        if how in ("add_", "mul_"):
            getattr(h, how)(c)
        else:
            getattr(h, how)()
        return h


@op("clamp_", "inplace")
class ClampUsed(Op):
    """``y = h.clamp_(min=c)``: the result is used (and h, the same tensor, may be read later)."""

    def draw(self, g):
        a = g.pick(writable_f)
        if a is None:
            return None
        return (a, g.choice([0.1, -0.2, 1.0])), g.metas[a]

    def run(self, net, k, pool, p):
        return pool[p[0]].clamp_(min=p[1])


@op("view_", "inplace")
class ViewInplace(Op):
    """``v = h[:, lo:hi]; v.add_(c)`` (or ``v.mul_(other[:, ..])``, ``v.fill_(c)``, ``h[:, j].zero_()``),
    then h is read."""

    statement = True

    def draw(self, g):
        a = g.pick(writable_f)
        if a is None:
            return None
        w = g.metas[a].width
        lo = g.int_(0, w - 1)
        hi = g.int_(lo + 1, w)
        how = g.choice(["add_", "mul_t", "fill_", "zero_col", "copy_t"])
        b = blo = None
        if how in ("mul_t", "copy_t"):
            b = g.pick(lambda m: apart(g, a)(m) and m.width >= hi - lo, prefer_focus=False)
            if b is None:
                return None
            blo = g.int_(0, g.metas[b].width - (hi - lo))
        return (a, lo, hi, how, b, blo, g.choice([1.0, -0.5])), g.metas[a]

    def run(self, net, k, pool, p):
        a, lo, hi, how, b, blo, c = p
        h = pool[a]
        if how == "add_":
            v = h[:, lo:hi]
            v.add_(c)
        elif how == "fill_":
            h[:, lo:hi].fill_(c)
        elif how == "zero_col":
            h[:, lo].zero_()
        elif how == "mul_t":
            h[:, lo:hi].mul_(pool[b][:, blo:blo + hi - lo])
        else:  # copy_t: the setitem h[:, lo:hi] = other[:, ...] written as fx can trace it
            h[:, lo:hi].copy_(pool[b][:, blo:blo + hi - lo])
        return h


@op("setitem", "setitem")
class SetItem(Op):
    """``h[:, j] = c`` / ``h[:, lo:hi] = other[...]``: torch.fx cannot trace setitem, so these
    programs go through mari_fx's torch.export capture."""

    statement = True

    def draw(self, g):
        a = g.pick(writable_f)
        if a is None:
            return None
        w = g.metas[a].width
        j = g.int_(0, w - 1)
        b = g.pick(apart(g, a), prefer_focus=False) if g.draw(st.booleans()) else None
        return (a, j, b, g.choice([0.0, 2.5])), g.metas[a]

    def run(self, net, k, pool, p):
        a, j, b, c = p
        h = pool[a]
        if b is None:
            h[:, j] = c
        else:
            h[:, j:j + 1] = pool[b][:, :1]
        return h


@op("relu_module", "inplace")
class ReluModule(Op):
    """``nn.ReLU(inplace=True)`` (or LeakyReLU / Hardtanh) on a fresh tensor or on ``cat([h, other])``."""

    def draw(self, g):
        how = g.choice(["direct", "cat"])
        if how == "direct":
            a = g.pick(writable_f)
            if a is None:
                return None
            return (a, (), g.choice(["relu", "leaky", "hardtanh"])), g.metas[a]
        a = g.pick(is_f)
        others = (g.pick(is_f, prefer_focus=False),)
        w = g.metas[a].width + g.metas[others[0]].width
        return (a, others, g.choice(["relu", "leaky", "hardtanh"])), fresh("f", (w,), g.k)

    def build(self, net, k, p):
        net.mods[f"m{k}"] = {"relu": nn.ReLU(inplace=True), "leaky": nn.LeakyReLU(0.1, inplace=True),
                             "hardtanh": nn.Hardtanh(-0.5, 0.5, inplace=True)}[p[2]]

    def run(self, net, k, pool, p):
        x = pool[p[0]] if not p[1] else torch.cat([pool[p[0]]] + [pool[j] for j in p[1]], dim=-1)
        return net.mods[f"m{k}"](x)


@op("iadd", "inplace")
class IAdd(Op):
    """``h += other`` / ``h *= other`` / ``h -= other`` (other of any side)."""

    def draw(self, g):
        a = g.pick(writable_f)
        if a is None:
            return None
        b = g.pick(lambda m: is_f(m) and m.shape == g.metas[a].shape, prefer_focus=False)
        return (a, b, g.choice(["+=", "*=", "-="])), g.metas[a]

    def run(self, net, k, pool, p):
        h, o = pool[p[0]], pool[p[1]]
        if p[2] == "+=":
            h += o
        elif p[2] == "*=":
            h *= o
        else:
            h -= o
        return h


@op("tensor_", "inplace")
class TensorInplace(Op):
    """``h.mul_(other)`` / ``h.add_(other, alpha=2)`` / ``h.sub_(other)``, the result used."""

    def draw(self, g):
        a = g.pick(writable_f)
        if a is None:
            return None
        b = g.pick(lambda m: is_f(m) and m.shape == g.metas[a].shape, prefer_focus=False)
        return (a, b, g.choice(["mul_", "add_", "sub_"])), g.metas[a]

    def run(self, net, k, pool, p):
        h, o = pool[p[0]], pool[p[1]]
        return h.add_(o, alpha=2.0) if p[2] == "add_" else getattr(h, p[2])(o)


@op("int_", "inplace")
class IntInplace(Op):
    """In-place integer ops on a computed id tensor: ``c.remainder_(M)``, ``c.add_(K)``."""

    statement = True

    def draw(self, g):
        a = g.pick(lambda m: m.kind == "i" and m.root >= N_INPUTS and m.writable)
        if a is None:
            return None
        how = g.choice(["remainder_", "add_"])
        c = g.choice([97, 1009]) if how == "remainder_" else g.choice([1, 7])
        m = g.metas[a]
        bound = min(m.bound, c) if how == "remainder_" else m.bound + c
        # the meta of every alias changes too; aliases of int entries are not drawn, so this is exact
        g.metas[a] = replace(m, bound=bound)
        return (a, how, c), g.metas[a]

    def run(self, net, k, pool, p):
        a, how, c = p
        getattr(pool[a], how)(c)
        return pool[a]


# --------------------------------------------------------------------------- batch size as a value (cause 2)
@op("bsize", "batch")
class BatchSize(Op):
    """The batch size used as a value: ``h * h.size(0)``, ``h / h.shape[0]``, ``h / h.numel()``,
    ``h * h.shape[-2]``, ``h * other.size(0)``, ``h + arange(h.size(0))``, ``h + full((h.size(0), 1), c)``,
    ``h * h.new_ones(B, 1).cumsum(0)`` (the row number), ``h.view(h.size(0), -1)``."""

    def draw(self, g):
        a = g.pick(is_f)
        how = g.choice(["size0", "shape0", "numel", "shape_m2", "other", "arange", "full", "new_ones", "view_b"])
        b = g.pick(lambda m: True, prefer_focus=False) if how == "other" else None
        contig = g.metas[a].contig
        if how == "view_b" and not contig:
            how = "size0"
        return (a, how, b), fresh("f", g.metas[a].shape, g.k) if how != "view_b" else g.metas[a]

    def run(self, net, k, pool, p):
        a, how, b = p
        h = pool[a]
        if how == "size0":
            return h * h.size(0)
        if how == "shape0":
            return h / h.shape[0]
        if how == "numel":
            return h / h.numel()
        if how == "shape_m2":
            return h * h.shape[-2]
        if how == "other":
            return h * pool[b].size(0)
        if how == "arange":
            return h + torch.arange(h.size(0)).unsqueeze(1)
        if how == "full":  # (torch.ones(B, 1) with sizes as varargs is not traceable by torch.fx)
            return h + torch.full((h.size(0), 1), 0.5)
        if how == "new_ones":
            return h * h.new_ones(h.shape[0], 1).cumsum(0)
        return h.view(h.size(0), -1)


@op("bconst", "batch")
class BatchConst(Op):
    """A batch-free parameter broadcast to the batch by its size: ``c.expand(h.size(0), -1)``,
    ``c.repeat(h.size(0), 1)`` (c of one row: every row is c), ``c.expand(h.size(0), 2, -1).flatten(1)``
    (a new leading dim), and the trap ``c2.repeat(h.size(0), 1)[:h.size(0)]`` of a two-row c2 (rows
    alternate: not the same row for every pair); times h."""

    def draw(self, g):
        a = g.pick(is_f)
        how = g.choice(["expand", "repeat", "expand_new", "repeat_two"])
        w = g.metas[a].width
        return (a, how, w), fresh("f", g.metas[a].shape, g.k)

    def build(self, net, k, p):
        _, how, w = p
        rows, width = {"expand_new": (1, w // 2 if w % 2 == 0 else w), "repeat_two": (2, w)}.get(how, (1, w))
        shape = (width,) if how == "expand_new" else (rows, width)
        net.register_parameter(f"w{k}", nn.Parameter(torch.randn(*shape)))

    def run(self, net, k, pool, p):
        a, how, w = p
        h, c = pool[a], getattr(net, f"w{k}")
        if how == "expand":
            x = c.expand(h.size(0), -1)
        elif how == "repeat":
            x = c.repeat(h.size(0), 1)
        elif how == "expand_new":
            x = c.expand(h.size(0), w // c.shape[0], -1).flatten(1)
        else:
            x = c.repeat(h.size(0), 1)[: h.size(0)]
        return h * x


@op("expandas", "batch")
class ExpandAs(Op):
    """``x.expand_as(h)``: a batch-free one-row parameter (every row is c), or a batched column of
    another entry (``other[:, :1].expand_as(h)``: its rows, at h's rows); times h."""

    def draw(self, g):
        a = g.pick(is_f)
        b = g.pick(is_f) if g.draw(st.booleans()) else None
        return (a, b, g.metas[a].width), fresh("f", g.metas[a].shape, g.k)

    def build(self, net, k, p):
        if p[1] is None:
            net.register_parameter(f"w{k}", nn.Parameter(torch.randn(1, p[2])))

    def run(self, net, k, pool, p):
        a, b, _ = p
        h = pool[a]
        x = getattr(net, f"w{k}") if b is None else pool[b][:, :1]
        return h * x.expand_as(h)


@op("ibsize", "batch")
class IntBatchSize(Op):
    """Batch size in integer arithmetic: ``c + c.size(0)``, ``c % c.shape[0]``, ``c + arange(B)``."""

    def draw(self, g):
        a = g.pick(lambda m: m.kind == "i")
        how = g.choice(["add", "mod", "arange"])
        bound = g.metas[a].bound + 64 if how != "mod" else 64
        return (a, how), fresh("i", (), g.k, bound)

    def run(self, net, k, pool, p):
        c = pool[p[0]]
        if p[1] == "add":
            return c + c.size(0)
        if p[1] == "mod":
            return c % c.shape[0]
        return c + torch.arange(c.size(0))


# --------------------------------------------------------------------------- integer crosses (cause 3)
@op("ihash", "int")
class IHash(Op):
    """Hashed crosses: ``(a * K + b) % M``, ``(a * K + b) * 3 + 1``, ``((a * 1000 + b) * 31 + c) % 1009``."""

    def draw(self, g):
        a = g.pick(is_int)
        b = g.pick(is_int, prefer_focus=False)
        c = g.pick(is_int, prefer_focus=False)
        how = g.choice(["mod", "affine", "chain"])
        K = g.choice([1000003, 1000, 31])
        M = g.choice([97, 1009, 2**31 - 1])
        ba, bb, bc = (max(g.metas[j].bound, 1) for j in (a, b, c))
        raw = {"mod": ba * K + bb, "affine": 3 * (ba * K + bb) + 1, "chain": (ba * 1000 + bb) * 31 + bc}[how]
        if raw > 2**61:
            return None
        return (a, b, c, how, K, M), fresh("i", (), g.k, raw if how == "affine" else M if how == "mod" else 1009)

    def run(self, net, k, pool, p):
        a, b, c, how, K, M = p
        x, y = pool[a], pool[b]
        if how == "mod":
            return (x * K + y) % M
        if how == "affine":
            return (x * K + y) * 3 + 1
        return ((x * 1000 + y) * 31 + pool[c]) % 1009


class _IntPair(Op):
    """Two ids ``a``, ``b`` combined one of ``cases``' ways: ``{how: (bound(|a|, |b|), fn(a, b))}``."""

    cases: Dict[str, Tuple[Callable[[int, int], int], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]] = {}

    def operands(self, how: str) -> Callable[[Meta], bool]:
        return lambda m: m.kind == "i"

    def draw(self, g):
        how = g.choice(list(self.cases))
        ok = self.operands(how)
        a = g.pick(ok)
        b = g.pick(ok, prefer_focus=False)
        bound = self.cases[how][0](max(g.metas[a].bound, 1), max(g.metas[b].bound, 1))
        if bound > 2**61:
            return None
        return (a, b, how), fresh("i", (), g.k, bound)

    def run(self, net, k, pool, p):
        return self.cases[p[2]][1](pool[p[0]], pool[p[1]])


@op("iarith", "int")
class IArith(_IntPair):
    """``a - b``, ``a * b``, ``(a - b) * (a - b)``, ``a * 3 + 1`` on ids (exact int64 semantics)."""

    cases = {"sub": (lambda ba, bb: ba + bb, lambda x, y: x - y),
             "mul": (lambda ba, bb: ba * bb, lambda x, y: x * y),
             "sqdiff": (lambda ba, bb: (ba + bb) ** 2, lambda x, y: (x - y) * (x - y)),
             "affine": (lambda ba, bb: 3 * ba + 1, lambda x, y: x * 3 + 1)}

    def operands(self, how: str) -> Callable[[Meta], bool]:
        return is_int if how == "mul" else super().operands(how)  # torch has no bool subtraction


@op("ishift", "int")
class IShift(_IntPair):
    """Bit and division crosses: ``(a << 3) ^ b``, ``(a >> 1) + b``, ``a // 7 + b``, ``fmod(a, 13) * b``."""

    cases = {"shl_xor": (lambda ba, bb: 16 * (ba + bb), lambda x, y: (x << 3) ^ y),
             "shr_add": (lambda ba, bb: ba + bb, lambda x, y: (x >> 1) + y),
             "floordiv": (lambda ba, bb: ba + bb, lambda x, y: x // 7 + y),
             "fmod": (lambda ba, bb: 13 * bb, lambda x, y: torch.fmod(x, 13) * y)}


@op("icmp", "int")
class ICmp(Op):
    """Comparisons and bool sums: ``(a > c) + (b > c)`` (bool), ``s * s``, a count of true flags."""

    def draw(self, g):
        a = g.pick(is_int)
        b = g.pick(is_int, prefer_focus=False)
        how = g.choice(["boolsum", "boolsq", "count", "eq"])
        c1 = g.choice([5, 50_000])
        kind = "b" if how in ("boolsum", "boolsq", "eq") else "i"
        return (a, b, how, c1), fresh(kind, (), g.k, 2)

    def run(self, net, k, pool, p):
        x, y, how, c = pool[p[0]], pool[p[1]], p[2], p[3]
        if how == "eq":
            return x == y
        s = (x > c) + (y > c)
        if how == "boolsum":
            return s
        if how == "boolsq":
            return s * s
        return torch.stack([x > c, y > c], dim=1).sum(dim=1)


@op("iemb", "int", "field")
class IEmb(Op):
    """A hashed id (``c % M``) into an ``nn.Embedding``: the output joins the float pool."""

    def draw(self, g):
        a = g.pick(is_int)
        M, E = g.choice([97, 16]), g.int_(2, 4)
        return (a, M, E), fresh("f", (E,), g.k)

    def build(self, net, k, p):
        net.mods[f"m{k}"] = nn.Embedding(p[1], p[2])

    def run(self, net, k, pool, p):
        return net.mods[f"m{k}"](pool[p[0]].long() % p[1])


@op("ionehot", "int")
class IOneHot(Op):
    """``F.one_hot(c % K, K)`` as floats: the output joins the float pool."""

    def draw(self, g):
        a = g.pick(is_int)
        K = g.choice([3, 7])
        return (a, K), fresh("f", (K,), g.k)

    def run(self, net, k, pool, p):
        return F.one_hot(pool[p[0]].long() % p[1], p[1]).float()


@op("ifloat", "int")
class IFloat(Op):
    """An id (mod M, so exactly representable) as a float feature column."""

    def draw(self, g):
        a = g.pick(is_int)
        return (a, g.choice([7, 97])), fresh("f", (1,), g.k)

    def run(self, net, k, pool, p):
        return (pool[p[0]].long() % p[1]).float().unsqueeze(1) / p[1]


# --------------------------------------------------------------------------- large magnitudes (cause 4)
@op("sqdiff", "mag")
class SqDiff(Op):
    """``d = a - b; d * d`` and ``(a + b) * (a - b)`` over the first w columns, optionally into a
    Linear: expanding these cancels badly at large magnitudes (inputs are drawn with an offset of
    1e3 or a scale of 1e3)."""

    def draw(self, g):
        a = g.pick(is_f) if g.draw(st.booleans()) else 0
        b = g.pick(is_f, prefer_focus=False) if g.draw(st.booleans()) else 1
        w = min(g.metas[a].width, g.metas[b].width)
        out = g.choice([0, 1, 3])
        return (a, b, w, g.choice(["sq", "diffsum"]), out), fresh("f", (out or w,), g.k)

    def build(self, net, k, p):
        if p[4]:
            net.mods[f"m{k}"] = nn.Linear(p[2], p[4])

    def run(self, net, k, pool, p):
        a, b, w, how, out = p
        x, y = pool[a][:, :w], pool[b][:, :w]
        d = x - y
        z = d * d if how == "sq" else (x + y) * d
        return net.mods[f"m{k}"](z) if out else z


# --------------------------------------------------------------------------- argument-complete rules (cause 5)
@op("batched_arg", "args")
class BatchedArg(Op):
    """An op with a batched tensor where a rule might expect a constant: ``F.linear(h, w)`` with a
    batched weight, ``F.embedding(ids, h)`` with a batched table, ``F.layer_norm(h, h.shape)``,
    ``h / h.norm(2, 0)``, ``torch.where(cond)`` (indices)."""

    def draw(self, g):
        a = g.pick(is_f)
        how = g.choice(["linear_w", "emb_table", "ln_shape", "norm_pos", "where1"])
        b = None
        if how == "linear_w":
            b = g.pick(lambda m: is_f(m) and m.shape == g.metas[a].shape, prefer_focus=False)
            return (a, how, b), fresh("f", (1,), g.k)
        if how == "emb_table":
            b = g.pick(is_int, prefer_focus=False)
        return (a, how, b), fresh("f", g.metas[a].shape, g.k)

    def run(self, net, k, pool, p):
        a, how, b = p
        h = pool[a]
        if how == "linear_w":
            return F.linear(h, pool[b]).sum(1, keepdim=True)  # [B, B]: mixes rows
        if how == "emb_table":
            return F.embedding(pool[b].long() % h.size(0), h)
        if how == "ln_shape":
            return F.layer_norm(h, h.shape)
        if how == "norm_pos":
            return h / (h.norm(2, 0) + 1.0)
        return h + torch.where(h[:, 0] > 0)[0].numel()


# --------------------------------------------------------------------------- field tensors (issue 10)
@op("stack", "field")
class Stack(Op):
    """``[B, F, E]`` field stacks of E-wide column windows of 2-4 entries (per-feature embeddings
    of either side): ``cat([a.unsqueeze(1), ...], dim=1)`` or ``torch.stack(dim=1)``."""

    def draw(self, g):
        E = g.int_(1, 4)
        parts = []
        for n in range(g.int_(2, 4)):
            j = g.pick(lambda m: is_f(m) and m.width >= E, prefer_focus=n == 0)
            if j is None:
                return None
            w = g.metas[j].width
            parts.append((j, None if w == E else g.int_(0, w - E)))  # None: the whole entry
        return (tuple(parts), E, g.choice(["cat", "stack"])), fresh("g", (len(parts), E), g.k)

    def run(self, net, k, pool, p):
        parts, E, how = p
        cols = [pool[j] if lo is None else pool[j][:, lo:lo + E] for j, lo in parts]
        if how == "stack":
            return torch.stack(cols, dim=1)
        return torch.cat([x.unsqueeze(1) for x in cols], dim=1)


@op("stack_cat", "field")
class StackCat(Op):
    """``torch.cat((dense.unsqueeze(1), sparse), dim=1)``."""

    def draw(self, g):
        x = g.pick(is_g)
        if x is None:
            return None
        Fn, E = g.metas[x].shape
        d = g.pick(lambda m: is_f(m) and m.width >= E, prefer_focus=False)
        if d is None:
            return None
        return (x, d, E if g.metas[d].width > E else None), fresh("g", (Fn + 1, E), g.k)

    def run(self, net, k, pool, p):
        x, d, E = p
        dense = pool[d] if E is None else pool[d][:, :E]
        return torch.cat((dense.unsqueeze(1), pool[x]), dim=1)


@op("unflatten", "field")
class Unflatten(Op):
    """``h.reshape(-1, F, E)`` / ``h.view(h.size(0), F, E)`` / ``h.unflatten(1, (F, E))``."""

    def draw(self, g):
        a = g.pick(lambda m: is_f(m) and any(m.width % f == 0 for f in (2, 3)) and m.width > 2)
        if a is None:
            return None
        m = g.metas[a]
        Fn = g.choice([f for f in (2, 3) if m.width % f == 0])
        how = g.choice(["reshape", "view", "unflatten"] if m.contig else ["reshape", "unflatten"])
        meta = view_of(m, (Fn, m.width // Fn), contig=True)
        return (a, Fn, m.width // Fn, how), replace(meta, kind="g", writable=False)

    def run(self, net, k, pool, p):
        a, Fn, E, how = p
        h = pool[a]
        if how == "reshape":
            return h.reshape(-1, Fn, E)
        if how == "view":
            return h.view(h.size(0), Fn, E)
        return h.unflatten(1, (Fn, E))


@op("flatten", "field")
class Flatten(Op):
    """``x.flatten(1)`` / ``torch.flatten(x, start_dim=1)`` / ``x.reshape(x.size(0), -1)`` /
    ``x.view(-1, F * E)``, optionally straight into a Linear."""

    def draw(self, g):
        x = g.pick(is_g)
        if x is None:
            return None
        m = g.metas[x]
        how = g.choice(["flatten", "torch.flatten", "reshape", "view"] if m.contig else
                       ["flatten", "torch.flatten", "reshape"])
        out = g.choice([0, 0, 2, 3])  # 0: no Linear
        w = m.shape[0] * m.shape[1]
        return (x, how, w, out), fresh("f", (out or w,), g.k) if out else Meta("f", (w,), root=m.root, contig=m.contig, writable=False)

    def build(self, net, k, p):
        if p[3]:
            net.mods[f"m{k}"] = nn.Linear(p[2], p[3])

    def run(self, net, k, pool, p):
        x, how, w, out = p
        X = pool[x]
        if how == "flatten":
            h = X.flatten(1)
        elif how == "torch.flatten":
            h = torch.flatten(X, start_dim=1)
        elif how == "reshape":
            h = X.reshape(X.size(0), -1)
        else:
            h = X.view(-1, w)
        return net.mods[f"m{k}"](h) if out else h


@op("conv1d", "conv")
class Conv1d(Op):
    """``nn.Conv1d`` over ``h.unsqueeze(1)`` ([B, 1, w]: the columns are the positions, so a kernel
    of 3 mixes neighbouring columns; one output channel, squeezed back to [B, w]) or over a field
    tensor [B, F, E] (fields are channels), flattened to [B, *]."""

    def draw(self, g):
        a = g.pick(lambda m: is_f(m) or is_g(m))
        if a is None:
            return None
        m = g.metas[a]
        channels, length = (1, m.shape[0]) if is_f(m) else m.shape
        out_ch, kernel = (1 if is_f(m) else g.int_(1, 2)), g.choice([1, 3])
        return (a, channels, out_ch, kernel, is_f(m)), fresh("f", (out_ch * length,), g.k)

    def build(self, net, k, p):
        _, channels, out_ch, kernel, _ = p
        net.mods[f"m{k}"] = nn.Conv1d(channels, out_ch, kernel, padding=kernel // 2)

    def run(self, net, k, pool, p):
        h, columns = pool[p[0]], p[4]  # decided when drawn: no Python branch on a traced value
        if columns:
            return net.mods[f"m{k}"](h.unsqueeze(1)).squeeze(1)
        return net.mods[f"m{k}"](h).flatten(1)


@op("gram_triu", "field")
class GramTriu(Op):
    """DLRM interaction: ``Z = bmm(X, X.transpose(1, 2))`` then ``Z[:, ti, tj]`` (a constant triu
    gather), or ``bmm(X, Y^T).flatten(1)`` for two stacks."""

    def draw(self, g):
        x = g.pick(lambda m: is_g(m) and m.shape[0] >= 2)
        if x is None:
            return None
        Fn, E = g.metas[x].shape
        how = g.choice(["triu", "triu", "pair"])
        if how == "pair":
            y = g.pick(lambda m: is_g(m) and m.shape[1] == E, prefer_focus=False)
            return (x, y, how, 0), fresh("f", (Fn * g.metas[y].shape[0],), g.k)
        offset = g.choice([0, 1])
        return (x, None, how, offset), fresh("f", (len(torch.triu_indices(Fn, Fn, offset)[0]),), g.k)

    def run(self, net, k, pool, p):
        x, y, how, offset = p
        X = pool[x]
        if how == "pair":
            return torch.bmm(X, pool[y].transpose(1, 2)).flatten(1)
        Z = torch.bmm(X, X.transpose(1, 2))
        ti, tj = getattr(net, f"ti{k}"), getattr(net, f"tj{k}")
        return Z[:, ti, tj]


@op("expand", "field")
class Expand(Op):
    """``h.unsqueeze(1).expand(-1, L, -1)`` (item blocks broadcast over a sequence)."""

    def draw(self, g):
        a = g.pick(is_f)
        L = g.int_(2, 3)
        return (a, L), Meta("g", (L, g.metas[a].width), root=g.metas[a].root, contig=False, writable=False)

    def run(self, net, k, pool, p):
        return pool[p[0]].unsqueeze(1).expand(-1, p[1], -1)


@op("field_reduce", "field")
class FieldReduce(Op):
    """``x.sum(1)`` / ``x.mean(1)`` / ``x.amax(1)`` / ``x[:, j]`` / FM second order over fields."""

    def draw(self, g):
        x = g.pick(is_g)
        if x is None:
            return None
        Fn, E = g.metas[x].shape
        how = g.choice(["sum", "mean", "amax", "select", "fm"])
        j = g.int_(0, Fn - 1)
        meta = view_of(g.metas[x], (E,), False) if how == "select" else fresh("f", (E,), g.k)
        return (x, how, j), replace(meta, kind="f", writable=how != "select")

    def run(self, net, k, pool, p):
        X, how, j = pool[p[0]], p[1], p[2]
        if how == "select":
            return X[:, j]
        if how == "fm":
            s = X.sum(dim=1)
            return 0.5 * (s * s - (X * X).sum(dim=1))
        return getattr(X, how)(1)


@op("bnorm", "field")
class BatchNormOp(Op):
    """BatchNorm over the channels of ``[B, w]`` or ``[B, F, E]`` (F channels; flattened after): eval
    mode with running statistics (an affine map per channel), or ``F.batch_norm(training=True)``
    (batch statistics couple the rows)."""

    def draw(self, g):
        a = g.pick(lambda m: m.kind in ("f", "g"))
        m = g.metas[a]
        # batch statistics need > 1 value per channel even for one pair: [B, F, E] with E >= 2
        how = g.choice(["eval", "train"]) if m.kind == "g" and m.shape[1] >= 2 else "eval"
        # a field stack comes out flattened ([B, F * E]), as a Linear over the fields reads it
        width = m.shape[0] * (m.shape[1] if m.kind == "g" else 1)
        return (a, m.shape[0], how), fresh("f", (width,), g.k)

    def build(self, net, k, p):
        bn = nn.BatchNorm1d(p[1]).eval()
        with torch.no_grad():
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.normal_()
            bn.bias.normal_()
        net.mods[f"m{k}"] = bn

    def run(self, net, k, pool, p):
        bn, x = net.mods[f"m{k}"], pool[p[0]]
        y = bn(x) if p[2] == "eval" else F.batch_norm(x, None, None, bn.weight, bn.bias, training=True)
        return y.flatten(1)


@op("field_map", "field")
class FieldMap(Op):
    """Ops that keep ``[B, F, E]``: a Linear over E, relu/tanh, ``x * y``, ``x + y``, transpose(1, 2)."""

    def draw(self, g):
        x = g.pick(is_g)
        if x is None:
            return None
        m = g.metas[x]
        how = g.choice(["linear", "relu", "tanh", "mul", "add", "transpose"])
        if how == "linear":
            out = g.int_(1, 4)
            return (x, how, None, m.shape[1], out), fresh("g", (m.shape[0], out), g.k)
        if how in ("mul", "add"):
            y = g.pick(lambda n: is_g(n) and n.shape == m.shape, prefer_focus=False)
            return (x, how, y, 0, 0), fresh("g", m.shape, g.k)
        if how == "transpose":
            return (x, how, None, 0, 0), Meta("g", (m.shape[1], m.shape[0]), root=m.root, contig=False, writable=False)
        return (x, how, None, 0, 0), fresh("g", m.shape, g.k)

    def build(self, net, k, p):
        if p[1] == "linear":
            net.mods[f"m{k}"] = nn.Linear(p[3], p[4])

    def run(self, net, k, pool, p):
        X, how, y = pool[p[0]], p[1], p[2]
        if how == "linear":
            return net.mods[f"m{k}"](X)
        if how in ("relu", "tanh"):
            return getattr(torch, how)(X)
        if how == "mul":
            return X * pool[y]
        if how == "add":
            return X + pool[y]
        return X.transpose(1, 2)


@op("din3", "field")
class Din3(Op):
    """Target attention with the sequence folded into the batch dim: ``q.unsqueeze(1).expand(-1, L, -1)``,
    ``cat([q, k, q - k, q * k], -1).reshape(-1, 4E)`` through a Linear, ``.view(-1, L)``."""

    def draw(self, g):
        kx = g.pick(is_g)
        if kx is None:
            return None
        L, E = g.metas[kx].shape
        q = g.pick(lambda m: is_f(m) and m.width >= E, prefer_focus=False)
        if q is None:
            return None
        return (q, kx, L, E), fresh("f", (L,), g.k)

    def build(self, net, k, p):
        net.mods[f"m{k}"] = nn.Linear(4 * p[3], 1)

    def run(self, net, k, pool, p):
        q, kx, L, E = p
        qe = pool[q][:, :E].unsqueeze(1).expand(-1, L, -1)
        key = pool[kx]
        z = torch.cat([qe, key, qe - key, qe * key], dim=-1).reshape(-1, 4 * E)
        return net.mods[f"m{k}"](z).view(-1, L)


# --------------------------------------------------------------------------- programs
@dataclass(frozen=True)
class Program:
    steps: Tuple[Tuple[str, tuple], ...]
    metas: Tuple[Meta, ...]
    outputs: Tuple[int, ...]

    def __repr__(self) -> str:  # a readable listing in hypothesis' falsifying example
        lines = [f"  v{N_INPUTS + k} = {name}{p}" for k, (name, p) in enumerate(self.steps)]
        return "Program(\n" + "\n".join(lines) + f"\n  -> outputs {self.outputs})"


@st.composite
def programs(draw, families: Sequence[str] = ("base",), min_steps: int = 3, max_steps: int = 8,
             family_weight: float = 0.6, only: Optional[Sequence[str]] = None) -> Program:
    """A random program: ``base`` ops mixed with those of ``families`` (drawn with ``family_weight``),
    or with the ops named in ``only``."""
    own = list(only) if only else [n for n in ops_of(families) if n not in ops_of(["base"])] or ops_of(families)
    base = ops_of(["base"])
    metas = list(INPUT_METAS)
    steps: List[Tuple[str, tuple]] = []
    focus = None
    used: set = set()
    n_steps = draw(st.integers(min_steps, max_steps))
    for _ in range(4 * n_steps):
        if len(steps) == n_steps:
            break
        use_own = draw(st.integers(0, 9)) < int(family_weight * 10)
        name = draw(st.sampled_from(own if use_own else base))
        trial = set(used)
        drawn = OPS[name].draw(Gen(draw, metas, focus, trial))
        if drawn is None:
            continue
        params, meta = drawn
        steps.append((name, params))
        metas.append(meta)
        used = trial
        focus = params[0] if "inplace" in OPS[name].families else None
    # every computed value no step reads is an output (the 4 latest), so that little is dead code
    unread = [j for j in range(N_INPUTS, len(metas)) if j not in used]
    outputs = unread[-4:] or [len(metas) - 1]
    return Program(tuple(steps), tuple(metas), tuple(outputs))


class RandomNet(nn.Module):
    """Interprets a :class:`Program`; forward(X, t, uid, iid) returns the program's outputs."""

    def __init__(self, program: Program):
        super().__init__()
        self.program = program
        self.mods = nn.ModuleDict()
        for k, (name, p) in enumerate(program.steps):
            OPS[name].build(self, N_INPUTS + k, p)
            if name == "gram_triu" and p[2] == "triu":
                Fn = program.metas[p[0]].shape[0]
                ti, tj = torch.triu_indices(Fn, Fn, p[3])
                self.register_buffer(f"ti{N_INPUTS + k}", ti)
                self.register_buffer(f"tj{N_INPUTS + k}", tj)

    def forward(self, X, t, uid, iid):
        pool = [X, t, uid, iid]
        for k, (name, p) in enumerate(self.program.steps):
            pool.append(OPS[name].run(self, N_INPUTS + k, pool, p))
        return tuple(pool[j] for j in self.program.outputs)


# --------------------------------------------------------------------------- declarations and requests
@dataclass(frozen=True)
class Decl:
    user_cols: Tuple[int, ...]  # columns of X declared user
    t_user: bool
    uid_user: bool
    iid_user: bool

    def selectors(self) -> List[str]:
        runs, start = [], None
        cols = list(self.user_cols)
        for k, c in enumerate(cols):
            start = c if start is None else start
            if k + 1 == len(cols) or cols[k + 1] != c + 1:
                runs.append(f"X[:, {start}:{c + 1}]")
                start = None
        return runs + [n for n, u in (("t", self.t_user), ("uid", self.uid_user), ("iid", self.iid_user)) if u]


@st.composite
def declarations(draw) -> Decl:
    how = draw(st.sampled_from(["all", "none", "some"]))  # whole-input sides make pure user/item operands likely
    cols = list(range(X_WIDTH)) if how == "all" else [] if how == "none" else draw(
        st.lists(st.integers(0, X_WIDTH - 1), min_size=1, max_size=X_WIDTH, unique=True))
    d = Decl(tuple(sorted(cols)), draw(st.booleans()), draw(st.booleans()), draw(st.booleans()))
    if not d.selectors():
        d = replace(d, uid_user=True)
    return d


MAGNITUDES = ("unit", "scale1e3", "offset1e3")


@dataclass(frozen=True)
class Case:
    """Everything one example needs besides the program."""

    decl: Decl
    U: int
    N: int
    seed: int
    magnitude: str = "unit"


@st.composite
def cases(draw, magnitudes: Sequence[str] = MAGNITUDES) -> Case:
    U = draw(st.integers(1, 4))
    N = draw(st.sampled_from([n for n in (1, 2, 5, 7) if n >= U]))
    return Case(draw(declarations()), U, N, draw(st.integers(0, 2**31 - 1)), draw(st.sampled_from(list(magnitudes))))


def _floats(gen: torch.Generator, rows: int, width: int, magnitude: str) -> torch.Tensor:
    x = torch.randn(rows, width, generator=gen)
    if magnitude == "scale1e3":
        return x * 1e3
    if magnitude == "offset1e3":  # |x| ~ 1e3 while differences of features stay ~1: cancellation
        return x + 1e3
    return x


def make_inputs(case: Case) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    """Pair-shaped inputs (user features repeated per candidate) and ``user_index``."""
    gen = torch.Generator().manual_seed(case.seed)
    U, N, d = case.U, case.N, case.decl
    idx = torch.cat([torch.arange(U), torch.randint(U, (N - U,), generator=gen)])[torch.randperm(N, generator=gen)]
    X = _floats(gen, N, X_WIDTH, case.magnitude)
    user_X = _floats(gen, U, X_WIDTH, case.magnitude)
    cols = list(d.user_cols)
    X[:, cols] = user_X[idx][:, cols]
    t = _floats(gen, U, T_WIDTH, case.magnitude)[idx] if d.t_user else _floats(gen, N, T_WIDTH, case.magnitude)
    uid = torch.randint(ID_RANGE, (U,), generator=gen)[idx] if d.uid_user else torch.randint(ID_RANGE, (N,), generator=gen)
    iid = torch.randint(ID_RANGE, (U,), generator=gen)[idx] if d.iid_user else torch.randint(ID_RANGE, (N,), generator=gen)
    return {"X": X, "t": t, "uid": uid, "iid": iid}, idx


def example_inputs(seed: int = 0) -> Tuple[torch.Tensor, ...]:
    """The (reused) example batch the models are traced with."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(EXAMPLE_ROWS, X_WIDTH, generator=gen), torch.randn(EXAMPLE_ROWS, T_WIDTH, generator=gen),
            torch.randint(ID_RANGE, (EXAMPLE_ROWS,), generator=gen), torch.randint(ID_RANGE, (EXAMPLE_ROWS,), generator=gen))


EXAMPLE = example_inputs()


# --------------------------------------------------------------------------- the check
class Failure(AssertionError):
    """One example failed; ``silent`` failures are wrong answers without an error."""

    silent = True

    @property
    def detects_wrong_rule(self) -> bool:
        """A silent wrong answer, or an error that names no culprit: not a MariError, or
        mari_fx's own "internal: ..." consistency check."""
        if self.silent:
            return True
        cause = self.__cause__
        return isinstance(self, Crash) and (not isinstance(cause, mari_fx.MariError) or str(cause).startswith("internal"))


class Mismatch(Failure):
    pass


class DtypeMismatch(Failure):
    pass


class ShapeMismatch(Failure):
    pass


class RequestMutated(Failure):
    pass


class RecordMismatch(Failure):
    silent = False


class Crash(Failure):
    """transform() or T() raised on a valid model (MariError or not)."""

    silent = False


RTOL, ATOL = 1e-4, 1e-5
ROUNDOFF_FACTOR = 16.0  # allowed multiple of the model's own sensitivity to 1-ulp perturbations


def _perturbed(model: nn.Module, inputs: Dict[str, torch.Tensor], seed: int) -> Tuple[nn.Module, Dict[str, torch.Tensor]]:
    """The model and inputs with every float perturbed by one ulp (random sign)."""
    gen = torch.Generator().manual_seed(seed)

    def bump(x: torch.Tensor) -> torch.Tensor:
        sign = torch.randint(0, 2, x.shape, generator=gen).to(x.dtype) * 2 - 1
        return x * (1 + sign * 2.0 ** -23)

    m = copy.deepcopy(model)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(bump(p))
    return m, {k: bump(v) if v.is_floating_point() else v for k, v in inputs.items()}


def _roundoff(model: nn.Module, inputs: Dict[str, torch.Tensor], want: Sequence[torch.Tensor]) -> List[float]:
    """Per output: how far the model's own fp32 result moves under 1-ulp perturbations of its
    inputs and parameters (the scale of round-off differences a lossless rewrite may show)."""
    out = [0.0] * len(want)
    for s in (1, 2):
        m, x = _perturbed(model, inputs, s)
        with torch.no_grad():
            got = m(**x)
        for j, (g, w) in enumerate(zip(got, want)):
            if w.is_floating_point() and g.shape == w.shape:
                d = (g.double() - w.double()).abs()
                out[j] = max(out[j], float(d[torch.isfinite(d)].max()) if d.numel() and torch.isfinite(d).any() else 0.0)
    return out


def compare(got: Sequence[Any], want: Sequence[Any], roundoff: Sequence[float]) -> None:
    """Raise a :class:`Failure` unless ``got`` equals ``want`` (dtype exactly; ints exactly;
    floats within rtol 1e-4 + atol 1e-5 x magnitude + 16 x the model's own round-off sensitivity)."""
    if len(got) != len(want):
        raise ShapeMismatch(f"{len(got)} outputs, the model gives {len(want)}")
    for j, (g, w) in enumerate(zip(got, want)):
        if not isinstance(g, torch.Tensor):
            raise ShapeMismatch(f"output {j} is {type(g).__name__}, the model gives a tensor")
        if g.dtype != w.dtype:
            raise DtypeMismatch(f"output {j}: dtype {g.dtype}, the model gives {w.dtype}")
        if g.shape != w.shape:
            raise ShapeMismatch(f"output {j}: shape {tuple(g.shape)}, the model gives {tuple(w.shape)}")
        if not w.is_floating_point():
            if not torch.equal(g, w):
                bad = (g != w).nonzero()[0].tolist()
                raise Mismatch(f"output {j} ({w.dtype}) differs at {bad}: {g[tuple(bad)]} vs {w[tuple(bad)]}")
            continue
        finite = torch.isfinite(w)
        if not finite.all():
            continue  # the model itself overflowed: nothing to hold the rewrite to
        if not torch.isfinite(g).all():
            raise Mismatch(f"output {j}: non-finite values where the model's are finite")
        gd, wd = g.double(), w.double()
        allowed = ATOL * max(1.0, float(wd.abs().max()) if wd.numel() else 1.0) + RTOL * wd.abs() \
            + ROUNDOFF_FACTOR * roundoff[j]
        excess = (gd - wd).abs() - allowed
        if excess.numel() and float(excess.max()) > 0:
            at = int(excess.flatten().argmax())
            raise Mismatch(f"output {j}: max |diff| {float((gd - wd).abs().max()):.4g} (allowed {float(allowed.flatten()[at]):.3g}"
                           f" at flat index {at}: {float(gd.flatten()[at]):.6g} vs {float(wd.flatten()[at]):.6g}; "
                           f"model round-off scale {roundoff[j]:.3g})")


class InvalidProgram(Exception):
    """The drawn model itself fails: a bug of the generator, not a finding."""


def build_model(program: Program, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return RandomNet(program).eval()


def transform(model: nn.Module, decl: Decl) -> Any:
    try:
        return mari_fx.transform(model, decl.selectors(), EXAMPLE)
    except Exception as e:  # noqa: BLE001 - every error on a valid model is a finding
        raise Crash(f"transform raised {type(e).__name__}: {e}") from e


def check(program: Program, case: Case) -> None:
    """Transform a random model, run it on a ragged request and compare with the pair-shaped model.

    Raises a :class:`Failure` subclass on any disagreement (see the module docstring).
    """
    model = build_model(program, case.seed)
    inputs, idx = make_inputs(case)
    try:
        with torch.no_grad():
            want = model(**{k: v.clone() for k, v in inputs.items()})
            model(*EXAMPLE)
    except Exception as e:  # noqa: BLE001
        raise InvalidProgram(f"the drawn model fails: {type(e).__name__}: {e}\n{program!r}") from e
    T = transform(model, case.decl)
    try:
        request = mari_fx.pairs_to_request(T, inputs["X"], inputs["t"], inputs["uid"], inputs["iid"], user_index=idx)
    except Exception as e:  # noqa: BLE001
        raise Crash(f"pairs_to_request raised {type(e).__name__}: {e}") from e
    before = {k: v.clone() for k, v in request.items()}
    try:
        with torch.no_grad():
            got = T(**request)
    except Exception as e:  # noqa: BLE001
        raise Crash(f"T(**request) raised {type(e).__name__}: {e}") from e
    for k, v in before.items():
        if not torch.equal(request[k], v):
            raise RequestMutated(f"request tensor {k!r} was changed by the call")
    got = got if isinstance(got, tuple) else (got,)
    compare(got, want, _roundoff(model, inputs, want))
    record = T.meta["mari_fx.record"]
    splits = [name for name, m in T.named_modules() if isinstance(m, SplitLinear)]
    if len(splits) != len(record.split_layers):
        raise RecordMismatch(f"record says split {record.split_layers}, T has SplitLinear modules {splits}")


def classify(program: Program, case: Case) -> Optional[Failure]:
    """The failure of one example, or None."""
    try:
        check(program, case)
    except Failure as f:
        return f
    return None


# --------------------------------------------------------------------------- harvesting (not run in CI)
def harvest(families: Sequence[str], count: int, seed: int = 0, max_steps: int = 8) -> Dict[str, List[Tuple[Program, Case, str]]]:
    """Draw ``count`` examples (random, not shrunk) and group the failures by type and message head."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    found: Dict[str, List[Tuple[Program, Case, str]]] = {}

    @hseed(seed)
    @settings(max_examples=count, database=None, deadline=None, suppress_health_check=list(HealthCheck),
              phases=[Phase.generate])
    @given(p=programs(families, max_steps=max_steps), c=cases())
    def run(p, c):
        f = classify(p, c)
        if f is not None:
            head = type(f).__name__ + ": " + str(f).split("\n")[0][:120]
            found.setdefault(head, []).append((p, c, str(f)))

    run()
    return found


if __name__ == "__main__":  # python tests/randprog.py inplace 300
    torch.set_num_threads(1)
    fams = sys.argv[1].split(",")
    res = harvest(fams, int(sys.argv[2]), seed=int(sys.argv[3]) if len(sys.argv) > 3 else 0)
    print(f"{sum(len(v) for v in res.values())} failures in {sys.argv[2]} draws of {fams}")
    for head, items in sorted(res.items(), key=lambda kv: -len(kv[1])):
        smallest = min(items, key=lambda it: len(it[0].steps))
        print(f"== {len(items)} x {head}\n{smallest[0]!r}\n  {smallest[1]}\n")
