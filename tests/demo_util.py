"""Starting `oma-api -demo` as a subprocess, as a user would, for tests and bench/bench_demo.py."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
READY = re.compile(r"OMA demo ready in [\d.]+ s: (?P<url>http://\S+/ui/)")
PASSWORD = re.compile(r"^\s*password: (?P<password>\S+)$", re.M)
DATA = re.compile(r"data in (?P<dir>\S+?);")


@dataclass
class DemoProcess:
    proc: subprocess.Popen
    started: float
    output: str = ""
    url: str = ""
    password: str = ""
    data_dir: Path | None = None
    seen: set[tuple[int, str]] = field(default_factory=set)  # (pid, start time) of every descendant seen

    def wait_ready(self, timeout: float = 90.0) -> float:
        """Reads stdout until the URL and password are printed; returns the seconds since launch."""
        deadline = time.monotonic() + timeout
        os.set_blocking(self.proc.stdout.fileno(), False)
        while not (READY.search(self.output) and PASSWORD.search(self.output)):
            if self.proc.poll() is not None:
                raise AssertionError(f"oma-api -demo exited {self.proc.returncode}: {self.output}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no URL and password printed in {timeout} s: {self.output!r}")
            try:
                self.output += os.read(self.proc.stdout.fileno(), 65536).decode()
            except BlockingIOError:
                time.sleep(0.02)
        elapsed = time.monotonic() - self.started
        self.url = READY.search(self.output)["url"].removesuffix("/ui/")
        self.password = PASSWORD.search(self.output)["password"]
        self.data_dir = Path(DATA.search(self.output)["dir"])
        return elapsed

    def descendants(self) -> set[tuple[int, str]]:
        """The process tree below the demo now (nats-server, gateway workers, nbdkit), remembered."""
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                info = _stat(int(entry.name))
                if info:
                    children.setdefault(info[0], []).append(int(entry.name))
        found, todo = set(), [self.proc.pid]
        while todo:
            for child in children.get(todo.pop(), []):
                info = _stat(child)
                if info:
                    found.add((child, info[1]))
                    todo.append(child)
        self.seen |= found
        return found

    def cpu_seconds(self) -> float:
        """CPU time of the demo and every process under it (waited-for children included) so far:
        what the start-up costs, whatever the machine's load."""
        total = 0
        for pid in [self.proc.pid, *(p for p, _ in self.descendants())]:
            try:
                text = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            fields = text[text.rindex(")") + 2:].split()
            total += sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
        return total / os.sysconf("SC_CLK_TCK")

    def left_behind(self) -> list[tuple[int, str]]:
        """Descendants seen earlier that still run (same pid and start time, not a zombie)."""
        alive = []
        for pid, start in self.seen:
            info = _stat(pid)
            if info and info[1] == start and info[2] != "Z":
                alive.append((pid, Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]))
        return alive

    def stop(self, timeout: float = 60.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


def _stat(pid: int) -> tuple[int, str, str] | None:
    """(parent pid, start time, state) of a process, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[1]), fields[19], fields[0]


def launch(port: int, *extra: str, log: Path | None = None, tmpdir: Path | None = None) -> DemoProcess:
    """`oma-api -demo -port PORT` from this checkout (the console script may point at another one);
    its log (stderr) to `log`, its TMPDIR `tmpdir`."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **({"TMPDIR": str(tmpdir)} if tmpdir else {})}
    with open(log or os.devnull, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", "from oma.cli import oma_api; oma_api()", "-demo",
                                 "-port", str(port), *extra], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=err, stdin=subprocess.DEVNULL)
    return DemoProcess(proc, time.monotonic())
