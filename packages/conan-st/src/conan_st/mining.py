"""Dynamic hard-negative mining (Conan-embedding, section 3.2) for sentence-transformers.

1. :func:`mine_candidates` ranks the corpus for every training query with a model (the one
   being trained, or a separate miner), removes positives, duplicate texts and (optionally)
   likely false negatives, and keeps a candidate list of ``depth`` documents per query.
2. :class:`NegativeStore` holds, per example, the candidate list, the current window index
   ``w`` and the scores S_init / S_cur. Window ``w`` (0-based; the paper's i = w + 1) is
   the ranks ``[w·n + skip, (w+1)·n + skip)`` — the top ``skip`` = 10 are never used.
3. :func:`dynamic_negatives_dataset` wraps the training dataset so every row's negatives are
   read from the store when the row is loaded: the RUNNING dataloader serves new negatives
   as soon as a window moves (the store's window table lives in shared memory, so dataloader
   workers see the change too).
4. :class:`~conan_st.callbacks.DynamicHardNegativeMiningCallback` applies the paper's rule
   every ``interval`` steps.

Scores: S is the mean cosine between a query and its current negatives. S_init is, as in the
paper, the score when the window was assigned: the mean mining score of its candidates
(``initial_score="mined"``, the default when the store has the mining scores), so the rule can
act on an example's first observation; ``"observed"`` takes the first S observed after the
assignment instead (a window then needs two observations, i.e. two passes over the data, before
it can move). S_cur is the latest S observed. With
``score_source="loss"`` (free) they come from the similarities the loss already computed for
the rows it saw; with ``"rescore"`` every check re-embeds the queries and their negatives.

Served windows: the dataset serves each example the window it had at the start of the
current pass over the data (``NegativeStore.served``, snapshotted by the callback at every
epoch start). A window that moves mid-epoch takes effect from the next pass — which is when an
example is drawn again anyway. This keeps what the batch sampler checked for false negatives
identical to what the loss trains on, lets a resumed run rebuild the same batches, and lets
observations of a row served under an older window be told apart (and dropped).

End of a candidate list (``end_policy``): ``"stay"`` (default) keeps an example on its last
full window and counts it as exhausted; ``"wrap"`` starts again at window 0. An example whose
list holds fewer than ``skip + n`` candidates (after filtering) uses its last ``n`` valid ones.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from safetensors.torch import load, load_file, save, save_file
from tqdm.auto import tqdm

from .data import check_texts, same_text
from .hooks import get_negative_filter, get_search_backend

# the id-label protocol lives in labels.py (the loss and the sampler read it without the miner);
# these names stay importable from here
from .labels import ID_LABEL_BASE, MAX_EXAMPLE_ID, id_to_label, is_id_label, label_to_id  # noqa: F401

# ----------------------------------------------------------------------------- embedding + search


@torch.inference_mode()
def embed_texts(model, texts: list[str], batch_size: int = 64, progress: bool = False) -> torch.Tensor:
    """L2-normalised float32 embeddings (N, D), written chunk by chunk into one preallocated matrix."""
    if not texts:
        raise ValueError("nothing to embed: empty list of texts")
    dim = model.get_embedding_dimension()
    out = torch.empty((len(texts), dim), dtype=torch.float32)
    chunk = max(batch_size * 16, 1024)
    for start in tqdm(range(0, len(texts), chunk), disable=not progress, desc="embed"):
        emb = model.encode(
            texts[start : start + chunk],
            batch_size=batch_size,
            convert_to_tensor=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        out[start : start + emb.shape[0]] = emb.float().cpu()
    return out


def mine_candidates(
    model,
    queries: list[str],
    corpus: list[str],
    positives: list[list[int]],
    depth: int = 100,
    backend: str | None = None,
    batch_size: int = 64,
    positive_ratio: float | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranked candidate ids (Q, depth) and their scores for every query; -1 pads short lists.

    Removes each query's positives, any document whose text equals the query or one of its
    positives, and — with ``positive_ratio`` (NV-Retriever, e.g. 0.95) — candidates scoring
    above that fraction of the best positive's score.
    """
    if len(queries) != len(positives):
        raise ValueError(f"queries and positives must align, got {len(queries)} and {len(positives)}")
    if not corpus:
        raise ValueError("corpus is empty: nothing to mine negatives from")
    n = len(corpus)
    for i, pos in enumerate(positives):
        if not pos or any(not 0 <= p < n for p in pos):
            raise ValueError(f"positives of query {i} must be non-empty corpus ids in [0, {n}), got {pos}")
    # a document that differs from a positive (or the query) only in case or spacing is the same
    # answer: never serve it as a negative
    text_to_ids: dict[str, list[int]] = {}
    for j, t in enumerate(corpus):
        text_to_ids.setdefault(same_text(t), []).append(j)
    q_emb = embed_texts(model, queries, batch_size, progress)
    c_emb = embed_texts(model, corpus, batch_size, progress)
    extra = max(len(p) for p in positives) + 1 + max(len(v) for v in text_to_ids.values())
    k = min(n, depth + extra)
    scores, ids = get_search_backend(backend).search(q_emb, c_emb, k)
    keep_filter = get_negative_filter("positive_ratio", ratio=positive_ratio) if positive_ratio else None
    cand = torch.full((len(queries), depth), -1, dtype=torch.long)
    cand_scores = torch.full((len(queries), depth), float("nan"))
    for i, (q, pos) in enumerate(zip(queries, positives)):
        banned = set(pos)
        for t in [q, *(corpus[p] for p in pos)]:
            banned.update(text_to_ids.get(same_text(t), []))
        mask = torch.tensor([int(j) not in banned for j in ids[i]])
        if keep_filter is not None:
            pos_score = (q_emb[i] @ c_emb[pos].T).max()
            mask &= keep_filter(scores[i : i + 1], pos_score.view(1))[0]
        kept_ids, kept_scores = ids[i][mask][:depth], scores[i][mask][:depth]
        cand[i, : kept_ids.numel()] = kept_ids
        cand_scores[i, : kept_scores.numel()] = kept_scores
    return cand, cand_scores


