"""Normalisation layers: LayerNorm / RMSNorm per row; BatchNorm with running statistics only;
GroupNorm / InstanceNorm per sample."""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .base import aten, nodes_in, register, rowwise, rowwise_in, RuleContext, Side, Tag


@register(nn.LayerNorm, nn.RMSNorm, F.layer_norm, F.rms_norm)
def _layer_norm(ctx: RuleContext) -> Tag:
    """Row-wise when the normalised trailing dims leave dim 0 alone; the shape, weight and bias
    must be batch-free (``F.layer_norm(h, h.shape)`` normalises over the batch)."""
    shape = ctx.module.normalized_shape if ctx.module is not None else ctx.arg(1, "normalized_shape")
    if any(ctx.side(n) != Side.CONST for n in nodes_in(shape)):
        return ctx.refuse("layer_norm's normalized_shape depends on the batch (e.g. h.shape): it covers dim 0")
    value = ctx.value(shape) if isinstance(shape, fx.Node) else shape
    n_norm = len(value) if isinstance(value, (tuple, list, torch.Size)) else 1
    ndim = ctx.ndim(ctx.arg(0, "input"))
    if ndim is None or n_norm >= ndim:
        return ctx.refuse("normalises over the batch dimension")
    return rowwise(ctx, ("input",))


@register(nn.modules.batchnorm._BatchNorm)
def _batch_norm(ctx: RuleContext) -> Tag:
    m = ctx.module
    if m.training or not m.track_running_stats or m.running_mean is None:
        return ctx.refuse(f"{type(m).__name__} in training mode normalises with batch statistics: call model.eval()")
    return rowwise(ctx, ("input",), min_ndim=2)


@register(F.batch_norm)
def _batch_norm_fn(ctx: RuleContext) -> Tag:
    """Also ``aten.batch_norm``: the same parameter names in another order."""
    if ctx.arg(5, "training", False) or ctx.arg(1, "running_mean", None) is None:
        return ctx.refuse("batch_norm with training=True normalises with batch statistics")
    return rowwise(ctx, ("input",), min_ndim=2)  # running stats, weight and bias batch-free


@register(nn.GroupNorm, F.group_norm, aten.group_norm.default)
def _group_norm(ctx: RuleContext) -> Tag:
    return rowwise(ctx, ("input",), min_ndim=2)  # (N, C, *) only; weight and bias batch-free


@register(nn.modules.instancenorm._InstanceNorm)
def _instance_norm(ctx: RuleContext) -> Tag:
    # An input without a batch dim ((C, L) for InstanceNorm1d) would make the batch the channels.
    return rowwise(ctx, ("input",), min_ndim=ctx.module._get_no_batch_dim() + 1)

# torch.export (ATen) spellings of the same ops
register(aten.layer_norm.default, aten.rms_norm.default)(_layer_norm)


register(aten._native_batch_norm_legit_no_training.default)(rowwise_in("input", min_ndim=2))


register(aten.batch_norm.default)(_batch_norm_fn)
