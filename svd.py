"""The frozen factors U, S, V of every TinyLoRA module: a certified rank-r truncated SVD
(`truncated_svd`), computed for every target and cached on disk (`svd_factors`).

The paper's adapter lives in the top-r singular subspaces of each weight, so the factors must be
that subspace, not an approximation of W that merely reconstructs it well: on real weights the top
of the spectrum is often nearly flat (s_3 / s_2 up to 0.997 in Qwen2.5), where a few fixed passes of
a randomized SVD return a basis decided by the random start. `truncated_svd` iterates until a
Davis-Kahan bound certifies every column within sine `tol` of the exact SVD's (docs/method.md §4).
"""

import hashlib
import json
import math
import os
import sys
import time

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file


def _ritz(W, Q):
    """Rayleigh-Ritz on an orthonormal basis Q [m, q] of (nearly) the top range of W -> U [m, q], S, Vh
    [q, n] with W^T u_i = s_i v_i exactly; how far W v_i is from s_i u_i says how far from a true pair."""
    Ub, S, Vh = torch.linalg.svd(Q.T @ W, full_matrices=False)
    return Q @ Ub, S, Vh


def _sine_bound(S, residuals, r, n):
    """Bound on the sine between computed and true singular pairs i <= r of W [m, n], and so the U and V
    subspaces (Davis-Kahan on [[0, W], [W^T, 0]]), from the residuals ||(W v_i - s_i u_i, W^T u_i - s_i v_i)||
    [r] and the computed values S [>= r]: max_i residual_i / (min(s_{i-1} - s_i, s_i - s_{i+1}) - slack),
    s_0 = inf, slack = 2 max residual + eps sqrt(n) s_1 (what the values may be off by); inf when a gap
    is within the slack: nearly tied values, whose basis is not determined."""
    s = torch.cat([torch.tensor([math.inf], dtype=torch.float64), S.double().cpu(),
                   torch.zeros(max(0, r + 1 - len(S)), dtype=torch.float64)])
    residuals = residuals.double().cpu()
    slack = 2 * residuals.max() + torch.finfo(S.dtype).eps * math.sqrt(n) * s[1]
    gaps = torch.minimum(s[:r] - s[1:r + 1], s[1:r + 1] - s[2:r + 2]) - slack  # [r]
    return (residuals / gaps).where(gaps > 0, math.inf).max().item()


def _fp64_sine_bound(W, U, S, Vh, r):
    """`_sine_bound` of the top-r pairs, residuals in fp64 (trustworthy to ~1e-16 s_1; fp32: ~1e-7 s_1 sqrt(n))."""
    W, U, s, Vh = W.double(), U[:, :r].double(), S[:r].double(), Vh[:r].double()
    residuals = ((W @ Vh.T - U * s).square().sum(0) + (U.T @ W - s[:, None] * Vh).square().sum(1)).sqrt()
    return _sine_bound(S, residuals, r, W.shape[1])


def truncated_svd(W, r, exact=False, oversample=16, tol=1e-4, max_iter=100, seed=0):
    """Top-r SVD of W [m, n] (fp32) -> (U [m, r], S [r], Vh [r, n], report), W ~ U diag(S) Vh. Randomized:
    subspace iteration (Halko, Martinsson, Tropp 2011, alg. 4.4) on r + oversample columns with a
    Rayleigh-Ritz step per pass, until `_sine_bound` <= tol certifies every u_i, v_i within sine tol of
    the exact SVD's (a flat top of the spectrum, common in real weights, needs many passes); in fp64
    once fp32 rounding is reached; after max_iter passes, or with exact=True, torch.linalg.svd in fp64.
    report: method, passes, sine_bound, gap = min (s_i - s_{i+1}) / s_1 over i <= r (a sine_bound above
    tol after the exact SVD: nearly tied values). Signs: the largest-|.| entry of each U column is
    positive, as the adapter's meaning (U S R V^T with a non-diagonal R) depends on them."""
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


