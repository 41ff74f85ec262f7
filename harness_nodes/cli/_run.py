"""``harness run GRAPH`` and ``harness resume THREAD``: run a graph durably, narrating it.

Graphs are found by name, as ``langgraph.json`` finds them: a reference graph (``research``,
``support``, ``documents`` in the ``graphs`` package) or any importable module that defines
``build_graph(model, *, backend, ...)`` returning a compiled graph. ``harness_nodes`` never
imports ``graphs``.

A run records which graph, builder arguments and model it used in the checkpoint metadata,
so ``harness resume THREAD`` rebuilds the same graph in a new process and carries on.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any

import typer
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import HumanMessage
from langgraph.errors import GraphRecursionError
from langgraph.types import Command

from harness_nodes.cli._app import app, console
from harness_nodes.cli._narrate import Narrator
from harness_nodes.errors import (
    HarnessError,
    ModelUnavailable,
    RunFailed,
    UnknownGraph,
    UnknownThread,
    UserError,
)

REFERENCE_PACKAGE = "graphs"
REFERENCE_GRAPHS = ("research", "support", "documents")
RECURSION_LIMIT = 100

# The environment variable each provider's integration reads its key from. Checked before
# the integration is even imported, so a missing key is one clear line, not a stack trace
# from deep inside a client library.
PROVIDER_KEYS = {
    "openai": "OPENAI_API_KEY",
    "anthropic": "ANTHROPIC_API_KEY",
    "google_genai": "GOOGLE_API_KEY",
    "mistralai": "MISTRAL_API_KEY",
    "groq": "GROQ_API_KEY",
    "cohere": "COHERE_API_KEY",
    "fireworks": "FIREWORKS_API_KEY",
    "together": "TOGETHER_API_KEY",
    "deepseek": "DEEPSEEK_API_KEY",
    "xai": "XAI_API_KEY",
    "openrouter": "OPENROUTER_API_KEY",
    "perplexity": "PPLX_API_KEY",
}

META_GRAPH = "harness_graph"
META_ARGS = "harness_args"
META_MODEL = "harness_model"


def load_graph_module(name: str) -> ModuleType:
    """The module of graph *name*: a reference graph, or a module path defining ``build_graph``.

    Raises:
        UnknownGraph: when no such graph exists.
    """
    candidates: list[str] = []
    if name.isidentifier():
        candidates.append(f"{REFERENCE_PACKAGE}.{name}")
    if "." in name:
        candidates.append(name)
    for module_name in candidates:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name is not None and module_name.startswith(e.name):
                continue
            raise
        if callable(getattr(module, "build_graph", None)):
            return module
    raise UnknownGraph(name, list(REFERENCE_GRAPHS))


def parse_args(text: str | None) -> dict[str, Any]:
    """Parse ``--args``: a JSON object of keyword arguments for the graph's ``build_graph``.

    Raises:
        UserError: when it is not valid JSON or not an object.
    """
    if text is None or not text.strip():
        return {}
    try:
        value = json.loads(text)
    except ValueError as e:
        raise UserError(f"--args is not valid JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise UserError(f"--args must be a JSON object of builder arguments, got {text!r}")
    return value


def load_model(spec: str | None) -> BaseChatModel | None:
    """``provider:model`` → a chat model via ``init_chat_model``; None keeps the graph default.

    Raises:
        ModelUnavailable: unknown provider, missing API key, or missing integration package.
    """
    if spec is None:
        return None
    provider, sep, model_name = spec.partition(":")
    if not sep or not provider or not model_name:
        raise ModelUnavailable(spec, "expected provider:model, e.g. openai:gpt-4o-mini")
    key = PROVIDER_KEYS.get(provider)
    if key is not None and not os.environ.get(key):
        raise ModelUnavailable(spec, f"{key} is not set (the {provider} provider needs it)")
    try:
        from langchain.chat_models import init_chat_model
    except ImportError:
        raise ModelUnavailable(
            spec, "the langchain package is needed for provider:model (pip install langchain)"
        ) from None
    try:
        model: BaseChatModel = init_chat_model(spec)
    except ImportError as e:
        raise ModelUnavailable(spec, str(e).splitlines()[0]) from None
    except Exception as e:  # providers raise their own types for bad names and credentials
        raise ModelUnavailable(spec, str(e).splitlines()[0]) from None
    return model


def build_graph(
    module: ModuleType, args: Mapping[str, Any], model: BaseChatModel | None, backend: Any
) -> Any:
    """Call the module's ``build_graph(model, backend=..., **args)`` → a compiled graph.

    A bad argument, or a ``build_graph`` that does not take ``(model, *, backend, ...)``, is a
    `UserError`; an error raised inside the builder is its own.
    """
    check_args(module, args, model, backend)
    try:
        return module.build_graph(model, backend=backend, **args)
    except TypeError as e:
        if not args:
            raise  # the builder's own bug, not the user's input
        # **kwargs passed on (to build_harnessed_agent, say) are checked only there
        raise UserError(f"Bad --args for graph {module.__name__}: {e}") from None


def check_args(
    module: ModuleType, args: Mapping[str, Any], model: BaseChatModel | None, backend: Any = None
) -> None:
    """Refuse *args* the module's ``build_graph`` signature cannot take (a `UserError`)."""
    try:
        signature = inspect.signature(module.build_graph)
    except (TypeError, ValueError):
        signature = None
    if signature is not None:
        try:
            signature.bind(model, backend=backend)
        except TypeError as e:
            raise UserError(
                f"{module.__name__}.build_graph must take (model, *, backend, **args) to run "
                f"with `harness run`: {e}"
            ) from None
        try:
            signature.bind(model, backend=backend, **args)
        except TypeError as e:
            raise UserError(f"Bad --args for graph {module.__name__}: {e}") from None


