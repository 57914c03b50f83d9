"""``python -m bench.serving``: the serving options side by side, at small and large N.

For every model of :mod:`bench.models` (fragmented layout) and every cell U in {1, 8},
N in {10, 100, 1000, 10000} it times, in one process, interleaved, on the same request:

* ``original``     -- the pair-shaped model on N rows (user features repeated beforehand);
* ``transformed``  -- ``mari_fx.transform(..., reassociate=True)`` with its request check on
                      (the default a user gets);
* ``hand-written`` -- :mod:`bench.handwritten`;

each as ``eager``, ``compile`` (``torch.compile``), ``export`` (``torch.export`` program's
``.module()``, dynamic rows; ``mari_fx.export`` for the transformed one) and ``script``
(TorchScript: ``mari_fx.export.script`` for the transformed one, ``torch.jit.trace`` for
the others).  Writes ``serving.md``, ``serving.json`` and ``serving.png`` to ``--out``
(default ``bench/results``).  Ratios are of medians measured in the same rounds: ``x orig``
= original / transformed (same mode), ``/ hand`` = transformed / hand-written (same mode),
``/ hand eager`` = transformed / hand-written eager.

Usage::

    python -m bench.serving                       # the full run (part of make bench)
    python -m bench.serving --quick               # tiny sizes, eager + script, N in {10, 100}
"""
from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

import mari_fx

from . import measure
from .handwritten import handwritten
from .models import MODELS, USER_INPUTS, build, request_inputs

SIDES = ("original", "transformed", "hand-written")
MODES = ("eager", "compile", "export", "script")
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _build(model, T, H, side: str, mode: str, request: Dict[str, torch.Tensor], pairs: Tuple[torch.Tensor, ...]):
    """A callable ``fn(request, pairs)`` for (side, mode)."""
    mod = {"original": model, "transformed": T, "hand-written": H}[side]
    if mode == "eager":
        m = mod
    elif mode == "compile":
        m = torch.compile(mod)
    elif mode == "export":
        from torch.export import Dim

        if side == "transformed":
            m = mari_fx.export(T, request).module()
        elif side == "original":
            P = Dim("P", min=2)
            m = torch.export.export(mod, pairs, dynamic_shapes=tuple({0: P} for _ in pairs)).module()
        else:
            Ud, Nd = Dim("U", min=2), Dim("N", min=2)
            shapes = {k: {0: (Ud if k in USER_INPUTS else Nd)} for k in request}
            m = torch.export.export(mod, (), dict(request), dynamic_shapes=shapes).module()
    elif mode == "script":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if side == "transformed":
                m = mari_fx.export.script(T)
            elif side == "original":
                m = torch.jit.trace(mod, pairs, check_trace=False)
            else:
                m = torch.jit.trace(mod, example_kwarg_inputs=dict(request), check_trace=False)
    else:
        raise ValueError(mode)
    if side == "original":
        return lambda request, pairs: m(*pairs)
    return lambda request, pairs: m(**request)


