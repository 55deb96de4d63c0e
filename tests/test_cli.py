"""The console scripts a user types first: each is declared in its package, prints help for every
option, and names a bad flag value without running anything."""

from __future__ import annotations

import importlib
import re

import pytest

from tests.helpers import REPO, pyproject

SCRIPTS = {**pyproject("rrcm-diffusers")["project"]["scripts"], **pyproject("conan-st")["project"]["scripts"]}


def _main(target: str):
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)


def test_the_console_scripts_are_declared():
    assert set(SCRIPTS) == {"rrcm-certify", "rrcm-experiment", "conan-experiment", "conan-evaluate"}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_option_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _main(SCRIPTS[name])(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: {name}"), text[:200]
    options = re.findall(r"^  (--[a-z0-9-]+)(.*)$", text, re.M)
    assert options, text
    for flag, rest in options:
        block = text.split(flag, 1)[1].split("\n  --", 1)[0]
        assert len(block.split()) > 1 or rest.strip(), f"{name} {flag} has no help"


@pytest.mark.parametrize(
    "name, argv, message",
    [
        ("conan-experiment", ["--out", "x", "--steps", "0"], "--steps: expected a positive integer, got '0'"),
        ("conan-experiment", ["--out", "x", "--recipe", "Conan"], "--recipe: invalid choice"),
        ("conan-evaluate", ["m", "--tasks", "Cranfield"], "--tasks: invalid choice"),
        (
            "rrcm-certify",
            ["--pipeline", "p", "--out", "o", "--per-class", "-1"],
            "--per-class: expected a positive",
        ),
    ],
)
def test_a_bad_flag_is_named_before_anything_runs(name, argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        _main(SCRIPTS[name])(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written


def test_help_imports_nothing_heavy():
    """--help parses before torch, diffusers, sentence-transformers or mteb load (it took 8–11 s), and
    the CLIs' choices are the lists the modules run."""
    import subprocess
    import sys

    probe = (
        "import sys, contextlib, io\n"
        "from rrcm_diffusers import console as r\nfrom conan_st import console as c\n"
        "for main in (r.certify, r.experiment, c.experiment, c.evaluate):\n"
        "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "        main(['--help'])\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'sentence_transformers', 'mteb', 'scipy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr

    from conan_st import cli as conan_cli
    from conan_st.evaluation import TASK_NAMES
    from conan_st.experiment import RECIPES
    from rrcm_diffusers import cli as rrcm_cli
    from rrcm_diffusers.data import DATASETS

    assert (conan_cli.RECIPES, conan_cli.TASK_NAMES, rrcm_cli.DATASETS) == (RECIPES, TASK_NAMES, DATASETS)
    # rrcm-certify's default batch size is the library's (the light parser writes the number again)
    from rrcm_diffusers.certification import DEFAULT_BATCH_SIZE

    assert (
        rrcm_cli.certify_parser().parse_args(["--pipeline", "p", "--out", "o"]).batch_size
        == DEFAULT_BATCH_SIZE
    )


def _certify_argv(pipeline, out, data_dir, n):
    return ["--pipeline", str(pipeline), "--out", str(out), "--data-dir", str(data_dir), "--num-images", "2",
            "--n0", "10", "--n", str(n), "--batch-size", "32", "--no-progress"]  # fmt: skip


def test_an_error_found_after_the_start_ends_the_script_with_its_message_not_a_traceback(
    tmp_path, monkeypatch, capsys, data_dir
):
    """A folder of another run, a missing data folder or model: ``prog: error: message``, exit status 2,
    as a bad flag; what the first run wrote is untouched."""
    from rrcm_diffusers import RRCMPipeline
    from tests.rrcm.helpers import tiny_model

    monkeypatch.chdir(tmp_path)
    RRCMPipeline(model=tiny_model().for_classification(10)).save_pretrained(tmp_path / "pipe")
    _main(SCRIPTS["rrcm-certify"])(_certify_argv(tmp_path / "pipe", tmp_path / "out", data_dir, 20))
    first = (tmp_path / "out" / "certificates.jsonl").read_bytes()
    capsys.readouterr()
    cases = [
        ("rrcm-certify", _certify_argv(tmp_path / "pipe", tmp_path / "out", data_dir, 30),
         r"rrcm-certify: error: \S+out holds results made with another config \(differs in \['n'\]"),
        ("rrcm-certify", _certify_argv(tmp_path / "pipe", tmp_path / "new", tmp_path / "no-data", 20),
         r"rrcm-certify: error: expected data file \S+no-data/images/mnist/t10k-images"),
        ("conan-evaluate", [str(tmp_path / "no-model"), "--data-dir", str(data_dir)],
         r"conan-evaluate: error: Path \S+no-model not found"),
    ]  # fmt: skip
    for name, argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            _main(SCRIPTS[name])(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and re.search(message, err) and "Traceback" not in err, (name, err)
    assert (tmp_path / "out" / "certificates.jsonl").read_bytes() == first
    assert not (tmp_path / "new" / "certificates.jsonl").exists()


def test_conan_evaluate_without_the_mteb_extra_says_how_to_install_it(monkeypatch, capsys):
    """The ``[mteb]`` extra missing (its import fails, as in a venv without it; the wheels' case, ``--help``
    included, is in test_release.py): evaluating ends with the ``pip install`` line, no traceback."""
    import sys

    for name in ["mteb", *(m for m in sys.modules if m.startswith("mteb."))]:
        monkeypatch.setitem(sys.modules, name, None)  # `import mteb...` raises ImportError
    monkeypatch.delitem(sys.modules, "conan_st.evaluation", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        _main(SCRIPTS["conan-evaluate"])(["some-model"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert err.startswith("conan-evaluate: error: conan_st.evaluation needs mteb") and (
        "pip install 'conan-st[mteb]'" in err
    )


@pytest.mark.parametrize(
    "example, argv, message",
    [
        (
            "rrcm/certify.py",
            ["--pipeline", "p", "--out", "o"],
            r"rrcm-certify: error: data folder not found: \S+",
        ),
        (
            "rrcm/certify_report.py",
            ["--config", "no.yaml", "--out", "o"],
            "rrcm-experiment: error: .*'no.yaml'",
        ),
        (
            "conan/train.py",
            ["--out", "o", "--no-eval"],
            r"conan-experiment: error: data folder not found: \S+",
        ),
    ],
)
def test_the_example_scripts_end_an_error_as_their_console_scripts_do(
    example, argv, message, tmp_path, monkeypatch, capsys
):
    """``python examples/...`` (what the README launches) ends an error found after the start with its message
    and exit status 2, as the console script does, not a traceback; nothing is written."""
    import runpy
    import sys

    monkeypatch.chdir(tmp_path)
    for name in ("RRCM_DATA_DIR", "CONAN_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "no-data"))
    monkeypatch.setattr(sys, "argv", [example, *argv])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "examples" / example), run_name="__main__")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and re.search(message, err) and "Traceback" not in err, err
    assert not any(tmp_path.iterdir())  # nothing written
