"""Readers on messy real-world inputs: nothing crashes, every bad item is a reject with its reason."""

from __future__ import annotations

import json
from pathlib import Path

import openpyxl
import pytest
from dp_fixtures import read_jsonl

from data_prep.build import build
from data_prep.convert import ColumnMapping, RowError, convert_row
from data_prep.readers.html import is_question, parse_page
from data_prep.readers.tables import read_csv
from data_prep.readers.tables import read_jsonl as read_jsonl_rows
from data_prep.readers.text import DEFAULT_SPEAKERS, looks_like_transcript, parse_transcript

ARTICLE = "<p>" + "The café serves crème brûlée and naïve coffee to every guest who walks in. " * 8 + "</p>"


def _rejects(out: Path) -> dict[str, dict]:
    return {Path(r["source"]).name + "#" + r["locator"]: r for r in read_jsonl(out / "rejects.jsonl")}


def test_windows_1252_page_without_charset_is_decoded(tmp_path: Path) -> None:
    html = (
        f"<html><head><title>Menu</title></head><body><main><article>{ARTICLE}</article></main></body></html>"
    )
    path = tmp_path / "cp1252.html"
    path.write_bytes(html.encode("windows-1252"))
    page = parse_page(str(path))
    assert page.error is None
    assert "crème brûlée" in page.text and "café" in page.text and "Ã" not in page.text


def test_shift_jis_page_is_decoded(tmp_path: Path) -> None:
    body = "<p>" + "この商品の価格は三千円です。配送は二日以内に行われます。" * 10 + "</p>"
    path = tmp_path / "sjis.html"
    path.write_bytes(f"<html><body><article>{body}</article></body></html>".encode("shift_jis"))
    page = parse_page(str(path))
    assert page.error is None and "この商品の価格は三千円です" in page.text


def test_bad_files_never_crash_and_are_rejected_with_reason(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "empty.html").write_bytes(b"")
    (src / "binary.html").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 20)
    (src / "broken.html").write_text(
        "<html><body><div><p>Unclosed <b>tags <details><summary>Is it open?</summary>Yes, 9 to 5"
    )
    (src / "whitespace.html").write_text("   \n\n  ")
    out = tmp_path / "out"
    report = build([src], out)
    rej = _rejects(out)
    assert rej["empty.html#page"]["reason"] == "empty_file"
    assert rej["whitespace.html#page"]["reason"] == "empty_file"
    assert rej["binary.html#page"]["reason"] == "binary_file"
    # broken HTML still yields its <details> pair
    train = [e for s in ("train", "val", "test") for e in read_jsonl(out / f"{s}.jsonl")]
    assert [e["messages"] for e in train] == [
        [{"role": "user", "content": "Is it open?"}, {"role": "assistant", "content": "Yes, 9 to 5"}]
    ]
    assert report["accounting"] == {"records_in": 4, "out": 4, "balanced": True}


def test_structured_qa_json_ld_microdata_details_dl(tmp_path: Path) -> None:
    ld = {
        "@context": "https://schema.org",
        "@type": "FAQPage",
        "mainEntity": [
            {
                "@type": "Question",
                "name": "Do you ship abroad?",
                "acceptedAnswer": {"@type": "Answer", "text": "<p>Yes, to <b>EU</b> countries.</p>"},
            },
            {
                "@type": "Question",
                "name": "Can I pay by invoice?",
                "acceptedAnswer": {"@type": "Answer", "text": "Only for businesses."},
            },
        ],
    }
    html = f"""<html><head><script type="application/ld+json">{json.dumps(ld)}</script></head><body>
    <div itemscope itemtype="https://schema.org/QAPage"><div itemprop="mainEntity" itemscope itemtype="https://schema.org/Question">
      <h2 itemprop="name">How do I reset the kettle?</h2>
      <div itemprop="acceptedAnswer" itemscope itemtype="https://schema.org/Answer"><div itemprop="text">Hold the button for 5 seconds.</div></div>
    </div></div>
    <details><summary>What is the warranty?</summary><p>Two years.</p></details>
    <dl><dt>Weight</dt><dd>2 kg</dd><dt>Is it dishwasher safe?</dt><dd>No, hand wash only.</dd></dl>
    </body></html>"""
    path = tmp_path / "faq.html"
    path.write_text(html)
    qa = [(q, a, k) for q, a, k in parse_page(str(path)).qa]
    assert qa == [
        ("Do you ship abroad?", "Yes, to EU countries.", "json-ld"),
        ("Can I pay by invoice?", "Only for businesses.", "json-ld"),
        ("How do I reset the kettle?", "Hold the button for 5 seconds.", "microdata"),
        ("What is the warranty?", "Two years.", "details"),
        ("Is it dishwasher safe?", "No, hand wash only.", "dl"),
    ]


FAQ_PAGES = {
    "en": ("Shipping", "How much is shipping?", "A flat 5 euros nationwide."),
    "ja": ("配送について", "送料はいくらですか？", "全国一律500円です。"),
    "zh": ("常见问题", "可以退货吗？", "可以，收货后30天内免费退货。"),
}


