"""Three Ray Tune scripts as practitioners write them, run as plain Tune and ported to ray_modelbatch, side by side.

``benchmarks/tune_sweep.py`` measures a sweep written for ray_modelbatch (one
MLP or CNN stack per width, configs that fuse well) against the same sweep as
standard trials. This benchmark asks the other question: what does a user who
already has a Tune script get from porting it as ``docs/porting.md`` says? So
each script is written first as plain Tune (a function trainable that builds
its model, a ``torch.optim`` optimizer and a ``DataLoader`` over
``sklearn.datasets.load_digits``, and calls ``tune.report(...)``), and then
ported line by line: ``batched_trainable(model=..., optimizer=..., hparams=...,
data=..., loss=..., eval_step=..., batch_size=..., steps_per_report="epoch")``,
``with_resources`` dropped, ``tune.report(..., checkpoint=...)`` replaced by a
``CheckpointConfig`` where the script keeps checkpoints, and the slot cap given
to the search algorithm. The search space is not changed: the scripts search
what practitioners search, including keys that split stacks.

The scripts (digits only, no download):

* ``cifar``: the CNN of Ray Tune's CIFAR-10 tutorial (conv 5x5 -> pool ->
  conv 5x5 -> pool -> fc ``l1`` -> fc ``l2`` -> 10) on the digits upsampled to
  1x32x32, SGD with momentum 0.9, ``l1`` and ``l2`` in {8, 16, 32, 64}, ``lr``
  log-uniform, ``batch_size`` in {8, 16, 32}; ASHA on the validation ``loss``
  (max_t 10 epochs, grace 1, reduction 2), 20 trials, a checkpoint every epoch
  as the tutorial keeps (the port: ``CheckpointConfig(checkpoint_frequency=1)``).
  After ``fit()`` the best trial's checkpoint is loaded back (the tutorial's last
  step; ``T.load_model`` in the port) and scored on the validation set.
* ``lstm``: an ``Embedding`` + ``LSTM`` classifier over each digit's 64 pixel
  intensities (0-16) read as a token sequence; hidden 32 or 64, ``dropout``
  ``tune.uniform(0, 0.5)`` on the last hidden state, Adam with ``lr`` and
  ``weight_decay`` log-uniform, batch 64; ASHA on ``val_loss`` (max_t 8, grace
  1, reduction 2), 16 trials, no checkpoints.
* ``pbt``: PBT over an MLP (32-64-64-32) that regresses the bottom half of each
  digit from its top half (MSE), SGD with ``lr`` and ``momentum`` mutated every
  4 epochs, 20 epochs, 8 trials; the plain script checkpoints every 4 epochs
  through ``tune.report(..., checkpoint=...)`` and resumes from
  ``tune.get_checkpoint()`` (Ray's PBT guide), the port through
  ``CheckpointConfig(checkpoint_frequency=4)``.

Both ways of a script share its search space, its ``BasicVariantGenerator``
seed (the same trials in the same order; the report checks the configs
match), its scheduler settings, epochs and batch sizes, and each trial's
``seed`` (its model's initial weights and its batch order). Each run gets a fresh local
Ray (``num_cpus = os.cpu_count()``) and shuts it down. Plain trials run with
``tune.with_resources(fn, {"cpu": 1})`` and ``reuse_actors=True``; ported
trials with Tune's defaults for a batched trainable and ``reuse_actors=True``.
``--repeats N`` runs every (script, way) N times, alternating the order of the
ways from one repeat to the next, and the tables give medians.

Measured per run: ``Tuner.fit()`` wall time (the port's includes starting its
hosts), the best trial by the script's metric at its last report (the tutorial's
``get_best_result(metric, mode, "last")``), trials and trial-iterations (ASHA
stops a different set of trials from run to run, so time per trial-iteration
separates speed from the amount of work), trial processes, how busy the whole
machine was, and for the port what ``trainable.host_stats()`` says: stacks,
mean slots per fused step, fused steps per host, busy fraction. Then the
ratios plain / ported. A trial's model starts from the same weights both ways
(``torch.manual_seed(config["seed"])``, then the model, as a slot host builds
it), but its batches come in another order (the ``DataLoader``'s shuffle
against the slot's own seeded sampler), and ASHA and PBT decide on results as
they arrive: the best metrics agree in distribution, not digit for digit. ::

    python benchmarks/ported_sweeps.py                          # all three scripts, both ways, once
    python benchmarks/ported_sweeps.py --quick                  # tiny: 4 trials each, 2 epochs (checks it runs)
    python benchmarks/ported_sweeps.py --scripts cifar --repeats 3
    python benchmarks/ported_sweeps.py --scripts cifar,lstm --ways ported --slots-per-host 8
    python benchmarks/ported_sweeps.py --cpu-hosts-per-node 2      # two hosts per node from the start

The ports keep the library's defaults (``cpu_hosts_per_node="auto"``: a
second host on a CPU node once the first finds its steps kernel-bound)
unless the command line sets an option.

Writes the markdown it prints to ``benchmarks/ported_sweeps_latest.md``.
"""

