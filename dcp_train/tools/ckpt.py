"""`python -m dcp_train.ckpt` (console script `dcp-ckpt`): look at, check and export checkpoints.

    dcp-ckpt ls DIR                  committed checkpoints (step, size, world size, val loss),
                                     which one `latest` names, abandoned temp/uncommitted dirs
    dcp-ckpt ls DIR --local LDIR     also the local tier's dir LDIR (repeat for each node's),
                                     with whether each local checkpoint is in DIR (replicated)
    dcp-ckpt inspect CKPT            every entry (shape, dtype, shards), per-rank entries, config
    dcp-ckpt verify CKPT             sizes and checksum of every file against manifest.json,
                                     missing and extra files; exit code 0 (ok) or 1 (problems)
    dcp-ckpt export CKPT --out FILE [--format safetensors|torch] [--dtype fp32|bf16] [--hf]
                                     consolidated model weights in one file (see export.py);
                                     with --hf, --out DIR gets model.safetensors + config.json
                                     for transformers' GPT2LMHeadModel.from_pretrained(DIR)

CKPT is a step dir (`.../step_00000020`) or a checkpoint dir, which means the step dir its
`latest` names. On an object store every command ends with the requests it sent, by kind
(`store requests: 4 requests (GET 3, LIST 1)`; with --json, a "requests" entry). DIR and CKPT are local paths or fsspec URLs (s3://, gs://, ...); options for
the filesystem go in `--storage_options '{"endpoint_url": "..."}'`. Everything runs in this one
process, without torch.distributed and without knowing the saved world size. Bad input prints
`dcp-ckpt: error: ...` and exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import posixpath
import sys
import warnings

from dcp_train import redact
from dcp_train.store import requests as store_requests
from dcp_train.checkpoint.io.manifest import (ManifestError, problems as manifest_problems,
                                              read as read_manifest, require_intact)
from dcp_train.checkpoint.io.names import MANIFEST, TMP_RE
from dcp_train.checkpoint.tiers.local import read_tier_info
from dcp_train.checkpoint.io.storage import Storage
from dcp_train.checkpoint.layout import CheckpointDir
from dcp_train.checkpoint.state import read_meta
from dcp_train.errors import CheckpointError
from dcp_train.job.progress import bar
from dcp_train.tools.export import (DTYPES, ExportError, export_tensors, hf_config,
                                    load_model_weights, write_export)
from dcp_train.tools import paths
from dcp_train.tools.show import print_inspect, print_listing, print_tiers


class ToolError(RuntimeError):
    """Bad input: printed as one line, exit code 2."""


# ---------------------------------------------------------------------------- finding things
def _manifest(storage: Storage, path: str) -> dict | None:
    """manifest.json of step dir `path`; None if it has none; ManifestError if damaged."""
    if not storage.exists(posixpath.join(path, MANIFEST)):
        return None
    return read_manifest(storage, path)


def list_checkpoints(directory: CheckpointDir) -> dict:
    """{root, latest, checkpoints: [...committed...], abandoned: [...]} of a checkpoint dir."""
    storage = directory.storage
    if not storage.exists(storage.root):
        raise ToolError(f"{storage.root} does not exist")
    if not storage.isdir(storage.root):
        raise ToolError(f"{storage.root} is a file, not a checkpoint dir; give the run's "
                        "--checkpoint_dir")
    committed, leftovers = directory.scan()
    checkpoints = [_listed(storage, step, name, storage.join(name))
                   for step, name in sorted(committed.items())]
    latest = directory.latest_name()
    for c in checkpoints:
        c["latest"] = c["name"] == latest
    abandoned = [{"name": name, "path": storage.join(name), "reason": _why_abandoned(name),
                  "bytes": sum(storage.find(storage.join(name)).values())}
                 for name in leftovers]
    return {"root": storage.root, "latest": latest,
            "latest_valid": latest in set(committed.values()),
            "checkpoints": checkpoints, "abandoned": abandoned}


def _listed(storage: Storage, step: int, name: str, path: str) -> dict:
    """One committed step dir for `ls`: a damaged one is still listed, with the reason."""
    try:
        manifest = _manifest(storage, path)
    except ManifestError as e:
        manifest = {"files": {}, "world_size": None, "error": str(e)}
    item = {"name": name, "path": path, "step": step,
            "bytes": sum(f["size"] for f in manifest["files"].values()),
            "world_size": manifest.get("world_size"), "latest": False,
            "val_loss": None, "tokens": None}
    try:
        meta = read_meta(storage.dcp_reader(path))
        item.update(val_loss=meta.get("val_loss"), tokens=meta.get("tokens"))
    except Exception as e:
        item["error"] = f"cannot read its meta entry: {type(e).__name__}: {e}"[:200]
    if "error" in manifest:
        item["error"] = manifest["error"]
    return item


def list_tiers(durable: CheckpointDir, local_dirs: list[str]) -> dict:
    """list_checkpoints of the durable dir, with `local`: the listing of each local tier dir,
    each checkpoint marked `replicated`: yes (the durable dir has that step), pending (meant
    for it, not there yet), superseded (meant for it, but a newer step got there first: its
    replication was skipped for the newer one, replicate.py) or no (a local-only save)."""
    info = list_checkpoints(durable)
    in_durable = {c["step"] for c in info["checkpoints"] if "error" not in c}
    info["local"] = []
    for path in local_dirs:
        local = list_checkpoints(CheckpointDir(path))
        for c in local["checkpoints"]:
            try:
                meant = read_tier_info(c["path"]).get("replicate")
            except (OSError, ValueError):
                meant = None
            c["replicated"] = "yes" if c["step"] in in_durable else "no" if not meant else (
                "superseded" if c["step"] < max(in_durable, default=-1) else "pending")
        info["local"].append(local)
    return info


def _why_abandoned(name: str) -> str:
    if TMP_RE.match(name):
        return "temp dir: a save in progress or abandoned by a crash"
    if name.startswith("."):
        return "temp file of `latest`, abandoned by a crash"
    return "no manifest.json: never committed"


def inspect(storage: Storage, path: str) -> dict:
    """{path, manifest, meta, entries: {key: {shape, dtype, shards}}} of a committed step dir,
    checked against its manifest first (ManifestError for a damaged one, as on resume)."""
    manifest = require_intact(storage, path)
    reader = storage.dcp_reader(path)
    try:
        metadata = reader.read_metadata()
        meta = read_meta(reader) if "meta" in metadata.state_dict_metadata else None
    except Exception as e:
        raise ToolError(f"cannot read {path}: {type(e).__name__}: {e} (try dcp-ckpt verify)")
    if meta and isinstance(meta.get("config"), dict):  # older checkpoints hold keys in clear
        meta["config"] = redact.redact_config_dict(meta["config"])
    entries = {}
    for key, md in metadata.state_dict_metadata.items():
        if hasattr(md, "size"):
            entries[key] = {"shape": list(md.size), "dtype": str(md.properties.dtype).removeprefix("torch."),
                            "shards": len(md.chunks)}
        else:
            entries[key] = {"shape": None, "dtype": "bytes", "shards": 1}
    return {"path": path, "manifest": manifest, "meta": meta, "entries": entries}


def verify(storage: Storage, path: str) -> list[str]:
    """Problems of step dir `path` against its manifest.json; [] means intact."""
    if not storage.exists(path):
        return [f"{path} does not exist"]
    return manifest_problems(storage, path, deep=True)


# ---------------------------------------------------------------------------- commands
def _show(info: dict, args, printer) -> int:
    if args.json:
        counts = store_requests.total(store_requests.since(args.mark))
        print(json.dumps({**info, "requests": counts} if counts["total"] else info, indent=1))
    else:
        printer(info)
    return 0


def _step_dir(args, opts) -> tuple[Storage, str]:
    """(storage, step dir) that the CKPT argument names (CheckpointDir.resolve)."""
    paths.input_dir(args.ckpt, "CKPT", "a step dir or a checkpoint dir")
    directory = CheckpointDir(args.ckpt, opts)
    return directory.storage, directory.resolve()


def cmd_ls(args, opts) -> int:
    for path in [args.dir, *args.local]:
        paths.input_dir(path, "DIR" if path == args.dir else "--local",
                        "a checkpoint dir (a run's --checkpoint_dir or --local_checkpoint_dir)")
    if args.local:
        return _show(list_tiers(CheckpointDir(args.dir, opts), args.local), args,
                     print_tiers)
    return _show(list_checkpoints(CheckpointDir(args.dir, opts)), args, print_listing)


def cmd_inspect(args, opts) -> int:
    return _show(inspect(*_step_dir(args, opts)), args, print_inspect)


def cmd_verify(args, opts) -> int:
    storage, path = _step_dir(args, opts)
    problems = verify(storage, path)
    for p in problems:
        print(f"{path}: {p}")
    if problems:
        print(f"FAILED: {len(problems)} problem(s) in {path}")
        return 1
    n = len(_manifest(storage, path)["files"])
    print(f"OK: {path} ({n} files match manifest.json)")
    return 0


def cmd_export(args, opts) -> int:
    storage, path = _step_dir(args, opts)
    out, torch_ext = args.out, (".pt", ".pth", ".bin")
    fmt = args.format or ("torch" if out.endswith(torch_ext) else "safetensors")
    hf_dir = args.hf and not out.endswith((".safetensors", *torch_ext))  # for from_pretrained
    if hf_dir:
        name = "model.safetensors" if fmt == "safetensors" else "pytorch_model.bin"
        paths.output_dir(out, "--out")  # made by the export if it is not there yet
        out = os.path.join(out, name)
    if not hf_dir or os.path.isdir(os.path.dirname(out)):  # before anything is read
        paths.output_file(out, "--out", replace=False,
                          dir_hint="or pass --hf to write a Hugging Face dir into it")
    with bar(desc="export", total=3, unit="stage") as shown:  # at a terminal only
        shown.set_postfix_str("reading the checkpoint")
        weights, meta = load_model_weights(storage, path)
        shown.update()
        shown.set_postfix_str("converting")
        tensors = export_tensors(weights, meta, hf=args.hf, dtype=args.dtype)
        config = hf_config(meta, args.dtype) if args.hf else None
        shown.update()
        shown.set_postfix_str(f"writing {out}")
        written = write_export(tensors, out, fmt, config)
        shown.update()
    n = sum(t.numel() for t in tensors.values())
    print(f"exported step {meta['step']} of {path}: {len(tensors)} tensors, {n:,} parameters, "
          f"{args.dtype}, {'Hugging Face GPT-2' if args.hf else 'dcp_train'} names "
          f"(lm_head.weight omitted: tied to transformer.wte.weight) -> {', '.join(written)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dcp-ckpt", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    opts_help = "JSON dict of fsspec options for URLs (default: {})"
    p.add_argument("--storage_options", default="{}", help=opts_help)
    common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # also after the command
    common.add_argument("--storage_options", default=argparse.SUPPRESS, help=opts_help)
    sub = p.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("ls", parents=[common], allow_abbrev=False,
                        help="list checkpoints, `latest` and abandoned dirs")
    ls.add_argument("dir", help="checkpoint dir (--checkpoint_dir of the run)")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.add_argument("--local", action="append", default=[], metavar="LDIR",
                    help="a local tier dir (--local_checkpoint_dir of a node; repeat per node)")
    for name, text in (("inspect", "entries, shapes, dtypes, config"),
                       ("verify", "sizes + checksum against manifest.json; exit 1 on problems"),
                       ("export", "consolidated model weights in one file")):
        sp = sub.add_parser(name, parents=[common], help=text, allow_abbrev=False)
        sp.add_argument("ckpt", help="step dir, or checkpoint dir (uses `latest`)")
        if name == "inspect":
            sp.add_argument("--json", action="store_true", help="print JSON")
        if name == "export":
            sp.add_argument("--out", required=True,
                            help="local output file; with --hf also a dir (gets model.safetensors "
                                 "or pytorch_model.bin, and config.json)")
            sp.add_argument("--format", choices=("safetensors", "torch"), default=None,
                            help="default: torch if --out ends in .pt/.pth/.bin, else safetensors")
            sp.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                            help="dtype of the exported tensors (default: %(default)s)")
            sp.add_argument("--hf", action="store_true",
                            help="Hugging Face GPT-2 names/layout, plus config.json beside --out")
    return p


COMMANDS = {"ls": cmd_ls, "inspect": cmd_inspect, "verify": cmd_verify, "export": cmd_export}


EXIT_BROKEN_PIPE = 128 + 13  # as a tool killed by SIGPIPE: the reader (`| head`) went away


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.mark = store_requests.snapshot()
    # dcp.load(no_dist=True) warns that it loads in a single process: that is the intent here
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    try:
        opts = json.loads(args.storage_options)
        if not isinstance(opts, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:  # json's message never quotes the text (it may hold keys)
        print(f"dcp-ckpt: error: --storage_options: {e}", file=sys.stderr)
        return 2
    redact.remember(opts)
    try:
        code = COMMANDS[args.command](args, opts)
        counts = store_requests.total(store_requests.since(args.mark))
        if counts["total"] and not getattr(args, "json", False):
            print(f"store requests: {store_requests.line(counts)}")
        sys.stdout.flush()  # a closed pipe fails here, inside the try, not at exit
        return code
    except BrokenPipeError:
        # `dcp-ckpt inspect ... | head`: the reader has all it wants; no traceback, and
        # stdout goes to /dev/null so that the flush at interpreter exit cannot fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except (ToolError, paths.PathError, CheckpointError, ExportError, ManifestError,
            OSError) as e:
        print(redact.scrub(f"dcp-ckpt: error: {e}"), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