def run(args: argparse.Namespace) -> Dict[str, Any]:
    torch.set_num_threads(args.threads)
    sizes = "tiny" if args.quick else "full"
    rows: List[Dict[str, Any]] = []
    skipped: Dict[str, str] = {}
    t_start = time.perf_counter()
    for name in args.models.split(","):
        model = build(name, "fragmented", sizes)
        T = mari_fx.transform(model, list(USER_INPUTS), model.example_pairs(4), reassociate=True)
        H = handwritten(model)
        build_req, build_pairs = request_inputs(model, 3, 16, 7)
        fns: Dict[Tuple[str, str], Callable] = {}
        for mode in args.modes.split(","):
            for side in SIDES:
                try:
                    fns[side, mode] = _build(model, T, H, side, mode, build_req, build_pairs)
                except Exception as e:  # report, do not stop
                    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                    skipped[f"{name} {side} [{mode}]"] = f"{type(e).__name__}: {first[:160]}"
                    print(f"  skip {name} {side} [{mode}]: {skipped[f'{name} {side} [{mode}]']}", flush=True)
        for users in args.users:
            for candidates in args.candidates:
                request, pairs = request_inputs(model, users, candidates, seed=users * 7 + candidates)
                with torch.no_grad():
                    want = model(*pairs)
                cell: Dict[Tuple[str, str], Callable] = {}
                for key, fn in fns.items():
                    try:
                        with torch.no_grad(), warnings.catch_warnings():
                            warnings.simplefilter("ignore")
                            torch.testing.assert_close(fn(request, pairs), want, rtol=1e-4, atol=1e-4)
                        cell[key] = (lambda fn=fn: fn(request, pairs))
                    except Exception as e:
                        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                        skipped[f"{name} {key[0]} [{key[1]}] U={users} N={candidates}"] = first[:160]
                samples = measure.interleaved_latency(cell, rounds=args.rounds, target_round_s=args.round_s,
                                                      warmup=1, min_calls=1, budget_s=args.cell_budget_s)
                med = {k: measure.quantile(v, 0.5) * 1e3 for k, v in samples.items()}
                for (side, mode), ms in med.items():
                    row = {"model": name, "users": users, "candidates": candidates, "side": side, "mode": mode,
                           "median_ms": ms, "p25_ms": measure.quantile(samples[side, mode], 0.25) * 1e3,
                           "p75_ms": measure.quantile(samples[side, mode], 0.75) * 1e3}
                    if side == "transformed":  # ratios: medians of per-round ratios (measure.Samples)
                        me = ("transformed", mode)
                        if ("original", mode) in med:
                            row["x_orig"] = samples.paired_ratio(("original", mode), me)
                        if ("hand-written", mode) in med:
                            row["vs_hand"] = samples.paired_ratio(me, ("hand-written", mode))
                        if ("hand-written", "eager") in med:
                            row["vs_hand_eager"] = samples.paired_ratio(me, ("hand-written", "eager"))
                    rows.append(row)
                t = {k: v for k, v in med.items() if k[0] == "transformed"}
                print(f"{name:6s} U={users} N={candidates:5d} " + "  ".join(
                    f"{m}: {med.get(('original', m), float('nan')):.3f}/{ms:.3f}/{med.get(('hand-written', m), float('nan')):.3f} ms"
                    for (_, m), ms in t.items()), flush=True)
    return {"rows": rows, "skipped": skipped, "threads": args.threads, "load": os.getloadavg(),
            "seconds": time.perf_counter() - t_start, "torch": torch.__version__, "sizes": sizes,
            "malloc": measure.malloc_settings()}


def target_misses(result: Dict[str, Any]) -> List[str]:
    """The cells that miss a serving target: transformed >= 1.0x the original (eager); transformed /
    hand-written eager <= 1.10 at N = 10 and <= 1.05 above; compiled transformed no slower than
    hand-written eager.  Judged on the rows' ratios (medians of per-round ratios); each miss says
    whether the two latency interquartile ranges overlap (then the gap is within this run's spread)."""
    by = {(r["model"], r["users"], r["candidates"], r["side"], r["mode"]): r for r in result["rows"]}
    misses = []
    for (m, u, n, side, mode), t in sorted(by.items()):
        if side != "transformed" or mode not in ("eager", "compile"):
            continue
        o, h = by.get((m, u, n, "original", "eager")), by.get((m, u, n, "hand-written", "eager"))
        checks = []  # (what, the other side, ratio, missed)
        if mode == "eager" and o and "x_orig" in t:
            checks.append(("x orig >= 1.00", o, t["x_orig"], t["x_orig"] < 1.0))
        if h and "vs_hand_eager" in t:
            bound = 1.0 if mode == "compile" else (1.10 if n <= 10 else 1.05)
            checks.append((f"/ hand eager <= {bound:.2f}", h, t["vs_hand_eager"], t["vs_hand_eager"] > bound))
        for what, other, ratio, missed in checks:
            if missed:
                overlap = t["p25_ms"] <= other["p75_ms"] and other["p25_ms"] <= t["p75_ms"]
                misses.append(f"{m} U={u} N={n} {mode}: {what}: {ratio:.3f} (transformed {t['median_ms']:.3f} ms, "
                              f"{other['side']} eager {other['median_ms']:.3f} ms)"
                              + (", interquartile ranges overlap" if overlap else ""))
    return misses


