"""tinylora.py: parameter counts, exactness at v = 0, gradients, merge/unmerge, reproducible P,
SVD accuracy and cache, the adapter file and its PEFT export."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import param_counts
import svd
import tinylora
from model import ModelConfig, Transformer, load_model
from tinylora import TARGETS, AdapterError, TinyLoRAConfig, attach, load_adapter, save_adapter

TINY = dict(vocab_size=32, hidden_size=16, intermediate_size=24, num_attention_heads=2, num_key_value_heads=1, head_dim=8)
TIED = ("tinylora", "lora-xs")


def tiny_model(layers=2, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(num_hidden_layers=layers, **TINY)).to(dtype).eval()


def shapes(cfg):
    """(out, in) of each target type, from the config alone."""
    D, I = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return {"q_proj": (q, D), "k_proj": (kv, D), "v_proj": (kv, D), "o_proj": (D, q),
            "gate_proj": (I, D), "up_proj": (I, D), "down_proj": (D, I)}


def randomize(adapter, std=1.0, seed=1):
    """Give every trainable tensor nonzero values (a 'trained' adapter)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(std * torch.randn(p.shape, generator=g).to(p))


def bits(t):
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def ids(batch=2, length=7, seed=0):
    return torch.randint(0, 32, (batch, length), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# Counts and configuration


@st.composite
def configs(draw):
    layers = draw(st.integers(1, 3))
    targets = tuple(draw(st.lists(st.sampled_from(TARGETS), min_size=1, max_size=7, unique=True)))
    method = draw(st.sampled_from(tinylora.METHODS))
    n_modules = layers * len(targets)
    return layers, TinyLoRAConfig(method=method, r=draw(st.integers(1, 3)), targets=targets,
                                  u=draw(st.integers(1, 4)) if method == "tinylora" else 1,
                                  n_tie=draw(st.integers(1, n_modules)) if method in TIED else 1,
                                  tiling=draw(st.sampled_from(tinylora.TILINGS)))


@settings(max_examples=40, deadline=None)
@given(configs())
def test_trainable_count_matches_the_formula(case):
    layers, c = case
    model = tiny_model(layers)
    adapter, n = attach(model, c, cache_dir=None, quiet=True)
    N, by_type = layers * len(c.targets), shapes(model.config)
    groups = math.ceil(N / c.n_tie) if c.tiling == "tiled" else len(c.targets) * math.ceil(layers / c.n_tie)
    expected = {"tinylora": c.u * groups, "lora-xs": c.r * c.r * groups,
                "lora": layers * sum(c.r * sum(by_type[t]) for t in c.targets),
                "full": layers * sum(math.prod(by_type[t]) for t in c.targets)}[c.method]
    assert n == adapter.num_trainable == expected == tinylora.count_trainable(model, c)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == (N if c.method == "full" else 0)  # everything else frozen
    assert all(p.requires_grad for p in adapter.parameters())


def test_paper_counts_for_qwen25_7b():
    with torch.device("meta"):
        model = Transformer(param_counts.QWEN25["7B"])
    assert tinylora.count_trainable(model, TinyLoRAConfig(n_tie=16)) == 13
    assert tinylora.count_trainable(model, TinyLoRAConfig(n_tie=4)) == 49
    assert tinylora.tie_choices(model, 13)[0] == (1, 16, 13)
    assert tinylora.tie_choices(28, 196)[:2] == [(1, 1, 196), (2, 2, 196)]


@pytest.mark.parametrize("name, n_tie", [("Llama-3.2-1B", 9), ("Llama-3.2-3B", 16), ("Llama-3.1-8B", 18),
                                          ("Qwen3-0.6B", 16), ("Qwen3-4B", 20), ("Qwen3-8B", 20)])
def test_the_13_parameter_setting_of_each_family(name, n_tie):
    """u = 1 and the least tying that gives <= 13 vectors; the counts the table prints."""
    with torch.device("meta"):
        model = Transformer(param_counts.MODELS[name])
    modules = 7 * model.config.num_hidden_layers
    assert tinylora.tie_choices(model, 13)[0] == (1, n_tie, math.ceil(modules / n_tie)) and math.ceil(modules / n_tie) == 13
    assert math.ceil(modules / (n_tie - 1)) > 13
    assert tinylora.count_trainable(model, TinyLoRAConfig(n_tie=n_tie)) == 13
    assert f"| {name} | {model.config.num_hidden_layers} | {modules} |" in param_counts.parameter_table()


def test_param_counts_script_prints_the_table():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "param_counts.py"], cwd=root, capture_output=True, text=True, check=True).stdout
    assert out.strip() == param_counts.parameter_table() and "| Qwen2.5-7B | 28 | 196 | 13 |" in out


