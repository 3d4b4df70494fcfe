"""A throwaway PostgreSQL server for tests: initdb into a temporary directory, trust authentication,
listening on 127.0.0.1 on a free port, stopped and deleted afterwards.

PostgreSQL refuses to run as root: as root, the server runs as the `postgres` system user (the one
Debian's package creates) and owns its directory. Without server binaries the tests that need one
skip, unless FASTCPU_REQUIRE_POSTGRES=1 (CI), where they fail.
"""

from __future__ import annotations

import os
import pwd
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from glob import glob
from pathlib import Path

import pytest

DATABASES = ("optuna", "mlflow")
SUPERUSER = "postgres"  # the server's superuser role, whoever runs it
RUN_AS = "postgres"  # the system user that runs the server when the tests run as root
REQUIRE_ENV = "FASTCPU_REQUIRE_POSTGRES"


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server can be started here."""


def find_bin_dir() -> Path:
    """The folder of initdb and pg_ctl: PATH first, else the newest /usr/lib/postgresql/*/bin."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(on_path).resolve().parent
    candidates = [Path(d) for d in glob("/usr/lib/postgresql/*/bin") if (Path(d) / "initdb").is_file()]
    if not candidates:
        raise PostgresUnavailable(
            "no PostgreSQL server binaries (initdb, pg_ctl) on PATH or in /usr/lib/postgresql/*/bin; "
            "install them with: apt-get install -y postgresql"
        )
    return max(candidates, key=lambda d: [int(n) for n in re.findall(r"\d+", d.parent.name)] or [0])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_server_user(command: list[str]) -> list[str]:
    """`command` as the user that may run PostgreSQL: ourselves, or RUN_AS when we are root."""
    if os.geteuid() != 0:
        return command
    if shutil.which("runuser"):
        return ["runuser", "-u", RUN_AS, "--", *command]
    return ["su", RUN_AS, "-s", "/bin/sh", "-c", shlex.join(command)]


def _run(command: list[str], what: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise PostgresUnavailable(f"{what} failed ({done.returncode}): {shlex.join(command)}\n{done.stderr}")


class PostgresServer:
    """start(): a server with DATABASES; url: `postgresql+psycopg://postgres@127.0.0.1:PORT` (append
    `/optuna` or `/mlflow`); stop(): the server stopped and its files deleted."""

    def __init__(self) -> None:
        self.root: Path | None = None
        self.pg_ctl: list[str] = []
        self.running = False
        self.url = ""

    def start(self) -> str:
        bin_dir = find_bin_dir()
        self.root = root = Path(tempfile.mkdtemp(prefix="fastcpu-pg-"))
        data, log = root / "data", root / "server.log"
        try:
            if os.geteuid() == 0:
                try:
                    user = pwd.getpwnam(RUN_AS)
                except KeyError:
                    raise PostgresUnavailable(
                        f"running as root, which PostgreSQL refuses, and no {RUN_AS!r} system user to run as"
                    ) from None
                os.chown(root, user.pw_uid, user.pw_gid)
            initdb = [str(bin_dir / "initdb"), "-D", str(data), "-U", SUPERUSER, "--auth=trust"]
            _run(_as_server_user([*initdb, "--no-locale", "-E", "UTF8", "--no-sync"]), "initdb")
            port = free_port()
            # fsync off: a test server's data is thrown away anyway
            options = f"-k {root} -p {port} -c listen_addresses=127.0.0.1 -c fsync=off"
            self.pg_ctl = [str(bin_dir / "pg_ctl"), "-D", str(data)]
            start = [*self.pg_ctl, "-l", str(log), "-w", "-t", "60", "-o", options, "start"]
            try:
                _run(_as_server_user(start), "pg_ctl start")
            except PostgresUnavailable as error:
                server_log = log.read_text() if log.exists() else ""
                raise PostgresUnavailable(f"{error}\nserver log:\n{server_log}") from None
            self.running = True
            for name in DATABASES:
                createdb = [str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", SUPERUSER]
                _run([*createdb, name], f"createdb {name}")
        except BaseException:
            self.stop()
            raise
        self.url = f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{port}"
        return self.url

    def stop(self) -> None:
        if self.running:
            stop = _as_server_user([*self.pg_ctl, "-m", "fast", "-w", "stop"])
            subprocess.run(stop, capture_output=True, timeout=120)
            self.running = False
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None


def postgres_or_skip() -> Iterator[str]:
    """A started PostgresServer's URL for a session fixture, stopped at teardown. No server here:
    the test skips, printing why; under FASTCPU_REQUIRE_POSTGRES=1 (CI) it fails instead."""
    server = PostgresServer()
    try:
        url = server.start()
    except PostgresUnavailable as error:
        reason = f"PostgreSQL test server unavailable: {error}"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{reason}\n({REQUIRE_ENV}=1: this must not skip)", pytrace=False)
        print(f"\nSKIP: {reason}", file=sys.stderr)
        pytest.skip(reason)
    try:
        yield url
    finally:
        server.stop()
