"""rrcm-diffusers under hostile input: every case ends in an error that names the argument and
what was expected, or in a documented result; none certifies garbage, hangs or loads damaged weights."""

from __future__ import annotations

import json
import math

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from rrcm_diffusers import RRCMModel, RRCMPipeline
from rrcm_diffusers.certification import certify, predict
from rrcm_diffusers.training import FinetuneConfig, PretrainConfig, finetune, latest_checkpoint, pretrain
from tests.helpers import REPO
from tests.rrcm.helpers import tiny_model

IMAGES = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def _linear(num_classes: int = 3):
    torch.manual_seed(0)
    head = torch.nn.Linear(28 * 28, num_classes)
    return lambda x: head(x.flatten(1))


# ------------------------------------------------------------------ the classifier's output

CLASSIFIER_CASES = {
    "NaN logits": (lambda x: torch.full((x.shape[0], 3), math.nan), "non-finite logits"),
    "one NaN row": (
        lambda x: torch.cat([torch.full((1, 3), math.nan), torch.zeros(x.shape[0] - 1, 3)]),
        r"non-finite logits for [12] of \d+ noisy samples",
    ),
    "inf logits": (lambda x: torch.full((x.shape[0], 3), math.inf), "non-finite logits"),
    "twice the rows": (
        lambda x: torch.zeros(2 * x.shape[0], 3),
        r"returned \d+ rows of logits for a batch of",
    ),
    "one row": (lambda x: torch.zeros(1, 3), "rows of logits for a batch of"),
    "1-D output": (lambda x: torch.zeros(x.shape[0]), r"float logits of shape \(batch, num_classes\)"),
    "integer output": (lambda x: torch.zeros(x.shape[0], 3, dtype=torch.long), "float logits"),
    "not a tensor": (lambda x: [0] * x.shape[0], "float logits.*got list"),
    "classes change": (
        lambda x: torch.zeros(x.shape[0], 3 if x.shape[0] == 64 else 4),
        "returned 4 classes, earlier batches 3",
    ),
}


@pytest.mark.parametrize("entry", ["certify", "predict"])
@pytest.mark.parametrize("case", list(CLASSIFIER_CASES))
def test_a_bad_classifier_output_is_never_counted(case, entry):
    classifier, match = CLASSIFIER_CASES[case]
    with pytest.raises(ValueError, match=match):
        if entry == "certify":
            certify(classifier, IMAGES, 0.5, n0=10, n=100, batch_size=64, generator=torch.Generator())
        else:
            predict(classifier, IMAGES, 0.5, num_samples=100, batch_size=64, generator=torch.Generator())


def test_a_nan_model_is_refused_by_the_pipeline():
    model = tiny_model(num_classes=10, projection_dim=0)
    with torch.no_grad():
        model.classifier.weight[0, 0] = math.nan  # every logit of class 0 becomes NaN
    pipe = RRCMPipeline(model=model)
    with pytest.raises(ValueError, match="non-finite logits"):
        pipe.certify(IMAGES, sigma=0.5, n0=10, n=50)
    with pytest.raises(ValueError, match="non-finite logits"):
        pipe(IMAGES, sigma=0.5, num_samples=50)


# ------------------------------------------------------------------ arguments

ARG_CASES = {
    "n float 1e5": (dict(n=1e5), "n must be a positive integer, got 100000.0"),
    "n True": (dict(n=True), "n must be a positive integer"),
    "n0 zero": (dict(n0=0), "n0 must be a positive integer"),
    "n negative": (dict(n=-3), "n must be a positive integer"),
    "sigma inf": (dict(sigma=math.inf), "sigma must be a finite number > 0"),
    "sigma nan": (dict(sigma=math.nan), "sigma must be a finite number > 0"),
    "sigma zero": (dict(sigma=0.0), "sigma must be a finite number > 0"),
    "sigma string": (dict(sigma="0.5"), "sigma must be a finite number > 0"),
    "alpha nan": (dict(alpha=math.nan), r"alpha must be in \(0, 1\)"),
    "alpha one": (dict(alpha=1.0), r"alpha must be in \(0, 1\)"),
    "batch_size float": (dict(batch_size=10.5), "batch_size must be a positive integer"),
    "batch_size zero": (dict(batch_size=0), "batch_size must be a positive integer"),
    "images uint8": (dict(images=(IMAGES * 255).to(torch.uint8)), "images must be floating point in"),
    "images in [-1, 1]": (dict(images=IMAGES * 2 - 1), r"images must lie in \[0, 1\]"),
    "images with NaN": (dict(images=IMAGES.clone().fill_(math.nan)), r"images must lie in \[0, 1\]"),
    "images 2-D": (dict(images=IMAGES[0, 0]), r"images must be a float tensor \(N, C, H, W\)"),
    "images a list": (dict(images=[IMAGES]), r"images must be a float tensor"),
}


