"""TinyLoRA, LoRA-XS, LoRA and full fine-tuning on one interface: the parameterizations of
"Learning to Reason in 13 Parameters" (arXiv:2602.04118), method section and ablations, as forward
hooks on a model.Transformer. Shapes, equations and measurements: docs/method.md."""

import contextlib
import hashlib
import json
import math
import os
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError

from model import Transformer
from svd import atomic_save, read_safetensors, svd_factors, svd_summary

# --------------------------------------------------------------------------------------------
# The method: every target weight W [out, in] becomes W + dW. U [out, r], S [r], V [in, r]: the
# rank-r truncated SVD of W (frozen, fp32; kept as Vh = V^T [r, in]). P [u, r, r]: fixed random, one
# per module. v, R and B start at 0, so the adapted model is the base model at step 0; n_tie modules
# share one v (or R); "full" trains W itself. Scale, nothing hidden in an alpha: P ~ N(0, 1/r) as in
# PEFT's `tinylora`, whose sqrt(S) on both sides of R, (U sqrt(S)) R (sqrt(S) V^T), is another R-space
# (its v are not ours). The authors' code draws P ~ N(0, 1), multiplies R by alpha/r / sqrt(u) =
# 16 / sqrt(u) and starts v at ~1e-5 noise: with r = 2 their dW is ours with scale = 16 sqrt(2) /
# sqrt(u), so the same v moves the weights 22.6x / sqrt(u) more; transfer learning rates
# accordingly, or set `scale` to match them.


def update_factors(method, scale, trained, U=None, S=None, Vh=None, P=None):
    """One module's dW = B @ C @ A as (B [out, r], C [r, r], A [r, in]), in the formula's order. dW is
    not formed here: the forward hook computes ((x A^T) C^T) B^T, the merge B C A, the export B C and A."""
    if method == "tinylora":  # dW = scale U diag(S) (sum_i v_i P_i) V^T
        v = trained  # [u]
        return U, scale * S[:, None] * torch.einsum("i,irs->rs", v, P), Vh
    if method == "lora-xs":  # dW = scale U diag(S) R V^T
        R = trained  # [r, r]
        return U, scale * S[:, None] * R, Vh
    B, A = trained  # lora: dW = scale B A
    return B, scale * torch.eye(A.shape[0], dtype=A.dtype, device=A.device), A


def projections(seed, index, u, r):
    """P [u, r, r] ~ N(0, 1/r) of module `index`, the same in every process and on every device: from a CPU
    generator seeded by (seed, index); in float64, as the vectorised float32 sampler's bits depend on the CPU."""
    return (torch.randn(u, r, r, generator=_generator(seed, index), dtype=torch.float64) / math.sqrt(r)).float()


def _generator(seed, index):
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


# --------------------------------------------------------------------------------------------
# Settings

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # depth order in a layer
PARENT = dict.fromkeys(TARGETS[:4], "self_attn") | dict.fromkeys(TARGETS[4:], "mlp")  # the submodule holding each
METHODS = ("tinylora", "lora-xs", "lora", "full")
TILINGS = ("tiled", "structured")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "tinylora", "svd")
FORMAT, FORMAT_VERSION = "tinylora-adapter", "1"


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

        for key, choices in (("method", METHODS), ("tiling", TILINGS), ("svd", ("randomized", "exact"))):
            if getattr(self, key) not in choices:
                bad(key, f"unknown {key}; use one of {', '.join(choices)}")
        self.dtype = DTYPES.get(self.dtype, self.dtype) if isinstance(self.dtype, str) else self.dtype
        if self.dtype not in DTYPES.values():
            bad("dtype", f"unsupported; use one of torch.{', torch.'.join(DTYPES)}")
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        if not targets or not all(t in TARGETS for t in targets) or len(set(targets)) != len(targets):
            bad("targets", f"use distinct names from {', '.join(TARGETS)}")
        self.targets = tuple(t for t in TARGETS if t in targets)  # canonical (depth) order
        for key, least in (("r", 1), ("u", 1), ("n_tie", 1), ("seed", 0), ("svd_oversample", 0), ("svd_max_iter", 0)):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < least:
                bad(key, f"must be an integer >= {least}")
        if self.u != 1 and self.method != "tinylora":
            bad("u", f"only tinylora has a v of length u; use u=1 with method {self.method!r}")
        if self.n_tie != 1 and self.method in ("lora", "full"):
            bad("n_tie", f"tying applies to tinylora and lora-xs only; use n_tie=1 with method {self.method!r}")
        if self.svd_max_iter > 1000:  # the exact SVD is cheaper long before that
            bad("svd_max_iter", "must be at most 1000")
        if not (isinstance(self.svd_tol, (int, float)) and 0 < self.svd_tol < 1):
            bad("svd_tol", "must be a number in (0, 1), e.g. 1e-4")
        if not math.isfinite(self.scale):
            bad("scale", "must be a finite number")


