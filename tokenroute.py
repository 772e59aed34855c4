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
    from typing import Any, BinaryIO, TextIO, TypeVar

    AnswerT = TypeVar("AnswerT", "Response", "StreamedAnswer")

__version__ = "1.1.0"

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
        wait: Callable[[Any, float], None] | None = None,
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
        self.wait = wait or wait_for_release  # a sleep that a lock's release ends early (an MCP cancellation)
        self.open_browser = open_browser or open_in_system_browser
        self.tls: TrustStore | None = None  # made by the first https request, shared by the rest
        self.deadline: float | None = None  # an MCP tool call's end (ctx.now() time): no exchange or wait outlasts it
        self.earlier_checked: set[str] = set()  # gateways whose earlier releases' logins this command looked at
        self.exchange_cap: float | None = None  # an MCP tool call's: at most this per exchange, whatever the setting
        self.api_url_flag: str | None = None  # the gateway, when --api-url chose it: hints must name it too

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


def wait_for_release(lock: Any, seconds: float) -> None:
    """Sleep up to `seconds`, less when `lock` (held by another thread) is released meanwhile."""
    if lock.acquire(timeout=seconds):
        lock.release()  # released it stays: every later wait ends at once too


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


def keys_path(ctx: Context) -> str:
    return os.path.join(config_dir(ctx), "keys.txt")


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
    """The gateway base URL in canonical form and where it came from (flag, env, default).

    An empty --api-url is an error (`--api-url "$STAGING"` with the variable
    unset must not mean production); an empty TOKENROUTE_API_URL is unset, as
    every other TOKENROUTE_* variable and `${VAR:-default}` treat it.
    """
    env_url = ctx.env.get("TOKENROUTE_API_URL")
    if flag is not None:
        if not flag.strip():
            raise CliError(f"--api-url is empty: give the gateway's URL, or leave the flag out for {DEFAULT_API_URL}")
        url, source = flag, "--api-url"
    elif env_url and env_url.strip():
        url, source = env_url, "TOKENROUTE_API_URL"
    else:
        url, source = DEFAULT_API_URL, "default" if env_url is None else "default; TOKENROUTE_API_URL is set but empty"
    if "@" in url:  # never echoed: the part before @ may be a password
        raise CliError(f"{source} must not hold a user name or password; remove the part up to @")
    canonical = canonical_url(url)
    if canonical is None:
        guess = with_scheme(url)
        meant = f"; did you mean {guess}?" if guess else ""
        raise CliError(f"{source} is not a valid http(s) gateway URL: {sanitize(url.strip())!r}{meant}")
    scheme, host = canonical.partition(":")[0], url_host(canonical)
    if scheme == "http" and not is_loopback(host):
        raise CliError(
            f"refusing to talk to {host} over plain http (credentials would travel unencrypted); use https",
            code="insecure_url",
        )
    if source == "--api-url":
        ctx.api_url_flag = canonical
    return canonical, source


def runnable(ctx: Context, hint: str) -> str:
    """A `tokenroute ...` hint that runs as written: with the --api-url that chose the gateway."""
    if ctx.api_url_flag is None or not hint.startswith("tokenroute ") or "--api-url" in hint:
        return hint
    import shlex

    return f"tokenroute --api-url {shlex.quote(ctx.api_url_flag)}{hint[len('tokenroute'):]}"


def with_scheme(url: str) -> str | None:
    """`localhost:8787` as the base URL it likely means: http for this machine, https elsewhere,
    without the /v1 of OPENAI_BASE_URL. Only text shaped `host[:port][/path]` gets a guess:
    `http:/localhost` is a mistyped scheme, not a host named http."""
    text = url.strip()
    hostport = text.partition("/")[0]
    name, colon, port = hostport.rpartition(":")
    if not colon or hostport.endswith("]"):  # no port, or an IPv6 literal without one
        name, colon, port = hostport, "", ""
    if "://" in text or (colon and not port.isdigit()) or name.lower() in ("http", "https"):
        return None
    guess = canonical_url("https://" + text)
    if guess is None:
        return None
    if guess.endswith("/v1") and guess.count("/") > 2:
        guess = guess[: -len("/v1")]
    return "http" + guess[len("https"):] if is_loopback(url_host(guess)) else guess


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


def exchange_timeout(ctx: Context) -> float:
    """The seconds one exchange may take: TOKENROUTE_TIMEOUT, at most an MCP tool call's cap."""
    timeout = timeout_setting(ctx)
    return timeout if ctx.exchange_cap is None else min(timeout, ctx.exchange_cap)


def call_timeout(ctx: Context, *, clip: bool = True) -> float:
    """exchange_timeout, or what is left of an MCP tool call's time when that is
    less (`clip`); once the call's time is up, no exchange starts."""
    timeout = exchange_timeout(ctx)
    if ctx.deadline is None:
        return timeout
    left = ctx.deadline - ctx.now()
    if left <= 0:
        raise network_error(f"timed out: the tool call took longer than {timeout:g}s")
    return min(timeout, left) if clip else timeout


