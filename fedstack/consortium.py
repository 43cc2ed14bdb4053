"""Consortium identities: each data owner's long-term signing key and the roster it pins.

Why: in malicious-secure aggregation every message passes through the server, so a client
can only trust a peer's public key or statement if it is signed by a consortium member it
knows. Like SSH's known_hosts, each member generates its own key, the members exchange the
public halves out of band and every node pins the same roster in its own node config
(`roster=/path/roster.txt`, `identity-key=/path/NAME.key`). The server cannot add a member:
it never touches a pinned roster.

Roster file: one member per line, `NAME ed25519 BASE64(raw 32-byte public key) [# SHA256:...]`;
blank lines and `#` comments are allowed. A trailing fingerprint comment, when present, must
match the key (a line edited by hand or damaged in transit is refused).

Simulation cannot set per-node config, so `simulation_consortium` creates one identity per
partition in a directory the run proposes, and nodes without a pinned roster use it via
`consortium_for_unpinned_node`: such nodes trust the run's roster, so the malicious-server
guarantees hold only for nodes that pin theirs.

No Flower or torch import.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedstack.crypto import signing

#: Node-config keys (the node's own, never the run config).
IDENTITY_KEY_NODE_KEY = "identity-key"
ROSTER_NODE_KEY = "roster"
#: Node-config key of the node's partition (names its simulation identity).
PARTITION_ID_KEY = "partition-id"
#: The only key type a roster line may name.
KEY_TYPE = "ed25519"
#: Member names: what a human reads in logs and fingerprints lists; no spaces or '#'.
MEMBER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
#: Files of a simulation consortium directory.
ROSTER_FILE_NAME = "roster.txt"
SIMULATION_MEMBER = "member-{index}"
KEY_SUFFIX = ".key"
PUBLIC_SUFFIX = ".pub"
#: Directories holding private keys are created owner-only.
PRIVATE_DIR_MODE = 0o700


class ConsortiumError(ValueError):
    """An identity, roster or key file that cannot be used; names the file (and line)."""


def _check_name(name: str, where: str) -> str:
    if not isinstance(name, str) or not MEMBER_NAME.match(name):
        raise ConsortiumError(f"{where}: member name {name!r} must match "
                              f"{MEMBER_NAME.pattern} (letters, digits, . _ @ -)")
    return name


@dataclass(frozen=True)
class Member:
    """One consortium member: a name and its raw Ed25519 public key."""

    name: str
    public: bytes

    def __post_init__(self) -> None:
        _check_name(self.name, "member")
        if not isinstance(self.public, bytes) or len(self.public) != signing.PUBLIC_KEY_BYTES:
            raise ConsortiumError(f"member {self.name}: an Ed25519 public key is "
                                  f"{signing.PUBLIC_KEY_BYTES} bytes")

    @property
    def fingerprint(self) -> str:
        """What members read to each other to compare keys (`SHA256:...`)."""
        return signing.fingerprint(self.public)

    def line(self) -> str:
        """The member's roster line (also the content of its NAME.pub file)."""
        encoded = base64.b64encode(self.public).decode()
        return f"{self.name} {KEY_TYPE} {encoded} # {self.fingerprint}"

    def verify(self, signature: bytes, message: bytes) -> bool:
        """True iff this member signed `message` (never raises)."""
        return signing.verify(self.public, signature, message)


