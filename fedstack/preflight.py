"""Start-up checks: everything a run can check before any client works or any file is written.

Why a separate pass: the runtime takes 20 s or more to boot, and a problem found by the
clients shows up as a failure in every client in every round. The server can check the same
things in well under a second: the output directory (or the run to resume), the key files,
the task's data, and the partition every client will get, computed by the very code the
clients run (the task's `load_partition`) with the run's seed. Each failed check
raises `ConfigError` naming the key to change; nothing is created, so a failed start leaves no
run directory behind.

`check_run(cfg)` returns a `PreflightReport` (per-client train/validation sizes, the label
mapping, what was checked) for the log and the run directory.
"""

from __future__ import annotations

import json
import os
import re
import struct
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf.errors import OmegaConfBaseException

from fedstack.config import ConfigError, config_from_yaml, settings_of
from fedstack.outputs.run_directory import (
    CONFIG_FILE,
    RUN_NAME_PATTERN,
    latest_checkpoint,
    output_base,
)

#: File the report is written to in the run directory (`PreflightReport.write`).
REPORT_FILE = "preflight.json"
#: A client needs this many local training examples to take part in a round.
MIN_TRAIN_EXAMPLES = 1
#: With `task.client_val_fraction > 0`, a client needs this many validation examples, or
#: its evaluation reply (0 examples) is rejected every round.
MIN_VAL_EXAMPLES = 1
#: Names `fedstack.outputs.run_directory.new_run_dir` accepts for `run_name`.
#: Prefix of the directory created (and removed at once) to prove `output_dir` is writable.
PROBE_PREFIX = ".fedstack-preflight-"


@dataclass(frozen=True)
class ClientSizes:
    """What one client will hold: local training and validation examples."""

    partition_id: int
    train: int
    val: int


@dataclass(frozen=True)
class PreflightReport:
    """What the start-up checks found (JSON-ready through `to_dict`)."""

    task: str
    train_pool: int
    test_size: int
    num_classes: int
    input_shape: tuple[int, ...]
    #: {original label: class index}; None when the labels are plain integers.
    label_mapping: dict[str, int] | None
    clients: tuple[ClientSizes, ...]
    #: Largest n_k the run accepts, and the key that sets it.
    max_weight: int
    max_weight_key: str
    #: Where the run directory will be created, or the run directory being resumed.
    output: str
    #: Fingerprint of the CKKS public context the server will use (None: not HE, or keys
    #: to be generated for a simulated run).
    he_fingerprint: str | None
    checks: tuple[str, ...]
    seconds: float
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["input_shape"] = list(self.input_shape)
        out["clients"] = [asdict(c) for c in self.clients]
        out["checks"] = list(self.checks)
        out["notes"] = list(self.notes)
        return out

    def write(self, run_dir: str | os.PathLike[str]) -> Path:
        path = Path(run_dir) / REPORT_FILE
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    def summary(self) -> str:
        """One log line: the data and every client's sizes."""
        train = [c.train for c in self.clients]
        val = [c.val for c in self.clients]
        return (f"preflight ok ({self.seconds:.2f} s): task={self.task} {self.train_pool} "
                f"train / {self.test_size} test, {self.num_classes} classes; "
                f"{len(self.clients)} clients, train {train}, validation {val}")


