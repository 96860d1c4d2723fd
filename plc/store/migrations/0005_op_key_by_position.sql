-- plc_op's primary key becomes (did_id, pos) instead of (did_id, cid): 20 B per index entry
-- instead of 52 (a 4-byte position instead of the 33-byte CID digest), ~60 B per op less on disk
-- (docs/benchmarks.md). It still serves the per-DID lookup (a prefix scan already in audit
-- order) and still makes a second copy of an op impossible: `oplog.commit` skips the ops a DID
-- already holds, reading its CIDs inside the commit's transaction, and the one writer is fenced
-- (plc.sync.leader); a second writer computing the same next position for a DID fails on this
-- key and its whole batch rolls back.
ALTER TABLE plc_op DROP CONSTRAINT plc_op_pkey;
ALTER TABLE plc_op ADD CONSTRAINT plc_op_pkey PRIMARY KEY (did_id, pos);
