"""Fuzz `main()` over thousands of generated argv, environments, files and gateway answers.

Every case is generated up front from one fixed seed, as plain data with
placeholders ($GW, $REC, $KEY, ...) filled in at run time, so any case can be
replayed alone:

    TOKENROUTE_FUZZ_CASE=1234 python -m pytest tests/test_fuzz.py

(TOKENROUTE_FUZZ_CASES=N changes how many cases run.) Every run must end
with an exit code in {0, 1, 2, 3, 130} and no traceback, leave the credential
files valid JSON objects, untouched or absent (never half-written, never a
temp file, always owner-only), print nothing a terminal would interpret, and
never send an account token, or any bearer token it was not configured to
send there, to the gateway's recording listener.
"""
from __future__ import annotations

import io
import json
import os
import random
import shutil
import socket
import stat
import string
import traceback
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlsplit

import pytest

import tokenroute
from conftest import Clock
from fake_gateway import FakeGateway

SEED = 1234
CASES = int(os.environ.get("TOKENROUTE_FUZZ_CASES", "3000"))
ONLY = os.environ.get("TOKENROUTE_FUZZ_CASE")
MAX_SLEEPS = 40  # a login nobody approves ends with Ctrl-C after this many polls
EXIT_CODES = {0, 1, 2, 3, 130}
LOOPBACK = ("127.0.0.1", "localhost", "::1")

PATHS = {
    "discovery": "/api/v1/auth/discovery",
    "device": "/oidc/device/auth",
    "token": "/oidc/token",
    "me": "/api/v1/me",
    "balance": "/api/v1/balance",
    "keys": "/api/v1/me/keys",
    "topup": "/api/v1/topup",
    "usage": "/api/v1/me/usage",
    "models": "/v1/models",
    "chat": "/v1/chat/completions",
}
COMMAND_PATHS = {
    "login": ["discovery", "device", "token", "token", "token"],
    "whoami": ["me", "token"],
    "balance": ["balance", "token"],
    "keys": ["keys", "token"],
    "topup": ["topup", "token"],
    "usage": ["usage", "token"],
    "test": ["chat"],
    "models": ["models"],
    "doctor": ["discovery", "me", "models", "token"],
    "status": ["discovery", "me", "models"],
}

# ---------------------------------------------------------------- generation


def pick(rng: random.Random, *choices: Any) -> Any:
    return rng.choice(choices)


def text(rng: random.Random, limit: int = 6) -> str:
    pieces = [
        "ok", "OK", "agent", "\x1b[31m", "\x1b]0;owned\x07", "\x1b[2J", "\r", "\b", "\u202e", "\x9b", "\x00",
        "é", "中文", "🙂", "\u2028", " ", "\t", "\n", "\\", '"', "'", "#", "$HOME", "`id`", "%s", "{}", "<b>",
        "javascript:alert(1)", "$REC/x", "sk-tr-" + "Ab1" * 8, "eyJhbGciOi" + "x" * 30,
    ]
    out = "".join(rng.choice(pieces) for _ in range(rng.randint(0, limit)))
    if rng.random() < 0.03:
        out += "x" * rng.choice((1000, 70000))
    return out


def word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_letters + string.digits + "-_./") for _ in range(rng.randint(1, 12)))


