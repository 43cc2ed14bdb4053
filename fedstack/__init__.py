"""fedstack: federated learning with stackable privacy layers, as a Flower app."""

__version__ = "0.1.0"
