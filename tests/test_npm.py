"""The npm thin wrapper in npm/: the launcher finds a Python 3.9+ and passes
argv, stdio and the exit status through to the bundled tokenroute.py."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Iterator

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
NODE = shutil.which("node")
NPM = shutil.which("npm")
if NODE is None:
    pytest.skip("node is not on PATH", allow_module_level=True)
if not (REPO / "npm").is_dir():
    pytest.skip("npm/ is not here (an sdist leaves it out)", allow_module_level=True)

sys.path.insert(0, str(TESTS))
from fake_gateway import FakeGateway  # noqa: E402

NO_PYTHON = (
    "error: tokenroute needs Python 3.9 or newer; install it from "
    "https://www.python.org/downloads/ (or set TOKENROUTE_PYTHON)\n"
)
posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and sh stubs")

# Stands in for tokenroute.py to show exactly what the launcher handed over.
ECHO_CLI = """\
import json, os, signal, sys, time
args = sys.argv[1:]
if args[0] == "echo":
    sys.stdout.write(json.dumps({"argv": args, "stdin": sys.stdin.read()}))
    sys.stderr.write("to stderr\\n")
    raise SystemExit(int(args[1]))
if args[0] == "kill-self":
    os.kill(os.getpid(), signal.SIGTERM)
if args[0] == "wait-for-interrupt":
    try:
        print("ready", flush=True)
        time.sleep(60)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        raise SystemExit(130)
if args[0] == "count-interrupts":
    received = []
    signal.signal(signal.SIGINT, lambda *_: received.append(1))
    print("ready", flush=True)
    while not received:  # not signal.pause(): the signal may come before it
        time.sleep(0.01)
    time.sleep(1)  # room for a second SIGINT, were one sent
    print("interrupts", len(received), flush=True)
    raise SystemExit(130)
"""


def cli_version() -> str:
    source = (REPO / "tokenroute.py").read_text(encoding="utf-8")
    match = re.search(r'^__version__ = "(.*)"$', source, re.MULTILINE)
    assert match is not None
    return match.group(1)


def copy_repo_layout(root: Path) -> Path:
    """Copy tokenroute.py and a clean npm/ under root; return the npm dir."""
    root.mkdir()
    shutil.copy2(REPO / "tokenroute.py", root / "tokenroute.py")
    ignore = shutil.ignore_patterns("tokenroute.py", "*.tgz", "node_modules")
    return Path(shutil.copytree(REPO / "npm", root / "npm", ignore=ignore))


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENROUTE_")}
    env["TOKENROUTE_CONFIG_DIR"] = str(tmp_path / "config")
    env.update(extra)
    return env


def run_launcher(
    package: Path, *args: str, env: dict[str, str], node: str = NODE, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [node, str(package / "bin" / "tokenroute.js"), *args],
        input=stdin, capture_output=True, text=True, env=env, timeout=60,
    )


def write_stub(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


@pytest.fixture
def package(tmp_path: Path) -> Path:
    """A copy of npm/ with tokenroute.py put in place by its own copy script."""
    npm_dir = copy_repo_layout(tmp_path / "repo")
    copy = subprocess.run(
        [NODE, "scripts/copy-cli.js"], cwd=npm_dir, capture_output=True, text=True, timeout=60
    )
    assert (copy.returncode, copy.stderr) == (0, "")
    return npm_dir


@pytest.fixture
def echo_package(package: Path) -> Path:
    (package / "tokenroute.py").write_text(ECHO_CLI)
    return package


@pytest.fixture
def fake_gateway() -> Iterator[FakeGateway]:
    gw = FakeGateway().start()
    try:
        yield gw
    finally:
        gw.stop()


@pytest.fixture
def bin_without_python(tmp_path: Path) -> Path:
    """A PATH directory holding node and nothing else."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "node").symlink_to(os.path.realpath(NODE))
    return bin_dir


# ---------------------------------------------------------------- launcher


