"""The fedstack ClientApp: local training and evaluation on one data owner's partition.

Protocol layers (secure aggregation, HE) wrap these handlers as mods (`protocol_mod`), and
the privacy layer (DP-SGD) is the `LocalTrainer` chosen here, so the handlers only ever see
plaintext models and never know which protocol carries their update.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedstack.config import config_from_message
from fedstack.log import DEFAULT_LOG_LEVEL, configure_console
from fedstack.privacy.ledger_sync import IDENTITY_ACTION, identity_reply
from fedstack.strategies.client_mods import protocol_mod
from fedstack.strategies.reply_validation import DECLINE_RECORD, DECLINED_KEY, NUM_EXAMPLES_KEY

if TYPE_CHECKING:  # torch-backed: imported inside the handlers (see _client_setup)
    from fedstack.task.contract import Partition
    from fedstack.task.plugin import Task
    from fedstack.task.training import LocalTrainer

#: Node-config keys that place this node's data (set by simulation, or by
#: `flower-supernode --node-config "partition-id=0 num-partitions=3"` in deployment).
PARTITION_ID_KEY = "partition-id"
NUM_PARTITIONS_KEY = "num-partitions"
#: Builder of the DP-SGD trainer (imported only when `dp=local`).
DP_TRAINER_BUILDER = "fedstack.privacy.local_trainer:build_dp_trainer"
#: Builder of the plain trainer that first checks the node's policy against `dp=central`.
CENTRAL_TRAINER_BUILDER = "fedstack.privacy.central_client:build_central_trainer"
#: Builder of the plain trainer of `dp=distributed` (the secagg codec adds the noise).
DISTRIBUTED_TRAINER_BUILDER = "fedstack.privacy.distributed.client:build_distributed_trainer"

app = ClientApp()


@runtime_checkable
class AccountingTrainer(Protocol):
    """A LocalTrainer whose replies carry records beyond metrics (DP: its accountant state,
    for the server's privacy ledger) and that knows whether its declines are for good."""

    decline_permanent: bool

    def reply_records(self) -> dict[str, dict[str, Any]]: ...


def partition_of(context: Context) -> tuple[int, int]:
    """(partition id, number of partitions) of this node, from its node config."""
    node_config = context.node_config
    if PARTITION_ID_KEY not in node_config or NUM_PARTITIONS_KEY not in node_config:
        raise ValueError(f"node config lacks '{PARTITION_ID_KEY}'/'{NUM_PARTITIONS_KEY}': "
                         "start the SuperNode with --node-config "
                         "\"partition-id=<i> num-partitions=<n>\"")
    return int(node_config[PARTITION_ID_KEY]), int(node_config[NUM_PARTITIONS_KEY])


# --- task: model and data (fedstack.task.plugin; the same path for built-in and plug-in tasks)
def _client_setup(msg: Message, context: Context) -> tuple[Any, int, Partition, Any, Task]:
    """(config, partition id, this node's partition, model with the global weights, task)."""
    # Deployment runs every message in a fresh ClientApp process: torch (~2 s of imports,
    # far more with several SuperNodes per core) is imported only by messages that reach a
    # handler, not by protocol stages a mod answers alone (secagg unmask/advertise/share).
    from fedstack.task.plugin import load_task, task_context

    cfg = config_from_message(msg, context)
    # This process may be a fresh ClientApp or a Ray actor: quiet its console (Opacus's import
    # would otherwise double every line) at the run's log level.
    configure_console(cfg.get("log_level", DEFAULT_LOG_LEVEL))
    partition_id, num_partitions = partition_of(context)
    task = load_task(cfg.task)
    ctx = task_context(cfg, context.node_config, num_partitions)
    data = task.load_partition(ctx, partition_id)
    if int(cfg.audit.canaries or 0) > 0:  # audit mode only (docs/audit.md)
        from fedstack.audit.canaries import with_canaries

        data = with_canaries(cfg, partition_id, data)
    model = task.build_model(ctx)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return cfg, partition_id, data, model, task


def local_trainer(
    cfg: Any,
    context: Context,
    partition_id: int,
    data: Partition,
    content: RecordDict | None = None,
    task: Task | None = None,
) -> LocalTrainer:
    """Plain SGD (with the task's loss), or DP-SGD when `dp=local` (the privacy layer keeps
    its state in `context` and reads the server ledger's record of this client from the
    message `content`)."""
    if cfg.dp.name == "none":
        from fedstack.task.training import SGDTrainer

        return SGDTrainer(
            cfg.task,
            int(cfg.seed),
            partition_id,
            loss=task.train_loss() if task is not None else None,
        )
    from fedstack.strategies import load_object

    if cfg.dp.name == "central":
        return load_object(CENTRAL_TRAINER_BUILDER)(cfg, context, partition_id, task)
    if cfg.dp.name == "distributed":
        return load_object(DISTRIBUTED_TRAINER_BUILDER)(cfg, context, partition_id, task)
    loss = task.per_example_loss() if task is not None and task.has_custom_loss else None
    return load_object(DP_TRAINER_BUILDER)(cfg, context, partition_id, data, content, loss)


# --- end task


@app.train(mods=[protocol_mod])
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on the local partition; reply with the new weights."""
    cfg, partition_id, data, model, task = _client_setup(msg, context)
    server_round = int(msg.content["config"]["server-round"])
    trainer = local_trainer(cfg, context, partition_id, data, msg.content, task)
    outcome = trainer.train(model, data.train, server_round)
    metrics: dict[str, Any] = {"partition-id": partition_id, **outcome.metrics}
    accounting = isinstance(trainer, AccountingTrainer)
    records = {name: ConfigRecord(record) for name, record in
               (trainer.reply_records().items() if accounting else ())}
    if outcome.declined is not None:
        metrics.update({DECLINED_KEY: 1, NUM_EXAMPLES_KEY: 0})
        permanent = trainer.decline_permanent if accounting else True
        return Message(RecordDict({
            "metrics": MetricRecord(metrics),
            DECLINE_RECORD: ConfigRecord({"reason": outcome.declined, "permanent": permanent}),
            **records,
        }), reply_to=msg)
    metrics.update({NUM_EXAMPLES_KEY: outcome.num_examples, "train-loss": outcome.train_loss})
    return Message(RecordDict({
        "arrays": ArrayRecord(model.state_dict()),
        "metrics": MetricRecord(metrics),
        **records,
    }), reply_to=msg)


@app.query(IDENTITY_ACTION)
def identify(msg: Message, context: Context) -> Message:
    """Say which client (partition) this node is: the privacy ledger asks after a restart,
    when nodes have new ids, so that it sends each client only its own record."""
    partition_id, _ = partition_of(context)
    return identity_reply(partition_id, msg)


@app.evaluate(mods=[protocol_mod])
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on the local validation split."""
    from fedstack.task.training import evaluate_dataset

    _, partition_id, data, model, task = _client_setup(msg, context)
    loss, accuracy = evaluate_dataset(
        model, data.val, task.per_example_loss() if task.has_custom_loss else None
    )
    return Message(
        RecordDict(
            {
                "metrics": MetricRecord(
                    {
                        NUM_EXAMPLES_KEY: len(data.val),
                        "eval-loss": loss,
                        "eval-accuracy": accuracy,
                        "partition-id": partition_id,
                    }
                )
            }
        ),
        reply_to=msg,
    )
