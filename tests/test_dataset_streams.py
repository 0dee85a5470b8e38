"""Dataset and host-memory per-slot streams: same batches as a solo run, seeded augmentation, rollback, data() forms."""

import pickle

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from ray_modelbatch.data import PerSlotStreams, SlotSampler, resolve_steps_per_report, sweep_data, sweep_inputs
from ray_modelbatch.dataset_streams import (
    EXAMPLE_SEED_BOUND,
    DatasetInputs,
    DatasetStreams,
    HostTensorStreams,
    SlotLoader,
    augment_seed,
    per_slot_streams,
)

N, B = 23, 4


class Pairs(Dataset):
    """Example i is (x_i [2, 3], i): the label names the row, so batches can be checked by their labels."""

    def __init__(self, n=N, as_dict=False):
        self.x = torch.arange(n * 6, dtype=torch.float32).view(n, 2, 3)
        self.as_dict = as_dict

    def __len__(self):
        return self.x.shape[0]

    def __getitem__(self, i):
        return {"img": self.x[i], "label": i} if self.as_dict else (self.x[i], i)


def noisy(sample, generator):
    """Generator-style augmentation: noise and a random flip, from the example's generator only."""
    x, y = sample
    x = x + torch.rand(x.shape, generator=generator)
    if torch.rand((), generator=generator) < 0.5:
        x = x.flip(-1)
    return x, y


def global_noise(x):
    """torchvision-style: draws from torch's global RNG."""
    return x + torch.rand(x.shape)


def solo_batches(ds, seed, steps, transform=None, indices=None):
    """The documented contract, by hand: a SlotSampler, and one generator per example from the slot's seeds."""
    sampler = SlotSampler(torch.arange(len(ds)) if indices is None else indices, B, seed)
    augment = torch.Generator().manual_seed(augment_seed(seed))
    out = []
    for _ in range(steps):
        rows = next(sampler)
        samples = [ds[r] for r in rows.tolist()]
        if transform is not None:
            seeds = torch.randint(EXAMPLE_SEED_BOUND, (B,), generator=augment).tolist()
            samples = [transform(s, torch.Generator().manual_seed(k)) for s, k in zip(samples, seeds)]
        out.append((torch.stack([s[0] for s in samples]), torch.tensor([s[1] for s in samples])))
    return out


def take(streams, slots, steps, skip=None):
    return [tuple(t.clone() for t in streams.next_batch(slots, skip)) for _ in range(steps)]


def same(a, b):
    return len(a) == len(b) and all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))


@pytest.mark.parametrize("transform", [None, noisy])
@pytest.mark.parametrize("workers", [0, 2])
def test_each_slot_sees_what_a_solo_sampler_dataset_and_transform_see(transform, workers):
    ds, seeds, steps = Pairs(), [3, 7, 11], 13  # 13 steps: more than two epochs of 5 batches
    streams = DatasetStreams(ds, B, seeds, transform=transform, num_workers=workers)
    assert streams.per_slot and streams.num_slots == 3 and streams.steps_per_epoch() == N // B
    got = take(streams, [2, 0, 1], steps)
    assert got[0][0].shape == (3, B, 2, 3) and got[0][1].shape == (3, B) and got[0][1].dtype == torch.long
    for row, slot in enumerate([2, 0, 1]):
        ref = solo_batches(ds, seeds[slot], steps, transform)
        assert same([(x[row], y[row]) for x, y in got], ref)
        loader = SlotLoader(ds, B, seeds[slot], transform=transform)
        assert same([next(loader) for _ in range(steps)], ref)
    streams.close()


def test_different_seeds_give_different_batches_and_augmentation():
    ds = Pairs()
    a = take(DatasetStreams(ds, B, [1], transform=noisy), [0], 3)
    b = take(DatasetStreams(ds, B, [2], transform=noisy), [0], 3)
    assert not same(a, b)
    # Same rows, other seed of the augmentation only: the augmentation differs too.
    s = DatasetStreams(ds, B, [1], transform=noisy)
    s.samplers[0].augment.manual_seed(augment_seed(2))
    c = take(s, [0], 3)
    assert all(torch.equal(p[1], q[1]) for p, q in zip(a, c)) and not same(a, c)


