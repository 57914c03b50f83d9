"""Deployment round trips: torch.export (save/load, dynamic U and N down to 1), TorchScript,
torch.compile and ``mari-fx export``; every output is compared with the ORIGINAL pair-shaped model."""
import io
import os
import subprocess
import sys
import types
import warnings

import pytest
import torch

import mari_fx
from mari_fx.errors import RequestError
from mari_fx.testing.examples import CoarseRanker, DictRanker, PackedRanker
from mari_fx.deploy import ExportError, assert_request, traceable, widen_request
from mari_fx.runtime import check_request

from helpers import ragged_index

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = [(1, 1), (1, 7), (1, 1000), (3, 7), (3, 1000)]  # (U, N), N >= U


def original(model, T, request):
    with torch.no_grad():
        return model(**mari_fx.request_to_pairs(T, request))


def coarse():
    model = CoarseRanker(layout="interleaved").eval()
    return model, mari_fx.transform(model, ["user"], (torch.randn(4, 16), torch.randn(4, 8)))


@pytest.fixture(scope="module")
def coarse_program(tmp_path_factory):
    torch.manual_seed(0)
    model, T = coarse()
    ep = mari_fx.export(T, mari_fx.random_request(T, 3, 7))
    path = tmp_path_factory.mktemp("ep") / "coarse.pt2"
    torch.export.save(ep, str(path))
    return model, T, torch.export.load(str(path)).module()


@pytest.mark.parametrize("U,N", SHAPES)
def test_saved_program_equals_original_model(coarse_program, U, N):
    model, T, loaded = coarse_program
    request = mari_fx.random_request(T, U, N, seed=U + N)
    torch.testing.assert_close(loaded(**request), original(model, T, request))


def test_program_keeps_the_request_check(coarse_program):
    _, T, loaded = coarse_program
    request = mari_fx.random_request(T, 3, 7)
    # the program's check is the eager one (operator mari_fx::check_request): same RequestError
    with pytest.raises(RequestError, match="user input 'user' has 2 rows but user_index refers to 3 users"):
        loaded(**{**request, "user": request["user"][:2]})
    with pytest.raises(RequestError, match="user_index must have dtype torch.int64, got torch.int32"):
        loaded(**{**request, "user_index": request["user_index"].int()})
    bad = request["user_index"].clone()
    bad[0] = -1
    with pytest.raises(RequestError, match="negative"):
        loaded(**{**request, "user_index": bad})


def test_a_one_user_one_candidate_example_is_widened():
    # an example with U = N = 1 would specialise both dims; export widens it
    model, T = coarse()
    tiny = mari_fx.random_request(T, 1, 1)
    wide = widen_request(T, tiny)
    assert (wide["user"].shape[0], wide["item"].shape[0]) == (2, 3)
    assert torch.equal(wide["user"][1], tiny["user"][0]) and wide["user_index"].tolist() == [0, 1, 0]
    ep = mari_fx.export(T, tiny, check_requests=False)
    assert "_assert_async" not in ep.graph_module.code
    for U, N in [(1, 1), (3, 1000)]:
        request = mari_fx.random_request(T, U, N)
        torch.testing.assert_close(ep.module()(**request), original(model, T, request))


@pytest.mark.parametrize("which", ["dict", "packed"])
def test_dict_and_packed_inputs_round_trip(which):
    if which == "dict":
        model = DictRanker().eval()
        T = mari_fx.transform(model, ["x[user_id]", "x[user_age]", "x[hist_item_ids]"], (DictRanker.example_batch(6),))
    else:
        model = PackedRanker().eval()
        T = mari_fx.transform(model, model.user_selectors(), (torch.randn(4, 12),))
    buf = io.BytesIO()
    torch.export.save(mari_fx.export(T), buf)
    buf.seek(0)
    loaded = torch.export.load(buf).module()
    for U, N in [(1, 1), (3, 1000)]:
        request = mari_fx.random_request(T, U, N, seed=N)
        torch.testing.assert_close(loaded(**request), original(model, T, request))


@pytest.mark.parametrize("which", ["din", "mmoe"])
def test_sequence_and_multi_output_models_round_trip(which):
    # DIN: a [U, S] behaviour sequence through a transformer layer; MMoE: a tuple of outputs
    from mari_fx.testing.examples import DINRanker, MMoERanker

    if which == "din":
        model = DINRanker().eval()
        T = mari_fx.transform(model, ["hist", "user_id"],
                              (torch.randint(50, (4, 10)), torch.randint(20, (4,)), torch.randint(50, (4,))))
    else:
        model = MMoERanker().eval()
        T = mari_fx.transform(model, ["user"], (torch.randn(4, 10), torch.randn(4, 6)))
    buf = io.BytesIO()
    torch.export.save(mari_fx.export(T), buf)
    buf.seek(0)
    loaded = torch.export.load(buf).module()
    for U, N in [(1, 1), (3, 1000)]:
        request = mari_fx.random_request(T, U, N, seed=N)
        torch.testing.assert_close(loaded(**request), original(model, T, request))


def test_export_is_a_function_carrying_its_helpers():
    import mari_fx.deploy.programs as programs  # the module: mari_fx.export is its function

    assert mari_fx.export is programs.export and not isinstance(mari_fx.export, types.ModuleType)
    assert mari_fx.export.traceable is traceable and mari_fx.export.load is programs.load
    assert mari_fx.export.dynamic_shapes is programs.dynamic_shapes and mari_fx.export.ExportError is ExportError
    with pytest.raises(mari_fx.DeclarationError, match="mari_fx.transform"):
        mari_fx.export(torch.nn.Linear(2, 2))


