"""tokenroute: the command-line client of the tokenroute LLM gateway.

Log in, mint sk-tr-* API keys, check balance and spend, top up, and wire
your tools to the gateway:

    tokenroute login && tokenroute keys create --name laptop && tokenroute env >> .env

Exit codes: 0 success, 1 user error (4xx, invalid input, no key, not logged
in), 2 network error, 3 server error (5xx, unusable answer, device-flow
failure), 130 interrupted.

Standard library only. Only cheap modules are imported at the top so that
offline commands (--version, env) start as fast as Python itself; the HTTP
stack, argparse, json and decimal are imported by the code that needs them.
"""
from __future__ import annotations

import os
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    import argparse
    from collections.abc import Callable, Iterator, Mapping, Sequence
    from typing import Any, TextIO

__version__ = "1.0.0"

DEFAULT_API_URL = "https://api.tokenroute.io"
DEFAULT_MODEL = "openai/gpt-4o-mini"
DEFAULT_TIMEOUT = 30.0  # seconds for one command's HTTP exchange, retries included
DEFAULT_POLL_INTERVAL = 5  # RFC 8628 default; the identity provider omits it
REFRESH_MARGIN = 60  # refresh an access token this many seconds before it expires
MAX_ATTEMPTS = 3  # for idempotent requests
MAX_RETRY_AFTER = 10.0
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
MAX_LIFETIME = 10 * 365 * 86400  # seconds; a server's expires_in beyond this is nonsense
KEY_PREFIX = "sk-tr-"
KEY_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")

EXIT_OK = 0
EXIT_USER = 1
EXIT_NETWORK = 2
EXIT_SERVER = 3
EXIT_INTERRUPTED = 130
EXIT_NOT_EXECUTABLE = 126  # `run`, as shells report a command
EXIT_NOT_FOUND = 127


# ---------------------------------------------------------------- errors ---


