"""Every docstring example in mari_fx runs and shows what it says."""
import doctest
import importlib
import pkgutil

import pytest

import mari_fx

MODULES = sorted(m.name for m in pkgutil.walk_packages(mari_fx.__path__, "mari_fx.") if not m.name.endswith("__main__"))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    failures, _ = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS, verbose=False)
    assert failures == 0
