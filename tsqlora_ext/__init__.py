"""tsqlora_ext: sensitivity- and quality-aware variable-rank LoRA (TsqLoRA) with a native core."""

import importlib.util
import os

import torch

try:
    from . import _build_config
except ImportError as e:
    # _build_config (and _C) are written by the build, not kept in the source tree: importing the
    # tree of a regular (non-editable) install finds neither, and Python's own message blames a
    # circular import.
    raise ImportError(
        f"tsqlora_ext: {os.path.dirname(os.path.abspath(__file__))} is an unbuilt source tree (it "
        "has no _build_config, which the build writes): build it in place with  pip install "
        "--no-build-isolation -e .  or run from outside the source tree to use the installed "
        "package"
    ) from e


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


__all__ = ["build_info", "__version__"]

# ---- user API: config, wrap / unwrap, adapter files (issue 6) ------------------------------------
from .adapter_io import export_peft, load_adapter, save_adapter  # noqa: E402
from .config import TsqLoRAConfig  # noqa: E402
from .layers import VarRankLoRALinear  # noqa: E402
from .wrap import adapted_layers, trainable_summary, unwrap, wrap  # noqa: E402

__all__ += [
    "TsqLoRAConfig", "VarRankLoRALinear", "wrap", "unwrap", "trainable_summary", "adapted_layers",
    "save_adapter", "load_adapter", "export_peft",
]

# ---- rank allocation (issue 4) -------------------------------------------------------------------
from .allocator import RankAllocator  # noqa: E402

__all__ += ["RankAllocator"]

# ---- data selection (issue 5) --------------------------------------------------------------------
from .selector import GateConfig, SelectionResult, select  # noqa: E402

__all__ += ["GateConfig", "SelectionResult", "select"]

# ---- quality score and wrong-label guard (issues 5 and 9) ----------------------------------------
from .mislabel import flag_mislabeled, mislabel_probability  # noqa: E402
from .quality import (  # noqa: E402
    QualityScores, read_scores, score_pool, score_pool_from_config, warmup, write_scores,
)

__all__ += [
    "QualityScores", "flag_mislabeled", "mislabel_probability", "read_scores", "score_pool",
    "score_pool_from_config", "warmup", "write_scores",
]

# ---- training: loop, Trainer callback, pipeline (issue 7) ----------------------------------------
from .train import TokenizedData, TrainArgs, TrainResult, evaluate  # noqa: E402
from .train import train  # noqa: E402  (the function; the module stays importable as tsqlora_ext.train)

__all__ += ["train", "TrainArgs", "TrainResult", "TokenizedData", "evaluate"]
# The callback needs transformers, which the core package does not require: star-imports list it
# only where it can be imported.
if importlib.util.find_spec("transformers") is not None:
    __all__ += ["TsqLoRACallback"]


def __getattr__(name: str):
    # The callback imports transformers, which the core package does not require.
    if name == "TsqLoRACallback":
        from .callback import TsqLoRACallback
        return TsqLoRACallback
    raise AttributeError(f"module 'tsqlora_ext' has no attribute {name!r}")
