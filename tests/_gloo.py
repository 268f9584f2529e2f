"""Spawned gloo ranks for the distributed tests: ``run_ranks(cases, world)`` starts ``world`` CPU processes, each
runs ``cases(rank, world)`` (a module-level function, so that it pickles by name) and the list of their returned
dicts comes back, rank by rank."""
import datetime
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank, world, init_file, out_dir, cases):
    os.environ.pop("TRITON_INTERPRET", None)  # children use the PyTorch/C++ paths: fast enough for the CPU
    torch.set_num_threads(1)  # W processes share two cores: more threads only contend
    # a file store needs no free port; the timeout turns a lost peer into an error instead of a hang
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=90))
    try:
        sys.path.insert(0, os.path.dirname(__file__))
        torch.save(cases(rank, world), os.path.join(out_dir, f"r{rank}.pt"))
    finally:
        dist.barrier()  # no rank tears down gloo while a peer's send is still in flight
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter-exit destructors racing gloo's threads (see tests/test_distributed.py)


def run_ranks(cases, world):
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(world, os.path.join(d, "init"), d, cases), nprocs=world, join=True)
        return [torch.load(os.path.join(d, f"r{r}.pt")) for r in range(world)]
