"""A checkpoint and its bank snapshot, written together and restored together, on real
shard servers; and the checkpoints a run refuses to resume, naming why."""

import shutil

import numpy as np
import pytest
import torch

from bank_server import snapshot as snapshots
from trainer import checkpoint
from trainer.resume import CannotResume, checkpoint_name, restore, save
from trainer.run_dir import bank_for_resume, check_resumable, latest_checkpoint

N, D = 40, 8
DATASET = {"sha256": "a" * 64, "rows": N, "subset_seed": 0}


def state(epoch: int, step: int) -> dict:
    """A worker's state as `Worker.state` gives it (a tiny model stands for the encoder)."""
    model = torch.nn.Linear(2, 2)
    return {
        "model": model.state_dict(),
        "optimizer": {},
        "encoder": {},
        "image_size": 28,
        "epoch": epoch,
        "step": step,
        "epoch_step": 0,
        "history": [{"epoch": epoch}],
        "log_z": 1.5,
        "config": {},
        "git_sha": "",
        "bank_outages": [],
        "dataset": DATASET,
    }


@pytest.fixture
def bank(make_bank, tmp_path):
    bank = make_bank(2, N, D, "float32", snapshot_dir=str(tmp_path / "bank"))
    client = bank.client()
    yield client
    client.close()


def test_a_checkpoint_comes_back_with_the_bank_rows_of_its_step(bank):
    idx = np.arange(N)
    bank.update(idx, np.eye(N, D, dtype=np.float32) + 1, momentum=0.0)
    saved_rows = bank.lookup(idx)
    folder = save(bank, state(epoch=2, step=32))
    stored = checkpoint.load(folder)
    assert (stored["bank_snapshot"], stored["bank_addresses"]) == ("epoch-0002-step-32", bank.addresses)
    bank.update(idx, np.ones((N, D), np.float32), momentum=0.0)  # training went on after the checkpoint
    back = restore(folder, bank, DATASET, "cpu")
    assert (back["epoch"], back["step"], back["log_z"], back["history"]) == (2, 32, 1.5, [{"epoch": 2}])
    np.testing.assert_array_equal(bank.lookup(idx), saved_rows)
    shutil.rmtree(folder)


def test_another_dataset_or_a_lost_snapshot_is_refused_naming_it(bank, tmp_path):
    folder = save(bank, state(epoch=3, step=48))
    other = DATASET | {"sha256": "b" * 64, "subset_seed": 1}
    with pytest.raises(CannotResume, match="another dataset") as refused:
        restore(folder, bank, other, "cpu")
    assert "subset_seed 0" in str(refused.value) and "subset_seed 1" in str(refused.value)
    for path in (tmp_path / "bank").glob("shard-*/epoch-0003-*.arrow"):
        path.unlink()
    with pytest.raises(CannotResume, match="epoch-0003-step-48"):
        restore(folder, bank, DATASET, "cpu")
    shutil.rmtree(folder)


def test_before_ray_starts_the_files_tell_what_a_rerun_would_resume(bank, tmp_path, caplog):
    storage = tmp_path / "ray"
    assert latest_checkpoint(str(storage), "run") is None  # a new run: nothing to check
    (storage / "run").mkdir(parents=True)
    idx = np.arange(N)
    for epoch, step in ((1, 16), (1, 24), (2, 32)):  # Ray Train keeps them in folders named by checkpoint_name
        bank.update(idx, np.eye(N, D, dtype=np.float32) + step, momentum=0.0)
        shutil.move(save(bank, state(epoch, step)), storage / "run" / checkpoint_name(epoch, step))
    saved_rows = bank.lookup(idx)
    bank.update(idx, np.ones((N, D), np.float32), momentum=0.0)  # past the last checkpoint
    found = latest_checkpoint(str(storage), "run")
    assert found == storage / "run" / "epoch-0002-step-00000032"
    assert check_resumable(found, DATASET)["step"] == 32
    with pytest.raises(CannotResume, match="another dataset"):
        check_resumable(found, DATASET | {"sha256": "b" * 64})

    # A resume with another bank.shards: the checkpoint's snapshot, resharded in place.
    folder = tmp_path / "stopped-bank"  # as the shards left it when the run ended
    shutil.copytree(tmp_path / "bank", folder)
    layout = (N, D, "float32")
    with pytest.raises(CannotResume, match="holds 40 rows x 8 float32, this run needs 40 x 16 float32"):
        bank_for_resume(found, str(folder), "epoch-0002-step-32", 3, (N, 16, "float32"))  # another model.dim
    bank_for_resume(found, str(folder), "epoch-0002-step-32", 2, layout)  # the same count: left as it is
    assert sorted(p.name for p in folder.iterdir()) == ["shard-00000", "shard-00001"]
    with caplog.at_level("INFO", logger="trainer.run_dir"):
        bank_for_resume(found, str(folder), "epoch-0002-step-32", 3, layout)
    assert "bank resharded 2 -> 3 shards (40 rows" in caplog.text
    assert sorted(p.name for p in folder.iterdir()) == ["shard-00000", "shard-00001", "shard-00002"]
    (kept,) = tmp_path.glob("stopped-bank.2-shards-*")  # the old layout stays, beside it
    for g in (0, 1, 2, 37, 39):  # global index g on shard g % 3, row g // 3, with the checkpoint's bytes
        rows, _, _ = snapshots.read(folder, g % 3, "epoch-0002-step-32")
        np.testing.assert_array_equal(rows[g // 3], saved_rows[g])
    (kept / "shard-00001" / "epoch-0002-step-32.arrow").unlink()
    with pytest.raises(CannotResume, match="shard-00001"):
        bank_for_resume(found, str(kept), "epoch-0002-step-32", 3, layout)
