"""One ASHA sweep, run with ray_modelbatch and as standard Ray Tune trials: wall time, memory, best metric.

The sweep is ``examples/asha_sweep.py``'s (digits, MLP with hidden 32 or 128,
AdamW with a per-trial warmup-cosine schedule, ASHA on ``val_loss``). Its
configs are drawn once up front and given to every run in the same order,
each with its own ``seed``; all runs use the same ASHA settings, ``max_t``,
steps per iteration, batch size and validation set. The runs:

* ``ray_modelbatch``: ``batched_trainable`` -- one slot host (1 CPU) trains
  the trials as fused stacks, and holds every trial's actor as a torch-free
  object. ``reuse_actors=True``, as in the example. ``ray_modelbatch_server``,
  ``ray_modelbatch_process`` and ``ray_modelbatch_classic`` run the same with
  the trials' objects in a trial server of their own, one light process, or
  one classic ``Trainable`` process, per trial (``RAY_MODELBATCH_TRIALS``), for
  the A/B in one invocation.
* ``standard``: a plain class ``tune.Trainable`` that trains the same model with
  ``torch.optim.AdamW`` and ``LambdaLR`` (same factor as
  ``ray_modelbatch.optim.schedules.warmup_cosine``), seeded with
  ``config["seed"]`` exactly as the slot host seeds a slot (``torch.manual_seed``
  then build the model) and fed by ``ray_modelbatch.data.SlotSampler(all train
  rows, batch_size, config["seed"])``, the stream a slot gets. One process
  per trial (``reuse_actors=False``, Tune's default), ``--baseline-cpus`` CPUs each.
* ``standard+reuse`` (leave out with ``--runs ray_modelbatch,standard``): the same
  trainable with ``reuse_actors=True`` (``reset_config`` rebuilds model, optimizer
  and stream), the strongest standard setup: a finished trial's process takes
  the next trial, so a few processes run all trials.
* ``tune_alone``: Tune's own floor for this sweep. Torch-free trials that
  train nothing replay the ``ray_modelbatch`` run's validation curves (so ASHA
  decides about the same), one at a time in one reused trial process (0.01
  CPU, ``reuse_actors=True``): the same trials and results through Tune's
  controller when training is free and no trial waits for a process. Any way
  of running these trials as Tune trials takes at least this long (with 16
  concurrent processes instead, 16 process starts share the cores and it took
  35-50 s here), so ``standard+reuse`` / ``tune_alone`` bounds the ratio any
  trainable can reach against ``standard+reuse``.

Each run gets a fresh local Ray (``num_cpus = os.cpu_count()``); the wall time
is ``Tuner.fit()`` (the ray_modelbatch run's includes starting its host).
While a run goes, a sampler reads the USS of this driver's ``ray::`` worker
processes (``/proc/<pid>/smaps_rollup`` Private_* lines, or psutil) twice a
second; trial processes are the ``pid``s Tune records in their results.
Because seeds and batches match, a trial gives the same validation loss in
both runs up to float rounding: the table shows the largest difference at the
grace period, which every trial reaches. (ASHA is asynchronous, so which
trials go further may differ between runs.)

    python benchmarks/tune_sweep.py            # 64 trials, 16 slots, max_t 20 (an epoch per iteration)
    python benchmarks/tune_sweep.py --quick    # 16 trials, 8 slots, max_t 6
    python benchmarks/tune_sweep.py --runs ray_modelbatch,standard+reuse,tune_alone --repeat 5  # medians

Writes the markdown it prints to ``benchmarks/tune_sweep_latest.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import ray
import ray.cloudpickle
import torch
import torch.nn.functional as F
from ray import tune
from ray.tune.execution.placement_groups import PlacementGroupFactory
from ray.tune.search.basic_variant import BasicVariantGenerator

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
import asha_sweep as sweep  # noqa: E402
import digits_cnn  # noqa: E402

# The example modules are not importable in Ray's workers: ship their functions by value.
for _module in (sweep, digits_cnn):
    ray.cloudpickle.register_pickle_by_value(_module)

from ray_modelbatch.data import SlotSampler  # noqa: E402

TARGET_SPEEDUP = 5.0  # vs one process per trial
TARGET_VS_REUSE = {"mlp": 4.0, "cnn": 1.5}  # vs standard Tune with reuse_actors=True (issue 10)
RUNS = ("ray_modelbatch", "standard", "standard+reuse", "tune_alone", "ray_modelbatch_server", "ray_modelbatch_process",
        "ray_modelbatch_classic")
TARGET_GPU = 10.0  # on a GPU, vs standard Tune with a fraction of the GPU per trial (issue 10)


class FirstResult(tune.Callback):
    """Seconds from the experiment's start to its first result (what a user waits before seeing anything)."""

    def __init__(self) -> None:
        self.t0, self.first, self.first_start = time.monotonic(), None, None

    def setup(self, **info) -> None:
        self.t0 = time.monotonic()

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        if self.first_start is None:
            self.first_start = time.monotonic() - self.t0

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if self.first is None:
            self.first = time.monotonic() - self.t0


