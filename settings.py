"""train.py's settings, defined once: every flag with its default and meaning (SETTINGS, from
which the command line, `--help` and DEFAULTS are made), the presets that change some of the
defaults (PRESETS, listed by `--help`), and every check made before anything is written.

A setting's value comes from the command line, else the preset, else its default. `--resume`
takes the run's saved settings (args.json) instead, and accepts only the flags of RESUMABLE.
Bad input raises runs.UsageError with one line naming the flag or file.
"""

import argparse
import json
import math
import os
import shlex
import uuid

import torch

import data
import grpo
import model as M
import tinylora
from runs import UsageError, local_rank, world_size

ROOT = os.path.dirname(os.path.abspath(__file__))
DECODINGS = {"greedy": ("greedy",), "sampled": ("sampled",), "both": ("greedy", "sampled")}  # --eval-decoding

# name: (default, type or choices, help). A default of None is explained by the help; bool = a switch.
# The adapter's and GRPO's defaults are their configs'.
ADAPTER, GRPO = tinylora.TinyLoRAConfig, grpo.GRPOConfig
SETTINGS = {
    "run": {
        "out": (None, str, "run folder (default runs/<date-time>); an existing non-empty one needs --resume or --overwrite"),
        "resume": (False, bool, "continue the run in --out from its checkpoint, with its saved settings"),
        "overwrite": (False, bool, "start a new run in an existing --out: the old run's files are removed (a folder "
                      "holding other files is refused)"),
        "eval_only": (False, bool, "only evaluate --model (+ --adapter) on --eval-data, then exit"),
        "adapter": (None, str, "adapter file to evaluate with --eval-only (to continue training a run: --resume)"),
    },
    "model and data": {
        "model": (None, str, "Hugging Face folder of a Qwen2/Qwen2.5, Llama 3.x or Qwen3 checkpoint (toy/base with "
                  "the toy preset)"),
        "train_data": (None, str, "training jsonl: {'question', 'answer'} per line (GSM8K or \\boxed{})"),
        "eval_data": (None, str, "held-out jsonl in the same format"),
        "system": (None, str, "system prompt (unset: the family's: Qwen2.5's own, none for Llama 3 and Qwen3)"),
        "instruction": (data.DEFAULT_INSTRUCTION, str, "appended to each question"),
        "dtype": (None, ("float32", "bfloat16"), "weight dtype (unset: the checkpoint's)"),
        "device": (None, str, "cpu, cuda, cuda:1, ... (unset: cuda when available; under torchrun each process "
                   "takes GPU LOCAL_RANK)"),
        "threads": (0, int, "CPU threads for torch (0 = torch's default)"),
    },
    "adapter (tinylora.py, docs/method.md)": {
        "method": (ADAPTER.method, tinylora.METHODS, "the parameterization of the update"),
        "r": (ADAPTER.r, int, "rank of the frozen SVD subspace (LoRA: the LoRA rank)"),
        "u": (ADAPTER.u, int, "TinyLoRA: trainable numbers per tie group"),
        "n_tie": ("1", str, "modules sharing one trainable vector; 'all' = one vector for the whole model"),
        "targets": (",".join(ADAPTER.targets), str, "module types adapted in every layer, comma-separated"),
        "tiling": (ADAPTER.tiling, tinylora.TILINGS, "tie neighbours in depth (tiled) or same-type modules (structured)"),
        "proj_seed": (ADAPTER.seed, int, "seed of the fixed random projections P"),
        "scale": (ADAPTER.scale, float, "multiplier on the adapter's update"),
        "svd": (ADAPTER.svd, ("randomized", "exact"), "truncated SVD method"),
        "adapter_dtype": ("float32", ("float32", "bfloat16"), "dtype of the saved adapter file"),
        "svd_cache": (tinylora.DEFAULT_CACHE_DIR, str, "folder of the SVD factors' cache, 'none' for no cache"),
    },
    "training": {
        "algo": ("grpo", ("grpo", "sft"), "GRPO (RL), or SFT on the reference solutions"),
        "sft_field": ("answer", str, "SFT: the jsonl field holding the demonstration"),
        "lr": (1e-3, float, "learning rate (AdamW)"),
        "steps": (0, int, "training steps (0 = --epochs passes over the training data)"),
        "epochs": (1, int, "passes over the training data when --steps is 0"),
        "prompts_per_step": (16, int, "problems per step (all processes together)"),
        "samples": (4, int, "GRPO: completions per problem (G)"),
        "max_new_tokens": (512, int, "completion budget per sample"),
        "temperature": (GRPO.temperature, float, "rollout sampling temperature"),
        "top_p": (1.0, float, "rollout nucleus sampling"),
        "clip_low": (GRPO.clip_low, float, "PPO clip: ratio floor 1 - clip_low"),
        "clip_high": (GRPO.clip_high, float, "PPO clip: ratio ceiling 1 + clip_high"),
        "tis_cap": (GRPO.tis_cap, float, "truncated importance-sampling cap (0 = off)"),
        "kl_beta": (GRPO.kl_beta, float, "weight of the k3 KL to the base model (0 = off)"),
        "agg": (GRPO.agg, grpo.AGGREGATIONS, "loss normalisation: token-mean (DAPO), seq-mean (GRPO), constant "
                "(Dr. GRPO)"),
        "reward": ("strict", tuple(sorted(data.EXTRACTORS)), "answer check of the reward (docs/grpo.md): strict "
                   "(lenient: last '#### N' read as a number), paper (the authors' verl rule: last '#### N' in the last "
                   "300 characters, compared as a string), flexible (last number) or boxed (last \\boxed{}, MATH)"),
        "adv_scale": (GRPO.adv_scale, grpo.ADVANTAGE_SCALES, "divide advantages by the group std, or not (Dr. GRPO)"),
        "mini_batches": (GRPO.mini_batches, int, "optimizer steps per rollout batch"),
        "micro_batch": (GRPO.micro_batch_size, int, "completions per forward/backward (memory; per process)"),
        "weight_decay": (0.0, float, "AdamW weight decay"),
        "warmup": (0.0, float, "fraction of steps with a linear learning-rate warm-up"),
        "max_grad_norm": (GRPO.max_grad_norm, float, "gradient clipping (0 = off)"),
        "seed": (0, int, "data order and sampling seed"),
        "save_every": (10, int, "checkpoint every N steps (0 = only at the end and on Ctrl-C)"),
    },
    "evaluation": {
        "eval_limit": (0, int, "evaluate on the first N problems (0 = all)"),
        "eval_batch": (64, int, "prompts per evaluation batch (per process)"),
        "eval_temperature": (1.0, float, "temperature of the sampled evaluation"),
        "eval_decoding": ("both", tuple(sorted(DECODINGS)), "greedy decoding, sampled (--eval-temperature), or both"),
    },
}
SPEC = {name: spec for group in SETTINGS.values() for name, spec in group.items()}
DEFAULTS = {name: default for name, (default, _, _) in SPEC.items()}

