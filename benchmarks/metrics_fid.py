"""How long ``med3d_hub.inference.metrics.fid`` takes on two sets of 10,000 x 2048 features (resnet50's width).

    nice -n 10 python benchmarks/metrics_fid.py [--n 10000] [--dim 2048] [--repeats 3]

Times, best of ``--repeats``: the whole score from two float32 feature arrays (covariances in
float64, then the distance), the streaming path (batches of 256 through ``MeanCovariance``), and
the distance alone from ready statistics. Then the floor that no float64 implementation goes below on
this machine: the two covariance products (one float64 ``X^T X`` per set, numpy's symmetric BLAS
product) plus one 2048 x 2048 symmetric eigenvalue problem, timed alone. Prints the machine's load, because on a shared machine
the load decides the number; a multi-threaded BLAS on a busy machine is slower than one thread
(set OPENBLAS_NUM_THREADS=1 there).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from med3d_hub.inference import metrics


def best_of(repeats: int, fn) -> tuple[float, float, object]:
    """(best wall seconds, its CPU seconds, the result)."""
    best = (float("inf"), 0.0, None)
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if wall < best[0]:
            best = (wall, cpu, result)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    mixing = rng.standard_normal((args.dim, args.dim)).astype(np.float32) / np.sqrt(args.dim)
    a = np.maximum(rng.standard_normal((args.n, args.dim), dtype=np.float32) @ mixing, 0)  # ReLU'd, like pooled features
    b = np.maximum(rng.standard_normal((args.n, args.dim), dtype=np.float32) @ mixing * 1.05 + 0.01, 0)
    load_before = os.getloadavg()

    def streamed():
        stats = [metrics.MeanCovariance(), metrics.MeanCovariance()]
        for start in range(0, args.n, 256):
            stats[0].update(a[start:start + 256])
            stats[1].update(b[start:start + 256])
        return metrics.fid(*stats)

    sa, sb = metrics.MeanCovariance.of(a), metrics.MeanCovariance.of(b)
    mu1, s1, mu2, s2 = sa.mean, sa.covariance, sb.mean, sb.covariance
    results = {}
    for name, fn in (("fid(a, b)", lambda: metrics.fid(a, b)),
                     ("streamed, batches of 256", streamed),
                     ("frechet_distance from statistics", lambda: metrics.frechet_distance(mu1, s1, mu2, s2))):
        wall, cpu, value = best_of(args.repeats, fn)
        results[name] = {"seconds": round(wall, 3), "cpu_seconds": round(cpu, 3), "fid": value}
        print(f"{name:<36} {wall:7.3f} s wall  {cpu:7.3f} s CPU   FID {value:.6f}", flush=True)
    x = a.astype(np.float64)
    syrk, _, _ = best_of(args.repeats, lambda: x.T @ x)
    spd = s1 + np.eye(args.dim)
    eig, _, _ = best_of(args.repeats, lambda: np.linalg.eigvalsh(spd))
    floor = {"covariance product, one set": round(syrk, 3), "eigenvalues, one D x D": round(eig, 3),
             "floor: two products + eigenvalues": round(2 * syrk + eig, 3)}
    for name, seconds in floor.items():
        print(f"{name:<36} {seconds:7.3f} s wall", flush=True)
    print(json.dumps({
        "n": args.n, "dim": args.dim, "repeats": args.repeats, "cpus": os.cpu_count(),
        "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS"), "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(), "results": results, "floor": floor,
    }, indent=2))


if __name__ == "__main__":
    main()
