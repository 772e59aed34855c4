"""Shared fixtures: a fake gateway on loopback and a CLI runner around it.

`cli.run(...)` calls `tokenroute.main(argv, ctx)` in process with captured
streams, a private config dir, a fake clock (tests never sleep) and a
recording browser; `cli.script(...)` runs the installed console script in a
subprocess against the same gateway.

`tls_gateway` is the same gateway serving https with a certificate of the
test CA (tests/tls/, made by tests/make_certs.sh), whose bundle and hashed
directory are `tls_gateway.ca_file` and `.ca_dir` (also `TLS.ca_file`,
`TLS.ca_dir`); `make_tls_gateway("expired")` serves another certificate;
`tls_cli` drives `tls_gateway` with SSL_CERT_FILE and SSL_CERT_DIR naming
that CA.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tokenroute  # noqa: E402
from fake_gateway import TLS_DIR, FakeGateway, server_tls_context  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
POSIX = os.name == "posix"
# For tests whose whole point is a POSIX file mode; elsewhere the mode check is `if POSIX:`.
posix_modes = pytest.mark.skipif(not POSIX, reason="Windows has no POSIX file modes: access is by ACL (README, Windows)")


class Result:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code = code
        self.out = out
        self.err = err

    def json(self) -> Any:
        return json.loads(self.out)

    def error(self) -> dict[str, Any]:
        """The `--json` error object from stderr."""
        return json.loads(self.err)["error"]

    def __repr__(self) -> str:
        return f"Result(code={self.code!r}, out={self.out!r}, err={self.err!r})"


class Clock:
    """A fake clock: `sleep` advances time at once and runs the test's hooks; `wait` is a
    sleep that a lock's release ends early (an MCP cancellation): its hooks run first."""

    def __init__(self) -> None:
        import time

        self.time = time.time()
        self.sleeps: list[float] = []
        self.on_sleep: list[Callable[[], None]] = []
        self.on_wait: list[Callable[[Any, float], None]] = []  # each gets the lock and the seconds

    def now(self) -> float:
        return self.time

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.time += seconds
        for hook in self.on_sleep:
            hook()

    def wait(self, lock: Any, seconds: float) -> None:
        for hook in self.on_wait:
            hook(lock, seconds)
        if lock.acquire(blocking=False):  # released: the wait ends at once
            lock.release()
        else:
            self.sleep(seconds)


class Cli:
    def __init__(self, gateway: FakeGateway, tmp_path: Path) -> None:
        self.gateway = gateway
        self.home = tmp_path / "home"
        self.home.mkdir()
        self.config_dir = self.home / ".tokenroute"
        # USERPROFILE too: on Windows it comes before HOME, and subprocesses inherit the real one.
        self.env: dict[str, str] = {"HOME": str(self.home), "USERPROFILE": str(self.home),
                                    "TOKENROUTE_API_URL": gateway.url}
        self.clock = Clock()
        self.opened: list[str] = []

    @property
    def credentials(self) -> Path:
        return self.config_dir / "credentials.json"

    @property
    def last_key(self) -> Path:
        return self.config_dir / "last_key.txt"

    def run(
        self, *argv: str, env: dict[str, str] | None = None, tty: bool = False, stdin: bytes | BinaryIO | None = None
    ) -> Result:
        """Run `tokenroute ARGV` in process; `tty=True` plays a person at a terminal; `stdin`: its input
        (bytes, or a binary file such as a pipe's end), if any."""
        out, err = io.StringIO(), io.StringIO()
        ctx = tokenroute.Context(
            env={**self.env, **(env or {})},
            stdout=out,
            stderr=err,
            stdin_tty=tty,
            stdout_tty=tty,
            stderr_tty=tty,
            sleep=self.clock.sleep,
            now=self.clock.now,
            wait=self.clock.wait,
            open_browser=self.record_browser,
            stdin=io.BytesIO(stdin) if isinstance(stdin, bytes) else stdin,
        )
        execs = {name: getattr(os, name) for name in ("execv", "execve", "execvp", "execvpe") if hasattr(os, name)}
        for name in execs:  # an exec here would replace pytest, and the suite would end with status 0
            setattr(os, name, refuse_exec)
        try:
            code = tokenroute.main(list(argv), ctx)
        finally:
            for name, function in execs.items():
                setattr(os, name, function)
        return Result(code, out.getvalue(), err.getvalue())

    def record_browser(self, url: str) -> bool:
        self.opened.append(url)
        return True

    def login(self, *, expires_in: int | None = None) -> dict[str, Any]:
        """Store a login as `tokenroute login` would, without the device flow."""
        tokens = self.gateway.issue_tokens(expires_in=expires_in)
        creds = {
            "api_url": self.gateway.url,
            "access_token": tokens["access_token"],
            "refresh_token": tokens["refresh_token"],
            "expires_at": self.clock.now() + tokens["expires_in"],
            "token_endpoint": self.gateway.url + "/oidc/token",
            "client_id": "tokenroute-cli",
            "resource": self.gateway.resource,
        }
        self.write_login(creds)
        return creds

    def write_login(self, creds: dict[str, Any]) -> None:
        """Store `creds` as the gateway's login in credentials.json, as tokenroute writes it."""
        self.config_dir.mkdir(mode=0o700, exist_ok=True)
        self.credentials.write_text(json.dumps({"version": 2, "logins": {self.gateway.url: creds}}, indent=2))
        self.credentials.chmod(0o600)

    def stored_login(self) -> dict[str, Any]:
        """The gateway's login as credentials.json holds it."""
        return json.loads(self.credentials.read_text())["logins"][self.gateway.url]

    @property
    def keys_file(self) -> Path:
        return self.config_dir / "keys.txt"

    def cache_key(self, key: str, key_id: str = "-") -> None:
        """Cache `key` for the gateway as `keys create` does: listed in keys.txt, raw in last_key.txt."""
        self.config_dir.mkdir(mode=0o700, exist_ok=True)
        self.last_key.write_text(key)
        self.keys_file.write_text(f"{tokenroute.KEYS_HEADER}\n{self.gateway.url} {key} {key_id}\n")
        for path in (self.last_key, self.keys_file):
            path.chmod(0o600)

    def cached_key(self) -> str | None:
        """The key keys.txt lists for the gateway, None when it lists none."""
        if not self.keys_file.exists():
            return None
        lines = [line.split() for line in self.keys_file.read_text().splitlines()[1:]]
        return next((words[1] for words in lines if words[0] == self.gateway.url), None)

    def script(self, *argv: str, env: dict[str, str] | None = None, timeout: float = 60) -> Result:
        """Run the installed console script in a subprocess."""
        completed = subprocess.run(
            [console_script(), *argv],
            env=self.process_env(env),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        return Result(completed.returncode, completed.stdout, completed.stderr)

    def process_env(self, env: dict[str, str] | None = None) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("TOKENROUTE_")}
        return {**base, **self.env, **(env or {})}


