"""Data feeding and routing: samplers, shared and per-slot streams, bootstrap/k-fold/shards, padded evaluation."""

import pytest
import torch
from torch import nn

import ray_modelbatch as rmb
from ray_modelbatch import metrics
from ray_modelbatch.data import PerSlotStreams, SharedStream, SlotSampler, bootstrap, kfold, padded_per_slot, shards


def _take(sampler, n):
    return [next(sampler).clone() for _ in range(n)]


def test_slot_sampler_epochs_are_fresh_permutations_of_full_batches():
    idx = torch.tensor([3, 8, 1, 42, 7, 5, 9, 11, 13, 2])
    s = SlotSampler(idx, batch_size=3, seed=5)
    assert s.batches_per_epoch == 3
    batches = _take(s, 9)  # three epochs
    assert all(b.shape == (3,) for b in batches)
    epochs = [torch.cat(batches[i : i + 3]) for i in (0, 3, 6)]
    for e in epochs:
        assert e.unique().numel() == 9  # no repeats inside an epoch; one row dropped
        assert set(e.tolist()) <= set(idx.tolist())
    assert not torch.equal(epochs[0], epochs[1])  # a fresh permutation each epoch
    # The stream is a function of the seed only.
    again = _take(SlotSampler(idx, 3, seed=5), 9)
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    other = _take(SlotSampler(idx, 3, seed=6), 9)
    assert not all(torch.equal(a, b) for a, b in zip(batches, other))


def test_slot_sampler_batches_are_its_epoch_permutation_in_order_and_restore_where_captured():
    """Each epoch's batches are the generator's permutation of the indices cut in order (the batches are made
    once an epoch); a capture taken mid-epoch restores to the same next batches."""
    idx = torch.arange(50, 60)
    s = SlotSampler(idx, 3, seed=7)
    gen = torch.Generator().manual_seed(7)
    for _ in range(3):
        perm = idx[torch.randperm(10, generator=gen)]
        assert torch.equal(torch.cat(_take(s, 3)), perm[:9])
    _take(s, 1)
    captured = s.capture()
    expected = _take(s, 5)  # crosses an epoch boundary
    s.restore(captured)
    assert all(torch.equal(a, b) for a, b in zip(expected, _take(s, 5)))


def test_slot_sampler_rejects_too_few_rows():
    with pytest.raises(ValueError, match="batch_size"):
        SlotSampler(torch.arange(4), batch_size=5, seed=0)


@pytest.mark.parametrize("consumed", [0, 2, 3, 7])
def test_slot_sampler_state_dict_resumes_exactly(consumed):
    idx = torch.arange(100, 111)
    s = SlotSampler(idx, 4, seed=1)
    _take(s, consumed)
    state = s.state_dict()
    expected = _take(s, 10)
    fresh = SlotSampler(idx, 4, seed=123)  # seed is restored from the state
    fresh.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(expected, _take(fresh, 10)))
    with pytest.raises(ValueError, match="rows"):
        SlotSampler(torch.arange(12), 4, seed=1).load_state_dict(state)


def test_slot_sampler_loads_a_state_saved_with_another_batch_size_from_the_same_row():
    """A PBT explore that changes ``batch_size`` loads the donor's stream into a sampler of the new size: the
    donor's epoch goes on from the row it reached, in batches of the new size; an epoch whose full batches the
    donor took is over, and the next epoch is the one the donor would have drawn."""
    idx = torch.arange(100, 122)  # 22 rows
    donor = SlotSampler(idx, 4, seed=3)
    _take(donor, 2)  # 8 rows of epoch 0
    mid = donor.state_dict()
    epoch0 = torch.cat(_take(donor, 3))  # rows 8..19 of its permutation
    s = SlotSampler(idx, 6, seed=0)
    s.load_state_dict(mid)
    assert torch.equal(torch.cat(_take(s, 2)), epoch0)  # rows 8..19, now as two batches of 6
    # at the end of an epoch (the donor took all 5 full batches of 4; 2 rows dropped): a new epoch, the donor's
    donor = SlotSampler(idx, 4, seed=3)
    _take(donor, 5)
    end = donor.state_dict()
    reference = SlotSampler(idx, 11, seed=3)  # its next permutation, cut in 11s
    _take(reference, 2)  # epoch 0
    s = SlotSampler(idx, 11, seed=0)
    s.load_state_dict(end)
    assert all(torch.equal(a, b) for a, b in zip(_take(s, 4), _take(reference, 4)))


def test_shared_stream_gives_rows_of_the_data_set():
    x = torch.arange(20.0).unsqueeze(1) * torch.ones(1, 3)
    y = torch.arange(20)
    stream = SharedStream(x, y, batch_size=6, seed=0)
    assert stream.per_slot is False
    ref = SlotSampler(torch.arange(20), 6, seed=0)
    for _ in range(5):
        xb, yb = stream.next_batch([0, 1])
        b = next(ref)
        assert torch.equal(yb, b) and torch.equal(xb, x[b])


