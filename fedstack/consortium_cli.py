"""`fedstack identity` and `fedstack roster`: a consortium's set-up steps.

    fedstack identity new hospital-a --out ~/.fedstack/identity
    fedstack roster build hospital-a.pub hospital-b.pub hospital-c.pub --out roster.txt
    fedstack roster show roster.txt

Each member makes its identity on its own host (the private key never leaves it), sends only
NAME.pub to the others, and everyone builds the same roster and compares its fingerprint
(docs/consortium.md). Every command prints what to check or run next.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedstack.consortium import (
    IDENTITY_KEY_NODE_KEY,
    ROSTER_NODE_KEY,
    ConsortiumError,
    Roster,
    new_identity,
)
from fedstack.crypto.signing import SignatureError

#: Exit status of a command refused for bad input (argparse's own).
USAGE_ERROR = 2


def identity_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedstack identity",
        description="Make this data owner's long-term signing identity (Ed25519).")
    commands = parser.add_subparsers(dest="command", required=True)
    new = commands.add_parser(
        "new", help="write NAME.key (private, mode 0600) and NAME.pub (its roster line)")
    new.add_argument("name", help="the member name everyone will see (letters, digits, . _ @ -)")
    new.add_argument("--out", required=True, type=Path, help="output directory")
    return parser


def identity_main(argv: list[str]) -> int:
    args = identity_parser().parse_args(argv)
    try:
        key_path, pub_path, member = new_identity(args.name, args.out)
    except (ConsortiumError, SignatureError, OSError) as exc:
        print(f"fedstack identity: {exc}", file=sys.stderr)
        return USAGE_ERROR
    print(f"{member.name}: private key {key_path} (stays on this host, mode 0600)")
    print(f"  public: {pub_path}  (send this file to the other members)")
    print(f"  fingerprint: {member.fingerprint}")
    print("  read the fingerprint to the other members over a channel you trust (phone, "
          "meeting); they check it against the .pub they received")
    print(f"  SuperNode: --node-config \"... {IDENTITY_KEY_NODE_KEY}='{key_path.resolve()}' "
          f"{ROSTER_NODE_KEY}='/path/roster.txt'\"")
    return 0


def roster_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedstack roster",
        description="Build or show the consortium roster every node pins.")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="a roster from the members' NAME.pub files")
    build.add_argument("files", nargs="+", type=Path, help="the members' .pub files")
    build.add_argument("--out", required=True, type=Path, help="roster file to write")
    build.add_argument("--force", action="store_true", help="replace an existing roster")
    show = commands.add_parser("show", help="list the members and fingerprints of a roster")
    show.add_argument("roster", type=Path)
    return parser


def _print_members(roster: Roster) -> None:
    width = max(len(name) for name in roster.names)
    for member in roster:
        print(f"  {member.name:<{width}}  {member.fingerprint}")
    print(f"roster fingerprint: {roster.fingerprint}  ({len(roster)} members)")


def roster_main(argv: list[str]) -> int:
    args = roster_parser().parse_args(argv)
    try:
        if args.command == "show":
            roster = Roster.load(args.roster)
            print(f"{args.roster}:")
            _print_members(roster)
            return 0
        if args.out.exists() and not args.force:
            raise ConsortiumError(f"{args.out} exists (use --force to replace it)")
        roster = Roster.from_public_files(args.files)
        roster.save(args.out)
    except (ConsortiumError, OSError) as exc:
        print(f"fedstack roster: {exc}", file=sys.stderr)
        return USAGE_ERROR
    print(f"wrote {args.out}:")
    _print_members(roster)
    print("check each member's fingerprint with that member, and the roster fingerprint with "
          "every member: all nodes must pin the same roster")
    print(f"  SuperNode: --node-config \"... {ROSTER_NODE_KEY}='{args.out.resolve()}'\"")
    return 0
