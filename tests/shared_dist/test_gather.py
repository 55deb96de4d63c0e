"""shared_dist.gather on real gloo process groups, checked against one process."""

from __future__ import annotations

import os
import time
from collections import namedtuple

import pytest
import torch
import torch.distributed as dist

import shared_dist
from shared_dist.testing import launch
from tests.shared_dist.helpers import global_loss, inputs, local_loss, reference, small_model

pytestmark = pytest.mark.distributed

Pair = namedtuple("Pair", "x y")


def _rows(rank: int, n: int, d: int = 4) -> torch.Tensor:
    """Rank-tagged rows, different on every rank so a mix-up shows."""
    base = torch.arange(n * d, dtype=torch.float32).view(n, d)
    return base + 1000.0 * (rank + 1)


# ---------------------------------------------------------------- one launch per world size

# Every case that needs no environment of its own, run in order on the same processes (accelerate's
# test_utils/scripts/test_ops.py pattern): one launch per world size instead of one per case. The
# bounds case runs first, since it counts the collectives a cold gather issues. The timeout cases,
# the debug-mode cases (an environment variable) and the launcher's own failure keep their launch.
CASES = {
    2: [("bounds", 2), ("values", [3, 5]), ("values", [4, 4]), ("values", [0, 3]), ("values", [0, 0]),
        ("grads", [3, 5], "global"), ("grads", [3, 5], "local"), ("plain", [4, 4]),
        ("errors", "trailing"), ("errors", "dtype"), ("errors", "check_same"), ("errors", "device")],
    3: [("bounds", 3), ("values", [3, 0, 5]), ("values", [2, 2, 2]), ("grads", [3, 0, 5], "global"),
        ("grads", [2, 3, 4], "local"), ("queue", 60)],
}  # fmt: skip


def _w_cases(cases: list[tuple]) -> list:
    workers = {"values": _w_values, "bounds": _w_bounds, "grads": _w_grads,
               "plain": _w_plain_all_gather_loses_grads, "errors": _w_errors, "queue": _w_queue}  # fmt: skip
    return [workers[name](*args) for name, *args in cases]


@pytest.fixture(scope="module")
def ran():
    """``ran(name, *args)``: the per-rank results of that case, from one launch per world size."""
    results = {}
    for world, cases in CASES.items():
        per_rank = launch(_w_cases, world, (cases,), timeout=240)
        for i, case in enumerate(cases):
            results[repr(case)] = [rank[i] for rank in per_rank]
    return lambda *case: results[repr(case)]


# ---------------------------------------------------------------- values, sizes, order


def _w_values(sizes: list[int]) -> dict:
    rank = dist.get_rank()
    out = {}
    x = _rows(rank, sizes[rank])
    out["plain"] = shared_dist.gather(x, return_offsets=True)
    # non-contiguous input: a transposed view
    xt = _rows(rank, sizes[rank], 6).t().contiguous().t()[:, ::2]
    assert sizes[rank] < 2 or not xt.is_contiguous()
    out["noncontig"] = shared_dist.gather(xt)
    out["nested"] = shared_dist.gather(
        {"a": x, "b": [x[:, 0].long(), Pair(x.view(-1, 2, 2), x[:, :1])]}, return_offsets=True
    )
    out["scalar"] = shared_dist.gather(torch.tensor(float(rank)))
    out["objects"] = shared_dist.gather_object({"rank": rank, "ids": [f"doc{rank}"] * sizes[rank]})
    out["bcast"] = shared_dist.broadcast_object(f"from{rank}", src=dist.get_world_size() - 1)
    out["sum"] = shared_dist.reduce(torch.full((2,), float(rank)), "sum")
    out["mean"] = shared_dist.reduce(torch.full((2,), float(rank)), "mean")
    out["slice"] = shared_dist.local_slice(out["plain"][1])
    return out


