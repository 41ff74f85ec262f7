"""Langfuse wiring: one trace per task, harness decisions as first-class Langfuse data.

Measured with langfuse 5.0.4 and langgraph 1.2.24: every interrupt/resume leg becomes its
own trace by default (the SDK's resume stitching is in-memory, per process, and never fires
for LangGraph's resume); seeding the trace id from the thread id and passing it as
``trace_context`` keeps every leg — in any process, after any crash — in one trace. Fake and
self-hosted chat models carry no model name Langfuse can price, so the handler sets the model
and ``cost_details`` on each generation from the harness's own pricing.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import fields as dataclass_fields
from dataclasses import is_dataclass
from typing import Any, cast
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, LLMResult
from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import merge_configs
from langgraph.types import Command
from pydantic import BaseModel

from harness_nodes._events import EVENT_PREFIX
from harness_nodes._otel_span import SpanWriter, WholeSpan
from harness_nodes._pricing import answer_cost
from harness_nodes.budget import _ends_on_budget, _maybe_billed
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
_SECRET_HINTS = (
    "sk-",
    "pk-lf-",
    "akia",
    "ghp_",
    "gho_",
    "ghu_",
    "ghs_",
    "ghr_",
    "xox",
    "aiza",
    "bearer",
)
"""What each of `_SECRET_PATTERNS` starts with, lowercased."""
SENSITIVE_FIELDS_KEY = "harness_sensitive_fields"
"""Run metadata naming the fields a run marked sensitive (comma-separated; LangGraph copies it
into each checkpoint's metadata, so local traces mask them too). Names only: never a secret."""
_ENV_SECRET_NAME = re.compile(r"(API_KEY|SECRET|TOKEN|PASSWORD)", re.IGNORECASE)


class Masker:
    """Masks secrets in anything about to be written to a trace.

    Values under sensitive keys (API keys, passwords, tokens, plus the fields you mark; also
    longer names ending in one: ``openai_api_key``, ``x-api-key``) are replaced whole;
    API-key-shaped strings, the literal values of secret environment variables and the
    *secrets* you give (4 characters or more) are replaced wherever they appear in text.
    Messages, pydantic models, dataclasses, sets, bytes and other objects are turned into the
    plain data Langfuse would write first, so what is inside them is masked too; what is
    nested more than 64 levels deep is not sent.

    Example:
        ```python
        from harness_nodes import Masker

        mask = Masker(sensitive_fields=["card_number"])
        out = mask(data={"card_number": "4111", "note": "key sk-abcdefghijklmnop1234"})
        assert out == {"card_number": "***", "note": "key ***"}
        ```
    """

    def __init__(self, sensitive_fields: Sequence[str] = (), secrets: Sequence[str] = ()) -> None:
        self.fields = DEFAULT_SENSITIVE_FIELDS | {_field(f) for f in sensitive_fields}
        env_values = [
            v for k, v in os.environ.items() if _ENV_SECRET_NAME.search(k) and len(v) >= 8
        ]
        literals = sorted({*_checked(secrets), *env_values}, key=len, reverse=True)
        self._literals = [s for s in literals if s]
        self._compile()

    def extend(self, sensitive_fields: Sequence[str] = (), secrets: Sequence[str] = ()) -> None:
        """Also mask these fields and literal values from now on."""
        fields = self.fields | {_field(f) for f in sensitive_fields}
        merged = {*self._literals, *_checked(secrets)}
        if fields == self.fields and len(merged) == len(self._literals):
            return  # nothing new: what is remembered stays valid (one call per task)
        self.fields = fields
        self._literals = sorted(merged, key=len, reverse=True)
        self._compile()

    def _compile(self) -> None:
        # One pass per string: literal secrets and key-shaped values, then `key: value` /
        # `key=value` pairs inside text (reprs, error messages, tool input strings).
        literals = "|".join(re.escape(s) for s in self._literals)
        self._any = re.compile(
            f"{literals}|{_SECRET_PATTERNS.pattern}" if literals else _SECRET_PATTERNS.pattern
        )
        names = "|".join(
            re.escape(f).replace("_", "[_-]") for f in sorted(self.fields, key=len, reverse=True)
        )
        # A name, or a longer one ending in it (OPENAI_API_KEY, x-api-key, db_password).
        self._kv = re.compile(
            rf"""(?i)(["']?)\b((?:[\w-]*[_-])?(?:{names}))\1(\s*[:=]\s*)"""
            r"""("[^"]*"|'[^']*'|[^\s,;}\])]+)"""
        )
        # What an ASCII string must hold (lowercased, "-" as "_") for either pattern to match
        # it (IGNORECASE folds only ASCII there): a secret's prefix or a literal secret, or a
        # field name followed by `:` or `=`, maybe after a quote and spaces (searched in the
        # reversed text: from the rare `:`/`=`). A string holding none skips both scans.
        hints = {*map(_folded, _SECRET_HINTS), *map(_folded, self._literals)}
        self._hints = re.compile("|".join(map(re.escape, sorted(hints, key=len, reverse=True))))
        folded = sorted({_folded(f)[::-1] for f in self.fields}, key=len, reverse=True)
        self._names_reversed = (
            re.compile(r"""[:=]\s*["']?(?:""" + "|".join(map(re.escape, folded)) + ")")
            if all(f.isascii() for f in self.fields)
            else None
        )
        self._sensitive: dict[Any, bool] = {}  # key → masked whole? (keys repeat a lot)
        # Strings shorter than this hold no secret (API keys are longer; a shorter literal
        # secret lowers it).
        self._short = min([8, *(len(s) for s in self._literals)])
        self._dump = _json_encoder(self._json_default)
        self._messages: dict[tuple[int, str], tuple[Any, Any, Any, _Masked]] = {}
        self._metadata: dict[tuple[Any, type, Any], dict[str, Any]] = {}

    def __call__(self, *, data: Any, **_: Any) -> Any:
        """Langfuse's ``mask`` signature: return *data* with its secrets masked."""
        if type(data) is _Prepared:
            return data  # masked and encoded by `_prepare` already
        return self._mask(data, 0)

    def _prepare(self, data: Any, chat: bool = False) -> str | None:
        """Mask *data* and encode it as JSON in one pass, for a Langfuse attribute.

        The SDK writes a string attribute as is, so a prepared payload skips its own walks
        (media scan, mask, serialiser). None when *data* does not encode as plain JSON or
        holds a base64 data URI (the SDK's media upload handles those). *chat*: messages in
        the chat form a generation's prompt has, remembered once for both.
        """
        try:
            # A string is written as is (the SDK's serialiser leaves strings unencoded).
            if type(data) is str:
                text = self.text(data)
            else:
                text = self._encode(self._mask(data, 0, chat), 0)
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
                text = data.json = self._dump(data)
            return text
        if depth < 2:
            if kind is list and any(type(v) is _Masked or type(v) is list for v in data):
                return "[" + ", ".join([self._encode(v, depth + 1) for v in data]) + "]"
            if (
                kind is dict
                and any(type(v) is _Masked or type(v) is list for v in data.values())
                and all(type(k) is str for k in data)
            ):
                # Entries holding remembered messages are joined in; the runs of other
                # entries between them are one C call each (its text without the braces).
                dump = self._dump
                parts: list[str] = []
                plain: dict[str, Any] = {}
                for k, v in data.items():
                    if type(v) is _Masked or (
                        type(v) is list and any(type(x) is _Masked or type(x) is list for x in v)
                    ):
                        if plain:
                            parts.append(dump(plain)[1:-1])
                            plain = {}
                        parts.append(f"{dump(k)}: {self._encode(v, depth + 1)}")
                    else:
                        plain[k] = v
                if plain:
                    parts.append(dump(plain)[1:-1])
                return "{" + ", ".join(parts) + "}"
        return self._dump(data)

    def _suspect(self, text: str) -> bool:
        """Whether ASCII *text* may hold something to mask (see `_compile`)."""
        folded = _folded(text)
        if self._hints.search(folded):
            return True
        return self._names_reversed.search(folded[::-1]) is not None  # type: ignore[union-attr]

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
                    hit = self._metadata[cache_key] = self._plain_metadata(key, value, flatten)
                out.update(hit)
            else:
                out.update(flatten(self._mask({key: value}, 0), "observation"))
        return out

    def _plain_metadata(
        self, key: Any, value: Any, flatten: Callable[[Any, str], dict[str, Any]]
    ) -> dict[str, Any]:
        """One plain metadata value's attribute: the text Langfuse's serialiser gives it."""
        kind = type(value)
        if type(key) is str and value is not None and (kind is not int or abs(value) <= _SAFE_INT):
            if self._is_sensitive(key):
                value = MASK
            elif kind is str:
                value = self.text(value)
            text = (
                json.dumps(value, ensure_ascii=False)
                if type(value) is str
                else (("true" if value else "false") if kind is bool else str(value))
            )
            return {f"langfuse.observation.metadata.{key}": text}
        return flatten(self._mask({key: value}, 0), "observation")

    def _json_default(self, obj: Any) -> Any:
        # What Langfuse's serialiser makes of anything else (datetimes, UUIDs, enums...).
        from langfuse._utils.serializer import EventSerializer

        converted = EventSerializer().default(obj)
        if converted is obj:
            return f"<{type(obj).__name__}>"
        return self._mask(converted, 0)

    def text(self, value: str) -> str:
        """Mask secrets inside one string."""
        if len(value) < self._short:
            return value
        if value.isascii() and self._names_reversed is not None and not self._suspect(value):
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
            name = _field(str(key))
            # The name itself, or a longer one ending in it: openai_api_key, x-api-key.
            hit = name in self.fields or any(name.endswith("_" + f) for f in self.fields)
            self._sensitive[key] = hit
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

    def _mask(self, data: Any, depth: int, chat: bool = False) -> Any:
        # chat: messages in LangChain's chat form (`_chat_message`) instead of their dump.
        kind = type(data)
        if kind is str:
            return self.text(data) if len(data) >= self._short else data
        if data is None or kind is int or kind is float or kind is bool or kind is _Masked:
            return data
        if depth > 64:
            return _TOO_DEEP  # nothing below is looked at, so nothing below is sent
        if kind is dict:
            return self._mask_items(data, depth, chat)
        if kind is list or kind is tuple:
            return [
                (self.text(v) if len(v) >= self._short else v)
                if type(v) is str
                else v
                if v is None or type(v) is int or type(v) is float
                else self._mask(v, depth + 1, chat)
                for v in data
            ]
        if isinstance(data, BaseMessage):
            if chat:
                return self._message(data, "prompt", _chat_message)
            return self._message(data, "dump", _model_dump)
        if isinstance(data, Mapping):
            return self._mask_items(data, depth, chat)
        if isinstance(data, str):
            return self.text(data)
        if isinstance(data, int | float | bool):
            return data
        if isinstance(data, list | tuple):
            return [self._mask(v, depth + 1, chat) for v in data]
        if isinstance(data, BaseModel):
            return self._mask(data.model_dump(), depth + 1, chat)
        if is_dataclass(data) and not isinstance(data, type):
            # Its fields, as `dataclasses.asdict` reads them: `vars()` misses a slots
            # dataclass's (LangGraph's Command showed as {}).
            fields = {f.name: getattr(data, f.name) for f in dataclass_fields(data)}
            return self._mask(fields, depth + 1, chat)
        if isinstance(data, set | frozenset):
            return [self._mask(v, depth + 1, chat) for v in data]  # a list in JSON
        if isinstance(data, bytes | bytearray):
            try:
                return self.text(bytes(data).decode("utf-8"))
            except UnicodeDecodeError:
                return "<not serializable bytes>"  # as Langfuse's serialiser writes them
        # Anything else in the plain form Langfuse's serialiser would write, masked: an
        # object's attributes, an enum's value...
        from langfuse._utils.serializer import EventSerializer

        converted = EventSerializer().default(data)
        if converted is data or type(converted) is type(data):
            return data
        return self._mask(converted, depth + 1, chat)

    def _mask_items(self, data: Mapping[Any, Any], depth: int, chat: bool) -> dict[Any, Any]:
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
                out[k] = self.text(v) if len(v) >= self._short else v
            elif v is None or vkind is int or vkind is bool or vkind is float:
                out[k] = v
            else:
                out[k] = self._mask(v, depth + 1, chat)
        return out


_TOO_DEEP = "<nested too deep to show>"


def marked_fields(metadata: Iterable[Mapping[str, Any] | None]) -> list[str]:
    """The fields a run marked sensitive, read from its checkpoints' *metadata*."""
    return sorted(
        {
            f
            for m in metadata
            for f in str((m or {}).get(SENSITIVE_FIELDS_KEY) or "").split(",")
            if f
        }
    )


def carry_marks(config: RunnableConfig, metadata: Mapping[str, Any] | None) -> RunnableConfig:
    """*config* carrying the fields a run marked sensitive, read from its newest *metadata*.

    Every resume of a run (a review queue's, a task runner's) builds its config with it:
    LangGraph writes a run's config metadata into its own checkpoints only, so a resume
    without the marks would leave a later pause unmarked where only the newest checkpoint is
    read (the review lists, the inbox's item page). A *config* that marks fields itself is
    left as it is.

    Args:
        config: The config the run is resumed with.
        metadata: The metadata of the run's newest checkpoint (None: it has none).
    """
    if marked_fields([config.get("metadata")]):
        return config
    marked = marked_fields([metadata])
    if not marked:
        return config
    carried: dict[str, Any] = dict(config)
    fields = ",".join(marked)
    carried["metadata"] = {**dict(config.get("metadata") or {}), SENSITIVE_FIELDS_KEY: fields}
    return cast(RunnableConfig, carried)


def _field(name: str) -> str:
    """A key as sensitive fields are compared: lowercased, ``-`` as ``_``."""
    return name.lower().replace("-", "_")


def _checked(secrets: Sequence[str]) -> list[str]:
    short = [s for s in secrets if s and len(s) < 4]
    if short:
        raise UserError(
            f"{len(short)} secret(s) shorter than 4 characters: masking them would mask "
            "ordinary text (give the whole value)"
        )
    return [s for s in secrets if s]


def _folded(text: str) -> str:
    """*text* as the masking hints are compared: lowercased, ``-`` as ``_``."""
    return text.lower().replace("-", "_")


def _json_encoder(default: Callable[[Any], Any]) -> Callable[[Any], str]:
    """``json.dumps(data, default=default, allow_nan=False)``, its C encoder built once.

    ``JSONEncoder.encode`` builds a C encoder on every call; payloads are many and small.
    No circular check: a cycle ends in ``RecursionError``, which `Masker._prepare` handles.
    """
    import json.encoder as json_encoder

    make = getattr(json_encoder, "c_make_encoder", None)
    quote: Callable[[str], str] | None = getattr(json_encoder, "c_encode_basestring_ascii", None)
    if make is None or quote is None:  # no C accelerator
        return json.JSONEncoder(default=default, allow_nan=False).encode
    encode = make(None, default, quote, None, ": ", ", ", False, False, False)

    def dump(data: Any) -> str:
        if type(data) is str:
            return quote(data)
        return "".join(encode(data, 0))

    return dump


def _mask_pair(m: re.Match[str]) -> str:
    return f"{m[1]}{m[2]}{m[1]}{m[3]}{MASK}"


def _model_dump(msg: Any) -> Any:
    return msg.model_dump()


def _chat_message(msg: Any) -> Any:
    """A message as a generation's prompt shows it (role, content, tool calls...)."""
    try:
        return _sdk().convert_message(msg)
    except ValueError:  # a message type the chat form does not know
        return msg.model_dump()


class _Masked(dict[str, Any]):
    """Plain data `Masker` has masked already (a message, remembered): not walked again."""

    __slots__ = ("json",)
    json: str | None
    """Its JSON encoding, once a payload holding it was prepared."""


class _Prepared(str):
    """A payload `Masker._prepare` masked and JSON-encoded: Langfuse writes it unchanged."""

    __slots__ = ()


_SDK: Any = None


def _sdk() -> Any:
    """The Langfuse SDK and OpenTelemetry pieces the handler uses (imported once, on first use).

    Checked against langfuse 5.0.4: the handler writes the attributes the SDK's own wrappers
    write (``tests/harness_nodes/test_tracing_langfuse.py`` compares them key by key), and an
    SDK upgrade must re-run those tests.
    """
    global _SDK
    if _SDK is None:
        from types import SimpleNamespace

        from langfuse import propagate_attributes
        from langfuse._client.attributes import (
            LangfuseOtelSpanAttributes,
            _flatten_and_serialize_metadata,
            _serialize,
        )
        from langfuse._client.constants import (
            ObservationTypeGenerationLike,
            get_observation_types_list,
        )
        from langfuse._client.propagation import (
            _detach_context_token_safely,
            _get_propagated_attributes_from_context,
        )
        from langfuse._client.span import (
            _reserved_attribute_keys,
            _set_span_attributes_within_limit,
        )
        from langfuse.langchain.CallbackHandler import (
            CONTROL_FLOW_EXCEPTION_TYPES,
            LANGSMITH_TAG_HIDDEN,
            _parse_model,
            _parse_model_name_from_metadata,
            _parse_usage,
        )
        from langfuse.langchain.CallbackHandler import (
            LangchainCallbackHandler as SdkHandler,
        )
        from langfuse.langchain.utils import _extract_model_name, _normalize_tool_definition
        from opentelemetry import context as otel_context
        from opentelemetry.trace import Status, StatusCode, set_span_in_context

        attrs = LangfuseOtelSpanAttributes
        reserved: dict[str, tuple[str, ...]] = {}

        def reserved_keys(as_type: str) -> tuple[str, ...]:
            keys = reserved.get(as_type)
            if keys is None:
                keys = reserved[as_type] = _reserved_attribute_keys(as_type)
            return keys

        def convert_message(message: BaseMessage) -> dict[str, Any]:
            # The SDK's prompt format ({"role", "content", "tool_calls"...}); the method
            # reads nothing from its instance.
            converted: dict[str, Any] = SdkHandler._convert_message_to_dict(
                None,  # type: ignore[arg-type]
                message,
            )
            return converted

        def model_parameters(invocation: Mapping[str, Any]) -> dict[str, Any]:
            parsed: dict[str, Any] = SdkHandler._parse_model_parameters(
                {"invocation_params": dict(invocation)}
            )
            return parsed

        _SDK = SimpleNamespace(
            propagate_attributes=propagate_attributes,
            model_parameters=model_parameters,
            flatten_metadata=_flatten_and_serialize_metadata,
            serialize=_serialize,
            generation_like=frozenset(get_observation_types_list(ObservationTypeGenerationLike)),
            detach=_detach_context_token_safely,
            propagated=_get_propagated_attributes_from_context,
            current_context=otel_context.get_current,
            attach=otel_context.attach,
            set_within_limit=_set_span_attributes_within_limit,
            reserved=reserved_keys,
            control_flow=tuple(CONTROL_FLOW_EXCEPTION_TYPES),
            hidden_tag=LANGSMITH_TAG_HIDDEN,
            parse_model=_parse_model,
            parse_usage=_parse_usage,
            model_from_metadata=_parse_model_name_from_metadata,
            extract_model_name=_extract_model_name,
            normalize_tool=_normalize_tool_definition,
            convert_message=convert_message,
            set_span_in_context=set_span_in_context,
            Status=Status,
            StatusCode=StatusCode,
            TYPE=attrs.OBSERVATION_TYPE,
            LEVEL=attrs.OBSERVATION_LEVEL,
            STATUS_MESSAGE=attrs.OBSERVATION_STATUS_MESSAGE,
            INPUT=attrs.OBSERVATION_INPUT,
            OUTPUT=attrs.OBSERVATION_OUTPUT,
            MODEL=attrs.OBSERVATION_MODEL,
            MODEL_PARAMETERS=attrs.OBSERVATION_MODEL_PARAMETERS,
            USAGE=attrs.OBSERVATION_USAGE_DETAILS,
            COST=attrs.OBSERVATION_COST_DETAILS,
            COMPLETION_START=attrs.OBSERVATION_COMPLETION_START_TIME,
            PROMPT_NAME=attrs.OBSERVATION_PROMPT_NAME,
            PROMPT_VERSION=attrs.OBSERVATION_PROMPT_VERSION,
            ENVIRONMENT=attrs.ENVIRONMENT,
            RELEASE=attrs.RELEASE,
            AS_ROOT=attrs.AS_ROOT,
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


class _Leg:
    """One root run, i.e. one leg of a task: its trace, metadata and propagated attributes."""

    __slots__ = ("trace_id", "metadata", "propagation", "context", "attributes")

    def __init__(self, trace_id: str | None, metadata: Mapping[str, Any] | None) -> None:
        self.trace_id = trace_id
        self.metadata = metadata
        self.propagation: Any = None
        # When the application propagates nothing itself: the context the leg started in
        # and the trace attributes propagated on top of it, written on each span at its
        # start (Langfuse's span processor would copy them onto it one by one).
        self.context: Any = None
        self.attributes: Mapping[str, Any] = {}


class _Obs:
    """An exported run: its OpenTelemetry span, observation type, leg and context token."""

    __slots__ = ("span", "kind", "leg", "token", "context", "parent")

    def __init__(
        self, span: Any, kind: str, leg: _Leg, token: Any, context: Any, parent: _Obs | None
    ) -> None:
        self.span = span
        self.kind = kind
        self.leg = leg
        self.token = token
        self.context = context  # its children's parent context
        self.parent = parent  # the observation it is under (None for a leg's root)


class HarnessLangfuseHandler(BaseCallbackHandler):
    """LangChain callbacks → Langfuse observations: one trace per task, decisions included.

    Writes through the Langfuse client's own OpenTelemetry tracer (its span processor, export,
    project scoping and propagated trace attributes), with the attribute names and encodings
    of the SDK's wrappers, in one attribute write per start and per end. The SDK's LangChain
    ``CallbackHandler`` builds a wrapper object and walks each payload three times per call
    (media scan, mask, serialiser); here each payload is masked and encoded once, by `Masker`,
    and remembered per message. Payloads holding media, or not plain JSON, take the SDK's
    media upload and serialiser. Built by `langfuse_callbacks` / `langfuse_handler`.
    """

    run_inline = True  # keep the run tree in order under async graphs (no thread hops)

    def __init__(
        self,
        *,
        public_key: str,
        thread_id: str | None,
        pricing: Pricing | None,
        masker: Masker,
    ) -> None:
        from langfuse import get_client

        # With a thread id: one task's handler. Without: one handler for every task of a
        # graph, runner or review queue — each root run's trace id comes from its thread.
        self.thread_id = thread_id
        self.trace_id = trace_id_for(thread_id) if thread_id else None
        self.last_trace_id: str | None = None
        """The trace of the last root run started (as the SDK's handler has it)."""
        self._client = get_client(public_key=public_key)
        self._tracer = self._client._otel_tracer
        self._spans = SpanWriter(self._tracer)
        self._pricing = pricing
        self._masker = masker
        # Payloads are masked and encoded once, by us, when the client masks with our
        # Masker (its mask then passes them through); otherwise the SDK's path.
        _ensure_masked(self._client, masker)
        self._prepares = getattr(self._client, "_mask", None) is masker
        self._sdk = sdk = _sdk()
        self._obs: dict[UUID, _Obs] = {}
        # Plumbing chains that get no observation, each mapped to its nearest exported
        # ancestor: their children (and the events they emit) attach there instead.
        self._skipped: dict[UUID, UUID | None] = {}
        self._prompts: dict[UUID, Any] = {}  # Langfuse prompts to link to a generation
        self._streamed: set[UUID] = set()  # generations whose first token was recorded
        # A budgeted call's reservation (its ``budget.reserve`` event), by the run it was
        # emitted under until its generation starts, then by the generation: the cost a
        # failed call keeps in the ledger (`_failed_cost`).
        self._reserved: dict[UUID, list[dict[str, Any]]] = {}
        self._worst: dict[UUID, dict[str, Any]] = {}
        self._costs: dict[
            tuple[str, tuple[tuple[str, Any], ...]], Any
        ] = {}  # (model, usage) → priced
        self._common: dict[str, Any] = {}  # environment and release, on every observation
        if self._client._environment is not None:
            self._common[sdk.ENVIRONMENT] = self._client._environment
        if self._client._release is not None:
            self._common[sdk.RELEASE] = self._client._release

    # --- observations ------------------------------------------------------------------
    def _parent(self, parent_run_id: UUID | None) -> _Obs | None:
        if parent_run_id is None:
            return None
        return self._obs.get(self._skipped.get(parent_run_id, parent_run_id))  # type: ignore[arg-type]

    def _open(
        self,
        run_id: UUID,
        parent: _Obs | None,
        name: str,
        kind: str,
        attributes: dict[str, Any],
        *,
        root_metadata: Mapping[str, Any] | None = None,
        root_tags: Sequence[str] | None = None,
        propagate: bool = False,
        trace_metadata: Mapping[str, Any] | None = None,
    ) -> Any:
        """Start the observation of *run_id* with its attributes in one write."""
        sdk = self._sdk
        attributes[sdk.TYPE] = kind
        attributes.update(self._common)
        remote = None
        if parent is not None:
            leg = parent.leg
            context = parent.context
        else:
            leg, remote = self._leg(root_metadata, trace_metadata, root_tags, propagate)
            context = (
                sdk.set_span_in_context(remote, leg.context) if remote is not None else leg.context
            )
        if leg.attributes:
            attributes.update(leg.attributes)
        if len(attributes) <= 48:  # far below OpenTelemetry's default limit of 128
            span = self._spans.start(name, context, attributes, propagated=leg.context is None)
        else:
            span = self._spans.start(name, context, {}, propagated=leg.context is None)
            sdk.set_within_limit(span, attributes, sdk.reserved(kind))
        if attributes.get(sdk.LEVEL) == "ERROR":
            _error_status(sdk, span, attributes.get(sdk.STATUS_MESSAGE))
        if parent is None:
            if remote is not None:
                sdk.set_within_limit(span, {sdk.AS_ROOT: True})
            if leg.trace_id is None:
                leg.trace_id = format(span.get_span_context().trace_id, "032x")
            self.last_trace_id = leg.trace_id
        own = sdk.set_span_in_context(span, leg.context)
        # Current while the run runs: spans the application creates inside nest under it.
        token = sdk.attach(own if leg.context is None else sdk.set_span_in_context(span))
        self._obs[run_id] = _Obs(span, kind, leg, token, own, parent)
        return span

    def _leg(
        self,
        metadata: Mapping[str, Any] | None,
        trace_metadata: Mapping[str, Any] | None,
        tags: Sequence[str] | None,
        propagate: bool,
    ) -> tuple[_Leg, Any]:
        """A new root run: its trace (seeded from the thread) and its trace attributes.

        *metadata* is the run's own (its children carry copies of it); *trace_metadata*, the
        masked metadata the trace attributes come from.
        """
        sdk = self._sdk
        trace_id = self.trace_id
        if trace_id is None and metadata and metadata.get("thread_id"):
            trace_id = trace_id_for(str(metadata["thread_id"]))
        leg = _Leg(trace_id, metadata)
        if propagate:
            outer = sdk.current_context()
            trace = _parse_trace_attributes(trace_metadata, tags)
            manager = sdk.propagate_attributes(
                user_id=trace.get("user_id"),
                session_id=trace.get("session_id"),
                tags=trace.get("tags"),
                metadata=trace.get("metadata"),
                trace_name=trace.get("trace_name"),
            )
            manager.__enter__()
            leg.propagation = manager
            if not sdk.propagated(outer):
                leg.context = outer
                leg.attributes = sdk.propagated(sdk.current_context())
        remote = None
        if trace_id is not None:
            remote = self._client._create_remote_parent_span(trace_id=trace_id, parent_span_id=None)
        return leg, remote

    def _close(
        self, run_id: UUID, attributes: dict[str, Any], *, root: bool = False
    ) -> _Obs | None:
        """End the observation of *run_id*, writing *attributes* first."""
        obs = self._obs.pop(run_id, None)
        if obs is None:
            return None
        sdk = self._sdk
        sdk.detach(obs.token)
        span = obs.span
        if attributes:
            _write(sdk, span, attributes, obs.kind)
            if attributes.get(sdk.LEVEL) == "ERROR":
                _error_status(sdk, span, attributes.get(sdk.STATUS_MESSAGE))
        if root and obs.leg.propagation is not None:
            manager, obs.leg.propagation = obs.leg.propagation, None
            try:
                manager.__exit__(None, None, None)
            except Exception:  # a context exited in another context: nothing to restore
                logger.debug("could not exit Langfuse's attribute propagation", exc_info=True)
        span.end()
        return obs

    def _payload(self, data: Any, field: str, span: Any, chat: bool = False) -> str | None:
        """*data* masked and JSON-encoded for the ``input``/``output`` attribute."""
        if data is None:
            return None
        if self._prepares:
            prepared = self._masker._prepare(data, chat)
            if prepared is not None:
                return prepared
        return self._sdk_payload(data, field, span)

    def _sdk_payload(self, data: Any, field: str, span: Any) -> str | None:
        """The SDK's path: media uploaded and referenced, the client's mask, its serialiser."""
        client = self._client
        if client._resources is not None:
            context = span.get_span_context()
            data = client._resources._media_manager._find_and_process_media(
                data=data,
                field=field,
                trace_id=format(context.trace_id, "032x"),
                observation_id=format(context.span_id, "016x"),
            )
        if client._mask:
            try:
                data = client._mask(data=data)
            except Exception:
                logger.exception("the Langfuse client's mask failed: the %s is withheld", field)
                return "<fully masked due to failed mask function>"
        serialized: str | None = self._sdk.serialize(data)
        return serialized

    def _metadata(self, metadata: Mapping[str, Any] | None) -> dict[str, Any]:
        """Observation metadata as Langfuse attributes, masked."""
        if not metadata:
            return {}
        flatten = self._sdk.flatten_metadata
        if self._prepares:
            return self._masker._metadata_attributes(dict(metadata), flatten)
        masked = self._client._mask(data=dict(metadata)) if self._client._mask else metadata
        return flatten(masked, "observation")  # type: ignore[no-any-return]

    def _prepared(self, attributes: dict[str, Any], key: str, data: Any, chat: bool = False) -> Any:
        """Write *data*'s prepared payload under *key*; what it returns takes the SDK's path.

        The SDK's path needs the span's ids (media references): it is written after the start.
        """
        if data is None:
            return None
        if self._prepares:
            prepared = self._masker._prepare(data, chat)
            if prepared is not None:
                attributes[key] = prepared
                return None
        return data

    def _write_late(self, span: Any, kind: str, late: Mapping[str, Any]) -> None:
        sdk = self._sdk
        fields = {sdk.INPUT: "input", sdk.OUTPUT: "output"}
        sdk.set_within_limit(
            span,
            {key: self._sdk_payload(value, fields[key], span) for key, value in late.items()},
            sdk.reserved(kind),
        )

    def _start(
        self,
        run_id: UUID,
        parent: _Obs | None,
        name: str,
        kind: str,
        *,
        input: Any,
        metadata: Mapping[str, Any] | None,
        level: str | None = None,
        extra: Mapping[str, Any] | None = None,
        root_metadata: Mapping[str, Any] | None = None,
        root_tags: Sequence[str] | None = None,
        propagate: bool = False,
        trace_metadata: Mapping[str, Any] | None = None,
    ) -> None:
        sdk = self._sdk
        attributes = self._metadata(metadata)
        if level is not None:
            attributes[sdk.LEVEL] = level
        if extra:
            attributes.update(extra)
        late = self._prepared(attributes, sdk.INPUT, input, kind in _CHAINS)
        span = self._open(
            run_id,
            parent,
            name,
            kind,
            attributes,
            root_metadata=root_metadata,
            root_tags=root_tags,
            propagate=propagate,
            trace_metadata=trace_metadata,
        )
        if late is not None:
            self._write_late(span, kind, {sdk.INPUT: late})

    def _end(
        self,
        run_id: UUID,
        output: Any,
        *,
        extra: Mapping[str, Any] | None = None,
        root: bool = False,
    ) -> _Obs | None:
        obs = self._obs.get(run_id)
        if obs is None:
            return None
        sdk = self._sdk
        attributes: dict[str, Any] = dict(extra) if extra else {}
        if output is not None:
            attributes[sdk.OUTPUT] = self._payload(output, "output", obs.span, obs.kind in _CHAINS)
        return self._close(run_id, attributes, root=root)

    def _fail(
        self, run_id: UUID, error: BaseException, *, root: bool = False, answering: bool = False
    ) -> _Obs | None:
        obs = self._obs.get(run_id)
        if obs is None:
            return None
        sdk = self._sdk
        level, message = self._error_level_and_message(error)
        if isinstance(error, _CANCELLATIONS):
            self._close_abandoned(obs, level, message, error)
        attributes: dict[str, Any] = {sdk.LEVEL: level, sdk.STATUS_MESSAGE: message}
        if obs.kind in sdk.generation_like:
            attributes.update(self._failed_cost(run_id, error, answering=answering))
        return self._close(run_id, attributes, root=root)

    def _failed_cost(self, run_id: UUID, error: BaseException, *, answering: bool) -> Any:
        """A failed generation's cost: the worst case its budget kept, else 0.

        A budgeted call that failed after its request went out (cancelled, timed out, its
        answer unreadable, its stream broken: `_maybe_billed`, the budget's own rule) stays
        in the ledger at its reserved worst case; the generation carries that figure, with
        ``harness_cost`` in its metadata saying so, so Langfuse's cost per task is the
        harness's. Else 0, said outright: with no usage Langfuse would infer a cost from the
        prompt.
        """
        sdk = self._sdk
        reserved = self._worst.pop(run_id, None)
        usd = reserved.get("usd") if reserved is not None else None
        reason = _maybe_billed(error, answering=answering) if usd is not None else None
        if reserved is None or reason is None or not isinstance(usd, int | float):
            return {sdk.COST: sdk.serialize({"total": 0})}
        marker = {
            "kept": "reserved worst case",
            "reason": f"{reason} ({type(error).__name__})",
            "input_tokens": reserved.get("input_tokens"),
            "output_tokens": reserved.get("output_tokens"),
        }
        return {
            sdk.COST: sdk.serialize({"total": float(usd)}),
            **self._metadata({"harness_cost": marker}),
        }

    def _close_abandoned(self, obs: _Obs, level: str, message: str, error: BaseException) -> None:
        """End what is still open under *obs*, a run cancelled: it will never report back.

        LangChain calls no handler for a call cut short inside an awaited gather (a model's
        ``ainvoke``) nor for a retriever (it catches ``Exception`` only): left open, such an
        observation was never exported — the node showed no model call — and stayed in the
        handler for good. Only on a cancellation: after an ordinary error a sibling may still
        be running, and reports its own end.
        """
        sdk = self._sdk
        below: list[tuple[UUID, _Obs]] = []
        for run_id, other in self._obs.items():
            above = other.parent
            while above is not None and above is not obs:
                above = above.parent
            if above is obs:
                below.append((run_id, other))
        for run_id, other in reversed(below):  # innermost first: contexts detach in order
            attributes: dict[str, Any] = {sdk.LEVEL: level, sdk.STATUS_MESSAGE: message}
            if other.kind in sdk.generation_like:
                answering = run_id in self._streamed
                attributes.update(self._failed_cost(run_id, error, answering=answering))
            self._streamed.discard(run_id)
            self._close(run_id, attributes)

    def _error_level_and_message(self, error: BaseException) -> tuple[str, str]:
        # LangGraph's control flow (interrupts, handoffs) is not an error. Langfuse does not
        # mask status messages, and an interrupt's message is the repr of its payload (the
        # tool call under review, arguments and all).
        if isinstance(error, self._sdk.control_flow):
            interrupts = error.args[0] if error.args else None
            if isinstance(interrupts, tuple | list) and all(
                hasattr(i, "value") for i in interrupts
            ):
                payload = self._masker(data=[i.value for i in interrupts])
                return "DEFAULT", "interrupted: " + json.dumps(payload, default=str)
            return "DEFAULT", self._masker.text(str(error) or type(error).__name__)
        if isinstance(error, _CANCELLATIONS):
            # The caller stopped reading a stream (or cancelled the task): nothing failed.
            return "WARNING", f"stopped by the caller ({type(error).__name__})"
        return "ERROR", self._masker.text(str(error))

    def _trace_of(self, run_id: UUID) -> str | None:
        obs = self._obs.get(run_id)
        return obs.leg.trace_id if obs is not None else self.trace_id

    # --- chains: graph runs and their nodes --------------------------------------------
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
        try:
            parent = None
            if parent_run_id is not None:
                parent_run_id = self._skipped.get(parent_run_id, parent_run_id)
                if _is_plumbing(serialized, kwargs.get("name"), tags, metadata):
                    self._skipped[run_id] = parent_run_id
                    return
                if self._prompts or (metadata and "langfuse_prompt" in metadata):
                    self._register_prompt(run_id, parent_run_id, metadata)
                parent = self._obs.get(parent_run_id)  # type: ignore[arg-type]
            name = _run_name(serialized, kwargs)
            kind = _chain_kind(serialized, name)
            level = "DEBUG" if tags and self._sdk.hidden_tag in tags else None
            if parent is None:
                traced = dict(metadata or {})
                if self.thread_id is None and traced.get("thread_id"):
                    traced.update(_trace_attributes(str(traced["thread_id"]), traced))
                # The root's metadata becomes trace attributes, which Langfuse does not mask.
                traced = self._masker(data=traced)
                own = _root_metadata(tags, traced)
                if isinstance(inputs, Command):
                    # A resumed leg: Langfuse shows the latest leg's root input as the trace's
                    # input, so the resume value goes in the leg's metadata and the trace keeps
                    # the task's request.
                    own.update(_command_fields(inputs))
                    inputs = None
                self._start(
                    run_id,
                    None,
                    name,
                    kind,
                    input=inputs,
                    metadata=own,
                    level=level,
                    root_metadata=metadata,
                    root_tags=tags,
                    propagate=parent_run_id is None,
                    trace_metadata=traced,
                )
                return
            if metadata and "langgraph_node" in metadata and isinstance(inputs, Mapping):
                inputs = _compact_state(inputs)
            self._start(
                run_id,
                parent,
                name,
                kind,
                input=inputs,
                metadata=self._child_metadata(parent, tags, metadata),
                level=level,
            )
        except Exception:  # never break the run for a trace
            logger.exception("could not start a Langfuse observation")

    def _own(
        self,
        parent: _Obs | None,
        tags: Sequence[str] | None,
        metadata: Mapping[str, Any] | None,
        *,
        keep_trace_attributes: bool = False,
    ) -> dict[str, Any]:
        """A tool's, retriever's or generation's observation metadata (a root's, without parent)."""
        if parent is None:
            return _root_metadata(tags, metadata, keep_trace_attributes=keep_trace_attributes)
        return self._child_metadata(parent, tags, metadata) or {}

    def _child_metadata(
        self, parent: _Obs, tags: Sequence[str] | None, metadata: Mapping[str, Any] | None
    ) -> dict[str, Any] | None:
        # LangChain copies the root's metadata into every child run, and LangGraph adds its
        # bookkeeping: on a child, keep what is about this observation (the node, the step,
        # anything set on the child itself); the rest is on the trace.
        own = _own_metadata(metadata, parent.leg.metadata)
        kept = [t for t in tags or () if not t.startswith(_PLUMBING_TAGS)]
        return _strip_langfuse_keys(_join_tags(kept, own))

    def on_chain_end(
        self,
        outputs: Any,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> Any:
        if self._skipped.pop(run_id, _NOT_SKIPPED) is not _NOT_SKIPPED:
            return
        try:
            if self._prompts:
                self._prompts.pop(run_id, None)
            if parent_run_id is None and isinstance(outputs, Mapping):
                outcome = outputs.get("outcome")
                trace_id = self._trace_of(run_id)
                if not (
                    isinstance(outcome, Mapping)
                    and outcome.get("status")
                    and not _earlier_tasks_outcome(outputs, outcome)
                ):
                    outcome = answered_outcome(outputs)
                if outcome is not None and trace_id:
                    self._score_outcome(outcome, trace_id)
            self._end(run_id, outputs, root=parent_run_id is None)
        except Exception:
            logger.exception("could not end a Langfuse observation")

    def on_chain_error(
        self,
        error: BaseException,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        # A plumbing chain's error (an interrupt raised in a routing function...) reaches the
        # node that ran it, which records it.
        if self._skipped.pop(run_id, _NOT_SKIPPED) is not _NOT_SKIPPED:
            return
        try:
            if self._prompts:
                self._prompts.pop(run_id, None)
            self._fail(run_id, error, root=parent_run_id is None)
        except Exception:
            logger.exception("could not end a Langfuse observation")

    def on_agent_action(self, action: Any, *, run_id: UUID, **kwargs: Any) -> Any:
        self._agent_step(run_id, action, kwargs.get("inputs"))

    def on_agent_finish(self, finish: Any, *, run_id: UUID, **kwargs: Any) -> Any:
        self._agent_step(run_id, finish, kwargs.get("inputs"))

    def _agent_step(self, run_id: UUID, output: Any, inputs: Any) -> None:
        # A LangChain agent's step: its chain becomes an agent observation (as the SDK does).
        obs = self._obs.get(run_id)
        if obs is None:
            return
        try:
            sdk = self._sdk
            obs.kind = "agent"
            attributes = {sdk.TYPE: "agent", sdk.OUTPUT: self._payload(output, "output", obs.span)}
            if inputs is not None:
                attributes[sdk.INPUT] = self._payload(inputs, "input", obs.span)
            sdk.set_within_limit(obs.span, attributes, sdk.reserved("agent"))
        except Exception:
            logger.exception("could not record an agent step in Langfuse")

    # --- generations: the whole prompt; model name and cost from the harness's pricing --
    def on_chat_model_start(
        self,
        serialized: dict[str, Any] | None,
        messages: list[list[BaseMessage]],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        try:
            # The prompt, message by message: each masked once per process.
            convert = self._sdk.convert_message
            if self._prepares:
                remember = self._masker._message
                prompt = [remember(m, "prompt", convert) for batch in messages for m in batch]
            else:
                prompt = [convert(m) for batch in messages for m in batch]
            self._generation(serialized, prompt, run_id, parent_run_id, tags, metadata, kwargs)
        except Exception:
            logger.exception("could not start a Langfuse generation")

    def on_llm_start(
        self,
        serialized: dict[str, Any] | None,
        prompts: list[str],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        try:
            prompt: Any = prompts[0] if len(prompts) == 1 else list(prompts)
            self._generation(serialized, prompt, run_id, parent_run_id, tags, metadata, kwargs)
        except Exception:
            logger.exception("could not start a Langfuse generation")

    def _generation(
        self,
        serialized: dict[str, Any] | None,
        prompt: Any,
        run_id: UUID,
        parent_run_id: UUID | None,
        tags: list[str] | None,
        metadata: dict[str, Any] | None,
        kwargs: dict[str, Any],
    ) -> None:
        sdk = self._sdk
        invocation = kwargs.get("invocation_params") or {}
        tools = invocation.get("tools")
        if tools and isinstance(tools, list) and isinstance(prompt, list):
            prompt = prompt + [
                {"role": "tool", "content": sdk.normalize_tool(tool)} for tool in tools
            ]
        extra: dict[str, Any] = {}
        model = sdk.model_from_metadata(metadata) or _quiet(
            sdk.extract_model_name, serialized, **kwargs
        )
        if model:
            extra[sdk.MODEL] = model
        extra[sdk.MODEL_PARAMETERS] = _flat_json(sdk, sdk.model_parameters(invocation))
        linked = self._take_prompt(parent_run_id) if self._prompts else None
        if linked is not None and not getattr(linked, "is_fallback", True):
            extra[sdk.PROMPT_NAME] = linked.name
            extra[sdk.PROMPT_VERSION] = linked.version
        parent = self._parent(parent_run_id)
        if metadata and metadata.get("harness_budgeted") and parent_run_id is not None:
            # The budget emitted the call's reservation under the run that called it.
            key = self._skipped.get(parent_run_id) or parent_run_id
            pending = self._reserved.get(key)
            if pending:
                if len(self._worst) >= 1024:  # generations that never ended
                    self._worst.clear()
                self._worst[run_id] = pending.pop(0)
                if not pending:
                    del self._reserved[key]
        # a model called on its own keeps its trace attributes
        own = self._own(parent, tags, metadata, keep_trace_attributes=True)
        self._start(
            run_id,
            parent,
            _run_name(serialized, kwargs),
            "generation",
            input=prompt,
            metadata=own,
            extra=extra,
            root_metadata=metadata,
        )

    def on_llm_new_token(self, token: Any, *, run_id: UUID, **kwargs: Any) -> Any:
        obs = self._obs.get(run_id)
        if obs is None or run_id in self._streamed or obs.kind not in self._sdk.generation_like:
            return
        self._streamed.add(run_id)
        from langfuse._utils import _get_timestamp

        sdk = self._sdk
        sdk.set_within_limit(
            obs.span,
            {sdk.COMPLETION_START: sdk.serialize(_get_timestamp())},
            sdk.reserved("generation"),
        )

    def on_llm_end(
        self,
        response: LLMResult,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> Any:
        self._streamed.discard(run_id)
        self._worst.pop(run_id, None)
        obs = self._obs.get(run_id)
        if obs is None:
            return
        try:
            sdk = self._sdk
            last = response.generations[-1][-1]
            output: Any
            if isinstance(last, ChatGeneration):
                message = last.message
                if self._prepares:
                    output = self._masker._message(message, "prompt", sdk.convert_message)
                else:
                    output = sdk.convert_message(message)
            else:
                output = last.text if hasattr(last, "text") else last
            extra: dict[str, Any] = {}
            usage = sdk.parse_usage(response)
            if usage:
                extra[sdk.USAGE] = _flat_json(sdk, usage)
            try:
                priced = self._price_generation(response)
            except Exception:  # never break the run for a trace
                logger.exception("could not price a generation for Langfuse")
                priced = None
            model = sdk.parse_model(response) or (priced or {}).get("model")
            if model:
                extra[sdk.MODEL] = model  # the provider's own name, when it gives one, wins
            if priced and priced.get("cost_details"):
                extra[sdk.COST] = _flat_json(sdk, priced["cost_details"])
            if kwargs.get("inputs") is not None:
                extra[sdk.INPUT] = self._payload(kwargs["inputs"], "input", obs.span)
            self._end(run_id, output, extra=extra)
        except Exception:
            logger.exception("could not end a Langfuse generation")

    def on_llm_error(
        self,
        error: BaseException,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> Any:
        answering = run_id in self._streamed
        self._streamed.discard(run_id)
        try:
            self._fail(run_id, error, answering=answering)
        except Exception:
            logger.exception("could not end a Langfuse generation")

    def _price_generation(self, response: LLMResult) -> dict[str, Any] | None:
        """The generation's model and ``cost_details`` from the harness's pricing."""
        last = response.generations[-1][-1]
        if not isinstance(last, ChatGeneration) or not isinstance(last.message, AIMessage):
            return None
        msg = last.message
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
        usage = msg.usage_metadata
        key = (model, tuple(sorted(_flat_usage(usage))) if usage else ())
        priced = self._costs.get(key, _NOT_PRICED)
        if priced is _NOT_PRICED:
            if len(self._costs) >= 1024:
                self._costs.clear()
            priced = self._costs[key] = answer_cost(self._pricing, model, usage)[2]
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

    def _register_prompt(
        self, run_id: UUID, parent_run_id: UUID | None, metadata: Mapping[str, Any] | None
    ) -> None:
        # A chain carrying a Langfuse prompt links it to the next generation of its parent;
        # a registered prompt not linked yet passes down to the children (as the SDK does).
        if parent_run_id is None:
            return
        prompt = metadata.get("langfuse_prompt") if metadata else None
        if prompt:
            self._prompts[parent_run_id] = prompt
        elif parent_run_id in self._prompts:
            self._prompts[run_id] = self._prompts[parent_run_id]

    def _take_prompt(self, parent_run_id: UUID | None) -> Any:
        if parent_run_id is None:
            return None
        return self._prompts.pop(parent_run_id, None)

    # --- tools and retrievers -------------------------------------------------------------
    def on_tool_start(
        self,
        serialized: dict[str, Any] | None,
        input_str: str,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        inputs: Any = None,
        **kwargs: Any,
    ) -> Any:
        try:
            kwargs.pop("color", None)  # a console colour, not a fact about the call
            parent = self._parent(parent_run_id)
            own = self._own(parent, tags, metadata)
            own.update({k: v for k, v in kwargs.items() if v is not None})
            self._start(
                run_id,
                parent,
                _run_name(serialized, kwargs),
                "tool",
                input=inputs if inputs is not None else input_str,
                metadata=own,
                level="DEBUG" if tags and self._sdk.hidden_tag in tags else None,
                root_metadata=metadata,
            )
        except Exception:
            logger.exception("could not start a Langfuse tool observation")

    def on_tool_end(
        self,
        output: Any,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> Any:
        try:
            sdk = self._sdk
            extra: dict[str, Any] = {}
            if isinstance(output, ToolMessage) and getattr(output, "status", None) == "error":
                content = output.content if isinstance(output.content, str) else str(output.content)
                extra[sdk.LEVEL] = "ERROR"
                extra[sdk.STATUS_MESSAGE] = self._masker.text(content)
            self._end(run_id, output, extra=extra)
        except Exception:
            logger.exception("could not end a Langfuse tool observation")

    def on_tool_error(
        self,
        error: BaseException,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> Any:
        try:
            self._fail(run_id, error)
        except Exception:
            logger.exception("could not end a Langfuse tool observation")

    def on_retriever_start(
        self,
        serialized: dict[str, Any] | None,
        query: str,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        try:
            parent = self._parent(parent_run_id)
            own = self._own(parent, tags, metadata)
            self._start(
                run_id,
                parent,
                _run_name(serialized, kwargs),
                "retriever",
                input=query,
                metadata=own,
                level="DEBUG" if tags and self._sdk.hidden_tag in tags else None,
                root_metadata=metadata,
            )
        except Exception:
            logger.exception("could not start a Langfuse retriever observation")

    def on_retriever_end(self, documents: Any, *, run_id: UUID, **kwargs: Any) -> Any:
        try:
            self._end(run_id, list(documents))
        except Exception:
            logger.exception("could not end a Langfuse retriever observation")

    def on_retriever_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> Any:
        try:
            self._fail(run_id, error)
        except Exception:
            logger.exception("could not end a Langfuse retriever observation")

    # --- harness decisions ---------------------------------------------------------------
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

    def _observe(
        self,
        run_id: UUID,
        trace_id: str,
        *,
        name: str,
        as_type: str,
        input: Any = None,
        output: Any = None,
        metadata: Mapping[str, Any] | None = None,
        level: str | None = None,
        status_message: str | None = None,
    ) -> str:
        """A decision as an observation under *run_id*'s; returns its id (for scores)."""
        sdk = self._sdk
        parent = self._obs.get(run_id)
        attributes = self._metadata(metadata)
        attributes[sdk.TYPE] = as_type
        attributes.update(self._common)
        if level is not None:
            attributes[sdk.LEVEL] = level
        if status_message is not None:
            attributes[sdk.STATUS_MESSAGE] = self._masker.text(status_message)
        if parent is not None:
            context = parent.context
            attributes.update(parent.leg.attributes)
        else:  # outside any traced run of this handler: directly under the task's trace
            remote = self._client._create_remote_parent_span(trace_id=trace_id, parent_span_id=None)
            context = sdk.set_span_in_context(remote)
        late: dict[str, Any] = {}
        for key, value in ((sdk.INPUT, input), (sdk.OUTPUT, output)):
            declined = self._prepared(attributes, key, value)
            if declined is not None:
                late[key] = declined
        # An event has no duration: it starts and ends at the same instant (as the SDK's).
        start = time.time_ns() if as_type == "event" else None
        span = self._spans.start(
            name,
            context,
            attributes,
            propagated=parent is None or parent.leg.context is None,
            start_time=start,
        )
        if late:
            self._write_late(span, as_type, late)
        if level == "ERROR":
            _error_status(sdk, span, attributes.get(sdk.STATUS_MESSAGE))
        span.end(end_time=start)
        return format(span.get_span_context().span_id, "016x")

    def _score_outcome(self, outcome: Mapping[str, Any], trace_id: str) -> None:
        reason = outcome.get("reason")
        self._client.create_score(
            name="outcome",
            value=str(outcome["status"]),
            trace_id=trace_id,
            score_id=_score_id(trace_id, "outcome"),
            data_type="CATEGORICAL",
            comment=self._masker.text(str(reason)) if reason else None,
        )

    def _record(self, kind: str, data: dict[str, Any], run_id: UUID) -> None:
        client = self._client
        trace_id = self._trace_of(run_id)
        if trace_id is None:
            return  # an event outside any traced run
        if kind == "verdict":
            ok = bool(data.get("ok"))
            observation_id = self._observe(
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
                observation_id=observation_id,
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
            if action == "reserve":
                if len(self._reserved) >= 1024:  # reservations whose call never started
                    self._reserved.clear()
                self._reserved.setdefault(run_id, []).append(data)
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
            # Resumed with Command(resume=...) directly: no queue recorded who decided.
            who = f"by {data['reviewer']}" if data.get("reviewer") else "reviewer not recorded"
            observation_id = self._observe(
                run_id,
                trace_id,
                name=f"review {decision} {who}"
                if data.get("reviewer")
                else f"review {decision} ({who})",
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
                observation_id=observation_id,
                score_id=_score_id(trace_id, "review", review_id),
                data_type="CATEGORICAL",
                comment=who,
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


_NOT_SKIPPED: Any = object()
_NOT_PRICED: Any = object()
_CHAINS = frozenset({"chain", "agent"})
"""Observations whose payloads (graph state, node updates) show messages in chat form."""
_CANCELLATIONS = (GeneratorExit, asyncio.CancelledError)
"""A run cut short by its caller (a stream closed early, a task cancelled): not a failure."""
_PLUMBING_TAGS = ("seq:step:", "graph:step:")
"""LangChain/LangGraph bookkeeping tags (a run's position in its sequence or graph)."""
_PLUMBING_METADATA_PREFIXES = ("langgraph_", "ls_", "lc_", "__pregel_")
_KEPT_METADATA = frozenset({"langgraph_node", "langgraph_step"})
_PLUMBING_METADATA = frozenset({"checkpoint_ns", "checkpoint_id", "thread_id"})


def _earlier_tasks_outcome(outputs: Mapping[str, Any], outcome: Mapping[str, Any]) -> bool:
    """An earlier task's stop still in a drop-in graph's state: not this run's outcome."""
    from harness_nodes._verify import earlier_tasks_outcome

    messages = outputs.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, BaseMessage) for m in messages):
        return False
    return earlier_tasks_outcome(messages, outcome)


def answered_outcome(outputs: Mapping[str, Any]) -> dict[str, Any] | None:
    """Outcome ``completed`` of a run that ended on the model's answer, with none of its own.

    `build_harnessed_agent` and the harness middleware write ``completed`` in the state; a
    graph whose own model node ends the task (`add_harness` around the user's nodes, an agent
    with only the effect ledger) writes nothing, yet the task completed all the same: it is
    scored so, by `ModelNode`'s rule (an AI answer with no tool calls that is no harness stop
    note), as `build_trace` counts it. A run paused for review ends on the calls under review.
    """
    from harness_nodes._verify import harness_meta

    messages = outputs.get("messages")
    last = messages[-1] if isinstance(messages, list) and messages else None
    if (
        not isinstance(last, AIMessage)
        or last.tool_calls
        or last.invalid_tool_calls
        or "outcome" in harness_meta(last)
        or _ends_on_budget(last)
    ):
        return None
    return {"status": "completed", "partial_result": last.text}


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
    kept = _KEPT_KEYS
    own = {}
    for k, v in metadata.items():
        keep = kept.get(k)
        if keep is None:
            keep = _keeps(k)
        if keep and not (root is not None and k in root and (root[k] is v or root[k] == v)):
            own[k] = v
    return own or None


_KEPT_KEYS: dict[Any, bool] = {}
"""Metadata key → kept on an observation? (LangGraph's keys repeat on every run.)"""


def _keeps(key: Any) -> bool:
    keep = (
        not isinstance(key, str)
        or key in _KEPT_METADATA
        or not key.startswith(_PLUMBING_METADATA_PREFIXES)
    ) and key not in _PLUMBING_METADATA
    if len(_KEPT_KEYS) < 4096:
        _KEPT_KEYS[key] = keep
    return keep


def _run_name(serialized: Mapping[str, Any] | None, kwargs: Mapping[str, Any]) -> str:
    """A run's name as the SDK gives it: ``name``, then the serialized name or class."""
    name = kwargs.get("name")
    if name is not None:
        return str(name)
    if not serialized:
        return "<unknown>"
    if serialized.get("name") is not None:
        return str(serialized["name"])
    ids = serialized.get("id")
    if isinstance(ids, list) and ids:
        return str(ids[-1])
    return "<unknown>"


def _chain_kind(serialized: Mapping[str, Any] | None, name: str) -> str:
    """``agent`` for a chain whose class path or name says agent (as the SDK), else ``chain``."""
    ids = serialized.get("id") if serialized else None
    if isinstance(ids, list) and any("agent" in str(part).lower() for part in ids):
        return "agent"
    return "agent" if "agent" in name.lower() else "chain"


_LANGFUSE_KEYS = ("langfuse_prompt",)
_LANGFUSE_TRACE_KEYS = (
    "langfuse_session_id",
    "langfuse_user_id",
    "langfuse_tags",
    "langfuse_trace_name",
)


def _join_tags(
    tags: Sequence[str] | None, metadata: Mapping[str, Any] | None
) -> dict[str, Any] | None:
    joined: dict[str, Any] = {"tags": list(tags)} if tags else {}
    if metadata:
        joined.update(metadata)
    return joined or None


def _strip_langfuse_keys(
    metadata: dict[str, Any] | None, keep_trace_attributes: bool = False
) -> dict[str, Any] | None:
    """Observation metadata without Langfuse's control keys (the SDK's rule)."""
    if not metadata:
        return metadata
    for key in _LANGFUSE_KEYS:
        metadata.pop(key, None)
    if not keep_trace_attributes:
        for key in _LANGFUSE_TRACE_KEYS:
            metadata.pop(key, None)
    return metadata


def _command_fields(command: Command[Any]) -> dict[str, Any]:
    """What a `Command` starting a leg carries: ``resume``, ``update``, ``goto`` when set."""
    fields: dict[str, Any] = {}
    if command.resume is not None:
        fields["resume"] = command.resume
    if command.update is not None:
        fields["update"] = command.update
    if command.goto:
        fields["goto"] = command.goto
    return fields


def _root_metadata(
    tags: Sequence[str] | None,
    metadata: Mapping[str, Any] | None,
    *,
    keep_trace_attributes: bool = False,
) -> dict[str, Any]:
    own = _strip_langfuse_keys(
        _join_tags(tags, _own_metadata(metadata, None)), keep_trace_attributes
    )
    return {**(own or {}), "is_langchain_root": True}


def _parse_trace_attributes(
    metadata: Mapping[str, Any] | None, tags: Sequence[str] | None
) -> dict[str, Any]:
    """Langfuse's trace attributes from a root run's metadata and tags (the SDK's rule).

    Trace metadata is copied onto every span of the leg: it keeps the task's own keys (the
    thread id is already the session id; LangGraph's keys are plumbing).
    """
    if metadata is None:
        return {"tags": list(tags)} if tags is not None else {}
    attributes: dict[str, Any] = {}
    for key, name in (
        ("langfuse_session_id", "session_id"),
        ("langfuse_user_id", "user_id"),
        ("langfuse_trace_name", "trace_name"),
    ):
        if isinstance(metadata.get(key), str):
            attributes[name] = metadata[key]
    langfuse_tags = metadata.get("langfuse_tags")
    if tags is not None or isinstance(langfuse_tags, list):
        merged = set(langfuse_tags if isinstance(langfuse_tags, list) else []) | set(tags or [])
        attributes["tags"] = [str(tag) for tag in merged]
    attributes["metadata"] = _own_metadata(_strip_langfuse_keys(dict(metadata)), None)
    return attributes


_SAFE_INT = 2**53 - 1


def _flat_json(sdk: Any, data: Mapping[str, Any]) -> str | None:
    """JSON of a flat dict of plain values (usage, cost, model parameters).

    Numbers, strings, booleans and None: the text Langfuse's serialiser gives, without its
    walk in Python; anything else goes through it.
    """
    for key, value in data.items():
        kind = type(value)
        if type(key) is not str or not (
            kind is str
            or kind is bool
            or value is None
            or (kind is int and -_SAFE_INT <= value <= _SAFE_INT)
            or (kind is float and math.isfinite(value))
        ):
            serialized: str | None = sdk.serialize(data)
            return serialized
    return _PLAIN_JSON(data)


_PLAIN_JSON = _json_encoder(str)
"""``json.dumps`` for plain data, its C encoder built once (`_flat_json`)."""


def _flat_usage(usage: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """*usage*'s counts as ``(path, value)`` pairs (a cache key for what a call cost)."""
    out: list[tuple[str, Any]] = []
    for key, value in usage.items():
        if isinstance(value, Mapping):
            out.extend(_flat_usage(value, f"{prefix}{key}."))
        else:
            out.append(
                (f"{prefix}{key}", value if isinstance(value, int | float | str) else repr(value))
            )
    return out


def _quiet(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return function(*args, **kwargs)
    except Exception:
        logger.debug("could not parse a model name for Langfuse", exc_info=True)
        return None


def _write(sdk: Any, span: Any, attributes: dict[str, Any], kind: str) -> None:
    """Write the handler's *attributes* on *span*, never evicting what it holds."""
    if type(span) is WholeSpan and (
        (limit := span._limits.max_span_attributes) is None
        or len(span.attributes) + len(attributes) + len(sdk.reserved(kind)) <= limit
    ):
        span.put(attributes)
    else:
        sdk.set_within_limit(span, attributes, sdk.reserved(kind))


def _error_status(sdk: Any, span: Any, message: str | None) -> None:
    try:
        span.set_status(sdk.Status(sdk.StatusCode.ERROR, message))
    except Exception:  # as the SDK does: a status never breaks the run
        pass


_NOTICE_SHOWN = False
_MASKERS: dict[str, Masker] = {}
"""One masker per Langfuse public key: its client's ``mask`` is fixed when first built."""


def score_failed_task(callbacks: Any, thread_id: str, error: str) -> None:
    """Give the trace of a task its runner gave up on the outcome score ``failed``.

    The run's own spans end in the error, but no node ran to report an outcome; a runner
    calls this with its config's callbacks (a list or a callback manager) after the last
    attempt. Handlers other than the harness's are ignored; never raises.
    """
    handlers = getattr(callbacks, "handlers", callbacks)
    if not isinstance(handlers, list | tuple):
        return
    for handler in handlers:
        if isinstance(handler, HarnessLangfuseHandler):
            try:
                outcome = {"status": "failed", "reason": error}
                handler._score_outcome(outcome, trace_id_for(thread_id))
            except Exception:  # never break the runner for a trace
                logger.exception("could not score a failed task in Langfuse")


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
    if sensitive_fields:
        metadata[SENSITIVE_FIELDS_KEY] = ",".join(sorted({_field(f) for f in sensitive_fields}))
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
    global _NOTICE_SHOWN
    public_key = public_key or os.environ.get("LANGFUSE_PUBLIC_KEY")
    secret_key = secret_key or os.environ.get("LANGFUSE_SECRET_KEY")
    if not public_key or not secret_key:
        if not _NOTICE_SHOWN:
            _NOTICE_SHOWN = True
            # Name the key that is missing: one set and the other forgotten is the usual slip.
            missing = [
                name
                for name, value in (
                    ("LANGFUSE_PUBLIC_KEY", public_key),
                    ("LANGFUSE_SECRET_KEY", secret_key),
                )
                if not value
            ]
            logger.warning(
                "Langfuse tracing is off (no %s); `harness show THREAD` still rebuilds traces "
                "locally.",
                " and no ".join(missing),
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
    return HarnessLangfuseHandler(
        public_key=public_key, thread_id=thread_id, pricing=pricing, masker=masker
    )
