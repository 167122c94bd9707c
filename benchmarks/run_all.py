"""Run every benchmark of `make bench` and keep what they printed, with the machine and the commit.

The README's figures are copied from `benchmarks/results/latest.txt`, which this script writes:
each benchmark's full output under a header that says when, on what machine (cores, CPU model,
memory, load average before and after) and at which commit it ran. A benchmark that fails is
recorded as failed and makes the whole run exit non-zero.

Usage: python benchmarks/run_all.py [script.py ...]   (default: every script in SCRIPTS)
Naming scripts reruns just those: their sections of latest.txt are replaced (each keeps its own
header line: when, load, commit), the others are kept as they were.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "results" / "latest.txt"
# In the order `make bench` runs them; each prints its own targets and PASS/FAIL lines.
SCRIPTS = [
    "bench_metrics.py",
    "bench_attacks.py",
    "bench_demo.py",
    "bench_methods.py",
    "bench_cli.py",
    "bench_report.py",
    "bench_ray.py",
    "bench_runtime_ratio.py",  # last: it runs a busy process beside itself on purpose
]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def _load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def _commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main(argv: list[str]) -> int:
    scripts = argv or SCRIPTS
    import torch  # noqa: F401 - only for its version in the header

    header = [
        f"# make bench, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"# machine: {os.cpu_count()} cores ({_cpu_model()}), {_memory_gib()}, "
        f"{platform.system()} {platform.machine()}, Python {platform.python_version()}, "
        f"torch {sys.modules['torch'].__version__}",
        f"# commit: {_commit()}",
        f"# load average (1, 5, 15 min) before: {_load()}",
    ]
    env = _bench_env()
    header.append("# bytecode: unlearn_cli's compiled before the first benchmark and cached "
                  "(__pycache__), as an installed package has it"
                  + ("; this machine sets PYTHONDONTWRITEBYTECODE=1, unset for the benchmarks"
                     if os.environ.get("PYTHONDONTWRITEBYTECODE") else ""))
    print("\n".join(header), flush=True)
    sections: list[str] = []
    failed: list[str] = []
    for name in scripts:
        start = time.perf_counter()
        print(f"\n## {name}", flush=True)
        proc = subprocess.Popen([sys.executable, str(HERE / name)], cwd=ROOT, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        lines = []
        for line in proc.stdout or ():  # stream it and keep it
            print(line, end="", flush=True)
            lines.append(line)
        code = proc.wait()
        took = time.perf_counter() - start
        status = "ok" if code == 0 else f"FAILED (exit {code})"
        if code != 0:
            failed.append(name)
        sections.append(f"\n## {name} ({status}, {took:.1f} s)\n" + "".join(lines))
    header.append(f"# load average after: {_load()}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    if argv and OUT.exists():  # a partial rerun: replace those sections, keep the others
        head, *parts = OUT.read_text().split("\n## ")
        kept = {part.split()[0]: "\n## " + part.rstrip("\n") + "\n" for part in parts}
        for name, section in zip(scripts, sections):
            note = f" [rerun {header[0][2:]}, commit {_commit()}, load {_load()}]"
            first, _, body = section.lstrip("\n").partition("\n")
            kept[name] = "\n" + first + note + "\n" + body
        order = [n for n in SCRIPTS if n in kept] + [n for n in kept if n not in SCRIPTS]
        OUT.write_text(head + "\n" + "".join(kept[n] for n in order))
    else:
        OUT.write_text("\n".join(header) + "\n" + "".join(sections))
    print(f"\nwritten: {OUT.relative_to(ROOT)}" + (f"; failed: {', '.join(failed)}" if failed
                                                     else ""))
    return 1 if failed else 0


def _bench_env() -> dict[str, str]:
    """The benchmarks' environment: Python bytecode written (`__pycache__`, ignored by git) and
    unlearn_cli's compiled now, so that no benchmark times the compilation of unlearn's modules,
    which a user pays once (pip compiles an installed package's bytecode; its dependencies' is
    there already)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "unlearn_cli")],
                   env=env, check=False, stdout=subprocess.DEVNULL, timeout=300)
    return env


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
