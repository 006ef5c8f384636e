"""Train a TinyLoRA adapter with GRPO (or SFT, the paper's baseline) and evaluate it.

    python train.py                       the embedded default: the project's toy base model
                                          (toy/, see docs/toy.md) and 13 trained parameters
    python train.py --model DIR --train-data TRAIN.jsonl --eval-data TEST.jsonl --preset gsm8k-paper
                                          a real Qwen2.5 checkpoint on GSM8K, on one GPU
    python train.py --eval-only --model DIR --eval-data TEST.jsonl [--adapter FILE]
                                          accuracy of a model, with or without an adapter

One GRPO step (grpo.py has the pieces, docs/grpo.md the equations):

    prompts  <- the next `prompts_per_step` problems (a fixed shuffle per epoch)
    rollout  <- G samples per prompt with the adapter folded into the weights
    rewards  <- 1 if the last `#### N` of the completion equals the answer, else 0
    update   <- group advantages, clipped policy loss through the low-rank path, optimizer step(s)

A run folder (`--out`, default runs/<date-time>) receives: args.json (every setting, the command
and each resume's), metrics.jsonl (one line per step), samples.jsonl (GRPO: the first
SAMPLES_PER_STEP completions of every step with their answer and reward), eval_before_greedy.jsonl,
eval_before_sampled.jsonl, eval_after_greedy.jsonl, eval_after_sampled.jsonl (every evaluation
completion: `completion_record`), checkpoint.safetensors (adapter + optimizer + step, written
atomically every `--save-every` steps and on Ctrl-C), adapter.safetensors (the trained vector and
the metadata to rebuild the rest), summary.json, and curves.png when matplotlib is installed.
`--resume` continues a run from its checkpoint with the settings in its args.json; on a CPU with a
fixed seed, a killed and resumed run ends with the same adapter and the same logs as an
uninterrupted one. `--eval-only` writes eval_base_*.jsonl (eval_adapter_*.jsonl with --adapter) and
summary.json to its own folder (default runs/<date-time>-eval).

What a user sees besides the step lines: the answer formats the base model writes (`#### N`,
`\\boxed{}`, neither) next to its accuracy, with a warning when the reward's format is rare; a
warning when NO_SIGNAL_STEPS steps in a row gave every sample of every problem the same reward (no
gradient: usually a reward that cannot read the model's answers); and, in any phase that runs past
PROGRESS_AFTER seconds, a progress line (`Progress`).

    torchrun --standalone --nproc_per_node=N train.py ...
                                          the same run on N GPUs (data-parallel; docs/scaling.md):
                                          each process samples and scores its share of every step's
                                          prompts, the adapter's gradient is summed over the processes,
                                          rank 0 alone prints and writes the run folder

A run folder belongs to one process while it runs (an fcntl.flock on `.lock` in it; under torchrun,
rank 0's): a second train.py on it is refused. A new run needs an empty or absent --out (two runs
started in the same second get runs/<date-time> and runs/<date-time>-2); --overwrite starts a new
run in a folder holding only a run's files (the old ones are removed when the new run writes its
first), and refuses a folder holding anything else. args.json and the checkpoint carry a run id
that --resume checks; --resume may change only the flags of RESUMABLE (--steps, where and how
fast it runs) and refuses any other flag that differs from args.json.

Bad input (a broken model folder, a malformed data line, impossible or ignored flags, a value in a
file that is not finite or out of range, an adapter for another model, a missing path or device)
stops with one line on stderr naming the flag or file and exit code 2, before anything is written
and before the model loads where the check allows it. A failed write (a full disk) is one line and
exit code 1. Ctrl-C anywhere ends with one line saying whether the folder can be resumed (exit code
130); during a step the run first finishes the step and saves a checkpoint, a second Ctrl-C stops
at once.
"""

import argparse
import contextlib
import fcntl
import fnmatch
import glob
import itertools
import json
import math
import os
import signal
import sys
import time
import uuid
from datetime import datetime


def interrupted_while_starting(*_):
    print("interrupted before the run began; nothing was written", file=sys.stderr)
    sys.exit(130)


if __name__ == "__main__":  # a Ctrl-C while torch is imported (seconds): one line, not a traceback
    signal.signal(signal.SIGINT, interrupted_while_starting)

import numpy as np  # noqa: E402 (after the handler above)
import torch
import torch.distributed as dist
from safetensors import SafetensorError

import data
import grpo
import model as M
import tinylora

ROOT = os.path.dirname(os.path.abspath(__file__))

# --------------------------------------------------------------------------------------------
# Settings: every flag, its default, and the presets that change the defaults


PRESETS = {
    # The embedded default: the toy base model the project ships (python toy.py rebuilds it).
    # 13 parameters = one vector of u = 13 shared by all 14 modules of the 2-layer model: with 14
    # modules, ceil(14 / n_tie) groups of u = 1 never make 13. One thread: for a model this small it
    # is much faster than two. Measured result: docs/results.md.
    "toy": dict(model=os.path.join(ROOT, "toy/base"), train_data=os.path.join(ROOT, "toy/data/train.jsonl"),
                eval_data=os.path.join(ROOT, "toy/data/eval.jsonl"), system="", method="tinylora", u=13,
                n_tie="all", lr=1e-2, steps=60, prompts_per_step=16, samples=8, max_new_tokens=48,
                clip_high=0.2, tis_cap=0.0, mini_batches=1, micro_batch=128, threads=1, dtype="float32",
                eval_limit=500, eval_batch=250, warmup=0.0, weight_decay=0.0, max_grad_norm=0.0),
    # The paper's GSM8K runs with the authors' script settings (docs/reproducing.md).
    "gsm8k-paper": dict(system=None, method="tinylora", u=1, n_tie=16, lr=2e-3, epochs=3, prompts_per_step=64,
                        samples=4, max_new_tokens=4096, clip_high=0.4, tis_cap=2.0, mini_batches=2,
                        micro_batch=8, dtype="bfloat16", weight_decay=0.01, warmup=0.05, kl_beta=0.0,
                        eval_batch=64, max_grad_norm=1.0, reward="paper"),
}

DECODINGS = {"greedy": ("greedy",), "sampled": ("sampled",), "both": ("greedy", "sampled")}  # --eval-decoding

DEFAULTS = dict(  # used when neither the command line nor the preset sets a value
    out=None, adapter=None, model=None, train_data=None, eval_data=None, system=None, instruction=data.DEFAULT_INSTRUCTION,
    algo="grpo", method="tinylora", r=2, u=1, n_tie="1", tiling="tiled", proj_seed=0, scale=1.0,
    svd="randomized", lr=1e-3, steps=0, epochs=1, prompts_per_step=16, samples=4, max_new_tokens=512,
    temperature=1.0, top_p=1.0, clip_low=0.2, clip_high=0.2, tis_cap=0.0, kl_beta=0.0, agg="token-mean",
    adv_scale="std", reward="strict", mini_batches=1, micro_batch=8, weight_decay=0.0, warmup=0.0, max_grad_norm=1.0,
    sft_field="answer", dtype=None, device=None, threads=0, seed=0, eval_limit=0, eval_batch=64,
    eval_temperature=1.0, eval_decoding="both", save_every=10, adapter_dtype="float32", keep_probs=False,
    svd_cache=tinylora.DEFAULT_CACHE_DIR, resume=False, overwrite=False, eval_only=False,
)
# what --resume may change (the rest would make the resumed run another run); --steps and --epochs
# may extend or shorten it, the others change where and how fast it runs, not what it computes
RESUMABLE = ("steps", "epochs", "save_every", "device", "threads", "micro_batch", "eval_batch", "keep_probs", "svd_cache")
SESSION_ONLY = ("resume", "overwrite", "explicit", "from_preset")  # settings of one invocation, not saved in args.json
GRPO_ONLY = ("samples", "temperature", "top_p", "clip_low", "clip_high", "tis_cap", "kl_beta", "agg", "adv_scale",
             "reward", "mini_batches")
TRAINING_ONLY = ("train_data", "algo", "sft_field", "lr", "steps", "epochs", "prompts_per_step", "weight_decay", "warmup",
                 "max_grad_norm", "save_every", "micro_batch", "keep_probs", "method", "r", "u", "n_tie", "tiling",
                 "proj_seed", "scale", "svd", "adapter_dtype", *GRPO_ONLY)


METHOD_FLAGS = {"r": ("tinylora", "lora-xs", "lora"), "scale": ("tinylora", "lora-xs", "lora"),  # the methods using
                "svd": ("tinylora", "lora-xs"), "tiling": ("tinylora", "lora-xs"), "proj_seed": ("tinylora", "lora")}  # them
MAX_SCALE = 1e4  # --scale beyond this swamps any weight (the authors' alpha / r is 16)


def flag(name):
    """The command-line flag of a setting: n_tie -> --n-tie."""
    return "--" + name.replace("_", "-")


class Parser(argparse.ArgumentParser):
    """argparse, with a mistake reported as one line (not the whole usage) and exit code 2."""

    def error(self, message):
        self.exit(2, f"error: {message}; python train.py --help lists every flag\n")


