"""Writers of test inputs shaped like finetune/quickstart_data (scraped shop pages + questions.csv)."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

ADJ = ["Aurora", "Borealis", "Cascade", "Dune", "Ember", "Fjord", "Granite", "Harbor", "Indigo", "Juniper"]
CITIES = [
    "Oslo",
    "Lima",
    "Pune",
    "Kyiv",
    "Accra",
    "Quito",
    "Perth",
    "Turin",
    "Hanoi",
    "Cork",
    "Bern",
    "Riga",
    "Porto",
]
NOUN = ["kettle", "toaster", "blender", "lamp", "backpack", "jacket", "mug", "grinder", "speaker", "tent"]

BOILER_HEAD = """<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{title} | Example Shop</title>
<link rel="canonical" href="https://shop.example.com/products/{slug}/">
<meta property="og:url" content="https://shop.example.com/products/{slug}/">
<script>window.dataLayer=[];function track(e){{dataLayer.push(e)}}</script>
<style>body{{font-family:sans-serif}}</style></head><body>
<div id="cookie-banner" class="cookie-consent">We use cookies to improve your experience. <button>Accept all cookies</button></div>
<header><nav><ul><li><a href="/">Home</a></li><li><a href="/shop">Shop</a></li><li><a href="/about">About us</a></li><li><a href="/contact">Contact</a></li></ul></nav></header>
<main><article><h1>{title}</h1>
"""
BOILER_FOOT = """</article></main>
<aside class="sidebar"><h3>Related</h3><ul><li><a href="/p/1">Gift cards</a></li><li><a href="/p/2">Sale</a></li></ul></aside>
<footer><p>Copyright 2024 Example Shop Ltd. All rights reserved.</p><a href="/privacy">Privacy policy</a> <a href="/terms">Terms</a></footer>
<script>track({{"page":"{slug}"}});</script></body></html>
"""


def product_names(i: int) -> list[str]:
    return [f"{ADJ[(i + k) % len(ADJ)]} {NOUN[(i * 3 + k) % len(NOUN)]} {i}" for k in range(3)]


def price(i: int, k: int) -> str:
    return f"${(i * 7 + k * 13) % 90 + 9}.{(i + k) % 10}9"


def shop_page(i: int) -> str:
    slug = f"shop-{i:03d}"
    names = product_names(i)
    body = []
    for k, name in enumerate(names):
        body.append(
            f"<h2>{name}</h2><p>The {name} costs {price(i, k)} and ships within {k + 2} working days. "
            f"It is one of the most popular items in our store this season, and customers like how well "
            f"it is made and how long it lasts in daily use at home or on the road.</p>"
        )
    return (
        BOILER_HEAD.format(title=f"Products page {i}", slug=slug)
        + "\n".join(body)
        + BOILER_FOOT.format(slug=slug)
    )


def write_shop(
    root: Path, n_pages: int = 40, rows_per_page: int = 6, inline_rows: int = 20, seed: int = 0
) -> Path:
    """pages/shop-NNN.html and questions.csv (page,context,question,answer); returns root."""
    rng = random.Random(seed)
    pages = root / "pages"
    pages.mkdir(parents=True, exist_ok=True)
    for i in range(1, n_pages + 1):
        (pages / f"shop-{i:03d}.html").write_text(shop_page(i), encoding="utf-8")
    with open(root / "questions.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["page", "context", "question", "answer"])
        for i in range(1, n_pages + 1):
            for r in range(rows_per_page):
                k = r % 3
                name = product_names(i)[k]
                # half the rows point at the file name, half at the canonical URL
                ref = (
                    f"shop-{i:03d}.html" if r % 2 == 0 else f"https://shop.example.com/products/shop-{i:03d}"
                )
                asks_price = (r // 3) % 2 == 0
                q = (
                    f"How much does the {name} cost?"
                    if asks_price
                    else f"How many working days does the {name} take to ship?"
                )
                if r >= 6:  # more rows than distinct facts: vary the asker so rows stay distinct
                    city = CITIES[(r * 7 + i) % len(CITIES)]
                    q = f"Order {r}{i} from {city}, {CITIES[r % len(CITIES)]} branch, line {r % 7}: {q}"
                a = price(i, k) if asks_price else str(k + 2)
                w.writerow([ref, "", q, a])
        for j in range(inline_rows):
            item = f"{rng.choice(ADJ)} {rng.choice(NOUN)} model {j}"
            ctx = f"Inventory note {j}: the {item} is in stock, {j + 3} units left in warehouse {j % 4}."
            w.writerow(["", ctx, f"How many units of the {item} are left?", str(j + 3)])
    return root


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


# ---- near duplicates -----------------------------------------------------------------------------
VOCAB = [f"w{i}" for i in range(5000)]


def _words(rng: random.Random, n: int) -> list[str]:
    return [rng.choice(VOCAB) for _ in range(n)]


def near_dup_triple(seed: int, threshold: float = 0.8) -> tuple[str, str, str]:
    """(x, y, z): z is near-similar to x and to y, x and y are not (by the MinHash estimate the
    pipeline uses, checked here). z is x's words with 2 words changed in its first half and y is
    z with 2 changed in its second half, so J(x,z) ~ J(y,z) ~ 0.87 and J(x,y) ~ 0.76."""
    from data_prep.steps.dedup import Deduplicator, similarity

    d = Deduplicator(threshold=threshold)
    for s in range(seed * 1000, seed * 1000 + 1000):
        rng = random.Random(s)
        z = _words(rng, 150)
        x, y = list(z), list(z)
        for i in rng.sample(range(10, 70), 2):
            x[i] = f"x{s}_{i}"
        for i in rng.sample(range(80, 140), 2):
            y[i] = f"y{s}_{i}"
        sx, sy, sz = (d.signature(" ".join(t)) for t in (x, y, z))
        assert sx is not None and sy is not None and sz is not None
        if min(similarity(sx, sz), similarity(sy, sz)) >= threshold + 0.02 > threshold - 0.02 > similarity(sx, sy):
            return " ".join(x), " ".join(y), " ".join(z)
    raise AssertionError("no seed gave the triple")


def write_near_dups(root: Path, n_triples: int = 6) -> list[Path]:
    """Three JSONL files (three sources, so every row is its own split group) whose answers are
    near-duplicate triples across the files, plus exact copies:

    - triples 0, 2, 4...: x in a.jsonl, y in b.jsonl, z (near both) in c.jsonl: under
      near_action=group all three must share a split although z's closest match is only one;
    - triples 1, 3, 5...: x in a, z in b, y in c: under drop, z is dropped as x's near-duplicate
      and y, near only z, is kept;
    - exact copies of x (case, punctuation and spacing changed) in c.jsonl.
    """
    root.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict]] = {"a": [], "b": [], "c": []}
    for t in range(n_triples):
        x, y, z = near_dup_triple(t)
        q = f"List number {t}"
        order = (x, y, z) if t % 2 == 0 else (x, z, y)
        for name, text in zip("abc", order):
            rows[name].append({"question": q, "answer": text})
        rows["c"].append({"question": q.upper() + "!", "answer": "  " + x.replace(" ", "  ").upper()})
    paths = []
    for name, rs in rows.items():
        p = root / f"{name}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in rs))
        paths.append(p)
    return paths


def write_mixed(root: Path) -> list[Path]:
    """A corpus with every kind of input and of reject: the shop (pages + questions.csv), near
    duplicates, a FAQ page, a transcript, PII, and records rejected at read, convert, join,
    chat filter and dedup. Returns the sources to build."""
    shop = write_shop(root / "shop", n_pages=24, rows_per_page=6, inline_rows=12)
    (shop / "pages" / "orphan.html").write_text(
        "<html><body><main><p>" + "An orphan page nobody asks about. " * 20 + "</p></main></body></html>"
    )
    faq = "".join(
        f"<details><summary>Does the {n} ship abroad?</summary>Yes, write to help{n}@shop.example.com.</details>"
        for n in NOUN[:4]
    )
    (shop / "pages" / "faq.html").write_text(f"<html><body><main>{faq}</main></body></html>")
    with open(shop / "questions.csv", "a", encoding="utf-8") as fh:
        fh.write("shop-999.html,,What is this?,Nothing.\n")  # join: page_not_found
        fh.write(",,How much is the lamp?,\n")  # chat_filter: empty answer
    texts = root / "texts"
    texts.mkdir()
    (texts / "call.txt").write_text(
        "Customer: My order 1234 has not arrived, call me on +44 20 7946 0958.\n"
        "Agent: Sorry about that. It ships tomorrow.\n---\n"
        "Customer: Can I change the colour?\nAgent: Yes, until it ships.\n"
    )
    (texts / "notes.txt").write_text("Just some notes, not a conversation.\n")  # read: no_chat_structure
    near = write_near_dups(root / "near")
    bad = root / "bad.jsonl"
    bad.write_text('{"question": "Q", "answer": 3}\n{broken\n{"question": "Is it fine?", "answer": "Yes."}\n')
    return [shop / "pages", shop / "questions.csv", texts, *near, bad, write_tool_chats(root / "tools.jsonl")]


TRACK = {"type": "function", "function": {"name": "track_order", "parameters": {"type": "object", "properties": {
    "order": {"type": "string"}, "email": {"type": "string"}}}}}


def tool_chat(i: int) -> dict:
    """An OpenAI-format chat that calls track_order with an e-mail address in its arguments."""
    call = {"id": f"c{i}", "type": "function", "function": {
        "name": "track_order", "arguments": json.dumps({"order": f"A{i:03d}", "email": f"buyer{i}@mail.example.com"})}}
    items = " ".join(_words(random.Random(f"tool{i}"), 12))  # words of its own: no near duplicates
    return {"tools": [TRACK], "parallel_tool_calls": False, "messages": [
        {"role": "user", "content": f"Where is my order A{i:03d} of {items}? Ask with my address."},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": f"c{i}", "content": f"order A{i:03d}: shipped"},
        {"role": "assistant", "content": f"Order A{i:03d} has shipped.", "weight": 1}]}


def write_tool_chats(path: Path, n: int = 8) -> Path:
    """Tool-calling records: OpenAI chats (PII inside call arguments), a ShareGPT function-call
    record, one with arguments that are not JSON (convert reject) and an exact copy (dedup reject)."""
    rows: list[dict] = [tool_chat(i) for i in range(n)]
    broken = tool_chat(n)
    broken["messages"][1]["tool_calls"][0]["function"]["arguments"] = '{"order": '
    sharegpt = {"tools": json.dumps([TRACK["function"]]), "conversations": [
        {"from": "human", "value": "Track order B001, please."},
        {"from": "function_call", "value": json.dumps({"name": "track_order", "arguments": {"order": "B001"}})},
        {"from": "observation", "value": "order B001: in transit"},
        {"from": "gpt", "value": "Order B001 is in transit."}]}
    rows += [broken, sharegpt, tool_chat(0)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
