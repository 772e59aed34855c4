"""Start-up, request-overhead and HTTPS benchmark of tokenroute (issues 5, 10); not a pytest test.

    python tests/bench.py                # 25 pairs per measurement, both parts
    python tests/bench.py --pairs 50     # steadier numbers
    python tests/bench.py --quick        # 5 pairs: a smoke run, not a measurement
    python tests/bench.py --part https   # only the HTTPS part (--part startup: only the first)
    python tests/bench.py --part single-file --pairs 60   # README's single-file download costs

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

The HTTPS part (issue 10) rebuilds a real machine's trust setup in a temp
folder: a bundle = the system bundle plus the test CA (tests/tls/ca.pem), a
hashed directory = the system bundle's certificates plus the test CA, hashed
by `openssl rehash`; both programs get them as SSL_CERT_FILE and SSL_CERT_DIR
and talk to the fake gateway serving https with a certificate of that CA.
It times `tokenroute models` and `balance` against a careful stdlib script
(one `ssl.create_default_context()`, one `urlopen`, `json.load`), and
`doctor` and a `balance` that refreshes its access token against today's
code (tokenroute.py at BASELINE_COMMIT, the commit issue 10 started from),
and shows `models` against the floor: a process that only imports the
modules any stdlib HTTPS client needs.
Both tokenroutes run as `python -c "import tokenroute; tokenroute.main()"`
from their own folder (bytecode cached, no console-script wrapper), so only
their code differs. Needs the openssl command and git.

The MCP part (issue 17) times `tokenroute mcp` answering `initialize` (and then
`tools/list`) and exiting at the end of its input, and `--version` as a control,
against the same module at MCP_BASELINE_COMMIT (1.0.0, before issue 17 moved tool
calls to the main thread and stdin to a reader thread): all run as
`python -c "import tokenroute; ..."` from their own folder, each round every row
of both, forwards then backwards; wall and CPU time ratios. The target is on
initialize's time less the control's in the same round (the ratio of their
medians): the server's own start, apart from the module's growth, which every
command pays (the startup part's targets judge that).

The single-file part (issue 12, not in "all") times `--version` run the ways
the README's single-file download offers (`python tokenroute.py`, `python -m
tokenroute` next to it) against the uv-installed command and `python -c
pass`: the four in turn, `--pairs` rounds, the CPU time of each child (user +
system, from os.wait4), which a loaded machine disturbs less than wall time.
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
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from fake_gateway import FakeGateway  # noqa: E402

TIME_LIMITS = {"--version": 1.15, "env": 1.15, "run": 1.15, "--help": 2.3, "models": 1.05, "balance": 1.05}
RSS_LIMIT_MIB = 1.0
WHEEL_LIMIT_BYTES = 73_000  # 30_000 before issues 8-12; about 15 KB of it is the README (the long description)
WARMUP_RUNS = 3  # the first run of each writes __pycache__, as on a user's machine
RSS_RUNS = 5
GNU_TIME = "/usr/bin/time"

MCP_LIMIT = 1.05  # the server starts and answers initialize as fast as 1.0.0's did, within noise
MCP_BASELINE_COMMIT = "9fb15b9"  # 1.0.0
MCP_INITIALIZE = (b'{"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-06-18", '
                  b'"capabilities": {}, "clientInfo": {"name": "bench", "version": "0"}}}\n')
MCP_TOOLS_LIST = b'{"jsonrpc": "2.0", "id": 2, "method": "tools/list"}\n'

HTTPS_LIMITS = {"models": 0.75, "balance": 0.75, "doctor": 0.6, "refresh": 0.6}
BASELINE_COMMIT = "4b1b3ae"  # main before issue 10: a new TLS context (and bundle load) per request

EXEC_TRUE = "import os; os.execvp('true', ['true'])"  # the baseline of `run -- true`: Python, then exec
FETCH_SCRIPT = """\
import json, sys, urllib.request
request = urllib.request.Request(sys.argv[1], headers={"Authorization": sys.argv[2]})
with urllib.request.urlopen(request) as response:
    print(json.loads(response.read()))
"""

CAREFUL_FETCH_SCRIPT = """\
import json, ssl, sys, urllib.request
context = ssl.create_default_context()
request = urllib.request.Request(sys.argv[1], headers={"Authorization": sys.argv[2]})
with urllib.request.urlopen(request, context=context) as response:
    print(json.load(response))
