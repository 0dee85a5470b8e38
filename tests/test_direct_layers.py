"""The direct path beyond Linear and CNN layers (fast_path, direct_kernels, direct_attention; issue 13, item 1).

Each model here must run on the direct path (no vmap, no fallback) and train
exactly like the same models alone with ``torch.optim.Adam``: the same
forward outputs and gradients on the first step and the same parameters after
a few Adam steps, to 1e-5, for a batch shared by every slot and for per-slot
batches. Residual graphs, LayerNorm, embeddings and bags, reductions, matmul,
softmax, permutes, SDPA, MultiheadAttention and nn.TransformerEncoder(Layer).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ray_modelbatch as rmb
from ray_modelbatch import fast_path

S = 3


def _pick(v, i, per_slot):
    return v[i] if per_slot and isinstance(v, torch.Tensor) else v


def trains_like_solo(make, x, y, loss_fn=F.cross_entropy, *, args=(), kwargs=None, per_slot=False, steps=3,
                     lr=1e-2, gather_exact=None):
    """Fuse S models from ``make`` and train them next to solo copies; return the stack.

    Elements whose first gradient is below 1e-6 (an attention key bias: softmax cancels it, so its true
    gradient is zero) are left out of the comparison after the Adam steps: Adam turns each computation's
    rounding noise there into steps of size lr. Their gradients are compared like all others.
    """
    kwargs = kwargs or {}
    quiet: dict[tuple[int, str], torch.Tensor] = {}
    torch.manual_seed(0)
    models = [make() for _ in range(S)]
    solo = [copy.deepcopy(m) for m in models]
    mb = rmb.ModelBatch([copy.deepcopy(m) for m in models])
    assert mb.uses_direct_path
    if gather_exact is not None:
        assert mb.gather_exact == gather_exact
    opt = rmb.optim.Adam(mb, lr=lr)
    opts = [torch.optim.Adam(m.parameters(), lr=lr) for m in solo]
    for step in range(steps):
        mb.zero_grad()
        losses, out = mb.forward_loss(x, y, loss_fn, *args, per_slot=per_slot, **kwargs)
        losses.sum().backward()
        for i, (m, o) in enumerate(zip(solo, opts)):
            o.zero_grad()
            ref = m(_pick(x, i, per_slot), *(_pick(a, i, per_slot) for a in args),
                    **{k: _pick(v, i, per_slot) for k, v in kwargs.items()})
            loss_fn(ref, _pick(y, i, per_slot)).backward()
            if step == 0:
                torch.testing.assert_close(out[i], ref, rtol=1e-5, atol=1e-5)
                solo_params = dict(m.named_parameters())
                for name, p in mb.params.items():
                    torch.testing.assert_close(p.grad[i], solo_params[name].grad, rtol=1e-5, atol=1e-5,
                                               msg=f"slot {i} grad of {name}")
                    quiet[i, name] = solo_params[name].grad.abs() < 1e-6
            o.step()
        opt.step()
    assert not mb._slow_keys  # every call took the direct path
    for i, m in enumerate(solo):
        got = mb.slot_state(i)
        for k, v in m.state_dict().items():
            if v.is_floating_point():
                keep = ~quiet.get((i, k), torch.zeros_like(v, dtype=torch.bool))
                torch.testing.assert_close(got[k][keep], v[keep], rtol=1e-5, atol=1e-5, msg=f"slot {i} {k}")
    return mb


# --------------------------------------------------------------------------- graphs with several inputs per step
class ResidualMLP(nn.Module):
    """x + f(x), torch.add, a product of two branches and a cat along features."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(16, 4)

    def forward(self, x):
        h = x + torch.relu(self.a(x))
        h = torch.add(h, self.b(h)) * torch.sigmoid(h)
        return self.head(torch.cat([h, x], dim=1))