def env_flag(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


# ----------------------------------------------------------- local state ---
# The files, and what each may hold:
#   credentials.json  {"version": 2, "logins": {API_URL: login}, "logged_out": [API_URL]}: a login per
#                     gateway, and the gateways logged out of whose earlier logins are never taken over
#   keys.txt          a version header, then "API_URL KEY ID" lines: the newest key created on each
#                     gateway; the record, written first
#   last_key.txt      the newest key of all, raw (scripts read it): keys.txt's mirror; a key there that
#                     keys.txt does not list (a person's, or 0.1.0's) is the default gateway's
#   pending_login.json the device code between `login --no-wait` and `--resume`
#   credentials.lock  held by every transition that writes the three first files
# and what the earlier releases left (shared/spec/legacy-clients.md): 0.1.0's
# credentials.json, which records no gateway (kept here under the gateway ""
# until taken over for the default gateway), 1.0.0's "API_URL KEY ID" lines in
# last_key.txt, and 0.2.0's ~/.paradigx files.


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


def write_private_file(ctx: Context, path: str, text: str, *, before_rename: Callable[[], None] | None = None) -> None:
    """Atomically replace `path` with `text`, owner-only from the first byte (see replace_file)."""
    ensure_config_dir(ctx)
    try:
        replace_file(path, text.encode("utf-8"), mode=0o600, before_rename=before_rename)
    except OSError as exc:
        raise file_error("cannot write", path, exc) from None


class OwnerNotKept(OSError):
    """replace_file could not give the new file the owner and group asked for."""


def replace_file(
    path: str, data: bytes, *, mode: int, owner: tuple[int, int] | None = None,
    before_rename: Callable[[], None] | None = None,
) -> None:
    """Atomically replace `path` with `data`, in `mode` from the first byte; OSError on failure.

    The temp file is created in the same folder (so the umask cannot widen
    it and a crash never leaves a half-written secret), then renamed over
    the target; a symlink planted at the target is replaced, not followed.
    `owner` (uid, gid): the new file's, set before any byte is written;
    OwnerNotKept when this process may not give it away. `before_rename` runs
    once the new bytes are on disk, before they replace the old: what it
    raises stops the replacement.
    Bytes, so that Windows writes the same line endings as everyone else.
    """
    tmp = f"{path}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(tmp, flags, 0o600 if owner else mode)  # owner-only until it is the owner's
    try:
        with os.fdopen(fd, "wb") as handle:
            if owner is not None:
                try:
                    os.fchown(handle.fileno(), *owner)  # before the fchmod: a chown clears set-id bits
                except OSError as exc:
                    raise OwnerNotKept(exc.errno, exc.strerror) from None
            if hasattr(os, "fchmod"):
                os.fchmod(handle.fileno(), mode)  # a umask may have taken bits of a shared file's mode
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    except BaseException:  # Ctrl-C too: no copy of the secrets is left beside the file
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


def read_text_file(path: str, *, newline: str | None = None) -> str | None:
    """A regular file's text (`newline` as open() takes it), None when it is absent.
    Opened without blocking: a FIFO in its place is refused, not waited on forever."""
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        with open(fd, encoding="utf-8", newline=newline) as handle:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(0, "not a regular file")
            return handle.read()
    except FileNotFoundError:
        return None
    except NotADirectoryError as exc:  # HOME or the config dir is a file
        raise file_error("cannot read", path, exc) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or "not readable text"
        raise CliError(
            f"cannot read {path}: {reason}; logging in sets it aside",
            code="credentials_unreadable",
            next="tokenroute login",
        ) from None


def peek_text_file(path: str, *, newline: str | None = None) -> str | None:
    """The file's text, None when it is absent or unreadable for any reason."""
    try:
        return read_text_file(path, newline=newline)
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
    """Rename a damaged file (or folder) out of the way, keeping it for the user (and
    every one set aside before: a second one within the same second gets a number)."""
    stamp = f"{path}.damaged-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(ctx.now()))}"
    aside = next((name for name in (stamp, *(f"{stamp}-{n}" for n in range(2, 100))) if not os.path.lexists(name)),
                 f"{stamp}-{os.getpid()}")
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


class Store:
    """credentials.json as read: the logins by gateway ("" for 0.1.0's, which names none); the
    gateways logged out of, whose earlier releases' logins are never taken over (`login` there
    clears one); and whether the file is in this release's format (version 2)."""

    def __init__(self, logins: dict[str, dict[str, Any]], logged_out: set[str], *, current: bool = True) -> None:
        self.logins = logins
        self.logged_out = logged_out
        self.current = current


def read_logins(ctx: Context) -> dict[str, dict[str, Any]]:
    """The stored logins by gateway; a damaged file is an error."""
    return read_store(ctx).logins


def read_store(ctx: Context) -> Store:
    """credentials.json; a damaged file is an error."""
    path = credentials_path(ctx)
    if not is_own_file(path):
        raise CliError(
            f"{path} belongs to another user; logging in sets it aside",
            code="credentials_unreadable",
            next="tokenroute login",
        )
    text = read_text_file(path)
    if text is None:
        return Store({}, set())
    import json

    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        data = None
    store = store_in(data)
    if store is None:
        raise CliError(
            f"{path} is damaged; logging in sets it aside and logs in again",
            code="credentials_corrupt",
            next="tokenroute login",
        )
    return store


def store_in(data: object) -> Store | None:
    """The store of a credentials.json of any release, None when it is damaged."""
    if not isinstance(data, dict):
        return None
    if data.get("version") == STORE_VERSION:
        logins, logged_out = data.get("logins"), data.get("logged_out", [])
        if not isinstance(logins, dict) or not isinstance(logged_out, list):
            return None
        valid = all(is_valid_login(login) and login["api_url"] == url for url, login in logins.items())
        return Store(logins, {url for url in logged_out if isinstance(url, str)}) if valid else None
    if not (data.keys() >= EARLIER_FIELDS or "api_url" in data):
        return None
    login = earlier_login(data, data.get("api_url") or "")  # 0.1.0's, or this release's before version 2
    return Store({login["api_url"]: login}, set(), current=False) if is_valid_login(login) else None


EARLIER_FIELDS = {"access_token", "refresh_token", "expires_at", "issuer", "client_id"}  # 0.1.0 wrote all, some null


STORE_VERSION = 2


def earlier_login(data: dict[str, Any], api_url: str) -> dict[str, Any]:
    """A login of 0.1.0 or 0.2.0 in this release's shape; its nulls mean unknown."""
    expires_at, issuer, resource = data.get("expires_at"), data.get("issuer"), data.get("resource")
    if isinstance(resource, str) and api_url and canonical_url(resource) == canonical_url(api_url):
        resource = canonical_url(api_url)  # 0.2.0 wrote an IDN gateway's URL in its Unicode form
    login = {
        "api_url": canonical_url(api_url) or "" if api_url else "",
        "access_token": data.get("access_token"),
        "refresh_token": data.get("refresh_token") or "",
        "expires_at": expires_at if isinstance(expires_at, (int, float)) else 0,
        "token_endpoint": data.get("token_endpoint") or "",
        "client_id": data.get("client_id") or "",
        "resource": resource or api_url,
    }
    return dict(login, issuer=issuer) if isinstance(issuer, str) and issuer else login


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
    issued = isinstance(creds.get("issuer", ""), str)  # logins stored before 1.1 name no issuer
    return texts and refreshable and dated and issued


def write_logins(ctx: Context, logins: dict[str, dict[str, Any]], *, logged_out: set[str]) -> None:
    """Replace the stored logins and the gateways logged out of (hold the lock); nothing left
    removes the file."""
    if logins or logged_out:
        data: dict[str, Any] = {"version": STORE_VERSION, "logins": logins}
        if logged_out:
            data["logged_out"] = sorted(logged_out)
        write_private_file(ctx, credentials_path(ctx), json_text(data))
    else:
        remove_file(credentials_path(ctx))


def require_credentials(ctx: Context, api_url: str) -> dict[str, Any]:
    """The login for this gateway, or the error that says how to get one."""
    adopt_earlier_login(ctx, api_url)
    store = read_store(ctx)
    if api_url in store.logins:
        return store.logins[api_url]
    if "" in store.logins and api_url == DEFAULT_API_URL and not earlier_login_kept(ctx, store, api_url):
        raise CliError(  # the takeover failed, and said why
            f"the login of tokenroute 0.1.0 in {credentials_path(ctx)} is not taken over yet: make "
            f"{config_dir(ctx)} writable, or set TOKENROUTE_CONFIG_DIR to a writable folder and log in",
            code="config",
        )
    others = ", ".join(sorted({url or DEFAULT_API_URL for url in store.logins} - {api_url}))
    elsewhere = f" (logged in to {others}; choose it with --api-url or TOKENROUTE_API_URL)" if others else ""
    raise CliError(f"not logged in to {api_url}{elsewhere}", code="auth_required", next="tokenroute login")


def save_login(ctx: Context, creds: dict[str, Any]) -> None:
    """Store one gateway's login next to the others' (hold the lock); a logout's record of the
    gateway goes."""
    try:
        store = read_store(ctx)
    except CliError:  # a damaged file: `login` set it aside; a refresh reaches here only after reading it
        store = Store({}, set())
    write_logins(ctx, {**store.logins, creds["api_url"]: creds}, logged_out=store.logged_out - {creds["api_url"]})


def is_header_safe(value: str) -> bool:
    return bool(value) and value.isascii() and value.isprintable() and " " not in value


def is_plausible_key(key: str) -> bool:
    return key.startswith(KEY_PREFIX) and len(key) > len(KEY_PREFIX) and set(key) <= KEY_CHARS and len(key) <= 200


class KeyCache:
    """The key files as read. keys.txt, the record, lists the newest key created on each
    gateway (1.0.0 wrote the same lines in last_key.txt). last_key.txt mirrors the newest
    of them, raw, while it is cached; one it lists that is not the newest is a mirror an
    interrupted write left, and keys.txt has the word. A key there that keys.txt does not
    list (a person pasted it, or tokenroute 0.1.0 wrote it), like 0.2.0's in ~/.paradigx,
    names no gateway: it is the default gateway's (0.1.0's default, and where a key from
    the dashboard comes from), and no other gateway is ever sent it."""

    def __init__(self, ctx: Context, listed: dict[str, tuple[str, str]], last: str, *, keys_1_0: set[str] | None,
                 unrecorded: tuple[str, str, bool] | None, earlier_file: str, unread: str | None) -> None:
        self.files = (keys_path(ctx), last_key_path(ctx))
        self.listed = listed  # by gateway: (key, key id), newest last
        self.last = last  # last_key.txt's text without spaces around it; "" when absent, unreadable or 1.0.0's
        self.of_1_0 = keys_1_0 is not None  # last_key.txt is in 1.0.0's format
        self.listed_in_last = keys_1_0 or set()  # the keys of its lines
        self.unrecorded = unrecorded  # the newest unlisted key: (key, its file, whether it is newer than keys.txt)
        self.earlier_file = earlier_file  # 0.2.0's key file, "" when it holds no key to take
        self.unread = unread  # a key file that is there but cannot be used: unreadable, or (keys.txt) unknown text

    def keys(self) -> dict[str, tuple[str, str]]:
        """The cached keys by gateway as (key, key id), newest last; the one rule for an unlisted key."""
        keys = dict(self.listed)
        if self.unrecorded is None:
            return keys
        key, _, newer = self.unrecorded
        if newer:  # pasted after keys.txt was written: it replaces the default gateway's key there
            keys.pop(DEFAULT_API_URL, None)
            keys[DEFAULT_API_URL] = (key, "-")
        elif DEFAULT_API_URL not in keys:  # 0.2.0's, older than anything keys.txt lists
            keys = {DEFAULT_API_URL: (key, "-"), **keys}
        return keys

    def source(self, key: str) -> str:
        """The file a cached key is read from."""
        if self.unrecorded is not None and key == self.unrecorded[0]:
            return self.unrecorded[1]
        return self.files[1] if key == self.last or key in self.listed_in_last else self.files[0]


def read_key_cache(ctx: Context, *, to_write: bool = False) -> KeyCache:
    """The key files; unreadable ones hold no usable key. `to_write` (under the lock): 0.2.0's
    key counts only where its file can then be removed, so that it never comes back."""
    record = peek_text_file(keys_path(ctx))
    listed = dict(key_lines(record, KEYS_HEADER))
    # Unreadable, emptied (tokenroute never writes it empty) or a later release's: its record is lost.
    unknown = os.path.lexists(keys_path(ctx)) and not (record or "").startswith(KEYS_HEADER)
    mirror = peek_text_file(last_key_path(ctx))
    text = mirror or ""
    of_1_0 = dict(key_lines(text, KEYS_HEADER_1_0)) if text.splitlines()[:1] == [KEYS_HEADER_1_0] else None
    if of_1_0 is not None:
        listed.update(of_1_0)
    last = "" if of_1_0 is not None else text.strip(" \t\r\n\ufeff")
    recorded = {key for key, _ in listed.values()}
    found = []  # (when, key, its file, whether it is newer than the key keys.txt lists for the default gateway)
    # A key keys.txt does not list was pasted after it was written, unless its record is lost:
    # then it may be any gateway's, and it is sent to none.
    if is_plausible_key(last) and last not in recorded and not unknown:
        found.append((file_time(last_key_path(ctx)), last, last_key_path(ctx), True))
    earlier_file, earlier_key = paradigx_key(ctx)
    if earlier_key and to_write and not is_writable(os.path.dirname(earlier_file)):
        earlier_file, earlier_key = "", ""
    if earlier_key and earlier_key not in recorded:  # a tie goes to 0.2.0's, the newer copy of 0.1.0's
        found.append((file_time(earlier_file) + 0.001, earlier_key, earlier_file, False))
    best = max(found) if found else None
    keys_1_0 = None if of_1_0 is None else {key for key, _ in of_1_0.values()}
    unreadable_last = mirror is None and os.path.lexists(last_key_path(ctx))
    unread = keys_path(ctx) if unknown else last_key_path(ctx) if unreadable_last else None
    return KeyCache(ctx, listed, last, keys_1_0=keys_1_0, unrecorded=best[1:] if best else None,
                    earlier_file=earlier_file, unread=unread)


def key_lines(text: str | None, header: str) -> list[tuple[str, tuple[str, str]]]:
    """The "GATEWAY KEY ID" lines after a first line that is `header` (or starts with it)."""
    lines = (text or "").splitlines()
    if not lines or not lines[0].startswith(header):
        return []
    return [(words[0], (words[1], words[2])) for words in map(str.split, lines[1:]) if len(words) == 3]


KEYS_HEADER = "# tokenroute keys, version 1: the newest API key created on each gateway (gateway key id)"
KEYS_HEADER_1_0 = "# tokenroute: the newest API key created on each gateway (gateway, key, key id)"  # in last_key.txt


def write_key_cache(ctx: Context, cache: KeyCache, keys: dict[str, tuple[str, str]], *,
                    newest: str | None = None) -> None:
    """Replace the cached keys with `keys` (hold the lock; `cache` as read under it, to write).
    last_key.txt holds `newest`, or else keeps its key while that is still cached: when
    it goes, no other gateway's key takes its place (a script pairs the file with a URL).

    keys.txt, the record, is written first, then last_key.txt, its mirror: after a crash
    in between, last_key.txt holds a key keys.txt lists, or none. So a key there that
    `keys` drops leaves just before the new keys.txt replaces the old (once it is safely
    written: a full disk changes nothing): unlisted, it would read as pasted, the default
    gateway's. Text there that is no key is set aside, never overwritten; 0.2.0's key
    file goes once its key is recorded (or replaced).
    """
    kept = [key for key, _ in keys.values()]
    if newest is None and cache.last in kept:
        newest = kept[-1]  # a mirror that an interrupted write left behind is brought up to date
    last = last_key_path(ctx)

    def drop_dropped_key() -> None:
        if not is_plausible_key(cache.last) or cache.last in kept:
            return
        if cache.unread and cache.last not in {key for key, _ in cache.listed.values()}:
            set_aside(ctx, last, "holds a key no readable keys.txt places")  # any gateway's: never deleted
        else:  # a mirror, a key forgotten, or 0.1.0's that 0.2.0's newer copy replaces (a revoked one never returns)
            remove_file(last)

    if os.path.lexists(last) and peek_text_file(last) is None:  # its key may be any gateway's: never read later
        set_aside(ctx, last, "could not be read")

    lines = [f"{url} {key} {key_id}" for url, (key, key_id) in keys.items()]
    keep_unusable(ctx, keys_path(ctx), usable=lambda text: text.startswith(KEYS_HEADER))
    if lines:
        write_private_file(ctx, keys_path(ctx), "\n".join([KEYS_HEADER, *lines]) + "\n", before_rename=drop_dropped_key)
    else:
        drop_dropped_key()
        remove_file(keys_path(ctx))
    if newest is not None and (newest != cache.last or cache.of_1_0):
        keep_unusable(ctx, last, usable=lambda text: is_plausible_key(text.strip()) or text.startswith(KEYS_HEADER_1_0))
        write_private_file(ctx, last, newest)
    elif newest is None and cache.of_1_0:
        remove_file(last)
    if cache.earlier_file:
        remove_file(cache.earlier_file)
    unrecorded = cache.unrecorded
    if unrecorded is not None and unrecorded[0] in kept:
        key = redact(unrecorded[0])
        what = (f"Took over the cached API key {key} of tokenroute 0.2.0 ({unrecorded[1]})"
                if unrecorded[1] == cache.earlier_file else f"Recorded the API key {key} in {unrecorded[1]} "
                "(it names no gateway: pasted, or tokenroute 0.1.0's)")
        note(ctx, f"{what} as {DEFAULT_API_URL}'s, in {keys_path(ctx)}.")


def keep_unusable(ctx: Context, path: str, *, usable: Callable[[str], bool]) -> None:
    """Set aside a file about to be replaced that cannot be read (left by `sudo tokenroute`),
    or that holds what tokenroute did not write there (a later release's format, a person's
    note): it may hold a key that is nowhere else."""
    if os.path.lexists(path) and not os.path.isfile(path):
        set_aside(ctx, path, "is not a file")
        return
    text = peek_text_file(path) if os.path.isfile(path) else ""
    if text is None or (text and not usable(text)):
        set_aside(ctx, path, "could not be read" if text is None else "is not in a format this release knows")


def is_writable(folder: str) -> bool:
    try:
        check_writable(folder)
    except CliError:
        return False
    return True


def cache_key(ctx: Context, api_url: str, key: str, key_id: str) -> None:
    """Make `key` this gateway's cached key and the newest (last_key.txt)."""
    with CredentialsLock(ctx):
        cache = read_key_cache(ctx, to_write=True)
        keys = cache.keys()
        keys.pop(api_url, None)
        keys[api_url] = (key, key_id if is_header_safe(key_id) else "-")
        write_key_cache(ctx, cache, keys, newest=key)


def forget_cached_key(
    ctx: Context, api_url: str, *, key_id: str | None = None, prefix: str | None = None
) -> tuple[str | None, str | None]:
    """Drop this gateway's cached key (only if it is `key_id` or starts with `prefix`, when given):
    the file it was read from, if it did; and why a key may stay (stuck_key_message)."""

    def chosen(url: str, key: str, cached_id: str) -> bool:
        return url == api_url and (
            (key_id is None and prefix is None)
            or (key_id is not None and key_id == cached_id)
            or (cached_id == "-" and prefix is not None and len(prefix) > len(KEY_PREFIX) and key.startswith(prefix))
        )

    with CredentialsLock(ctx):
        cache = read_key_cache(ctx, to_write=True)
        keys = cache.keys()
        key = keys[api_url][0] if api_url in keys and chosen(api_url, *keys[api_url]) else None
        removed = None if key is None else cache.source(key)
        if removed:
            del keys[api_url]
            write_key_cache(ctx, cache, keys)
        elif cache.unread:  # a file that cannot be read may hold it: set aside, never used
            set_aside_unread(ctx, cache, keys)
        after = read_key_cache(ctx)  # as reads find them: 0.2.0's key stays where its folder cannot be written
        left = after.keys().get(api_url)
        return removed, after.source(left[0]) if left and chosen(api_url, *left) else None


def set_aside_unread(ctx: Context, cache: KeyCache, keys: dict[str, tuple[str, str]]) -> None:
    """Set aside the key files that cannot be used (through a write of what can), so that what
    they hold is never taken; when even that fails, they stay, unused, and a warning says so."""
    try:
        write_key_cache(ctx, cache, keys)
    except CliError as error:
        warn(ctx, error.message)


def stuck_key_message(path: str) -> str:
    return (f"the API key in {path} cannot be removed ({os.path.dirname(path)} cannot be written), so env, run, "
            "test and models still use it: delete that file")


def resolve_api_key(ctx: Context, flag: str | None, api_url: str) -> tuple[str, str]:
    """The API key for /v1 calls and where it came from: --key, env, then this gateway's cached
    key (once 1.0.0's key file is converted)."""
    if flag is None and not ctx.env.get("TOKENROUTE_API_KEY"):
        adopt_earlier_keys(ctx, api_url)
    return api_key_in_use(ctx, flag, api_url)


def api_key_in_use(ctx: Context, flag: str | None, api_url: str) -> tuple[str, str]:
    """resolve_api_key without taking anything over: it only reads."""
    if flag is not None:
        key, source = flag.strip(), "--key"
    elif ctx.env.get("TOKENROUTE_API_KEY"):
        key, source = ctx.env["TOKENROUTE_API_KEY"].strip(), "TOKENROUTE_API_KEY"
    else:
        cache = read_key_cache(ctx)
        keys = cache.keys()
        if api_url not in keys:
            raise no_key_error(api_url, cache)
        key = keys[api_url][0]
        source = cache.source(key)
    if not is_plausible_key(key):
        raise CliError(f"the API key from {source} is not a tokenroute key (sk-tr-...)", code="invalid_key")
    return key, source


def no_key_error(api_url: str, cache: KeyCache) -> CliError:
    keys = cache.keys()
    unlisted = cache.unrecorded[1] if cache.unrecorded else None
    others = ", ".join(keys)
    elsewhere = f" (the cached keys are for {others})" if others else ""
    if cache.unread is not None:
        elsewhere += f"; {cache.unread} cannot be used (not a file, unreadable here, emptied, or a later release's)"
        if is_plausible_key(cache.last) and cache.last not in {key for key, _ in cache.listed.values()}:
            elsewhere += f", so the key in {cache.files[1]} could be any gateway's and goes to none"
    if unlisted is not None:
        return CliError(
            f"no API key for {api_url}{elsewhere}: the key in {unlisted} names no gateway, so it is taken for "
            f"{DEFAULT_API_URL} only; to use it here, pass it with --key or TOKENROUTE_API_KEY",
            code="no_key",
            next="tokenroute keys create --name NAME",
        )
    return CliError(
        f"no API key for {api_url}{elsewhere}: pass --key, set TOKENROUTE_API_KEY, or create one",
        code="no_key",
        next="tokenroute keys create --name NAME",
    )


def redact(text: str) -> str:
    """Hide secrets in text meant for people: keys keep their sk-tr-abcd prefix."""
    import re

    # A key where a word starts, or glued to text when it is long enough to be one
    # (`key%3Dsk-tr-...`, not `risk-tr-prod`); `+`: a prefix alone (a key_prefix, or text cut
    # already) stays as it is. A token where one starts, not inside a word ("heyJude"); a
    # glued one is still cut at its payload's `.eyJ`.
    text = re.sub(r"(?:(?<![A-Za-z0-9])|(?=sk[-_]tr[-_][A-Za-z0-9_-]{20}))(sk[-_]tr[-_][A-Za-z0-9_-]{4})[A-Za-z0-9_-]+",
                  r"\1...", text)
    return re.sub(r"(?<![A-Za-z0-9_-])(eyJ[A-Za-z0-9_-]{4})[A-Za-z0-9_.-]*", r"\1...", text)


def without_secrets(data: Any) -> Any:
    """A gateway's answer with every whole API key in it (32 characters after sk-tr-, or
    near) cut to its prefix; prefixes and names stay, and tokens: a checkout URL's fragment
    may hold what looks like one."""
    if isinstance(data, str):
        import re

        return re.sub(r"(sk[-_]tr[-_][A-Za-z0-9_-]{4})[A-Za-z0-9_-]{24,}", r"\1...", data)
    if isinstance(data, dict):
        return {without_secrets(name): without_secrets(value) for name, value in data.items()}
    if isinstance(data, list):
        return [without_secrets(value) for value in data]
    return data


# ------------------------------------------------ earlier releases' files ---


def adopt_earlier_keys(ctx: Context, api_url: str) -> None:
    """Convert 1.0.0's last_key.txt: its "GATEWAY KEY ID" lines move to keys.txt (a crash
    in between converts again; no key is lost), and last_key.txt holds this gateway's key
    alone again (which of 1.0.0's keys was newest is unknown). Make 0.1.0's folder private.
    Offline, and says once, on stderr. Keys that name no gateway stay where they are until
    the key cache is next written (KeyCache): reading never moves them.
    """
    if read_key_cache(ctx).of_1_0 or folder_widened(ctx):
        take_over(ctx, api_url, lambda: convert_key_cache(ctx, api_url))


def convert_key_cache(ctx: Context, api_url: str) -> list[str]:
    cache = read_key_cache(ctx, to_write=True)
    if not cache.of_1_0:
        return []
    keys = cache.keys()
    if api_url in keys:
        keys[api_url] = keys.pop(api_url)
    write_key_cache(ctx, cache, keys, newest=next(reversed(keys.values()))[0] if keys else None)
    return [f"moved the cached keys to {keys_path(ctx)} ({last_key_path(ctx)} holds the newest key alone again)"]


def adopt_earlier_login(ctx: Context, api_url: str) -> None:
    """Take over an earlier release's login for this gateway (for the commands that need
    one; once a command). 0.2.0's entries in ~/.paradigx/auth.json, a file other products
    share, are taken only when known to be tokenroute's (Judge), which may take a question
    to the default gateway; 0.1.0's login, which names no gateway, is the default
    gateway's. Nothing is taken for a gateway logged out of since. A login ends up in
    exactly one place: a refresh token that two programs hold is poison once one of them
    rotates it. Says once, on stderr.
    """
    if api_url in ctx.earlier_checked:
        return
    ctx.earlier_checked.add(api_url)
    try:
        store = read_store(ctx)
    except CliError:
        return  # a damaged file is reported by the command that needs it
    shared = read_shared_file(ctx)
    entries = shared.entries({api_url}) if shared is not None else []
    verdicts = [Judge(store.logins, None).verdict(entry) for entry in entries]
    open_to_take = api_url not in store.logins and api_url not in store.logged_out
    earlier = "" in store.logins and api_url == DEFAULT_API_URL
    if not (any(verdicts) or (entries and open_to_take) or earlier or not store.current or folder_widened(ctx)):
        return
    default = default_client(ctx) if open_to_take and None in verdicts else (None, "")
    take_over(ctx, api_url, lambda: adopt_login(ctx, api_url, *default))


def take_over(ctx: Context, api_url: str, adopt: Callable[[], list[str]]) -> None:
    """Run `adopt` under the lock, and say what it took (or why not)."""
    try:
        with CredentialsLock(ctx):
            took = adopt() + make_private(ctx)
    except (CliError, OSError) as error:  # a read-only home: the earlier files stay, and still serve
        warn(ctx, f"could not take over the earlier release's files: {getattr(error, 'message', error)}")
        return
    if took:
        note(ctx, f"For {api_url}: {'; '.join(took)}.")


def paradigx_key(ctx: Context) -> tuple[str, str]:
    """0.2.0's key file in ~/.paradigx and the key it holds, "" when none is usable."""
    folder = paradigx_dir(ctx)
    path = os.path.join(folder, PARADIGX_KEY) if folder else ""
    key = (peek_text_file(path) or "").strip() if path and is_own_file(path) else ""
    return (path, key) if is_plausible_key(key) else ("", "")


def earlier_login_kept(ctx: Context, store: Store, api_url: str) -> bool:
    """Whether 0.1.0's login stays untaken for this gateway on purpose: it was logged out of,
    or auth.json keeps a login for it (0.2.0's copy of that login may be the newer)."""
    shared = read_shared_file(ctx)
    return api_url in store.logged_out or bool(shared is not None and shared.entries({api_url}))


def folder_widened(ctx: Context) -> bool:
    """Whether ~/.tokenroute is open to others, as 0.1.0 made it (with the umask, usually 0755);
    a folder chosen with TOKENROUTE_CONFIG_DIR is only reported (`doctor`)."""
    try:
        return paradigx_dir(ctx) is not None and os.name == "posix" and bool(os.stat(config_dir(ctx)).st_mode & 0o077)
    except OSError:
        return False


def make_private(ctx: Context) -> list[str]:
    if not folder_widened(ctx):
        return []
    os.chmod(config_dir(ctx), 0o700)
    return [f"made {config_dir(ctx)} private (0700)"]


PARADIGX_KEY = "tokenroute_last_key.txt"


def adopt_login(ctx: Context, api_url: str, default: tuple[str, str] | None, unknown: str) -> list[str]:
    """Move an earlier release's login for this gateway into credentials.json (under the lock);
    what it did, and what it left and why. `default`: tokenroute's client as the default
    gateway names it (None: `unknown` says why it is not known).

    A login stored here already is newer than 0.2.0's, which is then only removed, as is a
    copy of another gateway's stored login. An entry of tokenroute's that is no usable
    login is left as it is, never cut untaken.
    """
    try:
        store = read_store(ctx)
    except CliError:
        return []  # a damaged file is reported by the command that needs it
    logins = dict(store.logins)
    shared = read_shared_file(ctx)
    entries = shared.entries({api_url}) if shared is not None else []
    judge = Judge(logins, default)
    ours = [entry for entry in entries if judge.verdict(entry)]
    copies = [entry for entry in ours if judge.holder(entry) not in (None, "", api_url)]  # of another's login
    said, taken = [], None
    open_to_take = api_url not in logins and api_url not in store.logged_out
    if open_to_take and shared is not None:
        latest = [earlier_login(entry.value, api_url) for entry in ours if entry.group == shared.last
                  and entry not in copies]
        if latest and all(map(is_valid_login, latest)):
            taken = max(latest, key=lambda login: login["expires_at"])
        elif latest:
            said.append(f"the login of tokenroute 0.2.0 in {shared.path} is not taken over: it is no usable "
                        f"login (its tokens or expiry are not what a login holds); `{runnable(ctx, 'tokenroute login')}` "
                        "logs in")
        elif entries:
            why = unknown or f"it is no login of tokenroute's client as {DEFAULT_API_URL} names it"
            said.append(f"the login in {shared.path} is not taken over: tokenroute cannot tell it is its own "
                        f"({why}); `{runnable(ctx, 'tokenroute login')}` logs in")
    cut = ours if api_url in logins or taken is not None else copies
    left = [entry for entry in entries if entry not in cut]
    took = []
    if taken is not None:
        logins[api_url] = taken
        took.append(f"took over the login of tokenroute 0.2.0 ({shared.path if shared else ''})")
    earlier = logins.pop("", None) if api_url == DEFAULT_API_URL else None
    if earlier is not None and api_url not in logins:  # else it is superseded: dropped
        if api_url in store.logged_out or left:
            logins[""] = earlier
            if left and open_to_take:
                said.append(f"nor is the login of tokenroute 0.1.0 in {credentials_path(ctx)}: the one in "
                            "auth.json may be its newer copy, and refreshing the older would end both")
        else:
            logins[api_url] = dict(earlier, api_url=api_url, resource=api_url)
            took.append(f"took over the login of tokenroute 0.1.0 ({credentials_path(ctx)})")
    changed = logins != store.logins or (not store.current and "" not in logins)  # this release's first cut: once

    def save() -> None:
        write_logins(ctx, logins, logged_out=store.logged_out)

    if cut and shared is not None:
        cut_shared_logins(ctx, shared, cut, save=save if changed else None)
    elif changed:
        save()
    return took + said


class Judge:
    """Whether an entry of auth.json is tokenroute 0.2.0's login for its gateway. Other
    products' entries have the same shape, and the server at an entry's URL may be another
    product built like tokenroute, whose discovery names its own client: so an entry is
    tokenroute's only when a source other than that server vouches for it. It copies a
    refresh token tokenroute holds; or it names tokenroute's client (and issuer): as the
    login tokenroute holds for the default gateway names it, or, with none, as that
    gateway's discovery does (`default`). The default gateway is tokenroute's by
    definition; a login held for the entry's own gateway vouches for nothing, since its
    client came from that same server. Never by its URL alone."""

    def __init__(self, logins: dict[str, dict[str, Any]], default: tuple[str, str] | None) -> None:
        self.logins = logins
        self.held = {login["refresh_token"]: url for url, login in logins.items() if login["refresh_token"]}
        self.default = default

    def holder(self, entry: SharedEntry) -> str | None:
        """The gateway of the stored login whose refresh token the entry copies; None if none."""
        refresh_token = entry.value.get("refresh_token")
        return self.held.get(refresh_token) if isinstance(refresh_token, str) else None

    def verdict(self, entry: SharedEntry) -> bool | None:
        """True when the entry is tokenroute's; None when nothing vouches either way."""
        value = entry.value
        if self.holder(entry) is not None:
            return True
        stored = self.logins.get(DEFAULT_API_URL)
        if stored is not None and stored["client_id"]:
            return is_same_client(value, stored)
        if self.default is None:
            return None
        return value.get("client_id") == self.default[0] and is_same_issuer(value.get("issuer"), self.default[1])


def is_same_client(entry: dict[str, Any], login: dict[str, Any]) -> bool:
    """Whether an entry of auth.json names the client of a stored login: its client id and
    issuer; for a login stored before 1.1 (no issuer), its client id, and the host of its
    token endpoint as the entry's issuer's host, when both are known."""
    issuer = entry.get("issuer")
    if entry.get("client_id") != login["client_id"]:
        return False
    if login.get("issuer"):
        return is_same_issuer(issuer, login["issuer"])
    issuer_url = canonical_url(issuer) if isinstance(issuer, str) else None
    endpoint_url = canonical_url(login["token_endpoint"]) if login["token_endpoint"] else None
    return issuer_url is None or endpoint_url is None or url_host(issuer_url) == url_host(endpoint_url)


def is_same_issuer(one: object, other: object) -> bool:
    return isinstance(one, str) and isinstance(other, str) and bool(one) and one.rstrip("/") == other.rstrip("/")


def default_client(ctx: Context) -> tuple[tuple[str, str] | None, str]:
    """tokenroute's client id and issuer as the default gateway's login discovery names them
    (that gateway is tokenroute's by definition); or None, and why they are not known."""
    try:
        found = discover(ctx, DEFAULT_API_URL)
    except CliError as error:  # offline, or unavailable: nothing is judged
        return None, f"{DEFAULT_API_URL} could not be asked: {error.message}"
    issuer = found.get("issuer")
    if not isinstance(issuer, str) or not issuer:
        return None, f"{DEFAULT_API_URL} names no issuer"
    return (found["client_id"], issuer), ""


class SharedEntry:
    """A member of a "tokens" object in auth.json shaped like tokenroute 0.2.0's login: its
    place (which "tokens" member, which entry) and its gateway in canonical form."""

    def __init__(self, group: int, index: int, value: dict[str, Any]) -> None:
        self.group = group
        self.index = index
        self.value = value
        self.url = canonical_url(value["api_url"]) or value["api_url"]


class SharedFile:
    """~/.paradigx/auth.json as read once: its real path (past a symlink), its text as
    written, and each "tokens" object in it (a file may repeat the member; JSON readers see
    the last) as its span and its members' values and spans."""

    def __init__(self, path: str, text: str,
                 groups: list[tuple[int, int, list[tuple[object, tuple[int, int, int]]]]]) -> None:
        self.path = path
        self.text = text
        self.groups = groups
        self.last = len(groups) - 1

    def entries(self, urls: set[str] | None = None) -> list[SharedEntry]:
        """The logins shaped like 0.2.0's (objects naming an api_url) for these gateways (None: any)."""
        found = [
            SharedEntry(group, index, value)
            for group, (_, _, members) in enumerate(self.groups)
            for index, (value, _) in enumerate(members)
            if isinstance(value, dict) and isinstance(value.get("api_url"), str)
        ]
        return [entry for entry in found if urls is None or entry.url in urls]

    def without(self, cut: list[SharedEntry]) -> str:
        """The text without the `cut` entries, each other byte as written (CRLF, separators, indent)."""
        text = self.text
        for group in reversed(range(len(self.groups))):
            drop = {entry.index for entry in cut if entry.group == group}
            if drop:
                start, end, members = self.groups[group]
                spans = [span for _, span in members]
                text = text[:start] + without_members(text[start:end], spans, drop, offset=start) + text[end:]
        return text


def read_shared_file(ctx: Context) -> SharedFile | None:
    """~/.paradigx/auth.json; None when there is no such file of this user's that is JSON."""
    folder = paradigx_dir(ctx)
    if folder is None:
        return None
    path = os.path.realpath(os.path.join(folder, "auth.json"))
    if not is_own_file(path):
        return None  # another user's: not ours to read or rewrite
    text = peek_text_file(path, newline="")  # newline="": CRLF stays CRLF
    if text is None:
        return None
    import json

    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return None  # not ours to judge: another product may own the damage
    decoder = json.JSONDecoder()
    groups = []
    for key, (_, start, end) in object_members(text, skip_space(text, 0), decoder) or []:
        members = object_members(text, start, decoder) if key == "tokens" else None
        if members is not None:
            groups.append((start, end, [(decoder.raw_decode(text, span[1])[0], span) for _, span in members]))
    return SharedFile(path, text, groups)


def cut_shared_logins(ctx: Context, shared: SharedFile, cut: list[SharedEntry], *,
                      save: Callable[[], None] | None = None) -> None:
    """Rewrite auth.json without the `cut` entries (hold the lock): atomically, at a
    symlink's target, in its mode, owner and group; never over what another program wrote
    since it was read. With `save` (which stores a login taken from it), in two phases, so
    that the login is never in two places and never lost: the new auth.json is written
    and synced beside the old one, then `save` runs, and only then does the new file
    replace the old. If that fails, credentials.json is put back as it was."""
    path = credentials_path(ctx)
    before = peek_text_file(path)
    saved = False

    def save_then_check() -> None:
        nonlocal saved
        if save is not None:
            save()
            saved = True
        if peek_text_file(shared.path, newline="") != shared.text:
            raise CliError(f"{shared.path} changed meanwhile (another program wrote it); nothing was taken from it")

    try:
        status = os.stat(shared.path)
        owner = (status.st_uid, status.st_gid) if hasattr(os, "fchown") else None  # Windows: its ACL stays
        replace_file(shared.path, shared.without(cut).encode("utf-8"), mode=status.st_mode & 0o777,
                     owner=owner, before_rename=save_then_check)
    except (OSError, CliError) as error:
        if saved and before is not None:
            write_private_file(ctx, path, before)
        elif saved:
            remove_file(path)
        if isinstance(error, CliError):
            raise
        raise CliError(f"cannot rewrite {shared.path}: {error.strerror or describe(error)}") from None


def without_members(text: str, members: list[tuple[int, int, int]], drop: set[int], *, offset: int) -> str:
    """`text`, a JSON object whose members are at `members` (spans in the file, from
    `offset`), without those numbered in `drop`: each kept byte as it was, a member
    cut with the separator that followed it (or, for the last, the one before it)."""
    spans = [(start - offset, end - offset) for start, _, end in members]
    keep = [index for index in range(len(spans)) if index not in drop]
    if not keep:
        return "{}"
    parts = [text[1:spans[0][0]]]  # the space after "{"
    for position, index in enumerate(keep):
        parts.append(text[spans[index][0]:spans[index][1]])
        if position + 1 < len(keep):
            parts.append(text[spans[index][1]:spans[index + 1][0]])
    parts.append(text[spans[-1][1]:-1])  # the space before "}"
    return "{" + "".join(parts) + "}"


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
            self.fd = open_lock_file(self.ctx, path)
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


def open_lock_file(ctx: Context, path: str) -> int:
    """The lock file, opened. A lock carries no data: one this user cannot open (left
    root-owned by `sudo tokenroute` with HOME kept) or that is no file is set aside
    for a fresh one. Processes that find it so take turns (a lock on the folder),
    so none sets aside the fresh lock that another one already holds."""
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    try:
        return os.open(path, flags, 0o600)
    except OSError as exc:
        if not is_unusable_lock(path, exc):
            raise
    folder = os.open(os.path.dirname(path), os.O_RDONLY) if os.name == "posix" else None
    try:
        if folder is not None:
            import fcntl

            fcntl.flock(folder, fcntl.LOCK_EX)
        try:
            return os.open(path, flags, 0o600)  # another process may have set it aside meanwhile
        except OSError as exc:
            if not is_unusable_lock(path, exc):
                raise
            reason = exc.strerror
        set_aside(ctx, path, f"could not be opened ({reason})")
        return os.open(path, flags, 0o600)
    finally:
        if folder is not None:
            os.close(folder)


def is_unusable_lock(path: str, exc: OSError) -> bool:
    """Whether the lock file is there but cannot be opened (its owner, its mode, or no
    file at all: a folder, a symlink); not a folder that takes no new file."""
    import errno

    unusable = (errno.EACCES, errno.EPERM, errno.EISDIR, errno.ELOOP, errno.ENXIO)
    return exc.errno in unusable and os.path.lexists(path)


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

    def close(self) -> None:
        """Nothing to release: the body is read (as with_login closes any answer it drops)."""


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
    timeout: float | None = None,
) -> Response:
    """One HTTP exchange with timeouts, bounded retries for GET, and no redirects.

    Any answer (2xx or not) comes back as a Response; a failure to get one
    raises a network CliError. It never prints. A `timeout` (below
    TOKENROUTE_TIMEOUT) is for an exchange that only adds detail: one attempt.
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
    limit = call_timeout(ctx, clip=method == "GET")
    deadline = ctx.now() + (limit if timeout is None else min(limit, timeout))

    def attempt() -> Response:
        opener = build_opener(ctx, scheme, host)
        # The deadline ends the exchange; the socket's timeout, never shorter, only backs it up.
        return within_deadline(
            ctx,
            lambda: open_answer(
                opener, method, url, data, headers, timeout=limit, host=host, proxied=bool(proxy_settings(ctx.env)),
            ).whole(),
            seconds=deadline - ctx.now(),
            host=host,
            abandon=opener.abandon,
        )

    # Only GET is retried: a POST that may have reached the server is never sent twice.
    for number in range(1, MAX_ATTEMPTS if method == "GET" and timeout is None else 1):
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
        self.socket: Any = None  # the exchange's, once connected
        self.abandoned = False

    def abandon(self) -> None:
        """End the exchange from another thread: its socket is shut, so a read waiting on it
        returns at once (a thread reading a trickling answer would outlive the caller's wait)."""
        self.abandoned = True
        if self.socket is not None:
            shut(self.socket)

    def open(self, method: str, url: str, data: bytes | None, headers: dict[str, str], timeout: float) -> Any:
        """The answer, whatever its status (a 3xx is never followed): its headers read, its body not."""
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port  # .port: ValueError when not a number
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        try:
            connection = self.connect(host, port, timeout)
            self.socket = connection.sock
            if self.abandoned:  # while it connected
                shut(self.socket)
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


def shut(sock: Any) -> None:
    import socket

    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # closed already
        pass


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


def within_deadline(
    ctx: Context, work: Callable[[], Any], *, seconds: float, host: str, abandon: Callable[[], None]
) -> Any:
    """Run one exchange on a helper thread and stop waiting after `seconds`, then `abandon` it
    (so that the thread ends too).

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
        abandon()
        raise timed_out(ctx, host)
    done, result = outcome[0]
    if not done:
        raise result
    return result


def timed_out(ctx: Context, host: str) -> CliError:
    """An exchange that took longer than exchange_timeout allows: say what sets that limit."""
    if ctx.exchange_cap is not None and ctx.exchange_cap < timeout_setting(ctx):
        return network_error(f"timed out waiting for {host} (an MCP tool call waits at most {ctx.exchange_cap:g}s)")
    return network_error(f"timed out waiting for {host} (TOKENROUTE_TIMEOUT to wait longer)")


def open_answer(
    opener: Opener,
    method: str,
    url: str,
    data: bytes | None,
    headers: dict[str, str],
    *,
    timeout: float,
    host: str,
    proxied: bool,
) -> StreamedAnswer:
    """The request sent and the answer's headers read; its body left to read."""
    import http.client

    try:
        handle = opener.open(method, url, data, headers, timeout)
    except (http.client.HTTPException, OSError, ValueError) as exc:
        raise exchange_failure(exc, host=host, proxied=proxied) from None
    return StreamedAnswer(handle, host=host, proxied=proxied)


def exchange_failure(exc: Exception, *, host: str, proxied: bool) -> CliError:
    """What a failed exchange (http.client.HTTPException, OSError or ValueError) means to the user."""
    import http.client
    import socket
    import ssl

    if isinstance(exc, (socket.timeout, TimeoutError)):
        return network_error(f"timed out waiting for {host} (TOKENROUTE_TIMEOUT to wait longer)")
    if isinstance(exc, ssl.SSLError):
        return connection_error(host, exc)
    if isinstance(exc, http.client.IncompleteRead):  # a chunked answer cut off
        return closed_mid_answer(host)
    if isinstance(exc, (http.client.HTTPException, OSError)):
        return network_error(f"connection to {host} failed: {describe(exc)}")
    if proxied:  # a malformed *_proxy URL, which may hold a password: never shown
        return CliError("a proxy variable (HTTPS_PROXY, HTTP_PROXY, ...) holds a malformed URL", code="config")
    return CliError(f"{sanitize(host)} is not a valid host name")


def closed_mid_answer(host: str) -> CliError:
    return network_error(f"the connection to {host} closed mid-answer")


def send_streamed(
    ctx: Context, method: str, url: str, *, data: bytes | None, headers: dict[str, str]
) -> StreamedAnswer:
    """`api`'s exchange: sent once whatever the method, no redirect followed, the body left to read."""
    scheme, host = check_url(url)
    timeout = call_timeout(ctx)
    opener = build_opener(ctx, scheme, host)
    proxied = bool(proxy_settings(ctx.env))
    # The deadline bounds the wait for the headers; the socket timeout, each wait for more of the body.
    return within_deadline(
        ctx,
        lambda: open_answer(opener, method, url, data, headers, timeout=timeout, host=host, proxied=proxied),
        seconds=timeout,
        host=host,
        abandon=opener.abandon,
    )


class StreamedAnswer:
    """An answer whose headers are read: `chunks()` yields its body as it arrives, `whole()` reads
    it all. The one reader of answers: every exchange reads its body here."""

    def __init__(self, handle: Any, *, host: str, proxied: bool) -> None:
        self.handle = handle  # an http.client.HTTPResponse
        self.host, self.proxied = host, proxied
        self.status: int = handle.status
        self.headers: Mapping[str, str] = handle.headers

    def chunks(self) -> Iterator[bytes]:
        """The body as it arrives; one cut short (a chunk, or bytes its Content-Length promised,
        never came) is a network error after what did come."""
        import http.client

        while True:
            try:
                chunk = self.handle.read1(65536)
            except (http.client.HTTPException, OSError, ValueError) as exc:
                raise exchange_failure(exc, host=self.host, proxied=self.proxied) from None
            if not chunk:
                break
            yield chunk
        if self.handle.length:  # bytes still owed: 0 for HEAD, 1xx, 204 and 304, None without a length
            raise closed_mid_answer(self.host)

    def whole(self) -> Response:
        """The answer with its whole body (at most MAX_RESPONSE_BYTES), the connection closed."""
        with self.handle:
            body = bytearray()
            for chunk in self.chunks():
                body += chunk
                if len(body) > MAX_RESPONSE_BYTES:
                    raise server_error(f"the answer was larger than {MAX_RESPONSE_BYTES // 1024 // 1024} MiB")
            return Response(self.status, self.headers, bytes(body))

    def close(self) -> None:
        self.handle.close()


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


def call_api(
    ctx: Context, method: str, url: str, *, key: str, source: str, json_body: object = None, kind: type = dict
) -> Any:
    """An OpenAI-compatible /v1 call authorized by an API key (from `source`: --key, a variable, a file)."""
    response = send(ctx, method, url, token=key, json_body=json_body)
    api_url, _, path = url.rpartition("/v1/")
    # Only a web page or a bare route miss (`{"detail": "Not Found"}`, FastAPI's) says no gateway is
    # there; any other 404 (an unknown model) is the gateway's own answer.
    if response.status == 404 and response.json() in (None, {"detail": "Not Found"}):
        raise not_a_gateway(api_url, f"it answers /v1/{path} with HTTP 404", status=404)
    if response.status == 402:
        error = error_from_response(response, account=False, secret=key)
        raise key_without_credit(ctx, api_url, key, source=source, error=error)
    if response.status >= 300:
        raise error_from_response(response, account=False, secret=key)
    return expect_json(response, kind)


def is_json_answer(response: Response) -> bool:
    """Whether the answer says it is JSON (`application/json`, `application/problem+json`)."""
    media_type = (response.headers.get("Content-Type") or "").partition(";")[0].strip().lower()
    return media_type.endswith(("/json", "+json"))


def not_a_gateway(api_url: str, answer: str, *, status: int) -> CliError:
    """A URL that answers, but not as a tokenroute gateway; with its base URL when it ends in /v1
    (OPENAI_BASE_URL, copied from `tokenroute env`)."""
    base = api_url[: -len("/v1")] if api_url.endswith("/v1") else None
    hint = f"; the gateway's URL is probably {base} (without /v1)" if base else ""
    return CliError(
        f"no tokenroute gateway at {api_url} ({answer}){hint}",
        code="not_a_gateway",
        status=status,
        payload={"suggested_api_url": base} if base else None,
    )


def key_without_credit(ctx: Context, api_url: str, key: str, *, source: str, error: CliError) -> CliError:
    """A 402 that names the key used and where it came from: credit is per key. Its name and
    balance (and a funded key's) come from the account's key list when a login is at hand."""
    prefix = key[: len(KEY_PREFIX) + 4]
    keys = keys_at_a_glance(ctx, api_url)
    used = find_key(keys, key)
    funded = [k for k in keys if k is not used and k.get("status") == "active" and has_credit(k.get("balance_usd"))]
    if used is None:
        label, balance, api_key = f"{prefix}...", "", {"key_prefix": prefix}  # as every key in a message
    else:
        label, balance = f"{show(used.get('name'))!r} ({prefix}...)", f" has {usd(used.get('balance_usd'))}"
        api_key = {name: used.get(name) for name in ("id", "name", "key_prefix", "balance_usd")}
    others = f" (your key {show(funded[0].get('name'))!r} has {usd(funded[0].get('balance_usd'))})" if funded else ""
    return CliError(
        f"{error.message}: the API key {label} from {source}{balance}; credit is per key{others}: "
        "top up, or use a funded key with --key or TOKENROUTE_API_KEY",
        code=error.code,
        next=error.next,
        status=error.status,
        payload={"api_key": dict(api_key, source=source)},
    )


def keys_at_a_glance(ctx: Context, api_url: str) -> list[dict[str, Any]]:
    """The account's keys, only to add detail to an error: from a login already stored for this
    gateway with a fresh access token (no refresh, no takeover), in one short attempt; else none."""
    try:
        creds = read_logins(ctx).get(api_url)
        if creds is None or expiring(ctx, creds):
            return []
        response = send(ctx, "GET", api_url + "/api/v1/me/keys", token=creds["access_token"], timeout=GLANCE_SECONDS)
    except CliError:
        return []
    keys = response.json() if response.status == 200 else None
    return [key for key in keys if isinstance(key, dict)] if isinstance(keys, list) else []


GLANCE_SECONDS = 3.0


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
    """An /api/v1 account call with the login's access token, refreshed as needed."""
    creds = require_credentials(ctx, api_url)
    response, token = with_login(
        ctx,
        creds,
        lambda token: send(
            ctx, method, api_url + path, token=token, json_body=json_body, idempotency_key=idempotency_key
        ),
    )
    if response.status >= 300:
        raise error_from_response(response, account=True, secret=token)
    return expect_json(response, kind)


def with_login(ctx: Context, creds: dict[str, Any], call: Callable[[str], AnswerT]) -> tuple[AnswerT, str]:
    """`call(token)` with the login's access token, refreshed as needed, and the token it went with.

    A 401 refreshes once and calls once more: the gateway did not act on it.
    """
    token = fresh_access_token(ctx, creds)
    answer = call(token)
    if answer.status == 401:
        answer.close()
        token = fresh_access_token(ctx, creds, rejected=token)
        answer = call(token)
    return answer, token


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
        current = with_token_endpoint(ctx, current)  # discovery sends no secret: it needs no hold
        holding = f"the login refresh first, so that it is saved (at most {exchange_timeout(ctx):g}s)"
        with SignalsHeld(ctx, holding):  # the provider rotates the refresh token: the new one must be saved
            refreshed = refresh_credentials(ctx, current)
            try:
                save_login(ctx, refreshed)
            except CliError as error:  # a full disk: the token works now, its rotated refresh token is lost
                warn(ctx, f"{error.message}; the next command will need `{runnable(ctx, 'tokenroute login')}`")
        return refreshed["access_token"]


class SignalsHeld:
    """Ctrl-C (SIGINT), SIGTERM, SIGHUP (a closed terminal) and SIGQUIT wait while held,
    then act as they would have (the first of them).

    From sending a refresh token until its answer is saved: the provider
    rotates the token, and an answer lost on the way leaves a dead login (the
    wait is bounded by the one exchange's timeout). While `env --write`
    replaces a file: a copy of it, the key in it, would be left beside it. A
    signal ignored when the hold starts (`nohup`, a background job) stays
    ignored. Only the main thread can set signal handlers, and a refresh runs
    there (MCP tool calls too); elsewhere nothing is held. `doing`: what the
    warning says is finished, and why.
    """

    def __init__(self, ctx: Context, doing: str) -> None:
        self.ctx = ctx
        self.doing = doing
        self.previous: dict[int, Any] = {}
        self.caught: list[int] = []

    def __enter__(self) -> SignalsHeld:
        import signal

        names = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT")  # the last two are not Windows'
        for number in [getattr(signal, name) for name in names if hasattr(signal, name)]:
            if signal.getsignal(number) is signal.SIG_IGN:  # `nohup`, a background job: it does nothing anyway
                continue
            try:
                self.previous[number] = signal.signal(number, self.catch)
            except ValueError:  # not the main thread
                break
        return self

    def catch(self, number: int, frame: object) -> None:
        if not self.caught:
            warn(self.ctx, f"finishing {self.doing}")
        self.caught.append(number)

    def __exit__(self, *exc_info: object) -> None:
        import signal

        for number, handler in self.previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)
        if self.caught:
            signal.raise_signal(self.caught[0])  # SIGINT: KeyboardInterrupt (exit 130); the others: dies of it


