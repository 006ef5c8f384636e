"""The CPU benchmarks' comparisons on one CUDA GPU in bf16, and what the paper's 7B run costs there.

    python3 bench/bench_gpu.py               (budgeted at 200 s, --budget; not yet run on a GPU;
                                             bench/gpu_check.sh runs it with the CUDA tests)
    .venv/bin/python bench/bench_gpu.py --quick --device cpu --results /tmp/gpu_quick.jsonl
                                             (smoke test: tiny shapes, the same code path, any machine)

Four sections. Each has a time budget (and the run one in all, --budget): a section that runs out
stops at once with a printed note, keeping what it measured, and the next one starts. Every
measurement prints its line as soon as it is made and appends a JSON line to --results (default
$OUT/gpu_results.jsonl when $OUT is set, else bench/gpu_results.jsonl; --quick records nothing
unless --results is given), so a run killed half-way still leaves its figures.

  rollout  model.generate against transformers' generate, as bench/bench_rollout.py, at
           Qwen2.5-0.5B's full shape (24 layers, 896 hidden, 4864 MLP, 14/2 heads, 151,936 vocab,
           tied). Same bf16 weights on both sides: transformers' own random init (seed 0) built on
           the GPU, ours given a copy of its state dict (the parameter names are the same). KV
           cache on both, temperature 1, no top-k/top-p cut, every row writes all 128 new tokens
           (no end ids; eos_token_id=None). Batch 1, 32 and 256 (64 prompts x G = 4, a step of
           the paper's GSM8K run). Batch-1 decoding as a fraction of the device's copy bandwidth.
  7b       Qwen2.5-7B's shape (28 layers, 3584 hidden, 18944 MLP, 28/4 heads, 152,064 vocab,
           untied), random bf16 weights drawn on the GPU (no checkpoint, no transformers):
           tinylora.attach with the paper's setting (u=1, n_tie=16: 13 parameters; randomized SVD
           of the 196 targets), merge + unmerge, generate at batch 1 and at batch 256 (short and
           1024-token prompts), one training micro-batch (8 rows x 512 tokens:
           grpo.sequence_logprobs + policy loss + backward to v) with its peak memory, and from
           these the paper's GSM8K run time on this GPU, the arithmetic printed.
  train    bench/bench_train.py's step at the 0.5B full shape, bf16, 32 rows of 64 prompt + 64
           completion tokens: ours against PEFT's tinylora on the transformers model (full logits;
           TRL's recipe), time and peak memory, and the adapter's overhead over the frozen base.
  svd      TinyLoRA's randomized SVD (attach) against the exact torch.linalg.svd on the GPU: all
           168 targets of the 0.5B shape, and one 7B layer, weights with bench_svd.py's spectrum.

Timing: the device is synchronised before and after every timed call; sides alternate
(common.interleaved) after a warm-up, and figures are medians over the rounds. Peak memory:
torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus what was allocated before
the call (tensors only; the caching allocator's reserve is not counted). Only eager PyTorch is
measured: no torch.compile, no CUDA graphs.
"""

import argparse
import gc
import json
import math
import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass

import torch

START = time.monotonic()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (puts the repository root on sys.path)
import grpo  # noqa: E402
import model as M  # noqa: E402
import svd  # noqa: E402
import tinylora  # noqa: E402
from bench_rollout import G, prompts_for  # noqa: E402
from bench_train import COMPLETION, PROMPT, batch as train_batch, loss_of, selective_log_softmax  # noqa: E402

# Shapes as in common.py: (layers, hidden, MLP width, query heads, kv heads, head_dim, vocab, tied)
QWEN05 = dict(common.QWEN05_WIDTH, layers=24)  # Qwen2.5-0.5B, all 24 layers
QWEN7B = dict(layers=28, hidden=3584, intermediate=18944, heads=28, kv_heads=4, head_dim=128, vocab=152064, tie=False)
TINY05 = dict(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16, vocab=512, tie=True)  # --quick
TINY7B = dict(layers=2, hidden=96, intermediate=160, heads=4, kv_heads=2, head_dim=24, vocab=640, tie=False)  # --quick
GSM8K_TRAIN = 7473  # problems in GSM8K's training split


@dataclass
class Sizes:
    small: dict  # the 0.5B shape (rollout, train)
    big: dict  # the 7B shape
    new_tokens: int  # rollout: tokens written per row
    batches: dict  # rollout: {rows decoded together: alternating rounds}
    big_b1_tokens: int  # 7B, batch 1: tokens written
    big_prompts: int  # 7B, batch big_prompts x G: prompts
    big_tokens: int  # 7B, batch big_prompts x G, short prompts: tokens written per row
    long_prompt: int  # 7B, the long-context run: prompt length
    long_tokens: int  # 7B, the long-context run: tokens written per row
    micro_rows: int  # 7B training micro-batch: rows
    micro_tokens: int  # 7B training micro-batch: tokens per row (a quarter prompt, the rest completion)
    train_rows: int  # train: rows of PROMPT + COMPLETION tokens
    train_rounds: int  # train: alternating rounds
    copy_mib: int  # bandwidth: buffer size


