"""Reading /metrics in tests: the samples of one scrape, by name and labels."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(client: httpx.Client) -> Samples:
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample with exactly these labels (0 when absent: a series not yet created)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of every sample of `name` whose labels include these."""
    return sum(
        sample_value
        for (sample_name, sample_labels), sample_value in samples.items()
        if sample_name == name and set(labels.items()) <= set(sample_labels)
    )


def wait_until(
    client: httpx.Client, check: Callable[[Samples], bool], timeout: float = 10
) -> Samples:
    """Scrape until `check` holds (a stream's bookkeeping follows its messages)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(client)
        if check(samples):
            return samples
        assert time.monotonic() < deadline, "metrics did not reach the expected values"
        time.sleep(0.05)
