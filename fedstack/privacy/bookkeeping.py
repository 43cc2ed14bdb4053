"""Per-sample gradient clipping in one backward pass (book-keeping, Bu et al. 2023).

Why this exists: DP-SGD needs every example's gradient clipped to norm C before summing.
Opacus materialises per-sample gradients for every layer (hooks/functorch/ew modes) or runs
a second backward pass (ghost clipping); on our small CPU models both cost 2.4-4.7x a
non-private step. The book-keeping idea: one backward pass that asks autograd only for the
gradients of the *layer outputs* (never the weight gradients), keep each layer's input
activation from the forward pass, and from those two tensors compute

* each example's gradient norm (per layer, then combined over layers), and
* the clipped sum of gradients, as one contraction of activations with output gradients
  weighted by the per-example clip factors.

No second backward pass and no per-parameter gradient accumulation. Supported trainable
layers: ``nn.Linear`` (any leading dims), ``nn.Conv2d`` (groups=1, zero padding; via
``unfold``) and ``nn.GroupNorm`` (what ``ModuleValidator.fix`` puts in place of BatchNorm).
Anything else with trainable parameters raises :class:`UnsupportedLayerError` naming the
layer, so a model never trains with a parameter silently left unclipped.

Adding per-layer squared norms gives an example's true norm only when every parameter
belongs to exactly one layer, each layer runs once per forward pass and no layer mixes
examples. The clipper refuses models that break the first or the third (tied weights,
BatchNorm: see `fedstack.privacy.model_check`) when it is built, and a layer run twice at its
first step. Every step then checks that no example's clipped contribution exceeds C (and
that no norm is NaN/inf) before anything is added to the gradients:
:class:`ClipBoundError` stops training rather than release an update the accounting does
not cover.

The clip factor is Opacus's (``C / (norm + 1e-6)`` capped at 1) so that results can be
checked against Opacus's clipped-and-summed gradients.

Speed notes (measured on the benchmark machine, see benchmarks/dp.py): the large per-step
tensors (conv patches, per-example gradients, padded inputs) live in a reusable
:class:`_Workspace`. Allocating them afresh every step made the allocator hand pages back to
the OS and fault them in again, which cost more than the arithmetic (a 4x slower im2col in
a training loop than in isolation). Two-dimensional ``nn.Linear`` layers, where per-example
gradients are rank one, use fused vector products and never materialise them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedstack.log import get_logger
from fedstack.privacy.model_check import DPModelError, batch_dependent_layers, shared_parameters

log = get_logger(__name__)

# Numerical guard of the clip factor; identical to Opacus's so both give the same sums.
CLIP_EPSILON = 1e-6
# Above this many per-sample gradient elements for one layer (B x out x in), the norm is
# computed with the "ghost" (Gram matrix) formula instead of materialising per-sample
# gradients: fewer bytes, more FLOPs. Ours are far below it.
MAX_PER_SAMPLE_ELEMENTS = 1 << 26

SUPPORTED_LAYERS = (nn.Linear, nn.Conv2d, nn.GroupNorm)
#: The only parameters the per-layer formulas clip; any other one on a layer would escape.
CLIPPED_PARAMETER_NAMES = frozenset({"weight", "bias"})
#: Relative slack of the run-time bound check: clip factors are computed in floating point,
#: so an example at the bound may come out a few ulps above C.
CONTRIBUTION_RTOL = 1e-5
# Extra room when a workspace buffer grows (Poisson batch sizes vary from step to step), so
# that a slightly larger batch does not reallocate.
WORKSPACE_HEADROOM = 1.25


class UnsupportedLayerError(DPModelError):
    """A model book-keeping cannot clip per sample (a layer it has no formula for, a shared
    parameter, a layer mixing examples); the message names the layer."""


class ClipBoundError(RuntimeError):
    """An example's clipped contribution came out above C (or not finite) at run time.

    Raised before the step's clipped sum is added, so nothing beyond the bound is released.
    The message carries no data-dependent value: a client may pass it on to the server.
    """


@dataclass
class _Record:
    """What one forward pass leaves behind for one layer."""

    activation: Tensor  # layer input, detached
    output: Tensor  # layer output, still in the graph
    version: int  # output._version at forward time, to detect in-place edits


# A finisher turns per-example clip factors (B,) into the layer's clipped gradient sums.
_Finisher = Callable[[Tensor], None]


class _Workspace:
    """Scratch buffers reused across steps, one per (layer, purpose) key.

    A buffer only grows (with headroom); each request returns a contiguous view of its
    first elements. Buffers created with ``zeroed=True`` are zero-filled once: callers write
    only the positions they own (e.g. the interior of a padded image), so the rest stays
    zero across steps.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[object, ...], Tensor] = {}

    def take(self, key: tuple[object, ...], shape: tuple[int, ...], like: Tensor, *,
             zeroed: bool = False) -> Tensor:
        numel = math.prod(shape)
        buf = self._buffers.get(key)
        if (buf is None or buf.numel() < numel or buf.dtype != like.dtype
                or buf.device != like.device):
            size = max(1, int(numel * WORKSPACE_HEADROOM))
            make = torch.zeros if zeroed else torch.empty
            buf = make(size, dtype=like.dtype, device=like.device)
            self._buffers[key] = buf
        return buf[:numel].view(shape)

    def clear(self) -> None:
        self._buffers = {}


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters(recurse=False) if p.requires_grad]


