"""Run configuration: Hydra composition, a typed schema per group, and validation.

The same composition serves both ways into a run: `flwr run .` (group choices and a free
`overrides` string arrive in the run config) and `fedstack run key=value ...` (a Hydra
command line). The server composes and validates once, then sends the resolved YAML to
clients in every message, so every party of a run works from one configuration even where
Flower gives the client no run config (in-process simulation).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import re
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from fedstack.audit.settings import AuditSettings
from fedstack.log import LOG_LEVELS

#: Key of the resolved configuration (YAML) in a message's ConfigRecord.
CONFIG_MESSAGE_KEY = "fedstack.config"
#: Key under which a client caches the configuration in its `context.state`.
CONFIG_STATE_KEY = "fedstack.config"
#: Run-config keys (pyproject `[tool.flwr.app.config]`) that choose a Hydra group.
GROUP_RUN_CONFIG_KEYS = ("task", "aggregation", "dp", "partition")
#: Run-config key holding free Hydra overrides.
OVERRIDES_RUN_CONFIG_KEY = "overrides"


#: Keys a resumed run may change: they extend or tune how it goes on, not what it is.
RESUME_MUTABLE_KEYS = ("resume", "num_rounds", "round_timeout", "max_failed_rounds",
                       "log_level", "log_table")


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the offending key."""


def conf_dir() -> Path:
    """Directory of the Hydra configs: `FEDSTACK_CONF_DIR` or `conf/` beside the package."""
    env = os.environ.get("FEDSTACK_CONF_DIR")
    if env:
        return Path(env).resolve()
    return Path(__file__).resolve().parent.parent / "conf"


# --------------------------------------------------------------------------- schemas


@dataclass
class RootSettings:
    """Top-level keys of `conf/config.yaml` (groups are validated by their own schema)."""

    seed: int = 42
    num_rounds: int = 10
    num_clients: int = 5
    output_dir: str = "outputs"
    run_name: str | None = None
    resume: str | None = None
    run_id: str | None = None
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_train_nodes: int = 2
    min_evaluate_nodes: int = 2
    min_valid_replies: int = 1
    max_num_examples: int = 1_000_000
    round_timeout: float = 300.0
    central_evaluation: bool = True
    log_table: bool = True
    log_level: str = "info"
    max_failed_rounds: int = 0
    #: Audit mode (off by default): `audit.record_round` (fedstack.audit.settings).
    audit: AuditSettings = dataclasses.field(default_factory=AuditSettings)
    task: Any = None
    aggregation: Any = None
    dp: Any = None
    partition: Any = None


@dataclass
class TrainingSettings:
    """Keys every task has: how its data is split and how each client trains locally."""

    test_fraction: float = 0.2
    client_val_fraction: float = 0.2
    local_epochs: int = 1
    batch_size: int = 32
    optimizer: str = "sgd"
    learning_rate: float = 0.05
    momentum: float = 0.9

    def validate(self, cfg: DictConfig) -> None:
        _check(0.0 < self.test_fraction < 1.0, "task.test_fraction", self.test_fraction,
               "must be in (0, 1)")
        _check(0.0 <= self.client_val_fraction < 1.0, "task.client_val_fraction",
               self.client_val_fraction, "must be in [0, 1)")
        _check(self.local_epochs >= 1, "task.local_epochs", self.local_epochs, "must be >= 1")
        _check(self.batch_size >= 1, "task.batch_size", self.batch_size, "must be >= 1")
        _check(self.learning_rate > 0, "task.learning_rate", self.learning_rate, "must be > 0")
        _check(0.0 <= self.momentum < 1.0, "task.momentum", self.momentum, "must be in [0, 1)")
        _check(
            self.optimizer in ("sgd", "adam"),
            "task.optimizer",
            self.optimizer,
            "must be one of: sgd, adam",
        )


@dataclass
class TaskSettings(TrainingSettings):
    """Embedded tasks (`digits`, `breast_cancer`): data ships with scikit-learn."""

    name: str = "digits"
    model: str = "digits_cnn"

    def validate(self, cfg: DictConfig) -> None:
        super().validate(cfg)
        from fedstack.task.model_names import MODEL_NAMES

        allowed = sorted(MODEL_NAMES) + (["auto"] if self.name == "hf" else [])
        _check(self.model in allowed, "task.model", self.model,
               f"must be one of: {', '.join(allowed)}")


#: PIL modes `task.image_mode` may convert images to.
IMAGE_MODES = ("L", "LA", "RGB", "RGBA", "I;16", "I", "F")