class ResNetish(nn.Module):
    """Basic residual blocks (identity and 1x1-conv shortcut) on the channel-stacked layout."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(4)
        self.c1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.c2, self.bn2 = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(6)
        self.down, self.bnd = nn.Conv2d(4, 6, 1, stride=2, bias=False), nn.BatchNorm2d(6)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(6, 4)

    def forward(self, x):
        h = F.relu(self.bn0(self.stem(x)))
        h = F.relu(h + self.bn1(self.c1(h)))
        h = F.relu(self.bn2(self.c2(h)) + self.bnd(self.down(h)))
        return self.fc(self.pool(h).flatten(1))


@pytest.mark.parametrize("per_slot", [False, True])
def test_residual_mlp(per_slot):
    x = torch.randn(S, 10, 8) if per_slot else torch.randn(10, 8)
    y = torch.randint(0, 4, (S, 10) if per_slot else (10,))
    trains_like_solo(ResidualMLP, x, y, per_slot=per_slot, gather_exact=True)


@pytest.mark.parametrize("per_slot", [False, True])
def test_small_resnet(per_slot):
    x = torch.randn(S, 6, 1, 8, 8) if per_slot else torch.randn(6, 1, 8, 8)
    y = torch.randint(0, 4, (S, 6) if per_slot else (6,))
    mb = trains_like_solo(ResNetish, x, y, per_slot=per_slot, gather_exact=False)
    assert int(mb.slot_state(1)["bn1.num_batches_tracked"]) == 3


# --------------------------------------------------------------------------- LayerNorm, reductions, parameters
class NormNet(nn.Module):
    """LayerNorm on the input (shared: one normalization for all slots), a learned offset read in forward,
    LayerNorm without affine and with a 2-D normalized shape, mean and sum over dimensions."""

    def __init__(self):
        super().__init__()
        self.ln_in = nn.LayerNorm(6)
        self.offset = nn.Parameter(torch.randn(5, 6) * 0.1)
        self.lin = nn.Linear(6, 6)
        self.ln_plain = nn.LayerNorm(6, elementwise_affine=False)
        self.ln_2d = nn.LayerNorm((5, 6))
        self.head = nn.Linear(6, 3)

    def forward(self, x):  # x: [B, 5, 6]
        h = self.ln_in(x) + self.offset
        h = self.ln_2d(self.ln_plain(self.lin(h)) * 2.0)
        return self.head(h.mean(1) + h.sum(dim=-2, keepdim=True).squeeze(1) / 10)


@pytest.mark.parametrize("per_slot", [False, True])
def test_layer_norm_parameters_and_reductions(per_slot):
    x = torch.randn(S, 7, 5, 6) if per_slot else torch.randn(7, 5, 6)
    y = torch.randint(0, 3, (S, 7) if per_slot else (7,))
    trains_like_solo(NormNet, x, y, per_slot=per_slot, gather_exact=False)


def test_norm_affine_gives_addcmuls_values_and_gradients_bit_for_bit():
    """The norms' per-slot affine (``direct_kernels._SlotAffine``) makes one full-size pass less in its backward
    than ``torch.addcmul``'s and must give the same bits."""
    from ray_modelbatch.direct_kernels import _SlotAffine

    y = torch.randn(S, 7, 5, 6, requires_grad=True)
    w, b = torch.randn(S, 1, 1, 6, requires_grad=True), torch.randn(S, 1, 1, 6, requires_grad=True)
    grad = torch.randn(S, 7, 5, 6)
    got, want = [], []
    for fn, out in ((lambda: _SlotAffine.apply(y, w, b), got), (lambda: torch.addcmul(b, y, w), want)):
        value = fn()
        out.append(value.detach())
        out.extend(torch.autograd.grad(value, (y, w, b), grad))
    assert all(torch.equal(a, c) for a, c in zip(got, want))


# --------------------------------------------------------------------------- embeddings
class EmbeddingMean(nn.Module):
    def __init__(self, padding_idx=None):
        super().__init__()
        self.emb = nn.Embedding(30, 8, padding_idx=padding_idx)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.emb(x).mean(1))


@pytest.mark.parametrize("per_slot", [False, True])
def test_embedding_mean(per_slot):
    x = torch.randint(0, 30, (S, 9, 5) if per_slot else (9, 5))
    y = torch.randint(0, 4, (S, 9) if per_slot else (9,))
    trains_like_solo(EmbeddingMean, x, y, per_slot=per_slot, gather_exact=False)  # the mean is a reduction


def test_embedding_padding_row_gets_no_gradient():
    x = torch.randint(0, 30, (9, 5))
    x[:, -2:] = 0
    mb = trains_like_solo(lambda: EmbeddingMean(padding_idx=0), x, torch.randint(0, 4, (9,)))
    assert isinstance(mb._template.emb, nn.Embedding)  # the stack's StackedEmbedding, computed directly


class Bag(nn.Module):
    def __init__(self, mode="mean", **kw):
        super().__init__()
        self.bag = nn.EmbeddingBag(30, 8, mode=mode, **kw)
        self.head = nn.Linear(8, 4)


class Bag2D(Bag):
    def forward(self, x):
        return self.head(self.bag(x))


class BagOffsets(Bag):
    def forward(self, text, offsets):
        return self.head(self.bag(text, offsets))


class BagWeighted(Bag):
    def forward(self, text, offsets, weights):
        return self.head(self.bag(text, offsets, per_sample_weights=weights))


@pytest.mark.parametrize("mode", ["mean", "sum"])
def test_embedding_bag_2d(mode):
    x, y = torch.randint(0, 30, (9, 5)), torch.randint(0, 4, (9,))
    trains_like_solo(lambda: Bag2D(mode), x, y, gather_exact=False)
    trains_like_solo(lambda: Bag2D(mode), torch.randint(0, 30, (S, 9, 5)), torch.randint(0, 4, (S, 9)),
                     per_slot=True)


