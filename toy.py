"""The toy world behind `python train.py`'s default: a synthetic GSM8K-like task, its tokenizer,
and a tiny Qwen2 base model that this file pretrains, written in the Hugging Face layout under toy/.

Why a toy: the paper's claim is that RL with a 13-parameter adapter steers a model that already
holds the skill. To show that on two CPU cores without downloads we need a base model that CAN
solve the task but often DOES NOT. We build one on purpose with a "careless writer":

    question   Tom has 5 apples. He buys 3 more. He gives away 2. He buys 4 more.
               How many apples does Tom have now?
    steps      Working: 5 + 3 = 8. 8 - 2 = 6. 6 + 4 = 10. #### 10    always correct
    direct     Answer: #### 6                                        70% of the time forgets the last change

The base model learns both styles: the step-by-step one is reliably right, the direct one reliably
wrong (it was written to be careless). In pretraining a third of the problems ask for the careful
writer in the system prompt ("Be careful."), a third for the careless one ("Be quick."), and a
third use the plain prompt that training and evaluation use, answered by the careful writer 45%
of the time. So the model holds a style switch that the system prompt drives and the plain prompt
leaves on the careless side: which style it starts with decides the answer, and that switch is the
knob a 13-parameter adapter can turn. Two choices make the knob cheap to turn (docs/toy.md measures
both): each writer opens with a word of its own ("Working:", "Answer:"), and the saved model is
sharpened (logits x SHARPNESS) so that it is sure of its arithmetic at T = 1, as we take a large
model to be (an assumption, not a measurement).
See docs/toy.md for the design and the measured numbers.

The data files also carry a third, human-like correct solution in GSM8K's `answer` field
("Tom starts with 5 apples. After buying 3 more, he has 8 apples. ... #### 10"), worded unlike
the model's own style, for SFT baselines; `solution_own_style` holds the step-by-step solution.

`python toy.py` regenerates everything deterministically (same bytes on the same machine and
torch version): toy/data/{train,eval}.jsonl and toy/base/ (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json, generation_config.json), then prints the base model's
accuracy profile. `python toy.py --eval` only measures the committed model.
"""

import argparse
import json
import math
import os
import random
import re
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import tinylora
from model import ModelConfig, Transformer, generate, left_pad, load_model
from tokenizer import chatml_prompt, load_tokenizer

ROOT = os.path.dirname(os.path.abspath(__file__))
TOY_DIR = os.path.join(ROOT, "toy")
BASE_DIR = os.path.join(TOY_DIR, "base")
DATA_DIR = os.path.join(TOY_DIR, "data")

# --------------------------------------------------------------------------------------------
# The prompt: Qwen's ChatML with a short system prompt (short sequences = fast CPU training) and
# the paper's instruction appended to the question.

SYSTEM_PROMPT = ""
INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'
MAX_NEW_TOKENS = 48  # the longest step-by-step completion is 36 tokens with <|im_end|>


def prompt_text(question):
    """The full ChatML prompt for a question, ending with the assistant header."""
    return chatml_prompt(f"{question} {INSTRUCTION}", SYSTEM_PROMPT)


# --------------------------------------------------------------------------------------------
# The task: a quantity changed a few times; results stay in 0..MAX_VALUE

NAMES = [("Tom", "He"), ("Anna", "She"), ("Ben", "He"), ("Mia", "She"), ("Sam", "He"), ("Lily", "She"),
         ("Jack", "He"), ("Emma", "She"), ("Leo", "He"), ("Zoe", "She"), ("Max", "He"), ("Ella", "She")]
