"""``check_model``: before a sweep, see how a model fuses, what falls back, and what fusion gains.

A model fuses in one of two ways (see :mod:`ray_modelbatch.fast_path`): the
direct path (batched GEMMs, grouped convolutions, stacked norms, embedding
lookups, attention on the slots folded into the batch) when every step of its
forward has such a kernel, else ``torch.vmap``. The report names each layer's
direct kernel (the step kind that computes it: a layer inside an
``nn.TransformerEncoder`` is computed by the encoder's). Under vmap, an op
without a batching rule runs as a per-slot loop (a ``FusionWarning``), and
some forwards cannot be fused at all (a ``FusionError``). Finding that out in the middle of a sweep costs a
sweep; one call here shows it on one example batch, with the measured time of
a fused training step against a loop of the same models with ``torch.optim``.
"""

from __future__ import annotations

import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from . import fast_path, inputs, slot_agreement
from .errors import FusionError, FusionWarning
from .model_batch import ModelBatch, copy_model
from .slot_agreement import Agreement


@dataclass
class ModelReport:
    """What :func:`check_model` found. ``str(report)`` is a short table."""

    model: str
    slots: int
    path: str  # "direct", "vmap" or "cannot fuse"
    layers: list[tuple[str, str]] = field(default_factory=list)  # (module name, type) of the leaf modules
    # (module name, how it runs) of the leaf modules: the direct path's step kind ("linear", "embedding",
    # "encoder", ...; "unused" if the forward does not call it), or "vmap"
    kinds: list[tuple[str, str]] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)  # ops vmap runs as a per-slot loop
    why_vmap: str | None = None  # what keeps the model off the direct path (fast_path.why_not), on the vmap path
    error: str | None = None
    fused_ms: float | None = None  # one fused training step of every slot
    loop_ms: float | None = None  # the same step, one model after the other with torch.optim.Adam
    # the lowest and highest loop/fused ratio of the alternating rounds: how much the machine's noise moved it
    speedup_range: tuple[float, float] | None = None
    # fused slots against their models alone on the example batch (see slot_agreement); None if not compared
    agreement: Agreement | None = None
    agreement_error: str | None = None  # why the comparison could not run

    @property
    def speedup(self) -> float | None:
        return self.loop_ms / self.fused_ms if self.fused_ms and self.loop_ms else None

    def __str__(self) -> str:
        lines = [f"{self.model}: {self.path} path, {self.slots} slots"]
        if self.error:
            lines.append(f"  cannot fuse: {self.error}")
        if self.why_vmap and self.path == "vmap":
            lines.append(f"  not on the direct path: {self.why_vmap}")
        how = dict(self.kinds)
        for name, kind in self.layers:
            step = how.get(name, "vmap")
            lines.append(f"  {name or '<root>':<32} {kind:<24} {self.path if step == 'vmap' else 'direct: ' + step}")
        for f in self.fallbacks:
            lines.append(f"  per-slot loop: {f}")
        if self.agreement is not None:
            lines.append(f"  {self.agreement}")
            if not self.agreement.agrees:
                meanwhile = (" (ray_modelbatch.ModelBatch(models, direct_path=False) runs it on torch.vmap "
                             "meanwhile)" if self.path == "direct" else "")
                lines.append("  the stack computes other numbers than this model does alone: please report it with "
                             f"the model{meanwhile}")
        elif self.agreement_error:
            lines.append(f"  fused vs alone not compared: {self.agreement_error}")
        if self.speedup is not None:
            spread = (f"; {self.speedup_range[0]:.2f}-{self.speedup_range[1]:.2f}x in single rounds"
                      if self.speedup_range else "")
            lines.append(f"  training step: fused {self.fused_ms:.2f} ms, loop {self.loop_ms:.2f} ms, medians of "
                         f"alternating rounds ({self.speedup:.2f}x the loop{spread})")
        return "\n".join(lines)