from __future__ import annotations

import argparse
import os
import pickle
import platform
import random
import shlex
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import ray
import torch
import torch.nn.functional as F
from ray import tune
from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining
from ray.tune.search.basic_variant import BasicVariantGenerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, random_split

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from tune_sweep import cpu_model, node_cpu_s, wait_for_ray_exit  # noqa: E402

import ray_modelbatch as rmb  # noqa: E402
from ray_modelbatch.tune import batched_trainable  # noqa: E402

SCRIPTS = ("cifar", "lstm", "pbt")
WAYS = ("plain", "ported")
VAL_ROWS = 360  # of the 1,797 digits; the rest train
SPLIT_SEED = 42
LSTM_BATCH = 64
PBT_BATCH = 32
PBT_HIDDEN = 64


# ===================================================================== the data
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits: 8x8 images with intensities 0-16 (float) and their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.images, dtype=torch.float32), torch.tensor(d.target, dtype=torch.long)


def split(dataset: TensorDataset) -> tuple[Any, Any]:
    """A fixed train/validation split, as the tutorial's ``random_split`` of its training set."""
    n = len(dataset)
    return tuple(random_split(dataset, [n - VAL_ROWS, VAL_ROWS], generator=torch.Generator().manual_seed(SPLIT_SEED)))


def load_cifar_data() -> tuple[Any, Any]:
    """The CIFAR tutorial's stand-in: digits as 1x32x32 images (bilinear upsampling), normalized to [-1, 1]."""
    x, y = digits()
    x = F.interpolate(x.unsqueeze(1) / 16.0, size=(32, 32), mode="bilinear", align_corners=False)
    return split(TensorDataset((x - 0.5) / 0.5, y))


def load_lstm_data() -> tuple[Any, Any]:
    """Each digit's 64 pixel intensities, row by row, as a sequence of tokens 0-16."""
    x, y = digits()
    return split(TensorDataset(x.flatten(1).long(), y))


def load_pbt_data() -> tuple[Any, Any]:
    """Regression: the bottom four rows of a digit (32 values in [0, 1]) from its top four rows."""
    x, _ = digits()
    x = x / 16.0
    return split(TensorDataset(x[:, :4].flatten(1), x[:, 4:].flatten(1)))


