"""tinylora.fingerprint: the identity of a base model that adapter files and the SVD cache are
keyed on. It follows what the model computes (every weight, the architecture fields) and nothing
else, and a refused adapter says which part of the model differs."""

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import write_checkpoint
from model import load_model
from tinylora import AdapterError, attach, fingerprint, load_adapter, save_adapter


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny checkpoint in the older config layout (top-level `torch_dtype`, `rope_theta`), and an
    adapter trained on it (v nonzero)."""
    root = tmp_path_factory.mktemp("fingerprint")
    path = str(root / "ckpt")
    write_checkpoint(path, layers=2, hidden=32, intermediate=48, heads=2, kv_heads=1, old_layout=True)
    adapter, _ = attach(load_model(path, device="cpu"), cache_dir=None, quiet=True)
    with torch.no_grad():
        adapter.tensors["v"].fill_(0.1)
    save_adapter(adapter, str(root / "adapter.safetensors"))
    return path, str(root / "adapter.safetensors")


def edited_copy(src, dst, **config_changes):
    """A copy of checkpoint `src` in `dst` with `config.json` keys changed."""
    shutil.copytree(src, dst)
    with open(os.path.join(dst, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump({**config, **config_changes}, f)
    return str(dst)


def parts(model, samples=4096):
    return dict(part.split("=") for part in fingerprint(model, samples).split())


@pytest.mark.parametrize("change", [{"eos_token_id": [2, 0]}, {"torch_dtype": "bfloat16"},
                                    {"max_position_embeddings": 1024}], ids=["eos-list", "dtype", "max-positions"])
def test_config_edits_that_leave_the_math_alone_keep_the_fingerprint_and_the_adapter(ckpt, tmp_path, change):
    """torch_dtype bfloat16 loads the fp32 weights rounded to bf16: what the fingerprint samples anyway."""
    edited = load_model(edited_copy(ckpt[0], tmp_path / "edited", **change), device="cpu")
    assert fingerprint(edited) == fingerprint(load_model(ckpt[0], device="cpu"))
    load_adapter(edited, ckpt[1], cache_dir=None, quiet=True)


@pytest.mark.parametrize("name", ["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
                                  "model.layers.1.self_attn.q_proj.bias", "model.layers.1.mlp.down_proj.weight",
                                  "model.norm.weight", "lm_head.weight"])
@pytest.mark.parametrize("samples", [4096, 333, 200])
def test_any_weight_edit_changes_its_part_of_the_fingerprint(ckpt, name, samples):
    """The last row (or entry) of the tensor, where a strided sample could stop short. With a few
    hundred entries per tensor, this checkpoint's larger tensors (up to 2,752 entries) are sampled,
    not read whole (200: a stride rounded down would end 5 rows short of the embedding's end)."""
    model = load_model(ckpt[0], device="cpu")
    before = parts(model, samples)
    with torch.no_grad():
        model.get_parameter(name)[-1] += 0.05
    after = parts(model, samples)
    part = "model.layers" if name.startswith("model.layers.") else name.rsplit(".", 1)[0]
    assert {k for k in before if before[k] != after[k]} == {part}


def test_an_edit_confined_to_one_column_is_seen(ckpt):
    """86 entries of the [86, 32] embedding: a stride of 2,752 / 86 = 32 would read column 0 of
    every row and nothing else; the stride is moved to one coprime with the row length."""
    model = load_model(ckpt[0], device="cpu")
    before = parts(model, samples=86)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 5] += 0.05
    assert parts(model, samples=86)["model.embed_tokens"] != before["model.embed_tokens"]


def test_a_tied_checkpoint_has_no_separate_head_part(tmp_path):
    write_checkpoint(str(tmp_path), layers=1, hidden=16, intermediate=24, heads=2, kv_heads=1, tie=True)
    assert list(parts(load_model(str(tmp_path), device="cpu"))) == [
        "architecture", "model.embed_tokens", "model.layers", "model.norm"]


def refusal(model, path):
    with pytest.raises(AdapterError) as e:
        load_adapter(model, path, cache_dir=None, quiet=True)
    message = str(e.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    return message


def test_a_refused_adapter_says_which_part_of_the_model_differs(ckpt, tmp_path):
    model = load_model(ckpt[0], device="cpu")
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)
    message = refusal(model, ckpt[1])
    assert "the weights of model.norm differ from the base model it was trained on" in message
    other = load_model(edited_copy(ckpt[0], tmp_path / "eps", rms_norm_eps=1e-5), device="cpu")
    assert "trained on a base model of another architecture" in refusal(other, ckpt[1])


def test_an_adapter_with_the_old_fingerprint_is_refused_with_the_reason(ckpt, tmp_path):
    with safe_open(ckpt[1], "pt") as f:
        meta = f.metadata()
    old = str(tmp_path / "old.safetensors")
    save_file(load_file(ckpt[1]), old, metadata={**meta, "base_fingerprint": "0123456789abcdef0123456789abcdef"})
    message = refusal(load_model(ckpt[0], device="cpu"), old)
    assert "'0123456789abcdef0123456789abcdef' is not one this version makes" in message and "retrain" in message
