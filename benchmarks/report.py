"""Runs the benchmark suite (or reads its JSON) and writes the results as data, a one-page summary and plots.

    python -m benchmarks.report [--out DIR] [--quick] [--json FILE] [--save]

In DIR: benchmarks.json (pytest-benchmark's own JSON), results.json and results.csv (one row per measured figure:
benchmark, shape, implementation, backend, baseline, value and unit, speed-up over the group's fastest baseline,
and the machine: CPU model, ISA path, threads, GPU, torch, commit, mode, command), report.md (the summary) and
speedup.png / scaling.png. --save also writes the rows to benchmarks/results/<cpu>-<isa>-<mode>.csv (replacing that
file: current figures only) and regenerates benchmarks/RESULTS.md from every CSV there (``--summarize`` does only
the latter).

Conventions read from each benchmark's ``extra_info`` (set through benchmarks/reporting.py ``record``): ``impl``,
``shape``, ``baseline`` (True for a baseline), and optional ``backend``, ``flops`` (per call), ``scaling`` (a series
name) with ``size`` (x value), and the measured extras of ``EXTRA_METRICS``. The speed-up of an implementation is the
fastest baseline's mean time in its group divided by its own mean time.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import glob
import json
import os
import re
import subprocess
import sys
from collections import defaultdict

from benchmarks.machine import machine_info

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")
SUMMARY = os.path.join(ROOT, "benchmarks", "RESULTS.md")
MACHINE_FIELDS = ["cpu_model", "isa", "cores", "threads", "gpu", "python", "torch", "triton", "commit"]
FIELDS = ["benchmark", "shape", "implementation", "backend", "is_baseline", "metric", "value", "unit", "stddev",
          "rounds", "fastest_baseline", "speedup", "gflops_per_s", "mode", *MACHINE_FIELDS, "load", "date", "command",
          "note"]
# extra_info keys that are measurements (a row each, next to the time): key -> unit
EXTRA_METRICS = {"images_per_s": "images/s", "global_steps_per_image": "steps", "peak_extra_bytes": "bytes",
                 "host_reads_per_step": "reads", "time_ratio": "x baseline time", "flop_ratio": "x baseline FLOPs",
                 "global_token_reduction": "x fewer global tokens"}


def run_suite(json_path: str, quick: bool) -> None:
    env = dict(os.environ, DPAR_BENCH_QUICK="1" if quick else os.environ.get("DPAR_BENCH_QUICK", "0"))
    cmd = [sys.executable, "-m", "pytest", "benchmarks", "--benchmark-only", f"--benchmark-json={json_path}",
           "-q", "-p", "no:cacheprovider"]
    print("running:", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)


def group_rows(benchmarks: list[dict]) -> dict[str, list[dict]]:
    """group -> rows with impl, mean (s), speedup vs the fastest baseline (and its name), extra info."""
    groups = defaultdict(list)
    for bench in benchmarks:
        info = bench.get("extra_info", {})
        groups[bench.get("group") or bench["name"]].append({
            "impl": info.get("impl", bench["name"]),
            "baseline": bool(info.get("baseline", False)),
            "mean": bench["stats"]["mean"],
            "stddev": bench["stats"]["stddev"],
            "rounds": bench["stats"]["rounds"],
            "info": info,
        })
    for rows in groups.values():
        baselines = [r for r in rows if r["baseline"]]
        best = min(baselines, key=lambda r: r["mean"]) if baselines else None
        known = [r["info"]["flops"] for r in rows if r["info"].get("flops")]
        for row in rows:
            row["speedup"] = best["mean"] / row["mean"] if best else None
            row["fastest_baseline"] = best["impl"] if best else ""
            if known and not row["info"].get("flops"):  # every row of a group runs the same workload
                row["info"]["flops"] = known[0]
        rows.sort(key=lambda r: r["mean"])
    return dict(groups)


def result_rows(groups: dict, run: dict) -> list[dict]:
    """One dict per measured figure (FIELDS): each implementation's mean time, then its EXTRA_METRICS."""
    out = []
    for name, rows in sorted(groups.items()):
        for r in rows:
            info = r["info"]
            common = {"benchmark": name, "shape": info.get("shape", ""), "implementation": r["impl"],
                      "backend": info.get("backend", ""), "is_baseline": r["baseline"], **run}
            flops = info.get("flops")
            out.append({**common, "metric": "time", "value": r["mean"], "unit": "s", "stddev": r["stddev"],
                        "rounds": r["rounds"], "fastest_baseline": r["fastest_baseline"],
                        "speedup": r["speedup"], "gflops_per_s": flops / r["mean"] / 1e9 if flops else None})
            out += [{**common, "metric": key, "value": info[key], "unit": unit}
                    for key, unit in EXTRA_METRICS.items() if isinstance(info.get(key), (int, float))]
    return [{field: row.get(field) for field in FIELDS} for row in out]


