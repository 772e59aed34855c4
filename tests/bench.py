"""Start-up and request-overhead benchmark of tokenroute (issue 5); not a pytest test.

    python tests/bench.py              # 25 pairs per measurement
    python tests/bench.py --pairs 50   # steadier numbers
    python tests/bench.py --quick      # 5 pairs: a smoke run, not a measurement

It installs this repository into a uv venv (the targets: what `uvx tokenroute`
users run) and a pip venv, and also runs `python tokenroute.py` from the tree.
Each command runs alternately with a baseline on the same interpreter
(A B A B ..., after warm-up): `python -c pass` for offline commands, and for
network commands a minimal stdlib script that does one `urlopen` of the same
URL on the in-process fake gateway, `json.loads` and `print`; for `run -- true`,
`python -c` doing `os.execvp("true", ...)`. It reports the
median, min and max of the pairwise time ratios A/B, each side's median peak
RSS, the wheel size, and one `target:` line per target; it exits 1 when a
target is not met.

Peak RSS comes from GNU time (`/usr/bin/time -f %M`, Debian package `time`),
in separate runs: Linux carries the forking process's peak RSS into the
child's ru_maxrss across exec, so os.wait4 in this ~25 MiB process would
report this process, not the child; GNU time is small and waits for its own
child. Linux only; needs uv (from PyPI, a dev-only tool).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from fake_gateway import FakeGateway  # noqa: E402

TIME_LIMITS = {"--version": 1.15, "env": 1.15, "run": 1.15, "--help": 2.3, "models": 1.05, "balance": 1.05}
RSS_LIMIT_MIB = 1.0
WHEEL_LIMIT_BYTES = 40_000  # 30_000 before issue 9 (run, env --write, readable output)
WARMUP_RUNS = 3  # the first run of each writes __pycache__, as on a user's machine
RSS_RUNS = 5
GNU_TIME = "/usr/bin/time"

EXEC_TRUE = "import os; os.execvp('true', ['true'])"  # the baseline of `run -- true`: Python, then exec
FETCH_SCRIPT = """\
import json, sys, urllib.request
request = urllib.request.Request(sys.argv[1], headers={"Authorization": sys.argv[2]})
with urllib.request.urlopen(request) as response:
    print(json.loads(response.read()))
"""


# --------------------------------------------------------------- running ---


def run_once(argv: list[str], env: dict[str, str]) -> float:
    """Wall time (s) of one child process, spawn to exit."""
    start = time.perf_counter()
    child = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    code = child.wait()
    elapsed = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"bench: {' '.join(argv)} exited {code}")
    return elapsed


def peak_rss(argv: list[str], env: dict[str, str], out: Path) -> float:
    """Median peak RSS (MiB) of `argv` over RSS_RUNS runs, as GNU time's child."""
    peaks = []
    for _ in range(RSS_RUNS):
        subprocess.run([GNU_TIME, "-f", "%M", "-o", str(out), *argv], env=env, check=True,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        peaks.append(int(out.read_text().split()[-1]) / 1024)  # KiB
    return statistics.median(peaks)


def warm_up(argv: list[str], env: dict[str, str], expect: str) -> None:
    done = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if done.returncode != 0 or expect not in done.stdout:
        raise SystemExit(f"bench: {' '.join(argv)} exited {done.returncode}, wanted {expect!r} in stdout:\n"
                         f"{done.stdout}{done.stderr}")
    for _ in range(WARMUP_RUNS - 1):
        run_once(argv, env)


def compare(a: list[str], b: list[str], env: dict[str, str], pairs: int, tmp: Path) -> dict[str, float]:
    """Alternate A and B `pairs` times; ratios are A/B within each pair."""
    runs = [(run_once(a, env), run_once(b, env)) for _ in range(pairs)]
    ratios = [time_a / time_b for time_a, time_b in runs]
    return {
        "median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
        "ms_a": 1000 * statistics.median(time_a for time_a, _ in runs),
        "ms_b": 1000 * statistics.median(time_b for _, time_b in runs),
        "rss_a": peak_rss(a, env, tmp / "rss.txt"), "rss_b": peak_rss(b, env, tmp / "rss.txt"),
    }


# ----------------------------------------------------------------- setup ---


def find_uv() -> list[str]:
    if shutil.which("uv"):
        return ["uv"]
    module = [sys.executable, "-m", "uv"]
    if subprocess.run([*module, "--version"], capture_output=True).returncode == 0:
        return module
    print("bench: uv not found; installing it from PyPI into this interpreter (a dev-only tool)", file=sys.stderr)
    if subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "uv"]).returncode != 0:
        raise SystemExit("bench: could not install uv; `pip install uv` and run again")
    return module


