"""HALO hardware-aware quantizer: hardware model and JSON schema, code books, plan, estimate, accuracy.

Reference computations are independent NumPy code (popcount/bit-span delays, alpha-power voltage scaling,
nearest-code assignment, brute-force books, 3-sigma rule, top-k saliency, the cost model written out
again), never the library's own output.
"""

import itertools
import json
import math
import os

import halo
import numpy as np
import pytest
import real_models
from halo import _core, hwq
from hypothesis import given, settings
from hypothesis import strategies as st

MINILM = str(real_models.minilm_folder())
NOMINAL = 2  # (1.0 V, 1.9 GHz) in the default model


def _rows(v):
    return bin(abs(v)).count("1")


def _span(v):
    m = abs(v)
    return 0 if m == 0 else m.bit_length() - ((m & -m).bit_length() - 1)


def _voltage_factor(volts):
    return (volts / (volts - 0.35) ** 1.3) / (1.0 / 0.65**1.3)


def _structural(v, bits):
    base, row, span, negative = (0.15, 0.08, 0.045, 0.04) if bits == 4 else (0.21, 0.01, 0.035, 0.01)
    return base if v == 0 else base + row * (_rows(v) - 1) + span * _span(v) + negative * (v < 0)


# ---- hardware model -------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
def test_default_delays_follow_rows_span_sign_and_voltage(bits):
    hw = halo.HardwareModel()
    points = hw.operating_points
    assert [(p["voltage"], p["frequency_ghz"]) for p in points] == [
        (0.8, 1.9),
        (0.9, 1.9),
        (1.0, 1.9),
        (1.1, 2.4),
        (1.2, 3.7),
    ]
    for p, point in enumerate(points):
        delays = hw.delays(bits, p)
        assert len(delays) == 2**bits and min(delays) == -(2 ** (bits - 1))
        for v, d in delays.items():
            assert d == pytest.approx(_structural(v, bits) * _voltage_factor(point["voltage"]), rel=1e-12)
    nominal = hw.delays(bits)
    for a in nominal:
        for b in nominal:
            if 0 in (a, b) or (a < 0) != (b < 0):
                continue
            if _span(a) == _span(b) and _rows(a) < _rows(b):
                assert nominal[a] < nominal[b], (a, b)
            if _rows(a) == _rows(b) and _span(a) < _span(b):
                assert nominal[a] < nominal[b], (a, b)


def test_admitted_sets_follow_each_corner_and_the_paper_anecdotes():
    hw = halo.HardwareModel()
    for bits in (4, 8):
        for p, point in enumerate(hw.operating_points):
            delays = hw.delays(bits, p)
            expected = tuple(v for v in sorted(delays) if delays[v] <= 1.0 / point["frequency_ghz"])
            assert hw.admitted(p, bits) == expected
    assert len(hw.admitted(NOMINAL, 8)) == 256 and hw.nominal_point(8) == NOMINAL
    assert 64 in hw.admitted(4, 8) and -127 not in hw.admitted(3, 8)  # 64 meets 3.7 GHz, -127 only 1.9 GHz
    assert all(_rows(v) <= 2 for v in hw.admitted(4, 8))
    assert hw.admitted(4, 4) == (-8, -4, -2, -1, 0, 1, 2, 4)
    assert [p["book_size"] for p in hw.operating_points] == [16, 16, 16, 16, 9]
    assert hw.ladder("performance") == (2, 3, 4) and hw.ladder("energy") == (2, 1, 0)
    energies = hw.energies(8)
    assert all(energies[v] == pytest.approx(0.03 * _rows(v)) for v in energies)


def test_json_round_trip_and_per_corner_tables(tmp_path):
    hw = halo.HardwareModel()
    path = tmp_path / "hw.json"
    hw.save(path)
    assert halo.HardwareModel.load(path) == hw
    data = json.loads(path.read_text())
    assert data["version"] == 2
    data["operating_points"] = data["operating_points"][2:]
    data["delay_ns"]["int8"] = [[0.2] * 256, [0.9] * 128 + [0.2] * 128, [0.1] * 256]  # one table per corner
    data["delay_ns"]["int4"] = [0.2] * 16  # one table for every corner
    data["operating_points"][2]["book_size"] = 5
    custom = halo.HardwareModel.from_dict(data)
    assert custom.admitted(1, 8) == tuple(range(128))  # negatives too slow at that corner
    assert len(custom.admitted(2, 8)) == 256 and custom.operating_points[2]["book_size"] == 5
    custom.save(path)
    assert halo.HardwareModel.load(path).to_dict() == custom.to_dict()
    # An activity table instead of energies.
    data = hw.to_dict()
    del data["energy_pj"]
    data["activity"] = {"int4": [0.5] * 16, "int8": [0.25] * 256}
    data["mac_energy_pj"] = 0.4
    assert all(e == pytest.approx(0.1) for e in halo.HardwareModel.from_dict(data).energies(8).values())


V1_DOCUMENT = {
    "schema": "halo.hwq.hardware_model",
    "version": 1,
    "delay_ns": {"int4": [0.3] * 16, "int8": [0.3] * 256},
    "operating_points": [
        {"voltage": 1.0, "frequency_ghz": 1.9, "power_w": 1.0},
        {"voltage": 1.2, "frequency_ghz": 3.0, "power_w": 2.3},
    ],
    "switch_cost_ns": 50.0,
    "switch_energy_nj": 5.0,
    "static_power_w": 0.5,
    "mac_array": [32, 32],
    "sparse_macs_per_cycle": 64,
    "tile": [128, 128],
}


