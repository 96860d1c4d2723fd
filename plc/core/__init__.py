"""The pure core: did:key, signatures, DAG-CBOR/CID encoding, op-log validation, rendering.

Nothing in this package does I/O or reads the clock; time is always passed in (milliseconds
since the epoch, UTC).
"""
