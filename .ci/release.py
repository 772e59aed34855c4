"""Release steps that .github/workflows/release.yml runs, and that run the same here.

    python .ci/release.py check [vX.Y.Z]   the tag, __version__ and npm/package.json agree
    python .ci/release.py build [DIR]      sdist, wheel built from it, npm tarball, SHA256SUMS
                                           (DIR: new, empty, or an earlier build's; default dist)
    python .ci/release.py notes VERSION    that version's CHANGELOG.md section

`build` is offline: it needs flit_core installed next to this Python (the
test set-up installs it) and, unless --no-npm, npm on PATH.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


class ReleaseError(Exception):
    pass


def cli_version(repo: Path = REPO) -> str:
    source = (repo / "tokenroute.py").read_text(encoding="utf-8")
    match = re.search(r'^__version__ = "([^"]+)"$', source, re.MULTILINE)
    if match is None:
        raise ReleaseError('tokenroute.py has no __version__ = "..." line')
    return match.group(1)


def npm_package(repo: Path = REPO) -> dict:
    return json.loads((repo / "npm" / "package.json").read_text(encoding="utf-8"))


def check(tag: str | None, *, repo: Path = REPO, github_repository: str | None = None) -> str:
    """The release version, once the tag, __version__ and npm/package.json agree."""
    version = cli_version(repo)
    package = npm_package(repo)
    if package.get("version") != version:
        raise ReleaseError(f"npm/package.json version {package.get('version')} != tokenroute.py __version__ {version}")
    if tag is not None and tag != "v" + version:
        raise ReleaseError(f"tag {tag} != v{version} (tokenroute.py __version__ and npm/package.json)")
    if github_repository:
        # npm refuses a provenance statement for a package that names another repository.
        wanted = f"git+https://github.com/{github_repository}.git"
        url = (package.get("repository") or {}).get("url")
        if url != wanted:
            raise ReleaseError(f'npm/package.json "repository": {{"url": "{wanted}"}} is needed for npm provenance (has {url})')
    return version


def build(out: Path, *, npm: bool = True, repo: Path = REPO) -> list[Path]:
    """Build every release file into `out`; returns the files SHA256SUMS covers.

    Everything is built in a scratch folder first, then moved into `out`, each
    file's name recorded there before it arrives: a later build deletes only those.
    """
    version = check(None, repo=repo)
    out = output_folder(out)
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        sdist = build_sdist(repo, work)
        wheel = build_wheel_from_sdist(sdist, work)
        files = {f"python/{sdist.name}": sdist, f"python/{wheel.name}": wheel}
        if npm:
            packed = run(["npm", "pack", "--pack-destination", str(work)], cwd=repo / "npm", shell=os.name == "nt")
            (repo / "npm" / "tokenroute.py").unlink(missing_ok=True)  # prepack's copy: keep the tree clean
            tarball = packed.strip().splitlines()[-1]  # npm pack's last line names it
            files[f"npm/{tarball}"] = work / tarball
        single = work / "tokenroute.py"
        shutil.copyfile(repo / "tokenroute.py", single)
        covered = [single, sdist, wheel]
        for path in covered:
            if not path.name.startswith(("tokenroute.py", f"tokenroute-{version}")):
                raise ReleaseError(f"unexpected file name {path.name}")
        (work / "SHA256SUMS").write_bytes("".join(f"{sha256(path)}  {path.name}\n" for path in covered).encode())
        files.update({"tokenroute.py": single, "SHA256SUMS": work / "SHA256SUMS"})
        for name, path in files.items():
            place(out, name, path)
    return [out / "tokenroute.py", out / "python" / sdist.name, out / "python" / wheel.name]


BUILT_HERE = ".release-build"  # in every folder `build` made: the names of the files it put there, the only ones it deletes


def output_folder(out: Path) -> Path:
    """`out` as an absolute path, made, or rid of the files an earlier build put there, and marked as
    a build's. Any other folder with something in it (the checkout, ~/Downloads, a dist/ of 1.0) is
    refused before anything is deleted.

    Resolved first: pip and npm read a leading "~" of a relative path as the home folder.
    """
    if out.is_symlink() and not out.exists():
        raise ReleaseError(f"{out} is a symlink to {os.readlink(out)}, which does not exist; "
                           "build into a new or empty folder")
    out = out.resolve()
    if out.exists() and not out.is_dir():
        raise ReleaseError(f"{out} is not a folder; build into a new or empty folder")
    marker = out / BUILT_HERE
    if out.is_dir() and any(out.iterdir()) and not marker.is_file():
        raise ReleaseError(f"{out} is not empty and this release helper did not make it (a dist/ of 1.0 included): "
                           "remove it, or build into a new or empty folder (nothing was deleted)")
    built = marker.read_text(encoding="utf-8").splitlines()[1:] if marker.is_file() else []
    for name in built:
        path = out / name
        if out in path.resolve().parents:
            path.unlink(missing_ok=True)
    for folder in {(out / name).parent for name in built} - {out}:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text("made by .ci/release.py build, which deletes the files listed below when it builds again\n",
                      encoding="utf-8")
    return out


def place(out: Path, name: str, source: Path) -> None:
    """Move a built file to `out`/`name`, recorded in the marker before it is there."""
    with (out / BUILT_HERE).open("a", encoding="utf-8") as marker:
        marker.write(name + "\n")
    (out / name).parent.mkdir(exist_ok=True)
    shutil.move(str(source), str(out / name))


def build_sdist(repo: Path, out: Path) -> Path:
    """The sdist by flit_core's PEP 517 hook, as any build front end would call it."""
    code = "import sys, flit_core.buildapi as b; print(b.build_sdist(sys.argv[1]))"
    name = run([sys.executable, "-c", code, str(out)], cwd=repo).strip().splitlines()[-1]
    return out / name


