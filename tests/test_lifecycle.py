"""Lifecycle of a transformed module: request validation in every deployed form, save/load
round trips, weight refresh, TorchRec requests with U > N, and small papercuts."""
import copy
import io
import pickle
import sys
import time
import warnings

import pytest
import torch

import mari_fx
from mari_fx.errors import RequestError
from mari_fx.testing.examples import CoarseRanker, DCNRanker, DictRanker
from mari_fx.runtime.modules import SplitLinear

SELECTORS = ["x[user_id]", "x[user_age]"]  # two user inputs, so their row counts can disagree


@pytest.fixture(scope="module")
def forms(tmp_path_factory):
    """The DictRanker's T in every form it deploys in: eager, scripted, exported (raw and via mari_fx)."""
    model = DictRanker().eval()
    T = mari_fx.transform(model, SELECTORS, (DictRanker.example_batch(4),))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        buf = io.BytesIO()
        torch.jit.save(torch.jit.script(T), buf)
        buf.seek(0)
        scripted = torch.jit.load(buf)
    path = tmp_path_factory.mktemp("ep") / "dict.pt2"
    torch.export.save(mari_fx.export(T, mari_fx.random_request(T, 3, 7)), str(path))
    return model, T, {"eager": T, "scripted": scripted, "exported": mari_fx.export.load(str(path)),
                      "exported_raw": torch.export.load(str(path)).module()}


def _with(name, value):
    return lambda r: {**r, name: value(r[name]) if callable(value) else value}


def _index(values):
    return lambda r: {**r, "user_index": torch.tensor(values)}


# (case, request edit, the input the error must name, the message in eager / scripted / mari_fx.export.load forms)
BAD = [
    ("item width", _with("x_hist_item_ids", lambda t: t[:, :3]), "x_hist_item_ids",
     r"item input 'x_hist_item_ids' has shape \[7, 3\], expected \[N, 5\] \(dtype int64\)"),
    ("item ndim", _with("x_item_price", lambda t: t[:, 0]), "x_item_price",
     r"item input 'x_item_price' has shape \[7\], expected \[N, 1\]"),
    ("user ndim", _with("x_user_id", lambda t: t[:, None]), "x_user_id",
     r"user input 'x_user_id' has shape \[3, 1\], expected \[U\]"),
    ("item dtype", _with("x_item_price", lambda t: t.double()), "x_item_price",
     r"item input 'x_item_price' has dtype torch.float64, expected torch.float32"),
    ("user dtype", _with("x_user_age", lambda t: t.half()), "x_user_age",
     r"user input 'x_user_age' has dtype torch.float16, expected torch.float32"),
    ("None", _with("x_item_price", None), "x_item_price", r"item input 'x_item_price' must be a tensor"),
    ("list", _with("x_item_price", lambda t: t.tolist()), "x_item_price", r"item input 'x_item_price' must be a tensor"),
    ("missing", lambda r: {k: v for k, v in r.items() if k != "x_item_id"}, "x_item_id", r"x_item_id"),
    ("int32 user_index", _with("user_index", lambda t: t.int()), "user_index",
     r"user_index must have dtype torch.int64, got torch.int32"),
    ("user_index out of range", _index([0, 1, 2, 0, 1, 2, 5]), "x_user_id",
     r"user input 'x_user_id' has 3 rows but user_index refers to 6 users"),
    ("negative user_index", _index([0, 1, 2, 0, 1, 2, -1]), "user_index", r"user_index has a negative value -1"),
    ("user rows disagree", _with("x_user_age", lambda t: t[:2]), "x_user_age",
     r"user input 'x_user_age' has 2 rows but user input 'x_user_id' has 3"),
    ("item rows", _with("x_item_price", lambda t: t[:5]), "x_item_price",
     r"item input 'x_item_price' has 5 rows but user_index has 7 entries"),
    ("pair-shaped user rows", _with("x_user_id", lambda t: t[[0, 1, 2, 0]]), "x_user_id", r"x_user_id"),
]
# cases where the raw exported program (torch.export.load(...).module()) reaches mari_fx's check
# operator, not torch.export's own input guards, and so raises the eager message too
RAW_EXPORT_EXACT = {"item dtype", "user dtype", "int32 user_index", "user_index out of range", "negative user_index"}