def _parse_line(text: str, where: str) -> Member | None:
    """The member of one roster line, None for a blank or comment line."""
    body, _, comment = text.partition("#")
    fields = body.split()
    if not fields:
        return None
    if len(fields) != 3:
        raise ConsortiumError(f"{where}: expected 'NAME {KEY_TYPE} BASE64-KEY [# fingerprint]', "
                              f"got {len(fields)} field(s)")
    name, key_type, encoded = fields
    _check_name(name, where)
    if key_type != KEY_TYPE:
        raise ConsortiumError(f"{where}: key type {key_type!r} is not {KEY_TYPE}")
    try:
        public = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ConsortiumError(f"{where}: the public key of {name} is not valid base64") from None
    if len(public) != signing.PUBLIC_KEY_BYTES:
        raise ConsortiumError(f"{where}: the public key of {name} is {len(public)} bytes, "
                              f"not {signing.PUBLIC_KEY_BYTES}")
    member = Member(name, public)
    claimed = [t for t in comment.split() if t.startswith(signing.FINGERPRINT_PREFIX)]
    if claimed and claimed[0] != member.fingerprint:
        raise ConsortiumError(f"{where}: the fingerprint comment {claimed[0]} does not match "
                              f"the key of {name} ({member.fingerprint})")
    return member


def parse_members(text: str, source: str) -> list[Member]:
    """Every member line of a roster or .pub text; errors name `source` and the line."""
    members = []
    for number, line in enumerate(text.splitlines(), start=1):
        member = _parse_line(line, f"{source}:{number}")
        if member is not None:
            members.append(member)
    return members


class Roster:
    """The consortium's members, unique by name and by public key."""

    def __init__(self, members: Iterable[Member], source: str = "roster") -> None:
        self._by_name: dict[str, Member] = {}
        self._by_public: dict[bytes, Member] = {}
        for member in members:
            if member.name in self._by_name:
                raise ConsortiumError(f"{source}: member name {member.name} appears twice")
            if member.public in self._by_public:
                other = self._by_public[member.public].name
                raise ConsortiumError(f"{source}: {member.name} and {other} have the same key")
            self._by_name[member.name] = member
            self._by_public[member.public] = member
        if not self._by_name:
            raise ConsortiumError(f"{source}: the roster has no members")

    @classmethod
    def load(cls, path: Path) -> Roster:
        """Read a roster file; a malformed line raises ConsortiumError naming file and line."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConsortiumError(f"cannot read the roster {path}: {exc}") from exc
        return cls(parse_members(text, str(path)), str(path))

    @classmethod
    def from_public_files(cls, paths: Iterable[Path]) -> Roster:
        """A roster from members' NAME.pub files (each one or more roster lines)."""
        members: list[Member] = []
        for path in map(Path, paths):
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ConsortiumError(f"cannot read the public key file {path}: {exc}") from exc
            found = parse_members(text, str(path))
            if not found:
                raise ConsortiumError(f"{path}: no member line")
            members.extend(found)
        return cls(members, "the public key files")

    def save(self, path: Path) -> None:
        """Write the roster (sorted by name, with fingerprints); replaces the file atomically."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.text(), encoding="utf-8")
        os.replace(tmp, path)

    def text(self) -> str:
        """The roster file's content."""
        header = (f"# fedstack consortium roster: {len(self)} members, "
                  f"roster fingerprint {self.fingerprint}\n")
        return header + "".join(self._by_name[n].line() + "\n" for n in self.names)

    @property
    def names(self) -> tuple[str, ...]:
        """Member names, sorted."""
        return tuple(sorted(self._by_name))

    @property
    def fingerprint(self) -> str:
        """One value for the whole roster: members compare it to know they pin the same one."""
        canonical = signing.statement("consortium/roster",
                                      *(f"{n} {KEY_TYPE} {self._by_name[n].public.hex()}"
                                        for n in self.names))
        digest = hashlib.sha256(canonical).digest()
        return signing.FINGERPRINT_PREFIX + base64.b64encode(digest).decode().rstrip("=")

    def member(self, name: str) -> Member:
        """The member called `name` (KeyError if none)."""
        return self._by_name[name]

    def member_by_public(self, public: bytes) -> Member | None:
        """The member holding this raw public key, None for a stranger."""
        return self._by_public.get(bytes(public)) if isinstance(public, bytes | bytearray) \
            else None

    def __contains__(self, item: object) -> bool:
        """A Member (name AND key must match), a name, or a raw public key."""
        if isinstance(item, Member):
            return self._by_name.get(item.name) == item
        if isinstance(item, str):
            return item in self._by_name
        if isinstance(item, bytes | bytearray):
            return bytes(item) in self._by_public
        return False

    def __iter__(self) -> Iterator[Member]:
        return (self._by_name[n] for n in self.names)

    def __len__(self) -> int:
        return len(self._by_name)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Roster) and self._by_name == other._by_name

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def __repr__(self) -> str:
        return f"Roster({len(self)} members, {self.fingerprint})"


