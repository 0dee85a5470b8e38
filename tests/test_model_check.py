"""check_model: how a model fuses, what falls back, and the fused-vs-loop time (issue 13, item 7)."""

from __future__ import annotations

import torch
from torch import nn

import ray_modelbatch as rmb


def test_a_direct_path_model_reports_its_layers_and_timing():
    report = rmb.check_model(lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)), torch.randn(32, 8),
                             slots=4, repeats=2)
    assert report.path == "direct" and report.error is None and not report.fallbacks
    assert [kind for _, kind in report.layers] == ["Linear", "ReLU", "Linear"]
    assert report.fused_ms > 0 and report.loop_ms > 0 and report.speedup > 0
    low, high = report.speedup_range  # the rounds alternate fused and loop steps; their ratios' range is shown
    assert 0 < low <= high and f"x the loop; {low:.2f}-{high:.2f}x in single rounds)" in str(report)


def test_a_model_that_cannot_fuse_is_reported_not_raised():
    class ItemNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(4, 4)

        def forward(self, x):
            return self.l(x) * float(self.l(x).mean().item())

    report = rmb.check_model(ItemNet(), torch.randn(3, 4), slots=2)
    assert report.path == "cannot fuse" and ".item()" in report.error
    assert "cannot fuse" in str(report)


def test_lazy_modules_learn_their_shapes_from_the_example_input():
    report = rmb.check_model(lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(3)),
                             torch.randn(8, 3, 9, 9), slots=3, repeats=1)
    assert report.path == "direct" and report.error is None, report.error


def test_an_lstm_runs_on_the_direct_path():
    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(3, 5, batch_first=True)
            self.head = nn.Linear(5, 2)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    report = rmb.check_model(Seq, torch.randn(4, 6, 3), slots=2, repeats=1)
    assert report.path == "direct" and report.error is None and report.speedup is not None
    assert ("rnn", "rnn") in report.kinds and "direct: rnn" in str(report)


def test_a_hugging_face_model_is_checked_on_a_dict_batch_with_its_own_loss():
    """A dict example input is the model's keyword inputs, for the stack and for the loop; with ``labels`` among
    them, the model's own loss is the timed step's."""
    import pytest

    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=12, num_labels=2)
    batch = {"input_ids": torch.randint(1, 30, (8, 12)), "attention_mask": torch.ones(8, 12, dtype=torch.long),
             "labels": torch.randint(0, 2, (8,))}
    report = rmb.check_model(lambda: transformers.BertForSequenceClassification(cfg), batch, slots=2, repeats=1)
    assert report.error is None and report.path in ("direct", "vmap"), report
    assert report.fused_ms > 0 and report.loop_ms > 0
    assert ("classifier", "Linear") in report.layers
