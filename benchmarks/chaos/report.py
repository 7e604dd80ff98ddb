"""The chaos table: one line per row, then what broke and what was noticed."""

from __future__ import annotations

from benchmarks.chaos.runner import RowReport

HEADER = ("| row | msgs | refused | lost | failed | double charges | spend | open res. "
          "| dedup | drain s | ok |")


def _dedup(report: RowReport) -> str:
    verdict = report.verdict
    if verdict is None:
        return "?"
    if not (verdict.repeated_keys or verdict.extra_calls):
        return "ok"
    return f"{len(verdict.extra_calls)} extra, {len(verdict.repeated_keys)} keys twice"


def line(report: RowReport) -> str:
    """The table line of one row."""
    verdict = report.verdict
    drain = "—" if report.drain_s is None else f"{report.drain_s:.0f}"
    cells = [report.name, str(report.messages), str(sum(report.refused.values())),
             str(len(verdict.lost)) if verdict else "?", str(sum(report.failed.values())),
             str(len(verdict.double_charged)) if verdict else "?",
             verdict.spend() if verdict else "?",
             str(verdict.open_reservations) if verdict else "?", _dedup(report), drain,
             "yes" if report.ok else "**no**"]
    return "| " + " | ".join(cells) + " |"


def table(reports: list[RowReport]) -> str:
    """The whole table, with the details of every row below it."""
    lines = [HEADER, "|" + "---|" * (HEADER.count("|") - 1), *map(line, reports), ""]
    for report in reports:
        details = [*(report.verdict.broken() if report.verdict else []), *report.problems]
        extra = [f"failed: {report.failed}"] if report.failed else []
        if report.refused:
            extra.append(f"refused at submit: {report.refused}")
        if details or report.notes or extra:
            lines.append(f"- **{report.name}** ({report.title}): "
                         + "; ".join([*details, *extra, *report.notes]))
    return "\n".join(lines)