def test_tie_groups_tiled_and_structured():
    kinds = ["q_proj", "k_proj"] * 3  # 3 layers of two types, depth order
    assert tinylora.tie_groups(kinds, 4, "tiled") == [0, 0, 0, 0, 1, 1]
    assert tinylora.tie_groups(kinds, 2, "structured") == [0, 2, 0, 2, 1, 3]  # q: 0,0,1  k: 2,2,3


@pytest.mark.parametrize("kwargs, word", [
    (dict(method="dora"), "method"), (dict(tiling="diagonal"), "tiling"), (dict(targets=("q",)), "targets"),
    (dict(targets=()), "targets"), (dict(u=0), "u"), (dict(n_tie=0), "n_tie"), (dict(r=0), "r"),
    (dict(method="lora", n_tie=2), "n_tie"), (dict(method="lora-xs", u=3), "u"), (dict(svd="full"), "svd"),
    (dict(dtype=torch.int8), "dtype"), (dict(scale=float("nan")), "scale"), (dict(svd_tol=0.0), "svd_tol"),
    (dict(svd_tol=2), "svd_tol"), (dict(svd_max_iter=-1), "svd_max_iter"), (dict(svd_max_iter=10**7), "svd_max_iter")])
def test_invalid_config_is_refused_in_one_line(kwargs, word):
    with pytest.raises(ValueError, match=word) as e:
        TinyLoRAConfig(**kwargs)
    message = str(e.value)
    assert "\n" not in message and ("use " in message or "must" in message)


@pytest.mark.parametrize("kwargs, word", [(dict(n_tie=15), "n_tie"), (dict(r=9), "r=9")])
def test_config_that_does_not_fit_the_model_is_refused(kwargs, word):
    with pytest.raises(ValueError, match=word):
        attach(tiny_model(), TinyLoRAConfig(**kwargs), cache_dir=None, quiet=True)  # 14 modules, k/v are 8 x 16


def test_attach_reports_the_count_and_refuses_a_second_adapter(capsys):
    model = tiny_model()
    adapter, n = attach(model, TinyLoRAConfig(n_tie=14), cache_dir=None)
    assert n == 1 and "-> 1 trainable parameters" in capsys.readouterr().err
    with pytest.raises(AdapterError, match="detach"):
        attach(model, cache_dir=None, quiet=True)
    adapter.detach()
    attach(model, cache_dir=None, quiet=True)


# --------------------------------------------------------------------------------------------
# Forward: exact at start, gradients, merge, disable


@pytest.mark.parametrize("method", ["tinylora", "lora-xs", "lora"])
def test_fresh_adapter_gives_the_base_logits_exactly(method):
    model = tiny_model()
    base = model(ids())
    attach(model, TinyLoRAConfig(method=method), cache_dir=None, quiet=True)
    assert torch.equal(model(ids()), base)


@pytest.mark.parametrize("method", tinylora.METHODS)
def test_backward_reaches_only_the_adapter(method):
    model = tiny_model()
    adapter, _ = attach(model, TinyLoRAConfig(method=method), cache_dir=None, quiet=True)
    randomize(adapter, 0.1)  # LoRA's B = 0 would otherwise block A's gradient
    model(ids()).logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())
    adapter_ids = {id(p) for p in adapter.parameters()}
    assert all(p.grad is None for p in model.parameters() if id(p) not in adapter_ids)


@pytest.mark.parametrize("method, n_tie", [("tinylora", 3), ("tinylora", 1), ("lora-xs", 4), ("lora", 1)])
def test_gradcheck_float64(method, n_tie):
    model = tiny_model(dtype=torch.float64)
    adapter, _ = attach(model, TinyLoRAConfig(method=method, u=3 if method == "tinylora" else 1, n_tie=n_tie,
                                              dtype=torch.float64), cache_dir=None, quiet=True)
    randomize(adapter, 0.5)
    names = list(adapter.tensors)
    xs = [torch.randn(3, t.linear.in_features, dtype=torch.float64) for t in adapter.targets]

    def outputs(*values):  # every target's output, as a function of the trainable tensors
        adapter.tensors.update(zip(names, values))
        return torch.cat([t.linear(x).reshape(-1) for t, x in zip(adapter.targets, xs)])

    inputs = tuple(p.detach().clone().requires_grad_() for p in adapter.parameters())
    assert torch.autograd.gradcheck(outputs, inputs)


