"""Find the reply that spoiled an encrypted aggregate by testing sums of groups of replies.

The server cannot decrypt, so it asks clients ("testers") to decrypt sums of groups of the
round's replies and answer one bit: does the sum pass the aggregate checks (`ckks.decrypt_mean`:
check slots, weight and value bounds)? Those checks are closed under disjoint union, so with
honest testers a group fails exactly when it contains a bad reply ("culprit"):
- a passing group clears all its members;
- a failing group whose members are all cleared but one convicts that one.

Privacy rules (enforced here when planning, and again by every client before it decrypts):
- a group has at least `MIN_GROUP_SIZE` (2) replies and never contains the tester's own;
- what a tester knows afterwards -- its own reply, the sum of every reply of the round
  (assumed known, conservatively: a sum that fails only its value bounds still decrypts to
  meaningful numbers) and the sum of each group it decrypted -- must not determine any other
  single reply. This is checked exactly (rational elimination over the indicator vectors), so
  it covers "two groups that differ by one reply" and every other linear combination.
Honest testers learn sums of >= 2 updates of a round whose model was discarded; the server
learns one bit per group.

Plan (few exchanges, each exchange tests its groups in parallel, one group per tester):
1. partition the replies into blocks of about sqrt(m) (at least 2) and test each block with a
   tester outside it (a block no tester may safely decrypt is left for later);
2. each reply still undetermined is tested together with already-cleared replies (a passing
   block as padding): pass clears it, fail convicts it;
3. one more exchange for answers that did not come back.
When nothing is cleared yet and no block can be tested, each participant tests the sum of all
replies but its own (what any client learns from an ordinary aggregate). Identification needs
at least 3 replies; the search gives up (outcome "unresolved") rather than break the rules.
Testers are preferred in this order: those that never left a test unanswered; cleared
participants, clients without a reply in the round, undetermined participants; those that
tested least. A tester that lies
can keep a culprit hidden or leave an honest reply undetermined, but never convicts an honest
reply while the other answers are honest; contradicted answers are reported.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Literal

#: Smallest group a tester may decrypt.
MIN_GROUP_SIZE = 2
#: Exchanges one search may use (blocks, padded singles, one retry).
MAX_SEARCH_EXCHANGES = 3

Outcome = Literal["identified", "partial", "cleared", "unresolved"]


def _reduced_basis(vectors: Iterable[Sequence[int]]) -> list[tuple[int, list[Fraction]]]:
    """Reduced row-echelon basis (pivot column, row) of the given 0/1 vectors, exactly."""
    rows: list[tuple[int, list[Fraction]]] = []
    for vector in vectors:
        v = [Fraction(x) for x in vector]
        for pivot, row in rows:
            if v[pivot]:
                f = v[pivot]
                v = [a - f * b for a, b in zip(v, row, strict=True)]
        lead = next((i for i, x in enumerate(v) if x), None)
        if lead is None:
            continue
        f = v[lead]
        v = [x / f for x in v]
        reduced = []
        for pivot, row in rows:
            if row[lead]:
                g = row[lead]
                row = [a - g * b for a, b in zip(row, v, strict=True)]
            reduced.append((pivot, row))
        rows = [*reduced, (lead, v)]
    return rows


def isolated_reply(tester: int, replies: Sequence[int],
                   groups: Iterable[Iterable[int]]) -> int | None:
    """A reply other than the tester's own that its knowledge determines, else None.

    Knowledge: the tester's own reply (if it is one of `replies`), the sum of all `replies`,
    and the sum of each of `groups`. A single reply e_i is determined iff e_i lies in the span
    of those indicator vectors. Every such vector is constant on the "atoms" (replies that
    belong to exactly the same vectors), so e_i can only be in the span if its atom is {i},
    and then iff the atom's indicator is in the span of the vectors written over atoms: a
    handful of columns, reduced exactly.
    """
    sets = [frozenset(replies)]
    if tester in sets[0]:
        sets.append(frozenset([tester]))
    sets.extend(frozenset(g) for g in groups)
    atoms: dict[tuple[bool, ...], list[int]] = {}
    for node in replies:
        atoms.setdefault(tuple(node in s for s in sets), []).append(node)
    signatures = list(atoms)
    vectors = [[int(sig[k]) for sig in signatures] for k in range(len(sets))]
    for _pivot, row in _reduced_basis(vectors):
        nonzero = [i for i, x in enumerate(row) if x]
        if len(nonzero) == 1:
            members = atoms[signatures[nonzero[0]]]
            if len(members) == 1 and members[0] != tester:
                return members[0]
    return None


def group_violation(tester: int, members: Sequence[int], replies: Sequence[int],
                    seen: Iterable[Iterable[int]]) -> str | None:
    """Why `tester` must not decrypt the sum of `members` (a fixed sentence), else None."""
    if len(set(members)) != len(members) or not set(members) <= set(replies):
        return "the group is not a set of the round's replies"
    if len(members) < MIN_GROUP_SIZE:
        return f"the group has fewer than {MIN_GROUP_SIZE} replies"
    if tester in members:
        return "the group contains this node's own reply"
    if isolated_reply(tester, replies, [*seen, members]) is not None:
        return ("with this node's own reply, the round's total and the groups it already "
                "tested, this group would reveal a single reply")
    return None


@dataclass
class GroupTest:
    """One group sum sent to one tester, and its answer (None: no usable answer)."""

    members: tuple[int, ...]
    tester: int
    exchange: int
    ok: bool | None = None

    def to_json(self) -> dict[str, Any]:
        return {"exchange": self.exchange, "tester": self.tester,
                "members": list(self.members), "ok": self.ok}


@dataclass
class CulpritSearch:
    """Adaptive group testing over one round's replies (no Flower, no crypto here)."""

    #: Node ids whose replies were summed into the bad aggregate.
    replies: tuple[int, ...]
    #: Nodes that may test, in the caller's order (e.g. seeded); culprits never test.
    testers: tuple[int, ...]
    max_exchanges: int = MAX_SEARCH_EXCHANGES
    tests: list[GroupTest] = field(default_factory=list)
    cleared: set[int] = field(default_factory=set)
    culprits: set[int] = field(default_factory=set)
    exchanges: int = 0

    # ------------------------------------------------------------------ state

    @property
    def undetermined(self) -> list[int]:
        return [r for r in self.replies if r not in self.cleared and r not in self.culprits]

    def seen_by(self, tester: int) -> list[tuple[int, ...]]:
        return [t.members for t in self.tests if t.tester == tester]

    def contradicted(self) -> list[GroupTest]:
        """Failing answers about groups whose members all turned out cleared (a lie, or a
        reply that is only bad together with another)."""
        return [t for t in self.tests if t.ok is False and set(t.members) <= self.cleared]

    def outcome(self) -> Outcome:
        if self.culprits:
            return "identified" if not self.undetermined else "partial"
        return "cleared" if not self.undetermined else "unresolved"

    def record(self, test: GroupTest, ok: bool | None) -> None:
        """Note a tester's answer (None when it sent none or refused)."""
        test.ok = ok
        if ok:
            self.cleared.update(test.members)
            self.culprits.difference_update(test.members)
        self._convict()

    def _convict(self) -> None:
        for test in self.tests:
            if test.ok is False:
                left = [r for r in test.members if r not in self.cleared]
                if len(left) == 1:
                    self.culprits.add(left[0])

    # ------------------------------------------------------------------ planning

    def plan(self) -> list[GroupTest]:
        """The next exchange's tests ([] when done, out of exchanges or nothing is allowed)."""
        pending = self.undetermined
        if not pending or self.exchanges >= self.max_exchanges or len(self.replies) < 3:
            return []
        busy: set[int] = set()
        planned: list[GroupTest] = []
        if self.cleared:
            for reply in pending:
                test = self._padded(reply, busy)
                if test is not None:
                    planned.append(test)
        else:
            planned = self._blocks(pending, busy)
            if not planned:
                planned = self._leave_one_out(busy)
        if planned:
            self.exchanges += 1
            for test in planned:
                test.exchange = self.exchanges
            self.tests.extend(planned)
        return planned

    def _tester_order(self, busy: set[int]) -> list[int]:
        """Candidate testers: those that answered before; then cleared participants,
        outsiders, undetermined participants; then those that tested least."""
        in_round = set(self.replies)

        def rank(node: int) -> tuple[int, int, int]:
            cls = 0 if node in self.cleared else (1 if node not in in_round else 2)
            silent = sum(1 for t in self.tests if t.tester == node and t.ok is None)
            return silent, cls, len(self.seen_by(node))

        usable = [t for t in self.testers if t not in busy and t not in self.culprits]
        return sorted(usable, key=rank)  # stable: keeps the caller's order within a rank

    def _assign(self, members: tuple[int, ...], busy: set[int]) -> GroupTest | None:
        for tester in self._tester_order(busy):
            if group_violation(tester, members, self.replies, self.seen_by(tester)) is None:
                busy.add(tester)
                return GroupTest(members, tester, 0)
        return None

    def _blocks(self, pending: list[int], busy: set[int]) -> list[GroupTest]:
        """Disjoint blocks of about sqrt(len) pending replies (another partition later)."""
        size = max(MIN_GROUP_SIZE, math.isqrt(len(pending)))
        count = len(pending) // size
        if count < 2 and len(pending) == len(self.replies):
            return []  # one block would be the whole (known bad) sum
        if count < 1:
            return []
        if self.exchanges == 0:  # contiguous blocks
            cuts = [round(i * len(pending) / count) for i in range(count + 1)]
            blocks = [pending[cuts[i]:cuts[i + 1]] for i in range(count)]
        else:  # a different partition: interleaved, rotated per exchange
            shift = self.exchanges % len(pending)
            order = pending[shift:] + pending[:shift]
            blocks = [order[i::count] for i in range(count)]
        planned = []
        for block in blocks:
            test = self._assign(tuple(sorted(block)), busy)
            if test is not None:
                planned.append(test)
        return planned

    def _leave_one_out(self, busy: set[int]) -> list[GroupTest]:
        """Each participant tests the sum of every reply but its own (never seen before)."""
        planned = []
        for tester in self._tester_order(busy):
            if tester not in self.replies:
                continue
            members = tuple(r for r in self.replies if r != tester)
            if members in self.seen_by(tester):
                continue
            if group_violation(tester, members, self.replies, self.seen_by(tester)) is None:
                busy.add(tester)
                planned.append(GroupTest(members, tester, 0))
        return planned

    def _padded(self, reply: int, busy: set[int]) -> GroupTest | None:
        """`reply` plus cleared padding: a passing block first (largest), else one reply."""
        blocks = sorted({t.members for t in self.tests if t.ok and reply not in t.members},
                        key=lambda m: (-len(m), m))
        singles = [(r,) for r in self.replies if r in self.cleared and r != reply]
        for padding in [*blocks, *singles]:
            test = self._assign(tuple(sorted((reply, *padding))), busy)
            if test is not None:
                return test
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome(),
            "exchanges": self.exchanges,
            "culprits": sorted(self.culprits),
            "undetermined": self.undetermined,
            "tests": [t.to_json() for t in self.tests],
            "contradicted": [t.to_json() for t in self.contradicted()],
        }
