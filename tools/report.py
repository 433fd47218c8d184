"""Tables, plots and a plain verdict from target runs (any runs directory) and, optionally, the proxies.

    python -m tools.report --compare runs/compare --tokens data/tok/tokens.json --out report \\
        [--sweep sweep/demo]
    python -m tools.report --run natural=runs/a/seed1 --run regmix=runs/b/seed1 ... --out report

A comparison folder (tools.compare) has runs/<label>/seed<S>/; any other folder works through --run
LABEL=DIR (repeatable; the same label on several directories = several seeds). Every number comes from
the runs' own files: the last line of trajectory.jsonl (held-out loss per domain, the target metric),
train_log.jsonl (training curves), sched.json (the schedule). Beside every loss stands the unigram
baseline: the cross-entropy, on each domain's validation tokens, of a unigram model (add-one smoothed)
fitted on the pooled training tokens of every domain, read from the `.bin/.idx` files of tokens.json.

Evaluation, fixed before any result was seen: the mean over domains of the held-out loss, the
target metric the searches optimized, each domain's loss, and (from each run's heldout.json, written
by tools.heldout) top-1 token and whole-word accuracy and the loss on each evaluation-only set (text
from sources none of the domains holds), which no arm optimizes; mean ± sample std over seeds. A difference
is called only when it exceeds the larger seed std of the two arms (so never with one seed).
Writes OUT/index.md, OUT/summary.json and PNGs; the last printed lines say which arm won on what.
"""
import argparse
import csv
import glob
import json
import os
import re
import shutil
import warnings

import numpy as np

from megatron_ext.atomic import atomic_write
from megatron_ext.errors import UserError
from megatron_ext.schedule import MixtureSchedule
from tools.cli import run_main
from tools.sweep import load_tokens, read_json, trajectory_records

MEAN = "mean over domains"
TOKEN_ACC, WORD_ACC = "top-1 token accuracy", "whole-word accuracy"   # tools.heldout; higher is better
HIGHER_IS_BETTER = (TOKEN_ACC, WORD_ACC)
SOURCE_LOSS = "held-out source loss ({})"   # tools.heldout on an eval-only set; lower is better


# ---------------------------------------------------------------- unigram baseline

def token_array(prefix: str) -> np.ndarray:
    """All token ids of a Megatron `.bin/.idx` pair, as stored (EOD included)."""
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    if not os.path.exists(prefix + ".bin") or not os.path.exists(prefix + ".idx"):
        raise UserError(f"{prefix}: no .bin/.idx (run tools.preprocess)")
    dtype = IndexedDataset(prefix).index.dtype
    return np.memmap(prefix + ".bin", dtype=dtype, mode="r")


def unigram_baseline(tokens: dict) -> dict:
    """{domain or eval-only set: cross-entropy (nats) of its validation tokens under the pooled-train
    unigram model}."""
    info = tokens["domains"]
    arrays = {d: token_array(info[d]["train_prefix"]) for d in sorted(info)}
    vocab = int(tokens.get("tokenizer", {}).get("vocab_size", 0))
    vocab = max([vocab] + [int(a.max()) + 1 for a in arrays.values()])
    counts = np.zeros(vocab + 1, dtype=np.float64)  # +1: NullTokenizer's EOD id is vocab_size
    for a in arrays.values():
        counts[:] += np.bincount(a, minlength=len(counts))[:len(counts)]
    logp = np.log((counts + 1.0) / (counts.sum() + len(counts)))
    out = {}
    for d, entry in sorted({**info, **tokens.get("eval_only", {})}.items()):
        if entry.get("valid_prefix"):
            v = np.asarray(token_array(entry["valid_prefix"]), dtype=np.int64)
            out[d] = float(-logp[np.minimum(v, len(logp) - 1)].mean())
    return out


# ---------------------------------------------------------------- reading runs

def read_jsonl(path: str) -> list:
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            if line.endswith("\n"):
                out.append(json.loads(line))
    return out


def discover_runs(compare: str) -> dict:
    """{label: [seed run dirs]} of a tools.compare folder, finished runs only."""
    found = {}
    for run_dir in sorted(glob.glob(os.path.join(compare, "runs", "*", "seed*"))):
        if os.path.exists(os.path.join(run_dir, "done")):
            found.setdefault(os.path.basename(os.path.dirname(run_dir)), []).append(run_dir)
    return found


