"""Every slot's GEMM written straight into a strided stack of matrices, by one call to MKL's batched GEMM.

Why: a stacked weight's gradient is its view of the flat ``[S, P]`` gradient
buffer. Each slot's ``[O, I]`` matrix is contiguous there, but one slot's
matrix starts ``P`` values after the last one's, not ``O * I``. torch's
``bmm``/``baddbmm`` hand a batch to MKL's batched kernel only when the result
is contiguous; into such a view they run one GEMM per slot. MKL's own
``cblas_?gemm_batch`` takes one pointer per matrix, so any distance between
the matrices is fine, and torch's CPU wheels carry it (exported by
``libtorch_cpu``; torch calls it itself for contiguous batches).

Measured by ``python benchmarks/strided_gemm.py --rounds 5`` on a 2-core
Xeon (AVX-512, 2 threads), the 784 MLP's first-layer weight gradient at 128
slots (``[256, 64] @ [64, 784]`` per slot, one input every slot shares):
24.4 ms by torch's per-slot GEMMs, **22.0 ms** written here (8.6 against 5.1
ms at batch 16); a whole fused step of that MLP, 99.0 against 91.2 ms. The
values are those of torch's own GEMMs into the same view (the path this
replaces) to the bit, and on Intel CPUs those of torch's batched GEMM into a
contiguous result too (``tests/test_strided_gemm.py``): the same kernel
computes each matrix. On the AMD EPYC of session 46, MKL rounds a matrix
whose result is not 16-byte aligned apart from an aligned one (fp32 results
of 8-10 columns, fp64 of up to 64: up to 1e-5 apart), torch's own calls alike.

The choice depends only on the tensors' dtype, device and strides, never on a
timing, so every process on a machine computes the same bits. Where MKL or
the symbol is missing (a torch built without MKL, an ARM Mac), or a layout is
one the batched kernel cannot express, :func:`bmm_into` returns False and the
caller keeps torch's own path.

The call is a torch operator, ``torch.ops.ray_modelbatch.strided_bmm_``
(defined with ``torch.library.Library``, 4 us a call, no Dynamo import), so
dispatch-mode tools see it as they see ``bmm``: ``benchmarks/op_time.py``
times it and ``benchmarks/kernel_time.py`` counts and replays it as a kernel.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os
from typing import Any

import torch

__all__ = ["available", "bmm_into"]

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
_INT_MAX = 2**31 - 1  # MKL's LP64 interface takes 32-bit sizes
_KERNELS = {torch.float32: "cblas_sgemm_batch", torch.float64: "cblas_dgemm_batch"}
_SCALARS = {torch.float32: ctypes.c_float, torch.float64: ctypes.c_double}


@functools.lru_cache(maxsize=None)
def _kernel(dtype: torch.dtype) -> Any:
    """MKL's batched GEMM for ``dtype`` from torch's own library, or None where this torch has none."""
    name = _KERNELS.get(dtype)
    if name is None or not torch.backends.mkl.is_available():
        return None
    lib_dir = os.path.join(os.path.dirname(torch.__file__), "lib")
    for path in sorted(glob.glob(os.path.join(lib_dir, "libtorch_cpu.*"))):
        try:
            fn = getattr(ctypes.CDLL(path), name)
        except (OSError, AttributeError):
            continue
        fn.restype = None
        return fn
    return None


def available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether :func:`bmm_into` can compute in ``dtype`` on this install."""
    return _kernel(dtype) is not None


def _operand(t: torch.Tensor, rows: int, cols: int) -> tuple[int, int] | None:
    """``(transpose flag, leading dimension)`` of each ``[rows, cols]`` matrix of ``t``, or None when a matrix
    is neither row- nor column-contiguous (a layout a GEMM cannot read in place)."""
    s_row, s_col = t.stride(1), t.stride(2)
    if (s_col == 1 or cols == 1) and s_row >= max(cols, 1):
        return _NO_TRANS, s_row if rows > 1 else max(cols, 1)
    if (s_row == 1 or rows == 1) and s_col >= max(rows, 1):
        return _TRANS, s_col if cols > 1 else max(rows, 1)
    return None


