"""Every ``meta`` key mari_fx writes, in one place (namespaced ``"mari_fx.*"``; values immutable).

The modules that used to define these re-export them (``mari_fx.analysis.tags.TAG_KEY`` ...), so
either import works.

Per node (``node.meta``):

* :data:`VALUE_KEY` -- the example run's summary of the node's value (``TensorInfo`` ...);
* :data:`TAG_KEY` -- the node's tag (``TensorTag`` / ``SeqTag``): which side it depends on;
* :data:`NOTE_KEY` -- why a node was tagged MIXED although no item data reached it;
* :data:`ELEM_KEY` -- element maps where user data left the last dim (field layouts);
* :data:`FACT_KEY` -- a fact functionalize proved about a node (e.g. a static int);
* :data:`FUNCTIONALIZED_KEY` -- on rewritten nodes: the in-place op they replace;
* :data:`UNFOLDED_KEY` -- on nodes the batch-fold pass (:mod:`mari_fx.analysis.folds`) rewrote;
* :data:`SEQ_FIRST_KEY` -- on calls of a batch-first twin (:mod:`mari_fx.analysis.seq_first`): the
  path of the model's seq-first module the lowering calls instead;
* :data:`ROWS_KEY` -- on transformed graphs: ``"U"``, ``"N"`` or ``"C"`` (batch-free);
* :data:`ITEM_PRODUCT_KEY` -- on product nodes item precompute exposed: ``(split call, "item" | "broadcast")``.

Per module (``GraphModule.meta``):

* :data:`EXAMPLE_KEY` -- the flat, pair-shaped example inputs by placeholder name;
* :data:`REQUEST_KEY` -- the :class:`~mari_fx.frontend.inputs.RequestSpec`;
* :data:`RECORD_KEY` -- the :class:`~mari_fx.report.record.Record` of what was split, hoisted, refused;
* :data:`ROUTE_KEY` -- which capture route made the graph;
* :data:`FIXED_ARGS_KEY` -- ``(forward's argument names, {name: constant})``: the arguments fixed when
  captured (Python constants such as ``None`` / ``False`` / ``2``, given or left at their defaults);
* :data:`EXTENSIONS_KEY` -- the :class:`~mari_fx.registry.Extension` objects it was made with;
* :data:`PRECOMPUTE_KEY` -- on a :class:`~mari_fx.deploy.precompute.PrecomputedModule`: what its refresh needs.
"""

VALUE_KEY = "mari_fx.value"
TAG_KEY = "mari_fx.tag"
NOTE_KEY = "mari_fx.note"
ELEM_KEY = "mari_fx.elements"
FACT_KEY = "mari_fx.fact"
FUNCTIONALIZED_KEY = "mari_fx.functionalized"
UNFOLDED_KEY = "mari_fx.unfolded"
SEQ_FIRST_KEY = "mari_fx.seq_first"
ROWS_KEY = "mari_fx.rows"
ITEM_PRODUCT_KEY = "mari_fx.item_product"

EXAMPLE_KEY = "mari_fx.example"
REQUEST_KEY = "mari_fx.request"
RECORD_KEY = "mari_fx.record"
ROUTE_KEY = "mari_fx.capture"
FIXED_ARGS_KEY = "mari_fx.fixed_args"
EXTENSIONS_KEY = "mari_fx.extensions"
PRECOMPUTE_KEY = "mari_fx.precompute"
