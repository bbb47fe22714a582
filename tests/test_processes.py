"""The tests' helper that starts child processes: it reads their lines, honours its
timeouts even when a child hangs in silence, and fails with the child's stderr."""

import time

import pytest

from tests.processes import ChildFailed, ChildProcess, ServerProcess


def python(code: str) -> list[str]:
    return ["-c", code]


LISTENS_THEN_HANGS = (
    "import sys, time; print('listening on 127.0.0.1:1234', flush=True); "
    "print('still loading', file=sys.stderr, flush=True); time.sleep(120)"
)


def test_a_server_says_where_it_listens_and_when_it_serves(spawn_server):
    server = spawn_server("--shard-id", "0", "--num-shards", "1", "--rows", "100", "--dim", "4", "--port", "0")
    assert server.address.startswith("127.0.0.1:")
    server.wait_serving(60)
    server.wait_serving(0)  # already serving: no second wait
    assert any("SERVING" in line for line in server.lines)
    assert server.stop() == -9 and server.proc.poll() == -9


def test_waiting_to_serve_gives_up_at_its_timeout_with_the_stderr():
    with ServerProcess(python(LISTENS_THEN_HANGS)) as server:
        assert server.address == "127.0.0.1:1234"
        start = time.monotonic()
        with pytest.raises(ChildFailed, match=r"(?s)no .*SERVING.* within 1 s.*still loading"):
            server.wait_serving(1)
        assert time.monotonic() - start < 10
        assert server.proc.poll() is not None  # killed, not left behind


def test_a_silent_child_cannot_block_the_start_past_its_timeout(tmp_path):
    start = time.monotonic()
    with pytest.raises(ChildFailed, match=r"(?s)within 1 s.*about to hang"):
        ServerProcess(
            python("import sys, time; print('about to hang', file=sys.stderr, flush=True); time.sleep(120)"),
            stderr=tmp_path / "err.log",
            timeout=1,
        )
    assert time.monotonic() - start < 10


def test_a_child_that_exits_before_listening_fails_with_its_status_and_stderr():
    with pytest.raises(ChildFailed, match=r"(?s)ended its output.*exit status 3.*no such layout"):
        ServerProcess(python("import sys; print('no such layout', file=sys.stderr); sys.exit(3)"))


def test_lines_go_both_ways():
    echo = "import sys; print('ready', flush=True); print('got ' + sys.stdin.readline().strip(), flush=True)"
    with ChildProcess(python(echo), stdin=True) as child:
        child.expect("^ready$", 60)
        child.send("go")
        assert child.expect(r"^got (\w+)$", 60).group(1) == "go"
        assert child.proc.wait(60) == 0
    assert child.lines == ["ready\n", "got go\n"]
