"""Every YAML composes and validates; bad values stop with one message naming the key."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import CONF, compose_config
from transformers import AutoConfig

from fastcpu.config import ConfigError
from fastcpu.distillation import DistillationConfig, TermConfig
from fastcpu.measure import RuntimeConfig
from fastcpu.trial import TrialConfig
from fastcpu_runtime import AUTO, available_backends

GROUP_OPTIONS = [
    (group.name, option.stem)
    for group in sorted(CONF.iterdir())
    if group.is_dir() and group.name != "experiment"
    for option in sorted(group.glob("*.yaml"))
]
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def skip_missing_backend(group: str, option: str) -> None:
    """A runtime option whose backend is not installed here (ipex lives in its own environment) cannot
    validate; test_missing_backend_is_refused_with_its_install_hint covers what it says instead."""
    if group != "runtime":
        return
    backend = yaml.safe_load((CONF / group / f"{option}.yaml").read_text())["backend"]
    if backend not in (AUTO, *available_backends()):
        pytest.skip(f"backend {backend} is not installed in this environment")


def test_every_yaml_file_is_covered():
    assert len(GROUP_OPTIONS) >= 20 and {"squad", "sst2"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_validates(experiment):
    config = TrialConfig.from_hydra(compose_config([f"+experiment={experiment}"]))
    assert config.name == experiment


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS)
def test_group_option_composes_and_validates(group, option):
    skip_missing_backend(group, option)
    TrialConfig.from_hydra(compose_config([f"{group}={option}"]))


def test_default_runtime_backend_is_auto():
    assert RuntimeConfig().backend == AUTO
    assert TrialConfig.from_hydra(compose_config([])).runtime.backend == AUTO
    assert TrialConfig.from_hydra(compose_config(["+experiment=sst2"])).runtime.backend == AUTO


def test_main_experiment_settings():
    config = TrialConfig.from_hydra(compose_config(["+experiment=squad"]))
    assert config.pruning.pattern == "4x1"
    assert config.quantization.scheme == "static_int8"
    assert config.pruning.name == "reconstruct" and config.pruning.sparsity == 0.8
    assert (
        config.distillation.task_weight == 0.5 and config.distillation.terms["tinybert"].attention_weight == 0
    )
    kd = config.distillation.terms["logit_kd"]
    assert (kd.weight, kd.temperature, kd.skew) == (0.5, 2.0, 0.0)
    assert config.student.layers == [0, 2, 4]
    assert config.task.train_file.endswith("squad_sample.json")
    assert config.training.dropout == 0.0 and config.teacher.training.dropout is None  # teacher: its own
    assert config.tracking.log_models == "best" and config.tracking.registered_model == "fastcpu-squad"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("pruning.sparsity=1.5", "pruning.sparsity=1.5 is out of range; allowed: [0.0, 1.0)"),
        ("quantization.scheme=int4", "quantization.scheme='int4' is unknown; allowed: bf16, dynamic_int8"),
        (
            "distillation.logit_kd.temperature=0",
            "distillation.logit_kd.temperature=0.0 is out of range; allowed: (0.0, inf]",
        ),
        (
            "distillation.logit_kd.skew=1",
            "distillation.logit_kd.skew=1.0 is out of range; allowed: [0.0, 1.0)",
        ),
        (
            "+distillation.hidden={weight: 1}",
            "distillation.hidden is not a distillation term; allowed: task_weight",
        ),
        ("+distillation.logit_kd.alpha=0.5", "distillation.logit_kd: unknown key(s) ['alpha']"),
        ("pruning.scope=model", "pruning.scope='model' is not allowed; allowed: layer, global"),
        ("training.device=tpu", "training.device='tpu' is not allowed; allowed: auto, cpu, cuda"),
        ("training.dropout=1", "training.dropout=1.0 is out of range; allowed: [0.0, 1.0)"),
        ("pruning.pattern=2x2", "pruning.pattern='2x2' is not allowed; allowed: unstructured, 4x1"),
        ("+pruning.sparsty=0.5", "pruning: unknown key(s) ['sparsty']"),
        ("training.batch_size=zero", "training.batch_size must be an integer"),
        ("runtime.backend=tensorrt", "runtime.backend='tensorrt' is not available; available: auto, eager"),
        ("student.layers=[0,0]", "student.layers=[0, 0] repeats a layer"),
        ("task.doc_stride=500", "task.doc_stride"),
        ("training.precision=fp8", "training.precision='fp8' is not allowed; allowed: auto, fp32, bf16"),
        ("tracking.log_models=some", "tracking.log_models='some' is not one of best, all, none"),
        ("tracking.registered_model=''", "tracking.registered_model is an empty string; use null"),
    ],
)
def test_bad_value_names_key_and_allowed(override, message):
    with pytest.raises(ConfigError) as error:
        TrialConfig.from_hydra(compose_config(["+experiment=squad", override]))
    assert message in str(error.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("key", ["training.device", "teacher.training.device"])
def test_cuda_without_a_gpu_is_refused_saying_what_was_found(key):
    with pytest.raises(
        ConfigError, match=f"{key}=cuda but PyTorch .* finds (a CPU-only build|no CUDA device)"
    ):
        TrialConfig.from_hydra(compose_config(["+experiment=squad", f"{key}=cuda"]))


def test_a_loss_whose_weights_are_all_zero_is_refused():
    overrides = ["+experiment=squad", "distillation.task_weight=0", "distillation.logit_kd.weight=0"]
    overrides.append("distillation.tinybert.weight=0")
    with pytest.raises(ConfigError, match="every weight of the loss is zero"):
        TrialConfig.from_hydra(compose_config(overrides))


def test_option_files_inherit_their_base():
    """magnitude_unstructured states only its pattern; the rest comes from magnitude_4x1."""
    base = TrialConfig.from_hydra(compose_config(["pruning=magnitude_4x1"])).pruning
    derived = TrialConfig.from_hydra(compose_config(["pruning=magnitude_unstructured"])).pruning
    assert derived == dataclasses.replace(base, pattern="unstructured")
    assert "sparsity" not in (CONF / "pruning" / "magnitude_unstructured.yaml").read_text()


def test_missing_backend_is_refused_with_its_install_hint():
    if "ipex" in available_backends():
        pytest.skip("IPEX is installed in this environment")
    with pytest.raises(ConfigError) as error:
        TrialConfig.from_hydra(compose_config(["runtime=ipex"]))
    assert "runtime.backend='ipex' is not available (intel_extension_for_pytorch not installed;" in str(
        error.value
    )
    assert "-c constraints/ipex.txt" in str(error.value)


def test_cli_rejects_bad_value_before_any_work(tmp_path):
    """One line on stderr, non-zero exit, no MLflow store and no trial output written."""
    command = [sys.executable, "-m", "fastcpu", "+experiment=squad", "pruning.sparsity=1.5"]
    command += [f"hydra.run.dir={tmp_path}/trial"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert errors == ["fastcpu: error: pruning.sparsity=1.5 is out of range; allowed: [0.0, 1.0)"]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "mlruns").exists()
    assert not list(tmp_path.rglob("result.json")) and not list(tmp_path.rglob("manifest.json"))


def test_registered_name_of_another_task_stops_a_study_before_any_work(tmp_path):
    """`fastcpu-squad` already serving SST-2 labels: a SQuAD study must not add question answering to it."""
    from mlflow import MlflowClient

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(store, registry_uri=store)
    client.create_registered_model("fastcpu-squad")
    client.create_model_version("fastcpu-squad", str(tmp_path), tags={"fastcpu.task": "sst2"})
    command = [sys.executable, "-m", "fastcpu", "+experiment=squad", f"tracking.uri={store}"]
    command += [f"hydra.run.dir={tmp_path}/out", f"teacher.cache_dir={tmp_path}/cache"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert errors == [
        "fastcpu: error: tracking.registered_model='fastcpu-squad' already holds models of task sst2, and "
        "this study's task is squad; choose another name"
    ], done.stderr[-2000:]
    assert not (tmp_path / "cache").exists() and not list(
        tmp_path.rglob("result.json")
    )  # no teacher, no trial
    assert client.get_experiment_by_name("fastcpu") is None  # nor a parent run


@pytest.mark.parametrize("mode", [[], ["~search"]], ids=["study", "trial"])
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("task.max_seq_length=600", "task.max_seq_length=600 exceeds what the teacher ("),
        ("student.layers=[0,7]", "student.layers=[0, 7]: [7] out of range; the teacher has layers 0..5"),
        (
            "teacher.model=mpnet",
            "teacher mpnet: model type 'mpnet' is not supported yet; supported: bert, deberta-v2, "
            "distilbert, electra, modernbert, roberta, xlm-roberta",
        ),
    ],
)
def test_cli_checks_the_config_against_the_teachers_before_any_work(tmp_path, mode, override, message):
    """Values only the teacher's config can refute (MiniLM: 6 layers, 512 positions; a family fastcpu has
    no layer map for) stop a study before anything is written, and a single trial before the teacher loads
    (its MLflow run ends FAILED)."""
    AutoConfig.for_model("mpnet").save_pretrained(tmp_path / "mpnet")  # what `teacher.model=mpnet` names
    command = [sys.executable, "-m", "fastcpu", "+experiment=squad", *mode, override]
    command += [f"hydra.run.dir={tmp_path}/out", f"teacher.cache_dir={tmp_path}/cache"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith(f"fastcpu: error: {message}"), done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "cache").exists() and not list(tmp_path.rglob("result.json"))
    assert not (tmp_path / "sweeps").exists() and (tmp_path / "mlruns").exists() == (mode == ["~search"])


@pytest.mark.parametrize(
    ("group", "option"), [(g, o) for g, o in GROUP_OPTIONS if g not in ("recipe", "search")]
)
def test_every_setting_is_in_the_yaml(group, option):
    """Hydra only lets users override keys the YAML names, so every dataclass field must be there."""
    skip_missing_backend(group, option)
    built = getattr(TrialConfig.from_hydra(compose_config([f"{group}={option}"])), group)
    composed = compose_config([f"{group}={option}"])[group]
    for name, value in yaml_settings(built).items():
        assert name in composed, f"conf/{group}/{option}.yaml lacks {name}"
        if dataclasses.is_dataclass(value):
            nested = set(yaml_settings(value))
            assert nested <= set(composed[name]), f"conf/{group}/{option}.yaml {name}"


def yaml_settings(built) -> dict:
    """The settings a group's YAML must name, as the built config holds them: a distillation names its
    terms by key (the term's `name` is that key)."""
    if isinstance(built, DistillationConfig):
        return {"task_weight": built.task_weight, **built.terms}
    skip = {"name"} if isinstance(built, TermConfig) else set()
    return {f.name: getattr(built, f.name) for f in dataclasses.fields(built) if f.name not in skip}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS)
