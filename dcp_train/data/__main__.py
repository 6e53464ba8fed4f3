"""`python -m dcp_train.data` is `python -m dcp_train.data.prepare`."""

from .prepare import main

main()
