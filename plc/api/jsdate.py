"""JavaScript ``new Date(text).getTime()`` for the forms legacy ``/export?after=`` is given
(spec §1.5), as V8 parses them. The server's local time zone is taken to be UTC.

Supported:
- the ECMAScript ISO format: ``YYYY``, ``YYYY-MM``, ``YYYY-MM-DD`` (UTC), ``…THH:mm``,
  ``…THH:mm:ss``, ``…THH:mm:ss.sss…`` (local time unless ``Z`` or ``±HH:mm`` follows), and
  the extended years ``±YYYYYY`` (not ``-000000``); day 1–31 in any month (V8 rolls the
  overflow into the next month), hour 24 only as ``24:00:00``;
- V8's lenient variant with a space instead of ``T`` (``2022-11-17 00:35:16``, local time);
- RFC 2822 / ``Date.prototype.toUTCString`` style (``Thu, 01 Jan 1970 00:00:00 GMT``);
- ``-1`` → 2001-01-01T00:00 local (a V8 legacy-parser quirk, observed on the reference).

Anything else gives None, which the route answers with 400 ``Invalid after parameter``
(V8's legacy parser accepts more, e.g. ``Nov 17 2022``; see docs/api.md).
"""

from __future__ import annotations

import calendar
import re
from email.utils import parsedate_tz

MAX_MS = 8_640_000_000_000_000  # the ECMAScript time value range

_ISO = re.compile(
    r"(?P<year>[+-][0-9]{6}|[0-9]{4})"
    r"(?:-(?P<month>[0-9]{2})(?:-(?P<day>[0-9]{2}))?)?"
    r"(?:(?P<sep>[T ])(?P<hour>[0-9]{2}):(?P<minute>[0-9]{2})"
    r"(?::(?P<second>[0-9]{2})(?:\.(?P<fraction>[0-9]+))?)?"
    r"(?P<zone>Z|[+-][0-9]{2}:[0-9]{2})?)?",
    re.ASCII,
)


def _days_from_civil(year: int, month: int, day: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (any year; day may overflow)."""
    y = year - (month <= 2)
    era = y // 400  # floor division (the C original truncates, hence its y - 399)
    yoe = y - era * 400
    mp = (month + 9) % 12
    doy = (153 * mp + 2) // 5
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468 + day - 1


def _iso_ms(m: re.Match[str]) -> int | None:
    year_text = m.group("year")
    if year_text == "-000000":
        return None
    year = int(year_text)
    month = int(m.group("month") or 1)
    day = int(m.group("day") or 1)
    if not (1 <= month <= 12 and 1 <= day <= 31):
        return None
    hour = int(m.group("hour") or 0)
    minute = int(m.group("minute") or 0)
    second = int(m.group("second") or 0)
    fraction = m.group("fraction") or ""
    ms = int((fraction + "00")[:3]) if fraction else 0
    if hour > 24 or minute > 59 or second > 59 or (hour == 24 and (minute or second or ms)):
        return None
    total = (((_days_from_civil(year, month, day) * 24 + hour) * 60 + minute) * 60 + second) * 1000 + ms
    zone = m.group("zone")
    if zone and zone != "Z":
        zh, zm = int(zone[1:3]), int(zone[4:6])
        if zh > 23 or zm > 59:
            return None
        offset = (zh * 60 + zm) * 60_000
        total = total - offset if zone[0] == "+" else total + offset
    return total


def parse_js_date(text: str) -> int | None:
    """Milliseconds since the epoch of ``new Date(text)``, or None for an Invalid Date."""
    text = text.strip()
    ms: int | None = None
    m = _ISO.fullmatch(text)
    if m is not None and (m.group("sep") != " " or m.group("day")):
        ms = _iso_ms(m)
    elif text == "-1":
        ms = _days_from_civil(2001, 1, 1) * 86_400_000
    elif text:
        parts = parsedate_tz(text)
        if parts is not None and re.search(r"[A-Za-z]{3}", text):
            year, month, day, hour, minute, second = parts[:6]
            if 1 <= month <= 12 and 1 <= day <= 31 and hour <= 24 and minute <= 59 and second <= 59:
                seconds = calendar.timegm((year, month, 1, hour, minute, second)) + (day - 1) * 86_400
                ms = (seconds - (parts[9] or 0)) * 1000
    if ms is None or abs(ms) > MAX_MS:
        return None
    return ms