def test_plain_transforms_are_seeded_per_example_and_leave_the_global_rng_alone():
    ds = Pairs()
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = take(DatasetStreams(ds, B, [5], transform=global_noise), [0], 4)
    assert torch.equal(torch.random.get_rng_state(), before)
    torch.manual_seed(999)  # the global seed does not matter
    b = take(DatasetStreams(ds, B, [5], transform=global_noise, num_workers=2), [0], 4)
    assert same(a, b)
    assert not same(a, take(DatasetStreams(ds, B, [6], transform=global_noise), [0], 4))
    assert not torch.equal(a[0][0], take(DatasetStreams(ds, B, [5]), [0], 1)[0][0])  # it did augment


@pytest.mark.parametrize("transform", [noisy, global_noise])
def test_capture_restore_and_slot_state_replay_batches_and_augmentation(transform):
    ds = Pairs()
    streams = DatasetStreams(ds, B, [4, 8], transform=transform)
    take(streams, [0, 1], 3)
    captured = streams.capture_slot(1)
    state = streams.slot_state(1)
    ahead = take(streams, [0, 1], 7)  # crosses an epoch boundary
    streams.restore_slot(1, captured)
    again = take(streams, [1], 7)
    assert same([(x[1:], y[1:]) for x, y in ahead], again)
    # A checkpoint (plain tensors through torch.save/load) resumes a fresh stream with another seed.
    fresh = DatasetStreams(ds, B, [0], transform=transform)
    blob = pickle.loads(pickle.dumps(state))
    fresh.load_slot_state(0, blob)
    assert same(again, take(fresh, [0], 7))
    with pytest.raises(ValueError, match="augmentation"):
        fresh.load_slot_state(0, PerSlotStreams(ds.x, torch.arange(N), B, [0]).slot_state(0))
    whole = streams.state_dict()
    expect = take(streams, [0, 1], 2)
    clone = DatasetStreams(ds, B, [0, 0], transform=transform)
    clone.load_state_dict(whole)
    assert same(expect, take(clone, [0, 1], 2))


def test_reset_resize_and_skip_rows():
    ds = Pairs()
    streams = DatasetStreams(ds, B, [1, 2, 3], transform=noisy)
    refs = {s: solo_batches(ds, s, 6, noisy) for s in (1, 2, 3, 9)}
    x, y = streams.next_batch([0, 1, 2], skip=[False, True, False])
    assert torch.equal(y[0], refs[1][0][1]) and torch.equal(y[2], refs[3][0][1])
    assert torch.equal(x[1], x[0]) and torch.equal(y[1], y[0])  # a skipped row repeats the first live one
    x, y = streams.next_batch([1])  # slot 1 did not advance
    assert torch.equal(x[0], refs[2][0][0]) and torch.equal(y[0], refs[2][0][1])
    x, y = streams.next_batch([0, 1], skip=[True, True])  # nobody runs: fixed rows, no stream moves
    assert x.shape == (2, B, 2, 3) and y.shape == (2, B)
    x, y = streams.next_batch([])
    assert x.shape == (0, B, 2, 3) and y.shape == (0, B)

    streams.resize(5, keep=[2, 0])  # new 0 = old 2 (one step taken), new 1 = old 0 (one step)
    assert streams.num_slots == 5
    with pytest.raises(RuntimeError, match="reset_slot"):
        streams.next_batch([3])
    x, y = streams.next_batch([0, 1])
    assert torch.equal(x[0], refs[3][1][0]) and torch.equal(x[1], refs[1][1][0])
    streams.reset_slot(4, seed=9, indices=torch.arange(3, 20))
    _, y = streams.next_batch([4])
    assert torch.equal(y[0], solo_batches(ds, 9, 1, noisy, torch.arange(3, 20))[0][1])
    assert streams.steps_per_epoch(4) == 17 // B


def test_an_error_while_reading_leaves_every_slot_where_it_was():
    class Flaky(Pairs):
        fail = False

        def __getitem__(self, i):
            if self.fail:
                raise OSError("disk gone")
            return super().__getitem__(i)

    ds = Flaky()
    streams = DatasetStreams(ds, B, [1, 2], transform=noisy)
    ds.fail = True
    with pytest.raises(OSError):
        streams.next_batch([0, 1])
    ds.fail = False
    assert same(take(streams, [0, 1], 3), take(DatasetStreams(ds, B, [1, 2], transform=noisy), [0, 1], 3))


