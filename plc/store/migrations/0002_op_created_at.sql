-- Legacy (createdAt-ordered) /export: `WHERE created_at > $after ORDER BY created_at LIMIT n`
-- (plc.api.export). Ties within one millisecond are put in cid order by the reader.
CREATE INDEX plc_op_created_at ON plc_op (created_at);