def test_version_1_documents_still_load_with_their_power_model():
    hw = halo.HardwareModel.from_dict(V1_DOCUMENT)
    assert hw.energy_model == "power"
    assert hw.operating_points[1]["power_w"] == 2.3 and hw.operating_points[1]["book_size"] == 16
    assert hw.nominal_point(8) == 1  # every delay fits 3.0 GHz
    no_version = {k: v for k, v in V1_DOCUMENT.items() if k != "version"}
    assert halo.HardwareModel.from_dict(no_version) == hw
    # The power model prices time at each point: with every tile at the single fastest point and no side
    # part, energy = time * (power + static power), as version 1 defined it.
    w = _heavy_tailed((64, 64), 0)
    q = halo.halo_quantize(w, hw=hw, tile=(32, 32), salient_fraction=0, outlier_sigma=0)
    e = q.estimate()
    ns = 64 * 64 * 128 / 1024 / 3.0
    assert e.halo.latency_ns == pytest.approx(ns)
    assert e.halo.energy_nj == pytest.approx(ns * 2.3 + ns * 0.5)


def _edited(edit):
    data = halo.HardwareModel().to_dict()
    edit(data)
    return data


@pytest.mark.parametrize(
    "data, message",
    [
        (_edited(lambda d: d["delay_ns"].__setitem__("int4", [0.2] * 15)), "must hold 16 delays"),
        (_edited(lambda d: d["delay_ns"]["int8"][3].__setitem__(3, -1.0)), "value -125"),
        (_edited(lambda d: d["delay_ns"].__setitem__("int8", [[0.2] * 256] * 2)), "per-point tables"),
        (
            _edited(lambda d: d["operating_points"][4].__setitem__("frequency_ghz", 2.0)),
            "ascending frequency",
        ),
        (_edited(lambda d: d.pop("switch_cost_ns")), "switch_cost_ns"),
        (_edited(lambda d: d.__setitem__("mac_array", [32])), "mac_array"),
        (_edited(lambda d: d["operating_points"][0].__setitem__("voltage", "high")), "voltage"),
        (_edited(lambda d: d["operating_points"][0].__setitem__("book_size", 300)), "book_size"),
        (_edited(lambda d: d["operating_points"][0].__setitem__("book_size", 2.5)), "book_size"),
        (_edited(lambda d: d["energy_pj"]["int8"].__setitem__(0, -1)), "energy_pj.int8"),
        (_edited(lambda d: d.__setitem__("activity", {"int4": [0] * 16, "int8": [0] * 256})), "not both"),
        (_edited(lambda d: d.__setitem__("tile", [0, 128])), "tile"),
        (_edited(lambda d: d.__setitem__("colour", "red")), "unknown field 'colour'"),
        (_edited(lambda d: d["memory"].__setitem__("bandwidth_gbps", -1)), "bandwidth_gbps"),
        (_edited(lambda d: d.__setitem__("version", 7)), "version"),
        (_edited(lambda d: d.__setitem__("memory", 5)), "'memory' must be a JSON object"),
        (_edited(lambda d: d.__setitem__("operating_points", [])), "non-empty list"),
        (dict(V1_DOCUMENT, energy_pj={"int4": [0] * 16, "int8": [0] * 256}), "unknown field 'energy_pj'"),
    ],
)
def test_bad_tables_are_rejected_naming_the_field(data, message):
    with pytest.raises(ValueError, match=message):
        halo.HardwareModel.from_dict(data)


def test_integer_overflow_in_the_table_shows_the_real_value():
    # Regression: a mac_array beyond int wrapped to 0 and the message said "got 0x0".
    data = dict(V1_DOCUMENT, mac_array=[2**32, 2**32])
    with pytest.raises(ValueError) as error:
        halo.HardwareModel.from_dict(data)
    assert "4294967296" in str(error.value) and "0x0" not in str(error.value)
    with pytest.raises(ValueError, match="sparse_macs_per_cycle.*1e\\+40"):
        halo.HardwareModel.from_dict(dict(V1_DOCUMENT, sparse_macs_per_cycle=1e40))


def test_malformed_json_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="not valid JSON"):
        halo.HardwareModel.from_json("{nope")
    with pytest.raises(ValueError, match="cannot read"):
        halo.HardwareModel.load(tmp_path / "absent.json")
    with pytest.raises(TypeError, match="JSON text"):
        halo.HardwareModel(b"{}")


def test_hardware_model_crosses_into_cpp_once():
    hw = halo.HardwareModel()
    assert isinstance(hw._model, _core.hwq.HardwareModel)
    assert hw._model.num_points == 5
    with pytest.raises(TypeError):  # the quantizer takes the parsed object, not JSON text
        _core.hwq.quantize(
            np.ones((4, 4), np.float32), None, hw.to_json(), "subset", "performance", "sensitivity",
            "balanced", [], [], 4, 4, 0.0, 0.0, 3, True, 1, 0.0, 128, "auto",
        )  # fmt: skip


# ---- quantizer ------------------------------------------------------------------------------------------


def _heavy_tailed(shape, seed):
    return (np.random.default_rng(seed).standard_t(4, size=shape) * 0.02).astype(np.float32)


def test_tiles_use_books_drawn_from_what_their_point_admits():
    w = _heavy_tailed((200, 300), 0)
    hw = halo.HardwareModel()
    q = halo.halo_quantize(w, tile=(32, 48), preset="accuracy")
    seen = set()
    for tile in q.tiles:
        block = q.codes[tile.row : tile.row + tile.shape[0], tile.col : tile.col + tile.shape[1]]
        assert set(np.unique(block).tolist()) <= set(tile.code_book)
        assert set(tile.code_book) <= set(hw.admitted(tile.point, 8))
        assert len(tile.code_book) <= hw.operating_points[tile.point]["book_size"]
        assert tile.frequency_ghz == hw.operating_points[tile.point]["frequency_ghz"]
        seen.add(tile.point)
    assert seen == {2, 3}  # accuracy: the most sensitive half at nominal, the rest at 2.4 GHz
    assert not q.codes.flags.writeable
    performance = halo.halo_quantize(w, tile=(32, 48), preset="performance")
    assert {t.point for t in performance.tiles} == {3, 4}
    assert all(len(b) <= 9 for p, b in zip(performance.ladder, performance.books) if p == 4)