@pytest.mark.parametrize("case", list(ARG_CASES))
def test_bad_certify_argument_is_named(case):
    kwargs, match = ARG_CASES[case]
    args = dict(images=IMAGES, sigma=0.5, n0=10, n=100, batch_size=64, generator=torch.Generator())
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        certify(_linear(), **args)


def test_an_empty_batch_gives_empty_results():
    empty = IMAGES[:0]
    res = certify(_linear(), empty, 0.5, n0=10, n=100)
    assert res.predictions.shape == res.radii.shape == (0,)
    pred = predict(_linear(), empty, 0.5, num_samples=100)
    assert pred.predictions.shape == (0,) and pred.counts.shape == (0, 0)


# ------------------------------------------------------------------ damaged weights


def _damage_flip(folder):
    weights = folder / "diffusion_pytorch_model.safetensors"
    raw = bytearray(weights.read_bytes())
    for i in range(64):  # 64 bytes in the tensor data, far from the header
        raw[-200 - i] ^= 0x5A
    weights.write_bytes(bytes(raw))


def _rewrite(folder, edit, keep_checksums: bool = False):
    weights = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    edit(state)
    save_file(state, weights, metadata={"format": "pt"})
    if not keep_checksums:  # a damaged file whose checksum went with it: the key/value checks must catch it
        (folder / "checksums.sha256.json").unlink()


def _set_nan(state):
    state["classifier.weight"] = state["classifier.weight"].clone()
    state["classifier.weight"][0, 0] = math.nan


WEIGHT_CASES = {
    "flipped bytes": (_damage_flip, "does not match the checksum"),
    "rewritten with the checksum kept": (
        lambda f: _rewrite(f, lambda s: s.update(x=torch.zeros(1)), keep_checksums=True),
        "does not match the checksum",
    ),
    "missing key": (lambda f: _rewrite(f, lambda s: s.pop("classifier.weight")), "missing_keys"),
    "extra key": (
        lambda f: _rewrite(f, lambda s: s.update({"extra.weight": torch.zeros(2)})),
        "unexpected_keys",
    ),
    "NaN weight": (
        lambda f: _rewrite(f, _set_nan),
        r"non-finite values \(NaN/inf\) in \['classifier.weight'\]",
    ),
    "config/weights mismatch": (
        lambda f: _rewrite(f, lambda s: s.update({"classifier.weight": torch.zeros(5, 32)})),
        "classifier.weight expected shape",
    ),
}


@pytest.mark.parametrize("case", list(WEIGHT_CASES))
def test_damaged_weights_fail_loudly_at_load(case, tmp_path):
    damage, match = WEIGHT_CASES[case]
    RRCMPipeline(model=tiny_model(num_classes=10, projection_dim=0)).save_pretrained(tmp_path)
    damage(tmp_path / "model")
    with pytest.raises(ValueError, match=match):
        RRCMPipeline.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=match):
        RRCMModel.from_pretrained(tmp_path / "model")


def test_undamaged_weights_load_with_their_checksum(tmp_path):
    model = tiny_model(num_classes=10, projection_dim=0)
    RRCMPipeline(model=model).save_pretrained(tmp_path)
    assert (tmp_path / "model" / "checksums.sha256.json").is_file()
    loaded = RRCMPipeline.from_pretrained(tmp_path).model
    torch.testing.assert_close(loaded.state_dict(), model.state_dict(), rtol=0, atol=0)


# ------------------------------------------------------------------ training


def _pre(**kw):
    return PretrainConfig(**{**dict(steps=2, batch_size=8, warmup_steps=0, log_every=1), **kw})


