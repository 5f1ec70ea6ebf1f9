"""`lmforge search`: a hyperparameter search over the runs of a pretrain or finetune command line
(lmforge/search/), and the short table it ends with."""

from __future__ import annotations

from pathlib import Path

from lmforge.errors import LmforgeError

TRAINING_VERBS = ("pretrain", "finetune")
SHOWN_TRIALS = 5  # the summary lists the best few; results.csv has them all


def cmd_search(args) -> int:
    from lmforge.cli import build_parser
    from lmforge.cli.training import plan_run
    from lmforge.search import SearchPlan, run_search

    command = args.training
    if not command:
        raise LmforgeError("give the training command after --: lmforge search ... -- pretrain|finetune FLAGS")
    if command[0] not in TRAINING_VERBS:
        raise LmforgeError(f"the command after -- must start with pretrain or finetune; got {command[0]!r}")
    options, prepare, how = plan_run(build_parser().parse_args(command))  # its mistakes: as the verb says them
    plan = SearchPlan(out=Path(args.out), trials=args.trials, space_file=args.space, options=options,
                      prepare=prepare, how=how, sampler=args.sampler, seed=args.seed, jobs=args.jobs,
                      timeout=args.timeout, storage=args.storage)
    _print_summary(run_search(plan), plan.out)
    return 0


def _print_summary(results: dict, out: Path) -> None:
    metric, trials, higher = results["metric"], results["trials"], results["direction"] == "maximize"
    states = [row["state"] for row in trials]
    print(f"\n{len(trials)} trials: {states.count('COMPLETE')} complete, {states.count('PRUNED')} pruned, "
          f"{states.count('FAIL')} failed; validation {metric}, {'higher' if higher else 'lower'} is better")
    ranked = sorted((row for row in trials if row["state"] == "COMPLETE"), key=lambda row: row[metric],
                    reverse=higher)[:SHOWN_TRIALS]
    if ranked:
        names = list(ranked[0]["params"])
        header = ["trial", metric, "seconds", *names]
        lines = [[str(row["trial"]), f"{row[metric]:.4f}", f"{row['seconds']:.1f}",
                  *(_cell(row["params"].get(name)) for name in names)] for row in ranked]
        widths = [max(len(cell) for cell in column) for column in zip(header, *lines, strict=True)]
        for line in (header, *lines):
            print("  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)))
    best = results["best"]
    if best is None:
        print("no trial completed")
    elif results["best_folder"]:
        print(f"best: trial {best['trial']}, {metric} {best[metric]:.4f}; model folder: {out / results['best_folder']}")
    else:
        print(f"best: trial {best['trial']}, {metric} {best[metric]:.4f}; its folder {best['run_folder']} "
              "is on the machine that ran it")
    print(f"results: {out / 'results.csv'}, {out / 'results.json'}, {out / 'history.png'}")


def _cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
