"""Release (issue 12): the steps .github/workflows/release.yml runs, run here.

`.ci/release.py` checks that the tag, __version__ and npm/package.json
agree, builds the sdist, the wheel from that sdist, and SHA256SUMS for the
single-file download; these tests run it the way the workflow does.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import pytest

import tokenroute

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
RELEASE = REPO / ".ci" / "release.py"
if not RELEASE.exists():
    pytest.skip(".ci/release.py is not here (an sdist leaves it out)", allow_module_level=True)

VERSION = tokenroute.__version__
VERSION_LINE = f"tokenroute {VERSION}\n"


def load_release() -> Any:
    spec = importlib.util.spec_from_file_location("release", RELEASE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


release = load_release()


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENROUTE_", "PYTHON", "GITHUB_"))}
    return {**env, "PIP_NO_INPUT": "1", **extra}


def run(argv: list[Any], *, cwd: Path | None = None, env: dict[str, str] | None = None,
        timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], cwd=cwd, env=env or clean_env(), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def venv_bin(venv: Path, name: str) -> Path:
    folder = "Scripts" if os.name == "nt" else "bin"
    return venv / folder / (name + (".exe" if os.name == "nt" else ""))


# ---------------------------------------------------------------- versions


def test_npm_package_version_is_the_cli_version() -> None:
    assert release.npm_package()["version"] == VERSION
    assert release.cli_version() == VERSION


def test_release_check_accepts_the_tag_of_the_version() -> None:
    done = run([sys.executable, RELEASE, "check", f"v{VERSION}"])

    assert (done.returncode, done.stdout, done.stderr) == (0, VERSION + "\n", "")


def test_release_check_refuses_a_tag_that_is_not_the_version() -> None:
    done = run([sys.executable, RELEASE, "check", "v0.0.1"])

    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == f"release: error: tag v0.0.1 != v{VERSION} (tokenroute.py __version__ and npm/package.json)\n"


def test_release_check_refuses_an_npm_version_that_differs(tmp_path: Path) -> None:
    (tmp_path / "npm").mkdir()
    shutil.copyfile(REPO / "tokenroute.py", tmp_path / "tokenroute.py")
    (tmp_path / "npm" / "package.json").write_text('{"version": "0.0.0-other"}', encoding="utf-8")

    with pytest.raises(release.ReleaseError, match=f"npm/package.json version 0.0.0-other != .* {VERSION}"):
        release.check(f"v{VERSION}", repo=tmp_path)


def test_release_notes_are_the_changelog_section_of_the_version() -> None:
    done = run([sys.executable, RELEASE, "notes", VERSION])

    assert (done.returncode, done.stderr) == (0, "")
    assert "### Upgrading from" in done.stdout
    assert not done.stdout.startswith("## ")


def test_the_changelog_of_the_version_names_every_command_of_help() -> None:
    help_text = run([sys.executable, REPO / "tokenroute.py", "--help"]).stdout
    listed = help_text.split("\ncommands:\n", 1)[1].split("\n\n", 1)[0]
    commands = [re.split(r"\s{2,}", line.strip())[0] for line in listed.splitlines()]
    notes = run([sys.executable, RELEASE, "notes", VERSION]).stdout

    assert len(commands) > 10 and "keys create" in commands, listed
    assert [name for name in commands if f"`{name}" not in " ".join(notes.split())] == []


# ---------------------------------------------------------------- the build


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`.ci/release.py build` into a temp folder (npm pack is tested in test_npm.py)."""
    if importlib.util.find_spec("flit_core") is None:
        pytest.skip("flit_core is not installed in the test interpreter (pip install flit_core)")
    out = tmp_path_factory.mktemp("release") / "dist"
    done = run([sys.executable, RELEASE, "build", out, "--no-npm"])
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def test_build_makes_the_sdist_the_wheel_and_the_single_file(built: Path) -> None:
    assert sorted(p.name for p in (built / "python").iterdir()) == [
        f"tokenroute-{VERSION}-py3-none-any.whl", f"tokenroute-{VERSION}.tar.gz"]
    assert (built / "tokenroute.py").read_bytes() == (REPO / "tokenroute.py").read_bytes()


