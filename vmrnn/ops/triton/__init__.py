"""Triton kernels of the SS2D scan, one file each, with their host-side launchers.

Triton is optional: without it (CPU machines) the torch references run. Import the kernel modules only
when `HAS_TRITON` is true. On CPU tensors the kernels run in Triton's interpreter when TRITON_INTERPRET=1
was set before triton was imported (the CPU tests do that in a subprocess).
"""

from __future__ import annotations

import functools
import os

from torch import Tensor

try:
    import triton  # noqa: F401  (only to learn whether it is installed)

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the machine
    HAS_TRITON = False


def interpreting() -> bool:
    return HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"


def triton_usable(t: Tensor) -> bool:
    """Triton compiles for CUDA tensors; CPU tensors need Triton's interpreter."""
    return HAS_TRITON and (t.is_cuda or interpreting())


@functools.cache
def _patch_interpreter() -> None:
    # Triton 3.6's interpreter turns 1-element arrays into ints with int(), an error from NumPy 2.4 on.
    from triton.runtime import interpreter as ti  # noqa: PLC0415  (only ever loaded when interpreting)

    orig = ti._patch_lang_tensor

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    ti._patch_lang_tensor = patched


def require_triton(t: Tensor) -> None:
    """Raise unless the kernels can run on `t`'s device (and ready the interpreter on CPU)."""
    if not triton_usable(t):
        raise RuntimeError(
            "the Triton SS2D kernels need CUDA tensors (or TRITON_INTERPRET=1 set before "
            "triton is imported, to interpret it on CPU)"
        )
    if interpreting():
        _patch_interpreter()


__all__ = ["HAS_TRITON", "interpreting", "require_triton", "triton_usable"]