@pytest.mark.parametrize("form", ["eager", "scripted", "exported", "exported_raw"])
@pytest.mark.parametrize("case,edit,culprit,message", BAD, ids=[b[0] for b in BAD])
def test_bad_request_names_the_input(forms, form, case, edit, culprit, message):
    model, T, mods = forms
    request = mari_fx.random_request(T, 3, 7, seed=1)
    torch.testing.assert_close(mods[form](**request), T(**request))  # the good request runs
    with pytest.raises(Exception) as info:
        mods[form](**edit(request))
    text = str(info.value)
    if form == "exported_raw" and case in ("item ndim", "None"):
        return  # torch.export's own input guards fail first (IndexError / AttributeError): use mari_fx.export.load
    assert culprit in text, f"{form}: {type(info.value).__name__}: {text}"
    exact = form in ("eager", "exported") or (form == "scripted" and case not in ("None", "list", "missing")) or (
        form == "exported_raw" and case in RAW_EXPORT_EXACT)
    if exact:
        assert __import__("re").search(message, text), f"{form}: {text}"
    if form in ("eager", "exported") and case != "missing" or form == "exported_raw" and case in RAW_EXPORT_EXACT:
        assert isinstance(info.value, RequestError)
    if form == "eager" and case == "missing":
        assert isinstance(info.value, TypeError)  # Python's own: forward() missing argument 'x_item_id'


@pytest.mark.parametrize("form", ["eager", "scripted", "exported", "exported_raw"])
def test_zero_candidates_give_empty_outputs(forms, form):
    model, T, mods = forms
    request = mari_fx.random_request(T, 3, 7)
    empty = {k: (v if k in ("x_user_id", "x_user_age") else v[:0]) for k, v in request.items()}
    out = mods[form](**empty)
    want = model(**mari_fx.request_to_pairs(T, empty))
    assert out.shape == want.shape == (0, 1) and out.dtype == want.dtype
    if form != "exported_raw":  # torch.export's guards check this one with their own message
        with pytest.raises(Exception, match="x_user_age"):  # user rows are still checked against each other
            mods[form](**{**empty, "x_user_age": empty["x_user_age"][:2]})


def test_request_check_reads_no_number_on_accelerators(monkeypatch):
    """Off the CPU the value check is one tensor-side assert (no int() read, no host sync)."""
    from mari_fx import runtime

    calls = []
    monkeypatch.setattr(torch, "_assert_async", lambda cond, msg: calls.append((bool(cond), msg)))
    monkeypatch.setattr(torch.Tensor, "is_cpu", property(lambda self: False))
    runtime.check_request(torch.tensor([0, 2, 1]), [torch.ones(3, 4)], [torch.ones(3, 5)], ["u"], ["i"])
    runtime.check_request(torch.tensor([0, 3, 1]), [torch.ones(3, 4)], [torch.ones(3, 5)], ["u"], ["i"])
    assert [ok for ok, _ in calls] == [True, False] and "user input 'u'" in calls[1][1]


def test_torch_compile_has_no_graph_break_from_the_check():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = CoarseRanker().eval()
    T = mari_fx.transform(model, ["user"], (torch.randn(4, 16), torch.randn(4, 8)))
    compiled = torch.compile(T, backend="eager")
    request = mari_fx.random_request(T, 2, 5)
    torch.testing.assert_close(compiled(**request), T(**request))
    assert not torch._dynamo.utils.counters["graph_break"]
    with pytest.raises(RequestError, match="item input 'item' has 5 rows but user_index has 4"):
        compiled(**{**request, "user_index": request["user_index"][:4]})


# --------------------------------------------------------------------------- save / load
def _coarse():
    model = CoarseRanker(layout="interleaved").eval()
    return model, mari_fx.transform(model, ["user"], (torch.randn(4, 16), torch.randn(4, 8)))


