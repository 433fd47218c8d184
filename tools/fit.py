"""Fit the surrogate (LightGBM per target + ridge baseline, grouped K-fold CV) or predict with one.

  python -m tools.fit --mixtures M.csv --losses L.csv --target COLUMN --out DIR     (static, RegMix)
  python -m tools.fit --sweep DIR --out DIR [--stages K | --grid t1,..,tK] [--model first-drop|reference]
  python -m tools.fit predict --surrogate DIR --mixtures M.csv --out P.csv          (index,prediction)

Trajectory models (--model):
  first-drop (default)  the loss at t_1 from the first segment's mixture (a static sub-model), then each
                        transition's drop l_{l+1} - l_l from (t_l, mixture, cumulative shares, l_l); both a
                        ridge base with LightGBM on its residuals. The search chooses stage 0 too and
                        starts every candidate from its own predicted first loss. Default because it ranks
                        held-out runs' final loss best in the rollout CV (docs/SURROGATE.md).
  reference             the paper exactly: one LightGBM l_{l+1} = f(t_l, m, l_l); stage 0 is the prior and
                        the offline rollout starts from the proxies' mean loss at t_1 (search with the
                        paper's defaults: --candidates 100000 --top-k 128, one target, token prior).
                        --history, --first-stage, --predict-drop, --no-loss-state vary it.

cv.json / cv.md report, per target, the one-step metrics and (trajectory) the rollout of each held-out
run's final loss against a static fit and persistence, and say plainly when static is better.
"""
import argparse
import json
import os
import sys

import numpy as np

from megatron_ext.atomic import atomic_write, make_output_dir
from megatron_ext.errors import UserError
from megatron_ext.surrogate import MODELS, Surrogate
from tools.cli import run_main
from tools.surrogate import (FitConfig, LGBMSettings, TrajectoryFeatures, cross_validate, cv_markdown,
                             fit_surrogate, parse_grid, plot_predicted_vs_observed, proxy_nonembedding_params,
                             read_indexed_table, static_table, trajectory_table, verdict)


def fit_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.fit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("input (either a static RegMix pair or a sweep)")
    src.add_argument("--mixtures", help="static: CSV with an index column, then one weight column per domain")
    src.add_argument("--losses", help="static: CSV with an index column, then one column per loss")
    src.add_argument("--target", help="static: the loss column the search minimizes (required with --mixtures)")
    src.add_argument("--sweep", help="trajectory: folder with trajectories.csv and mixtures.csv (tools.collect)")
    p.add_argument("--out", required=True, help="surrogate folder to write")
    p.add_argument("--targets", default="", help="comma-separated subset of targets to fit (default: all; "
                   "trajectory targets are 'target' and each domain)")
    p.add_argument("--stages", type=int, default=6,
                   help="trajectory: K stages, transitions on the grid l/K (default 6 = the paper's N=5 switches); "
                        "every run needs an evaluation exactly at each l/K")
    p.add_argument("--grid", help="trajectory: the grid t_1,...,t_K (increasing fractions, t_K = 1) instead of "
                   "--stages, for evaluations that are not uniform; stage 0 = [0, t_1)")
    p.add_argument("--model", choices=MODELS, default="first-drop",
                   help="trajectory model (default first-drop: it ranks held-out runs best in the rollout CV; "
                        "reference = the paper exactly)")
    p.add_argument("--no-loss-state", action="store_true",
                   help="reference trajectory model: leave the start loss out (ours)")
    p.add_argument("--history", action="store_true",
                   help="trajectory: add cumulative domain shares before the transition (ours)")
    p.add_argument("--first-stage", action="store_true",
                   help="trajectory: also model 0 → t_1 so the search can choose stage 0 (ours; paper: prior)")
    p.add_argument("--predict-drop", action="store_true",
                   help="trajectory: learn the loss change over each transition instead of the loss (ours)")
    p.add_argument("--folds", type=int, default=5, help="K-fold CV grouped by run (0: skip CV)")
    p.add_argument("--cv-seed", type=int, default=0)
    p.add_argument("--ridge-alpha", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=0.01, help="LightGBM learning rate (RegMix: 0.01)")
    p.add_argument("--num-iterations", type=int, default=1000, help="LightGBM rounds (RegMix: 1000)")
    p.add_argument("--num-leaves", type=int, default=31)
    p.add_argument("--min-data-in-leaf", type=int, default=20)
    p.add_argument("--seed", type=int, default=42, help="LightGBM seed (RegMix: 42)")
    p.add_argument("--threads", type=int, default=1, help="LightGBM num_threads")
    p.add_argument("--proxy-params", type=int,
                   help="trajectory: the proxies' non-embedding parameters, recorded for the online controller's "
                        "loss scaling (default: from the sweep's runner.json when it has one)")
    p.add_argument("--no-plot", action="store_true", help="skip the predicted-vs-observed PNG")
    return p


def predict_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.fit predict",
                                description="Predict the objective of a static surrogate for every mixture row.")
    p.add_argument("--surrogate", required=True)
    p.add_argument("--mixtures", required=True, help="CSV: index column, then the surrogate's domain columns")
    p.add_argument("--out", required=True, help="CSV to write: index,prediction")
    p.add_argument("--target", help="which fitted target (default: the surrogate's objective)")
    p.add_argument("--model", choices=("lgbm", "ridge"), default="lgbm")
    return p


