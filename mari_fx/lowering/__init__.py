"""Stage 4, lowering: the tagged pair-shaped graph becomes the request-shaped module ``T``.

* :mod:`.values` -- what a lowered node is (``Rows`` at U / N / C rows, ``Pieces``, ``Combo`` ...);
* :mod:`.context` -- :class:`LoweringContext`, all a lowering may use, and the lowering tables;
* :mod:`.driver` -- :func:`lower`, walking the graph (imports the lowerings);
* :mod:`.ops` -- the core lowerings, one module per family.
"""
from .context import (LAZY_BUILDERS, LOWERINGS, LowerOptions, LoweringContext, register_lowering,
                      register_row_gather)
from .driver import Lowerer, batch_numel, batch_shape, lower
from .values import C, N, U, Blocks, Combo, Lazy, Pieces, Rows, Seq, Value

__all__ = [
    "Blocks", "C", "Combo", "LAZY_BUILDERS", "LOWERINGS", "Lazy", "LowerOptions", "Lowerer", "LoweringContext", "N",
    "Pieces", "Rows", "Seq", "U", "Value", "batch_numel", "batch_shape", "lower", "register_lowering",
    "register_row_gather",
]
