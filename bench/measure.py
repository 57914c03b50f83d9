"""Measurement primitives: interleaved latency, FLOPs, peak memory, op profiles, environment.

All calls run under ``torch.no_grad()``.  See docs/bench.md for the methodology.
"""
from __future__ import annotations

import contextlib
import gc
import os
import platform
import sys
import random
import time
from typing import Callable, Dict, List, Mapping, Sequence, Tuple

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from mari_fx.report import timing

aten = torch.ops.aten


# glibc returns large freed blocks to the OS and page-faults them back on the next call; how
# often depends on the order of allocations and frees, so it differs between variants that do
# the same work (measured: mari_fx eager 5.7 ms vs hand-written 4.1 ms at coarse U=1 N=1000
# with vanilla interleaved; 3.7 vs 3.7 ms with these settings).  Production CPU serving keeps
# freed memory (jemalloc / tcmalloc, or these two settings); every variant gets the same.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1000000000", "MALLOC_TRIM_THRESHOLD_": "1000000000"}


def malloc_settings() -> str:
    """This process's values of :data:`MALLOC_ENV`, for the results' headers."""
    return " ".join(f"{k}={os.environ.get(k, 'unset')}" for k in MALLOC_ENV)


def reexec_with_allocator_settings(module: str) -> None:
    """glibc reads :data:`MALLOC_ENV` at start-up: re-run ``python -m module`` with the same
    arguments and these settings, unless they are set already or ``--system-malloc`` is given."""
    if "--system-malloc" in sys.argv or all(os.environ.get(k) == v for k, v in MALLOC_ENV.items()):
        return
    os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]], {**os.environ, **MALLOC_ENV})

# torch.utils.flop_counter counts aten.addmm / mm / bmm / baddbmm, but not their in-place
# forms; the hand-written rewrites use ``addmm_`` (the broadcast-add fused into the GEMM's
# accumulate), so count those with the same formulas.
_INPLACE_FLOPS = {
    aten.addmm_: flop_counter.addmm_flop.__wrapped__,
    aten.baddbmm_: flop_counter.baddbmm_flop.__wrapped__,
}


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call ``fn()`` (2 per multiply-add), torch.utils.flop_counter plus in-place GEMMs,
    with the attention fast paths off (their fused kernels are invisible to the counter)."""
    from mari_fx.report.flops import attention_fastpath_off

    with torch.no_grad(), attention_fastpath_off(), FlopCounterMode(display=False, custom_mapping=_INPLACE_FLOPS) as counter:
        fn()
    return counter.get_total_flops()


@contextlib.contextmanager
def quiet_stderr():
    """Silence file descriptor 2 (kineto prints a line at every profiler start and stop)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes live in torch's CPU allocator during one call, above the level at its start.

    Read from ``torch.profiler(profile_memory=True)``: every allocation and free
    through c10's CPU allocator is an event carrying the running total of allocated
    bytes; the peak is the largest total minus the total before the first event.
    Includes the output and every intermediate tensor (also those allocated by
    compiled / exported code); excludes the inputs, the weights, and scratch memory
    that BLAS / oneDNN allocate outside c10.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with quiet_stderr(), torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    events: List[Tuple[int, int, int]] = []

    def walk(e) -> None:
        if e.tag == _EventType.Allocation:
            events.append((e.start_time_ns, e.extra_fields.alloc_size, e.extra_fields.total_allocated))
        for c in e.children:
            walk(c)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    if not events:
        return 0
    events.sort()
    base = events[0][2] - events[0][1]
    return max(0, max(total for _, _, total in events) - base)


