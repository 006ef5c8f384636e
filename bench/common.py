"""What the side-by-side benchmarks share: random checkpoints of identical weights for both
sides, interleaved timing, peak memory measured in a child process, and the JSON record.

Conventions (as in bench_svd.py): one thread unless a script says otherwise (the build machines
have 2 cores shared with other jobs, so a second thread mostly waits on someone else's process);
every comparison is timed in one process, the two sides alternating, and reported as a ratio of
medians; every run appends one JSON line to bench/results.jsonl with the command, git commit,
versions, threads and load average.
"""

import ctypes
import json
import os
import re
import statistics
import subprocess
import sys
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

# Model shapes: (layers, hidden, MLP width, query heads, kv heads, head_dim, vocab, tied embeddings)
TOY = dict(layers=2, hidden=128, intermediate=256, heads=4, kv_heads=2, head_dim=32, vocab=110, tie=True)  # toy/base/config.json
QWEN05_WIDTH = dict(layers=4, hidden=896, intermediate=4864, heads=14, kv_heads=2, head_dim=64, vocab=151936, tie=True)  # Qwen2.5-0.5B, 4 of its 24 layers


def setup(threads=1):
    from transformers.utils import logging

    logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notes, raised inside PEFT
    torch.set_num_threads(threads)
    torch.manual_seed(0)


def random_checkpoint(path, layers, hidden, intermediate, heads, kv_heads, head_dim, vocab, tie, seed=0):
    """A transformers Qwen2ForCausalLM with its own random init (seeded), saved to `path` in fp32.
    Returns the transformers model (eval mode, frozen); load the project's side from `path` with
    model.load_model, so both hold the same weights."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                      tie_word_embeddings=tie, max_position_embeddings=4096, rope_theta=1e6, eos_token_id=None,
                      pad_token_id=0, dtype="float32")
    torch.manual_seed(seed)
    hf = Qwen2ForCausalLM(cfg).float().eval().requires_grad_(False)
    hf.save_pretrained(path)
    return hf


def load_reference(path):
    """The transformers side of a checkpoint written by random_checkpoint."""
    from transformers import Qwen2ForCausalLM

    return Qwen2ForCausalLM.from_pretrained(path, dtype=torch.float32).eval().requires_grad_(False)


def interleaved(sides, repeats):
    """sides: {name: callable}. Calls them in turn, `repeats` rounds, the order rotating each round
    so neither side always runs first. Returns ({name: [wall seconds]}, {name: [CPU seconds]}).
    CPU time (this process, all threads) is what other jobs on a shared machine disturb least."""
    names = list(sides)
    wall, cpu = {name: [] for name in sides}, {name: [] for name in sides}
    for i in range(repeats):
        for name in names[i % len(names):] + names[:i % len(names)]:
            start, start_cpu = time.perf_counter(), time.process_time()
            sides[name]()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return wall, cpu


def median(xs):
    return statistics.median(xs)


def touch(module):
    """Read every parameter and buffer once. Both loaders map the checkpoint file, so weights become
    resident only when first used; timing and memory baselines should not include that."""
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            t.sum()


# ---- peak memory: in a child process, since the high-water mark of a process never goes down


def _status_kib(key):
    return int(re.search(rf"{key}:\s+(\d+) kB", open("/proc/self/status").read()).group(1))


def start_peak():
    """Release freed heap to the OS, reset this process's RSS high-water mark (Linux: 5 >
    /proc/self/clear_refs) and return the current RSS in bytes: the baseline."""
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS") * 1024


def peak_since_start(baseline):
    """Bytes the RSS high-water mark rose above `baseline` since start_peak()."""
    return _status_kib("VmHWM") * 1024 - baseline


def child_peaks(script, runs, parallel=2):
    """runs: {name: [args]}. Runs `script --child ARGS...` for each, `parallel` at a time (memory is
    what they measure, not time), each in a fresh interpreter with this process's thread count;
    each prints one JSON line last. Returns {name: that dict}."""
    from concurrent.futures import ThreadPoolExecutor

    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}

    def run(name):
        out = subprocess.run([sys.executable, script, "--child", *map(str, runs[name])], capture_output=True, text=True, env=env)
        if out.returncode != 0:
            raise RuntimeError(f"{script} --child {' '.join(map(str, runs[name]))} failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    with ThreadPoolExecutor(parallel) as pool:
        return dict(zip(runs, pool.map(run, runs)))


# ---- the record


def new_record():
    import transformers

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results.jsonl"],
                           capture_output=True, text=True, cwd=ROOT).stdout.strip()  # edits to tracked files, this log aside
    return {"command": " ".join([os.path.basename(sys.executable)] + sys.argv), "commit": commit + ("+dirty" if dirty else ""),
            "torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
            "load_average": os.getloadavg()[0]}


def append_record(record):
    record["load_average_end"] = os.getloadavg()[0]
    with open(os.path.join(HERE, "results.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def gib(n):
    return n / 2**30
