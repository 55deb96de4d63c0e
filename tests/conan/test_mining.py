"""Dynamic hard-negative mining: the rule, the live dataset, resume, rank sync, search backends."""

from __future__ import annotations

import math
import sys
import textwrap

import pytest
import torch
from datasets import Dataset

from conan_st import (
    CrossGPUBalancingLoss,
    DynamicHardNegativeMiningCallback,
    NegativeStore,
    dynamic_negatives_dataset,
)
from conan_st import hooks as conan_hooks
from conan_st.builtin_plugins import FaissSearch, TorchSearch
from conan_st.labels import id_to_label, label_to_id
from conan_st.pairs import filter_prompt_response_pairs
from examples.conan.controls import ControlStore
from shared_dist.testing import launch


def store(q=3, depth=30, n=5, skip=10, end_policy="stay") -> NegativeStore:
    cands = torch.arange(depth).repeat(q, 1) + 100 * torch.arange(q)[:, None]
    return NegativeStore(cands, n, skip, end_policy)


# ------------------------------------------------------------------ the rule on synthetic traces


@pytest.mark.parametrize(
    "s_init,s_cur,advances",
    [
        (0.60, 0.50, True),  # 1.15 * 0.50 = 0.575 < 0.60, |0.50| < 0.8
        (0.60, 0.53, False),  # 0.6095 > 0.60: still hard
        (0.95, 0.81, False),  # dropped enough, but |S_cur| >= 0.8
        (0.10, -0.20, True),  # -0.23 < 0.10
        (0.30, 0.30, False),  # unchanged
    ],
)
def test_window_rule(s_init, s_cur, advances):
    st = store()
    st.observe(torch.tensor([1]), torch.tensor([s_init]))  # first observation after assignment = S_init
    st.observe(torch.tensor([1]), torch.tensor([s_cur]))
    summary = st.check(1.15, 0.8)
    assert summary["advanced"] == int(advances)
    assert st.negatives(1) == ([115, 116, 117, 118, 119] if advances else [110, 111, 112, 113, 114])
    assert st.negatives(0) == [10, 11, 12, 13, 14]  # never observed: untouched
    if advances:
        assert math.isnan(st.s_init[1]) and math.isnan(st.s_cur[1])  # the new window starts fresh


def control(rule, seed=0, q=3, depth=30, n=5, skip=10) -> ControlStore:
    cands = torch.arange(depth).repeat(q, 1) + 100 * torch.arange(q)[:, None]
    scores = torch.linspace(0.9, 0.1, depth).repeat(q, 1)
    return ControlStore(cands, n, skip, candidate_scores=scores, initial_score="mined", rule=rule, seed=seed)


def test_always_control_moves_every_observed_window_whatever_its_score():
    st = control("always")
    # S_cur far above S_init: the paper's rule would keep both windows
    st.observe(torch.tensor([0, 2]), torch.tensor([0.99, 0.99]))
    assert st.check() == pytest.approx(
        {
            "checked": 2,
            "advanced": 2,
            "exhausted": 0,
            "mean_s_init": float(st.candidate_scores[0, 10:15].mean()),
            "mean_s_cur": 0.99,
        }
    )
    assert st.negatives(0) == [15, 16, 17, 18, 19] and st.negatives(2) == [215, 216, 217, 218, 219]
    assert st.negatives(1) == [110, 111, 112, 113, 114]  # not observed: untouched
    for _ in range(3):  # 4 windows in ranks 10..29: the last one stays ("stay" end policy)
        st.observe(torch.tensor([0]), torch.tensor([0.5]))
        summary = st.check()
    assert summary["exhausted"] == 1 and st.negatives(0) == [25, 26, 27, 28, 29]


