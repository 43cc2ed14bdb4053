"""Consortium identities and rosters: strict files, pinned rosters win over the run's."""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fedstack import consortium as C
from fedstack.crypto import signing


@dataclass
class FakeContext:
    """What the consortium functions read of a Flower Context."""

    node_config: dict[str, Any] = field(default_factory=dict)


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("sim") / "consortium"
    C.simulation_consortium(directory, 3)
    return directory


@pytest.fixture()
def pinned(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Two members made with new_identity, their roster built from the .pub files."""
    alice_key, alice_pub, _ = C.new_identity("alice", tmp_path / "alice")
    _, bob_pub, _ = C.new_identity("bob", tmp_path / "bob")
    roster = tmp_path / "roster.txt"
    C.Roster.from_public_files([alice_pub, bob_pub]).save(roster)
    return alice_key, roster, bob_pub


def test_member_line_roundtrip_and_fingerprint():
    member = C.Member("hospital-a", signing.public_bytes(signing.generate()))
    [parsed] = C.parse_members(member.line(), "x")
    assert parsed == member
    assert member.line().endswith("# " + member.fingerprint)
    with pytest.raises(C.ConsortiumError):
        C.Member("has space", member.public)
    with pytest.raises(C.ConsortiumError):
        C.Member("ok", member.public[:31])


def test_roster_file_roundtrip_lookup_and_fingerprint(tmp_path, sim):
    roster = C.Roster.load(sim / C.ROSTER_FILE_NAME)
    assert len(roster) == 3 and roster.names == ("member-0", "member-1", "member-2")
    member = roster.member("member-1")
    assert member in roster and "member-1" in roster and member.public in roster
    assert C.Member("member-1", signing.public_bytes(signing.generate())) not in roster
    assert "stranger" not in roster and 42 not in roster
    assert roster.member_by_public(member.public) == member
    assert roster.member_by_public(b"\x00" * 32) is None
    copy = tmp_path / "copy.txt"
    roster.save(copy)
    assert C.Roster.load(copy) == roster
    assert C.Roster.load(copy).fingerprint == roster.fingerprint
    smaller = C.Roster([m for m in roster if m.name != "member-2"])
    assert smaller.fingerprint != roster.fingerprint
    # the roster fingerprint ignores line order, comments and blank lines
    shuffled = tmp_path / "shuffled.txt"
    shuffled.write_text("\n# a comment\n" + "\n".join(m.line().split("#")[0]
                                                    for m in reversed(list(roster))) + "\n")
    assert C.Roster.load(shuffled).fingerprint == roster.fingerprint


def _roster_text(sim: Path) -> list[str]:
    return (sim / C.ROSTER_FILE_NAME).read_text().splitlines()


@pytest.mark.parametrize("mutate, message", [
    (lambda line: line.replace("ed25519", "rsa"), "key type"),
    (lambda line: line.split("#")[0].replace("=", "") + "#", "base64"),
    (lambda line: line.split()[0] + " ed25519", "field"),
    (lambda line: "bad/name " + " ".join(line.split()[1:]), "member name"),
    (lambda line: " ".join(line.split()[:2]) + " " + base64.b64encode(b"x" * 31).decode(),
     "31 bytes"),
    (lambda line: line.split("#")[0] + "# SHA256:" + "A" * 43, "does not match"),
])
def test_malformed_roster_line_names_file_and_line(tmp_path, sim, mutate, message):
    lines = _roster_text(sim)
    assert lines[0].startswith("#")  # header comment: the first member is on line 2
    lines[2] = mutate(lines[2])
    path = tmp_path / "roster.txt"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(C.ConsortiumError, match=message) as err:
        C.Roster.load(path)
    assert f"{path}:3" in str(err.value)


def test_duplicate_names_keys_and_empty_rosters_are_refused(tmp_path, sim):
    lines = [ln for ln in _roster_text(sim) if not ln.startswith("#")]
    dup_key = tmp_path / "dup-key.txt"
    dup_key.write_text(lines[0] + "\n" + lines[0].replace("member-0", "member-9") + "\n")
    with pytest.raises(C.ConsortiumError, match="same key"):
        C.Roster.load(dup_key)
    dup_name = tmp_path / "dup-name.txt"
    dup_name.write_text(lines[0] + "\n" + lines[1].replace("member-1", "member-0") + "\n")
    with pytest.raises(C.ConsortiumError, match="appears twice"):
        C.Roster.load(dup_name)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nobody\n\n")
    with pytest.raises(C.ConsortiumError, match="no members"):
        C.Roster.load(empty)
    with pytest.raises(C.ConsortiumError, match="cannot read"):
        C.Roster.load(tmp_path / "absent.txt")


def test_new_identity_writes_private_key_and_public_line(tmp_path):
    key_path, pub_path, member = C.new_identity("alice", tmp_path / "out")
    assert oct(os.stat(key_path).st_mode & 0o777) == oct(signing.PRIVATE_KEY_MODE)
    assert signing.public_bytes(signing.load_private_key(key_path)) == member.public
    assert C.parse_members(pub_path.read_text(), "pub") == [member]
    assert "PRIVATE" not in pub_path.read_text()
    with pytest.raises(C.ConsortiumError, match="already exists"):
        C.new_identity("alice", tmp_path / "out")


def test_identity_signs_as_its_roster_member(pinned):
    key_path, roster_path, _ = pinned
    roster = C.Roster.load(roster_path)
    identity = C.Identity.load(key_path, roster)
    assert identity.name == "alice" and identity.member == roster.member("alice")
    msg = signing.statement("test", 1)
    assert roster.member("alice").verify(identity.sign(msg), msg)
    assert not roster.member("bob").verify(identity.sign(msg), msg)
    assert "PRIVATE" not in repr(identity) and identity.fingerprint in repr(identity)


def test_node_identity_and_roster_from_node_config(pinned):
    key_path, roster_path, _ = pinned
    ctx = FakeContext({C.IDENTITY_KEY_NODE_KEY: str(key_path), C.ROSTER_NODE_KEY: str(roster_path)})
    identity = C.node_identity(ctx)
    assert identity is not None and identity.name == "alice"
    assert C.node_roster(ctx) == C.Roster.load(roster_path)
    assert C.node_identity(FakeContext()) is None and C.node_roster(FakeContext()) is None
    with pytest.raises(C.ConsortiumError, match="no roster"):
        C.node_identity(FakeContext({C.IDENTITY_KEY_NODE_KEY: str(key_path)}))


def test_identity_not_in_own_roster_is_refused(tmp_path, pinned):
    _, roster_path, _ = pinned
    carol_key, _, _ = C.new_identity("carol", tmp_path / "carol")
    ctx = FakeContext({C.IDENTITY_KEY_NODE_KEY: str(carol_key),
                       C.ROSTER_NODE_KEY: str(roster_path)})
    with pytest.raises(C.ConsortiumError, match="not in the node's roster"):
        C.node_identity(ctx)


def test_simulation_consortium_is_complete_and_reusable(sim):
    keys = C.simulation_consortium(sim, 3)  # a restart reuses the same keys
    roster = C.Roster.load(sim / C.ROSTER_FILE_NAME)
    for i, path in enumerate(keys):
        assert C.Identity.load(path, roster).name == f"member-{i}"
    with pytest.raises(C.ConsortiumError, match="not the 4 simulated"):
        C.simulation_consortium(sim, 4)


def test_partial_simulation_directory_is_refused(tmp_path):
    signing.save_private_key(signing.generate(), tmp_path / "member-1.key")
    with pytest.raises(C.ConsortiumError, match="fresh directory"):
        C.simulation_consortium(tmp_path, 3)


def test_unpinned_node_trusts_the_runs_consortium(sim):
    ctx = FakeContext({"partition-id": 2})
    found = C.consortium_for_unpinned_node(ctx, sim)
    assert found is not None and not found.pinned
    assert found.identity is not None and found.identity.name == "member-2"
    assert found.roster == C.Roster.load(sim / C.ROSTER_FILE_NAME)
    assert C.consortium_for_unpinned_node(ctx, None) is None
    with pytest.raises(C.ConsortiumError, match="partition-id"):
        C.consortium_for_unpinned_node(FakeContext(), sim)


def test_pinned_node_never_reads_the_runs_key_material(pinned, sim, tmp_path):
    key_path, roster_path, _ = pinned
    ctx = FakeContext({"partition-id": 0, C.IDENTITY_KEY_NODE_KEY: str(key_path),
                       C.ROSTER_NODE_KEY: str(roster_path)})
    # the run proposes a directory whose roster would add the server's own members
    found = C.consortium_for_unpinned_node(ctx, sim)
    assert found is not None and found.pinned
    assert found.roster.names == ("alice", "bob")
    assert found.identity is not None and found.identity.name == "alice"
    # a proposed directory that does not even exist is never touched
    assert C.consortium_for_unpinned_node(ctx, tmp_path / "nowhere").roster.names == \
        ("alice", "bob")


def test_cli_identity_roster_build_and_show(tmp_path, capsys):
    from fedstack.consortium_cli import identity_main, roster_main

    assert identity_main(["new", "alice", "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert identity_main(["new", "bob", "--out", str(tmp_path / "b")]) == 0
    alice = C.parse_members((tmp_path / "a" / "alice.pub").read_text(), "alice.pub")[0]
    alice_fp = alice.fingerprint
    assert alice_fp in out and "PRIVATE" not in out
    roster_path = tmp_path / "roster.txt"
    pubs = [str(tmp_path / "a" / "alice.pub"), str(tmp_path / "b" / "bob.pub")]
    assert roster_main(["build", *pubs, "--out", str(roster_path)]) == 0
    roster = C.Roster.load(roster_path)
    assert roster.names == ("alice", "bob") and roster.member("alice") == alice
    capsys.readouterr()
    assert roster_main(["show", str(roster_path)]) == 0
    shown = capsys.readouterr().out
    assert alice_fp in shown and roster.fingerprint in shown
    # refusals: an existing roster, a duplicate member, an existing identity
    assert roster_main(["build", *pubs, "--out", str(roster_path)]) == 2
    assert roster_main(["build", pubs[0], pubs[0], "--out", str(tmp_path / "r2.txt")]) == 2
    assert identity_main(["new", "alice", "--out", str(tmp_path / "a")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_local_deployment_pins_one_roster_for_its_supernodes(tmp_path):
    from fedstack.deploy.local import LocalDeployment, _parse_run_config, render_node_config
    from fedstack.policy import node_policy

    dep = LocalDeployment(tmp_path, num_supernodes=3, node_config={1: {"min-cohort": 4}})
    try:
        configs = dep.initial_node_configs()
        again = dep.initial_node_configs()  # a restart reuses the same identities
    finally:
        dep.close()
    assert configs == again
    names = []
    for index, node_config in enumerate(configs):
        parsed = _parse_run_config(render_node_config(node_config))  # as the SuperNode sees it
        assert parsed["partition-id"] == index
        ctx = FakeContext(parsed)
        identity, roster = C.node_identity(ctx), C.node_roster(ctx)
        assert identity is not None and roster is not None and len(roster) == 3
        names.append(identity.name)
        assert node_policy(ctx).require_signatures  # pinned: malicious secagg required
    assert sorted(names) == ["supernode-0", "supernode-1", "supernode-2"]
    assert configs[1]["min-cohort"] == 4 and len({c["roster"] for c in configs}) == 1
    plain = LocalDeployment(tmp_path / "plain", consortium=False, require_signatures=False)
    try:
        config = plain.initial_node_configs()[0]
    finally:
        plain.close()
    assert "roster" not in config and config["require-signatures"] is False
