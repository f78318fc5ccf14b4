"""The pages `archscale reproduce` writes: RESULTS/NAME.md from a real run, and the index."""
from __future__ import annotations

import datetime
import platform
import re
import shutil
from pathlib import Path

from .measures import measure_low_rank
from .rules import _describe

def _machine() -> str:
    import os

    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu or platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.system()}"


def _cell_value(v) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def _measured_table(claim, doc: dict) -> str:
    """The claim's own measure per cell and seed (claim.measured), and its pairs' intervals ("" if none ran)."""
    measured_keys = {k for k, _ in claim.measured}
    if not (claim.measured and any(k in r for c in doc["cells"] for r in c["runs"] for k in measured_keys)):
        return ""
    unit = claim.measured[0][1] if claim.measure is measure_low_rank else "nats/token"
    rows = "".join(f"| {c['name']} | {r['seed']} | " + " | ".join(_cell_value(r.get(k)) for k, _ in claim.measured)
                   + " |\n" for c in doc["cells"] for r in c["runs"] if measured_keys & set(r))
    pairs = "\n".join(f"- {p['metric']}: {_describe(p, 'accuracy' if p['metric'].endswith('acc') else unit)}"
                      f"{' (resolved)' if p['resolved'] else ''}"
                      for p in doc["pairs"] if p["metric"] in measured_keys and "per_seed" not in p)
    return (f"## {claim.measured_title}\n\n| cell | seed | " + " | ".join(t for _, t in claim.measured)
            + " |\n|---|---|" + "---|" * len(claim.measured) + "\n" + rows + "\n" + pairs + "\n\n")


def _budget_text(doc: dict) -> str:
    """The budget every cell had, and which cells missed it."""
    from ..comparison import budget_lines
    from ..compare.sizing import TOLERANCE

    gaps = budget_lines(doc["cells"], doc["budget"]["kind"], doc["budget"]["value"], tolerance=TOLERANCE)
    return (f"{doc['budget']['kind']} = {doc['budget']['value']:,.0f} for every cell; "
            + ("; ".join(gaps) + ". The verdict compares cells that did not see the same budget."
               if gaps else f"every cell met it within {TOLERANCE:.0%} (compare checks each run's stream "
                            f"before training and refuses one that would miss it)."))


def _copy_pictures(claim, results: Path, out: Path) -> tuple[Path, str]:
    """The curves (and the measure's own picture) copied beside the page: (curves path, markdown of the other)."""
    results.mkdir(parents=True, exist_ok=True)
    png = results / f"{claim.name}.png"
    shutil.copyfile(out / "curves.png", png)
    if not claim.picture:
        return png, ""
    shutil.copyfile(out / claim.picture, results / f"{claim.name}-measured.png")
    return png, f"![measured]({claim.name}-measured.png)\n\n"


def write_page(claim, a, doc: dict, verdict: str, reasons: list[str], out: Path) -> Path:
    """RESULTS/NAME.md of a real run: the claim, its rule, the verdict and its reasons, the budget,
    the caveat and the reading, the command, machine and date, the tables and the pictures."""
    from ..comparison import cell_table, pair_table

    metric_text = ("Intervals are paired by seed, 95% (the seeds' spread only)." if claim.measure else
                   "The metric is the common yardstick's continuation loss in nats per token (docs/evaluation.md); "
                   "intervals are paired by seed, 95%, covering the seeds and the held-out windows.")
    measured_keys = {k for k, _ in claim.measured}
    rank_table = _measured_table(claim, doc)
    budget_text = _budget_text(doc)
    reading = claim.reading(doc, claim.names) if claim.reading else ""
    reading = f"\n\n**Reading.** {reading}" if reading else ""
    results = Path(a.results)
    png, measured_png = _copy_pictures(claim, results, out)
    command = " ".join(["archscale reproduce", claim.name, "--size", a.size, "--seeds", str(a.seeds), "--tokens",
                        str(a.tokens)] + (["--out", a.out] if a.out else []) + (["--set", *a.set] if a.set else []))
    page = f"""# {claim.name}: {verdict}

**Claim** ({claim.source}): {claim.text}

**Rule, stated before the run**: {' '.join(claim.rule.__doc__.split())} {metric_text}

**Verdict: {verdict}.**
{chr(10).join('- ' + r for r in reasons)}

**Budget.** {budget_text}

**Scale caveat.** {claim.caveat}{reading}

Command: `{command}` (run directories: `{out}`). Machine: {_machine()}. Date:
{datetime.date.today().isoformat()}.

## Cells

{cell_table(doc["cells"])}

{rank_table}{measured_png}## Differences

{pair_table([p for p in doc["pairs"] if p["metric"] not in measured_keys])}

![curves]({png.name})
"""
    path = results / f"{claim.name}.md"
    path.write_text(page)
    print(f"{path}  {png}")
    return path


def write_index(results: Path, claims: dict) -> Path:
    """RESULTS/README.md: every claim, and the verdict, command and date of its page in RESULTS
    (read back from the pages, so the index says what the runs printed)."""
    rows = []
    for c in claims.values():
        page = results / f"{c.name}.md"
        if not page.exists():
            rows.append(f"| {c.name} | not run here yet | `archscale reproduce {c.name}` | - |")
            continue
        text = page.read_text()
        verdict = text.splitlines()[0].split(": ", 1)[-1]
        command = re.search(r"Command: `([^`]*)`", text)
        date = re.search(r"Date:\s*(\S+)\.", text)
        rows.append(f"| [{c.name}]({page.name}) | {verdict} | `{command.group(1) if command else '?'}` | "
                    f"{date.group(1) if date else '?'} |")
    index = results / "README.md"
    index.write_text("# Reproductions\n\nThe published claims the project's brief lists (SCIENCE.md, in `../shared/` beside "
                     "the repository), each run by `archscale reproduce NAME` and judged by the rule its page "
                     "states. This index is written by the command from the pages; the machine and the scale "
                     "caveat are on each page.\n\n| claim | verdict | command | date |\n|---|---|---|---|\n"
                     + "\n".join(rows) + "\n")
    return index