# --------------------------------------------------------------------------------------------
# Targets and tying: which modules, which share their trained numbers, how many parameters


@dataclass
class Target:
    name: str  # "model.layers.3.mlp.up_proj", as in the checkpoint
    linear: nn.Linear
    index: int  # 7 * layer + position of the type in TARGETS: seeds P and the SVD, whatever the other targets
    kind: str  # "up_proj"
    group: int = 0  # tie group (tinylora, lora-xs); own index in the target list (lora, full)
    U: torch.Tensor = None  # [out, r] fp32, frozen (tinylora, lora-xs)
    S: torch.Tensor = None  # [r]
    Vh: torch.Tensor = None  # [r, in] = V^T
    P: torch.Tensor = None  # [u, r, r] (tinylora)
    restore: tuple = None  # while merged: (B C, A, flat indices of the entries unmerge misses, their values)


def tie_groups(kinds, n_tie, tiling):
    """kinds: the module type of each target in depth order -> its tie group. tiled: consecutive
    chunks of n_tie, any types (ceil(N / n_tie) groups); structured: chunks of n_tie of each type in
    depth order, a type's groups numbered after the previous type's (sum_t ceil(N_t / n_tie))."""
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
    """The targets of `model` (with tie groups) and the trainable tensors' shapes {file name: shape}.
    Checks what depends on the model: n_tie <= N, r <= min(out, in)."""
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
        return targets, {"v": (G, c.u)}  # v of group g is row g
    if c.method == "lora-xs":
        return targets, {"R": (G, c.r, c.r)}
    if c.method == "lora":
        return targets, {f"{t.name}.{side}": shape for t in targets for side, shape in
                         (("lora_A", (c.r, t.linear.in_features)), ("lora_B", (t.linear.out_features, c.r)))}
    return targets, {f"{t.name}.weight": tuple(t.linear.weight.shape) for t in targets}


def count_trainable(model, config):
    """Exact trainable count; works on a meta-device model (no memory): see param_counts.py."""
    return sum(math.prod(s) for s in plan(model, config)[1].values())


def tie_choices(layers, budget, targets=TARGETS, tiling="tiled", max_u=16):
    """(u, n_tie, count) per u = 1..max_u: the least tying whose TinyLoRA count fits the budget.
    layers: a model or a layer count. Qwen2.5-7B (28 layers, 7 targets), budget 13 -> (1, 16, 13)."""
    layers = layers if isinstance(layers, int) else len(layers.model.layers)
    kinds = [k for _ in range(layers) for k in targets]
    n_groups = {n: max(tie_groups(kinds, n, tiling)) + 1 for n in range(1, len(kinds) + 1)}
    least = {u: next((n for n in n_groups if u * n_groups[n] <= budget), None) for u in range(1, max_u + 1)}
    return [(u, n, u * n_groups[n]) for u, n in least.items() if n is not None]


# --------------------------------------------------------------------------------------------
# The adapter: dW added by a forward hook (training), merged into the weights (rollouts), or
# switched off (the reference policy)


