"""Rollout speed: model.generate against transformers' generate, on the same weights and prompts.

    .venv/bin/python bench/bench_rollout.py            (~4 min on 2 shared cores)
    .venv/bin/python bench/bench_rollout.py --quick    (smoke test, tiny sizes)

Both sides sample at temperature 1, top_p 1 (transformers: top_k=0, so no top-50 cut) with a
KV cache, and always write the full `--new-tokens` (ours: no end ids; transformers:
eos_token_id=None). Prompts are random, 24-40 tokens, left-padded (transformers gets the
attention mask and derives the same positions). "batch" is the number of sequences decoded
together: 1 = one prompt, one sample; 8 and 32 = 2 and 8 prompts x G = 4 samples. Ours prefills
each prompt once and copies its KV cache G times (as GRPO rollouts run); transformers is given
num_return_sequences=G, which repeats each prompt G times before its prefill.

Two shapes, weights written once by transformers' Qwen2ForCausalLM (random init, seed 0) and
loaded by model.load_model, fp32, one thread:
  toy    toy/base/config.json's shape: 2 layers, 128 hidden, 110 vocab (goal: >= 2x)
  0.5B   Qwen2.5-0.5B's width (896 hidden, 4864 MLP, 14/2 heads, 151,936 vocab, tied) with 4
         layers (goal: never slower, and batch-1 decode reading the weights at >= 80% of the
         memory copy bandwidth measured in the same run)
Bandwidth: copy = 2 x bytes / time of a 256 MiB tensor .copy_() (bytes read + bytes written, as
STREAM counts them); decode reads every weight once a step (lm_head included; the embedding
matrix is lm_head's, counted once), and a decode step's time is (time for N tokens - time for
1 token) / (N - 1), so the prefill is left out. Also printed: the read-only bandwidth of a sum
over the same tensor (the ceiling for a step that only reads), and what lm_head's weight times one
vector alone reaches (the BLAS kernel both sides' batch-1 steps spend most of their time in).
Tokens/s = batch x new tokens / wall time of the whole call (prefill included); ratios are of
medians over rounds in which the sides alternate, of wall time and (less disturbed by other jobs
on a shared machine) of CPU time. One line per comparison; a JSON record is
appended to bench/results.jsonl.
"""

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (puts the repository root on sys.path)
import model as M  # noqa: E402

G = 4  # samples per prompt for batches > 1


