"""Time of one training step: fused ModelBatch vs. a loop of plain models vs. dense matmul.

What is measured, for S = 8, 32, 128 models of one architecture (``--slots``)
of every family of issue 13 (tiny MLP 32-64-64-1 with MSE; MLP 784-256-256-10,
small CNNs, LeNet-5 + BatchNorm, a small ResNet, an nn.TransformerEncoder
classifier, an EmbeddingBag classifier, Embedding + mean, LSTM and GRU
classifiers and, where ``transformers`` imports, a tiny BERT classifier and a
tiny GPT-2 language model (its head tied to its token embedding, next-token
loss as ``labels=`` computes it), all with cross-entropy; batch 64, Adam
(``--optimizer sgd``: SGD with momentum 0.9), one input batch shared by every
model as in a hyperparameter sweep):

* fused: ``ModelBatch`` + ``ray_modelbatch.optim.Adam`` (one learning rate per
  slot) + ``FusedEngine.train_step`` -- one step of all S models; column
  'path' says whether its forward ran on the direct path (batched kernels, see
  ``ray_modelbatch.fast_path``) or on ``torch.vmap``; with ``--compare-vmap``
  the same stack forced onto vmap (``direct_path=False``) is timed too;
* loop: S plain ``nn.Module``s, each with its own default ``torch.optim.Adam``
  (zero_grad, forward, loss, backward, step), run one after the other. Its
  per-model cost does not depend on S, so only min(S, 32) models are timed and
  the result is given as model-steps/s;
* dense limit: FLOP/s of one large square fp32 matmul on the same device in the
  same run (start and end; the larger is used). On CPU it is timed through both
  kernels torch has for fp32 matmuls, its BLAS (``torch.mm``) and oneDNN, and the
  faster one is the limit: MKL runs its AVX2 code on AMD CPUs, so ``torch.mm``
  alone can show half of what the machine does. The table also gives the fused
  step as a fraction of ``torch.mm``;
* copy bandwidth: bytes read + written per second of ``dst.copy_(src)`` on
  one large fp32 tensor (``--copy-mb``, default 128 MiB on CPU, 256 MiB on
  CUDA: far beyond the caches, so it streams from and to memory), the median
  of 9 copies, on the same device in the same run: at the start, after every
  configuration and at the end; the largest median is used, because other
  jobs' memory traffic on a shared machine only ever lowers it (and a too
  high rate keeps the roofline a lower bound, a too low one would not);
* roofline: the least time one model-step can take on this machine,

      roofline = FLOPs / dense limit + optimizer bytes / copy bandwidth,

  with FLOPs the step's matmul/conv FLOPs (below) and optimizer bytes the
  optimizer's minimum memory traffic: each fp32 parameter that gets a gradient
  is read with its gradient and state and written back with its state once.
  Adam reads param, grad, exp_avg, exp_avg_sq and writes param, exp_avg,
  exp_avg_sq: 7 x 4 = 28 bytes per parameter; SGD with momentum reads p, g,
  buf and writes p, buf: 20 bytes. The two terms add rather than overlap: a
  tensor's update needs its finished gradient, and on a CPU the same cores
  run the GEMMs and stream the update (an implementation that overlapped them
  perfectly, as a GPU might, would have max() of the two as its floor).
  Otherwise it is a lower bound on the step time: the traffic of activations
  and gradients through the forward and backward, the loss, elementwise work
  (bias, activations, pooling, normalisation) and the Python/dispatch cost
  are left out, and the GEMMs are assumed to run at the large square
  matmul's rate, which small and skinny ones do not reach. So the true bound
  is higher, the fractions of the roofline below are pessimistic for the
  fused path and the bounds optimistic. Columns: 'fused % of roofline' = roofline time / fused step
  time; 'bound' = loop time per model-step / roofline time per model-step,
  the largest speedup over the loop that any fused implementation could reach
  on this machine.

Why: the fused path only pays off if it beats the loop by a wide margin for
small models and gets close to the machine's roofline for larger ones. The
targets checked at the end: the 784 MLP at S=128 runs at >= 75% of its
roofline; every family at S=32 runs >= 2x the loop, and where it does not,
the table says whether the bound itself is below 2x (out of reach on this
machine), whether the kernel bound is (the step's GEMM, convolution and
attention kernels as torch runs them here, replayed alone by
``kernel_time.py``: out of reach without faster kernels than torch's), or
the fused step's own work between the kernels is the reason.
The FLOPs counted are the matmul/conv FLOPs a step really needs (forward,
weight gradients, input gradients of every layer but the first); elementwise
work, the loss and the optimizer are not counted. Each configuration also
trains the fused path and the loop for 3 steps from the same weights on the
same batches and reports the largest relative parameter difference (next to
the fp32 loop's own difference from an fp64 copy, the noise floor), and
compares the gradients before any step with an fp64 copy of each model (next
to the fp32 model's own), marking CHECK where the fused ones are much further
off, so a fast but wrong fused step cannot go unnoticed. Shared CPUs have phases several
times slower than normal; a small matmul probe around every timing block
discards blocks measured in such a phase (column 'speed'). Phases also
move the loop more than the fused step (session 20: loops by up to 1.6x
between runs minutes apart, fused steps within 10-15%), so one run's ratio
says little: ``--repeat 3`` runs every configuration three times, in rounds,
and reports each one's median.

Runs without Ray. ``python benchmarks/fused_step.py [--quick] [--device cuda]
[--models mlp_tiny,mlp_784,cnn] [--slots 1,8,32] [--optimizer sgd] [--cpu-gemm onednn] [--compare-vmap] [--repeat 3]
[--copy-mb 128]``; writes the
markdown it prints to ``benchmarks/fused_step_latest.md``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ray_modelbatch import FusedEngine, ModelBatch
from ray_modelbatch import fast_path
from ray_modelbatch import optim as mb_optim

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_time import heavy_seconds  # noqa: E402 - a sibling module: the kernels' own time

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from digits_cnn import DigitsCNN  # noqa: E402 - the Tune sweep's CNN, torch only

BATCH = 64
LOOP_CAP = 32  # the loop is timed on at most this many models
EQ_CAP = 8  # equivalence is checked on at most this many slots
EQ_STEPS = 3
BLOCKS = 5  # timing blocks per contender, alternated; the fastest counts
SLOW_BLOCKS = 3  # ... when one step of a contender takes more than SLOW_STEP_S
SLOW_STEP_S = 1.0
QUIET = 0.85  # a timing block counts only if the machine probe reads >= this fraction of its best


# --------------------------------------------------------------------- models
class TinyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MLP784(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(-3), nn.Linear(32 * 7 * 7, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class GroupNormCNN(nn.Module):
    """The 28x28 CNN written as many scripts write it: GroupNorm after each convolution, ``F.max_pool2d`` in
    forward (before the direct path took GroupNorm and the functional pools, it ran on vmap)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.gn1 = nn.Conv2d(1, 16, 3, padding=1), nn.GroupNorm(4, 16)
        self.conv2, self.gn2 = nn.Conv2d(16, 32, 3, padding=1), nn.GroupNorm(8, 32)
        self.fc = nn.Linear(32 * 7 * 7, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.gn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.gn2(self.conv2(x))), 2)
        return self.fc(torch.flatten(x, 1))


class LeNetBN(nn.Module):
    """LeNet-5 with BatchNorm after each convolution, on 1x28x28."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2, bias=False), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 conv-BN, a residual (1x1 conv-BN where the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.down(x))


class SmallResNet(nn.Module):
    """A small ResNet on 1x16x16: stem conv(8), a block at 8 channels, a strided block to 16, pool, fc10."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 16, stride=2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.blocks(self.stem(x))).flatten(1))


