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


def _group_with(y_val: torch.Tensor, out_features: int, y_train: torch.Tensor | None = None,
                loss=nn.functional.cross_entropy):
    from ray_modelbatch.slot_group import SlotGroup, stack_key
    from ray_modelbatch.tune.spec import SlotSpec

    spec = SlotSpec(model=lambda c: None, optimizer=rmb.optim.Adam, hparams=lambda c: {}, loss=loss, data=lambda: None,
                    batch_size=4)
    x = torch.randn(8, 4)
    model = nn.Linear(4, out_features)
    return SlotGroup(spec, stack_key(model), model, (x, y_val if y_train is None else y_train, x, y_val), 4, "cpu")


def test_a_class_label_out_of_range_anywhere_in_the_data_names_the_rows_and_the_range():
    """The first two validation rows are fine; one training label (row 5) and, apart, one validation label
    (row 6) are not: each fails at the stack's start, naming where, the range and the fix."""
    fine = torch.tensor([0, 1, 2, 1, 0, 2, 1, 0])
    bad = fine.clone()
    bad[5] = 3
    with pytest.raises(rmb.errors.InputShapeError, match=r"y_train rows \[\d, 5\]\) have shape \(2,\) and dtype "
                                                         r"torch\.int64, values 0 to 3\. Fix: the labels are class "
                                                         r"indices for a model with 3 outputs .* \[0, 3\)"):
        _group_with(fine, out_features=3, y_train=bad)
    bad_val = fine.clone()
    bad_val[6] = -2
    with pytest.raises(rmb.errors.InputShapeError, match=r"y_val rows \[6, \d\]\).*values -2 to \d"):
        _group_with(bad_val, out_features=3, y_train=fine)
    assert _group_with(fine, out_features=3, y_train=torch.tensor([0, 1, 2, -100, 0, 2, 1, 0]))  # ignore_index


def test_a_loss_of_one_value_per_example_fails_at_the_stacks_start():
    with pytest.raises(TypeError, match=r"the loss '<lambda>' returned a tensor of shape \[2\] for one model"):
        _group_with(torch.tensor([0, 1, 2, 1, 0, 2, 1, 0]), out_features=3,
                    loss=lambda out, y: nn.functional.cross_entropy(out, y, reduction="none"))


def test_float_class_labels_name_the_labels_as_the_fix():
    with pytest.raises(rmb.errors.InputShapeError, match=r"Fix: return y\.long\(\) from data\(\).*The labels are wrong, not the model"):
        _group_with(torch.tensor([0.0, 1.0, 2.0, 1.0, 0.0, 2.0, 1.0, 0.0]), out_features=3)


def test_one_output_for_integer_classes_names_the_model_as_the_fix():
    with pytest.raises(rmb.errors.InputShapeError, match=r"Fix: give the model one output per class"):
        _group_with(torch.tensor([0, 1, 2, 1, 0, 2, 1, 0]), out_features=1)
