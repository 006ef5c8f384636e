"""How long TinyLoRA takes to initialise, and what the adapter costs afterwards.

    .venv/bin/python bench/bench_svd.py          (a few minutes on 2 CPU cores)

1. Qwen2.5-0.5B shape (24 layers x 7 targets = 168 modules): `attach` with the randomized SVD
   (fingerprint + SVD + P), against the exact SVD (torch.linalg.svd) measured on layer 0 and
   extrapolated x24; accuracy of the randomized factors on those modules.
2. The cached second run on the 0.5B shape.
3. A training step (forward + backward, fp32) with and without the adapter.
4. merge/unmerge on the 0.5B shape in bf16: time, and the memory the exact restore keeps.
5. One Qwen2.5-7B layer: as 1, exact SVD measured on q, k and gate and extrapolated to the layer
   (o ~ q, v ~ k, up and down ~ gate), then x28 for the whole model.

Weights are random, shaped like real ones: a Gaussian bulk plus 8 strong decaying directions
(real weight spectra have a few large singular values on a Marchenko-Pastur-like bulk). The
embedding is 16 tokens, not 151,936: it plays no part in any of this.
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
import tinylora  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from tinylora import TinyLoRAConfig, attach, truncated_svd  # noqa: E402

R = 2


def random_model(cfg, layers):
    """A Transformer of `cfg`'s shape with `layers` layers and weights like real ones."""
    g = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        model = Transformer(ModelConfig(**{**cfg.__dict__, "num_hidden_layers": layers, "vocab_size": 16}))
    model.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_proj.weight"):
                out, inp = p.shape
                spikes = torch.randn(out, 8, generator=g) * (4 * 0.7 ** torch.arange(8.0))  # [out, 8] decaying
                p.copy_((torch.randn(out, inp, generator=g) + spikes @ torch.randn(8, inp, generator=g) / 8) / math.sqrt(inp))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 if p.dim() > 1 or "bias" in name else torch.ones(p.shape))
    return model.requires_grad_(False).eval()


def timed(f):
    start = time.perf_counter()
    result = f()
    return time.perf_counter() - start, result


def accuracy(weights):
    """Exact vs randomized rank-R SVD of each weight: seconds of the exact one per weight, worst
    relative excess reconstruction error (||W - W_R|| over the optimal, minus 1), worst subspace sine."""
    t_exact, excess, sine = [], -math.inf, 0.0
    for W in weights:
        W = W.float()
        dt, (Ue, Se, Vhe) = timed(lambda: truncated_svd(W, R, exact=True))
        t_exact.append(dt)
        Ur, Sr, Vhr = truncated_svd(W, R)
        optimal = torch.linalg.norm(W - (Ue * Se) @ Vhe)
        excess = max(excess, (torch.linalg.norm(W - (Ur * Sr) @ Vhr) / optimal - 1).item())
        sine = max(sine, torch.linalg.matrix_norm(Ur - Ue @ (Ue.T @ Ur), ord=2).item())  # sin of the largest angle
    return t_exact, excess, sine


def targets_of(model, kinds=tinylora.TARGETS, layers=None):
    return [t.linear.weight for t in tinylora.find_targets(model, kinds) if layers is None or int(t.name.split(".")[2]) in layers]


def main():
    record = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "load_average": os.getloadavg()[0], "rank": R,
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()}
    cache = tempfile.mkdtemp()

    # 1. Qwen2.5-0.5B shape
    small = random_model(tinylora.QWEN25["0.5B"], 24)
    t_attach, (adapter, _) = timed(lambda: attach(small, TinyLoRAConfig(), cache_dir=cache, quiet=True))
    t_exact, excess, sine = accuracy(targets_of(small, layers=(0,)))
    t_exact = 24 * sum(t_exact)
    record["0.5B"] = {"modules": 168, "attach_randomized_s": t_attach, "exact_extrapolated_s": t_exact, "speedup": t_exact / t_attach,
                      "max_excess_error": excess, "max_subspace_sine": sine}
    print(f"0.5B, 168 modules: randomized attach {t_attach:.2f} s; exact SVD {t_exact:.1f} s (measured on layer 0, x24): "
          f"{t_exact / t_attach:.0f}x slower; randomized rank-{R} error exceeds the optimum by <= {excess:.1e}, subspace sine <= {sine:.1e}")

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
                            for t in adapter.targets for A, C, B in [adapter.factors(t)]])
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
    big = random_model(tinylora.QWEN25["7B"], 1)
    t_attach, _ = timed(lambda: attach(big, TinyLoRAConfig(), cache_dir=None, quiet=True))
    (q, k, gate), excess, sine = accuracy(targets_of(big, ("q_proj", "k_proj", "gate_proj")))
    t_exact_layer = 2 * q + 2 * k + 3 * gate
    record["7B_layer"] = {"attach_randomized_s": t_attach, "exact_q_k_gate_s": [q, k, gate], "exact_layer_extrapolated_s": t_exact_layer,
                          "speedup": t_exact_layer / t_attach, "model_randomized_s": 28 * t_attach, "model_exact_s": 28 * t_exact_layer,
                          "max_excess_error": excess, "max_subspace_sine": sine}
    print(f"7B, one layer: randomized attach {t_attach:.2f} s; exact SVD {t_exact_layer:.0f} s (q {q:.1f} s, k {k:.1f} s, gate {gate:.1f} s "
          f"measured; o ~ q, v ~ k, up and down ~ gate): {t_exact_layer / t_attach:.0f}x slower; excess error <= {excess:.1e}, "
          f"subspace sine <= {sine:.1e}")
    print(f"7B, whole model (x28 layers, extrapolated): randomized {28 * t_attach / 60:.1f} min, exact {28 * t_exact_layer / 60:.0f} min")

    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