@dataclass
class HFTaskSettings(TaskSettings):
    """`task=hf`: a Hugging Face dataset or local files through flwr-datasets."""

    name: str = "hf"
    model: str = "auto"
    dataset: str = ""
    data_files: Any = None
    split: str = "train"
    test_split: str | None = None
    label_column: str = "label"
    feature_columns: Any = None
    image_column: str | None = None
    #: null: every image keeps its size (all must agree); N: resized to N x N.
    image_size: int | None = None
    #: null: every image keeps its channels (all must agree); a PIL mode (L, RGB, ...):
    #: every image is converted to it.
    image_mode: str | None = None
    num_classes: int | None = None

    def validate(self, cfg: DictConfig) -> None:
        super().validate(cfg)
        _check(
            bool(self.dataset),
            "task.dataset",
            self.dataset,
            "must name a Hub dataset or a builder (csv, parquet, json, imagefolder)",
        )
        if self.image_size is not None:
            _check(
                self.image_size >= 4,
                "task.image_size",
                self.image_size,
                "must be >= 4 (or null: the images' own size)",
            )
        if self.image_mode is not None:
            _check(
                self.image_mode in IMAGE_MODES,
                "task.image_mode",
                self.image_mode,
                f"must be one of: {', '.join(IMAGE_MODES)} (or null: the images' own)",
            )
        if self.num_classes is not None:
            _check(self.num_classes >= 2, "task.num_classes", self.num_classes, "must be >= 2")


@dataclass
class SyntheticTaskSettings(TaskSettings):
    """`task=synthetic_cifar`: generated CIFAR-shaped images, ResNet-18-GN by default."""

    name: str = "synthetic_cifar"
    model: str = "resnet18_gn"
    learning_rate: float = 0.01
    num_samples: int = 1000
    num_classes: int = 10
    channels: int = 3
    image_size: int = 32
    noise: float = 1.0

    def validate(self, cfg: DictConfig) -> None:
        super().validate(cfg)
        _check(self.num_classes >= 2, "task.num_classes", self.num_classes, "must be >= 2")
        # The central test split is stratified: it needs one example of every class, and so
        # does the train pool (sklearn's test size is ceil(fraction * n)).
        test_size = math.ceil(self.test_fraction * self.num_samples)
        _check(
            min(test_size, self.num_samples - test_size) >= self.num_classes,
            "task.num_samples",
            self.num_samples,
            f"with task.test_fraction={self.test_fraction} gives {test_size} test and "
            f"{self.num_samples - test_size} train examples; each needs >= "
            f"task.num_classes={self.num_classes}",
        )
        _check(self.channels >= 1, "task.channels", self.channels, "must be >= 1")
        _check(self.image_size >= 4, "task.image_size", self.image_size, "must be >= 4")
        _check(self.noise >= 0, "task.noise", self.noise, "must be >= 0")


@dataclass
class CustomTaskSettings(TrainingSettings):
    """`task=custom`: your own model and data through the plug-in contract (docs/tasks.md)."""

    name: str = "custom"
    #: Your task module (`my_project.task`) with build_model, load_partition, ...
    module: str | None = None
    #: Directory put first on sys.path before importing (null: the app's directory under
    #: `flwr run .`, the current directory under `fedstack run`).
    path: str | None = None
    model_fn: str | None = None
    partition_fn: str | None = None
    test_fn: str | None = None
    loss_fn: str | None = None
    #: Free-form settings for your task's functions (`ctx.options`); new keys need a
    #: leading `+` on the command line (`+task.options.data_dir=/data`).
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def validate(self, cfg: DictConfig) -> None:
        super().validate(cfg)
        _check(
            bool(self.module) or (bool(self.model_fn) and bool(self.partition_fn)),
            "task.module",
            self.module,
            "must name your task module (e.g. task.module=my_project.task), or set both "
            "task.model_fn and task.partition_fn (docs/tasks.md)",
        )
        for key in ("module", "model_fn", "partition_fn", "test_fn", "loss_fn"):
            value = getattr(self, key)
            if value is not None:
                _check(
                    re.fullmatch(r"[A-Za-z_][\w.]*(:[A-Za-z_][\w.]*)?", value) is not None,
                    f"task.{key}",
                    value,
                    "must be a dotted Python path (package.module or package.module:function)",
                )


@dataclass
class FedAvgSettings:
    """`aggregation=fedavg`: plain weighted averaging, no options."""

    name: str = "fedavg"


