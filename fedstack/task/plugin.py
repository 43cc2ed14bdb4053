"""Resolving a run's task, built-in or plug-in, into one `Task` (fedstack.task.contract).

Where a plug-in module is found, under both ways in:
- `flwr run .` / deployment: Flower installs the app (your project directory, shipped as a
  FAB: its `*.py`, `*.toml`, `*.yaml` files) and puts the app's directory first on
  `sys.path` in the ServerApp and ClientApp processes (Ray actors inherit it), so
  `task.module=my_project.task` imports from there.
- `fedstack run` (Hydra, in-process): the project directory is the current directory, which
  a console script does not have on `sys.path`; it is appended as a fallback here, before
  the simulation starts, and Flower hands the driver's `sys.path` to its Ray workers.
- `task.path=DIR` puts DIR first on `sys.path` in every process (for a package that lives
  elsewhere; relative to the process's current directory, so prefer an absolute path).
A module installed in the environment (`pip install -e .` of your project) imports
everywhere with no path at all.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from fedstack.config import ConfigError
from fedstack.task.contract import (
    Partition,
    TaskContext,
    as_dataset,
    empty_like,
    per_example_cross_entropy,
)

#: Module of the built-in tasks (they use the same contract).
BUILTIN_MODULE = "fedstack.task.builtin"
#: `task=` value of a plug-in task.
CUSTOM_TASK = "custom"
#: Contract function -> the config key naming it by a dotted path.
ROLE_KEYS: dict[str, str] = {
    "build_model": "model_fn",
    "load_partition": "partition_fn",
    "load_test": "test_fn",
    "loss": "loss_fn",
}
#: Contract functions a task must have.
REQUIRED_ROLES = ("build_model", "load_partition")
#: Optional contract function without a config key of its own.
LABEL_NAMES_ROLE = "label_names"


class TaskError(ConfigError):
    """A task that cannot be imported or whose function failed; names the key and function."""


@dataclass(frozen=True)
class Task:
    """A run's task: the contract's functions, with fedstack's checks around each call."""

    #: How the config names it, for messages: "task=digits" or "task.module=my_project.task".
    source: str
    builtin: bool
    model_fn: Callable[[TaskContext], nn.Module]
    partition_fn: Callable[[TaskContext, int], Any]
    test_fn: Callable[[TaskContext], Any] | None = None
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    label_names_fn: Callable[[TaskContext], Any] | None = None

    def build_model(self, ctx: TaskContext) -> nn.Module:
        """The task's model, with torch seeded by the run's seed (same weights everywhere)."""
        state = torch.random.get_rng_state()
        try:
            torch.manual_seed(ctx.seed)
            model = self._call("build_model", self.model_fn, ctx)
        finally:
            torch.random.set_rng_state(state)
        if not isinstance(model, nn.Module):
            raise TaskError(
                f"{self.source}: build_model(ctx) returned "
                f"{type(model).__name__}, not a torch.nn.Module"
            )
        return model

    def load_partition(self, ctx: TaskContext, partition_id: int) -> Partition:
        """Partition `partition_id` as Datasets (train; val, possibly empty)."""
        result = self._call("load_partition", self.partition_fn, ctx, partition_id)
        what = f"{self.source}: load_partition(ctx, {partition_id})"
        if isinstance(result, Partition):
            train, val = result.train, result.val
        elif isinstance(result, tuple | list) and len(result) == 2:
            train, val = result
        else:
            raise TaskError(
                f"{what} returned {type(result).__name__}: return "
                "Partition(train, val) or a pair (train, val)"
            )
        try:
            train_set = as_dataset(train, f"{what} train")
            val_set = as_dataset(val, f"{what} val") if val is not None else empty_like(train_set)
        except (TypeError, ValueError) as exc:
            raise TaskError(str(exc)) from None
        return Partition(train=train_set, val=val_set)

    def load_test(self, ctx: TaskContext) -> Dataset | None:
        """The server's central test split, or None (no central evaluation)."""
        if self.test_fn is None:
            return None
        result = self._call("load_test", self.test_fn, ctx)
        if result is None:
            return None
        try:
            return as_dataset(result, f"{self.source}: load_test(ctx)")
        except (TypeError, ValueError) as exc:
            raise TaskError(str(exc)) from None

    def label_names(self, ctx: TaskContext) -> tuple[str, ...] | None:
        if self.label_names_fn is None:
            return None
        names = self._call(LABEL_NAMES_ROLE, self.label_names_fn, ctx)
        return None if names is None else tuple(str(n) for n in names)

    @property
    def has_custom_loss(self) -> bool:
        return self.loss_fn is not None

    def per_example_loss(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Loss per example, shape (B,): the task's `loss`, else cross-entropy."""
        fn = self.loss_fn
        if fn is None:
            return per_example_cross_entropy
        source = self.source

        def checked(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            losses = fn(outputs, targets)
            if not isinstance(losses, torch.Tensor) or losses.shape != (len(outputs),):
                shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else losses
                raise TaskError(
                    f"{source}: loss(outputs, targets) must return one loss per "
                    f"example, shape ({len(outputs)},); got {shape}"
                )
            return losses

        return checked

    def train_loss(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Mean loss of a batch, for plain training (nn.CrossEntropyLoss by default)."""
        if self.loss_fn is None:
            return nn.CrossEntropyLoss()
        per_example = self.per_example_loss()
        return lambda outputs, targets: per_example(outputs, targets).mean()

    def _call(self, role: str, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except ConfigError:
            raise
        except Exception as exc:
            raise TaskError(f"{self.source}: {role}() failed: {type(exc).__name__}: {exc}") from exc


# --------------------------------------------------------------------------- resolution


def task_context(
    cfg: Any, node_config: Mapping[str, Any] | None = None, num_partitions: int | None = None
) -> TaskContext:
    """The TaskContext of a run config (the server's: no node config)."""
    return TaskContext(
        settings=cfg.task,
        seed=int(cfg.seed),
        num_partitions=int(cfg.num_clients if num_partitions is None else num_partitions),
        partition=cfg.partition,
        node_config=dict(node_config or {}),
    )


_TASKS: dict[tuple[Any, ...], Task] = {}


def load_task(settings: Any) -> Task:
    """The Task the `task` config node names (cached per process)."""
    name = str(settings.name)
    if name != CUSTOM_TASK:
        key: tuple[Any, ...] = ("builtin", name)
    else:
        key = (
            "custom",
            settings.get("module"),
            settings.get("path"),
            *(settings.get(k) for k in ROLE_KEYS.values()),
        )
    task = _TASKS.get(key)
    if task is None:
        task = _TASKS[key] = _resolve(settings, name)
    return task


def _resolve(settings: Any, name: str) -> Task:
    if name != CUSTOM_TASK:
        module = importlib.import_module(BUILTIN_MODULE)
        return Task(
            source=f"task={name}",
            builtin=True,
            model_fn=module.build_model,
            partition_fn=module.load_partition,
            test_fn=module.load_test,
            label_names_fn=module.label_names,
        )
    path = settings.get("path")
    if path:
        _put_first_on_path(path)
    module_name = settings.get("module")
    source = f"task.module={module_name}" if module_name else "task=custom"
    module = _import(str(module_name), "task.module") if module_name else None
    functions: dict[str, Callable[..., Any] | None] = {}
    for role, key in ROLE_KEYS.items():
        dotted = settings.get(key)
        if dotted:
            functions[role] = _load_object(str(dotted), f"task.{key}")
        else:
            functions[role] = _function_of(module, role, module_name)
    missing = [role for role in REQUIRED_ROLES if functions[role] is None]
    if missing:
        where = f"task.module={module_name!r} has no" if module_name else "task=custom needs"
        raise TaskError(
            f"{where} {' and '.join(missing)} (set "
            f"{', '.join('task.' + ROLE_KEYS[r] for r in missing)} or define "
            f"them in task.module; the contract: docs/tasks.md)"
        )
    return Task(
        source=source,
        builtin=False,
        model_fn=functions["build_model"],  # type: ignore[arg-type]
        partition_fn=functions["load_partition"],  # type: ignore[arg-type]
        test_fn=functions["load_test"],
        loss_fn=functions["loss"],
        label_names_fn=_function_of(module, LABEL_NAMES_ROLE, module_name),
    )


def _function_of(
    module: ModuleType | None, role: str, module_name: str | None
) -> Callable[..., Any] | None:
    fn = getattr(module, role, None) if module is not None else None
    if fn is not None and not callable(fn):
        raise TaskError(
            f"task.module={module_name}: {role} is a {type(fn).__name__}, not a function"
        )
    return fn


def _load_object(dotted: str, key: str) -> Callable[..., Any]:
    """`pkg.module:function` (or `pkg.module.function`) -> the function."""
    module_name, sep, attribute = dotted.partition(":")
    if not sep:
        module_name, _, attribute = dotted.rpartition(".")
    if not module_name or not attribute:
        raise TaskError(f"{key}={dotted!r}: use 'package.module:function'")
    obj: Any = _import(module_name, key)
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise TaskError(f"{key}={dotted!r}: {module_name} has no attribute {attribute!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TaskError(f"{key}={dotted!r} is a {type(obj).__name__}, not a function")
    return obj


def _missing_itself(exc: ModuleNotFoundError, name: str) -> bool:
    """Whether the import failed because `name` (or a parent package) is not found, as
    opposed to a module it imports (a missing dependency of the user's code)."""
    missing = exc.name or ""
    return bool(missing) and (name == missing or name.startswith(missing + "."))


def _try_import(name: str, key: str) -> ModuleType | None:
    """The module, or None if `name` itself is not found (a module it imports that is
    missing is an error of its own, named as such)."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if not _missing_itself(exc, name):
            raise TaskError(
                f"{key}={name!r}: importing it failed, a module it imports is "
                f"missing ({exc}); install it in this environment"
            ) from exc
    return None


def _import(name: str, key: str) -> ModuleType:
    """Import `name`; if it is not on sys.path, try the current directory (fedstack run)."""
    module = _try_import(name, key)
    if module is not None:
        return module
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.append(cwd)
        importlib.invalidate_caches()
        module = _try_import(name, key)
        if module is not None:
            return module
    raise TaskError(
        f"{key}={name!r}: no such module on this node's Python path or in the "
        f"current directory {cwd}. Run from your project directory (`fedstack "
        "run` / `flwr run .`), set task.path to the directory that holds the "
        "package, or install your project (`pip install -e .`)"
    ) from None


def _put_first_on_path(path: Any) -> None:
    directory = str(Path(os.path.expanduser(str(path))).resolve())
    if not Path(directory).is_dir():
        raise TaskError(f"task.path={str(path)!r}: {directory} is not a directory on this node")
    if directory in sys.path:
        sys.path.remove(directory)
    sys.path.insert(0, directory)
    importlib.invalidate_caches()