# ------------------------------------------------------------ standard trainable
def warmup_cosine_factor(t: int, total: float, warmup: float, min_ratio: float) -> float:
    """``schedules.warmup_cosine``'s factor at step ``t``, in plain Python (for LambdaLR)."""
    if t < warmup:
        return t / max(warmup, 1.0)
    progress = min(max((t - warmup) / max(total - warmup, 1.0), 0.0), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class StandardTrainable(tune.Trainable):
    """One trial, one process, one plain model: what a Ray Tune user writes without ray_modelbatch."""

    cpus = 0.5  # set from --baseline-cpus
    gpus = 0.0  # set from --baseline-gpus: a fraction of a GPU per trial, as Tune users share one
    device = "cpu"  # set from --device

    @classmethod
    def default_resource_request(cls, config: dict) -> PlacementGroupFactory:
        return PlacementGroupFactory([{"CPU": cls.cpus, **({"GPU": cls.gpus} if cls.gpus else {})}])

    def setup(self, config: dict) -> None:
        torch.set_num_threads(1)  # as the slot host (1 CPU): tiny ops, more threads only cost
        self.x, self.y, self.xv, self.yv = (t.to(self.device) for t in sweep.load_digits_split())
        self._build(config)

    def _build(self, config: dict) -> None:
        torch.manual_seed(int(config["seed"]))  # as SlotHost._attach: seed, then build the model
        self.model = sweep.make_model(config).to(self.device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=config["lr"], weight_decay=config["wd"])
        total, warmup = float(config["total_steps"]), float(config["warmup_steps"])
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda t: warmup_cosine_factor(t, total, warmup, sweep.MIN_LR_RATIO))
        self.sampler = SlotSampler(torch.arange(self.x.shape[0]), sweep.BATCH_SIZE, int(config["seed"]))
        self.steps = 0

    def reset_config(self, new_config: dict) -> bool:
        self._build(new_config)
        return True

    def step(self) -> dict:
        self.model.train()
        loss_sum = grad_sum = 0.0
        for _ in range(sweep.STEPS_PER_REPORT):
            b = next(self.sampler)
            self.opt.zero_grad()
            loss = F.cross_entropy(self.model(self.x[b]), self.y[b])
            loss.backward()
            grad_sum += float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), float("inf")))
            self.opt.step()
            self.sched.step()
            loss_sum += loss.item()
            self.steps += 1
        self.model.eval()
        with torch.no_grad():
            out = self.model(self.xv)
            val_loss = float(F.cross_entropy(out, self.yv))
            val_acc = float((out.argmax(-1) == self.yv).float().mean())
        return {"train_loss": loss_sum / sweep.STEPS_PER_REPORT, "grad_norm": grad_sum / sweep.STEPS_PER_REPORT,
                "lr": self.sched.get_last_lr()[0], "slot_steps": self.steps, "val_loss": val_loss, "val_acc": val_acc}

    def save_checkpoint(self, checkpoint_dir: str) -> str:
        torch.save({"model": self.model.state_dict(), "opt": self.opt.state_dict(), "sched": self.sched.state_dict(),
                    "sampler": self.sampler.state_dict(), "steps": self.steps},
                   os.path.join(checkpoint_dir, "state.pt"))
        return checkpoint_dir

    def load_checkpoint(self, checkpoint_dir: str) -> None:
        s = torch.load(os.path.join(checkpoint_dir, "state.pt"), weights_only=False)
        self.model.load_state_dict(s["model"])
        self.opt.load_state_dict(s["opt"])
        self.sched.load_state_dict(s["sched"])
        self.sampler.load_state_dict(s["sampler"])
        self.steps = s["steps"]


class NoOpTrainable(tune.Trainable):
    """Tune alone: a torch-free trial that trains nothing and reports a stored curve at once.

    ``curves`` maps a trial's ``seed`` to the val_loss/val_acc it reported per
    iteration in the ``ray_modelbatch`` run (set before this run starts), so
    ASHA makes about the same decisions; a trial without a stored curve gets a
    made-up decreasing one. Run one trial at a time with ``reuse_actors=True``
    (see ``run_sweep``), it is what Tune itself takes for this sweep's trials
    and results: one trial process to start, then only the controller's work.
    """

    curves: dict = {}

    @classmethod
    def default_resource_request(cls, config: dict) -> PlacementGroupFactory:
        return PlacementGroupFactory([{"CPU": 0.01}])

    def setup(self, config: dict) -> None:
        self.curve = self.curves.get(int(config["seed"]), [])
        self.seed = int(config["seed"])

    def reset_config(self, new_config: dict) -> bool:
        self.setup(new_config)
        return True

    def step(self) -> dict:
        i = self.iteration  # 0-based iterations done before this one
        if i < len(self.curve):
            loss, acc = self.curve[i]
        else:
            loss, acc = 1.0 / (i + 1) + (self.seed % 1000) / 1e4, 0.9
        return {"val_loss": loss, "val_acc": acc}

    def save_checkpoint(self, checkpoint_dir: str) -> str:
        return checkpoint_dir

    def load_checkpoint(self, checkpoint_dir: str) -> None:
        pass


# -------------------------------------------------------------- memory sampling
def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) a process has used so far, from ``/proc/<pid>/stat``."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def uss_bytes(pid: int) -> int | None:
    """Unique set size of a process: psutil if installed, else the Private_* lines of smaps_rollup."""
    try:
        import psutil

        return int(psutil.Process(pid).memory_full_info().uss)
    except ImportError:
        pass
    except Exception:  # noqa: BLE001 - the process is gone
        return None
    try:
        total = 0
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Private_"):
                    total += int(line.split()[1]) * 1024
        return total
    except OSError:
        return None


AGENTS = {"DashboardAgent", "RuntimeEnvAgent"}  # Ray's per-node agents, not workers


def ray_processes(root: int | None = None) -> dict[int, str]:
    """``{pid: name}`` of the Ray worker processes under ``root`` (default: this process).

    Named by their title (``ray::StandardTrainable.train`` -> ``StandardTrainable``,
    ``ray::IDLE`` -> ``IDLE``). Only descendants count: other people's Ray
    sessions on the same machine run processes with the same names.
    """
    root = os.getpid() if root is None else root
    parent, title = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                title[int(entry)] = f.read().split(b"\0")[0].decode(errors="replace").strip()
        except (OSError, IndexError, ValueError):
            continue
    out = {}
    for pid, t in title.items():
        if not t.startswith("ray::"):
            continue
        p, hops = parent.get(pid), 0
        while p not in (None, 0, 1, root) and hops < 32:
            p, hops = parent.get(p), hops + 1
        name = t[5:].split(".")[0].split(" ")[0].split("(")[0]
        if p == root and name not in AGENTS:
            out[pid] = name
    return out