def test_launcher_runs_cli_against_gateway(
    package: Path, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    raw = fake_gateway.add_key(name="seed", balance_usd="5.00")["raw"]
    env = clean_env(tmp_path, TOKENROUTE_API_URL=fake_gateway.url, TOKENROUTE_API_KEY=raw)

    result = run_launcher(package, "models", "--json", env=env)

    assert (result.returncode, result.stderr) == (0, "")
    models = json.loads(result.stdout)
    assert isinstance(models, list)
    assert "openai/gpt-4o-mini" in [model["id"] for model in models]
    [request] = [r for r in fake_gateway.requests if r.path.split("?")[0] == "/v1/models"]
    assert request.method == "GET"
    assert request.header("Authorization") == f"Bearer {raw}"


def test_launcher_propagates_exit_code_and_stderr(package: Path, tmp_path: Path) -> None:
    env = clean_env(tmp_path, TOKENROUTE_PYTHON=sys.executable)

    result = run_launcher(package, "balance", env=env)
    direct = subprocess.run(
        [sys.executable, str(package / "tokenroute.py"), "balance"],
        input="", capture_output=True, text=True, env=env, timeout=60,
    )

    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.startswith("error:")
    assert (result.returncode, result.stdout, result.stderr) == (
        direct.returncode, direct.stdout, direct.stderr,
    )


def test_launcher_passes_stdout_unchanged(package: Path, tmp_path: Path) -> None:
    env = clean_env(tmp_path, TOKENROUTE_API_URL="http://127.0.0.1:9")

    result = run_launcher(package, "env", "--key", "sk-tr-abc123", env=env)

    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == (
        "OPENAI_API_KEY=sk-tr-abc123\nOPENAI_BASE_URL=http://127.0.0.1:9/v1\n"
    )


def test_launcher_passes_argv_stdin_and_exit_code_through(
    echo_package: Path, tmp_path: Path
) -> None:
    env = clean_env(tmp_path, TOKENROUTE_PYTHON=sys.executable)
    argv = ["echo", "7", "two words", "--json", "", "ünï"]

    result = run_launcher(echo_package, *argv, env=env, stdin="line 1\nline 2\n")

    assert result.returncode == 7
    assert json.loads(result.stdout) == {"argv": argv, "stdin": "line 1\nline 2\n"}
    assert result.stderr == "to stderr\n"


@posix_only
def test_launcher_dies_by_the_signal_that_killed_the_cli(
    echo_package: Path, tmp_path: Path
) -> None:
    env = clean_env(tmp_path, TOKENROUTE_PYTHON=sys.executable)

    result = run_launcher(echo_package, "kill-self", env=env)

    assert (result.returncode, result.stdout, result.stderr) == (-signal.SIGTERM, "", "")


def start_launcher(package: Path, *args: str, env: dict[str, str], **popen: object) -> subprocess.Popen[str]:
    """The launcher in a session of its own (so that a test can end it and its child), once its CLI
    has said "ready"."""
    launcher = subprocess.Popen([NODE, str(package / "bin" / "tokenroute.js"), *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env, start_new_session=True, **popen)
    assert launcher.stdout is not None
    assert launcher.stdout.readline() == "ready\n"
    return launcher


def finish(launcher: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        stdout, stderr = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait(timeout=60)
    return launcher.returncode, stdout, stderr


@posix_only
def test_ctrl_c_at_a_terminal_reaches_the_cli_once_and_the_launcher_waits_for_it(echo_package: Path,
                                                                                 tmp_path: Path) -> None:
    import fcntl
    import pty
    import termios

    master, terminal = pty.openpty()
    try:
        launcher = start_launcher(echo_package, "count-interrupts", stdin=terminal,
                                  env=clean_env(tmp_path, TOKENROUTE_PYTHON=sys.executable),
                                  preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))  # the session's terminal
        os.write(master, b"\x03")  # Ctrl-C: the terminal sends SIGINT to its foreground process group
        result = finish(launcher)
    finally:
        os.close(master)
        os.close(terminal)

    assert result == (130, "interrupts 1\n", "")  # not two: the launcher did not pass its own on


# A shell with job control at a terminal: it owns the terminal, and its background job has a group of its own.
BACKGROUND_JOB = """
import os, subprocess, sys
job = subprocess.Popen(sys.argv[1:], preexec_fn=os.setpgrp)
print(job.pid, flush=True)
sys.exit(job.wait())
"""


@posix_only
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="the launcher tells a Ctrl-C by /proc (Linux)")
def test_a_sigint_sent_to_a_background_launcher_at_a_terminal_reaches_the_cli(echo_package: Path,
                                                                              tmp_path: Path) -> None:
    import fcntl
    import pty
    import termios

    master, terminal = pty.openpty()
    launcher = 0
    try:
        job = [NODE, str(echo_package / "bin" / "tokenroute.js"), "wait-for-interrupt"]
        shell = subprocess.Popen([sys.executable, "-c", BACKGROUND_JOB, *job], stdin=terminal, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, start_new_session=True,
                                 env=clean_env(tmp_path, TOKENROUTE_PYTHON=sys.executable),
                                 preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))  # the session's terminal
        assert shell.stdout is not None
        launcher = int(shell.stdout.readline())
        assert shell.stdout.readline() == "ready\n"

        os.kill(launcher, signal.SIGINT)  # `kill -INT %1`: stdin is a terminal, but no Ctrl-C reached the CLI
        result = finish(shell)
    finally:
        if launcher:
            try:
                os.killpg(launcher, signal.SIGKILL)  # the job's group, left behind if the test failed
            except ProcessLookupError:
                pass
        os.close(master)
        os.close(terminal)

    assert result == (130, "interrupted\n", "")


