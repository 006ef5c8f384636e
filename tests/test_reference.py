"""The adapter against independent references (issue 12): its formula, its gradient, its PEFT export.

The other adapter tests compare two paths that both run through `Adapter.factors` (merged vs
hook, save/load, export, gradcheck), so a wrong formula passes them all. These tests compute what
the update must be from the method's definition alone, in float64, and observe the adapter only
from outside. From the adapter they read nothing but its trainable tensors and each module's fixed
random P (`t.P`, part of the adapter's definition); never its U, S, V, tie groups or `factors`.

    reference SVD     torch.linalg.svd of the ORIGINAL float64 weight, cut to rank r, with the
                      method's sign rule applied here: the largest-|.| entry of each U column is
                      positive (the matching V column flips with it)
    reference groups  recomputed here: tiled = consecutive chunks of n_tie modules in depth order
                      (layer 0 q,k,v,o,gate,up,down, then layer 1, ...); structured = chunks of
                      same-type modules, the groups numbered type after type
    reference update  TinyLoRA  dW = scale U_r diag(S_r) (sum_i v_i P_i) V_r^T,  v = the module's group's
                      LoRA-XS   dW = scale U_r diag(S_r) R V_r^T,               R = the module's group's
                      LoRA      dW = scale B A

What each test pins:
    test_update_of_every_module_equals_the_formula  (hypothesis: method, layers, targets, r, u,
        n_tie, tiling, scale, v)
        the update as the forward hook applies it (the layer's output on the identity minus the
        base layer's) and as `merged()` writes it (merged weights minus the original ones), for
        every module, equals the reference update: catches a transposed R, a dropped or
        square-rooted S, S on the wrong side of R, an ignored scale, wrong tie groups, U and V
        without the sign rule.
    test_update_on_a_checkpoint_with_a_flat_spectrum_equals_the_formula
        the same on random checkpoint weights (64 and 96 wide, top singular values 0.6% to 8% of
        s_1 apart), where the default randomized SVD is a real approximation and a hard one: its
        U, V must be the exact SVD's, column by column, not just span the same subspace.
    test_gradient_equals_the_gradient_through_the_reference_update  (hypothesis, as the first)
        logits, and d loss / d (v, R, or A and B) of the adapted model, equal autograd through a
        copy of the base model whose weights are W + reference dW(trainable tensors).
    test_peft_reproduces_the_adapted_logits_from_the_export
        PEFT itself (0.21.2: PeftModel.from_pretrained on transformers' Qwen2, and its
        merge_and_unload) gives our adapted model's logits from `export_peft`'s files.
(tests/test_grpo.py::test_kl_term_enters_loss_and_gradient_with_weight_beta is the independent
reference for the KL term's weight beta.)

The adapter's SVD is float32 (randomized by default), the references float64: updates are compared
by relative Frobenius error, bounded by UPDATE_TOL (1e-3; measured: ~2e-6 on the prescribed
spectra, ~2e-5 on the flat one), while a wrong formula is off by O(1). In the property tests the
weights get a prescribed spectrum with clear gaps between the top singular values (>= 6% of s_1),
so the rank-r basis is well defined and both SVDs must find it.
"""

import copy
import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, example, given, settings, strategies as st

import tinylora
from model import ModelConfig, Transformer, load_model
from tinylora import TinyLoRAConfig

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # depth order in a layer
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
TINY = dict(vocab_size=32, hidden_size=16, intermediate_size=24, num_attention_heads=2, num_key_value_heads=1, head_dim=8)
UPDATE_TOL = 1e-3  # relative Frobenius error: float32 SVD vs float64 reference; the bugs above give O(1)
SIGN_MARGIN = 1e-4  # the sign rule needs the largest |entry| of each U column to stand out by this (relative)


# --------------------------------------------------------------------------------------------
# The references, written from the definitions


def module_name(layer, kind):
    return f"model.layers.{layer}.{'self_attn' if kind in ATTENTION else 'mlp'}.{kind}"


def modules_in_depth_order(model, targets):
    """[(name, kind, nn.Linear)]: layer 0 q,k,v,o,gate,up,down (those in `targets`), then layer 1, ..."""
    return [(module_name(i, kind), kind, getattr(layer.self_attn if kind in ATTENTION else layer.mlp, kind))
            for i, layer in enumerate(model.model.layers) for kind in KINDS if kind in targets]