@dataclass
class RunTarget:
    """A compiled graph ready to run on one thread."""

    graph: Any
    thread_id: str
    config: dict[str, Any]
    task_type: str
    backend: Any


@contextmanager
def opened_graph(
    db: str | None,
    graph_name: str,
    args: Mapping[str, Any],
    model_spec: str | None,
    thread_id: str,
) -> Iterator[RunTarget]:
    """Open the backend, build and compile the graph on it, with the run's config."""
    from checkpointers import open_backend

    module = load_graph_module(graph_name)
    model = load_model(model_spec)
    check_args(module, args, model)  # before the database is opened (or created)
    created = _new_sqlite_file(db)
    with open_backend(db) as backend:
        try:
            graph = build_graph(module, args, model, backend)
        except BaseException:
            if created is not None:  # e.g. args the builder refused: leave no empty database
                backend.close()
                _remove_sqlite_files(created)
            raise
        config: dict[str, Any] = {
            "configurable": {"thread_id": thread_id},
            "recursion_limit": RECURSION_LIMIT,
            "metadata": {
                META_GRAPH: graph_name,
                # checkpoint metadata keeps only scalar values: store the args as JSON text
                META_ARGS: json.dumps(dict(args)),
                META_MODEL: model_spec or "",
            },
        }
        task_type = str(getattr(module, "TASK_TYPE", graph_name))
        yield RunTarget(graph, thread_id, config, task_type, backend)


def _new_sqlite_file(db: str | None) -> Path | None:
    """The SQLite file *db* names, if opening it will create it (else None)."""
    from checkpointers import default_url
    from checkpointers._url import parse_url

    parsed = parse_url(db or default_url())
    if parsed.kind != "sqlite" or parsed.target == ":memory:":
        return None
    path = Path(parsed.target).expanduser()
    return None if path.exists() else path


def _remove_sqlite_files(path: Path) -> None:
    """Remove a SQLite database this run created (and its journal files), nothing ran on it."""
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        file.unlink(missing_ok=True)


