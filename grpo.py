"""GRPO: the pieces of one policy-gradient step, in the order they run (the paper trains with
GRPO; the loss normalisers are GRPO's, DAPO's and Dr. GRPO's). docs/grpo.md derives each line.

    rollout            G completions per prompt, sampled with the adapter folded into the weights
    group_advantages   A_i = (r_i - mean_group r) / (std_group r + eps)              [P, G]
    sequence_logprobs  logp_it = log softmax(lm_head(h_it) / T)[y_it] at completion positions, through
                       the training path: textbook_logprobs is the formula, TokenLogprobs the same
                       numbers a chunk of rows at a time, recomputed in backward (no [tokens, vocab])
    policy_loss        per token t of completion i, with m_it = [t < length_i]:
                           rho_it = exp(logp_it - old_it)
                           w_it   = min(exp(old_it - rollout_it), tis_cap)      (detached; 1 if off)
                           pg_it  = -w_it * min(rho_it A_i, clip(rho_it, 1 - eps_low, 1 + eps_high) A_i)
                           kl_it  = exp(ref_it - logp_it) - (ref_it - logp_it) - 1        (k3, >= 0)
                           loss   = sum_it m_it c_i (pg_it + beta kl_it) / Z
                       token-mean (DAPO):   c_i = 1,          Z = tokens in the batch
                       seq-mean (GRPO):     c_i = 1/length_i, Z = sequences in the batch
                       constant (Dr. GRPO): c_i = 1,          Z = sequences * constant_norm
    prepare_batch      advantages, old_logp (policy before this batch's updates) and ref_logp
                       (adapter off), computed once per rollout batch without gradients
    grpo_backward      micro-batches of rows, each loss divided by the WHOLE batch's Z, so the
                       accumulated gradient equals one big batch's in every mode
    grpo_update        the rollout batch cut into mini-batches x ppo_epochs: one optimizer step each;
                       data-parallel, Z and the gradient are summed over the processes first

`adapter` is optional everywhere (None: a plain model, or full fine-tuning). Only three of its
members are used: `adapter.merged()` (sampling), `adapter.disabled()` (the reference policy for
KL) and, through the optimizer the caller built from `adapter.parameters()`, the trainable tensors.

Masks come from completion lengths, never from comparing tokens with the pad id: Qwen pads with
<|endoftext|>, which is also an end token, and the end token must stay in the loss.
"""

import contextlib
import math
from dataclasses import dataclass

import torch

from model import generate, left_pad

AGGREGATIONS = ("token-mean", "seq-mean", "constant")
ADVANTAGE_SCALES = ("std", "none")


@dataclass
class GRPOConfig:
    """A GRPO update's settings, the one home of their defaults: plain GRPO (symmetric clip, no
    importance weights, no KL); the gsm8k-paper preset (settings.PRESETS) sets clip_high 0.4 and tis_cap 2.0."""

    temperature: float = 1.0  # the sampling temperature; log-probs are recomputed at the same T
    adv_scale: str = "std"  # 'std': divide by the group's std (GRPO); 'none' (Dr. GRPO)
    adv_eps: float = 1e-4
    agg: str = "token-mean"  # 'token-mean' (DAPO), 'seq-mean' (GRPO) or 'constant' (Dr. GRPO)
    constant_norm: float | None = None  # tokens per sequence for agg='constant' (e.g. max_new_tokens)
    clip_low: float = 0.2  # eps_low: ratio floor 1 - eps_low
    clip_high: float = 0.2  # eps_high: ratio ceiling 1 + eps_high
    tis_cap: float = 0.0  # truncated importance sampling against the sampler: the weights' cap; 0 = off
    kl_beta: float = 0.0  # weight of the k3 KL to the base model (needs an adapter); 0 = off
    mini_batches: int = 1  # optimizer steps per pass over the rollout batch (prompts split evenly)
    ppo_epochs: int = 1  # passes over one rollout batch (not train.py's --epochs: passes over the data)
    micro_batch_size: int = 8  # completions per forward/backward (gradient accumulation)
    max_grad_norm: float | None = 1.0  # gradient clipping before each step; None = off
    chunk_tokens: int = 1024  # completion tokens per lm_head + log_softmax block (TokenLogprobs)


