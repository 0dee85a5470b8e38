"""A trial's checkpoint: loads with torch.load's safe default, restores across module paths, gives the model back
(issue 11, item 5)."""

from __future__ import annotations

import io
import json
import os
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ray_modelbatch import checkpoint, optim
from ray_modelbatch.errors import IncompatibleModelsError
from ray_modelbatch.slot_group import SlotGroup, stack_key
from ray_modelbatch.tune import batched_trainable
from ray_modelbatch.tune.spec import SlotSpec


def _class_in(module_name: str, width: int = 16) -> type[nn.Module]:
    """The same ConvNet-like class defined in a module of the given name (``__main__`` vs a package)."""
    mod = types.ModuleType(module_name)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(8, width), nn.ReLU())
            self.head = nn.Linear(width, 4)

        def forward(self, x):
            return self.head(self.body(x))

    Net.__module__ = module_name
    mod.Net = Net
    return Net


def _data():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(120, 8, generator=g), torch.randint(0, 4, (120,), generator=g)
    return x[:100], y[:100], x[100:], y[100:]


def _spec() -> SlotSpec:
    return SlotSpec(model=lambda c: None, optimizer=optim.Adam, hparams=lambda c: {}, loss=F.cross_entropy,
                    data=lambda: None, batch_size=10, steps_per_report=2)


def _trained_group(cls: type[nn.Module]) -> tuple[SlotGroup, int]:
    torch.manual_seed(0)
    first = cls()
    group = SlotGroup(_spec(), stack_key(first), first, _data(), 4, "cpu")
    slot = group.add("t", cls(), seed=1, hparams={"lr": 0.01, "schedule": optim.schedules.step_decay(3)})
    for _ in range(3):
        group.step([slot])
    return group, slot


def test_checkpoint_loads_with_weights_only_and_holds_plain_types():
    group, slot = _trained_group(_class_in("__main__"))
    state = torch.load(io.BytesIO(group.export(slot)), weights_only=True)
    assert state["format"] == checkpoint.FORMAT
    assert set(state["model"]) == set(group.mb.slot_state(slot))
    assert state["optimizer"]["steps"] == 3 and state["optimizer"]["hparams"]["schedule"]["kind"] == "step"


def test_checkpoint_restores_into_the_same_architecture_from_another_module():
    group, slot = _trained_group(_class_in("__main__"))
    blob = group.export(slot)
    other, _ = _trained_group(_class_in("mypackage.models"))
    target = other.add("u", _class_in("mypackage.models")(), seed=2, hparams={"lr": 0.01})
    other.load(target, blob, {"lr": 0.01})
    for k, v in group.mb.slot_state(slot).items():
        assert torch.equal(v, other.mb.slot_state(target)[k]), k


def test_a_slot_loads_its_checkpoint_on_the_cpu_whatever_the_stacks_device(monkeypatch):
    """Each component copies the state into its own tensors, wherever they live; loaded onto a GPU stack's
    device, the data stream's generator state would be a CUDA tensor, which a CPU generator refuses."""
    group, slot = _trained_group(_class_in("__main__"))
    blob = group.export(slot)
    target = group.add("u", _class_in("__main__")(), seed=2, hparams={"lr": 0.01})
    seen, real = [], checkpoint.from_bytes
    monkeypatch.setattr(checkpoint, "from_bytes", lambda b, device="cpu": seen.append(str(device)) or real(b))

    class OnGPU:  # the stack as a GPU host's group sees it: its device is cuda (its tensors stay here)
        device = torch.device("cuda", 0)

        def __init__(self, mb):
            self._mb = mb

        def __getattr__(self, name):
            return getattr(self._mb, name)

    monkeypatch.setattr(group, "mb", OnGPU(group.mb))
    group.load(target, blob, {"lr": 0.01})
    assert seen == ["cpu"]
    assert group.streams.slot_state(target)["generator_state"].device.type == "cpu"