def _brute_force_book(ratios, weights, admitted, size):
    best, best_cost = None, math.inf
    for book in itertools.combinations(admitted, size):
        values = np.array(book, np.float64)
        distance = np.abs(ratios[:, None] - values[None, :])
        nearest = values[np.argmin(distance, axis=1)]
        cost = float((weights * (ratios - nearest) ** 2).sum())
        if cost < best_cost:
            best, best_cost = book, cost
    return best, best_cost


@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_best_book_is_the_exact_optimum(size):
    rng = np.random.default_rng(size)
    ratios = (rng.standard_t(3, 400) * 20).astype(np.float32)
    weights = rng.random(400).astype(np.float32)
    admitted = [-96, -48, -24, -12, -6, -3, 0, 2, 7, 16, 33, 64, 120]
    book = _core.hwq.best_book(ratios, weights, admitted, size)
    values = np.array(book, np.float64)
    r, w = ratios.astype(np.float64), weights.astype(np.float64)
    cost = float((w * (r - values[np.argmin(np.abs(r[:, None] - values), axis=1)]) ** 2).sum())
    _, optimum = _brute_force_book(r, w, admitted, size)
    assert len(book) == size and set(book) <= set(admitted)
    assert cost == pytest.approx(optimum, rel=1e-9)


def test_energy_weight_buys_lower_switching_activity():
    w = _heavy_tailed((256, 256), 1)
    hw = halo.HardwareModel()
    energies = hw.energies(8)

    def activity(q):
        return float(np.mean([energies[int(c)] for c in q.codes.ravel()]))

    plain = halo.halo_quantize(w, tile=(64, 64), energy_weight=0.0)
    frugal = halo.halo_quantize(w, tile=(64, 64), energy_weight=0.3)
    assert activity(frugal) < 0.9 * activity(plain)
    assert hwq.weighted_error(w, frugal.dequantize()) < 1.3 * hwq.weighted_error(w, plain.dequantize())


def _cumulative_split(score, mass, split):
    order = sorted(range(len(score)), key=lambda t: -score[t])
    wanted = [len(split)] * len(score)
    before, total = 0.0, sum(mass)
    for t in order:
        share = before / total
        for r, threshold in enumerate(split):
            if share < threshold:
                wanted[t] = r
                break
        before += mass[t]
    return wanted


@pytest.mark.parametrize(
    "preset, split", [("performance", (0.0, 0.5)), ("balanced", (0.0, 0.8)), ("accuracy", (0.5, 1.0))]
)
def test_tiles_follow_the_cumulative_sensitivity_split(preset, split):
    w = _heavy_tailed((128, 192), 2)
    s = (np.random.default_rng(3).random((128, 192)) ** 4).astype(np.float32)
    q = halo.halo_quantize(w, s, tile=(32, 32), preset=preset, salient_fraction=0, outlier_sigma=0)
    tiles = [s[r : r + 32, c : c + 32] for r in range(0, 128, 32) for c in range(0, 192, 32)]
    wanted = _cumulative_split(
        [t.mean() for t in tiles], [float(t.sum(dtype=np.float64)) for t in tiles], split
    )
    assert [q.ladder.index(int(p)) for p in q.wanted_point] == wanted
    assert np.allclose(q.tile_score, [t.mean(dtype=np.float64) for t in tiles], rtol=1e-6)
    assert np.array_equal(q.plan.point, q.wanted_point)  # three rungs, three switches: no compromise
    explicit = halo.halo_quantize(w, s, tile=(32, 32), split=split, salient_fraction=0, outlier_sigma=0)
    assert np.array_equal(explicit.wanted_point, q.wanted_point)


def test_error_gain_assignment_keeps_its_shares():
    w = _heavy_tailed((128, 128), 4)
    q = halo.halo_quantize(w, tile=(32, 32), tier_fractions=(0.25, 0.25, 0.5), max_switches=3)
    counts = np.bincount([q.ladder.index(int(p)) for p in q.wanted_point], minlength=3)
    assert counts.tolist() == [4, 4, 8]


def test_sparse_part_holds_salient_and_outliers_and_restores_them_exactly():
    w = _heavy_tailed((96, 160), 1)
    s = np.random.default_rng(2).random((96, 160)).astype(np.float32)
    q = halo.halo_quantize(
        w, s, tile=(32, 32), salient_fraction=0.01, outlier_sigma=3.0, sparse_dtype="float32"
    )
    kept = q.sparse.to_dense() != 0
    k = int(np.ceil(0.01 * w.size))
    score = (s * w * w).ravel()
    salient = np.zeros(w.size, bool)
    salient[np.argsort(-score, kind="stable")[:k]] = True
    mean = w.astype(np.float64).mean(1, keepdims=True)
    std = w.astype(np.float64).std(1, keepdims=True)
    expected = salient.reshape(w.shape) | (np.abs(w - mean) > 3.0 * std)
    assert np.array_equal(kept, expected)
    assert np.array_equal(q.dequantize()[expected], w[expected])
    assert np.all(np.diff(q.sparse.indptr) == expected.sum(1))
    half = halo.halo_quantize(w, s, tile=(32, 32), salient_fraction=0.01, outlier_sigma=3.0)
    assert half.sparse_dtype == "float16"
    assert np.array_equal(half.dequantize()[expected], w[expected].astype(np.float16).astype(np.float32))
    assert half.stored_bits == pytest.approx(q.stored_bits - 16 * q.sparse.nnz / w.size)
    huge = w.copy()
    huge[3, 5] = 1e6
    with pytest.raises(ValueError, match="does not fit float16"):
        halo.halo_quantize(huge, tile=(32, 32))
    assert halo.halo_quantize(huge, tile=(32, 32), sparse_dtype="float32").dequantize()[3, 5] == 1e6


