"""The one registry type: priorities, one duplicate policy, MRO lookup for rules and
lowerings alike, and extensions as objects (mari_fx.registry)."""
import pytest
import torch
import torch.nn as nn

import mari_fx
from mari_fx.errors import RegistrationError
from mari_fx.registry import LOWERINGS, RULES, Extension, Registry, active_extensions, use_extensions
from mari_fx.analysis.rules import rowwise
from mari_fx.analysis.tags import ROWS_KEY, TAG_KEY, Side

from helpers import ragged_index


class MyLinear(nn.Linear):
    """A Linear subclass that keeps Linear's forward: the Linear rule and lowering apply."""


class ScaledLinear(nn.Linear):
    """A Linear subclass with its own forward: a different op (no inherited rule or lowering)."""

    def forward(self, x):
        return super().forward(x) * 2


class Fusion(nn.Module):
    def __init__(self, cls):
        super().__init__()
        self.user = nn.Linear(6, 6)
        self.head = cls(10, 3)

    def forward(self, u, i):
        return self.head(torch.cat([torch.relu(self.user(u)), i], -1))


def _check(model, T, U=3, N=8):
    u, i, idx = torch.randn(U, 6), torch.randn(N, 4), ragged_index(U, N)
    T.graph.lint()
    with torch.no_grad():
        want, got = model(u[idx], i), T(u=u, i=i, user_index=idx)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want)


def test_linear_subclass_leaf_is_split():
    model = Fusion(MyLinear).eval()
    ex = (torch.randn(4, 6), torch.randn(4, 4))
    T = mari_fx.transform(model, ["u"], ex, leaf_modules=[MyLinear])
    record = T.meta["mari_fx.record"]
    assert record.split_layers == ("head",)
    assert isinstance(T.get_submodule("head"), mari_fx.SplitLinear)
    assert [n.meta[ROWS_KEY] for n in T.graph.nodes if n.target == "user"] == ["U"]
    _check(model, T)


def test_linear_subclass_with_its_own_forward_is_not_split():
    model = Fusion(ScaledLinear).eval()
    ex = (torch.randn(4, 6), torch.randn(4, 4))
    tagged = mari_fx.trace(model, ["u"], ex, leaf_modules=[ScaledLinear])
    head = next(n for n in tagged.graph.nodes if n.target == "head")
    assert head.meta[TAG_KEY].side == Side.MIXED  # no rule: unknown, not Linear's
    T = mari_fx.transform(tagged)
    assert T.meta["mari_fx.record"].split_layers == ()
    assert type(T.get_submodule("head")) is ScaledLinear
    _check(model, T)


def test_registry_policy_priority_duplicates_override():
    t = Registry("test")
    t.add("op", "core")
    t.add("op", "front", priority=5)
    assert t.values("op") == ["front", "core"]
    with pytest.raises(RegistrationError, match="already registered at priority 0"):
        t.add("op", "again")
    t.add("op", "replaced", override=True)
    assert t.values("op") == ["front", "replaced"]
    # classes: most derived registered class first, along the MRO
    t.add(nn.Linear, "linear")
    t.add(nn.Module, "module")
    assert t.values(MyLinear) == ["linear", "module"]
    assert t.values(ScaledLinear) == []  # redefines forward below any registered class


def test_core_tables_reject_duplicates_as_value_errors():
    with pytest.raises(ValueError, match="already registered"):
        mari_fx.analysis.rules.register(torch.relu)(rowwise)
    assert isinstance(LOWERINGS.first(nn.Linear), type(lambda: 0))


def scaled(x):
    return x * 3


torch.fx.wrap("scaled")


class UsesScaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(10, 1)

    def forward(self, u, i):
        return self.head(torch.cat([scaled(u), i], -1))


def test_extension_objects_are_active_only_where_given():
    ext = Extension("test-scaled")
    ext.rule(scaled)(rowwise)
    assert ext not in active_extensions() and RULES.first(scaled) is None
    model = UsesScaled().eval()
    ex = (torch.randn(4, 6), torch.randn(4, 4))
    plain = mari_fx.transform(model, ["u"], ex)
    assert plain.meta["mari_fx.record"].split_layers == ()  # unknown op: MIXED, nothing split
    T = mari_fx.transform(model, ["u"], ex, extensions=[ext])
    assert T.meta["mari_fx.record"].split_layers == ("head",)
    assert [n.meta[ROWS_KEY] for n in T.graph.nodes if n.target is scaled] == ["U"]
    assert RULES.first(scaled) is None  # nothing global changed
    with use_extensions([ext]):
        assert RULES.first(scaled) is rowwise
    _check(model, T)
    req = mari_fx.random_request(T)  # T keeps its extensions for the request helpers and verify
    assert mari_fx.verify(model, T, request=req) < 1e-4
