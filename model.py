"""A Qwen2.5-compatible decoder in plain PyTorch, in reading order: the network, batched KV-cache
sampling, the checkpoint loader (tokenizer.py reads the checkpoint's tokenizer). Also loads Llama
3.x and Qwen3 checkpoints: the same network with a few config-driven switches.

The network (Qwen2 architecture, as used by every Qwen2.5 model):

    x = embed_tokens[ids]                                       # [B, T, D]
    for each layer:
        h = x + o_proj(attention(rope(q_proj(rms(x))), rope(k_proj(rms(x))), v_proj(rms(x))))
        x = h + down_proj(silu(gate_proj(rms(h))) * up_proj(rms(h)))
    logits = lm_head(rms(x))                                    # [B, T, vocab]

q/k/v projections carry a bias, o/gate/up/down do not. Attention is grouped-query: n_heads query
heads share n_kv_heads key/value heads. RoPE uses the "rotate half" layout of Hugging Face.
Llama 3.x has no q/k/v bias and stretches RoPE's low frequencies (`rope_frequencies`); Qwen3 has
no q/k/v bias and RMS-normalises each head of q and k before RoPE (`q_norm`, `k_norm`).

Parameter names are exactly the Hugging Face checkpoint names (`model.layers.3.self_attn.q_proj.weight`,
...), so loading a checkpoint is one `load_state_dict` with every name and shape checked first.

Padding convention, used everywhere in this project: a batch of prompts of different lengths is
LEFT-padded, and `start[b]` is the number of pad tokens in front of row b. Positions are counted
from each row's first real token and keys before `start[b]` are masked out. Masks are always built
from lengths, never by comparing tokens with a pad id (Qwen's pad and end-of-text share an id).
"""

