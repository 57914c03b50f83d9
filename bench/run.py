"""``python -m bench.run`` (``make bench``): what mari_fx buys, measured side by side.

For every model of :mod:`bench.models` (neat and fragmented layouts) and every
cell (U users, N candidates) it measures, in one process, interleaved, on the same
inputs:

* ``vanilla``        -- the pair-shaped model on N rows (user features repeated);
* ``one-shot``       -- ``mari_fx.transform(..., split_matmuls=False)``: user-only
                        subgraphs at U rows, no matmul split (the paper's baseline);
* ``mari_fx``        -- the full transform (``check_requests=False``);
* ``mari_fx+check``  -- the same with the per-call request check (``check_requests=True``);
* ``hand-written``   -- :mod:`bench.handwritten`, the practical limit;

eagerly, under ``torch.compile``, as ``torch.export`` programs (``.module()``) and as
TorchScript (``script``: ``mari_fx.export.script``, or ``torchrec_integration.deploy.script``
for the TorchRec model) at the cells given by ``--compiled-candidates``.  Writes ``results.md`` (tabulate),
``results.json`` and ``speedup.png`` to ``--out``.  See docs/bench.md.

Usage::

    python -m bench.run                      # the full run (make bench)
    python -m bench.run --quick              # tiny sizes, few rounds, no compile/export
    python -m bench.run --models coarse --candidates 100,1000 --no-compile
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

import mari_fx

from . import measure, report
from .handwritten import handwritten
from .field_cases import NAMES as FIELD_CASES
from .models import LAYOUTS, MODELS, USER_INPUTS, build, request_inputs

VARIANTS = ("vanilla", "one-shot", "mari_fx", "mari_fx+check", "hand-written")
MODES = ("eager", "compile", "export", "script")
COMPILED_VARIANTS = ("vanilla", "one-shot", "mari_fx", "hand-written")  # +check: eager and export only
DEFAULT_RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

Runner = Callable[[Dict[str, torch.Tensor], Tuple[torch.Tensor, ...]], torch.Tensor]


# --------------------------------------------------------------------------- building variants
@dataclass
class Subject:
    """One (model, layout): the pair model, its transforms, its hand-written rewrite, and the
    request-shaped runners per (variant, mode), built lazily."""

    name: str
    layout: str
    model: torch.nn.Module
    T: Any
    T_os: Any
    T_chk: Any
    H: Optional[torch.nn.Module]
    transform_s: float
    make_inputs: Callable[[int, int, int], Tuple[Dict[str, Any], Tuple[Any, ...]]]
    min_flops: Callable[[int, int], int]
    user_names: Tuple[str, ...] = USER_INPUTS
    runners: Dict[Tuple[str, str], Runner] = field(default_factory=dict)
    skipped: Dict[Tuple[str, str], str] = field(default_factory=dict)
    build_s: Dict[Tuple[str, str], float] = field(default_factory=dict)

    def eager_module(self, variant: str) -> torch.nn.Module:
        mod = {"vanilla": self.model, "one-shot": self.T_os, "mari_fx": self.T,
               "mari_fx+check": self.T_chk, "hand-written": self.H}[variant]
        if mod is None:
            raise RuntimeError(f"no {variant} rewrite of the {self.name} model")
        return mod

    def record(self, variant: str):
        mod = {"one-shot": self.T_os, "mari_fx": self.T, "mari_fx+check": self.T_chk}.get(variant, self.T)
        return mod.meta["mari_fx.record"]


def _transforms(model, selectors, example):
    t0 = time.perf_counter()
    T = mari_fx.transform(model, list(selectors), example, check_requests=False, reassociate=True)
    transform_s = time.perf_counter() - t0
    T_os = mari_fx.transform(model, list(selectors), example, split_matmuls=False, check_requests=False)
    T_chk = mari_fx.transform(model, list(selectors), example, check_requests=True, reassociate=True)
    return T, T_os, T_chk, transform_s


def make_subject(name: str, layout: str, sizes: str) -> Subject:
    if name == "torchrec" or name in FIELD_CASES:
        from .field_cases import make_case as field_case
        from .torchrec_case import make_case

        case = make_case(layout, sizes) if name == "torchrec" else field_case(name, layout, sizes)
        T, T_os, T_chk, transform_s = _transforms(case["model"], case["selectors"], case["example"])
        case["bind"](T)
        return Subject(name, layout, case["model"], T, T_os, T_chk, case.get("handwritten"), transform_s, case["make_inputs"],
                       case["min_flops"], user_names=tuple(s.name for s in T.meta["mari_fx.request"].user_inputs))
    model = build(name, layout, sizes)
    T, T_os, T_chk, transform_s = _transforms(model, USER_INPUTS, model.example_pairs(4))
    return Subject(name, layout, model, T, T_os, T_chk, handwritten(model), transform_s,
                   lambda users, candidates, seed=0: request_inputs(model, users, candidates, seed),
                   model.analytic_min_flops)


def _call_pairs(mod) -> Runner:
    return lambda request, pairs: mod(*pairs)


def _call_request(mod) -> Runner:
    return lambda request, pairs: mod(**request)


def _export_request_module(subject: Subject, variant: str, example: Dict[str, torch.Tensor]):
    """An exported program's module for a request-shaped variant (dynamic U and N)."""
    mx_export = getattr(mari_fx, "export", None)
    if variant in ("one-shot", "mari_fx", "mari_fx+check") and callable(mx_export):
        T = subject.eager_module(variant)
        return mx_export(T, example, check_requests=(variant == "mari_fx+check")).module()
    if variant == "mari_fx+check":
        raise RuntimeError("needs mari_fx.export (the eager request check reads int(user_index.max()))")
    # the hand-written rewrites take T's request: the same inputs, so the same dynamic shapes
    shapes = mari_fx.export.dynamic_shapes(subject.T)
    return torch.export.export(subject.eager_module(variant), (), dict(example), dynamic_shapes=shapes).module()