def reference_tie_groups(kinds, n_tie, tiling):
    """(group of each module, number of groups) for modules of these kinds in depth order."""
    if tiling == "tiled":
        chunks = [list(range(first, min(first + n_tie, len(kinds)))) for first in range(0, len(kinds), n_tie)]
    else:
        chunks = []
        for kind in KINDS:  # all q groups first, then all k groups, ...
            members = [i for i, k in enumerate(kinds) if k == kind]
            chunks += [members[j:j + n_tie] for j in range(0, len(members), n_tie)]
    group = {i: g for g, chunk in enumerate(chunks) for i in chunk}
    return [group[i] for i in range(len(kinds))], len(chunks)


def reference_svd(W, r):
    """Rank-r SVD of W [out, in] in float64 -> U [out, r], S [r], V [in, r], signs by the method's
    rule: the largest-|.| entry of each U column is positive."""
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    U, S, V = U[:, :r], S[:r], Vh[:r].T
    sign = torch.sign(U[U.abs().argmax(dim=0), torch.arange(r)])  # [r]
    return U * sign, S, V * sign


def sign_rule_is_unambiguous(W, r):
    """The largest |entry| of each of the top-r U columns beats the runner-up by SIGN_MARGIN: a
    float32 SVD then picks the same entry, hence the same sign."""
    top2 = reference_svd(W, r)[0].abs().topk(2, dim=0).values  # [2, r]
    return bool(((top2[0] - top2[1]) > SIGN_MARGIN * top2[0]).all())


def reference_updates(original, P, trainable, config):
    """{name: dW [out, in] float64} from the definitions. original: {name: W} in depth order (the
    weights before attach); P: {name: P [u, r, r]}; trainable: the adapter's tensors by file name
    (may require grad: dW is differentiable in them)."""
    c = config
    names = list(original)
    if c.method == "lora":
        return {name: c.scale * trainable[f"{name}.lora_B"] @ trainable[f"{name}.lora_A"] for name in names}
    groups, n_groups = reference_tie_groups([name.rsplit(".", 1)[1] for name in names], c.n_tie, c.tiling)
    updates = {}
    for name, g in zip(names, groups):
        U, S, V = reference_svd(original[name], c.r)
        if c.method == "tinylora":
            assert trainable["v"].shape == (n_groups, c.u)
            R = sum(trainable["v"][g, i] * P[name][i] for i in range(c.u))  # [r, r]
        else:
            assert trainable["R"].shape == (n_groups, c.r, c.r)
            R = trainable["R"][g]
        updates[name] = c.scale * U @ torch.diag(S) @ R @ V.T
    return updates


def relative_error(actual, expected):
    return float((actual - expected).norm() / expected.norm())


# --------------------------------------------------------------------------------------------
# Models and adapters


def tiny_model(layers, seed):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(num_hidden_layers=layers, **TINY)).to(torch.float64).eval()


def prescribe_spectra(model, top, decay, seed):
    """Every projection W [m, n] := Q_m diag(top * decay^k) Q_n^T with random orthogonal Q: the
    relative gaps (s_i - s_{i+1}) / s_1 = decay^(i-1) (1 - decay) are clear for the top few."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, linear in modules_in_depth_order(model, KINDS):
            m, n = linear.weight.shape
            k = min(m, n)
            Qm = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64)).Q
            Qn = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
            linear.weight.copy_((Qm * (top * decay ** torch.arange(k, dtype=torch.float64))) @ Qn.T)


def randomize(adapter, std, seed):
    """Nonzero trainable tensors: a 'trained' adapter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(std * torch.randn(p.shape, generator=g, dtype=torch.float64))


@dataclass(frozen=True)
class Case:
    """An adapted model to build: the adapter's config and how the weights are drawn."""
    config: TinyLoRAConfig
    layers: int
    seed: int  # of the model, the spectra's random orthogonal factors and the trainable values
    top: float = 2.0  # s_1 of every projection
    decay: float = 0.6  # s_{k+1} / s_k


