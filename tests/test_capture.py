"""Models torch.fx cannot trace are captured through torch.export, or refused with the construct named."""
import pytest
import torch
import torch.nn as nn

import mari_fx
from mari_fx.runtime.modules import SplitLinear

from helpers import ragged_index


class UsesLen(nn.Module):
    """``len()`` on a traced value and a dict input: torch.fx fails, torch.export succeeds."""

    def __init__(self):
        super().__init__()
        self.tower = nn.Linear(4, 4)
        self.ln = nn.LayerNorm(4)
        self.head = nn.Linear(6, 2)

    def forward(self, x, item):
        u = x["u"]
        h = torch.relu(self.tower(u)).view(len(u), -1)
        z = torch.cat([self.ln(h)[:, :2], item, h[:, 2:]], dim=-1)  # interleaved user/item columns
        return self.head(z).sum(-1), h


class UnregisteredModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.parts = [nn.Linear(3, 3)]  # a plain list: not a registered submodule
        self.head = nn.Linear(5, 1)

    def forward(self, user, item):
        return self.head(torch.cat([self.parts[0](user), item], -1))


@pytest.mark.parametrize("U,N", [(1, 1), (1, 7), (3, 7)])
def test_len_on_proxy_is_captured_through_export(U, N):
    model = UsesLen().eval()
    T = mari_fx.transform(model, ["x[u]"], ({"u": torch.randn(4, 4)}, torch.randn(4, 2)))
    record = T.meta["mari_fx.record"]
    assert record.capture == "torch.export"
    assert record.split_layers == ("linear_1",)
    assert isinstance(T.get_submodule("linear_1_split"), SplitLinear)
    assert "linear" in record.hoisted  # the user tower, an aten.linear, runs at U rows
    idx = ragged_index(U, N)
    u, i = torch.randn(U, 4), torch.randn(N, 2)
    got, want = T(x_u=u, item=i, user_index=idx), model({"u": u[idx]}, i)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


def test_unregistered_module_is_captured_through_export():
    model = UnregisteredModule().eval()
    T = mari_fx.transform(model, ["user"], (torch.randn(4, 3), torch.randn(4, 2)))
    assert T.meta["mari_fx.record"].capture == "torch.export"
    assert T.meta["mari_fx.record"].split_layers == ("linear_1",)
    mari_fx.verify(model, T)


def test_fx_route_is_recorded():
    from mari_fx.testing.examples import CoarseRanker

    T = mari_fx.transform(CoarseRanker().eval(), ["user"], (torch.randn(4, 16), torch.randn(4, 8)))
    assert T.meta["mari_fx.record"].capture == "torch.fx"


def test_when_both_routes_fail_the_error_names_the_construct():
    class DataDependent(nn.Module):
        def forward(self, user, item):
            if user.sum() > 0:  # Python control flow on a tensor value
                return user * item
            return item

    with pytest.raises(mari_fx.TraceError) as err:
        mari_fx.transform(DataDependent(), ["user"], (torch.randn(4, 3), torch.randn(4, 3)))
    msg = str(err.value)
    assert "torch.fx cannot trace DataDependent" in msg
    assert "cause: data-dependent Python control flow" in msg
    assert "torch.export also failed" in msg


# --------------------------------------------------------------------------- forward hooks
from mari_fx.testing.examples import CoarseRanker  # noqa: E402


def _hooked(setup, **options):
    torch.manual_seed(0)
    model = CoarseRanker().eval()
    setup(model)
    idx = torch.tensor([0, 0, 1, 2, 2, 2])
    return model, mari_fx.transform(model, ["user"], (torch.randn(3, 16)[idx], torch.randn(6, 8)), **options)


def _exact(model, T):
    for U, N in ((1, 3), (2, 5), (4, 9)):
        idx = ragged_index(U, N)
        u, i = torch.randn(U, 16), torch.randn(N, 8)
        if not torch.allclose(T(user=u, item=i, user_index=idx), model(u[idx], i), atol=1e-5):
            return False
    return True


HOOKS = {
    "forward hook on the split Linear": lambda m: m.fusion[0].register_forward_hook(lambda mod, a, out: out * 2),
    "pre-hook on the split Linear": lambda m: m.fusion[0].register_forward_pre_hook(lambda mod, a: (a[0] * 0.5,)),
    "batch-centering hook on a user Linear": lambda m: m.user_tower[0].register_forward_hook(
        lambda mod, a, out: out - out.mean(0)),
}