def test_sdist_contains_the_module_and_the_tests(built: Path) -> None:
    with tarfile.open(built / "python" / f"tokenroute-{VERSION}.tar.gz") as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    expected = {"tokenroute.py", "pyproject.toml", "README.md", "CHANGELOG.md", "PKG-INFO", "tests/conftest.py",
                "tests/fake_gateway.py"}
    assert expected <= names
    assert {p.relative_to(REPO).as_posix() for p in TESTS.glob("test_*.py")} <= names
    assert not [n for n in names if n.startswith(("npm/", ".ci/", ".github/"))]


def test_wheel_is_built_from_the_sdist_and_holds_the_module(built: Path) -> None:
    with zipfile.ZipFile(built / "python" / f"tokenroute-{VERSION}-py3-none-any.whl") as wheel:
        assert wheel.read("tokenroute.py") == (REPO / "tokenroute.py").read_bytes()


def test_wheel_from_the_sdist_installs_in_a_fresh_venv(built: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    assert run([sys.executable, "-m", "venv", venv]).returncode == 0
    wheel = built / "python" / f"tokenroute-{VERSION}-py3-none-any.whl"
    pip = run([venv_bin(venv, "python"), "-m", "pip", "install", "--no-index", "--no-deps",
               "--disable-pip-version-check", wheel])
    assert pip.returncode == 0, pip.stdout + pip.stderr

    done = run([venv_bin(venv, "tokenroute"), "--version"])

    assert (done.returncode, done.stdout, done.stderr) == (0, VERSION_LINE, "")


def test_the_unpacked_sdist_collects_its_tests(built: Path, tmp_path: Path) -> None:
    with tarfile.open(built / "python" / f"tokenroute-{VERSION}.tar.gz") as archive:
        release.safe_extract(archive, tmp_path)
    tree = tmp_path / f"tokenroute-{VERSION}"

    done = run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"], cwd=tree)

    assert done.returncode == 0, done.stdout[-2000:] + done.stderr
    assert "tests/test_parsing.py: " in done.stdout and "error" not in done.stdout.lower()


@pytest.mark.parametrize("what", ["a checkout", "a folder of downloads", "a file"])
def test_build_refuses_a_folder_it_did_not_make_and_deletes_nothing(tmp_path: Path, what: str) -> None:
    target = tmp_path / "target"
    if what == "a file":
        target.write_text("precious\n")
    else:
        (target / (".git" if what == "a checkout" else "photos")).mkdir(parents=True)
        (target / "precious.txt").write_text("precious\n")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))

    done = run([sys.executable, RELEASE, "build", target, "--no-npm"])

    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr.startswith(f"release: error: {target} is not ")
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


def test_building_again_deletes_only_the_files_the_earlier_build_put_there(tmp_path: Path) -> None:
    new, empty = tmp_path / "new" / "dist", tmp_path / "empty"
    empty.mkdir()
    for folder in (new, empty):
        release.output_folder(folder)
        for name in ("python/tokenroute-0.9.whl", "SHA256SUMS"):
            (tmp_path / "built").write_text("")
            release.place(folder, name, tmp_path / "built")
        (folder / "NOTES.md").write_text("")  # what the release workflow adds
        (folder / "python" / "mine.txt").write_text("")  # what a person put there

        release.output_folder(folder)  # building again

        assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) == [
            release.BUILT_HERE, "NOTES.md", "python", "python/mine.txt"]


def test_build_refuses_a_dist_of_1_0_and_says_to_remove_it(tmp_path: Path) -> None:
    dist = tmp_path / "dist"  # 1.0's build deleted the folder and marked nothing
    for name in ("python/tokenroute-1.0.0.tar.gz", "npm/tokenroute-1.0.0.tgz", "tokenroute.py", "SHA256SUMS"):
        (dist / name).parent.mkdir(exist_ok=True, parents=True)
        (dist / name).write_text("")

    done = run([sys.executable, RELEASE, "build", "dist", "--no-npm"], cwd=tmp_path)

    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == (f"release: error: {dist} is not empty and this release helper did not make it (a dist/ of "
                           "1.0 included): remove it, or build into a new or empty folder (nothing was deleted)\n")
    assert len(list(dist.rglob("*"))) == 6