def install_with_uv(tmp: Path) -> Path:
    uv, venv = find_uv(), tmp / "uv-venv"
    subprocess.run([*uv, "venv", "--quiet", "--python", sys.executable, str(venv)], check=True)
    python = venv / "bin" / "python"
    # uv caches local builds keyed on pyproject.toml, not tokenroute.py: force a rebuild.
    subprocess.run([*uv, "pip", "install", "--quiet", "--python", str(python),
                    "--reinstall-package", "tokenroute", str(REPO)], check=True)
    return venv / "bin"


def install_with_pip(tmp: Path) -> Path:
    venv = tmp / "pip-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", str(REPO)], check=True)
    return venv / "bin"


def check_installed_source(python: Path, env: dict[str, str]) -> None:
    where = subprocess.run([str(python), "-c", "import tokenroute; print(tokenroute.__file__)"],
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    if Path(where).read_bytes() != (REPO / "tokenroute.py").read_bytes():
        raise SystemExit(f"bench: {where} is not this tree's tokenroute.py (a stale build?)")


def wheel_size(tmp: Path) -> int:
    out = tmp / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), str(REPO)],
                   check=True)
    (wheel,) = out.glob("tokenroute-*.whl")
    return wheel.stat().st_size


def start_gateway(tmp: Path) -> tuple[FakeGateway, dict[str, str], dict[str, str]]:
    """The gateway, a seeded key and login, the child environment, and the baselines' URLs."""
    gateway = FakeGateway().start()
    key = gateway.add_key(name="seed", balance_usd="5.00")["raw"]
    tokens = gateway.issue_tokens(expires_in=86400)  # no refresh during the run
    config = tmp / "config"
    config.mkdir(mode=0o700)
    credentials = config / "credentials.json"
    credentials.write_text(json.dumps({
        "api_url": gateway.url,
        "access_token": tokens["access_token"],
        "refresh_token": tokens["refresh_token"],
        "expires_at": time.time() + tokens["expires_in"],
        "token_endpoint": gateway.url + "/oidc/token",
        "client_id": "tokenroute-cli",
        "resource": gateway.resource,
    }))
    credentials.chmod(0o600)
    skip = {"pythondontwritebytecode", "http_proxy", "https_proxy", "all_proxy", "no_proxy"}
    env = {k: v for k, v in os.environ.items() if k.lower() not in skip and not k.startswith("TOKENROUTE_")}
    env.update(TOKENROUTE_CONFIG_DIR=str(config), TOKENROUTE_API_URL=gateway.url, TOKENROUTE_API_KEY=key)
    fetches = {
        "models": [gateway.url + "/v1/models", "Bearer " + key],
        "balance": [gateway.url + "/api/v1/balance", "Bearer " + tokens["access_token"]],
    }
    return gateway, env, fetches


# ---------------------------------------------------------------- report ---

COMMANDS = [  # name, argv after the script, what stdout must contain
    ("--version", ["--version"], "tokenroute "),
    ("env", ["env"], "OPENAI_API_KEY="),
    ("run", ["run", "--", "true"], ""),
    ("--help", ["--help"], "usage: tokenroute"),
    ("models", ["models"], "openai/"),
    ("balance", ["balance"], "Balance:"),
]