FULL = Sizes(QWEN05, QWEN7B, 128, {1: 3, 32: 2, 256: 2}, 64, 64, 256, 1024, 32, 8, 512, 32, 5, 1024)
QUICK = Sizes(TINY05, TINY7B, 6, {1: 1, 8: 1}, 6, 2, 6, 64, 4, 2, 48, 4, 1, 16)
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def say(text):
    print(text, flush=True)


def gb(n):
    return n / 1e9


# --------------------------------------------------------------------------------------------
# Timing and memory on the device


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(f, device):
    """(wall seconds, f()) with the device idle before and after."""
    sync(device)
    start = time.perf_counter()
    out = f()
    sync(device)
    return time.perf_counter() - start, out


def alternate(sides, rounds, device):
    """{name: f}: the sides called in turn for `rounds` rounds (common.interleaved), each call
    synchronised. Returns ({name: median seconds}, {name: [seconds]})."""
    sync(device)
    wall, _ = common.interleaved({k: (lambda f=f: (f(), sync(device))) for k, f in sides.items()}, rounds)
    return {k: common.median(v) for k, v in wall.items()}, wall


def timed_peak(f, device):
    """(seconds, bytes the allocator's high-water mark rose above what was allocated before f());
    the bytes are None off CUDA."""
    if device.type != "cuda":
        return timed(f, device)[0], None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    seconds, _ = timed(f, device)
    return seconds, torch.cuda.max_memory_allocated(device) - before


def gib_or_na(n):
    return "n/a (not CUDA)" if n is None else f"{common.gib(n):.2f} GiB"


def bandwidths(device, lm_head, mib):
    """Bytes per second on the device, best of 5: copy (a .copy_() between two bf16 buffers of `mib`
    MiB, bytes read + written, as STREAM counts them), read (a sum over one) and gemv (lm_head's
    weight times one vector: the largest read of a batch-1 decoding step)."""
    src = torch.randn(mib * 2**20 // 2, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    x = torch.randn(1, lm_head.in_features, device=device, dtype=lm_head.weight.dtype)
    w_bytes = lm_head.weight.numel() * lm_head.weight.element_size()
    calls = {"copy": (lambda: dst.copy_(src), 2 * src.nbytes, 3), "read": (src.sum, src.nbytes, 3),
             "gemv": (lambda: lm_head(x), w_bytes, 20)}  # (f, bytes per call, calls per timing)
    best = dict.fromkeys(calls, 0.0)
    for _ in range(5):
        for name, (f, nbytes, n) in calls.items():
            seconds, _ = timed(lambda: [f() for _ in range(n)], device)
            best[name] = max(best[name], n * nbytes / seconds)
    return best


# --------------------------------------------------------------------------------------------
# Models made on the device


def model_config(shape):
    return M.ModelConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                         num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                         num_key_value_heads=shape["kv_heads"], head_dim=shape["head_dim"], rope_theta=1e6,
                         tie_word_embeddings=shape["tie"])


def empty_model(shape, device, dtype):
    """The project's Transformer of `shape`, its weights allocated on `device` in `dtype`, not initialised."""
    with torch.device("meta"):
        model = M.Transformer(model_config(shape))
    model = model.to(dtype).to_empty(device=device)
    if shape["tie"]:  # to_empty gives every parameter its own storage
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.requires_grad_(False).eval()


def random_model(shape, device, dtype, seed=0):
    """The project's model with transformers-like random weights drawn on the device: N(0, 0.02),
    norms 1, biases 0."""
    model = empty_model(shape, device, dtype)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=g)
    return model


def spectral_model(shape, layers, device, dtype, seed=0):
    """bench_svd.random_model on the device: `layers` layers of `shape` with a 16-token vocabulary,
    each projection a Gaussian bulk plus 8 strong decaying directions (like real weight spectra)."""
    model = empty_model(dict(shape, layers=layers, vocab=16), device, dtype)
    g = torch.Generator(device=device).manual_seed(seed)
    decay = 4 * 0.7 ** torch.arange(8.0, device=device)

    def randn(*size):
        return torch.randn(*size, generator=g, device=device)

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_proj.weight"):
                out, inp = p.shape
                p.copy_((randn(out, inp) + (randn(out, 8) * decay) @ randn(8, inp) / 8) / math.sqrt(inp))
            else:
                p.copy_(randn(*p.shape) * 0.1 if p.dim() > 1 or "bias" in name else torch.ones(p.shape))
    return model


