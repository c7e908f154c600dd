"""The evaluation report: one `results.json` with every metric, PNG plots, a markdown summary, wandb.

Layout of `results` (each suite's key present only when it ran):
    ppl            {length, windows, tokens, nll, ppl, ppl_tail}                        (eval/perplexity.py)
    ppl_by_length  {lengths: [same as ppl per length], by_position: [...], skipped}
    passkey        {lengths, depths, trials, seed, cells: [{length, depth, accuracy, answer_logprob, ...}]}
    passkey_read_twice   the same, every prompt given twice (JRT-Prompt; `--read-twice`)
    mqar           {models: {name: {family, d_model, read_twice, params, state_bytes, steps, train_seconds,
                                    grid: [{seq_len, num_kv_pairs, accuracy}]}}}   (eval/recall_recipe.py)
    lm_eval        {task: {metric: value}}
plus `meta` (checkpoint, model config, device, suite timings). Plots: `ppl_vs_length.png`,
`passkey_heatmap.png`, `recall_vs_pairs.png`, `recall_vs_state.png`; the markdown tables are `summary.md`.
"""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on clusters or in tests
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402


def plot_ppl_vs_length(ppl_by_length: dict, path: Path) -> None:
    rows = ppl_by_length["lengths"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    lengths = [r["length"] for r in rows]
    axes[0].plot(lengths, [r["ppl"] for r in rows], "o-", label="all positions")
    axes[0].plot(lengths, [r["ppl_tail"] for r in rows], "s--", label="second half of window")
    axes[0].set_xscale("log", base=2)
    axes[0].set(xlabel="context length (tokens)", ylabel="perplexity", title="perplexity vs context")
    axes[0].xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    axes[0].set_xticks(lengths, [str(L) for L in lengths])
    axes[0].legend()
    curve = ppl_by_length["by_position"]
    if curve:
        axes[1].plot([(b["start"] + b["end"]) / 2 for b in curve], [b["nll"] for b in curve], "o-")
        axes[1].set_xscale("log", base=2)
        axes[1].set(xlabel="position in window (bucket middle)", ylabel="mean NLL",
                    title=f"loss by position (window {lengths[-1]})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_passkey(passkey: dict, path: Path) -> None:
    lengths, depths = passkey["lengths"], passkey["depths"]
    acc = np.zeros((len(depths), len(lengths)))
    logp = np.zeros_like(acc)
    for c in passkey["cells"]:
        i, j = depths.index(c["depth"]), lengths.index(c["length"])
        acc[i, j], logp[i, j] = c["accuracy"], c["answer_logprob"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, grid, title, vmin, vmax in ((axes[0], acc, "passkey accuracy", 0, 1),
                                        (axes[1], logp, "answer log-prob / token", None, 0)):
        im = ax.imshow(grid, vmin=vmin, vmax=vmax, cmap="viridis", aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set(xlabel="prompt length (tokens)", ylabel="needle depth", title=title)
        for i in range(len(depths)):
            for j in range(len(lengths)):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", color="w", fontsize=8)
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _hardest(m: dict) -> dict:
    """A run's hardest grid point: the most pairs, then the longest sequence."""
    return max(m["grid"], key=lambda g: (g["num_kv_pairs"], g["seq_len"]))


def plot_recall(mqar: dict, path: Path) -> None:
    """Accuracy vs number of key-value pairs, one panel per sequence length, one line per run (read-twice
    runs dashed in their model's colour)."""
    models = mqar["models"]
    seq_lens = sorted({g["seq_len"] for m in models.values() for g in m["grid"]})
    colours = {}
    fig, axes = plt.subplots(1, len(seq_lens), figsize=(5.5 * len(seq_lens), 4.2), squeeze=False)
    for ax, T in zip(axes[0], seq_lens):
        for name, m in models.items():
            base = name.removesuffix("+jrt")
            colour = colours.setdefault(base, f"C{len(colours) % 10}")
            pts = sorted((g["num_kv_pairs"], g["accuracy"]) for g in m["grid"] if g["seq_len"] == T)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o--" if m.get("read_twice") else "o-",
                    color=colour, label=name)
        ax.set(xlabel="key-value pairs", ylabel="MQAR accuracy", title=f"sequence length {T}", ylim=(-0.02, 1.02))
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_recall_vs_state(mqar: dict, path: Path) -> None:
    """Zoology's figure: accuracy on the hardest setting vs decoding-state size, one point per run (model
    and width), one colour per family; read-twice runs are hollow."""
    models = mqar["models"]
    hard = _hardest(next(iter(models.values())))
    families = sorted({m["family"] for m in models.values()})
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, family in enumerate(families):
        for jrt in (False, True):
            runs = sorted((m["state_bytes"], _hardest(m)["accuracy"]) for m in models.values()
                          if m["family"] == family and bool(m.get("read_twice")) == jrt)
            if runs:
                ax.plot([r[0] for r in runs], [r[1] for r in runs], "o--" if jrt else "o-", color=f"C{i % 10}",
                        mfc="none" if jrt else f"C{i % 10}", label=family + (" (read twice)" if jrt else ""))
    ax.set(xlabel="decoding state (bytes, log scale)", ylim=(-0.02, 1.02),
           ylabel=f"MQAR accuracy, {hard['num_kv_pairs']} pairs at T={hard['seq_len']}")
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fmt(x) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def markdown_summary(results: dict) -> str:
    lines = ["# Evaluation summary", ""]
    meta = results.get("meta", {})
    if meta.get("checkpoint"):
        lines += [f"Checkpoint: `{meta['checkpoint']}`", ""]
    if "ppl" in results:
        p = results["ppl"]
        lines += ["## Held-out perplexity", "", "| length | tokens | nll | ppl |", "|---|---|---|---|",
                  f"| {p['length']} | {p['tokens']} | {_fmt(p['nll'])} | {_fmt(p['ppl'])} |", ""]
    if "ppl_by_length" in results:
        lines += ["## Perplexity by context length", "", "| length | tokens | ppl | ppl (second half) |",
                  "|---|---|---|---|"]
        lines += [f"| {r['length']} | {r['tokens']} | {_fmt(r['ppl'])} | {_fmt(r['ppl_tail'])} |"
                  for r in results["ppl_by_length"]["lengths"]]
        if results["ppl_by_length"].get("skipped"):
            lines.append(f"\nSkipped (longer than the held-out split): {results['ppl_by_length']['skipped']}")
        lines.append("")
    for key, title in (("passkey", "Passkey retrieval"), ("passkey_read_twice", "Passkey retrieval, read twice")):
        if key not in results:
            continue
        pk = results[key]
        lines += [f"## {title} (accuracy; rows: depth, columns: length)", "",
                  "| depth | " + " | ".join(str(L) for L in pk["lengths"]) + " |",
                  "|---|" + "---|" * len(pk["lengths"])]
        for d in pk["depths"]:
            accs = {c["length"]: c["accuracy"] for c in pk["cells"] if c["depth"] == d}
            lines.append(f"| {d:.0%} | " + " | ".join(_fmt(accs[L]) for L in pk["lengths"]) + " |")
        lines.append("")
    if "mqar" in results:
        models = results["mqar"]["models"]
        keys = sorted({(g["seq_len"], g["num_kv_pairs"]) for m in models.values() for g in m["grid"]})
        lines += ["## MQAR accuracy", "", "One row per run; `+jrt`: trained and evaluated with the context read "
                  "twice. Columns: accuracy at (seq_len, key-value pairs).", "",
                  "| run | family | d_model | parameters | state (bytes) | " +
                  " | ".join(f"T{T} kv{kv}" for T, kv in keys) + " | steps | train s |",
                  "|---|---|---|---|---|" + "---|" * len(keys) + "---|---|"]
        for n, m in models.items():
            acc = {(g["seq_len"], g["num_kv_pairs"]): g["accuracy"] for g in m["grid"]}
            cells = [_fmt(acc[k]) if k in acc else "-" for k in keys]
            lines.append(f"| {n} | {m['family']} | {m.get('d_model', '-')} | {m['params']} | {m['state_bytes']} | "
                         + " | ".join(cells) + f" | {m.get('steps', '-')} | {_fmt(m.get('train_seconds', 0.0))} |")
        lines.append("")
    if "lm_eval" in results:
        lines += ["## lm-eval-harness", "", "| task | metric | value |", "|---|---|---|"]
        for task, metrics in results["lm_eval"].items():
            lines += [f"| {task} | {k} | {_fmt(v)} |" for k, v in metrics.items()]
        lines.append("")
    return "\n".join(lines)


def flat_metrics(results: dict) -> dict[str, float]:
    """Scalar metrics with slash names, for wandb and the trainer's logger."""
    out = {}
    if "ppl" in results:
        out["eval/ppl"] = results["ppl"]["ppl"]
    for r in results.get("ppl_by_length", {}).get("lengths", []):
        out[f"eval/ppl@{r['length']}"] = r["ppl"]
        out[f"eval/ppl_tail@{r['length']}"] = r["ppl_tail"]
    for key in ("passkey", "passkey_read_twice"):
        if key in results:
            out[f"eval/{key}_accuracy"] = float(np.mean([c["accuracy"] for c in results[key]["cells"]]))
    for name, m in results.get("mqar", {}).get("models", {}).items():
        for g in m["grid"]:
            out[f"eval/mqar/{name}/T{g['seq_len']}_kv{g['num_kv_pairs']}"] = g["accuracy"]
    for task, metrics in results.get("lm_eval", {}).items():
        for k, v in metrics.items():
            out[f"eval/{task}/{k}"] = v
    return out


def write_report(results: dict, out_dir: str | Path) -> dict[str, Path]:
    """results.json, summary.md and the plots of the suites present; returns what was written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"json": out / "results.json", "markdown": out / "summary.md"}
    written["json"].write_text(json.dumps(results, indent=1) + "\n")
    written["markdown"].write_text(markdown_summary(results) + "\n")
    if results.get("ppl_by_length", {}).get("lengths"):
        written["ppl_plot"] = out / "ppl_vs_length.png"
        plot_ppl_vs_length(results["ppl_by_length"], written["ppl_plot"])
    if "passkey" in results:
        written["passkey_plot"] = out / "passkey_heatmap.png"
        plot_passkey(results["passkey"], written["passkey_plot"])
    if results.get("mqar", {}).get("models"):
        written["recall_plot"] = out / "recall_vs_pairs.png"
        plot_recall(results["mqar"], written["recall_plot"])
        written["recall_state_plot"] = out / "recall_vs_state.png"
        plot_recall_vs_state(results["mqar"], written["recall_state_plot"])
    return written


def log_wandb(results: dict, out_dir: str | Path, *, mode: str = "offline", project: str = "hybrid-eval",
              name: str | None = None, images: dict[str, Path] | None = None) -> None:
    """Scalars, the summary table and the plots to wandb; offline by default (`wandb sync` later)."""
    if mode == "disabled":
        return
    import wandb

    run = wandb.init(project=project, dir=str(out_dir), mode=mode, name=name, config=results.get("meta", {}))
    try:
        payload = dict(flat_metrics(results))
        for key, path in (images or {}).items():
            if str(path).endswith(".png"):
                payload[f"plots/{key}"] = wandb.Image(str(path))
        run.log(payload)
        run.summary.update(flat_metrics(results))
    finally:
        run.finish()