def op_profile(fn: Callable[[], object], calls: int = 5) -> Dict[str, Tuple[float, int]]:
    """Self CPU time per aten op, in ms per call, and the op count per call."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        fn()
        with quiet_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                fn()
    out: Dict[str, Tuple[float, int]] = {}
    for e in prof.key_averages():
        if e.self_cpu_time_total <= 0:
            continue
        out[e.key] = (e.self_cpu_time_total / 1e3 / calls, round(e.count / calls))
    return out


class Samples(dict):
    """Latencies per variant; ``rounds``: how many rounds ran; ``round_of[k][j]``: the round of
    ``self[k][j]``."""

    rounds = 0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.round_of: Dict[str, List[int]] = {k: [] for k in self}

    def paired_ratio(self, a: str, b: str) -> float:
        """Median over rounds of (median latency of ``a`` / median latency of ``b``) in the same
        round: the two ran back to back, so load that changes from round to round cancels.

        Example:
            >>> s = Samples({"a": [2.0, 2.2, 8.0, 8.8], "b": [1.0, 1.0, 4.0, 4.0]})
            >>> s.round_of = {"a": [0, 0, 1, 1], "b": [0, 0, 1, 1]}
            >>> round(s.paired_ratio("a", "b"), 3)
            2.1
        """

        def per_round(k: str) -> List[List[float]]:
            rounds: Dict[int, List[float]] = {}
            for x, r in zip(self[k], self.round_of[k]):
                rounds.setdefault(r, []).append(x)
            return [rounds[r] for r in sorted(rounds)]

        return timing.paired_ratio(per_round(a), per_round(b))


def interleaved_latency(
    fns: Mapping[str, Callable[[], object]],
    rounds: int,
    target_round_s: float,
    warmup: int = 2,
    max_calls_per_round: int = 50,
    min_calls: int = 2,
    budget_s: float = float("inf"),
    slow_s: float = 0.2,
) -> Dict[str, List[float]]:
    """Per-call latencies (seconds) of every ``fn``, measured in interleaved rounds.

    Each variant was called once before (the output check, which also compiles); it gets
    ``warmup`` more untimed calls (one if a call takes over ``slow_s``).  Each round calls
    every variant ``1 + k`` times back to back (``k >= min_calls`` chosen once from the fastest
    warm-up call so one variant's share of a round is about ``target_round_s``) and keeps the
    last ``k``: the first call after another variant pays for that variant's footprint in the
    caches and the allocator (fresh pages for its large tensors), which is not the variant's
    own steady-state cost.  The variant order is shuffled every round (seeded), so drift in
    machine load and any order effect are spread over all variants alike.  GC is off while timing.
    Stops early (after >= 3 rounds) once ``budget_s`` is spent.
    """
    keys = list(fns)
    with torch.no_grad():
        est = {}
        for k in keys:
            t = []
            for _ in range(max(1, warmup)):
                t0 = time.perf_counter()
                fns[k]()
                t.append(time.perf_counter() - t0)
                if t[-1] > slow_s:  # a slow variant: one warm-up call is enough (it ran once already)
                    break
            est[k] = max(min(t), 1e-7)
        reps = {k: max(min_calls, min(max_calls_per_round, int(target_round_s / est[k]))) for k in keys}
        rng = random.Random(0)
        samples = Samples({k: [] for k in keys})
        gc.collect()
        gc.disable()
        start = time.perf_counter()
        try:
            for r in range(rounds):
                order = rng.sample(keys, len(keys))
                for k in order:
                    fn, out = fns[k], samples[k]
                    fn()  # settle in after the previous variant (untimed)
                    for _ in range(reps[k]):
                        t0 = time.perf_counter_ns()
                        fn()
                        out.append((time.perf_counter_ns() - t0) * 1e-9)
                        samples.round_of[k].append(r)
                samples.rounds = r + 1
                if r >= 2 and time.perf_counter() - start > budget_s:
                    break
        finally:
            gc.enable()
    return samples


def quantile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (q in [0, 1])."""
    s = sorted(xs)
    if not s:
        return float("nan")
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(threads: int) -> Dict[str, object]:
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    try:
        load = " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        load = "?"
    return {
        "torch": torch.__version__,
        "threads": threads,
        "interop_threads": torch.get_num_interop_threads(),
        "cpu_model": cpu_model(),
        "cpus_available": affinity,
        "python": platform.python_version(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "loadavg_at_start": load,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