def json_value(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if depth > 2 or roll < 0.45:
        return pick(rng, None, True, False, 0, -1, 5, 10**30, 1.5, 1e308, "", "5.00", "0", text(rng), word(rng))
    if roll < 0.7:
        return [json_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {pick(rng, "id", "name", "detail", "error", "data", word(rng)): json_value(rng, depth + 1)
            for _ in range(rng.randint(0, 3))}


def usually(rng: random.Random, good: Any, *bad: Any, odds: float = 0.6) -> Any:
    """GOOD most of the time, else one of BAD: most runs should get past the parser."""
    return good if rng.random() < odds else rng.choice(bad)


def maybe(rng: random.Random, value: Any, odds: float = 0.25) -> Any:
    """VALUE, or now and then something of the wrong type or content."""
    return json_value(rng) if rng.random() < odds else value


URLS = (
    "https://checkout.stripe.com/c/pay/cs_1", "$GW/device", "$REC/steal", "http://example.invalid/x",
    "javascript:alert(1)", "file:///etc/passwd", "https://x/\x1b[2J", "", "//evil", "data:text/html,<b>",
    "https://[::1", "http://127.0.0.1:notaport/x",
)


def plausible(rng: random.Random, name: str, method: Optional[str]) -> Any:
    """An answer shaped like the real one for NAME, with some fields mangled."""
    if name == "discovery":
        return {
            "issuer": "$GW/oidc",
            "client_id": maybe(rng, "tokenroute-cli"),
            "resource": maybe(rng, "https://api.tokenroute.io"),
            "scopes": maybe(rng, ["openid", "offline_access"]),
            "device_authorization_endpoint": maybe(rng, pick(rng, "$GW/oidc/device/auth", *URLS)),
            "token_endpoint": maybe(rng, pick(rng, "$GW/oidc/token", "$REC/oidc/token", *URLS)),
        }
    if name == "device":
        return {
            "device_code": maybe(rng, "dc-" + word(rng)),
            "user_code": maybe(rng, pick(rng, "BCDF-GHJK", text(rng))),
            "verification_uri": maybe(rng, pick(rng, *URLS)),
            "verification_uri_complete": maybe(rng, pick(rng, *URLS)),
            "expires_in": pick(rng, 600, 0, -5, 10**400, 1e308, "600", None, 30),
            "interval": pick(rng, 5, 0, -1, 10**9, "5", None, 1.5, 1),
        }
    if name == "token":
        if rng.random() < 0.5:
            return {
                "error": pick(rng, "authorization_pending", "slow_down", "access_denied", "expired_token",
                              "invalid_grant", 5, None, text(rng)),
                "error_description": maybe(rng, text(rng)),
            }
        return {
            "access_token": pick(rng, "eyJhbGciOi" + word(rng), "", 5, None, "tok\nen", "a b", text(rng)),
            "refresh_token": pick(rng, word(rng), "", None, 7, "r t"),
            "expires_in": pick(rng, 3600, -5, 0, 1e308, 10**400, "3600", None, True, 1e309),
            "token_type": "Bearer",
        }
    if name == "me":
        return {field: maybe(rng, text(rng)) for field in tokenroute.ME_FIELDS}
    if name == "balance":
        return {"balance_usd": maybe(rng, "5.00"), "currency": maybe(rng, "USD")}
    if name == "keys" and method != "POST":
        return [maybe(rng, {field: maybe(rng, text(rng)) for field in tokenroute.KEY_COLUMNS})
                for _ in range(rng.randint(0, 4))]
    if name == "keys":
        return {"id": maybe(rng, "key_1"), "name": maybe(rng, text(rng)), "key_prefix": "sk-tr-Ab1A",
                "raw": pick(rng, "sk-tr-" + "Ab1" * 10, "sk-tr-x\ny", 5, None, "javascript:", ""),
                "balance_usd": "0.00", "status": "active"}
    if name == "topup":
        return {"checkout_url": maybe(rng, pick(rng, *URLS)), "session_id": maybe(rng, "cs_1"),
                "amount_usd": maybe(rng, "5"), "expires_at": maybe(rng, 1700000000)}
    if name == "usage":
        return {field: maybe(rng, 1) for field in tokenroute.USAGE_FIELDS}
    if name == "models":
        data = [{field: maybe(rng, text(rng)) for field in tokenroute.MODEL_COLUMNS} for _ in range(rng.randint(0, 3))]
        return {"object": "list", "data": maybe(rng, data)}
    return {"choices": maybe(rng, [{"message": {"role": "assistant", "content": maybe(rng, text(rng))}}]),
            "usage": json_value(rng)}


def error_body(rng: random.Random) -> Any:
    return pick(
        rng,
        {"detail": text(rng)},
        {"detail": [{"loc": ["body", text(rng)], "msg": text(rng)}, 5, None, {"loc": 7}]},
        {"error": {"message": text(rng), "type": "x", "code": "y"}},
        {"error": text(rng), "error_description": text(rng)},
        {"error": {"message": 5}},
        {"detail": None},
    )


HTML = b"<html><head><title>502 Bad Gateway</title></head><body><h1>502</h1><hr>nginx</body></html>\r\n"
FRAGMENTS = (b'{"detail": ', b"[", b'{"a":', b"null", b"true", b'"str"', b"123", b"1e999", b"NaN", b"{}", b"[]",
             b'{"detail": "\xff\xfe"}', b"[" * 3000 + b"]" * 3000, b"\x00\x00", b'{"a": 1}{"b": 2}')


def body(rng: random.Random, name: str, method: Optional[str]) -> Any:
    roll = rng.random()
    if roll < 0.08:
        return b""
    if roll < 0.16:
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 200)))
    if roll < 0.24:
        return rng.choice(FRAGMENTS)
    if roll < 0.30:
        return HTML
    if roll < 0.70:
        return plausible(rng, name, method)
    if roll < 0.88:
        return error_body(rng)
    if roll < 0.995:
        return json_value(rng)
    return b'{"detail": "' + b"x" * (5 * 1024 * 1024) + b'"}'