def _pair_shapes(pairs: Tuple[Any, ...], P: Any) -> Tuple[Any, ...]:
    """``dynamic_shapes`` of the pair-shaped inputs: dim 0 is the pair count ``P``; a KJT's
    lengths are ``len(keys) * P`` and its ids a count of their own."""
    from torch.export import Dim

    out = []
    for k, x in enumerate(pairs):
        if isinstance(x, torch.Tensor):
            out.append({0: P})
        else:  # a KeyedJaggedTensor: one entry per field of its pytree
            fields = {"_values": {0: Dim(f"pair_ids_{k}", min=0)}, "_lengths": {0: len(x.keys()) * P}}
            out.append([fields.get(f) for f in type(x)._fields])
    return tuple(out)


def _script_torchrec_pairs(model: torch.nn.Module):
    """TorchRec's own route for the pair model: ``torchrec.fx.symbolic_trace`` (collections inlined),
    then script.  Scripting the EmbeddingBagCollection as a module is unsafe when two collections
    with the same table names in different orders are scripted in one process (the second reuses
    the first's compiled table order; docs/torchrec.md), and the two layouts here are exactly that."""
    import typing

    import torchrec.fx

    gm = torchrec.fx.symbolic_trace(model)
    hints = typing.get_type_hints(type(model).forward)
    for node in gm.graph.nodes:  # the examples' string annotations, resolved for TorchScript
        if node.op == "placeholder" and node.target in hints:
            node.type = hints[node.target]
        elif node.op == "output":
            node.type = hints.get("return")
    gm.recompile()
    return torch.jit.script(gm)


def _script(subject: Subject, variant: str, mod: torch.nn.Module):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if variant == "vanilla" and subject.name == "torchrec":
            return _script_torchrec_pairs(mod)
        if variant in ("vanilla", "hand-written"):
            return torch.jit.script(mod)
        if subject.name == "torchrec":
            import torchrec_integration

            return torchrec_integration.deploy.script(mod)
        return mari_fx.export.script(mod)


