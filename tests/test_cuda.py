"""The CPU tests' central claims, re-checked on a CUDA GPU, where the kernels (matmul, SDPA,
sampling, SVD) are different ones: logits against transformers, greedy tokens, the KV cache, the
exact merge/unmerge, a GRPO update's gradient against the CPU's, and train.py end to end.

Skipped, with the reason, when torch.cuda.is_available() is False, so CPU-only runs never fail on
them. On a GPU machine: `python3 -m pytest -q tests/test_cuda.py` (bench/gpu_check.sh runs it).
"""

import dataclasses
import json
import math

import pytest
import torch

import grpo
import model as M
import tokenizer as T
import tinylora
import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
CUDA = torch.device("cuda")
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18, 19]]  # ragged: left padding on the GPU too
BF16_TOL = 0.05  # of the largest |logit|: bf16 rounding, measured ~1% on the tiny checkpoint (CPU)


def reference(path, dtype):
    """transformers' model of the checkpoint, on the GPU."""
    from transformers import Qwen2ForCausalLM

    return Qwen2ForCausalLM.from_pretrained(path, dtype=dtype).to(CUDA).eval()


def left_padded(prompts, device=CUDA):
    """(ids [B, T], start [B], attention mask [B, T]) for transformers' side of a left-padded batch."""
    ids, start = M.left_pad(prompts, pad_id=0, device=device)
    return ids, start, (torch.arange(ids.shape[1], device=device)[None] >= start[:, None]).long()


def hf_logits(hf, ids, mask):
    return hf(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits.float()


def bits(t):
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, BF16_TOL)])
def test_logits_match_transformers_on_cuda(tiny_ckpt, dtype, tol):
    path, hf_cpu = tiny_ckpt
    ours, hf = M.load_model(path, dtype=dtype, device="cuda"), reference(path, dtype)
    ids, start, mask = left_padded(PROMPTS)
    with torch.no_grad():
        a, b = ours(ids, start=start).float(), hf_logits(hf, ids, mask)
        exact = hf_logits(hf_cpu, ids.cpu(), mask.cpu()).to(CUDA)  # fp32 on the CPU: the test suite's reference
    real = mask.bool()
    scale = exact[real].abs().max().item()
    assert (a[real] - b[real]).abs().max().item() <= tol * scale  # same network as transformers on the GPU
    assert (a[real] - exact[real]).abs().max().item() <= tol * scale  # and as the CPU fp32 reference


@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["one prompt", "ragged batch"])
def test_greedy_20_tokens_equal_transformers_generate_on_cuda(tiny_ckpt, prompts):
    path, _ = tiny_ckpt
    ours, hf = M.load_model(path, dtype=torch.float32, device="cuda"), reference(path, torch.float32)
    out = M.generate(ours, prompts, max_new_tokens=20, end_ids=[], pad_id=0, temperature=0)
    ids, _, mask = left_padded(prompts)
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=20, min_new_tokens=20, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    assert out.tokens.device.type == "cuda"
    assert out.tokens.tolist() == ref[:, ids.shape[1]:].tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_cache_decoding_equals_full_forward_on_cuda(tiny_ckpt, dtype):
    path, _ = tiny_ckpt
    ours = M.load_model(path, dtype=dtype, device="cuda")
    gen = M.generate(ours, PROMPTS, max_new_tokens=12, end_ids=[], pad_id=0, temperature=0)
    ids, start, _ = left_padded(PROMPTS)
    with torch.no_grad():
        for t in range(12):  # the full forward over the sequence so far must make the cached run's choice
            full = ours(torch.cat([ids, gen.tokens[:, :t]], dim=1), start=start)[:, -1].float()  # [B, V]
            chosen = full.gather(-1, gen.tokens[:, t, None])[:, 0]
            if dtype == torch.float32:
                assert torch.equal(full.argmax(-1), gen.tokens[:, t])
                torch.testing.assert_close(gen.logprobs[:, t], chosen - full.logsumexp(-1), atol=1e-4, rtol=0)
            else:  # bf16 rounds the two paths differently: the chosen token is the best up to that rounding
                assert (full.amax(-1) - chosen).max().item() <= BF16_TOL * full.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_forward_equals_hook_forward_and_unmerge_is_bit_exact_on_cuda(tiny_ckpt, dtype):
    model = M.load_model(tiny_ckpt[0], dtype=dtype, device="cuda")
    original = {k: bits(v).clone() for k, v in model.state_dict().items()}
    adapter, _ = tinylora.attach(model, tinylora.TinyLoRAConfig(u=2, n_tie=2), cache_dir=None, quiet=True)
    ids = torch.randint(0, 80, (2, 7), generator=torch.Generator().manual_seed(0)).to(CUDA)
    v = adapter.tensors["v"]
    lost = 0
    for cycle in range(3):  # training steps between rollouts change the adapter
        with torch.no_grad():
            v.copy_(0.5 * torch.randn(v.shape, generator=torch.Generator().manual_seed(cycle)))
            hooked = model(ids).float()
            with adapter.merged():
                merged = model(ids).float()
                lost += sum(len(t.restore[2]) for t in adapter.targets)
        scale = hooked.abs().max().item()
        tol = 2e-5 * max(scale, 1.0) if dtype == torch.float32 else 0.03 * scale  # bf16: W + dW rounded once more
        torch.testing.assert_close(merged, hooked, atol=tol, rtol=0)
        assert all(torch.equal(bits(w), original[k]) for k, w in model.state_dict().items())
    assert lost > 0  # the rounding-correction path ran, not just the easy entries


