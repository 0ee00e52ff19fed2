#!/usr/bin/env python
"""Benchmark data-prep on synthetic scraped pages: per-stage pages/s per core, end-to-end
throughput and peak RSS, at N pages and at 2N pages (peak memory should stay flat).

    python scripts/bench_data_prep.py --pages 20000 --workers 2
    python scripts/bench_data_prep.py --pages 20000 --workers 2 --engine ray   # local, then Ray

With `--engine ray` every corpus goes through the local engine and then through the Ray engine
(Ray started on this machine by data-prep, all its cores), and the two are printed side by side:
pages/s per core, peak RSS of the whole process tree (Ray's own processes included), of the
driver and of the largest worker. The outputs are compared too: the Ray shards, concatenated,
must equal the local files.

Pages are a few KB to tens of KB: navigation, cookie banner, inline scripts and styles, a
sidebar and a footer around an article; some carry a <details> or JSON-LD FAQ, some are
near-copies of others, and a questions.csv points at a share of them by URL.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

WORDS = (
    "the of and to in is that for it as with was on be by this are or from at which an have not "
    "kettle toaster lamp price delivery warranty steel water minutes customer order return colour "
    "size battery charger cable garden table chair light power energy design quality service store "
    "week month year day hour model version update feature review rating stock shipping payment card"
).split()


def sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(8, 22))]
    return " ".join(words).capitalize() + "."


def page_html(i: int, rng: random.Random, base: str | None = None) -> str:
    nav = "".join(f'<li><a href="/c/{k}">Category {k}</a></li>' for k in range(rng.randint(20, 60)))
    script = "var cfg={" + ",".join(f'"k{k}":"{"x" * 40}"' for k in range(rng.randint(20, 120))) + "};"
    style = "".join(
        f".c{k}{{margin:{k}px;padding:{k}px;color:#{k:06x}}}" for k in range(rng.randint(20, 100))
    )
    if base is None:
        paras = "".join(
            f"<p>{' '.join(sentence(rng) for _ in range(rng.randint(2, 6)))}</p>"
            for _ in range(rng.randint(4, 30))
        )
    else:  # near-copy of another page's article
        paras = base.replace("minutes", "hours", 1)
    faq = ""
    if i % 5 == 0:
        faq = "".join(
            f"<details><summary>Question {i}-{q}: {sentence(rng)[:-1]}?</summary><p>{sentence(rng)}</p></details>"
            for q in range(3)
        )
    ld = ""
    if i % 7 == 0:
        ld = json.dumps(
            {
                "@context": "https://schema.org",
                "@type": "FAQPage",
                "mainEntity": [
                    {
                        "@type": "Question",
                        "name": f"Page {i}: {sentence(rng)[:-1]}?",
                        "acceptedAnswer": {"@type": "Answer", "text": sentence(rng)},
                    }
                ],
            }
        )
        ld = f'<script type="application/ld+json">{ld}</script>'
    return f"""<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>Page {i}</title>
