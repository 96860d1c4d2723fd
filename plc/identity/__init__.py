"""Identity resolution: atproto handles and DIDs to verified identities.

- ``handles``: handle syntax (normalisation, reserved TLDs) and host-level did:web parsing (pure).
- ``documents``: what is read from a DID document: alsoKnownAs handles, the PDS endpoint, the
  signing key, the mini-document (pure).
- ``resolver``: ``IdentityResolver`` (DNS TXT + HTTPS well-known, did:plc from the store,
  did:web over HTTPS, TTL caches with negative caching, ``invalidate_did``) and ``ResolverConfig``.

The XRPC routes that serve it are in ``plc.api.xrpc``; docs/identity.md describes both.
"""

from .resolver import (
    DidDeactivated,
    DidNotFound,
    HandleNotFound,
    Identity,
    IdentityResolver,
    InvalidIdentifier,
    ResolutionError,
    ResolverConfig,
)

__all__ = [
    "DidDeactivated",
    "DidNotFound",
    "HandleNotFound",
    "Identity",
    "IdentityResolver",
    "InvalidIdentifier",
    "ResolutionError",
    "ResolverConfig",
]
