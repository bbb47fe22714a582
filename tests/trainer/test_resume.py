"""A checkpoint and its bank snapshot, written together and restored together, on real
shard servers; and the checkpoints a run refuses to resume, naming why."""

import shutil

import numpy as np
import pytest
import torch

from trainer import checkpoint
from trainer.resume import CannotResume, restore, save
from trainer.run_dir import check_resumable, latest_checkpoint

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


def test_before_ray_starts_the_files_tell_what_a_rerun_would_resume(bank, tmp_path):
    storage = tmp_path / "ray"
    assert latest_checkpoint(str(storage), "run") is None  # a new run: nothing to check
    (storage / "run").mkdir(parents=True)
    for epoch in (1, 2):  # Ray Train keeps them as epoch-NNNN folders of the run name
        shutil.move(save(bank, state(epoch=epoch, step=16 * epoch)), storage / "run" / f"epoch-{epoch:04d}")
    found = latest_checkpoint(str(storage), "run")
    assert found == storage / "run" / "epoch-0002"
    assert check_resumable(found, DATASET, str(tmp_path / "bank"), shards=2)["step"] == 32
    with pytest.raises(CannotResume, match="another dataset"):
        check_resumable(found, DATASET | {"sha256": "b" * 64}, str(tmp_path / "bank"), shards=2)
    with pytest.raises(CannotResume, match=r"missing for shard\(s\) 2 of bank.shards=3"):
        check_resumable(found, DATASET, str(tmp_path / "bank"), shards=3)
    (tmp_path / "bank" / "shard-00001" / "epoch-0002-step-32.arrow").unlink()
    with pytest.raises(CannotResume, match=r"'epoch-0002-step-32' is missing for shard\(s\) 1 "):
        check_resumable(found, DATASET, str(tmp_path / "bank"), shards=2)
    assert check_resumable(found, DATASET, None, shards=2)["epoch"] == 2  # snapshots elsewhere: the workers check
