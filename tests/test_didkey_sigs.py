"""did:key parsing/formatting and strict signature decoding, verification and signing
(spec §3.3, §3.6)."""

from __future__ import annotations

import base64
import hashlib

import base58
import coincurve
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from plc.core.didkey import (
    K256,
    P256,
    KeyError_,
    decode_did_key,
    format_did_key,
    is_wellformed_did_key,
    key_curve,
    parse_rotation_key,
)
from plc.core.errors import Reason
from plc.core.signatures import (
    UnsupportedKeyError,
    HALF_N,
    ORDER,
    SigDecodeError,
    SigningKey,
    decode_sig,
    der_encode,
    encode_sig,
    first_verifying_key,
    is_low_s,
    verify_digest,
)

CURVES = [K256, P256]
PREFIX = {K256: b"\xe7\x01", P256: b"\x80\x24"}
START = {K256: "did:key:zQ3s", P256: "did:key:zDna"}


def _compressed(curve: str, secret: int) -> tuple[bytes, bytes]:
    """(compressed, uncompressed) public point for a private scalar, via the crypto libraries."""
    if curve == K256:
        pub = coincurve.PrivateKey(secret.to_bytes(32, "big")).public_key
        return pub.format(compressed=True), pub.format(compressed=False)
    pub = ec.derive_private_key(secret, ec.SECP256R1()).public_key()
    return (
        pub.public_bytes(Encoding.X962, PublicFormat.CompressedPoint),
        pub.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint),
    )


# ----------------------------------------------------------------------------- did:key
@pytest.mark.parametrize("curve", CURVES)
def test_did_key_round_trip(curve):
    for secret in (1, 2, 12345, ORDER[curve] - 1):
        compressed, _ = _compressed(curve, secret)
        did_key = format_did_key(curve, compressed)
        assert did_key.startswith(START[curve])
        assert did_key == "did:key:z" + base58.b58encode(PREFIX[curve] + compressed).decode()
        assert decode_did_key(did_key) == (curve, compressed)
        pk = parse_rotation_key(did_key)
        assert pk.curve == curve and pk.compressed == compressed and pk.did_key == did_key
        assert key_curve(did_key) == curve and is_wellformed_did_key(did_key)


@pytest.mark.parametrize("curve", CURVES)
def test_signing_key_did_key_matches_library_point(curve):
    k = SigningKey(curve, (4242).to_bytes(32, "big"))
    assert decode_did_key(k.did_key) == (curve, _compressed(curve, 4242)[0])


@pytest.mark.parametrize("curve", CURVES)
def test_uncompressed_point_rejected_as_rotation_key_but_wellformed_vm(curve):
    _, uncompressed = _compressed(curve, 99)
    did_key = "did:key:z" + base58.b58encode(PREFIX[curve] + uncompressed).decode()
    with pytest.raises(KeyError_, match="Expected 33 byte compress pubkey"):
        decode_did_key(did_key)
    assert parse_rotation_key(did_key) is None
    assert key_curve(did_key) is None
    assert is_wellformed_did_key(did_key)


def test_ed25519_rejected_as_rotation_key_but_wellformed_vm():
    did_key = "did:key:z" + base58.b58encode(b"\xed\x01" + bytes(32)).decode()
    assert did_key.startswith("did:key:z6Mk")
    with pytest.raises(KeyError_, match="Unsupported key type"):
        decode_did_key(did_key)
    assert parse_rotation_key(did_key) is None and key_curve(did_key) is None
    assert is_wellformed_did_key(did_key)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "did:key:",
        "did:key:z",
        "did:key:Q3shokFTS3brHcDQrn82RUDfCZESWL1ZdCEJwekUDPQiYBme",  # no multibase prefix
        "did:key:mQ3shokFTS3brHcDQrn82RUDfCZESWL1ZdCEJwekUDPQiYBme",  # base64 multibase
        "did:key:zQ3shokFTS3brHcDQrn82RUDfCZESWL1ZdCEJwekUDPQiYB0e",  # '0' is not base58
        "did:key:zQ3shokFTS3brHcDQrn82RUDfCZESWL1ZdCEJwekUDPQiYBm",  # truncated
        "did:web:example.com",
        "DID:KEY:zQ3shokFTS3brHcDQrn82RUDfCZESWL1ZdCEJwekUDPQiYBme",
    ],
)
def test_malformed_did_keys(text):
    with pytest.raises(KeyError_):
        decode_did_key(text)
    assert parse_rotation_key(text) is None


