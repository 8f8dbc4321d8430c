"""The one worker thread that runs the model: requests queue up, same-adapter requests batch.

MLX computes one graph at a time and the adapter selection is global to the model, so a single
thread owns the model. It takes the oldest waiting request's adapter, selects it, and runs every
waiting request for that adapter as one continuous batch (mlx-lm's BatchGenerator); requests for
other adapters wait until that batch drains, and then the adapter switches (a pointer swap).
Outputs of different adapters therefore never share a forward pass. A request that starts like
an earlier one (the same system prompt, the previous turns of a chat) prefills only what is new:
the KV entries of recent prompts are kept per adapter (prefix_cache.py).
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import mlx.core as mx

from mlxtune.serve.prefix_cache import PrefixCache
from mlxtune.serve.registry import AdapterRegistry


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
    # mlx-lm logits processors for this row alone (response_format's grammar mask).
    logits_processors: list = field(default_factory=list)
    # Called from the worker thread with ("text", str), ("done", finish_reason, n_tokens) or
    # ("error", exception); the HTTP layer hands them to its event loop.
    emit: object = None
    cancelled: bool = False
    text: str = ""
    sent: int = 0
    tokens: int = 0
    detokenizer: object = None


class Generator:
    """Owns the model in one thread; `submit` queues a Job and returns at once."""

    def __init__(self, registry: AdapterRegistry, max_batch: int = 8):
        self.registry, self.max_batch = registry, max_batch
        self.inbox: queue.Queue[Job] = queue.Queue()
        self.waiting: deque[Job] = deque()
        self.prefix = PrefixCache()
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

    def stop(self) -> None:
        """Finish the current step and end the worker."""
        self.stopping = True
        self.inbox.put(None)
        self.thread.join(timeout=30)

    # The worker -------------------------------------------------------------------------

    def _drain_inbox(self, block: bool) -> None:
        try:
            job = self.inbox.get(timeout=0.1) if block else self.inbox.get_nowait()
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
        # MLX streams belong to the thread that made them: generate on this thread's stream.
        stream = mx.default_stream(mx.default_device())
        while not self.stopping:
            if not self.waiting:
                self._drain_inbox(block=True)
                continue
            job = self.waiting[0]
            try:
                self.registry.select(job.model)
            except Exception as e:  # an adapter that fails to load fails its requests only
                for j in [j for j in self.waiting if j.model == job.model]:
                    self.waiting.remove(j)
                    j.emit(("error", e))
                continue
            if job.seed is not None:
                # A seeded request gets the random stream to itself, so the seed reproduces.
                self.waiting.popleft()
                self._run_batch([job], stream, seed=job.seed)
            else:
                self._run_batch(self._take(job.model), stream)

    def _take(self, model: str, limit: int | None = None) -> list[Job]:
        limit = self.max_batch if limit is None else limit
        jobs = [j for j in self.waiting if j.model == model and j.seed is None][:limit]
        for j in jobs:
            self.waiting.remove(j)
        return jobs

    def _run_batch(self, jobs: list[Job], stream, seed: int | None = None) -> None:
        from mlx_lm.generate import BatchGenerator, StopSequences
        from mlx_lm.sample_utils import make_sampler

        tok = self.registry.tokenizer
        stops = StopSequences([[t] for t in sorted(tok.eos_token_ids)])
        if seed is not None:
            mx.random.seed(seed)
        gen = BatchGenerator(self.registry.model, completion_batch_size=self.max_batch,
                             prefill_batch_size=self.max_batch, stream=stream)
        running: dict[int, Job] = {}
        # KV entries are the adapter's own: key them by the adapter object and its folder, so
        # one removed and added again under its name never sees its predecessor's.
        model = jobs[0].model
        adapter = self.registry.adapters.get(model)
        key = f"{model}#{id(adapter)}#{adapter.path if adapter else ''}"

        def insert(batch: list[Job]) -> None:
            cached = [self.prefix.fetch(key, j.prompt) for j in batch]
            uids = gen.insert(
                [rest for _, rest in cached], caches=[cache for cache, _ in cached],
                max_tokens=[j.max_tokens for j in batch],
                samplers=[make_sampler(j.temperature, j.top_p if j.top_p < 1.0 else 0.0)
                          for j in batch],
                logits_processors=[j.logits_processors for j in batch],
                stop_sequences=[stops] * len(batch))
            for uid, j in zip(uids, batch):
                j.detokenizer = tok.detokenizer
                running[uid] = j

        try:
            insert(jobs)
            while running and not self.stopping:
                self._drain_inbox(block=False)
                # Admit newcomers for this adapter, unless another adapter is waiting its turn.
                if seed is None and all(j.model == model for j in self.waiting):
                    more = self._take(model, self.max_batch - len(running))
                    if more:
                        insert(more)
                _, responses = gen.next()
                finished = [uid for uid, j in running.items() if j.cancelled]
                for r in responses:
                    job = running.get(r.uid)
                    if job is None or job.cancelled:
                        continue
                    if r.finish_reason is not None and r.prompt_cache:
                        self.prefix.store(key, job.prompt, r.prompt_cache)
                    if self._advance(job, r.token, r.finish_reason):
                        finished.append(r.uid)
                for uid in set(finished):
                    running.pop(uid, None)
                if finished:
                    # Rows that ended on their own have left the batch already; remove skips them.
                    gen.remove(sorted(set(finished)))
        except Exception as e:  # a bug in one batch must not take the server down
            for j in running.values():
                j.emit(("error", e))
        finally:
            gen.close()

    def _advance(self, job: Job, token: int, finish: str | None) -> bool:
        """Add one token to `job`, emit the text that is safe to send; True when it is done."""
        if finish != "stop":  # the end-of-sequence token itself is not part of the answer
            job.tokens += 1
            job.detokenizer.add_token(token)
        if finish is not None:
            job.detokenizer.finalize()
        job.text += job.detokenizer.last_segment
        cut = _find_stop(job.text, job.stop)
        if cut is not None:
            job.text, finish = job.text[:cut], "stop"
        # Hold back a tail that may be the start of a stop string until the next token says.
        hold = 0 if finish else max((len(s) - 1 for s in job.stop), default=0)
        safe = max(job.sent, len(job.text) - hold)
        if safe > job.sent:
            job.emit(("text", job.text[job.sent:safe]))
            job.sent = safe
        if finish is not None:
            job.emit(("done", finish, job.tokens))
            return True
        return False


def _find_stop(text: str, stops: list[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None
