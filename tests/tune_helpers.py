"""Shared pieces of the Tune end-to-end tests: digits data, a 64-32-10 MLP, a trainable factory.

Everything here is pickled *by value* (see ``register_pickle_by_value`` below):
the slot hosts and trial processes Ray starts cannot import this test module.
"""

from __future__ import annotations

import glob
import io
import os
import sys
import time

import pytest
import ray
from ray import cloudpickle, tune

cloudpickle.register_pickle_by_value(sys.modules[__name__])

IN, HIDDEN, OUT = 64, 32, 10

K = 5  # fused steps per Tune iteration (steps_per_report) in the Tune tests


def digits():
    """Digits scaled to [0, 1]; 1437 train / 360 validation rows, fixed split."""
    import torch
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    val, train = perm[:360], perm[360:]
    return x[train], y[train], x[val], y[val]


def _labels(columns):
    return columns["label"]  # the typo under test: the column is "target"


def digits_with_a_typo():
    """data() that raises a KeyError from a helper of its own, as a user's loader would."""
    return _labels({"target": None})


def digits_train_only():
    """A wrong data(): two items instead of four (issue 12)."""
    return digits()[:2]


def make_model(cfg):
    """64-32-10 MLP; ``cfg["hidden"]`` (or ``cfg["arch"]["hidden"]``), ``cfg["d_in"]`` and ``cfg["d_out"]``
    change the shape, ``cfg["dropout"]`` adds dropout after the hidden layer, ``cfg["unfusable"]`` calls
    ``.item()`` in forward (``"none"``: the factory returns None)."""
    import torch
    from torch import nn

    if cfg.get("unfusable") == "none":
        return None

    hidden = int(cfg["arch"]["hidden"]) if "arch" in cfg else int(cfg.get("hidden", HIDDEN))
    d_in, d_out = int(cfg.get("d_in", IN)), int(cfg.get("d_out", OUT))
    if cfg.get("unfusable"):

        class ItemMLP(nn.Module):
            def __init__(self):
                super().__init__()
                self.l1 = nn.Linear(IN, hidden)
                self.l2 = nn.Linear(hidden, OUT)

            def forward(self, x):
                h = torch.relu(self.l1(x))
                scale = float(h.mean().item())  # breaks vmap: data-dependent Python number
                return self.l2(h) * (1.0 + 0.0 * scale)

        return ItemMLP()
    if cfg.get("fail_after"):

        class FailingMLP(nn.Sequential):
            """Fuses fine, but its stack's forward raises after ``fail_after`` calls (a trial that
            errors while running; the attribute gives it a stack of its own)."""

            def __init__(self, fail_after):
                super().__init__(nn.Linear(IN, hidden), nn.ReLU(), nn.Linear(hidden, OUT))
                self.fail_after = int(fail_after)
                self.calls = 0

            def forward(self, x):
                self.calls += 1
                if self.calls > self.fail_after:
                    raise RuntimeError("planned failure of this trial's model")
                return super().forward(x)

        return FailingMLP(cfg["fail_after"])
    drop = [nn.Dropout(float(cfg["dropout"]))] if cfg.get("dropout") else []  # masks from the slot's generator
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), *drop, nn.Linear(hidden, d_out))


def hparams(cfg):
    return {"lr": float(cfg["lr"])}


def regularized_step(model, batch, config):
    """A user's training step: cross-entropy plus ``config["l2"]`` times the squared weights."""
    import torch.nn.functional as F

    x, y = batch
    out = model(x)
    penalty = sum(p.pow(2).sum() for p in model.parameters())
    return {"loss": F.cross_entropy(out, y) + config["l2"] * penalty, "penalty": penalty}


def slow_step(model, batch, config):
    """A training step that also sleeps 10 ms: long enough fused steps for a test of what happens meanwhile."""
    import time

    import torch.nn.functional as F

    time.sleep(0.01)
    x, y = batch
    return F.cross_entropy(model(x), y)


def accuracy_step(model, batch, config):
    """A user's eval step, reported under its own names."""
    import torch.nn.functional as F

    x, y = batch
    out = model(x)
    return {"accuracy": (out.argmax(-1) == y).float().mean(), "nll": F.cross_entropy(out, y)}


def chosen_optimizer(config):
    """The optimizer family searched by the config: ``config["opt"]`` is "adam" or "sgd"."""
    import functools

    import ray_modelbatch

    return {"adam": ray_modelbatch.optim.Adam, "rmsprop": ray_modelbatch.optim.RMSprop,
            "sgd": functools.partial(ray_modelbatch.optim.SGD, momentum=0.9)}[config["opt"]]


