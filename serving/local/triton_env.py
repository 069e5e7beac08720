"""Where the local Triton 2.51 pieces live (the ``nvidia-pytriton`` install), the backend directory
the local server needs, the server's process environment, and this project's cache folder.

Facts behind every choice here are in ``docs/design.md`` §11.6 (section "Running the real Triton
server here").
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from training.errors import KaemError

# The NGC image with the same server release as the bundled binary (NGC 24.10 = Triton 2.51.0);
# the Dockerfile's base tag must match, and a live test checks the binary reports this version.
LOCAL_TRITON_VERSION = "2.51.0"
LOCAL_TRITON_NGC_TAG = "24.10"

_SHIM_SOURCE = Path(__file__).with_name("ort_shim.py")


class TritonNotInstalled(KaemError):
    """The nvidia-pytriton package (which ships the tritonserver binary) is missing or incomplete."""


@dataclass(frozen=True)
class TritonInstall:
    """Paths inside the nvidia-pytriton install."""

    root: Path  # .../site-packages/pytriton/tritonserver
    libs: Path  # .../site-packages/nvidia_pytriton.libs

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "tritonserver"

    @property
    def caches(self) -> Path:
        return self.root / "caches"

    @property
    def python_backend_files(self) -> list[Path]:
        stub = self.root / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}"
        py = self.root / "backends" / "python"
        return [py / "libtriton_python.so", py / "triton_python_backend_utils.py",
                stub / "triton_python_backend_stub"]

    def lib(self, prefix: str) -> Path:
        """The auditwheel-renamed copy of a shared library, e.g. ``lib("libb64")``."""
        found = sorted(self.libs.glob(f"{prefix}-*.so*"))
        if not found:
            raise TritonNotInstalled(f"{prefix} not found in {self.libs}")
        return found[0]


@cache
def triton_install() -> TritonInstall:
    """Locate the tritonserver binary shipped by nvidia-pytriton (raise with an install hint)."""
    try:
        import pytriton
    except ImportError as err:
        raise TritonNotInstalled(
            "nvidia-pytriton is not installed: pip install -e '.[serve]' (it ships the tritonserver binary)"
        ) from err
    site = Path(pytriton.__file__).resolve().parent.parent
    inst = TritonInstall(root=site / "pytriton" / "tritonserver", libs=site / "nvidia_pytriton.libs")
    missing = [p for p in [inst.binary, inst.libs, *inst.python_backend_files] if not p.exists()]
    if missing:
        raise TritonNotInstalled(
            "the nvidia-pytriton install lacks " + ", ".join(map(str, missing))
            + f" (needs the Python {sys.version_info.major}.{sys.version_info.minor} stub):"
            " reinstall nvidia-pytriton==0.7.0"
        )
    return inst


def cache_dir() -> Path:
    """``$KAEM_CACHE_DIR``, else ``<project>/.cache`` in a source checkout, else ``~/.cache/kaem-serve``."""
    if os.environ.get("KAEM_CACHE_DIR"):
        return Path(os.environ["KAEM_CACHE_DIR"])
    project = Path(__file__).resolve().parents[2]
    if (project / "pyproject.toml").is_file():
        return project / ".cache"
    return Path.home() / ".cache" / "kaem-serve"


def build_backend_dir(parent: Path | None = None) -> Path:
    """A Triton ``--backend-directory`` with copies of the Python backend (symlinks make the server
    fail with "stub not found") and the onnxruntime shim as ``onnxruntime/model.py``.

    Idempotent: the folder name hashes its sources, and it appears atomically (built aside, renamed),
    so concurrent launchers never see a half-built directory."""
    inst = triton_install()
    sources = [*inst.python_backend_files, _SHIM_SOURCE]
    digest = hashlib.sha256()
    for src in sources:
        digest.update(src.name.encode() + src.read_bytes())
    parent = parent or cache_dir() / "triton_backends"
    final = parent / f"backends-{digest.hexdigest()[:16]}"
    if (final / "onnxruntime" / "model.py").is_file():
        return final
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=parent))
    (tmp / "python").mkdir()
    (tmp / "onnxruntime").mkdir()
    for src in inst.python_backend_files:
        shutil.copy2(src, tmp / "python" / src.name)
    shutil.copy2(_SHIM_SOURCE, tmp / "onnxruntime" / "model.py")
    try:
        tmp.rename(final)
    except OSError:  # another process won the race: its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def server_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for tritonserver: the bundled libraries plus this Python's libpython on
    ``LD_LIBRARY_PATH`` (the stub must load the venv's interpreter) and the venv's ``bin`` first on
    ``PATH`` (the stub finds its site-packages through ``python3``; otherwise "No module named numpy")."""
    env = dict(os.environ if base is None else base)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in [str(triton_install().libs), libdir, env.get("LD_LIBRARY_PATH", "")] if p
    )
    env["PATH"] = os.pathsep.join(p for p in [str(Path(sys.executable).parent), env.get("PATH", "")] if p)
    return env
