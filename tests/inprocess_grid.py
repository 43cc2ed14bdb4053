"""A Flower `Grid` that delivers messages to ClientApps in this process, for fast tests.

It runs the real ClientApp (mods and handlers) with a per-node `Context` whose state persists
across messages, like a SuperNode's; an exception in the ClientApp becomes an error reply, as
in Flower's runtimes. Tests can drop nodes (`offline`), fail or tamper with
replies (`reply_hook`) to exercise the strategies' validation and dropout paths without Ray.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable
from types import SimpleNamespace

from flwr.app import Context, Error, Message, RecordDict
from flwr.app.message.message import make_message
from flwr.app.metadata import Metadata
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

RUN_ID = 1
SERVER_NODE_ID = 0
DEFAULT_TTL = 3600.0

ReplyHook = Callable[[int, Message, Message], Message | None]


class InProcessGrid(Grid):
    """Delivers every message synchronously to `client_app(message, context)`."""

    def __init__(self, client_app: Callable[[Message, Context], Message], num_nodes: int,
                 node_config: Callable[[int], dict] | None = None,
                 first_node_id: int = 101) -> None:
        # Messages created by a ServerApp take their run/task identity from the process.
        TaskIdentity.run_id = RUN_ID
        TaskIdentity.node_id = SERVER_NODE_ID
        TaskIdentity.task_id = 1
        self.client_app = client_app
        self.node_ids = [first_node_id + i for i in range(num_nodes)]
        self.contexts = {
            node: Context(run_id=RUN_ID, node_id=node,
                          node_config=(node_config(i) if node_config else
                                       {"partition-id": i, "num-partitions": num_nodes}),
                          state=RecordDict(), run_config={})
            for i, node in enumerate(self.node_ids)
        }
        #: Nodes that receive nothing and send nothing (dropped out).
        self.offline: set[int] = set()
        #: (node, request, reply) -> replacement reply, or None to drop it.
        self.reply_hook: ReplyHook | None = None
        self.sent: list[Message] = []

    # The abstract Grid API -------------------------------------------------------------
    def set_run(self, run_id: int) -> None:  # pragma: no cover - not used in tests
        pass

    @property
    def run(self) -> SimpleNamespace:
        # Flower's legacy workflows (SecAgg+ in the benchmarks) read grid.run.run_id.
        return SimpleNamespace(run_id=RUN_ID)

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type,
                       group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self.node_ids if n not in self.offline]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("use send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("use send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            message_id = uuid.uuid4().hex
            msg.metadata.__dict__["_message_id"] = message_id  # as Flower's grids do
            stamped = make_message(Metadata(
                run_id=RUN_ID, message_id=message_id, src_node_id=SERVER_NODE_ID,
                dst_node_id=node, reply_to_message_id="", group_id=msg.metadata.group_id,
                created_at=time.time(), ttl=DEFAULT_TTL,
                message_type=msg.metadata.message_type), content=msg.content)
            self.sent.append(stamped)
            if node in self.offline or node not in self.contexts:
                continue
            try:
                reply = self.client_app(stamped, self.contexts[node])
            except Exception as exc:  # as Flower's runtimes: the exception becomes a reply
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                      reason=f"{type(exc)}:<'{exc}'>"), reply_to=stamped)
            if self.reply_hook is not None:
                reply = self.reply_hook(node, stamped, reply)
            if reply is not None:
                replies.append(reply)
        return replies


class PowerCut(RuntimeError):
    """The server died mid-round (a test's stand-in for a crash)."""


def die_in_round(server_round: int) -> ReplyHook:
    """A reply hook that kills the server when the train/evaluate reply of `server_round`
    arrives: the round's work is lost, earlier rounds are checkpointed."""

    def hook(node: int, request: Message, reply: Message) -> Message:
        if int(request.content["config"]["server-round"]) == server_round:
            raise PowerCut(f"power cut in round {server_round}")
        return reply

    return hook