def test_dl_questions_with_full_width_question_marks_become_examples(tmp_path: Path) -> None:
    pages = tmp_path / "pages"
    pages.mkdir()
    for lang, (title, q, a) in FAQ_PAGES.items():
        (pages / f"faq-{lang}.html").write_text(
            f'<html lang="{lang}"><head><meta charset="utf-8"><title>{title}</title></head><body>'
            f"<dl><dt>{title}</dt><dd>{a[:4]}</dd><dt>{q}</dt><dd>{a}</dd></dl></body></html>",
            encoding="utf-8",
        )
    out = tmp_path / "out"
    report = build([pages], out, seed=0, val_fraction=0.0, test_fraction=0.0)
    got = {ex["meta"]["source"].rsplit("-", 1)[1]: ex["messages"] for ex in read_jsonl(out / "train.jsonl")}
    assert got == {
        f"{lang}.html": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        for lang, (_, q, a) in FAQ_PAGES.items()
    }
    assert report["counts"]["rejects"] == 0  # the <dt> that is no question is not a pair


@pytest.mark.parametrize(
    "text,expected",
    [
        ("هل الشحن مجاني؟", True),  # Arabic
        ("Πόσο κοστίζει;", True),  # Greek, typed with a semicolon
        ("Πόσο κοστίζει\u037e", True),  # Greek question mark
        ("Ինչ արժե՞ առաքումը", True),  # Armenian: the mark sits on the stressed word
        ("ዋጋው ስንት ነው፧", True),  # Ethiopic
        ("배송비는 얼마인가요?", True),
        ("Note;", False),  # a semicolon only asks in Greek
        ("重量", False),
        ("Weight", False),
        ("", False),
    ],
)
def test_is_question_across_scripts(text: str, expected: bool) -> None:
    assert is_question(text) is expected


def test_csv_with_bom_multiline_cells_and_bad_rows(tmp_path: Path) -> None:
    path = tmp_path / "qa.csv"
    text = (
        "question,answer,context\r\n"
        '"How do I\nreset it?","Unplug it,\nthen wait.",\r\n'
        '"What colour?","Blue",""\r\n'
        '"too","many","fields","here"\r\n'
        ",,\r\n"
    )
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    rows = list(read_csv(str(path)))
    assert rows[0] == (
        "row=1",
        {"question": "How do I\nreset it?", "answer": "Unplug it,\nthen wait.", "context": ""},
    )
    assert rows[1][1]["question"] == "What colour?"  # the BOM is not part of the first header
    assert rows[2] == ("row=3", "malformed_row: 4 fields, header has 3")
    assert rows[3] == ("row=4", "empty_row")