def runner(subject: Subject, variant: str, mode: str) -> Optional[Runner]:
    """The callable for (variant, mode), built on first use; None (and a reason in
    ``subject.skipped``) where it does not build."""
    key = (variant, mode)
    if key in subject.runners:
        return subject.runners[key]
    if key in subject.skipped:
        return None
    t0 = time.perf_counter()
    try:
        mod = subject.eager_module(variant)
        if mode == "eager":
            fn = _call_pairs(mod) if variant == "vanilla" else _call_request(mod)
        elif mode == "compile":
            if variant not in COMPILED_VARIANTS:
                raise RuntimeError("not measured under torch.compile (eager and export only)")
            fn = _call_pairs(torch.compile(mod)) if variant == "vanilla" else _call_request(torch.compile(mod))
        elif mode == "export":
            from torch.export import Dim

            example, pairs = subject.make_inputs(2, 16, 123)
            if variant == "vanilla":
                P = Dim("P", min=1)
                ep = torch.export.export(mod, pairs, dynamic_shapes=_pair_shapes(pairs, P))
                fn = _call_pairs(ep.module())
            else:
                fn = _call_request(_export_request_module(subject, variant, example))
        elif mode == "script":
            scripted = _script(subject, variant, mod)
            fn = _call_pairs(scripted) if variant == "vanilla" else _call_request(scripted)
        else:
            raise ValueError(mode)
    except Exception as e:  # report, do not stop the benchmark
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        subject.skipped[key] = f"{type(e).__name__}: {first[:200]}"
        print(f"    skip {subject.name}/{subject.layout} {variant} [{mode}]: {subject.skipped[key]}", flush=True)
        return None
    subject.runners[key] = fn
    subject.build_s[key] = time.perf_counter() - t0
    return fn


# --------------------------------------------------------------------------- one cell
def record_flops(subject: Subject, variant: str, users: int, candidates: int) -> Optional[int]:
    """What the transform's record predicts for this variant (None where no record applies)."""
    if variant == "hand-written":
        return None
    rec = subject.record(variant)
    transformed = variant != "vanilla"
    # work inside modules the record does not itemise (the seq ranker's transformer encoder)
    extra = getattr(subject.model, "unrecorded_flops", None)
    return (sum(l.flops(users, candidates, transformed) for l in rec.layers)
            + (extra(users, candidates, transformed) if extra is not None else 0))


