"""Rendering benchmark results: a markdown table and a per-stage chart (Pillow only)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

STAGE_COLORS = {
    "decode_image": (150, 150, 150),
    "hash": (110, 110, 110),
    "preprocess": (230, 159, 0),
    "encoder": (213, 94, 0),
    "encoder+decoder": (204, 121, 167),
    "decoder": (0, 114, 178),
    "postprocess": (86, 180, 233),
    "png": (0, 158, 115),
    "http_total": (240, 228, 66),
}


def markdown_table(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"**{report['model']}** ({report['shape']} shape, random weights), picture {report['picture']}, "
        f"{env['device']} {env['dtype']}, torch {env['torch']}, transformers {env['transformers']}, "
        f"{env.get('gpu', env['cpu'] + ', ' + env['cpu_threads'] + ' threads')}",
        "",
        "| scenario | median ms | p95 ms | stages (median ms) |",
        "|---|---:|---:|---|",
    ]
    for name, total in report["totals"].items():
        stages = ", ".join(f"{stage} {s['median_ms']:.1f}" for stage, s in report["stages"][name].items())
        lines.append(f"| {name} | {total['median_ms']:.1f} | {total['p95_ms']:.1f} | {stages} |")
    lines += ["", "| ratio | value |", "|---|---:|"]
    lines += [f"| {name} | {value:.2f}× |" for name, value in report["ratios"].items()]
    lines += ["", "| memory | MB |", "|---|---:|"]
    lines += [f"| {name} | {value:.1f} |" for name, value in report["memory"].items()]
    return "\n".join(lines) + "\n"


def chart(report: dict, path: Path) -> None:
    """Horizontal stacked bars of median stage times, on a log-free linear scale per row (ms labels)."""
    rows = list(report["stages"].items())
    width, row_h, left = 1100, 46, 330
    image = Image.new("RGB", (width, 70 + row_h * len(rows) + 40), "white")
    draw = ImageDraw.Draw(image)
    draw.text(
        (10, 10),
        f"Median time per stage: {report['model']} ({report['shape']}), {report['environment']['device']}",
        fill="black",
    )
    for index, (name, stages) in enumerate(rows):
        y = 50 + index * row_h
        total = sum(s["median_ms"] for s in stages.values()) or 1.0
        draw.text((10, y + 12), f"{name}", fill="black")
        x = left
        span = width - left - 120
        for stage, stats in stages.items():
            w = max(1, int(span * stats["median_ms"] / total))
            draw.rectangle([x, y + 6, x + w, y + row_h - 10], fill=STAGE_COLORS.get(stage, (120, 120, 200)))
            x += w
        draw.text((x + 8, y + 12), f"{total:.1f} ms", fill="black")
    legend_y = 60 + row_h * len(rows)
    x = 10
    for stage, color in STAGE_COLORS.items():
        draw.rectangle([x, legend_y, x + 12, legend_y + 12], fill=color)
        draw.text((x + 16, legend_y), stage, fill="black")
        x += 20 + 7 * len(stage) + 10
    image.save(path)