class MemorySampler:
    """Samples the USS and the CPU time of this driver's Ray worker processes in a thread while a run goes.

    Every 2 s: reading ``smaps_rollup`` costs about 2.3 ms of CPU per process, in
    the driver beside Tune's controller, so a sample of a ray_modelbatch run (18
    processes) costs 45 ms; every 0.5 s that took 9% of a core from the runs with
    the most processes.
    """

    def __init__(self, ignore: set[int], every_s: float = 2.0):
        self.every_s = every_s
        self.ignore = ignore  # pids of an earlier run, still exiting
        self.per_pid: dict[int, tuple[str, int]] = {}  # pid -> (name, max USS)
        # pid -> (name, CPU-s at its last sample): where a run's CPU went (a process's last < 2 s are missed)
        self.cpu: dict[int, tuple[str, float]] = {}
        self.peak_workers = 0  # max over samples of the summed USS of all worker processes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            for pid, name in ray_processes().items():
                uss = None if pid in self.ignore else uss_bytes(pid)
                if uss is None:
                    continue
                self.per_pid[pid] = (name, max(uss, self.per_pid.get(pid, (name, 0))[1]))
                cpu = cpu_seconds(pid)
                if cpu is not None:
                    self.cpu[pid] = (name, cpu)
                total += uss
            self.peak_workers = max(self.peak_workers, total)
            self._stop.wait(self.every_s)

    def cpu_by_name(self) -> dict[str, float]:
        """CPU-s of the run's Ray worker processes, summed per process title."""
        out: dict[str, float] = {}
        for name, cpu in self.cpu.values():
            out[name] = out.get(name, 0.0) + cpu
        return out

    def median_mb(self, pids: set[int] | None = None, name: str | None = None) -> float:
        """Median over the given processes (by pid, or by title) of each one's peak USS, in MB."""
        peaks = [uss for pid, (n, uss) in self.per_pid.items() if (pids is None or pid in pids)
                 and (name is None or n == name)]
        return statistics.median(peaks) / 2**20 if peaks else float("nan")


def node_cpu_s() -> float | None:
    """CPU-seconds every core of this machine has been busy since boot (``/proc/stat``: all but idle and
    iowait), or None off Linux. Its difference over ``fit()``, against cores x wall, says whether a run was
    bound by the machine's CPUs (everything counted: Tune, Ray's own daemons, our processes, other tenants)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------- one run
def run_sweep(kind: str, args: argparse.Namespace, configs: list[dict], storage: str) -> dict:
    earlier = set(ray_processes())
    ray.init(num_cpus=args.num_cpus or os.cpu_count() or 2, num_gpus=args.gpus, include_dashboard=False,
             logging_level="WARNING")
    try:
        batched = kind.startswith("ray_modelbatch")
        # Where the trials' actors run (ray_compat.trial_mode), for the A/B of that choice in one invocation:
        # ray_modelbatch = objects in the host (the default); ray_modelbatch_server = objects in a trial server;
        # ray_modelbatch_process = one light actor process per trial; ray_modelbatch_classic = one classic
        # Trainable process per trial
        os.environ["RAY_MODELBATCH_TRIALS"] = {"ray_modelbatch_server": "server", "ray_modelbatch_process": "process",
                                              "ray_modelbatch_classic": "classic"}.get(kind, "shared")
        if batched:
            extra = {} if args.run_ahead is None else {"run_ahead": args.run_ahead}
            if args.cpu_hosts_per_node is not None:
                extra.update(cpu_hosts_per_node=args.cpu_hosts_per_node, num_hosts=None)
            if args.hosts_per_gpu is not None:  # planned per GPU (the sweep's default on cuda is one host)
                extra.update(hosts_per_gpu=args.hosts_per_gpu, num_hosts=None)
            trainable = sweep.make_trainable(args.slots, host_threads=args.host_threads, device=args.device, **extra)
            reuse = True
        elif kind == "tune_alone":
            trainable, reuse = NoOpTrainable, True
        else:
            StandardTrainable.cpus, StandardTrainable.gpus = args.baseline_cpus, args.baseline_gpus
            StandardTrainable.device = args.device
            trainable = StandardTrainable
            reuse = kind == "standard+reuse"
        first = FirstResult()
        tuner = tune.Tuner(
            trainable,
            param_space={**sweep.search_space(args.max_t), "arch": args.arch},
            tune_config=tune.TuneConfig(
                metric="val_loss",
                mode="min",
                num_samples=len(configs),
                search_alg=BasicVariantGenerator(points_to_evaluate=[dict(c) for c in configs],
                                                 max_concurrent=1 if kind == "tune_alone" else args.slots),
                scheduler=sweep.asha(args.max_t, args.grace, args.reduction),
                reuse_actors=reuse,
            ),
            run_config=tune.RunConfig(name=kind.replace("+", "_"), storage_path=storage, verbose=0,
                                      callbacks=[first]),
        )
        hosts: list[dict] = []
        with MemorySampler(ignore=earlier) as mem:
            t0, t0_wall, cpu0, node0 = time.monotonic(), time.time(), time.process_time(), node_cpu_s()
            try:
                results = tuner.fit()
                wall = time.monotonic() - t0
                driver_cpu = time.process_time() - cpu0  # Tune's controller (and this script's sampler thread)
                node1 = node_cpu_s()
                node_busy = None if node0 is None or node1 is None else node1 - node0
                if batched:
                    hosts = trainable.host_stats()
            finally:
                if batched:
                    trainable.shutdown_hosts()
    finally:
        ray.shutdown()
        wait_for_ray_exit()

    rows: list[dict] = []
    for r in results:
        df = r.metrics_dataframe
        if df is None or not len(df):
            continue
        rows.append({"seed": int(r.config["seed"]), "df": df, "pids": set(df["pid"].tolist())})
    trial_pids = set().union(*(row["pids"] for row in rows))  # Tune's `pid` in each result
    best = min(((row["df"]["val_loss"].min(), row) for row in rows), key=lambda p: p[0])
    best_df = best[1]["df"]
    at = best_df.loc[best_df["val_loss"].idxmin()]
    return {
        "kind": kind, "reuse_actors": reuse, "wall_s": wall, "trials": len(results),
        "errors": sum(r.error is not None for r in results), "rows": rows,
        "iterations": sum(len(row["df"]) for row in rows),
        "best_val_loss": float(at["val_loss"]), "best_val_acc_at": float(at["val_acc"]),
        "best_val_acc": max(float(row["df"]["val_acc"].max()) for row in rows),
        "best_seed": best[1]["seed"],
        "processes": len(trial_pids),
        "trial_mb": mem.median_mb(pids=trial_pids),
        "host_mb": mem.median_mb(name="SlotHost"),
        "workers_mb": mem.peak_workers / 2**20,
        "seen": {n: sum(1 for m, _ in mem.per_pid.values() if m == n) for n, _ in mem.per_pid.values()},
        "cpu": {"driver": driver_cpu, **mem.cpu_by_name()},
        "node_busy_s": node_busy,
        "hosts": hosts,
        "first_result_s": first.first,
        "first_start_s": first.first_start,
        # each host's milestones (init, ready, first_attach, first_result, verdict) in seconds after fit() began
        "host_milestones": [{k: (v - t0_wall if v is not None else None) for k, v in h.get("milestones", {}).items()}
                            for h in hosts],
        "held": [held_slots(h.get("events", []), t0_wall) for h in hosts],
    }


class _ProxyLike:
    """A process that imports what a batched trial's process imports (``ray_modelbatch.tune.trial_actor``), nothing more."""

    def __init__(self) -> None:
        import ray_modelbatch.tune.trial_actor  # noqa: F401 - the import is the cost being measured

    def ready(self) -> bool:
        return True


