"""benchmarks/fusion_bound.py: ops sorted into classes, the update told apart by its caller, the hybrid bound."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import fusion_bound  # noqa: E402


@pytest.mark.parametrize("op, cls", [
    ("bmm", "gemm and attention"), ("addmm", "gemm and attention"),
    ("_scaled_dot_product_flash_attention_for_cpu", "gemm and attention"), ("convolution_backward", "convolution"),
    ("max_pool2d_with_indices_backward", "pooling"), ("native_layer_norm", "normalization"),
    ("_log_softmax", "softmax and loss"), ("clone", "movement"), ("index_select", "movement"),
    ("threshold_backward", "elementwise and reductions"), ("mul", "elementwise and reductions"),
    ("ray_modelbatch.strided_bmm_", "gemm and attention"),  # the MLP's weight gradients (strided_gemm)
])
def test_each_op_falls_in_its_class(op, cls):
    assert fusion_bound.op_class(op) == cls


def test_a_layers_own_module_files_its_ops_under_the_layer_except_its_data_movement():
    # the fused step's GroupNorm is BatchNorm passes and addcmul, its recurrent layer GEMMs and gate math
    assert fusion_bound.op_class("addcmul", "channels_last_group_norm.py:97") == "normalization"
    assert fusion_bound.op_class("addcmul_", "channels_last_batch_norm.py:150") == "normalization"
    assert fusion_bound.op_class("bmm", "unrolled_rnn.py:120") == "recurrent"
    assert fusion_bound.op_class("_softmax", "small_attention.py:126") == "gemm and attention"
    assert fusion_bound.op_class("clone", "small_attention.py:108") == "movement"
    assert fusion_bound.op_class("addcmul", "engine.py:214") == "elementwise and reductions"


def test_the_bound_takes_the_faster_form_of_each_class_and_drops_the_fused_steps_movement():
    r = {"loop_s": 10.0, "fused": {"convolution": 4.0, "pooling": 3.0, "movement": 2.0},
         "loop": {"convolution": 6.0, "pooling": 1.0, "movement": 3.0}}
    assert fusion_bound.hybrid_bound(r) == pytest.approx(10.0 / (4.0 + 1.0))


def test_a_measured_family_has_its_update_and_gemms_on_both_sides_summing_to_the_plain_times():
    r = fusion_bound.measure("mlp_tiny", slots=2, loop_models=2, steps=1)
    for side, total in (("fused", r["fused_s"]), ("loop", r["loop_s"])):
        assert {"gemm and attention", "optimizer"} <= set(r[side]), (side, r[side])
        assert sum(r[side].values()) == pytest.approx(total)
    assert fusion_bound.hybrid_bound(r) > 0
    assert "mlp_tiny" in fusion_bound.report([r], 2, 2, 2.0)


def test_timing_leaves_the_optimizers_step_methods_as_they_were():
    import torch

    from ray_modelbatch.optim.base import VectorOptimizer

    before = (torch.optim.Adam.step, VectorOptimizer.step)
    fusion_bound.time_classes(lambda: None, 1)
    assert (torch.optim.Adam.step, VectorOptimizer.step) == before
