"""data() may return a factory of iterables: each slot iterates factory(seed, epoch), epoch after epoch."""

from __future__ import annotations

import copy
import io
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ray_modelbatch import optim
from ray_modelbatch.data import resolve_steps_per_report, sweep_inputs
from ray_modelbatch.dataset_streams import DatasetInputs, DatasetStreams, per_slot_streams
from ray_modelbatch.iterable_streams import IterableStreams
from ray_modelbatch.slot_group import SlotGroup, stack_key
from ray_modelbatch.tune.spec import SlotSpec

N, B, D = 70, 8, 3  # 8 full batches per epoch, and a partial one of 6 rows when not dropped
_g = torch.Generator().manual_seed(0)
X = torch.randn(N, D, generator=_g)
Y = torch.randint(0, 4, (N,), generator=_g)


def loaders(seed: int, epoch: int, batch_size: int = B, drop_last: bool = True) -> DataLoader:
    """The typical factory: a shuffled DataLoader seeded from (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    return DataLoader(TensorDataset(X, Y), batch_size=batch_size, shuffle=True, generator=g, drop_last=drop_last)


def shards(seed: int, epoch: int):
    """A generator pipeline (no len): noisy rows in a seeded order, ending with a partial batch."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    perm = torch.randperm(N, generator=g)
    for k in range(0, N, B):
        rows = perm[k:k + B]
        yield X[rows] + 0.01 * torch.randn(len(rows), D, generator=g), Y[rows]


class Counting:
    """A factory that counts its calls: a replay is a call."""

    def __init__(self, factory):
        self.factory, self.calls = factory, 0

    def __call__(self, seed, epoch):
        self.calls += 1
        return self.factory(seed, epoch)


