"""Runs the benchmark suite (or reads its JSON) and writes a markdown report with plots.

    python -m benchmarks.report [--out DIR] [--quick] [--json FILE]

Conventions read from each benchmark's ``extra_info`` (set through benchmarks/reporting.py ``record``):
``impl`` (label), ``baseline`` (True for a baseline), and optional ``flops`` (per call), ``scaling`` (a series
name) with ``size`` (x value). The speed-up of an implementation is the fastest baseline's mean time in its group
divided by its own mean time.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_suite(json_path: str, quick: bool) -> None:
    env = dict(os.environ, DPAR_BENCH_QUICK="1" if quick else os.environ.get("DPAR_BENCH_QUICK", "0"))
    cmd = [sys.executable, "-m", "pytest", "benchmarks", "--benchmark-only", f"--benchmark-json={json_path}",
           "-q", "-p", "no:cacheprovider"]
    print("running:", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)


def _versions() -> dict:
    info = {"python": platform.python_version(), "platform": platform.platform()}
    for module in ("torch", "triton"):
        try:
            info[module] = __import__(module).__version__
        except ImportError:
            info[module] = "not installed"
    import torch
    info["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    return info


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def group_rows(benchmarks: list[dict]) -> dict[str, list[dict]]:
    """group -> rows with impl, mean (s), speedup vs the fastest baseline, extra info."""
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
        baselines = [r["mean"] for r in rows if r["baseline"]]
        best = min(baselines) if baselines else None
        for row in rows:
            row["speedup"] = best / row["mean"] if best else None
        rows.sort(key=lambda r: r["mean"])
    return dict(groups)


def _fill_group_flops(rows: list[dict]) -> None:
    """Rows without ``flops`` take their group's workload FLOPs (every row of a group runs the same workload)."""
    known = [r["info"]["flops"] for r in rows if r["info"].get("flops")]
    for r in rows:
        if known and not r["info"].get("flops"):
            r["info"]["flops"] = known[0]


def _load(values) -> str:
    return "/".join(f"{v:.2f}" for v in values) if values else "unknown"


def run_conditions(dpar_info: dict, quick: bool | None) -> list[str]:
    """Mode and machine-load lines; dpar_info is the JSON's "dpar" entry (benchmarks/conftest.py)."""
    mode = dpar_info.get("mode") or ("quick" if quick else "full" if quick is not None else "unknown")
    sizes = "small sizes, few rounds (DPAR_BENCH_QUICK=1)" if mode == "quick" else "full sizes"
    return [f"- mode: **{mode}** ({sizes})",
            f"- machine load (1/5/15-min load average, {dpar_info.get('cpu_count', os.cpu_count())} cores): "
            f"{_load(dpar_info.get('loadavg_start'))} at the start, {_load(dpar_info.get('loadavg_end'))} at the "
            "end; a load above the core count means other work shared the CPUs and times are inflated"]


def markdown(groups: dict, versions: dict, commit: str, command: str, conditions: list[str]) -> str:
    lines = ["# Benchmark report", "",
             f"- commit: `{commit}`", f"- machine: {versions['device']}, {versions['platform']}",
             f"- python {versions['python']}, torch {versions['torch']}, triton {versions['triton']}",
             *conditions,
             f"- command: `{command}`", "",
             "Speed-up = fastest baseline's mean time in the group / this row's mean time (same run). GFLOP/s = the "
             "group's workload FLOPs (the same for every row; padding not counted) / this row's mean time.", ""]
    for name, rows in sorted(groups.items()):
        _fill_group_flops(rows)
        lines += [f"## {name}", "", "| implementation | baseline | mean (ms) | ± (ms) | rounds | speed-up | GFLOP/s |",
                  "|---|---|---|---|---|---|---|"]
        for r in rows:
            speedup = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
            flops = r["info"].get("flops")
            rate = f"{flops / r['mean'] / 1e9:.3g}" if flops else "-"
            lines.append(f"| {r['impl']} | {'yes' if r['baseline'] else ''} | {r['mean'] * 1e3:.3f} | "
                         f"{r['stddev'] * 1e3:.3f} | {r['rounds']} | {speedup} | {rate} |")
        lines.append("")
        lines += [f"- {r['impl']}: FLOPs x{r['info']['flop_ratio']:.3f}, time x{r['info']['time_ratio']:.3f} "
                  "of the baseline" for r in rows if "flop_ratio" in r["info"] and "time_ratio" in r["info"]]
        lines.append("")
    return "\n".join(lines)


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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/benchmarks", help="folder for report.md, the JSON and the plots")
    parser.add_argument("--quick", action="store_true", help="quick mode (DPAR_BENCH_QUICK=1): small sizes")
    parser.add_argument("--json", help="read this pytest-benchmark JSON instead of running the suite")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    json_path = args.json or os.path.join(args.out, "benchmarks.json")
    if not args.json:
        run_suite(json_path, args.quick)
    with open(json_path) as f:
        data = json.load(f)
    groups = group_rows(data["benchmarks"])
    command = "python -m benchmarks.report " + " ".join(argv if argv is not None else sys.argv[1:])
    conditions = run_conditions(data.get("dpar", {}), None if args.json else args.quick)
    text = markdown(groups, _versions(), _commit(), command.strip(), conditions)
    images = plot(groups, args.out)
    text += "\n" + "\n".join(f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in images) + "\n"
    report = os.path.join(args.out, "report.md")
    with open(report, "w") as f:
        f.write(text)
    print(text)
    print(f"wrote {report}")


if __name__ == "__main__":
    main()
