"""Strict signature decoding, verification and low-S signing (spec §3.3).

A `sig` is unpadded base64url of a 64-byte compact `r||s` ECDSA-SHA256 signature with low S.
Verification of secp256k1 uses libsecp256k1 (coincurve); P-256 uses OpenSSL (cryptography)
with an explicit low-S check.
"""

from __future__ import annotations

import base64
import hashlib
import re
import threading
from typing import Any

import coincurve
import libipld
from coincurve.context import GLOBAL_CONTEXT
from coincurve.ecdsa import der_to_cdata, ffi, lib, serialize_compact
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils

from .didkey import K256, P256, PublicKey, format_did_key, parse_rotation_key
from .errors import OpError, Reason

N_K256 = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
N_P256 = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
HALF_N = {K256: N_K256 // 2, P256: N_P256 // 2}
ORDER = {K256: N_K256, P256: N_P256}

_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_P256_ALG = ec.ECDSA(utils.Prehashed(hashes.SHA256()))
_CTX = GLOBAL_CONTEXT.ctx


class SigDecodeError(ValueError):
    def __init__(self, reason: str, status: int, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.status = status


def decode_sig(sig: str) -> bytes:
    """Strictly decode a `sig` string to 64 bytes, or raise SigDecodeError.

    Status codes follow the reference: a trailing '=' and a wrong length are 400 (invalid
    signature); a non-alphabet character (including whitespace, '+', '/', an inner '=') and
    non-zero unused tail bits make its base64 decoder throw, which it answers with 500.
    """
    # Fast path: libipld's multibase decoder is strict (alphabet, no padding, zero tail bits);
    # anything it refuses is classified below.
    try:
        raw = libipld.decode_multibase("u" + sig)[1]
    except ValueError:
        pass
    else:
        if len(raw) == 64:
            return raw
    if sig.endswith("="):
        raise SigDecodeError(Reason.SIG_PADDING, 400, "signature has base64 padding")
    if _B64URL.fullmatch(sig) is None:
        raise SigDecodeError(Reason.SIG_ENCODING, 500, "Non-base64url character")
    rem = len(sig) % 4
    if rem == 1:
        raise SigDecodeError(Reason.SIG_ENCODING, 500, "Unexpected end of data")
    raw = base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4))
    # canonical: re-encoding must give the same text (unused tail bits are zero)
    if rem and base64.urlsafe_b64encode(raw).rstrip(b"=").decode() != sig:
        raise SigDecodeError(Reason.SIG_ENCODING, 500, "Unexpected end of data")
    if len(raw) != 64:
        raise SigDecodeError(Reason.SIG_LENGTH, 400, f"signature is {len(raw)} bytes, not 64")
    return raw


