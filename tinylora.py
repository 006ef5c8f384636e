"""TinyLoRA, LoRA-XS, LoRA and full fine-tuning on one interface: the parameterizations of
"Learning to Reason in 13 Parameters" (arXiv:2602.04118), method section and ablations.

Every target weight W [out, in] (q,k,v,o,gate,up,down of every layer) gets an update:

    TinyLoRA   W' = W + scale * U diag(S) R V^T,   R = sum_{i=1..u} v_i P_i,  v [u] trained
    LoRA-XS    W' = W + scale * U diag(S) R V^T,   R [r, r] trained
    LoRA       W' = W + scale * B A,               A [r, in], B [out, r] trained
    full       W' = W trained directly (the ablation's upper bound)

U [out, r], S [r], V [in, r]: the rank-r truncated SVD of W, in fp32, frozen (`truncated_svd`,
cached on disk by `svd_factors`; kept as Vh = V^T [r, in], as torch.linalg.svd returns it).
P [u, r, r]: fixed random, one per module, ~ N(0, 1/r), drawn from a CPU generator seeded by
(seed, module index). v [u]: trainable, starts at 0, so the adapted model is the base model at
step 0. Tying: n_tie modules share one v (or one R); `tie_groups`.

Scale convention (everything explicit, nothing hidden in an alpha):
    P ~ N(0, 1/r) as in PEFT's `tinylora`; dW = scale * U diag(S) R V^T, `scale` default 1.0.
    PEFT's `tinylora` splits S as sqrt(S) onto both sides: (U sqrt(S)) R (sqrt(S) V^T). That is a
      different R-space (R sits between two sqrt(S)), so its v are not interchangeable with ours.
    The authors' code draws P ~ N(0, 1) and multiplies R by alpha/r / sqrt(u) = 16 / sqrt(u), and
      starts v at ~1e-5 noise. With r = 2 their dW is ours with scale = 16 * sqrt(2) / sqrt(u):
      the same v moves the weights 22.6x / sqrt(u) more; transfer learning rates accordingly, or
      set `scale` to match them.

Compute paths. Training: a forward hook adds x dW^T = ((x V) (scale diag(S) R)^T) U^T to each
target's output without materialising dW: the rank-r part in fp32 whatever the weight dtype, the
last product fused with the addition into the output (one pass over it, in its dtype). Rollouts: `adapter.merged()` folds dW
into the weights and restores them bit-for-bit afterwards. `adapter.disabled()` is the reference
(base) policy without a second copy of the weights.

Files: `save_adapter` writes only the trainable tensors (v: 13 numbers for the paper's 7B run)
plus metadata; `load_adapter` rebuilds P and the SVD and refuses a different base model;
`export_peft` writes the exact rank-r LoRA equivalent in PEFT's layout.
"""

import contextlib
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from model import ModelConfig, Transformer

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # depth order in a layer
PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
METHODS = ("tinylora", "lora-xs", "lora", "full")
TILINGS = ("tiled", "structured")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "tinylora", "svd")
FORMAT, FORMAT_VERSION = "tinylora-adapter", "1"
TIE_GAP = 1e-6  # (s_i - s_{i+1}) / s_1 below this, i <= r: "tied", warned about (svd_factors)
SVD_VERSION = "3"  # the truncated SVD algorithm, in the cache key (3: exact in fp64; 2: iterate to a sine bound; 1: 4 fixed passes)


class AdapterError(ValueError):
    """An adapter file that cannot be used here, or an adapter used wrongly; says what and where."""