def check_run(cfg: Any, *, deployment: bool | None = None) -> PreflightReport:
    """Check a validated run config before the run starts; ConfigError names what to fix.

    `deployment`: True when the server talks to real SuperNodes, False in simulation (then
    the clients share this machine's files), None when unknown (checks that depend on it
    are skipped).
    """
    started = time.perf_counter()
    checks: list[str] = []
    notes: list[str] = []
    if cfg.resume:
        output = check_resume(str(cfg.resume))
        checks.append(f"resume: {output} has {CONFIG_FILE} and is writable")
    else:
        output = check_output_dir(str(cfg.output_dir), cfg.run_name)
        checks.append(f"output_dir: {output} is writable")
    fingerprint = check_he_keys(
        cfg,
        deployment=deployment,
        run_dir=output if cfg.resume else None,
        checks=checks,
        notes=notes,
    )
    task, ctx = load_checked_task(cfg)
    partitions = load_partitions(cfg, task, ctx, deployment=deployment)
    survey = survey_task(task, ctx, partitions)
    sizes = [
        ClientSizes(pid, len(p.train), len(p.val))  # type: ignore[arg-type]
        for pid, p in enumerate(partitions or ())
    ]
    if partitions is None:
        notes.append(
            f"{task.source}: in deployment each SuperNode loads its own partition "
            "(load_partition with its node config); partition sizes are checked "
            "by the clients, not at start-up"
        )
    checks.append(
        f"{task.source}: data loads ({sum(c.train + c.val for c in sizes)} train, "
        f"{survey.test_size} test, {survey.num_classes} classes)"
    )
    if survey.forward_checked:
        checks.append(
            f"{task.source}: the model takes the loader's examples "
            f"{survey.input_shape} and the loss takes its outputs"
        )
    clients = check_partitions(cfg, sizes) if partitions is not None else []
    max_weight, weight_key = weight_limit(cfg)
    if partitions is not None:
        checks.append(
            f"partition={cfg.partition.name}: every one of num_clients="
            f"{cfg.num_clients} clients has >= {MIN_TRAIN_EXAMPLES} train example(s)"
            + (
                f" and >= {MIN_VAL_EXAMPLES} validation example(s)"
                if float(cfg.task.client_val_fraction) > 0
                else ""
            )
            + f", at most {weight_key}={max_weight}"
        )
    if cfg.dp.name == "local":
        check_dp_model_of_task(cfg, task, survey.model)
        checks.append(
            f"dp=local: {_model_name(cfg, task)} can be clipped per example "
            f"(dp.grad_sample_mode={cfg.dp.grad_sample_mode})"
        )
    return PreflightReport(
        task=str(cfg.task.name),
        train_pool=sum(c.train + c.val for c in clients),
        test_size=survey.test_size,
        num_classes=survey.num_classes,
        input_shape=survey.input_shape,
        label_mapping=survey.label_mapping,
        clients=tuple(clients),
        max_weight=max_weight,
        max_weight_key=weight_key,
        output=str(output),
        he_fingerprint=fingerprint,
        checks=tuple(checks),
        seconds=time.perf_counter() - started,
        notes=tuple(notes),
    )


# --------------------------------------------------------------------------- output, resume


def _probe_writable(directory: Path) -> None:
    """Create and remove a directory in `directory` (what creating the run dir will do)."""
    os.rmdir(tempfile.mkdtemp(prefix=PROBE_PREFIX, dir=directory))


def check_output_dir(output_dir: str, run_name: str | None = None) -> Path:
    """The base directory runs go to; ConfigError unless a run directory can be made there.

    Nothing is left behind: a missing base is not created, its nearest existing ancestor is
    probed instead (the run creates the rest).
    """
    if run_name is not None and not re.fullmatch(RUN_NAME_PATTERN, str(run_name)):
        raise ConfigError(f"run_name={run_name!r}: use letters, digits and . _ = , + - only")
    base = output_base(output_dir)
    existing = base
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"output_dir={output_dir!r}: {existing} is a file, not a directory "
                          f"(runs would go to {base})")
    try:
        _probe_writable(existing)
    except OSError as exc:
        raise ConfigError(f"output_dir={output_dir!r}: cannot create directories in {existing} "
                          f"({exc.strerror or exc}); runs would go to {base}") from None
    return base


