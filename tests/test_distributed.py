"""Data parallelism (train.py under torchrun, docs/scaling.md): two CPU processes talking through
gloo train the same adapter as one process, for every loss normalisation and for SFT, log the same
metrics, and a run resumes with another process count. Runs use the embedded toy model, whose
rewards vary within groups, so the gradients are not zero."""

import json
import os
import signal
import subprocess
import sys
from unittest import mock

import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors.torch import load_file

import grpo
import runs
import train
from test_train import _wait_for_lines

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 4 prompts in 2 mini-batches on 2 processes: each process holds 1 prompt of each mini-batch
TOY = ["--steps", "3", "--prompts-per-step", "4", "--samples", "4", "--mini-batches", "2", "--micro-batch", "3",
       "--eval-limit", "4", "--device", "cpu", "--threads", "1"]


def launch(args, processes):
    """`torchrun --standalone --nproc_per_node=processes train.py args` (plain python for 1)."""
    runner = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes > 1 else []
    return subprocess.Popen([sys.executable, *runner, os.path.join(ROOT, "train.py"), *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def adapter(run):
    return load_file(os.path.join(run, "adapter.safetensors"))


def metrics(run):
    return [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]


# Summing a gradient over two processes adds the same terms in another order than one process does,
# and the rows meet the model in other groupings (padding, micro-batches): float32 rounding. After 3
# steps v (entries up to ~0.05) differed by 1.5e-8 to 7.8e-8 across the four modes; 1e-5 leaves room
# and still fails on a real difference (prompts split without regard to mini-batches: 2.6e-2).
TOLERANCE = dict(rtol=1e-4, atol=1e-5)
# The GRPO loss is a sum of per-token terms w A rho that cancel (advantages have zero mean in every
# group): the logged loss is ~1e-4 while its terms are of order |A| rho w <= (G - 1) / sqrt(G) x
# (1 + clip_high) x tis_cap = 1.5 x 1.4 x 2 for G = 4. Summation order moves the float32 result by a
# fraction of the terms, not of the result (two machines measured -2.667457e-4 and -2.668947e-4 for
# the same run), so the loss is compared at an absolute tolerance scaled to the terms. (SFT's loss
# is a mean of positive terms of order 1: the same bound covers it.)
LOSS_TERMS = 1.5 * 1.4 * 2.0


@pytest.mark.parametrize("mode", [["--agg", "token-mean"], ["--agg", "seq-mean", "--kl-beta", "0.1"],
                                  ["--agg", "constant", "--tis-cap", "2"], ["--algo", "sft"]],
                         ids=["token-mean", "seq-mean+kl", "constant+tis", "sft"])
def test_two_processes_train_the_same_adapter_as_one(tmp_path, mode, capsys):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    grpo_only = ("--samples", "--mini-batches")  # SFT refuses GRPO's flags
    toy = [x for k, v in zip(TOY[::2], TOY[1::2]) if "sft" not in mode or k not in grpo_only for x in (k, v)]
    assert train.main([*toy, *mode, "--out", one]) == 0
    capsys.readouterr()
    proc = launch([*toy, *mode, "--out", two], processes=2)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output

    a, b = adapter(one), adapter(two)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].abs().sum() > 0  # trained
        torch.testing.assert_close(b[name], a[name], **TOLERANCE)
    for m1, m2 in zip(metrics(one), metrics(two), strict=True):  # summed over ranks: the single run's numbers
        assert {k: m2[k] for k in ("step", "tokens")} == {k: m1[k] for k in ("step", "tokens")}
        for key in ("reward", "acc_strict", "zero_adv_groups", "clip_frac", "kl", "loss", "grad_norm"):
            if key in m1:
                assert m2[key] == pytest.approx(m1[key], rel=1e-4, abs=1e-5 * LOSS_TERMS if key == "loss" else 1e-7), key
    assert json.load(open(os.path.join(two, "summary.json")))["processes"] == 2
    assert json.load(open(os.path.join(two, "before.json"))) == json.load(open(os.path.join(one, "before.json")))
    for name in ("eval_before_greedy.jsonl", "eval_before_sampled.jsonl"):  # gathered from both processes, in order
        assert open(os.path.join(two, name)).read() == open(os.path.join(one, name)).read()
    if "sft" not in mode:  # rank 0's first completions are the batch's first, as in one process
        assert open(os.path.join(two, "samples.jsonl")).readline() == open(os.path.join(one, "samples.jsonl")).readline()
    assert output.count("step 3/3") == 1 and output.count("trainable parameters") == 1  # rank 0 alone prints


def interrupt_after_first_step(proc, run):
    """Ctrl-C (to torchrun, which passes it on) once a step is logged; the run saves and stops."""
    _wait_for_lines(os.path.join(run, "metrics.jsonl"), 1, proc)
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=120)[0]
    assert "checkpoint saved" in output, output  # torchrun itself then reports the signal with a traceback
    return int(output.split("checkpoint saved at step ")[1].split(";")[0])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = str(tmp_path_factory.mktemp("uninterrupted") / "run")
    assert train.main([*TOY, "--steps", "6", "--out", run]) == 0
    return adapter(run)["v"]


