"""grpo.py: advantages, completion log-probs, the clipped loss and its normalisers, micro-batching,
rollouts with a folded adapter, and a few GRPO steps that learn something.

The adapter here is a stand-in with the interface grpo.py uses (merged / disabled / parameters):
the final hidden state is scaled elementwise by (1 + v), v trainable [D]. Folding it into the
final norm's weight is exact up to rounding, like a real adapter's merge."""

import contextlib
import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import grpo
from model import load_model
from tokenizer import load_tokenizer


class StandInAdapter:
    def __init__(self, model):
        self.norm = model.model.norm
        self.v = torch.zeros(model.config.hidden_size, requires_grad=True)  # [D]
        self.active = True
        self.merges = 0
        self.norm.register_forward_hook(lambda module, inputs, out: out * (1 + self.v) if self.active else out)

    def parameters(self):
        return [self.v]

    @contextlib.contextmanager
    def merged(self):
        saved = self.norm.weight.detach().clone()
        with torch.no_grad():
            self.norm.weight.mul_(1 + self.v)
        self.active, self.merges = False, self.merges + 1
        try:
            yield
        finally:
            with torch.no_grad():
                self.norm.weight.copy_(saved)
            self.active = True

    @contextlib.contextmanager
    def disabled(self):
        self.active = False
        try:
            yield
        finally:
            self.active = True


@pytest.fixture
def setup(tiny_ckpt):
    """A fresh fp32 model (the adapter hooks into it), its tokenizer and an adapter with v != 0."""
    model = load_model(tiny_ckpt[0], dtype=torch.float32, device="cpu")
    adapter = StandInAdapter(model)
    with torch.no_grad():
        adapter.v.copy_(0.3 * torch.randn(adapter.v.shape, generator=torch.Generator().manual_seed(1)))
    return model, load_tokenizer(tiny_ckpt[0]), adapter


def naive_logprobs(model, prompt, completion, temperature=1.0):
    """Unpadded full forward of one row, then the textbook log-probs at its completion positions."""
    hidden = model.hidden_states(torch.tensor([prompt + completion]))[0, len(prompt) - 1:-1]  # [len(completion), D]
    return grpo.textbook_logprobs(hidden, model.lm_head.weight, torch.tensor(completion), temperature)


def ragged_batch(tokenizer, seed=0):
    """Left-padding-worthy prompts and completions of very different lengths, pad (= an end id)
    after each end token; 6 rows."""
    g = torch.Generator().manual_seed(seed)
    V = tokenizer.vocab_size
    prompt_lens, lengths = [3, 9, 5, 2, 7, 4], [5, 1, 8, 3, 8, 2]
    prompts = [torch.randint(3, V, (n,), generator=g).tolist() for n in prompt_lens]
    completions = torch.full((6, 8), tokenizer.pad_id)
    for i, n in enumerate(lengths):
        completions[i, :n] = torch.randint(3, V, (n,), generator=g)
    completions[0, 4] = tokenizer.pad_id  # row 0 ends with <|endoftext|>: pad id == end id
    return prompts, completions, torch.tensor(lengths)


# --------------------------------------------------------------------------------------------
# Advantages

reward_groups = st.integers(2, 8).flatmap(
    lambda G: st.lists(st.lists(st.integers(0, 3), min_size=G, max_size=G), min_size=1, max_size=5))


