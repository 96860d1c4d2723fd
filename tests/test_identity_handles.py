"""Handle syntax, did:web parsing and DID-document reading (plc.identity.handles / .documents):
pure functions, no I/O. Handle cases follow the atproto handle spec's examples."""

from __future__ import annotations

import pytest

from plc.identity.documents import (
    claims_handle,
    document_problem,
    first_handle,
    handles_in,
    mini_doc,
    pds_endpoint,
    signing_key,
)
from plc.identity.handles import (
    DISALLOWED_TLDS,
    InvalidHandle,
    check_handle,
    did_web_host,
    handle_syntax_problem,
    is_valid_handle,
    normalize_handle,
)
from plc.identity.resolver import parse_nameserver, parse_nameservers

VALID = [
    "jay.bsky.social",
    "8.cn",
    "name.t--t",
    "XX.LCS.MIT.EDU",
    "a.co",
    "xn--notarealidn.com",
    "xn--fiqa61au8b7zsevnm8ak20mc4a87e.xn--fiqs8s",
    "xn--ls8h.test",
    "example.t",
    "john.test",
    "jaymome-johnber123456.test",
    "laptop.local",  # valid syntax; the TLD is refused for resolution (below)
    "blah.arpa",
    "a" * 63 + ".com",
    ".".join(["a" * 63] * 3) + "." + "b" * 61,  # 253 characters
]

INVALID = [
    "",
    "jo@hn.test",
    "💩.test",
    "john..test",
    "xn--bcher-.tld",
    "john.0",
    "cn.8",
    "www.masełkowski.pl.com",
    "org",
    "name.org.",
    ".name.org",
    "-a.com",
    "a-.com",
    "a.-com",
    "a_b.com",
    "a b.com",
    "a.com\n",
    "a" * 64 + ".com",
    ".".join(["a" * 63] * 3) + "." + "b" * 62,  # 254 characters
    "a.1b",
]


@pytest.mark.parametrize("handle", VALID)
def test_valid_handles(handle):
    assert is_valid_handle(handle)
    assert handle_syntax_problem(normalize_handle(handle)) is None


@pytest.mark.parametrize("handle", INVALID)
def test_invalid_handles(handle):
    assert not is_valid_handle(handle)
    with pytest.raises(InvalidHandle) as info:
        check_handle(handle)
    assert not info.value.reserved
    assert str(info.value).startswith("Invalid handle: ")


def test_check_handle_normalises_to_lowercase():
    assert check_handle("Alice.Example.COM") == "alice.example.com"
    assert check_handle("XX.LCS.MIT.EDU") == "xx.lcs.mit.edu"


@pytest.mark.parametrize("tld", sorted(DISALLOWED_TLDS))
def test_reserved_tlds_are_refused_for_resolution(tld):
    handle = f"host.{tld}"
    assert is_valid_handle(handle)  # syntactically a handle ...
    with pytest.raises(InvalidHandle) as info:  # ... that is never resolved
        check_handle(handle.upper())
    assert info.value.reserved
    assert f".{tld}" in str(info.value)


def test_reserved_tld_list_is_the_specs():
    assert DISALLOWED_TLDS == {"local", "arpa", "invalid", "localhost", "internal", "example", "onion", "alt"}
    assert check_handle("alice.test") == "alice.test"  # .test is allowed (development)


def test_non_strings_are_not_handles():
    assert not is_valid_handle(None)
    assert not is_valid_handle(b"a.com")


# ----------------------------------------------------------------------------- did:web


@pytest.mark.parametrize(
    ("did", "host"),
    [
        ("did:web:example.com", "example.com"),
        ("did:web:Example.COM", "example.com"),
        ("did:web:localhost%3A8080", "localhost:8080"),
        ("did:web:a.b.c%3a443", "a.b.c:443"),
        ("did:web:localhost", "localhost"),
    ],
)
def test_did_web_hosts(did, host):
    assert did_web_host(did) == host


@pytest.mark.parametrize(
    "did",
    [
        "did:web:example.com:user:alice",  # a path: not allowed by atproto
        "did:web:example.com%2Fpath",
        "did:web:ex_ample.com",
        "did:web:example.com%3A0",
        "did:web:example.com%3A65536",
        "did:web:example.com%3Aabc",
        "did:web:example.com%3A",
        "did:web:",
        "did:web:-bad.com",
        "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa",
        "did:web:a..b",
        "web:example.com",
    ],
)
def test_did_web_refused(did):
    assert did_web_host(did) is None


# ----------------------------------------------------------------------------- documents

