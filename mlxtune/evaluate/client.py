"""Two ways to answer test prompts with one interface: an OpenAI-compatible server (through the
`openai` client, with timeouts, retries and worker threads) or a model loaded here (mlx-lm,
greedy, with the model's chat template)."""

from __future__ import annotations

import gc

import math
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from mlxtune.errors import MlxtuneError
from mlxtune.evaluate.examples import Example


@dataclass
class Answer:
    """What a model said to one prompt, how long it took and how many tokens it used."""

    text: str
    latency_s: float
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None


class ServerBackend:
    """A model behind an OpenAI-compatible HTTP API (mlxtune serve, mlx_lm.server, vLLM, ...)."""

    def __init__(self, url: str, model: str, api_key: str = "none", timeout: float = 120.0,
                 retries: int = 3, max_tokens: int = 256, concurrency: int = 4,
                 response_format: dict | None = None):
        import openai

        self.url, self.model, self.label = url.rstrip("/"), model, model
        self.max_tokens, self.concurrency = max_tokens, max(1, concurrency)
        # Sent with every request; the OpenAI client passes it only to chat, so completions get
        # it through extra_body (mlxtune serve and vLLM read it on both).
        self.extra = {"response_format": response_format} if response_format else {}
        self.client = openai.OpenAI(base_url=self.url, api_key=api_key, timeout=timeout,
                                    max_retries=retries)
        # The checks must fail fast on a dead server: no retries, a short timeout.
        self.quick = openai.OpenAI(base_url=self.url, api_key=api_key,
                                   timeout=min(timeout, 10.0), max_retries=0)

    def describe(self) -> dict:
        """How this model was reached, for the summary."""
        return {"name": self.model, "label": self.label, "backend": "server", "url": self.url}

    def check(self) -> None:
        """Raise a one-line MlxtuneError unless the server answers and serves this model."""
        import openai

        try:
            ids = [m.id for m in self.quick.models.list()]
        except openai.APIConnectionError as e:
            raise MlxtuneError(f"cannot reach a server at {self.url} ({_reason(e)}); start one "
                               "(mlxtune serve MODEL) or fix --url") from None
        except openai.AuthenticationError as e:
            raise MlxtuneError(f"{self.url} refused the API key (HTTP {e.status_code}); pass "
                               "--api-key or set OPENAI_API_KEY") from None
        except openai.APIStatusError as e:
            raise MlxtuneError(f"{self.url}/models answered HTTP {e.status_code}: is "
                               f"{self.url} an OpenAI-compatible API base URL (usually ending "
                               "in /v1)?") from None
        except (openai.OpenAIError, ValueError, TypeError, AttributeError) as e:
            raise MlxtuneError(f"{self.url}/models did not answer like an OpenAI-compatible API "
                               f"({type(e).__name__}); check --url") from None
        if self.model in ids:
            return
        # Some servers answer names they do not list (mlx_lm.server's "default_model"): ask once.
        try:
            self.quick.chat.completions.create(model=self.model, max_tokens=1, temperature=0,
                                               messages=[{"role": "user", "content": "hi"}])
        except openai.OpenAIError:
            listed = ", ".join(ids) or "nothing"
            raise MlxtuneError(f"model {self.model!r} is not served at {self.url}; it serves: "
                               f"{listed}") from None

    def _ask(self, example: Example) -> Answer:
        import openai

        start = time.perf_counter()
        try:
            if example.messages is not None:
                r = self.client.chat.completions.create(
                    model=self.model, messages=example.messages, temperature=0,
                    max_tokens=self.max_tokens, extra_body=self.extra or None)
                text = r.choices[0].message.content or ""
            else:
                r = self.client.completions.create(model=self.model, prompt=example.text,
                                                   temperature=0, max_tokens=self.max_tokens,
                                                   extra_body=self.extra or None)
                text = r.choices[0].text or ""
        except (openai.APIConnectionError, openai.NotFoundError) as e:
            # The server went away (after every retry) or stopped serving the model: stop here,
            # the results so far are on disk and --resume finishes the rest.
            raise MlxtuneError(f"{self.url} stopped answering ({_reason(e)}); the results so "
                               "far are saved: finish with --resume") from None
        except openai.APIStatusError as e:
            return Answer("", time.perf_counter() - start, error=f"HTTP {e.status_code}: "
                          f"{_reason(e)}")
        usage = getattr(r, "usage", None)
        return Answer(text, time.perf_counter() - start,
                      getattr(usage, "prompt_tokens", None),
                      getattr(usage, "completion_tokens", None))

    def answer_all(self, examples: list[Example]):
        """Yield (example, answer) as they finish, `concurrency` requests at a time. The workers
        are daemon threads: on Ctrl-C or an error the eval ends at once instead of waiting out
        the requests in flight (up to the timeout; their answers were never saved anyway)."""
        todo, finished = queue.Queue(), queue.Queue()
        for example in examples:
            todo.put(example)
        stop = threading.Event()

        def work():
            while not stop.is_set():
                try:
                    example = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    finished.put((example, self._ask(example), None))
                except Exception as e:  # raised where the answers are read
                    finished.put((example, None, e))

        for _ in range(min(self.concurrency, len(examples))):
            threading.Thread(target=work, daemon=True).start()
        try:
            for _ in examples:
                example, answer, error = finished.get()
                if error is not None:
                    raise error
                yield example, answer
        finally:
            stop.set()  # workers take nothing more

    def perplexity(self, examples: list[Example]) -> float | None:
        """A server gives no loss: no perplexity."""
        return None


