"""The checkpoint's format and DCP adapters: Storage (the fsspec file API of a checkpoint
dir, handing out the DCP writer and reader), the manifest, checksums, DCP metadata read
safely, free space, the writer lease. Generic store code lives in dcp_train/store/."""