def unsupported_layers(model: nn.Module) -> list[str]:
    """Names (and types) of trainable layers book-keeping cannot handle."""
    problems = []
    for name, module in model.named_modules():
        if not _trainable(module):
            continue
        if not isinstance(module, SUPPORTED_LAYERS):
            problems.append(f"{name or '<root>'} ({type(module).__name__})")
        elif extra := sorted(n for n, p in module.named_parameters(recurse=False)
                             if p.requires_grad and n not in CLIPPED_PARAMETER_NAMES):
            # e.g. weight_norm's weight_g/weight_v: the formulas clip .weight and .bias only.
            problems.append(f"{name or '<root>'} ({type(module).__name__} with parameters "
                            f"{', '.join(extra)})")
        elif isinstance(module, nn.Conv2d) and (
            module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str)
        ):
            problems.append(
                f"{name} (Conv2d with groups={module.groups}, padding={module.padding!r}, "
                f"padding_mode={module.padding_mode!r})"
            )
    return problems


class BookKeepingClipper:
    """Computes the clipped per-sample gradient sum of a model in one backward pass.

    Usage per step::

        with clipper.recording():
            logits = model(x)
        losses = criterion(logits, y)          # per-example, shape (B,)
        norms = clipper.clipped_backward(losses)  # sets p.grad = sum_i clip_i * g_i
    """

    def __init__(self, model: nn.Module, max_grad_norm: float) -> None:
        problems = unsupported_layers(model)
        if problems:
            raise UnsupportedLayerError(
                "grad_sample_mode=bk supports Linear, Conv2d (groups=1, zero padding) and "
                f"GroupNorm layers; this model also trains: {', '.join(problems)}. "
                "Use dp.grad_sample_mode=hooks (Opacus) for it."
            )
        # The per-layer norms add up to an example's norm only if no parameter is shared
        # between layers and no layer mixes examples (fedstack.privacy.model_check).
        structural = [str(p) for p in (*shared_parameters(model), *batch_dependent_layers(model))]
        if structural:
            raise UnsupportedLayerError(
                "grad_sample_mode=bk cannot bound each example's gradient for this model: "
                + "; ".join(structural)
            )
        if not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")
        self.model = model
        self.max_grad_norm = float(max_grad_norm)
        self.layers: list[tuple[str, nn.Module]] = [
            (name, m) for name, m in model.named_modules() if _trainable(m)
        ]
        self._records: dict[int, _Record] = {}
        self._recording = False
        self._workspace = _Workspace()
        # (layer, the instance-level forward it had before us, if any)
        self._wrapped: list[tuple[nn.Module, Callable[..., Tensor] | None]] = []
        for _, module in self.layers:
            self._wrap_forward(module)

    # -- forward ---------------------------------------------------------------------------
    def _wrap_forward(self, module: nn.Module) -> None:
        """Record the layer's input and output by wrapping its ``forward``.

        Why not a forward hook: any hook sends ``nn.Module.__call__`` down its slow path,
        measured at ~17 µs per hooked layer per step here, a third of the tiny MLP's whole
        forward pass. An instance attribute ``forward`` keeps the fast path; ``remove()``
        takes it away again.
        """
        previous = module.__dict__.get("forward")
        original = module.forward
        save = self._save

        def recorded_forward(*args: object, **kwargs: object) -> Tensor:
            output = original(*args, **kwargs)
            save(module, args or tuple(kwargs.values()), output)  # type: ignore[arg-type]
            return output

        module.forward = recorded_forward  # type: ignore[method-assign]
        self._wrapped.append((module, previous))

    def _save(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if not self._recording:
            return
        key = id(module)
        if key in self._records:
            raise UnsupportedLayerError(
                f"layer {type(module).__name__} ran twice in one forward pass (shared "
                "weights); its per-sample gradient needs both uses summed before the norm, "
                "which grad_sample_mode=bk does not do. Use an Opacus mode."
            )
        self._records[key] = _Record(inputs[0].detach(), output, output._version)

    def recording(self) -> _RecordingScope:
        """Context manager: record activations of the forward pass run inside it."""
        return _RecordingScope(self)

    def remove(self) -> None:
        """Unwrap the layers' forwards (the model goes back to plain behaviour)."""
        for module, previous in self._wrapped:
            if previous is None:
                del module.forward
            else:
                module.forward = previous  # type: ignore[method-assign]
        self._wrapped = []
        self._workspace.clear()

    # -- backward --------------------------------------------------------------------------
    def clipped_backward(self, per_sample_loss: Tensor, scale: float = 1.0) -> Tensor:
        """One backward pass; adds ``scale * sum_i min(1, C/||g_i||) g_i`` to each ``p.grad``.

        Like autograd, it accumulates: ``p.grad`` that is None is set, an existing one
        (e.g. pre-filled with noise) is added to. ``scale`` folds DP-SGD's division by the
        expected batch size into the clip factors (B multiplies instead of a pass over
        every parameter).

        Returns the per-example gradient norms before clipping (shape (B,)).
        """
        if per_sample_loss.dim() != 1:
            raise ValueError(
                f"per_sample_loss must have shape (batch,), got {tuple(per_sample_loss.shape)}"
                " (use a criterion with reduction='none')"
            )
        records = []
        for name, module in self.layers:
            record = self._records.get(id(module))
            if record is None:
                raise RuntimeError(
                    f"layer {name!r} did not run inside clipper.recording(); its gradient "
                    "would escape clipping"
                )
            if record.output._version != record.version:
                raise UnsupportedLayerError(
                    f"the output of layer {name!r} was modified in place after the layer "
                    "(e.g. ReLU(inplace=True)); set inplace=False for grad_sample_mode=bk"
                )
            records.append(record)
        self._records = {}
        output_grads = torch.autograd.grad(per_sample_loss.sum(), [r.output for r in records])

        norm_sq: Tensor | None = None
        finishers: list[_Finisher] = []
        workspace = self._workspace
        for (name, module), record, grad in zip(self.layers, records, output_grads,
                                                strict=True):
            layer_sq, finish = _layer_norms(module, record.activation, grad, workspace, name)
            norm_sq = layer_sq if norm_sq is None else norm_sq.add_(layer_sq)
            finishers.append(finish)
        assert norm_sq is not None  # at least one trainable layer (checked in __init__)
        norms = norm_sq.sqrt_()
        factors = clip_factors(norms, self.max_grad_norm, scale)
        self._check_contributions(norms, factors, scale)
        for finish in finishers:
            finish(factors)
        return norms

    def _check_contributions(self, norms: Tensor, factors: Tensor, scale: float) -> None:
        """Refuse the step if any example's clipped contribution |c_i|·‖g_i‖ exceeds scale·C.

        What it guards: the clip arithmetic as it actually ran (factors against the norms
        they were computed from), and NaN/inf norms (a diverged loss would otherwise put NaN
        into every parameter). It cannot see a norm the per-layer formulas under-count; the
        model checks in __init__ and the one-run-per-layer check exclude those cases. Cost:
        three small ops on (B,) tensors and one scalar read per step.
        """
        if not norms.numel():
            return
        largest = float(torch.max((norms * factors).abs_()))  # max() propagates NaN
        if largest <= self.max_grad_norm * scale * (1 + CONTRIBUTION_RTOL):
            return
        cause = ("a per-example gradient norm is NaN or infinite (the loss diverged? lower "
                 "the learning rate)") if not math.isfinite(largest) else (
                 "an example's clipped gradient came out above the clipping bound")
        log.error("bk clipping guard: %s; no update applied", cause)
        raise ClipBoundError(
            f"grad_sample_mode=bk: an example's clipped contribution was not within "
            f"dp.max_grad_norm={self.max_grad_norm:g} (or not finite); training stopped before "
            "the step so that no update beyond the DP bound is released"
        )


def clip_factors(norms: Tensor, max_grad_norm: float, scale: float) -> Tensor:
    """``scale * min(1, C / (norm + eps))`` per example: Opacus's clip factor, pre-scaled.

    Three tensor ops (each costs several µs of dispatch on small models, comparable to their
    arithmetic).
    """
    return torch.div(max_grad_norm * scale, norms + CLIP_EPSILON).clamp_(max=scale)


class _RecordingScope:
    def __init__(self, clipper: BookKeepingClipper) -> None:
        self.clipper = clipper

    def __enter__(self) -> BookKeepingClipper:
        self.clipper._records = {}
        self.clipper._recording = True
        return self.clipper

    def __exit__(self, *exc: object) -> None:
        self.clipper._recording = False


# -- per-layer formulas ----------------------------------------------------------------------
# The clipped sums are *accumulated* into ``p.grad`` like autograd does: a caller that
# pre-fills ``p.grad`` with noise (views of one flat buffer) gets noise + clipped sum with
# in-place matrix products and no extra tensors per parameter.
def _acc_mm(param: nn.Parameter | None, m1: Tensor, m2: Tensor) -> None:
    """p.grad (viewed as m1 @ m2's shape) += m1 @ m2."""
    if param is None or not param.requires_grad:
        return
    grad = param.grad
    if grad is None:
        param.grad = (m1 @ m2).reshape(param.shape)
    elif grad.dim() == 2:
        grad.addmm_(m1, m2)
    else:
        grad.view(m1.shape[0], m2.shape[1]).addmm_(m1, m2)


def _acc_mv(param: nn.Parameter | None, mat: Tensor, vec: Tensor) -> None:
    """p.grad (flattened) += mat @ vec."""
    if param is None or not param.requires_grad:
        return
    grad = param.grad
    if grad is None:
        param.grad = (mat @ vec).reshape(param.shape)
    elif grad.dim() == 1:
        grad.addmv_(mat, vec)
    else:
        grad.view(-1).addmv_(mat, vec)


def _wants(param: nn.Parameter | None) -> bool:
    return param is not None and param.requires_grad


def _layer_norms(module: nn.Module, activation: Tensor, grad: Tensor, workspace: _Workspace,
                 name: str) -> tuple[Tensor, _Finisher]:
    """Squared per-example gradient norm of one layer's parameters and its finisher.

    The returned norm tensor is always freshly allocated (the caller accumulates into it).
    """
    if isinstance(module, nn.Linear):
        return _linear(module, activation, grad, workspace, name)
    if isinstance(module, nn.Conv2d):
        return _conv2d(module, activation, grad, workspace, name)
    if isinstance(module, nn.GroupNorm):
        return _group_norm(module, activation, grad)
    raise UnsupportedLayerError(type(module).__name__)  # pragma: no cover - checked in __init__


def _linear(module: nn.Linear, a: Tensor, g: Tensor, workspace: _Workspace,
            name: str) -> tuple[Tensor, _Finisher]:
    batch = a.shape[0]
    if a.dim() == 2:
        # One token per example: the per-example weight gradient g_i a_i^T is rank one, so
        # ||g_i a_i^T||_F^2 = ||g_i||^2 ||a_i||^2 and the bias adds ||g_i||^2.
        want_w, want_b = _wants(module.weight), _wants(module.bias)
        g_sq = torch.linalg.vecdot(g, g)
        if want_w:
            a_sq = torch.linalg.vecdot(a, a)
            sq = torch.addcmul(g_sq, g_sq, a_sq) if want_b else g_sq.mul_(a_sq)
        else:
            sq = g_sq

        def finish(c: Tensor) -> None:
            g_t = g.t()  # (out, B): c broadcasts over its last dim, no unsqueeze needed
            if want_w:
                _acc_mm(module.weight, g_t * c, a)
            if want_b:
                _acc_mv(module.bias, g_t, c)

        return sq, finish
    # Sequence input (B, ..., d): treat the middle dims as T tokens (same algebra as conv).
    a3 = a.reshape(batch, -1, a.shape[-1]).transpose(1, 2)  # (B, in, T)
    g3 = g.reshape(batch, -1, g.shape[-1]).transpose(1, 2)  # (B, out, T)
    return _token_layer(module.weight, module.bias, a3, g3, workspace, name)


def _conv2d(module: nn.Conv2d, a: Tensor, g: Tensor, workspace: _Workspace,
            name: str) -> tuple[Tensor, _Finisher]:
    batch = a.shape[0]
    cols = _im2col(a, module, workspace, name)  # (B, in*kh*kw, T)
    g3 = g.reshape(batch, g.shape[1], -1)  # (B, out, T)
    return _token_layer(module.weight, module.bias, cols, g3, workspace, name)


def _im2col(x: Tensor, module: nn.Conv2d, workspace: _Workspace, name: str) -> Tensor:
    """Input patches as (B, in*kh*kw, T), the layout of ``F.unfold``.

    Built from strided views with one copy into the layer's workspace buffer: measured ~2x
    faster than ``F.unfold`` on 2 CPU cores for our shapes.
    """
    pad_h, pad_w = module.padding  # type: ignore[misc]  # int/tuple checked in __init__
    k_h, k_w = module.kernel_size
    d_h, d_w = module.dilation
    s_h, s_w = module.stride
    batch, channels, height, width = x.shape
    if pad_h or pad_w:
        # The border of this buffer is zeroed once and never written: only the interior is.
        padded = workspace.take((name, "padded", channels, height, width), (
            batch, channels, height + 2 * pad_h, width + 2 * pad_w), x, zeroed=True)
        padded[:, :, pad_h:pad_h + height, pad_w:pad_w + width].copy_(x)
        x = padded
    patches = x.unfold(2, d_h * (k_h - 1) + 1, s_h).unfold(3, d_w * (k_w - 1) + 1, s_w)
    if d_h > 1 or d_w > 1:
        patches = patches[..., ::d_h, ::d_w]
    out_h, out_w = patches.shape[2:4]
    # Channel-major (B, P, T) copies ~5x faster than token-major here (memory order of the
    # strided view), and bmm takes the transposed operand without a copy.
    cols = workspace.take((name, "cols"), (batch, channels, k_h, k_w, out_h, out_w), x)
    cols.copy_(patches.permute(0, 1, 4, 5, 2, 3))
    return cols.view(batch, channels * k_h * k_w, out_h * out_w)


def _token_layer(
    weight: nn.Parameter, bias: nn.Parameter | None, a: Tensor, g: Tensor,
    workspace: _Workspace, name: str,
) -> tuple[Tensor, _Finisher]:
    """Layer whose per-example weight gradient is sum_t g[:, :, t] a[:, :, t]^T.

    ``a`` is (B, P, T) and ``g`` is (B, O, T). Explicit per-example gradients (B, O, P)
    cost the same multiply-adds as the non-private weight gradient and make the clipped
    sum a cheap weighted reduction, so they are used unless they would not fit the memory
    cap; then the Gram ("ghost") norm and a weighted contraction are used instead.
    """
    batch, p_dim, tokens = a.shape
    o_dim = g.shape[1]
    bias_g = g.sum(2) if _wants(bias) else None  # (B, O)
    sq = torch.linalg.vecdot(bias_g, bias_g) if bias_g is not None else g.new_zeros(batch)
    if not _wants(weight):

        def finish_bias(c: Tensor) -> None:
            assert bias_g is not None
            _acc_mv(bias, bias_g.t(), c)

        return sq, finish_bias

    if batch * o_dim * p_dim <= MAX_PER_SAMPLE_ELEMENTS:
        per_sample = workspace.take((name, "per_sample"), (batch, o_dim, p_dim), g)
        torch.bmm(g, a.transpose(1, 2), out=per_sample)
        flat = per_sample.view(batch, o_dim * p_dim)
        sq.add_(torch.linalg.vecdot(flat, flat))

        def finish(c: Tensor) -> None:
            _acc_mv(weight, flat.t(), c)
            if bias_g is not None:
                _acc_mv(bias, bias_g.t(), c)

        return sq, finish

    gram_a = torch.bmm(a.transpose(1, 2), a)  # (B, T, T)
    gram_g = torch.bmm(g.transpose(1, 2), g)
    sq.add_((gram_a * gram_g).sum((1, 2)))

    def finish_ghost(c: Tensor) -> None:
        gc = (g * c[:, None, None]).permute(1, 0, 2).reshape(o_dim, batch * tokens)
        _acc_mm(weight, gc, a.transpose(1, 2).reshape(batch * tokens, p_dim))
        if bias_g is not None:
            _acc_mv(bias, bias_g.t(), c)

    return sq, finish_ghost


def _group_norm(module: nn.GroupNorm, a: Tensor, g: Tensor) -> tuple[Tensor, _Finisher]:
    # Per-example affine gradients: weight_c = sum_spatial(x_hat * g), bias_c = sum_spatial(g).
    batch, channels = a.shape[0], a.shape[1]
    x_hat = F.group_norm(a, module.num_groups, None, None, module.eps)
    g3 = g.reshape(batch, channels, -1)
    w_ps = (x_hat.reshape(batch, channels, -1) * g3).sum(2) if _wants(module.weight) else None
    b_ps = g3.sum(2) if _wants(module.bias) else None
    sq = g.new_zeros(batch)
    for ps in (w_ps, b_ps):
        if ps is not None:
            sq.add_(torch.linalg.vecdot(ps, ps))

    def finish(c: Tensor) -> None:
        if w_ps is not None:
            _acc_mv(module.weight, w_ps.t(), c)
        if b_ps is not None:
            _acc_mv(module.bias, b_ps.t(), c)

    return sq, finish
