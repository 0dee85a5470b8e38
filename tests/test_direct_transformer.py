"""nn.Transformer and its decoder on the direct path (ray_modelbatch.direct_transformer; issue 13, item 1).

Each model must run on the direct path (no vmap) and train exactly like the
same models alone (``trains_like_solo``: outputs and gradients of the first
step, parameters after Adam steps, to 1e-5), for a shared batch and per-slot
batches, with causal target masks made in forward, padding masks, post-norm
and ``norm_first``; with dropout each slot draws its model's own masks.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ray_modelbatch as rmb
from ray_modelbatch import fast_path
from test_direct_layers import S, trains_like_solo
from test_slot_random import LR, _alone, _batches, _fused, _max_rel, _seeded

VOCAB, SRC, TGT = 20, 7, 5


class Seq2Seq(nn.Module):
    """A translation model as scripts write it: shared embeddings, ``nn.Transformer(batch_first=True)``, a causal
    target mask made in forward, padding masks for both sides (the memory's is the source's)."""

    def __init__(self, norm_first: bool = False, activation: str = "relu", dropout: float = 0.0):
        super().__init__()
        self.emb, self.pos = nn.Embedding(VOCAB, 8), nn.Embedding(16, 8)
        self.t = nn.Transformer(8, 2, 2, 1, 16, dropout=dropout, activation=activation, batch_first=True,
                                norm_first=norm_first)
        self.head = nn.Linear(8, VOCAB)

    def forward(self, src, tgt, src_pad, tgt_pad):
        def embed(tokens):
            return self.emb(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))

        mask = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1], device=tgt.device)
        h = self.t(embed(src), embed(tgt), tgt_mask=mask, src_key_padding_mask=src_pad,
                   tgt_key_padding_mask=tgt_pad, memory_key_padding_mask=src_pad)
        return self.head(h)


def _tokens_loss(out, y):
    return F.cross_entropy(out.flatten(0, -2), y.flatten())


def _batch(per_slot: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lead = (S,) if per_slot else ()
    src = torch.randint(0, VOCAB, (*lead, 4, SRC), generator=g)
    tgt = torch.randint(0, VOCAB, (*lead, 4, TGT), generator=g)
    src_pad, tgt_pad = torch.zeros(*lead, 4, SRC, dtype=torch.bool), torch.zeros(*lead, 4, TGT, dtype=torch.bool)
    src_pad[..., 1, 5:] = True
    tgt_pad[..., 2, 3:] = True
    return src, (tgt, src_pad, tgt_pad), torch.randint(0, VOCAB, (*lead, 4, TGT), generator=g)


@pytest.mark.parametrize("norm_first,activation", [(False, "relu"), (True, "gelu")])
@pytest.mark.parametrize("per_slot", [False, True])
def test_an_nn_transformer_seq2seq_trains_like_each_model_alone(norm_first, activation, per_slot):
    src, args, y = _batch(per_slot)
    mb = trains_like_solo(lambda: Seq2Seq(norm_first, activation), src, y, _tokens_loss, args=args, per_slot=per_slot)
    assert mb._plan().kinds().get("t") == "transformer"


class DecoderOnly(nn.Module):
    """An encoder and a decoder as separate modules (``nn.TransformerDecoder`` with a final norm), the memory
    read through a bare ``nn.TransformerDecoderLayer`` too, with a memory mask."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 1,
                                         enable_nested_tensor=False)
        self.dec = nn.TransformerDecoder(nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=True,
                                                                    norm_first=True), 2, norm=nn.LayerNorm(8))
        self.last = nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 4)

    def forward(self, src, tgt):
        memory = self.enc(self.emb(src))
        h = self.dec(self.emb(tgt), memory, tgt_is_causal=False)
        # every target position may read the first 3 source positions only (a float mask)
        memory_mask = torch.zeros(tgt.shape[1], src.shape[1]).masked_fill(torch.arange(src.shape[1]) >= 3,
                                                                          float("-inf"))
        return self.head(self.last(h, memory, memory_mask=memory_mask).mean(1))


