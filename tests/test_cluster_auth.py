"""Ray token authentication on a real `ray start` head: the Jobs API refuses a submission without the token.

The dashboard's Jobs API runs arbitrary code (CVE-2023-48022); cluster.yaml and the KubeRay manifests turn on
`RAY_AUTH_MODE=token`. This starts a private head the way cluster.yaml does (token auth, dashboard on 127.0.0.1) and
checks what a client sees, over raw HTTP and through `ray job submit`, as docs/operations.md tells operators to call it.

Isolation from other Ray instances on the machine: free ports for every listener the head opens, its own --temp-dir
(so its address file is not the one a plain `ray.init()` reads), its own HOME (so no one's ~/.ray/auth_token is read
or written), and teardown that signals only the processes this head started. It never runs `ray stop`, which kills
every Ray process on the machine.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")

pytestmark = [
    pytest.mark.ray,
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="teardown reads /proc"),
]

RAY_CLI = str(Path(sys.executable).with_name("ray"))
START_TIMEOUT_S = 180


def _free_ports(count: int) -> list[int]:
    """Ports the kernel hands out, held together so that they are distinct."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _proc_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, start time, command line) for every process we can read."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().decode(errors="replace").rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue
        if fields[0] == "Z":
            continue  # exited, waiting to be reaped
        table[int(entry)] = (int(fields[1]), int(fields[19]), cmdline)
    return table


def _our_processes(root_pid: int | None, marker: str) -> set[tuple[int, int]]:
    """(pid, start time) of the head's processes: descendants of our running `ray start`, plus any process whose
    command line names our private temp dir (Ray passes it to the processes it starts). Nothing else on the machine
    matches either test; the start time guards against a pid reused by someone else's process later."""
    table = _proc_table()
    ours = {pid for pid, (_, _, cmdline) in table.items() if marker in cmdline}
    if root_pid is not None and root_pid in table:
        ours.add(root_pid)
        frontier = [root_pid]
        while frontier:
            parent = frontier.pop()
            children = [pid for pid, (ppid, _, _) in table.items() if ppid == parent and pid not in ours]
            ours.update(children)
            frontier.extend(children)
    ours.discard(os.getpid())
    return {(pid, table[pid][1]) for pid in ours}


def _alive(processes: set[tuple[int, int]]) -> set[tuple[int, int]]:
    table = _proc_table()
    return {(pid, started) for pid, started in processes if pid in table and table[pid][1] == started}


def _signal_all(processes: set[tuple[int, int]], sig: int) -> None:
    for pid, _ in _alive(processes):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _stop_head(proc: subprocess.Popen, marker: str) -> None:
    """SIGTERM to `ray start --block` makes it stop every process of its node; whatever of ours is still alive then
    gets SIGTERM and, after a grace period, SIGKILL."""
    ours = _our_processes(proc.pid if proc.poll() is None else None, marker)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=45)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    ours |= _our_processes(None, marker)
    if _alive(ours):
        _signal_all(ours, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while _alive(ours) and time.monotonic() < deadline:
            time.sleep(0.2)
        _signal_all(ours, signal.SIGKILL)


class Head:
    def __init__(self, url: str, token: str, env: dict[str, str]):
        self.url = url
        self.token = token
        self.env = env  # the head's environment without the token settings, for client subprocesses

    def client_env(self, **extra: str) -> dict[str, str]:
        env = dict(self.env)
        for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
            env.pop(key, None)
        env.update(extra)
        return env


@pytest.fixture(scope="module")
def token_head():
    token = secrets.token_hex(32)
    # Short path: Ray's Unix socket paths live under the temp dir and must stay below ~107 characters.
    temp_dir = tempfile.mkdtemp(prefix="rtok", dir="/tmp")
    home = Path(temp_dir) / "home"
    home.mkdir()
    gcs, dashboard, client, agent_http, agent_grpc, runtime_env_agent, metrics = _free_ports(7)
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # no RAY_ADDRESS, no auth leftovers
    base_env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1",
                    RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")  # SIGTERM: stop at once, no drain wait
    head_env = dict(base_env, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    command = [
        RAY_CLI, "start", "--head", "--block",
        f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env_agent}",
        f"--metrics-export-port={metrics}",
        "--num-cpus=1", "--num-gpus=0", "--object-store-memory=100000000",
        f"--temp-dir={temp_dir}", "--disable-usage-stats",
    ]
    log_path = Path(temp_dir) / "ray-start.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, env=head_env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        ready = False
        while time.monotonic() < deadline and proc.poll() is None:
            try:  # the job agent answers only once the head is fully up
                if httpx.get(f"{url}/api/jobs/", headers={"Authorization": f"Bearer {token}"}, timeout=5).status_code \
                        == 200:
                    ready = True
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        if not ready:
            pytest.fail(f"the token-auth Ray head did not come up in {START_TIMEOUT_S}s "
                        f"(exit code {proc.poll()}):\n{log_path.read_text(errors='replace')[-4000:]}")
        yield Head(url, token, base_env)
    finally:
        _stop_head(proc, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(head: Head, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(f"{head.url}/api/jobs/", json={"entrypoint": "echo token-auth-ok"}, headers=headers, timeout=30)


def test_job_submission_without_token_is_refused(token_head):
    response = _submit(token_head, {})
    assert response.status_code == 401, response.text
    # Reading jobs is refused too (their logs and entrypoints may carry secrets).
    assert httpx.get(f"{token_head.url}/api/jobs/", timeout=10).status_code == 401


def test_job_submission_with_a_wrong_token_is_refused(token_head):
    response = _submit(token_head, {"Authorization": f"Bearer {secrets.token_hex(32)}"})
    assert response.status_code == 403, response.text


def test_job_submission_with_the_token_is_accepted(token_head):
    response = _submit(token_head, {"Authorization": f"Bearer {token_head.token}"})
    assert response.status_code == 200, response.text
    submission_id = response.json()["submission_id"]
    # KubeRay's operator and proxies send the same token in X-Ray-Authorization.
    status = httpx.get(f"{token_head.url}/api/jobs/{submission_id}",
                       headers={"X-Ray-Authorization": f"Bearer {token_head.token}"}, timeout=10)
    assert status.status_code == 200, status.text
    assert status.json()["submission_id"] == submission_id


def test_ray_job_submit_cli_needs_the_token(token_head, tmp_path):
    """The documented client side: `ray job submit` fails without RAY_AUTH_MODE=token and the token, and works with
    RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=<file>."""
    command = [RAY_CLI, "job", "submit", "--address", token_head.url, "--no-wait", "--", "echo", "cli-ok"]
    refused = subprocess.run(command, env=token_head.client_env(RAY_AUTH_MODE="disabled"), capture_output=True,
                             text=True, timeout=120)
    assert refused.returncode != 0
    assert "401" in refused.stdout + refused.stderr or "Authentication" in refused.stdout + refused.stderr

    token_file = tmp_path / "ray-auth-token"
    token_file.write_text(token_head.token)
    token_file.chmod(0o600)
    accepted = subprocess.run(command, env=token_head.client_env(RAY_AUTH_MODE="token",
                                                                 RAY_AUTH_TOKEN_PATH=str(token_file)),
                              capture_output=True, text=True, timeout=120)
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    assert "submitted successfully" in accepted.stdout + accepted.stderr