def test_grpo_update_on_cuda_gives_the_cpu_gradient_in_fp32(tiny_ckpt, tmp_path):
    """One GRPO update (KL and TIS on, micro-batches of 3) from a rollout sampled on the GPU with the
    adapter merged; the same rollout scored on the CPU must give the same gradient. Both adapters
    hold the same SVD factors (the CPU's, through the SVD cache), so only the kernels differ."""
    path = tiny_ckpt[0]
    tokenizer = T.load_tokenizer(path)
    models, adapters = {}, {}
    for device in ("cpu", "cuda"):
        models[device] = M.load_model(path, dtype=torch.float32, device=device)
        adapters[device], _ = tinylora.attach(models[device], tinylora.TinyLoRAConfig(u=2, n_tie=2), cache_dir=str(tmp_path),
                                              quiet=True)
        v = adapters[device].tensors["v"]
        with torch.no_grad():  # a trained adapter, the same on both devices
            v.copy_(0.3 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1)))
    rollout = grpo.rollout(models["cuda"], tokenizer, PROMPTS[:2], num_samples=4, max_new_tokens=10,
                           generator=torch.Generator(device="cuda").manual_seed(0), adapter=adapters["cuda"])
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 1.0]])
    cfg = grpo.GRPOConfig(mini_batches=1, micro_batch_size=3, max_grad_norm=None,
                          kl_beta=0.1, tis_cap=2.0)
    grads = {}
    for device in ("cpu", "cuda"):
        moved = dataclasses.replace(rollout, completions=rollout.completions.to(device), lengths=rollout.lengths.to(device),
                                    logprobs=rollout.logprobs.to(device))
        optimizer = torch.optim.SGD(adapters[device].parameters(), lr=0.0)  # the gradient is what is compared
        stats = grpo.grpo_update(models[device], moved, rewards, optimizer, cfg, adapters[device])
        assert math.isfinite(stats.loss)
        grads[device] = adapters[device].tensors["v"].grad.cpu()
    assert all(torch.equal(a.U, b.U.cpu()) for a, b in zip(adapters["cpu"].targets, adapters["cuda"].targets))
    assert torch.isfinite(grads["cuda"]).all() and grads["cuda"].abs().max() > 0
    torch.testing.assert_close(grads["cuda"], grads["cpu"], rtol=1e-3, atol=1e-4 * grads["cpu"].abs().max().item())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_embedded_default_trains_on_cuda(tmp_path, capsys, dtype):
    out = tmp_path / "run"
    assert train.main(["--device", "cuda", "--dtype", dtype, "--steps", "2", "--eval-limit", "8", "--out", str(out)]) == 0
    assert "device cuda" in capsys.readouterr().out
    summary = json.load(open(out / "summary.json"))
    assert summary["trainable_parameters"] == 13
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 2]


def test_default_svd_on_cuda_is_the_exact_subspace_and_the_cpu_one(tiny_ckpt):
    """The certified SVD on the GPU's kernels: every U, V column within sine 1e-4 of the float64
    torch.linalg.svd (on the CPU), so also within 2e-4 of the CPU's factors; same signs."""
    cpu = M.load_model(tiny_ckpt[0], device="cpu")
    gpu = M.load_model(tiny_ckpt[0], device=CUDA)
    a = tinylora.attach(cpu, cache_dir=None, quiet=True)[0]
    b = tinylora.attach(gpu, cache_dir=None, quiet=True)[0]
    for t, g in zip(a.targets, b.targets):
        U, S, Vh = torch.linalg.svd(t.linear.weight.double(), full_matrices=False)
        for k in range(2):  # r = 2
            exact_u = U[:, k] * torch.sign(U[U[:, k].abs().argmax(), k])
            cos = float(g.U[:, k].double().cpu() @ exact_u)
            assert math.sqrt(max(0.0, 1 - cos * cos)) <= 1e-4 and cos > 0, (t.name, k, cos)
            assert float(g.U[:, k].double().cpu() @ t.U[:, k].double()) > 1 - 2e-8
        assert b.svd_reports[g.name]["sine_bound"] <= 1e-4