def test_another_architecture_is_refused_naming_the_tensor():
    group, slot = _trained_group(_class_in("__main__", width=16))
    wide, _ = _trained_group(_class_in("__main__", width=32))
    target = wide.add("u", _class_in("__main__", width=32)(), seed=2, hparams={})
    with pytest.raises(IncompatibleModelsError, match=r"'body.0.weight' shape \[16, 8\]") as info:
        wide.load(target, group.export(slot), {})
    assert "\n" not in str(info.value)


def test_load_model_gives_the_trials_module_and_optimizer_state(tmp_path):
    Net = _class_in("__main__")
    group, slot = _trained_group(Net)
    ckpt = tmp_path / "checkpoint_000003"
    ckpt.mkdir()
    (ckpt / checkpoint.STATE_FILE).write_bytes(group.export(slot))
    (ckpt / checkpoint.CONFIG_FILE).write_text(json.dumps({"lr": 0.01}))
    trainable = batched_trainable(model=lambda c: Net(), optimizer=optim.Adam,
                                  hparams=lambda c: {"lr": c["lr"]}, loss=F.cross_entropy, data=_data)
    model = trainable.load_model(str(ckpt))
    assert type(model).__qualname__ == Net.__qualname__ and not model.training
    x = _data()[2]
    group.mb.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), group.mb(x, slots=[slot, (slot + 1) % 4])[0], rtol=1e-6, atol=1e-6)
    state = trainable.load_state(ckpt)
    assert state["config"] == {"lr": 0.01} and state["optimizer"]["steps"] == 3
    per_param = state["optimizer_per_param"]
    assert per_param["head.weight"]["exp_avg"].shape == (4, 16)
    assert torch.count_nonzero(per_param["body.0.bias"]["exp_avg_sq"]) > 0
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        trainable.load_model(str(tmp_path))
    os.remove(ckpt / checkpoint.CONFIG_FILE)
    with pytest.raises(ValueError, match="config=result.config"):
        trainable.load_model(ckpt)
    assert not trainable.load_model(ckpt, config={"lr": 0.5}).training


def test_a_config_json_cannot_hold_exactly_is_kept_for_load_model(tmp_path):
    """Configs with a class, a tuple or a numpy number (``grid_search([nn.ReLU, nn.Tanh])``, ``sample_from`` with
    numpy) came back from ``trial_config.json`` as text and broke the model factory; they are pickled beside it."""
    import numpy as np

    from ray_modelbatch.tune.slot_client import save_config

    Net = _class_in("__main__")
    group, slot = _trained_group(Net)
    plain_dir, odd_dir = tmp_path / "plain", tmp_path / "odd"
    for d, config in ((plain_dir, {"lr": 0.01, "widths": [4, 4]}),
                      (odd_dir, {"lr": 0.01, "act": nn.Tanh, "widths": (4, 4), "hidden": np.int64(16)})):
        d.mkdir()
        (d / checkpoint.STATE_FILE).write_bytes(group.export(slot))
        save_config(config, str(d))
    assert not (plain_dir / checkpoint.CONFIG_PICKLE).exists()  # exact as JSON: JSON only

    def model(c):
        c["act"](), torch.empty(c["hidden"]), tuple(c["widths"])  # what a factory does with them
        net = Net()
        net.built_from = c
        return net

    trainable = batched_trainable(model=model, optimizer=optim.Adam, hparams=lambda c: {"lr": c["lr"]},
                                  loss=F.cross_entropy, data=_data)
    seen = trainable.load_model(str(odd_dir)).built_from
    assert seen["act"] is nn.Tanh and seen["widths"] == (4, 4) and type(seen["hidden"]) is np.int64
    os.remove(odd_dir / checkpoint.CONFIG_PICKLE)  # a checkpoint from before: the JSON copy, and the fix named
    with pytest.raises(TypeError, match=r"read from trial_config.json, .* Fix: load_model\(checkpoint, "
                                        r"config=result.config\)"):
        trainable.load_model(str(odd_dir))
