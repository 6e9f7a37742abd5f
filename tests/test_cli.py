"""The ``jointray`` command line as a user meets it: version, configs by name from any folder, the resolved
config, and requests that cannot run failing before Ray starts."""

import os
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from jointray.cli import app
from jointray.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]
JOINTRAY = str(Path(sys.executable).parent / "jointray")
#: Generous: a command that fails before Ray starts returns in about a second; starting Ray takes longer.
FAIL_FAST_S = 20


def jointray(*args: str, cwd: Path) -> tuple[subprocess.CompletedProcess, float, bool]:
    """Run the installed ``jointray`` executable as a user would (a terminal wide enough not to wrap, no cluster
    address): its result, the seconds it took and whether it started Ray, which creates ``$RAY_TMPDIR/ray``."""
    with tempfile.TemporaryDirectory(prefix="jr", dir="/tmp") as ray_tmp:  # short: Ray's socket paths live there
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"COLUMNS": "240", "RAY_TMPDIR": ray_tmp}
        started = time.monotonic()
        done = subprocess.run([JOINTRAY, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
                              check=False)
        return done, time.monotonic() - started, (Path(ray_tmp) / "ray").exists()


def invoke(*args: str):
    """``jointray ARGS`` in this process, output joined into one line (rich wraps at 80 columns)."""
    result = CliRunner().invoke(app, list(args))
    return result, " ".join(result.output.split())


@pytest.fixture
def no_ray(monkeypatch):
    """Starting Ray fails the test: the command had to fail before it."""

    def refuse(*_args, **_kwargs):
        raise AssertionError("the command started Ray")

    monkeypatch.setattr("jointray.runtime.init_ray", refuse)


# 1. --version

def test_version_prints_the_installed_package_version(tmp_path):
    done, *_ = jointray("--version", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"jointray {version('jointray')}\n"


# 2. Built-in configs by name, from any folder

def test_builtin_configs_are_the_packages_and_the_repository_folder_links_to_them():
    from jointray import builtin_configs

    assert builtin_configs.names() == ["msd_hippocampus", "msd_nnunet_augment", "synthetic", "tune_msd",
                                       "tune_synthetic"]  # serve.yaml is a Serve config file
    assert builtin_configs.FOLDER == REPO / "jointray" / "configs"
    assert (REPO / "configs").resolve() == builtin_configs.FOLDER.resolve()
    assert sorted(p.name for p in builtin_configs.FOLDER.glob("*.yaml")) == [
        "msd_hippocampus.yaml", "msd_nnunet_augment.yaml", "serve.yaml", "synthetic.yaml", "tune_msd.yaml",
        "tune_synthetic.yaml"]


def test_every_builtin_config_loads():
    """tune_msd once named a search space its first point did not fill: it failed only when a search started."""
    from jointray import builtin_configs
    from jointray.config import load_config

    for name in builtin_configs.names():
        assert load_config(name, []).train.name, name


@pytest.mark.parametrize("name", ["synthetic", "msd_hippocampus"])
def test_config_by_name_prints_the_packaged_config_from_any_folder(tmp_path, name):
    done, *_ = jointray("config", name, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    printed = yaml.safe_load(done.stdout)
    assert Config.model_validate(printed) == load_config(REPO / "configs" / f"{name}.yaml")
    assert printed["train"]["name"] == name
    # data paths as the file gives them: relative to wherever the command runs
    assert printed["data"]["output"] == str(load_config(REPO / "configs" / f"{name}.yaml").data.output)


def test_a_path_loads_as_before_and_an_existing_file_wins_over_a_name(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "x.yaml").write_text("train: {name: from_a_path}\n")
    (tmp_path / "synthetic").write_text("train: {name: a_file_called_synthetic}\n")
    done, *_ = jointray("config", "mine/x.yaml", cwd=tmp_path)
    assert done.returncode == 0 and yaml.safe_load(done.stdout)["train"]["name"] == "from_a_path"
    done, *_ = jointray("config", "synthetic", cwd=tmp_path)
    assert done.returncode == 0 and yaml.safe_load(done.stdout)["train"]["name"] == "a_file_called_synthetic"


def test_an_unknown_config_fails_listing_the_builtin_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for value in ("synthetc", "configs/synthetic.yaml", "serve"):
        result, output = invoke("config", value)
        assert result.exit_code == 2
        assert output == (f"error: config {value} does not exist: not a file, nor a built-in config "
                          "(built-in: msd_hippocampus, msd_nnunet_augment, synthetic, tune_msd, tune_synthetic)")


def test_config_applies_overrides_and_its_output_loads_back_as_the_same_config(tmp_path):
    result, _ = invoke("config", "synthetic", "train.epochs=3", "data.root=../elsewhere")
    assert result.exit_code == 0, result.output
    printed = tmp_path / "printed.yaml"
    printed.write_text(result.stdout)
    assert load_config(printed) == load_config("synthetic", ["train.epochs=3", "data.root=../elsewhere"])
    assert yaml.safe_load(result.stdout)["data"]["root"] == "../elsewhere"


def test_config_with_a_bad_override_fails_naming_the_key():
    result, output = invoke("config", "synthetic", "train.epoch=3")
    assert result.exit_code == 2
    assert output == "error: invalid configuration: train.epoch: unknown key (value 3)"


def test_demo_finds_its_config_from_any_folder(tmp_path, monkeypatch, no_ray):
    """The default config is the packaged synthetic one, not ./configs/synthetic.yaml: from another folder the
    demo gets as far as reading it (and here stops at the format check, before Ray)."""
    monkeypatch.chdir(tmp_path)
    result, output = invoke("demo", "data.format=msd")
    assert result.exit_code == 2, output
    assert output == "error: the demo runs on the synthetic cohort (data.format=synthetic)"


def test_demo_looks_for_its_dicom_study_beside_the_source_tree_not_the_working_folder():
    from jointray.cli import DEMO_DICOM

    assert DEMO_DICOM == REPO.parent / "shared" / "data" / "dicom_hippocrop" / "study1"


def test_make_demo_config_path_still_resolves():
    makefile = (REPO / "Makefile").read_text()
    assert "jointray demo --config configs/synthetic.yaml" in makefile
    assert load_config(REPO / "configs" / "synthetic.yaml") == load_config("synthetic")


# 3. Paths and the config checked before Ray starts

def test_prepare_with_a_missing_data_root_fails_before_ray_starts(tmp_path):
    done, elapsed, ray_started = jointray("prepare", "--config", "synthetic", "data.format=msd", "data.root=/nope", cwd=tmp_path)
    output = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 2, output
    assert output == "error: data.root: /nope does not exist (data.format=msd)"
    assert not ray_started and elapsed < FAIL_FAST_S


def test_prepare_with_a_missing_clinical_table_fails_before_ray_starts(tmp_path, monkeypatch, no_ray):
    monkeypatch.chdir(tmp_path)
    result, output = invoke("prepare", "--config", "synthetic", "data.clinical=clinical.csv")
    assert result.exit_code == 2
    assert output == "error: data.clinical: clinical.csv is not a file"


def test_train_with_a_bad_override_fails_naming_the_key(no_ray):
    result, output = invoke("train", "--config", "synthetic", "train.epoch=5")
    assert result.exit_code == 2
    assert output == "error: invalid configuration: train.epoch: unknown key (value 5)"


def test_train_without_prepared_shards_fails_before_ray_starts(tmp_path, monkeypatch, no_ray):
    monkeypatch.chdir(tmp_path)
    result, output = invoke("train", "--config", "synthetic", "data.output=prepared")
    assert result.exit_code == 2
    assert output == ("error: no prepared shards at prepared (train.prepared, else data.output): run `jointray "
                      "prepare` with this config first")


def test_evaluate_with_a_missing_checkpoint_fails_before_ray_starts(tmp_path):
    (tmp_path / "cases").mkdir()
    done, elapsed, ray_started = jointray("evaluate", "--checkpoint", "/nope", "--data", "cases", "--out", "out",
                                          cwd=tmp_path)
    output = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 2, output
    assert output == "error: --checkpoint /nope does not exist"
    assert not ray_started and elapsed < FAIL_FAST_S
    assert not (tmp_path / "out").exists()


def test_evaluate_with_a_folder_that_is_no_checkpoint_fails_before_ray_starts(tmp_path, monkeypatch, no_ray):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "cases").mkdir()
    result, output = invoke("evaluate", "--checkpoint", "runs", "--data", "cases", "--out", "out")
    assert result.exit_code == 2
    assert output == ("error: runs: not a complete jointray checkpoint (meta.json and checkpoint.pt needed), "
                      "exported model (artifact.json needed) or ensemble (ensemble.json)")


def test_evaluate_with_missing_data_or_labels_fails_before_ray_starts(tmp_path, monkeypatch, no_ray):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt").mkdir()
    result, output = invoke("evaluate", "--checkpoint", "ckpt", "--data", "cases", "--out", "out")
    assert result.exit_code == 2 and output == "error: --data cases does not exist"
    (tmp_path / "cases").mkdir()
    result, output = invoke("evaluate", "--checkpoint", "ckpt", "--data", "cases", "--labels", "labels", "--out", "out")
    assert result.exit_code == 2 and output == "error: --labels labels is not a folder"


# 4. evaluate --workers

def test_evaluate_refuses_zero_workers_and_documents_the_default(no_ray):
    result, output = invoke("evaluate", "--checkpoint", "ckpt", "--data", "cases", "--out", "out", "--workers", "0")
    assert result.exit_code == 2
    assert "Invalid value for '--workers': Input should be greater than or equal to 1" in output
    result, _ = invoke("evaluate", "--help")
    help_text = " ".join(result.output.replace("│", " ").split())  # the option table's borders and wrapping
    assert ("Ray Data actors, at least 1 (default: one per CPU of the Ray cluster); never more than its CPUs or "
            "the cases") in help_text


def test_the_predict_table_shows_a_calibrated_answer(capsys):
    """A calibrated model's answer (jointray.inference.answers) has a CDR set, an event probability by a horizon
    and, with too few calibration cases for the level, an infinite bound (null in JSON): the table shows them."""
    from jointray.cli import _print_predictions

    body = {"mc": {"interval": 0.9}, "path": "window", "needs_review": False, "review": {"reasons": []},
            "structures": {"anterior": {"volume_mm3": {"mask": 1800.0, "mean": 1810.0, "std": 20.0,
                                                       "interval": [1500.0, None]}}},
            "outcomes": {"mmse": {"mean": 24.0, "std": 1.0, "interval": [18.5, 29.5]},
                         "cdr": {"stage": 0.5, "probabilities": {"0": 0.3, "0.5": 0.7}, "set": ["0", "0.5"]},
                         "risk_by_horizon": {"horizon": 1.92, "probability": 0.31}}}
    _print_predictions([("case", body)])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("1500–∞", "18.50–29.50", "set {0, 0.5}", "event by 1.92: 31%"):
        assert shown in text.replace("│ ", "").replace(" │", ""), shown