def test_semicolon_csv_and_tsv_are_sniffed(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("prompt;response\nHi there;Hello, friend\n")
    (tmp_path / "b.tsv").write_text("instruction\toutput\nSay hi\tHi, you\n")
    assert list(read_csv(str(tmp_path / "a.csv")))[0][1] == {
        "prompt": "Hi there",
        "response": "Hello, friend",
    }
    out = tmp_path / "out"
    report = build([tmp_path / "a.csv", tmp_path / "b.tsv"], out, test_fraction=0.0, val_fraction=0.0)
    msgs = [e["messages"] for e in read_jsonl(out / "train.jsonl")]
    assert [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi, you"}] in msgs
    assert report["counts"]["train"] == 2


def test_jsonl_truncated_lines_and_wrong_types(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    lines = [
        json.dumps(
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
        ),
        json.dumps({"instruction": "Add", "input": "2 and 3", "output": "5"}),
        json.dumps(
            {"conversations": [{"from": "human", "value": "Ping?"}, {"from": "gpt", "value": "Pong."}]}
        ),
        json.dumps({"question": "Count?", "answer": 42}),
        json.dumps(["not", "an", "object"]),
        json.dumps({"messages": [{"role": "user", "content": 5}]}),
        json.dumps({"conversations": [{"from": "alien", "value": "?"}]}),
        json.dumps({"title": "no chat here"}),
        '{"messages": [{"role": "user", "content": "trunc',
    ]
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    report = build([path], out, test_fraction=0.0, val_fraction=0.0)
    rej = _rejects(out)
    assert rej["data.jsonl#line=4"]["reason"] == "wrong_type: answer is int, expected string"
    assert rej["data.jsonl#line=5"]["reason"] == "not_an_object: list"
    assert rej["data.jsonl#line=6"]["reason"] == "wrong_type: message 0 content is int"
    assert rej["data.jsonl#line=7"]["reason"].startswith("invalid_conversations: turn 0 has unknown speaker")
    assert rej["data.jsonl#line=8"]["reason"].startswith("no_chat_structure")
    assert rej["data.jsonl#line=9"]["reason"].startswith("malformed_json")
    assert all({"source", "locator", "step", "reason"} <= set(r) for r in rej.values())
    train = {e["meta"]["locator"]: e["messages"] for e in read_jsonl(out / "train.jsonl")}
    assert train["line=2"] == [
        {"role": "user", "content": "Add\n\n2 and 3"},
        {"role": "assistant", "content": "5"},
    ]
    assert train["line=3"] == [
        {"role": "user", "content": "Ping?"},
        {"role": "assistant", "content": "Pong."},
    ]
    assert report["accounting"] == {"records_in": 9, "out": 9, "balanced": True}


def test_read_jsonl_keeps_going_after_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"a": 1}\n{broken\n\n{"b": 2}\n')
    assert [loc for loc, _ in read_jsonl_rows(str(path))] == ["line=1", "line=2", "line=4"]


def test_xlsx_rows_with_numbers_and_global_mapping(tmp_path: Path) -> None:
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append(["Q", "A", "sys"])
    ws.append(["How many legs has a spider?", 8, "Be brief."])
    ws.append([None, None, None])
    ws.append(["Capital of Peru?", "Lima", None])
    wb.save(tmp_path / "sheet.xlsx")
    from data_prep.build import run_recipe
    from data_prep.recipe import validate_recipe

    recipe = validate_recipe(
        {
            "sources": [
                {
                    "path": str(tmp_path / "sheet.xlsx"),
                    "columns": {"user": "Q", "assistant": "A", "system": "sys"},
                }
            ],
            "output_dir": str(tmp_path / "out"),
            "system": "Global prompt.",
            "split": {"val_fraction": 0, "test_fraction": 0},
        }
    )
    run_recipe(recipe)
    train = {e["meta"]["locator"]: e["messages"] for e in read_jsonl(tmp_path / "out" / "train.jsonl")}
    assert train["sheet=Sheet,row=2"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "How many legs has a spider?"},
        {"role": "assistant", "content": "8"},
    ]
    assert train["sheet=Sheet,row=4"][0] == {"role": "system", "content": "Global prompt."}


def test_convert_default_column_names() -> None:
    conv = convert_row(
        {"Prompt": "Hi", "Completion": "Yo", "passage": "P", "doc_id": "d1"}, ColumnMapping(), True
    )
    assert (conv.question, conv.answer, conv.context, conv.join_key) == ("Hi", "Yo", "P", "d1")
    try:
        convert_row({"foo": "x"}, ColumnMapping(), True)
    except RowError as err:
        assert str(err).startswith("no_chat_structure")
    else:
        raise AssertionError("a row without Q/A columns must be rejected")


def test_transcript_multi_turn_with_speaker_map(tmp_path: Path) -> None:
    text = (
        "Customer: Hi, my order 1234 has not arrived.\n"
        "Customer: It was due Monday.\n"
        "Agent: Sorry about that! Let me check.\n"
        "It shipped yesterday.\n"
        "---\n"
        "Caller: Can I return a mug?\n"
        "Agent: Yes, within 30 days.\n"
        "---\n"
        "Manager: unknown label\n"
        "Agent: hello\n"
    )
    assert looks_like_transcript(text, DEFAULT_SPEAKERS)
    convs = parse_transcript(text, DEFAULT_SPEAKERS)
    assert convs[0] == (
        1,
        [
            {"role": "user", "content": "Hi, my order 1234 has not arrived.\nIt was due Monday."},
            {"role": "assistant", "content": "Sorry about that! Let me check.\nIt shipped yesterday."},
        ],
    )
    assert convs[1][1][0] == {"role": "user", "content": "Can I return a mug?"}
    assert convs[2][1].startswith("unmapped_speaker: 'manager'")
    (tmp_path / "calls.txt").write_text(text)
    (tmp_path / "notes.md").write_text("# Notes\n\nJust prose, no speakers.\n")
    out = tmp_path / "out"
    report = build([tmp_path / "calls.txt", tmp_path / "notes.md"], out, test_fraction=0.0, val_fraction=0.0)
    assert report["counts"]["train"] == 2
    rej = _rejects(out)
    assert rej["notes.md#file"]["reason"] == "no_chat_structure"
    assert rej["calls.txt#conversation=3,line=9"]["reason"].startswith("unmapped_speaker")


def test_json_array_and_format_override(tmp_path: Path) -> None:
    (tmp_path / "data.json").write_text(
        json.dumps(
            {
                "data": [
                    {"instruction": "Name a colour", "input": "", "output": "Teal"},
                    5,
                    {"prompt": "", "response": "x"},
                ]
            }
        )
    )
    (tmp_path / "sheet.txt").write_text("question,answer\nIs this a CSV?,Yes when forced.\n")
    out = tmp_path / "out"
    build([tmp_path / "data.json"], out, test_fraction=0, val_fraction=0)
    assert [e["messages"] for e in read_jsonl(out / "train.jsonl")] == [
        [{"role": "user", "content": "Name a colour"}, {"role": "assistant", "content": "Teal"}]
    ]
    rej = _rejects(out)
    assert rej["data.json#index=1"]["reason"] == "not_an_object: int"
    assert (
        rej["data.json#index=2"]["reason"].startswith("empty_user")
        and rej["data.json#index=2"]["step"] == "chat_filter"
    )
    out2 = tmp_path / "out2"
    build([tmp_path / "sheet.txt"], out2, format="csv", test_fraction=0, val_fraction=0)
    assert read_jsonl(out2 / "train.jsonl")[0]["messages"][1]["content"] == "Yes when forced."