def proxy_start_bound(n: int, num_cpus: int) -> float:
    """Seconds for a fresh local Ray to start ``n`` trial-proxy processes at once: the least time any run with
    ``n`` concurrent Tune trials spends before its last first-wave trial can start (Ray starts at most one
    worker per CPU at a time; each process imports what a light trial actor imports)."""
    ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level="WARNING")
    try:
        cls = ray.remote(num_cpus=0.01)(_ProxyLike)
        t0 = time.monotonic()
        actors = [cls.remote() for _ in range(n)]
        ray.get([a.ready.remote() for a in actors])
        return time.monotonic() - t0
    finally:
        ray.shutdown()
        wait_for_ray_exit()


def wait_for_ray_exit(timeout_s: float = 30.0) -> None:
    """Wait until the run's Ray processes are gone, so the next run starts on a quiet machine."""
    deadline = time.monotonic() + timeout_s
    while ray_processes() and time.monotonic() < deadline:
        time.sleep(0.2)


def grace_agreement(a: dict, b: dict, grace: int) -> tuple[float, int, int]:
    """Largest |val_loss difference| at iteration ``grace`` over trials matched by seed; equal val_acc count."""
    at_a = {r["seed"]: r["df"] for r in a["rows"]}
    worst, same_acc, n = 0.0, 0, 0
    for r in b["rows"]:
        da = at_a.get(r["seed"])
        if da is None:
            continue
        ra, rb = da[da["training_iteration"] == grace], r["df"][r["df"]["training_iteration"] == grace]
        if not len(ra) or not len(rb):
            continue
        n += 1
        worst = max(worst, abs(float(ra["val_loss"].iloc[0]) - float(rb["val_loss"].iloc[0])))
        same_acc += float(ra["val_acc"].iloc[0]) == float(rb["val_acc"].iloc[0])
    return worst, same_acc, n


def standard_at_once(args: argparse.Namespace) -> int:
    """How many standard trials Ray can run at once on the declared CPUs and GPUs."""
    cpus = args.num_cpus or os.cpu_count() or 2
    n = int(cpus / args.baseline_cpus + 1e-9)
    return min(n, int(args.gpus / args.baseline_gpus + 1e-9)) if args.baseline_gpus else n


