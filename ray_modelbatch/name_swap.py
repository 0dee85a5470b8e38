"""A function's name in a module, ours while any block runs, torch's again once the last one ends.

Why: a few torch functions that models call by name (``F.scaled_dot_product_attention``,
``F.cross_entropy``) have a better form for a stack's vmapped tensors than
what vmap makes of torch's (a kernel run once per slot; logits-sized
temporaries), and they are composite or C++ functions that take no vmap rule
of ours. A ``TorchFunctionMode`` would see every other call of the step too.
Swapping the name while a stack's vmapped function runs reaches
every caller that looks the name up when it calls: ``nn.MultiheadAttention``,
transformers' losses, a user's loss function. Each replacement takes only the
calls it covers and hands the others to torch's function, so code on other
threads that calls the name meanwhile gets torch's results.

Blocks nest and run on several threads at once: the first block in puts the
replacement in, the last one out puts torch's function back.
"""

from __future__ import annotations

import contextlib
import threading
from types import ModuleType
from typing import Callable, Iterator

__all__ = ["NameSwap"]


class NameSwap:
    """``module.name`` is ``replacement`` inside :meth:`block`, and what it was before everywhere else."""

    def __init__(self, module: ModuleType, name: str, replacement: Callable) -> None:
        self.module, self.name, self.replacement = module, name, replacement
        self.original = getattr(module, name)
        self._lock = threading.Lock()
        self._open = 0

    @contextlib.contextmanager
    def block(self) -> Iterator[None]:
        """The replacement holds within this block (and any that overlap it, on any thread)."""
        with self._lock:
            if self._open == 0:
                setattr(self.module, self.name, self.replacement)
            self._open += 1
        try:
            yield
        finally:
            with self._lock:
                self._open -= 1
                if self._open == 0:
                    setattr(self.module, self.name, self.original)

    @property
    def active(self) -> bool:
        """Whether the replacement is in (for tests)."""
        return getattr(self.module, self.name) is self.replacement