def build_parser():
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Flags left unset take the preset's value, then the default shown.")
    a = p.add_argument
    a("--preset", choices=sorted(PRESETS), help="settings bundle; default: 'toy' without --model, else none")
    a("--out", help="run folder (default runs/<date-time>); an existing non-empty one needs --resume or --overwrite")
    a("--resume", action="store_true", default=None, help="continue the run in --out from its checkpoint, with its "
      f"saved settings; of these only {', '.join(flag(k) for k in RESUMABLE)} may be changed")
    a("--overwrite", action="store_true", default=None, help="start a new run in an existing --out: the old run's "
      "files are removed (a folder holding other files is refused)")
    a("--eval-only", action="store_true", default=None, help="only evaluate --model (+ --adapter) on --eval-data, then exit")
    a("--adapter", help="adapter file to evaluate with --eval-only (to continue training a run: --resume)")

    g = p.add_argument_group("model and data")
    g.add_argument("--model", help="Hugging Face folder of a Qwen2/Qwen2.5, Llama 3.x or Qwen3 checkpoint (default: toy/base)")
    g.add_argument("--train-data", help="training jsonl: {'question', 'answer'} per line (GSM8K or \\boxed{})")
    g.add_argument("--eval-data", help="held-out jsonl in the same format")
    g.add_argument("--system", help="system prompt (default: the family's: Qwen2.5's own, none for Llama 3 and "
                   "Qwen3; the toy preset uses '')")
    g.add_argument("--instruction", help=f"appended to each question (default: {DEFAULTS['instruction']!r})")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], help="weight dtype (default: the checkpoint's)")
    g.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available; under torchrun each process takes GPU LOCAL_RANK)")
    g.add_argument("--threads", type=int, help="CPU threads for torch (0 = torch's default)")

    g = p.add_argument_group("adapter (tinylora.py, docs/method.md)")
    g.add_argument("--method", choices=tinylora.METHODS, help="tinylora | lora-xs | lora | full")
    g.add_argument("--r", type=int, help="rank of the frozen SVD subspace (LoRA: the LoRA rank)")
    g.add_argument("--u", type=int, help="TinyLoRA: trainable numbers per tie group")
    g.add_argument("--n-tie", help="modules sharing one trainable vector; 'all' = one vector for the whole model")
    g.add_argument("--tiling", choices=tinylora.TILINGS, help="tie neighbours in depth (tiled) or same-type modules (structured)")
    g.add_argument("--proj-seed", type=int, help="seed of the fixed random projections P")
    g.add_argument("--scale", type=float, help="multiplier on the adapter's update")
    g.add_argument("--svd", choices=["randomized", "exact"], help="truncated SVD method")
    g.add_argument("--adapter-dtype", choices=["float32", "bfloat16"], help="dtype of the saved adapter file")
    g.add_argument("--svd-cache", metavar="DIR", help=f"folder of the SVD factors' cache, 'none' for no cache "
                   f"(default {DEFAULTS['svd_cache']})")

    g = p.add_argument_group("training")
    g.add_argument("--algo", choices=["grpo", "sft"], help="GRPO (RL), or SFT on the reference solutions")
    g.add_argument("--sft-field", help="SFT: the jsonl field holding the demonstration (default 'answer')")
    g.add_argument("--lr", type=float, help="learning rate (AdamW)")
    g.add_argument("--steps", type=int, help="training steps (0 = --epochs passes over the training data)")
    g.add_argument("--epochs", type=int, help="passes over the training data when --steps is 0")
    g.add_argument("--prompts-per-step", type=int, help="problems per step (all processes together)")
    g.add_argument("--samples", type=int, help="GRPO: completions per problem (G)")
    g.add_argument("--max-new-tokens", type=int, help="completion budget per sample")
    g.add_argument("--temperature", type=float, help="rollout sampling temperature")
    g.add_argument("--top-p", type=float, help="rollout nucleus sampling")
    g.add_argument("--clip-low", type=float, help="PPO clip: ratio floor 1 - clip_low")
    g.add_argument("--clip-high", type=float, help="PPO clip: ratio ceiling 1 + clip_high")
    g.add_argument("--tis-cap", type=float, help="truncated importance-sampling cap (0 = off)")
    g.add_argument("--kl-beta", type=float, help="weight of the k3 KL to the base model (0 = off)")
    g.add_argument("--agg", choices=grpo.AGGREGATIONS, help="loss normalisation: token-mean (DAPO), seq-mean (GRPO), constant (Dr. GRPO)")
    g.add_argument("--reward", choices=sorted(data.EXTRACTORS), help="answer check of the reward (docs/grpo.md): strict "
                   "(lenient: last '#### N' read as a number), paper (the authors' verl rule: last '#### N' in the last "
                   "300 characters, compared as a string), flexible (last number) or boxed (last \\boxed{}, MATH)")
    g.add_argument("--adv-scale", choices=grpo.ADVANTAGE_SCALES, help="divide advantages by the group std, or not (Dr. GRPO)")
    g.add_argument("--mini-batches", type=int, help="optimizer steps per rollout batch")
    g.add_argument("--micro-batch", type=int, help="completions per forward/backward (memory; per process)")
    g.add_argument("--keep-probs", action="store_true", default=None,
                   help="keep the fp32 softmax of the completion tokens from forward to backward: one lm_head matmul "
                   "fewer in backward, for completion tokens x vocab x 4 bytes of memory per micro-batch")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay")
    g.add_argument("--warmup", type=float, help="fraction of steps with a linear learning-rate warm-up")
    g.add_argument("--max-grad-norm", type=float, help="gradient clipping (0 = off)")
    g.add_argument("--seed", type=int, help="data order and sampling seed")
    g.add_argument("--save-every", type=int, help="checkpoint every N steps (0 = only at the end and on Ctrl-C)")

    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-limit", type=int, help="evaluate on the first N problems (0 = all)")
    g.add_argument("--eval-batch", type=int, help="prompts per evaluation batch (per process)")
    g.add_argument("--eval-temperature", type=float, help="temperature of the sampled evaluation")
    g.add_argument("--eval-decoding", choices=sorted(DECODINGS), help="evaluate with greedy decoding, sampled "
                   "(--eval-temperature), or both (default)")

    return p


def parse_args(argv=None):
    """The settings of this invocation: the command line, then the preset, then DEFAULTS. A preset's
    method-specific values (u, n_tie) give way when --method names a method that has none.
    `explicit` lists the flags given on the command line; `from_preset` those the preset set."""
    args = build_parser().parse_args(argv)
    preset = args.preset or ("toy" if args.model is None else None)
    explicit = {k: v for k, v in vars(args).items() if v is not None}
    from_preset = {k: v for k, v in PRESETS.get(preset, {}).items() if k not in explicit}
    method = explicit.get("method", from_preset.get("method", DEFAULTS["method"]))
    if method != "tinylora":
        from_preset.pop("u", None)  # only tinylora has a v of length u
    if method in ("lora", "full"):
        from_preset.pop("n_tie", None)  # nothing to tie
    settings = {**DEFAULTS, **from_preset, **explicit, "preset": preset}
    return argparse.Namespace(**settings, explicit=sorted(explicit), from_preset=sorted(from_preset))


class UsageError(Exception):
    """Bad input: reported as one line, exit code 2, nothing written."""


def named(s, name):
    """A setting as an error message names it: the flag, with the preset when the preset set it."""
    preset = f" (set by --preset {s.preset})" if name in s.from_preset else ""
    return f"{flag(name)} {getattr(s, name)}{preset}"


def check_settings(s):
    """Every check of the settings alone (no file read): impossible values, and flags that would
    be ignored or meaningless in this mode. Raises UsageError naming the flag."""
    for name in ("r", "u", "prompts_per_step", "samples", "max_new_tokens", "mini_batches", "micro_batch", "eval_batch"):
        if getattr(s, name) < 1:
            raise UsageError(f"{flag(name)} must be >= 1, got {getattr(s, name)}")
    for name in ("lr", "temperature", "clip_low", "clip_high", "tis_cap", "kl_beta", "weight_decay", "warmup",
                 "max_grad_norm", "steps", "epochs", "eval_limit", "save_every", "threads", "eval_temperature", "seed",
                 "proj_seed"):
        value = getattr(s, name)
        if not math.isfinite(value) or value < 0:
            raise UsageError(f"{flag(name)} must be a finite number >= 0, got {value}")
    if not abs(s.scale) <= MAX_SCALE:
        raise UsageError(f"--scale must be a number within +-{MAX_SCALE:g}, got {s.scale}: an update that large "
                         "swamps the weights (and overflows float32)")
    if not 0 < s.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {s.top_p}")
    if s.warmup >= 1:
        raise UsageError(f"--warmup is a fraction of the steps and must be < 1, got {s.warmup}")
    if str(s.n_tie) != "all" and not (str(s.n_tie).isdigit() and int(s.n_tie) >= 1):
        raise UsageError(f"--n-tie must be a positive integer or 'all', got {s.n_tie!r}")
    if s.eval_temperature == 0 and s.eval_decoding != "greedy":
        raise UsageError("--eval-temperature 0 makes the sampled evaluation a second greedy one; use --eval-decoding "
                         "greedy, or a temperature > 0")
    if "eval_temperature" in s.explicit and s.eval_decoding == "greedy":
        raise UsageError(f"--eval-temperature is unused with {named(s, 'eval_decoding')}; remove it, or use "
                         "--eval-decoding sampled or both")
    if s.model is None:
        raise UsageError(f"--model is required with --preset {s.preset}: give a Hugging Face checkpoint folder (only "
                         "the toy preset brings its own model)")
    for name in ("eval_data",) + (() if s.eval_only else ("train_data",)):
        if getattr(s, name) is None:
            raise UsageError(f"{flag(name)} is required with --model (only the toy preset brings its own data)")
    if s.svd_cache != "none" and os.path.exists(s.svd_cache) and not os.path.isdir(s.svd_cache):
        raise UsageError(f"--svd-cache {s.svd_cache}: exists and is not a folder; name a folder, or 'none' for no cache")
    if s.eval_only:
        unused = [name for name in s.explicit if name in TRAINING_ONLY]
        if unused:
            raise UsageError(f"{flag(unused[0])} is a training setting, unused by --eval-only; remove it")
    else:
        check_training_settings(s)


