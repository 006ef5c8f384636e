"""One policy-gradient training step: this project against PEFT's `tinylora`, and against the
frozen base alone.

    .venv/bin/python bench/bench_train.py            (~8 min on 2 shared cores)
    .venv/bin/python bench/bench_train.py --quick    (smoke test, tiny sizes)

The step: log-probs of the completion tokens, the clipped policy loss (grpo.policy_loss, token
mean, on-policy), backward to the trainable tensors. TinyLoRA u=1, n_tie=1, r=2 on all 7 targets
of every layer (28 trainable numbers on 4 layers), on a Qwen2.5-0.5B-width model with 4 layers
(896 hidden, 4864 MLP, 14/2 heads, 151,936 vocab, tied), fp32, weights written once by
transformers' Qwen2ForCausalLM (random init, seed 0) and loaded by both sides. Rows of 128
tokens (64 prompt + 64 completion, every completion full length): 32 rows for peak memory (one
step per side), 8 rows for speed (32-row steps, repeated and alternated over five sides, do not
fit in `make bench`'s 15 minutes).

Sides, timed alternately in one process; ratios are of median CPU times over `--repeats` rounds
(wall-time ratios printed beside them):
  ours           grpo.sequence_logprobs (lm_head + log-softmax only on completion positions,
                 1024 rows at a time, recomputed in backward) + the adapter's forward hooks
  ours-textbook  the same with textbook=True: grpo.textbook_logprobs, the completion positions'
                 logits at once, log_softmax, gather, autograd's backward (the [rows, vocab] softmax
                 kept for backward); the same model as ours in the timed process, its own in the
                 memory child
  peft-full      PEFT TinyLoraConfig(r=2, u=1, weight_tying=0) on Qwen2ForCausalLM; the plain
                 transformers recipe: logits of every position, log_softmax, gather
  peft-trl       the same PEFT model, log-probs as TRL's GRPOTrainer computes them: logits of the
                 completion positions only (logits_to_keep), gather - logsumexp row by row
  base           ours with the adapter switched off (adapter.disabled()); the only trainable
                 tensor is a scalar multiplying the embedding output, so backward still runs
                 through every layer, as it must to reach the adapter's v in layer 0 (a scalar on
                 the final norm's output would skip the layers' backward and flatter the base)
Peak memory (ours, ours-textbook and the two PEFT sides): each in a fresh child process, so one side's peak cannot hide the other's: load,
read every weight once (both loaders map the checkpoint file, so weights become resident on first
use), reset the RSS high-water mark (5 > /proc/self/clear_refs); the step's peak is the mark after
one step minus the RSS before it: memory above the loaded model.
Prints one line per comparison and appends a JSON record to bench/results.jsonl.
"""

import argparse
import json
import os
import sys
import tempfile
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (puts the repository root on sys.path)
import grpo  # noqa: E402
import model as M  # noqa: E402
import tinylora  # noqa: E402

PROMPT, COMPLETION = 64, 64


