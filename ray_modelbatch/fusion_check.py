"""Turn torch.vmap failures into errors that name the module, the op and the fix.

vmap's own messages point at functorch internals. A sweep user needs to know
*which layer* of their model broke fusion and what to change, so we re-run the
failing call with module hooks that record where execution was.
"""

from __future__ import annotations

import contextlib
import linecache
import os
import re
import warnings
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .errors import FusionError, FusionWarning, InputShapeError

_FALLBACK_RE = re.compile(r"batching rule for (aten::\w+(?:\.\w+)*)", re.IGNORECASE)
_NOT_IMPL_RE = re.compile(r"Batching rule not implemented for (aten::\w+(?:\.\w+)*)")
_SHAPE_RE = re.compile(r"Expected size|cannot be multiplied|size mismatch|must match the size|expected input|"
                       r"Given groups=|Expected .*dimensional input|shape .* is invalid for input")

# (pattern in vmap's message, what happened, what to do)
# torch's words for an input whose dtype is not the parameters' (Linear, conv, matmul; the direct path's kernels)
_DTYPE_RE = re.compile(r"expected scalar type \w+ but found \w+|must have the same dtype|"
                       r"Input type \(.*\) and (?:weight|bias) type \(.*\) should be the same")
_KNOWN = [
    (
        ".item()",
        "calls .item() (or float()/int() on a tensor) inside forward",
        "keep the value as a tensor, e.g. use torch.where or tensor arithmetic instead of a Python number",
    ),
    (
        "data-dependent control flow",
        "uses a tensor's value in Python control flow (if/while/assert on a tensor) inside forward",
        "replace the branch with tensor ops such as torch.where, or decide it from the config outside forward",
    ),
    (
        "dynamic shape",
        "uses an op whose output shape depends on the data (e.g. nonzero, masked_select, unique)",
        "use a fixed-shape form such as torch.where with a mask instead",
    ),
    (
        "inplace arithmetic",
        "writes in place into a tensor that is shared across slots (e.g. a plain tensor attribute, not a registered buffer)",
        "register the tensor as a buffer (module.register_buffer) so each slot gets its own copy, or avoid the in-place op",
    ),
    (
        "different inplace randomness on an unbatched tensor",
        "fills a tensor made inside it with random numbers in place (e.g. torch.zeros(n).normal_()), and one "
        "such tensor cannot hold each slot's own draw",
        "draw a new tensor instead, e.g. torch.randn(n) or torch.randn_like(x) (each slot draws its own numbers "
        "from its generator), or fill a tensor made from the slot's values, e.g. torch.empty_like(x).normal_()",
    ),
]


@contextlib.contextmanager
def track_modules(root: nn.Module) -> Iterator[list[str]]:
    """Yield a live stack of the qualified names of the modules currently executing."""
    stack: list[str] = []
    handles = []
    for name, mod in root.named_modules():
        label = name or "<root>"
        handles.append(mod.register_forward_pre_hook(lambda m, a, _l=label: stack.append(_l) and None))
        handles.append(mod.register_forward_hook(lambda m, a, o: stack.pop() and None if stack else None))
    try:
        yield stack
    finally:
        for h in handles:
            h.remove()


def _describe(root: nn.Module, path: str) -> str:
    if path == "<root>":
        return f"the model's own forward ({type(root).__name__})"
    return f"module '{path}' ({type(root.get_submodule(path)).__name__})"


