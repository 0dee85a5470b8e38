"""ModelBatch: S models of one architecture stacked into one vmapped computation.

Trainable parameters of each dtype live in one flat ``[S, P]`` buffer and the
public per-parameter tensors are leaf views of it; their ``.grad`` are views of
a matching flat gradient buffer. That layout is what lets the optimizers in
``ray_modelbatch.optim`` update every parameter of every slot with a handful of
elementwise kernels whose count does not depend on S.

Slots can be masked out (``active``), replaced (``load_slot``/``reset_slot``),
copied (``copy_slot``, for PBT) and the capacity can change while training goes
on (``resize``). Objects holding per-slot state (optimizers, loss scalers)
register with :meth:`ModelBatch.attach` and follow those changes.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, Union

import torch
from torch import nn
from torch.func import vmap
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils import _pytree as pytree

from . import (batched_normalizations, cumulative_batch_norm, fast_path, hf, inputs, mlp_step, padded_stacks,
               slot_losses, step_config, vmap_attention, wide_cross_entropy)
from .cpu_memory import keep_freed_memory
from .errors import FusionError, FusionWarning, IncompatibleModelsError, is_out_of_memory
from .fusion_check import explain_failure, run_first_call
from .signature import (check_compatible, check_same_settings, first_mismatch, first_setting_mismatch, gradient_hook,
                        module_settings, module_signature)
from .slot_clipping import StackedParameters
from .slot_dropout import SlotRates, rates_of
from .slot_random import Draws, SlotRandom, VmapRandom, vmap_body
from .stacked_embedding import dense_gradients, stack_embeddings
from .stacked_layer_norm import stack_layer_norms
from .unrolled_rnn import unroll_rnns
from .vector_math_init import start as _start_vector_math

_start_vector_math()  # before any step can make the first call on several threads (see vector_math_init)

Slots = Union[None, str, int, Sequence[int], torch.Tensor]

# Parameter views of a flat [S, P] buffer are strided by P, so autograd warns
# that their grads break DDP's bucket layout contract. That contract does not
# apply here: the grads are deliberately views of the flat gradient buffer.
warnings.filterwarnings("ignore", message="grad and param do not obey the gradient layout contract")


def _meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers live on the meta device, ties kept.

    ``module.to("meta")`` unties shared parameters (an LM head that shares the
    embedding's weight gets a weight of its own), and a stack built from the
    untied copy would compute with a tensor no slot holds. Copying with each
    tensor mapped to one meta tensor keeps every tie: the shared weight is
    stacked once and every module that uses it reads the same slot row.
    """
    memo: dict[int, Any] = {}
    for p in model.parameters():  # each shared tensor once
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    for t in _computed_attributes(model):
        memo[id(t)] = torch.empty_like(t, device="meta")
    return copy.deepcopy(model, memo)


def copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)`` that also copies models whose pre-hooks compute a tensor attribute
    (``nn.utils.weight_norm``, ``prune``: see :func:`_computed_attributes`), which deepcopy refuses."""
    return copy.deepcopy(model, {id(t): t.detach().clone() for t in _computed_attributes(model)})


def _computed_attributes(model: nn.Module) -> list[torch.Tensor]:
    """Tensor attributes that a forward pre-hook computes from parameters (not leaves of a graph).

    ``nn.utils.weight_norm`` and ``nn.utils.prune`` keep ``weight`` as such a
    tensor, recomputed from ``weight_g``/``weight_v`` (or ``weight_orig`` and
    its mask) before every forward. ``copy.deepcopy`` refuses tensors that are
    not leaves, so a copy maps them to placeholders; the hook overwrites them
    on the copy's first forward, from the slot's own parameters.
    """
    return [v for m in model.modules() for v in vars(m).values()
            if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter) and v.grad_fn is not None]


@dataclass
class FlatGroup:
    """All trainable parameters of one dtype: ``data``/``grad`` are ``[S, numel]``."""

    dtype: torch.dtype
    names: list[str] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    shapes: list[tuple[int, ...]] = field(default_factory=list)
    numel: int = 0
    data: torch.Tensor | None = None
    grad: torch.Tensor | None = None

    def add(self, name: str, shape: tuple[int, ...]) -> None:
        self.names.append(name)
        self.offsets.append(self.numel)
        self.shapes.append(shape)
        self.numel += int(torch.Size(shape).numel())

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        s = flat.shape[0]
        return {
            n: flat[:, o : o + int(torch.Size(sh).numel())].view(s, *sh)
            for n, o, sh in zip(self.names, self.offsets, self.shapes)
        }


def _buffer_owners(template: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """``(name, owning module, attribute)`` of every buffer of ``template``."""
    out = []
    for name, _ in template.named_buffers():
        path, _, leaf = name.rpartition(".")
        out.append((name, template.get_submodule(path), leaf))
    return out


@contextlib.contextmanager
def _swapped(template: nn.Module, owners: list[tuple[str, nn.Module, str]], params: dict[str, torch.Tensor],
             buffers: dict[str, torch.Tensor]) -> Iterator[dict[str, Any]]:
    """One slot's tensors in ``template`` (``functional_call``'s swap, tied weights kept) inside a vmapped call.

    Yields a dict that, on leaving, holds each buffer the forward reassigned
    (``self.ema = 0.9 * self.ema + ...``, where BatchNorm updates in place):
    the swap puts the slot's own tensors back on the way out, so without this
    the new value would be dropped and the slot would train on a stale buffer.
    """
    moved: dict[str, Any] = {}
    with vmap_body(), _reparametrize_module(template, {**params, **buffers}, tie_weights=True):
        yield moved
        for name, module, leaf in owners:
            now = module._buffers.get(leaf)
            if now is not buffers[name]:
                moved[name] = now


def _keep_reassigned(buffers: dict[str, torch.Tensor], moved: dict[str, Any]) -> None:
    """Write the buffers a vmapped forward reassigned into the stack's rows (see :func:`_swapped`)."""
    for name, value in moved.items():
        old = buffers[name]
        if not isinstance(value, torch.Tensor) or value.shape != old.shape or value.dtype != old.dtype:
            got = "None" if value is None else (f"a {type(value).__name__}" if not isinstance(value, torch.Tensor)
                                                else f"shape {list(value.shape[1:])} {value.dtype}")
            raise FusionError(f"the forward set buffer '{name}' to {got}, where it holds shape "
                              f"{list(old.shape[1:])} {old.dtype}: a stack keeps each buffer's shape and dtype. Fix: "
                              "keep the buffer's shape and dtype (or make the value a plain attribute).")
        with torch.no_grad():
            old.copy_(value)


def _one_model(x: Any, dim: int | None) -> Any:
    """One model's part of a fused call's input (``dim`` 0: one per slot; None: shared), for messages."""
    return x if dim is None else inputs.apply(lambda t: t[0], x)


