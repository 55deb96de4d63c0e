"""shared-dist under hostile input: a clear error naming the argument, never a silent mix-up or a hang."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import shared_dist
from shared_dist.testing import launch

SINGLE_PROCESS_CASES = {
    "gather a string": (lambda: shared_dist.gather("abc"), TypeError, "got str at data"),
    "gather a nested string": (
        lambda: shared_dist.gather({"a": [torch.zeros(1), "x"]}),
        TypeError,
        r"got str at data\.a\[1\]",
    ),
    "reduce op": (lambda: shared_dist.reduce(torch.zeros(2), "max2"), ValueError, "op must be one of"),
    "reduce a string": (lambda: shared_dist.reduce("x"), TypeError, "got str at data"),
    "local_slice rank": (
        lambda: shared_dist.local_slice([0, 2, 4], rank=5),
        ValueError,
        r"rank must be in \[0, 2\)",
    ),
    "local_slice no offsets": (
        lambda: shared_dist.local_slice([]),
        ValueError,
        "offsets must be the world_size",
    ),
    "broadcast src": (
        lambda: shared_dist.broadcast_object(1, src=3),
        ValueError,
        r"src must be a rank in \[0, 1\)",
    ),
    "launch world_size": (
        lambda: shared_dist.testing.launch(print, 0),
        ValueError,
        "world_size must be >= 1",
    ),
}


@pytest.mark.parametrize("case", list(SINGLE_PROCESS_CASES))
def test_bad_argument_is_named(case):
    run, error, match = SINGLE_PROCESS_CASES[case]
    with pytest.raises(error, match=match):
        run()


# Cases that fail in step on every rank share one launch of 2 processes (debug mode is read at each
# call, so each case sets its own); the cases that wait out a timeout keep a launch of their own.
CASES = [("dict order", "0"), ("dict order", "1"), ("reduce", "0", "shape"), ("reduce", "0", "structure"),
         ("reduce", "0", "key order"), ("structures", "0"), ("structures", "1")]  # fmt: skip


def _w_cases(cases: list[tuple]) -> list:
    import os

    workers = {"dict order": _w_dict_order, "reduce": _w_reduce_mismatch, "structures": _w_gather_structures}
    out = []
    for name, debug, *args in cases:
        os.environ["SHARED_DIST_DEBUG"] = debug
        out.append(workers[name](*args))
    return out


@pytest.fixture(scope="module")
def ran():
    """``ran(name, debug, *args)``: the per-rank results of that case."""
    per_rank = launch(_w_cases, 2, (CASES,), timeout=120)
    results = {repr(case): [rank[i] for rank in per_rank] for i, case in enumerate(CASES)}
    return lambda *case: results[repr(case)]


def _w_dict_order() -> dict:
    rank = dist.get_rank()
    a, b = torch.full((2, 3), float(rank)), torch.full((1 + rank, 5), 10.0 + rank)
    data = {"a": a, "b": b} if rank == 0 else {"b": b, "a": a}  # keys inserted in another order
    out = shared_dist.gather(data)
    return {"keys": list(out), "a": out["a"], "b": out["b"]}


@pytest.mark.distributed
@pytest.mark.parametrize("debug", ["0", "1"])
def test_dict_keys_in_another_order_per_rank_gather_by_key(debug, ran):
    results = ran("dict order", debug)
    expect_a = torch.cat([torch.full((2, 3), 0.0), torch.full((2, 3), 1.0)])
    expect_b = torch.cat([torch.full((1, 5), 10.0), torch.full((2, 5), 11.0)])
    for rank, res in enumerate(results):
        assert res["keys"] == (["a", "b"] if rank == 0 else ["b", "a"])  # each caller's own order
        assert torch.equal(res["a"], expect_a) and torch.equal(res["b"], expect_b)


def _w_after_a_raise(op: str) -> str:
    """Rank 1 raises, then cleans up with a barrier (a DIFFERENT collective than rank 0's ``op``)."""
    import time

    rank, t0 = dist.get_rank(), time.monotonic()
    run = {
        "gather": lambda: shared_dist.gather(torch.ones(2, 3), return_offsets=True),
        "gather_object": lambda: shared_dist.gather_object({"rank": rank}),
        "broadcast_object": lambda: shared_dist.broadcast_object("config", src=0),
        "check_same": lambda: shared_dist.check_same(3, "steps"),
    }[op]
    try:
        if rank == 1:
            try:
                raise ValueError(f"rank 1 failed before the {op}")
            finally:
                shared_dist.barrier()  # the usual cleanup
        run()
        return "no error"
    except Exception as err:
        return f"{type(err).__name__} after {time.monotonic() - t0:.1f}s: {err}"


@pytest.mark.distributed
def test_a_rank_that_raises_makes_the_others_fail_within_the_bound():
    # without the bound, rank 0 would wait in its gather for the process group's 60 s here
    results = launch(
        _w_after_a_raise, 2, ("gather",), timeout=60, pg_timeout=60, env={"SHARED_DIST_TIMEOUT": "3"}
    )
    assert results[0].startswith("DistributedOperationError"), results[0]
    assert "gather on rank 0 failed: the other ranks did not complete it" in results[0]
    assert "waits at most 0:00:03" in results[0]
    assert float(results[0].split(" after ")[1].split("s:")[0]) < 15, results[0]
    assert results[1].startswith(("ValueError", "DistributedOperationError")), results[1]


def _w_reduce_mismatch(kind: str) -> str:
    rank = dist.get_rank()
    if kind == "shape":
        data = {"x": torch.ones(2 + rank)}
    elif kind == "structure":  # rank 1 has one more tensor: one more all_reduce than rank 0
        data = {"x": torch.ones(2)} if rank == 0 else {"x": torch.ones(2), "y": torch.ones(2)}
    else:  # same structure, keys inserted in another order: fine, paired by key
        data = {"x": torch.ones(2), "y": torch.full((3,), 2.0)}
        data = data if rank == 0 else dict(reversed(list(data.items())))
    try:
        out = shared_dist.reduce(data, "sum")
        return repr({k: out[k].tolist() for k in sorted(out)})
    except shared_dist.DistributedOperationError as err:
        return f"DistributedOperationError: {err}"


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["shape", "structure", "key order"])
def test_reduce_mismatch_without_debug_mode_is_named(kind, ran):
    # without the structure check, gloo reported these as a connection error (or hung)
    results = ran("reduce", "0", kind)
    if kind == "key order":
        assert results == [repr({"x": [2.0, 2.0], "y": [4.0, 4.0, 4.0]})] * 2
        return
    for res in results:
        assert res.startswith("DistributedOperationError: reduce('sum'): every rank must pass the same"), res
        assert "rank 0:" in res and "rank 1:" in res
    if kind == "shape":
        assert "(2,)" in results[0] and "(3,)" in results[0]