# ----------------------------------------------------------------------------- the store


def _check_candidates(candidates: torch.Tensor, num_negatives: int) -> torch.Tensor:
    """Each row: distinct corpus ids >= 0, padded with -1 at its end only, at least ``num_negatives``
    of them. Returns the number of ids per row."""
    if candidates.is_floating_point() or candidates.dtype == torch.bool:
        raise ValueError(f"candidates must hold integer corpus ids, got dtype {candidates.dtype}")
    valid = (candidates >= 0).sum(1)
    # -1 pads the END of a short row; a -1 (or any negative) before an id would index the
    # corpus from its end (-1: the last text) when the window reaches it
    padded_early = (candidates < 0) & (torch.arange(candidates.shape[1]) >= valid[:, None]).logical_not()
    if bool((candidates < -1).any()) or bool(padded_early.any()):
        row = int(((candidates < -1) | padded_early).any(1).nonzero()[0])
        raise ValueError(
            f"candidates of example {row} must be corpus ids >= 0, padded with -1 at the end only; "
            f"got {candidates[row].tolist()[:20]}"
        )
    ordered = candidates.sort(dim=1).values
    repeats = ((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)).any(1)
    if bool(repeats.any()):
        row = int(repeats.nonzero()[0])
        raise ValueError(
            f"candidates of example {row} list a document more than once: {candidates[row].tolist()[:20]}"
        )
    if int(valid.min()) < num_negatives:
        worst = int(valid.argmin())
        raise ValueError(
            f"example {worst} has only {int(valid[worst])} candidates, fewer than num_negatives="
            f"{num_negatives}: the corpus is smaller than one window (mine deeper or use fewer negatives)"
        )
    return valid


