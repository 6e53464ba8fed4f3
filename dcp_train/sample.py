"""Stable entry point: `python -m dcp_train.sample` runs dcp_train.tools.sample.

The code lives in dcp_train/tools/sample.py; this module stays so that the documented command
keeps working.
"""

import sys

from dcp_train.tools.sample import main

if __name__ == "__main__":
    sys.exit(main())
