"""``nn.Transformer`` and its encoder and decoder layers on the direct path, built from batched attention.

``nn.TransformerEncoderLayer``, ``nn.TransformerEncoder``,
``nn.TransformerDecoderLayer``, ``nn.TransformerDecoder`` and ``nn.Transformer``
are not traceable by ``torch.fx`` as a whole (the encoder's forward branches on
tensor properties for torch's fused inference kernels), and fx takes torch's
own modules as leaves anyway. So each is a known module kind here, written in
the order of its ``forward``: every slot's attention is one call on the slots
folded into the batch (:func:`.direct_attention.multihead_attention`), its
projections and feed-forward layers are the direct path's batched GEMMs, its
norms the stacked LayerNorm, its dropouts each slot's own draws (post-norm and
``norm_first``, any elementwise activation, batch-first or sequence-first). A
decoder layer's cross-attention takes its queries from the target and its keys
and values from the memory, each slot's own.

The fused inference kernels of the encoder round differently from its
training path; the direct path always runs the training path's math (and, for
the encoder's nested-tensor inference, its zeros at padding). Before these
kinds, a model holding an ``nn.Transformer`` or ``nn.TransformerDecoder`` ran on
``torch.vmap``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.nn.modules.transformer import _detect_is_causal_mask

from .direct_attention import _canonical, mha_ok, multihead_attention
from .direct_kernels import SLOT, Act, Unsupported
from .stacked_layer_norm import StackedLayerNorm

__all__ = ["encoder_layer_ok", "encoder_layer", "encoder_ok", "encoder", "decoder_layer_ok", "decoder_layer",
           "decoder_ok", "decoder", "transformer_ok", "transformer"]

Elementwise = Callable[[Any], bool]


def _drop(runner: Any, module: nn.Module, h: Act) -> Act:
    """A layer's dropout: each slot's mask from its own generator."""
    if type(module) is not nn.Dropout:  # a replaced module keeps its own forward (and torch's generator)
        return Act(module(h.t), SLOT)
    return runner.dropout(h, module.p, module.training)


def _add(a: Act, b: Act) -> Act:
    """A residual: a shared input broadcasts against the slots' ``[n, B, T, E]``."""
    return Act(a.t + b.t, SLOT)


def _feed_forward(runner: Any, name: str, mod: nn.Module, x: Act, last: nn.Module) -> Act:
    """``linear2(dropout(activation(linear1(x))))``, then the layer's ``last`` dropout."""
    h = runner.linear(f"{name}.linear1", x)
    h = _drop(runner, mod.dropout, Act(mod.activation(h.t), SLOT))
    return _drop(runner, last, runner.linear(f"{name}.linear2", h))


def _norm_ok(norm: nn.Module | None) -> bool:
    return norm is None or type(norm) in (nn.LayerNorm, StackedLayerNorm)


# ----------------------------------------------------------------------- encoder
def encoder_layer_ok(mod: nn.TransformerEncoderLayer, elementwise: Elementwise) -> bool:
    """Whether :func:`encoder_layer` computes ``mod``: its attention is computable and its activation is
    one of the direct path's elementwise functions or modules (``elementwise(fn)``)."""
    return mha_ok(mod.self_attn) and elementwise(mod.activation)


def encoder_layer(runner: Any, name: str, mod: nn.TransformerEncoderLayer, src: Act, src_mask: Act | None = None,
                  src_key_padding_mask: Act | None = None, is_causal: bool = False) -> Act:
    """``nn.TransformerEncoderLayer.forward`` (its training path) of every slot."""
    dtype = src.t.dtype
    kpm = _canonical(src_key_padding_mask, "src_key_padding_mask", src_mask, dtype)
    src_mask = _canonical(src_mask, "src_mask", None, dtype, check=False)

    def sa_block(x: Act) -> Act:
        out, _ = multihead_attention(runner, f"{name}.self_attn", mod.self_attn, x, x, x, key_padding_mask=kpm,
                                     need_weights=False, attn_mask=src_mask, is_causal=is_causal)
        return _drop(runner, mod.dropout1, out)

    x = src
    if mod.norm_first:
        x = _add(x, sa_block(runner.layer_norm(f"{name}.norm1", x)))
        return _add(x, _feed_forward(runner, name, mod, runner.layer_norm(f"{name}.norm2", x), mod.dropout2))
    x = runner.layer_norm(f"{name}.norm1", _add(x, sa_block(x)))
    return runner.layer_norm(f"{name}.norm2", _add(x, _feed_forward(runner, name, mod, x, mod.dropout2)))


