"""MLflow Tracing: the traces an instrumented agent writes to our tracking store.

Source: `ingest.mlflow_experiment: <name or id>` reads the traces of that experiment in the
project's tracking store (`tracking.tracking_uri`, or `MLFLOW_TRACKING_URI`), beside the files
of `ingest.source`. Each finished trace is one log object to the watermark (uri
`mlflow://<experiment>/<trace id>`); its
fingerprint is the trace's state and its number of assessments, so a trace is read once and read
again only when feedback arrives later (an accepted trace then comes back as a duplicate, one
that lacked its label is accepted). Traces still in progress wait for the next run. A trace
exported as JSON (`Trace.to_json()`, one per line or an array) is read from files the same way.

Conversion: the chat spans (span type CHAT_MODEL or LLM, as MLflow's autologging and
`@mlflow.trace(span_type="CHAT_MODEL")` record them) give the conversation: the last one's input
`messages` plus its output (a ChatCompletion's first choice, a message, or text), then the
outputs of TOOL spans after it that answer its calls (by tool name, in order: a conversation
that ends on a tool's result). The trace id
is the trajectory id; usage is the trace's token usage (else the chat spans' summed); timestamp
and latency are the trace's. For the mapping the reader exposes `tags`, `metadata` (trace
metadata) and `assessments` (name -> the latest valid feedback or expectation value), e.g.
`success_from_reward: assessments.resolved`, `fields: {task_id: tags.task_id}`.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import IO, Any, ClassVar

from tracetune.config import FieldMapping
from tracetune.trajectories import quarantine as q
from tracetune.trajectories.mapping import apply_mapping
from tracetune.trajectories.readers.base import Reader, ReadError, describe
from tracetune.trajectories.readers.openai_chat import append_tool_results, normalise_messages
from tracetune.trajectories.sources import LogSource, SourceObject

CHAT_SPAN_TYPES = frozenset({"CHAT_MODEL", "LLM"})
NO_CHAT = "mlflow_traces:no_chat_span"
MESSAGES = "mlflow_traces:messages"
SCHEME = "mlflow://"
PAGE = 500


class MlflowTracesReader(Reader):
    name: ClassVar[str] = "mlflow_traces"
    context_keys: ClassVar[tuple[str, ...]] = ("tags", "metadata", "assessments")

    def recognises(self, value: Any) -> bool:
        if not isinstance(value, dict):
            return False
        info, data = value.get("info"), value.get("data")
        return (
            isinstance(info, dict)
            and "trace_id" in info
            and isinstance(data, dict)
            and isinstance(data.get("spans"), list)
        )

    def to_record(self, item: Any, mapping: FieldMapping) -> dict[str, Any]:
        if not self.recognises(item):
            raise ReadError(q.NOT_AN_OBJECT, f"{describe(item)}: not an MLflow trace")
        info, spans = item["info"], item["data"]["spans"]
        chats = sorted(
            (s for s in spans if _attr(s, "mlflow.spanType") in CHAT_SPAN_TYPES),
            key=lambda s: int(s.get("start_time_unix_nano") or 0),
        )
        if not chats:
            raise ReadError(NO_CHAT, "no CHAT_MODEL or LLM span in this trace")
        last = chats[-1]
        record: dict[str, Any] = {
            "trajectory_id": info["trace_id"],
            "timestamp": _iso(info.get("request_time")),
            "latency_s": float(info.get("execution_duration_ms") or 0) / 1000,
            "messages": append_tool_results(conversation(last), tool_results(spans, last)),
            "tags": info.get("tags") or {},
            "metadata": info.get("trace_metadata") or {},
            "assessments": assessments(info.get("assessments") or []),
        }
        model = _attr(last, "mlflow.llm.model") or _model(last)
        if model:
            record["model"] = model
        usage = token_usage(info, chats)
        if usage:
            record["usage"] = usage
        cost = _json((info.get("trace_metadata") or {}).get("mlflow.trace.cost"))
        if isinstance(cost, dict) and isinstance(cost.get("total_cost"), int | float):
            record["cost_usd"] = float(cost["total_cost"])
        record = apply_mapping(record, mapping)
        record["messages"] = normalise_messages(record["messages"])
        return self.finish(record)


def _json(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _attr(span: dict[str, Any], key: str) -> Any:
    """Span attributes are stored JSON-encoded (`"\\"CHAT_MODEL\\""`)."""
    return _json((span.get("attributes") or {}).get(key))


def _iso(value: Any) -> Any:
    return value.replace("Z", "+00:00") if isinstance(value, str) else value


def _model(span: dict[str, Any]) -> str | None:
    for side in ("mlflow.spanInputs", "mlflow.spanOutputs"):
        value = _attr(span, side)
        if isinstance(value, dict) and isinstance(value.get("model"), str):
            return value["model"]
    return None


def conversation(chat: dict[str, Any]) -> list[Any]:
    """The chat span's input messages plus the message it produced."""
    inputs = _attr(chat, "mlflow.spanInputs")
    messages = inputs.get("messages") if isinstance(inputs, dict) else inputs
    if not isinstance(messages, list):
        raise ReadError(MESSAGES, f"the chat span's inputs hold no messages: {describe(inputs)}")
    output = output_message(_attr(chat, "mlflow.spanOutputs"))
    return [*messages, output] if output is not None else list(messages)


