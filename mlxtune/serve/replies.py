"""How a request's results become OpenAI response objects, whole or as server-sent events,
logprobs included in the shape each endpoint defines (chat: `content` entries with `bytes` and
`top_logprobs`; completions: parallel `tokens`/`token_logprobs`/`top_logprobs`/`text_offset`)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from mlxtune.serve.requests import APIError, next_event


class Reply:
    """The response objects of one request (several choices for a list of prompts)."""

    def __init__(self, chat: bool, model: str, tokenizer, logprobs: bool = False):
        self.chat, self.model, self.tokenizer, self.logprobs = chat, model, tokenizer, logprobs
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def choice(self, text, finish, index=0, delta=False, entries=(), offset=0) -> dict:
        """One choice: the text (or chat message/delta), its logprobs and finish reason."""
        logprobs = self.format_logprobs(entries, offset) if self.logprobs else None
        if not self.chat:
            return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        key = "delta" if delta else "message"
        content = {"role": "assistant", "content": text} if not delta or text is not None else {}
        return {"index": index, key: content, "logprobs": logprobs, "finish_reason": finish}

    def format_logprobs(self, entries, offset: int = 0) -> dict:
        """The worker's entries ({"id", "logprob", "top"}) in this endpoint's OpenAI shape."""
        token = self.token_text
        if self.chat:
            def one(i, lp):
                text = token(i)
                return {"token": text, "logprob": lp, "bytes": list(text.encode())}
            return {"content": [{**one(e["id"], e["logprob"]),
                                 "top_logprobs": [one(i, lp) for i, lp in e["top"]]}
                                for e in entries], "refusal": None}
        tokens = [token(e["id"]) for e in entries]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{token(i): lp for i, lp in e["top"]} for e in entries],
                "text_offset": offsets}

    def token_text(self, token: int) -> str:
        """The text of one token id."""
        return self.tokenizer.decode([token])

    def _object(self, kind: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def whole(self, jobs: list, results: list[tuple[str, str, int, list]]) -> dict:
        """The non-streamed response for `jobs`, whose (text, finish, tokens, entries) are given."""
        prompt = sum(len(j.prompt) for j in jobs)
        done = sum(r[2] for r in results)
        return self._object("chat.completion" if self.chat else "text_completion",
                            [self.choice(text, finish, i, entries=entries)
                             for i, (text, finish, _, entries) in enumerate(results)],
                            usage={"prompt_tokens": prompt, "completion_tokens": done,
                                   "total_tokens": prompt + done})

    async def stream(self, job, events: asyncio.Queue, include_usage: bool, release,
                     deadline: tuple[float, float]):
        """Server-sent events for one job, ending with [DONE]; `release` runs when it ends. Past
        `deadline` ((when, --request-timeout)) the last event before [DONE] is the 408's error."""
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        offset = 0
        try:
            while True:
                try:
                    event = await next_event(events, *deadline)
                except APIError as e:  # past --request-timeout: say so, then end the stream
                    event = ("error", e)
                if event[0] == "error":
                    e = event[1]
                    why, code = (e.type, e.code) if isinstance(e, APIError) else ("server_error",
                                                                                  None)
                    err = {"message": str(e), "type": why, "param": None, "code": code}
                    yield f"data: {json.dumps({'error': err})}\n\n"
                    break
                text, finish = (event[1], None) if event[0] == "text" else (None, event[1])
                entries = event[2] if event[0] == "text" else ()
                if self.chat or text is not None:
                    c = self.choice(text if text is not None or self.chat else "", finish,
                                    delta=True, entries=entries, offset=offset)
                else:
                    c = self.choice("", finish)
                offset += len(text or "")
                yield f"data: {json.dumps(self._object(kind, [c]))}\n\n"
                if finish:
                    if include_usage:
                        n, p = event[2], len(job.prompt)
                        usage = {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}
                        yield f"data: {json.dumps(self._object(kind, [], usage=usage))}\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled = True  # a client that went away frees its batch row
            release()
