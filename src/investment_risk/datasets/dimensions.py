"""How redundant are the eight dimensions? Label correlations, principal components and the strongly related pairs.

If one component explains most of the variance, the eight scores mostly say one thing ("how risky"), and a
reader should not treat them as eight independent signals.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..core.atomic import write_text_atomic
from ..core.logs import get_logger
from ..core.spec import DIMENSIONS

STRONG_CORRELATION = 0.7
# Below this many articles a correlation is mostly chance: |r| up to about 2/sqrt(n) arises between independent
# labels (0.37 at 30 rows, 1.0 at 4), and the first component of a handful of rows explains nearly everything.
FEW_ROWS = 30


def dimension_analysis(labels: np.ndarray) -> dict[str, Any]:
    """Pearson correlations between the label columns, the explained variance of their principal components (on
    standardised labels), and the pairs correlated above STRONG_CORRELATION. Rows missing a label are left out."""
    labels = labels[~np.isnan(labels).any(axis=1)].astype(np.float64)
    std = labels.std(axis=0)
    varying = std > 0
    corr = np.full((len(DIMENSIONS), len(DIMENSIONS)), np.nan)
    if varying.sum() >= 2 and len(labels) >= 3:
        corr[np.ix_(varying, varying)] = np.corrcoef(labels[:, varying], rowvar=False)
    standardised = (labels[:, varying] - labels[:, varying].mean(axis=0)) / std[varying]
    singular = np.linalg.svd(standardised, compute_uv=False) if len(labels) >= 2 else np.zeros(0)
    variance = singular ** 2
    explained = (variance / variance.sum()).tolist() if variance.sum() > 0 else []
    pairs = [{"a": DIMENSIONS[i], "b": DIMENSIONS[j], "r": float(corr[i, j])}
             for i in range(len(DIMENSIONS)) for j in range(i + 1, len(DIMENSIONS))
             if not np.isnan(corr[i, j]) and abs(corr[i, j]) > STRONG_CORRELATION]
    return {"rows": int(len(labels)), "correlation": [[None if np.isnan(v) else round(float(v), 4) for v in row]
                                                       for row in corr],
            "explained_variance": [round(v, 4) for v in explained], "strong_pairs": sorted(pairs, key=lambda p: -abs(p["r"])),
            "constant_dimensions": [d for d, ok in zip(DIMENSIONS, varying) if not ok],
            "chance_r": round(min(1.0, 2 / np.sqrt(len(labels))), 4) if len(labels) else None,
            "too_few_rows": len(labels) < FEW_ROWS}


def plot_dimensions(analysis: dict[str, Any], heatmap: Path, variance: Path) -> None:
    from ..core.plots import pyplot, save_figure

    plt = pyplot()
    corr = np.array([[np.nan if v is None else v for v in row] for row in analysis["correlation"]])
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    image = ax.imshow(corr, cmap="RdBu_r", vmin=-1, vmax=1)
    short = [d.replace("_", " ") for d in DIMENSIONS]
    ax.set_xticks(range(len(DIMENSIONS)), short, rotation=45, ha="right")
    ax.set_yticks(range(len(DIMENSIONS)), short)
    for (i, j), value in np.ndenumerate(corr):
        if not np.isnan(value):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(image, ax=ax, label="Pearson r")
    ax.set_title(f"Label correlations ({analysis['rows']} articles)")
    save_figure(fig, heatmap)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    explained = analysis["explained_variance"]
    ax.bar(range(1, len(explained) + 1), explained, label="component")
    ax.plot(range(1, len(explained) + 1), np.cumsum(explained), marker="o", color="black", label="cumulative")
    ax.set_xlabel("principal component")
    ax.set_ylabel("share of variance")
    ax.set_ylim(0, 1.05)
    ax.legend()
    ax.set_title("Explained variance of the standardised labels")
    save_figure(fig, variance)


def strong_pairs_line(analysis: dict[str, Any]) -> str:
    pairs = analysis["strong_pairs"]
    return f"Pairs with |r| > {STRONG_CORRELATION}: " + (", ".join(
        f"{p['a']} / {p['b']} ({p['r']:.2f})" for p in pairs) if pairs else "none")


def dimensions_markdown(analysis: dict[str, Any], heading: str = "#") -> str:
    explained = analysis["explained_variance"]
    lines = [f"{heading} Dimension redundancy", "",
             f"{analysis['rows']} labelled articles. " + (
                 f"The first principal component of the standardised labels explains {explained[0]:.0%} of their "
                 "variance" if explained else "Too few rows for principal components"), ""]
    if analysis.get("too_few_rows"):
        lines += [f"**Too few rows to read much into:** below {FEW_ROWS} articles, correlations up to about "
                  f"{analysis['chance_r']:.2f} (2/sqrt(n)) arise by chance between independent labels, and the first "
                  "component of so few rows explains most of their variance whatever the labels mean.", ""]
    if explained:
        lines += ["| component | explained | cumulative |", "|---|---|---|"]
        lines += [f"| {i + 1} | {v:.3f} | {c:.3f} |" for i, (v, c) in enumerate(zip(explained, np.cumsum(explained)))]
        lines.append("")
    lines.append(strong_pairs_line(analysis))
    if analysis["constant_dimensions"]:
        lines.append(f"Constant (no variance, left out): {', '.join(analysis['constant_dimensions'])}")
    lines += ["", "![label correlations](dimension_correlations.png)", "",
              "![explained variance](dimension_variance.png)", ""]
    return "\n".join(lines)


def write_dimension_report(labels: np.ndarray, out: Path, heading: str = "#") -> dict[str, Any]:
    """dimensions.md and the two PNGs in `out`; returns the analysis."""
    analysis = dimension_analysis(labels)
    out.mkdir(parents=True, exist_ok=True)
    plot_dimensions(analysis, out / "dimension_correlations.png", out / "dimension_variance.png")
    write_text_atomic(dimensions_markdown(analysis, heading), out / "dimensions.md")
    return analysis


def report_label_dimensions(data: Path, out: Path) -> dict[str, Any]:
    """`report dimensions`: the labels of a file analysed, as dimensions.md, dimensions.json and the two PNGs."""
    from ..core.atomic import write_json_atomic
    from .readers import label_matrix, read_articles

    analysis = write_dimension_report(label_matrix(read_articles([data], labels=DIMENSIONS)), out)
    write_json_atomic(analysis, out / "dimensions.json")
    if analysis["too_few_rows"]:
        get_logger().warning("dimensions_too_few_rows", data=str(data), rows=analysis["rows"], needed=FEW_ROWS,
                             chance_r=analysis["chance_r"])
    return analysis
