"""conan_st/experiment.py: the typed recipe config (`RecipeConfig`, `ConanSettings`) checked whole at
construction, before anything loads; the ablation controls (examples/conan/controls.py) it is handed;
each recipe trained for 2 steps on the tiny model and the real data, and a training set that gives no
batch refused; the CLI under accelerate launch on two processes (slow). With MiniLM, trained and evaluated:
the quick main job (tests/test_main_job.py, slow)."""

from __future__ import annotations

import pytest
import torch

from conan_st.experiment import ConanSettings, RecipeConfig, train_recipe
from examples.conan.controls import ControlStore


@pytest.mark.parametrize(
    "setting", [{"sts_weight": 0.2}, {"dynamic": False}, {"sts_batch_size": 0}, {"store_class": ControlStore}]
)
def test_conan_settings_on_another_recipe_are_refused(setting):
    """An ablation setting on a recipe without STS or mining would be silently ignored."""
    with pytest.raises(ValueError, match=r"settings of the 'conan' recipe .*'mnrl' has neither"):
        RecipeConfig("mnrl", conan=ConanSettings(**setting))


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("recipe", "Conan", r"recipe must be one of \('mnrl', 'mnrl_mined', 'conan'\), got 'Conan'"),
        ("steps", 0, "steps must be an int >= 1, got 0"),
        ("save_steps", 1.5, "save_steps must be an int >= 0, got 1.5"),
        ("mini_batch_size", 0, r"mini_batch_size must be None \(no caching\) or an int >= 1, got 0"),
    ],
)
def test_a_bad_recipe_config_is_refused_before_anything_loads(field, value, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        RecipeConfig(**{field: value})
    with pytest.raises(TypeError, match=r"config must be a conan_st\.experiment\.RecipeConfig, got str"):
        train_recipe("conan", tmp_path)  # the keyword form of before: named, not half-run


def test_an_unknown_window_rule_of_the_controls_is_refused():
    with pytest.raises(ValueError, match="rule must be 'always' or 'random', got 'Paper'"):
        ControlStore(torch.zeros(1, 30, dtype=torch.long), 5, 10, rule="Paper")


@pytest.mark.parametrize(
    "config",
    [
        RecipeConfig("mnrl", steps=2, batch_size=4, num_negatives=1, max_seq_length=32, train_queries=12),
        RecipeConfig("mnrl_mined", steps=2, batch_size=4, num_negatives=1, max_seq_length=32, train_queries=40),
        RecipeConfig(
            "conan", steps=2, batch_size=4, num_negatives=1, max_seq_length=32, train_queries=12,
            mini_batch_size=3, conan=ConanSettings(sts_rows=8, sts_batch_size=2, check_interval=1),
        ),
    ],
    ids=["mnrl", "mnrl_mined", "conan_cached"],
)  # fmt: skip
def test_each_recipe_trains_on_the_real_data_and_records_what_happened(config, tiny_path, data_dir, tmp_path):
    """The tiny model, 2 steps on 12-40 CMRC2018 train queries (STS-B-zh for conan): the record says what ran."""
    _, record = train_recipe(config, tmp_path, model_path=tiny_path, data_dir=data_dir, progress=False)
    assert record["recipe"] == config.recipe and record["train_pairs"] == config.train_queries
    assert record["steps"] == 2
    assert record["mini_batch_size"] == config.mini_batch_size
    assert len(record["loss_log"]) == 2 and all(0 < h["loss"] < 100 for h in record["loss_log"])
    if config.recipe == "conan":  # a check after each step; both tasks logged by the cached loss
        assert len(record["dhnm_checks"]) == 2 and record["advanced_total"] >= 0
        assert all("retrieval" in h and "sts" in h for h in record["loss_log"])
    else:
        assert "dhnm_checks" not in record


def test_a_training_set_without_one_full_batch_is_refused_not_trained_for_zero_steps(
    tiny_path, data_dir, tmp_path
):
    """12 queries: the negatives mined below rank 10 are other queries' positives, so no batch of 4 without
    a repeated text exists; the trainer would stop at step 0 with a log line and an empty record."""
    config = RecipeConfig(
        "mnrl_mined", steps=2, batch_size=4, num_negatives=1, max_seq_length=32, train_queries=12
    )
    with pytest.raises(
        ValueError,
        match=r"mnrl_mined: 0 of 2 steps ran: the training set of 12 pairs gives no batch of batch_size 4",
    ):
        train_recipe(config, tmp_path, model_path=tiny_path, data_dir=data_dir, progress=False)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_the_cli_trains_under_accelerate_launch_on_two_processes_and_exits_cleanly(
    tiny_path, data_dir, tmp_path
):
    """`examples/conan/train.py` as its docstring launches it (rank 0 retrieval, rank 1 STS), on the tiny
    model: rank 0 writes the model and the record, and both ranks exit 0 with the group closed (left
    open, gloo aborted some finished runs at exit: docs/results/shared-dist.md)."""
    import json

    from tests.helpers import REPO, accelerate_launch

    out = tmp_path / "run"
    args = ["--recipe", "conan", "--out", str(out), "--model", tiny_path, "--steps", "3", "--batch-size", "4",
            "--num-negatives", "1", "--no-eval"]  # fmt: skip
    env = {"CONAN_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = accelerate_launch(REPO / "examples/conan/train.py", *args, timeout=540, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "terminate called" not in proc.stderr
    record = json.loads((out / "record.json").read_text())
    assert record["recipe"] == "conan" and record["steps"] == 3 and len(record["loss_log"]) == 3
    assert all("retrieval" in h and "sts" in h for h in record["loss_log"])  # both tasks, every step
    assert (out / "final" / "modules.json").is_file() and "after" not in record  # --no-eval
