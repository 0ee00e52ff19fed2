"""Write the quickstart's sample raw data: scraped-style shop pages and an annotation file.

    python scripts/make_quickstart_data.py [--out finetune/quickstart_data] [--seed 0]

The task is reading comprehension a tiny model can learn on a CPU in a few minutes: a short text
(a product page, or a snippet of one) gives a product's price among other sentences, the question
asks for it, the answer is copied from the text. (Measured: with two or more priced products per
text, a 4-layer model trained for 5 epochs picks the right one only 13% of the time; binding a name
to its price takes far longer to learn than copying, so the quickstart keeps one price per text.) Page-grounded rows (column `page`) take their text from a scraped HTML page;
inline rows carry it in `context`. The output is committed, so this runs only to regenerate it.
"""

from __future__ import annotations

import argparse
import csv
import html
import random
from pathlib import Path

MATERIALS = """amber aqua ash azure beige birch black blue brass bronze canvas cedar cherry chrome
coral copper cotton cream crimson denim ebony emerald gold granite green grey hazel indigo ivory
jade khaki lemon lilac linen maple marble mint navy oak olive onyx orange pearl pine pink plum
purple red rose ruby rust sage sand silver slate steel teal tin violet walnut white wool yellow""".split()
ITEMS = """kettle lamp chair desk mug teapot blanket pillow clock vase bowl basket stool rug mirror
shelf candle jar tray kettlebell backpack wallet scarf umbrella bottle notebook pen toaster fan
heater skillet spatula whisk ladle grater colander teacup saucer planter bench cabinet drawer
hammock lantern radio speaker headset keyboard mouse monitor tripod""".split()
STATEMENTS = [
    "The {name} costs {price}.",
    "The {name} is priced at {price}.",
    "You can buy the {name} for {price}.",
    "The {name} sells for {price}.",
    "Our {name} is {price}.",
    "{Name}: {price}.",
    "The {name} is now {price}.",
]
QUESTIONS = [
    "What is the price of the {name}?",
    "How much does the {name} cost?",
    "What does the {name} cost?",
    "How much is the {name}?",
]
FILLERS = [
    "All items ship within two days.",
    "Stock is limited this week.",
    "Every order is packed by hand.",
    "Returns are accepted for thirty days.",
    "Visit our store on Main Street.",
    "New colours arrive every month.",
]
STORES = ["Harbor Goods", "Maple & Co", "The Corner Shop", "North Street Market", "Blue Door Home",
          "Pine Hill Supply", "Old Town Traders", "Sunny Side Store"]


def product(rng: random.Random) -> tuple[str, str]:
    name = f"{rng.choice(MATERIALS)} {rng.choice(ITEMS)}"
    price = f"${rng.randint(3, 499)}" + (f".{rng.choice(['99', '50', '95', '25'])}" if rng.random() < 0.4 else "")
    return name, price


def distinct_products(rng: random.Random, k: int) -> list[tuple[str, str]]:
    out: dict[str, str] = {}
    while len(out) < k:
        n, p = product(rng)
        out.setdefault(n, p)
    return list(out.items())


def statement(rng: random.Random, name: str, price: str) -> str:
    return rng.choice(STATEMENTS).format(name=name, Name=name.capitalize(), price=price)


def context(rng: random.Random, prods: list[tuple[str, str]]) -> str:
    parts = [statement(rng, n, p) for n, p in prods]
    for filler in rng.sample(FILLERS, rng.randint(0, 2)):
        parts.insert(rng.randrange(len(parts) + 1), filler)
    return " ".join(parts)


PAGE = """<!DOCTYPE html>
<html lang="en"><head>{meta}<title>{title}</title>
<link rel="canonical" href="https://shop.example.com/catalogue/{slug}">
<script>window.dataLayer = window.dataLayer || []; function gtag(){{dataLayer.push(arguments);}}</script>
<style>body {{ font-family: sans-serif; }} .banner {{ position: fixed; }}</style>
</head><body>
<div class="cookie-banner banner" id="cookies">We use cookies to improve your experience.
<button>Accept all</button> <button>Settings</button></div>
<header><nav><ul><li><a href="/">Home</a></li><li><a href="/catalogue">Catalogue</a></li>
<li><a href="/about">About us</a></li><li><a href="/contact">Contact</a></li></ul></nav></header>
<main><article>
<h1>{title}</h1>
{paragraphs}
</article></main>
<aside class="sidebar"><h3>Popular searches</h3><ul><li>gift ideas</li><li>home office</li><li>kitchen</li></ul></aside>
<footer><p>&copy; 2026 {store}. All rights reserved.</p><p><a href="/privacy">Privacy</a> | <a href="/terms">Terms</a></p></footer>
<script>document.getElementById("cookies").onclick = function () {{ this.remove(); }};</script>
</body></html>
"""


def write_pages(rng: random.Random, out: Path, n_pages: int) -> list[list[str]]:
    rows = []
    pages = out / "pages"
    pages.mkdir(parents=True, exist_ok=True)
    for i in range(1, n_pages + 1):
        store = rng.choice(STORES)
        prods = distinct_products(rng, 1)
        name = prods[0][0]
        title = f"{store}: the {name}"
        paras = [f"<p>{html.escape(statement(rng, n, p))} {html.escape(rng.choice(FILLERS))}</p>" for n, p in prods]
        paras.append(f"<p>Made to last, the {html.escape(name)} suits any home.</p>")
        fname = f"shop-{i:03d}.html"
        # Every 10th page is served in windows-1252 without a charset, as old shops still are.
        legacy = i % 10 == 0
        meta = "" if legacy else '<meta charset="utf-8">'
        text = PAGE.format(meta=meta, title=html.escape(title), slug=fname[:-5], store=html.escape(store),
                           paragraphs="\n".join(paras))
        if legacy:
            text = text.replace(f"the {name}</h1>", f"the {name} \u2013 caf\u00e9 corner</h1>")
        (pages / fname).write_bytes(text.encode("cp1252" if legacy else "utf-8"))
        # One question per product, addressed by file name (odd pages) or canonical URL (even).
        ref = fname if i % 2 else f"https://shop.example.com/catalogue/{fname[:-5]}"
        for n, p in prods:
            rows.append([ref, "", rng.choice(QUESTIONS).format(name=n), p])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="finetune/quickstart_data")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pages", type=int, default=40)
    ap.add_argument("--inline", type=int, default=3000)
    ap.add_argument("--min-products", type=int, default=1)
    ap.add_argument("--max-products", type=int, default=1)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    out = Path(args.out)
    rows = write_pages(rng, out, args.pages)
    for _ in range(args.inline):
        prods = distinct_products(rng, rng.randint(args.min_products, args.max_products))
        name, price = rng.choice(prods)
        rows.append(["", context(rng, prods), rng.choice(QUESTIONS).format(name=name), price])
    # Real annotation files carry some PII and some repeated rows; data-prep must handle both.
    rows.append(["", "Questions? Write to sales@harborgoods.example or call +1 415 555 0134. "
                 "The oak desk costs $240.", "What is the price of the oak desk?", "$240"])
    rows.extend(rows[200:203])
    with (out / "questions.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["page", "context", "question", "answer"])
        w.writerows(rows)
    print(f"wrote {args.pages} pages and {len(rows)} annotation rows to {out}")


if __name__ == "__main__":
    main()