def test_traceable_shares_weights_and_swaps_the_check():
    model, T = coarse()
    G = traceable(T)
    targets = [n.target for n in G.graph.nodes if n.op == "call_function"]
    assert torch.ops.mari_fx.check_request.default in targets and check_request not in targets
    assert check_request in [n.target for n in T.graph.nodes]  # T untouched
    assert {p.data_ptr() for p in G.parameters()} == {p.data_ptr() for p in T.parameters()}
    assert check_request not in [n.target for n in traceable(T, check_requests=False).graph.nodes]
    assert torch.ops.mari_fx.check_request.default not in [n.target for n in traceable(T, check_requests=False).graph.nodes]


def test_export_failure_is_an_export_error(monkeypatch):
    _, T = coarse()

    def fail(*a, **k):
        raise torch._dynamo.exc.UserError(torch._dynamo.exc.UserErrorType.CONSTRAINT_VIOLATION, "Constraints violated")

    monkeypatch.setattr(torch.export, "export", fail)
    with pytest.raises(ExportError, match="torch.export failed on the transformed module: UserError"):
        mari_fx.export(T)


# --------------------------------------------------------------------------- TorchScript
def test_torchscript_round_trip():
    model, T = coarse()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation notice
        scripted = torch.jit.script(T)  # plain torch.jit.script works on T as it is
        also = mari_fx.export.script(T)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    for U, N in [(1, 1), (3, 7), (3, 1000)]:
        request = mari_fx.random_request(T, U, N)
        torch.testing.assert_close(loaded(**request), original(model, T, request))
        torch.testing.assert_close(also(**request), original(model, T, request))
    request = mari_fx.random_request(T, 3, 7)
    # the scripted check raises RequestError's message (as torch.jit.Error) ...
    with pytest.raises(torch.jit.Error, match="RequestError: user input 'user' has 2 rows but user_index refers to 3"):
        loaded(**{**request, "user": request["user"][:2]})
    # ... with the same text as in eager mode
    with pytest.raises(RequestError, match="user input 'user' has 2 rows but user_index refers to 3"):
        T(**{**request, "user": request["user"][:2]})


# --------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile_of_T(backend):
    torch._dynamo.reset()
    model, T = coarse()
    compiled = torch.compile(T, backend=backend)
    for U, N in [(3, 7), (1, 1), (3, 1000)]:
        request = mari_fx.random_request(T, U, N)
        with torch.no_grad():
            torch.testing.assert_close(compiled(**request), original(model, T, request))
    # under compile the check is one opaque operator (no graph break) raising the eager RequestError
    request = mari_fx.random_request(T, 3, 7)
    with pytest.raises(RequestError, match="user input 'user' has 2 rows but user_index refers to 3 users"):
        compiled(**{**request, "user": request["user"][:2]})


def test_torch_compile_fullgraph_of_traceable():
    torch._dynamo.reset()
    model, T = coarse()
    # compile the bound forward: GraphModule.__call__'s error-formatting wrapper
    # is not traceable under fullgraph=True when a check fails
    compiled = torch.compile(traceable(T).forward, backend="aot_eager", fullgraph=True, dynamic=True)
    for U, N in [(3, 7), (1, 1), (2, 50)]:
        request = mari_fx.random_request(T, U, N)
        with torch.no_grad():
            torch.testing.assert_close(compiled(**request), original(model, T, request))
    request = mari_fx.random_request(T, 3, 7)
    with pytest.raises(RequestError, match="user input 'user' has 2 rows"):
        compiled(**{**request, "user": request["user"][:2]})


# --------------------------------------------------------------------------- mari-fx export
def test_cli_export(tmp_path):
    out = tmp_path / "model.pt2"
    proc = subprocess.run([sys.executable, "-m", "mari_fx", "export", "mari_fx.testing.factories:interleaved_ranker",
                           "--user", "user", "--out", str(out)], capture_output=True, text=True, cwd=ROOT,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout and "verified" in proc.stdout
    from mari_fx.testing.factories import interleaved_ranker

    model = interleaved_ranker()[0]  # the factory is seeded: the same weights as the exported ones
    loaded = torch.export.load(str(out)).module()
    for U, N in [(1, 1), (3, 1000)]:
        u, i, idx = torch.randn(U, 16), torch.randn(N, 8), ragged_index(U, N)
        with torch.no_grad():
            torch.testing.assert_close(loaded(user=u, item=i, user_index=idx), model(u[idx], i))


def test_cli_export_failure_exits_3(tmp_path, monkeypatch, capsys):
    from mari_fx.cli import main

    def fail(*a, **k):
        raise ExportError("torch.export failed on the transformed module: boom")

    monkeypatch.setattr(sys.modules["mari_fx.deploy.programs"], "export", fail)
    rc = main(["export", "mari_fx.testing.factories:coarse_ranker", "--user", "user", "--out", str(tmp_path / "m.pt2")])
    assert rc == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "boom" in err
    assert not (tmp_path / "m.pt2").exists()


def test_docstring_examples_run():
    import doctest

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = doctest.testmod(sys.modules["mari_fx.deploy.programs"], optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
