"""Clean, redact and filter steps on concrete strings."""

from __future__ import annotations

from collections import Counter

import pytest

from data_prep.steps.clean import clean_text
from data_prep.steps.filters import ChatThresholds, GopherThresholds, chat_checks, gopher_quality
from data_prep.steps.redact import luhn_valid, redact


def test_clean_repairs_mojibake_entities_and_whitespace() -> None:
    assert (
        clean_text("The cafÃ© is   open&nbsp;now\u200b.\r\n\r\n\r\n\r\nNext  line  ")
        == "The café is open now.\n\nNext line"
    )


@pytest.mark.parametrize(
    ("text", "expected", "kind"),
    [
        ("Write to jane.doe+shop@mail.example.co.uk today", "Write to [EMAIL] today", "email"),
        ("Call +1 (555) 123-4567 now", "Call [PHONE] now", "phone"),
        ("or 020 7946 0958 in London", "or [PHONE] in London", "phone"),
        ("server 10.0.0.254 failed", "server [IP] failed", "ip"),
        ("v6 2001:db8:85a3::8a2e:370:7334 up", "v6 [IP] up", "ip"),
        ("card 4111 1111 1111 1111 ok", "card [CARD] ok", "card"),
        ("card 5500-0000-0000-0004 ok", "card [CARD] ok", "card"),
    ],
)
def test_redact_each_type(text: str, expected: str, kind: str) -> None:
    counts: Counter = Counter()
    assert redact(text, counts=counts) == expected
    assert counts == Counter({kind: 1})


@pytest.mark.parametrize(
    "text",
    [
        "card 4111 1111 1111 1112 is not Luhn-valid",
        "price $1,299.00 on 2024-01-15 at 12:30:45",
        "SKU 12345678 and version 1.2.3.4.5 and 999.1.1.1",
        "order #20240115 of 3 items",
    ],
)
def test_redact_leaves_non_pii_alone(text: str) -> None:
    counts: Counter = Counter()
    assert redact(text, counts=counts) == text
    assert not counts


def test_luhn() -> None:
    assert luhn_valid("4111111111111111") and luhn_valid("378282246310005")
    assert not luhn_valid("4111111111111112") and not luhn_valid("378282246310006")


def test_redact_only_selected_types() -> None:
    assert redact("a@b.io 10.0.0.1", types=["ip"]) == "a@b.io [IP]"


GOOD = (
    "The kettle is made of brushed steel and holds one point seven litres of water. "
    "It boils in under three minutes and switches off by itself when the water is ready. "
    "Customers say that the handle stays cool and that the lid opens with one hand, which "
    "is handy when you are cooking. The base turns freely, so the kettle can be lifted from any side."
)


def test_gopher_keeps_normal_prose() -> None:
    assert gopher_quality(GOOD, GopherThresholds(min_words=20)) is None


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (GOOD + " " + "the steel kettle boils water fast and safely " * 6, "gopher_dup_5gram"),
        ("buy now cheap deal " * 40, "gopher_stop_words"),
        ("#tag #deal #sale #buy #now #cheap " * 20, "gopher_symbol_ratio"),
        ("\n".join(["Read more..."] * 3 + [GOOD]), "gopher_ellipsis_lines"),
        ("1234 5678 9012 3456 " * 20 + GOOD, "gopher_alpha_words"),
        ("\n".join(["Same line repeated here"] * 10 + [GOOD]), "gopher_duplicate_lines"),
    ],
)
def test_gopher_rejects_with_rule_name(text: str, reason: str) -> None:
    got = gopher_quality(text, GopherThresholds(min_words=20))
    assert got is not None and got.startswith(reason), got


def test_gopher_does_not_judge_short_text() -> None:
    assert gopher_quality("#### ....", GopherThresholds(min_words=20)) is None


def test_chat_checks() -> None:
    t = ChatThresholds(min_assistant_chars=2, max_message_words=5)
    u = {"role": "user", "content": "Hi there"}
    assert chat_checks([u, {"role": "assistant", "content": "Hello"}], t) is None
    assert chat_checks([u, {"role": "assistant", "content": "  "}], t).startswith("empty_assistant")
    assert chat_checks([u, {"role": "assistant", "content": "K"}], t) == "too_short_assistant: 1 < 2 chars"
    assert chat_checks([u, {"role": "assistant", "content": "one two three four five six"}], t).startswith(
        "too_long_assistant"
    )
    assert chat_checks([u], t) == "no_assistant_message"
    assert chat_checks([], t) == "empty_messages"


def test_pii_counted_in_report_and_redacted_in_output(tmp_path) -> None:
    import json

    from data_prep.build import build

    path = tmp_path / "qa.jsonl"
    path.write_text(
        json.dumps(
            {
                "question": "My card 4111 1111 1111 1111 was charged twice",
                "answer": "Mail billing@shop.example or call 555-123-4567.",
            }
        )
        + "\n"
    )
    report = build([path], tmp_path / "out", test_fraction=0, val_fraction=0)
    ex = json.loads((tmp_path / "out" / "train.jsonl").read_text())
    assert ex["messages"][0]["content"] == "My card [CARD] was charged twice"
    assert ex["messages"][1]["content"] == "Mail [EMAIL] or call [PHONE]."
    assert report["pii"] == {"email": 1, "phone": 1, "ip": 0, "card": 1}