def batch(rows, vocab, seed=0):
    """Random prompts [rows, PROMPT] and full-length completions [rows, COMPLETION], advantages."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(1, vocab, (rows, PROMPT), generator=g)
    completions = torch.randint(1, vocab, (rows, COMPLETION), generator=g)
    advantages = torch.randn(rows, generator=g)
    return prompts, completions, torch.full((rows,), COMPLETION), advantages


def loss_of(logp, advantages, lengths):
    mask = grpo.length_mask(lengths, logp.shape[1])
    return grpo.policy_loss(logp, logp.detach(), advantages, mask, grpo.GRPOConfig(agg="token-mean"))[0]


# ---- the sides


@dataclass
class Side:
    step: object  # () -> None: one training step, gradients cleared afterwards
    logp: object  # () -> [B, COMPLETION] log-probs, for the parity check
    model: torch.nn.Module
    trainable: int
    adapter: object = None  # ours: the tinylora.Adapter


def build_ours(path, data, adapter_on=True, textbook=False):
    prompts, completions, lengths, advantages = data
    model = M.load_model(path, dtype=torch.float32, device="cpu")
    adapter, n = tinylora.attach(model, tinylora.TinyLoRAConfig(r=2, u=1, n_tie=1), cache_dir=None, quiet=True)
    prompt_ids = prompts.tolist()
    scale = torch.ones((), requires_grad=True)  # the base's only trainable tensor (see the docstring)
    model.model.embed_tokens.register_forward_hook(lambda module, args, out: out * scale)

    def logp(plain=textbook):
        return grpo.sequence_logprobs(model, prompt_ids, completions, lengths, textbook=plain)

    def step(plain=textbook):
        if adapter_on:
            loss_of(logp(plain), advantages, lengths).backward()
        else:
            with adapter.disabled():
                loss_of(logp(plain), advantages, lengths).backward()
        adapter.tensors["v"].grad = scale.grad = None

    return Side(step, logp, model, n, adapter)


def selective_log_softmax(logits, index):
    """TRL's (trl.trainer.utils) for fp32 logits: gather minus a logsumexp computed row by row."""
    selected = torch.gather(logits, dim=-1, index=index.unsqueeze(-1)).squeeze(-1)
    return selected - torch.stack([torch.logsumexp(row, dim=-1) for row in logits])


def build_peft(path, data, how, peft_model=None):
    """how: 'full' or 'trl' (see the docstring); peft_model: reuse one already built."""
    from peft import TinyLoraConfig, get_peft_model

    prompts, completions, lengths, advantages = data
    if peft_model is None:  # PEFT computes a full SVD of every target here
        config = TinyLoraConfig(r=2, u=1, weight_tying=0.0, target_modules=list(tinylora.TARGETS), init_weights=True)
        peft_model = get_peft_model(common.load_reference(path), config)
    n = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    ids = torch.cat([prompts, completions], dim=1)  # [B, PROMPT + COMPLETION], no padding

    def logp():
        if how == "full":  # every position's logits, log_softmax, gather
            logits = peft_model(input_ids=ids).logits[:, PROMPT - 1:-1]  # [B, COMPLETION, V]
            return torch.log_softmax(logits, dim=-1).gather(-1, completions[..., None])[..., 0]
        logits = peft_model(input_ids=ids, logits_to_keep=COMPLETION + 1).logits[:, :-1]  # TRL's recipe
        return selective_log_softmax(logits, completions)

    def step():
        loss_of(logp(), advantages, lengths).backward()
        peft_model.zero_grad(set_to_none=True)

    return Side(step, logp, peft_model, n)


def build(side, path, data):
    if side in ("ours", "ours-textbook", "base"):
        return build_ours(path, data, adapter_on=side != "base", textbook=side == "ours-textbook")
    return build_peft(path, data, side.removeprefix("peft-"))


# ---- peak memory of one step, in a child process