# --------------------------------------------------------------------------------------------
# Rollouts and their advantages


@dataclass
class Rollout:
    prompt_ids: list  # P token-id lists
    num_samples: int  # G
    completions: torch.Tensor  # [N, L] N = P * G, samples of a prompt adjacent; pad id after length
    lengths: torch.Tensor  # [N] tokens per completion, the end token included
    logprobs: torch.Tensor  # [N, L] sampler's log-probs under softmax(logits / T), merged weights
    texts: list  # [N] decoded completions, special tokens dropped


def rollout(model, tokenizer, prompt_ids, num_samples, max_new_tokens, temperature=1.0, top_p=1.0,
            generator=None, adapter=None, seeds=None):
    """Sample `num_samples` completions per prompt (token-id lists) with the adapter's update folded
    into the weights, exactly restored afterwards. `seeds` or `generator`: as in model.generate."""
    with adapter.merged() if adapter is not None else contextlib.nullcontext():
        gen = generate(model, prompt_ids, max_new_tokens, tokenizer.end_ids, tokenizer.pad_id,
                       temperature, top_p, num_samples, generator, seeds)
    texts = [tokenizer.decode(row[:n].tolist()) for row, n in zip(gen.tokens, gen.lengths.tolist())]
    return Rollout(list(prompt_ids), num_samples, gen.tokens, gen.lengths, gen.logprobs, texts)


def group_advantages(rewards, scale=GRPOConfig.adv_scale, eps=GRPOConfig.adv_eps):
    """rewards [P, G] -> advantages [P, G]: r - mean over the group, divided by the group's
    (unbiased) std + eps when scale='std'. A group whose rewards are all equal carries no signal
    and gets exactly zero."""
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"advantage scale {scale!r}: use one of {ADVANTAGE_SCALES}")
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [prompts, samples] with at least 2 samples per prompt, got "
                         f"shape {tuple(rewards.shape)}")
    rewards = rewards.float()
    all_equal = (rewards == rewards[:, :1]).all(dim=1, keepdim=True)  # [P, 1]
    centered = (rewards - rewards.mean(dim=1, keepdim=True)).masked_fill(all_equal, 0.0)
    if scale == "none":
        return centered
    std = rewards.std(dim=1, keepdim=True).masked_fill(all_equal, 1.0)  # 0 / (0 + eps) even for eps = 0
    return centered / (std + eps)


# --------------------------------------------------------------------------------------------
# Log-probabilities of completions


def length_mask(lengths, width):
    """[N] lengths -> [N, width] bool, True at the first lengths[i] positions (end token included)."""
    return torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]


def textbook_logprobs(hidden, weight, targets, temperature):
    """logp[m] = log softmax(hidden[m] W^T / T)[targets[m]] the textbook way, the reference for
    TokenLogprobs: hidden [M, D], weight [V, D] (lm_head's), targets [M] -> [M] fp32. Autograd keeps
    the fp32 softmax [M, vocab] for backward: about 20 GB at the paper's micro-batch (8 completions
    x 4,096 tokens x 151,936 vocab x 4 bytes), hence TokenLogprobs for training."""
    logits = (hidden @ weight.T).float()  # [M, V] in the weights' dtype, then fp32, as in sampling
    return torch.log_softmax(logits / temperature, dim=-1).gather(-1, targets[:, None])[:, 0]


