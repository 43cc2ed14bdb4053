"""`fedstack keys` and `fedstack decrypt`: CKKS key provisioning and final-model recovery.

    fedstack keys --out DIR [--preset standard]
        writes DIR/he_secret.ckks (for every data owner; mode 0600) and DIR/he_public.ckks
        (for the server) and prints the key fingerprint.
    fedstack decrypt --secret-context FILE RUN_DIR [--out FILE] [--round N]
        decrypts the run's encrypted global model (latest checkpoint, or round N) and writes
        the plaintext arrays as .npz (same format as the run's checkpoints).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from fedstack.strategies.he.presets import DEFAULT_PRESET, PRESETS

DEFAULT_DECRYPTED_NAME = "decrypted_model.npz"


def keys_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedstack keys",
        description="Generate a CKKS key pair for aggregation=he: a secret context for the "
        "data owners and a public context (no secret key) for the server.",
    )
    parser.add_argument("--out", required=True, help="directory for the two context files")
    parser.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS),
                        help=f"CKKS parameter set (default: {DEFAULT_PRESET})")
    return parser


def keys_main(argv: list[str]) -> int:
    from fedstack.strategies.he.keys import HEKeyError, load_public_context
    from fedstack.strategies.he.provisioning import provision_keys

    args = keys_parser().parse_args(argv)
    try:
        secret_path, public_path = provision_keys(args.out, args.preset)
    except HEKeyError as exc:
        print(f"fedstack keys: {exc}")
        return 1
    fingerprint = load_public_context(public_path).fingerprint
    print(f"secret context (data owners only): {secret_path}")
    print(f"public context (server):            {public_path}")
    print(f"preset {args.preset}, fingerprint {fingerprint}")
    print("server: aggregation.public_context=<public file>; each SuperNode: "
          "--node-config \"he-secret-context='<secret file>'\"")
    return 0


def decrypt_run(
    run_dir: str | Path,
    secret_context_path: str | Path,
    out_path: str | Path | None = None,
    *,
    server_round: int | None = None,
) -> dict[str, Any]:
    """Decrypt a run's encrypted global model; write it as .npz; return facts about it."""
    from fedstack.outputs.run_directory import CHECKPOINT_DIR, latest_checkpoint, load_checkpoint
    from fedstack.strategies.he.ckks import decrypt_mean
    from fedstack.strategies.he.keys import load_secret_context
    from fedstack.strategies.he.records import model_from_record

    run = Path(run_dir)
    if server_round is None:
        latest = latest_checkpoint(run)
        if latest is None:
            raise FileNotFoundError(f"{run} has no checkpoint (is it a run directory?)")
        server_round, ckpt = latest
    else:
        ckpt = run / CHECKPOINT_DIR / f"round-{server_round:04d}.npz"
        if not ckpt.exists():
            raise FileNotFoundError(f"{ckpt} does not exist")
    ctx = load_secret_context(secret_context_path)
    encrypted, layout = model_from_record(load_checkpoint(ckpt))
    result = decrypt_mean(ctx, encrypted, max_weight=_max_weight(run))
    plain = layout.unflatten(result.mean)
    out = Path(out_path) if out_path else run / DEFAULT_DECRYPTED_NAME
    names = list(plain.keys())
    np.savez(out, **{f"arr_{i}": plain[k].numpy() for i, k in enumerate(names)},
             __names__=np.array(names))
    return {
        "out": str(out),
        "round": server_round,
        "parameters": layout.size,
        "total_weight": result.total_weight,
        "clients_summed": result.num_terms,
        "error_bound": result.error_bound,
        "fingerprint": ctx.fingerprint,
    }


def _max_weight(run: Path) -> int | None:
    """The run's aggregation.max_weight (a plausibility bound on the decrypted weight)."""
    config = run / "config.yaml"
    if not config.exists():
        return None
    import yaml

    data = yaml.safe_load(config.read_text()) or {}
    value = (data.get("aggregation") or {}).get("max_weight")
    return int(value) if value else None


def decrypt_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedstack decrypt",
        description="Decrypt the final (or a given round's) global model of an "
        "aggregation=he run with a data owner's secret context.",
    )
    parser.add_argument("run_dir", help="the run directory (holds checkpoints/)")
    parser.add_argument("--secret-context", required=True, help="he_secret.ckks")
    parser.add_argument("--out", default=None,
                        help=f"output .npz (default: RUN_DIR/{DEFAULT_DECRYPTED_NAME})")
    parser.add_argument("--round", type=int, default=None, help="round (default: latest)")
    return parser


def decrypt_main(argv: list[str]) -> int:
    from fedstack.strategies.he.ckks import CiphertextError
    from fedstack.strategies.he.keys import HEKeyError

    args = decrypt_parser().parse_args(argv)
    try:
        info = decrypt_run(args.run_dir, args.secret_context, args.out,
                           server_round=args.round)
    except (FileNotFoundError, HEKeyError, CiphertextError) as exc:
        print(f"fedstack decrypt: {exc}")
        return 1
    print(json.dumps(info, indent=1))
    return 0
