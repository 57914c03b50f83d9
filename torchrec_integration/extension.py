"""The TorchRec extension object: every rule, lowering, input kind and summary this package
teaches mari_fx is an entry of :data:`EXTENSION` (see :mod:`mari_fx.registry`).

``import torchrec_integration`` installs it (the common case); it can also be passed
explicitly, ``mari_fx.transform(..., extensions=[torchrec_integration.EXTENSION])``."""
from mari_fx.registry import Extension

EXTENSION = Extension("torchrec")
