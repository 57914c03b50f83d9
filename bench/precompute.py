"""Item-side precompute benchmark: the original model vs ``T`` (mari_fx.transform) vs
``P`` (mari_fx.precompute_items over a catalog), at U users, N candidates, M catalog items.

    python -m bench.precompute                 # coarse and fine rankers, U=1, N=1000, M=100,000
    python -m bench.precompute --quick         # tiny sizes, M=5,000 (a smoke run)

Reports per model: median latency of interleaved runs (``bench.measure.interleaved_latency``,
2 threads by default), FLOPs per request (``torch.utils.flop_counter``), the cache's memory and
what it holds, the time to build it, and the max abs difference of T and P from the model.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

import mari_fx
from bench import measure
from bench.models import ITEM_INPUTS, USER_INPUTS, build, ragged_index


def run_model(name: str, users: int, candidates: int, catalog_size: int, sizes: str, rounds: int,
              target_round_s: float, seed: int = 0) -> Dict[str, Any]:
    model = build(name, "neat", sizes, seed)
    T = mari_fx.transform(model, list(USER_INPUTS), model.example_pairs(8, seed), reassociate=True)
    catalog = model.item_batch(catalog_size, seed + 1)
    t0 = time.perf_counter()
    P = mari_fx.precompute_items(T, {k: catalog[k] for k in ITEM_INPUTS}, progress=False)
    build_s = time.perf_counter() - t0

    g = torch.Generator().manual_seed(seed + 2)
    idx = ragged_index(users, candidates, seed)
    rows = torch.randint(catalog_size, (candidates,), generator=g)
    user = model.user_batch(users, seed)
    items = {k: catalog[k].index_select(0, rows) for k in ITEM_INPUTS}
    t_req = {**user, **items, "user_index": idx}
    p_req = {**user, "item_row": rows, "user_index": idx}
    pairs = tuple(user[k].index_select(0, idx) for k in USER_INPUTS) + tuple(items[k] for k in ITEM_INPUTS)
    fns = {"original": lambda: model(*pairs), "T (mari_fx)": lambda: T(**t_req), "P (item cache)": lambda: P(**p_req)}
    with torch.no_grad():
        want = fns["original"]()
        diffs = {k: float((fn() - want).abs().max()) for k, fn in fns.items() if k != "original"}
    flops = {k: measure.count_flops(fn) for k, fn in fns.items()}
    samples = measure.interleaved_latency(fns, rounds=rounds, target_round_s=target_round_s)
    record = P.meta["mari_fx.record"]
    return {
        "model": name, "users": users, "candidates": candidates, "catalog_size": catalog_size,
        "latency_ms": {k: 1e3 * measure.quantile(v, 0.5) for k, v in samples.items()},
        "rounds": samples.rounds,
        "flops": flops,
        "cache_bytes": sum(c.bytes for c in record.item_cache),
        "cached": [{"source": c.source, "shape": list(c.shape), "bytes": c.bytes,
                    "flops_saved_per_candidate": c.flops_saved_per_candidate} for c in record.item_cache],
        "build_s": build_s,
        "max_abs_diff": diffs,
    }


def format_results(results: Sequence[Dict[str, Any]], threads: int) -> str:
    out = [f"item-side precompute: median latency of interleaved runs, {threads} thread(s); FLOPs per request", ""]
    out.append("| model | U | N | M | variant | latency (ms) | vs original | FLOPs | cache memory |")
    out.append("|---|---:|---:|---:|---|---:|---:|---:|---:|")
    for r in results:
        base = r["latency_ms"]["original"]
        for k, ms in r["latency_ms"].items():
            mem = f"{r['cache_bytes'] / 2**20:,.1f} MiB" if k.startswith("P") else "-"
            out.append(f"| {r['model']} | {r['users']} | {r['candidates']} | {r['catalog_size']:,} | {k} | {ms:.3f} | "
                       f"{base / ms:.2f}x | {r['flops'][k]:,} | {mem} |")
    out.append("")
    for r in results:
        cached = ", ".join(f"{c['source']} {c['shape']} ({c['flops_saved_per_candidate']:,} FLOPs/candidate)"
                           for c in r["cached"])
        out.append(f"- {r['model']}: cached {cached}; built in {r['build_s']:.1f} s; max |T - model| "
                   f"{r['max_abs_diff']['T (mari_fx)']:.2e}, max |P - model| {r['max_abs_diff']['P (item cache)']:.2e}")
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    if argv is None:
        measure.reexec_with_allocator_settings("bench.precompute")
    p = argparse.ArgumentParser(prog="python -m bench.precompute", description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["coarse", "fine"], choices=["coarse", "fine", "dcn"])
    p.add_argument("--users", type=int, default=1)
    p.add_argument("--candidates", type=int, default=1000)
    p.add_argument("--catalog-size", type=int, default=100_000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--quick", action="store_true", help="tiny models, M=5,000, 3 rounds")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    p.add_argument("--system-malloc", action="store_true", help="keep glibc's default trimming (see bench.run)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes, m, rounds, round_s = ("tiny", 5000, 3, 0.02) if args.quick else ("full", args.catalog_size, args.rounds, 0.2)
    results: List[Dict[str, Any]] = []
    with torch.no_grad():
        for name in args.models:
            results.append(run_model(name, args.users, args.candidates, m, sizes, rounds, round_s))
    print(format_results(results, args.threads))
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"threads": args.threads, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