def test_experiment_allows_switching_any_option(experiment, group, option):
    """An experiment must not set values that only one option of a group has."""
    skip_missing_backend(group, option)
    TrialConfig.from_hydra(compose_config([f"+experiment={experiment}", f"{group}={option}"]))


@pytest.mark.parametrize("recipe", sorted(p.stem for p in (CONF / "recipe").glob("*.yaml")))
def test_a_recipe_only_picks_options(recipe):
    """A recipe chooses option files (or another recipe) and sets no value, so any option switched after it
    never meets a key it lacks; the choices it makes are the ones the composed config shows."""
    text = yaml.safe_load((CONF / "recipe" / f"{recipe}.yaml").read_text())
    assert set(text) == {"defaults"}
    config = TrialConfig.from_hydra(compose_config([f"recipe={recipe}"]))
    assert config.pruning.name in ("magnitude", "movement", "reconstruct") and config.distillation.terms
    # An experiment picks a recipe, so the recipe asked for on the command line is the one that runs.
    in_experiment = TrialConfig.from_hydra(compose_config(["+experiment=squad", f"recipe={recipe}"]))
    for group in ("pruning", "distillation", "quantization"):
        assert getattr(in_experiment, group) == getattr(config, group), group


def test_position_limit_per_family():
    """BERT reads max_position_embeddings tokens, RoBERTa two fewer (positions start after padding_idx),
    DeBERTa-v3 (relative positions only) has no limit to check."""
    from transformers import BertConfig, DebertaV2Config, RobertaConfig

    from fastcpu.trial import position_limit

    assert position_limit(BertConfig(max_position_embeddings=512)) == 512
    assert position_limit(RobertaConfig(max_position_embeddings=514, pad_token_id=1)) == 512
    assert position_limit(DebertaV2Config(position_biased_input=False)) is None