PRESETS = {  # each preset lists only what it changes from DEFAULTS
    # The embedded default: the toy base model the project ships (python toy.py rebuilds it).
    # 13 parameters = one vector of u = 13 shared by all 14 modules of the 2-layer model: with 14
    # modules, ceil(14 / n_tie) groups of u = 1 never make 13. lr 2e-3: sweep.py's probe scores it
    # 0.803 (training reward of the last 10 steps), within 0.024 of its best (0.827 at 1e-2); its
    # one-standard-error rule picks 5e-3 (0.820) for the sweep; the smaller rate spreads the rise of
    # the reward over the run instead of its first ten steps (docs/results.md). One thread: for a
    # model this small it is much faster than two. Measured result: docs/results.md.
    "toy": dict(model=os.path.join(ROOT, "toy/base"), train_data=os.path.join(ROOT, "toy/data/train.jsonl"),
                eval_data=os.path.join(ROOT, "toy/data/eval.jsonl"), system="", u=13, n_tie="all", lr=2e-3, steps=60,
                samples=8, max_new_tokens=48, micro_batch=128, threads=1, dtype="float32", eval_limit=500,
                eval_batch=250, max_grad_norm=0.0),
    # The paper's GSM8K runs with the authors' script settings (docs/reproducing.md).
    "gsm8k-paper": dict(u=1, n_tie=16, lr=2e-3, epochs=3, prompts_per_step=64, max_new_tokens=4096, clip_high=0.4,
                        tis_cap=2.0, mini_batches=2, dtype="bfloat16", weight_decay=0.01, warmup=0.05,
                        reward="paper"),
}

