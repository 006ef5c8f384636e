"""data.py: answer extraction and normalisation, rewards, problem files, prompts."""

import json
import os

import pytest
from hypothesis import given, settings, strategies as st

import data
from tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (completion, strict, flexible): the normalised answer each check finds, None for no answer.
EXTRACTION_CASES = [
    ("#### 72", "72", "72"),
    ("She has 3 apples.\n#### 18", "18", "18"),
    ("#### 5 first, then the fix:\n#### 7", "7", "7"),  # the last `#### N` wins
    ("#### 5\nWait, recount.\n####", "5", "5"),  # a bare `####` after it does not count
    ("####", None, None),
    ("#### and then nothing", None, None),
    ("I am not sure.", None, None),
    ("", None, None),
    ("Total: 1,234,567 dollars\n#### 1,234,567", "1234567", "1234567"),
    ("#### $1,234.50", "1234.5", "1234.5"),
    ("####$18", "18", "18"),
    ("#### -3", "-3", "-3"),
    ("so x = -2.5 and\n#### -2.50", "-2.5", "-2.5"),
    ("#### 72.00", "72", "72"),
    ("#### 72.", "72", "72"),  # sentence period, not a decimal point
    ("#### +5", "5", "5"),
    ("#### 3/4", "0.75", "0.75"),
    ("#### 1/3", "1/3", "1/3"),
    ("#### 50%", "50", "50"),
    ("#### 12 apples", "12", "12"),
    ("The answer is 42.", None, "42"),
    ("5 - 3 = 2, so the answer is 2", None, "2"),
    ("#### 18\nThat was 20 minutes of work.", "18", "20"),  # strict and flexible disagree
    ("x-3", None, "3"),  # a minus right after a letter is not a sign
    ("(-4)", None, "-4"),
    ("items 1,2,3", None, "3"),  # not a thousands separator
    ("####" + "9" * 500, None, None),  # absurdly long numbers are not numbers
]


@pytest.mark.parametrize("text, strict, flexible", EXTRACTION_CASES)
def test_strict_and_flexible_extraction(text, strict, flexible):
    assert data.extract_strict(text) == strict
    assert data.extract_flexible(text) == flexible


BOXED_CASES = [
    (r"so $\boxed{42}$.", "42"),
    (r"\boxed{1} is wrong, it is \boxed{2}", "2"),
    (r"\boxed{\frac{3}{4}}", "0.75"),
    (r"\boxed{\dfrac{1}{3}}", "1/3"),
    (r"\boxed{-\frac{1}{2}}", "-0.5"),
    (r"\boxed{x^{2} + \sqrt{2}}", r"x^{2}+\sqrt{2}"),
    (r"\boxed{\left( 1, 2 \right)}", "(1,2)"),
    (r"\boxed{1,000}", "1000"),
    (r"\fbox{7}", "7"),
    (r"\boxed{2", None),  # braces never close
    ("no box here 5", None),
    (r"\boxed{\$72}", "72"),  # LaTeX's escaped dollar and percent are dropped like the plain ones
    (r"\boxed{72\%}", "72"),
    (r"\boxed{72 \text{ apples}}", "72"),  # a unit after the number
    (r"\boxed{\frac12}", "0.5"),  # LaTeX reads \frac12 as \frac{1}{2}
    (r"\boxed{\frac 1{4}}", "0.25"),
    (r"\boxed{}", None),  # an empty box is no answer
    (r"\boxed{ }", None),
]


@pytest.mark.parametrize("text, expected", BOXED_CASES)
def test_boxed_extraction(text, expected):
    assert data.extract_boxed(text) == expected