def test_random_control_draws_another_window_of_the_list_reproducibly():
    draws = []
    for seed in (0, 0, 1):
        st = control("random", seed=seed, q=200, depth=60)  # 10 windows in ranks 10..59
        st.observe(torch.arange(0, 200, 2), torch.full((100,), 0.5))  # even examples observed
        assert st.check()["advanced"] == 100
        draws.append(st.window.clone())
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])  # seeded
    moved = draws[0][0::2]
    assert bool((moved >= 1).all() and (moved <= 9).all()) and set(moved.tolist()) == set(range(1, 10))
    assert bool((draws[0][1::2] == 0).all())  # not observed: untouched
    with pytest.raises(ValueError, match="rule must be 'always' or 'random'"):
        control("paper")


def test_random_control_resumes_with_the_draws_of_the_uninterrupted_run():
    def observe_and_check(st):
        st.observe(torch.arange(50), torch.full((50,), 0.5))
        st.check()

    run = control("random", seed=3, q=50, depth=60)
    observe_and_check(run)
    resumed = control("random", seed=3, q=50, depth=60)
    resumed.load_state_dict(run.state_dict())  # what a checkpoint holds
    observe_and_check(run)
    observe_and_check(resumed)
    assert torch.equal(run.window, resumed.window)


def mined_store(initial_score=None) -> NegativeStore:
    """One example, 30 candidates whose mining scores fall from 0.9 by 0.01 per rank."""
    cands = torch.arange(30).view(1, 30)
    scores = (0.9 - 0.01 * torch.arange(30, dtype=torch.float32)).view(1, 30)
    return NegativeStore(cands, 5, 10, candidate_scores=scores, initial_score=initial_score)


def test_initial_score_is_the_windows_mining_score_so_one_observation_can_move_it():
    st = mined_store()  # the default with mining scores: "mined"
    assert st.initial_score == "mined"
    assert float(st.s_init[0]) == pytest.approx(0.9 - 0.01 * 12)  # ranks 10..14: mean score 0.78
    assert st.check()["checked"] == 0  # nothing observed yet: no S_cur, no decision
    st.observe(torch.tensor([0]), torch.tensor([0.60]))  # 1.15 * 0.60 = 0.69 < 0.78
    assert st.check()["advanced"] == 1 and st.window_span(0) == (15, 20)
    assert float(st.s_init[0]) == pytest.approx(0.9 - 0.01 * 17) and math.isnan(st.s_cur[0])
    st.observe(torch.tensor([0]), torch.tensor([0.65]))  # 0.7475 > 0.73: still hard
    assert st.check()["advanced"] == 0
    # "observed": the first observation becomes S_init, so the same trace moves nothing
    old = mined_store("observed")
    assert math.isnan(old.s_init[0])
    old.observe(torch.tensor([0]), torch.tensor([0.60]))
    assert old.check()["advanced"] == 0
    with pytest.raises(ValueError, match="initial_score='mined' needs candidate_scores"):
        NegativeStore(torch.arange(30).view(1, 30), 5, 10, initial_score="mined")
    with pytest.raises(ValueError, match="initial_score must be"):
        mined_store("first")


def test_a_saved_store_keeps_its_mining_scores_and_initial_score_rule(tmp_path):
    st = mined_store()
    st.observe(torch.tensor([0]), torch.tensor([0.60]))
    st.check()
    st.save(tmp_path / "a")
    back = NegativeStore.load(tmp_path / "a")
    assert back.initial_score == "mined" and torch.equal(back.candidate_scores, st.candidate_scores)
    assert torch.equal(back.window, st.window)
    torch.testing.assert_close(back.s_init, st.s_init, equal_nan=True)
    # a state saved under the other rule is refused, not silently mixed
    observed = mined_store("observed")
    observed.save(tmp_path / "b")
    assert NegativeStore.load(tmp_path / "b").initial_score == "observed"
    with pytest.raises(ValueError, match="other candidate lists"):
        mined_store().load_state_dict(observed.state_dict())
    plain = NegativeStore(torch.arange(30).view(1, 30), 5, 10)  # no scores: "observed", as before
    plain.save(tmp_path / "c")
    with pytest.raises(ValueError, match="has no mining scores"):
        mined_store().load_state(tmp_path / "c")


