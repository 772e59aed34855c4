"""tokenroute: the command-line client of the tokenroute LLM gateway.

Log in, mint sk-tr-* API keys, check balance and spend, top up, and wire
your tools to the gateway:

    tokenroute login && tokenroute keys create --name laptop && tokenroute env --write

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
    from typing import Any, BinaryIO, TextIO

__version__ = "1.0.0"

DEFAULT_API_URL = "https://api.tokenroute.io"
DEFAULT_MODEL = "openai/gpt-4o-mini"
DEFAULT_TIMEOUT = 30.0  # seconds for one command's HTTP exchange, retries included
DEFAULT_POLL_INTERVAL = 5  # RFC 8628 default; the identity provider omits it
MAX_POLL_INTERVAL = 60  # seconds between device-flow polls, however much the provider backs us off
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

    retryable = True  # a network failure send() may try again; False where another try meets the same

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


def not_retryable(error: CliError) -> CliError:
    error.retryable = False
    return error


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
        stdin: BinaryIO | None = None,
    ) -> None:
        self.env = env
        self.stdout = stdout
        self.stderr = stderr
        self.stdin = stdin  # None: no input (the process was started without stdin, or a test gives none)
        self.stdin_tty = stdin_tty
        self.stdout_tty = stdout_tty
        self.stderr_tty = stderr_tty
        self.sleep = sleep
        self.now = now
        self.open_browser = open_browser or open_in_system_browser
        self.tls: TrustStore | None = None  # made by the first https request, shared by the rest
        self.deadline: float | None = None  # an MCP tool call's end (ctx.now() time): no exchange or wait outlasts it

    @classmethod
    def from_process(cls) -> Context:
        for stream in (sys.stdout, sys.stderr):
            prepare_output_stream(stream)
        return cls(
            env=os.environ,
            stdout=sys.stdout or ClosedStream(),  # None when started with stdout closed (>&-)
            stderr=sys.stderr or ClosedStream(),
            stdin=getattr(sys.stdin, "buffer", None),  # sys.stdin is None when started with stdin closed (<&-)
            stdin_tty=is_tty(sys.stdin),
            stdout_tty=is_tty(sys.stdout),
            stderr_tty=is_tty(sys.stderr),
        )

    @property
    def person_present(self) -> bool:
        """A person at a terminal: prompts, browsers and codes make sense."""
        return self.stdin_tty and self.stderr_tty


class ClosedStream:
    """Stands in for a standard stream the process was started without."""

    def write(self, text: str) -> int:
        raise OSError(9, "the stream is closed")  # EBADF, as a write to a closed descriptor

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def is_tty(stream: TextIO | None) -> bool:
    return stream is not None and stream.isatty()


def prepare_output_stream(stream: TextIO) -> None:
    """Never raise on text the console cannot encode (cp1252 on Windows), and end
    lines with LF everywhere: Windows would write CRLF, and `sh` reading a .env
    or `eval "$(tokenroute env --export)"` would keep the CR in a value."""
    if hasattr(stream, "reconfigure"):
        stream.reconfigure(errors="replace", newline="\n")


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
    home = home_folder(ctx.env, windows=os.name == "nt")
    if not home:
        raise CliError(
            "cannot find your home directory; set HOME or TOKENROUTE_CONFIG_DIR",
            code="config",
        )
    return os.path.join(home, ".tokenroute")


def home_folder(env: Mapping[str, str], *, windows: bool) -> str | None:
    """The home folder as Python's expanduser finds it: USERPROFILE first on Windows
    (where HOME, if set at all, is often a Git Bash or Cygwin one), HOME elsewhere."""
    names = ("USERPROFILE", "HOME") if windows else ("HOME", "USERPROFILE")
    return next((env[name] for name in names if env.get(name)), None)


def credentials_path(ctx: Context) -> str:
    return os.path.join(config_dir(ctx), "credentials.json")


def last_key_path(ctx: Context) -> str:
    return os.path.join(config_dir(ctx), "last_key.txt")


def pending_login_path(ctx: Context) -> str:
    return os.path.join(config_dir(ctx), "pending_login.json")


def lock_path(ctx: Context) -> str:
    return os.path.join(config_dir(ctx), "credentials.lock")


def paradigx_dir(ctx: Context) -> str | None:
    """tokenroute 0.2.0's folder, shared by every Paradigx CLI; None when the config
    folder was moved (a sandbox with its own folder never takes over a real login)."""
    if ctx.env.get("TOKENROUTE_CONFIG_DIR"):
        return None
    return os.path.join(os.path.dirname(config_dir(ctx)), ".paradigx")


def api_url_setting(ctx: Context, flag: str | None) -> tuple[str, str]:
    """The gateway base URL in canonical form and where it came from (flag, env, default)."""
    if flag:
        url, source = flag, "--api-url"
    elif ctx.env.get("TOKENROUTE_API_URL"):
        url, source = ctx.env["TOKENROUTE_API_URL"], "TOKENROUTE_API_URL"
    else:
        url, source = DEFAULT_API_URL, "default"
    if "@" in url:  # never echoed: the part before @ may be a password
        raise CliError(f"{source} must not hold a user name or password; remove the part up to @")
    canonical = canonical_url(url)
    if canonical is None:
        raise CliError(f"{source} is not a valid http(s) gateway URL: {sanitize(url.strip())!r}")
    scheme, host = canonical.partition(":")[0], url_host(canonical)
    if scheme == "http" and not is_loopback(host):
        raise CliError(
            f"refusing to talk to {host} over plain http (credentials would travel unencrypted); use https",
            code="insecure_url",
        )
    return canonical, source


def canonical_url(url: str) -> str | None:
    """One spelling per gateway: lower-case scheme and host, an IDN host in
    punycode, no default port, no trailing slash; None when it is not a base
    URL (user info, a query or a fragment included).
    """
    scheme, sep, rest = url.strip().partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in ("https", "http") or not rest.isprintable() or any(c in rest for c in " ?#@\\"):
        return None
    hostport, slash, path = rest.partition("/")
    if hostport.startswith("["):
        host, bracket, port = hostport[1:].partition("]")
        if not bracket or (port and not port.startswith(":")):
            return None
        host = canonical_ipv6(host)
        port = port[1:]
    else:
        host, _, port = hostport.partition(":")
        host = canonical_host(host)
    if host is None or (port and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536)):
        return None
    if port and int(port) == {"https": 443, "http": 80}[scheme]:
        port = ""
    port = f":{int(port)}" if port else ""
    return f"{scheme}://{host}{port}{slash}{path}".rstrip("/")


def canonical_host(host: str) -> str | None:
    """A DNS name as the resolver sends it (IDNA, lower case), None when malformed."""
    if not host.isascii():
        try:
            ascii_host = host.encode("idna").decode("ascii")
        except UnicodeError:  # an empty label or one over 63 characters
            return None
        if ascii_host.encode().decode("idna").lower() != host.lower():
            return None  # IDNA 2003 would map it to another name (straße -> strasse) than browsers use
        host = ascii_host
    host = host.lower()
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    if len(host) > 253 or not all(0 < len(label) <= 63 for label in labels):
        return None
    return host if set(host) <= HOST_CHARS and not host.startswith("-") else None


HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-._")


def canonical_ipv6(host: str) -> str | None:
    import ipaddress

    try:
        address = ipaddress.IPv6Address(host)
    except ValueError:
        return None
    return None if address.scope_id else f"[{address.compressed}]"


def url_host(url: str) -> str:
    """The host of a canonical URL, IPv6 literals without brackets."""
    hostport = url.partition("://")[2].partition("/")[0]
    if hostport.startswith("["):
        return hostport[1:].partition("]")[0]
    return hostport.partition(":")[0]


def timeout_setting(ctx: Context) -> float:
    raw = ctx.env.get("TOKENROUTE_TIMEOUT")
    if not raw:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value <= 3600:
        raise CliError(f"TOKENROUTE_TIMEOUT must be a number of seconds, got {sanitize(raw)!r}", code="config")
    return value


def call_timeout(ctx: Context, *, clip: bool = True) -> float:
    """TOKENROUTE_TIMEOUT, or what is left of an MCP tool call's time when that is
    less (`clip`); once the call's time is up, no exchange starts."""
    timeout = timeout_setting(ctx)
    if ctx.deadline is None:
        return timeout
    left = ctx.deadline - ctx.now()
    if left <= 0:
        raise network_error("timed out: the tool call took longer than TOKENROUTE_TIMEOUT")
    return min(timeout, left) if clip else timeout