@pytest.mark.parametrize("name", sorted(HOOKS))
def test_forward_hooks_of_torch_nn_modules_are_traced_with_them(name):
    """A torch.nn module with hooks is traced through, hooks included: the split still happens
    (on the traced ``F.linear``) and the hook's code runs where the model runs it."""
    model, T = _hooked(HOOKS[name])
    assert _exact(model, T)
    split = T.meta["mari_fx.record"].split_layers
    if "centering" in name:
        assert split == ()  # centering over the batch mixes every user column: nothing to split
    else:
        assert len(split) == 1 and split != ("fusion.0",)  # split as the traced F.linear, not the module


def test_control_hooks_lost_when_hooked_modules_stay_leaves(monkeypatch):
    """Positive control: keeping hooked torch.nn modules as leaves loses the split layer's hook."""
    from mari_fx.frontend import capture

    monkeypatch.setattr(capture, "_hooks", lambda m: False)
    assert not _exact(*_hooked(HOOKS["forward hook on the split Linear"]))


def test_hooks_the_graph_cannot_follow_are_refused_naming_them():
    with pytest.raises(mari_fx.TraceError, match=r"the model \(CoarseRanker\) has a forward hook"):
        _hooked(lambda m: m.register_forward_hook(lambda mod, a, out: out + 1))
    handle = torch.nn.modules.module.register_module_forward_hook(lambda mod, a, out: None)
    try:
        with pytest.raises(mari_fx.TraceError, match="global module forward hooks"):
            _hooked(lambda m: None)
    finally:
        handle.remove()

    class Opaque(nn.Linear):
        pass

    def setup(m):
        m.fusion[2] = Opaque(64, 32)
        m.fusion[2].register_forward_hook(lambda mod, a, out: out * 3)

    with pytest.raises(mari_fx.TraceError, match=r"module 'fusion.2' \(Opaque\) has a forward hook"):
        _hooked(setup, leaf_modules=[Opaque])


class AutocastTower(nn.Module):
    def __init__(self):
        super().__init__()
        self.tower, self.head = nn.Linear(6, 8), nn.Linear(8 + 5, 1)

    def forward(self, u, i):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = self.tower(u)
        return self.head(torch.cat([h.float(), i], 1))


def _autocast_verdict():
    torch.manual_seed(0)
    model = AutocastTower().eval()
    idx = ragged_index(3, 8)
    T = mari_fx.transform(model, ["u"], (torch.randn(3, 6)[idx], torch.randn(8, 5)))
    idx = ragged_index(3, 9)
    u, i = torch.randn(3, 6), torch.randn(9, 5)
    return torch.allclose(T(u=u, i=i, user_index=idx), model(u[idx], i), rtol=1e-5, atol=1e-5)


def test_autocast_region_in_forward_is_refused():
    """torch.fx does not record autocast regions: the graph would compute in fp32 where the model
    computes in bf16.  Refused with the construct named (not handed to torch.export)."""
    with pytest.raises(mari_fx.TraceError, match="torch.autocast region"):
        _autocast_verdict()


def test_control_autocast_region_ignored(monkeypatch):
    """Positive control: not watching the autocast state, the transform succeeds and differs."""
    from mari_fx.frontend import capture

    monkeypatch.setattr(capture, "_autocast_state", lambda: ())
    assert _autocast_verdict() is False


def test_compiled_model_is_transformed_as_the_model_it_wraps():
    """``torch.compile(model)`` computes what ``model`` computes: mari_fx unwraps it (as DDP)."""
    torch.manual_seed(0)
    model = CoarseRanker().eval()
    idx = ragged_index(3, 8)
    example = (torch.randn(3, 16)[idx], torch.randn(8, 8))
    T = mari_fx.transform(torch.compile(model), ["user"], example)
    assert T.meta["mari_fx.record"].split_layers == ("fusion.0",)
    assert _exact(model, T)


