"""Windows (issue 12): where Windows differs, tested here with the Windows facts
the code depends on (a cp1252 console that writes CRLF, USERPROFILE, no file
modes, msvcrt's byte-range lock), and for real on the windows CI runners."""
from __future__ import annotations

import errno
import io
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

import tokenroute
from conftest import Cli, console_script
from fake_gateway import FakeGateway

POWERSHELL = shutil.which("pwsh") or shutil.which("powershell")


# ---------------------------------------------------------------- console


def test_output_on_a_windows_console_ends_lines_with_lf_and_never_raises() -> None:
    raw = io.BytesIO()
    console = io.TextIOWrapper(raw, encoding="cp1252", newline="\r\n")  # what Windows gives a redirected stdout

    tokenroute.prepare_output_stream(console)
    console.write("OPENAI_API_KEY=sk-tr-abc\ndisplay_name: Zo\u00eb \u2713 \u65e5\n")
    console.flush()

    assert raw.getvalue() == b"OPENAI_API_KEY=sk-tr-abc\ndisplay_name: Zo\xeb ? ?\n"


def test_console_script_output_has_no_cr(cli: Cli, api_key: str) -> None:
    done = subprocess.run([console_script(), "env", "--key", api_key], env=cli.process_env(),
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=60)

    assert (done.returncode, done.stderr) == (0, b"")
    assert done.stdout == ("OPENAI_API_KEY=%s\nOPENAI_BASE_URL=%s/v1\n" % (api_key, cli.gateway.url)).encode()


class PipeWhoseReaderLeft(io.StringIO):
    """What a write into a pipe whose reader has left raises on Windows (cpython#79935)."""

    def write(self, text: str) -> int:
        raise OSError(errno.EINVAL, "Invalid argument")


def test_einval_on_windows_means_the_reader_left() -> None:
    einval = OSError(errno.EINVAL, "Invalid argument")

    assert tokenroute.reader_left(einval, windows=True)
    assert not tokenroute.reader_left(einval, windows=False)  # elsewhere EINVAL is a real failure
    assert tokenroute.reader_left(BrokenPipeError(errno.EPIPE, "Broken pipe"), windows=False)
    assert not tokenroute.reader_left(OSError(errno.EBADF, "the stream is closed"), windows=True)


def test_keys_list_into_a_pipe_whose_reader_left_ends_quietly_on_windows(cli: Cli, gateway: FakeGateway) -> None:
    cli.login()
    gateway.add_key(name="ci")
    err = io.StringIO()
    ctx = tokenroute.Context(env=cli.env, stdout=PipeWhoseReaderLeft(), stderr=err, now=cli.clock.now)

    code = tokenroute.main(["keys", "list"], ctx)

    if os.name == "nt":  # `tokenroute keys list | head -1`
        assert (code, err.getvalue()) == (0, "")
    else:
        assert (code, err.getvalue()) == (1, "error: cannot write the output: Invalid argument\n")


@pytest.mark.skipif(os.name != "nt", reason="PATHEXT (a command found as NAME.cmd, as npm is) is Windows'")
def test_run_finds_a_cmd_file_through_pathext(cli: Cli, gateway: FakeGateway, api_key: str, tmp_path: Path) -> None:
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "hello-tr.cmd").write_bytes(b"@echo off\r\necho %OPENAI_BASE_URL%\r\nexit /b 7\r\n")
    env = cli.process_env({"TOKENROUTE_API_KEY": api_key, "PATH": str(folder) + os.pathsep + os.environ["PATH"]})

    done = subprocess.run([console_script(), "run", "--", "hello-tr"], env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=60)

    assert (done.returncode, done.stdout.strip(), done.stderr) == (7, gateway.url + "/v1", "")


@pytest.mark.skipif(POWERSHELL is None, reason="PowerShell is not installed")
def test_powershell_env_output_sets_the_variables_in_powershell(cli: Cli, gateway: FakeGateway,
                                                                api_key: str) -> None:
    program = "& $env:TR env --shell powershell | Invoke-Expression; $env:OPENAI_API_KEY; $env:OPENAI_BASE_URL"
    env = cli.process_env({"TOKENROUTE_API_KEY": api_key, "TR": console_script()})
    env.pop("OPENAI_API_KEY", None)

    done = subprocess.run([POWERSHELL, "-NoProfile", "-NonInteractive", "-Command", program], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)

    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == "%s\n%s/v1\n" % (api_key, gateway.url)


# ---------------------------------------------------------------- the config folder


def test_home_is_userprofile_first_on_windows() -> None:
    env = {"HOME": "/c/Users/ada", "USERPROFILE": r"C:\Users\ada"}

    assert tokenroute.home_folder(env, windows=True) == r"C:\Users\ada"
    assert tokenroute.home_folder({"HOME": r"C:\Users\ada"}, windows=True) == r"C:\Users\ada"
    assert tokenroute.home_folder({}, windows=True) is None