# =================================================================== the models
class Net(nn.Module):
    """Ray Tune's CIFAR-10 tutorial ConvNet, with one input channel (grayscale digits)."""

    def __init__(self, l1: int = 120, l2: int = 84):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, l1)
        self.fc2 = nn.Linear(l1, l2)
        self.fc3 = nn.Linear(l2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class LSTMClassifier(nn.Module):
    """Embedding -> one-layer LSTM -> dropout on the last hidden state -> linear."""

    def __init__(self, hidden: int, dropout: float, vocab: int = 17, embed: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(hidden, 10)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        _, (h, _) = self.lstm(self.embed(tokens))
        return self.fc(self.dropout(h[-1]))


def mlp_regressor(hidden: int = PBT_HIDDEN) -> nn.Module:
    return nn.Sequential(nn.Linear(32, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 32))


# ======================================================= the plain Tune scripts
def validate_classifier(net: nn.Module, valset: Any, batch_size: int) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over the validation set (the tutorial's loop, weighted by rows)."""
    net.eval()
    loss_sum, correct, total = 0.0, 0, 0
    with torch.no_grad():
        for inputs, labels in DataLoader(valset, batch_size=batch_size):
            outputs = net(inputs)
            loss_sum += F.cross_entropy(outputs, labels, reduction="sum").item()
            correct += (outputs.argmax(1) == labels).sum().item()
            total += labels.size(0)
    net.train()
    return loss_sum / total, correct / total


def train_cifar(config: dict, max_epochs: int = 10) -> None:
    """Ray Tune's CIFAR tutorial ``train_cifar``, on the digits (one Tune iteration per epoch)."""
    torch.manual_seed(config["seed"])
    net = Net(config["l1"], config["l2"])
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(net.parameters(), lr=config["lr"], momentum=0.9)

    start_epoch = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as checkpoint_dir:
            with open(Path(checkpoint_dir) / "data.pkl", "rb") as fp:
                checkpoint_state = pickle.load(fp)
        start_epoch = checkpoint_state["epoch"] + 1
        net.load_state_dict(checkpoint_state["net_state_dict"])
        optimizer.load_state_dict(checkpoint_state["optimizer_state_dict"])

    trainset, valset = load_cifar_data()
    trainloader = DataLoader(trainset, batch_size=int(config["batch_size"]), shuffle=True)
    for epoch in range(start_epoch, max_epochs):
        for inputs, labels in trainloader:
            optimizer.zero_grad()
            loss = criterion(net(inputs), labels)
            loss.backward()
            optimizer.step()
        val_loss, accuracy = validate_classifier(net, valset, int(config["batch_size"]))
        checkpoint_data = {"epoch": epoch, "net_state_dict": net.state_dict(),
                           "optimizer_state_dict": optimizer.state_dict()}
        with tempfile.TemporaryDirectory() as checkpoint_dir:
            with open(Path(checkpoint_dir) / "data.pkl", "wb") as fp:
                pickle.dump(checkpoint_data, fp)
            tune.report({"loss": val_loss, "accuracy": accuracy},
                        checkpoint=tune.Checkpoint.from_directory(checkpoint_dir))


def train_lstm(config: dict, max_epochs: int = 8) -> None:
    """A sequence classifier's function trainable: Adam, a DataLoader, one report per epoch."""
    torch.manual_seed(config["seed"])
    model = LSTMClassifier(config["hidden"], config["dropout"])
    optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    trainset, valset = load_lstm_data()
    loader = DataLoader(trainset, batch_size=LSTM_BATCH, shuffle=True)
    for _ in range(max_epochs):
        model.train()
        for tokens, labels in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(tokens), labels).backward()
            optimizer.step()
        val_loss, val_acc = validate_classifier(model, valset, len(valset))
        tune.report({"val_loss": val_loss, "val_acc": val_acc})


def train_pbt(config: dict, max_epochs: int = 20, checkpoint_interval: int = 4) -> None:
    """As Ray's PBT guide writes it: resume from ``tune.get_checkpoint()``, a checkpoint every interval."""
    torch.manual_seed(config["seed"])
    model = mlp_regressor()
    optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=config["momentum"])
    start_epoch = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as checkpoint_dir:
            state = torch.load(os.path.join(checkpoint_dir, "checkpoint.pt"))
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:  # PBT's new hyperparameters, not the donor's
            group["lr"], group["momentum"] = config["lr"], config["momentum"]
        start_epoch = state["epoch"]
    trainset, valset = load_pbt_data()
    loader = DataLoader(trainset, batch_size=PBT_BATCH, shuffle=True)
    x_val, y_val = valset[:]
    for epoch in range(start_epoch, max_epochs):
        model.train()
        for x, y in loader:
            optimizer.zero_grad()
            F.mse_loss(model(x), y).backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            metrics = {"val_mse": F.mse_loss(model(x_val), y_val).item()}
        if (epoch + 1) % checkpoint_interval == 0:
            with tempfile.TemporaryDirectory() as checkpoint_dir:
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1},
                           os.path.join(checkpoint_dir, "checkpoint.pt"))
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir))
        else:
            tune.report(metrics)


# ===================================================== the same scripts, ported
def cifar_eval(model: nn.Module, batch: tuple, config: dict) -> dict:
    """The tutorial's validation, for one model: ``loss`` and ``accuracy`` under its own names."""
    x, y = batch
    out = model(x)
    return {"loss": F.cross_entropy(out, y), "accuracy": (out.argmax(1) == y).float().mean()}


def pbt_eval(model: nn.Module, batch: tuple, config: dict) -> dict:
    x, y = batch
    return {"val_mse": F.mse_loss(model(x), y)}


def ported_cifar(**options: Any) -> type:
    return batched_trainable(
        model=lambda c: Net(c["l1"], c["l2"]),
        optimizer=rmb.optim.SGD,
        hparams=lambda c: {"lr": c["lr"], "momentum": 0.9},
        data=load_cifar_data,
        loss=F.cross_entropy,
        eval_step=cifar_eval,
        batch_size=lambda c: c["batch_size"],
        steps_per_report="epoch",
        **options,
    )


def ported_lstm(**options: Any) -> type:
    return batched_trainable(
        model=lambda c: LSTMClassifier(c["hidden"], c["dropout"]),
        optimizer=rmb.optim.Adam,
        hparams=lambda c: {"lr": c["lr"], "weight_decay": c["weight_decay"]},
        data=load_lstm_data,
        loss=F.cross_entropy,
        metrics={"acc": rmb.metrics.accuracy},  # reported as val_loss and val_acc, the plain script's names
        batch_size=LSTM_BATCH,
        steps_per_report="epoch",
        **options,
    )


def ported_pbt(**options: Any) -> type:
    return batched_trainable(
        model=lambda c: mlp_regressor(),
        optimizer=rmb.optim.SGD,
        hparams=lambda c: {"lr": c["lr"], "momentum": c["momentum"]},
        data=load_pbt_data,
        loss=F.mse_loss,
        eval_step=pbt_eval,
        batch_size=PBT_BATCH,
        steps_per_report="epoch",
        **options,
    )