# --------------------------------------------------------------------------- ATen spellings
# A model torch.fx cannot trace reaches mari_fx in ATen ops; each must have the rule of its torch
# spelling, or the user-side work it does falls back to N rows.  Every body maps user rows [B, 6]
# to [B, 6] and acts on each row alone.
_COLS = torch.tensor([[5, 0, 3, 1, 4, 2]])
ATEN_BODIES = {
    "unary": lambda u: torch.erf(u) + torch.sin(u) * torch.cos(u) + torch.expm1(u.clamp(max=1)) + torch.sign(u),
    "rounding": lambda u: torch.floor(u * 3) + torch.ceil(u) + torch.round(u) + torch.trunc(u * 2),
    "activations": lambda u: (nn.functional.hardswish(u) + nn.functional.hardsigmoid(u) + nn.functional.mish(u)
                              + nn.functional.selu(u) + nn.functional.relu6(u) + u.clamp(min=0.1)),
    "binary": lambda u: (u * 10).remainder(3.0) + torch.lerp(u, u * 2, 0.3) + torch.addcmul(u, u, u) + 2.0 ** u,
    "reductions": lambda u: u * (u.max(1, keepdim=True).values + u.min(1, keepdim=True).values
                             + u.prod(1, keepdim=True) + u.norm(dim=1, keepdim=True)),
    "sorting": lambda u: torch.sort(u, 1).values + torch.topk(u, 6, 1).values + u.argsort(1).float(),
    "normalize": lambda u: nn.functional.normalize(u, dim=1),
    "indexing": lambda u: u.gather(1, _COLS.expand_as(u)) + u.index_select(1, _COLS[0]),
    "positions": lambda u: u + torch.arange(6).float().unsqueeze(0).expand_as(u),
}


class AtenBody(nn.Module):
    """``body`` over the user rows, behind a Python loop over a size (torch.fx fails on it)."""

    def __init__(self, body):
        super().__init__()
        self.body, self.head = body, nn.Linear(6 + 2, 3)

    def forward(self, user, item):
        ones = sum(user[:, k:k + 1] * 0.0 for k in range(user.shape[1])) + 1.0
        return self.head(torch.cat([self.body(user * ones), item], 1))


def _aten_case(body):
    model = AtenBody(body).eval()
    T = mari_fx.transform(model, ["user"], (torch.randn(4, 6), torch.randn(4, 2)), cost_model=False)
    errors = []
    for U, N in [(1, 5), (3, 7), (2, 2)]:
        idx = ragged_index(U, N)
        u, i = torch.randn(U, 6), torch.randn(N, 2)
        with torch.no_grad():
            got, want = T(user=u, item=i, user_index=idx), model(u[idx], i)
        if not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
            errors.append((U, N))
    return T, errors


@pytest.mark.parametrize("name", sorted(ATEN_BODIES))
def test_aten_spellings_keep_user_work_at_u_rows(name):
    T, errors = _aten_case(ATEN_BODIES[name])
    record = T.meta["mari_fx.record"]
    assert record.capture == "torch.export" and not errors
    (layer,) = record.layers
    assert layer.action == "split" and layer.split_user_features == 6, layer


def test_control_aten_reductions_over_the_batch_tagged_rowwise(monkeypatch):
    """Positive control: the same check finds a wrong answer when ATen reductions over the batch
    (``sort(u, 0)``, ``u.prod(0)``) are tagged row-wise.  (``u.max(0)`` is no control: the max over
    pairs is the max over users, whatever the rule.)"""
    from mari_fx.analysis.rules import RULES, rowwise

    aten = torch.ops.aten
    for t in (aten.sort.default, aten.prod.dim_int):
        monkeypatch.setitem(RULES, t, rowwise)
    for body in (lambda u: torch.sort(u, 0).values, lambda u: u * u.prod(0, keepdim=True)):
        assert _aten_case(body)[1], "a batch reduction tagged row-wise went unnoticed"


class NumpyOffsets(nn.Module):
    """pytorch-fm's FeaturesEmbedding: one table for every field, the field offsets a numpy array
    made a tensor in forward (``x.new_tensor(offsets)``: torch.fx cannot take a numpy argument, and
    strict torch.export keeps the constant without its values)."""

    def __init__(self, dims=(20, 30, 25, 40)):
        super().__init__()
        import numpy as np

        self.dims, self.offsets = dims, np.array((0, *np.cumsum(dims)[:-1]), dtype=np.int64)
        self.embedding = nn.Embedding(sum(dims), 3)
        self.mlp = nn.Sequential(nn.Linear(3 * len(dims), 8), nn.ReLU(), nn.Linear(8, 1))

    def forward(self, x):
        e = self.embedding(x + x.new_tensor(self.offsets).unsqueeze(0))
        return self.mlp(e.view(-1, 3 * len(self.dims)))


