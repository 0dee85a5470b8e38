"""A standalone hyperparameter sweep on scikit-learn's digits: many MLPs trained as one fused model.

Each slot is one MLP (64-128-10) with its own learning rate, weight decay and
warmup length (drawn log-uniformly), trained with AdamW and a per-slot
warmup-cosine schedule. Slots whose validation loss stops improving are
stopped early (and cost nothing from then on). One TensorBoard run per slot
goes to ``--logdir``::

    python examples/standalone_sweep.py --slots 32 --steps 600
    tensorboard --logdir runs/standalone

``--split kfold`` runs k-fold cross-validation instead of one shared
validation split: every configuration is trained k times (one slot per fold,
each slot with its own data stream) and configurations are ranked by their
mean accuracy over the folds.

No Ray needed: this is the fused core plus the standalone Trainer.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

import ray_modelbatch as rmb
from ray_modelbatch import metrics
from ray_modelbatch.data import PerSlotStreams, SharedStream, kfold, padded_per_slot
from ray_modelbatch.optim import schedules


def make_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def log_uniform(lo: float, hi: float, n: int, g: torch.Generator) -> list[float]:
    u = torch.rand(n, generator=g, dtype=torch.float64)
    return torch.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))).tolist()


def load_data(seed: int) -> tuple[torch.Tensor, ...]:
    """Digits scaled to [0, 1], split 80/20 into a development set and a held-out test set."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    n_test = x.shape[0] // 5
    test, dev = perm[:n_test], perm[n_test:]
    return x[dev], y[dev], x[test], y[test]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--slots", type=int, default=32, help="number of models trained together")
    p.add_argument("--steps", type=int, default=600, help="training steps (per slot, at most)")
    p.add_argument("--batch-size", type=int, default=64, help='rows per slot per step')
    p.add_argument("--eval-every", type=int, default=25, help='steps between validations')
    p.add_argument("--patience", type=int, default=4, help="evaluations without improvement before a slot stops")
    p.add_argument("--split", choices=["shared", "kfold"], default="shared", help='every config on one split, or each on its own k-fold split')
    p.add_argument("--folds", type=int, default=4, help="k for --split kfold (must divide --slots)")
    p.add_argument("--logdir", default="runs/standalone", help="TensorBoard directory ('' to disable)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help='where the stack trains')
    p.add_argument("--seed", type=int, default=0, help="seed of the configs' draws and of the models")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (1: each fused op is small, so waking more threads costs "
                        "more than it saves, and on a busy machine far more)")
    p.add_argument("--no-progress", action="store_true", help='no progress line')
    args = p.parse_args()

    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    if dev.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    x, y, x_test, y_test = load_data(args.seed)
    x, y, x_test, y_test = x.to(dev), y.to(dev), x_test.to(dev), y_test.to(dev)
    s = args.slots

    # ------------------------------------------------------------ search space
    g = torch.Generator().manual_seed(args.seed)
    if args.split == "kfold":
        if s % args.folds:
            raise SystemExit(f"--slots ({s}) must be a multiple of --folds ({args.folds}) for k-fold")
        n_cfg = s // args.folds
    else:
        n_cfg = s
    lr = log_uniform(1e-4, 3e-2, n_cfg, g)
    wd = log_uniform(1e-5, 1e-1, n_cfg, g)
    warmup = [int(w) for w in torch.randint(0, args.steps // 10 + 1, (n_cfg,), generator=g).tolist()]
    # Slot j runs configuration cfg_of[j] (on fold j // n_cfg with k-fold).
    cfg_of = [j % n_cfg for j in range(s)]

    models = [make_mlp() for _ in range(s)]
    mb = rmb.ModelBatch(models, device=dev)
    opt = rmb.optim.AdamW(
        mb,
        lr=[lr[c] for c in cfg_of],
        weight_decay=[wd[c] for c in cfg_of],
        schedule=[schedules.warmup_cosine(args.steps, warmup[c], min_lr_ratio=0.05) for c in cfg_of],
    )
    engine = rmb.FusedEngine(mb, opt, nn.functional.cross_entropy)

    # -------------------------------------------------------------------- data
    fns = {"loss": metrics.cross_entropy, "accuracy": metrics.accuracy}
    if args.split == "kfold":
        train_idx, val_idx = kfold(x.shape[0], args.folds, seed=args.seed)
        fold_of = [j // n_cfg for j in range(s)]
        train = PerSlotStreams(x, y, args.batch_size, seeds=[args.seed * 1000 + j for j in range(s)],
                               indices=[train_idx[f] for f in fold_of])
        val = padded_per_slot(x, y, [val_idx[f] for f in fold_of])
    else:
        n_val = x.shape[0] // 5
        train = SharedStream(x[n_val:], y[n_val:], args.batch_size, seed=args.seed)
        val = (x[:n_val], y[:n_val])

    hparams = [{"lr": lr[c], "weight_decay": wd[c], "warmup_steps": warmup[c], "config": c} for c in cfg_of]
    names = None
    if args.split == "kfold":
        names = [f"cfg{cfg_of[j]:03d}_fold{fold_of[j]}" for j in range(s)]
        for j in range(s):
            hparams[j]["fold"] = fold_of[j]
    trainer = rmb.Trainer(
        engine, train, val,
        metrics=fns,
        eval_every=args.eval_every,
        early_stopping=rmb.EarlyStopping("val_loss", mode="min", patience=args.patience, min_delta=1e-4,
                                          restore_best=True),  # a stopped slot keeps its best weights
        logdir=args.logdir or None,
        progress=not args.no_progress,
        hparams=hparams,
        slot_names=names,
    )
    t_setup = time.perf_counter() - t0
    t1 = time.perf_counter()
    with trainer:
        hist = trainer.fit(args.steps)
    t_fit = time.perf_counter() - t1

    # ------------------------------------------------------------------ report
    test = engine.evaluate(x_test, y_test, {"accuracy": metrics.accuracy}, slots=None)
    test_acc = test["accuracy"].tolist()
    rows = []
    for j in range(s):
        best = hist.best(j, "val_accuracy", "max") or {}
        rows.append({"slot": j, "cfg": cfg_of[j], "status": hist.status[j],
                     "stopped": hist.stopped_at.get(j, trainer.step_count),
                     "val_acc": best.get("val_accuracy", float("nan")),
                     "val_loss": (hist.best(j, "val_loss", "min") or {}).get("val_loss", float("nan")),
                     "test_acc": test_acc[j]})

    ranked = sorted(rows, key=lambda r: (-r["val_acc"], r["val_loss"]))
    print()
    if args.split == "kfold":
        cfgs = []
        for c in range(n_cfg):
            mine = [r for r in rows if r["cfg"] == c]
            cfgs.append({"cfg": c, "val_acc": sum(r["val_acc"] for r in mine) / len(mine),
                         "test_acc": sum(r["test_acc"] for r in mine) / len(mine),
                         "stopped": [r["stopped"] for r in mine]})
        cfgs.sort(key=lambda r: -r["val_acc"])
        print(f"Top 5 of {n_cfg} configurations by mean {args.folds}-fold validation accuracy:")
        print(f"{'cfg':>4} {'lr':>9} {'wd':>9} {'warmup':>6} {'cv_acc':>7} {'test_acc':>8}  stopped at (per fold)")
        for r in cfgs[:5]:
            c = r["cfg"]
            print(f"{c:>4} {lr[c]:>9.2e} {wd[c]:>9.2e} {warmup[c]:>6} {r['val_acc']:>7.4f} {r['test_acc']:>8.4f}  "
                  f"{r['stopped']}")
    else:
        print(f"Top 5 of {s} slots by best validation accuracy:")
        print(f"{'slot':>4} {'lr':>9} {'wd':>9} {'warmup':>6} {'status':>13} {'steps':>5} {'val_acc':>7} "
              f"{'val_loss':>8} {'test_acc':>8}")
        for r in ranked[:5]:
            c = r["cfg"]
            print(f"{r['slot']:>4} {lr[c]:>9.2e} {wd[c]:>9.2e} {warmup[c]:>6} {r['status']:>13} {r['stopped']:>5} "
                  f"{r['val_acc']:>7.4f} {r['val_loss']:>8.4f} {r['test_acc']:>8.4f}")

    # The winner is an ordinary nn.Module again.
    best_slot = ranked[0]["slot"]
    model = mb.slot_module(best_slot, make_mlp().to(dev)).eval()
    with torch.no_grad():
        acc = (model(x_test).argmax(1) == y_test).float().mean().item()
    counts = {k: hist.status.count(k) for k in ("finished", "early_stopped", "diverged")}
    slot_steps = int(opt.steps.sum().item())
    where = f"config {cfg_of[best_slot]}, fold {fold_of[best_slot]}" if args.split == "kfold" else f"config {best_slot}"
    print(f"\nbest slot {best_slot} ({where}) as a plain nn.Module: test accuracy {acc:.4f}")
    saved = s * args.steps - slot_steps
    print(f"status: {counts}; {slot_steps} slot-steps of {s * args.steps} budgeted "
          f"({100 * slot_steps / (s * args.steps):.0f}%)"
          + (f": early stopping saved {saved}" if counts["early_stopped"] and saved > 0 else ""))
    print(f"time: setup {t_setup:.1f}s, training {t_fit:.1f}s, total {time.perf_counter() - t0:.1f}s "
          f"({s} models, {trainer.step_count} fused steps on {dev})")
    if args.logdir:
        print(f"TensorBoard: tensorboard --logdir {args.logdir}")


if __name__ == "__main__":
    main()