def check_training_settings(s):
    """The checks of a training run's settings, including the adapter's (tinylora.TinyLoRAConfig)."""
    if s.adapter is not None:
        raise UsageError(f"--adapter {s.adapter}: only --eval-only reads an adapter; a training run starts from zero "
                         "(to continue a run: --resume --out RUN)")
    if s.steps == 0 and s.epochs == 0:
        raise UsageError("--steps 0 and --epochs 0 train nothing: give --steps N or --epochs N (N >= 1)")
    if s.steps and "epochs" in s.explicit:
        raise UsageError(f"--epochs is used only when --steps is 0, and {named(s, 'steps')}; give one of the two")
    if s.clip_low >= 1:
        raise UsageError(f"--clip-low {s.clip_low}: the ratio floor 1 - clip_low must be > 0; use a value below 1")
    unused = [name for name in s.explicit if name in (GRPO_ONLY if s.algo == "sft" else ("sft_field",))]
    if unused:
        raise UsageError(f"{flag(unused[0])} is a setting of --algo {'grpo' if s.algo == 'sft' else 'sft'}, "
                         f"unused with --algo {s.algo}; remove it")
    if s.algo == "grpo":
        if s.samples < 2:
            raise UsageError("--samples must be >= 2 for GRPO: advantages compare the samples of a prompt")
        if s.temperature == 0:
            raise UsageError("--temperature 0 makes the samples of a prompt identical: every GRPO advantage would be 0; "
                             "use a temperature > 0 (1.0 is the default)")
        if s.prompts_per_step % s.mini_batches:
            raise UsageError(f"{named(s, 'prompts_per_step')} must be a multiple of {named(s, 'mini_batches')}: "
                             "each optimizer step takes an equal share of the prompts")
    parts = s.mini_batches if s.algo == "grpo" else 1
    if world_size() > 1 and s.prompts_per_step % (world_size() * parts):
        raise UsageError(f"--prompts-per-step {s.prompts_per_step} must be a multiple of {world_size() * parts} "
                         f"({world_size()} processes x {parts} mini-batches): each process takes the same number of "
                         "prompts, with all their samples, from every mini-batch")
    if s.kl_beta > 0 and s.method == "full":
        raise UsageError("--kl-beta needs an adapter to switch off for the reference policy; not with --method full")
    unused = [name for name, methods in METHOD_FLAGS.items() if name in s.explicit and s.method not in methods]
    if unused:
        raise UsageError(f"{flag(unused[0])} is unused by --method {s.method} (it applies to "
                         f"{', '.join(METHOD_FLAGS[unused[0]])}); remove it")
    names = {"r": "r", "u": "u", "n_tie": "n_tie", "tiling": "tiling", "seed": "proj_seed", "scale": "scale", "svd": "svd"}
    try:
        tinylora.TinyLoRAConfig(method=s.method, r=s.r, u=s.u, n_tie=1 if str(s.n_tie) == "all" else int(s.n_tie),
                                tiling=s.tiling, seed=s.proj_seed, scale=s.scale, svd=s.svd)
    except ValueError as e:
        key = str(e).split(".", 1)[1].split("=", 1)[0]  # "TinyLoRAConfig.u=13: ..." -> u
        raise UsageError(f"{named(s, names[key])}: {str(e).split(': ', 1)[1]}") from None


# --------------------------------------------------------------------------------------------
# Data parallelism: `torchrun --nproc_per_node=N train.py ...` starts N copies of this script and
# tells each its place (environment variables WORLD_SIZE, RANK, LOCAL_RANK). Every copy holds the
# whole frozen model; the adapter's gradient (a few numbers) is summed over the copies, so all take
# the same optimizer step. Without torchrun: one process, and every function here is a no-op.


def world_size():
    return int(os.environ.get("WORLD_SIZE", 1))


def rank():
    return int(os.environ.get("RANK", 0))


def local_rank():
    """The process's place on its own machine: which GPU it takes."""
    return int(os.environ.get("LOCAL_RANK", 0))


def join_processes(s):
    """Under torchrun, join the other processes: through NCCL between GPUs (process LOCAL_RANK has
    GPU LOCAL_RANK, see `build`), through gloo between CPU processes. Only rank 0 prints: the
    others' stdout is discarded. Called after the model is loaded, on purpose: building the first
    meta-device model (model.load_model) imports torch._dynamo, which in torch 2.13 keeps references
    to a process group existing at that moment; destroy_process_group then leaves its gloo threads
    running, and one of them can abort the interpreter's exit."""
    if world_size() == 1:
        return
    cuda = torch.device(s.device).type == "cuda"
    if cuda:
        torch.cuda.set_device(s.device)
    dist.init_process_group("nccl" if cuda else "gloo")
    if rank() > 0:
        sys.stdout = open(os.devnull, "w")


