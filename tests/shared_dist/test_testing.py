"""shared_dist.testing.launch: how its ranks start."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.distributed as dist

from shared_dist.testing import launch

pytestmark = pytest.mark.distributed

MARK = "the module's own value"  # a spawned rank imports the module afresh and sees this


def _w_state() -> tuple[str, int, int, float]:
    x = torch.ones(256, 256)
    return MARK, torch.get_num_threads(), dist.get_world_size(), float((x @ x)[0, 0])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="launch forks on Linux only")
def test_ranks_are_forked_with_the_callers_state_where_safe_and_spawned_otherwise(monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "MARK", "set by the caller")
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the caller has run a 2-thread op: GNU OpenMP's team exists before the fork
    try:
        torch.ones(512, 512).matmul(torch.ones(512, 512)).sum()
    finally:
        torch.set_num_threads(before)
    # one thread per rank: forked, the caller's imports and state included (and no OpenMP hang)
    assert launch(_w_state, 2, timeout=60) == [("set by the caller", 1, 2, 256.0)] * 2
    # a rank of 2 threads would hang in a forked OpenMP; it is spawned: a fresh interpreter
    assert launch(_w_state, 1, threads=2, timeout=60) == [("the module's own value", 2, 1, 256.0)]
    assert launch(_w_state, 1, start_method="spawn", timeout=60) == [("the module's own value", 1, 1, 256.0)]
    with pytest.raises(ValueError, match=r"start_method must be one of .* got 'thread'"):
        launch(_w_state, 1, start_method="thread")
