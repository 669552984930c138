"""One /metrics for a node whose calls are spread over worker processes: the workers' expositions merged.

Each worker keeps its own registry (controller.metrics) and serves it on a private loopback port; the parent
scrapes them all at every scrape of its own `metrics.listen` and adds samples with the same name and labels, so
the series and their names are exactly those of a single daemon. Counters, histogram buckets, sums and counts and
the per-route gauges (calls active, outbound calls live: a call lives in one worker) add up. A few series do not:

- `forkbridge_esl_connected`: min. Every worker has its own ESL connection, and the node takes all of its calls
  only while all of them are up; the sum would read 2 with one connection down and look healthy to an alert on
  `== 0` only by accident.
- `forkbridge_config_reloads_total`: max. Every reload is forwarded to every worker, so each counts the same
  reloads; the sum would count one SIGHUP N times. A file the parent refused never reaches the workers: the
  parent counts those refusals itself.
- `*_created`: min, the earliest creation (a sum of timestamps means nothing).

A worker that does not answer a scrape (slow, restarting) is represented by its last exposition; what a worker
that died had counted is carried and added to its successor's (controller.workers.carry_counters). So the node's
counters never go down while its processes come and go: a drop would be read by Prometheus' rate() as a reset,
and every other worker's whole total counted again.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

MIN_FAMILIES = frozenset({"forkbridge_esl_connected"})
MAX_FAMILIES = frozenset({"forkbridge_config_reloads"})


Key = tuple[str, tuple[tuple[str, str], ...]]  # a sample's name and sorted labels
MONOTONIC = frozenset({"counter", "histogram", "summary"})


def merge(expositions: Iterable[str], extra: Iterable[Metric] = ()) -> list[Metric]:
    """The families of every exposition, samples with the same name and labels combined (see the module's
    docstring); `extra` (the parent's own families, and the counts carried from dead workers) is merged the
    same way."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[Key, float]] = {}
    sources = [text_string_to_metric_families(text) for text in expositions]
    for family in (f for source in (*sources, extra) for f in source):
        merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
        seen = values.setdefault(family.name, {})
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            if key not in seen:
                seen[key] = sample.value
            else:
                seen[key] = _combine(family.name, sample.name, seen[key], sample.value)
    for name, merged in families.items():
        for (sample_name, labels), value in values[name].items():
            merged.add_sample(sample_name, dict(labels), value)
    return list(families.values())


def counters(exposition: str) -> list[Metric]:
    """The families of an exposition that only ever grow (counters, histograms, summaries), without their
    `*_created` samples: what a worker that died had counted."""
    kept = []
    for family in text_string_to_metric_families(exposition) if exposition else ():
        if family.type in MONOTONIC:
            grown = Metric(family.name, family.documentation, family.type)
            grown.samples = [s for s in family.samples if not s.name.endswith("_created")]
            kept.append(grown)
    return kept


def _combine(family: str, sample: str, old: float, new: float) -> float:
    if family in MIN_FAMILIES or sample.endswith("_created"):
        return min(old, new)
    if family in MAX_FAMILIES:
        return max(old, new)
    return old + new