def test_numpy_constant_made_in_forward_is_captured_with_its_values():
    model = NumpyOffsets().eval()
    g = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.stack([torch.randint(0, d, (n,), generator=g) for d in model.dims], 1)

    T = mari_fx.transform(model, ["x[:, 0:2]"], (ids(4),))
    record = T.meta["mari_fx.record"]
    assert record.capture == "torch.export"
    (split,) = [l for l in record.layers if l.action == "split"]
    assert split.split_user_features == 2 * 3, split  # the two user fields' embedding columns
    for U, N in [(1, 5), (3, 7)]:
        idx, x = ragged_index(U, N), ids(N)
        x[:, :2] = ids(U)[:, :2][idx]
        torch.testing.assert_close(T(**mari_fx.pairs_to_request(T, x, user_index=idx)), model(x))


# --------------------------------------------------------------------------- module calls under export
class ExportedEncoders(nn.Module):
    """User-side sequence modules in a model torch.fx cannot trace: export inlines them into ATen ops
    (a GRU's zeros state has the batch in dim 1, attention folds the batch with the heads), so
    their calls are kept whole (``mari_fx.frontend.outline``)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 8, padding_idx=0)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.gru = nn.GRU(8, 8, batch_first=True)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 2,
                                         enable_nested_tensor=False)
        self.head = nn.Sequential(nn.Linear(8 + 8 + 3, 12), nn.ReLU(), nn.Linear(12, 1))

    def forward(self, hist, feat):
        pad = hist == 0
        h = self.emb(hist) * (sum(hist[:, k:k + 1] * 0 for k in range(hist.shape[1])) + 1).unsqueeze(-1)
        h = self.mha(h, h, h, key_padding_mask=pad)[0]
        o, _ = self.gru(h)
        e = self.enc(o, src_key_padding_mask=pad)
        return self.head(torch.cat([e.mean(1), o[:, -1], feat], 1))


def _exported_encoders():
    g = torch.Generator().manual_seed(0)

    def batch(users, n):
        idx = ragged_index(users, n)
        hist = torch.randint(1, 30, (users, 5), generator=g)
        hist[:, -1] = 0
        return (hist[idx], torch.randn(n, 3, generator=g)), idx

    model = ExportedEncoders().eval()
    return model, mari_fx.transform(model, ["hist"], batch(3, 8)[0]), batch


def test_sequence_module_calls_are_kept_whole_under_export():
    model, T, batch = _exported_encoders()
    record = T.meta["mari_fx.record"]
    assert record.capture == "torch.export"
    calls = {n.target: n.meta["mari_fx.rows"] for n in T.graph.nodes if n.op == "call_module"}
    assert {calls.get(p) for p in ("mha", "gru", "enc")} == {"U"}, calls
    (split,) = [l for l in record.layers if l.action == "split"]
    assert split.split_user_features == 16  # e.mean(1) and o[:, -1]
    assert not any(n.target is torch.ops.aten.gru.input for n in T.graph.nodes)
    for U, N in [(1, 5), (3, 7), (2, 2)]:
        pairs, idx = batch(U, N)
        with torch.no_grad():
            torch.testing.assert_close(T(**mari_fx.pairs_to_request(T, *pairs, user_index=idx)), model(*pairs))


def test_inlined_sequence_modules_lose_the_user_side(monkeypatch):
    """What the outlining buys: inlined, the GRU kernel has no rule and attention's ops fold the batch."""
    import mari_fx.frontend.capture as capture

    monkeypatch.setattr(capture, "outline_module_calls", lambda *a: [])
    _, T, _ = _exported_encoders()
    assert not [l for l in T.meta["mari_fx.record"].layers if l.action == "split"]


