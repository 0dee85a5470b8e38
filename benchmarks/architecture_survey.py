"""Which architectures, written as scripts write them, take the direct path, and how fast: one table.

``ray_modelbatch.check_model`` on each model below (8 slots unless told, one shared batch, Adam, the mean
square of the output as the loss): the path the stack takes (direct, vmap, or cannot fuse), what keeps it off
the direct path, and the fused step against a loop of the same models with ``torch.optim.Adam``. The models
are small on purpose: a user meeting the library with one of these shapes sees what this table says. Session
40 wrote it to find the constructs that fell to vmap; the ones it found are on the direct path now.

    python benchmarks/architecture_survey.py [--slots 8] [--only "name;name"] [--out FILE]
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fused_step  # noqa: E402  (its machine() line)

import ray_modelbatch as rmb  # noqa: E402


class Residual(nn.Module):
    """Residual LayerNorm-GELU blocks in an ``nn.ModuleList`` loop, ``F.normalize`` before the head."""

    def __init__(self, inp: int = 16, width: int = 32, classes: int = 4, blocks: int = 3) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(inp, width), nn.Linear(width, classes)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width), nn.GELU())
                                     for _ in range(blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.out(F.normalize(h, dim=-1))


class TextCNN(nn.Module):
    """Kim's text CNN: an embedding, three Conv1d widths, max over time, dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 16, padding_idx=0)
        self.convs = nn.ModuleList([nn.Conv1d(16, 8, k) for k in (2, 3, 4)])
        self.fc, self.drop = nn.Linear(24, 2), nn.Dropout(0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.emb(x).transpose(1, 2)
        return self.fc(self.drop(torch.cat([F.relu(c(e)).max(dim=2).values for c in self.convs], 1)))


class UNetish(nn.Module):
    """A one-level U-Net: pooling down, ``F.interpolate`` up, a skip connection by ``torch.cat``."""

    def __init__(self) -> None:
        super().__init__()
        self.d, self.m, self.u = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(16, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.d(x))
        b = F.interpolate(F.relu(self.m(F.max_pool2d(a, 2))), scale_factor=2, mode="nearest")
        return self.u(torch.cat([a, b], 1))


class LSTMClassifier(nn.Module):
    """Embedding, a 2-layer LSTM with dropout, the last hidden state to a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.fc = nn.Embedding(17, 16), nn.Linear(32, 10)
        self.rnn = nn.LSTM(16, 32, batch_first=True, num_layers=2, dropout=0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, (h, _) = self.rnn(self.emb(x))
        return self.fc(h[-1])


class BiGRUMean(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.fc = nn.GRU(8, 16, batch_first=True, bidirectional=True), nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.rnn(x)[0].mean(1))


class CellLoop(nn.Module):
    """A hand-written recurrence: a cell (``nn.LSTMCell``, ``nn.GRUCell``) once per time step of the input."""

    def __init__(self, cell: type = nn.LSTMCell, inp: int = 8, hidden: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.cell, self.fc = cell(inp, hidden), nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = None
        for t in range(x.size(1)):
            state = self.cell(x[:, t], state)
        return self.fc(state[0] if isinstance(state, tuple) else state)


class AttentionPool(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.fc = nn.Embedding(50, 32), nn.Linear(32, 2)
        self.mha = nn.MultiheadAttention(32, 4, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.emb(x)
        return self.fc(self.mha(e, e, e, need_weights=False)[0].mean(1))


class CausalLM(nn.Module):
    """A decoder-only LM from 2 ``nn.TransformerEncoder`` layers: causal mask and positions made in forward."""

    def __init__(self, vocab: int = 50, tokens: int = 12, width: int = 32, ff: int = 64, norm_first: bool = True,
                 activation: str = "gelu") -> None:
        super().__init__()
        self.emb, self.pos, self.fc = nn.Embedding(vocab, width), nn.Embedding(tokens, width), nn.Linear(width, vocab)
        layer = nn.TransformerEncoderLayer(width, 4, ff, batch_first=True, dropout=0.1, norm_first=norm_first,
                                           activation=activation)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=x.device)
        h = self.emb(x) + self.pos(torch.arange(t, device=x.device))
        return self.fc(self.enc(h, mask=mask, is_causal=True))


class Seq2Seq(nn.Module):
    """``nn.Transformer`` (one encoder and one decoder layer) over the embedded tokens as source and target."""

    def __init__(self, vocab: int = 30, width: int = 16, heads: int = 2, ff: int = 32) -> None:
        super().__init__()
        self.emb, self.fc = nn.Embedding(vocab, width), nn.Linear(width, vocab)
        self.t = nn.Transformer(width, heads, 1, 1, ff, dropout=0.0, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.emb(x)
        return self.fc(self.t(e, e))


class VAE(nn.Module):
    """Reparameterized in forward (``torch.randn_like``), returning ``(recon, mu, log_var)``."""

    def __init__(self, inp: int = 64, hidden: int = 32, latent: int = 4) -> None:
        super().__init__()
        self.enc, self.mu, self.lv = nn.Linear(inp, hidden), nn.Linear(hidden, latent), nn.Linear(hidden, latent)
        self.dec = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, inp))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = F.relu(self.enc(x))
        mu, lv = self.mu(h), self.lv(h)
        return self.dec(mu + torch.randn_like(mu) * torch.exp(0.5 * lv)), mu, lv


class SqueezeExcite(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c, self.fc1, self.fc2, self.head = nn.Conv2d(3, 16, 3, padding=1), nn.Linear(16, 4), nn.Linear(4, 16), \
            nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.c(x))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(h.mean((2, 3))))))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(h * s[:, :, None, None], 1), 1))


class MobileBlock(nn.Module):
    """Depthwise-separable convolutions, ReLU6 and hardswish, global average pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.pw = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 32, 1)
        self.dw, self.bn, self.fc = nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(32), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.hardswish(self.bn(self.pw(self.dw(F.relu6(self.a(x))))))
        return self.fc(h.mean([2, 3]))