def by_hand(factory, seed: int, steps: int, batch_size: int = B) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``steps`` full batches of factory(seed, 0), factory(seed, 1), ...: what a solo loop sees."""
    out = []
    for epoch in itertools.count():
        for x, y in factory(seed, epoch):
            if x.shape[0] == batch_size:
                out.append((x, y))
                if len(out) == steps:
                    return out


def take(streams, slots, steps, skip=None):
    return [streams.next_batch(slots, skip) for _ in range(steps)]


def rows_of(batches, j):
    return [(x[j], y[j]) for x, y in batches]


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(p, q) for u, v in zip(a, b) for p, q in zip(u, v))


@pytest.mark.parametrize("factory", [loaders, shards], ids=["dataloader", "generator"])
def test_a_slot_sees_factory_seed_epoch_batches_in_order_and_seeds_differ(factory):
    streams = IterableStreams(factory, B, [3, 4])
    got = take(streams, [0, 1], 20)  # two epoch boundaries (8 full batches per epoch)
    assert got[0][0].shape == (2, B, D) and got[0][1].shape == (2, B)
    assert same(rows_of(got, 0), by_hand(factory, 3, 20))
    assert same(rows_of(got, 1), by_hand(factory, 4, 20))
    assert not same(rows_of(got, 0), rows_of(got, 1))
    assert streams.slots[0].position() == (3, 2, 4)


def test_partial_batches_are_skipped_and_epoch_lengths_come_from_len():
    streams = IterableStreams(shards, B, [1])
    take(streams, [0], 17)  # into the third epoch: two partial batches passed
    assert streams.skipped == 2
    with pytest.raises(TypeError, match="steps_per_report as an int") as info:
        streams.steps_per_epoch()  # a generator has no len()
    assert "\n" not in str(info.value) and streams.num_examples is None
    with pytest.raises(ValueError, match="int") as info:
        resolve_steps_per_report("epoch", streams.num_examples, B)
    assert "\n" not in str(info.value) and resolve_steps_per_report(5, streams.num_examples, B) == 5

    dropped = IterableStreams(loaders, B, [1])
    assert dropped.steps_per_epoch() == N // B == dropped.steps_per_epoch(0)
    assert resolve_steps_per_report("epoch", dropped.num_examples, B) == N // B
    kept = IterableStreams(lambda s, e: loaders(s, e, drop_last=False), B, [1])
    assert len(loaders(1, 0, drop_last=False)) == N // B + 1 and kept.steps_per_epoch() == N // B
    assert same(rows_of(take(kept, [0], 10), 0), by_hand(kept.factory, 1, 10)) and kept.skipped == 1

    with pytest.raises(ValueError, match="batch_size 16") as info:
        IterableStreams(lambda s, e: loaders(s, e, batch_size=16), B, [1]).steps_per_epoch()
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="no batch of batch_size 8") as info:
        IterableStreams(lambda s, e: loaders(s, e, batch_size=16), B, [1]).next_batch([0])
    assert "\n" not in str(info.value)


def test_capture_and_restore_replay_the_same_batches_mid_epoch_and_across_an_epoch_boundary():
    factory = Counting(loaders)
    streams = IterableStreams(factory, B, [5, 6])
    take(streams, [0, 1], 3)
    mid = streams.capture_slot(0)
    ahead = take(streams, [0], 7)  # crosses the boundary after batch 8
    assert streams.slots[0].epoch == 1
    streams.restore_slot(0, mid)
    assert same(take(streams, [0], 7), ahead)
    streams.restore_slot(0, mid)
    take(streams, [0], 5)
    end = streams.capture_slot(0)
    assert end == (5, 0, 8)  # the last batch of epoch 0 was taken; epoch 1 starts on the next step
    take(streams, [0], 3)
    assert streams.slots[0].position() == (5, 1, 3)
    streams.restore_slot(0, end)
    assert same(take(streams, [0], 2), ahead[5:])

    # restoring to where the slot is keeps its live iterator; looking at an old position and putting the live one
    # back (an export of an earlier boundary) replays nothing
    live, cursor, calls = streams.capture_slot(0), streams.slots[0].cursor, factory.calls
    assert live == (5, 1, 2)  # batch 8 + 2 of the stream
    streams.restore_slot(0, mid)
    assert streams.slot_state(0) == {"seed": 5, "epoch": 0, "taken": 3, "batch_size": B}
    streams.restore_slot(0, live)
    nxt = take(streams, [0], 1)
    assert streams.slots[0].cursor is cursor and factory.calls == calls
    assert same(nxt, [(x[None], y[None]) for x, y in by_hand(loaders, 5, 11)[10:]])
    # slot 1 never moved while slot 0 went back and forth
    assert same(rows_of(take(streams, [1], 2), 0), by_hand(loaders, 6, 5)[3:])


def test_slot_state_round_trips_through_a_weights_only_checkpoint():
    a = IterableStreams(shards, B, [7, 8])
    take(a, [0, 1], 11)
    buf = io.BytesIO()
    torch.save({"stream": a.slot_state(0)}, buf)
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)["stream"]
    assert state == {"seed": 7, "epoch": 1, "taken": 3, "batch_size": B}
    assert all(type(v) is int for v in state.values())
    b = IterableStreams(shards, B, [0, 0])
    b.load_slot_state(1, state)
    assert same(rows_of(take(b, [1], 9), 0), rows_of(take(a, [0], 9), 0))
    whole = IterableStreams(shards, B, [0, 0])
    whole.load_state_dict(a.state_dict())
    assert same(take(whole, [0, 1], 2), take(a, [0, 1], 2))

    with pytest.raises(ValueError, match="not an iterable stream state") as info:
        b.load_slot_state(0, DatasetStreams(TensorDataset(X, Y), B, [1]).slot_state(0))
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="batch_size"):
        IterableStreams(shards, 4, [0]).load_slot_state(0, state)


def test_skipped_rows_do_not_advance_and_repeat_a_live_slots_rows():
    streams = IterableStreams(loaders, B, [1, 2, 3])
    x, y = streams.next_batch([0, 1, 2], skip=[True, False, True])
    assert torch.equal(x[0], x[1]) and torch.equal(x[2], x[1]) and torch.equal(y[0], y[1])
    assert streams.slots[0].position() == (1, 0, 0) and streams.slots[2].position() == (3, 0, 0)
    fx, fy = streams.next_batch([0, 2], skip=[True, True])  # no slot runs: a fixed filler batch
    assert fx.shape == (2, B, D) and fy.shape == (2, B)
    assert [s.position()[1:] for s in streams.slots] == [(0, 0), (0, 1), (0, 0)]
    got = take(streams, [0, 1, 2], 2)
    assert same(rows_of(got, 0), by_hand(loaders, 1, 2))
    assert same(rows_of(got, 1), by_hand(loaders, 2, 3)[1:])
    assert same(rows_of(got, 2), by_hand(loaders, 3, 2))
    assert streams.next_batch([])[0].shape == (0, B, D)


def test_resize_keeps_slots_and_new_slots_need_a_reset():
    streams = IterableStreams(loaders, B, [1, 2, 3])
    take(streams, [0, 1, 2], 2)
    streams.resize(4, keep=[2, 0])
    assert streams.num_slots == 4 and streams.slots[2] is None
    assert same(rows_of(take(streams, [0, 1], 2), 0), by_hand(loaders, 3, 4)[2:])
    with pytest.raises(RuntimeError, match="reset_slot"):
        streams.next_batch([3])
    streams.reset_slot(3, 9)
    assert same(rows_of(take(streams, [3], 2), 0), by_hand(loaders, 9, 2))
    with pytest.raises(ValueError, match="inside"):
        streams.reset_slot(3, 9, torch.arange(4))


def test_sweep_inputs_accepts_a_factory_and_per_slot_streams_builds_iterable_streams():
    got = sweep_inputs({"train": loaders, "val": (X[:10], Y[:10])})
    assert isinstance(got, DatasetInputs) and got.iterable and got.train is loaders
    assert torch.equal(got.x_val, X[:10]) and got.transform is None
    streams = per_slot_streams(got, B, [4])
    assert isinstance(streams, IterableStreams) and streams.per_slot and streams.device == torch.device("cpu")
    assert same(rows_of(take(streams, [0], 3), 0), by_hand(loaders, 4, 3))
    got = sweep_inputs({"train": shards, "val": TensorDataset(X[:5], Y[:5])})
    assert got.iterable and got.y_val.tolist() == Y[:5].tolist()
    # the older dataset form is unchanged: five fields, iterable False
    assert not sweep_inputs({"train": TensorDataset(X, Y), "val": (X[:5], Y[:5])}).iterable


@pytest.mark.parametrize("items, match", [
    ({"train": lambda s, e: 3, "val": (X[:5], Y[:5])}, "returned a int .* not an iterable"),
    ({"train": lambda s, e: X, "val": (X[:5], Y[:5])}, "returned a Tensor"),
    ({"train": lambda: [], "val": (X[:5], Y[:5])}, r"factory\(seed, epoch\)"),
    ({"train": lambda s, e: [], "val": (X[:5], Y[:5])}, "gave no batch"),
    ({"train": lambda s, e: [X[:B]], "val": (X[:5], Y[:5])}, "Tensor; each batch must be"),
    ({"train": loaders, "val": (torch.randn(5, 4), Y[:5])}, "same features"),
    ({"train": loaders, "val": (X[:5], Y[:5]), "transform": lambda x: x}, "augment inside"),
    ({"train": loaders}, "no 'val'"),
])
def test_sweep_inputs_rejects_a_bad_factory_in_one_line(items, match):
    with pytest.raises((ValueError, TypeError), match=match) as info:
        sweep_inputs(items)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------ end to end
def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(D, 8), nn.ReLU(), nn.Linear(8, 4))


def _spec(steps_per_report) -> SlotSpec:
    return SlotSpec(model=lambda c: None, optimizer=optim.SGD, hparams=lambda c: {}, loss=F.cross_entropy,
                    data=lambda: None, batch_size=B, steps_per_report=steps_per_report)


SEEDS, LRS = [11, 12, 13], [0.1, 0.05, 0.02]


def _group(steps_per_report, run_ahead=0, factory=loaders):
    data = sweep_inputs({"train": factory, "val": (X[:20], Y[:20])}, "cpu")
    torch.manual_seed(0)
    models = [_model() for _ in SEEDS]
    group = SlotGroup(_spec(steps_per_report), stack_key(models[0]), models[0], data, 4, "cpu",
                      run_ahead=run_ahead)
    slots = [group.add(f"t{i}", m, seed=s, hparams={"lr": lr}) for i, (m, s, lr) in enumerate(zip(models, SEEDS, LRS))]
    return group, slots, models


def _solo(model, seed, lr, steps) -> nn.Module:
    solo = copy.deepcopy(model)
    opt = torch.optim.SGD(solo.parameters(), lr=lr)
    for xb, yb in by_hand(loaders, seed, steps):
        opt.zero_grad()
        F.cross_entropy(solo(xb), yb).backward()
        opt.step()
    return solo


def _params(group, slot):
    return [p.detach().clone() for p in group.mb.slot_module(slot, _model()).parameters()]


def test_a_group_on_the_iterable_form_equals_solo_sgd_loops_and_a_rollback_replays_exactly():
    group, slots, models = _group("epoch")
    assert group.steps_per_report == N // B
    results = []
    for _ in range(2):  # two epochs, one report each
        done = []
        for _ in range(group.steps_per_report):
            done = group.step(slots) or done
        assert sorted(done) == slots
        results.append(group.finish(done))
    for i, s in enumerate(slots):
        solo = _solo(models[i], SEEDS[i], LRS[i], 2 * group.steps_per_report)
        for a, b in zip(_params(group, s), solo.parameters()):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"slot {s}")
    state = torch.load(io.BytesIO(group.export(slots[0])), weights_only=True)
    assert state["stream"] == {"seed": SEEDS[0], "epoch": 1, "taken": N // B, "batch_size": B}

    # run ahead with reports that do not fall on epoch ends, then go back and replay across an epoch boundary
    K = 3
    ref, ref_slots, _ = _group(K)
    want = [ref.finish(ref.step(ref_slots)) if k % K == K - 1 else ref.step(ref_slots) for k in range(4 * K)]
    want = [w for w in want if isinstance(w, dict)]
    factory = Counting(loaders)
    g, g_slots, _ = _group(K, run_ahead=2, factory=factory)
    got = []
    for k in range(3 * K + 2):  # three reports and two steps into the fourth (epoch 1 began at step 8)
        done = g.step(g_slots)
        if done:
            got.append(g.finish(done))
    assert got == want[:3]
    calls = factory.calls
    g.export(g_slots[1], iteration=1)  # looking at an older boundary replays nothing
    assert factory.calls == calls
    for s in g_slots:
        g.rollback(s, 1)  # back to step 3 of epoch 0
    assert g.streams.slot_state(g_slots[0])["epoch"] == 0
    replay = [g.finish(g.step(g_slots)) if k % K == K - 1 else g.step(g_slots) for k in range(3 * K)]
    assert [r for r in replay if isinstance(r, dict)] == want[1:]  # float for float
    for s in g_slots:
        assert all(torch.equal(a, b) for a, b in zip(_params(g, s), _params(ref, s))), s