# what --resume may change (the rest would make the resumed run another run): --steps and --epochs
# may extend or shorten it, the others change where and how fast it runs, not what it computes
RESUMABLE = ("steps", "epochs", "save_every", "device", "threads", "micro_batch", "eval_batch", "svd_cache")
SESSION_ONLY = ("resume", "overwrite", "explicit", "from_preset")  # settings of one invocation, not saved in args.json
RETIRED = ("keep_probs",)  # settings of older versions, ignored in an args.json
GRPO_ONLY = ("samples", "temperature", "top_p", "clip_low", "clip_high", "tis_cap", "kl_beta", "agg", "adv_scale",
             "reward", "mini_batches")
TRAINING_ONLY = ("train_data", "algo", "sft_field", "lr", "steps", "epochs", "prompts_per_step", "weight_decay", "warmup",
                 "max_grad_norm", "save_every", "micro_batch", "method", "r", "u", "n_tie", "targets", "tiling", "proj_seed",
                 "scale", "svd", "adapter_dtype", *GRPO_ONLY)
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


def build_parser(description=None):
    def shown(v):  # the toy's own files relative to the repository
        return shlex.quote(os.path.relpath(v, ROOT) if isinstance(v, str) and v.startswith(ROOT) else str(v))
    presets = "\n".join(f"  {name}: " + " ".join(f"{flag(k)} {shown(v)}" for k, v in p.items())
                         for name, p in PRESETS.items())
    p = Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
               epilog=f"A flag left unset takes its preset's value, else the default shown.\npresets:\n{presets}")
    p.add_argument("--preset", choices=sorted(PRESETS), help="settings bundle (listed below); 'toy' without --model")
    for group, specs in SETTINGS.items():
        g = p.add_argument_group(group)
        for name, (default, kind, text) in specs.items():
            if name == "resume":
                text += f"; of these only {', '.join(map(flag, RESUMABLE))} may be changed"
            if kind is bool:  # default None: given or not (parse_args tells the command line from the rest)
                g.add_argument(flag(name), action="store_true", default=None, help=text)
                continue
            shown = "" if default is None else f" (default: {default})"
            choices = kind if isinstance(kind, tuple) else None
            g.add_argument(flag(name), type=None if choices else kind, choices=choices, help=text + shown)
    return p


def parse_args(argv=None, description=None):
    """The settings of this invocation: the command line, then the preset, then DEFAULTS. A preset's
    method-specific values (u, n_tie) give way when --method names a method that has none.
    `explicit` lists the flags given on the command line; `from_preset` those the preset set."""
    parsed = build_parser(description).parse_args(argv)
    preset = parsed.preset or ("toy" if parsed.model is None else None)
    explicit = {k: v for k, v in vars(parsed).items() if v is not None}
    from_preset = {k: v for k, v in PRESETS.get(preset, {}).items() if k not in explicit}
    method = explicit.get("method", from_preset.get("method", DEFAULTS["method"]))
    if method != "tinylora":
        from_preset.pop("u", None)  # only tinylora has a v of length u
    if method in ("lora", "full"):
        from_preset.pop("n_tie", None)  # nothing to tie
    settings = {**DEFAULTS, **from_preset, **explicit, "preset": preset}
    return argparse.Namespace(**settings, explicit=sorted(explicit), from_preset=sorted(from_preset))


def named(args, name):
    """A setting as an error message names it: the flag, with the preset when the preset set it."""
    preset = f" (set by --preset {args.preset})" if name in args.from_preset else ""
    return f"{flag(name)} {getattr(args, name)}{preset}"


# --------------------------------------------------------------------------------------------
# Checks of the settings alone (no file read)