@pytest.mark.parametrize("method", ["tinylora", "lora-xs", "lora"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_forward_equals_low_rank_forward_and_unmerge_is_bit_exact(tiny_ckpt, method, dtype):
    model = load_model(tiny_ckpt[0], dtype=dtype, device="cpu")
    original = {k: bits(v).clone() for k, v in model.state_dict().items()}
    adapter, _ = attach(model, TinyLoRAConfig(method=method, n_tie=2 if method in TIED else 1), cache_dir=None, quiet=True)
    lost = 0
    for cycle in range(3):  # training steps between rollouts change the adapter
        randomize(adapter, 0.5 if method != "lora" else 0.05, seed=cycle)
        low_rank = model(ids()).float()
        with adapter.merged():
            merged = model(ids()).float()
            lost += sum(len(t.restore[2]) for t in adapter.targets)
        # bf16: W + dW is rounded to bf16 once more than the low-rank path: up to 1.4% of the logit range measured, 3% allowed
        tol = 1e-5 if dtype == torch.float32 else 0.03 * low_rank.abs().max().item()
        torch.testing.assert_close(merged, low_rank, atol=tol, rtol=0)
        assert all(torch.equal(bits(v), original[k]) for k, v in model.state_dict().items())
    assert lost > 0  # the rounding-correction path was exercised, not just the easy entries


@pytest.mark.parametrize("method", ["tinylora", "lora-xs", "lora"])
def test_factors_come_in_the_formulas_order(method):
    """dW = B C A with B [out, r] on the left: U (LoRA's B), then scale diag(S) R (scale I), then V^T (LoRA's A)."""
    adapter, _ = attach(tiny_model(), TinyLoRAConfig(method=method, scale=0.5), cache_dir=None, quiet=True)
    randomize(adapter, 0.5)
    t = adapter.targets[4]  # layer 0 gate_proj [24, 16]
    B, C, A = adapter.factors(t)
    assert (B.shape, C.shape, A.shape) == ((24, 2), (2, 2), (2, 16))
    if method == "lora":
        assert torch.equal(B, adapter.tensors[f"{t.name}.lora_B"]) and torch.equal(A, adapter.tensors[f"{t.name}.lora_A"])
        assert torch.equal(C, 0.5 * torch.eye(2))
    else:
        R = torch.einsum("i,irs->rs", adapter.tensors["v"][t.group], t.P) if method == "tinylora" else adapter.tensors["R"][t.group]
        assert torch.equal(B, t.U) and torch.equal(A, t.Vh) and torch.equal(C, 0.5 * t.S[:, None] * R)


def test_merge_of_float64_weights_adds_the_update_in_float64():
    """W_m = W + dW rounded once, in W's dtype: fp64 weights are not rounded through fp32 on the way."""
    model = tiny_model(dtype=torch.float64)
    adapter, _ = attach(model, TinyLoRAConfig(n_tie=3, dtype=torch.float64), cache_dir=None, quiet=True)
    randomize(adapter, 0.5)
    W = model.model.layers[1].mlp.down_proj.weight
    original = W.clone()
    eye = torch.eye(W.shape[1], dtype=torch.float64)
    dW = (model.model.layers[1].mlp.down_proj(eye) - eye @ original.T).T.detach()  # the hook path's update, fp64
    with adapter.merged():
        torch.testing.assert_close(W - original, dW, rtol=0, atol=1e-12 * float(dW.detach().abs().max()))
    assert torch.equal(W, original)


def test_disabled_gives_the_base_model_and_contexts_do_not_nest():
    model = tiny_model()
    base = model(ids())
    adapter, _ = attach(model, TinyLoRAConfig(n_tie=7), cache_dir=None, quiet=True)
    randomize(adapter)
    adapted = model(ids())
    assert not torch.allclose(adapted, base)
    with adapter.disabled():
        assert torch.equal(model(ids()), base)
        with pytest.raises(AdapterError, match="disabled"), adapter.merged():
            pass
    assert torch.equal(model(ids()), adapted)


# --------------------------------------------------------------------------------------------
# P and the SVD

P_SCRIPT = """
import torch, tinylora
from model import ModelConfig, Transformer
torch.manual_seed({global_seed})  # the weights differ; P must not depend on the global RNG
model = Transformer(ModelConfig(num_hidden_layers=2, **{tiny}))
adapter, _ = tinylora.attach(model, tinylora.TinyLoRAConfig(u=3, seed=5), cache_dir=None, quiet=True)
print(torch.stack([t.P for t in adapter.targets]).double().numpy().tobytes().hex())
"""


def test_projections_are_identical_across_processes_and_distinct_across_modules():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = lambda s: subprocess.run([sys.executable, "-c", P_SCRIPT.format(global_seed=s, tiny=TINY)], cwd=root,
                                   capture_output=True, text=True, check=True).stdout.strip()
    first, second = run(1), run(2)
    assert first == second
    P = torch.frombuffer(bytearray(bytes.fromhex(first)), dtype=torch.float64).view(14, 3, 2, 2)
    assert len({tuple(p.flatten().tolist()) for p in P}) == 14  # one independent P per module
    assert abs(P.var().item() - 0.5) < 0.15  # N(0, 1/r), r = 2


def test_projection_of_a_module_does_not_depend_on_the_other_targets():
    P_all = {t.name: t.P for t in attach(tiny_model(), cache_dir=None, quiet=True)[0].targets}
    only_up = attach(tiny_model(), TinyLoRAConfig(targets=("up_proj",)), cache_dir=None, quiet=True)[0]
    assert all(torch.equal(t.P, P_all[t.name]) for t in only_up.targets)


def matrix(m, n, spectrum, seed):
    """fp64 [m, n] with singular values `spectrum(k)`, k = 0, 1, ..."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
    return (U * spectrum(torch.arange(k, dtype=torch.float64))) @ V.T


def sine(A, B):
    """Largest principal-angle sine between the column spaces of orthonormal A and B."""
    A, B = A.double(), B.double()
    return torch.linalg.matrix_norm(A - B @ (B.T @ A), ord=2).item()


def exact_factors(W, r):
    """float64 torch.linalg.svd of W, top r, with the adapter's sign rule (largest-|.| entry of each
    U column positive): the independent reference for the adapter's U [m, r], S [r], V [n, r]."""
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    sign = U[:, :r].gather(0, U[:, :r].abs().argmax(0, keepdim=True)).sign()
    return U[:, :r] * sign, S[:r], Vh[:r].T * sign


def svd_errors(W, U, S, Vh):
    """(largest sine between a computed column of U or V and the exact one, relative difference of
    dW = U diag(S) R V^T for a fixed random R) against the float64 SVD of W."""
    r = len(S)
    Ue, Se, Ve = exact_factors(W, r)
    columns = max(max(sine(U[:, i:i + 1], Ue[:, i:i + 1]), sine(Vh[i:i + 1].T, Ve[:, i:i + 1])) for i in range(r))
    R = torch.randn(r, r, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    dW = (U.double() * S.double()) @ R @ Vh.double()
    dW_exact = (Ue * Se) @ R @ Ve.T
    return columns, (torch.linalg.norm(dW - dW_exact) / torch.linalg.norm(dW_exact)).item()


FLAT_TOP = {  # s_1, s_2 = 1, 0.8, then s_3 / s_2 = rho and a slow decay into a bulk: real weights' hard case
    f"flat top rho={rho}": lambda k, rho=rho: torch.where(k < 2, 1 - 0.2 * k, 0.8 * rho * 0.99 ** (k - 2)) for rho in (0.9, 0.99, 0.997)}
SPECTRA = {"power law": lambda k: (k + 1) ** -1.0, "Gaussian": None, **FLAT_TOP}


@pytest.mark.parametrize("spectrum", SPECTRA)
@pytest.mark.parametrize("shape, r", [((384, 128), 2), ((96, 320), 1), ((256, 256), 4), ((640, 160), 2)])
def test_default_svd_is_the_exact_top_r_subspace(spectrum, shape, r):
    """Every U and V column within sine 1e-4 of the float64 SVD's, on the spectra where a fixed
    number of power iterations is not enough; the certified bound really bounds the error."""
    g = torch.Generator().manual_seed(r)
    W = (matrix(*shape, SPECTRA[spectrum], seed=r) if SPECTRA[spectrum] else torch.randn(*shape, generator=g, dtype=torch.float64))
    U, S, Vh, report = svd.truncated_svd(W.float(), r)
    columns, dW = svd_errors(W, U, S, Vh)
    assert columns <= 1e-4 and dW <= 3e-4, (columns, dW, report)
    assert columns <= 2 * report["sine_bound"] + 1e-6 and report["sine_bound"] <= 1e-4, report  # fp32 rounding aside
    assert report["method"] == "randomized" and report["passes"] >= 1


def test_exact_svd_is_exact_on_the_test_checkpoint(tiny_ckpt):
    """svd='exact' (and the fallback) run torch.linalg.svd in fp64: every column within 1e-6 of the
    float64 reference on flat spectra (fp32 LAPACK was 1.3e-5 off on these modules, measured on one
    machine, docs/method.md §4)."""
    adapter, _ = attach(load_model(tiny_ckpt[0], device="cpu"), TinyLoRAConfig(svd="exact"), cache_dir=None, quiet=True)
    for t in adapter.targets:
        assert svd_errors(t.linear.weight, t.U, t.S, t.Vh)[0] <= 1e-6, t.name
        assert adapter.svd_reports[t.name]["method"] == "exact" and adapter.svd_reports[t.name]["sine_bound"] <= 1e-6


@pytest.mark.parametrize("exact", [False, True])
def test_the_svd_is_near_the_optimal_rank_r_error(exact):
    """Eckart-Young: U diag(S) V^T is the best rank-r approximation (the cheaper, weaker check)."""
    W = matrix(256, 96, lambda k: (k + 1) ** -1.0, seed=0)
    for r in (1, 2, 4):
        optimal = torch.linalg.svdvals(W)[r:].square().sum().sqrt()
        U, S, Vh, _ = svd.truncated_svd(W.float(), r, exact=exact)
        assert (torch.linalg.norm(W - (U.double() * S.double()) @ Vh.double()) - optimal) / optimal < 1e-6


def attached_factor_errors(model, config=None):
    """Attach with the default SVD and return the worst svd_errors over every target module."""
    adapter, _ = attach(model, config or TinyLoRAConfig(), cache_dir=None, quiet=True)
    errors = [svd_errors(t.linear.weight, t.U, t.S, t.Vh) for t in adapter.targets]
    return max(e[0] for e in errors), max(e[1] for e in errors), adapter


def test_default_svd_is_exact_on_the_random_test_checkpoints(tiny_ckpt, tmp_path):
    conftest = sys.modules["conftest"]
    wide = str(tmp_path / "wide")
    conftest.write_checkpoint(wide, hidden=128, intermediate=352, heads=4, kv_heads=2, seed=3)
    for path in (tiny_ckpt[0], wide):
        columns, dW, adapter = attached_factor_errors(load_model(path, device="cpu"))
        assert columns <= 1e-4 and dW <= 3e-4, (path, columns, dW)
        assert all(rep["sine_bound"] <= 1e-4 for rep in adapter.svd_reports.values())


def test_default_svd_is_exact_on_the_toy_model():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    columns, dW, adapter = attached_factor_errors(load_model(os.path.join(root, "toy", "base"), device="cpu"))
    assert columns <= 1e-4 and dW <= 3e-4, (columns, dW)
    assert {rep["method"] for rep in adapter.svd_reports.values()} == {"randomized"}  # cheap there: no fallback


def test_nearly_tied_singular_values_warn_once_and_give_the_same_factors_every_time(capsys):
    """s_2 = s_3 (the rank-2 subspace is not unique) in one module, s_1 = s_2 (the basis within it
    is not) in another: both named in one warning; the factors are identical on every run; the
    other modules are unaffected."""
    def tied_model():
        model = tiny_model()
        with torch.no_grad():
            k_proj = model.model.layers[0].self_attn.k_proj.weight  # [8, 16]
            k_proj.copy_(matrix(8, 16, lambda k: torch.where(k == 0, 1.0, torch.where(k < 3, 0.7, 0.3 / (k + 1))), seed=1))
            up = model.model.layers[1].mlp.up_proj.weight  # [24, 16]
            up.copy_(matrix(24, 16, lambda k: torch.where(k < 2, 1.0, 0.5 / (k + 1)), seed=2))
        return model

    first, _ = attach(tied_model(), cache_dir=None)
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1, err
    assert "model.layers.0.self_attn.k_proj" in warnings[0] and "model.layers.1.mlp.up_proj" in warnings[0]
    assert "layers.0.mlp" not in warnings[0]
    tied = {"model.layers.0.self_attn.k_proj", "model.layers.1.mlp.up_proj"}
    assert all((rep["gap"] < svd.TIE_GAP) == (name in tied) for name, rep in first.svd_reports.items())
    assert all(rep["sine_bound"] <= 1e-4 for name, rep in first.svd_reports.items() if name not in tied)
    second, _ = attach(tied_model(), cache_dir=None, quiet=True)
    for a, b in zip(first.targets, second.targets):
        assert torch.equal(a.U, b.U) and torch.equal(a.S, b.S) and torch.equal(a.Vh, b.Vh)


def test_svd_cache_is_read_on_the_second_attach(tiny_ckpt, tmp_path, monkeypatch):
    first, _ = attach(load_model(tiny_ckpt[0], device="cpu"), cache_dir=str(tmp_path), quiet=True)
    assert len(os.listdir(tmp_path)) == 1

    def no_svd(*args, **kwargs):
        raise AssertionError("the SVD ran although the cache has the factors")

    monkeypatch.setattr(svd, "truncated_svd", no_svd)
    second, _ = attach(load_model(tiny_ckpt[0], device="cpu"), cache_dir=str(tmp_path), quiet=True)
    for a, b in zip(first.targets, second.targets):
        assert torch.equal(a.U, b.U) and torch.equal(a.S, b.S) and torch.equal(a.Vh, b.Vh)
    assert second.svd_reports == first.svd_reports  # the accuracy reports come back from the cache too
    for other in (dict(r=1), dict(svd_tol=1e-5), dict(svd_max_iter=50), dict(svd_oversample=8), dict(svd="exact")):
        with pytest.raises(AssertionError, match="cache"):  # other accuracy settings: another key, never reused
            attach(load_model(tiny_ckpt[0], device="cpu"), TinyLoRAConfig(**other), cache_dir=str(tmp_path), quiet=True)


@pytest.mark.parametrize("damage", ["zeroed U", "NaN in S", "report missing", "U missing"])
def test_damaged_svd_cache_is_recomputed_not_trusted(tiny_ckpt, tmp_path, capsys, damage):
    first, _ = attach(load_model(tiny_ckpt[0], device="cpu"), cache_dir=str(tmp_path), quiet=True)
    (path,) = [str(p) for p in tmp_path.iterdir()]
    with safe_open(path, "pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    name = "model.layers.1.mlp.down_proj"
    if damage == "zeroed U":
        tensors[f"{name}.U"].zero_()
    elif damage == "NaN in S":
        tensors[f"{name}.S"][0] = float("nan")
    elif damage == "report missing":
        meta["reports"] = json.dumps({k: v for k, v in json.loads(meta["reports"]).items() if k != name})
    else:
        del tensors[f"{name}.U"]
    save_file(tensors, path, metadata=meta)
    second, _ = attach(load_model(tiny_ckpt[0], device="cpu"), cache_dir=str(tmp_path), quiet=True)
    assert f"ignoring the SVD cache {path}" in capsys.readouterr().err
    for a, b in zip(first.targets, second.targets):
        assert torch.equal(a.U, b.U) and torch.equal(a.S, b.S) and torch.equal(a.Vh, b.Vh)


def test_a_weight_with_nan_is_refused_naming_the_module():
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[2, 3] = float("nan")
    with pytest.raises(AdapterError, match=r"model\.layers\.1\.self_attn\.o_proj\.weight holds NaN") as e:
        attach(model, cache_dir=None, quiet=True)
    assert "\n" not in str(e.value)


def test_svd_cache_of_another_algorithm_version_is_not_reused(tiny_ckpt, tmp_path, monkeypatch):
    attach(load_model(tiny_ckpt[0], device="cpu"), cache_dir=str(tmp_path), quiet=True)
    monkeypatch.setattr(svd, "SVD_VERSION", "1")  # factors made by the fixed 4-pass SVD had this version
    monkeypatch.setattr(svd, "truncated_svd", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    with pytest.raises(AssertionError, match="recomputed"):
        attach(load_model(tiny_ckpt[0], device="cpu"), cache_dir=str(tmp_path), quiet=True)


# --------------------------------------------------------------------------------------------
# Files


@pytest.mark.parametrize("method", tinylora.METHODS)
def test_save_load_round_trip_reproduces_logits_bit_for_bit(tiny_ckpt, tmp_path, method):
    model = load_model(tiny_ckpt[0], device="cpu")
    config = TinyLoRAConfig(method=method, u=2 if method == "tinylora" else 1, n_tie=3 if method in TIED else 1, seed=7)
    adapter, n = attach(model, config, cache_dir=None, quiet=True)
    randomize(adapter, 0.1)
    path = str(tmp_path / "adapter.safetensors")
    size, data = save_adapter(adapter, path)
    assert data == 4 * n and size > data
    loaded = load_adapter(load_model(tiny_ckpt[0], device="cpu"), path, cache_dir=None, quiet=True)
    assert loaded.config == config
    fresh = load_model(tiny_ckpt[0], device="cpu")
    load_adapter(fresh, path, cache_dir=None, quiet=True)
    assert torch.equal(fresh(ids()), model(ids()))


def test_bf16_file_holds_two_bytes_per_parameter(tiny_ckpt, tmp_path):
    adapter, n = attach(load_model(tiny_ckpt[0], device="cpu"), TinyLoRAConfig(n_tie=2), cache_dir=None, quiet=True)
    size, data = save_adapter(adapter, str(tmp_path / "a.safetensors"), dtype=torch.bfloat16)
    assert (n, data) == (7, 14) and size < 1024
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["config"])["n_tie"] == 2 and meta["base_fingerprint"] == adapter.base_fingerprint
    assert "14 by subspace iteration" in meta["svd"] and "within sine" in meta["svd"]  # how exact the factors were


def test_loading_onto_another_base_model_is_refused(tiny_ckpt, tmp_path):
    adapter, _ = attach(load_model(tiny_ckpt[0], device="cpu"), cache_dir=None, quiet=True)
    path = str(tmp_path / "a.safetensors")
    save_adapter(adapter, path)
    other = load_model(tiny_ckpt[0], device="cpu")
    with torch.no_grad():
        other.model.layers[1].mlp.down_proj.weight[0, 0] += 1.0  # a sampled entry: another base model
    with pytest.raises(AdapterError, match="base model") as e:
        load_adapter(other, path, cache_dir=None, quiet=True)
    assert path in str(e.value) and "\n" not in str(e.value)
    attach(other, cache_dir=None, quiet=True)  # the refused load left the model untouched


def rewrite(path, tensors=None, **meta_changes):
    """Re-save an adapter file with edited tensors and metadata (`config` edits are merged)."""
    with safe_open(path, "pt") as f:
        meta = dict(f.metadata())
    config = {**json.loads(meta["config"]), **meta_changes.pop("config", {})}
    meta = {**meta, "config": json.dumps(config), **meta_changes}
    save_file(load_file(path) if tensors is None else tensors, path, metadata=meta)


@pytest.mark.parametrize("edit, message", [
    (dict(config={"n_tie": 3}), "'v' is \\(7, 1\\)"),  # 14 modules / 3 -> 5 groups, file has 7
    (dict(config={"method": "lora-xs"}), "'R' is missing"),
    (dict(tensors={"v": torch.zeros(7, 1), "w": torch.zeros(1)}), "'w'"),
    (dict(config={"tiling": "zigzag"}), "tiling"),
    (dict(format_version="9"), "version"),
    (dict(config={"r": 99}), "r=99"),
    (dict(config={"svd_niter": 4}), "svd_niter"),  # made by the fixed 4-pass SVD: another subspace
    (dict(config={"svd_max_iter": 10**7}), "svd_max_iter"),  # untrusted numbers are bounded
    (dict(sign_anchors='[["model.layers.9.mlp.up_proj", 0, 0]]'), "sign_anchors"),
    (dict(sign_anchors='{"k": 1}'), "sign_anchors")])
def test_inconsistent_file_is_refused_with_its_name(tiny_ckpt, tmp_path, edit, message):
    model = load_model(tiny_ckpt[0], device="cpu")
    adapter, _ = attach(model, TinyLoRAConfig(n_tie=2), cache_dir=None, quiet=True)
    path = str(tmp_path / "a.safetensors")
    save_adapter(adapter, path)
    rewrite(path, **edit)
    adapter.detach()
    with pytest.raises(AdapterError, match=message) as e:
        load_adapter(model, path, cache_dir=None, quiet=True)
    assert path in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("method", ["tinylora", "lora-xs", "lora"])
def test_peft_export_reproduces_the_adapted_logits(tiny_ckpt, tmp_path, method):
    model = load_model(tiny_ckpt[0], device="cpu")
    adapter, _ = attach(model, TinyLoRAConfig(method=method, n_tie=5 if method in TIED else 1, scale=0.7), cache_dir=None, quiet=True)
    randomize(adapter, 0.3 if method != "lora" else 0.05)
    tinylora.export_peft(adapter, str(tmp_path))
    with open(tmp_path / "adapter_config.json") as f:
        peft = json.load(f)
    assert (peft["peft_type"], peft["r"], peft["lora_alpha"], peft["target_modules"]) == ("LORA", 2, 2, list(TARGETS))
    lora = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert len(lora) == 2 * 14
    fresh = load_model(tiny_ckpt[0], device="cpu")
    with torch.no_grad():
        for name, W in fresh.named_parameters():
            if name.endswith("_proj.weight"):
                A = lora[f"base_model.model.{name[:-len('.weight')]}.lora_A.weight"]  # [r, in]
                B = lora[f"base_model.model.{name[:-len('.weight')]}.lora_B.weight"]  # [out, r]
                assert A.shape == (2, W.shape[1]) and B.shape == (W.shape[0], 2)
                W += peft["lora_alpha"] / peft["r"] * B @ A
    torch.testing.assert_close(fresh(ids()), model(ids()), atol=1e-5, rtol=0)


def test_sign_anchors_keep_the_meaning_of_v_when_another_machine_flips_a_column(tmp_path, monkeypatch):
    """A U column whose two largest |entries| tie with opposite signs: the sign rule is decided by
    rounding, so another machine may flip it (and v would mean another update). The file anchors
    that column's sign; loading re-applies it. Other machines are simulated by a truncated_svd
    that returns the column flipped."""
    def model_with_a_sign_tie():
        model = tiny_model()
        first = torch.tensor([1.0, -1.0, 0.5, 0.3, 0.2, 0.1, 0.05, 0.02], dtype=torch.float64)  # |u_0| ties
        U = torch.linalg.qr(torch.cat([first[:, None], torch.randn(8, 7, generator=torch.Generator().manual_seed(0),
                                                                    dtype=torch.float64)], 1)).Q
        V = torch.linalg.qr(torch.randn(16, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)).Q
        with torch.no_grad():  # layer 0 k_proj [8, 16]: s = 1, 0.6, 0.3, ...
            model.model.layers[0].self_attn.k_proj.weight.copy_((U * torch.tensor([1.0, 0.6, 0.3, 0.2, 0.1, 0.05, 0.03, 0.01],
                                                                                  dtype=torch.float64)) @ V.T)
        return model

    model = model_with_a_sign_tie()
    adapter, _ = attach(model, TinyLoRAConfig(n_tie=2), cache_dir=None, quiet=True)
    randomize(adapter)
    adapted = model(ids())
    path = str(tmp_path / "a.safetensors")
    save_adapter(adapter, path)
    with safe_open(path, "pt") as f:
        anchors = json.loads(f.metadata()["sign_anchors"])
    assert ["model.layers.0.self_attn.k_proj", 0, anchors[0][2]] in anchors and anchors[0][2] in (0, 1)
    assert len(anchors) < 5  # only the columns that need it

    exact_svd = svd.truncated_svd

    def other_machine(W, r, *args, seed=0, **kwargs):  # k_proj of layer 0 has index 1
        U, S, Vh, report = exact_svd(W, r, *args, seed=seed, **kwargs)
        if seed == 1:
            U, Vh = U.clone(), Vh.clone()
            U[:, 0], Vh[0] = -U[:, 0], -Vh[0]
        return U, S, Vh, report

    monkeypatch.setattr(svd, "truncated_svd", other_machine)
    loaded = model_with_a_sign_tie()
    load_adapter(loaded, path, cache_dir=None, quiet=True)
    torch.testing.assert_close(loaded(ids()), adapted, rtol=0, atol=1e-6)
    rewrite(path, sign_anchors="[]")  # without the anchor the flipped column changes the model
    unanchored = model_with_a_sign_tie()
    load_adapter(unanchored, path, cache_dir=None, quiet=True)
    assert not torch.allclose(unanchored(ids()), adapted, atol=1e-3)
