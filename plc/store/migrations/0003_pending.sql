-- Ops this node forwarded to an upstream that accepted them (HTTP 200) but that the ingest has
-- not stored yet ("pending upstream"). Reads merge them into the DID's stored ops so a client
-- sees its own write at once (plc.store.pending). The ingest deletes a row in the transaction
-- that stores its op (pending.reconcile); a row still here after the pending window becomes an
-- `unpublished` divergence ("accepted upstream but never published") and is deleted
-- (pending.expire). Rows are few and short-lived, so texts are kept as texts.
CREATE TABLE plc_pending (
    did          text        NOT NULL,        -- the did:plc, as text
    cid          text        NOT NULL,        -- the op's CID, canonical text
    upstream     text        NOT NULL,        -- base URL of the upstream that answered 200
    created_at   bigint      NOT NULL,        -- our receive time, ms (the op's createdAt for reads)
    forwarded_at timestamptz NOT NULL DEFAULT now(),
    nullifies    text[]      NOT NULL DEFAULT '{}',  -- CIDs of the stored ops this op nullifies
    op           bytea       NOT NULL,        -- packed DAG-CBOR, as plc_op.op (plc.store.oplog.stored_op)
    PRIMARY KEY (did, cid)
);
CREATE INDEX plc_pending_created_at ON plc_pending (created_at);