@pytest.mark.parametrize("how", ["pickle", "torch.save", "deepcopy"])
def test_T_round_trips(how):
    model, T = _coarse()
    if how == "pickle":
        T2 = pickle.loads(pickle.dumps(T))
    elif how == "torch.save":
        buf = io.BytesIO()
        torch.save(T, buf)
        buf.seek(0)
        T2 = torch.load(buf, weights_only=False)
    else:
        T2 = copy.deepcopy(T)
    request = mari_fx.random_request(T, 3, 7)
    with torch.no_grad():
        want = model(**mari_fx.request_to_pairs(T, request))
    torch.testing.assert_close(T2(**request), want)
    # the loaded module keeps its request check and its split layer's source (for refresh)
    with pytest.raises(RequestError, match="item input 'item' has shape \\[7, 7\\], expected \\[N, 8\\]"):
        T2(**{**request, "item": request["item"][:, :7]})
    assert isinstance(T2.get_submodule("fusion.0"), SplitLinear)
    assert T2.get_submodule("fusion.0").source.weight == "fusion.0.weight"


def test_torchrec_T_pickles():
    pytest.importorskip("torchrec")
    from torchrec_integration.examples import USER_KEYS, RankerBatch, TorchRecRanker

    model = TorchRecRanker().eval()
    T = mari_fx.transform(model, ["user_dense"] + [f"features[{k}]" for k in USER_KEYS],
                          RankerBatch.random(2, 4, seed=1).pairs())
    T2 = pickle.loads(pickle.dumps(T))
    b = RankerBatch.random(3, 7, seed=2)
    request = mari_fx.pairs_to_request(T, *b.pairs(), user_index=b.user_index)
    torch.testing.assert_close(T2(**request), T(**request))


