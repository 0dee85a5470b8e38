"""The most a fused step can gain over a loop of the same models with torch's kernels, by class of op.

Why: ``fused_step.py``'s kernel bound divides the loop's whole step by the fused
step's GEMMs, convolutions and attention alone, as if everything else in the
fused step (pooling, normalization, activations, softmax, the optimizer) could
vanish. It cannot: the loop runs those ops too, and the fused step runs them on
tensors S times larger, which on a CPU often leave the caches the loop's
per-model tensors stay in. This times both steps op by op (``op_time.OpTimer``),
sorts every aten call into a class (GEMM, convolution, pooling, normalization,
...), and compares the fused step's time in each class with the loop's for the
same S models. The fused-only data movement (copies, gathers, views, ``cat``)
is the fused path's own overhead: counted as removable. Then::

    hybrid bound = loop / sum over classes of min(fused, loop)

is what a fused step could reach if each class ran in the faster of the two
forms and the fused step moved no data of its own: with torch's kernels on
this machine, no arrangement of the step does better. A family whose hybrid
bound is under a target cannot meet it here; one above it shows which classes
hold it back.

A class is the op's name, or the layer module that issued it where the two
steps implement a layer with different ops (a recurrent layer, GroupNorm,
BatchNorm, attention: :data:`ISSUERS`); an optimizer's ``step`` files all its
calls under ``optimizer``. Where the sorting is unsure it errs toward a higher
bound: ops counted as movement (``where``, ``masked_fill``) are dropped from
the fused step however real their work, and a layer written among others in
``fast_path`` stays with its ops' classes, which the loop's per-model layer may
beat. (Until session 49 the channels-last BatchNorm was written in
``fast_path``: its scale and shift, three ``addcmul`` passes, counted as
elementwise work and the small ResNet's bound read about 10% high.)

The fused step runs on the process's torch threads, the loop on those or on
one thread, whichever is faster (as in ``fused_step.py``); both on one shared
batch, with Adam (the fused step ``ray_modelbatch.optim.Adam``, the loop
``torch.optim.Adam`` per model); the loop times ``--loop-models`` of the S
models and is scaled to S. The plain steps are timed in alternating rounds;
each step's op-by-op times are scaled to its plain time (see :func:`by_class`).
On a shared machine both steps' times move by 20% or more from run to run:
take the median of a few runs.

    python benchmarks/fusion_bound.py --models cnn_gn,cnn,transformer --slots 32
"""

from __future__ import annotations

import argparse
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fused_step  # noqa: E402
import op_time  # noqa: E402

from ray_modelbatch.optim.base import VectorOptimizer  # noqa: E402

# Class of an aten op, by name: first match wins. "movement" is data the fused path moves for itself.
# Attention is one class with the GEMMs: the loop's models call torch's fused attention kernel, while the
# fused step's attention is batched GEMMs (small_attention), so either form's products land in it.
CLASSES: list[tuple[str, str]] = [
    ("gemm and attention", r"^(mm|addmm|bmm|baddbmm|matmul|linear|_addmm_activation|addbmm|dot|mv|addmv)$"
                           r"|^ray_modelbatch\.strided_bmm_$"  # MKL's batched GEMM into gradient views (strided_gemm)
                           r"|scaled_dot_product|_efficient_attention|_flash_attention"),
    ("convolution", r"conv|im2col|col2im|mkldnn_convolution"),
    ("pooling", r"pool"),
    ("normalization", r"norm|batch_norm"),
    ("softmax and loss", r"softmax|nll_loss|cross_entropy|log_softmax"),
    ("recurrent", r"lstm|gru|rnn"),
    ("embedding", r"embedding"),
    ("movement", r"^(clone|copy_|_copy_from|cat|stack|index|index_select|index_add_?|index_copy_?|index_put_?|"
                 r"index_fill_?|gather|scatter|scatter_add_?|slice|select|view|_unsafe_view|as_strided|unsqueeze|"
                 r"squeeze|transpose|t|permute|reshape|expand|contiguous|_to_copy|to|empty|empty_like|"
                 r"empty_strided|new_empty|new_empty_strided|zero_|zeros|zeros_like|fill_|ones|ones_like|"
                 r"new_zeros|new_ones|detach|alias|split|split_with_sizes|unbind|narrow|flatten|unflatten|"
                 r"lift_fresh|_reshape_alias|masked_fill_?|where|clamp_min|repeat|roll|flip|constant_pad_nd|"
                 r"_local_scalar_dense|item|resize_|set_)$"),
]
OTHER = "elementwise and reductions"
# A layer's own code, whichever ops it issues: the fused step runs a recurrent layer as GEMMs and gate math
# (unrolled_rnn) where the loop calls torch's recurrent kernel, and its GroupNorm as BatchNorm passes and
# addcmul (channels_last_group_norm) where the loop calls torch's GroupNorm.
ISSUERS: dict[str, str] = {
    "unrolled_rnn.py": "recurrent", "direct_rnn.py": "recurrent", "per_slot_rnn.py": "recurrent",
    "small_attention.py": "gemm and attention", "direct_attention.py": "gemm and attention",
    "vmap_attention.py": "gemm and attention", "channels_last_group_norm.py": "normalization",
    "channels_last_batch_norm.py": "normalization",
    "batched_normalizations.py": "normalization", "stacked_layer_norm.py": "normalization",
}