@pytest.mark.parametrize("max_switches", [0, 1, 2, 3])
def test_switch_budget_is_respected(max_switches):
    w = _heavy_tailed((256, 256), 3)
    q = halo.halo_quantize(w, tile=(32, 32), preset="accuracy", split=(0.3, 0.8), max_switches=max_switches)
    points = q.plan.point[q.plan.order]
    assert int(np.count_nonzero(np.diff(points))) == q.plan.switches <= max_switches
    assert sorted(q.plan.order.tolist()) == list(range(64))
    rung = [q.ladder.index(int(p)) for p in q.plan.point]
    wanted = [q.ladder.index(int(p)) for p in q.wanted_point]
    assert all(r <= w for r, w in zip(rung, wanted))  # never more aggressive than the tile allows
    if max_switches >= 2:
        assert rung == wanted


def _numpy_dequantize(w, q):
    """Re-quantizes the dense part with the plan's books and scales, then applies the CSR part."""
    dense = w.copy()
    kept = q.sparse.to_dense() != 0
    dense[kept] = 0
    out = np.zeros_like(w)
    tr, tc = q.tile_shape
    gcols = -(-w.shape[1] // tc)
    for index, point in enumerate(q.plan.point):
        r0, c0 = (index // gcols) * tr, (index % gcols) * tc
        book = np.array(q.book_of(int(point)), np.float32)
        x = dense[r0 : r0 + tr, c0 : c0 + tc]
        scale = q.scales[r0 : r0 + tr, index % gcols][:, None]
        safe = np.where(scale == 0, np.float32(1), scale)
        ratio = (x / safe).astype(np.float32)
        nearest = np.searchsorted((book[1:] + book[:-1]) / 2, ratio, side="left")  # ties to the smaller
        out[r0 : r0 + tr, c0 : c0 + tc] = np.where(scale == 0, np.float32(0), book[nearest]) * scale
    out[kept] = w[kept].astype(np.float16 if q.sparse_dtype == "float16" else np.float32).astype(np.float32)
    return out


@pytest.mark.parametrize("grid", ["subset", "int4", "int8"])
@pytest.mark.parametrize("channel_scales", [True, False])
def test_dequantize_matches_numpy_reimplementation(grid, channel_scales):
    w = _heavy_tailed((130, 200), 4)
    s = np.random.default_rng(5).random((130, 200)).astype(np.float32) + 0.1
    q = halo.halo_quantize(w, s, tile=(64, 48), grid=grid, channel_scales=channel_scales, preset="accuracy")
    assert np.array_equal(q.dequantize(), _numpy_dequantize(w, q))
    assert q.bits == (4 if grid == "int4" else 8)
    if not channel_scales:
        for tile in q.tiles:
            assert np.all(tile.scale == tile.scale[0])


def _code_bits(k):
    return max(0, math.ceil(math.log2(k)))


def test_estimate_matches_an_independent_cost_model():
    hw = halo.HardwareModel()
    model = hw.to_dict()
    w = _heavy_tailed((96, 100), 6)
    tokens = 64
    q = halo.halo_quantize(w, tile=(32, 32), preset="accuracy", split=(0.4, 0.7), tokens=tokens)
    e = q.estimate()
    points, energies = hw.operating_points, hw.energies(8)
    macs_per_cycle = 32 * 32
    dense_ns = dynamic = leakage = code_bits = 0.0
    for tile in q.tiles:
        p = points[tile.point]
        ns = tile.shape[0] * tile.shape[1] * tokens / macs_per_cycle / p["frequency_ghz"]
        dense_ns += ns
        block = q.codes[tile.row : tile.row + tile.shape[0], tile.col : tile.col + tile.shape[1]]
        dynamic += 1e-3 * sum(energies[int(c)] for c in block.ravel()) * p["voltage"] ** 2 * tokens
        leakage += ns * p["leakage_w"]
        code_bits += block.size * _code_bits(len(tile.code_book))
    used = {q.ladder.index(t.point) for t in q.tiles}
    book_bits = sum(8 * len(q.books[r]) for r in used)
    nnz = q.sparse.nnz
    bits = (code_bits + book_bits + 32 * q.scales.size + nnz * (16 + 16) + 16 * 96 * (nnz > 0)) / w.size
    assert e.halo.bits == pytest.approx(bits)
    compute = dense_ns + q.plan.switches * model["switch_cost_ns"]
    memory_ns = w.size * bits / 8 / model["memory"]["bandwidth_gbps"]
    # The sparse engine: the lowest voltage that keeps up with the array.
    engine = [p for p in points if nnz * tokens / 64 / p["frequency_ghz"] <= compute] or [points[-1]]
    sp = min(engine, key=lambda p: p["voltage"])
    sparse_ns = nnz * tokens / 64 / sp["frequency_ghz"]
    latency = max(compute, memory_ns, sparse_ns)
    leakage += (latency - dense_ns) * points[NOMINAL]["leakage_w"]
    energy = (
        dynamic
        + leakage
        + 1e-3 * w.size * bits / 8 * model["memory"]["energy_pj_per_byte"]
        + q.plan.switches * model["switch_energy_nj"]
        + 1e-3 * nnz * tokens * 1.0 * sp["voltage"] ** 2
    )
    assert e.halo.latency_ns == pytest.approx(latency)
    assert e.halo.energy_nj == pytest.approx(energy)
    # W8A8 at nominal: per-channel absmax INT8 codes' activity at 1.0 V, one byte per weight + scales.
    scale = np.abs(w).max(1, keepdims=True) / 127
    codes = np.clip(np.rint(w / scale), -128, 127).astype(int)
    w8_bits = 8 + 32 / 100
    w8_compute = w.size * tokens / macs_per_cycle / 1.9
    w8_latency = max(w8_compute, w.size * w8_bits / 8 / 64)
    w8_energy = (
        1e-3 * sum(energies[int(c)] for c in codes.ravel()) * tokens
        + w8_latency * points[NOMINAL]["leakage_w"]
        + 1e-3 * w.size * w8_bits / 8 * 5.0
    )
    assert e.baselines["w8a8"].latency_ns == pytest.approx(w8_latency)
    assert e.baselines["w8a8"].energy_nj == pytest.approx(w8_energy)
    assert e.speedup_vs("w8a8") == pytest.approx(w8_latency / latency)
    fp16_latency = max(w8_compute, w.size * 2 / 64)
    assert e.baselines["fp16"].energy_nj == pytest.approx(
        1e-3 * w.size * tokens * 1.0 + fp16_latency * points[NOMINAL]["leakage_w"] + 1e-3 * w.size * 2 * 5.0
    )
    decode = q.estimate(tokens=1)  # memory-bound: the bytes decide
    assert decode.tokens == 1 and decode.speedup_vs("fp16") == pytest.approx(16 / bits, rel=1e-6)


def test_energy_mode_keeps_the_clock_and_lowers_the_voltage():
    w = _heavy_tailed((256, 256), 7)
    q = halo.halo_quantize(w, tile=(64, 64), mode="energy")
    hw = halo.HardwareModel()
    assert q.ladder == (2, 1, 0)
    assert {hw.operating_points[t.point]["frequency_ghz"] for t in q.tiles} == {1.9}
    assert min(hw.operating_points[t.point]["voltage"] for t in q.tiles) < 1.0
    e = q.estimate()
    assert e.halo.dynamic_nj < e.baselines["w8a8"].dynamic_nj
    assert 0.95 < e.speedup_vs("w8a8") <= 1.0  # only switch stalls differ


def test_rtn_matches_numpy_and_refuses_an_empty_matrix():
    w = _heavy_tailed((64, 100), 6)
    r = halo.rtn_quantize(w, 4, 32)
    expected = []
    for i in range(0, 100, 32):
        g = w[:, i : i + 32]
        scale = (np.abs(g).max(1, keepdims=True) / np.float32(7)).astype(np.float32)
        expected.append(np.clip(np.rint(g / scale), -8, 7) * scale)
    assert np.array_equal(r.dequantize(), np.concatenate(expected, 1))
    assert r.average_bits == pytest.approx(4 + 32 * 4 / 100)
    # Regression: an empty matrix divided by its group size (SIGFPE) before the shape check.
    for shape in ((4, 0), (0, 4)):
        with pytest.raises(ValueError, match=r"rtn_quantize.*non-empty"):
            halo.rtn_quantize(np.zeros(shape, np.float32))


def test_torch_input_comes_back_as_torch():
    torch = pytest.importorskip("torch")
    w = torch.from_numpy(_heavy_tailed((64, 64), 7)).to(torch.bfloat16)
    q = halo.halo_quantize(w, tile=(32, 32))
    out = q.dequantize()
    assert isinstance(out, torch.Tensor) and out.shape == (64, 64)
    assert np.array_equal(out.numpy(), halo.halo_quantize(w.float().numpy(), tile=(32, 32)).dequantize())


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"w": np.zeros(10, np.float32)}, ValueError, "must be 2-D"),
        ({"w": np.full((4, 4), np.nan, np.float32)}, ValueError, "non-finite"),
        (
            {"w": np.ones((4, 4), np.float32), "sensitivity": np.ones((4, 5), np.float32)},
            ValueError,
            "sensitivity shape",
        ),
        ({"w": np.ones((4, 4), np.float32), "sensitivity": -np.ones((4, 4), np.float32)}, ValueError, ">= 0"),
        ({"w": np.ones((4, 4), np.float32), "tile": (0, 4)}, ValueError, "tile"),
        ({"w": np.ones((4, 4), np.float32), "max_switches": -1}, ValueError, "max_switches"),
        ({"w": np.ones((4, 4), np.float32), "salient_fraction": 1.5}, ValueError, "salient_fraction"),
        ({"w": np.ones((4, 4), np.float32), "tier_fractions": (0.5, 0.5)}, ValueError, "tier_fractions"),
        ({"w": np.ones((4, 4), np.float32), "split": (0.5,)}, ValueError, "split needs one threshold"),
        ({"w": np.ones((4, 4), np.float32), "split": (0.8, 0.5)}, ValueError, "must not decrease"),
        (
            {"w": np.ones((4, 4), np.float32), "assign": "sensitivity", "tier_fractions": (0, 1, 0)},
            ValueError,
            "error_gain",
        ),
        ({"w": np.ones((4, 4), np.float32), "grid": "int3"}, ValueError, "grid must be one of"),
        ({"w": np.ones((4, 4), np.float32), "bits": 4, "grid": "int8"}, ValueError, "bits=4 selects"),
        ({"w": np.ones((4, 4), np.float32), "preset": "fast"}, ValueError, "preset"),
        ({"w": np.ones((4, 4), np.float32), "mode": "turbo"}, ValueError, "mode"),
        ({"w": np.ones((4, 4), np.float32), "energy_weight": -1.0}, ValueError, "energy_weight"),
        ({"w": np.ones((4, 4), np.float32), "book_iterations": 0}, ValueError, "book_iterations"),
        ({"w": np.ones((4, 4), np.float32), "backend": "cuda"}, RuntimeError, "no cuda kernel|not available"),
        ({"w": np.ones((4, 4), np.int32)}, TypeError, "float32"),
        ({"w": np.ones((4, 4), np.float32), "hw": "table.json"}, TypeError, "HardwareModel"),
        ({"w": np.ones((4, 4), np.float32), "tokens": 1.5}, TypeError, "tokens"),
    ],
)
def test_bad_input_is_rejected(kwargs, error, message):
    with pytest.raises(error, match=message):
        halo.halo_quantize(**kwargs)