class NegativeStore:
    """Per-example candidate lists, current windows and scores (see the module docstring)."""

    def __init__(
        self,
        candidates: torch.Tensor,
        num_negatives: int,
        skip: int = 10,
        end_policy: str = "stay",
        candidate_scores: torch.Tensor | None = None,
        initial_score: str | None = None,
    ) -> None:
        initial_score = initial_score or ("mined" if candidate_scores is not None else "observed")
        if initial_score not in ("mined", "observed"):
            raise ValueError(f"initial_score must be 'mined' or 'observed', got {initial_score!r}")
        if initial_score == "mined" and (
            candidate_scores is None or candidate_scores.shape != candidates.shape
        ):
            raise ValueError(
                "initial_score='mined' needs candidate_scores of the candidates' shape "
                f"{tuple(candidates.shape)}, got {None if candidate_scores is None else tuple(candidate_scores.shape)}"
            )
        if candidates.dim() != 2:
            raise ValueError(f"candidates must be (num_examples, depth), got {tuple(candidates.shape)}")
        if num_negatives < 1 or skip < 0:
            raise ValueError(f"need num_negatives >= 1 and skip >= 0, got {num_negatives} and {skip}")
        if end_policy not in ("stay", "wrap"):
            raise ValueError(f"end_policy must be 'stay' or 'wrap', got {end_policy!r}")
        valid = _check_candidates(candidates, num_negatives)
        self.candidates = candidates.long().contiguous().share_memory_()
        self.candidate_scores = candidate_scores
        self.valid = valid
        self.n, self.skip, self.end_policy = num_negatives, skip, end_policy
        q = candidates.shape[0]
        self.window = torch.zeros(q, dtype=torch.long)
        # the window each example is SERVED with this pass (see the module docstring); shared
        # memory because dataloader workers read it
        self.served = torch.zeros(q, dtype=torch.long).share_memory_()
        self.s_init = torch.full((q,), float("nan"))
        self.s_cur = torch.full((q,), float("nan"))
        self.assignments = torch.ones(q, dtype=torch.long)  # how many windows each example has had
        self.initial_score = initial_score
        self._fingerprint = self._hash_candidates()
        for i in range(q):
            self._assign(i)

    def __len__(self) -> int:
        return self.candidates.shape[0]

    def window_span(self, i: int, window: int | None = None) -> tuple[int, int]:
        """Ranks [start, stop) of example ``i``'s current (or given) window in its candidate list."""
        w = int(self.window[i]) if window is None else window
        start = w * self.n + self.skip
        valid = int(self.valid[i])
        if start + self.n > valid:  # short list: the last n valid candidates
            start = max(valid - self.n, 0)
        return start, start + self.n

    def negatives(self, i: int) -> list[int]:
        """Corpus ids of example ``i``'s current window."""
        start, stop = self.window_span(i)
        return self.candidates[i, start:stop].tolist()

    def served_negatives(self, i: int) -> list[int]:
        """Corpus ids of the window example ``i`` is served with in this pass over the data."""
        start, stop = self.window_span(i, int(self.served[i]))
        return self.candidates[i, start:stop].tolist()

    def snapshot(self) -> None:
        """Serve every example its current window from now on (called at each epoch start)."""
        self.served.copy_(self.window)

    def is_current(self, example_ids: torch.Tensor) -> torch.Tensor:
        """Which of ``example_ids`` were served the window they hold now (their scores count)."""
        ids = example_ids.long().cpu()
        return self.served[ids] == self.window[ids]

    def _can_advance(self, i: int) -> bool:
        return (int(self.window[i]) + 1) * self.n + self.skip + self.n <= int(self.valid[i])

    def _movers(self, seen: torch.Tensor, ratio: float, bound: float) -> torch.Tensor:
        """Which of the ``seen`` examples move at this check (the paper's rule; a control overrides it)."""
        return seen & (ratio * self.s_cur < self.s_init) & (self.s_cur.abs() < bound)

    def _next_window(self, i: int) -> int | None:
        """Example ``i``'s window after a move; None: the list is used up ("stay")."""
        if self._can_advance(i):
            return int(self.window[i]) + 1
        return 0 if self.end_policy == "wrap" else None

    def _assign(self, i: int) -> None:
        """Example ``i`` has a new window: no S_cur yet; S_init its candidates' mean mining score
        ("mined") or the next observation ("observed")."""
        self.s_cur[i] = float("nan")
        if self.initial_score == "mined":
            start, stop = self.window_span(i)
            self.s_init[i] = float(self.candidate_scores[i, start:stop].float().nanmean())
        else:
            self.s_init[i] = float("nan")

    def observe(self, example_ids: torch.Tensor, scores: torch.Tensor) -> None:
        """Record S (mean query·negative cosine) for examples: S_cur, and S_init where it is not set."""
        ids = example_ids.long().cpu()
        s = scores.detach().float().cpu()
        self.s_cur[ids] = s
        fresh = torch.isnan(self.s_init[ids])
        self.s_init[ids[fresh]] = s[fresh]

    def check(self, ratio: float = 1.15, bound: float = 0.8) -> dict[str, float]:
        """The paper's rule: advance examples with ratio·S_cur < S_init and |S_cur| < bound."""
        seen = ~torch.isnan(self.s_init) & ~torch.isnan(self.s_cur)
        # the scores the rule saw, before advancing examples resets theirs
        mean_init = float(self.s_init[seen].mean()) if seen.any() else math.nan
        mean_cur = float(self.s_cur[seen].mean()) if seen.any() else math.nan
        advanced = exhausted = 0
        for i in self._movers(seen, ratio, bound).nonzero().flatten().tolist():
            window = self._next_window(i)
            if window is None:
                exhausted += 1
                continue
            self.window[i] = window
            advanced += 1
            self.assignments[i] += 1
            self._assign(i)
        return {
            "checked": int(seen.sum()),
            "advanced": advanced,
            "exhausted": exhausted,
            "mean_s_init": mean_init,
            "mean_s_cur": mean_cur,
        }

    # -------------------------------------------------------------- persistence

    _DYNAMIC = ("window", "served", "s_init", "s_cur", "assignments")

    def fingerprint(self) -> str:
        """sha256 of the candidate lists and window settings: what a saved state must match."""
        return self._fingerprint

    def _hash_candidates(self) -> str:
        # once per candidate matrix (it changes only in load_state), not at every checkpoint
        h = hashlib.sha256(self.candidates.numpy().tobytes())
        h.update(f"{tuple(self.candidates.shape)}/{self.n}/{self.skip}/{self.end_policy}".encode())
        if self.initial_score == "mined":  # (states saved with "observed" keep their fingerprint)
            h.update(b"/mined")
        return h.hexdigest()

    def state_dict(self) -> dict[str, Any]:
        """The state that changes while training, as JSON-safe text (safetensors, base64)."""
        tensors = {k: getattr(self, k).contiguous() for k in self._DYNAMIC}
        return {"fingerprint": self.fingerprint(), "tensors": base64.b64encode(save(tensors)).decode()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("fingerprint") != self.fingerprint():
            raise ValueError(
                "the saved negative-mining state was made for other candidate lists (different pairs, "
                "corpus, mining model or window settings): build the callback exactly as in the run that "
                "wrote the checkpoint (mine with the same model, e.g. the base model, not the checkpoint)"
            )
        tensors = load(base64.b64decode(state["tensors"]))
        for k in self._DYNAMIC:
            getattr(self, k).copy_(tensors[k])

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"candidates": self.candidates, **{k: getattr(self, k) for k in self._DYNAMIC}}
        if self.candidate_scores is not None:
            tensors["candidate_scores"] = self.candidate_scores.float()
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "dhnm_store.safetensors"))
        meta = {
            "num_negatives": self.n,
            "skip": self.skip,
            "end_policy": self.end_policy,
            "initial_score": self.initial_score,
        }
        (folder / "dhnm_store.json").write_text(json.dumps(meta))

    def load_state(self, folder: str | Path) -> None:
        """Restore candidate lists, windows and scores saved by :meth:`save`.

        The candidate lists come from the checkpoint too: re-mining on resume (with the
        trained model) would rank differently, and the saved windows index the saved lists.
        """
        folder = Path(folder)
        path = folder / "dhnm_store.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"no negative-mining state in {folder} (expected {path.name})")
        t = load_file(str(path))
        if t["candidates"].shape != self.candidates.shape:
            raise ValueError(
                f"the negative-mining state in {folder} is for {tuple(t['candidates'].shape)} candidates, "
                f"this store holds {tuple(self.candidates.shape)}: not the same training data"
            )
        if self.initial_score == "mined" and "candidate_scores" not in t:
            raise ValueError(
                f"the negative-mining state in {folder} has no mining scores, which initial_score='mined' "
                "needs for the windows it assigns: build the store with initial_score='observed'"
            )
        self.candidates.copy_(t["candidates"])
        if "candidate_scores" in t:
            self.candidate_scores = t["candidate_scores"]
        self.valid = (self.candidates >= 0).sum(1)
        self._fingerprint = self._hash_candidates()
        t.setdefault("served", t["window"])  # files written before the served snapshot existed
        for k in self._DYNAMIC:
            getattr(self, k).copy_(t[k])

    @classmethod
    def load(cls, folder: str | Path) -> NegativeStore:
        folder = Path(folder)
        meta = json.loads((folder / "dhnm_store.json").read_text())
        t = load_file(str(folder / "dhnm_store.safetensors"))
        store = cls(
            t["candidates"],
            meta["num_negatives"],
            meta["skip"],
            meta["end_policy"],
            candidate_scores=t.get("candidate_scores"),
            initial_score=meta.get("initial_score", "observed"),  # files from before the option
        )
        store.load_state(folder)
        return store


