"""The core lowerings, one module per family; importing this package registers them in
:data:`mari_fx.registry.LOWERINGS` / ``LAZY_BUILDERS`` with explicit priorities:

* :mod:`.pieces` -- column pieces through ``cat`` / indexing / ``split`` / elementwise ops;
* :mod:`.split` -- the MaRI matmul split (priority 0);
* :mod:`.combos` -- linear combinations (``q - k``) kept as terms (builder, priority 20);
* :mod:`.interactions` -- FM / DLRM field blocks (builder 10, block products priority 10);
* :mod:`.field_split` -- a Linear over user element positions of any layout (priority 20);
* :mod:`.sequences` -- attention modules reading a batch-major mask fold at U rows;
* :mod:`.bags` -- jagged bag inputs (declaration, request helpers, ``EmbeddingBag`` lowering).

They import only :mod:`mari_fx.lowering.values` and :mod:`mari_fx.lowering.context`.
"""
from . import bags, combos, field_split, interactions, pieces, sequences, split  # noqa: F401
