"""Is a campaign's figure worse than its baseline's by more than the runs' own noise explains?

Two back-to-back runs of the tiny campaign differ by 30-60% in figures made of 4-16 requests
of a few ms each, so "worse by more than ``regression_threshold``" alone flagged dozens of
regressions between identical runs. A figure is a regression here only when both hold:

1. **Outside the noise**: the confidence interval of the ratio current / baseline of the
   figure lies entirely on the worse side of 1 (no change);
2. **Large enough**: the figure itself (the cells' summaries) is worse by at least
   ``regression_threshold`` (the minimum effect size, 10% by default).

The interval: every run keeps its requests (``requests.parquet`` / ``requests.jsonl``: one row
per request with its TTFT, TPOT, ITLs, E2EL and token counts), so each figure is recomputed
from the requests of its cell resampled with replacement (a bootstrap, ``RESAMPLES`` times per
side, the two runs independently). The interval is a t interval on the log of the ratio,
log r ± t·se, with se² the sum of the two sides' bootstrap variances of the log figure.
Requests are resampled in blocks of neighbours in send order (a circular block bootstrap,
``block_length``: max(concurrency, n^(1/3)), at most n/5), because on a shared machine they are
not independent: a burst of load slows a run of consecutive requests alike (measured here: the
first four requests of a concurrency-4 cell at 32-43 ms TTFT where the other 76 took 11 ms, and
a late burst at 20-74 ms; resampled one by one, such a cell's TTFT was "certainly" 37% worse
than the baseline's, resampled in blocks it is +37% with an interval of -16%..+122%). Why this
and not a rank test per cell:

- It judges the figure that is reported (a mean, a p99, a rate), not "the distributions
  differ", and it gives the interval the report prints beside the change ("+26%, 99% CI
  +18%..+35%"); a Mann-Whitney p-value says neither how large the change is nor applies to
  a p99 or to throughput.
- Every figure has a per-request recomputation: latency statistics from the cell's latencies
  (ITL: all gaps of the resampled requests, a cluster bootstrap), prefill/decode tok/s pooled
  as ``metrics.cell_summary`` pools them, throughput by Little's law (in a closed loop at a
  fixed concurrency, tokens per second = tokens / sum of E2EL x requests in flight, the latter
  fixed per run), so the noise of the cell's requests is the noise of its throughput.
- numpy only (no scipy), vectorised: a campaign compares in well under a second.
- The log scale makes the interval of a ratio symmetric in "x% slower" and "x% faster"; a
  t interval (not bootstrap percentiles) reaches the far tail a multiple-comparison level needs
  with a thousand resamples. Small samples are not trusted more than they deserve: each side's
  variance is scaled by b/(b-1) for b blocks (the bootstrap underestimates the variance of a
  mean of b independent pieces by that factor) and the quantile is Student's t with
  min(b) - 1 degrees of freedom, so 4 noisy requests give a wide interval, not a confident one.
- Percentiles need a tail: a resampled p99 of 20 values never exceeds their maximum, so the
  bootstrap cannot know how far the true p99 may lie beyond it (in synthetic A/A runs the
  p99 figures alone raised a false alarm in 9% of campaigns). A percentile figure is judged
  only when at least ``MIN_TAIL`` (10) values lie beyond it on both sides (p99: 1000 values,
  p90: 100); otherwise it is listed as ``too_few`` and not flagged. With 5 (560 ITL gaps of
  sub-ms each), a real A/A pair of the tiny model flagged p99 ITL +223% (interval
  +46%..+617%): a handful of scheduler hiccups, clustered in a few requests, is the whole tail.
  Run more rounds or repeats to have p99s judged.

**Many figures at once**: a campaign compares m figures (cells x compared metrics, 27 to 100);
at 99% each, one in a hundred identical figures would still be flagged. The intervals are
Bonferroni-simultaneous: each is at level 1 - (1 - ``regression_confidence``)/m, so the chance
that any of the m intervals misses its true ratio is at most 1 - ``regression_confidence``
(1% by default) and identical runs raise a false alarm in at most about one night in a
hundred, whatever the size of the grid. The figures of a cell share requests (mean TTFT,
p99 TTFT and prefill tok/s all come from the same TTFTs), which makes Bonferroni conservative,
not wrong; Holm would flag a little more but gives no intervals to print.

**Noise between cells**: a cell of the tiny model lasts well under a second, so a burst of load
from another process can cover all of it; resampling its requests cannot see that (measured: a
real A/A pair had one cell's throughput -24%, interval -42%..-1%, from requests alone). Such a
cell disagrees with the other cells of the same figure more than their requests explain. That
excess, the between-cell variance of the figure's log ratio (DerSimonian-Laird's tau², as in a
random-effects meta-analysis, with at least ``MIN_CELLS`` cells), is added to every cell's
variance of that figure. A slower server moves all cells alike and adds little excess, so it is
still flagged; the price is that a real regression confined to one cell of many is flagged only
once it is larger than the cells' disagreement (a recurring one shows night after night, a
burst does not). Noise common to the whole run (the machine busier for all of it) stays
invisible to any comparison of two runs: the minimum effect size is the guard against that.

**Fallback**: a baseline without per-request data (older runs, or a folder whose
requests.parquet was deleted), a cell with fewer than ``MIN_REQUESTS`` ok requests on either
side, or a figure with no per-request recomputation (a figure added to the metric table
later) is judged by the threshold rule alone, and the regression says ``method: threshold``.
A cell that ran ok before and does not now is always a regression.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import pandas as pd

from llmflow.bench.metrics import LATENCIES, LATENCY_STATS, Metric, regression_metrics

DEFAULT_CONFIDENCE = 0.99
RESAMPLES = 1000
MIN_REQUESTS = 3
MIN_CELLS = 3  # cells of a figure needed to estimate the noise between cells
# Elements of one resampled block (resamples x requests x ITL gaps) held in memory at once.
CHUNK_ELEMENTS = 2_000_000


@dataclass
class Sample:
    """The ok, timed requests of one cell of one run, as arrays (NaN where a request has none)."""

    ttft: np.ndarray
    tpot: np.ndarray
    e2el: np.ndarray
    itl: np.ndarray  # requests x most gaps, NaN-padded
    prompt_tokens: np.ndarray
    completion_tokens: np.ndarray
    block: int = 1  # requests resampled together, in send order (``block_length``)

    @property
    def n(self) -> int:
        return len(self.ttft)

    @property
    def blocks(self) -> float:
        """Independent pieces of evidence: requests over block length."""
        return self.n / self.block

    def take(self, idx: np.ndarray) -> Sample:
        """The requests at ``idx`` (resamples x requests): every array gains the leading axis."""
        return Sample(
            *(getattr(self, f)[idx] for f in ("ttft", "tpot", "e2el", "itl", "prompt_tokens", "completion_tokens"))
        )


def block_length(n: int, concurrency: int = 1) -> int:
    """Requests resampled as one block: a burst of load on a shared machine slows neighbours
    in time alike, and in a closed loop the ``concurrency`` requests in flight together share
    the server; ``max(concurrency, n^(1/3))`` (the usual block length for a variance), at most
    a fifth of the requests so that there are blocks to resample."""
    return max(1, min(max(concurrency, math.ceil(n ** (1 / 3))), n // 5))


def _floats(values: Iterable[Any]) -> np.ndarray:
    return np.array([np.nan if v is None or (isinstance(v, float) and math.isnan(v)) else float(v) for v in values])


def cell_samples(rows: pd.DataFrame) -> dict[str, Sample]:
    """Per cell key, the ok timed requests of a run's request rows (``tasks.benchmark.request_row``)."""
    if rows.empty or not {"cell", "warmup", "outcome", "ttft_s", "e2el_s"} <= set(rows.columns):
        return {}
    timed = rows[(~rows["warmup"].astype(bool)) & (rows["outcome"] == "ok")]
    out: dict[str, Sample] = {}
    for key, group in timed.groupby("cell"):
        order = [c for c in ("repeat", "start_s", "index") if c in group.columns]
        group = group.sort_values(order, kind="stable") if order else group  # send order
        conc = group["concurrency"].iloc[0] if "concurrency" in group.columns else 1
        conc = int(conc) if _number(conc) else 1
        gaps = [list(v) if v is not None and not isinstance(v, float) else [] for v in group.get("itl_s", [])]
        width = max((len(g) for g in gaps), default=0)
        itl = np.full((len(group), max(width, 1)), np.nan)
        for i, g in enumerate(gaps):
            itl[i, : len(g)] = g
        out[str(key)] = Sample(
            ttft=_floats(group["ttft_s"]),
            tpot=_floats(group.get("tpot_s", [None] * len(group))),
            e2el=_floats(group["e2el_s"]),
            itl=itl if gaps else np.full((len(group), 1), np.nan),
            prompt_tokens=_floats(group.get("prompt_tokens", [None] * len(group))),
            completion_tokens=_floats(group.get("completion_tokens", [None] * len(group))),
            block=block_length(len(group), conc),
        )
    return out