"""

IMPORTS_ONLY = "import json, ssl, urllib.request"  # the floor: what any stdlib HTTPS client loads

RUN_TOKENROUTE = "import sys; sys.path.insert(0, sys.argv.pop(1)); import tokenroute; raise SystemExit(tokenroute.main())"


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
    config = tmp / "config"
    access_token = write_login(config, gateway, expires_in=86400)  # no refresh during the run
    skip = {"pythondontwritebytecode", "http_proxy", "https_proxy", "all_proxy", "no_proxy"}
    env = {k: v for k, v in os.environ.items() if k.lower() not in skip and not k.startswith("TOKENROUTE_")}
    env.update(TOKENROUTE_CONFIG_DIR=str(config), TOKENROUTE_API_URL=gateway.url, TOKENROUTE_API_KEY=key)
    fetches = {
        "models": [gateway.url + "/v1/models", "Bearer " + key],
        "balance": [gateway.url + "/api/v1/balance", "Bearer " + access_token],
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
    parser.add_argument("--part", choices=("all", "startup", "https", "mcp", "single-file"), default="all")
    args = parser.parse_args(argv)
    pairs = 5 if args.quick else args.pairs
    if pairs < 20:
        print(f"bench: {pairs} pairs is a smoke run; the targets are judged on >= 20", file=sys.stderr)
    met = []
    if args.part in ("all", "startup"):
        met.append(bench_startup(pairs))
    if args.part in ("all", "https"):
        met.append(bench_https(pairs))
    if args.part in ("all", "mcp"):
        met.append(bench_mcp(pairs))
    if args.part == "single-file":
        bench_single_file(pairs)
    return 0 if all(met) else 1


def bench_startup(pairs: int) -> bool:
    if not os.access(GNU_TIME, os.X_OK):
        raise SystemExit(f"bench: peak RSS needs GNU time at {GNU_TIME} (apt-get install time)")
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
    return all(met)


# ------------------------------------------------------------------- mcp ---


def mcp_answered(argv: list[str], env: dict[str, str], messages: bytes) -> tuple[float, float]:
    """Wall and CPU time (s) of `tokenroute mcp` answering MESSAGES, then exiting at the end of input."""
    start = time.perf_counter()
    child = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert child.stdin is not None and child.stdout is not None
    child.stdin.write(messages)
    child.stdin.close()
    out = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0 or out.count(b"\n") != messages.count(b"\n"):  # --version: one line
        raise SystemExit(f"bench: {' '.join(argv)} did not answer: {out!r}")
    return elapsed, usage.ru_utime + usage.ru_stime


def bench_mcp(pairs: int) -> bool:
    with tempfile.TemporaryDirectory(prefix="tokenroute-bench-mcp-") as tmpdir:
        tmp = Path(tmpdir)
        baseline = subprocess.run(["git", "-C", str(REPO), "show", f"{MCP_BASELINE_COMMIT}:tokenroute.py"],
                                  check=True, capture_output=True).stdout
        for name, source in (("new", (REPO / "tokenroute.py").read_bytes()), ("1.0.0", baseline)):
            (tmp / name).mkdir()
            (tmp / name / "tokenroute.py").write_bytes(source)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENROUTE_", "PYTHONDONTWRITEBYTECODE"))}
        env["TOKENROUTE_CONFIG_DIR"] = str(tmp / "config")
        print(f"\nMCP: {pairs} rounds after {WARMUP_RUNS} warm-up runs, each round every row of both modules,"
              f" in turn forwards and backwards; load average {os.getloadavg()[0]:.1f}\n", flush=True)
        rows = {"initialize": (["mcp"], MCP_INITIALIZE),
                "initialize + tools/list": (["mcp"], MCP_INITIALIZE + MCP_TOOLS_LIST),
                "--version (control)": (["--version"], b"\n")}  # the cost of a bigger module, in every command
        runs = [(label, name) for label in rows for name in ("new", "1.0.0")]
        argv = {(label, name): [sys.executable, "-c", RUN_TOKENROUTE, str(tmp / name), *rows[label][0]]
                for label, name in runs}
        for _ in range(WARMUP_RUNS):
            for run in runs:
                mcp_answered(argv[run], env, rows[run[0]][1])
        times: dict[tuple[str, str], list[tuple[float, float]]] = {run: [] for run in runs}
        for number in range(pairs):
            for run in runs if number % 2 == 0 else runs[::-1]:
                times[run].append(mcp_answered(argv[run], env, rows[run[0]][1]))

        def ratios(label: str, index: int) -> list[float]:
            """Per round, new / 1.0.0: wall time (index 0) or CPU time (1)."""
            return [a[index] / b[index] for a, b in zip(times[label, "new"], times[label, "1.0.0"])]

        for label in rows:
            wall = ratios(label, 0)
            print(f"{label:<29} vs 1.0.0  median {statistics.median(wall):.2f}x  [{min(wall):.2f}-{max(wall):.2f}]"
                  f"  {1000 * statistics.median(t for t, _ in times[label, 'new']):5.1f} /"
                  f" {1000 * statistics.median(t for t, _ in times[label, '1.0.0']):5.1f} ms;"
                  f"  CPU {statistics.median(ratios(label, 1)):.2f}x", flush=True)
        # The server's own start: initialize's time less the control's in the same round, so that the
        # module's growth (a bigger file to load, which every command pays) is taken out.
        own = {name: [i[0] - v[0] for i, v in zip(times["initialize", name], times["--version (control)", name])]
               for name in ("new", "1.0.0")}
        own_cpu = {name: [i[1] - v[1] for i, v in zip(times["initialize", name], times["--version (control)", name])]
                   for name in ("new", "1.0.0")}
        median = statistics.median(own["new"]) / statistics.median(own["1.0.0"])
        cpu = statistics.median(own_cpu["new"]) / statistics.median(own_cpu["1.0.0"])
        print(f"{'initialize - control':<29} vs 1.0.0  {median:.2f}x of the medians"
              f"  {1000 * statistics.median(own['new']):5.1f} / {1000 * statistics.median(own['1.0.0']):5.1f} ms;"
              f"  CPU {cpu:.2f}x  (the server's own start)")
    print("\ntargets (MCP, against 1.0.0):")
    met = median <= MCP_LIMIT
    print(f"target: mcp initialize - --version {median:.2f}x (<= {MCP_LIMIT}) {verdict(met)}  (CPU time {cpu:.2f}x)")
    return met


# ----------------------------------------------------------- single file ---


def cpu_once(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float]:
    """CPU time (user + system) and wall time (s) of one child process."""
    start = time.perf_counter()
    child = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"bench: {' '.join(argv)} exited {child.returncode}")
    return usage.ru_utime + usage.ru_stime, wall


def bench_single_file(pairs: int) -> None:
    with tempfile.TemporaryDirectory(prefix="tokenroute-bench-") as tmpdir:
        tmp = Path(tmpdir)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "TOKENROUTE_"))}
        uv_bin = install_with_uv(tmp)
        check_installed_source(uv_bin / "python", env)
        download = tmp / "download"  # a folder holding only the released file
        download.mkdir()
        shutil.copy2(REPO / "tokenroute.py", download / "tokenroute.py")
        rows = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "the uv-installed tokenroute": [str(uv_bin / "tokenroute"), "--version"],
            "python tokenroute.py (compiled every run)": [sys.executable, "tokenroute.py", "--version"],
            "python -m tokenroute (bytecode cached)": [sys.executable, "-m", "tokenroute", "--version"],
        }
        for argv in rows.values():
            for _ in range(WARMUP_RUNS):
                cpu_once(argv, env, download)
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in rows}
        for round_number in range(pairs):
            names = list(rows)
            shift = round_number % len(names)  # a different one goes first each round
            for name in names[shift:] + names[:shift]:
                runs[name].append(cpu_once(rows[name], env, download))
    base = runs["python -c pass"]
    print(f"Python {sys.version.split()[0]}, {pairs} rounds, medians; load average {os.getloadavg()[0]:.1f}\n")
    print("| `--version` run as | CPU ms | ratio to `python -c pass` | wall-time ratio |\n|---|---|---|---|")
    for name, times in runs.items():
        cpu = statistics.median(c for c, _ in times)
        cpu_ratio = statistics.median(c / b for (c, _), (b, _) in zip(times, base))
        wall_ratio = statistics.median(w / b for (_, w), (_, b) in zip(times, base))
        print(f"| {name} | {1000 * cpu:.1f} | {cpu_ratio:.2f}x | {wall_ratio:.2f}x |")


# ----------------------------------------------------------------- https ---


def trust_setup(tmp: Path, *, with_test_ca_in_directory: bool = True) -> dict[str, str]:
    """SSL_CERT_FILE and SSL_CERT_DIR of a real machine that also trusts the test CA."""
    import ssl

    paths = ssl.get_default_verify_paths()
    system_bundle = Path(paths.cafile or paths.openssl_cafile).resolve()
    test_ca = (REPO / "tests" / "tls" / "ca.pem").read_text()
    pems = [block + "-----END CERTIFICATE-----\n"
            for block in system_bundle.read_text().split("-----END CERTIFICATE-----")[:-1]]
    folder = tmp / ("trust" if with_test_ca_in_directory else "trust-bundle-only")
    certs = folder / "certs"
    certs.mkdir(parents=True)
    (folder / "bundle.pem").write_text("".join(pems) + test_ca)
    for number, pem in enumerate(pems):
        (certs / f"system-{number}.pem").write_text(pem[pem.index("-----BEGIN"):])
    if with_test_ca_in_directory:
        (certs / "test-ca.pem").write_text(test_ca)
    subprocess.run(["openssl", "rehash", str(certs)], check=True, capture_output=True)
    return {"SSL_CERT_FILE": str(folder / "bundle.pem"), "SSL_CERT_DIR": str(certs)}


def write_login(config: Path, gateway: FakeGateway, *, expires_in: int) -> str:
    """Store a login as tokenroute writes it (folder "today": as the code before issue 8 did);
    returns its access token."""
    tokens = gateway.issue_tokens(expires_in=expires_in)
    config.parent.mkdir(exist_ok=True)
    config.mkdir(mode=0o700, exist_ok=True)
    login = {
        "api_url": gateway.url,
        "access_token": tokens["access_token"],
        "refresh_token": tokens["refresh_token"],
        "expires_at": time.time() + expires_in,
        "token_endpoint": gateway.url + "/oidc/token",
        "client_id": "tokenroute-cli",
        "resource": gateway.resource,
    }
    credentials = config / "credentials.json"
    before_issue_8 = config.parent.name.endswith("today")  # one login, no version
    credentials.write_text(json.dumps(login if before_issue_8 else {"version": 2, "logins": {gateway.url: login}}))
    credentials.chmod(0o600)
    return tokens["access_token"]


def timed(argv: list[str], env: dict[str, str], before: Callable[[], None] | None) -> tuple[float, float]:
    """Wall time and CPU time (user + system, from wait4) of one child process, in seconds."""
    if before is not None:
        before()  # outside the timing
    start = time.perf_counter()
    child = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    elapsed = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"bench: {' '.join(argv)} exited {child.returncode}")
    return elapsed, usage.ru_utime + usage.ru_stime


def compare_https(a: list[str], b: list[str], env_a: dict[str, str], env_b: dict[str, str], pairs: int, *,
                  before_a: Callable[[], None] | None = None,
                  before_b: Callable[[], None] | None = None) -> dict[str, float]:
    """Medians of the pairwise ratios A/B of wall time (the target) and of CPU time.

    On a shared machine the wall time of a ~50 ms process swings with the
    load; its CPU time much less, so the bench shows both.
    """
    for _ in range(WARMUP_RUNS):
        timed(a, env_a, before_a)
        timed(b, env_b, before_b)
    runs = []
    for number in range(pairs):  # paired, and alternating which side goes first
        if number % 2:
            run_b, run_a = timed(b, env_b, before_b), timed(a, env_a, before_a)
        else:
            run_a, run_b = timed(a, env_a, before_a), timed(b, env_b, before_b)
        runs.append((run_a, run_b))
    ratios = [run_a[0] / run_b[0] for run_a, run_b in runs]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
            "cpu": statistics.median(run_a[1] / run_b[1] for run_a, run_b in runs),
            "ms_a": 1000 * statistics.median(run_a[0] for run_a, _ in runs),
            "ms_b": 1000 * statistics.median(run_b[0] for _, run_b in runs),
            "cpu_ms_a": 1000 * statistics.median(run_a[1] for run_a, _ in runs),
            "cpu_ms_b": 1000 * statistics.median(run_b[1] for _, run_b in runs)}


def bench_https(pairs: int) -> bool:
    import ssl

    from fake_gateway import server_tls_context

    if shutil.which("openssl") is None:
        raise SystemExit("bench: the HTTPS part needs the openssl command (openssl rehash)")
    with tempfile.TemporaryDirectory(prefix="tokenroute-bench-https-") as tmpdir:
        tmp = Path(tmpdir)
        trust, bundle_only = trust_setup(tmp), trust_setup(tmp, with_test_ca_in_directory=False)
        for name, source in (("new", (REPO / "tokenroute.py").read_bytes()),
                             ("today", subprocess.run(["git", "-C", str(REPO), "show", f"{BASELINE_COMMIT}:tokenroute.py"],
                                                      check=True, capture_output=True).stdout)):
            (tmp / name).mkdir()
            (tmp / name / "tokenroute.py").write_bytes(source)
        (tmp / "fetch.py").write_text(CAREFUL_FETCH_SCRIPT)
        gateway = FakeGateway(tls=server_tls_context()).start()
        try:
            key = gateway.add_key(name="seed", balance_usd="5.00")["raw"]
            skip = {"pythondontwritebytecode", "http_proxy", "https_proxy", "all_proxy", "no_proxy"}
            base = {k: v for k, v in os.environ.items()
                    if k.lower() not in skip and not k.startswith(("TOKENROUTE_", "SSL_CERT_"))}
            base.update(TOKENROUTE_API_URL=gateway.url, TOKENROUTE_API_KEY=key, **trust)
            env = {name: {**base, "TOKENROUTE_CONFIG_DIR": str(tmp / name / "config")}
                   for name in ("new", "today", "refresh-new", "refresh-today")}
            for name in ("new", "today"):
                write_login(tmp / name / "config", gateway, expires_in=86400)
            token = json.loads((tmp / "new" / "config" / "credentials.json").read_text())["logins"][gateway.url]["access_token"]
            python, fetch = sys.executable, str(tmp / "fetch.py")

            def tokenroute(name: str, *argv: str) -> list[str]:
                return [python, "-c", RUN_TOKENROUTE, str(tmp / name), *argv]

            def expired_login(name: str) -> Callable[[], None]:
                return lambda: write_login(tmp / name / "config", gateway, expires_in=0)

            version = ssl.OPENSSL_VERSION
            load = {kind: statistics.median(context_load_ms(**{kind: trust[variable]}) for _ in range(9))
                    for kind, variable in (("cafile", "SSL_CERT_FILE"), ("capath", "SSL_CERT_DIR"))}
            print(f"\nHTTPS: {pairs} pairs per row after {WARMUP_RUNS} warm-up runs, alternating which goes first;"
                  f" {version}; a bundle of {trust_size(trust)} certificates: create_default_context() loading it"
                  f" {load['cafile']:.1f} ms, loading the hashed directory {load['capath']:.1f} ms;"
                  f" load average {os.getloadavg()[0]:.1f}\n", flush=True)
            rows = [
                ("models", tokenroute("new", "models"), [python, fetch, gateway.url + "/v1/models", "Bearer " + key],
                 env["new"], env["new"], "careful script", {}),
                ("balance", tokenroute("new", "balance"),
                 [python, fetch, gateway.url + "/api/v1/balance", "Bearer " + token], env["new"], env["new"],
                 "careful script", {}),
                ("models (floor)", tokenroute("new", "models"), [python, "-c", IMPORTS_ONLY],
                 env["new"], env["new"], "imports only", {}),
                ("models (today)", tokenroute("today", "models"),
                 [python, fetch, gateway.url + "/v1/models", "Bearer " + key], env["today"], env["today"],
                 "careful script", {}),
                ("models, CA only in the bundle", tokenroute("new", "models"),
                 [python, fetch, gateway.url + "/v1/models", "Bearer " + key], {**env["new"], **bundle_only},
                 {**env["new"], **bundle_only}, "careful script", {}),
                ("doctor", tokenroute("new", "doctor"), tokenroute("today", "doctor"), env["new"], env["today"],
                 "today's code", {}),
                ("refresh", tokenroute("new", "balance"), tokenroute("today", "balance"), env["refresh-new"],
                 env["refresh-today"], "today's code",
                 {"before_a": expired_login("refresh-new"), "before_b": expired_login("refresh-today")}),
            ]
            results = {}
            for label, a, b, env_a, env_b, against, hooks in rows:
                r = results[label] = compare_https(a, b, env_a, env_b, pairs, **hooks)
                print(f"{label:<30} vs {against:<15} median {r['median']:.2f}x  [{r['min']:.2f}-{r['max']:.2f}]"
                      f"  {r['ms_a']:6.1f} / {r['ms_b']:6.1f} ms;  CPU {r['cpu']:.2f}x"
                      f"  {r['cpu_ms_a']:5.1f} / {r['cpu_ms_b']:5.1f} ms", flush=True)
            handshakes = gateway.handshakes
        finally:
            gateway.stop()
    print(f"(gateway: {handshakes['ok']} handshakes, {handshakes['failed']} refused by a client: the fallbacks)")
    print("\ntargets (HTTPS; refresh = `balance` with an expired access token):")
    met = []
    for label, limit in HTTPS_LIMITS.items():
        median = results[label]["median"]
        met.append(median <= limit)
        print(f"target: {label} median {median:.2f}x (<= {limit}) {verdict(met[-1])}"
              f"  (CPU time {results[label]['cpu']:.2f}x)")
    return all(met)


def context_load_ms(**where: str) -> float:
    import ssl

    start = time.perf_counter()
    ssl.create_default_context(**where)
    return 1000 * (time.perf_counter() - start)


def trust_size(trust: dict[str, str]) -> int:
    return Path(trust["SSL_CERT_FILE"]).read_text().count("-----BEGIN CERTIFICATE-----")


if __name__ == "__main__":
    raise SystemExit(main())