# ----------------------------------------------------------------------------- the dataset


def dynamic_negatives_dataset(
    pairs: Dataset, store: NegativeStore, corpus: list[str], balanced: bool = True
) -> Dataset:
    """``pairs`` (anchor, positive) whose negatives are read from ``store`` whenever a row is loaded.

    Row ``i`` of ``pairs`` is example ``i`` of the store. Output columns: ``anchor, positive,
    negative_1..n`` and, with ``balanced`` (for :func:`make_balanced_datasets`'s schema),
    ``sentence1, sentence2, score`` where ``score`` carries the example id (see ``id_to_label``)
    so the loss can report S_cur per example.
    """
    missing = [c for c in ("anchor", "positive") if c not in pairs.column_names]
    if missing:
        raise ValueError(f"pairs dataset is missing columns {missing}")
    if len(pairs) != len(store):
        raise ValueError(f"pairs has {len(pairs)} rows but the store holds {len(store)} examples")
    max_id = int(store.candidates.max())
    if max_id >= len(corpus):
        raise ValueError(f"candidate id {max_id} is not in the corpus of {len(corpus)} documents")
    if balanced and len(pairs) - 1 > MAX_EXAMPLE_ID:
        raise ValueError(
            f"at most {MAX_EXAMPLE_ID + 1} examples can carry their id in the label, got {len(pairs)}"
        )
    base = pairs.select_columns(["anchor", "positive"]).add_column("_example_id", list(range(len(pairs))))
    return base.with_transform(_NegativesTransform(store, corpus, balanced))


