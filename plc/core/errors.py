"""The single error type of the core: a rejected operation, with a machine-readable reason,
the reference server's message text and the HTTP status the reference answers with."""

from __future__ import annotations


class OpError(Exception):
    """An operation that the chain engine refuses.

    ``reason`` is one of the ``Reason`` constants (stable, for metrics and reports);
    ``message`` is the reference server's exact text; ``status`` its HTTP status; ``detail``
    says what is wrong for a human where the reference's text does not (its 500s).
    """

    __slots__ = ("reason", "message", "status", "detail")

    def __init__(self, reason: str, message: str, status: int = 400, detail: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.status = status
        self.detail = detail or message

    def __repr__(self) -> str:
        return f"OpError({self.reason!r}, {self.message!r}, {self.status})"


class Reason:
    """Machine-readable rejection reasons."""

    # shape and encoding
    INVALID_SHAPE = "invalid_shape"  # not a plc_operation / plc_tombstone / create, or extra/missing fields
    LEGACY_CREATE_SUBMITTED = "legacy_create_submitted"  # a new `create` op (submit mode only)
    TOO_LARGE = "too_large"  # DAG-CBOR over 4000 bytes (submit)
    CONSTRAINT = "constraint"  # a count/length/key-format limit (submit)
    NUL_CHARACTER = "nul_character"  # U+0000 or a lone surrogate: jsonb cannot store it (500)
    CID_MISMATCH = "cid_mismatch"  # upstream's cid differs from the computed one (replay)
    # signatures
    SIG_ENCODING = "sig_encoding"  # not strict unpadded base64url (the reference answers 500)
    SIG_PADDING = "sig_padding"  # trailing '=' padding
    SIG_LENGTH = "sig_length"  # does not decode to exactly 64 bytes (DER, truncated, empty)
    SIG_HIGH_S = "sig_high_s"  # s > n/2
    SIG_INVALID = "sig_invalid"  # no allowed key verifies it
    UNSUPPORTED_KEY = "unsupported_key"  # the scan for the signer reached an unparseable key (500)
    # chain
    GENESIS_HASH = "genesis_hash"  # genesis does not hash to the DID
    GENESIS_PREV = "genesis_prev"  # genesis with a non-null prev
    PREV_MALFORMED = "prev_malformed"  # prev is not a parseable CID (the reference answers 500)
    MISORDERED = "misordered"  # prev unknown / nullified / tombstone / null on existing DID
    TIMESTAMP_ORDER = "timestamp_order"  # createdAt not after prev's (replay sanity check)
    LATE_RECOVERY = "late_recovery"  # nullification more than 72 h after the first nullified op
    RATE_LIMIT = "rate_limit"  # per-DID hourly/daily/weekly limit (submit)
    DUPLICATE = "duplicate"  # the same (did, cid) again (replay input)


MISORDERED_TEXT = "Operations not correctly ordered"
INTERNAL_ERROR_TEXT = "Internal Server Error"