def child(side, path, rows, vocab):
    common.setup(torch.get_num_threads())
    built = build(side, path, batch(rows, vocab))
    common.touch(built.model)
    baseline = common.start_peak()
    built.step()
    print(json.dumps({"side": side, "peak_bytes": common.peak_since_start(baseline), "baseline_rss": baseline}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=8, help="completions per timed step")
    parser.add_argument("--memory-rows", type=int, default=32, help="completions per step measured for peak memory")
    parser.add_argument("--repeats", type=int, default=4, help="alternating rounds of timed steps")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 layer, 2 rows, 1 round")
    parser.add_argument("--child", nargs=4, metavar=("SIDE", "PATH", "ROWS", "VOCAB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        side, path, rows, vocab = args.child
        return child(side, path, int(rows), int(vocab))

    common.setup(args.threads)
    shape = dict(common.QWEN05_WIDTH, **({"layers": 1} if args.quick else {}))
    rows, memory_rows, repeats = (2, 2, 1) if args.quick else (args.rows, args.memory_rows, args.repeats)
    record = {**common.new_record(), "shape": shape, "rows": rows, "memory_rows": memory_rows, "prompt": PROMPT,
              "completion": COMPLETION, "repeats": repeats, "adapter": "tinylora r=2 u=1 n_tie=1, 7 targets"}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as workdir:
        run(args, shape, rows, memory_rows, repeats, record, workdir)


def run(args, shape, rows, memory_rows, repeats, record, workdir):
    """Build the sides on a fresh checkpoint in `workdir`, time them, measure their memory, print, record."""
    common.random_checkpoint(workdir, **shape)
    data = batch(rows, shape["vocab"])
    built = {side: build(side, workdir, data) for side in ("ours", "peft-full")}
    built["peft-trl"] = build_peft(workdir, data, "trl", peft_model=built["peft-full"].model)
    ours = built["ours"]
    built["ours-textbook"] = Side(lambda: ours.step(plain=True), lambda: ours.logp(plain=True), ours.model,
                                  ours.trainable, ours.adapter)
    adapter = built["ours"].adapter

    # parity at v = 0: every side computes the base model's log-probs (this also pages the weights in)
    with torch.no_grad():
        ref = built["peft-full"].logp()
        sides = ("ours", "ours-textbook", "peft-trl")
        record["max_logp_diff"] = max((built[s].logp() - ref).abs().max().item() for s in sides)
    record["trainable"] = {s: built[s].trainable for s in built}

    def base_step():  # the model of "ours" with the adapter off; the embedding scalar is still trained
        with adapter.disabled():
            built["ours"].step()

    wall, cpu = common.interleaved({**{s: built[s].step for s in built}, "base": base_step}, repeats)
    med = {s: common.median(t) for s, t in cpu.items()}
    record.update(step_cpu_s=cpu, step_wall_s=wall)

    del built, adapter
    measured = ("ours", "ours-textbook", "peft-full", "peft-trl")
    children = common.child_peaks(os.path.abspath(__file__), {s: [s, workdir, memory_rows, shape["vocab"]] for s in measured})
    peaks = {s: children[s]["peak_bytes"] for s in measured}
    record["peak_bytes"] = peaks

    B, T = rows, PROMPT + COMPLETION
    print(f"training step, 0.5B width x {shape['layers']} layers, rows of {T} tokens ({COMPLETION} completion), fp32, "
          f"{args.threads} thread(s); time at {B} rows, peak memory at {memory_rows} rows; "
          f"log-prob parity at v=0: max |diff| {record['max_logp_diff']:.1e}")
    wall_med = {s: common.median(t) for s, t in wall.items()}
    refs = ("peft-full", "peft-trl")
    for ours, suffix in (("ours", ""), ("ours-textbook", "_textbook")):
        record["speedup" + suffix] = {ref: med[ref] / med[ours] for ref in refs}
        record["memory_ratio" + suffix] = {ref: peaks[ours] / peaks[ref] for ref in refs}
        for ref in refs:
            print(f"  {ours} vs PEFT tinylora ({ref}): {med[ours]:.2f} vs {med[ref]:.2f} CPU s per step = "
                  f"{med[ref] / med[ours]:.2f}x faster (wall {wall_med[ref] / wall_med[ours]:.2f}x; goal >= 1.3x); peak "
                  f"memory above the loaded model {common.gib(peaks[ours]):.2f} vs {common.gib(peaks[ref]):.2f} GiB = "
                  f"{peaks[ours] / peaks[ref]:.2f}x (goal <= 0.6x)")
    overhead = med["ours"] / med["base"] - 1
    rounds = sorted(a / b - 1 for a, b in zip(cpu["ours"], cpu["base"]))
    record["adapter_overhead"] = overhead
    print(f"  adapter overhead: ours {med['ours']:.2f} vs frozen base {med['base']:.2f} CPU s per step = {100 * overhead:+.1f}% "
          f"(rounds {100 * rounds[0]:+.1f}% .. {100 * rounds[-1]:+.1f}%, wall {100 * (wall_med['ours'] / wall_med['base'] - 1):+.1f}%; "
          f"goal < 5%)")
    if args.quick:
        print("  (--quick: smoke test, not recorded)")
    else:
        common.append_record(record)


if __name__ == "__main__":
    main()
