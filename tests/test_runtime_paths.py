"""Serving overhead: submodule calls through plain attributes (runtime/paths.py) and the
one-pass eager request check (runtime/checks._request_ok)."""
import copy
import io
import pickle
import warnings

import pytest
import torch
import torch.nn as nn

import mari_fx
from mari_fx.errors import RequestError
from mari_fx.runtime.checks import _request_ok, check_request
from mari_fx.runtime.paths import BoundPaths, ModulePath


class Nested(nn.Module):
    """Submodules two levels deep (ModuleList / Sequential), as fx writes getattr(self.a, "0")."""

    def __init__(self):
        super().__init__()
        self.user_emb = nn.ModuleList([nn.Embedding(20, 4) for _ in range(3)])
        self.tower = nn.Sequential(nn.Linear(12, 8), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(8 + 5, 6), nn.ReLU(), nn.Linear(6, 1))

    def forward(self, ids, item):
        u = torch.cat([emb(ids[:, k]) for k, emb in enumerate(self.user_emb)], -1)
        return self.head(torch.cat([self.tower(u), item], -1)).squeeze(-1)


def _case():
    torch.manual_seed(0)
    model = Nested().eval()
    ex = (torch.randint(20, (4, 3)), torch.randn(4, 5))
    T = mari_fx.transform(model, ["ids"], ex)
    ids, item, idx = torch.randint(20, (3, 3)), torch.randn(7, 5), torch.tensor([0, 0, 1, 2, 2, 2, 1])
    return model, T, dict(ids=ids, item=item, user_index=idx), (ids[idx], item)


def _walk(m, target):
    """Follow ``target`` through instance ``__dict__`` entries only (what Python finds first)."""
    for name in target.split("."):
        m = m.__dict__[name]
    return m


def test_every_called_submodule_is_a_plain_attribute_path():
    model, T, req, pairs = _case()
    called = [n.target for n in T.graph.nodes if n.op == "call_module"]
    assert any("." in t for t in called)  # nested paths exist (user_emb.0, tower.0 ...)
    for t in called:
        assert _walk(T, t) is T.get_submodule(t)
    with torch.no_grad():
        torch.testing.assert_close(T(**req), model(*pairs))


def test_registration_and_the_models_modules_are_unchanged():
    model, T, _, _ = _case()
    before = {name: dict(vars(m)) for name, m in model.named_modules()}
    _, T2, _, _ = _case()
    plain = torch.fx.GraphModule(T2, T2.graph)  # same graph, no plain attributes
    assert list(T.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in T.named_modules()] == [n for n, _ in plain.named_modules()]
    assert before == {name: dict(vars(m)) for name, m in model.named_modules()}
    # only mari_fx's own modules carry plain attributes: T and fx's namespace modules
    for name, m in T.named_modules():
        extra = set(vars(m)) & set(m._modules)
        if extra:
            assert isinstance(m, BoundPaths), name
        if type(m).__module__.startswith("torch.nn.modules."):
            assert not extra, name


@pytest.mark.parametrize("how", ["setattr", "add_module", "register_module", "set_submodule"])
def test_replacing_a_submodule_is_seen_by_forward(how):
    model, T, req, pairs = _case()
    new = nn.Linear(6, 1)
    # the second Linear of the head runs at N rows as a module call: replace it
    target = next(n.target for n in T.graph.nodes if n.op == "call_module" and n.target.endswith("head.2"))
    owner_path, _, name = target.rpartition(".")
    owner = T.get_submodule(owner_path)
    if how == "setattr":
        setattr(owner, name, new)
    elif how == "add_module":
        owner.add_module(name, new)
    elif how == "register_module":
        owner.register_module(name, new)
    else:
        T.set_submodule(target, new)
    model.head[2] = new  # the reference: the same replacement in the pair model
    with torch.no_grad():
        torch.testing.assert_close(T(**req), model(*pairs))
    assert T.get_submodule(target) is new


