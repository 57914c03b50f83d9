"""Property test: random graphs of supported ops and random declarations are rewritten losslessly."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mari_fx
from mari_fx.runtime.modules import SplitLinear

X_WIDTH, T_WIDTH = 6, 4

UNARY = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "double": lambda x: x * 2.0,
         "neg": lambda x: -x, "gelu": F.gelu}


class RandomNet(nn.Module):
    """Interprets a drawn program; each step appends one tensor to the pool."""

    def __init__(self, program):
        super().__init__()
        self.program = program
        self.mods = nn.ModuleDict()
        for k, step in enumerate(program):
            if step[0] == "linear":
                self.mods[f"l{k}"] = nn.Linear(step[2], step[3])
            elif step[0] == "layernorm":
                self.mods[f"n{k}"] = nn.LayerNorm(step[2])
            elif step[0] == "matmul":
                self.register_parameter(f"w{k}", nn.Parameter(torch.randn(step[2], step[3]) / step[2] ** 0.5))
            elif step[0] == "din":
                self.mods[f"d{k}"] = nn.Linear(4 * step[3], step[4])
                self.register_buffer(f"s{k}", torch.randn(1, 3, 1))

    def forward(self, X, t):
        pool = [X, t]
        for k, step in enumerate(self.program):
            op, a = step[0], pool[step[1]]
            if op in UNARY:
                out = UNARY[op](a)
            elif op == "add":
                out = a + pool[step[2]]
            elif op == "mul":
                out = a * pool[step[2]]
            elif op == "cat":
                out = torch.cat([a] + [pool[j] for j in step[2]], dim=-1)
            elif op == "slice":
                out = a[:, step[2]:step[3]]
            elif op == "split":
                out = torch.split(a, step[2], dim=-1)[step[3]]
            elif op == "narrow":
                out = a.narrow(-1, step[2], step[3])
            elif op == "linear":
                out = self.mods[f"l{k}"](a)
            elif op == "layernorm":
                out = self.mods[f"n{k}"](a)
            elif op == "matmul":
                out = a @ getattr(self, f"w{k}")
            elif op == "rowsum":
                out = a.sum(-1, keepdim=True).expand(-1, step[2])
            elif op == "softmax":
                out = torch.softmax(a, dim=step[2])
            elif op == "batchmean":  # couples rows: must never be computed per user
                out = a - a.mean(dim=0, keepdim=True)
            elif op == "din":  # target attention: the candidate a over a length-3 "sequence" made of b
                qe = a.unsqueeze(1).expand(-1, 3, -1)
                k_ = pool[step[2]].unsqueeze(1) * getattr(self, f"s{k}")
                out = self.mods[f"d{k}"](torch.cat([qe, k_, qe - k_, qe * k_], dim=-1)).sum(dim=1)
            elif op == "sub":
                out = a - pool[step[2]] * 0.5
            elif op in ("fm", "gram"):  # field interactions over [B, 2, w]
                e = torch.cat([a.unsqueeze(1), pool[step[2]].unsqueeze(1)], dim=1)
                if op == "fm":
                    s = e.sum(dim=1)
                    out = 0.5 * (s * s - (e * e).sum(dim=1))
                else:
                    out = torch.bmm(e, e.transpose(1, 2)).flatten(1)
            pool.append(out)
        return pool[-1], pool[-2]


@st.composite
def programs(draw):
    widths = [X_WIDTH, T_WIDTH]
    program = []
    for k in range(draw(st.integers(3, 9))):
        a = draw(st.integers(0, len(widths) - 1))
        w = widths[a]
        same = [j for j, wj in enumerate(widths) if wj == w]
        op = draw(st.sampled_from(["relu", "tanh", "sigmoid", "double", "neg", "gelu", "add", "mul", "cat", "cat",
                                   "slice", "split", "narrow", "linear", "linear", "layernorm", "matmul",
                                   "rowsum", "softmax", "batchmean", "sub", "fm", "gram", "din"]))
        if op in ("add", "mul", "sub", "fm"):
            step, wout = (op, a, draw(st.sampled_from(same))), w
        elif op == "din":
            wout = draw(st.integers(1, 4))
            step = (op, a, draw(st.sampled_from(same)), w, wout)
        elif op == "gram":
            step, wout = (op, a, draw(st.sampled_from(same))), 4
        elif op == "cat":
            others = draw(st.lists(st.integers(0, len(widths) - 1), min_size=1, max_size=3))
            step, wout = (op, a, others), w + sum(widths[j] for j in others)
        elif op in ("slice", "narrow"):
            lo = draw(st.integers(0, w - 1))
            hi = draw(st.integers(lo + 1, w))
            step, wout = (op, a, lo, hi if op == "slice" else hi - lo), hi - lo
        elif op == "split":
            if w < 2:
                continue
            first = draw(st.integers(1, w - 1))
            part = draw(st.integers(0, 1))
            step, wout = (op, a, [first, w - first], part), (first if part == 0 else w - first)
        elif op in ("linear", "matmul"):
            wout = draw(st.integers(1, 5))
            step = (op, a, w, wout)
        elif op == "layernorm":
            step, wout = (op, a, w), w
        elif op == "rowsum":
            wout = draw(st.integers(1, 3))
            step = (op, a, wout)
        elif op == "softmax":
            step, wout = (op, a, draw(st.sampled_from([0, 1, -1]))), w
        else:
            step, wout = (op, a), w
        program.append(step)
        widths.append(wout)
    user_cols = draw(st.lists(st.integers(0, X_WIDTH - 1), min_size=1, max_size=X_WIDTH, unique=True))
    return program, sorted(user_cols), draw(st.booleans())


def _selectors(user_cols, t_is_user):
    runs, start = [], None
    for k, c in enumerate(user_cols):
        start = c if start is None else start
        if k + 1 == len(user_cols) or user_cols[k + 1] != c + 1:
            runs.append(f"X[:, {start}:{c + 1}]")
            start = None
    return runs + (["t"] if t_is_user else [])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(drawn=programs(), U=st.integers(1, 3), extra=st.integers(0, 5), seed=st.integers(0, 10**6))
def test_random_graphs_are_rewritten_losslessly(drawn, U, extra, seed):
    program, user_cols, t_is_user = drawn
    torch.manual_seed(seed)
    model = RandomNet(program).eval()
    T = mari_fx.transform(model, _selectors(user_cols, t_is_user), (torch.randn(5, X_WIDTH), torch.randn(5, T_WIDTH)))
    N = U + extra
    idx = torch.cat([torch.arange(U), torch.randint(U, (extra,))])[torch.randperm(N)]
    user_X, X, t = torch.randn(U, X_WIDTH), torch.randn(N, X_WIDTH), torch.randn(N, T_WIDTH)
    X[:, user_cols] = user_X[idx][:, user_cols]
    if t_is_user:
        t = torch.randn(U, T_WIDTH)[idx]
    request = mari_fx.pairs_to_request(T, X, t, user_index=idx)
    got, want = T(**request), model(X, t)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    # structure: every recorded split is a SplitLinear, and nothing else is
    record = T.meta["mari_fx.record"]
    splits = {name for name, m in T.named_modules() if isinstance(m, SplitLinear)}
    assert len(splits) == len(record.split_layers)
