"""A validation result as the text ``kfacperf validate`` prints: per held-out run the
measured and predicted step, then the per-stage errors, then the targets."""
from __future__ import annotations

from kfacperf import validation as V
from kfacperf.validation import ValidationResult


def _fmt_ms(us: float) -> str:
    return f"{us / 1e3:.1f}"


def _fmt_err(pct: float) -> str:
    return "n/a" if pct != pct else f"{pct:+.1f}%"


def text_table(result: ValidationResult, *, all_stages: bool = False) -> str:
    """Per run: measured/predicted step and error; then the per-stage errors; then the summary."""
    runs, stages = result.runs, result.stages
    head = ["run", "strategy", "ranks", "batch", "intervals", "rec", "spread", "measured ms",
            "predicted ms", "error", "worst stage (>5%)"]
    cells = [head]
    for _, r in runs.iterrows():
        worst = f"{r['worst_stage']} {_fmt_err(r['worst_stage_error_pct'])}" \
            if r["worst_stage"] else "-"
        cells.append([r["run"], r["strategy"], str(r["world_size"]), str(r["batch_per_rank"]),
                      r["intervals"], str(r["recordings"]),
                      "-" if r["recordings"] < 2 else f"{r['spread_pct']:.1f}%",
                      _fmt_ms(r["measured_step_us"]),
                      _fmt_ms(r["predicted_step_us"]), _fmt_err(r["error_pct"]), worst])
    lines = _align(cells, left=5)
    lines.append("")
    shown = stages if all_stages else stages[stages["share_pct"] > V.STAGE_MIN_SHARE_PCT]
    lines.append("per stage (per step, mean over ranks" + ("" if all_stages else
                 "; stages above 5% of the step") + "):")
    cells = [["run", "stage", "share", "measured ms", "predicted ms", "error"]]
    for _, s in shown.iterrows():
        cells.append([s["run"], s["stage"], f"{s['share_pct']:.0f}%",
                      f"{s['measured_us'] / 1e3:.2f}", f"{s['predicted_us'] / 1e3:.2f}",
                      _fmt_err(s["error_pct"])])
    lines.extend(_align(cells, left=2))
    lines.append("")
    checked = result.checked_stages()
    worst_stage = checked["error_pct"].abs().max() if len(checked) else float("nan")
    lines.append(
        f"{len(runs)} held-out run(s): step time |error| median "
        f"{result.median_abs_error_pct:.1f}% (target {V.STEP_TARGET_MEDIAN_PCT:g}%), worst "
        f"{result.worst_abs_error_pct:.1f}% (target {V.STEP_TARGET_WORST_PCT:g}%); "
        f"stages above {V.STAGE_MIN_SHARE_PCT:g}% of the step: worst |error| {worst_stage:.1f}% "
        f"(target {V.STAGE_TARGET_PCT:g}%)")
    cal = result.calibration
    lines.append(f"calibrated on {len(cal.traces)} trace(s); cluster {cal.cluster.name}")
    for note in result.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def _align(cells: list[list[str]], *, left: int) -> list[str]:
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    return ["  ".join(v.ljust(w) if i < left or i == len(r) - 1 else v.rjust(w)
                      for i, (v, w) in enumerate(zip(r, widths))).rstrip() for r in cells]