@pytest.mark.distributed
@pytest.mark.parametrize("op", ["gather_object", "broadcast_object", "check_same"])
def test_object_collectives_have_the_bounded_wait(op):
    # torch's object collectives wait for the process group's timeout (60 s here, 30 min by default)
    results = launch(_w_after_a_raise, 2, (op,), timeout=60, pg_timeout=60, env={"SHARED_DIST_TIMEOUT": "3"})
    assert results[0].startswith("DistributedOperationError"), results[0]
    assert "waits at most 0:00:03" in results[0]
    assert float(results[0].split(" after ")[1].split("s:")[0]) < 15, results[0]


def _w_objects() -> list:
    rank = dist.get_rank()
    obj = {"rank": rank, "text": "é" * (1000 * rank), "ids": list(range(rank))}
    return [shared_dist.gather_object(obj), shared_dist.broadcast_object(obj, src=2)]


@pytest.mark.distributed
def test_object_collectives_round_trip_unequal_sizes():
    results = launch(_w_objects, 3, timeout=60)
    want = [{"rank": r, "text": "é" * (1000 * r), "ids": list(range(r))} for r in range(3)]
    assert all(res == [want, want[2]] for res in results)


def _w_gather_structures() -> dict[str, str]:
    """Every case in one launch: after each refused gather the ranks are still in step (the last
    case is a valid gather)."""
    rank = dist.get_rank()
    x, y = torch.full((1 + rank, 2), float(rank)), torch.full((2, 2), 5.0 + rank)
    cases = {
        # the same shapes under other names: without the check, rank 0's "a" met rank 1's "b"
        "other keys": {"a": x, "c": y} if rank == 0 else {"b": x, "c": y},
        "one extra key": {"a": x} if rank == 0 else {"a": x, "z": y},  # gloo aborted the process
        "list of another length": [x, y] if rank == 0 else [x],
        "tuple vs list": (x, y) if rank == 0 else [x, y],
        "another trailing shape": {"a": x} if rank == 0 else {"a": torch.zeros(1, 3)},  # its own message
        "valid afterwards": {"a": x, "c": y},
    }
    out = {}
    for name, data in cases.items():
        try:
            got = shared_dist.gather(data)
            out[name] = repr({k: v.tolist() for k, v in got.items()})
        except shared_dist.DistributedOperationError as err:
            out[name] = f"DistributedOperationError: {err}"
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("debug", ["0", "1"])
def test_gather_refuses_structures_that_differ_across_ranks(debug, ran):
    results = ran("structures", debug)
    for res in results:
        for case in ("other keys", "one extra key", "list of another length", "tuple vs list"):
            assert res[case].startswith("DistributedOperationError: gather: every rank must pass the same"), (
                case,
                res[case],
            )
            assert "rank 0:" in res[case] and "rank 1:" in res[case], res[case]
        assert "must agree on every dim but dim 0" in res["another trailing shape"] or debug == "1", res
        want = {"a": [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]], "c": [[5.0] * 2] * 2 + [[6.0] * 2] * 2}
        assert res["valid afterwards"] == repr(want)


@pytest.mark.parametrize("value", ["ten", "-1", "nan", ""])
def test_an_environment_variable_that_does_not_parse_is_named(monkeypatch, value):
    from shared_dist.operations import _collective_timeout

    monkeypatch.setenv("SHARED_DIST_TIMEOUT", value)
    with pytest.raises(
        ValueError,
        match=rf"environment variable SHARED_DIST_TIMEOUT must be a number of seconds >= 0, got '{value}'",
    ):
        _collective_timeout()