def cmd_fit(args) -> int:
    targets = [t for t in args.targets.split(",") if t]
    if args.sweep and (args.mixtures or args.losses):
        raise UserError("give either --sweep or --mixtures/--losses, not both")
    if args.sweep:
        feats = TrajectoryFeatures(loss_state=not args.no_loss_state, history=args.history,
                                   first_stage=args.first_stage, predict_drop=args.predict_drop)
        grid = parse_grid(args.grid) if args.grid else None
        table = trajectory_table(args.sweep, args.stages, feats, targets or None, grid=grid, model=args.model)
        objective = "target" if "target" in table.targets else table.targets[0]
        source = {"sweep": os.path.abspath(args.sweep)}
        if args.proxy_params is not None and args.proxy_params <= 0:
            raise UserError("--proxy-params must be positive")
        extra = {"proxy_nonembedding_params": args.proxy_params or proxy_nonembedding_params(args.sweep)}
    elif args.mixtures and args.losses:
        if not args.target:
            raise UserError("--target COLUMN is required with --mixtures/--losses")
        if targets and args.target not in targets:
            targets.insert(0, args.target)
        table = static_table(args.mixtures, args.losses, targets or None)
        if args.target not in table.targets:
            raise UserError(f"{args.losses}: no column {args.target!r}")
        objective = args.target
        source = {"mixtures": os.path.abspath(args.mixtures), "losses": os.path.abspath(args.losses)}
        extra = {}
    else:
        raise UserError("give --sweep DIR, or --mixtures M.csv --losses L.csv --target COLUMN")
    cfg = FitConfig(folds=args.folds, cv_seed=args.cv_seed, ridge_alpha=args.ridge_alpha,
                    lgbm=LGBMSettings(learning_rate=args.lr, num_iterations=args.num_iterations,
                                      num_leaves=args.num_leaves, min_data_in_leaf=args.min_data_in_leaf,
                                      seed=args.seed, num_threads=args.threads))
    surrogate = fit_surrogate(table, cfg, {"objective": objective, "source": source, **extra})
    used = surrogate.meta["lgbm_min_data_in_leaf_used"]
    for part, leaf in (used.items() if isinstance(used, dict) else [("model", used)]):
        if leaf < cfg.lgbm.min_data_in_leaf:
            print(f"note: LightGBM min_data_in_leaf {cfg.lgbm.min_data_in_leaf} -> {leaf} for the {part} "
                  "(a tenth of its rows: fewer rows would fit a constant)", file=sys.stderr)
    make_output_dir(args.out, "--out")
    if args.folds:
        report = cross_validate(table, cfg)
        summary = {k: v for k, v in report.items() if k != "oof"}
        atomic_write(os.path.join(args.out, "cv.json"), json.dumps(summary, indent=1))
        atomic_write(os.path.join(args.out, "cv.md"), cv_markdown(report))
        if not args.no_plot:
            plot_predicted_vs_observed(table, report, os.path.join(args.out, "pred_vs_obs.png"))
        best = report["targets"][objective]
        print(f"cv {objective}: one step lgbm spearman {best['lgbm']['all']['spearman']:.4f} "
              f"mae {best['lgbm']['all']['mae']:.4f} | ridge spearman {best['ridge']['all']['spearman']:.4f}")
        if "rollout" in best:
            print(f"cv {objective}: final loss of held-out runs, rollout spearman {best['rollout']['spearman']:.4f} "
                  f"mae {best['rollout']['mae']:.4f} | static spearman {best['static']['spearman']:.4f} "
                  f"mae {best['static']['mae']:.4f} | static ridge {best['static_ridge']['spearman']:.4f}: "
                  f"{verdict(best)}")
        for target, entry in report["targets"].items():
            if entry["constant_folds"]:
                print(f"warning: {target}: LightGBM was constant in {entry['constant_folds']} CV folds "
                      "(too few rows); its CV metrics are not results", file=sys.stderr)
    surrogate.save(args.out)
    print(f"wrote {args.out}: {table.mode} surrogate, {len(table.targets)} targets, {table.proxies} proxies, "
          f"{len(table.Y)} rows, features {','.join(table.feature_names())}")
    return 0


def predict_mixtures(surrogate: Surrogate, domains: list[str], W: np.ndarray, target: str, kind: str = "lgbm"):
    """Static surrogate predictions for mixture rows whose columns are `domains`."""
    if surrogate.meta["mode"] != "static":
        raise UserError("predict needs a static surrogate (fitted from --mixtures/--losses); "
                        "a trajectory surrogate is queried by tools.search")
    if domains != surrogate.domains:
        extra = sorted(set(domains) ^ set(surrogate.domains))
        raise UserError("mixture columns differ from the surrogate's domains"
                        + (f": {extra[0]!r}" if extra else " (order)"))
    return surrogate.predict(target, W, kind=kind)


def cmd_predict(args) -> int:
    surrogate = Surrogate.load(args.surrogate)
    domains, index, W = read_indexed_table(args.mixtures)
    pred = predict_mixtures(surrogate, domains, W, args.target or surrogate.meta["objective"], args.model)
    atomic_write(args.out, "index,prediction\n" + "".join(f"{i},{p!r}\n" for i, p in zip(index, pred.tolist())))
    print(f"wrote {args.out}: {len(index)} predictions")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "predict":
        return cmd_predict(predict_parser().parse_args(argv[1:]))
    return cmd_fit(fit_parser().parse_args(argv))


if __name__ == "__main__":
    run_main(main)
