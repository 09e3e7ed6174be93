"""A loopback OpenAI-compatible HTTP server for tests (no network beyond 127.0.0.1).

It answers ``POST /v1/chat/completions`` (with ``logprobs``/``top_logprobs``) and
``GET /v1/models``, runs in a background thread on an ephemeral port, records every request, and
lets a test script its replies and inject failures::

    import openai
    from openai_server import OpenAIServer, score_reply, text_reply

    with OpenAIServer() as srv:
        srv.handler = lambda body: score_reply({"80": 0.6, "90": 0.4})  # default for every request
        srv.queue(text_reply("hello"))       # served first, in order, before the handler
        srv.fail_next(1, status=500)         # the next request gets HTTP 500 (then the above)
        client = openai.OpenAI(base_url=srv.base_url, api_key="test-key", max_retries=0)
        ...
        assert srv.count == 2                # chat requests seen, failed ones included
        srv.requests[-1]["messages"]         # JSON bodies, in arrival order

``handler(body) -> Reply`` sees the request JSON; a ``Reply`` carries the message text, the top
log-probabilities of the (single) output token, an HTTP status and an optional delay. The
``Authorization`` header of each request is kept in ``srv.auth_headers`` so a test can check the
key was sent (and only there).
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from loopback import serve, stop

__all__ = ["OpenAIServer", "Reply", "score_reply", "text_reply"]


@dataclass
class Reply:
    content: str = ""
    top_logprobs: dict[str, float] | None = None  # token -> log-probability, for the 1st token
    status: int = 200
    error: str = "scripted failure"
    delay: float = 0.0  # seconds to wait before answering
    omit_logprobs: bool = False  # act like a server that ignores logprobs=True


def score_reply(probs: dict[str, float]) -> Reply:
    """A one-token answer whose top logprobs are ``probs`` (token -> probability, need not sum to
    1: the rest of the mass is on tokens not listed); the text is the most likely token."""
    top = max(probs, key=probs.get) if probs else ""
    return Reply(content=top, top_logprobs={t: math.log(p) for t, p in probs.items() if p > 0})


def text_reply(text: str) -> Reply:
    return Reply(content=text)


def _completion(body: dict, reply: Reply) -> dict:
    choice: dict = {"index": 0, "finish_reason": "stop",
                    "message": {"role": "assistant", "content": reply.content}}
    if body.get("logprobs") and not reply.omit_logprobs:
        n = int(body.get("top_logprobs") or 0)
        tops = sorted((reply.top_logprobs or {reply.content: 0.0}).items(), key=lambda kv: -kv[1])[:max(n, 1)]
        first = tops[0]
        choice["logprobs"] = {"content": [{
            "token": first[0], "logprob": first[1], "bytes": list(first[0].encode()),
            "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in tops[:n]],
        }]}
    return {"id": "chatcmpl-test", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", "test"), "choices": [choice],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


class OpenAIServer:
    """Context manager: a threaded HTTP server on ``127.0.0.1:<ephemeral>``; see module doc."""

    def __init__(self, handler: Callable[[dict], Reply] | None = None):
        self.handler: Callable[[dict], Reply] = handler or (lambda body: score_reply({"50": 1.0}))
        self.requests: list[dict] = []
        self.auth_headers: list[str] = []
        self._queue: list[Reply] = []
        self._failures: list[int] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- scripting --------------------------------------------------------------------------
    def queue(self, *replies: Reply) -> None:
        with self._lock:
            self._queue.extend(replies)

    def fail_next(self, n: int = 1, status: int = 500) -> None:
        with self._lock:
            self._failures.extend([status] * n)

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.requests)

    @property
    def base_url(self) -> str:
        assert self._server is not None, "start the server first (use it as a context manager)"
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def _next(self, body: dict) -> Reply:
        with self._lock:
            self.requests.append(body)
            if self._failures:
                return Reply(status=self._failures.pop(0))
            if self._queue:
                return self._queue.pop(0)
        return self.handler(body)

    # ---- lifecycle --------------------------------------------------------------------------
    def __enter__(self) -> "OpenAIServer":
        outer = self

        class _H(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def _send(self, status: int, obj: dict) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path.rstrip("/").endswith("/models"):
                    self._send(200, {"object": "list", "data": [{"id": "test", "object": "model"}]})
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(length) or b"{}")
                except json.JSONDecodeError:
                    self._send(400, {"error": {"message": "body is not JSON"}})
                    return
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                with outer._lock:
                    outer.auth_headers.append(self.headers.get("Authorization", ""))
                try:
                    reply = outer._next(body)
                except Exception as e:  # a broken test handler becomes a visible HTTP 500
                    reply = Reply(status=500, error=f"test handler raised {e!r}")
                if reply.delay:
                    time.sleep(reply.delay)
                if reply.status != 200:
                    self._send(reply.status, {"error": {"message": reply.error, "type": "server_error"}})
                else:
                    self._send(200, _completion(body, reply))

        self._server, self._thread = serve(_H)
        return self

    def __exit__(self, *exc) -> None:
        if self._server is not None and self._thread is not None:
            stop(self._server, self._thread)
            self._server = None