def test_build_into_a_dangling_symlink_says_so(tmp_path: Path) -> None:
    (tmp_path / "dist").symlink_to(tmp_path / "gone")

    done = run([sys.executable, RELEASE, "build", tmp_path / "dist", "--no-npm"])

    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == (f"release: error: {tmp_path / 'dist'} is a symlink to {tmp_path / 'gone'}, which does not "
                           "exist; build into a new or empty folder\n")
    assert not (tmp_path / "gone").exists()


def test_build_into_a_folder_named_tilde_builds_there_not_in_home(tmp_path: Path) -> None:
    if importlib.util.find_spec("flit_core") is None:
        pytest.skip("flit_core is not installed in the test interpreter (pip install flit_core)")
    home = tmp_path / "home"
    home.mkdir()

    done = run([sys.executable, RELEASE, "build", "~", "--no-npm"], cwd=tmp_path, env=clean_env(HOME=str(home)))

    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(p.name for p in (tmp_path / "~" / "python").iterdir()) == [
        f"tokenroute-{VERSION}-py3-none-any.whl", f"tokenroute-{VERSION}.tar.gz"]
    assert not (home / "python").exists()  # pip reads "~/python" as the home folder's


# ---------------------------------------------------------------- the single-file download


def download(built: Path, folder: Path) -> Path:
    """What a user fetching only tokenroute.py and SHA256SUMS from the release has."""
    folder.mkdir()
    for name in ("tokenroute.py", "SHA256SUMS"):
        shutil.copyfile(built / name, folder / name)
    return folder


def test_sha256sums_cover_every_release_file(built: Path) -> None:
    lines = (built / "SHA256SUMS").read_text(encoding="ascii").splitlines()
    sums = dict(reversed(line.split("  ", 1)) for line in lines)
    files = {"tokenroute.py": built / "tokenroute.py"}
    files.update({p.name: p for p in (built / "python").iterdir()})
    assert sorted(sums) == sorted(files)
    assert all(release.sha256(files[name]) == digest for name, digest in sums.items())


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="sha256sum (GNU coreutils) is not installed")
def test_single_file_download_checks_with_sha256sum(built: Path, tmp_path: Path) -> None:
    folder = download(built, tmp_path / "download")

    done = run(["sha256sum", "-c", "--ignore-missing", "SHA256SUMS"], cwd=folder)

    assert (done.returncode, done.stdout, done.stderr) == (0, "tokenroute.py: OK\n", "")
    (folder / "tokenroute.py").write_bytes((folder / "tokenroute.py").read_bytes() + b"# tampered\n")
    assert run(["sha256sum", "-c", "--ignore-missing", "SHA256SUMS"], cwd=folder).returncode == 1


def test_single_file_download_runs_as_a_script_and_as_a_module(built: Path, tmp_path: Path) -> None:
    folder = download(built, tmp_path / "download")
    env = clean_env(TOKENROUTE_CONFIG_DIR=str(tmp_path / "config"))

    script = run([sys.executable, "tokenroute.py", "--version"], cwd=folder, env=env)
    module = run([sys.executable, "-m", "tokenroute", "--version"], cwd=folder, env=env)

    assert (script.returncode, script.stdout, script.stderr) == (0, VERSION_LINE, "")
    assert (module.returncode, module.stdout, module.stderr) == (0, VERSION_LINE, "")


# ---------------------------------------------------------------- every Python, before the matrix

