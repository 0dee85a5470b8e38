"""What would make the fused step fill a GPU: its device syncs, and what a CUDA graph of it gains.

Why: on an H200 (session 16, ``benchmarks/RESULTS.md``) the fused step of
small models took about 3 ms at any slot count (2.85 ms for 128 tiny MLPs,
2.88 ms for 32), and the GPU was 6-8% busy while the Tune sweep's host
trained: the step is the host's Python and kernel launches. Two remedies
need a GPU to judge, and a lease is short, so this script measures both in
well under a minute, without Ray:

1. Device syncs per fused step (``torch.cuda.set_sync_debug_mode("warn")``),
   by the line that caused each: a sync stops the host from queuing the next
   step while the GPU runs this one.
2. The fused step captured as one CUDA graph and replayed: its time per step
   against the eager step's, and whether the replayed steps train the slots
   as the eager steps do (parameters compared after the same steps from the
   same weights on the same batch).

    python benchmarks/gpu_probe.py [--slots 32] [--hidden 128] [--steps 200]

On a machine without CUDA it times the eager step on the CPU and says that
the rest needs a GPU (a check that the script runs).
"""

from __future__ import annotations

import argparse
import collections
import copy
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ray_modelbatch import FusedEngine, ModelBatch
from ray_modelbatch import optim as mb_optim


def make_stack(slots: int, hidden: int, device: torch.device) -> tuple[ModelBatch, FusedEngine]:
    """The digits sweep's MLP (64-hidden-10), ``slots`` of them with a spread of learning rates, Adam."""
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10)) for _ in range(slots)]
    mb = ModelBatch(models, device=device)
    opt = mb_optim.Adam(mb, lr=[1e-3 * 10 ** (i / max(slots - 1, 1) - 0.5) for i in range(slots)])
    return mb, FusedEngine(mb, opt, F.cross_entropy)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ms_per_step(step, device: torch.device, steps: int) -> float:
    step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - t0) / steps * 1e3


def count_syncs(step, steps: int = 5) -> collections.Counter:
    """Each sync the steps caused, by the source line torch's warning names."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(steps):
                step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return collections.Counter(f"{'/'.join(w.filename.rsplit('/', 2)[-2:])}:{w.lineno}" for w in caught
                               if "synchroniz" in str(w.message))


def graph_probe(slots: int, hidden: int, device: torch.device, x: torch.Tensor, y: torch.Tensor,
                steps: int, eager_ms: float) -> None:
    """Capture one fused step as a CUDA graph, replay it, compare with eager steps from the same start."""
    mb, engine = make_stack(slots, hidden, device)
    for _ in range(3):  # warm-up on a side stream, as torch.cuda.graphs asks
        engine.train_step(x, y)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        engine.train_step(x, y)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            engine.train_step(x, y)
    except Exception as exc:  # noqa: BLE001 - the reason is the finding
        first = (str(exc).splitlines() or [""])[0][:300]
        print(f"- CUDA graph: the fused step cannot be captured: {type(exc).__name__}: {first}")
        return
    replay_ms = ms_per_step(graph.replay, device, steps)
    print(f"- CUDA graph replay: {replay_ms:.3f} ms per step against {eager_ms:.3f} ms eager "
          f"({eager_ms / replay_ms:.1f}x)")
    # Exactness: a fresh stack takes the graph's stack's state (copied, so the captured tensors stay where the
    # graph reads them), then 5 eager steps there against 5 replays here.
    ref_mb, ref = make_stack(slots, hidden, device)
    with torch.no_grad():
        for k, v in ref_mb.params.items():
            v.copy_(mb.params[k])
    ref.optimizer.load_state_dict(copy.deepcopy(engine.optimizer.state_dict()))
    for _ in range(5):
        graph.replay()
        ref.train_step(x, y)
    sync(device)
    diff = max(float((mb.params[k] - ref_mb.params[k]).detach().abs().max()) for k in mb.params)
    verdict = "the graph trains as the eager step does" if diff == 0 else "NOT the same: the graph misses per-step state"
    print(f"- after 5 replayed and 5 eager steps from the same state: max |parameter difference| {diff:.2e} ({verdict})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# gpu_probe: {args.slots} MLPs 64-{args.hidden}-10, batch {args.batch}, Adam, on {name} "
          f"(torch {torch.__version__})")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 64, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(device)
    mb, engine = make_stack(args.slots, args.hidden, device)
    eager_ms = ms_per_step(lambda: engine.train_step(x, y), device, args.steps)
    print(f"- eager fused step: {eager_ms:.3f} ms")
    if device.type != "cuda":
        print("- device syncs and the CUDA graph need a GPU: not measured here")
        return
    syncs = count_syncs(lambda: engine.train_step(x, y))
    print(f"- device syncs in 5 eager steps: {sum(syncs.values())}"
          + "".join(f"\n  - {n} at {where}" for where, n in syncs.most_common()))
    graph_probe(args.slots, args.hidden, device, x, y, args.steps, eager_ms)


if __name__ == "__main__":
    main()
