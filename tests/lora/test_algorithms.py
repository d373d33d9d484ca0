"""LoRA/LyCORIS deltas against the formulas computed directly, in float64.

Each file of ``lora_files`` is read (``read_lora``) and every module's ``module_delta``
(float32) is compared with the formula of the spec / reference UI evaluated in float64 on
the raw file tensors (read back with ``safetensors.torch.load_file``, not through sdstack),
written independently of ``sdstack.lora.algorithms`` (explicit Kronecker indexing, a loop
over kernel positions for Tucker cores, per-column norms by sums of squares).

Tolerance: every input is stored in float32, so the float32 result differs from the exact
one only by rounding. With u = 2^-24 and gamma(n) = n u / (1 - n u), a sum of products
of n terms computed in float32 is within gamma(n) * (the same sum over absolute values)
(Higham, Accuracy and Stability of Numerical Algorithms, 3.1); each test states its n as
(terms summed + multiplications on the path). ``abs_formula`` evaluates the formula on
absolute values in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from sdstack.lora.algorithms import ALGORITHMS, dora_delta, fit_delta, module_delta
from sdstack.lora.formats import read_lora
from sdstack.models.key_map import key_map_of, live_module
from tests.lora import lora_files as lf

U = 2.0**-24


def gamma(n: int) -> float:
    return n * U / (1 - n * U)


@pytest.fixture(scope="module")
def model(tiny_components):
    return tiny_components


def originals(model, layer) -> dict[str, torch.Tensor]:
    module = live_module(model, layer)
    found = {"weight": module.weight.detach().float()}
    if getattr(module, "bias", None) is not None:
        found["bias"] = module.bias.detach().float()
    return found


def read(tmp_path, model, state, name="file"):
    path = lf.save(tmp_path / f"{name}.safetensors", state)
    return read_lora(path, key_map_of(model)), load_file(str(path))


def raw(state, module, part) -> torch.Tensor:
    return state[f"{module.layer.kohya}.{part}"].double()


def assert_close(ours: torch.Tensor, truth: torch.Tensor, tolerance: torch.Tensor) -> None:
    assert ours.dtype == torch.float32 and ours.shape == truth.shape
    excess = (ours.double() - truth).abs() - tolerance
    assert excess.max().item() <= 0, f"off by {excess.max().item():.3g} beyond the bound"


def lora_truth(up, down, mid, shape, absolute=False):
    """kohya LoRA: up.view(out, r) @ down.view(r, in*k*k) viewed as the weight; with a
    Tucker core, dW[:, :, k, l] = up @ mid[:, :, k, l] @ down for each kernel position."""
    f = torch.abs if absolute else (lambda t: t)
    up2, down2 = f(up.reshape(up.shape[0], -1)), f(down.reshape(down.shape[0], -1))
    if mid is None:
        return (up2 @ down2).reshape(shape)
    out = torch.empty(shape, dtype=torch.float64)
    for k in range(shape[2]):
        for l in range(shape[3]):  # noqa: E741
            out[:, :, k, l] = up2 @ f(mid[:, :, k, l]) @ down2
    return out


@pytest.mark.parametrize("tucker", [False, True])
def test_lora_and_locon(tmp_path, model, tucker):
    file, state = read(tmp_path, model, lf.lora_state(model, alpha=3.0, tucker=tucker))
    assert len(file.modules) == len(lf.KOHYA_LAYERS)
    for module in file.modules.values():
        weight = module.layer.shape("weight")
        up, down = raw(state, module, "lora_up.weight"), raw(state, module, "lora_down.weight")
        mid = state.get(f"{module.layer.kohya}.lora_mid.weight")
        mid = None if mid is None else mid.double()
        rank = down.shape[0]
        scale = 3.0 / rank
        truth = scale * lora_truth(up, down, mid, weight)
        # n: r terms (r*r with a core) + two multiplications (core) + the scale
        n = (rank * rank + 3) if mid is not None else rank + 1
        tolerance = gamma(n) * scale * lora_truth(up, down, mid, weight, absolute=True)
        assert_close(
            module_delta(module, originals(model, module.layer))["weight"], truth, tolerance
        )


def test_no_alpha_means_scale_one_and_scale_key_wins(tmp_path, model):
    layers = lf.LINEAR_LAYERS[:2]
    state = lf.lora_state(model, layers=layers, alpha=None)
    second = key_map_of(model)[layers[1]]
    state[f"{second.kohya}.scale"] = torch.tensor(0.25)
    state[f"{second.kohya}.alpha"] = torch.tensor(100.0)  # the scale key wins over alpha/r
    file, raw_state = read(tmp_path, model, state)
    first = file.modules[layers[0]]
    assert (first.alpha, first.scale, first.effective_scale) == (None, None, 1.0)
    assert file.modules[layers[1]].effective_scale == 0.25
    for key, scale in ((layers[0], 1.0), (layers[1], 0.25)):
        module = file.modules[key]
        up, down = (
            raw(raw_state, module, "lora_up.weight"),
            raw(raw_state, module, "lora_down.weight"),
        )
        truth = scale * (up @ down)
        tolerance = gamma(down.shape[0] + 1) * scale * (up.abs() @ down.abs())
        assert_close(
            module_delta(module, originals(model, module.layer))["weight"], truth, tolerance
        )


def test_rs_lora_metadata_scales_by_alpha_over_sqrt_rank(tmp_path, model):
    state = lf.lora_state(model, layers=lf.LINEAR_LAYERS[:1], rank=4, alpha=2.0)
    path = lf.save(tmp_path / "rs.safetensors", state, {"ss_network_args": '{"rs_lora": "True"}'})
    module = next(iter(read_lora(path, key_map_of(model)).modules.values()))
    assert module.scale == pytest.approx(2.0 / math.sqrt(4)) and module.effective_scale == 1.0


def kron_truth(w1, w2):
    """kron(w1, w2)[i*c + p, j*d + q, ...] = w1[i, j] * w2[p, q, ...], by broadcasting."""
    a, b = w1.shape
    c, d, *kernel = w2.shape
    view1 = w1.reshape(a, 1, b, 1, *([1] * len(kernel)))
    return (view1 * w2.reshape(1, c, 1, d, *kernel)).reshape(a * c, b * d, *kernel)


def cp_truth(core, first, second):
    """Tucker rebuild: W[:, :, k, l] = first^T @ core[:, :, k, l] @ second."""
    out = torch.empty(first.shape[1], second.shape[1], *core.shape[2:], dtype=torch.float64)
    for k in range(core.shape[2]):
        for l in range(core.shape[3]):  # noqa: E741
            out[:, :, k, l] = first.T @ core[:, :, k, l] @ second
    return out


def loha_factor(state, module, i, absolute=False):
    f = torch.abs if absolute else (lambda t: t)
    a, b = f(raw(state, module, f"hada_w{i}_a")), f(raw(state, module, f"hada_w{i}_b"))
    core = state.get(f"{module.layer.kohya}.hada_t{i}")
    if core is not None:
        return cp_truth(f(core.double()), a, b)
    return (a @ b).reshape(module.layer.shape("weight"))


@pytest.mark.parametrize("tucker", [False, True])
def test_loha(tmp_path, model, tucker):
    file, state = read(tmp_path, model, lf.loha_state(model, rank=4, alpha=2.0, tucker=tucker))
    assert {m.algorithm for m in file.modules.values()} == {"loha"}
    assert len(file.modules) == len(lf.LOHA_LAYERS)
    for module in file.modules.values():
        scale = 2.0 / 4  # r = hada_w1_b.shape[0]
        truth = scale * loha_factor(state, module, 1) * loha_factor(state, module, 2)
        magnitude = loha_factor(state, module, 1, True) * loha_factor(state, module, 2, True)
        # n: each factor r (r*r + 2 with a core) terms, then the Hadamard product and scale
        n = 2 * (4 * 4 + 2 if tucker else 4) + 2
        assert_close(
            module_delta(module, originals(model, module.layer))["weight"],
            truth,
            gamma(n) * scale * magnitude,
        )


def lokr_factor(state, module, i, absolute=False):
    f = torch.abs if absolute else (lambda t: t)
    name = module.layer.kohya
    if f"{name}.lokr_w{i}" in state:
        return f(state[f"{name}.lokr_w{i}"].double())
    a, b = f(state[f"{name}.lokr_w{i}_a"].double()), f(state[f"{name}.lokr_w{i}_b"].double())
    core = state.get(f"{name}.lokr_t{i}")
    if core is not None:
        return cp_truth(f(core.double()), a, b)
    return a @ b


@pytest.mark.parametrize(
    "options",
    [{}, {"decomposed": True}, {"decomposed": True, "tucker": True}],
    ids=["full", "decomposed", "tucker"],
)
def test_lokr(tmp_path, model, options):
    file, state = read(tmp_path, model, lf.lokr_state(model, rank=2, alpha=3.0, **options))
    for module in file.modules.values():
        weight = module.layer.shape("weight")
        w1, w2 = lokr_factor(state, module, 1), lokr_factor(state, module, 2)
        decomposed = any(f"{module.layer.kohya}.lokr_w{i}_b" in state for i in (1, 2))
        # the rank alpha divides: the decomposed factor's (w2 first); two full factors: 1
        rank = module.rank
        scale = 3.0 / rank if decomposed else 1.0
        if w2.ndim == 2 and len(weight) == 4:
            truth = kron_truth(w1, w2).reshape(weight)
        else:
            truth = kron_truth(w1, w2)
        absolute = kron_truth(
            lokr_factor(state, module, 1, True), lokr_factor(state, module, 2, True)
        )
        n = 4 + (2 * 2 + 2 if options.get("tucker") else 2)  # factor sums, kron product, scale
        assert_close(
            module_delta(module, originals(model, module.layer))["weight"],
            scale * truth,
            gamma(n) * scale * absolute.reshape(truth.shape),
        )
    assert {m.rank for m in file.modules.values()} == ({None} if not options else {2})


def test_full_and_norm(tmp_path, model):
    for state in (lf.full_state(model), lf.norm_state(model)):
        file, raw_state = read(tmp_path, model, state)
        for module in file.modules.values():
            weight_part, bias_part = (
                ("diff", "diff_b") if module.algorithm == "full" else ("w_norm", "b_norm")
            )
            deltas = module_delta(module, originals(model, module.layer))
            assert torch.equal(deltas["weight"].double(), raw(raw_state, module, weight_part))
            if f"{module.layer.kohya}.{bias_part}" in raw_state:
                assert torch.equal(deltas["bias"].double(), raw(raw_state, module, bias_part))
            else:
                assert "bias" not in deltas
    assert {m.algorithm for m in file.modules.values()} == {"norm"}


def test_ia3_scales_rows_or_input_columns(tmp_path, model):
    file, state = read(tmp_path, model, lf.ia3_state(model))
    assert {m.algorithm for m in file.modules.values()} == {"ia3"}
    for module in file.modules.values():
        w0 = originals(model, module.layer)["weight"]
        w = raw(state, module, "weight")
        on_input = bool(state[f"{module.layer.kohya}.on_input"])
        view = [1] * w0.ndim
        view[1 if on_input else 0] = -1
        truth = w0.double() * w.reshape(view)
        assert_close(module_delta(module, {"weight": w0})["weight"], truth, gamma(1) * truth.abs())


def dora_truth(w0, delta, delta_abs_bound, magnitude, per_input):
    """dora(W0 + dW) - W0 with each input column (or output row) of W0 + dW scaled to the
    magnitude; returns the truth and a first-order float32 error bound."""
    merged = w0 + delta
    axis = 1 if per_input else 0
    other = [d for d in range(merged.ndim) if d != axis]
    norm = merged.pow(2).sum(dim=other, keepdim=True).sqrt()
    scale = magnitude / norm
    truth = merged * scale - w0
    # errors: dW (delta_abs_bound) and rounding of W0 + dW, propagated through the row or
    # column norm (relative change at most ||dM|| / ||M||, plus gamma(n + 2) for the norm
    # itself), then the product, the division and the subtraction
    merged_error = delta_abs_bound + U * merged.abs()
    column = merged_error.pow(2).sum(dim=other, keepdim=True).sqrt() / norm
    length = math.prod(merged.shape) // merged.shape[axis]
    relative = column + gamma(length + 2) + 3 * U
    bound = merged.abs() * scale.abs() * relative + scale.abs() * merged_error + U * truth.abs()
    return truth, bound


@pytest.mark.parametrize("wd_on_output", [False, True])
def test_dora_normalises_per_input_column_or_output_row(tmp_path, model, wd_on_output):
    file, state = read(
        tmp_path, model, lf.dora_state(model, rank=4, alpha=2.0, wd_on_output=wd_on_output)
    )
    for module in file.modules.values():
        weight = module.layer.shape("weight")
        up, down = raw(state, module, "lora_up.weight"), raw(state, module, "lora_down.weight")
        scale = 2.0 / 4
        delta = scale * lora_truth(up, down, None, weight)
        delta_bound = gamma(5) * scale * lora_truth(up, down, None, weight, absolute=True)
        magnitude = raw(state, module, "dora_scale").reshape(module.dora_scale.shape)
        w0 = originals(model, module.layer)["weight"]
        truth, bound = dora_truth(w0.double(), delta, delta_bound, magnitude, not wd_on_output)
        assert_close(module_delta(module, {"weight": w0})["weight"], truth, bound)


def test_dora_of_a_square_layer_reads_the_convention_from_the_shape(model):
    w0 = torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    delta = torch.zeros_like(w0)
    per_input = dora_delta(w0, delta, torch.ones(1, 4, dtype=torch.float64)) + w0
    per_output = dora_delta(w0, delta, torch.ones(4, 1, dtype=torch.float64)) + w0
    assert torch.allclose(per_input.norm(dim=0), torch.ones(4, dtype=torch.float64))
    assert torch.allclose(per_output.norm(dim=1), torch.ones(4, dtype=torch.float64))


def test_inpainting_conv_in_zero_pads_the_delta():
    """A 4-channel conv_in delta on the 9-channel inpainting conv_in: channels 4..8 get 0."""
    gen = torch.Generator().manual_seed(3)
    delta = torch.randn(32, 4 * 9, generator=gen)
    w0 = torch.randn(32, 9, 3, 3, generator=gen)
    padded = fit_delta(delta, w0)
    assert padded.shape == (32, 9, 3, 3)
    assert torch.equal(padded[:, :4], delta.reshape(32, 4, 3, 3))
    assert not padded[:, 4:].any()


def test_registry_names_the_algorithms():
    assert ALGORITHMS.names() == ("lora", "loha", "lokr", "full", "norm", "ia3")
    assert ALGORITHMS.canonical("LoCon") == "lora" and ALGORITHMS.canonical("hada") == "loha"
    with pytest.raises(Exception, match="unknown LoRA algorithm 'oft'"):
        ALGORITHMS.get("oft")


@pytest.mark.parametrize(
    "metadata, layout", [({}, (1, 64)), ({"ss_network_args": '{"wd_on_output": "True"}'}, (64, 1))]
)
def test_one_dimensional_dora_scale_of_a_square_layer(tmp_path, model, metadata, layout):
    """``(64,)`` on a 64x64 layer: per input column (the reference) unless LyCORIS's
    ``wd_on_output`` says per output row."""
    key = lf.LINEAR_LAYERS[0]
    state = lf.lora_state(model, layers=[key])
    state[f"{key_map_of(model)[key].kohya}.dora_scale"] = torch.ones(64)
    path = lf.save(tmp_path / "dora1d.safetensors", state, metadata)
    assert read_lora(path, key_map_of(model)).modules[key].dora_scale.shape == layout