def env_flag(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


# ----------------------------------------------------------- local state ---
# The files, and what each may hold:
#   credentials.json  {"version": 2, "logins": {API_URL: login}}, a login per gateway
#   last_key.txt      "API_URL KEY ID" lines, the newest key created on each gateway
#   pending_login.json the device code between `login --no-wait` and `--resume`
#   credentials.lock  held by every transition that writes the two first files
# and what the earlier releases left (shared/spec/legacy-clients.md): 0.1.0's
# credentials.json and last_key.txt, which record no gateway (kept here under
# the gateway "" until taken over), and 0.2.0's ~/.paradigx files.


def ensure_config_dir(ctx: Context) -> str:
    """Create the config folder owner-only (a umask only removes bits).

    An existing folder is left as it is: it may be one the user chose with
    TOKENROUTE_CONFIG_DIR; the files in it are private anyway, and `doctor`
    reports a folder others can read. (0.1.0's ~/.tokenroute at 0755 is
    tightened when its files are taken over.)
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
    """Atomically replace `path` with `text`, owner-only from the first byte."""
    ensure_config_dir(ctx)
    try:
        replace_file(path, text.encode("utf-8"), mode=0o600)
    except OSError as exc:
        raise file_error("cannot write", path, exc) from None


def replace_file(path: str, data: bytes, *, mode: int) -> None:
    """Atomically replace `path` with `data`, in `mode` from the first byte; OSError on failure.

    The temp file is created in the same folder (so the umask cannot widen
    it and a crash never leaves a half-written secret), then renamed over
    the target; a symlink planted at the target is replaced, not followed.
    Bytes, so that Windows writes the same line endings as everyone else.
    """
    tmp = f"{path}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(tmp, flags, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            if hasattr(os, "fchmod"):
                os.fchmod(handle.fileno(), mode)  # a umask may have taken bits of a shared file's mode
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError:
        try:
            os.remove(tmp)
        except OSError:
            pass  # the error that matters is the one above
        raise


def check_writable(folder: str) -> None:
    """Fail now when nothing can be written in `folder`: before a person approves
    a login that could not be saved, or before a login is taken over that could
    then not leave the file it came from."""
    probe = os.path.join(folder, f".probe.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.remove(probe)
    except OSError as exc:
        raise file_error("cannot write in", folder, exc) from None


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
            f"cannot read {path}: {reason}; `tokenroute login` sets it aside",
            code="credentials_unreadable",
            next="tokenroute login",
        ) from None


def peek_text_file(path: str) -> str | None:
    """The file's text, None when it is absent or unreadable for any reason."""
    try:
        return read_text_file(path)
    except CliError:
        return None


def remove_file(path: str) -> bool:
    try:
        os.remove(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise file_error("cannot remove", path, exc) from None
    return True


def set_aside(ctx: Context, path: str, reason: str) -> None:
    """Rename a damaged file (or folder) out of the way, keeping it for the user."""
    aside = f"{path}.damaged-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(ctx.now()))}"
    try:
        os.replace(path, aside)
    except OSError as exc:
        raise file_error("cannot set aside", path, exc) from None
    warn(ctx, f"{path} {reason}; moved it to {aside}")


def is_own_file(path: str) -> bool:
    """False for a file another user owns: its contents are not ours to trust."""
    try:
        owner = os.stat(path).st_uid
    except OSError:
        return True  # absent or unreadable: reading it reports the problem
    return not hasattr(os, "getuid") or owner == os.getuid()


CREDENTIAL_FIELDS = ("api_url", "access_token", "token_endpoint", "client_id", "resource")
DISCOVERED_FIELDS = ("token_endpoint", "client_id")  # "" in a login taken over from 0.1.0: discovery tells


def read_logins(ctx: Context) -> dict[str, dict[str, Any]]:
    """The stored logins by gateway ("" for 0.1.0's, which names none); a damaged file is an error."""
    path = credentials_path(ctx)
    if not is_own_file(path):
        raise CliError(
            f"{path} belongs to another user; `tokenroute login` sets it aside",
            code="credentials_unreadable",
            next="tokenroute login",
        )
    text = read_text_file(path)
    if text is None:
        return {}
    import json

    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        data = None
    logins = logins_in(data)
    if logins is None:
        raise CliError(
            f"{path} is damaged; `tokenroute login` sets it aside and logs in again",
            code="credentials_corrupt",
            next="tokenroute login",
        )
    return logins


def logins_in(data: object) -> dict[str, dict[str, Any]] | None:
    """The logins of a credentials.json of any release, None when it is damaged."""
    if not isinstance(data, dict):
        return None
    if data.get("version") == STORE_VERSION:
        logins = data.get("logins")
        if not isinstance(logins, dict):
            return None
        valid = all(is_valid_login(login) and login["api_url"] == url for url, login in logins.items())
        return logins if valid else None
    if not (data.keys() >= EARLIER_FIELDS or "api_url" in data):
        return None
    login = earlier_login(data, data.get("api_url") or "")  # 0.1.0's, or this release's before version 2
    return {login["api_url"]: login} if is_valid_login(login) else None


EARLIER_FIELDS = {"access_token", "refresh_token", "expires_at", "issuer", "client_id"}  # 0.1.0 wrote all, some null


STORE_VERSION = 2


def earlier_login(data: dict[str, Any], api_url: str) -> dict[str, Any]:
    """A login of 0.1.0 or 0.2.0 in this release's shape; its nulls mean unknown."""
    expires_at = data.get("expires_at")
    return {
        "api_url": canonical_url(api_url) or "" if api_url else "",
        "access_token": data.get("access_token"),
        "refresh_token": data.get("refresh_token") or "",
        "expires_at": expires_at if isinstance(expires_at, (int, float)) else 0,
        "token_endpoint": data.get("token_endpoint") or "",
        "client_id": data.get("client_id") or "",
        "resource": data.get("resource") or api_url,
    }


def is_valid_login(creds: object) -> bool:
    if not isinstance(creds, dict):
        return False
    texts = all(
        isinstance(creds.get(name), str)
        and (is_header_safe(creds[name]) or (creds[name] == "" and (name in DISCOVERED_FIELDS or not creds["api_url"])))
        for name in CREDENTIAL_FIELDS
    )
    refresh_token = creds.get("refresh_token")  # "" when the provider granted no offline_access
    refreshable = refresh_token == "" or (isinstance(refresh_token, str) and is_header_safe(refresh_token))
    expires_at = creds.get("expires_at")
    dated = isinstance(expires_at, (int, float)) and not isinstance(expires_at, bool) and abs(expires_at) < 1e12
    return texts and refreshable and dated


def write_logins(ctx: Context, logins: dict[str, dict[str, Any]]) -> None:
    """Replace the stored logins (hold the lock); none left removes the file."""
    if logins:
        write_private_file(ctx, credentials_path(ctx), json_text({"version": STORE_VERSION, "logins": logins}))
    else:
        remove_file(credentials_path(ctx))


def require_credentials(ctx: Context, api_url: str) -> dict[str, Any]:
    """The login for this gateway, or the error that says how to get one."""
    adopt_earlier_releases(ctx, api_url)
    logins = read_logins(ctx)
    if api_url in logins:
        return logins[api_url]
    if "" in logins:  # the takeover failed, and said why
        raise CliError(
            f"the login of tokenroute 0.1.0 in {credentials_path(ctx)} is not taken over yet: make "
            f"{config_dir(ctx)} writable, or set TOKENROUTE_CONFIG_DIR to a writable folder and log in",
            code="config",
        )
    others = ", ".join(url for url in logins if url)
    elsewhere = f" (logged in to {others}; choose it with --api-url or TOKENROUTE_API_URL)" if others else ""
    raise CliError(f"not logged in to {api_url}{elsewhere}", code="auth_required", next="tokenroute login")


def save_login(ctx: Context, creds: dict[str, Any]) -> None:
    """Store one gateway's login next to the others' (hold the lock)."""
    try:
        logins = read_logins(ctx)
    except CliError:  # a damaged file: `login` set it aside; a refresh reaches here only after reading it
        logins = {}
    logins[creds["api_url"]] = creds
    write_logins(ctx, logins)


def is_header_safe(value: str) -> bool:
    return bool(value) and value.isascii() and value.isprintable() and " " not in value


def is_plausible_key(key: str) -> bool:
    return key.startswith(KEY_PREFIX) and len(key) > len(KEY_PREFIX) and set(key) <= KEY_CHARS and len(key) <= 200


def read_key_cache(ctx: Context) -> dict[str, tuple[str, str]]:
    """Cached keys by gateway, as (key, id); "" is an earlier release's bare key.
    An unreadable cache holds no usable key: the next `keys create` replaces it."""
    keys = {}
    for line in (peek_text_file(last_key_path(ctx)) or "").splitlines():
        words = line.split()
        if len(words) == 1 and is_plausible_key(words[0]):
            keys[""] = (words[0], "")
        elif len(words) == 3 and not line.startswith("#"):
            keys[words[0]] = (words[1], words[2])
    return keys


def write_key_cache(ctx: Context, keys: dict[str, tuple[str, str]]) -> None:
    """Replace the cached keys (hold the lock); none left removes the file."""
    if not keys:
        remove_file(last_key_path(ctx))
        return
    lines = [KEY_CACHE_HEADER] + [f"{url} {key} {key_id or '-'}" for url, (key, key_id) in keys.items() if url]
    write_private_file(ctx, last_key_path(ctx), "\n".join(lines) + "\n")


KEY_CACHE_HEADER = "# tokenroute: the newest API key created on each gateway (gateway, key, key id)"


def cache_key(ctx: Context, api_url: str, key: str, key_id: str) -> None:
    with CredentialsLock(ctx):
        keys = read_key_cache(ctx)
        keys[api_url] = (key, key_id if is_header_safe(key_id) else "-")
        write_key_cache(ctx, keys)


def forget_cached_key(ctx: Context, api_url: str, *, key_id: str | None = None, prefix: str | None = None) -> bool:
    """Drop this gateway's cached key (only if it is `key_id` or starts with `prefix`, when given)."""
    with CredentialsLock(ctx):
        keys = read_key_cache(ctx)
        key, cached_id = keys.get(api_url, ("", ""))
        matches = key and (
            (key_id is None and prefix is None)
            or (key_id is not None and key_id == cached_id)
            or (cached_id == "-" and prefix is not None and len(prefix) > len(KEY_PREFIX) and key.startswith(prefix))
        )
        if matches:
            del keys[api_url]
            write_key_cache(ctx, keys)
        return bool(matches)


def resolve_api_key(ctx: Context, flag: str | None, api_url: str) -> tuple[str, str]:
    """The API key for /v1 calls and where it came from: --key, env, then this gateway's cached key."""
    if flag is not None:
        key, source = flag.strip(), "--key"
    elif ctx.env.get("TOKENROUTE_API_KEY"):
        key, source = ctx.env["TOKENROUTE_API_KEY"].strip(), "TOKENROUTE_API_KEY"
    else:
        adopt_earlier_releases(ctx, api_url)
        keys = read_key_cache(ctx)
        key, source = keys.get(api_url, keys.get("", ("", "")))[0], last_key_path(ctx)  # "": not taken over yet
        if not key:
            others = ", ".join(url for url in keys if url)
            elsewhere = f" (the cached keys are for {others})" if others else ""
            raise CliError(
                f"no API key for {api_url}{elsewhere}: pass --key, set TOKENROUTE_API_KEY, or create one",
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


# ------------------------------------------------ earlier releases' files ---


def adopt_earlier_releases(ctx: Context, api_url: str) -> None:
    """Take over what tokenroute 0.1.0 and 0.2.0 left, for the gateway in use.

    Their key files and 0.1.0's login record no gateway: like 0.2.0, this
    gives them to the gateway that the first command after the upgrade talks
    to. A login ends up in exactly one place, since a refresh token that two
    programs hold is poison once one of them rotates it: 0.2.0's entry
    leaves ~/.paradigx/auth.json, whose other products' entries stay as they
    were. Of several keys the newest wins and the rest are dropped, so a key
    revoked later cannot come back from an old file. Says once, on stderr.
    """
    if not earlier_release_files(ctx, api_url):
        return
    try:
        with CredentialsLock(ctx):
            took = adopt_login(ctx, api_url) + adopt_key(ctx, api_url)
            folder = config_dir(ctx)
            if paradigx_dir(ctx) is not None and os.name == "posix" and os.stat(folder).st_mode & 0o077:
                os.chmod(folder, 0o700)  # 0.1.0 made it with the umask, usually 0755
                took.append(f"made {folder} private (0700)")
    except (CliError, OSError) as error:  # a read-only home: the earlier files stay, and still serve
        warn(ctx, f"could not take over the earlier release's files: {getattr(error, 'message', error)}")
        return
    if took:
        note(ctx, f"Upgraded from an earlier tokenroute, for {api_url}: {'; '.join(took)}.")


def earlier_release_files(ctx: Context, api_url: str) -> bool:
    """Whether anything of 0.1.0 or 0.2.0 is left (cheap: a few stats and small reads)."""
    creds = peek_text_file(credentials_path(ctx))
    keys = peek_text_file(last_key_path(ctx)) or ""
    if (creds is not None and f'"version": {STORE_VERSION}' not in creds) or any(
        len(line.split()) == 1 and is_plausible_key(line.strip()) for line in keys.splitlines()
    ):
        return True
    shared = paradigx_dir(ctx)
    if shared is None:
        return False
    auth = peek_text_file(os.path.join(shared, "auth.json")) or ""
    try:
        private = not os.stat(config_dir(ctx)).st_mode & 0o077 or os.name != "posix"
    except OSError:
        private = True
    return not private or url_host(api_url) in auth.lower() or os.path.exists(os.path.join(shared, PARADIGX_KEY))


PARADIGX_KEY = "tokenroute_last_key.txt"


def adopt_login(ctx: Context, api_url: str) -> list[str]:
    """Move an earlier release's login for this gateway into credentials.json (under the lock)."""
    try:
        logins = read_logins(ctx)
    except CliError:
        return []  # a damaged file is reported by the command that needs it
    taken = []
    path, found = shared_logins(ctx, api_url) or ("", [])
    if found:
        check_writable(os.path.dirname(path))  # else the login would end up in two places
    if api_url not in logins and found:
        logins[api_url] = max(found, key=lambda login: login["expires_at"])
        taken.append(f"took over the login of tokenroute 0.2.0 ({path})")
    earlier = logins.pop("", None)
    if earlier is not None and api_url not in logins:
        logins[api_url] = dict(earlier, api_url=api_url, resource=api_url)
        taken.append(f"took over the login of tokenroute 0.1.0 ({credentials_path(ctx)})")
    stored = peek_text_file(credentials_path(ctx))
    if earlier is not None or taken or (stored is not None and f'"version": {STORE_VERSION}' not in stored):
        write_logins(ctx, logins)  # an unversioned file of this release's first cut becomes version 2 once
    if found:
        remove_shared_logins(path, {api_url})
    return taken


def shared_logins(ctx: Context, api_url: str) -> tuple[str, list[dict[str, Any]]] | None:
    """0.2.0's logins for this gateway in ~/.paradigx/auth.json, and that file's path."""
    folder = paradigx_dir(ctx)
    if folder is None:
        return None
    path = os.path.join(folder, "auth.json")
    tokens = shared_tokens(peek_text_file(path))
    if tokens is None:
        return None
    found = [earlier_login(entry, api_url) for entry in tokens.values() if is_tokenroute_entry(entry, api_url)]
    return path, [login for login in found if is_valid_login(login)]


def shared_tokens(text: str | None) -> dict[str, Any] | None:
    import json

    try:
        data = json.loads(text or "null")
    except (ValueError, RecursionError):
        return None  # not ours to judge: another product may own the damage
    tokens = data.get("tokens") if isinstance(data, dict) else None
    return tokens if isinstance(tokens, dict) else None


def shared_gateways(ctx: Context) -> list[str]:
    """The gateways of the logins in ~/.paradigx/auth.json: another product's, or 0.2.0's
    of a gateway not used since the upgrade (nothing tells the two apart)."""
    folder = paradigx_dir(ctx)
    tokens = shared_tokens(peek_text_file(os.path.join(folder, "auth.json"))) if folder else None
    urls = {entry["api_url"] for entry in (tokens or {}).values() if isinstance(entry, dict) and isinstance(entry.get("api_url"), str)}
    return sorted(sanitize(canonical_url(url) or url) for url in urls)


def is_tokenroute_entry(entry: object, api_url: str) -> bool:
    return isinstance(entry, dict) and isinstance(entry.get("api_url"), str) and canonical_url(entry["api_url"]) == api_url


def remove_shared_logins(path: str, api_urls: set[str]) -> None:
    """Rewrite auth.json without tokenroute's entries for `api_urls`: atomically, in
    its own mode, at a symlink's target, and every other byte as it was."""
    path = os.path.realpath(path)
    text = peek_text_file(path) or ""
    kept = without_members(text, lambda entry: any(is_tokenroute_entry(entry, url) for url in api_urls))
    if kept is None or kept == text:
        return
    try:
        replace_file(path, kept.encode("utf-8"), mode=os.stat(path).st_mode & 0o777)
    except OSError as exc:
        raise file_error("cannot write", path, exc) from None


def without_members(text: str, drop: Callable[[object], bool]) -> str | None:
    """`text`, a JSON object whose "tokens" object loses the members that `drop`
    picks, every other byte as written; None when `text` is not such an object."""
    import json

    decoder = json.JSONDecoder()
    top = object_members(text, text.find("{"), decoder)
    tokens = next((span for key, span in top or [] if key == "tokens"), None)
    members = object_members(text, tokens[1], decoder) if tokens else None
    if members is None:
        return None
    keep = [span for _, span in members if not drop(decoder.raw_decode(text, span[1])[0])]
    if len(keep) == len(members):
        return text
    opening, closing = tokens[1] + 1, tokens[2] - 1  # just inside its braces
    if not keep:
        return text[:opening] + text[closing:]
    first, last = members[0][1], members[-1][1]
    comma = text[first[2]:members[1][1][0]] if len(members) > 1 else ", "  # the file's own separator
    body = comma.join(text[span[0]:span[2]] for span in keep)
    return text[:first[0]] + body + text[last[2]:]


def object_members(text: str, start: int, decoder: Any) -> list[tuple[str, tuple[int, int, int]]] | None:
    """The members of the JSON object whose "{" is at `start`, as (key, (where the
    key starts, where its value starts, where its value ends)); None if it is none."""
    from json.decoder import scanstring

    members: list[tuple[str, tuple[int, int, int]]] = []
    at = skip_space(text, start + 1) if 0 <= start < len(text) and text[start] == "{" else -1
    try:
        while 0 <= at < len(text) and text[at] == '"':
            key, after = scanstring(text, at + 1)
            colon = skip_space(text, after)
            if text[colon:colon + 1] != ":":
                return None
            value_start = skip_space(text, colon + 1)
            _, value_end = decoder.raw_decode(text, value_start)
            members.append((key, (at, value_start, value_end)))
            at = skip_space(text, value_end)
            if text[at:at + 1] == ",":
                at = skip_space(text, at + 1)
    except ValueError:
        return None
    return members if 0 <= at < len(text) and text[at] == "}" else None


def skip_space(text: str, at: int) -> int:
    while at < len(text) and text[at] in " \t\r\n":
        at += 1
    return at


def adopt_key(ctx: Context, api_url: str) -> list[str]:
    """Give the newest of the earlier releases' cached keys to this gateway (under the lock)."""
    keys = read_key_cache(ctx)
    found = []
    if "" in keys:
        found.append((file_time(last_key_path(ctx)), keys.pop("")[0], last_key_path(ctx)))
    folder = paradigx_dir(ctx)
    shared = os.path.join(folder, PARADIGX_KEY) if folder else None
    shared_key = (peek_text_file(shared) or "").strip() if shared else ""
    if is_plausible_key(shared_key):
        check_writable(os.path.dirname(shared))  # a key that stays there would come back after a revoke
        found.append((file_time(shared) + 0.001, shared_key, shared))  # a tie goes to 0.2.0's newer copy
    taken = []
    newest = max(found) if found else None
    if newest is not None and api_url not in keys:
        keys[api_url] = (newest[1], "-")
        taken.append(f"took over the cached API key {redact(newest[1])} ({newest[2]})")
    if found:
        write_key_cache(ctx, keys)
    if shared and os.path.exists(shared):
        remove_file(shared)
    return taken


def file_time(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0


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
        if self.ctx.deadline is not None:  # an MCP tool call's: a free lock is still taken once it has passed
            deadline = min(deadline, self.ctx.deadline)
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
    """Whether `host` (a name, an IP address, or an IPv6 literal in brackets) is this machine."""
    host = host[1:-1] if host.startswith("[") else host
    octets = host.split(".")
    if host in ("localhost", "::1") or (
        len(octets) == 4 and octets[0] == "127" and all(o.isascii() and o.isdigit() and int(o) < 256 for o in octets)
    ):
        return True  # the common cases, without importing ipaddress (`env` against a local gateway)
    if ":" not in host and not host.replace(".", "").isdigit():
        return False  # a name
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
    if (canonical_ipv6(host) if ":" in host else canonical_host(host)) is None:
        raise CliError(f"{sanitize(host)!r} in {sanitize(url)!r} is not a valid host name")
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
    # A write cut short would leave its outcome unknown (a key made, a refresh token rotated away): it gets its time.
    timeout = call_timeout(ctx, clip=method == "GET")
    deadline = ctx.now() + timeout
    opener = build_opener(ctx, scheme, host)

    def attempt() -> Response:
        return within_deadline(
            lambda: exchange(
                opener, method, url, data, headers,
                timeout=max(0.01, deadline - ctx.now()), host=host, proxied=bool(proxy_settings(ctx.env)),
            ),
            seconds=deadline - ctx.now(),
            host=host,
        )

    # Only GET is retried: a POST that may have reached the server is never sent twice.
    for number in range(1, MAX_ATTEMPTS if method == "GET" else 1):
        try:
            response = attempt()
        except CliError as error:
            if error.exit_code != EXIT_NETWORK or not error.retryable or not wait_before_retry(ctx, number, None, deadline):
                raise
            continue
        retry_after = response.headers.get("Retry-After")
        if response.status not in RETRY_STATUSES or not wait_before_retry(ctx, number, retry_after, deadline):
            return response
    return attempt()  # the last one stands, whatever it brings


def wait_before_retry(ctx: Context, attempt: int, retry_after: str | None, deadline: float) -> bool:
    """Sleep before the next attempt; False when the deadline leaves no room."""
    asked = retry_after_seconds(retry_after)
    delay = 0.5 * 2 ** (attempt - 1) if asked is None else min(asked, MAX_RETRY_AFTER)
    if ctx.now() + delay >= deadline:
        return False
    ctx.sleep(delay)
    return True


def retry_after_seconds(value: str | None) -> float | None:
    """A Retry-After in seconds; None when absent, an HTTP date or garbage (keep the backoff)."""
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    return max(0.0, seconds) if seconds is not None and seconds == seconds else None


def build_opener(ctx: Context, scheme: str, host: str) -> Opener:
    # Plain http only ever goes to loopback, and loopback is never proxied.
    proxies = proxy_settings(ctx.env) if scheme == "https" and not is_loopback(host) else {}
    return Opener(trust_store(ctx) if scheme == "https" else None, proxies.get("https"), proxies.get("no", ""))


class Opener:
    """HTTP/1.1 through http.client, one connection per request: urllib.request would import
    tempfile, shutil, bz2, lzma and hashlib (about 10% of a command) for features never used."""

    def __init__(self, trust: TrustStore | None, proxy: str | None, no_proxy: str) -> None:
        self.trust, self.proxy, self.no_proxy = trust, proxy, no_proxy

    def open(self, method: str, url: str, data: bytes | None, headers: dict[str, str], timeout: float) -> Any:
        """The answer, whatever its status (a 3xx is never followed): its headers read, its body not."""
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port  # .port: ValueError when not a number
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        try:
            connection = self.connect(host, port, timeout)
            try:
                connection.request(method, target, body=data, headers={**headers, "Connection": "close"})
            except BaseException:
                connection.close()
                raise
        except OSError as exc:  # nothing answered: the host could not be reached (urllib said so too)
            raise connection_error(host, exc) from None
        try:
            return connection.getresponse()
        finally:
            if connection.sock is not None:  # kept for a keep-alive answer, which reads through its own reference
                connection.sock.close()

    def connect(self, host: str, port: int | None, timeout: float) -> Any:
        """A connection with its TLS handshake done; a certificate that does not verify is tried once
        more against the whole default store."""
        import ssl

        try:
            return self.connection(host, port, timeout)
        except ssl.SSLCertVerificationError as exc:
            # More CAs may complete a chain, but never change the host a certificate names.
            if self.trust is None or exc.verify_code in CERT_FOR_ANOTHER_HOST or not self.trust.widen():
                raise
        # The handshake failed, so nothing was sent: trying again is safe for a POST too.
        return self.connection(host, port, timeout)

    def connection(self, host: str, port: int | None, timeout: float) -> Any:
        import http.client
        import ssl

        tunnel = None
        if self.trust is None:
            connection = http.client.HTTPConnection(host, port, timeout=timeout)
        elif self.proxy is None or bypasses_proxy(host, port, self.no_proxy):
            connection = http.client.HTTPSConnection(host, port, timeout=timeout, context=self.trust.context)
        else:  # TLS to the host inside a CONNECT tunnel: the proxy sees neither the request nor the key
            address, authorization = proxy_address(self.proxy)
            connection = tunnel = http.client.HTTPSConnection(address, timeout=timeout, context=self.trust.context)
            connection.set_tunnel(host, port, {"Proxy-Authorization": authorization} if authorization else None)
        try:
            connection.connect()
        except BaseException as exc:
            connection.close()
            if tunnel is not None and isinstance(exc, OSError) and not isinstance(exc, ssl.SSLError):
                raise proxy_error(tunnel.host, tunnel.port, exc) from None  # the way through the proxy failed
            raise
        return connection


def proxy_error(host: str, port: int, exc: OSError) -> CliError:
    """The proxy failed, not the gateway: say which (never with its user name or password)."""
    proxy = f"the HTTPS_PROXY proxy {sanitize(host)}:{port}"
    if " 407 " in f" {exc} ":
        return not_retryable(network_error(f"{proxy} wants a user name and password (407): put them in HTTPS_PROXY"))
    return network_error(f"cannot reach {proxy}: {describe(exc)}")


def bypasses_proxy(host: str, port: int | None, no_proxy: str) -> bool:
    """NO_PROXY as urllib reads it: `*`, or names that are the host or a domain of it, with or without a port."""
    if no_proxy == "*":
        return True
    host = host.lower()
    names = (host, f"{host}:{port}") if port is not None else (host,)
    for entry in no_proxy.split(","):
        entry = entry.strip().lstrip(".").lower()
        if entry and any(name == entry or name.endswith("." + entry) for name in names):
            return True
    return False


def proxy_address(proxy: str) -> tuple[str, str | None]:
    """A proxy variable's `host:port` and Proxy-Authorization, read as urllib reads them.

    A ValueError for a malformed URL, whose message may hold the password: never shown.
    """
    from urllib.parse import unquote

    scheme, colon, rest = proxy.partition(":")
    if scheme and colon and "/" not in scheme and rest.startswith("/"):
        if not rest.startswith("//"):
            raise ValueError("proxy URL with no authority")
        end = rest.find("/", max(2, rest.find("@")))
        authority = rest[2:end] if end != -1 else rest[2:]
    else:  # no scheme: `host:port`
        authority = proxy
    userinfo, at, address = authority.rpartition("@")
    port = address.rpartition(":")[2] if ":" in address and not address.endswith("]") else ""
    if port and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError("malformed proxy port")  # `user:password` with the host left out
    user, _, password = userinfo.partition(":")
    if not (at and user and password):
        return unquote(address), None
    import base64

    credentials = base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode()).decode("ascii")
    return unquote(address), f"Basic {credentials}"


def trust_store(ctx: Context) -> TrustStore:
    """The process's one TLS context: loading CA certificates costs more than a handshake."""
    if ctx.tls is None:
        ctx.tls = TrustStore(ctx.env)
    return ctx.tls


class TrustStore:
    """A TLS context holding as little of the default CA store as verifies.

    OpenSSL 3.0 parses a whole bundle file up front (45 ms for a system's)
    but reads a hashed directory lazily. So the context starts with the
    default store's directory alone; when a certificate does not verify,
    `widen` loads the rest and the caller tries once more. The directory is
    part of the default store: the trust decision is always the default's.
    """

    def __init__(self, env: Mapping[str, str], paths: Any = None) -> None:
        """`paths`: an ssl.DefaultVerifyPaths, the process's own when None (tests pass another)."""
        import ssl

        cafile, capath = env.get("SSL_CERT_FILE") or None, env.get("SSL_CERT_DIR") or None
        self.rest: Callable[[], None] | None = None  # loads the rest of the default store
        try:
            # Only when neither variable is set at all: OpenSSL takes one set to "" as "no file"
            # or "no directory", so the platform's directory may not be part of the default then.
            if "SSL_CERT_FILE" not in env and "SSL_CERT_DIR" not in env:
                # .capath: the directory load_default_certs() reads (None if none); Windows: the system store
                platform_dir = (paths or ssl.get_default_verify_paths()).capath
                if sys.platform == "win32" or not platform_dir or not is_hashed_directory(platform_dir):
                    self.context = ssl.create_default_context()
                    return
                self.context = ssl.create_default_context(capath=platform_dir)
                self.rest = self.context.load_default_certs
            elif cafile and capath and os.path.isfile(cafile) and is_hashed_directory(capath):
                self.context = ssl.create_default_context(capath=capath)
                self.rest = lambda: self.context.load_verify_locations(cafile=cafile)
            else:  # exactly as before: what the variables name replaces the platform's store
                self.context = ssl.create_default_context(cafile=cafile, capath=capath)
        except OSError as exc:  # ssl.SSLError included: a missing or unreadable bundle
            raise ca_load_error(exc) from None

    def widen(self) -> bool:
        """Load the rest of the default store; False when the context holds all of it already."""
        if self.rest is None:
            return False
        try:
            self.rest()
        except OSError as exc:  # kept, so that a retry meets the same error
            raise ca_load_error(exc) from None
        self.rest = None
        return True


def ca_load_error(exc: OSError) -> CliError:
    return not_retryable(
        network_error(f"cannot load the CA certificates named by SSL_CERT_FILE / SSL_CERT_DIR: {describe(exc)}")
    )


def is_hashed_directory(path: str) -> bool:
    """Whether `path` holds certificates under OpenSSL's subject-hash names (`openssl rehash`)."""
    try:
        with os.scandir(path) as entries:
            return any(is_hash_name(entry.name) for entry in entries)
    except OSError:
        return False


def is_hash_name(name: str) -> bool:
    """`5ad8a5d6.0`: a certificate's subject hash and a number (`.r0` names hold CRLs)."""
    stem, _, number = name.partition(".")
    return len(stem) == 8 and set(stem) <= set("0123456789abcdef") and number.isascii() and number.isdigit()


def proxy_settings(env: Mapping[str, str]) -> dict[str, str]:
    """Proxies from the usual *_proxy variables (lower case wins), as urllib reads them."""
    proxies = {}
    for name in sorted(env, key=str.islower):  # upper case first, so lower case overrides
        scheme, _, suffix = name.lower().rpartition("_")
        if suffix == "proxy" and scheme and env[name]:
            proxies[scheme] = env[name]
        elif suffix == "proxy" and scheme and name.islower():
            proxies.pop(scheme, None)  # an empty lower-case variable turns the upper-case one off
    if "REQUEST_METHOD" in env and "HTTP_PROXY" in env and "http_proxy" not in env:
        proxies.pop("http", None)  # under CGI, HTTP_PROXY comes from a request header (httpoxy)
    return proxies


def within_deadline(work: Callable[[], Any], *, seconds: float, host: str) -> Any:
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
    opener: Opener,
    method: str,
    url: str,
    data: bytes | None,
    headers: dict[str, str],
    *,
    timeout: float,
    host: str,
    proxied: bool,
) -> Response:
    import http.client
    import socket
    import ssl

    try:
        with opener.open(method, url, data, headers, timeout) as handle:
            body = read_capped(handle)
            length = handle.headers.get("Content-Length")
            if length and length.isascii() and length.isdigit() and int(length) != len(body):
                raise network_error(f"the connection to {host} closed mid-answer")
            return Response(handle.status, handle.headers, body)
    except (socket.timeout, TimeoutError):
        raise network_error(f"timed out waiting for {host} (TOKENROUTE_TIMEOUT to wait longer)") from None
    except ssl.SSLError as exc:
        raise connection_error(host, exc) from None
    except (http.client.HTTPException, OSError) as exc:
        raise network_error(f"connection to {host} failed: {describe(exc)}") from None
    except ValueError:  # a malformed host, or a malformed *_proxy URL (which may hold a password: never shown)
        if proxied:
            raise CliError("a proxy variable (HTTPS_PROXY, HTTP_PROXY, ...) holds a malformed URL", code="config") from None
        raise CliError(f"{sanitize(host)} is not a valid host name") from None


def connection_error(host: str, reason: object) -> CliError:
    import socket
    import ssl

    if isinstance(reason, ssl.SSLCertVerificationError):
        return not_retryable(certificate_error(host, reason))  # another handshake meets the same certificate
    if isinstance(reason, socket.gaierror):
        return network_error(f"cannot resolve {host}: check your network and the gateway URL")
    if isinstance(reason, ConnectionRefusedError):
        return network_error(f"connection refused by {host}: is the gateway up and its URL right?")
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return network_error(f"timed out waiting for {host} (TOKENROUTE_TIMEOUT to wait longer)")
    return network_error(f"cannot reach {host}: {describe(reason)}")


CERT_EXPIRED, CERT_NOT_YET_VALID = 10, 9  # OpenSSL's X509_V_ERR_* codes
CERT_FOR_ANOTHER_HOST = (62, 64)  # hostname mismatch, IP address mismatch
CERT_FROM_UNKNOWN_CA = (2, 18, 19, 20, 21)  # no issuer found, self-signed, unable to verify the leaf


def certificate_error(host: str, reason: Any) -> CliError:
    """Say which problem a certificate has, since each has its own fix."""
    code = reason.verify_code
    if code == CERT_EXPIRED:
        return network_error(f"the TLS certificate of {host} has expired (or this machine's clock is wrong)")
    if code == CERT_NOT_YET_VALID:
        return network_error(f"the TLS certificate of {host} is not valid yet: check this machine's clock")
    if code in CERT_FOR_ANOTHER_HOST:
        return network_error(
            f"the TLS certificate presented by {host} is for another host name: check the gateway URL"
        )
    if code in CERT_FROM_UNKNOWN_CA:
        return network_error(
            f"the TLS certificate of {host} is signed by an unknown certificate authority; "
            "behind a proxy with its own CA, set SSL_CERT_FILE to its certificate bundle"
        )
    return network_error(
        f"TLS certificate of {host} could not be verified ({describe(reason.verify_message)}); "
        "behind a proxy with its own CA, set SSL_CERT_FILE to its certificate bundle"
    )


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
        401: ("auth_required", "tokenroute login") if account else ("invalid_key", "tokenroute keys create --name NAME"),
        402: ("insufficient_balance", "tokenroute topup --amount 5"),
        403: ("forbidden", None),
        404: ("not_found", None),
        429: ("rate_limited", None),
    }.get(status, ("invalid_input", None))
    if status == 401 and not account:  # logging in does not fix an API key
        message += "; the gateway rejected the API key (revoked or unknown): pass another with --key, or create one"
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
    with CredentialsLock(ctx):  # `logout` takes it too: a logged-out login is never written back
        current = read_logins(ctx).get(creds["api_url"])
        if current is None:
            raise not_logged_in()
        if current["access_token"] != rejected and not expiring(ctx, current):
            return current["access_token"]
        refreshed = refresh_credentials(ctx, current)
        try:
            save_login(ctx, refreshed)
        except CliError as error:  # a full disk: the token works now, its rotated refresh token is lost
            warn(ctx, f"{error.message}; the next command will need `tokenroute login`")
        return refreshed["access_token"]


def refresh_credentials(ctx: Context, creds: dict[str, Any]) -> dict[str, Any]:
    if not creds["refresh_token"]:  # the provider granted no offline_access
        raise session_expired()
    if not creds["token_endpoint"] or not creds["client_id"]:  # a login taken over from 0.1.0
        found = discover(ctx, creds["api_url"])
        creds = dict(creds, token_endpoint=found["token_endpoint"], client_id=creds["client_id"] or found["client_id"])
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
    pending = {
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
    problem = unusable_grant(pending)
    if problem is not None:  # shown to a person, and handed to agents as the tool's own words
        raise server_error(f"the identity provider sent {problem}")
    return pending


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
    if ctx.deadline is not None:  # an MCP tool call's time is up: pending, like --timeout
        end = min(end, ctx.deadline)
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
            if exc.exit_code != EXIT_NETWORK:
                raise
            response = None
        answer = response.json() if response is not None else None
        answer = answer if isinstance(answer, dict) else {}
        if response is not None and response.status == 200 and is_token(answer.get("access_token")):
            return answer
        if response is None or response.status == 429 or response.status >= 500:
            # Unreachable, rate limited or failing: back off, and keep polling until the code expires.
            interval = min(interval * 2, MAX_POLL_INTERVAL)
            wait = retry_after_seconds(response.headers.get("Retry-After") if response is not None else None)
            next_poll = ctx.now() + max(interval, min(wait or 0.0, MAX_POLL_INTERVAL))
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


USER_CODE_LETTERS = "BCDFGHJKLMNPQRSTVWXZ"  # RFC 8628 6.1: no vowels, so a code never spells words
USER_CODE_PATTERN = f"^[{USER_CODE_LETTERS}{USER_CODE_LETTERS.lower()}0-9-]{{1,32}}$"


def is_user_code(value: object) -> bool:
    """A device-flow user code: base-20 letters (either case), digits and dashes."""
    allowed = set(USER_CODE_LETTERS + USER_CODE_LETTERS.lower() + "0123456789-")
    return isinstance(value, str) and 0 < len(value) <= 32 and set(value) <= allowed


def unusable_grant(pending: dict[str, Any]) -> str | None:
    """What makes a device grant unfit to reach a person or an agent, None when nothing does."""
    if not is_user_code(pending["user_code"]):
        return "a user code outside the device-flow alphabet"
    for name in ("verification_uri", "verification_uri_complete"):
        if not is_url_for_person(pending[name], pending["api_url"]):
            return f"a {name} that is not an https URL to open"
    return None


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
    try:
        ctx.stderr.write(message + "\n")
        ctx.stderr.flush()
    except (OSError, ValueError):
        pass  # stderr is closed: the outcome is in the exit code and on stdout


def warn(ctx: Context, message: str) -> None:
    note(ctx, f"{paint(ctx, 'warning', 'warning', tty=ctx.stderr_tty)}: {message}")


def is_url_for_person(url: object, api_url: str) -> bool:
    """Whether a server-chosen URL may reach a person or an agent (opened, shown or passed
    on): https to a valid host, or plain http to this machine when the gateway is on it
    too; printable ASCII, no spaces, no user name (`https://bank.example@evil.example`)."""
    from urllib.parse import urlsplit

    if not isinstance(url, str) or not url.isascii() or not url.isprintable() or " " in url or len(url) > 4096:
        return False
    try:
        parts = urlsplit(url)
        host, _ = parts.hostname or "", parts.port  # a port that is not a number raises
    except ValueError:
        return False
    if "@" in parts.netloc or not host or (canonical_ipv6(host) if ":" in host else canonical_host(host)) is None:
        return False
    return parts.scheme == "https" or (parts.scheme == "http" and is_loopback(host) and is_loopback(url_host(api_url)))


def open_url_for_person(ctx: Context, url: str, api_url: str) -> None:
    if is_url_for_person(url, api_url):
        ctx.open_browser(url)


# -------------------------------------------------------------- commands ---
# Each takes (args, ctx) and returns an exit code; output goes through the
# renderers above, errors are raised as CliError for main to report.


def cmd_login(args: argparse.Namespace, ctx: Context) -> int:
    api_url, _ = api_url_setting(ctx, args.api_url)
    if args.resume and args.no_wait:
        raise CliError("--no-wait starts a login and --resume finishes one: give one of them", code="usage")
    if args.user_code is not None and not args.resume:
        raise CliError("--user-code names the login that --resume finishes: add --resume", code="usage")
    if args.resume:
        return resume_login(args, ctx, api_url)
    started = login_start(ctx, api_url, force=args.force) if args.no_wait else current_login(ctx, api_url, args.force)
    if started is not None:  # logged in already, or --no-wait's code to show (--resume finishes)
        if args.json:
            render_json(ctx, started)
        elif started["status"] == "logged_in":
            say_ok(ctx, f"already logged in to {api_url} (tokenroute login --force to log in again)")
        else:
            render_pending(ctx, args, started, out=ctx.stdout)
        return EXIT_OK
    pending = new_device_login(ctx, api_url)
    render_pending(ctx, args, pending, out=ctx.stderr)
    if ctx.person_present and not args.no_browser:
        open_url_for_person(ctx, pending["verification_uri_complete"], api_url)
    answer = poll_device_flow(ctx, pending, first_wait=pending["interval"])
    return finish_login(args, ctx, pending, answer)


def usable_login(ctx: Context, api_url: str) -> dict[str, Any] | None:
    """This gateway's stored login, None when there is none."""
    replaceable_logins(ctx)  # a damaged file goes aside first: an earlier release's login may still be taken
    adopt_earlier_releases(ctx, api_url)
    return read_logins(ctx).get(api_url)


def replaceable_logins(ctx: Context) -> dict[str, dict[str, Any]]:
    """The stored logins, for `login` and `logout`: a credentials file that cannot
    be used (damaged, unreadable, a folder, another user's) is set aside, so
    that they always get the user out."""
    try:
        return read_logins(ctx)
    except CliError as error:
        if error.code not in ("credentials_corrupt", "credentials_unreadable"):
            raise
        set_aside(ctx, credentials_path(ctx), f"could not be used ({error.message.partition('; ')[0]})")
        return {}


def read_pending_logins(ctx: Context) -> list[dict[str, Any]]:
    """The logins waiting for approval, oldest first (1.0 kept one, alone in the file)."""
    import json

    path = pending_login_path(ctx)
    # A damaged one is replaced by the next `login --no-wait`; a FIFO would block the read.
    text = peek_text_file(path) if os.path.isfile(path) else None
    try:
        data = json.loads(text) if text else None
    except (ValueError, RecursionError):
        data = None
    found = data.get("pending") if isinstance(data, dict) and data.get("version") == PENDING_VERSION else [data]
    return [pending for pending in found if is_valid_pending(pending)] if isinstance(found, list) else []


PENDING_VERSION = 2
PENDING_LIMIT = 10  # logins kept waiting at most; a new one pushes out the oldest


def save_pending_login(ctx: Context, pending: dict[str, Any]) -> None:
    """Keep `pending` beside the others until it ends: two hosts (or terminals) may each wait for their own."""
    with CredentialsLock(ctx):
        path = pending_login_path(ctx)
        if os.path.lexists(path) and (not os.path.isfile(path) or not is_own_file(path)):
            set_aside(ctx, path, "could not be used")
        write_pending_logins(ctx, [*waiting_logins(ctx), pending][-PENDING_LIMIT:])


def drop_pending_login(ctx: Context, pending: dict[str, Any]) -> None:
    """Forget a login that ended (approved, denied or expired); the caller holds the CredentialsLock."""
    found = read_pending_logins(ctx)
    if any(other["device_code"] == pending["device_code"] for other in found):
        left = [other for other in still_waiting(ctx, found) if other["device_code"] != pending["device_code"]]
        write_pending_logins(ctx, left)


def waiting_logins(ctx: Context) -> list[dict[str, Any]]:
    return still_waiting(ctx, read_pending_logins(ctx))


def still_waiting(ctx: Context, pendings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [pending for pending in pendings if pending["expires_at"] > ctx.now()]


def write_pending_logins(ctx: Context, pendings: list[dict[str, Any]]) -> None:
    if pendings:
        write_private_file(ctx, pending_login_path(ctx), json_text({"version": PENDING_VERSION, "pending": pendings}))
    else:
        remove_file(pending_login_path(ctx))


def logged_in(ctx: Context, api_url: str) -> bool:
    """Whether a stored login for `api_url` still works (`login` without --force stops there)."""
    return usable_login(ctx, api_url) is not None and login_still_valid(ctx, api_url)


def login_start(ctx: Context, api_url: str, *, force: bool = False) -> dict[str, Any]:
    """`login --no-wait`: start a login for a person to approve, unless one still works."""
    current = current_login(ctx, api_url, force)
    if current is not None:
        return current
    pending = new_device_login(ctx, api_url)
    save_pending_login(ctx, pending)
    return pending_view(pending)


def current_login(ctx: Context, api_url: str, force: bool) -> dict[str, Any] | None:
    """`{"status": "logged_in", ...}` when a stored login still works (and `force` is off); `login` stops there."""
    if not force and logged_in(ctx, api_url):
        return {"status": "logged_in", "api_url": api_url}
    return None


def new_device_login(ctx: Context, api_url: str) -> dict[str, Any]:
    """A device code to approve; the folder is checked first, so no approved login goes unsaved."""
    check_writable(ensure_config_dir(ctx))
    return start_device_flow(ctx, api_url)


def login_finish(
    ctx: Context, api_url: str, *, timeout: float | None = None, user_code: str | None = None
) -> dict[str, Any]:
    """`login --resume`: wait up to `timeout` seconds for the approval, then save the login."""
    return store_login(ctx, *await_login(ctx, api_url, timeout=timeout, user_code=user_code))


def load_pending_login(ctx: Context, api_url: str, user_code: str | None = None) -> dict[str, Any]:
    """The login waiting for approval on this gateway with this code; without a code, the newest."""
    found = [
        pending for pending in read_pending_logins(ctx)
        if pending["api_url"] == api_url and (user_code is None or pending["user_code"].upper() == user_code.upper())
    ]
    if not found:
        which = f" with the code {sanitize(user_code)}" if user_code is not None else ""
        raise CliError(f"no login{which} is waiting here", code="no_pending_login", next="tokenroute login --no-wait")
    return found[-1]


def is_valid_pending(pending: object) -> bool:
    if not isinstance(pending, dict) or not all(isinstance(pending.get(name), str) for name in PENDING_TEXT_FIELDS):
        return False
    interval, expires_at = pending.get("interval"), pending.get("expires_at")
    return (
        isinstance(interval, int) and 1 <= interval <= 60
        and isinstance(expires_at, (int, float)) and abs(expires_at) < 1e12
        and unusable_grant(pending) is None  # 1.0 kept what the identity provider sent
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
    return finish_login(args, ctx, *await_login(ctx, api_url, timeout=args.timeout, user_code=args.user_code))


def await_login(
    ctx: Context, api_url: str, *, timeout: float | None, user_code: str | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The pending login and the identity provider's grant, once approved within `timeout` seconds."""
    pending = load_pending_login(ctx, api_url, user_code)
    try:
        answer = poll_device_flow(ctx, pending, first_wait=0, timeout=timeout)
    except CliError as exc:
        if exc.exit_code == EXIT_SERVER:  # denied or expired: it is over
            with CredentialsLock(ctx):
                drop_pending_login(ctx, pending)
        raise
    if answer is None:
        raise CliError(
            "the login is still waiting for approval",
            code="login_pending",
            next="tokenroute login --resume",
            payload={"pending": pending_view(pending)},
        )
    return pending, answer


def store_login(ctx: Context, pending: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any]:
    """Save the approved login; only then is its pending code forgotten."""
    with CredentialsLock(ctx):
        save_login(ctx, credentials_from_grant(ctx, pending, answer))
        drop_pending_login(ctx, pending)
    return {"status": "logged_in", "api_url": pending["api_url"]}


def finish_login(args: argparse.Namespace, ctx: Context, pending: dict[str, Any], answer: dict[str, Any]) -> int:
    login = store_login(ctx, pending, answer)
    if args.json:
        render_json(ctx, login)
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
    """The code for a person to approve; `pending` is the device flow's, or its `pending_view`."""
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
    """Forget this gateway's login (every gateway's with --all), under the refresh lock."""
    api_url, _ = api_url_setting(ctx, args.api_url)
    adopt_earlier_releases(ctx, api_url)  # so no copy of its refresh token stays behind
    with CredentialsLock(ctx):
        logins = replaceable_logins(ctx)
        gone = list(logins) if args.all else [url for url in logins if url == api_url]
        if gone:
            write_logins(ctx, {url: login for url, login in logins.items() if url not in gone})
        remove_file(pending_login_path(ctx))
        keys = read_key_cache(ctx)
        forgotten = [url for url in keys if args.all or url == api_url] if args.forget_key else []
        if args.forget_key:
            keys = {url: key for url, key in keys.items() if url not in forgotten}
            write_key_cache(ctx, keys)
        shared = paradigx_dir(ctx)
        if args.all and shared is not None:  # 0.2.0's logins, of every gateway tokenroute knows
            remove_shared_logins(os.path.join(shared, "auth.json"), {*logins, api_url, DEFAULT_API_URL} - {""})
    kept = sorted(keys) if args.all else [url for url in keys if url == api_url]
    if args.json:
        render_json(ctx, {"logged_out": bool(gone), "api_url": api_url, "cached_keys": kept})
        return EXIT_OK
    forgot = f"forgot the cached API key{'s' if len(forgotten) > 1 else ''}" if forgotten else ""
    if gone:
        say_ok(ctx, f"logged out of {'every gateway' if args.all else api_url}" + (f" and {forgot}" if forgot else ""))
    elif forgot:
        say_ok(ctx, f"{forgot} of {'every gateway' if args.all else api_url} (not logged in)")
    else:
        ctx.stdout.write(f"Not logged in to {'any gateway' if args.all else api_url}; nothing to do\n")
    if kept:
        note(ctx, f"An API key for {', '.join(kept)} stays cached in {last_key_path(ctx)} (env, run, test and models "
             f"use it); forget it with `tokenroute{gateway_option(args, api_url)} logout{' --all' if args.all else ''} --forget-key`")
    left = shared_gateways(ctx) if args.all else []
    if left:  # 0.2.0's logins of gateways never used since look like any other product's
        note(ctx, f"{os.path.join(paradigx_dir(ctx) or '', 'auth.json')} still holds logins for {', '.join(left)}; "
             "if one is tokenroute 0.2.0's, `tokenroute --api-url URL logout` removes it")
    return EXIT_OK


class Show:
    """The command of an operation that only shows data: `--json`, `fields` of an object
    (`api_url` among them is the gateway's), or a `table` of a list. `arguments` are
    the command's options the operation takes."""

    def __init__(
        self,
        operation: Callable[..., Any],
        *,
        arguments: Sequence[str] = (),
        fields: Sequence[str] = (),
        table: tuple[Sequence[str], Callable[[dict[str, Any]], list[str]]] | None = None,
        empty: str = "",
    ) -> None:
        self.operation = operation
        self.arguments = arguments
        self.fields = fields
        self.table = table
        self.empty = empty  # a note for an empty table

    def __call__(self, args: argparse.Namespace, ctx: Context) -> int:
        api_url, _ = api_url_setting(ctx, args.api_url)
        data = self.operation(ctx, api_url, **{name: getattr(args, name) for name in self.arguments})
        if args.json:
            render_json(ctx, data)
        elif self.table is None:
            render_fields(ctx, dict(data, api_url=api_url), self.fields)
        elif data or not self.empty:
            headers, row = self.table
            render_table(ctx, headers, [row(item) for item in data])
        else:
            note(ctx, self.empty)
        return EXIT_OK


ME_FIELDS = ("display_name", "email", "balance_usd", "status", "id", "logto_sub")


def whoami(ctx: Context, api_url: str) -> dict[str, Any]:
    return call_account(ctx, api_url, "GET", "/api/v1/me")


cmd_whoami = Show(whoami, fields=(*ME_FIELDS, "api_url"))


def balance(ctx: Context, api_url: str) -> dict[str, Any]:
    return call_account(ctx, api_url, "GET", "/api/v1/balance")


cmd_balance = Show(balance, fields=("balance_usd",))


def create_key(ctx: Context, api_url: str, *, name: str, no_cache: bool = False) -> dict[str, Any]:
    """`keys create`: a new key, cached in last_key.txt (unless `no_cache`) before anyone sees it.

    A key that cannot be cached is still the only copy: the KeyNotCached error carries it.
    """
    key = call_account(
        ctx, api_url, "POST", "/api/v1/me/keys", json_body={"name": name}, idempotency_key=os.urandom(16).hex()
    )
    raw = key.get("raw")
    if not isinstance(raw, str) or not raw:
        raise server_error("the gateway created a key but sent no raw value")
    if no_cache:
        return key
    if not is_plausible_key(raw):
        raise KeyNotCached(key, server_error("the gateway sent a key that is not an sk-tr- token; not cached"))
    try:
        cache_key(ctx, api_url, raw, sanitize(str(key.get("id", ""))))
    except CliError as exc:
        raise KeyNotCached(key, exc) from None
    return key


class KeyNotCached(CliError):
    """A key was created but could not be cached; `key` is its only copy."""

    def __init__(self, key: dict[str, Any], reason: CliError) -> None:
        super().__init__(
            f"the key was created but not cached: {reason.message}",
            code=reason.code,
            exit_code=reason.exit_code,
            payload={"key": key},
        )
        self.key = key
        self.reason = reason


def cmd_keys_create(args: argparse.Namespace, ctx: Context) -> int:
    """Create a key, cache it, then show it: a key that cannot be shown is never lost."""
    api_url, _ = api_url_setting(ctx, args.api_url)
    try:
        key, not_cached = create_key(ctx, api_url, name=args.name, no_cache=args.no_cache), None
    except KeyNotCached as error:
        key, not_cached = error.key, error.reason
    raw = key["raw"]
    try:
        if args.json:
            render_json(ctx, key)
        else:
            render_fields(ctx, key, ("name", "id", "key_prefix", "balance_usd", "status"))
            ctx.stdout.write(f"Key:     {sanitize(raw)}\n")
        ctx.stdout.flush()
    except (OSError, ValueError) as exc:  # stdout closed, or its reader left
        key_id = sanitize(str(key.get("id", "")))
        cached = not args.no_cache and not_cached is None
        raise undelivered_key(ctx, exc, key_id, cached=cached, gateway=gateway_option(args, api_url)) from None
    if args.no_cache:
        note(ctx, "Save this key now: it is shown only once (not cached: --no-cache).")
        return EXIT_OK
    if not_cached is not None:  # shown above all the same: it is the only copy
        raise CliError(f"the key above was created but not cached: {not_cached.message}", code=not_cached.code,
                       exit_code=not_cached.exit_code)
    note(ctx, f"Save this key now: it is shown only once. Cached in {last_key_path(ctx)} for env, run, test and models.")
    return EXIT_OK


def undelivered_key(ctx: Context, exc: Exception, key_id: str, *, cached: bool, gateway: str) -> CliError:
    import shlex

    reason = describe(exc)
    if cached:
        return CliError(
            f"the new key could not be printed ({reason}); it is cached in {last_key_path(ctx)}",
            code="output_failed",
        )
    return CliError(
        f"the new key {key_id} could not be printed ({reason}) and was not cached: it was delivered nowhere; "
        f"revoke it",
        code="output_failed",
        next=f"tokenroute{gateway} keys revoke {shlex.quote(key_id)}",
    )


def gateway_option(args: argparse.Namespace, api_url: str) -> str:
    """` --api-url URL` for a command to suggest, when the gateway came from that flag."""
    import shlex

    return f" --api-url {shlex.quote(api_url)}" if args.api_url else ""


KEY_COLUMNS = ("id", "name", "key_prefix", "status", "balance_usd", "created_at")


def list_keys(ctx: Context, api_url: str) -> list[dict[str, Any]]:
    keys = call_account(ctx, api_url, "GET", "/api/v1/me/keys", kind=list)
    return [key for key in keys if isinstance(key, dict)]


def key_row(key: dict[str, Any]) -> list[str]:
    return [human(column, key.get(column)) for column in KEY_COLUMNS]


cmd_keys_list = Show(
    list_keys,
    table=([FIELD_LABELS[column] for column in KEY_COLUMNS], key_row),
    empty="No keys yet. Create one: tokenroute keys create --name NAME",
)


def revoke_key(ctx: Context, api_url: str, *, id: str) -> dict[str, Any]:
    from urllib.parse import quote

    if id in (".", ".."):
        raise CliError(f"{id!r} is not a key id (see tokenroute keys list)")
    key = call_account(ctx, api_url, "DELETE", "/api/v1/me/keys/" + quote(id, safe=""))
    prefix = key.get("key_prefix")
    if forget_cached_key(ctx, api_url, key_id=id, prefix=prefix if isinstance(prefix, str) else None):
        note(ctx, f"Removed it from the key cache ({last_key_path(ctx)}).")
    return key


def cmd_keys_revoke(args: argparse.Namespace, ctx: Context) -> int:
    api_url, _ = api_url_setting(ctx, args.api_url)
    key = revoke_key(ctx, api_url, id=args.id)
    if args.json:
        render_json(ctx, key)
    else:
        say_ok(ctx, f"revoked {show(key.get('id', args.id))} ({show(key.get('name'))})")
    return EXIT_OK


def topup(ctx: Context, api_url: str, *, amount: str) -> dict[str, Any]:
    """`topup`: a Stripe Checkout session for a person to pay; it never pays by itself."""
    session = call_account(
        ctx,
        api_url,
        "POST",
        "/api/v1/topup",
        json_body={"amount_usd": amount},
        idempotency_key=os.urandom(16).hex(),
    )
    if not is_url_for_person(session.get("checkout_url"), api_url):
        raise server_error("the gateway sent no checkout URL to open (an https URL)")
    if "amount_usd" in session and not same_amount(session["amount_usd"], amount):
        raise server_error(f"the gateway's checkout is not for the {amount} USD asked")
    return session


def same_amount(value: object, amount: str) -> bool:
    """Whether the gateway's amount (a decimal string) is the one asked for."""
    from decimal import Decimal

    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return False
    try:
        return Decimal(str(value)) == Decimal(amount)
    except (ArithmeticError, ValueError):  # not a number, or a signalling NaN
        return False


def cmd_topup(args: argparse.Namespace, ctx: Context) -> int:
    api_url, _ = api_url_setting(ctx, args.api_url)
    session = topup(ctx, api_url, amount=args.amount)
    url = session["checkout_url"]
    if args.json:
        render_json(ctx, session)
        return EXIT_OK
    ctx.stdout.write(f"Checkout: {sanitize(url)}\n")
    expires = session.get("expires_at")
    until = f" The link expires {readable_time(expires)}." if expires is not None else ""
    note(ctx, f"Open it to pay {usd(session.get('amount_usd', args.amount))}; credit arrives once paid.{until}")
    if ctx.person_present and ctx.stdout_tty and not args.no_browser:
        open_url_for_person(ctx, url, api_url)
    return EXIT_OK


USAGE_FIELDS = ("range_days", "total_requests", "total_tokens_in", "total_tokens_out", "total_cost_usd")


def usage(ctx: Context, api_url: str, *, days: int = 30) -> dict[str, Any]:
    return call_account(ctx, api_url, "GET", f"/api/v1/me/usage?days={days}")


cmd_usage = Show(usage, arguments=["days"], fields=USAGE_FIELDS)


SHELL_FORMATS = {
    "dotenv": "{name}={value}",
    "sh": "export {name}={value}",
    "bash": "export {name}={value}",
    "zsh": "export {name}={value}",
    "fish": "set -gx {name} {value}",
    "powershell": "$env:{name} = '{value}'",
}


def env_values(ctx: Context, api_url: str, *, key: str | None = None) -> dict[str, str]:
    """The two variables an OpenAI SDK needs: the API key and the gateway's /v1 URL."""
    key, _ = resolve_api_key(ctx, key, api_url)
    if not is_env_safe(api_url):
        raise CliError("the API URL holds characters a shell or .env file would misread")
    return {"OPENAI_API_KEY": key, "OPENAI_BASE_URL": api_url + "/v1"}


def cmd_env(args: argparse.Namespace, ctx: Context) -> int:
    """Print the two variables an OpenAI SDK needs, nothing else on stdout."""
    api_url, _ = api_url_setting(ctx, args.api_url)
    variables = env_values(ctx, api_url, key=args.key)
    if getattr(args, "write", None) is not None:
        return write_env_file(args, ctx, variables)
    if args.json:
        render_json(ctx, variables)
        return EXIT_OK
    shell = "sh" if args.export and args.shell == "dotenv" else args.shell
    line = SHELL_FORMATS[shell]
    quote = shell in ("sh", "fish")  # zsh would glob the brackets of an IPv6 host; dotenv readers take them as is
    ctx.stdout.write("".join(line.format(name=n, value=shell_word(v) if quote else v) + "\n" for n, v in variables.items()))
    return EXIT_OK


ENV_SAFE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:/%@+=,-")  # no ~: sh expands it after ":"


def is_env_safe(value: str) -> bool:
    """Only characters that every shell and .env reader takes literally (unquoted, or
    single-quoted for a shell: the brackets of an IPv6 host)."""
    return bool(value) and set(value) <= ENV_SAFE_CHARS | {"[", "]"}


def shell_word(value: str) -> str:
    return value if set(value) <= ENV_SAFE_CHARS else f"'{value}'"


def write_env_file(args: argparse.Namespace, ctx: Context, variables: dict[str, str]) -> int:
    """`env --write`: set the variables in a dotenv file in place, once each."""
    if args.export or args.shell != "dotenv":
        raise CliError("--write writes dotenv lines: leave out --export and --shell", code="usage")
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
        try:  # a new file is private; an existing one keeps its mode
            replace_file(path, new, mode=0o600 if old is None else os.stat(path).st_mode & 0o7777)
        except OSError as exc:
            raise CliError(f"cannot write {args.write}: {exc.strerror}") from None
    if args.json:
        render_json(ctx, {"path": os.path.abspath(args.write), "created": old is None, "changed": new != old})
    elif old is None:
        private = " (readable only by you)" if os.name == "posix" else ""  # Windows: the folder's ACL decides
        note(ctx, f"Created {args.write}{private} with {' and '.join(variables)}")
    elif new != old:
        note(ctx, f"Updated {args.write}: {', '.join(changes) or 'final newline added'}")
    else:
        note(ctx, f"{args.write} already has {' and '.join(variables)}; unchanged")
    warn_if_committable(ctx, path, shown=path if os.path.islink(args.write) else args.write)
    return EXIT_OK


def set_dotenv_values(text: bytes, variables: dict[str, str]) -> tuple[bytes, list[str]]:
    """`text` with each variable set once, where it first was; every other line byte for byte.

    Works on bytes so that any encoding, CRLF ending, quoting and comment
    outside the variables' own lines survives. Returns the new text and what
    changed, for people.
    """
    lines = dotenv_entries(text)
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


def dotenv_entries(text: bytes) -> list[bytes]:
    """The file's lines, except that a quoted value spanning lines stays one entry with its line.

    python-dotenv (and node's) read `CERT="...` up to the closing quote, so an
    `OPENAI_API_KEY=` line inside it is part of CERT, not a variable. A quote
    that never closes makes no multi-line value, as python-dotenv reads it.
    """
    import re

    line = re.compile(rb"[^\r\n]*(?:\r\n|\r|\n)?")
    quoted_start = re.compile(rb"[^\S\r\n]*(?:export[^\S\r\n]+)?[^=#\s]+[^\S\r\n]*=[^\S\r\n]*(?=[\"'])")
    quoted = {ord('"'): re.compile(rb'"(?:\\"|[^"])*"'), ord("'"): re.compile(rb"'(?:\\'|[^'])*'")}
    entries: list[bytes] = []
    start = 0
    while start < len(text):
        end = line.match(text, start).end()
        value = quoted_start.match(text, start, end)
        closed = value and quoted[text[value.end()]].match(text, value.end())
        if closed and closed.end() > end:
            end = line.match(text, closed.end()).end()
        entries.append(text[start:end])
        start = end
    return entries


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


def warn_if_committable(ctx: Context, path: str, *, shown: str) -> None:
    """Warn when git tracks the file or would take it in `git add .`; silent without git."""
    import shutil
    import subprocess

    git = shutil.which("git", path=ctx.env.get("PATH"))
    if git is None:
        return
    folder, name = os.path.split(path)

    def status(*words: str) -> int | None:
        try:
            return subprocess.run([git, *words, "--", name], cwd=folder or ".", env=dict(ctx.env),
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  timeout=10).returncode
        except (OSError, subprocess.SubprocessError):
            return None

    # check-ignore says "not ignored" for any tracked file, whatever .gitignore lists.
    if status("ls-files", "--error-unmatch") == 0:
        ignore = "" if status("check-ignore", "--no-index", "-q") == 0 else " and add it to .gitignore"
        untrack = f"git rm --cached {shell_word(shown)}"
        warn(ctx, f"{shown} holds an API key and git tracks it; untrack it with `{untrack}`{ignore}")
    elif status("check-ignore", "-q") == 1:  # in a work tree and not ignored (128: not a work tree)
        warn(ctx, f"{shown} holds an API key and git does not ignore it; add it to .gitignore")


def cmd_run(args: argparse.Namespace, ctx: Context) -> int:
    """Run a command with the two variables in its environment: no key in a file."""
    api_url, _ = api_url_setting(ctx, args.api_url)
    env = {**ctx.env, **env_values(ctx, api_url, key=args.key)}
    if "PATH" in env:
        env["PATH"] = without_own_bin(env["PATH"], virtual_env=env.get("VIRTUAL_ENV"))
    for stream in (ctx.stdout, ctx.stderr):
        if stream is not None:  # None: started with the stream closed
            stream.flush()  # what is buffered here would be lost in the exec
    if os.name == "posix":
        replace_process(args.command, env)
    return run_and_wait(args.command, env)


def without_own_bin(path: str, *, virtual_env: str | None) -> str:
    """PATH for the child without the bin folder of tokenroute's own virtual environment in front.

    `uvx tokenroute run -- python app.py`: uvx puts its tool environment's
    bin first, whose `python` lacks the user's packages. That folder stays
    when it is the user's own active virtualenv (tokenroute installed in it),
    and a Python that is no virtual environment (/usr/bin) is never left out.
    """
    folders = path.split(os.pathsep)
    in_venv = sys.prefix != sys.base_prefix
    if not in_venv or len(folders) < 2 or not same_folder(folders[0], os.path.dirname(sys.executable)):
        return path
    if virtual_env and same_folder(virtual_env, sys.prefix):
        return path
    return os.pathsep.join(folders[1:])


def same_folder(one: str, other: str) -> bool:
    try:
        return os.path.samefile(one, other)  # two stat calls: realpath costs ~20 times more
    except (OSError, ValueError):  # absent, or "" (the current folder in PATH)
        return False


def replace_process(command: Sequence[str], env: dict[str, str]) -> None:
    """exec the command: no parent left to forward signals to or hold memory; returns only on failure."""
    import _signal  # builtin and already loaded: `signal` would import enum

    # Python ignores SIGPIPE and SIGXFSZ, and an exec keeps ignored signals:
    # `tokenroute run -- yes | head -1` must end `yes` as a shell would.
    ignored = [number for number in (getattr(_signal, "SIGPIPE", None), getattr(_signal, "SIGXFSZ", None))
               if number is not None and _signal.getsignal(number) == _signal.SIG_IGN]
    for number in ignored:
        _signal.signal(number, _signal.SIG_DFL)
    try:
        os.execvpe(command[0], list(command), env)
    except OSError as exc:
        for number in ignored:  # back as they were: reporting the failure must not die of a closed pipe
            _signal.signal(number, _signal.SIG_IGN)
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
    return exit_status(status)


def exit_status(status: int) -> int:
    """A child's status as tokenroute's exit status.

    POSIX: a signal death (-N) is 128+N, as a shell reports it. Windows: an
    NTSTATUS such as 0xC0000005 comes as a DWORD, too big for a C int on
    Python <= 3.12.7; its signed form exits with the same 32 bits.
    """
    if status < 0:
        return 128 - status
    return status - 2**32 if status > 0x7FFFFFFF else status


def exec_error(program: str, exc: OSError) -> CliError:
    import errno

    name = sanitize(program)
    if exc.errno == errno.ENOENT:
        return CliError(f"{name}: command not found", code="command_not_found", exit_code=EXIT_NOT_FOUND)
    reason = exc.strerror or exc.__class__.__name__
    return CliError(f"{name}: cannot run it: {reason}", code="command_not_executable", exit_code=EXIT_NOT_EXECUTABLE)


def try_chat(ctx: Context, api_url: str, *, model: str = DEFAULT_MODEL, key: str | None = None) -> dict[str, Any]:
    """`test`: one tiny chat completion, end to end."""
    key, _ = resolve_api_key(ctx, key, api_url)
    completion = call_api(
        ctx,
        "POST",
        api_url + "/v1/chat/completions",
        key=key,
        json_body={
            "model": model,
            "messages": [{"role": "user", "content": "Reply with the single word OK."}],
            "max_tokens": 5,
        },
    )
    return {"ok": True, "model": model, "reply": chat_reply(completion), "usage": completion.get("usage")}


def cmd_test(args: argparse.Namespace, ctx: Context) -> int:
    api_url, _ = api_url_setting(ctx, args.api_url)
    result = try_chat(ctx, api_url, model=args.model, key=args.key)
    reply = result["reply"]
    if args.json:
        render_json(ctx, result)
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


def list_models(ctx: Context, api_url: str, *, key: str | None = None) -> list[dict[str, Any]]:
    key, _ = resolve_api_key(ctx, key, api_url)
    listing = call_api(ctx, "GET", api_url + "/v1/models", key=key)
    models = listing.get("data")
    if not isinstance(models, list):
        raise server_error("the gateway's model list has no data")
    return [model for model in models if isinstance(model, dict)]


def model_row(model: dict[str, Any]) -> list[str]:
    """Prices per million tokens: per 1k they are fractions of a cent."""
    prices = [usd(model.get(c), per=1000) if model.get(c) is not None else "-" for c in MODEL_COLUMNS[3:]]
    return [show(model.get(c)) for c in MODEL_COLUMNS[:3]] + prices


cmd_models = Show(
    list_models, arguments=["key"], table=(("Model", "Provider", "Tier", "Input $/1M", "Output $/1M"), model_row)
)


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


def run_checks(ctx: Context, args: argparse.Namespace | Args) -> list[Check]:
    """Check everything that decides whether tokenroute works here (`args`: api_url and key)."""
    checks = [check_python()]
    try:
        api_url, source = api_url_setting(ctx, args.api_url)
    except CliError as error:
        checks.append(Check.failed("api url", error))
    else:
        checks.append(Check("api url", "ok", f"{api_url} (from {source})"))
        checks += [check_gateway(ctx, api_url), check_login(ctx, api_url), check_api_key(ctx, args, api_url)]
    return checks + check_files(ctx)


def doctor(ctx: Context, api_url: str | None, *, key: str | None = None) -> dict[str, Any]:
    """`doctor`; `api_url` is the --api-url flag (or None): checking the setting is part of it."""
    return doctor_report(run_checks(ctx, Args(api_url=api_url, key=key)))


def doctor_report(checks: list[Check]) -> dict[str, Any]:
    return {"ok": not any(check.status == "problem" for check in checks), "checks": [c.as_dict() for c in checks]}


def cmd_doctor(args: argparse.Namespace, ctx: Context) -> int:
    """Check everything that decides whether tokenroute works here."""
    checks = run_checks(ctx, args)
    problems = [check.exit_code or EXIT_USER for check in checks if check.status == "problem"]
    code = next((c for c in (EXIT_NETWORK, EXIT_SERVER) if c in problems), EXIT_USER if problems else EXIT_OK)
    if args.json:
        render_json(ctx, doctor_report(checks))
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
    return Check("login", "ok", f"logged in to {api_url} as {show(me.get('email'))} ({state}, {refreshable})")


def check_api_key(ctx: Context, args: argparse.Namespace, api_url: str) -> Check:
    try:
        key, source = resolve_api_key(ctx, args.key, api_url)
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
        checks.append(file_access_check(path, mode, is_dir=os.path.isdir(path), posix=os.name == "posix"))
    return checks or [Check("files", "ok", "no credential files yet")]


def file_access_check(path: str, mode: int, *, is_dir: bool, posix: bool) -> Check:
    """Whether others can read a credential file, with the fix.

    Windows has no owner/group/other modes (os.stat shows 666 or 444): who may
    read a file is its ACL, inherited from the folder, and under the user's
    profile that is the user, SYSTEM and Administrators. tokenroute sets no ACL.
    """
    import shlex

    if not posix:
        return Check("files", "ok", f"{path} (access follows the folder's Windows ACL)")
    if not mode & 0o077:
        return Check("files", "ok", f"{path} ({oct(mode)[2:]}, private)")
    fix = f"chmod {'700' if is_dir else '600'} {shlex.quote(path)}"
    return Check("files", "problem", f"{path} is readable by others ({oct(mode)[2:]})", fix=fix)


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


# ------------------------------------------------------------------- mcp ---
# `tokenroute mcp`: the operations above as MCP tools over stdio (JSON-RPC 2.0,
# one message a line). The server is dual-era: a request whose `_meta` names a
# 2026-07-28 protocol version is served on its own (that revision has no
# handshake), and `initialize` opens the older handshake for the hosts that
# still speak it. A helper thread reads stdin and answers at once what needs no
# tool (ping, tools/list, initialize, errors, cancellations); tool calls run one
# at a time on the main thread, where a token refresh may hold signals. One lock
# orders every line written. The threads and locks are `_thread`'s: importing
# `threading` would cost `initialize` 5% of its time. Nothing here runs or is
# imported unless `mcp` does.

MCP_MODERN_VERSIONS = ("2026-07-28",)
# Newest first. Not 2025-03-26: it obliges a server to accept JSON-RPC batches, which this
# one refuses (one message a line); a client offering it is answered 2024-11-05.
MCP_HANDSHAKE_VERSIONS = ("2025-11-25", "2025-06-18", "2024-11-05")
MCP_VERSION_KEY = "io.modelcontextprotocol/protocolVersion"
MCP_CAPABILITIES_KEY = "io.modelcontextprotocol/clientCapabilities"
# A whole tool call ends within 2 x MCP_TIMEOUT (hosts give up after 60 s): no exchange
# starts after MCP_TIMEOUT (login_finish: its wait, at most MCP_WAIT, plus MCP_TIMEOUT), and
# each exchange gets TOKENROUTE_TIMEOUT, at most MCP_TIMEOUT.
MCP_TIMEOUT = 20.0
MCP_WAIT = 20.0
MCP_INSTRUCTIONS = (
    "Your tokenroute LLM gateway account: balance, spend, API keys, models and top-up links. "
    "When a tool answers auth_required or session_expired, call login_start, show the user its URL and "
    "code, then call login_finish with that user_code. topup never pays: hand its checkout URL to the user. "
    "env and keys_create return a secret API key."
)


def cmd_mcp(args: argparse.Namespace, ctx: Context) -> int:
    """Serve MCP on stdin/stdout until stdin closes; only protocol messages go to stdout."""
    tools = offered_tools(read_only=args.read_only, names=args.tools)
    if ctx.stdin_tty:
        note(ctx, "tokenroute mcp speaks MCP on stdin and stdout: add it to your MCP host (see the README).")
    if ctx.stdin is None:  # started without stdin (<&-): end of input at once
        return EXIT_OK
    McpServer(ctx, args.api_url, tools).serve(ctx.stdin)
    return EXIT_OK


def offered_tools(*, read_only: bool, names: str | None) -> dict[str, McpTool]:
    """Every tool; only those that change nothing and return no secret (`--read-only`); or
    only those named (`--tools`)."""
    tools = mcp_tools()
    if names is not None:
        wanted = [name.strip() for name in names.split(",")]
        unknown = next((name for name in wanted if name not in tools), None)
        if unknown is not None:
            raise CliError(f"--tools: there is no tool {sanitize(unknown)!r}; the tools are {', '.join(tools)}",
                           code="usage")
        tools = {name: tool for name, tool in tools.items() if name in wanted}
    if read_only:
        unsafe = [name for name, tool in tools.items() if not tool.safe]
        if names is not None and unsafe:
            raise CliError(f"--read-only: {unsafe[0]} changes something or returns a secret; leave it out of --tools",
                           code="usage")
        tools = {name: tool for name, tool in tools.items() if tool.safe}
    return tools


class McpError(Exception):
    """A JSON-RPC error answer: a message the server cannot act on (not a tool's failure)."""

    def __init__(self, code: int, message: str, data: object = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data


class McpCancelled(Exception):
    """The client cancelled the running tool call: it stops at its next wait, unanswered."""


class McpTool:
    """An operation as an MCP tool; the options of `command` (in COMMANDS) named in `arguments`
    are its input, `schemas` what the tool's inputSchema says of them beyond the option, and
    `output` the schema of its result object."""

    def __init__(
        self,
        name: str,
        command: str,
        operation: Callable[..., Any],
        arguments: Sequence[str] = (),
        *,
        title: str,
        description: str,
        output: dict[str, Any],
        schemas: dict[str, dict[str, Any]] | None = None,
        read_only: bool = False,
        destructive: bool = False,
        idempotent: bool = False,
        local: bool = False,
        secret: bool = False,
        wait: str | None = None,
        checks_url: bool = False,
    ) -> None:
        self.name = name
        self.command = next(c for c in COMMANDS if c.name == command)
        self.operation = operation
        self.arguments = tuple(arguments)
        self.title = title
        self.description = description
        self.output = output
        self.schemas = schemas or {}
        self.safe = read_only and not secret  # offered by `mcp --read-only`
        self.annotations = {"title": title, "readOnlyHint": read_only, "openWorldHint": not local}
        if not read_only:
            self.annotations.update(destructiveHint=destructive, idempotentHint=idempotent)
        self.wait = wait  # the argument that is a waiting time (at most MCP_WAIT)
        self.checks_url = checks_url  # gets the --api-url flag to check, not the URL it names

    def options(self) -> dict[str, dict[str, Any]]:
        """The settings of each argument's option; a positional one is required."""
        found = {
            dest_of(flags[0]): dict(settings, required=settings.get("required") or not flags[0].startswith("-"))
            for flags, settings in self.command.options
        }
        return {name: found[name] for name in self.arguments}

    def input_schema(self) -> dict[str, Any]:
        options = self.options()
        schema = {
            "type": "object",
            "properties": {
                name: {**argument_schema(settings), **self.schemas.get(name, {})} for name, settings in options.items()
            },
            "additionalProperties": False,
        }
        required = [name for name, settings in options.items() if settings["required"]]
        if required:
            schema["required"] = required
        return schema

    def definition(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "description": self.description,
            "inputSchema": self.input_schema(),
            "outputSchema": {"type": "object", "anyOf": [self.output, MCP_ERROR_SCHEMA]},
            "annotations": self.annotations,
        }

    def values(self, arguments: dict[str, Any]) -> dict[str, Any]:
        """The operation's keyword arguments. An argument the inputSchema refuses is a `usage`
        error result (SEP-1303), so that the model can correct itself."""
        import re

        options, schema = self.options(), self.input_schema()
        unknown = sorted(set(arguments) - set(options))
        if unknown:
            raise CliError(f"unknown argument {sanitize(unknown[0])!r} (see the tool's inputSchema)", code="usage")
        values = {}
        for name, settings in options.items():
            if name not in arguments:
                if settings["required"]:
                    raise CliError(f"{name} is required", code="usage")
                continue
            value, rule = arguments[name], schema["properties"][name]
            problem = value_problem(value, rule)
            if problem is not None:
                raise CliError(f"{name} {problem}", code="usage")
            if rule["type"] == "integer" and isinstance(value, float):
                value = int(value)  # 7.0: JSON Schema counts it as an integer
            try:
                values[name] = settings["type"](str(value)) if "type" in settings else value
            except BadValue as error:
                raise CliError(f"{name}: {error}", code="usage") from None
            if "pattern" in rule and not re.search(rule["pattern"], value):
                raise CliError(f"{name} does not match the pattern {rule['pattern']} (see the tool's inputSchema)",
                               code="usage")
        return values

    def run(self, ctx: Context, api_url: str | None, values: dict[str, Any]) -> Any:
        if not self.checks_url:
            api_url, _ = api_url_setting(ctx, api_url)
        return self.operation(ctx, api_url, **values)


def value_problem(value: object, rule: dict[str, Any]) -> str | None:
    """What keeps `value` from fitting an argument's schema (but its pattern), None when nothing does."""
    if not is_json_type(value, [rule["type"]]):
        return f"must be {rule['type']}"
    if isinstance(value, str) and not is_utf8(value):
        return "is not valid UTF-8 text"
    if "enum" in rule and value not in rule["enum"]:
        return f"must be one of {', '.join(map(str, rule['enum']))}"
    if "minimum" in rule and value < rule["minimum"]:
        return f"must be at least {rule['minimum']:g}"
    if "maximum" in rule and value > rule["maximum"]:
        return f"must be at most {rule['maximum']:g}"
    return None


def mcp_tools() -> dict[str, McpTool]:
    key = {"id": "the key id", "name": "the key's name", "key_prefix": "the first characters of the key",
           "status": "active or revoked", "balance_usd": "the key's credit in USD, a decimal string",
           "created_at": "when it was created (ISO 8601)"}
    model = {"id": "the model id to send", "owned_by": "the provider", "complexity_tier": "low or high",
             "input_usd_per_1k": "USD per 1,000 input tokens, a decimal string",
             "output_usd_per_1k": "USD per 1,000 output tokens, a decimal string"}
    secret_key = {"type": "string", "description": "a secret sk-tr-* API key"}
    text = {"type": "string"}
    tools = (
        McpTool(
            "whoami", "whoami", whoami, title="Who am I", read_only=True,
            description="The signed-in tokenroute account: id, name, email, status and balance (USD, a decimal string).",
            output=result_schema({
                "id": "the account id", "display_name": "the account's name", "email": "the account's email",
                "logto_sub": "the identity provider's id of the account", "status": "the account status, like active",
                "balance_usd": "the credit across the active API keys in USD, a decimal string",
            }),
        ),
        McpTool(
            "balance", "balance", balance, title="Balance", read_only=True,
            description="The account's credit across its active API keys, in USD as a decimal string.",
            output=result_schema({"balance_usd": "the credit in USD, a decimal string like \"5.00\"",
                                  "currency": "always USD"}),
        ),
        McpTool(
            "usage", "usage", usage, ["days"], title="Usage", read_only=True,
            description="Requests, tokens and cost over the last days (1-365); only successful requests count.",
            output=result_schema({
                "range_days": "the days counted", "total_requests": "successful requests",
                "total_tokens_in": "input tokens", "total_tokens_out": "output tokens",
                "total_cost_usd": "the cost in USD, a decimal string",
            }),
        ),
        McpTool(
            "models", "models", list_models, ["key"], title="Models and prices", read_only=True,
            description="The models the gateway serves, with their prices in USD per 1,000 tokens.",
            output=list_schema(model),
        ),
        McpTool(
            "keys_list", "keys list", list_keys, title="List API keys", read_only=True,
            description="The account's API keys (id, name, prefix, status, credit); raw key values are never listed.",
            output=list_schema(key),
        ),
        McpTool(
            "keys_create", "keys create", create_key, ["name", "no_cache"], title="Create an API key", secret=True,
            description="Creates a new sk-tr-* API key and returns it: a secret, in the result only this once. "
            "Unless no_cache, it is also cached on this machine for env, test and models.",
            output=result_schema({**key, "raw": {**secret_key, "description": "the new secret API key, shown only once"}},
                                 "raw"),
        ),
        McpTool(
            "keys_revoke", "keys revoke", revoke_key, ["id"], title="Revoke an API key", destructive=True,
            idempotent=True, schemas={"id": {"description": "the key id (from keys_list)"}},
            description="Revokes an API key by its id: every later call with that key fails.",
            output=result_schema(key),
        ),
        McpTool(
            "topup", "topup", topup, ["amount"], title="Top-up link",
            schemas={"amount": {"description": f"USD as a decimal string above 0 with at most 2 decimals, at most "
                                               f"{MAX_TOPUP}, like \"5\" or \"12.50\""}},
            description="Creates a Stripe Checkout link to add credit, and never pays: give its checkout_url to the "
            "user, who pays in a browser.",
            output=result_schema({
                "checkout_url": {"type": "string", "description": "the https URL the user opens to pay"},
                "session_id": "the Stripe Checkout session id", "amount_usd": "the amount asked, in USD",
                "expires_at": "when the link expires (Unix time)",
            }, "checkout_url"),
        ),
        McpTool(
            "env", "env", env_values, ["key"], title="OpenAI SDK settings", read_only=True, local=True, secret=True,
            description="Returns a secret: OPENAI_API_KEY (an API key) and OPENAI_BASE_URL, the two settings an "
            "OpenAI SDK needs to use the gateway.",
            output=result_schema({"OPENAI_API_KEY": secret_key, "OPENAI_BASE_URL": text},
                                 "OPENAI_API_KEY", "OPENAI_BASE_URL"),
        ),
        McpTool(
            "test", "test", try_chat, ["model", "key"], title="Test the gateway",
            description="Sends one tiny chat completion through the gateway to show that it and the API key work; "
            "spends a fraction of a cent of credit.",
            output=result_schema({"ok": {"type": "boolean"}, "model": text, "reply": text,
                                  "usage": "the token counts the gateway reported"}, "ok", "model", "reply"),
        ),
        McpTool(
            "doctor", "doctor", doctor, ["key"], title="Check the setup", read_only=True, checks_url=True,
            description="Checks Python, the gateway URL, the gateway, the login, the API key and the files' "
            "permissions; each problem comes with the command that fixes it.",
            output=result_schema({
                "ok": {"type": "boolean", "description": "false when a check found a problem"},
                "checks": {"type": "array", "items": {"type": "object", "properties": {
                    "name": text, "status": {"type": "string", "enum": ["ok", "warning", "problem"]},
                    "detail": text, "fix": {"description": "the command that fixes it, or null"},
                }}},
            }, "ok", "checks"),
        ),
        McpTool(
            "login_start", "login", login_start, ["force"], title="Start a login",
            description="Starts a login for the user to approve in a browser: returns a URL and a user_code to show "
            "them (or status logged_in when a login already works). Then call login_finish with that user_code.",
            output=result_schema({
                "status": {"type": "string", "enum": ["pending", "logged_in"]}, "api_url": text,
                "verification_uri": text, "verification_uri_complete": text, "user_code": text,
                "expires_at": {"type": "integer", "description": "when the code expires (Unix time)"}, "next": text,
            }, "status"),
        ),
        McpTool(
            "login_finish", "login", login_finish, ["timeout", "user_code"], title="Finish a login", wait="timeout",
            schemas={
                "timeout": {"maximum": MCP_WAIT, "default": MCP_WAIT,
                            "description": f"seconds to wait for the approval (at most {MCP_WAIT:g})"},
                "user_code": {"description": "the user_code login_start returned (default: the login this server "
                                             "started last)"},
            },
            description="Waits for the user to approve the login that login_start began, then saves it. If the "
            "error code is login_pending, call it again.",
            output=result_schema({"status": {"type": "string", "enum": ["logged_in"]}, "api_url": text},
                                 "status", "api_url"),
        ),
    )
    return {tool.name: tool for tool in tools}


def result_schema(fields: dict[str, Any], *required: str) -> dict[str, Any]:
    """The schema of a tool's result object. A field given as text is one the gateway defines:
    described, not typed, since its value is passed on as the gateway sent it."""
    properties = {name: field if isinstance(field, dict) else {"description": field} for name, field in fields.items()}
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    return schema


def list_schema(fields: dict[str, Any]) -> dict[str, Any]:
    """A list result: an object whatever the protocol version, the list under `items`."""
    return result_schema({"items": {"type": "array", "items": result_schema(fields)}}, "items")


MCP_ERROR_SCHEMA = result_schema({
    "error": result_schema({
        "code": {"type": "string", "description": "a stable machine code, like auth_required"},
        "message": {"type": "string"},
        "status": {"description": "the HTTP status behind the error, or null"},
        "next": {"type": "string", "description": "the tokenroute command that fixes it"},
    }, "code", "message"),
}, "error")


def argument_schema(settings: dict[str, Any]) -> dict[str, Any]:
    """The JSON Schema of one option's value: one type, the limits its type function applies."""
    if settings.get("action") == "store_true":
        schema: dict[str, Any] = {"type": "boolean", "default": False}
    else:
        schema = dict(
            {
                parse_amount: {"type": "string", "pattern": amount_pattern()},
                parse_days: {"type": "integer", "minimum": 1, "maximum": 365},
                non_empty: {"type": "string", "pattern": "\\S"},
                positive_seconds: {"type": "number", "minimum": 0, "maximum": 86400},
                login_code: {"type": "string", "pattern": USER_CODE_PATTERN},
            }.get(settings.get("type"), {"type": "string"})
        )
        if "choices" in settings:
            schema["enum"] = list(settings["choices"])
        if settings.get("default") is not None:
            schema["default"] = settings["default"]
    schema["description"] = settings.get("help", "")
    return schema


def amount_pattern() -> str:
    """parse_amount's rule as a pattern: above 0, at most 2 decimals, at most MAX_TOPUP (all nines)."""
    digits = len(MAX_TOPUP.partition(".")[0])
    return f"^(?:[1-9][0-9]{{0,{digits - 1}}}(?:\\.[0-9]{{1,2}})?|0\\.(?:[1-9][0-9]?|0[1-9]))$"


def is_json_type(value: object, types: Sequence[str]) -> bool:
    if isinstance(value, bool):
        return "boolean" in types
    if isinstance(value, float) and value % 1 == 0 and "integer" in types:  # 7.0 (never inf: inf % 1 is NaN)
        return True
    kinds = {"string": str, "integer": int, "number": (int, float), "boolean": bool}
    return any(isinstance(value, kinds[name]) for name in types)


class McpCall:
    """A tools/call request: queued for the main thread, then running there."""

    def __init__(self, request_id: str | int, tool: McpTool, arguments: dict[str, Any], version: str,
                 progress_token: str | int | None) -> None:
        import _thread

        self.id = request_id
        self.tool = tool
        self.arguments = arguments
        self.version = version
        self.progress_token = progress_token  # the client's, to send progress of a long wait with
        self.cancelled = False
        self.woken = _thread.allocate_lock()  # released by cancel(): ends a wait at once
        self.woken.acquire()
        self.ctx: Context | None = None  # the call's own, once it runs
        self.started = 0.0
        self.waiting = 0.0  # the wait's length, for progress
        self.progress = -1.0  # the last progress sent; each must be greater

    def cancel(self) -> None:
        """The client stopped waiting: end the call at its next wait or exchange. An exchange
        already in flight runs to its end (a write the gateway received is not undone)."""
        if self.cancelled:
            return
        self.cancelled = True
        if self.ctx is not None:
            self.ctx.deadline = float("-inf")  # no exchange starts, no lock is waited for
        self.woken.release()

    def wait(self, seconds: float) -> None:
        """Sleep on the real clock, unless cancelled first."""
        if self.woken.acquire(timeout=seconds):
            self.woken.release()


class McpServer:
    """Answers MCP messages, one line in, at most one line out each; a failing tool never ends it."""

    def __init__(self, ctx: Context, api_url: str | None, tools: dict[str, McpTool]) -> None:
        import _thread

        self.ctx = ctx
        self.api_url = api_url  # the --api-url flag, resolved per call like any command's
        self.tools = tools
        self.handshake_version: str | None = None
        self.login_code: str | None = None  # the user_code of the login this server started last
        self.lock = _thread.allocate_lock()  # held to write a line, and to touch the two below
        self.queue: list[McpCall | None] = []  # the calls read and not taken yet; None: the input ended
        self.unanswered: dict[str | int, McpCall] = {}
        self.arrived = _thread.allocate_lock()  # released by the reader when it queues something
        self.arrived.acquire()
        self.output_error: Exception | None = None  # stdout failed: its reader left

    def serve(self, stdin: BinaryIO) -> None:
        """Read on a helper thread and run the calls here, until the input ends and every call
        read before its end is answered (`printf '...' | tokenroute mcp` gets every answer)."""
        import _thread

        _thread.start_new_thread(self.read, (stdin,))
        while self.output_error is None:
            self.arrived.acquire()
            with self.lock:
                calls, self.queue = self.queue, []
            for call in calls:
                if call is None or self.output_error is not None:
                    break
                self.run(call)
            if None in calls:
                break
        if self.output_error is not None:
            raise self.output_error

    def read(self, stdin: BinaryIO) -> None:
        try:
            for line in input_lines(stdin):
                self.receive(line)
                if self.output_error is not None:
                    break
        except (OSError, ValueError):  # stdin failed: as good as closed
            pass
        finally:
            self.enqueue(None)

    def receive(self, line: bytes) -> None:
        reply = self.handle(line)
        if isinstance(reply, McpCall):
            with self.lock:
                if reply.id in self.unanswered:
                    self.write(rpc_answer(reply.id, error=McpError(-32600, "Invalid Request: that id is in use")))
                    return
                self.unanswered[reply.id] = reply
            self.enqueue(reply)
        elif reply is not None:
            with self.lock:
                self.write(reply)

    def enqueue(self, call: McpCall | None) -> None:
        with self.lock:
            self.queue.append(call)
            if self.arrived.locked():  # only this thread releases it, so it stays locked until then
                self.arrived.release()

    def write(self, line: str) -> None:
        """One message, one line; the caller holds the lock."""
        if self.output_error is not None:
            return
        try:
            self.ctx.stdout.write(line + "\n")
            self.ctx.stdout.flush()
        except (OSError, ValueError) as error:  # the client left: nothing more can reach it
            self.output_error = error

    def handle(self, line: bytes) -> str | McpCall | None:
        """The answer to one line, a tool call to run, or None (nothing to send)."""
        import json

        if not line.strip():
            return None
        try:
            message = json.loads(line.decode("utf-8"), parse_constant=reject_constant)
        except (UnicodeDecodeError, ValueError, RecursionError):
            return rpc_answer(None, error=McpError(-32700, "Parse error: not a JSON message in UTF-8"))
        request_id = message.get("id") if isinstance(message, dict) else None
        valid_id = isinstance(request_id, (str, int)) and not isinstance(request_id, bool)
        if isinstance(message, dict) and "method" not in message and ("result" in message or "error" in message):
            return None  # a response: this server sends no requests
        if isinstance(message, list):
            return rpc_answer(None, error=McpError(-32600, "Invalid Request: JSON-RPC batches are not supported"))
        if (
            not isinstance(message, dict)
            or message.get("jsonrpc") != "2.0"
            or not isinstance(message.get("method"), str)
            or ("id" in message and not valid_id)
            or not isinstance(message.get("params", {}), (dict, list))
        ):
            return rpc_answer(request_id if valid_id else None, error=McpError(-32600, "Invalid Request"))
        params = message.get("params", {})
        if "id" not in message:
            if message["method"] == "notifications/cancelled" and isinstance(params, dict):
                self.cancel(params.get("requestId"))
            return None  # other notifications (initialized, ...) need nothing from this server
        try:
            answer = self.answer(request_id, message["method"], params)
        except McpError as error:
            return rpc_answer(request_id, error=error)
        except Exception:  # a bug answering one request must not end the server
            import traceback

            traceback.print_exc(file=self.ctx.stderr)
            return rpc_answer(request_id, error=McpError(-32603, "Internal error"))
        return answer if isinstance(answer, McpCall) else rpc_answer(request_id, result=answer)

    def cancel(self, request_id: object) -> None:
        """notifications/cancelled: nothing is sent for that request any more."""
        with self.lock:
            call = self.unanswered.get(request_id) if isinstance(request_id, (str, int)) else None
        if call is not None:
            call.cancel()

    def answer(self, request_id: str | int, method: str, params: dict[str, Any] | list[Any]) -> dict[str, Any] | McpCall:
        if not isinstance(params, dict):
            raise McpError(-32602, "Invalid params: an object is required")
        meta = params.get("_meta")
        version = meta.get(MCP_VERSION_KEY) if isinstance(meta, dict) else None
        if method == "initialize":
            requested = params.get("protocolVersion")
            if not isinstance(requested, str):
                raise McpError(-32602, "Invalid params: initialize needs a protocolVersion")
            self.handshake_version = handshake_version(requested)
            return {
                "protocolVersion": self.handshake_version,
                "capabilities": {"tools": {"listChanged": False}},
                "serverInfo": mcp_server_info(),
                "instructions": MCP_INSTRUCTIONS,
            }
        modern = version in MCP_MODERN_VERSIONS
        if version is not None and not modern and version not in MCP_HANDSHAKE_VERSIONS:
            supported = [*MCP_MODERN_VERSIONS, *MCP_HANDSHAKE_VERSIONS]
            raise McpError(-32022, "Unsupported protocol version", {"supported": supported, "requested": version})
        if modern and not isinstance(meta.get(MCP_CAPABILITIES_KEY), dict):
            raise McpError(-32602, f"Invalid params: _meta lacks {MCP_CAPABILITIES_KEY}")
        version = version or self.handshake_version or MCP_HANDSHAKE_VERSIONS[0]
        if method == "tools/call":
            return self.tool_call(request_id, params, version)
        result = self.dispatch(method, version)
        return completed(result) if modern or method == "server/discover" else result

    def dispatch(self, method: str, version: str) -> dict[str, Any]:
        cacheable = {"ttlMs": 3_600_000, "cacheScope": "public"} if version in MCP_MODERN_VERSIONS else {}
        if method == "ping":
            return {}
        if method == "server/discover":
            return {
                "supportedVersions": [*MCP_MODERN_VERSIONS, *MCP_HANDSHAKE_VERSIONS],
                "capabilities": {"tools": {}},
                "instructions": MCP_INSTRUCTIONS,
                "ttlMs": 3_600_000,
                "cacheScope": "public",
            }
        if method == "tools/list":
            return {"tools": [tool.definition() for tool in self.tools.values()], **cacheable}
        raise McpError(-32601, f"Method not found: {method}")

    def tool_call(self, request_id: str | int, params: dict[str, Any], version: str) -> McpCall:
        name, arguments = params.get("name"), params.get("arguments")
        if not isinstance(name, str) or name not in self.tools:
            known = isinstance(name, str) and name in mcp_tools()
            offered = " (not offered: see `tokenroute mcp --read-only` and `--tools`)" if known else ""
            raise McpError(-32602, f"Unknown tool: {name}{offered}")
        if not isinstance(arguments, (dict, type(None))):
            raise McpError(-32602, f"Invalid arguments for tool {name}: an object is required")
        meta = params.get("_meta")
        token = meta.get("progressToken") if isinstance(meta, dict) else None
        token = token if isinstance(token, (str, int)) and not isinstance(token, bool) else None
        return McpCall(request_id, self.tools[name], arguments or {}, version, token)

    def run(self, call: McpCall) -> None:
        """Run a tool call on this (the main) thread and answer it, unless it was cancelled."""
        reply = None
        if not call.cancelled:
            try:
                result = self.call(call)
                reply = rpc_answer(call.id, result=completed(result) if call.version in MCP_MODERN_VERSIONS else result)
            except McpCancelled:
                pass
            except Exception:  # a bug answering one request must not end the server
                import traceback

                traceback.print_exc(file=self.ctx.stderr)
                reply = rpc_answer(call.id, error=McpError(-32603, "Internal error"))
        with self.lock:
            del self.unanswered[call.id]
            if reply is not None and not call.cancelled:
                self.write(reply)

    def call(self, call: McpCall) -> dict[str, Any]:
        """A tool's result: the operation's data as an object, or its error object with isError.

        No exchange of the call starts after its deadline, and a read ends by it; no
        wait outlasts it (see MCP_TIMEOUT), and a cancellation ends it.
        """
        import io
        import json

        tool = call.tool
        # A call's diagnostics (notes, warnings) go to the server's stderr, never into a result on stdout.
        ctx = Context(env=self.ctx.env, stdout=io.StringIO(), stderr=self.ctx.stderr,
                      sleep=lambda seconds: self.pause(call, seconds), now=self.ctx.now)
        ctx.tls = self.ctx.tls  # one TLS context per process
        try:
            values = tool.values(call.arguments)
            seconds = min(timeout_setting(ctx), MCP_TIMEOUT)
            ctx.env = {**ctx.env, "TOKENROUTE_TIMEOUT": str(seconds)}
            if tool.wait is not None:
                call.waiting = values.setdefault(tool.wait, MCP_WAIT)
                seconds += call.waiting
            if tool.name == "login_finish" and values.get("user_code") is None:
                values["user_code"] = self.login_code  # the caller's own login, not another host's
            call.started = ctx.now()
            ctx.deadline = call.started + seconds
            call.ctx = ctx
            if call.cancelled:  # before cancel() could see ctx
                raise McpCancelled
            data = tool.run(ctx, self.api_url, values)
            structured = data if isinstance(data, dict) else {"items": data}
            try:
                text = json_text(structured)
            except (ValueError, RecursionError):  # NaN or absurd nesting from the server
                raise server_error("the gateway's answer cannot be shown as JSON") from None
        except CliError as error:
            body = {"error": error_body(error)}
            return {"content": [{"type": "text", "text": json.dumps(body)}], "structuredContent": body, "isError": True}
        finally:
            self.ctx.tls = ctx.tls
        if tool.name == "login_start" and data["status"] == "pending":
            self.login_code = data["user_code"]
        content = [{"type": "text", "text": text}]
        guide = mcp_result_guide(ctx, tool.name, data, values)
        if guide:
            content.append({"type": "text", "text": guide})
        return {"content": content, "structuredContent": structured, "isError": False}

    def pause(self, call: McpCall, seconds: float) -> None:
        """A tool call's sleep: progress during a long wait, and a cancellation ends it."""
        if seconds > 0 and call.tool.wait is not None and call.progress_token is not None and not call.cancelled:
            self.report_progress(call)
        if self.ctx.sleep is time.sleep:  # the real clock: a cancellation wakes it
            call.wait(seconds)
        else:  # a test's clock
            self.ctx.sleep(seconds)
        if call.cancelled:
            raise McpCancelled

    def report_progress(self, call: McpCall) -> None:
        elapsed = round(self.ctx.now() - call.started, 1)
        if elapsed <= call.progress:
            return
        call.progress = elapsed
        import json

        params = {"progressToken": call.progress_token, "progress": elapsed, "total": call.waiting,
                  "message": "waiting for the user to approve the login"}
        with self.lock:
            self.write(json.dumps({"jsonrpc": "2.0", "method": "notifications/progress", "params": params}))


def input_lines(stdin: BinaryIO) -> Iterator[bytes]:
    """The lines of stdin, read from its file descriptor where it has one: a thread waiting in
    the buffered reader's readline() holds its lock, and Python aborts at exit when another
    thread ends the process meanwhile (stdout failed, Ctrl-C)."""
    try:
        fd = stdin.fileno()
    except (AttributeError, OSError, ValueError):  # not a file: a test's bytes
        yield from iter(stdin.readline, b"")
        return
    rest = b""
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        *lines, rest = (rest + chunk).split(b"\n")
        for line in lines:
            yield line + b"\n"
    if rest:
        yield rest


def handshake_version(requested: str) -> str:
    """The newest version this server speaks that is not newer than the client's (an older
    client refuses a newer one); the newest of all when the client's is older than every one."""
    return next((version for version in MCP_HANDSHAKE_VERSIONS if version <= requested), MCP_HANDSHAKE_VERSIONS[0])


def completed(result: dict[str, Any]) -> dict[str, Any]:
    """A result as 2026-07-28 sends it."""
    return dict(result, resultType="complete", _meta={"io.modelcontextprotocol/serverInfo": mcp_server_info()})


def mcp_result_guide(ctx: Context, tool: str, data: Any, values: dict[str, Any]) -> str | None:
    """What the agent should do with a result, next to its JSON. Built only from values of a
    known shape (the amount asked, a device-flow code), never from free text of the server."""
    if tool == "topup":
        return (
            f"Give the user the checkout_url of this result: they pay {values['amount']} USD in a browser; "
            "nothing is paid until they do."
        )
    if tool == "login_start" and data["status"] == "pending":
        code = data["user_code"]
        return (
            f"Ask the user to open the verification_uri_complete of this result and approve the code {code} "
            f"(or enter it at the verification_uri), then call login_finish with user_code {code}."
        )
    if tool == "keys_create":
        cached = "not cached (no_cache)" if values.get("no_cache") else f"cached in {last_key_path(ctx)}"
        return f"The raw key is shown only this once; {cached}."
    return None


def mcp_server_info() -> dict[str, str]:
    return {"name": "tokenroute", "version": __version__}


def reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def rpc_answer(request_id: object, *, result: object = None, error: McpError | None = None) -> str:
    import json

    message: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id}
    if error is None:
        message["result"] = result
    else:
        message["error"] = {"code": error.code, "message": error.message}
        if error.data is not None:
            message["error"]["data"] = error.data
    return json.dumps(message, allow_nan=False)



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


def login_code(text: str) -> str:
    if not is_user_code(text.strip()):
        raise BadValue(f"{text!r} is not a login code (letters and digits, like BCDF-GHJK)")
    return text.strip()


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
        option("--user-code", type=login_code, metavar="CODE",
               help="with --resume: the login whose code this is (default: the newest)"),
    ),
    Command(
        "logout", cmd_logout, "forget this gateway's login", "tokenroute logout --all",
        option("--all", action="store_true", help="forget the logins of every gateway"),
        option("--forget-key", action="store_true", help="forget the cached API key too"),
    ),
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
        "env", cmd_env, "print OPENAI_API_KEY and OPENAI_BASE_URL", "tokenroute env --write",
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
        "mcp", cmd_mcp, "serve your account as MCP tools on stdin/stdout", "tokenroute mcp --read-only",
        option("--read-only", action="store_true", help="offer only the tools that change nothing and return no secret"),
        option("--tools", metavar="NAME,...", help="offer only these tools (comma-separated)"),
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
    if not command[0]:
        raise CliError("run's command is an empty word; name a program, like: tokenroute run -- python app.py",
                       code="usage", usage=RUN_USAGE)
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


def error_body(error: CliError) -> dict[str, Any]:
    """The object of a `--json` error, and of an MCP tool's error result."""
    body: dict[str, Any] = {"code": error.code, "message": sanitize(redact(error.message)), "status": error.status}
    if error.next:
        body["next"] = error.next
    body.update(error.payload or {})
    return body


def report(ctx: Context, error: CliError, *, as_json: bool) -> None:
    message = sanitize(redact(error.message))
    if as_json:
        import json

        text = json.dumps({"error": error_body(error)})
    else:
        hint = f"; run `{error.next}`" if error.next else ""
        text = f"{paint(ctx, 'error', 'error', tty=ctx.stderr_tty)}: {message}{hint}"
        text += f"\n{error.usage}" if error.usage else ""
    note(ctx, text)


def main(argv: Sequence[str] | None = None, ctx: Context | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ctx = ctx or Context.from_process()
    as_json = "--json" in own_words(argv) or env_flag(ctx.env.get("TOKENROUTE_JSON"))
    try:
        check_text(argv, ctx.env)
        args = parse_args(argv, ctx)
        args.json = args.json or as_json
        code = args.func(args, ctx)
        ctx.stdout.flush()  # here, so a failing stdout is reported, not left to Python's exit
        return code
    except SystemExit as done:  # argparse after --help or --version
        return done.code if isinstance(done.code, int) else EXIT_OK
    except CliError as error:
        if error.code == "output_failed":
            release_stdout(ctx)
        report(ctx, error, as_json=as_json)
        return error.exit_code
    except KeyboardInterrupt:
        report(ctx, CliError("interrupted", code="interrupted", exit_code=EXIT_INTERRUPTED), as_json=as_json)
        return EXIT_INTERRUPTED
    except (OSError, ValueError) as exc:  # only output reaches here (files raise CliError): stdout failed
        release_stdout(ctx)
        if reader_left(exc, windows=os.name == "nt"):  # `tokenroute keys list | head -1`: end quietly
            return EXIT_OK
        report(ctx, CliError(f"cannot write the output: {describe(exc)}", code="output_failed"), as_json=as_json)
        return EXIT_USER


def reader_left(exc: BaseException, *, windows: bool) -> bool:
    """Whether a failed write to stdout means its reader left (`| head -1`): Windows
    says so with EINVAL, not BrokenPipeError (cpython#79935)."""
    import errno

    return isinstance(exc, BrokenPipeError) or (windows and isinstance(exc, OSError) and exc.errno == errno.EINVAL)


def release_stdout(ctx: Context) -> None:
    """Point a failed stdout at the null device, so Python's flush at exit cannot fail again."""
    if ctx.stdout is not sys.stdout:
        return
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass  # no file descriptor: nothing is flushed to it at exit


def check_text(argv: Sequence[str], env: Mapping[str, str]) -> None:
    """Arguments and settings must be text: invalid UTF-8 arrives as lone
    surrogates that no server, file or terminal should receive. (A `run`
    child's words are left alone: they are another program's.)"""
    for word in own_words(argv):
        if not is_utf8(word):
            raise CliError(f"the argument {word.encode('utf-8', 'replace').decode()!r} is not valid UTF-8 text")
    for name in TEXT_SETTINGS:
        if not is_utf8(env.get(name, "")):
            raise CliError(f"{name} is not valid UTF-8 text", code="config")


def is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


TEXT_SETTINGS = ("TOKENROUTE_API_URL", "TOKENROUTE_API_KEY", "TOKENROUTE_TIMEOUT", "TOKENROUTE_JSON")


if __name__ == "__main__":
    raise SystemExit(main())
