"""The paper in miniature: held-out accuracy vs number of trained parameters, RL vs SFT.

    python sweep.py                  the full sweep on the embedded toy (make sweep; 14 min
                                     on 2 cores): sweeps/<date-time>/results.{md,json} + plot
    python sweep.py --quick          a plumbing check: 2 points, 1 seed, 2 steps, 16 problems
    python sweep.py --probe-lr --out DIR
                                     the learning-rate probe that chose LRS below (it continues
                                     in DIR, keeping finished runs)

Every point is one `train.py` run (train.main in a worker process, one thread each) from the
embedded default's settings (toy preset: 60 steps of 16 prompts, 500 held-out problems), changing
only the method, its size, the algorithm and the seed. The points (docs/results.md reads them):
- size: TinyLoRA at 1 parameter (u = 1, all 14 modules tied), 13 (u = 13 tied: the default),
  14 (u = 1 untied), 182 (u = 13 untied); LoRA-XS r = 2 and 16; LoRA r = 1 and 8; full
  fine-tuning; all trained by GRPO;
- the same sizes trained by SFT on reference solutions, in two variants: `solution_own_style`
  (the base model's own step-by-step wording) and `answer` (GSM8K-style human wording the base
  model never saw);
- tiling: tiled vs structured tying at 7 parameters (u = 1, n_tie = 2);
- rank: r = 1, 2, 4 at 13 parameters (r = 2 is the size point's).
Each run reports greedy accuracy, strict (`#### N`) and flexible (last number), and sampled
(T = 1) accuracy: strict minus flexible is what format alone costs.

Outputs (in --out): runs/<point>-s<seed>/ and runs/<point>-s<seed>.log (each run's folder, with
its summary.json, and its output); results.json (per-point means and standard deviations over the
seeds, the exact command, seeds, git commit, wall time, failed runs); results.md (the table) and
accuracy_vs_params.png (greedy and sampled accuracy vs trained parameters, when matplotlib is
installed; the table does not need it; `--replot DIR` redraws it from DIR/results.json).
Seeds change the data order and the sampling; the random projections P stay those of seed 0.
"""

import argparse
import json
import math
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime

ROOT = os.path.dirname(os.path.abspath(__file__))
TRAIN_DATA = os.path.join(ROOT, "toy", "data", "train.jsonl")

# Learning rate per size, from `python sweep.py --probe-lr`: GRPO, seed 0, each rate of PROBE_LRS
# (three per decade, 1e-4 to 1e-1), scored by the mean training reward over the last PROBE_LAST
# steps: the accuracy of sampled (T = 1) completions on training problems, what GRPO optimises;
# the held-out set plays no part. The rate chosen is the smallest one within a standard error of
# the best (`choose_rate`). SFT uses the size's GRPO rate, so the two differ in the objective
# alone; the tiling and rank points use the rate of the size they are closest to. Measured with
# `python sweep.py --probe-lr --out /tmp/probe4` (25 minutes):
#   size               1e-4  2e-4  5e-4  1e-3  2e-3  5e-3  1e-2  2e-2  5e-2  1e-1   chosen
#   tinylora-u1-tied   .391  .399  .409  .428  .437  .434  .427  .434  .432  .395   1e-3
#   tinylora-u13-tied  .441  .510  .626  .715  .803  .820  .827  .784  .732  .000   5e-3
#   tinylora-u1        .402  .418  .466  .548  .665  .835  .860  .878  .834  .794   1e-2
#   tinylora-u13       .581  .734  .934  .969  .975  .982  .956  .009  .000  .000   2e-3
#   lora-xs-r2         .427  .472  .596  .772  .925  .980  .969  .977  .908  .780   5e-3
#   lora-xs-r16        .986  .997  .998  .994  .939  .595  .005  .000  .000  .000   2e-4
#   lora-r1            .630  .921  .995  .998  .994  .980  .982  .888  .000  .000   5e-4
#   lora-r8            .989  .997  .998  .997  .992  .974  .001  .000  .000  .000   2e-4
#   full               .999  .934  .454  .041  .009  .000  .000  .000  .000  .000   1e-4
LRS = {"tinylora-u1-tied": 1e-3, "tinylora-u13-tied": 5e-3, "tinylora-u1": 1e-2, "tinylora-u13": 2e-3,
       "lora-xs-r2": 5e-3, "lora-xs-r16": 2e-4, "lora-r1": 5e-4, "lora-r8": 2e-4, "full": 1e-4}
PROBE_LRS = [1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1]
PROBE_LAST = 10


