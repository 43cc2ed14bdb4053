"""Where each party's CKKS context comes from, in simulation and in deployment.

Server: `aggregation.public_context` when given (deployment: the public file from
`fedstack keys`). Otherwise, simulation only: a key pair is generated into `<run_dir>/he_keys/`
(kept there, so a resumed run and `fedstack decrypt` find the same key) and the strategy loads
only the public file. In that case one process (the simulation) created both halves: the
privacy report says so. Outside simulation the server refuses to generate keys (it would hold
the secret key): Flower hands a ServerApp started by a SuperLink (`flwr run` against a
deployed federation) its `HttpGrid`, and a simulated one an `InMemoryGrid` (`flwr run` with
the simulation runtime, `run_simulation`, `fedstack run`);
`fedstack.strategies.runtime.is_deployment` reads that.

Client, in order: its node config `he-secret-context` (deployment: each SuperNode's own
file), then `aggregation.secret_context`, then, only when neither is set, the secret-context
path the server announces for a simulated run. A configured node never follows the server's
hint, and every ciphertext's fingerprint is checked against the loaded key anyway.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedstack.strategies.he.keys import (
    PUBLIC_CONTEXT_FILENAME,
    SECRET_CONTEXT_FILENAME,
    HEKeyError,
    PublicContext,
    SecretContext,
    generate_keys,
    load_public_context,
    load_secret_context,
    write_contexts,
)
from fedstack.strategies.he.presets import get_preset

#: Node-config key naming a SuperNode's secret context file.
NODE_SECRET_CONTEXT_KEY = "he-secret-context"
#: Sub-directory of a simulated run holding its generated key pair.
SIMULATION_KEY_DIR = "he_keys"
#: Parsed secret contexts kept per process (Ray actors serve many messages).
CONTEXT_CACHE_SIZE = 4


def provision_keys(out_dir: str | Path, preset: str) -> tuple[Path, Path]:
    """Generate a key pair for `preset`; write (secret, public) context files into out_dir."""
    return write_contexts(generate_keys(get_preset(preset)), out_dir)


@dataclass(frozen=True)
class ServerKeys:
    context: PublicContext
    public_path: Path
    #: Secret file of a simulated run (announced to simulated clients), else None.
    simulation_secret_path: Path | None

    @property
    def one_process_held_both(self) -> bool:
        return self.simulation_secret_path is not None


def check_server_key_source(settings: Any, *, deployment: bool) -> None:
    """Start-up check (no side effect): the server can get a public context legitimately.

    Loads `aggregation.public_context` when given (missing/corrupt/secret/wrong-preset files
    fail here, naming the key); without it, refuses a deployment.
    """
    if settings.public_context:
        load_server_public_context(settings)
    elif deployment:
        raise HEKeyError(DEPLOYMENT_NEEDS_PUBLIC_CONTEXT)


#: Why a deployed server does not generate keys (and what to do instead).
DEPLOYMENT_NEEDS_PUBLIC_CONTEXT = (
    "aggregation.public_context is not set: outside simulation the server refuses to generate "
    "the CKKS key pair itself (it would then hold the secret key and could read every update). "
    "Create keys on a data owner's machine with `fedstack keys --out DIR`, give each SuperNode "
    f"DIR/{SECRET_CONTEXT_FILENAME} (--node-config \"{NODE_SECRET_CONTEXT_KEY}='PATH'\") and "
    f"run with aggregation.public_context=DIR/{PUBLIC_CONTEXT_FILENAME}"
)


def load_server_public_context(settings: Any) -> ServerKeys:
    """`aggregation.public_context`, loaded and checked against the preset."""
    path = Path(str(settings.public_context)).expanduser().resolve()
    try:
        ctx = load_public_context(path)
    except HEKeyError as exc:
        raise HEKeyError(f"aggregation.public_context: {exc}") from None
    _check_preset(ctx, settings, f"aggregation.public_context={path}")
    return ServerKeys(ctx, path, None)


def server_keys(settings: Any, run_dir: Path, *, deployment: bool = False) -> ServerKeys:
    """The server's public context (never a secret one); keys are generated in simulation only."""
    if settings.public_context:
        return load_server_public_context(settings)
    if deployment:
        raise HEKeyError(DEPLOYMENT_NEEDS_PUBLIC_CONTEXT)
    key_dir = Path(run_dir) / SIMULATION_KEY_DIR
    secret_path = key_dir / SECRET_CONTEXT_FILENAME
    public_path = key_dir / PUBLIC_CONTEXT_FILENAME
    if not public_path.exists():
        provision_keys(key_dir, str(settings.preset))
    ctx = load_public_context(public_path)
    _check_preset(ctx, settings, str(public_path))
    return ServerKeys(ctx, public_path, secret_path.resolve())


def _check_preset(ctx: PublicContext, settings: Any, source: str) -> None:
    if ctx.preset.name != settings.preset:
        raise HEKeyError(
            f"{source} was made for preset {ctx.preset.name!r} but aggregation.preset="
            f"{settings.preset!r}"
        )


_cache: OrderedDict[tuple[str, int, int], SecretContext] = OrderedDict()
_cache_lock = threading.Lock()


def _load_cached(path: Path) -> SecretContext:
    """Parse a secret context once per process and file version (path, size, mtime)."""
    if not path.is_file():
        raise HEKeyError(f"secret context {str(path)!r} does not exist")
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    with _cache_lock:
        ctx = _cache.get(key)
        if ctx is not None:
            _cache.move_to_end(key)
            return ctx
    ctx = load_secret_context(path)
    with _cache_lock:
        _cache[key] = ctx
        while len(_cache) > CONTEXT_CACHE_SIZE:
            _cache.popitem(last=False)
    return ctx


def client_secret_context(
    settings: Any, node_config: Any, announced_path: str | None
) -> tuple[SecretContext, str]:
    """(secret context, where it came from) for a client; HEKeyError if none is available."""
    node_path = node_config.get(NODE_SECRET_CONTEXT_KEY) if node_config is not None else None
    if node_path:
        source, path = f"node config {NODE_SECRET_CONTEXT_KEY}", str(node_path)
    elif settings.secret_context:
        source, path = "aggregation.secret_context", str(settings.secret_context)
    elif announced_path:
        source, path = "the simulated run's key directory", str(announced_path)
    else:
        raise HEKeyError(
            f"no CKKS secret context: set node config {NODE_SECRET_CONTEXT_KEY}=PATH "
            "(or aggregation.secret_context) to the file from `fedstack keys`"
        )
    ctx = _load_cached(Path(path).expanduser().resolve())
    if ctx.preset.name != settings.preset:
        raise HEKeyError(
            f"{path} ({source}) is for preset {ctx.preset.name!r}, the run uses "
            f"{settings.preset!r}"
        )
    return ctx, source