def test_embedding_bag_offsets_shared_and_per_slot():
    """The flat-input form: offsets reach the direct path as a second input (an empty bag included)."""
    text, offsets, y = torch.randint(0, 30, (14,)), torch.tensor([0, 3, 3, 8]), torch.randint(0, 4, (4,))
    trains_like_solo(BagOffsets, text, y, args=(offsets,))
    texts = torch.randint(0, 30, (S, 14))
    per_slot_offsets = torch.tensor([[0, 3, 3, 8], [0, 1, 2, 13], [0, 7, 9, 14]])
    trains_like_solo(BagOffsets, texts, torch.randint(0, 4, (S, 4)), args=(per_slot_offsets,), per_slot=True)


def test_embedding_bag_options():
    """include_last_offset, padding_idx (left out of the mean and its count), per_sample_weights (sum)."""
    text, y = torch.randint(0, 30, (14,)), torch.randint(0, 4, (3,))
    text[[2, 5, 6]] = 1
    trains_like_solo(lambda: BagOffsets(include_last_offset=True, padding_idx=1), text, y,
                     kwargs={"offsets": torch.tensor([0, 4, 9, 14])})
    trains_like_solo(lambda: BagWeighted("sum"), text, torch.randint(0, 4, (4,)),
                     args=(torch.tensor([0, 4, 9, 12]), torch.rand(14)))


# --------------------------------------------------------------------------- attention
class HandAttention(nn.Module):
    """Attention written out: chunk, view with sizes from x.shape, transpose/permute, @, softmax."""

    def __init__(self):
        super().__init__()
        self.qkv, self.out, self.head = nn.Linear(8, 24), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (z.view(b, t, 2, 4).transpose(1, 2) for z in (q, k, v))
        w = F.softmax(q @ k.transpose(-2, -1) / 2.0, dim=-1)
        h = torch.matmul(w, v).permute(0, 2, 1, 3).reshape(b, t, 8)
        return self.head((x + self.out(h))[:, 0])


class SDPANet(HandAttention):
    """The same with F.scaled_dot_product_attention (causal), on the slots folded into the batch."""

    def forward(self, x):
        q, k, v = self.qkv(x).split(8, dim=-1)
        q, k, v = (z.unflatten(-1, (2, 4)).transpose(1, 2) for z in (q, k, v))
        h = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2)
        return self.head(self.out(h)[:, -1])


@pytest.mark.parametrize("model", [HandAttention, SDPANet])
def test_matmul_softmax_and_sdpa(model):
    x, y = torch.randn(5, 6, 8), torch.randint(0, 4, (5,))
    trains_like_solo(model, x, y, gather_exact=False)
    trains_like_solo(model, torch.randn(S, 5, 6, 8), torch.randint(0, 4, (S, 5)), per_slot=True)