@dataclass
class Point:
    name: str  # unique; used for folder names
    group: str  # size | tiling | rank
    method: str
    flags: list = field(default_factory=list)  # train.py flags of the adapter's size and shape
    algo: str = "grpo"  # grpo | sft-own | sft-human
    lr_from: str = ""  # the SIZES entry whose probed learning rate it uses

    def argv(self, lr):
        algo = {"grpo": ["--algo", "grpo"], "sft-own": ["--algo", "sft", "--sft-field", "solution_own_style"],
                "sft-human": ["--algo", "sft", "--sft-field", "answer"]}[self.algo]
        return ["--method", self.method, *self.flags, *algo, "--lr", str(lr)]


# The toy preset ties all 14 modules into one u = 13 vector; LoRA and full fine-tuning have no v to
# tie, and a tied LoRA-XS would share one R: the other methods run untied, u = 1.
UNTIED = ["--u", "1", "--n-tie", "1"]
SIZES = [  # (name, method, flags): the x-axis of the plot
    ("tinylora-u1-tied", "tinylora", ["--u", "1", "--n-tie", "all"]),
    ("tinylora-u13-tied", "tinylora", ["--u", "13", "--n-tie", "all"]),
    ("tinylora-u1", "tinylora", ["--u", "1", "--n-tie", "1"]),
    ("tinylora-u13", "tinylora", ["--u", "13", "--n-tie", "1"]),
    ("lora-xs-r2", "lora-xs", ["--r", "2", *UNTIED]),
    ("lora-xs-r16", "lora-xs", ["--r", "16", *UNTIED]),
    ("lora-r1", "lora", ["--r", "1", *UNTIED]),
    ("lora-r8", "lora", ["--r", "8", *UNTIED]),
    ("full", "full", UNTIED),
]


def all_points():
    points = [Point(f"{name}-{algo}", "size", method, flags, algo, lr_from=name)
              for algo in ("grpo", "sft-own", "sft-human") for name, method, flags in SIZES]
    points += [Point(f"tinylora-u1-tie2-{tiling}", "tiling", "tinylora", ["--u", "1", "--n-tie", "2", "--tiling", tiling],
                     lr_from="tinylora-u1") for tiling in ("tiled", "structured")]  # 7 parameters: the rate of 14
    points += [Point(f"tinylora-u13-tied-r{r}", "rank", "tinylora", ["--u", "13", "--n-tie", "all", "--r", str(r)],
                     lr_from="tinylora-u13-tied") for r in (1, 4)]
    return points


