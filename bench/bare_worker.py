"""One rank of a bare launch (bench/goodput.py's floor): `import torch`, a gloo process group,
a barrier; appends {"rank", "start", "imported", "ready"} (Unix times) as a JSON line to argv[1].

    torchrun --nproc_per_node 2 bench/bare_worker.py OUT.jsonl
"""

import json
import os
import sys
import time

from bench.supervisor import start_time  # noqa: E402  (no torch in it)

t_start = start_time(os.getpid())
import torch.distributed as dist  # noqa: E402

t_imported = time.time()
dist.init_process_group("gloo")
dist.barrier()
t_ready = time.time()
with open(sys.argv[1], "a") as f:
    f.write(json.dumps({"rank": dist.get_rank(), "start": t_start, "imported": t_imported,
                        "ready": t_ready}) + "\n")
dist.destroy_process_group()