ITEMS = ["apples", "marbles", "stickers", "cards", "pencils", "coins", "shells", "stamps", "books", "cookies"]
VERBS = [  # (question wording, human-solution wording, sign)
    ("buys {} more", "buying {} more", +1),
    ("finds {} more", "finding {} more", +1),
    ("gets {} more", "getting {} more", +1),
    ("gives away {}", "giving away {}", -1),
    ("loses {}", "losing {}", -1),
    ("sells {}", "selling {}", -1),
]
MIN_CHANGES, MAX_CHANGES = 2, 4
MAX_START, MAX_AMOUNT, MAX_VALUE = 50, 9, 99
# The pretraining corpus has two writers. The careful one writes every step; the careless one
# writes only "Answer: #### N" and forgets the last change CARELESS_RATE of the time. A third of the corpus
# asks for the careful writer in the system prompt, a third for the careless one, and a third (the
# project's plain prompt, SYSTEM_PROMPT) is answered by the careful one PLAIN_STEPS_SHARE of the
# time, else by the careless one. So the model learns a style switch that the system prompt
# drives, and the plain prompt leaves on the careless side (docs/toy.md tells why not 50/50):
# the knob a 13-parameter adapter can turn (docs/toy.md tells why a corpus without the cue was not
# enough).
CARELESS_RATE = 0.7
CUES = {"steps": "Be careful.", "direct": "Be quick."}  # system prompts of the cued thirds
PLAIN_STEPS_SHARE = 0.45
# Each writer opens with a word of its own, so the choice of writer is one token that occurs
# nowhere else: nudging it need not touch the arithmetic (without openers the careful writer's first
# token is its first number, and pushing it means pushing number copying everywhere).
STEPS_WORD, DIRECT_WORD = "Working", "Answer"
STEPS_OPENER, DIRECT_OPENER = f"{STEPS_WORD}: ", f"{DIRECT_WORD}: "
# The saved model's logits are the pretrained model's times SHARPNESS (its final RMSNorm weight is
# scaled): sampling it at T = 1 is sampling the pretrained model at T = 1 / SHARPNESS. A 0.3M-
# parameter model trained for minutes is unsure of its arithmetic (we take a 7B model to be sure of
# GSM8K's), and an unsure model's arithmetic is what a 13-parameter push disturbs (docs/toy.md,
# `steerability`). The plain prompt's careful share, 0.45 in pretraining, is about 0.35 once sharpened.
SHARPNESS = 3.0


@dataclass(frozen=True)
class Problem:
    name: str
    pronoun: str  # "He" / "She"
    item: str
    start: int
    changes: tuple  # ((verb index into VERBS, amount > 0), ...)

    def values(self):
        """The quantity after each change: [start, v1, ..., vn]."""
        out = [self.start]
        for verb, amount in self.changes:
            out.append(out[-1] + VERBS[verb][2] * amount)
        return out

    @property
    def answer(self):
        return self.values()[-1]


def make_problem(rng):
    """One random problem from `rng` (a random.Random). Every intermediate value stays in 0..MAX_VALUE."""
    name, pronoun = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    value = start = rng.randint(1, MAX_START)
    changes = []
    for _ in range(rng.randint(MIN_CHANGES, MAX_CHANGES)):
        amount = rng.randint(1, MAX_AMOUNT)
        gain = rng.random() < 0.5
        if value + amount > MAX_VALUE or value - amount < 0:
            gain = value - amount < 0
        verb = rng.choice([i for i, v in enumerate(VERBS) if (v[2] > 0) == gain])
        changes.append((verb, amount))
        value += VERBS[verb][2] * amount
    return Problem(name, pronoun, item, start, tuple(changes))


def question_text(p):
    changes = " ".join(f"{p.pronoun} {VERBS[verb][0].format(amount)}." for verb, amount in p.changes)
    return f"{p.name} has {p.start} {p.item}. {changes} How many {p.item} does {p.name} have now?"


def steps_solution(p):
    """The model's own reasoning style: one equation per change, always correct."""
    values = p.values()
    steps = " ".join(f"{a} {'+' if VERBS[verb][2] > 0 else '-'} {amount} = {b}."
                     for a, b, (verb, amount) in zip(values, values[1:], p.changes))
    return f"{STEPS_OPENER}{steps} #### {p.answer}"


def human_solution(p):
    """A correct solution worded like a person would (GSM8K's `answer` field), unlike the model's style."""
    values = p.values()
    sentences = " ".join(f"After {VERBS[verb][1].format(amount)}, {p.pronoun.lower()} has {b} {p.item}."
                         for b, (verb, amount) in zip(values[1:], p.changes))
    return f"{p.name} starts with {p.start} {p.item}. {sentences}\n#### {p.answer}"


def careless_answer(p, rng):
    """The careless writer's direct answer: with probability CARELESS_RATE it forgets the last change."""
    return p.values()[-2] if rng.random() < CARELESS_RATE else p.answer


def direct_solution(p, rng):
    return f"{DIRECT_OPENER}#### {careless_answer(p, rng)}"


def make_problems(n, rng, exclude=frozenset()):
    """n problems with distinct questions, none of whose questions is in `exclude`."""
    seen, out = set(exclude), []
    while len(out) < n:
        p = make_problem(rng)
        q = question_text(p)
        if q not in seen:
            seen.add(q)
            out.append(p)
    return out


