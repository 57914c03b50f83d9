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