def check_settings(args):
    """Impossible values, and flags that would be ignored or meaningless in this mode."""
    for name in ("r", "u", "prompts_per_step", "samples", "max_new_tokens", "mini_batches", "micro_batch", "eval_batch"):
        if getattr(args, name) < 1:
            raise UsageError(f"{flag(name)} must be >= 1, got {getattr(args, name)}")
    for name in ("lr", "temperature", "clip_low", "clip_high", "tis_cap", "kl_beta", "weight_decay", "warmup",
                 "max_grad_norm", "steps", "epochs", "eval_limit", "save_every", "threads", "eval_temperature", "seed",
                 "proj_seed"):
        value = getattr(args, name)
        if not math.isfinite(value) or value < 0:
            raise UsageError(f"{flag(name)} must be a finite number >= 0, got {value}")
    if not abs(args.scale) <= MAX_SCALE:
        raise UsageError(f"--scale must be a number within +-{MAX_SCALE:g}, got {args.scale}: an update that large "
                         "swamps the weights (and overflows float32)")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.warmup >= 1:
        raise UsageError(f"--warmup is a fraction of the steps and must be < 1, got {args.warmup}")
    if str(args.n_tie) != "all" and not (str(args.n_tie).isdigit() and int(args.n_tie) >= 1):
        raise UsageError(f"--n-tie must be a positive integer or 'all', got {args.n_tie!r}")
    if args.eval_temperature == 0 and args.eval_decoding != "greedy":
        raise UsageError("--eval-temperature 0 makes the sampled evaluation a second greedy one; use --eval-decoding "
                         "greedy, or a temperature > 0")
    if "eval_temperature" in args.explicit and args.eval_decoding == "greedy":
        raise UsageError(f"--eval-temperature is unused with {named(args, 'eval_decoding')}; remove it, or use "
                         "--eval-decoding sampled or both")
    if args.model is None:
        raise UsageError(f"--model is required with --preset {args.preset}: give a Hugging Face checkpoint folder (only "
                         "the toy preset brings its own model)")
    for name in ("eval_data",) + (() if args.eval_only else ("train_data",)):
        if getattr(args, name) is None:
            raise UsageError(f"{flag(name)} is required with --model (only the toy preset brings its own data)")
    if args.svd_cache != "none" and os.path.exists(args.svd_cache) and not os.path.isdir(args.svd_cache):
        raise UsageError(f"--svd-cache {args.svd_cache}: exists and is not a folder; name a folder, or 'none' for no cache")
    if args.eval_only:
        unused = [name for name in args.explicit if name in TRAINING_ONLY]
        if unused:
            raise UsageError(f"{flag(unused[0])} is a training setting, unused by --eval-only; remove it")
    else:
        check_training_settings(args)


def check_training_settings(args):
    """The checks of a training run's settings, including the adapter's (tinylora.TinyLoRAConfig)."""
    if args.adapter is not None:
        raise UsageError(f"--adapter {args.adapter}: only --eval-only reads an adapter; a training run starts from zero "
                         "(to continue a run: --resume --out RUN)")
    if args.steps == 0 and args.epochs == 0:
        raise UsageError("--steps 0 and --epochs 0 train nothing: give --steps N or --epochs N (N >= 1)")
    if args.steps and "epochs" in args.explicit:
        raise UsageError(f"--epochs is used only when --steps is 0, and {named(args, 'steps')}; give one of the two")
    if args.clip_low >= 1:
        raise UsageError(f"--clip-low {args.clip_low}: the ratio floor 1 - clip_low must be > 0; use a value below 1")
    unused = [name for name in args.explicit if name in (GRPO_ONLY if args.algo == "sft" else ("sft_field",))]
    if unused:
        raise UsageError(f"{flag(unused[0])} is a setting of --algo {'grpo' if args.algo == 'sft' else 'sft'}, "
                         f"unused with --algo {args.algo}; remove it")
    if args.algo == "grpo":
        if args.samples < 2:
            raise UsageError("--samples must be >= 2 for GRPO: advantages compare the samples of a prompt")
        if args.temperature == 0:
            raise UsageError("--temperature 0 makes the samples of a prompt identical: every GRPO advantage would be 0; "
                             "use a temperature > 0 (1.0 is the default)")
        if args.prompts_per_step % args.mini_batches:
            raise UsageError(f"{named(args, 'prompts_per_step')} must be a multiple of {named(args, 'mini_batches')}: "
                             "each optimizer step takes an equal share of the prompts")
    parts = args.mini_batches if args.algo == "grpo" else 1
    if world_size() > 1 and args.prompts_per_step % (world_size() * parts):
        raise UsageError(f"--prompts-per-step {args.prompts_per_step} must be a multiple of {world_size() * parts} "
                         f"({world_size()} processes x {parts} mini-batches): each process takes the same number of "
                         "prompts, with all their samples, from every mini-batch")
    if args.kl_beta > 0 and args.method == "full":
        raise UsageError("--kl-beta needs an adapter to switch off for the reference policy; not with --method full")
    unused = [name for name, methods in METHOD_FLAGS.items() if name in args.explicit and args.method not in methods]
    if unused:
        raise UsageError(f"{flag(unused[0])} is unused by --method {args.method} (it applies to "
                         f"{', '.join(METHOD_FLAGS[unused[0]])}); remove it")
    try:
        adapter_config(args)
    except ValueError as e:
        key = str(e).split(".", 1)[1].split("=", 1)[0]  # "TinyLoRAConfig.u=13: ..." -> u
        raise UsageError(f"{named(args, {'seed': 'proj_seed'}.get(key, key))}: {str(e).split(': ', 1)[1]}") from None


