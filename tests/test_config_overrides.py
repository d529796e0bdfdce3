"""`section.key=value` overrides: string keys take the text as written, other keys are parsed as YAML."""
import pytest

from opt_ds.config import ConfigError, load_config


def test_string_keys_take_the_text_as_written():
    cfg = load_config(None, ["model.preset=opt-125m", "sample.prompt=Q: What is 1e3?", "train.save_dir=runs/x y",
                             "data.split=98,2,0", "sample.prompt=ROMEO. "]).run
    assert cfg.sample.prompt == "ROMEO. "                       # trailing space kept (YAML would strip it)
    assert cfg.train.save_dir == "runs/x y"
    assert cfg.data.split == "98,2,0"
    cfg = load_config(None, ["model.preset=opt-125m", "sample.prompt=Q: What"]).run
    assert cfg.sample.prompt == "Q: What"                       # YAML would make this a mapping {Q: What}


def test_typed_keys_are_parsed_as_yaml():
    cfg = load_config(None, ["model.preset=opt-125m", "train.steps=7", "optimizer.lr=1e-4", "train.tensorboard=false",
                             "data.train=[{path: corpus, weight: 2}]", "parallel.data=auto"]).run
    assert (cfg.train.steps, cfg.optimizer.lr, cfg.train.tensorboard) == (7, 1e-4, False)
    assert cfg.data.train[0].path == "corpus" and cfg.data.train[0].weight == 2.0


def test_null_clears_an_optional_string():
    cfg = load_config("ds_configs/demo.yaml", ["train.save_dir=null", "sample.prompt=~"]).run
    assert cfg.train.save_dir is None and cfg.sample.prompt is None


def test_bad_values_name_the_key():
    with pytest.raises(ConfigError, match=r"train.steps: expected an integer, got 'ten'"):
        load_config(None, ["model.preset=opt-125m", "train.steps=ten"])
    with pytest.raises(ConfigError, match=r"not valid YAML.*quote it"):
        load_config(None, ["model.preset=opt-125m", "data.train=[{path: a"])
    with pytest.raises(ConfigError, match=r"unknown key 'sample.promt' \(did you mean 'prompt'\?\)"):
        load_config(None, ["model.preset=opt-125m", "sample.promt=x"])
