"""Per-slot weight decay: coefficients for torch's ``decoupled_weight_decay`` flag (NAdam, RAdam), and the
one place every optimizer's update applies decay (:func:`apply_weight_decay`).

Slots may mix the two forms; each form costs its elementwise pass only when
some slot uses it (``kinds``, known on the host). Skipped slots get decay 1
and L2 weight 0, so their parameters and state stay exactly unchanged.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch


def decay_kinds(hp: Mapping[str, torch.Tensor], weight_decays: Sequence[torch.Tensor] = ()) -> tuple[str, ...]:
    """Which forms some slot uses: ``"coupled"`` (L2 added to the gradient), ``"decoupled"`` (AdamW-style).

    ``weight_decays``: every ``[S]`` decay column to consider (the slot's own and its parameter groups'), by
    default ``hp["weight_decay"]``; a slot decays if any of them is nonzero.
    """
    on = torch.stack(list(weight_decays) or [hp["weight_decay"]]).ne(0).any(0)
    dec = hp["decoupled_weight_decay"] == 1
    used = {"coupled": bool((on & ~dec).any()), "decoupled": bool((on & dec).any())}
    return tuple(k for k, u in used.items() if u)


def weight_decay_coefficients(hp: Mapping[str, torch.Tensor], ok: torch.Tensor, lr: torch.Tensor,
                              kinds: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """``decay`` (parameter factor ``1 - lr * wd``) and/or ``wd`` (L2 weight) columns, ``[n]`` float64."""
    wd, dec = hp["weight_decay"], hp["decoupled_weight_decay"]
    out = {}
    if "decoupled" in kinds:
        out["decay"] = torch.where((ok > 0) & (dec > 0), 1.0 - lr * wd, 1.0)
    if "coupled" in kinds:
        out["wd"] = wd * (1.0 - dec) * ok
    return out


def apply_weight_decay(p: torch.Tensor, g: torch.Tensor, c: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Apply the decay columns of ``c`` at the start of an update; returns the gradient to use.

    ``decay`` scales the parameters in place (decoupled, AdamW-style); ``wd``
    adds L2 to the gradient (a new tensor: the flat gradient buffer is not
    changed). Either key is present only when some slot uses that form.
    """
    if "decay" in c:
        p.mul_(c["decay"])
    if "wd" in c:
        g = g.add(p * c["wd"])
    return g