def refuse_exec(program: object, *args: object) -> None:
    import signal

    for name in ("SIGPIPE", "SIGXFSZ"):  # `run` set them to their defaults for the exec: Python ignores them
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    raise AssertionError(f"an in-process test would exec {program!r} and end pytest: run `run` with cli.script")


def console_script() -> str:
    """The `tokenroute` script installed next to this interpreter (pip install .).

    It must run this tree's code: a stale install would test yesterday's CLI.
    """
    bindir = Path(sys.executable).parent
    found = next((str(bindir / n) for n in ("tokenroute", "tokenroute.exe") if (bindir / n).exists()), None)
    installed = Path(sysconfig.get_paths()["purelib"]) / "tokenroute.py"
    if found is None or not installed.exists():
        pytest.fail("the tokenroute console script is not installed: run `pip install .` first (see README)")
    if installed.read_bytes() != (REPO / "tokenroute.py").read_bytes():
        pytest.fail(f"{installed} differs from this tree's tokenroute.py: run `pip install .` again")
    return found


def serving(gw: FakeGateway) -> Iterator[FakeGateway]:
    gw.start()
    try:
        yield gw
    finally:
        gw.stop()


@pytest.fixture
def gateway() -> Iterator[FakeGateway]:
    yield from serving(FakeGateway())


@pytest.fixture
def staging() -> Iterator[FakeGateway]:
    """A second gateway, beside `gateway` (a login per gateway)."""
    yield from serving(FakeGateway())


@pytest.fixture
def cli(gateway: FakeGateway, tmp_path: Path) -> Cli:
    return Cli(gateway, tmp_path)


@pytest.fixture
def api_key(gateway: FakeGateway) -> str:
    """A raw key with $5.00 of credit."""
    return gateway.add_key(name="seed", balance_usd="5.00")["raw"]


class TLS:
    """The committed test certificates (tests/tls/, regenerated by tests/make_certs.sh)."""

    ca_file = str(TLS_DIR / "ca.pem")  # the CA that issued every server certificate
    ca_dir = str(TLS_DIR / "capath")  # the same CA in a hashed directory (`openssl rehash`)
    other_ca_file = str(TLS_DIR / "other-ca.pem")  # an unrelated CA
    other_ca_dir = str(TLS_DIR / "other-capath")
    trusted = {"SSL_CERT_FILE": ca_file, "SSL_CERT_DIR": ca_dir}  # env of a machine that trusts the test CA


@pytest.fixture
def make_tls_gateway() -> Any:
    """Start fake gateways serving https with tests/tls/<certificate>.pem ("localhost",
    "other-host" or "expired"); all are stopped after the test."""
    started: list[FakeGateway] = []

    def make(certificate: str = "localhost") -> FakeGateway:
        started.append(FakeGateway(tls=server_tls_context(certificate)).start())
        return started[-1]

    try:
        yield make
    finally:
        for gw in started:
            gw.stop()


@pytest.fixture
def tls_gateway(make_tls_gateway: Callable[..., FakeGateway]) -> FakeGateway:
    return make_tls_gateway()


@pytest.fixture
def tls_cli(tls_gateway: FakeGateway, tmp_path: Path) -> Cli:
    """A Cli against `tls_gateway` on a machine whose CA file and directory hold the test CA."""
    cli = Cli(tls_gateway, tmp_path)
    cli.env.update(TLS.trusted)
    return cli