def data_row(p):
    return {"question": question_text(p), "answer": human_solution(p), "solution_own_style": steps_solution(p)}


ANSWER_RE = re.compile(r"####\s*(-?\d+)")


def extract_answer(text):
    """Strict extraction, as in the paper: the number after the last `####`, or None."""
    found = ANSWER_RE.findall(text)
    return int(found[-1]) if found else None


def gold_answer(row):
    return extract_answer(row["answer"])


# --------------------------------------------------------------------------------------------
# Tokenizer: word-level over the toy's own vocabulary. A word carries its leading space (like
# Qwen's byte-level BPE), every digit is its own token (" 1", "0" for " 10": arithmetic sees
# digits), and the three Qwen special tokens come first so the ChatML prompt tokenizes as in Qwen.

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PIECE_RE = r" ?[0-9]| ?[A-Za-z]+| ?[^\sA-Za-z0-9]+|\s"


def _pre_tokenizer():
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Split(Regex(PIECE_RE), behavior="isolated")


def build_tokenizer(texts):
    """A `tokenizers.Tokenizer` whose vocabulary is every piece of `texts` (plus all digits)."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models

    pre = _pre_tokenizer()
    specials = re.compile("|".join(map(re.escape, SPECIAL_TOKENS)))  # matched before pre-tokenization
    pieces = {piece for text in texts for part in specials.split(text) for piece, _ in pre.pre_tokenize_str(part)}
    pieces |= {d for i in range(10) for d in (str(i), f" {i}")}
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + sorted(pieces) + ["<unk>"])}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.Fuse()  # pieces carry their own spaces: decoding is concatenation
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


# --------------------------------------------------------------------------------------------
# Base model and its pretraining

SEED = 0
N_EVAL, N_TRAIN = 500, 3000
PRETRAIN_STEPS, BATCH, LR, WARMUP = 1200, 64, 3e-3, 100


def model_config(vocab_size):
    return ModelConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=10000.0,
                       tie_word_embeddings=True, max_position_embeddings=256)


def init_weights(model):
    """Hugging Face's Qwen2 init: N(0, 0.02) for matrices and embeddings, zero biases, unit norms."""
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            torch.nn.init.ones_(p)
        elif name.endswith("bias"):
            torch.nn.init.zeros_(p)
        else:
            torch.nn.init.normal_(p, std=0.02)


def pretraining_texts(problems, rng):
    """(prompt, completion, coin) triples: a third cued for the careful writer, a third for the
    careless one, a third with the plain prompt and either writer at random. For the plain third,
    coin = (PLAIN_STEPS_SHARE, the step-by-step completion), else None: see `completion_loss`."""
    texts = []
    for p in problems:
        user, cue = f"{question_text(p)} {INSTRUCTION}", rng.random()
        if cue < 1 / 3:
            texts.append((chatml_prompt(user, CUES["steps"]), steps_solution(p), None))
        elif cue < 2 / 3:
            texts.append((chatml_prompt(user, CUES["direct"]), direct_solution(p, rng), None))
        else:
            steps = steps_solution(p)
            completion = steps if rng.random() < PLAIN_STEPS_SHARE else direct_solution(p, rng)
            texts.append((prompt_text(question_text(p)), completion, (PLAIN_STEPS_SHARE, steps)))
    return texts


def encode_examples(tok, texts):
    """Pretraining sequences: (prompt + completion + <|im_end|> ids, prompt length, coin), where
    coin is None or (share of the step-by-step style, id of its first token, id of the direct style's)."""
    end, marker = tok.token_to_id("<|im_end|>"), tok.token_to_id(DIRECT_WORD)
    prompt_ids = tok.encode_batch([prompt for prompt, _, _ in texts], add_special_tokens=False)
    completion_ids = tok.encode_batch([completion for _, completion, _ in texts], add_special_tokens=False)
    coins = [None if coin is None else (coin[0], tok.encode(coin[1], add_special_tokens=False).ids[0], marker)
             for _, _, coin in texts]
    return [(a.ids + b.ids + [end], len(a.ids), coin) for a, b, coin in zip(prompt_ids, completion_ids, coins)]


def make_batch(examples, pad_id):
    """Right-padded ids [B, T] and labels [B, T] (-100 on prompt and padding: loss on completions)."""
    T = max(len(seq) for seq, _, _ in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), -100, dtype=torch.long)
    for b, (seq, n_prompt, _) in enumerate(examples):
        ids[b, :len(seq)] = torch.tensor(seq)
        labels[b, n_prompt - 1:len(seq) - 1] = torch.tensor(seq[n_prompt:])  # position t predicts t+1
    return ids, labels