def write(result: Dict[str, Any], out: str, plot: bool = True) -> None:
    from tabulate import tabulate

    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "serving.json"), "w") as f:
        json.dump(result, f, indent=1)
    rows = [r for r in result["rows"] if r["side"] == "transformed"]
    by = {(r["model"], r["users"], r["candidates"], r["side"], r["mode"]): r for r in result["rows"]}
    table = []
    for r in rows:
        o = by.get((r["model"], r["users"], r["candidates"], "original", r["mode"]), {})
        h = by.get((r["model"], r["users"], r["candidates"], "hand-written", r["mode"]), {})
        f = lambda x, d=3: "" if x is None else f"{x:.{d}f}"  # noqa: E731
        table.append([r["model"], r["users"], r["candidates"], r["mode"], f(o.get("median_ms")), f(r["median_ms"]),
                      f(h.get("median_ms")), f(r.get("x_orig"), 2), f(r.get("vs_hand"), 3),
                      f(r.get("vs_hand_eager"), 3)])
    lines = ["# Serving options: original vs transformed vs hand-written", "",
             f"`python -m bench.serving` ({result['sizes']} sizes, torch {result['torch']}, "
             f"{result['threads']} threads, load average at the end {' '.join(f'{x:.2f}' for x in result['load'])}, "
             f"{result['seconds']:.0f} s, {result.get('malloc', 'glibc defaults')}).  "
             "Transformed = `mari_fx.transform(..., reassociate=True)` with the "
             "request check on.  Medians of per-call latencies measured interleaved in one process; ratios are "
             "medians over rounds of the ratio within a round (the sides ran back to back); "
             "`x orig` = original / transformed, `/ hand` = transformed / hand-written (same mode), "
             "`/ hand eager` = transformed / hand-written eager.  Methodology: docs/bench.md.", "",
             tabulate(table, headers=["model", "U", "N", "mode", "original ms", "transformed ms", "hand ms",
                                      "x orig", "/ hand", "/ hand eager"], tablefmt="github"), ""]
    misses = target_misses(result)
    lines += ["## Targets", "", "Transformed >= 1.0x the original (eager); transformed / hand-written eager <= 1.10 at "
              "N = 10, <= 1.05 above; transformed compiled <= hand-written eager.  "
              + (f"{len(misses)} misses:" if misses else "Every cell meets them."), ""]
    lines += [f"- {x}" for x in misses] + ([""] if misses else [])
    if result["skipped"]:
        lines += ["## Not measured", ""] + [f"- {k}: {v}" for k, v in result["skipped"].items()] + [""]
    with open(os.path.join(out, "serving.md"), "w") as f:
        f.write("\n".join(lines))
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        models = sorted({r["model"] for r in rows})
        fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
        for ax, m in zip(axes[0], models):
            for mode in MODES:
                for users, style in ((1, "-"), (8, "--")):
                    pts = sorted((r["candidates"], r["x_orig"]) for r in rows
                                 if r["model"] == m and r["mode"] == mode and r["users"] == users and "x_orig" in r)
                    if pts:
                        ax.plot(*zip(*pts), style, marker="o", label=f"{mode} U={users}")
            ax.axhline(1.0, color="grey", lw=0.8)
            ax.set_xscale("log")
            ax.set_title(m)
            ax.set_xlabel("N candidates")
            ax.set_ylabel("speedup over the original (same mode)")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "serving.png"), dpi=90)


def main(argv: Optional[Sequence[str]] = None) -> int:
    if argv is None:
        measure.reexec_with_allocator_settings("bench.serving")
    p = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, eager + script, N in {10, 100}, U=1, 2 rounds")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--modes", default=None, help=f"comma list of {MODES} (default all; quick: eager,script)")
    p.add_argument("--candidates", default=None, help="comma list of N (default 10,100,1000,10000)")
    p.add_argument("--users", default=None, help="comma list of U (default 1,8)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--round-s", type=float, default=0.02)
    p.add_argument("--cell-budget-s", type=float, default=None)
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--system-malloc", action="store_true", help="keep glibc's default trimming (see bench.run)")
    args = p.parse_args(argv)
    q = args.quick
    args.modes = args.modes or ("eager,script" if q else ",".join(MODES))
    args.candidates = [int(x) for x in (args.candidates or ("10,100" if q else "10,100,1000,10000")).split(",")]
    args.users = [int(x) for x in (args.users or ("1" if q else "1,8")).split(",")]
    args.rounds = args.rounds or (2 if q else 12)
    args.cell_budget_s = args.cell_budget_s or (2.0 if q else 8.0)
    print(f"torch {torch.__version__}, {args.threads} threads, load average {os.getloadavg()}", flush=True)
    result = run(args)
    write(result, args.out, plot=not args.no_plot)
    print(f"wrote {os.path.join(args.out, 'serving.md')} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