TRAIN_CASES = {
    # fewer images than one batch: the epoch loop used to spin forever
    "pretrain: too few images": (
        lambda: pretrain(
            tiny_model(), torch.zeros(4, 1, 28, 28, dtype=torch.uint8), _pre(), Accelerator(cpu=True)
        ),
        "images: 4 images make no full batch of batch_size=8",
    ),
    "pretrain: float images": (
        lambda: pretrain(tiny_model(), IMAGES, _pre(), Accelerator(cpu=True)),
        r"images must be a uint8 tensor \(N, C, H, W\)",
    ),
    "pretrain: negative steps": (
        lambda: pretrain(tiny_model(), torch.zeros(16, 1, 28, 28, dtype=torch.uint8), _pre(steps=-3)),
        "PretrainConfig.steps must be an integer >= 0, got -3",
    ),
    "finetune: too few images": (
        lambda: finetune(
            tiny_model().for_classification(10),
            torch.zeros(4, 1, 28, 28, dtype=torch.uint8),
            torch.zeros(4, dtype=torch.long),
            FinetuneConfig(sigma=0.5, probe_steps=1, steps=1, batch_size=8),
            Accelerator(cpu=True),
        ),
        "images: 4 images make no full batch",
    ),
    "finetune: labels 1..10": (
        lambda: finetune(
            tiny_model().for_classification(10),
            torch.zeros(10, 1, 28, 28, dtype=torch.uint8),
            torch.arange(1, 11),
            FinetuneConfig(sigma=0.5, probe_steps=1, steps=1, batch_size=8),
            Accelerator(cpu=True),
        ),
        r"labels must be int64 class ids in \[0, 10\).*in \[1, 10\]",
    ),
    "finetune: float labels": (
        lambda: finetune(
            tiny_model().for_classification(10),
            torch.zeros(10, 1, 28, 28, dtype=torch.uint8),
            torch.zeros(10),
            FinetuneConfig(sigma=0.5, probe_steps=1, steps=1, batch_size=8),
            Accelerator(cpu=True),
        ),
        "labels must be int64 class ids",
    ),
}


@pytest.mark.timeout(60)  # a hang fails here instead of stalling the suite
@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_bad_training_input_is_named(case):
    run, match = TRAIN_CASES[case]
    with pytest.raises(ValueError, match=match):
        run()


def test_stray_checkpoint_names_are_ignored(tmp_path):
    for name in ("checkpoint-2", "checkpoint-10", "checkpoint-8.bak", "checkpoint-x"):
        (tmp_path / name).mkdir()
    assert latest_checkpoint(tmp_path).name == "checkpoint-10"


# ------------------------------------------------------------------ cached experiment stages


def _tiny_experiment(data_dir, **model):
    from rrcm_diffusers.experiment import load_config

    return load_config(
        None,
        data_dir=str(data_dir),
        sigmas=[0.5],
        model={"patch_size": 7, "hidden_size": 32, "depth": 1, "num_heads": 2, **model},
        pretrain={"steps": 2, "batch_size": 16, "checkpoint_every": 1, "warmup_steps": 0},
        finetune={"probe_steps": 1, "steps": 1, "batch_size": 16, "warmup_steps": 0},
        cohen={"enabled": False},
        dds={"enabled": False},
        probe={"enabled": False},
        certify={"per_class": 1, "n0": 10, "n": 20, "alpha": 0.001, "batch_size": 32},
    )


@pytest.mark.timeout(300)
def test_a_cached_stage_is_reused_only_under_its_own_config(tmp_path, data_dir):
    from rrcm_diffusers.experiment import run

    out = tmp_path / "exp"
    first = run(_tiny_experiment(data_dir), out, Accelerator(cpu=True), progress=False)
    again = run(_tiny_experiment(data_dir), out, Accelerator(cpu=True), progress=False)  # cached stages

    def untimed(rows):
        return [{k: v for k, v in r.items() if "second" not in k and "ms_per" not in k} for r in rows]

    assert untimed(again["certified"]) == untimed(first["certified"])
    assert set(again["timings_s"]) == {"certify"}  # nothing was trained again
    card = (out / "rrcm-sigma0.5" / "pipeline" / "README.md").read_text()  # the card states what was measured
    assert "certified accuracy" in card and f"| ACR | {first['certified'][0]['acr']:.3f} |" in card
    with pytest.raises(
        ValueError, match=r"pretrain holds results made with another config \(differs in \['model'\]"
    ):
        run(_tiny_experiment(data_dir, hidden_size=64), out, Accelerator(cpu=True), progress=False)
    (out / "rrcm-sigma0.5" / "stage.json").unlink()  # results whose config is unknown
    with pytest.raises(ValueError, match=r"rrcm-sigma0\.5 holds results with no record of the config"):
        run(_tiny_experiment(data_dir), out, Accelerator(cpu=True), progress=False)


