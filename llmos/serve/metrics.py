"""Server metrics in the Prometheus text format (no client library needed).

Counters: requests by route and status, prompt and completion tokens. Gauges: queue depth, active
generations, completion tokens per second over the last 10 seconds. Histograms: time to first token
(from the request's arrival to its first generated token, streamed or not), and batch size (the
sequences each step of the batch engine decoded in one forward pass).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Mapping

TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.ttft_counts = [0] * (len(TTFT_BUCKETS) + 1)
        self.ttft_sum = 0.0

    def request(self, route: str, status: int) -> None:
        with self._lock:
            self.requests[(route, status)] += 1

    def tokens(self, prompt: int, completion: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt
            self.completion_tokens += completion

    def first_token(self, seconds: float) -> None:
        with self._lock:
            i = next((i for i, b in enumerate(TTFT_BUCKETS) if seconds <= b), len(TTFT_BUCKETS))
            self.ttft_counts[i] += 1
            self.ttft_sum += seconds

    def render(self, *, queue_depth: int, active: int, tokens_per_second: float, loaded: bool,
               batch_sizes: Mapping[int, int] | None = None) -> str:
        """`batch_sizes`: batch-engine decode steps by the number of sequences they decoded."""
        with self._lock:
            lines = [
                "# HELP llmos_requests_total HTTP requests by route and status.",
                "# TYPE llmos_requests_total counter",
            ]
            for (route, status), n in sorted(self.requests.items()):
                lines.append(f'llmos_requests_total{{route="{route}",status="{status}"}} {n}')
            lines += [
                "# HELP llmos_prompt_tokens_total Prompt tokens read.",
                "# TYPE llmos_prompt_tokens_total counter",
                f"llmos_prompt_tokens_total {self.prompt_tokens}",
                "# HELP llmos_completion_tokens_total Tokens generated.",
                "# TYPE llmos_completion_tokens_total counter",
                f"llmos_completion_tokens_total {self.completion_tokens}",
                "# HELP llmos_queue_depth Requests waiting for a generation slot.",
                "# TYPE llmos_queue_depth gauge",
                f"llmos_queue_depth {queue_depth}",
                "# HELP llmos_active_requests Generations running now.",
                "# TYPE llmos_active_requests gauge",
                f"llmos_active_requests {active}",
                "# HELP llmos_tokens_per_second Tokens generated per second over the last 10 s, all requests.",
                "# TYPE llmos_tokens_per_second gauge",
                f"llmos_tokens_per_second {tokens_per_second:.3f}",
                "# HELP llmos_model_loaded 1 once the model is loaded.",
                "# TYPE llmos_model_loaded gauge",
                f"llmos_model_loaded {int(loaded)}",
                "# HELP llmos_time_to_first_token_seconds Time from request arrival to its first token.",
                "# TYPE llmos_time_to_first_token_seconds histogram",
            ]
            cumulative = 0
            for bound, n in zip(TTFT_BUCKETS, self.ttft_counts):
                cumulative += n
                lines.append(f'llmos_time_to_first_token_seconds_bucket{{le="{bound}"}} {cumulative}')
            cumulative += self.ttft_counts[-1]
            lines += [
                f'llmos_time_to_first_token_seconds_bucket{{le="+Inf"}} {cumulative}',
                f"llmos_time_to_first_token_seconds_sum {self.ttft_sum:.6f}",
                f"llmos_time_to_first_token_seconds_count {cumulative}",
                "# HELP llmos_batch_size Sequences decoded together per batch-engine step.",
                "# TYPE llmos_batch_size histogram",
            ]
        sizes = dict(batch_sizes or {})
        for bound in BATCH_BUCKETS:
            up_to = sum(n for size, n in sizes.items() if size <= bound)
            lines.append(f'llmos_batch_size_bucket{{le="{bound}"}} {up_to}')
        lines += [
            f'llmos_batch_size_bucket{{le="+Inf"}} {sum(sizes.values())}',
            f"llmos_batch_size_sum {sum(size * n for size, n in sizes.items())}",
            f"llmos_batch_size_count {sum(sizes.values())}",
        ]
        return "\n".join(lines) + "\n"
