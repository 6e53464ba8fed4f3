"""Stable entry point: `python -m dcp_train.plot` runs dcp_train.tools.plot.

The code lives in dcp_train/tools/plot.py; this module stays so that the documented command
keeps working.
"""

import sys

from dcp_train.tools.plot import main

if __name__ == "__main__":
    sys.exit(main())
