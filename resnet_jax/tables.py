"""The tables of the command-line reports: plain text for a terminal, Markdown for files.

Standard library only: `benchmarks/accelerator/check.py` loads this file by its path on hosts
where the package is not importable, so that its report formats figures as benchmark.py does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# A column: (title, key of the row, format). The format is a `str.format` pattern, or one of
# "gib" (bytes as GiB) and "yesno" (a flag).
Column = tuple[str, str, str]

# benchmark.py's table (the accelerator check's report picks from it).
BENCHMARK_COLUMNS: list[Column] = [
    ("model", "model", "{}"),
    ("mode", "mode", "{}"),
    ("batch", "batch_size", "{}"),
    ("/dev", "per_device_batch_size", "{}"),
    ("px", "image_size", "{}"),
    ("dtype", "dtype", "{}"),
    ("data", "data", "{}"),
    ("loader", "loader", "{}"),
    ("img/s", "images_per_sec", "{:.1f}"),
    ("img/s/dev", "images_per_sec_per_device", "{:.1f}"),
    ("median ms", "step_time_median_ms", "{:.1f}"),
    ("p90 ms", "step_time_p90_ms", "{:.1f}"),
    ("compile s", "compile_seconds", "{:.1f}"),
    ("cached", "compile_cache_hit", "yesno"),
    ("TFLOP/s/dev", "tflops_per_sec_per_device", "{:.2f}"),
    ("MFU", "mfu", "{:.1%}"),
    ("peak mem GiB", "peak_memory_bytes", "gib"),
]


# trace_report's table: a step's device time by category.
PROFILE_COLUMNS: list[Column] = [
    ("category", "category", "{}"),
    ("ms/step", "ms_per_step", "{:.3f}"),
    ("share", "share", "{:.1%}"),
    ("kernels/step", "kernels_per_step", "{:.0f}"),
    ("GB/s", "gb_per_s", "{:,.0f}"),
]

# trace_report --hlo: a compiled program's kernels and HBM bytes by category, without running it.
PROGRAM_COLUMNS: list[Column] = [
    ("category", "category", "{}"),
    ("kernels", "kernels", "{}"),
    ("under 1 MB", "small_kernels", "{}"),
    ("MB/step", "mb_per_step", "{:,.1f}"),
    ("MB/img", "mb_per_image", "{:.2f}"),
    ("share", "share", "{:.1%}"),
    ("ms at HBM peak", "ms_at_bandwidth", "{:.3f}"),
]


def cell(value: Any, fmt: str = "{}", missing: str = "-") -> str:
    """One value as the tables show it; `missing` where there is none."""
    if value is None:
        return missing
    if fmt == "gib":
        return f"{value / 2**30:.2f}"
    if fmt == "yesno":
        return "yes" if value else "no"
    return fmt.format(value)


def cells(columns: Sequence[Column], rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The header and the formatted body of `rows` under `columns`."""
    header = [title for title, _, _ in columns]
    return header, [[cell(row.get(key), fmt) for _, key, fmt in columns] for row in rows]


def text(header: Sequence[str], body: Sequence[Sequence[str]], left: int | Sequence[str] = 0) -> str:
    """Aligned columns two spaces apart: the first `left` columns (or those titled in `left`) flush
    left, the rest (numbers) flush right; no trailing spaces."""
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    flush_left = [i < left if isinstance(left, int) else title in left for i, title in enumerate(header)]

    def line(row: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if lj else c.rjust(w) for c, w, lj in zip(row, widths, flush_left, strict=True)
        ).rstrip()

    return "\n".join(line(row) for row in [header, *body])


def markdown(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table, as lines."""
    return [
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
        *("| " + " | ".join(row) + " |" for row in body),
    ]
