"""Which `Host` a request may name: the defence against DNS rebinding, sans I/O (but `machine_hosts`).

The Origin check (auth.py) lets in the page's own origin, the one whose host is the request's `Host`. A
DNS-rebinding page breaks that on its own: evil.example, first resolving to the attacker and then to
127.0.0.1 (or a LAN address), makes the browser send `Host: evil.example` and `Origin: http://evil.example`
to this server, which look same-origin. What the attacker cannot change is the Host the browser sends:
its own name, not one of this server's. So a request is served only when its `Host` is one this server
answers for: the names and addresses it is bound to (`default_hosts`), and what `--allowed-hosts` adds (the
public name a balancer or ingress forwards). Anything else is 421 Misdirected Request, before the Origin
check.

An entry is a host name or an IP address (IPv6 in brackets, or bare without a port), optionally with
`:port`; a leading dot (`.example.com`) also allows every name under it; `*` allows any Host (the check is
off: for a balancer that checks it itself). Names compare case-insensitively and without a trailing dot;
a port is compared only when the entry has one (a browser leaves out :80 and :443, so an entry for those
should have no port).
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

ANY_HOST = "*"
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
WILDCARD_BINDS = ("", "0.0.0.0", "::")  # listening on every address of the machine
NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")  # a DNS name as browsers send it (IDNs in punycode)
PORT = re.compile(r"[0-9]{1,5}")
# Where Linux lists the machine's own addresses (no package needed); elsewhere they are simply not there.
FIB_TRIE = Path("/proc/net/fib_trie")
IF_INET6 = Path("/proc/net/if_inet6")


@dataclass(frozen=True)
class HostPattern:
    """One allowed host, normalised: lower case, no trailing dot, an IPv6 address bare and compressed."""

    name: str
    port: int | None = None
    subdomains: bool = False  # `.example.com`: example.com and every name under it

    def matches(self, name: str, port: int | None) -> bool:
        if self.port is not None and port != self.port:
            return False
        return name == self.name or (self.subdomains and name.endswith("." + self.name))

    def __str__(self) -> str:
        host = f"[{self.name}]" if ":" in self.name else self.name
        return ("." if self.subdomains else "") + host + ("" if self.port is None else f":{self.port}")


def split_host(text: str) -> tuple[str, int | None] | None:
    """(name, port) of a `Host` header or an entry, normalised as `HostPattern` keeps them; None when it is
    neither a name nor an address (a URL, spaces, a port over 65535, ...)."""
    text = text.strip().lower()
    port_text: str | None = None
    if text.startswith("["):  # [IPv6] or [IPv6]:port
        address, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return None
        port_text = rest[1:] if rest else None
        name = _ipv6(address)
    elif text.count(":") > 1:  # a bare IPv6 address: it can carry no port
        name = _ipv6(text)
    else:
        name, colon, port = text.partition(":")
        port_text = port if colon else None
        if name.endswith("."):  # "localhost." is localhost: the root of the DNS, written out
            name = name[:-1]
        if not NAME.fullmatch(name):
            return None
    if name is None:
        return None
    if port_text is None:
        return name, None
    if not PORT.fullmatch(port_text) or int(port_text) > 65535:
        return None
    return name, int(port_text)


def _ipv6(text: str) -> str | None:
    try:
        return ipaddress.IPv6Address(text).compressed
    except ValueError:
        return None


def parse_host_pattern(text: str) -> HostPattern:
    """An `--allowed-hosts` entry (not `*`); ValueError says what is wrong with it."""
    entry = text.strip()
    subdomains = entry.startswith(".")
    entry = entry[1:] if subdomains else entry
    if not entry.isascii():  # an internationalised name, as browsers send it: punycode
        try:
            entry = entry.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError(f"{text!r} is not a host name (IDNA refuses it)") from None
    split = split_host(entry)
    if split is None:
        raise ValueError(f"{text!r} is not a host name or IP address ([.]host[:port], [IPv6][:port] or *)")
    name, port = split
    if subdomains and _is_address(name):
        raise ValueError(f"{text!r}: a leading dot allows the names under a domain, not under an address")
    return HostPattern(name, port, subdomains)


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class AllowedHosts:
    """The hosts this server answers for; `any_host`: every Host (`*`)."""

    patterns: tuple[HostPattern, ...] = tuple(HostPattern(name) for name in LOOPBACK_HOSTS)
    any_host: bool = False

    @classmethod
    def of(cls, entries: Iterable[str]) -> AllowedHosts:
        """From `--allowed-hosts` entries (and the defaults); ValueError for one that is no host."""
        entries = [e for e in entries if e.strip()]
        if any(e.strip() == ANY_HOST for e in entries):
            return cls((), any_host=True)
        patterns = dict.fromkeys(parse_host_pattern(e) for e in entries)  # in order, once each
        return cls(tuple(patterns))

    def allows(self, host: str) -> bool:
        """Whether a request whose `Host` header is `host` may be served."""
        if self.any_host:
            return True
        split = split_host(host)
        return split is not None and any(p.matches(*split) for p in self.patterns)

    def __str__(self) -> str:
        return ANY_HOST if self.any_host else ",".join(map(str, self.patterns))


def default_hosts(bind: str, machine: Iterable[str] = ()) -> tuple[str, ...]:
    """The hosts a server bound to `bind` answers for when nothing is configured: loopback's names, the
    bound host itself, and, when that is every address (0.0.0.0, ::), the machine's own names and addresses
    (`machine`: `machine_hosts()`). Without a port, as a balancer in front may listen on another one."""
    hosts = [*LOOPBACK_HOSTS, bind.strip()] if bind.strip() else list(LOOPBACK_HOSTS)
    if bind.strip() in WILDCARD_BINDS:
        hosts += machine
    return tuple(h for h in dict.fromkeys(hosts) if split_host(h) is not None)


def local_ipv4(fib_trie: str) -> list[str]:
    """The machine's own IPv4 addresses from /proc/net/fib_trie: each `|-- ADDRESS` followed by a
    `/32 host LOCAL` line."""
    found = [line.strip()[3:].strip() for line, following in itertools.pairwise(fib_trie.splitlines())
             if line.strip().startswith("|--") and following.split() == ["/32", "host", "LOCAL"]]
    return list(dict.fromkeys(found))


def local_ipv6(if_inet6: str) -> list[str]:
    """The machine's own IPv6 addresses from /proc/net/if_inet6 (32 hex digits first on each line)."""
    found = []
    for line in if_inet6.splitlines():
        digits = line.split()[:1]
        if digits and re.fullmatch(r"[0-9a-fA-F]{32}", digits[0]):
            found.append(ipaddress.IPv6Address(int(digits[0], 16)).compressed)
    return found


def machine_hosts() -> list[str]:
    """The machine's names (its hostname and FQDN) and every address of its interfaces that the standard
    library finds: what the names resolve to, and on Linux /proc's lists. I/O (name lookups): called once,
    when the network process starts, and only for a wildcard bind. What cannot be found is left out."""
    names = [socket.gethostname()]
    with contextlib.suppress(OSError):
        names.append(socket.getfqdn())
    hosts = list(names)
    for name in names:
        with contextlib.suppress(OSError, UnicodeError):  # a name that does not resolve (no DNS)
            hosts += [str(info[4][0]).split("%", 1)[0] for info in socket.getaddrinfo(name, None)]
    for path, parse in ((FIB_TRIE, local_ipv4), (IF_INET6, local_ipv6)):
        with contextlib.suppress(OSError):  # not Linux, or no IPv6
            hosts += parse(path.read_text())
    return list(dict.fromkeys(hosts))


def bound_hosts(bind: str) -> tuple[str, ...]:
    """`default_hosts` of a server bound to `bind`, looking up the machine's own only when it needs them."""
    return default_hosts(bind, machine_hosts() if bind.strip() in WILDCARD_BINDS else ())