def encoder_ok(mod: nn.TransformerEncoder, elementwise: Elementwise) -> bool:
    """Whether :func:`encoder` computes ``mod``: plain encoder layers and an optional final LayerNorm."""
    return (all(type(layer) is nn.TransformerEncoderLayer and encoder_layer_ok(layer, elementwise)
                for layer in mod.layers) and _norm_ok(mod.norm))


def _nested_inference(runner: Any, name: str, mod: nn.TransformerEncoder, src: Act, mask: Act | None,
                      padded: torch.Tensor) -> bool:
    """Whether ``mod`` alone would run on nested tensors (its inference path with a padding mask), whose
    output is zero at the padded positions. ``padded`` is where the canonical mask is not 0."""
    first = mod.layers[0]
    if not (torch.backends.mha.get_fastpath_enabled() and getattr(mod, "use_nested_tensor", False)
            and not first.training and len(src.sample_shape(runner.n)) == 3 and mask is None
            and not torch.is_autocast_enabled()):
        return False
    if torch.is_grad_enabled() and any(p.requires_grad for n, p in runner.params.items()
                                       if n.startswith(f"{name}.layers.0.")):
        return False
    valid = (~padded).int()
    left_aligned = bool((valid.cummin(-1).values == valid).all())
    if getattr(mod, "mask_check", True):
        return left_aligned
    if not left_aligned:
        raise Unsupported("a padding mask that is not left-aligned, with mask_check=False")
    return True


def encoder(runner: Any, name: str, mod: nn.TransformerEncoder, src: Act, mask: Act | None = None,
            src_key_padding_mask: Act | None = None, is_causal: bool | None = None) -> Act:
    """``nn.TransformerEncoder.forward`` of every slot: its layers, then its final norm.

    In eval mode without autograd and with a padding mask, torch's encoder runs
    its layers on nested tensors and pads the result with zeros: the padded
    positions are zero before the final norm, as here.
    """
    dtype = src.t.dtype
    kpm = _canonical(src_key_padding_mask, "src_key_padding_mask", mask, dtype)
    mask = _canonical(mask, "mask", None, dtype, check=False)
    padded = None if kpm is None else kpm.t != 0
    nested = padded is not None and _nested_inference(runner, name, mod, src, mask, padded)
    causal = _detect_is_causal_mask(None if mask is None else mask.t, is_causal,
                                    _seq_len(runner, src, mod.layers[0].self_attn.batch_first))
    out = src
    for i, layer in enumerate(mod.layers):
        out = encoder_layer(runner, f"{name}.layers.{i}", layer, out, mask, kpm, causal)
    if nested:
        out = Act(out.t.masked_fill(padded.unsqueeze(-1), 0.0), SLOT)
    return out if mod.norm is None else runner.layer_norm(f"{name}.norm", out)


def _seq_len(runner: Any, x: Act, batch_first: bool) -> int:
    """The sequence length of an input, as ``torch.nn.modules.transformer._get_seq_len`` reads it."""
    shape = x.sample_shape(runner.n)
    return shape[1] if len(shape) == 3 and batch_first else shape[0]


# ----------------------------------------------------------------------- decoder
def decoder_layer_ok(mod: nn.TransformerDecoderLayer, elementwise: Elementwise) -> bool:
    """Whether :func:`decoder_layer` computes ``mod``: both attentions computable, an elementwise activation."""
    return mha_ok(mod.self_attn) and mha_ok(mod.multihead_attn) and elementwise(mod.activation)


