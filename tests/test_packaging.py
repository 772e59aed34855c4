"""Packaging (issue 4): the wheel builds offline and installs with no
dependencies, every way of starting tokenroute works, tokenroute.py needs
only the standard library, and nothing needs a Python newer than 3.9."""
from __future__ import annotations

import ast
import configparser
import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path
from typing import Iterator

import pytest

import tokenroute
from fake_gateway import FakeGateway

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
SOURCE = REPO / "tokenroute.py"
MAX_WHEEL_BYTES = 92 * 1024  # 30 KiB was 1.0's first cut, 72 KiB 1.0.0; 1.1 adds `api`, the MCP server's threads and schemas, the key and takeover rules and env --write's readers
VERSION_LINE = "tokenroute %s\n" % tokenroute.__version__

# Standard modules of one platform only, which Python 3.9 (no sys.stdlib_module_names) cannot find elsewhere.
OTHER_PLATFORMS_STDLIB = frozenset("msvcrt winreg _winapi nt fcntl grp pwd posix resource termios".split())


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENROUTE_", "PYTHON"))}
    env.update(extra)
    return env


def run(argv: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env if env is not None else clean_env(), cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def venv_bin(venv: Path, name: str) -> Path:
    folder = "Scripts" if os.name == "nt" else "bin"
    return venv / folder / (name + (".exe" if os.name == "nt" else ""))


# ---------------------------------------------------------------- the wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if importlib.util.find_spec("flit_core") is None:
        pytest.skip("flit_core is not installed in the test interpreter (pip install flit_core): "
                    "the offline wheel build needs it")
    out = tmp_path_factory.mktemp("wheel")
    built = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                 "--disable-pip-version-check", "-w", str(out), str(REPO)], env=clean_env(PIP_NO_INPUT="1"))
    assert built.returncode == 0, built.stdout + built.stderr
    wheels = list(out.glob("tokenroute-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with only the wheel installed; returns its tokenroute script."""
    venv = tmp_path_factory.mktemp("venv") / "env"
    created = run([sys.executable, "-m", "venv", str(venv)])
    assert created.returncode == 0, created.stderr
    pip = run([str(venv_bin(venv, "python")), "-m", "pip", "install", "--no-index", "--no-deps",
               "--disable-pip-version-check", str(wheel)])
    assert pip.returncode == 0, pip.stdout + pip.stderr
    return venv_bin(venv, "tokenroute")


def wheel_file(wheel: Path, suffix: str) -> str:
    with zipfile.ZipFile(wheel) as archive:
        [name] = [n for n in archive.namelist() if n.endswith(suffix)]
        return archive.read(name).decode("utf-8")


def test_wheel_builds_offline_from_the_source_tree(wheel: Path) -> None:
    assert wheel.name.startswith("tokenroute-%s-" % tokenroute.__version__)
    assert wheel.name.endswith("-py3-none-any.whl")


def test_wheel_has_no_dependencies(wheel: Path) -> None:
    metadata = wheel_file(wheel, ".dist-info/METADATA")
    required = [line for line in metadata.splitlines()
                if line.startswith("Requires-Dist:") and "extra ==" not in line]  # extras are opt-in
    assert required == []
    assert "Requires-Python: >=3.9" in metadata


def test_wheel_is_small(wheel: Path) -> None:
    assert wheel.stat().st_size < MAX_WHEEL_BYTES


def test_wheel_contains_the_module_and_the_console_script(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        assert "tokenroute.py" in names
        assert archive.read("tokenroute.py") == SOURCE.read_bytes()
    assert not [n for n in names if n.startswith(("tests/", "npm/"))]
    entry_points = configparser.ConfigParser()
    entry_points.read_string(wheel_file(wheel, ".dist-info/entry_points.txt"))
    assert entry_points["console_scripts"]["tokenroute"].replace(" ", "") == "tokenroute:main"


def test_wheel_in_a_fresh_venv_prints_its_version(installed: Path) -> None:
    done = run([str(installed), "--version"])
    assert (done.returncode, done.stdout, done.stderr) == (0, VERSION_LINE, "")


def test_wheel_in_a_fresh_venv_talks_to_the_gateway(installed: Path, gateway: FakeGateway, api_key: str,
                                                     tmp_path: Path) -> None:
    env = clean_env(TOKENROUTE_API_URL=gateway.url, TOKENROUTE_API_KEY=api_key,
                    TOKENROUTE_CONFIG_DIR=str(tmp_path / "config"))
    done = run([str(installed), "models", "--json"], env=env)
    assert (done.returncode, done.stderr) == (0, ""), done.stdout
    assert [m["id"] for m in json.loads(done.stdout)][:2] == ["openai/gpt-4o-mini", "openai/gpt-4o"]
    assert gateway.requests[-1].header("Authorization") == "Bearer " + api_key


# ---------------------------------------------------------------- other ways to start it


def test_python_m_tokenroute_prints_its_version(tmp_path: Path) -> None:
    done = run([sys.executable, "-m", "tokenroute", "--version"], cwd=REPO)
    assert (done.returncode, done.stdout, done.stderr) == (0, VERSION_LINE, "")


def test_python_tokenroute_py_prints_its_version(tmp_path: Path) -> None:
    done = run([sys.executable, str(SOURCE), "--version"], cwd=tmp_path)
    assert (done.returncode, done.stdout, done.stderr) == (0, VERSION_LINE, "")


# ---------------------------------------------------------------- standard library only


def imported_top_level_names(path: Path) -> set[str]:
    """Every module `path` imports, anywhere (functions, TYPE_CHECKING blocks), by top-level name."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def is_standard_module(name: str) -> bool:
    """Whether `name` is a module of Python's standard library: sys.stdlib_module_names (3.10+),
    else where this Python finds it: built in, frozen, or in its stdlib folder and not site-packages."""
    listed = getattr(sys, "stdlib_module_names", None)
    if listed is not None:
        return name in listed
    if name in sys.builtin_module_names:
        return True
    spec = importlib.util.find_spec(name)
    if spec is None:
        return name in OTHER_PLATFORMS_STDLIB
    if spec.origin in ("built-in", "frozen"):
        return True
    where = os.path.realpath(spec.origin or next(iter(spec.submodule_search_locations or []), ""))
    paths = sysconfig.get_paths()
    inside = [os.path.realpath(paths[key]) + os.sep for key in ("stdlib", "platstdlib")]
    outside = [os.path.realpath(paths[key]) + os.sep for key in ("purelib", "platlib")]
    return any(where.startswith(folder) for folder in inside) and not any(where.startswith(folder) for folder in outside)


def test_tokenroute_imports_only_the_standard_library() -> None:
    names = imported_top_level_names(SOURCE)
    assert {"os", "sys", "json", "urllib", "argparse"} <= names  # the walk sees imports inside functions
    assert sorted(name for name in names if not is_standard_module(name)) == []


def test_the_standard_library_check_tells_a_third_party_module() -> None:
    assert is_standard_module("difflib") and is_standard_module("_signal") and is_standard_module("json")
    assert not is_standard_module("pytest")  # installed here, but in site-packages
    assert not is_standard_module("requests_tr9_absent")


def test_import_walk_sees_imports_inside_functions(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("import os\ndef f():\n    import requests.adapters\n    from yaml import load\n")
    assert imported_top_level_names(sample) == {"os", "requests", "yaml"}


# ---------------------------------------------------------------- Python 3.9


def find_python39() -> str | None:
    """A working Python 3.9: this one, `python3.9` on PATH, else one installed by pyenv."""
    if sys.version_info[:2] == (3, 9):
        return sys.executable
    root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    candidates = [shutil.which("python3.9")] + sorted(glob.glob(os.path.join(root, "versions", "3.9*", "bin", "python3.9")))
    for candidate in candidates:
        if not candidate:
            continue
        try:
            probe = run([candidate, "-c", "import sys; print(sys.version_info[:2] == (3, 9))"], timeout=30)
        except OSError:
            continue
        if probe.returncode == 0 and probe.stdout.strip() == "True":
            return candidate
    return None


@pytest.fixture(scope="module")
def python39() -> Iterator[str]:
    found = find_python39()
    if found is None:
        # In CI the Python 3.9 cells run the whole suite on 3.9; the other cells have no 3.9 to run these with.
        pytest.skip("this Python is not 3.9 and there is no other 3.9 here (python3.9 on PATH or under pyenv); "
                    "the Python 3.9 cells of CI run the whole suite on 3.9")
    yield found


def test_tokenroute_py_runs_on_python_3_9(python39: str, tmp_path: Path) -> None:
    done = run([python39, str(SOURCE), "--version"], cwd=tmp_path)
    assert (done.returncode, done.stdout, done.stderr) == (0, VERSION_LINE, "")
    done = run([python39, str(SOURCE), "completion", "bash"], cwd=tmp_path)
    assert (done.returncode, done.stderr) == (0, "")


def test_tokenroute_py_talks_to_the_gateway_on_python_3_9(python39: str, gateway: FakeGateway, api_key: str,
                                                          tmp_path: Path) -> None:
    env = clean_env(TOKENROUTE_API_URL=gateway.url, TOKENROUTE_API_KEY=api_key,
                    TOKENROUTE_CONFIG_DIR=str(tmp_path / "config"))
    done = run([python39, str(SOURCE), "models", "--json"], env=env, cwd=tmp_path)
    assert (done.returncode, done.stderr) == (0, ""), done.stdout
    done = run([python39, str(SOURCE), "doctor", "--json"], env=env, cwd=tmp_path)
    assert done.stderr == ""
    assert json.loads(done.stdout)["checks"]


def test_source_and_tests_compile_on_python_3_9(python39: str, tmp_path: Path) -> None:
    files = [str(SOURCE)] + sorted(str(p) for p in TESTS.glob("*.py"))
    env = clean_env(PYTHONPYCACHEPREFIX=str(tmp_path / "pycache"))  # keep the tree free of .pyc files
    done = run([python39, "-m", "py_compile", *files], env=env)
    assert (done.returncode, done.stderr) == (0, "")
