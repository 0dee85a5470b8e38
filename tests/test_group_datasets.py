"""A stack fed from map-style datasets with per-trial augmentation, epoch-sized reports (issue 11, item 4)."""

from __future__ import annotations

import copy
import io

import torch
import torch.nn.functional as F
from torch import nn

from ray_modelbatch import optim
from ray_modelbatch.data import sweep_inputs
from ray_modelbatch.dataset_streams import SlotLoader
from ray_modelbatch.slot_group import SlotGroup, stack_key
from ray_modelbatch.tune.spec import SlotSpec


class Images(torch.utils.data.Dataset):
    """A map-style dataset as a user writes one: examples built in ``__getitem__``."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 1, 6, 6, generator=g)
        self.y = torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i])


def flip(sample, generator):
    """Random horizontal flip, drawn from the trial's generator."""
    x, y = sample
    if torch.rand((), generator=generator) < 0.5:
        x = x.flip(-1)
    return x, y


def _model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def test_each_slot_trains_on_its_own_augmented_batches_like_a_solo_loader():
    train, val = Images(70, 0), Images(20, 1)
    data = sweep_inputs({"train": train, "val": val, "transform": flip}, "cpu")
    spec = SlotSpec(model=lambda c: None, optimizer=optim.SGD, hparams=lambda c: {}, loss=F.cross_entropy,
                    data=lambda: None, batch_size=16, steps_per_report="epoch")
    torch.manual_seed(0)
    models = [_model() for _ in range(3)]
    group = SlotGroup(spec, stack_key(models[0]), models[0], data, 4, "cpu")
    assert group.steps_per_report == 70 // 16
    seeds, lrs = [11, 12, 13], [0.1, 0.05, 0.02]
    slots = [group.add(f"t{i}", m, seed=s, hparams={"lr": lr}) for i, (m, s, lr) in enumerate(zip(models, seeds, lrs))]
    done = []
    for _ in range(2 * group.steps_per_report):  # two epochs
        done = group.step(slots) or done
    assert sorted(done) == slots and group.iteration == [0] * 4  # finish() not called yet: no boundary
    for i, s in enumerate(slots):
        solo = copy.deepcopy(models[i])
        opt = torch.optim.SGD(solo.parameters(), lr=lrs[i])
        loader = SlotLoader(train, 16, seeds[i], transform=flip)
        for _ in range(2 * group.steps_per_report):
            xb, yb = next(loader)
            opt.zero_grad()
            F.cross_entropy(solo(xb), yb).backward()
            opt.step()
        for (name, a), b in zip(group.mb.slot_module(s, _model()).named_parameters(), solo.parameters()):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"slot {s} {name}")
    # the stream's position and augmentation state are plain tensors in the checkpoint
    state = torch.load(io.BytesIO(group.export(slots[0])), weights_only=True)
    assert isinstance(state["stream"]["augment_state"], torch.Tensor)


def test_host_memory_streams_train_like_data_on_the_device():
    """``host_memory=True``: training tensors stay in host memory, each step's batches are copied; same results."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 1, 6, 6, generator=g), torch.randint(0, 3, (60,), generator=g)
    data = (x, y, x[:10], y[:10])
    results = []
    for host in (False, True):
        spec = SlotSpec(model=lambda c: None, optimizer=optim.Adam, hparams=lambda c: {}, loss=F.cross_entropy,
                        data=lambda: None, batch_size=8, steps_per_report=3, host_memory=host)
        torch.manual_seed(0)
        first = _model()
        group = SlotGroup(spec, stack_key(first), first, data, 4, "cpu")
        assert type(group.streams).__name__ == ("HostTensorStreams" if host else "PerSlotStreams")
        slots = [group.add(f"t{i}", _model(), seed=i, hparams={"lr": 1e-2}) for i in range(2)]
        for _ in range(6):
            group.step(slots)
        results.append(group.mb.groups[torch.float32].data.clone())
    assert torch.equal(results[0], results[1])


def test_a_batch_of_another_dtype_is_not_also_told_to_change_its_shape():
    """float64 data: the stack's first check says the dtype and its fix; it added "make the config's model
    take inputs of that shape, or reshape the data", which a right shape does not need."""
    import pytest

    from ray_modelbatch.errors import InputShapeError

    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    spec = SlotSpec(model=lambda c: nn.Linear(4, 3), optimizer=optim.Adam, hparams=lambda c: {"lr": 1e-3},
                    data=lambda: None, loss=F.cross_entropy, batch_size=4, steps_per_report=2)
    with pytest.raises(InputShapeError, match=r"input's dtype: .*x\.float\(\)") as err:
        SlotGroup(spec, stack_key(nn.Linear(4, 3)), nn.Linear(4, 3), sweep_inputs((x, y, x, y)), 2, "cpu", config={})
    assert "reshape the data" not in str(err.value), str(err.value)
