"""The direct path for CNNs (fast_path: grouped convolution, stacked BatchNorm, pooling, reshapes).

Every slot must train exactly like the same module alone with ``torch.optim``:
same parameters, same BatchNorm running statistics and batch counts, same
outputs in eval mode, to float rounding.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import ray_modelbatch as rmb


class SmallCNN(nn.Module):
    """conv-BN-ReLU x2, max-pool, flatten, linear, on flat 64-feature inputs reshaped to 8x8 images."""

    def __init__(self, width: int = 3, groups: int = 1):
        super().__init__()
        # No bias before BatchNorm: BN cancels it, so its true gradient is zero and Adam would turn
        # the rounding noise in it into lr-sized steps that differ from run to run.
        self.features = nn.Sequential(
            nn.Conv2d(1, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, groups=groups, bias=False), nn.BatchNorm2d(2 * width),
            nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Linear(2 * width * 16, 10)

    def forward(self, x):
        return self.head(self.features(x.view(-1, 1, 8, 8)).flatten(1))


def seq1d() -> nn.Module:
    """Conv1d with groups, AvgPool1d, BatchNorm1d after a Linear, an nn.Flatten module."""
    return nn.Sequential(
        nn.Conv1d(4, 6, 3, groups=2), nn.ReLU(), nn.AvgPool1d(2), nn.Flatten(),
        nn.Linear(6 * 3, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3),
    )


def calls_of(monkeypatch, module, name: str) -> list:
    """A list that grows by one at every call of ``module.name`` (which still runs)."""
    calls: list = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def state_close(mb: rmb.ModelBatch, solo: list[nn.Module], atol: float = 2e-5) -> None:
    for i, m in enumerate(solo):
        got = mb.slot_state(i)
        for k, v in m.state_dict().items():
            if v.is_floating_point():
                torch.testing.assert_close(got[k], v, rtol=1e-4, atol=atol, msg=f"slot {i} {k}")
            else:
                assert torch.equal(got[k].to(v.dtype), v), (i, k)


def steps_match_solo(mb: rmb.ModelBatch, models: list[nn.Module], x: torch.Tensor, y: torch.Tensor, steps: int,
                     opt_name: str = "Adam", **kw) -> list[nn.Module]:
    """``steps`` fused steps of ``mb`` on one batch leave every slot as ``torch.optim``'s leave a copy of its
    model (``models`` as they were when ``mb`` was built); returns those copies."""
    kw = kw or {"lr": 1e-2}
    eng = rmb.FusedEngine(mb, getattr(rmb.optim, opt_name)(mb, **kw), nn.functional.cross_entropy)
    solo = [copy.deepcopy(m) for m in models]
    opts = [getattr(torch.optim, opt_name)(m.parameters(), **kw) for m in solo]
    for _ in range(steps):
        eng.train_step(x, y)
        for m, o in zip(solo, opts):
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()
    state_close(mb, solo)
    return solo


@pytest.mark.parametrize("opt_name", ["SGD", "Adam"])
@pytest.mark.parametrize("groups", [1, 2])
def test_cnn_slots_train_like_solo_modules(opt_name, groups):
    torch.manual_seed(0)
    models = [SmallCNN(groups=groups) for _ in range(5)]
    mb = rmb.ModelBatch([copy.deepcopy(m) for m in models])
    assert mb.uses_direct_path and not mb.gather_exact
    kw = {"lr": 0.05, "momentum": 0.9} if opt_name == "SGD" else {"lr": 1e-2}
    x, y = torch.randn(16, 64), torch.randint(0, 10, (16,))
    solo = steps_match_solo(mb, models, x, y, 6, opt_name, **kw)
    mb.eval()
    with torch.no_grad():
        out = mb(x)
        for i, m in enumerate(solo):
            torch.testing.assert_close(out[i], m.eval()(x), rtol=1e-4, atol=1e-5)


def test_cnn_per_slot_batches_and_slot_subsets():
    """Per-slot inputs; a step of some slots leaves the others' weights and BatchNorm statistics untouched."""
    torch.manual_seed(1)
    models = [SmallCNN() for _ in range(4)]
    mb = rmb.ModelBatch([copy.deepcopy(m) for m in models])
    eng = rmb.FusedEngine(mb, rmb.optim.SGD(mb, lr=0.1), nn.functional.cross_entropy)
    solo = [copy.deepcopy(m) for m in models]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in solo]
    xs, ys = torch.randn(4, 12, 64), torch.randint(0, 10, (4, 12))
    for slots in ([0, 1, 2, 3], [1, 3], [2], [0, 1, 2, 3]):
        eng.train_step(xs[slots], ys[slots], slots=slots, per_slot=True)
        for s in slots:
            opts[s].zero_grad()
            nn.functional.cross_entropy(solo[s](xs[s]), ys[s]).backward()
            opts[s].step()
    state_close(mb, solo)
    assert [int(mb.slot_state(i)["features.1.num_batches_tracked"]) for i in range(4)] == [2, 3, 3, 3]