@dataclass
class TinyLoRAConfig:
    method: str = "tinylora"  # one of METHODS
    r: int = 2  # frozen rank of the SVD (tinylora, lora-xs) or LoRA rank
    u: int = 1  # tinylora: trainable numbers per tie group (length of v); 1 for the other methods
    n_tie: int = 1  # modules sharing one v (tinylora) or one R (lora-xs); 1 for lora and full
    tiling: str = "tiled"  # "tiled": consecutive modules in depth order; "structured": same type only
    targets: tuple = TARGETS  # module types adapted in every layer
    seed: int = 0  # projection seed: P of module m comes from manual_seed(seed * 1_000_003 + m)
    scale: float = 1.0  # dW multiplier (see the scale convention above)
    svd: str = "randomized"  # "randomized" (subspace iteration) or "exact" (torch.linalg.svd)
    svd_oversample: int = 16  # randomized: extra columns beyond r (more: fewer, dearer passes)
    svd_tol: float = 1e-4  # randomized: iterate until every U, V column is within this sine of the exact SVD's
    svd_max_iter: int = 100  # randomized: passes before falling back to the exact SVD
    dtype: torch.dtype = torch.float32  # of the trainable tensors; the math is fp32 regardless ("full": the weights' own)

    def __post_init__(self):
        def bad(key, what):
            raise ValueError(f"TinyLoRAConfig.{key}={getattr(self, key)!r}: {what}")

        if self.method not in METHODS:
            bad("method", f"unknown method; use one of {', '.join(METHODS)}")
        if self.tiling not in TILINGS:
            bad("tiling", f"unknown tiling; use one of {', '.join(TILINGS)}")
        if isinstance(self.dtype, str):
            self.dtype = DTYPES.get(self.dtype, self.dtype)
        if self.dtype not in DTYPES.values():
            bad("dtype", f"unsupported; use one of torch.{', torch.'.join(DTYPES)}")
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        unknown = [t for t in targets if t not in TARGETS]
        if unknown or not targets or len(set(targets)) != len(targets):
            bad("targets", f"use distinct names from {', '.join(TARGETS)}")
        self.targets = tuple(t for t in TARGETS if t in targets)  # canonical (depth) order
        for key in ("r", "u", "n_tie"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                bad(key, "must be an integer >= 1")
        if self.u != 1 and self.method != "tinylora":
            bad("u", f"only tinylora has a v of length u; use u=1 with method {self.method!r}")
        if self.n_tie != 1 and self.method in ("lora", "full"):
            bad("n_tie", f"tying applies to tinylora and lora-xs only; use n_tie=1 with method {self.method!r}")
        if self.svd not in ("randomized", "exact"):
            bad("svd", "use 'randomized' or 'exact'")
        for key in ("seed", "svd_oversample", "svd_max_iter"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 0:
                bad(key, "must be an integer >= 0")
        if self.svd_max_iter > 1000:  # the exact SVD is cheaper long before that
            bad("svd_max_iter", "must be at most 1000")
        if not (isinstance(self.svd_tol, (int, float)) and 0 < self.svd_tol < 1):
            bad("svd_tol", "must be a number in (0, 1), e.g. 1e-4")
        if not math.isfinite(self.scale):
            bad("scale", "must be a finite number")


# --------------------------------------------------------------------------------------------
# Which modules, which tie group, how many parameters


@dataclass
class Target:
    name: str  # "model.layers.3.mlp.up_proj", as in the checkpoint
    linear: nn.Linear
    index: int  # 7 * layer + position of the type in TARGETS: seeds P, whatever the other targets
    kind: str  # "up_proj"
    group: int = 0  # tie group (tinylora, lora-xs); own index in the target list (lora, full)
    U: torch.Tensor = None  # [out, r] fp32
    S: torch.Tensor = None  # [r]
    Vh: torch.Tensor = None  # [r, in] = V^T
    P: torch.Tensor = None  # [u, r, r] (tinylora)
    restore: tuple = None  # while merged: what unmerge needs (see Adapter.merged)
    hook: object = None  # the forward hook's handle (all methods but full)


def tie_groups(kinds, n_tie, tiling):
    """kinds: the module type of each target in depth order -> its tie group.
    tiled: consecutive chunks of n_tie in depth order, any types: group = position // n_tie.
    structured: each type (q, then k, ...) in depth order, in chunks of n_tie; a type's groups are
    numbered after the previous type's. Groups: ceil(N / n_tie) tiled, sum_t ceil(N_t / n_tie)
    structured (N_t = modules of type t = layers)."""
    if tiling == "tiled":
        return [i // n_tie for i in range(len(kinds))]
    groups, first = [0] * len(kinds), 0
    for kind in dict.fromkeys(kinds):
        members = [i for i, k in enumerate(kinds) if k == kind]
        for j, i in enumerate(members):
            groups[i] = first + j // n_tie
        first += math.ceil(len(members) / n_tie)
    return groups


def find_targets(model, kinds=TARGETS):
    """Targets of the given types in depth order: layer 0 q,k,v,o,gate,up,down, then layer 1, ..."""
    if not isinstance(model, Transformer):
        raise ValueError(f"got a {type(model).__name__}; attach to a model.Transformer (model.load_model)")
    return [Target(f"model.layers.{i}.{PARENT[kind]}.{kind}", getattr(getattr(layer, PARENT[kind]), kind),
                   7 * i + TARGETS.index(kind), kind)
            for i, layer in enumerate(model.model.layers) for kind in kinds]


def plan(model, config):
    """The targets of `model` (with tie groups) and the trainable tensors' shapes {file name:
    shape}. Checks what depends on the model: n_tie <= N, r <= min(out, in)."""
    targets = find_targets(model, config.targets)
    c, N = config, len(targets)
    if c.n_tie > N:
        raise ValueError(f"n_tie={c.n_tie} is more than the {N} target modules; use 1 <= n_tie <= {N} ({N} ties them all)")
    tied = c.method in ("tinylora", "lora-xs")
    for t, group in zip(targets, tie_groups([t.kind for t in targets], c.n_tie, c.tiling) if tied else range(N)):
        t.group = group
    small = min(min(t.linear.weight.shape) for t in targets)
    if c.method != "full" and c.r > small:
        raise ValueError(f"r={c.r} exceeds the smallest target dimension {small}; use r <= {small}")
    G = targets[-1].group + 1
    if c.method == "tinylora":
        shapes = {"v": (G, c.u)}  # v of group g is row g
    elif c.method == "lora-xs":
        shapes = {"R": (G, c.r, c.r)}
    elif c.method == "lora":
        shapes = {}
        for t in targets:
            shapes[f"{t.name}.lora_A"] = (c.r, t.linear.in_features)
            shapes[f"{t.name}.lora_B"] = (t.linear.out_features, c.r)
    else:
        shapes = {f"{t.name}.weight": tuple(t.linear.weight.shape) for t in targets}
    return targets, shapes


def count_trainable(model, config):
    """Exact trainable count; works on a meta-device model (no memory): see `parameter_table`."""
    return sum(math.prod(s) for s in plan(model, config)[1].values())


def tie_choices(layers, budget, targets=TARGETS, tiling="tiled", max_u=16):
    """(u, n_tie, count) per u = 1..max_u: the least tying whose TinyLoRA count fits the budget.
    layers: a model or a layer count. Qwen2.5-7B (28 layers, 7 targets), budget 13 -> (1, 16, 13)."""
    layers = layers if isinstance(layers, int) else len(layers.model.layers)
    kinds = [k for _ in range(layers) for k in targets]
    n_groups = {n: max(tie_groups(kinds, n, tiling)) + 1 for n in range(1, len(kinds) + 1)}
    choices = []
    for u in range(1, max_u + 1):
        fits = [n for n in n_groups if u * n_groups[n] <= budget]
        if fits:
            choices.append((u, fits[0], u * n_groups[fits[0]]))
    return choices


# --------------------------------------------------------------------------------------------
# Fingerprint and truncated SVD (cached)


def fingerprint(model, samples=4096):
    """Identity of a base model as an adapter depends on it: what the model computes, nothing else.
    A string of parts, 8 hex digits of sha256 each, so a mismatch can say which part differs
    (`fingerprint_mismatch`):

        architecture=... model.embed_tokens=... model.layers=... model.norm=... lm_head=...

    architecture: the config fields that change the computation (layers, sizes, heads, kv heads,
    head_dim, vocabulary, RoPE, rms_norm_eps, tied embeddings: every ModelConfig field but dtype,
    eos_token_ids and max_position_embeddings, so editing those in config.json keeps an adapter
    usable, and a field added to ModelConfig later counts until it is listed here). Each weight
    part (every parameter: embeddings, projections and their biases, norms, head; a tied checkpoint
    has no lm_head part): per tensor its name, shape and up to `samples` entries evenly strided over
    the whole tensor, rounded to bf16 so fp32 and bf16 loads of one checkpoint agree; the stride is
    coprime with the row length, so the entries spread over rows and columns. About 1.4M entries for
    7B: cheap. It tells checkpoints apart; it is not a checksum (a change confined to unsampled
    entries goes unseen)."""
    computes = {k: v for k, v in asdict(model.config).items()
                if k not in ("dtype", "eos_token_ids", "max_position_embeddings")}
    parts = {"architecture": hashlib.sha256(json.dumps(computes, sort_keys=True).encode())}
    for name, p in model.named_parameters():  # a tied lm_head is embed_tokens' parameter: listed once
        part = "model.layers" if name.startswith("model.layers.") else name.rsplit(".", 1)[0]
        w = p.detach().reshape(-1)
        stride = -(-w.numel() // samples)  # ceil: the entries span the whole tensor
        while math.gcd(stride, p.shape[-1]) != 1:
            stride += 1
        sample = w[::stride][:samples].to(torch.bfloat16).view(torch.int16).cpu()
        h = parts.setdefault(part, hashlib.sha256())
        h.update(f"{name}{tuple(p.shape)}".encode() + sample.numpy().tobytes())
    return " ".join(f"{part}={h.hexdigest()[:8]}" for part, h in parts.items())


def fingerprint_mismatch(saved, current):
    """Why an adapter made on the base model `saved` (its file's base_fingerprint) does not belong
    to the model `current`, in words; None when the two fingerprints are the same."""
    if saved == current:
        return None
    if not saved.startswith("architecture="):
        return (f"its base-model fingerprint {saved!r} is not one this version makes (older versions of tinylora "
                "hashed the whole config.json and only the projections), so it cannot check which model the adapter "
                "belongs to; retrain the adapter with this version")
    old, new = (dict(part.partition("=")[::2] for part in f.split()) for f in (saved, current))
    if old["architecture"] != new["architecture"]:
        return ("trained on a base model of another architecture (config.json differs in a field that changes the "
                "computation: layers, sizes, heads, vocabulary, RoPE, norm eps, tied embeddings, ...); load it onto "
                "the checkpoint it was trained on")
    differ = [part for part in {**old, **new} if old.get(part) != new.get(part)]
    return (f"the weights of {', '.join(differ)} differ from the base model it was trained on; load it onto the "
            "checkpoint it was trained on")


def _ritz(W, Q):
    """Rayleigh-Ritz on an orthonormal basis Q [m, q] of (nearly) the top range of W: the SVD of
    the small Q^T W [q, n], lifted back -> U = Q Ub [m, q], S [q], Vh [q, n]. W^T u_i = s_i v_i
    holds exactly; how far W v_i is from s_i u_i tells how far the pair is from a true one."""
    Ub, S, Vh = torch.linalg.svd(Q.T @ W, full_matrices=False)
    return Q @ Ub, S, Vh


def _sine_bound(S, residuals, r, n):
    """Bound on the sine of the angle between each of the top-r computed singular pairs and the
    true pair (u_i, v_i) of W [m, n], from the residual norms [r] ||(W v_i - s_i u_i, W^T u_i - s_i v_i)||
    and the gaps to the neighbouring singular values (Davis-Kahan on the symmetric [[0, W], [W^T, 0]]):

        sin_i <= residual_i / (min(s_{i-1} - s_i, s_i - s_{i+1}) - slack)      (s_0 = inf)

    with S [>= r] the computed values and slack = 2 max residual + eps sqrt(n) s_1 what they may be
    off by (a computed value is within its residual of a true one, and rounding adds eps sqrt(n) s_1).
    The largest over i <= r; it bounds the sine of the U and V subspaces too. inf when the gaps are
    within the slack: nearly tied values, whose basis (or, for i = r, subspace) is not determined."""
    s = torch.cat([torch.tensor([math.inf], dtype=torch.float64), S.double().cpu(),
                   torch.zeros(max(0, r + 1 - len(S)), dtype=torch.float64)])
    residuals = residuals.double().cpu()
    slack = 2 * residuals.max() + torch.finfo(S.dtype).eps * math.sqrt(n) * s[1]
    gaps = torch.minimum(s[:r] - s[1:r + 1], s[1:r + 1] - s[2:r + 2]) - slack  # [r]
    return (residuals / gaps).where(gaps > 0, math.inf).max().item()


def _fp64_sine_bound(W, U, S, Vh, r):
    """`_sine_bound` of the top-r pairs of (U, S, Vh) with both residuals computed in fp64 (they are
    trustworthy down to ~1e-16 s_1; fp32 ones stop at ~1e-7 s_1 sqrt(n)). S: every computed value."""
    W, U, s, Vh = W.double(), U[:, :r].double(), S[:r].double(), Vh[:r].double()
    residuals = ((W @ Vh.T - U * s).square().sum(0) + (U.T @ W - s[:, None] * Vh).square().sum(1)).sqrt()
    return _sine_bound(S, residuals, r, W.shape[1])


def truncated_svd(W, r, exact=False, oversample=16, tol=1e-4, max_iter=100, seed=0):
    """Top-r SVD of W [m, n] (fp32) -> (U [m, r], S [r], Vh [r, n], report); W ~ U diag(S) Vh.

    Randomized (default): subspace iteration (Halko, Martinsson, Tropp 2011, alg. 4.4) with
    q = r + oversample columns from a start matrix drawn by a seeded CPU generator, and a
    Rayleigh-Ritz step (`_ritz`) after every pass, repeated until `_sine_bound` <= tol: every
    returned u_i, v_i (so also both subspaces) is then within sine tol of the exact SVD's. How many
    passes that takes is decided per matrix by this check, not fixed: a flat top of the spectrum
    (s_2 close to s_3, common in real weights) needs many. Passes run in fp32 until the residuals
    reach fp32 rounding (~1e-7 s_1 sqrt(n)); the pairs are then re-checked in fp64 and, if still
    short of tol, the iteration goes on in fp64. No convergence within max_iter passes:
    the exact SVD, as with exact=True.
    Exact: torch.linalg.svd of W in fp64, truncated, returned in W's dtype; accurate to ~1e-16 s_1
    / gap (fp32 LAPACK's columns are 1e-5 to 5e-5 off in sine on flat spectra: close to tol).

    report: {"method": "randomized" | "exact", "passes": subspace-iteration passes run,
    "sine_bound": `_sine_bound` of the returned factors, "gap": the smallest (s_i - s_{i+1}) / s_1
    for i <= r}. A sine_bound above tol (after the exact fallback) means nearly tied singular
    values: the factors are then the fp64 torch.linalg.svd's, a basis of the (nearly) tied space.

    Signs are fixed so the largest-|.| entry of each U column is positive: the adapter's meaning
    (U S R V^T with a non-diagonal R) depends on them."""
    report = {"method": "exact", "passes": 0}
    if not exact:
        q = min(r + oversample, *W.shape)
        start = torch.randn(W.shape[1], q, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(W)
        # W Z as (Z^T W^T)^T: the same product, but BLAS is ~25% faster on this form for thin Z (and the
        # transposed result is column-major, as LAPACK's QR wants)
        Q = torch.linalg.qr((start.T @ W.T).T).Q  # [m, q] basis of the range of W
        A = W  # the matrix the passes run on: W in fp32, then in fp64 if fp32 rounding is reached
        floor = 10 * torch.finfo(torch.float32).eps * math.sqrt(W.shape[1])  # fp32 rounding is < 10% of residuals above floor * s_1
        for passes in range(1, max_iter + 1):
            U, S, Vh = _ritz(A, Q)  # [m, q], [q], [q, n]
            Y = (Vh @ A.T).T  # [m, q] = A V: gives the residuals, and the next basis of the range of W
            residuals = (Y[:, :r] - U[:, :r] * S[:r]).norm(dim=0)  # W^T u_i - s_i v_i is 0 here (`_ritz`)
            stalled = A.dtype != torch.float64 and residuals.max() <= floor * S[0]  # fp32 rounding dominates them
            bound = _fp64_sine_bound(W, U, S, Vh, r) if stalled else _sine_bound(S, residuals, r, W.shape[1])
            if bound <= tol:
                report = {"method": "randomized", "passes": passes}
                U, S, Vh = U.to(W.dtype), S.to(W.dtype), Vh.to(W.dtype)
                break
            if stalled:  # fp32 cannot get closer: go on in fp64 from here
                A = W.double()
                Y = (Vh.double() @ A.T).T
            Q = torch.linalg.qr(Y).Q
        else:
            exact, report["passes"] = True, max_iter
    if exact:  # in fp64: exact to rounding; fp32 LAPACK was 1e-5 to 5e-5 off in sine (measured, docs/method.md §4)
        U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
        bound = _fp64_sine_bound(W, U, S, Vh, r)
        U, S, Vh = U.to(W.dtype), S.to(W.dtype), Vh.to(W.dtype)
    s = torch.cat([S.double().cpu(), torch.zeros(max(0, r + 1 - len(S)), dtype=torch.float64)])
    report.update(sine_bound=bound, gap=float(((s[:r] - s[1:r + 1]) / s[0]).min()))
    U, S, Vh = U[:, :r], S[:r], Vh[:r]
    sign = U.gather(0, U.abs().argmax(0, keepdim=True)).sign()  # [1, r]
    sign[sign == 0] = 1
    return (U * sign).contiguous(), S.contiguous(), (Vh * sign.T).contiguous(), report  # LAPACK hands back column-major


def svd_factors(targets, config, model_fingerprint, cache_dir=DEFAULT_CACHE_DIR, quiet=False):
    """Fill U, S, V of every target; returns {module name: truncated_svd's report}. Cached in
    `cache_dir`/<key>.safetensors (the reports in its metadata), key = sha256 of the model
    fingerprint, weight dtype, targets, r, the SVD options (method, oversample, tol, max_iter) and
    SVD_VERSION, so factors made with other accuracy settings or by an older algorithm are never
    reused; cache_dir None: no cache. Warns once, naming the modules, when nearly tied singular
    values leave some module's factors short of the tolerance (see truncated_svd)."""
    device, c = targets[0].linear.weight.device, config
    key = hashlib.sha256(json.dumps([model_fingerprint, str(targets[0].linear.weight.dtype), c.targets, c.r, c.svd,
                                     c.svd_oversample, c.svd_tol, c.svd_max_iter, SVD_VERSION]).encode()).hexdigest()[:32]
    path = os.path.join(cache_dir, f"{key}.safetensors") if cache_dir else None
    cached, reports = {}, {}
    if path and os.path.isfile(path):
        try:
            meta, cached = read_safetensors(path, device)
            reports = json.loads(meta.get("reports", "{}"))
        except (OSError, SafetensorError, ValueError) as e:
            print(f"tinylora: ignoring unreadable SVD cache {path} ({e})", file=sys.stderr)
            cached = {}
    problem = _cache_problem(cached, reports, targets, c.r) if cached else "empty"
    if problem is None:
        for t in targets:
            t.U, t.S, t.Vh = (cached[f"{t.name}.{f}"] for f in ("U", "S", "Vh"))
        return {t.name: reports[t.name] for t in targets}
    if cached:
        print(f"tinylora: ignoring the SVD cache {path} ({problem}); recomputing it", file=sys.stderr)
    start = last = time.monotonic()
    for n, t in enumerate(targets, 1):
        if not torch.isfinite(t.linear.weight).all():
            raise AdapterError(f"{t.name}.weight holds NaN or inf values: the checkpoint is damaged; re-download or "
                               "re-convert it")
        t.U, t.S, t.Vh, reports[t.name] = truncated_svd(t.linear.weight.detach().float(), c.r, c.svd == "exact",
                                                       c.svd_oversample, c.svd_tol, c.svd_max_iter, seed=t.index)
        if not quiet and time.monotonic() - last > 2:
            print(f"tinylora: SVD {n}/{len(targets)} modules ({t.name}), {time.monotonic() - start:.0f} s", file=sys.stderr)
            last = time.monotonic()
    reports = {t.name: reports[t.name] for t in targets}
    if not quiet:
        print(f"tinylora: rank-{c.r} SVD of {len(targets)} modules in {time.monotonic() - start:.1f} s: {svd_summary(reports)}"
              + (f"; cached in {path}" if path else ""), file=sys.stderr)
    tied = [name for name, rep in reports.items() if not (rep["sine_bound"] <= c.svd_tol and rep["gap"] >= TIE_GAP)]
    if tied:
        print(f"tinylora: warning: {len(tied)} module(s) have (nearly) tied top singular values, so their rank-{c.r} "
              f"basis is set by rounding rather than by the weights, or could not be certified to sine {c.svd_tol:g}; "
              "their factors are what this machine computes (the same on every run here; another BLAS may pick "
              "another basis of the tied space): "
              + ", ".join(f"{n} (gap {reports[n]['gap']:.1e}, sine bound {reports[n]['sine_bound']:.1e})" for n in tied),
              file=sys.stderr)
    if path:
        try:
            os.makedirs(cache_dir, exist_ok=True)
            _atomic_save({f"{t.name}.{f}": getattr(t, f).cpu() for t in targets for f in ("U", "S", "Vh")}, path,
                         {"reports": json.dumps(reports)})
        except OSError as e:
            print(f"tinylora: could not write the SVD cache {path} ({e}); the next run recomputes it", file=sys.stderr)
    return reports


def _cache_problem(cached, reports, targets, r):
    """What is wrong with cached factors for `targets`, or None: every module's U [out, r], S [r],
    Vh [r, in] present, finite, S descending and >= 0, U and V orthonormal; a report for each."""
    for t in targets:
        out, inp = t.linear.weight.shape
        U, S, Vh = (cached.get(f"{t.name}.{f}") for f in ("U", "S", "Vh"))
        report = reports.get(t.name) if isinstance(reports, dict) else None
        if U is None or S is None or Vh is None or not isinstance(report, dict):
            return f"{t.name} is missing"
        if not {"method", "passes", "sine_bound", "gap"} <= report.keys():
            return f"{t.name}'s report is incomplete"
        if (U.shape, S.shape, Vh.shape) != ((out, r), (r,), (r, inp)):
            return f"{t.name} has the wrong shapes"
        eye = torch.eye(r, device=U.device)
        if not (torch.isfinite(U).all() and torch.isfinite(S).all() and torch.isfinite(Vh).all() and (S >= 0).all()
                and (S[:-1] >= S[1:]).all() and torch.allclose(U.T @ U, eye, atol=1e-4)
                and torch.allclose(Vh @ Vh.T, eye, atol=1e-4)):
            return f"{t.name}'s factors are not a valid SVD (non-finite, unsorted or not orthonormal)"
    return None


def svd_summary(reports):
    """One line about the SVD reports of a model: how the modules were done, the worst sine bound."""
    randomized = [r["passes"] for r in reports.values() if r["method"] == "randomized"]
    passes = sorted(randomized)[len(randomized) // 2] if randomized else 0
    worst = max(r["sine_bound"] for r in reports.values())
    return (f"{len(randomized)} by subspace iteration (median {passes} passes), {len(reports) - len(randomized)} exact; "
            f"every U, V within sine {worst:.1e} of the exact SVD's")


def read_safetensors(path, device="cpu"):
    """(metadata dict, {name: tensor}) of a safetensors file; OSError / SafetensorError propagate."""
    with safe_open(path, "pt", device=str(device)) as f:
        return f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}


def _atomic_save(tensors, path, metadata=None):
    tmp = f"{path}.tmp{os.getpid()}"
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# The adapter


def _generator(seed, index):
    """CPU generator for module `index`: same numbers in every process, on every device."""
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


def _outer_sum(B, A):
    """dW = B @ A [out, in] as r elementwise multiply-adds: bit-identical every time it runs, which
    merge/unmerge rely on (a matmul may pick a different reduction order)."""
    dW = torch.zeros(B.shape[0], A.shape[1], dtype=B.dtype, device=B.device)
    for k in range(B.shape[1]):
        dW.addcmul_(B[:, k, None], A[None, k, :])
    return dW


def _bits(t):
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


class Adapter:
    """Lives beside the model: the trainable tensors, the frozen factors, one forward hook per
    target. Build it with `attach` or `load_adapter`; train `adapter.parameters()`."""

    def __init__(self, config, targets, tensors, base_fingerprint):
        self.config, self.targets, self.tensors = config, targets, tensors  # tensors: {file name: Parameter}
        self.base_fingerprint = base_fingerprint
        self._merged = self._disabled = False
        for t in targets:
            t.linear._tinylora_adapter = self
            if config.method != "full":
                t.hook = t.linear.register_forward_hook(lambda mod, args, out, t=t: self._forward(t, args[0], out))

    @property
    def num_trainable(self):
        return sum(p.numel() for p in self.tensors.values())

    def parameters(self):
        return list(self.tensors.values())

    def factors(self, t, dtype=torch.float32):
        """(A [r, in], C [r, r], B [out, r]) with the module's dW = B @ C @ A, in `dtype`.
        TinyLoRA, LoRA-XS: A = V^T, C = scale diag(S) R, B = U. LoRA: A, C = scale I, B."""
        c = self.config
        if c.method == "lora":
            A, B = self.tensors[f"{t.name}.lora_A"], self.tensors[f"{t.name}.lora_B"]
            return A.to(dtype), c.scale * torch.eye(c.r, dtype=dtype, device=A.device), B.to(dtype)
        if c.method == "tinylora":
            R = torch.einsum("i,irs->rs", self.tensors["v"][t.group].to(dtype), t.P.to(dtype))  # sum_i v_i P_i [r, r]
        else:
            R = self.tensors["R"][t.group].to(dtype)
        return t.Vh.to(dtype), c.scale * t.S.to(dtype)[:, None] * R, t.U.to(dtype)

    def _forward(self, t, x, out):
        """out + x dW^T = out + ((x A^T) C^T) B^T: [.., in] -> [.., r] -> [.., out]. The rank-r part
        in fp32 (fp64 for fp64 x); the last product fused with the addition (addmm in out's dtype)."""
        if self._merged or self._disabled:
            return None
        dtype = torch.promote_types(x.dtype, torch.float32)
        A, C, B = self.factors(t, dtype)
        h = F.linear(F.linear(x.to(dtype), A), C)  # [.., r]
        Bt = B.T.contiguous().to(out.dtype)  # [r, out] row-major: its backward (g @ Bt^T) is ~5x faster than g @ B
        return torch.addmm(out.flatten(0, -2), h.flatten(0, -2).to(out.dtype), Bt).view_as(out)

    @contextlib.contextmanager
    def merged(self):
        """Fold dW into the weights (fast rollouts); restore them bit-for-bit on exit.
        Merge: W_m = round(W + dW) in W's dtype. Unmerge: round(W_m - dW) is W except in a few
        entries where rounding lost information; merge finds those (it still has W) and keeps their
        indices (int32) and original values, so no second copy of the weights is held. The factors
        are snapshotted, so dW is recomputed identically even if the optimizer steps meanwhile.
        No-op for `full` (its weights are the trained ones)."""
        if self._merged or self._disabled:
            raise AdapterError("adapter.merged(): already merged or disabled; leave that context first")
        self._merged = True
        try:
            with torch.no_grad():
                for t in self.targets if self.config.method != "full" else []:
                    W = t.linear.weight
                    acc = torch.promote_types(W.dtype, torch.float32)  # fp32, or fp64 for fp64 weights
                    A, C, B = self.factors(t, acc)
                    A, B = A.detach().clone(), (B @ C).detach()  # dW = B @ A from here on
                    dW = _outer_sum(B, A)
                    merged = (W.to(acc) + dW).to(W.dtype)
                    lost = (_bits((merged.to(acc) - dW).to(W.dtype)) != _bits(W)).view(-1).nonzero()[:, 0]
                    index = lost.to(torch.int32 if W.numel() < 2**31 else torch.int64)
                    t.restore = (A, B, index, W.view(-1)[lost].clone())
                    W.copy_(merged)
            yield self
        finally:
            with torch.no_grad():
                for t in self.targets:
                    if t.restore is not None:
                        A, B, lost, original = t.restore
                        W = t.linear.weight
                        restored = (W.to(B.dtype) - _outer_sum(B, A)).to(W.dtype)
                        restored.view(-1)[lost.long()] = original
                        W.copy_(restored)
                        t.restore = None
            self._merged = False

    @contextlib.contextmanager
    def disabled(self):
        """The base model (the reference policy for KL) with no second copy of the weights."""
        if self.config.method == "full":
            raise AdapterError("adapter.disabled(): method 'full' trains the weights in place, so there is no base "
                               "to switch to; keep a separate reference model")
        if self._merged or self._disabled:
            raise AdapterError("adapter.disabled(): already merged or disabled; leave that context first")
        self._disabled = True
        try:
            yield self
        finally:
            self._disabled = False

    def detach(self):
        """Remove the adapter from the model (the weights are left as they are, frozen)."""
        if self._merged:
            raise AdapterError("adapter.detach(): the adapter is merged; leave adapter.merged() first")
        for t in self.targets:
            if t.hook is not None:
                t.hook.remove()
            del t.linear._tinylora_adapter
            t.linear.weight.requires_grad_(False)


def attach(model, config=None, *, cache_dir=DEFAULT_CACHE_DIR, quiet=False):
    """Attach an adapter to `model` (frozen entirely, except the adapter's tensors).
    Returns (adapter, trainable count); prints the count to stderr unless quiet."""
    config = config or TinyLoRAConfig()
    targets, shapes = plan(model, config)
    if any(hasattr(t.linear, "_tinylora_adapter") for t in find_targets(model)):
        raise AdapterError("this model already has an adapter; call adapter.detach() first")
    model.requires_grad_(False)
    base = fingerprint(model)
    c, device = config, targets[0].linear.weight.device
    svd_reports = svd_factors(targets, c, base, cache_dir, quiet) if c.method in ("tinylora", "lora-xs") else {}
    tensors = {}
    if c.method == "tinylora":
        for t in targets:  # drawn in float64: the vectorised float32 sampler's bits depend on the CPU
            P = torch.randn(c.u, c.r, c.r, generator=_generator(c.seed, t.index), dtype=torch.float64) / math.sqrt(c.r)
            t.P = P.float().to(device)
        tensors["v"] = nn.Parameter(torch.zeros(shapes["v"], dtype=c.dtype, device=device))
    elif c.method == "lora-xs":
        tensors["R"] = nn.Parameter(torch.zeros(shapes["R"], dtype=c.dtype, device=device))
    elif c.method == "lora":
        for t in targets:  # PEFT's init: A kaiming-uniform (bound 1/sqrt(in)), B = 0
            A = torch.empty(shapes[f"{t.name}.lora_A"])
            nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=_generator(c.seed, t.index))
            tensors[f"{t.name}.lora_A"] = nn.Parameter(A.to(device, c.dtype))
            tensors[f"{t.name}.lora_B"] = nn.Parameter(torch.zeros(shapes[f"{t.name}.lora_B"], dtype=c.dtype, device=device))
    else:
        tensors = {f"{t.name}.weight": t.linear.weight.requires_grad_(True) for t in targets}
    adapter = Adapter(config, targets, tensors, base)
    adapter.svd_reports = svd_reports  # {module name: truncated_svd's report}; {} for lora and full
    if not quiet:
        shape = {"tinylora": f" r={c.r} u={c.u} n_tie={c.n_tie} {c.tiling}", "lora-xs": f" r={c.r} n_tie={c.n_tie} {c.tiling}",
                 "lora": f" r={c.r}", "full": ""}[c.method]
        print(f"tinylora: {c.method}{shape} on {len(targets)} modules -> {adapter.num_trainable:,} trainable parameters",
              file=sys.stderr)
    return adapter, adapter.num_trainable


# --------------------------------------------------------------------------------------------
# Files: the adapter, and its PEFT (LoRA) export


def save_adapter(adapter, path, dtype=torch.float32):
    """Write the trainable tensors (in `dtype`) and the metadata that rebuilds the rest, atomically.
    Returns adapter_size(path)."""
    c = adapter.config
    config = {**asdict(c), "dtype": str(c.dtype).removeprefix("torch."), "targets": list(c.targets)}
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": json.dumps(config),
                "base_fingerprint": adapter.base_fingerprint, "num_trainable": str(adapter.num_trainable)}
    if adapter.svd_reports:  # how exact the frozen factors were (per module: the SVD cache's metadata)
        metadata["svd"] = svd_summary(adapter.svd_reports)
        metadata["sign_anchors"] = json.dumps(sign_anchors(adapter))
    _atomic_save({k: p.detach().to(dtype).contiguous().cpu() for k, p in adapter.tensors.items()}, path, metadata)
    return adapter_size(path)


def adapter_size(path):
    """(file bytes, parameter bytes): safetensors is an 8-byte header length, the header, the data."""
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    size = os.path.getsize(path)
    return size, size - 8 - header


def load_adapter(model, path, *, cache_dir=DEFAULT_CACHE_DIR, quiet=False):
    """Attach the adapter saved at `path` to `model` (P and the SVD rebuilt). Refuses, with an
    AdapterError and before touching the model, a different base model or an inconsistent file."""
    try:
        meta, tensors = read_safetensors(path)
    except (OSError, SafetensorError) as e:
        raise AdapterError(f"{path}: not a readable safetensors file ({e})") from None
    if (meta.get("format"), meta.get("format_version")) != (FORMAT, FORMAT_VERSION):
        raise AdapterError(f"{path}: not a {FORMAT} file of version {FORMAT_VERSION} "
                           f"(format={meta.get('format')!r}, version={meta.get('format_version')!r})")
    if '"svd_niter"' in meta.get("config", ""):
        raise AdapterError(f"{path}: made by an older tinylora whose SVD ran 4 fixed passes (svd_niter); this one "
                           "iterates to the exact top-r subspace, so the file's v would mean another update: retrain it")
    try:
        config = TinyLoRAConfig(**json.loads(meta["config"]))
    except (KeyError, TypeError, ValueError) as e:
        raise AdapterError(f"{path}: metadata 'config' is missing or invalid: {e}") from None
    mismatch = fingerprint_mismatch(meta.get("base_fingerprint", ""), fingerprint(model))
    if mismatch:
        raise AdapterError(f"{path}: {mismatch}")
    try:
        shapes = plan(model, config)[1]
    except ValueError as e:
        raise AdapterError(f"{path}: metadata does not fit this model: {e}") from None
    for name in sorted(set(shapes) | set(tensors)):
        found = tuple(tensors[name].shape) if name in tensors else "missing"
        if found != shapes.get(name, "absent"):
            c = config
            raise AdapterError(f"{path}: tensor {name!r} is {found}, the metadata ({c.method}, r={c.r}, u={c.u}, "
                               f"n_tie={c.n_tie}, {c.tiling}) implies {shapes.get(name, 'no such tensor')}")
    for name, t in sorted(tensors.items()):
        if not torch.isfinite(t).all():
            raise AdapterError(f"{path}: tensor {name!r} has non-finite values (NaN or inf); the file is damaged")
    try:
        anchors = json.loads(meta.get("sign_anchors", "[]"))
        rows = {t.name: t.linear.weight.shape[0] for t in find_targets(model, config.targets)}
        if not all(name in rows and 0 <= k < config.r and 0 <= row < rows[name] for name, k, row in anchors):
            raise ValueError("a module, column or row that this model does not have")
    except (TypeError, ValueError) as e:
        raise AdapterError(f"{path}: metadata 'sign_anchors' is invalid ({e}); it should be a JSON list of "
                           "[module name, column, row]") from None
    adapter, _ = attach(model, config, cache_dir=cache_dir, quiet=quiet)
    apply_sign_anchors(adapter, anchors, path)
    with torch.no_grad():
        for name, p in adapter.tensors.items():
            p.copy_(tensors[name])
    return adapter


def apply_sign_anchors(adapter, anchors, source):
    """Give each anchored U column (`sign_anchors`) the sign it had in training: u_k[row] > 0,
    flipping u_k and v_k together (dW is unchanged by the pair; what v means is restored).
    `source` names the file the anchors came from, for the error on an anchor this adapter lacks."""
    targets = {t.name: t for t in adapter.targets}
    for anchor in anchors:
        name, k, row = anchor
        t = targets.get(name)
        if t is None or t.U is None or not (0 <= k < t.U.shape[1] and 0 <= row < t.U.shape[0]):
            raise AdapterError(f"{source}: sign anchor {anchor} names a module, column or row this adapter does not have")
        if t.U[row, k] < 0:
            t.U, t.Vh = t.U.clone(), t.Vh.clone()
            t.U[:, k], t.Vh[k] = -t.U[:, k], -t.Vh[k]


def sign_anchors(adapter):
    """[[module name, column k, row]] for the U columns whose sign another machine could set the
    other way; `save_adapter` stores them and `load_adapter` re-applies them (u_k[row] > 0).
    The sign rule (largest-|.| entry of u_k positive) is decided by one entry; the u_k of two runs
    differ by up to ~2 svd_tol (each is within sine svd_tol of the exact one), so if an entry of
    the other sign is within 4 sqrt(2) max(svd_tol, the module's sine bound) of the largest, the
    rule could flip u_k, and v would mean another update. Its anchor is the row of the largest
    entry: that entry is large, so its sign cannot flip. Usually an empty list."""
    anchors = []
    for t in adapter.targets:
        margin = 4 * math.sqrt(2) * min(max(adapter.config.svd_tol, adapter.svd_reports[t.name]["sine_bound"]), 1.0)
        for k in range(t.U.shape[1]):
            u = t.U[:, k]
            row = int(u.abs().argmax())  # u[row] > 0
            if float((-u).max()) >= float(u[row]) - margin:
                anchors.append([t.name, k, row])
    return anchors


def export_peft(adapter, out_dir, dtype=torch.float32, base_model_name_or_path=None):
    """Write the adapter as a standard rank-r LoRA in PEFT's layout: adapter_config.json and
    adapter_model.safetensors with base_model.model.<module>.lora_A.weight [r, in] = A and
    .lora_B.weight [out, r] = B C, where dW = B C A exactly (`Adapter.factors`); lora_alpha = r,
    so PEFT's scaling alpha / r is 1."""
    c = adapter.config
    if c.method == "full":
        raise AdapterError("export_peft: method 'full' is not low-rank; save it with save_adapter instead")
    tensors = {}
    with torch.no_grad():
        for t in adapter.targets:
            A, C, B = adapter.factors(t)
            tensors[f"base_model.model.{t.name}.lora_A.weight"] = A.to(dtype).contiguous().cpu()
            tensors[f"base_model.model.{t.name}.lora_B.weight"] = (B @ C).to(dtype).contiguous().cpu()
    peft_config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": c.r, "lora_alpha": c.r,
                   "target_modules": list(c.targets), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
                   "use_rslora": False, "inference_mode": True, "base_model_name_or_path": base_model_name_or_path}
    os.makedirs(out_dir, exist_ok=True)
    _atomic_save(tensors, os.path.join(out_dir, "adapter_model.safetensors"))
    tmp = os.path.join(out_dir, f"adapter_config.json.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(peft_config, f, indent=2)
    os.replace(tmp, os.path.join(out_dir, "adapter_config.json"))


# --------------------------------------------------------------------------------------------
# Parameter counts for Qwen2.5, Llama 3.x and Qwen3: `python tinylora.py`


def _shapes(vocab, family, **models):
    """{name: ModelConfig} from (layers, hidden, MLP, query heads, kv heads, head_dim) per model, as
    in the models' config.json files."""
    return {name: ModelConfig(vocab_size=vocab, hidden_size=D, intermediate_size=I, num_hidden_layers=L,
                              num_attention_heads=H, num_key_value_heads=KV, head_dim=hd, model_type=family,
                              attention_bias=family == "qwen2", qk_norm=family == "qwen3")
            for name, (L, D, I, H, KV, hd) in models.items()}


QWEN25 = _shapes(151936, "qwen2", **{"0.5B": (24, 896, 4864, 14, 2, 64), "1.5B": (28, 1536, 8960, 12, 2, 128),
                                     "3B": (36, 2048, 11008, 16, 2, 128), "7B": (28, 3584, 18944, 28, 4, 128)})
LLAMA3 = _shapes(128256, "llama", **{"3.2-1B": (16, 2048, 8192, 32, 8, 64), "3.2-3B": (28, 3072, 8192, 24, 8, 128),
                                     "3.1-8B": (32, 4096, 14336, 32, 8, 128)})
QWEN3 = _shapes(151936, "qwen3", **{"0.6B": (28, 1024, 3072, 16, 8, 128), "1.7B": (28, 2048, 6144, 16, 8, 128),
                                    "4B": (36, 2560, 9728, 32, 8, 128), "8B": (36, 4096, 12288, 32, 8, 128)})
MODELS = {**{f"Qwen2.5-{k}": v for k, v in QWEN25.items()}, **{f"Llama-{k}": v for k, v in LLAMA3.items()},
          **{f"Qwen3-{k}": v for k, v in QWEN3.items()}}

PAPER_SETTINGS = {"TinyLoRA u=1 n_tie=16": TinyLoRAConfig(n_tie=16), "TinyLoRA u=1 n_tie=4": TinyLoRAConfig(n_tie=4),
                  "TinyLoRA u=1 n_tie=1": TinyLoRAConfig(), "TinyLoRA u=2 n_tie=1": TinyLoRAConfig(u=2),
                  "LoRA-XS r=2": TinyLoRAConfig(method="lora-xs"), "LoRA r=1": TinyLoRAConfig(method="lora", r=1)}


def parameter_table(budget=13):
    """Markdown table of trainable counts per model (rows) and setting (columns), computed by
    `count_trainable` on meta-device models, and the TinyLoRA setting with u = 1 closest to
    `budget` parameters (`tie_choices`: the least tying that fits; the paper's 13 on Qwen2.5-7B)."""
    lines = ["| model | layers | modules | " + " | ".join(PAPER_SETTINGS) + f" | ~{budget} parameters: u, n_tie -> count |",
             "|---|---:|---:|" + "---:|" * len(PAPER_SETTINGS) + "---|"]
    for name, cfg in MODELS.items():
        with torch.device("meta"):
            model = Transformer(cfg)
        u, n_tie, count = tie_choices(model, budget)[0]
        counts = " | ".join(f"{count_trainable(model, config):,}" for config in PAPER_SETTINGS.values())
        lines.append(f"| {name} | {cfg.num_hidden_layers} | {7 * cfg.num_hidden_layers} | {counts} | "
                     f"u={u}, n_tie={n_tie} -> {count} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(parameter_table())