def svd_summary(reports):
    """One line about the SVD reports of a model: how the modules were done, the worst sine bound."""
    randomized = [r["passes"] for r in reports.values() if r["method"] == "randomized"]
    passes = sorted(randomized)[len(randomized) // 2] if randomized else 0
    worst = max(r["sine_bound"] for r in reports.values())
    return (f"{len(randomized)} by subspace iteration (median {passes} passes), {len(reports) - len(randomized)} exact; "
            f"every U, V within sine {worst:.1e} of the exact SVD's")


# --------------------------------------------------------------------------------------------
# The frozen factors: a certified rank-r truncated SVD of every target, cached on disk

TIE_GAP = 1e-6  # (s_i - s_{i+1}) / s_1 below this, i <= r: "tied", warned about (svd_factors)
SVD_VERSION = "3"  # the truncated SVD algorithm, in the cache key (3: exact in fp64; 2: iterate to a sine bound; 1: 4 fixed passes)


def svd_factors(targets, config, model_fingerprint, cache_dir, quiet=False):
    """Fill U, S, Vh of every target -> {module name: truncated_svd's report}. Cached (cache_dir None: not)
    under a key of all the factors depend on, SVD settings and SVD_VERSION included. Warns once, naming
    the modules, when nearly tied singular values leave factors short of the tolerance."""
    device, c = targets[0].linear.weight.device, config
    key = hashlib.sha256(json.dumps([model_fingerprint, str(targets[0].linear.weight.dtype), c.targets, c.r, c.svd,
                                     c.svd_oversample, c.svd_tol, c.svd_max_iter, SVD_VERSION]).encode()).hexdigest()[:32]
    path = os.path.join(cache_dir, f"{key}.safetensors") if cache_dir else None
    if path and os.path.isfile(path):
        try:
            meta, cached = read_safetensors(path, device)
            reports = json.loads(meta.get("reports", "{}"))
            problem = _cache_problem(cached, reports, targets, c.r)
        except (OSError, SafetensorError, ValueError) as e:
            problem = f"unreadable: {e}"
        if problem is None:
            for t in targets:
                t.U, t.S, t.Vh = (cached[f"{t.name}.{f}"] for f in ("U", "S", "Vh"))
            return {t.name: reports[t.name] for t in targets}
        print(f"tinylora: ignoring the SVD cache {path} ({problem}); recomputing it", file=sys.stderr)
    reports, start = {}, time.monotonic()
    last = start
    for n, t in enumerate(targets, 1):
        t.U, t.S, t.Vh, reports[t.name] = truncated_svd(t.linear.weight.detach().float(), c.r, c.svd == "exact",
                                                       c.svd_oversample, c.svd_tol, c.svd_max_iter, seed=t.index)
        if not quiet and time.monotonic() - last > 2:
            print(f"tinylora: SVD {n}/{len(targets)} modules ({t.name}), {time.monotonic() - start:.0f} s", file=sys.stderr)
            last = time.monotonic()
    if not quiet:
        print(f"tinylora: rank-{c.r} SVD of {len(targets)} modules in {time.monotonic() - start:.1f} s: {svd_summary(reports)}"
              + (f"; cached in {path}" if path else ""), file=sys.stderr)
    if tied := [name for name, rep in reports.items() if not (rep["sine_bound"] <= c.svd_tol and rep["gap"] >= TIE_GAP)]:
        print(f"tinylora: warning: {len(tied)} module(s) have (nearly) tied top singular values, so their rank-{c.r} basis "
              f"is set by rounding, not by the weights, or is not certified to sine {c.svd_tol:g}; their factors are what "
              "this machine computes (the same on every run here; another BLAS may pick another basis): "
              + ", ".join(f"{n} (gap {reports[n]['gap']:.1e}, sine bound {reports[n]['sine_bound']:.1e})" for n in tied),
              file=sys.stderr)
    if path:
        try:
            os.makedirs(cache_dir, exist_ok=True)
            atomic_save({f"{t.name}.{f}": getattr(t, f).cpu() for t in targets for f in ("U", "S", "Vh")}, path,
                         {"reports": json.dumps(reports)})
        except OSError as e:
            print(f"tinylora: could not write the SVD cache {path} ({e}); the next run recomputes it", file=sys.stderr)
    return reports


def _cache_problem(cached, reports, targets, r):
    """What is wrong with cached factors, or None: each module's U, S, Vh and report present, a valid SVD."""
    for t in targets:
        U, S, Vh = (cached.get(f"{t.name}.{f}") for f in ("U", "S", "Vh"))
        report = reports.get(t.name) if isinstance(reports, dict) else None
        if U is None or S is None or Vh is None or not isinstance(report, dict):
            return f"{t.name} is missing"
        if not {"method", "passes", "sine_bound", "gap"} <= report.keys():
            return f"{t.name}'s report is incomplete"
        if (U.shape, S.shape, Vh.shape) != ((t.linear.weight.shape[0], r), (r,), (r, t.linear.weight.shape[1])):
            return f"{t.name} has the wrong shapes"
        eye = torch.eye(r, device=U.device)
        if not (all(torch.isfinite(x).all() for x in (U, S, Vh)) and (S >= 0).all() and (S[:-1] >= S[1:]).all()
                and torch.allclose(U.T @ U, eye, atol=1e-4) and torch.allclose(Vh @ Vh.T, eye, atol=1e-4)):
            return f"{t.name}'s factors are not a valid SVD (non-finite, unsorted or not orthonormal)"
    return None


def read_safetensors(path, device="cpu"):
    """(metadata dict, {name: tensor}) of a safetensors file; OSError / SafetensorError propagate."""
    with safe_open(path, "pt", device=str(device)) as f:
        return f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}


def atomic_save(tensors, path, metadata=None):
    tmp = f"{path}.tmp{os.getpid()}"  # renamed when complete: no reader sees half a file
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)
