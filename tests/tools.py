"""External tools the tests use (promtool, prometheus, hadolint, Compose v2), installed by .ci/install-ops-tools.sh."""
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
    message = f"{name} not found on PATH or in {tools_bin}; run .ci/install-ops-tools.sh"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)
