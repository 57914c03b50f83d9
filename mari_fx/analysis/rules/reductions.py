"""Reductions and softmax: row-wise over non-batch dims; over the batch dim they couple rows (MIXED)."""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .base import (aten, constant_if_constant, elementwise, reduction, refuse_with, register, rowwise,
    RuleContext, Tag)


register(
    torch.sum, torch.mean, torch.prod, torch.amax, torch.amin, torch.logsumexp, torch.std, torch.var,
    torch.norm, torch.all, torch.any, torch.count_nonzero, torch.argmax, torch.argmin, torch.cumsum,
    torch.cumprod, torch.softmax, torch.log_softmax, F.softmax, F.log_softmax,
    "sum", "mean", "prod", "amax", "amin", "logsumexp", "std", "var", "norm", "all", "any",
    "argmax", "argmin", "cumsum", "cumprod", "softmax", "log_softmax", "count_nonzero",
)(constant_if_constant(reduction()))
register(torch.max, torch.min, "max", "min")(constant_if_constant(
    lambda ctx: elementwise(ctx) if isinstance(ctx.arg(1, "other", None), fx.Node) else reduction()(ctx)))
register(torch.topk, "topk")(constant_if_constant(reduction(2, "dim")))
register(torch.sort, "sort", torch.argsort, "argsort")(constant_if_constant(reduction(1, "dim")))
register(F.normalize)(constant_if_constant(reduction(2, "dim")))  # dim defaults to 1 (filled in by name)


@register(nn.Softmax, nn.LogSoftmax, nn.Softmin)
def _softmax_module(ctx: RuleContext) -> Tag:
    dim, ndim = ctx.module.dim, ctx.ndim(ctx.arg(0))
    if dim is None or ctx.norm_dim(dim, ndim) == 0:
        return ctx.refuse(f"{type(ctx.module).__name__}(dim={dim}) runs over the batch dimension")
    return rowwise(ctx)

# torch.export (ATen) spellings of the same ops
register(aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.amin.default, aten.softmax.int,
         aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default, aten.logsumexp.default,
         aten.cumsum.default, aten.argmax.default, aten.var.correction, aten.std.correction, aten.max.dim,
         aten.min.dim, aten.prod.dim_int, aten.all.dim, aten.any.dim, aten.argmin.default, aten.cumprod.default,
         aten.count_nonzero.dim_IntList, aten.sort.default, aten.sort.stable, aten.argsort.default,
         aten.argsort.stable)(constant_if_constant(reduction()))
register(aten.topk.default, aten.norm.ScalarOpt_dim, aten.linalg_vector_norm.default)(
    constant_if_constant(reduction(2, "dim")))


register(aten.sum.default, aten.mean.default, aten.max.default, aten.min.default, aten.prod.default,
         aten.all.default, aten.any.default)(constant_if_constant(refuse_with("reduces over all dims, batch included")))
