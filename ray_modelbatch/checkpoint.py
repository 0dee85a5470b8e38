"""A slot's checkpoint: plain tensors and plain types, readable with ``torch.load(weights_only=True)``.

A trial's checkpoint holds one slot: the model's ``state_dict`` (the keys a
fresh instance of the model class loads), the optimizer's per-slot state
and step count, the loss scaler's scale, and the data stream's position.
Everything in it is a tensor, a number, a string, a list or a dict, so
``torch.load``'s safe default loads it, and nothing in it names a Python
class: a checkpoint saved from ``__main__.ConvNet`` restores into the same
architecture imported from ``mymodels.ConvNet``. What decides whether it fits
is the model's tensors (names, shapes, dtypes), listed under ``"signature"``.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .errors import IncompatibleModelsError, TrialConfigError

FORMAT = 2
STATE_FILE = "slot_state.pt"  # the file a trial's checkpoint directory holds
CONFIG_FILE = "trial_config.json"  # the trial's config, beside it, to rebuild the model
CONFIG_PICKLE = "trial_config.pkl"  # ... pickled, where JSON cannot hold it exactly (a class, a tuple)


def plain(obj: Any) -> Any:
    """``obj`` with tensors on the CPU and every other value a plain type (dataclasses become dicts)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {"type": type(obj).__name__, **{f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}}
    if isinstance(obj, Mapping):
        return {str(k) if not isinstance(k, (int, str)) else k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)  # inf/nan as "inf"/"nan": plain JSON-able types
    return repr(obj)


def to_bytes(state: Mapping[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **plain(state)}, buf)
    return buf.getvalue()


def from_bytes(blob: bytes, device: torch.device | str = "cpu") -> dict[str, Any]:
    """The checkpoint's contents, loaded with ``weights_only=True`` (no code runs while loading)."""
    return torch.load(io.BytesIO(blob), map_location=device, weights_only=True)


def read(checkpoint: Any) -> dict[str, Any]:
    """The contents of a trial checkpoint: a ``tune.Checkpoint``, its directory, or the state file itself."""
    if hasattr(checkpoint, "as_directory"):  # a tune.Checkpoint, maybe on remote storage: a local copy
        with checkpoint.as_directory() as local:
            return read(local)
    if not isinstance(checkpoint, (str, os.PathLike)):
        raise TypeError(f"expected a tune.Checkpoint (result.checkpoint) or a path; got {type(checkpoint).__name__}")
    path = os.fspath(checkpoint)
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    file = os.path.join(path, STATE_FILE) if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise FileNotFoundError(f"{file} does not exist: the path is not a checkpoint of a ray_modelbatch trial "
                                "(give result.checkpoint, or a checkpoint_00000N directory of the trial).")
    with open(file, "rb") as f:
        state = from_bytes(f.read())
    state["optimizer_per_param"] = per_parameter(state)
    if "config" not in state:
        state.update(_saved_config(directory))
    return state


def _saved_config(directory: str) -> dict[str, Any]:
    """``{"config": ...}`` as the trial saved it beside the checkpoint (``{}`` if it did not): the pickled copy
    where there is one (unpickled as Tune unpickles its ``params.pkl``: load checkpoints you trust), else the
    JSON, marked ``config_from_json`` (see :func:`build_model`)."""
    pickled = os.path.join(directory, CONFIG_PICKLE)
    if os.path.exists(pickled):
        import pickle

        try:
            with open(pickled, "rb") as f:
                return {"config": pickle.load(f)}
        except Exception:  # noqa: BLE001 - e.g. a class that no longer imports: the JSON copy below
            pass
    as_json = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(as_json):
        return {}
    import json

    with open(as_json) as f:
        return {"config": json.load(f), "config_from_json": True}


def _same_kind(exc: Exception, message: str) -> Exception:
    """An exception of ``exc``'s type with ``message`` (a RuntimeError where that type takes other arguments)."""
    try:
        return type(exc)(message)
    except Exception:  # noqa: BLE001 - a constructor with other arguments
        return RuntimeError(message)


def per_parameter(state: Mapping[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
    """The optimizer's per-parameter state by parameter name (``{"0.weight": {"exp_avg": ...}}``), as
    ``torch.optim`` keeps it: cut out of the stack's flat per-dtype buffers with the saved layout."""
    layout = state.get("optimizer_layout") or {}
    opt = state.get("optimizer") or {}
    if "parts" in opt:  # a model trained in parts: one optimizer (and layout) per part
        out = {}
        for part, part_state in opt["parts"].items():
            out.update(per_parameter({"optimizer": part_state, "optimizer_layout": layout.get(part, {})}))
        return out
    flat = opt.get("state") or {}
    out: dict[str, dict[str, torch.Tensor]] = {}
    for dtype, entries in layout.items():
        for name, offset, shape in entries:
            size = int(torch.Size(shape).numel())
            out[name] = {k: v[offset: offset + size].view(shape) for k, v in flat.get(dtype, {}).items()}
    return out


def check_fits(state: Mapping[str, Any], signature: list[str]) -> None:
    """Raise a one-line error when a checkpoint was saved from another architecture."""
    theirs = state.get("signature", [])
    if list(theirs) == list(signature):
        return
    diff = next((f"{a} vs {b}" for a, b in zip(theirs, signature) if a != b), None)
    if diff is None:
        diff = f"{len(theirs)} tensors saved, {len(signature)} in this model"
    raise IncompatibleModelsError(
        f"checkpoint was saved from another architecture ({diff}). A checkpoint restores only into a model "
        "with the same tensors; build it from the same config (keep shape-changing keys out of PBT's mutations)."
    )


def build_model(model_factory: Callable[[Mapping[str, Any]], nn.Module], state: Mapping[str, Any],
                config: Mapping[str, Any] | None = None) -> nn.Module:
    """The trial's ``nn.Module``: ``model_factory(config)`` with the checkpoint's weights, in eval mode."""
    config = state.get("config") if config is None else config
    if config is None:
        raise ValueError("this checkpoint has no trial config (it predates trial_config.json); pass "
                         "load_model(checkpoint, config=result.config).")
    saved = config is state.get("config")
    try:
        model = model_factory(config)
    except Exception as exc:
        if not saved or "config_from_json" not in state:
            raise
        message = (f"building the model from the checkpoint's saved config {config!r} failed ({type(exc).__name__}: "
                   f"{exc}); that config was read from {CONFIG_FILE}, which holds classes, tuples and numpy numbers "
                   "only as text. Fix: load_model(checkpoint, config=result.config).")
        raise (TrialConfigError(message) if isinstance(exc, KeyError) else _same_kind(exc, message)) from exc
    model.load_state_dict(state["model"])
    return model.eval()
