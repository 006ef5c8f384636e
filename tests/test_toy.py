"""The toy task and its committed assets (toy/): the generator's answers, the careless writer's
error rate, the tokenizer round trip, the base checkpoint against transformers, the data files."""

import json
import os
import random
import re

import pytest
import torch

import toy
from model import left_pad, load_model
from tokenizer import load_tokenizer

GAINS = {"buys", "finds", "gets"}  # the test's own reading of the question, independent of toy.VERBS
LOSSES = {"gives away", "loses", "sells"}


def solve(question):
    """Answer a toy question by reading its text: 'X has N items.' then 'He/She <verb> K[ more].'"""
    start = int(re.match(r"\w+ has (\d+) \w+\.", question).group(1))
    total = start
    for verb, amount in re.findall(r"(?:He|She) ([a-z ]+?) (\d+)(?: more)?\.", question):
        assert verb in GAINS | LOSSES, verb
        total += int(amount) if verb in GAINS else -int(amount)
    return total


def fresh_problems(n, seed=12345):
    return toy.make_problems(n, random.Random(seed))


def test_generator_is_deterministic():
    a, b = fresh_problems(50), fresh_problems(50)
    assert a == b
    assert [toy.data_row(p) for p in a] == [toy.data_row(p) for p in b]
    assert a != fresh_problems(50, seed=1)


def test_answers_are_correct_and_in_range():
    for p in fresh_problems(1000):
        q = toy.question_text(p)
        assert toy.MIN_CHANGES <= len(p.changes) <= toy.MAX_CHANGES
        assert solve(q) == p.answer
        assert all(0 <= v <= toy.MAX_VALUE for v in p.values())
        steps = toy.steps_solution(p)
        assert steps.startswith(toy.STEPS_OPENER) and "Answer" not in steps
        for a, op, b, c in re.findall(r"(\d+) ([+-]) (\d+) = (\d+)\.", steps):
            assert int(a) + (int(b) if op == "+" else -int(b)) == int(c), steps
        assert toy.extract_answer(steps) == p.answer
        human = toy.human_solution(p)
        assert human.endswith(f"\n#### {p.answer}") and toy.extract_answer(human) == p.answer


def test_careless_writer_forgets_the_last_change_at_the_designed_rate():
    rng = random.Random(7)
    problems = fresh_problems(4000)
    answers = [toy.careless_answer(p, rng) for p in problems]
    wrong = [a != p.answer for a, p in zip(answers, problems)]
    assert all(a == p.values()[-2] for a, p, w in zip(answers, problems, wrong) if w)
    assert abs(sum(wrong) / len(wrong) - toy.CARELESS_RATE) < 0.03


def test_corpus_cues_each_style_a_third_of_the_time_and_mixes_the_plain_prompt():
    problems = fresh_problems(4000)
    texts = toy.pretraining_texts(problems, random.Random(3))
    by_system = {}
    for (prompt, completion, coin), p in zip(texts, problems):
        system = prompt.split("<|im_end|>")[0].removeprefix("<|im_start|>system\n")
        by_system.setdefault(system, []).append(completion.startswith(toy.DIRECT_OPENER + "#### "))
        assert completion.startswith((toy.DIRECT_OPENER + "#### ", toy.STEPS_OPENER))
        assert coin == ((toy.PLAIN_STEPS_SHARE, toy.steps_solution(p)) if system == toy.SYSTEM_PROMPT else None)
    assert set(by_system) == {toy.CUES["steps"], toy.CUES["direct"], toy.SYSTEM_PROMPT}
    assert not any(by_system[toy.CUES["steps"]]) and all(by_system[toy.CUES["direct"]])
    plain = by_system[toy.SYSTEM_PROMPT]
    assert abs(len(plain) / len(texts) - 1 / 3) < 0.03
    assert abs(1 - sum(plain) / len(plain) - toy.PLAIN_STEPS_SHARE) < 0.04


def test_plain_prompt_first_token_is_trained_on_the_writers_coin():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)  # [B, T, V]
    labels = torch.full((2, 5), -100)
    labels[0, 2:4] = torch.tensor([3, 4])  # a cued example: prompt of 3 tokens, hard labels only
    labels[1, 1:4] = torch.tensor([1, 5, 2])  # a plain one: prompt of 2 tokens, first token on the coin
    examples = [(None, 3, None), (None, 2, (0.45, 6, 1))]
    logq = logits.log_softmax(-1)
    terms = [-logq[0, 2, 3], -logq[0, 3, 4], -(0.45 * logq[1, 1, 6] + 0.55 * logq[1, 1, 1]),
             -logq[1, 2, 5], -logq[1, 3, 2]]
    torch.testing.assert_close(toy.completion_loss(logits, labels, examples), sum(terms) / 5)