import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------
# The network


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int  # D
    intermediate_size: int  # MLP width
    num_hidden_layers: int
    num_attention_heads: int  # query heads
    num_key_value_heads: int  # key/value heads (GQA: query heads per kv head = ratio)
    head_dim: int  # usually hidden_size // num_attention_heads
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768  # the context length (settings.check_inputs checks --max-new-tokens against it)
    dtype: str = "float32"  # the checkpoint's stored dtype
    # what differs between the supported families (FAMILIES); the defaults are Qwen2's
    model_type: str = "qwen2"  # config.json's model_type: "qwen2" (Qwen2, Qwen2.5), "llama" (Llama 3.x), "qwen3"
    attention_bias: bool = True  # q/k/v projections carry a bias (Qwen2 yes; Llama 3, Qwen3 no)
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k, before RoPE
    rope_llama3: tuple = ()  # Llama 3.x: (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32 whatever the weight dtype."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope_frequencies(cfg, device=None):
    """RoPE's angle per position for each pair of dimensions [head_dim / 2]: theta^(-2i / head_dim).
    Llama 3.x (cfg.rope_llama3) stretches the low frequencies for long context: wavelengths above
    original / low_freq_factor are divided by `factor`, those below original / high_freq_factor
    kept, the band between blended linearly."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
    if not cfg.rope_llama3:
        return inv_freq
    factor, low, high, original = cfg.rope_llama3
    wavelength = 2 * math.pi / inv_freq
    smooth = ((original / wavelength - low) / (high - low)).clamp(0, 1)  # 0: long waves, 1: short ones
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def rope_cos_sin(positions, inv_freq, dtype):
    """cos/sin tables for integer positions [B, T] -> [B, 1, T, head_dim] each (computed in fp32)."""
    angles = positions[..., None].float() * inv_freq  # [B, T, head_dim/2]
    angles = torch.cat((angles, angles), dim=-1)  # [B, T, head_dim] ("rotate half" layout)
    return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


def apply_rope(x, cos, sin):
    """Rotate pairs (i, i + head_dim/2) of x [B, H, T, head_dim] by the position angle."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
        if cfg.qk_norm:  # Qwen3
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)  # [B, T, H, hd]
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim)  # [B, T, Hkv, hd]
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H, T, hd], [B, Hkv, T, hd]
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # [B, Hkv, cached + T, hd]
        # grouped-query attention: each kv head serves n_heads / n_kv query heads (SDPA shares them without copying)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv != self.n_heads)  # [B, H, T, hd]
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class KVCache:
    """Pre-allocated keys/values for every layer: [B, Hkv, max_len, hd]. All rows share one write
    position `length` (prompts are left-padded to a common length); `start[b]` marks row b's
    first real token, so keys before it are never attended to. Also holds what every decoding
    step would otherwise rebuild: the RoPE cos/sin of every slot, and which keys each row may see."""

    def __init__(self, cfg: ModelConfig, batch, max_len, start, dtype, device):
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.cfg = cfg
        self.length = 0  # positions filled so far (same for every row)
        self._set_rows(start, max_len)

    def _set_rows(self, start, max_len):
        self.start = start  # [B] left-pad counts
        slots = torch.arange(max_len, device=start.device)
        cos, sin = rope_cos_sin(slots[None], rope_frequencies(self.cfg, start.device), self.k[0].dtype)
        self.cos, self.sin = cos[0, 0], sin[0, 0]  # [max_len, hd], indexed by rope position
        self.key_mask = (slots[None, :] >= start[:, None])[:, None, None]  # [B, 1, 1, max_len]: real tokens

    def rope(self, positions):
        """cos/sin for integer positions [B, T] -> [B, 1, T, hd] each, as rope_cos_sin gives them."""
        return self.cos[positions][:, None], self.sin[positions][:, None]

    def update(self, layer, k, v):
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def repeat_interleave(self, n, max_len):
        """Give every row n copies (G samples share one prefill) in a cache of max_len positions.
        The prefill cache is just long enough for the prompts: the peak is one full-size cache."""
        for kv in (self.k, self.v):
            for layer, old in enumerate(kv):
                new = old.new_zeros(old.shape[0] * n, old.shape[1], max_len, old.shape[3])
                new.view(old.shape[0], n, *new.shape[1:])[:, :, :, :self.length] = old[:, None, :, :self.length]
                kv[layer] = new  # the old layer is freed here, before the next one is copied
        self._set_rows(self.start.repeat_interleave(n), max_len)


class Transformer(nn.Module):
    """Qwen2ForCausalLM (LlamaForCausalLM, Qwen3ForCausalLM): `model(input_ids)` -> logits [B, T, vocab]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = nn.ModuleDict(dict(  # the `model.*` parameters
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.hidden_size),
            layers=nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)),
            norm=RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def hidden_states(self, input_ids, start=None, cache=None):
        """Final-normed hidden states [B, T, D]. `start` [B]: left-pad count per row (default 0).
        With a cache, input_ids continue the cached sequence and the cache is extended."""
        B, T = input_ids.shape
        device = input_ids.device
        past, start = (cache.length, cache.start) if cache is not None else (0, start)
        if start is None:
            start = torch.zeros(B, dtype=torch.long, device=device)
        key_pos = torch.arange(past + T, device=device)  # absolute slot of every key
        query_pos = key_pos[past:]
        positions = (query_pos[None, :] - start[:, None]).clamp(min=0)  # [B, T] rope positions
        if cache is not None and T == 1:  # decoding: the new token sees every real key, itself included
            mask = cache.key_mask[..., :past + 1]  # [B, 1, 1, past+1]
        else:
            # key j is visible to query i when start[b] <= j <= i; pad queries see only themselves, which
            # keeps their (ignored) outputs finite instead of NaN from an all-masked softmax row.
            mask = (key_pos[None, None, :] <= query_pos[None, :, None]) & (key_pos[None, None, :] >= start[:, None, None])
            mask = (mask | (key_pos[None, None, :] == query_pos[None, :, None]))[:, None]  # [B, 1, T, past+T]

        x = self.model.embed_tokens(input_ids)
        cos, sin = (cache.rope(positions) if cache is not None
                    else rope_cos_sin(positions, rope_frequencies(self.config, device), x.dtype))
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, mask, cache, i)
        if cache is not None:
            cache.length += T
        return self.model.norm(x)

    def forward(self, input_ids, start=None, cache=None):
        return self.lm_head(self.hidden_states(input_ids, start, cache))


# --------------------------------------------------------------------------------------------
# Sampling


@dataclass
class Generation:
    tokens: torch.Tensor  # [N, L] completion ids; positions >= lengths[n] hold the pad id
    lengths: torch.Tensor  # [N] tokens per completion, the end token included when one was drawn
    logprobs: torch.Tensor  # [N, L] log-prob of each drawn token under softmax(logits / temperature)


def left_pad(prompts, pad_id, device=None):
    """List of token-id lists -> (ids [B, T] left-padded, start [B] pad counts)."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = torch.tensor(p, dtype=torch.long)
    start = torch.tensor([T - len(p) for p in prompts], dtype=torch.long)
    return ids.to(device), start.to(device)