@dataclass(frozen=True, repr=False)
class Identity:
    """This node's member name and private signing key (the key never leaves the node)."""

    name: str
    key: Ed25519PrivateKey

    @property
    def public(self) -> bytes:
        return signing.public_bytes(self.key)

    @property
    def member(self) -> Member:
        return Member(self.name, self.public)

    @property
    def fingerprint(self) -> str:
        return signing.fingerprint(self.public)

    def sign(self, message: bytes) -> bytes:
        return signing.sign(self.key, message)

    def __repr__(self) -> str:
        return f"Identity({self.name}, {self.fingerprint})"

    @classmethod
    def load(cls, key_path: Path, roster: Roster, roster_source: str = "the roster") -> Identity:
        """The identity of a key file, named by the roster; refuse a key not in the roster."""
        try:
            key = signing.load_private_key(Path(key_path))
        except signing.SignatureError as exc:
            raise ConsortiumError(f"{IDENTITY_KEY_NODE_KEY}={key_path}: {exc}") from exc
        public = signing.public_bytes(key)
        member = roster.member_by_public(public)
        if member is None:
            raise ConsortiumError(f"{IDENTITY_KEY_NODE_KEY}={key_path}: its key "
                                  f"{signing.fingerprint(public)} is not in {roster_source}")
        return cls(member.name, key)


@dataclass(frozen=True)
class Consortium:
    """What a node signs with and whom it trusts; `pinned`: the roster is the node's own."""

    identity: Identity | None
    roster: Roster
    pinned: bool


def new_identity(name: str, out_dir: Path) -> tuple[Path, Path, Member]:
    """Create NAME.key (0600, never overwritten) and NAME.pub (its roster line) in out_dir."""
    _check_name(name, "identity")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
    key_path, pub_path = out_dir / f"{name}{KEY_SUFFIX}", out_dir / f"{name}{PUBLIC_SUFFIX}"
    for path in (key_path, pub_path):
        if path.exists():
            raise ConsortiumError(f"{path} already exists: refusing to replace an identity")
    key = signing.generate()
    signing.save_private_key(key, key_path)
    member = Member(name, signing.public_bytes(key))
    pub_path.write_text(member.line() + "\n", encoding="utf-8")
    return key_path, pub_path, member


# --------------------------------------------------------------------------- node config

_ROSTER_CACHE: dict[tuple, Roster] = {}


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip() == "")


def _load_roster_cached(path: Path) -> Roster:
    try:
        info = path.stat()
        stamp: tuple = (info.st_mtime_ns, info.st_size)
    except OSError:
        return Roster.load(path)  # raises the clear error
    key = (str(path), stamp)
    roster = _ROSTER_CACHE.get(key)
    if roster is None:
        roster = Roster.load(path)
        if len(_ROSTER_CACHE) > 16:
            _ROSTER_CACHE.clear()
        _ROSTER_CACHE[key] = roster
    return roster


def _node_path(node_config: Mapping[str, Any], key: str) -> Path | None:
    value = node_config.get(key)
    return None if _blank(value) else Path(str(value)).expanduser()


def node_roster(context: Any) -> Roster | None:
    """The roster pinned in this node's own config (`roster=`), None if it pins none."""
    path = _node_path(context.node_config, ROSTER_NODE_KEY)
    if path is None:
        return None
    try:
        return _load_roster_cached(path)
    except ConsortiumError as exc:
        raise ConsortiumError(f"node config {ROSTER_NODE_KEY}: {exc}") from exc