@settings(max_examples=60, deadline=None)
@given(reward_groups, st.floats(-5, 5), st.floats(0.5, 50), st.sampled_from(["std", "none"]))
def test_advantages_zero_mean_and_shift_scale_invariant(groups, shift, factor, scale):
    r = torch.tensor(groups, dtype=torch.float32)
    A = grpo.group_advantages(r, scale, eps=0.0)
    assert torch.allclose(A.mean(1), torch.zeros(len(groups)), atol=1e-6)
    assert torch.allclose(grpo.group_advantages(r + shift, scale, eps=0.0), A, atol=1e-5)
    if scale == "std":
        assert torch.allclose(grpo.group_advantages(r * factor, scale, eps=0.0), A, atol=1e-5)
        assert torch.allclose(grpo.group_advantages(r * factor, scale), A, rtol=1e-3, atol=1e-5)
    else:
        assert torch.allclose(A, r - r.mean(1, keepdim=True), atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(st.floats(-1e6, 1e6, allow_subnormal=False), st.integers(2, 16), st.sampled_from(["std", "none"]),
       st.sampled_from([0.0, 1e-4]))
def test_all_equal_group_gets_exactly_zero(value, G, scale, eps):
    r = torch.tensor([[value] * G, [0.0] * (G - 1) + [1.0]])
    A = grpo.group_advantages(r, scale, eps)
    assert torch.equal(A[0], torch.zeros(G))
    assert A[1, -1] > 0 > A[1, 0]


def test_advantages_std_mode_matches_formula_and_rejects_single_samples():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    expected = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)
    assert torch.allclose(grpo.group_advantages(r), expected)
    with pytest.raises(ValueError, match="at least 2 samples"):
        grpo.group_advantages(torch.ones(3, 1))


# --------------------------------------------------------------------------------------------
# Log-probs of completions


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sequence_logprobs_equal_naive_forward_with_ragged_prompts(setup, temperature):
    model, tok, _ = setup
    prompts, completions, lengths = ragged_batch(tok)
    logp = grpo.sequence_logprobs(model, prompts, completions, lengths, temperature, chunk_tokens=3)
    for i, n in enumerate(lengths.tolist()):
        expected = naive_logprobs(model, prompts[i], completions[i, :n].tolist(), temperature)
        assert torch.allclose(logp[i, :n], expected, atol=1e-5), i
        assert torch.equal(logp[i, n:], torch.zeros(8 - n))
    assert logp[0, 4] < 0  # the end token (== pad id) is scored, not masked out


def test_end_token_is_in_the_loss_when_pad_id_equals_end_id(setup):
    model, tok, _ = setup
    assert tok.pad_id in tok.end_ids  # Qwen's <|endoftext|>: both the pad and an end token
    a, b = tok.encode("ab")
    completions = torch.tensor([[a, b, tok.pad_id, tok.pad_id], [b, tok.pad_id, tok.pad_id, tok.pad_id]])
    lengths = torch.tensor([3, 1])  # row 0 stopped at <|endoftext|>; row 1 ran out of budget at 1 token
    prompt = tok.encode_chat("hi")
    logp = grpo.sequence_logprobs(model, [prompt, prompt], completions, lengths)
    assert torch.allclose(logp[0, :3], naive_logprobs(model, prompt, [a, b, tok.pad_id]), atol=1e-5)
    loss, stats = grpo.policy_loss(logp, logp.detach(), torch.tensor([1.0, -1.0]), grpo.length_mask(lengths, 4))
    (grad,) = torch.autograd.grad(loss, logp)
    assert stats.tokens == 4 and grad[0, 2] != 0  # the end token is trained on
    assert torch.equal(grad[0, 3:], torch.zeros(1)) and torch.equal(grad[1, 1:], torch.zeros(3))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sequence_logprobs_equal_generate_logprobs(setup, temperature):
    """Sampling runs on merged weights with a KV cache; training recomputes through the adapter
    path with a full forward. Same tokens, same log-probs."""
    model, tok, adapter = setup
    prompts = [tok.encode_chat("2+2?"), tok.encode_chat("What is seven times six?")]
    r = grpo.rollout(model, tok, prompts, num_samples=3, max_new_tokens=12, temperature=temperature,
                     generator=torch.Generator().manual_seed(0), adapter=adapter)
    rows = [p for p in prompts for _ in range(3)]
    logp = grpo.sequence_logprobs(model, rows, r.completions, r.lengths, temperature)
    assert torch.allclose(logp, r.logprobs, atol=1e-5)