@pytest.mark.parametrize("sizes", [[3, 5], [4, 4], [0, 3], [0, 0], [3, 0, 5], [2, 2, 2]])
def test_gather_values_in_rank_order(sizes, ran):
    world = len(sizes)
    results = ran("values", sizes)
    expect = torch.cat([_rows(r, n) for r, n in enumerate(sizes)])
    offsets = tuple([0, *torch.tensor(sizes).cumsum(0).tolist()])
    for rank, res in enumerate(results):
        gathered, offs = res["plain"]
        assert torch.equal(gathered, expect)
        assert offs == offsets
        assert res["slice"] == slice(offsets[rank], offsets[rank + 1])
        expect_nc = torch.cat([_rows(r, n, 6)[:, ::2] for r, n in enumerate(sizes)])
        assert torch.equal(res["noncontig"], expect_nc)
        nested, noffs = res["nested"]
        assert torch.equal(nested["a"], expect)
        assert torch.equal(nested["b"][0], expect[:, 0].long())
        assert isinstance(nested["b"][1], Pair)
        assert torch.equal(nested["b"][1].x, expect.view(-1, 2, 2))
        assert torch.equal(nested["b"][1].y, expect[:, :1])
        assert noffs["b"][1].x == offsets
        assert torch.equal(res["scalar"], torch.arange(world, dtype=torch.float32))
        assert res["objects"] == [{"rank": r, "ids": [f"doc{r}"] * n} for r, n in enumerate(sizes)]
        assert res["bcast"] == f"from{world - 1}"
        total = float(sum(range(world)))
        assert torch.equal(res["sum"], torch.full((2,), total))
        assert torch.allclose(res["mean"], torch.full((2,), total / world))


# One step per row: the per-rank (rows, dtype, trailing dim) and the collectives that gather must
# issue. A step whose data fit the bound left by the previous step (the largest rank's bytes, rounded
# up to 16) costs one collective; a first call, or data that outgrow the bound, cost two.
_SEQUENCE = [
    ([3, 5], torch.float32, 4, 2),  # cold: sizes first, then the data
    ([3, 5], torch.float32, 4, 1),
    ([5, 3], torch.float32, 4, 1),  # other rank is largest, same bound
    ([4, 4], torch.float32, 4, 1),  # smaller: fits, padded; the bound shrinks to 64 bytes
    ([4, 4], torch.float32, 4, 1),  # equal sizes at the bound: the received buffer is the result
    ([6, 1], torch.float32, 4, 2),  # outgrows the bound: sent again
    ([6, 1], torch.float64, 4, 2),  # same rows, twice the bytes
    ([0, 0], torch.float64, 4, 1),  # nothing anywhere; the bound drops to 0
    ([2, 2], torch.float64, 4, 2),  # from a zero bound: sizes first again
    ([3, 3], torch.int8, 5, 1),  # 15 bytes per rank fit the 64 left by float64; the bound drops to 16
    ([3, 3], torch.int8, 5, 1),  # 15 of 16 bytes: each rank's slice, not the whole buffer
    ([2, 3], torch.bool, 5, 1),
    ([1, 2], torch.complex128, 4, 2),
]


def _w_bounds(world: int) -> list:
    from shared_dist import operations as ops

    rank, calls = dist.get_rank(), {"n": 0}
    for name in ("_all_gather_single", "_all_gather_coalesced"):
        original = getattr(ops, name)

        def counted(*a, _original=original, **k):
            calls["n"] += 1
            return _original(*a, **k)

        setattr(ops, name, counted)
    seen = []
    for sizes, dtype, d, _ in _SEQUENCE:
        sizes = (sizes * 2)[:world]
        calls["n"] = 0
        got = shared_dist.gather(_rows(rank, sizes[rank], d).to(dtype))
        seen.append((got, calls["n"]))
    # a warm bound must not turn a shape mismatch into a hang or a garbled transfer
    try:
        shared_dist.gather(_rows(rank, 3, 4 + rank))
    except shared_dist.DistributedOperationError as err:
        seen.append(str(err))
    return seen


@pytest.mark.parametrize("world", [2, 3])
def test_repeated_gathers_send_sizes_with_the_data(world, ran):
    for seen in ran("bounds", world):
        for (sizes, dtype, d, collectives), (got, n) in zip(_SEQUENCE, seen):
            sizes = (sizes * 2)[:world]
            expect = torch.cat([_rows(r, sizes[r], d).to(dtype) for r in range(world)])
            assert got.dtype == dtype and torch.equal(got, expect), (sizes, dtype)
            assert n == collectives, (sizes, dtype, n)
        assert "must agree on every dim but dim 0" in seen[-1] and "rank 1: rows=3" in seen[-1]