def test_conv1d_pool_flatten_batchnorm1d_match_vmap():
    torch.manual_seed(2)
    models = [seq1d() for _ in range(3)]
    direct = rmb.ModelBatch([copy.deepcopy(m) for m in models])
    vmapped = rmb.ModelBatch([copy.deepcopy(m) for m in models], direct_path=False)
    assert direct.uses_direct_path and not vmapped.uses_direct_path
    x, xs, y = torch.randn(10, 4, 8), torch.randn(3, 10, 4, 8), torch.randn(10, 3)
    torch.testing.assert_close(direct(x), vmapped(x))
    torch.testing.assert_close(direct(xs, per_slot=True), vmapped(xs, per_slot=True))
    for mb in (direct, vmapped):
        mb.zero_grad()
        loss, _ = mb.forward_loss(x, y, nn.functional.mse_loss)
        loss.sum().backward()
        mb.sync_grads()
    for name in direct.params:
        torch.testing.assert_close(direct.params[name].grad, vmapped.params[name].grad, rtol=1e-4, atol=1e-6)
    for name in direct.buffers:
        torch.testing.assert_close(direct.buffers[name], vmapped.buffers[name])


class UpDown2d(nn.Module):
    """A small decoder shape: a strided convolution down, a transposed convolution (output_padding) back up."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1, output_padding=1)
        self.head = nn.Linear(2 * 64, 10)

    def forward(self, x):
        return self.head(torch.relu(self.up(torch.relu(self.down(x.view(-1, 1, 8, 8))))).flatten(1))


def up1d() -> nn.Module:
    """ConvTranspose1d first (on the shared batch), then a grouped one with dilation, BatchNorm1d between (no bias
    before it: see SmallCNN)."""
    return nn.Sequential(nn.ConvTranspose1d(4, 6, 3, stride=2, bias=False), nn.BatchNorm1d(6), nn.ReLU(),
                         nn.ConvTranspose1d(6, 4, 2, groups=2, dilation=2), nn.Flatten(), nn.Linear(4 * 19, 3))


@pytest.mark.parametrize("per_slot", [False, True], ids=["shared", "per_slot"])
@pytest.mark.parametrize("make", [UpDown2d, up1d], ids=["conv_transpose2d", "conv_transpose1d"])
def test_transposed_convolutions_train_like_solo_modules(make, per_slot):
    torch.manual_seed(4)
    models = [make() for _ in range(3)]
    mb = rmb.ModelBatch([copy.deepcopy(m) for m in models])
    assert mb.uses_direct_path and not mb._slow_keys
    loss = nn.functional.cross_entropy if make is UpDown2d else nn.functional.mse_loss
    eng = rmb.FusedEngine(mb, rmb.optim.Adam(mb, lr=1e-2), loss)
    solo = [copy.deepcopy(m) for m in models]
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in solo]
    shape = (64,) if make is UpDown2d else (4, 8)
    xs = torch.randn(3, 12, *shape)
    ys = torch.randint(0, 10, (3, 12)) if make is UpDown2d else torch.randn(3, 12, 3)
    for _ in range(4):
        if per_slot:
            eng.train_step(xs, ys, per_slot=True)
        else:
            eng.train_step(xs[0], ys[0])
        for i, (m, o) in enumerate(zip(solo, opts)):
            o.zero_grad()
            j = i if per_slot else 0
            loss(m(xs[j]), ys[j]).backward()
            o.step()
    assert not mb._slow_keys  # it stayed on the direct path
    state_close(mb, solo)
    mb.eval()
    with torch.no_grad():
        out = mb(xs[0])
        for i, m in enumerate(solo):
            torch.testing.assert_close(out[i], m.eval()(xs[0]), rtol=1e-4, atol=1e-5)


def test_layers_without_a_direct_kernel_fall_back_to_vmap():
    reflect = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"), nn.Flatten(), nn.Linear(128, 2))
    mb = rmb.ModelBatch([copy.deepcopy(reflect) for _ in range(2)])
    assert not mb.uses_direct_path
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(mb(x)[0], copy.deepcopy(reflect)(x), rtol=1e-5, atol=1e-6)
    # BatchNorm with momentum=None (a cumulative average) has no direct kernel either.
    cumulative = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, momentum=None), nn.Linear(4, 2))
    assert not rmb.ModelBatch([copy.deepcopy(cumulative) for _ in range(2)]).uses_direct_path


def test_flatten_with_a_negative_start_dim():
    """``nn.Flatten(-3)`` on [B, C, H, W] keeps only the batch dimension; ``Flatten(-2)`` keeps [B, C] and the
    Linear after it acts on each channel's row: both run directly (no fallback) and match the model alone."""
    torch.manual_seed(3)
    for start in (-3, -2):
        tail = nn.Linear(2 * 16, 2) if start == -3 else nn.Linear(16, 2)
        model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.MaxPool2d(2), nn.Flatten(start), tail)
        mb = rmb.ModelBatch([copy.deepcopy(model) for _ in range(3)])
        x = torch.randn(5, 1, 8, 8)
        out = mb(x)
        assert mb.uses_direct_path and not mb._slow_keys
        torch.testing.assert_close(out[1], model(x), rtol=1e-5, atol=1e-6)


