"""What fitting a ladder costs (issue 29's target: 3 cells of 20 points with 1,000 bootstrap
resamples in under 10 s on the 2-core machine).

    python -m bench.ladder_fit                      # 3 cells x 20 points, 1000 resamples
    python -m bench.ladder_fit --resamples 200 --starts 16 --repeat 3

The points come from a known law, L = E + A/N^alpha + B/D^beta with 1% log-normal noise, at
5 rungs x 2 budgets x 2 seeds per cell (the cells differ in E). Times `fit_ladder` (the point
fit of every cell from the L-BFGS-B starts, then the paired bootstrap) as `archscale ladder`
runs it: all 1024 grid starts (its default) and the best `--starts` of them. Prints wall and CPU
seconds (the best of `--repeat`; on a shared machine the CPU time is the steadier figure; the fit
runs on one BLAS thread) and the target; nothing is asserted (a benchmark, not a test). Record the
numbers with the machine and date in bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

TARGET_S = 10.0


def synthetic_points(cells: int = 3, seed: int = 0) -> list:
    """cells x 5 rungs x 2 budgets x 2 seeds points from a known law with 1% noise."""
    import numpy as np

    from train.commands.ladder import LadderPoint

    rng = np.random.default_rng(seed)
    out = []
    for c in range(cells):
        for r, n in enumerate((1e6, 3e6, 1e7, 3e7, 1e8)):
            for m in (10, 40):
                for s in range(2):
                    d = m * n
                    loss = (1.7 + 0.05 * c + 400 / n ** 0.34 + 1200 / d ** 0.28) * float(np.exp(rng.normal(0, 0.01)))
                    out.append(LadderPoint(f"cell{c}", s, r, n, d, 6 * n * d, loss))
    return out


def main(argv=None) -> int:
    from train.commands.ladder import fit_ladder

    p = argparse.ArgumentParser(prog="python -m bench.ladder_fit", description=__doc__.split("\n\n")[0])
    p.add_argument("--cells", type=int, default=3)
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--starts", type=int, default=16, help="the second timing's starts (the first uses all 1024)")
    p.add_argument("--repeat", type=int, default=1, help="timings per setting; the fastest counts")
    a = p.parse_args(argv)
    points = synthetic_points(a.cells)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; {a.cells} cells x "
          f"{len(points) // a.cells} points, {a.resamples} bootstrap resamples; target {TARGET_S:.0f} s")
    for starts in (None, a.starts):
        best, cpu = float("inf"), float("inf")
        for _ in range(a.repeat):
            t0, c0 = time.perf_counter(), time.process_time()
            fit = fit_ladder(points, resamples=a.resamples, seed=0, starts=starts)
            best, cpu = min(best, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
        failed = sum(b.failed for b in fit.cells.values())
        what = "all 1024 starts (archscale ladder's default)" if starts is None else f"the best {starts} starts"
        print(f"  {what}: {best:.1f} s wall, {cpu:.1f} s CPU ({'under' if best < TARGET_S else 'OVER'} the "
              f"target in wall time); {failed} failed refits")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
