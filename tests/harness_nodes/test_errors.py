from __future__ import annotations

import inspect
import pickle

import pytest

import harness_nodes.errors as errors_module
from harness_nodes import errors

CASES = [
    errors.UserError("wired wrong"),
    errors.BackendURLError("mysql://x", "unknown scheme"),
    errors.BackendURLError("sqlite:///h.db", "no database at h.db", False),
    errors.BackendUnavailable("postgresql://u:***@h/db", "refused"),
    errors.UnpricedModelError("my-model", "self-hosted"),
    errors.BudgetExceeded("task-1", "usd", 0.51, 0.5),
    errors.VerificationFailed("search", "call-1", ["empty result"]),
    errors.ReviewNotFound("r1"),
    errors.InvalidDecision("r1", "unknown action 'maybe'"),
    errors.AlreadyDecided("r1", "alice", "2026-01-01T00:00:00Z", "approve"),
    errors.EffectOutcomeUnknown("t1", "call-9", "refund", {"amount": 10}, "t1:call-9"),
    errors.UnguardedEffect("refund"),
    errors.UnknownTask("order-17"),
    errors.LeaseLost("t1", "host:42:abcd"),
    errors.EffectNotResolvable("t1", "call-9", "its result is already recorded"),
    errors.UnknownThread("nope"),
    errors.TaskNotFinished("k1", "running"),
    errors.TaskNotPaused("k1", "completed"),
    errors.UnknownGraph("reserch", ["research", "support"]),
    errors.ModelUnavailable("openai:gpt-4o-mini", "OPENAI_API_KEY is not set"),
    errors.RunFailed("t1", "SimulatedCrash", "simulated crash in model turn 2"),
]


@pytest.mark.parametrize("error", CASES, ids=lambda e: type(e).__name__)
def test_errors_pickle_with_their_fields(error: errors.HarnessError) -> None:
    clone = pickle.loads(pickle.dumps(error))
    assert type(clone) is type(error)
    assert str(clone) == str(error)
    assert vars(clone) == vars(error)
    assert isinstance(clone, errors.HarnessError)


def test_every_error_class_is_covered_and_rooted() -> None:
    classes = {
        obj
        for _, obj in inspect.getmembers(errors_module, inspect.isclass)
        if issubclass(obj, Exception) and obj.__module__ == errors_module.__name__
    }
    assert all(issubclass(c, errors.HarnessError) for c in classes)
    leaves = {c for c in classes if not c.__subclasses__()}
    assert leaves <= {type(e) for e in CASES}


def test_budget_exceeded_message_is_built_from_fields() -> None:
    e = errors.BudgetExceeded("task-1", "usd", 0.5, 0.5)
    assert str(e) == "Budget exhausted for task 'task-1': usd used 0.5, limit 0.5"
    assert (e.task_id, e.limit, e.used, e.maximum) == ("task-1", "usd", 0.5, 0.5)


def test_unpriced_model_message_says_how_to_price_it() -> None:
    e = errors.UnpricedModelError("llama-local")
    assert "llama-local" in str(e)
    assert "fallback" in str(e)


def test_a_verification_failure_message_masks_a_secret_the_output_quoted() -> None:
    from harness_nodes import VerificationFailed

    reason = "the output carries an error: error='bad key sk-proj-abcdefghijklmnop1234'"
    err = VerificationFailed("login", "call_1", [reason])
    assert "the output carries an error: error='bad key ***'" in str(err)
    assert "sk-proj-abcdefghijklmnop1234" not in str(err)
    assert err.reasons == [reason]  # the typed field keeps what the verifier found
    assert str(pickle.loads(pickle.dumps(err))) == str(err)


def test_an_unknown_effect_message_masks_secrets_in_the_call_arguments() -> None:
    from harness_nodes import EffectOutcomeUnknown

    args = {
        "order_id": "A1",
        "api_key": "bank-live-key-123",
        "memo": "sk-proj-abcdefghijklmnop1234",
    }
    err = EffectOutcomeUnknown("t-1", "call_7", "refund", args, "key-123")
    assert "'order_id': 'A1'" in str(err)
    assert "bank-live-key-123" not in str(err) and "sk-proj-abcdefghijklmnop1234" not in str(err)
    assert err.call_args == args  # the typed field keeps the call as made
