"""Model signatures: the names, shapes and dtypes, and the settings, that decide whether models can share a stack.

Two models fuse only if every parameter and buffer matches. The signature is
cheap to compute (also for models built on the meta device) and hashable, so a
slot host can keep one stack per signature.

A stack runs one forward, its template's (slot 0's), for every slot, so two
models also share a stack only if every setting their forwards may read is
equal: each module's attributes that are not parameters, buffers or
submodules (a stored config dict, a dataclass of options, an activation
function with its closure, a plain tensor attribute). A dropout module's rate
is the exception: each slot keeps its own (:mod:`.slot_dropout`).
:func:`module_settings` gives them as process-independent keys, and
:func:`first_setting_mismatch` names the first that differs. Without this,
models that differ only in such a value (a Tune config kept as ``self.config``
is the common case) would train silently with slot 0's value.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import logging
import types
import zlib
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .errors import IncompatibleModelsError
from .slot_dropout import is_rate


@dataclass(frozen=True)
class TensorSpec:
    name: str
    kind: str  # "parameter" or "buffer"
    shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool

    def describe(self) -> str:
        grad = "" if self.kind == "buffer" else (", trainable" if self.requires_grad else ", frozen")
        return f"{self.kind} '{self.name}' shape {list(self.shape)} {str(self.dtype).replace('torch.', '')}{grad}"


Signature = tuple[TensorSpec, ...]


def module_signature(module: nn.Module) -> Signature:
    """Return the ordered parameter and buffer specs of ``module`` (tied tensors once)."""
    specs = [
        TensorSpec(n, "parameter", tuple(p.shape), p.dtype, p.requires_grad)
        for n, p in module.named_parameters()
    ]
    specs += [TensorSpec(n, "buffer", tuple(b.shape), b.dtype, False) for n, b in module.named_buffers()]
    return tuple(specs)


def first_mismatch(reference: Signature, other: Signature) -> str | None:
    """Describe the first difference between two signatures, or None if they match."""
    ref = {s.name: s for s in reference}
    oth = {s.name: s for s in other}
    for spec in reference:
        o = oth.get(spec.name)
        if o is None:
            return f"{spec.describe()} is missing"
        if o != spec:
            return f"{spec.describe()} differs: got {o.describe()}"
    for spec in other:
        if spec.name not in ref:
            return f"unexpected {spec.describe()}"
    return None


def check_compatible(modules: Iterable[nn.Module], what: str = "slot") -> Signature:
    """Raise :class:`IncompatibleModelsError` naming the first mismatch; return the shared signature."""
    modules = list(modules)
    if not modules:
        raise IncompatibleModelsError("ModelBatch needs at least one model; got an empty sequence.")
    reference = module_signature(modules[0])
    for i, m in enumerate(modules[1:], start=1):
        if type(m) is not type(modules[0]):
            raise IncompatibleModelsError(
                f"{what} {i} is a {type(m).__name__} but {what} 0 is a {type(modules[0]).__name__}; "
                "every model in one batch must be the same class. Put models of different classes "
                "in different ModelBatches."
            )
        problem = first_mismatch(reference, module_signature(m))
        if problem:
            raise IncompatibleModelsError(
                f"{what} {i} does not match {what} 0: {problem}. Models in one batch must have "
                "identical parameter and buffer shapes and dtypes; build them from the same "
                "architecture config, or give shape-changing hyperparameters their own batch."
            )
    return reference


def check_same_settings(modules: list[nn.Module], what: str = "slot") -> tuple:
    """Raise :class:`IncompatibleModelsError` naming the first setting in which a model differs from the
    first one (see the module docstring); return the first one's :func:`module_settings`."""
    reference = module_settings(modules[0])
    for i, m in enumerate(modules[1:], start=1):
        problem = first_setting_mismatch(reference, module_settings(m))
        if problem:
            raise IncompatibleModelsError(
                f"{what} {i} differs from {what} 0 in a setting its forward may read: {problem}. A stack runs "
                f"{what} 0's forward for every {what}, so they must share every attribute that is not a "
                "parameter or buffer. Put models with other settings in another ModelBatch (a slot host does "
                "this by itself), or make the value a parameter or buffer."
            )
    return reference


_PLAIN = (bool, int, float, complex, str, bytes, type(None))
_MAX_DEPTH = 6  # a setting nested deeper than this is keyed by its type only