def _sample(logits, temperature, top_p, uniform):
    """logits [N, V] fp32, uniform [N] in [0, 1) -> (token [N], log-prob of it under
    softmax(logits / temperature)). The token is found by inverse CDF: the first whose cumulative
    probability exceeds uniform * total, so a row's token depends on its own noise only."""
    if temperature == 0:
        token = logits.argmax(-1)
        return token, torch.log_softmax(logits, -1).gather(-1, token[:, None])[:, 0]
    # no `/ 1`: with a large vocabulary one more [N, V] temporary costs as much as the softmax itself
    probs = torch.softmax(logits if temperature == 1 else logits / temperature, -1)
    kept = probs
    if top_p < 1.0:  # keep the smallest set of most likely tokens whose mass reaches top_p
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        kept = torch.zeros_like(probs).scatter_(-1, order, sorted_p.masked_fill(drop, 0.0))
    cdf = kept.cumsum(-1)  # [N, V]
    token = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True)[:, 0]
    token = token.clamp_max(probs.shape[-1] - 1)  # u * total rounding up to the last entry
    return token, probs.gather(-1, token[:, None])[:, 0].log()  # a kept token keeps its full-softmax probability


def sampling_noise(seeds, num_samples, steps, device="cpu"):
    """Uniform noise [len(seeds) * num_samples, steps] for `generate`, each prompt's rows from its own
    stream seeded by its int in `seeds`: a completion depends on its prompt's seed only, not on batch
    size, order or which process generates it (hence identical single- and multi-process runs)."""
    rows = [torch.rand(num_samples, steps, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.cat(rows).to(device) if rows else torch.zeros(0, steps, device=device)


@torch.no_grad()
def generate(model, prompts, max_new_tokens, end_ids, pad_id, temperature=1.0, top_p=1.0,
             num_samples=1, generator=None, seeds=None):
    """Sample `num_samples` completions for each prompt (a list of token-id lists) -> Generation,
    N = len(prompts) * num_samples rows, samples of a prompt adjacent. temperature 0 = greedy.
    The prompts are prefilled once as a left-padded batch, then the KV cache is copied
    `num_samples` times. Rows stop independently at any id in `end_ids`, all after `max_new_tokens`.
    Randomness: `seeds` (one int per prompt, sampling_noise), else `generator` or torch's global RNG."""
    device = next(model.parameters()).device
    ids, start = left_pad(prompts, pad_id, device)
    max_len = ids.shape[1] + max_new_tokens
    cache = KVCache(model.config, len(prompts), ids.shape[1] if num_samples > 1 else max_len, start,
                    next(model.parameters()).dtype, device)
    logits = model.lm_head(model.hidden_states(ids, cache=cache)[:, -1]).float()  # [B, V], last position only
    if num_samples > 1:
        cache.repeat_interleave(num_samples, max_len)
        logits = logits.repeat_interleave(num_samples, dim=0)

    N = logits.shape[0]
    end_ids = torch.tensor(list(end_ids), device=device)
    tokens = torch.full((N, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(N, max_new_tokens, device=device)
    lengths = torch.zeros(N, dtype=torch.long, device=device)
    done = torch.zeros(N, dtype=torch.bool, device=device)
    if temperature == 0:
        noise = torch.zeros(N, max_new_tokens, device=device)  # greedy: no randomness drawn
    elif seeds is not None:
        noise = sampling_noise(seeds, num_samples, max_new_tokens, device=device)
    else:
        noise = torch.rand(N, max_new_tokens, generator=generator, device=device)
    for t in range(max_new_tokens):
        token, logp = _sample(logits, temperature, top_p, noise[:, t])
        token = token.masked_fill(done, pad_id)
        tokens[:, t] = token
        logprobs[:, t] = logp.masked_fill(done, 0.0)
        lengths += (~done).long()
        done |= torch.isin(token, end_ids)
        if t + 1 == max_new_tokens or bool(done.all()):
            break
        logits = model(token[:, None], cache=cache)[:, -1].float()
    L = int(lengths.max()) if N else 0
    return Generation(tokens[:, :L], lengths, logprobs[:, :L])


# --------------------------------------------------------------------------------------------
# Loading a Hugging Face checkpoint folder

FAMILIES = {"qwen2": "Qwen2/Qwen2.5", "llama": "Llama 3.x", "qwen3": "Qwen3"}  # model_type -> what it is
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message names the file and key."""


def read_config(path):
    """Read a `config.json` of a supported family (FAMILIES), older layout (top-level `rope_theta`,
    `rope_scaling`, `torch_dtype`) or newer (`rope_parameters`, `dtype`). Refuses what this model does
    not implement (other rope scalings, sliding windows, MoE, MLP biases) rather than compute it wrong."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise CheckpointError(f"{file}: missing; a checkpoint folder needs config.json")
    try:
        with open(file) as f:
            c = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    family = c.get("model_type")
    if family not in FAMILIES:
        raise CheckpointError(f"{file}: model_type {family!r} is not supported; supported: "
                              + ", ".join(f"{k!r} ({v})" for k, v in FAMILIES.items()))
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    for key in required:
        if not isinstance(c.get(key), int) or c[key] <= 0:
            raise CheckpointError(f"{file}: key {key!r} must be a positive integer, got {c.get(key)!r}")
    if c.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{file}: hidden_act {c['hidden_act']!r} is not supported; only 'silu'")
    if c.get("mlp_bias"):
        raise CheckpointError(f"{file}: mlp_bias is not supported (no Llama 3.x or Qwen checkpoint has one)")
    theta, llama3 = _read_rope(c, family, file)
    if c.get("use_sliding_window") or any(t != "full_attention" for t in c.get("layer_types") or []):
        raise CheckpointError(f"{file}: sliding-window attention (use_sliding_window/layer_types) is not supported")
    heads = c["num_attention_heads"]
    return ModelConfig(
        **{key: c[key] for key in required}, num_key_value_heads=c.get("num_key_value_heads") or heads,
        head_dim=c.get("head_dim") or c["hidden_size"] // heads, rope_theta=theta,
        rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)), tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        max_position_embeddings=int(c.get("max_position_embeddings", 32768)),
        dtype=c.get("dtype") or c.get("torch_dtype") or "float32", model_type=family,
        attention_bias=True if family == "qwen2" else bool(c.get("attention_bias", False)),
        qk_norm=family == "qwen3", rope_llama3=llama3)


def _read_rope(c, family, file):
    """config.json's RoPE (in `rope_scaling` and/or `rope_parameters`) -> (theta, ModelConfig.rope_llama3)."""
    rope = {**(c.get("rope_scaling") or {}), **(c.get("rope_parameters") or {})}  # newer layout: all in rope_parameters
    kinds = {d.get("rope_type") or d.get("type") for d in (c.get("rope_scaling") or {}, c.get("rope_parameters") or {})}
    kinds -= {None, "default"}
    rope_type = kinds.pop() if len(kinds) == 1 else ("default" if not kinds else "/".join(sorted(kinds)))
    llama3 = ()
    if rope_type == "llama3" and family == "llama":
        try:
            llama3 = (float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"]),
                      int(rope["original_max_position_embeddings"]))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{file}: llama3 rope scaling needs factor, low_freq_factor, high_freq_factor and "
                                  f"original_max_position_embeddings ({e!r})") from None
    elif rope_type != "default":
        raise CheckpointError(f"{file}: rope type {rope_type!r} is not supported; only plain RoPE, and 'llama3' for Llama")
    return float(rope.get("rope_theta", c.get("rope_theta", 10000.0))), llama3


def _read_safetensors(path):
    """All tensors (on the CPU) of `model.safetensors` or of the shards listed in
    `model.safetensors.index.json`, each shard checked against the index."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid shard index (needs a 'weight_map'): {e}") from None
        files = sorted(set(weight_map.values()))
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        weight_map, files = None, ["model.safetensors"]
    else:
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json; is this a checkpoint folder?")
    tensors = {}
    for name in files:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise CheckpointError(f"{file}: missing shard listed in {os.path.basename(index)}")
        try:
            shard = load_file(file, device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{file}: unreadable safetensors file (truncated or corrupt?): {e}") from None
        for key in shard if weight_map is not None else ():
            if weight_map.get(key) != name:
                raise CheckpointError(f"{file}: tensor {key!r} is not listed for this shard in {os.path.basename(index)}")
        tensors.update(shard)
    for key, name in (weight_map or {}).items():
        if key not in tensors:
            raise CheckpointError(f"{os.path.join(path, name)}: tensor {key!r} listed in the index is missing")
    return tensors


def default_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(path, dtype=None, device=None):
    """Load a Hugging Face folder of a supported family (FAMILIES). dtype: None (the checkpoint's),
    torch.float32 or torch.bfloat16 (or their names); device: None (cuda if available, else cpu).
    Returns the model in eval mode with every parameter frozen (adapters unfreeze their own)."""
    cfg = read_config(path)
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype {dtype!r}: use one of {sorted(_DTYPES)}")
        dtype = _DTYPES[dtype]
    dtype = dtype or _DTYPES.get(cfg.dtype, torch.float32)
    device = torch.device(device) if device is not None else default_device()

    tensors = _read_safetensors(path)
    with torch.device("meta"):  # no memory and no random init for weights about to be replaced
        model = Transformer(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
        tensors.pop("lm_head.weight", None)  # some tied checkpoints store the shared matrix twice
    where = os.path.join(path, "model.safetensors*")
    for key, shape in expected.items():
        if key not in tensors:
            raise CheckpointError(f"{where}: tensor {key!r} is missing")
        if tuple(tensors[key].shape) != tuple(shape):
            raise CheckpointError(f"{where}: tensor {key!r} has shape {tuple(tensors[key].shape)}, config.json implies {tuple(shape)}")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise CheckpointError(f"{where}: unexpected tensor {extra[0]!r} ({len(extra)} in all) for a {FAMILIES[cfg.model_type]} model")

    state = {k: t.to(device=device, dtype=dtype) for k, t in tensors.items()}
    for key, t in state.items():  # a NaN in a norm or a bias would silently turn every output into nonsense
        if not torch.isfinite(t).all():
            raise CheckpointError(f"{where}: tensor {key!r} has non-finite values (NaN or inf"
                                  f"{', or too large for ' + str(dtype) if dtype != tensors[key].dtype else ''}); "
                                  "the checkpoint is damaged")
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.requires_grad_(False)
    return model.eval()