def _outer_sum(B, A):
    """B @ A [out, in] as r elementwise multiply-adds: bit-identical every time it runs, which
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

    def __init__(self, config, targets, tensors, base_fingerprint, svd_reports=None):
        self.config, self.targets, self.tensors = config, targets, tensors  # tensors: {file name: Parameter}
        self.base_fingerprint = base_fingerprint
        self.svd_reports = svd_reports or {}  # {module name: truncated_svd's report}; {} for lora and full
        self._merged = self._disabled = False
        self._hooks = [t.linear.register_forward_hook(lambda mod, args, out, t=t: self._forward(t, args[0], out))
                       for t in targets if config.method != "full"]
        for t in targets:
            t.linear._tinylora_adapter = self

    @property
    def num_trainable(self):
        return sum(p.numel() for p in self.tensors.values())

    def parameters(self):
        return list(self.tensors.values())

    def factors(self, t, dtype=torch.float32):
        """`update_factors` of target t in `dtype`: (B [out, r], C [r, r], A [r, in]), dW = B @ C @ A."""
        c, T = self.config, self.tensors
        if c.method == "lora":
            return update_factors(c.method, c.scale, (T[f"{t.name}.lora_B"].to(dtype), T[f"{t.name}.lora_A"].to(dtype)))
        trained = T["v" if c.method == "tinylora" else "R"][t.group].to(dtype)
        P = t.P.to(dtype) if c.method == "tinylora" else None
        return update_factors(c.method, c.scale, trained, t.U.to(dtype), t.S.to(dtype), t.Vh.to(dtype), P)

    def _forward(self, t, x, out):
        """out + x dW^T = out + ((x A^T) C^T) B^T: [.., in] -> [.., r] -> [.., out]. The rank-r part
        in fp32 (fp64 for fp64 x); the last product fused with the addition (addmm in out's dtype)."""
        if self._merged or self._disabled:
            return None
        dtype = torch.promote_types(x.dtype, torch.float32)
        B, C, A = self.factors(t, dtype)
        h = F.linear(F.linear(x.to(dtype), A), C)  # [.., r]
        Bt = B.T.contiguous().to(out.dtype)  # [r, out] row-major: its backward (g @ Bt^T) is ~5x faster than g @ B
        return torch.addmm(out.flatten(0, -2), h.flatten(0, -2).to(out.dtype), Bt).view_as(out)

    @contextlib.contextmanager
    def merged(self):
        """Fold dW into the weights (fast rollouts); restore them bit-for-bit on exit. round(W_m - dW) is W
        but for a few entries where rounding lost information: merge finds them (it still has W) and keeps
        their indices and values, not a copy of the weights. The factors are snapshotted, so dW is the
        same even if the optimizer steps meanwhile. No-op for `full`."""
        if self._merged or self._disabled:
            raise AdapterError("adapter.merged(): already merged or disabled; leave that context first")
        self._merged = True
        try:
            with torch.no_grad():
                for t in self.targets if self.config.method != "full" else []:
                    W = t.linear.weight
                    acc = torch.promote_types(W.dtype, torch.float32)  # fp32, or fp64 for fp64 weights
                    B, C, A = self.factors(t, acc)
                    BC, A = (B @ C).detach(), A.detach().clone()  # dW = BC @ A from here on
                    dW = _outer_sum(BC, A)
                    merged = (W.to(acc) + dW).to(W.dtype)
                    lost = (_bits((merged.to(acc) - dW).to(W.dtype)) != _bits(W)).view(-1).nonzero()[:, 0]
                    index = lost.to(torch.int32 if W.numel() < 2**31 else torch.int64)
                    t.restore = (BC, A, index, W.view(-1)[lost].clone())
                    W.copy_(merged)
            yield self
        finally:
            with torch.no_grad():
                for t in [t for t in self.targets if t.restore is not None]:
                    (BC, A, lost, original), W = t.restore, t.linear.weight
                    restored = (W.to(BC.dtype) - _outer_sum(BC, A)).to(W.dtype)
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
        for hook in self._hooks:
            hook.remove()
        for t in self.targets:
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
    svd_reports = {}
    if c.method in ("tinylora", "lora-xs"):
        for t in targets:
            if not torch.isfinite(t.linear.weight).all():
                raise AdapterError(f"{t.name}.weight holds NaN or inf values: the checkpoint is damaged; re-download or "
                                   "re-convert it")
        svd_reports = svd_factors(targets, c, base, cache_dir, quiet)
    if c.method == "full":
        tensors = {f"{t.name}.weight": t.linear.weight.requires_grad_(True) for t in targets}
    else:  # v, R, LoRA's B: zero
        tensors = {name: nn.Parameter(torch.zeros(shape, dtype=c.dtype, device=device)) for name, shape in shapes.items()}
    for t in targets if c.method == "tinylora" else []:
        t.P = projections(c.seed, t.index, c.u, c.r).to(device)
    for t in targets if c.method == "lora" else []:  # PEFT's init: A kaiming-uniform (bound 1/sqrt(in)), B = 0
        A = torch.empty(shapes[f"{t.name}.lora_A"])
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=_generator(c.seed, t.index))
        tensors[f"{t.name}.lora_A"] = nn.Parameter(A.to(device, c.dtype))
    adapter = Adapter(config, targets, tensors, base, svd_reports)
    if not quiet:
        shape = {"tinylora": f" r={c.r} u={c.u} n_tie={c.n_tie} {c.tiling}", "lora-xs": f" r={c.r} n_tie={c.n_tie} {c.tiling}",
                 "lora": f" r={c.r}", "full": ""}[c.method]
        print(f"tinylora: {c.method}{shape} on {len(targets)} modules -> {adapter.num_trainable:,} trainable parameters",
              file=sys.stderr)
    return adapter, adapter.num_trainable