@dataclass
class NoDPSettings:
    """`dp=none`: no differential privacy."""

    name: str = "none"


@dataclass
class IIDPartitionSettings:
    name: str = "iid"


@dataclass
class DirichletPartitionSettings:
    name: str = "dirichlet"
    alpha: float = 0.5
    min_partition_size: int = 10
    self_balancing: bool = False

    def validate(self, cfg: DictConfig) -> None:
        _check(self.alpha > 0, "partition.alpha", self.alpha, "must be > 0")
        _check(self.min_partition_size >= 1, "partition.min_partition_size",
               self.min_partition_size, "must be >= 1")


@dataclass
class ShardsPartitionSettings:
    name: str = "shards"
    shards_per_client: int = 2

    def validate(self, cfg: DictConfig) -> None:
        _check(self.shards_per_client >= 1, "partition.shards_per_client",
               self.shards_per_client, "must be >= 1")


#: Schema of every group option, by dotted path so optional layers import lazily.
GROUP_SCHEMAS: dict[str, dict[str, str]] = {
    "task": {
        "digits": "fedstack.config:TaskSettings",
        "breast_cancer": "fedstack.config:TaskSettings",
        "hf": "fedstack.config:HFTaskSettings",
        "synthetic_cifar": "fedstack.config:SyntheticTaskSettings",
        "custom": "fedstack.config:CustomTaskSettings",
    },
    "aggregation": {
        "fedavg": "fedstack.config:FedAvgSettings",
        "secagg": "fedstack.strategies.secagg.settings:SecAggSettings",
        "he": "fedstack.strategies.he.settings:HESettings",
    },
    "dp": {
        "none": "fedstack.config:NoDPSettings",
        "local": "fedstack.privacy.settings:LocalDPSettings",
        "central": "fedstack.privacy.settings:CentralDPSettings",
        "distributed": "fedstack.privacy.settings:DistributedDPSettings",
    },
    "partition": {
        "iid": "fedstack.config:IIDPartitionSettings",
        "dirichlet": "fedstack.config:DirichletPartitionSettings",
        "shards": "fedstack.config:ShardsPartitionSettings",
    },
}


def _check(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} {why}")


def _load_schema(path: str) -> type:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


# --------------------------------------------------------------------------- validation


def _merge_schema(schema: type, node: Any, where: str) -> DictConfig:
    """Merge `node` into the typed schema; unknown keys and wrong types name the key."""
    base = OmegaConf.structured(schema)
    try:
        merged = OmegaConf.merge(base, node)
    except (ConfigKeyError, ValidationError, OmegaConfBaseException) as exc:
        key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
        full = f"{where}.{key}" if where and key else (key or where)
        msg = str(exc).splitlines()[0]
        if isinstance(exc, ConfigKeyError):
            allowed = ", ".join(f.name for f in dataclasses.fields(schema))
            raise ConfigError(f"unknown key '{full}' (allowed here: {allowed})") from None
        raise ConfigError(f"bad value for '{full}': {msg}") from None
    return merged  # type: ignore[return-value]


def validate_config(cfg: DictConfig) -> DictConfig:
    """Type-check every key against its schema and run cross-field checks.

    Returns a new, fully resolved DictConfig (read-only, structure-locked) whose groups carry
    every field of their schema.
    """
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    cfg.pop("hydra", None)
    groups: dict[str, DictConfig] = {}
    for group, options in GROUP_SCHEMAS.items():
        node = cfg.get(group)
        if node is None or "name" not in node:
            raise ConfigError(f"missing config group '{group}' (choose one of: "
                              f"{', '.join(options)})")
        name = node["name"]
        if name not in options:
            raise ConfigError(f"{group}={name!r} is not an option (choose one of: "
                              f"{', '.join(options)})")
        try:
            schema = _load_schema(options[name])
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"{group}={name!r} is not available in this install: {exc}") from exc
        groups[group] = _merge_schema(schema, node, group)
    root_node = {k: v for k, v in cfg.items() if k not in GROUP_SCHEMAS}
    root = _merge_schema(RootSettings, root_node, "")
    for group, node in groups.items():
        root[group] = node
    _cross_checks(root)
    for node in groups.values():
        settings = OmegaConf.to_object(node)
        check = getattr(settings, "validate", None)
        if callable(check):
            check(root)
    OmegaConf.set_readonly(root, True)
    OmegaConf.set_struct(root, True)
    return root