def test_home_is_home_first_elsewhere() -> None:
    assert tokenroute.home_folder({"HOME": "/home/ada", "USERPROFILE": "/x"}, windows=False) == "/home/ada"
    assert tokenroute.home_folder({"HOME": "", "USERPROFILE": "/x"}, windows=False) == "/x"


# ---------------------------------------------------------------- files


def test_files_we_write_end_lines_with_lf(cli: Cli, gateway: FakeGateway) -> None:
    cli.login(expires_in=0)  # balance refreshes, rewriting credentials.json
    assert cli.run("balance").code == 0
    assert cli.run("keys", "create", "--name", "ci").code == 0
    assert cli.run("login", "--no-wait", "--force").code == 0

    written = {p.name: p.read_bytes() for p in cli.config_dir.iterdir() if p.suffix in (".json", ".txt")}

    assert sorted(written) == ["credentials.json", "keys.txt", "last_key.txt", "pending_login.json"]
    assert b"\r" not in written.pop("last_key.txt")  # the raw key alone, as 0.1.0 wrote it
    assert all(b"\r" not in content and content.endswith(b"\n") for content in written.values()), written
    assert json.loads(written["credentials.json"])["logins"][gateway.url]["api_url"] == gateway.url


def test_doctor_on_windows_does_not_claim_posix_modes() -> None:
    check = tokenroute.file_access_check(r"C:\Users\ada\.tokenroute\credentials.json", 0o666, is_dir=False,
                                         posix=False)

    assert (check.status, check.fix) == ("ok", None)
    assert check.detail == r"C:\Users\ada\.tokenroute\credentials.json (access follows the folder's Windows ACL)"


def test_doctor_on_posix_gives_a_chmod_fix() -> None:
    check = tokenroute.file_access_check("/home/ada/.tokenroute", 0o755, is_dir=True, posix=True)

    assert (check.status, check.fix) == ("problem", "chmod 700 /home/ada/.tokenroute")


def test_doctor_reports_the_files_the_way_of_this_platform(cli: Cli) -> None:
    cli.login()

    result = cli.run("doctor", "--json")

    [files] = [c for c in result.json()["checks"] if c["name"] == "files" and "credentials.json" in c["detail"]]
    expected = "(600, private)" if os.name == "posix" else "(access follows the folder's Windows ACL)"
    assert (files["status"], files["detail"]) == ("ok", f"{cli.credentials} {expected}")


# ---------------------------------------------------------------- the refresh lock


class MsvcrtStandIn(types.ModuleType):
    """msvcrt.locking's contract on Windows (LK_NBLCK: take the lock or raise
    PermissionError at once), kept with flock so two opens of one file conflict."""

    LK_NBLCK = 2

    def __init__(self, fcntl: types.ModuleType) -> None:
        super().__init__("msvcrt")
        self.fcntl = fcntl
        self.calls: list[int] = []

    def locking(self, fd: int, mode: int, nbytes: int) -> None:
        assert (mode, nbytes, os.lseek(fd, 0, os.SEEK_CUR)) == (self.LK_NBLCK, 1, 0)
        self.calls.append(fd)
        try:
            self.fcntl.flock(fd, self.fcntl.LOCK_EX | self.fcntl.LOCK_NB)
        except BlockingIOError:
            raise PermissionError(errno.EACCES, "Permission denied") from None


@pytest.fixture
def windows_lock(monkeypatch: pytest.MonkeyPatch) -> MsvcrtStandIn:
    if os.name == "nt":
        pytest.skip("the real msvcrt is tested on Windows by test_waiting_for_another_process_refresh...")
    fcntl = pytest.importorskip("fcntl")
    stand_in = MsvcrtStandIn(fcntl)
    monkeypatch.setitem(sys.modules, "fcntl", None)  # `import fcntl` fails, as on Windows
    monkeypatch.setitem(sys.modules, "msvcrt", stand_in)
    return stand_in


def test_refresh_takes_the_msvcrt_lock(cli: Cli, gateway: FakeGateway, windows_lock: MsvcrtStandIn) -> None:
    cli.login(expires_in=0)

    result = cli.run("balance", "--json")

    assert result.code == 0, result
    assert gateway.refresh_count == 1 and len(windows_lock.calls) == 1


def test_refresh_waits_for_an_msvcrt_lock_held_elsewhere(cli: Cli, gateway: FakeGateway,
                                                         windows_lock: MsvcrtStandIn) -> None:
    cli.login(expires_in=-100)
    with open(cli.config_dir / "credentials.lock", "w") as held:
        windows_lock.fcntl.flock(held.fileno(), windows_lock.fcntl.LOCK_EX)

        result = cli.run("whoami", env={"TOKENROUTE_TIMEOUT": "1"})

    assert (result.code, result.out) == (2, "")
    assert "another tokenroute process" in result.err
    assert gateway.refresh_count == 0 and len(windows_lock.calls) > 1