def decoder_layer(runner: Any, name: str, mod: nn.TransformerDecoderLayer, tgt: Act, memory: Act,
                  tgt_mask: Act | None = None, memory_mask: Act | None = None,
                  tgt_key_padding_mask: Act | None = None, memory_key_padding_mask: Act | None = None,
                  tgt_is_causal: bool = False, memory_is_causal: bool = False) -> Act:
    """``nn.TransformerDecoderLayer.forward`` of every slot: self-attention over the target, attention from
    the target to the memory, feed-forward; the masks as its attention modules canonicalize them."""

    def sa_block(x: Act) -> Act:
        out, _ = multihead_attention(runner, f"{name}.self_attn", mod.self_attn, x, x, x,
                                     key_padding_mask=tgt_key_padding_mask, need_weights=False, attn_mask=tgt_mask,
                                     is_causal=tgt_is_causal)
        return _drop(runner, mod.dropout1, out)

    def mha_block(x: Act) -> Act:
        out, _ = multihead_attention(runner, f"{name}.multihead_attn", mod.multihead_attn, x, memory, memory,
                                     key_padding_mask=memory_key_padding_mask, need_weights=False,
                                     attn_mask=memory_mask, is_causal=memory_is_causal)
        return _drop(runner, mod.dropout2, out)

    x = tgt
    if mod.norm_first:
        x = _add(x, sa_block(runner.layer_norm(f"{name}.norm1", x)))
        x = _add(x, mha_block(runner.layer_norm(f"{name}.norm2", x)))
        return _add(x, _feed_forward(runner, name, mod, runner.layer_norm(f"{name}.norm3", x), mod.dropout3))
    x = runner.layer_norm(f"{name}.norm1", _add(x, sa_block(x)))
    x = runner.layer_norm(f"{name}.norm2", _add(x, mha_block(x)))
    return runner.layer_norm(f"{name}.norm3", _add(x, _feed_forward(runner, name, mod, x, mod.dropout3)))


def decoder_ok(mod: nn.TransformerDecoder, elementwise: Elementwise) -> bool:
    """Whether :func:`decoder` computes ``mod``: plain decoder layers and an optional final LayerNorm."""
    return (all(type(layer) is nn.TransformerDecoderLayer and decoder_layer_ok(layer, elementwise)
                for layer in mod.layers) and _norm_ok(mod.norm))


def decoder(runner: Any, name: str, mod: nn.TransformerDecoder, tgt: Act, memory: Act, tgt_mask: Act | None = None,
            memory_mask: Act | None = None, tgt_key_padding_mask: Act | None = None,
            memory_key_padding_mask: Act | None = None, tgt_is_causal: bool | None = None,
            memory_is_causal: bool = False) -> Act:
    """``nn.TransformerDecoder.forward`` of every slot: its layers (a target mask that is the causal one
    makes them causal, as torch detects it), then its final norm."""
    seq_len = _seq_len(runner, tgt, mod.layers[0].self_attn.batch_first)
    causal = _detect_is_causal_mask(None if tgt_mask is None else tgt_mask.t, tgt_is_causal, seq_len)
    out = tgt
    for i, layer in enumerate(mod.layers):
        out = decoder_layer(runner, f"{name}.layers.{i}", layer, out, memory, tgt_mask, memory_mask,
                            tgt_key_padding_mask, memory_key_padding_mask, causal, memory_is_causal)
    return out if mod.norm is None else runner.layer_norm(f"{name}.norm", out)


# ----------------------------------------------------------------------- nn.Transformer
def transformer_ok(mod: nn.Transformer, elementwise: Elementwise) -> bool:
    """Whether :func:`transformer` computes ``mod``: torch's own encoder and decoder (not custom ones)."""
    return (type(mod.encoder) is nn.TransformerEncoder and encoder_ok(mod.encoder, elementwise)
            and type(mod.decoder) is nn.TransformerDecoder and decoder_ok(mod.decoder, elementwise))


def transformer(runner: Any, name: str, mod: nn.Transformer, src: Act, tgt: Act, src_mask: Act | None = None,
                tgt_mask: Act | None = None, memory_mask: Act | None = None,
                src_key_padding_mask: Act | None = None, tgt_key_padding_mask: Act | None = None,
                memory_key_padding_mask: Act | None = None, src_is_causal: bool | None = None,
                tgt_is_causal: bool | None = None, memory_is_causal: bool = False) -> Act:
    """``nn.Transformer.forward`` of every slot: the encoder over ``src``, the decoder over ``tgt`` and
    that memory. Inputs torch refuses (batch sizes or widths that differ) are left to vmap, which raises
    torch's own error."""
    s, t = src.sample_shape(runner.n), tgt.sample_shape(runner.n)
    batch = 0 if mod.batch_first else 1
    if (len(s) == 3 and s[batch] != t[batch]) or s[-1] != mod.d_model or t[-1] != mod.d_model:
        raise Unsupported("inputs nn.Transformer refuses")
    memory = encoder(runner, f"{name}.encoder", mod.encoder, src, src_mask, src_key_padding_mask, src_is_causal)
    return decoder(runner, f"{name}.decoder", mod.decoder, tgt, memory, tgt_mask, memory_mask, tgt_key_padding_mask,
                   memory_key_padding_mask, tgt_is_causal, memory_is_causal)
