"""plc: a validating, byte-compatible, highly available mirror of the did:plc directory."""

__version__ = "0.1.0"