def twin_models(shape, device, dtype, seed=0):
    """transformers' Qwen2ForCausalLM with its own random init (seed 0), made on the device, and the
    project's Transformer holding a copy of the same weights. Returns (hf, ours)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                      num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                      num_key_value_heads=shape["kv_heads"], head_dim=shape["head_dim"], tie_word_embeddings=shape["tie"],
                      max_position_embeddings=4096, rope_theta=1e6, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(seed)
    try:
        with torch.device(device):
            hf = Qwen2ForCausalLM(cfg)
    except Exception as e:  # noqa: BLE001 (a transformers version that cannot build under a device context)
        say(f"  (building transformers' model on {device} failed: {type(e).__name__}: {e}; built on the CPU, then moved)")
        hf = Qwen2ForCausalLM(cfg).to(device)
    hf = hf.to(dtype).eval().requires_grad_(False)
    ours = empty_model(shape, device, dtype)
    theirs, mine = hf.state_dict(), ours.state_dict()
    if shape["tie"]:  # one matrix, reached through the embedding
        theirs.pop("lm_head.weight", None)
        mine.pop("lm_head.weight")
    if set(theirs) != set(mine):
        raise RuntimeError(f"parameter names differ: transformers only {sorted(set(theirs) - set(mine))[:3]}, "
                           f"ours only {sorted(set(mine) - set(theirs))[:3]}")
    with torch.no_grad():
        for key, t in mine.items():
            t.copy_(theirs[key])
    return hf, ours


def weight_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())  # a tied matrix counted once


# --------------------------------------------------------------------------------------------
# The run: settings, the record, the cache of models shared by sections


class OverBudget(BaseException):
    """Raised by the alarm when a section has used its time (not an Exception: no `except Exception` may swallow it)."""


class Run:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.dtype = DTYPES[args.dtype]
        self.sizes = QUICK if args.quick else FULL
        self.results = args.results
        self.id = time.strftime("%Y%m%d-%H%M%S")
        self.deadline = START + args.budget
        self.section_end = self.deadline  # set by run_section
        self.cache = {}

    def record(self, section, what, **data):
        if self.results:
            with open(self.results, "a") as f:
                f.write(json.dumps({"run": self.id, "section": section, "what": what, **data}) + "\n")

    def twins(self):
        """(hf, ours) at the 0.5B shape, made once."""
        if "twins" not in self.cache:
            seconds, self.cache["twins"] = timed(lambda: twin_models(self.sizes.small, self.device, self.dtype), self.device)
            say(f"  0.5B-shaped models made on {self.device} in {seconds:.1f} s (transformers' init, copied into ours), "
                f"{common.gib(weight_bytes(self.cache['twins'][1])):.2f} GiB of {self.args.dtype} weights each")
        return self.cache["twins"]

    def bandwidth(self, lm_head):
        if "bandwidth" not in self.cache:
            self.cache["bandwidth"] = bw = bandwidths(self.device, lm_head, self.sizes.copy_mib)
            say(f"  device bandwidth: copy {gb(bw['copy']):.0f} GB/s (read + write), read-only sum {gb(bw['read']):.0f} GB/s, "
                f"lm_head GEMV alone {gb(bw['gemv']):.0f} GB/s")
            self.record("device", "bandwidth_bytes_per_s", **bw)
        return self.cache["bandwidth"]

    def release(self, *keys):
        for key in keys:
            self.cache.pop(key, None)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def environment(run):
    import transformers

    env = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv), "torch": torch.__version__,
           "transformers": transformers.__version__, "device": str(run.device), "dtype": run.args.dtype,
           "quick": run.args.quick, "threads": torch.get_num_threads()}
    try:
        import peft

        env["peft"] = peft.__version__
    except ImportError:
        env["peft"] = None
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=common.ROOT, timeout=10)
        env["commit"] = out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["commit"] = None
    if run.device.type == "cuda":
        p = torch.cuda.get_device_properties(run.device)
        env.update(gpu=p.name, gpu_memory_gib=round(common.gib(p.total_memory), 1), sms=p.multi_processor_count,
                   cuda=torch.version.cuda)
    return env


# --------------------------------------------------------------------------------------------
# rollout: model.generate against transformers' generate


def rollout_sides(ours, hf, prompts, rows, new_tokens, device):
    """{name: f(n=new_tokens)} writing n tokens for every row, ours and transformers', as bench_rollout.sides_for."""
    samples = 1 if rows == 1 else G
    ids, start = M.left_pad(prompts, pad_id=0, device=device)
    attention_mask = (torch.arange(ids.shape[1], device=device)[None] >= start[:, None]).long()

    def run_ours(n=new_tokens):
        out = M.generate(ours, prompts, n, end_ids=[], pad_id=0, temperature=1.0, top_p=1.0, num_samples=samples,
                         generator=torch.Generator(device=device).manual_seed(1))
        assert out.tokens.shape == (rows, n)

    def run_hf(n=new_tokens):
        out = hf.generate(ids, attention_mask=attention_mask, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                          max_new_tokens=n, num_return_sequences=samples, eos_token_id=None, pad_token_id=0,
                          use_cache=True)
        assert out.shape == (rows, ids.shape[1] + n)

    return {"ours": run_ours, "transformers": run_hf}


