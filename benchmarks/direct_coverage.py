"""Models that reached the direct path in sessions 40 and 41, against vmap (the path they took before) and a loop.

Each family is a model written the way scripts write it, with the one construct that used to keep it on
``torch.vmap``: ``nn.Unflatten`` before a transposed convolution (a generator), ``F.normalize`` (a
metric-learning head), a causal mask and positions made in forward (a language model), ``torch.randn_like``
and a tuple returned (a VAE), ``Tensor.unfold`` and ``F.glu`` (an MLP-Mixer). Two more stay on vmap: loops
over ``nn.GRUCell`` and ``nn.LSTMCell``, whose cells the stack now computes from plain ops (an LSTMCell stack
could not run before; a GRUCell one ran its cell once per slot). Session 41 added ``nn.Transformer`` (and its
decoder), a seq2seq model. For every family and slot count, one process times, in alternating rounds:

- the fused Adam step on the direct path (``ModelBatch(...)``);
- the same stack forced onto vmap (``ModelBatch(..., direct_path=False)``), which is what these models ran
  before;
- a loop of the same models, each with ``torch.optim.Adam``.

and prints medians of the rounds with the ratios. The machine is shared: compare the ratios, not the
milliseconds, across runs.

    python benchmarks/direct_coverage.py [--slots 8,32] [--rounds 5] [--families "name;name"] [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import architecture_survey as survey  # noqa: E402  (the models, at this benchmark's sizes)
import fused_step  # noqa: E402  (its machine() line)

import ray_modelbatch as rmb  # noqa: E402
from ray_modelbatch import optim as mb_optim  # noqa: E402
from ray_modelbatch.cpu_memory import keep_freed_memory  # noqa: E402

BATCH = 64


def _elbo(out: tuple[torch.Tensor, ...], x: torch.Tensor) -> torch.Tensor:
    recon, mu, log_var = out
    kl = -0.5 * (1 + log_var - mu.square() - log_var.exp()).sum(-1).mean()
    return F.binary_cross_entropy_with_logits(recon, x) + kl


def _next_token(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.flatten(0, -2), y.flatten())


# name -> (model factory, batch maker (x, y), loss)
FAMILIES: dict[str, tuple[Callable[[], nn.Module], Callable[[torch.Generator], tuple], Callable]] = {
    "generator (Unflatten)": (lambda: survey.generator(32), lambda g: (torch.randn(BATCH, 16, generator=g),
                                                    torch.rand(BATCH, 1, 28, 28, generator=g)), F.mse_loss),
    "normalized MLP (F.normalize)": (lambda: survey.Residual(64, 128, 10, blocks=2), lambda g: (torch.randn(BATCH, 64, generator=g),
                                                               torch.randint(0, 10, (BATCH,), generator=g)),
                                     F.cross_entropy),
    "causal LM (mask in forward)": (lambda: survey.CausalLM(100, 16, 64, 128, False, "relu"), lambda g: (torch.randint(0, 100, (BATCH, 16), generator=g),
                                                         torch.randint(0, 100, (BATCH, 16), generator=g)),
                                    _next_token),
    "VAE (randn_like, tuple out)": (lambda: survey.VAE(64, 128, 8), lambda g: (torch.rand(BATCH, 64, generator=g),) * 2, _elbo),
    "mixer (unfold, glu)": (lambda: survey.Mixer(28, 64), lambda g: (torch.randn(BATCH, 1, 28, 28, generator=g),
                                              torch.randint(0, 10, (BATCH,), generator=g)), F.cross_entropy),
    "GRUCell loop": (lambda: survey.CellLoop(nn.GRUCell, 32, 64, 10), lambda g: (torch.randn(BATCH, 16, 32, generator=g),
                                          torch.randint(0, 10, (BATCH,), generator=g)), F.cross_entropy),
    "LSTMCell loop": (lambda: survey.CellLoop(nn.LSTMCell, 32, 64, 10), lambda g: (torch.randn(BATCH, 16, 32, generator=g),
                                                                 torch.randint(0, 10, (BATCH,), generator=g)),
                      F.cross_entropy),
    "seq2seq (nn.Transformer)": (lambda: survey.Seq2Seq(100, 64, 4, 128),
                                 lambda g: (torch.randint(0, 100, (BATCH, 16), generator=g),
                                            torch.randint(0, 100, (BATCH, 16), generator=g)), _next_token),
}


def _median_ms(fn: Callable[[], Any], reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def measure(name: str, slots: int, rounds: int, reps: int) -> dict[str, Any]:
    """Medians over ``rounds`` alternating rounds of ``reps`` steps each: direct, vmap, loop (ms per step)."""
    make, batch, loss = FAMILIES[name]
    x, y = batch(torch.Generator().manual_seed(0))
    models = []
    for s in range(slots):
        torch.manual_seed(s)
        models.append(make())
    steps: dict[str, Callable[[], Any]] = {}
    paths = {}
    for way, direct in (("direct", True), ("vmap", False)):
        mb = rmb.ModelBatch([copy.deepcopy(m) for m in models], direct_path=direct)
        engine = rmb.FusedEngine(mb, mb_optim.Adam(mb, lr=1e-3), loss)
        steps[way] = lambda engine=engine: engine.train_step(x, y)
        paths[way] = "direct" if mb.uses_direct_path else "vmap"
    loop_models = [copy.deepcopy(m) for m in models]
    opts = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in loop_models]

    def loop() -> None:
        for m, o in zip(loop_models, opts):
            o.zero_grad()
            loss(m(x), y).backward()
            o.step()

    steps["loop"] = loop
    for fn in steps.values():  # warm up: plans, first allocations
        fn()
        fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for way, fn in steps.items():
            times[way].append(_median_ms(fn, reps))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"name": name, "slots": slots, "paths": paths, **med}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slots", default="8,32")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=5, help="steps per round and way (their median)")
    ap.add_argument("--families", default="", help="names separated by \";\" (default: all)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    families = [n for n in FAMILIES if not args.families or n in args.families.split(";")]
    keep_freed_memory()
    lines = [
        "# Models that reached the direct path in sessions 40 and 41: direct vs vmap vs a loop",
        "",
        f"- command: `python benchmarks/direct_coverage.py --slots {args.slots} --rounds {args.rounds} "
        f"--reps {args.reps}`",
        fused_step.machine(torch.device("cpu")),
        f"- fused Adam steps (ms, median of {args.rounds} alternating rounds of {args.reps} steps) on one shared "
        f"batch of {BATCH}; the loop: each model with torch.optim.Adam",
        "",
        "| family | S | path | direct ms | vmap ms | loop ms | direct / vmap | direct / loop | vmap / loop |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    print("\n".join(lines), flush=True)
    for slots in (int(s) for s in args.slots.split(",")):
        for name in families:
            r = measure(name, slots, args.rounds, args.reps)
            row = (f"| {name} | {slots} | {r['paths']['direct']} | {r['direct']:.2f} | {r['vmap']:.2f} | "
                   f"{r['loop']:.2f} | {r['vmap'] / r['direct']:.2f}x | {r['loop'] / r['direct']:.2f}x | "
                   f"{r['loop'] / r['vmap']:.2f}x |")
            lines.append(row)
            print(row, flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