class ConvNeXtBlock(nn.Module):
    """A patchify stem, a 7x7 depthwise convolution, LayerNorm over channels-last permutes, layer scale."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.dw = nn.Conv2d(3, 16, 4, stride=4), nn.Conv2d(16, 16, 7, padding=3, groups=16)
        self.ln, self.pw1, self.pw2 = nn.LayerNorm(16), nn.Linear(16, 64), nn.Linear(64, 16)
        self.gamma, self.fc = nn.Parameter(torch.full((16,), 1e-2)), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        r = self.pw2(F.gelu(self.pw1(self.ln(self.dw(h).permute(0, 2, 3, 1))))) * self.gamma
        return self.fc((h + r.permute(0, 3, 1, 2)).mean((-2, -1)))


class Mixer(nn.Module):
    """MLP-Mixer on 1-channel images: 4x4 patches cut with ``Tensor.unfold``, token and channel mixing through
    ``F.glu``."""

    def __init__(self, side: int = 16, width: int = 32) -> None:
        super().__init__()
        self.patches = (side // 4) ** 2
        self.patch, self.fc = nn.Linear(16, width), nn.Linear(width, 10)
        self.tok, self.ch = nn.Linear(self.patches, 2 * self.patches), nn.Linear(width, 2 * width)
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch(x.unfold(2, 4, 4).unfold(3, 4, 4).reshape(x.shape[0], self.patches, 16))
        h = h + F.glu(self.tok(self.ln1(h).transpose(1, 2)), -1).transpose(1, 2)
        return self.fc((h + F.glu(self.ch(self.ln2(h)), -1)).mean(1))


class Experts(nn.Module):
    """A soft mixture of experts: a softmax gate over four experts' outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.experts, self.gate, self.fc = nn.Linear(16, 4 * 8), nn.Linear(16, 4), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.experts(x).view(-1, 4, 8)
        return self.fc((F.softmax(self.gate(x), -1).unsqueeze(-1) * e).sum(1))


