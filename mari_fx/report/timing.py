"""Time a model and its transformed module side by side: ``mari-fx bench`` and :func:`compare`.

Both run in this process on the same request (the original on pair-shaped inputs built
from it before timing), interleaved: in every round each side runs a batch of calls, the
order alternating, so drift in machine load hits both alike.  Every call is timed on its
own; the table gives the median, the spread (interquartile range over the median), the
speedup (the median over rounds of original / transformed within a round: the two ran back
to back, so load that changes between rounds cancels) and the FLOPs ratio (original /
transformed, ``torch.utils.flop_counter``).  See docs/bench-your-model.md.
"""
from __future__ import annotations

import gc
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from .flops import count_flops
from ..frontend.inputs import request_to_pairs

SIDES = ("original", "transformed")


def _quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _interleaved(fns: Dict[str, Callable[[], Any]], rounds: int, round_s: float,
                 warmup: int) -> Dict[str, List[List[float]]]:
    """Per-call latencies (seconds) of each function, one list per round, measured in alternating rounds."""
    calls: Dict[str, int] = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        t0 = time.perf_counter()
        fn()
        one = max(time.perf_counter() - t0, 1e-7)
        calls[name] = max(1, min(1000, int(round_s / one)))
    samples: Dict[str, List[List[float]]] = {name: [] for name in fns}
    order = list(fns)
    enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(rounds):
            for name in (order if r % 2 == 0 else order[::-1]):
                fn, xs = fns[name], []
                samples[name].append(xs)
                for _ in range(calls[name]):
                    t0 = time.perf_counter_ns()
                    fn()
                    xs.append((time.perf_counter_ns() - t0) * 1e-9)
    finally:
        if enabled:
            gc.enable()
    return samples


