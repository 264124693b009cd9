"""``vtc-basic``: per-user fairness (a virtual token counter) mixed with pod load.

Heavy users' requests are kept on one end of the fleet and light users' on the other, so a light
user's short request does not queue behind a heavy user's long generations, unless load says
otherwise.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from strategies.base import PodView, RequestView, Strategy, Timings, Usage
from strategies.selection import lower_is_better

BUCKETS = 12
"""Granularity of the counters' sliding window (5-second buckets for the default minute)."""


class _Window:
    """A sum over the last ``BUCKETS`` buckets; amounts leave with their bucket."""

    __slots__ = ("_buckets", "total")

    def __init__(self) -> None:
        self._buckets: deque[list[float]] = deque()
        self.total = 0.0

    def add(self, bucket: int, amount: float) -> None:
        self.expire(bucket)
        buckets = self._buckets
        if buckets and buckets[-1][0] == bucket:
            buckets[-1][1] += amount
        else:
            buckets.append([bucket, amount])
        self.total += amount

    def expire(self, bucket: int) -> float:
        buckets = self._buckets
        while buckets and buckets[0][0] <= bucket - BUCKETS:
            self.total -= buckets.popleft()[1]
        if not buckets:
            self.total = 0.0
        return self.total


@dataclass
class VtcBasic(Strategy):
    """Pick the pod with the lowest ``cost = load + fairness_requests x |h| x |x - s|``, scored
    ``1 - cost / (max_cost + smoothing)``, where:

    - ``c(u)``, the user's virtual token counter: ``prompt_weight x prompt_tokens +
      completion_weight x completion_tokens`` of their requests that finished in the last
      ``window_seconds`` (decode is the dearer phase per token, hence 1 and 2);
    - ``s = c(u) / (c(u) + mean c of the other users active in the window)``: 0 for a user with
      nothing in the window, 1/2 for one like the others, towards 1 for one far heavier (1/2
      when no one else is active);
    - ``x`` is the pod's position among the candidates sorted by name, from 0 to 1, so users of
      like weight meet on the same pods and heavy and light users sit at opposite ends;
    - ``h = 2s - 1`` scales the pull by how far the user is from average: an average user
      (``h = 0``) is routed purely by load;
    - ``load`` is the load estimate of DESIGN section 5, and ``fairness_requests`` says how many
      in-flight requests the fairness preference is worth (0 makes this ``least-request``).

    Without a user header the request is routed by load alone. Counters are charged from the
    usage the gateway read (requests routed by a plan that includes vtc-basic, and users with a
    TPM limit); at most ``max_users`` users are tracked, the least recently active dropped first.
    """

    name = "vtc-basic"
    needs_usage = True
    fairness_requests: float = 4.0
    prompt_weight: float = 1.0
    completion_weight: float = 2.0
    window_seconds: float = 60.0
    max_users: int = 10_000
    smoothing: float = 1.0
    _users: OrderedDict[str, _Window] = field(init=False, repr=False, default_factory=OrderedDict)
    _all: _Window = field(init=False, repr=False, default_factory=_Window)

    def __post_init__(self) -> None:
        if self.fairness_requests < 0 or self.prompt_weight < 0 or self.completion_weight < 0:
            raise ValueError("fairness_requests, prompt_weight and completion_weight must be >= 0")
        if self.window_seconds <= 0 or self.smoothing <= 0:
            raise ValueError("window_seconds and smoothing must be > 0")
        if self.max_users < 1:
            raise ValueError("max_users must be >= 1")

    def score(self, request: RequestView, pods: Sequence[PodView]) -> Sequence[float]:
        now = request.now
        costs = [pod.load(now) for pod in pods]
        user = request.user
        count = len(pods)
        if user is None or count < 2 or self.fairness_requests == 0:
            return lower_is_better(costs, self.smoothing)
        share = self.share(user, now)
        pull = self.fairness_requests * abs(2.0 * share - 1.0)
        order = sorted(range(count), key=lambda i: pods[i].name)
        for rank, index in enumerate(order):
            costs[index] += pull * abs(rank / (count - 1) - share)
        return lower_is_better(costs, self.smoothing)

    def share(self, user: str, now: float) -> float:
        """``s`` of the formula: where ``user`` stands between idle (0) and heaviest (-> 1)."""
        bucket = self._bucket(now)
        self._forget_idle(bucket)
        total = self._all.expire(bucket)
        window = self._users.get(user)
        mine = window.expire(bucket) if window is not None else 0.0
        others = len(self._users) - (window is not None)
        if others <= 0:
            return 0.5
        others_mean = max(0.0, total - mine) / others
        if mine + others_mean <= 0:
            return 0.5
        return mine / (mine + others_mean)

    def on_finished(
        self, request: RequestView, pod: PodView, usage: Usage | None, timings: Timings
    ) -> None:
        user = request.user
        if user is None or usage is None:
            return
        amount = (
            self.prompt_weight * usage.prompt_tokens
            + self.completion_weight * usage.completion_tokens
        )
        if amount <= 0:
            return
        now = timings.finished_at if timings.finished_at is not None else request.now
        bucket = self._bucket(now)
        window = self._users.get(user)
        if window is None:
            window = self._users[user] = _Window()
            if len(self._users) > self.max_users:
                self._users.popitem(last=False)
        else:
            self._users.move_to_end(user)
        window.add(bucket, amount)
        self._all.add(bucket, amount)

    def _bucket(self, now: float) -> int:
        return int(now * BUCKETS // self.window_seconds)

    def _forget_idle(self, bucket: int) -> None:
        """Drop users, least recently charged first, whose counters have emptied."""
        users = self._users
        while users:
            oldest = next(iter(users.values()))
            if oldest.expire(bucket) > 0:
                return
            users.popitem(last=False)