def tool_results(
    spans: list[dict[str, Any]], last: dict[str, Any]
) -> list[tuple[str | None, str | None, Any]]:
    """TOOL spans after the last model call (matched to its calls by tool name, in order)."""
    start = int(last.get("start_time_unix_nano") or 0)
    after = sorted(
        (
            s
            for s in spans
            if _attr(s, "mlflow.spanType") == "TOOL"
            and "mlflow.spanOutputs" in (s.get("attributes") or {})
            and int(s.get("start_time_unix_nano") or 0) >= start
        ),
        key=lambda s: int(s.get("start_time_unix_nano") or 0),
    )
    return [(None, s.get("name"), _attr(s, "mlflow.spanOutputs")) for s in after]


def output_message(outputs: Any) -> dict[str, Any] | None:
    """A ChatCompletion (first choice), a Responses-style message, a message, or text."""
    if isinstance(outputs, str):
        return {"role": "assistant", "content": outputs}
    if not isinstance(outputs, dict):
        return None
    choices = outputs.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        message = choices[0].get("message")
        return dict(message) if isinstance(message, dict) else None
    if isinstance(outputs.get("role"), str):
        return dict(outputs)
    message = outputs.get("message")
    return dict(message) if isinstance(message, dict) else None


def assessments(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Name -> value of the latest valid assessment of that name (feedback or expectation)."""
    latest: dict[str, tuple[str, Any]] = {}
    for item in items:
        if item.get("valid") is False or not item.get("assessment_name"):
            continue
        body = item.get("feedback") or item.get("expectation") or {}
        if "value" not in body or (item.get("feedback") or {}).get("error"):
            continue
        stamp = str(item.get("last_update_time") or item.get("create_time") or "")
        name = item["assessment_name"]
        if name not in latest or stamp >= latest[name][0]:
            latest[name] = (stamp, body["value"])
    return {name: value for name, (_, value) in latest.items()}


def token_usage(info: dict[str, Any], chats: list[dict[str, Any]]) -> dict[str, int] | None:
    totals = _json((info.get("trace_metadata") or {}).get("mlflow.trace.tokenUsage"))
    if isinstance(totals, dict) and "input_tokens" in totals:
        return {
            "prompt_tokens": int(totals.get("input_tokens") or 0),
            "completion_tokens": int(totals.get("output_tokens") or 0),
        }
    prompt = completion = 0
    found = False
    for span in chats:
        usage = _attr(span, "mlflow.chat.tokenUsage")
        if isinstance(usage, dict):
            found = True
            prompt += int(usage.get("input_tokens") or 0)
            completion += int(usage.get("output_tokens") or 0)
            continue
        outputs = _attr(span, "mlflow.spanOutputs")
        usage = outputs.get("usage") if isinstance(outputs, dict) else None
        if isinstance(usage, dict):
            found = True
            prompt += int(usage.get("prompt_tokens") or usage.get("input_tokens") or 0)
            completion += int(usage.get("completion_tokens") or usage.get("output_tokens") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion} if found else None


class MlflowTraceSource(LogSource):
    """The finished traces of one experiment, each a one-line JSON object to the watermark."""

    def __init__(
        self, experiment: str, tracking_uri: str | None = None, client: Any = None
    ) -> None:
        self.experiment = experiment.strip()
        if not self.experiment:
            raise ValueError("ingest.mlflow_experiment is empty: name an experiment or set null")
        self.uri = f"{SCHEME}{self.experiment}"
        if client is None:
            from mlflow import MlflowClient

            client = MlflowClient(tracking_uri=tracking_uri)
        self.client = client
        self._experiment_id: str | None = None
        self._last: tuple[str, bytes] = ("", b"")  # detection and reading open the same trace

    def experiment_id(self) -> str:
        if self._experiment_id is None:
            experiment = self.client.get_experiment_by_name(self.experiment)
            if experiment is None and self.experiment.isdigit():
                from mlflow.exceptions import MlflowException

                try:
                    experiment = self.client.get_experiment(self.experiment)
                except MlflowException:
                    experiment = None
            if experiment is None:
                raise FileNotFoundError(
                    f"ingest.mlflow_experiment: no experiment '{self.experiment}' in the "
                    f"tracking store {self.client.tracking_uri}"
                )
            self._experiment_id = str(experiment.experiment_id)
        return self._experiment_id

    def objects(self) -> Iterator[SourceObject]:
        token = None
        while True:
            page = self.client.search_traces(
                locations=[self.experiment_id()],
                include_spans=False,
                max_results=PAGE,
                order_by=["timestamp_ms ASC"],
                page_token=token,
            )
            for trace in page:
                info = trace.info
                state = str(getattr(info.state, "value", info.state))
                if state == "IN_PROGRESS":
                    continue  # read when it has finished
                yield SourceObject(
                    f"{SCHEME}{self.experiment}/{info.trace_id}",
                    0,
                    f"{state}:{len(info.assessments or [])}",
                    False,
                    False,
                )
            token = page.token
            if not token:
                return

    def open(self, obj: SourceObject, offset: int = 0) -> IO[bytes]:
        trace_id = obj.uri.rsplit("/", 1)[-1]
        if self._last[0] != trace_id:
            data = self.client.get_trace(trace_id).to_json().encode("utf-8") + b"\n"
            self._last = (trace_id, data)
        return io.BytesIO(self._last[1])


class WithTraces(LogSource):
    """The files of `ingest.source` first, then an experiment's traces: one watermark for both."""

    def __init__(self, files: LogSource, traces: MlflowTraceSource) -> None:
        self.files, self.traces = files, traces
        self.uri = f"{files.uri} + {traces.uri}"

    def _of(self, obj: SourceObject) -> LogSource:
        return self.traces if obj.uri.startswith(SCHEME) else self.files

    def objects(self) -> Iterator[SourceObject]:
        yield from self.files.objects()
        yield from self.traces.objects()

    def open(self, obj: SourceObject, offset: int = 0) -> IO[bytes]:
        return self._of(obj).open(obj, offset)

    def prefix_hasher(self, obj: SourceObject, n: int) -> Any:
        return self._of(obj).prefix_hasher(obj, n)

    def content_hash(self, obj: SourceObject) -> str:
        return self._of(obj).content_hash(obj)
