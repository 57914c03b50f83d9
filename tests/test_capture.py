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