DID = "did:plc:ewvi7nxzyoun6zhxrhs64oiz"
DOC = {
    "@context": ["https://www.w3.org/ns/did/v1"],
    "id": DID,
    "alsoKnownAs": [
        "https://not-a-handle.example", "at://not a handle", "at://Alice.Test", "at://second.test",
    ],
    "verificationMethod": [
        {"id": f"{DID}#other", "type": "Multikey", "controller": DID, "publicKeyMultibase": "zOther"},
        {"id": f"{DID}#atproto", "type": "Multikey", "controller": DID, "publicKeyMultibase": "zQ3shKey"},
    ],
    "service": [
        {"id": "#atproto_labeler", "type": "AtprotoLabeler", "serviceEndpoint": "https://labeler.test"},
        {"id": "#atproto_pds", "type": "AtprotoPersonalDataServer", "serviceEndpoint": "https://pds.test"},
    ],
}


def test_document_reading():
    assert handles_in(DOC) == ["alice.test", "second.test"]
    assert first_handle(DOC) == "alice.test"
    assert claims_handle(DOC, "ALICE.test") and claims_handle(DOC, "second.test")
    assert not claims_handle(DOC, "other.test")
    assert pds_endpoint(DOC) == "https://pds.test"
    assert signing_key(DOC) == "did:key:zQ3shKey"
    assert document_problem(DID, DOC) is None
    assert mini_doc(DID, "alice.test", DOC) == {
        "did": DID,
        "handle": "alice.test",
        "pds": "https://pds.test",
        "signing_key": "did:key:zQ3shKey",
    }
    empty = {"did": DID, "handle": "handle.invalid", "pds": None, "signing_key": None}
    assert mini_doc(DID, None, {"id": DID}) == empty


@pytest.mark.parametrize(
    "doc",
    [
        {},
        {"id": DID, "alsoKnownAs": "at://a.test", "service": {}, "verificationMethod": "x"},
        {"id": DID, "alsoKnownAs": [1, None, {}], "service": [1, None], "verificationMethod": [[], None]},
        {"id": DID, "service": [{"id": "#atproto_pds", "type": "Other", "serviceEndpoint": "https://x"}]},
        {"id": DID, "service": [{"id": "#atproto_pds", "type": "AtprotoPersonalDataServer",
                                 "serviceEndpoint": 5}]},
        {"id": DID, "verificationMethod": [{"id": "#atproto", "type": "Multikey", "publicKeyMultibase": 5}]},
        {"id": DID, "verificationMethod": [{"id": "#atproto", "type": "JsonWebKey2020", "publicKeyJwk": {}}]},
        {"id": 7, "service": [{"id": "#atproto_pds"}]},
    ],
)
def test_odd_documents_give_nothing_and_never_raise(doc):
    assert first_handle(doc) is None
    assert pds_endpoint(doc) is None
    assert signing_key(doc) is None


def test_document_problems():
    assert document_problem(DID, []) == "DID document is not a JSON object"
    assert document_problem(DID, {"id": "did:plc:other"}) == "DID document id does not match the DID"
    assert document_problem(DID, {}) == "DID document id does not match the DID"


# ----------------------------------------------------------------------------- nameservers


def test_nameserver_parsing():
    assert parse_nameserver("127.0.0.1") == ("127.0.0.1", 53)
    assert parse_nameserver("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert parse_nameserver("::1") == ("::1", 53)
    assert parse_nameserver("[::1]:5353") == ("::1", 5353)
    assert parse_nameservers("1.1.1.1, 8.8.8.8:53") == (("1.1.1.1", 53), ("8.8.8.8", 53))
    assert parse_nameservers("") == () and parse_nameservers(None) == ()
    for bad in ("dns.google", "1.2.3.4:0", "1.2.3.4:99999", "1.2.3.4:x", "[::1", "[::1]x", "300.1.1.1"):
        with pytest.raises(ValueError):
            parse_nameserver(bad)


def test_config_from_settings(monkeypatch):
    import argparse

    from plc import settings
    from plc.identity.resolver import config_from_args

    def parse(argv, env=None):
        for s in settings.IDENTITY_SETTINGS:
            monkeypatch.delenv(s.env, raising=False)
        for k, v in (env or {}).items():
            monkeypatch.setenv(k, v)
        p = argparse.ArgumentParser()
        for s in settings.IDENTITY_SETTINGS:
            settings.add_argument(p, s)
        return p.parse_args(argv)

    c = config_from_args(parse([]))
    assert (c.nameservers, c.dns_timeout, c.http_timeout, c.handle_ttl, c.doc_ttl, c.negative_ttl) == (
        (), 3.0, 5.0, 300.0, 300.0, 60.0
    )
    c = config_from_args(parse(["--identity-nameservers", "10.0.0.1:5353,[::1]", "--identity-cache-ttl", "0"],
                               {"PLC_IDENTITY_NEGATIVE_TTL": "1.5"}))
    assert c.nameservers == (("10.0.0.1", 5353), ("::1", 53))
    assert (c.handle_ttl, c.doc_ttl, c.negative_ttl) == (0.0, 0.0, 1.5)
    with pytest.raises(settings.SettingError, match="not an IP address"):
        config_from_args(parse([], {"PLC_IDENTITY_NAMESERVERS": "dns.example"}))
