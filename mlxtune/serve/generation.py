"""The one worker thread that runs the model: every request joins one continuous batch.

MLX computes one graph at a time, so a single thread owns the model and one mlx-lm
BatchGenerator. Requests for the base model and for any number of adapters share that batch and
every forward pass: each row carries its adapter's slot (rows.py) and the adapter layers gather
each row's own low-rank pair (registry.py), so no request ever computes with another's weights.
A request waits only while the batch is full or while every adapter slot is held by running rows
and its own adapter is not resident (then strictly in arrival order, so it cannot starve).

A request that starts like an earlier one on the same adapter (the same system prompt, the
previous turns of a chat) prefills only what is new (prefix_cache.py). The worker prefills new
requests itself (those admitted together in one forward pass) and sends the first token that
gives at once; each row then joins the decode batch with that token as its input.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import mlx.core as mx

from mlxtune.cpu_math import logsumexp
from mlxtune.serve.prefix_cache import PrefixCache
from mlxtune.serve.registry import AdapterRegistry
from mlxtune.serve.rows import MixedModel, RowTag, seeded_sampler

_PREFILL_STEP = 2048  # prompt tokens per forward pass (mlx-lm's prefill_step_size)


@dataclass
class Job:
    """One completion request: its prompt tokens, sampling settings and where results go."""

    model: str
    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    adapter_scale: float = 1.0  # multiplies the adapter's update for this request only
    top_logprobs: int | None = None  # None: no logprobs; k >= 0: the token's and the top k
    # Per-row mlx-lm logits processors (e.g. constrained decoding), passed to BatchGenerator.
    logits_processors: list = field(default_factory=list)
    # Called from the worker thread with ("text", str, logprob entries), ("done", finish_reason,
    # n_tokens) or ("error", exception); the HTTP layer hands them to its event loop.
    emit: object = None
    cancelled: bool = False
    arrived: float = field(default_factory=time.perf_counter)
    text: str = ""
    sent: int = 0
    tokens: int = 0
    detokenizer: object = None
    logprobs: list = field(default_factory=list)  # entries not yet sent
    last: float | None = None  # when the previous token was sent
    adapter: object = None
    cache_key: str = ""


class Generator:
    """Owns the model in one thread; `submit` queues a Job and returns at once."""

    def __init__(self, registry: AdapterRegistry, max_batch: int = 8, metrics=None):
        self.registry, self.max_batch, self.metrics = registry, max_batch, metrics
        self.inbox: queue.Queue = queue.Queue()
        self.waiting: deque[Job] = deque()
        self.running: dict[int, Job] = {}
        self.prefix = PrefixCache()
        self.samplers: dict = {}
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="mlxtune-generate", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> Job:
        """Queue `job`; its results arrive through job.emit."""
        self.inbox.put(job)
        return job

    def call(self, fn, *args) -> Future:
        """Run `fn(*args)` on the worker thread between steps (MLX work from other threads could
        race with generation); the future holds its result."""
        future = Future()
        self.inbox.put((future, fn, args))
        return future

    def remove_adapter(self, name: str) -> None:
        """Forget adapter `name` and its cached prompts (on the worker thread)."""
        adapter = self.registry.find(name)
        self.registry.remove(name)
        self.prefix.clear(_cache_key(name, adapter))

    def queue_depth(self) -> int:
        """Requests accepted and not yet in the batch."""
        return len(self.waiting) + self.inbox.qsize()

    def stop(self) -> None:
        """Finish the current step and end the worker."""
        self.stopping = True
        self.inbox.put(None)
        self.thread.join(timeout=30)

    # The worker -------------------------------------------------------------------------

    def _drain_inbox(self, block: bool) -> None:
        try:
            # Blocks only when nothing runs; stop() wakes it with None.
            job = self.inbox.get() if block else self.inbox.get_nowait()
            while True:
                if isinstance(job, tuple):
                    future, fn, args = job
                    try:
                        future.set_result(fn(*args))
                    except Exception as e:  # handed to the caller, who reports it
                        future.set_exception(e)
                elif job is not None:
                    self.waiting.append(job)
                job = self.inbox.get_nowait()
        except queue.Empty:
            pass

    def _run(self) -> None:
        self.batch = self._new_batch()
        try:
            while not self.stopping:
                self._drain_inbox(block=not self.running and not self.waiting)
                self._admit()
                if self.running:
                    self._step()
        finally:
            self.batch.close()

    def _new_batch(self):
        from mlx_lm.generate import BatchGenerator

        # MLX streams belong to the thread that made them: generate on this thread's stream.
        return BatchGenerator(MixedModel(self.registry.model, self.registry.selection),
                              completion_batch_size=self.max_batch,
                              prefill_batch_size=self.max_batch,
                              stream=mx.default_stream(mx.default_device()))

    def _admit(self) -> None:
        """Move waiting jobs into the batch while it has room, in arrival order."""
        jobs = []
        while self.waiting and len(self.running) + len(jobs) < self.max_batch:
            job = self.waiting[0]
            try:
                held = None if job.cancelled else self.registry.acquire(job.model)
            except Exception as e:  # an adapter that fails to load fails its requests only
                self.waiting.popleft()
                job.emit(("error", e))
                continue
            if held is None and not job.cancelled:
                break  # every slot is busy: wait for one (later jobs wait too, so none starves)
            self.waiting.popleft()
            if job.cancelled:
                continue
            job.adapter, slot = held
            job.cache_key = _cache_key(job.model, job.adapter)
            jobs.append((job, slot))
        if jobs:
            self._insert(jobs)

    def _insert(self, jobs: list[tuple[Job, int]]) -> None:
        """Prefill the jobs, send each its first token, and add the ones that go on to the
        batch (with that token as their next input)."""
        from mlx_lm.generate import StopSequences

        try:
            prefilled = self._prefill(jobs)
        except Exception as e:  # a bug in a prefill fails these requests, not the server
            prefilled = [e] * len(jobs)
        rows = []
        for (job, slot), done in zip(jobs, prefilled):
            try:
                row = done if isinstance(done, Exception) else self._first_token(job, slot, *done)
            except Exception as e:
                row = e
            if isinstance(row, Exception):
                job.emit(("error", row))
            if row is None or isinstance(row, Exception):
                self.registry.release(job.adapter)
            else:
                rows.append(row)
        if not rows:
            return
        stops = StopSequences([[t] for t in sorted(self.registry.tokenizer.eos_token_ids)])
        uids = self.batch.insert([[r[1]] for r in rows], caches=[r[2] for r in rows],
                                 all_tokens=[list(r[0].prompt) for r in rows],
                                 max_tokens=[r[0].max_tokens - 1 for r in rows],
                                 samplers=[r[3] for r in rows],
                                 logits_processors=[r[0].logits_processors for r in rows],
                                 stop_sequences=[stops] * len(rows))
        for uid, row in zip(uids, rows):
            self.running[uid] = row[0]

    def _prefill(self, jobs: list[tuple[Job, int]]) -> list[tuple[list, mx.array]]:
        """(KV cache, last position's logits) of each job's prompt, computing only what the
        prefix cache lacks: the jobs together in one forward pass where they fit one.

        BatchGenerator would feed each prompt less its last token, then the last token, and hand
        the first answer token back one decode step of the whole batch after computing it (it
        overlaps each step with reading the previous one): three model calls, two of them behind
        a decode step of the running rows, before a new request's first token instead of one."""
        from mlx_lm.models.cache import make_prompt_cache

        fetched = [self.prefix.fetch(job.cache_key, job.prompt) for job, _ in jobs]
        caches = [cache or make_prompt_cache(self.registry.model) for cache, _ in fetched]
        rests = [rest for _, rest in fetched]
        if len(jobs) == 1 or max(map(len, rests)) > _PREFILL_STEP or \
                not all(hasattr(c, "merge") for c in caches[0]):
            return [self._prefill_one(job, slot, cache, rest)
                    for (job, slot), cache, rest in zip(jobs, caches, rests)]
        lengths = [len(rest) for rest in rests]
        pad = [max(lengths) - n for n in lengths]
        # As mlx-lm's PromptProcessingBatch: right-padded prompts, the padding rolled to the
        # left afterwards; the causal mask keeps each row's real tokens from seeing it.
        merged = [layer[0].merge(list(layer)) for layer in zip(*caches)]
        if max(pad):
            for c in merged:
                c.prepare(lengths=lengths, right_padding=pad)
        tag = RowTag([slot for _, slot in jobs], [job.adapter_scale for job, _ in jobs])
        tokens = mx.array([rest + [0] * p for rest, p in zip(rests, pad)])
        logits = self.batch.model(tokens, cache=[*merged, tag])
        last = logits[mx.arange(len(jobs)), mx.array(lengths) - 1]
        if max(pad):
            for c in merged:
                c.finalize()
        mx.eval(last, [c.state for c in merged])
        return [([c.extract(i) for c in merged], last[i:i + 1]) for i in range(len(jobs))]

    def _prefill_one(self, job: Job, slot: int, cache: list, rest: list[int]):
        tagged = [*cache, RowTag([slot], [job.adapter_scale])]
        tokens = mx.array(rest)[None]
        while tokens.shape[1] > _PREFILL_STEP:  # long prompts in pieces, as mlx-lm does
            self.batch.model(tokens[:, :_PREFILL_STEP], cache=tagged)
            mx.eval([c.state for c in cache])
            tokens = tokens[:, _PREFILL_STEP:]
        return cache, self.batch.model(tokens, cache=tagged)[:, -1, :]

    def _first_token(self, job: Job, slot: int, cache: list, logits: mx.array):
        """Sample and send `job`'s first token from its prompt's `logits`; (job, token, tagged
        cache, sampler) to go on with, or None when that token ends it."""
        from mlx_lm.sample_utils import make_sampler

        top_p = job.top_p if job.top_p < 1.0 else 0.0
        if job.seed is None:
            # One sampler object per setting: rows that share it are sampled in one batched call
            # (BatchGenerator samples row by row when the samplers differ).
            sampler = self.samplers.setdefault((job.temperature, top_p),
                                               make_sampler(job.temperature, top_p))
        else:
            sampler = seeded_sampler(job.temperature, top_p, job.seed)
        for processor in job.logits_processors:
            logits = processor(mx.array(job.prompt, dtype=mx.int32), logits)
        logprobs = logits - logsumexp(logits)
        first = sampler(logprobs)
        mx.eval(first, logprobs)
        first = first.item()
        job.detokenizer = self.registry.tokenizer.detokenizer
        finish = "stop" if first in self.registry.tokenizer.eos_token_ids else \
            "length" if job.max_tokens <= 1 else None
        if self._advance(job, first, finish, logprobs[0]):
            self.prefix.store(job.cache_key, job.prompt, cache)
            return None
        return job, first, [*cache, RowTag([slot], [job.adapter_scale])], sampler

    def _step(self) -> None:
        try:
            _, responses = self.batch.next()
            finished = [uid for uid, j in self.running.items() if j.cancelled]
            for r in responses:
                job = self.running.get(r.uid)
                if job is None or job.cancelled:
                    continue
                if r.finish_reason is not None and r.prompt_cache:
                    # The row's tag (last) is not part of the KV entries kept for reuse.
                    self.prefix.store(job.cache_key, job.prompt, r.prompt_cache[:-1])
                if self._advance(job, r.token, r.finish_reason, r.logprobs):
                    finished.append(r.uid)
        except Exception as e:  # a bug in a step fails the batch's requests, not the server
            for j in self.running.values():
                j.emit(("error", e))
                self.registry.release(j.adapter)
            self.running.clear()
            self.batch.close()
            self.batch = self._new_batch()
            return
        self._finish(finished)

    def _finish(self, uids: list[int]) -> None:
        uids = sorted(set(uids))
        for uid in uids:
            job = self.running.pop(uid, None)
            if job is not None:
                self.registry.release(job.adapter)
        if uids:
            # Rows that ended on their own have left the batch already; remove skips them.
            self.batch.remove(uids)

    def _advance(self, job: Job, token: int, finish: str | None, logprobs) -> bool:
        """Add one token to `job`, emit the text that is safe to send; True when it is done."""
        if finish != "stop":  # the end-of-sequence token is not part of the answer
            job.tokens += 1
            job.detokenizer.add_token(token)
            if job.top_logprobs is not None:
                job.logprobs.append(self._logprob_entry(token, logprobs, job.top_logprobs))
        if finish is not None:
            job.detokenizer.finalize()
        job.text += job.detokenizer.last_segment
        cut = _find_stop(job.text, job.stop)
        if cut is not None:
            job.text, finish = job.text[:cut], "stop"
        # Hold back a tail that may be the start of a stop string until the next token says.
        hold = 0 if finish else max((len(s) - 1 for s in job.stop), default=0)
        safe = max(job.sent, len(job.text) - hold)
        if safe > job.sent or (finish and job.logprobs):
            job.emit(("text", job.text[job.sent:safe], job.logprobs))
            job.sent, job.logprobs = safe, []
            self._time_token(job)
        if finish is not None:
            job.emit(("done", finish, job.tokens))
            if self.metrics is not None:
                self.metrics.finished(job, finish)
            return True
        return False

    def _time_token(self, job: Job) -> None:
        now = time.perf_counter()
        if self.metrics is not None:
            self.metrics.token_sent(job, now)
        job.last = now

    def _logprob_entry(self, token: int, logprobs, k: int) -> dict:
        """{"id", "logprob", "top": [(id, logprob), ...]} of the chosen token and the k best."""
        entry = {"id": token, "logprob": logprobs[token].item(), "top": []}
        if k > 0:
            best = mx.argpartition(-logprobs, k - 1)[:k]
            values = logprobs[best].tolist()
            entry["top"] = sorted(zip(best.tolist(), values), key=lambda t: -t[1])
        return entry


def _cache_key(name: str, adapter) -> str:
    # KV entries are the adapter's own: keyed by the adapter object and its folder, so one
    # removed and added again under its name never sees its predecessor's.
    return f"{name}#{id(adapter)}#{adapter.path if adapter is not None else ''}"


def _find_stop(text: str, stops: list[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None