def explain_failure(root: nn.Module, exc: BaseException, rerun: Callable[[], Any],
                    outside: str | None = None, loss: str | None = None,
                    batch: str | None = None, labels: str | None = None,
                    slots: int | None = None) -> FusionError | InputShapeError:
    """Build a FusionError for ``exc`` by re-running the call under module tracking.

    ``outside`` names the code around the model (a user's step function), for
    failures that happen while no module of the model runs; ``loss`` names the
    loss function, for failures after the forward (the labels, most often).
    ``batch`` and ``labels`` describe one model's input and labels, and
    ``slots`` is how many models run fused: torch's messages count them as a
    first dimension.
    """
    where, out_shape, out_other = None, [], []  # what the forward returned: a tensor's shape, or another type

    def record(m: nn.Module, a: Any, o: Any) -> None:
        if isinstance(o, torch.Tensor):
            out_shape.append(tuple(o.shape))
        else:
            fields = [k for k in o.keys()] if isinstance(o, dict) else []  # a Hugging Face ModelOutput is a dict
            out_other.append((type(o).__name__,
                              f"a {type(o).__name__}" + (f" (fields: {', '.join(map(str, fields))})" if fields else "")))

    hook = root.register_forward_hook(record)
    finished: list[str] = []  # leaf modules whose forward returned before the failure
    leaves = [m.register_forward_hook(lambda m, a, o, _n=n: finished.append(_n) and None)
              for n, m in root.named_modules() if n and not any(True for _ in m.children())]
    try:
        with track_modules(root) as stack:
            try:
                rerun()
            except Exception:  # the same failure, now with the stack filled in
                where = stack[-1] if stack else None
    finally:
        hook.remove()
        for h in leaves:
            h.remove()
    msg = str(exc)
    first = msg.strip().splitlines()[0].rstrip(".") if msg.strip() else "(no message)"
    counted = (f" (torch's shapes count the {slots} fused models as a first dimension)"
               if slots and re.search(r"\[\d|size \d|dimension \d", first) else "")
    if where is None and loss is not None and out_shape:  # the forward ran: the loss failed on its output
        return InputShapeError(
            f"The loss {loss} failed on one model's output and its labels: {first}{counted}. One model's output "
            f"has shape {list(out_shape[-1])}; its labels: {labels or 'unknown'}. Fix: give labels that fit "
            "this loss and output (for cross_entropy: int64 class indices in [0, number of outputs), or "
            "probabilities of the output's shape), or make the model output what the loss expects."
        )
    if where is None and loss is not None and out_other and out_other[-1][0] in msg:  # the error names the type
        return FusionError(
            f"The loss {loss} failed on the model's output, {out_other[-1][1]}, not a tensor: {first}. The forward "
            "ran. Fix: give the loss the tensor it wants, e.g. loss=lambda out, y: F.cross_entropy(out.logits, y), "
            "or return the model's own loss from a step function (step_fn(model, batch, config) returning "
            "model(**inputs).loss; see FusedEngine)."
        )
    location = _describe(root, where) if where else (outside or f"the forward of {type(root).__name__}")
    inside = "inside the step" if where is None and outside else "inside forward"
    if _SHAPE_RE.search(msg):
        if where is not None and finished and where not in finished and not list(root.get_submodule(
                where if where != "<root>" else "").children()):
            # a layer after others: its input is what the model computed, so the model does not fit together
            return _input_error(location, f"the output of the layers before it ('{finished[-1]}' last)",
                                f"{first}{counted}", batch,
                                "make the model's layers fit each other: check the sizes the layers before it "
                                "produce (a size written as a number where it should follow the config, e.g. "
                                "nn.Linear(32, ...) after a layer of config['hidden'] outputs), or the input's "
                                "shape if those layers only reshape it", about="layers")
        return _input_error(location, "its input", f"{first}{counted}", batch,
                            "pass a batch shaped as one model expects ([B, ...], or [S, B, ...] with per_slot=True "
                            "for one batch per slot); if one model alone fails on such a batch too, the model "
                            "itself needs the fix")
    if _DTYPE_RE.search(first):
        return _input_error(location, "its input's dtype", first, batch,
                            "give the batch the models' parameter dtype (x.float() for float32 models; 8-bit images "
                            "as x.float() / 255), or convert the models (model.double()) before stacking them",
                            about="dtype")
    for needle, what, fix in _KNOWN:
        if needle in msg:
            return FusionError(
                f"Cannot fuse {location}: it {what.replace('inside forward', inside)}. torch.vmap runs all slots "
                f"as one computation, so this is not allowed. Fix: {fix}. (vmap said: {first})"
            )
    m = _NOT_IMPL_RE.search(msg)
    if m:
        return FusionError(
            f"Cannot fuse {location}: op {m.group(1)} has no vmap batching rule. Fix: replace it with "
            f"an equivalent op that vmap supports, or train this model without fusion."
        )
    if isinstance(exc, FusionError):  # this library's own line (e.g. slot_dropout's): it already names the fix
        return exc
    if _raised_by_user(exc):  # the user's own raise or assert: their exception, as they wrote it
        exc.add_note(f"(ray_modelbatch: raised in {location}, run once for {slots or 'all'} fused models under "
                     "torch.vmap)")
        return exc
    if where is None and outside:  # in the user's step, between the model's calls: most often a plain bug there
        return FusionError(
            f"{location[0].upper()}{location[1:]} raised {type(exc).__name__} outside the model's layers, run "
            f"under torch.vmap for the fused models: {first}{counted}. Most often this is a bug in that function "
            "or a config value it cannot take: run it on one model alone to see. If it runs fine alone, fix: keep "
            "it a pure function of its inputs (no Python side effects, no reading tensor values in Python). The "
            "original exception is chained below."
        )
    return FusionError(
        f"{location[0].upper()}{location[1:]} raised {type(exc).__name__} in the fused (torch.vmap) forward: "
        f"{first}{counted}. If the model runs fine alone, fix: make forward a pure function of its parameters, "
        "buffers and inputs (no Python side effects, no reading tensor values in Python); otherwise fix the "
        "model itself. The original exception is chained below."
    )


