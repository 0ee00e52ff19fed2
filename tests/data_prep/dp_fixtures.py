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
