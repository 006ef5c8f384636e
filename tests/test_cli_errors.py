"""train.py as an adversarial user meets it (issue 13): run folders that never mix, numbers read
from files that are checked, one line on stderr for every mistake (naming the file or flag) before
the model loads, flags that do what they say or are refused, and Ctrl-C anywhere. Each test
asserts the exit code, the line, and the state of the run folder afterwards."""

import fcntl
import json
import os
import shutil
import signal

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

import evaluation
import model as M
import runs
import settings
import train
from test_train import setup, tiny_args  # noqa: F401 (the module's tiny checkpoint and data)

SHORT = ("--steps", "2", "--save-every", "1", "--eval-limit", "2")


def refused(capsys, args, *names, code=2):
    """Run train.main(args); assert the exit code and one stderr line naming each of `names`."""
    capsys.readouterr()
    assert train.main(args) == code
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert all(name in err for name in names), err
    return err


def files(folder):
    return sorted(os.listdir(folder)) if os.path.exists(folder) else None


@pytest.fixture(scope="module")
def done(setup, tmp_path_factory):  # noqa: F811
    """One finished 2-step run, copied by the tests that damage it."""
    out = tmp_path_factory.mktemp("done") / "run"
    assert train.main(tiny_args(setup, out, *SHORT)) == 0
    return out


@pytest.fixture
def run(done, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(done, copy)
    return copy


def rewrite(path, change):
    """Rewrite a safetensors file with change(tensors, metadata) applied."""
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    change(tensors, meta)
    save_file(tensors, str(path), metadata=meta)


# --------------------------------------------------------------------------------------------
# 1. Run folders: one owner, --overwrite starts empty, a checkpoint belongs to its run


def test_overwrite_starts_from_an_empty_folder_and_resume_continues_the_new_run(setup, run, capsys, monkeypatch):
    """The new run (another --u) is interrupted before its first checkpoint: the old run's files are
    gone, so --resume continues the new run from step 0, not from the old run's state."""
    real = train.evaluate_base_model

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "evaluate_base_model", interrupted)
    err = refused(capsys, tiny_args(setup, run, *SHORT, "--overwrite", "--u", "3"), "--resume", code=130)
    assert err.startswith("interrupted: continue the run with python train.py --resume --out ")
    assert files(run) == ["args.json", "metrics.jsonl", "samples.jsonl"]
    monkeypatch.setattr(train, "evaluate_base_model", real)
    assert train.main(["--resume", "--out", str(run)]) == 0
    assert "resumed" in capsys.readouterr().out
    assert load_file(str(run / "adapter.safetensors"))["v"].shape == (4, 3)
    assert [json.loads(line)["step"] for line in open(run / "metrics.jsonl")] == [1, 2]