@posix_only
@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_signal_sent_to_the_launcher_alone_reaches_the_cli(echo_package: Path, tmp_path: Path, name: str) -> None:
    number = getattr(signal, name)
    launcher = start_launcher(echo_package, "wait-for-interrupt", stdin=subprocess.DEVNULL,
                              env=clean_env(tmp_path, TOKENROUTE_PYTHON=sys.executable))

    launcher.send_signal(number)  # a parent's child.kill(), a container's stop signal: no terminal involved

    assert finish(launcher) == ((130, "interrupted\n", "") if name == "SIGINT" else (-number, "", ""))


@pytest.mark.parametrize("tmpdir", ["missing", "a file"])
def test_launcher_runs_without_a_usable_temp_folder(package: Path, tmp_path: Path, tmpdir: str) -> None:
    unusable = tmp_path / ("gone" if tmpdir == "missing" else "file")
    if tmpdir == "a file":
        unusable.write_text("")
    env = clean_env(tmp_path, TMPDIR=str(unusable), TMP=str(unusable), TEMP=str(unusable))

    result = run_launcher(package, "--version", env=env)

    assert (result.returncode, result.stdout, result.stderr) == (0, f"tokenroute {cli_version()}\n", "")


@posix_only
def test_launcher_without_python_says_how_to_get_one(
    package: Path, bin_without_python: Path, tmp_path: Path
) -> None:
    env = clean_env(tmp_path, PATH=str(bin_without_python))

    result = run_launcher(package, "--version", env=env, node=str(bin_without_python / "node"))

    assert (result.returncode, result.stdout, result.stderr) == (1, "", NO_PYTHON)


@posix_only
def test_launcher_skips_python_older_than_3_9(
    package: Path, bin_without_python: Path, tmp_path: Path
) -> None:
    # Never run the launcher's code, as a Python 3.8 stops at its version check
    # (nothing printed, the marker left); says so if its status were taken as the CLI's.
    write_stub(bin_without_python / "python3", "#!/bin/sh\necho ran\nexit 86\n")
    write_stub(bin_without_python / "python", "#!/bin/sh\nexit 9009\n")
    env = clean_env(tmp_path, PATH=str(bin_without_python))

    result = run_launcher(package, "--version", env=env, node=str(bin_without_python / "node"))

    assert (result.returncode, result.stderr) == (1, NO_PYTHON)
    assert result.stdout == "ran\n"  # tried once, then the next candidate