@st.composite
def cases(draw):
    """A random adapter (method, r, u, n_tie, tiling, targets, projection seed, scale) on a random
    1-3 layer model."""
    method = draw(st.sampled_from(("tinylora", "lora-xs", "lora")))
    layers = draw(st.integers(1, 3))
    targets = tuple(draw(st.lists(st.sampled_from(KINDS), min_size=1, max_size=7, unique=True)))
    config = TinyLoRAConfig(
        method=method, r=draw(st.integers(1, 3)), u=draw(st.integers(1, 4)) if method == "tinylora" else 1,
        n_tie=draw(st.integers(1, layers * len(targets))) if method != "lora" else 1,
        tiling=draw(st.sampled_from(("tiled", "structured"))), targets=targets, seed=draw(st.integers(0, 1000)),
        scale=draw(st.one_of(st.floats(-3, -0.3), st.floats(0.3, 0.9), st.floats(1.1, 3))), dtype=torch.float64)
    return Case(config, layers, draw(st.integers(0, 2**16)), draw(st.floats(1.5, 3)), draw(st.floats(0.3, 0.8)))


# Cases that every bug in the module docstring fails, whatever hypothesis draws around them: r >= 2,
# s_i != 1, scale != 1, several tie groups in both tilings, every module type (seeds: the sign rule is
# unambiguous, see `build`).
EXAMPLES = [Case(TinyLoRAConfig(r=2, u=2, n_tie=3, tiling="structured", scale=0.7, dtype=torch.float64), layers=2, seed=2),
            Case(TinyLoRAConfig(method="lora-xs", r=3, n_tie=4, scale=-1.5, dtype=torch.float64), layers=2, seed=2),
            Case(TinyLoRAConfig(method="lora", r=2, scale=2.5, dtype=torch.float64), layers=1, seed=1)]


def with_examples(test):
    """Run `test` on EXAMPLES first (hypothesis' explicit examples)."""
    for case in reversed(EXAMPLES):
        test = example(case)(test)
    return test


def build(case):
    """(model, base, original, adapter): the float64 tiny model with prescribed spectra and the
    adapter attached, an untouched copy of it (`base`, no adapter), its original target weights
    {name: W} in depth order; the adapter's trainable tensors random and nonzero."""
    c = case.config
    model = tiny_model(case.layers, case.seed)
    prescribe_spectra(model, case.top, case.decay, case.seed)
    original = {name: linear.weight.detach().clone() for name, _, linear in modules_in_depth_order(model, c.targets)}
    if c.method != "lora":
        assume(all(sign_rule_is_unambiguous(W, c.r) for W in original.values()))
    base = copy.deepcopy(model)
    adapter, _ = tinylora.attach(model, c, cache_dir=None, quiet=True)
    assert sorted(t.name for t in adapter.targets) == sorted(original)
    randomize(adapter, 1.0, case.seed + 1)
    return model, base, original, adapter


def projections(adapter):
    """{name: P [u, r, r] float64}: the adapter's fixed random tensors (tinylora only)."""
    return {t.name: t.P.double() for t in adapter.targets if t.P is not None}


def trainable_tensors(adapter):
    return {name: p.detach().double() for name, p in adapter.tensors.items()}


# --------------------------------------------------------------------------------------------
# The update of every module


def hook_update(linear, W, bias):
    """dW as the forward hook applies it: the adapted layer's output on the identity minus the base
    layer's, transposed (row j of the output is column j of W')."""
    I = torch.eye(W.shape[1], dtype=torch.float64)
    with torch.no_grad():
        return (linear(I) - F.linear(I, W, bias)).T


@settings(max_examples=30, deadline=None)
@given(cases())
@with_examples
def test_update_of_every_module_equals_the_formula(case):
    model, _, original, adapter = build(case)
    c = adapter.config
    expected = reference_updates(original, projections(adapter), trainable_tensors(adapter), c)
    modules = modules_in_depth_order(model, c.targets)
    for name, _, linear in modules:
        error = relative_error(hook_update(linear, original[name], linear.bias), expected[name])
        assert error < UPDATE_TOL, f"{c}: forward-hook update of {name} is off by {error:.1e} (relative)"
    with adapter.merged():
        merged = {name: linear.weight.detach() - original[name] for name, _, linear in modules}
    for name in original:
        error = relative_error(merged[name], expected[name])
        assert error < UPDATE_TOL, f"{c}: merged update of {name} is off by {error:.1e} (relative)"