def _input_error(location: str, what: str, said: str, batch: str | None, fix: str,
                 about: str = "shape") -> InputShapeError:
    """One line for a batch the model cannot take: where, torch's words, one model's input, the fix.

    ``about`` says what did not fit, for callers that add advice of their own: ``"shape"`` (the batch's),
    ``"dtype"`` (the batch's), or ``"layers"`` (the model's layers do not fit each other)."""
    error = InputShapeError(f"{location[0].upper()}{location[1:]} failed on {what}: {said}. "
                            + (f"One model's input: {batch}. " if batch else "") + f"Fix: {fix}.")
    error.about = about
    return error


_LIBRARIES = (os.path.dirname(torch.__file__), os.path.dirname(os.path.abspath(__file__)))


def _raised_by_user(exc: BaseException) -> bool:
    """Whether ``exc`` comes from a ``raise`` or ``assert`` statement of the user's own code (a step function,
    a model's forward), not from torch or this library: such an exception keeps its type, since advice on
    fusing cannot help with it. (An op's error from torch's C++ has the user's calling line innermost, which
    is not a raise.)"""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = os.path.abspath(tb.tb_frame.f_code.co_filename)
    if filename.startswith(_LIBRARIES):
        return False
    return linecache.getline(filename, tb.tb_lineno).lstrip().startswith(("raise", "assert"))


def run_first_call(root: nn.Module, call: Callable[[], Any]) -> Any:
    """Run ``call`` once while turning vmap's slow-fallback warnings into named FusionWarnings."""
    with warnings.catch_warnings(record=True) as caught, track_modules(root) as stack:
        warnings.simplefilter("always")
        blame: dict[int, str] = {}
        seen = 0

        def note(*_):
            nonlocal seen
            for i in range(seen, len(caught)):
                blame.setdefault(i, stack[-1] if stack else "<root>")
            seen = len(caught)

        hooks = [m.register_forward_hook(lambda *a: note(), prepend=True) for m in root.modules()]
        try:
            out = call()
        finally:
            for h in hooks:
                h.remove()
        note()
    for i, w in enumerate(caught):
        m = _FALLBACK_RE.search(str(w.message))
        if m:
            warnings.warn(
                f"{_describe(root, blame.get(i, '<root>'))} uses {m.group(1)}, which has no vmap batching "
                "rule: torch runs it as a slow per-slot loop, so fusion gains less. Replace the op with "
                "one vmap supports for full speed.",
                FusionWarning,
                stacklevel=3,
            )
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return out