def check_resume(resume: str) -> Path:
    """The run directory to resume: it exists, holds a valid config.yaml, and is writable."""
    run_dir = output_base(resume)
    if not run_dir.is_dir():
        raise ConfigError(f"resume={resume!r}: {run_dir} is not a directory")
    saved = run_dir / CONFIG_FILE
    if not saved.is_file():
        raise ConfigError(f"resume={resume!r}: no {CONFIG_FILE} in {run_dir} (not a run dir)")
    try:
        config_from_yaml(saved.read_text())
    except (OSError, ValueError, yaml.YAMLError, OmegaConfBaseException) as exc:
        raise ConfigError(f"resume={resume!r}: its {CONFIG_FILE} cannot be used ({exc})") from None
    try:
        _probe_writable(run_dir)
    except OSError as exc:
        raise ConfigError(f"resume={resume!r}: {run_dir} is not writable "
                          f"({exc.strerror or exc})") from None
    return run_dir


# --------------------------------------------------------------------------- HE keys


def read_context_header(path: Path) -> dict[str, Any]:
    """The JSON header of a fedstack CKKS context file, reading nothing past it.

    Why only the header: the server checks a secret context's kind, preset and fingerprint
    without ever reading the secret key into memory.
    """
    from fedstack.strategies.he.keys import CONTEXT_FORMAT, CONTEXT_MAGIC, HEKeyError

    with open(path, "rb") as fh:
        head = fh.read(len(CONTEXT_MAGIC) + 4)
        if len(head) < len(CONTEXT_MAGIC) + 4 or not head.startswith(CONTEXT_MAGIC):
            raise HEKeyError(f"{path} is not a fedstack CKKS context file (bad magic); create "
                             "one with `fedstack keys --out DIR`")
        (length,) = struct.unpack("<I", head[len(CONTEXT_MAGIC):])
        try:
            header = json.loads(fh.read(length))
        except ValueError as exc:
            raise HEKeyError(f"{path}: unreadable context header ({exc})") from None
    if not isinstance(header, dict) or header.get("format") != CONTEXT_FORMAT:
        raise HEKeyError(f"{path}: not a {CONTEXT_FORMAT} file")
    return header


def check_he_keys(cfg: Any, *, deployment: bool | None, run_dir: Path | None = None,
                  checks: list[str] | None = None, notes: list[str] | None = None) -> str | None:
    """Check the CKKS context files of an `aggregation=he` run; the server's key fingerprint.

    The public context is fully parsed (the server's own loader). The secret context, when
    the config names one and it is on this machine, is checked by its header only (kind,
    preset, fingerprint against the public one): the server never loads a secret key.
    """
    if cfg.aggregation.name != "he":
        return None
    from fedstack.strategies.he.keys import HEKeyError
    from fedstack.strategies.he.provisioning import (
        check_server_key_source,
        load_server_public_context,
    )

    checks = checks if checks is not None else []
    notes = notes if notes is not None else []
    settings = settings_of(cfg.aggregation)
    fingerprint: str | None = None
    try:
        if settings.public_context:
            fingerprint = load_server_public_context(settings).context.fingerprint
            checks.append(f"aggregation.public_context: parsed, preset {settings.preset}")
        else:
            check_server_key_source(settings, deployment=bool(deployment))
            if run_dir is not None:
                fingerprint = _check_resumed_keys(run_dir, str(settings.preset), checks)
    except HEKeyError as exc:
        message = str(exc)
        if not message.startswith(("aggregation.", "resume")):
            message = f"aggregation.public_context: {message}"
        raise ConfigError(message) from None
    _check_secret_context(settings, fingerprint, deployment, checks, notes)
    return fingerprint