class HeadCNN(nn.Module):
    """conv-ReLU-pool, then the feature map flattened into the head in one of the ways scripts write it."""

    def __init__(self, flatten: str) -> None:
        super().__init__()
        self.conv, self.pool = nn.Conv2d(1, 3, 3, padding=1), nn.MaxPool2d(2)
        self.flat = nn.Flatten(-3 if flatten == "module-3" else 1)
        self.head = nn.Linear(3 * 4 * 4, 5)
        self.flatten = flatten

    def forward(self, x):
        h = self.pool(torch.relu(self.conv(x)))
        if self.flatten.startswith("module"):
            h = self.flat(h)
        else:
            h = torch.flatten(h, 1) if self.flatten == "torch" else h.flatten(start_dim=1)
        return self.head(h)


@pytest.mark.parametrize("flatten", ["module", "module-3", "torch", "method"])
def test_a_flattened_feature_map_meets_its_head_in_one_step_and_trains_like_solo_modules(flatten, monkeypatch):
    """``head(flatten(x, 1))`` after a convolution reads the channels-last map in (row, column, channel) order
    against a column-permuted weight (fast_path._flatten_into_linear); its gradients go back into the weight's
    own order, so every slot trains as its module alone."""
    from ray_modelbatch import fast_path

    calls = []
    real = fast_path._FeatureMapLinear.apply
    monkeypatch.setattr(fast_path._FeatureMapLinear, "apply", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(4)
    models = [HeadCNN(flatten) for _ in range(3)]
    mb = rmb.ModelBatch([copy.deepcopy(m) for m in models])
    plan = mb._plan()
    assert "flatten_linear" in [s.kind for s in plan.steps] and "flatten" not in [s.kind for s in plan.steps]
    assert plan.kinds()["head"] == "linear"
    if flatten.startswith("module"):
        assert plan.kinds()["flat"] == "flatten"  # what check_model reports for the module
    steps_match_solo(mb, models, torch.randn(8, 1, 8, 8), torch.randint(0, 5, (8,)), 4)
    assert calls  # the permuted form ran


def test_a_flattened_head_hands_autograd_its_gradients_and_second_derivatives():
    """Outside the engine (no flat-buffer targets) the head's weight gradient goes to autograd in the weight's
    order; a gradient penalty differentiates through its backward, as vmap's path does."""
    torch.manual_seed(5)
    models = [HeadCNN("torch") for _ in range(2)]
    x = torch.randn(6, 1, 8, 8)
    grads, penalties = [], []
    for direct in (True, False):
        mb = rmb.ModelBatch(models, direct_path=direct)
        mb(x).square().sum().backward()
        grads.append([p.grad.clone() for p in mb.params.values()])
        xs = x.expand(2, *x.shape).clone().requires_grad_()
        (gx,) = torch.autograd.grad(mb(xs, per_slot=True).square().sum(), xs, create_graph=True)
        penalties.append(torch.autograd.grad(gx.square().sum(), list(mb.params.values())))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for a, b in zip(*penalties):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_a_flatten_read_elsewhere_or_of_plain_inputs_keeps_its_own_step():
    """A flattened value that another layer also reads is not merged; an MLP flattening its image input (no
    convolution before it) runs the head as before, so the stack stays gather-exact."""

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.head, self.side = nn.Conv2d(1, 2, 3, padding=1), nn.Linear(2 * 64, 3), nn.Linear(2 * 64, 3)

        def forward(self, x):
            h = self.conv(x).flatten(1)
            return self.head(h) + self.side(h)

    assert "flatten_linear" not in [s.kind for s in rmb.ModelBatch([Twice() for _ in range(2)])._plan().steps]
    torch.manual_seed(6)
    models = [nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 3)) for _ in range(3)]
    mb = rmb.ModelBatch([copy.deepcopy(m) for m in models])
    assert mb.gather_exact and "flatten_linear" in [s.kind for s in mb._plan().steps]
    x = torch.randn(5, 1, 8, 8)
    out = mb(x)
    for i, m in enumerate(models):
        torch.testing.assert_close(out[i], m(x), rtol=1e-6, atol=1e-6)


