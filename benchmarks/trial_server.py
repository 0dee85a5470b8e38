"""What the shared trial server costs per result: its ``train`` relay, against Ray's own floor for a relay.

Every result of a batched trial goes driver -> trial server -> slot host and
back. On a small node the server's CPU time comes out of the cores the host
computes on, so its cost per call matters. This script drives N trials of one
``TrialServer`` (the library's, with a trivial host that answers at once) the
way Tune does (each trial's next ``train`` submitted when its last one
returns), and reads the server process's CPU time from ``/proc``:

* ``threaded``: ``train`` run on a pool thread that blocks in ``ray.get`` (the
  server's form until session 14, kept here as a subclass);
* ``async``: the server as it is (``train`` awaited on its event loop);
* ``bare``: an async actor that only awaits the host's answer: what any relay
  through a Ray actor costs here, the floor for the two above.

Forms alternate within each round; medians over the rounds are printed.

    python benchmarks/trial_server.py [--trials 16] [--iters 40] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import ray

from ray_modelbatch.tune.trial_server import TrialServer

RESULT = {"loss": 0.5, "acc": 0.9, "time_this_iter_s": 0.01, "slot": 3, "stack": "abc", "slot_steps": 22}


@ray.remote(num_cpus=0)
class TrivialHost:
    """A slot host that has the next result ready at once (as with run-ahead)."""

    def train(self, token: str) -> dict:
        return dict(RESULT)


def _setup(self: Any, config: dict, **params: Any) -> None:
    """The trials' ``setup``: take the trivial host instead of asking a registry for a slot."""
    self._host, self._host_name, self._token = ray.get_actor("trivial-host"), "trivial-host", "t"


class ThreadedServer(TrialServer):
    """The server's ``train`` as it was: run on a pool thread, which waits in ``ray.get``."""

    async def _run(self, key: str, seat: Any, method: str, args: tuple, kwargs: dict, payload: Any) -> Any:
        if method == "train" and seat.trial is not None:
            import asyncio

            trial = seat.trial
            return await asyncio.get_running_loop().run_in_executor(self._pool, trial.train)
        return await super()._run(key, seat, method, args, kwargs, payload)


class BareRelay:
    """Only the relay: await the host's answer, nothing else."""

    def __init__(self) -> None:
        self._host = ray.get_actor("trivial-host")

    async def trial_call(self, key: str, seq: int, method: str, args: tuple, kwargs: dict, payload: Any = None) -> Any:
        if method == "__init__":
            return None
        return await self._host.train.remote("t")


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(server_cls: type, trials: int, iters: int) -> tuple[float, float, int]:
    """(wall s, server CPU-s, calls) for ``trials`` trials of ``iters`` iterations each."""
    server = ray.remote(server_cls).options(num_cpus=0, max_concurrency=100_000).remote()
    pid = ray.get(server.__ray_call__.remote(lambda self: os.getpid()))
    payload = {"name": "Bench", "class_name": "Bench",
               "attrs": {"_spec_bytes": b"", "_experiment": "bench", "_options": {}, "setup": _setup}}
    keys = [f"trial{i}" for i in range(trials)]
    ray.get([server.trial_call.remote(k, 0, "__init__", ({}, {"trial_id": k}), {}, payload) for k in keys])
    seq = dict.fromkeys(keys, 1)
    cpu0, t0 = _cpu_s(pid), time.perf_counter()
    pending = {server.trial_call.remote(k, 1, "train", (), {}): k for k in keys}
    while pending:
        [ref], _ = ray.wait(list(pending), num_returns=1)
        key = pending.pop(ref)
        ray.get(ref)
        seq[key] += 1
        if seq[key] <= iters:
            pending[server.trial_call.remote(key, seq[key], "train", (), {})] = key
    wall, cpu = time.perf_counter() - t0, _cpu_s(pid) - cpu0
    ray.kill(server)
    return wall, cpu, trials * iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count())
    args = ap.parse_args()
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        host = TrivialHost.options(name="trivial-host").remote()
        ray.get(host.train.remote("warm-up"))
        forms = {"threaded": ThreadedServer, "async": TrialServer, "bare": BareRelay}
        per_call: dict[str, list[float]] = {f: [] for f in forms}
        rate: dict[str, list[float]] = {f: [] for f in forms}
        for r in range(args.rounds):
            for name, cls in forms.items():
                wall, cpu, calls = run(cls, args.trials, args.iters)
                per_call[name].append(cpu / calls * 1e3)
                rate[name].append(calls / wall)
                print(f"round {r + 1} {name}: {calls} calls in {wall:.2f} s, server {cpu / calls * 1e3:.2f} "
                      f"CPU-ms per call", file=sys.stderr)
    finally:
        ray.shutdown()
    med = {f: statistics.median(v) for f, v in per_call.items()}
    print(f"\n`python benchmarks/trial_server.py --trials {args.trials} --iters {args.iters} --rounds {args.rounds}` "
          f"({os.cpu_count()} cores, Ray {ray.__version__}; medians of {args.rounds} alternating rounds)\n")
    print("| form | server CPU-ms per `train` | calls/s | vs `bare` (Ray's relay floor) |")
    print("|---|---:|---:|---:|")
    for f in forms:
        print(f"| {f} | {med[f]:.2f} | {statistics.median(rate[f]):.0f} | {med[f] / med['bare']:.2f}x |")
    print(f"\n`async` saves {1 - med['async'] / med['threaded']:.0%} of the server's CPU per result against `threaded`.")


if __name__ == "__main__":
    main()