def _check_resumed_keys(run_dir: Path, preset: str, checks: list[str]) -> str | None:
    """A resumed simulated HE run must find the key its checkpoints were encrypted under."""
    from fedstack.strategies.he.keys import PUBLIC_CONTEXT_FILENAME, load_public_context
    from fedstack.strategies.he.provisioning import SIMULATION_KEY_DIR

    public = run_dir / SIMULATION_KEY_DIR / PUBLIC_CONTEXT_FILENAME
    if not public.exists():
        if latest_checkpoint(run_dir) is not None:
            raise ConfigError(f"resume={str(run_dir)!r}: an aggregation=he run without "
                              f"{SIMULATION_KEY_DIR}/{PUBLIC_CONTEXT_FILENAME}: its encrypted "
                              "checkpoints cannot be continued")
        return None
    try:
        ctx = load_public_context(public)
    except ValueError as exc:
        raise ConfigError(f"resume={str(run_dir)!r}: {exc}") from None
    if ctx.preset.name != preset:
        raise ConfigError(f"resume={str(run_dir)!r}: its key is for preset {ctx.preset.name!r}, "
                          f"aggregation.preset={preset!r}")
    checks.append(f"resume: the run's CKKS public context {public} parses")
    return str(ctx.fingerprint)


def _check_secret_context(settings: Any, fingerprint: str | None, deployment: bool | None,
                          checks: list[str], notes: list[str]) -> None:
    from fedstack.strategies.he.keys import HEKeyError

    key = "aggregation.secret_context"
    if not settings.secret_context:
        if settings.public_context and deployment is False:
            raise ConfigError(
                f"{key} is empty but aggregation.public_context is set: simulated clients "
                "have no node config to name their secret context, so none could encrypt or "
                f"decrypt; set {key} to the secret file of the same key pair (or leave both "
                "empty to generate a key pair for this simulated run)")
        return
    path = Path(str(settings.secret_context)).expanduser().resolve()
    if not path.is_file():
        if deployment is False:
            raise ConfigError(f"{key}={str(settings.secret_context)!r}: no such file")
        notes.append(f"{key}={path} is not on the server's machine; each SuperNode loads "
                     "its own")
        return
    try:
        header = read_context_header(path)
    except (OSError, HEKeyError) as exc:
        raise ConfigError(f"{key}={str(settings.secret_context)!r}: {exc}") from None
    if header.get("kind") != "secret":
        raise ConfigError(f"{key}={str(settings.secret_context)!r} is a {header.get('kind')} "
                          "context: clients need the secret one (he_secret.ckks)")
    if header.get("preset") != settings.preset:
        raise ConfigError(f"{key}={str(settings.secret_context)!r} is for preset "
                          f"{header.get('preset')!r} but aggregation.preset={settings.preset!r}")
    if fingerprint is not None and header.get("fingerprint") != fingerprint:
        raise ConfigError(f"{key} and aggregation.public_context are not one key pair "
                          "(their fingerprints differ)")
    checks.append(f"{key}: header names a secret context for preset {settings.preset}")


# --------------------------------------------------------------------------- data, partitions


def load_checked_task(cfg: Any) -> tuple[Any, Any]:
    """(Task, the server's TaskContext): the task imported as every party will import it."""
    from fedstack.task.plugin import load_task, task_context

    try:
        return load_task(cfg.task), task_context(cfg)
    except ConfigError:
        raise
    except Exception as exc:  # an import-time error of a plug-in module: name the task
        raise ConfigError(
            f"task={cfg.task.name}: the task cannot be loaded ({type(exc).__name__}: {exc})"
        ) from exc


def _task_step(task: Any, what: str, fn: Any, *args: Any) -> Any:
    """Run one of the task's functions; any failure becomes a ConfigError naming the task."""
    try:
        return fn(*args)
    except ConfigError:
        raise
    except Exception as exc:  # a loader's own error type: name the task, keep the cause
        raise ConfigError(f"{task.source}: {what} failed ({type(exc).__name__}: {exc})") from exc


def load_partitions(cfg: Any, task: Any, ctx: Any, *, deployment: bool | None) -> list[Any] | None:
    """Every client's partition, loaded by the clients' own code; None where the server
    cannot load them (a plug-in task in deployment: each node reads its own files)."""
    if deployment and not task.builtin:
        return None
    return [
        _task_step(task, f"load_partition(ctx, {pid})", task.load_partition, ctx, pid)
        for pid in range(int(cfg.num_clients))
    ]


