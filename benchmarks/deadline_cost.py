"""The cost of a watched block (`jaxlm.distributed.deadline`) in a two-process run on this host.

    python benchmarks/deadline_cost.py [--blocks 500]

Starts two local processes of one job (jax.distributed on 127.0.0.1, CPU). Each times `--blocks`
empty blocks under `deadline` (a multi-process eval watches every batch this way) and prints one
JSON line: microseconds per block in each process.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time


def _worker(process_id: int, address: str, blocks: int) -> None:
    from jaxlm import distributed

    distributed.initialize(address, 2, process_id)
    t0 = time.perf_counter()
    for i in range(blocks):
        with distributed.deadline(f"eval batch {i + 1} of {blocks}", 60):
            pass
    print(json.dumps({"process": process_id, "us": 1e6 * (time.perf_counter() - t0) / blocks}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--blocks", type=int, default=500)
    p.add_argument("--worker", type=int, default=-1, help=argparse.SUPPRESS)
    p.add_argument("--address", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker >= 0:
        _worker(args.worker, args.address, args.blocks)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, __file__, "--blocks", str(args.blocks), "--address", address]
    procs = [
        subprocess.Popen([*cmd, "--worker", str(i)], env=env, stdout=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    rows = [json.loads(proc.communicate(timeout=300)[0].strip().splitlines()[-1]) for proc in procs]
    us = {f"process_{r['process']}_us_per_block": round(r["us"], 1) for r in rows}
    print(json.dumps({"blocks": args.blocks, **us}))


if __name__ == "__main__":
    main()