def max_logit_diff(ours, hf, prompts, device):
    """Max |logit difference| of the two sides on left-padded prompts."""
    ids, start = M.left_pad(prompts, pad_id=0, device=device)
    mask = (torch.arange(ids.shape[1], device=device)[None] >= start[:, None]).long()
    with torch.no_grad():
        a = ours(ids, start=start).float()
        b = hf(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits.float()
    return (a - b)[mask.bool()].abs().max().item(), b[mask.bool()].abs().max().item()


def section_rollout(run):
    S, device = run.sizes, run.device
    hf, ours = run.twins()
    vocab, n = S.small["vocab"], S.new_tokens
    diff, scale = max_logit_diff(ours, hf, prompts_for(8, vocab), device)
    say(f"  same network: max |logit difference| {diff:.3g} on 8 left-padded prompts ({run.args.dtype}; logits up to {scale:.3g}); "
        f"transformers attention: {hf.config._attn_implementation}")
    run.record("rollout", "parity", max_logit_diff=diff, max_logit=scale, attn_implementation=hf.config._attn_implementation)
    bw = run.bandwidth(ours.lm_head)
    for rows, rounds in S.batches.items():
        sides = rollout_sides(ours, hf, prompts_for(rows, vocab), rows, n, device)
        calls = dict(sides)
        if rows == 1:  # one-token calls too, to take the prefill out of the per-step time
            calls.update({f"{k} 1 token": (lambda f=f: f(1)) for k, f in sides.items()})
        for f in sides.values():  # warm-up: kernels loaded, allocator primed
            f(2)
        med, wall = alternate(calls, rounds, device)
        tps = {k: rows * n / med[k] for k in sides}
        speedup = tps["ours"] / tps["transformers"]
        say(f"rollout 0.5B, batch {rows} ({'1 prompt' if rows == 1 else f'{rows // G} prompts x G={G}'}), {n} new tokens, "
            f"{run.args.dtype}: ours {tps['ours']:,.0f} tok/s vs transformers {tps['transformers']:,.0f} tok/s = {speedup:.2f}x "
            f"(medians of {rounds} alternating rounds)")
        entry = {"rows": rows, "new_tokens": n, "rounds": rounds, "tokens_per_s": tps, "speedup": speedup,
                 "call_s": {k: wall[k] for k in sides}}
        if rows == 1:
            step = {k: (med[k] - med[f"{k} 1 token"]) / (n - 1) for k in sides}
            wb = weight_bytes(ours)
            fraction = {k: wb / s / bw["copy"] for k, s in step.items()}
            say(f"  batch-1 decode step: ours {1000 * step['ours']:.2f} ms, transformers {1000 * step['transformers']:.2f} ms "
                f"for {wb / 2**20:,.0f} MiB of weights: ours reads {gb(wb / step['ours']):.0f} GB/s = {fraction['ours']:.3f} "
                f"of the copy bandwidth (transformers {fraction['transformers']:.3f}; goal >= 0.80)")
            entry.update(decode_step_s=step, weight_bytes=wb, fraction_of_copy=fraction)
        run.record("rollout", f"batch_{rows}", **entry)


# --------------------------------------------------------------------------------------------
# 7b: the paper's model size, and its GSM8K run time on this device


def decode_timings(model, prompts, samples, n, rounds, device):
    """Median seconds of generate writing n tokens and 1 token per row: (per decoding step, prefill)."""
    def f(k):
        return lambda: M.generate(model, prompts, k, end_ids=[], pad_id=0, temperature=1.0, num_samples=samples,
                                  generator=torch.Generator(device=device).manual_seed(1))

    f(2)()  # warm-up
    med, _ = alternate({"n": f(n), "1": f(1)}, rounds, device)
    return (med["n"] - med["1"]) / (n - 1), med["1"]


def section_7b(run):
    S, device, args = run.sizes, run.device, run.args
    shape, vocab = S.big, S.big["vocab"]
    seconds, model = timed(lambda: random_model(shape, device, run.dtype), device)
    wb = weight_bytes(model)
    say(f"  7B-shaped model: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, {common.gib(wb):.1f} GiB "
        f"of {args.dtype} weights, drawn on {device} in {seconds:.1f} s")
    m = {"weight_bytes": wb}

    config = tinylora.TinyLoRAConfig(u=1, n_tie=min(16, 7 * shape["layers"]))  # the paper's 13 parameters (--quick: 1)
    seconds, (adapter, count) = timed(lambda: tinylora.attach(model, config, cache_dir=None, quiet=True), device)
    targets = len(adapter.targets)
    say(f"7B tinylora.attach (u=1, n_tie={config.n_tie}: {count} parameters): randomized rank-2 SVD of {targets} targets on {device} "
        f"in {seconds:.1f} s")
    m["attach_s"] = seconds
    run.record("7b", "attach", seconds=seconds, targets=targets, trainable=count)
    with torch.no_grad():  # a trained-looking adapter, so merging has rounding to correct
        adapter.tensors["v"].copy_(torch.randn(adapter.tensors["v"].shape, generator=torch.Generator().manual_seed(0)) * 0.01)

    def merge_unmerge():
        with adapter.merged():
            pass

    merge_unmerge()
    m["merge_s"] = common.median([timed(merge_unmerge, device)[0] for _ in range(2)])
    say(f"7B merge + unmerge (once per GRPO step, around the rollout): {m['merge_s']:.2f} s")
    run.record("7b", "merge_unmerge", seconds=m["merge_s"])

    bw = run.bandwidth(model.lm_head)  # measured by the rollout section already, unless it was skipped
    with adapter.merged():  # rollouts sample from the merged weights
        step, _ = decode_timings(model, prompts_for(1, vocab), 1, S.big_b1_tokens, 2, device)
        fraction = wb / step / bw["copy"]
        say(f"7B batch-1 decode step: {1000 * step:.2f} ms for {common.gib(wb):.1f} GiB of weights = {gb(wb / step):.0f} GB/s, "
            f"{fraction:.2f} of the copy bandwidth ({gb(bw['copy']):.0f} GB/s)")
        run.record("7b", "decode_batch_1", step_s=step, fraction_of_copy=fraction, new_tokens=S.big_b1_tokens)

        rows = S.big_prompts * G
        short = prompts_for(rows, vocab)  # 24-40 tokens each
        step_short, prefill_short = decode_timings(model, short, G, S.big_tokens, 2 if not args.quick else 1, device)
        ctx_short = sum(map(len, short)) / len(short) + S.big_tokens / 2
        total = prefill_short + (S.big_tokens - 1) * step_short
        say(f"7B rollout, batch {rows} ({S.big_prompts} prompts x G={G}), {S.big_tokens} new tokens: "
            f"{rows * S.big_tokens / total:,.0f} tok/s; decode step {1000 * step_short:.1f} ms at ~{ctx_short:.0f} tokens of "
            f"context, prefill {prefill_short:.2f} s")
        run.record("7b", "decode_batch_short", rows=rows, new_tokens=S.big_tokens, step_s=step_short,
                   prefill_s=prefill_short, mean_context=ctx_short, tokens_per_s=rows * S.big_tokens / total)

        g = torch.Generator().manual_seed(2)
        long = torch.randint(1, vocab, (S.big_prompts, S.long_prompt), generator=g).tolist()
        seconds, peak = timed_peak(lambda: M.generate(model, long, S.long_tokens, [], 0, num_samples=G,
                                                      generator=torch.Generator(device=device).manual_seed(1)), device)
        prefill_long = timed(lambda: M.generate(model, long, 1, [], 0, num_samples=G), device)[0]
        step_long = (seconds - prefill_long) / (S.long_tokens - 1)
        ctx_long = S.long_prompt + S.long_tokens / 2
        say(f"7B rollout, batch {rows}, {S.long_prompt}-token prompts: decode step {1000 * step_long:.1f} ms at "
            f"~{ctx_long:.0f} tokens of context, prefill {prefill_long:.2f} s; peak memory above the weights "
            f"{gib_or_na(peak)} (KV cache of {rows} x {S.long_prompt + S.long_tokens} tokens)")
        run.record("7b", "decode_batch_long", rows=rows, prompt=S.long_prompt, new_tokens=S.long_tokens, step_s=step_long,
                   prefill_s=prefill_long, mean_context=ctx_long, peak_bytes=peak)
    # decoding step time as a + b x context, through the two measurements (both kept >= 0 against noise)
    per_token = max(0.0, (step_long - step_short) / (ctx_long - ctx_short))
    m.update(step_fixed_s=max(0.0, step_short - per_token * ctx_short), step_per_context_token_s=per_token,
             prefill_s=prefill_short, prefill_long_s=prefill_long, long_prompt=S.long_prompt)

    # one training micro-batch: the paper preset's 8 rows, of a quarter prompt and three quarters completion
    rows, width = S.micro_rows, S.micro_tokens
    prompt, completion = width // 4, width - width // 4
    g = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(1, vocab, (rows, prompt), generator=g).tolist()
    completions = torch.randint(1, vocab, (rows, completion), generator=g).to(device)
    lengths = torch.full((rows,), completion, device=device)
    advantages = torch.randn(rows, generator=g).to(device)

    def train_step():
        loss_of(grpo.sequence_logprobs(model, prompt_ids, completions, lengths), advantages, lengths).backward()
        assert torch.isfinite(adapter.tensors["v"].grad).all()
        adapter.tensors["v"].grad = None

    def forward_only():  # what recomputing old log-probs costs per micro-batch
        with torch.no_grad():
            grpo.sequence_logprobs(model, prompt_ids, completions, lengths)

    _, peak = timed_peak(train_step, device)  # also the warm-up
    forward_only()
    med, _ = alternate({"train": train_step, "forward": forward_only}, 3 if not args.quick else 1, device)
    say(f"7B training micro-batch, {rows} rows x {width} tokens ({completion} completion), TinyLoRA {count} parameters: "
        f"forward + backward {med['train']:.3f} s, forward alone {med['forward']:.3f} s; peak memory above the weights "
        f"{gib_or_na(peak)}")
    run.record("7b", "train_micro_batch", rows=rows, tokens=width, completion=completion, step_s=med["train"],
               forward_s=med["forward"], peak_bytes=peak)
    m.update(train_s=med["train"], forward_s=med["forward"], micro_tokens=rows * width)
    adapter.detach()
    del model, adapter
    run.release()
    gsm8k_estimate(run, m)


def gsm8k_estimate(run, m):
    """The paper's GSM8K run (train.py --preset gsm8k-paper) on this device, from the 7B measurements
    in `m`. Per step: merge + unmerge, the rollout's prefill and decoding (generate runs until the
    longest of its rows stops, every row computed until then), then the policy update in
    micro-batches (plus a no-grad pass for the old log-probs when a batch serves several updates)."""
    import settings  # the preset's numbers, from the one place that defines them

    preset, args, shape = {**settings.DEFAULTS, **settings.PRESETS["gsm8k-paper"]}, run.args, run.sizes.big
    prompts, samples, micro, cap = preset["prompts_per_step"], preset["samples"], preset["micro_batch"], preset["max_new_tokens"]
    epochs, rows = preset["epochs"], preset["prompts_per_step"] * preset["samples"]
    steps = epochs * math.ceil(GSM8K_TRAIN / prompts)
    Tp, mean = args.gsm8k_prompt, args.gsm8k_mean
    micro_tokens = micro * (Tp + 1.5 * mean)  # a micro-batch is as wide as its longest completion: ~1.5x the mean of 8
    passes = m["train_s"] + (m["forward_s"] if preset["mini_batches"] > 1 or epochs > 1 else 0.0)
    train_s = rows / micro * passes * micro_tokens / m["micro_tokens"]
    prefill = max(m["prefill_s"], m["prefill_long_s"] * Tp / m["long_prompt"])
    a, b = m["step_fixed_s"], m["step_per_context_token_s"]
    kv_bytes = rows * (Tp + cap) * shape["layers"] * 2 * shape["kv_heads"] * shape["head_dim"] * 2  # k and v, bf16
    say(f"GSM8K on this device, train.py --preset gsm8k-paper: {epochs} epochs x ceil({GSM8K_TRAIN}/{prompts}) = {steps} "
        f"steps of {prompts} prompts x {samples} samples, completions up to {cap} tokens, micro-batches of {micro}")
    say(f"  assumed: prompts ~{Tp} tokens (chat template + question + instruction), mean completion {mean} tokens "
        f"(--gsm8k-prompt, --gsm8k-mean); a micro-batch holds ~{micro_tokens:.0f} tokens ({micro} rows as wide as their longest, "
        f"taken as 1.5x the mean)")
    say(f"  decoding step = {1000 * a:.2f} ms + {1e6 * b:.2f} us x context tokens (the line through the two batch-{rows} runs); "
        f"the KV cache for {rows} rows x {Tp + cap} positions, allocated up front: {common.gib(kv_bytes):.0f} GiB")
    estimate = {"steps": steps, "prompt_tokens": Tp, "mean_completion": mean, "kv_cache_bytes": kv_bytes, "measured": m}
    for label, longest in (("typical", 2 * mean), ("worst", cap)):
        decode = longest * a + b * (longest * Tp + longest**2 / 2)
        step = m["merge_s"] + prefill + decode + train_s
        say(f"  longest completion {longest} ({'2x the mean' if label == 'typical' else f'a sample runs to the {cap} cap'}): "
            f"decode {longest} x {1000 * a:.2f} ms + {1e6 * b:.2f} us x ({longest} x {Tp} + {longest}^2/2) = {decode:.1f} s; "
            f"prefill {prefill:.2f} s; merge {m['merge_s']:.2f} s; update {rows // micro} micro-batches x {passes:.3f} s "
            f"x {micro_tokens:.0f}/{m['micro_tokens']} tokens = {train_s:.1f} s; step {step:.1f} s x {steps} = "
            f"{steps * step / 3600:.1f} h")
        estimate[label] = {"longest_completion": longest, "decode_s": decode, "prefill_s": prefill, "update_s": train_s,
                           "step_s": step, "run_hours": steps * step / 3600}
    say("  (evaluation, checkpoints and reward computation not included)")
    run.record("7b", "gsm8k_estimate", **estimate)


# --------------------------------------------------------------------------------------------
# train: one policy-gradient step, ours against PEFT's tinylora, and against the frozen base


def trl_logprobs(logits, index):
    """TRL's selective_log_softmax (trl.trainer.utils): gather - logsumexp for fp32 logits; for
    bf16 ones, log_softmax row by row (TRL's own branch for them)."""
    if logits.dtype in (torch.float32, torch.float64):
        return selective_log_softmax(logits, index)
    return torch.stack([torch.log_softmax(row, -1).gather(-1, idx[:, None])[:, 0] for row, idx in zip(logits, index)])


def section_train(run):
    S, device = run.sizes, run.device
    hf, ours = run.twins()
    prompts, completions, lengths, advantages = (t.to(device) for t in train_batch(S.train_rows, S.small["vocab"]))
    prompt_ids = prompts.tolist()
    adapter, n = tinylora.attach(ours, tinylora.TinyLoRAConfig(r=2, u=1, n_tie=1), cache_dir=None, quiet=True)
    scale = torch.ones((), device=device, requires_grad=True)  # the base's only trainable tensor (bench_train.py says why)
    hook = ours.model.embed_tokens.register_forward_hook(lambda module, args, out: out * scale)
    try:
        def ours_logp():
            return grpo.sequence_logprobs(ours, prompt_ids, completions, lengths)

        def ours_step():
            loss_of(ours_logp(), advantages, lengths).backward()
            adapter.tensors["v"].grad = scale.grad = None

        def base_step():
            with adapter.disabled():
                ours_step()

        sides = {"ours": ours_step, "base": base_step}
        logps = {"ours": ours_logp}
        peft_model = None
        try:
            from peft import TinyLoraConfig, get_peft_model

            config = TinyLoraConfig(r=2, u=1, weight_tying=0.0, target_modules=list(tinylora.TARGETS), init_weights=True)
            run.cache.pop("twins")  # hf is about to carry PEFT's layers
            seconds, peft_model = timed(lambda: get_peft_model(hf, config), device)  # a full SVD of every target
            say(f"  PEFT get_peft_model (tinylora r=2 u=1, full torch.linalg.svd of {len(adapter.targets)} targets on {device}): "
                f"{seconds:.1f} s")
            run.record("train", "peft_attach", seconds=seconds)
        except Exception as e:  # noqa: BLE001 (a peft without tinylora, or failing here: ours against the base only)
            say(f"  PEFT's tinylora unavailable ({type(e).__name__}: {e}): PEFT sides skipped")
        if peft_model is not None:
            ids = torch.cat([prompts, completions], dim=1)  # [B, PROMPT + COMPLETION], no padding

            def peft_logp(how):
                if how == "full":  # transformers' own loss recipe: every position's logits, upcast, log_softmax
                    logits = peft_model(input_ids=ids).logits[:, PROMPT - 1:-1]  # [B, COMPLETION, V]
                    return torch.log_softmax(logits.float(), -1).gather(-1, completions[..., None])[..., 0]
                logits = peft_model(input_ids=ids, logits_to_keep=COMPLETION + 1).logits[:, :-1]  # TRL's GRPOTrainer
                return trl_logprobs(logits, completions).float()

            for how in ("full", "trl"):
                def step(how=how):
                    loss_of(peft_logp(how), advantages, lengths).backward()
                    peft_model.zero_grad(set_to_none=True)

                sides[f"peft-{how}"] = step
                logps[f"peft-{how}"] = lambda how=how: peft_logp(how)
            peft_trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)

        with torch.no_grad():  # parity at v = 0: every side computes the base model's log-probs
            ref = logps["ours"]()
            diff = max([(f() - ref).abs().max().item() for k, f in logps.items() if k != "ours"], default=0.0)
        for step in sides.values():  # warm-up
            step()
        peaks = {side: timed_peak(step, device)[1] for side, step in sides.items() if side != "base"}
        med, wall = alternate(sides, S.train_rounds, device)
        rows, T = S.train_rows, PROMPT + COMPLETION
        say(f"training step, 0.5B, {rows} rows x {T} tokens ({COMPLETION} completion), {run.args.dtype}, TinyLoRA r=2 u=1 "
            f"on all {len(adapter.targets)} targets ({n} parameters); log-prob parity at v=0: max |diff| {diff:.2g}")
        record = {"rows": rows, "tokens": T, "rounds": S.train_rounds, "step_s": wall, "median_s": med, "peak_bytes": peaks,
                  "max_logp_diff": diff, "trainable": n}
        for ref in (k for k in sides if k.startswith("peft")):
            ratio = None if peaks["ours"] is None else peaks["ours"] / peaks[ref]
            say(f"  ours vs PEFT tinylora ({ref}, {peft_trainable} parameters): {1000 * med['ours']:.1f} vs "
                f"{1000 * med[ref]:.1f} ms per step = {med[ref] / med['ours']:.2f}x faster (goal >= 1.3x); peak memory above "
                f"the loaded model {gib_or_na(peaks['ours'])} vs {gib_or_na(peaks[ref])}"
                + (f" = {ratio:.2f}x (goal <= 0.6x)" if ratio is not None else ""))
            record[f"speedup_vs_{ref}"] = med[ref] / med["ours"]
            record[f"memory_ratio_vs_{ref}"] = ratio
        rounds = sorted(a / b - 1 for a, b in zip(wall["ours"], wall["base"]))
        overhead = med["ours"] / med["base"] - 1
        say(f"  adapter overhead: ours {1000 * med['ours']:.1f} vs frozen base {1000 * med['base']:.1f} ms per step = "
            f"{100 * overhead:+.1f}% (rounds {100 * rounds[0]:+.1f}% .. {100 * rounds[-1]:+.1f}%; goal < 5%)")
        record["adapter_overhead"] = overhead
        run.record("train", "step", **record)
    finally:
        hook.remove()
        adapter.detach()
        run.release("twins")