def prompts_for(batch, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_prompts = 1 if batch == 1 else batch // G
    return [torch.randint(1, vocab, (int(torch.randint(24, 41, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n_prompts)]


def sides_for(ours, hf, prompts, batch, new_tokens):
    """{name: callable} generating `new_tokens` tokens for every row, ours and transformers'."""
    samples = 1 if batch == 1 else G
    ids, start = M.left_pad(prompts, pad_id=0)
    attention_mask = (torch.arange(ids.shape[1])[None] >= start[:, None]).long()

    def run_ours(n=new_tokens):
        out = M.generate(ours, prompts, n, end_ids=[], pad_id=0, temperature=1.0, top_p=1.0, num_samples=samples,
                         generator=torch.Generator().manual_seed(1))
        assert out.tokens.shape == (batch, n)

    def run_hf(n=new_tokens):
        out = hf.generate(ids, attention_mask=attention_mask, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                          max_new_tokens=n, num_return_sequences=samples, eos_token_id=None, pad_token_id=0,
                          use_cache=True)
        assert out.shape == (batch, ids.shape[1] + n)

    return {"ours": run_ours, "transformers": run_hf}


def bandwidths(lm_head, mib=256):
    """Bytes per second, best of 5 each: copy (a .copy_() between two tensors, bytes read + written),
    read (a sum over one tensor) and gemv (lm_head's weight times one vector: the largest read of a
    batch-1 decoding step, on the same BLAS kernel both sides use)."""
    src = torch.randn(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    x = torch.randn(1, lm_head.in_features)
    best = {"copy": 0.0, "read": 0.0, "gemv": 0.0}
    for _ in range(5):
        for name, f, nbytes in (("copy", lambda: dst.copy_(src), 2 * src.numel() * 4), ("read", src.sum, src.numel() * 4),
                                ("gemv", lambda: lm_head(x), lm_head.weight.numel() * lm_head.weight.element_size())):
            start = time.perf_counter()
            f()
            best[name] = max(best[name], nbytes / (time.perf_counter() - start))
    return best


def check_same_model(ours, hf, prompts):
    """Max |logit difference| of the two sides on the (left-padded) prompts: same weights, same network."""
    ids, start = M.left_pad(prompts, pad_id=0)
    attention_mask = (torch.arange(ids.shape[1])[None] >= start[:, None]).long()
    with torch.no_grad():
        a = ours(ids, start=start)
        b = hf(ids, attention_mask=attention_mask, position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0)).logits
    return (a - b)[attention_mask.bool()].abs().max().item()


def run_shape(name, shape, repeats, new_tokens, record):
    """repeats: {batch: alternating rounds}."""
    with tempfile.TemporaryDirectory(prefix=f"bench_rollout_{name}_") as workdir:  # ours maps the file: read it in here
        hf = common.random_checkpoint(workdir, **shape)
        ours = M.load_model(workdir, dtype=torch.float32, device="cpu")
        common.touch(ours)
        common.touch(hf)
    weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())  # tied matrix counted once
    result = {"shape": shape, "weight_bytes": weight_bytes, "max_logit_diff": check_same_model(ours, hf, prompts_for(8, shape["vocab"]))}
    for batch in repeats:
        sides = sides_for(ours, hf, prompts_for(batch, shape["vocab"]), batch, new_tokens)
        timed, bw = dict(sides), []
        bandwidth = batch == 1 and name != "toy"
        if bandwidth:  # one-token runs, to take the prefill out of the per-step time; bandwidth in between
            timed.update({f"{k} 1 token": (lambda f=f: f(1)) for k, f in sides.items()})
            timed["bandwidth"] = lambda: bw.append(bandwidths(ours.lm_head))
        for f in sides.values():  # warm-up: first-call allocations (touch paged the weights in)
            f(1)
        wall, cpu = common.interleaved(timed, repeats[batch])
        med = {k: common.median(v) for k, v in wall.items()}
        med_cpu = {k: common.median(cpu[k]) for k in sides}
        tps = {k: batch * new_tokens / med[k] for k in sides}
        entry = {"tokens_per_s": tps, "call_wall_s": {k: wall[k] for k in sides}, "call_cpu_s": {k: cpu[k] for k in sides},
                 "speedup": tps["ours"] / tps["transformers"], "speedup_cpu": med_cpu["transformers"] / med_cpu["ours"]}
        print(f"rollout {name}, batch {batch} ({'1 prompt' if batch == 1 else f'{batch // G} prompts x G={G}'}), {new_tokens} new tokens: "
              f"ours {tps['ours']:.0f} tok/s vs transformers {tps['transformers']:.0f} tok/s = {entry['speedup']:.2f}x "
              f"(CPU time {entry['speedup_cpu']:.2f}x; goal {'>= 2x' if name == 'toy' else '>= 1.0x'})")
        if bandwidth:
            band = {k: common.median([b[k] for b in bw]) for k in bw[0]}  # medians over the rounds
            step = {k: (med[k] - med[f"{k} 1 token"]) / (new_tokens - 1) for k in sides}
            entry.update(decode_step_s=step, bandwidth=band,
                         fraction_of_copy={k: weight_bytes / s / band["copy"] for k, s in step.items()},
                         fraction_of_read={k: weight_bytes / s / band["read"] for k, s in step.items()})
            f = entry["fraction_of_copy"]
            print(f"  batch-1 decode step: ours {1000 * step['ours']:.1f} ms, transformers {1000 * step['transformers']:.1f} ms "
                  f"for {weight_bytes / 2**20:.0f} MiB of weights: ours reads {weight_bytes / step['ours'] / 1e9:.1f} GB/s = "
                  f"{f['ours']:.2f} of the copy bandwidth (goal >= 0.80; transformers {f['transformers']:.2f}), "
                  f"{entry['fraction_of_read']['ours']:.2f} of read-only")
            print(f"  bandwidth: copy {band['copy'] / 1e9:.1f} GB/s (read + write), read-only sum {band['read'] / 1e9:.1f} GB/s, "
                  f"lm_head GEMV alone {band['gemv'] / 1e9:.1f} GB/s")
        entry["rounds"] = repeats[batch]
        result[f"batch_{batch}"] = entry
    record[name] = result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3,
                        help="alternating rounds at 0.5B width, batches 1 and 8 (batch 32: one fewer; toy: 4x as many)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="smoke test: 4 new tokens, 1 round, 1 layer at 0.5B width")
    args = parser.parse_args()
    common.setup(args.threads)
    new_tokens, repeats = (4, 1) if args.quick else (args.new_tokens, args.repeats)
    record = {**common.new_record(), "new_tokens": new_tokens, "samples_per_prompt": G}
    run_shape("toy", common.TOY, {1: 4 * repeats, 8: 4 * repeats, 32: 4 * repeats}, new_tokens, record)
    run_shape("0.5B", dict(common.QWEN05_WIDTH, **({"layers": 1} if args.quick else {})),
              {1: repeats, 8: repeats, 32: max(1, repeats - 1)}, new_tokens, record)  # batch 32: ~1 min a round
    if args.quick:
        print("(--quick: smoke test, not recorded)")
    else:
        common.append_record(record)


if __name__ == "__main__":
    main()
