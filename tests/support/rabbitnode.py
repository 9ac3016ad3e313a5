"""A throw-away RabbitMQ node on free loopback ports, for tests that stop, restart or
block the broker. The machine's own node (127.0.0.1:5672) is never touched.

The node has a name of its own (`capytest-<random>@localhost`), its data, logs, Erlang
cookie (HOME) and configuration in a temporary directory, no plugins, and listens on
127.0.0.1 only (AMQP and Erlang distribution). `stop()` and `start()` keep its data, as
a broker restart does; `block_publishers()` sets a memory alarm, as a broker short of
memory or disk does, so RabbitMQ sends `connection.blocked` and stops reading publishes.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tests.support.pgcluster import free_port

RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")


class RabbitNode:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.name = f"capytest-{secrets.token_hex(4)}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        (root / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\nloopback_users = none\n"
        )
        (root / "rabbitmq-env.conf").write_text("")
        (root / "enabled_plugins").write_text("[].\n")
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))},
            "HOME": str(root),  # the Erlang cookie lives here: our own, shared with rabbitmqctl
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(root / "log"),
            "RABBITMQ_PID_FILE": str(root / "pid"),
            "RABBITMQ_CONFIG_FILE": str(root / "rabbitmq.conf"),
            "RABBITMQ_CONF_ENV_FILE": str(root / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(root / "enabled_plugins"),
            "RABBITMQ_PLUGINS_EXPAND_DIR": str(root / "plugins-expand"),
            "RABBITMQ_SERVER_START_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "RABBITMQ_CTL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }
        self.process: subprocess.Popen | None = None

    def url(self, **query: str) -> str:
        extra = "&".join(f"{k}={v}" for k, v in query.items())
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F" + (f"?{extra}" if extra else "")

    def ctl(self, *args: str, timeout: float = 60) -> str:
        done = subprocess.run(
            [str(RABBIT_BIN / "rabbitmqctl"), "-n", self.name, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode != 0:
            raise AssertionError(f"rabbitmqctl {' '.join(args)} failed: {done.stdout}{done.stderr}")
        return done.stdout

    def start(self) -> None:
        with open(self.root / "server.log", "ab") as log:
            self.process = subprocess.Popen(
                [str(RABBIT_BIN / "rabbitmq-server")],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        # await_startup fails at once until the node has registered with epmd.
        deadline = time.monotonic() + 90
        while True:
            try:
                self.ctl("await_startup", "--timeout", "60", timeout=90)
                return
            except AssertionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    log = (self.root / "server.log").read_text(errors="replace")[-3000:]
                    raise AssertionError(f"RabbitMQ node {self.name} did not start:\n{log}") from None
                time.sleep(0.5)

    def stop(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
            self.ctl("stop", timeout=60)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, 9)
            self.process.wait()
        self.process = None

    def block_publishers(self) -> None:
        """A memory alarm: RabbitMQ blocks every connection that publishes."""
        self.ctl("set_vm_memory_high_watermark", "0.000001")

    def unblock_publishers(self) -> None:
        self.ctl("set_vm_memory_high_watermark", "0.4")

    def messages(self, queue: str) -> int:
        """Messages ready in `queue` (0 if it does not exist)."""
        for line in self.ctl(
            "list_queues", "-q", "--no-table-headers", "name", "messages_ready"
        ).splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] == queue:
                return int(parts[1])
        return 0


@contextlib.contextmanager
def temporary_rabbitmq() -> Iterator[RabbitNode]:
    root = Path(tempfile.mkdtemp(prefix="capy-rabbit-"))
    node = RabbitNode(root)
    try:
        node.start()
        yield node
    finally:
        node.stop()
        shutil.rmtree(root, ignore_errors=True)
