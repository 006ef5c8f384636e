"""Problems, prompts and the exact-match reward (paper: "exact-match reward", GSM8K and MATH).

Data. A problem file is JSON lines, one `{"question": ..., "answer": ...}` object per line:

    GSM8K          "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips ... #### 72"
    MATH-style     "answer": "... so the answer is $\\boxed{\\frac{3}{4}}$."
    bare           "answer": "72"   (or the JSON number 72)

`load_problems` reads either kind into `Problem(question, answer_text, target)`, where `target` is
the normalised final answer (`final_answer` below) and `Problem.reference` the final answer as the
authors' `paper` rule compares it (as written, commas removed). Nothing is skipped: a line that
cannot be used raises `DataError` naming the file, the line and what to fix.

Prompt. `make_prompt` writes the question, a space, then the instruction (default: the authors'
`Let's think step by step and output the final answer after "####".`, joined with a space exactly
as in their verl preprocessing script) into the model family's chat format (tokenizer.py).

Answer checks, given a completion's text (docs/grpo.md, "Which reward is the paper's", compares
the first two with lm-eval-harness on example endings):

    strict    lenient: the number after the LAST `#### <number>`, spaces and `$` allowed after
              `####`, read as a number (the default and the toy runs' reward)
    paper     the authors' rule (verl's GSM8K reward, method "strict", their `gsm8k-paper` runs):
              the characters after the LAST `#### ` (one space) in the last 300 characters, if
              they are `-`, digits, `.` and `,`; commas removed, compared as a STRING with
              `Problem.reference`, so `#### 072`, `#### 72.0`, `####72` and `#### $72` are wrong
    flexible  the last number anywhere in the text (reported next to strict: part of a
              strict-check gain is only format)
    boxed     the content of the last `\\boxed{...}` (nested braces matched), for MATH-style data;
              an empty `\\boxed{}` is no answer

Numbers are normalised before comparing (every check but `paper`): surrounding spaces, `$` and
`\\$`, thousands commas, a leading `+`, a trailing `%` or `\\%`, and a trailing `\\text{...}`
unit (`72 \\text{ apples}`) are dropped, and the value is compared exactly as a fraction, so
`1,234.50` == `1234.5`, `72.00` == `72`, `3/4` == `0.75` == `\\frac{3}{4}` == `\\frac34`. A
percentage is compared as its number (`50%` == `50`), because GSM8K writes percentage answers
without the sign. Non-numeric boxed answers (`\\sqrt{2}`, `x+1`) are compared as strings after
removing spaces and `\\left`/`\\right`/`\\dfrac`-style spelling variants; this is not a
symbolic-equivalence checker.

Reward: 1.0 for a correct answer, else 0 (the paper's exact-match reward, no format bonus). No
answer check raises on any string.
"""

import json
import re
from dataclasses import dataclass
from fractions import Fraction

DEFAULT_INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'

MAX_DIGITS = 100  # a longer string of digits is not read as a number (int() refuses > 4300 digits)


class DataError(ValueError):
    """A problem file that cannot be used; the message is `file:line: what is wrong and what to do`."""


@dataclass(frozen=True)
class Problem:
    question: str
    answer_text: str  # the reference solution as written in the file
    target: str  # normalised final answer, comparable with `normalize_answer(...)` of a completion's
    demonstration: str | None = None  # text to imitate for SFT (load_problems' sft_field), else None

    @property
    def reference(self):
        """The final answer as the authors' `paper` rule compares it: what their verl preprocessing
        stores, the number after the first `#### ` of the solution with commas removed
        (`#### 1,072` -> '1072'); `target` when there is none (`\\boxed{}` and bare answers, or a
        `####72` the authors' regex cannot read)."""
        match = _PAPER_RE.search(self.answer_text)
        return match.group(1).replace(",", "") if match else self.target


# --------------------------------------------------------------------------------------------
# Numbers and their normal form