def headers(rng: random.Random) -> dict[str, str]:
    options = {
        "Location": ("$REC/steal", "$REC/oidc/token", "http://[::1", "javascript:x", "//evil", "$GW/api/v1/me",
                     "ftp://x/y", "http://127.0.0.1:notaport/", ""),
        "Retry-After": ("1", "0", "-5", "abc", "1e9", "nan", "inf", "Wed, 21 Oct 2015 07:28:00 GMT",
                        "99999999999999999999999", "2", "\u00e9"),
        "Content-Type": ("text/html", "application/json; charset=latin-1", "text/plain", "", "text/\x7fhtml"),
        "Content-Encoding": ("gzip", "br"),
        "Transfer-Encoding": ("chunked",),
        "WWW-Authenticate": ('Bearer error="invalid_token"',),
        "Set-Cookie": ("session=1; HttpOnly",),
    }
    chosen = {}
    for name, values in options.items():
        if rng.random() < (0.3 if name in ("Location", "Retry-After") else 0.06):
            chosen[name] = rng.choice(values)
    return chosen


STATUSES = (200, 200, 200, 200, 200, 201, 204, 301, 302, 303, 307, 308, 400, 401, 401, 402, 403, 404, 405, 409,
            418, 422, 429, 429, 500, 500, 502, 502, 503, 503, 504, 599, 600, 999, 100, 199)


def faults(rng: random.Random, command: str) -> list[dict[str, Any]]:
    made = []
    for _ in range(rng.choice((0, 1, 1, 2, 2, 3, 4))):
        relevant = COMMAND_PATHS.get(command)
        name = rng.choice(relevant) if relevant and rng.random() < 0.8 else rng.choice(list(PATHS))
        method = pick(rng, None, None, "GET", "POST", "DELETE")
        fault = {"path": PATHS[name], "method": method, "status": rng.choice(STATUSES),
                 "body": body(rng, name, method), "headers": headers(rng), "count": rng.randint(1, 4)}
        roll = rng.random()
        if roll < 0.08:
            fault["close"] = True
        elif roll < 0.16:
            fault["truncate"] = True
        if rng.random() < 0.1:
            fault["path"] = PATHS["keys"] + "/" + pick(rng, "key_1", "..%2Fx", "a%20b")
        made.append(fault)
    return made