class TokenLogprobs(torch.autograd.Function):
    """textbook_logprobs' values and gradients without its [M, vocab] memory: one [chunk, vocab] fp32
    block of logits at a time, in place, in forward and in backward, for a second lm_head matmul.
    Forward saves only the log-normaliser log_z [M]; backward recomputes each block's softmax,
    exp(hidden W^T / T - log_z), and applies the softmax gradient by hand:

        d logp[m] / d logits[m] = (onehot(targets[m]) - softmax(logits[m] / T)) / T
        d hidden = d logits W,    d W = d logits^T hidden      (the latter only if W is trained)"""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk):
        M = hidden.shape[0]
        logp = torch.empty(M, dtype=torch.float32, device=hidden.device)  # [M]
        log_z = torch.empty(M, dtype=torch.float32, device=hidden.device)  # [M] logsumexp(logits / T)
        for i in range(0, M, chunk):
            x = (hidden[i:i + chunk] @ weight.T).float().div_(temperature)  # [c, V]
            shift = x.amax(dim=-1, keepdim=True)  # [c, 1], for a stable exp
            x.sub_(shift)
            target = x.gather(-1, targets[i:i + chunk, None])[:, 0]  # x_y - shift
            log_sum = x.exp_().sum(dim=-1).log()  # log sum_v exp(x_v - shift)
            logp[i:i + chunk] = target - log_sum
            log_z[i:i + chunk] = shift[:, 0] + log_sum
            del x  # free this block before the next one is allocated
        ctx.save_for_backward(hidden, weight, targets, log_z)
        ctx.temperature, ctx.chunk = temperature, chunk
        return logp

    @staticmethod
    def backward(ctx, grad_logp):  # [M]
        hidden, weight, targets, log_z = ctx.saved_tensors
        T, chunk = ctx.temperature, ctx.chunk
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, device=weight.device) if ctx.needs_input_grad[1] else None
        for i in range(0, hidden.shape[0], chunk):
            h, y = hidden[i:i + chunk], targets[i:i + chunk]  # [c, D], [c]
            s = grad_logp[i:i + chunk, None] / T  # [c, 1]
            g = (h @ weight.T).float().div_(T).sub_(log_z[i:i + chunk, None]).exp_()  # softmax [c, V]
            g.mul_(-s).scatter_add_(-1, y[:, None], s)  # (onehot(y) - softmax) s = d loss / d logits
            if grad_hidden is not None:
                grad_hidden[i:i + chunk] = g.to(weight.dtype) @ weight
            if grad_weight is not None:
                grad_weight.addmm_(g.T, h.float())
            del g  # free this block before the next one is allocated
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def sequence_logprobs(model, prompt_ids, completions, lengths, temperature=1.0, chunk_tokens=GRPOConfig.chunk_tokens,
                      textbook=False):
    """Log-prob of every completion token under the model (with its adapter path), at the sampling
    temperature (0 counts as 1): prompt_ids (N token-id lists), completions [N, L], lengths [N] ->
    [N, L] fp32, zero after each row's length. Rows are [left-padded prompt | completion | right pad];
    position Tp - 1 + t predicts completion token t. Only the M completion positions meet lm_head's
    weight (an adapter on lm_head would have to fold into it), through TokenLogprobs, `chunk_tokens`
    rows at a time, or with textbook=True through textbook_logprobs, all M at once (for comparisons)."""
    if int(lengths.min()) < 1 or int(lengths.max()) > completions.shape[1]:
        raise ValueError(f"completion lengths must lie in [1, {completions.shape[1]}] (the completions' "
                         f"width), got {lengths.tolist()}")
    if not isinstance(model.lm_head, torch.nn.Linear) or model.lm_head.bias is not None:
        raise ValueError("sequence_logprobs needs lm_head to be a bias-free nn.Linear (Qwen2's is)")
    T = temperature if temperature > 0 else 1.0
    L = int(lengths.max())
    mask = length_mask(lengths, completions.shape[1])  # [N, L_full]
    # pad positions are masked out of attention, so any id does for the left padding
    prompts, start = left_pad(prompt_ids, 0, completions.device)  # [N, Tp], [N]
    ids = torch.cat([prompts, completions[:, :L - 1]], dim=1)  # [N, Tp + L - 1]
    hidden = model.hidden_states(ids, start)[:, prompts.shape[1] - 1:]  # [N, L, D]
    hidden = hidden[mask[:, :L]]  # [M, D], completion tokens only
    targets = completions[:, :L][mask[:, :L]]  # [M]
    W = model.lm_head.weight  # [V, D]
    logp = (textbook_logprobs(hidden, W, targets, T) if textbook  # [M]
            else TokenLogprobs.apply(hidden, W, targets, T, chunk_tokens))
    return torch.zeros(mask.shape, dtype=logp.dtype, device=logp.device).masked_scatter(mask, logp)