VOCAB, SEQ = 2000, 16


class TransformerClassifier(nn.Module):
    """Tokens -> embedding + learned positions -> nn.TransformerEncoder (2 layers, d 64, 4 heads) -> mean -> fc10."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 64)
        self.pos = nn.Parameter(torch.randn(SEQ, 64) * 0.02)
        layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.emb(x) + self.pos).mean(1))


class BagClassifier(nn.Module):
    """nn.EmbeddingBag (mean of 16 tokens per example, 2-D input) -> fc10: fastText-style."""

    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(VOCAB, 64, mode="mean")
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bag(x))


class EmbeddingMean(nn.Module):
    """nn.Embedding -> mean over the tokens -> fc64 -> fc10."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 64)
        self.head = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(x).mean(1))


class RNNClassifier(nn.Module):
    """nn.LSTM or nn.GRU (32 -> 64, batch first) over 16 steps of 32 features -> last step -> fc10."""

    def __init__(self, cell: type[nn.Module]) -> None:
        super().__init__()
        self.rnn = cell(32, 64, batch_first=True)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


def tiny_bert() -> nn.Module:
    """transformers' BertForSequenceClassification, 2 layers of hidden 64, 2 heads, vocab 2000 (eager attention)."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=SEQ, num_labels=10,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="eager")
    return BertForSequenceClassification(config)


def tiny_gpt2() -> nn.Module:
    """transformers' GPT2LMHeadModel, 2 layers of 64, 2 heads, inner 128, vocab 2000: its LM head is the token
    embedding (tied weights). No cache: the loop trains without one, as a training run sets ``use_cache=False``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=64, n_layer=2, n_head=2, n_inner=128,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, attn_implementation="eager",
                        bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)
    return GPT2LMHeadModel(config)


def transformers_available() -> bool:
    try:
        import transformers  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means: no BERT row
        return False
    return True


@dataclass
class Spec:
    name: str
    label: str
    make: Callable[[], nn.Module]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    batch: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]


def _regression(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(BATCH, 32, generator=g), torch.randn(BATCH, 1, generator=g)


def _classify(shape: tuple[int, ...]) -> Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]:
    return lambda g: (torch.randn(BATCH, *shape, generator=g), torch.randint(0, 10, (BATCH,), generator=g))


def _tokens(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=g), torch.randint(0, 10, (BATCH,), generator=g)


def _logits_loss(out: object, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.logits, y)  # a transformers SequenceClassifierOutput