def run_one(argv, log_path):
    """One train.py run in this (worker) process, its output in log_path -> exit code."""
    import contextlib

    import torch

    import train

    torch.set_num_threads(1)  # also when `extra` flags leave the preset's one thread
    with open(log_path, "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        return train.main(argv)


def run_all(jobs, workers):
    """jobs: [(key, argv, run_dir)] -> {key: exit code}, `workers` processes at a time, with a
    progress line per finished run."""
    codes, t0 = {}, time.time()
    context = multiprocessing.get_context("spawn")  # a fresh interpreter per worker: no state shared with this one
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = {}
        for key, argv, run_dir in jobs:
            os.makedirs(os.path.dirname(run_dir), exist_ok=True)
            futures[pool.submit(run_one, argv, run_dir + ".log")] = (key, run_dir)
        for done, future in enumerate(as_completed(futures), 1):
            key, run_dir = futures[future]
            try:
                codes[key] = future.result()
            except Exception as e:  # a crashed run must not lose the others' results
                codes[key] = f"crashed: {e!r}"
            elapsed = time.time() - t0
            summary = read_summary(run_dir)
            result = (" | ".join(f"{d} {summary['before'][d]['strict']:.3f} -> {a['strict']:.3f}"
                                 for d, a in summary["after"].items())
                      if summary else f"FAILED (exit {codes[key]}, see {run_dir}.log)")
            print(f"[{done}/{len(jobs)}] {os.path.basename(run_dir)}: {result} | elapsed {elapsed / 60:.1f} min, "
                  f"ETA {elapsed / done * (len(jobs) - done) / 60:.1f} min", flush=True)
    return codes


def read_summary(run_dir):
    path = os.path.join(run_dir, "summary.json")
    return json.load(open(path)) if os.path.isfile(path) else None


def mean_std(xs):
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(points, seeds, out):
    """Per-point means over seeds of every accuracy, from the runs' summary.json files."""
    rows = []
    for p in points:
        runs = [read_summary(os.path.join(out, "runs", f"{p.name}-s{seed}")) for seed in seeds]
        runs = [r for r in runs if r]
        if not runs:
            continue
        row = {"point": p.name, "group": p.group, "method": p.method, "algo": p.algo, "flags": p.flags,
               "lr": runs[0]["settings"]["lr"], "params": runs[0]["trainable_parameters"], "seeds": len(runs)}
        for when in ("before", "after"):
            for decoding in ("greedy", "sampled"):
                for check in ("strict", "flexible"):
                    m, s = mean_std([r[when][decoding][check] for r in runs])
                    row[f"{when}_{decoding}_{check}"], row[f"{when}_{decoding}_{check}_std"] = m, s
        rows.append(row)
    return rows


def table(rows):
    """The markdown table of the sweep: one line per point."""
    lines = ["| point | algorithm | trained params | lr | seeds | **sampled strict** | greedy strict | greedy flexible |",
             "|---|---|---:|---:|---:|---|---|---|"]
    if rows:
        base = rows[0]
        lines.append(f"| base model (no training) | | 0 | | | {base['before_sampled_strict']:.3f} | "
                     f"{base['before_greedy_strict']:.3f} | {base['before_greedy_flexible']:.3f} |")
    for r in rows:
        cells = [f"{r[f'after_{k}']:.3f} ± {r[f'after_{k}_std']:.3f}" if r["seeds"] > 1 else f"{r[f'after_{k}']:.3f}"
                 for k in ("sampled_strict", "greedy_strict", "greedy_flexible")]
        lines.append(f"| {r['point']} | {r['algo']} | {r['params']:,} | {r['lr']:g} | {r['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows, path):
    """Greedy (left) and sampled (right) accuracy vs trained parameters, log x, one line per
    algorithm, the base model dashed; None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not rows:
        return None
    labels = {"grpo": "GRPO (RL)", "sft-own": "SFT, own-style demonstrations",
              "sft-human": "SFT, human-style demonstrations"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), sharey=True)
    for ax, decoding in zip(axes, ("greedy", "sampled")):
        key = f"after_{decoding}_strict"
        for algo, label in labels.items():
            line = sorted((r for r in rows if r["group"] == "size" and r["algo"] == algo), key=lambda r: r["params"])
            if line:
                ax.errorbar([r["params"] for r in line], [r[key] for r in line], yerr=[r[key + "_std"] for r in line],
                            marker="o", capsize=3, label=label)
        ax.axhline(statistics.mean(r[f"before_{decoding}_strict"] for r in rows), color="gray", linestyle="--",
                   label="base model")
        ax.set_xscale("log")
        ax.set_xlabel("trained parameters")
        ax.set_title(f"{decoding} decoding" + (" (T = 1)" if decoding == "sampled" else ""), fontsize=10)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out accuracy (strict), mean of the seeds")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=8)
    fig.suptitle("toy task: accuracy vs trained parameters", fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def git_commit():
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def probe_lr(args):
    """GRPO on seed 0 for each size at each rate in PROBE_LRS; prints each run's mean training
    reward over its last PROBE_LAST steps and the rate chosen (`choose_rate`). Evaluation is cut to
    16 training problems, sampled: the choice does not use it."""
    jobs = []
    for name, method, flags in SIZES:
        for lr in PROBE_LRS:
            run_dir = os.path.join(args.out, "probe", f"{name}-lr{lr:g}")
            jobs.append(((name, lr), ["--out", run_dir, "--overwrite", "--seed", "0", "--method", method, *flags,
                                      "--lr", str(lr), "--eval-data", TRAIN_DATA, "--eval-limit", "16",
                                      "--eval-decoding", "sampled", *args.extra], run_dir))
    run_all([job for job in jobs if read_summary(job[2]) is None], args.workers)  # finished runs are kept
    print(f"mean training reward of the last {PROBE_LAST} steps (sampled, T = 1)")
    print(f"{'size':<20}" + "".join(f"{lr:<8g}" for lr in PROBE_LRS) + "chosen")
    for name, _, _ in SIZES:
        finals = [final_rewards(os.path.join(args.out, "probe", f"{name}-lr{lr:g}")) for lr in PROBE_LRS]
        means = [statistics.mean(r) if r else float("nan") for r in finals]
        chosen = choose_rate(PROBE_LRS, finals)
        print(f"{name:<20}" + "".join(f"{m:<8.3f}" for m in means) + (f"{chosen:g}" if chosen else "none finished"))
    return 0


def final_rewards(run_dir):
    """The training rewards of a finished run's last PROBE_LAST steps (None: the run did not finish,
    or a reward is not a finite number)."""
    if read_summary(run_dir) is None:
        return None
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rewards = [json.loads(line)["reward"] for line in f if line.strip()][-PROBE_LAST:]
    return rewards if rewards and all(math.isfinite(r) for r in rewards) else None


def choose_rate(rates, finals):
    """The smallest rate whose mean final reward is within one standard error of the difference
    from the best rate's: rates the probe cannot tell apart from the best count as the best, and
    the smallest of them moves the reward over the whole run rather than in its first steps.
    finals: per rate, its last steps' rewards (None: failed, never chosen). None if every run failed."""
    done = [i for i, r in enumerate(finals) if r]
    if not done:
        return None
    best = max(done, key=lambda i: statistics.mean(finals[i]))

    def within(i):
        a, b = finals[best], finals[i]
        se = (statistics.variance(a) / len(a) + statistics.variance(b) / len(b)) ** 0.5 if min(len(a), len(b)) > 1 else 0.0
        return statistics.mean(a) - statistics.mean(b) <= se

    return rates[min((i for i in done if within(i)), key=lambda i: rates[i])]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="sweep folder (default sweeps/<date-time>)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per point (0, 1, ...)")
    p.add_argument("--workers", type=int, default=2, help="runs at a time, one thread each")
    p.add_argument("--quick", action="store_true", help="plumbing check: 2 points, 1 seed, 2 steps, 16 problems")
    p.add_argument("--probe-lr", action="store_true", help="run the learning-rate probe instead of the sweep")
    p.add_argument("--replot", metavar="DIR", help="only redraw DIR/accuracy_vs_params.png from DIR/results.json")
    p.add_argument("extra", nargs="*", help="more train.py flags for every run, after --")
    args = p.parse_args(argv)
    if args.replot:
        with open(os.path.join(args.replot, "results.json")) as f:
            png = plot(json.load(f)["points"], os.path.join(args.replot, "accuracy_vs_params.png"))
        print(png or "no plot: matplotlib is not installed")
        return 0 if png else 1
    if args.seeds < 1 or args.workers < 1:
        print(f"error: --seeds and --workers must be >= 1, got {args.seeds} and {args.workers}", file=sys.stderr)
        return 2
    args.out = args.out or os.path.join("sweeps", datetime.now().strftime("%Y%m%d-%H%M%S"))
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.probe_lr:
        print(f"error: {args.out}: sweep folder exists and is not empty; pass another --out", file=sys.stderr)
        return 2
    if args.probe_lr:
        return probe_lr(args)

    points, seeds = all_points(), list(range(args.seeds))
    if args.quick:
        points, seeds = [points[1], points[len(SIZES) + 1]], [0]  # TinyLoRA 13 by GRPO and by own-style SFT
        args.extra = ["--steps", "2", "--prompts-per-step", "4", "--eval-limit", "16", *args.extra]
    jobs = []
    for seed in seeds:
        for p in points:
            run_dir = os.path.join(args.out, "runs", f"{p.name}-s{seed}")
            jobs.append(((p.name, seed), ["--out", run_dir, "--seed", str(seed), *p.argv(LRS[p.lr_from]), *args.extra],
                         run_dir))
    print(f"sweep: {len(points)} points x {len(seeds)} seeds = {len(jobs)} train.py runs, {args.workers} at a time, "
          f"into {args.out}", flush=True)
    t0 = time.time()
    codes = run_all(jobs, args.workers)
    rows = summarize(points, seeds, args.out)
    result = {"command": "python " + " ".join(["sweep.py", *(sys.argv[1:] if argv is None else argv)]),
              "git_commit": git_commit(), "seeds": seeds, "workers": args.workers, "wall_seconds": time.time() - t0,
              "date": datetime.now().isoformat(timespec="seconds"), "lrs": LRS, "extra_flags": args.extra,
              "points": rows, "failed_runs": [f"{name}-s{seed}" for (name, seed), c in codes.items() if c != 0]}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    md = table(rows)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(f"Command: `{result['command']}` (git {result['git_commit']}, {result['date']}, "
                f"{result['wall_seconds'] / 60:.1f} min with {args.workers} workers)\n\n" + md)
    png = plot(rows, os.path.join(args.out, "accuracy_vs_params.png"))
    print(md)
    print(f"results: {args.out}/results.md, results.json"
          + (", accuracy_vs_params.png" if png else " (no plot: matplotlib is not installed)"))
    return 1 if result["failed_runs"] else 0


if __name__ == "__main__":
    sys.exit(main())
