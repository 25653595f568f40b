"""Airflow on this machine, for `make airflow`, `make demo` and the end-to-end tests.

Starts the four Airflow 3 components as separate processes — api-server, scheduler,
dag-processor, triggerer — with the repository's `airflow.cfg`, everything bound to 127.0.0.1
(`airflow standalone` would also open the scheduler's and triggerer's log servers on all
interfaces; `--skip-serve-logs` avoids them). Stops them by PID.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
COMPONENTS = {
    "api-server": ["api-server"],
    "scheduler": ["scheduler", "--skip-serve-logs"],
    "dag-processor": ["dag-processor"],
    "triggerer": ["triggerer", "--skip-serve-logs"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _secret(home: Path, name: str) -> str:
    """A secret shared by every component of this Airflow home (each component would
    otherwise make up its own, and the task tokens one signs the other refuses)."""
    path = home / f".{name}"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(32))
        path.chmod(0o600)
    return path.read_text()


def airflow_env(home: Path, port: int, voxflow_home: Optional[Path] = None) -> dict[str, str]:
    """The environment every Airflow component (and its task processes) runs with."""
    env = dict(os.environ)
    env.update({
        "AIRFLOW__API_AUTH__JWT_SECRET": _secret(home, "jwt_secret"),
        "AIRFLOW__API__SECRET_KEY": _secret(home, "api_secret_key"),
        "AIRFLOW_HOME": str(home),
        "AIRFLOW_CONFIG": str(REPO / "airflow.cfg"),
        "VOXFLOW_REPO": str(REPO),
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
    })
    if voxflow_home:
        env["VOXFLOW_HOME"] = str(voxflow_home)
    return env


@dataclass
class LocalAirflow:
    home: Path
    port: int
    env: dict[str, str]
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def password(self, user: str = "admin") -> str:
        passwords = json.loads((self.home / "simple_auth_manager_passwords.json.generated")
                               .read_text())
        return passwords[user]

    def token(self, user: str = "admin") -> str:
        body = json.dumps({"username": user, "password": self.password(user)}).encode()
        req = urllib.request.Request(f"{self.url}/auth/token", body,
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())["access_token"]

    def api(self, method: str, path: str, body: Optional[dict] = None,
            token: Optional[str] = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.url}/api/v2{path}", data, method=method,
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {token or self.token()}"})
        with urllib.request.urlopen(req, timeout=60) as r:
            text = r.read()
        return json.loads(text) if text else {}

    def launch(self, name: str) -> None:
        """Start component `name` in a session of its own (one process group to signal),
        its output appended to `logs/<name>.log`."""
        log = open(self.home / "logs" / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen([sys.executable, "-m", "airflow", *COMPONENTS[name]],
                                            env=self.env, stdout=log, stderr=log,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()

    def restart(self, name: str, timeout: float = 180) -> None:
        """SIGKILL component `name` — its whole process group, so a scheduler's running task
        processes die with it, as on a lost machine — start it again with the same
        environment and arguments, and return once it is back: for the scheduler, triggerer
        and dag-processor, the API's health entry healthy with a heartbeat newer than the
        kill (for 30 s the API still calls the dead one's last heartbeat healthy); for the
        api-server, the API answering."""
        proc = self.procs[name]
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        killed = datetime.now(timezone.utc)
        self.launch(name)
        key = name.replace("-", "_")
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/api/v2/monitor/health", timeout=5) as r:
                    entry = json.loads(r.read()).get(key, {})
                if name == "api-server":
                    return
                beat = entry.get(f"latest_{key}_heartbeat")
                if entry.get("status") == "healthy" and beat and \
                        datetime.fromisoformat(beat) > killed:
                    return
            except (urllib.error.URLError, ConnectionError, OSError, ValueError):
                pass
            if self.procs[name].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Airflow's {name} did not come back; see "
                                   f"{self.home}/logs/{name}.log")
            time.sleep(0.5)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:        # whatever is left in the component's group (the API's worker, ...)
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


def start(home: Path, port: Optional[int] = None, voxflow_home: Optional[Path] = None,
          timeout: float = 180) -> LocalAirflow:
    """Migrate the metadata DB, start the components, wait until the API answers."""
    home = Path(home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    env = airflow_env(home, port, voxflow_home)
    airflow = [sys.executable, "-m", "airflow"]
    subprocess.run([*airflow, "db", "migrate"], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    af = LocalAirflow(home, port, env)
    (home / "logs").mkdir(exist_ok=True)
    for name in COMPONENTS:
        af.launch(name)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{af.url}/api/v2/monitor/health", timeout=5) as r:
                health = json.loads(r.read())
            if health.get("scheduler", {}).get("status") == "healthy" and \
                    (home / "simple_auth_manager_passwords.json.generated").exists():
                return af
        except (urllib.error.URLError, ConnectionError, OSError, ValueError):
            pass
        dead = [n for n, p in af.procs.items() if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            af.stop()
            raise RuntimeError(f"Airflow did not start (dead: {dead}); logs in {home}/logs")
        time.sleep(1)


def main() -> None:
    """`make airflow`: start Airflow for interactive use until Ctrl-C."""
    home = REPO / ".airflow"
    port = int(os.environ.get("VOXFLOW_AIRFLOW_PORT", "8080"))
    af = start(home, port)
    print(f"Airflow is up: {af.url}  (user admin, password {af.password()}; "
          f"also in {home}/simple_auth_manager_passwords.json.generated)")
    print("Ctrl-C stops it.")
    try:
        while all(p.poll() is None for p in af.procs.values()):
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        af.stop()


if __name__ == "__main__":
    main()
