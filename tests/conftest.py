"""Suite-wide settings.

One torch thread per test process: the tests use tiny tensors, where a
second OpenMP thread only adds synchronisation (and on a shared 2-core
machine oversubscription made some files 10x slower). The decode cache goes
to a temporary folder so tests never write into the home directory.
"""
from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


class _Routed:
    """A step whose calls go to ``fn(step, ...)``; the rest of the step's interface (its lr span) is the step's."""

    def __init__(self, step, fn):
        self.step, self.fn = step, fn

    def __call__(self, *args, **kwargs):
        return self.fn(self.step, *args, **kwargs)

    def lr_span(self, *args):
        return self.step.lr_span(*args)

    def metrics(self):
        return self.step.metrics()


@pytest.fixture
def route_steps(monkeypatch):
    """``route_steps(fn)``: every step `train` runs calls ``fn(step, *args, **kw)`` instead, ``step``
    being the step object it would have run (`localssl.engine.step`); ``route_steps(None)`` undoes it."""
    from localssl.engine import trainer as trainer_mod

    real_build = trainer_mod.build_step

    def route(fn):
        if fn is None:
            monkeypatch.setattr(trainer_mod, "build_step", real_build)
            return
        monkeypatch.setattr(trainer_mod, "build_step", lambda *a, **k: _Routed(real_build(*a, **k), fn))

    return route


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LOCALSSL_CACHE", str(tmp_path_factory.getbasetemp() / "localssl-cache"))


# In CI (CI=true) a skipped test is a failure: a suite that skips the
# real-data or MNIST tests because ../shared is missing, or a plot test because
# matplotlib did not install, would otherwise pass without testing them. A
# skip that is right on some machines says so with a reason that starts with
# "not applicable" (e.g. glibc-only allocator tuning).
NOT_APPLICABLE = "not applicable"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") != "true" or not report.skipped:
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if reason.removeprefix("Skipped: ").startswith(NOT_APPLICABLE):
        return
    report.outcome = "failed"
    report.longrepr = f"skipped in CI, where every test must run: {reason}"
