"""Train a TinyLoRA adapter with GRPO (or SFT, the paper's baseline) and evaluate it.

    python train.py                       the embedded default: the project's toy base model
                                          (toy/, see docs/toy.md) and 13 trained parameters
    python train.py --model DIR --train-data TRAIN.jsonl --eval-data TEST.jsonl --preset gsm8k-paper
                                          a real Qwen2.5 checkpoint on GSM8K, on one GPU
    python train.py --eval-only --model DIR --eval-data TEST.jsonl [--adapter FILE]
                                          accuracy of a model, with or without an adapter
    torchrun --standalone --nproc_per_node=N train.py ...
                                          the same run on N GPUs (data-parallel; docs/scaling.md)

One GRPO step (grpo.py has the pieces, docs/grpo.md the equations):

    prompts  <- the next `prompts_per_step` problems (a fixed shuffle per epoch)
    rollout  <- G samples per prompt with the adapter folded into the weights
    rewards  <- 1 if the last `#### N` of the completion equals the answer, else 0
    update   <- group advantages, clipped policy loss through the low-rank path, optimizer step(s)

Settings: settings.py (every flag, its default, the presets, the checks). The run folder (--out,
default runs/<date-time>; runs.py) receives args.json (every setting and the commands),
metrics.jsonl (a line per step), samples.jsonl (GRPO: the first SAMPLES_PER_STEP completions of
every step), eval_{before,after}_{greedy,sampled}.jsonl (every evaluation completion),
checkpoint.safetensors (every --save-every steps and on Ctrl-C), adapter.safetensors,
summary.json, and curves.png when matplotlib is installed. `--resume` continues a run from its
checkpoint; on a CPU with a fixed seed a killed and resumed run ends with the same adapter and logs
as an uninterrupted one.

Besides the step lines a user sees the answer formats the base model writes, with a warning when
the reward's format is rare; a warning when NO_SIGNAL_STEPS steps in a row gave every sample of
every problem the same reward (no gradient); progress lines in any phase that runs long.
Bad input stops with one line naming the flag or file and exit code 2, before anything is
written; a failed write is exit code 1; Ctrl-C ends with one line saying whether the folder can be
resumed (130): during a step the run first finishes it and saves a checkpoint.
"""

import contextlib
import glob
import json
import os
import signal
import sys
import time


def interrupted_while_starting(*_):
    print("interrupted before the run began; nothing was written", file=sys.stderr)
    sys.exit(130)


if __name__ == "__main__":  # a Ctrl-C while torch is imported (seconds): one line, not a traceback
    signal.signal(signal.SIGINT, interrupted_while_starting)

import torch  # noqa: E402 (after the handler above)
import torch.distributed as dist
from safetensors import SafetensorError

import data
import grpo
import model as M
import tinylora
from evaluation import accuracy_line, check_outputs, evaluate_all, evaluate_base_model, formats_line
from runs import (Progress, RunFolder, StopRequest, UsageError, append_jsonl, clock, first_on_each_machine,
                  interrupted_line, join_processes, my_share, os_error_line, out_of_memory_line, plot_curves, rank,
                  read_before, read_checkpoint, read_log, restore_checkpoint, sampling_seeds, save_checkpoint,
                  sum_over_processes, world_size, write_json, write_jsonl)
from settings import (DECODINGS, DEFAULTS, MAX_SCALE, SESSION_ONLY, adapter_config, check_inputs, named, parse_args,
                      run_settings, total_steps)
from tokenizer import load_tokenizer


# --------------------------------------------------------------------------------------------
# One training step: the problems of the step, then GRPO (or SFT) on this process's share

SAMPLES_PER_STEP = 2  # completions of every GRPO step kept in samples.jsonl