@pytest.mark.parametrize("written, canonical", [
    ("72", "72"), ("0072", "72"), ("72.0", "72"), ("-0", "0"), ("$ 1,000", "1000"), ("1,000.25", "1000.25"),
    ("6/8", "0.75"), ("-3/4", "-0.75"), ("1.5/0.5", "3"), ("2/3", "2/3"), ("\\frac{6}{8}", "0.75"),
    ("1/0", None), ("1,00", None), ("abc", None), ("", None), ("1.2.3", None),
    ("\\$ 1,000", "1000"), ("12.5\\%", "12.5"), ("\\frac34", "0.75"), ("\\tfrac{3}4", "0.75"), ("7 \\text{cm}", "7"),
    ("\\frac123", None), ("\\text{7}", None),
])
def test_normalize_number(written, canonical):
    assert data.normalize_number(written) == canonical


def test_reward_is_exact_match():
    assert data.reward("... #### 18", "18") == 1.0
    assert data.reward("... #### 17", "18") == 0.0
    assert data.reward("the answer is 18", "18") == 0.0  # strict: no `####`, no reward
    assert data.reward("the answer is 18", "18", mode="flexible") == 1.0
    assert data.reward("no answer at all", "18") == 0.0
    assert data.reward(r"\boxed{\frac{1}{2}}", "0.5", mode="boxed") == 1.0
    with pytest.raises(ValueError, match="'boxed', 'flexible', 'paper', 'strict'"):
        data.reward("#### 1", "1", mode="exact")


def test_an_empty_box_is_no_answer():
    assert data.extract_boxed(r"so \boxed{}") is None and data.reward(r"so \boxed{}", "", mode="boxed") == 0.0
    assert data.extract_boxed(r"so \boxed{71}") == "71" and data.reward(r"so \boxed{71}", "72", mode="boxed") == 0.0


# --------------------------------------------------------------------------------------------
# The lenient `strict` rule and the authors' `paper` rule: the table of docs/grpo.md

# (label in the docs, completion, reference solution, strict cell, paper cell); a cell is what the
# rule reads, with a tick when it is right, or "✗ none" when it finds no answer.
REWARD_TABLE = [
    ("`#### 72`", "so #### 72", "#### 72", "✓ `72`", "✓ `72`"),
    ("`####72`", "so ####72", "#### 72", "✓ `72`", "✗ none"),
    ("`####  72` (two spaces)", "so ####  72", "#### 72", "✓ `72`", "✗ none"),
    ("`#### $72`", "so #### $72", "#### 72", "✓ `72`", "✗ none"),
    ("`#### 072`", "so #### 072", "#### 72", "✓ `72`", "✗ `072`"),
    ("`#### 72.0`", "so #### 72.0", "#### 72", "✓ `72`", "✗ `72.0`"),
    ("`#### 72.` (a full stop)", "so #### 72.", "#### 72", "✓ `72`", "✗ `72.`"),
    ("`#### +72`", "so #### +72", "#### 72", "✓ `72`", "✗ none"),
    ("`#### 72 apples`", "so #### 72 apples", "#### 72", "✓ `72`", "✓ `72`"),
    ("`#### 50%`", "so #### 50%", "#### 50", "✓ `50`", "✓ `50`"),
    ("`#### 12/4`", "so #### 12/4", "#### 3", "✓ `3`", "✗ `12`"),
    ("`#### 12,5`", "so #### 12,5", "#### 125", "✗ `12`", "✓ `125`"),
    ("`#### 1,234`", "so #### 1,234", "#### 1,234", "✓ `1234`", "✓ `1234`"),
    ("`#### 1234`", "so #### 1234", "#### 1,234", "✓ `1234`", "✓ `1234`"),
    ("`#### -5`", "so #### -5", "#### -5", "✓ `-5`", "✓ `-5`"),
    ("`#### 72`, then 300 characters of text", "so #### 72\n" + "Let me double-check. " * 15, "#### 72", "✓ `72`",
     "✗ none"),
    ("`#### 5`, later `#### 72`", "#### 5 is wrong, so #### 72", "#### 72", "✓ `72`", "✓ `72`"),
    ("`\\boxed{72}`", "so \\boxed{72}", "#### 72", "✗ none", "✗ none"),
]


