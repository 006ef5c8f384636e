"""model.py against transformers' Qwen2ForCausalLM: logits, greedy tokens, KV cache, batching,
chat format, and the loader's errors on broken checkpoint folders."""

import json
import os
import shutil

import pytest
import torch
from hypothesis import given, settings, strategies as st

import model as M
import tokenizer as T
from conftest import assert_greedy_matches_transformers, write_checkpoint


def _logits_both(path, hf, ids):
    ours = M.load_model(path, device="cpu")
    with torch.no_grad():
        return ours(ids), hf(ids).logits


@pytest.mark.parametrize("kw", [
    dict(),  # untied head, GQA 4/2
    dict(tie=True, heads=4, kv_heads=4),  # tied head, plain multi-head
    dict(heads=8, kv_heads=2, head_dim=16),  # GQA 4:1
    dict(heads=2, kv_heads=1, head_dim=48, theta=1e6),  # head_dim != hidden / heads, Qwen's theta
    dict(old_layout=True),  # transformers 4.x config.json (rope_theta, torch_dtype)
    dict(max_shard_size="60KB"),  # sharded checkpoint with model.safetensors.index.json
])
def test_logits_match_transformers(tmp_path, kw):
    hf = write_checkpoint(str(tmp_path), **kw)
    if kw.get("max_shard_size"):
        assert os.path.exists(tmp_path / "model.safetensors.index.json")
    ids = torch.randint(0, hf.config.vocab_size, (3, 21), generator=torch.Generator().manual_seed(0))
    ours, ref = _logits_both(str(tmp_path), hf, ids)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1e-4


def test_config_both_layouts_read_the_same(tmp_path):
    write_checkpoint(str(tmp_path / "new"), theta=12345.0)
    write_checkpoint(str(tmp_path / "old"), theta=12345.0, old_layout=True)
    new, old = M.read_config(str(tmp_path / "new")), M.read_config(str(tmp_path / "old"))
    assert new == old and new.rope_theta == 12345.0 and new.dtype == "float32"


def test_left_padded_logits_match_transformers_with_attention_mask(tiny_ckpt):
    path, hf = tiny_ckpt
    ours = M.load_model(path, device="cpu")
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18, 19]]
    ids, start = M.left_pad(prompts, pad_id=0)
    attn = (torch.arange(ids.shape[1])[None] >= start[:, None]).long()
    with torch.no_grad():
        a = ours(ids, start=start)
        b = hf(ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0)).logits
    real = attn.bool()
    assert (a[real] - b[real]).abs().max().item() <= 1e-4


def test_greedy_20_tokens_equal_transformers_generate(tiny_ckpt):
    path, hf = tiny_ckpt
    assert_greedy_matches_transformers(path, hf, [1, 20, 30, 40, 50, 60])


def test_kv_cache_decoding_equals_full_forward_every_step(tiny_ckpt):
    path, _ = tiny_ckpt
    ours = M.load_model(path, device="cpu")
    prompts = [[3, 4, 5, 6, 7], [8, 9]]
    gen = M.generate(ours, prompts, max_new_tokens=12, end_ids=[], pad_id=0, temperature=0)
    ids, start = M.left_pad(prompts, pad_id=0)
    with torch.no_grad():
        for t in range(12):  # logits of the full sequence so far must pick the cached run's token
            seq = torch.cat([ids, gen.tokens[:, :t]], dim=1)
            full = ours(seq, start=start)[:, -1]
            assert torch.equal(full.argmax(-1), gen.tokens[:, t])
            assert torch.allclose(torch.log_softmax(full, -1).gather(-1, gen.tokens[:, t, None])[:, 0],
                                  gen.logprobs[:, t], atol=1e-5)


def test_ragged_batch_gives_the_same_tokens_as_each_prompt_alone(tiny_ckpt):
    path, _ = tiny_ckpt
    ours = M.load_model(path, device="cpu")
    prompts = [[3, 4, 5, 6, 7, 8, 9, 10], [11], [12, 13, 14, 15]]
    batch = M.generate(ours, prompts, max_new_tokens=15, end_ids=[], pad_id=0, temperature=0)
    for b, p in enumerate(prompts):
        alone = M.generate(ours, [p], max_new_tokens=15, end_ids=[], pad_id=0, temperature=0)
        assert batch.tokens[b].tolist() == alone.tokens[0].tolist()


