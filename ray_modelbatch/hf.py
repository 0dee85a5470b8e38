"""Hugging Face ``transformers`` models in a fused stack: what we change, and why each change is exact.

A ``PreTrainedModel`` built from a config (``BertForSequenceClassification(BertConfig(...))``,
``GPT2LMHeadModel(GPT2Config(...))``) is an ``nn.Module`` like any other, so
:class:`~ray_modelbatch.ModelBatch` stacks it as it is. Three things in
transformers' forward do not fit ``torch.vmap``, and a fourth is slow on a whole
stack's activations; :func:`adapt` (run once on a stack's own copy of the model,
never on the user's models) handles each of them:

- **Attention masks.** transformers skips building the 4D attention mask when
  a batch has no padding (``padding_mask.all()`` in ``masking_utils``), so that
  SDPA may take its mask-free kernel. Under vmap, with one batch per slot, that
  is a Python ``if`` on a batched tensor, which vmap refuses. Inside a fused call
  (:func:`fused_masks`) the mask builders always materialize the mask. Where a
  solo run would have skipped it, the mask lets every position attend: with
  eager attention that adds exact zeros to the scores, so the result is the
  same bits.
- **The attention kernel.** ``attn_implementation="sdpa"`` (transformers'
  default) runs on CPU as ``_scaled_dot_product_flash_attention_for_cpu``,
  which has no vmap batching rule: torch would loop over the slots. A stack
  switches its copy to ``"eager"``, the same attention written as batched
  matmuls and a softmax (twice as fast at S=4 on CPU for a 2-layer BERT), and
  the same math as SDPA to float rounding. Other implementations are kept.
- **Caches.** ``use_cache=True`` (GPT-2's config default) returns a
  ``DynamicCache``, an object vmap cannot return and training never reads. The
  stack's copy has ``use_cache=False``, a ``use_cache=True`` passed to forward
  is turned off, and a cache a model returns anyway is dropped from its output.
- **The tanh GELU.** ``NewGELUActivation`` (GPT-2's ``"gelu_new"``) writes
  ``0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x**3)))`` as seven
  elementwise ops, each a pass over the whole stack's activations, and autograd
  keeps their intermediates. The stack's copy computes it as torch's own kernel
  of that formula, ``F.gelu(x, approximate="tanh")`` (transformers'
  ``GELUTanh``, which its docs give as equivalent up to rounding: 2.4e-7 apart
  here). At 32 slots of a 2-layer GPT-2 (``[32, 1024, 128]``, 2 shared cores)
  forward and backward took 17 against 34 ms per layer.

Output objects (``ModelOutput`` with ``.loss``, ``.logits``) need nothing:
transformers registers them as pytree nodes, so vmap returns them with a
leading slot dimension on every tensor, and a user's step or loss reads
``out.loss`` and ``out.logits`` as it would for one model.

Nothing here imports transformers: a model can only be a ``PreTrainedModel``
when the user's code has imported it already.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["is_hf_model", "hf_models", "adapt", "fused_masks", "config_key"]

# Mask builders that read a mask's values to decide whether to build it (see fused_masks).
_MASK_KINDS = ("sdpa", "eager")


def _modeling_utils() -> Any:
    """transformers' ``modeling_utils`` if it has been imported, else None (nothing is imported here)."""
    return sys.modules.get("transformers.modeling_utils")