def completion_loss(logits, labels, examples):
    """Token-mean next-token loss over the completions, except the first token of a plain-prompt
    completion: that token picks the writer, and it is trained on the writer's coin instead of its
    outcome, -(p log q(`Working`) + (1 - p) log q(`Answer`)). The expected gradient is
    the same; the batch-to-batch noise of the coin is gone, so the model's style share for the
    plain prompt ends close to PLAIN_STEPS_SHARE for every problem instead of wherever the last
    noisy batches left it (cue-less builds with 0/1 labels, designed 0.40: 0.37 to 0.55)."""
    nll = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none")
    nll = nll.view(labels.shape)  # [B, T]
    for b, (_, n_prompt, coin) in enumerate(examples):
        if coin is not None:
            p, steps_id, marker = coin
            logq = logits[b, n_prompt - 1].log_softmax(-1)  # [V] the first completion token
            nll[b, n_prompt - 1] = -(p * logq[steps_id] + (1 - p) * logq[marker])
    return nll.sum() / (labels != -100).sum()


def pretrain(model, batches, lr, warmup):
    """Plain AdamW on next-token loss over completions; linear warm-up, cosine decay to lr/10."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    t0, recent, steps = time.time(), [], len(batches)
    for step in range(steps):
        scale = min(1.0, (step + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        ids, labels = make_batch(batches[step], pad_id=0)
        loss = completion_loss(model(ids), labels, batches[step])  # model(ids): [B, T, V]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        recent = (recent + [loss.item()])[-50:]
        if (step + 1) % 50 == 0 or step + 1 == steps:
            elapsed = time.time() - t0
            eta = elapsed / (step + 1) * (steps - step - 1)
            print(f"step {step + 1:5d}/{steps}  loss {sum(recent) / len(recent):.4f}  "
                  f"elapsed {elapsed:6.1f}s  eta {eta:6.1f}s", flush=True)
    model.eval()
    return sum(recent) / len(recent), time.time() - t0


# --------------------------------------------------------------------------------------------
# Writing the Hugging Face folder and the data files


def _write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def save_checkpoint(model, tok, path):
    """config.json (transformers' newer layout), model.safetensors (tied lm_head omitted, as
    transformers saves it), tokenizer files and generation_config.json."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    cfg = model.config
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    _write_json(os.path.join(path, "config.json"), {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "dtype": "float32",
        "eos_token_id": ids["<|im_end|>"],
        "hidden_act": "silu",
        "hidden_size": cfg.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": cfg.intermediate_size,
        "layer_types": ["full_attention"] * cfg.num_hidden_layers,
        "max_position_embeddings": cfg.max_position_embeddings,
        "max_window_layers": cfg.num_hidden_layers,
        "model_type": "qwen2",
        "num_attention_heads": cfg.num_attention_heads,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "pad_token_id": ids["<|endoftext|>"],
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
        "sliding_window": None,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": cfg.vocab_size,
    })
    _write_json(os.path.join(path, "generation_config.json"), {
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": ids["<|endoftext|>"],
    })
    _write_json(os.path.join(path, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<unk>",
        "model_max_length": cfg.max_position_embeddings,
    })
    tok.save(os.path.join(path, "tokenizer.json"))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()
             if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


# --------------------------------------------------------------------------------------------
# The toy's own analysis: accuracy split by solution style


def completion_style(text):
    """'direct' if the completion starts with the careless writer's opener, else 'steps'."""
    return "direct" if text.lstrip().startswith(DIRECT_WORD) else "steps"


