"""`bank_server.reshard` and `instdisc bank reshard` on real logged banks: shards that
took updates, snapshotted, and took more. Every row must keep its bytes by global index,
the source must not change, and a refusal must leave no DEST."""

import shutil
import struct

import numpy as np
import pytest

from bank_server import recovery, reshard, update_log
from bank_server import snapshot as snapshots
from bank_server.client import BankClient
from bank_server.errors import DataLoss, FailedPrecondition, InvalidArgument, NotFound
from bank_server.shard import Layout, Shard
from tests.processes import ServerProcess
from trainer.cli import main

N, D, DTYPE = 301, 8, "float16"


def build(directory, shards, dim=D, seed=0):
    """A logged bank: updates, snapshot epoch-1, updates, snapshot epoch-2, updates, and
    a torn last record in the newest segment of the last shard."""
    rng = np.random.default_rng(seed)
    for sid in range(shards):
        shard, _ = recovery.open_logged(Layout(sid, shards, N, dim, DTYPE), directory, seed=0, fsync="no")
        mine = np.arange(sid, N, shards)
        sequence = 0
        for tag in ("epoch-1", "epoch-2", None):
            for _ in range(4):
                sequence += 1
                idx = rng.choice(mine, 6, replace=False)
                shard.momentum_update(idx, rng.standard_normal((6, dim)).astype(np.float32), 0.5, "t", sequence)
            if tag:
                shard.snapshot(directory, tag)
        newest = shard.log.path
        shard.log.close()
    with open(newest, "ab") as fh:  # a frame that runs past the end: a crash mid-write
        fh.write(struct.pack("<II", 500, 0) + b"\x07" * 20)
    return directory


def recovered(directory, shards, tmp_path, tag=None):
    """The bank by global index as recovery (or a Restore of `tag`) loads it, from a copy."""
    copy = tmp_path / "recovered-copy"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(directory, copy)
    bank = np.empty((N, D), np.float16)
    for sid in range(shards):
        layout = Layout(sid, shards, N, D, DTYPE)
        shard = Shard.restore(layout, copy, tag) if tag else recovery.recover(layout, copy, seed=0)[0]
        bank[sid::shards] = shard.lookup(np.arange(sid, N, shards))
    return bank


def stored(directory, shards, tag):
    bank = np.empty((N, D), np.float16)
    for sid in range(shards):
        assert snapshots.read_latest(directory, sid) == {"tag": tag, "log": None, "from": 0, "seed": None}
        rows, metadata, _ = snapshots.read(directory, sid)
        bank[sid::shards] = rows
    return bank, metadata


def files(directory):
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return build(tmp_path_factory.mktemp("source") / "bank", 2)


def test_two_shards_to_three_to_one_keep_every_row_by_global_index_and_leave_the_source_alone(source, tmp_path):
    before = files(source)
    expected = recovered(source, 2, tmp_path)
    assert reshard.source_layout(source) == (2, N, D, DTYPE)

    done = reshard.reshard(source, tmp_path / "three", 3)
    assert (done.source_shards, done.shards, done.rows, done.tag) == (2, 3, N, "resharded")
    assert "torn last record" in done.states[1]
    three, metadata = stored(tmp_path / "three", 3, "resharded")
    assert three.tobytes() == expected.tobytes()
    assert metadata["resharded_from"]["shards"] == 2 and metadata["seen"] == [] and metadata["log_segment"] is None
    assert files(source) == before

    reshard.reshard(tmp_path / "three", tmp_path / "one", 1)
    assert stored(tmp_path / "one", 1, "resharded")[0].tobytes() == expected.tobytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "recovered-copy", "three"]  # no scratch, no temporary


def test_a_tag_gives_that_snapshots_state_and_keeps_its_name(source, tmp_path):
    reshard.reshard(source, tmp_path / "three", 3, tag="epoch-1")
    rows, metadata = stored(tmp_path / "three", 3, "epoch-1")
    assert rows.tobytes() == recovered(source, 2, tmp_path, tag="epoch-1").tobytes()
    assert rows.tobytes() != recovered(source, 2, tmp_path).tobytes()
    assert metadata["tag"] == "epoch-1" and metadata["resharded_from"]["tag"] == "epoch-1"


def test_the_new_bank_serves_its_rows_by_global_index(source, tmp_path):
    dest = reshard.reshard(source, tmp_path / "three", 3).dest
    expected = recovered(source, 2, tmp_path)
    servers = []
    try:
        for sid in range(3):
            args = ["-m", "bank_server", "--shard-id", sid, "--num-shards", 3, "--rows", N, "--dim", D, "--port", 0]
            args += ["--snapshot-dir", dest]
            servers.append(ServerProcess([*map(str, args)], stderr=tmp_path / f"{sid}.log"))
        for server in servers:
            server.wait_serving(60)
        client = BankClient([s.address for s in servers])
        try:
            indices = np.array([0, 1, 2, 5, 150, 299, 300])
            np.testing.assert_array_equal(client.lookup(indices), expected[indices])
        finally:
            client.close()
    finally:
        for server in servers:
            server.stop()


def test_refusals_name_what_is_wrong_and_leave_no_dest(source, tmp_path):
    def refused(kind, match, src=source, shards=3, **kw):
        with pytest.raises(kind, match=match):
            reshard.reshard(src, tmp_path / "dest", shards, **kw)
        assert not [p for p in tmp_path.iterdir() if p.name.startswith((".dest", "dest"))]

    refused(InvalidArgument, "got 0", shards=0)
    refused(InvalidArgument, r"\[1, 301\]", shards=N + 1)
    refused(NotFound, "not a folder", src=tmp_path / "nothing")
    refused(NotFound, "epoch-9", tag="epoch-9")

    copy = shutil.copytree(source, tmp_path / "copy")
    (copy / "shard-00001" / "epoch-1.arrow").unlink()
    refused(NotFound, "shard 1 .*epoch-1", src=copy, tag="epoch-1")
    shutil.rmtree(copy / "shard-00001")
    refused(NotFound, "lacks shard-00001", src=copy)

    other = build(tmp_path / "other", 2, dim=4)
    shutil.copytree(other / "shard-00001", copy / "shard-00001")
    refused(FailedPrecondition, r"shard-00001.*dim: 4 vs 8", src=copy)

    bad = shutil.copytree(source, tmp_path / "bad")
    segment = update_log.segment_path(bad / "shard-00000", update_log.segment_numbers(bad / "shard-00000")[-1])
    data = bytearray(segment.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside a whole record, with records after it
    segment.write_bytes(bytes(data))
    refused(DataLoss, f"{segment}.*bad record", src=bad)

    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "keep").write_text("mine")
    with pytest.raises(FailedPrecondition, match="exists"):
        reshard.reshard(source, tmp_path / "dest", 3)
    assert (tmp_path / "dest" / "keep").read_text() == "mine"


def test_the_command_prints_one_line_and_refuses_with_status_2(source, tmp_path, capsys):
    assert main(["bank", "reshard", str(source), str(tmp_path / "dest"), "--shards", "3"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(f"resharded {source} (2 shards) -> ")
    assert "(3 shards): 301 rows x 8 float16 in " in out[0]

    assert main(["bank", "reshard", str(source), str(tmp_path / "dest"), "--shards", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exists" in err[0]