def data_order(n, epoch, seed):
    """Problem indices for one epoch: a fixed shuffle per (seed, epoch)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()


def step_problems(problems, step, per_step, seed):
    """The problems of a global step: consecutive slices of per-epoch shuffles."""
    steps_per_epoch = max(len(problems) // per_step, 1)
    epoch, index = divmod(step, steps_per_epoch)
    order = data_order(len(problems), epoch, seed)
    return [problems[i] for i in order[index * per_step:(index + 1) * per_step]]


def lr_at(step, total, args):
    """Linear warm-up over the first warmup * total steps, then constant."""
    warm = int(args.warmup * total)
    return args.lr * min(1.0, (step + 1) / warm) if warm else args.lr


def grpo_step(net, tok, adapter, optimizer, batch, args, step):
    """Rollout, rewards and update on this process's share of the step's batch -> (the step's
    metrics, summed over the processes: the numbers a single process would log; the first
    SAMPLES_PER_STEP completions of this process, for samples.jsonl: rank 0's are the batch's first)."""
    seeds = sampling_seeds(args.seed, step + 1, 0, len(batch))  # a prompt's samples depend on its place in the batch
    batch, seeds = my_share(batch, args.mini_batches), my_share(seeds, args.mini_batches)
    prompts = [data.make_prompt(tok, p.question, args.instruction, args.system) for p in batch]
    out = grpo.rollout(net, tok, prompts, args.samples, args.max_new_tokens, args.temperature, args.top_p, adapter=adapter,
                       seeds=seeds)
    targets = [p.target for p in batch for _ in range(args.samples)]
    scores = data.score(out.texts, targets)  # accuracy is always reported strict and flexible
    references = [data.reward_target(p, args.reward) for p in batch for _ in range(args.samples)]
    rewards = [data.reward(text, reference, args.reward) for text, reference in zip(out.texts, references)]
    cfg = grpo.GRPOConfig(temperature=args.temperature, adv_scale=args.adv_scale, agg=args.agg,
                          constant_norm=args.max_new_tokens, clip_low=args.clip_low, clip_high=args.clip_high,
                          tis_cap=args.tis_cap, kl_beta=args.kl_beta, mini_batches=args.mini_batches,
                          micro_batch_size=args.micro_batch, max_grad_norm=args.max_grad_norm or None)
    stats = grpo.grpo_update(net, out, rewards, optimizer, cfg, adapter, sum_over_processes=sum_over_processes)
    tokens = float(out.lengths.sum())  # clip_frac and kl are means over this process's tokens
    reward, strict, flexible, tokens, clipped, kl, zero_adv = sum_over_processes(
        [sum(rewards), sum(scores.correct), sum(scores.flexible), tokens, stats.clip_frac * tokens, stats.kl * tokens,
         stats.zero_adv_groups * len(batch)])
    n = args.prompts_per_step * args.samples
    metrics = {"reward": reward / n, "acc_strict": strict / n, "acc_flexible": flexible / n, "length": tokens / n,
               "tokens": int(tokens), "clip_frac": clipped / tokens, "kl": kl / tokens,
               "zero_adv_groups": zero_adv / args.prompts_per_step, "grad_norm": stats.grad_norm, "loss": stats.loss}
    samples = [{"step": step + 1, "sample": i, "question": batch[i // args.samples].question, "completion": out.texts[i],
                "target": references[i], "answer": data.EXTRACTORS[args.reward](out.texts[i]), "reward": rewards[i]}
               for i in range(min(SAMPLES_PER_STEP, len(out.texts)))]
    return metrics, samples


def sft_step(net, tok, adapter, optimizer, batch, args):
    """Next-token loss on the demonstrations (prompt tokens excluded), token-mean, one optimizer step.
    Under torchrun each process takes its share of the batch; the token count, the gradient and the
    loss are summed over the processes. -> (metrics, []: SFT samples no completions)."""
    batch = my_share(batch, 1)
    prompts = [data.make_prompt(tok, p.question, args.instruction, args.system) for p in batch]
    targets = [tok.encode(p.demonstration) + [tok.end_ids[0]] for p in batch]
    lengths = torch.tensor([len(t) for t in targets])
    completions = torch.full((len(batch), int(lengths.max())), tok.pad_id, dtype=torch.long)
    for i, t in enumerate(targets):
        completions[i, :len(t)] = torch.tensor(t)
    completions, lengths = completions.to(args.device), lengths.to(args.device)
    optimizer.zero_grad(set_to_none=True)
    total = sum_over_processes(float(lengths.sum()))  # tokens in the whole batch
    loss_sum = 0.0
    for i in range(0, len(batch), args.micro_batch):
        rows = slice(i, i + args.micro_batch)
        logp = grpo.sequence_logprobs(net, prompts[rows], completions[rows], lengths[rows])
        loss = -logp.sum() / total
        loss.backward()
        loss_sum += loss.item()
    for p in adapter.parameters():
        p.grad = sum_over_processes(p.grad)
    loss_sum = sum_over_processes(loss_sum)
    grad_norm = grpo.clip_gradients(list(adapter.parameters()), args.max_grad_norm or None, loss_sum)
    optimizer.step()
    return {"loss": loss_sum, "tokens": int(total), "grad_norm": grad_norm}, []


# --------------------------------------------------------------------------------------------
# The training run: steps, checkpoints, logs, then the evaluation of the trained adapter

NO_SIGNAL_STEPS = 2  # GRPO steps in a row with equal rewards in every group before the no-signal warning


def train(args, folder, state, net, tok, train_set, test_set):
    """The training run, from the step of `state` (read_run_state) -> exit code."""
    adapter = make_adapter(net, args)
    processes = f" x {world_size()} processes" if world_size() > 1 else ""
    targets = "" if args.targets == DEFAULTS["targets"] else f" targets={args.targets}"
    print(f"model {args.model} | {args.method} r={args.r} u={args.u} n_tie={args.n_tie} {args.tiling}{targets} | "
          f"trainable parameters: {adapter.num_trainable:,} | device {args.device}{processes}", flush=True)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    total = total_steps(args, len(train_set))
    start, before, metrics = begin_session(args, folder, state, net, tok, test_set, adapter, optimizer, total)
    with StopRequest(verbose=rank() == 0) as ctrl_c:
        code = training_steps(args, net, tok, adapter, optimizer, train_set, range(start, total), metrics, ctrl_c)
    if code:
        return code
    adapter_path = os.path.join(args.out, "adapter.safetensors")
    if rank() == 0:  # under torchrun rank 0 alone writes the run folder
        save_checkpoint(os.path.join(args.out, "checkpoint.safetensors"), adapter, optimizer, total, args.run_id)
        tinylora.save_adapter(adapter, adapter_path, tinylora.DTYPES[args.adapter_dtype])
    print(f"evaluating the trained adapter on {len(test_set)} held-out problems ...", flush=True)
    after = evaluate_all(net, tok, test_set, args, adapter, "after")
    if rank() == 0:
        report(args, adapter, adapter_path, total, before, after, metrics)
    return 0


def training_steps(args, net, tok, adapter, optimizer, train_set, steps, metrics, ctrl_c):
    """The steps of this session, each logged (metrics.jsonl, samples.jsonl, a progress line) and
    checkpointed every --save-every -> None when done, else the exit code: 1 after a non-finite
    loss (the last good adapter is saved), 130 after a Ctrl-C (a checkpoint is saved)."""
    writes, total = rank() == 0, steps.stop
    t0, tokens_seen, flat = time.time(), 0, 0  # flat: steps in a row without a learning signal
    for step in steps:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total, args)
        batch = step_problems(train_set, step, args.prompts_per_step, args.seed)
        try:
            with Progress(net, f"step {step + 1}/{total}"):
                if args.algo == "grpo":
                    m, samples = grpo_step(net, tok, adapter, optimizer, batch, args, step)
                else:
                    m, samples = sft_step(net, tok, adapter, optimizer, batch, args)
        except grpo.NonFiniteError as e:  # the loss and gradient are summed: every process stops here
            path = os.path.join(args.out, "adapter.safetensors")
            if writes:
                tinylora.save_adapter(adapter, path, tinylora.DTYPES[args.adapter_dtype])
                print(f"error: {e} at step {step + 1}; stopped. The last good adapter is {path}; "
                      "lower --lr or check the data", file=sys.stderr)
            return 1
        m = {"step": step + 1, **m, "lr": optimizer.param_groups[0]["lr"], "time": time.time() - t0}
        metrics.append(m)
        if writes:
            append_jsonl(os.path.join(args.out, "metrics.jsonl"), [m])
            if samples:  # GRPO
                append_jsonl(os.path.join(args.out, "samples.jsonl"), samples)
        tokens_seen += m["tokens"]
        elapsed = time.time() - t0
        print(progress_line(step + 1, total, m, elapsed, tokens_seen / elapsed, step + 1 - steps.start), flush=True)
        flat = flat + 1 if m.get("zero_adv_groups") == 1.0 else 0
        if flat == NO_SIGNAL_STEPS and writes:
            print(no_signal_warning(args, step + 1, m, samples[0]), file=sys.stderr, flush=True)
        stop = sum_over_processes(int(ctrl_c.requested)) > 0  # torchrun: all stop at the same step
        if writes and ((args.save_every and (step + 1) % args.save_every == 0) or stop):
            save_checkpoint(os.path.join(args.out, "checkpoint.safetensors"), adapter, optimizer, step + 1, args.run_id)
        if stop:
            print(f"interrupted: checkpoint saved at step {step + 1}; continue with "
                  f"python train.py --resume --out {args.out}", flush=True)
            return 130
    return None


def read_run_state(args, n_train):
    """What a resumed run continues from, read and checked before the model loads -> (the
    checkpoint's step and [tensors, sign anchors], (0, None) without one: stopped before its first;
    each log's lines up to that step; before.json, None when missing or damaged). A new run:
    (0, None, {}, None)."""
    if not args.resume:
        return 0, None, {}, None
    start, checkpoint = 0, None
    ckpt = os.path.join(args.out, "checkpoint.safetensors")
    if os.path.exists(ckpt):
        start, *checkpoint = read_checkpoint(ckpt, args.run_id, total_steps(args, n_train))  # [tensors, anchors]
    logs = {name: read_log(os.path.join(args.out, name), start) for name in log_names(args)}
    before = read_before(os.path.join(args.out, "before.json"), DECODINGS[args.eval_decoding])
    if before is None and start and args.method == "full":
        raise UsageError(f"{os.path.join(args.out, 'before.json')}: missing or damaged, and --method full has trained "
                         "the weights in place, so the base model cannot be evaluated again; put before.json back, or "
                         "start a new run")
    return start, checkpoint, logs, before


def log_names(args):
    return ["metrics.jsonl"] + (["samples.jsonl"] if args.algo == "grpo" else [])  # SFT samples nothing


def begin_session(args, folder, state, net, tok, test_set, adapter, optimizer, total):
    """-> (first step, the base model's accuracy, the metrics so far). Restores the checkpoint of
    `state` (read_run_state); writes args.json (on a resume: with this session's command added),
    and metrics.jsonl and samples.jsonl as they stand at the first step: a resumed run drops the
    lines of steps after its checkpoint, lost with the kill and run again. A new run then evaluates
    the base model, as does a resumed one whose before.json is missing or damaged."""
    start, checkpoint, kept, before = state
    ckpt = os.path.join(args.out, "checkpoint.safetensors")
    if checkpoint is not None:  # rank-independent: any process count resumes it
        restore_checkpoint(ckpt, *checkpoint, adapter, optimizer)
    check_outputs(net, tok, adapter, ckpt if checkpoint is not None else args.model)
    if world_size() > 1:
        dist.barrier()  # every process has read the run folder before rank 0 rewrites it
    folder.start()
    if rank() == 0:
        write_json(os.path.join(args.out, "args.json"), {k: v for k, v in vars(args).items() if k not in SESSION_ONLY})
        for name in log_names(args):
            write_jsonl(os.path.join(args.out, name), kept.get(name, []))
    if args.resume:
        print(f"resumed {args.out} at step {start}/{total}", flush=True)
    if before is None:
        if args.resume:
            print(f"{os.path.join(args.out, 'before.json')}: missing or damaged; evaluating the base model again",
                  flush=True)
        with adapter.disabled() if start else contextlib.nullcontext():  # the base model, not the trained one
            before = evaluate_base_model(args, net, tok, test_set, None if start else adapter)
    return start, before, kept.get("metrics.jsonl", [])


def progress_line(step, total, m, elapsed, tokens_per_s, steps_this_session):
    eta = elapsed / steps_this_session * (total - step)  # a resumed run times only its own steps
    parts = [f"step {step}/{total}"]
    if "reward" in m:
        parts += [f"reward {m['reward']:.3f}", f"acc strict {m['acc_strict']:.3f} flexible {m['acc_flexible']:.3f}",
                  f"len {m['length']:.1f}", f"clip {m['clip_frac']:.3f}"]
    parts += [f"loss {m['loss']:.4f}", f"{tokens_per_s:,.0f} tok/s", f"ETA {clock(eta)}"]
    return " | ".join(parts)


def no_signal_warning(args, step, m, sample):
    """What to tell the user of a GRPO run without a learning signal: NO_SIGNAL_STEPS steps in a
    row in which every problem's samples all got the same reward, so every advantage, and with it
    the gradient, is zero. Shows a completion with the answer each check reads in it, and what to change."""
    text = sample["completion"]
    answers = ", ".join(f"{mode} {data.EXTRACTORS[mode](text)!r}" for mode in sorted(data.EXTRACTORS))
    if m["reward"] == 0:
        advice = (f"no completion earned a reward: if the model writes its answer in a form --reward {args.reward} does not "
                  "read (\\boxed{N} where '#### N' is read, say), use a reward that reads it (--reward boxed, --reward "
                  "flexible) or an --instruction the model follows (docs/reproducing.md, 'Answer formats')")
    else:
        advice = ("each problem's samples are all right or all wrong: the problems are too easy or too hard for the "
                  "model; use other --train-data, or more --samples to make a disagreement likelier")
    return (f"warning: no learning signal in steps {step - NO_SIGNAL_STEPS + 1}-{step}: in {m['zero_adv_groups']:.0%} of "
            f"the groups all {args.samples} samples got the same reward (mean reward {m['reward']:.3f}), so every advantage "
            "and the gradient are zero: the adapter does not move, and each step costs its full time for nothing.\n"
            f"  a completion of step {step} (reference answer {sample['target']!r}) ends {text[-200:]!r};\n"
            f"  the answer each --reward reads in it: {answers}.\n"
            f"  {advice}")


def train_seconds(metrics):
    """Training time over every session of a run: each session's clock starts at 0 (m["time"]), so
    add the last time of each session (the entry before the clock goes back, and the last one)."""
    ends = [m for m, later in zip(metrics, metrics[1:] + [None]) if later is None or later["time"] < m["time"]]
    return sum(m["time"] for m in ends)


def report(args, adapter, adapter_path, total, before, after, metrics):
    """Print the before/after accuracies; write summary.json and curves.png."""
    file_bytes, param_bytes = tinylora.adapter_size(adapter_path)
    print(accuracy_line("before", before, args))
    print(accuracy_line("after", after, args))
    rule = "paper" if args.reward == "paper" and "paper" in next(iter(before.values())) else "strict"  # the paper's own
    gains = [f"{decoding} {before[decoding][rule]:.3f} -> {after[decoding][rule]:.3f} "  # sampled: what the reward sees
             f"({100 * (after[decoding][rule] - before[decoding][rule]):+.1f} points)" for decoding in after]
    n = adapter.num_trainable
    print(f"{rule} accuracy with {n:,} trained parameter{'s' * (n != 1)}: {', '.join(gains)}")
    print(f"adapter: {adapter_path} ({file_bytes:,} bytes on disk, {param_bytes:,} bytes of parameters)")
    summary = {"command": args.command, "resumes": args.resumes, "processes": world_size(),
               "settings": {k: v for k, v in vars(args).items() if k not in ("command", "resumes")},
               "trainable_parameters": adapter.num_trainable, "steps": total, "before": before, "after": after,
               "adapter": adapter_path, "adapter_file_bytes": file_bytes, "adapter_param_bytes": param_bytes,
               "train_seconds": train_seconds(metrics)}
    write_json(os.path.join(args.out, "summary.json"), summary)
    plot = plot_curves(args.out, metrics)
    logs = "metrics.jsonl, samples.jsonl" if args.algo == "grpo" else "metrics.jsonl"
    print(f"run folder: {args.out} ({logs}, eval_*.jsonl, summary.json{', curves.png' if plot else ''})")


# --------------------------------------------------------------------------------------------
# --eval-only


def eval_only(args, folder, net, tok, test_set):
    """Accuracy and answer formats of the model (+ --adapter); the completions and summary.json go
    to the run folder; the last line printed is the result as JSON."""
    adapter = first_on_each_machine(lambda: tinylora.load_adapter(
        net, args.adapter, cache_dir=svd_cache(args), quiet=quiet_svd(net))) if args.adapter else None
    name = "adapter" if adapter else "base"
    if adapter and not abs(adapter.config.scale) <= MAX_SCALE:
        raise UsageError(f"{args.adapter}: metadata scale {adapter.config.scale} is beyond +-{MAX_SCALE:g}; "
                         "the file is damaged")
    check_outputs(net, tok, adapter, args.adapter or args.model)
    folder.start()
    acc = evaluate_all(net, tok, test_set, args, adapter, name)
    result = {"model": args.model, "adapter": args.adapter, "eval_data": args.eval_data, "problems": len(test_set), **acc}
    if rank() == 0:
        write_json(os.path.join(args.out, "summary.json"), {"command": args.command, **result})
    print(accuracy_line(name, acc, args))
    print(formats_line(acc))
    print(f"run folder: {args.out} (eval_{name}_*.jsonl: every completion; summary.json)")
    print(json.dumps(result))
    return 0


# --------------------------------------------------------------------------------------------
# Setup and the command

USER_ERRORS = (UsageError, M.CheckpointError, data.DataError, tinylora.AdapterError, ValueError)


def build(args):
    """Load the model and tokenizer (check_inputs has checked the rest)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    size = sum(os.path.getsize(f) for f in glob.glob(os.path.join(args.model, "*.safetensors")))
    if size > 1e9 and rank() == 0:  # a real checkpoint: reading it takes a while
        print(f"loading {args.model} ({size / 1e9:.1f} GB) ...", flush=True)
    tok = load_tokenizer(args.model)  # seconds: a missing tokenizer.json is reported before the minutes of loading
    return M.load_model(args.model, args.dtype, args.device), tok


def make_adapter(net, args):
    """Attach the adapter the flags describe; --n-tie all = one group for every target module."""
    cfg = adapter_config(args, len(tinylora.find_targets(net, adapter_config(args).targets)))
    try:
        tinylora.plan(net, cfg)  # the adapter's shapes on this model: "n_tie=99 is more than the 14 target modules"
    except ValueError as e:  # "n_tie=..." or "r=...": the flag named
        raise UsageError(f"{named(args, str(e).split('=', 1)[0])}: {e}") from None
    adapter, _ = first_on_each_machine(lambda: tinylora.attach(net, cfg, cache_dir=svd_cache(args), quiet=quiet_svd(net)))
    return adapter


def svd_cache(args):
    """--svd-cache as tinylora takes it: a folder, or None for no cache."""
    return None if args.svd_cache == "none" else args.svd_cache


def quiet_svd(net):
    """Whether tinylora keeps its SVD messages (progress every 2 s, summary, tied-values warning)
    to itself: in the processes that do not print, and for models under 10M parameters (the toy),
    whose SVD takes well under a second."""
    return rank() > 0 or sum(p.numel() for p in net.parameters()) < 10_000_000


def session_command(argv):
    """This invocation as a command line, for args.json and summary.json."""
    launcher = "python" if world_size() == 1 else f"torchrun --nproc_per_node={world_size()}"
    return f"{launcher} train.py " + " ".join(argv)


def main(argv=None):
    """The command line -> exit code: 0 done, 2 bad input (one line, nothing written), 1 a failed
    read or write or a non-finite loss, 130 interrupted (one line saying what is left)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv, __doc__.split("\n\n")[0])
    folder = None
    try:
        args = run_settings(args, session_command(argv))
        train_set, test_set = check_inputs(args)
        folder = RunFolder(args)
        state = read_run_state(args, len(train_set or []))  # after the claim: no other process changes it now
        net, tok = build(args)
        join_processes(args)  # torchrun: join the other processes
        if args.eval_only:
            return eval_only(args, folder, net, tok, test_set)
        return train(args, folder, state, net, tok, train_set, test_set)
    except USER_ERRORS as e:
        message, code = f"error: {e}", 2
    except (OSError, SafetensorError) as e:  # safetensors reports a failed write (a full disk) as its own error
        message, code = os_error_line(e, args, folder), 1
    except torch.OutOfMemoryError as e:
        message, code = out_of_memory_line(e, args, folder), 1
    except KeyboardInterrupt:
        message, code = interrupted_line(args, folder), 130
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
