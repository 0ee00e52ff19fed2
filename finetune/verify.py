"""`finetune verify PATH`: check what the kit wrote against the checksums recorded when it was written.

    finetune verify runs/x                  the adapter or model, every checkpoint, GGUF exports
    finetune verify DATA_DIR/.finetune-cache   every tokenized data cache
    finetune verify data/out                data-prep's splits (checksums.json) and shard directories
    finetune verify exported/model-q8_0.gguf   one file, against its directory's manifest

Every manifest at or under PATH is checked (kitcore.integrity): checksums.json (adapters, models,
checkpoints, exports, data-prep outputs), a data cache's meta.json, a shard directory's
manifest.json. Exit code 0 when everything found is intact, 1 when a file is missing or damaged,
2 when PATH holds nothing with checksums. `--record DIR` (re)writes a directory's checksums.json:
after an edit made on purpose (a base model path in adapter_config.json), or for an artifact from
before checksums existed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from kitcore.integrity import MANIFEST, IntegrityError, verify_tree, write_manifest

__all__ = ["verify_command", "verify_path", "record"]


def verify_path(path: str | Path) -> dict:
    """What `finetune verify` finds, as a dict (the --json output)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or directory")
    t0 = time.perf_counter()
    found = verify_tree(p)
    seconds = time.perf_counter() - t0
    artifacts = [{"kind": kind, "path": str(rep.root), "ok": rep.ok, "intact": len(rep.intact),
                  "missing": [str(rep.root / m) for m in rep.missing],
                  "damaged": [{"file": str(rep.root / f), "reason": why} for f, why in rep.damaged],
                  "unlisted": rep.unlisted, "bytes": rep.bytes_checked} for kind, rep in found]
    total = sum(a["bytes"] for a in artifacts)
    return {"path": str(p), "artifacts": artifacts, "ok": bool(found) and all(a["ok"] for a in artifacts),
            "bytes": total, "seconds": round(seconds, 3),
            "gb_per_s": round(total / seconds / 1e9, 2) if seconds > 0 and total else None}


def record(path: str | Path) -> int:
    """(Re)write the checksums.json of a directory: after a deliberate edit, or for an artifact
    from before checksums existed. A data cache is rebuilt, never re-recorded."""
    d = Path(path)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: --record takes a directory (an adapter, a model, a checkpoint, an export)")
    if (d / "meta.json").is_file() and (d / "COMPLETE").is_file():
        raise IntegrityError(f"{d} is a data cache: delete it and it is rebuilt from the data (its checksums are "
                             "never re-recorded)")
    files = write_manifest(d)
    print(f"recorded {len(files)} file(s) in {d / MANIFEST}")
    return 0


def verify_command(args) -> int:
    if args.record:
        return record(args.path)
    out = verify_path(args.path)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for a in out["artifacts"]:
            bad = len(a["missing"]) + len(a["damaged"])
            state = "intact " if a["ok"] else "DAMAGED"
            print(f"{state}  {a['kind']:<17} {a['path']}: {a['intact']} file(s) intact"
                  + (f", {len(a['missing'])} missing, {len(a['damaged'])} damaged" if bad else ""))
            for m in a["missing"]:
                print(f"    missing: {m}")
            for d in a["damaged"]:
                print(f"    damaged: {d['file']}: {d['reason']}")
            if a["unlisted"]:
                print(f"    not covered by its manifest (not checked): {', '.join(a['unlisted'][:5])}"
                      + (" ..." if len(a["unlisted"]) > 5 else ""))
        if not out["artifacts"]:
            print(f"{out['path']}: nothing with checksums here (no checksums.json, data cache meta.json or shard "
                  "manifest.json; artifacts written before checksums existed have none)")
        else:
            n_bad = sum(not a["ok"] for a in out["artifacts"])
            rate = f", {out['gb_per_s']} GB/s" if out["gb_per_s"] else ""
            print(f"{len(out['artifacts'])} artifact(s): {len(out['artifacts']) - n_bad} intact, {n_bad} damaged; "
                  f"{out['bytes'] / 1e6:.1f} MB checked in {out['seconds']:.2f} s{rate}")
    if not out["artifacts"]:
        return 2
    return 0 if out["ok"] else 1