def test_single_process_is_identity():
    assert not dist.is_initialized()
    x = torch.randn(3, 2, requires_grad=True)
    assert shared_dist.gather(x) is x
    out, offs = shared_dist.gather({"k": x}, return_offsets=True)
    assert out["k"] is x and offs == {"k": (0, 3)}
    assert shared_dist.gather_object("a") == ["a"]
    assert shared_dist.local_slice((0, 3)) == slice(0, 3)
    with pytest.raises(TypeError, match="expected a tensor"):
        shared_dist.gather({"k": "not a tensor"})


# ---------------------------------------------------------------- gradients vs one process


def _w_grads(sizes: list[int], use: str) -> dict:
    rank = dist.get_rank()
    model = torch.nn.parallel.DistributedDataParallel(small_model())
    x = inputs(sizes)[rank].requires_grad_(True)
    z = model(x)  # (B_r, 5)
    q, k = z[:, :4], z[:, 1:]  # two "views" of the same rows
    if use == "global":
        loss = global_loss(shared_dist.gather(q), shared_dist.gather(k))
    else:
        k_all, offsets = shared_dist.gather(k, return_offsets=True)
        mine = shared_dist.local_slice(offsets)
        loss = local_loss(q, k_all, torch.arange(mine.start, mine.stop))
    loss.backward()
    return {
        "params": [p.grad.clone() for p in model.parameters()],
        "x_grad": x.grad.clone(),
    }


@pytest.mark.parametrize(
    "sizes,use",
    [([3, 5], "global"), ([3, 5], "local"), ([3, 0, 5], "global"), ([2, 3, 4], "local")],
)
def test_gradients_match_single_process(sizes, use, ran):
    world = len(sizes)
    results = ran("grads", sizes, use)
    ref_params, ref_x = reference(sizes, use)
    offs = [0, *torch.tensor(sizes).cumsum(0).tolist()]
    for rank, res in enumerate(results):
        # DDP-averaged parameter gradients equal the single-process ones
        for got, want in zip(res["params"], ref_params):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        # the stated rule: a rank's input gradient is the SUM over ranks, i.e. W x the
        # gradient of the mean-over-ranks loss computed in one process
        torch.testing.assert_close(
            res["x_grad"], world * ref_x[offs[rank] : offs[rank + 1]], rtol=1e-5, atol=1e-6
        )


def _w_plain_all_gather_loses_grads(sizes: list[int]) -> list[torch.Tensor]:
    """The failure the package exists for: a plain all_gather cuts the graph."""
    rank = dist.get_rank()
    model = torch.nn.parallel.DistributedDataParallel(small_model())
    z = model(inputs(sizes)[rank])
    parts = [torch.empty_like(z) for _ in sizes]
    dist.all_gather(parts, z.detach())
    parts[rank] = z
    global_loss(torch.cat(parts)[:, :4], torch.cat(parts)[:, 1:]).backward()
    return [p.grad.clone() for p in model.parameters()]


def test_reference_detects_plain_all_gather_bug(ran):
    """Guards the parity test itself: the no-grad gather gives different gradients."""
    sizes = [4, 4]
    results = ran("plain", sizes)
    ref_params, _ = reference(sizes, "global")
    assert not all(torch.allclose(g, w, rtol=1e-4) for g, w in zip(results[0], ref_params))


# ---------------------------------------------------------------- errors instead of hangs