def sum_over_processes(x):
    """x summed over the processes (x itself in a single process): a tensor in place, a number
    or a list of numbers as float(s)."""
    if world_size() == 1:
        return x
    if torch.is_tensor(x):
        dist.all_reduce(x)
        return x
    total = torch.tensor(x, dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(total)
    return total.tolist()


def gather_lists(items):
    """The lists of all processes joined in rank order (`items` itself in a single process)."""
    if world_size() == 1:
        return items
    parts = [None] * world_size()
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def my_share(items, mini_batches):
    """This process's share of a step's batch cut into `mini_batches` equal consecutive chunks:
    the rank-th 1/world of every chunk. Chunk m of all processes together is then
    chunk m of the whole batch, so every optimizer step sees the single process's mini-batch.
    8 prompts, 2 mini-batches, 2 processes: rank 0 takes prompts 0 1 | 4 5, rank 1 takes 2 3 | 6 7."""
    if world_size() == 1:
        return items
    assert len(items) % (mini_batches * world_size()) == 0, "build() checks --prompts-per-step"
    chunk = len(items) // mini_batches
    share = chunk // world_size()
    first = rank() * share
    return [x for c in range(0, len(items), chunk) for x in items[c + first:c + first + share]]


def first_on_each_machine(fn):
    """fn() in the first process of each machine, then in the others: the first computes the SVD
    factors and writes them to the on-disk cache (tinylora.svd_factors), the others read them."""
    if world_size() == 1:
        return fn()
    if local_rank() > 0:
        dist.barrier()
    result = fn()
    if local_rank() == 0:
        dist.barrier()
    return result


# --------------------------------------------------------------------------------------------
# Progress of the long phases

PROGRESS_AFTER = 5.0  # seconds a phase runs before it shows progress: the toy's phases (~1 s) stay quiet
PROGRESS_EVERY = {True: 1.0, False: 30.0}  # seconds between updates on a terminal (one line, redrawn), in a log


def clock(seconds):
    return f"{int(seconds) // 3600:02d}:{int(seconds) % 3600 // 60:02d}:{int(seconds) % 60:02d}"


class Progress:
    """Progress of a phase that can take minutes (evaluating 1,319 GSM8K problems with up to 4,096
    tokens each; one training step of a 7B model), on stdout: nothing for the first PROGRESS_AFTER
    seconds, then a line every PROGRESS_EVERY seconds, redrawn in place (\\r) on a terminal, a new
    line in a log. Tokens are counted by a forward hook on the final norm, which every pass runs:
    model.generate's prefill and each decoded position, and the training forward passes."""

    def __init__(self, net, label, total=None):
        self.label, self.total, self.done, self.tokens = label, total, 0, 0
        self.start, self.shown = time.monotonic(), -math.inf
        self.terminal = sys.stdout.isatty()
        self.drawn = False  # a line is on the terminal, to clear on exit
        self.hook = net.model.norm.register_forward_hook(self.counted)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.hook.remove()
        if self.drawn:
            print("\r\033[K", end="", flush=True)  # cleared: the phase's own result line follows

    def counted(self, norm, args, out):
        self.tokens += args[0].shape[0] * args[0].shape[1]  # x [B, T, D]
        self.show()

    def advance(self, n):
        """n more of the `total` problems done."""
        self.done += n
        self.show()

    def show(self):
        now = time.monotonic()
        if now - self.start < PROGRESS_AFTER or now - self.shown < PROGRESS_EVERY[self.terminal]:
            return
        self.shown, elapsed = now, now - self.start
        parts = [self.label] + ([f"{self.done}/{self.total} problems"] if self.total else [])
        parts.append(f"{self.tokens:,} tokens through the model, {self.tokens / elapsed:,.0f}/s")
        parts.append(f"ETA {clock(elapsed / self.done * (self.total - self.done))}" if self.total and self.done
                     else f"{clock(elapsed)} so far")
        if self.terminal:
            print("\r" + " | ".join(parts) + "\033[K", end="", flush=True)
            self.drawn = True
        else:
            print(" | ".join(parts), flush=True)


# --------------------------------------------------------------------------------------------
# Evaluation

FORMAT_WARNING = 0.05  # warn when fewer of the base model's completions have the reward's answer format


def sampling_seeds(seed, stream, first, count):
    """One sampling seed per prompt, a function of (run seed, stream, position) alone: stream 0 is
    the evaluation (position = problem index), stream k the k-th training step (position = index in
    the step's batch). So a completion does not depend on batching or on which process draws it."""
    return [int(np.random.SeedSequence([seed, stream, i]).generate_state(1)[0]) for i in range(first, first + count)]


def evaluate(net, tok, problems, s, adapter, decoding, label):
    """One completion per problem with the adapter folded in, greedy or sampled at
    --eval-temperature -> (accuracy dict, records); `label` names the phase in progress lines.
    Under torchrun each process answers a consecutive share of the problems and the records are
    gathered: every process returns all of them, in problem order."""
    temperature, seed = (0.0, 0) if decoding == "greedy" else (s.eval_temperature, s.seed)
    first, end = len(problems) * rank() // world_size(), len(problems) * (rank() + 1) // world_size()
    mine = problems[first:end]
    prompts = [data.make_prompt(tok, p.question, s.instruction, s.system) for p in mine]
    seeds = sampling_seeds(seed, 0, first, len(mine))
    records = []
    with Progress(net, label, len(mine)) as progress:
        for i in range(0, len(prompts), s.eval_batch):
            out = grpo.rollout(net, tok, prompts[i:i + s.eval_batch], 1, s.max_new_tokens, temperature, 1.0,
                               adapter=adapter, seeds=seeds[i:i + s.eval_batch])
            records += [completion_record(first + i + j, problem, text, decoding, temperature)
                        for j, (problem, text) in enumerate(zip(mine[i:i + s.eval_batch], out.texts))]
            progress.advance(len(out.texts))
    records = gather_lists(records)
    return accuracy(records), records


def completion_record(index, problem, text, decoding, temperature):
    """One line of eval_<name>_<decoding>.jsonl: the problem (`index`: its 0-based place among the
    problems of --eval-data, blank lines not counted), the completion, the answers the strict
    (`#### N`), flexible (last number), paper (the authors' rule, against `Problem.reference`) and
    boxed (`\\boxed{}`) checks read from it (None: none found), and whether the first three are right."""
    answer, flexible, paper = data.extract_strict(text), data.extract_flexible(text), data.extract_paper(text)
    return {"index": index, "decoding": decoding, "temperature": temperature, "question": problem.question,
            "completion": text, "target": problem.target, "answer": answer, "correct": answer == problem.target,
            "flexible_answer": flexible, "flexible_correct": flexible == problem.target,
            "paper_answer": paper, "paper_correct": paper is not None and paper == problem.reference,
            "boxed_answer": data.extract_boxed(text)}


def accuracy(records):
    """Strict, flexible and paper-rule accuracy of evaluation records, and the answer formats of
    their completions: the share with a `#### N`, with a `\\boxed{}` answer, with neither."""
    def share(test):
        return sum(map(test, records)) / len(records)
    return {"strict": share(lambda r: r["correct"]), "flexible": share(lambda r: r["flexible_correct"]),
            "paper": share(lambda r: r["paper_correct"]),
            "formats": {"####": share(lambda r: r["answer"] is not None),
                        "boxed": share(lambda r: r["boxed_answer"] is not None),
                        "neither": share(lambda r: r["answer"] is None and r["boxed_answer"] is None)}}


def evaluation(net, tok, problems, s, adapter, name):
    """Evaluate with each decoding of --eval-decoding -> {decoding: accuracy dict}; rank 0 writes
    every completion to eval_<name>_<decoding>.jsonl in the run folder."""
    results = {}
    for decoding in DECODINGS[s.eval_decoding]:
        results[decoding], records = evaluate(net, tok, problems, s, adapter, decoding, label=f"eval_{name}_{decoding}")
        if rank() == 0:
            write_jsonl(os.path.join(s.out, f"eval_{name}_{decoding}.jsonl"), records)
    return results


def accuracy_line(name, acc, s):
    """Strict and flexible accuracy per decoding; with --reward paper also the paper rule's, the
    accuracy the paper reports (a before.json from an older run may lack it)."""
    label = {"greedy": "greedy", "sampled": f"sampled (T={s.eval_temperature:g})"}
    paper = s.reward == "paper" and all("paper" in a for a in acc.values())
    return f"{name:<7} " + " | ".join(f"{label[decoding]} strict {a['strict']:.3f} flexible {a['flexible']:.3f}"
                                      + (f" paper {a['paper']:.3f}" if paper else "") for decoding, a in acc.items())


def formats_line(acc):
    """How the completions write their answer, per decoding (a completion may have both formats)."""
    parts = [f"{decoding}: '#### N' {a['formats']['####']:.3f}, \\boxed{{}} {a['formats']['boxed']:.3f}, "
             f"neither {a['formats']['neither']:.3f}" for decoding, a in acc.items()]
    return "formats " + " | ".join(parts)


def format_warning(acc, s):
    """A warning when the base model rarely writes the answer format that the GRPO reward reads,
    else None (`flexible` reads any number: never)."""
    needs = {"strict": "####", "paper": "####", "boxed": "boxed"}.get(s.reward)
    if needs is None or s.algo != "grpo":
        return None
    share = max(a["formats"][needs] for a in acc.values())
    if share >= FORMAT_WARNING:
        return None
    written = {"####": "'#### N'", "boxed": "\\boxed{}"}[needs]
    return (f"warning: the base model wrote {written}, the answer format that --reward {s.reward} reads, in {share:.1%} "
            "of its completions: nearly every reward will be 0, and GRPO learns nothing from a group whose rewards are "
            f"equal. Read its completions in {os.path.join(s.out, 'eval_before_*.jsonl')}; then use a reward that reads "
            "them (--reward boxed for \\boxed{}, --reward flexible for the last number) or an --instruction the model "
            "follows (docs/reproducing.md, 'Answer formats')")


# --------------------------------------------------------------------------------------------
# Checkpoints: one safetensors file, written to a temp name and renamed (atomic on POSIX)


def save_checkpoint(path, adapter, optimizer, step, run_id=None):
    from safetensors.torch import save_file

    tensors = {f"adapter.{name}": t.detach().cpu().contiguous() for name, t in adapter.tensors.items()}
    optim = optimizer.state_dict()
    for index, state in optim["state"].items():
        for key, value in state.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value).cpu().contiguous()
    meta = {"step": str(step), "param_groups": json.dumps(optim["param_groups"]), "run_id": run_id or "",
            "sign_anchors": json.dumps(tinylora.sign_anchors(adapter) if getattr(adapter, "svd_reports", None) else [])}
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)


def read_checkpoint(path, run_id, total):
    """-> (step, tensors, sign anchors) of a checkpoint, checked: readable, of this run (its run id
    is args.json's), a step within the run's `total`, every value finite, anchors a list of
    [module, column, row]. Nothing is loaded into the model here."""
    restart = "remove it to restart the run from step 0, or start a new run"
    try:
        meta, tensors = tinylora.read_safetensors(path)
    except (OSError, SafetensorError) as e:
        raise UsageError(f"{path}: unreadable checkpoint (truncated or corrupt?): {e}; {restart}") from None
    if meta.get("run_id", "") != (run_id or ""):
        raise UsageError(f"{path}: belongs to another run (run id {meta.get('run_id') or 'none'}, args.json has "
                         f"{run_id or 'none'}); {restart}")
    step = meta.get("step", "")
    if not step.isdigit():
        raise UsageError(f"{path}: metadata 'step' is {step!r}, not a step number; {restart}")
    if int(step) > total:
        raise UsageError(f"{path}: saved at step {step}, past the run's {total} steps; resume with --steps {step} or more")
    for key, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise UsageError(f"{path}: tensor {key!r} has non-finite values (NaN or inf); {restart}")
    try:
        anchors = [(str(name), int(k), int(row)) for name, k, row in json.loads(meta.get("sign_anchors", "[]"))]
    except (TypeError, ValueError) as e:
        raise UsageError(f"{path}: metadata 'sign_anchors' is invalid ({e}); {restart}") from None
    return int(step), tensors, anchors


def restore_checkpoint(path, tensors, anchors, adapter, optimizer):
    """Put a checkpoint's tensors and sign anchors (read_checkpoint) into the adapter and the
    optimizer, after checking that each tensor has the name and shape they need. The optimizer
    keeps its own hyperparameters (the run's settings; the learning rate is set every step); the
    anchors give near-tied U columns their training-time sign (v keeps its meaning on a machine
    whose SVD flips one)."""
    params = optimizer.param_groups[0]["params"]
    expected = {f"adapter.{name}": tuple(t.shape) for name, t in adapter.tensors.items()}
    state = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            if not index.isdigit() or int(index) >= len(params) or name not in ("step", "exp_avg", "exp_avg_sq"):
                raise UsageError(f"{path}: unexpected tensor {key!r}; not a checkpoint of this run")
            expected[key] = () if name == "step" else tuple(params[int(index)].shape)
            state.setdefault(int(index), {})[name] = value
    for key in sorted(set(expected) | set(tensors)):
        found = tuple(tensors[key].shape) if key in tensors else "missing"
        if found != expected.get(key, "absent"):
            raise UsageError(f"{path}: tensor {key!r} is {found}, this run's adapter needs {expected.get(key, 'none')}")
    incomplete = [index for index, parts in state.items() if len(parts) != 3]
    if incomplete:
        raise UsageError(f"{path}: the optimizer state of parameter {incomplete[0]} lacks a tensor; not a checkpoint "
                         "of this run")
    for index, parts in state.items():  # AdamW's step count and its second moment
        step, second = parts["step"], parts["exp_avg_sq"]
        if step < 0 or step != step.round() or (second < 0).any():
            raise UsageError(f"{path}: optimizer state of parameter {index} is impossible (a negative or fractional "
                             "step, or a negative second moment); remove the checkpoint to restart from step 0")
    with torch.no_grad():
        for name, param in adapter.tensors.items():
            param.copy_(tensors[f"adapter.{name}"])
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    tinylora.apply_sign_anchors(adapter, anchors, path)


