"""Merge methods (spec merge.md "Methods") against the formulas computed directly in float64.

Inputs are float32 tensors; the truth is the spec formula on the same values in float64. The
bound of each comparison is ``n * U * M``: U = 2**-24 is the float32 unit roundoff, M the
sum of the magnitudes of the formula's terms (elementwise), n the number of float32
roundings on the longest path (scalar casts included), counted in each test. TIES and
DARE inputs are multiples of 1/64 (or 1/2) in [-8, 8], so their deltas, trims, sign votes and means
are exact in float32 and only the final ``C + alpha * merged`` rounds.
"""

from __future__ import annotations

import math

import pytest
import torch

from sdstack.merge import (
    MERGE_METHODS,
    MergeError,
    UnknownMergeMethodError,
    dare_keep_mask,
    merge_tensor,
    resolve_options,
)

U = 2.0**-24
SHAPE = (6, 7, 3)


def randn(seed: int, shape=SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def grid(seed: int, shape=SHAPE, step: int = 64) -> torch.Tensor:
    """Multiples of 1/step in [-8, 8]: differences and halves of them are exact in float32."""
    ints = torch.randint(
        -8 * step, 8 * step + 1, shape, generator=torch.Generator().manual_seed(seed)
    )
    return ints.float() / step


def coarse_grid(seed: int, shape=SHAPE) -> torch.Tensor:
    """Multiples of 1/2: TIES magnitudes tie often at the trim threshold."""
    return grid(seed, shape, step=2)


def abc(seed: int = 0, make=randn):
    return make(seed), make(seed + 1), make(seed + 2)


def check(got: torch.Tensor, want: torch.Tensor, roundings: int, *terms: torch.Tensor):
    assert got.dtype == torch.float32 and got.shape == want.shape
    magnitude = sum(term.abs() for term in terms)
    error = (got.double() - want).abs()
    assert (error <= roundings * U * magnitude).all(), float((error / magnitude).max() / U)


# ---- the registry ----------------------------------------------------------------------

LABELS = {
    "weighted-sum": "Weighted sum",
    "add-difference": "Add difference",
    "sum-twice": "Sum Twice",
    "triple-sum": "Triple Sum",
    "train-difference": "Train Difference",
    "ties": "TIES",
    "dare": "DARE",
    "slerp": "Slerp",
}


def test_every_method_is_registered_with_the_reference_label():
    assert MERGE_METHODS.names() == tuple(LABELS)
    for name, label in LABELS.items():
        method = MERGE_METHODS.get(label)
        assert method.name == name and method.label == label
        assert method.function.__doc__ and method.formula
    inputs = {name: MERGE_METHODS[name].inputs for name in LABELS}
    assert inputs == {**dict.fromkeys(LABELS, 3), "weighted-sum": 2, "slerp": 2}
    assert [n for n in LABELS if MERGE_METHODS[n].uses_beta] == ["sum-twice", "triple-sum"]


def test_unknown_method_names_the_nearest():
    with pytest.raises(UnknownMergeMethodError) as caught:
        merge_tensor("weigthed-sum", randn(0), randn(1), alpha=0.5)
    assert str(caught.value) == (
        "unknown merge method 'weigthed-sum'; did you mean 'weighted-sum'? Expected one of: "
        "weighted-sum, add-difference, sum-twice, triple-sum, train-difference, ties, dare, "
        "slerp"
    )
    assert isinstance(caught.value, MergeError)


def test_option_defaults_follow_the_papers():
    assert resolve_options("ties", None) == {"density": 0.2}
    assert resolve_options("DARE", {}) == {"drop": 0.9, "seed": 0, "ties": False, "density": 1.0}
    assert resolve_options("dare", {"drop": 0, "ties": True, "density": 0.5})["drop"] == 0.0
    assert resolve_options("weighted-sum", None) == {}


# ---- linear methods --------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0, -0.5, 1.7])
def test_weighted_sum(alpha):
    a, b, _ = abc()
    a64, b64 = a.double(), b.double()
    got = merge_tensor("weighted-sum", a, b, alpha=alpha)
    # 1-alpha and alpha cast to float32, two products, one sum (+1: the sum's own rounding).
    check(got, (1 - alpha) * a64 + alpha * b64, 5, (1 - alpha) * a64, alpha * b64)


def test_weighted_sum_ends_are_the_models_exactly():
    a, b, _ = abc()
    assert torch.equal(merge_tensor("weighted-sum", a, b, alpha=0.0), a)
    assert torch.equal(merge_tensor("weighted-sum", a, b, alpha=1.0), b)


@pytest.mark.parametrize("alpha", [0.0, 0.35, 1.0, 2.5])
def test_add_difference(alpha):
    a, b, c = abc(3)
    a64, b64, c64 = a.double(), b.double(), c.double()
    got = merge_tensor("add-difference", a, b, c, alpha=alpha)
    # B-C, alpha cast, alpha*(B-C), the sum.
    check(got, a64 + alpha * (b64 - c64), 4, a64, alpha * b64, alpha * c64)


@pytest.mark.parametrize(("alpha", "beta"), [(0.3, 0.2), (0.0, 1.0), (0.8, -0.4)])
def test_sum_twice(alpha, beta):
    a, b, c = abc(6)
    a64, b64, c64 = a.double(), b.double(), c.double()
    got = merge_tensor("sum-twice", a, b, c, alpha=alpha, beta=beta)
    want = (1 - beta) * ((1 - alpha) * a64 + alpha * b64) + beta * c64
    # the weighted sum (5), 1-beta cast and product (2), beta cast, product, sum (3).
    terms = ((1 - beta) * (1 - alpha) * a64, (1 - beta) * alpha * b64, beta * c64)
    check(got, want, 10, *terms)


@pytest.mark.parametrize(("alpha", "beta"), [(0.3, 0.2), (0.5, 0.5), (1.2, -0.1)])
def test_triple_sum(alpha, beta):
    a, b, c = abc(9)
    a64, b64, c64 = a.double(), b.double(), c.double()
    got = merge_tensor("triple-sum", a, b, c, alpha=alpha, beta=beta)
    want = (1 - alpha - beta) * a64 + alpha * b64 + beta * c64
    # three scalar casts, three products, two sums.
    check(got, want, 8, (1 - alpha - beta) * a64, alpha * b64, beta * c64)


# ---- train difference ------------------------------------------------------------------


def train_difference64(a, b, c, alpha):
    total = (b - c).abs() + (b - a).abs()
    share = torch.where(total != 0, (b - a).abs() / torch.where(total != 0, total, 1), 0)
    return a + 1.8 * alpha * (b - c) * share


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_train_difference(alpha):
    a, b, c = abc(12)
    a64, b64, c64 = a.double(), b.double(), c.double()
    got = merge_tensor("train-difference", a, b, c, alpha=alpha)
    # share: |B-A|, |B-C|, their sum, the quotient (4); (B-C) (1) times share (1);
    # 1.8*alpha cast (1), its product (1), the sum (1).
    want = train_difference64(a64, b64, c64, alpha)
    check(got, want, 9, a64, 1.8 * abs(alpha) * (b64 - c64))


def test_train_difference_zero_denominator_adds_nothing():
    a, b, c = abc(15)
    same = torch.zeros(SHAPE, dtype=torch.bool)
    same[0] = True
    b = torch.where(same, a, b)
    c = torch.where(same, a, c)  # A = B = C on row 0: |B-C| + |B-A| = 0
    c[1] = b[1]  # B = C on row 1 (the denominator is |B-A| > 0): nothing to add either
    got = merge_tensor("train-difference", a, b, c, alpha=0.7)
    assert not got.isnan().any()
    assert torch.equal(got[0], a[0]) and torch.equal(got[1], a[1])


def test_train_difference_of_b_equal_to_a_is_a():
    a, _, c = abc(18)
    assert torch.equal(merge_tensor("train-difference", a, a.clone(), c, alpha=1.0), a)


# ---- TIES ------------------------------------------------------------------------------


def trim64(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the round(density * n) largest |delta| (at least 1) and every equal magnitude."""
    n = delta.numel()
    keep = min(n, max(1, round(density * n)))
    threshold = sorted(delta.abs().flatten().tolist(), reverse=True)[keep - 1]
    return torch.where(delta.abs() >= threshold, delta, 0)


def disjoint_mean64(deltas):
    elected = torch.sign(sum(torch.sign(d) for d in deltas))
    agree = [(torch.sign(d) == elected) & (elected != 0) for d in deltas]
    total = sum(torch.where(m, d, 0) for m, d in zip(agree, deltas, strict=True))
    count = sum(m.double() for m in agree)
    return torch.where(count > 0, total / count.clamp(min=1), 0)


@pytest.mark.parametrize(("density", "alpha"), [(0.2, 1.0), (0.5, 0.6), (1.0, 0.3)])
def test_ties(density, alpha):
    a, b, c = abc(21, make=coarse_grid)
    a64, b64, c64 = a.double(), b.double(), c.double()
    delta_a, delta_b = trim64(a64 - c64, density), trim64(b64 - c64, density)
    merged = disjoint_mean64([delta_a, delta_b])
    got = merge_tensor("ties", a, b, c, alpha=alpha, options={"density": density})
    check(got, c64 + alpha * merged, 3, c64, alpha * merged)  # alpha cast, product, sum
    if density < 1:  # the trim really trimmed, and the data has ties at the threshold
        assert 0 < (delta_a != 0).sum() < a.numel()
        kept = (a64 - c64).abs()[delta_a != 0]
        assert (kept == kept.min()).sum() > 1


def test_ties_sign_vote_counts_signs_not_sizes():
    # Per element: a tie (+1 vs -1), agreement, both zero, one alone, and +3 vs -1 (the
    # sum of signs is 0: a tie again, though the sum of deltas is positive).
    c = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.5])
    a = c + torch.tensor([1.0, 1.0, 0.0, 2.0, 3.0])
    b = c + torch.tensor([-1.0, 3.0, 0.0, 0.0, -1.0])
    got = merge_tensor("ties", a, b, c, alpha=0.5, options={"density": 1.0})
    assert got.tolist() == [0.5, 0.5 + 0.5 * 2.0, 0.5, 0.5 + 0.5 * 2.0, 0.5]


def test_ties_all_zero_deltas_give_c():
    c = randn(24)
    got = merge_tensor("ties", c.clone(), c.clone(), c, alpha=0.8)
    assert torch.equal(got, c)


def test_ties_keeps_at_least_one_element():
    c = torch.zeros(10)
    a = torch.arange(1.0, 11.0)
    got = merge_tensor("ties", a, c.clone(), c, alpha=1.0, options={"density": 0.01})
    assert got.tolist() == [0.0] * 9 + [10.0]


# ---- DARE ------------------------------------------------------------------------------


def test_dare_without_drop_is_add_difference_exactly():
    a, b, c = abc(27)
    plain = merge_tensor("dare", a, b, c, alpha=0.7, key="k", options={"drop": 0.0})
    assert torch.equal(plain, merge_tensor("add-difference", a, b, c, alpha=0.7))
    dare_ties = {"drop": 0.0, "ties": True}
    got = merge_tensor("dare", a, b, c, alpha=0.7, key="k", options=dare_ties)
    assert torch.equal(got, merge_tensor("ties", a, b, c, alpha=0.7, options={"density": 1.0}))


def test_dare_drops_and_rescales():
    a, b, c = abc(30, make=grid)
    a64, b64, c64 = a.double(), b.double(), c.double()
    options = {"drop": 0.5, "seed": 7}
    got = merge_tensor("dare", a, b, c, alpha=0.8, key="model.w", options=options)
    keep = dare_keep_mask(SHAPE, drop=0.5, seed=7, key="model.w", model="B")
    delta = torch.where(keep, (b64 - c64) / 0.5, 0)
    check(got, a64 + 0.8 * delta, 3, a64, 0.8 * delta)  # /0.5 is exact
    moved = b != c
    assert torch.equal(got[~keep & moved], a[~keep & moved])  # dropped: A exactly
    assert (got[keep & moved] != a[keep & moved]).all()


def test_dare_before_ties():
    a, b, c = abc(33, make=grid)
    a64, b64, c64 = a.double(), b.double(), c.double()
    options = {"drop": 0.5, "seed": 1, "ties": True}
    got = merge_tensor("dare", a, b, c, alpha=0.9, key="k", options=options)
    masks = [dare_keep_mask(SHAPE, drop=0.5, seed=1, key="k", model=m) for m in "AB"]
    assert not torch.equal(masks[0], masks[1])  # A and B are dropped independently
    deltas = [torch.where(m, (x - c64) / 0.5, 0) for m, x in zip(masks, (a64, b64), strict=True)]
    merged = disjoint_mean64(deltas)
    check(got, c64 + 0.9 * merged, 3, c64, 0.9 * merged)


@pytest.mark.parametrize("drop", [0.1, 0.9])
def test_dare_mask_drops_the_asked_fraction(drop):
    n = 100_000
    keep = dare_keep_mask((n,), drop=drop, seed=0, key="k", model="B")
    sigma = math.sqrt(n * drop * (1 - drop))  # binomial count of kept elements
    assert abs(int(keep.sum()) - n * (1 - drop)) < 6 * sigma


def test_dare_seed_depends_on_seed_and_key_only():
    a, b, c = abc(36)
    options = {"drop": 0.5, "seed": 3}
    first = merge_tensor("dare", a, b, c, alpha=1.0, key="x.weight", options=options)
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        torch.rand(1000)  # the global generator does not matter
        again = merge_tensor("dare", a, b, c, alpha=1.0, key="x.weight", options=options)
    assert torch.equal(first, again)
    other_key = merge_tensor("dare", a, b, c, alpha=1.0, key="y.weight", options=options)
    other_seed = merge_tensor("dare", a, b, c, alpha=1.0, key="x.weight", options={"drop": 0.5})
    assert not torch.equal(first, other_key) and not torch.equal(first, other_seed)


def test_dare_results_do_not_depend_on_merge_order():
    keys = [f"model.diffusion_model.k{i}" for i in range(4)]
    tensors = {k: abc(40 + 3 * i) for i, k in enumerate(keys)}
    options = {"drop": 0.6, "seed": 11, "ties": True}

    def merged(order):
        return {
            k: merge_tensor("dare", *tensors[k], alpha=0.5, key=k, options=options) for k in order
        }

    forward, backward = merged(keys), merged(reversed(keys))
    assert all(torch.equal(forward[k], backward[k]) for k in keys)


# ---- slerp -----------------------------------------------------------------------------


def slerp64(a, b, t):
    norm_a, norm_b = a.norm(), b.norm()
    angle = torch.arccos((a * b).sum() / (norm_a * norm_b))
    direction = (torch.sin((1 - t) * angle) * a / norm_a + torch.sin(t * angle) * b / norm_b) / (
        torch.sin(angle)
    )
    return ((1 - t) * norm_a + t * norm_b) * direction, angle, direction


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 1.0])
def test_slerp(alpha):
    a, b = randn(50), 3 * randn(51)
    a64, b64 = a.double(), b.double()
    want, angle, _ = slerp64(a64, b64, alpha)
    assert math.pi / 4 <= angle <= 3 * math.pi / 4  # the premise of the bound below
    # Norms and the dot product in float32 carry at most n*U relative error, so cos is off by
    # <= 3nU, the angle by <= 3nU/sin(angle) <= 4.3nU, and each weight's log by <= 2.3 times
    # that (|d log w / d angle| <= 1/angle + |cot angle| on [pi/4, 3pi/4]) plus 2nU from the
    # norm ratio: <= 13nU; then the weight casts, products and sum round 7 times.
    n = a.numel()
    norm = (1 - alpha) * a64.norm() + alpha * b64.norm()
    weight_a = math.sin((1 - alpha) * angle) / math.sin(angle) * norm / a64.norm()
    weight_b = math.sin(alpha * angle) / math.sin(angle) * norm / b64.norm()
    got = merge_tensor("slerp", a, b, alpha=alpha)
    check(got, want, 13 * n + 7, weight_a * a64, weight_b * b64)


def test_slerp_interpolates_the_norm():
    a, b = randn(52), 5 * randn(53)
    got = merge_tensor("slerp", a, b, alpha=0.3).double()
    want = 0.7 * a.double().norm() + 0.3 * b.double().norm()
    assert abs(got.norm() - want) <= 1e-5 * want


@pytest.mark.parametrize("factor", [2.5, 1.0, -1.0])
def test_slerp_of_parallel_or_opposite_vectors_is_the_weighted_sum(factor):
    a = randn(54)
    b = factor * a
    got = merge_tensor("slerp", a, b, alpha=0.4)
    a64, b64 = a.double(), b.double()
    check(got, 0.6 * a64 + 0.4 * b64, 5, 0.6 * a64, 0.4 * b64)
    assert torch.equal(got, merge_tensor("weighted-sum", a, b, alpha=0.4))


def test_slerp_with_a_zero_tensor_scales_the_other():
    b = randn(55)
    zero = torch.zeros(SHAPE)
    assert torch.equal(merge_tensor("slerp", zero, b, alpha=0.25), 0.25 * b)
    assert torch.equal(merge_tensor("slerp", zero, zero.clone(), alpha=0.5), zero)


# ---- inputs ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(LABELS))
def test_every_method_gives_a_new_float32_tensor_and_keeps_its_inputs(name):
    a, b, c = (t.half() for t in abc(60))
    copies = [t.clone() for t in (a, b, c)]
    c_in = c if MERGE_METHODS[name].inputs == 3 else None
    options = {"drop": 0.3} if name == "dare" else None
    got = merge_tensor(name, a, b, c_in, alpha=0.4, beta=0.3, key="k", options=options)
    assert got.dtype == torch.float32 and got.shape == a.shape
    assert all(torch.equal(t, copy) for t, copy in zip((a, b, c), copies, strict=True))
    c32 = c.float() if c_in is not None else None
    again = merge_tensor(
        name, a.float(), b.float(), c32, alpha=0.4, beta=0.3, key="k", options=options
    )
    assert torch.equal(got, again)


def test_integer_tensors_are_refused():
    ids = torch.arange(77).unsqueeze(0)
    key = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    with pytest.raises(MergeError) as caught:
        merge_tensor("weighted-sum", ids, ids.clone(), alpha=0.5, key=key)
    assert str(caught.value) == (
        f"merge key {key!r}: model A tensor has dtype torch.int64; expected a floating-point "
        "tensor (integer tensors such as position_ids are copied, never merged)"
    )


def test_shapes_must_match():
    with pytest.raises(MergeError) as caught:
        merge_tensor("add-difference", randn(0), randn(1), randn(2, (6, 7, 4)), alpha=1, key="w")
    assert str(caught.value) == (
        "merge key 'w': shapes differ (A (6, 7, 3), B (6, 7, 3), C (6, 7, 4)); expected one "
        "shape in every model"
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": math.nan}, "merge key 'k': alpha=nan; expected a finite number"),
        ({"alpha": 0.5, "beta": math.inf}, "merge key 'k': beta=inf; expected a finite number"),
        ({"alpha": "0.5"}, "merge key 'k': alpha='0.5'; expected a finite number"),
    ],
)
def test_multipliers_must_be_finite_numbers(kwargs, message):
    with pytest.raises(MergeError) as caught:
        merge_tensor("weighted-sum", randn(0), randn(1), key="k", **kwargs)
    assert str(caught.value) == message


def test_model_c_is_needed_by_three_model_methods_only():
    a, b, c = abc()
    with pytest.raises(MergeError) as caught:
        merge_tensor("add-difference", a, b, alpha=0.5)
    assert str(caught.value) == "merge: merge method 'add-difference' needs model C; got None"
    with pytest.raises(MergeError) as caught:
        merge_tensor("slerp", a, b, c, alpha=0.5)
    assert str(caught.value) == (
        "merge: merge method 'slerp' merges models A and B; got a tensor for model C (pass c=None)"
    )


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("ties", {"densty": 0.5}, "merge method 'ties': unknown option 'densty'; expected density"),
        (
            "weighted-sum",
            {"drop": 0.5},
            "merge method 'weighted-sum': unknown option 'drop'; expected no options",
        ),
        (
            "ties",
            {"density": 0.0},
            "merge method 'ties': option density=0.0; expected a fraction, 0 < density <= 1 (kept)",
        ),
        (
            "ties",
            {"density": math.nan},
            "merge method 'ties': option density=nan; expected a fraction, 0 < density <= 1 (kept)",
        ),
        (
            "dare",
            {"drop": 1.0},
            "merge method 'dare': option drop=1.0; expected a fraction, 0 <= drop < 1 (dropped)",
        ),
        ("dare", {"seed": 1.5}, "merge method 'dare': option seed=1.5; expected a whole number"),
        ("dare", {"ties": "yes"}, "merge method 'dare': option ties='yes'; expected true or false"),
        ("dare", {"density": 0.5}, "merge method 'dare': density applies with ties=true only"),
    ],
)
def test_bad_options(method, options, message):
    with pytest.raises(MergeError) as caught:
        resolve_options(method, options)
    assert str(caught.value) == message
