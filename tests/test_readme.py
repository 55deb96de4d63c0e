"""The README's code blocks, run as written (see tests/readme_snippets.py): the rRCM block on one
process, the conan-st block on two CPU processes under ``accelerate launch``."""

from __future__ import annotations

import math
import statistics

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
    # the folder it saved certifies the same with the same generator
    assert res["reloaded_predictions"] == res["predictions"] and res["reloaded_radii"] == res["radii"]
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
    # 24 pairs with distinct texts, retrieval batch 4, 3 epochs (the trainer's default), drop_last
    # under DDP: every global batch is full, so 6 steps per epoch on every rank
    expected = int(results[0]["epochs"]) * math.floor(results[0]["pairs"] / 4)
    assert [r["global_step"] for r in results] == [expected, expected] == [18, 18]
    # DDP kept the replicas equal, and they moved away from the base model
    assert results[0]["weights"] == results[1]["weights"] != results[0]["base_weights"]


@pytest.mark.timeout(200)
def test_rrcm_package_readme_example_pretrains_finetunes_and_certifies(tmp_path):
    """The example on rrcm-diffusers' own README (its index page), as written: no data of ours."""
    script = write_script("rrcm-package", tmp_path / "rrcm_package_block.py")
    (res,) = run_script(script, cwd=tmp_path, timeout=180)
    assert res["pretrain_steps"] == 10
    assert {"model_index.json", "model", "README.md"} <= set(res["final"])
    # four certificates at n = 1,000: a class or -1, radius 0 for an abstention, below the n-cap
    cap = 0.5 * statistics.NormalDist().inv_cdf(0.001 ** (1 / 1000))
    assert len(res["predictions"]) == 4 and res["samples"] is None  # fixed n: no per-image counts
    for c, r in zip(res["predictions"], res["radii"]):
        assert (c == -1 and r == 0) or (0 <= c < 10 and 0 < r <= cap + 1e-9)


@pytest.mark.timeout(120)
def test_shared_dist_package_readme_example_on_two_processes(tmp_path):
    """The example on shared-dist's own README, as written, on two CPU processes with 3 and 4 rows."""
    script = write_script("shared-dist-package", tmp_path / "shared_dist_block.py")
    results = sorted(run_script(script, cwd=tmp_path, processes=2, timeout=100), key=lambda r: r["rank"])
    assert [r["rows"] for r in results] == [7, 7]
    assert [r["slice"] for r in results] == [[0, 3], [3, 7]]
    assert all(r["key_grad"] > 0 for r in results)