def run_cell(subjects: Sequence[Subject], users: int, candidates: int, modes: Sequence[str],
             args: argparse.Namespace, budget_s: Optional[float] = None) -> List[Dict[str, Any]]:
    """Measure every (layout, variant, mode) of one model at (U, N), interleaved."""
    seed = users * 100003 + candidates
    inputs = {s.layout: s.make_inputs(users, candidates, seed) for s in subjects}  # same tensors per layout
    fns: Dict[Tuple[str, str, str], Callable[[], Any]] = {}
    rows: Dict[Tuple[str, str, str], Dict[str, Any]] = {}
    with torch.no_grad():
        reference = {s.layout: s.model(*inputs[s.layout][1]) for s in subjects}
    for s in subjects:
        request, pairs = inputs[s.layout]
        for mode in modes:
            for variant in VARIANTS:
                fn = runner(s, variant, mode)
                if fn is None:
                    continue
                key = (s.layout, variant, mode)
                row = {"model": s.name, "layout": s.layout, "users": users, "candidates": candidates,
                       "variant": variant, "mode": mode}
                try:
                    with torch.no_grad(), warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        out = fn(request, pairs)  # also compiles / recompiles outside the timed rounds
                    diff = (out.float() - reference[s.layout].float()).abs().max().item() if out.numel() else 0.0
                    torch.testing.assert_close(out, reference[s.layout], rtol=1e-4, atol=1e-4)
                except Exception as e:
                    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                    row["error"] = f"{type(e).__name__}: {first[:200]}"
                    print(f"    {s.layout} {variant} [{mode}] FAILED: {row['error']}", flush=True)
                    rows[key] = row
                    continue
                row["max_abs_diff"] = diff
                rows[key] = row
                fns[key] = (lambda fn=fn, request=request, pairs=pairs: fn(request, pairs))

    # FLOPs (eager modules; a compiled / exported variant runs the same math) and record predictions
    flops: Dict[Tuple[str, str], int] = {}
    for (layout, variant, mode), row in rows.items():
        if "error" in row:
            continue
        s = next(x for x in subjects if x.layout == layout)
        request, pairs = inputs[layout]
        if (layout, variant) not in flops:
            mod = s.eager_module(variant)
            flops[layout, variant] = measure.count_flops(
                (lambda: mod(*pairs)) if variant == "vanilla" else (lambda: mod(**request)))
        row["flops"] = flops[layout, variant]
        row["flops_record"] = record_flops(s, variant, users, candidates)
        row["flops_min"] = s.min_flops(users, candidates)

    samples = measure.interleaved_latency(
        {k: fns[k] for k in fns}, rounds=args.rounds, target_round_s=args.round_s,
        warmup=args.warmup, budget_s=args.cell_budget_s if budget_s is None else budget_s)
    for key, xs in samples.items():
        row = rows[key]
        row["calls"] = len(xs)
        row["rounds"] = samples.rounds
        row["median_ms"] = measure.quantile(xs, 0.5) * 1e3
        row["p95_ms"] = measure.quantile(xs, 0.95) * 1e3
        row["cand_per_s"] = candidates / measure.quantile(xs, 0.5)
        if args.memory:
            row["peak_mb"] = measure.peak_bytes(fns[key]) / 2**20
    derive(rows)
    return list(rows.values())


def derive(rows: Dict[Tuple[str, str, str], Dict[str, Any]]) -> None:
    """Ratios against vanilla (same layout, same mode) and against hand-written."""
    for (layout, variant, mode), row in rows.items():
        if "median_ms" not in row:
            continue
        base = rows.get((layout, "vanilla", mode))
        eager_base = rows.get((layout, "vanilla", "eager"))
        hand = rows.get((layout, "hand-written", mode))
        if base and "median_ms" in base:
            row["speedup"] = base["median_ms"] / row["median_ms"]
            row["flops_speedup"] = base["flops"] / row["flops"] if row.get("flops") else None
            if row.get("flops_speedup"):
                row["efficiency"] = row["speedup"] / row["flops_speedup"]
        if eager_base and "median_ms" in eager_base:
            row["speedup_vs_eager_vanilla"] = eager_base["median_ms"] / row["median_ms"]
        if hand and "median_ms" in hand:
            row["vs_hand"] = row["median_ms"] / hand["median_ms"]