@dataclass(frozen=True)
class TaskSurvey:
    """What the server learns about a task by building its model and loading its data."""

    model: Any
    test_size: int
    input_shape: tuple[int, ...]
    #: Width of the model's output (the number of classes of a classifier; 0: unknown).
    num_classes: int
    label_mapping: dict[str, int] | None
    #: Whether a batch of the loader's examples went through the model and the loss.
    forward_checked: bool


#: Examples pushed through the model and the loss by the start-up check.
SMOKE_BATCH = 2


def survey_task(task: Any, ctx: Any, partitions: list[Any] | None) -> TaskSurvey:
    """Build the model, load the test split, and push a few examples through model and loss:
    a mismatch between the loader and the model (shapes, number of classes) is found here,
    before the runtime starts, instead of in every client."""
    import torch
    from torch.utils.data import DataLoader

    test = _task_step(task, "load_test(ctx)", task.load_test, ctx)
    model = _task_step(task, "build_model(ctx)", task.build_model, ctx)
    names = _task_step(task, "label_names(ctx)", task.label_names, ctx)
    sample = next((p.train for p in partitions or () if len(p.train) > 0), None)
    if sample is None and test is not None and len(test) > 0:
        sample = test
    input_shape: tuple[int, ...] = ()
    outputs = 0
    if sample is not None:
        xb, yb = _task_step(
            task,
            "reading examples (dataset[i] must be (input, target))",
            lambda: next(iter(DataLoader(sample, batch_size=SMOKE_BATCH))),
        )
        input_shape = tuple(int(d) for d in xb.shape[1:])
        model.eval()
        with torch.no_grad():
            out = _task_step(task, f"the model on inputs of shape {tuple(xb.shape)}", model, xb)
            _task_step(
                task,
                f"the loss on outputs {tuple(out.shape)} and targets "
                f"{tuple(yb.shape)} (does the model's output match the task's classes?)",
                task.per_example_loss(),
                out,
                yb,
            )
        outputs = int(out.shape[1]) if out.dim() == 2 else 0
    return TaskSurvey(
        model=model,
        test_size=0 if test is None else len(test),
        input_shape=input_shape,
        num_classes=outputs,
        label_mapping=None if names is None else {n: i for i, n in enumerate(names)},
        forward_checked=sample is not None,
    )


def weight_limit(cfg: Any) -> tuple[int, str]:
    """(largest n_k a reply may carry, the key that sets it) under this run's aggregation."""
    limit, key = int(cfg.max_num_examples), "max_num_examples"
    agg_weight = int(cfg.aggregation.get("max_weight", 0) or 0)
    if 0 < agg_weight < limit:
        limit, key = agg_weight, "aggregation.max_weight"
    return limit, key


def _partition_description(cfg: Any) -> str:
    from fedstack.task.partitioning import partition_keys

    keys = partition_keys(cfg.partition)
    return f"partition={cfg.partition.name}{f' ({keys})' if keys else ''}"


def smallest_usable_partition(val_fraction: float) -> int:
    """Fewest samples a partition needs for the client's local split to satisfy the minimums."""
    from fedstack.task.client_data import split_sizes

    n = 1
    while True:
        train, val = split_sizes(n, val_fraction)
        if train >= MIN_TRAIN_EXAMPLES and (val_fraction <= 0 or val >= MIN_VAL_EXAMPLES):
            return n
        n += 1


def _partition_remedy(cfg: Any, val_fraction: float) -> str:
    needed = smallest_usable_partition(val_fraction)
    if cfg.partition.name == "dirichlet":
        return (f"Set partition.min_partition_size >= {needed} (flwr-datasets then redraws "
                "until every client has that many), raise partition.alpha, or lower "
                "num_clients")
    if cfg.partition.name == "shards":
        return (f"Every client needs >= {needed} samples: lower num_clients or raise "
                "partition.shards_per_client")
    return f"Every client needs >= {needed} samples: lower num_clients"


