"""train.py end to end: a short run on a tiny random checkpoint and on the embedded default,
resume after SIGKILL, atomic checkpoints, Ctrl-C, non-finite stops, and bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import data
import evaluation
import grpo
import runs
import settings
import tinylora
import train
from conftest import write_checkpoint
from model import load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBLEMS = [("Tom has {a} apples. He buys {b} more. How many apples does Tom have now?", lambda a, b: a + b),
            ("Mia has {a} coins. She loses {b}. How many coins does Mia have now?", lambda a, b: a - b)]


def write_data(path, n, start=0):
    with open(path, "w") as f:
        for i in range(start, start + n):
            text, answer = PROBLEMS[i % 2]
            a, b = 5 + i % 4, 1 + i % 4  # one-digit answers: a random model's last digit is sometimes right
            row = {"question": text.format(a=a, b=b), "answer": f"{a} and {b} give {answer(a, b)}.\n#### {answer(a, b)}"}
            f.write(json.dumps(row) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny checkpoint and GSM8K-format train/eval files."""
    root = tmp_path_factory.mktemp("train")
    write_checkpoint(str(root / "ckpt"), layers=2, hidden=32, intermediate=48, heads=2, kv_heads=1)
    return {"model": str(root / "ckpt"), "train": write_data(root / "train.jsonl", 16),
            "eval": write_data(root / "eval.jsonl", 6, start=100), "root": root}


def tiny_args(setup, out, *extra):
    grpo_flags = [] if "sft" in extra else ["--samples", "4", "--reward", "flexible"]  # SFT refuses GRPO's flags
    return ["--model", setup["model"], "--train-data", setup["train"], "--eval-data", setup["eval"], "--out", str(out),
            "--steps", "3", "--prompts-per-step", "4", "--max-new-tokens", "8", "--micro-batch", "5", "--threads", "1",
            "--device", "cpu", "--lr", "0.05", "--u", "2", "--n-tie", "4", *grpo_flags, *extra]


def test_short_grpo_run_on_a_real_checkpoint_writes_every_output(setup, tmp_path, capsys):
    out = tmp_path / "run"
    args = tiny_args(setup, out, "--mini-batches", "2", "--clip-high", "0.4", "--tis-cap", "2")
    assert train.main(args) == 0
    printed = capsys.readouterr().out
    assert "trainable parameters: 8" in printed  # 2 layers x 7 modules, n_tie 4 -> 4 groups of u = 2
    assert "step 3/3" in printed and "tok/s" in printed and "ETA" in printed
    gain = printed.split("\nstrict accuracy with ")[1].splitlines()[0]  # one line, every decoding evaluated
    assert ": greedy " in gain and ", sampled " in gain and "\nformats greedy: '#### N' " in printed
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert {"reward", "acc_strict", "acc_flexible", "length", "clip_frac", "kl", "zero_adv_groups"} <= set(metrics[0])
    summary = json.load(open(out / "summary.json"))
    assert summary["trainable_parameters"] == 8 and set(summary["after"]) == {"greedy", "sampled"}
    assert summary["command"] == "python train.py " + " ".join(args)  # the run's own flags, also when called in-process
    assert 0 < summary["train_seconds"] == metrics[-1]["time"]
    assert load_file(str(out / "adapter.safetensors"))["v"].shape == (4, 2)
    assert set(os.listdir(out)) >= {"args.json", "metrics.jsonl", "checkpoint.safetensors", "adapter.safetensors",
                                    "summary.json", "before.json", "samples.jsonl", "eval_before_greedy.jsonl",
                                    "eval_before_sampled.jsonl", "eval_after_greedy.jsonl", "eval_after_sampled.jsonl"}
    samples = [json.loads(line) for line in open(out / "samples.jsonl")]
    assert [(r["step"], r["sample"]) for r in samples] == [(1, 0), (1, 1), (2, 0), (2, 1), (3, 0), (3, 1)]
    assert set(samples[0]) == {"step", "sample", "question", "completion", "target", "answer", "reward"}