<link rel="canonical" href="https://bench.example.com/p/{i}"><style>{style}</style><script>{script}</script>{ld}</head>
<body><div class="cookie-banner">We use cookies. <button>Accept all</button> <button>Settings</button></div>
<header><nav><ul>{nav}</ul></nav></header><main><article><h1>Page {i} title</h1>{paras}{faq}</article></main>
<aside><h3>Popular</h3><ul>{nav[:2000]}</ul></aside>
<footer><p>Copyright 2024 Bench Shop. Contact us at shop@bench.example or +1 555 010 {i % 10000:04d}.</p>{nav[:1500]}</footer>
<script>track("{i}");</script></body></html>"""


def generate(root: Path, n: int, start: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    articles: list[str] = []
    sizes = []
    for i in range(start, start + n):
        base = rng.choice(articles) if articles and rng.random() < 0.05 else None
        html = page_html(i, rng, base)
        if base is None and len(articles) < 200:
            start_i = html.index("<h1>")
            articles.append(html[html.index("</h1>", start_i) + 5 : html.index("</article>")])
        (root / f"page-{i:06d}.html").write_text(html, encoding="utf-8")
        sizes.append(len(html))
    return [f"{min(sizes) // 1024} KB", f"{sum(sizes) // len(sizes) // 1024} KB", f"{max(sizes) // 1024} KB"]


def stage_rates(pages_dir: Path, sample: int) -> dict[str, float]:
    """Pages/s on one core for each stage, measured on `sample` pages in this process."""
    from data_prep.readers.decode import decode_bytes
    from data_prep.readers.html import ExtractOptions, page_from_html
    from data_prep.steps.clean import clean_text
    from data_prep.steps.dedup import Deduplicator
    from data_prep.steps.redact import redact

    files = sorted(pages_dir.iterdir())[:sample]
    t = time.perf_counter()
    raw = [f.read_bytes() for f in files]
    t_read = time.perf_counter() - t
    t = time.perf_counter()
    htmls = [decode_bytes(b) for b in raw]
    t_decode = time.perf_counter() - t
    opts = ExtractOptions(fix_unicode=False)
    t = time.perf_counter()
    pages = [page_from_html(h, "x", opts) for h in htmls]
    t_extract = time.perf_counter() - t
    texts = [p.text for p in pages]
    t = time.perf_counter()
    texts = [clean_text(x) for x in texts]
    t_clean = time.perf_counter() - t
    t = time.perf_counter()
    texts = [redact(x) for x in texts]
    t_redact = time.perf_counter() - t
    d = Deduplicator()
    t = time.perf_counter()
    for i, x in enumerate(texts):
        d.check(str(i), x)
    t_dedup = time.perf_counter() - t
    n = len(files)
    return {
        "read": n / t_read,
        "decode": n / t_decode,
        "extract (lxml + trafilatura + Q/A)": n / t_extract,
        "clean (ftfy)": n / t_clean,
        "redact": n / t_redact,
        "dedup (exact + MinHash LSH)": n / t_dedup,
    }


def _is_worker(p: psutil.Process, engine: str) -> bool:
    """A process that runs pipeline work: a pool worker (local), a Ray worker (`ray::...`); Ray's
    own daemons (gcs_server, raylet, agents) are counted in the total only."""
    if engine == "local":
        return True
    try:
        cmd = " ".join(p.cmdline())
    except psutil.Error:
        return False
    return p.name().startswith("ray::") or "default_worker.py" in cmd


def run_e2e(sources: list[Path], out: Path, workers: int, engine: str = "local") -> dict:
    """`data-prep build` in a child process; peak RSS summed over it and all its descendants,
    of the driver alone, and of the largest worker."""
    cmd = [
        sys.executable,
        "-m",
        "data_prep",
        "build",
        *map(str, sources),
        "--output-dir",
        str(out),
        "--workers",
        str(workers),
        "--engine",
        engine,
        "--overwrite",
    ]
    t0 = time.perf_counter()
    # output to files: a full pipe would block the child (Ray logs a lot to stderr)
    log = open(out.parent / f"{out.name}.log", "w+")  # noqa: SIM115 - read back below
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
    ps = psutil.Process(proc.pid)
    peak = peak_main = peak_worker = 0
    while proc.poll() is None:
        try:
            main_rss = ps.memory_info().rss
            children = ps.children(recursive=True)
            rss = {c.pid: c.memory_info().rss for c in children}
            peak = max(peak, main_rss + sum(rss.values()))
            peak_main = max(peak_main, main_rss)
            peak_worker = max([peak_worker, *(rss[c.pid] for c in children if _is_worker(c, engine))])
        except psutil.Error:
            pass
        time.sleep(0.2)
    wall = time.perf_counter() - t0
    log.seek(0)
    output = log.read()
    log.close()
    if proc.returncode != 0:
        raise SystemExit(f"build failed ({proc.returncode}):\n{output[-5000:]}")
    report = json.loads((out / "report.json").read_text())
    mb = 2**20
    return {
        "wall_s": wall,
        "peak_rss_mb": peak / mb,
        "main_mb": peak_main / mb,
        "worker_mb": peak_worker / mb,
        "report": report,
    }


def same_outputs(local: Path, ray: Path) -> bool:
    """The Ray engine's shards, concatenated in manifest order, against the local files."""
    for name in ("train", "val", "test", "rejects"):
        manifest = json.loads((ray / name / "manifest.json").read_text())
        data = b"".join((ray / name / s["file"]).read_bytes() for s in manifest["shards"])
        if data != (local / f"{name}.jsonl").read_bytes():
            return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--pages", type=int, default=20000, help="pages in the first run; the second run doubles it"
    )
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--sample", type=int, default=500, help="pages for the per-stage measurements")
    ap.add_argument("--no-double", action="store_true", help="skip the 2N run")
    ap.add_argument("--keep", default=None, help="generate into this directory and keep it")
    ap.add_argument(
        "--engine", choices=["local", "ray"], default="local", help="ray: each corpus through local, then Ray"
    )
    ap.add_argument("--json", default=None, help="write the end-to-end figures here")
    args = ap.parse_args()
    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_data_prep_"))
    a, b = tmp / "pages_a", tmp / "pages_b"
    t = time.perf_counter()
    sizes = generate(a, args.pages, 0, seed=1)
    if not args.no_double:
        generate(b, args.pages, args.pages, seed=2)
    with open(tmp / "questions.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["url", "question", "answer"])
        for i in range(0, args.pages, 5):
            w.writerow(
                [
                    f"https://bench.example.com/p/{i}",
                    f"What is page {i} about?",
                    f"Page {i} is about products.",
                ]
            )
    print(
        f"generated {args.pages * (1 if args.no_double else 2)} pages (min/mean/max {', '.join(sizes)}) "
        f"in {time.perf_counter() - t:.0f} s under {tmp}"
    )

    print(f"\nper-stage throughput, 1 core, {args.sample} pages:")
    for name, rate in stage_rates(a, args.sample).items():
        print(f"  {name:<36} {rate:>9.0f} pages/s")

    runs = [("N", [a, tmp / "questions.csv"])]
    if not args.no_double:
        runs.append(("2N", [a, b, tmp / "questions.csv"]))
    engines = ["local", "ray"] if args.engine == "ray" else ["local"]
    cores = {"local": min(args.workers, os.cpu_count() or 1), "ray": os.cpu_count() or 1}
    print(
        f"\nend to end (data-prep build; local: --workers {args.workers}, {cores['local']} cores"
        + (f"; ray: Ray on this machine, {cores['ray']} cores" if "ray" in engines else "")
        + "):"
    )
    results = []
    for label, sources in runs:
        for engine in engines:
            res = run_e2e(sources, tmp / f"out_{label}_{engine}", args.workers, engine)
            n_pages = res["report"]["timings"]["pages"]
            rate = n_pages / res["wall_s"]
            c = res["report"]["counts"]
            extra = ""
            if engine == "ray":
                same = same_outputs(tmp / f"out_{label}_local", tmp / f"out_{label}_ray")
                stages = res["report"]["timings"]["stages_s"]
                extra = f"; outputs == local: {same}; stages (s): " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items())
            print(
                f"  {label:>2} {engine:<5}: {n_pages} pages in {res['wall_s']:.1f} s = {rate:.0f} pages/s = "
                f"{rate / cores[engine]:.0f} pages/s/core; peak RSS {res['peak_rss_mb']:.0f} MB (all processes; "
                f"main {res['main_mb']:.0f}, largest worker {res['worker_mb']:.0f}); train {c['train']} val {c['val']} "
                f"test {c['test']} rejects {c['rejects']}; balanced={res['report']['accounting']['balanced']}{extra}"
            )
            results.append({"corpus": label, "engine": engine, "pages": n_pages, "cores": cores[engine],
                            "pages_per_s_per_core": rate / cores[engine], **{k: v for k, v in res.items() if k != "report"},
                            **({"same_as_local": same, "stages_s": stages} if engine == "ray" else {})})
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if not args.keep:
        print(f"(inputs left in {tmp}; delete when done)")


if __name__ == "__main__":
    main()
