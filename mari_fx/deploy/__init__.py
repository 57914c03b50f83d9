"""Deploying a transformed module: ``torch.export`` / TorchScript programs
(:mod:`.programs`, docs/deploy.md) and item-side precompute (:mod:`.precompute`,
docs/precompute.md)."""
from .precompute import PrecomputedModule, precompute_items
from .programs import (ExportError, ServedProgram, assert_request, dynamic_shapes, export, load,
                       register_dynamic_kind, script, traceable, widen_request)

__all__ = ["ExportError", "PrecomputedModule", "ServedProgram", "assert_request", "dynamic_shapes", "export", "load",
           "precompute_items", "register_dynamic_kind", "script", "traceable", "widen_request"]
