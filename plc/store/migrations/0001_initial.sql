-- The mirror's store: one row per DID, one row per operation, one cursor per upstream, and
-- the divergence record. Compactness matters (production holds 80-90 M ops): CIDs are kept
-- as their 32-byte SHA-256 digest (every op CID is CIDv1 dag-cbor sha2-256), times as integer
-- milliseconds, DIDs by a bigint id, and the op itself as its DAG-CBOR bytes.

CREATE TABLE plc_did (
    id  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    did text   NOT NULL UNIQUE
);

CREATE TABLE plc_op (
    did_id        bigint   NOT NULL,           -- plc_did.id
    pos           integer  NOT NULL,           -- 0-based position in the DID's audit log
    cid           bytea    NOT NULL,           -- SHA-256 digest of the signed DAG-CBOR
    created_at    bigint   NOT NULL,           -- upstream createdAt, ms since the epoch
    seq           bigint,                      -- upstream seq; NULL when upstream gave none
    first_seen_at bigint   NOT NULL,           -- when this node first stored it, ms
    nullified     boolean  NOT NULL DEFAULT false,  -- computed by us, never copied
    signer        smallint NOT NULL,           -- index of the signing key in the parent's keys; -1 genesis
    op            bytea    NOT NULL,           -- DAG-CBOR of the op as received
    PRIMARY KEY (did_id, pos)
);
CREATE UNIQUE INDEX plc_op_seq ON plc_op (seq) WHERE seq IS NOT NULL;
CREATE INDEX plc_op_created_at ON plc_op (created_at);

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
