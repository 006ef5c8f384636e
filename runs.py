"""Everything around a training run that is not the method: the processes of a torchrun launch,
the run folder and the files written into it (atomically: a kill leaves the old file or the new
one), the checkpoint, the progress lines of long phases, and the plot of the training curves.
Who owns a run folder and what may be in it: `RunFolder`.
"""

import fcntl
import fnmatch
import itertools
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
from safetensors import SafetensorError

import svd
import tinylora


class UsageError(Exception):
    """Bad input: reported as one line, exit code 2, nothing written."""


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


def join_processes(args):
    """Under torchrun, join the other processes: through NCCL between GPUs (process LOCAL_RANK has
    GPU LOCAL_RANK, see settings.check_device), through gloo between CPU processes. Only rank 0 prints: the
    others' stdout is discarded. Called after the model is loaded, on purpose: building the first
    meta-device model (model.load_model) imports torch._dynamo, which in torch 2.13 keeps references
    to a process group existing at that moment; destroy_process_group then leaves its gloo threads
    running, and one of them can abort the interpreter's exit."""
    if world_size() == 1:
        return
    cuda = torch.device(args.device).type == "cuda"
    if cuda:
        torch.cuda.set_device(args.device)
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
    assert len(items) % (mini_batches * world_size()) == 0, "settings.check_training_settings checks --prompts-per-step"
    chunk = len(items) // mini_batches
    share = chunk // world_size()
    first = rank() * share
    return [x for c in range(0, len(items), chunk) for x in items[c + first:c + first + share]]


def first_on_each_machine(fn):
    """fn() in the first process of each machine, then in the others: the first computes the SVD
    factors and writes them to the on-disk cache (svd.svd_factors), the others read them."""
    if world_size() == 1:
        return fn()
    if local_rank() > 0:
        dist.barrier()
    result = fn()
    if local_rank() == 0:
        dist.barrier()
    return result


def sampling_seeds(seed, stream, first, count):
    """One sampling seed per prompt, a function of (run seed, stream, position) alone: stream 0 is
    the evaluation (position = problem index), stream k the k-th training step (position = index in
    the step's batch). So a completion does not depend on batching or on which process draws it."""
    return [int(np.random.SeedSequence([seed, stream, i]).generate_state(1)[0]) for i in range(first, first + count)]


# --------------------------------------------------------------------------------------------
# The run folder

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

    def __init__(self, args):
        self.args, self.fd, self.made_folder, self.started = args, None, False, False
        if rank() == 0:  # under torchrun the other processes only read
            self.claim()
        elif args.out is None:
            args.out = self.default_name()  # for messages: rank 0 alone picks and writes the folder

    def claim(self):
        args = self.args
        if args.out is None:
            self.make_default_folder()
        else:
            if os.path.lexists(args.out) and not os.path.isdir(args.out):
                raise UsageError(f"--out {args.out}: exists and is not a folder; choose another --out")
            self.made_folder = not os.path.lexists(args.out)
            try:
                os.makedirs(args.out, exist_ok=True)
            except OSError as e:
                raise UsageError(f"--out {args.out}: cannot create the run folder ({e.strerror}); "
                                 "choose another --out") from None
        if not os.access(args.out, os.W_OK | os.X_OK):
            raise UsageError(f"--out {args.out}: not writable; choose another --out")
        self.lock()
        try:
            self.check_contents()
        except UsageError:
            self.release()
            raise

    def default_name(self):
        return os.path.join("runs", datetime.now().strftime("%Y%m%d-%H%M%S") + ("-eval" if self.args.eval_only else ""))

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
            self.args.out, self.made_folder = name, True
            return

    def lock(self):
        """Take LOCK_FILE's flock, or refuse naming the pid holding it. The lock file goes with
        `release`, so a lock taken on a file that was removed meanwhile is taken again."""
        path = os.path.join(self.args.out, LOCK_FILE)
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
                raise UsageError(f"--out {self.args.out}: in use by another train.py (pid {owner}); wait for it to end, "
                                 "or choose another --out") from None
            if os.path.exists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
            os.close(fd)  # the owner removed the file between our open and our flock
        self.fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())

    def check_contents(self):
        args = self.args
        names = sorted(n for n in os.listdir(args.out) if n != LOCK_FILE)
        if args.resume:
            if not os.path.isfile(os.path.join(args.out, "args.json")):
                raise UsageError(f"--resume --out {args.out}: no args.json; not a run folder")
        elif names and not args.overwrite:
            raise UsageError(f"{args.out}: run folder exists and is not empty; pass --resume to continue it, "
                             "--overwrite to replace it, or another --out")
        elif names:
            foreign = [n for n in names if not is_run_file(n) or os.path.isdir(os.path.join(args.out, n))]
            if foreign:
                raise UsageError(f"--overwrite {args.out}: it holds {foreign[0]!r}, which is not a run's file; --overwrite "
                                 "removes only a run's own files: move it away, or choose another --out")

    def start(self):
        """Called before the run's first write: --overwrite removes the old run's files now."""
        if self.fd is not None and self.args.overwrite:
            for name in os.listdir(self.args.out):
                if name != LOCK_FILE and is_run_file(name):
                    os.remove(os.path.join(self.args.out, name))
        self.started = True

    def release(self):
        """Give the folder up (the lock file goes); before `start`, also remove a folder that claiming made."""
        if self.fd is None:
            return
        os.remove(os.path.join(self.args.out, LOCK_FILE))  # still locked: no one takes it meanwhile
        os.close(self.fd)
        self.fd = None
        if not self.started and self.made_folder and not os.listdir(self.args.out):
            os.rmdir(self.args.out)