def test_dict_examples_need_their_fields():
    ds = Pairs(as_dict=True)
    with pytest.raises(ValueError, match="fields"):
        DatasetStreams(ds, B, [0]).next_batch([0])
    a = take(DatasetStreams(ds, B, [0], fields=("img", "label")), [0], 2)
    assert same(a, take(DatasetStreams(Pairs(), B, [0]), [0], 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.long])
def test_host_tensor_streams_equal_in_memory_per_slot_streams(dtype):
    x, y = (torch.randn(57, 3) * 10).to(dtype), torch.arange(57)
    idx = [None, torch.arange(10, 50), None]
    seeds = [5, 6, 7]
    mem = PerSlotStreams(x, y, 8, seeds, idx)
    host = HostTensorStreams(x, y, 8, seeds, idx)
    for slots, skip in [([0, 1, 2], None), ([2, 0], [False, True]), ([1], None), ([0, 1], [True, True]),
                        ([], None)] * 4:
        assert same([mem.next_batch(slots, skip)], [host.next_batch(slots, skip)])
    assert host.steps_per_epoch() == 57 // 8 and host.steps_per_epoch(1) == 40 // 8
    c = host.capture_slot(0)
    ahead = host.next_batch([0])
    host.restore_slot(0, c)
    assert same([ahead], [host.next_batch([0])])
    fresh = HostTensorStreams(x, y, 8, [0])
    fresh.load_slot_state(0, mem.slot_state(0))  # states are PerSlotStreams' own
    assert same([mem.next_batch([0])], [fresh.next_batch([0])])


def test_resolve_steps_per_report():
    assert resolve_steps_per_report(7, 100, 32) == 7
    assert resolve_steps_per_report("epoch", 100, 32) == 3  # the incomplete batch is dropped
    assert resolve_steps_per_report("epoch", 96, 32) == SlotSampler(torch.arange(96), 32, 0).batches_per_epoch
    for bad in (0, -1, 2.5, True, "epochs"):
        with pytest.raises(ValueError, match="steps_per_report"):
            resolve_steps_per_report(bad, 100, 32)
    with pytest.raises(ValueError, match="batch_size"):
        resolve_steps_per_report("epoch", 10, 32)


def test_sweep_inputs_accepts_tensors_datasets_and_dicts():
    x, y = torch.randn(30, 2, 3), torch.arange(30)
    four = sweep_inputs((x[:20], y[:20], x[20:], y[20:]))
    assert all(torch.equal(a, b) for a, b in zip(four, sweep_data((x[:20], y[:20], x[20:], y[20:]))))
    assert isinstance(per_slot_streams(four, 4, [0]), PerSlotStreams)
    assert isinstance(per_slot_streams(four, 4, [0], host=True), HostTensorStreams)

    train, val = Pairs(), TensorDataset(x[20:], y[20:])
    got = sweep_inputs((train, val))
    assert isinstance(got, DatasetInputs) and got.train is train and got.transform is None
    assert torch.equal(got.x_val, x[20:]) and torch.equal(got.y_val, y[20:])
    got = sweep_inputs({"train": train, "val": (x[20:], y[20:]), "transform": noisy})
    assert got.transform is noisy and torch.equal(got.x_val, x[20:])
    streams = per_slot_streams(got, B, [3])
    assert isinstance(streams, DatasetStreams)
    assert same([(a[0], b[0]) for a, b in take(streams, [0], 2)], solo_batches(train, 3, 2, noisy))
    got = sweep_inputs({"train": Pairs(as_dict=True), "val": Pairs(5, as_dict=True), "fields": ("img", "label")})
    assert got.x_val.shape == (5, 2, 3) and got.y_val.tolist() == list(range(5))


class Stream(IterableDataset):
    def __iter__(self):
        yield from []