# --------------------------------------------------------------------------------------------
# The loss


def loss_normalizer(lengths, agg, constant_norm=None):
    """Z for a batch with these completion lengths [N]: tokens (token-mean), sequences (seq-mean) or
    sequences * constant_norm (constant). Micro-batched, it is the whole batch's, passed to every part."""
    if agg == "token-mean":
        return float(lengths.sum())
    if agg == "seq-mean":
        return float(lengths.numel())
    if agg == "constant":
        if not constant_norm or constant_norm <= 0:
            raise ValueError("agg='constant' needs constant_norm > 0 (Dr. GRPO uses the generation budget, "
                             "e.g. max_new_tokens)")
        return float(lengths.numel() * constant_norm)
    raise ValueError(f"loss aggregation {agg!r}: use one of {AGGREGATIONS}")


@dataclass
class LossStats:
    loss: float  # this part's contribution to the batch loss (parts sum to the batch loss)
    tokens: int  # completion tokens in this part (the weight when merging parts)
    clip_frac: float  # fraction of tokens whose gradient the clip removed
    ratio: float  # mean pi / pi_old
    kl: float  # mean k3 estimate of KL(pi || ref); 0 without a reference


def merge_stats(parts):
    """Combine LossStats of the parts of one batch: losses add, means are token-weighted."""
    tokens = sum(p.tokens for p in parts)
    clip_frac, ratio, kl = (sum(getattr(p, name) * p.tokens for p in parts) / max(tokens, 1)
                            for name in ("clip_frac", "ratio", "kl"))
    return LossStats(sum(p.loss for p in parts), tokens, clip_frac, ratio, kl)


def policy_loss(logp, old_logp, advantages, mask, cfg=None, normalizer=None, ref_logp=None, rollout_logp=None):
    """Clipped policy-gradient loss (equations at the top of this file) -> (loss, LossStats).

    logp [N, L] (with grad), old_logp [N, L], advantages [N], mask [N, L] bool; ref_logp and
    rollout_logp [N, L] or None. Masked-out positions must hold finite values (zeros).
    cfg: the GRPOConfig whose clip_low, clip_high, agg, constant_norm, kl_beta and tis_cap apply
    (None: the defaults). normalizer: Z of the whole batch (`loss_normalizer`); None = this batch."""
    cfg = GRPOConfig() if cfg is None else cfg
    if normalizer is None:
        normalizer = loss_normalizer(mask.sum(dim=1), cfg.agg, cfg.constant_norm)
    elif cfg.agg not in AGGREGATIONS:
        raise ValueError(f"loss aggregation {cfg.agg!r}: use one of {AGGREGATIONS}")
    m = mask.to(logp.dtype)  # [N, L]
    A = advantages.to(logp.dtype)[:, None]  # [N, 1]

    ratio = torch.exp(logp - old_logp)  # [N, L]
    clipped_ratio = ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high)
    pg = -torch.minimum(ratio * A, clipped_ratio * A)  # [N, L]
    clipped = ((A > 0) & (ratio > 1 + cfg.clip_high)) | ((A < 0) & (ratio < 1 - cfg.clip_low))  # no gradient there
    if cfg.tis_cap:
        if rollout_logp is None:
            raise ValueError("tis_cap needs rollout_logp, the sampler's log-probs (Rollout.logprobs)")
        pg = pg * torch.exp(old_logp - rollout_logp).clamp(max=cfg.tis_cap).detach()
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1  # k3 estimator
    per_token = pg + cfg.kl_beta * kl  # [N, L]

    if cfg.agg == "seq-mean":
        loss = ((per_token * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)).sum() / normalizer
    else:  # token-mean and constant differ only in Z
        loss = (per_token * m).sum() / normalizer

    tokens = int(mask.sum())
    with torch.no_grad():  # token means over the mask
        clip_frac, mean_ratio, mean_kl = (float((x.float() * m).sum() / max(tokens, 1)) for x in (clipped, ratio, kl))
    return loss, LossStats(float(loss.detach()), tokens, clip_frac, mean_ratio, mean_kl)