class LargestVocabBlock(TorchDispatchMode):
    """Records the most rows of any [rows, vocab]-shaped tensor an op creates."""

    def __init__(self, vocab, hidden):
        super().__init__()
        self.vocab, self.hidden, self.rows = vocab, hidden, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.vocab \
                    and tuple(t.shape) != (self.hidden, self.vocab):  # lm_head.weight.T, not activations
                self.rows = max(self.rows, t.numel() // self.vocab)
        return out


def test_no_logits_beyond_one_chunk_in_forward_or_backward(setup):
    model, tok, _ = setup
    prompts, completions, lengths = ragged_batch(tok)
    V, D = model.config.vocab_size, model.config.hidden_size
    with LargestVocabBlock(V, D) as chunked:
        grpo.sequence_logprobs(model, prompts, completions, lengths, chunk_tokens=4).sum().backward()
    assert 0 < chunked.rows <= 4
    with LargestVocabBlock(V, D) as naive:  # the check can fail: a full forward makes [N, T, V]
        torch.log_softmax(model(completions), -1).sum().backward()
    assert naive.rows == completions.numel()


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("chunk", [3, 7, 100])  # several chunks, a ragged last one; one chunk
def test_token_logprobs_equal_textbook_logprobs_values_and_gradients(temperature, chunk):
    """The chunked forward and the hand-written backward give the textbook formula's log-probs and
    autograd's gradients, to the hidden states and to lm_head's weight (which full fine-tuning, or
    tied embeddings, would train), and to the hidden states alone (lm_head frozen, as with an adapter)."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 5, generator=g, requires_grad=True)
    weight = torch.randn(11, 5, generator=g, requires_grad=True)
    targets = torch.randint(0, 11, (7,), generator=g)
    upstream = torch.randn(7, generator=g)
    for w, inputs in ((weight, (hidden, weight)), (weight.detach(), (hidden,))):
        logp = grpo.TokenLogprobs.apply(hidden, w, targets, temperature, chunk)
        expected = grpo.textbook_logprobs(hidden, w, targets, temperature)
        assert torch.allclose(logp, expected, atol=1e-6)
        grads = torch.autograd.grad(logp, inputs, upstream)
        expected_grads = torch.autograd.grad(expected, inputs, upstream)
        for got, want in zip(grads, expected_grads):
            assert torch.allclose(got, want, atol=1e-6)


def test_sequence_logprobs_textbook_path_matches_token_logprobs(setup):
    """Through the model: the textbook path gives the same log-probs and gradient to the adapter."""
    model, tok, adapter = setup
    prompts, completions, lengths = ragged_batch(tok)
    upstream = torch.randn(completions.shape, generator=torch.Generator().manual_seed(2))
    results = []
    for textbook in (False, True):
        logp = grpo.sequence_logprobs(model, prompts, completions, lengths, 0.7, chunk_tokens=5, textbook=textbook)
        results.append((logp, *torch.autograd.grad(logp, adapter.v, upstream)))
    for chunked, textbook in zip(*results):  # log-probs, then the gradient (a sum over tokens)
        scale = max(1.0, float(textbook.detach().abs().max()))  # entries may cancel: scaled to the largest
        torch.testing.assert_close(chunked, textbook, rtol=0, atol=1e-6 * scale)


# --------------------------------------------------------------------------------------------
# The loss


def mode_weights(lengths, width, agg, constant_norm):
    """The per-token weight each aggregation mode gives: 1/M, 1/(N len_i), 1/(N C)."""
    mask = grpo.length_mask(lengths, width).float()
    N = len(lengths)
    if agg == "token-mean":
        return mask / mask.sum()
    if agg == "seq-mean":
        return mask / (N * lengths[:, None].float())
    return mask / (N * constant_norm)


@pytest.mark.parametrize("agg", grpo.AGGREGATIONS)
def test_on_policy_gradient_is_reinforce(setup, agg):
    """ratio = 1: d loss = -sum_it weight_it A_i d logp_it, with the mode's weights."""
    model, tok, adapter = setup
    prompts, completions, lengths = ragged_batch(tok)
    A = torch.tensor([1.0, -0.5, 2.0, 0.0, -1.5, 0.7])
    mask = grpo.length_mask(lengths, 8)
    logp = grpo.sequence_logprobs(model, prompts, completions, lengths)
    loss, stats = grpo.policy_loss(logp, logp.detach(), A, mask, grpo.GRPOConfig(agg=agg, constant_norm=10))
    (grad,) = torch.autograd.grad(loss, adapter.v)

    w = mode_weights(lengths, 8, agg, 10)
    reference = sum(-(w[i, :n] * A[i] * naive_logprobs(model, prompts[i], completions[i, :n].tolist())).sum()
                    for i, n in enumerate(lengths.tolist()))
    (expected,) = torch.autograd.grad(reference, adapter.v)
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))  # scaled: entries may cancel
    assert stats.clip_frac == 0 and stats.ratio == 1.0 and stats.tokens == int(lengths.sum())


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31), st.sampled_from([(0.2, 0.2), (0.2, 0.4), (0.1, 0.28)]))
def test_clipping_removes_gradient_exactly_where_ppo_says(seed, clips):
    clip_low, clip_high = clips
    g = torch.Generator().manual_seed(seed)
    N, L = 5, 7
    logp = torch.randn(N, L, generator=g).requires_grad_()
    ratio = 0.5 + 1.2 * torch.rand(N, L, generator=g)
    for edge in (1 - clip_low, 1 + clip_high):  # keep away from the kinks
        ratio = torch.where((ratio - edge).abs() < 1e-3, ratio + 3e-3, ratio)
    old_logp = logp.detach() - ratio.log()
    tis = 0.5 + 2.5 * torch.rand(N, L, generator=g)  # sampler mismatch, some above the cap
    rollout_logp = old_logp - tis.log()
    A = torch.randn(N, generator=g)
    mask = torch.rand(N, L, generator=g) < 0.8

    cfg = grpo.GRPOConfig(clip_low=clip_low, clip_high=clip_high, tis_cap=2.0)
    loss, stats = grpo.policy_loss(logp, old_logp, A, mask, cfg, rollout_logp=rollout_logp)
    (grad,) = torch.autograd.grad(loss, logp)

    A_ = A[:, None].expand(N, L)
    clipped = ((A_ > 0) & (ratio > 1 + clip_high)) | ((A_ < 0) & (ratio < 1 - clip_low))
    assert torch.equal(grad[clipped | ~mask], torch.zeros(int((clipped | ~mask).sum())))
    expected = -A_ * ratio * tis.clamp(max=2.0) / mask.sum()  # d(-w rho A)/d logp = -w rho A
    live = ~clipped & mask
    assert torch.allclose(grad[live], expected[live], rtol=1e-4, atol=1e-7)
    assert stats.clip_frac == pytest.approx(float((clipped & mask).sum() / mask.sum()))


