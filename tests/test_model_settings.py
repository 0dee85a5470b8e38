"""Models that differ only in a setting their forward reads never share a stack (``signature.module_settings``).

A stack runs its template's (slot 0's) forward for every slot. Shapes and
dtypes alone let models through that differ in a value kept outside their
parameters and buffers: a config dict stored on the model, a dataclass of
options, an activation's closure, a plain tensor attribute. Such models used to
train silently with slot 0's value; now a ``ModelBatch`` refuses them in one
line naming the setting, and a slot host gives each its own stack.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ray_modelbatch as rmb
from ray_modelbatch.errors import IncompatibleModelsError
from ray_modelbatch.signature import first_setting_mismatch, module_settings
from ray_modelbatch.slot_group import stack_key


@dataclasses.dataclass
class Options:
    scale: float


class Net(nn.Module):
    """A forward that reads every kind of setting: a config dict, a dataclass, a closure, a tensor attribute."""

    def __init__(self, p=0.0, lr=0.1, scale=1.0, slope=0.01, offset=0.0):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)
        self.config = {"p": p, "lr": lr}
        self.options = Options(scale)
        self.act = lambda t: F.leaky_relu(t, slope)
        self.offset = torch.tensor([offset, 0.0])
        self.log = logging.getLogger("ray_modelbatch.test")  # shared objects compare equal

    def forward(self, x):
        h = self.act(self.fc1(x)) * self.options.scale
        return self.fc2(F.dropout(h, self.config["p"], self.training)) + self.offset[0]


@pytest.mark.parametrize("change, words", [
    ({"p": 0.5}, "config['p'] is 0.5, not 0.0"),
    ({"lr": 0.2}, "config['lr'] is 0.2, not 0.1"),
    ({"scale": 3.0}, "options.scale is 3.0, not 1.0"),
    ({"slope": 0.2}, "act (its closure) is 0.2, not 0.01"),
    ({"offset": 1.0}, "offset (values) is 1.0, not 0.0"),
])
def test_a_batch_refuses_models_that_differ_in_a_setting_and_names_it(change, words):
    torch.manual_seed(0)
    with pytest.raises(IncompatibleModelsError, match="slot 1 differs from slot 0 in a setting its forward may read: "
                                                       + re.escape("the model: " + words)):
        rmb.ModelBatch([Net(), Net(**change)])
    assert stack_key(Net()) != stack_key(Net(**change))
    mb = rmb.ModelBatch([Net(), Net()])  # equal settings, built apart: one stack
    with pytest.raises(IncompatibleModelsError, match="cannot load a Net into slot 1: .*" + re.escape(words)):
        mb.load_slot(1, Net(**change))


def test_models_with_equal_settings_share_a_stack_and_train_as_alone():
    torch.manual_seed(0)
    models = [Net(p=0.0, scale=2.0) for _ in range(3)]
    assert len({stack_key(m) for m in models}) == 1
    assert first_setting_mismatch(module_settings(models[0]), module_settings(models[1])) is None
    alone = [Net(p=0.0, scale=2.0) for _ in range(3)]
    for a, m in zip(alone, models):
        a.load_state_dict(m.state_dict())
    mb = rmb.ModelBatch(models)
    x = torch.randn(5, 4)
    out = mb(x)
    for i, a in enumerate(alone):
        torch.testing.assert_close(out[i], a(x))


def test_stack_keys_are_the_same_in_another_process():
    """A key holds no ids or addresses (functions by their code, tensors by their values): hosts agree."""
    code = ("import sys; sys.path.insert(0, %r); import test_model_settings as t; "
            "from ray_modelbatch.slot_group import stack_key; print(stack_key(t.Net(p=0.3, slope=0.2)))")
    here = __file__.rsplit("/", 1)[0]
    out = subprocess.run([sys.executable, "-c", code % here], capture_output=True, text=True, timeout=120, cwd=here)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == stack_key(Net(p=0.3, slope=0.2))


def test_a_host_warns_once_when_a_stored_config_splits_its_trials(caplog):
    """A config kept whole on the model splits trials that differ in any of its values: the host names the
    value once (a plain setting such as a dropout rate splits stacks as meant, without a warning)."""
    from ray_modelbatch.tune.host import SlotHost

    host = SlotHost.__new__(SlotHost)  # only what the warning reads
    host._warned_keys = set()
    host.groups = {"a": type("G", (), {"mb": rmb.ModelBatch([Net()])})()}
    with caplog.at_level(logging.WARNING, logger="ray_modelbatch.tune.host"):
        host._warn_split_by_setting(Net(lr=0.2))
        host._warn_split_by_setting(Net(lr=0.3))
    text = [r.getMessage() for r in caplog.records]
    assert len(text) == 1 and "config['lr'] is 0.2, not 0.1" in text[0] and "self.p = config['p']" in text[0]


def test_a_tensor_attribute_a_hook_recomputes_from_the_slots_own_weights_is_not_a_setting():
    """spectral_norm keeps ``weight`` as a plain tensor attribute that its pre-hook recomputes from each slot's
    ``weight_orig`` and power-iteration buffers: models that differ there still share a stack, and match alone."""
    torch.manual_seed(0)
    models = [nn.Sequential(nn.utils.spectral_norm(nn.Linear(4, 3)), nn.Tanh()) for _ in range(2)]
    assert not torch.equal(models[0][0].weight, models[1][0].weight)
    mb = rmb.ModelBatch(models)
    assert stack_key(models[0]) == stack_key(models[1])
    x = torch.randn(5, 4)
    mb.eval()
    out = mb(x)
    for i, m in enumerate(models):
        torch.testing.assert_close(out[i], m.eval()(x))


def _hooked(scale: float) -> nn.Module:
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    m[0].register_forward_hook(lambda mod, args, out: out * scale)
    m[2].register_forward_pre_hook(lambda mod, args: (args[0] + 1.0,))
    return m


def test_module_hooks_run_in_every_slot_and_differing_hooks_never_share_a_stack():
    """A traced (direct) plan calls no hooks: a model with forward hooks runs on vmap's path, where each module is
    called as torch calls it, and a hook with another closure is a setting that splits stacks."""
    torch.manual_seed(0)
    models = [_hooked(2.0) for _ in range(3)]
    mb = rmb.ModelBatch(models)
    assert not mb.uses_direct_path
    x = torch.randn(5, 4)
    out = mb(x)
    for i, m in enumerate(models):
        torch.testing.assert_close(out[i], m(x))
    assert stack_key(_hooked(2.0)) == stack_key(_hooked(2.0)) != stack_key(_hooked(3.0))
    with pytest.raises(IncompatibleModelsError, match=re.escape("module '0': forward hooks (its closure) is 3.0, "
                                                                "not 2.0")):
        rmb.ModelBatch([_hooked(2.0), _hooked(3.0)])


def test_a_gradient_hook_on_a_parameter_is_refused_in_one_line():
    """A stack trains its own tensors, so a hook on the model's parameter would silently never run."""
    m = nn.Linear(4, 2)
    m.weight.register_hook(lambda g: g * 0)
    with pytest.raises(IncompatibleModelsError, match="parameter 'weight' has a gradient hook .* Fix: remove it"):
        rmb.ModelBatch([m])


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
@pytest.mark.parametrize("reparametrize", ["weight_norm", "prune"])
def test_reparametrizations_by_hook_stack_and_train_like_the_model_alone(reparametrize):
    """``nn.utils.weight_norm`` and ``prune`` keep ``weight`` as a tensor a pre-hook computes (not a leaf, which
    ``copy.deepcopy`` refuses): the stack's copy maps it to a placeholder, and every slot trains as alone."""
    from torch.nn.utils import prune

    def make(seed):
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
        if reparametrize == "weight_norm":
            m[0] = nn.utils.weight_norm(m[0])
        else:
            prune.l1_unstructured(m[0], "weight", amount=0.4)
        return m

    lrs = [1e-2, 3e-3, 1e-3]
    mb = rmb.ModelBatch([make(i) for i in range(3)])
    engine = rmb.FusedEngine(mb, rmb.optim.Adam(mb, lr=lrs), F.cross_entropy)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(3, 4, 6, generator=g) for _ in range(4)]
    ys = [torch.randint(0, 3, (3, 4), generator=g) for _ in range(4)]
    for x, y in zip(xs, ys):
        engine.train_step(x, y, per_slot=True)
    out = mb(xs[0], per_slot=True)
    for i in range(3):
        alone = make(i)
        opt = torch.optim.Adam(alone.parameters(), lr=lrs[i])
        for x, y in zip(xs, ys):
            opt.zero_grad()
            F.cross_entropy(alone(x[i]), y[i]).backward()
            opt.step()
        torch.testing.assert_close(out[i], alone(xs[0][i]))


