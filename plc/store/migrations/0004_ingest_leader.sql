-- The ingest leader's fencing epoch (plc.sync.leader). Exactly one node of a cluster ingests:
-- the one holding a PostgreSQL session advisory lock on a dedicated connection. When a node
-- takes the lock it increments `epoch` here and remembers the value; every ingest commit
-- re-reads the row (FOR SHARE, in the commit's own transaction) and aborts unless the epoch
-- is still its own. A deposed leader (lock lost, connection dropped, partitioned, paused) can
-- therefore never commit after another node took over.
CREATE TABLE plc_ingest_leader (
    id    smallint PRIMARY KEY DEFAULT 1 CHECK (id = 1),  -- a single row
    epoch bigint   NOT NULL,
    node  text     NOT NULL,   -- who took it (for /-/status and operators)
    since bigint   NOT NULL    -- when, ms since the epoch
);
INSERT INTO plc_ingest_leader (epoch, node, since) VALUES (0, '', 0);