def test_tis_is_off_by_default_and_at_cap_zero():
    """GRPOConfig's defaults are plain GRPO: tis_cap 0 means no importance weight (not a weight of 0),
    and a cap weighs every token by min(pi_old / pi_rollout, cap)."""
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(3, 4, generator=g).requires_grad_()
    old_logp, rollout_logp = logp.detach() + 0.01, logp.detach() - 1.0  # pi_old / pi_rollout = e^1.01 > 2
    A, mask = torch.tensor([1.0, -1.0, 0.5]), torch.ones(3, 4, dtype=torch.bool)
    plain, _ = grpo.policy_loss(logp, old_logp, A, mask)
    for cfg in (None, grpo.GRPOConfig(tis_cap=0.0)):
        assert torch.equal(grpo.policy_loss(logp, old_logp, A, mask, cfg, rollout_logp=rollout_logp)[0], plain)
    capped, _ = grpo.policy_loss(logp, old_logp, A, mask, grpo.GRPOConfig(tis_cap=2.0), rollout_logp=rollout_logp)
    assert torch.allclose(capped, 2 * plain) and plain != 0


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31))
def test_k3_kl_is_nonnegative_and_zero_when_policies_coincide(seed):
    g = torch.Generator().manual_seed(seed)
    logp = (3 * torch.randn(4, 6, generator=g)).requires_grad_()
    ref = 3 * torch.randn(4, 6, generator=g)
    mask = torch.ones(4, 6, dtype=torch.bool)
    zero_adv = torch.zeros(4)
    cfg = grpo.GRPOConfig(kl_beta=1.0)
    loss, stats = grpo.policy_loss(logp, logp.detach(), zero_adv, mask, cfg, ref_logp=ref)
    k3 = torch.exp(ref - logp) - (ref - logp) - 1
    assert loss >= 0 and stats.kl >= 0 and bool((k3 >= 0).all())
    assert loss.item() == pytest.approx(k3.mean().item(), rel=1e-5)

    loss, stats = grpo.policy_loss(logp, logp.detach(), zero_adv, mask, cfg, ref_logp=logp.detach())
    (grad,) = torch.autograd.grad(loss, logp)
    assert loss.item() == 0 and stats.kl == 0 and torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("agg", grpo.AGGREGATIONS)
