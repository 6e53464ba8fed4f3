import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py, tests/servers.py

from helpers import SHARED_TIKTOKEN  # noqa: E402

# Tests never download: the GPT-2 BPE ranks come from ../shared/tiktoken_cache.
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED_TIKTOKEN))