def parse_run_args(items: list) -> dict:
    out = {}
    for item in items:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            raise UserError(f"--run {item!r}: expected LABEL=DIR")
        if not os.path.isdir(path):
            raise UserError(f"--run {item!r}: no such directory")
        out.setdefault(label, []).append(path)
    return out


def seed_of(run_dir: str) -> str:
    m = re.search(r"seed(\d+)$", run_dir.rstrip("/"))
    return m.group(1) if m else os.path.basename(run_dir.rstrip("/"))


def load_run(run_dir: str) -> dict:
    records = trajectory_records(run_dir)
    if not records:
        raise UserError(f"{run_dir}: no trajectory.jsonl lines (not a launcher run, or not started)")
    last = records[-1]
    sched = os.path.join(run_dir, "sched.json")
    return {"dir": run_dir, "seed": seed_of(run_dir), "records": records, "final": last,
            "losses": dict(last["losses"]), "target": float(last["target"]), "target_name": last.get("target_name"),
            "train_log": read_jsonl(os.path.join(run_dir, "train_log.jsonl")),
            "heldout": read_json(os.path.join(run_dir, "heldout.json")),
            "schedule": MixtureSchedule.load(sched) if os.path.exists(sched) else None}


def mean_std(values: list) -> tuple:
    a = np.asarray(values, float)
    return float(a.mean()), (float(a.std(ddof=1)) if len(a) > 1 else float("nan"))


def fmt(m: float, s: float) -> str:
    return f"{m:.4f}" if np.isnan(s) else f"{m:.4f} ± {s:.4f}"


# ---------------------------------------------------------------- statistics and verdict

def scored_eval_sets(arms: dict) -> list:
    """The eval-only sets every run's heldout.json scored (none if a run has no heldout.json)."""
    runs = [r for rs in arms.values() for r in rs]
    if not all(r["heldout"] for r in runs):
        return []
    return sorted(set.intersection(*(set(r["heldout"].get("eval_only", {})) for r in runs)))


def arm_metrics(runs: list, domains: list, eval_sets=()) -> dict:
    """{metric: (mean, std, n)} over seeds: each domain, the mean over domains, the target, the
    accuracies and the `eval_sets`' losses (tools.heldout)."""
    per = {d: [r["losses"][d] for r in runs] for d in domains}
    per[MEAN] = [float(np.mean([r["losses"][d] for d in domains])) for r in runs]
    per["target"] = [r["target"] for r in runs]
    if all(r["heldout"] for r in runs):
        per[TOKEN_ACC] = [r["heldout"]["mean_token_accuracy"] for r in runs]
        per[WORD_ACC] = [r["heldout"]["mean_word_accuracy"] for r in runs]
        for name in eval_sets:
            per[SOURCE_LOSS.format(name)] = [r["heldout"]["eval_only"][name]["loss"] for r in runs]
    return {k: (*mean_std(v), len(v)) for k, v in per.items()}


def verdict(metrics: dict, metric: str) -> str:
    """One line: the best arm on `metric`, and whether its lead exceeds the seed spread."""
    higher = metric in HIGHER_IS_BETTER
    ranked = sorted(metrics, key=lambda a: -metrics[a][metric][0] if higher else metrics[a][metric][0])
    best = ranked[0]
    m, s, n = metrics[best][metric]
    if len(ranked) == 1:
        return f"{metric}: only {best} ran ({m:.4f})"
    second = ranked[1]
    m2, s2, n2 = metrics[second][metric]
    gap = abs(m2 - m)
    spread = max(s, s2)
    if n < 2 or n2 < 2:
        call = f"not called: {min(n, n2)} seed, no seed spread to compare with"
    elif gap > spread:
        call = f"exceeds the seed std {spread:.4f}: {best} wins"
    else:
        call = f"within the seed std {spread:.4f}: no winner"
    return f"{metric}: {'highest' if higher else 'lowest'} {best} {m:.4f}, next {second} {m2:.4f} (gap {gap:.4f}; {call})"


