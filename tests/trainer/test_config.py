import pytest

from trainer.config import Config, ConfigError, load_config, resolve_config_path


def test_defaults_file_and_overrides_compose(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 7\n  lr: 0.1\nbank:\n  shards: 3\n")
    config = load_config(
        path,
        [
            "train.lr=0.5",
            "bank.addresses=127.0.0.1:1,127.0.0.1:2",
            "loss.kind=softmax",
            "data.subset=1e3",
            "bank.warm_start=false",
        ],
    )
    assert config.train.epochs == 7 and config.train.lr == 0.5 and config.bank.shards == 3
    assert config.bank.addresses == ["127.0.0.1:1", "127.0.0.1:2"]
    assert config.data.subset == 1000 and config.bank.warm_start is False
    assert Config.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "override, message",
    [
        (["train.epoch=3"], "unknown config key 'train.epoch'"),
        (["nosuch.key=1"], "unknown config key 'nosuch'"),
        (["train.epochs=three"], "train.epochs must be an integer"),
        (["train.epochs=2.5"], "train.epochs must be an integer"),
        (["train.lr=fast"], "train.lr must be a number"),
        (["bank.warm_start=maybe"], "bank.warm_start must be true or false"),
        (["loss.kind=triplet"], "loss.kind must be 'nce', 'infonce' or 'softmax'"),
        (["train.steps=-1"], "train.steps must be >= 0"),
        (["train.steps=many"], "train.steps must be an integer"),
        (["train.refresh_bank_every=-2"], "train.refresh_bank_every must be >= 0"),
        (["eval.source=bankish"], "eval.source must be 'bank' or 'fresh'"),
        (["eval.refresh_bank=true"], "eval.refresh_bank is gone"),
        (["train.overlap=false"], "train.overlap is gone"),
        (["bank.placement=driver"], "bank.placement is gone"),
        (["eval.linear_epochs=0"], "eval.linear_epochs must be >= 1"),
        (["bank.momentum=1.0"], "bank.momentum must be in [0, 1)"),
        (["train.lr"], "is not key=value"),
        (["bank.snapshot_dir=runs/bank"], "bank.snapshot_dir=runs/bank must be absolute"),
        (["bank.snapshot_dir=/data/bank", "bank.addresses=127.0.0.1:1"], "bank.snapshot_dir is for the shard actors"),
        (["data.name=parquet", "data.root=/d", "eval.source=fresh"], "eval.source=fresh holds every train image"),
        (["data.shuffle_buffer=-1"], "data.shuffle_buffer must be >= 0"),
        (["bank.addresses=localhost"], "'localhost' is not host:port"),
        (["bank.addresses=a:1,b:http"], "'b:http' is not host:port"),
        (["train.milestones=[1,"], "override 'train.milestones=[1,': not valid YAML"),
    ],
)
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


def test_malformed_yaml_is_one_line_naming_the_file_and_line(tmp_path, capsys):
    from trainer.cli import main

    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.1\n  epochs: [1\nbank:\n")
    for command in (["train"], ["eval", "knn", "--encoder", str(tmp_path / "e.pt")]):
        assert main([*command, "--config", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"{path} line 4: not valid YAML" in err, err


def test_the_differences_from_the_defaults_are_the_keys_a_run_shows():
    config = load_config(None, ["train.lr=0.1", "bank.addresses=a:1,b:2", "data.download=false", "train.lr=0.06"])
    assert config.differences() == ["data.download=false", "bank.addresses=a:1,b:2"]


def test_infonce_and_a_length_in_steps_are_accepted():
    config = load_config(
        None,
        [
            "loss.kind=infonce",
            "loss.negatives=16384",
            "train.steps=1000",
            "eval.source=fresh",
            "train.refresh_bank_every=2",
            "eval.linear=true",
        ],
    )
    assert (config.loss.kind, config.train.steps, config.eval.source) == ("infonce", 1000, "fresh")


def test_the_defaults_are_a_length_in_steps_and_augmentations_every_image_kind_survives():
    from trainer.schedule import length_given_by

    config = load_config(None)
    assert (config.train.epochs, config.train.steps, config.augment.flip_p, config.loss.kind) == (0, 2000, 0, "infonce")
    assert length_given_by(config.train.epochs, config.train.steps) == "train.steps=2000"
    assert length_given_by(4, 2000) == "train.epochs=4; train.steps=2000 not used"
    with pytest.raises(ConfigError, match="train.epochs or train.steps must be > 0"):
        load_config(None, ["train.steps=0"])


def test_the_run_length_and_its_schedule_in_steps():
    from trainer.schedule import learning_rate, lr_at_step, run_length

    by_epochs = run_length(10000, 128, epochs=3)
    assert (by_epochs.steps_per_epoch, by_epochs.steps, by_epochs.epochs) == (78, 234, 3)
    assert run_length(10000, 128, epochs=3, steps=100) == by_epochs  # train.epochs > 0 wins
    cut = run_length(10000, 128, epochs=0, steps=100)
    assert (cut.epochs, [cut.steps_in_epoch(e) for e in range(cut.epochs)]) == (2, [78, 22])
    assert cut.describe() == "100 steps = 2 epochs of 78 steps, the last one cut to 22 steps"
    # Cosine runs over the steps actually taken: its last step is near zero, not halfway.
    assert lr_at_step(0.1, 99, cut, "cosine") < 1e-4 and lr_at_step(0.1, 0, cut, "cosine") == 0.1
    assert lr_at_step(0.1, 50, cut, "cosine") == pytest.approx(learning_rate(0.1, 0.5, 1.0, "cosine"))
    # Step milestones are epochs: the same optimizer step whichever way the length is given.
    assert lr_at_step(0.1, 77, cut, "step", [1]) == 0.1 and lr_at_step(0.1, 78, cut, "step", [1]) == pytest.approx(0.01)
    assert lr_at_step(0.1, 78, by_epochs, "step", [1]) == lr_at_step(0.1, 78, cut, "step", [1])
    with pytest.raises(ValueError, match="train.batch_size=128 exceeds the 100 training images"):
        run_length(100, 128, epochs=1)