@pytest.mark.parametrize("grid", ["subset", "int4"])
@pytest.mark.parametrize("channel_scales", [True, False])
def test_every_kernel_backend_matches_scalar(grid, channel_scales):
    w = _heavy_tailed((97, 131), 9)  # odd sizes: vector tails in every row segment
    s = np.random.default_rng(10).random((97, 131)).astype(np.float32)
    options = {"tile": (33, 17), "channel_scales": channel_scales, "grid": grid, "preset": "accuracy"}
    scalar = halo.halo_quantize(w, s, backend="scalar", **options)
    for backend in [b for b in ("avx2", "avx512") if b in halo.backends()]:
        simd = halo.halo_quantize(w, s, backend=backend, **options)
        assert np.array_equal(scalar.codes, simd.codes), backend
        assert np.array_equal(scalar.scales, simd.scales), backend
        assert simd.books == scalar.books
        np.testing.assert_allclose(simd.tile_error, scalar.tile_error, rtol=1e-9)


@pytest.mark.parametrize("count", [1, 7, 8, 9, 15, 16, 17, 31, 33, 65])
def test_fit_scale_kernels_agree_on_awkward_lengths(count):
    rng = np.random.default_rng(count)
    x = (rng.standard_normal(count) * 3).astype(np.float32)
    s = rng.random(count).astype(np.float32)
    book = [-16.0, -8.0, -3.0, 0.0, 2.0, 6.0, 12.0]
    reference = _core.hwq.fit_scale(x, s, book, "scalar")
    for backend in [b for b in ("avx2", "avx512") if b in halo.backends()]:
        scale, error = _core.hwq.fit_scale(x, s, book, backend)
        assert scale == reference[0] and error == pytest.approx(reference[1], rel=1e-12)


