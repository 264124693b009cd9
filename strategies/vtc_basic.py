"""``vtc-basic``: per-user fairness (a virtual token counter) mixed with pod load.

Heavy users' requests are kept on one end of the fleet and light users' on the other, so a light
user's short request does not queue behind a heavy user's long generations, unless load says
otherwise.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from strategies.base import Strategy
from strategies.context import USAGE, Finished, RoutingContext, Score
from strategies.selection import lower_is_better

BUCKETS = 12
"""Granularity of the counters' sliding window (5-second buckets for the default minute)."""


class _Window:
    """A sum over the last ``BUCKETS`` buckets; amounts leave with their bucket."""

    __slots__ = ("_buckets", "last")

    def __init__(self) -> None:
        self._buckets: deque[list[float]] = deque()
        self.last = 0
        """The newest bucket charged."""

    def add(self, bucket: int, amount: float) -> None:
        self.expire(bucket)
        buckets = self._buckets
        if buckets and buckets[-1][0] == bucket:
            buckets[-1][1] += amount
        else:
            buckets.append([bucket, amount])
        self.last = bucket

    def subtract(self, other: _Window) -> None:
        """Take ``other``'s amounts out of this window, bucket by bucket."""
        mine = {int(b[0]): b for b in self._buckets}
        for bucket, amount in other._buckets:
            entry = mine.get(int(bucket))
            if entry is not None:
                entry[1] = max(0.0, entry[1] - amount)

    def expire(self, bucket: int) -> None:
        buckets = self._buckets
        while buckets and buckets[0][0] <= bucket - BUCKETS:
            buckets.popleft()

    def total(self, bucket: int) -> float:
        """The sum as of ``bucket``, without changing anything (scores are dry-run safe)."""
        horizon = bucket - BUCKETS
        return sum(amount for b, amount in self._buckets if b > horizon)


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
    - ``load`` is the load estimate, and ``fairness_requests`` says how many in-flight
      requests the fairness preference is worth (0 makes this ``least-request``).
    Without a user header the request is routed by load alone. Counters are charged from the
    usage the server read (exact where the pod reports it); at most ``max_users`` users are
    tracked, the least recently active dropped first, their tokens with them.
    """

    algorithm = "vtc-basic"
    consumes = frozenset({USAGE})
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

    def score(self, ctx: RoutingContext) -> Sequence[Score]:
        pods = ctx.pods
        costs = [pod.load for pod in pods]
        user = ctx.user
        count = len(pods)
        if user is None or count < 2 or self.fairness_requests == 0:
            return lower_is_better(costs, self.smoothing)
        share = self.share(user, ctx.now)
        pull = self.fairness_requests * abs(2.0 * share - 1.0)
        order = sorted(range(count), key=lambda i: pods[i].name)
        for rank, index in enumerate(order):
            costs[index] += pull * abs(rank / (count - 1) - share)
        return lower_is_better(costs, self.smoothing)

    def share(self, user: str, now: float) -> float:
        """``s`` of the formula: where ``user`` stands between idle (0) and heaviest (-> 1)."""
        bucket = self._bucket(now)
        total = self._all.total(bucket)
        window = self._users.get(user)
        mine = window.total(bucket) if window is not None else 0.0
        mine_active = window is not None and window.last > bucket - BUCKETS
        others = self._active(bucket) - mine_active
        if others <= 0:
            return 0.5
        others_mean = max(0.0, total - mine) / others
        if mine + others_mean <= 0:
            return 0.5
        return mine / (mine + others_mean)

    def _active(self, bucket: int) -> int:
        """Users charged within the window. Users are kept in order of their last charge, so
        the idle ones lead; the hooks drop them, and this only skips those not dropped yet."""
        horizon = bucket - BUCKETS
        idle = 0
        for window in self._users.values():
            if window.last > horizon:
                break
            idle += 1
        return len(self._users) - idle

    def on_finished(self, done: Finished) -> None:
        usage = done.usage
        user = done.user
        if user is None or usage is None:
            return
        amount = (
            self.prompt_weight * usage.prompt_tokens
            + self.completion_weight * usage.completion_tokens
        )
        bucket = self._bucket(done.finished_at)
        self._forget_idle(bucket)
        if amount <= 0:
            return
        users = self._users
        window = users.get(user)
        if window is None:
            window = users[user] = _Window()
            if len(users) > self.max_users:
                _, evicted = users.popitem(last=False)
                self._all.subtract(evicted)
        else:
            users.move_to_end(user)
        window.add(bucket, amount)
        self._all.add(bucket, amount)

    def _bucket(self, now: float) -> int:
        return int(now * BUCKETS // self.window_seconds)

    def _forget_idle(self, bucket: int) -> None:
        """Drop users, least recently charged first, whose counters have emptied."""
        users = self._users
        horizon = bucket - BUCKETS
        while users:
            oldest = next(iter(users.values()))
            if oldest.last > horizon:
                return
            users.popitem(last=False)
        self._all.expire(bucket)