def test_a_host_warns_once_when_its_trials_spread_over_many_small_stacks(caplog):
    """A search space with many widths or batch sizes (Tune's CIFAR tutorial) gives nearly every trial a stack of
    its own, and the sweep fuses little: the host says so once, naming the config keys that decide the stack."""
    from ray_modelbatch.tune.host import SlotHost

    host = SlotHost.__new__(SlotHost)  # only what the warning reads
    host.name, host._warned_keys, host.trials = "host0", set(), {}
    host._stack_keys = {("l1",), ("l2",), ("batch_size",)}
    stack = lambda used: type("G", (), {"used": used})()  # noqa: E731
    with caplog.at_level(logging.WARNING, logger="ray_modelbatch.tune.host"):
        host.groups = {"a": stack(3), "b": stack(2), "c": stack(2), "d": stack(2)}  # 9 trials in 4: fuses
        host._warn_sparse_stacks()
        host.groups.update({"e": stack(1), "f": stack(1), "g": stack(0)})  # 11 trials in 6 held stacks
        # ... but a trial is on its way into a newer (padded) stack of this host: not judged until it is in
        host.trials = {"k": type("A", (), {"moving_to": "host0"})()}
        host._warn_sparse_stacks()
        assert not caplog.records
        host.trials = {"k": type("A", (), {"moving_to": None})()}
        host._warn_sparse_stacks()
        host.groups["h"] = stack(1)
        host._warn_sparse_stacks()
    text = [r.getMessage() for r in caplog.records]
    assert len(text) == 1, text
    assert "11 trials are in 6 stacks" in text[0] and "['batch_size', 'l1', 'l2']" in text[0]
