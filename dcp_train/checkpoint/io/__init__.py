"""Storage and files: the fsspec layer, DCP adapters, manifest, safe metadata, atomic writes,
free space, the writer lease."""