OPTIMIZER = "optimizer"


class ClassTimer(op_time.OpTimer):
    """:class:`op_time.OpTimer` that files every call made inside an optimizer's ``step`` under ``optimizer``:
    torch's Adam on CPU updates with plain elementwise ops, the fused one with other ops, so only the
    caller tells the update apart from the model's own work."""

    depth = 0  # optimizer steps running now (see time_classes)

    def key(self, func) -> tuple[str, str]:  # noqa: ANN001 - an OpOverload
        return (OPTIMIZER, "") if ClassTimer.depth else super().key(func)


def _tagged(step):  # noqa: ANN001, ANN202 - wraps an optimizer's step method
    def run(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        ClassTimer.depth += 1
        try:
            return step(*args, **kwargs)
        finally:
            ClassTimer.depth -= 1
    return run


def time_classes(step, steps: int) -> ClassTimer:  # noqa: ANN001 - a step function
    """Run ``step`` ``steps`` times under a :class:`ClassTimer`, both optimizers' ``step`` tagged meanwhile."""
    timer = ClassTimer()
    originals = [(cls, cls.step) for cls in (torch.optim.Adam, VectorOptimizer)]
    for cls, step_method in originals:
        cls.step = _tagged(step_method)
    try:
        with timer:
            for _ in range(steps):
                step()
    finally:
        for cls, step_method in originals:
            cls.step = step_method
    return timer


def op_class(op: str, issuer: str = "?") -> str:
    """The class of aten op ``op`` (its overload packet's name, e.g. ``"convolution_backward"``) issued at
    ``issuer`` (``file:line``, see ``op_time``): a layer's own module first (:data:`ISSUERS`), then the op's
    name; movement stays movement wherever it is issued."""
    if op == OPTIMIZER:
        return OPTIMIZER
    by_name = next((name for name, pattern in CLASSES if re.search(pattern, op)), OTHER)
    by_issuer = ISSUERS.get(issuer.split(":")[0])
    return by_issuer if by_issuer is not None and by_name != "movement" else by_name


def by_class(timer: op_time.OpTimer, plain_s: float) -> dict[str, float]:
    """Seconds per step in each class of op, scaled so that they sum to the step's plain time ``plain_s``.

    Timing each call adds a few microseconds to it, so the op-by-op sums read
    high, the loop's (S times the calls) more than the fused step's. Scaling
    each step's classes alike takes that out of the ratios between the two
    steps. Most of the added time falls on the many small calls, so the scaled
    loop keeps a little too much in its small-op classes and too little in its
    large kernels: its large kernels then look faster than they are, and the
    bound errs upward.
    """
    out: dict[str, float] = {}
    for (op, issuer), sec in timer.seconds.items():
        cls = op_class(op, issuer)
        out[cls] = out.get(cls, 0.0) + sec
    total = sum(out.values())
    return {c: sec / total * plain_s for c, sec in out.items()}


def loop_step_of(name: str, models: int, seed: int = 0):  # noqa: ANN201 - a step function
    """One plain step of each of ``models`` models of family ``name`` (``torch.optim.Adam`` each), in turn."""
    spec = fused_step.SPECS[name]
    x, y = spec.batch(torch.Generator().manual_seed(seed))
    nets, opts = [], []
    for i in range(models):
        torch.manual_seed(seed * 100_003 + i)
        nets.append(spec.make())
        opts.append(torch.optim.Adam(nets[-1].parameters(), lr=1e-3))

    def step() -> None:
        for m, o in zip(nets, opts):
            fused_step.loop_step(m, o, spec.loss_fn, x, y)

    return step


def plain_times(steps: dict, rounds: int = 5) -> dict[str, float]:  # noqa: ANN001 - name -> (threads, step)
    """Median seconds of each of ``steps`` (``name -> (torch threads, step function)``), timed in alternating
    rounds after two warm-up calls each: a slow phase of a shared machine then falls on every step alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for name, (threads, step) in steps.items():
        _on_threads(threads, step)
        _on_threads(threads, step)
    for _ in range(rounds):
        for name, (threads, step) in steps.items():
            times[name].append(_on_threads(threads, lambda: _timed(step)))
    return {name: statistics.median(t) for name, t in times.items()}


def _timed(step) -> float:  # noqa: ANN001 - a step function
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def measure(name: str, slots: int, loop_models: int, steps: int) -> dict:
    """Both steps' plain times and their op classes' times (the loop's scaled to ``slots`` models)."""
    fused = op_time.fused_step_of(name, slots)
    loop = loop_step_of(name, loop_models)
    threads = torch.get_num_threads()
    t = plain_times({"fused": (threads, fused), "loop": (threads, loop), "loop_1t": (1, loop)})
    loop_threads = threads if t["loop"] <= t["loop_1t"] else 1
    t_fused, t_loop = t["fused"], min(t["loop"], t["loop_1t"]) * slots / loop_models
    return {"name": name, "fused_s": t_fused, "loop_s": t_loop, "loop_threads": loop_threads,
            "fused": by_class(time_classes(fused, steps), t_fused),
            "loop": by_class(_on_threads(loop_threads, lambda: time_classes(loop, steps)), t_loop)}


def _on_threads(n: int, fn):  # noqa: ANN001, ANN202 - runs fn on n torch threads
    """``fn()`` on ``n`` torch threads (the count restored after): the loop runs on whichever of the
    process's count and one thread is faster, as ``fused_step.py``'s loop does."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def hybrid_bound(r: dict) -> float:
    """The loop's time over the sum, by class, of the faster form's time, without the fused step's movement."""
    fused, loop = r["fused"], r["loop"]
    best = sum(min(fused.get(c, 0.0), loop.get(c, 0.0)) for c in set(fused) | set(loop) if c != "movement")
    return r["loop_s"] / best


def report(results: list[dict], slots: int, loop_models: int, target: float) -> str:
    lines = [f"# The most fusion gains with torch's kernels, by class of op ({slots} slots)", "",
             f"- command: `python {' '.join(sys.argv)}`",
             f"- machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
             f"fused step on {torch.get_num_threads()} threads; the loop timed on {loop_models} models, scaled to "
             f"{slots}", ""]
    lines += ["| family | fused ms | loop ms (threads) | loop / fused | hybrid bound | target |",
              "| --- | ---: | ---: | ---: | ---: | --- |"]
    for r in results:
        hybrid = hybrid_bound(r)
        verdict = "out of reach with torch's kernels" if hybrid < target else "within the bound"
        lines.append(f"| {r['name']} | {r['fused_s'] * 1e3:.1f} | {r['loop_s'] * 1e3:.1f} ({r['loop_threads']}) | "
                     f"{r['loop_s'] / r['fused_s']:.2f}x | **{hybrid:.2f}x** | {target:g}x: {verdict} |")
    for r in results:
        fused, loop = r["fused"], r["loop"]
        lines += ["", f"{r['name']}: ms per step by class of op (timed op by op, scaled to the step's plain time; "
                  "the fused step's movement counts as removable in the bound)", "", "| class | fused ms | loop ms | loop / fused |",
                  "| --- | ---: | ---: | ---: |"]
        for c in sorted(set(fused) | set(loop), key=lambda c: -max(fused.get(c, 0.0), loop.get(c, 0.0))):
            f, lp = fused.get(c, 0.0) * 1e3, loop.get(c, 0.0) * 1e3
            lines.append(f"| {c} | {f:.1f} | {lp:.1f} | {lp / f:.2f}x |" if f > 0 else f"| {c} | 0 | {lp:.1f} | - |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="cnn_gn,cnn,transformer,bert,lstm,gpt2",
                    help=f"comma-separated families of fused_step.py ({','.join(sorted(fused_step.SPECS))})")
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--loop-models", type=int, default=8, help="models the loop times (scaled to --slots)")
    ap.add_argument("--steps", type=int, default=2, help="steps timed op by op, each way")
    ap.add_argument("--target", type=float, default=2.0, help="the fused / loop target (issue 13: 2x at 32 slots)")
    ap.add_argument("--out", default=None, help="also write the report here")
    args = ap.parse_args()
    results = []
    for name in args.models.split(","):
        results.append(measure(name, args.slots, min(args.loop_models, args.slots), args.steps))
        print(f"  {name}: fused {results[-1]['fused_s'] * 1e3:.1f} ms, loop {results[-1]['loop_s'] * 1e3:.1f} ms",
              flush=True)
    text = report(results, args.slots, min(args.loop_models, args.slots), args.target)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