class DigitsDataset:
    """The digits training rows as a map-style dataset (``__len__``/``__getitem__``), as a user's pipeline gives them."""

    def __init__(self):
        self.x, self.y, _, _ = digits()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def jitter(sample, generator):
    """A per-example augmentation drawn from the trial's own generator: a little pixel noise."""
    import torch

    x, y = sample
    return x + 0.02 * torch.randn(x.shape, generator=generator), y


def digits_pipeline():
    """data() as a Dataset, a validation pair and a transform: the pipeline form."""
    _, _, xv, yv = digits()
    return {"train": DigitsDataset(), "val": (xv, yv), "transform": jitter}


def make_trainable(*, optimizer: str = "adam", slots_per_host: int = 4, steps_per_report: int = 5,
                   idle_timeout_s: float = 3.0, **kw):
    import torch.nn.functional as F

    import ray_modelbatch
    from ray_modelbatch.tune import batched_trainable

    opt = {"adam": ray_modelbatch.optim.Adam, "sgd": ray_modelbatch.optim.SGD}[optimizer]
    return batched_trainable(
        model=kw.pop("model", make_model),
        optimizer=opt,
        hparams=kw.pop("hparams", hparams),
        loss=kw.pop("loss", F.cross_entropy),
        data=kw.pop("data", digits),
        metrics={"acc": ray_modelbatch.metrics.accuracy},
        batch_size=kw.pop("batch_size", 32),
        steps_per_report=steps_per_report,
        slots_per_host=slots_per_host,
        idle_timeout_s=idle_timeout_s,
        **kw,
    )


def tune_config(T, **kw):
    # A sweep that stops making progress (Tune's PBT has been seen to leave every trial PAUSED)
    # ends as a failed assertion after this budget instead of hanging the suite.
    kw.setdefault("time_budget_s", 240)
    kw.setdefault("metric", "val_loss")
    kw.setdefault("mode", "min")
    if "search_alg" not in kw:
        kw.setdefault("max_concurrent_trials", T.max_concurrent())
    return tune.TuneConfig(**kw)


def run_config(tmp_path, name="exp", **kw):
    kw.setdefault("verbose", 0)
    return tune.RunConfig(name=name, storage_path=str(tmp_path), **kw)


class ResultLog(tune.Callback):
    """Every result as the driver saw it, per trial (``result.json``/``progress.csv`` are not
    reliable after a pause: Tune copies the synced copy back over them when a trial restarts)."""

    def __init__(self):
        self.by_trial: dict[str, list[dict]] = {}
        self.seen_at: dict[str, list[float]] = {}  # when the driver saw each result (time.time(), as host events)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.seen_at.setdefault(trial.trial_id, []).append(time.time())
        row = dict(result)
        # The config the trial ran this iteration with (PBT replaces trial.config before callbacks run).
        row["config"] = dict(result["config"])
        self.by_trial.setdefault(trial.trial_id, []).append(row)

    def rows(self, result) -> list[dict]:
        """The results of one ``ResultGrid`` entry, ordered by iteration."""
        return sorted(self.by_trial[result.metrics["trial_id"]], key=lambda r: r["training_iteration"])


def fit(T, param_space, tmp_path, *, name="exp", run_kw=None, **tune_kw):
    """Run a Tuner; returns ``(ResultGrid, ResultLog)``."""
    log = ResultLog()
    run_kw = dict(run_kw or {})
    run_kw["callbacks"] = [*run_kw.get("callbacks", []), log]
    tuner = tune.Tuner(T, param_space=param_space, tune_config=tune_config(T, **tune_kw),
                       run_config=run_config(tmp_path, name=name, **run_kw))
    return tuner.fit(), log


def errors(grid) -> list:
    return [r.error for r in grid if r.error is not None]


class HostWatch(tune.Callback):
    """Polls the trainable's host stats at every result and keeps the high-water marks."""

    def __init__(self, T):
        self.T = T
        self.samples: list[dict] = []

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.samples.extend(self.T.host_stats())

    @property
    def max_held(self) -> int:
        return max((s["attached"] + s["reserved"] for s in self.samples), default=0)


def load_slot_state(checkpoint_dir: str) -> dict:
    import torch

    with open(os.path.join(checkpoint_dir, "slot_state.pt"), "rb") as f:
        return torch.load(io.BytesIO(f.read()), weights_only=True)


def trial_checkpoints(trial_path: str) -> list[str]:
    return sorted(glob.glob(os.path.join(trial_path, "checkpoint_*")))