def gpu_model() -> str:
    n = torch.cuda.device_count()
    return f"{n}x {torch.cuda.get_device_name(0)}" if n else "no CUDA device"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def report(args: argparse.Namespace, configs: list[dict], kinds: list[str], runs: dict,
           start_bound: float | None, t_start: float) -> str:
    """The markdown of the runs done so far: written after each run, so a sweep stopped at a time limit
    keeps what finished."""
    lines = [
        "# Ray Tune ASHA sweep: ray_modelbatch vs. standard trials",
        "",
        f"- command: `{_command()}`",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores (shared with other jobs: timings are noisy; "
        f"load average {os.getloadavg()[0]:.1f} at the end); Ray local cluster with "
        f"{args.num_cpus or os.cpu_count()} CPUs" + (f" and {args.gpus:g} GPUs" if args.gpus else "") + ", fresh per run",
        f"- device: {gpu_model() if args.device == 'cuda' else 'cpu'}"
        + (" (GPUs declared to Ray but unused: a dry run of the GPU setup)" if args.gpus and args.device == "cpu"
           else ""),
        f"- torch {torch.__version__}, ray {ray.__version__}, Python {platform.python_version()}",
        f"- sweep: {args.trials} trials (configs drawn up front, seed {args.seed}; same order and per-trial `seed` "
        f"in every run), " + (f"digits MLP 64-{{{','.join(map(str, sweep.HIDDEN))}}}-10" if args.arch == "mlp" else
                              "digits CNN (conv-BN-ReLU x2, maxpool, linear; 4 or 16 channels)")
        + ", AdamW + warmup-cosine, "
        f"batch {sweep.BATCH_SIZE}, {sweep.STEPS_PER_REPORT} steps per iteration, ASHA max_t {args.max_t}, "
        f"grace {args.grace}, reduction {args.reduction}, at most {args.slots} live trials",
        (f"- ray_modelbatch: {args.hosts_per_gpu or 1} slot host(s) per GPU ({args.device}; {args.slots} slots per host, "
         "run-ahead 2)" if args.gpus else
         f"- ray_modelbatch: 1 slot host (reserves 1 CPU, computes with every CPU of the node but one; {args.slots} slots, "
         "run-ahead 2)") + ", proxy trials 0.01 CPU each, reuse_actors=True",
        f"- standard: class Trainable on {args.device}, {{'cpu': {args.baseline_cpus:g}"
        + (f", 'gpu': {args.baseline_gpus:g}" if args.baseline_gpus else "") + "} per trial "
        f"(up to {standard_at_once(args)} trials at once), "
        "torch.optim.AdamW + LambdaLR, 1 torch thread; `standard` = reuse_actors=False (one process per trial), "
        "`standard+reuse` = reuse_actors=True",
        "- wall = `Tuner.fit()`; trial processes = distinct `pid`s in the trials' results; USS from "
        "/proc/<pid>/smaps_rollup (Private_* lines) of this driver's `ray::` worker processes, sampled every 2 s: "
        "per trial process the median of each one's peak; all workers = peak of the sum over every worker "
        "(trial processes, idle workers, host, registry)",
        "",
        "| run | reuse_actors | wall s | trials/hour | iterations | errors | best val_loss (val_acc there) "
        "| best val_acc | trial processes | USS MB per trial process | host USS MB | all Ray workers' USS MB (peak) "
        "| host busy | slots stepped per fused step / held | first trial started s | first result s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for kind, r in runs.items():
        busy = ", ".join(f"{h['busy_fraction']:.0%} of {h['wall_s']:.0f}s" for h in r["hosts"]) or "-"
        fill = ", ".join(f"{h['slot_steps'] / max(h['fused_steps'], 1):.1f} ({h['stepped_fraction']:.0%})"
                         for h in r["hosts"]) or "-"
        first = "-" if r["first_result_s"] is None else f"{r['first_result_s']:.1f}"
        started = "-" if r["first_start_s"] is None else f"{r['first_start_s']:.1f}"
        host_mem = "-" if math.isnan(r["host_mb"]) else f"{r['host_mb']:.0f}"
        lines.append(
            f"| {kind} | {r['reuse_actors']} | {r['wall_s']:.1f} | {r['trials'] / r['wall_s'] * 3600:,.0f} | "
            f"{r['iterations']} | {r['errors']} | {r['best_val_loss']:.4f} ({r['best_val_acc_at']:.4f}) | "
            f"{r['best_val_acc']:.4f} | {r['processes']} | {r['trial_mb']:.0f} | {host_mem} | {r['workers_mb']:.0f} | "
            f"{busy} | {fill} | {started} | {first} |")
    lines.append("")
    for kind, r in runs.items():
        seen = ", ".join(f"{n} x{c}" for n, c in sorted(r["seen"].items()))
        lines.append(f"- `{kind}`: worker processes seen by the memory sampler: {seen or 'none'}")
        cpu = ", ".join(f"{n} {c:.1f}" for n, c in sorted(r["cpu"].items(), key=lambda kv: -kv[1]) if c >= 0.05)
        lines.append(f"- `{kind}`: CPU-s of the node's {args.num_cpus or os.cpu_count()} cores x {r['wall_s']:.1f} s: "
                     f"{cpu} (driver: this process during `fit()`, Tune's controller; the workers: summed per title, "
                     "each from its start, sampled every 2 s)")
        if r.get("node_busy_s") is not None:
            cores = os.cpu_count() or 1
            lines.append(f"- `{kind}`: the whole machine was busy {r['node_busy_s']:.1f} CPU-s during `fit()`, "
                         f"{r['node_busy_s'] / (cores * r['wall_s']):.0%} of its {cores} cores x {r['wall_s']:.1f} s "
                         "(`/proc/stat`: Tune, Ray's daemons, every worker; near 100% means the run waited on CPU, "
                         "so it shortens only with less CPU work, wherever that work is)")
    trial_no = {int(c["seed"]): f"{i:05d}" for i, c in enumerate(configs)}
    mb = runs.get("ray_modelbatch")
    for kind, r in runs.items():
        if mb is None or r is mb or kind == "tune_alone":  # it replays ray_modelbatch's curves
            continue
        worst, same, n = grace_agreement(mb, r, args.grace)
        lines.append(f"- same training, `{kind}` vs `ray_modelbatch`: at iteration {args.grace} (every trial), max "
                     f"|val_loss difference| over {n} matched trials = {worst:.2e}; val_acc identical in {same}/{n}")
        lines.append(f"- wall-time ratio `{kind}` / `ray_modelbatch` = {r['wall_s'] / mb['wall_s']:.2f}x; "
                     f"trial processes {r['processes']} vs {mb['processes']}")
        # ASHA's promotions depend on the order results arrive, so runs train different numbers of iterations
        # (306-460 for the MLP sweep's 64 trials, measured); wall time per iteration separates that from speed.
        per = [run["wall_s"] / max(1, run["iterations"]) for run in (r, mb)]
        lines.append(f"- per iteration trained: `{kind}` {per[0] * 1e3:.1f} ms ({r['iterations']}), `ray_modelbatch` "
                     f"{per[1] * 1e3:.1f} ms ({mb['iterations']}): {per[0] / per[1]:.2f}x")
        for a_run, b_run in ((r, mb), (mb, r)):
            if a_run["best_seed"] == b_run["best_seed"]:
                continue
            seed = a_run["best_seed"]
            da = next(row["df"] for row in a_run["rows"] if row["seed"] == seed)
            db = next((row["df"] for row in b_run["rows"] if row["seed"] == seed), None)
            if db is None:
                continue
            common = int(min(da["training_iteration"].max(), db["training_iteration"].max()))
            va = float(da.loc[da["training_iteration"] <= common, "val_loss"].min())
            vb = float(db.loc[db["training_iteration"] <= common, "val_loss"].min())
            lines.append(f"- best trial of `{a_run['kind']}` is {trial_no[seed]}: ASHA ran it "
                         f"{int(da['training_iteration'].max())} iterations there and "
                         f"{int(db['training_iteration'].max())} in `{b_run['kind']}` (asynchronous ASHA: "
                         f"promotions depend on the order results arrive); its best val_loss in the first "
                         f"{common} iterations was {va:.4f} vs {vb:.4f}")
    std = runs.get("standard")
    lines.append("")
    if mb is not None and std is not None:
        ratio = std["wall_s"] / mb["wall_s"]
        tol = max(0.01, 0.05 * std["best_val_loss"])
        fast = ratio >= TARGET_SPEEDUP
        # Each trial trains identically in both runs (checked above); which trials async ASHA
        # promotes depends on result order, so the best can differ either way. The target is
        # that fusion costs no quality: the best must be no worse than standard's beyond noise.
        same_metric = mb["best_val_loss"] <= std["best_val_loss"] + tol
        lines += [
            f"Target: >= {TARGET_SPEEDUP:.0f}x lower wall time than `standard` at the same best val_loss:",
            f"- wall time: {ratio:.2f}x -> {'met' if fast else 'not met'}",
            f"- best val_loss {mb['best_val_loss']:.4f} vs {std['best_val_loss']:.4f} (no worse than standard "
            f"+ {tol:.3f}) -> {'met' if same_metric else 'not met'}; best val_acc {mb['best_val_acc']:.4f} vs "
            f"{std['best_val_acc']:.4f}",
            f"- overall: {'MET' if fast and same_metric and not mb['errors'] else 'NOT MET'}",
        ]
    reuse = runs.get("standard+reuse")
    if mb is not None and reuse is not None and not args.gpus:  # the CPU targets; GPU ones below
        ratio = reuse["wall_s"] / mb["wall_s"]
        target = TARGET_VS_REUSE[args.arch]
        lines += [
            f"Target (issue 10): >= {target:g}x lower wall time than `standard+reuse`: {ratio:.2f}x -> "
            f"{'met' if ratio >= target else 'not met'}; best val_loss {mb['best_val_loss']:.4f} vs "
            f"{reuse['best_val_loss']:.4f}",
        ]
    if mb is not None and args.gpus:
        for kind in ("standard", "standard+reuse"):
            if kind in runs:
                ratio = runs[kind]["wall_s"] / mb["wall_s"]
                lines.append(f"Target (issue 10, GPU): >= {TARGET_GPU:g}x lower wall time than `{kind}` with "
                             f"{args.baseline_gpus:g} GPU per trial: {ratio:.2f}x -> "
                             f"{'met' if ratio >= TARGET_GPU else 'not met'}")
    held = (mb or {}).get("held") or [None] * len((mb or {}).get("hosts", []))
    for h_, m_, held_ in zip((mb or {}).get("hosts", []), (mb or {}).get("host_milestones", []), held):
        frac = {k: h_.get(k, 0.0) / h_["wall_s"] if h_["wall_s"] else 0.0
                for k in ("wait_s", "command_s", "housekeeping_s")}
        rest = 1.0 - h_["busy_fraction"] - sum(frac.values())
        on_cpu = h_.get("busy_cpu_s", 0.0) / h_["busy_s"] if h_.get("busy_s") else 0.0
        working = h_["wall_s"] - h_.get("wait_s", 0.0)  # everything but waiting for work
        queued = h_.get("engine_cpu_wait_s", 0.0) / working if working else 0.0
        lines.append(f"- host: busy {h_['busy_fraction']:.0%} (stepping and evaluating; its thread on a core "
                     f"{on_cpu:.0%} of that time, preempted {h_.get('busy_preempted', 0):,} times; over all its "
                     f"work the thread was runnable but waited for a core {queued:.0%} of the time), waiting for work "
                     f"{frac['wait_s']:.0%}, serving attach/detach/save/restore {frac['command_s']:.0%} "
                     f"({_commands(h_.get('commands', {}))}), lease checks "
                     f"and TensorBoard {frac['housekeeping_s']:.0%}, the loop itself {rest:.0%}; "
                     f"{h_['stepped_fraction']:.0%} of held slots stepped "
                     f"per fused step, step paths {h_['step_paths']}, {h_['threads']} threads, "
                     f"run-ahead {h_['run_ahead']}, fused step CPU median {h_.get('step_cpu_ms') or float('nan'):.1f} ms "
                     f"(kernel-bound: {h_.get('kernel_bound')}; see tune.cpu_spread); stacks' forward: "
                     + ", ".join(f"{k} {v.get('forward')}" for k, v in h_.get("stacks", {}).items()))
        lines.append("- host timeline, s after fit(): " + ", ".join(
            f"{k.replace('_', ' ')} {v:.1f}" for k, v in m_.items() if v is not None)
            + f"; data() ran in the {h_.get('data_source') or 'host'}; big tensors: {h_.get('big_tensors')}")
        if held_ is not None:
            lines.append(f"- host slots held, every 0.5 s from its first attach at {held_[0]:.1f} s after fit(): "
                         + " ".join(map(str, held_[1])))
    if mb is not None and reuse is not None and reuse["first_start_s"] is not None:
        # Before its first trial starts, a Tune run has trained nothing: whatever a trainable does,
        # its wall time includes that start. So standard+reuse's own start bounds any ratio against it.
        bound = reuse["wall_s"] / reuse["first_start_s"]
        lines.append(f"- bound: `standard+reuse` itself spent {reuse['first_start_s']:.1f} s of its {reuse['wall_s']:.1f} s "
                     f"before its first trial started; a run that trained in zero time after the same start would "
                     f"be {bound:.2f}x faster. ray_modelbatch: first trial started at "
                     f"{mb['first_start_s']:.1f} s, host busy "
                     f"{sum(h['busy_fraction'] * h['wall_s'] for h in mb['hosts']):.1f} s")
    alone = runs.get("tune_alone")
    if alone is not None:
        line = (f"- Tune's floor: this sweep's trials, torch-free and training nothing, one at a time in one reused "
                f"trial process (replaying ray_modelbatch's val_loss so ASHA decides alike) took "
                f"{alone['wall_s']:.1f} s ({alone['iterations']} iterations, first result at "
                f"{alone['first_result_s'] or float('nan'):.1f} s): Tune's own time for these trials and results, a "
                "floor for any trainable that runs them as Tune trials")
        if reuse is not None and not args.gpus:
            target = TARGET_VS_REUSE[args.arch]
            bound = reuse["wall_s"] / alone["wall_s"]
            line += (f"; so no trainable gets more than `standard+reuse` / `tune_alone` = {bound:.2f}x below "
                     f"`standard+reuse` (the {target:g}x target needs <= {reuse['wall_s'] / target:.1f} s: "
                     f"{'within' if bound >= target else 'out of'} reach in this run)")
        if mb is not None:
            line += f"; ray_modelbatch / `tune_alone` = {mb['wall_s'] / alone['wall_s']:.2f}x"
        lines.append(line)
    if start_bound is not None:
        lines.append(f"- bound: starting {args.slots} trial processes (importing what a light trial actor imports: no `ray.tune`, no torch) on this node takes "
                     f"{start_bound:.1f} s by itself (measured before the runs, fresh Ray); a run with one process per "
                     f"trial (`ray_modelbatch_process`, `ray_modelbatch_classic`) and {args.slots} slots cannot finish "
                     "sooner; `ray_modelbatch` starts none: its host holds the trials")
    lines += ["", f"Run time: {time.monotonic() - t_start:.0f} s"]
    if len(runs) < len(kinds):
        lines.append(f"- incomplete: {len(runs)} of {len(kinds)} runs done ({', '.join(runs)})")
    return "\n".join(lines) + "\n"


def _command() -> str:
    """This script's command line, as the report shows it."""
    return "python " + shlex.join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])


