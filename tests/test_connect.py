"""Connecting tools without a key on disk (issue 9): `run`, `env --write`,
and output people read (help, suggestions, labels, money, times, colour)."""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import pytest

import tokenroute
from conftest import REPO, Cli, Result, console_script, posix_modes
from fake_gateway import FakeGateway

try:
    import dotenv  # python-dotenv, a test dependency: the reader env --write must satisfy
except ImportError:
    dotenv = None

posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX exec, signals and file modes")
PRINT_ENV = (
    "import json, os, sys; print(json.dumps({'argv': sys.argv[1:], 'key': os.environ.get('OPENAI_API_KEY'),"
    " 'url': os.environ.get('OPENAI_BASE_URL'), 'marker': os.environ.get('MARKER')}))"
)
OUR_COLOURS = re.compile(r"\x1b\[(?:0|1|31|32|33)m")


def script(cli: Cli, *argv: str, env: Optional[dict[str, str]] = None, cwd: Optional[Path] = None,
           stdin: Optional[str] = None) -> Result:
    """The installed console script, with a working folder and stdin of the test's choosing."""
    done = subprocess.run([console_script(), *argv], env=cli.process_env(env), cwd=cwd, input=stdin or "",
                          capture_output=True, text=True, timeout=60)
    return Result(done.returncode, done.stdout, done.stderr)


def host(gateway: FakeGateway) -> str:
    return gateway.url.split("//", 1)[1]


# ---------------------------------------------------------------- run


def test_run_gives_the_child_the_two_variables_and_the_rest_of_the_environment(cli: Cli, gateway: FakeGateway,
                                                                              api_key: str) -> None:
    result = script(cli, "run", "--", sys.executable, "-c", PRINT_ENV, "a b", "--json",
                    env={"TOKENROUTE_API_KEY": api_key, "MARKER": "kept"})

    assert (result.code, result.err) == (0, "")
    assert json.loads(result.out) == {"argv": ["a b", "--json"], "key": api_key, "url": gateway.url + "/v1",
                                      "marker": "kept"}


def test_run_without_double_dash_passes_the_childs_options_on(cli: Cli, api_key: str) -> None:
    result = script(cli, "run", "--key", api_key, sys.executable, "-c", PRINT_ENV, "--json", "--key", "x")

    assert result.code == 0, result
    assert json.loads(result.out)["argv"] == ["--json", "--key", "x"]


@pytest.mark.parametrize(
    ("argv", "child"),
    [
        (["run", "--", "cmd", "--json"], ["cmd", "--json"]),
        (["run", "cmd", "--json", "--", "x"], ["cmd", "--json", "--", "x"]),
        (["--json", "run", "--key=sk-tr-abc123", "--", "ls", "-l"], ["ls", "-l"]),
        (["run", "--api-url", "https://gw.example", "--", "--", "x"], ["--", "x"]),
    ],
)
def test_run_line_splits_where_the_child_begins(argv: list[str], child: list[str]) -> None:
    args = tokenroute.parse_fast(argv)

    assert args is not None and args.func is tokenroute.cmd_run
    assert args.command == child
    assert args.json == (argv[0] == "--json")  # a child's --json is the child's
    assert tokenroute.own_words(argv).count("--json") == (argv[0] == "--json")


def test_a_childs_json_flag_does_not_turn_errors_into_json(cli: Cli, api_key: str) -> None:
    human = cli.run("run", "--key", api_key, "--", "no-such-command-tr9", "--json")
    machine = cli.run("--json", "run", "--key", api_key, "--", "no-such-command-tr9")

    assert (human.code, human.err) == (127, "error: no-such-command-tr9: command not found\n")
    assert machine.code == 127 and machine.error()["code"] == "command_not_found"


@posix_only
def test_run_exit_status_is_the_childs(cli: Cli, api_key: str) -> None:
    result = script(cli, "run", "--key", api_key, "--", "sh", "-c", "exit 7")

    assert (result.code, result.out, result.err) == (7, "", "")


@posix_only
def test_run_replaces_itself_with_the_child(cli: Cli, api_key: str) -> None:
    child = subprocess.Popen([console_script(), "run", "--key", api_key, "--", "sh", "-c", "echo $$"],
                             env=cli.process_env(), stdout=subprocess.PIPE, text=True)
    out, _ = child.communicate(timeout=60)

    assert int(out) == child.pid  # no tokenroute process left in between


@posix_only
def test_a_signal_death_reads_as_128_plus_n_in_a_shell(cli: Cli, api_key: str) -> None:
    program = '"$TR" run --key "$KEY" -- sh -c \'kill -TERM $$\'; echo "status $?"'
    done = subprocess.run(["sh", "-c", program], env=cli.process_env({"TR": console_script(), "KEY": api_key}),
                          capture_output=True, text=True, timeout=60)
    direct = subprocess.run([console_script(), "run", "--key", api_key, "--", "sh", "-c", "kill -TERM $$"],
                            env=cli.process_env(), capture_output=True, timeout=60)

    assert done.stdout == f"status {128 + signal.SIGTERM}\n"
    assert direct.returncode == -signal.SIGTERM  # the process itself died of it: it was the child


@posix_only
def test_waiting_for_a_child_passes_its_status_through_as_windows_does() -> None:
    kill_self = "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"

    assert tokenroute.run_and_wait([sys.executable, "-c", "raise SystemExit(5)"], dict(os.environ)) == 5
    assert tokenroute.run_and_wait([sys.executable, "-c", kill_self], dict(os.environ)) == 128 + signal.SIGTERM
    with pytest.raises(tokenroute.CliError) as missing:
        tokenroute.run_and_wait(["no-such-command-tr9"], dict(os.environ))
    assert (missing.value.exit_code, missing.value.code) == (127, "command_not_found")


def test_run_passes_stdin_to_the_child(cli: Cli, api_key: str) -> None:
    read_stdin = "import sys; print(sys.stdin.read().upper(), end='')"
    result = script(cli, "run", "--key", api_key, "--", sys.executable, "-c", read_stdin, stdin="hello\nworld\n")

    assert (result.code, result.out, result.err) == (0, "HELLO\nWORLD\n", "")


def test_command_not_found_exits_127(cli: Cli, api_key: str) -> None:
    result = script(cli, "run", "--key", api_key, "--", "no-such-command-tr9", "arg")

    assert (result.code, result.out) == (127, "")
    assert result.err == "error: no-such-command-tr9: command not found\n"


@posix_only
@pytest.mark.parametrize("what", ["file without x bit", "folder"])
def test_command_found_but_not_executable_exits_126(cli: Cli, api_key: str, tmp_path: Path, what: str) -> None:
    target = tmp_path / "tool"
    if what == "folder":
        target.mkdir()
    else:
        target.write_text("#!/bin/sh\necho ran\n")
        target.chmod(0o644)

    result = script(cli, "run", "--key", api_key, "--", str(target))

    assert (result.code, result.out) == (126, "")
    assert result.err.startswith(f"error: {target}: cannot run it: ")


@posix_only
@pytest.mark.parametrize("how", ["by path", "on PATH"])
def test_a_script_without_a_shebang_runs_under_sh_as_a_shell_runs_it(cli: Cli, api_key: str, tmp_path: Path,
                                                                     how: str) -> None:
    tool = tmp_path / "tool"
    tool.write_text('echo "ran $0 $1 with ${OPENAI_API_KEY%%${OPENAI_API_KEY#sk-tr-}}"\n')
    tool.chmod(0o755)
    path = f"{tmp_path}{os.pathsep}{os.environ['PATH']}"

    result = script(cli, "run", "--key", api_key, "--", str(tool) if how == "by path" else "tool", "a b",
                    env={"PATH": path})

    assert (result.code, result.out, result.err) == (0, f"ran {tool} a b with sk-tr-\n", "")


@posix_only
def test_a_program_for_another_machine_is_not_run_as_a_script(cli: Cli, api_key: str, tmp_path: Path) -> None:
    program = tmp_path / "program"
    program.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(56) + b"\necho never\n")  # a header no exec accepts
    program.chmod(0o755)

    result = script(cli, "run", "--key", api_key, "--", str(program))

    assert (result.code, result.out) == (126, "")
    assert result.err == f"error: {program}: cannot run it: Exec format error\n"


@posix_only
def test_a_script_whose_interpreter_is_missing_says_so_not_command_not_found(cli: Cli, api_key: str,
                                                                             tmp_path: Path) -> None:
    tool = tmp_path / "tool"
    tool.write_text("#!/nonexistent/python9 -u\nprint('never')\n")
    tool.chmod(0o755)

    result = script(cli, "run", "--key", api_key, "--", str(tool))

    assert (result.code, result.out) == (126, "")
    assert result.err == f"error: {tool}: cannot run it: its interpreter /nonexistent/python9 is missing\n"


# How OpenAI clients find their key and URL: openai>=1 (and node's), openai<1 (a key file first,
# then OPENAI_API_KEY; OPENAI_API_BASE, else OpenAI's own), LangChain (OPENAI_API_BASE first).
CLIENTS_SEE = """
import json, os
env = os.environ
key_file = env.get("OPENAI_API_KEY_PATH")
old_key = open(key_file).read().strip() if key_file else env.get("OPENAI_API_KEY")
print(json.dumps({
    "openai": [env.get("OPENAI_BASE_URL", "https://api.openai.com/v1"), env.get("OPENAI_API_KEY")],
    "openai<1": [env.get("OPENAI_API_BASE", "https://api.openai.com/v1"), old_key],
    "langchain": [env.get("OPENAI_API_BASE") or env.get("OPENAI_BASE_URL"), env.get("OPENAI_API_KEY")],
    "real key anywhere": any("sk-proj-REAL" in value for value in env.values()),
}))
"""


