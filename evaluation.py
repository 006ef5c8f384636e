"""Held-out evaluation: one completion per problem with the adapter folded in, greedy and/or
sampled (--eval-decoding), every completion written to eval_<name>_<decoding>.jsonl with the answer
each check reads in it (data.completion_record), and the lines train.py prints: accuracy, the
answer formats the model writes, and a warning when the reward's format is rare. Under torchrun
each process answers its share of the problems.
"""

import contextlib
import os
import sys

import torch

import data
import grpo
from runs import Progress, UsageError, gather_lists, rank, sampling_seeds, world_size, write_json, write_jsonl
from settings import DECODINGS


FORMAT_WARNING = 0.05  # warn when fewer of the base model's completions have the reward's answer format


def evaluate(net, tok, problems, args, adapter, decoding, label):
    """One completion per problem with the adapter folded in, greedy or sampled at
    --eval-temperature -> (accuracy dict, records); `label` names the phase in progress lines.
    Under torchrun each process answers a consecutive share of the problems and the records are
    gathered: every process returns all of them, in problem order."""
    temperature, seed = (0.0, 0) if decoding == "greedy" else (args.eval_temperature, args.seed)
    first, end = len(problems) * rank() // world_size(), len(problems) * (rank() + 1) // world_size()
    mine = problems[first:end]
    prompts = [data.make_prompt(tok, p.question, args.instruction, args.system) for p in mine]
    seeds = sampling_seeds(seed, 0, first, len(mine))
    records = []
    with Progress(net, label, len(mine)) as progress:
        for i in range(0, len(prompts), args.eval_batch):
            out = grpo.rollout(net, tok, prompts[i:i + args.eval_batch], 1, args.max_new_tokens, temperature, 1.0,
                               adapter=adapter, seeds=seeds[i:i + args.eval_batch])
            records += [data.completion_record(first + i + j, problem, text, decoding, temperature)
                        for j, (problem, text) in enumerate(zip(mine[i:i + args.eval_batch], out.texts))]
            progress.advance(len(out.texts))
    records = gather_lists(records)
    return data.accuracy(records), records


def evaluate_all(net, tok, problems, args, adapter, name):
    """Evaluate with each decoding of --eval-decoding -> {decoding: accuracy dict}; rank 0 writes
    every completion to eval_<name>_<decoding>.jsonl in the run folder."""
    results = {}
    for decoding in DECODINGS[args.eval_decoding]:
        results[decoding], records = evaluate(net, tok, problems, args, adapter, decoding, label=f"eval_{name}_{decoding}")
        if rank() == 0:
            write_jsonl(os.path.join(args.out, f"eval_{name}_{decoding}.jsonl"), records)
    return results


def evaluate_base_model(args, net, tok, test_set, adapter):
    """The accuracy before training (written to before.json) and the answer formats the base model
    writes, with a warning when they are not what the reward reads."""
    print(f"evaluating the base model on {len(test_set)} held-out problems ...", flush=True)
    before = evaluate_all(net, tok, test_set, args, adapter, "before")
    if rank() == 0:
        write_json(os.path.join(args.out, "before.json"), before)
    print(accuracy_line("before", before, args), flush=True)
    print(formats_line(before), flush=True)
    warning = format_warning(before, args)
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


def accuracy_line(name, acc, args):
    """Strict and flexible accuracy per decoding; with --reward paper also the paper rule's, the
    accuracy the paper reports (a before.json from an older run may lack it)."""
    label = {"greedy": "greedy", "sampled": f"sampled (T={args.eval_temperature:g})"}
    paper = args.reward == "paper" and all("paper" in a for a in acc.values())
    return f"{name:<7} " + " | ".join(f"{label[decoding]} strict {a['strict']:.3f} flexible {a['flexible']:.3f}"
                                      + (f" paper {a['paper']:.3f}" if paper else "") for decoding, a in acc.items())


def formats_line(acc):
    """How the completions write their answer, per decoding (a completion may have both formats)."""
    parts = [f"{decoding}: '#### N' {a['formats']['####']:.3f}, \\boxed{{}} {a['formats']['boxed']:.3f}, "
             f"neither {a['formats']['neither']:.3f}" for decoding, a in acc.items()]
    return "formats " + " | ".join(parts)


def format_warning(acc, args):
    """A warning when the base model rarely writes the answer format that the GRPO reward reads,
    else None (`flexible` reads any number: never)."""
    needs = {"strict": "####", "paper": "####", "boxed": "boxed"}.get(args.reward)
    if needs is None or args.algo != "grpo":
        return None
    share = max(a["formats"][needs] for a in acc.values())
    if share >= FORMAT_WARNING:
        return None
    written = {"####": "'#### N'", "boxed": "\\boxed{}"}[needs]
    return (f"warning: the base model wrote {written}, the answer format that --reward {args.reward} reads, in {share:.1%} "
            "of its completions: nearly every reward will be 0, and GRPO learns nothing from a group whose rewards are "
            f"equal. Read its completions in {os.path.join(args.out, 'eval_before_*.jsonl')}; then use a reward that reads "
            "them (--reward boxed for \\boxed{}, --reward flexible for the last number) or an --instruction the model "
            "follows (docs/reproducing.md, 'Answer formats')")
