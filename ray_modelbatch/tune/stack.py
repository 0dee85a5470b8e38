"""One fused stack inside a slot host: the trials whose models share a signature.

A stack owns a ModelBatch, its optimizer, per-slot data streams and the
engine, and maps slots to trial IDs. It grows geometrically when full, hands
freed slots to new trials, and (de)serializes one slot's complete state for
Tune checkpoints. It never talks to Ray: the host decides what runs when.
"""

from __future__ import annotations

import io
import logging
import zlib
from dataclasses import fields
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..amp import SlotGradScaler
from ..data import PerSlotStreams, SharedStream
from ..engine import FusedEngine, StepResult
from ..errors import FusionError, IncompatibleModelsError, InputShapeError, OutOfDeviceMemoryError, is_out_of_memory
from ..model_batch import ModelBatch
from ..signature import module_signature
from .spec import SlotSpec

CHECKPOINT_FORMAT = 1

logger = logging.getLogger(__name__)


def _simple_attrs(module: nn.Module) -> tuple:
    """Plain Python settings of a module (e.g. Dropout.p, an activation name) that shape its forward."""
    out = []
    for k, v in sorted(vars(module).items()):
        if k.startswith("_") or k == "training":
            continue
        if isinstance(v, (bool, int, float, str, type(None))) or (
            isinstance(v, tuple) and all(isinstance(e, (bool, int, float, str)) for e in v)
        ):
            out.append((k, v))
    return tuple(out)


def stack_key(model: nn.Module) -> str:
    """A key that is equal exactly when two models can share one fused stack.

    Tensor shapes and dtypes are not enough: two configs may give equal shapes
    but different forwards (another activation, another dropout rate), and a
    stack runs one forward for all its slots. So the key also covers the module
    tree and each module's plain settings.
    """
    structure = [(name, type(m).__qualname__, _simple_attrs(m)) for name, m in model.named_modules()]
    text = repr((type(model).__module__, module_signature(model), structure))
    return f"{type(model).__name__}-{zlib.crc32(text.encode()):08x}"


