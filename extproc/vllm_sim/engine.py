"""The continuous-batching scheduler loop of one simulated pod.

Each step mirrors vLLM v1's FCFS scheduler: running sequences get room for their next token
first (preempting the newest by recompute when blocks run out), then waiting sequences are
admitted in order while a batch slot, the token budget, LoRA slots and KV blocks allow. The
step then "executes" for a duration that grows with uncached prefill tokens and batch size,
and every scheduled sequence emits one token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from extproc.kvevents.block_hash import BlockHasher
from extproc.tasks import cancel_and_wait

from .config import SimParams
from .kv_cache import KVCacheManager
from .kv_events import Event
from .metrics import EngineStats, Snapshot
from .sequence import SeqStatus, Sequence, TokenEvent
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)


def pod_hash_seed(params: SimParams) -> str | None:
    """The seed of the pod's ``NONE_HASH``: its ``PYTHONHASHSEED``; unset, the sha256 variants
    use vLLM's fixed default and the xxhash variants a random one (as vLLM, unreproducible)."""
    if params.hash_seed:
        return params.hash_seed
    if params.prefix_caching_hash_algo.startswith("xxhash"):
        return secrets.token_hex(16)
    return None


class RequestRejected(ValueError):
    """The request can never run on this engine (too long for the model or the cache)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(slots=True)
class StepPlan:
    """What one step computes: the batch and the prefill work inside it."""

    batch: list[Sequence]
    prefill_tokens: int


class Engine:
    """Scheduler, KV cache and clock for one pod; run ``start()`` inside an event loop."""

    def __init__(
        self, params: SimParams, publish: Callable[[list[Event]], None] | None = None
    ) -> None:
        self.params = params
        self.hasher = BlockHasher(
            params.prefix_caching_hash_algo, params.block_size, pod_hash_seed(params)
        )
        self.kv = KVCacheManager(
            params.num_gpu_blocks,
            params.block_size,
            params.enable_prefix_caching,
            self.hasher,
            record_events=publish is not None,
        )
        self._publish = publish
        self.lora_enabled = False
        """Record ``lora_requests_info`` every step (vLLM's ``--enable-lora``)."""
        self.stats = EngineStats(max_model_len=params.max_model_len)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.steps = 0
        self.lag_seconds = 0.0
        """Total time steps overran their simulated duration (the host CPU could not keep up)."""
        self.requests_received = 0
        self.requests_finished = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._run(), name="vllm-sim-engine")

    async def stop(self) -> None:
        await cancel_and_wait([self._task])
        self._task = None
        for seq in [*self.running, *self.waiting]:
            self._finish(seq, "abort", self.now())
        self.running.clear()
        self.waiting.clear()

    def now(self) -> float:
        loop = self._loop or asyncio.get_running_loop()
        return loop.time()

    def update_params(self, params: SimParams) -> None:
        """Apply new parameters from the next step on (cache geometry is fixed)."""
        self.params = params
        self.kv.enable_prefix_caching = params.enable_prefix_caching
        self._wakeup.set()

    # -- requests ------------------------------------------------------------------------------

    def check(self, prompt_len: int, max_tokens: int) -> None:
        """Reject what could never be scheduled, as vLLM does with a 400 (callers clamp
        ``max_tokens`` to the room the prompt leaves first, as vLLM does)."""
        limit = self.params.max_model_len
        if prompt_len < 1:
            raise RequestRejected("The prompt must contain at least one token.")
        if prompt_len + max_tokens > limit:
            raise RequestRejected(
                f"This model's maximum context length is {limit} tokens. However, your prompt "
                f"contains at least {limit + 1} input tokens, which exceeds this limit even "
                "without any output tokens. Please reduce the length of the input prompt. "
                f"(parameter=input_tokens, value={limit + 1})",
                "input_tokens",
            )
        capacity = self.kv.num_blocks * self.kv.block_size
        if prompt_len + max_tokens > capacity:
            raise RequestRejected(
                f"The request needs {prompt_len + max_tokens} tokens of KV cache but the pod "
                f"only has {capacity}."
            )

    def submit(self, seq: Sequence) -> None:
        self.check(len(seq.prompt_ids), max(seq.max_tokens, 1))
        seq.arrival_time = self.now()
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)
        self.requests_received += 1
        self._wakeup.set()

    def abort(self, seq: Sequence) -> None:
        """Drop a request whose client went away; its blocks stay cached."""
        if seq.status is SeqStatus.FINISHED:
            return
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
            self.kv.free(seq)
        else:
            with contextlib.suppress(ValueError):
                self.waiting.remove(seq)
        self._finish(seq, "abort", self.now())

    def snapshot(self) -> Snapshot:
        running_loras = sorted({s.lora for s in self.running if s.lora})
        waiting_loras = sorted({s.lora for s in self.waiting if s.lora})
        full = set(running_loras)
        deferred = sum(
            1
            for s in self.waiting
            if s.lora and s.lora not in full and len(full) >= self.params.max_loras
        )
        return Snapshot(
            running=len(self.running),
            waiting=len(self.waiting),
            kv_usage=self.kv.usage,
            running_loras=running_loras,
            waiting_loras=waiting_loras,
            deferred=deferred,
        )

    # -- the loop ------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            if not self.running and not self.waiting:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            started = self.now()
            plan = self._schedule(started)
            if not plan.batch:
                # Nothing fits (e.g. LoRA slots all busy with nothing running): wait for change.
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), 0.05)
                continue
            due = started + self.step_duration(plan)
            await asyncio.sleep(max(due - self.now(), 0.0))
            now = self.now()
            self.lag_seconds += max(now - due, 0.0)
            try:
                self._complete(plan, now)
            except Exception:  # a bug must not wedge the pod silently
                log.exception("engine step failed")
                raise
            self.flush_events()
            if self.lora_enabled:
                snapshot = self.snapshot()
                key = (",".join(snapshot.running_loras), ",".join(snapshot.waiting_loras))
                self.stats.lora_info[key] = time.time()

    def flush_events(self) -> None:
        """Hand the KV events of the step just done to the publisher, as one batch (vLLM
        takes them once per engine step)."""
        if self._publish is not None:
            events = self.kv.take_events()
            if events:
                self._publish(events)

    def reset_prefix_cache(self) -> bool:
        """vLLM's ``/reset_prefix_cache``. As in vLLM, the ``AllBlocksCleared`` event goes out
        with the events of the engine's next step, so an idle pod announces it only when the
        next request runs."""
        return self.kv.reset_prefix_cache()

    def step_duration(self, plan: StepPlan) -> float:
        """Prefill cost of uncached tokens plus a decode cost growing with the batch."""
        p = self.params
        seconds = (
            plan.prefill_tokens * p.prefill_time_per_token
            + p.decode_time_base
            + p.decode_time_per_seq * len(plan.batch)
        )
        return seconds * p.step_multiplier

    def _schedule(self, now: float) -> StepPlan:
        p = self.params
        preempted = False
        index = 0
        while index < len(self.running):
            seq = self.running[index]
            while not self.kv.grow(seq):
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                self.kv.register_full_blocks(seq)
                index += 1
        prefill_tokens = 0
        if not preempted:
            prefill_tokens = self._admit(now, p)
        return StepPlan(list(self.running), prefill_tokens)

    def _admit(self, now: float, p: SimParams) -> int:
        budget = p.max_num_batched_tokens - len(self.running)
        loras = {s.lora for s in self.running if s.lora}
        skipped: list[Sequence] = []
        prefill_tokens = 0
        admitted = 0
        while self.waiting and len(self.running) < p.max_num_seqs:
            seq = self.waiting[0]
            if seq.lora and seq.lora not in loras and len(loras) >= p.max_loras:
                skipped.append(self.waiting.popleft())
                continue
            found = self.kv.lookup(seq)
            new_tokens = seq.num_tokens - found.num_cached_tokens
            if admitted and new_tokens > budget:
                break
            if not self.kv.allocate(seq, found):
                break
            self.waiting.popleft()
            self.running.append(seq)
            seq.status = SeqStatus.RUNNING
            if seq.lora:
                loras.add(seq.lora)
            admitted += 1
            budget -= new_tokens
            prefill_tokens += new_tokens
            self.stats.prefix_queries += seq.num_tokens
            self.stats.prefix_hits += found.num_cached_tokens
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
                self.stats.queue_time.observe(now - seq.arrival_time)
            if not seq.prompt_counted:
                seq.prompt_counted = True
                self.stats.prompt_tokens += len(seq.prompt_ids)
                seq.num_prompt_cached_tokens = min(found.num_cached_tokens, len(seq.prompt_ids))
                self.stats.prompt_tokens_cached += seq.num_prompt_cached_tokens
        self.waiting.extendleft(reversed(skipped))
        return prefill_tokens

    def _preempt(self, seq: Sequence) -> None:
        """Recompute-style preemption: drop the blocks, requeue at the front."""
        self.kv.free(seq)
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        seq.num_preemptions += 1
        self.stats.preemptions += 1

    def _complete(self, plan: StepPlan, now: float) -> None:
        self.steps += 1
        self.stats.iteration_tokens.observe(plan.prefill_tokens + len(plan.batch))
        vocab = self.params.vocab_size
        for seq in plan.batch:
            if seq.status is not SeqStatus.RUNNING:
                continue  # aborted or preempted while the step ran
            if seq.is_pooling:
                self._retire(seq, "stop", now)
                continue
            previous = seq.output_ids[-1] if seq.output_ids else seq.prompt_ids[-1]
            token = Tokenizer.output_token(previous, len(seq.output_ids), vocab)
            seq.output_ids.append(token)
            self.stats.generation_tokens += 1
            if seq.first_token_time is None:
                seq.first_token_time = now
                self.stats.ttft.observe(now - seq.arrival_time)
                if seq.first_scheduled_time is not None:
                    self.stats.prefill_time.observe(now - seq.first_scheduled_time)
            elif seq.last_token_time is not None:
                self.stats.itl.observe(now - seq.last_token_time)
            seq.last_token_time = now
            done = len(seq.output_ids) >= seq.max_tokens
            if seq.stream:
                reason = "length" if done else None
                seq.events.put_nowait(TokenEvent(token, Tokenizer.decode_output(token), reason))
            if done:
                self._retire(seq, "length", now)

    def _retire(self, seq: Sequence, reason: str, now: float) -> None:
        self.running.remove(seq)
        self.kv.free(seq)
        self.stats.record_finished(seq, reason, now)
        self.requests_finished += 1
        self._finish(seq, reason, now)

    @staticmethod
    def _finish(seq: Sequence, reason: str, now: float) -> None:
        if seq.status is SeqStatus.FINISHED:
            return
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        seq.finish_time = now
        if seq.stream and reason == "abort":
            seq.events.put_nowait(TokenEvent(None, "", "abort"))
        seq.done.set()
