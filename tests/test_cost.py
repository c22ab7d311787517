"""Cost and ROI: the arithmetic on its boundaries, and the meter for real."""

from __future__ import annotations

import socket
import time

import pytest

from shrinkflow.cost import ComputeMeter, break_even_predictions, cost_per_million, roi, roi_lines
from shrinkflow.artifacts import CostReturn
from shrinkflow.markdown import roi_markdown


def test_cost_per_million_by_hand():
    # 3.6 ms of CPU per prediction: a million predictions = 1 core-hour
    assert cost_per_million(3.6, 1.0) == pytest.approx(1.0)
    assert cost_per_million(3.6, 0.05) == pytest.approx(0.05)
    assert cost_per_million(0.0, 0.05) == 0.0
    assert cost_per_million(3.6, 0.0) == 0.0


@pytest.mark.parametrize("compress_s, teacher_ms, deployed_ms, expected", [
    (100.0, 10.0, 5.0, 20_000),      # 100 s / 5 ms saved
    (100.0, 10.0, 9.999, 100_000_000),  # a tiny saving: a long but finite wait (ceil of 1e8 - float noise)
    (0.0, 10.0, 5.0, 0),             # nothing spent: paid back at once
    (100.0, 10.0, 10.0, None),       # zero savings: never
    (100.0, 10.0, 12.0, None),       # the deployed model costs more: never
    (1.0, 3.0, 0.0, 334),            # 1000 ms / 3 ms = 333.3 -> 334 predictions
])
def test_break_even_boundaries(compress_s, teacher_ms, deployed_ms, expected):
    got = break_even_predictions(compress_s, teacher_ms, deployed_ms)
    if expected == 100_000_000:
        assert got is not None and abs(got - expected) <= 1
    else:
        assert got == expected


def test_break_even_refuses_negative_inputs():
    with pytest.raises(ValueError, match="negative"):
        break_even_predictions(-1.0, 10.0, 5.0)


TRAIN = {"cpu_seconds": 400.0, "energy_kwh": 0.004, "co2_kg": 0.0016, "country_iso_code": "USA",
         "energy_source": "codecarbon"}
TEACHER = {"cpu_ms_per_prediction_b1": 20.0, "cpu_ms_per_prediction_b32": 6.0}
SMALL = {"cpu_ms_per_prediction_b1": 4.0, "cpu_ms_per_prediction_b32": 1.5}


def test_roi_adds_up():
    r = roi(TRAIN, {"int8": 10.0, "student": 190.0}, TEACHER, SMALL, 0.05)
    assert r["compress_cpu_seconds"] == 200.0 and r["spent_cpu_seconds"] == 600.0
    assert r["spent_cost"] == pytest.approx(600 / 3600 * 0.05)
    assert r["kwh_per_cpu_second"] == pytest.approx(0.004 / 400)
    assert r["spent_energy_kwh"] == pytest.approx(0.006)
    assert r["spent_co2_kg"] == pytest.approx(0.006 * 0.4)  # the training run's 0.4 kg/kWh
    b1 = r["serving"]["b1"]
    assert b1["break_even_predictions"] == 12_500  # 200 s / 16 ms
    assert b1["teacher_cost_per_million"] == pytest.approx(cost_per_million(20.0, 0.05))
    assert b1["saving_per_million"] == pytest.approx(cost_per_million(16.0, 0.05))
    # a million predictions at 4 ms = 4000 CPU-s, at the training run's rate
    assert b1["deployed_energy_kwh_per_million"] == pytest.approx(4000 * 0.004 / 400)
    assert r["serving"]["b32"]["break_even_predictions"] == 44_445  # 200000 ms / 4.5 ms, rounded up


def test_roi_never_pays_back_and_says_so():
    r = roi(TRAIN, {"int8": 10.0}, TEACHER, {"cpu_ms_per_prediction_b1": 25.0, "cpu_ms_per_prediction_b32": 6.0},
            0.05)
    assert r["serving"]["b1"]["break_even_predictions"] is None and not r["serving"]["b1"]["pays_back"]
    assert r["serving"]["b32"]["pays_back"] is False  # equal cost: zero savings
    text = "\n".join(roi_lines(r))
    assert "never pays back" in text
    assert "never pays back" in roi_markdown(CostReturn.model_validate(r))


def test_roi_without_energy_or_build_records():
    r = roi({"cpu_seconds": 100.0}, {"int8": None, "student": 50.0}, TEACHER, SMALL, 0.05)
    assert r["spent_energy_kwh"] is None and r["spent_co2_kg"] is None
    assert r["build_cpu_unknown"] == ["int8"] and r["compress_cpu_seconds"] == 50.0
    assert r["serving"]["b1"]["deployed_energy_kwh_per_million"] is None
    assert "int8" in roi_markdown(CostReturn.model_validate(r))
    assert roi_markdown(None) == ""


def test_compute_meter_counts_cpu_and_codecarbon_stays_offline(monkeypatch):
    def no_network(self, address):
        raise AssertionError(f"network call to {address}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    with ComputeMeter("USA") as meter:
        # Busy until this process has used 0.5 CPU-seconds (not 0.5 s of wall
        # time: on a loaded machine the process may get a fraction of a core).
        c0, x = time.process_time(), 0
        while time.process_time() - c0 < 0.5:
            x += 1
    r = meter.result()
    assert r["cpu_seconds"] >= 0.45 and r["wall_seconds"] >= 0.45
    assert r["energy_kwh"] > 0 and r["co2_kg"] > 0 and r["country_iso_code"] == "USA"
    assert "estimated" in r["energy_source"]


def test_compute_meter_without_a_country_measures_cpu_only():
    with ComputeMeter(None) as meter:
        sum(i * i for i in range(200_000))
    r = meter.result()
    assert r["cpu_seconds"] >= 0 and "energy_kwh" not in r
