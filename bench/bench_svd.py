"""How long TinyLoRA takes to initialise, how exact its frozen SVD factors are, and what the
adapter costs afterwards.

    .venv/bin/python bench/bench_svd.py          (about 8 minutes on 2 CPU cores)

1. Qwen2.5-0.5B shape (24 layers x 7 targets = 168 modules): `attach` with the default SVD
   (subspace iteration until every U, V column is within sine 1e-4 of the exact SVD's: fingerprint
   + SVD + P), against the exact SVD, torch.linalg.svd in fp64 (tinylora's exact path, the
   accuracy reference) and in fp32 (faster, but not within 1e-4 on flat spectra: its error is
   printed), measured on layers 0 and 12 and extrapolated x12. Accuracy against the fp64 SVD: the
   largest principal-angle sine of U and of V (each column, and the 2-dimensional subspaces) and
   the relative difference of dW = U diag(S) R V^T for one fixed random R.
2. The cached second run on the 0.5B shape.
3. A training step (forward + backward, fp32) with and without the adapter.
4. merge/unmerge on the 0.5B shape in bf16: time, and the memory the exact restore keeps.
5. One Qwen2.5-7B layer: as 1, both exact SVDs timed on q, k and gate and extrapolated to the
   layer (o ~ q, v ~ k, up and down ~ gate), then x28 for the whole model; accuracy against the
   fp64 SVD on q, k and gate.
6. The project's own toy (toy/base, 14 modules): all of it, against both exact SVDs.

Weights are random, shaped like real ones, with the spectrum that makes the SVD hard: a Gaussian
bulk plus 8 strong directions, s_1 : s_2 = 1 : 0.8, then each next one rho times the last, rho per
module type from 0.72 to 0.997 (`RHO`: the range of s_3 / s_2 measured on real Qwen2.5-0.5B-architecture
weights, issue 12; 0.997 on gate_proj): a flat top, where a fixed number of power iterations leaves
the subspace decided by the random start. The embedding is 16 tokens, not 151,936: it plays no part in any of this.
Prints one line per comparison and appends a JSON record to bench/results.jsonl.
"""

import json
import math
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import param_counts  # noqa: E402
import tinylora  # noqa: E402
from model import ModelConfig, Transformer, load_model  # noqa: E402
from tinylora import TinyLoRAConfig, attach  # noqa: E402

R = 2
# s_3 / s_2 of the strong directions per module type: the range measured on real weights, the flattest
# (hardest) on the largest matrices
RHO = {"q_proj": 0.72, "k_proj": 0.8, "v_proj": 0.88, "o_proj": 0.94, "gate_proj": 0.997, "up_proj": 0.99, "down_proj": 0.97}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_model(cfg, layers):
    """A Transformer of `cfg`'s shape with `layers` layers and weights like real ones (see above)."""
    g = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        model = Transformer(ModelConfig(**{**cfg.__dict__, "num_hidden_layers": layers, "vocab_size": 16}))
    model.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_proj.weight"):
                out, inp = p.shape
                rho = RHO[name.split(".")[-2]]
                top = [1.0, 0.8] + [0.8 * rho ** k for k in range(1, 7)]  # [8]
                left = torch.linalg.qr(torch.randn(out, 8, generator=g)).Q  # [out, 8] orthonormal
                right = torch.linalg.qr(torch.randn(inp, 8, generator=g)).Q  # [in, 8]
                bulk = torch.randn(out, inp, generator=g) / math.sqrt(inp) * 0.5  # top singular value ~0.5-1.7
                p.copy_(bulk + (left * (4 * torch.tensor(top))) @ right.T)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 if p.dim() > 1 or "bias" in name else torch.ones(p.shape))
    return model.requires_grad_(False).eval()


def timed(f):
    start = time.perf_counter()
    result = f()
    return time.perf_counter() - start, result


def sine(A, B):
    """Largest principal-angle sine between the column spaces of orthonormal A and B."""
    A, B = A.double(), B.double()
    return torch.linalg.matrix_norm(A - B @ (B.T @ A), ord=2).item()