# ---- whole models ---------------------------------------------------------------------------------------


SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Quantization reduces the memory footprint of neural networks.",
    "A man is playing a guitar on the street.",
    "The weather today is sunny with a light breeze.",
    "Researchers trained a model on millions of sentences.",
    "She bought fresh bread at the bakery this morning.",
]


def _embed(model, tokenizer, sentences):
    import torch

    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def _independent_activation_sensitivity(model, batches):
    import torch

    stats, hooks = {}, []
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):

            def hook(_m, inputs, _o, n=n):
                x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
                total, count = stats.get(n, (0, 0))
                stats[n] = (total + (x * x).sum(0), count + x.shape[0])

            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for h in hooks:
        h.remove()
    return {n: (t / c).float().numpy() for n, (t, c) in stats.items()}


def _halo_vs_rtn(model, batches, rtn_group=128, **options):
    """HALO on a copy; (report, halo error, halo bits, rtn error, rtn bits) under independent sensitivities."""
    import copy

    import torch

    original = {
        n: m.weight.detach().float().numpy().copy()
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and "lm_head" not in n
    }
    sens = _independent_activation_sensitivity(model, batches)
    report = halo.hf.halo_quantize_model(copy.deepcopy(model), batches, sensitivity="activation", **options)
    halo_err = rtn_err = halo_bits = rtn_bits = numel = 0.0
    for layer in report.layers:
        w = original[layer.name]
        s = np.broadcast_to(sens[layer.name], w.shape).astype(np.float32)
        halo_err += hwq.weighted_error(w, report.quantized[layer.name].dequantize(), s)
        r = halo.rtn_quantize(w, 4, rtn_group)
        rtn_err += hwq.weighted_error(w, r.dequantize(), s)
        halo_bits += report.quantized[layer.name].stored_bits * w.size
        rtn_bits += r.average_bits * w.size
        numel += w.size
    return report, halo_err, halo_bits / numel, rtn_err, rtn_bits / numel


def test_minilm_halo_beats_rtn_saves_energy_and_keeps_embeddings(minilm):
    model, tokenizer = minilm
    batches = [
        tokenizer(SENTENCES[:3], padding=True, return_tensors="pt"),
        tokenizer(SENTENCES[3:], padding=True, return_tensors="pt"),
    ]
    report, halo_err, halo_bits, rtn_err, rtn_bits = _halo_vs_rtn(model, batches, rtn_group=64)
    totals = report.totals()
    print(
        f"MiniLM: HALO err {halo_err:.4f} bits {halo_bits:.3f} | RTN4 g64 err {rtn_err:.4f} bits {rtn_bits:.3f} | {totals}"
    )
    assert len(report.layers) == 37  # 36 encoder linears and the pooler
    assert halo_bits <= rtn_bits and halo_err < rtn_err
    assert totals["speedup_vs"]["w8a8"] > 1.0 and totals["energy_saving_vs"]["w8a8"] > 0.0
    assert totals["average_bits"] == pytest.approx(halo_bits)
    # The int8 grid mode keeps the embeddings close.
    import copy

    quantized = copy.deepcopy(model)
    eight = halo.hf.halo_quantize_model(quantized, batches, grid="int8")
    assert eight.totals()["speedup_vs"]["w8a8"] > 1.0
    cosine = (_embed(model, tokenizer, SENTENCES) * _embed(quantized, tokenizer, SENTENCES)).sum(-1)
    assert float(cosine.min()) >= 0.99


