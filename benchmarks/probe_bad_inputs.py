"""An independent probe of bad input, kept apart from the packages' bad-input tables (tests/*/
test_bad_inputs.py): cases a careless script would try, each classified by what happened.

    python benchmarks/probe_bad_inputs.py            # one process; prints the counts and every case

clear     an error that names the argument (or file and line) it is about
correct   no error, and the documented result
unclear   an error that names nothing the user passed (a raw torch/numpy/Python message)
silent    no error, and a result that is wrong or doubtful
crash     the process died (only possible in a subprocess case; none here are)
A case is "clear" only if its message contains every word listed with it.
"""

from __future__ import annotations

import json
import math
import tempfile
import traceback
from pathlib import Path

import torch

CASES: list[tuple[str, str, object, tuple[str, ...]]] = []  # (package, name, callable, words)


def case(package: str, name: str, *words: str):
    def register(fn):
        CASES.append((package, name, fn, words))
        return fn

    return register


# ------------------------------------------------------------------ rrcm-diffusers


def _tiny(num_classes=3):
    from rrcm_diffusers import RRCMModel

    torch.manual_seed(0)
    return RRCMModel(image_size=28, in_channels=1, patch_size=7, hidden_size=32, depth=1, num_heads=2,
                     projection_hidden_dim=32, projection_dim=16, num_classes=num_classes)  # fmt: skip


IMAGES = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))


@case("rrcm", "predict num_samples 0", "num_samples")
def _():
    from rrcm_diffusers import predict

    predict(lambda x: torch.zeros(x.shape[0], 3), IMAGES, 0.5, num_samples=0)


@case("rrcm", "certify sigma as numpy bool", "sigma")
def _():
    import numpy as np

    from rrcm_diffusers import certify

    certify(lambda x: torch.zeros(x.shape[0], 3), IMAGES, np.bool_(True), n0=10, n=20)


@case("rrcm", "certify sigma 1e30", "sigma")
def _():
    from rrcm_diffusers import certify

    certify(lambda x: torch.zeros(x.shape[0], 3), IMAGES, 1e30, n0=10, n=20)


@case("rrcm", "pipeline images float64 in [0,1] (documented: accepted)")
def _():
    from rrcm_diffusers import RRCMPipeline

    out = RRCMPipeline(model=_tiny().for_classification(3)).certify(IMAGES.double(), sigma=0.5, n0=10, n=20)
    assert out.radii.shape == (2,)
    return "correct"


@case("rrcm", "FinetuneConfig batch_size '64' (a string from a CLI)", "batch_size")
def _():
    from rrcm_diffusers.training import FinetuneConfig

    FinetuneConfig(batch_size="64")


@case("rrcm", "PretrainConfig warmup_steps -1", "warmup_steps")
def _():
    from rrcm_diffusers.training import PretrainConfig

    PretrainConfig(warmup_steps=-1)


@case("rrcm", "PretrainConfig checkpoint_every 0.5", "checkpoint_every")
def _():
    from rrcm_diffusers.training import PretrainConfig

    PretrainConfig(checkpoint_every=0.5)


@case("rrcm", "FinetuneConfig consistency_weight nan", "consistency_weight")
def _():
    from rrcm_diffusers.training import FinetuneConfig

    FinetuneConfig(consistency_weight=math.nan)


@case("rrcm", "finetune into a pretraining folder", "another config")
def _():
    from accelerate import Accelerator

    from rrcm_diffusers.training import FinetuneConfig, PretrainConfig, finetune, pretrain

    x = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8)
    with tempfile.TemporaryDirectory() as d:
        pretrain(_tiny(0), x, PretrainConfig(steps=1, batch_size=8, warmup_steps=0), Accelerator(cpu=True), d,
                 progress=False)  # fmt: skip
        finetune(_tiny(0).for_classification(3), x, torch.zeros(16, dtype=torch.long),
                 FinetuneConfig(probe_steps=0, steps=1, batch_size=8), Accelerator(cpu=True), d, progress=False)  # fmt: skip


@case("rrcm", "pretrain into the same folder with other weight decay", "another config")
def _():
    from accelerate import Accelerator

    from rrcm_diffusers.training import PretrainConfig, pretrain

    x = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8)
    with tempfile.TemporaryDirectory() as d:
        pretrain(_tiny(0), x, PretrainConfig(steps=1, batch_size=8, warmup_steps=0), Accelerator(cpu=True), d,
                 progress=False)  # fmt: skip
        pretrain(_tiny(0), x, PretrainConfig(steps=1, batch_size=8, warmup_steps=0, weight_decay=0.1),
                 Accelerator(cpu=True), d, progress=False)  # fmt: skip


@case("rrcm", "model weights stored as uint8", "non-floating")
def _():
    from safetensors.torch import load_file, save_file

    from rrcm_diffusers import RRCMModel

    with tempfile.TemporaryDirectory() as d:
        _tiny().save_pretrained(d)
        f = Path(d) / "diffusion_pytorch_model.safetensors"
        save_file({k: v.to(torch.uint8) for k, v in load_file(f).items()}, f)
        (Path(d) / "checksums.sha256.json").unlink()
        RRCMModel.from_pretrained(d)


@case("rrcm", "certificates.jsonl line with a non-integer index", "certificates.jsonl", "line")
def _():
    from rrcm_diffusers.dataset_certification import read_records

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "certificates.jsonl").write_text('{"index": 0}\n[1, 2]\n')
        read_records(d)


@case("rrcm", "experiment config: certify batch_size 0.5", "certify.batch_size")
def _():
    from rrcm_diffusers.experiment import load_config

    load_config(None, certify={"batch_size": 0.5})