class MHANet(nn.Module):
    """nn.MultiheadAttention with its weights returned (bmm-softmax path) and a key padding mask, then
    cross-attention (separate key/value inputs, kdim/vdim projections)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 8)
        self.self_attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.cross = nn.MultiheadAttention(8, 2, batch_first=True, kdim=5, vdim=5)
        self.head = nn.Linear(8, 4)

    def forward(self, x, pad):
        h = self.inp(x)
        a, w = self.self_attn(h, h, h, key_padding_mask=pad)
        c, _ = self.cross(a, x, x, need_weights=False)
        return self.head((a + c).mean(1)) + w.mean((1, 2)).unsqueeze(-1)


def test_multihead_attention():
    x, y = torch.randn(5, 6, 5), torch.randint(0, 4, (5,))
    pad = torch.zeros(5, 6, dtype=torch.bool)
    pad[1, 4:] = True
    trains_like_solo(MHANet, x, y, args=(pad,), gather_exact=False)


class EncoderClassifier(nn.Module):
    """Tokens -> embedding + learned positions -> nn.TransformerEncoder -> mean -> linear."""

    def __init__(self, norm_first=False, activation="relu", final_norm=False):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.pos = nn.Parameter(torch.randn(6, 8) * 0.1)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, activation=activation, batch_first=True,
                                           norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(8) if final_norm else None,
                                             enable_nested_tensor=False)
        self.head = nn.Linear(8, 4)

    def forward(self, x, pad=None):
        return self.head(self.encoder(self.emb(x) + self.pos, src_key_padding_mask=pad).mean(1))


@pytest.mark.parametrize("norm_first,activation", [(False, "relu"), (True, "gelu")])
def test_transformer_encoder_classifier(norm_first, activation):
    make = lambda: EncoderClassifier(norm_first, activation, final_norm=norm_first)  # noqa: E731
    x, y = torch.randint(0, 20, (5, 6)), torch.randint(0, 4, (5,))
    pad = torch.zeros(5, 6, dtype=torch.bool)
    pad[:, 4:] = True
    trains_like_solo(make, x, y, args=(pad,))
    trains_like_solo(make, torch.randint(0, 20, (S, 5, 6)), torch.randint(0, 4, (S, 5)),
                     args=(pad.expand(S, 5, 6),), per_slot=True)


def test_engine_step_writes_attention_gradients_into_the_flat_buffer(monkeypatch):
    """FusedEngine's step has the backward GEMMs write the Linear and packed in-projection gradients straight
    into the flat gradient buffer (fast_path.GradTarget): it trains exactly as a plain backward does."""
    torch.manual_seed(0)
    models = [EncoderClassifier() for _ in range(S)]
    a, b = (rmb.ModelBatch([copy.deepcopy(m) for m in models]) for _ in range(2))
    engine = rmb.FusedEngine(a, rmb.optim.Adam(a, lr=1e-2), F.cross_entropy)
    opt = rmb.optim.Adam(b, lr=1e-2)
    written, take = set(), fast_path.GradTarget.take
    names = {id(t.param): n for n, t in a._grad_targets.items()}
    monkeypatch.setattr(fast_path.GradTarget, "take", lambda self: written.add(names[id(self.param)]) or take(self))
    x, y = torch.randint(0, 20, (5, 6)), torch.randint(0, 4, (5,))
    for _ in range(3):
        engine.train_step(x, y)
        b.zero_grad()
        losses, _ = b.forward_loss(x, y, F.cross_entropy)
        losses.sum().backward()
        opt.step()
    assert {"encoder.layers.0.self_attn.in_proj_weight", "encoder.layers.1.self_attn.in_proj_bias",
            "encoder.layers.1.self_attn.out_proj.weight", "encoder.layers.0.linear1.weight", "head.bias"} <= written
    assert not a._slow_keys
    for k in a.params:
        torch.testing.assert_close(a.params[k], b.params[k], rtol=0, atol=1e-6, msg=k)


def test_transformer_encoder_layer_alone_and_inference_with_padding():
    """A bare TransformerEncoderLayer on a shared input; in eval mode without autograd the encoder's
    nested-tensor inference (zeros at the padded positions) is matched too."""
    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
            self.head = nn.Linear(8, 4)

        def forward(self, x):
            return self.head(self.layer(x)[:, 0])

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2)

        def forward(self, x, src_key_padding_mask):
            return self.encoder(x, src_key_padding_mask=src_key_padding_mask)

    trains_like_solo(Layer, torch.randn(5, 6, 8), torch.randint(0, 4, (5,)))
    torch.manual_seed(1)
    models = [Encoder().eval() for _ in range(S)]
    mb = rmb.ModelBatch([copy.deepcopy(m) for m in models]).eval()
    x, pad = torch.randn(4, 6, 8), torch.zeros(4, 6, dtype=torch.bool)
    pad[:, 3:] = True
    with torch.no_grad():
        out = mb(x, src_key_padding_mask=pad)
        assert not mb._slow_keys and (out[:, :, 3:] == 0).all()
        for i, m in enumerate(models):
            torch.testing.assert_close(out[i], m(x, src_key_padding_mask=pad), rtol=1e-5, atol=1e-5)


def test_tied_embedding_and_head_run_directly():
    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.mid = nn.Embedding(20, 8), nn.Linear(8, 8)
            self.head = nn.Linear(8, 20, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, x):
            return self.head(torch.tanh(self.mid(self.emb(x))))

    lm_loss = lambda out, y: F.cross_entropy(out.reshape(-1, 20), y.reshape(-1))  # noqa: E731
    trains_like_solo(TiedLM, torch.randint(0, 20, (5, 6)), torch.randint(0, 20, (5, 6)), lm_loss, gather_exact=True)


# --------------------------------------------------------------------------- gather-exactness, fallbacks, reports
def test_gather_exact_plans_give_a_subset_the_bits_of_the_whole_stack():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.a, self.head = nn.Embedding(30, 8), nn.Linear(8, 8), nn.Linear(16, 4)

        def forward(self, x):
            h = self.emb(x)
            return self.head(torch.cat([h + F.relu(self.a(h)), h * 2], -1)).flatten(1)

    torch.manual_seed(0)
    mb = rmb.ModelBatch([Tokens() for _ in range(6)])
    assert mb.uses_direct_path and mb.gather_exact
    x, y = torch.randint(0, 30, (7, 5)), torch.randn(7, 20)
    grads = {}
    for slots in (None, [4, 1, 2]):
        mb.zero_grad()
        losses, out = mb.forward_loss(x, y, F.mse_loss, slots=slots)
        losses.sum().backward()
        grads[slots is None] = ({k: p.grad.clone() for k, p in mb.params.items()}, out)
    (full, out_full), (part, out_part) = grads[True], grads[False]
    assert torch.equal(out_part, out_full[[4, 1, 2]])
    for k in full:  # a subset's gradients come back into the rows of its slots
        assert torch.equal(part[k][[4, 1, 2]], full[k][[4, 1, 2]]), k


def test_settings_without_a_direct_kernel_use_vmap():
    cases = [
        nn.Sequential(nn.EmbeddingBag(10, 4, mode="max"), nn.Linear(4, 2)),
        nn.Sequential(nn.Embedding(10, 4, max_norm=1.0), nn.Linear(4, 2)),
        nn.Sequential(nn.Embedding(10, 4, scale_grad_by_freq=True), nn.Linear(4, 2)),
        nn.TransformerEncoderLayer(8, 2, 16, batch_first=False),
        nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, activation=lambda t: t * 2),
    ]
    for model in cases:
        assert fast_path.plan(model) is None, model


def test_an_optional_input_left_out():
    """The trace passed a tensor for every input; a call without one runs a plan traced with it fixed to None
    (here: the 2-D bags of the ``offsets is None`` branch), or vmap where that plan has a step without a kernel."""
    class Maybe(Bag):
        def forward(self, x, offsets=None):
            if offsets is None:
                return self.head(self.bag(x))
            return self.head(self.bag(x, offsets))

    class Unknown(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x, scale=None):
            h = self.lin(x)
            return h * scale if scale is not None else torch.cumprod(h, -1)  # no kernel for cumprod

    torch.manual_seed(0)
    models = [Maybe() for _ in range(2)]
    mb = rmb.ModelBatch([copy.deepcopy(m) for m in models])
    x, flat, offsets = torch.randint(0, 30, (4, 5)), torch.randint(0, 30, (9,)), torch.tensor([0, 2, 5])
    out2d, out_flat = mb(x), mb(flat, offsets)
    assert not mb._slow_keys
    torch.testing.assert_close(out2d[1], models[1](x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out_flat[1], models[1](flat, offsets), rtol=1e-6, atol=1e-6)
    models = [Unknown() for _ in range(2)]
    mb = rmb.ModelBatch([copy.deepcopy(m) for m in models])
    x = torch.randn(3, 4)
    torch.testing.assert_close(mb(x, torch.tensor(2.0))[1], models[1](x, torch.tensor(2.0)))
    assert not mb._slow_keys
    torch.testing.assert_close(mb(x)[1], models[1](x))
    assert mb._slow_keys  # the call without scale ran on vmap


def test_check_model_reports_the_kind_of_each_layer():
    report = rmb.check_model(lambda: EncoderClassifier(), torch.randint(0, 20, (4, 6)), slots=2, repeats=1)
    assert report.path == "direct" and not report.fallbacks
    kinds = dict(report.kinds)
    assert kinds["emb"] == "embedding" and kinds["head"] == "linear"
    assert kinds["encoder.layers.0.self_attn.out_proj"] == "encoder" and kinds["encoder.layers.1.linear2"] == "encoder"
    assert "encoder" in str(report)


class CausalEncoder(nn.Module):
    """A causal TransformerEncoderLayer (a ``src_mask`` input with ``is_causal=True``)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 4)

    def forward(self, x, causal):
        return self.head(self.layer(self.emb(x), src_mask=causal, is_causal=True).mean(1))


