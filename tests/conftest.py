"""Suite-wide settings.

One torch thread per test process: the tests use tiny tensors, where a
second OpenMP thread only adds synchronisation (and on a shared 2-core
machine oversubscription made some files 10x slower). The decode cache goes
to a temporary folder so tests never write into the home directory.
"""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LOCALSSL_CACHE", str(tmp_path_factory.getbasetemp() / "localssl-cache"))
