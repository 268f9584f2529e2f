"""Where the fused loss spends its time: torch.profiler over forward+backward, per CUDA kernel.

    python benchmarks/profile_infonce.py [--sizes 4096,16384] [--d 768]
"""
import argparse

import torch

import fastcontrast as fc
from fastcontrast.bench import median_ms


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="4096,16384")
    p.add_argument("--d", type=int, default=768)
    a = p.parse_args()
    dev = torch.device("cuda")
    for n in map(int, a.sizes.split(",")):
        x = torch.nn.functional.normalize(torch.randn(n, a.d, device=dev), dim=1).bfloat16().requires_grad_()
        y = torch.nn.functional.normalize(torch.randn(n, a.d, device=dev), dim=1).bfloat16().requires_grad_()
        s = torch.tensor(14.3, device=dev, requires_grad=True)

        def step():
            x.grad = y.grad = s.grad = None
            fc.clip_loss(x, y, s, backend="triton").backward()

        wall = median_ms(step, dev, warmup=3, reps=15)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        ka = prof.key_averages()
        gpu_total = sum(e.self_device_time_total for e in ka) / 5 / 1e3
        print(f"\n## N = {n}, d = {a.d}: wall median {wall:.3f} ms, GPU busy {gpu_total:.3f} ms per step")
        print(ka.table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