def test_wellformed_vm_key_rules():
    assert is_wellformed_did_key("did:key:z" + "2" * 247)  # any base58, any length
    assert not is_wellformed_did_key("did:key:z0")  # '0' not in base58btc
    assert not is_wellformed_did_key("did:key:Q3sh")
    assert not is_wellformed_did_key("did:plc:z72i7hdynmk6r22z27h6tvur")


def test_off_curve_compressed_point_is_not_a_rotation_key():
    # x = 5 is not the x-coordinate of a secp256k1 point (y^2 = 132 has no root); a 0x02 prefix
    # with a non-residue must not parse
    bad = format_did_key(K256, b"\x02" + (5).to_bytes(32, "big"))
    assert decode_did_key(bad)[0] == K256  # syntactically fine ...
    assert parse_rotation_key(bad) is None  # ... but not a usable key
    digest = hashlib.sha256(b"x").digest()
    good = SigningKey.from_seed(K256, b"g")
    sig = good.sign_raw(b"x")
    # The reference's in-order scan throws when it reaches a key it cannot parse (a 500),
    # even if a later key would verify; a bad key after the signer is never reached.
    with pytest.raises(UnsupportedKeyError):
        first_verifying_key([bad, good.did_key], digest, sig)
    assert first_verifying_key([good.did_key, bad], digest, sig) == 0
    with pytest.raises(UnsupportedKeyError):
        first_verifying_key([good.did_key, bad], digest, SigningKey.from_seed(K256, b"other").sign_raw(b"x"))


def test_signer_index_is_the_first_listed_position_whatever_the_try_order():
    digest = hashlib.sha256(b"y").digest()
    a, b = SigningKey.from_seed(K256, b"a"), SigningKey.from_seed(P256, b"b")
    sig = b.sign_raw(b"y")
    for _ in range(3):  # make b the most frequent signer, so it is tried first
        assert first_verifying_key([a.did_key, b.did_key], digest, sig) == 1
    assert first_verifying_key([a.did_key, b.did_key, b.did_key], digest, sig) == 1
    assert first_verifying_key([b.did_key, a.did_key, b.did_key], digest, sig) == 0
    assert first_verifying_key([a.did_key], digest, sig) == -1


# ----------------------------------------------------------------------------- strict sig decoding
_KEY = SigningKey.from_seed(K256, b"table")
GOOD = _KEY.sign(b"message")
GOOD_RAW = _KEY.sign_raw(b"message")


def _tail_bits(sig: str) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    return sig[:-1] + alphabet[(alphabet.index(sig[-1]) & ~0xF) | 0x4]


# (name, sig text, reason, status)
DECODE_TABLE = [
    ("trailing_pad_1", GOOD + "=", Reason.SIG_PADDING, 400),
    ("trailing_pad_2", GOOD + "==", Reason.SIG_PADDING, 400),
    ("trailing_newline", GOOD + "\n", Reason.SIG_ENCODING, 500),
    ("trailing_crlf", GOOD + "\r\n", Reason.SIG_ENCODING, 500),
    ("leading_space", " " + GOOD, Reason.SIG_ENCODING, 500),
    ("inner_space", GOOD[:10] + " " + GOOD[11:], Reason.SIG_ENCODING, 500),
    ("tab", GOOD[:10] + "\t" + GOOD[11:], Reason.SIG_ENCODING, 500),
    ("plus", GOOD[:10] + "+" + GOOD[11:], Reason.SIG_ENCODING, 500),
    ("slash", GOOD[:10] + "/" + GOOD[11:], Reason.SIG_ENCODING, 500),
    ("inner_equals", GOOD[:10] + "=" + GOOD[11:], Reason.SIG_ENCODING, 500),
    ("non_ascii", GOOD[:10] + "é" + GOOD[11:], Reason.SIG_ENCODING, 500),
    ("nul", GOOD[:10] + "\x00" + GOOD[11:], Reason.SIG_ENCODING, 500),
    ("nonzero_tail_bits", _tail_bits(GOOD), Reason.SIG_ENCODING, 500),
    ("length_4k_plus_1", GOOD[:85], Reason.SIG_ENCODING, 500),
    ("empty", "", Reason.SIG_LENGTH, 400),
    ("one_byte", encode_sig(b"\x01"), Reason.SIG_LENGTH, 400),
    ("63_bytes", encode_sig(GOOD_RAW[:63]), Reason.SIG_LENGTH, 400),
    ("65_bytes", encode_sig(GOOD_RAW + b"\x00"), Reason.SIG_LENGTH, 400),
    ("der", encode_sig(der_encode(GOOD_RAW)), Reason.SIG_LENGTH, 400),
    ("padded_der", base64.urlsafe_b64encode(der_encode(GOOD_RAW)).decode(), None, 400),
]


