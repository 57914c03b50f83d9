"""Stage 3, analysis: run the example (:mod:`.example_prop`), then tag every node with the side it
depends on (:mod:`.propagate`, with the rules of :mod:`.rules` over the lattice of :mod:`.tags`,
arguments read by :mod:`.arguments`, element maps for field layouts in :mod:`.elements`)."""