# ============================================== after fit(): the best model back
def reload_cifar(way: str, trainable: Any, result: Any) -> float:
    """The tutorial's last step: the best trial's model from its checkpoint, scored on the validation set."""
    if way == "plain":
        net = Net(result.config["l1"], result.config["l2"])
        with result.checkpoint.as_directory() as d, open(Path(d) / "data.pkl", "rb") as fp:
            net.load_state_dict(pickle.load(fp)["net_state_dict"])
    else:
        net = trainable.load_model(result.checkpoint)
    return validate_classifier(net, load_cifar_data()[1], VAL_ROWS)[1]


def reload_pbt(way: str, trainable: Any, result: Any) -> float:
    if way == "plain":
        model = mlp_regressor()
        with result.checkpoint.as_directory() as d:
            model.load_state_dict(torch.load(os.path.join(d, "checkpoint.pt"))["model"])
    else:
        model = trainable.load_model(result.checkpoint)
    x, y = load_pbt_data()[1][:]
    with torch.no_grad():
        return F.mse_loss(model.eval()(x), y).item()


# ============================================================ the three sweeps
@dataclass
class Script:
    """One script's settings, shared by both ways of running it."""

    name: str
    what: str  # one line for the report
    metric: str
    mode: str
    extra: str | None  # a second metric to show beside the best (accuracy)
    trials: int
    max_t: int  # epochs (Tune iterations) at most
    grace: int = 1  # ASHA
    interval: int = 0  # PBT perturbation (and checkpoint) interval; 0 = ASHA
    space: dict = field(default_factory=dict)
    plain: Callable | None = None
    ported: Callable | None = None
    checkpoint_every: int = 0  # epochs between checkpoints the plain script keeps (0: none)
    reload: Callable | None = None
    reload_name: str = ""

    def scheduler(self) -> Any:
        if self.interval:
            return PopulationBasedTraining(
                time_attr="training_iteration", perturbation_interval=self.interval,
                hyperparam_mutations={"lr": tune.loguniform(1e-3, 1e-1), "momentum": tune.uniform(0.5, 0.99)})
        return ASHAScheduler(time_attr="training_iteration", max_t=self.max_t, grace_period=self.grace,
                             reduction_factor=2)

    def plain_trainable(self) -> Any:
        params = {"max_epochs": self.max_t}
        if self.interval:
            params["checkpoint_interval"] = self.checkpoint_every
        return tune.with_resources(tune.with_parameters(self.plain, **params), {"cpu": 1})


def scripts(quick: bool) -> dict[str, Script]:
    seed = tune.randint(0, 2**31 - 1)  # each trial's initial weights (both ways alike) and batch order
    cifar = Script(
        name="cifar", metric="loss", mode="min", extra="accuracy",
        what="Tune's CIFAR tutorial CNN on digits upsampled to 32x32; l1, l2 in {8,16,32,64}, lr log-uniform "
             "1e-4..1e-1, batch_size in {8,16,32}; SGD momentum 0.9; ASHA on loss, reduction 2; a checkpoint "
             "every epoch",
        trials=4 if quick else 20, max_t=2 if quick else 10, grace=1,
        space={"l1": tune.choice([8, 16, 32, 64]), "l2": tune.choice([8, 16, 32, 64]),
               "lr": tune.loguniform(1e-4, 1e-1), "batch_size": tune.choice([8, 16, 32]), "seed": seed},
        plain=train_cifar, ported=ported_cifar, checkpoint_every=1,
        reload=reload_cifar, reload_name="accuracy",
    )
    lstm = Script(
        name="lstm", metric="val_loss", mode="min", extra="val_acc",
        what=f"Embedding(17,16) + LSTM(hidden 32 or 64) over 64 pixel tokens, dropout uniform 0..0.5, Adam lr "
             f"log-uniform 1e-3..1e-2, weight_decay log-uniform 1e-6..1e-3, batch {LSTM_BATCH}; ASHA on val_loss, "
             "reduction 2; no checkpoints",
        trials=4 if quick else 16, max_t=2 if quick else 8, grace=1,
        space={"hidden": tune.choice([32, 64]), "dropout": tune.uniform(0.0, 0.5),
               "lr": tune.loguniform(1e-3, 1e-2), "weight_decay": tune.loguniform(1e-6, 1e-3), "seed": seed},
        plain=train_lstm, ported=ported_lstm,
    )
    interval = 1 if quick else 4
    pbt = Script(
        name="pbt", metric="val_mse", mode="min", extra=None,
        what=f"MLP 32-{PBT_HIDDEN}-{PBT_HIDDEN}-32 regressing a digit's bottom half from its top half (MSE), SGD, "
             f"batch {PBT_BATCH}; PBT every {interval} epochs mutating lr (log-uniform 1e-3..1e-1) and momentum "
             f"(uniform 0.5..0.99); a checkpoint every {interval} epochs",
        trials=4 if quick else 8, max_t=2 if quick else 20, interval=interval,
        space={"lr": tune.loguniform(1e-3, 1e-1), "momentum": tune.uniform(0.5, 0.99), "seed": seed},
        plain=train_pbt, ported=ported_pbt, checkpoint_every=interval,
        reload=reload_pbt, reload_name="val_mse",
    )
    return {s.name: s for s in (cifar, lstm, pbt)}