# --------------------------------------------------------------------------------------------
# svd: randomized against exact, on the device


def exact_svd_seconds(weights, device):
    return [timed(lambda W=W: svd.truncated_svd(W.float(), 2, exact=True), device)[0] for W in weights]


def section_svd(run, share_of_exact=0.4):
    """share_of_exact: the fraction of what is left of the section's time that the exact SVDs of
    the 0.5B shape may use; the layers it does not reach are extrapolated."""
    S, device = run.sizes, run.device
    W = torch.randn(256, 128, device=device)
    for exact in (False, True):  # warm-up: the solver libraries load on first use
        svd.truncated_svd(W, 2, exact=exact)
    small = spectral_model(S.small, S.small["layers"], device, run.dtype)
    seconds, (adapter, _) = timed(lambda: tinylora.attach(small, tinylora.TinyLoRAConfig(), cache_dir=None, quiet=True), device)
    targets = adapter.targets
    adapter.detach()
    layers = S.small["layers"]
    limit = time.monotonic() + share_of_exact * (run.section_end - time.monotonic())
    exact, done = 0.0, 0
    for layer in range(layers):
        exact += sum(exact_svd_seconds([t.linear.weight for t in targets[7 * layer:7 * layer + 7]], device))
        done += 1
        if time.monotonic() > limit:
            break
    exact *= layers / done
    say(f"SVD 0.5B, {len(targets)} targets on {device}: randomized attach {seconds:.2f} s; exact torch.linalg.svd "
        f"{exact:.1f} s ({done} of {layers} layers measured{', the rest extrapolated' if done < layers else ''}) = "
        f"{exact / seconds:.1f}x slower")
    run.record("svd", "0.5B", attach_randomized_s=seconds, exact_s=exact, layers_measured=done, speedup=exact / seconds)
    del small, targets
    run.release()

    big = spectral_model(S.big, 1, device, run.dtype)
    seconds, _ = timed(lambda: tinylora.attach(big, tinylora.TinyLoRAConfig(), cache_dir=None, quiet=True), device)
    kinds = {t.kind: t.linear.weight for t in tinylora.find_targets(big)}
    q, k, gate = exact_svd_seconds([kinds["q_proj"], kinds["k_proj"], kinds["gate_proj"]], device)
    layer = 2 * q + 2 * k + 3 * gate  # o ~ q, v ~ k, up and down ~ gate, as bench_svd.py
    say(f"SVD 7B, one layer on {device}: randomized attach {seconds:.2f} s; exact {layer:.1f} s (q {q:.2f}, k {k:.2f}, gate "
        f"{gate:.2f} s measured; o ~ q, v ~ k, up and down ~ gate) = {layer / seconds:.0f}x slower; whole model x28: "
        f"randomized {28 * seconds:.0f} s, exact {28 * layer / 60:.1f} min")
    run.record("svd", "7B_layer", attach_randomized_s=seconds, exact_q_k_gate_s=[q, k, gate], exact_layer_s=layer,
               speedup=layer / seconds)