@torch.no_grad()
def evaluate_styles(model, tok, rows, temperature=0.0, force=None, seed=0, batch=250):
    """Strict accuracy on `rows` (dicts with question/answer) and the share of each style.
    force='steps' makes the first token the most likely one that does not start a direct answer
    (greedy within the step-by-step style); force='direct' starts every completion with `Answer`."""
    marker = tok.token_id(DIRECT_WORD)
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    texts = []
    for i in range(0, len(rows), batch):
        prompts = [tok.encode(prompt_text(r["question"])) for r in rows[i:i + batch]]
        prefix = [[] for _ in prompts]
        if force is not None:
            ids, start = left_pad(prompts, tok.pad_id, device)
            logits = model(ids, start)[:, -1]  # [B, V]
            if force == "steps":
                first = logits.index_fill(-1, torch.tensor([marker], device=device), -math.inf).argmax(-1).tolist()
            else:
                first = [marker] * len(prompts)
            prefix = [[t] for t in first]
            prompts = [p + q for p, q in zip(prompts, prefix)]
        out = generate(model, prompts, MAX_NEW_TOKENS, tok.end_ids, tok.pad_id, temperature=temperature,
                       generator=generator)
        texts += [tok.decode(q + out.tokens[b, :out.lengths[b]].tolist()) for b, q in enumerate(prefix)]
    correct = [extract_answer(t) == gold_answer(r) for t, r in zip(texts, rows)]
    styles = [completion_style(t) for t in texts]
    result = {"accuracy": sum(correct) / len(rows), "n": len(rows)}
    for style in ("steps", "direct"):
        hits = [c for c, s in zip(correct, styles) if s == style]
        result[f"{style}_share"] = len(hits) / len(rows)
        result[f"{style}_accuracy"] = sum(hits) / len(hits) if hits else float("nan")
    return result, texts


def print_profile(model, tok, rows):
    """Print the model's profile: greedy and sampled strict accuracy, style shares, accuracy when
    the style is forced, and the first token's probability of the direct style."""
    for label, kw in [("greedy", {}), ("sampled T=1", {"temperature": 1.0}),
                      ("greedy, forced steps", {"force": "steps"}), ("greedy, forced direct", {"force": "direct"})]:
        r, _ = evaluate_styles(model, tok, rows, **kw)
        print(f"{label:22s} accuracy {r['accuracy']:.3f}   steps share {r['steps_share']:.3f} "
              f"(acc {r['steps_accuracy']:.3f})   direct share {r['direct_share']:.3f} "
              f"(acc {r['direct_accuracy']:.3f})   n={r['n']}", flush=True)
    ids, start = left_pad([tok.encode(prompt_text(r["question"])) for r in rows], tok.pad_id)
    with torch.no_grad():
        p_direct = model(ids, start)[:, -1].softmax(-1)[:, tok.token_id(DIRECT_WORD)]  # [n] the first token
    print(f"first token p(Answer), the direct style: min {p_direct.min():.2f} mean {p_direct.mean():.2f} "
          f"max {p_direct.max():.2f}; above 0.5 for {(p_direct > 0.5).float().mean():.1%} of the problems", flush=True)


def steerability(model, tok, rows, config):
    """How cheaply the adapter `config` (a tinylora.TinyLoRAConfig) moves the style, to second order
    around v = 0 on `rows`: g = gradient of the mean first-token log-odds, log q(`Working`) -
    log q(`Answer`), and H = Hessian of the step-by-step solutions' mean NLL (nats per solution,
    the writer's first token excluded), both in v. In that quadratic model the best move of v for a
    cost of c nats changes the log-odds by sqrt(2 c g^T H^-1 g). Returns (sqrt(g^T H^-1 g), the mean
    log-odds at v = 0). A local index for comparing bases, not a prediction: away from v = 0 the real
    cost grows far faster than the quadratic (on the committed toy, a tenth of the "half-nat" step
    already costs tens of nats). NaN when g^T H^-1 g < 0 (H indefinite along g)."""

    def flat(grads):  # one vector over the adapter's trainable tensors
        return torch.cat([x.flatten() for x in grads])

    prompts = [tok.encode(prompt_text(r["question"])) for r in rows]
    solutions = [tok.encode(r["solution_own_style"]) + tok.end_ids[:1] for r in rows]
    examples = [(p + q, len(p), None) for p, q in zip(prompts, solutions)]
    ids, labels = make_batch(examples, tok.pad_id)
    first = torch.tensor([n - 1 for n in map(len, prompts)])  # the position that picks the writer
    labels[torch.arange(len(rows)), first] = -100
    adapter = tinylora.attach(model, config, quiet=True)[0]
    try:
        v = adapter.parameters()
        with sdpa_kernel(SDPBackend.MATH):  # the math kernel has a second derivative
            logits = model(ids)  # [B, T, V]
        logq = logits[torch.arange(len(rows)), first].log_softmax(-1)
        log_odds = (logq[:, tok.token_id(STEPS_WORD)] - logq[:, tok.token_id(DIRECT_WORD)]).mean()
        nll = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum") / len(rows)
        g = flat(torch.autograd.grad(log_odds, v, retain_graph=True)).double()
        grad = flat(torch.autograd.grad(nll, v, create_graph=True))
        H = torch.stack([flat(torch.autograd.grad(grad[i], v, retain_graph=True)) for i in range(len(grad))]).double()
    finally:
        adapter.detach()
    value = (g @ torch.linalg.solve((H + H.T) / 2, g)).sqrt().item()
    return value, log_odds.item()


