"""The public entry point of local DP-SGD: one `LocalDP` per client per round.

Opacus-style usage (what `DPTrainer` does for the ClientApp)::

    dp = LocalDP(settings, num_examples=n, batch_size=B, local_epochs=E,
                 planned_rounds=R, state=previous_state, node_max_epsilon=None)
    decision = dp.check_budget()          # BEFORE training: would this round overshoot?
    if not decision.allowed: decline(decision.reason)
    private = dp.make_private(model, lambda params: SGD(params, lr), dataset)
    for _ in range(E): private.train_epoch()
    metrics = dp.end_round(private, server_round)   # {"epsilon": ..., "delta": ...}
    save(dp.state)                                   # PrivacyState -> context.state

Why a session object instead of Opacus's long-lived PrivacyEngine: a client process may
not survive between rounds (deployment), so the accountant is rebuilt from the stored
`PrivacyState` each round and written back after it; σ and δ are fixed at the first round
and kept in that state. Training can never take more steps than the budget check assumed
(`PrivateRound` refuses), and `make_private` repeats the budget check itself, so a caller
cannot train a round that does not fit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import replace

import torch
from opacus.accountants import IAccountant
from torch import Tensor, nn
from torch.utils.data import Dataset

from fedstack.log import get_logger
from fedstack.privacy.accountant_state import PrivacyState, PrivacyStateError
from fedstack.privacy.bookkeeping import BookKeepingClipper, unsupported_layers
from fedstack.privacy.budget import BudgetDecision, check_round, effective_budget
from fedstack.privacy.calibration import (
    SamplingPlan,
    default_delta,
    derive_noise_multiplier,
    sampling_plan,
)
from fedstack.privacy.model_check import DPModelError, dp_problems, make_dp_compatible
from fedstack.privacy.poisson import PoissonBatches, secret_generator
from fedstack.privacy.schedule import PublicSchedule
from fedstack.privacy.secure_random import AesCtrRandom, RandomSource, TorchRandom
from fedstack.privacy.settings import GRAD_SAMPLE_MODES, LocalDPSettings

log = get_logger(__name__)

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


def public_plan(num_examples: int, batch_size: int, schedule: PublicSchedule) -> SamplingPlan:
    """Poisson sampling of one client's data at the run's public rate and steps."""
    if num_examples < 1:
        raise ValueError(f"a client needs at least one training example, got {num_examples}")
    return SamplingPlan(num_examples, batch_size, schedule.steps_per_epoch,
                        schedule.sample_rate)


class DPSetupError(ValueError):
    """DP cannot be set up for this client (e.g. δ not below 1/n_k); it should decline."""


class BudgetExhaustedError(RuntimeError):
    """Raised by `make_private` when the round would exceed the budget."""

    def __init__(self, decision: BudgetDecision) -> None:
        super().__init__(decision.reason)
        self.decision = decision


def check_dp_model(model: nn.Module, grad_sample_mode: str) -> None:
    """Raise DPModelError naming every layer that keeps `model` from DP-SGD as built.

    For a start-up check (the ServerApp, before any client works): every problem counts,
    fixable ones included, because the ClientApp trains the server's architecture as it is
    (`allow_model_fix=False`). Covers, for every mode, what `model_check` refuses (tied
    weights, layers mixing examples or keeping running statistics, in-place activations,
    Opacus's validator) and, for `bk`, layers it has no per-sample formula for.
    """
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ValueError(f"unknown grad_sample_mode {grad_sample_mode!r}")
    problems = dp_problems(model)
    if grad_sample_mode == "bk":
        problems += [f"{layer}: no per-sample formula in grad_sample_mode=bk (use an Opacus "
                     "mode, e.g. dp.grad_sample_mode=hooks)" for layer in unsupported_layers(model)]
    if problems:
        raise DPModelError(
            f"the model cannot be trained with DP-SGD (dp.grad_sample_mode={grad_sample_mode}) "
            "as built: " + "; ".join(problems)
        )


class LocalDP:
    """DP-SGD parameters, accountant state and budget of one client for one round."""

    def __init__(
        self,
        settings: LocalDPSettings,
        *,
        num_examples: int,
        batch_size: int,
        local_epochs: int,
        planned_rounds: int,
        state: PrivacyState | None = None,
        node_max_epsilon: float | None = None,
        generator: torch.Generator | None = None,
        schedule: PublicSchedule | None = None,
    ) -> None:
        if local_epochs < 1 or planned_rounds < 1:
            raise ValueError("local_epochs and planned_rounds must be >= 1")
        if settings.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ValueError(f"unknown grad_sample_mode {settings.grad_sample_mode!r}")
        self.settings = settings
        #: The run's public schedule (secagg/he): q, steps, δ and σ independent of n_k.
        self.schedule = schedule
        self.plan: SamplingPlan = (
            sampling_plan(num_examples, batch_size) if schedule is None
            else public_plan(num_examples, batch_size, schedule)
        )
        self.local_epochs = int(local_epochs)
        self.planned_rounds = int(planned_rounds)
        self.steps_per_round = self.local_epochs * self.plan.steps_per_epoch
        self.max_epsilon = effective_budget(settings.run_budget(), node_max_epsilon)
        # Secret by default: the server knows the run seed, so it must not drive noise.
        # An explicit generator (tests: reproducible draws) wins over dp.secure_rng.
        self.generator = generator if generator is not None else secret_generator()
        self.random: RandomSource = (
            AesCtrRandom() if settings.secure_rng and generator is None
            else TorchRandom(self.generator)
        )

        state = state if state is not None else PrivacyState(mechanism=settings.accountant)
        if state.mechanism != settings.accountant:
            raise PrivacyStateError(
                f"stored privacy state uses the {state.mechanism!r} accountant but "
                f"dp.accountant={settings.accountant!r}; an accountant cannot be switched "
                "mid-run without losing the history"
            )
        self.delta = state.delta if state.delta is not None else self._initial_delta()
        self.noise_multiplier = (
            state.noise_multiplier
            if state.noise_multiplier is not None
            else self._initial_noise_multiplier()
        )
        self.state = replace(state, delta=self.delta, noise_multiplier=self.noise_multiplier)

    def _initial_delta(self) -> float:
        n = self.plan.num_examples
        if self.schedule is not None:
            delta = self.schedule.delta
        else:
            delta = self.settings.delta if self.settings.delta is not None else default_delta(n)
        if delta >= 1.0 / n:
            raise DPSetupError(
                f"dp.delta={delta:g} is not below 1/n_k={1.0 / n:g} for a client with {n} "
                "examples: such a delta allows publishing a record outright; lower dp.delta "
                "or leave it null"
            )
        return float(delta)

    def _initial_noise_multiplier(self) -> float:
        if self.schedule is not None:
            return self.schedule.noise_multiplier()
        if self.settings.noise_multiplier is not None:
            return float(self.settings.noise_multiplier)
        assert self.settings.target_epsilon is not None  # validated: exactly one is set
        return derive_noise_multiplier(
            target_epsilon=float(self.settings.target_epsilon),
            delta=self.delta,
            sample_rate=self.plan.sample_rate,
            total_steps=self.planned_rounds * self.steps_per_round,
            accountant=self.settings.accountant,
        )

    # -- budget ------------------------------------------------------------------------
    def epsilon(self) -> float:
        """ε spent so far by this client (all rounds, all processes)."""
        return self.state.epsilon(self.delta)

    def check_budget(self) -> BudgetDecision:
        """Would one more round (all its steps) stay within the budget?"""
        return check_round(
            self.state,
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.plan.sample_rate,
            steps=self.steps_per_round,
            delta=self.delta,
            max_epsilon=self.max_epsilon,
        )

    # -- training ----------------------------------------------------------------------
    def make_private(
        self,
        model: nn.Module,
        optimizer_factory: OptimizerFactory,
        dataset: Dataset,
        *,
        allow_model_fix: bool = True,
        per_example_loss: PerExampleLoss | None = None,
    ) -> PrivateRound:
        """Wrap model, optimizer and data for one round of DP-SGD.

        The model is checked (and, if `allow_model_fix`, fixed: BatchNorm -> GroupNorm) and
        the optimizer is built *after* fixing from the returned model's parameters. Raises
        BudgetExhaustedError if the round does not fit the budget, DPModelError (naming the
        layers) if the model cannot be trained privately in this mode.
        """
        decision = self.check_budget()
        if not decision.allowed:
            raise BudgetExhaustedError(decision)
        if len(dataset) != self.plan.num_examples:  # type: ignore[arg-type]
            raise ValueError(
                f"dataset has {len(dataset)} examples but the sampling plan was made for "  # type: ignore[arg-type]
                f"{self.plan.num_examples}"
            )
        model, changes = make_dp_compatible(model)
        if changes and not allow_model_fix:
            raise DPModelError(
                "model is not DP-compatible as built: " + "; ".join(changes)
                + ". Build it DP-compatible on every party (fedstack.privacy.model_check."
                "make_dp_compatible) so that server and clients share one architecture."
            )
        check_dp_model(model, self.settings.grad_sample_mode)
        optimizer = optimizer_factory(model.parameters())
        batches = PoissonBatches(
            dataset, self.plan.sample_rate, self.plan.steps_per_epoch, self.random
        )
        return PrivateRound(
            model=model,
            optimizer=optimizer,
            batches=batches,
            accountant=self.state.accountant(),
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=float(self.settings.max_grad_norm),
            mode=self.settings.grad_sample_mode,
            max_steps=self.steps_per_round,
            generator=self.generator,
            per_example_loss=per_example_loss,
        )

    def end_round(self, private: PrivateRound, server_round: int) -> dict[str, float]:
        """Take the round's steps into the state; the reply metrics (ε so far, δ)."""
        private.close()
        state = self.state.with_accountant(private.accountant)
        epsilon = state.epsilon(self.delta)
        self.state = state.with_round(server_round, epsilon)
        metrics = {"epsilon": epsilon, "delta": self.delta}
        if self.max_epsilon is not None:
            metrics["epsilon-budget"] = self.max_epsilon
        return metrics


#: A task's loss: (outputs, targets) -> one loss per example, shape (B,).
PerExampleLoss = Callable[[Tensor, Tensor], Tensor]


class MeanLoss(nn.Module):
    """A per-example loss as a torch loss module (mean over the batch).

    Why a module with `reduction`: Opacus's ghost clipping switches its criterion to
    `reduction="none"` to get the per-example losses it clips; the other modes take the mean.
    """

    def __init__(self, per_example: PerExampleLoss) -> None:
        super().__init__()
        self.per_example = per_example
        self.reduction = "mean"

    def forward(self, outputs: Tensor, targets: Tensor) -> Tensor:
        losses = self.per_example(outputs, targets)
        return losses if self.reduction == "none" else losses.mean()


class PrivateRound:
    """A model, optimizer and Poisson batches made private for one round.

    `train_epoch` runs one pass of DP-SGD steps; the accountant advances by one step per
    optimizer step (also for empty Poisson batches: the noisy update is still released).
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        batches: PoissonBatches,
        accountant: IAccountant,
        noise_multiplier: float,
        max_grad_norm: float,
        mode: str,
        max_steps: int,
        generator: torch.Generator,
        per_example_loss: PerExampleLoss | None = None,
    ) -> None:
        self.model = model
        self.batches = batches
        self.accountant = accountant
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)
        self.mode = mode
        self.max_steps = int(max_steps)
        self.steps_taken = 0
        self.sample_rate = batches.sample_rate
        self.generator = generator
        # bk draws its noise from the batches' source (AES-CTR with dp.secure_rng), so
        # sampling and noise always share one; Opacus's modes only take a torch generator.
        self.random = batches.random
        self._closed = False
        n = len(batches.dataset)
        # Opacus divides the noisy sum by int(n * q); we match it so modes are exchangeable.
        self.expected_batch_size = max(1, int(n * batches.sample_rate))
        if mode == "bk":
            self.optimizer = optimizer
            self._clipper: BookKeepingClipper | None = BookKeepingClipper(model, max_grad_norm)
            self._criterion: Callable[[Tensor, Tensor], Tensor] = (
                per_example_loss if per_example_loss is not None
                else nn.CrossEntropyLoss(reduction="none")
            )
            self._wrapped: nn.Module = model
            self._params = [p for p in model.parameters() if p.requires_grad]
            numel = sum(p.numel() for p in self._params)
            dtype = self._params[0].dtype if self._params else torch.float32
            # One flat buffer holds every parameter's gradient: each step refills it with
            # noise in place and the clipper adds the clipped sum into the same views.
            self._grad_buffer = torch.zeros(numel, dtype=dtype)
            self._grad_views: list[Tensor] = []
            offset = 0
            for p in self._params:
                self._grad_views.append(self._grad_buffer[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
        else:
            self._clipper = None
            self._wrapped, self.optimizer, self._criterion = _opacus_private(
                model, optimizer, batches, accountant, self.noise_multiplier,
                self.max_grad_norm, mode, generator,
                nn.CrossEntropyLoss() if per_example_loss is None
                else MeanLoss(per_example_loss),
            )

    def train_epoch(self) -> tuple[float, int]:
        """One epoch (len(batches) steps). Returns (sum of example losses, examples seen)."""
        if self._closed:
            raise RuntimeError("this PrivateRound is closed")
        if self.steps_taken + len(self.batches) > self.max_steps:
            raise RuntimeError(
                f"training beyond the {self.max_steps} steps the budget check allowed for "
                "this round would spend unaccounted privacy"
            )
        self.model.train()
        loss_sum, seen = 0.0, 0
        for xb, yb in self.batches:
            loss_sum += self._step(xb, yb)
            seen += len(yb)
            self.steps_taken += 1
        return loss_sum, seen

    def _step(self, xb: Tensor, yb: Tensor) -> float:
        if self._clipper is not None:
            return self._bk_step(xb, yb)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._criterion(self._wrapped(xb), yb)
        loss.backward()
        self.optimizer.step()  # Opacus: clip, noise, scale, accountant hook, step
        value = float(loss.detach()) if len(yb) else 0.0
        return value * len(yb)

    def _bk_step(self, xb: Tensor, yb: Tensor) -> float:
        clipper = self._clipper
        assert clipper is not None
        # Noise first, drawn in place into the flat gradient buffer (already scaled by
        # 1/expected batch size); the clipper then adds the clipped sum, scaled the same
        # way, into the same views. No per-step allocation and no pass to divide.
        scale = 1.0 / self.expected_batch_size
        std = self.noise_multiplier * self.max_grad_norm * scale
        if std > 0:
            self.random.normal_(self._grad_buffer, std)
        else:
            self._grad_buffer.zero_()
        for p, view in zip(self._params, self._grad_views, strict=True):
            if p.grad is not view:  # set once; re-set if anyone replaced or cleared it
                p.grad = view
        loss_sum = 0.0
        if len(yb):
            with clipper.recording():
                out = self.model(xb)
            losses = self._criterion(out, yb)
            clipper.clipped_backward(losses, scale=scale)
            loss_sum = float(losses.detach().sum())
        self.optimizer.step()
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        return loss_sum

    def close(self) -> None:
        """Remove clipping hooks so the model behaves as a plain module again."""
        if self._closed:
            return
        self._closed = True
        if self._clipper is not None:
            self._clipper.remove()
        else:
            for name in ("_close", "remove_hooks"):
                fn = getattr(self._wrapped, name, None)
                if callable(fn):
                    fn()
                    break


def _opacus_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: PoissonBatches,
    accountant: IAccountant,
    noise_multiplier: float,
    max_grad_norm: float,
    mode: str,
    generator: torch.Generator,
    criterion: nn.Module,
) -> tuple[nn.Module, torch.optim.Optimizer, Callable[[Tensor, Tensor], Tensor]]:
    """Opacus's make_private with our accountant and our (already Poisson) batches.

    ``poisson_sampling=False`` only tells Opacus not to re-sample: the batches are Poisson
    already, and Opacus derives q = 1/len(batches), the same rate our plan uses. For ghost
    clipping the *returned* criterion must be used (the original one trains unclipped).
    """
    from opacus import PrivacyEngine

    engine = PrivacyEngine(accountant=accountant.mechanism())
    engine.accountant = accountant
    result = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=batches,  # type: ignore[arg-type]
        criterion=criterion,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        poisson_sampling=False,
        noise_generator=generator,
        grad_sample_mode=mode,
    )
    if mode == "ghost":
        wrapped, dp_optimizer, criterion, loader = result  # type: ignore[misc]
    else:
        wrapped, dp_optimizer, loader = result  # type: ignore[misc]
    if loader is not batches or not math.isclose(1.0 / len(loader), batches.sample_rate):
        raise RuntimeError("Opacus replaced the Poisson batches; accounting would not match")
    return wrapped, dp_optimizer, criterion
