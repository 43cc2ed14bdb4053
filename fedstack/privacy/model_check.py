"""Make a model fit for DP-SGD, or refuse it naming the layer and the reason.

DP-SGD's guarantee rests on one bound: each example changes the released (noisy) update by
at most C, the clipping norm. Per-sample clipping computes every example's gradient, clips
it to C and adds it to the sum. That bound holds only when

1. **each example's gradient depends on that example alone.** A layer that mixes examples
   across the batch (BatchNorm in training mode normalises with the batch's mean and
   variance) makes example j's gradient a function of example i as well, so removing i
   changes far more than i's own clipped term. Refused: every BatchNorm variant, with or
   without affine weights (Opacus's validator only looks at layers with trainable
   parameters and so lets ``affine=False`` through), ``SyncBatchNorm`` (the batch spans
   processes) and lazy BatchNorm. InstanceNorm, LayerNorm and GroupNorm normalise each
   example by its own statistics and do not mix examples.
2. **the clipper sees each example's whole gradient of each parameter.** Per-layer clipping
   (our ``bk`` mode, Opacus's ``ghost``) computes each *layer's* per-example norm and adds
   the squares. A parameter owned by two layers (tied weights: two ``nn.Linear`` whose
   ``.weight`` is one ``Parameter``) gets the *sum* of both layers' per-example gradients,
   whose norm can exceed what the squares add up to: in a test one example contributed
   1.10·C to the clipped sum and ε was reported as if the bound held. Refused in every mode,
   so the rule does not depend on the mode (Opacus's ``hooks``/``functorch``/``ew`` do sum
   tied gradients correctly; ``ghost`` raises only during training). One module *called*
   twice is not visible statically: ``bk`` refuses it at its first step, Opacus's per-sample
   modes sum the uses, ``ghost`` raises.
3. **nothing computed from the data leaves the client without noise.** Running statistics
   are buffers updated from every training example and sent with the model's arrays,
   un-noised. Refused: BatchNorm (above) and InstanceNorm with ``track_running_stats=True``.

Also refused: in-place activations, which overwrite the layer outputs the ``bk`` clipper
differentiates against (switched off by :func:`make_dp_compatible`), and whatever Opacus's
own validator refuses (e.g. ``nn.LSTM``: use Opacus's DPLSTM).

:func:`make_dp_compatible` fixes what has a standard fix (BatchNorm -> GroupNorm, running
statistics off, in-place off); the fixed model is a *new* module with different parameters,
so optimizers must be built after fixing, and server and clients must build the same (fixed)
architecture. Tied weights have no fix that keeps the model's meaning and are always refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from opacus.utils.module_utils import clone_module
from opacus.validators import ModuleValidator
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from fedstack.log import get_logger

log = get_logger(__name__)

#: How the root module is named in messages (its module path is the empty string).
ROOT_NAME = "<root>"

MIXES_EXAMPLES = (
    "normalises each example with the mean and variance of the whole batch in training, so "
    "an example's gradient depends on the other examples and clipping it bounds nothing "
    "(affine weights or not); its running statistics would also leave the client without "
    "noise. Use GroupNorm or LayerNorm (make_dp_compatible swaps in GroupNorm)"
)
KEEPS_RUNNING_STATS = (
    "track_running_stats=True keeps means and variances over every training example; they "
    "are sent with the model without noise and used at evaluation. Set "
    "track_running_stats=False (InstanceNorm itself does not mix examples)"
)
SHARED_PARAMETER = (
    "a trainable parameter owned by more than one layer (tied weights). Per-layer "
    "clipping adds each layer's per-example norm in squares, but the example's gradient of "
    "a shared parameter is the sum of the layers' gradients and can be larger, so an "
    "example could contribute more than dp.max_grad_norm. Give each layer its own Parameter"
)


class DPModelError(ValueError):
    """A model that cannot be trained with DP-SGD as built (or even after the standard
    fixes); the message names every offending layer by its module path."""


@dataclass(frozen=True)
class ModelProblem:
    """One reason a model is not fit for DP-SGD, tied to a layer (module path)."""

    layer: str
    reason: str
    #: The offending module, replaced by Opacus's fixer for its type if there is one; None
    #: for problems no layer swap fixes (shared parameters, in-place activations).
    module: nn.Module | None = None

    def __str__(self) -> str:
        return f"{self.layer}: {self.reason}"


def _path(name: str) -> str:
    return name or ROOT_NAME


def _label(name: str, module: nn.Module) -> str:
    return f"layer {_path(name)!r} ({type(module).__name__})"


def shared_parameters(model: nn.Module) -> list[ModelProblem]:
    """Trainable parameters owned by more than one layer, naming every owner's path.

    A module registered at two paths is one layer (``named_modules`` lists it once): its
    parameters are not shared; calling it twice is caught at run time (module docstring).
    """
    owners: dict[int, list[tuple[str, str]]] = {}
    for name, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            if param.requires_grad:
                path = f"{name}.{pname}" if name else pname
                owners.setdefault(id(param), []).append((_path(name), path))
    return [
        ModelProblem(
            "layers " + " and ".join(repr(layer) for layer, _ in found) + " share one "
            "parameter (" + " = ".join(repr(path) for _, path in found) + ")",
            SHARED_PARAMETER,
        )
        for found in owners.values() if len(found) > 1
    ]


def batch_dependent_layers(model: nn.Module) -> list[ModelProblem]:
    """Layers that mix examples across the batch or keep un-noised data statistics."""
    problems = []
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm):  # BatchNorm1d/2d/3d, SyncBatchNorm, lazy ones
            problems.append(ModelProblem(_label(name, module), MIXES_EXAMPLES, module))
        elif isinstance(module, _InstanceNorm) and module.track_running_stats:
            problems.append(ModelProblem(_label(name, module), KEEPS_RUNNING_STATS, module))
    return problems


def inplace_layers(model: nn.Module) -> list[ModelProblem]:
    """Activations that overwrite their input (the previous layer's output) in place."""
    return [
        ModelProblem(_label(name, m), "inplace=True (overwrites the previous layer's output)")
        for name, m in model.named_modules()
        if getattr(m, "inplace", False) is True
    ]


def opacus_problems(model: nn.Module) -> list[ModelProblem]:
    """Opacus's own validators (e.g. LSTM -> DPLSTM), per layer, so each names its layer.

    Normalisation layers are left to :func:`batch_dependent_layers`, which also covers
    those without trainable parameters (Opacus's validator skips them).
    """
    problems = []
    for name, module in model.named_modules():
        if isinstance(module, (_BatchNorm, _InstanceNorm)):
            continue
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        validator = ModuleValidator.VALIDATORS.get(type(module))
        for err in validator(module) if validator is not None else []:
            problems.append(ModelProblem(_label(name, module), str(err), module))
    return problems


def model_problems(model: nn.Module) -> list[ModelProblem]:
    """Every reason the model cannot be trained with DP-SGD as it is (empty when it can)."""
    return [
        *shared_parameters(model),
        *batch_dependent_layers(model),
        *opacus_problems(model),
        *inplace_layers(model),
    ]


def dp_problems(model: nn.Module) -> list[str]:
    """Human-readable reasons a model is not DP-compatible (empty when it is)."""
    return [str(p) for p in model_problems(model)]


def _fixable(problem: ModelProblem) -> bool:
    return problem.module is not None and type(problem.module) in ModuleValidator.FIXERS


def _replace_layers(model: nn.Module, problems: list[ModelProblem]) -> nn.Module:
    """A copy of `model` with each fixable layer replaced by Opacus's fixer's output.

    Opacus's ``ModuleValidator.fix`` only visits layers with trainable parameters; this
    applies the same fixers to the layers found here (a BatchNorm without affine weights
    becomes a GroupNorm without them).
    """
    targets = {id(p.module) for p in problems if _fixable(p)}
    copy = clone_module(model)
    original = dict(model.named_modules())
    for name, module in list(copy.named_modules()):
        if id(original.get(name)) not in targets:
            continue
        replacement = ModuleValidator.FIXERS[type(module)](module)
        tensors = [*module.parameters(), *module.buffers()]
        if tensors:  # Opacus's fix does the same: the new layer lives where the old one did
            replacement.to(tensors[0].device)
        if not name:
            return replacement
        parent_name, _, child = name.rpartition(".")
        copy.get_submodule(parent_name)._modules[child] = replacement
    return copy


def make_dp_compatible(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """(model, changes made), or DPModelError naming every layer that cannot be fixed.

    When layers must be replaced the returned model is a fixed *copy* (new parameters);
    in-place activations are merely switched off (no parameter changes).
    """
    problems = model_problems(model)
    if not problems:
        return model, []
    fixed = model
    if any(_fixable(p) for p in problems):
        fixed = _replace_layers(model, problems)
    for module in fixed.modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False  # type: ignore[assignment]
    remaining = dp_problems(fixed)
    if remaining:
        raise DPModelError(
            "model cannot be trained with DP-SGD (even after the standard fixes): "
            + "; ".join(remaining)
        )
    changes = [str(p) for p in problems]
    log.warning(
        "model changed for DP-SGD (build the optimizer from the returned model): %s",
        "; ".join(changes),
    )
    return fixed, changes