def adapter_config(args, n_targets=1):
    """The tinylora.TinyLoRAConfig the flags describe; --n-tie all = one group of all n_targets."""
    return ADAPTER(method=args.method, r=args.r, u=args.u, n_tie=n_targets if str(args.n_tie) == "all" else int(args.n_tie),
                   tiling=args.tiling, seed=args.proj_seed, scale=args.scale, svd=args.svd,
                   targets=tuple(args.targets.split(",")))


# --------------------------------------------------------------------------------------------
# The settings of a run: new, or resumed from its args.json


def run_settings(args, command):
    """The settings of the run this invocation makes or continues, checked: with --resume, the
    saved ones (args.json) with the flags of RESUMABLE given now, and `command` added to the run's
    resumes; else the command line's, with a new run id."""
    if not args.resume:
        args.command, args.resumes, args.run_id = command, [], uuid.uuid4().hex
        check_settings(args)
        return args
    if args.out is None:
        raise UsageError("--resume needs --out: the run folder to continue")
    for name in ("eval_only", "overwrite", "adapter"):
        if name in args.explicit:
            raise UsageError(f"--resume continues a training run with its own settings; not with {flag(name)}")
    saved = read_saved_settings(os.path.join(args.out, "args.json"))
    for name in args.explicit:
        if name in RESUMABLE:
            saved[name] = getattr(args, name)
        elif name not in ("resume", "out") and str(saved.get(name)) != str(getattr(args, name)):
            raise UsageError(f"{flag(name)} {getattr(args, name)}: the run in {args.out} has {saved.get(name)} (args.json); "
                             f"--resume may change only {', '.join(map(flag, RESUMABLE))}: start a new run "
                             "(another --out) to change the others")
    resumes = saved.pop("resumes", []) + [command]  # runs made before commands were saved have none
    explicit = [name for name in args.explicit if name in RESUMABLE]
    resumed = argparse.Namespace(**{**DEFAULTS, "command": None, "run_id": None, **saved, "resumes": resumes,
                                    "resume": True, "overwrite": False, "out": args.out, "explicit": explicit,
                                    "from_preset": []})  # DEFAULTS: settings newer than the run
    try:
        check_settings(resumed)
    except UsageError as e:
        raise UsageError(f"{os.path.join(args.out, 'args.json')} with this command: {e}") from None
    return resumed


def read_saved_settings(path):
    """args.json of a run, each value checked against its setting's type and choices."""
    try:
        with open(path) as f:
            saved = json.load(f)
    except FileNotFoundError:
        raise UsageError(f"{path}: missing; --resume needs --out pointing at a run folder (with args.json)") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: unreadable ({e}); the run cannot be resumed, start a new one") from None
    if not isinstance(saved, dict):
        raise UsageError(f"{path}: expected a JSON object of settings; the run cannot be resumed, start a new one")
    saved = {k: v for k, v in saved.items() if k not in RETIRED}
    for key, value in saved.items():
        if not saved_value_ok(key, value):
            raise UsageError(f"{path}: key {key!r} has an invalid value {value!r}; the run cannot be resumed, "
                             "start a new one")
    if saved.get("eval_only"):
        raise UsageError(f"{path}: an --eval-only folder; there is no training run to resume")
    return saved