ONLINE_COMMANDS = (
    ["login"], ["login", "--no-browser"], ["login", "--force"], ["login", "--no-wait"], ["login", "--resume"],
    ["login", "--resume", "--timeout", "T"], ["whoami"], ["balance"], ["keys", "create", "--name", "N"],
    ["keys", "create", "--name", "N", "--no-cache"], ["keys", "list"], ["keys", "revoke", "I"],
    ["topup", "--amount", "A"], ["topup", "--amount", "A", "--no-browser"], ["usage"], ["usage", "--days", "D"],
    ["test"], ["test", "--model", "M"], ["test", "--key", "K"], ["models"], ["models", "--key", "K"], ["doctor"],
    ["status"],
)
OFFLINE_COMMANDS = (
    ["logout"], ["env"], ["env", "--key", "K"], ["env", "--export"], ["env", "--shell", "S"], ["completion", "S"],
    ["--version"], ["--help"], ["keys", "--help"], ["keys"], [],
)
JUNK = ("--json", "--key", "--name", "-h", "--", "-", "", "--amount", "keys", "revoke", "--days=0", "--api-url",
        "--no-browser", "--resume", "\x1b[31m", "é", "--frob", "login", "env", "=", "--json=1")
KEYS = ("$KEY", "$KEY", "$REVOKED", "$BROKE", "sk-tr-", "garbage", "sk-tr-abc\nX=1", "sk-tr-abc#x", "sk_tr_Abcd1234Zz",
        "sk-tr-" + "a" * 300, " $KEY ")


def argv(rng: random.Random) -> list[str]:
    fills = {
        "T": lambda: pick(rng, "0", "5", "-1", "abc", "1e9", "0.5"),
        "N": lambda: usually(rng, "laptop", "", " ", text(rng), "x" * 500),
        "I": lambda: usually(rng, "$KEYID", "key_1", "../../admin", "..", ".", "", "a/b?c#d", text(rng), "%2e%2e"),
        "A": lambda: usually(rng, pick(rng, "5", "12.50", "0.01"), "0", "-5", "abc", "nan", "inf", "1e309", "0.001",
                             "", "1000000"),
        "D": lambda: usually(rng, pick(rng, "7", "365", "1"), "0", "366", "7.5", "abc", "-1", "٣"),
        "K": lambda: usually(rng, "$KEY", *KEYS),
        "S": lambda: pick(rng, "bash", "zsh", "fish", "sh", "powershell", "dotenv", "cmd"),
        "M": lambda: usually(rng, "openai/gpt-4o-mini", "openai/gpt-4o", "nope/model", text(rng), ""),
    }
    template = rng.choice(ONLINE_COMMANDS if rng.random() < 0.8 else OFFLINE_COMMANDS)
    words = [fills[w]() if w in fills else w for w in template]
    if rng.random() < 0.3:
        words.insert(usually(rng, pick(rng, 0, len(words)), rng.randint(0, len(words)), odds=0.8), "--json")
    if rng.random() < 0.08:
        words[rng.randint(0, len(words)):0] = ["--api-url", pick(rng, "$GW", "$REC", "http://example.invalid", "x")]
    if rng.random() < 0.15:
        for _ in range(rng.randint(1, 3)):
            operation = rng.random()
            if words and operation < 0.3:
                del words[rng.randrange(len(words))]
            elif words and operation < 0.5:
                position = rng.randrange(len(words))
                words.insert(position, words[position])
            elif words and operation < 0.6:
                position = rng.randrange(len(words))
                words[position] = words[position][: rng.randint(0, len(words[position]))]
            else:
                words.insert(rng.randint(0, len(words)), pick(rng, rng.choice(JUNK), text(rng), word(rng)))
    return words