# --------------------------------------------------------------------------------------------
# Batches, micro-batches and updates


@dataclass
class Batch:
    """Everything a policy update needs, one row per completion."""
    prompt_ids: list  # [N] prompt token ids of each row
    completions: torch.Tensor  # [N, L]
    lengths: torch.Tensor  # [N]
    advantages: torch.Tensor  # [N]
    rollout_logp: torch.Tensor  # [N, L] sampler's log-probs (for TIS)
    old_logp: torch.Tensor | None  # [N, L] policy before this batch's updates; None = on-policy (logp.detach())
    ref_logp: torch.Tensor | None  # [N, L] base model (adapter off); None = no KL


def batch_rows(batch, rows):
    """The rows `rows` (a slice) of a batch, trimmed to their longest completion."""
    width = int(batch.lengths[rows].max())

    def cut(t):
        return None if t is None else t[rows, :width]

    return Batch(batch.prompt_ids[rows], cut(batch.completions), batch.lengths[rows], batch.advantages[rows],
                 cut(batch.rollout_logp), cut(batch.old_logp), cut(batch.ref_logp))


@torch.no_grad()
def _batch_logprobs(model, batch, cfg):
    """sequence_logprobs of a whole batch in micro-batches, without gradients -> [N, L]."""
    N, L = batch.completions.shape
    parts = []
    for i in range(0, N, cfg.micro_batch_size):
        mb = batch_rows(batch, slice(i, i + cfg.micro_batch_size))
        logp = sequence_logprobs(model, mb.prompt_ids, mb.completions, mb.lengths, cfg.temperature, cfg.chunk_tokens)
        parts.append(torch.nn.functional.pad(logp, (0, L - logp.shape[1])))
    return torch.cat(parts)


def prepare_batch(model, rollout, rewards, cfg, adapter=None, with_old_logp=True):
    """Rollout + rewards [P, G] (or N values) -> Batch with advantages, and, computed once here
    without gradients: old_logp (when with_old_logp; needed as soon as a batch serves more than one
    optimizer step) and ref_logp (when cfg.kl_beta > 0: the same model with the adapter off)."""
    P, G = len(rollout.prompt_ids), rollout.num_samples
    rewards = torch.as_tensor(rewards, dtype=torch.float32, device=rollout.completions.device).reshape(P, G)
    advantages = group_advantages(rewards, cfg.adv_scale, cfg.adv_eps).reshape(P * G)
    prompts = [p for p in rollout.prompt_ids for _ in range(G)]
    batch = Batch(prompts, rollout.completions, rollout.lengths, advantages, rollout.logprobs, None, None)
    if with_old_logp:
        batch.old_logp = _batch_logprobs(model, batch, cfg)
    if cfg.kl_beta > 0:
        if adapter is None:
            raise ValueError("kl_beta > 0 needs an adapter: the reference policy is the model with the adapter "
                             "switched off; set kl_beta=0 for a plain model")
        with adapter.disabled():
            batch.ref_logp = _batch_logprobs(model, batch, cfg)
    return batch