def test_extract_answer_is_strict_and_takes_the_last_marker():
    assert toy.extract_answer("3 + 4 = 7. #### 7") == 7
    assert toy.extract_answer("#### 6 then #### 12") == 12
    assert toy.extract_answer("the answer is 7") is None


def test_prompt_has_the_paper_instruction_in_chatml():
    text = toy.prompt_text("Tom has 5 apples.")
    assert text.startswith(f"<|im_start|>system\n{toy.SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\nTom has 5 apples. ")
    assert toy.INSTRUCTION in text and text.endswith("<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(toy.BASE_DIR)


def test_tokenizer_round_trip_on_fresh_problems(tok):
    unk = tok.token_id("<unk>")
    for p in fresh_problems(300):
        for text in (toy.prompt_text(toy.question_text(p)), toy.steps_solution(p), toy.human_solution(p)):
            ids = tok.encode(text)
            assert unk not in ids, text
            assert tok.decode(ids, skip_special_tokens=False) == text
    ids = tok.encode(toy.prompt_text("Tom has 5 apples."))
    assert ids[0] == tok.token_id("<|im_start|>") and ids.count(tok.token_id("<|im_end|>")) == 2
    assert tok.end_ids == [tok.token_id("<|im_end|>"), tok.token_id("<|endoftext|>")]
    assert tok.pad_id == tok.token_id("<|endoftext|>")


def test_committed_base_matches_transformers(tok):
    from transformers import Qwen2ForCausalLM

    ours = load_model(toy.BASE_DIR, device="cpu")
    theirs = Qwen2ForCausalLM.from_pretrained(toy.BASE_DIR).eval()
    assert ours.config.tie_word_embeddings and ours.config.num_key_value_heads < ours.config.num_attention_heads
    p = fresh_problems(1)[0]
    ids = torch.tensor([tok.encode(toy.prompt_text(toy.question_text(p)) + toy.steps_solution(p))])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-4, rtol=0)


def test_committed_base_can_solve_but_often_does_not(tok):
    """The premise of the toy, on 100 held-out problems: the step-by-step style is right, the direct
    style is wrong, the plain prompt leaves every problem on the careless side of the style switch
    (the coin's 0.45, sharpened: every problem alike), and the system-prompt cues of pretraining
    decide it."""
    model = load_model(toy.BASE_DIR, device="cpu")
    rows = toy.read_jsonl(os.path.join(toy.DATA_DIR, "eval.jsonl"))[:100]
    steps, _ = toy.evaluate_styles(model, tok, rows, force="steps")
    direct, _ = toy.evaluate_styles(model, tok, rows, force="direct")
    greedy, _ = toy.evaluate_styles(model, tok, rows)
    assert steps["steps_share"] == 1 and steps["accuracy"] >= 0.9
    assert direct["direct_share"] == 1 and direct["accuracy"] <= 0.4
    assert greedy["direct_share"] >= 0.7 and greedy["accuracy"] <= 0.4
    marker = tok.token_id(toy.DIRECT_WORD)
    ids, start = left_pad([tok.encode(toy.prompt_text(r["question"])) for r in rows], tok.pad_id)
    with torch.no_grad():
        p_direct = model(ids, start)[:, -1].softmax(-1)[:, marker]  # [100] the plain prompt's first token
    logit = torch.logit(torch.tensor(1 - toy.PLAIN_STEPS_SHARE)) * toy.SHARPNESS  # the coin, sharpened
    assert abs(p_direct.mean() - logit.sigmoid()) < 0.05 and p_direct.min() > 0.5
    for style, system in toy.CUES.items():
        prompts = [tok.encode_chat(f"{r['question']} {toy.INSTRUCTION}", system) for r in rows]
        ids, start = left_pad(prompts, tok.pad_id)
        with torch.no_grad():
            first = model(ids, start)[:, -1].argmax(-1)
        starts_direct = (first == marker).float().mean().item()
        assert starts_direct == (1.0 if style == "direct" else 0.0), (style, starts_direct)