def exact_svds(weights):
    """The references, per weight: seconds of torch.linalg.svd in fp64 (tinylora's exact path) and
    in fp32 (LAPACK's sgesdd), the fp64 factors, and the worst column sine of the fp32 factors
    against them (fp32 LAPACK is not exact on flat spectra)."""
    out = []
    for W in weights:
        t64, (U, S, Vh) = timed(lambda: torch.linalg.svd(W.double(), full_matrices=False))
        t32, (U32, _, _) = timed(lambda: torch.linalg.svd(W.float(), full_matrices=False))
        fp32_sine = max(sine(U32[:, i:i + 1], U[:, i:i + 1]) for i in range(R))
        out.append({"fp64_s": t64, "fp32_s": t32, "fp32_column_sine": fp32_sine, "factors": (U, S, Vh)})
    return out


def accuracy(targets, references):
    """The adapter's factors (targets' U, S, Vh) against the float64 SVD of each weight
    (`exact_svds`' factors): worst sine of single columns and of the subspaces, worst relative
    difference of dW = U diag(S) R V^T for one fixed random R [r, r], and the smallest relative
    gap (s_i - s_{i+1}) / s_1, i <= r, seen."""
    R_ = torch.randn(R, R, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    worst = {"column_sine": 0.0, "subspace_sine": 0.0, "dW_relative": 0.0, "min_gap": math.inf}
    for t, ref in zip(targets, references):
        U, S, Vh = ref["factors"]
        sign = U[:, :R].gather(0, U[:, :R].abs().argmax(0, keepdim=True)).sign()  # the adapter's sign rule
        Ue, Se, Ve = U[:, :R] * sign, S[:R], (Vh[:R] * sign.T).T
        Ua, Sa, Va = t.U.double(), t.S.double(), t.Vh.double().T
        columns = max(max(sine(Ua[:, i:i + 1], Ue[:, i:i + 1]), sine(Va[:, i:i + 1], Ve[:, i:i + 1])) for i in range(R))
        dW_exact, dW_ours = (Ue * Se) @ R_ @ Ve.T, (Ua * Sa) @ R_ @ Va.T
        worst = {"column_sine": max(worst["column_sine"], columns),
                 "subspace_sine": max(worst["subspace_sine"], sine(Ua, Ue), sine(Va, Ve)),
                 "dW_relative": max(worst["dW_relative"], (torch.linalg.norm(dW_ours - dW_exact) / torch.linalg.norm(dW_exact)).item()),
                 "min_gap": min(worst["min_gap"], ((S[:R] - S[1:R + 1]) / S[0]).min().item())}
    return worst


def exact_summary(references, scale=1.0):
    """Seconds of both exact SVDs (x scale, to extrapolate) and fp32's worst column sine."""
    return {"fp64_s": scale * sum(r["fp64_s"] for r in references), "fp32_s": scale * sum(r["fp32_s"] for r in references),
            "fp32_column_sine": max(r["fp32_column_sine"] for r in references)}


def speed_line(name, t_attach, exact, measured):
    return (f"{name}: default attach {t_attach:.2f} s; exact SVD in fp64 {exact['fp64_s']:.1f} s "
            f"({exact['fp64_s'] / t_attach:.1f}x slower), in fp32 {exact['fp32_s']:.1f} s ({exact['fp32_s'] / t_attach:.1f}x; "
            f"its columns up to sine {exact['fp32_column_sine']:.1e} from fp64's) ({measured})")


def svd_report(adapter, targets=None):
    """What the adapter's SVD did: modules by method, median passes, worst certified sine bound."""
    reports = [adapter.svd_reports[t.name] for t in targets or adapter.targets]
    passes = sorted(r["passes"] for r in reports if r["method"] == "randomized")
    return {"modules": len(reports), "randomized": len(passes), "exact": len(reports) - len(passes),
            "median_passes": passes[len(passes) // 2] if passes else None, "max_passes": max(passes, default=None),
            "max_sine_bound": max(r["sine_bound"] for r in reports)}


def describe(acc, rep):
    return (f"{rep['randomized']} modules by subspace iteration (median {rep['median_passes']}, max {rep['max_passes']} passes), "
            f"{rep['exact']} exact; vs the reference: column sine <= {acc['column_sine']:.1e}, subspace sine <= "
            f"{acc['subspace_sine']:.1e}, dW differs by <= {acc['dW_relative']:.1e} (certified bound <= {rep['max_sine_bound']:.1e}; "
            f"smallest gap (s_i - s_i+1) / s_1 = {acc['min_gap']:.1e})")


def targets_of(model, kinds=tinylora.TARGETS, layers=None):
    return [t.linear.weight for t in tinylora.find_targets(model, kinds) if layers is None or int(t.name.split(".")[2]) in layers]


def main():
    record = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "load_average": os.getloadavg()[0], "rank": R,
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()}
    cache = tempfile.mkdtemp()

    # 1. Qwen2.5-0.5B shape
    small = random_model(param_counts.QWEN25["0.5B"], 24)
    t_attach, (adapter, _) = timed(lambda: attach(small, TinyLoRAConfig(), cache_dir=cache, quiet=True))
    checked = [t for t in adapter.targets if int(t.name.split(".")[2]) in (0, 12)]
    references = exact_svds([t.linear.weight for t in checked])
    exact = exact_summary(references, scale=12)  # 2 of 24 layers measured
    acc, rep = accuracy(checked, references), svd_report(adapter)
    record["0.5B"] = {"modules": 168, "attach_randomized_s": t_attach, "exact_extrapolated": exact,
                      "speedup_vs_fp64": exact["fp64_s"] / t_attach, "speedup_vs_fp32": exact["fp32_s"] / t_attach,
                      "accuracy_layers_0_12_vs_fp64": acc, "svd": rep}
    print(speed_line("0.5B, 168 modules", t_attach, exact, "exact measured on layers 0 and 12, x12"))
    print(f"0.5B accuracy (layers 0 and 12 vs float64 torch.linalg.svd): {describe(acc, rep)}")

    # 2. cached second run
    adapter.detach()
    t_cached, (adapter, _) = timed(lambda: attach(small, TinyLoRAConfig(), cache_dir=cache, quiet=True))
    record["0.5B"]["attach_cached_s"] = t_cached
    print(f"0.5B, cached second attach: {t_cached:.2f} s (goal < 1 s)")

    # 3. training step: forward + backward through all 24 layers, batch 1 x 256 tokens, fp32. The base
    #    is the same model inside adapter.disabled() (the hooks return at once), timed alternately
    #    with the adapted one so both see the same machine.
    adapter.detach()
    adapter, _ = attach(small, TinyLoRAConfig(n_tie=16), cache_dir=cache, quiet=True)
    small.model.embed_tokens.weight.requires_grad_(True)  # so both backpropagate through every layer
    ids = torch.randint(0, 16, (1, 256), generator=torch.Generator().manual_seed(0))

    def step():
        small(ids).logsumexp(-1).mean().backward()

    def cost():  # (wall, CPU) seconds of one step; CPU time is less disturbed by other processes
        wall, cpu = time.perf_counter(), time.process_time()
        step()
        return time.perf_counter() - wall, time.process_time() - cpu

    step()  # warm-up
    ratios = []
    for _ in range(5):
        with adapter.disabled():
            base = cost()
        adapted = cost()
        ratios.append((adapted[0] / base[0] - 1, adapted[1] / base[1] - 1))
    small.model.embed_tokens.weight.requires_grad_(False)
    wall, cpu = (sorted(r[i] for r in ratios)[2] for i in (0, 1))  # medians over 5 alternating pairs
    record["0.5B"].update(step_base_s=base[0], step_overhead_wall=wall, step_overhead_cpu=cpu)
    print(f"0.5B, training step (fwd+bwd, 1x256 tokens, fp32, {base[0]:.1f} s): TinyLoRA adds {100 * wall:+.1f}% wall time, "
          f"{100 * cpu:+.1f}% CPU time (medians of 5 alternating pairs; goal < 5%)")

    # 4. merge/unmerge in bf16 at three update sizes ||dW|| / ||W|| (one v per module)
    adapter.detach()
    small.to(torch.bfloat16).requires_grad_(False)
    adapter, _ = attach(small, TinyLoRAConfig(), cache_dir=cache, quiet=True)
    with torch.no_grad():  # ||dW|| / ||W|| of each module at v = 1; dW is linear in v
        adapter.tensors["v"].fill_(1)
        unit = torch.stack([torch.linalg.norm(B @ C @ A) / torch.linalg.norm(t.linear.weight.float())
                            for t in adapter.targets for B, C, A in [adapter.factors(t)]])
    weight_bytes = sum(t.linear.weight.numel() * 2 for t in adapter.targets)
    record["merge_bf16"] = []
    for relative in (1e-3, 1e-2, 1e-1):
        with torch.no_grad():
            adapter.tensors["v"].copy_((relative / unit)[:, None])
        start = time.perf_counter()
        with adapter.merged():
            t_merge = time.perf_counter() - start
            kept = sum(t.restore[2].numel() * 4 + t.restore[3].numel() * 2 for t in adapter.targets)
            start = time.perf_counter()
        t_unmerge = time.perf_counter() - start
        record["merge_bf16"].append({"relative_update": relative, "merge_s": t_merge, "unmerge_s": t_unmerge,
                                     "restore_bytes": kept, "weight_bytes": weight_bytes})
        print(f"0.5B bf16, ||dW||/||W|| = {relative:g}: merge {t_merge:.2f} s, unmerge {t_unmerge:.2f} s, exact restore keeps "
              f"{kept / 2**20:.1f} MiB = {100 * kept / weight_bytes:.2f}% of the {weight_bytes / 2**20:.0f} MiB target weights")
    del small, adapter

    # 5. one Qwen2.5-7B layer
    big = random_model(param_counts.QWEN25["7B"], 1)
    t_attach, (adapter, _) = timed(lambda: attach(big, TinyLoRAConfig(), cache_dir=None, quiet=True))
    checked = [t for t in adapter.targets if t.kind in ("q_proj", "k_proj", "gate_proj")]
    references = exact_svds([t.linear.weight for t in checked])
    q, k, gate = references
    exact = {f"{p}_s": 2 * q[f"{p}_s"] + 2 * k[f"{p}_s"] + 3 * gate[f"{p}_s"] for p in ("fp64", "fp32")}  # o ~ q, v ~ k, up, down ~ gate
    exact["fp32_column_sine"] = exact_summary(references)["fp32_column_sine"]
    acc, rep = accuracy(checked, references), svd_report(adapter)
    record["7B_layer"] = {"attach_randomized_s": t_attach, "exact_q_k_gate": [{k_: v for k_, v in r.items() if k_ != "factors"}
                                                                              for r in references],
                          "exact_layer_extrapolated": exact, "speedup_vs_fp64": exact["fp64_s"] / t_attach,
                          "speedup_vs_fp32": exact["fp32_s"] / t_attach, "model_randomized_s": 28 * t_attach,
                          "accuracy_q_k_gate_vs_fp64": acc, "svd": rep}
    print(speed_line("7B, one layer", t_attach, exact, "q, k, gate measured; o ~ q, v ~ k, up and down ~ gate") + "; goal >= 30x")
    print(f"7B accuracy (q, k, gate vs float64 torch.linalg.svd): {describe(acc, rep)}")
    print(f"7B, whole model (x28 layers, extrapolated): default {28 * t_attach / 60:.1f} min, exact fp64 "
          f"{28 * exact['fp64_s'] / 60:.0f} min, fp32 {28 * exact['fp32_s'] / 60:.0f} min")
    del big, adapter

    # 6. the project's own toy
    toy = load_model(os.path.join(ROOT, "toy", "base"), device="cpu")
    t_attach, (adapter, _) = timed(lambda: attach(toy, TinyLoRAConfig(), cache_dir=None, quiet=True))
    references = exact_svds([t.linear.weight for t in adapter.targets])
    exact = exact_summary(references)
    acc, rep = accuracy(adapter.targets, references), svd_report(adapter)
    record["toy"] = {"attach_randomized_s": t_attach, "exact": exact, "speedup_vs_fp64": exact["fp64_s"] / t_attach,
                     "accuracy_vs_fp64": acc, "svd": rep}
    print(speed_line("toy, 14 modules", t_attach, exact, "all measured"))
    print(f"toy accuracy (all modules vs float64 torch.linalg.svd): {describe(acc, rep)}")

    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