def generator(width: int = 8) -> nn.Module:
    """A DCGAN-style generator: a Linear's rows unflattened (``nn.Unflatten``) into two transposed convolutions
    up to 1x28x28."""
    return nn.Sequential(nn.Linear(16, width * 7 * 7), nn.ReLU(), nn.Unflatten(1, (width, 7, 7)),
                         nn.ConvTranspose2d(width, width // 2, 4, 2, 1), nn.BatchNorm2d(width // 2), nn.ReLU(),
                         nn.ConvTranspose2d(width // 2, 1, 4, 2, 1), nn.Sigmoid())


def _weight_norm_mlp() -> nn.Module:
    return nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(16, 32)), nn.SiLU(), nn.Linear(32, 4))


# name -> (model factory, one example batch)
MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], Any]]] = {
    "MLP, BatchNorm1d, SiLU, dropout": (lambda: nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.SiLU(),
                                                              nn.Dropout(0.1), nn.Linear(128, 10)),
                                        lambda: torch.randn(32, 64)),
    "MLP, PReLU, ELU": (lambda: nn.Sequential(nn.Linear(64, 64), nn.PReLU(), nn.Linear(64, 64), nn.ELU(),
                                              nn.Linear(64, 10)), lambda: torch.randn(32, 64)),
    "residual LayerNorm MLP, F.normalize": (Residual, lambda: torch.randn(32, 16)),
    "MLP with weight_norm": (_weight_norm_mlp, lambda: torch.randn(32, 16)),
    "soft mixture of experts": (Experts, lambda: torch.randn(32, 16)),
    "LeNet (tanh, avg-pool)": (lambda: nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.Tanh(), nn.AvgPool2d(2),
                                                     nn.Conv2d(6, 16, 5), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(),
                                                     nn.Linear(400, 10)), lambda: torch.randn(32, 1, 28, 28)),
    "CNN, Dropout2d": (lambda: nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Dropout2d(0.2), nn.MaxPool2d(2),
                                             nn.Flatten(), nn.Linear(8 * 13 * 13, 10)),
                       lambda: torch.randn(32, 1, 28, 28)),
    "CNN, InstanceNorm, LeakyReLU": (lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1),
                                                           nn.InstanceNorm2d(8, affine=True), nn.LeakyReLU(0.2),
                                                           nn.Flatten(), nn.Linear(8 * 16 * 16, 10)),
                                     lambda: torch.randn(32, 3, 16, 16)),
    "squeeze-and-excitation CNN": (SqueezeExcite, lambda: torch.randn(16, 3, 16, 16)),
    "depthwise-separable CNN": (MobileBlock, lambda: torch.randn(16, 3, 16, 16)),
    "ConvNeXt block": (ConvNeXtBlock, lambda: torch.randn(16, 3, 32, 32)),
    "U-Net (interpolate, cat)": (UNetish, lambda: torch.randn(16, 1, 16, 16)),
    "GAN generator (Unflatten, ConvTranspose2d)": (generator, lambda: torch.randn(32, 16)),
    "Conv3d": (lambda: nn.Sequential(nn.Conv3d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6 * 6, 2)),
               lambda: torch.randn(8, 1, 8, 8, 8)),
    "text CNN (Conv1d, max over time)": (TextCNN, lambda: torch.randint(0, 100, (32, 20))),
    "MLP-Mixer (unfold, glu)": (Mixer, lambda: torch.randn(16, 1, 16, 16)),
    "VAE (randn_like, tuple out)": (VAE, lambda: torch.randn(32, 64)),
    "LSTM classifier (2 layers, dropout)": (LSTMClassifier, lambda: torch.randint(0, 17, (32, 24))),
    "bidirectional GRU, mean over time": (BiGRUMean, lambda: torch.randn(32, 10, 8)),
    "LSTMCell loop": (CellLoop, lambda: torch.randn(32, 10, 8)),
    "MultiheadAttention pooling": (AttentionPool, lambda: torch.randint(0, 50, (32, 12))),
    "causal LM (TransformerEncoder, mask in forward)": (CausalLM, lambda: torch.randint(0, 50, (16, 12))),
    "nn.Transformer seq2seq": (Seq2Seq, lambda: torch.randint(0, 30, (16, 8))),
}


