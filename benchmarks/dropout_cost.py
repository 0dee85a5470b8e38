"""What per-slot dropout generators cost: a fused step with each slot's own masks against one draw for all.

Why: a fused slot draws its dropout masks from its own generator
(``ray_modelbatch.slot_random``), so that it trains the same whatever runs
beside it and, on the CPU, draws the masks its model draws alone. That takes
one mask draw per slot and dropout call (and, for attention dropout inside
``scaled_dot_product_attention``, one SDPA call per slot) where a shared draw
takes one call for the whole stack (``ModelBatch(per_slot_random=False)``,
whose masks depend on the stack). This script times both, side by side in one
run, for models with dropout 0.1: an MLP 784-256-256-10 (dropout after each
hidden layer, direct path), the TransformerEncoder classifier of
``fused_step.py`` (its attention and layer dropouts, direct path), a two-layer
LSTM (dropout between the layers, direct path), the 28x28 CNN of
``fused_step.py`` with ``nn.Dropout2d`` after each pooling (channel dropout,
direct path) and, where ``transformers`` imports, the tiny BERT (on
``torch.vmap``). Batch 64, Adam, one shared batch; the loop (``nn.Module`` +
``torch.optim.Adam``, dropout on) gives fused/loop. ``--compare-vmap`` also
times the per-slot stack on ``torch.vmap`` (what a model whose dropout the
direct path does not take runs on).

    python benchmarks/dropout_cost.py                   # S = 8, 32
    python benchmarks/dropout_cost.py --slots 32 --models mlp,transformer
    python benchmarks/dropout_cost.py --models cnn2d --compare-vmap
    python benchmarks/dropout_cost.py --device cuda --slots 32,128   # on a GPU (benchmarks/gpu_run.sh runs it)

Prints a markdown table and writes it to ``benchmarks/dropout_cost_latest.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fused_step as fs  # noqa: E402 - the families, batches, timing and machine description

from ray_modelbatch import FusedEngine, ModelBatch, optim  # noqa: E402

P = 0.1


class DropMLP784(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Dropout(P), nn.Linear(256, 256), nn.ReLU(),
                                 nn.Dropout(P), nn.Linear(256, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DropLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.head = nn.LSTM(32, 64, num_layers=2, dropout=P, batch_first=True), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


class DropCNN(nn.Module):
    """``fused_step.py``'s 28x28 CNN with channel dropout (``nn.Dropout2d``) after each pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout2d(P),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout2d(P),
            nn.Flatten(-3), nn.Linear(32 * 7 * 7, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _dropout_on(model: nn.Module) -> nn.Module:
    """Every dropout of ``model`` at P (its modules, MultiheadAttention's, a transformers config's)."""
    for mod in model.modules():
        if isinstance(mod, nn.Dropout):
            mod.p = P
        if isinstance(mod, nn.MultiheadAttention):
            mod.dropout = P
    config = getattr(model, "config", None)
    if config is not None:
        config.hidden_dropout_prob = config.attention_probs_dropout_prob = P
    return model


FAMILIES: dict[str, tuple[str, Callable[[], nn.Module], Callable, Callable]] = {
    "mlp": ("MLP 784-256-256-10, dropout after each hidden layer (direct)", DropMLP784, F.cross_entropy,
            fs._classify((784,))),
    "transformer": ("TransformerEncoder 2x(d64 h4 ff128), attention and layer dropout (direct)",
                    lambda: _dropout_on(fs.TransformerClassifier()), F.cross_entropy, fs._tokens),
    "lstm": ("LSTM 32->64, 2 layers, dropout between them (direct)", DropLSTM, F.cross_entropy,
             fs._classify((16, 32))),
    "cnn2d": ("CNN 1x28x28 c16-c32-fc10, Dropout2d after each pooling (direct)", DropCNN, F.cross_entropy,
              fs._classify((1, 28, 28))),
}
if fs.transformers_available():
    FAMILIES["bert"] = ("transformers BERT 2x(d64 h2 ff128), hidden and attention dropout (vmap)",
                        lambda: _dropout_on(fs.tiny_bert()), fs._logits_loss, fs._tokens)


def measure(name: str, s: int, min_time: float, probe: fs.Probe, device: torch.device,
            compare_vmap: bool = False) -> dict:
    label, make, loss_fn, batch = FAMILIES[name]
    gen = torch.Generator().manual_seed(0)
    x, y = (t.to(device) for t in batch(gen))
    torch.manual_seed(0)
    models = [make().to(device) for _ in range(s)]
    lrs = [1e-3] * s
    engines = {}
    kinds = [("per_slot", True, True), ("global", False, True)] + ([("vmap", True, False)] if compare_vmap else [])
    for kind, per_slot, direct_path in kinds:
        mb = ModelBatch(models, per_slot_random=per_slot, direct_path=direct_path)
        engines[kind] = FusedEngine(mb, optim.Adam(mb, lr=lrs), loss_fn)
    loop_models = models[: min(s, 8)]
    loop_opts = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in loop_models]

    def loop() -> None:
        for m, o in zip(loop_models, loop_opts):
            fs.loop_step(m, o, loss_fn, x, y)

    fns = {k: (lambda e=e: e.train_step(x, y)) for k, e in engines.items()}
    fns["loop"] = loop
    for f in fns.values():  # warm-up
        for _ in range(2):
            f()
    direct = engines["per_slot"].mb.uses_direct_path
    t, _ = fs.time_contenders(fns, device, min_time, probe)
    per_model_loop = t["loop"] / len(loop_models)
    return {"name": name, "label": label, "slots": s, "path": "direct" if direct else "vmap",
            "per_slot_ms": t["per_slot"] * 1e3, "global_ms": t["global"] * 1e3,
            "cost": t["per_slot"] / t["global"], "loop_per_model_ms": per_model_loop * 1e3,
            "fused_loop_per_slot": s * per_model_loop / t["per_slot"],
            "fused_loop_global": s * per_model_loop / t["global"],
            "vmap_ms": t["vmap"] * 1e3 if "vmap" in t else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slots", default="8,32")
    p.add_argument("--models", default=",".join(FAMILIES))
    p.add_argument("--min-time", type=float, default=0.3, help="seconds of timed blocks per contender")
    p.add_argument("--runs", type=int, default=1, help="repeat the whole table; medians are reported")
    p.add_argument("--compare-vmap", action="store_true", help="also time the per-slot stack on torch.vmap")
    p.add_argument("--device", default="cpu", help="cpu or cuda (on a GPU a per-slot mask is a kernel launch per slot)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "dropout_cost_latest.md"))
    args = p.parse_args()
    names = [n for n in args.models.split(",") if n]
    unknown = set(names) - set(FAMILIES)
    if unknown:
        raise SystemExit(f"unknown models {sorted(unknown)}; choose from {', '.join(FAMILIES)}")
    slots = [int(v) for v in args.slots.split(",")]
    device = torch.device(args.device)
    probe = fs.Probe(device)
    probe()
    t0 = time.time()
    runs: dict[tuple[str, int], list[dict]] = {}
    for r in range(args.runs):
        for name in names:
            for s in slots:
                row = measure(name, s, args.min_time, probe, device, args.compare_vmap)
                runs.setdefault((name, s), []).append(row)
                print(f"run {r + 1}: {name} S={s}: per-slot {row['per_slot_ms']:.2f} ms, global "
                      f"{row['global_ms']:.2f} ms ({row['cost']:.2f}x)", flush=True)
    md = ["# Per-slot dropout generators: the cost (`benchmarks/dropout_cost.py`)", "",
          f"- command: `{fs.command()}`", fs.machine(device),
          f"- dropout {P}; batch {fs.BATCH}, Adam; medians of {args.runs} run(s), each the fastest quiet block of "
          "alternating blocks; loop: nn.Module + torch.optim.Adam with dropout on, per model-step", "",
          "| family | path | S | per-slot masks ms/step | one shared draw ms/step | cost | fused/loop per-slot | "
          "fused/loop shared |" + (" vmap (per-slot) ms/step | direct / vmap |" if args.compare_vmap else ""),
          "|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if args.compare_vmap else "")]
    for (name, s), rows in runs.items():
        med = {k: statistics.median(r[k] for r in rows) for k in ("per_slot_ms", "global_ms", "cost",
                                                                  "fused_loop_per_slot", "fused_loop_global")}
        line = (f"| {rows[0]['label']} | {rows[0]['path']} | {s} | {med['per_slot_ms']:.2f} | "
                f"{med['global_ms']:.2f} | {med['cost']:.2f}x | {med['fused_loop_per_slot']:.2f}x | "
                f"{med['fused_loop_global']:.2f}x |")
        if args.compare_vmap:
            vmap_ms = statistics.median(r["vmap_ms"] for r in rows)
            line += f" {vmap_ms:.2f} | {vmap_ms / med['per_slot_ms']:.2f}x |"
        md.append(line)
    md += ["", f"Run time: {time.time() - t0:.0f} s"]
    text = "\n".join(md) + "\n"
    print()
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
