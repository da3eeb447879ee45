"""wandb never stops a run: with credentials but no server that answers, a run starts as it would offline,
logs to an offline run folder and says in one line how to upload it."""

import os
import socket
import threading

import pytest
from training import column, metrics, train


@pytest.fixture
def silent_server():
    """A port on 127.0.0.1 that accepts connections and never answers."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted, stopping = [], threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stopping.is_set():
            try:
                accepted.append(server.accept()[0])
            except (TimeoutError, OSError):
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}", accepted
    stopping.set()
    thread.join()
    for connection in accepted:
        connection.close()
    server.close()


def closed_port() -> str:
    with socket.create_server(("127.0.0.1", 0)) as probe:  # a port nothing listens on once this closes
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


@pytest.mark.parametrize("server", ["silent", "closed"])
def test_a_run_with_credentials_and_no_reachable_server_logs_offline(server, silent_server, run_dir, tmp_path,
                                                                      monkeypatch):
    url, accepted = silent_server if server == "silent" else (closed_port(), None)
    monkeypatch.delenv("WANDB_MODE")  # as on a cluster node after `wandb login`: online, by the key
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", url)
    result = train(run_dir=tmp_path / "run")
    assert result.returncode == 0, result.stderr[-3000:]
    (folder,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    reason = "within 3 s" if server == "silent" else "Connection refused"
    line = next(line for line in result.stdout.splitlines() if "this run logs offline" in line)
    assert f"wandb: no answer from {url}" in line and reason in line
    assert line.endswith(f"this run logs offline to {folder}: upload it later with `wandb sync {folder}`")
    assert accepted is None or accepted  # the silent server was asked
    # the first step as soon after the command as offline (the session's run), give or take the 3 s wait
    startup = column(metrics(tmp_path / "run"), "time/startup_s")[0][1]
    offline = column(metrics(run_dir), "time/startup_s")[0][1]
    assert startup < offline + 6, (startup, offline)