def test_sampling_reproducible_with_seed_and_samples_share_prefill(tiny_ckpt):
    path, _ = tiny_ckpt
    ours = M.load_model(path, device="cpu")
    run = lambda seed: M.generate(ours, [[3, 4, 5], [6, 7]], max_new_tokens=10, end_ids=[], pad_id=0,
                                  temperature=1.0, num_samples=4, generator=torch.Generator().manual_seed(seed))
    a, b, c = run(0), run(0), run(1)
    assert a.tokens.shape == (8, 10)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.tokens, c.tokens)

    calls = []  # the prompt is run once for all 4 samples: one prefill forward of the 2 prompts
    hook = ours.model.embed_tokens.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    run(0)
    hook.remove()
    assert calls[0] == (2, 3) and all(shape == (8, 1) for shape in calls[1:])


def test_rows_stop_at_end_id_and_keep_the_end_token(tiny_ckpt):
    path, _ = tiny_ckpt
    ours = M.load_model(path, device="cpu")
    free = M.generate(ours, [[3, 4, 5], [9, 8]], max_new_tokens=10, end_ids=[], pad_id=0, temperature=0)
    end = free.tokens[0, 2].item()  # make a token of row 0 an end token
    out = M.generate(ours, [[3, 4, 5], [9, 8]], max_new_tokens=10, end_ids=[end], pad_id=0, temperature=0)
    for row in range(2):
        free_row = free.tokens[row].tolist()
        expected = free_row.index(end) + 1 if end in free_row else 10
        assert out.lengths[row].item() == expected
        assert out.tokens[row, :expected].tolist() == free_row[:expected]  # end token included
        assert (out.tokens[row, expected:] == 0).all() and (out.logprobs[row, expected:] == 0).all()
    assert out.lengths[0].item() <= 3


@settings(max_examples=10, deadline=None)
@given(top_p=st.floats(0.05, 1.0), seed=st.integers(0, 1000))
def test_top_p_draws_only_from_the_nucleus(top_p, seed):
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(seed))
    token, logp = M._sample(logits, 1.0, top_p, torch.rand(4, generator=torch.Generator().manual_seed(seed)))
    probs = torch.softmax(logits, -1)
    for row in range(4):
        p = probs[row, token[row]]
        mass_above = probs[row][probs[row] > p].sum()  # mass of strictly more likely tokens
        assert mass_above < top_p + 1e-6
        assert torch.isclose(logp[row], p.log(), atol=1e-5)


def test_inverse_cdf_sampling_follows_the_softmax():
    logits = torch.tensor([[2.0, 0.5, -1.0, 1.0, 0.0]]).expand(20000, 5)
    token, _ = M._sample(logits, 0.7, 1.0, torch.rand(20000, generator=torch.Generator().manual_seed(0)))
    freq = torch.bincount(token, minlength=5).float() / 20000
    expected = torch.softmax(logits[0] / 0.7, -1)
    assert (freq - expected).abs().max() < 0.01  # 4 standard errors at 20,000 draws


def test_seeded_samples_do_not_depend_on_the_batch(tiny_ckpt):
    """With one seed per prompt, a prompt's completions are the same alone, in a batch, or in
    another order: what lets several processes split a batch and still sample what one would."""
    model = M.load_model(tiny_ckpt[0], device="cpu")
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14]]
    args = dict(max_new_tokens=8, end_ids=[2], pad_id=0, temperature=1.0, num_samples=3)
    batch = M.generate(model, prompts, seeds=[11, 22, 33], **args)
    for i, (prompt, seed) in enumerate(zip(prompts, [11, 22, 33])):
        alone = M.generate(model, [prompt], seeds=[seed], **args)
        rows = slice(3 * i, 3 * i + 3)
        n = int(alone.lengths.max())
        assert torch.equal(batch.lengths[rows], alone.lengths)
        assert torch.equal(batch.tokens[rows, :n], alone.tokens)
        torch.testing.assert_close(batch.logprobs[rows, :n], alone.logprobs, atol=1e-5, rtol=0)
    reordered = M.generate(model, prompts[::-1], seeds=[33, 22, 11], **args)
    assert torch.equal(reordered.lengths, torch.cat([batch.lengths[6:], batch.lengths[3:6], batch.lengths[:3]]))
    assert not torch.equal(batch.tokens[:3], batch.tokens[3:6][:, :batch.tokens.shape[1]])  # seeds differ


