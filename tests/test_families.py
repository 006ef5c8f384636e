"""Llama 3.x and Qwen3 through the same model.py: logits and greedy tokens against transformers'
LlamaForCausalLM and Qwen3ForCausalLM on tiny random checkpoints (Llama 3 rope scaling with
factors that put RoPE's frequencies in all three of its bands; Qwen3 with head_dim != hidden /
heads), chat prompt ids against transformers' apply_chat_template with each family's template,
and a TinyLoRA adapter that attaches, trains a step and merges/unmerges bit-exactly."""

import json
import os

import pytest
import torch

import model as M
import tokenizer as T
import tinylora
from conftest import assert_greedy_matches_transformers, write_tokenizer
from tinylora import TinyLoRAConfig

SPECIALS = {"llama": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
            "qwen3": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]}
# each family's chat template, the parts that a GSM8K prompt (an optional system turn, one user
# turn, the generation prompt) goes through: Llama 3's as Meta published it; Qwen3's with
# enable_thinking=False (its template writes an empty think block after the assistant header)
TEMPLATES = {
    "llama": ("{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
              "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
              "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
              "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
    "qwen3": ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
              "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
              "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
              "{% endif %}"),
}
LLAMA3_ROPE = dict(rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64)  # head_dim 16: wavelengths 6 to 20,000, bands at 16 and 64


