"""TaskBalancedBatchSampler: the per-rank task layout on 1, 2 and 3 processes (moved here from
test_training.py, so that the tests mirror the modules)."""

from __future__ import annotations

import pytest
from torch.utils.data import BatchSampler, ConcatDataset, SequentialSampler

import shared_dist
from conan_st import TaskBalancedBatchSampler, make_balanced_datasets
from shared_dist.testing import launch
from tests.conan.helpers import retrieval_ds, shared_passage_pairs, sts_rows


def _w_sampler(retrieval_ranks, sts_batch_size=3):
    dd = make_balanced_datasets(retrieval_ds(n=8), sts_rows(n=5))
    concat = ConcatDataset([dd["retrieval"], dd["sts"]])
    stub = [BatchSampler(SequentialSampler(range(len(d))), 2, True) for d in (dd["retrieval"], dd["sts"])]
    try:
        sampler = TaskBalancedBatchSampler(
            concat,
            stub,
            retrieval_batch_size=2,
            sts_batch_size=sts_batch_size,
            retrieval_ranks=retrieval_ranks,
        )
    except ValueError as err:
        return {"error": str(err)}
    return {"batches": list(sampler), "len": len(sampler), "world": shared_dist.get_world_size()}


def _w_samplers(cases: list[tuple]) -> list[dict]:
    """Every case on the same processes (one launch per world size)."""
    return [_w_sampler(*case) for case in cases]


def _check_layout(res: list[dict], world: int, r: int) -> None:
    assert res[0]["batches"] == res[1]["batches"]  # every rank builds the same stream
    batches, n_ret = res[0]["batches"], 8
    assert len(batches) == res[0]["len"] == 4 * world
    for step in range(4):
        group = batches[step * world : (step + 1) * world]
        ret = [[i for i in b if i < n_ret] for b in group]
        sts = [[i for i in b if i >= n_ret] for b in group]
        assert all(x == ret[0] and len(x) == 2 for x in ret[:r])  # same queries on retrieval ranks
        assert all(not x for x in ret[r:])
        carriers = range(world) if r == world else range(r, world)
        assert all(len(sts[k]) == 3 for k in carriers)
        assert all(not sts[k] for k in range(world) if k not in carriers)


@pytest.mark.distributed
def test_sampler_layout_on_three_ranks():
    (res,) = zip(*launch(_w_samplers, 3, ([(2,)],), timeout=60))
    _check_layout(res, 3, 2)


@pytest.mark.distributed
def test_sampler_layout_and_retrieval_only_on_two_ranks():
    layout, retrieval_only, sts_rank_idle = zip(
        *launch(_w_samplers, 2, ([(2,), (2, 0), (1, 0)],), timeout=60)
    )
    _check_layout(layout, 2, 2)
    # sts_batch_size=0: dynamic mining without STS; every rank the same retrieval rows, none idle
    assert retrieval_only[0]["batches"] == retrieval_only[1]["batches"]
    batches = retrieval_only[0]["batches"]
    assert len(batches) == 8 and all(len(b) == 2 and max(b) < 8 for b in batches)
    assert batches[0::2] == batches[1::2]  # both ranks of a step hold the same queries
    # an STS rank with nothing to do would hang DDP's gradient sync: refused, naming the fix
    assert (
        "sts_batch_size=0" in sts_rank_idle[0]["error"] and "retrieval_ranks=2" in sts_rank_idle[0]["error"]
    )


def test_sampler_single_process_retrieval_only():
    res = _w_sampler(None, sts_batch_size=0)
    assert len(res["batches"]) == 4 and all(len(b) == 2 and max(b) < 8 for b in res["batches"])


def test_sampler_single_process_mixes_both_tasks():
    res = _w_sampler(None)
    for b in res["batches"]:
        assert len([i for i in b if i < 8]) == 2 and len([i for i in b if i >= 8]) == 3
    assert len(res["batches"]) == 4


def test_unfillable_batch_goes_out_short_and_clean(caplog):
    # 2 passages, each the other's negative: no two rows can share a batch
    dd = make_balanced_datasets(shared_passage_pairs(passages=2), sts_rows())
    concat = ConcatDataset([dd["retrieval"], dd["sts"]])
    stub = [BatchSampler(SequentialSampler(range(len(d))), 2, True) for d in dd.values()]
    sampler = TaskBalancedBatchSampler(concat, stub, retrieval_batch_size=3, sts_batch_size=2)
    batches = list(sampler)
    assert len(batches) == 2 and all(len([i for i in b if i < 6]) == 1 for b in batches)
    assert "holds 1 of 3 rows" in caplog.text
    with pytest.raises(ValueError, match="retrieval_batch_size must be an int >= 1, got 0"):
        TaskBalancedBatchSampler(concat, stub, retrieval_batch_size=0)