def grpo_backward(model, batch, micro_batch_size, cfg, normalizer=None):
    """Accumulate the gradient of the batch's loss, `micro_batch_size` rows at a time. Every part
    is divided by the WHOLE batch's Z (`normalizer`; None = computed from this batch), so the sum
    of the parts' gradients equals the one-batch gradient. Returns merged LossStats."""
    if normalizer is None:
        normalizer = loss_normalizer(batch.lengths, cfg.agg, cfg.constant_norm)
    parts = []
    for i in range(0, len(batch.prompt_ids), micro_batch_size):
        mb = batch_rows(batch, slice(i, i + micro_batch_size))
        logp = sequence_logprobs(model, mb.prompt_ids, mb.completions, mb.lengths, cfg.temperature, cfg.chunk_tokens)
        old_logp = logp.detach() if mb.old_logp is None else mb.old_logp
        loss, stats = policy_loss(logp, old_logp, mb.advantages, length_mask(mb.lengths, logp.shape[1]), cfg,
                                  normalizer, mb.ref_logp, mb.rollout_logp)
        loss.backward()
        parts.append(stats)
    return merge_stats(parts)


@dataclass
class StepStats:
    """What one grpo_update did (the caller has the rewards and lengths themselves)."""
    zero_adv_groups: float  # fraction of prompts whose samples all scored the same (no signal)
    loss: float  # mean over the optimizer steps
    clip_frac: float  # token-weighted over all updates
    kl: float
    grad_norm: float  # mean gradient norm before clipping


class NonFiniteError(ArithmeticError):
    """A loss or gradient that is inf/NaN: the update is refused before the optimizer moves."""


def clip_gradients(params, max_norm, loss):
    """Clip the gradient of `params` to `max_norm` (None = no clipping) and return its norm before
    clipping; raise NonFiniteError, leaving the parameters untouched, when loss or norm is not finite."""
    norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else math.inf))
    if not (math.isfinite(loss) and math.isfinite(norm)):
        raise NonFiniteError(f"non-finite loss ({loss}) or gradient norm ({norm})")
    return norm


def grpo_update(model, rollout, rewards, optimizer, cfg, adapter=None, sum_over_processes=None):
    """One GRPO step on a rollout batch and its rewards [P, G]: prepare it, then for each of
    cfg.ppo_epochs passes and each of cfg.mini_batches consecutive slices of prompts: zero_grad,
    grpo_backward (normalised over that mini-batch), clip the gradient, optimizer step.

    Data parallelism (train.py under torchrun): each process passes its share of every mini-batch
    (whole groups) and `sum_over_processes`, which returns its argument (a number or a tensor)
    summed over the processes. Z adds up over disjoint parts, so the mini-batch's Z, the gradient
    and the loss are summed before clipping and every process takes the same optimizer step; the
    returned loss and grad_norm are the whole batch's, the other statistics this process's."""
    P, G = len(rollout.prompt_ids), rollout.num_samples
    prompts_per_step = math.ceil(P / cfg.mini_batches)
    on_policy = cfg.ppo_epochs == 1 and prompts_per_step >= P  # one update: old policy = current, no old_logp
    batch = prepare_batch(model, rollout, rewards, cfg, adapter, with_old_logp=not on_policy)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    total = sum_over_processes or (lambda x: x)  # a single process holds the whole batch

    parts, norms = [], []
    for _ in range(cfg.ppo_epochs):
        for first in range(0, P, prompts_per_step):
            optimizer.zero_grad(set_to_none=True)
            mini_batch = batch_rows(batch, slice(first * G, min(first + prompts_per_step, P) * G))
            Z = total(loss_normalizer(mini_batch.lengths, cfg.agg, cfg.constant_norm))
            parts.append(grpo_backward(model, mini_batch, cfg.micro_batch_size, cfg, Z))
            for p in params:  # a parameter no completion reached has no gradient: zero, for the sum
                p.grad = total(p.grad if p.grad is not None else torch.zeros_like(p))
            parts[-1].loss = total(parts[-1].loss)
            norms.append(clip_gradients(params, cfg.max_grad_norm, parts[-1].loss))
            optimizer.step()

    merged = merge_stats(parts)
    rewards = torch.as_tensor(rewards, dtype=torch.float32).reshape(P, G)
    return StepStats(zero_adv_groups=float((rewards == rewards[:, :1]).all(dim=1).float().mean()),
                     loss=merged.loss / len(parts), clip_frac=merged.clip_frac, kl=merged.kl,
                     grad_norm=sum(norms) / len(norms))