def node_identity(context: Any) -> Identity | None:
    """This node's identity (`identity-key=`), named by its own pinned roster.

    None if the node config sets no identity key; ConsortiumError if it sets one without a
    roster, or one whose key is not in the roster.
    """
    key_path = _node_path(context.node_config, IDENTITY_KEY_NODE_KEY)
    if key_path is None:
        return None
    roster = node_roster(context)
    if roster is None:
        raise ConsortiumError(f"node config sets {IDENTITY_KEY_NODE_KEY} but no "
                              f"{ROSTER_NODE_KEY}: pin the consortium roster too")
    return Identity.load(key_path, roster,
                         f"the node's roster {context.node_config[ROSTER_NODE_KEY]}")


def node_consortium(context: Any) -> Consortium | None:
    """The node's own pinned consortium, None if it pins no roster."""
    roster = node_roster(context)
    if roster is None:
        return None
    return Consortium(node_identity(context), roster, pinned=True)


def simulation_member_name(index: int) -> str:
    return SIMULATION_MEMBER.format(index=index)


def simulation_consortium(directory: Path, n: int) -> list[Path]:
    """Identities for n simulated partitions (`member-<i>.key`) and their `roster.txt`.

    Reuses a complete consortium already in `directory` (e.g. a restarted run); refuses a
    partial or mismatched one rather than mixing keys.
    """
    if n < 1:
        raise ConsortiumError(f"a consortium needs at least one member, not {n}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
    roster_path = directory / ROSTER_FILE_NAME
    key_paths = [directory / f"{simulation_member_name(i)}{KEY_SUFFIX}" for i in range(n)]
    if roster_path.exists():
        roster = Roster.load(roster_path)
        expected = {simulation_member_name(i) for i in range(n)}
        if set(roster.names) != expected:
            raise ConsortiumError(f"{roster_path} lists {len(roster)} members, not the "
                                  f"{n} simulated partitions: use a fresh directory")
        for i, path in enumerate(key_paths):
            if Identity.load(path, roster, str(roster_path)).name != simulation_member_name(i):
                raise ConsortiumError(f"{path} holds another member's key")
        return key_paths
    members = []
    for i, path in enumerate(key_paths):
        key = signing.generate()
        try:
            signing.save_private_key(key, path)
        except FileExistsError:
            raise ConsortiumError(f"{path} exists without {roster_path}: use a fresh "
                                  "directory") from None
        members.append(Member(simulation_member_name(i), signing.public_bytes(key)))
    Roster(members, str(roster_path)).save(roster_path)
    return key_paths


def consortium_for_unpinned_node(context: Any, proposed_dir: Path | None) -> Consortium | None:
    """The consortium this node uses in a run that proposes `proposed_dir`.

    A node that pins a roster uses only its own (it never reads key material the run
    proposes). A node that pins none trusts the run's: `proposed_dir/roster.txt` and the
    key of its partition, `proposed_dir/member-<partition-id>.key` (simulation only).
    None if the node pins nothing and the run proposes nothing.
    """
    own = node_consortium(context)
    if own is not None:
        return own
    if _node_path(context.node_config, IDENTITY_KEY_NODE_KEY) is not None:
        node_identity(context)  # raises: identity without a roster
    if proposed_dir is None:
        return None
    proposed_dir = Path(proposed_dir)
    partition = context.node_config.get(PARTITION_ID_KEY)
    if _blank(partition):
        raise ConsortiumError(f"node config has no {PARTITION_ID_KEY}: cannot pick this "
                              f"node's identity in the run's consortium {proposed_dir}")
    roster_path = proposed_dir / ROSTER_FILE_NAME
    roster = _load_roster_cached(roster_path)
    key_path = proposed_dir / f"{simulation_member_name(int(partition))}{KEY_SUFFIX}"
    identity = Identity.load(key_path, roster, f"the run's roster {roster_path}")
    return Consortium(identity, roster, pinned=False)
