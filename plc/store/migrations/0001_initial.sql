-- The mirror's store: one row per DID, one row per operation, one cursor per upstream, and
-- the divergence record. Compactness matters (production holds 80-90 M ops): CIDs are kept
-- as their 32-byte SHA-256 digest (every op CID is CIDv1 dag-cbor sha2-256), times as integer
-- milliseconds, DIDs by an integer id, and the op itself as compact DAG-CBOR (plc.store.oplog).

-- DIDs are stored once; ops refer to them by a 4-byte id (2^31 DIDs; production has ~10^8).
-- A did:plc is "did:plc:" + 24 base32 characters: `did` holds those 120 bits as 15 bytes
-- (plc.store.oplog.did_bytes / did_text).
CREATE TABLE plc_did (
    id  integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    did bytea   NOT NULL UNIQUE
);

-- One row per accepted op. Fixed-width columns first (8-byte ones, then 4, 2, 1) so that no
-- alignment padding is wasted. The primary key (did_id, cid) makes a second copy of an op
-- impossible and serves the per-DID lookup (a prefix scan, sorted by pos); pos itself needs
-- no index. `op` is the op in plc.store.oplog's packed DAG-CBOR form (it decodes back to the
-- exact op; the CID is the SHA-256 of the op's own DAG-CBOR).
CREATE TABLE plc_op (
    created_at    bigint   NOT NULL,           -- upstream createdAt, ms since the epoch
    seq           bigint,                      -- upstream seq; NULL when upstream gave none
    first_seen_at bigint   NOT NULL,           -- when this node first stored it, ms
    did_id        integer  NOT NULL,           -- plc_did.id
    pos           integer  NOT NULL,           -- 0-based position in the DID's audit log
    signer        smallint NOT NULL,           -- index of the signing key in the parent's keys; -1 genesis
    nullified     boolean  NOT NULL DEFAULT false,  -- computed by us, never copied
    cid           bytea    NOT NULL,           -- SHA-256 digest of the signed DAG-CBOR (32 bytes)
    op            bytea    NOT NULL,           -- packed DAG-CBOR of the op (plc.store.oplog.pack_op)
    PRIMARY KEY (did_id, cid)
);
CREATE UNIQUE INDEX plc_op_seq ON plc_op (seq) WHERE seq IS NOT NULL;

-- One cursor per upstream (its base URL).
CREATE TABLE plc_cursor (
    upstream   text   PRIMARY KEY,
    seq        bigint,          -- sequenced mode: last seq committed
    created_at bigint,          -- legacy mode: createdAt (ms) of the last line committed
    updated_at bigint NOT NULL  -- ms
);

-- Everything upstream did that a witness must remember: rejected ops (with the raw line),
-- history that vanished, backdating, seq regressions and gaps, content conflicts, and
-- nullified flags that contradict ours. Nothing is ever deleted on upstream's word.
CREATE TABLE plc_divergence (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind        text   NOT NULL,   -- rejected | vanished | backdated | seq_regression | seq_gap | conflict | nullified_mismatch
    upstream    text   NOT NULL,
    did         text,
    cid         text,
    seq         bigint,
    reason      text,              -- the core's machine-readable reason, for `rejected`
    detail      text   NOT NULL,
    raw         bytea,             -- the line as upstream sent it, when there was one
    observed_at bigint NOT NULL    -- ms
);
CREATE INDEX plc_divergence_kind ON plc_divergence (kind, observed_at);
CREATE INDEX plc_divergence_did ON plc_divergence (did) WHERE did IS NOT NULL;
