"""The op families mari_fx knows, each with its torch function, Tensor-method, module and ATen
(torch.export) spellings side by side: defined once, shared by the tag rules
(:mod:`mari_fx.analysis.rules`), the element maps (:mod:`mari_fx.analysis.elements`) and the lowerings, so a rule
never promises a structure its lowering does not handle for some spelling.

Example:
    >>> import torch
    >>> torch.cat in CAT and torch.ops.aten.cat.default in CAT
    True
    >>> "relu" in PIECEWISE and "view" in PIECEWISE
    True
"""
from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

aten = torch.ops.aten

# --------------------------------------------------------------------------- elementwise
UNARY_FUNCS = [
    torch.relu, F.relu, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.gelu, F.silu, F.mish,
    F.leaky_relu, F.elu, F.selu, F.celu, F.softplus, F.hardtanh, F.relu6, F.hardswish, F.hardsigmoid,
    F.logsigmoid, torch.exp, torch.log, torch.log1p, torch.expm1, torch.abs, torch.neg, operator.neg,
    operator.pos, torch.sqrt, torch.rsqrt, torch.square, torch.clamp, torch.clip, torch.sign, torch.erf,
    torch.sin, torch.cos, torch.nan_to_num, torch.reciprocal, torch.logical_not, torch.isnan, torch.floor,
    torch.ceil, torch.round, torch.trunc, torch.atan, torch.asin, torch.acos, torch.sinh, torch.cosh, torch.tan,
    torch.log2, torch.log10, torch.exp2, torch.frac, torch.logit, torch.clamp_min, torch.clamp_max, F.softsign,
    F.tanhshrink, F.hardshrink, F.softshrink, F.threshold, torch.special.expit,
]
UNARY_METHODS = [
    "relu", "sigmoid", "tanh", "exp", "log", "log1p", "expm1", "abs", "neg", "sqrt", "rsqrt", "square",
    "clamp", "clip", "sign", "erf", "sin", "cos", "reciprocal", "nan_to_num", "floor", "ceil", "round",
    "float", "double", "half", "bfloat16", "long", "int", "bool", "type", "type_as", "to", "contiguous",
    "clone", "detach", "logical_not", "isnan", "trunc", "atan", "asin", "acos", "sinh", "cosh", "tan", "log2",
    "log10", "exp2", "frac", "logit", "clamp_min", "clamp_max",
]
UNARY_MODULES = [
    nn.ReLU, nn.Sigmoid, nn.Tanh, nn.GELU, nn.SiLU, nn.Mish, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU,
    nn.Softplus, nn.Hardtanh, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.LogSigmoid, nn.Identity, nn.Softsign,
    nn.Tanhshrink, nn.Hardshrink, nn.Softshrink, nn.Threshold,
]
BINARY_FUNCS = [
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.pow,
    operator.mod, operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
    operator.and_, operator.or_, torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply,
    torch.div, torch.divide, torch.true_divide, torch.pow, torch.maximum, torch.minimum, torch.where,
    torch.eq, torch.ne, torch.lt, torch.le, torch.gt, torch.ge, torch.logical_and, torch.logical_or,
    torch.masked_fill, torch.lerp, torch.addcmul, torch.addcdiv, torch.rsub, torch.atan2, torch.hypot, torch.fmod,
    torch.remainder, torch.floor_divide, torch.xlogy,
]
BINARY_METHODS = [
    "add", "sub", "mul", "div", "pow", "maximum", "minimum", "masked_fill", "eq", "ne", "lt", "le", "gt",
    "ge", "lerp", "addcmul", "where", "logical_and", "logical_or", "atan2", "hypot", "fmod", "remainder",
    "floor_divide", "xlogy", "__mod__", "__floordiv__", "__pow__", "__rpow__",
    "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__",
]