@pytest.mark.timeout(300)
def test_a_run_resumed_after_pretraining_trains_the_same_models(tmp_path, data_dir):
    import shutil

    from rrcm_diffusers.experiment import ProbeConfig, ScratchConfig, run

    cfg = _tiny_experiment(data_dir)
    cfg.probe = ProbeConfig(enabled=True, train_images=100, test_images=50)
    cfg.scratch = ScratchConfig(enabled=True, steps=2)
    straight = run(cfg, tmp_path / "a", Accelerator(cpu=True), progress=False)
    # the second run finds pretraining and probes on disk, as after a kill during fine-tuning
    shutil.copytree(tmp_path / "a" / "pretrain", tmp_path / "b" / "pretrain")
    for name in ("probe.json", "probe.stage.json"):
        shutil.copy(tmp_path / "a" / name, tmp_path / "b" / name)
    resumed = run(cfg, tmp_path / "b", Accelerator(cpu=True), progress=False)
    assert "pretrain" in straight["timings_s"] and "pretrain" not in resumed["timings_s"]
    assert resumed["probe"] == straight["probe"]
    for folder in ("rrcm-sigma0.5", "scratch-sigma0.5"):
        weights = [
            (
                tmp_path / run_dir / folder / "pipeline" / "model" / "diffusion_pytorch_model.safetensors"
            ).read_bytes()
            for run_dir in ("a", "b")
        ]
        assert weights[0] == weights[1], folder
    assert [r["acr"] for r in resumed["certified"]] == [r["acr"] for r in straight["certified"]]


# ------------------------------------------------------------------ experiment config keys