def wait_until(pred, timeout=20.0, every=0.2):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(every)
    return pred()


def read_results(trial_path: str) -> list[dict]:
    """The trial's ``result.json`` rows (Tune's JSON logger), ordered by iteration."""
    import json

    with open(os.path.join(trial_path, "result.json")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return sorted(rows, key=lambda r: r["training_iteration"])


def tb_tags(path: str) -> dict[str, list[float]]:
    """Scalar tags and values of every tensorboardX event file under ``path`` (a small TFRecord reader)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list[float]] = {}
    for fn in glob.glob(os.path.join(path, "**", "events.out.tfevents.*"), recursive=True):
        with open(fn, "rb") as f:
            data = f.read()
        pos = 0
        while pos + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            if pos + 12 + n + 4 > len(data):
                break  # a record still being written
            body = data[pos + 12:pos + 12 + n]
            pos += 12 + n + 4
            ev = Event()
            ev.ParseFromString(body)
            for v in ev.summary.value:
                out.setdefault(v.tag, []).append(v.simple_value)
    return out


def probe_class(T, base_dir):
    """``T`` whose trial ID comes from ``config["probe_id"]``, for proxies created outside Tune.

    Without Tune there is no storage context: its log directory (and the host's TensorBoard
    figures) go under ``base_dir`` instead of Trainable's default ``~/ray_results``.
    """
    import tempfile

    class Probe(T):
        _probe_dir = str(base_dir)

        @property
        def trial_id(self):
            return self.config.get("probe_id", "default")

        def _setup_logdir(self):
            if self._storage is not None:
                return super()._setup_logdir()
            os.makedirs(self._probe_dir, exist_ok=True)
            self._logdir = tempfile.mkdtemp(prefix="probe_", dir=self._probe_dir)

        def _experiment_dir(self):
            return self._probe_dir if self._storage is None else super()._experiment_dir()

        def where(self):
            return {"logdir": self.logdir, "pid": os.getpid(), "slot": self._slot, "key": self._token}

    Probe.__name__ = Probe.__qualname__ = T.__name__ + "Probe"
    return Probe


def host_events(T) -> list[dict]:
    return [e for s in T.host_stats() for e in s["events"]]


@pytest.fixture(scope="module")
def ray_session():
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture
def trainables(ray_session):
    """``make(**kw)`` builds a batched trainable; every one built is shut down after the test."""
    made = []

    def make(**kw):
        kw.setdefault("steps_per_report", K)
        kw.setdefault("idle_timeout_s", 10.0)
        T = make_trainable(**kw)
        made.append(T)
        return T

    try:
        yield make
    finally:
        for T in made:
            T.shutdown_hosts()


# The sweep of the survival tests (host crash, driver interrupt): its trials must reach
# SURVIVE_ITERS with the same final metrics as an undisturbed run of the same space.
SURVIVE_ITERS = 6
SURVIVE_TRAINABLE = {"slots_per_host": 4, "num_hosts": 2, "host_cpus": 0.5, "steps_per_report": K,
                     "idle_timeout_s": 5.0}
SURVIVE_SPACE = {"lr": tune.grid_search([0.002 * (i + 1) for i in range(8)]), "seed": 0}


def survive_run_kw() -> dict:
    return {
        "stop": {"training_iteration": SURVIVE_ITERS},
        "checkpoint_config": tune.CheckpointConfig(checkpoint_frequency=1),
        "failure_config": tune.FailureConfig(max_failures=2),
    }


def alive_actors(job_id: str | None = None) -> list[dict]:
    """Actors the GCS knows as alive (no dashboard needed), optionally of one job only."""
    from ray._private import state

    return [a for a in state.actors().values()
            if a["State"] != "DEAD" and (job_id is None or a["JobID"] == job_id)]


def alive_named(prefix: str) -> list[str]:
    return [a["Name"] for a in alive_actors() if (a["Name"] or "").startswith(prefix)]


# The load sweep (tests/test_tune_load.py, benchmarks/load.py): many short ASHA trials through few slots.
LOAD_MAX_T, LOAD_GRACE, LOAD_RF = 4, 1, 2


class RateWatch(tune.Callback):
    """Results the controller handled, with their arrival times, and the hosts' high-water marks."""

    def __init__(self, T, sample_every: int = 10):
        self.T, self.every, self.times, self.samples = T, sample_every, [], []

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.times.append(time.monotonic())
        if len(self.times) % self.every == 1:
            self.samples.extend(self.T.host_stats())

    def peak_rate(self, window_s: float = 2.0) -> float:
        """Most results per second over any ``window_s`` window."""
        best, j = 0, 0
        for i, t in enumerate(self.times):
            while t - self.times[j] > window_s:
                j += 1
            best = max(best, i - j + 1)
        return best / window_s


def load_sweep(storage, *, trials: int, slots: int, reuse_actors: bool, steps_per_report: int = 2,
               callbacks=()):
    """``trials`` ASHA trials through one host of ``slots`` slots; returns ``(T, grid, log, watch, wall_s)``."""
    from ray.tune.schedulers import ASHAScheduler

    T = make_trainable(slots_per_host=slots, steps_per_report=steps_per_report, idle_timeout_s=30.0,
                       stats_every_s=60.0)
    log, watch = ResultLog(), RateWatch(T)
    space = {"lr": tune.loguniform(1e-4, 1e-1), "seed": tune.randint(0, 2**31 - 1)}
    tuner = tune.Tuner(
        T, param_space=space,
        tune_config=tune_config(T, num_samples=trials, reuse_actors=reuse_actors,
                                scheduler=ASHAScheduler(max_t=LOAD_MAX_T, grace_period=LOAD_GRACE,
                                                        reduction_factor=LOAD_RF)),
        run_config=run_config(storage, name="load", callbacks=[log, watch, *callbacks]),
    )
    start = time.monotonic()
    grid = tuner.fit()
    return T, grid, log, watch, time.monotonic() - start


def tiny_gan(config):
    """A GAN of two MLPs over the 64 digit pixels: the model of a trainable trained in parts."""
    from torch import nn

    return nn.ModuleDict({
        "D": nn.Sequential(nn.Linear(64, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1)),
        "G": nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 64), nn.Sigmoid()),
    })