@pytest.mark.parametrize("name,text,reason,status", DECODE_TABLE, ids=[r[0] for r in DECODE_TABLE])
def test_strict_sig_decoding_table(name, text, reason, status):
    with pytest.raises(SigDecodeError) as exc:
        decode_sig(text)
    assert exc.value.status == status
    if reason is None:  # padded DER: padding when the length leaves a remainder, else length
        assert exc.value.reason in (Reason.SIG_PADDING, Reason.SIG_LENGTH)
    else:
        assert exc.value.reason == reason
    assert str(exc.value)  # a human-readable detail


def test_strict_sig_decoding_accepts_canonical():
    assert len(GOOD) == 86
    assert decode_sig(GOOD) == GOOD_RAW
    assert encode_sig(GOOD_RAW) == GOOD
    assert decode_sig(encode_sig(bytes(64))) == bytes(64)
    assert decode_sig(encode_sig(b"\xff" * 64)) == b"\xff" * 64


# ----------------------------------------------------------------------------- signing
@pytest.mark.parametrize("curve", CURVES)
def test_low_s_signing_always_low_s(curve):
    for i in range(60):
        k = SigningKey.from_seed(curve, b"low-s-%d" % i)
        data = b"data-%d" % i
        raw = k.sign_raw(data)
        s = int.from_bytes(raw[32:], "big")
        assert 0 < s <= HALF_N[curve] and is_low_s(curve, raw)
        digest = hashlib.sha256(data).digest()
        pk = parse_rotation_key(k.did_key)
        assert verify_digest(pk, digest, raw)
        assert decode_sig(k.sign(data)) == raw
        high = k.sign_raw(data, high_s=True)
        assert high[:32] == raw[:32] and int.from_bytes(high[32:], "big") == ORDER[curve] - s
        assert not is_low_s(curve, high) and not verify_digest(pk, digest, high)


@pytest.mark.parametrize("curve", CURVES)
def test_signatures_verify_with_the_libraries(curve):
    """A signature from SigningKey is a standard ECDSA-SHA256 signature (checked with the
    library's own DER verifier, independently of verify_digest)."""
    k = SigningKey.from_seed(curve, b"interop")
    data = b"hello plc"
    raw = k.sign_raw(data)
    _, compressed = decode_did_key(k.did_key)
    if curve == K256:
        assert coincurve.PublicKey(compressed).verify(der_encode(raw), data)
    else:
        from cryptography.hazmat.primitives import hashes

        pub = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), compressed)
        pub.verify(der_encode(raw), data, ec.ECDSA(hashes.SHA256()))  # raises if invalid


@pytest.mark.parametrize("curve", CURVES)
def test_signing_key_determinism(curve):
    a1, a2 = SigningKey.from_seed(curve, b"alice"), SigningKey.from_seed(curve, b"alice")
    b = SigningKey.from_seed(curve, b"bob")
    assert a1.did_key == a2.did_key != b.did_key
    assert a1.secret == a2.secret and len(a1.secret) == 32
    assert a1.sign(b"x") == a2.sign(b"x")  # RFC 6979: same key, same data, same signature
    assert a1.sign(b"x") != a1.sign(b"y")
    assert a1.sign(b"x") != b.sign(b"x")
    other = P256 if curve == K256 else K256
    assert SigningKey.from_seed(other, b"alice").did_key != a1.did_key
    assert 0 < int.from_bytes(a1.secret, "big") < ORDER[curve]


def test_verification_rejects_wrong_key_data_and_degenerate_values():
    for curve in CURVES:
        k = SigningKey.from_seed(curve, b"v")
        other = SigningKey.from_seed(curve, b"w")
        raw = k.sign_raw(b"data")
        digest = hashlib.sha256(b"data").digest()
        pk, opk = parse_rotation_key(k.did_key), parse_rotation_key(other.did_key)
        assert verify_digest(pk, digest, raw)
        assert not verify_digest(opk, digest, raw)
        assert not verify_digest(pk, hashlib.sha256(b"datb").digest(), raw)
        assert not verify_digest(pk, digest, bytes(64))  # r = s = 0
        assert not verify_digest(pk, digest, raw[:32] + bytes(32))  # s = 0
        assert not verify_digest(pk, digest, bytes(32) + raw[32:])  # r = 0
        n = ORDER[curve].to_bytes(32, "big")
        assert not verify_digest(pk, digest, n + raw[32:])  # r = n
        assert first_verifying_key([other.did_key, k.did_key, k.did_key], digest, raw) == 1
        assert first_verifying_key([other.did_key], digest, raw) == -1
        assert first_verifying_key([], digest, raw) == -1