# --------------------------------------------------------------------------------------------
# The run

NO_SIGNAL_STEPS = 2  # GRPO steps in a row with equal rewards in every group before the no-signal warning
SAMPLES_PER_STEP = 2  # completions of every GRPO step kept in samples.jsonl


def session_command(argv):
    """This invocation as a command line, for args.json and summary.json."""
    launcher = "python" if world_size() == 1 else f"torchrun --nproc_per_node={world_size()}"
    return f"{launcher} train.py " + " ".join(argv)


def run_settings(s, command):
    """The settings of the run this invocation makes or continues, checked (check_settings): with
    --resume, the saved ones (args.json) with the flags of RESUMABLE given now, and `command` added
    to the run's resumes; else the command line's, with a new run id."""
    if not s.resume:
        s.command, s.resumes, s.run_id = command, [], uuid.uuid4().hex
        check_settings(s)
        return s
    if s.out is None:
        raise UsageError("--resume needs --out: the run folder to continue")
    for name in ("eval_only", "overwrite", "adapter"):
        if name in s.explicit:
            raise UsageError(f"--resume continues a training run with its own settings; not with {flag(name)}")
    saved = read_saved_settings(os.path.join(s.out, "args.json"))
    for name in s.explicit:
        if name in RESUMABLE:
            saved[name] = getattr(s, name)
        elif name not in ("resume", "out") and str(saved.get(name)) != str(getattr(s, name)):
            raise UsageError(f"{flag(name)} {getattr(s, name)}: the run in {s.out} has {saved.get(name)} (args.json); "
                             f"--resume may change only {', '.join(map(flag, RESUMABLE))}: start a new run "
                             "(another --out) to change the others")
    resumes = saved.pop("resumes", []) + [command]  # runs made before commands were saved have none
    explicit = [name for name in s.explicit if name in RESUMABLE]
    resumed = argparse.Namespace(**{**DEFAULTS, "command": None, "run_id": None, **saved, "resumes": resumes,
                                    "resume": True, "overwrite": False, "out": s.out, "explicit": explicit,
                                    "from_preset": []})  # DEFAULTS: settings newer than the run
    try:
        check_settings(resumed)
    except UsageError as e:
        raise UsageError(f"{os.path.join(s.out, 'args.json')} with this command: {e}") from None
    return resumed


def read_saved_settings(path):
    """args.json of a run, each value checked against the type and choices of its flag."""
    try:
        with open(path) as f:
            saved = json.load(f)
    except FileNotFoundError:
        raise UsageError(f"{path}: missing; --resume needs --out pointing at a run folder (with args.json)") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: unreadable ({e}); the run cannot be resumed, start a new one") from None
    if not isinstance(saved, dict):
        raise UsageError(f"{path}: expected a JSON object of settings; the run cannot be resumed, start a new one")
    actions = {a.dest: a for a in build_parser()._actions}
    for key, value in saved.items():
        if not saved_value_ok(key, value, actions.get(key)):
            raise UsageError(f"{path}: key {key!r} has an invalid value {value!r}; the run cannot be resumed, "
                             "start a new one")
    if saved.get("eval_only"):
        raise UsageError(f"{path}: an --eval-only folder; there is no training run to resume")
    return saved


def saved_value_ok(key, value, action):
    """Whether `value` is one a flag (or a bookkeeping key of args.json) can hold."""
    if key in ("command", "run_id"):
        return value is None or isinstance(value, str)
    if key == "resumes":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if key == "preset":
        return value is None or value in PRESETS
    if action is None:
        return False  # no such setting
    if action.nargs == 0:  # store_true
        return isinstance(value, bool)
    if value is None:
        return key in ("out", "adapter", "model", "train_data", "eval_data", "system", "dtype", "device")
    if action.choices is not None:
        return value in action.choices
    if action.type is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if action.type is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, str) or (key == "n_tie" and isinstance(value, int) and not isinstance(value, bool))


def check_inputs(s):
    """Every file and device the run needs, read or checked before the model loads (which can take
    minutes) -> (training problems or None, evaluation problems)."""
    check_device(s)
    if os.path.exists(s.model) and not os.path.isdir(s.model):
        raise UsageError(f"--model {s.model}: a file; give the Hugging Face checkpoint folder")
    config = M.read_config(s.model)  # a missing or broken config.json, in a second
    if s.max_new_tokens > config.max_position_embeddings:
        raise UsageError(f"--max-new-tokens {s.max_new_tokens}: longer than the model's whole context of "
                         f"{config.max_position_embeddings} tokens (max_position_embeddings in "
                         f"{os.path.join(s.model, 'config.json')}); give at most that, less the prompt")
    for name in ("train_data", "eval_data", "adapter"):
        path = getattr(s, name)
        if path is not None and not os.path.isfile(path):
            what = "a folder" if os.path.isdir(path) else "not a regular file" if os.path.exists(path) else "no such file"
            raise UsageError(f"{flag(name)} {path}: {what}; give a file")
    try:
        train = (data.load_problems(s.train_data, sft_field=s.sft_field if s.algo == "sft" else None)
                 if not s.eval_only else None)
        test = data.load_problems(s.eval_data)
    except OSError as e:
        raise UsageError(f"{e.filename}: cannot read ({e.strerror})") from None
    if s.eval_limit:
        test = test[:s.eval_limit]
    if not test:
        raise UsageError(f"{s.eval_data}: no problems to evaluate")
    if train is not None and len(train) < s.prompts_per_step:
        raise UsageError(f"{s.train_data}: {len(train)} problems, fewer than --prompts-per-step {s.prompts_per_step}")
    if train is not None and "warmup" in s.explicit and s.warmup and not int(s.warmup * total_steps(s, len(train))):
        raise UsageError(f"{named(s, 'warmup')} of {total_steps(s, len(train))} steps is no step of warm-up; use 0, "
                         "or a larger fraction")
    if s.svd_cache != "none":
        existing = s.svd_cache  # the folder, or its nearest existing parent, must be a writable folder
        while not os.path.exists(existing):
            existing = os.path.dirname(os.path.abspath(existing))
        if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
            raise UsageError(f"--svd-cache {s.svd_cache}: cannot be created or written ({existing} is not a writable "
                             "folder); name another folder, or 'none' for no cache")
    return train, test


def check_device(s):
    """--device: a device of this machine (under torchrun with CUDA: GPU LOCAL_RANK); sets s.device."""
    try:
        device = torch.device(s.device) if s.device else M.default_device()
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {s.device!r}: not a device; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {s.device}: only cpu and cuda are supported")
    if device.type == "cuda":
        if world_size() > 1:
            device = torch.device("cuda", local_rank())  # one GPU per process (on --resume too)
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise UsageError(f"--device {device}: this machine has {count} CUDA GPU(s); use --device cpu"
                             + (f" (or --device cuda:N with N < {count})" if count else ""))
    s.device = str(device)


RUN_FILES = ("args.json", "before.json", "metrics.jsonl", "samples.jsonl", "checkpoint.safetensors",
             "adapter.safetensors", "summary.json", "curves.png", "eval_*.jsonl")
LOCK_FILE = ".lock"  # exists while a process owns the run folder, which holds its fcntl.flock; holds its pid


def is_run_file(name):
    """A file train.py writes in a run folder (or its temp name, or the lock)."""
    name = name[:-len(".tmp")] if name.endswith(".tmp") else name
    return name == LOCK_FILE or any(fnmatch.fnmatch(name, pattern) for pattern in RUN_FILES)


