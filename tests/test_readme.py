"""The README's promises to a newcomer (issue 16): its first set-up command runs
tokenroute end to end in a clean copy of the repository and leaves nothing
running, its offline steps work against the standalone local gateway, which
is quiet unless asked, its test command is the one CI runs, and it stays a
short page whose links lead somewhere."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from conftest import POSIX, REPO, console_script

README = REPO / "README.md"
FENCED = re.compile(r"^```[a-z]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
GATEWAY_LINE = re.compile(r"on http://127\.0\.0\.1:(\d+) ")
NOT_COPIED = {".git", ".venv", "__pycache__", ".pytest_cache", "dist", "build", "node_modules", ".tools"}


def section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else len(text)]


def fenced(title: str) -> list[str]:
    return FENCED.findall(section(title))


def clean_copy(target: Path) -> Path:
    """The repository as a fresh clone has it: tracked and new files, nothing ignored or built."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True) if shutil.which("git") and (REPO / ".git").exists() else None
    if listed is None or listed.returncode != 0:
        shutil.copytree(REPO, target, symlinks=True, ignore=lambda folder, names: [
            name for name in names if name in NOT_COPIED or name.endswith(".egg-info")])
        return target
    for name in filter(None, listed.stdout.decode().split("\0")):
        source = REPO / name
        if source.is_symlink() or source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name, follow_symlinks=False)
    return target


def port_is_closed(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def start_standalone_gateway(*flags: str) -> tuple[subprocess.Popen, int]:
    gateway = subprocess.Popen([sys.executable, str(REPO / "tests" / "fake_gateway.py"), "--port", "0", *flags],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    match = GATEWAY_LINE.search(gateway.stdout.readline())
    assert match, "the gateway did not print its URL"
    return gateway, int(match.group(1))


def stop(gateway: subprocess.Popen) -> str:
    gateway.terminate()
    return gateway.communicate(timeout=30)[1]


# ---------------------------------------------------------------- the first set-up command


@pytest.mark.skipif(not POSIX or shutil.which("bash") is None,
                    reason="the README's set-up commands are for bash on Linux and macOS (docs/windows.md has "
                           "PowerShell's)")
def test_the_first_setup_command_runs_tokenroute_end_to_end_in_a_clean_copy(tmp_path: Path) -> None:
    command = fenced("Set up on a fresh machine")[0].strip()
    copy = clean_copy(tmp_path / "tokenroute")
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("TOKENROUTE_") and name != "VIRTUAL_ENV"}  # pip's cache stays shared

    shell = subprocess.Popen(["bash", "-c", command], cwd=copy, env=env, stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = shell.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(shell.pid, signal.SIGKILL)
        raise

    assert shell.returncode == 0, out + err
    assert out.endswith("OK connected (openai/gpt-4o-mini)\n  reply: OK\n"), out + err
    with pytest.raises(ProcessLookupError):  # nothing of the command's session is left running
        os.killpg(shell.pid, 0)
    assert port_is_closed(int(re.search(r"Local gateway on http://127\.0\.0\.1:(\d+) ", out).group(1)))


# ---------------------------------------------------------------- trying it offline by hand


def test_the_offline_steps_work_as_written_and_the_gateway_stays_quiet(tmp_path: Path) -> None:
    steps = [line[2:].split("  #")[0] for line in fenced("Try it offline")[0].splitlines()
             if line.startswith(("$ tokenroute ", "$ export "))]
    gateway, port = start_standalone_gateway()
    env = {name: value for name, value in os.environ.items() if not name.startswith("TOKENROUTE_")}
    results = []
    try:
        for step in steps:
            words = shlex.split(step.replace(":8787", f":{port}").replace("/tmp/", f"{tmp_path}/"))
            if words[0] == "export":
                env.update(word.split("=", 1) for word in words[1:])
            else:
                results.append(subprocess.run([console_script(), *words[1:]], env=env, capture_output=True,
                                              text=True, timeout=120, stdin=subprocess.DEVNULL))
    finally:
        log = stop(gateway)

    assert env["TOKENROUTE_API_URL"] == f"http://127.0.0.1:{port}"
    assert [r.returncode for r in results] == [0] * len(results), results
    assert [r.stdout for r in results if r.args[1:] == ["test"]] == ["OK connected (openai/gpt-4o-mini)\n  reply: OK\n"]
    assert log == ""


def test_the_standalone_gateway_logs_requests_with_verbose() -> None:
    gateway, port = start_standalone_gateway("--verbose")
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/auth/discovery", timeout=30).close()
    finally:
        log = stop(gateway)

    assert '"GET /api/v1/auth/discovery HTTP/1.1" 200' in log


# ---------------------------------------------------------------- the page itself


@pytest.mark.skipif(not (REPO / ".ci" / "run").exists(), reason="no .ci/run here (the sdist leaves it out)")
def test_the_test_command_installs_what_ci_installs_and_runs_the_same_pytest() -> None:
    readme_command = fenced("Set up on a fresh machine")[1].strip()
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    ci_install = next(line for line in ci.splitlines() if line.startswith("python -m pip install") and " . " in line)

    def packages(command: str) -> set[str]:
        install = command[command.index("install "):].split(" && ")[0]
        return {word for word in shlex.split(install)[1:] if not word.startswith("-")}

    assert packages(ci_install) - packages(readme_command) == {"vermin"}  # .ci/run checks with it (README says)
    assert packages(readme_command) <= packages(ci_install)
    assert readme_command.endswith("&& python -m pytest")
    assert "# The README's test command.\npython -m pytest\n" in ci


def test_the_readme_is_a_short_page_whose_links_lead_somewhere() -> None:
    text = README.read_text(encoding="utf-8")
    targets = re.findall(r"\]\(((?!https?:|#)[^)#]+)", text)

    assert len(text.splitlines()) <= 300
    assert targets and [t for t in targets if not (REPO / t).exists()] == []
    for page in (REPO / "docs").glob("*.md"):
        for target in re.findall(r"\]\(((?!https?:|#)[^)#]+)", page.read_text(encoding="utf-8")):
            assert (page.parent / target).exists(), (page.name, target)