# --------------------------------------------------------------------------------------------
# The base model's fingerprint: an adapter belongs to one base model


def fingerprint(model, samples=4096):
    """What the model computes, nothing else: "architecture=... model.embed_tokens=... model.layers=...
    model.norm=... lm_head=...", 8 hex digits of sha256 each, so `fingerprint_mismatch` can say which
    part differs. architecture: the ModelConfig fields but dtype and max_position_embeddings (editing
    those keeps an adapter usable). Weights: per parameter its name, shape and up to `samples`
    entries strided over rows and columns, rounded to bf16 so fp32 and bf16 loads agree (1.4M entries
    for 7B: cheap). It tells checkpoints apart; it is not a checksum."""
    computes = {k: v for k, v in asdict(model.config).items()
                if k not in ("dtype", "max_position_embeddings")}
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
    """Why an adapter made on the base model `saved` (its file's base_fingerprint) does not belong to the
    model `current`, in words; None when the two fingerprints are the same."""
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


# --------------------------------------------------------------------------------------------
# Files: the adapter (its trained tensors and the metadata that rebuilds the rest), the PEFT export


def save_adapter(adapter, path, dtype=torch.float32):
    """Write the trainable tensors (in `dtype`) and the metadata, atomically. Returns adapter_size(path)."""
    c = adapter.config
    config = {**asdict(c), "dtype": str(c.dtype).removeprefix("torch."), "targets": list(c.targets)}
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": json.dumps(config),
                "base_fingerprint": adapter.base_fingerprint, "num_trainable": str(adapter.num_trainable)}
    if adapter.svd_reports:  # how exact the frozen factors were (per module: the SVD cache's metadata)
        metadata["svd"] = svd_summary(adapter.svd_reports)
        metadata["sign_anchors"] = json.dumps(sign_anchors(adapter))
    atomic_save({k: p.detach().to(dtype).contiguous().cpu() for k, p in adapter.tensors.items()}, path, metadata)
    return adapter_size(path)


