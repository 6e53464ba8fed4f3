"""The store layer, below both checkpoint/ and data/: how a local path or an fsspec URL is
opened (options.py: every request's timeouts and retries), the one atomic file write
(atomic.py), the requests sent to object stores, counted by kind (requests.py), and whole
files of known size read in concurrent ranged GETs (ranged_read.py)."""