@pytest.mark.parametrize("items, match", [
    ((torch.randn(5, 2), torch.arange(5)), "Tensor, not a map-style Dataset"),
    ((torch.randn(5, 2), torch.arange(5), torch.randn(5, 2)), "returned 3 items"),
    (torch.randn(5, 2), "returned a Tensor"),
    ((DataLoader(Pairs()), Pairs()), "DataLoader"),
    ((Stream(), Pairs()), "IterableDataset"),
    ({"train": Pairs()}, "no 'val'"),
    ({"train": Pairs(), "val": Pairs(), "augment": noisy}, "unknown keys"),
    ({"train": Pairs(), "val": Pairs(), "transform": 3}, "callable"),
    ((Pairs(), TensorDataset(torch.randn(5, 4), torch.arange(5))), "same features"),
    ({"train": Pairs(), "val": Pairs(), "transform": lambda s, g: (s[0].flatten(), s[1])}, "after transform"),
])
def test_sweep_inputs_rejects_other_forms_in_one_line(items, match):
    with pytest.raises((ValueError, TypeError), match=match) as info:
        sweep_inputs(items)
    assert "\n" not in str(info.value)
    msg = str(info.value)
    if "returned" in msg and "items" in msg or "returned a" in msg:
        assert "four tensors" in msg and "map-style Datasets" in msg  # the accepted forms are named


def test_a_batched_getitems_is_used_when_the_dataset_has_one():
    class Batched(Pairs):
        calls = 0

        def __getitems__(self, rows):
            Batched.calls += 1
            return [(self.x[r], r) for r in rows]

    got = take(DatasetStreams(Batched(), B, [3, 4], transform=noisy), [0, 1], 3)
    assert Batched.calls == 3  # one read per step for all slots
    assert same(got, take(DatasetStreams(Pairs(), B, [3, 4], transform=noisy), [0, 1], 3))


class OwnItems(TensorDataset):
    """A TensorDataset whose examples are not its rows: must be read example by example."""

    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        return x + 1000, y


def test_tensor_backed_datasets_are_gathered_in_one_read_and_give_the_same_batches():
    """A TensorDataset, and random_split's Subsets of it (nested too), are read as one gather per batch, not one
    __getitem__ per example: the same rows, values, dtypes and order as reading them one by one."""
    from torch.utils.data import Subset, random_split

    from ray_modelbatch.dataset_streams import SampleLoader, tensor_rows

    x, y = torch.randn(N, 2, 3, dtype=torch.float64), torch.arange(N) * 3
    base = TensorDataset(x, y)
    part, _ = random_split(base, [15, N - 15], generator=torch.Generator().manual_seed(1))
    nested = Subset(part, [4, 0, 9, 2, 11, 7])
    negative = Subset(Subset(base, [3, -1, 5, -2]), [-1, 0, 1, 2, -3])  # Python's negative indices
    rows = [4, 2, 2, 0, 3]
    for ds in (base, part, nested, negative):
        assert tensor_rows(ds) is not None
        fast = SampleLoader(ds).batch(rows, None, torch.device("cpu"))
        slow = SampleLoader(ds)
        slow._rows = None  # read example by example
        ref = slow.batch(rows, None, torch.device("cpu"))
        for a, b in zip(fast, ref):
            assert a.dtype == b.dtype and torch.equal(a, b)
    xs, ys = SampleLoader(nested).batch([0, 1], None, torch.device("cpu"))
    assert torch.equal(ys, y[[part.indices[4], part.indices[0]]])  # Subset of a Subset: the indices compose
    # read one by one: a subclass (its own __getitem__), a transform, three tensors
    assert tensor_rows(OwnItems(x, y)) is None and tensor_rows(TensorDataset(x, y, y)) is None
    assert SampleLoader(OwnItems(x, y)).batch([1], None, torch.device("cpu"))[0][0, 0, 0] > 500
    assert SampleLoader(base, lambda x: x)._rows is None
    # and a stream of them yields what a solo SlotLoader does
    streams = DatasetStreams(part, B, [7, 8])
    solo = SlotLoader(part, B, 8)
    for _ in range(6):
        xb, yb = streams.next_batch([0, 1])
        sx, sy = next(solo)
        assert torch.equal(xb[1], sx) and torch.equal(yb[1], sy)


