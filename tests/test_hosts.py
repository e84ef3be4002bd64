"""Which Host a request may name (procs/network/hosts.py), the defence against DNS rebinding: the matcher
and the defaults sans I/O, the flag and its variable, the routes' order of checks without a socket, and the
real server on loopback refusing a rebinding page's handshake while its own names pass."""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.datastructures import Headers
from websockets.exceptions import InvalidStatus
from websockets.http11 import Request

from procs.config import parse_config
from procs.network.auth import Access
from procs.network.hosts import (
    AllowedHosts,
    HostPattern,
    bound_hosts,
    default_hosts,
    local_ipv4,
    local_ipv6,
    machine_hosts,
    parse_host_pattern,
    split_host,
)
from procs.network.http import Health, HttpRoutes
from protocol import SessionStart, decode_server
from tests.support.launcher import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
BOUND_S = 15.0  # every network wait here is bounded by this

# ---- the matcher, sans I/O ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "split"), [
    ("localhost", ("localhost", None)),
    ("LocalHost:8998", ("localhost", 8998)),
    ("voice.example.", ("voice.example", None)),  # the trailing dot of a fully qualified name
    ("voice.example.:443", ("voice.example", 443)),
    ("127.0.0.1:80", ("127.0.0.1", 80)),
    ("[::1]:8998", ("::1", 8998)),
    ("[0:0:0:0:0:0:0:1]", ("::1", None)),  # IPv6 compared in one spelling
    ("::1", ("::1", None)),  # bare IPv6: no port
    ("[FD00::2]", ("fd00::2", None)),
])
def test_a_host_splits_into_its_normalised_name_and_port(text: str, split: tuple[str, int | None]) -> None:
    assert split_host(text) == split


@pytest.mark.parametrize("text", ["", "http://localhost", "local host", "a/b", "user@localhost", "x:99999",
                                  "x:", "x:8o", "[::1", "[::1]x", "[nope]", "[::1]:", "a..b", ".",
                                  "é.example"])
def test_what_is_neither_a_name_nor_an_address_does_not_split(text: str) -> None:
    assert split_host(text) is None


def test_entries_are_normalised_and_a_leading_dot_means_subdomains() -> None:
    assert parse_host_pattern("Voice.Example.COM.") == HostPattern("voice.example.com")
    assert parse_host_pattern(".Example.com") == HostPattern("example.com", subdomains=True)
    assert parse_host_pattern("[::1]:8998") == HostPattern("::1", 8998)
    assert parse_host_pattern("::1") == HostPattern("::1")
    assert parse_host_pattern(".bücher.example") == HostPattern("xn--bcher-kva.example", subdomains=True)
    assert [str(parse_host_pattern(e)) for e in ("[::1]:80", ".a.example", "b.example:8080")] == [
        "[::1]:80", ".a.example", "b.example:8080"]


@pytest.mark.parametrize("entry", ["http://voice.example", "voice.example/", "*.example.com", ".", "a b",
                                  ".127.0.0.1", "x:70000", "[::1"])
def test_entries_that_are_no_host_are_refused_saying_so(entry: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(repr(entry))}"):
        parse_host_pattern(entry)


ALLOWED = AllowedHosts.of(["localhost", "voice.example", ".corp.example", "10.0.0.5:8998", "[fd00::2]"])


@pytest.mark.parametrize(("host", "allowed"), [
    ("localhost", True),
    ("localhost:8998", True),  # an entry without a port: any port
    ("LOCALHOST.:1234", True),  # case and a trailing dot do not matter
    ("voice.example:443", True),
    ("VOICE.EXAMPLE.", True),
    ("evil.example", False),
    ("voice.example.evil.example", False),
    ("evilvoice.example", False),
    ("corp.example", True),  # `.corp.example`: the domain itself...
    ("a.b.corp.example:8080", True),  # ...and every name under it
    ("evilcorp.example", False),
    ("corp.example.evil", False),
    ("10.0.0.5:8998", True),  # an entry with a port: that port only
    ("10.0.0.5:80", False),
    ("10.0.0.5", False),
    ("[fd00::2]:8998", True),
    ("[FD00:0::2]", True),
    ("[fd00::3]", False),
    ("127.0.0.1", False),  # only what is listed
    ("http://voice.example", False),
    ("", False),
])
def test_a_host_is_allowed_only_as_an_entry_says(host: str, allowed: bool) -> None:
    assert ALLOWED.allows(host) is allowed


def test_a_star_allows_any_host_and_nothing_configured_means_loopback() -> None:
    assert AllowedHosts.of(["voice.example", "*"]).allows("evil.example:1")
    assert str(AllowedHosts.of(["*"])) == "*"
    loopback = AllowedHosts()
    assert all(loopback.allows(h) for h in ("localhost:8998", "127.0.0.1:8998", "[::1]:8998"))
    assert not loopback.allows("evil.example")
    assert not loopback.allows("192.0.2.2")