def budget_of(label: str):
    """The proxy budget of a comparison label (`regmix_b25` → '25'), None without one."""
    m = re.search(r"_b(\d+)$", label)
    return m.group(1) if m else None


def versus(metrics: dict, arm: str, other: str, metric: str) -> str:
    """arm against other on one metric: the difference and whether it is called."""
    (m, s, n), (m2, s2, n2) = metrics[arm][metric], metrics[other][metric]
    diff = m - m2
    if n < 2 or n2 < 2:
        word = "not called (one seed)"
    elif abs(diff) > max(s, s2):
        word = "lower: called" if diff < 0 else "higher: called"
    else:
        word = "within seed spread"
    return f"{arm} vs {other} on {metric}: {diff:+.4f} ({word})"


def questions(metrics: dict) -> list:
    """(RegMix-D arm, other arm) pairs the comparison exists to answer: each RegMix-D arm against the
    natural mixture, DoReMi and RegMix at its proxy budget; online against offline at its budget; and the
    paper's claim, RegMix-D at the smallest budget against RegMix at the largest."""
    regmix = sorted((int(budget_of(a)), a) for a in metrics if a.startswith("regmix_") and budget_of(a))
    pairs = []
    for arm in (a for a in metrics if a.startswith("regmixd")):
        b = budget_of(arm)
        others = ["natural", "doremi"] + [a for a in metrics if a.startswith("regmix_") and budget_of(a) == b]
        if arm.startswith("regmixd_online"):
            others.append(arm.replace("regmixd_online", "regmixd_offline"))
        if b and len(regmix) > 1 and int(b) == regmix[0][0]:
            others.append(regmix[-1][1])
        pairs += [(arm, o) for o in others if o in metrics]
    return pairs


# ---------------------------------------------------------------- proxies

def proxy_summary(sweep: str, domains: list) -> dict:
    """Final losses of the sweep's proxies: per domain mean, std and range across mixtures."""
    path = os.path.join(sweep, "trajectories.csv")
    if not os.path.exists(path):
        raise UserError(f"--sweep {sweep}: no trajectories.csv (run tools.collect)")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    last = {}
    for r in rows:
        last[r["run"]] = max(last.get(r["run"], -1), int(r["iteration"]))
    final = {}
    for r in rows:
        if int(r["iteration"]) == last[r["run"]]:
            final.setdefault(r["run"], {})[r["domain"]] = float(r["loss"])
            final[r["run"]]["target"] = float(r["target"])
    out = {}
    for d in domains + ["target"]:
        v = np.array([f[d] for f in final.values() if d in f])
        if len(v):
            out[d] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else float("nan"),
                      "min": float(v.min()), "max": float(v.max())}
    return {"proxies": len(final), "iterations": max(last.values()), "final": out, "rows": rows}


def surrogate_cv(compare: str) -> list:
    """(label, proxies, LightGBM and ridge Spearman of the objective) from each schedule's cv.json."""
    out = []
    for cv_path in sorted(glob.glob(os.path.join(compare, "schedules", "*", "surrogate", "cv.json"))):
        label = os.path.basename(os.path.dirname(os.path.dirname(cv_path)))
        cv = read_json(cv_path)
        meta = read_json(os.path.join(os.path.dirname(cv_path), "meta.json")) or {}
        target = (cv.get("targets") or {}).get("target")
        if target:
            out.append((label, meta.get("proxies"), target["lgbm"]["all"]["spearman"],
                        target["ridge"]["all"]["spearman"]))
    return out


# ---------------------------------------------------------------- plots

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save(fig, path: str) -> None:
    from tools.surrogate import save_figure
    save_figure(fig, path)


def trained_mixture(records: list, domains: list) -> tuple:
    """(stage starts, weights per stage) of what a run trained on, from its trajectory: each evaluation
    records the mixture of the interval it closes. For a run whose controller chose the mixture as it
    went (its sched.json holds only the first stage)."""
    starts, W, prev = [], [], 0.0
    for r in records:
        w = [float(r["weights"].get(d, 0.0)) for d in domains]
        if not W or w != W[-1]:
            starts.append(prev)
            W.append(w)
        prev = float(r["progress"])
    return starts, np.array(W, float)