def interrupted_line(args, folder):
    """What a Ctrl-C outside the training steps leaves, and what to do with it."""
    if folder is None or not folder.started:
        if args.resume:
            return (f"interrupted: the run in {args.out} is unchanged; continue it with "
                    f"python train.py --resume --out {args.out}")
        return "interrupted before the run wrote anything; nothing to clean up"
    if args.eval_only or not resumable(args):
        return (f"interrupted: {args.out} holds an unfinished {'evaluation' if args.eval_only else 'run'}; remove it, or "
                f"start again with --overwrite --out {args.out}")
    return f"interrupted: continue the run with python train.py --resume --out {args.out} (or remove {args.out})"


def resumable(args):
    """Whether --resume can continue the run in args.out: a training run that has written its args.json."""
    return not args.eval_only and os.path.isfile(os.path.join(args.out, "args.json"))


def os_error_line(e, args, folder):
    """A failed read or write (a full disk, a file removed under the run) as one line naming the path."""
    line = f"error: {getattr(e, 'filename', None) or args.out}: {getattr(e, 'strerror', None) or e}"
    if folder is not None and folder.started and resumable(args):
        line += f"; fix it, then continue the run with python train.py --resume --out {args.out}"
    return line


def out_of_memory_line(e, args, folder):
    """Out of GPU (or CPU) memory: what to lower, and how to continue."""
    line = (f"error: out of memory on {args.device} ({str(e).splitlines()[0][:120]}); lower --micro-batch, --eval-batch "
            "or --max-new-tokens, or use --dtype bfloat16")
    if folder is not None and folder.started and resumable(args):
        line += f", then continue the run with python train.py --resume --out {args.out} --micro-batch N"
    return line


# --------------------------------------------------------------------------------------------
# Files of a run


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


def read_before(path, decodings):
    """before.json as a resumed run finds it, or None when it is missing or not what evaluation
    writes (then the base model is evaluated again)."""
    try:
        with open(path) as f:
            before = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(before, dict) or set(before) != set(decodings):
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
        meta, tensors = svd.read_safetensors(path)
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


class StopRequest:
    """Ctrl-C during the training steps: the first asks to stop after the current step, with a
    checkpoint (`requested`); a second stops at once (KeyboardInterrupt). Restores the previous
    handler on exit."""

    def __init__(self, verbose):
        self.requested, self.verbose = False, verbose

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self.handle)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)

    def handle(self, *_):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.verbose:
            print("Ctrl-C: stopping after this step with a checkpoint (Ctrl-C again to stop at once)",
                  file=sys.stderr, flush=True)
