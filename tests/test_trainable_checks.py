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


@pytest.mark.parametrize("cls, fused", [(torch.optim.AdamW, "AdamW"), (torch.optim.SGD, "SGD")])
def test_a_torch_optim_class_names_the_fused_one(cls, fused):
    with pytest.raises(TypeError, match=rf"torch\.optim class.*use ray_modelbatch\.optim\.{fused}, which takes the same keywords"):
        batched_trainable(**_kw(optimizer=cls))


def test_a_torch_optimizer_without_a_fused_twin_lists_the_fused_ones():
    with pytest.raises(TypeError, match=r"torch\.optim class.*ray_modelbatch\.optim has SGD, Adam, AdamW"):
        batched_trainable(**_kw(optimizer=torch.optim.Adagrad))


def test_fused_optimizers_and_factories_are_accepted():
    for opt in (rmb.optim.SGD, rmb.optim.Adam, functools.partial(rmb.optim.AdamW, compile=False),
                lambda mb: rmb.optim.Adam(mb)):
        assert batched_trainable(**_kw(optimizer=opt))
    with pytest.raises(TypeError, match="optimizer must be a ray_modelbatch.optim class"):
        batched_trainable(**_kw(optimizer="adam"))
