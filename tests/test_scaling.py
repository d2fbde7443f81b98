"""The pure scaling math: rounding rules on known values, plans, φ lists, network keys."""

import math

import pytest

from orchestrator import scaling


@pytest.mark.parametrize(
    "channels, width, expected",
    [
        (32, 1.0, 32),  # width 1 is the identity
        (32, 1.1, 32),  # 35.2 -> 32 (lost 9%, within the 10% rule)
        (1280, 1.1, 1408),  # B2 head
        (32, 1.2, 40),  # B3 stem: 38.4 -> 40
        (16, 1.2, 24),  # 19.2 -> 16 loses 17% -> add 8
        (320, 2.0, 640),  # B7 last stage
        (1, 1.5, 8),  # never below the divisor
        (40, 1.1, 48),  # 44 rounds half up to 48
    ],
)
def test_round_filters_matches_tf_reference(channels, width, expected):
    assert scaling.round_filters(channels, width) == expected


@pytest.mark.parametrize(
    "repeats, depth, expected",
    [(1, 1.0, 1), (1, 1.1, 2), (2, 1.1, 3), (4, 3.1, 13), (3, 1.8, 6), (4, 1.2, 5)],
)
def test_round_repeats_is_ceil(repeats, depth, expected):
    assert scaling.round_repeats(repeats, depth) == expected


@pytest.mark.parametrize("res, expected", [(224, 224), (257.6, 256), (296.2, 296), (3, 8), (300, 304)])
def test_round_resolution(res, expected):
    assert scaling.round_resolution(res) == expected


def test_constraint_value_of_paper_point():
    c = scaling.Coefficients(*scaling.PAPER_POINT)
    assert c.flops_factor == pytest.approx(1.2 * 1.1**2 * 1.15**2)
    assert c.flops_factor == pytest.approx(1.92, abs=0.005)
    d, w, r = c.multipliers(2)
    assert (d, w, r) == pytest.approx((1.44, 1.21, 1.3225))


@pytest.mark.parametrize("bad", [(0.9, 1, 1), (1, 0.5, 1), (1, 1, float("nan")), (5, 1, 1)])
def test_coefficients_refuse_out_of_range(bad):
    with pytest.raises(ValueError):
        scaling.Coefficients(*bad)


def test_decode_block_and_bad_block():
    b = scaling.decode_block("r2_k5_s22_e6_i24_o40_se0.25")
    assert b == {"repeats": 2, "kernel": 5, "stride": 2, "expand": 6, "in": 24, "out": 40, "se": 0.25}
    with pytest.raises(ValueError, match="not a block string"):
        scaling.decode_block("r2_k5_s21_e6_i24_o40_se0.25")


def test_b0_spec_is_the_reference():
    spec = scaling.network_spec(1.0, 1.0, 224)
    assert [s["repeats"] for s in spec["stages"]] == [1, 2, 2, 3, 3, 4, 1]
    assert [s["out"] for s in spec["stages"]] == [16, 24, 40, 80, 112, 192, 320]
    assert (spec["stem"], spec["head"]) == (32, 1280)


def test_network_key_merges_coefficients_that_round_alike():
    # ceil(1.1*r) == ceil(1.2*r) for every B0 stage, so α=1.1 and α=1.2 train the same network.
    a = scaling.network_spec(1.1, 1.0, 224)
    b = scaling.network_spec(1.2, 1.0, 224)
    c = scaling.network_spec(1.4, 1.0, 224)
    assert scaling.network_key(a) == scaling.network_key(b)
    assert scaling.network_key(a) != scaling.network_key(c)
    # resolution is part of the key
    assert scaling.network_key(a) != scaling.network_key(scaling.network_spec(1.1, 1.0, 232))


@pytest.mark.parametrize(
    "text, expected",
    [("1-7", [1, 2, 3, 4, 5, 6, 7]), ("1,3,5", [1, 3, 5]), ("0.5", [0.5]), ("2, 0.5,2", [0.5, 2]), ("3-3", [3])],
)
def test_parse_phis(text, expected):
    assert scaling.parse_phis(text) == expected


@pytest.mark.parametrize(
    "text, match",
    [("7-1", "backwards"), ("0", "above 0"), ("", "empty"), ("1,,2", "empty item"), ("a", "not a number"),
     ("-1", "above 0"), ("11", "at most"), ("inf", "above 0")],
)
def test_parse_phis_refuses(text, match):
    with pytest.raises(ValueError, match=match):
        scaling.parse_phis(text)


def test_compound_plan_uses_powers_and_rounds_resolution():
    plan = scaling.compound_plan(scaling.Coefficients(1.2, 1.1, 1.15), [1, 2], base_resolution=224)
    assert [e.name for e in plan] == ["B0", "B1", "B2"]
    assert plan[0].resolution == 224
    assert plan[1].resolution == 258  # 224 * 1.15 = 257.6, to the nearest pixel as the search does
    assert plan[2].resolution == 296  # 224 * 1.15**2 = 296.24
    assert plan[2].theory_factor == pytest.approx(scaling.constraint_value(1.2, 1.1, 1.15) ** 2)
    small = scaling.compound_plan(scaling.Coefficients(1.2, 1.1, 1.15), [1, 2], base_resolution=40)
    assert [e.resolution for e in small] == [40, 46, 53]  # a multiple of 8 would be 48 and 56
    no_base = scaling.compound_plan(scaling.Coefficients(1.2, 1.1, 1.15), [0.5], baseline=False)
    assert [e.name for e in no_base] == ["B0.5"]


def test_official_plan_native_and_scaled_resolutions():
    native = scaling.official_plan()
    assert [e.resolution for e in native] == [224, 240, 260, 300, 380, 456, 528, 600]
    small = scaling.official_plan(base_resolution=64)
    assert small[0].resolution == 64
    assert [e.resolution for e in small[1:]] == [scaling.round_resolution(n * 64 / 224) for n in (240, 260, 300, 380, 456, 528, 600)]
    assert scaling.official_plan(names=["B3"], baseline=False)[0].name == "B3"


def test_compound_dropout_follows_official_table():
    assert scaling.compound_dropout(0) == 0.2
    assert scaling.compound_dropout(2.5) == 0.3
    assert scaling.compound_dropout(9) == 0.5
    assert math.isclose(scaling.compound_dropout(7), 0.5)