def rounds_table(args: argparse.Namespace, kinds: list[str], rounds: list[dict]) -> list[str]:
    """With ``--repeat``: every round's wall time, iterations and time per iteration of each run, the ratios
    against ``ray_modelbatch``, and their medians (the figure to quote: this machine's runs vary by 20%
    or more, and the baseline's start varies the most). The rounds alternate the runs, so a slow phase of
    the machine falls on every run alike. ``rounds``: each round's ``{run: {"wall_s", "iterations"}}``."""
    done = [r for r in rounds if all(k in r for k in kinds)]
    others = [k for k in kinds if k != "ray_modelbatch"]
    head = ["round", *(f"{k} s (iterations)" for k in kinds), *(f"{k} ms per iteration" for k in kinds)]
    if "ray_modelbatch" in kinds:
        head += [f"{k} / ray_modelbatch" for k in others]
    lines = ["", f"Rounds ({len(done)} of {args.repeat} done; each runs {', '.join(kinds)} in turn):", "",
             "| " + " | ".join(head) + " |", "|" + " ---: |" * len(head)]

    def ratios(r: dict) -> list[float]:
        return [r[k]["wall_s"] / r["ray_modelbatch"]["wall_s"] for k in others] if "ray_modelbatch" in kinds else []

    for i, r in enumerate(done, 1):
        cells = [str(i), *(f"{r[k]['wall_s']:.1f} ({r[k]['iterations']})" for k in kinds),
                 *(f"{r[k]['wall_s'] / max(1, r[k]['iterations']) * 1e3:.1f}" for k in kinds),
                 *(f"{x:.2f}x" for x in ratios(r))]
        lines.append("| " + " | ".join(cells) + " |")
    if not done:
        return lines + [""]
    med = statistics.median
    cells = ["median", *(f"{med(r[k]['wall_s'] for r in done):.1f} ({med(r[k]['iterations'] for r in done):.0f})"
                         for k in kinds),
             *(f"{med(r[k]['wall_s'] / max(1, r[k]['iterations']) for r in done) * 1e3:.1f}" for k in kinds),
             *(f"**{med(x[j] for x in map(ratios, done)):.2f}x**" for j in range(len(others)))]
    lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if "ray_modelbatch" in kinds and "standard+reuse" in kinds and not args.gpus:
        ratio = med(r["standard+reuse"]["wall_s"] / r["ray_modelbatch"]["wall_s"] for r in done)
        target = TARGET_VS_REUSE[args.arch]
        lines += [f"Target (issue 10), median of {len(done)} rounds: >= {target:g}x lower wall time than "
                  f"`standard+reuse`: {ratio:.2f}x -> {'met' if ratio >= target else 'not met'}", ""]
    lines.append("The rest is the last round's.")
    lines.append("")
    return lines