def test_windows_follow_the_paper_and_the_end_policy():
    st = store(q=1, depth=30, n=5, skip=10)
    spans = []
    for _ in range(5):
        spans.append(st.window_span(0))
        st.observe(torch.tensor([0]), torch.tensor([0.5]))
        st.observe(torch.tensor([0]), torch.tensor([0.1]))
        st.check()
    # i-th assignment: ranks [(i-1)n + 10, i n + 10); the list ends at 30: stay on the last window
    assert spans == [(10, 15), (15, 20), (20, 25), (25, 30), (25, 30)]
    wrap = store(q=1, depth=30, n=5, skip=10, end_policy="wrap")
    wrap.window[0] = 3
    wrap.observe(torch.tensor([0]), torch.tensor([0.5]))
    wrap.observe(torch.tensor([0]), torch.tensor([0.1]))
    assert wrap.check()["advanced"] == 1 and wrap.window_span(0) == (10, 15)


def test_short_candidate_list_uses_its_last_valid_candidates():
    cands = torch.full((1, 30), -1)
    cands[0, :12] = torch.arange(12)
    st = NegativeStore(cands, 5, 10)
    assert st.negatives(0) == [7, 8, 9, 10, 11]
    with pytest.raises(ValueError, match="fewer than num_negatives=5"):
        NegativeStore(torch.tensor([[0, 1, 2, -1]]), 5, 10)


def test_label_carries_example_id_exactly():
    ids = torch.tensor([0, 1, 17, 123_456, 9_999_999])
    labels = torch.tensor([id_to_label(i) for i in ids.tolist()], dtype=torch.float32)
    assert torch.equal(label_to_id(labels), ids)


# ------------------------------------------------------------------ several ranks


def _w_sync():
    import torch.distributed as dist

    rank = dist.get_rank()
    st = store(q=4)
    cb = DynamicHardNegativeMiningCallback(
        st,
        [f"q{i}" for i in range(4)],
        [f"d{i}" for i in range(400)],
        loss=CrossGPUBalancingLoss(torch.nn.Linear(1, 1)),
    )
    mine = [0, 1] if rank == 0 else [2, 3]
    cb._observe(torch.tensor(mine), torch.tensor([0.6, 0.6]))
    cb.check_now()
    cb._observe(torch.tensor(mine), torch.tensor([0.2, 0.7]))  # 0 and 2 become easy, 1 and 3 do not
    summary = cb.check_now()
    return {"window": st.window.tolist(), "summary": summary, "s_cur": st.s_cur.tolist()}


@pytest.mark.distributed
def test_state_is_synced_across_ranks():
    a, b = launch(_w_sync, 2, timeout=60)
    assert a["window"] == b["window"] == [1, 0, 1, 0]
    assert a["summary"] == b["summary"] and a["summary"]["advanced"] == 2 and a["summary"]["observed"] == 4
    assert a["s_cur"][1] == pytest.approx(0.7) and a["s_cur"][3] == pytest.approx(0.7)


# ------------------------------------------------------------------ search backends


def test_faiss_and_torch_return_the_same_top_k():
    g = torch.Generator().manual_seed(0)
    corpus = torch.nn.functional.normalize(torch.randn(3000, 32, generator=g), dim=-1)
    queries = torch.nn.functional.normalize(torch.randn(70, 32, generator=g), dim=-1)
    ts, ti = TorchSearch(query_block=16, corpus_block=500).search(queries, corpus, 25)  # blocked path
    fs, fi = FaissSearch().search(queries, corpus, 25)
    assert torch.equal(ti, fi)
    torch.testing.assert_close(ts, fs, rtol=1e-5, atol=1e-5)
    full_i = (queries @ corpus.T).topk(25).indices
    assert torch.equal(ti, full_i)