def encode_sig(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def is_low_s(curve: str, sig64: bytes) -> bool:
    s = int.from_bytes(sig64[32:], "big")
    return 0 < s <= HALF_N[curve]


_tls = threading.local()


def _sig_buffer() -> Any:
    """A per-thread libsecp256k1 signature struct (cffi releases the GIL during C calls)."""
    try:
        return _tls.sig
    except AttributeError:
        _tls.sig = ffi.new("secp256k1_ecdsa_signature *")
        return _tls.sig


def verify_digest(key: PublicKey, digest: bytes, sig64: bytes) -> bool:
    """Verify a compact low-S signature over a SHA-256 digest. High S never verifies."""
    if key.curve == K256:
        # libsecp256k1 accepts only lower-S signatures (s <= n/2) and refuses r, s >= n or 0
        buf = _sig_buffer()
        if not lib.secp256k1_ecdsa_signature_parse_compact(_CTX, buf, sig64):
            return False
        return bool(lib.secp256k1_ecdsa_verify(_CTX, buf, digest, key.handle.public_key))  # type: ignore[attr-defined]
    r = int.from_bytes(sig64[:32], "big")
    s = int.from_bytes(sig64[32:], "big")
    if not (0 < r < N_P256 and 0 < s <= HALF_N[P256]):
        return False
    try:
        key.handle.verify(utils.encode_dss_signature(r, s), digest, _P256_ALG)  # type: ignore[attr-defined]
    except InvalidSignature:
        return False
    return True


class UnsupportedKeyError(ValueError):
    """A listed key that is not a usable k256/p256 did:key was reached while scanning for the
    signer. The reference's key parser throws there (a 500), even if a later key would verify."""


# Per key list (process-wide, bounded): the parsed keys and the index to try first: the one
# that signed last, or for a new list the key that has signed most often anywhere (a few PDS
# keys sign most of the directory). The hint decides only which key is tried first, never the
# outcome: see first_verifying_key.
_key_lists: dict[tuple[str, ...], list[Any]] = {}
_signatures_by_key: dict[str, int] = {}
_CACHE_MAX = 100_000


def _key_list(keys: tuple[str, ...]) -> list[Any]:
    entry = _key_lists.get(keys)
    if entry is None:
        hint = 0
        if len(keys) > 1 and _signatures_by_key:
            hint = max(range(len(keys)), key=lambda i: _signatures_by_key.get(keys[i], 0))
        entry = [tuple(parse_rotation_key(k) for k in keys), hint]
        if len(_key_lists) >= _CACHE_MAX:
            _key_lists.clear()
        _key_lists[keys] = entry
    return entry


def first_verifying_key(keys: tuple[str, ...] | list[str], digest: bytes, sig64: bytes) -> int:
    """The reference's signer: the index of the first key, in list order, that verifies; -1
    if none does. Raises UnsupportedKeyError where the reference's in-order scan would reach a
    key it cannot parse.

    The key that last signed for the same key list (or, for a new list, the most frequent
    signer) is *tried* first — DIDs on one PDS share a key list, and bsky.social's PDS signs
    with index 1 — then the rest in order, and a hit is mapped back to the first index holding
    the same key. This gives the same answer as an
    in-order scan: at most two public keys verify a given (r, s, digest) (the two points with
    x = r), and two *listed* keys cannot both be among them, because the signed bytes include
    the key list itself (genesis) or the CID of the op holding it (updates) — arranging it
    would need a hash preimage. A key string is canonical for its point (compressed SEC1 in
    base58btc), so equal points are equal strings.
    """
    if type(keys) is not tuple:
        keys = tuple(keys)
    n = len(keys)
    if n == 0:
        return -1
    entry = _key_list(keys)
    parsed, hint = entry
    found = -1
    if hint < n:
        pk = parsed[hint]
        if pk is not None and verify_digest(pk, digest, sig64):
            found = hint
    if found < 0:
        for i in range(n):
            pk = parsed[i]
            if i != hint and pk is not None and verify_digest(pk, digest, sig64):
                found = i
                break
    if found > 0:
        found = keys.index(keys[found])
    for i in range(n if found < 0 else found):
        if parsed[i] is None:
            raise UnsupportedKeyError(keys[i])
    if found >= 0:
        if found != hint:
            entry[1] = found
        k = keys[found]
        count = _signatures_by_key.get(k)
        if count is not None:
            _signatures_by_key[k] = count + 1
        elif len(_signatures_by_key) < _CACHE_MAX:
            _signatures_by_key[k] = 1
    return found


def sig_error(exc: SigDecodeError, op_json: str) -> OpError:
    if exc.status == 500:
        return OpError(exc.reason, "Internal Server Error", 500, f"sig is not strict unpadded base64url: {exc}")
    return OpError(exc.reason, f"Invalid signature on op: {op_json}", 400)


# ----------------------------------------------------------------------------- signing
class SigningKey:
    """A private key that signs PLC operations with low-S compact signatures (deterministic,
    RFC 6979). For tests and the generator."""

    def __init__(self, curve: str, secret: bytes) -> None:
        self.curve = curve
        self.secret = secret
        if curve == K256:
            self._k = coincurve.PrivateKey(secret)
            compressed = self._k.public_key.format(compressed=True)
        elif curve == P256:
            self._k = ec.derive_private_key(int.from_bytes(secret, "big"), ec.SECP256R1())
            from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

            compressed = self._k.public_key().public_bytes(Encoding.X962, PublicFormat.CompressedPoint)
        else:
            raise ValueError(f"unknown curve {curve}")
        self.did_key = format_did_key(curve, compressed)

    @classmethod
    def from_seed(cls, curve: str, seed: bytes) -> "SigningKey":
        """A key derived deterministically from arbitrary seed bytes."""
        n = ORDER[curve]
        d = int.from_bytes(hashlib.sha256(b"plc-key:" + seed).digest(), "big") % (n - 1) + 1
        return cls(curve, d.to_bytes(32, "big"))

    def sign_raw(self, data: bytes, *, high_s: bool = False) -> bytes:
        """64-byte compact signature over sha256(data); low-S unless high_s is asked for."""
        if self.curve == K256:
            sig = serialize_compact(der_to_cdata(self._k.sign(data)))
        else:
            der = self._k.sign(data, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))
            r, s = utils.decode_dss_signature(der)
            sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        r_b, s = sig[:32], int.from_bytes(sig[32:], "big")
        n = ORDER[self.curve]
        if (s > n // 2) != high_s:
            s = n - s
        return r_b + s.to_bytes(32, "big")

    def sign(self, data: bytes) -> str:
        return encode_sig(self.sign_raw(data))


def der_encode(sig64: bytes) -> bytes:
    """DER form of a compact signature (to build invalid test data)."""
    return utils.encode_dss_signature(int.from_bytes(sig64[:32], "big"), int.from_bytes(sig64[32:], "big"))


__all__ = [
    "SigDecodeError",
    "SigningKey",
    "decode_sig",
    "encode_sig",
    "first_verifying_key",
    "is_low_s",
    "verify_digest",
    "der_encode",
    "sig_error",
]
