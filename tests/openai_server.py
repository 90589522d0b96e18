"""A real OpenAI-compatible HTTP server on 127.0.0.1 for the evaluation's tests: ``/v1/models``,
``/v1/completions`` (a tiny local model's greedy continuation, through ``transformers``) and
``/v1/chat/completions`` (a judge whose verdicts follow a rule), answering with faults on a
schedule: 429 with ``Retry-After``, 500, a body that is not JSON, an answer slower than the
client's timeout.

It runs in a thread of the test process (``with OpenAIServer(...) as server: server.url``) or as a
process (``python -m tests.openai_server --port P --model NAME=DIR``, for a client that is killed).
Every request is logged (:attr:`OpenAIServer.log`) so a test can tell what was asked twice.
"""

from __future__ import annotations

import argparse
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["OpenAIServer", "first_letter_judge"]


def first_letter_judge(first: str, second: str) -> str:
    """The rule the server's judge follows: the response whose first letter comes earlier in the
    alphabet is better (a response with no letter loses); equal first letters, "Response 1" (a
    position bias, which both orders turn into a tie)."""
    def key(text):
        letters = [c.lower() for c in text if c.isalpha()]
        return letters[0] if letters else "~"
    return "Response 2" if key(second) < key(first) else "Response 1"


def _responses(content: str) -> tuple[str, str]:
    first = re.search(r"(?:Response|Summary) 1: (.*?)\nEND OF (?:RESPONSE|SUMMARY) 1", content, re.S)
    second = re.search(r"(?:Response|Summary) 2: (.*?)\nEND OF (?:RESPONSE|SUMMARY) 2", content, re.S)
    if not (first and second):
        raise ValueError("no Response 1 / Response 2 in the judge's prompt")
    return first.group(1), second.group(1)


class OpenAIServer:
    """Args:
        models: served name -> Hugging Face folder (completions, greedy).
        judge_model: the served name of the rule-following judge (chat completions).
        faults: per request, in order, None or one of ``429``, ``500``, ``malformed``, ``slow``;
            requests after the schedule are answered normally.
        slow_seconds: how long a ``slow`` answer takes.
        judge_answer: ``(first, second) -> answer``; default :func:`first_letter_judge`.
        hold_judge_after: answer this many judge requests, then hold the next ones until
            :meth:`release` (a client killed while it waits, at a known point).
    """

    def __init__(self, models: dict[str, str] | None = None, judge_model: str = "judge", faults=(),
                 slow_seconds: float = 3.0, judge_answer=first_letter_judge, hold_judge_after: int | None = None,
                 port: int = 0):
        self.models, self.judge_model = dict(models or {}), judge_model
        self.faults, self.slow_seconds, self.judge_answer = list(faults), slow_seconds, judge_answer
        self.hold_judge_after = hold_judge_after
        self._judged = 0
        self._released = threading.Event()
        self.log: list[dict] = []
        self.faults_served = 0
        self._lock = threading.Lock()
        self._generators = {}
        self._generate_lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self._server.daemon_threads = True
        self._thread = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> "OpenAIServer":
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        """Answer the held judge requests, and every later one."""
        self._released.set()

    def __exit__(self, *exc) -> None:
        self._released.set()
        self._server.shutdown()
        self._server.server_close()

    def _next_fault(self):
        with self._lock:
            return self.faults.pop(0) if self.faults else None

    def _complete(self, model: str, prompt: str, max_tokens: int) -> str:
        from megatron_rpo.evaluate.generation import HFGenerator
        from megatron_rpo.evaluate.items import EvalItem

        with self._generate_lock:
            if model not in self._generators:
                self._generators[model] = HFGenerator(self.models[model], max_new_tokens=1, max_length=10**9,
                                                      batch_size=1)
            generator = self._generators[model]
            generator.max_new_tokens = max_tokens  # the client's limit (its max_length is already in it)
            return generator.generate([EvalItem("request", "request", prompt, prompt, "", 0)])[0]

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, body, headers: dict | None = None) -> None:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _error(self, status: int, message: str, kind: str) -> None:
                self._send(status, {"error": {"message": message, "type": kind, "code": status}})

            def do_GET(self):
                if self.path.rstrip("/") == "/v1/models":
                    names = list(server.models) + [server.judge_model]
                    self._send(200, {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "test"}
                                                                for n in names]})
                else:
                    self._error(404, f"no route {self.path}", "not_found")

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                request = json.loads(self.rfile.read(length) or b"{}")
                route = self.path.rstrip("/")
                fault = server._next_fault()
                with server._lock:
                    server.log.append({"route": route, "request": request, "fault": fault})
                    server.faults_served += fault is not None
                if fault == "429":
                    return self._send(429, {"error": {"message": "slow down", "type": "rate_limit"}},
                                      {"Retry-After": "0.05"})
                if fault == "500":
                    return self._error(500, "the server fell over", "server_error")
                if fault == "malformed":
                    return self._send(200, b'{"id": "x", "choices": [{"text": ')
                if fault == "slow":
                    time.sleep(server.slow_seconds)
                model = request.get("model")
                if route == "/v1/completions":
                    if model not in server.models:
                        return self._error(404, f"The model `{model}` does not exist.", "NotFoundError")
                    text = server._complete(model, request["prompt"], int(request.get("max_tokens", 16)))
                    return self._send(200, {"id": "cmpl", "object": "text_completion", "created": 0, "model": model,
                                            "choices": [{"index": 0, "text": text, "finish_reason": "stop",
                                                         "logprobs": None}]})
                if route == "/v1/chat/completions":
                    if model != server.judge_model:
                        return self._error(404, f"The model `{model}` does not exist.", "NotFoundError")
                    with server._lock:
                        server._judged += 1
                        hold = server.hold_judge_after is not None and server._judged > server.hold_judge_after
                    if hold:
                        server._released.wait()
                    answer = server.judge_answer(*_responses(request["messages"][-1]["content"]))
                    return self._send(200, {"id": "chat", "object": "chat.completion", "created": 0, "model": model,
                                            "choices": [{"index": 0, "finish_reason": "stop",
                                                         "message": {"role": "assistant", "content": answer}}]})
                return self._error(404, f"no route {self.path}", "not_found")

        return Handler


def main() -> None:
    p = argparse.ArgumentParser(description="an OpenAI-compatible test server (tests/openai_server.py)")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model", action="append", default=[], metavar="NAME=DIR")
    args = p.parse_args()
    models = dict(spec.split("=", 1) for spec in args.model)
    server = OpenAIServer(models, port=args.port)
    print(f"serving {server.url}", flush=True)
    server._server.serve_forever()


if __name__ == "__main__":
    main()