# One number as people and models write it: optional sign (not right after a letter, digit or
# `)`: the 3 in `x-3` or `5-3` is positive), `$`, digits with thousands commas (1,234,567) or
# plain digits, optional decimals, optionally `/ denominator`, optional `%`. ASCII only.
_INT = r"(?:\d{1,3}(?:,\d{3})+|\d+)"
_DECIMAL = rf"{_INT}(?:\.\d+)?"
NUMBER = rf"(?:(?<![\w)])[-+])?\$?{_DECIMAL}(?:\s*/\s*{_DECIMAL})?%?"
_NUMBER_RE = re.compile(NUMBER, re.ASCII)
_STRICT_RE = re.compile(rf"####[ \t]*\$?[ \t]*({NUMBER})", re.ASCII)
_PLAIN_RE = re.compile(rf"[-+]?{_DECIMAL}", re.ASCII)
# \frac{3}{4}, \dfrac{3}{4}, \frac34 (spaces already removed): an argument is `{...}` or one digit
_LATEX_FRAC_RE = re.compile(r"(-?)\\[dt]?frac(\{[^{}]*\}|\d)(\{[^{}]*\}|\d)")
_TEXT_UNIT_RE = re.compile(r"\\(?:text|mbox)\{[^{}]*\}$")  # 72\text{apples}: a unit after the number
# The authors' rule (verl): `#### `, one space, then the characters of a number.
_PAPER_RE = re.compile(r"#### (-?[0-9.,]+)")
PAPER_CLIP_CHARS = 300  # verl reads only the last 300 characters of a completion


def _to_fraction(text):
    """'-1,234.5' -> Fraction(-2469, 2); None unless text is one plain decimal of at most
    MAX_DIGITS characters."""
    if len(text) > MAX_DIGITS or not _PLAIN_RE.fullmatch(text):
        return None
    return Fraction(text.replace(",", ""))


