"""Inbound limits for forwarded writes: token buckets per client (IP) and per DID.

- ``Rate(count, per_s)``: ``count`` requests per ``per_s`` seconds; the bucket holds ``count``
  tokens (the burst) and refills continuously. ``parse_rate("10/3600")``; ``"0"``/``"off"`` =
  no limit (None).
- ``TokenBuckets(rate, clock)``: ``take(key) -> float``: 0.0 when a token was taken, else the
  seconds until one is available (the request is refused; nothing is taken). At most
  ``max_keys`` keys are remembered: full buckets are dropped first, then the oldest.
- ``client_key(scope, trusted)``: the key a request is limited by. The peer address, unless the
  peer is a trusted proxy (``trusted``: networks from ``parse_networks``): then X-Forwarded-For
  is read from the right, skipping trusted proxies, and the first other address is the client.
  IPv6 clients are grouped by /64 (one customer usually holds a whole /64), IPv4 per address;
  an IPv4-mapped IPv6 address counts as IPv4.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Rate:
    count: float
    per_s: float

    def __str__(self) -> str:
        return f"{self.count:g}/{self.per_s:g}"


def parse_rate(text: str | None) -> Rate | None:
    """``"N/SECONDS"`` → Rate; ``"0"``, ``"off"``, ``""`` or None → None (unlimited)."""
    if text is None or text.strip().lower() in ("", "0", "off", "none"):
        return None
    count, sep, per = text.strip().partition("/")
    try:
        n, s = float(count), float(per) if sep else math.nan
    except ValueError:
        n = s = math.nan
    if not (n >= 1 and s > 0 and math.isfinite(n) and math.isfinite(s)):
        raise ValueError(f"a rate is N/SECONDS with N >= 1 and SECONDS > 0 (or 0/off), not {text!r}")
    return Rate(n, s)


class TokenBuckets:
    """One token bucket per key (module doc)."""

    def __init__(self, rate: Rate, clock: Callable[[], float] = time.monotonic, max_keys: int = 100_000):
        self.rate = rate
        self.clock = clock
        self.max_keys = max_keys
        self._per_s = rate.count / rate.per_s
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def _level(self, key: str, now: float) -> float:
        tokens, then = self._buckets.get(key, (self.rate.count, now))
        return min(self.rate.count, tokens + (now - then) * self._per_s)

    def take(self, key: str) -> float:
        """0.0 if a token was taken for ``key``; else the seconds until one is available."""
        now = self.clock()
        tokens = self._level(key, now)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self._per_s
        self._buckets[key] = (tokens - 1.0, now)
        self._buckets.move_to_end(key)
        if len(self._buckets) > self.max_keys:
            self._prune(now)
        return 0.0

    def _prune(self, now: float) -> None:
        for k in [k for k in self._buckets if self._level(k, now) >= self.rate.count]:
            del self._buckets[k]
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)


def parse_networks(text: str | None) -> tuple[Network, ...]:
    """Comma-separated addresses or CIDR networks (``127.0.0.1,10.0.0.0/8``); ValueError if bad."""
    if not text:
        return ()
    out = []
    for part in text.split(","):
        part = part.strip()
        if part:
            try:
                out.append(ipaddress.ip_network(part, strict=False))
            except ValueError:
                raise ValueError(f"not an IP address or network: {part!r}") from None
    return tuple(out)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # [v6]:port
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # v4:port
        text = text.split(":", 1)[0]
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _trusted(addr: Any, trusted: Sequence[Network]) -> bool:
    return addr is not None and any(addr.version == n.version and addr in n for n in trusted)


def client_address(scope: dict[str, Any], trusted: Sequence[Network] = ()) -> Any:
    """The client's address (ipaddress object), or None if unknown (module doc)."""
    client = scope.get("client")
    peer = _address(client[0]) if client else None
    if not trusted or not _trusted(peer, trusted):
        return peer
    forwarded = [v.decode("latin-1") for k, v in scope.get("headers", []) if k.lower() == b"x-forwarded-for"]
    hops = [h for v in forwarded for h in v.split(",")]
    for hop in reversed(hops):
        addr = _address(hop)
        if addr is None:
            return peer  # garbage in the header: fall back to the proxy itself
        if not _trusted(addr, trusted):
            return addr
    return peer


def client_key(scope: dict[str, Any], trusted: Sequence[Network] = ()) -> str:
    """The rate-limit key of a request: an IPv4 address or an IPv6 /64 (module doc)."""
    addr = client_address(scope, trusted)
    if addr is None:
        return "unknown"
    if isinstance(addr, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((int(addr) >> 64 << 64, 64)))
    return str(addr)


__all__ = ["Rate", "TokenBuckets", "client_address", "client_key", "parse_networks", "parse_rate"]