def test_a_fused_run_on_dataset_streams_reproduces_solo_training_with_augmentation():
    """Drop-in for PerSlotStreams: slot i of a fused Trainer run == a plain model + Adam on SlotLoader(seed_i)."""
    import copy

    from sklearn.datasets import load_digits
    from torch import nn

    import ray_modelbatch as rmb
    from ray_modelbatch.trainer import Trainer

    d = load_digits()
    ds = TensorDataset(torch.tensor(d.data, dtype=torch.float32) / 16.0, torch.tensor(d.target))

    def jitter(sample, generator):
        x, y = sample
        return x + 0.1 * torch.randn(x.shape, generator=generator), y

    seeds, lrs, steps, batch = [5, 6, 7], [3e-3, 1e-2, 5e-3], 12, 16
    models = [nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)) for _ in seeds]
    refs = copy.deepcopy(models)
    mb = rmb.ModelBatch(models)
    eng = rmb.FusedEngine(mb, rmb.optim.Adam(mb, lr=lrs), nn.functional.cross_entropy)
    Trainer(eng, DatasetStreams(ds, batch, seeds, transform=jitter), eval_every=4, progress=False).fit(steps)
    for i, ref in enumerate(refs):
        opt = torch.optim.Adam(ref.parameters(), lr=lrs[i])
        loader = SlotLoader(ds, batch, seeds[i], transform=jitter)
        for _ in range(steps):
            xb, yb = next(loader)
            opt.zero_grad()
            nn.functional.cross_entropy(ref(xb), yb).backward()
            opt.step()
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(mb.slot_state(i)[k], v, rtol=1e-5, atol=1e-6, msg=f"slot {i} {k}")


def test_example_fields_that_batches_do_not_carry_are_named_once():
    """A Dataset of (x, y, w): batches are (x, y), so w was dropped without a word, and a train_step that
    unpacked three items failed with advice about vmap. Now one warning per loader names what is left out."""
    import warnings

    from ray_modelbatch.dataset_streams import SampleLoader

    class Examples(torch.utils.data.Dataset):
        def __init__(self, make):
            self.make = make

        def __len__(self):
            return 6

        def __getitem__(self, i):
            return self.make(i)

    cases = [(lambda i: (torch.ones(2) * i, i % 2, 0.5), "items [2]"),
             (lambda i: {"x": torch.ones(2), "y": i % 2, "w": 1.0}, "keys ['w']"),
             (lambda i: (torch.ones(2), i % 2), None),
             (lambda i: {"input_ids": torch.ones(3, dtype=torch.long), "labels": i % 2}, None)]
    for make, named in cases:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loader = SampleLoader(Examples(make))
            loader.load([0, 1, 2])
            loader.load([3, 4])
        said = [str(w.message) for w in caught if "batches do not carry" in str(w.message)]
        if named is None:
            assert not said, said
        else:
            assert len(said) == 1 and said[0].startswith(f"dataset examples also hold {named}, which batches do not "
                                                         "carry: a batch is (x, y)"), said


def test_a_big_validation_dataset_is_named_before_it_is_collated(monkeypatch):
    """Validation is collated whole (never streamed): a set too big for memory ran out of it with no word about
    the validation set. One above the threshold (lowered here) is named first, with its estimated size."""
    import warnings

    import ray_modelbatch.dataset_streams as streams

    class Val(Dataset):
        def __len__(self):
            return 1000

        def __getitem__(self, i):
            return torch.ones(64), i % 3

    monkeypatch.setattr(streams, "VALIDATION_WARN_BYTES", 200_000)  # 1000 x 64 float32 = 256,000 bytes
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x, y = streams.validation_tensors(Val(), None, torch.device("cpu"))
    said = [str(w.message) for w in caught if "collated whole" in str(w.message)]
    assert len(said) == 1 and said[0].startswith("the validation set (1000 examples, about 0.0 GiB)"), said
    assert x.shape == (1000, 64) and y.shape == (1000,)
    monkeypatch.setattr(streams, "VALIDATION_WARN_BYTES", 300_000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        streams.validation_tensors(Val(), None, torch.device("cpu"))
    assert not [w for w in caught if "collated whole" in str(w.message)]
