"""Tag rules: what side an op's output is on, given its inputs' tags.

One small rule per op, registered by target: a function (``torch.relu``), a method
name (``"view"``) or a module class (``nn.Linear``, looked up along the MRO).  A
target with no rule is *unknown*: its output is MIXED and the report says so.

The soundness argument every rule must keep: an output may be tagged USER only
if the op is *row-wise* -- ``f(x[idx]) == f(x)[idx]`` for every row index
``idx`` -- because USER values are computed at U rows and gathered to N rows
later.  Ops that couple rows across the batch (reductions or softmax over dim 0,
batch statistics, reshapes that merge the batch dimension) refuse: their output
is MIXED, i.e. computed exactly as in the pair-shaped model.

Segmented (column-exact) tags survive only the ops whose lowering in
:mod:`mari_fx.lowering` handles pieces: ``cat`` / slicing / ``split`` on the last
dimension, and elementwise ops with one column-structured operand.

The rules are split by op family, one module each (torch, Tensor-method and ATen spellings side
by side, the target sets in :mod:`mari_fx.targets`): :mod:`.base` (the registry functions,
:class:`RuleContext`, the generic rules), :mod:`.elementwise`, :mod:`.reductions`,
:mod:`.normalization`, :mod:`.linalg`, :mod:`.embeddings`, :mod:`.indexing`, :mod:`.shapes`,
:mod:`.cat`, :mod:`.factories`, :mod:`.sequence`, :mod:`.einsum`.  Importing the package
registers them all.

To add a rule::

    from mari_fx.analysis.rules import register, rowwise
    register(my_lib.fused_gelu)(rowwise)   # or a function (ctx) -> Tag

See docs/rules.md.
"""
# the families, in the order their rules register (later ones read earlier entries)
from . import (elementwise, reductions, normalization, linalg, embeddings, indexing, shapes, cat,  # noqa: F401
               factories, sequence, einsum)
from .base import (aten, bag_ids, bag_offsets, bag_weights, bind, CONST, constant_if_constant,
    describe_target, elementwise, join_all, lookup, _MISSING, nodes_in, NOTE_KEY, PIECEWISE, PRIORITY_BEFORE,
    reduction, refuse_with, register, register_before, rowwise, rowwise_in, Rule, RuleContext, RULES,
    Segment, SeqTag, Side, static_int, Tag, TAG_KEY, Target, target_name, targets, TensorInfo, TensorTag,
    unknown, VALUE_KEY)
from .elementwise import (_BINARY_FUNCS, _BINARY_METHODS, _DROPOUTS, _UNARY_FUNCS, _UNARY_METHODS,
    _UNARY_MODULES)
from .shapes import (ALL_ROWS, aten_slice_args, batch_dim_size_slot, column_index, expand_index,
    is_batch_size, is_batch_size_node, normalize_index, replace_at, size_read)
from .sequence import (ATTENTION_ARGS, attention_args, _ATTN, _SEQ, batch_major_fold)
from .einsum import parse_einsum
