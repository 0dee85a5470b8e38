"""MKL's batched GEMM into the flat gradient buffer's strided views against torch's GEMM per slot, side by side.

Why: a stacked weight's gradient view is strided across slots, so torch's
``bmm`` runs one GEMM per slot into it; ``ray_modelbatch.strided_gemm``
writes it with one batched call (see there). This benchmark times both ways
in one process, alternating, on two levels:

- the weight-gradient GEMM alone, over a grid of shapes (slots, weight,
  batch), on 1 and 2 threads (``fast_path`` takes the batched call on more
  than one thread from ``STRIDED_GEMM_MIN_SLOTS`` slots);
- whole fused steps of ``fused_step.py``'s families whose weights reach
  ``fast_path.DIRECT_WRITE_MIN`` elements (``op_time.fused_stack_of``).

Both ways give the same parameters to the bit (checked after the steps).

    python benchmarks/strided_gemm.py [--rounds 5] [--models mlp_784] [--slots 32,128] [--grid-slots 8,16,32,128]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fused_step  # noqa: E402
import op_time  # noqa: E402
import rgb_cnn  # noqa: E402

from ray_modelbatch import fast_path, strided_gemm  # noqa: E402

GRID_SLOTS = (8, 16, 32, 128)
GRID_WEIGHTS = ((256, 256), (256, 784), (512, 512), (2048, 10))
GRID_BATCHES = (16, 64)


def _median_ms(fn: Callable[[], object], reps: int) -> float:
    return rgb_cnn.timed(fn, reps) * 1e3


_MIN_SLOTS = fast_path.STRIDED_GEMM_MIN_SLOTS


def _ways(use_mkl: bool) -> None:
    """Switch write_weight_grad between MKL's batched GEMM (from its usual slot count) and torch's per-slot GEMMs."""
    fast_path.STRIDED_GEMM_MIN_SLOTS = _MIN_SLOTS if use_mkl else 1 << 30


def gemm_grid(threads: int, rounds: int, slot_counts: tuple[int, ...] = GRID_SLOTS) -> list[tuple]:
    """Per shape: median ms of torch's per-slot GEMMs into the strided view and of one batched call."""
    torch.set_num_threads(threads)
    rows = []
    for slots, (out_f, in_f), batch in itertools.product(slot_counts, GRID_WEIGHTS, GRID_BATCHES):
        flat = torch.zeros(slots, out_f * in_f + 300)
        view = flat[:, :out_f * in_f].unflatten(1, (out_f, in_f))
        gt = torch.randn(slots, batch, out_f).transpose(1, 2)
        hs = torch.randn(batch, in_f).expand(slots, batch, in_f)
        per_slot, batched = [], []
        for _ in range(rounds):
            per_slot.append(_median_ms(lambda: torch.bmm(gt, hs, out=view), 5))
            batched.append(_median_ms(lambda: strided_gemm.bmm_into(view, gt, hs), 5))
        a, b = statistics.median(per_slot), statistics.median(batched)
        rows.append((threads, slots, f"{out_f}x{in_f}", batch, a, b, a / b))
    return rows


def fused_steps(name: str, slots: int, rounds: int) -> tuple[float, float, str]:
    """Median ms per fused step with torch's per-slot GEMMs and with MKL's batched one (alternating in one
    process, each way its own stack), and how far apart both ways leave the parameters after 3 steps."""
    return op_time.alternating_steps(name, slots, rounds, _ways)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--models", default="mlp_784")
    ap.add_argument("--slots", default="32,128")
    ap.add_argument("--grid-slots", default=",".join(map(str, GRID_SLOTS)), help="slot counts of the GEMM grid")
    ap.add_argument("--no-grid", action="store_true")
    args = ap.parse_args()
    if not strided_gemm.available():
        print("this torch carries no MKL batched GEMM: nothing to compare")
        return
    print(f"- command: `python benchmarks/strided_gemm.py {' '.join(sys.argv[1:])}`".rstrip())
    print(fused_step.machine(torch.device("cpu")))
    print(f"- medians of {args.rounds} alternating rounds (each the median of 5 calls)")
    if not args.no_grid:
        print("\n| threads | slots | weight | batch | torch per-slot ms | batched ms | per-slot / batched |")
        print("|---:|---:|---|---:|---:|---:|---:|")
        ratios = {}
        for threads in (1, 2):
            for row in gemm_grid(threads, args.rounds, tuple(int(v) for v in args.grid_slots.split(","))):
                ratios.setdefault((threads, row[1] >= _MIN_SLOTS), []).append(row[-1])
                print("| %d | %d | %s | %d | %.3f | %.3f | %.2fx |" % row, flush=True)
        for (threads, many), r in sorted(ratios.items()):
            kept = "fast_path takes the batched call" if many and threads > 1 else "fast_path keeps torch's"
            print(f"- {threads} thread(s), {'>=' if many else '<'} {_MIN_SLOTS} slots ({kept}): "
                  f"{min(r):.2f}-{max(r):.2f}x, median {statistics.median(r):.2f}x")
    torch.set_num_threads(2)
    print("\n| family | slots | torch per-slot ms/step | batched ms/step | per-slot / batched | same parameters |")
    print("|---|---:|---:|---:|---:|---|")
    for name in args.models.split(","):
        for slots in (int(s) for s in args.slots.split(",")):
            a, b, same = fused_steps(name, slots, args.rounds)
            print(f"| {name} | {slots} | {a:.1f} | {b:.1f} | {a / b:.2f}x | {same} |", flush=True)


if __name__ == "__main__":
    main()