def _w_errors(case: str) -> str:
    rank = dist.get_rank()
    try:
        if case == "trailing":
            shared_dist.gather(torch.zeros(2, 3 + rank))
        elif case == "dtype":
            shared_dist.gather(torch.zeros(2, 3, dtype=torch.float32 if rank == 0 else torch.float64))
        elif case == "structure":  # only caught in debug mode
            data = {"a": torch.zeros(2, 3)} if rank == 0 else {"a": torch.zeros(2, 3), "b": torch.zeros(1)}
            shared_dist.gather(data)
        elif case == "device":
            shared_dist.gather(torch.zeros(2, 3, device="meta"))
        elif case == "check_same":
            shared_dist.check_same(4 + rank, "num_negatives")
        elif case == "missing_rank":
            if rank == 1:
                time.sleep(5)  # never calls the collective in time (the timeouts are 3 s)
                return "slept"
            t0 = time.monotonic()
            try:
                shared_dist.gather(torch.zeros(2, 3))
            finally:
                os.environ["ELAPSED"] = f"{time.monotonic() - t0:.1f}"
        return "no error"
    except Exception as err:
        return f"{type(err).__name__}: {err} [elapsed={os.environ.get('ELAPSED', '')}]"


@pytest.mark.parametrize("case", ["trailing", "dtype", "check_same"])
def test_mismatch_raises_naming_every_rank(case, ran):
    results = ran("errors", case)
    for msg in results:
        assert msg.startswith("DistributedOperationError"), msg
        assert "rank 0" in msg and "rank 1" in msg, msg
    if case == "trailing":
        assert "trailing dims=[3]" in results[0] and "trailing dims=[4]" in results[0]


def test_wrong_device_raises(ran):
    results = ran("errors", "device")
    assert all("gloo backend" in m and "meta" in m for m in results), results


def test_debug_mode_catches_structure_mismatch():
    results = launch(_w_errors, 2, ("structure",), timeout=60, env={"SHARED_DIST_DEBUG": "1"})
    for msg in results:
        assert msg.startswith("DistributedOperationError"), msg
        assert "rank 0: {'a'" in msg and "'b'" in msg, msg


def test_debug_mode_names_missing_rank():
    env = {"SHARED_DIST_DEBUG": "1", "SHARED_DIST_DEBUG_TIMEOUT": "3"}
    results = launch(_w_errors, 2, ("missing_rank",), timeout=60, env=env)
    assert results[1] == "slept"
    assert results[0].startswith("DistributedOperationError"), results[0]
    assert "1" in results[0].split("within")[1], results[0]  # names rank 1
    assert float(results[0].rsplit("elapsed=", 1)[1].rstrip("]")) < 10


def test_missing_rank_times_out_without_debug_mode():
    results = launch(_w_errors, 2, ("missing_rank",), timeout=60, pg_timeout=3)
    assert results[0] != "no error" and "Error" in results[0], results[0]
    assert float(results[0].rsplit("elapsed=", 1)[1].rstrip("]")) < 10


def _w_fail() -> None:
    if dist.get_rank() == 1:
        raise ValueError("boom on rank 1")
    time.sleep(60)


def test_launcher_reports_failure_fast():
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="boom on rank 1"):
        launch(_w_fail, 2, timeout=50)
    assert time.monotonic() - t0 < 30


# ---------------------------------------------------------------- next_index: a shared work queue


def _w_queue(total: int) -> list[int]:
    mine = []
    while (k := shared_dist.next_index("queue")) < total:
        mine.append(k)
        time.sleep(0.002 * (dist.get_rank() + 1) ** 2)  # ranks of unequal speed
    assert shared_dist.next_index("other") >= 0  # another key is another counter
    # the store lives in rank 0's process: without a collective here, the fast rank 0 returned and ended
    # while rank 2 still drew ("Connection reset by peer" on a loaded machine: two launches at once)
    shared_dist.barrier()
    return mine


def test_next_index_hands_each_number_to_exactly_one_rank(ran):
    results = ran("queue", 60)
    taken = sorted(k for mine in results for k in mine)
    assert taken == list(range(60))  # none twice, none lost
    assert len(results[0]) > len(results[2]) > 0  # the fast rank took more: nobody waited for a share
    assert all(mine == sorted(mine) for mine in results)  # each rank's numbers increase


def test_next_index_in_one_process_counts_per_key():
    assert [shared_dist.next_index("one-process-a") for _ in range(3)] == [0, 1, 2]
    assert shared_dist.next_index("one-process-b") == 0
    with pytest.raises(ValueError, match="key must be a non-empty string"):
        shared_dist.next_index("")