def _alternating_ms(fns: Sequence[Callable[[], Any]], repeats: int) -> list[list[float]]:
    """Each function's times in ms over ``repeats`` rounds, run in turn within each round after one warm-up
    call (first-call checks, allocations): a busy spell of a shared machine then slows both sides of a
    round, not one side's whole measurement (one-sided runs of a small CNN read 0.4x to 25x the loop)."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            start = time.perf_counter()
            fn()
            out.append((time.perf_counter() - start) * 1e3)
    return times


def _default_loss(out: Any, _: Any) -> torch.Tensor:
    """The model's own loss where its output carries one (a Hugging Face model given ``labels``), else the
    mean square of its (first) output: any differentiable number times every parameter will do for timing."""
    own = getattr(out, "loss", None)
    if isinstance(own, torch.Tensor):
        return own
    if not isinstance(out, torch.Tensor):  # a tuple, or an output object without a loss: its first tensor
        values = out.values() if hasattr(out, "values") else out
        out = next(v for v in values if isinstance(v, torch.Tensor))
    return out.float().pow(2).mean()


def _layer_kinds(plan: fast_path.FastPlan | None, names: list[str]) -> list[tuple[str, str]]:
    """How each leaf module runs: the kind of the direct step that calls it or the module holding it."""
    if plan is None:
        return [(n, "vmap") for n in names]
    steps = plan.kinds()

    def kind(name: str) -> str:
        while name not in steps and name:
            name = name.rpartition(".")[0]
        return steps.get(name, "unused")

    return [(n, kind(n)) for n in names]


def _initialize_lazy(model: nn.Module, example_input: Any) -> None:
    """A model with lazy modules (``nn.LazyLinear``, ...) learns its shapes from one forward on the example."""
    if any(nn.parameter.is_lazy(t) for t in [*model.parameters(), *model.buffers()]):
        with torch.no_grad():
            model(**example_input) if isinstance(example_input, dict) else model(example_input)


def check_model(model: nn.Module | Callable[[], nn.Module], example_input: Any, *, slots: int = 8,
                loss: Callable[[Any, Any], torch.Tensor] | None = None, target: Any = None,
                repeats: int = 5) -> ModelReport:
    """Fuse ``slots`` copies of ``model`` (or ``model()`` calls) on ``example_input`` and report how.

    The report says which path the stack takes and why, which ops vmap runs once per slot, whether the
    fused slots compute what their models compute alone (losses, outputs and gradients of a training step,
    outputs of an evaluation: :mod:`~ray_modelbatch.slot_agreement`), and a fused step's time against a loop.

    Args:
        model: a module (copied per slot) or a factory of modules.
        example_input: one batch as one model takes it: a tensor (``model(x)``) or a dict of keyword
            tensors (``model(**x)``, e.g. ``input_ids``, ``attention_mask`` and ``labels`` of a
            Hugging Face model, whose own loss is then the default).
        loss: ``loss(output, target)`` for the timed step (default: mean square of the output).
        target: the target ``loss`` gets (default: None).
        repeats: timed rounds, each one fused step and one loop step in turn (the medians are reported,
            and the range of the rounds' ratios).
    """
    factory = model if not isinstance(model, nn.Module) else (lambda: copy_model(model))
    models = [factory() for _ in range(slots)]
    for m in models:
        _initialize_lazy(m, example_input)
    name = type(models[0]).__name__
    leaves = [(n, type(m).__name__) for n, m in models[0].named_modules() if not list(m.children())]
    loss = loss or _default_loss
    try:
        mb = ModelBatch([copy_model(m) for m in models])
    except Exception as exc:  # noqa: BLE001 - reported, not raised: this is a check
        return ModelReport(name, slots, "cannot fuse", leaves, error=f"{type(exc).__name__}: {exc}")
    report = ModelReport(name, slots, "direct" if mb.uses_direct_path else "vmap", leaves)
    plan = mb._plan()  # the template's: LSTMs unrolled, embeddings with padding as the stack runs them
    from . import optim
    from .engine import FusedEngine

    with warnings.catch_warnings(record=True) as caught:  # every first call (eval, train) names its fallbacks
        warnings.simplefilter("always")
        try:
            with torch.no_grad():
                mb(example_input)  # a dict is the keyword inputs, as in a step
            engine = FusedEngine(mb, optim.Adam(mb, lr=1e-3), loss)
            engine.train_step(example_input, target)  # the first step names its fallbacks (timed below)
        except FusionError as exc:
            report.path, report.error = "cannot fuse", str(exc)
            return report
    report.fallbacks = sorted({str(w.message).split(", which has no vmap batching rule")[0] for w in caught
                               if issubclass(w.category, FusionWarning)})
    if mb._slow_keys:  # the plan exists, but the direct path refused these inputs at run time
        report.path, plan = "vmap", None
        report.why_vmap = "the direct path refused this input at run time (its shapes or layout)"
    elif plan is None:
        report.why_vmap = mb.why_vmap()
    report.kinds = _layer_kinds(plan, [n for n, _ in leaves])
    with warnings.catch_warnings():  # (the fallbacks were reported above)
        warnings.simplefilter("ignore")
        try:
            report.agreement = slot_agreement.compare(models, example_input, loss, target)
        except Exception as exc:  # noqa: BLE001 - reported, not raised: this is a check
            report.agreement_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    opts = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in models]

    def loop() -> None:
        for m, o in zip(models, opts):
            o.zero_grad()
            loss(inputs.call(m, example_input), target).backward()
            o.step()

    fused, looped = _alternating_ms([lambda: engine.train_step(example_input, target), loop], repeats)
    report.fused_ms, report.loop_ms = statistics.median(fused), statistics.median(looped)
    ratios = [b / a for a, b in zip(fused, looped) if a > 0]
    report.speedup_range = (min(ratios), max(ratios)) if len(ratios) > 1 else None
    return report