# --------------------------------------------------------------------------- refresh
def _retrain(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("make", [
    lambda: (CoarseRanker(layout="interleaved").eval(), ["user"], (torch.randn(6, 16), torch.randn(6, 8))),
    lambda: (DCNRanker().eval(), ["user"], (torch.randn(6, 12), torch.randn(6, 6))),
    lambda: (DictRanker().eval(), SELECTORS, (DictRanker.example_batch(6),)),
], ids=["coarse", "dcn", "dict"])
def test_refresh_follows_the_retrained_model(make):
    model, sels, example = make()
    t0 = time.perf_counter()
    T = mari_fx.transform(model, sels, example)
    transform_s = time.perf_counter() - t0
    assert T.meta["mari_fx.record"].split_layers
    assert all(not p.requires_grad for m in T.modules() if isinstance(m, SplitLinear) for p in m.parameters())
    _retrain(model)
    request = mari_fx.random_request(T, 3, 9, seed=4)
    with torch.no_grad():
        want = model(**mari_fx.request_to_pairs(T, request))
    assert not torch.allclose(T(**request), want, atol=1e-4)  # split blocks are stale until refreshed
    t0 = time.perf_counter()
    assert mari_fx.refresh(T, model) is T
    refresh_s = time.perf_counter() - t0
    torch.testing.assert_close(T(**request), want)
    assert refresh_s < 0.25 * transform_s, (refresh_s, transform_s)


def test_refresh_copies_replaced_tensors_and_T_shares_the_rest():
    model, T = _coarse()
    shared = {id(p) for p in model.parameters()}
    own = [n for n, p in T.named_parameters() if id(p) not in shared]
    assert own and all(".weight_" in n or n.endswith("fusion.0.bias") for n in own)  # only split blocks are copies
    model.load_state_dict({k: v + 1 for k, v in model.state_dict().items()}, assign=True)  # new tensors
    mari_fx.refresh(T, model)
    request = mari_fx.random_request(T, 2, 5)
    with torch.no_grad():
        torch.testing.assert_close(T(**request), model(**mari_fx.request_to_pairs(T, request)))


def test_pair_shaped_state_dict_names_the_split_layer():
    model, T = _coarse()
    for strict in (True, False):
        with pytest.raises(mari_fx.MariError, match="split layer 'fusion.0'.*mari_fx.refresh"):
            T.load_state_dict(model.state_dict(), strict=strict)
    T.load_state_dict(T.state_dict())  # T's own state dict loads as usual


def test_torchrec_refresh():
    pytest.importorskip("torchrec")
    from torchrec_integration.examples import USER_KEYS, RankerBatch, TorchRecRanker

    model = TorchRecRanker().eval()
    t0 = time.perf_counter()
    T = mari_fx.transform(model, ["user_dense"] + [f"features[{k}]" for k in USER_KEYS],
                          RankerBatch.random(2, 4, seed=1).pairs())
    transform_s = time.perf_counter() - t0
    _retrain(model)
    b = RankerBatch.random(3, 7, seed=2)
    request = mari_fx.pairs_to_request(T, *b.pairs(), user_index=b.user_index)
    t0 = time.perf_counter()
    mari_fx.refresh(T, model)
    assert time.perf_counter() - t0 < 0.25 * transform_s
    with torch.no_grad():
        torch.testing.assert_close(T(**request), model(*b.pairs()))


# --------------------------------------------------------------------------- TorchRec U > N
@pytest.mark.parametrize("head", ["values", "regroup", "dict"])
def test_torchrec_users_without_a_candidate(head):
    pytest.importorskip("torchrec")
    from torchrec_integration.examples import USER_KEYS, RankerBatch, TorchRecRanker

    model = TorchRecRanker(head=head).eval()
    T = mari_fx.transform(model, ["user_dense"] + [f"features[{k}]" for k in USER_KEYS],
                          RankerBatch.random(2, 4, seed=1).pairs())
    full = RankerBatch.random(4, 4, seed=3)
    idx = torch.tensor([0, 3, 1])  # U = 4 users, N = 3 candidates: user 2 has none
    b = type(full)(full.user_dense, full.item_dense[:3], full.user_kjt,
                   __import__("torchrec_integration").jagged.kjt_select_rows(full.item_kjt, torch.arange(3)), idx,
                   full.keys)
    request = {"user_dense": b.user_dense, "item_dense": b.item_dense, "features_user": b.user_kjt,
               "features_item": b.item_kjt, "user_index": idx}
    # a KJT with user and item keys is one padded batch of N rows: U > N is refused, naming it
    # (the dense path below answers such requests; docs/torchrec.md states the difference)
    with pytest.raises(mari_fx.RequestError, match="user"):
        T(**request)
    # the dense path answers the same kind of request
    dense_model = CoarseRanker().eval()
    D = mari_fx.transform(dense_model, ["user"], (torch.randn(4, 16), torch.randn(4, 8)))
    u, i = torch.randn(4, 16), torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(D(user=u, item=i, user_index=idx), dense_model(u[idx], i))


# --------------------------------------------------------------------------- papercuts
def test_a_bare_string_is_one_selector():
    T = mari_fx.transform(CoarseRanker().eval(), "user", (torch.randn(4, 16), torch.randn(4, 8)))
    assert [s.name for s in T.meta["mari_fx.record"].inputs if str(s.side) == "user"] == ["user"]


def test_transforming_a_transformed_module_says_so():
    _, T = _coarse()
    with pytest.raises(mari_fx.DeclarationError, match="already transformed by mari_fx.transform"):
        mari_fx.transform(T, ["user"], (torch.randn(4, 16), torch.randn(4, 8)))


def test_capture_holds_back_torch_warnings(recwarn):
    class Warns(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(24, 1)

        def forward(self, user, item):
            warnings.warn("torch-ish noise while tracing")
            return self.lin(torch.cat([user, item], -1))

    mari_fx.transform(Warns().eval(), ["user"], (torch.randn(4, 16), torch.randn(4, 8)))
    assert not [w for w in recwarn if "noise" in str(w.message)]


def test_cli_report_into_a_closed_pipe_is_quiet(capsys, monkeypatch):
    from mari_fx import cli

    class Closed(io.StringIO):
        def write(self, s):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", Closed())
    code = cli.main(["report", "mari_fx.testing.factories:coarse_ranker", "--user", "user", "--candidates", "10"])
    monkeypatch.undo()
    assert code == 0 and "error" not in capsys.readouterr().err
