"""A stateful fake of the tokenroute gateway and its OAuth identity provider.

Tests start it on a free loopback port and point the CLI at ``gateway.url``;
run standalone it is an offline sandbox whose logins are approved at once:

    python3 tests/fake_gateway.py [--port 8787] [--host 127.0.0.1] [--tls] [--verbose]   # --port 0: any free port

With ``tls=`` (``--tls``) it serves https with a certificate from tests/tls/
(see tests/make_certs.sh), and counts TLS handshakes, good and failed.

It speaks the HTTP API in shared/spec/gateway-api.md, as strictly as the real
service, records every request, and can inject faults (errors, delays,
hangs, dropped or truncated responses, redirects). Standard library only.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import re
import secrets
import socket
import ssl
import string
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Optional, Sequence
from urllib.parse import parse_qs, unquote

# ---------------------------------------------------------------- constants

CLIENT_ID = "tokenroute-cli"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
SCOPES = ["openid", "offline_access", "profile", "email"]
KEYS_PATH = "/api/v1/me/keys"
CENT = Decimal("0.01")
AMOUNT_PATTERN = re.compile(r"[0-9]+(\.[0-9]{1,2})?")
USER_CODE_LETTERS = "BCDFGHJKLMNPQRSTVWXZ"
KEY_ALPHABET = string.ascii_letters + string.digits

MODELS: list[dict[str, str]] = [
    {"id": "openai/gpt-4o-mini", "owned_by": "openai", "complexity_tier": "low",
     "input_usd_per_1k": "0.00015", "output_usd_per_1k": "0.0006"},
    {"id": "openai/gpt-4o", "owned_by": "openai", "complexity_tier": "high",
     "input_usd_per_1k": "0.0025", "output_usd_per_1k": "0.01"},
    {"id": "anthropic/claude-haiku-4-5", "owned_by": "anthropic", "complexity_tier": "low",
     "input_usd_per_1k": "0.001", "output_usd_per_1k": "0.005"},
]

# ---------------------------------------------------------------- records


@dataclass
class Recorded:
    """One request as the server received it."""

    method: str
    path: str  # raw request target, percent-encoding and query string intact
    headers: dict[str, str]
    body: bytes
    json: Any = None
    form: Optional[dict[str, str]] = None

    def header(self, name: str) -> Optional[str]:
        wanted = name.lower()
        for key, value in self.headers.items():
            if key.lower() == wanted:
                return value
        return None

    @property
    def path_only(self) -> str:
        return self.path.split("?", 1)[0]

    @property
    def query(self) -> dict[str, str]:
        query = self.path.split("?", 1)[1] if "?" in self.path else ""
        return {k: v[0] for k, v in parse_qs(query, keep_blank_values=True).items()}


def _make_record(method: str, path: str, headers: dict[str, str], body: bytes) -> Recorded:
    record = Recorded(method=method, path=path, headers=headers, body=body)
    try:
        record.json = json.loads(body) if body else None
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested too deep
        record.json = None
    content_type = (record.header("Content-Type") or "").lower()
    if content_type.startswith("application/x-www-form-urlencoded"):
        fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        record.form = {k: v[0] for k, v in fields.items()}
    return record


@dataclass
class DeviceCode:
    user_code: str
    scope: str
    resource_sent: bool
    expires_at: float
    status: str = "pending"  # pending | approved | denied


@dataclass
class _AccessToken:
    family: str
    expires_at: float
    opaque: bool


@dataclass
class _RefreshToken:
    family: str
    current: bool = True


@dataclass
class _Fault:
    path: str
    method: Optional[str]
    remaining: int
    status: int = 500
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"
    delay: float = 0.0
    hang: bool = False
    close: bool = False
    truncate: bool = False
    trickle: float = 0.0  # seconds between single bytes of the whole answer
    passthrough: bool = False  # only delay, then answer normally


# ---------------------------------------------------------------- replies


@dataclass
class _Reply:
    status: int
    payload: Any  # JSON-able, or bytes sent as they are
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"
    events: Optional[list[bytes]] = None  # a text/event-stream: sent one by one, held after the first (hold_streams)


def _detail(status: int, detail: str, **headers: str) -> _Reply:
    return _Reply(status, {"detail": detail}, dict(headers))


def _validation_error(loc: list[str], msg: str, kind: str = "value_error") -> _Reply:
    return _Reply(422, {"detail": [{"loc": loc, "msg": msg, "type": kind}]})


def _oauth_error(error: str, description: Optional[str] = None) -> _Reply:
    payload = {"error": error}
    if description:
        payload["error_description"] = description
    return _Reply(400, payload)


def _openai_error(status: int, message: str, kind: str, code: str) -> _Reply:
    return _Reply(status, {"error": {"message": message, "type": kind, "code": code}})


def _not_authenticated(detail: str = "Not authenticated") -> _Reply:
    return _detail(401, detail, **{"WWW-Authenticate": "Bearer"})


def _invalid_api_key() -> _Reply:
    return _openai_error(401, "Invalid API key", "invalid_request_error", "invalid_api_key")


def _encode_body(body: Any) -> bytes:
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode("utf-8")
    return json.dumps(body).encode("utf-8")


# ---------------------------------------------------------------- money and ids


def _money(value: Decimal) -> str:
    return str(value.quantize(CENT, rounding=ROUND_HALF_UP))


def _positive_amount(value: Any) -> Optional[str]:
    """The amount if it is a decimal string > 0 with at most 2 decimals."""
    if not isinstance(value, str) or not AMOUNT_PATTERN.fullmatch(value):
        return None
    return value if Decimal(value) > 0 else None


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _user_code() -> str:
    letters = "".join(secrets.choice(USER_CODE_LETTERS) for _ in range(8))
    return letters[:4] + "-" + letters[4:]


def _jwt_like_token() -> str:
    return "eyJhbGciOiJFUzM4NCIsInR5cCI6ImF0K2p3dCJ9." + secrets.token_urlsafe(48) + "." + secrets.token_urlsafe(32)


def _bearer(request: Recorded) -> Optional[str]:
    scheme, _, token = (request.header("Authorization") or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


# ---------------------------------------------------------------- HTTP plumbing


TLS_DIR = Path(__file__).resolve().parent / "tls"


def server_tls_context(certificate: str = "localhost") -> ssl.SSLContext:
    """A server context for tests/tls/<certificate>.pem, which the test CA (tests/tls/ca.pem) issued."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(TLS_DIR / (certificate + ".pem")), str(TLS_DIR / "key.pem"))
    return context