# --------------------------------------------------------------------------------------------
# The sections, each under its own time budget

SECTIONS = {"rollout": (section_rollout, 65), "7b": (section_7b, 75), "train": (section_train, 55), "svd": (section_svd, 40)}


def run_section(run, name, budget):
    """Run one section under min(budget, what is left of --budget) seconds: an alarm stops it at
    that time; a failure is printed and recorded, and the next section runs either way."""
    allowed = min(budget, run.deadline - time.monotonic())
    if allowed < (1 if run.args.quick else 10):
        say(f"[{name}] skipped: {max(0.0, allowed):.0f} s left of the run's --budget {run.args.budget:.0f} s")
        run.record(name, "skipped", seconds_left=allowed)
        return

    def stop(signum, frame):
        raise OverBudget()

    say(f"== {name} (budget {allowed:.0f} s)")
    start = time.monotonic()
    run.section_end = start + allowed
    signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, allowed)
    try:
        try:
            SECTIONS[name][0](run)
            outcome = "done"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except OverBudget:
        outcome = "over budget"
        say(f"[{name}] stopped: over its {allowed:.0f} s budget; the lines above are what it measured")
    except Exception as e:  # noqa: BLE001 (one section's failure must not cost the others)
        outcome = f"failed: {type(e).__name__}: {e}"
        say(f"[{name}] failed: {type(e).__name__}: {e}")
        traceback.print_exc(file=sys.stdout)
    try:
        run.release()
    except Exception as e:  # noqa: BLE001
        say(f"  (cleaning up after {name}: {type(e).__name__}: {e})")
    seconds = time.monotonic() - start
    say(f"[{name}] {outcome} in {seconds:.0f} s")
    run.record(name, "section", outcome=outcome, seconds=seconds, budget_s=allowed)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny shapes, few tokens, one round")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--budget", type=float, default=210, help="seconds for the whole run, from start-up")
    parser.add_argument("--results", help="JSON-lines file to append to (default: $OUT/gpu_results.jsonl, "
                                          "else bench/gpu_results.jsonl; --quick: none)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: 1 on the CPU, torch's own on a GPU)")
    parser.add_argument("--gsm8k-prompt", type=int, default=130, help="GSM8K estimate: prompt tokens")
    parser.add_argument("--gsm8k-mean", type=int, default=300, help="GSM8K estimate: mean completion tokens")
    args = parser.parse_args()
    if args.results is None and not args.quick:
        args.results = os.path.join(os.environ["OUT"] if os.environ.get("OUT") else common.HERE, "gpu_results.jsonl")
    if args.threads is None and torch.device(args.device).type == "cpu":
        args.threads = 1
    common.setup(args.threads or torch.get_num_threads())
    run = Run(args)
    env = environment(run)
    say(f"bench_gpu: {env.get('gpu', args.device)}"
        + (f" ({env['sms']} SMs, {env['gpu_memory_gib']} GiB, CUDA {env['cuda']})" if "gpu" in env else "")
        + f", torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, {args.dtype}"
        + (", --quick (tiny shapes)" if args.quick else "") + f"; results -> {args.results or 'not recorded'}")
    run.record("env", "environment", **env)
    for name in args.sections:
        run_section(run, name, SECTIONS[name][1])
    say(f"bench_gpu: {time.monotonic() - START:.0f} s in all")


if __name__ == "__main__":
    main()