def _pointers(t: torch.Tensor, count: int) -> Any:
    """The address of each of ``t``'s ``count`` matrices, as MKL's pointer array (made in C: a few us)."""
    start, step = t.data_ptr(), t.stride(0) * t.element_size()
    return (ctypes.c_void_p * count)(*(range(start, start + count * step, step) if step else [start] * count))


def bmm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, add: bool = False) -> bool:
    """``out[s] = a[s] @ b[s]`` (``+=`` when ``add``) for every ``s``, written in place whatever ``out``'s
    distance between matrices; False, having written nothing, where this install or these layouts cannot.

    ``a`` is ``[S, M, K]`` and ``b`` ``[S, K, N]``, each matrix row- or
    column-contiguous, with any batch stride (0 for an input every slot
    shares); ``out`` is ``[S, M, N]`` with contiguous rows and matrices that
    do not overlap, sharing no memory with ``a`` or ``b``. All on the CPU, in
    float32 or float64.
    """
    if not (out.dim() == a.dim() == b.dim() == 3 and out.dtype == a.dtype == b.dtype):
        return False
    if out.device.type != "cpu" or a.device.type != "cpu" or b.device.type != "cpu":
        return False
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad or out.requires_grad):
        return False  # autograd would not see the write
    if a.is_neg() or b.is_neg() or out.is_neg():  # a lazily negated view: its memory is not its values
        return False
    kernel = _kernel(out.dtype)
    if kernel is None:
        return False
    count, m, k = a.shape
    n = b.shape[2]
    if b.shape[:2] != (count, k) or out.shape != (count, m, n) or 0 in (count, m, n):
        return False
    op_a, op_b = _operand(a, m, k), _operand(b, k, n)
    if op_a is None or op_b is None or k == 0:
        return False
    ldc = out.stride(1) if m > 1 else max(n, 1)
    if out.stride(2) != 1 and n > 1 or ldc < n:
        return False
    if count > 1 and out.stride(0) < (m - 1) * ldc + n:  # matrices that overlap: not a gradient view
        return False
    if max(count, m, n, k, op_a[1], op_b[1], ldc) > _INT_MAX:
        return False
    torch.ops.ray_modelbatch.strided_bmm_(out, a, b, add)
    return True


def _strided_bmm(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, add: bool) -> None:
    """The operator's CPU kernel: one ``cblas_?gemm_batch`` call over a pointer per matrix (layouts checked
    by :func:`bmm_into`; a direct call of the operator with other layouts raises)."""
    count, m, k = a.shape
    n = b.shape[2]
    op_a, op_b = _operand(a, m, k), _operand(b, k, n)
    kernel = _kernel(out.dtype)
    if op_a is None or op_b is None or kernel is None or (out.stride(2) != 1 and n > 1):
        raise ValueError(f"strided_bmm_: layouts {a.stride()} @ {b.stride()} -> {out.stride()} in {out.dtype} "
                         "are not ones MKL's batched GEMM reads in place; call ray_modelbatch.strided_gemm.bmm_into, "
                         "which falls back to torch.bmm")
    ldc = out.stride(1) if m > 1 else max(n, 1)
    ptr_a, ptr_b, ptr_c = _pointers(a, count), _pointers(b, count), _pointers(out, count)
    i32, scalar = ctypes.c_int, _SCALARS[out.dtype]
    kernel(i32(_ROW_MAJOR), ctypes.byref(i32(op_a[0])), ctypes.byref(i32(op_b[0])),
           ctypes.byref(i32(m)), ctypes.byref(i32(n)), ctypes.byref(i32(k)), ctypes.byref(scalar(1.0)),
           ptr_a, ctypes.byref(i32(op_a[1])), ptr_b, ctypes.byref(i32(op_b[1])),
           ctypes.byref(scalar(1.0 if add else 0.0)), ptr_c, ctypes.byref(i32(ldc)), i32(1), ctypes.byref(i32(count)))


_LIBRARY = torch.library.Library("ray_modelbatch", "FRAGMENT")
_LIBRARY.define("strided_bmm_(Tensor(a!) out, Tensor a, Tensor b, bool add) -> ()")
_LIBRARY.impl("strided_bmm_", _strided_bmm, "CPU")
_LIBRARY.impl("strided_bmm_", lambda out, a, b, add: None, "Meta")  # shapes only: ``out`` keeps its own
