"""curves.png: a run's history (out_dir/log.jsonl) drawn as train and validation loss, learning rate and samples/s.

A resumed run's log.jsonl holds one history (training.report.Reporter drops the steps after its checkpoint), so its plot
is continuous. Drawn on a bare matplotlib Figure: no pyplot, so no global backend or figure state is touched.
"""
import json

from matplotlib.figure import Figure

PANELS = {"loss": ("loss", "val_loss"), "learning rate": ("lr",), "samples/s": ("samples_per_s",)}


def read_history(log_path):
    """{metric: ([steps], [values])} for every metric in log.jsonl."""
    history = {}
    for line in open(log_path):
        record = json.loads(line)
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                steps, values = history.setdefault(key, ([], []))
                steps.append(record["step"])
                values.append(value)
    return history


def plot_curves(log_path, png_path):
    history = read_history(log_path)
    fig = Figure(figsize=(11, 3), dpi=80)
    for i, (title, keys) in enumerate(PANELS.items()):
        ax = fig.add_subplot(1, len(PANELS), i + 1)
        for key in keys:
            if key in history:
                ax.plot(*history[key], "o-" if key.startswith("val") else "-", label=key, markersize=4)
        ax.set(title=title, xlabel="step", yscale="log" if title == "loss" else "linear")  # loss spans decades
        ax.grid(alpha=0.3)
    fig.axes[0].legend()
    fig.tight_layout()
    fig.savefig(png_path)
