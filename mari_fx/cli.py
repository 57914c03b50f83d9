"""``mari-fx``: see whether MaRI pays off for a model, and export the rewritten model.

    mari-fx report TARGET --user SELECTOR... [--candidates N] [--users U] [--json] [--all] [--audit] [--catalog-size M]
    mari-fx export TARGET --user SELECTOR... --out model.pt2
    mari-fx bench TARGET --user SELECTOR... [--candidates 10,100,1000] [--users 1,8] [--compile]

TARGET is a factory ``package.module:function`` (or ``file.py:function``) returning
``(model, example_args[, example_kwargs])``, or a saved pair-shaped ExportedProgram
``model.pt2``; see :mod:`mari_fx.testing.factories`.  The
report's data comes from :mod:`mari_fx.report`; this module only formats it.

Exit codes: 0 done; 2 bad arguments, or the target cannot be loaded or traced;
3 ``torch.export`` failed or the exported program differs from the model;
1 an unexpected error (a bug: please report it with ``--debug`` output).
Failures print one line on stderr; ``--debug`` prints the traceback instead.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

from .errors import MariError, VerificationError

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_EXPORT = 0, 1, 2, 3


class _UsageError(Exception):
    """Bad arguments / target (exit 2)."""


class _ExportFailed(Exception):
    """Export or its verification failed (exit 3)."""


class _Parser(argparse.ArgumentParser):
    # argparse exits 2 with a usage block; keep its code but make the reason one line.
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mari-fx", description="Lossless MaRI rewrites of pair-shaped ranking models.",
                     epilog="exit codes: 0 done; 2 bad arguments / cannot load or trace TARGET; 3 export failed; "
                            "1 unexpected error.  Docs: docs/report.md, docs/deploy.md")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("target", metavar="TARGET",
                       help="factory 'package.module:function' (or 'file.py:function') returning "
                            "(model, example_args[, example_kwargs]), or a saved pair-shaped ExportedProgram .pt2")
        p.add_argument("--user", "-u", dest="user", action="extend", nargs="+", required=True, metavar="SELECTOR",
                       help="user-side input(s): 'arg', 'arg[key]' or 'arg[:, a:b]' (repeatable)")
        p.add_argument("--debug", action="store_true", help="print tracebacks (and what torch prints while tracing) instead of one-line errors")

    rep = sub.add_parser("report", help="print what MaRI rewrites and the FLOPs it saves",
                         description="Transform TARGET and print one row per Linear / matmul, then the totals.")
    common(rep)
    rep.add_argument("--candidates", "-n", type=int, default=1000, metavar="N",
                     help="candidates per request (default 1000)")
    rep.add_argument("--users", type=int, default=1, metavar="U", help="users per request (default 1)")
    rep.add_argument("--json", action="store_true", help="print the report as JSON (keys: docs/report.md)")
    rep.add_argument("--all", action="store_true", help="also list every node of the transformed graph")
    rep.add_argument("--no-split", action="store_true",
                     help="only hoist user-only subgraphs (split_matmuls=False, the paper's baseline)")
    rep.add_argument("--seed", type=int, default=0, help="seed of the request the FLOPs are measured on")
    rep.add_argument("--catalog-size", type=int, default=None, metavar="M",
                     help="also show what an item cache (mari_fx.precompute_items) of M catalog items would hold and save")
    rep.add_argument("--catalog-inputs", action="extend", nargs="+", default=None, metavar="NAME",
                     help="item inputs the catalog holds (default: every item input); with --catalog-size")
    rep.add_argument("--audit", action="store_true",
                     help="also measure each layer's user columns on a probe batch: what MaRI could still save, "
                          "and where the proof lost it")

    exp = sub.add_parser("export", help="transform TARGET and save a torch.export program with dynamic U and N",
                         description="Transform TARGET, export it with mari_fx.export and torch.export.save it.")
    common(exp)
    exp.add_argument("--out", "-o", required=True, metavar="PATH", help="where to save the program (.pt2)")
    exp.add_argument("--no-checks", action="store_true", help="leave the request check out of the program")
    exp.add_argument("--no-verify", action="store_true",
                     help="skip comparing the saved program with the model at (U, N) = (1, 1) and (3, 7)")

    ben = sub.add_parser("bench", help="time the model and its transformed module side by side",
                         description="Transform TARGET and time the original and the transformed module, "
                                     "interleaved, at every (U, N); see docs/bench-your-model.md.")
    common(ben)
    ben.add_argument("--candidates", "-n", type=_int_list, default=[10, 100, 1000], metavar="N,N,...",
                     help="candidates per request (default 10,100,1000)")
    ben.add_argument("--users", type=_int_list, default=[1, 8], metavar="U,U,...", help="users per request (default 1,8)")
    ben.add_argument("--compile", action="store_true", help="also time both under torch.compile")
    ben.add_argument("--rounds", type=int, default=10, help="interleaved rounds per cell (default 10)")
    ben.add_argument("--round-ms", type=float, default=20.0, help="milliseconds per side per round (default 20)")
    ben.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the run")
    ben.add_argument("--reassociate", action="store_true", help="transform with reassociate=True")
    ben.add_argument("--json", action="store_true", help="print the rows as JSON")
    ben.add_argument("--no-progress", action="store_true", help="no progress bar (on stderr)")
    return parser


def _int_list(text: str) -> List[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``mari-fx`` console script and of ``python -m mari_fx``.

    Returns the exit code (see the module docstring).

    Example:
        >>> main(["report", "mari_fx.testing.factories:coarse_ranker", "--user", "user", "--candidates", "10", "--json"])
        ... # doctest: +ELLIPSIS
        {
          "schema": "mari_fx.report/1",
        ...
        0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    # A console script does not put the working directory on sys.path (python -m does);
    # factories next to the user's code should import the same way under both.
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        args = build_parser().parse_args(argv)
        if args.command == "report":
            return _report(args)
        if args.command == "bench":
            return _bench(args)
        return _export(args)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except BrokenPipeError:  # `mari-fx report ... | head`: the reader left; not an error of ours
        _mute_stdout()
        return 0
    except _UsageError as e:
        return _fail(EXIT_USAGE, str(e), debug)
    except _ExportFailed as e:
        return _fail(EXIT_EXPORT, str(e), debug)
    except MariError as e:  # declarations, tracing, target loading: the model cannot be taken as given
        return _fail(EXIT_USAGE, f"{type(e).__name__}: {e}", debug)
    except Exception as e:
        return _fail(EXIT_INTERNAL, f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)",
                     debug)


def _mute_stdout() -> None:
    # Python flushes stdout again at exit; point it at devnull so that flush cannot fail too
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (e.g. captured by a test)
        pass


def _fail(code: int, message: str, debug: bool) -> int:
    if debug:
        import traceback

        traceback.print_exc()
    print("mari-fx: error: " + " ".join(message.split()), file=sys.stderr)  # one line
    return code


@contextlib.contextmanager
def _quiet(debug: bool):
    """Hold back what torch prints while tracing (dynamo dumps whole graphs on stderr when a
    capture fails) so that stdout is the report and stderr the one-line error; --debug shows it."""
    if debug:
        logger = logging.getLogger("mari_fx")
        previous = logger.level
        logger.setLevel(logging.DEBUG)  # mari_fx.api.quiet_capture then holds nothing back
        try:
            yield
        finally:
            logger.setLevel(previous)
        return
    sink = io.StringIO()
    # torch also logs through handlers bound to the real stderr: mute logging as well
    logging.disable(logging.CRITICAL)
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            yield
    finally:
        logging.disable(logging.NOTSET)


def _load_and_transform(args: argparse.Namespace, split_matmuls: bool = True, keep_trace: bool = False,
                        **options: Any):
    """``(model, T)``, or ``(model, T, traced)`` with ``keep_trace`` (the audit runs the trace)."""
    from .api import trace, transform
    from .testing.factories import load

    with _quiet(args.debug):
        model, ex_args, ex_kwargs = load(args.target)
        if keep_trace:
            traced = trace(model, args.user, ex_args, ex_kwargs)
            return model, transform(traced, split_matmuls=split_matmuls), traced
        T = transform(model, args.user, ex_args, ex_kwargs, split_matmuls=split_matmuls, **options)
    return model, T


# --------------------------------------------------------------------------- report
def _report(args: argparse.Namespace) -> int:
    import torch

    from .report.build import build_report

    if args.users < 1 or args.candidates < args.users:
        raise _UsageError(f"need 1 <= --users <= --candidates, got --users {args.users} --candidates {args.candidates}")
    model, T, *traced = _load_and_transform(args, split_matmuls=not args.no_split, keep_trace=args.audit)
    with torch.no_grad():
        data = build_report(model, T, users=args.users, candidates=args.candidates, seed=args.seed,
                            include_nodes=args.all, target=args.target, user_inputs=args.user,
                            audit=args.audit, traced=traced[0] if traced else None,
                            catalog_size=args.catalog_size, catalog_inputs=args.catalog_inputs)
    print(json.dumps(data, indent=2) if args.json else format_report(data))
    return EXIT_OK


def _n(x: Any) -> str:
    return "-" if x is None else f"{x:,}"


def _short(op: str) -> str:
    """``torch.nn.modules.linear.Linear`` -> ``Linear``; ``torch.matmul`` -> ``matmul``."""
    return op.rsplit(".", 1)[-1]


def format_report(data: Dict[str, Any]) -> str:
    """The human-readable report: the layer table, then the summary.

    Example:
        >>> import torch
        >>> from mari_fx.report import report
        >>> from mari_fx.testing.examples import CoarseRanker
        >>> text = format_report(report(CoarseRanker().eval(), ["user"], (torch.randn(4, 16), torch.randn(4, 8))))
        >>> [line.split()[:2] for line in text.splitlines() if line.startswith("fusion.0")]
        [['fusion.0', 'Linear']]
    """
    from tabulate import tabulate

    U, N = data["users"], data["candidates"]
    out: List[str] = []
    title = f"mari-fx report: {data['model']}"
    if data.get("target"):
        title += f" ({data['target']})"
    out.append(title)
    out.append("user inputs: " + ", ".join(i["name"] + ("" if i["name"] == i["source"] else f" ({i['source']})")
                                         for i in data["inputs"] if i["side"] == "user"))
    out.append(f"FLOPs per request at U={U} user(s), N={N} candidates; user / item / mixed: the layer's input "
               "columns by side" + ("" if data["split_matmuls"] else
                                                                        "  [--no-split: matmuls not split]"))
    out.append("")
    audit = data.get("audit")
    headers = ["layer", "op", "in -> out", "user", "item", "mixed", "rewrite", "why not", "FLOPs before",
               "FLOPs after"]
    align = ["left", "left", "right", "right", "right", "right", "left", "left", "right", "right"]
    if audit is not None:  # measured next to proved: right after the proof's own columns
        headers[6:6], align[6:6] = ["measured user", "lost at"], ["right", "left"]
    rows = []
    for l in data["layers"]:
        row = [l["name"], _short(l["op"]), f"{l['in_features']} -> {l['out_features']}", l["user_columns"],
               l["item_columns"], l["mixed_columns"], l["action"], l["reason"], _n(l["flops_before"]),
               _n(l["flops_after"])]
        if audit is not None:
            row[6:6] = [l["measured_user_columns"], l["lost_at"]]
        rows.append(row)
    if rows:
        out.append(tabulate(rows, headers=headers, colalign=align))
    else:
        out.append("(no Linear / matmul layers)")
    f = data["flops"]
    out.append("")
    speed = f"{f['speedup']:.2f}x" if f["speedup"] is not None else "-"
    out.append(f"total FLOPs ({f['method']}): before {_n(f['before'])}, after {_n(f['after'])}: "
               f"FLOPs-bound speedup {speed}")
    lspeed = f"{f['layers_speedup']:.2f}x" if f["layers_speedup"] is not None else "-"
    out.append(f"  sum of the layer rows: before {_n(f['layers_before'])}, after {_n(f['layers_after'])} ({lspeed})")
    out.append("  before: the pair-shaped model on N pair rows; after: the transformed module on U users, N candidates")
    if audit is not None:
        probe = audit["probe"]
        out.append(f"audit: realised {audit['realised']:.1%} of the attainable layer saving (layer FLOPs after "
                   f"{_n(f['layers_after'])}, attainable {_n(audit['flops_after_attainable'])}); measured on "
                   f"{probe['probes']} probes of {probe['users']} users, {probe['pairs']} pairs ({probe['data']} data)")
        out.append("  layers with user columns measured but not split: "
                   + (", ".join(audit["layers_short"]) or "none"))
    out.append("split layers: " + (", ".join(data["split_layers"]) or "none"))
    out.append("hoisted to the user batch (U rows): " + (", ".join(data["hoisted"]) or "nothing"))
    if data["broadcasts"]:
        out.append("user values gathered to N rows: " + ", ".join(f"{b['source']} (for {b['at']})"
                                                                   for b in data["broadcasts"]))
    if data["refused"]:
        out.append("")
        out.append("ops that blocked a rewrite (computed at N rows although only user data reached them):")
        out.append(tabulate([(r["node"], r["op"], r["location"], r["reason"]) for r in data["refused"]],
                            headers=["node", "op", "where", "why"]))
    else:
        out.append("ops that blocked a rewrite: none")
    if "item_cache" in data:
        out.extend(_format_item_cache(data["item_cache"], N))
    if data.get("recovered"):
        out.append("ops a tag rule calls mixed whose user elements the element map kept (not a loss): "
                   + ", ".join(f"{r['node']} ({_short(r['op'])})" for r in data["recovered"]))
    if "nodes" in data:
        out.append("")
        out.append("all nodes of the transformed graph (rows: U = once per user, N = per candidate, C = once):")
        out.append(tabulate([(n["name"], _short(n["op"]), n["rows"] or "-", n["tag"] or "-") for n in data["nodes"]],
                            headers=["node", "op", "rows", "tag"]))
    return "\n".join(out)


def _format_item_cache(c: Dict[str, Any], N: int) -> List[str]:
    from tabulate import tabulate

    out = ["", f"item cache for a catalog of {c['catalog_size']:,} items over {', '.join(c['catalog_inputs'])} "
               "(mari_fx.precompute_items; docs/precompute.md):"]
    rows = [(v["source"], " x ".join(map(str, v["shape"])) or "1", v["dtype"], _n(v["bytes_per_row"]), _n(v["bytes"]),
             _n(v["flops_saved_per_candidate"])) for v in c["values"]]
    out.append(tabulate(rows, headers=["cached value", "per item", "dtype", "bytes gathered / candidate",
                                       "bytes (M rows)", "FLOPs saved / candidate"],
                        colalign=["left", "right", "left", "right", "right", "right"]))
    after = c["flops_after_with_cache"]
    out.append(f"cache memory {c['bytes'] / 2**20:,.1f} MiB; per candidate: gathers {_n(c['gather_bytes_per_candidate'])} "
               f"bytes, saves {_n(c['flops_saved_per_candidate'])} FLOPs"
               + (f"; FLOPs per request with the cache at N={N}: {_n(after)}" if after is not None else ""))
    return out


# --------------------------------------------------------------------------- bench
def _bench(args: argparse.Namespace) -> int:
    from .report.timing import compare, environment, format_table

    if args.rounds < 1 or args.round_ms <= 0:
        raise _UsageError("need --rounds >= 1 and --round-ms > 0")
    if not any(u <= n for u in args.users for n in args.candidates):
        raise _UsageError(f"need some --users <= --candidates, got --users {args.users} --candidates {args.candidates}")
    import torch

    model, T = _load_and_transform(args, reassociate=args.reassociate)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    with _quiet(args.debug) if args.compile else contextlib.nullcontext():
        rows = compare(model, T, users=args.users, candidates=args.candidates, compiled=args.compile,
                       rounds=args.rounds, round_s=args.round_ms / 1e3, progress=not args.no_progress)
    if args.json:
        print(json.dumps({"schema": "mari_fx.bench/1", "target": args.target, "rows": rows}, indent=2))
        return EXIT_OK
    print(f"mari-fx bench: {type(model).__name__} ({args.target})")
    print(environment())
    print("median latency per call, spread = interquartile range / median, "
          "speedup = median of per-round original / transformed, FLOPs ratio = original / transformed")
    print("")
    print(format_table(rows))
    return EXIT_OK


# --------------------------------------------------------------------------- export
def _input_shape(T, spec) -> str:
    """``user [U, 256]``: the row dim by side, the other dims from the traced example."""
    example = (T.meta.get("mari_fx.example") or {}).get(spec.name)
    rows = "U" if str(spec.side) == "user" else "N"
    shape = getattr(example, "shape", None)  # None for an extension's input type (e.g. a KJT)
    dims = [rows] + [str(d) for d in shape[1:]] if shape is not None else [rows, "..."]
    return f"{spec.name} [{', '.join(dims)}]"


VERIFY_SHAPES = ((1, 1), (3, 7))


def _export(args: argparse.Namespace) -> int:
    import torch

    from .deploy import programs as mexport
    from .frontend.inputs import request_to_pairs
    from .report.verify import compare_outputs, random_request

    model, T = _load_and_transform(args)
    try:
        with _quiet(args.debug):
            ep = mexport.export(T, check_requests=not args.no_checks)
    except MariError as e:
        raise _ExportFailed(str(e)) from e
    try:
        torch.export.save(ep, args.out)
    except Exception as e:
        raise _ExportFailed(f"cannot save to {args.out!r}: {type(e).__name__}: {e}") from e
    lines = [f"wrote {args.out}: torch.export program of {type(model).__name__} with dynamic U (users) and N "
             f"(candidates), U, N >= 1; request checks {'off' if args.no_checks else 'on'}",
             "inputs: " + ", ".join(_input_shape(T, s) for s in T.meta["mari_fx.request"].inputs)
             + ", user_index [N] int64"]
    if not args.no_verify:
        loaded = torch.export.load(args.out).module()
        worst = 0.0
        for users, candidates in VERIFY_SHAPES:
            request = random_request(T, users, candidates, seed=users * 1000 + candidates)
            with torch.no_grad():
                expected = model(**request_to_pairs(T, request))
                got = loaded(**request)
            try:
                worst = max(worst, compare_outputs(expected, got))
            except VerificationError as e:
                first = str(e).strip().splitlines()
                raise _ExportFailed(f"the saved program differs from the model at U={users}, N={candidates}: "
                                    + " ".join(first[:2])) from None
        lines.append(f"verified: the loaded program matches the original model at (U, N) in "
                     f"{{{', '.join(map(str, VERIFY_SHAPES))}}} (max |diff| {worst:.1e})")
    print("\n".join(lines))
    return EXIT_OK