def environment(rng: random.Random) -> dict[str, str]:
    env = {"HOME": "$HOME" if rng.random() < 0.93 else pick(rng, "", "$HOMEFILE")}
    env["TOKENROUTE_API_URL"] = (
        "$GW" if rng.random() < 0.85 else pick(
            rng, "$GW/", "$REC", "http://example.invalid", "https://example.invalid", "http://127.0.0.1:1",
            "ftp://x", "", "not a url", "http://[::1]:1", "http://127.0.0.1:abc", "https://127.0.0.1:1", "$GW\n",
            "http://127.0.0.1:99999", "$GW/#x", " $GW ",
        )
    )
    if rng.random() < 0.4:
        env["TOKENROUTE_API_KEY"] = usually(rng, "$KEY", *KEYS)
    if rng.random() < 0.25:
        env["TOKENROUTE_JSON"] = pick(rng, "1", "0", "true", "yes", "garbage", "")
    if rng.random() < 0.15:
        env["TOKENROUTE_TIMEOUT"] = pick(rng, "5", "0", "-1", "abc", "nan", "inf", "1e9", "3600", "0.5", "")
    if rng.random() < 0.1:
        env["TOKENROUTE_CONFIG_DIR"] = pick(rng, "$CFG", "$CFG", "")
    if rng.random() < 0.03:
        env["SSL_CERT_FILE"] = pick(rng, "/nonexistent/ca.pem", "$HOMEFILE")
    return env


CORRUPT = (b"", b"{", b"[]", b'{"access_token": 5}', b"\xff\xfe\x00", b"null", b'"x"', b"[" * 100000,
           b'{"api_url": "$GW", "access_token": "a\\nb", "refresh_token": "r", "expires_at": 1, '
           b'"token_endpoint": "$GW/oidc/token", "client_id": "c", "resource": "r"}')


def files(rng: random.Random) -> dict[str, Any]:
    planted: dict[str, Any] = {}
    roll = rng.random()
    if roll < 0.6:
        planted["credentials.json"] = ("login", pick(rng, 3600, 3600, -100, 30))
    elif roll < 0.65:
        planted["credentials.json"] = ("login-elsewhere", 3600)
    elif roll < 0.75:
        planted["credentials.json"] = ("bytes", rng.choice(CORRUPT))
    roll = rng.random()
    if roll < 0.3:
        planted["last_key.txt"] = ("bytes", rng.choice((b"$KEY\n", b"$REVOKED\n", b"$BROKE\n")))
    elif roll < 0.4:
        planted["last_key.txt"] = ("bytes", rng.choice((b"garbage", b"sk-tr-abc#x\n", b"\xff\xfe", b"", b"\n\n")))
    roll = rng.random()
    if roll < 0.08:
        planted["pending_login.json"] = ("pending", pick(rng, 600, -5, 1e400))
    elif roll < 0.12:
        planted["pending_login.json"] = ("bytes", rng.choice(CORRUPT))
    return planted


def generate(rng: random.Random) -> dict[str, Any]:
    words = argv(rng)
    command = next((w for w in words if w in COMMAND_PATHS), "")
    return {
        "argv": words,
        "env": environment(rng),
        "files": files(rng),
        "faults": faults(rng, command),
        "gateway": {
            "auto_approve": rng.random() < 0.3,
            "interval": pick(rng, None, None, 1, 5, 0, -3, 100000, "5"),
            "device_expires_in": pick(rng, 600, 600, 30, 0, -5),
            "slow_down_next": pick(rng, 0, 0, 0, 1, 3),
        },
        "approve_at": pick(rng, None, 1, 2, 5),
        "deny_at": pick(rng, None, None, None, 1, 3),
        "interrupt_at": pick(rng, None, None, None, None, 1, 2),
        "tty": rng.random() < 0.15,
    }


def all_cases() -> list[dict[str, Any]]:
    rng = random.Random(SEED)
    return [generate(rng) for _ in range(CASES)]


# ---------------------------------------------------------------- running