class _Server(ThreadingHTTPServer):
    # On Windows SO_REUSEADDR lets a second socket bind a port in use (cpython#85307): a busy port must fail.
    allow_reuse_address = os.name != "nt"
    daemon_threads = True
    block_on_close = False
    app: Any  # FakeGateway or Recorder: has handle(record, handler) and log_requests
    tls: Optional[ssl.SSLContext] = None

    def get_request(self) -> Any:
        connection, address = super().get_request()
        if self.tls is not None:  # the handshake happens on the handler's thread (see _Handler.setup)
            connection = self.tls.wrap_socket(connection, server_side=True, do_handshake_on_connect=False)
        return connection, address

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError, ssl.SSLError)):
            super().handle_error(request, client_address)


class _Server6(_Server):
    address_family = socket.AF_INET6  # host "::1": an IPv6 literal in the URL


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection: no client waits on keep-alive
    server: _Server

    def setup(self) -> None:
        if isinstance(self.request, ssl.SSLSocket):
            try:
                self.request.do_handshake()
            except OSError:  # ssl.SSLError included: the client refused the certificate
                self.server.app.count_handshake(ok=False)
                raise
            self.server.app.count_handshake(ok=True)
        super().setup()

    def do_GET(self) -> None:
        try:
            body = self._read_body()
        except ValueError:
            self.send_bytes(400, b'{"detail":"Malformed request body"}')
            return
        record = _make_record(self.command, self.path, dict(self.headers.items()), body)
        self.server.app.handle(record, self)

    do_POST = do_PUT = do_PATCH = do_DELETE = do_CONNECT = do_GET  # CONNECT: the recorder as a proxy

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        if length < 0:
            raise ValueError("negative Content-Length")
        return self.rfile.read(length) if length else b""

    def send_bytes(self, status: int, body: bytes, headers: Optional[dict[str, str]] = None,
                   content_type: str = "application/json", *, declared_length: Optional[int] = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if declared_length is None else declared_length))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def send_reply(self, reply: _Reply) -> None:
        self.send_bytes(reply.status, _encode_body(reply.payload), reply.headers, reply.content_type)

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.app.log_requests:
            sys.stderr.write("%s %s\n" % (self.address_string(), format % args))


