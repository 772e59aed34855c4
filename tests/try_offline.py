"""Try tokenroute end to end with no account and no network: the installed
`tokenroute` against the local gateway of tests/fake_gateway.py.

    python3 tests/try_offline.py

It starts the gateway on a free loopback port, inside this process, then runs
`tokenroute` through login, keys create, topup and test in a throwaway config
folder, printing each command before its output. The gateway stops when this
script ends, however it ends, so nothing is left running. Your own login,
keys and TOKENROUTE_* settings are neither read nor changed. Exit status: 0
when every step worked, else that of the first step that failed.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from typing import Mapping

from fake_gateway import FakeGateway

STEPS = [  # (arguments, a note shown after the command)
    (["--version"], ""),
    (["login", "--no-browser"], "the local gateway approves at once"),
    (["keys", "create", "--name", "sandbox"], ""),
    (["topup", "--amount", "5", "--no-browser"], "the local gateway counts it as paid at once"),
    (["test"], "one chat completion with the new key"),
]


def sandbox_env(env: Mapping[str, str], api_url: str, config_dir: str) -> dict[str, str]:
    sandbox = {name: value for name, value in env.items() if not name.startswith("TOKENROUTE_")}
    sandbox.update(TOKENROUTE_API_URL=api_url, TOKENROUTE_CONFIG_DIR=config_dir)
    return sandbox


def installed_tokenroute() -> str | None:
    """The `tokenroute` installed with the Python running this script, else the first on PATH."""
    return shutil.which("tokenroute", path=os.path.dirname(sys.executable)) or shutil.which("tokenroute")


def main() -> int:
    tokenroute = installed_tokenroute()
    if tokenroute is None:
        print("try_offline: no `tokenroute` command on PATH: run `pip install .` in this repository first",
              file=sys.stderr)
        return 1
    gateway = FakeGateway(auto_approve=True, auto_pay=True, interval=1).start()
    try:
        with tempfile.TemporaryDirectory(prefix="tokenroute-try-") as config_dir:
            env = sandbox_env(os.environ, gateway.url, config_dir)
            print(f"Local gateway on {gateway.url} (stopped at the end); config in a throwaway folder", flush=True)
            for step, note in STEPS:
                command = "tokenroute " + " ".join(step)
                print(f"$ {command}" + (f"    # {note}" if note else ""), flush=True)
                code = subprocess.run([tokenroute, *step], env=env, stdin=subprocess.DEVNULL).returncode
                if code != 0:
                    print(f"try_offline: `{command}` failed (exit {code})", file=sys.stderr)
                    return code
        return 0
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader left (`| head`): stop quietly, as tokenroute does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    finally:
        gateway.stop()


if __name__ == "__main__":
    raise SystemExit(main())
