"""``torch.einsum``: row-wise when every batched operand keeps the batch letter first."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .base import aten, register, RuleContext, Side, Tag


def _einsum_tokens(term: str) -> Optional[List[str]]:
    out, i = [], 0
    while i < len(term):
        if term.startswith("...", i):
            out.append("...")
            i += 3
        elif term[i].isalpha():
            out.append(term[i])
            i += 1
        else:
            return None
    return out


def parse_einsum(equation: str, n_operands: int) -> Optional[Tuple[List[List[str]], List[str]]]:
    """``(operand index lists, output index list)`` of an einsum equation (``"..."`` one token;
    an implicit output is the indices used once, sorted, after any ``...``); None if malformed.

    Example:
        >>> parse_einsum("bld, bd -> bl", 2)
        ([['b', 'l', 'd'], ['b', 'd']], ['b', 'l'])
        >>> parse_einsum("...d,de", 2)
        ([['...', 'd'], ['d', 'e']], ['...', 'e'])
    """
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    terms = [_einsum_tokens(t) for t in lhs.split(",")]
    if len(terms) != n_operands or any(t is None for t in terms):
        return None
    if arrow:
        out = _einsum_tokens(rhs)
        if out is None:
            return None
    else:
        letters = [c for t in terms for c in t if c != "..."]
        out = (["..."] if any("..." in t for t in terms) else []) + sorted(c for c in set(letters) if letters.count(c) == 1)
    return terms, out


@register(torch.einsum, aten.einsum.default)
def _einsum(ctx: RuleContext) -> Tag:
    """Row-wise when one index is the batch: the first index of every batched operand and of the
    output, used once in each, never contracted and carried by no constant operand."""
    equation = ctx.arg(0, "equation")
    ops = list(ctx.args[1:])
    if ctx.node.target is aten.einsum.default or (len(ops) == 1 and isinstance(ops[0], (list, tuple))):
        ops = list(ops[0])
    if ctx.input_side() == Side.CONST:
        return ctx.result(Side.CONST)
    parsed = parse_einsum(equation, len(ops)) if isinstance(equation, str) else None
    if parsed is None:
        return ctx.refuse("einsum in sublist form or with a malformed equation")
    terms, out = parsed
    batched = [k for k, o in enumerate(ops) if ctx.side(o) != Side.CONST]
    b = terms[batched[0]][0] if terms[batched[0]] else None
    if b is None:
        return ctx.refuse(f"einsum {equation!r}: a batched operand is 0-d")
    for k, (term, o) in enumerate(zip(terms, ops)):
        if k in batched and (term[:1] != [b] or term.count(b) != 1):
            return ctx.refuse(f"einsum {equation!r}: batched operand {k} does not have the batch index "
                              f"{b!r} first (exactly once)")
        if k not in batched and b in term:
            return ctx.refuse(f"einsum {equation!r}: constant operand {k} carries the batch index {b!r}")
    if out[:1] != [b] or out.count(b) != 1:
        return ctx.refuse(f"einsum {equation!r}: the output does not keep the batch index {b!r} first "
                          "(it is contracted or moved)")
    if b == "...":  # the batch is the ellipsis' first dim: the ellipses must line up exactly
        widths = {ctx.ndim(ops[k]) - (len(terms[k]) - 1) for k in batched}
        if len(widths) != 1:
            return ctx.refuse(f"einsum {equation!r}: batched operands' '...' cover different numbers of dims")
    return ctx.rowwise()
