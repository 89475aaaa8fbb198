"""The job contract as a producer meets it: what is accepted and why not."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from prioqd import jobs, timing

TASKS = {"square", "echo"}


def parse(payload: bytes | str, now: float = 1000.0, **kw: object) -> jobs.Job | jobs.Rejected:
    raw = payload.encode() if isinstance(payload, str) else payload
    return jobs.parse(raw, "high", known_tasks=TASKS, max_payload_bytes=1000, now=now, **kw)  # type: ignore[arg-type]


def test_minimal_job_gets_an_id_pinned_into_its_stored_form() -> None:
    job = parse('{"task":"square","args":[7]}')
    assert isinstance(job, jobs.Job)
    assert job.task == "square" and job.args == [7] and job.kwargs == {}
    assert len(job.id) == 32
    assert json.loads(job.json) == {"id": job.id, "task": "square", "args": [7]}
    assert job.raw == b'{"task":"square","args":[7]}'


def test_job_with_id_is_stored_byte_for_byte() -> None:
    text = '{"id":"a-1", "task":"echo","args":[1.5e300, 12345678901234567890],"kwargs":{"k":"v"}}'
    job = parse(text)
    assert isinstance(job, jobs.Job)
    assert job.id == "a-1" and job.json == text
    assert job.args == [1.5e300, 12345678901234567890]
    assert job.kwargs == {"k": "v"}


@pytest.mark.parametrize(
    ("literal", "shown"),
    [
        ("NaN", "NaN"),
        ("Infinity", "Infinity"),
        ("-Infinity", "-Infinity"),
        ("1e400", "1e400"),
        ("-1E+400", "-1E+400"),
        ("9" * 400 + ".5", "9" * 20 + "..."),
    ],
)
@pytest.mark.parametrize("field", ["args", "kwargs", "meta"])
def test_numbers_json_cannot_carry_are_rejected_with_the_id(
    literal: str, shown: str, field: str
) -> None:
    # Python's json reads them (nan, inf); the stored form would write null, so a rerun
    # (and any run of a delayed or id-less job) would get other arguments.
    value = f"[{literal}]" if field == "args" else f'{{"v": {literal}}}'
    for payload in (
        f'{{"id":"n","task":"echo","{field}":{value}}}',
        f'{{"id":"n","task":"echo","{field}":{value},"delay_s":1}}',
    ):
        rej = parse(payload)
        assert isinstance(rej, jobs.Rejected), payload
        assert rej.id == "n" and rej.task == "echo"
        assert rej.reason.startswith(f"payload has a number that is not finite ({shown})")


def test_finite_numbers_near_the_limits_are_kept() -> None:
    job = parse('{"task":"echo","args":[1e308, -1.7976931348623157e308, 1e-400, 2.5e-300]}')
    assert isinstance(job, jobs.Job)
    assert job.args == [1e308, -1.7976931348623157e308, 0.0, 2.5e-300]
    assert json.loads(job.json)["args"] == job.args  # the stored form carries the same


def test_optional_fields() -> None:
    job = parse('{"id":"x","task":"square","args":[2],"timeout_s":2,"max_retries":0,"meta":{}}')
    assert isinstance(job, jobs.Job)
    assert job.timeout_s == 2.0 and job.max_retries == 0


def test_a_field_set_to_null_is_the_field_left_out() -> None:
    raw = (
        '{"id":"n","task":"square","args":null,"kwargs":null,"timeout_s":null,'
        '"max_retries":null,"meta":null,"delay_s":null,"eta":null,"enqueued_at":null,'
        '"unique":null}'
    )
    job = parse(raw)
    assert isinstance(job, jobs.Job), job
    assert (job.args, job.kwargs, job.timeout_s, job.max_retries, job.meta) == (
        [], {}, None, None, None
    )
    assert job.due_ms == 0 and job.enqueued_at is None and not job.unique


def test_delay_becomes_due_time_and_leaves_the_stored_form() -> None:
    job = parse('{"id":"d","task":"square","args":[2],"delay_s":1.5}', now=1000.0)
    assert isinstance(job, jobs.Job)
    assert job.due_ms == 1_001_500
    assert "delay_s" not in json.loads(job.json) and job.rewritten
    eta = parse('{"id":"e","task":"square","args":[2],"eta":1000.25}', now=1000.0)
    assert isinstance(eta, jobs.Job) and eta.due_ms == 1_000_250
    past = parse('{"id":"e","task":"square","args":[2],"eta":10}', now=1000.0)
    assert isinstance(past, jobs.Job) and past.due_ms == 0


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\xff\xfe", "not UTF-8"),
        ("x" * 1001, "over max_payload_bytes=1000"),
        ("{not json", "not valid JSON"),
        ("[1,2]", "must be a JSON object, got an array"),
        ('"square"', "must be a JSON object, got a string"),
        ("{}", "missing 'task'"),
        ('{"task":5}', "'task' must be a non-empty string"),
        ('{"task":"nope"}', "unknown task 'nope'"),
        ('{"task":"square","args":7}', "'args' must be an array"),
        ('{"task":null}', "missing 'task'"),
        ('{"task":"square","args":{}}', "'args' must be an array, got an object"),
        ('{"task":"square","args":true}', "'args' must be an array, got a boolean"),
        ('{"task":"square","kwargs":[]}', "'kwargs' must be an object"),
        ('{"task":"square","timeout_s":0}', "'timeout_s' must be a number greater than 0"),
        ('{"task":"square","timeout_s":true}', "'timeout_s' must be a number"),
        ('{"task":"square","max_retries":-1}', "'max_retries' must be a whole number"),
        ('{"task":"square","max_retries":1e999}', "a number that is not finite (1e999)"),
        ('{"task":"square","delay_s":1e306}', "'delay_s' must be a number from 0"),
        ('{"task":"square","timeout_s":' + "9" * 400 + "}", "'timeout_s' must be a number"),
        ('{"task":"square","delay_s":' + "9" * 400 + "}", "'delay_s' must be a number"),
        ('{"task":"square","eta":' + "9" * 400 + "}", "'eta' must be a number"),
        ('{"task":"square","eta":1e306}', "'eta' is more than"),
        ('{"task":"square","args":' + "[" * 400 + "]" * 400 + "}", "nest deeper than 100"),
        ('{"task":"square","id":""}', "'id' must be a non-empty string"),
        ('{"task":"square","id":"a b"}', "'id' must be"),
        ('{"task":"square","id":7}', "'id' must be"),
        ('{"task":"square","delay_s":-1}', "'delay_s' must be a number from 0"),
        ('{"task":"square","delay_s":1,"eta":5}', "not both"),
        ('{"task":"square","eta":"soon"}', "'eta' must be a number"),
        ('{"task":"square","priority":"high"}', "unknown field(s) 'priority'"),
        ('{"task":"square","meta":3}', "'meta' must be an object"),
        ('{"task":"square","meta":{"k":' + "[" * 400 + "]" * 400 + "}}", "'meta' nests deeper"),
    ],
)
def test_rejections_carry_a_reason(payload: bytes | str, reason: str) -> None:
    out = parse(payload)
    assert isinstance(out, jobs.Rejected)
    assert reason in out.reason
    assert out.raw == (payload.encode() if isinstance(payload, str) else payload)


def test_rejection_keeps_a_valid_id_so_the_producer_hears_of_it() -> None:
    out = parse('{"id":"j1","task":"nope"}')
    assert isinstance(out, jobs.Rejected) and out.id == "j1" and out.task == "nope"


def test_dead_letter_payload_survives_non_utf8() -> None:
    assert jobs.payload_field(b"\xff") == {"payload_b64": "/w=="}
    assert jobs.payload_field(b"ok") == {"payload": "ok"}


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    rng = random.Random(1)
    for attempt, step in [(1, 1.0), (2, 2.0), (3, 4.0), (10, 30.0)]:
        for _ in range(50):
            d = timing.backoff_s(attempt, 1.0, 30.0, rng)
            assert step / 2 <= d <= step


def _job(**kw: object) -> jobs.Job:
    j = parse('{"id":"j","task":"square","args":[2]}')
    assert isinstance(j, jobs.Job)
    for k, v in kw.items():
        setattr(j, k, v)
    return j


def _end(job: jobs.Job, run: jobs.RunResult, max_retries: int = 2) -> jobs.Ending:
    policy = jobs.Policy(ttl_s=60, max_retries=max_retries, backoff_base_s=1.0, backoff_max_s=10.0)
    op = jobs.end_op(job, run, daemon_id="d", policy=policy, now_ms=0, rng=random.Random(0))
    return op.ending


def test_policy_retries_until_attempts_run_out() -> None:
    err = jobs.RunResult("error", error="ValueError: x", started_at=1.0, finished_at=2.0)
    assert _end(_job(attempt=1), err).status == "failed"
    assert _end(_job(attempt=3), err).status == "dead"
    assert _end(_job(attempt=1, max_retries=0), err).status == "dead"
    assert _end(_job(attempt=1), jobs.RunResult("timeout", error="t")).status == "failed"
    assert _end(_job(attempt=1), jobs.RunResult("crashed", error="c")).status == "failed"


def test_policy_permanent_failures_skip_retries() -> None:
    for status in ("rejected", "bad_result"):
        ending = _end(_job(attempt=1), jobs.RunResult(status, error="no"))  # type: ignore[arg-type]
        assert ending.status == "dead"


def test_an_eta_past_by_any_amount_runs_now_and_one_far_ahead_is_refused() -> None:
    past = parse('{"task":"square","eta":-1e306}')
    assert isinstance(past, jobs.Job) and past.due_ms == 0
    assert isinstance(parse('{"task":"square","eta":1e12}'), jobs.Rejected)


def test_a_producer_timeout_is_capped_by_max_timeout_s() -> None:
    job = parse('{"task":"square","timeout_s":1e9}', max_timeout_s=60.0)
    assert isinstance(job, jobs.Job) and job.timeout_s == 60.0


def test_stored_form_of_a_payload_with_a_lone_surrogate_is_valid_json() -> None:
    # No id: the daemon pins one into the stored form, which must stay JSON even though
    # "\ud800" has no UTF-8 encoding.
    job = parse(b'{"task":"echo","args":["\\ud800"]}')
    assert isinstance(job, jobs.Job)
    assert job.json.isascii()
    assert json.loads(job.json) == {"id": job.id, "task": "echo", "args": ["\ud800"]}


def test_a_task_name_must_be_a_non_empty_string() -> None:
    from prioqd import task
    from prioqd.errors import TaskRegistryError

    def nameless() -> None: ...

    nameless.__name__ = ""
    with pytest.raises(TaskRegistryError, match="non-empty string"):
        task(nameless)


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


def _read(text: str) -> Any:
    """What the payload reads as, by json alone (as before orjson was put in front), or
    the type of error it raised."""
    try:
        return json.loads(text, parse_constant=jobs._constant, parse_float=jobs._finite)
    except (ValueError, RecursionError) as exc:
        return type(exc)


@given(value=_JSON, spelling=st.sampled_from(["compact", "spaced", "ascii"]))
def test_orjson_in_front_reads_every_payload_as_json_does(value: Any, spelling: str) -> None:
    text = {
        "compact": json.dumps(value, separators=(",", ":"), ensure_ascii=False),
        "spaced": json.dumps(value, indent=1, ensure_ascii=False),
        "ascii": json.dumps(value),
    }[spelling]
    try:
        raw = text.encode()
    except UnicodeEncodeError:  # a lone surrogate: only its \\u escape is UTF-8
        text, raw = json.dumps(value), json.dumps(value).encode()
    got = jobs._loads(text, raw)
    assert got == _read(text) and repr(got) == repr(_read(text))


@pytest.mark.parametrize(
    "text",
    ["NaN", "[Infinity]", "1e400", "[-1e999]", '"\\ud800"', "[1,]", "{", "\ufeff{}",
     "[" * 1100 + "]" * 1100, "123456789012345678901", "[0.1e-999]", '{"a":1,"a":2}',
     "-9999999999999999999", "[-9223372036854775809]", "18446744073709551616",
     "9223372036854775807", "-9223372036854775808", "18446744073709551615",
     "1" + "0" * 400 + ".0", "99e307", "4.9406564584124654e-324", "2.2250738585072011e-308",
     "1.7976931348623157e+308", "1.7976931348623159e308", "1E-0400"],
)  # fmt: skip
def test_what_orjson_refuses_or_reads_otherwise_is_read_by_json(text: str) -> None:
    want = _read(text)
    try:
        got: Any = jobs._loads(text, text.encode())
    except (ValueError, RecursionError) as exc:
        got = type(exc)
    assert got == want and repr(got) == repr(want)