@pytest.mark.parametrize("tokens", [6, 40])
def test_causal_attention_on_short_and_long_sequences(tokens):
    x, y = torch.randint(0, 20, (5, tokens)), torch.randint(0, 4, (5,))
    trains_like_solo(CausalEncoder, x, y, args=(nn.Transformer.generate_square_subsequent_mask(tokens),))


class CausalLM(nn.Module):
    """A causal language model that makes its mask and its positions in forward, from the input's length, in
    the forms scripts write them: ``generate_square_subsequent_mask``, a bool ``triu`` of ``ones``, a float
    ``full(-inf).triu(1)``."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.emb, self.pos = nn.Embedding(20, 8), nn.Embedding(16, 8)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 2)
        self.head = nn.Linear(8, 20)

    def forward(self, x):
        t = x.shape[1]
        if self.form == "generate":
            mask = nn.Transformer.generate_square_subsequent_mask(t, device=x.device)
        elif self.form == "bool":  # True where a position may not attend
            mask = torch.ones((t, t), dtype=torch.bool, device=x.device).triu(1)
        else:
            mask = torch.triu(torch.full((t, t), float("-inf")), diagonal=1)
        h = self.emb(x) + self.pos(torch.arange(t, device=x.device))
        return self.head(self.encoder(h, mask=mask, is_causal=True))


def _next_tokens(out, y):
    return F.cross_entropy(out.flatten(0, -2), y.flatten())


@pytest.mark.parametrize("per_slot", [False, True])
@pytest.mark.parametrize("form", ["generate", "bool", "full"])
def test_a_causal_mask_and_positions_made_in_forward_run_directly(form, per_slot):
    g = torch.Generator().manual_seed(1)
    shape = (S, 4, 10) if per_slot else (4, 10)
    x, y = torch.randint(0, 20, shape, generator=g), torch.randint(0, 20, shape, generator=g)
    mb = trains_like_solo(lambda: CausalLM(form), x, y, _next_tokens, per_slot=per_slot)
    assert {"create", "triangle"} <= {s.kind for s in mb._plan().steps}


class NormalizedEmbedding(nn.Module):
    """Residual blocks, then rows scaled to unit norm (``F.normalize``, as metric-learning and contrastive heads
    do), by keyword and by position, over the last dimension and the default one."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.GELU()) for _ in range(2)])
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        h = F.normalize(h, dim=-1) + F.normalize(h, 1.0, 1, 1e-6)
        return self.out(h)


