"""Loading of the compiled ``ilm_dist._C`` extension (``csrc/``), which registers ``torch.ops.ilm_dist.*``."""

from __future__ import annotations

import torch  # noqa: F401  (loads libtorch/libc10, which ilm_dist._C links against)

try:
    import ilm_dist._C  # noqa: F401
except ImportError as err:
    LOAD_ERROR: str | None = f"{type(err).__name__}: {err}"
else:
    LOAD_ERROR = None


def extension_available() -> bool:
    """Whether the C++/CUDA extension is built and importable."""
    return LOAD_ERROR is None