@contextmanager
def run_errors(thread_id: str) -> Iterator[None]:
    """A run that stops on an error is a one-line `RunFailed` (its checkpoints are kept)."""
    try:
        yield
    except HarnessError:
        raise
    except GraphRecursionError:
        raise RunFailed(
            thread_id,
            "GraphRecursionError",
            f"no end after {RECURSION_LIMIT} steps (a runaway loop: give it a budget)",
        ) from None
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as e:  # noqa: B036 — fault injection simulates crashes as BaseException
        first = (str(e).splitlines() or [""])[0]
        raise RunFailed(thread_id, type(e).__name__, first) from None


def drive(target: RunTarget, inputs: Any, narrator: Narrator) -> dict[str, Any]:
    """Stream the graph durably, narrating each step; return the final state values."""
    with run_errors(target.thread_id):
        for update in target.graph.stream(
            inputs, target.config, stream_mode="updates", durability="sync"
        ):
            narrator.update(update)
    snapshot = target.graph.get_state({"configurable": {"thread_id": target.thread_id}})
    values: dict[str, Any] = dict(snapshot.values)
    values["__interrupts__"] = list(snapshot.interrupts)
    values["__thread__"] = target.thread_id
    return values


def run_graph(
    graph_name: str,
    task: str | None,
    *,
    db: str | None = None,
    model: str | None = None,
    args: Mapping[str, Any] | None = None,
    thread_id: str | None = None,
    narrator: Narrator | None = None,
) -> dict[str, Any]:
    """Start a task on *graph_name* and run it until it ends or pauses for review."""
    narrator = narrator or Narrator(console)
    thread = thread_id or f"{graph_name.rsplit('.', 1)[-1]}-{uuid.uuid4().hex[:8]}"
    with opened_graph(db, graph_name, args or {}, model, thread) as target:
        if thread_id is not None:
            _refuse_existing(target, thread)
        module = load_graph_module(graph_name)
        text = task or getattr(module, "DEFAULT_TASK", None)
        if not text:
            raise UserError(f"Graph {graph_name!r} has no default task: pass --task")
        inputs = {
            "messages": [HumanMessage(text)],
            "task": {"task_id": thread, "task_type": target.task_type},
        }
        narrator.start(thread, graph_name, text)
        state = drive(target, inputs, narrator)
        if state["__interrupts__"]:
            # Queue the pause so `harness review`, the inbox and `harness show` see it.
            _queue(target).sync(thread)
    narrator.end(state)
    return state


def _refuse_existing(target: RunTarget, thread_id: str) -> None:
    """Refuse to start a task on a thread that already holds one.

    A thread's checkpoints, ledgers and review items are one task's; ``harness resume``
    carries a thread on.
    """
    config: Any = {"configurable": {"thread_id": thread_id}}
    if target.backend.checkpointer.get_tuple(config) is None:
        return
    snapshot = target.graph.get_state(config)
    graph = str(run_metadata(target.backend, thread_id).get(META_GRAPH) or "another graph")
    if snapshot.interrupts:
        where = "is paused for review: decide with `harness review`, or `harness resume`"
    elif snapshot.tasks:
        where = f"stopped mid-run: `harness resume {thread_id}` carries it on"
    else:
        where = "has finished: start a new task on a new --thread (or leave it out)"
    raise UserError(f"Thread {thread_id!r} already holds a {graph} task, which {where}")


def _queue(target: RunTarget) -> Any:
    from harness_nodes.review_queue import ReviewQueue

    return ReviewQueue(target.backend, target.graph)


def check_decision(target: RunTarget, decision: Any) -> None:
    """Refuse (`InvalidDecision`, one line) a decision the thread's queued reviews cannot take."""
    from harness_nodes.review import check_decisions

    for item in _queue(target).sync(target.thread_id):
        with run_errors(target.thread_id):
            check_decisions(item.requests, decision, review_id=item.id)


