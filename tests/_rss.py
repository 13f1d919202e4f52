"""Peak memory of a server process while it handles one hostile request (Linux: /proc).

`PeakRss(pid)` resets the process's peak RSS (writing 5 to /proc/PID/clear_refs sets VmHWM back to the current
RSS), and `growth()` is how far the peak rose above the RSS at the reset, in bytes."""

from __future__ import annotations

from pathlib import Path

MB = 1024 * 1024


def _status(pid: int) -> dict[str, int]:
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0]) * 1024
    return values


class PeakRss:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        self.start = _status(pid)["VmRSS"]

    def growth(self) -> int:
        return _status(self.pid)["VmHWM"] - self.start
