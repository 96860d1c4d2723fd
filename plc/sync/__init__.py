"""Syncing from an upstream PLC directory.

`plc.sync.upstream` reads upstream's `/export` pages and `/export/stream` websocket politely
(rate-limited, retried) and hands back parsed records; it does no validation and no storage —
the caller replays each record through the core and stores what it accepts.
"""