@posix_only
def test_launcher_falls_through_an_old_python_to_the_next_one(
    package: Path, bin_without_python: Path, tmp_path: Path
) -> None:
    # python3 is this interpreter made to report 3.8.18, so the launcher's own
    # check code runs and must refuse it silently; python is the real thing.
    fake_old = tmp_path / "fake-old"
    fake_old.mkdir()
    (fake_old / "sitecustomize.py").write_text(
        'import sys\nsys.version_info = (3, 8, 18, "final", 0)\n'
    )
    tried = tmp_path / "tried-python3"
    write_stub(
        bin_without_python / "python3",
        f'#!/bin/sh\n: > "{tried}"\nPYTHONPATH="{fake_old}" exec "{sys.executable}" "$@"\n',
    )
    write_stub(bin_without_python / "python", f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    env = clean_env(tmp_path, PATH=str(bin_without_python))

    result = run_launcher(package, "--version", env=env, node=str(bin_without_python / "node"))

    assert (result.returncode, result.stdout, result.stderr) == (
        0, f"tokenroute {cli_version()}\n", "",
    )
    assert tried.exists()


def refused(chosen: object, reason: str) -> str:
    return f"error: TOKENROUTE_PYTHON={chosen} {reason}; point it at Python 3.9 or newer, or unset it\n"


def test_a_missing_tokenroute_python_is_an_error_not_a_fallback(package: Path, tmp_path: Path) -> None:
    # python3 on PATH works: running it instead would hide the typo.
    missing = tmp_path / "no-such-python"
    env = clean_env(tmp_path, TOKENROUTE_PYTHON=str(missing))

    result = run_launcher(package, "--version", env=env)

    assert (result.returncode, result.stdout, result.stderr) == (
        1, "", refused(missing, "cannot be run (ENOENT)"),
    )


def test_a_tokenroute_python_that_is_a_folder_is_an_error(package: Path, tmp_path: Path) -> None:
    env = clean_env(tmp_path, TOKENROUTE_PYTHON=str(tmp_path))

    result = run_launcher(package, "--version", env=env)

    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.startswith(f"error: TOKENROUTE_PYTHON={tmp_path} cannot be run (E")
    assert result.stderr.endswith("; point it at Python 3.9 or newer, or unset it\n")


def test_a_tokenroute_python_older_than_3_9_is_an_error(package: Path, tmp_path: Path) -> None:
    # This interpreter made to report 3.8.18, so the launcher's own check runs.
    fake_old = tmp_path / "fake-old"
    fake_old.mkdir()
    (fake_old / "sitecustomize.py").write_text('import sys\nsys.version_info = (3, 8, 18, "final", 0)\n')
    env = clean_env(tmp_path, TOKENROUTE_PYTHON=sys.executable, PYTHONPATH=str(fake_old))

    result = run_launcher(package, "--version", env=env)

    assert (result.returncode, result.stdout, result.stderr) == (
        1, "", refused(sys.executable, "is not Python 3.9 or newer"),
    )


def run_launcher_as_on_windows(package: Path, *args: str, env: dict[str, str], node: str,
                               tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """The launcher believing it runs on Windows (process.platform), to test its Windows choices here."""
    preload = tmp_path / "as-windows.js"
    preload.write_text('Object.defineProperty(process, "platform", { value: "win32" });\n')
    env = {**env, "TEMP": str(tmp_path)}  # always set on Windows: node's os.tmpdir() there
    return subprocess.run(
        [node, "-r", str(preload), str(package / "bin" / "tokenroute.js"), *args],
        capture_output=True, text=True, env=env, timeout=60, stdin=subprocess.DEVNULL,
    )


@posix_only
def test_launcher_on_windows_runs_py_dash_3_first(
    package: Path, bin_without_python: Path, tmp_path: Path
) -> None:
    tried = tmp_path / "py-args"
    write_stub(bin_without_python / "py", f'#!/bin/sh\necho "$1" > "{tried}"\nshift\nexec "{sys.executable}" "$@"\n')
    write_stub(bin_without_python / "python", "#!/bin/sh\necho wrong python\nexit 3\n")
    env = clean_env(tmp_path, PATH=str(bin_without_python))

    result = run_launcher_as_on_windows(package, "--version", env=env, node=str(bin_without_python / "node"),
                                        tmp_path=tmp_path)

    assert (result.returncode, result.stdout, result.stderr) == (0, f"tokenroute {cli_version()}\n", "")
    assert tried.read_text() == "-3\n"


@posix_only
def test_tokenroute_python_is_tried_first_and_started_once(
    echo_package: Path, tmp_path: Path
) -> None:
    chosen = tmp_path / "chosen-python"
    runs = tmp_path / "runs"
    write_stub(chosen, f'#!/bin/sh\necho run >> "{runs}"\nexec "{sys.executable}" "$@"\n')
    env = clean_env(tmp_path, TOKENROUTE_PYTHON=str(chosen))

    result = run_launcher(echo_package, "echo", "0", "two words", env=env)

    assert (result.returncode, result.stderr) == (0, "to stderr\n")
    assert json.loads(result.stdout)["argv"] == ["echo", "0", "two words"]
    assert runs.read_text() == "run\n"  # the version check shares the CLI's process


@pytest.mark.parametrize("status", [86, 9009, 1] if sys.platform == "win32" else [86, 1])
def test_run_passes_any_status_through_the_launcher_and_runs_once(package: Path, tmp_path: Path,
                                                                   status: int) -> None:
    # 86 was once the launcher's "this Python is too old", and 9009 Windows' "no Python":
    # a status the user's command exits with never makes the launcher try another Python.
    runs = tmp_path / "runs"
    child = [sys.executable, "-c", f"open({str(runs)!r}, 'a').write('run\\n'); raise SystemExit({status})"]
    env = clean_env(tmp_path, TOKENROUTE_API_KEY="sk-tr-abc123", TOKENROUTE_API_URL="http://127.0.0.1:9")

    result = run_launcher(package, "run", "--", *child, env=env)

    assert (result.returncode, result.stdout, result.stderr) == (status, "", "")
    assert runs.read_text() == "run\n"


def test_launcher_imports_the_cli_so_its_bytecode_is_cached(
    package: Path, tmp_path: Path
) -> None:
    env = clean_env(tmp_path, TOKENROUTE_PYTHON=sys.executable)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    assert not (package / "__pycache__").exists()

    result = run_launcher(package, "--version", env=env)

    assert (result.returncode, result.stdout, result.stderr) == (
        0, f"tokenroute {cli_version()}\n", "",
    )
    assert list((package / "__pycache__").glob("tokenroute.*.pyc"))


@posix_only
def test_launcher_handles_an_unusual_install_path(tmp_path: Path) -> None:
    # Quotes, backslash, non-ASCII and shell syntax in the path of the package.
    npm_dir = copy_repo_layout(tmp_path / 'in "q" \\ \'s\' é 😀 $HOME `x`')
    copy = subprocess.run(
        [NODE, "scripts/copy-cli.js"], cwd=npm_dir, capture_output=True, text=True, timeout=60
    )
    assert (copy.returncode, copy.stderr) == (0, "")
    code_file = tmp_path / "code.py"
    python = tmp_path / "python"
    write_stub(python, f'#!/bin/sh\nprintf %s "$2" > "{code_file}"\nexec "{sys.executable}" "$@"\n')
    env = clean_env(tmp_path, TOKENROUTE_PYTHON=str(python))

    result = run_launcher(npm_dir, "--version", env=env)

    assert (result.returncode, result.stdout, result.stderr) == (
        0, f"tokenroute {cli_version()}\n", "",
    )
    # ASCII only: an old Python in a C locale cannot decode anything else in
    # -c code, and must still get as far as the version check.
    assert code_file.read_bytes().isascii()


def test_launcher_without_the_bundled_cli_says_how_to_copy_it(tmp_path: Path) -> None:
    npm_dir = copy_repo_layout(tmp_path / "repo")  # copy-cli.js not run
    env = clean_env(tmp_path, TOKENROUTE_PYTHON=sys.executable)

    result = run_launcher(npm_dir, "--version", env=env)

    script = npm_dir / "bin" / ".." / "tokenroute.py"
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (
        f'error: {os.path.normpath(script)} is missing; run "node scripts/copy-cli.js" in npm/\n'
    )


@pytest.mark.parametrize("args", [["no-such-command"], ["models"]])
def test_launcher_ignores_modules_in_the_working_directory(
    package: Path, tmp_path: Path, args: list[str]
) -> None:
    # `python -c` puts the working directory first on sys.path; the launcher
    # must not let a project's own argparse.py or urllib.py shadow the stdlib,
    # just as `python tokenroute.py` does not.
    cwd = tmp_path / "project"
    cwd.mkdir()
    for name in ("argparse", "json", "shlex", "socket", "ssl", "textwrap", "urllib"):
        (cwd / f"{name}.py").write_text("import os\nos._exit(99)\n")
    env = clean_env(
        tmp_path, TOKENROUTE_PYTHON=sys.executable,
        TOKENROUTE_API_URL="http://127.0.0.1:9", TOKENROUTE_API_KEY="sk-tr-abc123",
    )

    result = subprocess.run(
        [NODE, str(package / "bin" / "tokenroute.js"), *args],
        cwd=cwd, capture_output=True, text=True, env=env, timeout=60,
    )
    direct = subprocess.run(
        [sys.executable, str(package / "tokenroute.py"), *args],
        cwd=cwd, capture_output=True, text=True, env=env, timeout=60,
    )

    assert result.returncode != 99
    assert (result.returncode, result.stdout, result.stderr) == (
        direct.returncode, direct.stdout, direct.stderr,
    )


# ---------------------------------------------------------------- packaging


def test_package_version_matches_cli_version() -> None:
    package_json = json.loads((REPO / "npm" / "package.json").read_text(encoding="utf-8"))

    assert package_json["version"] == cli_version()


def test_package_has_no_npm_dependencies() -> None:
    package_json = json.loads((REPO / "npm" / "package.json").read_text(encoding="utf-8"))

    assert package_json["bin"] == {"tokenroute": "bin/tokenroute.js"}
    assert not {"dependencies", "optionalDependencies", "peerDependencies"} & set(package_json)


def test_copy_script_refuses_a_version_mismatch(tmp_path: Path) -> None:
    npm_dir = copy_repo_layout(tmp_path / "repo")
    package_json = json.loads((npm_dir / "package.json").read_text(encoding="utf-8"))
    package_json["version"] = "0.0.0-mismatch"
    (npm_dir / "package.json").write_text(json.dumps(package_json), encoding="utf-8")

    result = subprocess.run(
        [NODE, "scripts/copy-cli.js"], cwd=npm_dir, capture_output=True, text=True, timeout=60
    )

    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (
        f"copy-cli: error: npm/package.json version 0.0.0-mismatch != "
        f"tokenroute.py __version__ {cli_version()}\n"
    )
    assert not (npm_dir / "tokenroute.py").exists()


@pytest.mark.skipif(NPM is None, reason="npm is not on PATH")
def test_npm_pack_produces_installable_tarball(tmp_path: Path) -> None:
    npm_dir = copy_repo_layout(tmp_path / "repo")
    dist = tmp_path / "dist"
    dist.mkdir()
    env = clean_env(
        tmp_path,
        npm_config_cache=str(tmp_path / "npm-cache"),
        npm_config_update_notifier="false",
    )
    npm = [str(NPM)]

    pack = subprocess.run(
        [*npm, "pack", "--pack-destination", str(dist)],
        cwd=npm_dir, capture_output=True, text=True, env=env, timeout=60,
    )
    assert pack.returncode == 0, pack.stderr
    [tarball] = dist.glob("*.tgz")
    with tarfile.open(tarball) as archive:
        assert sorted(archive.getnames()) == [
            "package/README.md",
            "package/bin/tokenroute.js",
            "package/package.json",
            "package/tokenroute.py",
        ]
        packed_cli = archive.extractfile("package/tokenroute.py")
        assert packed_cli is not None
        assert packed_cli.read() == (REPO / "tokenroute.py").read_bytes()

    inst = tmp_path / "inst"
    install = subprocess.run(
        [*npm, "install", "--offline", "--no-audit", "--no-fund", "--prefix", str(inst), str(tarball)],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert install.returncode == 0, install.stderr
    bin_name = "tokenroute.cmd" if sys.platform == "win32" else "tokenroute"
    installed = subprocess.run(
        [str(inst / "node_modules" / ".bin" / bin_name), "--version"],
        capture_output=True, text=True, env=env, timeout=60,
    )

    assert (installed.returncode, installed.stdout, installed.stderr) == (
        0, f"tokenroute {cli_version()}\n", "",
    )