# The same ops as torch.export writes them (models fx cannot trace are captured that way).
UNARY_FUNCS += [
    aten.relu.default, aten.sigmoid.default, aten.tanh.default, aten.gelu.default, aten.silu.default,
    aten.exp.default, aten.log.default, aten.neg.default, aten.abs.default, aten.sqrt.default,
    aten.rsqrt.default, aten.clamp.default, aten.leaky_relu.default, aten.elu.default, aten.hardtanh.default,
    aten.softplus.default, aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default,
    aten.to.dtype, aten._to_copy.default, aten.square.default, aten.reciprocal.default, aten.log1p.default,
    aten.expm1.default, aten.erf.default, aten.sin.default, aten.cos.default, aten.sign.default, aten.floor.default,
    aten.ceil.default, aten.round.default, aten.trunc.default, aten.nan_to_num.default, aten.mish.default,
    aten.selu.default, aten.celu.default, aten.relu6.default, aten.hardswish.default, aten.hardsigmoid.default,
    aten.log_sigmoid.default, aten.clamp_min.default, aten.clamp_max.default, aten.type_as.default,
    aten.to.device, aten.lift_fresh_copy.default, aten.atan.default, aten.asin.default, aten.acos.default,
    aten.sinh.default, aten.cosh.default, aten.tan.default, aten.log2.default, aten.log10.default, aten.exp2.default,
    aten.frac.default, aten.logit.default, aten.softshrink.default, aten.hardshrink.default, aten.threshold.default,
    aten.special_expit.default,
]
BINARY_FUNCS += [
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.pow.Tensor_Scalar,
    aten.maximum.default, aten.minimum.default, aten.where.self, aten.masked_fill.Scalar, aten.rsub.Scalar,
    aten.eq.Tensor, aten.eq.Scalar, aten.gt.Scalar, aten.lt.Scalar, aten.pow.Tensor_Tensor, aten.pow.Scalar,
    aten.remainder.Scalar, aten.remainder.Tensor, aten.floor_divide.default, aten.div.Tensor_mode,
    aten.div.Scalar_mode, aten.lerp.Scalar, aten.lerp.Tensor, aten.addcmul.default, aten.addcdiv.default,
    aten.clamp.Tensor, aten.max.other, aten.min.other, aten.atan2.default, aten.hypot.default, aten.fmod.Scalar,
    aten.fmod.Tensor, aten.xlogy.Tensor, aten.clamp_min.Tensor, aten.clamp_max.Tensor,
]

DROPOUTS = [nn.Dropout, nn.AlphaDropout, nn.Dropout1d, nn.Dropout2d, F.dropout, torch.dropout, "dropout"]
# The ops mari_fx.lowering.ops.pieces lowers piece by piece: the only ones whose output may keep column segments
# (``view`` only as a same-size dtype view), so that a rule never promises pieces the lowering lacks.
PIECEWISE = frozenset(UNARY_FUNCS + UNARY_METHODS + UNARY_MODULES + BINARY_FUNCS + BINARY_METHODS
                      + DROPOUTS + ["view"])

