"""Which Flower runtime a ServerApp runs in: a real SuperLink (deployment) or a simulation.

Deployment is told by the grid Flower hands the ServerApp: a SuperLink-started ServerApp gets
an `HttpGrid`; the simulation runtime (`flwr run .` on a local SuperLink, or `fedstack run`)
gets an `InMemoryGrid`, and tests their own in-process grids. Some rules depend on it: the
server may generate HE keys only in simulation, and a simulation's virtual SuperNodes must
match `num_clients` exactly.
"""

from __future__ import annotations

from typing import Any


def is_deployment(grid: Any) -> bool:
    """Whether the ServerApp talks to a real SuperLink (not a simulation runtime)."""
    from flwr.superlink.grid import HttpGrid

    return isinstance(grid, HttpGrid)
