"""ASHA over a CNN with a searched batch size and data augmentation, ported from Ray Tune's CIFAR tutorial.

The tutorial ("Hyperparameter tuning with Ray Tune", PyTorch docs) searches
the widths ``l1``/``l2`` of a small ConvNet, the learning rate and the batch
size, trains from a ``DataLoader`` with transforms, and reports ``loss`` and
``accuracy`` after every epoch to ASHA. This port keeps all of that, on the
8x8 digits that ship with scikit-learn (no download):

- the model, the search space (``batch_size`` included) and the metric names;
- a map-style ``Dataset`` with a random-shift augmentation, drawn per example
  from the trial's own seeded generator;
- one report per epoch (``steps_per_report="epoch"``), ASHA on ``loss``.

Trials with the same widths and batch size share a fused stack; the host runs
one stack per (widths, batch size) side by side. ::

    python examples/cnn_augment.py                 # 16 trials, 8 slots, up to 8 epochs
    python examples/cnn_augment.py --trials 32 --slots 16
"""

from __future__ import annotations

import argparse
import os
import time

import ray
import torch
import torch.nn.functional as F
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from torch import nn

import ray_modelbatch
from ray_modelbatch.tune import SweepProgress, batched_trainable


class Net(nn.Module):
    """The tutorial's ConvNet, sized for 8x8 images: two conv/pool stages, then l1 and l2 wide layers."""

    def __init__(self, l1: int = 64, l2: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 16, 3, padding=1)
        self.pool = nn.MaxPool2d(2, 2)
        self.fc1 = nn.Linear(16 * 2 * 2, l1)
        self.fc2 = nn.Linear(l1, l2)
        self.fc3 = nn.Linear(l2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class Digits(torch.utils.data.Dataset):
    """scikit-learn's digits as 1x8x8 images in [0, 1]: the tutorial's CIFAR10 stand-in."""

    def __init__(self, train: bool):
        from sklearn.datasets import load_digits

        d = load_digits()
        perm = torch.randperm(len(d.target), generator=torch.Generator().manual_seed(0))
        rows = perm[360:] if train else perm[:360]
        self.x = torch.tensor(d.images, dtype=torch.float32)[rows].unsqueeze(1) / 16.0
        self.y = torch.tensor(d.target, dtype=torch.long)[rows]

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], int(self.y[i])


def random_shift(sample: tuple, generator: torch.Generator) -> tuple:
    """Shift the digit by up to one pixel each way (pad, then crop): the augmentation, per example."""
    x, y = sample
    dx, dy = torch.randint(0, 3, (2,), generator=generator).tolist()
    return F.pad(x, (1, 1, 1, 1))[:, dy:dy + 8, dx:dx + 8], y


def load_data() -> dict:
    return {"train": Digits(train=True), "val": Digits(train=False), "transform": random_shift}


def evaluate(model: nn.Module, batch: tuple, config: dict) -> dict:
    """The tutorial's validation: loss and accuracy, under its own names."""
    x, y = batch
    out = model(x)
    return {"loss": F.cross_entropy(out, y), "accuracy": (out.argmax(1) == y).float().mean()}


def make_trainable(slots: int) -> type:
    return batched_trainable(
        model=lambda c: Net(c["l1"], c["l2"]),
        optimizer=ray_modelbatch.optim.SGD,
        hparams=lambda c: {"lr": c["lr"], "momentum": 0.9},
        data=load_data,
        loss=F.cross_entropy,
        eval_step=evaluate,
        batch_size=lambda c: c["batch_size"],
        steps_per_report="epoch",
        slots_per_host=slots,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--trials", type=int, default=16, help='Tune trials (num_samples)')
    p.add_argument("--slots", type=int, default=8, help="slots of the one host")
    p.add_argument("--max-epochs", type=int, default=8, help="ASHA's max_t: epochs a trial may train")
    p.add_argument("--storage", default="./runs", help='RunConfig storage_path')
    p.add_argument("--num-cpus", type=int, default=None, help='CPUs of the local Ray; None: os.cpu_count()')
    args = p.parse_args()
    started = time.monotonic()
    if not ray.is_initialized():
        ray.init(num_cpus=args.num_cpus or os.cpu_count() or 2, include_dashboard=False, logging_level="WARNING")
    T = make_trainable(args.slots)
    try:
        config = {
            "l1": tune.choice([32, 64]),
            "l2": 32,
            "lr": tune.loguniform(1e-2, 3e-1),
            "batch_size": tune.choice([16, 32, 64]),
        }
        tuner = tune.Tuner(
            T,
            param_space=config,
            tune_config=tune.TuneConfig(
                metric="loss", mode="min", num_samples=args.trials, max_concurrent_trials=T.max_concurrent(),
                scheduler=ASHAScheduler(max_t=args.max_epochs, grace_period=1, reduction_factor=2),
            ),
            run_config=tune.RunConfig(name="cnn_augment", storage_path=os.path.abspath(args.storage),
                                      callbacks=[SweepProgress(T, metric="loss")], verbose=0),
        )
        results = tuner.fit()
    finally:
        T.shutdown_hosts()
    best = results.get_best_result("loss", "min")
    errors = [r for r in results if r.error is not None]
    print(f"\n{len(results)} trials ({len(errors)} errored) in {time.monotonic() - started:.0f} s")
    print(f"{'trial':>6} {'l1':>3} {'batch':>5} {'lr':>9} {'epochs':>6} {'loss':>7} {'accuracy':>8} stack")
    for r in sorted((r for r in results if r.metrics), key=lambda r: r.metrics["loss"]):
        m, c = r.metrics, r.config
        print(f"{m['trial_id'].rsplit('_', 1)[-1]:>6} {c['l1']:>3} {c['batch_size']:>5} {c['lr']:>9.2e} "
              f"{m['training_iteration']:>6} {m['loss']:>7.4f} {m['accuracy']:>8.4f} {m['stack']}")
    print(f"Best trial config: {best.config}")
    print(f"Best trial final validation loss: {best.metrics['loss']:.4f}, accuracy: {best.metrics['accuracy']:.4f}")
    if errors:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