def test_search_backend_plugin_by_entry_point(tmp_path, monkeypatch):
    (tmp_path / "fake_search_plugin.py").write_text(
        textwrap.dedent("""
        from conan_st.hookspecs import hookimpl
        from conan_st.builtin_plugins import TorchSearch

        class Reversed(TorchSearch):
            name = "reversed"

        @hookimpl
        def conan_search_backends():
            return {"reversed": Reversed}
    """)
    )
    info = tmp_path / "fake_search_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-search-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[conan_st.plugins]\nfake = fake_search_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("CONAN_ST_DISABLE_PLUGIN_AUTOLOAD", "0")
    try:
        conan_hooks.get_plugin_manager.cache_clear()
        assert {"torch", "faiss", "reversed"} <= set(conan_hooks.search_backends())
        assert conan_hooks.get_search_backend("reversed").name == "reversed"
        monkeypatch.setenv("CONAN_ST_DISABLE_PLUGIN_AUTOLOAD", "1")
        conan_hooks.get_plugin_manager.cache_clear()
        assert "reversed" not in conan_hooks.search_backends()
        with pytest.raises(ValueError, match=r"search backend must be one of \['faiss', 'torch'\]"):
            conan_hooks.get_search_backend("reversed")
    finally:
        sys.modules.pop("fake_search_plugin", None)
        conan_hooks.get_plugin_manager.cache_clear()


# ------------------------------------------------------------------ bad input


def test_bad_mining_input(tiny):
    two = Dataset.from_dict({"anchor": ["a", "b"], "positive": ["pa", "pb"]})
    with pytest.raises(ValueError, match="smaller than one window"):
        DynamicHardNegativeMiningCallback.from_pairs(
            tiny, two, num_negatives=2, loss=CrossGPUBalancingLoss(tiny)
        )
    with pytest.raises(ValueError, match=r"missing columns \['positive'\]"):
        DynamicHardNegativeMiningCallback.from_pairs(tiny, two.remove_columns("positive"))
    st = store(q=2, depth=30)
    with pytest.raises(ValueError, match="candidate id 129 is not in the corpus of 50 documents"):
        dynamic_negatives_dataset(two, st, [f"d{i}" for i in range(50)])
    with pytest.raises(ValueError, match="score_source='loss' needs the loss"):
        DynamicHardNegativeMiningCallback(st, ["a", "b"], ["x"] * 200)
    with pytest.raises(ValueError, match="corpus is empty"):
        TorchSearch().search(torch.randn(2, 4), torch.randn(0, 4), 1)
    with pytest.raises(ValueError, match=r"top_k must be in \[1, 3\]"):
        TorchSearch().search(torch.randn(2, 4), torch.randn(3, 4), 5)


def test_prompt_response_filter(minilm):
    ds = Dataset.from_dict(
        {
            "prompt": [
                "What is the boiling point of water?",
                "What is the boiling point of water?",
                "hi",
                "Explain photosynthesis briefly.",
                "Tell me a secret.",
                "列出三种水果",
                "Name a prime number.",
            ],
            "response": [
                "Water boils at 100 degrees Celsius at sea level.",
                "100 C.",
                "hello there",
                "Plants turn light, water and CO2 into sugar and oxygen.",
                "I'm sorry, I cannot do that.",
                "苹果、香蕉和橙子。",
                "The stock market closed higher on Friday after a long week.",
            ],
        }
    )
    kept, counts = filter_prompt_response_pairs(ds, min_chars=4)
    assert counts == {"length": 1, "refusal": 1, "duplicate": 1, "score": 0, "kept": 4}
    assert kept["anchor"][0] == "What is the boiling point of water?"
    scored, counts2 = filter_prompt_response_pairs(ds, score_model=minilm, min_score=0.4)
    assert counts2["score"] >= 1 and "Name a prime number." not in scored["anchor"]
    assert "Explain photosynthesis briefly." in scored["anchor"]
    with pytest.raises(ValueError, match=r"missing columns \['prompt'\]"):
        filter_prompt_response_pairs(ds.rename_column("prompt", "q"))