class RunFolder:
    """The run folder (--out), owned by one process for its lifetime: rank 0 holds an exclusive
    fcntl.flock on LOCK_FILE in it; a second train.py on the same folder is refused. A new run
    needs an empty or absent folder (the default, runs/<date-time>, gets a -2, -3, ... suffix when
    taken); --overwrite empties one that holds only a run's files (RUN_FILES), when the new run
    writes its first file; anything else in it is refused. Until `start`, nothing of the run is
    written: `release` then also removes a folder that claiming made."""

    def __init__(self, s):
        self.s, self.fd, self.made_folder, self.started = s, None, False, False
        if rank() == 0:  # under torchrun the other processes only read
            self.claim()
        elif s.out is None:
            s.out = self.default_name()  # for messages: rank 0 alone picks and writes the folder

    def claim(self):
        s = self.s
        if s.out is None:
            self.make_default_folder()
        else:
            if os.path.lexists(s.out) and not os.path.isdir(s.out):
                raise UsageError(f"--out {s.out}: exists and is not a folder; choose another --out")
            self.made_folder = not os.path.lexists(s.out)
            try:
                os.makedirs(s.out, exist_ok=True)
            except OSError as e:
                raise UsageError(f"--out {s.out}: cannot create the run folder ({e.strerror}); choose another --out") from None
        if not os.access(s.out, os.W_OK | os.X_OK):
            raise UsageError(f"--out {s.out}: not writable; choose another --out")
        self.lock()
        try:
            self.check_contents()
        except UsageError:
            self.release()
            raise

    def default_name(self):
        return os.path.join("runs", datetime.now().strftime("%Y%m%d-%H%M%S") + ("-eval" if self.s.eval_only else ""))

    def make_default_folder(self):
        base = self.default_name()
        for i in itertools.count(1):
            name = base if i == 1 else f"{base}-{i}"
            try:
                os.makedirs(name)  # exclusive: two runs started in the same second get two folders
            except FileExistsError:
                continue
            except OSError as e:
                raise UsageError(f"{name}: cannot create the run folder ({e.strerror}); give --out") from None
            self.s.out, self.made_folder = name, True
            return

    def lock(self):
        """Take LOCK_FILE's flock, or refuse naming the pid holding it. The lock file goes with
        `release`, so a lock taken on a file that was removed meanwhile is taken again."""
        path = os.path.join(self.s.out, LOCK_FILE)
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise UsageError(f"{path}: cannot be opened as the run's lock file ({e.strerror}); remove it") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise UsageError(f"--out {self.s.out}: in use by another train.py (pid {owner}); wait for it to end, "
                                 "or choose another --out") from None
            if os.path.exists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
            os.close(fd)  # the owner removed the file between our open and our flock
        self.fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())

    def check_contents(self):
        s = self.s
        names = sorted(n for n in os.listdir(s.out) if n != LOCK_FILE)
        if s.resume:
            if not os.path.isfile(os.path.join(s.out, "args.json")):
                raise UsageError(f"--resume --out {s.out}: no args.json; not a run folder")
        elif names and not s.overwrite:
            raise UsageError(f"{s.out}: run folder exists and is not empty; pass --resume to continue it, "
                             "--overwrite to replace it, or another --out")
        elif names:
            foreign = [n for n in names if not is_run_file(n) or os.path.isdir(os.path.join(s.out, n))]
            if foreign:
                raise UsageError(f"--overwrite {s.out}: it holds {foreign[0]!r}, which is not a run's file; --overwrite "
                                 "removes only a run's own files: move it away, or choose another --out")

    def start(self):
        """Called before the run's first write: --overwrite removes the old run's files now."""
        if self.fd is not None and self.s.overwrite:
            for name in os.listdir(self.s.out):
                if name != LOCK_FILE and is_run_file(name):
                    os.remove(os.path.join(self.s.out, name))
        self.started = True

    def release(self):
        """Give the folder up (the lock file goes); before `start`, also remove a folder that claiming made."""
        if self.fd is None:
            return
        os.remove(os.path.join(self.s.out, LOCK_FILE))  # still locked: no one takes it meanwhile
        os.close(self.fd)
        self.fd = None
        if not self.started and self.made_folder and not os.listdir(self.s.out):
            os.rmdir(self.s.out)


def data_order(n, epoch, seed):
    """Problem indices for one epoch: a fixed shuffle per (seed, epoch)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()


def step_problems(problems, step, per_step, seed):
    """The problems of a global step: consecutive slices of per-epoch shuffles."""
    steps_per_epoch = max(len(problems) // per_step, 1)
    epoch, index = divmod(step, steps_per_epoch)
    order = data_order(len(problems), epoch, seed)
    return [problems[i] for i in order[index * per_step:(index + 1) * per_step]]


def total_steps(s, n_train):
    return s.steps if s.steps > 0 else s.epochs * max(n_train // s.prompts_per_step, 1)


def build(s):
    """Load the model and tokenizer (check_inputs has checked the rest)."""
    if s.threads:
        torch.set_num_threads(s.threads)
    size = sum(os.path.getsize(f) for f in glob.glob(os.path.join(s.model, "*.safetensors")))
    if size > 1e9 and rank() == 0:  # a real checkpoint: reading it takes a while
        print(f"loading {s.model} ({size / 1e9:.1f} GB) ...", flush=True)
    tok = M.load_tokenizer(s.model)  # seconds: a missing tokenizer.json is reported before the minutes of loading
    return M.load_model(s.model, s.dtype, s.device), tok


def make_adapter(net, s):
    """Attach the adapter the flags describe; --n-tie all = one group for every target module."""
    n_tie = len(tinylora.find_targets(net)) if str(s.n_tie) == "all" else int(s.n_tie)
    cfg = tinylora.TinyLoRAConfig(method=s.method, r=s.r, u=s.u, n_tie=n_tie, tiling=s.tiling, seed=s.proj_seed,
                                  scale=s.scale, svd=s.svd)
    try:
        tinylora.plan(net, cfg)  # the adapter's shapes on this model: "n_tie=99 is more than the 14 target modules"
    except ValueError as e:
        name = {"seed": "proj_seed"}.get(str(e).split("=", 1)[0], str(e).split("=", 1)[0])
        raise UsageError(f"{named(s, name)}: {e}" if name in DEFAULTS else str(e)) from None
    adapter, _ = first_on_each_machine(lambda: tinylora.attach(net, cfg, cache_dir=svd_cache(s), quiet=quiet_svd(net)))
    return adapter


def svd_cache(s):
    """--svd-cache as tinylora takes it: a folder, or None for no cache."""
    return None if s.svd_cache == "none" else s.svd_cache


def quiet_svd(net):
    """Whether tinylora keeps its SVD messages (progress every 2 s, summary, tied-values warning)
    to itself: in the processes that do not print, and for models under 10M parameters (the toy),
    whose SVD takes well under a second."""
    return rank() > 0 or sum(p.numel() for p in net.parameters()) < 10_000_000


def lr_at(step, total, s):
    """Linear warm-up over the first warmup * total steps, then constant."""
    warm = int(s.warmup * total)
    return s.lr * min(1.0, (step + 1) / warm) if warm else s.lr


def grpo_step(net, tok, adapter, optimizer, batch, s, step):
    """Rollout, rewards and update on this process's share of the step's batch -> (the step's
    metrics, summed over the processes: the numbers a single process would log; the first
    SAMPLES_PER_STEP completions of this process, for samples.jsonl: rank 0's are the batch's first)."""
    seeds = sampling_seeds(s.seed, step + 1, 0, len(batch))  # a prompt's samples depend on its place in the batch
    batch, seeds = my_share(batch, s.mini_batches), my_share(seeds, s.mini_batches)
    prompts = [data.make_prompt(tok, p.question, s.instruction, s.system) for p in batch]
    out = grpo.rollout(net, tok, prompts, s.samples, s.max_new_tokens, s.temperature, s.top_p, adapter=adapter,
                       seeds=seeds)
    targets = [p.target for p in batch for _ in range(s.samples)]
    scores = data.score(out.texts, targets)  # accuracy is always reported strict and flexible
    references = [data.reward_target(p, s.reward) for p in batch for _ in range(s.samples)]
    rewards = [data.reward(text, reference, s.reward) for text, reference in zip(out.texts, references)]
    cfg = grpo.GRPOConfig(num_samples=s.samples, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                          top_p=s.top_p, adv_scale=s.adv_scale, agg=s.agg, constant_norm=s.max_new_tokens,
                          clip_low=s.clip_low, clip_high=s.clip_high, tis_cap=s.tis_cap or None, kl_beta=s.kl_beta,
                          mini_batches=s.mini_batches, micro_batch_size=s.micro_batch,
                          max_grad_norm=s.max_grad_norm or None, keep_probs=s.keep_probs)
    stats = grpo.grpo_update(net, out, rewards, optimizer, cfg, adapter, sum_over_processes=sum_over_processes)
    tokens = float(out.lengths.sum())  # clip_frac and kl are means over this process's tokens
    reward, strict, flexible, tokens, clipped, kl, zero_adv = sum_over_processes(
        [sum(rewards), sum(scores.correct), sum(scores.flexible), tokens, stats.clip_frac * tokens, stats.kl * tokens,
         stats.zero_adv_groups * len(batch)])
    n = s.prompts_per_step * s.samples
    metrics = {"reward": reward / n, "acc_strict": strict / n, "acc_flexible": flexible / n, "length": tokens / n,
               "tokens": int(tokens), "clip_frac": clipped / tokens, "kl": kl / tokens,
               "zero_adv_groups": zero_adv / s.prompts_per_step, "grad_norm": stats.grad_norm, "loss": stats.loss}
    samples = [{"step": step + 1, "sample": i, "question": batch[i // s.samples].question, "completion": out.texts[i],
                "target": references[i], "answer": data.EXTRACTORS[s.reward](out.texts[i]), "reward": rewards[i]}
               for i in range(min(SAMPLES_PER_STEP, len(out.texts)))]
    return metrics, samples


def sft_step(net, tok, adapter, optimizer, batch, s):
    """Next-token loss on the demonstrations (prompt tokens excluded), token-mean, one optimizer step.
    Under torchrun each process takes its share of the batch; the token count, the gradient and the
    loss are summed over the processes. -> (metrics, []: SFT samples no completions)."""
    batch = my_share(batch, 1)
    prompts = [data.make_prompt(tok, p.question, s.instruction, s.system) for p in batch]
    targets = [tok.encode(p.demonstration) + [tok.end_ids[0]] for p in batch]
    lengths = torch.tensor([len(t) for t in targets])
    completions = torch.full((len(batch), int(lengths.max())), tok.pad_id, dtype=torch.long)
    for i, t in enumerate(targets):
        completions[i, :len(t)] = torch.tensor(t)
    completions, lengths = completions.to(s.device), lengths.to(s.device)
    optimizer.zero_grad(set_to_none=True)
    total = sum_over_processes(float(lengths.sum()))  # tokens in the whole batch
    loss_sum = 0.0
    for i in range(0, len(batch), s.micro_batch):
        rows = slice(i, i + s.micro_batch)
        logp = grpo.sequence_logprobs(net, prompts[rows], completions[rows], lengths[rows], keep_probs=s.keep_probs)
        loss = -logp.sum() / total
        loss.backward()
        loss_sum += loss.item()
    for p in adapter.parameters():
        p.grad = sum_over_processes(p.grad)
    loss_sum = sum_over_processes(loss_sum)
    grad_norm = grpo.clip_gradients(list(adapter.parameters()), s.max_grad_norm or None, loss_sum)
    optimizer.step()
    return {"loss": loss_sum, "tokens": int(total), "grad_norm": grad_norm}, []


def progress_line(step, total, m, elapsed, tokens_per_s, steps_this_session):
    eta = elapsed / steps_this_session * (total - step)  # a resumed run times only its own steps
    parts = [f"step {step}/{total}"]
    if "reward" in m:
        parts += [f"reward {m['reward']:.3f}", f"acc strict {m['acc_strict']:.3f} flexible {m['acc_flexible']:.3f}",
                  f"len {m['length']:.1f}", f"clip {m['clip_frac']:.3f}"]
    parts += [f"loss {m['loss']:.4f}", f"{tokens_per_s:,.0f} tok/s", f"ETA {clock(eta)}"]
    return " | ".join(parts)


def write_json(path, obj):
    """A JSON file, written to a temp name, flushed to disk and renamed: a kill leaves the old or the new."""
    write_file(path, json.dumps(obj, indent=2) + "\n")


def write_jsonl(path, rows):
    """One JSON object per line, written like write_json."""
    write_file(path, "".join(json.dumps(row) + "\n" for row in rows))


def write_file(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def append_jsonl(path, rows):
    """Lines added to a run log; a kill can cut the last one short, which read_log drops."""
    with open(path, "a") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def read_log(path, step):
    """The lines of a run log (metrics.jsonl, samples.jsonl) up to `step`: those of later steps were
    lost with the kill that ended the previous session, as is a last line the kill cut short.
    [] for a log the run did not keep."""
    if not os.path.isfile(path):
        return []
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    rows = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not (isinstance(row, dict) and type(row.get("step")) is int):
            if n == len(lines):
                continue  # the unterminated last line: a write cut short
            raise UsageError(f"{path}:{n}: not a line of the run's log; delete this line and resume again")
        if row["step"] <= step:
            rows.append(row)
    return rows


def read_before(path, s):
    """before.json as a resumed run finds it, or None when it is missing or not what evaluation
    writes (then the base model is evaluated again)."""
    try:
        with open(path) as f:
            before = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(before, dict) or set(before) != set(DECODINGS[s.eval_decoding]):
        return None
    for acc in before.values():
        if not (isinstance(acc, dict) and is_fraction(acc.get("strict")) and is_fraction(acc.get("flexible"))
                and is_fraction(acc.get("paper", 0.0))  # runs before the paper column have none
                and isinstance(acc.get("formats"), dict) and all(map(is_fraction, acc["formats"].values()))):
            return None
    return before


def is_fraction(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x <= 1


def plot_curves(run_dir, metrics):
    """curves.png (reward and accuracy per step) when matplotlib is installed; returns its path or None."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not metrics:
        return None
    steps = [m["step"] for m in metrics]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    curves = ((("reward", "mean reward"), ("acc_strict", "accuracy (strict)"), ("acc_flexible", "accuracy (flexible)"))
              if "reward" in metrics[0] else (("loss", "SFT loss (nats per token)"),))
    for key, label in curves:
        ax.plot(steps, [m[key] for m in metrics], label=label)
    ax.set_xlabel("step")
    ax.set_title(f"{os.path.basename(os.path.normpath(run_dir))}: training batches", fontsize=10)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(run_dir, "curves.png")
    fig.savefig(path + ".tmp", dpi=120, format="png")  # renamed, like every file of a run: a kill leaves no half image
    os.replace(path + ".tmp", path)
    plt.close(fig)
    return path