def module_settings(model: nn.Module) -> tuple:
    """Every module's settings: ``((module path, attribute, key), ...)``, keys equal exactly when the values
    are (as far as can be told without running the forward: see :func:`setting_key`)."""
    memo: dict[int, Any] = {}
    out = []
    for path, module in model.named_modules():
        # torch's reparametrizations by hook (spectral_norm, weight_norm, prune) recompute a tensor attribute
        # from the slot's own parameters and buffers before each forward: the hook names it
        recomputed = {getattr(h, "name", None) for h in module._forward_pre_hooks.values()}
        for name, value in sorted(vars(module).items()):
            if name.startswith("_") or name == "training" or _computed(value, name in recomputed):
                continue
            if is_rate(module, name):  # a dropout rate is per slot (see slot_dropout): not a setting
                continue
            out.append((path, name, setting_key(value, memo)))
        for kind in MODULE_HOOKS:  # a hook is part of the forward (or backward): by its code and closure
            hooks = getattr(module, kind, None)
            if hooks:
                out.append((path, hook_kind(kind), setting_key(tuple(hooks.values()), memo)))
    return tuple(out)


MODULE_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


def hook_kind(attribute: str) -> str:
    """A module's hook dict by its readable name: ``"_forward_pre_hooks"`` -> ``"forward pre hooks"``."""
    return attribute.strip("_").replace("_", " ")


def gradient_hook(model: nn.Module) -> str | None:
    """The first parameter of ``model`` with a gradient hook (``Tensor.register_hook`` or
    ``register_post_accumulate_grad_hook``), or None.

    A stack trains new tensors, the slots' rows of one buffer, so a hook on a
    model's own parameter would never run: the slot would train without it.
    """
    for name, p in model.named_parameters():
        if p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None):
            return name
    return None


def _computed(value: Any, by_hook: bool) -> bool:
    """A tensor attribute computed from the parameters (a hook's, or one with a gradient graph): each slot's
    forward computes its own, so it is not a setting."""
    return isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) and (
        by_hook or value.requires_grad or value.grad_fn is not None)


def setting_key(value: Any, memo: dict[int, Any] | None = None, depth: int = 0) -> Any:
    """A hashable stand-in for a module's setting whose ``repr`` is the same in every process (no ids or
    addresses): plain values as they are; containers, dataclasses and objects by their contents; functions
    by their code, defaults and closure; tensors by dtype, shape and a checksum of their values."""
    if isinstance(value, _PLAIN):
        return value
    memo = {} if memo is None else memo
    if id(value) in memo:
        return memo[id(value)]
    if depth > _MAX_DEPTH:
        return ("deep", _type_name(value))
    memo[id(value)] = ("cycle", _type_name(value))  # a value that contains itself
    key = _key_of(value, memo, depth + 1)
    memo[id(value)] = key
    return key


def _key_of(value: Any, memo: dict[int, Any], depth: int) -> Any:
    def key(v: Any) -> Any:
        return setting_key(v, memo, depth)

    if isinstance(value, torch.Tensor):
        return ("tensor", str(value.dtype), tuple(value.shape), _checksum(value))
    if isinstance(value, (torch.dtype, torch.device, torch.Size, enum.Enum)):
        return repr(value)
    if isinstance(value, nn.Module):  # a registered submodule is keyed as part of the tree
        return ("module", _type_name(value))
    if isinstance(value, types.ModuleType):
        return ("python module", value.__name__)
    if isinstance(value, logging.Logger):  # its manager reaches every logger of the process
        return ("logger", value.name)
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(key(v) for v in value))
    if isinstance(value, Mapping):
        return ("dict", tuple(sorted((repr(k), key(v)) for k, v in value.items())))
    if isinstance(value, (set, frozenset)):
        return ("set", tuple(sorted(repr(key(v)) for v in value)))
    if isinstance(value, functools.partial):
        return ("partial", key(value.func), key(value.args), key(value.keywords))
    if isinstance(value, types.MethodType):
        owner = value.__self__
        return ("method", key(value.__func__), _type_name(owner) if isinstance(owner, nn.Module) else key(owner))
    if isinstance(value, types.FunctionType):
        cells = tuple(key(c.cell_contents) if _filled(c) else "empty" for c in (value.__closure__ or ()))
        return ("function", value.__module__, value.__qualname__, _code_key(value.__code__),
                key(value.__defaults__), key(value.__kwdefaults__), cells)
    if isinstance(value, type) or callable(value) and not hasattr(value, "__dict__"):  # builtins, classes
        return ("callable", getattr(value, "__module__", None) or "", getattr(value, "__qualname__", _type_name(value)))
    if type(value).__module__.startswith("transformers") and hasattr(value, "to_json_string"):  # a model config
        try:
            return ("config", _type_name(value), value.to_json_string(use_diff=False))
        except Exception:  # noqa: BLE001 - a config that cannot serialize: its fields below
            pass
    if dataclasses.is_dataclass(value):
        return ("dataclass", _type_name(value),
                tuple((f.name, key(getattr(value, f.name, None))) for f in dataclasses.fields(value)))
    if hasattr(value, "__dict__"):
        return ("object", _type_name(value),
                tuple((k, key(v)) for k, v in sorted(vars(value).items()) if not k.startswith("_")))
    slots = [n for c in type(value).__mro__ for n in getattr(c, "__slots__", ()) if not n.startswith("_")]
    if slots:
        return ("object", _type_name(value), tuple((n, key(getattr(value, n, None))) for n in sorted(set(slots))))
    return ("opaque", _type_name(value))


