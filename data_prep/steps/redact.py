"""PII redaction to typed placeholders: [EMAIL], [IP], [CARD], [PHONE].

Hand-written regexes: presidio needs a spaCy model download, and scrubadub is not in our
dependencies; these four types are regular enough for patterns plus validation
(ipaddress for IPs, Luhn for cards).
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections import Counter

PII_TYPES = ("email", "ip", "card", "phone")

_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}\b")
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w.]*\d)")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
_CARD = re.compile(r"(?<![\w-])\d(?:[ -]?\d){12,18}(?![\w-])")
# Needs a separator structure (or a leading +) so prices, years, dates and SKUs are left alone;
# the look-arounds stop it from eating part of a longer digit run such as a non-Luhn card number.
_PHONE = re.compile(
    r"(?<![\w+])(?<!\d[ .-])"
    r"(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?|\d{2,4}[ .-])\d{2,4}[ .-]\d{3,4}(?:[ .-]\d{3,4})?"
    r"(?![\w]|[ .-]\d)"
    r"|(?<![\w+])\+\d{8,14}(?!\w)"
)


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _ipv4(m: re.Match) -> str | None:
    try:
        ipaddress.IPv4Address(m.group(0))
    except ValueError:
        return None
    return "[IP]"


def _ipv6(m: re.Match) -> str | None:
    s = m.group(0)
    if s.count(":") < 2 or not any(c.isdigit() or c.lower() in "abcdef" for c in s):
        return None
    try:
        ipaddress.IPv6Address(s)
    except ValueError:
        return None
    return "[IP]"


def _card(m: re.Match) -> str | None:
    digits = re.sub(r"\D", "", m.group(0))
    return "[CARD]" if 13 <= len(digits) <= 19 and luhn_valid(digits) else None


def _phone(m: re.Match) -> str | None:
    digits = sum(c.isdigit() for c in m.group(0))
    return "[PHONE]" if 7 <= digits <= 15 else None


# order matters: an IP or card number must be claimed before the phone pattern sees its digits
_RULES = (
    ("email", _EMAIL, lambda m: "[EMAIL]"),
    ("ip", _IPV6, _ipv6),
    ("ip", _IPV4, _ipv4),
    ("card", _CARD, _card),
    ("phone", _PHONE, _phone),
)


def redact(text: str, types: tuple[str, ...] | list[str] = PII_TYPES, counts: Counter | None = None) -> str:
    """Replace PII in `text` by typed placeholders; add one count per replacement to `counts`."""
    for kind, pattern, repl in _RULES:
        if kind not in types:
            continue

        def _sub(m: re.Match, kind: str = kind, repl=repl) -> str:
            out = repl(m)
            if out is None:
                return m.group(0)
            if counts is not None:
                counts[kind] += 1
            return out

        text = pattern.sub(_sub, text)
    return text


def redact_strings(value, types, counts):
    if isinstance(value, str):
        return redact(value, types, counts)
    if isinstance(value, list):
        return [redact_strings(v, types, counts) for v in value]
    if isinstance(value, dict):
        return {k: redact_strings(v, types, counts) for k, v in value.items()}
    return value


def redact_arguments(arguments: str, types: tuple[str, ...] | list[str] = PII_TYPES,
                     counts: Counter | None = None) -> str:
    """Redact the string values of a tool call's JSON `arguments` and serialize them again, so the
    result is always valid JSON (a regex over the raw string could eat a quote or a brace).
    Unchanged arguments come back byte for byte; arguments that are not JSON (the schema rejects
    those) are returned as they are."""
    try:
        parsed = json.loads(arguments)
    except (TypeError, json.JSONDecodeError):
        return arguments
    found: Counter = Counter()
    redacted = redact_strings(parsed, types, found)
    if not found:
        return arguments
    if counts is not None:
        counts.update(found)
    return json.dumps(redacted, ensure_ascii=False)
