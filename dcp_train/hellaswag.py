"""Stable entry point: `python -m dcp_train.hellaswag` runs dcp_train.train.hellaswag.

The code lives in dcp_train/train/hellaswag.py; this module stays so that the documented command
keeps working.
"""

import sys

from dcp_train.train.hellaswag import main

if __name__ == "__main__":
    sys.exit(main())