def test_a_server_bound_to_one_host_answers_for_it_and_loopback_alone() -> None:
    # The machine's names are not consulted for a specific bind (a stand-in list proves it).
    assert default_hosts("127.0.0.1", ["host-a", "192.0.2.2"]) == ("localhost", "127.0.0.1", "::1")
    assert default_hosts("192.0.2.7", ["host-a"]) == ("localhost", "127.0.0.1", "::1", "192.0.2.7")
    assert default_hosts("voice.lan") == ("localhost", "127.0.0.1", "::1", "voice.lan")


@pytest.mark.parametrize("bind", ["0.0.0.0", "::", ""])
def test_a_wildcard_bind_answers_for_the_machines_names_and_addresses(bind: str) -> None:
    hosts = default_hosts(bind, ["host-a", "host-a.lan", "192.0.2.2", "fd00::2", "not a name"])
    assert hosts[:3] == ("localhost", "127.0.0.1", "::1")
    assert {"host-a", "host-a.lan", "192.0.2.2", "fd00::2"} <= set(hosts)
    assert "not a name" not in hosts  # what the machine reports and is no host is left out, not an error
    assert AllowedHosts.of(hosts).allows("[::]:8998" if bind == "::" else "host-a:8998")


FIB_TRIE = """Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 127.0.0.0/8 2 0 2
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
        |-- 127.255.255.255
           /32 link BROADCAST
     +-- 192.0.2.0/24 2 0 2
           |-- 192.0.2.0
              /24 link UNICAST
           |-- 192.0.2.2
              /32 host LOCAL
Local:
  +-- 0.0.0.0/0 3 0 5
           |-- 192.0.2.2
              /32 host LOCAL
"""
IF_INET6 = """fe8000000000000000fc00fffe000001 04 40 20 80     eth0
fd000000000000000000000000000002 04 40 00 82     eth0
00000000000000000000000000000001 01 80 10 80       lo
"""


def test_the_machines_addresses_are_read_from_procs_lists() -> None:
    assert local_ipv4(FIB_TRIE) == ["127.0.0.1", "192.0.2.2"]  # local /32s: no networks, no broadcasts
    assert local_ipv6(IF_INET6) == ["fe80::fc:ff:fe00:1", "fd00::2", "::1"]


def test_the_machines_own_names_and_addresses_are_found() -> None:
    # The real lookups of this machine: its hostname, and whatever that resolves to.
    found = machine_hosts()
    assert socket.gethostname() in found
    resolved = {str(info[4][0]) for info in socket.getaddrinfo(socket.gethostname(), None)}
    assert resolved <= set(found)
    hosts = AllowedHosts.of(bound_hosts("0.0.0.0"))
    assert all(hosts.allows(host if ":" not in host else f"[{host}]") for host in found if split_host(host))
    assert AllowedHosts.of(bound_hosts("127.0.0.1")) == AllowedHosts()


# ---- the flag and its variable -----------------------------------------------------------------------------


def test_allowed_hosts_come_from_the_flag_or_the_variable_normalised() -> None:
    assert parse_config([], environ={}).allowed_hosts == ()
    cfg = parse_config(["--allowed-hosts", "Voice.Example.,.corp.example, [::1]:8998 ,10.0.0.5:80"],
                       environ={})
    assert cfg.allowed_hosts == ("voice.example", ".corp.example", "[::1]:8998", "10.0.0.5:80")
    env = {"VOICE_ALLOWED_HOSTS": "a.example,*"}
    assert parse_config([], environ=env).allowed_hosts == ("a.example", "*")
    assert parse_config(["--allowed-hosts", "b.example"], environ=env).allowed_hosts == ("b.example",)


@pytest.mark.parametrize("value", ["https://voice.example", "voice.example/ws", ".10.0.0.5", "x:123456"])
def test_a_bad_entry_is_refused_with_usage_naming_the_flag_or_variable(
        value: str, capsys: pytest.CaptureFixture[str]) -> None:
    for argv, environ in ((["--allowed-hosts", value], {}), ([], {"VOICE_ALLOWED_HOSTS": value})):
        with pytest.raises(SystemExit) as exc:
            parse_config(argv, environ=environ)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "usage:" in err and ("VOICE_ALLOWED_HOSTS" in err if environ else "--allowed-hosts" in err)


# ---- the routes: where the Host is checked, without a socket --------------------------------------------


def respond(headers: dict[str, str] | Headers, path: str = "/ws", method: str = "GET",
            hosts: AllowedHosts | None = None):
    routes = HttpRoutes(ROOT / "web", lambda: Health("ok", 0, 4, "m", "moshi", False), lambda: "m 1\n",
                        lambda: None, Access(auth_token="t" * 20), hosts)
    return routes.respond(Request(path, Headers(headers), method=method))