def read_run_rows(folder: Path) -> pd.DataFrame:
    """A campaign folder's request rows: requests.parquet, else requests.jsonl, else empty."""
    parquet, jsonl = folder / "requests.parquet", folder / "requests.jsonl"
    if parquet.exists():
        try:
            return pd.read_parquet(parquet)
        except (OSError, ValueError):
            pass
    return read_jsonl_rows(jsonl)


def read_jsonl_rows(path: Path) -> pd.DataFrame:
    """requests.jsonl as a frame (empty when no request was sent), a torn last line of a killed
    run dropped."""
    if not path.exists() or path.stat().st_size == 0:
        return pd.DataFrame()
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return pd.DataFrame(records)


# --- a figure recomputed from (resampled) requests: arrays with a leading resample axis -------

Statistic = Callable[[Sample], np.ndarray]


def _flat(values: np.ndarray) -> np.ndarray:
    """resamples x requests [x gaps] -> resamples x values."""
    return values.reshape(values.shape[0], -1)


def _stat(stat: str) -> Callable[[np.ndarray], np.ndarray]:
    if stat == "mean":
        return lambda v: np.nanmean(v, axis=1)
    if stat == "median":
        return lambda v: np.nanmedian(v, axis=1)
    return lambda v: np.nanpercentile(v, float(stat[1:]), axis=1)