def _describe_input(x: Any, dim: int | None) -> str | None:
    """One model's input for an error message (None where it cannot be described: the message goes without)."""
    try:
        return inputs.describe(_one_model(x, dim))
    except Exception:  # noqa: BLE001 - an error path: never hide the error being explained
        return None


def _describe_labels(y: Any, dim: int | None) -> str | None:
    """One model's labels for an error message: shape, dtype, and the range of integer class labels."""
    try:
        y = _one_model(y, dim)
        if not isinstance(y, torch.Tensor):
            return inputs.describe(y)
        return f"shape {list(y.shape)}, dtype {y.dtype}{inputs.value_range(y)}"
    except Exception:  # noqa: BLE001 - an error path: never hide the error being explained
        return None


def _refuse_lazy(index: int, model: nn.Module) -> None:
    """One line for a lazy module (``nn.LazyLinear``, ...) whose shapes are not known yet: nothing can be stacked."""
    for name, mod in model.named_modules():
        lazy = [n for n, t in [*mod.named_parameters(recurse=False), *mod.named_buffers(recurse=False)]
                if nn.parameter.is_lazy(t)]
        if lazy:
            raise IncompatibleModelsError(
                f"model {index}'s module '{name or type(model).__name__}' ({type(mod).__name__}) has uninitialized "
                f"parameters ({', '.join(lazy)}): a lazy module learns its shapes on its first forward. Fix: run "
                "each model once on an example batch before stacking it (ray_modelbatch.check_model does this "
                "with its example input), or give the layer its input size (e.g. nn.Linear(in_features, ...)).")

