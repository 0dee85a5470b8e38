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


def test_a_model_instance_a_loss_class_and_factories_of_the_wrong_arity_are_refused_in_one_line():
    """Each of these failed in every trial, with a Ray traceback ending in torch's words (a model instance
    called with the config: "linear(): argument 'input' must be Tensor, not RecordingConfig"; the loss
    class called with (output, labels) as its constructor's arguments: blamed on the labels)."""
    with pytest.raises(TypeError, match=r"model= is a Linear model; it must be a function that builds one model "
                                        r"from the trial's config.*Fix: model=lambda config: Linear\(\.\.\.\)"):
        batched_trainable(**_kw(model=nn.Linear(4, 2)))
    with pytest.raises(TypeError, match=r"loss=CrossEntropyLoss is the class; pass a loss: "
                                        r"loss=CrossEntropyLoss\(\)"):
        batched_trainable(**_kw(loss=nn.CrossEntropyLoss))
    with pytest.raises(TypeError, match=r"model=<lambda> takes \(\), but the slot host calls it with the trial's "
                                        r"config\. Fix: model=lambda config:"):
        batched_trainable(**_kw(model=lambda: nn.Linear(4, 2)))
    with pytest.raises(TypeError, match=r"data=<lambda> takes \(config\), but the slot host calls it with no "
                                        r"arguments"):
        batched_trainable(**_kw(data=lambda config: None))
    with pytest.raises(TypeError, match=r"batch_size=<lambda> takes \(\), but"):
        batched_trainable(**_kw(batch_size=lambda: 8))
    # what stays accepted: a loss module, a model class that takes the config, defaults and *args
    class Net(nn.Module):
        def __init__(self, config, scale=1.0):
            super().__init__()
            self.fc = nn.Linear(4, 2)

    assert batched_trainable(**_kw(loss=nn.CrossEntropyLoss(), model=Net, hparams=lambda *a: {"lr": 1e-3},
                                   data=lambda n=8: None, batch_size=lambda config, **kw: 8))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_cuda_device_on_a_host_without_cuda_names_the_device():
    """device="cuda" on a CPU-only torch failed as "data() item x_train is a Tensor that torch.as_tensor cannot
    take (Torch not compiled with CUDA enabled)": the host now says so (a SweepSetupError, which stops the
    sweep in one line) before it loads anything."""
    from ray_modelbatch.errors import SweepSetupError
    from ray_modelbatch.tune.host import _pick_device

    with pytest.raises(SweepSetupError, match=r"device='cuda', but torch sees no CUDA device on this slot host's "
                                              r"node .* Fix: leave device unset"):
        _pick_device("cuda")
    assert _pick_device("cpu").type == "cpu"


def test_trial_resources_with_a_gpu_are_refused():
    """Each trial reserving a GPU while the hosts hold them all: on a 2-GPU cluster the trials waited for a
    GPU forever, silently (PENDING, the hosts idle)."""
    with pytest.raises(ValueError, match=r"trial_resources=\{'CPU': 0.01, 'GPU': 1\} reserves a GPU for each trial"
                                         r".*Fix: leave GPUs out of trial_resources"):
        batched_trainable(**_kw(trial_resources={"CPU": 0.01, "GPU": 1}))
    assert batched_trainable(**_kw(trial_resources={"CPU": 0.5, "GPU": 0}))