def _latency(latency: str, stat: str) -> Statistic:
    of = _stat(stat)
    return lambda s: of(_flat(getattr(s, latency))) * 1000.0


def _sum(v: np.ndarray) -> np.ndarray:
    return np.nansum(v, axis=1)


def _prefill(s: Sample) -> np.ndarray:
    timed = s.ttft > 0
    return _sum(np.where(timed, s.prompt_tokens, 0.0)) / _sum(np.where(timed, s.ttft, 0.0))


def _decode(s: Sample) -> np.ndarray:
    has = ~np.isnan(s.tpot)
    return _sum(np.where(has, s.completion_tokens - 1, 0.0)) / _sum(np.where(has, s.e2el - s.ttft, 0.0))


# Throughput = units / duration, and in a closed loop duration = sum of E2EL / requests in flight
# (fixed per run, so it cancels from the variance of the log ratio).
STATISTICS: dict[str, Statistic] = {
    **{f"{stat}_{lat}_ms": _latency(lat, stat) for lat in LATENCIES for stat in LATENCY_STATS if stat != "std"},
    "prefill_tok_per_s": _prefill,
    "decode_tok_per_s": _decode,
    "request_throughput": lambda s: s.e2el.shape[1] / _sum(s.e2el),
    "output_throughput": lambda s: _sum(s.completion_tokens) / _sum(s.e2el),
    "total_token_throughput": lambda s: _sum(s.prompt_tokens + s.completion_tokens) / _sum(s.e2el),
}


