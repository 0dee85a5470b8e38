"""One fused stack inside a slot host: the trials whose models share a signature.

A stack owns a ModelBatch, its optimizer, per-slot data streams and the
engine, and maps slots to trial IDs. It grows geometrically when full, hands
freed slots to new trials, and (de)serializes one slot's complete state for
Tune checkpoints. It never talks to Ray: the host decides what runs when.
"""

from __future__ import annotations

import io
import zlib
from typing import Any, Mapping

import torch
from torch import nn

from ..amp import SlotGradScaler
from ..data import PerSlotStreams, SharedStream
from ..engine import FusedEngine
from ..errors import IncompatibleModelsError
from ..model_batch import ModelBatch
from ..signature import module_signature
from .spec import SlotSpec

CHECKPOINT_FORMAT = 1


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
    """

    def __init__(self, spec: SlotSpec, key: str, first: nn.Module, data: tuple, limit: int, device: torch.device):
        self.spec, self.key, self.limit = spec, key, limit
        self.x, self.y, self.x_val, self.y_val = data
        self.mb = ModelBatch([first], device=device)
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

    def _validate(self) -> None:
        """Run the fused forward once on two validation rows so an unfusable model fails here, alone."""
        was = self.mb.training
        self.mb.eval()
        try:
            with torch.no_grad():
                self.mb(self.x_val[:2])
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
    def train_step(self, slots: list[int]):
        xb, yb = self.streams.next_batch(slots)
        return self.engine.train_step(xb, yb, slots=slots, per_slot=isinstance(self.streams, PerSlotStreams))

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


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    return obj