def test_a_resumed_run_log_drops_the_steps_after_its_checkpoint(tmp_path):
    log = tmp_path / "samples.jsonl"
    log.write_text("".join(json.dumps({"step": step, "sample": 0}) + "\n" for step in (1, 1, 2, 3)))
    assert runs.read_log(str(log), 2) == [{"step": 1, "sample": 0}, {"step": 1, "sample": 0}, {"step": 2, "sample": 0}]
    assert runs.read_log(str(tmp_path / "absent.jsonl"), 2) == []  # a run made before the log existed


def test_training_time_adds_up_the_sessions_of_a_resumed_run():
    clock = [1.0, 2.0, 3.0, 0.5, 1.5]  # a run stopped after step 3, resumed for 2 more steps
    assert train.train_seconds([{"time": t} for t in clock]) == 3.0 + 1.5


def test_the_paper_preset_trains_with_the_authors_reward_and_the_default_with_the_lenient_one():
    assert settings.parse_args(["--preset", "gsm8k-paper", "--model", "m"]).reward == "paper"
    assert settings.parse_args(["--preset", "gsm8k-paper", "--model", "m", "--reward", "strict"]).reward == "strict"
    assert settings.parse_args([]).reward == "strict"  # the toy preset
    assert settings.parse_args(["--model", "m"]).reward == "strict"


def test_grpo_step_rewards_the_paper_rule_against_the_reference_as_written(monkeypatch):
    """--reward paper compares strings with Problem.reference ('72.50', as the solution writes it), not
    with the normalised target ('72.5'); --reward strict compares numbers."""
    texts = ["so #### 72.50", "so #### 72.5", "so ####72.50", "so #### 72.50 apples"]
    rewards = []  # what each step hands to grpo_update
    monkeypatch.setattr(grpo, "rollout", lambda *a, **k: SimpleNamespace(texts=texts, lengths=torch.ones(4)))

    def update(net, out, r, *a, **k):
        rewards.append(list(r))
        return SimpleNamespace(clip_frac=0.0, kl=0.0, zero_adv_groups=0.0, grad_norm=0.0, loss=0.0)

    monkeypatch.setattr(grpo, "grpo_update", update)
    problem = data.Problem("q", "2 x 36.25 = 72.50\n#### 72.50", "72.5")
    tok = SimpleNamespace(encode_chat=lambda user, system: [1, 2, 3])
    for reward in ("paper", "strict"):
        args = settings.parse_args(["--model", "m", "--reward", reward, "--samples", "4", "--prompts-per-step", "1"])
        train.grpo_step(None, tok, None, None, [problem], args, step=0)
    assert rewards == [[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]]


def test_sft_and_eval_only_with_the_trained_adapter(setup, tmp_path, capsys):
    out = tmp_path / "sft"
    assert train.main(tiny_args(setup, out, "--algo", "sft", "--method", "lora-xs", "--u", "1")) == 0
    capsys.readouterr()
    code = train.main(["--eval-only", "--model", setup["model"], "--eval-data", setup["eval"], "--adapter",
                       str(out / "adapter.safetensors"), "--max-new-tokens", "8", "--device", "cpu",
                       "--out", str(tmp_path / "eval")])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    summary = json.load(open(out / "summary.json"))
    assert result["greedy"] == summary["after"]["greedy"]  # the saved adapter reproduces the run's own evaluation
    assert load_file(str(out / "adapter.safetensors"))["R"].abs().sum() > 0  # trained away from zero


