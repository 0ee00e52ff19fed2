"""Annotated data: CSV/TSV (dialect + BOM sniffing), XLSX, JSON, JSONL -> (locator, row) or errors.

Each reader yields `(locator, row_dict)` for a usable row and `(locator, Reject-reason str)` for a
row that cannot be read, so a truncated line costs one record, not the file.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from typing import Any

from data_prep import storage
from data_prep.readers.decode import decode_bytes

Row = dict[str, Any]
RowOrError = tuple[str, Row | str]

csv.field_size_limit(1 << 28)


def read_csv(path: str, delimiter: str | None = None) -> Iterator[RowOrError]:
    data = storage.read_bytes(path)
    # whole-file decode: csv needs a str stream, and a sheet rarely outgrows memory
    text = decode_bytes(data)
    sample = text[:65536]
    if delimiter is None:
        try:
            dialect: Any = csv.Sniffer().sniff(sample, delimiters=",;\t|")
        except csv.Error:
            dialect = csv.excel_tab if path.lower().endswith(".tsv") else csv.excel
        first_line = sample.split("\n", 1)[0]
        if dialect.delimiter not in first_line:
            # the sniffer can be fooled by punctuation inside quoted multi-line cells
            dialect = csv.excel_tab if "\t" in first_line else csv.excel
    else:
        dialect = csv.excel_tab if delimiter == "\t" else csv.excel
    reader = csv.reader(io.StringIO(text, newline=""), dialect)
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        yield "header", "empty_file"
        return
    except csv.Error as err:
        yield "header", f"malformed_csv: {err}"
        return
    row_no = 0
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            row_no += 1
            yield f"row={row_no}", f"malformed_csv: {err}"
            return
        row_no += 1
        if not any(c.strip() for c in cells):
            yield f"row={row_no}", "empty_row"
            continue
        if len(cells) > len(header):
            yield f"row={row_no}", f"malformed_row: {len(cells)} fields, header has {len(header)}"
            continue
        cells += [""] * (len(header) - len(cells))
        yield f"row={row_no}", dict(zip(header, cells))


def read_xlsx(path: str) -> Iterator[RowOrError]:
    import openpyxl

    # openpyxl opens a path or a file object; a URL is fetched whole (a sheet rarely outgrows memory)
    src = io.BytesIO(storage.read_bytes(path)) if storage.is_url(path) else path
    wb = openpyxl.load_workbook(src, read_only=True, data_only=True)
    try:
        for ws in wb.worksheets:
            rows = ws.iter_rows(values_only=True)
            header = next(rows, None)
            if header is None:
                continue
            names = [str(h).strip() if h is not None else f"col{i}" for i, h in enumerate(header)]
            for r, values in enumerate(rows, start=2):
                loc = f"sheet={ws.title},row={r}"
                if all(v is None or str(v).strip() == "" for v in values):
                    continue  # openpyxl reports formatted-but-empty trailing rows; they are not records
                yield loc, {n: ("" if v is None else str(v)) for n, v in zip(names, values)}
    finally:
        wb.close()


def read_jsonl(path: str) -> Iterator[RowOrError]:
    with storage.open_read(path) as fh:
        for i, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                yield f"line={i}", f"malformed_json: {err}"
                continue
            if not isinstance(obj, dict):
                yield f"line={i}", f"not_an_object: {type(obj).__name__}"
                continue
            yield f"line={i}", obj


def read_json(path: str) -> Iterator[RowOrError]:
    try:
        obj = json.loads(storage.read_bytes(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        yield "file", f"malformed_json: {err}"
        return
    if isinstance(obj, dict):
        # {"data": [...]} / {"examples": [...]} wrappers, or a single example
        lists = [
            v for k, v in obj.items() if k in ("data", "examples", "rows", "items") and isinstance(v, list)
        ]
        obj = lists[0] if lists else [obj]
    if not isinstance(obj, list):
        yield "file", f"not_an_object: {type(obj).__name__}"
        return
    for i, item in enumerate(obj):
        if isinstance(item, dict):
            yield f"index={i}", item
        else:
            yield f"index={i}", f"not_an_object: {type(item).__name__}"


TABLE_FORMATS = ("csv", "tsv", "xlsx", "json", "jsonl")


def read_table(path: str, fmt: str) -> Iterator[RowOrError]:
    if fmt == "csv":
        return read_csv(path)
    if fmt == "tsv":
        return read_csv(path, delimiter="\t")
    if fmt == "xlsx":
        return read_xlsx(path)
    if fmt == "json":
        return read_json(path)
    if fmt == "jsonl":
        return read_jsonl(path)
    raise ValueError(f"not a table format: {fmt}")