ROUND_MARK = "- wall = `Tuner.fit()`"  # where a round's report ends its header: the rounds' table goes there


def repeat_rounds(args: argparse.Namespace, kinds: list[str]) -> str:
    """``--repeat N``: run this script N times, one round of every run each, and report every round.

    Each round is a fresh process, as a user's script is: a second round in
    the same process would find the driver's imports done (``data()``'s
    scikit-learn took 1.6 CPU-s in a first round and 0.13 s in a second one,
    while the slot host starts), which favours the runs that load data in
    the driver. The report is the last round's, with every round's figures
    and their medians before it.
    """
    child = []
    skip = False
    for a in sys.argv[1:]:  # this command without --repeat and --out
        if skip:
            skip = False
        elif a in ("--repeat", "--out"):
            skip = True
        elif not a.startswith(("--repeat=", "--out=")):
            child.append(a)
    rounds: list[dict] = []
    last = ""
    with tempfile.TemporaryDirectory(prefix="tune_sweep_rounds_") as tmp:
        for n in range(args.repeat):
            print(f"round {n + 1} of {args.repeat} ({time.strftime('%H:%M:%S')})", flush=True)
            md, js = os.path.join(tmp, f"round{n}.md"), os.path.join(tmp, f"round{n}.json")
            subprocess.run([sys.executable, os.path.abspath(__file__), *child, "--out", md, "--round-json", js],
                           check=True)
            rounds.append(json.loads(Path(js).read_text()))
            last = Path(md).read_text()
            text = _with_rounds(last, args, kinds, rounds)
            Path(args.out).write_text(text)
    return _with_rounds(last, args, kinds, rounds)


def _with_rounds(text: str, args: argparse.Namespace, kinds: list[str], rounds: list[dict]) -> str:
    """A round's report with this command in it, and the rounds' table before its details."""
    lines = [f"- command: `{_command()}`" if line.startswith("- command: ") else line for line in text.splitlines()]
    at = next((i for i, line in enumerate(lines) if line.startswith(ROUND_MARK)), len(lines))
    return "\n".join(lines[:at] + rounds_table(args, kinds, rounds) + lines[at:]) + "\n"


def held_slots(events: list[dict], t0: float, step: float = 0.5) -> tuple[float, list[int]] | None:
    """Slots a host held over the sweep, from its attach and detach events: ``(seconds after t0 of the first
    attach, slots held at it and every ``step`` after it until the last detach)``; None without attaches.

    Shows where a sweep's time goes: a full host stepping slowly, or a host
    waiting for trials (at the start, while trials turn over, in the tail).
    """
    changes = sorted((e["t"] - t0, 1 if e["event"] == "attach" else -1)
                     for e in events if e.get("event") in ("attach", "detach"))
    if not any(d > 0 for _, d in changes):
        return None
    start, end = changes[0][0], changes[-1][0]
    held, counts, i, t = 0, [], 0, start
    while t <= end + step:
        while i < len(changes) and changes[i][0] <= t:
            held += changes[i][1]
            i += 1
        counts.append(held)
        t += step
    return start, counts