def test_no_openai_variable_in_the_environment_wins_over_the_gateway_in_the_child(cli: Cli, gateway: FakeGateway,
                                                                                 api_key: str, tmp_path: Path) -> None:
    real = "sk-proj-REALopenaikey000000000000"
    key_file = tmp_path / "openai-key"
    key_file.write_text(real + "\n")
    openai = {"OPENAI_API_KEY": real, "OPENAI_BASE_URL": "https://api.openai.com/v1",
              "OPENAI_API_BASE": "https://api.openai.com/v1", "OPENAI_API_KEY_PATH": str(key_file)}

    result = script(cli, "run", "--key", api_key, "--", sys.executable, "-c", CLIENTS_SEE, env=openai)

    assert result.code == 0, result
    seen = json.loads(result.out)
    gateway_and_key = [gateway.url + "/v1", api_key]
    assert seen == {"openai": gateway_and_key, "openai<1": gateway_and_key, "langchain": gateway_and_key,
                    "real key anywhere": False}


@pytest.mark.parametrize("how", ["in process", "console script"])
def test_run_without_a_key_exits_1_and_never_starts_the_child(cli: Cli, tmp_path: Path, how: str) -> None:
    marker = tmp_path / "started"
    argv = ["run", "--", sys.executable, "-c", f"open({str(marker)!r}, 'w')"]

    result = cli.run(*argv) if how == "in process" else script(cli, *argv)

    assert (result.code, result.out) == (1, "")
    assert result.err.startswith("error: no API key")
    assert not marker.exists()


def test_run_refuses_an_api_url_env_would_refuse_and_starts_nothing(cli: Cli, api_key: str, tmp_path: Path) -> None:
    marker = tmp_path / "started"
    result = cli.run("run", "--key", api_key, "--", sys.executable, "-c", f"open({str(marker)!r}, 'w')",
                     env={"TOKENROUTE_API_URL": "https://gw.example/$(id)"})

    assert (result.code, result.out) == (1, "")
    assert not marker.exists()


@pytest.mark.parametrize(("argv", "message"), [
    (["run"], "error: run needs a command, like: tokenroute run -- python app.py\n"),
    (["run", "--bogus", "x"], "error: unrecognized argument: --bogus (put the command after --)\n"),
    (["run", "--key"], "error: argument --key: expected one argument\n"),
    (["run", "--", ""], "error: run's command is an empty word; name a program, like: tokenroute run -- python app.py\n"),
    (["run", "", "x"], "error: run's command is an empty word; name a program, like: tokenroute run -- python app.py\n"),
])
def test_run_usage_errors(cli: Cli, argv: list[str], message: str) -> None:
    result = cli.run(*argv)

    assert (result.code, result.out) == (1, "")
    assert result.err == message + tokenroute.RUN_USAGE + "\n"


SHOW_OWN_ARGV = """
import json, os, shutil, subprocess, sys
seen = {"argv": sys.argv}
if os.name == "posix" and shutil.which("ps"):
    seen["ps"] = subprocess.run(["ps", "-o", "args=", "-p", str(os.getpid())], capture_output=True, text=True).stdout
if os.path.exists("/proc/self/cmdline"):
    seen["proc"] = open("/proc/self/cmdline", "rb").read().decode(errors="replace")
key = os.environ["OPENAI_API_KEY"]
print(json.dumps(seen))
print(key[:10], len(key))
"""


def test_the_key_never_reaches_argv_disk_or_output(cli: Cli, gateway: FakeGateway, api_key: str) -> None:
    cli.cache_key(api_key)
    before = {p: p.read_bytes() for p in cli.home.rglob("*") if p.is_file()}

    result = script(cli, "run", "--", sys.executable, "-c", SHOW_OWN_ARGV, "marker-tr9")

    assert result.code == 0, result
    seen, key_line = result.out.splitlines()
    assert key_line == f"{api_key[:10]} {len(api_key)}"  # the cached key reached the child
    argv = json.loads(seen)
    assert argv["argv"] == ["-c", "marker-tr9"]
    for how in ("ps", "proc"):  # the argv the system shows, where it shows it
        assert "marker-tr9" in argv.get(how, "marker-tr9"), argv
    assert api_key not in result.out + result.err  # not in its argv (printed above) nor any output
    assert {p: p.read_bytes() for p in cli.home.rglob("*") if p.is_file()} == before  # nothing written


PROC_STATUS = Path("/proc/self/status")


@pytest.mark.skipif(not PROC_STATUS.exists(), reason="no /proc/self/status to read the ignored signals from")
def test_the_child_does_not_inherit_pythons_ignored_sigpipe_and_sigxfsz(cli: Cli, api_key: str) -> None:
    result = script(cli, "run", "--key", api_key, "--", "sh", "-c", "grep SigIgn /proc/self/status")

    assert result.code == 0, result
    ignored = int(result.out.split()[1], 16)
    for number in (signal.SIGPIPE, signal.SIGXFSZ):
        assert not ignored & (1 << (number - 1)), f"signal {number} ignored: {result.out}"


@posix_only
@pytest.mark.skipif(shutil.which("yes") is None, reason="no yes")
def test_a_child_writing_to_a_closed_pipe_dies_of_sigpipe_quietly(cli: Cli, api_key: str) -> None:
    program = '{ "$TR" run --key "$KEY" -- yes; echo "status $?" >&2; } | head -1'
    done = subprocess.run(["sh", "-c", program], env=cli.process_env({"TR": console_script(), "KEY": api_key}),
                          capture_output=True, text=True, timeout=60)

    assert done.stdout == "y\n"
    assert done.stderr == f"status {128 + signal.SIGPIPE}\n"  # no "yes: standard output: Broken pipe"


def test_the_childs_exit_status_passes_through(cli: Cli, api_key: str) -> None:
    result = script(cli, "run", "--key", api_key, "--", sys.executable, "-c", "raise SystemExit(7)")

    assert (result.code, result.out, result.err) == (7, "", "")


@pytest.mark.skipif(os.name != "nt", reason="an NTSTATUS exit code is Windows'")
def test_a_windows_crash_status_passes_through(cli: Cli, api_key: str) -> None:
    crash = "import os; os._exit(-1073741819)"  # exits 0xC0000005, an access violation's NTSTATUS
    result = script(cli, "run", "--key", api_key, "--", sys.executable, "-c", crash)

    assert result.code == 0xC0000005, result


@pytest.mark.parametrize(("status", "shown"), [
    (0, 0), (7, 7), (255, 255), (-15, 143), (-9, 137), (0x7FFFFFFF, 0x7FFFFFFF),
    (0xC0000005, 0xC0000005 - 2**32), (0xFFFFFFFF, -1),
])
def test_a_childs_status_becomes_an_exit_status_a_shell_reads_the_same(status: int, shown: int) -> None:
    assert tokenroute.exit_status(status) == shown  # Windows exits with the same 32 bits


PRINT_PATH = "import os; print(os.environ['PATH'])"


def make_venv(folder: Path) -> Path:
    """A virtual environment at `folder` (without pip: quick to make); returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True, timeout=120,
                   capture_output=True)
    return folder / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def run_in_venv(cli: Cli, python: Path, api_key: str, *child: str, path: str,
                virtual_env: str = "") -> subprocess.CompletedProcess[str]:
    """`tokenroute run` as that environment's Python runs it, with PATH (and VIRTUAL_ENV) as given."""
    return subprocess.run([str(python), str(REPO / "tokenroute.py"), "run", "--key", api_key, "--", *child],
                          env=cli.process_env({"PATH": path, "VIRTUAL_ENV": virtual_env}), capture_output=True,
                          text=True, timeout=60)


# Where each installer makes tokenroute's own environment, and the file that tells it is one.
TOOL_ENVIRONMENTS = {
    "uvx": ("uv-cache/archive-v0/b7Jx2kQ", "uv-cache/CACHEDIR.TAG"),
    "uv tool install": ("uv-tools/tokenroute", "uv-tools/tokenroute/uv-receipt.toml"),
    "pipx": ("pipx/venvs/tokenroute", "pipx/venvs/tokenroute/pipx_metadata.json"),
}


@pytest.mark.parametrize("installer", sorted(TOOL_ENVIRONMENTS))
def test_the_tool_environment_an_installer_made_is_left_out_of_the_childs_path(cli: Cli, api_key: str,
                                                                             tmp_path: Path, installer: str) -> None:
    folder, marker = TOOL_ENVIRONMENTS[installer]
    python = make_venv(tmp_path / folder)
    (tmp_path / marker).write_text("")
    elsewhere = str(tmp_path / "bin")

    done = run_in_venv(cli, python, api_key, sys.executable, "-c", PRINT_PATH,
                       path=os.pathsep.join([str(python.parent), elsewhere]))

    assert (done.returncode, done.stdout.strip()) == (0, elsewhere), done.stderr


def test_the_apps_own_virtualenv_with_tokenroute_in_it_stays_first_on_the_childs_path(cli: Cli, api_key: str,
                                                                                     tmp_path: Path) -> None:
    # uv's Docker guide: PATH="/app/.venv/bin:$PATH", no VIRTUAL_ENV; `python` must be the app's.
    python = make_venv(tmp_path / "app" / ".venv")
    path = os.pathsep.join([str(python.parent), os.path.dirname(os.path.realpath(sys.executable))])
    prefix = "import sys; print(sys.prefix)"

    done = run_in_venv(cli, python, api_key, "python", "-c", prefix, path=path)

    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == tmp_path / "app" / ".venv"


def test_a_tool_environment_not_first_on_path_leaves_path_as_it_was(cli: Cli, api_key: str, tmp_path: Path) -> None:
    folder, marker = TOOL_ENVIRONMENTS["uvx"]
    python = make_venv(tmp_path / folder)
    (tmp_path / marker).write_text("")
    path = os.pathsep.join([str(tmp_path / "bin"), str(python.parent), str(tmp_path / "bin")])

    done = run_in_venv(cli, python, api_key, sys.executable, "-c", PRINT_PATH, path=path)

    assert (done.returncode, done.stdout.strip()) == (0, path), done.stderr


@pytest.mark.parametrize("activated", [True, False])
def test_a_virtualenv_under_a_cache_folder_stays_first_on_the_childs_path(cli: Cli, api_key: str, tmp_path: Path,
                                                                          activated: bool) -> None:
    # Poetry keeps its environments in ~/.cache/pypoetry, and ~/.cache may hold a CACHEDIR.TAG: no uv cache.
    venv = tmp_path / ".cache" / "pypoetry" / "virtualenvs" / "app-Xy3k-py3"
    python = make_venv(venv)
    (tmp_path / ".cache" / "CACHEDIR.TAG").write_text("Signature: 8a477f597d28d172789f06886806bc55\n")
    path = os.pathsep.join([str(python.parent), str(tmp_path / "bin")])

    done = run_in_venv(cli, python, api_key, sys.executable, "-c", PRINT_PATH, path=path,
                       virtual_env=str(venv) if activated else "")

    assert (done.returncode, done.stdout.strip()) == (0, path), done.stderr


