"""Where a fused step's time goes, op by op: each aten call timed where it runs, named by the line that issued it.

Why: ``torch.profiler`` misleads on these steps. On the 32-slot TransformerEncoder,
BERT, CNN and ResNet steps it blamed copies, ``fill_`` and bias sums that took
2-8x less when timed alone (``benchmarks/RESULTS.md``, session 27), and it
inflated the step by up to 60%. ``kernel_time.py`` replays the heavy kernels
alone, which bounds what fusing can gain but says nothing of the work between
them. Here every aten call of a few steps is timed under a
``TorchDispatchMode`` around the call itself (the mode's own Python runs
outside the timer) and charged to ``(op, the innermost line of
ray_modelbatch, torch.nn or transformers that issued it)``; calls issued by autograd's
engine during ``backward()`` are charged to the line that called
``backward()``, unless a custom ``autograd.Function``'s Python backward
issued them. The table's sum is printed next to the step's own time, so how
much the timing itself disturbed the step is visible: within 1-7% for the
32-slot steps above. Each timed call crosses from Python into torch's
dispatcher once more than the step itself would, a few microseconds: steps
made of many small ops read high (a loop of 8 plain TransformerEncoder models,
4,448 calls on one thread, summed to 169 ms against its own 137 ms), so compare
rows within one step, and trust the rows of large ops most.

    python benchmarks/op_time.py --model transformer --slots 32
    python benchmarks/op_time.py --model bert --top 40

The models, batches and optimizer are ``fused_step.py``'s (Adam, one shared batch).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fused_step  # noqa: E402
import rgb_cnn  # noqa: E402

from ray_modelbatch import ModelBatch  # noqa: E402
from ray_modelbatch.engine import FusedEngine  # noqa: E402

OUR_CODE = ("ray_modelbatch", "torch/nn/", "transformers/")
PASS_THROUGH = ("__torch_function__", "__torch_dispatch__")  # modes that hand most calls on (slot_random's)


def _issuer() -> str:
    """``file:line`` of the innermost frame in ray_modelbatch, torch.nn or transformers below the mode (or ``?``)."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if frame.name in PASS_THROUGH:
            continue
        if any(part in frame.filename for part in OUR_CODE):
            return f"{Path(frame.filename).name}:{frame.lineno}"
    return "?"


class OpTimer(TorchDispatchMode):
    """Times every aten call made while active: ``seconds`` and ``calls`` by ``(op, issuer)``."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: collections.Counter = collections.Counter()
        self.calls: collections.Counter = collections.Counter()

    def key(self, func) -> tuple[str, str]:  # noqa: ANN001 - an OpOverload
        """What a call is charged to: ``(op, the line that issued it)``."""
        return str(func.overloadpacket).removeprefix("aten."), _issuer()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's signature
        key = self.key(func)
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        self.seconds[key] += time.perf_counter() - start
        self.calls[key] += 1
        return out


def time_ops(step: Callable[[], None], steps: int = 3) -> OpTimer:
    """Run ``step`` ``steps`` times under an :class:`OpTimer`; totals are over all of them."""
    timer = OpTimer()
    with timer:
        for _ in range(steps):
            step()
    return timer


def fused_step_of(name: str, slots: int, seed: int = 0) -> Callable[[], None]:
    """One fused Adam step of ``slots`` models of ``fused_step.py``'s family ``name`` on one shared batch."""
    return fused_stack_of(name, slots, seed)[0]


def fused_stack_of(name: str, slots: int, seed: int = 0) -> tuple[Callable[[], None], ModelBatch]:
    """:func:`fused_step_of`'s step, and the model batch it trains."""
    spec = fused_step.SPECS[name]
    x, y = spec.batch(torch.Generator().manual_seed(seed))
    models = []
    for i in range(slots):
        torch.manual_seed(seed * 100_003 + i)
        models.append(spec.make())
    mb = ModelBatch(models, device="cpu")
    make_fused, _ = fused_step.OPTIMIZERS["adam"]
    engine = FusedEngine(mb, make_fused(mb, [1e-3] * slots, False), spec.loss_fn)
    return (lambda: engine.train_step(x, y)), mb


def parameters_apart(a: list[torch.Tensor], b: list[torch.Tensor]) -> str:
    """``"bitwise"`` where both lists hold the same bits, else their largest difference relative to its
    parameter's largest value, as ``"1.2e-07"``: on some CPUs two exact forms of a kernel round apart (MKL's
    batched GEMM on AMD, session 46), where on others they give the same bits."""
    if all(torch.equal(x, y) for x, y in zip(a, b)):
        return "bitwise"
    return f"{max(float((x - y).abs().max() / y.abs().max().clamp_min(1e-30)) for x, y in zip(a, b)):.1e}"


def alternating_steps(name: str, slots: int, rounds: int,
                      switch: Callable[[bool], None]) -> tuple[float, float, str]:
    """Median ms per fused step of ``name``'s stack with ``switch(False)`` and with ``switch(True)`` in effect
    (each way its own stack, alternating in one process, each round the median of 5 steps), and how far apart
    both ways leave the parameters after 3 steps: ``"bitwise"`` (the same bits), else the largest difference
    relative to its parameter's largest value. Leaves ``switch(True)`` in effect."""
    built = {}
    for way in (False, True):
        switch(way)
        step, mb = fused_stack_of(name, slots)
        for _ in range(3):
            step()
        built[way] = (step, [p.detach().clone() for p in mb.parameters()])
    same = parameters_apart(built[False][1], built[True][1])
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(rounds):
        for way in (False, True):
            switch(way)
            times[way].append(rgb_cnn.timed(built[way][0], 5) * 1e3)
    switch(True)
    return statistics.median(times[False]), statistics.median(times[True]), same


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="transformer", choices=sorted(fused_step.SPECS))
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3, help="steps timed op by op")
    ap.add_argument("--top", type=int, default=30, help="rows of the table")
    args = ap.parse_args()
    step = fused_step_of(args.model, args.slots)
    for _ in range(3):
        step()
    plain = []
    for _ in range(7):
        start = time.perf_counter()
        step()
        plain.append(time.perf_counter() - start)
    timer = time_ops(step, args.steps)
    total = sum(timer.seconds.values()) / args.steps
    ops = sum(timer.calls.values()) / args.steps
    print(f"# {args.model}, {args.slots} slots, {torch.get_num_threads()} threads: "
          f"step {statistics.median(plain) * 1e3:.1f} ms (median of 7), ops timed one by one {total * 1e3:.1f} ms "
          f"({ops:.0f} aten calls per step, {args.steps} steps)\n")
    print("| ms per step | share | calls | op | issued at |")
    print("| ---: | ---: | ---: | --- | --- |")
    for (op, where), sec in timer.seconds.most_common(args.top):
        print(f"| {sec / args.steps * 1e3:.2f} | {sec / args.steps / total:.1%} | "
              f"{timer.calls[(op, where)] / args.steps:g} | {op} | {where} |")


if __name__ == "__main__":
    main()
