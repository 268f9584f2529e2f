"""Developer tooling, apart from the runtime path: probes of memory, host syncs and GEMM FLOPs (``memtrack``)."""
