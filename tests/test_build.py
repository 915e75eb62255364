"""The build foundation: build_info, the torch-ABI guard, and the TSQ_CUDA switch."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tsqlora_ext

REPO = Path(__file__).resolve().parents[1]


def test_build_info_reports_the_build():
    info = tsqlora_ext.build_info()
    assert info["version"] == tsqlora_ext.__version__
    assert info["torch"] == torch.__version__
    assert isinstance(info["cuda"], bool)
    assert info["cuda"] == bool(info["cuda_archs"])
    assert info["cpu_threads"] == torch.get_num_threads()
    if torch.version.cuda is None:
        assert info["cuda"] is False


def test_import_under_another_torch_says_how_to_rebuild(monkeypatch):
    from tsqlora_ext import _build_config

    monkeypatch.setattr(_build_config, "TORCH_VERSION", "1.0.0+elsewhere")
    with pytest.raises(ImportError, match=r"built against torch 1\.0\.0\+elsewhere.*pip install"):
        tsqlora_ext._check_torch_matches_build()


def test_package_import_is_refused_before_loading_C(monkeypatch, tmp_path):
    # A fresh interpreter whose torch "changed": the guard must fire before _C is loaded.
    code = (
        "import torch; torch.__version__ = '0.0.1'\n"
        "try:\n    import tsqlora_ext\nexcept ImportError as e:\n"
        "    import sys; assert 'tsqlora_ext._C' not in sys.modules; print('refused:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "refused:" in out.stdout and "Rebuild" in out.stdout


def _cmake() -> str | None:
    """The cmake of this environment (pip's, beside the interpreter) first: a system cmake may be
    older than the 3.28 the project needs."""
    here = Path(sys.executable).parent / "cmake"
    return str(here) if here.exists() else shutil.which("cmake")


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU-torch case")
@pytest.mark.skipif(_cmake() is None, reason="needs cmake")
def test_tsq_cuda_on_with_cpu_torch_fails_naming_the_cause(tmp_path):
    cmake = _cmake()
    out = subprocess.run(
        [cmake, "-S", str(REPO), "-B", str(tmp_path), "-G", "Ninja", "-DTSQ_CUDA=ON",
         "-DSKBUILD_PROJECT_VERSION=0.0.0", f"-DPython_EXECUTABLE={sys.executable}"],
        capture_output=True, text=True)
    assert out.returncode != 0
    assert "TSQ_CUDA=ON but the CUDA kernels cannot be built" in out.stderr
    assert "CPU-only build" in out.stderr


def test_build_never_writes_into_the_source_tree():
    # The CMake build dir is pip's temporary dir (or one the developer names outside the tree).
    assert not (REPO / "CMakeCache.txt").exists()
    assert not list((REPO / "tsqlora_ext").glob("_C*.so"))


def test_importing_an_unbuilt_source_tree_says_to_build_it(tmp_path):
    # A source tree without the build's outputs (what `import tsqlora_ext` finds from the checkout
    # of a regular install): the message names the folder and says to build it, not "circular import".
    pkg = tmp_path / "tsqlora_ext"
    pkg.mkdir()
    shutil.copy(REPO / "tsqlora_ext" / "__init__.py", pkg / "__init__.py")
    # Without an editable install's redirecting finder, as under a regular install.
    code = ("import sys\n"
            "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in type(f).__module__]\n"
            "import tsqlora_ext\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 1
    assert str(pkg) in out.stderr and "pip install" in out.stderr and "-e ." in out.stderr, out.stderr
    assert "outside the source tree" in out.stderr


def test_star_import_without_transformers(tmp_path):
    code = ("import sys; sys.modules['transformers'] = None\n"
            "from tsqlora_ext import *\n"
            "import tsqlora_ext; assert 'TsqLoRACallback' not in tsqlora_ext.__all__\n"
            "print('ok', wrap.__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0 and "ok wrap" in out.stdout, out.stderr
    pytest.importorskip("transformers")
    assert "TsqLoRACallback" in tsqlora_ext.__all__