def build_wheel_from_sdist(sdist: Path, out: Path) -> Path:
    """The wheel built from the unpacked sdist, offline: what PyPI users install."""
    with tempfile.TemporaryDirectory() as scratch:
        with tarfile.open(sdist) as archive:
            safe_extract(archive, Path(scratch))
        [tree] = Path(scratch).iterdir()
        run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
             "--disable-pip-version-check", "--quiet", "-w", str(out), str(tree)])
    [wheel] = out.glob("*.whl")
    return wheel


def safe_extract(archive: tarfile.TarFile, target: Path) -> None:
    for member in archive.getmembers():
        where = (target / member.name).resolve()
        if not (member.isfile() or member.isdir()) or target.resolve() not in where.parents:
            raise ReleaseError(f"unexpected sdist member {member.name}")
    if hasattr(tarfile, "data_filter"):  # Python 3.12, and security releases of 3.9-3.11
        archive.extractall(target, filter="data")
    else:
        archive.extractall(target)  # members checked above


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def notes(version: str, *, repo: Path = REPO) -> str:
    """The CHANGELOG.md section of `version`, without its heading."""
    text = (repo / "CHANGELOG.md").read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(version)}\b.*?\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    if match is None or not match.group(1).strip():
        raise ReleaseError(f"CHANGELOG.md has no section for {version}")
    return match.group(1).strip() + "\n"


def run(argv: list[str], *, cwd: Path | None = None, shell: bool = False) -> str:
    command = subprocess.list2cmdline(argv) if shell else argv  # npm is npm.cmd on Windows
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, shell=shell)
    if done.returncode != 0:
        raise ReleaseError(f"{' '.join(argv)} failed:\n{done.stdout}{done.stderr}")
    return done.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=".ci/release.py", description=__doc__.splitlines()[0])
    steps = parser.add_subparsers(dest="step", required=True)
    steps.add_parser("check").add_argument("tag", nargs="?")
    build_step = steps.add_parser("build")
    build_step.add_argument("out", nargs="?", default="dist", type=Path)
    build_step.add_argument("--no-npm", action="store_true", help="skip npm pack")
    steps.add_parser("notes").add_argument("version")
    args = parser.parse_args(argv)
    try:
        if args.step == "check":
            print(check(args.tag, github_repository=os.environ.get("GITHUB_REPOSITORY")))
        elif args.step == "build":
            for path in build(args.out, npm=not args.no_npm):
                print(path)
        else:
            sys.stdout.write(notes(args.version))
    except ReleaseError as error:
        print(f"release: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
