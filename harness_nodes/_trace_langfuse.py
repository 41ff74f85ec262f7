"""Langfuse wiring: one trace per task, harness decisions as first-class Langfuse data.

Measured with langfuse 5.0.4 and langgraph 1.2.24: every interrupt/resume leg becomes its
own trace by default (the SDK's resume stitching is in-memory, per process, and never fires
for LangGraph's resume); seeding the trace id from the thread id and passing it as
``trace_context`` keeps every leg — in any process, after any crash — in one trace. Fake and
self-hosted chat models carry no model name Langfuse can price, so the handler sets the model
and ``cost_details`` on each generation from the harness's own pricing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import is_dataclass
from typing import Any, Literal
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, LLMResult
from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import merge_configs
from pydantic import BaseModel

from harness_nodes._events import EVENT_PREFIX
from harness_nodes._pricing import call_cost
from harness_nodes.errors import UserError
from harness_nodes.pricing import Pricing

__all__ = ["Masker", "langfuse_callbacks", "langfuse_handler", "trace_id_for"]

logger = logging.getLogger("harness_nodes.tracing")

MASK = "***"
"""What a masked value becomes."""

DEFAULT_SENSITIVE_FIELDS = frozenset(
    {
        "api_key",
        "apikey",
        "api-key",
        "secret",
        "secret_key",
        "client_secret",
        "password",
        "passwd",
        "token",
        "access_token",
        "refresh_token",
        "authorization",
        "auth",
        "cookie",
        "private_key",
    }
)
"""Keys whose values never reach a trace, whatever they hold (compared case-insensitively)."""

_SECRET_PATTERNS = re.compile(
    r"(sk-(?:lf-|proj-|ant-)?[A-Za-z0-9_\-]{12,}"  # OpenAI / Anthropic / Langfuse secret keys
    r"|pk-lf-[A-Za-z0-9_\-]{8,}"  # Langfuse public keys
    r"|AKIA[0-9A-Z]{16}"  # AWS access key ids
    r"|gh[pousr]_[A-Za-z0-9]{20,}"  # GitHub tokens
    r"|xox[abprs]-[A-Za-z0-9\-]{10,}"  # Slack tokens
    r"|AIza[0-9A-Za-z_\-]{30,}"  # Google API keys
    r"|(?i:bearer)\s+[A-Za-z0-9._~+/\-]{8,}=*)"
)
_SECRET_HINTS = ("sk-", "pk-lf-", "akia", "gh", "xox", "aiza", "bearer")
"""What each of `_SECRET_PATTERNS` starts with, lowercased."""
_ENV_SECRET_NAME = re.compile(r"(API_KEY|SECRET|TOKEN|PASSWORD)", re.IGNORECASE)


class Masker:
    """Masks secrets in anything about to be written to a trace.

    Values under sensitive keys (API keys, passwords, tokens, plus the fields you mark) are
    replaced whole; API-key-shaped strings and the literal values of secret environment
    variables are replaced wherever they appear in text. Messages and pydantic models are
    dumped to plain data first, so tool-call arguments inside them are masked too.

    Example:
        ```python
        from harness_nodes import Masker

        mask = Masker(sensitive_fields=["card_number"])
        out = mask(data={"card_number": "4111", "note": "key sk-abcdefghijklmnop1234"})
        assert out == {"card_number": "***", "note": "key ***"}
        ```
    """

    def __init__(self, sensitive_fields: Sequence[str] = (), secrets: Sequence[str] = ()) -> None:
        self.fields = DEFAULT_SENSITIVE_FIELDS | {f.lower() for f in sensitive_fields}
        env_values = [
            v for k, v in os.environ.items() if _ENV_SECRET_NAME.search(k) and len(v) >= 8
        ]
        literals = sorted({*secrets, *env_values}, key=len, reverse=True)
        self._literals = [s for s in literals if s]
        self._compile()

    def extend(self, sensitive_fields: Sequence[str] = (), secrets: Sequence[str] = ()) -> None:
        """Also mask these fields and literal values from now on."""
        self.fields = self.fields | {f.lower() for f in sensitive_fields}
        merged = {*self._literals, *(s for s in secrets if s)}
        self._literals = sorted(merged, key=len, reverse=True)
        self._compile()

    def _compile(self) -> None:
        # One pass per string: literal secrets and key-shaped values, then `key: value` /
        # `key=value` pairs inside text (reprs, error messages, tool input strings).
        literals = "|".join(re.escape(s) for s in self._literals)
        self._any = re.compile(
            f"{literals}|{_SECRET_PATTERNS.pattern}" if literals else _SECRET_PATTERNS.pattern
        )
        names = "|".join(re.escape(f) for f in sorted(self.fields, key=len, reverse=True))
        self._kv = re.compile(
            rf"""(?i)(["']?)\b({names})\1(\s*[:=]\s*)("[^"]*"|'[^']*'|[^\s,;}}\])]+)"""
        )
        # Substrings (lowercased) without which neither pattern can match an ASCII string
        # (IGNORECASE folds only ASCII there): a string holding none skips both scans.
        hints = {*_SECRET_HINTS, *(s.lower() for s in self._literals), *self.fields}
        self._hint = (
            re.compile("|".join(re.escape(h) for h in sorted(hints, key=len, reverse=True)))
            if all(f.isascii() for f in self.fields)
            else None
        )
        self._sensitive: dict[Any, bool] = {}  # key → masked whole? (keys repeat a lot)
        self._encoder = json.JSONEncoder(default=self._json_default, allow_nan=False)
        self._messages: dict[tuple[int, str], tuple[Any, Any, Any, _Masked]] = {}
        self._metadata: dict[tuple[Any, type, Any], dict[str, Any]] = {}

    def __call__(self, *, data: Any, **_: Any) -> Any:
        """Langfuse's ``mask`` signature: return *data* with its secrets masked."""
        if type(data) is _Prepared:
            return data  # masked and encoded by `_prepare` already
        return self._mask(data, 0)

    def _prepare(self, data: Any) -> str | None:
        """Mask *data* and encode it as JSON in one pass, for a Langfuse attribute.

        The SDK writes a string attribute as is, so a prepared payload skips its own walks
        (media scan, mask, serialiser). None when *data* does not encode as plain JSON or
        holds a base64 data URI (the SDK's media upload handles those).
        """
        try:
            text = self._encode(self._mask(data, 0), 0)
        except (TypeError, ValueError, RecursionError):
            return None
        if ";base64," in text and "data:" in text:
            return None
        return _Prepared(text)

    def _encode(self, data: Any, depth: int) -> str:
        """``json.dumps(data)`` of masked *data*, reusing each remembered message's encoding.

        Containers holding remembered messages (a prompt, a node's messages) are joined from
        their items' encodings, down two levels; anything else is one call to the C encoder.
        The text is the same ``json.dumps`` would produce.
        """
        kind = type(data)
        if kind is _Masked:
            text: str | None = data.json
            if text is None:
                text = data.json = self._encoder.encode(data)
            return text
        if depth < 2:
            if kind is list and any(type(v) is _Masked or type(v) is list for v in data):
                return "[" + ", ".join([self._encode(v, depth + 1) for v in data]) + "]"
            if (
                kind is dict
                and any(type(v) is _Masked or type(v) is list for v in data.values())
                and all(type(k) is str for k in data)
            ):
                dump_key = self._encoder.encode
                return (
                    "{"
                    + ", ".join(
                        [f"{dump_key(k)}: {self._encode(v, depth + 1)}" for k, v in data.items()]
                    )
                    + "}"
                )
        return self._encoder.encode(data)

    def _metadata_attributes(
        self, metadata: dict[Any, Any], flatten: Callable[[Any, str], dict[str, Any]]
    ) -> dict[str, Any]:
        """Langfuse's attributes for observation *metadata*, masked (``flatten``: the SDK's).

        Each key is flattened on its own (as the SDK does) and a key with a plain value is
        remembered: node names and steps repeat on every observation.
        """
        out: dict[str, Any] = {}
        for key, value in metadata.items():
            kind = type(value)
            if kind is str or kind is int or kind is bool or value is None:  # -0.0 == 0.0
                cache_key = (key, kind, value)
                hit = self._metadata.get(cache_key)
                if hit is None:
                    if len(self._metadata) >= 4096:
                        self._metadata.clear()
                    hit = self._metadata[cache_key] = flatten(
                        self._mask({key: value}, 0), "observation"
                    )
                out.update(hit)
            else:
                out.update(flatten(self._mask({key: value}, 0), "observation"))
        return out

    def _json_default(self, obj: Any) -> Any:
        # What Langfuse's serialiser makes of anything else (datetimes, UUIDs, enums...).
        from langfuse._utils.serializer import EventSerializer

        converted = EventSerializer().default(obj)
        if converted is obj:
            return f"<{type(obj).__name__}>"
        return self._mask(converted, 0)

    def text(self, value: str) -> str:
        """Mask secrets inside one string."""
        if len(value) < 8:
            return value
        if value.isascii() and self._hint is not None and not self._hint.search(value.lower()):
            return value
        value = self._any.sub(MASK, value)
        if ":" in value or "=" in value:
            value = self._kv.sub(_mask_pair, value)
        return value

    def _is_sensitive(self, key: Any) -> bool:
        hit = self._sensitive.get(key)
        if hit is None:
            if len(self._sensitive) > 4096:
                self._sensitive.clear()
            hit = self._sensitive[key] = str(key).lower() in self.fields
        return hit

    def _message(self, msg: Any, kind: str, dump: Callable[[Any], Any]) -> Any:
        """``dump(msg)`` masked, remembered while *msg* (its content, its id) is the same.

        A conversation re-sends every earlier message on each model call; masking each one
        once keeps tracing linear in the conversation's length. LangGraph's ``add_messages``
        gives an id-less message its id in place, after the node that returned it ended.
        """
        key = (id(msg), kind)
        hit = self._messages.get(key)
        content = getattr(msg, "content", None)
        msg_id = getattr(msg, "id", None)
        if hit is not None and hit[0] is msg and hit[1] is content:
            if hit[2] == msg_id:
                return hit[3]
            masked = hit[3]  # only the id changed: the rest stands
            if "id" in masked:
                masked = _Masked(
                    {**masked, "id": MASK if self._is_sensitive("id") else self._mask(msg_id, 1)}
                )
                masked.json = None
        else:
            masked = self._mask(dump(msg), 1)
            if not isinstance(masked, dict):
                return masked
            masked = _Masked(masked)
            masked.json = None
        if len(self._messages) >= 2048:
            self._messages.clear()
        self._messages[key] = (msg, content, msg_id, masked)
        return masked

    def _mask(self, data: Any, depth: int) -> Any:
        kind = type(data)
        if kind is str:
            return self.text(data) if len(data) >= 8 else data
        if data is None or kind is int or kind is float or kind is bool or kind is _Masked:
            return data
        if depth > 64:
            return data
        if kind is dict or isinstance(data, Mapping):
            # Leaves inline: most values are plain strings and numbers, a call each otherwise.
            known = self._sensitive
            out: dict[Any, Any] = {}
            for k, v in data.items():
                hit = known.get(k)
                if hit if hit is not None else self._is_sensitive(k):
                    out[k] = MASK
                    continue
                vkind = type(v)
                if vkind is str:
                    out[k] = self.text(v) if len(v) >= 8 else v
                elif v is None or vkind is int or vkind is bool or vkind is float:
                    out[k] = v
                else:
                    out[k] = self._mask(v, depth + 1)
            return out
        if kind is list or kind is tuple:
            return [
                (self.text(v) if len(v) >= 8 else v)
                if type(v) is str
                else v
                if v is None or type(v) is int or type(v) is float
                else self._mask(v, depth + 1)
                for v in data
            ]
        if isinstance(data, str):
            return self.text(data)
        if isinstance(data, int | float | bool):
            return data
        if isinstance(data, list | tuple):
            return [self._mask(v, depth + 1) for v in data]
        if isinstance(data, BaseMessage):
            return self._message(data, "dump", _model_dump)
        if isinstance(data, BaseModel):
            return self._mask(data.model_dump(), depth + 1)
        if is_dataclass(data) and not isinstance(data, type):
            return self._mask(vars(data), depth + 1)
        return data


def _mask_pair(m: re.Match[str]) -> str:
    return f"{m[1]}{m[2]}{m[1]}{m[3]}{MASK}"


def _model_dump(msg: Any) -> Any:
    return msg.model_dump()


class _Masked(dict[str, Any]):
    """Plain data `Masker` has masked already (a message, remembered): not walked again."""

    __slots__ = ("json",)
    json: str | None
    """Its JSON encoding, once a payload holding it was prepared."""


class _Prepared(str):
    """A payload `Masker._prepare` masked and JSON-encoded: Langfuse writes it unchanged."""

    __slots__ = ()


class _Preparing:
    """An observation whose new children and updates carry prepared input/output.

    With every payload prepared, a child is started and updated in one pass over the SDK's
    own pieces (its tracer, attribute builders and span-limit guard, as
    ``LangfuseObservationWrapper`` uses them), skipping the wrapper's per-field media scan
    and mask (prepared payloads pass both unchanged; the exporter still scans every string
    attribute for media) and its three separate attribute writes. Anything else (events,
    payloads `Masker._prepare` declines) takes the SDK's own path.
    """

    __slots__ = ("_obs", "_masker", "_defaults")

    def __init__(self, obs: Any, masker: Masker, defaults: Mapping[str, Any] | None = None) -> None:
        self._obs = obs
        self._masker = masker
        self._defaults = defaults  # written by the next update, unless it sets them itself

    def _prepared(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        for key in ("input", "output"):
            value = kwargs.get(key)
            if value is not None and type(value) is not _Prepared:
                kwargs[key] = self._masker._prepare(value) or value
        return kwargs

    def start_observation(self, **kwargs: Any) -> Any:
        kwargs = self._prepared(kwargs)
        as_type = kwargs.get("as_type", "span")
        sdk = _sdk()
        cls = sdk.classes.get(as_type)
        if cls is None or not _all_prepared(kwargs):
            return self._obs.start_observation(**kwargs)
        parent = self._obs
        client = parent._langfuse_client
        span = client._otel_tracer.start_span(
            name=kwargs["name"], context=sdk.set_span_in_context(parent._otel_span)
        )
        obs = cls.__new__(cls)  # what the wrapper's __init__ sets, attributes written below
        obs._otel_span = span
        obs._langfuse_client = client
        obs._observation_type = as_type
        obs.trace_id = client._get_otel_trace_id(span)
        obs.id = client._get_otel_span_id(span)
        attributes: dict[str, Any] = {sdk.TYPE: as_type}
        environment = span.attributes.get(sdk.ENVIRONMENT) if span.attributes else None
        obs._environment = environment or parent._environment or client._environment
        if obs._environment is not None and environment is None:
            attributes[sdk.ENVIRONMENT] = obs._environment
        obs._release = parent._release or client._release
        if obs._release is not None:
            attributes[sdk.RELEASE] = obs._release
        if span.is_recording():
            attributes.update(_attributes(sdk, as_type, kwargs, self._masker))
            attributes[sdk.TYPE] = as_type
            sdk.set_within_limit(span, attributes, sdk.reserved(as_type))
            _error_status(sdk, span, kwargs)
        return obs

    def update(self, **kwargs: Any) -> _Preparing:
        if self._defaults:
            for key, value in self._defaults.items():
                if kwargs.get(key) is None:
                    kwargs[key] = value
            self._defaults = None
        kwargs = self._prepared(kwargs)
        obs = self._obs
        sdk = _sdk()
        if obs._observation_type == "event" or not _all_prepared(kwargs):
            obs.update(**kwargs)
            return self
        span = obs._otel_span
        if not span.is_recording():
            return self
        if kwargs.get("name"):
            span.update_name(kwargs["name"])
        attributes = _attributes(sdk, obs._observation_type, kwargs, self._masker)
        sdk.set_within_limit(span, attributes, sdk.reserved(obs._observation_type))
        _error_status(sdk, span, kwargs)
        return self

    def __getattr__(self, name: str) -> Any:
        return getattr(self._obs, name)


def _all_prepared(kwargs: Mapping[str, Any]) -> bool:
    return all(
        kwargs.get(key) is None or type(kwargs[key]) is _Prepared for key in ("input", "output")
    )


def _attributes(
    sdk: Any, as_type: str, kwargs: Mapping[str, Any], masker: Masker
) -> dict[str, Any]:
    """The Langfuse attributes of a start or update, built by the SDK's own functions."""
    metadata = kwargs.get("metadata")
    common = {
        "input": kwargs.get("input"),
        "output": kwargs.get("output"),
        "metadata": None if type(metadata) is dict else masker(data=metadata),
        "version": kwargs.get("version"),
        "level": kwargs.get("level"),
        "status_message": kwargs.get("status_message"),
    }
    if as_type in sdk.generation_like:
        attributes = dict(
            sdk.generation_attributes(
                **common,
                completion_start_time=kwargs.get("completion_start_time"),
                model=kwargs.get("model"),
                model_parameters=kwargs.get("model_parameters"),
                usage_details=kwargs.get("usage_details"),
                cost_details=kwargs.get("cost_details"),
                prompt=kwargs.get("prompt"),
                observation_type=as_type,
            )
        )
    else:
        attributes = dict(
            sdk.span_attributes(
                **common, observation_type=as_type if as_type in sdk.span_like else None
            )
        )
    if type(metadata) is dict:
        attributes.update(masker._metadata_attributes(metadata, sdk.flatten_metadata))
    return attributes


def _error_status(sdk: Any, span: Any, kwargs: Mapping[str, Any]) -> None:
    if kwargs.get("level") == "ERROR":
        try:
            span.set_status(sdk.Status(sdk.StatusCode.ERROR, kwargs.get("status_message")))
        except Exception:  # as the SDK does: a status never breaks the run
            pass


_SDK: Any = None


def _sdk() -> Any:
    """The Langfuse SDK pieces the fast path uses (imported once, on first use)."""
    global _SDK
    if _SDK is None:
        from types import SimpleNamespace

        from langfuse._client import span as lf_span
        from langfuse._client.attributes import (
            LangfuseOtelSpanAttributes,
            _flatten_and_serialize_metadata,
            create_generation_attributes,
            create_span_attributes,
        )
        from langfuse._client.constants import (
            ObservationTypeGenerationLike,
            ObservationTypeSpanLike,
            get_observation_types_list,
        )
        from opentelemetry.trace import Status, StatusCode, set_span_in_context

        reserved: dict[str, tuple[str, ...]] = {}

        def reserved_keys(as_type: str) -> tuple[str, ...]:
            keys = reserved.get(as_type)
            if keys is None:
                keys = reserved[as_type] = lf_span._reserved_attribute_keys(as_type)
            return keys

        _SDK = SimpleNamespace(
            classes={k: v for k, v in lf_span._OBSERVATION_CLASS_MAP.items() if k != "event"},
            set_span_in_context=set_span_in_context,
            set_within_limit=lf_span._set_span_attributes_within_limit,
            reserved=reserved_keys,
            generation_like=frozenset(get_observation_types_list(ObservationTypeGenerationLike)),
            span_like=frozenset(get_observation_types_list(ObservationTypeSpanLike)),
            generation_attributes=create_generation_attributes,
            span_attributes=create_span_attributes,
            flatten_metadata=_flatten_and_serialize_metadata,
            TYPE=LangfuseOtelSpanAttributes.OBSERVATION_TYPE,
            ENVIRONMENT=LangfuseOtelSpanAttributes.ENVIRONMENT,
            RELEASE=LangfuseOtelSpanAttributes.RELEASE,
            Status=Status,
            StatusCode=StatusCode,
        )
    return _SDK


def _ensure_masked(client: Any, masker: Masker) -> None:
    """Make *client* mask with *masker*, also when it was built earlier without it.

    Langfuse keeps one client per public key and fixes its ``mask`` when the first one is
    built; a client the application created before `langfuse_callbacks` would otherwise send
    every secret as is. No mask: ours. The application's own mask: theirs, then ours.
    """
    current = getattr(client, "_mask", None)
    if current is masker or getattr(current, "harness_masker", None) is masker:
        return
    if current is None:
        client._mask = masker
        return

    def both(*, data: Any, **kwargs: Any) -> Any:
        return masker(data=current(data=data, **kwargs))

    both.harness_masker = masker  # type: ignore[attr-defined]
    client._mask = both


def trace_id_for(thread_id: str) -> str:
    """The Langfuse trace id of a task: the same for every leg, process and crash.

    Example:
        ```python
        from harness_nodes import trace_id_for

        assert trace_id_for("thread-1") == trace_id_for("thread-1")
        assert len(trace_id_for("thread-1")) == 32
        ```
    """
    from langfuse import Langfuse

    return str(Langfuse.create_trace_id(seed=thread_id))


def _score_id(*parts: str) -> str:
    # Deterministic: a leg replayed after a crash upserts its scores instead of doubling them.
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


def _handler_class() -> type[Any]:
    from langfuse.langchain import CallbackHandler

    class HarnessLangfuseHandler(CallbackHandler):
        """Langfuse's LangChain handler, plus the harness's events, costs and trace id."""

        run_inline = True  # keep the run tree in order under async graphs (no thread hops)

        def __init__(
            self,
            *,
            public_key: str,
            thread_id: str | None,
            pricing: Pricing | None,
            masker: Masker,
        ) -> None:
            # With a thread id: one task's handler. Without: one handler for every task of a
            # graph, runner or review queue — each root run's trace id comes from its thread.
            self.thread_id = thread_id
            self.trace_id = trace_id_for(thread_id) if thread_id else None
            context: Any = {"trace_id": self.trace_id} if self.trace_id else None
            super().__init__(public_key=public_key, trace_context=context)
            self._pricing = pricing
            self._masker = masker
            # Plumbing chains that get no observation, each mapped to its nearest exported
            # ancestor: their children (and the events they emit) attach there instead.
            self._skipped: dict[UUID, UUID | None] = {}
            # Payloads are masked and encoded once, by us, when the client masks with our
            # Masker (its mask then passes them through); otherwise the SDK's path.
            _ensure_masked(self._langfuse_client, masker)
            self._prepares = getattr(self._langfuse_client, "_mask", None) is masker
            self._root_metadata: dict[UUID, Mapping[str, Any]] = {}
            # A generation's model and cost, written with the SDK's final update of it.
            self._priced: dict[UUID, dict[str, Any]] = {}

        def _get_error_level_and_status_message(
            self, error: BaseException
        ) -> tuple[Literal["DEFAULT", "ERROR"], str]:
            # Langfuse does not mask status messages, and an interrupt's message is the repr
            # of its payload (the tool call under review, arguments and all).
            level, _ = super()._get_error_level_and_status_message(error)
            interrupts = error.args[0] if error.args else None
            if isinstance(interrupts, tuple | list) and all(
                hasattr(i, "value") for i in interrupts
            ):
                payload = self._masker(data=[i.value for i in interrupts])
                return level, "interrupted: " + json.dumps(payload, default=str)
            return level, self._masker.text(str(error) or type(error).__name__)

        def on_chain_start(
            self,
            serialized: dict[str, Any] | None,
            inputs: Any,
            *,
            run_id: UUID,
            parent_run_id: UUID | None = None,
            tags: list[str] | None = None,
            metadata: dict[str, Any] | None = None,
            **kwargs: Any,
        ) -> Any:
            if parent_run_id is not None:
                parent_run_id = self._skipped.get(parent_run_id, parent_run_id)
                if _is_plumbing(serialized, kwargs.get("name"), tags, metadata):
                    self._skipped[run_id] = parent_run_id
                    return None
            if parent_run_id is None and metadata:
                self._root_metadata[run_id] = metadata
                if self.thread_id is None and metadata.get("thread_id"):
                    metadata = {
                        **metadata,
                        **_trace_attributes(str(metadata["thread_id"]), metadata),
                    }
                # The root's metadata becomes trace attributes, which Langfuse does not mask.
                metadata = self._masker(data=metadata)
            elif metadata and "langgraph_node" in metadata and isinstance(inputs, Mapping):
                inputs = _compact_state(inputs)
            return super().on_chain_start(
                serialized,
                inputs,
                run_id=run_id,
                parent_run_id=parent_run_id,
                tags=tags,
                metadata=metadata,
                **kwargs,
            )

        def _take_root_trace_context(
            self, *, inputs: Any, metadata: dict[str, Any] | None
        ) -> tuple[str | None, Any]:
            if self.trace_id is None and metadata and metadata.get("thread_id"):
                return None, {"trace_id": trace_id_for(str(metadata["thread_id"]))}
            return super()._take_root_trace_context(inputs=inputs, metadata=metadata)

        def _trace_of(self, run_id: UUID) -> str | None:
            obs = self._runs.get(run_id)
            return str(obs.trace_id) if obs is not None else self.trace_id

        # --- generations: model name and cost from the harness's pricing ---------------
        def on_llm_end(
            self,
            response: LLMResult,
            *,
            run_id: UUID,
            parent_run_id: UUID | None = None,
            **kwargs: Any,
        ) -> Any:
            generation = self._runs.get(run_id)
            priced: dict[str, Any] | None = None
            if generation is not None:
                try:
                    priced = self._price_generation(response)
                except Exception:  # never break the run for a trace
                    logger.exception("could not price a generation for Langfuse")
            if priced and generation is not None and not self._prepares:
                generation.update(**priced)
            elif priced:  # rides on the SDK's own final update (its model, if any, wins)
                self._priced[run_id] = priced
            try:
                return super().on_llm_end(
                    response, run_id=run_id, parent_run_id=parent_run_id, **kwargs
                )
            finally:
                self._priced.pop(run_id, None)

        def _price_generation(self, response: LLMResult) -> dict[str, Any] | None:
            """The generation's model and ``cost_details`` from the harness's pricing."""
            last = response.generations[-1][-1]
            if not isinstance(last, ChatGeneration) or not isinstance(last.message, AIMessage):
                return None
            msg = last.message
            usage: Mapping[str, Any] = msg.usage_metadata or {}
            inp, out = int(usage.get("input_tokens", 0)), int(usage.get("output_tokens", 0))
            meta = msg.additional_kwargs.get("harness") or {}
            budget = meta.get("budget") or {} if isinstance(meta, Mapping) else {}
            model = str(
                budget.get("model")
                or msg.response_metadata.get("model_name")
                or msg.response_metadata.get("model")
                or ""
            )
            if not model:
                return None
            spent = budget.get("spent_usd")
            priced = call_cost(self._pricing, model, inp, out)
            if isinstance(spent, int | float):
                total = float(spent)
                split = priced or (total, 0.0)
                scale = total / (split[0] + split[1]) if (split[0] + split[1]) else 0.0
                cost = {"input": split[0] * scale, "output": split[1] * scale, "total": total}
            elif priced is not None:
                cost = {"input": priced[0], "output": priced[1], "total": priced[0] + priced[1]}
            else:
                return {"model": model}
            return {"model": model, "cost_details": cost}

        # --- root runs: the outcome becomes a trace score ------------------------------
        def on_chain_end(
            self,
            outputs: Any,
            *,
            run_id: UUID,
            parent_run_id: UUID | None = None,
            **kwargs: Any,
        ) -> Any:
            if self._skipped.pop(run_id, _NOT_SKIPPED) is not _NOT_SKIPPED:
                return None
            if parent_run_id is None:
                self._root_metadata.pop(run_id, None)
            if parent_run_id is None and isinstance(outputs, Mapping):
                outcome = outputs.get("outcome")
                trace_id = self._trace_of(run_id)
                if isinstance(outcome, Mapping) and outcome.get("status") and trace_id:
                    self._score_outcome(outcome, trace_id)
            return super().on_chain_end(
                outputs, run_id=run_id, parent_run_id=parent_run_id, **kwargs
            )

        def on_chain_error(
            self,
            error: BaseException,
            *,
            run_id: UUID,
            parent_run_id: UUID | None = None,
            **kwargs: Any,
        ) -> None:
            # A plumbing chain's error (an interrupt raised in a routing function...) reaches
            # the node that ran it, which records it.
            if self._skipped.pop(run_id, _NOT_SKIPPED) is not _NOT_SKIPPED:
                return
            if parent_run_id is None:
                self._root_metadata.pop(run_id, None)
            super().on_chain_error(error, run_id=run_id, parent_run_id=parent_run_id, **kwargs)

        # --- children of skipped chains attach to the nearest exported ancestor ---------
        def on_chat_model_start(
            self,
            serialized: dict[str, Any] | None,
            messages: list[list[BaseMessage]],
            *,
            run_id: UUID,
            parent_run_id: UUID | None = None,
            **kwargs: Any,
        ) -> Any:
            if parent_run_id is not None:
                parent_run_id = self._skipped.get(parent_run_id, parent_run_id)
            return super().on_chat_model_start(
                serialized, messages, run_id=run_id, parent_run_id=parent_run_id, **kwargs
            )

        def on_llm_start(
            self,
            serialized: dict[str, Any] | None,
            prompts: list[str],
            *,
            run_id: UUID,
            parent_run_id: UUID | None = None,
            **kwargs: Any,
        ) -> Any:
            if parent_run_id is not None:
                parent_run_id = self._skipped.get(parent_run_id, parent_run_id)
            return super().on_llm_start(
                serialized, prompts, run_id=run_id, parent_run_id=parent_run_id, **kwargs
            )

        def on_tool_start(
            self,
            serialized: dict[str, Any] | None,
            input_str: str,
            *,
            run_id: UUID,
            parent_run_id: UUID | None = None,
            **kwargs: Any,
        ) -> Any:
            if parent_run_id is not None:
                parent_run_id = self._skipped.get(parent_run_id, parent_run_id)
            kwargs.pop("color", None)  # a console colour, not a fact about the call
            return super().on_tool_start(
                serialized, input_str, run_id=run_id, parent_run_id=parent_run_id, **kwargs
            )

        def on_retriever_start(
            self,
            serialized: dict[str, Any] | None,
            query: str,
            *,
            run_id: UUID,
            parent_run_id: UUID | None = None,
            **kwargs: Any,
        ) -> Any:
            if parent_run_id is not None:
                parent_run_id = self._skipped.get(parent_run_id, parent_run_id)
            return super().on_retriever_start(
                serialized, query, run_id=run_id, parent_run_id=parent_run_id, **kwargs
            )

        # --- payloads: masked and JSON-encoded once --------------------------------------
        def _convert_message_to_dict(self, message: BaseMessage) -> dict[str, Any]:
            # The generation's prompt, message by message: each masked once per process.
            if not self._prepares:
                return dict(super()._convert_message_to_dict(message))
            convert = super()._convert_message_to_dict
            masked: dict[str, Any] = self._masker._message(message, "prompt", convert)
            return masked

        def _preparing(self, obs: Any) -> Any:
            return _Preparing(obs, self._masker) if self._prepares and obs is not None else obs

        def _get_parent_observation(self, parent_run_id: UUID | None) -> Any:
            obs = super()._get_parent_observation(parent_run_id)
            return obs if obs is self._langfuse_client else self._preparing(obs)

        def _detach_observation(self, run_id: UUID) -> Any:
            obs = super()._detach_observation(run_id)
            priced = self._priced.pop(run_id, None)
            if obs is None or not self._prepares:
                return obs
            return _Preparing(obs, self._masker, priced)

        def _get_langchain_observation_metadata(
            self,
            *,
            parent_run_id: UUID | None,
            tags: list[str] | None = None,
            metadata: dict[str, Any] | None = None,
            keep_langfuse_trace_attributes: bool = False,
        ) -> dict[str, Any] | None:
            # LangChain copies the root's metadata into every child run, and LangGraph adds
            # its bookkeeping: on a child, keep what is about this observation (the node,
            # the step, anything set on the child itself); the rest is on the trace.
            if parent_run_id is not None:
                state = self._run_states.get(parent_run_id)
                root = self._root_metadata.get(state.root_run_id) if state else None
                metadata = _own_metadata(metadata, root)
                tags = [t for t in tags or () if not t.startswith(_PLUMBING_TAGS)] or None
            else:
                metadata = _own_metadata(metadata, None)
            result: dict[str, Any] | None = super()._get_langchain_observation_metadata(
                parent_run_id=parent_run_id,
                tags=tags,
                metadata=metadata,
                keep_langfuse_trace_attributes=keep_langfuse_trace_attributes,
            )
            return result

        def _parse_langfuse_trace_attributes(
            self, *, metadata: dict[str, Any] | None, tags: list[str] | None
        ) -> dict[str, Any]:
            # Trace metadata is copied onto every span of the leg: keep it to the task's own
            # keys (the thread id is already the session id; LangGraph's keys are plumbing).
            attributes: dict[str, Any] = super()._parse_langfuse_trace_attributes(
                metadata=metadata, tags=tags
            )
            if isinstance(attributes.get("metadata"), Mapping):
                attributes["metadata"] = _own_metadata(attributes["metadata"], None)
            return attributes

        def _score_outcome(self, outcome: Mapping[str, Any], trace_id: str) -> None:
            reason = outcome.get("reason")
            self._langfuse_client.create_score(
                name="outcome",
                value=str(outcome["status"]),
                trace_id=trace_id,
                score_id=_score_id(trace_id, "outcome"),
                data_type="CATEGORICAL",
                comment=self._masker.text(str(reason)) if reason else None,
            )

        # --- harness decisions ----------------------------------------------------------
        def on_custom_event(
            self,
            name: str,
            data: Any,
            *,
            run_id: UUID,
            tags: list[str] | None = None,
            metadata: dict[str, Any] | None = None,
            **kwargs: Any,
        ) -> Any:
            if not name.startswith(EVENT_PREFIX) or not isinstance(data, Mapping):
                return
            run_id = self._skipped.get(run_id) or run_id
            try:
                self._record(name.removeprefix(EVENT_PREFIX), dict(data), run_id)
            except Exception:
                logger.exception("could not record harness event %s in Langfuse", name)

        def _observe(self, run_id: UUID, trace_id: str, **kwargs: Any) -> Any:
            parent = self._runs.get(run_id)
            if parent is not None:
                obs = self._preparing(parent).start_observation(**kwargs)
            else:
                obs = self._langfuse_client.start_observation(
                    trace_context={"trace_id": trace_id}, **kwargs
                )
            if kwargs.get("as_type") != "event":
                obs.end()
            return obs

        def _record(self, kind: str, data: dict[str, Any], run_id: UUID) -> None:
            client = self._langfuse_client
            trace_id = self._trace_of(run_id)
            if trace_id is None:
                return  # an event outside any traced run
            if kind == "verdict":
                ok = bool(data.get("ok"))
                obs = self._observe(
                    run_id,
                    trace_id,
                    name=f"verify {data.get('tool', '?')}",
                    as_type="guardrail",
                    input={
                        "tool": data.get("tool"),
                        "tool_call_id": data.get("tool_call_id"),
                        "attempt": data.get("attempt"),
                    },
                    output={
                        "ok": ok,
                        "action": data.get("action"),
                        "reasons": data.get("reasons", []),
                    },
                    level=None if ok else "WARNING",
                    status_message=None if ok else "; ".join(map(str, data.get("reasons", []))),
                )
                client.create_score(
                    name="verification",
                    value=1.0 if ok else 0.0,
                    trace_id=trace_id,
                    observation_id=obs.id,
                    score_id=_score_id(
                        trace_id,
                        "verdict",
                        str(data.get("tool_call_id")),
                        str(data.get("attempt")),
                    ),
                    data_type="BOOLEAN",
                    comment=None
                    if ok
                    else self._masker.text("; ".join(map(str, data.get("reasons", [])))),
                )
            elif kind.startswith("budget."):
                action = kind.removeprefix("budget.")
                self._observe(
                    run_id,
                    trace_id,
                    name=kind,
                    as_type="event",
                    input={k: data[k] for k in ("task_id", "model", "from_model") if k in data},
                    output=data,
                    metadata={"harness_event": kind},
                    level="WARNING" if action in {"degrade", "warn", "stop"} else None,
                    status_message=(
                        f"{data.get('from_model')} → {data.get('to_model')}: {data.get('reason')}"
                        if action == "degrade"
                        else f"{data.get('limit')} {data.get('used')}/{data.get('maximum')}"
                        if action in {"warn", "stop"}
                        else None
                    ),
                )
                if action in {"stop", "degrade"}:
                    client.create_score(
                        name="budget",
                        value="stopped" if action == "stop" else "degraded",
                        trace_id=trace_id,
                        score_id=_score_id(trace_id, "budget", action),
                        data_type="CATEGORICAL",
                    )
            elif kind == "review.request":
                review_id = str(data.get("review_id", ""))
                self._observe(
                    run_id,
                    trace_id,
                    name="review requested",
                    as_type="event",
                    input={"tool_calls": data.get("tool_calls")},
                    output={"reason": data.get("reason"), "risk": data.get("risk")},
                    metadata={"harness_event": kind, "review_id": review_id},
                    level="WARNING",
                    status_message=str(data.get("reason", "")),
                )
            elif kind == "review.decision":
                review_id = str(data.get("review_id", ""))
                decision = str(data.get("decision", "?"))
                obs = self._observe(
                    run_id,
                    trace_id,
                    name=f"review {decision} by {data.get('reviewer', '?')}",
                    as_type="event",
                    input={"args_before": data.get("args_before")},
                    output={
                        "decision": decision,
                        "reviewer": data.get("reviewer"),
                        "args_after": data.get("args_after"),
                        "message": data.get("message"),
                    },
                    metadata={
                        "harness_event": kind,
                        "review_id": review_id,
                        "reviewer": data.get("reviewer"),
                    },
                    level="WARNING" if decision == "reject" else None,
                )
                client.create_score(
                    name="review",
                    value=decision,
                    trace_id=trace_id,
                    observation_id=obs.id,
                    score_id=_score_id(trace_id, "review", review_id),
                    data_type="CATEGORICAL",
                    comment=f"by {data.get('reviewer')}",
                )
            elif kind.startswith("effect."):
                action = kind.removeprefix("effect.")
                self._observe(
                    run_id,
                    trace_id,
                    name=f"effect {action}: {data.get('tool', '?')}",
                    as_type="event",
                    input={"tool": data.get("tool"), "tool_call_id": data.get("tool_call_id")},
                    output={"idempotency_key": data.get("idempotency_key"), "action": action},
                    metadata={"harness_event": kind},
                    level="ERROR" if action == "unknown" else None,
                )
            elif kind == "outcome":
                self._observe(
                    run_id,
                    trace_id,
                    name=f"outcome: {data.get('status')}",
                    as_type="event",
                    output=data,
                    metadata={"harness_event": kind},
                    level=None if data.get("status") == "completed" else "WARNING",
                )
                if data.get("status"):
                    self._score_outcome(data, trace_id)
            else:
                self._observe(
                    run_id,
                    trace_id,
                    name=kind,
                    as_type="event",
                    output=data,
                    metadata={"harness_event": kind},
                )

    return HarnessLangfuseHandler


_NOT_SKIPPED: Any = object()
_PLUMBING_TAGS = ("seq:step:", "graph:step:")
"""LangChain/LangGraph bookkeeping tags (a run's position in its sequence or graph)."""
_PLUMBING_METADATA_PREFIXES = ("langgraph_", "ls_", "lc_", "__pregel_")
_KEPT_METADATA = frozenset({"langgraph_node", "langgraph_step"})
_PLUMBING_METADATA = frozenset({"checkpoint_ns", "checkpoint_id", "thread_id"})


def _is_plumbing(
    serialized: Mapping[str, Any] | None,
    name: str | None,
    tags: Sequence[str] | None,
    metadata: Mapping[str, Any] | None,
) -> bool:
    """A chain inside a LangGraph node that is not itself a node.

    Routing functions and ``RunnableSequence``/``RunnableLambda`` pieces: they get no
    observation; their children and events still export, under the node.
    """
    if not metadata or "langgraph_node" not in metadata:
        return False  # not inside a graph: a plain LangChain chain keeps its span
    if "langfuse_prompt" in metadata:
        return False  # Langfuse links prompts to generations through this chain
    if tags and any(t.startswith("graph:step:") for t in tags):
        return False  # a graph node (a task)
    if name is None and serialized:
        name = serialized.get("name")
    return bool(name != metadata["langgraph_node"])


def _compact_state(state: Mapping[str, Any]) -> Mapping[str, Any]:
    """A node's input without the history it re-reads: each list keeps its last item.

    A node's input is the whole state, and lists in it (messages, verdicts, reviews) only
    grow: recording them whole on every step makes tracing quadratic in the task's length.
    Each list keeps its last item (what the node reacts to) and ``earlier_<key>``, the count
    before it; the earlier items are in the updates that added them (node outputs), the full
    prompt on each generation, the final state on the root span.
    """
    if not any(isinstance(v, list) and len(v) > 1 for v in state.values()):
        return state
    out: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, list) and len(value) > 1:
            out[key] = value[-1:]
            out[f"earlier_{key}"] = len(value) - 1
        else:
            out[key] = value
    return out


def _own_metadata(
    metadata: Mapping[str, Any] | None, root: Mapping[str, Any] | None
) -> dict[str, Any] | None:
    if not metadata:
        return None
    own = {
        k: v
        for k, v in metadata.items()
        if (k in _KEPT_METADATA or not k.startswith(_PLUMBING_METADATA_PREFIXES))
        and k not in _PLUMBING_METADATA
        and not (root is not None and k in root and (root[k] is v or root[k] == v))
    }
    return own or None


_HANDLER: type[Any] | None = None
_NOTICE_SHOWN = False
_MASKERS: dict[str, Masker] = {}
"""One masker per Langfuse public key: its client's ``mask`` is fixed when first built."""


def langfuse_callbacks(
    config_or_thread_id: RunnableConfig | str,
    *,
    task_type: str | None = None,
    task_id: str | None = None,
    envelope: Mapping[str, Any] | None = None,
    sensitive_fields: Sequence[str] = (),
    secrets: Sequence[str] = (),
    pricing: Pricing | None = None,
    public_key: str | None = None,
    secret_key: str | None = None,
    base_url: str | None = None,
    flush_interval: float = 1.0,
    **client_options: Any,
) -> RunnableConfig:
    """The run config that traces a task to Langfuse: one trace per task, decisions included.

    The trace id is seeded from the thread id, so every leg of the task (interrupt and
    resume, a crash and its recovery, another process or worker) lands in the same trace;
    the session id is the thread id, the task type is a tag, and the task id and envelope are
    trace metadata. Harness events become ``guardrail``/``event`` observations and scores,
    every generation gets its model name and cost from the harness's pricing, and secrets are
    masked before anything leaves the process. Spans are exported every ``flush_interval``
    seconds, so a crash loses at most that much of a leg.

    Without Langfuse keys (arguments or ``LANGFUSE_PUBLIC_KEY``/``LANGFUSE_SECRET_KEY``) it
    logs a one-line notice and returns the config without callbacks; the run is unchanged.

    Args:
        config_or_thread_id: A run config holding ``configurable.thread_id``, or the thread id.
        task_type: Tags the trace (and groups `harness report`).
        task_id: The task's id when it is not the thread id.
        envelope: The task's cost envelope, recorded as trace metadata.
        sensitive_fields: Extra keys whose values are masked (``ssn``, ``card_number``...).
        secrets: Literal values to mask wherever they appear.
        pricing: How to price a generation (default: `Pricing()`, i.e. genai-prices).
        public_key: Langfuse public key (default ``$LANGFUSE_PUBLIC_KEY``).
        secret_key: Langfuse secret key (default ``$LANGFUSE_SECRET_KEY``).
        base_url: Langfuse URL (default ``$LANGFUSE_BASE_URL``/``$LANGFUSE_HOST`` or cloud).
        flush_interval: Seconds between span exports.
        **client_options: Passed to ``langfuse.Langfuse`` (``environment``, ``release``,
            ``span_exporter``...). The first call for a public key configures its client.

    Returns:
        *config* (copied) with the Langfuse handler in ``callbacks`` and the trace attributes
        in ``metadata``; pass it to ``invoke``/``stream``/``ainvoke``.

    Raises:
        UserError: No thread id.

    Example:
        ```python
        from harness_nodes import langfuse_callbacks

        config = langfuse_callbacks("thread-1", task_type="support")  # no keys: a no-op
        assert config["configurable"]["thread_id"] == "thread-1"
        assert config["metadata"]["langfuse_session_id"] == "thread-1"
        ```
    """
    if isinstance(config_or_thread_id, str):
        config: RunnableConfig = {"configurable": {"thread_id": config_or_thread_id}}
    else:
        config = config_or_thread_id
    thread_id = (config.get("configurable") or {}).get("thread_id")
    if not thread_id:
        raise UserError(
            "langfuse_callbacks needs a thread id: pass it, or a config with "
            "{'configurable': {'thread_id': ...}}"
        )
    thread_id = str(thread_id)
    metadata: dict[str, Any] = {"harness_task_id": task_id or thread_id}
    if task_type:
        metadata["harness_task_type"] = task_type
    metadata.update(_trace_attributes(thread_id, metadata))
    if envelope is not None:
        metadata["harness_envelope"] = Masker(sensitive_fields, secrets)(data=dict(envelope))
    handler = _make_handler(
        thread_id,
        sensitive_fields=sensitive_fields,
        secrets=secrets,
        pricing=pricing,
        public_key=public_key,
        secret_key=secret_key,
        base_url=base_url,
        flush_interval=flush_interval,
        client_options=client_options,
    )
    if handler is None:
        return merge_configs(config, {"metadata": metadata})
    return merge_configs(config, {"callbacks": [handler], "metadata": metadata})


def langfuse_handler(
    *,
    sensitive_fields: Sequence[str] = (),
    secrets: Sequence[str] = (),
    pricing: Pricing | None = None,
    public_key: str | None = None,
    secret_key: str | None = None,
    base_url: str | None = None,
    flush_interval: float = 1.0,
    **client_options: Any,
) -> BaseCallbackHandler | None:
    """One Langfuse handler for every task of a graph, a `TaskRunner` or a `ReviewQueue`.

    Where `langfuse_callbacks` builds the config of one task, this handler serves them all:
    each root run's trace id is seeded from *its* thread id (and the session id is the
    thread id, the tag its ``harness_task_type``), so a runner's workers and a review
    queue's resumes land in each task's one trace. Attach it once:
    ``TaskRunner(..., config={"callbacks": [handler]})`` or
    ``graph.with_config(callbacks=[handler])``. Same masking, pricing and decision
    observations as `langfuse_callbacks`; None (with a one-line notice) without keys.

    Example:
        ```python
        from harness_nodes import langfuse_handler

        assert langfuse_handler() is None  # no Langfuse keys here: tracing is off
        ```
    """
    handler: BaseCallbackHandler | None = _make_handler(
        None,
        sensitive_fields=sensitive_fields,
        secrets=secrets,
        pricing=pricing,
        public_key=public_key,
        secret_key=secret_key,
        base_url=base_url,
        flush_interval=flush_interval,
        client_options=client_options,
    )
    return handler


def _trace_attributes(thread_id: str, metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Langfuse's trace attributes for a task: session = thread, tag = task type."""
    attrs: dict[str, Any] = {"langfuse_session_id": thread_id}
    task_type = metadata.get("harness_task_type")
    if task_type:
        attrs["langfuse_tags"] = [str(task_type)]
    return attrs


def _make_handler(
    thread_id: str | None,
    *,
    sensitive_fields: Sequence[str],
    secrets: Sequence[str],
    pricing: Pricing | None,
    public_key: str | None,
    secret_key: str | None,
    base_url: str | None,
    flush_interval: float,
    client_options: Mapping[str, Any],
) -> Any:
    global _HANDLER, _NOTICE_SHOWN
    public_key = public_key or os.environ.get("LANGFUSE_PUBLIC_KEY")
    secret_key = secret_key or os.environ.get("LANGFUSE_SECRET_KEY")
    if not public_key or not secret_key:
        if not _NOTICE_SHOWN:
            _NOTICE_SHOWN = True
            logger.warning(
                "Langfuse tracing is off (no LANGFUSE_PUBLIC_KEY/LANGFUSE_SECRET_KEY); "
                "`harness show THREAD` still rebuilds traces locally."
            )
        return None

    from langfuse import Langfuse

    masker = _MASKERS.get(public_key)
    if masker is None:
        masker = _MASKERS[public_key] = Masker(sensitive_fields, secrets)
    else:
        masker.extend(sensitive_fields, secrets)
    Langfuse(
        public_key=public_key,
        secret_key=secret_key,
        base_url=base_url,
        flush_interval=flush_interval,
        mask=masker,
        **client_options,
    )
    if _HANDLER is None:
        _HANDLER = _handler_class()
    return _HANDLER(public_key=public_key, thread_id=thread_id, pricing=pricing, masker=masker)