@case("rrcm", "experiment config: seed -2", "seed")
def _():
    from rrcm_diffusers.experiment import load_config

    load_config(None, seed=-2)


@case("rrcm", "experiment config: sigmas with a string", "sigmas")
def _():
    from rrcm_diffusers.experiment import load_config

    load_config(None, sigmas=["0.5"])


@case("rrcm", "CLI --n0 2.5", "--n0")
def _():
    from rrcm_diffusers.dataset_certification import main

    _cli(main, ["--pipeline", "p", "--out", "o", "--n0", "2.5"])


@case("rrcm", "CLI --alpha 0", "--alpha")
def _():
    from rrcm_diffusers.dataset_certification import main

    _cli(main, ["--pipeline", "p", "--out", "o", "--alpha", "0"])


# ------------------------------------------------------------------ conan-st


@case("conan", "make_balanced_datasets: STS score as a string column", "score")
def _():
    from datasets import Dataset

    from conan_st import make_balanced_datasets

    ret = Dataset.from_dict({"anchor": ["q"], "positive": ["a"]})
    make_balanced_datasets(ret, Dataset.from_dict({"sentence1": ["x"], "sentence2": ["y"], "score": ["4"]}))


@case("conan", "make_balanced_datasets: empty-string anchor (documented: a text)")
def _():
    from datasets import Dataset

    from conan_st import make_balanced_datasets

    ret = Dataset.from_dict({"anchor": [""], "positive": ["a"]})
    make_balanced_datasets(ret, Dataset.from_dict({"sentence1": ["x"], "sentence2": ["y"], "score": [1.0]}))
    return "correct"


@case("conan", "NegativeStore with a -1 between ids", "candidates of example")
def _():
    from conan_st import NegativeStore

    NegativeStore(torch.tensor([[4, 5, 6, 7], [1, 2, -1, 3]]), num_negatives=2, skip=0)


@case("conan", "corpus_from_pairs: tab/newline twins share positives")
def _():
    from datasets import Dataset

    from conan_st.mining import corpus_from_pairs

    _, pos = corpus_from_pairs(Dataset.from_dict({"anchor": ["a b", "a\tb\n"], "positive": ["x", "y"]}))
    assert pos == [[0, 1], [0, 1]], pos
    return "correct"


@case("conan", "corpus_from_pairs: float anchors", "anchor")
def _():
    from datasets import Dataset

    from conan_st.mining import corpus_from_pairs

    corpus_from_pairs(Dataset.from_dict({"anchor": [1.5, 2.5], "positive": ["x", "y"]}))


@case("conan", "callback interval True", "interval")
def _():
    from conan_st import DynamicHardNegativeMiningCallback, NegativeStore

    store = NegativeStore(torch.tensor([[1, 2, 3]]), num_negatives=2, skip=0)
    DynamicHardNegativeMiningCallback(store, ["q"], ["d"] * 5, interval=True, score_source="rescore")


@case("conan", "conan-experiment --batch-size 0", "--batch-size")
def _():
    from conan_st.experiment import main

    _cli(main, ["--out", "o", "--batch-size", "0"])


@case("conan", "CONAN_ST_DISABLE_PLUGIN_AUTOLOAD=2", "CONAN_ST_DISABLE_PLUGIN_AUTOLOAD")
def _():
    import os

    from conan_st.hooks import build_plugin_manager

    os.environ["CONAN_ST_DISABLE_PLUGIN_AUTOLOAD"] = "2"
    try:
        build_plugin_manager()
    finally:
        del os.environ["CONAN_ST_DISABLE_PLUGIN_AUTOLOAD"]


# ------------------------------------------------------------------ shared-dist


@case("shared_dist", "SHARED_DIST_DEBUG_TIMEOUT=soon", "SHARED_DIST_DEBUG_TIMEOUT")
def _():
    import os

    from shared_dist.operations import _debug_timeout

    os.environ["SHARED_DIST_DEBUG_TIMEOUT"] = "soon"
    try:
        _debug_timeout()
    finally:
        del os.environ["SHARED_DIST_DEBUG_TIMEOUT"]


@case("shared_dist", "gather a set of tensors", "set")
def _():
    import shared_dist

    shared_dist.gather({torch.zeros(1)})


@case("shared_dist", "check_same with one process (documented: passes)")
def _():
    import shared_dist

    shared_dist.check_same({"a": 1}, "config")
    return "correct"


# ------------------------------------------------------------------ the run


def _cli(main, argv):
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as stop:
            raise ValueError(err.getvalue().strip().splitlines()[-1]) from stop


def classify(fn, words) -> tuple[str, str]:
    try:
        result = fn()
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as err:
        text = str(err)
        ok = all(w.lower() in text.lower() for w in words) and words
        return ("clear" if ok else "unclear"), f"{type(err).__name__}: {text[:160]}"
    except AssertionError:
        return "silent", traceback.format_exc().splitlines()[-1][:160]
    return ("correct", "as documented") if result == "correct" else ("silent", f"no error: {result!r}")


def main() -> None:
    counts: dict[str, dict[str, int]] = {}
    for package, name, fn, words in CASES:
        verdict, detail = classify(fn, words)
        counts.setdefault(package, {}).setdefault(verdict, 0)
        counts[package][verdict] += 1
        print(f"{verdict:8s} {package:12s} {name}: {detail}")
    total = {
        k: sum(c.get(k, 0) for c in counts.values())
        for k in ("clear", "correct", "unclear", "silent", "crash")
    }
    print(json.dumps({"cases": len(CASES), **total, "per_package": counts}))


if __name__ == "__main__":
    main()