class Sandbox:
    """One gateway and one set of folders, reset before every case."""

    def __init__(self, gateway: FakeGateway, root: Path) -> None:
        self.gateway = gateway
        self.root = root
        self.home = root / "home"
        self.cfg = root / "cfg"
        self.homefile = root / "home-file"
        self.homefile.write_text("")
        self.account = dict(gateway.account)
        self.values: dict[str, str] = {}

    def reset(self) -> None:
        gateway = self.gateway
        gateway.clear_faults()
        gateway.requests.clear()
        gateway.recorder.requests.clear()
        gateway.device_codes.clear()
        gateway.keys.clear()
        gateway.account.clear()
        gateway.account.update(self.account)
        gateway.refresh_count = gateway.revoked_logins = 0
        key = gateway.add_key(name="seed", balance_usd="5.00")["raw"]
        revoked = gateway.add_key(name="old", balance_usd="1.00")
        gateway.keys[revoked["id"]]["status"] = "revoked"
        broke = gateway.add_key(name="empty", balance_usd="0.00")["raw"]
        for folder in (self.home, self.cfg):
            shutil.rmtree(folder, ignore_errors=True)
        self.home.mkdir()
        self.values = {
            "$GW": gateway.url, "$REC": gateway.recorder.url, "$KEY": key, "$REVOKED": revoked["raw"],
            "$BROKE": broke, "$KEYID": revoked["id"], "$HOMEFILE": str(self.homefile), "$HOME": str(self.home), "$CFG": str(self.cfg),
        }

    def fill(self, value: Any) -> Any:
        """Put this run's URLs, keys and folders in place of the placeholders."""
        if isinstance(value, str):
            for name in sorted(self.values, key=len, reverse=True):
                value = value.replace(name, self.values[name])
            return value
        if isinstance(value, bytes):
            for name in sorted(self.values, key=len, reverse=True):
                value = value.replace(name.encode(), self.values[name].encode())
            return value
        if isinstance(value, list):
            return [self.fill(item) for item in value]
        if isinstance(value, dict):
            return {self.fill(k): self.fill(v) for k, v in value.items()}
        return value

    def config_dir(self, env: dict[str, str]) -> Optional[Path]:
        if env.get("TOKENROUTE_CONFIG_DIR"):
            return Path(env["TOKENROUTE_CONFIG_DIR"])
        if env.get("HOME") == str(self.home):
            return self.home / ".tokenroute"
        return None

    def plant(self, folder: Optional[Path], planted: dict[str, Any], clock: Clock) -> dict[str, bytes]:
        """Write the case's files; returns their bytes and the tokens of a planted login."""
        written: dict[str, bytes] = {}
        if folder is None:
            return written
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        for name, (kind, detail) in planted.items():
            if kind == "bytes":
                content = self.fill(detail)
            elif kind in ("login", "login-elsewhere"):
                tokens = self.gateway.issue_tokens(expires_in=detail)
                content = json.dumps({
                    "api_url": self.gateway.url if kind == "login" else "https://elsewhere.example",
                    "access_token": tokens["access_token"], "refresh_token": tokens["refresh_token"],
                    "expires_at": clock.now() + detail, "token_endpoint": self.gateway.url + "/oidc/token",
                    "client_id": "tokenroute-cli", "resource": self.gateway.resource,
                }).encode()
            else:  # a login started with --no-wait
                content = json.dumps({
                    "api_url": self.gateway.url, "token_endpoint": self.gateway.url + "/oidc/token",
                    "client_id": "tokenroute-cli", "resource": self.gateway.resource, "device_code": "dc-planted",
                    "user_code": "BCDF-GHJK", "verification_uri": self.gateway.url + "/device",
                    "verification_uri_complete": self.gateway.url + "/device", "interval": 5,
                    "expires_at": clock.now() + detail,
                }).encode()
            path = folder / name
            path.write_bytes(content)
            path.chmod(0o600)
            written[name] = content
        return written