def _cross_checks(cfg: DictConfig) -> None:
    _check(cfg.num_rounds >= 1, "num_rounds", cfg.num_rounds, "must be >= 1")
    _check(cfg.num_clients >= 1, "num_clients", cfg.num_clients, "must be >= 1")
    _check(0.0 < cfg.fraction_train <= 1.0, "fraction_train", cfg.fraction_train,
           "must be in (0, 1]")
    _check(0.0 <= cfg.fraction_evaluate <= 1.0, "fraction_evaluate", cfg.fraction_evaluate,
           "must be in [0, 1]")
    _check(1 <= cfg.min_train_nodes <= cfg.num_clients, "min_train_nodes", cfg.min_train_nodes,
           f"must be between 1 and num_clients={cfg.num_clients}")
    _check(0 <= cfg.min_evaluate_nodes <= cfg.num_clients, "min_evaluate_nodes",
           cfg.min_evaluate_nodes, f"must be between 0 and num_clients={cfg.num_clients}")
    _check(1 <= cfg.min_valid_replies <= cfg.num_clients, "min_valid_replies",
           cfg.min_valid_replies, f"must be between 1 and num_clients={cfg.num_clients}")
    _check(cfg.max_num_examples >= 1, "max_num_examples", cfg.max_num_examples, "must be >= 1")
    _check(cfg.round_timeout > 0, "round_timeout", cfg.round_timeout, "must be > 0")
    _check(cfg.max_failed_rounds >= 0, "max_failed_rounds", cfg.max_failed_rounds,
           "must be >= 0")
    _check(str(cfg.log_level).lower() in LOG_LEVELS, "log_level", cfg.log_level,
           f"must be one of {', '.join(LOG_LEVELS)}")
    _check(bool(cfg.output_dir), "output_dir", cfg.output_dir, "must not be empty")
    if cfg.run_id is not None:
        _check(re.fullmatch(r"[0-9a-f]{32}", str(cfg.run_id)) is not None, "run_id", cfg.run_id,
               "is assigned by the server (32 hex digits); leave it null")
    OmegaConf.to_object(cfg.audit).validate(cfg)  # type: ignore[union-attr]
    if cfg.partition.name == "shards":
        _check(cfg.task.name != "hf" or cfg.task.label_column is not None,
               "partition", "shards", "needs task.label_column")


# --------------------------------------------------------------------------- composition


def compose_config(overrides: Iterable[str] = ()) -> DictConfig:
    """Compose `conf/config.yaml` with Hydra overrides and validate the result.

    With `resume=RUN_DIR` among the overrides, the result is the saved config of that run
    with the few overrides a resumed run may change (`compose_resumed`).
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    overrides = list(overrides)
    resume = dict(_override_pairs(overrides)).get("resume")
    if resume not in (None, "", "null"):
        return compose_resumed(overrides)
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
            cfg = compose(config_name="config", overrides=overrides)
    except HydraException as exc:
        raise ConfigError(f"cannot compose the config with overrides {overrides}: "
                          f"{str(exc).splitlines()[0]}") from None
    except OmegaConfBaseException as exc:
        raise ConfigError(f"bad override in {overrides}: {str(exc).splitlines()[0]}") from None
    return validate_config(cfg)


def _override_pairs(overrides: Iterable[str]) -> list[tuple[str, str]]:
    """(key, value) of Hydra overrides (`key=v`, `+key=v`, `++key=v`; `~key` has no value)."""
    pairs = []
    for item in overrides:
        key, _, value = str(item).partition("=")
        pairs.append((key.lstrip("+~").split("@")[0].strip(), value.strip()))
    return pairs


def _same_value(saved: Any, given: str) -> bool:
    """Whether an override's text denotes the saved value (YAML parsing, as Hydra does)."""
    try:
        parsed = yaml.safe_load(given) if given != "" else ""
    except yaml.YAMLError:
        parsed = given
    if isinstance(saved, float) and isinstance(parsed, int | float):
        return float(parsed) == saved
    return parsed == saved or str(parsed) == str(saved)