class Stack:
    """Trials of one model signature trained as one ModelBatch.

    Args:
        spec: the trainable's spec.
        first: the first trial's model (built under its seed).
        data: ``(x_train, y_train, x_val, y_val)`` on the host's device.
        limit: the most slots this stack may grow to.

    Attributes:
        max_chunk: the most slots one fused step runs at once; None means all
            of them. Set (halved) when a step runs out of device memory, and
            kept, so later steps run their slots in chunks of this size.
    """

    def __init__(self, spec: SlotSpec, key: str, first: nn.Module, data: tuple, limit: int, device: torch.device):
        self.spec, self.key, self.limit = spec, key, limit
        self.x, self.y, self.x_val, self.y_val = data
        self.mb = ModelBatch([first], device=device, cpu_gemm=spec.cpu_gemm)
        self.mb.deactivate(0)
        self._validate()
        self.opt = spec.optimizer(self.mb)
        fp16 = spec.autocast_dtype == torch.float16
        self.scaler = SlotGradScaler(self.mb) if fp16 else None
        self.engine = FusedEngine(self.mb, self.opt, spec.loss, scaler=self.scaler, autocast_dtype=spec.autocast_dtype)
        if spec.data_mode == "per_slot":
            self.streams: Any = PerSlotStreams(self.x, self.y, spec.batch_size, seeds=[0])
        else:
            self.streams = SharedStream(self.x, self.y, spec.batch_size, seed=0)
        self.owner: dict[int, str] = {}
        self.max_chunk: int | None = None

    @classmethod
    def build_for_profile(
        cls,
        spec: SlotSpec,
        model_factory: Callable[[], nn.Module],
        data: tuple,
        device: torch.device | str,
        hparams: Mapping[str, Any] | None = None,
    ) -> Callable[[int], Callable[[], None]]:
        """A ``build(S)`` for :func:`ray_modelbatch.capacity.profile_capacity`.

        ``build(S)`` makes a stack of S slots the way a host does (same
        ModelBatch, optimizer, engine, data streams and growth) and returns a
        function running one fused train step over all S slots on a real
        ``spec.batch_size`` batch plus one evaluation on the validation data.
        That step has no out-of-memory fallback: profiling must see the true
        peak. ``hparams`` (e.g. ``spec.hparams(config)``) matter when they
        allocate optimizer state (SGD momentum, AMSGrad).
        """
        device = torch.device(device)
        hp = dict(hparams or {})

        def build(slots: int) -> Callable[[], None]:
            model = model_factory()
            stack = cls(spec, stack_key(model), model, data, slots, device)
            for i in range(slots):
                stack.add(f"profile-{i}", model, seed=i, hparams=hp)
            everyone = list(range(slots))

            def run() -> None:
                stack._step(everyone, *stack.streams.next_batch(everyone))
                stack.evaluate(everyone)

            return run

        return build

    def _validate(self) -> None:
        """Run forward and loss once on two validation rows, so a model that cannot be fused, or
        that does not fit ``data()``'s inputs or labels, fails here: at attach, for its own trial."""
        was = self.mb.training
        self.mb.eval()
        try:
            with torch.no_grad():
                try:
                    out = self.mb(self.x_val[:2])
                except InputShapeError as exc:
                    raise InputShapeError(
                        f"{exc} The batches come from data(): x_val[:2] has shape {tuple(self.x_val[:2].shape)}; "
                        "make the config's model take inputs of that shape, or reshape the data in data()."
                    ) from None
                try:
                    self.mb.forward_loss(self.x_val[:2], self.y_val[:2], self.spec.loss)
                except (InputShapeError, FusionError) as exc:
                    cause = exc.__cause__ or exc
                    raise InputShapeError(
                        f"the loss {getattr(self.spec.loss, '__name__', self.spec.loss)!r} failed on the model's "
                        f"output: {type(cause).__name__}: {cause}. One model's output has shape "
                        f"{tuple(out.shape[1:])}; the labels of data() (y_val[:2]) have shape "
                        f"{tuple(self.y_val[:2].shape)} and dtype {self.y_val.dtype}. Fix: make the config's "
                        "model output what the loss expects for these labels (e.g. one logit per class)."
                    ) from exc
        finally:
            self.mb.train(was)

    @property
    def capacity(self) -> int:
        return self.mb.num_slots

    @property
    def used(self) -> int:
        return len(self.owner)

    def _free_slot(self) -> int:
        for i in range(self.capacity):
            if i not in self.owner:
                return i
        if self.capacity >= self.limit:
            raise RuntimeError(f"stack {self.key} is full ({self.capacity} slots)")
        old = self.capacity
        new = min(self.limit, max(2 * old, 4))
        self.mb.resize(new)
        if isinstance(self.streams, PerSlotStreams):
            self.streams.resize(new)
        return old

    def add(self, trial_id: str, model: nn.Module, seed: int, hparams: Mapping[str, Any]) -> int:
        """Give ``trial_id`` a free slot holding ``model`` with its hyperparameters; return the slot."""
        slot = self._free_slot()
        self.mb.reset_slot(slot, model)
        self.opt.set_hparams(slot, **hparams)
        if self.scaler is not None:
            self.scaler._on_reset(slot)
        if isinstance(self.streams, PerSlotStreams):
            self.streams.reset_slot(slot, seed)
        self.owner[slot] = trial_id
        self.mb.activate(slot)
        return slot

    def remove(self, slot: int) -> None:
        """Free a slot at once: masked out of every later step."""
        self.mb.deactivate(slot)
        self.owner.pop(slot, None)

    # ------------------------------------------------------------------ work
    def _step(self, slots: list[int], xb: torch.Tensor, yb: torch.Tensor) -> StepResult:
        return self.engine.train_step(xb, yb, slots=slots, per_slot=isinstance(self.streams, PerSlotStreams))

    def train_step(self, slots: list[int]) -> StepResult:
        """One step for each of ``slots``; results are aligned with ``slots``.

        When the fused step runs out of device memory, the same slots run again
        as consecutive chunks of half the size (down to one slot), on the same
        batches: the streams advanced once, and the engine left every slot as it
        was. Each slot's math is independent of the others', so a chunked step
        gives each slot the result the full step would have (models with dropout
        draw other random numbers).
        """
        xb, yb = self.streams.next_batch(slots)  # once: a retry must reuse these rows
        if not slots:
            return self._step(slots, xb, yb)
        per_slot = isinstance(self.streams, PerSlotStreams)
        parts: list[StepResult] = []
        start = 0
        while start < len(slots):
            size = len(slots) - start if self.max_chunk is None else min(self.max_chunk, len(slots) - start)
            end = start + size
            chunk = (xb[start:end], yb[start:end]) if per_slot else (xb, yb)
            try:
                parts.append(self._step(slots[start:end], *chunk))
                start = end
                continue
            except BaseException as exc:
                if not is_out_of_memory(exc):
                    raise
                partial = self.engine.partial_step  # the update had begun: a retry would apply it twice
                if size == 1 or partial:
                    if size > 1:
                        self._shrink(size)  # later steps still benefit
                    raise self._out_of_memory(len(slots), size, partial) from exc
            # Retry outside the except block, so the traceback no longer holds the failed step's tensors.
            if self.mb.device.type == "cuda":
                torch.cuda.empty_cache()
            self._shrink(size)
        return parts[0] if len(parts) == 1 else _concat(parts)

    def _shrink(self, failed: int) -> None:
        """Halve the chunk size after a step of ``failed`` slots ran out of memory; say so once."""
        self.max_chunk = (failed + 1) // 2
        logger.warning(
            "stack %s ran out of memory on %s in a fused step of %d slots; from now on it runs at most %d "
            "slots per fused step (same results per slot, slower). Fewer slots_per_host avoids this.",
            self.key, self.mb.device, failed, self.max_chunk,
        )

    def _out_of_memory(self, requested: int, failed: int, partial: bool) -> OutOfDeviceMemoryError:
        if partial:
            what = (f"in the optimizer update of a fused step of {failed} slot(s), which may have left them "
                    "partly updated, so the step cannot be retried")
        else:
            what = "even when running one slot per fused step"
        return OutOfDeviceMemoryError(
            f"stack {self.key} ran out of memory on {self.mb.device} {what} ({self.used} slots attached, "
            f"{requested} in this step). Fix: a smaller batch_size or model, fewer slots_per_host, or a "
            "device with more memory."
        )

    def evaluate(self, slots: list[int]) -> dict[str, list[float]]:
        res = self.engine.evaluate(self.x_val, self.y_val, self.spec.metrics, slots=slots,
                                   batch_size=self.spec.eval_batch_size)
        return {k: v.tolist() for k, v in res.items()}

    # ----------------------------------------------------------- checkpoints
    def export(self, slot: int) -> bytes:
        """Everything a slot needs to continue elsewhere, as bytes (proxies stay torch-free)."""
        state = {
            "format": CHECKPOINT_FORMAT,
            "stack_key": self.key,
            "signature": [s.describe() for s in self.mb.signature],
            "model": {k: v.cpu() for k, v in self.mb.slot_state(slot).items()},
            "optimizer": _to_cpu(self.opt.slot_state(slot)),
            "scaler": None if self.scaler is None else self.scaler.slot_state(slot),
            "stream": self.streams.slot_state(slot) if isinstance(self.streams, PerSlotStreams) else None,
        }
        buf = io.BytesIO()
        torch.save(state, buf)
        return buf.getvalue()

    def load(self, slot: int, blob: bytes, hparams: Mapping[str, Any]) -> None:
        """Restore a slot from :meth:`export` bytes, then apply this trial's own hyperparameters."""
        state = torch.load(io.BytesIO(blob), map_location=self.mb.device, weights_only=False)
        if state.get("stack_key") != self.key:
            mine = [s.describe() for s in self.mb.signature]
            theirs = state.get("signature", [])
            diff = next((f"{a} vs {b}" for a, b in zip(theirs, mine) if a != b), "module structure differs")
            raise IncompatibleModelsError(
                f"checkpoint was saved from another model signature ({diff}). A checkpoint restores only into "
                "a trial whose config builds the same architecture; keep shape-changing keys out of "
                "PBT's hyperparameter mutations."
            )
        self.mb.load_slot(slot, state["model"])
        self.opt.load_slot_state(slot, state["optimizer"], hparams=False)
        self.opt.set_hparams(slot, **hparams)
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_slot_state(slot, state["scaler"])
        if isinstance(self.streams, PerSlotStreams) and state.get("stream") is not None:
            self.streams.load_slot_state(slot, state["stream"])


def _concat(parts: list[StepResult]) -> StepResult:
    """One StepResult from the results of consecutive chunks of slots, in their order."""
    return StepResult(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(StepResult)})


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    return obj
