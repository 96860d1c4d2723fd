"""A tiny authoritative DNS server for tests: UDP and TCP on one 127.0.0.1 port, built on
dnspython's ``dns.message``, answering from a dict. Runs in two daemon threads, so it works
whatever event loop the test uses.

    server = DnsServer(); server.start()
    server.txt("_atproto.alice.test", "did=did:plc:…")   # records (names without final dot)
    ...  nameserver "127.0.0.1:<port>" = server.address
    server.stop()

Answers: a name in ``records`` → NOERROR with its TXT records for a TXT query (none for other
types); any other name → NXDOMAIN. Knobs (sets of names, changeable while it runs):
``silent`` (never answer: the client times out), ``servfail`` (SERVFAIL), ``garbage`` (bytes
that are not a DNS message), ``tcp_only`` (UDP answers are truncated (TC) so the client asks
again over TCP). A TXT value is ``str`` (one string), ``bytes`` (one raw string, may be
non-UTF-8) or a tuple of chunks (one record of several strings). ``queries`` records
``(name, "udp"|"tcp")`` per question asked.
"""

from __future__ import annotations

import socket
import struct
import threading
from typing import Union

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.rrset

TxtValue = Union[str, bytes, tuple]


def _chunks(value: TxtValue) -> tuple[bytes, ...]:
    if isinstance(value, tuple):
        return tuple(c.encode() if isinstance(c, str) else c for c in value)
    return (value.encode() if isinstance(value, str) else value,)


class DnsServer:
    def __init__(self, ttl: int = 300) -> None:
        self.ttl = ttl
        self.records: dict[str, list[TxtValue]] = {}
        self.silent: set[str] = set()
        self.servfail: set[str] = set()
        self.garbage: set[str] = set()
        self.tcp_only: set[str] = set()
        self.queries: list[tuple[str, str]] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self.port = 0

    def reset(self) -> None:
        """Forget every record, knob and recorded query (a server shared by several tests)."""
        self.records = {}
        self.silent, self.servfail, self.garbage, self.tcp_only = set(), set(), set(), set()
        self.queries = []

    # ---- records

    def txt(self, name: str, *values: TxtValue) -> None:
        """Set the TXT records of ``name`` (no values: the name exists with no TXT record)."""
        self.records[name.lower().rstrip(".")] = list(values)

    def remove(self, name: str) -> None:
        self.records.pop(name.lower().rstrip("."), None)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # ---- answering

    def answer(self, wire: bytes, proto: str) -> bytes | None:
        """The reply to one query (None: stay silent)."""
        try:
            query = dns.message.from_wire(wire)
        except Exception:  # noqa: BLE001 — a test server ignores what it cannot parse
            return None
        if not query.question:
            return None
        q = query.question[0]
        name = q.name.to_text(omit_final_dot=True).lower()
        self.queries.append((name, proto))
        if name in self.silent:
            return None
        if name in self.garbage:
            return wire[:2] + b"\x81\x80\x00\x01\xff\xff"  # header that promises records it lacks
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if name in self.servfail:
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire()
        if name not in self.records:
            response.set_rcode(dns.rcode.NXDOMAIN)
            return response.to_wire()
        if proto == "udp" and name in self.tcp_only:
            response.flags |= dns.flags.TC
            return response.to_wire()
        if q.rdtype == dns.rdatatype.TXT and self.records[name]:
            rrset = dns.rrset.RRset(q.name, dns.rdataclass.IN, dns.rdatatype.TXT)
            for value in self.records[name]:
                rrset.add(
                    dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT, _chunks(value)), self.ttl
                )
            response.answer.append(rrset)
        return response.to_wire()

    # ---- sockets

    def start(self) -> "DnsServer":
        for _ in range(20):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                tcp.bind(("127.0.0.1", port))
            except OSError:
                udp.close()
                tcp.close()
                continue
            tcp.listen(16)
            break
        else:
            raise RuntimeError("no free port for the test DNS server")
        udp.settimeout(0.05)
        tcp.settimeout(0.05)
        self._udp, self._tcp, self.port = udp, tcp, port
        for target in (self._serve_udp, self._serve_tcp):
            t = threading.Thread(target=target, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=2)
        for s in (self._udp, self._tcp):
            if s is not None:
                s.close()

    def _serve_udp(self) -> None:
        assert self._udp is not None
        while not self._stop.is_set():
            try:
                wire, peer = self._udp.recvfrom(65535)
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            reply = self.answer(wire, "udp")
            if reply is not None:
                self._udp.sendto(reply, peer)

    def _serve_tcp(self) -> None:
        assert self._tcp is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._tcp.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            threading.Thread(target=self._tcp_conn, args=(conn,), daemon=True).start()

    def _tcp_conn(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        try:
            while not self._stop.is_set():
                head = self._read(conn, 2)
                if head is None:
                    return
                wire = self._read(conn, struct.unpack("!H", head)[0])
                if wire is None:
                    return
                reply = self.answer(wire, "tcp")
                if reply is None:
                    continue  # silent: the client times out
                conn.sendall(struct.pack("!H", len(reply)) + reply)
        except OSError:
            return
        finally:
            conn.close()

    @staticmethod
    def _read(conn: socket.socket, n: int) -> bytes | None:
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                return None
            data += chunk
        return data