def plot_schedules(arms: dict, path: str) -> None:
    """Each arm's mixture over the run: its schedule, or for a controller's run (more stages trained than
    the schedule holds) the mixture its first seed trained on."""
    plt = _plt()
    labels = [a for a in arms if arms[a][0]["schedule"] is not None]
    fig, axes = plt.subplots(len(labels), 1, figsize=(8, 1.8 * len(labels) + 0.6), squeeze=False)
    for ax, label in zip(axes[:, 0], labels):
        run = arms[label][0]
        sched = run["schedule"]
        if max(r.get("stage", 0) for r in run["records"]) >= len(sched.stages):
            starts, W = trained_mixture(run["records"], sched.domains)
            label = f"{label}\nseed {run['seed']}, as trained"
        else:
            starts, W = [float(s.start) for s in sched.stages], np.array(sched.stage_weight_vectors(), float)
        W = W / W.sum(axis=1, keepdims=True)
        ax.stackplot(starts + [1.0], np.vstack([W, W[-1]]).T, labels=sched.domains, step="post")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_ylabel(label, fontsize=7)
    axes[0, 0].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    axes[-1, 0].set_xlabel("fraction of the target run")
    fig.tight_layout()
    save(fig, path)


def plot_domain_losses(metrics: dict, domains: list, baseline: dict, path: str) -> None:
    plt = _plt()
    names = domains + [MEAN]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / (len(metrics) + 1)
    x = np.arange(len(names))
    for i, (arm, m) in enumerate(metrics.items()):
        ax.bar(x + i * width, [m[n][0] for n in names], width, yerr=[np.nan_to_num(m[n][1]) for n in names],
               label=arm)
    base = [baseline.get(n, np.nan) for n in domains] + [float(np.mean([baseline[d] for d in domains]))
                                                         if all(d in baseline for d in domains) else np.nan]
    ax.bar(x + len(metrics) * width, base, width, label="unigram baseline", color="lightgray")
    ax.set_xticks(x + 0.4 - width / 2, names, rotation=40, ha="right", fontsize=7)
    ax.set_ylabel("held-out loss (nats)")
    lo = np.nanmin([m[n][0] for m in metrics.values() for n in names] + base)
    ax.set_ylim(max(0.0, lo - 1.0), None)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save(fig, path)


def plot_training(arms: dict, path: str) -> None:
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (label, runs) in enumerate(arms.items()):
        color = f"C{i % 10}"
        for j, r in enumerate(runs):
            log = r["train_log"]
            if log:
                it = np.array([x["iteration"] for x in log])
                loss = np.array([x["loss"] for x in log])
                k = max(1, len(loss) // 30)
                smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
                ax1.plot(it[k - 1:], smooth, color=color, alpha=0.8, label=label if j == 0 else None)
            ax2.plot([x["iteration"] for x in r["records"]], [x["target"] for x in r["records"]], "o-",
                     color=color, ms=3, label=label if j == 0 else None)
    ax1.set_title("training loss (running mean)", fontsize=9)
    ax2.set_title("held-out target metric", fontsize=9)
    for ax in (ax1, ax2):
        ax.set_xlabel("iteration")
        ax.legend(fontsize=7)
    fig.tight_layout()
    save(fig, path)


def plot_proxies(summary: dict, path: str) -> None:
    plt = _plt()
    by_run = {}
    for r in summary["rows"]:
        by_run.setdefault(r["run"], {})[float(r["progress"])] = float(r["target"])
    fig, ax = plt.subplots(figsize=(7, 4))
    for run, points in sorted(by_run.items()):
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], "-", lw=0.8, alpha=0.7)
    ax.set_xlabel("fraction of the proxy run")
    ax.set_ylabel("target metric (mean held-out loss)")
    ax.set_title(f"{len(by_run)} proxy trajectories", fontsize=9)
    fig.tight_layout()
    save(fig, path)