@pytest.mark.parametrize("per_slot", [False, True])
def test_normalize_runs_directly(per_slot):
    x, y = _examples(per_slot, 5, (6,), seed=3)
    mb = trains_like_solo(NormalizedEmbedding, x, y, per_slot=per_slot)
    assert "normalize" in {s.kind for s in mb._plan().steps}


class SeveralOutputs(nn.Module):
    """A VAE that returns ``(reconstruction, mu, log_var)``, or the same as a dict or a list."""

    def __init__(self, form: str = "tuple"):
        super().__init__()
        self.form = form
        self.enc, self.mu, self.log_var = nn.Linear(6, 8), nn.Linear(8, 2), nn.Linear(8, 2)
        self.dec = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 6))

    def forward(self, x):
        h = F.relu(self.enc(x))
        mu, log_var = self.mu(h), self.log_var(h)
        recon = self.dec(mu + torch.randn_like(mu) * torch.exp(0.5 * log_var))
        if self.form == "dict":
            return {"recon": recon, "stats": (mu, log_var)}
        return [recon, mu, log_var] if self.form == "list" else (recon, mu, log_var)


def _elbo(out, x):
    recon, mu, log_var = (out["recon"], *out["stats"]) if isinstance(out, dict) else out
    kl = -0.5 * (1 + log_var - mu.square() - log_var.exp()).sum(-1).mean()
    return F.mse_loss(recon, x) + kl


@pytest.mark.parametrize("form", ["tuple", "list", "dict"])
def test_a_forward_that_returns_several_tensors_runs_directly_and_trains_like_solo(form):
    """Each returned tensor comes back with its leading slot dimension, in the type forward returned it in, as
    vmap returns it; the slots train like their models alone, each drawing its own noise."""
    torch.manual_seed(0)
    models = [SeveralOutputs(form) for _ in range(S)]
    states = []
    for s in range(S):
        torch.manual_seed(10 + s)
        states.append(torch.get_rng_state())
    mb = rmb.ModelBatch([copy.deepcopy(m) for m in models])
    assert mb.uses_direct_path
    for s, st in enumerate(states):
        mb.random.set_state(s, st)
    engine = rmb.FusedEngine(mb, rmb.optim.Adam(mb, lr=1e-2), _elbo)
    x = torch.randn(5, 6)
    solo = [copy.deepcopy(m) for m in models]
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in solo]
    for step in range(3):
        engine.train_step(x, x)
        for s, (m, o) in enumerate(zip(solo, opts)):
            torch.set_rng_state(states[s])
            o.zero_grad()
            _elbo(m(x), x).backward()
            o.step()
            states[s] = torch.get_rng_state()
    assert not mb._slow_keys
    for s, m in enumerate(solo):
        for k, v in m.state_dict().items():
            torch.testing.assert_close(mb.slot_state(s)[k], v, rtol=1e-5, atol=1e-6, msg=f"slot {s} {k}")
    mb.eval()
    out = mb(x)
    assert type(out) is {"tuple": tuple, "list": list, "dict": dict}[form]
    recon = out["recon"] if form == "dict" else out[0]
    assert recon.shape == (S, 5, 6)


