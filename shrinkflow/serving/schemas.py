"""The API's request and response bodies, and the strict JSON they arrive in.

The server parses a body itself (``parse_json``: NaN, Infinity and duplicate
keys refused, the size bounded before the parse) and then validates it with
these models, so the error bodies stay exactly the server's own (see
``deps.json_body``). The models are still what ``/docs`` shows: each route
declares its request schema with ``openapi_extra`` (FastAPI's documented
recipe for a body the endpoint reads itself) and its answers with
``response_model`` and ``responses``.
"""

from __future__ import annotations

import json
from functools import lru_cache

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from shrinkflow.status import StatusReport


class PredictRequest(BaseModel):
    """Texts to label, one prediction each."""

    model_config = ConfigDict(extra="forbid", strict=True)
    texts: list[str] = Field(min_length=1, description=(
        "The texts, in order (at most serve.max_texts_per_request of them, each at most "
        "serve.max_chars_per_text characters, neither empty nor only whitespace)."))


class FeedbackRequest(BaseModel):
    """The true label of an earlier prediction."""

    # strict: a label of true is not the label 1, nor 1.0.
    model_config = ConfigDict(extra="forbid", strict=True)
    # The server's ids are uuid4 hex; printable ASCII keeps NUL, control
    # characters and lone surrogates out of SQLite and of the answer.
    prediction_id: str = Field(min_length=1, max_length=100, pattern=r"^[\x21-\x7e]+$",
                               description="The prediction_id /predict answered with.")
    label: int | str = Field(description="A label name, or its class id (index in the served labels).")

    @field_validator("label")
    @classmethod
    def _label_is_text(cls, value):
        """A name must be valid Unicode and not blank, whatever the version
        that answered: refused before the prediction is looked up."""
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ValueError(f"label is not valid Unicode (lone surrogate U+{ord(value[exc.start]):04X} at "
                                 f"character {exc.start})") from None
            if not value.strip():
                raise ValueError("label is empty")
        return value


@lru_cache(maxsize=None)
def predict_request_model(max_texts: int) -> type[PredictRequest]:
    """``PredictRequest`` with at most ``max_texts`` texts (a server's
    serve.max_texts_per_request); one class per limit."""
    return create_model("PredictRequest", __base__=PredictRequest,
                        texts=(list[str], Field(min_length=1, max_length=max_texts)))


def request_body(model: type[BaseModel]) -> dict:
    """``openapi_extra`` declaring ``model`` as a route's JSON request body."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


class Prediction(BaseModel):
    """One text's answer."""

    prediction_id: str = Field(description="Send it back to /feedback with the true label.")
    label: str
    label_id: int = Field(description="The label's class id (index in the served labels).")
    probabilities: dict[str, float] = Field(description="Per label name, rounded to 6 decimals.")
    truncated: bool = Field(description="Whether the text was cut to the model's max_seq_len.")
    tokens_seen: int = Field(description="Tokens the model read, [CLS] and [SEP] included.")
    model_version: str


class PredictResponse(BaseModel):
    """The version that answered, and one prediction per text, in order."""

    model_version: str
    predictions: list[Prediction]


class FeedbackResponse(BaseModel):
    prediction_id: str
    label: str = Field(description="The label stored, by name.")
    replaced: bool = Field(description="Whether this replaced earlier feedback on the prediction.")


class ServedAs(BaseModel):
    """How the server runs the version it holds (in /health and /metadata)."""

    model_config = ConfigDict(frozen=True)
    per_row: bool = Field(description="Each text is its own model call (its outputs depend on the batch).")
    per_row_decided_by: str = Field(description="What decided per_row: manifest, model graph or server.")
    batching: str = Field(description="In words: batched, or each text alone.")
    truncation: str = Field(description="Which end of a text over max_seq_len tokens is kept (serve.truncation).")


class Metadata(StatusReport):
    """`shrinkflow status --json` for the version being served, and how it
    is served."""

    serving: ServedAs


class ErrorBody(BaseModel):
    """Every error answer: ``error`` is a stable kind (``invalid_request``,
    ``body_too_large``, ``log_unavailable``, ...), ``detail`` says what."""

    model_config = ConfigDict(extra="allow")
    error: str
    detail: str


def error_responses(*codes: int) -> dict:
    """``responses=`` documenting the error answers ``codes``."""
    return {code: {"model": ErrorBody} for code in codes}


def text_problems(texts: list[str]) -> list[tuple[int, str]]:
    """``(index, problem)`` for each text that must not reach the model.

    A lone surrogate (half of a UTF-16 pair, e.g. an emoji cut in two, sent
    JSON-escaped as ``"\\ud800"``) is not Unicode text: the tokenizer raises
    TypeError on it, and before these checks one such text failed every
    request micro-batched with it (223 of 380 good requests in a burst of 400
    with 20 bad). An empty or whitespace-only text has nothing to classify
    (and a logged "" used to crash the monitor). Both get 422 with the index.
    """
    out = []
    for i, t in enumerate(texts):
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as exc:
            out.append((i, f"not valid Unicode (lone surrogate U+{ord(t[exc.start]):04X} at character {exc.start})"))
            continue
        if not t or t.isspace():
            out.append((i, "empty or only whitespace: nothing to classify"))
    return out


def printable(value, limit: int = 100) -> str:
    """``value`` as text that any JSON encoder and client can carry: a lone
    surrogate in a client's key becomes ``\\ud800`` literally; cut to
    ``limit`` characters."""
    s = str(value)
    s = s.encode("utf-8", "backslashreplace").decode("utf-8")
    return s if len(s) <= limit else s[:limit] + "..."


class DuplicateKey(ValueError):
    """A JSON object names a key twice (``args[0]``: the key)."""


def _object(pairs: list) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set = set()
        raise DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return out


def _constant(name: str):
    raise ValueError(f"{name} is not a JSON value")


def parse_json(text: str):
    """Strict JSON: NaN and Infinity are refused (not JSON, RFC 8259), and so
    is an object with a duplicated key (``json`` would keep the last value
    silently). Raises ``DuplicateKey`` (a ValueError), ValueError (not JSON,
    including an integer over Python's 4,300-digit limit) or RecursionError
    (nested too deeply for the decoder)."""
    return json.loads(text, parse_constant=_constant, object_pairs_hook=_object)
