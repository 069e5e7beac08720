"""Shared fixtures, and how `make test` spreads modules over its two pytest-xdist workers."""

from __future__ import annotations

import pytest
import torch

# Modules that load the local Triton for minutes (soak, overload, a 30 s perf_analyzer run, a drain under load) or
# time its answers (the fuzzer's 5 s hang limit): `make test` runs them one after another on one worker, so none of
# them shares the cores with another of them. (A 64 MiB fuzzed request once took over 5 s beside the two soak runs.)
SERIAL_SCOPE = "triton-under-load"
UNDER_LOAD = frozenset({
    "tests/benchmarks_tests/test_soak_benchmark.py",
    "tests/benchmarks_tests/test_overload_benchmark.py",
    "tests/serving_tests/test_fuzz.py",
    "tests/serving_tests/test_model_updates.py",
    "tests/serving_tests/test_drain.py",
})


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """--dist loadfile (make test's): one work unit per module, except the modules in UNDER_LOAD, which form one."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class Scheduler(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = super()._split_scope(nodeid)
            return SERIAL_SCOPE if path in UNDER_LOAD else path

    return Scheduler(config, log)


@pytest.fixture()
def one_thread():
    """Tiny tensors on a busy 2-core machine: one torch thread is several times faster than two."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
