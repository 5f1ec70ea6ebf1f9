"""What /metrics reports, in Prometheus's text format (prometheus_client, one registry per server).

Counters only grow (requests by endpoint and status, prompt and generated tokens); gauges are
read from the engine when scraped (queue depth, running batch size); histograms give time to
first token and whole-request latency. docs/serving.md says which of them to autoscale on.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self, engine):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("lmforge_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=registry)
        self.prompt_tokens = Counter("lmforge_prompt_tokens", "Prompt tokens processed", registry=registry)
        self.generated_tokens = Counter("lmforge_generation_tokens", "Tokens generated", registry=registry)
        queue = Gauge("lmforge_queue_depth", "Requests waiting for a batch slot", registry=registry)
        queue.set_function(lambda: engine.queue_depth)
        running = Gauge("lmforge_running_requests", "Sequences in the running batch", registry=registry)
        running.set_function(lambda: engine.batch_size)
        slots = Gauge("lmforge_batch_capacity", "Batch slots (--max-batch)", registry=registry)
        slots.set(engine.max_batch)
        self.ttft = Histogram("lmforge_time_to_first_token_seconds", "Time from request to its first token",
                              buckets=LATENCY_BUCKETS, registry=registry)
        self.latency = Histogram("lmforge_request_latency_seconds", "Time from request to its last token",
                                 buckets=LATENCY_BUCKETS, registry=registry)

    def finished(self, generation, now: float) -> None:
        """Account one generation request that ran to its end."""
        usage = generation.usage()
        self.prompt_tokens.inc(usage["prompt_tokens"])
        self.generated_tokens.inc(usage["completion_tokens"])
        if generation.first_token is not None:
            self.ttft.observe(generation.first_token - generation.started)
        self.latency.observe(now - generation.started)

    def render(self) -> bytes:
        return generate_latest(self.registry)
