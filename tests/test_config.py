from pathlib import Path

import pytest

from jointray.config import Config, ConfigError, load_config
from jointray.data.spec import PreprocessSpec

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["synthetic.yaml", "msd_hippocampus.yaml", "msd_nnunet_augment.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(REPO / "configs" / name)
    assert isinstance(cfg, Config)
    assert cfg.data.label_names == {0: "background", 1: "anterior", 2: "posterior"}


def test_dotted_overrides_parse_yaml_values():
    cfg = load_config(REPO / "configs" / "synthetic.yaml",
                      ["train.epochs=5", "data.root=/tmp/x", "preprocess.target_shape=[32,32,32]",
                       "preprocess.intensity.mode=percentile", "ray.address=null"])
    assert cfg.train.epochs == 5
    assert cfg.data.root == Path("/tmp/x")
    assert cfg.preprocess.target_shape == (32, 32, 32)
    assert cfg.preprocess.intensity.mode == "percentile"
    assert cfg.ray.address is None


def test_unknown_key_names_the_key_and_value():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.epoch=5"])
    assert "train.epoch: unknown key (value 5)" in str(err.value)


def test_bad_value_names_key_value_and_expectation():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.batch_size=zero"])
    message = str(err.value)
    assert "train.batch_size: got 'zero'" in message and "integer" in message
    with pytest.raises(ConfigError) as err:
        load_config(None, ["preprocess.intensity.mode=minmax"])
    assert "preprocess.intensity.mode: got 'minmax'" in str(err.value) and "'zscore' or 'percentile'" in str(err.value)
    with pytest.raises(ConfigError, match="fold=5 must be 'all' or from 0 to n_folds-1=4"):
        load_config(None, ["train.fold=5"])


def test_malformed_override_and_missing_file():
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, ["train.epochs"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/config.yaml")
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config(None, ["train.epochs=3", "train.epochs.x=1"])


def test_spec_digest_tracks_every_parameter():
    spec = PreprocessSpec()
    assert spec.digest() == PreprocessSpec().digest()
    assert spec.digest() != PreprocessSpec(target_shape=(48, 64, 40)).digest()
    assert spec.digest() != PreprocessSpec(intensity={"mode": "percentile"}).digest()


def test_overrides_index_lists_such_as_curriculum_phases():
    cfg = load_config(None, ["train.curriculum.phases.1.seg=0.5", "preprocess.target_shape.2=64"])
    defaults = Config().train.curriculum.phases
    assert cfg.train.curriculum.phases[1].seg == 0.5 and cfg.train.curriculum.phases[1].lr_scale == defaults[1].lr_scale
    assert [p.model_dump() for i, p in enumerate(cfg.train.curriculum.phases) if i != 1] == \
        [p.model_dump() for i, p in enumerate(defaults) if i != 1]
    assert cfg.preprocess.target_shape == (48, 64, 64)
    with pytest.raises(ConfigError, match=r"train.curriculum.phases is a list of 3; index it with 0..2, not '7'"):
        load_config(None, ["train.curriculum.phases.7.seg=1"])
    with pytest.raises(ConfigError, match=r"train.curriculum.phases.1.sag: unknown key"):
        load_config(None, ["train.curriculum.phases.1.sag=1"])
