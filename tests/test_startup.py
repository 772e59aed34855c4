"""Offline commands start as fast as Python itself: they import nothing heavy.

Not a timing (tests/bench.py times them): each test runs a command in a
subprocess with PYTHONPROFILEIMPORTTIME=1 (`-X importtime`), keeps only the
modules tokenroute itself loaded, and asserts none of the expensive ones is
among them, plus the exact output. The HTTP stack, argparse (the whole parser),
json and re belong to the commands that need them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO, console_script

import tokenroute

# A package counts with its submodules: "email" also catches "email.utils".
HEAVY = ("urllib", "urllib.request", "http.client", "ssl", "email", "webbrowser", "decimal", "argparse", "json", "re")
KEY = "sk-tr-abc123"
API_URL = "https://gateway.example.com"
SOURCE = [sys.executable, str(REPO / "tokenroute.py")]


def run_profiled(command: list[str], tmp_path: Path, **env: str) -> tuple[str, set[str]]:
    """Run `command` offline; its stdout and the modules tokenroute loaded."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("TOKENROUTE_")}
    done = subprocess.run(
        command,
        env={**base, "HOME": str(tmp_path), "TOKENROUTE_CONFIG_DIR": str(tmp_path / "config"),
             "TOKENROUTE_API_URL": API_URL, "PYTHONPROFILEIMPORTTIME": "1", **env},
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout, loaded_by_tokenroute(done.stderr)


def loaded_by_tokenroute(importtime: str) -> set[str]:
    """Modules loaded after start-up, from `-X importtime` lines.

    Python prints a line as each import finishes, indented by nesting, so a
    top-level import is a group of lines ending in an unindented one, and
    start-up ends with the `site` group. A console script's wrapper may import
    modules of its own first (pip's imports `re`): when the groups after
    start-up include `tokenroute`, the count starts at that group.
    """
    groups: list[list[str]] = [[]]
    for line in importtime.splitlines():
        if not line.startswith("import time:") or line.endswith("| imported package"):
            continue
        name = line.split("|", 2)[2][1:]
        groups[-1].append(name.strip())
        if not name.startswith(" "):
            groups.append([])
    tops = [group[-1] for group in groups[:-1]]
    assert "site" in tops, importtime
    after_startup = groups[len(tops) - tops[::-1].index("site"):]
    own = [group for group in after_startup if group and group[-1] == "tokenroute"]
    if own:
        after_startup = after_startup[after_startup.index(own[0]):]
    return {name for group in after_startup for name in group}


def heavy_among(modules: set[str], *, allowed: tuple[str, ...] = ()) -> list[str]:
    banned = [m for m in HEAVY if m not in allowed]
    return sorted(name for name in modules if any(name == m or name.startswith(m + ".") for m in banned))


def test_version_from_the_console_script_imports_nothing_heavy(tmp_path: Path) -> None:
    out, modules = run_profiled([console_script(), "--version"], tmp_path)
    assert out == f"tokenroute {tokenroute.__version__}\n"
    assert "tokenroute" in modules  # the console script's own import was seen
    assert heavy_among(modules) == []


def test_env_with_a_key_flag_imports_nothing_heavy(tmp_path: Path) -> None:
    out, modules = run_profiled([*SOURCE, "env", "--key", KEY], tmp_path)
    assert out == f"OPENAI_API_KEY={KEY}\nOPENAI_BASE_URL={API_URL}/v1\n"
    assert heavy_among(modules) == []


def test_env_with_the_key_in_the_environment_imports_nothing_heavy(tmp_path: Path) -> None:
    out, modules = run_profiled([*SOURCE, "env"], tmp_path, TOKENROUTE_API_KEY=KEY)
    assert out == f"OPENAI_API_KEY={KEY}\nOPENAI_BASE_URL={API_URL}/v1\n"
    assert heavy_among(modules) == []


def test_env_json_imports_json_and_nothing_else_heavy(tmp_path: Path) -> None:
    out, modules = run_profiled([*SOURCE, "env", "--json"], tmp_path, TOKENROUTE_API_KEY=KEY)
    assert json.loads(out) == {"OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": f"{API_URL}/v1"}
    assert heavy_among(modules, allowed=("json", "re")) == []  # json's decoder imports re


def test_run_imports_nothing_heavy(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    out, modules = run_profiled([*SOURCE, "run", "--key", KEY, "--", "touch", str(marker)], tmp_path)
    assert (out, marker.exists()) == ("", True)
    assert heavy_among(modules) == []


def test_the_import_filter_counts_what_tokenroute_loads_and_nothing_before(tmp_path: Path) -> None:
    """Guards the filter itself, with a stand-in tokenroute: a wrapper's `re` is
    not counted; tokenroute's top-level and lazy imports are."""
    (tmp_path / "tokenroute.py").write_text("import decimal\n\n\ndef main():\n    import webbrowser\n")
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import re; import tokenroute; tokenroute.main()"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    modules = loaded_by_tokenroute(done.stderr)
    assert "tokenroute" in modules
    assert heavy_among(modules) == ["decimal", "webbrowser"]