def _reason(e: Exception) -> str:
    cause = e.__cause__ or e.__context__
    text = str(cause or e).strip() or type(e).__name__
    return text.splitlines()[0][:200]


class LocalBackend:
    """A model (and optional adapter) loaded in this process, answering greedily one at a time."""

    def __init__(self, name: str, adapter: Path | None = None, max_tokens: int = 256):
        self.name, self.adapter, self.max_tokens = name, adapter, max_tokens
        self.label = f"{name} + {adapter}" if adapter else name
        self.model = self.tokenizer = None

    def describe(self) -> dict:
        """How this model was loaded, for the summary."""
        return {"name": self.name, "label": self.label, "backend": "local",
                "adapter": str(self.adapter) if self.adapter else None}

    def check(self) -> None:
        """Resolve the model name and check the adapter folder, loading no weights."""
        from mlxtune.models.resolve import resolve_model

        self.model_dir = resolve_model(self.name)
        if self.adapter is not None:
            from mlxtune.models.adapters import read_adapter_config

            read_adapter_config(Path(self.adapter))

    def load(self) -> None:
        """Load weights and adapter once, set up for this backend's fast path, in eval mode."""
        if self.model is not None:
            return
        from mlxtune.fastpath import prepare_for_inference
        from mlxtune.models.adapters import load_adapter
        from mlxtune.models.folder import load_model_folder

        model, _, tokenizer = load_model_folder(self.model_dir)
        if self.adapter is not None:
            load_adapter(model, Path(self.adapter))
        # On the CPU backend fp16 and MLX's quantized matmuls are very slow: compute in fp32,
        # decoding from the packed weights, prefill and perplexity de-quantized per layer.
        prepare_for_inference(model)
        self.model, self.tokenizer = model, tokenizer
        # As serve does: the model's Python objects live as long as this backend; keep the
        # garbage collector from walking them on every generated token.
        gc.collect()
        gc.freeze()

    def _prompt(self, example: Example) -> str:
        if example.messages is None:
            return example.text
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(example.messages, tokenize=False,
                                                      add_generation_prompt=True)
        return "\n".join(str(m.get("content", "")) for m in example.messages)

    def _ask(self, example: Example) -> Answer:
        from mlx_lm.generate import stream_generate

        start = time.perf_counter()
        text, last = "", None
        # No sampler: mlx-lm takes the argmax, i.e. greedy decoding.
        for last in stream_generate(self.model, self.tokenizer, self._prompt(example),
                                    max_tokens=self.max_tokens):
            text += last.text
        return Answer(text, time.perf_counter() - start,
                      last.prompt_tokens if last else None,
                      last.generation_tokens if last else 0)

    def answer_all(self, examples: list[Example]):
        """Yield (example, answer) in order; MLX runs one generation at a time."""
        self.load()
        for example in examples:
            yield example, self._ask(example)

    def perplexity(self, examples: list[Example]) -> float:
        """exp of the token-weighted loss on the answers (whole text for text data), as in
        training: the same tokenization, masks and loss."""
        from mlxtune.train.data import Tokenized, eval_batches, tokenize_record
        from mlxtune.train.loop import evaluate

        self.load()
        tokenized = []
        for ex in examples:
            t = tokenize_record(self.tokenizer, ex.record, mask_prompt=True)
            t = Tokenized(t.tokens[:2049], t.loss_mask[:2049])
            if t.loss_mask[1:].any():
                tokenized.append(t)
        if not tokenized:
            return None
        return math.exp(evaluate(self.model, eval_batches(tokenized, 4, -1)))