CONFIG_CASES = {
    "misspelt certify key": (
        dict(certify={"nn": 10_000}),
        r"unknown key 'nn' in section 'certify'.*did you mean 'n'",
    ),
    "misspelt top-level key": (
        dict(sigmaz=[0.5]),
        r"unknown key 'sigmaz' in the top level.*did you mean 'sigmas'",
    ),
    "misspelt pretrain key": (dict(pretrain={"stepz": 3}), r"unknown key 'stepz' in section 'pretrain'"),
    "misspelt model key": (dict(model={"hiden_size": 3}), r"unknown key 'hiden_size' in section 'model'"),
    "misspelt cohen key": (dict(cohen={"enable": False}), r"unknown key 'enable' in section 'cohen'"),
    "misspelt probe key": (dict(probe={"test_image": 5}), r"unknown key 'test_image' in section 'probe'"),
    "misspelt dds key": (dict(dds={"unet_step": 5}), r"unknown key 'unet_step' in section 'dds'"),
    "finetune sigma (set by sigmas)": (
        dict(finetune={"sigma": 0.25}),
        r"unknown key 'sigma' in section 'finetune'",
    ),
    "section not a mapping": (dict(cohen=3), r"config section 'cohen' must be a mapping"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_experiment_config_refuses_keys_no_stage_reads(case):
    from rrcm_diffusers.experiment import load_config

    overrides, match = CONFIG_CASES[case]
    with pytest.raises(ValueError, match=match):
        load_config(None, **overrides)


def test_experiment_config_names_the_file(tmp_path):
    from rrcm_diffusers.experiment import load_config

    cfg = tmp_path / "exp.yaml"
    cfg.write_text("certify: {per_class: 5, n: 100, alhpa: 0.01}\n")
    with pytest.raises(
        ValueError, match=rf"unknown key 'alhpa' in section 'certify' of {cfg}.*did you mean 'alpha'"
    ):
        load_config(cfg)


def test_experiment_config_is_typed_per_section_and_round_trips(tmp_path):
    from rrcm_diffusers.experiment import CertifyConfig, CohenConfig, ExperimentConfig, load_config

    cfg_file = tmp_path / "exp.yaml"
    cfg_file.write_text("certify: {n: 500}\ncohen: {consistency: true}\npretrain: {steps: 7}\n")
    cfg = load_config(cfg_file, certify={"alpha": 0.01})
    assert isinstance(cfg.certify, CertifyConfig) and isinstance(cfg.cohen, CohenConfig)
    # each key comes from the YAML, the overrides or the section's default, one level deep
    assert (cfg.certify.n, cfg.certify.alpha, cfg.certify.n0) == (500, 0.01, CertifyConfig().n0)
    assert cfg.pretrain == {**ExperimentConfig().pretrain, "steps": 7}
    assert ExperimentConfig.from_dict(cfg.to_dict()) == cfg
    # the Cohen baseline's trainer config follows its section
    ft = cfg.cohen.finetune_config(0.5, seed=3)
    assert (ft.num_noise_samples, ft.consistency_weight, ft.seed, ft.probe_steps) == (2, None, 3, 0)


@pytest.mark.timeout(300)
def test_pretraining_loss_ablations_are_rows_of_the_same_table(tmp_path, data_dir):
    import json

    from rrcm_diffusers.experiment import load_config, run

    cfg = _tiny_experiment(data_dir)
    cfg.ablations = {"rRCM, instance term only": {"consistency_weight": 0.0}}
    summary = run(cfg, tmp_path, Accelerator(cpu=True), progress=False)
    methods = {row["method"] for row in summary["certified"]}
    assert methods == {"rRCM", "rRCM, instance term only"}
    own = json.loads((tmp_path / "pretrain-rrcm-instance-term-only" / "history.json").read_text())
    assert all(h["consistency"] == 0.0 for h in own)  # the term is off in the ablation ...
    assert any(
        h["consistency"] != 0.0 for h in json.loads((tmp_path / "pretrain" / "history.json").read_text())
    )
    assert (tmp_path / "rrcm-instance-term-only-sigma0.5" / "pipeline" / "model_index.json").is_file()
    assert [b["method"] for b in summary["budgets"]] == ["rRCM", "rRCM, instance term only"]
    with pytest.raises(ValueError, match=r"unknown key 'instance_weigth' in ablation 'x'.*did you mean"):
        load_config(None, ablations={"x": {"instance_weigth": 0.0}})


@pytest.mark.parametrize(
    "path", sorted((REPO / "examples/rrcm/configs").glob("*.yaml")), ids=lambda p: p.name
)
def test_every_shipped_config_loads(path):
    from rrcm_diffusers.experiment import load_config

    cfg = load_config(path)
    assert cfg.sigmas and all(0 < s < 10 for s in cfg.sigmas)


@pytest.mark.parametrize(
    "ablations, clash",
    [
        ({"Cohen": {"instance_weight": 0.0}}, "another method"),  # would replace the Cohen row
        ({"scratch": {"instance_weight": 0.0}}, "another method"),  # scratch-sigma* is the baseline's
        ({"a b": {"tau": 0.1}, "A-B": {"tau": 0.3}}, "'a b'"),  # one folder a-b-sigma* for two rows
        ({"!!": {"tau": 0.1}}, "another method"),  # no folder name at all
    ],
)
def test_an_ablation_name_must_not_clash_with_another_row(ablations, clash):
    from rrcm_diffusers.experiment import load_config

    with pytest.raises(ValueError, match=rf"needs its own report row and folder.*clashes with {clash}"):
        load_config(None, ablations=ablations)


@pytest.mark.timeout(300)
def test_seeds_run_once_each_and_a_finished_seed_is_read_back(tmp_path, data_dir):
    from rrcm_diffusers.experiment import run_seeds

    cfg = _tiny_experiment(data_dir)
    first = run_seeds(cfg, [0, 3], tmp_path, Accelerator(cpu=True), progress=False)
    assert first["seeds"] == [0, 3] and {m["seeds"] for m in first["methods"]} == {2}
    per_seed = [json.loads((tmp_path / f"seed{s}" / "summary.json").read_text()) for s in (0, 3)]
    assert [p["config"]["seed"] for p in per_seed] == [0, 3]
    weights = "rrcm-sigma0.5/pipeline/model/diffusion_pytorch_model.safetensors"
    assert (tmp_path / "seed0" / weights).read_bytes() != (tmp_path / "seed3" / weights).read_bytes()
    again = run_seeds(cfg, [0, 3], tmp_path, Accelerator(cpu=True), progress=False)  # nothing re-run
    assert again == first and json.loads((tmp_path / "seeds.json").read_text()) == first
    assert "mean ± sd over 2 training seeds" in (tmp_path / "seeds.md").read_text()
    with pytest.raises(ValueError, match="seeds must be distinct"):
        run_seeds(cfg, [1, 1], tmp_path, Accelerator(cpu=True), progress=False)


# ------------------------------------------------------------------ round 3 (#31): a class per block
# Each block is one class of failure found by trying the packages as a careless script would; the
# cases are ours, not only the report's. Every one ends in an error that names the argument (or the
# file and line) and what was expected, leaves what was on disk as it was, or gives a documented result.

X16 = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def _folder_bytes(folder) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _pretrained_folder(tmp_path):
    out = tmp_path / "run"
    pretrain(tiny_model(), X16, _pre(steps=2, checkpoint_every=1), Accelerator(cpu=True), out, progress=False)
    return out


FOLDER_CASES = {  # (what the second call changes, the message)
    "another architecture": (dict(model=dict(hidden_size=48)), r"another config \(differs in \['model'\]"),
    "another learning rate": (dict(config=dict(lr=5e-3)), r"another config \(differs in \['config'\]"),
    "another seed": (dict(config=dict(seed=3)), r"another config \(differs in \['config'\]"),
    "other data": (dict(images=X16.flip(0)), r"another config \(differs in \['data_sha256'\]"),
    "another stage (finetune)": (dict(stage="finetune"), r"another config \(differs in"),
    "resume=False over its checkpoints": (dict(resume=False), "resume=False would overwrite them"),
}


@pytest.mark.parametrize("case", list(FOLDER_CASES))
def test_a_training_run_never_clobbers_or_adopts_another_runs_folder(case, tmp_path):
    change, match = FOLDER_CASES[case]
    out = _pretrained_folder(tmp_path)
    before = _folder_bytes(out)
    with pytest.raises(ValueError, match=match):
        if change.get("stage") == "finetune":
            finetune(
                tiny_model().for_classification(10),
                X16,
                torch.arange(16) % 10,
                FinetuneConfig(sigma=0.5, probe_steps=1, steps=1, batch_size=8),
                Accelerator(cpu=True),
                out,
                progress=False,
            )
        else:
            model = tiny_model(**change.get("model", {}))
            cfg = _pre(steps=3, checkpoint_every=1, **change.get("config", {}))
            images = change.get("images", X16)
            pretrain(
                model,
                images,
                cfg,
                Accelerator(cpu=True),
                out,
                resume=change.get("resume", True),
                progress=False,
            )
    assert _folder_bytes(out) == before  # nothing written, nothing deleted


def test_checkpoints_with_no_record_are_not_adopted(tmp_path):
    out = _pretrained_folder(tmp_path)
    (out / "training_run.json").unlink()  # another tool's (or an older version's) checkpoints
    before = _folder_bytes(out)
    with pytest.raises(ValueError, match="holds results with no record of the config"):
        pretrain(
            tiny_model(), X16, _pre(steps=3, checkpoint_every=1), Accelerator(cpu=True), out, progress=False
        )
    assert _folder_bytes(out) == before


def test_the_same_run_resumes_and_a_longer_one_continues_it(tmp_path):
    out = _pretrained_folder(tmp_path)
    _, _, hist = pretrain(
        tiny_model(seed=4), X16, _pre(steps=3, checkpoint_every=1), Accelerator(cpu=True), out, progress=False
    )
    assert [h["step"] for h in hist] == [3]  # resumed after step 2: the record allows more steps


def test_output_dir_that_is_a_file_is_named(tmp_path):
    (tmp_path / "f").write_text("mine")
    with pytest.raises(ValueError, match=r"output_dir .* exists and is not a folder"):
        pretrain(tiny_model(), X16, _pre(), Accelerator(cpu=True), tmp_path / "f", progress=False)
    assert (tmp_path / "f").read_text() == "mine"


def _int_weights(state):
    for k in list(state):
        state[k] = (state[k] * 100).to(torch.int32)  # cast back to float on load: 98 % zeros


def _half_weights(state):
    for k in list(state):
        state[k] = state[k].half()  # floating point: loads (cast), as diffusers does


INT_WEIGHT_CASES = {
    "every tensor int32": (_int_weights, "holds non-floating tensors"),
    "one tensor int64": (
        lambda s: s.update({"classifier.weight": s["classifier.weight"].long()}),
        r"holds non-floating tensors \(1, e.g. \{'classifier.weight': 'I64'\}\)",
    ),
    "one tensor bool": (
        lambda s: s.update({"classifier.bias": s["classifier.bias"] > 0}),
        "holds non-floating tensors",
    ),
}


@pytest.mark.parametrize("case", list(INT_WEIGHT_CASES))
def test_weights_that_are_not_floating_point_are_refused(case, tmp_path):
    edit, match = INT_WEIGHT_CASES[case]
    RRCMPipeline(model=tiny_model(num_classes=10, projection_dim=0)).save_pretrained(tmp_path)
    _rewrite(tmp_path / "model", edit)
    with pytest.raises(ValueError, match=match):
        RRCMPipeline.from_pretrained(tmp_path)


def test_half_precision_weights_still_load(tmp_path):
    RRCMPipeline(model=tiny_model(num_classes=10, projection_dim=0)).save_pretrained(tmp_path)
    _rewrite(tmp_path / "model", _half_weights)
    assert RRCMPipeline.from_pretrained(tmp_path).model.classifier.weight.dtype == torch.float32


VALUE_CASES = {  # class 8: a raw torch/Python message before; now the argument's name
    "sigma True": (
        lambda: certify(_linear(), IMAGES, True, n0=10, n=20),
        "sigma must be a finite number > 0",
    ),
    "sigma 1e300": (lambda: certify(_linear(), IMAGES, 1e300, n0=10, n=20), r"sigma must be .*<= 10000"),
    "sigma None": (lambda: certify(_linear(), IMAGES, None, n0=10, n=20), "sigma must be a finite number"),
    "alpha True": (
        lambda: certify(_linear(), IMAGES, 0.5, n0=10, n=20, alpha=True),
        r"alpha must be in \(0, 1\)",
    ),
    "predict sigma True": (
        lambda: predict(_linear(), IMAGES, True, num_samples=10),
        "sigma must be a finite number > 0",
    ),
    "pipeline sigma 1e300": (
        lambda: RRCMPipeline(model=tiny_model(num_classes=3)).certify(IMAGES, sigma=1e300, n0=10, n=20),
        r"sigma must be .*<= 10000",
    ),
    "log_every 0": (
        lambda: PretrainConfig(log_every=0),
        r"PretrainConfig.log_every must be an integer >= 1, got 0",
    ),
    "batch_size 2.5": (
        lambda: PretrainConfig(batch_size=2.5),
        r"PretrainConfig.batch_size must be an integer",
    ),
    "steps 1e3": (
        lambda: PretrainConfig(steps=1e3),
        r"PretrainConfig.steps must be an integer >= 0, got 1000.0",
    ),
    "lr nan": (
        lambda: PretrainConfig(lr=math.nan),
        r"PretrainConfig.lr must be a finite number in \(0, inf\]",
    ),
    "tau 0": (lambda: PretrainConfig(tau=0.0), r"PretrainConfig.tau must be a finite number"),
    "ema_end 2": (
        lambda: PretrainConfig(ema_end=2.0),
        r"PretrainConfig.ema_end must be a finite number in \[0, 1\]",
    ),
    "ema_schedule typo": (
        lambda: PretrainConfig(ema_schedule="sigmiod"),
        "PretrainConfig.ema_schedule must be one of",
    ),
    "augment typo": (
        lambda: PretrainConfig(augment="gray"),
        r"PretrainConfig.augment must be one of \['grey', 'rgb'\]",
    ),
    "finetune sigma -1": (
        lambda: FinetuneConfig(sigma=-1.0),
        "FinetuneConfig.sigma must be a finite number > 0",
    ),
    "finetune log_every 0": (
        lambda: FinetuneConfig(log_every=0),
        "FinetuneConfig.log_every must be an integer >= 1",
    ),
    "finetune layer_decay 0": (
        lambda: FinetuneConfig(layer_decay=0.0),
        r"FinetuneConfig.layer_decay must be .* \(0, 1\]",
    ),
    "finetune noise samples 0": (
        lambda: FinetuneConfig(num_noise_samples=0),
        "FinetuneConfig.num_noise_samples must be an integer >= 1",
    ),
    "per_class 0": (
        lambda: __import__("rrcm_diffusers.data").data.strided_class_subset(torch.arange(10), 0),
        "per_class must be an integer >= 1",
    ),
    "plugin switch unparsable": (
        lambda: _with_env(
            "RRCM_DISABLE_PLUGIN_AUTOLOAD", "maybe", "rrcm_diffusers.hooks", "build_plugin_manager"
        ),
        "RRCM_DISABLE_PLUGIN_AUTOLOAD must be 1/0",
    ),
}


def _with_env(name, value, module, function):
    import importlib
    import os

    old = os.environ.get(name)
    os.environ[name] = value
    try:
        return getattr(importlib.import_module(module), function)()
    finally:
        os.environ.pop(name) if old is None else os.environ.__setitem__(name, old)


@pytest.mark.parametrize("case", list(VALUE_CASES))
def test_a_bad_value_names_its_argument(case):
    run, match = VALUE_CASES[case]
    with pytest.raises(ValueError, match=match):
        run()


EXPERIMENT_VALUE_CASES = {  # refused at load, before any stage claims a folder
    "certify n 0": (dict(certify={"n": 0}), r"certify.n must be an integer >= 1, got 0"),
    "certify per_class -5": (dict(certify={"per_class": -5}), r"certify.per_class must be an integer >= 1"),
    "certify alpha 1": (dict(certify={"alpha": 1.0}), r"certify.alpha must be in \(0, 1\)"),
    "certify sequential 'yes'": (
        dict(certify={"sequential": "yes"}),
        r"certify.sequential must be true or false, got 'yes'",
    ),
    "certify workers 0": (dict(certify={"workers": 0}), r"certify.workers must be an integer >= 1, got 0"),
    "certify futility without sequential": (
        dict(certify={"futility": 0.2}),
        r"certify.futility \(0.2\) applies only with certify.sequential: true",
    ),
    "certify futility 1.5": (
        dict(certify={"sequential": True, "futility": 1.5}),
        r"certify.futility must be in \(0, 1\), got 1.5",
    ),
    "sigmas negative": (dict(sigmas=[0.5, -0.25]), r"sigmas\[...\] must be a finite number > 0"),
    "sigmas empty": (dict(sigmas=[]), "sigmas must be a non-empty list"),
    "sigmas a number": (dict(sigmas=0.5), "sigmas must be a non-empty list"),
    "pretrain log_every 0": (
        dict(pretrain={"log_every": 0}),
        "PretrainConfig.log_every must be an integer >= 1",
    ),
    "finetune lr 0": (dict(finetune={"lr": 0.0}), r"FinetuneConfig.lr must be a finite number in \(0, inf\]"),
    "ablation tau -1": (dict(ablations={"x": {"tau": -1.0}}), "PretrainConfig.tau must be a finite number"),
    "dataset typo": (dict(dataset="mnsit"), r"dataset must be one of \['mnist', 'cifar10'\]"),
    "cohen steps 2.5": (dict(cohen={"steps": 2.5}), "FinetuneConfig.steps must be an integer"),
    "probe images 0": (dict(probe={"test_images": 0}), "probe.test_images must be an integer >= 1"),
}


@pytest.mark.parametrize("case", list(EXPERIMENT_VALUE_CASES))
def test_experiment_config_values_are_checked_before_anything_is_written(case):
    from rrcm_diffusers.experiment import load_config

    overrides, match = EXPERIMENT_VALUE_CASES[case]
    with pytest.raises(ValueError, match=match):
        load_config(None, **overrides)


def test_an_experiment_model_section_is_checked_before_any_folder(tmp_path, data_dir):
    from rrcm_diffusers.experiment import run

    cfg = _tiny_experiment(data_dir, num_heads=5)  # 32 is not a multiple of 5 heads
    with pytest.raises((ValueError, AssertionError)):
        run(cfg, tmp_path / "exp", Accelerator(cpu=True), progress=False)
    assert not (tmp_path / "exp").exists()