@pytest.mark.parametrize("beta", [0.001, 0.3])  # 0.001: the paper's MATH setting
def test_kl_term_enters_loss_and_gradient_with_weight_beta(agg, beta):
    """loss(beta) - loss(0) = beta * sum_it m_it c_i k3_it / Z, k3 = exp(ref - logp) - (ref - logp) - 1,
    and its gradient beta * m_it c_i (1 - exp(ref - logp)) / Z: computed here in float64, with the
    clipped, importance-weighted policy term present (it cancels) and not weighting the KL."""
    g = torch.Generator().manual_seed(7)
    N, L, constant_norm = 5, 6, 9.0
    lengths = torch.tensor([6, 1, 4, 3, 5])
    mask = grpo.length_mask(lengths, L)
    logp = (-3 * torch.rand(N, L, generator=g, dtype=torch.float64)).requires_grad_()
    old_logp = logp.detach() + 0.3 * torch.randn(N, L, generator=g, dtype=torch.float64)
    rollout_logp = old_logp + 0.5 * torch.randn(N, L, generator=g, dtype=torch.float64)
    ref_logp = logp.detach() + torch.randn(N, L, generator=g, dtype=torch.float64)
    A = torch.randn(N, generator=g, dtype=torch.float64)

    def loss_and_gradient(kl_beta):
        cfg = grpo.GRPOConfig(agg=agg, constant_norm=constant_norm, kl_beta=kl_beta, tis_cap=2.0)
        loss, _ = grpo.policy_loss(logp, old_logp, A, mask, cfg, ref_logp=ref_logp, rollout_logp=rollout_logp)
        return loss, torch.autograd.grad(loss, logp)[0]

    m = mask.double()
    weight = {"token-mean": m / m.sum(),  # c_i / Z per token
              "seq-mean": m / (N * lengths[:, None].double()),
              "constant": m / (N * constant_norm)}[agg]
    delta = ref_logp - logp.detach()
    k3 = torch.exp(delta) - delta - 1
    (with_kl, grad_with_kl), (without_kl, grad_without_kl) = loss_and_gradient(beta), loss_and_gradient(0.0)
    assert (with_kl - without_kl).item() == pytest.approx(beta * (weight * k3).sum().item(), rel=1e-9)
    torch.testing.assert_close(grad_with_kl - grad_without_kl, beta * weight * (1 - torch.exp(delta)),
                               rtol=1e-9, atol=1e-15)


