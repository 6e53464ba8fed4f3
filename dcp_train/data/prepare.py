"""Write uint16 token shards: `python -m dcp_train.data.prepare --source ... --out DIR`.

The shard format is build-nanogpt's (`fineweb.py`): each document is the EOT token 50256
followed by its GPT-2 tokens; the token stream is cut into shards written with `np.save` as
uint16 arrays named `<prefix>_val_000000.npy`, `<prefix>_train_000001.npy`, ... Shard 0 is the
val split and holds the first `--val_tokens` tokens; the rest go to train shards of
`--shard_size` tokens (the last one shorter). Documents may straddle two shards. Every shard is
written to a hidden temp file and renamed into place, so a crash never leaves half a shard.

Sources:

* `default` - an embedded corpus that needs no download: the Python standard library's own
  source, which every machine running this program has. All `*.py` files under
  `sysconfig.get_paths()["stdlib"]`, sorted by relative path, without `site-packages` and the
  `test`/`tests` suites; one document per file; capped at `--max_tokens` (default 3M tokens,
  ~1-2 s to tokenize on 2 cores). Deterministic for a given Python installation (a different
  Python version gives a different corpus). Val is 5% of the tokens, train shards 1M tokens.
* `text` - local files (`--inputs FILE_OR_GLOB ...`): one document per file, or for `.jsonl`
  files one document per line from its "text" field. Val is 5% of the tokens by default.
* `fineweb` - FineWeb-Edu through the `datasets` library (an optional extra: `pip install
  datasets`): `--dataset_path HuggingFaceFW/fineweb-edu --dataset_name sample-10BT` streams the
  hub dataset; a local `.jsonl`/`.json`/`.parquet` file with a "text" column is read with
  `datasets.load_dataset("json"|"parquet", data_files=...)`. Shard 0 (val) is one full shard,
  as in build-nanogpt, unless --val_tokens says otherwise.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import sys
from typing import Iterable, Iterator, Optional

import numpy as np

from dcp_train.store.atomic import write_atomic
from dcp_train.data.tokenizer import EOT, get_tokenizer
from dcp_train.job.progress import bar as progress_bar
from .shards import SHARD_DTYPE, DataError, find_shards
from .sources import default_texts, fineweb_texts, text_texts

DEFAULT_MAX_TOKENS = 3_000_000
DEFAULT_CORPUS_SHARD_SIZE = 1_000_000
BIG_SHARD_SIZE = 100_000_000  # build-nanogpt's shard size, for text and fineweb
PREFIXES = {"default": "pystdlib", "text": "text", "fineweb": "edufineweb"}


def save_shard(path: str, tokens: np.ndarray) -> None:
    """np.save a uint16 shard atomically (atomic.write_atomic)."""
    if tokens.dtype != SHARD_DTYPE or tokens.ndim != 1:
        raise ValueError(f"shard must be a 1-D uint16 array, got {tokens.dtype} {tokens.shape}")
    write_atomic(path, lambda f: np.save(f, tokens))


class ShardWriter:
    """Cuts a stream of documents into val shard 0 and train shards 1, 2, ... (module doc)."""

    def __init__(self, out_dir: str, prefix: str, shard_size: int, val_tokens: int,
                 max_tokens: Optional[int] = None):
        if shard_size < 1 or val_tokens < 1:
            raise DataError("--shard_size and --val_tokens must be >= 1")
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.prefix = out_dir, prefix
        self.shard_size, self.max_tokens = shard_size, max_tokens
        self.paths: list[str] = []
        self.total = 0
        self._buf = np.empty(val_tokens, dtype=SHARD_DTYPE)
        self._fill = 0

    @property
    def full(self) -> bool:
        return self.max_tokens is not None and self.total >= self.max_tokens

    def add(self, tokens: list[int]) -> None:
        """Append one document: EOT, then its tokens (cut off at max_tokens)."""
        doc = np.asarray([EOT] + list(tokens), dtype=np.int64)
        if doc.max() >= 2 ** 16 or doc.min() < 0:
            raise DataError(f"token id {doc.max()} does not fit in uint16")
        if self.max_tokens is not None:
            doc = doc[:max(self.max_tokens - self.total, 0)]
        doc = doc.astype(SHARD_DTYPE)
        self.total += doc.size
        while doc.size:
            take = min(doc.size, self._buf.size - self._fill)
            self._buf[self._fill:self._fill + take] = doc[:take]
            self._fill += take
            doc = doc[take:]
            if self._fill == self._buf.size:
                self._flush()

    def _flush(self) -> None:
        index = len(self.paths)
        split = "val" if index == 0 else "train"
        path = os.path.join(self.out_dir, f"{self.prefix}_{split}_{index:06d}.npy")
        save_shard(path, self._buf[:self._fill].copy())
        self.paths.append(path)
        self._buf = np.empty(self.shard_size, dtype=SHARD_DTYPE)
        self._fill = 0

    def close(self) -> list[str]:
        """Write the last partial shard; returns all shard paths (val first)."""
        if self._fill:
            self._flush()
        if len(self.paths) < 2:
            raise DataError(f"the corpus has only {self.total} tokens, all in the val shard; "
                            f"pass a smaller --val_tokens or more text")
        return self.paths


def tokenized(texts: Iterable[str], tokenizer_file: str = "", max_tokens: Optional[int] = None,
              progress: bool = True, chunk: int = 256) -> Iterator[list[int]]:
    """GPT-2 tokens of each document (tiktoken, batches of `chunk` on all cores), with a
    progress bar counting tokens (+1 EOT per document) at a terminal (job/progress.py)."""
    enc = get_tokenizer(tokenizer_file)
    threads = os.cpu_count() or 1
    bar = progress_bar(desc="tokenizing", total=max_tokens, unit="tokens", unit_scale=True,
                       enabled=progress)
    batch: list[str] = []
    try:
        for text in itertools.chain(texts, [None]):
            if text is not None:
                batch.append(text)
            if batch and (len(batch) == chunk or text is None):
                for tokens in enc.encode_ordinary_batch(batch, num_threads=threads):
                    bar.update(min(len(tokens) + 1, bar.total - bar.n) if bar.total
                               else len(tokens) + 1)
                    yield tokens
                batch = []
    finally:
        bar.close()


# ---- entry points ----------------------------------------------------------------------------

def prepare(source: str, out: str, shard_size: Optional[int] = None,
            val_tokens: Optional[int] = None, max_tokens: Optional[int] = None,
            tokenizer_file: str = "", inputs: Optional[list[str]] = None,
            dataset_path: str = "HuggingFaceFW/fineweb-edu", dataset_name: str = "sample-10BT",
            dataset_split: str = "train", progress: bool = True) -> list[str]:
    """Write the shards of `source` into `out`; returns their paths (val first)."""
    if source == "fineweb":  # streamed: val is one shard, as in build-nanogpt
        shard_size = shard_size or BIG_SHARD_SIZE
        texts = fineweb_texts(dataset_path, dataset_name, dataset_split)
        writer = ShardWriter(out, PREFIXES[source], shard_size, val_tokens or shard_size,
                             max_tokens)
        for tokens in tokenized(texts, tokenizer_file, max_tokens, progress):
            writer.add(tokens)
            if writer.full:
                break
        return writer.close()
    if source == "default":
        texts = default_texts()
        shard_size = shard_size or DEFAULT_CORPUS_SHARD_SIZE
        max_tokens = max_tokens or DEFAULT_MAX_TOKENS
    elif source == "text":
        texts = text_texts(inputs or [])
        shard_size = shard_size or BIG_SHARD_SIZE
    else:
        raise DataError(f"unknown --source {source!r}; choose default, text or fineweb")
    # default/text: tokenize in memory first, so that val can be 5% of the total
    docs: list[list[int]] = []
    total = 0
    for tokens in tokenized(texts, tokenizer_file, max_tokens, progress):
        docs.append(tokens)
        total += len(tokens) + 1
        if max_tokens is not None and total >= max_tokens:
            total = max_tokens
            break
    writer = ShardWriter(out, PREFIXES[source], shard_size, val_tokens or max(total // 20, 1),
                         max_tokens)
    for tokens in docs:
        writer.add(tokens)
    return writer.close()


def ensure_default_data(data_dir: str, tokenizer_file: str = "") -> None:
    """Write the default corpus into local `data_dir` unless it already holds shards.

    The shards are prepared in a sibling temp dir first; if data_dir is absent or empty that
    dir is renamed into place (atomic), else the shards are moved in one by one, val last.
    """
    for split in ("train", "val"):
        try:
            find_shards(data_dir, split)
            return
        except DataError:
            pass
    data_dir = os.path.abspath(data_dir)
    staging = f"{data_dir}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        paths = prepare("default", staging, tokenizer_file=tokenizer_file)
        if os.path.isdir(data_dir) and not os.listdir(data_dir):
            os.rmdir(data_dir)
        if not os.path.exists(data_dir):
            os.makedirs(os.path.dirname(data_dir), exist_ok=True)
            os.replace(staging, data_dir)
            return
        for path in paths[1:] + paths[:1]:
            os.replace(path, os.path.join(data_dir, os.path.basename(path)))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dcp_train.data.prepare",
                                description="Write uint16 GPT-2 token shards (build-nanogpt "
                                            "format). Shard 0 is val, the rest train.",
                                allow_abbrev=False)
    p.add_argument("--source", choices=["default", "text", "fineweb"], default="default",
                   help="default: the Python stdlib's source (no download); text: --inputs "
                        "files; fineweb: FineWeb-Edu via `datasets` (default: %(default)s)")
    p.add_argument("--out", default="data/default", help="output dir (default: %(default)s)")
    p.add_argument("--shard_size", type=int, default=None,
                   help=f"tokens per train shard (default: {BIG_SHARD_SIZE:.0e}, "
                        f"{DEFAULT_CORPUS_SHARD_SIZE:.0e} for the default corpus)")
    p.add_argument("--val_tokens", type=int, default=None,
                   help="tokens in val shard 0 (default: 5%% of the tokens for default/text, "
                        "one shard for fineweb)")
    p.add_argument("--max_tokens", type=int, default=None,
                   help=f"stop after this many tokens (default: all; {DEFAULT_MAX_TOKENS} for "
                        f"the default corpus)")
    p.add_argument("--tokenizer_file", default="", help="local tiktoken r50k_base/gpt2 ranks file")
    p.add_argument("--inputs", nargs="+", default=[],
                   help="--source text: files or globs; .jsonl = one {'text': ...} per line")
    p.add_argument("--dataset_path", default="HuggingFaceFW/fineweb-edu",
                   help="--source fineweb: hub dataset, or a local .jsonl/.parquet file with a "
                        "'text' column (default: %(default)s)")
    p.add_argument("--dataset_name", default="sample-10BT",
                   help="--source fineweb: hub config name (default: %(default)s)")
    p.add_argument("--dataset_split", default="train", help="hub split (default: %(default)s)")
    return p


def main(argv: Optional[list[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        paths = prepare(args.source, args.out, args.shard_size, args.val_tokens, args.max_tokens,
                        args.tokenizer_file, args.inputs, args.dataset_path, args.dataset_name,
                        args.dataset_split)
    except DataError as e:
        print(f"dcp_train.data.prepare: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    sizes = [np.load(p, mmap_mode="r").size for p in paths]
    print(f"wrote {len(paths)} shards, {sum(sizes)} tokens (val {sizes[0]}, train "
          f"{sum(sizes[1:])}) to {args.out}")


if __name__ == "__main__":
    main()