def bench_setup(name: str, script: list[str], python: str, env: dict[str, str], fetches: dict[str, list[str]],
                tmp: Path, pairs: int) -> dict[str, dict[str, float]]:
    results = {}
    for command, argv, expect in COMMANDS:
        if command in fetches:
            baseline, label = [python, str(tmp / "fetch.py"), *fetches[command]], "urlopen script"
            warm_up(baseline, env, "{")
        elif command == "run":
            baseline, label = [python, "-c", EXEC_TRUE], "execvp true"
            warm_up(baseline, env, "")
        else:
            baseline, label = [python, "-c", "pass"], "python -c pass"
            warm_up(baseline, env, "")
        warm_up([*script, *argv], env, expect)
        r = results[command] = compare([*script, *argv], baseline, env, pairs, tmp)
        print(f"{name:<7}{command:<10} vs {label:<15} median {r['median']:.2f}x  [{r['min']:.2f}-{r['max']:.2f}]"
              f"  {r['ms_a']:5.1f} / {r['ms_b']:5.1f} ms"
              f"  RSS {r['rss_a']:5.1f} / {r['rss_b']:5.1f} MiB ({r['rss_a'] - r['rss_b']:+.2f})", flush=True)
    return results


def verdict(met: bool) -> str:
    return "MET" if met else "NOT MET"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=25, help="A/B pairs per measurement (default 25; >= 20 counts)")
    parser.add_argument("--quick", action="store_true", help="a fast smoke run: 5 pairs")
    args = parser.parse_args(argv)
    pairs = 5 if args.quick else args.pairs
    if not os.access(GNU_TIME, os.X_OK):
        raise SystemExit(f"bench: peak RSS needs GNU time at {GNU_TIME} (apt-get install time)")
    if pairs < 20:
        print(f"bench: {pairs} pairs is a smoke run; the targets are judged on >= 20", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="tokenroute-bench-") as tmpdir:
        tmp = Path(tmpdir)
        gateway, env, fetches = start_gateway(tmp)
        try:
            (tmp / "fetch.py").write_text(FETCH_SCRIPT)
            uv_bin, pip_bin = install_with_uv(tmp), install_with_pip(tmp)
            check_installed_source(uv_bin / "python", env)
            check_installed_source(pip_bin / "python", env)
            print(f"{pairs} pairs per row after {WARMUP_RUNS} warm-up runs; ratio = command / baseline time;"
                  f" times and RSS are medians (command / baseline); load average {os.getloadavg()[0]:.1f}"
                  " (other processes on the machine skew timings)\n", flush=True)
            setups = [
                ("uv", [str(uv_bin / "tokenroute")], str(uv_bin / "python")),
                ("pip", [str(pip_bin / "tokenroute")], str(pip_bin / "python")),
                ("source", [sys.executable, str(REPO / "tokenroute.py")], sys.executable),
            ]
            results = {name: bench_setup(name, script, python, env, fetches, tmp, pairs)
                       for name, script, python in setups}
            wheel = wheel_size(tmp)
        finally:
            gateway.stop()
    print("\ntargets (uv-installed console script):")
    met = []
    for command, limit in TIME_LIMITS.items():
        median = results["uv"][command]["median"]
        met.append(median <= limit)
        print(f"target: {command} median {median:.2f}x (<= {limit}) {verdict(met[-1])}")
    for command, _, _ in COMMANDS:
        extra = results["uv"][command]["rss_a"] - results["uv"][command]["rss_b"]
        met.append(extra <= RSS_LIMIT_MIB)
        print(f"target: {command} peak RSS {extra:+.2f} MiB (<= {RSS_LIMIT_MIB:g} MiB) {verdict(met[-1])}")
    met.append(wheel < WHEEL_LIMIT_BYTES)
    print(f"target: wheel {wheel / 1000:.1f} KB (< {WHEEL_LIMIT_BYTES // 1000} KB) {verdict(met[-1])}")
    return 0 if all(met) else 1


if __name__ == "__main__":
    raise SystemExit(main())
