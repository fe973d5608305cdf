"""Settings that are easy to get wrong are reported at start: an AMSKV_* variable that no setting reads (a typo
such as AMSKV_MAX_QUEUE_IMAGE=5 used to be ignored silently) and fault injection left on."""
from __future__ import annotations

import pytest

from server.settings import OTHER_VARIABLES, unknown_variables
from tests.server.test_api import Server


def test_an_unknown_variable_is_named_with_the_closest_setting():
    environ = {"AMSKV_MAX_QUEUE_IMAGE": "5", "AMSKV_MAX_BATCH": "8", "PATH": "/bin", "AMSKV_NO_SUCH_THING": "1",
               **{name: "x" for name in OTHER_VARIABLES}}
    assert unknown_variables(environ) == [
        "unknown setting AMSKV_MAX_QUEUE_IMAGE is ignored; did you mean AMSKV_MAX_QUEUE_IMAGES?",
        "unknown setting AMSKV_NO_SUCH_THING is ignored"]


@pytest.mark.slow  # starts a real server process
def test_the_server_warns_at_start_about_a_typo_and_about_fault_injection(tmp_path):
    srv = Server(tmp_path, {"AMSKV_MAX_QUEUE_IMAGE": "5", "AMSKV_FAULT_INJECTION": "1"})
    srv.stop()
    lines = srv.log.read_text(errors="replace").splitlines()
    typo = [line for line in lines if "AMSKV_MAX_QUEUE_IMAGE " in line]
    assert typo and "WARNING" in typo[0] and "did you mean AMSKV_MAX_QUEUE_IMAGES?" in typo[0], lines[:20]
    faults = [line for line in lines if "AMSKV_FAULT_INJECTION is on" in line]
    assert faults and "WARNING" in faults[0] and "never in production" in faults[0], lines[:20]