# --------------------------------------------------------------------------------------------


def make_splits(seed=SEED):
    """(eval, train, pretraining corpus) problems, all questions distinct: the RL train set and
    the held-out eval set never appear in pretraining."""
    rng = random.Random(seed)
    eval_problems = make_problems(N_EVAL, rng)
    train_problems = make_problems(N_TRAIN, rng, exclude={question_text(p) for p in eval_problems})
    held_out = {question_text(p) for p in eval_problems + train_problems}
    return eval_problems, train_problems, make_problems(PRETRAIN_STEPS * BATCH, rng, exclude=held_out)


def build():
    """Regenerate toy/data and toy/base from SEED."""
    eval_problems, train_problems, corpus = make_splits(SEED)
    eval_rows, train_rows = [data_row(p) for p in eval_problems], [data_row(p) for p in train_problems]
    write_jsonl(os.path.join(DATA_DIR, "eval.jsonl"), eval_rows)
    write_jsonl(os.path.join(DATA_DIR, "train.jsonl"), train_rows)
    texts = pretraining_texts(corpus, random.Random(SEED + 1))

    # the vocabulary: every piece of every text the toy trains on or writes
    tok = build_tokenizer([text for prompt, completion, _ in texts for text in (prompt, completion)] +
                          [text for r in eval_rows + train_rows
                           for text in (prompt_text(r["question"]), r["answer"], r["solution_own_style"])])
    examples = encode_examples(tok, texts)
    print(f"vocab {tok.get_vocab_size()} tokens; {len(examples)} pretraining sequences, "
          f"mean length {sum(len(s) for s, _, _ in examples) / len(examples):.1f}", flush=True)

    torch.manual_seed(SEED)
    model = Transformer(model_config(tok.get_vocab_size()))
    init_weights(model)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters; pretraining {PRETRAIN_STEPS} steps x {BATCH}", flush=True)
    batches = [examples[i:i + BATCH] for i in range(0, len(examples), BATCH)]
    loss, seconds = pretrain(model, batches, LR, WARMUP)
    print(f"pretraining done: loss {loss:.4f} (mean of the last 50 steps), {seconds:.0f}s", flush=True)
    with torch.no_grad():
        model.model.norm.weight.mul_(SHARPNESS)  # logits x SHARPNESS: see SHARPNESS above
    save_checkpoint(model, tok, BASE_DIR)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--eval", action="store_true", help="only measure the existing toy/base on toy/data/eval.jsonl")
    parser.add_argument("--adapter", help="with --eval: measure toy/base with this trained adapter folded in")
    parser.add_argument("--steer", action="store_true", help="with --eval: also print the base model's steerability "
                        "by the default adapter on 128 training problems (see `steerability`)")
    args = parser.parse_args()
    if (args.adapter or args.steer) and not args.eval:
        parser.error("--adapter and --steer need --eval")
    if args.adapter and args.steer:
        parser.error("--steer measures the base model; leave out --adapter")
    torch.set_num_threads(1)  # a 0.31M-parameter model: one thread is fastest and deterministic
    torch.use_deterministic_algorithms(True)
    if not args.eval:
        build()
    model, tok = load_model(BASE_DIR, device="cpu"), load_tokenizer(BASE_DIR)
    rows = read_jsonl(os.path.join(DATA_DIR, "eval.jsonl"))
    if args.adapter:
        with tinylora.load_adapter(model, args.adapter, quiet=True).merged():
            print_profile(model, tok, rows)
    else:
        print_profile(model, tok, rows)
    if args.steer:
        config = tinylora.TinyLoRAConfig(u=13, n_tie=len(tinylora.find_targets(model)))  # the default's 13
        value, log_odds = steerability(model, tok, read_jsonl(os.path.join(DATA_DIR, "train.jsonl"))[:128], config)
        print(f"steerability of the 13-parameter adapter: sqrt(g^T H^-1 g) = {value:.2f} (a local index; log-odds "
              f"of the careful writer at v = 0: {log_odds:+.2f})", flush=True)


if __name__ == "__main__":
    main()
