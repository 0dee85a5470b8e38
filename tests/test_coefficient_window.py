"""The coefficient window (``optim/coefficient_window.py``) trains every slot exactly as the per-step arithmetic.

Two copies of one stack train side by side, one looking its coefficients up
in the window and one computing them every step (``opt._window = None``), for
more steps than a window holds, through everything that moves a slot's step
count or its coefficients in other ways: steps over a subset of slots, skipped
slots, a slot reset to a fresh model, new hyperparameters, a PBT-style copy,
a snapshot written back into the optimizer's tensors in place (run-ahead's
rollback) and plateau rules. Every schedule kind but the constant one runs in some slot; five slots
put some of them in the scalar tail of the per-step form's vector loops.
"""

import pytest
import torch
from torch import nn

import ray_modelbatch as rmb
from ray_modelbatch.optim import schedules
from ray_modelbatch.optim.coefficient_window import WINDOW_STEPS

from conftest import make_models

S = 5
STEPS = 2 * WINDOW_STEPS + 13
SCHEDULES = [schedules.warmup_cosine(60, 7, 0.1), schedules.one_cycle(70, 0.3), schedules.multi_step([5, 20, 41], 0.5),
             schedules.warmup_linear(9, 50), schedules.step_decay(11, 0.7)]
OTHER_SCHEDULES = [schedules.exponential(0.97), schedules.linear(0.2, 1.0, 30), None, None, None]
BETAS = [(0.9, 0.999), (0.8, 0.99), (0.95, 0.9), (0.5, 0.6), (0.9, 0.95)]
LR = [0.01, 0.005, 0.02, 0.003, 0.008]

CONFIGS = {
    "Adam": dict(lr=LR, betas=BETAS, weight_decay=[0.0, 1e-2, 0.0, 1e-3, 0.1], amsgrad=[False, True, False, True, False],
                 max_grad_norm=[None, 0.5, None, 2.0, None]),
    "AdamW": dict(lr=LR, betas=BETAS, weight_decay=[0.0, 1e-2, 0.05, 1e-3, 0.1],
                  param_groups=[{"params": lambda n, p: p.ndim < 2, "weight_decay": 0.0, "lr_scale": [1, 2, 0.5, 1, 3]}]),
    "SGD": dict(lr=LR, momentum=[0.0, 0.9, 0.5, 0.9, 0.0], nesterov=[False, True, False, False, False],
                dampening=[0.0, 0.0, 0.1, 0.0, 0.0], weight_decay=[0.0, 1e-2, 0.0, 1e-3, 0.1]),
    "RMSprop": dict(lr=LR, alpha=[0.99, 0.9, 0.95, 0.8, 0.9], weight_decay=[0.0, 1e-2, 0.0, 1e-3, 0.0],
                    momentum=[0.0, 0.9, 0.0, 0.5, 0.1], centered=[False, False, True, True, False]),
    "Adagrad": dict(lr=LR, lr_decay=[0.0, 0.01, 0.1, 0.0, 0.02], initial_accumulator_value=[0.0, 0.1, 1.0, 0.5, 0.0]),
    "Adamax": dict(lr=LR, betas=BETAS, weight_decay=[0.0, 0.01, 0.0, 0.1, 0.0]),
    "RAdam": dict(lr=LR, betas=[(0.9, 0.999), (0.8, 0.7), (0.95, 0.68), (0.5, 0.6), (0.9, 0.9)],
                  weight_decay=[0.0, 0.01, 0.05, 0.1, 0.0], decoupled_weight_decay=[False, False, True, True, False]),
}


def _train(name: str, window: bool, plateau: bool) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    mb = rmb.ModelBatch(make_models(S))
    kw = dict(CONFIGS[name], schedule=SCHEDULES)
    if plateau:
        kw["plateau"] = [schedules.plateau(patience=1, factor=0.5)] * S
    opt = getattr(rmb.optim, name)(mb, **kw)
    if not window:
        opt._window = None
    eng = rmb.FusedEngine(mb, opt, nn.functional.mse_loss)
    gen = torch.Generator().manual_seed(1)
    saved = None
    for step in range(STEPS):
        x, y = torch.randn(6, 5, generator=gen), torch.randn(6, 3, generator=gen)
        slots = [0, 2, 3] if step % 4 == 1 else "active"
        skip = torch.tensor([step % 7 == 3, False, step % 5 == 2, False, step % 9 == 0]) if slots == "active" else None
        eng.train_step(x, y, slots=slots, skip=skip)
        # Each event below comes after a refill (at steps 32 and 40) and moves a slot's step count outside the
        # window filled before it: a window that missed the event would read another slot's coefficients.
        if step == 20:
            saved = {k: v[3].clone() for k, v in opt.slot_tensors().items()}
            saved.update({f"mb.{k}": v[3].clone() for k, v in mb.slot_tensors().items()})
        if step == 40:
            opt.set_hparams(4, lr=0.05, schedule=OTHER_SCHEDULES[0])
            opt.set_hparams(0, schedule=OTHER_SCHEDULES[1])
        if step == 45:  # run-ahead's rollback: slot 3's tensors written back in place
            for k, v in opt.slot_tensors().items():
                v[3].copy_(saved[k])
            for k, v in mb.slot_tensors().items():
                v[3].copy_(saved[f"mb.{k}"])
        if step == 50:
            mb.reset_slot(1, make_models(1)[0])
        if step == 60:
            mb.copy_slot(1, 2)  # PBT: slot 2 takes slot 1's weights and optimizer state
        if plateau and step % 6 == 5:
            opt.plateau_step([0, 1, 2, 3, 4], [1.0 + (step % 12 == 5)] * S)
    return [p.detach().clone() for p in mb.parameters()], {k: v.clone() for k, v in opt.slot_tensors().items()}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("plateau", [False, True])
def test_window_trains_as_the_per_step_arithmetic(name, plateau):
    params, state = _train(name, True, plateau)
    params_ref, state_ref = _train(name, False, plateau)
    for got, want in zip(params, params_ref):
        assert torch.equal(got, want)
    assert state.keys() == state_ref.keys()
    for k in state:
        assert torch.equal(state[k], state_ref[k]), k


def test_window_is_refilled_after_its_steps_and_on_changes():
    mb = rmb.ModelBatch(make_models(3))
    opt = rmb.optim.Adam(mb, lr=0.01, schedule=schedules.warmup_cosine(100, 10))
    eng = rmb.FusedEngine(mb, opt, nn.functional.mse_loss)
    fills = []
    original = opt._window._fill
    opt._window._fill = lambda *a: (fills.append(int(opt.steps.max())), original(*a))
    x, y = torch.randn(4, 5), torch.randn(4, 3)
    for _ in range(WINDOW_STEPS + 1):
        eng.train_step(x, y)
    assert fills == [0, WINDOW_STEPS]  # one fill per WINDOW_STEPS steps
    opt.steps[1] = 0.0  # an in-place write by someone else (a restored snapshot)
    eng.train_step(x, y)
    opt.set_hparams(2, lr=0.1)
    eng.train_step(x, y)
    assert len(fills) == 4