def with_token_endpoint(ctx: Context, creds: dict[str, Any]) -> dict[str, Any]:
    """A login taken over from 0.1.0 (no token endpoint or client id recorded) completed by
    the gateway's discovery; its refresh token goes only to the issuer that granted it."""
    if not creds["refresh_token"] or (creds["token_endpoint"] and creds["client_id"]):
        return creds
    found = discover(ctx, creds["api_url"])
    if creds.get("issuer") and not is_same_issuer(found.get("issuer"), creds["issuer"]):
        raise CliError(f"the login taken over from tokenroute 0.1.0 was granted by {sanitize(creds['issuer'])}, "
                       f"not by the identity provider of {creds['api_url']}", code="session_expired",
                       next="tokenroute login")
    return dict(creds, token_endpoint=found["token_endpoint"], client_id=creds["client_id"] or found["client_id"])


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
    is_page = response.status < 300 and not is_json_answer(response) and not isinstance(response.json(), dict)
    if response.status == 404 or is_page:  # a garbled JSON answer is the gateway's failure: below, exit 3
        content_type = sanitize(response.headers.get("Content-Type") or "no content type")
        raise not_a_gateway(
            api_url, f"it answers /api/v1/auth/discovery with HTTP {response.status}, {content_type}", status=response.status
        )
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
    issuer = found.get("issuer")
    pending = {
        "api_url": api_url,
        "token_endpoint": found["token_endpoint"],
        "client_id": found["client_id"],
        "resource": found["resource"],
        "issuer": issuer if isinstance(issuer, str) else "",  # what tells tokenroute's logins in auth.json
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
    5xx, 429) are retried until the code expires; at the timeout, when every
    poll failed, the last failure is raised rather than None. A denial or an
    expired code is a device-flow failure (exit 3). Without a timeout it never
    returns None.
    """
    start = ctx.now()
    failure: CliError | None = None  # the last poll's, when it failed
    answered = False  # whether any poll got the identity provider's answer
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
            if failure is not None and not answered:  # not "still waiting": nothing told
                failure.message += "; the login may still be approved: try again later"
                failure.next = "tokenroute login --resume"
                raise failure
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
            if ctx.deadline is not None and ctx.now() >= ctx.deadline:  # the MCP call's time is up, no failure
                continue  # next_poll is past the end
            response, failure = None, exc
        answer = response.json() if response is not None else None
        answer = answer if isinstance(answer, dict) else {}
        if response is not None and response.status == 200 and is_token(answer.get("access_token")):
            return answer
        if response is None or response.status == 429 or response.status >= 500:
            # Unreachable, rate limited or failing: back off, and keep polling until the code expires.
            if response is not None:
                failure = error_from_response(response, account=True, secret=pending["device_code"])
            interval = min(interval * 2, MAX_POLL_INTERVAL)
            wait = retry_after_seconds(response.headers.get("Retry-After") if response is not None else None)
            next_poll = ctx.now() + max(interval, min(wait or 0.0, MAX_POLL_INTERVAL))
            continue
        answered = True
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
        "issuer": pending["issuer"] if isinstance(pending.get("issuer"), str) else "",  # 1.0 kept none
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
    "total_tokens_out": "Tokens out", "total_cost_usd": "Cost", "api_url": "Gateway", "in_use": "In use",
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
    """A server amount (a decimal string) as `$1,234.50`: cents at least.

    `per` (10, 100, 1000...) scales a unit price (per 1k tokens -> per 1M);
    a price keeps the digits below a cent it has (`$0.075`), an amount of a
    cent or more is rounded half up to cents, and one below a cent keeps its
    digits (`$0.0042`: spent, but not nothing). Anything else, and amounts
    beyond any balance, are shown as sent. Done on the digits: importing
    decimal would cost human output a few ms of start-up.
    """
    text = str(value).strip() if isinstance(value, (str, int)) and not isinstance(value, bool) else ""
    sign, body = ("-", text[1:]) if text.startswith("-") else ("", text)
    whole, _, fraction = body.partition(".")
    absurd = len(whole.lstrip("0")) > MAX_WHOLE_DIGITS or len(body) > MAX_AMOUNT_CHARS
    if not (whole + fraction).isdigit() or not (whole + fraction).isascii() or absurd:
        return show(value)
    digits, point = whole + fraction, len(whole) + len(str(per)) - 1  # move the point right
    digits = digits.ljust(point, "0")
    whole, fraction = digits[:point] or "0", digits[point:].rstrip("0")
    below_a_cent = not whole.strip("0") and fraction[:2] == "00"
    if (per != 1 and len(fraction) > 2) or below_a_cent:
        return f"{sign}${int(whole):,}.{fraction}"
    cents = int(whole + fraction.ljust(2, "0")[:2]) + (fraction[2:3] >= "5")
    return f"{sign if cents else ''}${cents // 100:,}.{cents % 100:02d}"


MAX_WHOLE_DIGITS = 30  # dollars beyond any balance; Python refuses int() of over 4,300 digits
MAX_AMOUNT_CHARS = 200  # room for any number of places


def readable_time(value: object) -> str:
    """A server time (ISO 8601 text or Unix seconds) as `2026-11-30 14:02 UTC`; as sent when it is
    none, or one that UTC cannot hold (year 1 or 9999 with an offset)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1e11:
        try:
            return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(value))
        except (OverflowError, OSError, ValueError):  # Windows' gmtime stops at the year 3000
            return show(value)
    if not isinstance(value, str):
        return show(value)
    text = value.strip()
    digits = text[:4] + text[5:7] + text[8:10] + text[11:13] + text[14:16]
    separators = text[4:5] + text[7:8] + text[10:11].replace(" ", "T") + text[13:14]
    plain = len(digits) == 12 and digits.isascii() and digits.isdigit() and separators == "--T:"
    if plain and text[16:].lstrip("0123456789:.").upper() in ("", "Z", "+00:00"):
        return f"{text[:10]} {text[11:16]} UTC"  # already UTC: no datetime to import
    from datetime import datetime, timezone

    try:
        moment = datetime.fromisoformat(text)
        if moment.tzinfo is None:  # the gateway's times are UTC
            moment = moment.replace(tzinfo=timezone.utc)
        moment = moment.astimezone(timezone.utc)
    except (ValueError, OverflowError):
        return show(value)
    return f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d} {moment.hour:02d}:{moment.minute:02d} UTC"


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
    if args.timeout is not None and not args.resume:  # a login waits for as long as its code lasts
        raise CliError(f"--timeout bounds the wait of --resume: use `{runnable(ctx, 'tokenroute login --no-wait')}`, "
                       f"then `{runnable(ctx, 'tokenroute login --resume --timeout SECONDS')}`", code="usage")
    if args.resume:
        return resume_login(args, ctx, api_url)
    started = login_start(ctx, api_url, force=args.force) if args.no_wait else current_login(ctx, api_url, args.force)
    if started is not None:  # logged in already, or --no-wait's code to show (--resume finishes)
        if args.json:
            render_json(ctx, started)
        elif started["status"] == "logged_in":
            say_ok(ctx, f"already logged in to {api_url} ({runnable(ctx, 'tokenroute login --force')} to log in again)")
        else:
            render_pending(ctx, args, started, out=ctx.stdout)
        return EXIT_OK
    pending = new_device_login(ctx, api_url)
    render_pending(ctx, args, pending, out=ctx.stderr)
    if ctx.person_present and not args.no_browser:
        open_url_for_person(ctx, pending["verification_uri_complete"], api_url)
    answer = poll_device_flow(ctx, pending, first_wait=pending["interval"])
    return show_login(args, ctx, store_login(ctx, pending, answer))