def test_per_slot_streams_follow_each_slot_sampler_and_only_named_slots_advance():
    x, y = torch.randn(50, 4), torch.arange(50)
    idx = [torch.arange(0, 30), torch.arange(20, 50), torch.arange(0, 50, 2)]
    seeds = [11, 12, 13]
    streams = PerSlotStreams(x, y, 5, seeds, idx)
    refs = [SlotSampler(i, 5, s) for i, s in zip(idx, seeds)]
    for _ in range(7):  # slot 1 never runs here
        xb, yb = streams.next_batch([2, 0])
        assert xb.shape == (2, 5, 4) and yb.shape == (2, 5)
        for row, slot in enumerate([2, 0]):
            b = next(refs[slot])
            assert torch.equal(yb[row], b) and torch.equal(xb[row], x[b])
    _, yb = streams.next_batch([1])
    assert torch.equal(yb[0], next(refs[1]))  # slot 1 starts at its first batch
    # Default indices: every row.
    all_rows = PerSlotStreams(x, y, 5, [4])
    assert torch.equal(all_rows.next_batch([0])[1][0], next(SlotSampler(torch.arange(50), 5, 4)))


def test_per_slot_streams_reset_resize_and_checkpoint():
    x, y = torch.randn(40, 2), torch.arange(40)
    streams = PerSlotStreams(x, y, 4, [0, 1, 2])
    streams.next_batch([0, 1, 2])
    streams.reset_slot(1, seed=99, indices=torch.arange(10, 20))
    _, yb = streams.next_batch([1])
    assert torch.equal(yb[0], next(SlotSampler(torch.arange(10, 20), 4, 99)))

    state = streams.state_dict()
    expect = streams.next_batch([0, 1, 2])[1]
    clone = PerSlotStreams(x, y, 4, [0, 0, 0], [None, torch.arange(10, 20), None])
    clone.load_state_dict(state)
    assert torch.equal(clone.next_batch([0, 1, 2])[1], expect)

    streams.resize(4, keep=[2, 0])
    assert streams.num_slots == 4
    with pytest.raises(RuntimeError, match="reset_slot"):
        streams.next_batch([3])
    streams.reset_slot(3, seed=5)
    assert streams.next_batch([0, 3])[1].shape == (2, 4)


def test_per_slot_streams_reject_out_of_range_indices():
    with pytest.raises(IndexError):
        PerSlotStreams(torch.randn(10, 2), torch.arange(10), 2, [0], [torch.tensor([0, 10])])


def test_kfold_folds_are_disjoint_cover_all_rows_and_are_held_out():
    n, k = 103, 5
    train, val = kfold(n, k, seed=3)
    assert len(train) == len(val) == k
    allval = torch.cat(val)
    assert allval.numel() == n and allval.unique().numel() == n  # disjoint, covering
    sizes = [v.numel() for v in val]
    assert max(sizes) - min(sizes) <= 1
    for j in range(k):
        tr, va = set(train[j].tolist()), set(val[j].tolist())
        assert not tr & va  # fold j held out of slot j's training rows
        assert tr | va == set(range(n))
        assert train[j].numel() == train[j].unique().numel()
    t2, v2 = kfold(n, k, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(val, v2))
    assert not all(torch.equal(a, b) for a, b in zip(val, kfold(n, k, seed=4)[1]))
    with pytest.raises(ValueError):
        kfold(3, 5, 0)


def test_shards_are_disjoint_and_cover_all_rows():
    parts = shards(50, 7, seed=1)
    assert len(parts) == 7
    joined = torch.cat(parts)
    assert sorted(joined.tolist()) == list(range(50))
    assert max(p.numel() for p in parts) - min(p.numel() for p in parts) <= 1


def test_bootstrap_samples_with_replacement_per_slot():
    n, s = 200, 4
    bags = bootstrap(n, s, seed=0)
    assert len(bags) == s
    for b in bags:
        assert b.numel() == n and b.dtype == torch.long
        assert 0 <= int(b.min()) and int(b.max()) < n
        # With replacement: duplicates, and about 1 - 1/e of the rows appear.
        assert 0.55 < b.unique().numel() / n < 0.72
    assert not torch.equal(bags[0], bags[1])
    assert all(torch.equal(a, b) for a, b in zip(bags, bootstrap(n, s, seed=0)))


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data, dtype=torch.float32) / 16.0, torch.tensor(d.target, dtype=torch.long)


def test_padded_per_slot_evaluation_equals_each_slot_on_its_own_set():
    x, y = _digits()
    k = 4
    models = [nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)) for _ in range(k)]
    mb = rmb.ModelBatch(models)
    eng = rmb.FusedEngine(mb, rmb.optim.SGD(mb, lr=0.1), nn.functional.cross_entropy)
    _, val = kfold(301, k, seed=0)  # 301 rows: folds of 76/75/75/75, so padding is needed
    xs, ys, mask = padded_per_slot(x, y, val)
    assert xs.shape == (k, 76, 64) and ys.shape == (k, 76) and mask.shape == (k, 76)
    assert mask.sum(1).tolist() == [v.numel() for v in val]
    fns = {"ce": metrics.cross_entropy, "acc": metrics.accuracy}
    got = eng.evaluate(xs, ys, fns, per_slot=True, mask=mask, slots=None, batch_size=32)
    for j, v in enumerate(val):
        alone = eng.evaluate(x[v], y[v], fns, slots=[j])
        with torch.no_grad():
            logits = models[j](x[v])
        torch.testing.assert_close(got["ce"][j], alone["ce"][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["acc"][j], alone["acc"][0])
        torch.testing.assert_close(got["ce"][j], nn.functional.cross_entropy(logits, y[v]), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["acc"][j], (logits.argmax(1) == y[v]).float().mean())