def check_partitions(cfg: Any, sizes: list[ClientSizes]) -> list[ClientSizes]:
    """Every client's train/validation sizes; ConfigError if any client could not take part."""
    num_clients = int(cfg.num_clients)
    val_fraction = float(cfg.task.client_val_fraction)
    short = [c for c in sizes if c.train < MIN_TRAIN_EXAMPLES
             or (val_fraction > 0 and c.val < MIN_VAL_EXAMPLES)]
    if short:
        listed = "; ".join(f"client {c.partition_id} gets {c.train + c.val} samples "
                           f"({c.train} train, {c.val} validation)" for c in short)
        raise ConfigError(
            f"{_partition_description(cfg)} with num_clients={num_clients} and "
            f"task.client_val_fraction={val_fraction:g} leaves clients unable to take part "
            f"(each needs >= {MIN_TRAIN_EXAMPLES} train"
            + (f" and >= {MIN_VAL_EXAMPLES} validation" if val_fraction > 0 else "")
            + f" examples): {listed}. {_partition_remedy(cfg, val_fraction)}")
    limit, key = weight_limit(cfg)
    heavy = [c for c in sizes if c.train > limit]
    if heavy:
        listed = "; ".join(f"client {c.partition_id} has {c.train}" for c in heavy)
        raise ConfigError(f"{key}={limit} is below a client's number of training examples "
                          f"(its replies would be rejected): {listed}")
    _check_dp_delta(cfg, sizes)
    return sizes


def _model_name(cfg: Any, task: Any) -> str:
    return f"task.model={cfg.task.model}" if task.builtin else f"{task.source} (build_model)"


def check_dp_model_of_task(cfg: Any, task: Any, model: Any) -> None:
    """The task's model must be one DP-SGD can clip per example (no tied weights, no layer
    that mixes examples): refused here, naming the layer, instead of in every client."""
    from fedstack.privacy.engine import check_dp_model
    from fedstack.privacy.model_check import DPModelError

    try:
        check_dp_model(model, str(cfg.dp.grad_sample_mode))
    except DPModelError as exc:
        raise ConfigError(f"{_model_name(cfg, task)} with dp=local: {exc}") from None


def _check_dp_delta(cfg: Any, sizes: list[ClientSizes]) -> None:
    """dp=local: every client needs δ < 1/n_k (fedstack.privacy.engine refuses to train
    otherwise, and the client declines every round). The δ is `dp.delta`, or under the
    public schedule (secagg/he, or `dp.sample_rate` set) the run-wide δ every client uses,
    whose default 1/(10·bound) is below 1/n_k for any client within the weight bound."""
    from fedstack.privacy.schedule import public_schedule

    if cfg.dp.name != "local":
        return
    schedule = public_schedule(cfg)
    if schedule is not None:
        delta, key = schedule.delta, ("dp.delta" if cfg.dp.get("delta") is not None
                                      else "the public schedule's delta")
    elif cfg.dp.get("delta") is not None:
        delta, key = float(cfg.dp.delta), "dp.delta"
    else:
        return
    bad = [c for c in sizes if delta >= 1.0 / c.train]
    if bad:
        listed = "; ".join(f"client {c.partition_id} has {c.train} (1/n = {1.0 / c.train:.3g})"
                           for c in bad)
        largest = max(c.train for c in sizes)
        raise ConfigError(f"{key}={delta:g} is not below 1/n_k for every client: {listed}; "
                          f"use dp.delta < {1.0 / largest:.3g} or leave it null "
                          f"(1/(10 n_k) per client; 1/(10 x the bound on n_k) under the "
                          "public schedule)")
