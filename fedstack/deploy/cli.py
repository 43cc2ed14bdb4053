"""`fedstack certs` and `fedstack supernode-keys`: the set-up steps of a deployment.

    fedstack certs --out certs/ --host superlink.example.org --host 10.0.0.5
    fedstack supernode-keys --out keys/ hospital-a hospital-b

Both print the next command to run, so a person never has to guess a flag.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedstack.deploy.certs import DEFAULT_VALIDITY_DAYS, make_certificates
from fedstack.deploy.node_keys import make_node_key, register_command


def certs_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedstack certs",
        description="Make a private CA (ca.crt, ca.key) and the SuperLink's TLS certificate "
                    "(server.pem, server.key; ECDSA P-384) for every name/IP it is reached by.")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--host", action="append", required=True, metavar="NAME_OR_IP",
                        help="a DNS name or IP address of the SuperLink (repeatable; include "
                             "every address SuperNodes and the operator use)")
    parser.add_argument("--days", type=int, default=DEFAULT_VALIDITY_DAYS,
                        help=f"validity in days (default {DEFAULT_VALIDITY_DAYS})")
    parser.add_argument("--force", action="store_true", help="replace existing files")
    return parser


def certs_main(argv: list[str]) -> int:
    args = certs_parser().parse_args(argv)
    hosts = [h for item in args.host for h in item.split(",") if h.strip()]
    try:
        paths = make_certificates(args.out, hosts, validity_days=args.days,
                                  overwrite=args.force)
    except (ValueError, FileExistsError) as exc:
        print(f"fedstack certs: {exc}", file=sys.stderr)
        return 2
    out = paths.ca_cert.parent.resolve()
    print(f"wrote {paths.ca_cert}, {paths.server_cert}, {paths.server_key} "
          f"(and {paths.ca_key}: keep it offline)")
    print("SuperLink host:\n  flower-superlink --host 0.0.0.0 --enable-supernode-auth "
          f"--ssl-ca-certfile {out}/ca.crt --ssl-certfile {out}/server.pem "
          f"--ssl-keyfile {out}/server.key ...")
    print(f"SuperNode hosts and the operator need only {out}/ca.crt")
    return 0


def supernode_keys_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedstack supernode-keys",
        description="Make SuperNode authentication keys (ECDSA P-384, OpenSSH format, as "
                    "`ssh-keygen -t ecdsa -b 384 -N \"\"` makes them): NAME and NAME.pub.")
    parser.add_argument("names", nargs="+", help="one key per SuperNode (file names)")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--connection", default="CONNECTION",
                        help="the SuperLink connection name to print in the register command")
    parser.add_argument("--force", action="store_true", help="replace existing files")
    return parser


def supernode_keys_main(argv: list[str]) -> int:
    args = supernode_keys_parser().parse_args(argv)
    for name in args.names:
        try:
            key = make_node_key(args.out, name, overwrite=args.force)
        except (ValueError, FileExistsError) as exc:
            print(f"fedstack supernode-keys: {exc}", file=sys.stderr)
            return 2
        print(f"{name}: private {key.private_key} (stays on the SuperNode host), "
              f"public {key.public_key}")
        print("  register:  " + " ".join(register_command("flwr", key.public_key.resolve(),
                                                          args.connection, name)[:5]))
        print(f"  SuperNode: flower-supernode --auth-supernode-private-key "
              f"{key.private_key.resolve()} ...")
    return 0
