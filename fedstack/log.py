"""The fedstack logger: a child of Flower's, so our lines show in `flwr run --stream` / `flwr log`
with Flower's formatting, in the ServerApp and ClientApp processes alike."""

import logging

logger = logging.getLogger("flwr.fedstack")