def _tiny_llama(seed=0):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=256,
    )
    return transformers.LlamaForCausalLM(config).eval()


def test_tiny_llama_fisher_report_and_shared_sensitivity():
    torch = pytest.importorskip("torch")
    model = _tiny_llama()
    generator = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 256, (2, 32), generator=generator)} for _ in range(2)]
    _, halo_err, _, rtn_err, _ = _halo_vs_rtn(model, batches, rtn_group=64, tile=(32, 32), preset="accuracy")
    assert halo_err < rtn_err
    fisher_batches = [dict(b, labels=b["input_ids"]) for b in batches]
    scores = halo.hf.compute_sensitivity(model, fisher_batches, "fisher")
    assert len(scores) == 14 and all(
        s.shape == m.weight.shape for n, m in model.named_modules() if n in scores for s in [scores[n]]
    )
    import copy

    shared = halo.hf.halo_quantize_model(copy.deepcopy(model), None, sensitivity=scores, tile=(32, 32))
    direct = halo.hf.halo_quantize_model(
        copy.deepcopy(model), fisher_batches, sensitivity="fisher", tile=(32, 32)
    )
    for name in shared.quantized:
        assert np.array_equal(shared.quantized[name].codes, direct.quantized[name].codes)
    with pytest.raises(ValueError, match="tile"):
        halo.hf.halo_quantize_model(model, fisher_batches, sensitivity="fisher", tile=(0, 0))


def test_perplexity_and_corpus_helpers():
    torch = pytest.importorskip("torch")
    from halo.hwq.eval import perplexity, stdlib_docstrings, token_windows

    model = _tiny_llama(3)
    windows = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))
    ppl, nll, tokens = perplexity(model, windows, batch_size=2)
    with torch.no_grad():
        logits = model(windows).logits[:, :-1].double()
    manual = -logits.log_softmax(-1).gather(-1, windows[:, 1:, None]).sum().item()
    assert (
        tokens == 45
        and nll == pytest.approx(manual, rel=1e-5)
        and ppl == pytest.approx(math.exp(manual / 45), rel=1e-5)
    )
    first = stdlib_docstrings("n", "o", max_chars=4000)
    assert first == stdlib_docstrings("n", "o", max_chars=4000) and len(first) == 4000
    assert first.startswith(
        "An object-oriented interface to .netrc files."
    )  # netrc: the first n-module with prose

    class Chars:  # one token per character
        def __call__(self, text, **_):
            return {"input_ids": [ord(c) % 256 for c in text]}

    assert token_windows(Chars(), first, 100, 40).shape == (40, 100)
    with pytest.raises(ValueError, match="40 windows of 100, 41 asked for"):
        token_windows(Chars(), first, 100, 41)
    with pytest.raises(ValueError, match="first 'q' comes after last 'b'"):
        stdlib_docstrings("q", "b")


