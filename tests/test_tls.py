"""HTTPS: one TLS context per process, a trust store that loads what it needs, and clear TLS errors.

The gateway serves https with a certificate of the test CA (tests/tls/). The
machine's trust store is what SSL_CERT_FILE and SSL_CERT_DIR name: the test
CA in the hashed directory, only in the bundle, or nowhere. The gateway counts
TLS handshakes, good and failed, so a test sees when the fallback to the full
store cost one more.
"""
from __future__ import annotations

import socket
import ssl
import threading
from typing import Any, Callable

import pytest
from conftest import TLS, Cli

import tokenroute

CA_IN_DIRECTORY = {"SSL_CERT_FILE": TLS.other_ca_file, "SSL_CERT_DIR": TLS.ca_dir}
CA_IN_BUNDLE_ONLY = {"SSL_CERT_FILE": TLS.ca_file, "SSL_CERT_DIR": TLS.other_ca_dir}
CA_NOWHERE = {"SSL_CERT_FILE": TLS.other_ca_file, "SSL_CERT_DIR": TLS.other_ca_dir}

UNKNOWN_CA = "is signed by an unknown certificate authority; behind a proxy with its own CA, set SSL_CERT_FILE"
EXPIRED = "has expired"
ANOTHER_HOST = "is for another host name: check the gateway URL"


@pytest.fixture
def tls_contexts(monkeypatch: pytest.MonkeyPatch) -> list[ssl.SSLContext]:
    """Every ssl.SSLContext made from here on, in any thread.

    `SSLContext.__new__` is a Python function in ssl.py that every context
    goes through however it is made (create_default_context, SSLContext(),
    a subclass); wrapping it records each one and changes nothing else, so
    the count cannot depend on how tokenroute caches. The gateway's server
    context was made before this fixture ran.
    """
    made: list[ssl.SSLContext] = []
    real_new = ssl.SSLContext.__new__

    def recording_new(cls: type, *args: Any, **kwargs: Any) -> ssl.SSLContext:
        context = real_new(cls, *args, **kwargs)
        made.append(context)
        return context

    monkeypatch.setattr(ssl.SSLContext, "__new__", staticmethod(recording_new))
    return made


@pytest.fixture
def api_key(tls_gateway: Any) -> str:
    """A raw key with $5.00 of credit on the TLS gateway."""
    return str(tls_gateway.add_key(name="seed", balance_usd="5.00")["raw"])


def approve_on_second_poll(cli: Cli) -> None:
    sleeps: list[None] = []

    def hook() -> None:
        sleeps.append(None)
        if len(sleeps) == 2:
            cli.gateway.approve()

    cli.clock.on_sleep.append(hook)


# ---------------------------------------------------------------- trust store


def test_a_ca_in_the_hashed_directory_verifies_on_the_first_handshake(tls_cli, api_key):
    result = tls_cli.run("models", "--key", api_key, "--json", env=CA_IN_DIRECTORY)

    assert result.code == 0, result
    assert [model["id"] for model in result.json()][0] == "openai/gpt-4o-mini"
    assert tls_cli.gateway.handshakes == {"ok": 1, "failed": 0}


def test_a_ca_only_in_the_bundle_verifies_after_one_more_handshake(tls_cli, api_key):
    result = tls_cli.run("models", "--key", api_key, "--json", env=CA_IN_BUNDLE_ONLY)

    assert result.code == 0, result
    assert len(result.json()) == 3
    assert tls_cli.gateway.handshakes == {"ok": 1, "failed": 1}


def test_after_the_fallback_the_rest_of_the_command_uses_the_full_store(tls_cli, api_key):
    tls_cli.login()

    result = tls_cli.run("doctor", env={**CA_IN_BUNDLE_ONLY, "TOKENROUTE_API_KEY": api_key})

    assert result.code == 0, result
    assert tls_cli.gateway.handshakes == {"ok": 3, "failed": 1}  # discovery, me, models: one fallback


def test_a_post_is_sent_once_across_the_fallback(tls_cli):
    tls_cli.login()

    result = tls_cli.run("keys", "create", "--name", "ci", "--json", env=CA_IN_BUNDLE_ONLY)

    assert result.code == 0, result
    assert result.json()["raw"].startswith("sk-tr-")
    assert [r.method for r in tls_cli.gateway.requests] == ["POST"]
    assert tls_cli.gateway.handshakes == {"ok": 1, "failed": 1}


def test_a_bundle_alone_is_loaded_at_once(tls_cli, api_key):
    # A corporate proxy's CA in SSL_CERT_FILE, no SSL_CERT_DIR: as today, no directory to try first.
    result = tls_cli.run("models", "--key", api_key, env={"SSL_CERT_FILE": TLS.ca_file, "SSL_CERT_DIR": ""})

    assert result.code == 0, result
    assert tls_cli.gateway.handshakes == {"ok": 1, "failed": 0}