def plot_predicted(arms: dict, path: str) -> bool:
    """Each searched schedule's predicted target loss per stage (proxy scale) beside the target's
    observed target metric at the same fractions of its run."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for i, (label, runs) in enumerate(arms.items()):
        sched = runs[0]["schedule"]
        predicted = (sched.provenance or {}).get("predicted_loss") if sched else None
        if not predicted:
            continue
        K = len(predicted)
        ends = [(j + 1) / K for j in range(K)]
        ax.plot(ends, predicted, "s--", color=f"C{i % 10}", label=f"{label} predicted (proxy)")
        for j, r in enumerate(runs):
            ax.plot([x["progress"] for x in r["records"]], [x["target"] for x in r["records"]], "o-",
                    color=f"C{i % 10}", ms=3, alpha=0.7, label=f"{label} observed (target)" if j == 0 else None)
        drawn = True
    if drawn:
        ax.set_xlabel("fraction of the run")
        ax.set_ylabel("target metric")
        ax.legend(fontsize=7)
        fig.tight_layout()
        save(fig, path)
    else:
        plt.close(fig)
    return drawn


# ---------------------------------------------------------------- the report

def markdown_table(header: list, rows: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def proxy_section(sweep: str, domains, baseline: dict, out: str) -> tuple:
    """(markdown lines, summary) of the sweep's proxies: final loss per domain beside the unigram
    baseline, the spread across mixtures (the signal a surrogate can learn), and proxies.png."""
    proxies = proxy_summary(sweep, domains)
    plot_proxies(proxies, os.path.join(out, "proxies.png"))
    header = ["domain", "unigram", "proxies' final loss mean", "std across mixtures", "min", "max"]
    rows = [[d, f"{baseline[d]:.4f}" if d in baseline else "n/a", f"{p['mean']:.4f}", f"{p['std']:.4f}",
             f"{p['min']:.4f}", f"{p['max']:.4f}"] for d, p in proxies["final"].items()]
    md = [f"## Proxies ({proxies['proxies']} runs of {proxies['iterations']} iterations, `{sweep}`)", "",
          markdown_table(header, rows), ""]
    stds = [p["std"] for d, p in proxies["final"].items() if d != "target"]
    summary = {k: v for k, v in proxies.items() if k != "rows"}
    summary["sweep"] = sweep
    summary["mean_domain_std"] = float(np.mean(stds))
    summary["unigram_mean"] = float(np.mean([baseline[d] for d in domains])) if baseline else None
    return md, summary


def proxy_report(sweep: str, tokens, out: str) -> dict:
    """The proxies alone (a sizing sweep): OUT/index.md with the proxy table and plot."""
    baseline = unigram_baseline(tokens) if tokens else {}
    domains = sorted({r["domain"] for r in proxy_summary(sweep, [])["rows"]})
    os.makedirs(out, exist_ok=True)
    md, proxies = proxy_section(sweep, domains, baseline, out)
    atomic_write(os.path.join(out, "index.md"), "\n".join(["# Proxy report", ""] + md + ["![proxies](proxies.png)", ""]))
    atomic_write(os.path.join(out, "summary.json"), json.dumps({"proxies": proxies}, indent=1))
    return {"proxies": proxies}


def print_proxy_line(summary: dict) -> None:
    p = summary["proxies"]
    t = p["final"]["target"]
    base = f" (unigram {p['unigram_mean']:.4f})" if p["unigram_mean"] is not None else ""
    print(f"proxies {p['sweep']}: {p['proxies']} runs of {p['iterations']} iterations, final target "
          f"{t['mean']:.4f} ± {t['std']:.4f} [{t['min']:.4f}, {t['max']:.4f}]{base}, "
          f"per-domain std across mixtures {p['mean_domain_std']:.4f} (mean over domains)")


def build_report(arms: dict, tokens: dict, out: str, sweep=None, compare=None) -> dict:
    domains = sorted(set.intersection(*(set(r["losses"]) for runs in arms.values() for r in runs)))
    if not domains:
        raise UserError("the runs share no evaluated domain")
    baseline = unigram_baseline(tokens) if tokens else {}
    base_mean = float(np.mean([baseline[d] for d in domains])) if all(d in baseline for d in domains) else None
    eval_sets = scored_eval_sets(arms)
    metrics = {label: arm_metrics(runs, domains, eval_sets) for label, runs in arms.items()}
    info = (read_json(os.path.join(compare, "compare.json")) or {}) if compare else {}
    os.makedirs(out, exist_ok=True)
    md = ["# Comparison report", "",
          "Generated by `python -m tools.report`; every number is read from the runs' files.", ""]
    settings = info.get("settings")
    if settings:
        md += [f"Target: `{settings['config']}` {' '.join(settings['launcher'])}, {settings['train_iters']} "
               f"iterations, {settings['target_tokens']:,} tokens per run; proxies: `{settings['sweep']}`.", ""]
    target_names = sorted({str(r["target_name"]) for runs in arms.values() for r in runs})
    md += [f"Held-out loss in nats on the same validation tokens for every arm (last evaluation); the target "
           f"metric is the launcher's `{', '.join(target_names)}` of the domain losses (what the searches "
           f"minimized on the proxies). Mean ± sample std over seeds. Unigram baseline: pooled-train unigram "
           f"cross-entropy on each domain's validation set. Accuracies (higher is better; tools.heldout, "
           f"the check no arm optimizes): top-1 next-token and greedy whole-word accuracy on each domain's "
           f"first validation windows, averaged over domains.", ""]
    source_losses = [SOURCE_LOSS.format(name) for name in eval_sets]
    if source_losses:
        md += [f"{', '.join(source_losses)}: loss in nats on held-out text from sources that are in none of the "
               f"training domains (tools.corpus's evaluation-only sets, never trained on), lower is better; no "
               f"arm optimizes it.", ""]
    checks = [k for k in HIGHER_IS_BETTER if all(k in m for m in metrics.values())] + source_losses
    header = ["arm", "seeds", MEAN, "target metric", "vs unigram (mean)"] + checks
    rows = []
    for label, m in metrics.items():
        gap = f"{m[MEAN][0] - base_mean:+.4f}" if base_mean is not None else "n/a"
        rows.append([label, ", ".join(r["seed"] for r in arms[label]), fmt(*m[MEAN][:2]), fmt(*m["target"][:2]), gap]
                    + [fmt(*m[k][:2]) for k in checks])
    blank = ["-"] * (2 + len(checks))
    for arm, a in info.get("arms", {}).items():
        if not any(lab in arms for lab in a["labels"]):
            rows.append([arm, "-", "not finished"] + blank)
    md += ["## Arms", "", markdown_table(header, rows), ""]
    if base_mean is not None:
        md += [f"Unigram baseline, mean over domains: {base_mean:.4f}.", ""]
    source_base = [f"{name} {baseline[name]:.4f}" for name in eval_sets if name in baseline]
    if source_base:
        md += [f"Unigram baseline, {'; '.join(source_base)}.", ""]
    what = {arm: a["what"] for arm, a in info.get("arms", {}).items()}
    if what:
        md += ["Arms: " + "; ".join(f"**{k}**: {v}" for k, v in what.items()) + ".", ""]
    header = ["domain", "unigram"] + list(metrics)
    rows = [[d, f"{baseline[d]:.4f}" if d in baseline else "n/a"] + [fmt(*metrics[a][d][:2]) for a in metrics]
            for d in domains]
    md += ["## Held-out loss per domain", "", markdown_table(header, rows), ""]

    lines = [verdict(metrics, MEAN), verdict(metrics, "target")] + [verdict(metrics, k) for k in checks]
    domain_wins = {}
    for d in domains:
        domain_wins.setdefault(min(metrics, key=lambda a: metrics[a][d][0]), []).append(d)
    lines.append("lowest per domain: " + "; ".join(f"{a} on {len(ds)} ({', '.join(ds)})"
                                                    for a, ds in sorted(domain_wins.items())))
    lines += [versus(metrics, arm, other, MEAN) for arm, other in questions(metrics)]
    if base_mean is not None:
        below = [a for a in metrics if metrics[a][MEAN][0] < base_mean]
        lines.append(f"unigram baseline {base_mean:.4f}: {len(below)} of {len(metrics)} arms below it")
    plots = {"domain_losses.png": "Held-out loss per domain and arm (error bars: seed std)",
             "training.png": "Training loss and held-out target metric per arm"}
    plot_domain_losses(metrics, domains, baseline, os.path.join(out, "domain_losses.png"))
    plot_training(arms, os.path.join(out, "training.png"))
    if any(runs[0]["schedule"] is not None for runs in arms.values()):
        plot_schedules(arms, os.path.join(out, "schedules.png"))
        plots["schedules.png"] = "The schedules (stacked mixture weights over the run)"
    if plot_predicted(arms, os.path.join(out, "predicted_vs_observed.png")):
        plots["predicted_vs_observed.png"] = ("Searched schedules: predicted target loss per stage (proxy scale) "
                                              "and the target's observed metric")
    summary = {"domains": domains, "unigram": baseline, "unigram_mean": base_mean,
               "arms": {a: {k: {"mean": v[0], "std": None if np.isnan(v[1]) else v[1], "seeds": v[2]}
                            for k, v in m.items()} for a, m in metrics.items()},
               "verdict": lines}
    if sweep:
        section, summary["proxies"] = proxy_section(sweep, domains, baseline, out)
        md += section
        plots["proxies.png"] = "Proxy trajectories (target metric)"
    cv = surrogate_cv(compare) if compare else []
    for label, *_ in cv:   # tools.fit's out-of-fold predicted-vs-observed plot, beside the report
        png = os.path.join(compare, "schedules", label, "surrogate", "pred_vs_obs.png")
        if os.path.exists(png):
            shutil.copyfile(png, os.path.join(out, f"cv_{label}.png"))
            plots[f"cv_{label}.png"] = f"{label}: the surrogate's out-of-fold predictions against the proxies' losses"
    if cv:
        md += ["## Surrogates (grouped K-fold CV by proxy, objective `target`, all transitions)", "",
               markdown_table(["schedule", "proxies", "LightGBM Spearman", "ridge Spearman"],
                              [[l, p, f"{a:.4f}", f"{b:.4f}"] for l, p, a, b in cv]), ""]
        summary["surrogate_cv"] = cv
    md += ["## Verdict", "", "```", *lines, "```", ""]
    md += ["## Plots", ""] + [f"![{t}]({name})\n\n{t}.\n" for name, t in plots.items()]
    atomic_write(os.path.join(out, "index.md"), "\n".join(md))
    atomic_write(os.path.join(out, "summary.json"), json.dumps(summary, indent=1))
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compare", help="a tools.compare folder (runs/<label>/seed<S>/)")
    p.add_argument("--run", action="append", default=[], help="LABEL=DIR, repeatable (seeds: same label)")
    p.add_argument("--tokens", help="tokens.json for the unigram baseline (default: the comparison's)")
    p.add_argument("--sweep", help="the proxy sweep (trajectories.csv) for the proxy table and plot")
    p.add_argument("--out", default="report")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    found = discover_runs(args.compare) if args.compare else {}
    for label, dirs in parse_run_args(args.run).items():
        found.setdefault(label, []).extend(dirs)
    if not found and not args.sweep:
        raise UserError("no finished runs: give --compare DIR (with finished runs), --run LABEL=DIR or --sweep DIR")
    settings = (read_json(os.path.join(args.compare, "compare.json")) or {}).get("settings", {}) if args.compare else {}
    tokens_path = args.tokens or settings.get("tokens")
    sweep = args.sweep or settings.get("sweep")
    tokens = load_tokens(tokens_path) if tokens_path else None
    if not found:
        print_proxy_line(proxy_report(sweep, tokens, args.out))
        print(f"wrote {os.path.join(args.out, 'index.md')}")
        return 0
    arms = {label: [load_run(d) for d in dirs] for label, dirs in found.items()}
    summary = build_report(arms, tokens, args.out, sweep, args.compare)
    print(f"wrote {os.path.join(args.out, 'index.md')}")
    if "proxies" in summary:
        print_proxy_line(summary)
    for label, m in summary["arms"].items():
        extra = (f" (unigram {summary['unigram_mean']:.4f})" if summary["unigram_mean"] is not None else "")
        std = m[MEAN]["std"]
        print(f"{label}: {MEAN} {m[MEAN]['mean']:.4f}" + (f" ± {std:.4f}" if std is not None else "")
              + f", target {m['target']['mean']:.4f}, {m[MEAN]['seeds']} seed(s){extra}")
    for line in summary["verdict"]:
        print(line)
    return 0


if __name__ == "__main__":
    run_main(main)
