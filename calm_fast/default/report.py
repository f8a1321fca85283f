"""The embedded default's outputs: the printed table, the JSON record and the PNG heat map."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

from .assets import AssetMissing, INSTALL_HINTS


def table(record: Dict) -> str:
    """Per-task test accuracy (%), the mean, and the time of each row (merge + evaluation)."""
    tasks: List[str] = record["profile"]["tasks"]
    width = max(24, max(len(r["label"]) for r in record["results"]) + 1)
    cols = [t[:14] for t in tasks]
    lines = [f"{'method':<{width}}" + "".join(f"{c:>15}" for c in cols) + f"{'mean':>8}{'merge':>8}{'eval':>8}"]
    for r in record["results"]:
        if r["kind"] == "merge" and all(x["kind"] == "reference" for x in record["results"][:record["results"].index(r)]):
            lines.append("-" * len(lines[0]))
        accs = "".join(f"{100 * r['accuracy'][t]:>15.1f}" for t in tasks)
        lines.append(f"{r['label']:<{width}}{accs}{100 * r['mean']:>8.1f}{r['merge_seconds']:>7.1f}s"
                     f"{r['eval_seconds']:>7.1f}s")
    sizes = ", ".join(f"{t['name']} {t['sizes']['test']}" for t in record["tasks"])
    lines.append(f"test accuracy in % (test examples: {sizes}); chance is 50% except mfd_foundation (20%)"
                 if "mfd_foundation" in tasks else f"test accuracy in % (test examples: {sizes})")
    if record.get("pending_methods"):
        lines.append("not in this version yet: " + ", ".join(record["pending_methods"]))
    return "\n".join(lines)


def write_json(record: Dict, path: Path) -> None:
    Path(path).write_text(json.dumps(record, indent=1, default=str) + "\n")


def write_plot(record: Dict, path: Path) -> None:
    """A method × task heat map of test accuracy, with the mean as the last column."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise AssetMissing(f"matplotlib is not installed (install it with: {INSTALL_HINTS['matplotlib']})") from e
    import numpy as np

    tasks = record["profile"]["tasks"]
    rows = record["results"]
    data = np.array([[r["accuracy"][t] for t in tasks] + [r["mean"]] for r in rows]) * 100
    fig, ax = plt.subplots(figsize=(1.2 * len(tasks) + 3.5, 0.45 * len(rows) + 1.8))
    im = ax.imshow(data, cmap="viridis", aspect="auto", vmin=max(0.0, data.min() - 5), vmax=100)
    ax.set_xticks(range(len(tasks) + 1), [t.replace("_", "\n") for t in tasks] + ["MEAN"], fontsize=8)
    ax.set_yticks(range(len(rows)), [r["label"] for r in rows], fontsize=9)
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            ax.text(j, i, f"{data[i, j]:.1f}", ha="center", va="center", fontsize=7,
                    color="white" if data[i, j] < (data.max() + data.min()) / 2 else "black")
    ax.axvline(len(tasks) - 0.5, color="white", lw=2)
    p = record["profile"]
    ax.set_title(f"calm-fast default ({p['name']}): test accuracy %, all-MiniLM-L6-v2, top {p['train_layers']} "
                 f"layers fine-tuned, seed {record['seed']}", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)
    plt.close(fig)


def markdown_table(record: Dict) -> str:
    """The table as Markdown (for the README)."""
    tasks = record["profile"]["tasks"]
    lines = ["| method | " + " | ".join(tasks) + " | mean | merge + eval (s) |",
             "|---|" + "---|" * (len(tasks) + 2)]
    for r in record["results"]:
        cells = " | ".join(f"{100 * r['accuracy'][t]:.1f}" for t in tasks)
        lines.append(f"| {r['label']} | {cells} | **{100 * r['mean']:.1f}** | "
                     f"{r['merge_seconds']:.1f} + {r['eval_seconds']:.1f} |")
    return "\n".join(lines)