def test_a_directory_without_hashed_names_keeps_the_default_store(tls_cli, api_key, tmp_path):
    plain = tmp_path / "certs"
    plain.mkdir()
    (plain / "ca.pem").write_bytes(open(TLS.ca_file, "rb").read())  # not under its hash: OpenSSL never finds it

    result = tls_cli.run("models", "--key", api_key, env={"SSL_CERT_FILE": TLS.ca_file, "SSL_CERT_DIR": str(plain)})

    assert result.code == 0, result
    assert tls_cli.gateway.handshakes == {"ok": 1, "failed": 0}  # bundle and directory loaded together


def test_a_missing_ssl_cert_file_is_reported_even_when_the_directory_would_do(tls_cli, api_key, tmp_path):
    env = {"SSL_CERT_FILE": str(tmp_path / "missing.pem"), "SSL_CERT_DIR": TLS.ca_dir}

    result = tls_cli.run("models", "--key", api_key, env=env)

    assert result.code == 2, result
    assert "cannot load the CA certificates named by SSL_CERT_FILE" in result.err
    assert tls_cli.gateway.handshakes == {"ok": 0, "failed": 0}


def test_an_unreadable_bundle_met_at_the_fallback_exits_2(tls_cli, api_key, tmp_path):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")

    result = tls_cli.run("models", "--key", api_key, "--json",
                         env={"SSL_CERT_FILE": str(garbage), "SSL_CERT_DIR": TLS.other_ca_dir})

    assert result.code == 2, result
    assert result.error()["code"] == "network"
    assert "cannot load the CA certificates named by SSL_CERT_FILE" in result.error()["message"]
    assert tls_cli.clock.sleeps == []  # not retried: the bundle stays unreadable


@pytest.mark.parametrize(
    "env",
    [{"SSL_CERT_FILE": TLS.other_ca_file, "SSL_CERT_DIR": TLS.ca_dir}, {"SSL_CERT_DIR": TLS.ca_dir}, {}],
    ids=["bundle-and-directory", "directory-alone", "platform-store"],
)
def test_the_context_verifies_exactly_as_the_default_does(env):
    context = tokenroute.TrustStore(env).context
    default = ssl.create_default_context()

    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is True
    assert context.verify_flags == default.verify_flags
    assert context.options == default.options
    assert context.minimum_version == default.minimum_version


def platform_paths(capath: str) -> ssl.DefaultVerifyPaths:
    """Verify paths of a platform whose own hashed directory is `capath` (and no bundle file)."""
    return ssl.DefaultVerifyPaths(None, capath, "SSL_CERT_FILE", "/nonexistent/cert.pem", "SSL_CERT_DIR", capath)