class PatchMixer(nn.Module):
    """MLP-Mixer's shape: patches cut with ``Tensor.unfold``, token and channel mixing, ``F.glu``, and tensors made
    like the activation (``new_full``, ``new_zeros``)."""

    def __init__(self):
        super().__init__()
        self.patch, self.tok, self.ch, self.out = nn.Linear(16, 8), nn.Linear(4, 4), nn.Linear(8, 16), nn.Linear(8, 4)

    def forward(self, x):
        p = x.unfold(2, 4, 4).unfold(3, 4, 4).reshape(x.shape[0], 4, 16)  # [B, 1, 8, 8] -> 4 patches of 16
        h = self.patch(p)
        h = h + self.tok(h.transpose(1, 2)).transpose(1, 2)
        h = F.glu(self.ch(h), dim=-1) + h.new_full((8,), 0.1) + h.new_zeros(h.shape[-1])
        return self.out(h.mean(1))


@pytest.mark.parametrize("per_slot", [False, True])
def test_unfold_glu_and_tensors_made_like_an_activation_run_directly(per_slot):
    x, y = _examples(per_slot, 5, (1, 8, 8), seed=5)
    mb = trains_like_solo(PatchMixer, x, y, per_slot=per_slot)
    assert {"unfold", "glu", "create_like"} <= {s.kind for s in mb._plan().steps}