# --------------------------------------------------------------------------- driver
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="tiny model sizes, N in {10, 100}, 3 rounds, no compile/export (the smoke test)")
    p.add_argument("--models", default=",".join([*MODELS, "torchrec"]),
                   help=f"comma list of {[*MODELS, 'torchrec', *FIELD_CASES]} (default: {[*MODELS, 'torchrec']}; "
                        "the field-layout rows dlrm, ctr on request, see bench/field_cases.py)")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help="comma list of neat,fragmented")
    p.add_argument("--candidates", default=None, help="comma list of N (default 10,100,500,1000,5000; quick: 10,100)")
    p.add_argument("--users", default="1,8", help="comma list of U; U > 1 gets ragged candidate lists (default 1,8)")
    p.add_argument("--compile", dest="compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also measure under torch.compile (default: on, off with --quick)")
    p.add_argument("--export", dest="export", action=argparse.BooleanOptionalAction, default=None,
                   help="also measure torch.export programs (default: on, off with --quick)")
    p.add_argument("--script", dest="script", action=argparse.BooleanOptionalAction, default=None,
                   help="also measure TorchScript modules (default: on, off with --quick)")
    p.add_argument("--compiled-candidates", default=None,
                   help="N at which compile/export/script variants run, at U=1 (default 100,1000; quick: 100)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: CPUs available)")
    p.add_argument("--system-malloc", action="store_true",
                   help="keep glibc's default trimming (by default the run re-executes itself with "
                        "MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ raised, as CPU serving does)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds per cell (default 25; quick 3)")
    p.add_argument("--round-s", type=float, default=None,
                   help="seconds per variant per round (default 0.03; quick 0.002)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up calls per variant per cell")
    p.add_argument("--cell-budget-s", type=float, default=None,
                   help="stop a cell's rounds (after >= 3) once this many seconds are spent (default 45; quick 5)")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory call")
    p.add_argument("--no-profile", dest="profile", action="store_false",
                   help="skip profiling the cells where a target is missed")
    p.add_argument("--time-budget-min", type=float, default=None,
                   help="soft limit for the whole run: each cell's round budget shrinks (never below 3 rounds) so "
                        "that the run ends near it (default 20; quick 2; 0 = none)")
    p.add_argument("--target-candidates", type=int, default=1000, help="N of the target checks (U=1)")
    p.add_argument("--out", default=DEFAULT_RESULTS, help=f"output folder (default {DEFAULT_RESULTS})")
    p.add_argument("--no-plot", dest="plot", action="store_false", help="do not draw speedup.png")
    args = p.parse_args(argv)
    q = args.quick
    args.sizes = "tiny" if q else "full"
    args.candidates = [int(x) for x in (args.candidates or ("10,100" if q else "10,100,500,1000,5000")).split(",")]
    args.users = [int(x) for x in args.users.split(",")]
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.layouts = [l.strip() for l in args.layouts.split(",") if l.strip()]
    for m in args.models:
        if m not in MODELS and m != "torchrec" and m not in FIELD_CASES:
            p.error(f"unknown model {m!r}; choose from {list(MODELS)} (or torchrec, {', '.join(FIELD_CASES)})")
    for l in args.layouts:
        if l not in LAYOUTS:
            p.error(f"unknown layout {l!r}; choose from {list(LAYOUTS)}")
    args.compile = (not q) if args.compile is None else args.compile
    args.export = (not q) if args.export is None else args.export
    args.script = (not q) if args.script is None else args.script
    args.compiled_candidates = [int(x) for x in (args.compiled_candidates or ("100" if q else "100,1000")).split(",")]
    args.rounds = args.rounds or (3 if q else 25)
    args.round_s = args.round_s if args.round_s is not None else (0.002 if q else 0.03)
    args.cell_budget_s = args.cell_budget_s if args.cell_budget_s is not None else (5.0 if q else 45.0)
    args.time_budget_min = args.time_budget_min if args.time_budget_min is not None else (2.0 if q else 20.0)
    if args.threads is None:
        try:
            args.threads = len(os.sched_getaffinity(0))
        except AttributeError:
            args.threads = os.cpu_count() or 1
    return args


