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

A run folder (`--out`, default runs/<date-time>) receives: args.json (every setting), metrics.jsonl
(one line per step), checkpoint.safetensors (adapter + optimizer + step, written
atomically every `--save-every` steps and on Ctrl-C), adapter.safetensors (the trained vector and
the metadata to rebuild the rest), summary.json, and curves.png when matplotlib is installed.
`--resume` continues a run from its checkpoint with the settings in its args.json; on a CPU with a
fixed seed, a killed and resumed run ends with the same adapter as an uninterrupted one.

    torchrun --standalone --nproc_per_node=N train.py ...
                                          the same run on N GPUs (data-parallel; docs/scaling.md):
                                          each process samples and scores its share of every step's
                                          prompts, the adapter's gradient is summed over the processes,
                                          rank 0 alone prints and writes the run folder

Bad input (a broken model folder, a malformed data line, impossible hyperparameters, an adapter
for another model) stops with one line on stderr and exit code 2, before anything is written.
"""

import argparse
import json
import math
import os
import signal
import sys
import time
from datetime import datetime

import numpy as np
import torch
import torch.distributed as dist

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

DEFAULTS = dict(  # used when neither the command line nor the preset sets a value
    out=None, adapter=None, model=None, train_data=None, eval_data=None, system=None, instruction=data.DEFAULT_INSTRUCTION,
    algo="grpo", method="tinylora", r=2, u=1, n_tie="1", tiling="tiled", proj_seed=0, scale=1.0,
    svd="randomized", lr=1e-3, steps=0, epochs=1, prompts_per_step=16, samples=4, max_new_tokens=512,
    temperature=1.0, top_p=1.0, clip_low=0.2, clip_high=0.2, tis_cap=0.0, kl_beta=0.0, agg="token-mean",
    adv_scale="std", reward="strict", mini_batches=1, micro_batch=8, weight_decay=0.0, warmup=0.0, max_grad_norm=1.0,
    sft_field="answer", dtype=None, device=None, threads=0, seed=0, eval_limit=0, eval_batch=64,
    eval_temperature=1.0, save_every=10, adapter_dtype="float32", keep_probs=False,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Flags left unset take the preset's value, then the default shown.")
    a = p.add_argument
    a("--preset", choices=sorted(PRESETS), help="settings bundle; default: 'toy' without --model, else none")
    a("--out", help="run folder (default runs/<date-time>); an existing non-empty one needs --resume or --overwrite")
    a("--resume", action="store_true", help="continue the run in --out from its checkpoint, with its saved settings")
    a("--overwrite", action="store_true", help="allow writing into an existing non-empty --out")
    a("--eval-only", action="store_true", help="only evaluate --model (+ --adapter) on --eval-data, then exit")
    a("--adapter", help="adapter file to evaluate with --eval-only")

    g = p.add_argument_group("model and data")
    g.add_argument("--model", help="Hugging Face folder of a Qwen2/Qwen2.5 checkpoint (default: toy/base)")
    g.add_argument("--train-data", help="training jsonl: {'question', 'answer'} per line (GSM8K or \\boxed{})")
    g.add_argument("--eval-data", help="held-out jsonl in the same format")
    g.add_argument("--system", help="system prompt (default: Qwen2.5's; the toy preset uses '')")
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
    g.add_argument("--eval-temperature", type=float, help="temperature of the sampled accuracy (greedy is always reported)")

    args = p.parse_args(argv)
    preset = args.preset or ("toy" if args.model is None else None)
    explicit = {k: v for k, v in vars(args).items() if v is not None}
    settings = {**DEFAULTS, **PRESETS.get(preset, {}), **explicit, "preset": preset}
    return argparse.Namespace(**settings)


class UsageError(Exception):
    """Bad input: reported as one line, exit code 2, nothing written."""


def check_settings(s):
    positive = ["r", "u", "prompts_per_step", "samples", "max_new_tokens", "mini_batches", "micro_batch", "eval_batch"]
    for name in positive:
        if getattr(s, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(s, name)}")
    for name in ["lr", "temperature", "clip_low", "clip_high", "tis_cap", "kl_beta", "weight_decay", "warmup",
                 "max_grad_norm", "steps", "epochs", "eval_limit", "save_every", "threads", "eval_temperature"]:
        value = getattr(s, name)
        if not math.isfinite(value) or value < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
    if s.algo == "grpo" and s.samples < 2:
        raise UsageError("--samples must be >= 2 for GRPO: advantages compare the samples of a prompt")
    if not 0 < s.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {s.top_p}")
    if s.warmup >= 1:
        raise UsageError(f"--warmup is a fraction of the steps and must be < 1, got {s.warmup}")
    if s.mini_batches > s.prompts_per_step:
        raise UsageError(f"--mini-batches {s.mini_batches} > --prompts-per-step {s.prompts_per_step}")
    if s.kl_beta > 0 and s.method == "full":
        raise UsageError("--kl-beta needs an adapter to switch off for the reference policy; not with --method full")
    if str(s.n_tie) != "all" and not str(s.n_tie).isdigit():
        raise UsageError(f"--n-tie must be a positive integer or 'all', got {s.n_tie!r}")
    for name in ("model", "train_data", "eval_data"):
        if getattr(s, name) is None and not (name == "train_data" and s.eval_only):
            raise UsageError(f"--{name.replace('_', '-')} is required with --model (or use --preset toy)")


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
# Evaluation


def sampling_seeds(seed, stream, first, count):
    """One sampling seed per prompt, a function of (run seed, stream, position) alone: stream 0 is
    the evaluation (position = problem index), stream k the k-th training step (position = index in
    the step's batch). So a completion does not depend on batching or on which process draws it."""
    return [int(np.random.SeedSequence([seed, stream, i]).generate_state(1)[0]) for i in range(first, first + count)]


def evaluate(net, tok, problems, s, adapter=None, temperature=0.0, seed=0):
    """Accuracy of the model (adapter folded in) on problems: one completion each -> dict. Under
    torchrun each process answers a consecutive share of the problems and the counts are summed."""
    first, end = len(problems) * rank() // world_size(), len(problems) * (rank() + 1) // world_size()
    mine = problems[first:end]
    prompts = [data.make_prompt(tok, p.question, s.instruction, s.system) for p in mine]
    seeds = sampling_seeds(seed, 0, first, len(mine))
    strict = flexible = 0
    for i in range(0, len(prompts), s.eval_batch):
        out = grpo.rollout(net, tok, prompts[i:i + s.eval_batch], 1, s.max_new_tokens, temperature, 1.0,
                           adapter=adapter, seeds=seeds[i:i + s.eval_batch])
        scores = data.score(out.texts, [p.target for p in mine[i:i + s.eval_batch]])
        strict += sum(scores.correct)
        flexible += sum(scores.flexible)
    strict, flexible = sum_over_processes([strict, flexible])
    return {"strict": strict / len(problems), "flexible": flexible / len(problems)}


def evaluate_both(net, tok, problems, s, adapter=None):
    """Greedy and sampled accuracy (strict and flexible), as the default run reports them."""
    greedy = evaluate(net, tok, problems, s, adapter, 0.0)
    sampled = evaluate(net, tok, problems, s, adapter, s.eval_temperature, seed=s.seed)
    return {"greedy": greedy, "sampled": sampled}


def accuracy_line(name, acc, temperature):
    g, t = acc["greedy"], acc["sampled"]
    return (f"{name:<7} greedy strict {g['strict']:.3f} flexible {g['flexible']:.3f} | "
            f"sampled (T={temperature:g}) strict {t['strict']:.3f} flexible {t['flexible']:.3f}")


# --------------------------------------------------------------------------------------------
# Checkpoints: one safetensors file, written to a temp name and renamed (atomic on POSIX)


def save_checkpoint(path, adapter, optimizer, step):
    from safetensors.torch import save_file

    tensors = {f"adapter.{name}": t.detach().cpu().contiguous() for name, t in adapter.tensors.items()}
    optim = optimizer.state_dict()
    for index, state in optim["state"].items():
        for key, value in state.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value).cpu().contiguous()
    meta = {"step": str(step), "param_groups": json.dumps(optim["param_groups"])}
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)


