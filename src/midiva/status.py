"""Progress of annotation outputs (e.g. the shards of a Slurm array) without touching them.

Input: annotations CSV paths (their ledgers, lock files and run summaries beside them).
Output: one `OutputStatus` per path — files and bars committed, failures, whether the run read its
source to the end, and who holds the output's lock now — plus totals (`status_table` for people).
Reading is safe while the runs write: the ledger is append-only and only committed records count.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from midiva.ledger import output_paths, scan_ledger
from midiva.lock import read_holder

STATES = ("complete", "running", "stopped", "not started", "damaged")


@dataclass(frozen=True)
class OutputStatus:
    """Where one output stands.

    Attributes:
        state: 'complete' (merge-ready), 'running' (a live holder of its lock), 'stopped' (resume it),
            'not started' (no ledger) or 'damaged' (a ledger without a valid header, or a foreign lock file).
        shard: 'i/n' for sharded runs, '' otherwise.
        files / failed / bars: committed so far (failed files are counted in `files` too).
        holder: the lock holder, 'PID p on host h (label), since t', when a lock file is present.
        holder_alive: whether that process still runs (None: on another host, cannot be checked).
        last_run: the last finished or stopped run's summary (files_done, elapsed_s, ...), if any.
    """

    out: str
    state: str
    shard: str
    files: int
    failed: int
    bars: int
    holder: str
    holder_alive: bool | None
    last_run: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def output_status(out: Path | str) -> OutputStatus:
    """The status of one annotations output (read-only)."""
    paths = output_paths(out)
    holder, raw = read_holder(paths.csv)
    holder_text = holder.describe() if holder else ("a lock file that is not midiva's" if raw else "")
    alive = holder.is_alive_here() if holder else None
    last_run: dict[str, Any] = {}
    with suppress(OSError, ValueError):  # no summary yet, or one being replaced
        last_run = json.loads(paths.summary.read_text(encoding="utf-8"))
    if not paths.ledger.is_file():
        state = "running" if holder and alive is not False else "not started"
        return OutputStatus(str(paths.csv), state, "", 0, 0, 0, holder_text, alive, last_run)
    ledger = scan_ledger(paths.ledger)
    if ledger is None or (raw and holder is None):
        return OutputStatus(str(paths.csv), "damaged", "", 0, 0, 0, holder_text, alive, last_run)
    num_shards = int(ledger.fingerprint.get("num_shards", 1))
    shard = f"{ledger.fingerprint.get('shard_index', 0)}/{num_shards}" if num_shards > 1 else ""
    state = "running" if holder is not None and alive is not False else "complete" if ledger.complete else "stopped"
    failed = ledger.n_files - len(ledger.ok_keys)
    return OutputStatus(
        str(paths.csv), state, shard, ledger.n_files, failed, ledger.n_rows, holder_text, alive, last_run
    )


def outputs_status(outs: Sequence[Path | str]) -> list[OutputStatus]:
    """`output_status` of each path, in the order given."""
    return [output_status(out) for out in outs]


def status_table(statuses: Sequence[OutputStatus]) -> str:
    """A fixed-width table, one line per output plus a totals line."""
    lines = [f"{'state':<12} {'shard':>7} {'files':>10} {'failed':>8} {'bars':>12}  output / lock holder"]
    for s in statuses:
        who = f"  [{s.holder}{'' if s.holder_alive is not False else ', not running'}]" if s.holder else ""
        lines.append(f"{s.state:<12} {s.shard:>7} {s.files:>10,} {s.failed:>8,} {s.bars:>12,}  {s.out}{who}")
    counts = {state: sum(s.state == state for s in statuses) for state in STATES}
    summary = ", ".join(f"{n} {state}" for state, n in counts.items() if n)
    total = [sum(s.files for s in statuses), sum(s.failed for s in statuses), sum(s.bars for s in statuses)]
    lines.append(f"{'total':<12} {len(statuses):>7} {total[0]:>10,} {total[1]:>8,} {total[2]:>12,}  {summary}")
    return "\n".join(lines) + "\n"
