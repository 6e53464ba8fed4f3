"""How `dcp-ckpt ls` and `dcp-ckpt inspect` show what they found to a person (ckpt.py finds
it; `--json` prints the same dicts as JSON instead)."""

from __future__ import annotations

import json


def human(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _fmt_loss(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def print_listing(info: dict) -> None:
    print(info["root"])
    tiers = any("replicated" in c for c in info["checkpoints"])
    rows = [("", "name", "step", "size", "world", "val_loss", "tokens") +
            (("replicated",) if tiers else ())]
    for c in info["checkpoints"]:
        rows.append(("*" if c["latest"] else "", c["name"], str(c["step"]), human(c["bytes"]),
                     str(c["world_size"] or "?"), _fmt_loss(c["val_loss"]),
                     "-" if c["tokens"] is None else str(c["tokens"])) +
                    ((c.get("replicated", ""),) if tiers else ()))
    if len(rows) > 1:
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            print("  " + "  ".join(v.rjust(w) if i > 1 else v.ljust(w)
                                   for i, (v, w) in enumerate(zip(r, widths))).rstrip())
    else:
        print("  no committed checkpoints")
    for c in info["checkpoints"]:
        if "error" in c:
            print(f"  {c['name']}: {c['error']} (run dcp-ckpt verify)")
    if info["latest"] is None:
        print("latest: (missing)")
    else:
        note = "" if info["latest_valid"] else "  <- not a committed checkpoint!"
        print(f"latest: {info['latest']}{note}")
    if info["abandoned"]:
        print("abandoned:")
        for a in info["abandoned"]:
            print(f"  {a['name']}  {human(a['bytes'])}  ({a['reason']})")


def print_tiers(info: dict) -> None:
    """`dcp-ckpt ls DIR --local LDIR ...`: the durable dir, then each local tier dir."""
    print("durable tier:", end=" ")
    print_listing(info)
    for local in info["local"]:
        print("local tier:", end=" ")
        print_listing(local)


def print_inspect(info: dict) -> None:
    meta, manifest, entries = info["meta"] or {}, info["manifest"], info["entries"]
    print(f"checkpoint {info['path']}")
    print(f"step {meta.get('step')} | tokens {meta.get('tokens')} | val loss "
          f"{_fmt_loss(meta.get('val_loss'))} | saved at world size {meta.get('world_size')} | "
          f"checkpoint format {meta.get('format_version')}")
    if manifest is None:
        print("manifest.json: missing (never committed)")
    elif "error" in manifest:
        print(manifest["error"])
    else:  # the manifest's own format (its checksum) is not the checkpoint's (its state)
        print(f"manifest.json: format {manifest.get('format_version', 1)}, checksums "
              f"{manifest.get('checksum', 'crc32')}")
        files = manifest["files"].items()
        print("files: " + ", ".join(f"{n} {human(f['size'])}" for n, f in files))
    sections = {"model": [], "optim": [], "per-rank": [], "other": []}
    for key, e in entries.items():
        top = key.split(".", 1)[0]
        section = ("model" if top == "model" else "optim" if top == "optim" else
                   "per-rank" if top.startswith("rank_") else "other")
        sections[section].append((key, e))
    for section, items in sections.items():
        if not items:
            continue
        n = sum(_numel(e["shape"]) for _, e in items)
        print(f"\n{section}: {len(items)} entries, {n:,} elements")
        width = max(len(k) for k, _ in items)
        for key, e in items:
            shape = "bytes" if e["shape"] is None else str(e["shape"])
            shards = f"{e['shards']} shards" if e["shards"] > 1 else ""
            print(f"  {key.ljust(width)}  {shape:<14} {e['dtype']:<9} {shards}".rstrip())
    if "model.transformer.wte.weight" in entries and "model.lm_head.weight" not in entries:
        print("  (model.lm_head.weight is tied to model.transformer.wte.weight: stored once)")
    if meta:
        print("\nconfig:")
        print(json.dumps(meta.get("config"), indent=2))


def _numel(shape) -> int:
    n = 1
    for d in shape or [0]:
        n *= d
    return n