def _format(value):
    """Canonical text of a Fraction: '72', '-2.5', '0.75'; '1/3' when the decimal does not end."""
    if value.denominator == 1:
        return str(value.numerator)
    d = value.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    if d != 1:
        return f"{value.numerator}/{value.denominator}"
    digits = 0
    while (value * 10**digits).denominator != 1:
        digits += 1
    sign = "-" if value < 0 else ""
    whole, frac = divmod(abs(value.numerator) * 10**digits // value.denominator, 10**digits)
    return f"{sign}{whole}.{frac:0{digits}d}"


def normalize_number(text):
    """Canonical text of a written number, or None when `text` is not one number.
    '$1,234.50' and '\\$1,234.50' -> '1234.5', '+72.00' -> '72', '3/4', '\\frac{3}{4}' and '\\frac34'
    -> '0.75', '50%' and '50\\%' -> '50', '72 \\text{ apples}' -> '72', '1/3' -> '1/3'."""
    text = text.strip().replace(" ", "").replace("\\$", "$").replace("\\%", "%")
    text = _TEXT_UNIT_RE.sub("", text).replace("$", "").removesuffix("%").removeprefix("+")
    latex = _LATEX_FRAC_RE.fullmatch(text)
    if latex:
        num, den = latex.group(1) + latex.group(2).strip("{}"), latex.group(3).strip("{}")
    else:
        num, _, den = text.partition("/")
    num = _to_fraction(num)
    if num is None:
        return None
    if not den:
        return _format(num)
    den = _to_fraction(den)
    if den is None or den == 0:
        return None
    return _format(num / den)


def normalize_answer(text):
    """Normal form of a final answer: a number's canonical text, else the text without spaces
    and LaTeX spelling variants (for MATH answers such as `\\sqrt{2}`)."""
    number = normalize_number(text)
    if number is not None:
        return number
    text = re.sub(r"\\(?:left|right|!|,|;|:)", "", text)
    text = re.sub(r"\\[dt]frac", r"\\frac", text)
    return re.sub(r"\s+", "", text).strip("$.")


# --------------------------------------------------------------------------------------------
# Finding the final answer in a text


def extract_strict(text):
    """Normalised number after the last well-formed `#### <number>`, or None. `####` followed by
    no number does not count, so `#### 5 ... ####` gives '5' (verl's `findall(...)[-1]` rule)."""
    matches = _STRICT_RE.findall(text)
    return normalize_number(matches[-1]) if matches else None


def extract_paper(text):
    """The authors' rule, verl's `extract_solution(method="strict")`: in the last PAPER_CLIP_CHARS
    characters of the text, the characters after the LAST `#### ` (exactly one space) that are
    `-`, digits, `.` or `,`, with the commas removed; None when there is no such `#### `. The
    result is not normalised: it is compared as a string with `Problem.reference`, so '072',
    '72.0' and '72.' (a full stop read into the number) are not '72'. Any match is an answer,
    even `#### .`, as in verl."""
    matches = _PAPER_RE.findall(text[-PAPER_CLIP_CHARS:])
    return matches[-1].replace(",", "") if matches else None


def extract_flexible(text):
    """Normalised last number in the text, or None."""
    matches = _NUMBER_RE.findall(text)
    return normalize_number(matches[-1]) if matches else None


def last_boxed(text):
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`), nested braces matched; None when
    there is none or its braces never close."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def extract_boxed(text):
    """Normalised content of the last `\\boxed{...}`, or None; an empty box (`\\boxed{}`,
    `\\boxed{ }`) is no answer."""
    content = last_boxed(text)
    if content is None:
        return None
    return normalize_answer(content) or None


EXTRACTORS = {"strict": extract_strict, "paper": extract_paper, "flexible": extract_flexible, "boxed": extract_boxed}


def check_mode(mode):
    if mode not in EXTRACTORS:
        raise ValueError(f"answer check {mode!r}: use one of {sorted(EXTRACTORS)}")


def reward_target(problem, mode):
    """What `mode` compares a completion's answer with: the reference as the authors wrote it for
    `paper` (a string rule), the normalised target for every other check."""
    return problem.reference if mode == "paper" else problem.target


def is_correct(completion, target, mode="strict"):
    """Does the answer that `mode` finds in `completion` equal `target` (`reward_target(problem,
    mode)`: normalised for every check but `paper`)?"""
    check_mode(mode)
    answer = EXTRACTORS[mode](completion)
    return answer is not None and answer == target


def reward(completion, target, mode="strict"):
    """1.0 when the answer `mode` finds in `completion` equals `target`, else 0.0."""
    return float(is_correct(completion, target, mode))


@dataclass
class Scores:
    correct: list  # [N] bools under the strict check
    flexible: list  # [N] bools under the last-number check, reported next to `correct`


def score(completions, targets):
    """Strict and flexible correctness of N completion texts against N normalised targets (the
    accuracy train.py logs next to the reward, whichever check the reward uses)."""
    if len(completions) != len(targets):
        raise ValueError(f"score: {len(completions)} completions but {len(targets)} targets; repeat each "
                         "target once per sample")
    return Scores(correct=[is_correct(c, t) for c, t in zip(completions, targets)],
                  flexible=[is_correct(c, t, "flexible") for c, t in zip(completions, targets)])


# --------------------------------------------------------------------------------------------
# Evaluation records: one per completion, and the accuracy of a list of them


def completion_record(index, problem, text, decoding, temperature):
    """One line of eval_<name>_<decoding>.jsonl: the problem (`index`: its 0-based place among the
    problems of --eval-data, blank lines not counted), the completion, the answers the strict
    (`#### N`), flexible (last number), paper (the authors' rule, against `Problem.reference`) and
    boxed (`\\boxed{}`) checks read from it (None: none found), and whether the first three are right."""
    answer, flexible, paper = extract_strict(text), extract_flexible(text), extract_paper(text)
    return {"index": index, "decoding": decoding, "temperature": temperature, "question": problem.question,
            "completion": text, "target": problem.target, "answer": answer, "correct": answer == problem.target,
            "flexible_answer": flexible, "flexible_correct": flexible == problem.target,
            "paper_answer": paper, "paper_correct": paper is not None and paper == problem.reference,
            "boxed_answer": extract_boxed(text)}


def accuracy(records):
    """Strict, flexible and paper-rule accuracy of evaluation records, and the answer formats of
    their completions: the share with a `#### N`, with a `\\boxed{}` answer, with neither."""
    def share(test):
        return sum(map(test, records)) / len(records)
    return {"strict": share(lambda r: r["correct"]), "flexible": share(lambda r: r["flexible_correct"]),
            "paper": share(lambda r: r["paper_correct"]),
            "formats": {"####": share(lambda r: r["answer"] is not None),
                        "boxed": share(lambda r: r["boxed_answer"] is not None),
                        "neither": share(lambda r: r["answer"] is None and r["boxed_answer"] is None)}}


# --------------------------------------------------------------------------------------------
# Problem files


def final_answer(answer):
    """Normalised final answer of a reference solution: the number after the last `####`
    (GSM8K), else the last `\\boxed{}` (MATH), else the whole text as one number. Raises
    ValueError with the reason when there is none."""
    if "####" in answer:
        number = extract_strict(answer)
        if number is None:
            raise ValueError("the answer has '####' but no number after it; write '#### <number>'")
        return number
    if "\\boxed{" in answer or "\\fbox{" in answer:
        boxed = extract_boxed(answer)
        if not boxed:
            raise ValueError("the answer's last \\boxed{...} is empty or its braces do not close")
        return boxed
    number = normalize_number(answer)
    if number is None:
        raise ValueError(f"no final answer in {answer[:60]!r}: end it with '#### <number>', put it in "
                         "\\boxed{...}, or make the whole answer one number")
    return number


def load_problems(path, sft_field=None):
    """Read a JSON-lines problem file (GSM8K or MATH-style, see the top of this file) into a list
    of Problem. `answer` may be a string or a JSON number; blank lines are allowed; anything else
    unusable raises DataError('file:line: ...'). sft_field: the key whose string becomes each
    problem's `demonstration` (for SFT; GSM8K's worked solution is 'answer'), required on every
    line when given."""
    problems = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); each line must be "
                                "one JSON object") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object with 'question' and 'answer', got "
                                f"{type(row).__name__}")
            for key in ("question", "answer"):
                if key not in row:
                    raise DataError(f"{where}: missing key {key!r}; each line needs 'question' and 'answer'")
            question, answer = row["question"], row["answer"]
            if isinstance(answer, (int, float)) and not isinstance(answer, bool):
                answer = str(answer)
            if not isinstance(question, str) or not question.strip():
                raise DataError(f"{where}: 'question' must be a non-empty string, got {question!r:.60}")
            if not isinstance(answer, str):
                raise DataError(f"{where}: 'answer' must be a string or a number, got {type(answer).__name__}")
            try:
                target = final_answer(answer)
            except ValueError as e:
                raise DataError(f"{where}: {e}") from None
            demonstration = None
            if sft_field is not None:
                demonstration = row.get(sft_field)
                if not isinstance(demonstration, str) or not demonstration.strip():
                    raise DataError(f"{where}: SFT needs a non-empty string in {sft_field!r} on every line, got "
                                    f"{demonstration!r:.60}")
            problems.append(Problem(question, answer, target, demonstration))
    if not problems:
        raise DataError(f"{path}:1: the file has no problems; expected one JSON object per line")
    return problems


def make_prompt(tokenizer, question, instruction=DEFAULT_INSTRUCTION, system=None):
    """Token ids of the chat prompt for one question: user turn = question + ' ' + instruction
    (the instruction left out when empty); `system` None = the model family's default (Qwen2.5's
    system prompt; none for Llama 3 and Qwen3: tokenizer.Tokenizer.chat_prompt)."""
    user = f"{question} {instruction}" if instruction else question
    return tokenizer.encode_chat(user, system)