def test_overwrite_refuses_a_folder_holding_files_that_are_not_a_runs(setup, run, capsys):
    (run / "notes.txt").write_text("mine")
    before = files(run)
    refused(capsys, tiny_args(setup, run, "--overwrite"), "notes.txt", "--overwrite")
    assert files(run) == before and (run / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("resume", [False, True], ids=["new", "resume"])
def test_a_folder_in_use_by_another_process_is_refused(setup, run, capsys, resume):
    """The lock is an fcntl.flock: a second open file description conflicts even in one process."""
    if not resume:
        shutil.rmtree(run)
        run.mkdir()
    with open(run / runs.LOCK_FILE, "w") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        holder.write("4242\n")
        holder.flush()
        before = files(run)
        args = ["--resume", "--out", str(run)] if resume else tiny_args(setup, run)
        refused(capsys, args, str(run), "in use by another train.py (pid 4242)")
        assert files(run) == before
    assert not (run / "args.json").exists() or resume


def test_default_run_folders_started_in_the_same_second_differ(setup, tmp_path, capsys, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)

    class Frozen(runs.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 1, 2, 3, 4, 5)
    monkeypatch.setattr(runs, "datetime", Frozen)
    args = ["--eval-only", "--model", setup["model"], "--eval-data", setup["eval"], "--eval-limit", "1",
            "--max-new-tokens", "2", "--device", "cpu", "--eval-decoding", "greedy"]
    assert train.main(args) == 0 and train.main(args) == 0
    assert files(tmp_path / "runs") == ["20260102-030405-eval", "20260102-030405-eval-2"]
    for folder in (tmp_path / "runs").iterdir():
        assert files(folder) == ["eval_base_greedy.jsonl", "summary.json"]  # the lock file goes with the run


def test_a_checkpoint_of_another_run_is_refused(run, capsys):
    args = json.load(open(run / "args.json"))
    json.dump({**args, "run_id": "0" * 32}, open(run / "args.json", "w"))
    before = {name: (run / name).read_bytes() for name in files(run)}
    refused(capsys, ["--resume", "--out", str(run)], "checkpoint.safetensors", "belongs to another run")
    assert {name: (run / name).read_bytes() for name in files(run)} == before


def test_rewriting_a_log_is_atomic(run, monkeypatch):
    """A kill while metrics.jsonl is rewritten (here: while the new one is flushed) leaves the old one."""
    old = (run / "metrics.jsonl").read_text()

    def killed(fd):
        raise KeyboardInterrupt
    monkeypatch.setattr(train.os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        runs.write_jsonl(str(run / "metrics.jsonl"), [])
    assert (run / "metrics.jsonl").read_text() == old


# --------------------------------------------------------------------------------------------
# 2. Numbers read from files are checked


@pytest.mark.parametrize("value, names", [(float("nan"), ["'v'"]), (float("inf"), ["'v'"]), (1e36, ["outputs"])],
                         ids=["nan", "inf", "too-large"])
def test_an_adapter_with_non_finite_values_is_refused(setup, run, tmp_path, capsys, value, names):  # noqa: F811
    rewrite(run / "adapter.safetensors", lambda t, m: t["v"].view(-1).__setitem__(0, value))
    out = tmp_path / "eval"
    args = ["--eval-only", "--model", setup["model"], "--eval-data", setup["eval"], "--device", "cpu",
            "--adapter", str(run / "adapter.safetensors"), "--out", str(out)]
    refused(capsys, args, "adapter.safetensors", "non-finite", *names)
    assert not out.exists()


@pytest.mark.parametrize("key, value, names", [
    ("model.norm.weight", float("nan"), ["model.safetensors", "'model.norm.weight'"]),
    ("model.layers.1.self_attn.q_proj.bias", float("-inf"), ["model.safetensors", "'model.layers.1.self_attn.q_proj.bias'"]),
    ("model.layers.0.input_layernorm.weight", 3e38, ["outputs"]),  # finite, but the hidden states overflow
], ids=["nan-norm", "inf-bias", "overflowing-norm"])
def test_a_base_checkpoint_with_a_non_finite_value_is_refused(setup, tmp_path, capsys, key, value, names):  # noqa: F811
    base = tmp_path / "base"
    shutil.copytree(setup["model"], base)
    rewrite(base / "model.safetensors", lambda t, m: t[key].view(-1).__setitem__(0, value))
    refused(capsys, tiny_args(setup, tmp_path / "run", "--model", str(base)), str(base), "non-finite", *names)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("damage, names", [
    (lambda t, m: t["optim.0.exp_avg"].view(-1).__setitem__(0, float("nan")), ["'optim.0.exp_avg'", "non-finite"]),
    (lambda t, m: t.__setitem__("adapter.v", torch.zeros(4, 3)), ["'adapter.v'", "(4, 3)"]),
    (lambda t, m: t["adapter.v"].view(-1).__setitem__(0, 1e36), ["non-finite outputs"]),
    (lambda t, m: t["optim.0.exp_avg_sq"].view(-1).__setitem__(0, -1.0), ["optimizer state", "impossible"]),
    (lambda t, m: m.__setitem__("step", "-1"), ["metadata 'step'"]),
    (lambda t, m: m.__setitem__("step", "99"), ["step 99", "--steps 99"]),
], ids=["nan-optimizer", "shape", "too-large", "negative-moment", "negative-step", "step-past-the-end"])
def test_a_damaged_checkpoint_is_refused_on_resume(run, capsys, damage, names):
    rewrite(run / "checkpoint.safetensors", damage)
    before = {name: (run / name).read_bytes() for name in files(run)}
    refused(capsys, ["--resume", "--out", str(run)], "checkpoint.safetensors", *names)
    assert {name: (run / name).read_bytes() for name in files(run)} == before


@pytest.mark.parametrize("change, names", [
    ({"lr": "fast"}, ["args.json", "'lr'"]),
    ({"samples": 2.5}, ["args.json", "'samples'"]),
    ({"method": "dora"}, ["args.json", "'method'"]),
    ({"bogus": 1}, ["args.json", "'bogus'"]),
    ({"lr": -1.0}, ["args.json", "--lr must be"]),
    ({"temperature": 0.0}, ["args.json", "--temperature 0"]),
    (None, ["args.json", "unreadable"]),
], ids=["text", "float-for-int", "choice", "unknown-key", "negative", "meaningless", "not-json"])
def test_saved_settings_are_checked_again_on_resume(run, capsys, change, names):
    if change is None:
        (run / "args.json").write_text('{"lr": ')
    else:
        json.dump({**json.load(open(run / "args.json")), **change}, open(run / "args.json", "w"))
    before = {name: (run / name).read_bytes() for name in files(run)}
    refused(capsys, ["--resume", "--out", str(run)], *names)
    assert {name: (run / name).read_bytes() for name in files(run)} == before


def test_a_garbled_log_line_is_named_but_a_line_cut_short_is_dropped(run, capsys):
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss"')  # a kill while appending: dropped
    assert len(runs.read_log(str(run / "metrics.jsonl"), 5)) == 2
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(["{oops", *lines]) + "\n")
    refused(capsys, ["--resume", "--out", str(run)], "metrics.jsonl:1")


# --------------------------------------------------------------------------------------------
# 3. Every path, device and folder is checked before the model loads


@pytest.mark.parametrize("change, names", [
    ({"--train-data": "MISSING"}, ["--train-data", "no such file"]),
    ({"--train-data": "FOLDER"}, ["--train-data", "a folder"]),
    ({"--eval-data": "MISSING"}, ["--eval-data", "no such file"]),
    ({"--out": "FILE/run"}, ["--out", "cannot create the run folder"]),
    ({"--out": "FILE"}, ["--out", "not a folder"]),
    ({"--device": "cuda:7"}, ["--device cuda:7", "--device cpu"]),
    ({"--device": "toaster"}, ["--device 'toaster'", "cpu, cuda"]),
    ({"--model": "FOLDER"}, ["config.json: missing"]),
    ({"--model": "FILE"}, ["--model", "a file"]),
    ({"--svd-cache": "FILE/cache"}, ["--svd-cache", "FILE is not a writable folder"]),
    ({"--max-new-tokens": "100000"}, ["--max-new-tokens 100000", "max_position_embeddings"]),
], ids=["missing-data", "folder-data", "missing-eval", "out-under-a-file", "out-is-a-file", "no-such-gpu",
        "bad-device", "model-folder", "model-file", "svd-cache-under-a-file", "longer-than-the-context"])
def test_bad_paths_and_devices_are_refused_before_the_model_loads(setup, tmp_path, capsys, monkeypatch, change, names):  # noqa: F811
    def loads(*a, **k):
        raise AssertionError("the model was loaded before the check")
    monkeypatch.setattr(M, "load_model", loads)
    (tmp_path / "FILE").write_text("x")
    (tmp_path / "FOLDER").mkdir()
    args = tiny_args(setup, tmp_path / "run")
    for flag, value in change.items():
        args += [flag, value if value in ("cuda:7", "toaster", "100000") else str(tmp_path / value)]
    refused(capsys, args, *names)
    assert files(tmp_path) == ["FILE", "FOLDER"] and files(tmp_path / "FOLDER") == []


@pytest.mark.parametrize("damage, names", [
    (lambda run: (run / "args.json").unlink(), ["args.json: missing"]),
    (lambda run: (run / "checkpoint.safetensors").write_bytes((run / "checkpoint.safetensors").read_bytes()[:50]),
     ["checkpoint.safetensors", "unreadable checkpoint"]),
], ids=["no-args-json", "truncated-checkpoint"])
def test_a_damaged_run_folder_is_refused_on_resume_before_the_model_loads(run, capsys, monkeypatch, damage, names):
    monkeypatch.setattr(M, "load_model", lambda *a, **k: pytest.fail("the model was loaded before the check"))
    damage(run)
    refused(capsys, ["--resume", "--out", str(run)], *names)


def full_log(path, rows):
    raise OSError(28, "No space left on device", path)


def full_checkpoint(tensors, path, metadata=None):
    raise SafetensorError("Error while serializing: IoError(Os { code: 28, message: \"No space left on device\" })")


@pytest.mark.parametrize("target, fails, names", [
    ("train.append_jsonl", full_log, ["metrics.jsonl", "No space left on device"]),
    ("safetensors.torch.save_file", full_checkpoint, ["No space left on device"]),
], ids=["log", "checkpoint"])
def test_a_full_disk_is_one_line_and_the_run_resumes(setup, tmp_path, capsys, monkeypatch, target, fails, names):  # noqa: F811
    monkeypatch.setattr(target, fails)
    out = tmp_path / "run"
    refused(capsys, tiny_args(setup, out, *SHORT), *names, f"--resume --out {out}", code=1)
    assert {"args.json", "before.json"} <= set(files(out))
    monkeypatch.undo()
    assert train.main(["--resume", "--out", str(out)]) == 0


def test_out_of_memory_is_one_line_saying_what_to_lower(setup, tmp_path, capsys, monkeypatch):  # noqa: F811
    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(train, "grpo_step", oom)
    out = tmp_path / "run"
    refused(capsys, tiny_args(setup, out, *SHORT), "out of memory", "--micro-batch", f"--resume --out {out}", code=1)


@pytest.mark.parametrize("args, names", [(["--steps", "abc"], ["--steps", "invalid int"]),
                                         (["--stepz", "3"], ["--stepz"])], ids=["bad-int", "unknown-flag"])
def test_a_malformed_command_line_is_one_line(capsys, args, names):
    with pytest.raises(SystemExit) as e:
        train.main(args)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and err.startswith("error: ") and all(n in err for n in names), err


# --------------------------------------------------------------------------------------------
# 4. and 5. Flags do what they say or are refused, naming the flag (and the preset that set it)


@pytest.mark.parametrize("extra, names", [
    (["--adapter", "any.safetensors"], ["--adapter", "--eval-only"]),
    (["--steps", "0", "--epochs", "0"], ["--steps 0 and --epochs 0"]),
    (["--temperature", "0"], ["--temperature 0"]),
    (["--mini-batches", "3"], ["--prompts-per-step 4", "--mini-batches 3"]),
    (["--algo", "sft", "--samples", "8"], ["--samples", "--algo sft"]),
    (["--sft-field", "answer"], ["--sft-field", "--algo grpo"]),
    (["--eval-temperature", "0"], ["--eval-temperature 0", "--eval-decoding greedy"]),
    (["--seed", "-1"], ["--seed"]),
    (["--method", "lora", "--u", "4"], ["--u 4", "tinylora"]),
    (["--epochs", "2"], ["--epochs", "--steps 3"]),
    (["--eval-decoding", "greedy", "--eval-temperature", "0.5"], ["--eval-temperature", "--eval-decoding greedy"]),
    (["--clip-low", "1"], ["--clip-low 1"]),
    (["--scale", "1e38"], ["--scale must be"]),
    (["--method", "full", "--r", "4"], ["--r", "--method full"]),
    (["--method", "lora", "--tiling", "structured"], ["--tiling", "--method lora"]),
    (["--warmup", "0.2"], ["--warmup 0.2", "3 steps"]),
], ids=["adapter-while-training", "trains-nothing", "greedy-grpo", "uneven-mini-batches", "grpo-flag-in-sft",
        "sft-flag-in-grpo", "greedy-sampled-eval", "negative-seed", "u-for-lora", "epochs-with-steps",
        "temperature-of-greedy", "clip-floor-zero", "huge-scale",
        "rank-of-full", "tiling-of-lora", "warmup-of-no-step"])
def test_meaningless_or_ignored_flags_are_refused(setup, tmp_path, capsys, extra, names):  # noqa: F811
    refused(capsys, tiny_args(setup, tmp_path / "run", *extra), *names)
    assert not (tmp_path / "run").exists()


def test_training_flags_are_refused_by_eval_only(setup, tmp_path, capsys):  # noqa: F811
    args = ["--eval-only", "--model", setup["model"], "--eval-data", setup["eval"], "--lr", "0.1", "--out", str(tmp_path / "e")]
    refused(capsys, args, "--lr", "--eval-only")
    assert not (tmp_path / "e").exists()


def test_switching_method_on_a_preset_just_works_and_a_preset_value_is_named():
    for method in ("lora", "full", "lora-xs"):
        args = settings.parse_args(["--method", method])
        settings.check_settings(args)  # the toy preset's u = 13 and n_tie = all give way where they mean nothing
        assert args.u == 1 and (args.n_tie == "all") == (method == "lora-xs")
    args = settings.parse_args(["--preset", "gsm8k-paper", "--model", "m", "--train-data", "t", "--eval-data", "e",
                                "--prompts-per-step", "3"])
    with pytest.raises(runs.UsageError, match=r"--mini-batches 2 \(set by --preset gsm8k-paper\)"):
        settings.check_settings(args)


def test_resume_applies_steps_refuses_other_changes_and_rebuilds_a_damaged_before_json(run, capsys):
    before = {name: (run / name).read_bytes() for name in files(run)}
    refused(capsys, ["--resume", "--out", str(run), "--lr", "0.5"], "--lr 0.5", "args.json", "--steps")
    refused(capsys, ["--resume", "--out", str(run), "--steps", "1"], "step 2", "--steps 2")
    refused(capsys, ["--resume", "--out", str(run), "--eval-only"], "--resume", "not with --eval-only")
    assert {name: (run / name).read_bytes() for name in files(run)} == before
    (run / "before.json").write_text('{"greedy": {"strict": 7}}')
    assert train.main(["--resume", "--out", str(run), "--steps", "3"]) == 0
    printed = capsys.readouterr().out
    assert "resumed" in printed and "before.json: missing or damaged" in printed and "step 3/3" in printed
    assert [json.loads(line)["step"] for line in open(run / "metrics.jsonl")] == [1, 2, 3]
    assert json.load(open(run / "args.json"))["steps"] == 3
    assert (run / "before.json").read_bytes() == before["before.json"]  # the base model's, not the trained one's



def test_a_rebuilt_before_json_is_the_base_models_not_the_trained_ones(run, capsys):
    """A resumed run whose before.json is gone evaluates the base model again, with the restored
    adapter switched off: the same numbers as the first evaluation, however far v has moved."""
    original = {name: (run / name).read_bytes() for name in ("before.json", "eval_before_greedy.jsonl")}

    def far(tensors, meta):
        tensors["adapter.v"] = torch.full_like(tensors["adapter.v"], 5.0)
    rewrite(run / "checkpoint.safetensors", far)
    (run / "before.json").unlink()
    assert train.main(["--resume", "--out", str(run), "--steps", "3"]) == 0
    assert {name: (run / name).read_bytes() for name in original} == original

    def completions(name):
        return [json.loads(line)["completion"] for line in open(run / name)]
    assert completions("eval_after_greedy.jsonl") != completions("eval_before_greedy.jsonl")  # v = 5 changes them


def test_full_fine_tuning_cannot_rebuild_a_lost_before_json(setup, tmp_path, capsys):  # noqa: F811
    """--method full trains the weights in place: after step 0 the base model is gone, so a lost
    before.json is refused (one line, nothing written) instead of evaluating the trained model."""
    out = tmp_path / "full"
    args = tiny_args(setup, out, *SHORT)
    for flag in ("--u", "--n-tie"):  # full fine-tuning has no v to size or tie
        del args[args.index(flag):args.index(flag) + 2]
    assert train.main([*args, "--method", "full"]) == 0
    (out / "before.json").unlink()
    kept = {name: (out / name).read_bytes() for name in files(out)}
    refused(capsys, ["--resume", "--out", str(out), "--steps", "3"], "before.json", "--method full")
    assert {name: (out / name).read_bytes() for name in files(out)} == kept

# --------------------------------------------------------------------------------------------
# 6. Ctrl-C anywhere: one line, a resumable or removable folder; a second Ctrl-C stops at once


def test_ctrl_c_while_the_model_loads_leaves_nothing(setup, tmp_path, capsys, monkeypatch):  # noqa: F811
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(M, "load_model", interrupted)
    refused(capsys, tiny_args(setup, tmp_path / "run"), "nothing to clean up", code=130)
    assert not (tmp_path / "run").exists()


def test_ctrl_c_in_the_final_evaluation_leaves_a_resumable_run(run, capsys, monkeypatch):
    real = train.evaluate_all

    def interrupted(net, tok, problems, s, adapter, name):
        if name == "after":
            raise KeyboardInterrupt
        return real(net, tok, problems, s, adapter, name)
    monkeypatch.setattr(train, "evaluate_all", interrupted)
    (run / "summary.json").unlink()
    refused(capsys, ["--resume", "--out", str(run)], f"--resume --out {run}", code=130)
    monkeypatch.setattr(train, "evaluate_all", real)
    assert train.main(["--resume", "--out", str(run)]) == 0 and (run / "summary.json").exists()


def test_ctrl_c_in_an_evaluation_says_the_folder_is_to_remove(setup, tmp_path, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    out = tmp_path / "eval"
    args = ["--eval-only", "--model", setup["model"], "--eval-data", setup["eval"], "--device", "cpu", "--out", str(out)]
    refused(capsys, args, f"unfinished evaluation; remove it, or start again with --overwrite --out {out}", code=130)
    assert files(out) == []  # the folder is there, empty: --overwrite (or rm) takes it


def test_a_second_ctrl_c_stops_a_step_at_once(setup, tmp_path, capsys, monkeypatch):  # noqa: F811
    real = train.grpo_step

    def step(net, tok, adapter, optimizer, batch, s, step):
        if step == 1:  # the user presses Ctrl-C twice during the second step
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real(net, tok, adapter, optimizer, batch, s, step)
    monkeypatch.setattr(train, "grpo_step", step)
    out = tmp_path / "run"
    capsys.readouterr()
    assert train.main(tiny_args(setup, out, "--steps", "5", "--save-every", "1", "--eval-limit", "1")) == 130
    err = capsys.readouterr().err
    assert err.splitlines() == ["Ctrl-C: stopping after this step with a checkpoint (Ctrl-C again to stop at once)",
                                f"interrupted: continue the run with python train.py --resume --out {out} (or remove {out})"]
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1]  # step 2 never finished