def write_checkpoint(path, family, tie=False, seed=0, **shape):
    """A random LlamaForCausalLM / Qwen3ForCausalLM saved by transformers, with a tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    os.makedirs(path, exist_ok=True)
    n_vocab = write_tokenizer(path, SPECIALS[family])
    end = SPECIALS[family].index("<|eot_id|>" if family == "llama" else "<|im_end|>")
    kw = {**dict(vocab_size=n_vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=tie, eos_token_id=end), **shape}
    if family == "llama":
        cfg = LlamaConfig(rms_norm_eps=1e-5, rope_parameters={"rope_theta": 10000.0, **LLAMA3_ROPE}, **kw)
        hf = LlamaForCausalLM(cfg)
    else:
        hf = Qwen3ForCausalLM(Qwen3Config(rope_parameters={"rope_theta": 10000.0, "rope_type": "default"}, **kw))
    torch.manual_seed(seed)
    with torch.no_grad():  # HF's init is tiny (std 0.02): widen it so the logits differ per token
        for name, p in hf.named_parameters():
            p.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.2)  # norms around 1, q/k norms included
    hf.eval().save_pretrained(path)
    return hf


CASES = {  # family, checkpoint options
    "llama untied, GQA 2:1, llama3 rope": ("llama", dict(head_dim=16)),
    "llama tied, plain multi-head": ("llama", dict(tie=True, num_key_value_heads=4, head_dim=16)),
    "qwen3 tied, head_dim 24 != 64 / 4": ("qwen3", dict(tie=True, head_dim=24)),
    "qwen3 untied, GQA 4:1": ("qwen3", dict(num_attention_heads=8, head_dim=8)),
}


@pytest.fixture(scope="module", params=list(CASES))
def checkpoint(request, tmp_path_factory):
    family, options = CASES[request.param]
    path = str(tmp_path_factory.mktemp(family))
    return path, family, write_checkpoint(path, family, **options)


def test_config_is_read_as_the_family(checkpoint):
    path, family, hf = checkpoint
    cfg = M.read_config(path)
    assert cfg.model_type == family and not cfg.attention_bias and cfg.qk_norm == (family == "qwen3")
    assert cfg.head_dim == hf.config.head_dim
    assert cfg.rope_llama3 == ((4.0, 1.0, 4.0, 64) if family == "llama" else ())


def test_logits_match_transformers(checkpoint):
    path, _, hf = checkpoint
    ours = M.load_model(path, device="cpu")
    ids = torch.randint(0, hf.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= 1e-4  # as the Qwen2 parity tests


def test_rope_frequencies_equal_transformers(checkpoint):
    path, _, hf = checkpoint
    theirs = hf.model.rotary_emb.inv_freq
    assert torch.equal(M.rope_frequencies(M.read_config(path)), theirs)


def test_left_padded_logits_match_transformers(checkpoint):
    path, _, hf = checkpoint
    ours = M.load_model(path, device="cpu")
    ids, start = M.left_pad([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18, 19]], pad_id=0)
    attn = (torch.arange(ids.shape[1])[None] >= start[:, None]).long()
    with torch.no_grad():
        a = ours(ids, start=start)
        b = hf(ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0)).logits
    assert (a[attn.bool()] - b[attn.bool()]).abs().max().item() <= 1e-4


def test_greedy_20_tokens_equal_transformers_generate(checkpoint):
    path, _, hf = checkpoint
    assert_greedy_matches_transformers(path, hf, [6, 20, 30, 40, 50, 60])


@pytest.mark.parametrize("system", [None, "Be brief. "])
def test_chat_prompt_ids_equal_the_family_template(checkpoint, system):
    from transformers import PreTrainedTokenizerFast

    path, family, _ = checkpoint
    tok = T.load_tokenizer(path)
    assert tok.chat_format == {"llama": "llama3", "qwen3": "qwen3"}[family]
    reference = PreTrainedTokenizerFast(tokenizer_file=os.path.join(path, "tokenizer.json"),
                                        bos_token="<|begin_of_text|>" if family == "llama" else None,
                                        chat_template=TEMPLATES[family])
    user = "Tom has 3 apples and buys 4 more. How many? Let's think step by step.\n"  # Llama 3 strips it, Qwen3 not
    messages = ([] if system is None else [{"role": "system", "content": system}]) + [{"role": "user", "content": user}]
    expected = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, enable_thinking=False,
                                             return_dict=False)
    assert tok.encode_chat(user, system) == list(expected)


def test_end_ids_are_the_family_end_of_turn_tokens(checkpoint):
    path, family, _ = checkpoint
    tok = T.load_tokenizer(path)
    names = ["<|eot_id|>", "<|end_of_text|>"] if family == "llama" else ["<|im_end|>", "<|endoftext|>"]
    assert tok.end_ids == [tok.token_id(n) for n in names] and tok.pad_id == tok.token_id(names[1])


def test_adapter_attaches_trains_a_step_and_merges_bit_exactly(checkpoint):
    path, _, _ = checkpoint
    net = M.load_model(path, device="cpu")
    original = {k: v.clone() for k, v in net.state_dict().items()}
    adapter, n = tinylora.attach(net, TinyLoRAConfig(n_tie=4), cache_dir=None, quiet=True)
    assert n == 4 and len(adapter.targets) == 14  # the same seven targets in every layer
    assert all(rep["sine_bound"] <= 1e-4 for rep in adapter.svd_reports.values())
    ids = torch.randint(0, net.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.Adam(adapter.parameters(), lr=0.05)
    net(ids).logsumexp(-1).mean().backward()
    optimizer.step()
    assert adapter.tensors["v"].abs().min() > 0  # every group moved
    low_rank = net(ids)
    with adapter.merged():
        merged = net(ids)
    torch.testing.assert_close(merged, low_rank, atol=1e-5 * float(low_rank.detach().abs().max()), rtol=0)  # fp32 rounding
    assert all(torch.equal(v, original[k]) for k, v in net.state_dict().items())


def test_other_rope_scalings_and_moe_are_refused(tmp_path):
    path = tmp_path / "ckpt"
    write_checkpoint(str(path), "llama", head_dim=16)
    config = json.loads((path / "config.json").read_text())
    for edit, message in [({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "rope type 'yarn'"),
                          ({"model_type": "llama4"}, "model_type 'llama4' is not supported"),
                          ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}}, "llama3 rope scaling needs")]:
        (path / "config.json").write_text(json.dumps({**config, **edit}))
        with pytest.raises(M.CheckpointError, match=message) as e:
            M.load_model(str(path), device="cpu")
        assert "\n" not in str(e.value)


def test_train_py_runs_grpo_on_the_family_and_reloads_its_adapter(checkpoint, tmp_path, capsys):
    """The command end to end: a few GRPO steps, the adapter file, and --eval-only loading it back."""
    import train
    from test_train import write_data

    path, _, _ = checkpoint
    data, out = tmp_path / "train.jsonl", tmp_path / "run"
    common = ["--model", path, "--eval-data", write_data(tmp_path / "eval.jsonl", 4, start=100), "--threads", "1",
              "--device", "cpu", "--max-new-tokens", "6", "--eval-decoding", "greedy"]
    assert train.main([*common, "--train-data", write_data(data, 8), "--out", str(out), "--steps", "2",
                       "--prompts-per-step", "2", "--samples", "4", "--lr", "0.05", "--reward", "flexible",
                       "--n-tie", "7", "--micro-batch", "4"]) == 0
    assert "trainable parameters: 2" in capsys.readouterr().out
    assert train.main([*common, "--eval-only", "--adapter", str(out / "adapter.safetensors"),
                       "--out", str(tmp_path / "eval")]) == 0
    assert os.path.isfile(tmp_path / "eval" / "eval_adapter_greedy.jsonl")
