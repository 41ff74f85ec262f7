"""The handler's spans, written whole at their end through the Langfuse tracer's processors.

OpenTelemetry's SDK span (``Tracer.start_span``) is built for spans written piece by piece
from anywhere: it locks and re-validates every attribute on every write, runs each span
processor's ``on_start`` and copies itself into a `ReadableSpan` at its end. The handler
writes a span twice (its start, its end) with attributes of known types, so that bookkeeping
was a third of what tracing added to a step (docs/decisions/0007-traces.md). `SpanWriter`
gives the handler `WholeSpan`s instead: the same `SpanContext` (trace id from the parent,
span id from the tracer's id generator, the sampler's decision for a new root), the same
Langfuse span-processor work at the start (attributes propagated from the context, the
app-root bookkeeping), the same `ReadableSpan` handed to the tracer's span processors at the
end — so Langfuse's filters, batching and exporter see what they saw before.

It only does so where nothing else would notice: the tracer is the SDK's, enabled, its
sampler one whose decision for a child of a sampled span is "sampled" (parent-based with the
default for local parents, or a trace-id ratio), and every span processor of the provider is
Langfuse's own (another processor — an application's exporter, a baggage processor — may
need ``on_start`` with a live SDK span). Anywhere else, and for a root the sampler drops, the
tracer's own spans are used, as before.

A `WholeSpan` is a real recording span for code running inside a node: the application's
spans nest under it, and ``set_attribute(s)``, ``add_event``, ``set_status``,
``record_exception`` and ``update_name`` (Langfuse's ``update_current_span``...) land on it,
validated as the SDK validates them.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry import trace as trace_api
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.sdk import trace as sdk_trace
from opentelemetry.sdk.trace import sampling
from opentelemetry.sdk.util import BoundedList
from opentelemetry.trace import SpanContext, SpanKind, TraceFlags, TraceState
from opentelemetry.trace.status import Status, StatusCode

logger = logging.getLogger(__name__)

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_RANDOM = getattr(TraceFlags, "RANDOM_TRACE_ID", 0)
_SAMPLED_RANDOM = TraceFlags(TraceFlags.SAMPLED | _RANDOM)
_UNSET = Status(StatusCode.UNSET)


class WholeSpan(trace_api.Span):
    """A recording span kept as plain fields, handed to the span processors at its end."""

    __slots__ = (
        "_writer",
        "name",
        "context",
        "parent",
        "attributes",
        "start_time",
        "end_time",
        "_status",
        "_events",
        "_links",
        "_dropped",
    )

    def __init__(
        self,
        writer: SpanWriter,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        attributes: dict[str, Any],
        start_time: int,
    ) -> None:
        self._writer = writer
        self.name = name
        self.context = context
        self.parent = parent
        self.attributes = attributes
        self.start_time = start_time
        self.end_time: int | None = None
        self._status = _UNSET
        # Bounded as the SDK's span bounds them (its limits, its dropped counts), made on
        # the first event or link: most spans have none.
        self._events: Sequence[sdk_trace.Event] = ()
        self._links: Sequence[trace_api.Link] = ()
        self._dropped = 0  # attributes dropped over the count limit, as the SDK counts them

    # What Langfuse's span processor and filters read of a span at its start.
    @property
    def instrumentation_scope(self) -> Any:
        return self._writer.scope

    @property
    def resource(self) -> Any:
        return self._writer.resource

    @property
    def kind(self) -> SpanKind:
        return SpanKind.INTERNAL

    @property
    def _limits(self) -> Any:  # read by Langfuse's `_drop_attributes_over_span_limit`
        return self._writer.limits

    # --- the handler's writes: attributes of known types, no re-validation -------------------
    def put(self, attributes: Mapping[str, Any]) -> None:
        """Write the handler's own *attributes* (``None`` values are left out).

        Under a limit on attribute values' length (``OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT``)
        they are truncated as the SDK's span truncates them.
        """
        if self.end_time is None:
            if self._writer.limits.max_span_attribute_length is not None:
                self.set_attributes({k: v for k, v in attributes.items() if v is not None})
                return
            own = self.attributes
            for key, value in attributes.items():
                if value is not None:
                    own[key] = value

    # --- opentelemetry.trace.Span ----------------------------------------------------------
    def get_span_context(self) -> SpanContext:
        return self.context

    def is_recording(self) -> bool:
        return self.end_time is None

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        if self.end_time is not None:
            logger.warning("Setting attribute on ended span.")
            return
        limits = self._writer.limits
        own, limit = self.attributes, limits.max_span_attributes
        if limit == 0:
            self._dropped += len(attributes)
            return
        # Cleaned (and invalid keys dropped) as the SDK cleans them, then set one by one as
        # its bounded attributes set them: a key written again becomes the newest, and the
        # oldest makes room for a new one.
        cleaned = BoundedAttributes(
            None, attributes, immutable=False, max_value_len=limits.max_span_attribute_length
        )
        self._dropped += cleaned.dropped
        for key in cleaned:
            if key in own:
                del own[key]
            elif limit is not None and len(own) >= limit:
                del own[next(iter(own))]
                self._dropped += 1
            own[key] = cleaned[key]

    def set_attribute(self, key: str, value: Any) -> None:
        self.set_attributes({key: value})

    def add_event(
        self, name: str, attributes: Mapping[str, Any] | None = None, timestamp: int | None = None
    ) -> None:
        if self.end_time is not None:
            return
        limits = self._writer.limits
        bounded = BoundedAttributes(
            limits.max_event_attributes,
            attributes,
            max_value_len=limits.max_attribute_length,
        )
        if not isinstance(self._events, BoundedList):
            self._events = BoundedList(limits.max_events)
        self._events.append(
            sdk_trace.Event(name, bounded, timestamp if timestamp is not None else time.time_ns())
        )

    def add_link(self, context: SpanContext, attributes: Mapping[str, Any] | None = None) -> None:
        if self.end_time is not None or not sdk_trace._is_valid_link(context, attributes):
            return
        limits = self._writer.limits
        bounded = BoundedAttributes(
            limits.max_link_attributes, attributes, max_value_len=limits.max_attribute_length
        )
        if not isinstance(self._links, BoundedList):
            self._links = BoundedList(limits.max_links)
        self._links.append(trace_api.Link(context, bounded))

    def update_name(self, name: str) -> None:
        if self.end_time is None:
            self.name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        if self.end_time is not None or self._status.status_code is StatusCode.OK:
            return
        if isinstance(status, StatusCode):
            status = Status(status, description)
        if status.status_code is not StatusCode.UNSET:
            self._status = status

    def record_exception(
        self,
        exception: BaseException,
        attributes: Mapping[str, Any] | None = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        module, qualname = type(exception).__module__, type(exception).__qualname__
        recorded: dict[str, Any] = {
            # as the SDK's span names it: the module too, unless a builtin
            "exception.type": f"{module}.{qualname}"
            if module and module != "builtins"
            else qualname,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(
                traceback.format_exception(type(exception), exception, exception.__traceback__)
            ),
            "exception.escaped": str(escaped),
        }
        if attributes:
            recorded.update(attributes)
        self.add_event("exception", recorded, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self.end_time is not None:
            logger.warning("Calling end() on an ended span.")
            return
        self.end_time = end_time if end_time is not None else time.time_ns()
        writer = self._writer
        attributes: Mapping[str, Any] = self.attributes
        if self._dropped:  # exported with its dropped count, as the SDK's span is
            bounded = BoundedAttributes(writer.limits.max_span_attributes, immutable=False)
            bounded._dict, bounded.dropped = self.attributes, self._dropped
            bounded._immutable = True
            attributes = bounded
        writer.processor.on_end(
            sdk_trace.ReadableSpan(
                name=self.name,
                context=self.context,
                parent=self.parent,
                resource=writer.resource,
                attributes=attributes,
                events=self._events,
                links=self._links,
                kind=SpanKind.INTERNAL,
                status=self._status,
                start_time=self.start_time,
                end_time=self.end_time,
                instrumentation_scope=writer.scope,
            )
        )


class SpanWriter:
    """Starts the handler's spans: `WholeSpan`s where that is invisible, else the tracer's."""

    def __init__(self, tracer: Any) -> None:
        self.tracer = tracer
        self.enabled = False
        self._seen: Any = None  # the processors the last check saw
        self._config: Any = None  # the tracer's config (enabled or not) the last check saw
        if type(tracer) is not sdk_trace.Tracer:
            return
        from langfuse._client.propagation import _get_propagated_attributes_from_context
        from langfuse._client.span import _set_span_attributes_within_limit
        from langfuse._client.span_filter import is_default_export_span

        self._propagated = _get_propagated_attributes_from_context
        self._within_limit = _set_span_attributes_within_limit
        self._default_filter = is_default_export_span
        self._expected: dict[int, bool] = {}  # a Langfuse processor's export expectation
        self.processor = tracer.span_processor
        self.resource = tracer.resource
        self.scope = tracer._instrumentation_scope
        self.limits = tracer._span_limits
        self.sampler = tracer.sampler
        self.ids = tracer.id_generator
        self._check()

    def _check(self) -> None:
        # The provider's processors change when one is added (another Langfuse client, an
        # application's exporter), the tracer's config when the provider's tracer
        # configurator turns it off (or on): checked again then, at the next span.
        self._seen = getattr(self.processor, "_span_processors", None)
        self._config = getattr(self.tracer, "_tracer_config", None)
        self._expected = {}
        self.enabled = _whole_spans_fit(self.tracer)
        self.langfuse_processors = tuple(self._seen or ())

    def start(
        self,
        name: str,
        context: Any,
        attributes: dict[str, Any],
        *,
        propagated: bool,
        start_time: int | None = None,
    ) -> Any:
        """Start a span under *context* with *attributes* (taken over, not copied).

        *propagated*: the context may hold trace attributes the application propagates,
        which Langfuse's span processor copies onto every span at its start.
        """
        if self._seen is not None and (
            self.processor._span_processors is not self._seen
            or getattr(self.tracer, "_tracer_config", None) is not self._config
        ):
            self._check()
        if not self.enabled:
            return self.tracer.start_span(
                name, context=context, attributes=attributes, start_time=start_time
            )
        parent_span = trace_api.get_current_span(context)
        parent: SpanContext | None = parent_span.get_span_context()
        trace_state: TraceState | None
        child = False
        if isinstance(parent_span, WholeSpan):
            # A child of a sampled span of ours: the samplers this runs with sample it.
            child = True
            parent = parent_span.context
            flags = _SAMPLED_RANDOM if parent.trace_flags & _RANDOM else _SAMPLED
            trace_id, trace_state = parent.trace_id, parent.trace_state
        else:
            if parent is None or not parent.is_valid:  # a new trace
                parent = None
                trace_id = self.ids.generate_trace_id()
                random = self.ids.is_trace_id_random()
            else:
                trace_id = parent.trace_id
                random = bool(parent.trace_flags & _RANDOM)
            decision = self.sampler.should_sample(
                context, trace_id, name, SpanKind.INTERNAL, attributes
            )
            if decision.decision is not sampling.Decision.RECORD_AND_SAMPLE:
                return self.tracer.start_span(
                    name, context=context, attributes=attributes, start_time=start_time
                )
            flags = _SAMPLED_RANDOM if random and _RANDOM else _SAMPLED
            trace_state = decision.trace_state
            # The SDK's span starts with the attributes the sampler returns.
            attributes = dict(decision.attributes)
        span_context = SpanContext(trace_id, self.ids.generate_span_id(), False, flags, trace_state)
        limits = self.limits
        bounded = limits.max_span_attribute_length is not None or (
            limits.max_span_attributes is not None and len(attributes) > limits.max_span_attributes
        )
        span = WholeSpan(
            self,
            name,
            span_context,
            parent,
            {} if bounded else attributes,
            start_time if start_time is not None else time.time_ns(),
        )
        if bounded:  # truncated and bounded as the SDK's span bounds them
            span.set_attributes(attributes)
        # What Langfuse's span processor does at a span's start.
        if propagated:
            copied = self._propagated(context)
            if copied:
                from langfuse._client.attributes import LangfuseOtelSpanAttributes as attrs

                if attrs.OBSERVATION_PROMPT_NAME in attributes:
                    for key in (attrs.OBSERVATION_PROMPT_NAME, attrs.OBSERVATION_PROMPT_VERSION):
                        copied.pop(key, None)
                # Langfuse drops what does not fit rather than evict what the span holds.
                self._within_limit(span, copied)
        for processor in self.langfuse_processors:
            try:
                if child:
                    self._register_child(processor, span, context)
                else:
                    processor._mark_app_root_candidate(span=span, parent_context=context)
            except Exception:  # as Langfuse's processor: never breaks the run
                logger.debug("app-root check failed for span %r", name, exc_info=True)
        return span

    def _register_child(self, processor: Any, span: WholeSpan, context: Any) -> None:
        """Langfuse's app-root bookkeeping for a child of a span of ours, short.

        A span whose parent the processor expects to export is never an app root; the
        processor only records whether it expects to export this one (so the application's
        spans under it are not app roots either). With Langfuse's default export filter that
        depends on the span's instrumentation scope alone — the same for all of ours — so it
        is asked once; a filter of the application's is asked for every span.
        """
        if processor._should_export_span is not self._default_filter:
            processor._mark_app_root_candidate(span=span, parent_context=context)
            return
        expected = self._expected.get(id(processor))
        if expected is None:
            expected = self._expected[id(processor)] = bool(
                processor._is_expected_exported_at_start(span)
            )
        span_id = format(span.context.span_id, "016x")
        with processor._app_root_lock:
            processor._span_export_expectation_by_id[span_id] = expected


def _whole_spans_fit(tracer: sdk_trace.Tracer) -> bool:
    """Whether `WholeSpan`s are indistinguishable from the tracer's own spans downstream."""
    from langfuse._client.span_processor import LangfuseSpanProcessor

    try:
        if not tracer._is_enabled():
            return False
        processor = tracer.span_processor
        if type(processor) is not sdk_trace.SynchronousMultiSpanProcessor:
            return False
        processors: Sequence[Any] = processor._span_processors
        if not processors or not all(
            isinstance(p, LangfuseSpanProcessor) and hasattr(p, "_mark_app_root_candidate")
            for p in processors
        ):
            return False
        sampler = tracer.sampler
        if isinstance(sampler, sampling.TraceIdRatioBased):
            return True  # the trace's decision, the same for every span of it
        return (
            isinstance(sampler, sampling.ParentBased)
            and sampler._local_parent_sampled is sampling.ALWAYS_ON
        )
    except AttributeError:  # another OpenTelemetry SDK layout: the tracer's own spans
        return False