def decide_pending(
    target: RunTarget, decision: Any, reviewer: str, narrator: Narrator
) -> dict[str, Any] | None:
    """Apply *decision* to the thread's queued reviews (audited), narrating what follows.

    Returns the new state, or None when the thread has no queued review (a pause that is
    not a `HumanReview` one: answer it with ``Command(resume=...)``).
    """
    queue = _queue(target)
    items = queue.sync(target.thread_id)
    if not items:
        return None
    config = {"configurable": {"thread_id": target.thread_id}}
    before = {m.id for m in target.graph.get_state(config).values.get("messages", [])}
    for item in items:
        kind = decision.get("type") if isinstance(decision, Mapping) else "decision"
        with run_errors(target.thread_id):  # InvalidDecision: nothing said
            queue.decide(item.id, decision, reviewer=reviewer)
        narrator.record("review", f"{reviewer} decided {kind} on review {item.id} ({item.reason})")
    snapshot = target.graph.get_state(config)
    for message in snapshot.values.get("messages", []):
        if message.id not in before:
            narrator.message("resumed", message)
    values: dict[str, Any] = dict(snapshot.values)
    values["__interrupts__"] = list(snapshot.interrupts)
    values["__thread__"] = target.thread_id
    for intr in snapshot.interrupts:
        narrator.update({"__interrupt__": [intr]})
    return values


def run_metadata(backend: Any, thread_id: str) -> dict[str, Any]:
    """The `harness run` metadata of *thread_id* (graph, args, model); ``{}`` if it has none.

    ``harness run`` writes it on the checkpoints of its own invocations; a resume through a
    `ReviewQueue` (a reviewer's decision) writes later checkpoints without it, so the thread's
    history is searched newest first.

    Raises:
        UnknownThread: the thread has no checkpoint.
    """
    config: Any = {"configurable": {"thread_id": thread_id}}
    seen = False
    for found in backend.checkpointer.list(config):
        seen = True
        meta = dict(found.metadata or {})
        if meta.get(META_GRAPH):
            return meta
    if not seen:
        raise UnknownThread(thread_id)
    return {}


def resume_thread(
    thread_id: str,
    *,
    db: str | None = None,
    resume: Any = None,
    model: str | None = None,
    reviewer: str | None = None,
    narrator: Narrator | None = None,
) -> dict[str, Any]:
    """Carry a task on from its last checkpoint (after a crash, or with a review answer).

    A review answer goes through the `ReviewQueue` (validated, audited with *reviewer*), a
    `TaskRunner`'s task's under its runner's lease.
    """
    from harness_nodes.cli._app import open_existing
    from harness_nodes.cli._worker import resume_managed

    narrator = narrator or Narrator(console)
    config = {"configurable": {"thread_id": thread_id}}
    with open_existing(db) as backend:  # nothing to carry on in a database that is not there
        managed = resume_managed(backend, thread_id, resume, reviewer_name(reviewer))
        if managed is not None:  # a TaskRunner task: resumed under its lease
            return managed
        meta = run_metadata(backend, thread_id)
    graph_name = str(meta.get(META_GRAPH) or "")
    if not graph_name:
        raise UserError(f"Thread {thread_id!r} was not started by `harness run`: resume it in code")
    args = _without_crashes(json.loads(str(meta.get(META_ARGS) or "{}")))
    model_spec = model or (str(meta.get(META_MODEL)) or None)
    with opened_graph(db, graph_name, args, model_spec, thread_id) as target:
        snapshot = target.graph.get_state(config)
        # `tasks`, not `next`: `next` omits tasks whose writes were saved before a crash cut
        # their step short, and those writes still have to be applied by resuming.
        if not snapshot.tasks and resume is not None:
            raise UserError(
                f"Thread {thread_id!r} has already finished: there is no pause to decide"
            )
        if not snapshot.tasks:
            narrator.note(f"thread {thread_id} has already finished")
            state = dict(snapshot.values)
            state["__interrupts__"] = []
            narrator.end(state)
            return state
        if snapshot.interrupts and resume is None:
            raise UserError(
                f"Thread {thread_id!r} is paused for review: decide with `harness review`, "
                "or pass --decision JSON"
            )
        if not snapshot.interrupts and resume is not None:
            raise UserError(
                f"Thread {thread_id!r} is not paused for review (it stopped mid-run): "
                f"`harness resume {thread_id}` without --decision carries it on"
            )
        if snapshot.interrupts and resume is not None:
            check_decision(target, resume)  # a bad decision is refused before anything is said
        narrator.note(f"resuming thread {thread_id} ({graph_name})")
        decided = None
        if snapshot.interrupts and resume is not None:
            decided = decide_pending(target, resume, reviewer_name(reviewer), narrator)
        if decided is not None:
            state = decided
        else:
            inputs: Command[Any] | None = Command(resume=resume) if resume is not None else None
            state = drive(target, inputs, narrator)
            if state["__interrupts__"]:
                _queue(target).sync(thread_id)
    narrator.end(state)
    return state