def verifies(trust: tokenroute.TrustStore, gateway: Any) -> bool:
    """Whether a handshake with `gateway` through `trust`'s context (as it is) succeeds."""
    import socket

    host, port = gateway.url.rsplit("/", 1)[-1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        try:
            trust.context.wrap_socket(sock, server_hostname=host).close()
        except ssl.SSLCertVerificationError:
            return False
    return True


def test_the_platform_directory_is_tried_first_when_no_variable_is_set(tls_gateway):
    trust = tokenroute.TrustStore({}, platform_paths(TLS.ca_dir))

    assert verifies(trust, tls_gateway)


@pytest.mark.parametrize(
    "env",
    [{"SSL_CERT_DIR": ""}, {"SSL_CERT_FILE": ""}, {"SSL_CERT_FILE": "", "SSL_CERT_DIR": ""},
     {"SSL_CERT_FILE": TLS.other_ca_file}, {"SSL_CERT_FILE": TLS.other_ca_file, "SSL_CERT_DIR": ""}],
    ids=["dir-empty", "file-empty", "both-empty", "file-alone", "file-and-empty-dir"],
)
def test_a_variable_set_even_empty_makes_the_context_as_before(tls_gateway, env):
    # OpenSSL reads SSL_CERT_DIR="" as "no directory", so the platform's directory (here holding
    # the test CA) is not part of the default store then. With any variable set, the context is
    # ssl.create_default_context(cafile=... or None, capath=... or None), as at 4b1b3ae, which
    # never looks at the platform's directory but through load_default_certs().
    trust = tokenroute.TrustStore(env, platform_paths(TLS.ca_dir))

    assert not verifies(trust, tls_gateway)
    assert trust.rest is None  # nothing held back for later: the whole store is loaded
    assert not trust.widen()


def test_the_trust_store_widens_at_most_once_per_process(tls_gateway, monkeypatch):
    # The certificate verifies against no store: each request fails, and only the first is worth
    # a second handshake with the whole store; the store holds all of it from then on.
    handshakes: list[ssl.SSLContext] = []  # counted here: the gateway counts on its own threads, later
    real_wrap = ssl.SSLContext.wrap_socket
    monkeypatch.setattr(ssl.SSLContext, "wrap_socket", lambda context, *args, **kwargs: (
        handshakes.append(context) or real_wrap(context, *args, **kwargs)))
    trust = tokenroute.TrustStore(CA_NOWHERE)
    opener = tokenroute.Opener(trust, None, "")

    for _ in range(3):
        with pytest.raises(tokenroute.CliError, match="unknown certificate authority"):
            opener.open("GET", tls_gateway.url + "/v1/models", None, {}, timeout=10)

    assert len([context for context in handshakes if context is trust.context]) == 4  # not the gateway's
    assert trust.rest is None and not trust.widen()


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("env", [CA_NOWHERE, {}], ids=["ssl-cert-variables", "platform-store"])
def test_a_ca_in_no_store_is_an_unknown_authority(tls_cli, api_key, env):
    for name in ("SSL_CERT_FILE", "SSL_CERT_DIR"):
        tls_cli.env.pop(name)  # {}: neither variable set, the platform's store (directory first)

    result = tls_cli.run("models", "--key", api_key, "--json", env=env)

    assert result.code == 2, result
    assert result.out == ""
    assert result.error()["code"] == "network"
    assert result.error()["message"] == f"the TLS certificate of 127.0.0.1 {UNKNOWN_CA} to its certificate bundle"
    assert tls_cli.gateway.requests == []


@pytest.mark.parametrize(
    "certificate, wanted",
    [("expired", f"error: the TLS certificate of 127.0.0.1 {EXPIRED} (or this machine's clock is wrong)\n"),
     ("other-host", f"error: the TLS certificate presented by 127.0.0.1 {ANOTHER_HOST}\n")],
)
def test_an_expired_or_wrong_host_certificate_says_which(make_tls_gateway, tmp_path, certificate, wanted):
    cli = Cli(make_tls_gateway(certificate), tmp_path)
    key = cli.gateway.add_key()["raw"]

    result = cli.run("models", "--key", key, env=TLS.trusted)

    assert (result.code, result.out, result.err) == (2, "", wanted)
    assert cli.gateway.requests == []


@pytest.mark.parametrize(
    "certificate, env, wanted",
    [("localhost", CA_NOWHERE, UNKNOWN_CA), ("expired", TLS.trusted, EXPIRED),
     ("other-host", TLS.trusted, ANOTHER_HOST)],
    ids=["unknown-ca", "expired", "another-host"],
)
def test_the_console_script_says_which_tls_problem_it_is(make_tls_gateway, tmp_path, certificate, env, wanted):
    gateway = make_tls_gateway(certificate)
    key = gateway.add_key()["raw"]

    # `test` is a POST, never retried: one attempt (and its fallback), no backoff sleeps.
    result = Cli(gateway, tmp_path).script("test", "--key", key, "--json", env=env)

    assert result.code == 2, result
    assert result.out == ""
    assert result.error()["code"] == "network"
    assert wanted in result.error()["message"]
    assert gateway.requests == []


def test_a_certificate_error_is_not_retried(tls_cli, api_key):
    # A GET is retried on network errors, but another handshake meets the same certificate.
    result = tls_cli.run("models", "--key", api_key, env=CA_NOWHERE)

    assert result.code == 2, result
    assert UNKNOWN_CA in result.err
    assert tls_cli.clock.sleeps == []  # no backoff: one attempt (and its one fallback)


def test_a_certificate_for_another_host_is_not_checked_again_with_the_full_store(make_tls_gateway):
    # More CAs may complete a chain, never change the names a certificate is for: no fallback.
    gateway = make_tls_gateway("other-host")
    trust = tokenroute.TrustStore(TLS.trusted)
    opener = tokenroute.Opener(trust, None, "")

    with pytest.raises(tokenroute.CliError) as raised:
        opener.open("GET", gateway.url + "/v1/models", None, {}, timeout=10)

    assert "is for another host name" in raised.value.message
    assert trust.rest is not None  # the bundle was never loaded


def test_a_certificate_not_valid_yet_says_to_check_the_clock():
    # A stand-in for OpenSSL's X509_V_ERR_CERT_NOT_YET_VALID (9), which a handshake would raise.
    reason = ssl.SSLCertVerificationError(1, "certificate verify failed: certificate is not yet valid")
    reason.verify_code, reason.verify_message = 9, "certificate is not yet valid"

    error = tokenroute.connection_error("api.example.com", reason)

    assert (error.exit_code, error.code) == (2, "network")
    assert error.message == "the TLS certificate of api.example.com is not valid yet: check this machine's clock"
    assert not error.retryable


class ConnectProxy:
    """A loopback HTTPS proxy: each CONNECT becomes a tunnel to 127.0.0.1:`port`, whatever host it names."""

    def __init__(self, port: int) -> None:
        import socketserver

        self.connects: list[str] = []
        proxy = self

        class Tunnel(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = self.request.recv(4096)
                    if not chunk:
                        return
                    head += chunk
                proxy.connects.append(head.split(b"\r\n", 1)[0].decode())
                with socket.create_connection(("127.0.0.1", port)) as upstream:
                    self.request.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    pipe = threading.Thread(target=relay, args=(upstream, self.request), daemon=True)
                    pipe.start()
                    relay(self.request, upstream)
                    pipe.join(10)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Tunnel)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def relay(source: socket.socket, target: socket.socket) -> None:
    try:
        while True:
            data = source.recv(65536)
            if not data:
                break
            target.sendall(data)
        target.shutdown(socket.SHUT_WR)
    except OSError:  # the other side closed first
        pass


def test_the_fallback_goes_through_an_https_proxy_tunnel(make_tls_gateway, tmp_path):
    gateway = make_tls_gateway("other-host")  # for gateway.example.com: reached only through the proxy
    port = gateway.url.rsplit(":", 1)[1]
    proxy = ConnectProxy(int(port))
    try:
        cli = Cli(gateway, tmp_path)
        key = gateway.add_key()["raw"]

        result = cli.run("models", "--key", key, "--json", env={
            **CA_IN_BUNDLE_ONLY, "TOKENROUTE_API_URL": f"https://gateway.example.com:{port}",
            "HTTPS_PROXY": proxy.url})
    finally:
        proxy.stop()

    assert result.code == 0, result
    assert len(result.json()) == 3
    # The first, then the fallback; http.client says HTTP/1.0 before Python 3.12, HTTP/1.1 since.
    assert [line.rsplit(" ", 1)[0] for line in proxy.connects] == [f"CONNECT gateway.example.com:{port}"] * 2
    assert {line.rsplit(" ", 1)[1] for line in proxy.connects} <= {"HTTP/1.0", "HTTP/1.1"}
    assert [r.path_only for r in gateway.requests] == ["/v1/models"]


# ---------------------------------------------------------------- one context per process


def test_doctor_makes_one_tls_context(tls_cli, api_key, tls_contexts):
    tls_cli.login()

    result = tls_cli.run("doctor", env={"TOKENROUTE_API_KEY": api_key})

    assert result.code == 0, result
    assert tls_cli.gateway.handshakes == {"ok": 3, "failed": 0}  # discovery, me, models
    assert len(tls_contexts) == 1


@pytest.mark.parametrize("env", [TLS.trusted, CA_IN_BUNDLE_ONLY], ids=["directory", "fallback"])
def test_login_makes_one_tls_context(tls_cli, tls_contexts, env):
    approve_on_second_poll(tls_cli)

    result = tls_cli.run("login", "--no-browser", env=env)

    assert result.code == 0, result
    assert [r.path_only for r in tls_cli.gateway.requests] == [
        "/api/v1/auth/discovery", "/oidc/device/auth", "/oidc/token", "/oidc/token", "/api/v1/me"]
    assert len(tls_contexts) == 1


def test_an_account_call_that_refreshes_makes_one_tls_context(tls_cli, tls_contexts):
    tls_cli.login(expires_in=0)

    result = tls_cli.run("balance", "--json")

    assert result.code == 0, result
    assert tls_cli.gateway.refresh_count == 1
    assert [r.path_only for r in tls_cli.gateway.requests] == ["/oidc/token", "/api/v1/balance"]
    assert len(tls_contexts) == 1


def test_plain_http_makes_no_tls_context(cli, tls_contexts):
    result = cli.run("models", "--key", cli.gateway.add_key()["raw"])

    assert result.code == 0, result
    assert tls_contexts == []


def test_the_context_counter_sees_every_context(tls_contexts: list[ssl.SSLContext]) -> None:
    """Guards the counter itself: each way of making a context is seen once."""
    makers: list[Callable[[], Any]] = [
        ssl.create_default_context, lambda: ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), lambda: tokenroute.TrustStore({})]

    for maker in makers:
        maker()

    assert len(tls_contexts) == 3


@pytest.mark.parametrize(
    "name, hashed",
    [("5ad8a5d6.0", True), ("ceca6b33.12", True), ("5ad8a5d6.r0", False), ("ca.pem", False),
     ("5AD8A5D6.0", False), ("5ad8a5d6", False), ("5ad8a5d6.", False), ("5ad8a5d6.0.pem", False)],
)
def test_only_openssl_hash_names_make_a_hashed_directory(tmp_path, name, hashed):
    (tmp_path / name).write_text("")

    assert tokenroute.is_hashed_directory(str(tmp_path)) is hashed