class _ServerThread:
    """A _Server serving on a daemon thread."""

    def __init__(self, app: Any, host: str, port: int, tls: Optional[ssl.SSLContext] = None) -> None:
        self._server = (_Server6 if ":" in host else _Server)((host, port), _Handler)
        self._server.app = app
        self._server.tls = tls
        shown = "[%s]" % host if ":" in host else host  # an IPv6 literal in a URL
        self.url = "%s://%s:%d" % ("https" if tls else "http", shown, self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.01},
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


# ---------------------------------------------------------------- recorder


class Recorder:
    """A second server that answers everything 200 {"ok": true}: a redirect target."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.url = ""
        self.requests: list[Recorded] = []
        self.log_requests = False
        self._lock = threading.Lock()
        self._serving: Optional[_ServerThread] = None

    def start(self) -> Recorder:
        self._serving = _ServerThread(self, self.host, 0)
        self.url = self._serving.url
        return self

    def stop(self) -> None:
        if self._serving is not None:
            self._serving.stop()
            self._serving = None

    def handle(self, record: Recorded, handler: _Handler) -> None:
        with self._lock:
            self.requests.append(record)
        handler.send_bytes(200, b'{"ok": true}')


# ---------------------------------------------------------------- the gateway

Endpoint = Callable[[Recorded], _Reply]


class FakeGateway:
    def __init__(self, *, auto_approve: bool = False, token_ttl: int = 3600,
                 interval: Optional[int] = None, device_expires_in: int = 600,
                 resource: str = "https://api.tokenroute.io", port: int = 0,
                 host: str = "127.0.0.1", log_requests: bool = False, auto_pay: bool = False,
                 tls: Optional[ssl.SSLContext] = None) -> None:
        self.auto_approve = auto_approve
        self.auto_pay = auto_pay  # the sandbox: a checkout is paid the moment it is opened
        self.token_ttl = token_ttl
        self.interval = interval
        self.device_expires_in = device_expires_in
        self.resource = resource
        self.port = port
        self.host = host
        self.log_requests = log_requests
        self.tls = tls  # a server context (server_tls_context()) to serve https; None serves http
        self.ca_file = str(TLS_DIR / "ca.pem")  # the test CA that issued server_tls_context()'s certificates,
        self.ca_dir = str(TLS_DIR / "capath")  # and the same in a hashed directory (SSL_CERT_FILE, SSL_CERT_DIR)
        self.handshakes = {"ok": 0, "failed": 0}  # TLS handshakes, when serving https
        self.url = ""
        self.requests: list[Recorded] = []
        self.recorder = Recorder(host)
        self.account: dict[str, str] = {"id": str(uuid.uuid4()), "display_name": "Agent",
                                        "email": "agent@example.com", "logto_sub": "logto_xyz",
                                        "status": "active"}
        self.keys: dict[str, dict[str, str]] = {}
        self.usage: list[dict[str, Any]] = []  # {"at", "tokens_in", "tokens_out", "cost_usd"}
        self.checkouts: dict[str, dict[str, Any]] = {}  # session id -> {"amount_usd", "completed"}
        self.device_codes: dict[str, DeviceCode] = {}
        self.refresh_count = 0
        self.revoked_logins = 0
        self.slow_down_next = 0
        self._access: dict[str, _AccessToken] = {}
        self._refresh: dict[str, _RefreshToken] = {}
        self._revoked_families: set[str] = set()
        self._replays: dict[tuple[str, str], _Reply] = {}
        self._faults: list[_Fault] = []
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._streams_flow = threading.Event()
        self._streams_flow.set()
        self._serving: Optional[_ServerThread] = None
        self._routes: dict[str, dict[str, Endpoint]] = {
            "/api/v1/auth/discovery": {"GET": self._discovery},
            "/oidc/device/auth": {"POST": self._device_authorization},
            "/oidc/token": {"POST": self._token},
            "/device": {"GET": self._device_page},
            "/api/v1/me": {"GET": self._with_account(self._me)},
            "/api/v1/balance": {"GET": self._with_account(self._balance)},
            KEYS_PATH: {"GET": self._with_account(self._list_keys),
                        "POST": self._with_account(self._create_key)},
            "/api/v1/topup": {"POST": self._with_account(self._topup)},
            "/api/v1/me/usage": {"GET": self._with_account(self._usage)},
            "/v1/models": {"GET": self._with_api_key(self._models)},
            "/v1/chat/completions": {"POST": self._with_api_key(self._chat)},
        }

    # ---- lifecycle

    def start(self) -> FakeGateway:
        self._stopping.clear()
        self._serving = _ServerThread(self, self.host, self.port, self.tls)
        self.url = self._serving.url
        self.recorder.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # wakes delayed and hanging fault handlers
        if self._serving is not None:
            self._serving.stop()
            self._serving = None
        self.recorder.stop()

    def __enter__(self) -> FakeGateway:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def count_handshake(self, *, ok: bool) -> None:
        with self._lock:
            self.handshakes["ok" if ok else "failed"] += 1

    # ---- test controls: keys, logins, device codes, checkout

    def add_key(self, name: str = "seed", balance_usd: str = "5.00") -> dict[str, str]:
        Decimal(balance_usd)  # raises on a non-decimal string
        raw = "sk-tr-" + "".join(secrets.choice(KEY_ALPHABET) for _ in range(32))
        key = {"id": "key_" + secrets.token_hex(4), "name": name, "key_prefix": raw[:10], "raw": raw,
               "balance_usd": balance_usd, "status": "active", "created_at": _now_iso()}
        with self._lock:
            self.keys[key["id"]] = key
        return dict(key)

    def set_balance(self, key_id: str, balance_usd: str) -> None:
        Decimal(balance_usd)  # raises on a non-decimal string
        with self._lock:
            self.keys[key_id]["balance_usd"] = balance_usd

    def issue_tokens(self, *, expires_in: Optional[int] = None) -> dict[str, Any]:
        ttl = self.token_ttl if expires_in is None else expires_in
        with self._lock:
            return self._mint(uuid.uuid4().hex, ttl, opaque=False, with_refresh=True)

    def expire_access_tokens(self) -> None:
        with self._lock:
            for token in self._access.values():
                token.expires_at = time.time() - 1

    def approve(self, user_code: Optional[str] = None) -> None:
        self._find_device_code(user_code).status = "approved"

    def deny(self, user_code: Optional[str] = None) -> None:
        self._find_device_code(user_code).status = "denied"

    def expire_device_codes(self) -> None:
        with self._lock:
            for code in self.device_codes.values():
                code.expires_at = time.time() - 1

    def record_usage(self, tokens_in: int, tokens_out: int, cost_usd: str, *, at: Optional[float] = None) -> None:
        with self._lock:
            self.usage.append({"at": time.time() if at is None else at, "tokens_in": tokens_in,
                               "tokens_out": tokens_out, "cost_usd": Decimal(cost_usd)})

    def complete_checkout(self, session_id: str) -> None:
        """Credit the session's amount to the newest active key, once (the Stripe webhook)."""
        with self._lock:
            checkout = self.checkouts[session_id]
            if checkout["completed"]:
                return
            active = [key for key in self.keys.values() if key["status"] == "active"]
            if not active:
                raise LookupError("no active key to credit")
            key = active[-1]
            key["balance_usd"] = str(Decimal(key["balance_usd"]) + Decimal(checkout["amount_usd"]))
            checkout["completed"] = True

    def _find_device_code(self, user_code: Optional[str]) -> DeviceCode:
        with self._lock:
            for code in reversed(list(self.device_codes.values())):
                if code.user_code == user_code or (user_code is None and code.status == "pending"):
                    return code
        raise LookupError("no such pending device code: %r" % user_code)

    def hold_streams(self) -> None:
        """Event streams stop after their first event until release_streams() (or stop())."""
        self._streams_flow.clear()

    def release_streams(self) -> None:
        self._streams_flow.set()

    # ---- fault injection

    def fail(self, path: str, *, status: int = 500, body: Any = b'{"detail":"boom"}',
             headers: Optional[dict[str, str]] = None, count: int = 1, method: Optional[str] = None,
             delay: float = 0.0, hang: bool = False, close: bool = False, truncate: bool = False,
             trickle: float = 0.0,
             content_type: str = "application/json") -> None:
        self._add_fault(_Fault(path=path, method=method, remaining=count, status=status,
                               body=_encode_body(body), headers=dict(headers or {}),
                               content_type=content_type, delay=delay, hang=hang, close=close,
                               truncate=truncate, trickle=trickle))

    def slow(self, path: str, seconds: float, *, count: int = 1, method: Optional[str] = None) -> None:
        """Answer the next COUNT requests to PATH normally, but SECONDS late."""
        self._add_fault(_Fault(path=path, method=method, remaining=count, delay=seconds, passthrough=True))

    def clear_faults(self) -> None:
        """Drop every fault not played yet."""
        with self._lock:
            self._faults.clear()

    def fail_html(self, path: str, status: int = 502, *, count: int = 1, method: Optional[str] = None) -> None:
        title = "%d %s" % (status, BaseHTTPRequestHandler.responses.get(status, ("Error",))[0])
        page = ("<html>\r\n<head><title>%s</title></head>\r\n<body>\r\n<center><h1>%s</h1></center>\r\n"
                "<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n") % (title, title)
        self.fail(path, status=status, body=page, count=count, method=method, content_type="text/html")

    def _add_fault(self, fault: _Fault) -> None:
        fault.method = fault.method.upper() if fault.method else None
        with self._lock:
            self._faults.append(fault)

    def _take_fault(self, request: Recorded) -> Optional[_Fault]:
        paths = (request.path_only, unquote(request.path_only))
        for fault in self._faults:
            if fault.path in paths and fault.method in (None, request.method):
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self._faults.remove(fault)
                return fault
        return None

    def _play_fault(self, fault: _Fault, handler: _Handler) -> None:
        if fault.delay:
            self._stopping.wait(fault.delay)
        if fault.hang:
            self._stopping.wait()
            return
        if fault.close:
            handler.close_connection = True
            return
        if fault.trickle:  # a server that answers, one byte at a time, for ever
            head = "HTTP/1.0 %d Slow\r\nContent-Type: %s\r\n" % (fault.status, fault.content_type)
            for byte in (head + "X-Padding: " + "x" * 100000).encode():
                if self._stopping.wait(fault.trickle):
                    return
                try:
                    handler.wfile.write(bytes([byte]))
                    handler.wfile.flush()
                except OSError:
                    return
            return
        if fault.truncate:
            declared = max(len(fault.body), 2)
            handler.send_bytes(fault.status, fault.body[: len(fault.body) // 2], fault.headers,
                               fault.content_type, declared_length=declared)
            return
        handler.send_bytes(fault.status, fault.body, fault.headers, fault.content_type)

    # ---- dispatch

    def handle(self, request: Recorded, handler: _Handler) -> None:
        with self._lock:
            self.requests.append(request)
            fault = self._take_fault(request)
        if fault is not None and fault.passthrough:
            self._stopping.wait(fault.delay)
        elif fault is not None:
            self._play_fault(fault, handler)
            return
        with self._lock:
            reply = self._dispatch(request)
        if reply.events is None:
            handler.send_reply(reply)
            return
        handler.send_response(reply.status)  # HTTP/1.0: no length, the body ends when the connection closes
        handler.send_header("Content-Type", reply.content_type)
        handler.send_header("Cache-Control", "no-cache")
        handler.end_headers()
        for number, event in enumerate(reply.events):
            while number == 1 and not self._streams_flow.wait(0.01):
                if self._stopping.is_set():
                    return
            handler.wfile.write(event)
            handler.wfile.flush()

    def _dispatch(self, request: Recorded) -> _Reply:
        methods = self._resolve(request.path_only)
        if methods is None:
            return _detail(404, "Not Found")
        endpoint = methods.get(request.method)
        if endpoint is None:
            return _detail(405, "Method Not Allowed", Allow=", ".join(sorted(methods)))
        try:
            return endpoint(request)
        except Exception:  # the fake's own bug: answer like a server would, and show it
            traceback.print_exc()
            return _detail(500, "Internal Server Error")

    def _resolve(self, path: str) -> Optional[dict[str, Endpoint]]:
        if path in self._routes:
            return self._routes[path]
        key_id = path[len(KEYS_PATH) + 1:]
        if path.startswith(KEYS_PATH + "/") and key_id and "/" not in key_id:
            return {"DELETE": self._with_account(lambda request: self._revoke_key(unquote(key_id)))}
        return None

    def _with_account(self, endpoint: Endpoint) -> Endpoint:
        def guarded(request: Recorded) -> _Reply:
            token = self._access.get(_bearer(request) or "")
            if token is None or token.opaque or token.family in self._revoked_families:
                return _not_authenticated()
            if token.expires_at <= time.time():
                return _not_authenticated("Token expired")
            return endpoint(request)
        return guarded

    def _with_api_key(self, endpoint: Callable[[Recorded, dict[str, str]], _Reply]) -> Endpoint:
        def guarded(request: Recorded) -> _Reply:
            raw = _bearer(request)
            for key in self.keys.values():
                if raw and key["raw"] == raw and key["status"] == "active":
                    return endpoint(request, key)
            return _invalid_api_key()
        return guarded

    def _replayable(self, request: Recorded, create: Callable[[], _Reply]) -> _Reply:
        """Honour Idempotency-Key: the same key on the same path gets the first success again."""
        idempotency_key = request.header("Idempotency-Key")
        if idempotency_key is None:
            return create()
        slot = (request.path_only, idempotency_key)
        if slot not in self._replays:
            reply = create()
            if reply.status >= 300:
                return reply
            self._replays[slot] = reply
        return self._replays[slot]

    # ---- identity provider (discovery, device flow, tokens)

    def _discovery(self, request: Recorded) -> _Reply:
        return _Reply(200, {"issuer": self.url + "/oidc", "client_id": CLIENT_ID, "resource": self.resource,
                            "scopes": list(SCOPES),
                            "device_authorization_endpoint": self.url + "/oidc/device/auth",
                            "token_endpoint": self.url + "/oidc/token"})

    def _form_error(self, form: Optional[dict[str, str]]) -> Optional[_Reply]:
        if form is None:
            return _oauth_error("invalid_request",
                                "only application/x-www-form-urlencoded content-type bodies are supported")
        if not form.get("client_id"):
            return _oauth_error("invalid_request", "no client authentication mechanism provided")
        if form["client_id"] != CLIENT_ID:
            return _oauth_error("invalid_client", "client is invalid")
        if form.get("resource") and form["resource"] != self.resource:
            return _oauth_error("invalid_target", "resource indicator is missing, or unknown")
        return None

    def _device_authorization(self, request: Recorded) -> _Reply:
        error = self._form_error(request.form)
        if error is not None:
            return error
        form = request.form or {}
        device_code, user_code = secrets.token_urlsafe(32), _user_code()
        status = "approved" if self.auto_approve else "pending"
        self.device_codes[device_code] = DeviceCode(user_code=user_code, scope=form.get("scope", ""),
                                                    resource_sent=bool(form.get("resource")),
                                                    expires_at=time.time() + self.device_expires_in,
                                                    status=status)
        payload = {"device_code": device_code, "user_code": user_code,
                   "verification_uri": self.url + "/device",
                   "verification_uri_complete": self.url + "/device?user_code=" + user_code,
                   "expires_in": self.device_expires_in}
        if self.interval is not None:
            payload["interval"] = self.interval
        return _Reply(200, payload)

    def _token(self, request: Recorded) -> _Reply:
        grant_type = (request.form or {}).get("grant_type")
        if grant_type == "refresh_token":
            self.refresh_count += 1
        error = self._form_error(request.form)
        if error is not None:
            return error
        form = request.form or {}
        if grant_type == DEVICE_GRANT:
            return self._device_code_grant(form)
        if grant_type == "refresh_token":
            return self._refresh_grant(form)
        if not grant_type:
            return _oauth_error("invalid_request", "missing required parameter 'grant_type'")
        return _oauth_error("unsupported_grant_type", "unsupported grant_type requested")

    def _device_code_grant(self, form: dict[str, str]) -> _Reply:
        device_code = form.get("device_code")
        if not device_code:
            return _oauth_error("invalid_request", "missing required parameter 'device_code'")
        if self.slow_down_next > 0:
            self.slow_down_next -= 1
            return _oauth_error("slow_down")
        code = self.device_codes.get(device_code)
        if code is None:
            return _oauth_error("invalid_grant", "grant request is invalid")
        if code.expires_at <= time.time():
            return _oauth_error("expired_token", "device code is expired")
        if code.status == "denied":
            return _oauth_error("access_denied", "end-user denied the authorization request")
        if code.status == "pending":
            return _oauth_error("authorization_pending", "authorization request is still pending")
        del self.device_codes[device_code]
        return _Reply(200, self._mint(uuid.uuid4().hex, self.token_ttl, opaque=not form.get("resource"),
                                      with_refresh="offline_access" in code.scope.split()))

    def _refresh_grant(self, form: dict[str, str]) -> _Reply:
        presented = form.get("refresh_token")
        if not presented:
            return _oauth_error("invalid_request", "missing required parameter 'refresh_token'")
        refresh = self._refresh.get(presented)
        if refresh is None or refresh.family in self._revoked_families:
            return _oauth_error("invalid_grant", "grant request is invalid")
        if not refresh.current:  # reuse of a rotated token: revoke the whole login
            self._revoked_families.add(refresh.family)
            self.revoked_logins += 1
            return _oauth_error("invalid_grant", "grant request is invalid")
        refresh.current = False
        return _Reply(200, self._mint(refresh.family, self.token_ttl, opaque=not form.get("resource"),
                                      with_refresh=True))

    def _mint(self, family: str, ttl: int, *, opaque: bool, with_refresh: bool) -> dict[str, Any]:
        access = secrets.token_urlsafe(32) if opaque else _jwt_like_token()
        self._access[access] = _AccessToken(family=family, expires_at=time.time() + ttl, opaque=opaque)
        tokens: dict[str, Any] = {"access_token": access, "expires_in": ttl, "token_type": "Bearer",
                                  "scope": "openid offline_access" if with_refresh else "openid"}
        if with_refresh:
            refresh = secrets.token_urlsafe(32)
            self._refresh[refresh] = _RefreshToken(family=family)
            tokens["refresh_token"] = refresh
        return tokens

    def _device_page(self, request: Recorded) -> _Reply:
        user_code = request.query.get("user_code", "")
        states = [code.status for code in self.device_codes.values() if code.user_code == user_code]
        state = states[0] if states else "unknown"
        page = ("<!doctype html><title>tokenroute sandbox</title><h1>Device login</h1>"
                "<p>Code %s: %s.</p>" % (user_code.replace("<", "&lt;") or "(none)", state))
        return _Reply(200, page.encode("utf-8"), content_type="text/html; charset=utf-8")

    # ---- account endpoints (account access token)

    def _total_balance(self) -> str:
        active = [Decimal(key["balance_usd"]) for key in self.keys.values() if key["status"] == "active"]
        return _money(sum(active, Decimal(0)))

    def _me(self, request: Recorded) -> _Reply:
        return _Reply(200, dict(self.account, balance_usd=self._total_balance()))

    def _balance(self, request: Recorded) -> _Reply:
        return _Reply(200, {"balance_usd": self._total_balance(), "currency": "USD"})

    def _list_keys(self, request: Recorded) -> _Reply:
        return _Reply(200, [_without_raw(key) for key in self.keys.values()])

    def _create_key(self, request: Recorded) -> _Reply:
        body = request.json
        if not isinstance(body, dict):
            return _validation_error(["body"], "Input should be a valid dictionary", "dict_type")
        name = body.get("name")
        if "name" not in body:
            return _validation_error(["body", "name"], "Field required", "missing")
        if not isinstance(name, str) or not name.strip():
            return _validation_error(["body", "name"], "name must be a non-empty string")
        return self._replayable(request, lambda: _Reply(201, self.add_key(name, "0.00")))

    def _revoke_key(self, key_id: str) -> _Reply:
        key = self.keys.get(key_id)
        if key is None:
            return _detail(404, "Key not found")
        key["status"] = "revoked"
        return _Reply(200, _without_raw(key))

    def _topup(self, request: Recorded) -> _Reply:
        body = request.json
        if not isinstance(body, dict):
            return _validation_error(["body"], "Input should be a valid dictionary", "dict_type")
        if "amount_usd" not in body:
            return _validation_error(["body", "amount_usd"], "Field required", "missing")
        amount = body["amount_usd"]
        if not isinstance(amount, str):
            return _validation_error(["body", "amount_usd"], "Input should be a valid string", "string_type")
        if _positive_amount(amount) is None:
            return _validation_error(["body", "amount_usd"],
                                     "amount_usd must be a decimal string > 0 with at most 2 decimal places")
        return self._replayable(request, lambda: self._new_checkout(amount))

    def _new_checkout(self, amount: str) -> _Reply:
        session_id = "cs_test_" + secrets.token_urlsafe(24).replace("-", "a").replace("_", "b")
        self.checkouts[session_id] = {"amount_usd": amount, "completed": False}
        if self.auto_pay and any(key["status"] == "active" for key in self.keys.values()):
            self.complete_checkout(session_id)
        return _Reply(200, {"checkout_url": "https://checkout.stripe.com/c/pay/" + session_id,
                            "session_id": session_id, "amount_usd": amount,
                            "expires_at": int(time.time()) + 1800})

    def _usage(self, request: Recorded) -> _Reply:
        raw_days = request.query.get("days", "30")
        if not re.fullmatch(r"-?[0-9]+", raw_days) or not 1 <= int(raw_days) <= 365:
            return _validation_error(["query", "days"], "days must be an integer between 1 and 365")
        days = int(raw_days)
        since = time.time() - days * 86400
        rows = [row for row in self.usage if row["at"] >= since]
        return _Reply(200, {"range_days": days, "total_requests": len(rows),
                            "total_tokens_in": sum(row["tokens_in"] for row in rows),
                            "total_tokens_out": sum(row["tokens_out"] for row in rows),
                            "total_cost_usd": _money(sum((row["cost_usd"] for row in rows), Decimal(0)))})

    # ---- OpenAI-compatible endpoints (API key)

    def _models(self, request: Recorded, key: dict[str, str]) -> _Reply:
        return _Reply(200, {"object": "list", "data": [dict(model, object="model") for model in MODELS]})

    def _chat(self, request: Recorded, key: dict[str, str]) -> _Reply:
        body = request.json
        if not isinstance(body, dict) or not isinstance(body.get("model"), str) \
                or not isinstance(body.get("messages"), list) or not body["messages"]:
            return _openai_error(400, "Request body must be a JSON object with 'model' and 'messages'",
                                 "invalid_request_error", "invalid_request")
        model = next((m for m in MODELS if m["id"] == body["model"]), None)
        if model is None:
            return _openai_error(404, "Model '%s' not found" % body["model"], "invalid_request_error",
                                 "model_not_found")
        if Decimal(key["balance_usd"]) <= 0:
            return _openai_error(402, "Insufficient balance", "insufficient_quota", "insufficient_balance")
        tokens_in, tokens_out = 10, 1
        cost = (Decimal(tokens_in) * Decimal(model["input_usd_per_1k"])
                + Decimal(tokens_out) * Decimal(model["output_usd_per_1k"])) / 1000
        key["balance_usd"] = str(Decimal(key["balance_usd"]) - cost)
        self.record_usage(tokens_in, tokens_out, str(cost))
        if body.get("stream") is True:
            return _Reply(200, None, content_type="text/event-stream", events=_chat_events(model["id"], ["O", "K"]))
        return _Reply(200, {"id": "chatcmpl-" + secrets.token_hex(12), "object": "chat.completion",
                            "created": int(time.time()), "model": model["id"],
                            "choices": [{"index": 0, "message": {"role": "assistant", "content": "OK"},
                                         "finish_reason": "stop"}],
                            "usage": {"prompt_tokens": tokens_in, "completion_tokens": tokens_out,
                                      "total_tokens": tokens_in + tokens_out}})


def _chat_events(model: str, pieces: list[str]) -> list[bytes]:
    """A streamed chat completion as OpenAI sends it: a chunk per piece, a last one, then [DONE]."""
    base = {"id": "chatcmpl-" + secrets.token_hex(12), "object": "chat.completion.chunk",
            "created": int(time.time()), "model": model}
    deltas = [{"role": "assistant", "content": pieces[0]}] + [{"content": piece} for piece in pieces[1:]] + [{}]
    chunks = [dict(base, choices=[{"index": 0, "delta": delta, "finish_reason": None if delta else "stop"}])
              for delta in deltas]
    return [b"data: " + json.dumps(chunk).encode() + b"\n\n" for chunk in chunks] + [b"data: [DONE]\n\n"]


def _without_raw(key: dict[str, str]) -> dict[str, str]:
    return {name: value for name, value in key.items() if name != "raw"}


# ---------------------------------------------------------------- standalone sandbox


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Run an offline fake tokenroute gateway.")
    parser.add_argument("--port", type=int, default=8787, help="the port (default 8787; 0 picks a free one)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--tls", action="store_true", help="serve https with tests/tls/localhost.pem")
    parser.add_argument("--verbose", action="store_true", help="log each request on stderr")
    args = parser.parse_args(argv)
    gateway = FakeGateway(auto_approve=True, auto_pay=True, interval=1, port=args.port, host=args.host,
                          log_requests=args.verbose, tls=server_tls_context() if args.tls else None)
    try:
        try:
            gateway.start()
        except OSError as exc:  # most often: the port is taken (another sandbox still running?)
            reason = "is in use" if exc.errno in (errno.EADDRINUSE, getattr(errno, "WSAEADDRINUSE", 0)) else \
                "cannot be used: %s" % (exc.strerror or exc)
            print("fake_gateway: %s:%d %s; pick another with --port N (--port 0 picks a free one)"
                  % (args.host, args.port, reason), file=sys.stderr)
            return 1
        seeded = gateway.add_key()
        print("tokenroute fake gateway on %s (logins are approved and top-ups paid at once)" % gateway.url)
        print("  export TOKENROUTE_API_URL=%s" % gateway.url)
        if args.tls:
            print("  export SSL_CERT_FILE=%s SSL_CERT_DIR=%s" % (gateway.ca_file, gateway.ca_dir))
        print("  seeded API key: %s" % seeded["raw"], flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        gateway.stop()


if __name__ == "__main__":
    raise SystemExit(main())