def run_info(dpar_info: dict, command: str, when: str | None = None) -> dict:
    """The run columns: mode, machine (from the JSON when the timing process stored it, else this process's), load,
    date (``when``: pytest-benchmark's ISO datetime of the run; else today), command."""
    machine = dpar_info.get("machine") or machine_info()
    date = (when or datetime.datetime.now(datetime.timezone.utc).isoformat())[:10]
    start, end = dpar_info.get("loadavg_start"), dpar_info.get("loadavg_end")
    load = f"{start[0]:.1f} -> {end[0]:.1f}" if start and end else ""  # 1-min load average, start -> end
    return {"mode": dpar_info.get("mode", "unknown"), **{k: machine.get(k, "") for k in MACHINE_FIELDS},
            "load": load, "date": date, "command": command}


def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: _cell(v) for k, v in row.items()} for row in rows)


def read_csv(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _number(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def format_value(value, unit: str) -> str:
    """A measured value in words: times in us/ms/s, bytes in MiB, anything else with its unit."""
    number = _number(value)
    if number is None:
        return str(value)
    if unit == "s":
        for scale, name in ((1e-3, "us"), (1.0, "ms")):
            if number < scale:
                return f"{number * 1e6 if name == 'us' else number * 1e3:.3g} {name}"
        return f"{number:.3g} s"
    if unit == "bytes":
        return f"{number / 2 ** 20:.4g} MiB"
    if unit.startswith("x"):  # a ratio: "0.82x baseline time"
        return f"{number:.3g}{unit}"
    return f"{number:.5g} {unit}"


def summary_lines(rows: list[dict]) -> list[str]:
    """Markdown for one run (rows sharing machine, mode, commit and command): its header, then one table row per
    implementation of each benchmark that is not a timed baseline: its time (or first figure) and its other
    figures, the group's fastest baseline and the speed-up over it."""
    first = rows[0]
    gpu = f", GPU {first['gpu']}" if first.get("gpu") else ""
    load = f"; load average {first['load']}" if first.get("load") else ""
    lines = [f"- machine: {first['cpu_model']}, ISA path {first['isa']}, {first['cores']} cores, torch threads "
             f"{first['threads']}{gpu}; torch {first['torch']}{load}",
             f"- commit `{first['commit']}`, {first['mode']} mode, {first['date']}; command: `{first['command']}`",
             "", "| benchmark | shape | implementation | figures | fastest baseline (same run) | speed-up |",
             "|---|---|---|---|---|---|"]
    timed = {(r["benchmark"], r["implementation"]): r for r in rows if r["metric"] == "time"}
    entries: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        entries[(r["benchmark"], r["implementation"])].append(r)
    last_shape = None  # a shape shows once for the rows that share it
    for (benchmark, impl), figures in entries.items():
        main = timed.get((benchmark, impl), figures[0])
        if _truthy(main["is_baseline"]) and main["metric"] == "time":
            continue
        ordered = [main] + [r for r in figures if r is not main]
        text = "; ".join(_figure(r) for r in ordered if r["metric"] != "speedup" or r.get("note"))
        base = timed.get((benchmark, main.get("fastest_baseline") or ""))
        base_text = f"{base['implementation']} {format_value(base['value'], base['unit'])}" if base else (
            main.get("fastest_baseline") or "")
        speedup = _number(main.get("speedup")) if main["metric"] in ("time", "speedup") else None
        shape = "" if main["shape"] in (benchmark, last_shape) else main["shape"]
        last_shape = main["shape"]
        lines.append(f"| {benchmark} | {shape} | {impl} | {text} | {base_text} | "
                     f"{f'**{speedup:.2f}x**' if speedup else ''} |")
    return lines


def _figure(row: dict) -> str:
    """A figure in words; a ratio-only row ("speedup") shows its note alone, a rate (not a time) its own ratio."""
    note = row.get("note") or ""
    if row["metric"] == "speedup":
        return note
    ratio = _number(row.get("speedup"))
    if ratio and row["metric"] != "time":
        note = f"{ratio:.2f}x {row.get('fastest_baseline') or 'the baseline'}" + (f", {note}" if note else "")
    return format_value(row["value"], row["unit"]) + (f" ({note})" if note else "")


def _truthy(value) -> bool:
    return value is True or str(value).lower() in ("true", "1", "yes")


def summary(rows: list[dict], title: str) -> str:
    """One page: the rows grouped by run (machine, mode, commit, command), each run's figures in one table."""
    runs = defaultdict(list)
    for r in rows:
        runs[(r["cpu_model"], r["isa"], r["mode"], r["commit"], r["command"])].append(r)
    lines = [f"# {title}", ""]
    for key in runs:
        lines += summary_lines(runs[key]) + [""]
    return "\n".join(lines)


def slug(row: dict) -> str:
    """File name of a machine + mode in benchmarks/results/: cpu model, ISA path, GPU, mode."""
    parts = [row["cpu_model"].split(" (")[0], row["isa"], row.get("gpu") or "", row["mode"]]
    return re.sub(r"[^a-z0-9]+", "-", "-".join(p for p in parts if p).lower()).strip("-")


def write_summary(results_dir: str | None = None, path: str | None = None) -> str:
    """benchmarks/RESULTS.md (or ``path``) from benchmarks/results/ (or ``results_dir``): a fixed preamble, then one
    section per file: report CSVs (this module's rows) as summaries, other CSVs (e.g. bench_isa's ratios) as plain
    tables, each with its optional ``.md`` note, and notes without a CSV (e.g. the ablation's report) as they are."""
    results_dir, path = results_dir or RESULTS_DIR, path or SUMMARY
    sections = [PREAMBLE]
    csv_paths = sorted(glob.glob(os.path.join(results_dir, "*.csv")))
    for csv_path in csv_paths:
        rows = read_csv(csv_path)
        if not rows:
            continue
        name = os.path.relpath(csv_path, os.path.dirname(path))
        title = f"[{os.path.basename(csv_path)}]({name})"
        if "implementation" in rows[0] and "cpu_model" in rows[0]:
            section = summary(rows, title).replace("# [", "## [", 1)
        else:
            section = "\n".join([f"## {title}", "", "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0]),
                                 *("| " + " | ".join(row.values()) + " |" for row in rows), ""])
        notes = csv_path[:-len(".csv")] + ".md"  # where the rows come from, when it needs saying
        if os.path.exists(notes):
            with open(notes) as f:
                heading, rest = section.split("\n", 1)
                section = f"{heading}\n\n{f.read().strip()}\n{rest}"
        sections.append(section)
    paired = {p[:-len(".csv")] + ".md" for p in csv_paths}
    for notes in sorted(set(glob.glob(os.path.join(results_dir, "*.md"))) - paired):
        with open(notes) as f:
            sections.append(f.read().strip().replace("# ", f"## [{os.path.basename(notes)}]("
                                                     f"{os.path.relpath(notes, os.path.dirname(path))}): ", 1) + "\n")
    text = "\n".join(sections)
    with open(path, "w") as f:
        f.write(text)
    return text


PREAMBLE = """# Benchmark results

Current figures only, generated by `python -m benchmarks.report --summarize` from the CSV files in
[results/](results/) (one file per machine and mode, with an optional `.md` note beside it; `python -m
benchmarks.report --save` rewrites a file from a new run). Each section below is one run: its machine (CPU model, ISA
path of the CPU kernels, torch threads, load average), commit, mode and command. Every speed-up is against the
fastest baseline timed in the same run; times taken while the load average exceeds the core count are inflated by
other work. Earlier figures are in git history.

GPU: nothing has run on a GPU yet. `bash scripts/gpu_check.sh OUT` is the one command for a lent GPU: it records the
environment, builds the CUDA extension for the present arch only, fails if the CUDA ops did not build, runs
`pytest -m gpu`, compute-sanitizer memcheck over `scripts/gpu_sanitize.py` and `python -m benchmarks.gpu_bench --out
OUT` (bf16 at DPAR-L shapes), each step with its own time limit, into `OUT/gpu_check.md` and `OUT/gpu_check.json`;
the benchmark's `OUT/results.csv`, copied into results/, lists its figures here.
"""


def plot(groups: dict, out_dir: str) -> list[str]:
    """speedup.png (every non-baseline row vs its group's baseline) and scaling.png (series over size)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    bars = [(f"{g}: {r['impl']}", r["speedup"]) for g, rows in sorted(groups.items()) for r in rows
            if r["speedup"] and not r["baseline"]]
    if bars:
        path = os.path.join(out_dir, "speedup.png")
        speedup_plot(bars, path, plt)
        written.append(path)
    series = defaultdict(list)
    for rows in groups.values():
        for r in rows:
            if "scaling" in r["info"] and "size" in r["info"]:
                series[(r["info"]["scaling"], r["impl"])].append((r["info"]["size"], r["mean"]))
    if series:
        fig, ax = plt.subplots(figsize=(6, 4))
        for (name, impl), points in sorted(series.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] * 1e3 for p in points], marker="o", label=f"{name}: {impl}")
        ax.set_xlabel("size")
        ax.set_ylabel("time (ms)")
        ax.set_yscale("log")
        ax.legend(fontsize=6)
        fig.tight_layout()
        path = os.path.join(out_dir, "scaling.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def speedup_plot(bars: list[tuple[str, float]], path: str, plt) -> None:
    """Horizontal bars from 1x to each speed-up on a log axis: slow-downs (red) as visible as speed-ups (green)."""
    from matplotlib.ticker import FuncFormatter

    labels, values = [b[0] for b in bars], [b[1] for b in bars]
    fig, ax = plt.subplots(figsize=(10, 0.32 * len(bars) + 1.6))
    y = range(len(bars))
    ax.barh(y, [v - 1.0 for v in values], left=1.0, color=["tab:green" if v >= 1 else "tab:red" for v in values])
    ax.set_xscale("log")
    low, high = min(values + [1.0]), max(values + [1.0])
    ax.set_xlim(low / 1.6, high * 1.6)
    ax.axvline(1.0, color="k", lw=1.2)
    ax.text(1.0, -0.9, " 1x = the fastest baseline", va="center", fontsize=8)
    for i, v in enumerate(values):
        ax.text(v * (1.05 if v >= 1 else 1 / 1.05), i, f"{v:.2f}x", va="center", ha="left" if v >= 1 else "right",
                fontsize=7)
    ax.set_yticks(list(y), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_ylim(len(bars) - 0.5, -0.5 - 0.8)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}x"))
    ax.set_xlabel("speed-up vs the fastest baseline of the group (log scale)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _load(values) -> str:
    return "/".join(f"{v:.2f}" for v in values) if values else "unknown"


def load_line(dpar_info: dict) -> str:
    """The machine load during the run (the JSON's "dpar" entry, benchmarks/conftest.py)."""
    return (f"- machine load (1/5/15-min load average, {dpar_info.get('cpu_count', os.cpu_count())} cores): "
            f"{_load(dpar_info.get('loadavg_start'))} at the start, {_load(dpar_info.get('loadavg_end'))} at the end; "
            "a load above the core count means other work shared the CPUs and times are inflated")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/benchmarks", help="folder for the results, report.md and the plots")
    parser.add_argument("--quick", action="store_true", help="quick mode (DPAR_BENCH_QUICK=1): small sizes")
    parser.add_argument("--json", help="read this pytest-benchmark JSON instead of running the suite")
    parser.add_argument("--save", action="store_true",
                        help="also write benchmarks/results/<machine>-<mode>.csv and regenerate benchmarks/RESULTS.md")
    parser.add_argument("--summarize", action="store_true",
                        help="only regenerate benchmarks/RESULTS.md from benchmarks/results/*.csv")
    args = parser.parse_args(argv)
    if args.summarize:
        print(write_summary())
        return
    os.makedirs(args.out, exist_ok=True)
    json_path = args.json or os.path.join(args.out, "benchmarks.json")
    if not args.json:
        run_suite(json_path, args.quick)
    with open(json_path) as f:
        data = json.load(f)
    dpar_info = data.get("dpar", {})
    if args.json:  # the command that timed, when the JSON recorded it
        command = dpar_info.get("command") or f"pytest benchmarks --benchmark-json={args.json}"
    else:
        command = " ".join(["python -m benchmarks.report", *(argv if argv is not None else sys.argv[1:])])
    groups = group_rows(data["benchmarks"])
    run = run_info(dpar_info, command, data.get("datetime"))
    rows = result_rows(groups, run)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"run": run, "rows": rows}, f, indent=1)
    write_csv(rows, os.path.join(args.out, "results.csv"))
    text = summary(rows, "Benchmark report") if rows else "# Benchmark report\n\nno benchmark ran\n"
    text = text.replace("\n\n|", "\n" + load_line(dpar_info) + "\n\n|", 1)
    images = plot(groups, args.out)
    text += "\n" + "\n".join(f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in images) + "\n"
    report = os.path.join(args.out, "report.md")
    with open(report, "w") as f:
        f.write(text)
    print(text)
    print(f"wrote {report}, results.json and results.csv in {args.out}")
    if args.save and rows:
        os.makedirs(RESULTS_DIR, exist_ok=True)
        saved = os.path.join(RESULTS_DIR, slug(rows[0]) + ".csv")
        write_csv(rows, saved)
        write_summary()
        print(f"wrote {saved} and {SUMMARY}")


if __name__ == "__main__":
    main()
