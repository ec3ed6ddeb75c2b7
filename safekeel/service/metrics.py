"""Prometheus metrics (safekeel_ prefix, base units, _total counters, low-cardinality labels).

Request metrics live in the API process. Job metrics (counts by status, selection and training
durations) are read from the database at scrape time, so they include work done by worker
processes and survive restarts without prometheus multiprocess files.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
SCORE_BUCKETS = (-16, -8, -4, -2, -1, 0, 1, 2, 4, 8, 16)
MONITOR_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1)
DURATION_BUCKETS = (0.01, 0.1, 1, 5, 15, 60, 300, 900, 1800, 3600, 7200)


class JobCollector:
    def __init__(self, store) -> None:
        self.store = store

    def collect(self):
        jobs = GaugeMetricFamily("safekeel_fine_tuning_jobs", "Fine-tuning jobs by status", labels=["status"])
        for status, count in self.store.count_jobs_by_status().items():
            jobs.add_metric([status], count)
        yield jobs
        decisions = GaugeMetricFamily("safekeel_data_gate_decisions", "The data gate's decisions on fine-tuning jobs' "
                                      "training files", labels=["decision"])
        levels = self.store.count_events_by_level("data_gate")
        for decision, level in (("passed", "info"), ("warned", "warn"), ("rejected", "error")):
            decisions.add_metric([decision], levels.get(level, 0))
        yield decisions
        stages = {"selection": "selection_seconds", "training": "training_seconds", "gate": "gate_seconds", "audit": "audit_seconds"}
        timings = self.store.job_timings()
        for stage, key in stages.items():
            values = [t[key] for t in timings if key in t]
            buckets = [(str(bound), sum(1 for v in values if v <= bound)) for bound in DURATION_BUCKETS]
            buckets.append(("+Inf", len(values)))
            yield HistogramMetricFamily(f"safekeel_job_{stage}_duration_seconds", f"Time fine-tuning jobs spent in {stage}",
                                        buckets=buckets, sum_value=float(sum(values)))


class ReplicaCollector:
    """Serving replicas' state at scrape time (safekeel.service.replicas.ReplicaPool): up, load, adapters held."""

    def __init__(self, pool) -> None:
        self.pool = pool

    def collect(self):
        up = GaugeMetricFamily("safekeel_replica_up", "Serving replica reachable (1) or not (0)", labels=["replica"])
        load = GaugeMetricFamily("safekeel_replica_in_flight", "Requests this API process has in flight on a serving replica",
                                 labels=["replica"])
        adapters = GaugeMetricFamily("safekeel_replica_adapters", "LoRA adapters loaded on a serving replica", labels=["replica"])
        for replica in self.pool.replicas:
            up.add_metric([replica.url], int(replica.up))
            load.add_metric([replica.url], replica.in_flight)
            adapters.add_metric([replica.url], len(replica.adapters))
        yield from (up, load, adapters)


class ServiceMetrics:
    def __init__(self, store) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("safekeel_http_requests_total", "HTTP requests by endpoint and status code",
                                ["endpoint", "method", "status"], registry=self.registry)
        self.latency = Histogram("safekeel_http_request_duration_seconds", "HTTP request latency (to the last byte)",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.ttft = Histogram("safekeel_time_to_first_token_seconds", "Time from request to the first generated token",
                              ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tokens = Counter("safekeel_generated_tokens_total", "Completion tokens generated", ["model"], registry=self.registry)
        self.prompt_tokens = Counter("safekeel_prompt_tokens_total", "Prompt tokens processed (guard demonstrations included)",
                                     ["model"], registry=self.registry)
        self.guard_actions = Counter("safekeel_guard_actions_total", "Test-time guard actions applied to requests",
                                     ["action"], registry=self.registry)
        self.monitor_scores = Histogram("safekeel_monitor_score", "Monitor scores of chat requests (logit scale; compare with the threshold)",
                                        ["monitor", "model"], buckets=SCORE_BUCKETS, registry=self.registry)
        self.monitor_decisions = Counter("safekeel_monitor_decisions_total", "Monitor policy decisions on chat requests",
                                         ["model", "decision"], registry=self.registry)
        self.monitor_concept_decisions = Counter("safekeel_monitor_concept_decisions_total",
                                                 "Per-concept monitor decisions on chat requests (concepts with their own policy)",
                                                 ["concept", "model", "decision"], registry=self.registry)
        self.monitor_latency = Histogram("safekeel_monitor_duration_seconds", "Time to score one request with all monitors",
                                         buckets=MONITOR_BUCKETS, registry=self.registry)
        self.replica_routed = Counter("safekeel_replica_routed_total", "Generations routed to a serving replica: outcome hit "
                                      "(it held the adapter), miss (it loads it) or base", ["replica", "outcome"], registry=self.registry)
        self.replica_errors = Counter("safekeel_replica_errors_total", "Serving replicas found unreachable (by a request or the probe)",
                                      ["replica"], registry=self.registry)
        self.registry.register(JobCollector(store))

    def watch_replicas(self, pool) -> None:
        self.registry.register(ReplicaCollector(pool))

    @staticmethod
    def model_label(model_id: str, base_models: list[str]) -> str:
        """Fine-tunes are many: label them by their base model ("ft:<base>") to keep cardinality low."""
        if model_id in base_models:
            return model_id
        parts = model_id.split(":")
        return f"ft:{parts[1]}" if len(parts) > 2 and parts[0] == "ft" else "unknown"