def ported_options(script: Script, args: argparse.Namespace) -> dict:
    """The ``batched_trainable`` options of the port: the library's defaults, except what the command line sets."""
    options: dict = {}
    if args.cpu_hosts_per_node is not None:  # "auto" is the library's default
        options["cpu_hosts_per_node"] = args.cpu_hosts_per_node
    for key in ("slots_per_host", "run_ahead", "host_threads", "move_slots"):
        value = getattr(args, key)
        if value is not None:
            options[key] = value
    return options


# ==================================================================== one run
class Watch(tune.Callback):
    """Each trial's config as the searcher drew it (before PBT mutates it), when the first result came, and
    when each result came with its value of ``metric`` (for the time to a given value)."""

    def __init__(self, keys: Any, metric: str) -> None:
        self.keys, self.configs, self.t0, self.first_result = set(keys), {}, time.monotonic(), None
        self.metric, self.curve = metric, []

    def setup(self, **info: Any) -> None:
        self.t0 = time.monotonic()

    def on_trial_add(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        drawn = tuple(sorted((k, v) for k, v in trial.config.items() if k in self.keys))
        self.configs.setdefault(trial.trial_id, drawn)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if self.first_result is None:
            self.first_result = time.monotonic() - self.t0
        if isinstance(result.get(self.metric), (int, float)):
            self.curve.append((time.monotonic() - self.t0, float(result[self.metric])))


def time_to(curve: list[tuple[float, float]], target: float | None, mode: str) -> float | None:
    """Seconds into ``fit()`` of the first result at least as good as ``target`` (None: never, or no target)."""
    if target is None:
        return None
    better = (lambda v: v <= target) if mode == "min" else (lambda v: v >= target)
    return next((t for t, v in curve if better(v)), None)


def run_once(script: Script, way: str, args: argparse.Namespace, storage: str, repeat: int) -> dict:
    """One ``Tuner.fit()`` of ``script`` run ``way``, on a fresh local Ray."""
    ray.init(num_cpus=args.num_cpus or os.cpu_count() or 2, include_dashboard=False, logging_level="WARNING")
    trainable, hosts, options = None, [], {}
    try:
        random.seed(args.seed)  # PBT's explore draws from Python's random
        np.random.seed(args.seed)
        checkpoints = tune.CheckpointConfig()
        stop = None
        if way == "plain":
            trainable = script.plain_trainable()
            search = BasicVariantGenerator(random_state=args.seed)
        else:
            options = ported_options(script, args)
            trainable = script.ported(**options)
            # An explicit generator ignores TuneConfig(max_concurrent_trials=...): the slot cap goes to it.
            search = BasicVariantGenerator(random_state=args.seed, max_concurrent=trainable.max_concurrent())
            stop = {"training_iteration": script.max_t}  # porting.md (6): the epoch loop's range
            if script.checkpoint_every:  # porting.md (9): tune.report(checkpoint=...) becomes a CheckpointConfig
                checkpoints = tune.CheckpointConfig(checkpoint_frequency=script.checkpoint_every)
        watch = Watch(script.space, script.metric)
        tuner = tune.Tuner(
            trainable,
            param_space=script.space,
            tune_config=tune.TuneConfig(metric=script.metric, mode=script.mode, num_samples=script.trials,
                                        search_alg=search, scheduler=script.scheduler(), reuse_actors=True),
            run_config=tune.RunConfig(name=f"{script.name}_{way}_{repeat}", storage_path=storage, stop=stop,
                                      checkpoint_config=checkpoints, verbose=0, callbacks=[watch]),
        )
        node0, t0, t0_wall = node_cpu_s(), time.monotonic(), time.time()
        try:
            results = tuner.fit()
            wall = time.monotonic() - t0
            node1 = node_cpu_s()
            if way == "ported":
                hosts = trainable.host_stats()  # before the hosts stop
        finally:
            if way == "ported":
                trainable.shutdown_hosts()
    finally:
        ray.shutdown()
        wait_for_ray_exit()

    frames = [r.metrics_dataframe for r in results if r.metrics_dataframe is not None and len(r.metrics_dataframe)]
    errors = [r.error for r in results if r.error is not None]
    out = {
        "script": script.name, "way": way, "repeat": repeat, "wall_s": wall, "trials": len(results),
        "errors": len(errors), "first_error": str(errors[0]).strip().splitlines()[-1][:300] if errors else None,
        "iterations": sum(len(df) for df in frames),
        "processes": len(set().union(*(set(df["pid"]) for df in frames))) if frames else 0,
        "configs": sorted(watch.configs.values()),  # as drawn, in both ways: the same trials?
        "first_result_s": watch.first_result,
        "curve": watch.curve,
        "node_busy": None if node0 is None or node1 is None else (node1 - node0) / ((os.cpu_count() or 1) * wall),
        "options": options, "best": None, "best_extra": None, "reloaded": None, "reported": None,
        # stacks that trained these trials: (host, stack key) pairs, since two hosts may hold stacks of one key
        "stacks": len({hs for df in frames if "stack" in df and "host" in df for hs in zip(df["host"], df["stack"])}),
        "exploits": pbt_exploits(results.experiment_path) if script.interval else None,
        "hosts": [host_summary(h, t0_wall) for h in hosts],
    }
    try:
        best = results.get_best_result(script.metric, script.mode, "last")
        out["best"] = float(best.metrics[script.metric])
        out["best_extra"] = float(best.metrics[script.extra]) if script.extra else None
        if script.reload is not None and best.checkpoint is not None:
            out["reported"] = float(best.metrics[script.reload_name])
            out["reloaded"] = script.reload(way, trainable, best)
    except Exception as e:  # noqa: BLE001 - a run without results still reports its time and errors
        out["first_error"] = out["first_error"] or f"{type(e).__name__}: {e}"
        traceback.print_exc()
    return out


def pbt_exploits(experiment_path: str) -> int:
    """How many times PBT copied a donor into a recipient (lines of its ``pbt_global.txt`` log)."""
    path = Path(experiment_path) / "pbt_global.txt"
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.exists() else 0


def host_summary(h: dict, t0_wall: float) -> dict:
    """What the report shows of one host's ``host_stats()`` entry."""
    fused = h.get("fused_steps", 0)
    return {
        "host": h.get("host"), "fused_steps": fused, "slot_steps": h.get("slot_steps", 0),
        "slots_per_step": h.get("slot_steps", 0) / fused if fused else 0.0,
        "busy": h.get("busy_fraction", 0.0), "wall_s": h.get("wall_s", 0.0), "stacks": len(h.get("stacks", {})),
        "threads": h.get("threads"), "step_cpu_ms": h.get("step_cpu_ms"), "kernel_bound": h.get("kernel_bound"),
        "rnn_kernels": h.get("rnn_kernels") or {},
        "max_held": h.get("max_held"), "data_source": h.get("data_source"),
        "moved_out": h.get("moved_out", 0), "moved_in": h.get("moved_in", 0), "regrouped": h.get("regrouped", 0),
        "forward": sorted({str(s.get("forward")) for s in h.get("stacks", {}).values()}),
        # seconds after fit() began: the host's constructor, ready, its first trial, its first result
        "milestones": {k: v - t0_wall for k, v in h.get("milestones", {}).items() if v is not None},
    }


# ===================================================================== report
def med(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def spread(values: list, spec: str = ".1f") -> str:
    """``median (a, b, c)`` of the runs, or the one value."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return format(values[0], spec)
    return f"{format(statistics.median(values), spec)} ({', '.join(format(v, spec) for v in values)})"


def report(args: argparse.Namespace, all_scripts: dict[str, Script], runs: list[dict], t_start: float) -> str:
    cmd = "python " + shlex.join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    names = [s for s in args.scripts if any(r["script"] == s for r in runs)]
    lines = [
        "# Tune scripts as practitioners write them: plain Ray Tune vs ported to ray_modelbatch",
        "",
        f"- command: `{cmd}`",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores (shared: timings are noisy; load average "
        f"{os.getloadavg()[0]:.1f} at the end); a fresh local Ray with {args.num_cpus or os.cpu_count()} CPUs per run",
        f"- torch {torch.__version__}, ray {ray.__version__}, Python {platform.python_version()}",
        f"- {args.repeats} repeat(s) of every (script, way), the ways' order alternating between repeats; "
        "figures are medians, with each run's value in parentheses",
        "- plain: function trainable, `torch.optim`, `DataLoader`, `tune.report`; `tune.with_resources(fn, "
        "{'cpu': 1})`, `reuse_actors=True`. ported: `batched_trainable` as `docs/porting.md` says, "
        "`reuse_actors=True`, the slot cap on the `BasicVariantGenerator`",
        "- wall = `Tuner.fit()`; best = the script's metric at the best trial's last report "
        "(`get_best_result(metric, mode, 'last')`); iterations = trial-iterations (epochs) reported over all "
        "trials; machine busy = `/proc/stat` CPU time of every process during `fit()` over cores x wall; time to "
        "plain's best = seconds into `fit()` of the first result as good as the plain runs' median best (ASHA "
        "lets the same trials run more or fewer epochs depending on the order results arrive, so fit times "
        "compare unequal work; this compares the time to one result)",
        "",
    ]
    for name in names:
        s = all_scripts[name]
        sched = (f"PBT every {s.interval}, {s.max_t} epochs" if s.interval else
                 f"ASHA max_t {s.max_t}, grace {s.grace}")
        lines.append(f"- `{name}`: {s.trials} trials, {sched}, BasicVariantGenerator(random_state={args.seed}). "
                     f"{s.what}")
    lines += [
        "",
        "| script | way | fit s | first result s | iterations | s per iteration | best | trials (errors) "
        "| trial processes "
        "| stacks | hosts stepping / started | slots per fused step | fused steps per host | host busy "
        "| machine busy |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in names:
        s = all_scripts[name]
        for way in WAYS:
            rs = [r for r in runs if r["script"] == name and r["way"] == way]
            if not rs:
                continue
            best = spread([r["best"] for r in rs], ".4f")
            if s.extra and any(r["best_extra"] is not None for r in rs):
                best += f" ({s.extra} {fmt(med([r['best_extra'] for r in rs]), '.3f')})"
            ported = way == "ported"
            stepping = [sum(1 for h in r["hosts"] if h["fused_steps"]) for r in rs]
            started = [len(r["hosts"]) for r in rs]
            per_host = lambda key, f: " / ".join(  # noqa: E731 - medians per host index over the runs
                fmt(med([r["hosts"][i][key] for r in rs if len(r["hosts"]) > i]), f)
                for i in range(max(started, default=0)))
            lines.append(
                f"| {name} | {way} | {spread([r['wall_s'] for r in rs])} | "
                f"{fmt(med([r['first_result_s'] for r in rs]))} | {spread([r['iterations'] for r in rs], '.0f')} | "
                f"{fmt(med([r['wall_s'] / max(r['iterations'], 1) for r in rs]), '.3f')} | {best} | "
                f"{fmt(med([r['trials'] for r in rs]), '.0f')} ({sum(r['errors'] for r in rs)}) | "
                f"{fmt(med([r['processes'] for r in rs]), '.0f')} | "
                + (f"{fmt(med([r['stacks'] for r in rs]), '.0f')} | {fmt(med(stepping), '.0f')} / "
                   f"{fmt(med(started), '.0f')} | {per_host('slots_per_step', '.2f')} | "
                   f"{per_host('fused_steps', '.0f')} | {per_host('busy', '.0%')} | " if ported
                   else "- | - | - | - | - | ")
                + f"{fmt(med([r['node_busy'] for r in rs]), '.0%')} |")
    lines += ["", "Plain / ported (above 1: the port is faster; medians of each way's runs):", ""]
    lines += ["| script | fit time | time per iteration | time to plain's best | best, plain / ported | same configs |",
              "| --- | ---: | ---: | ---: | --- | --- |"]
    for name in names:
        plain = [r for r in runs if r["script"] == name and r["way"] == "plain"]
        port = [r for r in runs if r["script"] == name and r["way"] == "ported"]
        if not plain or not port:
            continue
        wall = med([r["wall_s"] for r in plain]) / med([r["wall_s"] for r in port])
        per = (med([r["wall_s"] / max(r["iterations"], 1) for r in plain])
               / med([r["wall_s"] / max(r["iterations"], 1) for r in port]))
        same = all(r["configs"] == plain[0]["configs"] for r in plain + port)
        target = med([r["best"] for r in plain])
        reach = [[time_to(r["curve"], target, all_scripts[name].mode) for r in rs] for rs in (plain, port)]
        plain_s, port_s = med(reach[0]), med(reach[1])
        if plain_s is not None and port_s and all(t is not None for t in reach[1]):
            to_best = f"{plain_s / port_s:.2f}x ({fmt(plain_s)} / {fmt(port_s)} s)"
        else:
            to_best = f"not reached in {sum(t is None for t in reach[1])} of {len(port)} ported runs"
        lines.append(f"| {name} | {wall:.2f}x | {per:.2f}x | {to_best} | {fmt(target, '.4f')} / "
                     f"{fmt(med([r['best'] for r in port]), '.4f')} | {'yes' if same else 'NO'} |")
    lines += ["", "Each run:", ""]
    for r in runs:
        s = all_scripts[r["script"]]
        line = (f"- `{r['script']}` {r['way']} (repeat {r['repeat'] + 1}): fit {r['wall_s']:.1f} s, "
                f"{r['iterations']} iterations of {r['trials']} trials, first result at "
                f"{fmt(r['first_result_s'])} s, best {s.metric} {fmt(r['best'], '.4f')}")
        if r.get("exploits") is not None:
            line += f", {r['exploits']} PBT exploits"
        if r["reloaded"] is not None:
            line += (f"; the best trial's checkpoint loaded back: {s.reload_name} {r['reloaded']:.4f} "
                     f"(reported {r['reported']:.4f})")
        if r["way"] == "ported":
            line += f"; options {r['options'] or '{}'}"
            for h in r["hosts"]:
                line += (f"; host {h['host']}: {h['stacks']} stacks, {h['fused_steps']} fused steps, "
                         f"{h['slots_per_step']:.2f} slots per step, at most {h['max_held']} held, "
                         f"{h['moved_out']} moved out and {h['moved_in']} in, {h['regrouped']} into a newer stack, busy "
                         f"{h['busy']:.0%} of {h['wall_s']:.1f} s, {h['threads']} threads, step CPU median "
                         f"{fmt(h['step_cpu_ms'])} ms, forward {', '.join(h['forward']) or '-'}"
                         + "".join(f", {k}: {v}" for k, v in h["rnn_kernels"].items()) + ", data() in "
                         f"{h['data_source']}; s after fit(): " + ", ".join(
                             f"{k.replace('_', ' ')} {v:.1f}" for k, v in h["milestones"].items()))
        if r["errors"] or r["first_error"]:
            line += f"; {r['errors']} errored trials: `{r['first_error']}`"
        lines.append(line)
    lines += ["", f"Run time: {time.monotonic() - t_start:.0f} s"]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scripts", default=",".join(SCRIPTS), help=f"comma-separated, from {', '.join(SCRIPTS)}")
    p.add_argument("--ways", default=",".join(WAYS), help="comma-separated: plain, ported")
    p.add_argument("--repeats", type=int, default=1, help="runs of every (script, way); the tables give medians")
    p.add_argument("--quick", action="store_true", help="4 trials per script, 2 epochs: checks that it runs")
    p.add_argument("--seed", type=int, default=0, help="random_state of every BasicVariantGenerator")
    p.add_argument("--slots-per-host", type=lambda v: v if v == "auto" else int(v), default=None,
                   help="batched_trainable(slots_per_host=...) of the ports (default: the library's, 32)")
    p.add_argument("--cpu-hosts-per-node", type=lambda v: v if v == "auto" else int(v), default=None,
                   help="batched_trainable(cpu_hosts_per_node=...) of the ports (default: the library's, 'auto')")
    p.add_argument("--run-ahead", type=int, default=None, help="batched_trainable(run_ahead=...) of the ports")
    p.add_argument("--host-threads", type=int, default=None, help="batched_trainable(host_threads=...) of the ports")
    p.add_argument("--move-slots", type=int, choices=(0, 1), default=None,
                   help="batched_trainable(move_slots=...) of the ports (default: the library's, on)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of each local Ray (default: os.cpu_count())")
    p.add_argument("--storage", default=None, help="Tune storage_path (default: a temporary directory)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "ported_sweeps_latest.md"))
    args = p.parse_args()
    args.scripts = [s for s in args.scripts.split(",") if s]
    ways = [w for w in args.ways.split(",") if w]
    unknown = (set(args.scripts) - set(SCRIPTS)) | (set(ways) - set(WAYS))
    if unknown:
        raise SystemExit(f"unknown scripts or ways {sorted(unknown)}; scripts: {', '.join(SCRIPTS)}; ways: "
                         f"{', '.join(WAYS)}")
    all_scripts = scripts(args.quick)
    t_start = time.monotonic()
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="ported_sweeps_") as tmp:
        storage = os.path.abspath(args.storage) if args.storage else tmp
        for repeat in range(args.repeats):
            order = ways if repeat % 2 == 0 else ways[::-1]
            for name in args.scripts:
                for way in order:
                    print(f"running {name} {way} (repeat {repeat + 1}/{args.repeats}) ... "
                          f"({time.strftime('%H:%M:%S')})", flush=True)
                    run = run_once(all_scripts[name], way, args, storage, repeat)
                    runs.append(run)
                    print(f"  {name} {way}: fit {run['wall_s']:.1f} s, {run['iterations']} iterations, best "
                          f"{fmt(run['best'], '.4f')}, {run['errors']} errors", flush=True)
                    Path(args.out).write_text(report(args, all_scripts, runs, t_start))
    text = report(args, all_scripts, runs, t_start)
    print()
    print(text)
    Path(args.out).write_text(text)
    if any(r["errors"] or r["best"] is None for r in runs):
        raise SystemExit("some trials errored or a run had no result: see the report")


if __name__ == "__main__":
    main()