# Percentile figures: which latency and which percentile. A resampled p99 of 20 values can never
# exceed their maximum, so the bootstrap has no idea how far the true p99 could lie beyond it;
# a percentile is judged only with at least ``MIN_TAIL`` values beyond it on both sides.
PERCENTILE_FIGURES: dict[str, tuple[str, float]] = {
    f"{stat}_{lat}_ms": (lat, float(stat[1:])) for lat in LATENCIES for stat in LATENCY_STATS if stat[0] == "p"
}
MIN_TAIL = 10


def tail_values(sample: Sample, metric: str) -> float | None:
    """For a percentile figure, how many of the sample's values lie beyond the percentile."""
    if metric not in PERCENTILE_FIGURES:
        return None
    latency, pct = PERCENTILE_FIGURES[metric]
    return int(np.count_nonzero(~np.isnan(getattr(sample, latency)))) * (1 - pct / 100)


@lru_cache(maxsize=256)
def t_quantile(q: float, df: float) -> float:
    """The ``q`` quantile (q > 0.5) of Student's t with ``df`` degrees of freedom (numpy only:
    the upper tail integrated in u = atan(t), where the density is smooth, then bisection)."""
    if df > 1000:
        return NormalDist().inv_cdf(q)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def upper_tail(x: float) -> float:
        u = np.linspace(math.atan(x), math.pi / 2, 4001)[:-1]
        t = np.tan(u)
        dens = np.exp(log_c - (df + 1) / 2 * np.log1p(t * t / df)) / np.cos(u) ** 2
        return float(np.sum(dens) * (u[1] - u[0]))

    low, high = 0.0, 1.0
    while upper_tail(high) > 1 - q:
        low, high = high, high * 2
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if upper_tail(mid) > 1 - q else (low, mid)
    return (low + high) / 2


# Little's law with a fixed number in flight holds for a closed loop (a fixed concurrency); an
# open-loop cell (a ``rate``) has throughput set by its schedule: threshold rule.
CLOSED_LOOP_ONLY = frozenset({"request_throughput", "output_throughput", "total_token_throughput"})


