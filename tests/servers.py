"""Starting a local web server in a test (TensorBoard, optuna-dashboard) and reading its JSON API."""

import json
import socket
import subprocess
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, data: bytes | None = None):
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def wait_for_json(url: str, server: subprocess.Popen, timeout: float = 60, ready=lambda answer: True):
    """The JSON a server just started answers at `url`, once it answers and `ready(answer)` holds."""
    deadline = time.time() + timeout
    while True:
        try:
            answer = get(url)
            if ready(answer):
                return answer
        except OSError:
            pass
        assert server.poll() is None and time.time() < deadline, f"no answer from {url}"
        time.sleep(0.5)