def cells(args: argparse.Namespace) -> List[Tuple[int, int, List[str]]]:
    """(U, N, modes) in run order: N ascending, then U."""
    extra = [m for m, on in (("compile", args.compile), ("export", args.export), ("script", args.script)) if on]
    out = []
    for n in sorted(set(args.candidates) | (set(args.compiled_candidates) if extra else set())):
        for u in args.users:
            if u > n:
                continue
            modes = ["eager"] + (extra if (u == 1 and n in args.compiled_candidates) else [])
            if n not in args.candidates and modes == ["eager"]:
                continue
            out.append((u, n, modes))
    return out


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    env = measure.environment(torch.get_num_threads())
    env["command"] = "python -m bench.run " + " ".join(sys.argv[1:] if argv is None else argv)
    env["sizes"] = args.sizes
    env["malloc"] = ("glibc defaults (--system-malloc)" if args.system_malloc else
                     measure.malloc_settings())
    print(f"torch {env['torch']} | threads {env['threads']} (interop {env['interop_threads']}) | "
          f"CPU {env['cpu_model']} x{env['cpus_available']} | load {env['loadavg_at_start']}", flush=True)
    print(f"allocator: {env['malloc']}", flush=True)
    print(f"sizes={args.sizes} models={args.models} layouts={args.layouts} compile={args.compile} "
          f"export={args.export} rounds={args.rounds} round_s={args.round_s}", flush=True)
    t_start = time.perf_counter()
    rows: List[Dict[str, Any]] = []
    skipped: Dict[str, str] = {}
    profiles: Dict[str, Any] = {}
    meta: Dict[str, Any] = {}
    plan = cells(args)
    cells_left = len(plan) * len(args.models)
    for mode, on, flag in (("compile", args.compile, "--compile"), ("export", args.export, "--export"),
                           ("script", args.script, "--script")):
        if not on:
            skipped[f"all models [{mode}]"] = f"off ({'--quick' if args.quick else '--no-' + mode}; {flag} turns it on)"
    for name in args.models:
        try:
            subjects = [make_subject(name, layout, args.sizes) for layout in args.layouts]
        except Exception as e:
            cells_left -= len(plan)
            if name != "torchrec":
                raise
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            skipped["torchrec"] = f"TODO: the TorchRec example did not build here ({type(e).__name__}: {first[:200]})"
            print(f"  torchrec: {skipped['torchrec']}", flush=True)
            continue
        for s in subjects:
            rec = s.T.meta["mari_fx.record"]
            meta[f"{name}/{s.layout}"] = {
                "transform_s": s.transform_s,
                "split_layers": list(rec.split_layers),
                "layers": [{"name": l.name, "in": l.in_features, "out": l.out_features, "user_columns": l.user_columns,
                            "action": l.action, "reason": l.reason} for l in rec.layers],
                "parameters": sum(p.numel() for p in s.model.parameters()),
                "handwritten": s.H is not None,
            }
            print(f"{name}/{s.layout}: transform {s.transform_s:.2f}s, split {list(rec.split_layers)}", flush=True)
        for users, candidates, modes in plan:
            t0 = time.perf_counter()
            budget = args.cell_budget_s
            if args.time_budget_min > 0:
                left = args.time_budget_min * 60 - (t0 - t_start)
                budget = max(0.0, min(budget, 0.7 * left / max(cells_left, 1)))
            cells_left -= 1
            cell_rows = run_cell(subjects, users, candidates, modes, args, budget)
            rows += cell_rows
            rounds = max((r.get("rounds", 0) for r in cell_rows), default=0)
            print(f"  {name} U={users} N={candidates} {'+'.join(modes)} ({time.perf_counter() - t0:.1f}s, "
                  f"{rounds} rounds): " + report.cell_summary(cell_rows), flush=True)
        for s in subjects:
            for (variant, mode), reason in s.skipped.items():
                skipped[f"{name}/{s.layout} {variant} [{mode}]"] = reason
            for (variant, mode), secs in s.build_s.items():
                if mode != "eager":
                    meta[f"{name}/{s.layout}"][f"build_s {variant} [{mode}]"] = secs
        if args.profile:
            profiles.update(report.profile_misses(subjects, rows, args, runner))
        del subjects
        if args.compile:
            torch._dynamo.reset()
    env["elapsed_s"] = time.perf_counter() - t_start
    result = {"env": env, "args": {k: v for k, v in vars(args).items()}, "rows": rows, "skipped": skipped,
              "profiles": profiles, "meta": meta}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    md = report.markdown(result)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md)
    if args.plot:
        try:
            report.plot(result, os.path.join(args.out, "speedup.png"))
        except Exception as e:
            print(f"plot skipped: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc()
    print(report.targets_text(result), flush=True)
    print(f"wrote {args.out}/results.md, results.json{', speedup.png' if args.plot else ''} "
          f"in {env['elapsed_s']:.0f}s", flush=True)
    return result



if __name__ == "__main__":
    measure.reexec_with_allocator_settings("bench.run")
    main()