def _refuse_gradient_checkpointing(index: int, model: nn.Module) -> None:
    """One line for a Hugging Face model with gradient checkpointing on (``gradient_checkpointing_enable()``),
    or with the input hook that turning it on leaves behind (``enable_input_require_grads()``).

    Checkpointed layers run through ``torch.utils.checkpoint``, which recomputes them in the backward outside
    ``torch.vmap``; the hook calls ``requires_grad_`` on the embeddings' output inside it, and stays after
    ``gradient_checkpointing_disable()``. Either made the fused forward fail in vmap's words, which blamed the
    forward. The marks are HF's own: ``is_gradient_checkpointing`` (or ``gradient_checkpointing`` on a
    submodule such as ``BertEncoder``) and ``_require_grads_hooks``."""
    checkpointing = bool(getattr(model, "is_gradient_checkpointing", False)) or any(
        getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
    hooked = any(getattr(m, "_require_grads_hooks", None) for m in model.modules())
    if not (checkpointing or hooked):
        return
    what = ("gradient checkpointing on (gradient_checkpointing_enable())" if checkpointing else
            "Hugging Face's input-requires-grad hook (enable_input_require_grads(), left by gradient checkpointing)")
    fix = " and ".join([*(["model.gradient_checkpointing_disable()"] if checkpointing else []),
                        *(["model.disable_input_require_grads()"] if hooked else [])])
    raise IncompatibleModelsError(
        f"model {index} ({type(model).__name__}) has {what}: a fused stack cannot recompute layers in the backward "
        f"nor set requires_grad inside its forward. Fix: call {fix} before stacking (to use less memory, stack "
        "fewer slots, e.g. slots_per_host, or train under autocast_dtype=torch.bfloat16).")


class ModelBatch:
    """Stack ``models`` (identical structure) so that ``mb(x)`` runs all of them at once.

    Args:
        models: modules of the same class with identical parameter and buffer
            names, shapes and dtypes. Their current values become slots 0..S-1.
        device: where the stacked tensors live; defaults to the first model's device.
        direct_path: run models whose every layer has a direct batched kernel (Linear,
            convolutions, BatchNorm, LayerNorm, embeddings, attention, Transformer encoder
            layers, residual and elementwise ops: see :mod:`ray_modelbatch.fast_path`)
            without ``torch.vmap``; other models use vmap. False forces vmap, e.g. to compare.
        cpu_gemm: ``"blas"`` (default) runs the direct path's GEMMs with the
            kernels ``nn.Linear`` uses, so a slot matches a solo run bit for bit
            where the math allows. ``"onednn"`` runs large fp32 layers on CPU
            through oneDNN: faster where the BLAS does not use AVX-512 (MKL on
            AMD CPUs), fp32-accurate but not bitwise ``nn.Linear``'s.
        per_slot_random: each slot's dropout masks come from its own generator
            (``mb.random``, see :mod:`ray_modelbatch.slot_random`): a slot trains
            the same whatever runs beside it, and on the CPU draws the masks its
            model draws alone. False draws every slot's masks at once from torch's
            global generator: one draw per dropout instead of one per slot (fewer
            kernel launches on a GPU), but a slot's masks then depend on the stack.

    Hugging Face ``transformers`` models stack as they are: the stack's own copy
    builds attention masks for every slot, uses eager attention and no caches
    (see :mod:`ray_modelbatch.hf`); batches may be dicts of keyword inputs
    (``mb({"input_ids": ..., "attention_mask": ...})``, see :mod:`ray_modelbatch.inputs`).
    """

    def __init__(self, models: Sequence[nn.Module], device: torch.device | str | None = None,
                 direct_path: bool = True, cpu_gemm: str = "blas", per_slot_random: bool = True):
        if cpu_gemm not in fast_path.GEMMS:
            raise ValueError(f"cpu_gemm={cpu_gemm!r}: expected one of {fast_path.GEMMS}")
        if cpu_gemm == "onednn" and not fast_path.onednn_available():
            raise ValueError("cpu_gemm='onednn': this torch build has no oneDNN (mkldnn) fp32 linear kernel; "
                             "use cpu_gemm='blas'")
        self.cpu_gemm = cpu_gemm
        if isinstance(models, nn.Module):  # a Sequential iterates over its layers: name the slip, not a mismatch
            raise TypeError(f"ModelBatch takes a list of models, one per slot; got one {type(models).__name__}. "
                            "Fix: ModelBatch([model]) for one slot, or ModelBatch([make() for _ in range(S)]).")
        models = list(models)
        for i, m in enumerate(models):
            if not isinstance(m, nn.Module):
                raise TypeError(f"ModelBatch takes torch.nn.Module models; model {i} is "
                                f"{'None' if m is None else type(m).__name__}. Fix: pass the modules themselves "
                                "(a factory that builds one must return it).")
            _refuse_lazy(i, m)
            _refuse_gradient_checkpointing(i, m)
        self.signature = check_compatible(models)
        for i, m in enumerate(models):
            hooked = gradient_hook(m)
            if hooked:
                raise IncompatibleModelsError(
                    f"model {i}'s parameter '{hooked}' has a gradient hook (Tensor.register_hook): a stack trains "
                    "its own tensors, so the hook would never run. Fix: remove it; clip gradients with the "
                    "optimizer's max_grad_norm=, or change the loss in a train_step.")
        self._settings = check_same_settings(models)  # what the forward reads besides tensors (see signature)
        first = next(iter(models[0].state_dict().values()), None)
        self.device = torch.device(device) if device is not None else (
            first.device if first is not None else torch.device("cpu")
        )
        if self.device.type == "cpu":
            keep_freed_memory()
        template = unroll_rnns(_meta_copy(models[0]))  # LSTM/GRU kernels have no vmap rule: see unrolled_rnn
        dense_gradients(template)  # sparse gradients cannot be stacked: see stacked_embedding
        stack_embeddings(template)  # lookups in the stacked tables, padding rows out of the gradient: see there
        stack_layer_norms(template)  # the normalization in torch's faster CPU kernel under vmap: see there
        batched_normalizations.adapt(template)  # weight and spectral norms in ops vmap batches: see there
        cumulative_batch_norm.adapt(template)  # BatchNorm(momentum=None) with each slot's batch count
        # transformers models: masks built for every slot, no caches, attention vmap can batch, GPT-2's GELU as
        # one kernel (see hf)
        self._hf = hf.adapt(template)
        # each slot's own dropout rates: a searched rate does not split the stack (see slot_dropout)
        self.rates = SlotRates(models, template, held=lambda: self._active_cpu.tolist())
        self._module_class = type(models[0])
        self._state_keys = self._state_key_map(template)
        self._param_names = [n for n, _ in template.named_parameters()]
        self._trainable = {n for n, p in template.named_parameters() if p.requires_grad}
        self._buffer_names = [n for n, _ in template.named_buffers()]
        # Buffers outside the state_dict (persistent=False: a BERT's position_ids, rotary frequencies) are
        # derived from the config, so a state_dict cannot set them: see load_slot and resize.
        self._transient = [n for n in self._buffer_names if n not in set(self._state_keys.values())]
        # Embedding(max_norm=...) renormalizes the rows it looks up in place, in the forward: see forward_state
        self._renormed = [f"{path}.weight" if path else "weight" for path, m in template.named_modules()
                          if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.max_norm is not None
                          and m.weight.requires_grad]
        self._template = template
        self.training = models[0].training
        self._applied_mode: bool | None = None  # the mode train() last set on every submodule
        self._mode_modules: list[nn.Module] | None | bool = False  # see _plain_modes (False: not looked at yet)
        self._listeners: list[weakref.ref] = []
        self._vmapped: dict[tuple, Callable] = {}
        self._index_cache: dict[tuple, torch.Tensor] = {}
        self._checked: set[tuple] = set()
        # Linear + elementwise models skip vmap (see fast_path); None means vmap for everything.
        self._direct_path = direct_path
        self._plans: dict[bool, fast_path.FastPlan | None] = {}  # per train/eval mode; see _plan()
        self._mlp_chains: dict[Any, mlp_step.MlpChain | None] = {}  # by loss function; see mlp_train_step
        self._slow_keys: set[tuple] = set()  # calls the direct path could not take
        self._grads_into_buffer = False  # see gradients_into_buffer()
        self.gradless: tuple[str, ...] = ()  # trainable parameters the last backward gave no gradient: sync_grads

        s = len(models)
        self._groups: dict[torch.dtype, FlatGroup] = {}
        for name, spec in ((t.name, t) for t in self.signature if t.kind == "parameter"):
            if name in self._trainable:
                self._groups.setdefault(spec.dtype, FlatGroup(spec.dtype)).add(name, spec.shape)
        for g in self._groups.values():
            g.data = torch.zeros(s, g.numel, dtype=g.dtype, device=self.device)
            g.grad = torch.zeros_like(g.data)
        self._frozen = {
            n: torch.stack([dict(m.named_parameters())[n].detach() for m in models]).to(self.device)
            for n in self._param_names
            if n not in self._trainable
        }
        self.buffers: dict[str, torch.Tensor] = {
            n: torch.stack([dict(m.named_buffers())[n].detach() for m in models]).to(self.device)
            for n in self._buffer_names
        }
        self.active = torch.ones(s, dtype=torch.bool)
        # A padded stack (see padded_stacks): slots whose models are narrower than the stack, by slot, their
        # own shapes of the tensors that are padded (by canonical name); None for a slot at the stack's shapes.
        # Loading a narrower model needs padding=True, which its SlotGroup sets once it checked that padding
        # is exact for the model (padded_stacks.check).
        self.own_sizes: list[dict[str, tuple[int, ...]] | None] = [None] * s
        self.padding = False
        sized = padded_stacks.sized_settings(models[0])
        self._unsized = tuple(x for x in self._settings if (x[0], x[1]) not in sized)
        # Each slot's own generator for its forward's dropout: see slot_random. Seeded per row here;
        # set a slot's state with mb.random.set_state(i, slot_random.global_state(device)) after building
        # its model under its seed, and it draws the masks that model draws alone.
        self.random = SlotRandom(s, self.device)
        self.per_slot_random = bool(per_slot_random)
        self._build_leaves()
        self._check_rates()
        with torch.no_grad():
            for i, m in enumerate(models):
                self._write_params(i, dict(m.named_parameters()))

    # ------------------------------------------------------------------ layout
    @staticmethod
    def _state_key_map(module: nn.Module) -> dict[str, str]:
        """Map each ``state_dict`` key to the canonical (deduplicated) tensor name."""
        canonical = {id(p): n for n, p in module.named_parameters()}
        canonical.update({id(b): n for n, b in module.named_buffers()})
        return {k: canonical[id(v)] for k, v in module.state_dict(keep_vars=True).items() if id(v) in canonical}

    def _build_leaves(self) -> None:
        params: dict[str, torch.Tensor] = {}
        self._grad_views: dict[str, torch.Tensor] = {}
        for g in self._groups.values():
            grads = g.views(g.grad)
            for name, p in g.views(g.data).items():
                p.requires_grad_(True)
                p.grad = grads[name]
                params[name] = p
                self._grad_views[name] = grads[name]
        self._grad_targets = {n: fast_path.GradTarget(params[n], v) for n, v in self._grad_views.items()}
        params.update(self._frozen)
        self.params: dict[str, torch.Tensor] = {n: params[n] for n in self._param_names}
        self._refresh_active()

    def _write_params(self, i: int, values: Mapping[str, torch.Tensor]) -> None:
        for n in self._param_names:
            self.params[n][i].copy_(values[n].detach())

    @property
    def groups(self) -> dict[torch.dtype, FlatGroup]:
        """Flat ``[S, P]`` storage of the trainable parameters, one group per dtype."""
        return self._groups

    @property
    def num_slots(self) -> int:
        """How many slots the stack has (active or not)."""
        return int(self.active.shape[0])

    def parameters(self) -> list[torch.Tensor]:
        """The trainable stacked ``[S, ...]`` parameters; torch's ``clip_grad_norm_`` refuses them (see
        :mod:`.slot_clipping`: clip with ``ray_modelbatch.clip_grad_norm_``, each slot by its own norm)."""
        return StackedParameters(p for n, p in self.params.items() if n in self._trainable)

    def named_parameters(self) -> Iterable[tuple[str, torch.Tensor]]:
        """``(name, stacked [S, ...] parameter)`` of the trainable parameters, as one model names them."""
        return ((n, p) for n, p in self.params.items() if n in self._trainable)

    def sync_grads(self) -> None:
        """Make every ``param.grad`` the view of the flat gradient buffer again.

        Code that sets ``p.grad = None`` (e.g. ``zero_grad(set_to_none=True)``)
        or assigns a new tensor would otherwise hide gradients from the
        optimizer, which reads the flat buffer.

        A parameter whose ``.grad`` is still None got no gradient from the
        backward (a layer the forward never used, a head used only in
        evaluation, a weight read through ``.detach()``). ``torch.optim``
        skips such a parameter entirely, weight decay and moments included, so
        its name goes into :attr:`gradless`, which the optimizers read to leave
        its columns as they are; its view is zeroed and its ``.grad`` stays None.
        """
        gradless = []
        for name, view in self._grad_views.items():
            p = self.params[name]
            g = p.grad
            if g is view:
                continue
            with torch.no_grad():
                if g is None:
                    view.zero_()
                    gradless.append(name)
                    continue
                view.copy_(g)
            p.grad = view
        self.gradless: tuple[str, ...] = tuple(gradless)

    def zero_grad(self) -> None:
        """Clear the gradients of every slot.

        Sets each ``param.grad`` to None instead of zeroing the flat buffer: the
        next backward then hands over each gradient as it is, rather than adding
        it into zeros (a fill and a read-add-write of every gradient, which for
        large stacks costs as much as the optimizer). :meth:`sync_grads`, which
        every optimizer step runs first, copies them into the flat buffer.
        """
        for name in self._grad_views:
            self.params[name].grad = None

    # ------------------------------------------------------------ train / eval
    def train(self, mode: bool = True) -> "ModelBatch":
        """Training mode for every slot's modules (dropout, BatchNorm statistics), as ``nn.Module.train``."""
        self.training = mode
        if mode is not self._applied_mode:  # every training step calls this; walking the modules costs ~20 us
            modules = self._plain_modes()
            if modules is None:
                self._template.train(mode)
            else:  # what nn.Module.train does, without its recursion and __setattr__ (an evaluation flips it twice)
                for m in modules:
                    object.__setattr__(m, "training", mode)
            self._applied_mode = mode
        return self

    def _plain_modes(self) -> list[nn.Module] | None:
        """The template's modules, where none of them changes what ``train()`` does (else None), made once."""
        if self._mode_modules is False:
            modules = list(self._template.modules())
            plain = all(type(m).train is nn.Module.train and "train" not in m.__dict__ for m in modules)
            self._mode_modules = modules if plain else None
        return self._mode_modules

    def eval(self) -> "ModelBatch":
        """Evaluation mode for every slot's modules, as ``nn.Module.eval``."""
        return self.train(False)

    # ------------------------------------------------------------- active mask
    def _refresh_active(self) -> None:
        idx = self.active.nonzero().flatten()
        self._active_cpu = idx
        self._active_dev = idx.to(self.device)
        self._all_active = bool(idx.numel() == self.num_slots)

    @property
    def active_slots(self) -> torch.Tensor:
        """Indices of the active slots, on the batch's device."""
        return self._active_dev

    def set_active(self, slots: Slots, active: bool = True) -> None:
        """Mark slots active or inactive. Inactive slots are never changed by training."""
        self.active[self._cpu_index(slots)] = active
        self._refresh_active()

    def activate(self, slots: Slots) -> None:
        """Let ``slots`` train again (their weights and optimizer state as they were left)."""
        self.set_active(slots, True)

    def deactivate(self, slots: Slots) -> None:
        """Freeze ``slots``: fused steps leave their weights and optimizer state exactly as they are."""
        self.set_active(slots, False)

    def _cpu_index(self, slots: Slots) -> torch.Tensor:
        if slots is None:
            return torch.arange(self.num_slots)
        if isinstance(slots, str):
            if slots != "active":
                raise ValueError(f"slots must be None, 'active', an index or indices; got {slots!r}")
            return self._active_cpu
        idx = torch.as_tensor(slots, dtype=torch.long)
        if idx.dim() != 1:
            idx = idx.flatten()
        if idx.device.type != "cpu":
            idx = idx.cpu()
        values = idx.tolist()  # checked as ints: min()/max() of the tensor were 6 small ops a call, 3 calls a step
        if values and (min(values) < 0 or max(values) >= self.num_slots):
            raise IndexError(f"slot index out of range for a batch of {self.num_slots} slots: {values}")
        return idx

    def resolve_slots(self, slots: Slots) -> torch.Tensor | None:
        """Device index tensor for ``slots``, or None when it means every slot in order."""
        if slots is None:
            return None
        if isinstance(slots, str) and slots == "active":
            return None if self._all_active else self._active_dev
        if (isinstance(slots, torch.Tensor) and slots.dtype == torch.long and slots.dim() == 1
                and slots.device == self.device and self.device.type != "cpu"):
            return slots  # already resolved on the accelerator (e.g. by the engine): no copy, no sync
        return self._resolve_index(self._cpu_index(slots))

    def _resolve_index(self, idx: torch.Tensor) -> torch.Tensor | None:
        """:meth:`resolve_slots` of a CPU index that :meth:`_cpu_index` made (checked already)."""
        values = idx.tolist()
        if len(values) == self.num_slots and values == list(range(self.num_slots)):
            return None
        if self.device.type == "cpu":
            return idx
        # One host-to-device copy per distinct slot set, not one per call (each is a sync on CUDA).
        key = tuple(values)
        cached = self._index_cache.get(key)
        if cached is None:
            if len(self._index_cache) > 64:
                self._index_cache.clear()
            cached = self._index_cache[key] = idx.to(self.device)
        return cached

    # ----------------------------------------------------------------- forward
    def _fn(self, with_loss: bool | str, x_dim: int | None, y_dim: int | None, arg_dims: tuple | None) -> Callable:
        key = (with_loss, x_dim, y_dim, arg_dims)
        fn = self._vmapped.get(key)
        if fn is None:
            template = self._template
            # Extra positional and keyword inputs: shared (None), or per slot where they are tensors
            # (see _prepare_args); a dict x is the model's keyword inputs (inputs.call_args).
            a_dims, k_dims = (None, None) if arg_dims is None else (arg_dims[0], dict(arg_dims[1]))
            owners = _buffer_owners(template)

            if with_loss == "step":  # a user's step: fn(model, batch, config) for one model (see run_step)
                def one(params, buffers, batch, values, step, config):
                    with _swapped(template, owners, params, buffers) as moved:
                        out = step(template, batch, step_config.with_values(config, values))
                    return out, moved

                fn = vmap(one, in_dims=(0, 0, x_dim, 0, None, None), randomness="different")
            elif with_loss:
                def one(params, buffers, x, y, loss_fn, args, kwargs):
                    with _swapped(template, owners, params, buffers) as moved:
                        a, kw = inputs.call_args(x, args, kwargs)
                        out = template(*a, **kw)
                    return (loss_fn(out, y), out), moved

                fn = vmap(one, in_dims=(0, 0, x_dim, y_dim, None, a_dims, k_dims), randomness="different")
            else:
                def one(params, buffers, x, args, kwargs):
                    with _swapped(template, owners, params, buffers) as moved:
                        a, kw = inputs.call_args(x, args, kwargs)
                        out = template(*a, **kw)
                    return out, moved

                fn = vmap(one, in_dims=(0, 0, x_dim, a_dims, k_dims), randomness="different")
            self._vmapped[key] = fn
        return fn

    def _run(self, key: tuple, call_args: tuple, idx: torch.Tensor | None) -> Any:
        if idx is None:
            params = self.params
            protect = self.training and self.buffers and not self._all_active
            buffers = {k: v.clone() for k, v in self.buffers.items()} if protect else self.buffers
        else:
            params = {k: v.index_select(0, idx) for k, v in self.params.items()}
            buffers = {k: v.index_select(0, idx) for k, v in self.buffers.items()}
        out = direct_error = None
        # The rows' own generators for this forward's dropout and sampling (slot_random); None: the global one.
        draws = self.random.draws(idx) if self.per_slot_random else None
        direct = key[0] != "step"  # fast_path.run takes extra and keyword inputs, or refuses them (vmap)
        if direct and key not in self._slow_keys and self._plan() is not None:
            # BatchNorm updates its statistics in place: a direct run that fails halfway must not
            # have touched them before vmap runs the step again, so it works on copies.
            work = {k: v.clone() for k, v in buffers.items()} if buffers is self.buffers and self.training else buffers
            try:
                out = self._run_direct(key, call_args, params, work, draws)
                buffers = work
            except Exception as exc:  # noqa: BLE001 - vmap's path below runs it again, and explains errors
                if is_out_of_memory(exc):
                    raise
                direct_error, out = exc, None
                if draws is not None:  # vmap draws from the slots' states again, not from where this run stopped
                    draws = self.random.draws(idx)
                if idx is not None:  # the direct run may have updated these copies
                    buffers = {k: v.index_select(0, idx) for k, v in self.buffers.items()}
                elif protect and buffers is not self.buffers:
                    buffers = {k: v.clone() for k, v in self.buffers.items()}
        if out is None:
            with VmapRandom(draws) if draws is not None else contextlib.nullcontext():
                out, moved = self._run_vmap(key, call_args, params, buffers)  # raises the input's error, explained
            _keep_reassigned(buffers, moved)
            if direct_error is not None:  # vmap ran what the direct path could not: this call stays on vmap
                self._slow_keys.add(key)
                if not isinstance(direct_error, fast_path.Unsupported):  # a layout the plan declines is expected
                    first = (str(direct_error).splitlines() or [""])[0][:200]
                    warnings.warn(FusionWarning(
                        f"the direct fused path failed ({type(direct_error).__name__}: {first}); this call runs "
                        "through torch.vmap instead, slower. Please report it with the model."), stacklevel=3)
        if draws is not None and self.training:  # an evaluation's draws do not move the slots' streams
            draws.commit()
        if idx is not None and self._renormed:  # max_norm renormalized the gathered rows: as torch, keep that
            with torch.no_grad():
                for k in self._renormed:
                    self.params[k].index_copy_(0, idx, params[k].detach())
        if self.training and self.buffers:
            with torch.no_grad():
                if idx is not None:
                    for k, v in self.buffers.items():
                        v.index_copy_(0, idx, buffers[k])
                elif buffers is not self.buffers:
                    if self._all_active:  # every row moved: one copy per buffer, not a masked gather and scatter
                        for k, v in self.buffers.items():
                            v.copy_(buffers[k])
                    else:
                        act = self._active_dev
                        for k, v in self.buffers.items():
                            v[act] = buffers[k][act]
        return out

    def forward_state(self) -> dict[str, torch.Tensor]:
        """What a forward may change in place: the buffers (BatchNorm's statistics) and the weights of
        ``Embedding(max_norm=...)``, which renormalizes the rows it looks up. A step puts back the rows of the slots
        that must not move (see :meth:`FusedEngine.train_step`'s ``skip``)."""
        if not self._renormed:
            return self.buffers
        return {**self.buffers, **{k: self.params[k] for k in self._renormed}}

    def _run_vmap(self, key: tuple, call_args: tuple, params: dict[str, torch.Tensor],
                  buffers: dict[str, torch.Tensor]) -> Any:
        fn = self._fn(*key)

        def invoke() -> Any:
            with vmap_attention.batched_sdpa(), wide_cross_entropy.batched_cross_entropy():
                return fn(params, buffers, *call_args)

        try:
            with hf.fused_masks() if self._hf else contextlib.nullcontext():
                if key in self._checked:
                    return invoke()
                out = run_first_call(self._template, invoke)
            self._checked.add(key)
            return out
        except Exception as exc:  # vmap's own errors are unreadable for users
            if is_out_of_memory(exc):  # not a fusion problem; re-running it to explain would only fail again
                raise
            outside = loss = labels = None
            if key[0] == "step":
                outside = f"the step function {getattr(call_args[2], '__name__', call_args[2])!r}"
            elif key[0] is True:  # forward and loss: (x, y, loss_fn, args, kwargs)
                loss = repr(getattr(call_args[2], "__name__", type(call_args[2]).__name__))
                labels = _describe_labels(call_args[1], key[2])
            batch = _describe_input(call_args[0], key[1]) if key[0] != "step" else None
            with hf.fused_masks() if self._hf else contextlib.nullcontext():
                error = explain_failure(self._template, exc, invoke, outside=outside, loss=loss, batch=batch,
                                        labels=labels, slots=next(iter(params.values())).shape[0] if params else None)
            if error is exc:  # the user's own exception (see fusion_check._raised_by_user)
                raise
            raise error from exc

    @property
    def module_class(self) -> type:
        """The class of the stacked models."""
        return self._module_class

    @property
    def settings(self) -> tuple:
        """The stacked models' settings besides tensors (:func:`~ray_modelbatch.signature.module_settings`)."""
        return self._settings

    @property
    def uses_direct_path(self) -> bool:
        """Whether forwards in the current mode skip vmap (see :mod:`ray_modelbatch.fast_path` for the layers)."""
        return self._plan() is not None

    def why_vmap(self) -> str | None:
        """Why forwards in the current mode run on ``torch.vmap`` (on a CPU often little faster than a loop of
        the models), or None where they take the direct path: the first layer or call in the way, e.g.
        "module 'act' (Softmin) has no direct kernel, or not with these settings" (:func:`.fast_path.why_not`)."""
        if not self._direct_path:
            return "the stack was built with direct_path=False"
        return None if self._plan() is not None else fast_path.why_not(self._template)

    @property
    def gather_exact(self) -> bool:
        """Whether a forward over any two or more slots gives each slot the bits the whole stack gives it,
        in the current mode (a direct plan of Linear and elementwise layers; see ``fast_path``).

        Not with ``cpu_gemm="onednn"``: a layer whose input the slots share is one oneDNN GEMM over all
        slots' weights, and nothing promises that oneDNN picks the same kernel for another number of them
        (on a 2-core AMD EPYC it did, for every count from 1 to 32, but a gather must be exact everywhere).
        """
        plan = self._plan()
        return plan is not None and plan.gather_exact and self.cpu_gemm != "onednn"

    def _plan(self) -> fast_path.FastPlan | None:
        if not self._direct_path:
            return None
        if self.training not in self._plans:
            self._plans[self.training] = fast_path.plan(self._template)
        return self._plans[self.training]

    def mlp_train_step(self, x: Any, y: Any, loss_fn: Callable[[Any, Any], torch.Tensor], *, per_slot: bool = False,
                       slots: Slots = None) -> torch.Tensor | None:
        """The losses ``[n]`` of an MLP stack's training forward, its gradients written into the flat buffer
        by hand (:mod:`.mlp_step`), or None, having done nothing, where that step does not apply: call
        :meth:`forward_loss` and ``backward()`` then. ``x``, ``y``, ``per_slot`` and ``slots`` are as there."""
        if not self.training or not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            return None
        if self.cpu_gemm == "onednn" and self.device.type == "cpu":  # that choice's kernels are fast_path's
            return None
        try:
            chain = self._mlp_chains.get(loss_fn, False)
        except TypeError:  # an unhashable loss object
            return None
        if chain is False:
            plan = self._plan()
            chain = mlp_step.chain(plan, self._template, loss_fn)
            if chain is not None and any(n not in self._grad_targets for n in self.params):
                chain = None  # a parameter outside the flat buffer (see _grad_views)
            if len(self._mlp_chains) < 8:
                self._mlp_chains[loss_fn] = chain
        if chain is None or torch.is_autocast_enabled(self.device.type) or not torch.is_grad_enabled():
            return None
        if not chain.accepts(x, y, per_slot):
            return None
        idx = self.resolve_slots(slots)
        x, _ = self._prepare_x(x, per_slot, idx)
        y, _ = self._prepare_x(y, per_slot, idx, "targets")
        params = self.params if idx is None else {k: v.index_select(0, idx) for k, v in self.params.items()}
        if any(p.dtype != x.dtype for p in params.values()):
            return None
        return chain.step(params, x, y, self._grad_targets, idx)

    @contextlib.contextmanager
    def gradients_into_buffer(self) -> Iterator["ModelBatch"]:
        """Within this block, direct-path forwards over all slots have backward write into the flat buffer.

        Each weight and bias gradient is then computed straight into the flat
        gradient buffer that the optimizers read, instead of being allocated,
        handed to autograd and copied into the buffer at the optimizer step: for
        large stacks one pass less over every gradient. The parameters then get
        their gradients only through ``.backward()`` (``torch.autograd.grad``
        and parameter hooks do not see them), which is how
        :meth:`FusedEngine.train_step` uses it. Models on vmap, slot subsets and
        autocast are unaffected.
        """
        previous, self._grads_into_buffer = self._grads_into_buffer, True
        try:
            yield self
        finally:
            self._grads_into_buffer = previous

    def _run_direct(self, key: tuple, call_args: tuple, params: dict[str, torch.Tensor],
                    buffers: dict[str, torch.Tensor], draws: Draws | None) -> Any:
        with_loss, x_dim, y_dim, _ = key
        write = self._grads_into_buffer and params is self.params and torch.is_grad_enabled()
        out = fast_path.run(self._plan(), self._template, params, call_args[0], per_slot=x_dim is not None,
                            grads=self._grad_targets if write else None, gemm=self.cpu_gemm, buffers=buffers,
                            args=call_args[-2], kwargs=call_args[-1], random=draws)
        if not with_loss:
            return out
        y, loss_fn = call_args[1], call_args[2]
        losses = slot_losses.per_slot_loss(loss_fn, out, y, per_slot_targets=y_dim is not None)
        if losses is not None:
            return losses, out
        vloss = self._vmapped.get(("direct_loss", y_dim, None, None))
        if vloss is None:  # built once per target layout, like the vmapped forwards in _fn
            vloss = self._vmapped[("direct_loss", y_dim, None, None)] = vmap(
                lambda o, t, fn: fn(o, t), in_dims=(0, y_dim, None), randomness="different")
        with wide_cross_entropy.batched_cross_entropy():
            return vloss(out, y, loss_fn), out

    def _prepare_x(self, x: Any, per_slot: bool, idx: torch.Tensor | None, what: str = "x") -> tuple[Any, int | None]:
        """``x`` with one row per selected slot, and its vmap dimension (None: shared by every slot).

        ``x`` is a tensor, a dict of tensors (keyword inputs, each with a
        leading slot dimension when ``per_slot``) or None (no targets).
        """
        if not per_slot or x is None:
            return x, None
        n = self.num_slots if idx is None else idx.numel()
        if not inputs.leaves(x) or any(not isinstance(t, torch.Tensor) or t.dim() == 0 for t in inputs.leaves(x)):
            raise ValueError(f"per-slot {what} must be a tensor with a leading slot dimension (or a dict of them)")

        def rows(t: torch.Tensor) -> torch.Tensor:
            if t.shape[0] == n:
                return t
            if idx is not None and t.shape[0] == self.num_slots:
                return t.index_select(0, idx)
            raise ValueError(
                f"per-slot {what} has leading dimension {t.shape[0]}, but {n} slots are being run; "
                f"give one row per slot ([{n}, batch, ...]) or pass per_slot=False to share one batch."
            )

        return inputs.apply(rows, x), 0

    def _prepare_args(self, args: tuple, kwargs: dict, per_slot: bool,
                      idx: torch.Tensor | None) -> tuple[tuple, dict, tuple | None]:
        """Extra inputs of a forward and their vmap dims: with ``per_slot``, every tensor among them has a
        leading slot dimension (an ``attention_mask``, EmbeddingBag ``offsets``); other values are shared."""
        if not per_slot or not (args or kwargs):
            return args, kwargs, None
        is_t = lambda v: isinstance(v, torch.Tensor)  # noqa: E731
        args = tuple(self._prepare_x(a, True, idx, "positional input")[0] if is_t(a) else a for a in args)
        kwargs = {k: self._prepare_x(v, True, idx, f"input {k!r}")[0] if is_t(v) else v for k, v in kwargs.items()}
        dims = (tuple(0 if is_t(a) else None for a in args),
                tuple((k, 0 if is_t(v) else None) for k, v in kwargs.items()))
        return args, kwargs, dims

    def __call__(self, x: Any, *args: Any, per_slot: bool = False, slots: Slots = None, **kwargs: Any) -> Any:
        """Run the forward of the selected slots; outputs have a leading slot dimension.

        Args:
            x: the input batch. Shared by every slot unless ``per_slot=True``, in
                which case it is ``[S, B, ...]`` (or ``[len(slots), B, ...]``). A
                dict is the model's keyword inputs: ``mb({"input_ids": ...,
                "attention_mask": ...})`` calls ``model(**x)`` (a Hugging Face batch).
            *args, **kwargs: more inputs of the model's forward (``attention_mask=``,
                EmbeddingBag ``offsets``): shared, or with ``per_slot=True`` each
                tensor among them has a leading slot dimension too.
            slots: ``None`` for every slot (output ``[S, ...]``); ``"active"``,
                an index or a list of indices to run only those (output
                ``[len(slots), ...]`` in that order). Running only the active
                slots is what makes a step's cost follow their number.

        An output object (a transformers ``ModelOutput``) comes back as one, each
        of its tensors with a leading slot dimension.
        """
        idx = self.resolve_slots(slots)
        x, x_dim = self._prepare_x(x, per_slot, idx)
        args, kwargs, dims = self._prepare_args(args, kwargs, per_slot, idx)
        return self._run((False, x_dim, None, dims), (x, args, kwargs), idx)

    def forward_loss(
        self,
        x: Any,
        y: Any,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        *args: Any,
        per_slot: bool = False,
        slots: Slots = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, Any]:
        """Forward and per-slot loss in one vmapped call: returns ``(losses[n], outputs[n, ...])``.

        ``loss_fn(output, target)`` is written for a single model and must
        return a scalar; it is vmapped over slots. ``x`` and ``*args/**kwargs``
        are as in :meth:`__call__`; ``y`` may be a dict or None (labels inside a
        dict ``x``: ``loss_fn=lambda out, _: out.loss`` for a Hugging Face model).
        """
        idx = self.resolve_slots(slots)
        x, x_dim = self._prepare_x(x, per_slot, idx)
        y, y_dim = self._prepare_x(y, per_slot, idx, "targets")
        args, kwargs, dims = self._prepare_args(args, kwargs, per_slot, idx)
        return self._run((True, x_dim, y_dim, dims), (x, y, loss_fn, args, kwargs), idx)

    def run_step(
        self,
        step: Callable[[nn.Module, Any, Mapping[str, Any]], Any],
        batch: Any,
        config: Mapping[str, Any],
        values: Mapping[tuple, torch.Tensor] | None = None,
        *,
        per_slot: bool = False,
        slots: Slots = None,
    ) -> Any:
        """Run ``step(model, batch, config)``, written for one model, for every selected slot at once.

        ``model`` inside ``step`` is the model itself (a real ``nn.Module``:
        ``model(x)``, ``model.parameters()``, ``model.encoder``), holding the
        slot's parameters and buffers, so a step may call it several times, add
        a penalty on its weights or draw noise. Whatever it returns (a loss, a
        dict of values) comes back with a leading slot dimension.

        Args:
            batch: any nest of tensors; shared by every slot, or with
                ``per_slot=True`` each tensor has a leading slot dimension.
            config: the config the step sees (the same for every slot) ...
            values: ... except at these paths (see :mod:`ray_modelbatch.step_config`):
                ``{path: [n] tensor}``, one value per selected slot.
        """
        idx = self.resolve_slots(slots)
        leaves, spec = pytree.tree_flatten(batch)
        dim = None
        if per_slot:
            leaves = [self._prepare_x(t, True, idx, "batch entry")[0] for t in leaves]
            dim = 0
        batch = pytree.tree_unflatten(leaves, spec)
        values = dict(values or {})
        n = self.num_slots if idx is None else idx.numel()
        for path, v in values.items():
            if v.shape != (n,):
                raise ValueError(f"config values at {path} have shape {list(v.shape)}; expected one per slot ([{n}])")
        return self._run(("step", dim, None, None), (batch, values, step, config), idx)

    # ------------------------------------------------------------- slot state
    def attach(self, listener: Any) -> None:
        """Register an object with ``_on_resize``, ``_on_copy`` and ``_on_reset`` slot hooks."""
        self._listeners.append(weakref.ref(listener))

    def _notify(self, event: str, *args: Any) -> None:
        alive = []
        for ref in self._listeners:
            obj = ref()
            if obj is not None:
                getattr(obj, event)(*args)
                alive.append(ref)
        self._listeners = alive

    def _check_rates(self, joining: nn.Module | None = None) -> None:
        """Slots with different dropout rates need their own generators: without them one global draw serves
        every slot, at one rate (``joining``: a model about to be loaded into a slot)."""
        if self.per_slot_random:
            return
        extra = rates_of(joining) if joining is not None else {}
        for path, v in self.rates.values.items():
            if not bool((v == v[0]).all()) or extra.get(path, float(v[0])) != float(v[0]):
                raise IncompatibleModelsError(
                    f"the models' dropout rates at '{path}' differ ({sorted(set(v.tolist()))}), and this batch "
                    "draws every slot's masks at once (per_slot_random=False), at one rate. Fix: "
                    "per_slot_random=True (the default), or give every model the same rate.")

    def _check_slot(self, i: int) -> int:
        if not 0 <= int(i) < self.num_slots:
            raise IndexError(f"slot {i} is out of range for a batch of {self.num_slots} slots")
        return int(i)

    def slot_tensors(self) -> dict[str, torch.Tensor]:
        """Every per-slot tensor of the batch (dim 0 is the slot): see :mod:`ray_modelbatch.slot_state`.

        Weights (the flat groups, frozen parameters), buffers and each slot's
        generator state (:mod:`.slot_random`); gradients are not state, since
        every step starts by overwriting them.
        """
        out = {f"params.{dt}": g.data for dt, g in self._groups.items()}
        out.update({f"frozen.{k}": v for k, v in self._frozen.items()})
        out.update({f"buffers.{k}": v for k, v in self.buffers.items()})
        out.update(self.random.slot_tensors())
        return out

    def slot_state(self, i: int) -> dict[str, torch.Tensor]:
        """A plain ``state_dict`` of slot ``i`` that loads into a fresh instance of the model class."""
        i = self._check_slot(i)
        tensors = {**self.params, **self.buffers}
        own = self.own_sizes[i] or {}
        return {k: padded_stacks.unpad(tensors[c][i].detach(), own[c]) if c in own else tensors[c][i].detach().clone()
                for k, c in self._state_keys.items()}

    def slot_signature(self, i: int) -> list[str]:
        """The signature of slot ``i``'s model, one line per tensor, at its own shapes (a checkpoint's
        ``"signature"``: in a padded stack, a narrower model's, see :mod:`.padded_stacks`)."""
        own = self.own_sizes[self._check_slot(i)] or {}
        return [padded_stacks.describe(spec, own.get(spec.name)) for spec in self.signature]

    def _fits_padded(self, source: nn.Module) -> dict[str, tuple[int, ...]] | None:
        """A narrower model's own shapes, where this stack may hold it padded; else None."""
        if not self.padding:
            return None
        own = padded_stacks.own_shapes(self.signature, module_signature(source))
        if not own:
            return None
        return own if padded_stacks.unsized_settings(source) == self._unsized else None

    def slot_module(self, i: int, module: nn.Module) -> nn.Module:
        """Load slot ``i`` into ``module`` (a fresh instance of the model class) and return it."""
        module.load_state_dict(self.slot_state(i))
        return module

    def load_slot(self, i: int, source: Mapping[str, torch.Tensor] | nn.Module) -> None:
        """Replace slot ``i`` with a ``state_dict`` or a module; other slots are untouched.

        The optimizer state of the slot is reset by attached optimizers, since
        the moments of the old weights do not apply to the new ones.
        """
        i = self._check_slot(i)
        transient: dict[str, torch.Tensor] = {}
        own: dict[str, tuple[int, ...]] = {}
        if isinstance(source, nn.Module):
            padded = self._fits_padded(source)
            problem = None if padded else first_mismatch(self.signature, module_signature(source)) or \
                first_setting_mismatch(self._settings, module_settings(source))
            if problem:
                raise IncompatibleModelsError(
                    f"cannot load a {type(source).__name__} into slot {i}: {problem}. The model must have "
                    "the same architecture as the batch; build it from the same config."
                )
            state = source.state_dict()
            self._check_rates(source)
            self.rates.set(i, source)
            if self._transient:
                buffers = dict(source.named_buffers())
                transient = {n: buffers[n] for n in self._transient if n in buffers}
        else:
            state = dict(source)
        missing = [k for k in self._state_keys if k not in state]
        extra = [k for k in state if k not in self._state_keys]
        if missing or extra:
            raise IncompatibleModelsError(
                f"state_dict for slot {i} does not fit this batch: missing keys {missing[:5]}, unexpected "
                f"keys {extra[:5]}. Load a state_dict saved from the same model architecture."
            )
        tensors = {**self.params, **self.buffers}
        with torch.no_grad():
            for key, canon in self._state_keys.items():
                dst, src = tensors[canon][i], state[key]
                if tuple(src.shape) != tuple(dst.shape) and self.padding and src.dim() == dst.dim() and all(
                        a <= b for a, b in zip(src.shape, dst.shape)):
                    own[canon] = tuple(src.shape)  # a narrower model's, padded (see padded_stacks)
                elif tuple(src.shape) != tuple(dst.shape):
                    raise IncompatibleModelsError(
                        f"state_dict entry '{key}' for slot {i} has shape {list(src.shape)} but the batch "
                        f"expects {list(dst.shape)}. Load a state_dict saved from the same model architecture."
                    )
            for key, canon in self._state_keys.items():
                tensors[canon][i].copy_(padded_stacks.pad(state[key], tensors[canon][i].shape))
            for name, value in transient.items():
                self.buffers[name][i].copy_(value)
            self.own_sizes[i] = own or None
            for g in self._groups.values():
                g.grad[i].zero_()
        self._notify("_on_reset", i)

    def reset_slot(self, i: int, module: nn.Module) -> None:
        """Give slot ``i`` a new model (fresh weights and fresh optimizer state)."""
        self.load_slot(i, module)

    def copy_slot(self, src: int, dst: int) -> None:
        """Copy parameters, buffers and attached optimizer state of ``src`` into ``dst`` (PBT exploit)."""
        src, dst = self._check_slot(src), self._check_slot(dst)
        with torch.no_grad():
            for g in self._groups.values():
                g.data[dst] = g.data[src]
                g.grad[dst].zero_()
            for t in (*self._frozen.values(), *self.buffers.values()):
                t[dst] = t[src]
        self.random.copy(src, dst)
        self.rates.copy(src, dst)
        self.own_sizes[dst] = self.own_sizes[src]
        self._notify("_on_copy", src, dst)

    def resize(self, capacity: int, keep: Sequence[int] | None = None) -> None:
        """Change the number of slots while keeping live slots' state.

        New slot ``j`` takes old slot ``keep[j]``; slots beyond ``len(keep)``
        start empty (zero weights) and inactive: load a model into them with
        :meth:`reset_slot` and :meth:`activate` them. By default the first
        ``min(old, capacity)`` slots are kept in place; shrinking past an active
        slot requires an explicit ``keep``.
        """
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        old = self.num_slots
        if keep is None:
            keep = list(range(min(old, capacity)))
            dropped = [i for i in self._active_cpu.tolist() if i >= capacity]
            if dropped:
                raise ValueError(
                    f"shrinking to {capacity} slots would drop active slots {dropped}; deactivate them "
                    "first or pass keep=[old slot indices to keep]."
                )
        keep = [self._check_slot(i) for i in keep]
        if len(keep) > capacity or len(set(keep)) != len(keep):
            raise ValueError(f"keep must list at most {capacity} distinct old slots, got {keep}")
        src = torch.tensor(keep, dtype=torch.long)
        src_dev = src.to(self.device)

        def remap(t: torch.Tensor, dev: torch.Tensor) -> torch.Tensor:
            out = torch.zeros((capacity, *t.shape[1:]), dtype=t.dtype, device=t.device)
            out[: len(keep)] = t.index_select(0, dev)
            return out

        with torch.no_grad():
            for g in self._groups.values():
                g.data = remap(g.data, src_dev)
                g.grad = torch.zeros_like(g.data)
            self._frozen = {k: remap(v, src_dev) for k, v in self._frozen.items()}
            self.buffers = {k: remap(v, src_dev) for k, v in self.buffers.items()}
            if keep:  # new slots take the buffers no state_dict holds from a kept slot, not zeros
                for k in self._transient:
                    self.buffers[k][len(keep):] = self.buffers[k][0]
        self.active = remap(self.active, src)
        self.random.resize(keep, capacity)
        self.rates.resize(keep, capacity)
        self.own_sizes = [self.own_sizes[k] for k in keep] + [None] * (capacity - len(keep))
        self._build_leaves()
        self._notify("_on_resize", keep, capacity)