def test_embedded_default_runs_a_few_steps(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no --out, as `make train` runs it: the run folder is runs/<date-time>
    assert train.main(["--steps", "2", "--eval-limit", "16", "--prompts-per-step", "4"]) == 0
    printed = capsys.readouterr().out
    assert "trainable parameters: 13" in printed
    assert "before" in printed and "after" in printed and "adapter: " in printed and "bytes" in printed
    (out,) = (tmp_path / "runs").iterdir()
    assert json.load(open(out / "summary.json"))["trainable_parameters"] == 13
    assert train.main(["--eval-only", "--eval-limit", "16"]) == 0  # the base model alone, no --adapter
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["adapter"] is None


def _run(args, **kw):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def _wait_for_lines(path, n, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path) and sum(1 for _ in open(path)) >= n:
            return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    raise AssertionError(f"{path} never reached {n} lines")


def test_resume_after_sigkill_ends_with_the_same_adapter_and_logs(setup, tmp_path):
    args = ["--steps", "5", "--save-every", "1", "--eval-limit", "2"]
    straight = _run(tiny_args(setup, tmp_path / "straight", *args))
    assert straight.wait(timeout=300) == 0, straight.stdout.read()

    killed = _run(tiny_args(setup, tmp_path / "killed", *args))
    _wait_for_lines(tmp_path / "killed" / "metrics.jsonl", 2, killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not os.path.exists(tmp_path / "killed" / "adapter.safetensors")
    resumed = _run(["--resume", "--out", str(tmp_path / "killed")])
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0 and "resumed" in output, output
    a = load_file(str(tmp_path / "straight" / "adapter.safetensors"))["v"]
    b = load_file(str(tmp_path / "killed" / "adapter.safetensors"))["v"]
    assert torch.equal(a, b)
    steps = [json.loads(line)["step"] for line in open(tmp_path / "killed" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5]
    # samples.jsonl is cut back to the checkpoint like metrics.jsonl: the same lines as the straight run's
    assert open(tmp_path / "killed" / "samples.jsonl").read() == open(tmp_path / "straight" / "samples.jsonl").read()
    summary = json.load(open(tmp_path / "killed" / "summary.json"))
    assert summary["command"] == "python train.py " + " ".join(tiny_args(setup, tmp_path / "killed", *args))
    assert summary["resumes"] == [f"python train.py --resume --out {tmp_path / 'killed'}"]


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(setup, tmp_path):
    out = tmp_path / "interrupted"
    proc = _run(tiny_args(setup, out, "--steps", "200", "--save-every", "0", "--eval-limit", "2"))
    _wait_for_lines(out / "metrics.jsonl", 1, proc)
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output
    assert "checkpoint saved" in output and "Traceback" not in output
    assert os.path.exists(out / "checkpoint.safetensors")


def test_a_kill_during_checkpoint_save_leaves_the_previous_one_readable(setup, tmp_path, monkeypatch):
    out = tmp_path / "atomic"
    assert train.main(tiny_args(setup, out, "--steps", "1", "--eval-limit", "2")) == 0
    before = load_file(str(out / "checkpoint.safetensors"))

    def dies_half_way(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"\x00" * 100)  # a partial file, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.torch.save_file", dies_half_way)
    adapter = type("A", (), {"tensors": {"v": torch.ones(2)}})()
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.ones(2))])
    with pytest.raises(KeyboardInterrupt):
        runs.save_checkpoint(str(out / "checkpoint.safetensors"), adapter, optimizer, 9)
    after = load_file(str(out / "checkpoint.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_adapter(setup, tmp_path, monkeypatch, capsys):
    real = grpo.sequence_logprobs
    calls = {"n": 0}

    def poisoned(*args, **kw):  # the second SFT step's log-probs turn NaN
        logp = real(*args, **kw)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] > 1:
                return logp * float("nan")
        return logp

    monkeypatch.setattr(grpo, "sequence_logprobs", poisoned)
    out = tmp_path / "nan"
    code = train.main(tiny_args(setup, out, "--algo", "sft", "--micro-batch", "12", "--eval-limit", "2"))
    err = capsys.readouterr().err
    assert code == 1 and "non-finite" in err and "last good adapter" in err
    v = load_file(str(out / "adapter.safetensors"))["v"]
    assert torch.isfinite(v).all() and v.abs().sum() > 0  # step 1's update, not step 2's NaN


@pytest.mark.parametrize("change, expected", [
    ({"--model": "/nonexistent"}, "config.json: missing"),
    ({"--u": "0"}, "--u must be >= 1"),
    ({"--n-tie": "99"}, "n_tie=99 is more than the 14 target modules"),
    ({"--r": "500"}, "r=500 exceeds the smallest target dimension"),
    ({"--samples": "1"}, "--samples must be >= 2"),
    ({"--lr": "-1"}, "--lr must be a finite number >= 0"),
    ({"--train-data": "BROKEN"}, "train.jsonl:3: not valid JSON"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(setup, tmp_path, capsys, change, expected):
    args = tiny_args(setup, tmp_path / "run")
    if change.get("--train-data") == "BROKEN":
        lines = open(setup["train"]).read().splitlines()
        lines[2] = '{"question": "x", '
        (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
        change = {"--train-data": str(tmp_path / "train.jsonl")}
    for flag, value in change.items():
        args += [flag, value]  # the last occurrence of a flag wins
    assert train.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and err.startswith("error: ") and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_unknown_flag_value_exits_2(setup, tmp_path):
    with pytest.raises(SystemExit) as e:
        train.main(tiny_args(setup, tmp_path / "run", "--method", "dora"))
    assert e.value.code == 2 and not (tmp_path / "run").exists()


def test_existing_run_folder_is_not_overwritten(setup, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert train.main(tiny_args(setup, out)) == 2
    assert "--resume" in capsys.readouterr().err
    assert os.listdir(out) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


def test_adapter_for_another_model_is_refused(setup, tmp_path, capsys):
    other = tmp_path / "other"
    write_checkpoint(str(other), layers=2, hidden=32, intermediate=48, heads=2, kv_heads=1, seed=7)
    out = tmp_path / "run"
    assert train.main(tiny_args(setup, out, "--steps", "1", "--eval-limit", "2")) == 0
    capsys.readouterr()
    code = train.main(["--eval-only", "--model", str(other), "--eval-data", setup["eval"], "--adapter",
                       str(out / "adapter.safetensors"), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "adapter.safetensors" in err and "\n" not in err


def test_curves_png_is_written_when_matplotlib_is_installed(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is an optional extra: without it no curves.png is drawn")
    metrics = [{"step": i, "reward": 0.1 * i, "acc_strict": 0.1 * i, "acc_flexible": 0.1 * i} for i in range(1, 4)]
    path = runs.plot_curves(str(tmp_path), metrics)
    assert path == str(tmp_path / "curves.png") and open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_a_run_saved_with_a_retired_setting_resumes(setup, tmp_path):
    """args.json of an older version may hold a setting since removed (keep_probs): --resume ignores
    it instead of refusing the run."""
    out = tmp_path / "run"
    assert train.main(tiny_args(setup, out, "--steps", "1", "--eval-limit", "1")) == 0
    saved = json.load(open(out / "args.json"))
    json.dump({**saved, "keep_probs": True}, open(out / "args.json", "w"))
    assert train.main(["--resume", "--out", str(out), "--steps", "2"]) == 0
    assert "keep_probs" not in json.load(open(out / "args.json"))


def test_help_shows_every_default_and_the_presets(capsys):
    """--help is made from settings.SETTINGS: each flag with a default shows it, and the presets
    are listed with what they change."""
    with pytest.raises(SystemExit):
        settings.parse_args(["--help"])
    out = capsys.readouterr().out
    text = "".join(out.split())  # argparse wraps long values anywhere
    for name, (default, kind, _) in settings.SPEC.items():
        if default is not None and kind is not bool:
            assert "".join(f"(default: {default})".split()) in text, name
    lines = {line.split(":")[0].strip(): line for line in out.splitlines() if ":" in line}
    for name, preset in settings.PRESETS.items():
        assert all(f"{settings.flag(k)} " in lines[name] for k in preset), name
    assert "--lr 0.002 " in lines["toy"] and "--system '' " in lines["toy"] and "--clip-high 0.4 " in lines["gsm8k-paper"]


def test_a_reward_that_never_reads_an_answer_is_reported_before_and_during_training(setup, tmp_path, capsys):
    """4 new tokens cannot hold '#### N' (5 characters at least): the strict reward is always 0, as
    for an instruct model that only writes \\boxed{N}. The base model's formats say so before
    training, and the run warns once, after NO_SIGNAL_STEPS steps, with a completion and the fixes."""
    out = tmp_path / "run"
    args = tiny_args(setup, out, "--reward", "strict", "--max-new-tokens", "4", "--eval-limit", "2", "--steps", "3")
    assert train.main(args) == 0
    captured = capsys.readouterr()
    assert "formats greedy: '#### N' 0.000, \\boxed{} 0.000, neither 1.000" in captured.out
    assert "warning: the base model wrote '#### N', the answer format that --reward strict reads, in 0.0%" in captured.err
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert all(m["reward"] == 0 and m["zero_adv_groups"] == 1 for m in metrics)
    assert captured.err.count("warning: no learning signal") == 1
    assert f"no learning signal in steps 1-{train.NO_SIGNAL_STEPS}: in 100% of the groups" in captured.err
    samples = [json.loads(line) for line in open(out / "samples.jsonl")]
    shown = samples[(train.NO_SIGNAL_STEPS - 1) * train.SAMPLES_PER_STEP]  # the first of the step that warns
    assert repr(shown["completion"]) in captured.err
    assert "--reward boxed" in captured.err and "--instruction" in captured.err
    assert json.load(open(out / "before.json"))["greedy"]["formats"] == {"####": 0.0, "boxed": 0.0, "neither": 1.0}


def test_rewarded_runs_give_no_warning(setup, tmp_path, capsys):
    assert train.main(tiny_args(setup, tmp_path / "run", "--steps", "2", "--eval-limit", "2")) == 0
    assert "warning" not in capsys.readouterr().err  # --reward flexible reads any number: rewards differ


def test_evaluation_writes_every_completion_with_its_answers(setup, tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["--eval-only", "--model", setup["model"], "--eval-data", setup["eval"], "--max-new-tokens", "8",
            "--device", "cpu", "--eval-batch", "4", "--out", str(out)]
    assert train.main(args) == 0
    printed = capsys.readouterr().out
    result = json.loads(printed.splitlines()[-1])
    assert sorted(os.listdir(out)) == ["eval_base_greedy.jsonl", "eval_base_sampled.jsonl", "summary.json"]
    problems = data.load_problems(setup["eval"])
    for decoding, temperature in (("greedy", 0.0), ("sampled", 1.0)):
        records = [json.loads(line) for line in open(out / f"eval_base_{decoding}.jsonl")]
        assert [r["index"] for r in records] == list(range(len(problems)))  # every problem, in file order
        for r, p in zip(records, problems):
            assert set(r) == {"index", "decoding", "temperature", "question", "completion", "target", "answer",
                              "correct", "flexible_answer", "flexible_correct", "paper_answer", "paper_correct",
                              "boxed_answer"}
            assert (r["decoding"], r["temperature"], r["question"], r["target"]) == (decoding, temperature, p.question, p.target)
            assert r["answer"] == data.extract_strict(r["completion"]) and r["correct"] == (r["answer"] == p.target)
            assert r["flexible_correct"] == data.is_correct(r["completion"], p.target, "flexible")
        assert result[decoding]["flexible"] == sum(r["flexible_correct"] for r in records) / len(records)
    assert json.load(open(out / "summary.json"))["command"] == "python train.py " + " ".join(args)


def test_completion_records_count_the_answer_formats_and_the_format_warning_reads_them():
    problem = data.Problem("q", "#### 5", "5")
    texts = ["so #### 5", "so \\boxed{5}", "\\boxed{4} and #### 4", "the answer is 5"]
    records = [data.completion_record(i, problem, text, "greedy", 0.0) for i, text in enumerate(texts)]
    assert [(r["answer"], r["correct"], r["flexible_answer"], r["flexible_correct"], r["boxed_answer"]) for r in records] == [
        ("5", True, "5", True, None), (None, False, "5", True, "5"), ("4", False, "4", False, "4"), (None, False, "5", True, None)]
    assert [(r["paper_answer"], r["paper_correct"]) for r in records] == [("5", True), (None, False), ("4", False),
                                                                          (None, False)]
    acc = data.accuracy(records)
    assert acc == {"strict": 0.25, "flexible": 0.75, "paper": 0.25, "formats": {"####": 0.5, "boxed": 0.5, "neither": 0.25}}
    args = settings.parse_args(["--model", "m", "--out", "run"])
    assert evaluation.format_warning({"greedy": acc}, args) is None  # half the completions have '#### N'
    rare = {"greedy": {**acc, "formats": {"####": 0.04, "boxed": 0.9, "neither": 0.06}}}
    assert evaluation.format_warning(rare, args).startswith("warning: the base model wrote '#### N', the answer format "
                                                            "that --reward strict reads, in 4.0% of its completions")
    assert evaluation.format_warning(rare, settings.parse_args(["--model", "m", "--reward", "boxed"])) is None


def test_eval_decoding_chooses_greedy_or_sampled(setup, tmp_path, capsys):
    base = ["--eval-only", "--model", setup["model"], "--eval-data", setup["eval"], "--max-new-tokens", "8", "--device", "cpu"]
    assert train.main([*base, "--eval-decoding", "greedy", "--out", str(tmp_path / "g")]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("base    greedy strict") and "sampled" not in printed[0]
    assert sorted(os.listdir(tmp_path / "g")) == ["eval_base_greedy.jsonl", "summary.json"]
    out = tmp_path / "run"
    assert train.main(tiny_args(setup, out, "--steps", "1", "--eval-limit", "2", "--eval-decoding", "sampled")) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line[:27] for line in printed if line.startswith(("before ", "after "))] == \
        ["before  sampled (T=1) stric", "before  sampled (T=1) stric", "after   sampled (T=1) stric"]
    assert any(line.startswith("strict accuracy with ") and ": sampled " in line for line in printed)  # the gain line
    assert sorted(f for f in os.listdir(out) if f.startswith("eval_")) == ["eval_after_sampled.jsonl", "eval_before_sampled.jsonl"]


def test_long_phases_print_progress_lines_in_a_log(setup, tmp_path, capsys, monkeypatch):
    args = ["--eval-only", "--model", setup["model"], "--eval-data", setup["eval"], "--max-new-tokens", "8",
            "--device", "cpu", "--eval-batch", "3", "--eval-decoding", "greedy"]
    assert train.main([*args, "--out", str(tmp_path / "quiet")]) == 0
    assert "tokens through the model" not in capsys.readouterr().out  # a phase of a second stays quiet
    monkeypatch.setattr(runs, "PROGRESS_AFTER", 0.0)  # as if every phase were long
    monkeypatch.setattr(runs, "PROGRESS_EVERY", {True: 0.0, False: 0.0})
    assert train.main([*args, "--out", str(tmp_path / "loud")]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "tokens through the model" in line]
    assert lines[0].startswith("eval_base_greedy | 0/6 problems | ") and "so far" in lines[0]
    assert any(line.startswith("eval_base_greedy | 3/6 problems | ") and "| ETA 00:00:0" in line for line in lines)
    assert not any("\r" in line for line in lines)  # not a terminal: whole lines, none redrawn


def test_progress_on_a_terminal_is_one_line_redrawn_and_cleared(monkeypatch, capsys):
    monkeypatch.setattr(runs, "PROGRESS_AFTER", 0.0)
    monkeypatch.setattr(runs, "PROGRESS_EVERY", {True: 0.0, False: 0.0})
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    net = SimpleNamespace(model=SimpleNamespace(norm=torch.nn.Identity()))
    with runs.Progress(net, "evaluating", total=4) as progress:
        net.model.norm(torch.zeros(2, 5, 3))  # a pass of 2 rows x 5 tokens
        progress.advance(2)
    printed = capsys.readouterr().out
    assert "\n" not in printed and printed.count("\r") == 3 and printed.endswith("\r\033[K")
    assert "evaluating | 2/4 problems | 10 tokens through the model" in printed
    net.model.norm(torch.zeros(1, 1, 3))
    assert capsys.readouterr().out == ""  # the hook is gone with the phase


def test_svd_cache_flag_sets_or_disables_the_cache(setup, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "svd"
    assert train.main(tiny_args(setup, tmp_path / "a", "--steps", "1", "--eval-limit", "1", "--svd-cache", str(cache))) == 0
    assert [f.endswith(".safetensors") for f in os.listdir(cache)] == [True]
    used = []
    real = train.tinylora.attach
    monkeypatch.setattr(train.tinylora, "attach", lambda *a, **k: used.append(k["cache_dir"]) or real(*a, **k))
    assert train.main(tiny_args(setup, tmp_path / "b", "--steps", "1", "--eval-limit", "1", "--svd-cache", "none")) == 0
    assert used == [None]
    capsys.readouterr()
    assert train.main(tiny_args(setup, tmp_path / "c", "--svd-cache", setup["train"])) == 2  # a file, not a folder
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --svd-cache {setup['train']}: exists and is not a folder") and "\n" not in err
    assert not (tmp_path / "c").exists()


def test_a_resume_gives_near_tied_columns_the_sign_they_had_in_training(setup, tmp_path):
    """The checkpoint carries the adapter's sign anchors; restoring it on a machine whose SVD
    flipped an anchored column (simulated by flipping it) flips it back, so v keeps its meaning."""
    net = load_model(setup["model"], device="cpu")
    adapter, _ = tinylora.attach(net, tinylora.TinyLoRAConfig(n_tie=4), cache_dir=None, quiet=True)
    t = adapter.targets[3]
    t.U = t.U.clone()
    t.U[:, 0] = 0.01 * t.U[:, 0]
    t.U[0, 0], t.U[1, 0] = 0.7, -0.7  # a column whose two largest |entries| tie: anchored
    optimizer = torch.optim.Adam(adapter.parameters())
    path = str(tmp_path / "checkpoint.safetensors")
    runs.save_checkpoint(path, adapter, optimizer, 1)
    anchors = json.loads(safe_open(path, "pt").metadata()["sign_anchors"])
    assert [t.name, 0, 0] in anchors
    trained_u, trained_vh = t.U.clone(), t.Vh.clone()
    t.U, t.Vh = t.U.clone(), t.Vh.clone()
    t.U[:, 0], t.Vh[0] = -t.U[:, 0], -t.Vh[0]  # what another machine's SVD may hand back
    step, tensors, anchors = runs.read_checkpoint(path, None, 10)
    runs.restore_checkpoint(path, tensors, anchors, adapter, optimizer)
    assert torch.equal(t.U, trained_u) and torch.equal(t.Vh, trained_vh)


def test_the_paper_preset_reports_the_paper_rule_accuracy(setup, tmp_path, capsys):
    """Under --reward paper the accuracy lines and the gain line add the authors' rule (the paper's
    76% -> 91% is measured with it); every evaluation record carries its answer and verdict."""
    out = tmp_path / "run"
    assert train.main(tiny_args(setup, out, "--reward", "paper")) == 0
    printed = capsys.readouterr().out
    assert "paper " in printed.split("\nbefore ")[1].splitlines()[0] and "\npaper accuracy with " in printed
    record = json.loads(open(out / "eval_after_greedy.jsonl").readline())
    assert {"paper_answer", "paper_correct"} <= set(record)
    assert record["paper_correct"] == (record["paper_answer"] is not None and record["paper_answer"] ==
                                       data.reward_target(data.Problem(record["question"], "", record["target"]), "paper"))
    summary = json.load(open(out / "summary.json"))
    assert 0 <= summary["after"]["greedy"]["paper"] <= 1
    assert train.main(tiny_args(setup, tmp_path / "lenient")) == 0  # the default reward: no paper column
    assert " paper " not in capsys.readouterr().out.split("\nbefore ")[1].splitlines()[0]


def test_targets_flag_adapts_only_the_named_module_types(setup, tmp_path, capsys):
    """--targets picks the module types of every layer; --n-tie all ties just those, and the
    adapter file records them (load_adapter rebuilds the same modules)."""
    out = tmp_path / "mlp"
    args = [a for a in tiny_args(setup, out, "--steps", "1", "--eval-limit", "1")]
    args[args.index("--n-tie") + 1] = "all"
    assert train.main([*args, "--targets", "gate_proj,up_proj,down_proj"]) == 0
    assert "trainable parameters: 2 " in capsys.readouterr().out  # u = 2, one vector for the MLPs
    with safe_open(str(out / "adapter.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["config"])["targets"] == ["gate_proj", "up_proj", "down_proj"]
    code = train.main([*tiny_args(setup, tmp_path / "bad"), "--targets", "q_proj,mlp"])
    assert code == 2 and "--targets q_proj,mlp" in capsys.readouterr().err