def _hf_models() -> dict[str, tuple[Callable[[], nn.Module], Callable[[], Any]]]:
    """Hugging Face families built from small configs (when transformers is installed), each fed a dict batch
    with ``labels``: its own loss is the step's, as its users train it. They run on vmap (fx cannot trace
    transformers' forwards)."""
    try:
        import transformers as T
    except Exception:  # noqa: BLE001 - any import failure: no transformers rows
        return {}
    dec = dict(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=64)
    ids = lambda: torch.randint(0, 500, (16, 16))  # noqa: E731
    lm = lambda: {"input_ids": (x := ids()), "labels": x}  # noqa: E731
    cls = lambda: {"input_ids": ids(), "attention_mask": torch.ones(16, 16, dtype=torch.long),  # noqa: E731
                   "labels": torch.randint(0, 3, (16,))}
    return {
        "HF LLaMA (RMSNorm, rotary, GQA, SwiGLU)": (
            lambda: T.LlamaForCausalLM(T.LlamaConfig(**dec, num_attention_heads=4, num_key_value_heads=2)), lm),
        "HF Qwen2": (lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**dec, num_attention_heads=4, num_key_value_heads=2)),
                     lm),
        "HF DistilBERT classifier": (lambda: T.DistilBertForSequenceClassification(T.DistilBertConfig(
            vocab_size=500, dim=64, hidden_dim=128, n_layers=2, n_heads=2, num_labels=3)), cls),
        "HF RoBERTa classifier": (lambda: T.RobertaForSequenceClassification(T.RobertaConfig(
            vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=70, num_labels=3)), cls),
        "HF T5 (encoder-decoder)": (lambda: T.T5ForConditionalGeneration(T.T5Config(
            vocab_size=500, d_model=64, d_ff=128, num_layers=2, num_heads=2, d_kv=32, decoder_start_token_id=0)),
            lambda: {"input_ids": ids(), "labels": torch.randint(0, 500, (16, 8))}),
        "HF ViT classifier": (lambda: T.ViTForImageClassification(T.ViTConfig(
            image_size=16, patch_size=4, num_channels=1, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=2, num_labels=10)),
            lambda: {"pixel_values": torch.randn(16, 1, 16, 16), "labels": torch.randint(0, 10, (16,))}),
    }


HF_MODELS = _hf_models()


def _loss(out: Any, _: Any) -> torch.Tensor:
    return (out[0] if isinstance(out, tuple) else out).float().pow(2).mean()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=7, help="timed steps each way (their median)")
    ap.add_argument("--only", default="", help="names separated by \";\" (default: all)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    every = {**MODELS, **HF_MODELS}
    names = [n for n in every if not args.only or n in args.only.split(";")]
    lines = [
        "# Architectures as scripts write them: the path each takes, and the fused step against a loop",
        "",
        f"- command: `python benchmarks/architecture_survey.py --slots {args.slots} --repeats {args.repeats}`",
        fused_step.machine(torch.device("cpu")),
        f"- `check_model(..., slots={args.slots})`: one shared batch, Adam; the loop: each model with "
        "torch.optim.Adam; medians of the timed steps; fused vs alone: the largest relative difference between "
        "a fused slot and its model alone (losses, outputs and gradients of a training step; outputs in eval "
        "mode), `ray_modelbatch.slot_agreement`",
        "",
        "| model | path | what keeps it off the direct path | fused vs alone: training / evaluation | fused ms | "
        "loop ms | fused / loop |",
        "| --- | --- | --- | --- | ---: | ---: | ---: |",
    ]
    print("\n".join(lines), flush=True)
    for name in names:
        make, example = every[name]
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = rmb.check_model(make, example(), slots=args.slots, loss=None if name in HF_MODELS else _loss,
                                repeats=args.repeats)
        why = (r.error or r.why_vmap or "").splitlines()[0][:260] if r.path != "direct" else ""
        if r.fallbacks:
            why = f"{why}; vmap loops over the slots for: {', '.join(r.fallbacks)}"[:360].lstrip("; ")
        why = why.replace("|", "/")
        fused = f"{r.fused_ms:.2f}" if r.fused_ms else "-"
        loop = f"{r.loop_ms:.2f}" if r.loop_ms else "-"
        ratio = f"{r.loop_ms / r.fused_ms:.2f}x" if r.fused_ms and r.loop_ms else "-"
        a = r.agreement
        agree = (f"{a.train:.0e} / {a.eval:.0e}" + ("" if a.agrees else " DIFFER") if a is not None
                 else f"not compared ({r.agreement_error})" if r.agreement_error else "-")
        row = f"| {name} | {r.path} | {why} | {agree} | {fused} | {loop} | {ratio} |"
        lines.append(row)
        print(row, flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