def usable_login(ctx: Context, api_url: str) -> dict[str, Any] | None:
    """This gateway's stored login, None when there is none."""
    replaceable_store(ctx)  # a damaged file goes aside first: an earlier release's login may still be taken
    adopt_earlier_login(ctx, api_url)
    return read_logins(ctx).get(api_url)


def replaceable_store(ctx: Context) -> Store:
    """The stored logins, for `login` and `logout`: a credentials file that cannot
    be used (damaged, unreadable, a folder, another user's) is set aside, so
    that they always get the user out."""
    try:
        return read_store(ctx)
    except CliError as error:
        if error.code not in ("credentials_corrupt", "credentials_unreadable"):
            raise
        set_aside(ctx, credentials_path(ctx), f"could not be used ({error.message.partition('; ')[0]})")
        return Store({}, set())


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


def drop_pending_logins(ctx: Context, ended: Callable[[dict[str, Any]], bool]) -> None:
    """Forget the logins that ended (approved, denied, expired, or made stale by another
    approval); the caller holds the CredentialsLock."""
    found = read_pending_logins(ctx)
    if any(ended(pending) for pending in found):
        write_pending_logins(ctx, [pending for pending in still_waiting(ctx, found) if not ended(pending)])


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
    return pending_view(ctx, pending)


def current_login(ctx: Context, api_url: str, force: bool) -> dict[str, Any] | None:
    """`{"status": "logged_in", ...}` when a stored login still works (and `force` is off); `login` stops there."""
    if not force and logged_in(ctx, api_url):
        return {"status": "logged_in", "api_url": api_url}
    return None


def new_device_login(ctx: Context, api_url: str) -> dict[str, Any]:
    """A device code to approve; the files are checked first, so no approved login goes unsaved."""
    check_login_storage(ctx)
    return start_device_flow(ctx, api_url)


def check_login_storage(ctx: Context) -> None:
    """Fail now, before a person approves a login that could then not be saved: the folder
    must take a new file, and the lock and credentials.json be usable (ones that are not
    are set aside)."""
    check_writable(ensure_config_dir(ctx))
    replaceable_store(ctx)
    with CredentialsLock(ctx):
        pass


def login_finish(
    ctx: Context, api_url: str, *, timeout: float | None = None, user_code: str | None = None
) -> dict[str, Any]:
    """`login --resume`: wait up to `timeout` seconds for the approval, then save the login.
    When another approval already logged this gateway in (which ended every login waiting
    for it), that login is the answer, if it still works."""
    try:
        pending, answer = await_login(ctx, api_url, timeout=timeout, user_code=user_code)
    except CliError as error:
        if error.code == "no_pending_login" and login_works(ctx, api_url):
            return {"status": "logged_in", "api_url": api_url}
        raise
    return store_login(ctx, pending, answer)


def login_works(ctx: Context, api_url: str) -> bool:
    """logged_in, where a gateway that cannot tell (offline, failing) means no."""
    try:
        return logged_in(ctx, api_url)
    except CliError:
        return False


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
    return show_login(args, ctx, login_finish(ctx, api_url, timeout=args.timeout, user_code=args.user_code))


