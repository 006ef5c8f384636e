"""sweep.py's plumbing at a tiny size: two points, one seed, two steps, a valid table and record."""

import json
import os

import pytest

import sweep


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sweep") / "s")
    code = sweep.main(["--quick", "--out", out, "--workers", "2"])
    return code, out


def test_quick_sweep_writes_a_valid_table_and_record(quick):
    code, out = quick
    assert code == 0
    result = json.load(open(os.path.join(out, "results.json")))
    assert result["command"].startswith("python sweep.py --quick")
    assert result["seeds"] == [0] and result["failed_runs"] == [] and result["git_commit"]
    rows = {r["point"]: r for r in result["points"]}
    assert set(rows) == {"tinylora-u13-tied-grpo", "tinylora-u13-tied-sft-own"}
    for r in rows.values():
        assert r["params"] == 13 and r["seeds"] == 1
        summary = json.load(open(os.path.join(out, "runs", f"{r['point']}-s0", "summary.json")))
        assert r["after_greedy_strict"] == summary["after"]["greedy"]["strict"]  # the table is the runs' numbers
        assert 0 <= r["after_greedy_flexible"] <= 1
    assert rows["tinylora-u13-tied-sft-own"]["algo"] == "sft-own"
    md = open(os.path.join(out, "results.md")).read()
    assert "| base model (no training) |" in md and "| tinylora-u13-tied-grpo | grpo | 13 |" in md
    assert md.startswith("Command: `python sweep.py --quick")


def test_quick_sweep_plots_accuracy_vs_parameters(quick):
    pytest.importorskip("matplotlib", reason="the plot needs matplotlib (optional); the table does not")
    _, out = quick
    with open(os.path.join(out, "accuracy_vs_params.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_the_sweep_covers_what_the_paper_compares():
    points = sweep.all_points()
    assert len({p.name for p in points}) == len(points)
    assert {p.algo for p in points if p.group == "size"} == {"grpo", "sft-own", "sft-human"}
    assert {p.method for p in points} == {"tinylora", "lora-xs", "lora", "full"}
    assert sorted(p.name for p in points if p.group == "tiling") == ["tinylora-u1-tie2-structured", "tinylora-u1-tie2-tiled"]
    assert all(p.lr_from in sweep.LRS for p in points)  # every point has its probed learning rate


def test_an_existing_sweep_folder_is_refused(tmp_path, capsys):
    (tmp_path / "x").write_text("")
    assert sweep.main(["--out", str(tmp_path)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err


def test_the_probe_reads_the_mean_training_reward_of_the_last_steps(tmp_path):
    """The learning rate is chosen on the training reward (sampled completions of training
    problems) of the run's last PROBE_LAST steps; an unfinished run reads as None."""
    run = tmp_path / "run"
    run.mkdir()
    rewards = [0.0] * 5 + [float(i % 2) for i in range(sweep.PROBE_LAST)]
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, "reward": r}) + "\n"
                                               for i, r in enumerate(rewards)))
    assert sweep.final_rewards(str(run)) is None  # no summary.json yet
    (run / "summary.json").write_text("{}")
    assert sweep.final_rewards(str(run)) == rewards[5:]
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward": float("nan")}) + "\n")
    assert sweep.final_rewards(str(run)) is None  # a non-finite reward: the run counts as failed
    assert sweep.PROBE_LRS == sorted(sweep.PROBE_LRS) and sweep.PROBE_LRS[0] <= 1e-4 and sweep.PROBE_LRS[-1] >= 1e-1
    decades = [sum(10 ** k <= lr < 10 ** (k + 1) for lr in sweep.PROBE_LRS) for k in range(-4, -1)]
    assert min(decades) >= 3  # at least three rates per decade


def test_the_probe_chooses_the_smallest_rate_it_cannot_tell_from_the_best():
    rates = [1e-3, 2e-3, 5e-3, 1e-2]
    steady = lambda mean: [mean - 0.01, mean + 0.01] * 5  # noqa: E731  standard error of the mean 0.0033
    # best 0.80 at 1e-2; 5e-3 is 0.003 below, within the standard error of the difference (0.0047)
    finals = [steady(0.50), steady(0.70), steady(0.797), steady(0.80)]
    assert sweep.choose_rate(rates, finals) == 5e-3
    finals[2] = steady(0.78)  # now clearly below: the best itself
    assert sweep.choose_rate(rates, finals) == 1e-2
    noisy = [0.5, 1.0] * 5  # standard error 0.083: 0.75 +- 0.25 cannot be told from 0.80
    assert sweep.choose_rate(rates, [steady(0.5), noisy, steady(0.78), steady(0.80)]) == 2e-3
    assert sweep.choose_rate(rates, [None, None, steady(0.6), None]) == 5e-3  # failed runs are never chosen
    assert sweep.choose_rate(rates, [None] * 4) is None  # nothing finished: nothing chosen
