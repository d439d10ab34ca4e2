"""The FIM-for-free results as text tables and a PNG of the loss curves (used by ``run.py``).

A run's evaluations are dicts ``{"step", "tokens_seen", "losses": LossReport.as_dict()}``; the loss of a
kind is ``losses[kind]["loss"]`` (nats per token, head 1).
"""

from __future__ import annotations

from pathlib import Path

# The columns of the final-step table: (kind in megafim.eval.loss.KINDS, header).
COLUMNS = (
    ("ar", "AR"),
    ("fim_psm", "FIM PSM"),
    ("fim_spm", "FIM SPM"),
    ("middle_psm", "middle PSM"),
    ("middle_spm", "middle SPM"),
    ("middle_ar", "middle L2R"),
)


def loss(evaluation: dict, kind: str) -> float:
    return float(evaluation["losses"][kind]["loss"])


def final_table(runs: list[dict]) -> str:
    """Markdown: one row per FIM rate, every loss at the last evaluated step, and AR minus rate 0's AR."""
    base = next((r for r in runs if r["fim_rate"] == 0.0), None)
    header = "| FIM rate | step | " + " | ".join(h for _, h in COLUMNS) + " | AR - AR(rate 0) |"
    lines = [header, "|" + " --- |" * (len(COLUMNS) + 3)]
    for run in runs:
        last = run["evals"][-1]
        delta = ""
        if base is not None and base["evals"]:
            delta = f"{loss(last, 'ar') - loss(base['evals'][-1], 'ar'):+.4f}"
        cells = " | ".join(f"{loss(last, kind):.4f}" for kind, _ in COLUMNS)
        lines.append(f"| {run['fim_rate']:g} | {last['step']} | {cells} | {delta} |")
    return "\n".join(lines)


def curve_table(runs: list[dict], kind: str) -> str:
    """Markdown: the loss of ``kind`` at every evaluated step (rows) for every FIM rate (columns)."""
    steps = sorted({e["step"] for r in runs for e in r["evals"]})
    lines = ["| step | " + " | ".join(f"rate {r['fim_rate']:g}" for r in runs) + " |",
             "|" + " --- |" * (len(runs) + 1)]
    for step in steps:
        cells = []
        for run in runs:
            match = [e for e in run["evals"] if e["step"] == step]
            cells.append(f"{loss(match[0], kind):.4f}" if match else "")
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def token_counts(runs: list[dict]) -> str:
    """One line naming the scored token counts, which are the same for every run (same held-out data,
    same FIM cut points), so the losses compare token for token."""
    losses = runs[0]["evals"][-1]["losses"]
    parts = [f"{kind} {losses[kind]['tokens']:,}" for kind, _ in COLUMNS]
    return (f"{losses['samples']} held-out contexts of {losses['seq_length']} tokens; tokens scored: "
            + ", ".join(parts))


def plot(runs: list[dict], path: Path, title: str) -> None:
    """Four panels like the paper's figures 1-2: AR loss, AR loss minus rate 0's (the "for free"
    claim at a readable scale), FIM loss and middle-only loss, each against the training step."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7), dpi=80)
    panels = (
        (axes[0, 0], "AR loss (left-to-right test data)", [("ar", "-", "")]),
        (axes[1, 0], "FIM loss (every piece transformed)",
         [("fim_psm", "-", " PSM"), ("fim_spm", "--", " SPM")]),
        (axes[1, 1], "middle-only loss", [("middle_psm", "-", " PSM"), ("middle_ar", ":", " L2R")]),
    )
    base = next((r for r in runs if r["fim_rate"] == 0.0), None)
    base_ar = {e["step"]: loss(e, "ar") for e in base["evals"]} if base else {}
    for i, run in enumerate(runs):
        steps = [e["step"] for e in run["evals"]]
        color = f"C{i}"
        for ax, _, kinds in panels:
            for kind, style, suffix in kinds:
                ax.plot(steps, [loss(e, kind) for e in run["evals"]], style, color=color, marker=".",
                        label=f"FIM rate {run['fim_rate']:g}{suffix}")
        paired = [(e["step"], loss(e, "ar") - base_ar[e["step"]])
                  for e in run["evals"] if e["step"] in base_ar]
        if paired:
            axes[0, 1].plot(*zip(*paired), "-", color=color, marker=".",
                            label=f"FIM rate {run['fim_rate']:g}")
    axes[0, 1].axhline(0.0, color="gray", linewidth=0.8)
    named = [*panels, (axes[0, 1], "AR loss minus AR loss at FIM rate 0", [])]
    for ax, name, _ in named:
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel("nats per token")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