def test_a_decoder_and_a_bare_decoder_layer_with_a_memory_mask_train_like_each_model_alone():
    g = torch.Generator().manual_seed(1)
    src, tgt, y = (torch.randint(0, VOCAB, (4, SRC), generator=g), torch.randint(0, VOCAB, (4, TGT), generator=g),
                   torch.randint(0, 4, (4,), generator=g))
    mb = trains_like_solo(DecoderOnly, src, y, args=(tgt,))
    kinds = mb._plan().kinds()
    assert kinds["dec"] == "decoder" and kinds["last"] == "decoder_layer" and kinds["enc"] == "encoder"


def test_dropout_in_an_nn_transformer_draws_each_models_own_masks():
    """Attention, residual and feed-forward dropouts of encoder and decoder: SGD steps with each slot's
    generator started where its model's was, against the models trained alone from there."""

    class Drop(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(2, 8)
            self.t = nn.Transformer(8, 2, 1, 1, 16, dropout=0.2, batch_first=True)
            self.out = nn.Linear(8, 4)

        def forward(self, x):
            h = self.inp(x.view(-1, 5, 2))
            return self.out(self.t(h, h[:, :3]).mean(1))

    pairs = [_seeded(Drop, s) for s in range(S)]
    batches = _batches(3, 10)
    refs = [_alone(m, st, batches) for m, st in pairs]
    mb, engine = _fused([m for m, _ in pairs], [st for _, st in pairs])
    assert mb._plan().kinds().get("t") == "transformer"
    for x, y in batches:
        engine.train_step(x, y)
    assert not mb._slow_keys
    for s, (ref, end) in enumerate(refs):
        assert _max_rel(mb, s, ref) < 2e-5, s
        assert torch.equal(mb.random.state(s), end), s  # and it drew as many numbers


def test_check_model_names_the_transformer_kind_and_finds_the_slots_agree():
    class Copy(Seq2Seq):
        """Learns to copy the first tokens of the source: one input, the target and masks made in forward."""

        def forward(self, src):
            no_pad = torch.zeros(src.shape, dtype=torch.bool, device=src.device)
            return super().forward(src, src[:, :TGT], no_pad, no_pad[:, :TGT])

    report = rmb.check_model(Copy, torch.randint(0, VOCAB, (4, SRC)), slots=2, repeats=1)
    assert report.path == "direct", str(report)
    assert dict(report.kinds)["t.decoder.layers.0.multihead_attn.out_proj"] == "transformer"
    assert report.agreement.agrees, str(report)


class Inside(nn.Module):
    """A layer inside a model, as fx sees it there: a leaf module, computed by its kind or not at all."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x, x)


def test_settings_without_a_direct_kernel_use_vmap_and_torchs_errors_stay_torchs():
    class OwnDecoder(nn.TransformerDecoder):  # a subclass may change forward: not torch's decoder
        pass

    own = OwnDecoder(nn.TransformerDecoderLayer(8, 2, 16, batch_first=True), 1)
    for layer in (nn.TransformerDecoderLayer(8, 2, 16, batch_first=True, activation=lambda t: t * 2),
                  nn.Transformer(8, 2, 1, 1, 16, batch_first=True, custom_decoder=own)):
        assert fast_path.plan(Inside(layer)) is None, layer
    for first in (True, False):  # torch's default is sequence-first
        assert fast_path.plan(Inside(nn.Transformer(8, 2, 1, 1, 16, batch_first=first))) is not None

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.t = nn.Transformer(8, 2, 1, 1, 16, batch_first=True)

        def forward(self, src, tgt):
            return self.t(src, tgt)

    torch.manual_seed(0)
    mb = rmb.ModelBatch([Two() for _ in range(2)])
    assert mb.uses_direct_path
    with pytest.raises(Exception, match="the batch number of src and tgt must be equal"):
        mb(torch.randn(3, 5, 8), torch.randn(2, 4, 8))  # vmap runs it, and torch says what is wrong


@pytest.mark.parametrize("make,name", [(lambda: nn.TransformerEncoderLayer(8, 2, 16, batch_first=True),
                                        "TransformerEncoderLayer"),
                                       (lambda: nn.LSTM(4, 8, batch_first=True), "LSTM")])
def test_a_bare_layer_as_the_whole_model_says_why_it_runs_on_vmap(make, name):
    """fx traces the root's own forward, which branches on its inputs: the reason names the layer and the fix,
    not an ``if`` the user never wrote; the same layer inside a model of theirs takes the direct path. (A bare
    decoder layer traces, and takes the direct path as it is.)"""
    mb = rmb.ModelBatch([make() for _ in range(2)])
    assert not mb.uses_direct_path
    assert f"the whole model is one nn.{name}" in mb.why_vmap() and "inside a model that holds it" in mb.why_vmap()
    assert rmb.ModelBatch([Inside(nn.TransformerDecoderLayer(8, 2, 16, batch_first=True))
                           for _ in range(2)]).uses_direct_path
    assert rmb.ModelBatch([nn.TransformerDecoderLayer(8, 2, 16, batch_first=True) for _ in range(2)]).uses_direct_path


class SeqFirst(nn.Module):
    """PyTorch's translation tutorial's layout: ``nn.Transformer`` sequence-first (its default), inputs ``[T, B]``."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.t = nn.Transformer(8, 2, 1, 1, 16, dropout=dropout)
        self.head = nn.Linear(8, VOCAB)

    def forward(self, src, tgt, src_pad):
        src, tgt = src.transpose(0, 1), tgt.transpose(0, 1)  # [T, B]
        mask = self.t.generate_square_subsequent_mask(tgt.shape[0])
        h = self.t(self.emb(src), self.emb(tgt), tgt_mask=mask, src_key_padding_mask=src_pad,
                   memory_key_padding_mask=src_pad)
        return self.head(h).transpose(0, 1)  # [B, T, vocab]


@pytest.mark.parametrize("per_slot", [False, True])
def test_a_sequence_first_transformer_trains_like_each_model_alone(per_slot):
    src, (tgt, src_pad, _), y = _batch(per_slot)
    mb = trains_like_solo(SeqFirst, src, y, _tokens_loss, args=(tgt, src_pad), per_slot=per_slot)
    assert mb._plan().kinds().get("t") == "transformer"


class SeqFirstAttention(nn.Module):
    """A sequence-first ``nn.MultiheadAttention`` returning its weights, with dropout on them and after it."""

    def __init__(self):
        super().__init__()
        self.inp, self.attn = nn.Linear(2, 8), nn.MultiheadAttention(8, 2, dropout=0.3)
        self.drop, self.out = nn.Dropout(0.2), nn.Linear(8, 4)

    def forward(self, x):
        h = self.inp(x.view(-1, 5, 2)).transpose(0, 1)  # [T, B, E]
        a, w = self.attn(h, h, h)
        return self.out(self.drop(a).mean(0)) + w.sum((1, 2)).unsqueeze(-1)


@pytest.mark.parametrize("make", [lambda: SeqFirstAttention(), lambda: SeqFirst(dropout=0.2)],
                         ids=["attention_weights", "transformer"])
def test_sequence_first_dropout_draws_each_models_own_masks(make):
    """A dropout after a sequence-first attention draws its mask in the ``[T, B, E]`` memory order its module
    returns: SGD steps with each slot's generator where its model's was, against the models alone."""
    if make().__class__ is SeqFirst:
        g = torch.Generator().manual_seed(2)
        batches = [(torch.randint(0, VOCAB, (4, SRC), generator=g), torch.randint(0, VOCAB, (4, TGT), generator=g))
                   for _ in range(3)]
        step = lambda m, b, c: _tokens_loss(m(b[0], b[0][:, :TGT], None), b[1])  # noqa: E731
    else:
        batches, step = _batches(3, 10), None
    pairs = [_seeded(make, s) for s in range(S)]
    refs = [_alone(m, st, batches, step) if step else _alone(m, st, batches) for m, st in pairs]
    mb, engine = _fused([m for m, _ in pairs], [st for _, st in pairs])  # SGD at the models' LR
    assert mb.uses_direct_path
    if step is None:
        for x, y in batches:
            engine.train_step(x, y)
    else:
        opt = rmb.optim.SGD(mb, lr=LR, momentum=0.9)
        for x, y in batches:
            mb.zero_grad()
            losses, _ = mb.forward_loss(x, y, _tokens_loss, x[:, :TGT], None)
            losses.sum().backward()
            opt.step()
    assert not mb._slow_keys
    for s, (ref, end) in enumerate(refs):
        assert _max_rel(mb, s, ref) < 2e-5, s
        assert torch.equal(mb.random.state(s), end), s