@pytest.mark.parametrize("r", [1, 2, 3])
def test_update_on_a_checkpoint_with_a_flat_spectrum_equals_the_formula(tiny_ckpt, r):
    """The same with the default (randomized) SVD where it approximates (r + 16 columns for
    matrices 64 and 96 wide) and where that is hard: random weights, whose top singular values are
    only 0.6% to 8% of s_1 apart, so each U, V column is sensitive to any error in the subspace."""
    model = load_model(tiny_ckpt[0], dtype=torch.float32, device="cpu").to(torch.float64)
    modules = modules_in_depth_order(model, KINDS)
    original = {name: linear.weight.detach().clone() for name, _, linear in modules}
    assert all(sign_rule_is_unambiguous(W, r) for W in original.values())
    config = TinyLoRAConfig(r=r, u=2, scale=0.7, dtype=torch.float64)  # the default SVD
    adapter, _ = tinylora.attach(model, config, cache_dir=None, quiet=True)
    randomize(adapter, 1.0, seed=r)
    expected = reference_updates(original, projections(adapter), trainable_tensors(adapter), adapter.config)
    errors = {name: relative_error(hook_update(linear, original[name], linear.bias), expected[name])
              for name, _, linear in modules}
    worst = max(errors, key=errors.get)
    assert errors[worst] < UPDATE_TOL, f"r={r}: update of {worst} is off by {errors[worst]:.1e} (relative)"


# --------------------------------------------------------------------------------------------
# The gradient training follows


@settings(max_examples=20, deadline=None)
@given(cases())
@with_examples
def test_gradient_equals_the_gradient_through_the_reference_update(case):
    """loss = sum(weights * logits) on a short random input. Logits and d loss / d trainable
    tensors of the adapted model (hook path) = those of the base model with weights W + reference
    dW(trainable), differentiated by autograd through the reference formula."""
    model, base, original, adapter = build(case)
    g = torch.Generator().manual_seed(case.seed + 2)
    ids = torch.randint(0, TINY["vocab_size"], (2, 5), generator=g)
    weights = torch.randn(2, 5, TINY["vocab_size"], generator=g, dtype=torch.float64)  # [B, T, vocab]

    logits = model(ids)
    grads = torch.autograd.grad((weights * logits).sum(), adapter.parameters())

    leaves = {name: p.detach().clone().requires_grad_() for name, p in adapter.tensors.items()}
    dW = reference_updates(original, projections(adapter), leaves, adapter.config)
    adapted_weights = {f"{name}.weight": original[name] + dW[name] for name in original}
    expected_logits = torch.func.functional_call(base, adapted_weights, (ids,))
    expected = torch.autograd.grad((weights * expected_logits).sum(), list(leaves.values()))

    assert relative_error(logits.detach(), expected_logits.detach()) < UPDATE_TOL
    error = relative_error(torch.cat([x.reshape(-1) for x in grads]), torch.cat([x.reshape(-1) for x in expected]))
    assert error < UPDATE_TOL, f"{adapter.config}: gradient off by {error:.1e} (relative)"


# --------------------------------------------------------------------------------------------
# PEFT as the reference for export_peft


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # transformers, from PEFT
@pytest.mark.parametrize("method, std", [("tinylora", 1.0), ("lora-xs", 0.5), ("lora", 0.2)])
def test_peft_reproduces_the_adapted_logits_from_the_export(tiny_ckpt, tmp_path, method, std):
    """export_peft's files, loaded by PEFT onto transformers' Qwen2 (and merged by PEFT), give our
    adapted model's logits."""
    from peft import PeftModel
    from transformers import Qwen2ForCausalLM

    path, _ = tiny_ckpt
    ids = torch.randint(0, 32, (2, 9), generator=torch.Generator().manual_seed(0))
    model = load_model(path, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        base = model(ids)
    config = TinyLoRAConfig(method=method, n_tie=3 if method != "lora" else 1, scale=0.7)
    adapter, _ = tinylora.attach(model, config, cache_dir=None, quiet=True)
    randomize(adapter, std, seed=2)
    tinylora.export_peft(adapter, str(tmp_path / "peft"))
    with open(tmp_path / "peft" / "adapter_config.json") as f:
        assert json.load(f)["peft_type"] == "LORA"
    with torch.no_grad():
        ours = model(ids)
        hf_model = Qwen2ForCausalLM.from_pretrained(path).eval()
        peft_model = PeftModel.from_pretrained(hf_model, str(tmp_path / "peft")).eval()
        theirs = peft_model(ids).logits
        merged = peft_model.merge_and_unload()(ids).logits
    tol = 1e-5 * ours.abs().max().item()  # float32 on these sizes: ~3e-7 of the logits' range measured
    assert (ours - base).abs().max().item() > 1000 * tol  # the adapter moves the logits far beyond tol
    torch.testing.assert_close(theirs, ours, atol=tol, rtol=0)
    torch.testing.assert_close(merged, ours, atol=tol, rtol=0)