def await_login(
    ctx: Context, api_url: str, *, timeout: float | None, user_code: str | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The pending login and the identity provider's grant, once approved within `timeout` seconds."""
    pending = load_pending_login(ctx, api_url, user_code)
    try:
        answer = poll_device_flow(ctx, pending, first_wait=0, timeout=timeout)
    except CliError as exc:
        if exc.code in ("login_denied", "login_expired", "login_failed"):  # it is over
            with CredentialsLock(ctx):
                drop_pending_logins(ctx, lambda other: other["device_code"] == pending["device_code"])
        raise
    if answer is None:
        raise CliError(
            "the login is still waiting for approval",
            code="login_pending",
            next="tokenroute login --resume",
            payload={"pending": pending_view(ctx, pending)},
        )
    return pending, answer


def store_login(ctx: Context, pending: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any]:
    """Save the approved login; only then are the codes waiting for this gateway forgotten
    (approving one of them later would replace this login)."""
    with CredentialsLock(ctx):
        save_login(ctx, credentials_from_grant(ctx, pending, answer))
        drop_pending_logins(ctx, lambda other: other["api_url"] == pending["api_url"])
    return {"status": "logged_in", "api_url": pending["api_url"]}


def show_login(args: argparse.Namespace, ctx: Context, login: dict[str, Any]) -> int:
    if args.json:
        render_json(ctx, login)
    else:
        say_ok(ctx, logged_in_as(ctx, login["api_url"]))
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


def pending_view(ctx: Context, pending: dict[str, Any]) -> dict[str, Any]:
    return {
        "status": "pending",
        "verification_uri": pending["verification_uri"],
        "verification_uri_complete": pending["verification_uri_complete"],
        "user_code": pending["user_code"],
        "expires_at": int(pending["expires_at"]),
        "next": runnable(ctx, "tokenroute login --resume"),
    }


def render_pending(ctx: Context, args: argparse.Namespace, pending: dict[str, Any], *, out: TextIO) -> None:
    """The code for a person to approve; `pending` is the device flow's, or its `pending_view`."""
    out.write(f"Visit: {sanitize(pending['verification_uri'])}\n")
    out.write(f"And enter code: {sanitize(pending['user_code'])}\n")
    if pending["verification_uri_complete"] != pending["verification_uri"]:
        out.write(f"(or open {sanitize(pending['verification_uri_complete'])})\n")
    if args.no_wait:
        out.write(f"Then run: {runnable(ctx, 'tokenroute login --resume')}\n")
    else:
        out.write("Waiting for authorization...\n")
    out.flush()


def cmd_logout(args: argparse.Namespace, ctx: Context) -> int:
    api_url, _ = api_url_setting(ctx, args.api_url)
    done = logout(ctx, api_url, every=args.all, forget_key=args.forget_key)
    gone, forgotten, kept, left = done["gone"], done["forgotten"], done["kept"], done["left"]
    if args.json:
        render_json(ctx, {"logged_out": bool(gone), "api_url": api_url, "cached_keys": list(kept)})
    else:
        forgot = f"forgot the cached API key{'s' if len(forgotten) > 1 else ''}" if forgotten else ""
        if gone:
            say_ok(ctx, f"logged out of {'every gateway' if args.all else api_url}" + (f" and {forgot}" if forgot else ""))
        elif forgot:
            say_ok(ctx, f"{forgot} of {'every gateway' if args.all else api_url} (not logged in)")
        else:
            ctx.stdout.write(f"Not logged in to {'any gateway' if args.all else api_url}; nothing to do\n")
        if kept and not args.forget_key:
            forget = runnable(ctx, "tokenroute logout" + (" --all" if args.all else "") + " --forget-key")
            note(ctx, f"An API key for {', '.join(kept)} stays cached in {', '.join(sorted(set(kept.values())))} "
                 f"(env, run, test and models use it); forget it with `{forget}`")
    for path in done["stuck"]:
        warn(ctx, stuck_key_message(path))
    if left:  # another product's, or 0.2.0's that nothing vouches for: never taken over now
        ctx.stdout.flush()
        note(ctx, f"{os.path.join(paradigx_dir(ctx) or '', 'auth.json')} still holds a login for {', '.join(left)} "
             f"that tokenroute cannot tell is its own ({done['why']}): it stays there, and tokenroute will not take "
             "it over")
    return EXIT_OK


def logout(ctx: Context, api_url: str, *, every: bool, forget_key: bool) -> dict[str, Any]:
    """Forget this gateway's login (every gateway's), under the refresh lock, and tokenroute
    0.2.0's logins of it in ~/.paradigx/auth.json (with `every`, all it can tell are
    tokenroute's). Final whatever the files' state, and offline too: the gateways of the
    logins left in auth.json are recorded as logged out of, so none is ever taken over."""
    logins = replaceable_store(ctx).logins  # a damaged file goes aside: logout never stops at it
    shared = read_shared_file(ctx)
    known = {*logins, api_url} | {entry.url for entry in (shared.entries() if shared else [])}
    urls = known - {""} if every else {api_url}
    asks = any(Judge(logins, None).verdict(entry) is None for entry in (shared.entries(urls) if shared else []))
    default, unknown = default_client(ctx) if asks else (None, "")
    with CredentialsLock(ctx):
        store = replaceable_store(ctx)
        gone = list(store.logins) if every else [url for url in store.logins if url in (api_url, "")]  # "": 0.1.0's
        logins = {url: login for url, login in store.logins.items() if url not in gone}
        shared = read_shared_file(ctx)
        entries = shared.entries(urls) if shared is not None else []
        ours = [entry for entry in entries if Judge(store.logins, default).verdict(entry)]  # before the logins go
        logged_out = store.logged_out - urls
        write_logins(ctx, logins, logged_out=logged_out | {entry.url for entry in entries})
        drop_pending_logins(ctx, lambda pending: every or pending["api_url"] == api_url)
        cache = read_key_cache(ctx, to_write=forget_key)
        keys = cache.keys()
        forgotten = [url for url in keys if every or url == api_url] if forget_key else []
        if forgotten:
            keys = {url: key for url, key in keys.items() if url not in forgotten}
            write_key_cache(ctx, cache, keys)
        elif forget_key and cache.unread:  # a file that cannot be read may hold them
            set_aside_unread(ctx, cache, keys)
        left = entries
        if ours and shared is not None:
            try:
                cut_shared_logins(ctx, shared, ours)
            except CliError as error:
                warn(ctx, f"{error.message}; tokenroute 0.2.0's login stays there, unused")
            else:
                left = [entry for entry in entries if entry not in ours]
                gone += sorted({entry.url for entry in ours} - set(gone))
                write_logins(ctx, logins, logged_out=logged_out | {entry.url for entry in left})
        after = read_key_cache(ctx)  # as reads find them: 0.2.0's key stays where its folder cannot be written
        kept = {url: after.source(key) for url, (key, _) in after.keys().items() if every or url == api_url}
    return {
        "gone": gone,
        "forgotten": forgotten,
        "kept": dict(sorted(kept.items())),  # by gateway, the file its key is read from
        "stuck": sorted(set(kept.values())) if forget_key else [],  # files of keys meant to be forgotten
        "left": sorted({sanitize(entry.url) for entry in left}),
        "why": unknown or "other Paradigx products keep their logins there",
    }


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
    ) -> None:
        self.operation = operation
        self.arguments = arguments
        self.fields = fields
        self.table = table

    def __call__(self, args: argparse.Namespace, ctx: Context) -> int:
        api_url, _ = api_url_setting(ctx, args.api_url)
        data = self.operation(ctx, api_url, **{name: getattr(args, name) for name in self.arguments})
        if args.json:
            render_json(ctx, data)
        elif self.table is None:
            render_fields(ctx, dict(data, api_url=api_url), self.fields)
        else:
            headers, row = self.table
            render_table(ctx, headers, [row(item) for item in data])
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
    except (CliError, KeyboardInterrupt) as exc:  # Ctrl-C too (waiting for the lock): the key is still shown
        error = exc if isinstance(exc, CliError) else CliError("interrupted", code="interrupted",
                                                               exit_code=EXIT_INTERRUPTED)
        if read_key_cache(ctx).listed.get(api_url, ("", ""))[0] != raw:
            raise KeyNotCached(key, error) from None
        warn(ctx, f"{error.message}: the key is cached in {keys_path(ctx)} only")  # last_key.txt, the mirror, failed
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
        cached = key_file(ctx, raw) if not args.no_cache and not_cached is None else None
        raise undelivered_key(ctx, exc, key_id, cached=cached) from None
    if args.no_cache:
        note(ctx, "Save this key now: it is shown only once (not cached: --no-cache).")
        return EXIT_OK
    if not_cached is not None:  # shown above all the same: it is the only copy
        raise CliError(f"the key above was created but not cached: {not_cached.message}", code=not_cached.code,
                       exit_code=not_cached.exit_code)
    note(ctx, f"Save this key now: it is shown only once. Cached in {key_file(ctx, raw)} for env, run, test and models.")
    return EXIT_OK


def key_file(ctx: Context, key: str) -> str:
    """Where a key just cached is: last_key.txt, or keys.txt alone when that mirror failed."""
    return last_key_path(ctx) if peek_text_file(last_key_path(ctx)) == key else keys_path(ctx)


def undelivered_key(ctx: Context, exc: Exception, key_id: str, *, cached: str | None) -> CliError:
    """`cached`: the file the new key is cached in, if any."""
    import shlex

    reason = describe(exc)
    if cached is not None:
        return CliError(
            f"the new key could not be printed ({reason}); it is cached in {cached}",
            code="output_failed",
        )
    return CliError(
        f"the new key {key_id} could not be printed ({reason}) and was not cached: it was delivered nowhere; "
        f"revoke it",
        code="output_failed",
        next=f"tokenroute keys revoke {shlex.quote(key_id)}",
    )


KEY_COLUMNS = ("id", "name", "key_prefix", "status", "balance_usd", "created_at")


def list_keys(ctx: Context, api_url: str) -> list[dict[str, Any]]:
    """`keys list`: the account's keys, each with `in_use`: whether env, run, test and models use it here."""
    return keys_and_key_in_use(ctx, api_url)[0]


def keys_and_key_in_use(ctx: Context, api_url: str) -> tuple[list[dict[str, Any]], tuple[str, str] | None]:
    """The account's keys, each with `in_use`, and the API key used here with where it comes from
    (None: no usable one)."""
    keys = [key for key in call_account(ctx, api_url, "GET", "/api/v1/me/keys", kind=list) if isinstance(key, dict)]
    try:
        in_use: tuple[str, str] | None = api_key_in_use(ctx, None, api_url)
    except CliError:
        in_use = None
    used = find_key(keys, in_use[0]) if in_use else None
    return [dict(key, in_use=key is used) for key in keys], in_use


def find_key(keys: list[dict[str, Any]], raw: str) -> dict[str, Any] | None:
    """The listed key a raw key is, by its prefix (the gateway never lists raw keys); None when
    none or several (of the active ones) match."""
    matches = [
        key for key in keys
        if isinstance(key.get("key_prefix"), str) and len(key["key_prefix"]) > len(KEY_PREFIX)
        and raw.startswith(key["key_prefix"])
    ]
    if len(matches) > 1:
        matches = [key for key in matches if key.get("status") == "active"]
    return matches[0] if len(matches) == 1 else None


def has_credit(value: object) -> bool:
    """Whether a server amount (a decimal string) is above zero."""
    text = str(value).strip() if isinstance(value, (str, int)) and not isinstance(value, bool) else ""
    whole, _, fraction = text.partition(".")
    return (whole + fraction).isascii() and (whole + fraction).isdigit() and bool((whole + fraction).strip("0"))


def key_row(key: dict[str, Any], columns: Sequence[str]) -> list[str]:
    return [("yes" if key[column] else "") if column == "in_use" else human(column, key.get(column)) for column in columns]


def cmd_keys_list(args: argparse.Namespace, ctx: Context) -> int:
    api_url, _ = api_url_setting(ctx, args.api_url)
    keys, in_use = keys_and_key_in_use(ctx, api_url)
    if args.json:
        render_json(ctx, keys)
        return EXIT_OK
    if not keys:
        note(ctx, f"No keys yet. Create one: {runnable(ctx, 'tokenroute keys create --name NAME')}")
        return EXIT_OK
    marked = any(key["in_use"] for key in keys)
    columns = (*KEY_COLUMNS, "in_use") if marked else KEY_COLUMNS
    render_table(ctx, [FIELD_LABELS[column] for column in columns], [key_row(key, columns) for key in keys])
    if in_use is not None:
        ctx.stdout.flush()
        if marked:
            note(ctx, f"In use: the key env, run, test and models use (from {in_use[1]}).")
        else:
            note(ctx, f"The key that env, run, test and models use ({redact(in_use[0])}, from {in_use[1]}) "
                      "is none of these.")
    return EXIT_OK