# Comparisons and selections as torch.export writes them (elementwise; not lowered piece by piece).
ATEN_MORE_ELEMENTWISE = [
    aten.ne.Scalar, aten.ne.Tensor, aten.ge.Scalar, aten.le.Scalar, aten.gt.Tensor, aten.lt.Tensor, aten.ge.Tensor,
    aten.le.Tensor, aten.logical_and.default, aten.logical_or.default, aten.logical_not.default,
    aten.where.ScalarOther, aten.where.ScalarSelf, aten.masked_fill.Tensor, aten.mul.Scalar, aten.add.Scalar,
    aten.sub.Scalar, aten.div.Scalar,
]
# Masks and logical ops (``hist == 0``, ``~pad``, ``a & b``): elementwise too.
LOGICAL_FUNCS = [
    operator.invert, operator.xor, torch.bitwise_not, torch.bitwise_and, torch.bitwise_or, torch.bitwise_xor,
    torch.logical_xor, torch.isinf, torch.isfinite, torch.isneginf, torch.isposinf,
    aten.bitwise_not.default, aten.logical_not.default, aten.logical_and.default, aten.logical_or.default,
    aten.logical_xor.default, aten.bitwise_and.Tensor, aten.bitwise_or.Tensor, aten.bitwise_xor.Tensor,
    aten.bitwise_and.Scalar, aten.bitwise_or.Scalar, aten.bitwise_xor.Scalar, aten.__and__.Tensor,
    aten.__or__.Tensor, aten.masked_fill.Tensor, aten.where.ScalarOther, aten.where.ScalarSelf,
    aten.where.Scalar, aten.ne.Scalar, aten.ne.Tensor, aten.le.Scalar, aten.le.Tensor, aten.ge.Scalar,
    aten.ge.Tensor, aten.lt.Tensor, aten.gt.Tensor, aten.isinf.default, aten.isnan.default, aten.isfinite.default,
    aten.isneginf.default, aten.isposinf.default, aten.__xor__.Tensor, operator.lshift, operator.rshift,
    torch.bitwise_left_shift, torch.bitwise_right_shift, aten.__lshift__.Scalar, aten.__rshift__.Scalar,
    aten.bitwise_left_shift.Tensor_Scalar, aten.bitwise_right_shift.Tensor_Scalar,
]
LOGICAL_METHODS = [
    "bitwise_not", "bitwise_and", "bitwise_or", "bitwise_xor", "logical_xor", "isinf", "isfinite",
    "__invert__", "__and__", "__or__", "__xor__", "__rand__", "__ror__", "__rxor__", "__eq__", "__ne__",
    "__lt__", "__le__", "__gt__", "__ge__", "__lshift__", "__rshift__", "bitwise_left_shift", "bitwise_right_shift",
]
# Every elementwise spelling (functions and methods; modules are matched by class elsewhere).
ELEMENTWISE = frozenset(UNARY_FUNCS + UNARY_METHODS + BINARY_FUNCS + BINARY_METHODS + ATEN_MORE_ELEMENTWISE
                        + LOGICAL_FUNCS + LOGICAL_METHODS)

# --------------------------------------------------------------------------- linear algebra
LINEAR = (nn.Linear, F.linear, aten.linear.default)
MATMUL = (torch.matmul, operator.matmul, torch.mm, "matmul", "mm", "__matmul__", aten.matmul.default,
          aten.mm.default)
ADDMM = (torch.addmm, aten.addmm.default)
BMM = (torch.bmm, "bmm", aten.bmm.default)
LINEAR_LIKE = LINEAR + MATMUL + ADDMM  # what the MaRI split (mari_fx.lowering.ops.split) rewrites

# --------------------------------------------------------------------------- reductions
SUM = (torch.sum, "sum", aten.sum.dim_IntList)

# --------------------------------------------------------------------------- shapes
TRANSPOSE = (torch.transpose, "transpose", aten.transpose.int)
PERMUTE = (torch.permute, "permute", aten.permute.default)
FLATTEN = (torch.flatten, "flatten", aten.flatten.using_ints)

# --------------------------------------------------------------------------- cat / stack / split
CAT = (torch.cat, torch.concat, torch.concatenate, aten.cat.default)
SPLIT = (torch.split, "split", torch.chunk, "chunk", torch.tensor_split, "tensor_split")
ATEN_SPLIT = (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.tensor_split.sections)
NARROW = (torch.narrow, "narrow", aten.narrow.default)

# --------------------------------------------------------------------------- linear combinations
ADD = (operator.add, torch.add, "add", "__add__", aten.add.Tensor)
SUB = (operator.sub, torch.sub, "sub", "__sub__", aten.sub.Tensor)
NEG = (operator.neg, torch.neg, "neg", "__neg__", aten.neg.default)
MUL = (operator.mul, torch.mul, "mul", "__mul__", "__rmul__", aten.mul.Tensor)
DIV = (operator.truediv, torch.div, "div", "__truediv__", aten.div.Tensor)
