"""A Pub/Sub emulator on 127.0.0.1 for the tests: cloudbox's gRPC server.

Google's own emulator ships only with the gcloud SDK, which cannot be installed on these
machines. cloudbox (PyPI) implements the Pub/Sub gRPC API well enough for the real
google-cloud-pubsub client (create, publish, pull, ack, modify_ack_deadline, redelivery,
delivery attempts), but it declares Python >= 3.14: the Makefile installs it with
`--no-deps --ignore-requires-python`, and this launcher imports its modules with
`from __future__ import annotations` prepended (their 3.14-only annotations are then never
evaluated). Its CreateSubscription drops dead-letter policies; voxflow counts delivery
attempts itself and records dead letters in the run ledger, so the queue behaves the same
(docs/architecture.md).

Run as a script (`python pubsub_emulator.py PORT`) it serves until killed; imported by
conftest it provides the session fixture `pubsub`.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass

import pytest


class _FutureAnnotationsLoader(importlib.machinery.SourceFileLoader):
    def get_code(self, fullname):
        source = self.get_data(self.path)
        if b"from __future__ import annotations" not in source:
            source = b"from __future__ import annotations\n" + source
        return compile(source, self.path, "exec", dont_inherit=True)


class _CloudboxFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] != "cloudbox":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec and spec.origin and spec.origin.endswith(".py"):
            spec.loader = _FutureAnnotationsLoader(name, spec.origin)
        return spec


def serve(port: int) -> None:
    import asyncio
    sys.meta_path.insert(0, _CloudboxFinder())
    sys.dont_write_bytecode = True

    async def main():
        from cloudbox.services.pubsub.grpc_server import create_server
        server = await create_server("127.0.0.1", port)
        await server.start()
        print("ready", flush=True)
        await server.wait_for_termination()

    asyncio.run(main())


@dataclass
class PubSubEmulator:
    host: str
    pid: int


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start() -> subprocess.Popen:
    """Start the emulator on a free loopback port (its own process group); returns once it
    serves, with `proc.host` set to HOST:PORT. Stop it with `stop(proc)`."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, __file__, str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                            start_new_session=True, text=True)
    if proc.stdout.readline().strip() != "ready":    # blocks until ready or the process dies
        stop(proc)
        raise RuntimeError(f"the Pub/Sub emulator did not start (exit {proc.poll()})")
    proc.host = f"127.0.0.1:{port}"
    return proc


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@pytest.fixture(scope="session")
def pubsub():
    """cloudbox's Pub/Sub on a free loopback port; PUBSUB_EMULATOR_HOST points at it."""
    proc = start()
    previous = os.environ.get("PUBSUB_EMULATOR_HOST")
    os.environ["PUBSUB_EMULATOR_HOST"] = proc.host
    try:
        yield PubSubEmulator(proc.host, proc.pid)
    finally:
        stop(proc)
        if previous is None:
            os.environ.pop("PUBSUB_EMULATOR_HOST", None)
        else:
            os.environ["PUBSUB_EMULATOR_HOST"] = previous


if __name__ == "__main__":
    serve(int(sys.argv[1]))
