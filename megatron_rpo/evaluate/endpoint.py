"""An OpenAI-compatible endpoint (OpenAI, vLLM, SGLang, TGI, ``transformers serve``), robust to
the ways endpoints fail.

* **Transient failures are retried** with exponential backoff and jitter: rate limits (429, after
  its ``Retry-After`` when the server gives one), server errors (5xx), dropped or refused
  connections, timeouts and malformed answers (a body that is not the JSON the API promises, or
  one with no text). Each retry is counted (:attr:`Endpoint.retries`).
* **A wrong endpoint is one clear line** (:class:`EndpointError`, an ``InputError``), at once and
  not retried: a URL that serves no API, a refused key, a model name the server does not serve.
  :meth:`Endpoint.check` asks before any work.
* **Bounded**: each call has a timeout; the callers bound the concurrency.

The ``openai`` client does the HTTP; its own retries are off, so that every retry is ours and counted.
"""

from __future__ import annotations

import os
import random
import threading
import time

from megatron_rpo.errors import InputError

__all__ = ["Endpoint", "EndpointError", "GaveUp"]


class EndpointError(InputError):
    """The endpoint is wrong (URL, key, model): retrying cannot help."""


class GaveUp(RuntimeError):
    """A call still failed after every retry (the run keeps what it has; the same command resumes)."""


def _openai():
    try:
        import openai
    except ImportError:
        raise InputError("an endpoint needs the openai client: pip install openai") from None
    return openai


class Endpoint:
    """``base_url`` (``http://host:port/v1``) serving ``model``.

    Args:
        api_key: the key; None reads ``OPENAI_API_KEY`` (a local server takes any).
        timeout: seconds for one call.
        retries: retries of one call before :class:`GaveUp`.
        backoff: the first wait in seconds; doubled each retry, at most ``max_backoff``.
    """

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, timeout: float = 120.0,
                 retries: int = 8, backoff: float = 1.0, max_backoff: float = 60.0):
        openai = _openai()
        self.base_url, self.model = base_url.rstrip("/"), model
        self.timeout, self.max_retries, self.backoff, self.max_backoff = timeout, retries, backoff, max_backoff
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY") or "none"
        self._client = openai.OpenAI(base_url=self.base_url, api_key=key, timeout=timeout, max_retries=0)
        self._lock = threading.Lock()
        self.retries = 0
        """Retries made so far (all calls together)."""
        self.calls = 0

    def __repr__(self) -> str:
        return f"{self.model} at {self.base_url}"

    # -- checks ----------------------------------------------------------------------------------------
    def check(self) -> None:
        """The endpoint answers and serves :attr:`model` (before any work).

        Raises:
            EndpointError: one line naming what is wrong.
        """
        try:
            # Two retries at most: a wrong URL is said in seconds, not after the full backoff.
            listed = self._call(lambda: self._client.models.list().data, retries=min(2, self.max_retries))
            served = [m.id for m in listed]
        except GaveUp as e:
            raise EndpointError(f"the endpoint {self.base_url} does not answer: {e}") from None
        if served and self.model not in served:
            shown = ", ".join(served[:8]) + (" ..." if len(served) > 8 else "")
            raise EndpointError(f"the endpoint {self.base_url} does not serve the model {self.model!r}; it serves: "
                                f"{shown}")

    # -- calls -----------------------------------------------------------------------------------------
    def complete(self, prompt: str, *, max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, stop: list[str] | None = None) -> str:
        """The text the model continues ``prompt`` with (``/completions``)."""
        options = _given(seed=seed, stop=stop)

        def call():
            response = self._client.completions.create(model=self.model, prompt=prompt, max_tokens=max_tokens,
                                                       temperature=temperature, top_p=top_p, **options)
            return response.choices[0].text
        return self._text(call)

    def chat(self, messages: list[dict], *, max_tokens: int, temperature: float = 0.0, seed: int | None = None) -> str:
        """The assistant's answer to ``messages`` (``/chat/completions``)."""
        options = _given(seed=seed)

        def call():
            response = self._client.chat.completions.create(model=self.model, messages=messages,
                                                            max_tokens=max_tokens, temperature=temperature, **options)
            return response.choices[0].message.content
        return self._text(call)

    def _text(self, call) -> str:
        def checked():
            text = call()
            if not isinstance(text, str):
                raise _Malformed(f"the answer has no text ({type(text).__name__})")
            return text
        return self._call(checked)

    def _call(self, call, retries: int | None = None):
        openai = _openai()
        retries = self.max_retries if retries is None else retries
        attempt = 0
        while True:
            with self._lock:
                self.calls += 1
            try:
                return call()
            except openai.AuthenticationError as e:
                raise EndpointError(f"the endpoint {self.base_url} refused the key ({e.status_code}): set "
                                    "OPENAI_API_KEY or --judge-api-key-env / --api-key-env") from None
            except openai.PermissionDeniedError as e:
                raise EndpointError(f"the endpoint {self.base_url} denies access to {self.model!r} "
                                    f"({e.status_code})") from None
            except openai.NotFoundError as e:
                if "model" in str(e).lower():
                    raise EndpointError(f"the endpoint {self.base_url} does not serve the model {self.model!r} "
                                        f"(404: {_short(e)})") from None
                raise EndpointError(f"{self.base_url} is not an OpenAI-compatible API (404 on "
                                    f"{e.request.url.path if e.request else 'a call'}); the URL ends in /v1") from None
            except openai.BadRequestError as e:
                raise EndpointError(f"the endpoint {self.base_url} rejected a request (400: {_short(e)})") from None
            except (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError,
                    openai.APIResponseValidationError, _Malformed, ValueError, AttributeError, IndexError,
                    TypeError) as e:
                # A status of 409/422 or another 4xx falls to the generic APIStatusError below.
                if attempt >= retries:
                    raise GaveUp(f"{type(e).__name__} after {attempt + 1} tries: {_short(e)}") from None
                wait = min(self.max_backoff, self.backoff * 2 ** attempt) * (0.5 + random.random() / 2)
                retry_after = _retry_after(e)
                if retry_after is not None:
                    wait = max(wait, min(retry_after, self.max_backoff))
                attempt += 1
                with self._lock:
                    self.retries += 1
                time.sleep(wait)
            except openai.APIStatusError as e:
                raise EndpointError(f"the endpoint {self.base_url} answered {e.status_code}: {_short(e)}") from None


class _Malformed(Exception):
    pass


def _given(**options) -> dict:
    """The options that are set (a null in the request body is an error to some servers)."""
    return {k: v for k, v in options.items() if v is not None}


def _short(e: Exception, limit: int = 200) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _retry_after(e: Exception) -> float | None:
    response = getattr(e, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