def bootstrap_log_var(sample: Sample, stat: Statistic, resamples: int, rng: np.random.Generator) -> float:
    """Variance of the log of ``stat`` over ``resamples`` circular block-bootstrap resamples of
    the requests (blocks of ``sample.block`` in send order), scaled by b/(b-1) for b blocks; NaN
    when the figure is not positive in most resamples."""
    n, length = sample.n, sample.block
    draws = math.ceil(n / length)
    per = max(1, CHUNK_ELEMENTS // max(1, n * sample.itl.shape[1]))
    values: list[np.ndarray] = []
    for start in range(0, resamples, per):
        starts = rng.integers(0, n, size=(min(per, resamples - start), draws))
        idx = ((starts[:, :, None] + np.arange(length)) % n).reshape(len(starts), -1)[:, :n]
        with np.errstate(all="ignore"):
            values.append(np.asarray(stat(sample.take(idx)), dtype=float))
    v = np.concatenate(values)
    good = v[np.isfinite(v) & (v > 0)]
    if len(good) < 0.9 * resamples:
        return math.nan
    blocks = sample.blocks
    return float(np.var(np.log(good), ddof=1)) * blocks / (blocks - 1)


@dataclass(frozen=True)
class Judgement:
    """One figure of one cell, current against baseline."""

    key: str
    metric: Metric
    baseline: float
    current: float
    change: float  # (current - baseline) / baseline
    low: float | None = None  # interval of the change, same units as ``change``
    high: float | None = None
    method: str = "bootstrap"  # or "threshold"
    n_baseline: int = 0
    n_current: int = 0
    note: str | None = None
    regression: bool = False

    def record(self, confidence: float) -> dict[str, Any]:
        """The regression as summary.json keeps it."""
        out: dict[str, Any] = {
            "key": self.key,
            "metric": self.metric.name,
            "unit": self.metric.unit,
            "baseline": self.baseline,
            "current": self.current,
            "change": round(self.change, 4),
            "method": self.method,
        }
        if self.method == "bootstrap":
            out.update(
                ci_low=round(self.low, 4),
                ci_high=round(self.high, 4),
                confidence=confidence,
                n_baseline=self.n_baseline,
                n_current=self.n_current,
            )
        if self.note:
            out["note"] = self.note
        return out


def worse(metric: Metric, change: float, threshold: float) -> bool:
    """The change is at least the minimum effect, in the direction that is bad for ``metric``."""
    return change <= -threshold if metric.better == "higher" else change >= threshold


def interval_excludes_no_change(metric: Metric, low: float, high: float) -> bool:
    """The whole interval of the change lies on the worse side of zero."""
    return high < 0 if metric.better == "higher" else low > 0


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class Comparison:
    """Every compared figure, the regressions among them, and how they were judged."""

    judgements: list[Judgement] = field(default_factory=list)
    status_changes: list[dict[str, Any]] = field(default_factory=list)
    confidence: float = DEFAULT_CONFIDENCE
    threshold: float = 0.10
    z: float | None = None
    baseline_has_requests: bool = True
    between_cells_sd: dict[str, float] = field(default_factory=dict)

    @property
    def regressions(self) -> list[dict[str, Any]]:
        return self.status_changes + [j.record(self.confidence) for j in self.judgements if j.regression]

    def summary(self) -> dict[str, Any]:
        """How the comparison was made, for summary.json's meta and the report."""
        by = {m: sum(j.method == m for j in self.judgements) for m in ("bootstrap", "threshold", "too_few")}
        return {
            "method": "bootstrap" if by["bootstrap"] else "threshold",
            "confidence": self.confidence,
            "min_effect": self.threshold,
            "figures": len(self.judgements),
            "figures_bootstrap": by["bootstrap"],
            "figures_threshold": by["threshold"],
            "figures_too_few": by["too_few"],
            "z": round(self.z, 3) if self.z else None,
            "baseline_has_requests": self.baseline_has_requests,
            "between_cells_sd": self.between_cells_sd,
        }


def judge(
    current_cells: list[dict[str, Any]],
    baseline_cells: list[dict[str, Any]],
    current_samples: dict[str, Sample],
    baseline_samples: dict[str, Sample],
    threshold: float,
    confidence: float = DEFAULT_CONFIDENCE,
    metrics: list[Metric] | None = None,
    resamples: int = RESAMPLES,
    seed: int | None = 0,
) -> Comparison:
    """Compare the cells of two runs figure by figure (``metrics``: the metric table's compared
    ones). A figure with samples on both sides gets a Bonferroni-simultaneous interval at
    ``confidence`` over all such figures; the rest get the threshold rule."""
    metrics = regression_metrics() if metrics is None else metrics
    rng = np.random.default_rng(seed)
    result = Comparison(confidence=confidence, threshold=threshold, baseline_has_requests=bool(baseline_samples))
    before = {c["key"]: c for c in baseline_cells}
    pending: list[tuple[dict[str, Any], float]] = []  # judgement fields, variance of the log ratio
    for cell in current_cells:
        old = before.get(cell["key"])
        if old is None:
            continue
        if old.get("status") == "ok" and cell.get("status") != "ok":
            result.status_changes.append(status_regression(cell))
            continue
        a_s, b_s = baseline_samples.get(cell["key"]), current_samples.get(cell["key"])
        enough = a_s is not None and b_s is not None and min(a_s.n, b_s.n) >= MIN_REQUESTS
        for metric in metrics:
            a, b = old.get(metric.name), cell.get(metric.name)
            if not _number(a) or not _number(b) or a <= 0 or b <= 0:
                continue
            fields = {"key": cell["key"], "metric": metric, "baseline": a, "current": b, "change": (b - a) / a}
            stat = STATISTICS.get(metric.name)
            open_loop = metric.name in CLOSED_LOOP_ONLY and cell.get("rate") is not None
            if open_loop:
                stat = None
            var = math.nan
            tails = [tail_values(x, metric.name) for x in (a_s, b_s)] if enough else []
            thin = any(t is not None and t < MIN_TAIL for t in tails)
            if thin:
                # too few values beyond the percentile to tell a change from noise: not judged
                fields.update(method="too_few", note=f"fewer than {MIN_TAIL} values beyond the percentile on a side")
                result.judgements.append(Judgement(**fields))  # type: ignore[arg-type]
                continue
            if enough and stat is not None:
                var = bootstrap_log_var(a_s, stat, resamples, rng) + bootstrap_log_var(b_s, stat, resamples, rng)
                fields.update(n_baseline=a_s.n, n_current=b_s.n, df=min(a_s.blocks, b_s.blocks) - 1)
            if math.isfinite(var):
                pending.append((fields, var))
            else:
                note = (
                    "baseline has no per-request data"
                    if not baseline_samples
                    else "open loop: throughput follows the schedule, not the requests' latency"
                    if open_loop
                    else "no per-request recomputation of this figure"
                    if stat is None
                    else f"fewer than {MIN_REQUESTS} ok requests on a side"
                    if not enough
                    else "figure not positive in the resamples"
                )
                fields.pop("df", None)
                fields.update(method="threshold", note=note, n_baseline=0, n_current=0)
                result.judgements.append(
                    Judgement(**fields, regression=worse(metric, fields["change"], threshold))  # type: ignore[arg-type]
                )
    if pending:
        level = 1 - (1 - confidence) / (2 * len(pending))
        result.z = NormalDist().inv_cdf(level)
        quantiles: dict[int, float] = {}
        by_metric: dict[str, list[tuple[float, float]]] = {}
        for fields, var in pending:
            by_metric.setdefault(fields["metric"].name, []).append(
                (math.log(fields["current"] / fields["baseline"]), var)
            )
        extra = {name: between_cells_var(pairs) for name, pairs in by_metric.items()}
        result.between_cells_sd = {name: round(math.sqrt(v), 4) for name, v in extra.items() if v > 0}
        for fields, var in pending:
            df = max(1, math.floor(fields.pop("df")))
            if df not in quantiles:
                quantiles[df] = t_quantile(level, df)
            log_r = math.log(fields["current"] / fields["baseline"])
            half = quantiles[df] * math.sqrt(var + extra[fields["metric"].name])
            low, high = math.expm1(log_r - half), math.expm1(log_r + half)
            metric = fields["metric"]
            flagged = worse(metric, fields["change"], threshold) and interval_excludes_no_change(metric, low, high)
            result.judgements.append(Judgement(**fields, low=low, high=high, regression=flagged))  # type: ignore[arg-type]
    return result


def between_cells_var(pairs: list[tuple[float, float]]) -> float:
    """Variance of the log ratio of one figure across cells beyond what each cell's requests
    explain (DerSimonian-Laird's tau², as in a random-effects meta-analysis); ``pairs``: each
    cell's log ratio and its bootstrap variance. 0 with fewer than ``MIN_CELLS`` cells."""
    if len(pairs) < MIN_CELLS:
        return 0.0
    y = np.array([p[0] for p in pairs])
    w = 1.0 / np.maximum(np.array([p[1] for p in pairs]), 1e-12)
    mean = float(np.sum(w * y) / np.sum(w))
    q = float(np.sum(w * (y - mean) ** 2))
    c = float(np.sum(w) - np.sum(w * w) / np.sum(w))
    return max(0.0, (q - (len(pairs) - 1)) / c) if c > 0 else 0.0


def compare_runs(
    current_cells: list[dict[str, Any]],
    current_rows: pd.DataFrame,
    baseline_cells: list[dict[str, Any]],
    baseline_rows: pd.DataFrame,
    threshold: float,
    confidence: float = DEFAULT_CONFIDENCE,
) -> Comparison:
    """``judge`` on two runs' cell records (``report.cell_record``) and request rows."""
    return judge(
        current_cells, baseline_cells, cell_samples(current_rows), cell_samples(baseline_rows), threshold, confidence
    )


def compare_with_baseline(
    current_cells: list[dict[str, Any]],
    current_rows_path: Path,
    baseline_path: Path,
    baseline_cells: list[dict[str, Any]],
    threshold: float,
    confidence: float = DEFAULT_CONFIDENCE,
) -> Comparison:
    """The flow's comparison: this run's cells and requests.jsonl against the baseline's
    summary.json cells and the request rows in its folder (none: the threshold rule)."""
    return compare_runs(
        current_cells,
        read_jsonl_rows(current_rows_path),
        baseline_cells,
        read_run_rows(baseline_path.parent),
        threshold,
        confidence,
    )


def status_regression(cell: dict[str, Any]) -> dict[str, Any]:
    """The regression record of a cell that ran ok in the baseline and does not now."""
    return {"key": cell["key"], "metric": "status", "baseline": "ok", "current": cell.get("status"), "change": None}


def describe(r: dict[str, Any]) -> str:
    """A regression as the report and the log print it:
    ``ctx32-c1-out8 mean_ttft_ms: 12.1 -> 15.3 ms (+26%, 99% CI +18%..+35%)``."""
    if r.get("metric") == "status":
        return f"{r['key']} status: {r['baseline']} -> {r['current']}"
    unit = f" {r['unit']}" if r.get("unit") else ""
    text = f"{r['key']} {r['metric']}: {_fmt(r['baseline'])} -> {_fmt(r['current'])}{unit}"
    if r.get("change") is None:
        return text
    if r.get("method") == "bootstrap" and r.get("ci_low") is not None:
        level = f"{r['confidence']:.0%}".replace(".0%", "%")
        return text + f" ({r['change']:+.0%}, {level} CI {r['ci_low']:+.0%}..{r['ci_high']:+.0%})"
    return text + f" ({r['change']:+.0%}; threshold rule: {r.get('note') or 'no per-request data'})"


def note(summary: dict[str, Any] | None) -> str | None:
    """One sentence on how a comparison was judged (``Comparison.summary``), for the report."""
    if not summary or not summary.get("figures"):
        return None
    level = f"{summary['confidence']:.0%}".replace(".0%", "%")
    effect = f"{summary['min_effect']:.0%}"
    parts = []
    if summary.get("figures_bootstrap"):
        parts.append(
            f"{summary['figures_bootstrap']} figures by bootstrap of the cells' requests ({level} intervals, "
            f"simultaneous over them; flagged when wholly on the worse side and worse by at least {effect})"
        )
    if summary.get("figures_threshold"):
        why = "the baseline has no per-request data" if not summary.get("baseline_has_requests") else "no spread known"
        parts.append(f"{summary['figures_threshold']} figures by the {effect} threshold alone ({why})")
    if summary.get("figures_too_few"):
        parts.append(f"{summary['figures_too_few']} percentiles not judged (fewer than {MIN_TAIL} values beyond them)")
    return "Compared " + "; ".join(parts) + "."


def _fmt(x: Any) -> str:
    if not _number(x):
        return str(x)
    return f"{x:,.1f}" if abs(x) >= 10 else f"{x:.3g}"