def paired_ratio(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> float:
    """The median over rounds of ``median(a[r]) / median(b[r])``: the two sides of a round ran
    back to back, so a round in which the machine was slower for both does not move it.

    Example:
        >>> paired_ratio([[2.0, 2.2], [8.0, 8.8, 8.4]], [[1.0], [4.0, 4.0]])  # round 2 ran 4x slower
        2.1
    """
    return _quantile([_quantile(x, 0.5) / _quantile(y, 0.5) for x, y in zip(a, b)], 0.5)


def compare(model: nn.Module, T: fx.GraphModule, *, users: Sequence[int] = (1, 8),
            candidates: Sequence[int] = (10, 100, 1000), compiled: bool = False, rounds: int = 10,
            round_s: float = 0.02, warmup: int = 2, seed: int = 0, progress: bool = True,
            threads: Optional[int] = None) -> List[Dict[str, Any]]:
    """Time ``model`` (pair-shaped) and ``T`` (its :func:`mari_fx.transform`) at every (U, N).

    For each cell a random request of U users and N candidates (:func:`mari_fx.report.verify.random_request`)
    is built; the original runs on the pairs it stands for.  Outputs are compared first
    (``torch.testing.assert_close``).  With ``compiled`` both are also timed under
    ``torch.compile`` (compilation happens in the warm-up, outside the timed calls).
    Returns one dict per (mode, U, N): ``median_ms`` / ``spread`` per side, ``speedup``
    (original / transformed: the median of the per-round ratios) and ``flops_ratio``
    (original FLOPs / transformed FLOPs).

    Example:
        >>> import torch, mari_fx
        >>> from mari_fx.testing.factories import coarse_ranker
        >>> model, example = coarse_ranker()
        >>> T = mari_fx.transform(model, ["user"], example)
        >>> rows = compare(model, T, users=[1], candidates=[10], rounds=2, round_s=0.001, progress=False)
        >>> [(r["mode"], r["users"], r["candidates"]) for r in rows], rows[0]["speedup"] > 0
        ([('eager', 1, 10)], True)
    """
    from .verify import random_request

    cells = [(u, n) for n in candidates for u in users if u <= n]
    if not cells:
        raise ValueError(f"no cell with users <= candidates in users={list(users)}, candidates={list(candidates)}")
    modes = ["eager"] + (["compile"] if compiled else [])
    runners: Dict[str, Dict[str, Callable[..., Any]]] = {"eager": {"original": model, "transformed": T}}
    if compiled:
        runners["compile"] = {"original": torch.compile(model), "transformed": torch.compile(T)}
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(cells) * len(modes), desc="mari-fx bench", unit="cell", leave=False)
    rows: List[Dict[str, Any]] = []
    try:
        for u, n in cells:
            request = random_request(T, u, n, seed=seed + 1000 * u + n)
            pairs = request_to_pairs(T, request)
            with torch.no_grad():
                expected = model(**pairs)
                flops = {"original": count_flops(model, **pairs), "transformed": count_flops(T, **request)}
            for mode in modes:
                if bar is not None:
                    bar.set_postfix_str(f"{mode} U={u} N={n}")
                orig, trans = runners[mode]["original"], runners[mode]["transformed"]
                fns = {"original": lambda: orig(**pairs), "transformed": lambda: trans(**request)}
                with torch.no_grad():
                    got = fns["transformed"]()  # compiles here, outside the timed calls
                    fns["original"]()
                    exp_leaves, _ = torch.utils._pytree.tree_flatten(expected)
                    got_leaves, _ = torch.utils._pytree.tree_flatten(got)
                    torch.testing.assert_close(got_leaves, exp_leaves)
                    samples = _interleaved(fns, rounds, round_s, warmup)
                row: Dict[str, Any] = {"mode": mode, "users": u, "candidates": n}
                for side in SIDES:
                    xs = [x for per_round in samples[side] for x in per_round]
                    med = _quantile(xs, 0.5)
                    row[f"{side}_median_ms"] = med * 1e3
                    row[f"{side}_spread"] = (_quantile(xs, 0.75) - _quantile(xs, 0.25)) / med
                    row[f"{side}_calls"] = len(xs)
                row["speedup"] = paired_ratio(samples["original"], samples["transformed"])
                row["flops_ratio"] = flops["original"] / flops["transformed"] if flops["transformed"] else None
                rows.append(row)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        torch.set_num_threads(previous_threads)
    return rows


def format_table(rows: Sequence[Dict[str, Any]]) -> str:
    """The rows of :func:`compare` as a table (one line per mode and cell).

    Example:
        >>> row = {"mode": "eager", "users": 1, "candidates": 10, "original_median_ms": 0.2, "original_spread": 0.05,
        ...        "transformed_median_ms": 0.1, "transformed_spread": 0.1, "speedup": 2.0, "flops_ratio": 3.0}
        >>> print(format_table([row]))  # doctest: +NORMALIZE_WHITESPACE
        mode      U    N    original ms  spread    transformed ms  spread      speedup  FLOPs ratio
        ------  ---  ---  -------------  --------  ----------------  --------  ---------  -------------
        eager     1   10          0.200  ±5%                  0.100  ±10%          2.00x  3.00x
    """
    from tabulate import tabulate

    table = []
    for r in rows:
        ratio = "-" if r.get("flops_ratio") is None else f"{r['flops_ratio']:.2f}x"
        table.append([r["mode"], r["users"], r["candidates"], f"{r['original_median_ms']:.3f}",
                      f"±{r['original_spread'] * 100:.0f}%", f"{r['transformed_median_ms']:.3f}",
                      f"±{r['transformed_spread'] * 100:.0f}%", f"{r['speedup']:.2f}x", ratio])
    return tabulate(table, headers=["mode", "U", "N", "original ms", "spread", "transformed ms", "spread",
                                    "speedup", "FLOPs ratio"], disable_numparse=True, colalign=["left", "right", "right", "right", "left",
                                                                         "right", "left", "right", "right"])


def environment() -> str:
    """One line: torch version, threads, and the load average (timings on a busy machine are noise)."""
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load}"
