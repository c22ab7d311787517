"""Cost and return on investment: does compressing pay for itself?

Two halves, kept apart:
  - ``ComputeMeter`` records what a stage spent (CPU-seconds from the kernel,
    energy and CO2 from codecarbon's offline tracker); the stages use it.
  - the arithmetic (cost per million predictions, break-even) is pure and
    works on recorded figures only, so it is tested on its boundaries.

The break-even asks one question: the compression search cost CPU time once;
every prediction the deployed model serves instead of the teacher saves CPU
time. After how many predictions are the two equal? If the deployed model
saves nothing (or costs more), it never pays back: ``None``.
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass

# What codecarbon's figures are, wherever they are shown: these machines have
# no power meter (no RAPL), so codecarbon estimates CPU power from the CPU
# model and the process's CPU load.
ENERGY_SOURCE = ("codecarbon offline tracker; CPU power estimated from the CPU model and load "
                 "(no power meter on this machine)")
MS_PER_CORE_HOUR = 3.6e6


def process_cpu_seconds(include_children: bool = True) -> float:
    """User + system CPU time of this process (every thread), plus its
    finished children unless told otherwise (a stage's helper processes)."""
    usages = [resource.getrusage(resource.RUSAGE_SELF)]
    if include_children:
        usages.append(resource.getrusage(resource.RUSAGE_CHILDREN))
    return sum(u.ru_utime + u.ru_stime for u in usages)


class ComputeMeter:
    """``with ComputeMeter(country) as m: ...`` then ``m.result()``.

    CPU-seconds are exact (the kernel's accounting of this process and its
    children). Energy and CO2 come from codecarbon's offline tracker, which
    makes no network call (tested); with ``country=None`` they are omitted.
    """

    def __init__(self, country_iso_code: str | None):
        self.country = country_iso_code
        self._tracker = None
        self._figures: dict = {}

    def __enter__(self) -> "ComputeMeter":
        if self.country:
            import logging

            from codecarbon import OfflineEmissionsTracker

            logging.getLogger("codecarbon").setLevel(logging.ERROR)
            # output_methods=[]: no emissions.csv, no logger, no API: the figures are returned.
            self._tracker = OfflineEmissionsTracker(country_iso_code=self.country, output_methods=[],
                                                    log_level="error", tracking_mode="process")
            self._tracker.start()
        self._cpu0, self._wall0 = process_cpu_seconds(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self._figures = {"cpu_seconds": round(process_cpu_seconds() - self._cpu0, 2),
                         "wall_seconds": round(time.perf_counter() - self._wall0, 2)}
        if self._tracker is not None:
            self._tracker.stop()
            data = self._tracker.final_emissions_data
            self._figures.update({"energy_kwh": float(data.energy_consumed), "co2_kg": float(data.emissions),
                                  "country_iso_code": self.country, "cpu_model": data.cpu_model,
                                  "energy_source": ENERGY_SOURCE})

    def result(self) -> dict:
        return dict(self._figures)


# ------------------------------------------------------------- arithmetic
def cost_per_million(cpu_ms_per_prediction: float, price_per_core_hour: float) -> float:
    """Money per million predictions at a price per core-hour."""
    return cpu_ms_per_prediction * 1e6 / MS_PER_CORE_HOUR * price_per_core_hour


def break_even_predictions(compression_cpu_seconds: float, teacher_cpu_ms: float,
                           deployed_cpu_ms: float) -> int | None:
    """Predictions after which the saved CPU time equals the compression's.

    0 when the compression cost nothing; None ("never pays back") when the
    deployed model saves nothing per prediction or costs more.
    """
    if compression_cpu_seconds < 0 or teacher_cpu_ms < 0 or deployed_cpu_ms < 0:
        raise ValueError("CPU times cannot be negative")
    saving_ms = teacher_cpu_ms - deployed_cpu_ms
    if saving_ms <= 0:
        return None
    return math.ceil(compression_cpu_seconds * 1000.0 / saving_ms)


@dataclass(frozen=True)
class ServingCost:
    cpu_ms_per_prediction: float
    cost_per_million: float
    energy_kwh_per_million: float | None


def serving_cost(cpu_ms: float, price_per_core_hour: float, kwh_per_cpu_second: float | None) -> ServingCost:
    # a million predictions at cpu_ms each = cpu_ms * 1000 CPU-seconds
    energy = None if kwh_per_cpu_second is None else cpu_ms * 1000.0 * kwh_per_cpu_second
    return ServingCost(cpu_ms, cost_per_million(cpu_ms, price_per_core_hour), energy)


def roi(train: dict, build_cpu_seconds: dict[str, float | None], teacher: dict, deployed: dict,
        price_per_core_hour: float) -> dict:
    """The cost and return of one deployed version, from recorded figures.

    ``train``: what the train stage's ``ComputeMeter`` recorded.
    ``build_cpu_seconds``: every candidate's build, as first built (a
    candidate copied from the cache cost nothing this run but did cost its
    first build): the whole search is the price of finding the deployed one.
    ``teacher`` / ``deployed``: validate's performance figures, with
    ``cpu_ms_per_prediction_b1`` / ``_b32``. Energy and CO2 follow CPU time at
    the rate codecarbon estimated over the training run, the longest metered one.
    A build with no record (None: cached before builds were metered) counts
    as 0 and is listed under ``build_cpu_unknown``.
    """
    unknown = sorted(n for n, v in build_cpu_seconds.items() if v is None)
    compress_cpu = float(sum(v for v in build_cpu_seconds.values() if v is not None))
    train_cpu = float(train.get("cpu_seconds") or 0.0)
    kwh_per_cpu_s = (train["energy_kwh"] / train_cpu
                     if train.get("energy_kwh") is not None and train_cpu > 0 else None)
    co2_per_kwh = (train["co2_kg"] / train["energy_kwh"]
                   if kwh_per_cpu_s is not None and train.get("co2_kg") is not None and train["energy_kwh"] > 0
                   else None)

    def energy(cpu_s):
        return None if kwh_per_cpu_s is None else cpu_s * kwh_per_cpu_s

    per_batch = {}
    for b in ("b1", "b32"):
        key = f"cpu_ms_per_prediction_{b}"
        t, d = teacher.get(key), deployed.get(key)
        if t is None or d is None:
            continue
        tc, dc = serving_cost(t, price_per_core_hour, kwh_per_cpu_s), serving_cost(d, price_per_core_hour,
                                                                                   kwh_per_cpu_s)
        be = break_even_predictions(compress_cpu, t, d)
        per_batch[b] = {
            "teacher_cpu_ms_per_prediction": t, "deployed_cpu_ms_per_prediction": d,
            "teacher_cost_per_million": tc.cost_per_million,
            "deployed_cost_per_million": dc.cost_per_million,
            "saving_per_million": tc.cost_per_million - dc.cost_per_million,
            "teacher_energy_kwh_per_million": tc.energy_kwh_per_million,
            "deployed_energy_kwh_per_million": dc.energy_kwh_per_million,
            "break_even_predictions": be,
            "pays_back": be is not None,
        }
    spent = train_cpu + compress_cpu
    spent_kwh = energy(spent)
    return {
        "price_per_core_hour": price_per_core_hour,
        "train_cpu_seconds": round(train_cpu, 2),
        "compress_cpu_seconds": round(compress_cpu, 2),
        "build_cpu_seconds": {n: None if v is None else round(v, 2) for n, v in build_cpu_seconds.items()},
        "build_cpu_unknown": unknown,
        "spent_cpu_seconds": round(spent, 2),
        "spent_cost": spent / 3600.0 * price_per_core_hour,
        "spent_energy_kwh": spent_kwh,
        "spent_co2_kg": None if spent_kwh is None or co2_per_kwh is None else spent_kwh * co2_per_kwh,
        "kwh_per_cpu_second": kwh_per_cpu_s,
        "energy_source": train.get("energy_source"),
        "country_iso_code": train.get("country_iso_code"),
        "serving": per_batch,
    }


def roi_lines(r: dict, currency: str = "USD") -> list[str]:
    """Plain-text lines for `status` and the reports."""
    out = [f"compute spent: teacher training {r['train_cpu_seconds']:.0f} CPU-s, building "
           f"{len(r['build_cpu_seconds'])} candidate(s) {r['compress_cpu_seconds']:.0f} CPU-s "
           f"({r['spent_cost']:.4g} {currency})"
           + (f"; {r['spent_energy_kwh'] * 1000:.1f} Wh" if r.get("spent_energy_kwh") is not None else "")
           + (f", {r['spent_co2_kg'] * 1000:.2f} g CO2 ({r['country_iso_code']} grid, estimated)"
              if r.get("spent_co2_kg") is not None else "")]
    for b, s in r["serving"].items():
        be = s["break_even_predictions"]
        pay = (f"compression pays back after {be:,} predictions" if be is not None
               else "compression never pays back in CPU time at this batch size")
        out.append(f"{b}: {s['deployed_cpu_ms_per_prediction']:.3g} CPU-ms per prediction vs teacher "
                   f"{s['teacher_cpu_ms_per_prediction']:.3g}; {s['deployed_cost_per_million']:.4g} vs "
                   f"{s['teacher_cost_per_million']:.4g} {currency} per million at {r['price_per_core_hour']} "
                   f"{currency}/core-hour; {pay}")
    return out
