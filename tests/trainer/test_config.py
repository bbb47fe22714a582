import pytest

from trainer.config import Config, ConfigError, load_config, resolve_config_path


def test_defaults_file_and_overrides_compose(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 7\n  lr: 0.1\nbank:\n  shards: 3\n")
    config = load_config(path, ["train.lr=0.5", "bank.addresses=127.0.0.1:1,127.0.0.1:2", "loss.kind=softmax",
                                "data.subset=1e3", "train.overlap=false"])
    assert config.train.epochs == 7 and config.train.lr == 0.5 and config.bank.shards == 3
    assert config.bank.addresses == ["127.0.0.1:1", "127.0.0.1:2"]
    assert config.data.subset == 1000 and config.train.overlap is False
    assert Config.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("override, message", [
    (["train.epoch=3"], "unknown config key 'train.epoch'"),
    (["nosuch.key=1"], "unknown config key 'nosuch'"),
    (["train.epochs=three"], "train.epochs must be an integer"),
    (["train.epochs=2.5"], "train.epochs must be an integer"),
    (["train.lr=fast"], "train.lr must be a number"),
    (["train.overlap=maybe"], "train.overlap must be true or false"),
    (["loss.kind=triplet"], "loss.kind must be 'nce' or 'softmax'"),
    (["bank.momentum=1.0"], "bank.momentum must be in [0, 1)"),
    (["train.lr"], "is not key=value"),
])
def test_bad_keys_and_types_are_named(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_config(None, override)


def test_a_section_must_be_a_mapping(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: 3\n")
    with pytest.raises(ConfigError, match="train must be a mapping"):
        load_config(path)


def test_shipped_configs_load():
    for name in ("fashion-mnist", "cifar10", "imagenet"):
        load_config(resolve_config_path(name))
    with pytest.raises(ConfigError, match="not a shipped config"):
        resolve_config_path("no-such-config")


def test_a_bad_config_path_exits_2_like_every_config_error(capsys):
    from trainer.cli import main

    assert main(["train", "--config", "no-such-config"]) == 2
    assert "not a shipped config" in capsys.readouterr().err
