"""fedstack: federated learning with stackable privacy layers, as a Flower app."""

from importlib.metadata import PackageNotFoundError, version

#: Shown when the package runs from a source tree that was never installed (e.g. a FAB the
#: SuperLink unpacked without installing it): pyproject.toml is the one place a version lives.
UNKNOWN_VERSION = "0+unknown"

try:
    __version__ = version("fedstack")
except PackageNotFoundError:  # pragma: no cover - only outside an installed environment
    __version__ = UNKNOWN_VERSION
