"""Make a model fit for DP-SGD, saying what had to change.

Why: per-example clipping is meaningless for layers that mix examples (BatchNorm), and
in-place activations overwrite the layer outputs our book-keeping clipper differentiates
against. Opacus's ModuleValidator finds and fixes the former (BatchNorm -> GroupNorm);
the fixed model is a *new* module with different parameters, so optimizers must be built
after fixing, and server and clients must build the same (fixed) architecture.
"""

from __future__ import annotations

import logging

from opacus.validators import ModuleValidator
from torch import nn

log = logging.getLogger(__name__)


class DPModelError(ValueError):
    """A model that cannot be trained with DP-SGD (even after Opacus's fixes)."""


def dp_problems(model: nn.Module) -> list[str]:
    """Human-readable reasons a model is not DP-compatible (empty when it is)."""
    problems = [str(err) for err in ModuleValidator.validate(model, strict=False)]
    problems += [
        f"{name or '<root>'}: {type(m).__name__}(inplace=True)"
        for name, m in model.named_modules()
        if getattr(m, "inplace", False) is True
    ]
    return problems


def make_dp_compatible(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """(model, changes made).

    When Opacus must replace layers the returned model is a fixed *copy* (new parameters);
    in-place activations are merely switched off (no parameter changes).
    """
    problems = dp_problems(model)
    if not problems:
        return model, []
    fixed = ModuleValidator.fix(model) if ModuleValidator.validate(model, strict=False) else model
    for module in fixed.modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False  # type: ignore[assignment]
    remaining = [str(err) for err in ModuleValidator.validate(fixed, strict=False)]
    if remaining:
        raise DPModelError(
            "model cannot be trained with DP-SGD even after Opacus's fixes: "
            + "; ".join(remaining)
        )
    log.warning(
        "model changed for DP-SGD (build the optimizer from the returned model): %s",
        "; ".join(problems),
    )
    return fixed, problems