def test_a_foreign_host_is_421_before_the_origin_or_a_token_is_looked_at() -> None:
    rebinding = {"Host": "evil.example:8998", "Origin": "http://evil.example:8998"}
    for path in ("/ws", "/api/chat", "/", "/app.js", "/nothing"):
        response = respond(rebinding, path)
        assert response is not None and response.status_code == 421, path
        assert b"--allowed-hosts" in response.body
    # The same page once the operator names it: on to the token (401), as before this check existed.
    named = respond(rebinding, hosts=AllowedHosts.of(["voice.example", "evil.example"]))
    assert named is not None and named.status_code == 401
    assert respond({"Host": "localhost:8998", "Origin": "http://evil.example"}).status_code == 403


def test_the_probes_routes_answer_any_host() -> None:
    for path in ("/livez", "/health", "/metrics"):
        assert respond({"Host": "10.1.2.3:8998"}, path).status_code == 200, path
        assert respond({"Host": "voice-agent"}, path).status_code == 200, path  # HAProxy's check


def test_a_request_without_exactly_one_host_is_400() -> None:
    for path in ("/ws", "/", "/health"):
        assert respond({}, path).status_code == 400, path
        two = Headers([("Host", "localhost"), ("Host", "evil.example")])
        assert respond(two, path).status_code == 400, path


def test_a_refused_head_has_no_body() -> None:
    get, head = respond({"Host": "evil.example"}, "/"), respond({"Host": "evil.example"}, "/", "HEAD")
    assert head.status_code == get.status_code == 421
    assert head.body == b"" and head.headers["Content-Length"] == str(len(get.body))


# ---- the real server on loopback ---------------------------------------------------------------------------


async def handshake_status(port: int, host: str, origin: str | None) -> int:
    """A WebSocket handshake from websockets' own client to 127.0.0.1:`port`, naming `host` as a browser
    that resolved `host` to 127.0.0.1 would: 101 (and `session_start`) or the refusal's status."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=BOUND_S)
    try:
        async with connect(f"ws://{host}/ws", sock=sock, origin=origin,  # type: ignore[arg-type]
                           open_timeout=BOUND_S) as ws:
            assert isinstance(decode_server(await asyncio.wait_for(ws.recv(), BOUND_S)), SessionStart)
            return 101
    except InvalidStatus as refused:
        return refused.response.status_code


def plain_get(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=BOUND_S) as sock:
        sock.sendall(request)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return reply


def test_a_dns_rebinding_handshake_is_refused_and_the_servers_own_names_pass(
        loopback_server: ServerProcess) -> None:
    port = loopback_server.port
    # evil.example's page, its name now resolving to 127.0.0.1: same-origin to the Origin check alone.
    assert asyncio.run(handshake_status(port, f"evil.example:{port}", f"http://evil.example:{port}")) == 421
    assert asyncio.run(handshake_status(port, "evil.example", None)) == 421  # no browser: no other rule
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", f"LOCALHOST.:{port}"):
        assert asyncio.run(handshake_status(port, host, f"http://{host}")) == 101, host
    assert "refused a request for Host 'evil.example" in loopback_server.log()


def test_the_page_is_refused_to_a_foreign_host_and_the_probes_answer_any(
        loopback_server: ServerProcess) -> None:
    port = loopback_server.port
    page = plain_get(port, b"GET / HTTP/1.1\r\nHost: evil.example\r\n\r\n")
    assert page.startswith(b"HTTP/1.1 421 ") and page.endswith(b"--allowed-hosts)\n")
    assert plain_get(port, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n").startswith(b"HTTP/1.1 200 ")
    assert plain_get(port, b"GET / HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    for path in (b"/health", b"/livez", b"/metrics"):
        reply = plain_get(port, b"GET " + path + b" HTTP/1.1\r\nHost: 10.9.8.7:8998\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 200 "), path


@pytest.fixture(scope="module")
def everywhere_server() -> Iterator[ServerProcess]:
    """Bound to every address, with the operator's names: a pod behind a balancer."""
    with ServerProcess("--engine", "loopback", "--host", "0.0.0.0", "--allowed-hosts",
                       "voice.example,.corp.example") as server:
        yield server


def test_allowed_hosts_adds_a_name_and_a_domain_to_a_wildcard_binds_own(
        everywhere_server: ServerProcess) -> None:
    port = everywhere_server.port
    for host in ("voice.example", f"voice.example:{port}", "corp.example", "a.b.corp.example:443",
                 f"{socket.gethostname()}:{port}", f"localhost:{port}", f"0.0.0.0:{port}"):
        assert asyncio.run(handshake_status(port, host, f"http://{host}")) == 101, host
    for host in ("evil.example", "evilcorp.example", "voice.example.evil.example"):
        assert asyncio.run(handshake_status(port, host, f"http://{host}")) == 421, host
