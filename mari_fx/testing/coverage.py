"""``python -m mari_fx.testing.coverage``: the architecture-coverage table of docs/coverage.md.

For each example family: FLOPs of the pair-shaped model and of its transform on one request
of U=1 user and N=1000 candidates (``torch.utils.flop_counter``: matmuls, attention; not
elementwise ops), and what was split, hoisted and refused.
"""
from __future__ import annotations

import sys
from typing import Callable, List, Tuple

import torch
from tabulate import tabulate

import mari_fx
from mari_fx.testing import examples as ex

U, N = 1, 1000


def _families() -> List[Tuple[str, Callable, List[str], Callable]]:
    """(family, model factory, user selectors, inputs(rows, seed) -> pair-shaped args)."""
    ids = lambda hi, *shape: (lambda n, g: torch.randint(hi, (n, *shape), generator=g))  # noqa: E731
    dense = lambda d: (lambda n, g: torch.randn(n, d, generator=g))  # noqa: E731
    return [
        ("MLP coarse ranker (user tower + fusion MLP)", lambda: ex.CoarseRanker(), ["user"], [dense(16), dense(8)]),
        ("  same, interleaved user/item columns", lambda: ex.CoarseRanker(layout="interleaved"), ["user"],
         [dense(16), dense(8)]),
        ("packed single tensor, interleaved features", lambda: ex.PackedRanker(),
         ex.PackedRanker().user_selectors(), [dense(12)]),
        ("DIN target attention", lambda: ex.DINRanker(encoder=False), ["hist", "user_id"],
         [ids(50, 10), ids(20), ids(50)]),
        ("DIN + transformer encoder over the user sequence (BST)", lambda: ex.DINRanker(), ["hist", "user_id"],
         [ids(50, 10), ids(20), ids(50)]),
        ("  same, with a key padding mask (src_key_padding_mask)", lambda: ex.DINRanker(padding_mask=True),
         ["hist", "user_id"], [ids(50, 10), ids(20), ids(50)]),
        ("  same, seq-first encoder (batch_first=False) reached by transposes",
         lambda: ex.DINRanker(padding_mask=True, seq_first=True), ["hist", "user_id"], [ids(50, 10), ids(20), ids(50)]),
        ("DCN-v2 cross network", lambda: ex.DCNRanker(), ["user"], [dense(12), dense(6)]),
        ("DCN-Mix (low-rank cross)", lambda: ex.DCNRanker(low_rank=4), ["user"], [dense(12), dense(6)]),
        ("MMoE multi-task (3 experts, 2 gates)", lambda: ex.MMoERanker(), ["user"], [dense(10), dense(6)]),
        ("FM second-order term", lambda: ex.InteractionRanker("fm"), ["user_ids"], [ids(100, 4), ids(100, 2)]),
        ("NFM bi-interaction + MLP", lambda: ex.InteractionRanker("bi"), ["user_ids"], [ids(100, 4), ids(100, 2)]),
        ("DLRM dot interactions", lambda: ex.InteractionRanker("dot"), ["user_ids"], [ids(100, 4), ids(100, 2)]),
    ]


def coverage_rows() -> List[Tuple]:
    rows = []
    for name, factory, users, makers in _families():
        torch.manual_seed(0)
        model = factory().eval()
        g = torch.Generator().manual_seed(0)
        example = tuple(m(4, g) for m in makers)
        T = mari_fx.transform(model, users, example)
        spec = T.meta["mari_fx.request"]
        user_args = {s.arg for s in spec.user_inputs}
        idx = torch.zeros(N, dtype=torch.long)
        per_user = {}
        for arg, m in zip(spec.args, makers):
            per_user[arg] = m(U, g)
        pairs = []
        for arg, m in zip(spec.args, makers):
            pairs.append(per_user[arg][idx] if arg in user_args else m(N, g))
        if any(s.kind == "packed" for s in spec.inputs):  # user columns repeat per user, like real pairs
            cols = [c for s in spec.user_inputs for c in s.columns]
            pairs[0][:, cols] = per_user[spec.args[0]][idx][:, cols]
        request = mari_fx.pairs_to_request(T, *pairs, user_index=idx)
        before = mari_fx.count_flops(model, *pairs)
        after = mari_fx.count_flops(T, **request)
        record = T.meta["mari_fx.record"]
        rows.append((name, f"{before / 1e6:.2f}", f"{after / 1e6:.2f}", f"{before / after:.2f}x",
                     ", ".join(record.split_layers) or "-", len(record.hoisted), len(record.refused)))
    return rows


HEADERS = ["family", "MFLOPs before", "MFLOPs after", "FLOPs ratio", "split layers", "hoisted nodes",
           "refused nodes"]


def coverage_table() -> str:
    return tabulate(coverage_rows(), headers=HEADERS, tablefmt="github")


_START, _END = "<!-- coverage-table", "<!-- /coverage-table -->"


def write(path: str) -> None:
    """Replace the table between the coverage-table markers of ``path``."""
    with open(path) as f:
        text = f.read()
    head, rest = text.split(_START, 1)
    marker_line, _ = rest.split("\n", 1)
    _, tail = rest.split(_END, 1)
    with open(path, "w") as f:
        f.write(f"{head}{_START}{marker_line}\n{coverage_table()}\n{_END}{tail}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--write"]:
        write(sys.argv[2])
    else:
        sys.stdout.write(coverage_table() + "\n")