def test_deleting_a_submodule_is_not_silently_kept():
    _, T, req, _ = _case()
    target = next(n.target for n in T.graph.nodes if n.op == "call_module" and n.target.endswith("head.2"))
    owner_path, _, name = target.rpartition(".")
    delattr(T.get_submodule(owner_path), name)
    with pytest.raises(AttributeError), torch.no_grad():
        T(**req)


def test_positive_control_a_stale_plain_attribute_would_be_called():
    """Without BoundPaths' bookkeeping (a direct write to _modules) the old module is called:
    the tests above would catch a missing drop."""
    model, T, req, pairs = _case()
    target = next(n.target for n in T.graph.nodes if n.op == "call_module" and n.target.endswith("head.2"))
    owner_path, _, name = target.rpartition(".")
    owner = T.get_submodule(owner_path)
    assert isinstance(owner, ModulePath)
    owner._modules[name] = nn.Linear(6, 1)  # bypasses every nn.Module API
    model.head[2] = owner._modules[name]
    with torch.no_grad():
        assert not torch.allclose(T(**req), model(*pairs))


def test_deepcopy_pickle_script_keep_outputs_and_copies_are_independent():
    model, T, req, pairs = _case()
    with torch.no_grad():
        want = model(*pairs)
        C = copy.deepcopy(T)
        target = next(n.target for n in C.graph.nodes if n.op == "call_module")
        assert _walk(C, target) is C.get_submodule(target)  # the copy is bound to its own modules
        assert C.get_submodule(target) is not T.get_submodule(target)
        torch.testing.assert_close(C(**req), want)
        L = pickle.loads(pickle.dumps(T))
        assert _walk(L, target) is L.get_submodule(target)
        torch.testing.assert_close(L(**req), want)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            S = torch.jit.script(T)
        buf = io.BytesIO()
        torch.jit.save(S, buf)
        buf.seek(0)
        torch.testing.assert_close(torch.jit.load(buf)(**req), want)


# ---- the one-pass request check -------------------------------------------------------------

_NAMES = (["u", "v"], ["i"])
_SPEC = ([[-1, 4], [-1]], [[-1, 3]], [torch.float32, torch.int64], [torch.float32])


def _good():
    return (torch.tensor([0, 1, 1, 0]), [torch.ones(2, 4), torch.zeros(2, dtype=torch.int64)], [torch.ones(4, 3)])


def _bad_requests():
    idx, (u, v), (i,) = _good()
    yield "user rows", (idx, [torch.ones(4, 4), torch.zeros(4, dtype=torch.int64)], [i])
    yield "item rows", (idx, [u, v], [torch.ones(3, 3)])
    yield "item width", (idx, [u, v], [torch.ones(4, 2)])
    yield "user ndim", (idx, [u.unsqueeze(1), v], [i])
    yield "user dtype", (idx, [u.double(), v], [i])
    yield "item dtype", (idx, [u, v], [i.half()])
    yield "index dtype", (idx.int(), [u, v], [i])
    yield "index 2-d", (idx[None], [u, v], [i])
    yield "negative", (torch.tensor([0, -1, 1, 0]), [u, v], [i])
    yield "too few users", (torch.tensor([0, 0, 0, 0]), [u, v], [i])
    yield "too many users", (torch.tensor([0, 2, 1, 0]), [u, v], [i])
    yield "None item", (idx, [u, v], [None])
    yield "list user", (idx, [[1.0] * 4, v], [i])
    yield "0-d user", (idx, [torch.tensor(1.0), v], [i])


def test_fast_check_passes_good_requests():
    assert _request_ok(*_good(), *_SPEC)
    check_request(*_good(), *_NAMES, *_SPEC)


@pytest.mark.parametrize("what,request_", list(_bad_requests()), ids=[k for k, _ in _bad_requests()])
def test_fast_check_never_passes_a_bad_request(what, request_):
    assert not _request_ok(*request_, *_SPEC)
    with pytest.raises(RequestError):
        check_request(*request_, *_NAMES, *_SPEC)
