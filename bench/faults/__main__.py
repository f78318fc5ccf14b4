"""`python -m bench.faults`: see bench/faults/__init__.py."""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from . import PARTS, format_table, run_parts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__)
    p.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS), help="the parts to run (default: all)")
    p.add_argument("--quick", action="store_true", help="CI size: 4 kills (2 inside a save) instead of 20")
    p.add_argument("--kills", type=int, default=20, help="SIGKILLs of the full campaign (default 20)")
    p.add_argument("--work", default=None, help="working directory (default: a fresh temporary one)")
    p.add_argument("--json", default=None, help="also write the rows and the machine here")
    p.add_argument("--cases", nargs="+", default=None, metavar="NAME",
                   help="inputs: only these bad-input cases (their printed names; default all)")
    a = p.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    work = Path(a.work or tempfile.mkdtemp(prefix="archscale-faults-")).absolute()
    t0 = time.time()
    rows = run_parts(work, a.only, quick=a.quick, kills=a.kills, log=lambda s: print(s, flush=True), cases=a.cases)
    took = time.time() - t0
    machine = f"{platform.node()} ({os.cpu_count()} CPUs, {platform.processor() or platform.machine()})"
    print(f"\npython -m bench.faults {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {machine}, {took:.0f} s, work dir {work}\n")
    print(format_table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": [asdict(r) for r in rows], "seconds": took,
                                            "machine": machine}, indent=1) + "\n")
    return 0 if all(r.ok or r.skipped for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
