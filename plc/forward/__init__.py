"""Forwarding submitted ops (``POST /:did``) to the upstream directory.

- ``validate``: the verdict on a submitted op against this node's state (certainly invalid →
  the core's OpError; valid; or unverified because the mirror may be behind).
- ``upstream_post``: the httpx + tenacity client that POSTs to an upstream and retries only
  where that is safe, with the audit-log check for "already applied".
- ``limits``: token buckets per client address (IPv6 /64) and per DID.
- ``ForwardConfig``: the settings (``config_from_args`` reads them from parsed CLI arguments);
  ``ForwardMetrics``: the Prometheus metrics, in the app's own registry.

The HTTP handler is ``plc.api.forward``; pending ops live in ``plc.store.pending``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .limits import Network, Rate, parse_networks, parse_rate

DEFAULT_RETRY_BUDGET_S = 30.0
DEFAULT_PENDING_WINDOW_S = 600.0
DEFAULT_IP_RATE = "60/3600"
DEFAULT_DID_RATE = "10/3600"
DEFAULT_MAX_BODY = 65536
OFF = "off"


@dataclass(frozen=True)
class ForwardConfig:
    """Where and how ``POST /:did`` is forwarded. ``upstreams[0]`` is the one whose answer is
    relayed; any others get the same POST at the same time (their answers are reported in the
    ``x-plc-upstream-answers`` header)."""

    upstreams: tuple[str, ...]
    retry_budget_s: float = DEFAULT_RETRY_BUDGET_S
    pending_window_s: float = DEFAULT_PENDING_WINDOW_S
    ip_rate: Rate | None = field(default_factory=lambda: parse_rate(DEFAULT_IP_RATE))
    did_rate: Rate | None = field(default_factory=lambda: parse_rate(DEFAULT_DID_RATE))
    max_body: int = DEFAULT_MAX_BODY
    trusted_proxies: tuple[Network, ...] = ()
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 20.0
    backoff_initial_s: float = 0.25
    backoff_max_s: float = 5.0
    expire_interval_s: float | None = None  # default: a tenth of the window, 1–60 s

    def __post_init__(self) -> None:
        if not self.upstreams:
            raise ValueError("forwarding needs at least one upstream")
        if self.max_body < 1:
            raise ValueError("the body limit must be at least 1 byte")

    @property
    def expire_every_s(self) -> float:
        if self.expire_interval_s is not None:
            return self.expire_interval_s
        return min(60.0, max(1.0, self.pending_window_s / 10))


def parse_upstreams(text: str | None, default: str) -> tuple[str, ...] | None:
    """Comma-separated base URLs; empty/None → ``(default,)``; ``off`` → None (no forwarding)."""
    from plc.sync.upstream import check_upstream_url

    if text is None or text.strip() == "":
        return (check_upstream_url(default),)
    if text.strip().lower() == OFF:
        return None
    return tuple(check_upstream_url(u.strip()) for u in text.split(",") if u.strip())


def config_from_args(args: Any, default_upstream: str) -> ForwardConfig | None:
    """The forwarding settings from parsed ``plc serve`` arguments (None: forwarding off).
    Raises ``plc.settings.SettingError`` (one line) for a bad value."""
    from plc.settings import SettingError

    try:
        return _config_from_args(args, default_upstream)
    except ValueError as exc:
        raise SettingError(f"forwarding: {exc}") from None


def _config_from_args(args: Any, default_upstream: str) -> ForwardConfig | None:
    upstreams = parse_upstreams(args.forward_upstream, default_upstream)
    if upstreams is None:
        return None
    return ForwardConfig(
        upstreams=upstreams,
        retry_budget_s=float(args.forward_retry_budget),
        pending_window_s=float(args.forward_pending_window),
        ip_rate=parse_rate(args.forward_ip_rate),
        did_rate=parse_rate(args.forward_did_rate),
        max_body=int(args.forward_max_body),
        trusted_proxies=parse_networks(args.trusted_proxies),
    )


class ForwardMetrics:
    """The forwarding metrics, registered in ``registry`` (the app's own)."""

    def __init__(self, registry: CollectorRegistry):
        self.forwarded = Counter("plc_forward_forwarded", "Submitted ops forwarded upstream, by local validation",
                                 ["validation"], registry=registry)
        self.refused = Counter("plc_forward_refused", "Submitted ops refused locally (never forwarded), by reason",
                               ["reason"], registry=registry)
        self.upstream_responses = Counter(
            "plc_forward_upstream_responses",
            "Upstream answers to forwarded POSTs, by upstream and status (or connect_error / no_answer)",
            ["upstream", "status"], registry=registry)
        self.upstream_latency = Histogram("plc_forward_upstream_duration_seconds",
                                          "Time of one POST attempt to an upstream", ["upstream"], registry=registry)
        self.applied_per_audit = Counter(
            "plc_forward_applied_per_audit",
            "Submissions reported successful because the op showed up in the upstream's audit log",
            registry=registry)
        self.pending = Gauge("plc_forward_pending_ops", "Ops accepted upstream and not yet ingested",
                             registry=registry)
        self.unpublished = Counter("plc_forward_unpublished",
                                   "Ops accepted upstream but never published (divergences written)",
                                   registry=registry)


__all__ = ["ForwardConfig", "ForwardMetrics", "config_from_args", "parse_upstreams"]