class CliError(Exception):
    """A failure to report as one line on stderr and an exit code.

    `code` is the stable machine code of `--json` errors, `next` the command
    that fixes it (if any), `status` the HTTP status behind it (if any).
    """

    def __init__(
        self,
        message: str,
        *,
        code: str = "invalid_input",
        exit_code: int = EXIT_USER,
        next: str | None = None,
        status: int | None = None,
        usage: str | None = None,
        payload: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.exit_code = exit_code
        self.next = next
        self.status = status
        self.usage = usage  # the usage line, for people
        self.payload = payload  # more fields for the --json error (login --resume)


def network_error(message: str) -> CliError:
    return CliError(message, code="network", exit_code=EXIT_NETWORK)


def server_error(message: str, *, status: int | None = None) -> CliError:
    return CliError(message, code="server", exit_code=EXIT_SERVER, status=status)


def not_logged_in() -> CliError:
    return CliError("not logged in", code="auth_required", next="tokenroute login")


def session_expired() -> CliError:
    return CliError("session expired", code="session_expired", next="tokenroute login")


# --------------------------------------------------------------- context ---


class Context:
    """Everything a command touches outside its arguments; tests build their own."""

    def __init__(
        self,
        *,
        env: Mapping[str, str],
        stdout: TextIO,
        stderr: TextIO,
        stdin_tty: bool = False,
        stdout_tty: bool = False,
        stderr_tty: bool = False,
        sleep: Callable[[float], None] = time.sleep,
        now: Callable[[], float] = time.time,
        open_browser: Callable[[str], bool] | None = None,
    ) -> None:
        self.env = env
        self.stdout = stdout
        self.stderr = stderr
        self.stdin_tty = stdin_tty
        self.stdout_tty = stdout_tty
        self.stderr_tty = stderr_tty
        self.sleep = sleep
        self.now = now
        self.open_browser = open_browser or open_in_system_browser

    @classmethod
    def from_process(cls) -> Context:
        for stream in (sys.stdout, sys.stderr):
            if hasattr(stream, "reconfigure"):  # a cp1252 console never raises
                stream.reconfigure(errors="replace")
        return cls(
            env=os.environ,
            stdout=sys.stdout,
            stderr=sys.stderr,
            stdin_tty=is_tty(sys.stdin),
            stdout_tty=is_tty(sys.stdout),
            stderr_tty=is_tty(sys.stderr),
        )

    @property
    def person_present(self) -> bool:
        """A person at a terminal: prompts, browsers and codes make sense."""
        return self.stdin_tty and self.stderr_tty


def is_tty(stream: TextIO | None) -> bool:
    return stream is not None and stream.isatty()


def open_in_system_browser(url: str) -> bool:
    graphical = sys.platform in ("darwin", "win32") or any(
        os.environ.get(name) for name in ("DISPLAY", "WAYLAND_DISPLAY", "BROWSER")
    )
    if not graphical:  # a text browser would take over the terminal
        return False
    import webbrowser

    try:
        browser = webbrowser.get()  # BROWSER first, then what the system offers
    except webbrowser.Error:
        return False
    if is_text_browser(browser):  # it would cover the code the person must read
        return False
    return browser.open(url)


TEXT_BROWSERS = frozenset({"lynx", "w3m", "links", "links2", "elinks", "www-browser", "browsh", "carbonyl"})


def is_text_browser(browser: object) -> bool:
    """A browser that runs inside this terminal (webbrowser knows them by name)."""
    command = (getattr(browser, "basename", None) or getattr(browser, "name", "") or "").split()
    return bool(command) and os.path.basename(command[0]).lower().removesuffix(".exe") in TEXT_BROWSERS


# ----------------------------------------------------------------- paths ---


def config_dir(ctx: Context) -> str:
    explicit = ctx.env.get("TOKENROUTE_CONFIG_DIR")
    if explicit:
        return explicit
    home = ctx.env.get("HOME") or ctx.env.get("USERPROFILE")
    if not home:
        raise CliError(
            "cannot find your home directory; set HOME or TOKENROUTE_CONFIG_DIR",
            code="config",
        )
    return os.path.join(home, ".tokenroute")


def credentials_path(ctx: Context) -> str:
    return os.path.join(config_dir(ctx), "credentials.json")


def last_key_path(ctx: Context) -> str:
    return os.path.join(config_dir(ctx), "last_key.txt")


def pending_login_path(ctx: Context) -> str:
    return os.path.join(config_dir(ctx), "pending_login.json")


def lock_path(ctx: Context) -> str:
    return os.path.join(config_dir(ctx), "credentials.lock")


def api_url_setting(ctx: Context, flag: str | None) -> tuple[str, str]:
    """The gateway base URL and where it came from (flag, env, default)."""
    if flag:
        url, source = flag, "--api-url"
    elif ctx.env.get("TOKENROUTE_API_URL"):
        url, source = ctx.env["TOKENROUTE_API_URL"], "TOKENROUTE_API_URL"
    else:
        url, source = DEFAULT_API_URL, "default"
    url = url.strip().rstrip("/")
    if not url.startswith(("https://", "http://")) or "\n" in url:
        raise CliError(f"{source} must be an http(s) URL, got {sanitize(url)!r}")
    return url, source


def timeout_setting(ctx: Context) -> float:
    raw = ctx.env.get("TOKENROUTE_TIMEOUT")
    if not raw:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value <= 3600:
        raise CliError(f"TOKENROUTE_TIMEOUT must be a number of seconds, got {sanitize(raw)!r}")
    return value


def env_flag(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


# ----------------------------------------------------- credential store ---


def ensure_config_dir(ctx: Context) -> str:
    """Create the config folder owner-only (a umask only removes bits).

    An existing folder is left as it is: it may be one the user chose with
    TOKENROUTE_CONFIG_DIR; the files in it are private anyway, and `doctor`
    reports a folder others can read.
    """
    path = config_dir(ctx)
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise file_error("cannot create", path, exc) from None
    return path


def file_error(action: str, path: str, exc: OSError) -> CliError:
    reason = exc.strerror or exc.__class__.__name__
    return CliError(
        f"{action} {path}: {reason} (set TOKENROUTE_CONFIG_DIR to a writable folder)",
        code="config",
    )


def write_private_file(ctx: Context, path: str, text: str) -> None:
    """Atomically replace `path` with `text`, owner-only from the first byte.

    The temp file is created 0600 in the same folder (so the umask cannot
    widen it and a crash never leaves a half-written secret), then renamed
    over the target; a symlink planted at the target is replaced, not followed.
    """
    ensure_config_dir(ctx)
    tmp = f"{path}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(tmp, flags, 0o600)
    except OSError as exc:
        raise file_error("cannot write", path, exc) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        remove_file(tmp)
        raise file_error("cannot write", path, exc) from None


def read_text_file(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except FileNotFoundError:
        return None
    except NotADirectoryError as exc:  # HOME or the config dir is a file
        raise file_error("cannot read", path, exc) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or "not readable text"
        raise CliError(
            f"cannot read {path}: {reason}; fix its permissions, or log in again",
            code="credentials_unreadable",
            next="tokenroute login",
        ) from None


def remove_file(path: str) -> bool:
    try:
        os.remove(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise file_error("cannot remove", path, exc) from None
    return True


CREDENTIAL_FIELDS = ("api_url", "access_token", "token_endpoint", "client_id", "resource")


def load_credentials(ctx: Context) -> dict[str, Any] | None:
    """The stored login, None when there is none; a damaged file is an error, never deleted."""
    path = credentials_path(ctx)
    text = read_text_file(path)
    if text is None:
        return None
    import json

    try:
        creds = json.loads(text)
    except (ValueError, RecursionError):
        creds = None
    if not is_valid_login(creds):
        raise CliError(
            f"{path} is damaged; logging in again replaces it",
            code="credentials_corrupt",
            next="tokenroute login",
        )
    return creds


def is_valid_login(creds: object) -> bool:
    if not isinstance(creds, dict):
        return False
    texts = all(isinstance(creds.get(name), str) and is_header_safe(creds[name]) for name in CREDENTIAL_FIELDS)
    refresh_token = creds.get("refresh_token")  # "" when the provider granted no offline_access
    refreshable = refresh_token == "" or (isinstance(refresh_token, str) and is_header_safe(refresh_token))
    expires_at = creds.get("expires_at")
    dated = isinstance(expires_at, (int, float)) and not isinstance(expires_at, bool) and abs(expires_at) < 1e12
    return texts and refreshable and dated


def require_credentials(ctx: Context, api_url: str) -> dict[str, Any]:
    creds = load_credentials(ctx)
    if creds is None:
        raise not_logged_in()
    if creds["api_url"] != api_url:  # the token was issued for another gateway
        raise CliError(
            f"logged in to {creds['api_url']}, not {api_url}",
            code="auth_required",
            next="tokenroute login",
        )
    return creds


def save_credentials(ctx: Context, creds: dict[str, Any]) -> None:
    write_private_file(ctx, credentials_path(ctx), json_text(creds))


def is_header_safe(value: str) -> bool:
    return bool(value) and value.isascii() and value.isprintable() and " " not in value


def is_plausible_key(key: str) -> bool:
    return key.startswith(KEY_PREFIX) and len(key) > len(KEY_PREFIX) and set(key) <= KEY_CHARS and len(key) <= 200


def resolve_api_key(ctx: Context, flag: str | None) -> tuple[str, str]:
    """The API key for /v1 calls and where it came from: --key, env, then the cache."""
    if flag is not None:
        key, source = flag.strip(), "--key"
    elif ctx.env.get("TOKENROUTE_API_KEY"):
        key, source = ctx.env["TOKENROUTE_API_KEY"].strip(), "TOKENROUTE_API_KEY"
    else:
        key, source = (read_text_file(last_key_path(ctx)) or "").strip(), last_key_path(ctx)
        if not key:
            raise CliError(
                "no API key: pass --key, set TOKENROUTE_API_KEY, or create one",
                code="no_key",
                next="tokenroute keys create --name NAME",
            )
    if not is_plausible_key(key):
        raise CliError(f"the API key from {source} is not a tokenroute key (sk-tr-...)", code="invalid_key")
    return key, source


def redact(text: str) -> str:
    """Hide secrets in text meant for people: keys keep their sk-tr-abcd prefix."""
    import re

    text = re.sub(r"(sk[-_]tr[-_][A-Za-z0-9_-]{4})[A-Za-z0-9_-]*", r"\1...", text)
    return re.sub(r"(eyJ[A-Za-z0-9_-]{4})[A-Za-z0-9_.-]*", r"\1...", text)


class CredentialsLock:
    """An exclusive lock next to the credentials, so parallel processes refresh once.

    Where no lock exists at all it degrades to none: the re-read inside
    still avoids most duplicate refreshes.
    """

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.fd: int | None = None

    def __enter__(self) -> CredentialsLock:
        try_lock = lock_function()
        if try_lock is None:
            return self
        ensure_config_dir(self.ctx)
        path = lock_path(self.ctx)
        deadline = self.ctx.now() + timeout_setting(self.ctx)
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
            while not try_lock(self.fd):  # another process is refreshing: wait, within the timeout
                if self.ctx.now() >= deadline:
                    raise network_error("timed out waiting for another tokenroute process to refresh the login")
                self.ctx.sleep(0.05)
        except OSError as exc:
            raise file_error("cannot lock", path, exc) from None
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the lock
            self.fd = None


def lock_function() -> Callable[[int], bool] | None:
    """A non-blocking exclusive lock of a file (True when taken): flock on POSIX, msvcrt on Windows."""
    try:
        import fcntl
    except ImportError:
        fcntl = None
    try:
        import msvcrt
    except ImportError:
        msvcrt = None

    def try_lock(fd: int) -> bool:
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            else:  # pragma: no cover - Windows
                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except (BlockingIOError, PermissionError):  # held by another process
            return False
        return True

    return try_lock if fcntl is not None or msvcrt is not None else None


# ------------------------------------------------------------------ http ---


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_url(url: str) -> tuple[str, str]:
    """Refuse before connecting: plain http only to loopback, never elsewhere."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError:
        raise CliError(f"not a valid URL: {sanitize(url)!r}") from None
    if parts.scheme not in ("https", "http") or not host:
        raise CliError(f"not an http(s) URL: {sanitize(url)!r}")
    if parts.scheme == "http" and not is_loopback(host):
        raise CliError(
            f"refusing to talk to {host} over plain http (credentials would travel unencrypted); use https",
            code="insecure_url",
        )
    return parts.scheme, host


class Response:
    def __init__(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        """The parsed body, or None when it is not JSON."""
        import json

        try:
            return json.loads(self.body.decode("utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError):
            return None


RETRY_STATUSES = (429, 502, 503, 504)


def send(
    ctx: Context,
    method: str,
    url: str,
    *,
    token: str | None = None,
    json_body: object = None,
    form: dict[str, str] | None = None,
    idempotency_key: str | None = None,
) -> Response:
    """One HTTP exchange with timeouts, bounded retries for GET, and no redirects.

    Any answer (2xx or not) comes back as a Response; a failure to get one
    raises a network CliError. It never prints.
    """
    scheme, host = check_url(url)
    headers = {"User-Agent": f"tokenroute/{__version__}", "Accept": "application/json"}
    data = None
    if json_body is not None:
        import json

        data = json.dumps(json_body).encode()
        headers["Content-Type"] = "application/json"
    elif form is not None:
        from urllib.parse import urlencode

        data = urlencode(form).encode()
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    timeout = timeout_setting(ctx)
    deadline = ctx.now() + timeout
    opener = build_opener(ctx, scheme, host)

    def attempt() -> Response:
        return within_deadline(
            lambda: exchange(opener, method, url, data, headers, timeout=max(0.01, deadline - ctx.now()), host=host),
            seconds=deadline - ctx.now(),
            host=host,
        )

    # Only GET is retried: a POST that may have reached the server is never sent twice.
    for number in range(1, MAX_ATTEMPTS if method == "GET" else 1):
        try:
            response = attempt()
        except CliError as error:
            if error.exit_code != EXIT_NETWORK or not wait_before_retry(ctx, number, None, deadline):
                raise
            continue
        retry_after = response.headers.get("Retry-After")
        if response.status not in RETRY_STATUSES or not wait_before_retry(ctx, number, retry_after, deadline):
            return response
    return attempt()  # the last one stands, whatever it brings


def wait_before_retry(ctx: Context, attempt: int, retry_after: str | None, deadline: float) -> bool:
    """Sleep before the next attempt; False when the deadline leaves no room."""
    delay = 0.5 * 2 ** (attempt - 1)
    if retry_after is not None:
        try:
            delay = max(0.0, min(float(retry_after), MAX_RETRY_AFTER))
        except ValueError:
            pass  # an HTTP date or garbage: keep the backoff
    if ctx.now() + delay >= deadline:
        return False
    ctx.sleep(delay)
    return True


def build_opener(ctx: Context, scheme: str, host: str) -> Any:
    import urllib.request

    class RefuseRedirects(urllib.request.HTTPRedirectHandler):
        # A redirect could carry the bearer token to another host: never follow.
        def http_error_302(self, *args: object) -> None:
            return None  # the 3xx comes back as an answer; its Location is never parsed

        http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

    proxies = proxy_settings(ctx.env)
    if is_loopback(host) or urllib.request.proxy_bypass_environment(host, proxies):
        proxies = {}
    proxies.pop("no", None)
    handlers: list[Any] = [RefuseRedirects(), urllib.request.ProxyHandler(proxies)]
    if scheme == "https":
        import ssl

        try:
            context = ssl.create_default_context(
                cafile=ctx.env.get("SSL_CERT_FILE") or None, capath=ctx.env.get("SSL_CERT_DIR") or None
            )
        except OSError as exc:  # ssl.SSLError included: a missing or unreadable bundle
            raise network_error(
                f"cannot load the CA certificates named by SSL_CERT_FILE / SSL_CERT_DIR: {describe(exc)}"
            ) from None
        handlers.append(urllib.request.HTTPSHandler(context=context))
    return urllib.request.build_opener(*handlers)


def proxy_settings(env: Mapping[str, str]) -> dict[str, str]:
    """Proxies from the usual *_proxy variables (lower case wins), as urllib reads them."""
    proxies = {}
    for name in sorted(env, key=str.islower):  # upper case first, so lower case overrides
        scheme, _, suffix = name.lower().rpartition("_")
        if suffix == "proxy" and scheme and env[name]:
            proxies[scheme] = env[name]
    if "REQUEST_METHOD" in env and "HTTP_PROXY" in env and "http_proxy" not in env:
        proxies.pop("http", None)  # under CGI, HTTP_PROXY comes from a request header (httpoxy)
    return proxies


def within_deadline(work: Callable[[], Response], *, seconds: float, host: str) -> Response:
    """Run one exchange on a helper thread and stop waiting after `seconds`.

    Socket timeouts bound each read, not a whole answer: a server that
    trickles bytes, or a DNS lookup that hangs, would outlast them. The
    thread's result or exception is handed back to the caller as is. It uses
    `_thread` (the documented low-level API) because importing `threading`
    costs about 2% of a network command's run time.
    """
    import _thread

    outcome: list[tuple[bool, Any]] = []
    finished = _thread.allocate_lock()
    finished.acquire()

    def run() -> None:
        try:
            outcome.append((True, work()))
        except BaseException as error:  # relayed to the caller, not handled here
            outcome.append((False, error))
        finally:
            finished.release()

    _thread.start_new_thread(run, ())
    if not finished.acquire(timeout=max(0.0, seconds)):
        raise network_error(f"timed out waiting for {host} (TOKENROUTE_TIMEOUT to wait longer)")
    done, result = outcome[0]
    if not done:
        raise result
    return result


def exchange(
    opener: Any,
    method: str,
    url: str,
    data: bytes | None,
    headers: dict[str, str],
    *,
    timeout: float,
    host: str,
) -> Response:
    import http.client
    import socket
    import ssl
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        try:
            handle = opener.open(request, timeout=timeout)
        except urllib.error.HTTPError as exc:
            handle = exc  # a non-2xx answer is still an answer
        with handle:
            body = read_capped(handle)
            length = handle.headers.get("Content-Length")
            if length and length.isascii() and length.isdigit() and int(length) != len(body):
                raise network_error(f"the connection to {host} closed mid-answer")
            return Response(handle.status, handle.headers, body)
    except (socket.timeout, TimeoutError):
        raise network_error(f"timed out waiting for {host} (TOKENROUTE_TIMEOUT to wait longer)") from None
    except urllib.error.URLError as exc:
        raise connection_error(host, exc.reason) from None
    except ssl.SSLError as exc:
        raise connection_error(host, exc) from None
    except (http.client.HTTPException, OSError) as exc:
        raise network_error(f"connection to {host} failed: {describe(exc)}") from None
    except ValueError:  # urllib's verdict on a malformed *_proxy URL, which may hold a password
        raise CliError("a proxy variable (HTTPS_PROXY, HTTP_PROXY, ...) holds a malformed URL", code="config") from None


def connection_error(host: str, reason: object) -> CliError:
    import socket
    import ssl

    if isinstance(reason, ssl.SSLCertVerificationError):
        return network_error(
            f"TLS certificate of {host} could not be verified ({reason.verify_message}); "
            "behind a proxy with its own CA, set SSL_CERT_FILE to its certificate bundle"
        )
    if isinstance(reason, socket.gaierror):
        return network_error(f"cannot resolve {host}: check your network or TOKENROUTE_API_URL")
    if isinstance(reason, ConnectionRefusedError):
        return network_error(f"connection refused by {host}: is the gateway up and TOKENROUTE_API_URL right?")
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return network_error(f"timed out waiting for {host} (TOKENROUTE_TIMEOUT to wait longer)")
    return network_error(f"cannot reach {host}: {describe(reason)}")


def describe(reason: object) -> str:
    text = getattr(reason, "strerror", None) or str(reason) or reason.__class__.__name__
    return sanitize(str(text))[:200]


def read_capped(handle: Any) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = handle.read(65536)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            raise server_error(f"the answer was larger than {MAX_RESPONSE_BYTES // 1024 // 1024} MiB")
        chunks.append(chunk)


def error_from_response(response: Response, *, account: bool, secret: str | None = None) -> CliError:
    """Turn a non-2xx answer into the error a user can act on; `secret` is never echoed."""
    status = response.status
    message = server_message(response.json(), secret) or f"HTTP {status}"
    if 300 <= status < 400:
        where = sanitize(response.headers.get("Location") or "elsewhere")
        return server_error(f"the gateway redirected to {where}; not followed", status=status)
    if status >= 500:
        return server_error(f"the gateway failed: {message}", status=status)
    code, next_command = {
        401: ("auth_required", "tokenroute login" if account else None),
        402: ("insufficient_balance", "tokenroute topup --amount 5"),
        403: ("forbidden", None),
        404: ("not_found", None),
        429: ("rate_limited", None),
    }.get(status, ("invalid_input", None))
    if status == 401 and not account:
        message += "; check the key (tokenroute keys list) or pass another with --key"
    if status == 429 and response.headers.get("Retry-After"):
        message += f"; retry after {sanitize(response.headers['Retry-After'])[:20]} s"
    return CliError(message, code=code, next=next_command, status=status)


def server_message(data: object, secret: str | None = None) -> str | None:
    """The human part of a FastAPI (`detail`) or OpenAI (`error.message`) error body.

    A server may echo what it was sent: `secret` (the token, key or device
    code of the request) is cut to its first characters, like any key or JWT.
    """
    if not isinstance(data, dict):
        return None
    error = data.get("error")
    detail = data.get("detail")
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        text = error["message"]
    elif isinstance(detail, str):
        text = detail
    elif isinstance(detail, list):
        text = "; ".join(validation_message(item) for item in detail[:5])
    elif isinstance(data.get("error_description"), str):
        text = data["error_description"]
    elif isinstance(error, str):
        text = error
    else:
        return None
    if secret:
        text = text.replace(secret, secret[:10] + "...")
    return sanitize(redact(text))[:300] or None


def validation_message(item: object) -> str:
    if not isinstance(item, dict):
        return str(item)
    location = item.get("loc")
    field = location[-1] if isinstance(location, list) and location else None
    message = str(item.get("msg", "invalid"))
    return f"{field}: {message}" if field is not None else message


def expect_json(response: Response, kind: type) -> Any:
    data = response.json()
    if not isinstance(data, kind):
        content_type = sanitize(response.headers.get("Content-Type") or "no content type")
        raise server_error(
            f"the gateway sent an unusable answer (HTTP {response.status}, {content_type})",
            status=response.status,
        )
    return data


def call_api(ctx: Context, method: str, url: str, *, key: str, json_body: object = None, kind: type = dict) -> Any:
    """An OpenAI-compatible /v1 call authorized by an API key."""
    response = send(ctx, method, url, token=key, json_body=json_body)
    if response.status >= 300:
        raise error_from_response(response, account=False, secret=key)
    return expect_json(response, kind)


def call_account(
    ctx: Context,
    api_url: str,
    method: str,
    path: str,
    *,
    json_body: object = None,
    kind: type = dict,
    idempotency_key: str | None = None,
) -> Any:
    """An /api/v1 account call with the login's access token, refreshed as needed.

    A 401 refreshes once and retries once: the gateway did not act on it.
    """
    creds = require_credentials(ctx, api_url)
    token = fresh_access_token(ctx, creds)
    for rejected in (False, True):
        if rejected:
            token = fresh_access_token(ctx, creds, rejected=token)
        response = send(
            ctx, method, api_url + path, token=token, json_body=json_body, idempotency_key=idempotency_key
        )
        if response.status != 401:
            break
    if response.status >= 300:
        raise error_from_response(response, account=True, secret=token)
    return expect_json(response, kind)


# ---------------------------------------------- device flow and refresh ---


def token_expiry(ctx: Context, answer: dict[str, Any]) -> float:
    expires_in = answer.get("expires_in")
    if isinstance(expires_in, bool) or not isinstance(expires_in, (int, float)) or not abs(expires_in) < MAX_LIFETIME:
        expires_in = 3600  # absent, NaN, infinite or absurd
    return ctx.now() + expires_in


def expiring(ctx: Context, creds: dict[str, Any]) -> bool:
    return creds["expires_at"] - ctx.now() < REFRESH_MARGIN


def fresh_access_token(ctx: Context, creds: dict[str, Any], *, rejected: str | None = None) -> str:
    """A usable access token: the stored one, or a refreshed one.

    Refreshing happens under an exclusive lock, after re-reading the file:
    another process may have refreshed already, and reusing its rotated-away
    refresh token would make the provider revoke the whole login.
    """
    if rejected is None and not expiring(ctx, creds):
        return creds["access_token"]
    with CredentialsLock(ctx):
        current = require_credentials(ctx, creds["api_url"])
        if current["access_token"] != rejected and not expiring(ctx, current):
            return current["access_token"]
        refreshed = refresh_credentials(ctx, current)
        save_credentials(ctx, refreshed)
        return refreshed["access_token"]


def refresh_credentials(ctx: Context, creds: dict[str, Any]) -> dict[str, Any]:
    if not creds["refresh_token"]:  # the provider granted no offline_access
        raise session_expired()
    response = send(
        ctx,
        "POST",
        creds["token_endpoint"],
        form={
            "grant_type": "refresh_token",
            "refresh_token": creds["refresh_token"],
            "client_id": creds["client_id"],
            "resource": creds["resource"],
        },
    )
    if response.status in (400, 401):  # invalid_grant: revoked, expired or rotated away
        raise session_expired()
    if response.status != 200:  # its text could echo the refresh token: not shown
        raise CliError(
            f"the identity provider answered a token refresh with HTTP {response.status}",
            code="rate_limited" if response.status == 429 else "server",
            exit_code=EXIT_USER if 400 <= response.status < 500 else EXIT_SERVER,
            status=response.status,
        )
    answer = expect_json(response, dict)
    if not is_token(answer.get("access_token")):
        raise server_error("the identity provider sent no usable access token")
    refresh_token = answer.get("refresh_token")
    return dict(
        creds,
        access_token=answer["access_token"],
        refresh_token=refresh_token if is_token(refresh_token) else creds["refresh_token"],
        expires_at=token_expiry(ctx, answer),
    )


def is_token(value: object) -> bool:
    return isinstance(value, str) and is_header_safe(value)


def discover(ctx: Context, api_url: str) -> dict[str, Any]:
    response = send(ctx, "GET", api_url + "/api/v1/auth/discovery")
    if response.status == 503:
        raise server_error("CLI login is not enabled on this gateway", status=503)
    if response.status >= 300:
        raise error_from_response(response, account=False)
    found = expect_json(response, dict)
    for name in ("client_id", "resource", "device_authorization_endpoint", "token_endpoint"):
        if not isinstance(found.get(name), str) or not found[name]:
            raise server_error(f"the gateway's login discovery lacks {name}")
    for name in ("device_authorization_endpoint", "token_endpoint"):
        check_url(found[name])
    scopes = found.get("scopes")
    found["scopes"] = [s for s in scopes if isinstance(s, str)] if isinstance(scopes, list) else []
    return found


def start_device_flow(ctx: Context, api_url: str) -> dict[str, Any]:
    """Ask for a device code; returns everything needed to poll it later."""
    found = discover(ctx, api_url)
    response = send(
        ctx,
        "POST",
        found["device_authorization_endpoint"],
        form={"client_id": found["client_id"], "scope": " ".join(found["scopes"]), "resource": found["resource"]},
    )
    if response.status != 200:
        message = server_message(response.json()) or f"HTTP {response.status}"
        raise CliError(f"login could not start: {message}", code="login_failed", exit_code=EXIT_SERVER)
    grant = expect_json(response, dict)
    for name in ("device_code", "user_code", "verification_uri"):
        if not isinstance(grant.get(name), str) or not grant[name]:
            raise server_error(f"the identity provider's device answer lacks {name}")
    interval = grant.get("interval")
    expires_in = grant.get("expires_in")
    complete = grant.get("verification_uri_complete")
    return {
        "api_url": api_url,
        "token_endpoint": found["token_endpoint"],
        "client_id": found["client_id"],
        "resource": found["resource"],
        "device_code": grant["device_code"],
        "user_code": grant["user_code"],
        "verification_uri": grant["verification_uri"],
        "verification_uri_complete": complete if isinstance(complete, str) else grant["verification_uri"],
        "interval": interval if isinstance(interval, int) and 1 <= interval <= 60 else DEFAULT_POLL_INTERVAL,
        "expires_at": ctx.now() + (expires_in if isinstance(expires_in, int) and 0 < expires_in < MAX_LIFETIME else 600),
    }


def poll_device_flow(
    ctx: Context, pending: dict[str, Any], *, first_wait: float, timeout: float | None = None
) -> dict | None:
    """Poll until the person approves; None when `timeout` seconds pass first.

    The first poll comes `first_wait` seconds from now (so `--timeout 0`
    still polls once), then one every interval. Transient failures (network,
    5xx) are retried until the code expires; a denial or an expired code is
    a device-flow failure (exit 3). Without a timeout it never returns None.
    """
    start = ctx.now()
    expires_at = pending["expires_at"]
    end = expires_at if timeout is None else min(expires_at, start + timeout)
    interval = pending["interval"]
    next_poll = start + first_wait
    while True:
        if next_poll > end or start >= expires_at:
            ctx.sleep(max(0.0, end - ctx.now()))
            if end >= expires_at:
                raise login_failed("the login code expired before it was approved", "login_expired")
            return None
        ctx.sleep(max(0.0, next_poll - ctx.now()))
        next_poll = ctx.now() + interval
        try:
            response = send(
                ctx,
                "POST",
                pending["token_endpoint"],
                form={
                    "grant_type": "urn:ietf:params:oauth:grant-type:device_code",
                    "device_code": pending["device_code"],
                    "client_id": pending["client_id"],
                    "resource": pending["resource"],
                },
            )
        except CliError as exc:
            if exc.exit_code == EXIT_NETWORK:
                continue
            raise
        answer = response.json()
        answer = answer if isinstance(answer, dict) else {}
        if response.status == 200 and is_token(answer.get("access_token")):
            return answer
        if response.status >= 500:
            continue
        error = answer.get("error")
        if error == "authorization_pending":
            continue
        if error == "slow_down":
            interval += 5
            next_poll += 5
            continue
        if error == "access_denied":
            raise login_failed("the login was denied", "login_denied")
        if error == "expired_token":
            raise login_failed("the login code expired before it was approved", "login_expired")
        reason = server_message(answer, pending["device_code"]) or f"HTTP {response.status}"
        raise login_failed(f"login failed: {reason}", "login_failed")


def login_failed(message: str, code: str) -> CliError:
    return CliError(message, code=code, exit_code=EXIT_SERVER, next="tokenroute login")


def credentials_from_grant(ctx: Context, pending: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any]:
    refresh_token = answer.get("refresh_token")
    return {
        "api_url": pending["api_url"],
        "access_token": answer["access_token"],
        "refresh_token": refresh_token if is_token(refresh_token) else "",
        "expires_at": token_expiry(ctx, answer),
        "token_endpoint": pending["token_endpoint"],
        "client_id": pending["client_id"],
        "resource": pending["resource"],
    }


# ------------------------------------------------------------- rendering ---


def sanitize(text: str) -> str:
    """Neutralise control characters and escape sequences in text for a terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def json_text(data: object) -> str:
    import json

    return json.dumps(data, indent=2, allow_nan=False) + "\n"


def render_json(ctx: Context, data: object) -> None:
    try:
        text = json_text(data)
    except (ValueError, RecursionError):  # NaN or absurd nesting from the server
        raise server_error("the gateway's answer cannot be shown as JSON") from None
    ctx.stdout.write(text)


def show(value: object) -> str:
    if value is None:
        return "-"
    return sanitize(str(value))


def render_fields(ctx: Context, data: dict[str, Any], fields: Sequence[str]) -> None:
    """`Label: value` lines for one object, labels and values for people."""
    labels = [FIELD_LABELS.get(name, name) for name in fields]
    width = max(len(label) for label in labels)
    for name, label in zip(fields, labels):
        ctx.stdout.write(f"{label + ':':<{width + 1}} {human(name, data.get(name))}\n")


def render_table(ctx: Context, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [list(headers)] + [[show(value) for value in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for number, row in enumerate(cells):
        line = "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
        ctx.stdout.write((paint(ctx, line, "header", tty=ctx.stdout_tty) if number == 0 else line) + "\n")


FIELD_LABELS = {
    "id": "ID", "display_name": "Name", "email": "Email", "logto_sub": "Subject", "balance_usd": "Balance",
    "status": "Status", "currency": "Currency", "name": "Name", "key_prefix": "Prefix", "created_at": "Created",
    "range_days": "Days", "total_requests": "Requests", "total_tokens_in": "Tokens in",
    "total_tokens_out": "Tokens out", "total_cost_usd": "Cost", "api_url": "Gateway",
}


def human(name: str, value: object) -> str:
    """A field's value for people: money as dollars and cents, times as dates, counts grouped."""
    if value is None:
        return "-"
    if name.endswith("_usd"):
        return usd(value)
    if name.endswith("_at"):
        return readable_time(value)
    if isinstance(value, int) and not isinstance(value, bool) and name.startswith("total_"):
        return f"{value:,}"
    return show(value)


def usd(value: object, *, per: int = 1) -> str:
    """A server amount (a decimal string) as `$1,234.50`: always cents.

    `per` (10, 100, 1000...) scales a unit price (per 1k tokens -> per 1M);
    a price keeps the digits below a cent it has (`$0.075`), an amount is
    rounded half up to cents. Anything else is shown as sent. Done on the
    digits: importing decimal would cost human output a few ms of start-up.
    """
    text = str(value).strip() if isinstance(value, (str, int)) and not isinstance(value, bool) else ""
    sign, body = ("-", text[1:]) if text.startswith("-") else ("", text)
    whole, _, fraction = body.partition(".")
    if not (whole + fraction).isdigit() or not (whole + fraction).isascii():
        return show(value)
    digits, point = whole + fraction, len(whole) + len(str(per)) - 1  # move the point right
    digits = digits.ljust(point, "0")
    whole, fraction = digits[:point] or "0", digits[point:].rstrip("0")
    if per != 1 and len(fraction) > 2:
        return f"{sign}${int(whole):,}.{fraction}"
    cents = int(whole + fraction.ljust(2, "0")[:2]) + (fraction[2:3] >= "5")
    if not cents and digits.strip("0") and not sign:
        return "<$0.01"  # spent, but less than a cent: not nothing
    return f"{sign if cents else ''}${cents // 100:,}.{cents % 100:02d}"


def readable_time(value: object) -> str:
    """A server time (ISO 8601 text or Unix seconds) as `2026-11-30 14:02 UTC`."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1e11:
        return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(value))
    if not isinstance(value, str):
        return show(value)
    text = value.strip()
    plain = text[:10].replace("-", "").isdigit() and text[10:11] in ("T", " ") and text[13:14] == ":"
    if plain and text[16:].lstrip("0123456789:.").upper() in ("", "Z", "+00:00"):
        return f"{text[:10]} {text[11:16]} UTC"  # already UTC: no datetime to import
    from datetime import datetime, timezone

    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return show(value)
    if moment.tzinfo is None:  # the gateway's times are UTC
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def readable_duration(seconds: float) -> str:
    """`45 s`, `59 min`, `3 h 20 min`, `2 days`."""
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min"
    if seconds < 86400:
        hours, minutes = divmod(seconds // 60, 60)
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    return f"{seconds // 86400} days" if seconds >= 2 * 86400 else "1 day"


COLOURS = {"ok": "32", "error": "31", "warning": "33", "problem": "31", "header": "1"}


def paint(ctx: Context, text: str, style: str, *, tty: bool) -> str:
    """`text` in colour, only for a person at a colour terminal (never a pipe or file)."""
    plain = not tty or os.name == "nt" or ctx.env.get("NO_COLOR") or ctx.env.get("TERM", "") == "dumb"
    return text if plain or style not in COLOURS else f"\x1b[{COLOURS[style]}m{text}\x1b[0m"


def say_ok(ctx: Context, message: str) -> None:
    ctx.stdout.write(f"{paint(ctx, 'OK', 'ok', tty=ctx.stdout_tty)} {message}\n")


def gateway_name(api_url: str) -> str:
    """The host (and port) people know a gateway by: `api.tokenroute.io`."""
    return api_url.split("://", 1)[-1].split("/", 1)[0].rpartition("@")[2]


def note(ctx: Context, message: str) -> None:
    """A diagnostic for people: stderr, flushed, so stdout stays data."""
    ctx.stderr.write(message + "\n")
    ctx.stderr.flush()


def open_url_for_person(ctx: Context, url: str) -> None:
    """Open a server-provided URL only if it is https (or http on loopback)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. a broken IPv6 host: printed, never opened
        return
    safe = parts.scheme == "https" or (parts.scheme == "http" and is_loopback(parts.hostname or ""))
    if safe and url.isprintable():
        ctx.open_browser(url)


# -------------------------------------------------------------- commands ---
# Each takes (args, ctx) and returns an exit code; output goes through the
# renderers above, errors are raised as CliError for main to report.


def cmd_login(args: argparse.Namespace, ctx: Context) -> int:
    api_url, _ = api_url_setting(ctx, args.api_url)
    if args.resume and args.no_wait:
        raise CliError("--no-wait starts a login and --resume finishes one: give one of them", code="usage")
    if args.resume:
        return resume_login(args, ctx, api_url)
    try:
        creds = load_credentials(ctx)
    except CliError as error:
        if error.code != "credentials_corrupt":
            raise
        creds = None  # logging in replaces a damaged file
    if creds is not None and creds["api_url"] == api_url and not args.force and login_still_valid(ctx, api_url):
        if args.json:
            render_json(ctx, {"status": "logged_in", "api_url": api_url})
        else:
            say_ok(ctx, f"already logged in to {api_url} (tokenroute login --force to log in again)")
        return EXIT_OK
    pending = start_device_flow(ctx, api_url)
    if args.no_wait:
        write_private_file(ctx, pending_login_path(ctx), json_text(pending))
        render_pending(ctx, args, pending, out=ctx.stdout)
        return EXIT_OK
    render_pending(ctx, args, pending, out=ctx.stderr)
    if ctx.person_present and not args.no_browser:
        open_url_for_person(ctx, pending["verification_uri_complete"])
    answer = poll_device_flow(ctx, pending, first_wait=pending["interval"])
    return finish_login(args, ctx, pending, answer)


def load_pending_login(ctx: Context, api_url: str) -> dict[str, Any]:
    import json

    text = read_text_file(pending_login_path(ctx))
    try:
        pending = json.loads(text) if text else None
    except (ValueError, RecursionError):
        pending = None
    if not is_valid_pending(pending) or pending["api_url"] != api_url:
        raise CliError("no login is waiting here", code="no_pending_login", next="tokenroute login --no-wait")
    return pending


def is_valid_pending(pending: object) -> bool:
    if not isinstance(pending, dict) or not all(isinstance(pending.get(name), str) for name in PENDING_TEXT_FIELDS):
        return False
    interval, expires_at = pending.get("interval"), pending.get("expires_at")
    return (
        isinstance(interval, int) and 1 <= interval <= 60
        and isinstance(expires_at, (int, float)) and abs(expires_at) < 1e12
    )



PENDING_TEXT_FIELDS = (
    "api_url", "token_endpoint", "client_id", "resource", "device_code",
    "user_code", "verification_uri", "verification_uri_complete",
)


def login_still_valid(ctx: Context, api_url: str) -> bool:
    """Whether the stored login still works: after a dead session, `login` logs in again."""
    try:
        call_account(ctx, api_url, "GET", "/api/v1/me")
    except CliError as error:
        if error.code in ("auth_required", "session_expired"):
            return False
        raise
    return True


def resume_login(args: argparse.Namespace, ctx: Context, api_url: str) -> int:
    pending = load_pending_login(ctx, api_url)
    path = pending_login_path(ctx)
    try:
        answer = poll_device_flow(ctx, pending, first_wait=0, timeout=args.timeout)
    except CliError as exc:
        if exc.exit_code == EXIT_SERVER:
            remove_file(path)
        raise
    if answer is None:
        raise CliError(
            "the login is still waiting for approval",
            code="login_pending",
            next="tokenroute login --resume",
            payload={"pending": pending_view(pending)},
        )
    remove_file(path)
    return finish_login(args, ctx, pending, answer)


def finish_login(args: argparse.Namespace, ctx: Context, pending: dict[str, Any], answer: dict[str, Any]) -> int:
    save_credentials(ctx, credentials_from_grant(ctx, pending, answer))
    if args.json:
        render_json(ctx, {"status": "logged_in", "api_url": pending["api_url"]})
    else:
        say_ok(ctx, logged_in_as(ctx, pending["api_url"]))
    return EXIT_OK


def logged_in_as(ctx: Context, api_url: str) -> str:
    """`logged in as ada@example.com (api.tokenroute.io)`; the login stands even if /me fails."""
    host = sanitize(gateway_name(api_url))
    try:
        email = call_account(ctx, api_url, "GET", "/api/v1/me").get("email")
    except CliError:
        email = None
    if not isinstance(email, str) or not email.strip():
        return f"logged in ({host})"
    return f"logged in as {sanitize(email.strip())} ({host})"


def pending_view(pending: dict[str, Any]) -> dict[str, Any]:
    return {
        "status": "pending",
        "verification_uri": pending["verification_uri"],
        "verification_uri_complete": pending["verification_uri_complete"],
        "user_code": pending["user_code"],
        "expires_at": int(pending["expires_at"]),
        "next": "tokenroute login --resume",
    }


def render_pending(ctx: Context, args: argparse.Namespace, pending: dict[str, Any], *, out: TextIO) -> None:
    if args.json and args.no_wait:
        render_json(ctx, pending_view(pending))
        return
    out.write(f"Visit: {sanitize(pending['verification_uri'])}\n")
    out.write(f"And enter code: {sanitize(pending['user_code'])}\n")
    if pending["verification_uri_complete"] != pending["verification_uri"]:
        out.write(f"(or open {sanitize(pending['verification_uri_complete'])})\n")
    if args.no_wait:
        out.write("Then run: tokenroute login --resume\n")
    else:
        out.write("Waiting for authorization...\n")
    out.flush()


def cmd_logout(args: argparse.Namespace, ctx: Context) -> int:
    removed = remove_file(credentials_path(ctx))
    remove_file(pending_login_path(ctx))
    if args.json:
        render_json(ctx, {"logged_out": removed})
    else:
        if removed:
            say_ok(ctx, "logged out")
        else:
            ctx.stdout.write("Not logged in; nothing to do\n")
    return EXIT_OK


ME_FIELDS = ("display_name", "email", "balance_usd", "status", "id", "logto_sub")


def cmd_whoami(args: argparse.Namespace, ctx: Context) -> int:
    api_url, _ = api_url_setting(ctx, args.api_url)
    me = call_account(ctx, api_url, "GET", "/api/v1/me")
    if args.json:
        render_json(ctx, me)
    else:
        render_fields(ctx, me, ME_FIELDS)
    return EXIT_OK


def cmd_balance(args: argparse.Namespace, ctx: Context) -> int:
    api_url, _ = api_url_setting(ctx, args.api_url)
    balance = call_account(ctx, api_url, "GET", "/api/v1/balance")
    if args.json:
        render_json(ctx, balance)
    else:
        render_fields(ctx, balance, ("balance_usd",))
    return EXIT_OK


def cmd_keys_create(args: argparse.Namespace, ctx: Context) -> int:
    api_url, _ = api_url_setting(ctx, args.api_url)
    key = call_account(
        ctx, api_url, "POST", "/api/v1/me/keys", json_body={"name": args.name}, idempotency_key=os.urandom(16).hex()
    )
    raw = key.get("raw")
    if not isinstance(raw, str) or not raw:
        raise server_error("the gateway created a key but sent no raw value")
    if args.json:
        render_json(ctx, key)
    else:
        render_fields(ctx, key, ("name", "id", "key_prefix", "balance_usd", "status"))
        ctx.stdout.write(f"Key:     {sanitize(raw)}\n")
    if args.no_cache:
        note(ctx, "Save this key now: it is shown only once (not cached: --no-cache).")
        return EXIT_OK
    if not is_plausible_key(raw):  # shown above all the same: it is the only copy
        raise server_error("the gateway sent a key that is not an sk-tr- token; not cached")
    try:
        write_private_file(ctx, last_key_path(ctx), raw + "\n")
    except CliError as exc:
        raise CliError(f"the key above was created but not cached: {exc.message}", code=exc.code) from None
    note(ctx, f"Save this key now: it is shown only once. Cached in {last_key_path(ctx)} for env, run, test and models.")
    return EXIT_OK


KEY_COLUMNS = ("id", "name", "key_prefix", "status", "balance_usd", "created_at")


def cmd_keys_list(args: argparse.Namespace, ctx: Context) -> int:
    api_url, _ = api_url_setting(ctx, args.api_url)
    keys = call_account(ctx, api_url, "GET", "/api/v1/me/keys", kind=list)
    keys = [key for key in keys if isinstance(key, dict)]
    if args.json:
        render_json(ctx, keys)
    elif not keys:
        note(ctx, "No keys yet. Create one: tokenroute keys create --name NAME")
    else:
        headers = [FIELD_LABELS[column] for column in KEY_COLUMNS]
        render_table(ctx, headers, [[human(c, k.get(c)) for c in KEY_COLUMNS] for k in keys])
    return EXIT_OK


def cmd_keys_revoke(args: argparse.Namespace, ctx: Context) -> int:
    from urllib.parse import quote

    api_url, _ = api_url_setting(ctx, args.api_url)
    if args.id in (".", ".."):
        raise CliError(f"{args.id!r} is not a key id (see tokenroute keys list)")
    key = call_account(ctx, api_url, "DELETE", "/api/v1/me/keys/" + quote(args.id, safe=""))
    if args.json:
        render_json(ctx, key)
    else:
        say_ok(ctx, f"revoked {show(key.get('id', args.id))} ({show(key.get('name'))})")
    return EXIT_OK


def cmd_topup(args: argparse.Namespace, ctx: Context) -> int:
    api_url, _ = api_url_setting(ctx, args.api_url)
    session = call_account(
        ctx,
        api_url,
        "POST",
        "/api/v1/topup",
        json_body={"amount_usd": args.amount},
        idempotency_key=os.urandom(16).hex(),
    )
    url = session.get("checkout_url")
    if not isinstance(url, str) or not url:
        raise server_error("the gateway sent no checkout URL")
    if args.json:
        render_json(ctx, session)
        return EXIT_OK
    ctx.stdout.write(f"Checkout: {sanitize(url)}\n")
    expires = session.get("expires_at")
    until = f" The link expires {readable_time(expires)}." if expires is not None else ""
    note(ctx, f"Open it to pay {usd(session.get('amount_usd', args.amount))}; credit arrives once paid.{until}")
    if ctx.person_present and ctx.stdout_tty and not args.no_browser:
        open_url_for_person(ctx, url)
    return EXIT_OK


USAGE_FIELDS = ("range_days", "total_requests", "total_tokens_in", "total_tokens_out", "total_cost_usd")


def cmd_usage(args: argparse.Namespace, ctx: Context) -> int:
    api_url, _ = api_url_setting(ctx, args.api_url)
    usage = call_account(ctx, api_url, "GET", f"/api/v1/me/usage?days={args.days}")
    if args.json:
        render_json(ctx, usage)
    else:
        render_fields(ctx, usage, USAGE_FIELDS)
    return EXIT_OK


SHELL_FORMATS = {
    "dotenv": "{name}={value}",
    "sh": "export {name}={value}",
    "bash": "export {name}={value}",
    "zsh": "export {name}={value}",
    "fish": "set -gx {name} {value}",
    "powershell": "$env:{name} = '{value}'",
}


def cmd_env(args: argparse.Namespace, ctx: Context) -> int:
    """Print the two variables an OpenAI SDK needs, nothing else on stdout."""
    variables = openai_variables(ctx, args)
    if getattr(args, "write", None) is not None:
        return write_env_file(args, ctx, variables)
    if args.json:
        render_json(ctx, variables)
        return EXIT_OK
    line = SHELL_FORMATS["sh" if args.export and args.shell == "dotenv" else args.shell]
    ctx.stdout.write("".join(line.format(name=n, value=v) + "\n" for n, v in variables.items()))
    return EXIT_OK


def openai_variables(ctx: Context, args: argparse.Namespace) -> dict[str, str]:
    """OPENAI_API_KEY and OPENAI_BASE_URL, as env prints them and run passes them on."""
    key, _ = resolve_api_key(ctx, args.key)
    api_url, _ = api_url_setting(ctx, args.api_url)
    if not is_env_safe(api_url):
        raise CliError("the API URL holds characters a shell or .env file would misread")
    return {"OPENAI_API_KEY": key, "OPENAI_BASE_URL": api_url + "/v1"}


ENV_SAFE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:/%@+=,-")  # no ~: sh expands it after ":"


def is_env_safe(value: str) -> bool:
    """Only characters that every shell and .env reader takes literally, unquoted."""
    return bool(value) and set(value) <= ENV_SAFE_CHARS


def write_env_file(args: argparse.Namespace, ctx: Context, variables: dict[str, str]) -> int:
    """`env --write`: set the variables in a dotenv file in place, once each."""
    if args.export or args.shell != "dotenv":
        raise CliError("--write writes dotenv lines: leave out --export and --shell", code="usage")
    if not all(is_env_safe(value) for value in variables.values()):  # resolve_api_key checks the key already
        raise CliError("a value holds characters a .env reader would misread")
    path = os.path.realpath(args.write)  # a symlinked .env is updated at its target
    try:
        with open(path, "rb") as handle:
            old: bytes | None = handle.read()
    except FileNotFoundError:
        old = None
    except OSError as exc:
        raise CliError(f"cannot read {args.write}: {exc.strerror}") from None
    if old is not None and old.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise CliError(f"{args.write} is UTF-16 (PowerShell 5.1's >> writes that); save it as UTF-8 first")
    new, changes = set_dotenv_values(old or b"", variables)
    if new != old:
        replace_file(path, new)
    if args.json:
        render_json(ctx, {"path": os.path.abspath(args.write), "created": old is None, "changed": new != old})
    elif old is None:
        note(ctx, f"Created {args.write} (readable only by you) with {' and '.join(variables)}")
    elif new != old:
        note(ctx, f"Updated {args.write}: {', '.join(changes) or 'final newline added'}")
    else:
        note(ctx, f"{args.write} already has {' and '.join(variables)}; unchanged")
    warn_if_committable(ctx, path)
    return EXIT_OK


def set_dotenv_values(text: bytes, variables: dict[str, str]) -> tuple[bytes, list[str]]:
    """`text` with each variable set once, where it first was; every other line byte for byte.

    Works on bytes so that any encoding, CRLF ending, quoting and comment
    outside the variables' own lines survives. Returns the new text and what
    changed, for people.
    """
    lines = text.splitlines(keepends=True)
    eol = b"\r\n" if lines and lines[0].endswith(b"\r\n") else b"\n"
    if lines and not lines[-1].endswith(b"\n"):
        lines[-1] += eol
    changes = []
    for name, value in variables.items():
        at = [number for number, line in enumerate(lines) if dotenv_name(line) == name]
        if not at:
            lines.append(f"{name}={value}".encode() + eol)
            changes.append(f"{name} added")
            continue
        first = lines[at[0]]
        prefix = first[: len(first) - len(first.lstrip())]
        if first.lstrip().startswith(b"export"):
            prefix += b"export "
        ending = b"\r\n" if first.endswith(b"\r\n") else b"\n"
        lines[at[0]] = prefix + f"{name}={value}".encode() + ending
        if lines[at[0]] != first:
            changes.append(f"{name} replaced")
        for number in reversed(at[1:]):
            del lines[number]
        if len(at) > 1:
            changes.append(f"{len(at) - 1} older {name} removed")
    return b"".join(lines), changes


def dotenv_name(line: bytes) -> str | None:
    """The variable a dotenv line sets (`NAME=`, `export NAME=`, `NAME =`), or None."""
    words = line.strip().split(b"=", 1)
    if len(words) < 2:
        return None
    name = words[0].strip()
    if name.startswith(b"export") and name[6:7].isspace():
        name = name[6:].strip()
    try:
        return name.decode("ascii") if name else None
    except UnicodeDecodeError:
        return None


def replace_file(path: str, data: bytes) -> None:
    """Atomically replace `path`: a new file is 0600, an existing one keeps its mode."""
    try:
        mode = os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o600
    folder = os.path.dirname(path)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(tmp, flags, 0o600)
    except OSError as exc:
        raise CliError(f"cannot write in {folder or '.'}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)  # after the write: the secret is never in a wider file
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise CliError(f"cannot write {path}: {exc.strerror}") from None


def warn_if_committable(ctx: Context, path: str) -> None:
    """Warn when a git work tree would take the file in `git add .`; silent without git."""
    import shutil
    import subprocess

    git = shutil.which("git", path=ctx.env.get("PATH"))
    if git is None:
        return
    folder, name = os.path.split(path)
    try:
        done = subprocess.run([git, "check-ignore", "-q", "--", name], cwd=folder or ".", env=dict(ctx.env),
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=10)
    except (OSError, subprocess.SubprocessError):
        return
    if done.returncode == 1:  # in a work tree and not ignored (128: not a work tree)
        warning = paint(ctx, "warning", "warning", tty=ctx.stderr_tty)
        note(ctx, f"{warning}: {name} holds an API key and git does not ignore it; add it to .gitignore")


def cmd_run(args: argparse.Namespace, ctx: Context) -> int:
    """Run a command with the two variables in its environment: no key in a file."""
    env = {**ctx.env, **openai_variables(ctx, args)}
    for stream in (ctx.stdout, ctx.stderr):
        if stream is not None:  # None: started with the stream closed
            stream.flush()  # what is buffered here would be lost in the exec
    if os.name == "posix":
        replace_process(args.command, env)
    return run_and_wait(args.command, env)


def replace_process(command: Sequence[str], env: dict[str, str]) -> None:
    """exec the command: no parent left to forward signals to or hold memory; returns only on failure."""
    try:
        os.execvpe(command[0], list(command), env)
    except OSError as exc:
        raise exec_error(command[0], exc) from None


def run_and_wait(command: Sequence[str], env: dict[str, str]) -> int:
    """Run the command as a child and return its status, a signal death as 128+N like a shell."""
    import shutil
    import subprocess

    # Windows finds `npm` (npm.cmd) and friends through PATHEXT only this way.
    program = shutil.which(command[0], path=env.get("PATH")) or command[0]
    try:
        child = subprocess.Popen([program, *command[1:]], env=env)
    except OSError as exc:
        raise exec_error(command[0], exc) from None
    while True:
        try:
            status = child.wait()
            break
        except KeyboardInterrupt:  # the child got the Ctrl-C too: its exit decides
            continue
    return 128 - status if status < 0 else status


def exec_error(program: str, exc: OSError) -> CliError:
    import errno

    name = sanitize(program)
    if exc.errno == errno.ENOENT:
        return CliError(f"{name}: command not found", code="command_not_found", exit_code=EXIT_NOT_FOUND)
    reason = exc.strerror or exc.__class__.__name__
    return CliError(f"{name}: cannot run it: {reason}", code="command_not_executable", exit_code=EXIT_NOT_EXECUTABLE)


def cmd_test(args: argparse.Namespace, ctx: Context) -> int:
    key, _ = resolve_api_key(ctx, args.key)
    api_url, _ = api_url_setting(ctx, args.api_url)
    completion = call_api(
        ctx,
        "POST",
        api_url + "/v1/chat/completions",
        key=key,
        json_body={
            "model": args.model,
            "messages": [{"role": "user", "content": "Reply with the single word OK."}],
            "max_tokens": 5,
        },
    )
    reply = chat_reply(completion)
    if args.json:
        render_json(ctx, {"ok": True, "model": args.model, "reply": reply, "usage": completion.get("usage")})
    else:
        say_ok(ctx, f"connected ({sanitize(args.model)})")
        ctx.stdout.write(f"  reply: {sanitize(reply)}\n")
    return EXIT_OK


def chat_reply(completion: dict[str, Any]) -> str:
    try:
        content = completion["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        content = None
    if not isinstance(content, str):
        raise server_error("the gateway's chat completion has no reply text")
    return content


MODEL_COLUMNS = ("id", "owned_by", "complexity_tier", "input_usd_per_1k", "output_usd_per_1k")


def cmd_models(args: argparse.Namespace, ctx: Context) -> int:
    key, _ = resolve_api_key(ctx, args.key)
    api_url, _ = api_url_setting(ctx, args.api_url)
    listing = call_api(ctx, "GET", api_url + "/v1/models", key=key)
    models = listing.get("data")
    if not isinstance(models, list):
        raise server_error("the gateway's model list has no data")
    models = [model for model in models if isinstance(model, dict)]
    if args.json:
        render_json(ctx, models)
    else:
        headers = ("Model", "Provider", "Tier", "Input $/1M", "Output $/1M")
        render_table(ctx, headers, [model_row(model) for model in models])
    return EXIT_OK


def model_row(model: dict[str, Any]) -> list[str]:
    """Prices per million tokens: per 1k they are fractions of a cent."""
    prices = [usd(model.get(c), per=1000) if model.get(c) is not None else "-" for c in MODEL_COLUMNS[3:]]
    return [show(model.get(c)) for c in MODEL_COLUMNS[:3]] + prices


class Check:
    """One line of `tokenroute doctor`: ok, warning or problem, with the fix."""

    def __init__(self, name: str, status: str, detail: str, *, fix: str | None = None, exit_code: int = EXIT_OK) -> None:
        self.name = name
        self.status = status
        self.detail = detail
        self.fix = fix
        self.exit_code = exit_code

    @classmethod
    def failed(cls, name: str, error: CliError) -> Check:
        return cls(name, "problem", redact(error.message), fix=error.next, exit_code=error.exit_code)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "detail": self.detail, "fix": self.fix}


def cmd_doctor(args: argparse.Namespace, ctx: Context) -> int:
    """Check everything that decides whether tokenroute works here."""
    checks = [check_python()]
    try:
        api_url, source = api_url_setting(ctx, args.api_url)
    except CliError as error:
        checks.append(Check.failed("api url", error))
    else:
        checks.append(Check("api url", "ok", f"{api_url} (from {source})"))
        checks += [check_gateway(ctx, api_url), check_login(ctx, api_url), check_api_key(ctx, args, api_url)]
    checks += check_files(ctx)
    problems = [check.exit_code or EXIT_USER for check in checks if check.status == "problem"]
    code = next((c for c in (EXIT_NETWORK, EXIT_SERVER) if c in problems), EXIT_USER if problems else EXIT_OK)
    if args.json:
        render_json(ctx, {"ok": not problems, "checks": [check.as_dict() for check in checks]})
    else:
        width = max(len(check.name) for check in checks)
        for check in checks:
            status = paint(ctx, f"{check.status:<8}", check.status, tty=ctx.stdout_tty)
            ctx.stdout.write(f"{status} {check.name:<{width}}  {sanitize(check.detail)}\n")
            if check.fix:
                ctx.stdout.write(f"{'':<8} {'':<{width}}  fix: {check.fix}\n")
    return code


def check_python() -> Check:
    version = ".".join(str(part) for part in sys.version_info[:3])
    return Check("python", "ok", f"Python {version} ({sys.executable or 'embedded'})")


def check_gateway(ctx: Context, api_url: str) -> Check:
    try:
        discover(ctx, api_url)
    except CliError as error:
        if error.status == 503:
            return Check("gateway", "warning", "reachable, but CLI login is not enabled on it")
        return Check.failed("gateway", error)
    return Check("gateway", "ok", "reachable")


def check_login(ctx: Context, api_url: str) -> Check:
    try:
        creds = require_credentials(ctx, api_url)
        remaining = int(creds["expires_at"] - ctx.now())
        state = f"access token valid for {readable_duration(remaining)}" if remaining > 0 else "access token expired"
        refreshable = "refreshable" if creds["refresh_token"] else "not refreshable"
        me = call_account(ctx, api_url, "GET", "/api/v1/me")
    except CliError as error:
        return Check.failed("login", error)
    return Check("login", "ok", f"logged in as {show(me.get('email'))} ({state}, {refreshable})")


def check_api_key(ctx: Context, args: argparse.Namespace, api_url: str) -> Check:
    try:
        key, source = resolve_api_key(ctx, args.key)
    except CliError as error:
        if error.code != "no_key":
            return Check.failed("api key", error)
        return Check("api key", "warning", "none (env, test and models need one)", fix=error.next)
    try:
        call_api(ctx, "GET", api_url + "/v1/models", key=key)
    except CliError as error:
        return Check.failed("api key", error)
    return Check("api key", "ok", f"{redact(key)} from {source}, accepted by the gateway")


def check_files(ctx: Context) -> list[Check]:
    import shlex

    try:
        paths = [config_dir(ctx), credentials_path(ctx), last_key_path(ctx), pending_login_path(ctx)]
    except CliError as error:
        return [Check.failed("files", error)]
    checks = []
    for path in paths:
        try:
            mode = os.stat(path).st_mode & 0o777
        except FileNotFoundError:
            continue
        except OSError as error:
            checks.append(Check("files", "problem", f"{path}: {error.strerror}"))
            continue
        if os.name != "posix" or not mode & 0o077:
            checks.append(Check("files", "ok", f"{path} ({oct(mode)[2:]}, private)"))
        else:
            wanted = "700" if os.path.isdir(path) else "600"
            fix = f"chmod {wanted} {shlex.quote(path)}"
            checks.append(Check("files", "problem", f"{path} is readable by others ({oct(mode)[2:]})", fix=fix))
    return checks or [Check("files", "ok", "no credential files yet")]


def cmd_completion(args: argparse.Namespace, ctx: Context) -> int:
    tree = command_tree(build_parser())
    ctx.stdout.write({"bash": bash_completion, "zsh": zsh_completion, "fish": fish_completion}[args.shell](tree))
    return EXIT_OK


def cmd_help_topic(args: argparse.Namespace, ctx: Context) -> int:
    """`tokenroute help [COMMAND...]`: the same text as `COMMAND -h`."""
    if not args.topic:
        return cmd_help(args, ctx)
    error = unknown_command(args.topic)
    if error is not None:
        raise error
    parse_args([*args.topic, "--help"], ctx)  # argparse prints the help and exits 0
    return EXIT_OK


def command_tree(parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Options, option choices and subcommands of a parser, recursively."""
    import argparse

    tree: dict[str, Any] = {"options": [], "choices": {}, "commands": {}, "help": {}, "arguments": []}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                tree["commands"][name] = command_tree(sub)
                tree["help"][name] = helps.get(name) or ""
        elif not action.option_strings and action.choices:
            tree["arguments"] += list(action.choices)
        for option in action.option_strings:
            tree["options"].append(option)
            if action.choices:
                tree["choices"][option] = list(action.choices)
    return tree


def completion_paths(tree: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, tree
    for name, sub in tree["commands"].items():
        yield from completion_paths(sub, f"{path} {name}".strip())


def bash_completion(tree: dict[str, Any]) -> str:
    steps, cases = [], []
    for path, node in completion_paths(tree):
        words = " ".join([*node["commands"], *node["arguments"], *node["options"]])
        cases.append(f'        "{path}") words="{words}" ;;')
        steps += [f'"{path}:{name}"' for name in node["commands"]]
        for option, choices in node["choices"].items():
            cases.insert(0, f'        "{path}>{option}") words="{" ".join(choices)}" ;;')
    return f"""# bash completion for tokenroute (generated by `tokenroute completion bash`)
_tokenroute() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}" prev="${{COMP_WORDS[COMP_CWORD-1]}}" path="" word words i
    for ((i = 1; i < COMP_CWORD; i++)); do
        word="${{COMP_WORDS[i]}}"
        case "$path:$word" in
            {"|".join(steps)}) path="${{path:+$path }}$word" ;;
        esac
    done
    case "$path>$prev" in
{chr(10).join(c for c in cases if ">" in c)}
        *) case "$path" in
{chr(10).join(c for c in cases if ">" not in c)}
           esac ;;
    esac
    COMPREPLY=($(compgen -W "$words" -- "$cur"))
}}
complete -F _tokenroute tokenroute
"""


def zsh_completion(tree: dict[str, Any]) -> str:
    return "#compdef tokenroute\nautoload -U +X bashcompinit && bashcompinit\n" + bash_completion(tree)


def fish_completion(tree: dict[str, Any]) -> str:
    lines = ["# fish completion for tokenroute (generated by `tokenroute completion fish`)", "complete -c tokenroute -f"]
    for path, node in completion_paths(tree):
        tests = [f"__fish_seen_subcommand_from {word}" for word in path.split()] or ["__fish_use_subcommand"]
        if path and node["commands"]:
            tests.append(f"not __fish_seen_subcommand_from {' '.join(node['commands'])}")
        condition = "; and ".join(tests)
        for name in node["commands"]:
            description = node["help"][name].replace("'", "")
            lines.append(f"complete -c tokenroute -n '{condition}' -a {name} -d '{description}'")
        if node["arguments"]:
            lines.append(f"complete -c tokenroute -n '{condition}' -a '{' '.join(node['arguments'])}'")
        for option in node["options"]:
            if option.startswith("--"):
                choices = node["choices"].get(option)
                values = f" -xa '{' '.join(choices)}'" if choices else ""
                lines.append(f"complete -c tokenroute -n '{condition}' -l {option[2:]}{values}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- parser ---


class BadValue(ValueError):
    """An option value a type function rejects; its message is shown as is."""


def parse_amount(text: str) -> str:
    """A top-up amount: a plain positive decimal with at most 2 decimals, as a string."""
    from decimal import Decimal

    plain = text.strip()
    digits = plain.replace(".", "", 1)
    amount = Decimal(plain) if digits.isdigit() and digits.isascii() else None
    if amount is None or amount <= 0 or amount.as_tuple().exponent < -2:
        raise BadValue(f"{text!r} is not an amount: give USD as a number above 0 with at most 2 decimals, like 5 or 12.50")
    if amount > Decimal(MAX_TOPUP):
        raise BadValue(f"{text!r} is more than the maximum top-up of {MAX_TOPUP} USD")
    return str(amount)


MAX_TOPUP = "999999.99"


def parse_days(text: str) -> int:
    if not text.strip().isdigit() or not 1 <= int(text) <= 365:
        raise BadValue(f"{text!r} is not a whole number of days from 1 to 365")
    return int(text)


def non_empty(text: str) -> str:
    if not text.strip():
        raise BadValue("must not be empty")
    return text.strip()


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 86400:
        raise BadValue(f"{text!r} is not a number of seconds")
    return value


class Command:
    """One command of the table below: what runs it, its help and its options."""

    def __init__(
        self,
        name: str,
        func: Callable[..., int],
        summary: str,
        example: str,
        *options: tuple[tuple[str, ...], dict[str, Any]],
        aliases: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.func = func
        self.summary = summary
        self.example = example
        self.options = options
        self.aliases = tuple(aliases)


def option(*flags: str, **settings: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
    """The arguments of one `add_argument` call."""
    return flags, settings


KEY_OPTION = option("--key", metavar="sk-tr-...", help="API key (default: TOKENROUTE_API_KEY, then the cached key)")
NO_BROWSER_OPTION = option("--no-browser", action="store_true", help="print the URL, do not open a browser")
GLOBAL_OPTIONS = (
    option("--json", action="store_true", help="machine-readable JSON output (or TOKENROUTE_JSON=1)"),
    option("--api-url", metavar="URL", help=f"gateway base URL (or TOKENROUTE_API_URL; default {DEFAULT_API_URL})"),
)
GROUPS = {"keys": ("create, list and revoke API keys", "tokenroute keys create --name laptop")}
COMMANDS = (
    Command(
        "login", cmd_login, "log in with your browser (device flow)", "tokenroute login",
        NO_BROWSER_OPTION,
        option("--force", action="store_true", help="log in again even when logged in"),
        option("--no-wait", action="store_true", help="print the code and exit; finish with --resume"),
        option("--resume", action="store_true", help="finish a login started with --no-wait"),
        option("--timeout", type=positive_seconds, metavar="SECONDS", help="with --resume: stop waiting after this long"),
    ),
    Command("logout", cmd_logout, "forget the stored login", "tokenroute logout"),
    Command(
        "run", cmd_run, "run a command with OPENAI_API_KEY and OPENAI_BASE_URL set", "tokenroute run -- python app.py",
        KEY_OPTION,
        option("command", nargs="...", metavar="COMMAND", help="the command and its arguments (after --)"),
    ),
    Command("whoami", cmd_whoami, "show the current user and balance", "tokenroute whoami --json"),
    Command(
        "keys create", cmd_keys_create, "create an sk-tr-* API key (shown once)", "tokenroute keys create --name laptop",
        option("--name", required=True, type=non_empty, help="a name to recognise the key by"),
        option("--no-cache", action="store_true", help="do not cache the raw key in last_key.txt"),
    ),
    Command("keys list", cmd_keys_list, "list your API keys", "tokenroute keys list"),
    Command(
        "keys revoke", cmd_keys_revoke, "revoke an API key", "tokenroute keys revoke key_123",
        option("id", type=non_empty, help="the key id (from keys list)"),
    ),
    Command("balance", cmd_balance, "show the credit across your active keys", "tokenroute balance --json"),
    Command(
        "topup", cmd_topup, "get a Stripe Checkout URL to add credit", "tokenroute topup --amount 5",
        option("--amount", required=True, type=parse_amount, metavar="USD", help="amount in USD, e.g. 5 or 12.50"),
        NO_BROWSER_OPTION,
    ),
    Command(
        "usage", cmd_usage, "show spend over the last N days", "tokenroute usage --days 7",
        option("--days", type=parse_days, default=30, metavar="N", help="1-365 (default 30)"),
    ),
    Command(
        "env", cmd_env, "print OPENAI_API_KEY and OPENAI_BASE_URL", "tokenroute env >> .env",
        KEY_OPTION,
        option("--export", action="store_true", help="print `export` lines for eval"),
        option("--shell", choices=tuple(SHELL_FORMATS), default="dotenv", help="output syntax (default dotenv)"),
        option("--write", nargs="?", const=".env", metavar="FILE", help="set the two variables in FILE (default .env)"),
    ),
    Command(
        "test", cmd_test, "send a tiny chat completion end to end", "tokenroute test --model openai/gpt-4o",
        option("--model", default=DEFAULT_MODEL, type=non_empty, help=f"model id (default {DEFAULT_MODEL})"),
        KEY_OPTION,
    ),
    Command("models", cmd_models, "list available models with pricing", "tokenroute models --json", KEY_OPTION),
    Command(
        "doctor", cmd_doctor, "check that tokenroute works here", "tokenroute doctor --json", KEY_OPTION, aliases=["status"]
    ),
    Command(
        "completion", cmd_completion, "print a shell completion script", "tokenroute completion bash > tokenroute.bash",
        option("shell", choices=("bash", "zsh", "fish")),
    ),
    Command(
        "help", cmd_help_topic, "show the help of a command", "tokenroute help keys create",
        option("topic", nargs="*", metavar="COMMAND", help="a command, e.g. `keys create`"),
    ),
)


def build_parser() -> argparse.ArgumentParser:
    """The full parser, built from COMMANDS; it defines every behaviour `parse_fast` copies."""
    import argparse

    class Parser(argparse.ArgumentParser):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            # No abbreviations: `--js` is not `--json`, as the fast path agrees.
            super().__init__(*args, allow_abbrev=False, **kwargs)

        def error(self, message: str) -> None:  # type: ignore[override]
            # argparse's exit 2 would read as "network error": a usage error is a user error.
            raise CliError(message, code="usage", usage=self.format_usage().strip())

    def checked(parse: Callable[[str], Any]) -> Callable[[str], Any]:
        def convert(text: str) -> Any:
            try:
                return parse(text)
            except BadValue as error:  # shown as is, not as "invalid parse_days value"
                raise argparse.ArgumentTypeError(str(error)) from None

        convert.__name__ = parse.__name__
        return convert

    # Global options parse before and after the subcommand; SUPPRESS keeps a
    # subcommand's default from overwriting a value given before it.
    common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for flags, settings in GLOBAL_OPTIONS:
        common.add_argument(*flags, **settings, default=argparse.SUPPRESS)
    parser = Parser(prog="tokenroute", description=DESCRIPTION, epilog=EPILOG, parents=[common])
    parser.add_argument("--version", action="version", version=f"tokenroute {__version__}")
    # Not required=True: argparse would report a missing command before an
    # unknown option (`tokenroute --bogus`); parse_args checks both itself.
    groups = {"": parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)}
    parser.by_name = {"": parser}  # type: ignore[attr-defined]  # for the usage line of an error
    for command in COMMANDS:
        group, _, name = command.name.rpartition(" ")
        if group not in groups:
            summary, example = GROUPS[group]
            sub = groups[""].add_parser(
                group, help=summary, description=summary, epilog=f"example: {example}", parents=[common]
            )
            parser.by_name[group] = sub  # type: ignore[attr-defined]
            groups[group] = sub.add_subparsers(dest=f"{group}_command", metavar="COMMAND", parser_class=Parser)
        # An alias gets a parser of its own, so that its help shows the name typed.
        for alias in (name, *command.aliases):
            sub = groups[group].add_parser(
                alias,
                help=command.summary if alias == name else f"same as {name}",
                description=command.summary,
                epilog=f"example: {command.example.replace(name, alias, 1)}",
                parents=[common],
            )
            parser.by_name[f"{group} {alias}".strip()] = sub  # type: ignore[attr-defined]
            sub.set_defaults(func=command.func)
            for flags, settings in command.options:
                if "type" in settings:
                    settings = dict(settings, type=checked(settings["type"]))
                sub.add_argument(*flags, **settings)
    return parser


DESCRIPTION = "Command-line client of the tokenroute LLM gateway."
EPILOG = (
    "example: tokenroute login && tokenroute keys create --name laptop && tokenroute run -- python app.py\n\n"
    "Exit codes: 0 ok, 1 user error, 2 network error, 3 server error, 130 interrupted;\n"
    "run: the command's own status (126 not executable, 127 not found)."
)


class Args:
    """Parsed arguments, as `parse_fast` makes them."""

    def __init__(self, **values: Any) -> None:
        self.__dict__.update(values)


def parse_fast(argv: Sequence[str]) -> Args | None:
    """Parse the common command lines from COMMANDS without argparse, or return None.

    Importing argparse and building the parser costs about as much as
    starting Python, and agents and shells run tokenroute in loops. Anything
    unusual (abbreviations, positionals, bad values, help) returns None and
    goes to the full parser, which defines the behaviour and its errors.
    """
    words = list(argv)
    if words in ([], ["--version"], ["-h"], ["--help"], ["help"]):
        return Args(func=cmd_version if words == ["--version"] else cmd_help, json=False, api_url=None)
    if words[command_start(words):][:1] == ["run"]:
        return parse_run(words)
    values: dict[str, Any] = {"json": False, "api_url": None}
    rest = []
    stream = iter(words)
    for word in stream:
        if word == "--json":
            values["json"] = True
        elif word == "--api-url":
            values["api_url"] = next(stream, "-")
        elif word.startswith("--api-url="):
            values["api_url"] = word[len("--api-url="):]
        else:
            rest.append(word)
    command = next((c for c in COMMANDS if rest[: c.name.count(" ") + 1] in names_of(c)), None)
    if command is None or (values["api_url"] or "").startswith("-"):
        return None
    options = {flags[0]: settings for flags, settings in command.options}
    if not all(flag.startswith("--") for flag in options):  # positionals: argparse
        return None
    for flag, settings in options.items():
        values[dest_of(flag)] = False if settings.get("action") == "store_true" else settings.get("default")
    stream = iter(rest[command.name.count(" ") + 1:])
    for word in stream:
        flag, equals, text = word.partition("=")
        settings = options.get(flag)
        if settings is None:
            return None
        if settings.get("action") == "store_true":
            if equals:
                return None
            values[dest_of(flag)] = True
            continue
        if not equals:
            text = next(stream, "-")
        if text.startswith("-") or text not in settings.get("choices", (text,)):
            return None
        try:
            values[dest_of(flag)] = settings.get("type", str)(text)
        except ValueError:
            return None
    if any(settings.get("required") and values[dest_of(flag)] is None for flag, settings in options.items()):
        return None
    return Args(func=command.func, **values)


def command_start(words: Sequence[str]) -> int:
    """Where the command's name is: after the global options that may come first."""
    index = 0
    while index < len(words):
        if words[index] == "--api-url":
            index += 2
        elif words[index] == "--json" or words[index].startswith("--api-url="):
            index += 1
        else:
            break
    return index


def split_run(words: Sequence[str]) -> tuple[list[str], list[str]]:
    """A `run` line split into tokenroute's words and the child's command line.

    The child's line starts at `--` or at the first word that is not one of
    run's options, and is passed on verbatim: its `--json` is its own.
    """
    index = command_start(words) + 1
    while index < len(words):
        word = words[index]
        if word == "--":
            return list(words[:index]), list(words[index + 1:])
        if not word.startswith("-") or word == "-":
            break
        index += 2 if word in ("--key", "--api-url") else 1
    return list(words[:index]), list(words[index:])


RUN_USAGE = "usage: tokenroute run [-h] [--json] [--api-url URL] [--key sk-tr-...] [--] COMMAND [ARGS ...]"


def parse_run(words: Sequence[str]) -> Args | None:
    """`run`'s line, parsed by hand: argparse's REMAINDER treats `--` differently
    from one Python version to the next. Its help goes to argparse (None)."""
    own, command = split_run(words)
    values: dict[str, Any] = {"json": False, "api_url": None, "key": None, "command": command}
    start = command_start(own)
    stream = iter(own[:start] + own[start + 1:])
    for word in stream:
        flag, equals, text = word.partition("=")
        if word in ("-h", "--help"):
            return None
        if word == "--json":
            values["json"] = True
        elif flag in ("--key", "--api-url"):
            value = text if equals else next(stream, None)
            if value is None:
                raise CliError(f"argument {flag}: expected one argument", code="usage", usage=RUN_USAGE)
            values[dest_of(flag)] = value
        else:
            raise CliError(f"unrecognized argument: {word} (put the command after --)", code="usage", usage=RUN_USAGE)
    if not command:
        raise CliError("run needs a command, like: tokenroute run -- python app.py", code="usage", usage=RUN_USAGE)
    return Args(func=cmd_run, **values)


def own_words(argv: Sequence[str]) -> list[str]:
    """The words of tokenroute's own command line, without a `run` child's."""
    words = list(argv)
    return split_run(words)[0] if words[command_start(words):][:1] == ["run"] else words


def unknown_command(words: Sequence[str]) -> CliError | None:
    """A command name nobody defined, with the nearest one that exists."""
    paths = [path for command in COMMANDS for path in names_of(command)]
    start = command_start(words)
    for depth, word in enumerate(words[start:start + 2]):
        known = list(dict.fromkeys(path[depth] for path in paths if path[:depth] == list(words[start:start + depth])
                                   and len(path) > depth))
        if not known or word.startswith("-"):
            return None
        if word not in known:
            import difflib

            group = " ".join(words[start:start + depth] + [""])
            nearest = difflib.get_close_matches(word, known, n=1)
            hint = f"; did you mean `{group}{nearest[0]}`?" if nearest else ""
            usage = f"usage: tokenroute {group}[-h] [--json] [--api-url URL] {'' if group else '[--version] '}COMMAND ..."
            return CliError(f"unknown command {sanitize(group + word)!r}{hint}", code="usage", usage=usage)
    return None


def names_of(command: Command) -> list[list[str]]:
    """The words that name a command, once per alias."""
    group, _, name = command.name.rpartition(" ")
    return [group.split() + [alias] for alias in (name, *command.aliases)]


def dest_of(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def cmd_version(args: Args, ctx: Context) -> int:
    ctx.stdout.write(f"tokenroute {__version__}\n")
    return EXIT_OK


def cmd_help(args: Args, ctx: Context) -> int:
    """The top-level help, from COMMANDS (argparse renders each command's own -h)."""
    width = max(len(command.name) for command in COMMANDS) + 2
    lines = ["usage: tokenroute [-h] [--json] [--api-url URL] [--version] COMMAND ...", "", DESCRIPTION, "", "commands:"]
    lines += [f"  {command.name:<{width}}{command.summary}" for command in COMMANDS]
    lines += ["", "options:", f"  {'-h, --help':<{width}}show this help (or COMMAND -h for a command's)"]
    lines += [f"  {flags[0]:<{width}}{settings['help']}" for flags, settings in GLOBAL_OPTIONS]
    lines += [f"  {'--version':<{width}}print the version", "", EPILOG]
    ctx.stdout.write("\n".join(lines) + "\n")
    return EXIT_OK


def parse_args(argv: Sequence[str], ctx: Context) -> argparse.Namespace | Args:
    fast = parse_fast(argv)
    if fast is not None:
        return fast
    error = unknown_command(argv)
    if error is not None:
        raise error
    import contextlib

    parser = build_parser()
    with contextlib.redirect_stdout(ctx.stdout):  # a command's --help
        args, extras = parser.parse_known_args(argv)
    name = " ".join(filter(None, (getattr(args, "command", None), getattr(args, "keys_command", None))))
    usage = parser.by_name[name].format_usage().strip()
    if extras:
        plural = "s" if len(extras) > 1 else ""
        raise CliError(f"unrecognized argument{plural}: {' '.join(extras)}", code="usage", usage=usage)
    if not hasattr(args, "func"):
        where = f"tokenroute {name}".strip()
        raise CliError(f"{where} needs a COMMAND (see `{where} -h`)", code="usage", usage=usage)
    args.json = getattr(args, "json", False)
    args.api_url = getattr(args, "api_url", None)
    return args


# ------------------------------------------------------------------ main ---


def report(ctx: Context, error: CliError, *, as_json: bool) -> None:
    message = sanitize(redact(error.message))
    if as_json:
        import json

        body: dict[str, Any] = {"code": error.code, "message": message, "status": error.status}
        if error.next:
            body["next"] = error.next
        body.update(error.payload or {})
        ctx.stderr.write(json.dumps({"error": body}) + "\n")
    else:
        hint = f"; run `{error.next}`" if error.next else ""
        ctx.stderr.write(f"{paint(ctx, 'error', 'error', tty=ctx.stderr_tty)}: {message}{hint}\n")
        if error.usage:
            ctx.stderr.write(error.usage + "\n")
    ctx.stderr.flush()


def main(argv: Sequence[str] | None = None, ctx: Context | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ctx = ctx or Context.from_process()
    as_json = "--json" in own_words(argv) or env_flag(ctx.env.get("TOKENROUTE_JSON"))
    try:
        args = parse_args(argv, ctx)
        args.json = args.json or as_json
        return args.func(args, ctx)
    except SystemExit as done:  # argparse after --help or --version
        return done.code if isinstance(done.code, int) else EXIT_OK
    except CliError as error:
        report(ctx, error, as_json=as_json)
        return error.exit_code
    except KeyboardInterrupt:
        report(ctx, CliError("interrupted", code="interrupted", exit_code=EXIT_INTERRUPTED), as_json=as_json)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `tokenroute keys list | head -1`: the reader left; end quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