def test_bf16_load_runs_and_stays_close_to_fp32(tiny_ckpt):
    path, _ = tiny_ckpt
    fp32 = M.load_model(path, device="cpu")
    bf16 = M.load_model(path, dtype=torch.bfloat16, device="cpu")
    assert next(bf16.parameters()).dtype == torch.bfloat16
    ids = torch.randint(0, 80, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = fp32(ids), bf16(ids).float()
    assert torch.isfinite(b).all()
    assert (a - b).abs().max().item() < 0.1 * a.abs().max().item()


def test_loaded_model_is_frozen_and_tied_head_shares_storage(tmp_path):
    write_checkpoint(str(tmp_path), tie=True)
    ours = M.load_model(str(tmp_path), device="cpu")
    assert not any(p.requires_grad for p in ours.parameters())
    assert ours.lm_head.weight is ours.model.embed_tokens.weight


def test_chat_prompt_and_end_ids(tiny_ckpt):
    path, _ = tiny_ckpt
    tok = T.load_tokenizer(path)
    text = tok.chat_prompt("What is 2+2?")
    assert text == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert tok.chat_prompt("hi", system="Be brief.").startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    ids = tok.encode_chat("hi")
    assert ids[0] == tok.token_id("<|im_start|>") and tok.decode(ids, skip_special_tokens=False) == tok.chat_prompt("hi")
    assert tok.decode(ids).startswith("system\n")  # special tokens dropped by default
    im_end, eot = tok.token_id("<|im_end|>"), tok.token_id("<|endoftext|>")
    assert set(tok.end_ids) == {im_end, eot} and tok.pad_id == eot  # generation_config lists eos 2 = <|im_end|>


# ---- bad checkpoint folders: each gives one line naming the file and the key --------------------

def _broken(tmp_path, tiny_ckpt):
    path = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt[0], path)
    return path


def _edit_config(path, **changes):
    c = json.loads((path / "config.json").read_text())
    c.update(changes)
    (path / "config.json").write_text(json.dumps(c))


def _rewrite_weights(path, edit):
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"))


@pytest.mark.parametrize("case, expected", [
    ("no_config", "config.json: missing"),
    ("no_weights", "no model.safetensors"),
    ("missing_tensor", "'model.layers.1.mlp.up_proj.weight' is missing"),
    ("extra_tensor", "unexpected tensor 'model.layers.9.extra'"),
    ("wrong_shape", "'model.norm.weight' has shape (7,)"),
    ("truncated", "model.safetensors: unreadable safetensors file"),
    ("model_type", "model_type 'qwen3_moe' is not supported"),
    ("mlp_bias", "mlp_bias is not supported"),
    ("rope_scaling", "rope type 'yarn' is not supported"),
    ("sliding", "sliding-window attention"),
    ("bad_json", "config.json: not valid JSON"),
    ("missing_shard", "missing shard"),
])
def test_broken_checkpoint_gives_one_line_error(tmp_path, tiny_ckpt, case, expected):
    path = _broken(tmp_path, tiny_ckpt)
    if case == "no_config":
        (path / "config.json").unlink()
    elif case == "no_weights":
        (path / "model.safetensors").unlink()
    elif case == "missing_tensor":
        _rewrite_weights(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    elif case == "extra_tensor":
        _rewrite_weights(path, lambda t: t.update({"model.layers.9.extra": torch.zeros(2)}))
    elif case == "wrong_shape":
        _rewrite_weights(path, lambda t: t.update({"model.norm.weight": torch.zeros(7)}))
    elif case == "truncated":
        data = (path / "model.safetensors").read_bytes()
        (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif case == "model_type":
        _edit_config(path, model_type="qwen3_moe")
    elif case == "mlp_bias":
        _edit_config(path, mlp_bias=True)
    elif case == "rope_scaling":
        _edit_config(path, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    elif case == "sliding":
        _edit_config(path, use_sliding_window=True)
    elif case == "bad_json":
        (path / "config.json").write_text("{not json")
    elif case == "missing_shard":
        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(M.CheckpointError) as err:
        M.load_model(str(path), device="cpu")
    message = str(err.value)
    assert expected in message and "\n" not in message
    assert str(path) in message  # names the folder/file


def test_missing_or_broken_tokenizer_is_a_clear_error(tmp_path, tiny_ckpt):
    path = _broken(tmp_path, tiny_ckpt)
    (path / "tokenizer.json").unlink()
    with pytest.raises(M.CheckpointError, match="tokenizer.json: missing"):
        T.load_tokenizer(str(path))
    (path / "tokenizer.json").write_text("{}")
    with pytest.raises(M.CheckpointError, match="tokenizer.json: not a valid tokenizers file"):
        T.load_tokenizer(str(path))


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_a_broken_generation_config_is_a_clear_error(tmp_path, tiny_ckpt, text):
    """The tokenizer reads the end ids of generation_config.json: a damaged one names the file."""
    path = _broken(tmp_path, tiny_ckpt)
    (path / "generation_config.json").write_text(text)
    with pytest.raises(M.CheckpointError, match="generation_config.json: ") as err:
        T.load_tokenizer(str(path))
    assert "\n" not in str(err.value)