def train(s, folder, state, net, tok, train_set, test_set):
    """The training run, from the step of `state` (read_run_state) -> exit code."""
    adapter = make_adapter(net, s)
    processes = f" x {world_size()} processes" if world_size() > 1 else ""
    print(f"model {s.model} | {s.method} r={s.r} u={s.u} n_tie={s.n_tie} {s.tiling} | "
          f"trainable parameters: {adapter.num_trainable:,} | device {s.device}{processes}", flush=True)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    total = total_steps(s, len(train_set))
    writes = rank() == 0  # under torchrun rank 0 alone writes the run folder
    ckpt = os.path.join(s.out, "checkpoint.safetensors")
    start, before, metrics = begin_session(s, folder, state, net, tok, test_set, adapter, optimizer, total)

    interrupted = False

    def on_sigint(*_):  # the first Ctrl-C: finish the step, save, exit cleanly; the second: stop now
        nonlocal interrupted
        if interrupted:
            raise KeyboardInterrupt
        interrupted = True
        if writes:
            print("Ctrl-C: stopping after this step with a checkpoint (Ctrl-C again to stop at once)",
                  file=sys.stderr, flush=True)
    previous = signal.signal(signal.SIGINT, on_sigint)
    t0, tokens_seen, flat = time.time(), 0, 0  # flat: steps in a row without a learning signal
    try:
        for step in range(start, total):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, s)
            batch = step_problems(train_set, step, s.prompts_per_step, s.seed)
            try:
                with Progress(net, f"step {step + 1}/{total}"):
                    if s.algo == "grpo":
                        m, samples = grpo_step(net, tok, adapter, optimizer, batch, s, step)
                    else:
                        m, samples = sft_step(net, tok, adapter, optimizer, batch, s)
            except grpo.NonFiniteError as e:  # the loss and gradient are summed: every process stops here
                path = os.path.join(s.out, "adapter.safetensors")
                if writes:
                    tinylora.save_adapter(adapter, path, tinylora.DTYPES[s.adapter_dtype])
                    print(f"error: {e} at step {step + 1}; stopped. The last good adapter is {path}; "
                          "lower --lr or check the data", file=sys.stderr)
                return 1
            m = {"step": step + 1, **m, "lr": optimizer.param_groups[0]["lr"], "time": time.time() - t0}
            metrics.append(m)
            if writes:
                append_jsonl(os.path.join(s.out, "metrics.jsonl"), [m])
                if samples:  # GRPO
                    append_jsonl(os.path.join(s.out, "samples.jsonl"), samples)
            tokens_seen += m["tokens"]
            elapsed = time.time() - t0
            print(progress_line(step + 1, total, m, elapsed, tokens_seen / elapsed, step + 1 - start), flush=True)
            flat = flat + 1 if m.get("zero_adv_groups") == 1.0 else 0
            if flat == NO_SIGNAL_STEPS and writes:
                print(no_signal_warning(s, step + 1, m, samples[0]), file=sys.stderr, flush=True)
            stop = sum_over_processes(int(interrupted)) > 0  # torchrun: all stop at the same step
            if writes and ((s.save_every and (step + 1) % s.save_every == 0) or stop):
                save_checkpoint(ckpt, adapter, optimizer, step + 1, s.run_id)
            if stop:
                print(f"interrupted: checkpoint saved at step {step + 1}; continue with "
                      f"python train.py --resume --out {s.out}", flush=True)
                return 130
    finally:
        signal.signal(signal.SIGINT, previous)

    adapter_path = os.path.join(s.out, "adapter.safetensors")
    if writes:
        save_checkpoint(ckpt, adapter, optimizer, total, s.run_id)
        tinylora.save_adapter(adapter, adapter_path, tinylora.DTYPES[s.adapter_dtype])
    print(f"evaluating the trained adapter on {len(test_set)} held-out problems ...", flush=True)
    after = evaluation(net, tok, test_set, s, adapter, "after")
    if writes:
        report(s, adapter, adapter_path, total, before, after, metrics)
    return 0


def log_names(s):
    return ["metrics.jsonl"] + (["samples.jsonl"] if s.algo == "grpo" else [])  # SFT samples nothing


def read_run_state(s, n_train):
    """What a resumed run continues from, read and checked before the model loads -> (the
    checkpoint's step and [tensors, sign anchors], (0, None) without one: stopped before its first;
    each log's lines up to that step; before.json, None when missing or damaged). A new run:
    (0, None, {}, None)."""
    if not s.resume:
        return 0, None, {}, None
    start, checkpoint = 0, None
    ckpt = os.path.join(s.out, "checkpoint.safetensors")
    if os.path.exists(ckpt):
        start, *checkpoint = read_checkpoint(ckpt, s.run_id, total_steps(s, n_train))  # [tensors, anchors]
    logs = {name: read_log(os.path.join(s.out, name), start) for name in log_names(s)}
    return start, checkpoint, logs, read_before(os.path.join(s.out, "before.json"), s)


def begin_session(s, folder, state, net, tok, test_set, adapter, optimizer, total):
    """-> (first step, the base model's accuracy, the metrics so far). Restores the checkpoint of
    `state` (read_run_state); writes args.json (on a resume: with this session's command added),
    and metrics.jsonl and samples.jsonl as they stand at the first step: a resumed run drops the
    lines of steps after its checkpoint, lost with the kill and run again. A new run then evaluates
    the base model, as does a resumed one whose before.json is missing or damaged."""
    start, checkpoint, kept, before = state
    ckpt = os.path.join(s.out, "checkpoint.safetensors")
    if checkpoint is not None:  # rank-independent: any process count resumes it
        restore_checkpoint(ckpt, *checkpoint, adapter, optimizer)
    check_outputs(net, tok, adapter, ckpt if checkpoint is not None else s.model)
    if world_size() > 1:
        dist.barrier()  # every process has read the run folder before rank 0 rewrites it
    folder.start()
    if rank() == 0:
        write_json(os.path.join(s.out, "args.json"), {k: v for k, v in vars(s).items() if k not in SESSION_ONLY})
        for name in log_names(s):
            write_jsonl(os.path.join(s.out, name), kept.get(name, []))
    if s.resume:
        print(f"resumed {s.out} at step {start}/{total}", flush=True)
    if before is None:
        if s.resume:
            print(f"{os.path.join(s.out, 'before.json')}: missing or damaged; evaluating the base model again", flush=True)
        before = evaluate_base_model(s, net, tok, test_set, None if start else adapter)
    return start, before, kept.get("metrics.jsonl", [])