OTHER_PYTHONS = REPO / ".ci" / "other-pythons"
STUB_PYTHON = """#!/bin/sh
# Python {version} as .ci/other-pythons sees it: a version, a venv, pip and pytest that say they ran.
case "$*" in
  *"print("*) echo {version} ;;
  *"import venv, ensurepip"*) exit {probe} ;;
  "-m venv "*) mkdir -p "$3/bin" && cp "$0" "$3/bin/python" ;;
  "-m pytest"*) echo "suite under {version}" >> "$LOG"; echo "{version}: $SUITE_SAYS"; [ "$FAILING" != {version} ] ;;
esac
"""


def other_pythons(tmp_path: Path, main: str, others: dict[str, bool], *, failing: str = "",
                  status: int = 0) -> tuple[str, list[str]]:
    """Run .ci/other-pythons where `python` is Python `main` and python3.X on PATH are `others` (whether
    each can make a venv), the suite failing under `failing`; returns its output (after checking its
    exit `status`) and the Pythons the suite ran under."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, version, usable in [("python", main, True)] + [(f"python{v}", v, ok) for v, ok in others.items()]:
        (bin_dir / name).write_text(STUB_PYTHON.format(version=version, probe=0 if usable else 1))
        (bin_dir / name).chmod(0o755)
    for tool in ("seq", "ls", "mkdir", "cp", "cat"):  # and no other Python
        (bin_dir / tool).symlink_to(shutil.which(tool) or tool)
    log = tmp_path / "suites.log"
    env = {key: value for key, value in clean_env().items() if key != "GITHUB_ACTIONS"}
    env.update(PATH=str(bin_dir), PYENV_ROOT=str(tmp_path / "no-pyenv"), LOG=str(log), FAILING=failing,
               SUITE_SAYS="its own words")
    done = run([shutil.which("bash"), OTHER_PYTHONS], cwd=tmp_path, env=env)
    assert done.returncode == status, done.stdout + done.stderr
    return done.stdout + done.stderr, sorted(log.read_text().splitlines()) if log.exists() else []  # side by side: any order


@pytest.mark.skipif(os.name == "nt" or shutil.which("bash") is None, reason="POSIX sh stubs for Python")
def test_ci_runs_the_suite_under_the_oldest_python_and_the_newest_unless_it_ran_already(tmp_path: Path) -> None:
    _, suites = other_pythons(tmp_path, "3.13", {"3.9": True, "3.10": True, "3.12": True})

    assert suites == ["suite under 3.9"]  # 3.13 ran it already: the next newest adds nothing


@pytest.mark.skipif(os.name == "nt" or shutil.which("bash") is None, reason="POSIX sh stubs for Python")
def test_ci_passes_over_a_python_that_cannot_make_a_venv_and_says_so(tmp_path: Path) -> None:
    said, suites = other_pythons(tmp_path, "3.11", {"3.9": False, "3.10": True, "3.13": True})

    assert suites == ["suite under 3.10", "suite under 3.13"]
    assert f"note: {tmp_path / 'bin' / 'python3.9'} cannot make a virtual environment (no venv or ensurepip); " \
           "skipped" in said


@pytest.mark.skipif(os.name == "nt" or shutil.which("bash") is None, reason="POSIX sh stubs for Python")
def test_ci_with_no_other_python_says_the_suite_ran_under_one(tmp_path: Path) -> None:
    said, suites = other_pythons(tmp_path, "3.12", {})

    assert suites == []
    assert "note: no older or newer Python 3.9+ here than 3.12 (PATH or pyenv); the suite ran under 3.12 only" in said


@pytest.mark.skipif(os.name == "nt" or shutil.which("bash") is None, reason="POSIX sh stubs for Python")
def test_ci_runs_the_two_suites_and_fails_when_one_fails_showing_each_whole(tmp_path: Path) -> None:
    said, suites = other_pythons(tmp_path, "3.11", {"3.9": True, "3.13": True}, failing="3.9", status=1)

    assert suites == ["suite under 3.13", "suite under 3.9"]
    assert said.index("== the suite under Python 3.9") < said.index("3.9: its own words") \
        < said.index("== the suite under Python 3.13") < said.index("3.13: its own words")
