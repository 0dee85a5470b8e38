"""Moving a trial's slot from a host that is behind to one that idles.

A trial stays on the host it first attached to, and its stack with it. The
work of a sweep does not stay spread that way: ASHA stops most trials at the
first rung, and which ones depends on their results, not on their host. In
the ported LSTM sweep of ``benchmarks/ported_sweeps.py`` (2 cores, two hosts)
one host computed 84% of the time while the other had stopped trials left
and computed 20-54%: a core idled while trials waited for the other one.

So the registry looks at its hosts once a second (:meth:`HostRegistry._balance`)
and, where one host computes nearly all the time with several slots more
than another that idles with room, asks the busy host to hand half the
difference over. Each move is a pause and a restore that Tune never sees:

1. the donor marks the slot (:meth:`SlotHost.release`); the slot finishes the
   iteration it is in and then steps no more, so no run-ahead work is lost;
2. once the trial took every finished result, its next ``step()`` gets, instead
   of a result, the slot's state at that boundary (the bytes a checkpoint holds)
   and the receiving host's name;
3. the trial's process attaches there (:meth:`SlotClient._move`), loads the
   state and asks again.

The slot continues from the very state Tune knows, so its results are the
ones it would have reported on the donor: bit for bit for models whose
gathers are exact (see :mod:`ray_modelbatch.slot_group`), to float rounding
for the others, as when a stack grows or compacts.

A host moves its own slots the same way, to itself: when a wider model of a
family makes a new (padded) stack, the narrower trials that came before it
move from their stacks of one into it (:meth:`SlotHost._gather_into`).

This module is the decision alone, pure functions of what the hosts report
(:func:`plan_move`, :func:`pick_slots`), so that it can be tested without Ray.
One plan at a time in the whole sweep: the next is made only after the last
one's slots landed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

DONOR_BUSY = 0.8  # a host that computed at least this share of the last window is behind its slots
RECEIVER_BUSY = 0.5  # ... and one that computed at most this share has a core to spare


@dataclass(frozen=True)
class HostLoad:
    """What a host reports to the registry (:meth:`SlotHost.load`)."""

    name: str
    busy: float  # share of the window since its last report that the host computed
    held: int  # slots held by trials (or reserved for them), not counting those on their way out
    free: int  # slots it could still give to trials
    moving: int = 0  # slots marked to move, not gone yet
    stacks: Mapping[str, int] = field(default_factory=dict)  # stack key -> slots held


@dataclass(frozen=True)
class Move:
    donor: str
    receiver: str
    count: int  # slots to move: half the difference in held slots, as many as the receiver has room for
    stacks: tuple[str, ...]  # the receiver's stacks: a slot of one of these joins it there


def plan_move(loads: Sequence[HostLoad]) -> Move | None:
    """The move that most evens the hosts' work now, or None.

    A donor computed at least :data:`DONOR_BUSY` of its window and holds at
    least two slots; a receiver computed at most :data:`RECEIVER_BUSY` and has
    a free slot; the donor must hold at least two slots more than the receiver,
    and half the difference moves (so a slot never moves back and forth). Of
    several pairs, the one with the largest difference in held slots. Nothing
    moves while an earlier move is under way.
    """
    if any(h.moving for h in loads):
        return None
    best: tuple[tuple[int, float], Move] | None = None
    for d in loads:
        if d.busy < DONOR_BUSY or d.held < 2:
            continue
        for r in loads:
            if r is d or r.busy > RECEIVER_BUSY or r.free < 1 or d.held - r.held < 2:
                continue
            score = (d.held - r.held, d.busy - r.busy)
            if best is None or score > best[0]:
                count = min((d.held - r.held) // 2, r.free)
                best = (score, Move(d.name, r.name, count, tuple(sorted(k for k, n in r.stacks.items() if n))))
    return None if best is None else best[1]


def pick_slots(stacks: Mapping[str, Sequence[str]], receiver_stacks: Sequence[str], count: int) -> list[str]:
    """Which of a donor's trials move: ``stacks`` maps each stack key to its held (not moving) trials.

    One at a time: first a trial whose stack the receiver has, counting the
    stacks of the trials picked before it (so they join it there and fuse at
    once); then one alone in its stack (the donor saves that stack's whole
    fused step); then one from the donor's largest stack (its step loses one
    row of many). Ties go to the stack listed first.
    """
    left = {key: list(trials) for key, trials in stacks.items() if trials}
    wanted = set(receiver_stacks)
    picked: list[str] = []
    while left and len(picked) < count:
        key = next((k for k in left if k in wanted), None) \
            or next((k for k, trials in left.items() if len(trials) == 1), None) \
            or max(left, key=lambda k: len(left[k]))
        picked.append(left[key].pop())
        wanted.add(key)
        if not left[key]:
            del left[key]
    return picked


MOVE_KEY = "__ray_modelbatch_move__"  # a step() answer that is a move, not a result (never reaches Tune)


def is_move(answer: object) -> bool:
    return isinstance(answer, dict) and MOVE_KEY in answer
