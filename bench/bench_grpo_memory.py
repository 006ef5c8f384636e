"""Peak memory of a GRPO step against a forward pass over the same batch.

    .venv/bin/python bench/bench_grpo_memory.py            (~1 min on 2 shared cores)
    .venv/bin/python bench/bench_grpo_memory.py --quick    (smoke test, tiny sizes)

Model: Qwen2.5-0.5B width with 4 layers (896 hidden, 4864 MLP, 14/2 heads, 151,936 vocab, tied),
fp32, random weights written by transformers and loaded by model.load_model, TinyLoRA u=1,
n_tie=1 on all 7 targets. Batch: `--prompts` prompts of 64 tokens x G=4 completions of 16-64
tokens (random ids and lengths, a Rollout built by hand: no sampling), random 0/1 rewards.

Each measurement runs in a fresh child process: load, attach, read every weight once (the loader
maps the checkpoint file, so weights become resident on first use), reset the RSS high-water mark
(5 > /proc/self/clear_refs), run, and report the mark minus the RSS before the run: the memory
the run needs above the loaded model.
  forward      no gradients: grpo.sequence_logprobs of the whole batch at once (chunked lm_head)
  forward-logits  no gradients: the model's plain forward, logits of every position [B, T, vocab]
  grpo-whole   grpo.grpo_update, one optimizer step (mini_batches=1) on the whole batch in one
               micro-batch: forward + backward over every row at once
  grpo-default grpo.grpo_update with GRPOConfig's defaults (2 mini-batches, micro-batches of 4
               completions, old log-probs recomputed first)
Prints one line per comparison and appends a JSON record to bench/results.jsonl.
"""

import argparse
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (puts the repository root on sys.path)
import grpo  # noqa: E402
import model as M  # noqa: E402
import tinylora  # noqa: E402

G, PROMPT, COMPLETION = 4, 64, 64
RUNS = ("forward", "forward-logits", "grpo-whole", "grpo-default")


def random_rollout(prompts, vocab, seed=0):
    """A Rollout of `prompts` x G random completions with random lengths in [16, COMPLETION]."""
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(1, vocab, (prompts, PROMPT), generator=g).tolist()
    N = prompts * G
    lengths = torch.randint(16, COMPLETION + 1, (N,), generator=g)
    mask = grpo.length_mask(lengths, COMPLETION)
    completions = torch.randint(1, vocab, (N, COMPLETION), generator=g).masked_fill(~mask, 0)
    logprobs = (-5 * torch.rand(N, COMPLETION, generator=g)).masked_fill(~mask, 0.0)
    rewards = torch.randint(0, 2, (prompts, G), generator=g).float()
    return grpo.Rollout(prompt_ids, G, completions, lengths, logprobs, [""] * N), rewards


def child(run, path, prompts, vocab):
    common.setup(torch.get_num_threads())
    model = M.load_model(path, dtype=torch.float32, device="cpu")
    adapter, _ = tinylora.attach(model, tinylora.TinyLoRAConfig(r=2, u=1, n_tie=1), cache_dir=None, quiet=True)
    rollout, rewards = random_rollout(prompts, vocab)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-3)
    rows = [p for p in rollout.prompt_ids for _ in range(G)]
    common.touch(model)
    baseline = common.start_peak()
    if run == "forward":
        with torch.no_grad():
            grpo.sequence_logprobs(model, rows, rollout.completions, rollout.lengths)
    elif run == "forward-logits":
        ids, start = M.left_pad([p + c[:n].tolist() for p, c, n in zip(rows, rollout.completions, rollout.lengths.tolist())], 0)
        with torch.no_grad():
            model(ids, start=start)
    else:
        cfg = grpo.GRPOConfig(mini_batches=2, micro_batch_size=4)  # the micro-batched run this bench records
        if run == "grpo-whole":
            cfg.mini_batches, cfg.micro_batch_size = 1, len(rows)
        grpo.grpo_update(model, rollout, rewards, optimizer, cfg, adapter)
    print(json.dumps({"run": run, "peak_bytes": common.peak_since_start(baseline), "baseline_rss": baseline}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=4, help="prompts per batch (x G=4 completions)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 layer, 1 prompt")
    parser.add_argument("--child", nargs=4, metavar=("RUN", "PATH", "PROMPTS", "VOCAB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        run, path, prompts, vocab = args.child
        return child(run, path, int(prompts), int(vocab))

    common.setup(args.threads)
    shape = dict(common.QWEN05_WIDTH, **({"layers": 1} if args.quick else {}))
    prompts = 1 if args.quick else args.prompts
    rollout, _ = random_rollout(prompts, shape["vocab"])
    record = {**common.new_record(), "shape": shape, "prompts": prompts, "samples_per_prompt": G, "prompt_tokens": PROMPT,
              "completion_tokens": rollout.lengths.tolist()}
    with tempfile.TemporaryDirectory(prefix="bench_grpo_memory_") as workdir:
        common.random_checkpoint(workdir, **shape)
        children = common.child_peaks(os.path.abspath(__file__), {run: [run, workdir, prompts, shape["vocab"]] for run in RUNS})
    peaks = {run: children[run]["peak_bytes"] for run in RUNS}
    record["peak_bytes"] = peaks
    N, tokens = prompts * G, int(rollout.lengths.sum())
    print(f"GRPO step memory, 0.5B width x {shape['layers']} layers, fp32, {N} completions ({prompts} prompt(s) x G={G}, "
          f"{PROMPT}-token prompts, {tokens} completion tokens); peak RSS above the loaded model:")
    print(f"  forward only (sequence_logprobs, no grad): {common.gib(peaks['forward']):.2f} GiB; "
          f"plain forward with full logits: {common.gib(peaks['forward-logits']):.2f} GiB")
    for run, what in (("grpo-whole", "whole batch in one backward"), ("grpo-default", "default micro-batches of 4")):
        print(f"  GRPO step ({what}): {common.gib(peaks[run]):.2f} GiB = {peaks[run] / peaks['forward']:.2f}x the forward-only "
              f"pass ({peaks[run] / peaks['forward-logits']:.2f}x the full-logits forward)")
    if args.quick:
        print("  (--quick: smoke test, not recorded)")
    else:
        common.append_record(record)


if __name__ == "__main__":
    main()