class TwiceCalled(nn.Module):
    """One GRU over two histories (export cannot keep the signature of a module called twice), and
    an attention module called once; behind a loop torch.fx cannot trace."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 8)
        self.gru = nn.GRU(8, 8, batch_first=True)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(24 + 3, 1)

    def forward(self, a, b, feat):
        ones = sum(a[:, k:k + 1] * 0 for k in range(a.shape[1])) + 1
        x, _ = self.gru(self.emb(a * ones))
        y, _ = self.gru(self.emb(b))
        z = self.mha(y, y, y)[0]
        return self.head(torch.cat([x[:, -1], y[:, -1], z.mean(1), feat], 1))


def test_module_called_twice_stays_inlined_and_exact():
    model = TwiceCalled().eval()
    g = torch.Generator().manual_seed(0)

    def batch(users, n):
        idx = ragged_index(users, n)
        a, b = torch.randint(30, (users, 4), generator=g), torch.randint(30, (users, 4), generator=g)
        return (a[idx], b[idx], torch.randn(n, 3, generator=g)), idx

    T = mari_fx.transform(model, ["a", "b"], batch(3, 8)[0])
    calls = [n.target for n in T.graph.nodes if n.op == "call_module"]
    assert "mha" in calls and "gru" not in calls, calls
    for U, N in [(1, 5), (3, 7)]:
        pairs, idx = batch(U, N)
        with torch.no_grad():
            torch.testing.assert_close(T(**mari_fx.pairs_to_request(T, *pairs, user_index=idx)), model(*pairs))


# --------------------------------------------------------------------------- constant arguments
class OptionalArgs(nn.Module):
    """Optional forward arguments as ranking code has them: a mask that defaults to None, a flag,
    a number.  ``len(u)`` in ``untraceable`` mode sends it through torch.export instead of torch.fx."""

    def __init__(self, untraceable=False):
        super().__init__()
        self.untraceable = untraceable
        self.head = nn.Linear(6, 2)

    def forward(self, u, i, mask=None, return_user: bool = False, scale: float = 1.0):
        z = self.head(torch.cat([u, i], 1)) * (len(u) / u.shape[0] if self.untraceable else 1.0)
        if mask is not None:
            z = z * mask
        return (z * scale, u) if return_user else z * scale


@pytest.mark.parametrize("untraceable", [False, True])
@pytest.mark.parametrize("given", [{}, {"scale": 3.0, "return_user": True}])
def test_constant_arguments_are_fixed_as_given_or_defaulted(untraceable, given):
    """Arguments left at their defaults, or given as Python constants in the example, are fixed at
    those values (``RequestSpec.fixed``); requests carry the tensors only, ``request_to_pairs`` puts
    the constants back, and a pair-shaped call with another value is refused."""
    model = OptionalArgs(untraceable).eval()
    idx = ragged_index(3, 7)
    u, i = torch.randn(3, 3), torch.randn(7, 3)
    T = mari_fx.transform(model, ["u"], (u[idx[:4]], i[:4]), dict(given))
    record, spec = T.meta["mari_fx.record"], T.meta["mari_fx.request"]
    assert record.capture == ("torch.export" if untraceable else "torch.fx")
    assert dict(spec.fixed) == {"mask": None, "return_user": False, "scale": 1.0, **given}
    assert [s.name for s in spec.inputs] == ["u", "i"] and record.split_layers
    got, want = T(u=u, i=i, user_index=idx), model(u[idx], i, **given)
    torch.testing.assert_close(got, want)
    pairs = mari_fx.request_to_pairs(T, mari_fx.pairs_to_request(T, u[idx], i, user_index=idx, **given))
    torch.testing.assert_close(model(**pairs), want)
    with pytest.raises(mari_fx.RequestError, match="'scale' is 5.0, but it was fixed to"):
        mari_fx.pairs_to_request(T, u[idx], i, user_index=idx, scale=5.0)


def test_tensor_given_for_an_optional_argument_stays_an_input():
    model = OptionalArgs().eval()
    idx = ragged_index(3, 7)
    u, i, m = torch.randn(3, 3), torch.randn(7, 3), torch.rand(7, 1)
    T = mari_fx.transform(model, ["u"], (u[idx[:4]], i[:4], m[:4]))
    assert [s.name for s in T.meta["mari_fx.request"].inputs] == ["u", "i", "mask"]
    torch.testing.assert_close(T(u=u, i=i, mask=m, user_index=idx), model(u[idx], i, m))


def test_batch_size_passed_as_a_value_is_not_fixed():
    """``forward(u, i, n)`` called with ``n`` = the number of pairs: fixing it would keep the example's
    batch size for every request (a silent wrong answer for ``z * n``); refused, naming the argument."""
    class PerBatch(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(6, 2)

        def forward(self, u, i, n: int):
            return self.head(torch.cat([u, i], 1)) / n

    with pytest.raises(mari_fx.DeclarationError, match=r"'n' is 4, the example's number of pairs"):
        mari_fx.transform(PerBatch().eval(), ["u"], (torch.randn(4, 3), torch.randn(4, 3), 4))
    T = mari_fx.transform(PerBatch().eval(), ["u"], (torch.randn(4, 3), torch.randn(4, 3), 5))  # a constant
    assert dict(T.meta["mari_fx.request"].fixed) == {"n": 5}