def test_reference_policy_is_the_model_with_the_adapter_off(setup):
    model, tok, adapter = setup
    prompts, completions, lengths = ragged_batch(tok)
    r = grpo.Rollout(prompts[:2], 3, completions, lengths, torch.zeros(6, 8), [""] * 6)
    cfg = grpo.GRPOConfig(kl_beta=0.1, micro_batch_size=4)
    batch = grpo.prepare_batch(model, r, [[1, 0, 0], [0, 1, 1]], cfg, adapter)
    with adapter.disabled():
        base = grpo.sequence_logprobs(model, batch.prompt_ids, completions, lengths)
    assert torch.allclose(batch.ref_logp, base, atol=1e-6)
    assert not torch.allclose(batch.old_logp, base, atol=1e-3)  # v != 0: the policy has moved
    with pytest.raises(ValueError, match="needs an adapter"):
        grpo.prepare_batch(model, r, [[1, 0, 0], [0, 1, 1]], cfg, adapter=None)


@pytest.mark.parametrize("agg", grpo.AGGREGATIONS)
def test_micro_batched_gradient_equals_full_batch(setup, agg):
    """Off-policy ratios, clipping, TIS and KL all on; rows of very different lengths, so any
    per-micro-batch normalisation would show."""
    model, tok, adapter = setup
    prompts, completions, lengths = ragged_batch(tok)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        logp = grpo.sequence_logprobs(model, prompts, completions, lengths)
    mask = grpo.length_mask(lengths, 8)

    def near(x):
        return torch.where(mask, x + 0.3 * torch.randn(x.shape, generator=g), torch.zeros_like(x))

    batch = grpo.Batch(prompts, completions, lengths, torch.randn(6, generator=g), rollout_logp=near(logp),
                       old_logp=near(logp), ref_logp=near(logp))
    cfg = grpo.GRPOConfig(agg=agg, constant_norm=16, kl_beta=0.1, tis_cap=2.0, clip_low=0.2, clip_high=0.3)
    grads, losses = [], []
    for micro in (6, 1, 4):
        adapter.v.grad = None
        stats = grpo.grpo_backward(model, batch, micro, cfg)
        grads.append(adapter.v.grad.clone())
        losses.append(stats.loss)
    assert stats.clip_frac > 0 and stats.ratio != pytest.approx(1.0)
    # the loss and each gradient entry are sums of terms of both signs that may cancel: compare at a
    # tolerance scaled to the terms (|A| ratio w <= max|A| (1 + clip_high) tis_cap, beta k3 ~ 0.1 here;
    # the gradient's largest entry), not to the possibly tiny result
    terms = float(batch.advantages.abs().max()) * 1.3 * 2.0 + 0.1
    for grad, loss in zip(grads[1:], losses[1:]):
        torch.testing.assert_close(grad, grads[0], rtol=1e-5, atol=1e-6 * float(grads[0].abs().max()))
        assert loss == pytest.approx(losses[0], rel=1e-5, abs=1e-6 * terms)


def test_loss_normalizers():
    lengths = torch.tensor([3, 5, 1])
    assert grpo.loss_normalizer(lengths, "token-mean") == 9
    assert grpo.loss_normalizer(lengths, "seq-mean") == 3
    assert grpo.loss_normalizer(lengths, "constant", constant_norm=100) == 300
    with pytest.raises(ValueError, match="constant_norm"):
        grpo.loss_normalizer(lengths, "constant")
    with pytest.raises(ValueError, match="token-mean"):
        grpo.loss_normalizer(lengths, "sum")


# --------------------------------------------------------------------------------------------
# Rollouts and updates