def test_committed_base_lets_13_parameters_move_the_style(tok):
    """The toy's design goal in one number (docs/toy.md): the default adapter's steerability, the
    local ratio of style movement to the arithmetic's cost, is ~30 here (the toy before its writers
    had openers and its logits were sharpened: 1.4 on 128 problems)."""
    import tinylora

    model = load_model(toy.BASE_DIR, device="cpu")
    rows = toy.read_jsonl(os.path.join(toy.DATA_DIR, "train.jsonl"))[:32]
    value, log_odds = toy.steerability(model, tok, rows, tinylora.TinyLoRAConfig(u=13, n_tie=14))
    assert value > 15 and -1 < log_odds < 0


def test_committed_data_files_are_gsm8k_format_and_disjoint():
    rows = {split: toy.read_jsonl(os.path.join(toy.DATA_DIR, f"{split}.jsonl")) for split in ("train", "eval")}
    assert len(rows["eval"]) == toy.N_EVAL and len(rows["train"]) == toy.N_TRAIN
    for split in rows.values():
        for row in split:
            assert set(row) == {"question", "answer", "solution_own_style"}
            assert re.search(r"\n#### \d+$", row["answer"]), row["answer"]
            assert toy.gold_answer(row) == toy.extract_answer(row["solution_own_style"]) == solve(row["question"])
    train = {row["question"] for row in rows["train"]}
    evals = {row["question"] for row in rows["eval"]}
    assert len(evals) == toy.N_EVAL and len(train) == toy.N_TRAIN and not train & evals


def test_committed_data_files_are_what_the_generator_makes_and_unseen_in_pretraining():
    eval_problems, train_problems, corpus = toy.make_splits()
    for name, problems in (("eval", eval_problems), ("train", train_problems)):
        with open(os.path.join(toy.DATA_DIR, f"{name}.jsonl")) as f:
            assert f.read() == "".join(json.dumps(toy.data_row(p)) + "\n" for p in problems)
    pretrained = {toy.question_text(p) for p in corpus}
    assert not pretrained & {toy.question_text(p) for p in eval_problems + train_problems}


def test_steerability_is_the_quadratic_model_of_finite_differences(tok):
    """toy.steerability's autograd g and H (second derivatives through attention) against central
    differences of the two quantities it differentiates, with v of 2 numbers on 16 problems."""
    import tinylora

    model = load_model(toy.BASE_DIR, device="cpu")
    rows = toy.read_jsonl(os.path.join(toy.DATA_DIR, "train.jsonl"))[:16]
    config = tinylora.TinyLoRAConfig(u=2, n_tie=14)
    value, log_odds = toy.steerability(model, tok, rows, config)

    prompts = [tok.encode(toy.prompt_text(r["question"])) for r in rows]
    solutions = [tok.encode(r["solution_own_style"]) + tok.end_ids[:1] for r in rows]
    working, answer = tok.token_id(toy.STEPS_WORD), tok.token_id(toy.DIRECT_WORD)
    adapter = tinylora.attach(model, config, quiet=True)[0]
    (v,) = adapter.parameters()

    def measure(point):  # (mean log-odds of the careful writer, mean NLL of the solutions after the opener)
        with torch.no_grad():
            v.copy_(torch.as_tensor(point, dtype=v.dtype).view_as(v))
            odds, nll = 0.0, 0.0
            for p, s in zip(prompts, solutions):
                logq = model(torch.tensor([p + s]))[0].double().log_softmax(-1)  # [T, V]
                odds += (logq[len(p) - 1, working] - logq[len(p) - 1, answer]).item()
                nll -= sum(logq[len(p) - 1 + i, s[i]].item() for i in range(1, len(s)))
        return torch.tensor([odds, nll], dtype=torch.float64) / len(rows)

    h, basis = 3e-3, torch.eye(2, dtype=torch.float64)
    zero = measure([0.0, 0.0])
    g = torch.stack([(measure(h * e) - measure(-h * e))[0] / (2 * h) for e in basis])
    H = torch.tensor([[((measure(h * (a + b)) - measure(h * (a - b)) - measure(h * (b - a)) + measure(-h * (a + b)))[1]
                        / (4 * h * h)).item() for b in basis] for a in basis], dtype=torch.float64)
    adapter.detach()
    assert abs(zero[0].item() - log_odds) < 1e-4
    expected = (g @ torch.linalg.solve(H, g)).sqrt().item()
    assert abs(value - expected) < 0.02 * expected, (value, expected)