def _type_name(value: Any) -> str:
    t = type(value)
    return f"{t.__module__}.{t.__qualname__}"


def _filled(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises
        return True
    except ValueError:
        return False


def _code_key(code: types.CodeType) -> tuple:
    """A function's code, without the addresses that ``repr`` of nested code objects would carry."""
    consts = tuple(_code_key(c) if isinstance(c, types.CodeType) else repr(c) for c in code.co_consts)
    return (code.co_name, zlib.crc32(code.co_code), consts, code.co_names)


def _checksum(t: torch.Tensor) -> Any:
    """A tensor's values: themselves when few (a message can show them), else a checksum of them (None for
    a tensor without data, on the meta device)."""
    if t.device.type == "meta" or t.is_sparse:
        return None
    data = t.detach().cpu().contiguous()
    if data.numel() <= 16 and not data.is_complex():
        return tuple(data.reshape(-1).tolist())
    if data.dtype in (torch.bfloat16,) or data.is_complex():
        data = data.view(torch.uint8) if data.dim() else data.reshape(1).view(torch.uint8)
    return zlib.crc32(data.numpy().tobytes())


def first_setting_mismatch(reference: tuple, other: tuple) -> str | None:
    """Describe the first setting in which two :func:`module_settings` differ, or None if none does."""
    found = first_setting_difference(reference, other)
    return None if found is None else found[3]


def first_setting_difference(reference: tuple, other: tuple) -> tuple[str, str, Any, str] | None:
    """``(module path, attribute, its key in reference, description)`` of the first setting in which two
    :func:`module_settings` differ (the key None for an attribute only ``other`` has), or None if none does."""
    ref = {(p, n): k for p, n, k in reference}
    oth = {(p, n): k for p, n, k in other}
    for (path, name), k in ref.items():
        where = f"module '{path}'" if path else "the model"
        if (path, name) not in oth:
            return path, name, k, f"{where} has no attribute '{name}'"
        diff = _first_difference(k, oth[(path, name)])
        if diff is not None:
            at, mine, theirs = diff
            return path, name, k, f"{where}: {name}{at} is {_short(theirs)}, not {_short(mine)}"
    for (path, name) in oth:
        if (path, name) not in ref:
            return path, name, None, f"{f'module {path!r}' if path else 'the model'} has an extra attribute '{name}'"
    return None


def is_plain_setting(key: Any) -> bool:
    """Whether a :func:`setting_key` is a plain value (a number, a string...), not a container or object."""
    return isinstance(key, _PLAIN)


_PARTS = {"function": {3: " (its code)", 4: " (its defaults)", 5: " (its keyword defaults)", 6: " (its closure)"},
          "tensor": {1: " (dtype)", 2: " (shape)", 3: " (values)"}}


def _first_difference(a: Any, b: Any, at: str = "") -> tuple[str, Any, Any] | None:
    """Where two setting keys first differ (a readable path) and the two values there; None if equal."""
    if repr(a) == repr(b):
        return None
    if isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b) and a:
        tag = a[0] if isinstance(a[0], str) and a[0] == b[0] else None
        for i, (x, y) in enumerate(zip(a, b)):
            if repr(x) == repr(y):
                continue
            if tag == "dict":  # (("'key'", value), ...): name the entry
                for (kx, vx), (ky, vy) in zip(x, y):
                    if kx != ky:
                        return f"{at} (its keys)", [k for k, _ in x], [k for k, _ in y]
                    if repr(vx) != repr(vy):
                        return _first_difference(vx, vy, f"{at}[{kx}]")
            if tag in ("object", "dataclass") and i == 2:  # ((field, value), ...)
                for (kx, vx), (ky, vy) in zip(x, y):
                    if kx == ky and repr(vx) != repr(vy):
                        return _first_difference(vx, vy, f"{at}.{kx}")
            return _first_difference(x, y, at + _PARTS.get(tag, {}).get(i, ""))
    return at, a, b


def _short(key: Any, limit: int = 80) -> str:
    text = repr(key)
    return text if len(text) <= limit else text[:limit - 3] + "..."
