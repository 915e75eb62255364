"""tsqlora_ext: sensitivity- and quality-aware variable-rank LoRA (TsqLoRA) with a native core."""

import torch

from . import _build_config


def _check_torch_matches_build() -> None:
    # The extension is compiled against torch's C++ ABI, which changes between releases (and between
    # CPU and CUDA builds of one release). Loading it under another torch can fail with undefined
    # symbols or, worse, load and corrupt memory, so refuse before touching _C.
    if torch.__version__ != _build_config.TORCH_VERSION:
        raise ImportError(
            f"tsqlora_ext {_build_config.VERSION} was built against torch "
            f"{_build_config.TORCH_VERSION}, but torch {torch.__version__} is installed. Rebuild it "
            "against the installed torch:  pip install --force-reinstall --no-deps .  (from the "
            "source tree; developers: pip install --no-build-isolation -e .)"
        )


_check_torch_matches_build()

from . import _C  # noqa: E402  (must follow the ABI check)

__version__ = _build_config.VERSION


def build_info() -> dict:
    """What the native extension was compiled with.

    Keys: ``version``, ``torch`` (the torch it was built against), ``cuda`` (True when the CUDA
    kernels were compiled), ``cuda_archs``, ``cpu_threads`` (intra-op threads now in use).
    """
    return dict(_C.build_info())


from .allocator import RankAllocator  # noqa: E402

__all__ = ["build_info", "__version__", "RankAllocator"]