def _lm_tokens(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    return x, x  # a causal LM's labels are its own tokens


def _next_token_loss(out: object, y: torch.Tensor) -> torch.Tensor:
    """Each token's prediction of the next, as GPT2LMHeadModel computes it from ``labels=``: the labels shifted
    (the last position ignored), the logits as they are (a CausalLMOutputWithCrossAttentions')."""
    logits = out.logits
    shifted = F.pad(y, (0, 1), value=-100)[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=-100)


SPECS = {
    s.name: s
    for s in (
        Spec("mlp_tiny", "MLP 32-64-64-1, MSE", TinyMLP, F.mse_loss, _regression),
        Spec("mlp_784", "MLP 784-256-256-10, CE", MLP784, F.cross_entropy, _classify((784,))),
        Spec("cnn", "CNN 1x28x28 c16-c32-fc10, CE", SmallCNN, F.cross_entropy, _classify((1, 28, 28))),
        Spec("cnn_gn", "CNN 1x28x28 c16-GN-c32-GN, F.max_pool2d, fc10, CE", GroupNormCNN, F.cross_entropy,
             _classify((1, 28, 28))),
        Spec("cnn_digits", "CNN 8x8 c4-BN-c8-BN-fc10 (the sweep's), CE", DigitsCNN, F.cross_entropy, _classify((64,))),
        # the families of issue 13
        Spec("lenet_bn", "LeNet-5 + BatchNorm, 1x28x28, CE", LeNetBN, F.cross_entropy, _classify((1, 28, 28))),
        Spec("resnet", "small ResNet 1x16x16 (stem 8, blocks 8 and 16/2), CE", SmallResNet, F.cross_entropy,
             _classify((1, 16, 16))),
        Spec("transformer", f"nn.TransformerEncoder 2x(d64 h4 ff128) on {SEQ} tokens, mean, CE",
             TransformerClassifier, F.cross_entropy, _tokens),
        Spec("embbag", f"nn.EmbeddingBag({VOCAB}, 64, mean) on {SEQ} tokens, fc10, CE", BagClassifier,
             F.cross_entropy, _tokens),
        Spec("emb_mean", f"nn.Embedding({VOCAB}, 64), mean of {SEQ} tokens, fc64-fc10, CE", EmbeddingMean,
             F.cross_entropy, _tokens),
        Spec("lstm", "nn.LSTM(32, 64) over 16 steps, last step, fc10, CE", lambda: RNNClassifier(nn.LSTM),
             F.cross_entropy, _classify((16, 32))),
        Spec("gru", "nn.GRU(32, 64) over 16 steps, last step, fc10, CE", lambda: RNNClassifier(nn.GRU),
             F.cross_entropy, _classify((16, 32))),
        *([Spec("bert", f"transformers BERT 2x(d64 h2 ff128) on {SEQ} tokens, CE", tiny_bert, _logits_loss, _tokens),
           Spec("gpt2", f"transformers GPT-2 LM 2x(d64 h2 ff128), tied head, {SEQ} tokens, next-token CE", tiny_gpt2,
                _next_token_loss, _lm_tokens)]
          if transformers_available() else []),
    )
}


# ---------------------------------------------------------------- FLOP count
def step_flops(spec: Spec) -> tuple[int, int]:
    """(MACs per example, matmul/conv FLOPs of one training step of one model at batch BATCH).

    forward 2*B*MACs + weight grads 2*B*MACs + input grads 2*B*MACs for every
    Linear/Conv/attention/RNN except the first (its input, the data, needs no
    gradient). Attention and RNN layers are counted with their matmuls only,
    and embedding lookups not at all.
    """
    model = spec.make()
    macs: list[int] = []

    def hook(mod: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        if isinstance(mod, nn.Linear):
            macs.append(out.numel() * mod.in_features)
        elif isinstance(mod, nn.MultiheadAttention):  # projections, q @ k^T and weights @ v (batch first)
            b, t, e = inp[0].shape
            macs.append(b * t * 4 * e * e + 2 * b * t * t * e)
        elif type(mod).__name__ == "Conv1D":  # transformers' GPT-2 projection: x @ W, W [in, out]
            macs.append(out.numel() * mod.weight.shape[0])
        elif isinstance(mod, nn.RNNBase):  # gates x (input + hidden) per step
            gates = {"LSTM": 4, "GRU": 3}.get(mod.mode, 1) * mod.hidden_size
            tokens = inp[0].shape[0] * inp[0].shape[1]
            macs.append(tokens * gates * (mod.input_size + mod.hidden_size))
        else:
            macs.append(out.numel() * (mod.in_channels // mod.groups) * math.prod(mod.kernel_size))

    kinds = (nn.Linear, nn.modules.conv._ConvNd, nn.MultiheadAttention, nn.RNNBase)
    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, kinds) or type(m).__name__ == "Conv1D"]
    with torch.no_grad():
        model(spec.batch(torch.Generator().manual_seed(0))[0])
    for h in handles:
        h.remove()
    total = sum(macs)  # already for the whole batch
    flops = 2 * total + 2 * total + 2 * (total - macs[0])
    return total // BATCH, flops


def updated_params(spec: Spec) -> int:
    """Parameters of one model that get a gradient in a training step: the ones the optimizer must update.

    Counted after a real forward/backward rather than from ``parameters()``,
    so a parameter the step never reaches (no gradient, skipped by the
    optimizer) does not raise the roofline's optimizer term above the minimum.
    Buffers (BatchNorm's running statistics) are not parameters.
    """
    model = spec.make()
    x, y = spec.batch(torch.Generator().manual_seed(0))
    spec.loss_fn(model(x), y).backward()
    return sum(p.numel() for p in model.parameters() if p.grad is not None)


# ------------------------------------------------------------------ roofline
FP32_BYTES = 4
# Tensors of one parameter's size the optimizer must at least read and write per step (fp32 each):
# Adam reads param, grad, exp_avg, exp_avg_sq and writes param, exp_avg, exp_avg_sq;
# SGD with momentum reads param, grad, momentum_buffer and writes param, momentum_buffer.
OPT_TRAFFIC = {"adam": (4, 3), "sgd": (3, 2)}


def opt_bytes_per_param(optimizer: str) -> int:
    """Minimum memory traffic of one optimizer step per fp32 parameter: 28 B for Adam, 20 B for SGD with momentum.

    Each tensor is streamed once; a fused update that keeps everything in
    registers cannot do with less, so this is the optimizer's memory floor.
    """
    reads, writes = OPT_TRAFFIC[optimizer]
    return (reads + writes) * FP32_BYTES


@dataclass
class Roofline:
    """Least time of one model-step on this machine: GEMMs at the dense limit plus the optimizer at copy bandwidth."""

    gemm_s: float  # matmul/conv FLOPs / dense FLOP/s
    opt_s: float  # optimizer's minimum bytes / copy bytes/s

    @property
    def total_s(self) -> float:
        return self.gemm_s + self.opt_s


def roofline(flops: float, params: int, optimizer: str, dense: float, copy_bw: float) -> Roofline:
    """The roofline of one model-step with ``flops`` matmul FLOPs and ``params`` updated fp32 parameters.

    A lower bound: activation traffic, the loss, elementwise work and dispatch
    are left out and the GEMMs run at the large square matmul's rate.
    """
    return Roofline(flops / dense, params * opt_bytes_per_param(optimizer) / copy_bw)


# -------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], None], device: torch.device, reps: int) -> float:
    """Seconds per call of ``fn`` over ``reps`` back-to-back calls."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / reps


def reps_for(t_est: float, min_time: float) -> int:
    """Enough repetitions for ``min_time`` seconds (at least one)."""
    return max(1, math.ceil(min_time / max(t_est, 1e-9)))


class Probe:
    """How fast the machine is right now, as a fraction of the best seen in this run.

    Shared or throttled machines (VMs with CPU steal, other jobs) have phases
    in which everything runs several times slower. A reading is the FLOP/s of
    a fixed matmul run for ~20 ms, long enough to span several scheduler time
    slices, so it reads low while other processes compete for the cores.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.n = 512 if device.type == "cpu" else 2048
        self.a = torch.randn(self.n, self.n, device=device)
        self.b = torch.randn(self.n, self.n, device=device)
        self.c = torch.empty(self.n, self.n, device=device)
        self.best = 0.0

    def __call__(self) -> float:
        mm = lambda: torch.mm(self.a, self.b, out=self.c)  # noqa: E731
        raw = 2 * self.n**3 / timed(mm, self.device, 16)
        self.best = max(self.best, raw)
        return raw

    def frac(self, raw: float) -> float:
        return raw / self.best


def wait_quiet(probe: Probe, max_wait: float) -> float:
    """Wait (up to ``max_wait`` s) until the probe reads >= QUIET of its best; returns the seconds waited."""
    t0 = time.perf_counter()
    while probe.frac(probe()) < QUIET and time.perf_counter() - t0 < max_wait:
        time.sleep(1.0)
    return time.perf_counter() - t0


def time_contenders(
    fns: dict[str, Callable[[], None]], device: torch.device, min_time: float, probe: Probe
) -> tuple[dict[str, float], float]:
    """Seconds per call of each fn, and the (raw) probe reading of the slowest kept block.

    The fns' blocks alternate, and a probe runs between every two blocks, so
    each block is bracketed by probes. Blocks together run >= ``min_time`` per
    fn; each fn's fastest quiet block (both probes >= QUIET x the best probe)
    counts. Up to twice the planned blocks are run to collect enough quiet
    ones; a fn with none gets its fastest block and that block's (low) speed.
    Each fn must already be warmed up; one more call sizes the blocks.
    """
    est = {k: timed(f, device, 1) for k, f in fns.items()}
    blocks = SLOW_BLOCKS if max(est.values()) > SLOW_STEP_S else BLOCKS
    reps = {k: reps_for(t, min_time / blocks) for k, t in est.items()}
    quiet_best = {k: (math.inf, 0.0) for k in fns}  # (seconds per call, probe reading) of the fastest quiet block
    any_best = dict(quiet_best)
    quiet = {k: 0 for k in fns}
    before = probe()
    for _ in range(2 * blocks):
        for k, f in fns.items():
            if quiet[k] >= blocks:
                continue
            t = timed(f, device, reps[k])
            after = probe()
            speed, before = min(before, after), after
            any_best[k] = min(any_best[k], (t, speed))
            if probe.frac(speed) >= QUIET:
                quiet[k] += 1
                quiet_best[k] = min(quiet_best[k], (t, speed))
        if all(q >= blocks for q in quiet.values()):
            break
    kept = {k: quiet_best[k] if quiet[k] else any_best[k] for k in fns}
    return {k: v[0] for k, v in kept.items()}, min((v[1] for v in kept.values()), key=probe.frac)


def kernel_list(flops: dict[str, float]) -> str:
    """``torch.mm 214.8, oneDNN 470.2 GFLOP/s``."""
    return ", ".join(f"{k} {v / 1e9:,.1f}" for k, v in flops.items()) + " GFLOP/s"


def dense_flops(device: torch.device, n: int, min_time: float) -> dict[str, float]:
    """FLOP/s of an n x n x n fp32 matmul per kernel: fastest of 5 blocks that together run >= ``min_time``.

    Keys: ``torch.mm`` (the BLAS) and, on CPU where torch has it, ``oneDNN``.
    """
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    c = torch.empty(n, n, device=device)
    kernels = {"torch.mm": lambda: torch.mm(a, b, out=c)}
    if device.type == "cpu" and fast_path.onednn_available():
        bt = b.t().contiguous()
        kernels["oneDNN"] = lambda: fast_path._onednn_linear(a, bt)
    out = {}
    for name, mm in kernels.items():
        t = min(timed(mm, device, 1) for _ in range(2))  # warm-up and estimate
        reps = reps_for(t, min_time / 5)
        out[name] = 2 * n**3 / min(timed(mm, device, reps) for _ in range(5))
    return out


def copy_bandwidth(device: torch.device, mib: int, reps: int = 9) -> float:
    """Bytes read + written per second of ``dst.copy_(src)`` on two fp32 tensors of ``mib`` MiB: median of ``reps`` copies.

    The optimizer step of a large stack is a few streaming passes over
    memory; a plain copy is the fastest such pass torch does, so its rate is
    what the roofline charges the optimizer's bytes at. The tensors must be
    well beyond the last-level cache (16-32 MiB on the CPUs here, tens of MiB
    of L2 on GPUs) or the copy measures the cache. The median, not the
    fastest, because a single copy is short and a lucky one can overstate the
    rate a step of many passes sees.
    """
    n = mib * 2**20 // FP32_BYTES
    src = torch.full((n,), 1.0, dtype=torch.float32, device=device)  # written, so every page is really mapped
    dst = torch.empty_like(src)
    for _ in range(2):  # warm-up: maps dst's pages, starts the threads
        dst.copy_(src)
    times = sorted(timed(lambda: dst.copy_(src), device, 1) for _ in range(reps))
    return 2 * n * FP32_BYTES / times[len(times) // 2]


# --------------------------------------------------------------- one config
def _with_threads(n: int, fn: Callable[[], None]) -> None:
    """``fn()`` on ``n`` torch threads, the count restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        fn()
    finally:
        torch.set_num_threads(before)


def loop_step(model: nn.Module, opt: torch.optim.Optimizer, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad()
    loss_fn(model(x), y).backward()
    opt.step()


# name -> (fused optimizer over a ModelBatch, torch.optim optimizer of one model); lr per model
OPTIMIZERS: dict[str, tuple[Callable, Callable]] = {
    "adam": (lambda mb, lrs, compile: mb_optim.Adam(mb, lr=lrs, compile=compile),
             lambda params, lr: torch.optim.Adam(params, lr=lr)),
    "sgd": (lambda mb, lrs, compile: mb_optim.SGD(mb, lr=lrs, momentum=0.9, compile=compile),
            lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9)),
}
OPTIMIZER_LABELS = {"adam": "Adam", "sgd": "SGD (momentum 0.9)"}


def _update_time(opt: mb_optim.VectorOptimizer, device: torch.device, reps: int = 5) -> float:
    """The fused optimizer's update alone (``opt.step()`` on the gradients the last step left): the fastest of
    ``reps`` calls, the way ``kernel_time`` takes each kernel's fastest run."""
    best = math.inf
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        opt.step()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def quiet_kernel_time(step: Callable[[], None], probe: Probe, attempts: int = 3,
                      max_wait: float = 10.0) -> tuple[float, dict[str, float]]:
    """``kernel_time.heavy_seconds(step)`` taken while the machine is quiet (probes before and after read
    >= QUIET of the best), else the least of ``attempts`` tries, waiting up to ``max_wait`` s for a quiet
    machine between them. A slow phase would inflate the kernels' time and so understate the kernel bound,
    which would then call a target out of reach that is not."""
    best: tuple[float, dict[str, float]] | None = None
    for attempt in range(attempts):
        before = probe()
        total, by_name = heavy_seconds(step)
        quiet = min(probe.frac(before), probe.frac(probe())) >= QUIET
        if best is None or total < best[0]:
            best = (total, by_name)
        if quiet:
            break
        if attempt + 1 < attempts:
            wait_quiet(probe, max_wait)
    assert best is not None
    return best


def run_config(spec: Spec, s: int, device: torch.device, min_time: float, seed: int, probe: Probe,
               compile_update: bool = False, optimizer: str = "adam", cpu_gemm: str = "blas",
               compare_vmap: bool = False) -> dict:
    gen = torch.Generator().manual_seed(seed)
    eq_batches = [tuple(t.to(device) for t in spec.batch(gen)) for _ in range(EQ_STEPS)]
    x, y = (t.to(device) for t in spec.batch(gen))

    models = []
    for i in range(s):
        torch.manual_seed(seed * 100_003 + i)
        models.append(spec.make().to(device))
    lrs = [1e-3 * 10 ** (i / max(s - 1, 1) - 0.5) for i in range(s)]  # 3.2e-4 .. 3.2e-3, a sweep
    n_loop, n_eq = min(s, LOOP_CAP), min(s, EQ_CAP)
    loop_models = models[:n_loop]  # ModelBatch copies the weights, so these stay independent
    make_fused, make_ref = OPTIMIZERS[optimizer]
    loop_opts = [make_ref(m.parameters(), lrs[i]) for i, m in enumerate(loop_models)]
    # fp64 copies of the loop give the fp32 noise floor the max-diff must be read against.
    refs = [copy.deepcopy(m).double() for m in loop_models[:n_eq]]
    ref_opts = [make_ref(m.parameters(), lrs[i]) for i, m in enumerate(refs)]
    ref_init = [{n: p.detach().clone() for n, p in r.named_parameters()} for r in refs]

    grad_err, loop_grad_err = gradient_check(spec, models, eq_batches[0], n_eq, device, cpu_gemm)
    mb = ModelBatch(models, device=device, cpu_gemm=cpu_gemm)
    opt = make_fused(mb, lrs, compile_update)
    engine = FusedEngine(mb, opt, spec.loss_fn)

    # Equivalence: 3 steps of both paths from the same weights on the same batches.
    # These fused steps are also the fused path's warm-up.
    for xb, yb in eq_batches:
        engine.train_step(xb, yb)
    for i in range(n_eq):
        for xb, yb in eq_batches:
            loop_step(loop_models[i], loop_opts[i], spec.loss_fn, xb, yb)
            loop_step(refs[i], ref_opts[i], spec.loss_fn, as_double(xb), as_double(yb))
    max_rel = noise = 0.0
    no_grad: set[str] = set()
    with torch.no_grad():
        for i in range(n_eq):
            fused = mb.slot_state(i)
            ref = dict(refs[i].named_parameters())
            for name, p in loop_models[i].named_parameters():
                if float((ref[name] - ref_init[i][name]).abs().max()) <= NO_GRAD_MOVE * lrs[i]:
                    no_grad.add(name)  # zero gradient in exact arithmetic: see NO_GRAD_MOVE
                    continue
                max_rel = max(max_rel, rel_diff(fused[name], p))
                noise = max(noise, rel_diff(p, ref[name]))
    del refs, ref_opts, ref_init

    # The fused path is warm from those steps; the loop gets 3 warm-up passes
    # over all its timed models. One more call of each sizes the blocks.
    def loop_pass() -> None:
        for m, o in zip(loop_models, loop_opts):
            loop_step(m, o, spec.loss_fn, x, y)

    for _ in range(3):
        loop_pass()
    engine.train_step(x, y)
    path = "direct" if mb.uses_direct_path and not mb._slow_keys else "vmap"  # _slow_keys: direct refused at run time
    contenders = {"fused": lambda: engine.train_step(x, y), "loop": loop_pass}
    threads = torch.get_num_threads()
    if device.type == "cpu" and threads > 1:
        # The loop also gets one thread: small models' ops are too short to split, and OpenMP's fork and join
        # then costs more than the second core gives (the 784 MLP's loop: 470 against 403 model-steps/s).
        # The faster of the two is the baseline.
        contenders["loop_1t"] = lambda: _with_threads(1, loop_pass)
    loop_threads = threads
    if compare_vmap:  # the same stack on vmap: what the direct path gains
        vmb = ModelBatch(models, device=device, cpu_gemm=cpu_gemm, direct_path=False)
        vengine = FusedEngine(vmb, make_fused(vmb, lrs, compile_update), spec.loss_fn)
        for _ in range(3):
            vengine.train_step(x, y)
        contenders["vmap"] = lambda: vengine.train_step(x, y)
    t, speed = time_contenders(contenders, device, min_time, probe)
    t_fused, t_loop = t["fused"], t["loop"]
    if t.get("loop_1t", math.inf) < t_loop:
        t_loop, loop_threads = t["loop_1t"], 1
    # The kernels' own time (kernel_time.py): the fused step's GEMMs/convolutions/attention, replayed one by
    # one, and one model's loop step's.
    fused_heavy, fused_kernels = quiet_kernel_time(lambda: engine.train_step(x, y), probe)
    loop_heavy, _ = quiet_kernel_time(lambda: loop_step(loop_models[0], loop_opts[0], spec.loss_fn, x, y), probe)
    fused_update = _update_time(opt, device)  # the step's optimizer update alone, on the gradients it left

    del engine, opt, mb, models, loop_models, loop_opts, contenders
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "fused_step_s": t_fused,
        "fused_msps": s / t_fused,
        "loop_msps": n_loop / t_loop,
        "n_loop": n_loop,
        "loop_threads": loop_threads,
        "n_eq": n_eq,
        "max_rel": max_rel,
        "noise": noise,
        "no_grad": sorted(no_grad),
        "grad_err": grad_err,
        "loop_grad_err": loop_grad_err,
        "speed": speed,
        "path": path,
        "vmap_msps": s / t["vmap"] if "vmap" in t else None,
        "fused_heavy_s": fused_heavy,
        "fused_update_s": fused_update,
        "fused_kernels": fused_kernels,
        "loop_heavy_share": loop_heavy * n_loop / t_loop,
        "kernel_bound": s * t_loop / n_loop / fused_heavy if fused_heavy > 0 else float("inf"),
    }


GRAD_CHECK_RATIO = 10.0  # a fused gradient this many times further from fp64 than the model's own is flagged


def gradient_check(spec: Spec, models: list[nn.Module], batch: tuple, n: int, device: torch.device,
                   cpu_gemm: str) -> tuple[float, float]:
    """How far the fused gradients at the initial weights are from an fp64 copy of each model, and how far
    the fp32 model's own are: max over the first ``n`` slots and every parameter of
    ``max|g - g_fp64| / max|g_fp64|`` (parameters whose fp64 gradient is below 1e-12 left out).

    The fused gradients are those a training step computes: the hand-written step of an MLP stack
    (:mod:`ray_modelbatch.mlp_step`) where it applies, autograd through the direct path or vmap elsewhere.
    Unlike the parameters after a few steps, this has no optimizer in it: Adam turns rounding noise in a
    tiny gradient into lr-sized steps, so a parameter difference can be large for fused steps that are as
    exact as the model alone, or hide a gradient that is not. A fused step's gradients should be about as
    close to fp64 as the model's own; a fused BatchNorm that summed in lower precision read 5e-2 against
    2e-6 here. Runs on copies (a stack of its own), so BatchNorm statistics of the timed runs are untouched.
    """
    x, y = batch
    check = ModelBatch([copy.deepcopy(m) for m in models], device=device, cpu_gemm=cpu_gemm)
    check.train()
    names = list(check.params)
    check.zero_grad()
    if check.mlp_train_step(x, y, spec.loss_fn) is not None:  # the hand-written step training takes (mlp_step)
        check.sync_grads()
        fused = {k: check.params[k].grad for k in names}
    else:
        losses, _ = check.forward_loss(x, y, spec.loss_fn)
        fused = dict(zip(names, torch.autograd.grad(losses.sum(), [check.params[k] for k in names],
                                                    allow_unused=True)))
    worst = own = 0.0
    for i in range(n):
        exact, alone = copy.deepcopy(models[i]).double(), copy.deepcopy(models[i])
        spec.loss_fn(exact(as_double(x)), as_double(y)).backward()
        spec.loss_fn(alone(x), y).backward()
        mine = dict(alone.named_parameters())
        for name, p in exact.named_parameters():
            if p.grad is None or fused.get(name) is None:
                continue
            if float(p.grad.abs().max()) < 1e-12:
                continue
            worst = max(worst, rel_diff(fused[name][i], p.grad))
            own = max(own, rel_diff(mine[name].grad, p.grad))
    del check
    return worst, own


# A parameter whose fp64 copy moved less than this many lrs in EQ_STEPS steps has a zero gradient in exact
# arithmetic (an attention key's bias: softmax ignores a shift shared by every key; a convolution's bias
# before BatchNorm). Adam turns the fp32 rounding noise in such a gradient into lr-sized steps of random
# sign (in fp64 the noise is below eps and the weight stays put), so its relative difference says nothing
# about the fused step: both columns leave it out, and the table names it.
NO_GRAD_MOVE = 1e-6


def as_double(t: torch.Tensor) -> torch.Tensor:
    """The fp64 reference's copy of a batch tensor (indices stay integers)."""
    return t.double() if t.is_floating_point() else t


def grad_flagged(r: dict) -> bool:
    """Whether a config's fused gradients are much further from fp64 than the model's own (see gradient_check)."""
    return r["grad_err"] > GRAD_CHECK_RATIO * max(r["loop_grad_err"], 1e-6)


def no_grad_by_model(rows: list[dict]) -> dict[str, set[str]]:
    """The parameters each model's equivalence check left out (see NO_GRAD_MOVE), over all its configs."""
    out: dict[str, set[str]] = {}
    for r in rows:
        if r.get("no_grad"):
            out.setdefault(r["model"], set()).update(r["no_grad"])
    return out


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b|, in float64."""
    a, b = a.double(), b.double()
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)


# -------------------------------------------------------------------- report
def machine(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or "unknown CPU"
        try:
            with open("/proc/cpuinfo") as f:
                name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
        except OSError:
            pass
    lines = [
        f"- device: `{device}` — {name}",
        f"- torch {torch.__version__}, Python {platform.python_version()}, "
        f"torch threads {torch.get_num_threads()}, os.cpu_count() {os.cpu_count()}",
    ]
    if device.type == "cuda":
        lines.append(
            f"- fp32 matmul precision `{torch.get_float32_matmul_precision()}`, "
            f"cudnn.allow_tf32 {torch.backends.cudnn.allow_tf32} (the loop's convolutions; the fused ones run in "
            f"{'full fp32' if torch.get_float32_matmul_precision() == 'highest' else 'TF32 where cuDNN picks it'}: "
            f"ray_modelbatch.conv_precision)"
        )
    return "\n".join(lines)


def code_version() -> str:
    """Commit of the checkout and whether ray_modelbatch/ differs from it (the code under test changes often)."""
    root = Path(__file__).resolve().parent.parent
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()  # noqa: E731
        head = run("rev-parse", "--short", "HEAD")
        dirty = run("status", "--porcelain", "--", "ray_modelbatch")
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    return f"{head or 'unknown'}{' + uncommitted changes in ray_modelbatch/' if dirty else ''}"


def command() -> str:
    argv0 = sys.argv[0]
    try:
        argv0 = os.path.relpath(argv0)
    except ValueError:
        pass
    return " ".join(shlex.quote(a) for a in ["python", argv0, *sys.argv[1:]])


def fmt(v: float, digits: int = 3) -> str:
    return f"{v:,.{digits}g}" if abs(v) < 10 ** digits - 0.5 else f"{v:,.0f}"  # 999.7 -> "1,000", not "1e+03"


TINY_SPEEDUP_TARGET = 10.0  # tiny MLP, S=32: fused/loop
ROOF_TARGET, ROOF_TARGET_S = 0.75, 128  # 784 MLP at S=128: fused step >= this fraction of its roofline
SPEEDUP_TARGET, SPEEDUP_S = 2.0, 32  # every family at S=32: fused/loop, or a measured reason why not
GPU_SPEEDUP_TARGET, GPU_SPEEDUP_S = 30.0, 128  # on a GPU: every family at S=128


def speedup_target(label: str, s: int, r: dict | None, roof: Roofline | None, target: float) -> str:
    """One target line: fused/loop >= ``target`` at S=``s``, and if not, why not, in measured terms.

    Two bounds say why. The roofline bound (loop time / roofline time per
    model-step): below the target, no fused implementation could reach it on
    this machine. The kernel bound (loop time / the fused step's own GEMM,
    convolution and attention kernels, see ``kernel_time.py``): below the
    target, no fused step that calls the kernels torch runs here at these
    shapes could reach it, however little its other work cost; reaching it
    would take faster kernels than torch's. At or above both, the gap is the
    fused step's own work between the kernels.
    """
    head = f"- {label}, S={s}, fused/loop >= {target:g}x"
    if r is None or roof is None:
        return f"{head}: not measured in this run (or failed)"
    ratio = r["fused_msps"] / r["loop_msps"]
    line = f"{head}: {ratio:.2f}x -> {'MET' if ratio >= target else 'NOT MET'}"
    times = (f"loop {fmt(1e6 / r['loop_msps'])} µs per model-step vs. roofline {fmt(roof.total_s * 1e6)} µs = GEMMs "
             f"{fmt(roof.gemm_s * 1e6)} µs + optimizer {fmt(roof.opt_s * 1e6)} µs")
    kernels = (f"the fused step's kernels alone take {fmt(r['fused_heavy_s'] * 1e3)} ms of its "
               f"{fmt(r['fused_step_s'] * 1e3)} ms ({', '.join(f'{k} {fmt(v * 1e3)}' for k, v in sorted(r['fused_kernels'].items(), key=lambda kv: -kv[1])[:4])}), "
               f"the loop's {100 * r['loop_heavy_share']:.0f}% of its time")
    if ratio >= target:
        return (f"{line} (bound {r['bound']:.2f}x, kernel bound {r['kernel_bound']:.2f}x; fused at "
                f"{100 * r['roof_frac']:.1f}% of roofline)")
    if r["bound"] < target:
        return f"{line}; out of reach on this machine: bound {r['bound']:.2f}x < {target:g}x ({times})"
    if r["kernel_bound"] < target:
        return (f"{line}; out of reach with torch's kernels on this machine: kernel bound {r['kernel_bound']:.2f}x "
                f"< {target:g}x ({kernels}); the roofline bound is {r['bound']:.2f}x, so faster kernels than "
                f"torch's for these shapes would be needed")
    return (f"{line}; within reach: bound {r['bound']:.2f}x, kernel bound {r['kernel_bound']:.2f}x >= {target:g}x "
            f"({kernels}); the gap is the fused step's own work between the kernels (elementwise, layout copies, "
            f"the optimizer, dispatch): {fmt((r['fused_step_s'] - r['fused_heavy_s']) * 1e3)} ms, against at most "
            f"{fmt(max(r['fused_step_s'] * ratio / target - r['fused_heavy_s'], 0.0) * 1e3)} ms for {target:g}x")


def median_run(runs: list[dict]) -> dict:
    """Of one configuration's runs, the one with the median fused/loop (the lower middle one for an even count:
    a real run, not an average), with every run's ratio in ``ratios``; the first failure if all failed."""
    ok = sorted((r for r in runs if "error" not in r), key=lambda r: r["fused_msps"] / r["loop_msps"])
    if not ok:
        return runs[0]
    return {**ok[(len(ok) - 1) // 2], "ratios": [r["fused_msps"] / r["loop_msps"] for r in runs if "error" not in r]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="S = 8, 32 and shorter timings")
    ap.add_argument("--models", default=",".join(SPECS), help=f"comma-separated subset of {','.join(SPECS)}")
    ap.add_argument("--slots", default=None, help="comma-separated S values (default 8,32,128; --quick 8,32)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--min-time", type=float, default=None, help="seconds each timing runs for (default 0.5; --quick 0.2)")
    ap.add_argument("--dense-n", type=int, default=None, help="matmul size for the dense limit (default 2048 cpu, 4096 cuda)")
    ap.add_argument("--copy-mb", type=int, default=None,
                    help="MiB of each fp32 tensor of the copy-bandwidth measurement (default 128 cpu, 256 cuda)")
    ap.add_argument("--max-wait", type=float, default=60.0,
                    help="seconds to wait for the machine to be quiet before re-running a config timed while slow")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compile-update", action="store_true",
                    help="fused optimizer with compile=True (the update as one torch.compile'd pass)")
    ap.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adam",
                    help="optimizer of both paths (default adam; sgd = SGD with momentum 0.9)")
    ap.add_argument("--cpu-gemm", choices=fast_path.GEMMS, default="blas",
                    help="ModelBatch(cpu_gemm=...): the fused path's CPU GEMM kernels (default blas, as nn.Linear)")
    ap.add_argument("--compare-vmap", action="store_true",
                    help="also time each stack on vmap (ModelBatch(direct_path=False)): what the direct path gains")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run every configuration this many times, in rounds over all of them (a slow phase of a "
                         "shared machine then spreads over the configurations); the table shows each one's median "
                         "run by fused/loop, and a list every run's ratio (default 1; give an odd number)")
    ap.add_argument("--out", default=str(Path(__file__).with_name("fused_step_latest.md")), help="markdown file to write")
    args = ap.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda given, but torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in SPECS]
    if unknown:
        sys.exit(f"unknown model(s) {unknown}; choose from {list(SPECS)}")
    slots = [int(v) for v in (args.slots or ("8,32" if args.quick else "8,32,128")).split(",")]
    min_time = args.min_time or (0.2 if args.quick else 0.5)
    dense_n = args.dense_n or (4096 if device.type == "cuda" else 2048)
    copy_mb = args.copy_mb or (256 if device.type == "cuda" else 128)

    t_start = time.perf_counter()
    head = [
        "# Fused training step benchmark",
        "",
        f"- command: `{command()}`",
        f"- code: {code_version()}",
        machine(device),
        f"- batch {BATCH}, {OPTIMIZER_LABELS[args.optimizer]} ({'compile=True: the optimizer step is one compiled call' if args.compile_update else 'eager update'}), "
        f"fused GEMMs through {'oneDNN for layers of >= ' + str(fast_path.DIRECT_WRITE_MIN) + ' weights' if args.cpu_gemm == 'onednn' else 'torch.bmm (BLAS)'} "
        f"(ModelBatch cpu_gemm={args.cpu_gemm!r}), one input batch shared by all models; after warm-up (>= 3 steps) fused and loop are "
        f"timed in {BLOCKS} alternating blocks ({SLOW_BLOCKS} when a step takes > {SLOW_STEP_S:g} s) that together run "
        f">= {min_time} s per path, at least one step per block; the fastest block counts",
        f"- machine-speed guard (shared/throttled machines have phases several times slower): each timing block "
        f"is bracketed by probes ({'512' if device.type == 'cpu' else '2048'}^3 matmul, ~20 ms); blocks whose probes read "
        f"< {QUIET:.0%} of the best probe of the run are discarded and replaced (up to 2x the blocks); configs still "
        f"below that at the end are re-run once (after waiting up to {args.max_wait:g} s for a quiet machine). "
        f"Column 'speed' = probe around the kept blocks / best probe; '(noisy)' marks rows still below {QUIET:.0%}",
    ]
    print("\n".join(head), flush=True)

    probe = Probe(device)
    for _ in range(20):  # calibrate: the best probe is the yardstick for 'quiet'
        probe()
    wait_quiet(probe, args.max_wait)
    dense0 = dense_flops(device, dense_n, max(min_time, 1.0))
    bw0 = copy_bandwidth(device, copy_mb)
    bw_samples = [bw0]  # one more after every config: the largest median is the least disturbed by other jobs
    print(f"- dense limit (start): {kernel_list(dense0)} ({dense_n}x{dense_n} fp32 matmul); "
          f"copy bandwidth (start): {bw0 / 1e9:,.1f} GB/s ({copy_mb} MiB fp32 copy_, read + written)", flush=True)

    flop_info = {n: step_flops(SPECS[n]) for n in names}
    params = {n: updated_params(SPECS[n]) for n in names}

    def roof(n: str, dense: float, bw: float) -> Roofline:
        return roofline(flop_info[n][1], params[n], args.optimizer, dense, bw)

    def measure(n: str, s: int, note: str = "") -> dict:
        t0 = time.perf_counter()
        try:
            r = run_config(SPECS[n], s, device, min_time, args.seed, probe, args.compile_update, args.optimizer,
                           args.cpu_gemm, args.compare_vmap)
        except Exception as exc:  # noqa: BLE001 - one family that cannot run must not stop the others
            print(f"  {n:8s} S={s:<4d} FAILED: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            return {"model": n, "s": s, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}
        r.update(model=n, s=s, fused_flops=r["fused_msps"] * flop_info[n][1])
        bw_samples.append(copy_bandwidth(device, copy_mb))
        # dense limit of the start (too low if the start was busy), best bandwidth so far; the table uses the run's best
        roof0 = roof(n, max(dense0.values()), max(bw_samples)).total_s
        vm = "" if r["vmap_msps"] is None else f"  vmap {r['vmap_msps']:>8,.0f} (x{r['vmap_msps'] / r['loop_msps']:.2f})"
        print(
            f"  {n:8s} S={s:<4d} {r['path']:6s} fused {r['fused_msps']:>10,.0f} model-steps/s  loop {r['loop_msps']:>8,.0f}{vm}  "
            f"x{r['fused_msps'] / r['loop_msps']:.2f}  {r['fused_flops'] / 1e9:.1f} GFLOP/s  "
            f"[limits so far: roofline {100 * roof0 * r['fused_msps']:.0f}%, bound x{1 / (roof0 * r['loop_msps']):.1f}; "
            f"kernels {100 * r['fused_heavy_s'] / r['fused_step_s']:.0f}% of the step, kernel bound x{r['kernel_bound']:.2f}]  "
            f"diff {r['max_rel']:.1e} (floor {r['noise']:.1e})  grad vs fp64 {r['grad_err']:.1e} "
            f"(alone {r['loop_grad_err']:.1e}{', CHECK' if grad_flagged(r) else ''})  speed {probe.frac(r['speed']):.0%}  "
            f"({time.perf_counter() - t0:.1f} s){note}",
            file=sys.stderr, flush=True,
        )
        return r

    if args.repeat < 1:
        sys.exit(f"--repeat {args.repeat}: give 1 or more")
    rounds = [[measure(n, s, f"  [round {k + 1} of {args.repeat}]" if args.repeat > 1 else "")
               for n in names for s in slots] for k in range(args.repeat)]
    rows = [median_run([rnd[i] for rnd in rounds]) for i in range(len(rounds[0]))]
    for i, r in enumerate(rows):  # the best probe may have risen since: re-run configs timed while slow
        if args.repeat == 1 and "error" not in r and probe.frac(r["speed"]) < QUIET:  # (--repeat: the median)
            waited = wait_quiet(probe, args.max_wait)
            again = measure(r["model"], r["s"], f"  [re-run after waiting {waited:.0f} s: machine was slow]")
            if "error" not in again and probe.frac(again["speed"]) > probe.frac(r["speed"]):
                rows[i] = again

    wait_quiet(probe, args.max_wait)
    dense1 = dense_flops(device, dense_n, max(min_time, 1.0))
    bw1 = copy_bandwidth(device, copy_mb)
    per_kernel = {k: max(dense0[k], dense1[k]) for k in dense0}
    dense, blas = max(per_kernel.values()), per_kernel["torch.mm"]
    bw_samples.append(bw1)
    copy_bw = max(bw_samples)
    roofs = {n: roof(n, dense, copy_bw) for n in names}
    opt_b = opt_bytes_per_param(args.optimizer)
    reads, writes = OPT_TRAFFIC[args.optimizer]
    for r in rows:
        if "error" not in r:
            t_roof = roofs[r["model"]].total_s  # per model-step
            r.update(roof_frac=t_roof * r["fused_msps"], bound=1 / (t_roof * r["loop_msps"]))
    wall = time.perf_counter() - t_start

    md = head + [
        f"- dense limit: {dense / 1e9:,.1f} GFLOP/s = best of one {dense_n}x{dense_n} fp32 matmul timed at the start "
        f"({kernel_list(dense0)}) and the end ({kernel_list(dense1)}) of this run, each after waiting up to "
        f"{args.max_wait:g} s for a quiet machine. Column '% of torch.mm' is against torch.mm's best "
        f"({blas / 1e9:,.1f} GFLOP/s), the BLAS kernel nn.Linear uses",
        f"- copy bandwidth: {copy_bw / 1e9:,.1f} GB/s (bytes read + written) = the largest median of 9 "
        f"`dst.copy_(src)` of {copy_mb} MiB fp32, sampled at the start, after each configuration and at the end "
        f"of this run (all {len(bw_samples)} samples, in order: {', '.join(f'{b / 1e9:.1f}' for b in bw_samples)} "
        f"GB/s); other jobs' memory traffic only lowers it",
        f"- roofline per model-step = FLOPs / dense limit + optimizer bytes / copy bandwidth; optimizer bytes = "
        f"{opt_b} B per updated fp32 parameter ({OPTIMIZER_LABELS[args.optimizer]} at least reads {reads} and writes "
        f"{writes} parameter-sized tensors: " + ("param, grad, exp_avg, exp_avg_sq in; param, exp_avg, exp_avg_sq out"
        if args.optimizer == "adam" else "param, grad, momentum buffer in; param, momentum buffer out") + "). A lower "
        "bound: activation traffic, the loss, elementwise work and dispatch are left out and GEMMs are charged at the "
        "large square matmul's rate. 'fused % of roofline' = roofline time of the S models / fused step time; "
        "'bound' = loop time per model-step / roofline time per model-step, the largest fused/loop any fused "
        "implementation could reach on this machine",
        "- kernels = the step's GEMM, convolution, attention, recurrent-layer and softmax aten calls (benchmarks/kernel_time.py): "
        "recorded in one step, then each replayed on its own on fresh tensors of the same layout, fastest of 3 passes "
        "of 5 runs, summed; taken while the probes before and after read quiet (else the least of 3 tries). 'kernels % of fused step' = that sum / fused step time; 'kernels % of loop' = the same for one "
        "model's loop step / loop time per model-step; 'kernel bound' = loop time of the S models / the fused step's "
        "kernel sum: the largest fused/loop a fused step calling these kernels at these shapes could reach, "
        "however little its other work cost (the replay is optimistic: warm caches, no work between kernels)",
        "- FLOPs = matmul/conv FLOPs one step needs: forward 2·B·MACs + weight grads 2·B·MACs + input grads 2·B·MACs "
        "of every layer except the first (its input needs no grad); bias, activations, pooling, loss and optimizer "
        "are not counted",
        "- path = how the fused forward ran: 'direct' (batched kernels on the stacked parameters, "
        "ray_modelbatch.fast_path) or 'vmap' (torch.vmap over functional_call)"
        + ("; vmap/loop = the same stack forced onto vmap (ModelBatch(direct_path=False)), timed alongside"
           if args.compare_vmap else ""),
        f"- loop = sequential Python loop over plain nn.Modules, each with its own torch.optim optimizer (same settings); timed "
        f"on min(S, {LOOP_CAP}) models (column 'loop n'), reported per model step; on a CPU with more than one torch "
        "thread it is timed on one thread too, and the faster is the baseline (column 'loop n' says '@1t' when "
        "one thread won: small models' ops are too short for OpenMP to gain from a second core)",
        f"- max rel diff = max over the first min(S, {EQ_CAP}) slots and all parameter tensors of "
        f"max|p_fused - p_loop| / max|p_loop| after {EQ_STEPS} steps from the same weights on the same batches; "
        "'fp32 floor' is the same measure between the fp32 loop and an fp64 copy of it. Adam's first steps move a "
        "weight by about lr·sign(grad), so rounding noise in near-zero gradients shows up at the lr/|p| scale in "
        f"both columns. Parameters whose gradient is zero in exact arithmetic (the fp64 copy moved them by less "
        f"than {NO_GRAD_MOVE:g}·lr) are left out of both, since fp32 Adam moves them by noise alone"
        + "".join(f"; left out for {m}: {', '.join(sorted(names))}" for m, names in no_grad_by_model(rows).items()),
        f"- gradient vs fp64 = before any step, max over the first min(S, {EQ_CAP}) slots and all parameters of "
        "max|g - g_fp64| / max|g_fp64| for the fused stack, and (in brackets) for each model alone in fp32: no "
        f"optimizer in it, so it is the check of the fused computation itself; CHECK marks a fused gradient more "
        f"than {GRAD_CHECK_RATIO:g}x further from fp64 than the model's own"
        + (f" (flagged: {', '.join(sorted({r['model'] + ' S=' + str(r['s']) for r in rows if 'error' not in r and grad_flagged(r)}))})"
           if any("error" not in r and grad_flagged(r) for r in rows) else " (none flagged in this run)"),
        "",
        "| model | MACs/example | FLOPs per model-step | params updated | optimizer bytes per model-step | "
        "roofline µs per model-step (GEMM + optimizer) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *[f"| {SPECS[n].label} | {flop_info[n][0]:,} | {flop_info[n][1] / 1e6:,.2f} M | {params[n]:,} | "
          f"{params[n] * opt_b / 1e6:,.3f} MB | {fmt(roofs[n].total_s * 1e6)} ({fmt(roofs[n].gemm_s * 1e6)} + "
          f"{fmt(roofs[n].opt_s * 1e6)}) |" for n in names],
        "",
        "| model | S | path | fused ms/step | fused model-steps/s | loop n | loop model-steps/s | fused/loop | "
        + ("vmap/loop | " if args.compare_vmap else "")
        + "fused GFLOP/s | % of dense | % of torch.mm | fused % of roofline | bound | kernels % of fused step | "
        "kernels % of loop | kernel bound | max rel diff | fp32 floor | gradient vs fp64: fused (alone) | speed |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | " + ("---: | " if args.compare_vmap else "")
        + "---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for r in rows:
        if "error" in r:
            md.append(f"| {r['model']} | {r['s']} | failed: {r['error']} |")
            continue
        vm = f"{r['vmap_msps'] / r['loop_msps']:.2f}x | " if args.compare_vmap else ""
        md.append(
            f"| {r['model']} | {r['s']} | {r['path']} | {fmt(r['fused_step_s'] * 1e3)} | {fmt(r['fused_msps'])} | "
            f"{r['n_loop']}{' @1t' if r.get('loop_threads') == 1 else ''} | {fmt(r['loop_msps'])} | {r['fused_msps'] / r['loop_msps']:.2f}x | {vm}"
            f"{r['fused_flops'] / 1e9:.2f} | {100 * r['fused_flops'] / dense:.1f}% | {100 * r['fused_flops'] / blas:.1f}% | "
            f"{100 * r['roof_frac']:.1f}% | {r['bound']:.2f}x | {100 * r['fused_heavy_s'] / r['fused_step_s']:.0f}% | "
            f"{100 * r['loop_heavy_share']:.0f}% | {r['kernel_bound']:.2f}x | {r['max_rel']:.1e} ({r['n_eq']} slots) | {r['noise']:.1e} | "
            f"{r['grad_err']:.1e} ({r['loop_grad_err']:.1e}){' CHECK' if grad_flagged(r) else ''} | "
            f"{probe.frac(r['speed']):.0%}{'' if probe.frac(r['speed']) >= QUIET else ' (noisy)'} |"
        )

    def find(model: str, s: int) -> dict | None:
        return next((r for r in rows if r["model"] == model and r["s"] == s and "error" not in r), None)

    if args.repeat > 1:
        md += ["", f"fused/loop of each of the {args.repeat} rounds (the table shows the median round's run):", ""]
        md += [f"- {r['model']} S={r['s']}: " + " / ".join(f"{x:.2f}x" for x in r["ratios"])
               + f" (median {statistics.median(r['ratios']):.2f}x)" for r in rows if r.get("ratios")]
    md += ["", "Targets (roofline and bound as defined above; both are measured on this machine in this run):"]
    r = find("mlp_tiny", 32)
    md.append(speedup_target("tiny MLP", 32, r, roofs.get("mlp_tiny"), TINY_SPEEDUP_TARGET))
    r = find("mlp_784", ROOF_TARGET_S)
    if r is None:
        md.append(f"- MLP 784-256-256-10, S={ROOF_TARGET_S}, >= {ROOF_TARGET:.0%} of roofline: not measured in this run")
    else:
        rf, n_slots = roofs["mlp_784"], ROOF_TARGET_S
        # its GEMM kernels and its optimizer update, each as fast as it runs alone, and nothing else
        reach = rf.total_s * n_slots / (r["fused_heavy_s"] + r["fused_update_s"])
        md.append(
            f"- MLP 784-256-256-10, S={n_slots}, >= {ROOF_TARGET:.0%} of roofline: {100 * r['roof_frac']:.1f}% -> "
            f"{'MET' if r['roof_frac'] >= ROOF_TARGET else 'NOT MET'} (fused {fmt(r['fused_step_s'] * 1e3)} ms/step, "
            f"roofline {fmt(rf.total_s * n_slots * 1e3)} ms = GEMMs {fmt(rf.gemm_s * n_slots * 1e3)} ms + optimizer "
            f"{fmt(rf.opt_s * n_slots * 1e3)} ms; {100 * r['fused_flops'] / dense:.1f}% of dense, "
            f"{100 * r['fused_flops'] / blas:.1f}% of torch.mm; its kernels alone take "
            f"{fmt(r['fused_heavy_s'] * 1e3)} ms and its optimizer update alone {fmt(r['fused_update_s'] * 1e3)} ms, "
            f"so a step calling them reaches at most {100 * reach:.1f}% of the roofline"
            + (f": out of reach with torch's kernels on this machine)" if reach < ROOF_TARGET else ")")
        )
    for n in names:
        md.append(speedup_target(SPECS[n].label, SPEEDUP_S, find(n, SPEEDUP_S), roofs[n], SPEEDUP_TARGET))
    if device.type == "cuda":
        for n in names:
            md.append(speedup_target(SPECS[n].label, GPU_SPEEDUP_S, find(n, GPU_SPEEDUP_S), roofs[n],
                                     GPU_SPEEDUP_TARGET))
    md += ["", f"Run time: {wall:.1f} s"]

    text = "\n".join(md) + "\n"
    print("\n" + "\n".join(md[len(head):]))
    Path(args.out).write_text(text)
    print(f"\n(written to {args.out})")


if __name__ == "__main__":
    main()