def compose_resumed(overrides: Iterable[str]) -> DictConfig:
    """The config of a resumed run: the run's saved config, plus the allowed overrides.

    `num_rounds` (to extend a finished run), timeouts and logging may change; any other
    override that differs from what the run was started with (task, aggregation, dp, seed,
    ...) would change the run's meaning and is refused with the list of keys. An override
    equal to the saved value is accepted (so `--run-config` defaults do not get in the way).
    """
    from fedstack.outputs.run_directory import CONFIG_FILE, output_base

    pairs = _override_pairs(overrides)
    resume = dict(pairs)["resume"]
    run_dir = output_base(resume)
    saved_path = run_dir / CONFIG_FILE
    if not saved_path.is_file():
        raise ConfigError(f"resume={resume!r}: no {CONFIG_FILE} in {run_dir} (not a run dir)")
    try:
        saved = config_from_yaml(saved_path.read_text())
    except ConfigError as exc:
        raise ConfigError(f"resume={resume!r}: the saved {CONFIG_FILE} is not valid for this "
                          f"version: {exc}") from None
    refused = []
    changes: dict[str, Any] = {}
    for key, value in pairs:
        if key in RESUME_MUTABLE_KEYS:
            changes[key] = value
            continue
        current = saved.get(key) if key in GROUP_SCHEMAS else OmegaConf.select(saved, key)
        if key in GROUP_SCHEMAS and current is not None:
            current = current.name
        if not _same_value(current, value):
            refused.append(f"{key}={value} (the run has {current!r})")
    if refused:
        raise ConfigError(
            f"resume={resume!r} continues a run as it was configured; only "
            f"{', '.join(k for k in RESUME_MUTABLE_KEYS if k != 'resume')} may change. "
            f"Refused: {'; '.join(refused)}")
    data = OmegaConf.to_container(saved, resolve=True)
    for key, value in changes.items():
        data[key] = str(run_dir) if key == "resume" else yaml.safe_load(value)  # type: ignore[index]
    return validate_config(OmegaConf.create(data))


def overrides_from_run_config(run_config: Mapping[str, Any]) -> list[str]:
    """Hydra overrides from Flower's run config: group choices, then the free string."""
    overrides: list[str] = []
    for key in GROUP_RUN_CONFIG_KEYS:
        value = run_config.get(key)
        if value not in (None, ""):
            overrides.append(f"{key}={value}")
    extra = str(run_config.get(OVERRIDES_RUN_CONFIG_KEY, "") or "")
    try:
        overrides.extend(shlex.split(extra))
    except ValueError as exc:
        raise ConfigError(f"overrides={extra!r} cannot be parsed: {exc}") from None
    return overrides


def config_to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def config_from_yaml(text: str) -> DictConfig:
    """Re-validate a configuration that travelled as YAML (never trust it blindly)."""
    return validate_config(OmegaConf.create(text))


def config_from_message(msg: Any, context: Any) -> DictConfig:
    """The run's configuration on the client: from the message, cached in `context.state`.

    The server sends it with every train/evaluate message; stage messages of multi-exchange
    protocols may omit it, so the last one seen is kept in the node's state.
    """
    from flwr.app import ConfigRecord

    text: str | None = None
    content = getattr(msg, "content", None)
    if content is not None and "config" in content.config_records:
        text = content.config_records["config"].get(CONFIG_MESSAGE_KEY)  # type: ignore[assignment]
    state = context.state
    if text is None:
        if CONFIG_STATE_KEY not in state.config_records:
            raise ConfigError("no run configuration received from the server yet")
        text = str(state.config_records[CONFIG_STATE_KEY]["yaml"])
    else:
        cached = state.config_records.get(CONFIG_STATE_KEY)
        if cached is None or cached.get("yaml") != text:
            state.config_records[CONFIG_STATE_KEY] = ConfigRecord({"yaml": text})
    return _cached_parse(text)


_PARSE_CACHE: dict[str, DictConfig] = {}


def _cached_parse(text: str) -> DictConfig:
    # Validation composes schemas and imports layers; parse each distinct config once per
    # process (Ray actors serve many messages of the same run).
    cfg = _PARSE_CACHE.get(text)
    if cfg is None:
        if len(_PARSE_CACHE) > 8:
            _PARSE_CACHE.clear()
        cfg = _PARSE_CACHE[text] = config_from_yaml(text)
    return cfg


def with_values(cfg: DictConfig, **values: Any) -> DictConfig:
    """A validated copy of `cfg` with top-level keys replaced (configs are read-only)."""
    data = OmegaConf.to_container(cfg, resolve=True)
    data.update(values)  # type: ignore[union-attr]
    return validate_config(OmegaConf.create(data))


def settings_of(node: DictConfig) -> Any:
    """The group's settings dataclass instance (e.g. `settings_of(cfg.dp)`)."""
    return OmegaConf.to_object(node)