class FilledWithAComputedValue(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        h = self.fc(x)
        return h + torch.full((4,), h.mean())  # a Python number from a tensor: no fused path can run this


def test_a_tensor_made_from_a_value_computed_in_forward_gets_vmaps_one_line_and_no_direct_path_failure():
    mb = rmb.ModelBatch([FilledWithAComputedValue() for _ in range(S)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the direct path declines it (no "direct path failed" warning) ...
        with pytest.raises(rmb.FusionError, match=r"calls \.item\(\)"):  # ... and vmap's error explains it
            mb(torch.randn(5, 4))


def _examples(per_slot: bool, batch: int, shape: tuple, seed: int, vocab: int | None = None):
    """A batch of ``batch`` examples of ``shape`` (token ids below ``vocab``, else normal values) and 4-class
    labels: one for every slot, or one per slot (``[S, batch, ...]``)."""
    g = torch.Generator().manual_seed(seed)
    lead = (S, batch) if per_slot else (batch,)
    x = torch.randint(0, vocab, (*lead, *shape), generator=g) if vocab else torch.randn(*lead, *shape, generator=g)
    return x, torch.randint(0, 4, lead, generator=g)


# --------------------------------------------------------------------------- more activations, PReLU
class Activations(nn.Module):
    """Every elementwise activation the direct path takes beyond ReLU/GELU/SiLU, and PReLU (one weight, and one
    per channel after a convolution and after a Linear)."""

    def __init__(self):
        super().__init__()
        self.conv, self.prelu_c = nn.Conv2d(1, 4, 3, padding=1), nn.PReLU(4)
        self.fc1, self.prelu_1, self.prelu_f = nn.Linear(4 * 64, 16), nn.PReLU(), nn.PReLU(16)
        self.acts = nn.ModuleList([nn.SELU(), nn.CELU(0.5), nn.Hardswish(), nn.Hardsigmoid(), nn.LogSigmoid(),
                                   nn.Softsign(), nn.Tanhshrink(), nn.Softshrink(0.1), nn.Hardshrink(0.1)])
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        h = self.prelu_c(self.conv(x.view(-1, 1, 8, 8))).flatten(1)
        h = self.prelu_f(self.prelu_1(self.fc1(h)))
        for act in self.acts:
            h = act(h) + 0.5 * h
        h = F.selu(h) + F.celu(h) + F.hardswish(h) + F.hardsigmoid(h) + F.logsigmoid(h) + F.softsign(h)
        h = h + F.relu6(h) + F.hardtanh(h) + F.tanhshrink(h) + F.softshrink(h) + F.hardshrink(h)
        return self.fc2(h)


@pytest.mark.parametrize("per_slot", [False, True])
def test_more_activations_and_prelu(per_slot):
    x, y = _examples(per_slot, 16, (64,), seed=5)
    mb = trains_like_solo(Activations, x, y, per_slot=per_slot)
    kinds = {s.kind for s in mb._plan().steps}
    assert "prelu" in kinds


class RMSBlock(nn.Module):
    """A pre-norm residual MLP block as small LLaMA-style models write it: RMSNorm (with and without a weight)."""

    def __init__(self):
        super().__init__()
        self.inp, self.norm, self.up, self.down = nn.Linear(12, 16), nn.RMSNorm(16), nn.Linear(16, 32), nn.Linear(32, 16)
        self.final, self.head = nn.RMSNorm(16, eps=1e-5, elementwise_affine=False), nn.Linear(16, 4)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.down(F.silu(self.up(self.norm(h))))
        return self.head(self.final(h).mean(1))


@pytest.mark.parametrize("per_slot", [False, True])
def test_rms_norm(per_slot):
    x, y = _examples(per_slot, 8, (5, 12), seed=6)
    mb = trains_like_solo(RMSBlock, x, y, per_slot=per_slot)
    assert "rms_norm" in {s.kind for s in mb._plan().steps}


class Siren(nn.Module):
    """Functions custom MLPs call in forward (a SIREN's sine, clamps, where, maximum/minimum, cumsum, logsumexp,
    amax): all on the direct path."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        h = torch.sin(30.0 * self.a(x))
        h = torch.cos(self.b(h)) + h.square() * 0.1 + torch.erf(h).clamp(min=-0.5, max=0.8)
        h = torch.where(h > 0, h, 0.2 * h) + torch.maximum(h, torch.zeros_like(h)) - torch.minimum(h, 0.5 * h)
        h = h + 0.01 * torch.cumsum(h, dim=1) - 0.1 * torch.logsumexp(h, dim=1, keepdim=True)
        h = h / (1.0 + h.abs().amax(dim=1, keepdim=True)) + torch.log1p(h.clip(0.0, 3.0)).sin()
        return self.head(h)


@pytest.mark.parametrize("per_slot", [False, True])
def test_elementwise_and_reducing_functions_of_custom_models(per_slot):
    x, y = _examples(per_slot, 12, (6,), seed=8)
    mb = trains_like_solo(Siren, x, y, per_slot=per_slot, lr=1e-3)
    assert {"binary", "reduce", "function"} <= {s.kind for s in mb._plan().steps}


class TextCNN(nn.Module):
    """A text classifier as often written: embedding, Conv1d, max over time (``torch.max(..., dim=2)[0]`` and
    ``.max(dim=1).values``), einsum attention pooling, masked_fill, one_hot features, the max of a whole value."""

    def __init__(self):
        super().__init__()
        self.emb, self.conv = nn.Embedding(30, 8), nn.Conv1d(8, 6, 3, padding=1)
        self.query, self.head = nn.Parameter(torch.randn(6)), nn.Linear(6 + 6 + 30 + 1, 4)

    def forward(self, tokens):
        e = self.emb(tokens)  # [B, T, 8]
        h = torch.relu(self.conv(e.transpose(1, 2)))  # [B, 6, T]
        pooled = torch.max(h, dim=2)[0]
        scores = torch.einsum("bct,c->bt", h, self.query).masked_fill(tokens == 0, -1e4)
        att = torch.einsum("bct,bt->bc", h, torch.softmax(scores, dim=1))
        bag = F.one_hot(tokens, 30).float().max(dim=1).values  # which tokens occur
        top = torch.max(torch.minimum(h, torch.max(h, h.mean(dim=2, keepdim=True)))).view(1, 1).expand(h.shape[0], 1)
        return self.head(torch.cat([pooled, att, bag, top], dim=1))


@pytest.mark.parametrize("per_slot", [False, True])
def test_max_over_time_einsum_masked_fill_and_one_hot(per_slot):
    x, y = _examples(per_slot, 10, (7,), seed=9, vocab=30)
    mb = trains_like_solo(TextCNN, x, y, per_slot=per_slot, lr=1e-3)
    assert {"extremum", "einsum"} <= {s.kind for s in mb._plan().steps}


class Volumetric(nn.Module):
    """A small 3-D CNN: Conv3d (grouped too), BatchNorm3d, InstanceNorm3d, MaxPool3d, F.avg_pool3d,
    ConvTranspose3d, AdaptiveAvgPool3d."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn = nn.Conv3d(1, 4, 3, padding=1, bias=False), nn.BatchNorm3d(4)
        self.c2, self.inorm = nn.Conv3d(4, 6, 3, padding=1, groups=2, bias=False), nn.InstanceNorm3d(6, affine=True)
        self.up, self.pool = nn.ConvTranspose3d(6, 2, 2, stride=2), nn.AdaptiveAvgPool3d(2)
        self.head = nn.Linear(2 * 8, 4)

    def forward(self, x):
        h = nn.functional.max_pool3d(torch.relu(self.bn(self.c1(x))), 2)  # 4^3 -> 2^3
        h = nn.functional.avg_pool3d(torch.relu(self.inorm(self.c2(h))), 2)  # -> 1^3
        return self.head(self.pool(self.up(h)).flatten(1))  # -> 2^3 -> 2^3


@pytest.mark.parametrize("per_slot", [False, True])
def test_three_dimensional_convolutions_norms_and_pools(per_slot):
    x, y = _examples(per_slot, 6, (1, 4, 4, 4), seed=10)
    mb = trains_like_solo(Volumetric, x, y, per_slot=per_slot, lr=1e-3)
    assert {"conv", "norm", "group_norm", "pool", "pool_function"} <= {s.kind for s in mb._plan().steps}