def test_a_two_process_run_resumes_on_one(tmp_path, uninterrupted, capsys):
    run = str(tmp_path / "run")
    stopped_at = interrupt_after_first_step(launch([*TOY, "--steps", "6", "--save-every", "1", "--out", run], 2), run)
    assert 1 <= stopped_at < 6
    assert train.main(["--resume", "--out", run]) == 0
    assert f"resumed {run} at step {stopped_at}/6" in capsys.readouterr().out
    torch.testing.assert_close(adapter(run)["v"], uninterrupted, **TOLERANCE)
    assert [m["step"] for m in metrics(run)] == [1, 2, 3, 4, 5, 6]


def test_a_one_process_run_resumes_on_two(tmp_path, uninterrupted):
    run = str(tmp_path / "run")
    stopped_at = interrupt_after_first_step(launch([*TOY, "--steps", "6", "--save-every", "1", "--out", run], 1), run)
    assert 1 <= stopped_at < 6
    proc = launch(["--resume", "--out", run], processes=2)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0 and f"resumed {run} at step {stopped_at}/6" in output, output
    torch.testing.assert_close(adapter(run)["v"], uninterrupted, **TOLERANCE)


@settings(max_examples=60, deadline=None)
@given(world=st.integers(1, 4), parts=st.integers(1, 4), per_share=st.integers(1, 3))
def test_each_process_takes_its_slice_of_every_mini_batch(world, parts, per_share):
    """Mini-batch m of every process, put together in rank order, is mini-batch m of the whole batch."""
    batch = list(range(world * parts * per_share))
    shares = []
    for rank in range(world):
        with mock.patch.dict(os.environ, {"WORLD_SIZE": str(world), "RANK": str(rank)}):
            shares.append(runs.my_share(batch, parts))
    chunk = len(batch) // parts
    for m in range(parts):
        local = [share[m * per_share:(m + 1) * per_share] for share in shares]  # grpo_update's mini-batch m
        assert sum(local, []) == batch[m * chunk:(m + 1) * chunk]


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 50), min_size=2, max_size=12), cut=st.integers(1, 11))
def test_the_loss_normaliser_of_a_batch_is_the_sum_over_its_parts(lengths, cut):
    """Why summing Z over processes gives the whole batch's Z, in every aggregation mode."""
    lengths = torch.tensor(lengths)
    cut = min(cut, len(lengths) - 1)
    for agg in grpo.AGGREGATIONS:
        parts = [grpo.loss_normalizer(part, agg, constant_norm=64) for part in (lengths[:cut], lengths[cut:])]
        assert sum(parts) == grpo.loss_normalizer(lengths, agg, constant_norm=64)


def test_a_batch_that_cannot_be_split_evenly_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets; the check comes before joining the others
    out = tmp_path / "run"
    assert train.main([*TOY, "--prompts-per-step", "6", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --prompts-per-step 6 must be a multiple of 4 (2 processes x 2 mini-batches)")
    assert "\n" not in err and not out.exists()