def test_an_activated_virtualenv_stays_first_on_the_childs_path_wherever_it_is(cli: Cli, api_key: str,
                                                                               tmp_path: Path) -> None:
    folder, marker = TOOL_ENVIRONMENTS["uvx"]  # made where uvx makes its own, and yet the user's: VIRTUAL_ENV says so
    python = make_venv(tmp_path / folder)
    (tmp_path / marker).write_text("")
    path = os.pathsep.join([str(python.parent), str(tmp_path / "bin")])

    done = run_in_venv(cli, python, api_key, sys.executable, "-c", PRINT_PATH, path=path,
                       virtual_env=str(tmp_path / folder))

    assert (done.returncode, done.stdout.strip()) == (0, path), done.stderr


@posix_only
def test_the_folder_of_a_python_that_is_no_virtualenv_stays_on_the_childs_path(api_key: str, tmp_path: Path) -> None:
    base_python = os.path.realpath(sys.executable)  # a venv's python links to its base interpreter
    path = os.pathsep.join([os.path.dirname(base_python), str(tmp_path)])
    done = subprocess.run([base_python, str(REPO / "tokenroute.py"), "run", "--key", api_key, "--", sys.executable,
                           "-c", PRINT_PATH], env={"PATH": path, "HOME": str(tmp_path)},
                          capture_output=True, text=True, timeout=60)

    assert (done.returncode, done.stdout.strip()) == (0, path), done.stderr


@pytest.mark.parametrize("url", ["https://[fe80::1%lo]", "http://[fe80::1%25lo]:8080", "https://[FE80::1%eth0]:8443/"])
def test_a_gateway_url_with_an_ipv6_zone_id_is_refused(cli: Cli, api_key: str, tmp_path: Path, url: str) -> None:
    # A zone names this machine's interface: no name for a gateway, and not one spelling of it.
    marker = tmp_path / "started"
    by_flag = cli.run("env", "--api-url", url, "--key", api_key)
    by_env = script(cli, "run", "--key", api_key, "--", sys.executable, "-c", f"open({str(marker)!r}, 'w')",
                    env={"TOKENROUTE_API_URL": url})  # a subprocess: were it not refused, run would exec

    assert (by_flag.code, by_flag.out) == (1, "")
    assert by_flag.err.startswith("error: --api-url ") and by_flag.err.count("\n") == 1
    assert (by_env.code, by_env.out) == (1, "")
    assert by_env.err.startswith("error: TOKENROUTE_API_URL ") and by_env.err.count("\n") == 1
    assert tokenroute.canonical_url(url) is None and not marker.exists()


def test_an_in_process_run_can_never_exec_and_end_the_test_session(cli: Cli, api_key: str) -> None:
    # cli.run is main() inside pytest: an exec there would replace pytest and end the suite with status 0.
    with pytest.raises(AssertionError, match="would exec"):
        cli.run("run", "--key", api_key, "--", sys.executable, "-c", "pass")


@posix_only
def test_a_folder_named_like_the_command_on_path_is_no_command(cli: Cli, api_key: str, tmp_path: Path) -> None:
    (tmp_path / "first" / "tool-tr9").mkdir(parents=True)

    only_folder = script(cli, "run", "--key", api_key, "--", "tool-tr9", env={"PATH": str(tmp_path / "first")})
    (tmp_path / "second").mkdir()
    (tmp_path / "second" / "tool-tr9").write_text("#!/bin/sh\necho ran \"$0\"\n")
    (tmp_path / "second" / "tool-tr9").chmod(0o755)
    found_after = script(cli, "run", "--key", api_key, "--", "tool-tr9",
                         env={"PATH": os.pathsep.join([str(tmp_path / "first"), str(tmp_path / "second"), "/bin"])})

    assert (only_folder.code, only_folder.err) == (127, "error: tool-tr9: command not found\n")  # as bash says
    assert (found_after.code, found_after.out) == (0, f"ran {tmp_path / 'second' / 'tool-tr9'}\n")


@posix_only
def test_a_folder_named_by_path_says_it_is_a_folder(cli: Cli, api_key: str, tmp_path: Path) -> None:
    (tmp_path / "tool").mkdir()

    result = script(cli, "run", "--key", api_key, "--", "./tool", cwd=tmp_path)

    assert (result.code, result.out, result.err) == (126, "", "error: ./tool: cannot run it: Is a directory\n")


@posix_only
def test_run_takes_the_first_executable_file_on_path_as_a_shell_does(cli: Cli, api_key: str, tmp_path: Path) -> None:
    # A shell passes over a file it may not run; the one it runs has no #! line, so it runs under sh.
    for folder, mode in (("first", 0o644), ("second", 0o755)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "tool-tr9").write_text(f"echo {folder}\n")
        (tmp_path / folder / "tool-tr9").chmod(mode)
    path = os.pathsep.join([str(tmp_path / "first"), str(tmp_path / "second"), os.environ["PATH"]])

    result = script(cli, "run", "--key", api_key, "--", "tool-tr9", env={"PATH": path})

    assert (result.code, result.out, result.err) == (0, "second\n", "")


# ---------------------------------------------------------------- env --write


def write_env(cli: Cli, api_key: str, *args: str, cwd: Optional[Path] = None) -> Result:
    return script(cli, "env", "--write", *args, env={"TOKENROUTE_API_KEY": api_key}, cwd=cwd)


def two_lines(gateway: FakeGateway, key: str, eol: str = "\n") -> str:
    return f"OPENAI_API_KEY={key}{eol}OPENAI_BASE_URL={gateway.url}/v1{eol}"


def test_env_write_creates_dot_env_owner_only_and_says_so(cli: Cli, gateway: FakeGateway, api_key: str,
                                                         tmp_path: Path) -> None:
    result = write_env(cli, api_key, cwd=tmp_path)

    assert (result.code, result.out) == (0, "")
    private = " (readable only by you)" if os.name == "posix" else ""  # Windows: the folder's ACL, no mode
    assert result.err == f"Created .env{private} with OPENAI_API_KEY and OPENAI_BASE_URL\n"
    assert (tmp_path / ".env").read_text() == two_lines(gateway, api_key)
    if os.name == "posix":
        assert stat.S_IMODE((tmp_path / ".env").stat().st_mode) == 0o600
    assert api_key not in result.err


@pytest.mark.parametrize("hostile", ["url", "key"])
@pytest.mark.parametrize("exists", [True, False])
def test_env_write_leaves_the_file_alone_when_a_value_is_hostile(cli: Cli, api_key: str, tmp_path: Path,
                                                                 hostile: str, exists: bool) -> None:
    path = tmp_path / ".env"
    if exists:
        path.write_bytes(b"A=1\n")
    env = {"TOKENROUTE_API_URL": "https://gw.example/$(id)"} if hostile == "url" else {}
    key = api_key if hostile == "url" else api_key + "\nEVIL=1"

    result = cli.run("env", "--write", str(path), "--key", key, env=env)

    assert (result.code, result.out) == (1, "")
    assert result.err.startswith("error: ")
    assert (path.read_bytes() if exists else path.exists()) == (b"A=1\n" if exists else False)


MESSY = (
    b"# settings for the app\r\n"
    b"\r\n"
    b"export DEBUG=1\r\n"
    b"OPENAI_API_KEY=sk-tr-oldkey1\r\n"
    b'GREETING="hello # not a comment"\r\n'
    b"  export OPENAI_BASE_URL='https://old.example/v1'\r\n"
    b"NAME=caf\xc3\xa9\r\n"
    b"OPENAI_API_KEY=sk-tr-oldkey2\r\n"
    b"LAST=no-final-newline"
)


def test_env_write_changes_only_the_two_variables(cli: Cli, gateway: FakeGateway, api_key: str,
                                                  tmp_path: Path) -> None:
    path = tmp_path / "app.env"
    path.write_bytes(MESSY)

    result = write_env(cli, api_key, str(path))

    assert result.code == 0, result
    assert path.read_bytes() == (
        b"# settings for the app\r\n"
        b"\r\n"
        b"export DEBUG=1\r\n"
        + f"OPENAI_API_KEY={api_key}\r\n".encode()
        + b'GREETING="hello # not a comment"\r\n'
        + f"  export OPENAI_BASE_URL={gateway.url}/v1\r\n".encode()
        + b"NAME=caf\xc3\xa9\r\n"
        b"LAST=no-final-newline\r\n"
    )
    assert result.err == (f"Updated {path}: OPENAI_API_KEY replaced, 1 older OPENAI_API_KEY removed, "
                          "OPENAI_BASE_URL replaced\n")


