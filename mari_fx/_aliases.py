"""The module paths of the flat layout, kept as aliases of the modules' new homes in the pipeline
tree (docs/architecture.md): ``import mari_fx.rules`` gives ``mari_fx.analysis.rules``, the same
module object.  For code written against the old paths; the repository itself imports the new
ones (tests/test_architecture.py checks).  ``mari_fx.export`` and ``mari_fx.verify`` are the
public functions and have no module alias: their modules are ``mari_fx.deploy.programs`` and
``mari_fx.report.verify``."""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import Any, Optional

ALIASES = {
    "mari_fx.capture": "mari_fx.frontend.capture",
    "mari_fx.inputs": "mari_fx.frontend.inputs",
    "mari_fx.functionalize": "mari_fx.frontend.functionalize",
    "mari_fx.tags": "mari_fx.analysis.tags",
    "mari_fx.example_prop": "mari_fx.analysis.example_prop",
    "mari_fx.arguments": "mari_fx.analysis.arguments",
    "mari_fx.elements": "mari_fx.analysis.elements",
    "mari_fx.propagate": "mari_fx.analysis.propagate",
    "mari_fx.rules": "mari_fx.analysis.rules",
    "mari_fx.lower": "mari_fx.lowering",
    "mari_fx.pieces": "mari_fx.lowering.ops.pieces",
    "mari_fx.split": "mari_fx.lowering.ops.split",
    "mari_fx.combos": "mari_fx.lowering.ops.combos",
    "mari_fx.interactions": "mari_fx.lowering.ops.interactions",
    "mari_fx.field_split": "mari_fx.lowering.ops.field_split",
    "mari_fx.modules": "mari_fx.runtime.modules",
    "mari_fx.record": "mari_fx.report.record",
    "mari_fx.flops": "mari_fx.report.flops",
    "mari_fx.audit": "mari_fx.report.audit",
    "mari_fx.precompute": "mari_fx.deploy.precompute",
    "mari_fx.examples": "mari_fx.testing.examples",
    "mari_fx.factories": "mari_fx.testing.factories",
    "mari_fx.demo": "mari_fx.testing.demo",
    "mari_fx.coverage": "mari_fx.testing.coverage",
    "mari_fx.jagged": "mari_fx.runtime.jagged",
    "mari_fx.folds": "mari_fx.analysis.folds",
    "mari_fx.sequences": "mari_fx.lowering.ops.sequences",
    "mari_fx.bags": "mari_fx.lowering.ops.bags",
    "mari_fx.cost": "mari_fx.lowering.cost",
    "mari_fx.timing": "mari_fx.report.timing",
}


class _AliasLoader(importlib.abc.Loader):
    """Loads an alias as the target module itself (its own ``__spec__`` kept)."""

    def __init__(self, target: str):
        self.target = target
        self.spec: Any = None

    def create_module(self, spec: Any) -> Any:
        module = importlib.import_module(self.target)
        self.spec = module.__spec__
        return module

    def exec_module(self, module: Any) -> None:
        module.__spec__ = self.spec  # importlib set the alias's spec on the shared module object

    # ``python -m mari_fx.coverage`` runs the target's code as __main__ (runpy asks for it)
    def get_code(self, fullname: str) -> Any:
        spec = importlib.util.find_spec(self.target)
        return spec.loader.get_code(self.target)

    def is_package(self, fullname: str) -> bool:
        return importlib.util.find_spec(self.target).submodule_search_locations is not None


class _AliasFinder(importlib.abc.MetaPathFinder):
    """Finds the old paths (first on ``sys.meta_path``, before an editable install's finder)."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Optional[Any]:
        if fullname not in ALIASES:
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader(ALIASES[fullname]))


def install() -> None:
    """Put the alias finder first on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _AliasFinder())
