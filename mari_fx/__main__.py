"""``python -m mari_fx``: the ``mari-fx`` command line (see :mod:`mari_fx.cli`)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