class ReluPoolCNN(nn.Module):
    """One input channel (an image model's first layer); conv-ReLU-max-pool twice, the ReLU written as a module
    and as ``relu2`` (a function or a method)."""

    def __init__(self, relu2: str = "torch") -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 6, 3, padding=1)
        self.act, self.pool = nn.ReLU(), nn.MaxPool2d(2)
        self.pool2, self.head = nn.MaxPool2d(2), nn.Linear(6 * 2 * 2, 5)
        self.relu2 = relu2

    def forward(self, x):
        h = self.pool(self.act(self.c1(x)))
        h = self.c2(h)
        h = {"torch": torch.relu, "F": nn.functional.relu, "method": torch.Tensor.relu}[self.relu2](h) if (
            self.relu2 != "method") else h.relu()
        return self.head(self.pool2(h).flatten(1))


def test_max_pool_of_relu_is_relu_of_max_pool_in_values_and_gradients():
    """The direct path pools before the ReLU; that is exact, ties at zero and all-negative windows included."""
    x = torch.randn(4, 3, 8, 8)
    x[0, 0, :4, :4] = -torch.rand(4, 4)  # windows without a positive value
    x[1, 1, :4] = 0.0  # windows of zeros: ties
    x[2, 2, :, :2] = -0.0
    grads = []
    for swapped in (False, True):
        t = x.clone().requires_grad_()
        p = nn.functional.relu(nn.functional.max_pool2d(t, 2)) if swapped else nn.functional.max_pool2d(
            nn.functional.relu(t), 2)
        p.backward(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
        grads.append((p.detach(), t.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@pytest.mark.parametrize("relu2", ["torch", "F", "method"])
def test_relu_then_max_pool_runs_pooled_first_and_trains_like_solo_modules(relu2):
    torch.manual_seed(2)
    models = [ReluPoolCNN(relu2) for _ in range(3)]
    mb = rmb.ModelBatch([copy.deepcopy(m) for m in models])
    kinds = [s.kind for s in mb._plan().steps if s.kind in ("pool", "module", "function")]
    assert kinds == ["pool", "module", "pool", "function"], kinds  # both ReLU-pool pairs swapped
    steps_match_solo(mb, models, torch.randn(8, 1, 8, 8), torch.randint(0, 5, (8,)), 5)


def test_a_relu_read_elsewhere_is_not_moved():
    class Branch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c, self.pool, self.head = nn.Conv2d(1, 2, 3, padding=1), nn.MaxPool2d(2), nn.Linear(2 * 16 + 2, 3)

        def forward(self, x):
            r = torch.relu(self.c(x))
            return self.head(torch.cat([self.pool(r).flatten(1), r.mean((2, 3))], 1))

    mb = rmb.ModelBatch([Branch() for _ in range(2)])
    kinds = [s.kind for s in mb._plan().steps]
    assert kinds.index("function") < kinds.index("pool")


class ResidualBlock(nn.Module):
    """conv-BN-ReLU, conv-BN plus the input, ReLU; a ReLU of a max pool; and the ReLUs that must copy: of a
    ``tanh`` (whose backward reads its output), of a value read twice, and of the model's input."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)
        self.c2, self.b2 = nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)
        self.act, self.pool, self.head = nn.ReLU(), nn.MaxPool2d(2), nn.Linear(3 * 4 * 4 + 3, 4)

    def forward(self, x):
        h = self.act(self.b1(self.c1(x)))
        h = torch.relu(self.b2(self.c2(h)) + x)
        t = torch.tanh(h)
        twice = self.c1(t)
        side = (torch.relu(torch.tanh(h)).mean((2, 3)) + nn.functional.relu(twice).mean((2, 3))
                + twice.mean((2, 3)) + torch.relu(x).mean((2, 3)))
        return self.head(torch.cat([nn.functional.relu(self.pool(t)).flatten(1), side], 1))


def test_a_relu_overwrites_its_input_only_where_nothing_else_reads_it(monkeypatch):
    """In place after BatchNorm, a residual addition and a max pool; a copy after tanh, for a value read twice,
    and for the model's input. The slots train like the modules alone, and to the bit as with every ReLU
    a copy."""
    torch.manual_seed(3)
    models = [ResidualBlock() for _ in range(3)]
    mb = rmb.ModelBatch([copy.deepcopy(m) for m in models])
    assert mb.uses_direct_path
    relus = [s for s in mb._plan().steps if s.kind in ("module", "function") and (
        s.target in (torch.relu, nn.functional.relu) or s.target == "act")]
    assert [s.in_place for s in relus] == [True, True, False, False, False, True], [
        (s.target, s.in_place) for s in relus]
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))
    steps_match_solo(mb, models, x, y, 3)

    from ray_modelbatch import fast_path
    trained = []
    for in_place in (True, False):
        if not in_place:
            monkeypatch.setattr(fast_path, "_relu_in_place", lambda steps, output, modules: steps)
        stack = rmb.ModelBatch([copy.deepcopy(m) for m in models])
        assert any(s.in_place for s in stack._plan().steps) == in_place
        engine = rmb.FusedEngine(stack, rmb.optim.Adam(stack, lr=1e-2), nn.functional.cross_entropy)
        for _ in range(3):
            engine.train_step(x, y)
        trained.append([p.detach().clone() for p in stack.params.values()])
    assert all(torch.equal(a, b) for a, b in zip(*trained))


def test_one_channel_stacks_stay_channels_last_forward_and_backward():
    """A one-channel input counts as contiguous in both memory formats; the stack must still run
    channels-last (oneDNN's grouped convolution and pooling are 2-20x slower on NCHW), and the
    gradient coming back through the flatten must arrive channels-last, not NCHW."""
    mb = rmb.ModelBatch([nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.MaxPool2d(2), nn.Flatten(),
                                       nn.Linear(4 * 4 * 4, 3)) for _ in range(4)])
    seen = []

    def watch(module, inputs, output):
        seen.append(("in", inputs[0].is_contiguous(memory_format=torch.channels_last)))
        # A Node's pre-hook sees the gradient the pooling's backward gets, after every tensor hook.
        output.grad_fn.register_prehook(
            lambda grads: seen.append(("grad", grads[0].is_contiguous(memory_format=torch.channels_last))))

    assert mb.uses_direct_path  # the plan, made before the test's hook (a hooked model would go to vmap)
    mb._template.get_submodule("1").register_forward_hook(watch)
    mb(torch.randn(8, 1, 8, 8)).sum().backward()
    assert seen == [("in", True), ("grad", True)], seen


def test_a_global_average_pool_hands_back_a_channels_last_gradient():
    """A pool to one value per channel runs as a mean, whose backward broadcasts an NCHW gradient; the
    ReLU before it would then run its backward on mixed memory formats (7x slower). The gradient must
    reach the ReLU channels-last, and the slots must still train like the modules alone."""
    def make() -> nn.Module:
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Watch(TorchDispatchMode):  # the format of the gradient the ReLU's backward reads
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.threshold_backward.default:
                seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    solo = [make() for _ in range(3)]
    mb = rmb.ModelBatch(solo)
    assert mb.uses_direct_path
    opt = rmb.optim.SGD(mb, lr=0.1, momentum=0.9)
    engine = rmb.FusedEngine(mb, opt, nn.functional.cross_entropy)
    refs = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in solo]
    for step in range(3):
        x, y = torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))
        with Watch():
            engine.train_step(x, y)
        for m, o in zip(solo, refs):
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()
    assert seen == [True] * 3, seen
    state_close(mb, solo)


def _bn_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def test_batchnorm_gradients_are_as_accurate_as_each_model_alone():
    """Torch's channels-last BatchNorm kernels sum each channel in one running fp32 sum; through a
    BatchNorm's backward (a difference of nearly equal terms) the fused gradients were up to 1e-3 off
    an fp64 reference where each model alone is 1e-5 off. The fused slots must be as accurate as the
    models alone, and keep the same running statistics."""
    torch.manual_seed(0)
    solo = [_bn_net() for _ in range(4)]
    mb = rmb.ModelBatch(solo)
    assert mb.uses_direct_path
    x, y = torch.randn(64, 1, 16, 16), torch.randint(0, 10, (64,))
    losses, _ = mb.forward_loss(x, y, nn.functional.cross_entropy)
    fused = dict(zip(mb.params, torch.autograd.grad(losses.sum(), list(mb.params.values()))))
    for i, m in enumerate(solo):
        exact = copy.deepcopy(m).double()
        nn.functional.cross_entropy(exact(x.double()), y).backward()
        alone = copy.deepcopy(m)
        nn.functional.cross_entropy(alone(x), y).backward()
        ref, own = dict(exact.named_parameters()), dict(alone.named_parameters())
        for name, p in ref.items():
            scale = float(p.grad.abs().max())
            fused_err = float((fused[name][i].double() - p.grad).abs().max()) / scale
            alone_err = float((own[name].grad.double() - p.grad).abs().max()) / scale
            assert fused_err <= max(5 * alone_err, 2e-5), (i, name, fused_err, alone_err)
        got = mb.slot_state(i)
        for name, v in alone.state_dict().items():
            if v.is_floating_point():
                torch.testing.assert_close(got[name], v, rtol=1e-5, atol=1e-6, msg=f"slot {i} {name}")


def test_batchnorm_on_the_direct_path_has_second_derivatives():
    """A gradient penalty differentiates through BatchNorm's backward: the direct path's must be
    differentiable and agree with vmap's."""
    torch.manual_seed(0)
    models = [_bn_net() for _ in range(2)]
    x = torch.randn(16, 1, 8, 8)
    penalties = []
    for direct in (True, False):
        mb = rmb.ModelBatch(models, direct_path=direct)
        xs = x.expand(2, *x.shape).clone().requires_grad_()
        (gx,) = torch.autograd.grad(mb(xs, per_slot=True).square().sum(), xs, create_graph=True)
        penalty = gx.square().sum()
        penalties.append(torch.autograd.grad(penalty, list(mb.params.values())))
    for a, b in zip(*penalties):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _conv_flag():
    from ray_modelbatch.conv_precision import _cudnn_conv_flag
    owner, name, _ = _cudnn_conv_flag()
    return getattr(owner, name)


def test_full_precision_turns_cudnn_tf32_off_in_forward_and_backward_and_restores_it():
    from ray_modelbatch import conv_precision
    _, _, full = conv_precision._cudnn_conv_flag()
    before = _conv_flag()
    seen = []

    class Record(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            seen.append(("forward", _conv_flag()))
            return x * 2

        @staticmethod
        def backward(ctx, g):
            seen.append(("backward", _conv_flag()))
            return g * 2

    x = torch.ones(3, requires_grad=True)
    out = conv_precision.full_precision(lambda: Record.apply(x))
    assert _conv_flag() == before  # only while the convolution runs
    out.sum().backward()
    assert seen == [("forward", full), ("backward", full)]
    assert _conv_flag() == before and conv_precision._depth == 0
    assert torch.equal(x.grad, torch.full((3,), 2.0))


def test_only_fp32_cuda_convolutions_need_it_and_tf32_matmuls_opt_out(monkeypatch):
    from types import SimpleNamespace

    from ray_modelbatch.conv_precision import needs_full_precision
    cuda = SimpleNamespace(is_cuda=True, dtype=torch.float32)
    assert not needs_full_precision(torch.ones(1))
    assert not needs_full_precision(SimpleNamespace(is_cuda=True, dtype=torch.bfloat16))
    assert needs_full_precision(cuda)
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert not needs_full_precision(cuda)


def test_the_direct_path_runs_every_convolution_in_full_precision_where_needed(monkeypatch):
    """As on CUDA (needs_full_precision forced): each convolution goes through full_precision, the
    slots still train like each module alone, and the user's flag is back after the steps."""
    from ray_modelbatch import conv_precision
    calls = []
    real = conv_precision.full_precision
    monkeypatch.setattr(conv_precision, "needs_full_precision", lambda t: True)
    monkeypatch.setattr(conv_precision, "full_precision", lambda call: calls.append(1) or real(call))
    before = _conv_flag()
    torch.manual_seed(0)
    models = [SmallCNN() for _ in range(3)]
    mb = rmb.ModelBatch([copy.deepcopy(m) for m in models])
    assert mb.uses_direct_path
    opt = rmb.optim.Adam(mb, lr=1e-2)
    engine = rmb.FusedEngine(mb, opt, nn.functional.cross_entropy)
    solo_opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in models]
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(16, 64, generator=g), torch.randint(0, 10, (16,), generator=g)
        engine.train_step(x, y)
        for m, o in zip(models, solo_opts):
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()
    assert len(calls) == 3 * 2  # two convolutions per step
    assert _conv_flag() == before and conv_precision._depth == 0
    state_close(mb, models)


def test_a_direct_path_that_fails_unexpectedly_says_so_and_vmap_runs_the_call(monkeypatch):
    from ray_modelbatch import fast_path
    from ray_modelbatch.errors import FusionWarning
    torch.manual_seed(0)
    models = [SmallCNN() for _ in range(2)]
    x = torch.randn(4, 64)
    want = rmb.ModelBatch([copy.deepcopy(m) for m in models], direct_path=False)(x)

    mb = rmb.ModelBatch([copy.deepcopy(m) for m in models])
    monkeypatch.setattr(mb, "_run_direct", lambda *a: (_ for _ in ()).throw(RuntimeError("boom on cuda")))
    with pytest.warns(FusionWarning, match=r"direct fused path failed \(RuntimeError: boom on cuda\)"):
        got = mb(x)
    torch.testing.assert_close(got, want)

    blank = rmb.ModelBatch([copy.deepcopy(m) for m in models])  # an error without a message
    monkeypatch.setattr(blank, "_run_direct", lambda *a: (_ for _ in ()).throw(RuntimeError()))
    with pytest.warns(FusionWarning, match=r"direct fused path failed \(RuntimeError: \)"):
        torch.testing.assert_close(blank(x), want)

    quiet = rmb.ModelBatch([copy.deepcopy(m) for m in models])  # a layout the plan does not take: expected
    monkeypatch.setattr(quiet, "_run_direct", lambda *a: (_ for _ in ()).throw(fast_path.Unsupported("layout")))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FusionWarning)
        torch.testing.assert_close(quiet(x), want)


class NormCNN(nn.Module):
    """GroupNorm, InstanceNorm2d (affine) and InstanceNorm1d, F.max_pool2d (stride, padding) after a ReLU,
    F.avg_pool1d and F.adaptive_avg_pool1d, as scripts write them in forward. (No bias before an instance norm,
    which cancels it: its gradient is zero but for rounding, which Adam turns into lr-sized steps.)"""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.gn = nn.Conv2d(1, 8, 3, padding=1), nn.GroupNorm(4, 8)
        self.c2, self.inorm = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.InstanceNorm2d(8, affine=True)
        self.c3, self.in1 = nn.Conv1d(8, 4, 3, padding=1, bias=False), nn.InstanceNorm1d(4)
        self.head = nn.Linear(4 * 8, 5)

    def forward(self, x):
        h = nn.functional.max_pool2d(torch.relu(self.gn(self.c1(x))), 3, stride=2, padding=1)  # 8x8 -> 4x4
        h = nn.functional.relu(self.inorm(self.c2(h)))
        h = nn.functional.avg_pool1d(self.in1(self.c3(h.flatten(2))), 2)  # [B, 4, 16] -> [B, 4, 8]
        return self.head(nn.functional.adaptive_avg_pool1d(h, 8).flatten(1))


def directly_trains_like_solo_modules(make, per_slot: bool, steps: int = 4, seed: int = 0) -> rmb.ModelBatch:
    """Three slots of ``make()`` on 8x8 images (shared or per-slot batches), Adam against each module alone with
    torch.optim.Adam: every call on the direct path, parameters, buffers and eval outputs equal to rounding."""
    torch.manual_seed(seed)
    models = [make() for _ in range(3)]
    mb = rmb.ModelBatch([copy.deepcopy(m) for m in models])
    assert mb.uses_direct_path
    eng = rmb.FusedEngine(mb, rmb.optim.Adam(mb, lr=1e-2), nn.functional.cross_entropy)
    solo = [copy.deepcopy(m) for m in models]
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in solo]
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        x = torch.randn(3, 8, 1, 8, 8, generator=g) if per_slot else torch.randn(8, 1, 8, 8, generator=g)
        y = torch.randint(0, 5, (3, 8) if per_slot else (8,), generator=g)
        eng.train_step(x, y, per_slot=per_slot)
        for i, (m, o) in enumerate(zip(solo, opts)):
            o.zero_grad()
            nn.functional.cross_entropy(m(x[i] if per_slot else x), y[i] if per_slot else y).backward()
            o.step()
    assert not mb._slow_keys  # nothing fell back to vmap
    state_close(mb, solo)
    mb.eval()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        out = mb(x)
    for i, m in enumerate(solo):
        torch.testing.assert_close(out[i], m.eval()(x), rtol=1e-4, atol=1e-5)
    return mb


class UnflattenDecoder(nn.Module):
    """A generator's shape: a Linear's rows unflattened into a feature map for a transposed convolution, as
    ``nn.Unflatten`` (the module) or ``Tensor.unflatten`` (the method)."""

    def __init__(self, form: str = "module"):
        super().__init__()
        self.form = form
        self.project = nn.Linear(64, 4 * 4 * 4)
        self.unflatten = nn.Unflatten(1, (4, 4, 4))
        self.up = nn.ConvTranspose2d(4, 2, 4, stride=2, padding=1)
        self.head = nn.Linear(2 * 8 * 8, 5)

    def forward(self, x):
        h = self.project(x.flatten(1))
        h = self.unflatten(h) if self.form == "module" else h.unflatten(-1, (4, 4, 4))
        return self.head(torch.relu(self.up(h)).flatten(1))


@pytest.mark.parametrize("form", ["module", "method"])
@pytest.mark.parametrize("per_slot", [False, True])
def test_unflatten_runs_directly_and_trains_like_solo_modules(per_slot, form):
    mb = directly_trains_like_solo_modules(lambda: UnflattenDecoder(form), per_slot, seed=2)
    assert "unflatten" in [s.kind for s in mb._plan().steps]


@pytest.mark.parametrize("per_slot", [False, True])
def test_group_and_instance_norm_and_functional_pools_run_directly_and_train_like_solo_modules(per_slot):
    mb = directly_trains_like_solo_modules(NormCNN, per_slot, steps=5, seed=4)
    kinds = [s.kind for s in mb._plan().steps]
    assert {"group_norm", "pool_function"} <= set(kinds)
    assert kinds.index("pool_function") < kinds.index("function")  # F.max_pool2d(relu(.)) pools first


def test_group_norm_after_a_linear_layer_runs_directly_and_matches_vmap():
    model = nn.Sequential(nn.Linear(5, 8), nn.GroupNorm(2, 8), nn.ReLU(), nn.Linear(8, 3))
    direct = rmb.ModelBatch([copy.deepcopy(model) for _ in range(3)])
    vmapped = rmb.ModelBatch([copy.deepcopy(model) for _ in range(3)], direct_path=False)
    assert direct.uses_direct_path
    x, y = torch.randn(16, 5), torch.randn(16, 3)
    for mb in (direct, vmapped):
        mb.zero_grad()
        loss, _ = mb.forward_loss(x, y, nn.functional.mse_loss)
        loss.sum().backward()
        mb.sync_grads()
    torch.testing.assert_close(direct(x), vmapped(x))
    for name in direct.params:
        torch.testing.assert_close(direct.params[name].grad, vmapped.params[name].grad, rtol=1e-5, atol=1e-6)


def test_norms_and_pools_the_direct_path_does_not_take_fall_back_to_vmap():
    """InstanceNorm with running statistics, and a max pool that returns its indices: vmap, same results."""
    tracked = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.InstanceNorm2d(2, track_running_stats=True),
                            nn.Flatten(), nn.Linear(128, 2))
    assert not rmb.ModelBatch([copy.deepcopy(tracked) for _ in range(2)]).uses_direct_path

    class Indices(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c, self.head = nn.Conv2d(1, 2, 3, padding=1), nn.Linear(32, 2)

        def forward(self, x):
            h, idx = nn.functional.max_pool2d(self.c(x), 2, return_indices=True)
            return self.head(h.flatten(1)) + 0 * idx.sum()

    model = Indices()
    mb = rmb.ModelBatch([copy.deepcopy(model) for _ in range(2)])
    x = torch.randn(5, 1, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = mb(x)
    torch.testing.assert_close(out[1], model(x), rtol=1e-5, atol=1e-6)


class Upsampler(nn.Module):
    """A convolutional decoder's layers: nn.Upsample (nearest), F.interpolate (bilinear), PixelShuffle and
    PixelUnshuffle, between convolutions."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.up = nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.Upsample(scale_factor=2)
        self.c2, self.shuffle = nn.Conv2d(4, 8, 3, padding=1), nn.PixelShuffle(2)  # 8 channels -> 2, 2x size
        self.unshuffle, self.c3 = nn.PixelUnshuffle(2), nn.Conv2d(8, 2, 3, padding=1)
        self.head = nn.Linear(2 * 8 * 8, 5)

    def forward(self, x):
        h = self.up(torch.relu(self.c1(x)))  # 8x8 -> 4x4 -> 8x8
        h = self.unshuffle(self.shuffle(torch.tanh(self.c2(h))))  # 8x8 -> 16x16 -> 8x8
        h = nn.functional.interpolate(self.c3(h), scale_factor=0.5, mode="bilinear", align_corners=False)
        h = nn.functional.interpolate(h, size=(8, 8), mode="nearest")
        return self.head(h.flatten(1))


@pytest.mark.parametrize("per_slot", [False, True])
def test_upsampling_and_pixel_shuffles_run_directly_and_train_like_solo_modules(per_slot):
    directly_trains_like_solo_modules(Upsampler, per_slot, seed=5)