def test_env_write_twice_leaves_the_file_byte_identical(cli: Cli, gateway: FakeGateway, api_key: str,
                                                        tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_bytes(MESSY)
    write_env(cli, api_key, str(path))
    first = path.read_bytes()

    again = write_env(cli, api_key, str(path))

    assert again.code == 0
    assert path.read_bytes() == first
    assert again.err == f"{path} already has OPENAI_API_KEY and OPENAI_BASE_URL; unchanged\n"


def test_env_write_appends_after_a_line_without_newline(cli: Cli, gateway: FakeGateway, api_key: str,
                                                        tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text("EXISTING=1")

    assert write_env(cli, api_key, str(path)).code == 0
    assert path.read_text() == "EXISTING=1\n" + two_lines(gateway, api_key)


@posix_only
def test_env_write_keeps_the_mode_of_an_existing_file_and_replaces_it_atomically(
        cli: Cli, gateway: FakeGateway, api_key: str, tmp_path: Path) -> None:
    folder = tmp_path / "app"
    folder.mkdir()
    path = folder / ".env"
    path.write_text("A=1\n")
    path.chmod(0o640)
    inode = path.stat().st_ino

    assert write_env(cli, api_key, str(path)).code == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert path.stat().st_ino != inode  # a new file renamed over the old one, not rewritten in place
    assert sorted(p.name for p in folder.iterdir()) == [".env"]  # no temporary file left


def app_dotenv(tmp_path: Path) -> Path:
    """An app's folder with a .env of one line."""
    (tmp_path / "app").mkdir()
    path = tmp_path / "app" / ".env"
    path.write_text("A=1\n")
    return path


def test_ctrl_c_mid_write_leaves_no_copy_of_the_key_beside_the_file(cli: Cli, api_key: str, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy under a name no `.env` ignore rule covers would be committed with `git add -A`."""
    path = app_dotenv(tmp_path)
    folder = path.parent

    def interrupted(fd: int) -> None:  # Ctrl-C arrives while the new bytes go to disk
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    result = cli.run("env", "--write", str(path), env={"TOKENROUTE_API_KEY": api_key})

    assert result.code == 130
    assert sorted(p.name for p in folder.iterdir()) == [".env"] and path.read_text() == "A=1\n"


@posix_only
def test_a_signal_mid_write_acts_once_the_file_is_replaced(cli: Cli, api_key: str, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM (a container stopping, a CI job cancelled) cannot be caught as Ctrl-C is: it waits."""
    path = app_dotenv(tmp_path)
    folder = path.parent
    seen: list[list[str]] = []  # the folder as the signal's handler finds it
    previous = signal.signal(signal.SIGTERM, lambda number, frame: seen.append(sorted(os.listdir(folder))))
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the new bytes go to disk
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    try:
        result = cli.run("env", "--write", str(path), env={"TOKENROUTE_API_KEY": api_key})
    finally:
        signal.signal(signal.SIGTERM, previous)

    assert seen == [[".env"]] and api_key in path.read_text()
    assert f"warning: finishing with {path} first: no copy of it is left beside it, and git's check is said" in result.err


@posix_only
def test_env_write_updates_a_symlinked_file_at_its_target(cli: Cli, gateway: FakeGateway, api_key: str,
                                                          tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "app.env").write_text("A=1\n")
    (tmp_path / ".env").symlink_to(shared / "app.env")

    assert write_env(cli, api_key, cwd=tmp_path).code == 0
    assert (tmp_path / ".env").is_symlink()
    assert (shared / "app.env").read_text() == "A=1\n" + two_lines(gateway, api_key)
    assert sorted(p.name for p in shared.iterdir()) == ["app.env"]


def test_env_write_refuses_a_utf16_file_and_leaves_it(cli: Cli, api_key: str, tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_bytes("A=1\r\n".encode("utf-16"))

    result = write_env(cli, api_key, str(path))

    assert result.code == 1
    assert "UTF-16" in result.err
    assert path.read_bytes() == "A=1\r\n".encode("utf-16")


def test_env_write_json_reports_the_file_not_the_key(cli: Cli, api_key: str, tmp_path: Path) -> None:
    path = tmp_path / ".env"
    result = cli.run("env", "--write", str(path), "--json", env={"TOKENROUTE_API_KEY": api_key})

    assert result.code == 0
    assert result.json() == {"path": str(path), "created": True, "changed": True}
    assert api_key not in result.out + result.err


def test_env_write_refuses_other_formats(cli: Cli, api_key: str, tmp_path: Path) -> None:
    result = cli.run("env", "--write", str(tmp_path / ".env"), "--shell", "fish", env={"TOKENROUTE_API_KEY": api_key})

    assert (result.code, result.out) == (1, "")
    assert not (tmp_path / ".env").exists()


GIT = shutil.which("git")


@pytest.mark.skipif(GIT is None, reason="git is not installed")
@pytest.mark.parametrize("ignored", [False, True])
def test_env_write_warns_when_git_would_commit_the_key(cli: Cli, api_key: str, tmp_path: Path,
                                                       ignored: bool) -> None:
    subprocess.run([GIT, "init", "-q", str(tmp_path)], check=True)
    if ignored:
        (tmp_path / ".gitignore").write_text(".env\n")

    result = write_env(cli, api_key, cwd=tmp_path)

    assert result.code == 0
    warned = "warning: .env holds an API key and git does not ignore it; add it to .gitignore\n" in result.err
    assert warned != ignored


@pytest.mark.skipif(GIT is None, reason="git is not installed")
@pytest.mark.parametrize("listed", [False, True])
def test_env_write_warns_when_git_already_tracks_the_file(cli: Cli, api_key: str, tmp_path: Path,
                                                          listed: bool) -> None:
    def git(*words: str) -> None:
        subprocess.run([GIT, "-c", "user.name=t", "-c", "user.email=t@example.com", *words], cwd=tmp_path,
                       check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / ".env").write_text("A=1\n")
    git("add", ".env")
    if listed:  # too late: .gitignore does not untrack a tracked file
        (tmp_path / ".gitignore").write_text(".env\n")

    result = write_env(cli, api_key, cwd=tmp_path)

    assert result.code == 0, result
    advice = "untrack it with `git rm --cached .env`" + ("" if listed else " and add it to .gitignore")
    assert result.err.splitlines()[-1] == f"warning: .env holds an API key and git tracks it; {advice}"


@posix_only
def test_env_write_says_when_git_was_stopped_before_it_could_answer(cli: Cli, api_key: str, tmp_path: Path) -> None:
    """Ctrl-C at a terminal reaches the whole process group: git dies of it while tokenroute
    finishes the write; silence would read as "git does not track it"."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "git").write_text("#!/bin/sh\nkill -INT $$\n")  # a git that the signal stops
    (bin_dir / "git").chmod(0o755)
    app = tmp_path / "app"
    (app / ".git").mkdir(parents=True)

    result = cli.run("env", "--write", str(app / ".env"), env={"TOKENROUTE_API_KEY": api_key, "PATH": str(bin_dir)})

    assert result.code == 0
    assert result.err.splitlines()[-1] == (f"warning: could not check whether git tracks {app / '.env'} "
                                           "(git: no answer); make sure it is not committed")


@pytest.mark.skipif(GIT is None, reason="git is not installed")
def test_env_write_says_nothing_of_git_for_a_file_git_never_commits(cli: Cli, api_key: str, tmp_path: Path) -> None:
    subprocess.run([GIT, "init", "-q", str(tmp_path)], check=True)

    result = cli.run("env", "--write", str(tmp_path / ".git" / "x.env"), env={"TOKENROUTE_API_KEY": api_key})

    assert result.code == 0 and "warning" not in result.err, result


def test_env_write_says_nothing_about_git_where_git_is_missing(cli: Cli, api_key: str, tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    subprocess.run([GIT or "true", "init", "-q", str(tmp_path)], check=False)

    result = script(cli, "env", "--write", env={"TOKENROUTE_API_KEY": api_key, "PATH": str(empty)}, cwd=tmp_path)

    assert result.code == 0, result
    assert "warning" not in result.err


# ---- the readers: what env --write leaves is read the same by each


def read_with_python_dotenv(text: str) -> dict[str, str]:
    """python-dotenv itself where it is installed (the README's test command installs it), else its rules."""
    if dotenv is None:
        return read_like_python_dotenv(text)
    return {name: value or "" for name, value in dotenv.dotenv_values(stream=io.StringIO(text)).items()}


def read_like_python_dotenv(text: str) -> dict[str, str]:
    """python-dotenv's rules for one-line values: `export`, quotes (escapes in double ones), ` #` comments."""
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        name, value = line.split("=", 1)
        name = re.sub(r"^export\s+", "", name.strip())
        value = value.strip()
        if value[:1] in ("'", '"'):
            end = value.index(value[0], 1)
            value = value[1:end].encode().decode("unicode_escape") if value[0] == '"' else value[1:end]
        else:
            value = value.split(" #", 1)[0].strip()
        values[name] = value
    return values


def read_like_docker(text: str) -> dict[str, str]:
    """docker --env-file: `NAME=value` taken literally, `#` lines skipped, no `export`."""
    values = {}
    for line in text.splitlines():
        line = line.lstrip()
        if not line or line.startswith("#"):
            continue
        name, _, value = line.partition("=")
        assert not re.search(r"\s", name), f"docker refuses {line!r}"
        values[name] = value
    return values


def read_with_node(path: Path) -> dict[str, str]:
    program = "console.log(JSON.stringify({k: process.env.OPENAI_API_KEY, u: process.env.OPENAI_BASE_URL}))"
    done = subprocess.run(["node", f"--env-file={path}", "-e", program], capture_output=True, text=True, timeout=30,
                          env={k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")})
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    return {"OPENAI_API_KEY": found["k"], "OPENAI_BASE_URL": found["u"]}


def read_with_sh(path: Path) -> dict[str, str]:
    done = subprocess.run(["sh", "-c", 'set -a; . "$1"; printf "%s\\n%s\\n" "$OPENAI_API_KEY" "$OPENAI_BASE_URL"',
                           "sh", str(path)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    key, url = done.stdout.splitlines()
    return {"OPENAI_API_KEY": key, "OPENAI_BASE_URL": url}


READERS_START = (
    "# app settings\n\nexport DEBUG=1\nOPENAI_API_KEY=sk-tr-stale1\nGREETING='hi there'\n"
    "OPENAI_BASE_URL=https://old.example/v1\nOPENAI_API_KEY=sk-tr-stale2\n"
)
DOCKER_START = "# app settings\n\nDEBUG=1\nOPENAI_API_KEY=sk-tr-stale1\nOPENAI_API_KEY=sk-tr-stale2\nLAST=1"


@pytest.mark.parametrize("reader", ["python-dotenv", "node --env-file", "sh", "docker --env-file"])
def test_env_write_output_is_read_the_same_by_every_reader(cli: Cli, gateway: FakeGateway, api_key: str,
                                                           tmp_path: Path, reader: str) -> None:
    if reader == "node --env-file" and shutil.which("node") is None:
        pytest.skip("node is not installed")
    if reader == "sh" and os.name != "posix":
        pytest.skip("no sh")
    path = tmp_path / ".env"
    path.write_text(DOCKER_START if reader == "docker --env-file" else READERS_START)

    assert write_env(cli, api_key, str(path)).code == 0
    text = path.read_text()
    read = {
        "python-dotenv": lambda: read_with_python_dotenv(text),
        "docker --env-file": lambda: read_like_docker(text),
        "node --env-file": lambda: read_with_node(path),
        "sh": lambda: read_with_sh(path),
    }[reader]()

    assert {name: read[name] for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL")} == {
        "OPENAI_API_KEY": api_key, "OPENAI_BASE_URL": gateway.url + "/v1"}
    assert text.count("OPENAI_API_KEY=") == 1 and text.endswith("\n")


MULTI_LINE = (
    'CERT="-----BEGIN CERTIFICATE-----\n'
    'OPENAI_API_KEY=sk-tr-inside1\n'
    '-----END CERTIFICATE-----"\n'
    "NOTE='it spans\n"
    "  export OPENAI_BASE_URL=https://inside.example/v1\n"
    "two lines'\n"
    'OPENAI_API_KEY="sk-tr-old\n'
    'OPENAI_BASE_URL=still-the-old-value"\n'
    "UNCLOSED='no end\n"
    "AFTER=1\n"
)


def test_env_write_leaves_lines_inside_a_multi_line_quoted_value_alone(cli: Cli, gateway: FakeGateway,
                                                                       api_key: str, tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text(MULTI_LINE)

    assert write_env(cli, api_key, str(path)).code == 0
    text = path.read_text()

    assert text == (
        MULTI_LINE[:MULTI_LINE.index('OPENAI_API_KEY="sk-tr-old')]  # CERT and NOTE byte for byte
        + f"OPENAI_API_KEY={api_key}\n"  # the old value's two lines replaced as one
        + "UNCLOSED='no end\nAFTER=1\n"
        + f"OPENAI_BASE_URL={gateway.url}/v1\n"
    )
    if dotenv is not None:  # the hand-written reader knows no multi-line values: python-dotenv must agree
        read = read_with_python_dotenv(text)
        assert (read["OPENAI_API_KEY"], read["OPENAI_BASE_URL"]) == (api_key, gateway.url + "/v1")
        before = read_with_python_dotenv(MULTI_LINE)
        assert (read["CERT"], read["NOTE"]) == (before["CERT"], before["NOTE"])
        assert "OPENAI_API_KEY=sk-tr-inside1" in read["CERT"]


def python_dotenv_reads_as_today() -> bool:
    """python-dotenv 1.2.3+: the rules env --write follows (pip installs it on Python 3.10+; 3.9 gets 1.2.1)."""
    if dotenv is None:
        return False
    from importlib.metadata import version

    return tuple(int(part) for part in version("python-dotenv").split(".")[:3] if part.isdigit()) >= (1, 2, 3)


def read_with_each(path: Path) -> dict[str, dict[str, str]]:
    """The two variables as python-dotenv (1.2.3+) and node --env-file read the file, where they are installed."""
    readers = {}
    if python_dotenv_reads_as_today():
        read = read_with_python_dotenv(path.read_bytes().decode("utf-8"))
        readers["python-dotenv"] = {name: read.get(name, "") for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    if shutil.which("node"):
        readers["node"] = read_with_node(path)
    return readers


@pytest.mark.parametrize("start", [
    b"\xef\xbb\xbfOPENAI_API_KEY=sk-tr-stale1\r\nDEBUG=1\r\n",  # Notepad's UTF-8; node reads the mark into the name
    b"\xef\xbb\xbf# app settings\r\nOPENAI_API_KEY=sk-tr-stale1\r\n",  # node runs "\ufeff# ..." into the next name
    b'DATA_DIR="C:\\\\data\\\\"\nOPENAI_API_KEY=sk-tr-stale1\nGREETING="hi"\n',  # ends at its last quote
    b"'OPENAI_API_KEY'=sk-tr-stale1\nexport  OPENAI_BASE_URL = https://old.example/v1\n",
], ids=["byte-order mark", "byte-order mark before a comment", "backslash before the closing quote",
        "python-dotenv's quoted name"])
def test_env_write_replaces_the_key_where_todays_readers_read_it(cli: Cli, gateway: FakeGateway, api_key: str,
                                                                  tmp_path: Path, start: bytes) -> None:
    path = tmp_path / ".env"
    path.write_bytes(start)

    result = write_env(cli, api_key, str(path))

    assert result.code == 0, result
    text = path.read_bytes()
    assert text.count(b"OPENAI_API_KEY=") == 1 and b"stale" not in text
    assert not text.startswith(b"\xef\xbb\xbf")  # neither reader needs it; node reads it into the first line
    read = read_with_each(path)
    assert read == {reader: {"OPENAI_API_KEY": api_key, "OPENAI_BASE_URL": gateway.url + "/v1"} for reader in read}
    again = write_env(cli, api_key, str(path))
    assert (again.code, path.read_bytes()) == (0, text)  # read back as it was written


def test_env_write_points_an_old_clients_openai_api_base_at_the_gateway_too(cli: Cli, gateway: FakeGateway,
                                                                             api_key: str, tmp_path: Path) -> None:
    # LangChain reads OPENAI_API_BASE before OPENAI_BASE_URL: left as it was, it would take the key to OpenAI.
    path = tmp_path / ".env"
    path.write_text("OPENAI_API_BASE=https://api.openai.com/v1\nOPENAI_API_KEY=sk-proj-old\n")

    result = write_env(cli, api_key, str(path))

    assert result.code == 0, result
    assert path.read_text() == (f"OPENAI_API_BASE={gateway.url}/v1\nOPENAI_API_KEY={api_key}\n"
                                f"OPENAI_BASE_URL={gateway.url}/v1\n")
    assert result.err == f"Updated {path}: OPENAI_API_KEY replaced, OPENAI_BASE_URL added, OPENAI_API_BASE replaced\n"


@pytest.mark.parametrize("start", [
    b"NOTE=`two\nOPENAI_API_KEY=sk-tr-stale1\nlines`\n",  # node reads a backtick value over lines
    b'DATA_DIR="C:\\data\\"\nOPENAI_API_KEY=sk-tr-stale1\nGREETING="hi"\n',  # python-dotenv: \" goes on
], ids=["backticks", "one backslash before the closing quote"])
def test_env_write_refuses_a_file_python_dotenv_and_node_read_differently(cli: Cli, api_key: str, tmp_path: Path,
                                                                          start: bytes) -> None:
    path = tmp_path / ".env"
    path.write_bytes(start)

    result = write_env(cli, api_key, str(path))

    assert (result.code, result.out) == (1, "")
    assert result.err.startswith(f"error: python-dotenv and node --env-file read line 1 of {path} differently")
    assert path.read_bytes() == start


@posix_only
@pytest.mark.parametrize("kind", ["FIFO", "folder", "device", "/dev/stdout"])
def test_env_write_refuses_anything_but_a_file_before_reading_it(cli: Cli, api_key: str, tmp_path: Path,
                                                                 kind: str) -> None:
    target = tmp_path / "target"
    if kind == "FIFO":
        os.mkfifo(target)  # no writer: opening it to read would wait forever
    elif kind == "folder":
        target.mkdir()
    elif kind == "device":
        if not hasattr(os, "mknod") or os.geteuid() != 0:
            pytest.skip("making a device node needs root")
        os.mknod(target, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # another /dev/null
    before = target.lstat() if kind != "/dev/stdout" else None
    name = "/dev/stdout" if kind == "/dev/stdout" else str(target)

    result = write_env(cli, api_key, name)  # stdout: a pipe to the test

    assert (result.code, result.out) == (1, "")
    if kind == "/dev/stdout":
        assert result.err == ("error: /dev/stdout names a file a process holds open, not a file to update; "
                              "give the file's own path\n")
    else:
        assert result.err == f"error: {name} is not a regular file; --write updates a file (or a symlink to one)\n"
    if before is not None:
        assert stat.S_IFMT(target.lstat().st_mode) == stat.S_IFMT(before.st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["home"] if kind == "/dev/stdout" else ["home", "target"])


@posix_modes
def test_env_write_under_umask_077_keeps_a_0640_file_0640(cli: Cli, api_key: str, tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text("A=1\n")
    path.chmod(0o640)

    done = subprocess.run([console_script(), "env", "--write", str(path)], capture_output=True, text=True, timeout=60,
                          env=cli.process_env({"TOKENROUTE_API_KEY": api_key}), preexec_fn=lambda: os.umask(0o077))

    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert api_key in path.read_text()


AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.mark.skipif(not AS_ROOT, reason="giving a file to another user needs root (sudo tokenroute env --write)")
def test_sudo_env_write_keeps_the_apps_owner_group_and_mode(cli: Cli, gateway: FakeGateway, api_key: str,
                                                            tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text("A=1\n")
    os.chown(path, 4321, 8765)  # app:www-data, say
    path.chmod(0o640)

    result = write_env(cli, api_key, str(path))

    assert result.code == 0, result
    status = path.stat()
    assert (status.st_uid, status.st_gid, stat.S_IMODE(status.st_mode)) == (4321, 8765, 0o640)
    assert path.read_text() == "A=1\n" + two_lines(gateway, api_key)


SETPRIV = shutil.which("setpriv")


@pytest.mark.skipif(not AS_ROOT or SETPRIV is None, reason="needs root, and setpriv to drop its right to give files away")
def test_env_write_that_cannot_keep_the_owner_changes_nothing(cli: Cli, api_key: str, tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text("A=1\nOPENAI_API_KEY=sk-tr-old\n")
    os.chown(path, 4321, 8765)
    path.chmod(0o640)
    before = path.stat()
    # Root without CAP_CHOWN: it may write the folder, but not give a new file to the app's user.
    argv = [SETPRIV, "--inh-caps=-chown", "--bounding-set=-chown", console_script(), "env", "--write", str(path)]

    done = subprocess.run(argv, env=cli.process_env({"TOKENROUTE_API_KEY": api_key}), capture_output=True, text=True,
                          timeout=60)

    assert (done.returncode, done.stdout) == (1, ""), done.stderr
    assert done.stderr == (f"error: cannot update {path} and keep its owner and group (4321:8765): "
                           "run this as its owner, or as root; the file is unchanged\n")
    assert (path.read_text(), path.stat().st_ino, path.stat().st_uid) == ("A=1\nOPENAI_API_KEY=sk-tr-old\n",
                                                                          before.st_ino, 4321)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".env", "home"]  # no temporary file left


@pytest.mark.skipif(GIT is None, reason="git is not installed")
def test_env_write_runs_no_command_the_repositorys_git_config_names(cli: Cli, api_key: str, tmp_path: Path) -> None:
    subprocess.run([GIT, "init", "-q", str(tmp_path)], check=True)
    marker = tmp_path / "ran"
    hook = tmp_path / "fsmonitor.sh"
    hook.write_text(f"#!/bin/sh\ncat .env >> {marker}\n")  # what a hostile clone's config could do
    hook.chmod(0o755)
    subprocess.run([GIT, "-C", str(tmp_path), "config", "core.fsmonitor", str(hook)], check=True)

    result = write_env(cli, api_key, cwd=tmp_path)

    assert result.code == 0, result
    assert "git does not ignore it; add it to .gitignore" in result.err  # git still ran
    assert not marker.exists()


@posix_only
@pytest.mark.skipif(GIT is None, reason="git is not installed")
def test_env_write_never_runs_a_git_found_in_the_current_folder(cli: Cli, api_key: str, tmp_path: Path) -> None:
    planted = tmp_path / "git"
    planted.write_text(f"#!/bin/sh\ntouch {tmp_path / 'ran'}\n")
    planted.chmod(0o755)
    path = os.pathsep.join([".", os.path.dirname(GIT)])  # Windows' Python < 3.12 looks in "." without it

    result = script(cli, "env", "--write", env={"TOKENROUTE_API_KEY": api_key, "PATH": path}, cwd=tmp_path)

    assert result.code == 0, result
    assert not (tmp_path / "ran").exists()


# ---- node 20's --env-file: a line without `=` runs into the next line's name


def read_with_node_parser(texts: list[str]) -> list[dict[str, str]]:
    """What node's --env-file parser (util.parseEnv runs the same code) reads from each text."""
    program = ("const u = require('util'); const texts = JSON.parse(require('fs').readFileSync(0, 'utf8'));"
               "console.log(JSON.stringify(texts.map((t) => u.parseEnv(t))))")
    done = subprocess.run(["node", "-e", program], input=json.dumps(texts), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def node_has_parse_env() -> bool:
    if shutil.which("node") is None:
        return False
    done = subprocess.run(["node", "-e", "process.exit(typeof require('util').parseEnv === 'function' ? 0 : 1)"],
                          capture_output=True, timeout=30)
    return done.returncode == 0


@pytest.mark.parametrize("start", [
    b"\xef\xbb\xbf# OpenAI settings\r\nOPENAI_API_KEY=sk-proj-old\r\n",  # node: no comment, "\ufeff# ..." is a name
    b"A=1\n   ",  # the appended key would follow a line of spaces
    b"A=1\n  # the key\nOPENAI_API_KEY=sk-proj-old\n",
    b"A=1\n \t\n\nOPENAI_API_KEY=sk-proj-old\n",
    b"\tOPENAI_API_KEY=sk-proj-old\n",  # node reads the tab as part of the name
    b"OPENAI_API_KEY=sk-proj-old\nOPENAI_API_KEY\n",  # python-dotenv: a bare name sets it to nothing
], ids=["byte-order mark before a comment", "spaces last", "indented comment", "blank line of spaces and tabs",
        "tab before the name", "bare name"])
def test_env_write_leaves_no_line_that_hides_the_key_from_node_or_python_dotenv(
        cli: Cli, gateway: FakeGateway, api_key: str, tmp_path: Path, start: bytes) -> None:
    path = tmp_path / ".env"
    path.write_bytes(start)

    result = write_env(cli, api_key, str(path))

    assert result.code == 0, result
    read = read_with_each(path)
    assert read == {reader: {"OPENAI_API_KEY": api_key, "OPENAI_BASE_URL": gateway.url + "/v1"} for reader in read}
    assert b"sk-proj-old" not in path.read_bytes()
    again = write_env(cli, api_key, str(path))
    assert again.err.endswith("unchanged\n")  # read back as it was written


def test_env_write_refuses_a_line_node_reads_into_the_keys_name(cli: Cli, api_key: str, tmp_path: Path) -> None:
    path = tmp_path / ".env"
    start = b"A=1\nsome words\nOPENAI_API_KEY=sk-proj-old\n"
    path.write_bytes(start)

    result = write_env(cli, api_key, str(path))

    assert (result.code, result.out) == (1, "")
    assert result.err == (f"error: node --env-file reads line 2 of {path}, which has no `=`, into the name of the "
                          "variable after it; make that line a comment (`#` first) or remove it, then run this again\n")
    assert path.read_bytes() == start


DOTENV_PIECES = ["OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_API_BASE", "A", "export ", "export\t", " ", "\t", "=",
                 "=sk-proj-old", "#", " # c", "'", '"', "`", "\\", "\n", "\n", "\r\n", "\r", "x", "\ufeff", "word",
                 "OPENAI_API_KEY=sk-proj-old\n", '\nCERT="a\nb"\n', "\n  # c\n", "\n   \n"]


@pytest.mark.skipif(not python_dotenv_reads_as_today() or not node_has_parse_env(),
                    reason="needs python-dotenv 1.2.3+ and node 20.12+ (util.parseEnv)")
def test_whatever_the_file_env_write_leaves_both_readers_reading_the_gateway_or_refuses(gateway: FakeGateway) -> None:
    import random

    rng = random.Random(15)
    variables = {"OPENAI_API_KEY": "sk-tr-" + "n" * 32, "OPENAI_BASE_URL": gateway.url + "/v1"}
    written = []
    for _ in range(1500):
        start = "".join(rng.choice(DOTENV_PIECES) for _ in range(rng.randint(1, 12))).encode()
        try:
            written.append(tokenroute.updated_env_file(".env", start, variables)[0].decode())
        except tokenroute.CliError as refused:
            assert "line" in refused.message
    by_node = read_with_node_parser(written)

    wrong = [text for text, node in zip(written, by_node)
             if any(node.get(name) != value or read_with_python_dotenv(text).get(name) != value
                    for name, value in variables.items())]
    assert len(written) > 300 and wrong == []


def test_env_write_warns_when_the_environment_sets_the_key_too(cli: Cli, api_key: str, tmp_path: Path) -> None:
    # node --env-file and load_dotenv() keep what the environment has: the real key would go to the gateway.
    result = script(cli, "env", "--write", str(tmp_path / ".env"),
                    env={"TOKENROUTE_API_KEY": api_key, "OPENAI_API_KEY": "sk-proj-REAL"})

    assert result.code == 0, result
    assert result.err.splitlines()[-1] == (
        "warning: OPENAI_API_KEY is also set in this environment, and node --env-file and python-dotenv's "
        "load_dotenv() keep that over the file's; unset it, or use `tokenroute run`")
    assert "sk-proj-REAL" not in result.err


# ---- what replacing the file would lose, or replace


class SwapAfterStat:
    """os.stat that lets `swap` replace the file right after it was looked at, as another process may."""

    def __init__(self, path: Path, swap: Any) -> None:
        self.path, self.swap, self.stat = str(path), swap, os.stat

    def __call__(self, path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        status = self.stat(path, *args, **kwargs)
        if str(path) == self.path and self.swap is not None:
            swap, self.swap = self.swap, None
            return swap(status)
        return status


@posix_only
def test_env_write_refuses_a_fifo_swapped_in_under_a_reused_inode_number(cli: Cli, api_key: str, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / ".env"
    path.write_text("A=1\n")

    def swap(status: os.stat_result) -> os.stat_result:
        path.unlink()
        os.mkfifo(path)
        fifo = os.lstat(path)  # ext4 hands a freed inode number out again at once: say it did
        return os.stat_result((status.st_mode, fifo.st_ino, fifo.st_dev, *status[3:10]))

    monkeypatch.setattr(os, "stat", SwapAfterStat(path, swap))
    result = cli.run("env", "--write", str(path), env={"TOKENROUTE_API_KEY": api_key})
    monkeypatch.undo()

    assert (result.code, result.err) == (1, f"error: {path} was replaced while it was read; run this again\n")
    assert stat.S_ISFIFO(path.lstat().st_mode)


def test_env_write_refuses_a_file_removed_after_it_was_looked_at(cli: Cli, api_key: str, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / ".env"
    path.write_text("A=1\nOPENAI_API_KEY=sk-proj-old\n")

    def remove(status: os.stat_result) -> os.stat_result:
        path.unlink()  # an editor saving it by rename, between the look and the open
        return status

    monkeypatch.setattr(os, "stat", SwapAfterStat(path, remove))
    result = cli.run("env", "--write", str(path), env={"TOKENROUTE_API_KEY": api_key})
    monkeypatch.undo()

    assert (result.code, result.err) == (1, f"error: {path} was replaced while it was read; run this again\n")
    assert not path.exists()  # not created anew as if there had been none


@posix_only
@pytest.mark.parametrize("name", ["/dev/stdout", "/dev/fd/1", "/proc/self/fd/1", "link to /dev/stdout"])
def test_env_write_refuses_a_process_s_open_file_even_when_it_is_a_file(cli: Cli, api_key: str, tmp_path: Path,
                                                                        name: str) -> None:
    if name.startswith("/proc") and not Path("/proc/self/fd").is_dir():
        pytest.skip("no /proc")
    log = tmp_path / "out.log"
    log.write_text("earlier output\n")
    if name.startswith("link"):
        (tmp_path / ".env").symlink_to("/dev/stdout")
        name = str(tmp_path / ".env")
    with log.open("ab") as stdout:  # `tokenroute env --write /dev/stdout >> out.log`
        done = subprocess.run([console_script(), "env", "--write", name], stdout=stdout, stderr=subprocess.PIPE,
                              text=True, env=cli.process_env({"TOKENROUTE_API_KEY": api_key}), timeout=60)

    assert done.returncode == 1
    assert done.stderr.startswith(f"error: {name} names a file a process holds open")
    assert log.read_text() == "earlier output\n"  # not replaced by a .env under the shell that holds it


@posix_only
def test_env_write_refuses_a_hard_linked_file(cli: Cli, api_key: str, tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text("OPENAI_API_KEY=sk-proj-old\n")
    os.link(path, tmp_path / "backup.env")

    result = write_env(cli, api_key, str(path))

    assert (result.code, result.out) == (1, "")
    assert result.err == (f"error: {path} has 2 hard links: replacing it would leave the old key under its other "
                          "names; remove the other links (or edit the file by hand), then run this again\n")
    assert path.read_text() == (tmp_path / "backup.env").read_text() == "OPENAI_API_KEY=sk-proj-old\n"


@pytest.mark.skipif(not hasattr(os, "setxattr"), reason="no extended attributes here (Linux only)")
def test_env_write_refuses_a_file_whose_extended_attributes_would_be_lost(cli: Cli, api_key: str,
                                                                          tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text("A=1\n")
    try:
        os.setxattr(path, "user.origin", b"vault")
    except OSError as exc:
        pytest.skip(f"the file system takes no user extended attributes: {exc}")

    result = write_env(cli, api_key, str(path))

    assert (result.code, result.out) == (1, "")
    assert result.err == (f"error: {path} has extended attributes (user.origin) that replacing it would lose (an "
                          "ACL among them is one); edit the file by hand, or remove them and run this again\n")
    assert (path.read_text(), os.getxattr(path, "user.origin")) == ("A=1\n", b"vault")


UNSHARE, MOUNT = shutil.which("unshare"), shutil.which("mount")


@pytest.mark.skipif(UNSHARE is None or MOUNT is None or not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="a bind mount needs root, unshare and mount")
def test_env_write_on_a_bind_mounted_file_says_where_to_edit_it(cli: Cli, api_key: str, tmp_path: Path) -> None:
    source, mounted = tmp_path / "secrets.env", tmp_path / ".env"
    source.write_text("A=1\n")
    mounted.write_text("")
    program = 'mount --bind "$1" "$2" && exec "$3" env --write "$2"'  # `docker run -v ./secrets.env:/app/.env`
    done = subprocess.run([UNSHARE, "-m", "sh", "-c", program, "sh", str(source), str(mounted), console_script()],
                          env=cli.process_env({"TOKENROUTE_API_KEY": api_key}), capture_output=True, text=True,
                          timeout=60)
    if "mount" in done.stderr and done.returncode != 1:
        pytest.skip(f"cannot bind mount here: {done.stderr}")

    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == (f"error: cannot write {mounted}: Device or resource busy (it is a mount point: edit it "
                           "where it is mounted from)\n")
    assert source.read_text() == "A=1\n"


def test_env_write_refuses_a_file_too_big_to_be_a_dotenv_file(cli: Cli, api_key: str, tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    path.write_bytes(b"A=1\n" * 300_000)  # 1.2 MB

    result = write_env(cli, api_key, str(path))

    assert (result.code, result.err) == (1, f"error: {path} is over 1 MB: not a dotenv file\n")
    assert path.stat().st_size == 1_200_000


def root_without_chown(groups: list[int]) -> list[str]:
    """The argv prefix that runs a command as root with these groups but no right to give files away:
    as a user is, for a file of its own."""
    assert SETPRIV is not None
    return [SETPRIV, "--inh-caps=-chown", "--bounding-set=-chown", f"--groups={','.join(map(str, groups))}"]


@posix_modes
def test_a_users_env_write_keeps_the_files_group_when_it_is_not_their_first(cli: Cli, gateway: FakeGateway,
                                                                             api_key: str, tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text("A=1\n")
    path.chmod(0o640)
    if AS_ROOT and SETPRIV is not None:
        prefix, group = root_without_chown([0, 8765]), 8765  # 0 first, as a user's own group is
    else:
        others = [number for number in os.getgroups() if number != os.getegid()]
        if AS_ROOT or not others:
            pytest.skip("needs root and setpriv, or a user with a group besides the first")
        prefix, group = [], others[0]
    os.chown(path, -1, group)  # the group a service reads it by

    done = subprocess.run([*prefix, console_script(), "env", "--write", str(path)], capture_output=True, text=True,
                          env=cli.process_env({"TOKENROUTE_API_KEY": api_key}), timeout=60)

    assert done.returncode == 0, done.stderr
    assert (path.stat().st_gid, stat.S_IMODE(path.stat().st_mode)) == (group, 0o640)
    assert path.read_text() == "A=1\n" + two_lines(gateway, api_key)


@pytest.mark.skipif(not AS_ROOT or SETPRIV is None, reason="needs root, and setpriv to drop its right to give files away")
def test_env_write_says_when_the_files_group_is_not_one_of_the_users(cli: Cli, api_key: str, tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text("A=1\n")
    os.chown(path, 0, 8765)  # the user's own file, in a group the user is not in

    done = subprocess.run([*root_without_chown([0]), console_script(), "env", "--write", str(path)],
                          capture_output=True, text=True, env=cli.process_env({"TOKENROUTE_API_KEY": api_key}),
                          timeout=60)

    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == (f"error: cannot update {path} and keep its group: its group 8765 is not one of yours; "
                           "run this as root, or as a member of that group; the file is unchanged\n")
    assert (path.read_text(), path.stat().st_gid) == ("A=1\n", 8765)


# ---- the git check


@pytest.mark.skipif(GIT is None, reason="git is not installed")
def test_env_write_says_when_git_cannot_tell_whether_it_tracks_the_file(cli: Cli, api_key: str,
                                                                        tmp_path: Path) -> None:
    (tmp_path / ".git").write_text("gitdir: /nonexistent/repository\n")  # a work tree git cannot read

    result = write_env(cli, api_key, cwd=tmp_path)

    assert result.code == 0, result
    assert result.err.splitlines()[-1] == ("warning: could not check whether git tracks .env (git: not a git "
                                           "repository: /nonexistent/repository); make sure it is not committed")


@pytest.mark.skipif(GIT is None, reason="git is not installed")
def test_env_write_asks_git_about_the_files_own_repository_whatever_git_dir_says(cli: Cli, api_key: str,
                                                                                 tmp_path: Path) -> None:
    app, other = tmp_path / "app", tmp_path / "other"
    for folder in (app, other):
        subprocess.run([GIT, "init", "-q", str(folder)], check=True)
    (other / ".gitignore").write_text(".env\n")

    result = script(cli, "env", "--write", env={"TOKENROUTE_API_KEY": api_key, "GIT_DIR": str(other / ".git"),
                                                 "GIT_WORK_TREE": str(other)}, cwd=app)

    assert result.code == 0, result
    assert result.err.splitlines()[-1] == "warning: .env holds an API key and git does not ignore it; add it to .gitignore"


# ---------------------------------------------------------------- help and usage errors


def test_no_arguments_prints_the_help_on_stdout_and_exits_0(cli: Cli) -> None:
    result = script(cli)

    assert (result.code, result.err) == (0, "")
    assert result.out == cli.run("--help").out
    assert result.out.startswith("usage: tokenroute")


@pytest.mark.parametrize("topic", [[], ["keys"], ["keys", "create"], ["run"], ["status"]])
def test_help_command_shows_the_same_help_as_dash_h(cli: Cli, topic: list[str]) -> None:
    result = cli.run("help", *topic)

    assert (result.code, result.err) == (0, "")
    assert result.out == cli.run(*topic, "--help").out
    assert "example: tokenroute" in result.out


def test_every_command_and_group_help_has_an_example(cli: Cli) -> None:
    names = [command.name for command in tokenroute.COMMANDS] + list(tokenroute.GROUPS)
    names += [alias for command in tokenroute.COMMANDS for alias in command.aliases]
    for name in names:
        result = cli.run(*name.split(), "-h")
        assert result.code == 0, (name, result)
        assert re.search(r"^example: tokenroute \S", result.out, re.MULTILINE), (name, result.out)


def test_every_help_example_is_one_line_to_paste(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")  # argparse reflows an epilog to the terminal's width
    for command in tokenroute.COMMANDS:
        name = command.name.rpartition(" ")[2]
        for alias in (name, *command.aliases):
            typed = command.name.replace(name, alias).split()
            example = command.example.replace(name, alias, 1)
            assert f"\nexample: {example}\n" in cli.run(*typed, "-h").out, typed


def test_an_alias_help_shows_the_name_typed(cli: Cli) -> None:
    result = cli.run("status", "-h")

    assert result.out.startswith("usage: tokenroute status ")
    assert "example: tokenroute status --json" in result.out


@pytest.mark.parametrize(("argv", "nearest"), [
    (["key"], "keys"), (["modles"], "models"), (["keys", "lst"], "keys list"), (["help", "logn"], "login"),
])
def test_an_unknown_command_suggests_the_nearest(cli: Cli, argv: list[str], nearest: str) -> None:
    result = cli.run(*argv)

    assert (result.code, result.out) == (1, "")
    assert f"did you mean `{nearest}`?" in result.err.splitlines()[0]


@pytest.mark.parametrize("argv", [["--bogus"], ["balance", "--bogus"], ["keys", "--bogus"], ["keys", "list", "--bogus"]])
def test_an_unknown_option_is_named_not_reported_as_a_missing_command(cli: Cli, argv: list[str]) -> None:
    result = cli.run(*argv)

    assert (result.code, result.out) == (1, "")
    assert result.err.splitlines()[0] == "error: unrecognized argument: --bogus"
    assert result.err.splitlines()[1].startswith("usage: tokenroute")


def test_the_top_up_maximum_is_in_the_message(cli: Cli) -> None:
    result = cli.run("topup", "--amount", "2000000")

    assert (result.code, result.out) == (1, "")
    assert result.err.startswith("error: argument --amount: '2000000' is more than the maximum top-up of 999999.99 USD\n")
    assert tokenroute.parse_amount("999999.99") == "999999.99"


# ---------------------------------------------------------------- output for people


def test_login_names_who_and_which_gateway(cli: Cli, gateway: FakeGateway) -> None:
    gateway.auto_approve = True

    result = cli.run("login")

    assert (result.code, result.out) == (0, f"OK logged in as agent@example.com ({host(gateway)})\n")


def test_login_succeeds_without_a_name_when_the_profile_call_fails(cli: Cli, gateway: FakeGateway) -> None:
    gateway.auto_approve = True
    gateway.fail("/api/v1/me", status=500, count=10)

    result = cli.run("login")

    assert (result.code, result.out) == (0, f"OK logged in ({host(gateway)})\n")
    assert cli.credentials.exists()


def test_login_json_shape_is_unchanged(cli: Cli, gateway: FakeGateway) -> None:
    gateway.auto_approve = True

    result = cli.run("login", "--json")

    assert result.json() == {"status": "logged_in", "api_url": gateway.url}
    assert not [r for r in gateway.requests if r.path_only == "/api/v1/me"]


@pytest.mark.parametrize(("value", "shown"), [
    ("5", "$5.00"), ("5.00", "$5.00"), ("1234.5", "$1,234.50"), ("1.005", "$1.01"), ("-0.5", "-$0.50"),
    ("0", "$0.00"), ("0.000015", "$0.000015"), ("abc", "abc"), (None, "-"), ("NaN", "NaN"),
])
def test_money_is_always_dollars_and_cents(value: Any, shown: str) -> None:
    assert tokenroute.usd(value) == shown


@pytest.mark.parametrize(("per_1k", "per_1m"), [
    ("0.00015", "$0.15"), ("0.0006", "$0.60"), ("0.01", "$10.00"), ("0.000075", "$0.075"), ("x", "x"),
])
def test_model_prices_are_per_million_tokens_in_the_same_format(per_1k: str, per_1m: str) -> None:
    assert tokenroute.usd(per_1k, per=1000) == per_1m


@pytest.mark.parametrize(("value", "shown"), [
    ("2026-11-30T14:02:09Z", "2026-11-30 14:02 UTC"),
    ("2026-11-30T15:02:09.123456+01:00", "2026-11-30 14:02 UTC"),
    ("2026-11-30T14:02:09", "2026-11-30 14:02 UTC"),
    ("2026-11-30T14:02:09.5Z", "2026-11-30 14:02 UTC"),
    ("2026-11-30T13:02:09-01:00", "2026-11-30 14:02 UTC"),
    (1796047329, "2026-11-30 14:02 UTC"),
    ("soon", "soon"),
])
def test_times_are_readable(value: Any, shown: str) -> None:
    assert tokenroute.readable_time(value) == shown


@pytest.mark.parametrize(("seconds", "shown"), [
    (45, "45 s"), (3598, "59 min"), (3600, "1 h"), (12000, "3 h 20 min"), (86400, "1 day"), (3 * 86400, "3 days"),
])
def test_durations_are_readable(seconds: int, shown: str) -> None:
    assert tokenroute.readable_duration(seconds) == shown


def test_json_keeps_the_servers_strings_and_numbers(cli: Cli, gateway: FakeGateway, api_key: str) -> None:
    cli.login()

    assert cli.run("balance", "--json").json() == {"balance_usd": "5.00", "currency": "USD"}
    topup = cli.run("topup", "--amount", "5", "--json").json()
    assert topup["amount_usd"] == "5" and isinstance(topup["expires_at"], int)
    keys = cli.run("keys", "list", "--json").json()
    assert keys[0]["created_at"] == next(iter(gateway.keys.values()))["created_at"]


def test_colour_marks_status_words_and_headers_at_a_terminal_only(cli: Cli, gateway: FakeGateway,
                                                                  api_key: str) -> None:
    cli.login()
    gateway.account["display_name"] = "Agent \x1b[31mred\x1b[0m"
    env = {"TOKENROUTE_API_KEY": api_key}

    test = cli.run("test", env=env, tty=True)
    table = cli.run("keys", "list", tty=True)
    whoami = cli.run("whoami", tty=True)
    error = cli.run("keys", "revoke", "key_nope", tty=True)

    assert test.out.startswith("\x1b[32mOK\x1b[0m connected")
    assert table.out.startswith("\x1b[1mID ")
    assert error.err.startswith("\x1b[31merror\x1b[0m: ")
    assert "\x1b" not in OUR_COLOURS.sub("", whoami.out)  # the server's escape is still neutralised
    assert cli.run("test", env=env).out.startswith("OK connected")  # not a terminal


def test_logout_forget_key_without_a_login_says_the_key_was_forgotten(cli: Cli, gateway: FakeGateway,
                                                                     api_key: str) -> None:
    cli.cache_key(api_key)

    result = cli.run("logout", "--forget-key")
    again = cli.run("logout", "--forget-key")

    assert (result.code, result.out, result.err) == (0, f"OK forgot the cached API key of {gateway.url} (not logged in)\n", "")
    assert cli.cached_key() is None
    assert again.out == f"Not logged in to {gateway.url}; nothing to do\n"


def test_logout_forget_key_with_a_login_says_both(cli: Cli, gateway: FakeGateway, api_key: str) -> None:
    cli.login()
    cli.cache_key(api_key)

    result = cli.run("logout", "--forget-key")

    assert (result.code, result.out, result.err) == (0, f"OK logged out of {gateway.url} and forgot the cached API key\n", "")


def test_logout_all_without_logins_says_any_gateway(cli: Cli) -> None:
    result = cli.run("logout", "--all")
    machine = cli.run("logout", "--all", "--json")

    assert (result.code, result.out) == (0, "Not logged in to any gateway; nothing to do\n")
    assert machine.json() == {"logged_out": False, "api_url": cli.gateway.url, "cached_keys": []}


def test_warnings_are_coloured_at_a_terminal(cli: Cli, gateway: FakeGateway) -> None:
    gateway.auto_approve = True
    cli.config_dir.mkdir(mode=0o700)
    cli.credentials.write_bytes(b"\xff\xfe\x00garbage")

    at_terminal = cli.run("login", "--no-browser", tty=True)
    cli.credentials.write_bytes(b"\xff\xfe\x00garbage")
    piped = cli.run("login", "--no-browser")

    assert at_terminal.code == 0 and piped.code == 0
    coloured = "\x1b[33mwarning\x1b[0m" if os.name == "posix" else "warning"  # no colour in a Windows console
    assert re.search(rf"^{re.escape(coloured)}: .*credentials\.json .*; moved it to ", at_terminal.err, re.MULTILINE)
    assert re.search(r"^warning: .*credentials\.json .*; moved it to ", piped.err, re.MULTILINE)


@pytest.mark.parametrize("env", [{"NO_COLOR": "1"}, {"NO_COLOR": "yes"}, {"TERM": "dumb"}])
def test_no_colour_with_no_color_or_a_dumb_terminal(cli: Cli, api_key: str, env: dict[str, str]) -> None:
    result = cli.run("test", "--key", api_key, env=env, tty=True)
    error = cli.run("keys", "list", env=env, tty=True)

    assert result.out.startswith("OK connected")
    assert error.err.startswith("error: ")


def test_no_colour_in_json_even_at_a_terminal(cli: Cli, api_key: str) -> None:
    result = cli.run("test", "--key", api_key, "--json", tty=True)
    error = cli.run("keys", "list", "--json", tty=True)

    assert "\x1b" not in result.out + result.err + error.out + error.err
    assert error.error()["code"] == "auth_required"


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_env_shell_bash_and_zsh_are_sh(cli: Cli, api_key: str, shell: str) -> None:
    result = cli.run("env", "--shell", shell, "--key", api_key)

    assert result.code == 0
    assert result.out == cli.run("env", "--shell", "sh", "--key", api_key).out
    assert tokenroute.parse_fast(["env", "--shell", shell]) is not None


# ---- text browsers


def fake_browser(folder: Path, name: str) -> Path:
    """A browser command that only leaves a mark that it ran."""
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text(f"#!/bin/sh\necho \"$@\" > '{folder}/{name}.ran'\n")
    path.chmod(0o755)
    return folder / f"{name}.ran"


def open_with_system_browser(env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-c", "import tokenroute; print(tokenroute.open_in_system_browser('https://x.example/d'))"],
        env=env, capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@posix_only
@pytest.mark.parametrize("browser", ["lynx", "w3m", "elinks", "links"])
def test_a_text_browser_from_browser_never_takes_the_terminal(tmp_path: Path, browser: str) -> None:
    ran = fake_browser(tmp_path / "bin", browser)
    env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "BROWSER": browser, "HOME": str(tmp_path), "TERM": "xterm"}

    assert open_with_system_browser(env) == "False"
    assert not ran.exists()


@posix_only
def test_a_text_browser_as_the_only_one_is_not_opened(tmp_path: Path) -> None:
    ran = fake_browser(tmp_path / "bin", "lynx")
    env = {"PATH": str(tmp_path / "bin"), "DISPLAY": ":0", "HOME": str(tmp_path), "TERM": "xterm"}

    assert open_with_system_browser(env) == "False"
    assert not ran.exists()


@posix_only
def test_a_graphical_browser_from_browser_is_opened(tmp_path: Path) -> None:
    ran = fake_browser(tmp_path / "bin", "my-opener")
    env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "BROWSER": "my-opener", "HOME": str(tmp_path)}

    assert open_with_system_browser(env) == "True"
    assert ran.read_text() == "https://x.example/d\n"


# ---------------------------------------------------------------- the sandbox gateway


def start_sandbox(port: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "tests" / "fake_gateway.py"), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sandbox_on_port_0_picks_a_free_port_and_prints_it() -> None:
    sandbox = start_sandbox(0)
    try:
        first = sandbox.stdout.readline()
        match = re.search(r"on http://127\.0\.0\.1:(\d+) ", first)
        assert match, first
        with socket.create_connection(("127.0.0.1", int(match.group(1))), timeout=10):
            pass
    finally:
        sandbox.terminate()
        sandbox.communicate(timeout=30)


def test_sandbox_on_a_busy_port_says_so_in_one_line() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        sandbox = start_sandbox(port)
        out, err = sandbox.communicate(timeout=60)

    assert sandbox.returncode == 1
    assert out == ""
    assert err == (f"fake_gateway: 127.0.0.1:{port} is in use; pick another with --port N "
                   "(--port 0 picks a free one)\n")