def reward_cell(completion, problem, mode):
    """What the docs table says about `completion` under `mode`, computed by the code."""
    answer = data.EXTRACTORS[mode](completion)
    target = data.reward_target(problem, mode)
    right = data.is_correct(completion, target, mode)
    assert data.reward(completion, target, mode) == (1.0 if right else 0.0)
    return "✗ none" if answer is None else f"{'✓' if right else '✗'} `{answer}`"


@pytest.mark.parametrize("label, completion, solution, strict, paper", REWARD_TABLE)
def test_each_reward_table_row_under_the_lenient_and_the_authors_rule(label, completion, solution, strict, paper):
    problem = data.Problem("q", solution, data.final_answer(solution))
    assert reward_cell(completion, problem, "strict") == strict
    assert reward_cell(completion, problem, "paper") == paper


def test_the_docs_reward_table_is_the_tested_table():
    text = open(os.path.join(ROOT, "docs", "grpo.md"), encoding="utf-8").read()
    section = text.split("## Which reward is the paper's\n")[1].split("\n## ")[0]
    rows = [[cell.strip() for cell in line.strip().strip("|").split(" | ")]
            for line in section.splitlines() if line.startswith("| ")][1:]  # [1:]: the header
    assert [row[:4] for row in rows] == [[label, f"`{solution}`", strict, paper]
                                         for label, _, solution, strict, paper in REWARD_TABLE]


def test_the_paper_rule_reads_only_the_last_300_characters():
    tail = "x" * (data.PAPER_CLIP_CHARS - len("#### 72"))
    assert data.extract_paper("#### 72" + tail) == "72"  # `#### 72` opens the last 300 characters
    assert data.extract_paper("#### 72" + tail + "x") is None  # one more: the clip cuts into `####`
    assert data.extract_strict("#### 72" + tail + "x") == "72"  # the lenient rule reads the whole text


def test_reference_is_the_solutions_number_as_written(tmp_path):
    """`paper` compares with the reference as the authors' preprocessing stores it (commas removed,
    nothing else); solutions without a readable `#### N` fall back to the normalised target."""
    answers = ["48/2 = 24\n#### 1,072", "#### 72.50", r"so $\boxed{\frac{3}{4}}$", " 12.50 ", "####$18"]
    path = write_lines(tmp_path, [json.dumps({"question": "q", "answer": a}) for a in answers])
    problems = data.load_problems(path)
    assert [p.reference for p in problems] == ["1072", "72.50", "0.75", "12.5", "18"]
    assert [p.target for p in problems] == ["1072", "72.5", "0.75", "12.5", "18"]
    assert data.reward("so #### 72.50", data.reward_target(problems[1], "paper"), "paper") == 1.0
    assert data.reward("so #### 72.5", data.reward_target(problems[1], "paper"), "paper") == 0.0  # a string rule
    assert data.reward("so #### 72.5", data.reward_target(problems[1], "strict"), "strict") == 1.0


def test_score_reports_both_accuracies():
    s = data.score(["#### 3", "it is 3", "#### 4"], ["3", "3", "3"])
    assert s.correct == [True, False, False]
    assert s.flexible == [True, True, False]


@settings(max_examples=300, deadline=None)
@given(st.text() | st.text(alphabet="#$%+-.,/0123456789 \\{}boxedfrac\n", max_size=60))
def test_answer_checks_never_raise(text):
    for extract in data.EXTRACTORS.values():
        answer = extract(text)
        assert answer is None or isinstance(answer, str)
    assert data.reward(text, "42") in (0.0, 1.0)
    data.normalize_answer(text)


@settings(max_examples=100, deadline=None)
@given(st.integers(-10**12, 10**12), st.integers(0, 2))
def test_written_integers_round_trip(n, decimals):
    """Any integer, written with commas, `$` and trailing zeros, normalises to str(n)."""
    written = f"{abs(n):,}" + ("." + "0" * decimals if decimals else "")
    written = ("-$" if n < 0 else "$") + written
    assert data.extract_strict(f"so\n#### {written}") == str(n)
    assert data.extract_flexible(f"it is {written}.") == str(n)


