"""Stable entry point: `python -m dcp_train.ckpt` (the same as the console script `dcp-ckpt`)
runs dcp_train.tools.ckpt.

The code lives in dcp_train/tools/ckpt.py; this module stays so that the documented command
keeps working.
"""

import sys

from dcp_train.tools.ckpt import main

if __name__ == "__main__":
    sys.exit(main())
