"""Shared fixtures: tiny random Qwen2 checkpoints written by `transformers` (the test-only
numerical reference) and a small tokenizer with Qwen's special tokens."""

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Tiny models: one thread is fastest. TINYLORA_TEST_THREADS=2 runs the suite with two, to check that
# no tolerance depends on the summation order a thread count gives (README: testing).
torch.set_num_threads(int(os.environ.get("TINYLORA_TEST_THREADS", "1")))

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:;!?'\"()+-*/=#$%\n"


def write_tokenizer(path, special_tokens=SPECIAL_TOKENS):
    """A character-level `tokenizer.json`: the special tokens (default: three of Qwen's), then one
    id per character."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders

    vocab = {t: i for i, t in enumerate(special_tokens)}
    for c in CHARS:
        vocab.setdefault(c, len(vocab))
    vocab["<unk>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(special_tokens)
    tok.save(os.path.join(path, "tokenizer.json"))
    return len(vocab)


def write_checkpoint(path, *, layers=2, hidden=64, intermediate=96, heads=4, kv_heads=2, head_dim=None,
                     vocab=None, tie=False, seed=0, old_layout=False, max_shard_size=None, theta=10000.0):
    """Save a random Qwen2ForCausalLM with `save_pretrained` (+ tokenizer). Returns the HF model."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    os.makedirs(path, exist_ok=True)
    n_vocab = write_tokenizer(path)
    kw = dict(head_dim=head_dim) if head_dim else {}
    cfg = Qwen2Config(vocab_size=vocab or n_vocab, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      tie_word_embeddings=tie, max_position_embeddings=512, rope_theta=theta,
                      eos_token_id=2, pad_token_id=0, **kw)
    torch.manual_seed(seed)
    hf = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # HF init is tiny (std 0.02): widen it so the logits actually differ per token
        for p in hf.parameters():
            p.normal_(0, 0.2)
    hf.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    if old_layout:  # rewrite config.json as transformers 4.x wrote it
        file = os.path.join(path, "config.json")
        with open(file) as f:
            c = json.load(f)
        c["rope_theta"] = c.pop("rope_parameters")["rope_theta"]
        c["torch_dtype"] = c.pop("dtype")
        c.pop("layer_types", None)
        with open(file, "w") as f:
            json.dump(c, f)
    return hf


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """(path, hf_model) of a 2-layer untied random checkpoint, shared by the whole session."""
    path = str(tmp_path_factory.mktemp("tiny"))
    return path, write_checkpoint(path)


def assert_greedy_matches_transformers(path, hf, prompt, n=20):
    """n greedy tokens of our model (loaded from path) equal transformers' generate on `hf`."""
    import model as M
    out = M.generate(M.load_model(path, device="cpu"), [prompt], max_new_tokens=n, end_ids=[], pad_id=0, temperature=0)
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    assert out.tokens[0].tolist() == ref[0, len(prompt):].tolist()
