"""The README's code blocks, run as written (see tests/readme_snippets.py): the rRCM block on one
process, the conan-st block on two CPU processes under ``accelerate launch``."""

from __future__ import annotations

import math

import pytest

from tests.readme_snippets import hub_cache, run_script, write_script


@pytest.mark.timeout(300)
def test_rrcm_block_trains_certifies_saves_and_reloads(tmp_path):
    script = write_script("rrcm", tmp_path / "rrcm_block.py")
    (res,) = run_script(script, cwd=tmp_path, timeout=280)
    assert res["steps"] == res["total_steps"] == 3
    assert res["ema_moved"]  # the teacher followed the online model (it started equal)
    assert len(res["predictions"]) == len(res["radii"]) == 1
    assert all(-1 <= c < 10 for c in res["predictions"])
    assert all(r >= 0 and (r > 0) == (c >= 0) for c, r in zip(res["predictions"], res["radii"]))
    # the folder it saved holds the same weights and certifies the same with the same generator
    assert res["reloaded_weights_equal"]
    assert (
        res["reloaded_predictions"] == res["saved_predictions"]
        and res["reloaded_radii"] == res["saved_radii"]
    )
    assert (tmp_path / "my-rrcm" / "model_index.json").is_file()


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_conan_block_trains_every_step_on_two_processes(tmp_path):
    script = write_script("conan", tmp_path / "conan_block.py")
    results = run_script(
        script, cwd=tmp_path, processes=2, timeout=280, env={"HF_HUB_CACHE": str(hub_cache(tmp_path / "hub"))}
    )
    results.sort(key=lambda r: r["rank"])
    assert [r["rank"] for r in results] == [0, 1] and all(r["world_size"] == 2 for r in results)
    # 20 pairs with distinct texts, retrieval batch 4, 3 epochs (the trainer's default), drop_last
    # under DDP: every global batch is full, so 5 steps per epoch on every rank
    expected = int(results[0]["epochs"]) * math.floor(results[0]["pairs"] / 4)
    assert [r["global_step"] for r in results] == [expected, expected] == [15, 15]
    # DDP kept the replicas equal, and they moved away from the base model
    assert results[0]["weights"] == results[1]["weights"] != results[0]["base_weights"]
