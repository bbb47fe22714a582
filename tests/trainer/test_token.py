"""Where a run reads the bank token: only that travels (to the shards and the workers),
never the token. The end-to-end check that no file of a run holds it is in
test_faults.py, whose runs carry a token."""

from trainer.cli import main
from trainer.config import load_config
from trainer.launch import TOKEN_ENV, token_source


def test_the_token_file_wins_then_the_variable_then_none(tmp_path, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    assert token_source(load_config(None, [f"bank.token_file={tmp_path / 't'}"])) == (str(tmp_path / "t"), None)
    assert token_source(load_config(None, [])) == (None, TOKEN_ENV)
    monkeypatch.setenv(TOKEN_ENV, "  ")  # empty: no token, as before
    assert token_source(load_config(None, [])) == (None, None)
    monkeypatch.delenv(TOKEN_ENV)
    assert token_source(load_config(None, [])) == (None, None)


def test_a_missing_token_file_stops_the_run_before_ray_starts(tmp_path, capsys):
    assert (
        main(
            [
                "train",
                "--output-dir",
                str(tmp_path / "out"),
                "data.subset=2048",
                f"bank.token_file={tmp_path / 'absent'}",
            ]
        )
        == 2
    )
    assert str(tmp_path / "absent") in capsys.readouterr().err
