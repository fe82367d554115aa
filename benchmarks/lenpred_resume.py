"""`src.lenpred` in one process and in K, and a K-process run killed with SIGKILL halfway, then launched again.

    python -m benchmarks.lenpred_resume --model smollm2-135m --data-path data/alpaca-val-10k.json \\
        --num-data 64 --max-length 128 --batch-size 8 --processes 2

Prints the wall time of each run, the rows the killed run had finished, the relaunch's time, and whether the
three length files agree. The kill takes the launcher and its workers (each in a session of its own), as a
machine failure would; it comes once about half the rows are in the partial files.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from src import lenpred
from src.common.cli import run_cli
from src.common.utils import write_json_atomic


def child_pids(parent: int) -> list[int]:
    """The pids of a process's children, from /proc (Linux)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended while we looked
        if int(fields[1]) == parent:
            children.append(int(stat.parent.name))
    return children


def launch(processes: int) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "src.lenpred"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] + [
        "-m",
        "src.lenpred",
    ]


def clear(output: Path) -> None:
    for path in [output, Path(f"{output}.lock"), *lenpred.partial_paths(str(output))]:
        path.unlink(missing_ok=True)


def timed_run(command: list[str], log: Path) -> float:
    start = time.perf_counter()
    with open(log, "w") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed with status {done.returncode}: see {log}")
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="model for src.lenpred")
    parser.add_argument("--data-path", default="data/demo.json", help="conversation file")
    parser.add_argument("--num-data", type=int, default=64, help="prompts drawn as upstream")
    parser.add_argument("--max-length", type=int, default=128, help="most new tokens per answer")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per batch")
    parser.add_argument("--temperatures", nargs="+", default=["0.0"], help="length columns")
    parser.add_argument("--processes", type=int, default=2, help="K")
    parser.add_argument("--work-dir", default="runs/lenpred-resume", help="length files and logs go here")
    parser.add_argument("--output-json", default=None, help="write the figures and arguments here")
    args = parser.parse_args(argv)

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    flags = ["--model", args.model, "--device", "cpu", "--data-path", args.data_path, "--num-data", str(args.num_data)]
    flags += ["--max-length", str(args.max_length), "--batch-size", str(args.batch_size)]
    flags += ["--temperatures", *args.temperatures]
    figures = {"args": vars(args)}
    files = {}
    for processes in sorted({1, args.processes}):
        output = work / f"lengths-{processes}.json"
        clear(output)
        seconds = timed_run(launch(processes) + flags + ["--output-path", str(output)], work / f"{output.stem}.log")
        figures[f"seconds_{processes}_processes"] = seconds
        files[processes] = json.loads(output.read_text())
        print(f"{processes} process(es): {seconds:.1f} s")

    output = work / "lengths-killed.json"
    clear(output)
    command = launch(args.processes) + flags + ["--output-path", str(output)]
    start = time.perf_counter()
    with open(work / "killed.log", "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        identity = lenpred.run_identity(lenpred.parse_args([*flags, "--output-path", str(output)]))
        while process.poll() is None and len(lenpred.read_partials(str(output), identity)) < args.num_data // 2:
            time.sleep(0.05)
        workers = child_pids(process.pid)
        for pid in [process.pid, *workers]:
            os.kill(pid, signal.SIGKILL)
        process.wait()
    figures["killed_after_s"] = time.perf_counter() - start
    figures["rows_kept"] = len(lenpred.read_partials(str(output), identity))
    print(f"killed the launcher and {len(workers)} workers after {figures['killed_after_s']:.1f} s")
    print(f"rows kept in the partial files: {figures['rows_kept']} of {args.num_data}")
    figures["relaunch_s"] = timed_run(command, work / "relaunch.log")
    resumed = json.loads(output.read_text())
    figures["resumed_equals_uninterrupted"] = resumed == files[args.processes]
    figures["processes_agree"] = files[1] == files[args.processes]
    figures["rows"] = len(resumed)
    figures["unique_ids"] = len({row["id"] for row in resumed})
    print(f"relaunch: {figures['relaunch_s']:.1f} s, {figures['rows']} rows, {figures['unique_ids']} ids")
    same = figures["resumed_equals_uninterrupted"]
    print(f"resumed file equals the uninterrupted {args.processes}-process file: {same}")
    print(f"1-process and {args.processes}-process files equal: {figures['processes_agree']}")
    if args.output_json:
        write_json_atomic(args.output_json, figures)
    return figures


if __name__ == "__main__":
    run_cli(main)