def run_case(sandbox: Sandbox, case: dict[str, Any]) -> list[str]:
    """Run one case; returns what went wrong (nothing, normally)."""
    sandbox.reset()
    gateway = sandbox.gateway
    for name, value in case["gateway"].items():
        setattr(gateway, name, value)
    for fault in case["faults"]:
        gateway.fail(**sandbox.fill(fault))
    # Colour is tested on its own; here any escape at all would be a server's that got through.
    env = {"NO_COLOR": "1", **sandbox.fill(case["env"])}
    words = sandbox.fill(case["argv"])
    clock = Clock()
    folder = sandbox.config_dir(env)
    planted = sandbox.plant(folder, case["files"], clock)
    secrets = tokens_in(planted.get("credentials.json", b""))

    def on_sleep() -> None:
        count = len(clock.sleeps)
        try:
            if count == case["approve_at"]:
                gateway.approve()
            if count == case["deny_at"]:
                gateway.deny()
        except LookupError:  # no pending device code (yet)
            pass
        if count == case["interrupt_at"] or count >= MAX_SLEEPS:
            raise KeyboardInterrupt

    clock.on_sleep.append(on_sleep)
    out, err = io.StringIO(), io.StringIO()
    opened: list[str] = []
    ctx = tokenroute.Context(
        env=env, stdout=out, stderr=err, stdin_tty=case["tty"], stdout_tty=case["tty"],
        stderr_tty=case["tty"], sleep=clock.sleep, now=clock.now, open_browser=lambda url: bool(opened.append(url)),
    )
    try:
        code = tokenroute.main(list(words), ctx)
    except BaseException:  # noqa: B036 - whatever escapes main is the finding
        return ["escaped main: " + traceback.format_exc(limit=-3).strip().splitlines()[-1],
                traceback.format_exc(limit=-4)]
    problems = []
    stdout, stderr = out.getvalue(), err.getvalue()
    if code not in EXIT_CODES:
        problems.append(f"exit code {code!r}")
    if "Traceback" in stdout + stderr:
        problems.append("traceback printed")
    if not any(c != "\n" and not c.isprintable() for c in "".join(words)):
        shown = sorted({repr(c) for c in stdout + stderr if c != "\n" and not c.isprintable()})
        if shown:
            problems.append(f"terminal control characters printed: {shown[:5]}")
    if folder is not None:
        problems += check_files(folder, planted, logout="logout" in words)
    problems += check_recorder(gateway, env, words, secrets)
    unsafe = [url for url in opened if not is_safe_to_open(url)]
    if unsafe:
        problems.append(f"opened a browser at {unsafe!r}")
    return problems


def is_safe_to_open(url: str) -> bool:
    parts = urlsplit(url)
    return url.isprintable() and (parts.scheme == "https" or (parts.scheme == "http" and parts.hostname in LOOPBACK))


def tokens_in(content: bytes) -> list[str]:
    try:
        creds = json.loads(content)
    except (ValueError, RecursionError):
        return []
    if not isinstance(creds, dict):
        return []
    return [v for k, v in creds.items() if k in ("access_token", "refresh_token") and isinstance(v, str) and len(v) >= 8]


def strict_json(content: bytes) -> Any:
    def refuse(constant: str) -> Any:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(content, parse_constant=refuse)


def check_files(folder: Path, planted: dict[str, bytes], *, logout: bool) -> list[str]:
    problems = []
    if not folder.exists():
        return problems
    for path in folder.iterdir():
        if path.name.endswith(".tmp"):
            problems.append(f"temp file left behind: {path.name}")
        if os.name == "posix" and path.is_file() and stat.S_IMODE(path.stat().st_mode) != 0o600:
            problems.append(f"{path.name} has mode {oct(stat.S_IMODE(path.stat().st_mode))}")
    for name in ("credentials.json", "pending_login.json"):
        path = folder / name
        if not path.exists():
            set_aside = [p.read_bytes() for p in folder.glob(name + ".damaged-*") if p.is_file()]
            damaged = name in planted and not looks_valid(planted[name])
            if name == "credentials.json" and damaged and not logout and planted[name] not in set_aside:
                problems.append(f"damaged {name} was deleted")
            continue
        content = path.read_bytes()
        if content == planted.get(name):
            continue
        try:
            if not isinstance(strict_json(content), dict):
                problems.append(f"{name} is not a JSON object")
        except (ValueError, RecursionError) as exc:
            problems.append(f"{name} is not valid JSON: {exc}")
    last_key = folder / "last_key.txt"
    if last_key.exists():
        content = last_key.read_bytes()
        if content != planted.get("last_key.txt") and not is_key_cache(content):
            problems.append(f"last_key.txt holds {content[:40]!r}")
    keys = folder / "keys.txt"
    if keys.exists() and not is_key_list(keys.read_bytes()):
        problems.append(f"keys.txt holds {keys.read_bytes()[:80]!r}")
    return problems