def _commands(commands: dict) -> str:
    """``attach x64 0.25 s (CPU 0.22 s), ...``: what a host's serving time went to, by command."""
    return ", ".join(f"{k} x{v['count']} {v['wall_s']:.2f} s (CPU {v['cpu_s']:.2f} s)"
                     for k, v in sorted(commands.items(), key=lambda kv: -kv[1]["wall_s"])) or "none"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=None, help="trials (default 64; 16 with --quick)")
    p.add_argument("--slots", type=int, default=None, help="slots of the host and max concurrent trials (default 16; 8 with --quick)")
    p.add_argument("--max-t", type=int, default=None,
                   help=f"ASHA max_t in iterations of {sweep.STEPS_PER_REPORT} steps (default 20; 6 with --quick)")
    p.add_argument("--grace", type=int, default=2, help="ASHA grace period (iterations)")
    p.add_argument("--reduction", type=int, default=3, help="ASHA reduction factor")
    p.add_argument("--quick", action="store_true", help="a small sweep that checks the benchmark runs")
    p.add_argument("--arch", choices=("mlp", "cnn"), default="mlp",
                   help="the digits MLP, or a small CNN with BatchNorm on the 8x8 digit images")
    p.add_argument("--steps-per-report", type=int, default=sweep.STEPS_PER_REPORT,
                   help="steps per Tune iteration (default: one epoch of the training rows)")
    p.add_argument("--baseline-cpus", type=float, default=None,
                   help="CPUs of each standard trial (default 0.5 on CPU: 4 trials at once on 2 CPUs; with "
                        "--device cuda, the node's CPUs but one shared by --slots trials)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where both runs train: the slot host's device and each standard trial's")
    p.add_argument("--gpus", type=float, default=None,
                   help="GPUs each local Ray declares (default: torch.cuda.device_count() with --device cuda, "
                        "else 0). With --device cpu and --gpus 1 the GPU resources are declared but unused: "
                        "a dry run of the GPU setup on a machine without one")
    p.add_argument("--baseline-gpus", type=float, default=None,
                   help="GPU fraction of each standard trial (default: --gpus / --slots, so as many standard "
                        "trials share the GPUs at once as ray_modelbatch has slots)")
    p.add_argument("--runs", default="ray_modelbatch,standard,standard+reuse",
                   help="comma-separated runs, in order (ray_modelbatch and standard are needed for the target; "
                        "tune_alone: the sweep's trials training nothing, one at a time: Tune's own floor)")
    p.add_argument("--seed", type=int, default=0, help="seed of the config draw")
    p.add_argument("--host-threads", type=int, default=None,
                   help="torch threads of the slot host (default: batched_trainable's, every CPU of the node but one)")
    p.add_argument("--cpu-hosts-per-node", type=int, default=None,
                   help="batched_trainable(cpu_hosts_per_node=...) of ray_modelbatch's run (default: the library's)")
    p.add_argument("--hosts-per-gpu", type=int, default=None,
                   help="batched_trainable(hosts_per_gpu=...) of ray_modelbatch's run on cuda (default: one host)")
    p.add_argument("--run-ahead", type=int, default=None,
                   help="iterations a slot may train past its trial's last result (default: batched_trainable's)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of each local Ray (default: os.cpu_count())")
    p.add_argument("--storage", default=None, help="Tune storage_path (default: a temporary directory)")
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds of every run, each round a fresh process; the report adds each round's figures "
                        "and their medians")
    p.add_argument("--round-json", default=None, help=argparse.SUPPRESS)  # a round's figures, for --repeat
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "tune_sweep_latest.md"))
    args = p.parse_args()
    args.trials = args.trials or (16 if args.quick else 64)
    args.slots = args.slots or (8 if args.quick else 16)
    args.max_t = args.max_t or (6 if args.quick else 20)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here; run without it, or with --device cpu "
                         "--gpus 1 for a dry run of the GPU setup")
    if args.gpus is None:
        args.gpus = float(torch.cuda.device_count()) if args.device == "cuda" else 0.0
    if args.baseline_gpus is None:
        args.baseline_gpus = args.gpus / args.slots if args.gpus else 0.0
    if args.baseline_cpus is None:
        cpus = args.num_cpus or os.cpu_count() or 2
        args.baseline_cpus = 0.5 if not args.gpus else max(0.05, round((cpus - 1) / args.slots, 2))

    sweep.STEPS_PER_REPORT = args.steps_per_report  # read by make_trainable and search_space at call time
    t_start = time.monotonic()
    configs = sweep.sample_configs(sweep.search_space(args.max_t), args.trials, args.seed)
    for c in configs:
        c["arch"] = args.arch
    kinds = args.runs.split(",")
    unknown = set(kinds) - set(RUNS)
    if unknown:
        raise SystemExit(f"unknown runs {sorted(unknown)}; choose from {', '.join(RUNS)}")
    if args.repeat > 1:
        text = repeat_rounds(args, kinds)
        print()
        print(text)
        return
    runs: dict = {}
    start_bound = None
    if {"ray_modelbatch_process", "ray_modelbatch_classic"} & set(kinds):
        start_bound = proxy_start_bound(args.slots, args.num_cpus or os.cpu_count() or 2)
        print(f"  {args.slots} proxy-like processes started in {start_bound:.1f}s", flush=True)
    with tempfile.TemporaryDirectory(prefix="tune_sweep_") as tmp:
        storage = os.path.abspath(args.storage) if args.storage else tmp
        for kind in kinds:
            print(f"running {kind} ... ({time.strftime('%H:%M:%S')})", flush=True)  # matches nvidia-smi dmon -o T
            if kind == "tune_alone" and "ray_modelbatch" in runs:  # replay its curves: ASHA decides alike
                NoOpTrainable.curves = {row["seed"]: list(zip(row["df"]["val_loss"], row["df"]["val_acc"]))
                                        for row in runs["ray_modelbatch"]["rows"]}
            runs[kind] = run_sweep(kind, args, configs, storage)
            print(f"  {kind}: {runs[kind]['wall_s']:.1f}s", flush=True)
            Path(args.out).write_text(report(args, configs, kinds, runs, start_bound, t_start))

    text = report(args, configs, kinds, runs, start_bound, t_start)
    print()
    print(text)
    Path(args.out).write_text(text)
    if args.round_json:
        Path(args.round_json).write_text(json.dumps(
            {k: {"wall_s": r["wall_s"], "iterations": r["iterations"]} for k, r in runs.items()}))


if __name__ == "__main__":
    main()