def revoke_key(
    ctx: Context, api_url: str, *, id: str, render: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """`keys revoke`: revoke a key and drop it from the key cache if it is the cached one.

    `render` shows the revoked key (the CLI's output) before the note about
    the cache: messages come in the order things happen.
    """
    from urllib.parse import quote

    if id in (".", ".."):
        raise CliError(f"{id!r} is not a key id (see tokenroute keys list)")
    try:
        key = call_account(ctx, api_url, "DELETE", "/api/v1/me/keys/" + quote(id, safe=""))
    except CliError as error:
        if error.status == 404:
            error.next = "tokenroute keys list"
        raise
    prefix = key.get("key_prefix")
    failed = None
    try:
        removed, stuck = forget_cached_key(ctx, api_url, key_id=id, prefix=prefix if isinstance(prefix, str) else None)
    except CliError as error:  # revoked all the same
        removed, stuck, failed = None, None, error
    if render is not None:
        render(key)
    if failed is not None:
        warn(ctx, f"{failed.message}; the revoked key may still be cached")
    if removed:
        note(ctx, f"Removed it from the key cache ({removed}).")
    if stuck:
        warn(ctx, stuck_key_message(stuck))
    return key


def cmd_keys_revoke(args: argparse.Namespace, ctx: Context) -> int:
    """Revoke a key. At a terminal, one that holds credit is confirmed first (--yes skips);
    otherwise the credit lost is said after the revoke, from the revoked key's balance."""
    api_url, _ = api_url_setting(ctx, args.api_url)
    settled = ctx.person_present and not args.yes and confirm_revoke(ctx, api_url, args.id)

    def render(key: dict[str, Any]) -> None:
        if args.json:
            render_json(ctx, key)
        else:
            say_ok(ctx, f"revoked {show(key.get('id', args.id))} ({show(key.get('name'))})")
        ctx.stdout.flush()  # before the notes: in one terminal or log, things read in the order they happened
        lost = key.get("balance_usd")
        if has_credit(lost) and not settled:
            warn(ctx, f"the {usd(lost)} of credit on {sanitize(args.id)} is lost with it")

    revoke_key(ctx, api_url, id=args.id, render=render)
    return EXIT_OK


def confirm_revoke(ctx: Context, api_url: str, key_id: str) -> bool:
    """Ask the person at the terminal before revoking a key that holds credit, or may (the key list
    failed: a leaked key must stay revocable); "not revoked" unless they say yes. True when the list
    settled what is lost (the amount was in the question, or there is none)."""
    try:
        listed = next((key for key in list_keys(ctx, api_url) if str(key.get("id")) == key_id), None)
    except CliError as error:
        question = (f"{sanitize(key_id)}: its credit could not be checked ({redact(error.message)}); any credit "
                    "on it is lost with the key. Revoke it?")
        settled = False
    else:
        if listed is None:  # not the account's (the revoke says so), or new since the list
            return False
        credit = listed.get("balance_usd") if listed.get("status") == "active" else None
        if not has_credit(credit):
            return True
        question = (f"{sanitize(key_id)} ({show(listed.get('name'))}) holds {usd(credit)} of credit, lost with "
                    "the key. Revoke it?")
        settled = True
    if not confirm(ctx, question):
        raise CliError("not revoked", code="cancelled")
    return settled


def confirm(ctx: Context, question: str) -> bool:
    """Ask the person at the terminal; only a yes goes ahead."""
    ctx.stderr.write(f"{question} [y/N] ")
    ctx.stderr.flush()
    answer = ctx.stdin.readline(100) if ctx.stdin is not None else b""
    if not answer.endswith(b"\n"):  # end of input (Ctrl-D): what follows starts on a line of its own
        note(ctx, "")
    return answer.strip().lower() in (b"y", b"yes")


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
    """Whether the gateway's amount (a decimal string, or a JSON number) is the one asked for."""
    from decimal import Decimal

    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
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
    note(ctx, f"Credit is per key: once paid, `{runnable(ctx, 'tokenroute keys list')}` shows which key holds it.")
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
    """`env --write`: set the variables in a dotenv file in place, once each.

    The file stays what it was: its mode, owner and group (`sudo tokenroute
    env --write` on an app's file), or nothing changes at all.
    """
    if args.export or args.shell != "dotenv":
        raise CliError("--write writes dotenv lines: leave out --export and --shell", code="usage")
    descriptor = open_file_alias(args.write)
    if descriptor is not None:
        via = "" if descriptor == os.path.abspath(args.write) else f" (through {descriptor})"
        raise CliError(f"{args.write} names a file a process holds open{via}, not a file to update; "
                       "give the file's own path")
    path = os.path.realpath(args.write)  # a symlinked .env is updated at its target
    old, status = read_env_file(args.write, path)
    new, changes = updated_env_file(args.write, old or b"", variables)
    # A signal waits until the file is replaced and that is said: a copy beside it, or a key
    # file git would commit without the warning, is worse than a second's delay.
    with SignalsHeld(ctx, f"with {args.write} first: no copy of it is left beside it, and git's check is said"):
        if new != old:
            replace_env_file(args, path, new, status)
        if args.json:
            render_json(ctx, {"path": os.path.abspath(args.write), "created": old is None, "changed": new != old})
        elif old is None:
            private = " (readable only by you)" if os.name == "posix" else ""  # Windows: the folder's ACL decides
            note(ctx, f"Created {args.write}{private} with {' and '.join(variables)}")
        elif new != old:
            note(ctx, f"Updated {args.write}: {', '.join(changes) or 'final newline added'}")
        else:
            note(ctx, f"{args.write} already has {' and '.join(variables)}; unchanged")
        kept = [name for name, value in variables.items() if ctx.env.get(name, value) != value]
        if kept:  # load_dotenv()'s override=False, and node's rule
            warn(ctx, f"{' and '.join(kept)} {'is' if len(kept) == 1 else 'are'} also set in this environment, and "
                      "node --env-file and python-dotenv's load_dotenv() keep that over the file's; unset it, "
                      f"or use `{runnable(ctx, 'tokenroute run')}`")
        warn_if_committable(ctx, path, shown=path if os.path.islink(args.write) else args.write)
    return EXIT_OK


def replace_env_file(args: argparse.Namespace, path: str, new: bytes, status: os.stat_result | None) -> None:
    """Replace the file whole: a new one is private; an existing one keeps its mode, owner and group."""
    if status is not None:
        check_replaceable(args.write, path, status)
    keep = None if status is None or not hasattr(os, "fchown") else (status.st_uid, status.st_gid)
    try:
        replace_file(path, new, mode=0o600 if status is None else status.st_mode & 0o7777, owner=keep)
    except OwnerNotKept:
        raise CliError(owner_not_kept(args.write, status)) from None
    except OSError as exc:
        import errno
        import shlex

        folder = os.path.dirname(path)
        if exc.errno == errno.EBUSY:
            why = " (it is a mount point: edit it where it is mounted from)"
        elif exc.errno in (errno.EACCES, errno.EPERM) and status is not None and not is_writable(folder):
            file = shlex.quote(args.write)
            why = (f" in {folder}, which must take the new file that replaces it whole (so that a crash never "
                   f"leaves it half-written); the same command with `>> {file}` in place of `--write {file}` "
                   "appends instead")
        else:
            why = ""
        raise CliError(f"cannot write {args.write}: {exc.strerror}{why}") from None


def open_file_alias(shown: str) -> str | None:
    """The name on the way from `shown` through its symlinks that stands for a process's open file
    (/dev/stdout, /dev/fd/N, /proc/PID/fd/N), if any: `--write /dev/stdout >> out.log` must not
    replace out.log under the shell that holds it open."""
    import re

    path = os.path.abspath(shown)
    for _ in range(40):  # the kernel's limit on symlinks followed
        if re.match(r"/dev/(?:std(?:in|out|err)$|fd/)|/proc/[^/]+/(?:task/[^/]+/)?fd/", path):
            return path
        try:
            target = os.readlink(path)
        except OSError:  # no symlink (or none there)
            return None
        path = os.path.normpath(os.path.join(os.path.dirname(path), target))
    return None


MAX_DOTENV_BYTES = 1024 * 1024  # a bigger file is no dotenv file (reading 100 MB took 17 s and 510 MB)


def read_env_file(shown: str, path: str) -> tuple[bytes | None, os.stat_result | None]:
    """The bytes and status of the file `shown` names (at `path`, its real path); None, None when absent.

    Anything but a regular file is refused before it is opened: a FIFO would
    block (or stream a writer's data into a file put in its place), a device
    such as /dev/stdout would read the terminal. O_NONBLOCK and the check of
    what was opened keep a FIFO swapped in meanwhile from blocking or being read.
    """
    import stat

    try:
        before = os.stat(shown)  # follows symlinks, /dev/stdout's to a pipe or a terminal included
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        raise CliError(f"cannot read {shown}: {exc.strerror}") from None
    if not stat.S_ISREG(before.st_mode):
        raise CliError(f"{shown} is not a regular file; --write updates a file (or a symlink to one)")
    replaced = CliError(f"{shown} was replaced while it was read; run this again")
    too_big = CliError(f"{shown} is over 1 MB: not a dotenv file")
    if before.st_size > MAX_DOTENV_BYTES:
        raise too_big
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
    try:
        with os.fdopen(os.open(path, flags), "rb") as handle:
            status = os.fstat(handle.fileno())
            # An inode number is reused at once (ext4): what was opened must be a regular file too.
            if not stat.S_ISREG(status.st_mode) or (status.st_dev, status.st_ino) != (before.st_dev, before.st_ino):
                raise replaced
            text = handle.read(MAX_DOTENV_BYTES + 1)
    except FileNotFoundError:  # there a moment ago
        raise replaced from None
    except OSError as exc:
        raise CliError(f"cannot read {shown}: {exc.strerror}") from None
    if len(text) > MAX_DOTENV_BYTES:
        raise too_big
    return text, status


def check_replaceable(shown: str, path: str, status: os.stat_result) -> None:
    """Refuse what replacing the file by a new one would lose: the other names of a hard-linked
    file would keep the old key, and extended attributes (an ACL among them) stay with the old
    file. SELinux gives the new file its folder's label, as to every file an editor saves by rename."""
    if status.st_nlink > 1:
        raise CliError(f"{shown} has {status.st_nlink} hard links: replacing it would leave the old key under "
                       "its other names; remove the other links (or edit the file by hand), then run this again")
    try:
        names = os.listxattr(path) if hasattr(os, "listxattr") else []
    except OSError:  # a file system without extended attributes
        names = []
    lost = [name for name in names if name != "security.selinux"]
    if lost:
        raise CliError(f"{shown} has extended attributes ({sanitize(', '.join(lost))}) that replacing it would "
                       "lose (an ACL among them is one); edit the file by hand, or remove them and run this again")


def updated_env_file(shown: str, text: bytes, variables: dict[str, str]) -> tuple[bytes, list[str]]:
    """`text` with the variables set, and OPENAI_API_BASE where the file sets it (LangChain reads it
    before OPENAI_BASE_URL); refused where python-dotenv and node would not read them alike."""
    if text.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise CliError(f"{shown} is UTF-16 (PowerShell 5.1's >> writes that); save it as UTF-8 first")
    if any(dotenv_name(entry) == "OPENAI_API_BASE" for entry in dotenv_entries(text.removeprefix(BOM))):
        variables = {**variables, "OPENAI_API_BASE": variables["OPENAI_BASE_URL"]}
    new, changes = set_dotenv_values(text, variables)
    line = ambiguous_line(new, variables)
    if line is None:
        return new, changes
    if b"=" not in new.split(b"\n")[line - 1]:
        raise CliError(f"node --env-file reads line {line} of {shown}, which has no `=`, into the name of the "
                       "variable after it; make that line a comment (`#` first) or remove it, then run this again")
    raise CliError(f"python-dotenv and node --env-file read line {line} of {shown} differently (a quoted value one "
                   "of them ends elsewhere); fix that line so that both read it alike, then run this again")


def owner_not_kept(shown: str, status: os.stat_result) -> str:
    """Why a new file cannot have the old one's owner and group: `app:www-data`, numbers where
    the names are unknown."""
    import grp
    import pwd

    try:
        user = pwd.getpwuid(status.st_uid).pw_name
    except KeyError:
        user = str(status.st_uid)
    try:
        group = grp.getgrgid(status.st_gid).gr_name
    except KeyError:
        group = str(status.st_gid)
    if status.st_uid == os.geteuid():  # the file is ours: only its group cannot be given
        return (f"cannot update {shown} and keep its group: its group {group} is not one of yours; "
                "run this as root, or as a member of that group; the file is unchanged")
    return (f"cannot update {shown} and keep its owner and group ({user}:{group}): "
            "run this as its owner, or as root; the file is unchanged")


def set_dotenv_values(text: bytes, variables: dict[str, str]) -> tuple[bytes, list[str]]:
    """`text` with each variable set once, where it first was; every other line byte for byte,
    except what would make node --env-file (20) read the file otherwise than python-dotenv.

    Works on bytes so that any encoding, CRLF ending, quoting and comment
    outside the variables' own lines survives. A UTF-8 byte-order mark goes
    (node reads it as part of the first line), and so does the indentation
    of a blank or comment line right above a variable's (node reads such a
    line into the next name); a variable's own line keeps only spaces before
    it (node reads a tab as part of the name).
    Returns the new text and what changed, for people.
    """
    changes = ["byte-order mark removed (node --env-file reads it as part of the first line)"] if text.startswith(
        BOM) else []
    lines = dotenv_entries(text.removeprefix(BOM))
    eol = b"\r\n" if lines and lines[0].endswith(b"\r\n") else b"\n"
    if lines and not lines[-1].endswith(b"\n"):
        lines[-1] += eol
    ours = []
    for name, value in variables.items():
        at = [number for number, line in enumerate(lines) if dotenv_name(line) == name]
        if not at:
            lines.append(f"{name}={value}".encode() + eol)
            ours.append(lines[-1])
            changes.append(f"{name} added")
            continue
        first = lines[at[0]]
        prefix = first[: len(first) - len(first.lstrip(b" "))]
        if first.lstrip().startswith(b"export"):
            prefix += b"export "
        ending = b"\r\n" if first.endswith(b"\r\n") else b"\n"
        lines[at[0]] = prefix + f"{name}={value}".encode() + ending
        ours.append(lines[at[0]])
        if lines[at[0]] != first:
            changes.append(f"{name} replaced")
        for number in reversed(at[1:]):
            del lines[number]
        if len(at) > 1:
            changes.append(f"{len(at) - 1} older {name} removed")
    dedented = []
    for number, line in enumerate(lines):
        above = number - 1
        while line in ours and above >= 0 and lines[above].lstrip(b" \t").startswith((b"#", b"\r", b"\n")):
            if lines[above][:1] in (b" ", b"\t"):
                lines[above] = lines[above].lstrip(b" \t")
                dedented.append(str(above + 1))
            above -= 1
    if dedented:
        changes.append(f"indentation of line{'s' * (len(dedented) > 1)} {', '.join(sorted(dedented, key=int))} "
                       "removed (node --env-file reads such a line into the next name)")
    return b"".join(lines), changes


BOM = b"\xef\xbb\xbf"  # UTF-8's byte-order mark, which Windows editors put first
# The start of a python-dotenv (1.2.3+) entry, as far as it runs over lines: a name in
# single quotes, and a quoted value, where a backslash escapes any character, so that
# "C:\\data\\" ends at its last quote.
DOTENV_ENTRY = (rb"[^\S\r\n]*(?:export[^\S\r\n]+)?(?:'[^']+'|[^=#\s]+)[^\S\r\n]*"
                rb"""(?:=[^\S\r\n]*(?:'(?:\\.|[^'\\])*'|"(?:\\.|[^"\\])*")?)?""")


def dotenv_entries(text: bytes) -> list[bytes]:
    """The file's lines as python-dotenv reads them, except that a quoted name or value spanning
    lines stays one entry with its lines.

    A reader takes `CERT="...` up to the closing quote, so an `OPENAI_API_KEY=`
    line inside it is part of CERT, not a variable. A quote that never closes
    makes nothing span lines.
    """
    import re

    line = re.compile(rb"[^\r\n]*(?:\r\n|\r|\n)?")
    entry = re.compile(DOTENV_ENTRY, re.DOTALL)
    entries: list[bytes] = []
    start = 0
    while start < len(text):
        end = line.match(text, start).end()
        reach = entry.match(text, start)
        if reach and reach.end() > end:
            end = line.match(text, reach.end()).end()
        entries.append(text[start:end])
        start = end
    return entries


def node_bindings(text: bytes) -> list[tuple[bytes, int, int]]:
    """The variables node --env-file (20) reads, as (name, first line, last line), lines counted from 0.

    Its parser (src/node_dotenv.cc) drops every CR, skips a line that starts
    with `#` or is empty, and takes everything else up to the next `=` as a
    name: a line without `=` (blank but for spaces, an indented comment, a
    lone word, a byte-order mark before a `#`) runs into the next line's
    name. A value in quotes ('' "" ``) runs to the same quote, over lines.
    """
    content = text.replace(b"\r", b"")
    end = len(content)
    at = end - len(content.lstrip(b" "))
    line = 0
    found = []
    while at < end:
        if content[at] in b"\n#":
            stop = content.find(b"\n", at)
            if stop >= 0:
                line, at = line + 1, stop + 1
                continue
        equals = content.find(b"=", at)
        name = content[at:equals].strip(b" ")
        if equals < 0 or not name:
            break
        value = equals + 1
        while content[value:value + 1] == b" ":
            value += 1
        quote = content[value:value + 1]
        close = content.find(quote, value + 1) if quote in (b'"', b"'", b"`") else -1
        stop = content.find(b"\n", max(close, value))
        if stop < 0 and quote in (b'"', b"'", b"`") and close < 0:  # an unclosed last value: none, read on from it
            line, at = line + content.count(b"\n", at, value), value
            continue
        stop = end if stop < 0 else stop
        last = line + content.count(b"\n", at, stop)
        found.append((name[7:] if name.startswith(b"export ") else name, line, last))
        line, at = last, stop
    return found


def ambiguous_line(text: bytes, variables: dict[str, str]) -> int | None:
    """The first line where python-dotenv and node --env-file disagree on an entry of one of the
    variables (where it starts or ends, or what runs into it), None when they agree."""
    names = {name.encode() for name in variables}
    python: list[tuple[bytes | None, int, int]] = []
    line = 0
    for entry in dotenv_entries(text):
        name = dotenv_name(entry)
        python.append((name and name.encode(), line, line + entry.count(b"\n", 0, len(entry) - 1)))
        line += entry.count(b"\n")
    node = node_bindings(text)

    def read(entries: Sequence[tuple[bytes | None, int, int]],
             other: Sequence[tuple[bytes | None, int, int]]) -> set[tuple[bytes | None, int, int]]:
        """A reader's entries (name, first line, last line) of the variables, and any that covers
        one of the other reader's."""
        theirs = [entry for entry in other if entry[0] in names]
        return {(name, first, last) for name, first, last in entries
                if name in names or any(first <= end and start <= last for _, start, end in theirs)}

    differ = read(python, node) ^ read(node, python)
    return min(first for _, first, _ in differ) + 1 if differ else None


def dotenv_name(line: bytes) -> str | None:
    """The variable a dotenv line sets as python-dotenv reads it (`NAME=`, `export NAME=`, `NAME =`,
    `'NAME'=`, and a bare `NAME`, which sets it to nothing), or None."""
    import re

    match = re.match(rb"\s*(?:export[^\S\r\n]+)?(?:'([^']+)'|([^=#\s]+))[^\S\r\n]*(?:[=#\r\n]|\Z)", line)
    try:
        return (match.group(1) or match.group(2)).decode("ascii") if match else None
    except UnicodeDecodeError:
        return None


# What makes git look at another repository than the file's own folder's; git itself drops
# them when it runs in another repository (`git rev-parse --local-env-vars`).
GIT_REPOSITORY_SETTINGS = frozenset((
    "GIT_ALTERNATE_OBJECT_DIRECTORIES", "GIT_CONFIG", "GIT_CONFIG_PARAMETERS", "GIT_CONFIG_COUNT",
    "GIT_OBJECT_DIRECTORY", "GIT_DIR", "GIT_WORK_TREE", "GIT_IMPLICIT_WORK_TREE", "GIT_GRAFT_FILE", "GIT_INDEX_FILE",
    "GIT_NO_REPLACE_OBJECTS", "GIT_REPLACE_REF_BASE", "GIT_PREFIX", "GIT_INTERNAL_SUPER_PREFIX", "GIT_SHALLOW_FILE",
    "GIT_COMMON_DIR",
))


def warn_if_committable(ctx: Context, path: str, *, shown: str) -> None:
    """Warn when git tracks the file or would take it in `git add .`, or cannot tell in a work
    tree (a repository of another owner under sudo, a broken .git); silent without git.

    The folder may be anyone's clone, and its configuration could run a command
    (core.fsmonitor) that reads the key just written: git runs with it off
    (ls-files and check-ignore only read the index, so no hook runs), and never
    as a `git` found in the current folder (a relative PATH entry, or Windows'
    Python before 3.12, which looks there first).
    """
    import shutil
    import subprocess

    git = shutil.which("git", path=ctx.env.get("PATH"))
    if git is None or not os.path.isabs(git):
        return
    folder, name = os.path.split(path)
    env = {key: value for key, value in ctx.env.items() if key not in GIT_REPOSITORY_SETTINGS}

    def status(*words: str) -> tuple[int | None, str]:
        try:
            done = subprocess.run([git, "-c", "core.fsmonitor=", *words, "--", name], cwd=folder or ".", env=env,
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None, ""
        said = done.stderr.decode(errors="replace").strip().splitlines()
        return done.returncode, said[0] if said else ""

    # check-ignore says "not ignored" for any tracked file, whatever .gitignore lists.
    tracked, reason = status("ls-files", "--error-unmatch")
    ignored, why = status("check-ignore", "-q") if tracked == 1 else (None, "")
    # Timed out (None), or stopped by a signal (a negative status): git did not answer.
    stopped = tracked is None or tracked < 0 or (tracked == 1 and (ignored is None or ignored < 0))
    if tracked == 0:
        ignore = "" if status("check-ignore", "--no-index", "-q")[0] == 0 else " and add it to .gitignore"
        untrack = f"git rm --cached {shell_word(shown)}"
        warn(ctx, f"{shown} holds an API key and git tracks it; untrack it with `{untrack}`{ignore}")
    elif tracked == 1 and ignored == 1:  # in a work tree and not ignored
        warn(ctx, f"{shown} holds an API key and git does not ignore it; add it to .gitignore")
    elif (tracked == 128 or stopped) and in_git_folder(folder):  # git did not answer for a work tree it finds
        said = sanitize((why if tracked == 1 else reason).removeprefix("fatal: ")) or "no answer"
        warn(ctx, f"could not check whether git tracks {shown} (git: {said}); make sure it is not committed")


def in_git_folder(folder: str) -> bool:
    """Whether `folder` or one above it holds a .git, as a work tree's top does."""
    folder = os.path.abspath(folder)
    while True:
        if os.path.exists(os.path.join(folder, ".git")):
            return True
        if os.path.dirname(folder) == folder:
            return False
        folder = os.path.dirname(folder)


def cmd_run(args: argparse.Namespace, ctx: Context) -> int:
    """Run a command with the two variables in its environment: no key in a file."""
    api_url, _ = api_url_setting(ctx, args.api_url)
    env = child_environment(ctx.env, env_values(ctx, api_url, key=args.key))
    for stream in (ctx.stdout, ctx.stderr):
        if stream is not None:  # None: started with the stream closed
            stream.flush()  # what is buffered here would be lost in the exec
    if os.name == "posix":
        replace_process(args.command, env)
    return run_and_wait(args.command, env)


def child_environment(env: Mapping[str, str], variables: dict[str, str]) -> dict[str, str]:
    """`run`'s child environment: the caller's, where the gateway's key and URL win under every name
    an OpenAI client reads them by, so that no client bypasses the gateway or sends it another key.

    openai<1, LangChain and LiteLLM read the URL as OPENAI_API_BASE (LangChain before
    OPENAI_BASE_URL); openai<1 reads a key from the file OPENAI_API_KEY_PATH names
    before OPENAI_API_KEY.
    """
    child = {name: value for name, value in env.items() if name != "OPENAI_API_KEY_PATH"}
    child.update(variables, OPENAI_API_BASE=variables["OPENAI_BASE_URL"])
    if "PATH" in child:
        child["PATH"] = without_own_bin(child["PATH"], env.get("VIRTUAL_ENV"))
    return child


def without_own_bin(path: str, virtual_env: str | None) -> str:
    """PATH for the child without the bin folder of tokenroute's own tool environment in front.

    `uvx tokenroute run -- python app.py`: uvx puts its tool environment's
    bin first, whose `python` lacks the user's packages. Only an environment
    a tool installer made for tokenroute alone is left out; the user's own
    virtualenv with tokenroute in it (activated, or `PATH=/app/.venv/bin:$PATH`
    as in uv's Docker guide) stays, and so does a Python that is no virtual
    environment.
    """
    folders = path.split(os.pathsep)
    if (len(folders) < 2 or not same_folder(folders[0], os.path.dirname(sys.executable))
            or same_folder(virtual_env or "", sys.prefix) or not is_tool_environment()):
        return path
    return os.pathsep.join(folders[1:])


def is_tool_environment() -> bool:
    """Whether this Python is a virtual environment made for one tool: by `uv tool install`
    (uv-receipt.toml), pipx (pipx_metadata.json), or uvx (an archive-vN/ID folder of uv's cache,
    which CACHEDIR.TAG marks; uv's environments-vN entries link there)."""
    import re

    if sys.prefix == sys.base_prefix:
        return False
    if any(os.path.isfile(os.path.join(sys.prefix, name)) for name in ("uv-receipt.toml", "pipx_metadata.json")):
        return True
    bucket = os.path.dirname(os.path.realpath(sys.prefix))
    return (re.fullmatch(r"archive-v[0-9]+", os.path.basename(bucket)) is not None
            and os.path.isfile(os.path.join(os.path.dirname(bucket), "CACHEDIR.TAG")))


def same_folder(one: str, other: str) -> bool:
    try:
        return os.path.samefile(one, other)  # two stat calls: realpath costs ~20 times more
    except (OSError, ValueError):  # absent, or "" (the current folder in PATH)
        return False


def replace_process(command: Sequence[str], env: dict[str, str]) -> None:
    """exec the command: no parent left to forward signals to or hold memory; returns only on failure.

    The program is looked up as a shell does: the first executable regular file
    of that name on PATH (a folder is no command). A file without `#!` is a
    shell script: it runs under /bin/sh, as execvp(3), every shell and `env`
    run it (Python's os.execvpe reports ENOEXEC instead).
    """
    import _signal  # builtin and already loaded: `signal` would import enum
    import errno

    program = find_program(command[0], env)
    if program is None:
        raise command_not_found(command[0])
    # Python ignores SIGPIPE and SIGXFSZ, and an exec keeps ignored signals:
    # `tokenroute run -- yes | head -1` must end `yes` as a shell would.
    ignored = [number for number in (getattr(_signal, "SIGPIPE", None), getattr(_signal, "SIGXFSZ", None))
               if number is not None and _signal.getsignal(number) == _signal.SIG_IGN]
    for number in ignored:
        _signal.signal(number, _signal.SIG_DFL)
    try:
        try:
            os.execve(program, list(command), env)
        except OSError as exc:
            if exc.errno != errno.ENOEXEC or is_binary(first_line(program)):
                raise
            os.execve("/bin/sh", ["/bin/sh", program, *command[1:]], env)
    except OSError as exc:
        for number in ignored:  # back as they were: reporting the failure must not die of a closed pipe
            _signal.signal(number, _signal.SIG_IGN)
        raise exec_error(command[0], exc, program) from None


def find_program(name: str, env: Mapping[str, str]) -> str | None:
    """The file a shell runs for `name`: `name` itself when it holds a slash, else the first
    executable regular file of that name on the child's PATH, else the first regular one (whose
    exec then reports why it cannot run); None when there is none."""
    if os.sep in name or (os.altsep and os.altsep in name):
        return name
    fallback = None
    for folder in env.get("PATH", os.defpath).split(os.pathsep):
        candidate = os.path.join(folder or ".", name)  # an empty entry is the current folder
        if os.path.isfile(candidate):
            if os.access(candidate, os.X_OK):
                return candidate
            fallback = fallback or candidate
    return fallback


def first_line(path: str) -> bytes:
    """The start of a file's first line (b"" when unreadable): what tells a script from a program."""
    try:
        with open(path, "rb") as handle:
            return handle.readline(256)
    except OSError:
        return b""


def is_binary(head: bytes) -> bool:
    """Whether a file whose first line starts with `head` holds a program for another machine, not
    a script: a NUL byte within its first 80, as bash decides before it would run a file as a script."""
    return b"\0" in head[:80]


def run_and_wait(command: Sequence[str], env: dict[str, str]) -> int:
    """Run the command as a child and return its status, a signal death as 128+N like a shell."""
    import shutil
    import subprocess

    # Windows finds `npm` (npm.cmd) and friends through PATHEXT only this way.
    program = shutil.which(command[0], path=env.get("PATH")) or command[0]
    try:
        child = subprocess.Popen([program, *command[1:]], env=env)
    except OSError as exc:
        raise exec_error(command[0], exc, program) from None
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


def command_not_found(program: str) -> CliError:
    return CliError(f"{sanitize(program)}: command not found", code="command_not_found", exit_code=EXIT_NOT_FOUND)


def exec_error(program: str, exc: OSError, found: str) -> CliError:
    """Why the file `found` for `program` could not be run, as a shell reports it."""
    import errno

    if not os.path.exists(found):
        return command_not_found(program)
    if os.path.isdir(found):
        reason = "Is a directory"
    elif exc.errno == errno.ENOENT:  # the file is there: what starts it is not
        interpreter = interpreter_of(first_line(found))
        reason = (f"its interpreter {sanitize(interpreter)} is missing" if interpreter
                  else f"{exc.strerror} (a program it needs to start, such as its loader, is missing)")
    else:
        reason = exc.strerror or exc.__class__.__name__
    return CliError(f"{sanitize(program)}: cannot run it: {reason}", code="command_not_executable",
                    exit_code=EXIT_NOT_EXECUTABLE)


def interpreter_of(head: bytes) -> str | None:
    """The program a script's `#!` line names, None for a file without one."""
    words = head[2:].split() if head.startswith(b"#!") else []
    return words[0].decode(errors="replace") if words else None


def try_chat(ctx: Context, api_url: str, *, model: str = DEFAULT_MODEL, key: str | None = None) -> dict[str, Any]:
    """`test`: one tiny chat completion, end to end."""
    if is_plausible_key(model.strip()):  # `tokenroute test sk-tr-...`: never sent as a model name, nor echoed
        raise CliError("the model is an API key: pass the key with --key (and the model, if any, as the word "
                       "or with --model)", code="usage")
    key, source = resolve_api_key(ctx, key, api_url)
    try:
        completion = call_api(
            ctx,
            "POST",
            api_url + "/v1/chat/completions",
            key=key,
            source=source,
            json_body={
                "model": model,
                "messages": [{"role": "user", "content": "Reply with the single word OK."}],
                "max_tokens": 5,
            },
        )
    except CliError as error:
        if error.status == 404 and error.code != "not_a_gateway":  # the model is unknown
            error.next = "tokenroute models"
        raise
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
    key, source = resolve_api_key(ctx, key, api_url)
    listing = call_api(ctx, "GET", api_url + "/v1/models", key=key, source=source)
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

    def __init__(
        self, name: str, status: str, detail: str, *, fix: str | None = None, exit_code: int = EXIT_OK,
        code: str | None = None,
    ) -> None:
        self.name = name
        self.status = status
        self.detail = detail
        self.fix = fix
        self.exit_code = exit_code
        self.code = code  # the error's code, for a problem

    @classmethod
    def failed(cls, name: str, error: CliError) -> Check:
        return cls(name, "problem", redact(error.message), fix=error.next, exit_code=error.exit_code, code=error.code)

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
        gateway = check_gateway(ctx, api_url, source)
        checks.append(gateway)
        if gateway.code != "not_a_gateway":  # no login or key to check where no gateway answers
            account = [check_login(ctx, api_url), check_api_key(ctx, args, api_url)]
            for check in account:  # a fix runs as written: `tokenroute login` gets the --api-url it needs
                check.fix = check.fix and runnable(ctx, check.fix)
            checks += account
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


def check_gateway(ctx: Context, api_url: str, source: str) -> Check:
    try:
        discover(ctx, api_url)
    except CliError as error:
        if error.status == 503:
            return Check("gateway", "warning", "reachable, but CLI login is not enabled on it")
        check = Check.failed("gateway", error)
        if error.code == "not_a_gateway":
            check.fix = gateway_url_fix(source, (error.payload or {}).get("suggested_api_url"))
        return check
    return Check("gateway", "ok", "reachable")


def gateway_url_fix(source: str, base: str | None) -> str:
    """How to point tokenroute at a gateway, from where the wrong URL came."""
    import shlex

    if base is None:
        return "set --api-url or TOKENROUTE_API_URL to your tokenroute gateway's URL"
    if source == "--api-url":
        return f"tokenroute --api-url {shlex.quote(base)} doctor"
    return f"export TOKENROUTE_API_URL={shlex.quote(base)}"


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
        call_api(ctx, "GET", api_url + "/v1/models", key=key, source=source)
    except CliError as error:
        return Check.failed("api key", error)
    return Check("api key", "ok", f"{redact(key)} from {source}, accepted by the gateway")


def check_files(ctx: Context) -> list[Check]:
    try:
        paths = [config_dir(ctx), credentials_path(ctx), keys_path(ctx), last_key_path(ctx), pending_login_path(ctx)]
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


def cmd_version(args: argparse.Namespace | Args, ctx: Context) -> int:
    """`version`: the version, as text or (--json) `{"version": ...}`."""
    if args.json:
        render_json(ctx, {"version": __version__})
        return EXIT_OK
    return print_version(args, ctx)


def print_version(args: argparse.Namespace | Args, ctx: Context) -> int:
    """`--version`: always the text argparse's --version prints, whatever TOKENROUTE_JSON says."""
    ctx.stdout.write(f"tokenroute {__version__}\n")
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


# ------------------------------------------------------------------- api ---
# `tokenroute api PATH`: any endpoint of the gateway in use, with the credential
# its path takes (the login for /api/..., the API key for /v1/..., none elsewhere),
# the answer printed as it arrives. Not an MCP tool: an arbitrary call is no tool for a model.

API_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")
OWN_HEADERS = ("authorization", "proxy-authorization", "host", "content-length", "transfer-encoding", "connection")
SECRET_HEADERS = ("authorization", "proxy-authorization", "cookie", "set-cookie")
HEADER_NAME_SIGNS = "!#$%&'*+-.^_`|~"  # with letters and digits, RFC 9110's token characters
HEADER_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789" + HEADER_NAME_SIGNS)


def gateway_path(api_url: str, target: str) -> str:
    """TARGET (a path, or a URL of this gateway) as the path and query to send there; another
    host, and a path that may reach another place than it reads, are refused."""
    from urllib.parse import unquote

    if not target.strip():
        raise CliError("PATH is empty: give the path on the gateway, like /v1/models", code="usage")
    scheme, sep, rest = target.partition("://")
    if sep and scheme.isascii() and scheme.isalpha():  # not "/path?next=https://..."
        authority, _, path = rest.partition("/")
        if "@" in authority:  # never echoed: the part before @ may be a password
            raise CliError("the URL must not hold a user name or password; remove the part up to @")
        prefix = api_url.partition("://")[2].partition("/")[2]
        path, prefix = "/" + path, "/" + prefix if prefix else ""
        origin = api_url[: len(api_url) - len(prefix)]
        if canonical_url(f"{scheme}://{authority}") != origin or not path.startswith(prefix + "/"):
            raise CliError(f"{sanitize(target)} is not on the gateway in use ({api_url}): tokenroute api sends "
                           "requests only there (choose the gateway with --api-url)")
        target = path[len(prefix):]
    path = target if target.startswith("/") else "/" + target
    decoded = unquote(path.partition("?")[0])
    plain = path.isascii() and path.isprintable() and not any(c in path for c in " \\#") and decoded.isprintable()
    if not plain or decoded.startswith("//") or "\\" in decoded or {".", ".."} & set(decoded.split("/")):
        raise CliError(f"{sanitize(target)!r} is not a plain path on the gateway, like /v1/models: no // at its start, "
                       "no . or .. segments, backslashes, spaces, # or control characters (percent-encode others)")
    return path


def path_credential(path: str) -> str | None:
    """The credential a path takes, as the gateway routes it: "login" for /api/..., "key" for /v1/..., else None."""
    from urllib.parse import unquote

    where = unquote(path.partition("?")[0]) + "/"
    return next((name for top, name in (("/api/", "login"), ("/v1/", "key")) if where.startswith(top)), None)


def api_fields(raw: Sequence[str], typed: Sequence[str]) -> list[tuple[str, str, object]]:
    """-f and -F as (name, text, JSON value): -F takes numbers, true, false, null, arrays and objects as such."""
    import json

    fields: list[tuple[str, str, object]] = []
    for flag, word in [("-f", word) for word in raw] + [("-F", word) for word in typed]:
        name, equals, text = word.partition("=")
        problem = None
        if not equals or not name:
            problem = "give NAME=VALUE"
        elif "[" in name:
            problem = "no nested names: give the whole value as JSON with -F"
        elif any(name == other for other, _, _ in fields):
            problem = "given twice"
        elif flag == "-F" and text.startswith("@"):  # gh reads a file there: never an upload by surprise
            problem = "-F reads no file: send one with --input FILE, a string starting with @ with -f"
        if problem:
            raise CliError(f"{flag} {sanitize(word)!r}: {problem}", code="usage")
        value: object = text
        if flag == "-F":
            try:
                value = json.loads(text, parse_constant=reject_constant)
            except json.JSONDecodeError:
                pass  # not JSON: the text
            except (ValueError, RecursionError):  # more than 4300 digits, or nested past the stack
                raise CliError(f"-F {sanitize(name)}: JSON too large or too deep to send", code="usage") from None
        fields.append((name, text, text if isinstance(value, str) else value))
    return fields


class ApiRequest:
    """What `api` sends: a body from --input is read only when the credential is known to be there."""

    def __init__(
        self, method: str, path: str, headers: dict[str, str], *, body: bytes | None, input: str | None
    ) -> None:
        self.method, self.path, self.headers = method, path, headers
        self.body, self.input = body, input  # the fields' JSON; or the file (- for stdin) to send instead
        self.credential = path_credential(path)


def api_request(args: argparse.Namespace, api_url: str) -> ApiRequest:
    """The request as gh api makes it: with a body and no -X, POST; fields in a JSON object, or in
    the query string with GET, HEAD or --input."""
    import json

    path = gateway_path(api_url, args.path)
    fields = api_fields(args.raw_field or (), args.field or ())
    headers = {"User-Agent": f"tokenroute/{__version__}", "Accept": "*/*"}
    for line in args.header or ():
        name, value = request_header(line)
        headers = {other: v for other, v in headers.items() if other.lower() != name.lower()}  # -H replaces a default
        headers[name] = value
    method = args.method or ("POST" if fields or args.input is not None else "GET")
    body = None
    if fields and (args.input is not None or method in ("GET", "HEAD")):
        from urllib.parse import urlencode

        path += ("&" if "?" in path else "?") + urlencode([(name, text) for name, text, _ in fields])
    elif fields:
        try:
            body = json.dumps({name: value for name, _, value in fields}, allow_nan=False).encode()
        except ValueError:
            raise CliError("a -F number is too large for JSON", code="usage") from None
    if (body is not None or args.input is not None) and not any(name.lower() == "content-type" for name in headers):
        headers["Content-Type"] = "application/json"
    return ApiRequest(method, path, headers, body=body, input=args.input)


def request_header(line: str) -> tuple[str, str]:
    """-H 'Name: value' as a name and a value, or what is wrong with it."""
    name, colon, value = (part.strip() for part in line.partition(":"))
    problem = None
    if not colon or not name:
        problem = "give 'Name: value'"
    elif not set(name) <= HEADER_NAME_CHARS:
        problem = f"{name!r} is not a header name: use letters, digits and {HEADER_NAME_SIGNS}"
    elif not (value.isascii() and value.isprintable()):
        problem = "the value must be printable ASCII, without control characters"
    elif name.lower() in OWN_HEADERS:
        problem = "tokenroute sets it itself (the credential follows the path)"
    if problem:
        raise CliError(f"-H {line!r}: {problem}", code="usage")  # repr shows control characters
    return name, value


def read_body(ctx: Context, source: str) -> bytes:
    """--input: a file's bytes, or stdin's for `-`."""
    if source != "-":
        try:
            with open(source, "rb") as handle:
                return handle.read()
        except OSError as exc:
            raise CliError(f"cannot read {source}: {exc.strerror or exc.__class__.__name__}") from None
    if ctx.stdin is None:
        raise CliError("--input -: there is no standard input to read")
    if ctx.stdin_tty:
        note(ctx, f"reading the body from stdin (end with {'Ctrl-Z, Enter' if os.name == 'nt' else 'Ctrl-D'})")
    try:
        return ctx.stdin.read()
    except OSError as exc:
        raise CliError(f"--input -: cannot read the standard input: {describe(exc)}") from None


def call_gateway(
    ctx: Context, api_url: str, request: ApiRequest, *, key: str | None
) -> tuple[StreamedAnswer, str | None]:
    """The answer to `request` sent with the credential its path takes, and that credential.
    A missing credential is reported before a body is read (from stdin, maybe a person)."""
    if key is not None and request.credential != "key":
        raise CliError("--key is for /v1/... paths: an API key authorizes only those", code="usage")
    creds = require_credentials(ctx, api_url) if request.credential == "login" else None
    secret = resolve_api_key(ctx, key, api_url)[0] if request.credential == "key" else None
    body = read_body(ctx, request.input) if request.input is not None else request.body

    def send(token: str | None) -> StreamedAnswer:
        signed = request.headers if token is None else {**request.headers, "Authorization": f"Bearer {token}"}
        return send_streamed(ctx, request.method, api_url + request.path, data=body, headers=signed)

    if creds is None:
        return send(secret), secret
    return with_login(ctx, creds, send)


def cmd_api(args: argparse.Namespace, ctx: Context) -> int:
    """The answer as it arrives, and for a failure status the usual error after it."""
    api_url, _ = api_url_setting(ctx, args.api_url)
    request = api_request(args, api_url)
    answer, secret = call_gateway(ctx, api_url, request, key=args.key)
    write = answer_writer(ctx)
    with answer.handle:
        if args.include:
            write(answer_head(answer, secret).encode())
        body = print_answer(ctx, answer, write)
    if answer.status < 300 or answer.status == 304:  # 304: the copy the request named is current, no redirect
        return EXIT_OK
    response = Response(answer.status, answer.headers, body)
    if answer.status == 401 and request.credential is None:  # nothing was sent: no login or key to blame
        message = server_message(response.json()) or "HTTP 401"
        raise CliError(f"{message}; the path wants a credential, and tokenroute api sends one only to "
                       "/api/... (your login) and /v1/... (the API key)", code="unauthorized", status=401)
    raise error_from_response(response, account=request.credential == "login", secret=secret)


def print_answer(ctx: Context, answer: StreamedAnswer, write: Callable[[bytes], None]) -> bytes:
    """Writes the body as it arrives, except JSON at a terminal, indented once whole (as it came
    when it is not JSON or too large to hold). The start of the body, for a failure's message."""
    media_type = (answer.headers.get("Content-Type") or "").partition(";")[0].strip().lower()
    held = ctx.stdout_tty and media_type.endswith(("/json", "+json"))
    kept = bytearray()
    cut_short = None
    try:
        for chunk in answer.chunks():
            if len(kept) <= MAX_RESPONSE_BYTES:
                kept += chunk
            elif held:  # too large to hold: as it came, from its start
                write(bytes(kept))
                held = False
            if not held:
                write(chunk)
    except CliError as error:  # cut short: what came is shown before the error
        cut_short = error
    pretty = terminal_json(bytes(kept)) if held and cut_short is None else None
    if pretty is not None:
        ctx.stdout.write(pretty)
    else:
        if held:
            write(bytes(kept))
        write(b"")
    if cut_short is not None:
        raise cut_short
    return bytes(kept)


def answer_writer(ctx: Context) -> Callable[[bytes], None]:
    """Writes bytes to stdout at once: as they are to a pipe or file; to a terminal as text
    whose control characters are shown, not obeyed. b"" ends the text (and a terminal's line)."""
    import codecs

    binary = None if ctx.stdout_tty else getattr(ctx.stdout, "buffer", None)
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    line_ended = True

    def write(chunk: bytes) -> None:
        nonlocal line_ended
        if binary is not None:
            ctx.stdout.flush()
            binary.write(chunk)
            binary.flush()
            return
        text = decoder.decode(chunk, final=not chunk)
        if ctx.stdout_tty:  # lines and tabs kept, every other control character shown
            lines = text.replace("\r\n", "\n").split("\n")
            text = "\n".join("\t".join(map(sanitize, line.split("\t"))) for line in lines)
            text += "\n" if not chunk and not line_ended else ""
        line_ended = text.endswith("\n") if text else line_ended
        ctx.stdout.write(text)
        ctx.stdout.flush()

    return write


def terminal_json(body: bytes) -> str | None:
    """JSON indented for a terminal: text in any script as it reads, every character a terminal
    could obey (C0, C1, bidi controls, ...) escaped as JSON escapes it. None when not JSON."""
    import json

    try:
        text = json.dumps(json.loads(body.decode("utf-8")), indent=2, ensure_ascii=False, allow_nan=False)
    except (ValueError, RecursionError):  # not UTF-8, not JSON, NaN, absurd nesting: shown as it came
        return None
    lines = text.split("\n")  # json.dumps escapes the newlines of strings: these are its own
    return "\n".join(line if line.isprintable() else "".join(map(json_escape, line)) for line in lines) + "\n"


def json_escape(char: str) -> str:
    """`char` as it is when printable, else as a JSON \\u escape (a surrogate pair beyond U+FFFF)."""
    if char.isprintable():
        return char
    code = ord(char)
    if code > 0xFFFF:
        code -= 0x10000
        return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"
    return f"\\u{code:04x}"


def answer_head(answer: StreamedAnswer, secret: str | None) -> str:
    """--include: the status line and headers, those that carry credentials redacted."""
    version = "1.0" if answer.handle.version == 10 else "1.1"
    lines = [f"HTTP/{version} {answer.status} {server_text(answer.handle.reason or '', secret)}".rstrip()]
    for name, value in answer.headers.items():
        shown = "(redacted)" if name.lower() in SECRET_HEADERS else server_text(value, secret)
        lines.append(f"{server_text(name, secret)}: {shown}")
    return "\n".join(lines) + "\n\n"


def server_text(text: str, secret: str | None) -> str:
    """A reason phrase or header as the gateway sent it: hidden when it holds the credential."""
    return "(redacted)" if secret is not None and secret in text else sanitize(redact(text))


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
# A tool call's time runs from its arrival, as the host's does: no exchange starts after
# MCP_TIMEOUT (TOKENROUTE_TIMEOUT when less; login_finish: its wait, at most MCP_WAIT, when
# longer), and each exchange gets as long at most, so a whole call ends within 2 x MCP_TIMEOUT
# of its arrival (hosts give up after 60 s).
MCP_TIMEOUT = 20.0
MCP_WAIT = 20.0
MCP_LINE_LIMIT = 16 * 1024 * 1024  # a longer message is refused, not held in memory
MCP_NEXT_TOOLS = {
    "tokenroute login": "login_start",
    "tokenroute login --no-wait": "login_start",
    "tokenroute login --resume": "login_finish",
    "tokenroute keys list": "keys_list",
    "tokenroute keys create --name NAME": "keys_create",
    "tokenroute topup --amount 5": "topup",
}


def cmd_mcp(args: argparse.Namespace, ctx: Context) -> int:
    """Serve MCP on stdin/stdout until stdin closes; only protocol messages go to stdout."""
    tools = offered_tools(read_only=args.read_only, names=args.tools)
    if ctx.stdin_tty:
        note(ctx, "tokenroute mcp speaks MCP on stdin and stdout: add it to your MCP host (see the README).")
    if ctx.stdin is None:  # started without stdin (<&-): end of input at once
        return EXIT_OK
    McpServer(ctx, args.api_url, tools).serve(ctx.stdin)
    return EXIT_OK


def offered_tools(*, read_only: bool, names: Sequence[str] | None) -> dict[str, McpTool]:
    """Every tool; only those that change nothing and return no secret (`--read-only`); or
    only those named (`--tools`, each a comma-separated list)."""
    tools = mcp_tools()
    if names is not None:
        wanted = [name.strip() for given in names for name in given.split(",")]
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


def mcp_instructions(tools: Mapping[str, McpTool], api_url: str | None) -> str:
    """What a host tells the model of this server; it names only the tools offered, and the
    --api-url given (`api_url`) in the command it hands to a person."""
    sentences = [f"Tools for your tokenroute LLM gateway account: {', '.join(tools)}."]
    if "login_start" in tools and "login_finish" in tools:
        sentences.append("When a tool answers auth_required or session_expired, call login_start, show the user "
                         "its URL and code, then call login_finish with that user_code.")
    else:
        import shlex

        login = f"tokenroute --api-url {shlex.quote(api_url)} login" if api_url else "tokenroute login"
        sentences.append("When a tool answers auth_required or session_expired, ask the user to run "
                         f"`{login}` in a terminal, then try again.")
    if "topup" in tools:
        sentences.append("topup never pays: hand its checkout URL to the user.")
    secret = [name for name, tool in tools.items() if tool.secret]
    if secret:
        sentences.append(f"{' and '.join(secret)} return{'s' if len(secret) == 1 else ''} a secret API key.")
    return " ".join(sentences)


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
        self.secret = secret
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
        "next": {"type": "string", "description": "the tool to call next, or the tokenroute command a person runs"},
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
                 progress_token: str | int | None, arrived: float) -> None:
        import _thread

        self.id = request_id
        self.tool = tool
        self.arguments = arguments
        self.version = version
        self.progress_token = progress_token  # the client's, to send progress of a long wait with
        self.arrived = arrived  # when it was read (ctx.now() time): its time runs from here
        self.cancelled = False
        self.woken = _thread.allocate_lock()  # released by cancel(): ends a wait at once
        self.woken.acquire()
        self.ctx: Context | None = None  # the call's own, once it runs
        self.waiting = 0.0  # the wait's length from the arrival, for progress
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


class McpServer:
    """Answers MCP messages, one line in, at most one line out each; a failing tool never ends it."""

    def __init__(self, ctx: Context, api_url: str | None, tools: dict[str, McpTool]) -> None:
        import _thread

        self.ctx = ctx
        self.api_url = api_url  # the --api-url flag, resolved per call like any command's
        self.tools = tools
        self.instructions = mcp_instructions(tools, api_url)
        self.handshake_version: str | None = None
        self.login_code: str | None = None  # the user_code of the login this server started last
        self.lock = _thread.allocate_lock()  # held to write a line, and to touch the three below
        self.queue: list[McpCall | None] = []  # the calls read and not taken yet; None: the input ended
        self.unanswered: dict[str | int, McpCall] = {}
        self.output_error: Exception | None = None  # stdout failed: its reader left
        self.arrived = _thread.allocate_lock()  # released by the reader when it queues something
        self.arrived.acquire()

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
                if call is None:
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

    def receive(self, line: bytes | None) -> None:
        reply = self.handle(line)
        with self.lock:
            if not isinstance(reply, McpCall):
                if reply is not None:
                    self.write(reply)
                return
            if self.output_error is not None:  # nothing could reach the client any more
                return
            self.unanswered[reply.id] = reply
        self.enqueue(reply)

    def enqueue(self, call: McpCall | None) -> None:
        with self.lock:
            self.queue.append(call)
            if self.arrived.locked():  # only this thread releases it, so it stays locked until then
                self.arrived.release()

    def write(self, line: str) -> None:
        """One message, one line; the caller holds the lock. Once stdout fails, nothing can reach
        the client: every call not answered yet is cancelled."""
        if self.output_error is not None:
            return
        try:
            self.ctx.stdout.write(line + "\n")
            self.ctx.stdout.flush()
        except (OSError, ValueError) as error:  # the client left
            self.output_error = error
            for call in self.unanswered.values():
                call.cancel()

    def handle(self, line: bytes | None) -> str | McpCall | None:
        """The answer to one line (None: one longer than MCP_LINE_LIMIT), a tool call to run, or
        None (nothing to send)."""
        import json

        if line is None:
            return rpc_answer(None, error=McpError(-32600, f"Invalid Request: a message longer than "
                                                           f"{MCP_LINE_LIMIT // 1024 // 1024} MiB"))
        if not line.strip():
            return None
        try:
            message = json.loads(line.decode("utf-8"), parse_constant=reject_constant)
        except (UnicodeDecodeError, ValueError):
            return rpc_answer(None, error=McpError(-32700, "Parse error: not a JSON message in UTF-8"))
        except RecursionError:
            return rpc_answer(None, error=McpError(-32700, "Parse error: the message nests too deep"))
        request_id = message.get("id") if isinstance(message, dict) else None
        valid_id = is_request_id(request_id)
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
        with self.lock:  # only this (the reading) thread adds ids, so none is added before the call is queued
            in_use = request_id in self.unanswered
        if in_use:
            return rpc_answer(request_id, error=McpError(-32600, "Invalid Request: that id is in use"))
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
            call = self.unanswered.get(request_id) if is_request_id(request_id) else None
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
                "instructions": self.instructions,
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
                "instructions": self.instructions,
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
            raise McpError(-32602, f"Unknown tool: {name}{' (this server does not offer it)' if known else ''}")
        if not isinstance(arguments, (dict, type(None))):
            raise McpError(-32602, f"Invalid arguments for tool {name}: an object is required")
        meta = params.get("_meta")
        token = meta.get("progressToken") if isinstance(meta, dict) else None
        return McpCall(request_id, self.tools[name], arguments or {}, version, token if is_request_id(token) else None,
                       arrived=self.ctx.now())

    def run(self, call: McpCall) -> None:
        """Run a tool call on this (the main) thread and answer it, unless it was cancelled."""
        reply = None
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

        The call's time runs from its arrival (see MCP_TIMEOUT): once it is up no exchange
        starts (a call that spent it in the queue answers the timeout error, nothing sent), a
        read ends by it, and no wait outlasts it; a cancellation ends it, queued or running.
        """
        import io
        import json

        tool = call.tool
        # A call's diagnostics (notes, warnings) go to the server's stderr, never into a result on stdout.
        ctx = Context(env=self.ctx.env, stdout=io.StringIO(), stderr=self.ctx.stderr,
                      sleep=lambda seconds: self.pause(call, seconds), now=self.ctx.now)
        ctx.tls = self.ctx.tls  # one TLS context per process
        ctx.exchange_cap = MCP_TIMEOUT
        try:
            values = tool.values(call.arguments)
            seconds = exchange_timeout(ctx)
            if tool.wait is not None:  # a wait counts from the arrival too
                call.waiting = values.get(tool.wait, MCP_WAIT)
                values[tool.wait] = max(0.0, call.arrived + call.waiting - ctx.now())
                seconds = max(seconds, call.waiting)
            if tool.name == "login_finish" and values.get("user_code") is None:
                values["user_code"] = self.login_code  # the caller's own login, not another host's
            ctx.deadline = call.arrived + seconds
            call.ctx = ctx
            if call.cancelled:  # the one check before it runs; from here cancel() ends it through ctx
                raise McpCancelled
            call_timeout(ctx)  # its time ran out in the queue
            data = tool.run(ctx, self.api_url, values)
            if not tool.secret:  # a key or token in the gateway's answer is not passed on
                data = without_secrets(data)
            structured = self.name_tools(data) if isinstance(data, dict) else {"items": data}
            try:
                text = json_text(structured)
            except (ValueError, RecursionError):  # NaN or absurd nesting from the server
                raise server_error("the gateway's answer cannot be shown as JSON") from None
        except CliError as error:
            body = {"error": self.name_tools(error_body(ctx, error))}
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

    def name_tools(self, body: dict[str, Any]) -> dict[str, Any]:
        """`next` (a waiting login's too) names the tool that does what the CLI's hint does, when
        offered: an agent running `tokenroute login --resume` would finish the newest login
        waiting, not its own."""
        import re

        body = dict(body)
        hint = body.get("next")
        plain = re.sub(r"^tokenroute --api-url \S+", "tokenroute", hint) if isinstance(hint, str) else None
        tool = MCP_NEXT_TOOLS.get(plain) if plain else None
        if tool in self.tools:
            body["next"] = tool
        if isinstance(body.get("pending"), dict):
            body["pending"] = self.name_tools(body["pending"])
        return body

    def pause(self, call: McpCall, seconds: float) -> None:
        """A tool call's sleep: progress during a long wait; a cancellation ends it at once."""
        if seconds > 0 and call.tool.wait is not None and call.progress_token is not None and not call.cancelled:
            self.report_progress(call)
        self.ctx.wait(call.woken, seconds)
        if call.cancelled:
            raise McpCancelled

    def report_progress(self, call: McpCall) -> None:
        """How much of the wait has passed, of all of it (no wait goes on past its end)."""
        elapsed = round(min(self.ctx.now() - call.arrived, call.waiting), 1)
        if elapsed <= call.progress:
            return
        call.progress = elapsed
        import json

        params = {"progressToken": call.progress_token, "progress": elapsed, "total": call.waiting,
                  "message": "waiting for the user to approve the login"}
        with self.lock:
            self.write(json.dumps({"jsonrpc": "2.0", "method": "notifications/progress", "params": params}))


def is_request_id(value: object) -> bool:
    """A JSON-RPC id, or a progress token: a string or an integer, never a boolean."""
    return isinstance(value, (str, int)) and not isinstance(value, bool)


def input_lines(stdin: BinaryIO) -> Iterator[bytes | None]:
    """The lines of stdin; None for one longer than MCP_LINE_LIMIT, which is dropped as it comes.

    Read from its file descriptor where it has one: a thread waiting in the buffered reader's
    read holds its lock, and Python aborts at exit when another thread ends the process
    meanwhile (stdout failed, Ctrl-C). Each byte is looked at once, however long its line.
    """
    try:
        fd: int | None = stdin.fileno()
    except (AttributeError, OSError, ValueError):  # not a file: a test's bytes
        fd = None
    line = bytearray()
    too_long = False
    while True:
        chunk = os.read(fd, 65536) if fd is not None else stdin.read(65536)
        if not chunk:
            break
        start = 0
        while start < len(chunk):
            newline = chunk.find(b"\n", start)
            end = len(chunk) if newline == -1 else newline + 1
            if not too_long:
                line += chunk[start:end]
                if len(line) > MCP_LINE_LIMIT:
                    line, too_long = bytearray(), True
            if newline != -1:
                yield None if too_long else bytes(line)
                line, too_long = bytearray(), False
            start = end
    if line or too_long:
        yield None if too_long else bytes(line)


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
        cached = "not cached (no_cache)" if values.get("no_cache") else f"cached in {key_file(ctx, data['raw'])}"
        return f"The raw key is shown only this once; {cached}."
    return None


def mcp_server_info() -> dict[str, str]:
    return {"name": "tokenroute", "version": __version__}


def reject_constant(name: str) -> None:
    import json

    raise json.JSONDecodeError(f"{name} is not JSON", name, 0)


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
    """The arguments of one `add_argument` call; `word=True`: the value may come as the command's
    bare word instead (`keys create laptop`, as gh and fly take names), not as both."""
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
        option("--name", required=True, word=True, type=non_empty, help="a name to recognise the key by"),
        option("--no-cache", action="store_true", help="do not cache the raw key in last_key.txt"),
    ),
    Command("keys list", cmd_keys_list, "list your API keys", "tokenroute keys list"),
    Command(
        "keys revoke", cmd_keys_revoke, "revoke an API key", "tokenroute keys revoke key_123",
        option("id", type=non_empty, help="the key id (from keys list)"),
        option("--yes", action="store_true", help="do not ask, even when the key still holds credit"),
    ),
    Command("balance", cmd_balance, "show the credit across your active keys", "tokenroute balance --json"),
    Command(
        "topup", cmd_topup, "get a Stripe Checkout URL to add credit", "tokenroute topup --amount 5",
        option("--amount", required=True, word=True, type=parse_amount, metavar="USD", help="amount in USD, e.g. 5 or 12.50"),
        NO_BROWSER_OPTION,
    ),
    Command(
        "usage", cmd_usage, "show spend over the last N days", "tokenroute usage --days 7",
        option("--days", type=parse_days, default=30, word=True, metavar="N", help="1-365 (default 30)"),
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
        option("--model", default=DEFAULT_MODEL, word=True, type=non_empty, help=f"model id (default {DEFAULT_MODEL})"),
        KEY_OPTION,
    ),
    Command("models", cmd_models, "list available models with pricing", "tokenroute models --json", KEY_OPTION),
    Command(
        "doctor", cmd_doctor, "check that tokenroute works here", "tokenroute doctor --json", KEY_OPTION, aliases=["status"]
    ),
    Command(
        "api", cmd_api, "call any gateway endpoint with the right credential", "tokenroute api /api/v1/me",
        option("path", metavar="PATH", help="a path on the gateway, or its full URL: /api/... is sent with your "
               "login, /v1/... with your API key (--key), any other path with no credential"),
        option("-X", "--method", type=str.upper, choices=API_METHODS, metavar="METHOD",
               help="GET, or POST when there is a body"),
        option("-f", "--raw-field", action="append", metavar="NAME=VALUE", help="a string field of the JSON body"),
        option("-F", "--field", action="append", metavar="NAME=VALUE",
               help="a typed field: numbers, true, false, null, JSON arrays and objects as such"),
        option("--input", metavar="FILE", help="send FILE as the body (- for stdin); fields go in the query"),
        option("-H", "--header", action="append", metavar="'NAME: VALUE'", help="add a request header"),
        option("-i", "--include", action="store_true", help="print the status line and headers first"),
        KEY_OPTION,
    ),
    Command(
        "completion", cmd_completion, "print a shell completion script", "tokenroute completion bash > tokenroute.bash",
        option("shell", choices=("bash", "zsh", "fish")),
    ),
    Command(
        "mcp", cmd_mcp, "serve your account as MCP tools on stdin/stdout", "tokenroute mcp --read-only",
        option("--read-only", action="store_true", help="offer only the tools that change nothing and return no secret"),
        option("--tools", action="append", metavar="NAME,...",
               help="offer only these tools (comma-separated; repeat to add more)"),
    ),
    Command("version", cmd_version, "print the version", "tokenroute version"),
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
            if text is argparse.SUPPRESS:  # a bare word's default (`option(word=True)`): none was given
                return text
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
                target: Any = sub
                if settings.get("word"):  # `keys create laptop` as `--name laptop`; one of the two
                    # Required is checked by parse_args, after unknown arguments (`keys create -x`).
                    target = sub.add_mutually_exclusive_group()
                    settings = {name: value for name, value in settings.items() if name not in ("word", "required")}
                    target.add_argument(
                        dest_of(flags[0]), nargs="?", default=argparse.SUPPRESS, type=settings.get("type"),
                        metavar=settings.get("metavar") or dest_of(flags[0]).upper(), help=f"same as {flags[0]}",
                    )
                target.add_argument(*flags, **settings)
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
        return Args(func=print_version if words == ["--version"] else cmd_help, json=False, api_url=None)
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
    worded = [flag for flag, settings in options.items() if settings.get("word")]
    given = []
    stream = iter(rest[command.name.count(" ") + 1:])
    for word in stream:
        flag, equals, text = word.partition("=")
        if flag not in options and worded and not word.startswith("-"):
            flag, equals, text = worded[0], "=", word  # `topup 5`: --amount's bare word
            given.append("word")
        elif flag in worded:
            given.append("flag")
        settings = options.get(flag)
        if settings is None or given.count("word") > 1 or len(set(given)) > 1:
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
            value = settings.get("type", str)(text)
        except ValueError:
            return None
        append = settings.get("action") == "append"
        values[dest_of(flag)] = [*(values[dest_of(flag)] or []), value] if append else value
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
    as_json = env_flag(ctx.env.get("TOKENROUTE_JSON"))  # as --json: no help text in place of a command
    fast = parse_fast(argv) if argv or not as_json else None
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
        version = "; for the version, use --version" if {"-v", "-V"} & set(extras) else ""
        raise CliError(f"unrecognized argument{plural}: {' '.join(extras)}{version}", code="usage", usage=usage)
    if not hasattr(args, "func") and name in GROUPS and not (getattr(args, "json", False) or as_json):
        return Args(func=cmd_help_topic, topic=[name], json=False, api_url=None)  # `tokenroute keys`, as bare `tokenroute`
    if not hasattr(args, "func"):
        where = f"tokenroute {name}".strip()
        raise CliError(f"{where} needs a COMMAND (see `{where} -h`)", code="usage", usage=usage)
    command = next(command for command in COMMANDS if command.func is args.func)
    for flags, settings in command.options:
        if settings.get("word") and settings.get("required") and getattr(args, dest_of(flags[0])) is None:
            metavar = settings.get("metavar") or dest_of(flags[0]).upper()
            raise CliError(f"{name} needs {metavar} (or {flags[0]} {metavar})", code="usage", usage=usage)
    args.json = getattr(args, "json", False)
    args.api_url = getattr(args, "api_url", None)
    return args


# ------------------------------------------------------------------ main ---


def error_body(ctx: Context, error: CliError) -> dict[str, Any]:
    """The object of a `--json` error, and of an MCP tool's error result."""
    body: dict[str, Any] = {"code": error.code, "message": sanitize(redact(error.message)), "status": error.status}
    if error.next:
        body["next"] = runnable(ctx, error.next)
    body.update(error.payload or {})
    return body


def report(ctx: Context, error: CliError, *, as_json: bool) -> None:
    message = sanitize(redact(error.message))
    if as_json:
        import json

        text = json.dumps({"error": error_body(ctx, error)})
    else:
        hint = f"; run `{runnable(ctx, error.next)}`" if error.next else ""
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
