"""Attention inside a stack's vmap runs as batched GEMMs (ray_modelbatch/vmap_attention.py), and trains exactly
like each model alone."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ray_modelbatch as rmb
from ray_modelbatch import vmap_attention

S = 3


class Seq2Seq(nn.Module):
    """``nn.Transformer``, stacked with ``direct_path=False`` (as a model the direct path cannot take runs):
    on vmap its encoder, decoder and cross-attention all call SDPA."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.emb, self.head = nn.Embedding(20, 16), nn.Linear(16, 20)
        self.t = nn.Transformer(16, 2, 1, 1, 32, dropout=dropout, batch_first=True)

    def forward(self, x):
        e = self.emb(x)
        return self.head(self.t(e, e, tgt_mask=nn.Transformer.generate_square_subsequent_mask(x.shape[1])))


def _lm_loss(out, y):
    return F.cross_entropy(out.flatten(0, 1), y.flatten())


def _train(make, step_fn=None, steps=3):
    torch.manual_seed(0)
    models = [make() for _ in range(S)]
    solo = [copy.deepcopy(m) for m in models]
    mb = rmb.ModelBatch(models, direct_path=False)
    assert not mb.uses_direct_path
    # SGD, not Adam: Adam turns the rounding noise of a gradient that is zero in exact arithmetic (an attention
    # key's bias, which the softmax cancels) into learning-rate-sized steps, hiding what is compared here
    engine = (rmb.FusedEngine(mb, rmb.optim.SGD(mb, lr=0.1, momentum=0.9), step_fn=step_fn) if step_fn
              else rmb.FusedEngine(mb, rmb.optim.SGD(mb, lr=0.1, momentum=0.9), _lm_loss))
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in solo]
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randint(0, 20, (4, 6), generator=g), torch.randint(0, 20, (4, 6), generator=g)
        engine.train_step(x, y)
        for m, o in zip(solo, opts):
            o.zero_grad()
            (step_fn(m, (x, y), {}) if step_fn else _lm_loss(m(x), y)).backward()
            o.step()
    for i, m in enumerate(solo):
        got = mb.slot_state(i)
        for k, v in m.state_dict().items():
            if v.is_floating_point():
                torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-5, msg=f"slot {i} {k}")
    return mb


def test_a_transformer_on_vmap_runs_attention_batched_and_trains_like_each_model_alone():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "performance drop" and ray_modelbatch's FusionWarning alike
        _train(Seq2Seq)
    assert not vmap_attention.active()  # torch's own function is back


def test_a_user_step_with_attention_runs_it_batched():
    def step(model, batch, config):
        x, y = batch
        return _lm_loss(model(x), y)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train(Seq2Seq, step_fn=step)


def test_attention_with_dropout_keeps_torchs_kernel_once_per_slot_and_each_slots_own_draws():
    """SDPA draws its dropout mask itself: those calls keep torch's kernel, run per slot with each slot's
    generator (slot_random), so they are left to it."""
    torch.manual_seed(0)
    mb = rmb.ModelBatch([Seq2Seq(dropout=0.2) for _ in range(S)], direct_path=False)
    x = torch.randint(0, 20, (4, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = mb(x)
    assert out.shape == (S, 4, 6, 20) and torch.isfinite(out).all()


def test_outside_a_stack_sdpa_is_torchs_own():
    q = torch.randn(2, 4, 8)
    assert F.scaled_dot_product_attention is vmap_attention._TORCH_SDPA
    with vmap_attention.batched_sdpa():
        with vmap_attention.batched_sdpa():
            assert vmap_attention.active()
            # not a vmap's batched tensor: torch's kernel, bit for bit
            assert torch.equal(F.scaled_dot_product_attention(q, q, q), vmap_attention._TORCH_SDPA(q, q, q))
        assert vmap_attention.active()
    assert F.scaled_dot_product_attention is vmap_attention._TORCH_SDPA


@pytest.mark.parametrize("masked", ["none", "causal", "bool", "float"])
def test_under_vmap_it_gives_sdpas_values(masked):
    q, k, v = (torch.randn(S, 2, 3, 5, 8) for _ in range(3))
    mask = {"none": None, "causal": None, "bool": torch.rand(5, 5) > 0.3, "float": torch.randn(5, 5)}[masked]

    def attend(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=masked == "causal")

    with vmap_attention.batched_sdpa():
        got = torch.vmap(attend)(q, k, v)
    want = torch.stack([vmap_attention._TORCH_SDPA(q[i], k[i], v[i], attn_mask=mask, is_causal=masked == "causal")
                        for i in range(S)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_trace_while_another_threads_vmap_call_holds_the_name_still_plans_attention_directly():
    """The host traces a new stack on one thread while its engine steps another on vmap: the trace may see
    F.scaled_dot_product_attention as the batched stand-in, and must still give the model its direct plan."""
    from ray_modelbatch import fast_path

    class HandAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.out = nn.Linear(8, 24), nn.Linear(8, 2)

        def forward(self, x):
            q, k, v = self.qkv(x).chunk(3, -1)
            return self.out(F.scaled_dot_product_attention(q, k, v).mean(1))

    with vmap_attention.batched_sdpa():
        plan = fast_path.plan(HandAttention())
    assert plan is not None and "sdpa" in {s.kind for s in plan.steps}
