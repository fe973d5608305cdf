"""amskv.device.DeviceTimer on the CPU: the seconds between marks, in order (the CUDA path records events
instead and reads them once; no GPU was available to test it, see docs/benchmarks.md "Not measured yet")."""
from __future__ import annotations

import time

import torch

from amskv.device import DeviceTimer


def test_cpu_marks_give_the_wall_time_between_them_in_order():
    began = time.perf_counter()
    timer = DeviceTimer(torch.device("cpu"))
    for pause in (0.02, 0.0, 0.01):
        time.sleep(pause)
        timer.mark()
    seconds = timer.seconds()
    assert len(seconds) == 3 and all(s >= 0 for s in seconds)
    assert seconds[0] >= 0.02 and seconds[2] >= 0.01  # sleep never returns early
    assert sum(seconds) <= time.perf_counter() - began