# --------------------------------------------------------------------------------------------
# Problem files


def write_lines(tmp_path, lines, name="problems.jsonl"):
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def test_load_gsm8k_and_generic_answers(tmp_path):
    path = write_lines(tmp_path, [
        json.dumps({"question": "Natalia sold 48 clips...", "answer": "48/2 = <<48/2=24>>24\n#### 1,072"}),
        "",  # blank lines are allowed
        json.dumps({"question": "What is 1/2 + 1/4?", "answer": r"It is $\boxed{\frac{3}{4}}$."}),
        json.dumps({"question": "Bare?", "answer": " 12.50 "}),
        json.dumps({"question": "Number?", "answer": 7}),
    ])
    problems = data.load_problems(path)
    assert [p.target for p in problems] == ["1072", "0.75", "12.5", "7"]
    assert problems[0].question == "Natalia sold 48 clips..."
    assert problems[0].answer_text.endswith("#### 1,072")
    assert data.is_correct("... #### 1072", problems[0].target)


def test_sft_field_becomes_the_demonstration(tmp_path):
    path = write_lines(tmp_path, [
        json.dumps({"question": "q1", "answer": "1+1 = 2\n#### 2", "solution": "One and one: 2. #### 2"}),
        json.dumps({"question": "q2", "answer": "#### 3"}),
    ])
    assert data.load_problems(path)[0].demonstration is None
    with pytest.raises(data.DataError, match=f"{path}:2: SFT needs a non-empty string in 'solution'"):
        data.load_problems(path, sft_field="solution")
    assert [p.demonstration for p in data.load_problems(path, sft_field="answer")] == ["1+1 = 2\n#### 2", "#### 3"]


@pytest.mark.parametrize("line, message", [
    ('{"question": "q", "answer": "#### 3"', "not valid JSON"),
    ('["q", "#### 3"]', "expected a JSON object"),
    ('{"answer": "#### 3"}', "missing key 'question'"),
    ('{"question": "q"}', "missing key 'answer'"),
    ('{"question": 5, "answer": "#### 3"}', "'question' must be a non-empty string"),
    ('{"question": "q", "answer": ["#### 3"]}', "'answer' must be a string or a number"),
    ('{"question": "q", "answer": true}', "'answer' must be a string or a number"),
    ('{"question": "q", "answer": "the end ####"}', "no number after it"),
    ('{"question": "q", "answer": "some words"}', "no final answer"),
    ('{"question": "q", "answer": "\\\\boxed{}"}', "empty"),
])
def test_malformed_line_names_file_and_line(tmp_path, line, message):
    good = json.dumps({"question": "fine", "answer": "#### 1"})
    path = write_lines(tmp_path, [good, good, line, good])
    with pytest.raises(data.DataError, match=message) as e:
        data.load_problems(path)
    assert str(e.value).startswith(f"{path}:3: ")


def test_bad_utf8_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"question": "q", "answer": "#### 1"}\n{"question": "\xff", "answer": "#### 1"}\n')
    with pytest.raises(data.DataError, match=f"{path}:2: not UTF-8"):
        data.load_problems(str(path))


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file_is_an_error(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(data.DataError, match="no problems"):
        data.load_problems(str(path))


# --------------------------------------------------------------------------------------------
# Prompts


def test_prompt_is_chat_format_with_instruction_after_a_space(tiny_ckpt):
    tok = load_tokenizer(tiny_ckpt[0])
    ids = data.make_prompt(tok, "What is 2+2?")
    text = tok.decode(ids, skip_special_tokens=False)
    user = 'What is 2+2? Let\'s think step by step and output the final answer after "####".'
    assert text == tok.chat_prompt(user)
    assert tok.decode(data.make_prompt(tok, "Q?", instruction="", system="Be brief."),
                      skip_special_tokens=False) == tok.chat_prompt("Q?", "Be brief.")