def gan_d_step(model, batch, config):
    import torch
    import torch.nn.functional as F

    real, _ = batch
    fake = model["G"](torch.randn(real.shape[0], 8)).detach()
    r, f = model["D"](real), model["D"](fake)
    return F.binary_cross_entropy_with_logits(r, torch.ones_like(r)) + F.binary_cross_entropy_with_logits(
        f, torch.zeros_like(f))


def gan_g_step(model, batch, config):
    import torch
    import torch.nn.functional as F

    real, _ = batch
    logit = model["D"](model["G"](torch.randn(real.shape[0], 8)))
    return F.binary_cross_entropy_with_logits(logit, torch.ones_like(logit))


def gan_gap(model, batch, config):
    """How far the generated pixels' mean is from the real ones' (lower is better)."""
    import torch

    real, _ = batch
    return {"pixel_gap": (model["G"](torch.randn(real.shape[0], 8)).mean(0) - real.mean(0)).abs().mean()}


# --------------------------------------------------------- Hugging Face models (issue 13, item 4)
TEXT_VOCAB, TEXT_LEN = 24, 12  # [PAD]=0, [CLS]=1, [SEP]=2, positive words 3-12, negative words 13-22


def text_columns():
    """A toy sentiment task as a tokenizer would give it: two dicts of columns (``input_ids``,
    ``attention_mask``, ``labels``), 512 training and 128 validation sentences of 4-11 tokens,
    right-padded; the label says whether positive or negative words are in the majority."""
    import torch

    g = torch.Generator().manual_seed(0)
    n = 900
    ids = torch.randint(3, 23, (n, TEXT_LEN), generator=g)
    ids[:, 0] = 1
    mask = (torch.arange(TEXT_LEN) < torch.randint(4, TEXT_LEN, (n, 1), generator=g)).long()
    ids = ids * mask
    pos, neg = ((ids >= 3) & (ids < 13)).sum(1), ((ids >= 13) & (ids < 23)).sum(1)
    keep = (pos != neg).nonzero().flatten()[:640]
    cols = {"input_ids": ids[keep], "attention_mask": mask[keep], "labels": (pos > neg).long()[keep]}
    return {k: v[:512] for k, v in cols.items()}, {k: v[512:] for k, v in cols.items()}


def tiny_bert(config):
    """A one-layer BERT classifier built from its config (never from a hub); dropout off."""
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(
        vocab_size=TEXT_VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=TEXT_LEN, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def hf_train_step(model, batch, config):
    """The step as a Hugging Face user writes it: the batch is a dict, the model's own loss from labels=."""
    return model(**batch).loss


def hf_eval_step(model, batch, config):
    out = model(**batch)
    return {"loss": out.loss, "accuracy": (out.logits.argmax(-1) == batch["labels"]).float().mean()}