def reviewer_name(name: str | None = None) -> str:
    """Who decides: *name*, else ``$HARNESS_REVIEWER``, else the login name."""
    if name:
        return name
    import getpass
    import os

    if os.environ.get("HARNESS_REVIEWER"):
        return os.environ["HARNESS_REVIEWER"]
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return "cli"


def _without_crashes(args: dict[str, Any]) -> dict[str, Any]:
    """Builder args for a resume: simulated crashes (``crash_*`` fault flags) do not recur.

    The process that crashed is gone; the new one carries on from the checkpoint. Every
    other fault flag is kept, so the resumed run meets the same tool behaviour.
    """
    faults = args.get("faults")
    if isinstance(faults, dict):
        kept = {k: v for k, v in faults.items() if not k.startswith("crash")}
        return {**args, "faults": kept}
    return args


DbOption = Annotated[
    str | None,
    typer.Option(
        "--db", help="Backend URL (default: $HARNESS_DATABASE_URL or sqlite:///harness.db)"
    ),
]
ModelOption = Annotated[
    str | None,
    typer.Option("--model", help="provider:model for init_chat_model (default: scripted model)"),
]


@app.command()
def run(
    graph: Annotated[
        str,
        typer.Argument(
            help="research | support | documents | a module path whose build_graph(model, *, "
            "backend, **args) returns a compiled graph"
        ),
    ],
    task: Annotated[
        str | None, typer.Option("--task", help="The task text (default: the graph's)")
    ] = None,
    db: DbOption = None,
    model: ModelOption = None,
    args: Annotated[
        str | None,
        typer.Option(
            "--args", help='Builder arguments as JSON, e.g. \'{"faults": {"runaway": true}}\''
        ),
    ] = None,
    thread: Annotated[str | None, typer.Option("--thread", help="Thread id (default: new)")] = None,
    budget: Annotated[
        float | None,
        typer.Option("--budget", help="The task's dollar limit (the graph's budget_usd)"),
    ] = None,
) -> None:
    """Run a graph durably on the backend and narrate what the harness did."""
    builder_args = parse_args(args)
    if budget is not None:
        if budget <= 0:
            raise UserError(f"--budget must be a positive number of dollars, got {budget}")
        builder_args["budget_usd"] = budget
    run_graph(graph, task, db=db, model=model, args=builder_args, thread_id=thread)


@app.command()
def resume(
    thread: Annotated[str, typer.Argument(help="The thread to carry on")],
    db: DbOption = None,
    decision: Annotated[
        str | None, typer.Option("--decision", help="JSON answer to a pending review interrupt")
    ] = None,
    model: ModelOption = None,
    reviewer: Annotated[
        str | None,
        typer.Option("--reviewer", help="Who decides (default: $HARNESS_REVIEWER or your login)"),
    ] = None,
) -> None:
    """Resume a task from its last checkpoint (after a crash or a pause)."""
    answer = None
    if decision is not None:
        try:
            answer = json.loads(decision)
        except ValueError as e:
            raise UserError(f"--decision is not valid JSON ({e}): {decision!r}") from None
    resume_thread(thread, db=db, resume=answer, model=model, reviewer=reviewer)