def load_checkpoint(path, adapter, optimizer):
    """Restore what save_checkpoint wrote; returns the step to continue from."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    with torch.no_grad():
        for name, param in adapter.tensors.items():
            param.copy_(tensors[f"adapter.{name}"])
    state = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    return int(meta["step"])


# --------------------------------------------------------------------------------------------
# The run


def prepare_run_folder(s):
    """Pick and check --out; with --resume, reload the saved settings. Nothing is written here."""
    if s.resume:
        if not s.out or not os.path.isfile(os.path.join(s.out, "args.json")):
            raise UsageError(f"--resume needs --out pointing at a run folder with args.json, got {s.out!r}")
        with open(os.path.join(s.out, "args.json")) as f:
            saved = json.load(f)
        return argparse.Namespace(**{**DEFAULTS, **saved, "resume": True, "out": s.out})  # DEFAULTS: settings newer than the run
    if s.out is None:
        s.out = os.path.join("runs", datetime.now().strftime("%Y%m%d-%H%M%S"))
    if os.path.isdir(s.out) and os.listdir(s.out) and not s.overwrite:
        raise UsageError(f"{s.out}: run folder exists and is not empty; pass --resume to continue it, "
                         "--overwrite to replace it, or another --out")
    return s


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
    """Load the model, tokenizer and data: most of what can fail on bad input, before anything is written."""
    parts = s.mini_batches if s.algo == "grpo" else 1
    if world_size() > 1 and not s.eval_only and s.prompts_per_step % (world_size() * parts):
        raise UsageError(f"--prompts-per-step {s.prompts_per_step} must be a multiple of {world_size() * parts} "
                         f"({world_size()} processes x {parts} mini-batches): each process takes the same number of "
                         "prompts, with all their samples, from every mini-batch")
    if s.threads:
        torch.set_num_threads(s.threads)
    s.device = str(torch.device(s.device) if s.device else M.default_device())
    if world_size() > 1 and s.device.startswith("cuda"):
        s.device = f"cuda:{local_rank()}"  # torchrun: one GPU per process (on --resume too, whatever args.json says)
    net = M.load_model(s.model, s.dtype, s.device)
    tok = M.load_tokenizer(s.model)
    train = data.load_problems(s.train_data, sft_field=s.sft_field if s.algo == "sft" else None) if s.train_data else None
    test = data.load_problems(s.eval_data)
    if s.eval_limit:
        test = test[:s.eval_limit]
    if train is not None and len(train) < s.prompts_per_step:
        raise UsageError(f"{s.train_data}: {len(train)} problems, fewer than --prompts-per-step {s.prompts_per_step}")
    return net, tok, train, test


def make_adapter(net, s):
    """Attach the adapter the flags describe; --n-tie all = one group for every target module."""
    n_tie = len(tinylora.find_targets(net)) if str(s.n_tie) == "all" else int(s.n_tie)
    cfg = tinylora.TinyLoRAConfig(method=s.method, r=s.r, u=s.u, n_tie=n_tie, tiling=s.tiling, seed=s.proj_seed,
                                  scale=s.scale, svd=s.svd)
    adapter, _ = first_on_each_machine(lambda: tinylora.attach(net, cfg, quiet=True))
    return adapter


def lr_at(step, total, s):
    """Linear warm-up over the first warmup * total steps, then constant."""
    warm = int(s.warmup * total)
    return s.lr * min(1.0, (step + 1) / warm) if warm else s.lr


def grpo_step(net, tok, adapter, optimizer, batch, s, step):
    """Rollout, rewards and update on this process's share of the step's batch -> the step's metrics,
    summed over the processes: the numbers a single process would log."""
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
    return {"reward": reward / n, "acc_strict": strict / n, "acc_flexible": flexible / n, "length": tokens / n,
            "tokens": int(tokens), "clip_frac": clipped / tokens, "kl": kl / tokens,
            "zero_adv_groups": zero_adv / s.prompts_per_step, "grad_norm": stats.grad_norm, "loss": stats.loss}


def sft_step(net, tok, adapter, optimizer, batch, s):
    """Next-token loss on the demonstrations (prompt tokens excluded), token-mean, one optimizer step.
    Under torchrun each process takes its share of the batch; the token count, the gradient and the
    loss are summed over the processes."""
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
    return {"loss": loss_sum, "tokens": int(total), "grad_norm": grad_norm}


def progress_line(step, total, m, elapsed, tokens_per_s, steps_this_session):
    eta = elapsed / steps_this_session * (total - step)  # a resumed run times only its own steps
    parts = [f"step {step}/{total}"]
    if "reward" in m:
        parts += [f"reward {m['reward']:.3f}", f"acc strict {m['acc_strict']:.3f} flexible {m['acc_flexible']:.3f}",
                  f"len {m['length']:.1f}", f"clip {m['clip_frac']:.3f}"]
    parts += [f"loss {m['loss']:.4f}", f"{tokens_per_s:,.0f} tok/s", f"ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}"]
    return " | ".join(parts)


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


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
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def train(s, net, tok, train_set, test_set):
    adapter = make_adapter(net, s)
    processes = f" x {world_size()} processes" if world_size() > 1 else ""
    print(f"model {s.model} | {s.method} r={s.r} u={s.u} n_tie={s.n_tie} {s.tiling} | "
          f"trainable parameters: {adapter.num_trainable:,} | device {s.device}{processes}", flush=True)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    total = total_steps(s, len(train_set))
    writes = rank() == 0  # under torchrun rank 0 alone writes the run folder
    ckpt = os.path.join(s.out, "checkpoint.safetensors")
    metrics_file = os.path.join(s.out, "metrics.jsonl")

    if s.resume:
        if not os.path.isfile(ckpt):
            raise UsageError(f"{ckpt}: no checkpoint to resume from")
        start = load_checkpoint(ckpt, adapter, optimizer)  # rank-independent: any process count resumes it
        with open(metrics_file) as f:  # drop lines of steps after the checkpoint (lost with the kill)
            metrics = [m for m in map(json.loads, f) if m["step"] <= start]
        with open(os.path.join(s.out, "before.json")) as f:
            before = json.load(f)
        print(f"resumed {s.out} at step {start}/{total}", flush=True)
        if world_size() > 1:
            dist.barrier()  # every process has read metrics.jsonl before rank 0 rewrites it
    else:
        if writes:
            os.makedirs(s.out, exist_ok=True)
            write_json(os.path.join(s.out, "args.json"),
                       {k: v for k, v in vars(s).items() if k not in ("resume", "overwrite", "argv")})
        print(f"evaluating the base model on {len(test_set)} held-out problems ...", flush=True)
        before = evaluate_both(net, tok, test_set, s, adapter)
        if writes:
            write_json(os.path.join(s.out, "before.json"), before)
        print(accuracy_line("before", before, s.eval_temperature), flush=True)
        start, metrics = 0, []
    if writes:
        with open(metrics_file, "w") as f:
            f.writelines(json.dumps(m) + "\n" for m in metrics)

    interrupted = False

    def on_sigint(*_):
        nonlocal interrupted
        interrupted = True
    previous = signal.signal(signal.SIGINT, on_sigint)  # finish the step, save, exit cleanly
    t0, tokens_seen, step = time.time(), 0, start
    try:
        for step in range(start, total):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, s)
            batch = step_problems(train_set, step, s.prompts_per_step, s.seed)
            try:
                if s.algo == "grpo":
                    m = grpo_step(net, tok, adapter, optimizer, batch, s, step)
                else:
                    m = sft_step(net, tok, adapter, optimizer, batch, s)
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
                with open(metrics_file, "a") as f:
                    f.write(json.dumps(m) + "\n")
            tokens_seen += m["tokens"]
            elapsed = time.time() - t0
            print(progress_line(step + 1, total, m, elapsed, tokens_seen / elapsed, step + 1 - start), flush=True)
            stop = sum_over_processes(int(interrupted)) > 0  # torchrun: all stop at the same step
            if writes and ((s.save_every and (step + 1) % s.save_every == 0) or stop):
                save_checkpoint(ckpt, adapter, optimizer, step + 1)
            if stop:
                print(f"interrupted: checkpoint saved at step {step + 1}; continue with "
                      f"python train.py --resume --out {s.out}", flush=True)
                return 130
    finally:
        signal.signal(signal.SIGINT, previous)

    adapter_path = os.path.join(s.out, "adapter.safetensors")
    if writes:
        save_checkpoint(ckpt, adapter, optimizer, total)
        tinylora.save_adapter(adapter, adapter_path, tinylora.DTYPES[s.adapter_dtype])
    print(f"evaluating the trained adapter on {len(test_set)} held-out problems ...", flush=True)
    after = evaluate_both(net, tok, test_set, s, adapter)
    if writes:
        report(s, adapter, adapter_path, total, before, after, metrics)
    return 0


def train_seconds(metrics):
    """Training time over every session of a run: each session's clock starts at 0 (m["time"]), so
    add the last time of each session (the entry before the clock goes back, and the last one)."""
    ends = [m for m, later in zip(metrics, metrics[1:] + [None]) if later is None or later["time"] < m["time"]]
    return sum(m["time"] for m in ends)


def report(s, adapter, adapter_path, total, before, after, metrics):
    """Print the before/after accuracies; write summary.json and curves.png."""
    file_bytes, param_bytes = tinylora.adapter_size(adapter_path)
    print(accuracy_line("before", before, s.eval_temperature))
    print(accuracy_line("after", after, s.eval_temperature))
    gain = after["greedy"]["strict"] - before["greedy"]["strict"]
    print(f"greedy strict accuracy {before['greedy']['strict']:.3f} -> {after['greedy']['strict']:.3f} "
          f"({100 * gain:+.1f} points) with {adapter.num_trainable:,} trained parameters")
    print(f"adapter: {adapter_path} ({file_bytes:,} bytes on disk, {param_bytes:,} bytes of parameters)")
    launcher = "python" if world_size() == 1 else f"torchrun --nproc_per_node={world_size()}"
    summary = {"command": f"{launcher} train.py " + " ".join(s.argv), "processes": world_size(),
               "settings": {k: v for k, v in vars(s).items()},
               "trainable_parameters": adapter.num_trainable, "steps": total, "before": before, "after": after,
               "adapter": adapter_path, "adapter_file_bytes": file_bytes, "adapter_param_bytes": param_bytes,
               "train_seconds": train_seconds(metrics)}
    write_json(os.path.join(s.out, "summary.json"), summary)
    plot = plot_curves(s.out, metrics)
    print(f"run folder: {s.out} (metrics.jsonl, summary.json{', curves.png' if plot else ''})")


def eval_only(s, net, tok, test_set):
    adapter = first_on_each_machine(lambda: tinylora.load_adapter(net, s.adapter, quiet=True)) if s.adapter else None
    acc = evaluate_both(net, tok, test_set, s, adapter)
    print(accuracy_line("adapter" if adapter else "base", acc, s.eval_temperature))
    print(json.dumps({"model": s.model, "adapter": s.adapter, "eval_data": s.eval_data, "problems": len(test_set), **acc}))
    return 0


def main(argv=None):
    s = parse_args(argv)
    try:
        check_settings(s)
        s = s if s.eval_only else prepare_run_folder(s)
        s.argv = sys.argv[1:] if argv is None else list(argv)  # the command, for summary.json
        net, tok, train_set, test_set = build(s)
        join_processes(s)  # torchrun: join the other processes
        return eval_only(s, net, tok, test_set) if s.eval_only else train(s, net, tok, train_set, test_set)
    except (UsageError, M.CheckpointError, data.DataError, tinylora.AdapterError, ValueError) as e:
        if rank() == 0:  # bad input is the same for every process: one line
            print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