class _NegativesTransform:
    def __init__(self, store: NegativeStore, corpus: list[str], balanced: bool) -> None:
        self.store, self.corpus, self.balanced = store, corpus, balanced

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        ids = batch["_example_id"]
        negs = [self.store.served_negatives(i) for i in ids]
        out: dict[str, list[Any]] = {"anchor": batch["anchor"], "positive": batch["positive"]}
        for t in range(self.store.n):
            out[f"negative_{t + 1}"] = [self.corpus[row[t]] for row in negs]
        if self.balanced:
            out["sentence1"] = [""] * len(ids)
            out["sentence2"] = [""] * len(ids)
            out["score"] = [id_to_label(i) for i in ids]
        return out


# ----------------------------------------------------------------------------- re-scoring


@torch.inference_mode()
def rescore(
    model,
    store: NegativeStore,
    queries: list[str],
    corpus: list[str],
    example_ids: list[int],
    batch_size: int = 64,
) -> torch.Tensor:
    """S = mean cosine of each example's query with its current negatives, with ``model`` now."""
    q = embed_texts(model, [queries[i] for i in example_ids], batch_size)
    neg_ids = [store.negatives(i) for i in example_ids]
    flat = sorted({j for row in neg_ids for j in row})
    pos = {j: k for k, j in enumerate(flat)}
    d = embed_texts(model, [corpus[j] for j in flat], batch_size)
    idx = torch.tensor([[pos[j] for j in row] for row in neg_ids])  # (E, n)
    return (d[idx] * q[:, None, :]).sum(-1).mean(1)  # (E,)


def corpus_from_pairs(
    pairs: Dataset, extra_documents: list[str] | None = None
) -> tuple[list[str], list[list[int]]]:
    """A deduplicated corpus (positives + extra documents) and each row's positive ids."""
    check_texts(pairs, ["anchor", "positive"], "pairs")
    if extra_documents is not None and not all(isinstance(t, str) for t in extra_documents):
        bad = next(i for i, t in enumerate(extra_documents) if not isinstance(t, str))
        raise ValueError(f"extra_documents[{bad}]: expected a text (str), got {extra_documents[bad]!r}")
    texts: dict[str, int] = {}
    for t in list(pairs["positive"]) + list(extra_documents or []):
        texts.setdefault(t, len(texts))
    corpus = list(texts)
    # queries that are the same text (case, spacing) share their positives: each one's positive is
    # the other's too, never its negative
    by_query: dict[str, list[int]] = {}
    for a, p in zip(pairs["anchor"], pairs["positive"]):
        by_query.setdefault(same_text(a), []).append(texts[p])
    positives = [sorted(set(by_query[same_text(a)])) for a in pairs["anchor"]]
    return corpus, positives
