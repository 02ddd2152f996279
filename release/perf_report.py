"""The nightly report: a Markdown summary of tonight's verdicts and one PNG per metric with its history and
the baseline band, written into one folder (the workflow links summary.md from the job summary)."""

from __future__ import annotations

from pathlib import Path

from release.perf import Failure, MetricRecord
from release.perf_gate import Verdict

ICONS = {
    "ok": "ok",
    "improved": "improved",
    "new": "new",
    "noisy": "noisy",
    "drifting": "drifting",
    "regression": "REGRESSION",
}


def markdown(hardware: str, verdicts: list[Verdict], failures: list[Failure], plots: dict[str, str]) -> str:
    lines = [f"# Nightly performance: {hardware}", ""]
    failed = [v for v in verdicts if v.failed]
    lines.append(f"{len(verdicts)} metrics, {len(failed)} regression(s), {len(failures)} benchmark failure(s).")
    lines.append("")
    lines += [
        "## Metrics",
        "",
        "| metric | tonight | baseline (band) | trailing mean | verdict | plot |",
        "|---|---|---|---|---|---|",
    ]
    for v in sorted(verdicts, key=lambda v: (not v.failed, v.name)):
        base = f"{v.baseline.value:.4g} (±{v.baseline.tolerance:.0%})" if v.baseline else "-"
        mean = f"{v.trailing_mean:.4g}" if v.trailing_mean is not None else "-"
        plot = f"[png]({plots[v.name]})" if v.name in plots else ""
        verdict = ICONS[v.status] + (f": {v.reason}" if v.reason else "")
        lines.append(f"| {v.name} | {v.value:.4g} | {base} | {mean} | {verdict} | {plot} |")
    if failures:
        lines += ["", "## Benchmark failures", ""]
        lines += [f"- **{f.benchmark}** ({f.kind}): {f.message}" for f in failures]
    return "\n".join(lines) + "\n"


def plot_history(name: str, history: list[MetricRecord], verdict: Verdict, out: Path) -> Path | None:
    """Values by date, tonight's point marked, the baseline band shaded."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    points = sorted((r for r in history if r.name == name), key=lambda r: r.date)
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot([p.date for p in points], [p.value for p in points], marker="o", markersize=3, label=name)
    if verdict.baseline is not None:
        low = verdict.baseline.value * (1 - verdict.baseline.tolerance)
        high = verdict.baseline.value * (1 + verdict.baseline.tolerance)
        ax.axhspan(low, high, alpha=0.15, color="green", label="baseline band")
        ax.axhline(verdict.baseline.value, color="green", linewidth=0.8)
    ax.plot([points[-1].date], [points[-1].value], marker="o", color="red" if verdict.failed else "black")
    ax.set_title(f"{name} [{points[-1].unit}]", fontsize=9)
    ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def write_report(
    folder: Path, hardware: str, verdicts: list[Verdict], failures: list[Failure], history: list[MetricRecord]
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    plots = {}
    for v in verdicts:
        png = plot_history(v.name, history, v, folder / "plots" / f"{v.name}.png")
        if png is not None:
            plots[v.name] = str(png.relative_to(folder))
    path = folder / "summary.md"
    path.write_text(markdown(hardware, verdicts, failures, plots))
    return path