def saved_value_ok(key, value):
    """Whether `value` is one a setting (or a bookkeeping key of args.json) can hold."""
    if key in ("command", "run_id"):
        return value is None or isinstance(value, str)
    if key == "resumes":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if key == "preset":
        return value is None or value in PRESETS
    if key not in SPEC:
        return False  # no such setting
    default, kind, _ = SPEC[key]
    if value is None:
        return default is None
    if isinstance(value, bool) or kind is bool:
        return kind is bool and isinstance(value, bool)
    if isinstance(kind, tuple):
        return value in kind
    if kind is int:
        return isinstance(value, int)
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, str) or (key == "n_tie" and isinstance(value, int))


# --------------------------------------------------------------------------------------------
# Checks of the files and the device, before the model loads (which can take minutes)


def total_steps(args, n_train):
    return args.steps if args.steps > 0 else args.epochs * max(n_train // args.prompts_per_step, 1)


def check_inputs(args):
    """Every file and device the run needs, read or checked -> (training problems or None,
    evaluation problems)."""
    check_device(args)
    if os.path.exists(args.model) and not os.path.isdir(args.model):
        raise UsageError(f"--model {args.model}: a file; give the Hugging Face checkpoint folder")
    config = M.read_config(args.model)  # a missing or broken config.json, in a second
    if args.max_new_tokens > config.max_position_embeddings:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens}: longer than the model's whole context of "
                         f"{config.max_position_embeddings} tokens (max_position_embeddings in "
                         f"{os.path.join(args.model, 'config.json')}); give at most that, less the prompt")
    for name in ("train_data", "eval_data", "adapter"):
        path = getattr(args, name)
        if path is not None and not os.path.isfile(path):
            what = "a folder" if os.path.isdir(path) else "not a regular file" if os.path.exists(path) else "no such file"
            raise UsageError(f"{flag(name)} {path}: {what}; give a file")
    try:
        train = (data.load_problems(args.train_data, sft_field=args.sft_field if args.algo == "sft" else None)
                 if not args.eval_only else None)
        test = data.load_problems(args.eval_data)
    except OSError as e:
        raise UsageError(f"{e.filename}: cannot read ({e.strerror})") from None
    if args.eval_limit:
        test = test[:args.eval_limit]
    if not test:
        raise UsageError(f"{args.eval_data}: no problems to evaluate")
    if train is not None and len(train) < args.prompts_per_step:
        raise UsageError(f"{args.train_data}: {len(train)} problems, fewer than --prompts-per-step {args.prompts_per_step}")
    warm_steps = int(args.warmup * total_steps(args, len(train))) if train is not None else 1
    if "warmup" in args.explicit and args.warmup and not warm_steps:
        raise UsageError(f"{named(args, 'warmup')} of {total_steps(args, len(train))} steps is no step of warm-up; use 0, "
                         "or a larger fraction")
    if args.svd_cache != "none":
        existing = args.svd_cache  # the folder, or its nearest existing parent, must be a writable folder
        while not os.path.exists(existing):
            existing = os.path.dirname(os.path.abspath(existing))
        if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
            raise UsageError(f"--svd-cache {args.svd_cache}: cannot be created or written ({existing} is not a writable "
                             "folder); name another folder, or 'none' for no cache")
    return train, test


def check_device(args):
    """--device: a device of this machine (under torchrun with CUDA: GPU LOCAL_RANK); sets args.device."""
    try:
        device = torch.device(args.device) if args.device else M.default_device()
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {args.device!r}: not a device; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {args.device}: only cpu and cuda are supported")
    if device.type == "cuda":
        if world_size() > 1:
            device = torch.device("cuda", local_rank())  # one GPU per process (on --resume too)
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise UsageError(f"--device {device}: this machine has {count} CUDA GPU(s); use --device cpu"
                             + (f" (or --device cuda:N with N < {count})" if count else ""))
    args.device = str(device)