def test_rollout_samples_from_merged_weights_and_restores_them_exactly(setup):
    model, tok, adapter = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prompts = [tok.encode_chat("hi"), tok.encode_chat("a longer question?")]
    r = grpo.rollout(model, tok, prompts, num_samples=4, max_new_tokens=6, adapter=adapter,
                     generator=torch.Generator().manual_seed(0))
    assert adapter.merges == 1
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert r.completions.shape[0] == 8 and r.lengths.shape == (8,) and len(r.texts) == 8
    assert r.texts[5] == tok.decode(r.completions[5, :r.lengths[5]].tolist())


def test_old_logp_is_kept_so_the_second_update_is_off_policy(setup):
    model, tok, adapter = setup
    prompts = [tok.encode_chat("hi"), tok.encode_chat("there")]
    r = grpo.rollout(model, tok, prompts, 4, 6, generator=torch.Generator().manual_seed(0), adapter=adapter)
    cfg = grpo.GRPOConfig(micro_batch_size=8)
    batch = grpo.prepare_batch(model, r, [[1, 0, 0, 1], [0, 0, 1, 0]], cfg, adapter)
    optimizer = torch.optim.Adam(adapter.parameters(), lr=0.3)
    first = grpo.grpo_backward(model, batch, 8, cfg)
    optimizer.step()
    optimizer.zero_grad()
    second = grpo.grpo_backward(model, batch, 8, cfg)
    assert first.ratio == pytest.approx(1.0, abs=1e-6)
    assert abs(second.ratio - 1.0) > 1e-3


def test_grpo_steps_raise_the_probability_of_the_rewarded_completion(setup):
    """Reward 1 when the completion starts with one chosen character; a few GRPO steps on the
    stand-in adapter (Adam, lr 0.1) must make that first token clearly more likely."""
    model, tok, adapter = setup
    with torch.no_grad():
        adapter.v.zero_()
    prompts = [tok.encode_chat("Pick a letter."), tok.encode_chat("Another one?")]

    def first_token_probs():
        with torch.no_grad():
            return torch.stack([model(torch.tensor([p]))[0, -1].softmax(-1) for p in prompts]).mean(0)

    before = first_token_probs()
    candidates = [t for t in before.argsort(descending=True).tolist() if t not in tok.end_ids]
    target = candidates[0]  # about 3% at first: sampled now and then, far from certain

    cfg = grpo.GRPOConfig(mini_batches=2, micro_batch_size=8)
    optimizer = torch.optim.Adam(adapter.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(0)
    for _ in range(25):
        r = grpo.rollout(model, tok, prompts, 8, 3, cfg.temperature, generator=generator, adapter=adapter)
        rewards = (r.completions[:, 0] == target).float().reshape(2, 8)
        stats = grpo.grpo_update(model, r, rewards, optimizer, cfg, adapter)
        assert math.isfinite(stats.loss)
    assert all(int(state["step"]) == 2 * 25 for state in optimizer.state.values())  # 2 mini-batches a step
    after = first_token_probs()
    assert after[target] > max(0.3, 10 * before[target]), (before[target].item(), after[target].item())


def test_step_stats_summarise_the_batch(setup):
    model, tok, adapter = setup
    prompts = [tok.encode_chat("x"), tok.encode_chat("y")]
    r = grpo.rollout(model, tok, prompts, 4, 5, generator=torch.Generator().manual_seed(0), adapter=adapter)
    cfg = dataclasses.replace(grpo.GRPOConfig(), mini_batches=1, micro_batch_size=3)
    optimizer = torch.optim.SGD(adapter.parameters(), lr=0.0)
    steps = []
    optimizer.register_step_post_hook(lambda *_: steps.append(1))
    stats = grpo.grpo_update(model, r, [[1, 1, 1, 1], [0, 1, 0, 0]], optimizer, cfg, adapter)
    assert stats.zero_adv_groups == 0.5
    assert len(steps) == 1 and stats.clip_frac == 0 and stats.kl == 0 and stats.grad_norm > 0
    assert math.isfinite(stats.loss)