def evaluate_base_model(s, net, tok, test_set, adapter):
    """The accuracy before training (written to before.json) and the answer formats the base model
    writes, with a warning when they are not what the reward reads."""
    print(f"evaluating the base model on {len(test_set)} held-out problems ...", flush=True)
    before = evaluation(net, tok, test_set, s, adapter, "before")
    if rank() == 0:
        write_json(os.path.join(s.out, "before.json"), before)
    print(accuracy_line("before", before, s), flush=True)
    print(formats_line(before), flush=True)
    warning = format_warning(before, s)
    if warning and rank() == 0:
        print(warning, file=sys.stderr, flush=True)
    return before


def check_outputs(net, tok, adapter, source):
    """One forward pass of a short prompt as evaluation and rollouts run it (the adapter folded in):
    finite numbers in `source` can still compute NaN or inf (an adapter value or --scale so large
    that the update overflows, a weight near the float limit). Refused now, not reported as an
    accuracy of 0 after the evaluation."""
    ids = torch.tensor([tok.encode_chat("What is 1 + 1?")], device=next(net.parameters()).device)
    with torch.no_grad(), adapter.merged() if adapter else contextlib.nullcontext():
        logits = net(ids)
    if not torch.isfinite(logits).all():
        raise UsageError(f"{source}: the model computes non-finite outputs (NaN or inf) with it: a value in it is too "
                         "large; check the file (or --scale)")


def no_signal_warning(s, step, m, sample):
    """What to tell the user of a GRPO run without a learning signal: NO_SIGNAL_STEPS steps in a
    row in which every problem's samples all got the same reward, so every advantage, and with it
    the gradient, is zero. Shows a completion with the answer each check reads in it, and what to change."""
    text = sample["completion"]
    answers = ", ".join(f"{mode} {data.EXTRACTORS[mode](text)!r}" for mode in sorted(data.EXTRACTORS))
    if m["reward"] == 0:
        advice = (f"no completion earned a reward: if the model writes its answer in a form --reward {s.reward} does not "
                  "read (\\boxed{N} where '#### N' is read, say), use a reward that reads it (--reward boxed, --reward "
                  "flexible) or an --instruction the model follows (docs/reproducing.md, 'Answer formats')")
    else:
        advice = ("each problem's samples are all right or all wrong: the problems are too easy or too hard for the "
                  "model; use other --train-data, or more --samples to make a disagreement likelier")
    return (f"warning: no learning signal in steps {step - NO_SIGNAL_STEPS + 1}-{step}: in {m['zero_adv_groups']:.0%} of "
            f"the groups all {s.samples} samples got the same reward (mean reward {m['reward']:.3f}), so every advantage "
            "and the gradient are zero: the adapter does not move, and each step costs its full time for nothing.\n"
            f"  a completion of step {step} (reference answer {sample['target']!r}) ends {text[-200:]!r};\n"
            f"  the answer each --reward reads in it: {answers}.\n"
            f"  {advice}")


def train_seconds(metrics):
    """Training time over every session of a run: each session's clock starts at 0 (m["time"]), so
    add the last time of each session (the entry before the clock goes back, and the last one)."""
    ends = [m for m, later in zip(metrics, metrics[1:] + [None]) if later is None or later["time"] < m["time"]]
    return sum(m["time"] for m in ends)


def report(s, adapter, adapter_path, total, before, after, metrics):
    """Print the before/after accuracies; write summary.json and curves.png."""
    file_bytes, param_bytes = tinylora.adapter_size(adapter_path)
    print(accuracy_line("before", before, s))
    print(accuracy_line("after", after, s))
    decoding = next(iter(after))  # greedy, unless --eval-decoding sampled
    rule = "paper" if s.reward == "paper" and "paper" in before[decoding] else "strict"  # the paper's own number
    gain = after[decoding][rule] - before[decoding][rule]
    print(f"{decoding} {rule} accuracy {before[decoding][rule]:.3f} -> {after[decoding][rule]:.3f} "
          f"({100 * gain:+.1f} points) with {adapter.num_trainable:,} trained parameters")
    print(f"adapter: {adapter_path} ({file_bytes:,} bytes on disk, {param_bytes:,} bytes of parameters)")
    summary = {"command": s.command, "resumes": s.resumes, "processes": world_size(),
               "settings": {k: v for k, v in vars(s).items() if k not in ("command", "resumes")},
               "trainable_parameters": adapter.num_trainable, "steps": total, "before": before, "after": after,
               "adapter": adapter_path, "adapter_file_bytes": file_bytes, "adapter_param_bytes": param_bytes,
               "train_seconds": train_seconds(metrics)}
    write_json(os.path.join(s.out, "summary.json"), summary)
    plot = plot_curves(s.out, metrics)
    logs = "metrics.jsonl, samples.jsonl" if s.algo == "grpo" else "metrics.jsonl"
    print(f"run folder: {s.out} ({logs}, eval_*.jsonl, summary.json{', curves.png' if plot else ''})")


def eval_only(s, folder, net, tok, test_set):
    """Accuracy and answer formats of the model (+ --adapter); the completions and summary.json go
    to the run folder; the last line printed is the result as JSON."""
    adapter = first_on_each_machine(lambda: tinylora.load_adapter(
        net, s.adapter, cache_dir=svd_cache(s), quiet=quiet_svd(net))) if s.adapter else None
    name = "adapter" if adapter else "base"
    if adapter and not abs(adapter.config.scale) <= MAX_SCALE:
        raise UsageError(f"{s.adapter}: metadata scale {adapter.config.scale} is beyond +-{MAX_SCALE:g}; the file is damaged")
    check_outputs(net, tok, adapter, s.adapter or s.model)
    folder.start()
    acc = evaluation(net, tok, test_set, s, adapter, name)
    result = {"model": s.model, "adapter": s.adapter, "eval_data": s.eval_data, "problems": len(test_set), **acc}
    if rank() == 0:
        write_json(os.path.join(s.out, "summary.json"), {"command": s.command, **result})
    print(accuracy_line(name, acc, s))
    print(formats_line(acc))
    print(f"run folder: {s.out} (eval_{name}_*.jsonl: every completion; summary.json)")
    print(json.dumps(result))
    return 0


def interrupted_line(s, folder):
    """What a Ctrl-C outside the training steps leaves, and what to do with it."""
    if folder is None or not folder.started:
        if s.resume:
            return f"interrupted: the run in {s.out} is unchanged; continue it with python train.py --resume --out {s.out}"
        return "interrupted before the run wrote anything; nothing to clean up"
    if s.eval_only or not resumable(s):
        return (f"interrupted: {s.out} holds an unfinished {'evaluation' if s.eval_only else 'run'}; remove it, or "
                f"start again with --overwrite --out {s.out}")
    return f"interrupted: continue the run with python train.py --resume --out {s.out} (or remove {s.out})"


def resumable(s):
    """Whether --resume can continue the run in s.out: a training run that has written its args.json."""
    return not s.eval_only and os.path.isfile(os.path.join(s.out, "args.json"))


def os_error_line(e, s, folder):
    """A failed read or write (a full disk, a file removed under the run) as one line naming the path."""
    line = f"error: {getattr(e, 'filename', None) or s.out}: {getattr(e, 'strerror', None) or e}"
    if folder is not None and folder.started and resumable(s):
        line += f"; fix it, then continue the run with python train.py --resume --out {s.out}"
    return line


def out_of_memory_line(e, s, folder):
    """Out of GPU (or CPU) memory: what to lower, and how to continue."""
    line = (f"error: out of memory on {s.device} ({str(e).splitlines()[0][:120]}); lower --micro-batch, --eval-batch "
            "or --max-new-tokens, or use --dtype bfloat16")
    if folder is not None and folder.started and resumable(s):
        line += f", then continue the run with python train.py --resume --out {s.out} --micro-batch N"
    return line


USER_ERRORS = (UsageError, M.CheckpointError, data.DataError, tinylora.AdapterError, ValueError)


def main(argv=None):
    """The command line -> exit code: 0 done, 2 bad input (one line, nothing written), 1 a failed
    read or write or a non-finite loss, 130 interrupted (one line saying what is left)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    s = parse_args(argv)
    folder = None
    try:
        s = run_settings(s, session_command(argv))
        train_set, test_set = check_inputs(s)
        folder = RunFolder(s)
        state = read_run_state(s, len(train_set or []))  # after the claim: no other process changes it now
        net, tok = build(s)
        join_processes(s)  # torchrun: join the other processes
        if s.eval_only:
            return eval_only(s, folder, net, tok, test_set)
        return train(s, folder, state, net, tok, train_set, test_set)
    except USER_ERRORS as e:
        message, code = f"error: {e}", 2
    except (OSError, SafetensorError) as e:  # safetensors reports a failed write (a full disk) as its own error
        message, code = os_error_line(e, s, folder), 1
    except torch.OutOfMemoryError as e:
        message, code = out_of_memory_line(e, s, folder), 1
    except KeyboardInterrupt:
        message, code = interrupted_line(s, folder), 130
    finally:
        if folder is not None:
            folder.release()
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank() == 0:  # bad input is the same for every process: one line
        print(message, file=sys.stderr)
    return code


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # main() says what a Ctrl-C leaves
    sys.exit(main())