def is_hf_model(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers ``PreTrainedModel``."""
    mu = _modeling_utils()
    return mu is not None and isinstance(module, mu.PreTrainedModel)


def hf_models(root: nn.Module) -> list[nn.Module]:
    """The outermost ``PreTrainedModel``s in ``root`` (``root`` itself, or the ones a user's module wraps).

    A ``BertForSequenceClassification`` holds a ``BertModel``; both share one
    config, so the outer one is the one to adapt.
    """
    if _modeling_utils() is None:
        return []
    found: list[tuple[str, nn.Module]] = []
    for name, m in root.named_modules():
        if is_hf_model(m) and not any(name.startswith(f"{outer}.") or outer == "" for outer, _ in found):
            found.append((name, m))
    return [m for _, m in found]


def _configs(model: nn.Module) -> list[Any]:
    """The model's config and its sub-configs (``text_config``, ``decoder``...), each once."""
    seen: dict[int, Any] = {}
    todo = [getattr(model, "config", None)]
    while todo:
        cfg = todo.pop()
        if cfg is None or id(cfg) in seen or not hasattr(cfg, "to_dict"):
            continue
        seen[id(cfg)] = cfg
        todo.extend(getattr(cfg, k, None) for k in getattr(cfg, "sub_configs", {}) or {})
    return list(seen.values())


def _gelu_tanh(input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - the module's own name
    """``NewGELUActivation``'s formula as torch's kernel (see the module docstring)."""
    return F.gelu(input, approximate="tanh")


def _no_cache_kwarg(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    if kwargs.get("use_cache"):
        kwargs = {**kwargs, "use_cache": False}
    return args, kwargs


def _drop_caches(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
    """The output without cache objects (a model may return one whatever ``use_cache`` says)."""
    cache_utils = sys.modules.get("transformers.cache_utils")
    if cache_utils is None or not hasattr(out, "keys"):
        return out
    caches = [k for k, v in out.items() if isinstance(v, cache_utils.Cache)]
    if not caches:
        return out
    return type(out)(**{k: v for k, v in out.items() if k not in caches})


def adapt(template: nn.Module) -> bool:
    """Prepare a stack's own copy of a model whose parts are transformers models; return whether any are.

    Turns caches off, SDPA attention into eager attention and the tanh GELU
    into torch's kernel (see the module docstring). Call it on the copy the
    stack computes with (``ModelBatch``'s meta template), never on a user's model.
    """
    models = hf_models(template)
    for module in template.modules():
        if type(module).__name__ == "NewGELUActivation" and type(module).__module__ == "transformers.activations":
            module.forward = _gelu_tanh
    for model in models:
        for cfg in _configs(model):
            if getattr(cfg, "use_cache", False):
                cfg.use_cache = False
        if getattr(model.config, "_attn_implementation", None) == "sdpa" and model._can_set_attn_implementation():
            model.set_attn_implementation("eager")
        model.register_forward_pre_hook(_no_cache_kwarg, with_kwargs=True)
        model.register_forward_hook(_drop_caches, with_kwargs=True)
    return bool(models)


@contextlib.contextmanager
def fused_masks() -> Iterator[None]:
    """Within this block, transformers' SDPA and eager mask builders always build the mask.

    They would otherwise return no mask when ``padding_mask.all()`` (or a
    causal pattern SDPA's ``is_causal`` covers), a test vmap cannot make on one
    batch per slot. The builders are replaced in transformers' own registry of
    mask functions (``AttentionMaskInterface``, whose per-instance entries exist
    for such overrides) for the duration of the fused call, then put back.
    Calls made meanwhile elsewhere in the process get the same, correct masks.
    """
    masking = sys.modules.get("transformers.masking_utils")
    if masking is None:
        yield
        return
    registry = masking.ALL_MASK_ATTENTION_FUNCTIONS
    before = dict(registry._local_mapping)
    for kind in _MASK_KINDS:
        if kind in registry:
            registry[kind] = _always_build(registry[kind])
    try:
        yield
    finally:
        registry._local_mapping.clear()
        registry._local_mapping.update(before)


def _always_build(build: Any) -> Any:
    def always_build(*args: Any, **kwargs: Any) -> Any:
        kwargs["allow_is_causal_skip"] = False
        kwargs["allow_is_bidirectional_skip"] = False
        return build(*args, **kwargs)

    return always_build


def config_key(model: nn.Module) -> str:
    """The configs of the transformers models in ``model``, for a stack's key: a stack runs one forward,
    and transformers' forwards read their config at run time (not only through module attributes)."""
    parts = []
    for m in hf_models(model):
        try:
            parts.append(m.config.to_json_string(use_diff=False))
        except Exception:  # noqa: BLE001 - a config that cannot serialize: its repr still tells configs apart
            parts.append(repr(m.config))
    return "\n".join(parts)