def test_smollm2_halo_perplexity_is_close_to_fp32_and_below_a_crude_quantizer(smollm2):
    import torch
    from halo.hwq.eval import perplexity, stdlib_docstrings, token_windows

    model, tokenizer = smollm2
    evaluation = token_windows(tokenizer, stdlib_docstrings("n", "n", max_chars=6000), 256, 2)
    calibration = token_windows(tokenizer, stdlib_docstrings("a", "a", max_chars=4000), 256, 1)
    layers = [
        (n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n
    ]
    original = {n: m.weight.detach().clone() for n, m in layers}
    try:
        fp32, _, _ = perplexity(model, evaluation)
        with torch.no_grad():
            for name, module in layers:  # crude: 3 bits, one scale per row
                module.weight.copy_(
                    torch.from_numpy(halo.rtn_quantize(original[name].numpy(), 3, 0).dequantize())
                )
        crude, _, _ = perplexity(model, evaluation)
        with torch.no_grad():
            for name, module in layers:
                module.weight.copy_(original[name])
        report = halo.hf.halo_quantize_model(
            model, [calibration], sensitivity="activation", book_iterations=1
        )
        quantized, _, _ = perplexity(model, evaluation)
    finally:
        with torch.no_grad():
            for name, module in layers:
                module.weight.copy_(original[name])
    bits = report.totals()["average_bits"]
    print(
        f"SmolLM2 ppl over 510 tokens: FP32 {fp32:.3f}, HALO {quantized:.3f} ({bits:.3f} bits), crude {crude:.3f}"
    )
    assert len(report.layers) == 210 and bits < 4.5
    assert math.isfinite(quantized) and quantized < 1.35 * fp32
    assert quantized < crude


def test_cli_writes_outputs_and_rejects_bad_input(tmp_path, capsys, monkeypatch):
    from halo.cli import main

    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(SENTENCES[:2]) + "\n")
    out = tmp_path / "out"
    assert (
        main(["hwq", "--model", MINILM, "--calib", str(calib), "--out", str(out), "--tile", "64", "64"]) == 0
    )
    assert sorted(os.listdir(out)) == [
        ".halo-output.json",
        "config.json",
        "hardware_model.json",
        "plan.json",
        "quantized.safetensors",
        "report.json",
        "report.md",
    ]
    report = json.loads((out / "report.json").read_text())
    assert len(report["layers"]) == 37 and report["totals"]["speedup_vs"]["w8a8"] > 1.0
    plan = json.loads((out / "plan.json").read_text())
    layer = plan["encoder.layer.0.attention.self.query"]
    assert layer["grid"] == "subset" and all(len(b) <= 16 for b in layer["books"].values())
    from safetensors.numpy import load_file

    codes = load_file(str(out / "quantized.safetensors"))["encoder.layer.0.attention.self.query.codes"]
    assert codes.dtype == np.int8 and codes.shape == (384, 384)
    capsys.readouterr()
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    for argv in (
        ["hwq", "--model", str(tmp_path), "--calib", str(calib), "--out", str(tmp_path / "a")],
        ["hwq", "--model", MINILM, "--calib", str(calib), "--out", str(out)],
        ["hwq", "--model", MINILM, "--calib", str(calib), "--out", str(tmp_path / "b"), "--hw", str(bad)],
        ["hwq", "--model", MINILM, "--calib", str(tmp_path / "none.txt"), "--out", str(tmp_path / "c")],
        [
            "hwq",
            "--model",
            MINILM,
            "--calib",
            str(calib),
            "--out",
            str(tmp_path / "d"),
            "--bits",
            "4",
            "--grid",
            "int8",
        ],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("halo hwq: error:")
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
    # Regression: --tile 0 0 failed only after loading the model. Loading now would trip this.
    import transformers

    def no_loading(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_loading)
    assert (
        main(
            [
                "hwq",
                "--model",
                MINILM,
                "--calib",
                str(calib),
                "--out",
                str(tmp_path / "e"),
                "--tile",
                "0",
                "0",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["halo hwq: error: --tile must be two positive sizes, got 0 0"]


def test_plots_are_png_files(tmp_path):
    pytest.importorskip("matplotlib")
    from halo.hwq.plots import plot_error_vs_speedup, plot_tile_frequencies

    q = halo.halo_quantize(_heavy_tailed((96, 128), 8), tile=(32, 32), preset="performance")
    energy = halo.halo_quantize(_heavy_tailed((96, 128), 8), tile=(32, 32), mode="energy")
    for path in (
        plot_tile_frequencies(q, tmp_path / "map.png"),
        plot_tile_frequencies(energy, tmp_path / "volts.png"),
        plot_error_vs_speedup([("a", 1.2, 0.01), ("b", 1.5, 0.02)], tmp_path / "scatter.png"),
    ):
        with open(path, "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no points"):
        plot_error_vs_speedup([], tmp_path / "x.png")


@settings(max_examples=40, deadline=None)
@given(
    delays4=st.lists(st.floats(0.01, 0.2), min_size=16, max_size=16),
    delays8=st.lists(st.lists(st.floats(0.01, 0.2), min_size=256, max_size=256), min_size=1, max_size=1),
    clocks=st.lists(st.floats(0.5, 4.0), min_size=1, max_size=4, unique=True),
    books=st.integers(1, 256),
    switch=st.floats(0, 1e3),
)
def test_json_round_trip_property(delays4, delays8, clocks, books, switch):
    data = halo.HardwareModel().to_dict()
    data["delay_ns"] = {"int4": delays4, "int8": delays8[0]}
    data["operating_points"] = [
        {"voltage": 1.0, "frequency_ghz": f, "leakage_w": 0.01, "book_size": books} for f in sorted(clocks)
    ]
    data["switch_cost_ns"] = switch
    hw = halo.HardwareModel.from_dict(data)
    again = halo.HardwareModel.from_json(hw.to_json())
    assert again == hw and again.to_dict()["delay_ns"]["int4"] == [delays4] * len(clocks)
    for p, clock in enumerate(sorted(clocks)):
        assert hw.admitted(p, 4) == tuple(v - 8 for v in range(16) if delays4[v] <= 1.0 / clock)
        assert hw.operating_points[p]["book_size"] == books


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_text_is_rejected_cleanly(text):
    with pytest.raises(ValueError):
        halo.HardwareModel.from_json(text)


def test_fisher_is_the_mean_squared_gradient_of_an_analytic_loss():
    """Fisher sensitivity against gradients written out by hand: for L = sum((x W^T - t)^2),
    dL/dW = 2 (x W^T - t)^T x, squared and averaged over the batches (float64 NumPy)."""
    import torch

    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4, bias=False))
    batches = [{"x": torch.randn(5, 6), "t": torch.randn(5, 4)} for _ in range(3)]

    def loss_fn(m, batch):
        return ((m(batch["x"]) - batch["t"]) ** 2).sum()

    got = halo.hf.compute_sensitivity(model, batches, "fisher", loss_fn=loss_fn, skip=())
    w = model[0].weight.detach().double().numpy()
    want = np.zeros_like(w)
    for batch in batches:
        x, t = batch["x"].double().numpy(), batch["t"].double().numpy()
        want += (2 * (x @ w.T - t).T @ x) ** 2
    want /= len(batches)
    assert list(got) == ["0"]
    np.testing.assert_allclose(got["0"], want, rtol=1e-4, atol=1e-7)
    # Without a loss the error names the function that was called.
    with pytest.raises(ValueError, match=r"^\[compute_sensitivity\] sensitivity='fisher' needs"):
        halo.hf.compute_sensitivity(model, [torch.randn(2, 6)], "fisher", skip=())
    with pytest.raises(ValueError, match=r"^\[halo_quantize_model\] sensitivity='fisher' needs"):
        halo.hf.halo_quantize_model(model, [torch.randn(2, 6)], sensitivity="fisher", skip=())