def is_key_cache(content: bytes) -> bool:
    """A plausible key alone (last_key.txt)."""
    return tokenroute.is_plausible_key(content.decode("utf-8", "replace"))


def is_key_list(content: bytes) -> bool:
    """keys.txt: the header line, then "GATEWAY KEY ID" lines of plausible keys, newline-terminated."""
    lines = content.decode("utf-8", "replace").split("\n")
    rows = [line.split(" ") for line in lines[1:-1]]
    return (
        lines[0] == tokenroute.KEYS_HEADER and lines[-1] == "" and len(lines) > 2
        and all(len(row) == 3 and tokenroute.is_plausible_key(row[1]) for row in rows)
    )


def looks_valid(content: bytes) -> bool:
    try:
        return isinstance(json.loads(content), dict)
    except (ValueError, RecursionError):
        return False


def check_recorder(gateway: FakeGateway, env: dict[str, str], words: list[str], secrets: list[str]) -> list[str]:
    """No bearer token reaches the recorder unless the run was pointed at it, and never an account token."""
    problems = []
    pointed_at_it = gateway.recorder.url in env.get("TOKENROUTE_API_URL", "") or gateway.recorder.url in words
    for request in gateway.recorder.requests:
        authorization = request.header("Authorization") or ""
        if authorization and not pointed_at_it:
            problems.append(f"recorder got Authorization on {request.method} {request.path}")
        if authorization.startswith("Bearer eyJ"):
            problems.append(f"recorder got an account token on {request.method} {request.path}")
        exposed = [s for s in secrets if s in authorization or s.encode() in request.body or s in request.path]
        if exposed:
            problems.append(f"recorder got a stored token on {request.method} {request.path}")
    return problems


def shorten(value: Any) -> Any:
    """The case with long strings cut, for the failure report."""
    if isinstance(value, (str, bytes)) and len(value) > 120:
        return value[:60] + (b"..." if isinstance(value, bytes) else "...") + value[-20:]
    if isinstance(value, list):
        return [shorten(item) for item in value]
    if isinstance(value, tuple):
        return tuple(shorten(item) for item in value)
    if isinstance(value, dict):
        return {key: shorten(item) for key, item in value.items()}
    return value


# ---------------------------------------------------------------- the test


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Any:
    gateway = FakeGateway().start()
    try:
        yield Sandbox(gateway, tmp_path_factory.mktemp("fuzz"))
    finally:
        gateway.stop()


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Names other than loopback do not resolve: no DNS, no waiting, same answer everywhere."""
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host in LOOPBACK:
            return real(host, *args, **kwargs)
        raise socket.gaierror(socket.EAI_NONAME, "fuzz runs offline")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def test_fuzz_main_never_crashes_leaks_or_corrupts(sandbox, offline):
    cases = all_cases()
    indexes = [int(ONLY)] if ONLY else range(len(cases))
    failures: dict[str, list[tuple[int, list[str]]]] = {}
    for index in indexes:
        problems = run_case(sandbox, cases[index])
        if problems:
            failures.setdefault(problems[0][:120], []).append((index, problems))
    if failures:
        report = []
        for signature, found in sorted(failures.items(), key=lambda item: -len(item[1])):
            index, problems = found[0]
            report.append(
                f"\n[{len(found)} case(s), first #{index}] {signature}\n"
                f"  replay: TOKENROUTE_FUZZ_CASE={index} python -m pytest tests/test_fuzz.py\n"
                f"  case: {shorten(cases[index])!r}"
                + ("\n  " + "\n  ".join(problems[1:])[:2000] if len(problems) > 1 else "")
            )
        pytest.fail(f"{sum(len(f) for f in failures.values())} of {len(indexes)} cases failed:" + "".join(report[:15]))