def adapter_size(path):
    """(file bytes, parameter bytes): safetensors is an 8-byte header length, the header, the data."""
    with open(path, "rb") as f:
        size, header = os.path.getsize(path), int.from_bytes(f.read(8), "little")
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
        c = TinyLoRAConfig(**json.loads(meta["config"]))
    except (KeyError, TypeError, ValueError) as e:
        raise AdapterError(f"{path}: metadata 'config' is missing or invalid: {e}") from None
    if mismatch := fingerprint_mismatch(meta.get("base_fingerprint", ""), fingerprint(model)):
        raise AdapterError(f"{path}: {mismatch}")
    try:
        targets, shapes = plan(model, c)
    except ValueError as e:
        raise AdapterError(f"{path}: metadata does not fit this model: {e}") from None
    for name in sorted(set(shapes) | set(tensors)):
        found = tuple(tensors[name].shape) if name in tensors else "missing"
        if found != shapes.get(name, "absent"):
            raise AdapterError(f"{path}: tensor {name!r} is {found}, the metadata ({c.method}, r={c.r}, u={c.u}, "
                               f"n_tie={c.n_tie}, {c.tiling}) implies {shapes.get(name, 'no such tensor')}")
    if damaged := [name for name, t in sorted(tensors.items()) if not torch.isfinite(t).all()]:
        raise AdapterError(f"{path}: tensor {damaged[0]!r} has non-finite values (NaN or inf); the file is damaged")
    try:
        anchors, rows = json.loads(meta.get("sign_anchors", "[]")), {t.name: t.linear.weight.shape[0] for t in targets}
        if not all(name in rows and 0 <= k < c.r and 0 <= row < rows[name] for name, k, row in anchors):
            raise ValueError("a module, column or row that this model does not have")
    except (TypeError, ValueError) as e:
        raise AdapterError(f"{path}: metadata 'sign_anchors' is invalid ({e}); it should be a JSON list of "
                           "[module name, column, row]") from None
    adapter, _ = attach(model, c, cache_dir=cache_dir, quiet=quiet)
    apply_sign_anchors(adapter, anchors, path)
    with torch.no_grad():
        for name, p in adapter.tensors.items():
            p.copy_(tensors[name])
    return adapter


def sign_anchors(adapter):
    """[[module name, column k, row]] for the U columns whose sign another machine could set the other
    way (then v would mean another update); `load_adapter` re-applies them (u_k[row] > 0). The u_k of two
    runs differ by up to ~2 svd_tol, so the sign rule can flip when an entry of the other sign is within
    4 sqrt(2) max(svd_tol, sine bound) of the largest; the largest entry's row cannot flip: the anchor."""
    anchors = []
    for t in adapter.targets:
        margin = 4 * math.sqrt(2) * min(max(adapter.config.svd_tol, adapter.svd_reports[t.name]["sine_bound"]), 1.0)
        for k in range(t.U.shape[1]):
            u = t.U[:, k]
            row = int(u.abs().argmax())  # u[row] > 0
            if float((-u).max()) >= float(u[row]) - margin:
                anchors.append([t.name, k, row])
    return anchors


def apply_sign_anchors(adapter, anchors, source):
    """Give each anchored U column its sign from training, u_k[row] > 0, flipping u_k and v_k together
    (dW is unchanged; what v means is restored). `source`: the anchors' file, for the error."""
    targets = {t.name: t for t in adapter.targets}
    for anchor in anchors:
        name, k, row = anchor
        t = targets.get(name)
        if t is None or t.U is None or not (0 <= k < t.U.shape[1] and 0 <= row < t.U.shape[0]):
            raise AdapterError(f"{source}: sign anchor {anchor} names a module, column or row this adapter does not have")
        if t.U[row, k] < 0:
            t.U, t.Vh = t.U.clone(), t.Vh.clone()
            t.U[:, k], t.Vh[k] = -t.U[:, k], -t.Vh[k]


def export_peft(adapter, out_dir, dtype=torch.float32, base_model_name_or_path=None):
    """Write the adapter as the exact rank-r LoRA in PEFT's layout: lora_B.weight [out, r] = B C and
    lora_A.weight [r, in] = A of `Adapter.factors`; lora_alpha = r, so PEFT's scaling alpha / r is 1."""
    c = adapter.config
    if c.method == "full":
        raise AdapterError("export_peft: method 'full' is not low-rank; save it with save_adapter instead")
    tensors = {}
    with torch.no_grad():
        for t in adapter.targets:
            B, C, A = adapter.factors(t)
            tensors[f"base_model.model.{t.name}.lora_A.weight"] = A.to(dtype).contiguous().cpu()
            tensors[f"base_model.model.{t.name}.lora_B.weight"] = (B @ C).to(dtype).contiguous().cpu()
    peft_config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": c.r, "lora_alpha": c.r,
                   "target_modules": list(c.targets), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
                   "use_rslora": False, "inference_mode": True, "base_model_name_or_path": base_model_name_or_path}
    os.makedirs(out_dir, exist_ok=True)
    atomic_save(tensors, os.path.join(out_dir, "adapter_model.safetensors"))
    tmp = os.path.join(out_dir, f"adapter_config.json.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(peft_config, f, indent=2)
    os.replace(tmp, os.path.join(out_dir, "adapter_config.json"))
