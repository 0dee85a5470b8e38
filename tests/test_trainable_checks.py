"""Mistakes in batched_trainable()'s arguments fail at once, in one line that names the fix (no Ray needed)."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import ray_modelbatch as rmb
from ray_modelbatch.tune import batched_trainable


def _kw(**over):
    kw = dict(model=lambda c: nn.Linear(4, 2), optimizer=rmb.optim.AdamW, hparams=lambda c: {"lr": 1e-3},
              loss=nn.functional.cross_entropy, data=lambda: (torch.zeros(8, 4), torch.zeros(8, dtype=torch.long)) * 2)
    kw.update(over)
    return kw


@pytest.mark.parametrize("cls, fused", [(torch.optim.AdamW, "AdamW"), (torch.optim.SGD, "SGD"),
                                        (torch.optim.Adagrad, "Adagrad"), (torch.optim.RMSprop, "RMSprop")])
def test_a_torch_optim_class_names_the_fused_one(cls, fused):
    with pytest.raises(TypeError, match=rf"torch\.optim class.*use ray_modelbatch\.optim\.{fused}, which takes the same keywords"):
        batched_trainable(**_kw(optimizer=cls))


def test_a_torch_optimizer_without_a_fused_twin_lists_the_fused_ones():
    with pytest.raises(TypeError, match=r"torch\.optim class.*ray_modelbatch\.optim has SGD, Adam, AdamW"):
        batched_trainable(**_kw(optimizer=torch.optim.LBFGS))


def test_fused_optimizers_and_factories_are_accepted():
    for opt in (rmb.optim.SGD, rmb.optim.Adam, functools.partial(rmb.optim.AdamW, compile=False),
                lambda config: rmb.optim.Adam):
        assert batched_trainable(**_kw(optimizer=opt))
    with pytest.raises(TypeError, match="optimizer must be a ray_modelbatch.optim class"):
        batched_trainable(**_kw(optimizer="adam"))


def _group_with(y_val: torch.Tensor, out_features: int):
    from ray_modelbatch.slot_group import SlotGroup, stack_key
    from ray_modelbatch.tune.spec import SlotSpec

    spec = SlotSpec(model=lambda c: None, optimizer=rmb.optim.Adam, hparams=lambda c: {},
                    loss=nn.functional.cross_entropy, data=lambda: None)
    x = torch.randn(8, 4)
    model = nn.Linear(4, out_features)
    return SlotGroup(spec, stack_key(model), model, (x, y_val, x, y_val), 4, "cpu")


def test_float_class_labels_name_the_labels_as_the_fix():
    with pytest.raises(rmb.errors.InputShapeError, match=r"Fix: return y\.long\(\) from data\(\).*The labels are wrong, not the model"):
        _group_with(torch.tensor([0.0, 1.0, 2.0, 1.0, 0.0, 2.0, 1.0, 0.0]), out_features=3)


def test_one_output_for_integer_classes_names_the_model_as_the_fix():
    with pytest.raises(rmb.errors.InputShapeError, match=r"Fix: give the model one output per class"):
        _group_with(torch.tensor([0, 1, 2, 1, 0, 2, 1, 0]), out_features=1)
