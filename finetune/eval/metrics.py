"""Extrinsic metrics on generated answers: exact match, token F1, ROUGE-L and chrF, all offline;
and, for references that call tools, function-name accuracy and argument exact match.

Every text metric takes ``(prediction, reference)`` strings and returns a float in [0, 1].
``score_predictions`` scores a whole test set and never crashes on one bad example: it counts it.
``score_tool_calls`` compares tool calls already parsed out of the replies (chat_template knows
the format a template writes them in; this module only compares).
sacrebleu and rouge-score are imported on first use so that importing this module stays cheap
(rouge-score pulls in nltk, about 1.5 s).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import math
import numbers
import re
import sys
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "BUILTIN_METRICS",
    "DEFAULT_METRICS",
    "as_number",
    "call_key",
    "chrf",
    "exact_match",
    "load_metric",
    "normalize_answer",
    "rouge_l",
    "same_calls",
    "same_number",
    "score_predictions",
    "score_tool_calls",
    "token_f1",
    "tokenize",
]

MetricFn = Callable[[str, str], float | dict[str, float]]

DEFAULT_METRICS = ("exact_match", "f1", "rouge_l", "chrf")

_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
# Scripts written without spaces between words: each character is scored as a token, otherwise a
# whole Chinese sentence would be one "word" and any one-character difference would score 0.
# CJK ideographs (+ ext. A, compatibility, ext. B-F), hiragana, katakana, Hangul syllables.
_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f\u3040-\u309f\u30a0-\u30ff\uac00-\ud7af"
_TOKEN = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+")


def normalize_answer(text: str) -> str:
    """SQuAD-style normalization that keeps non-Latin text.

    NFKC, casefold, delete punctuation (Unicode category P*, so "don't" -> "dont" as in SQuAD),
    drop the English articles a/an/the, collapse whitespace.
    """
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(ch for ch in text if not unicodedata.category(ch).startswith("P"))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def tokenize(text: str) -> list[str]:
    r"""Normalized ``\w+`` runs, with each CJK ideograph / kana / Hangul syllable its own token.

    Written by hand because rouge-score's default tokenizer keeps only [a-z0-9] and scores non-Latin
    text 0.
    """
    return _TOKEN.findall(normalize_answer(text))


class _Tokenizer:
    """Adapter for ``rouge_scorer.RougeScorer(tokenizer=...)``, which calls ``.tokenize(text)``."""

    def tokenize(self, text: str) -> list[str]:
        return tokenize(text)


_NUMBER = re.compile(r"^[-+]?(\d{1,3}(,\d{3})+|\d+)?(\.\d+)?$")


def as_number(text: Any) -> float | None:
    """The value of an answer that is one number ("1,299.00", "$12", "-0.5", "7%", "12."), else None:
    a currency sign or a percent sign around it and thousands commas are allowed, nothing else."""
    s = unicodedata.normalize("NFKC", str(text)).strip().rstrip(".")
    t = re.sub(r"^[$€£¥]|[$€£¥%]$", "", s.replace(" ", ""))
    if not t or not _NUMBER.match(t) or t in "+-.":
        return None
    try:
        return float(t.replace(",", ""))
    except ValueError:
        return None


def same_number(a: Any, b: Any) -> bool | None:
    """Whether two answers are the same number (as_number), or None when either is not one."""
    x, y = as_number(a), as_number(b)
    if x is None or y is None:
        return None
    return math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-9)


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if the normalized strings are equal, else 0.0. Two numbers are compared by value
    ("$1,299.00" = "1299"), not by their digits with the punctuation deleted ("1.5" != "15")."""
    numbers = same_number(prediction, reference)
    if numbers is not None:
        return float(numbers)
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD bag-of-tokens F1. Both empty (after normalization) -> 1.0, one empty -> 0.0."""
    pred, ref = tokenize(prediction), tokenize(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


@functools.cache
def _rouge_scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Tokenizer())


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence) over ``tokenize`` tokens.

    Both empty -> 1.0, like ``token_f1`` (rouge-score itself returns 0 there).
    """
    if not tokenize(prediction) and not tokenize(reference):
        return 1.0
    return float(_rouge_scorer().score(reference, prediction)["rougeL"].fmeasure)


def chrf(prediction: str, reference: str) -> float:
    """sacrebleu sentence chrF on the raw strings (case- and punctuation-sensitive), divided by 100.

    The 0-1 scale puts it next to the other metrics; multiply by 100 to compare with published
    chrF numbers. Empty strings score 0.0, as in sacrebleu.
    """
    from sacrebleu import sentence_chrf

    return sentence_chrf(prediction, [reference]).score / 100


def _corpus_chrf(predictions: Sequence[str], references: Sequence[str]) -> float:
    from sacrebleu import corpus_chrf

    return corpus_chrf(list(predictions), [list(references)]).score / 100


BUILTIN_METRICS: dict[str, MetricFn] = {
    "exact_match": exact_match,
    "f1": token_f1,
    "rouge_l": rouge_l,
    "chrf": chrf,
}


def load_metric(spec: str) -> MetricFn:
    """A builtin name (see ``BUILTIN_METRICS``) or ``module:function`` / ``path/to/file.py:function``.

    The function is called as ``fn(prediction, reference)`` and returns a float or a dict of floats.
    Raises ``ValueError`` naming ``spec`` when it cannot be resolved.
    """
    if spec in BUILTIN_METRICS:
        return BUILTIN_METRICS[spec]
    known = ", ".join(sorted(BUILTIN_METRICS))
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise ValueError(
            f"unknown metric {spec!r}: builtin metrics are {known}; "
            "a user metric is written 'module:function' or 'path/to/file.py:function'"
        )
    if module_name.endswith(".py") or "/" in module_name or "\\" in module_name:
        module = _import_file(spec, Path(module_name))
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ValueError(f"metric {spec!r}: module {module_name!r} is not importable ({e})") from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"metric {spec!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"metric {spec!r}: {attr!r} is a {type(obj).__name__}, not a function")
    return obj


def _import_file(spec: str, path: Path) -> Any:
    if not path.is_file():
        raise ValueError(f"metric {spec!r}: file {str(path)!r} does not exist")
    # A name unique per file, so that two metric files both called metric.py do not collide.
    name = f"_finetune_user_metric_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"metric {spec!r}: cannot import {str(path)!r} as Python")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise ValueError(f"metric {spec!r}: importing {str(path)!r} failed: {type(e).__name__}: {e}") from e
    sys.modules[name] = module
    return module


def _metric_name(spec: str) -> str:
    """Column name for a metric: the builtin name, or the function name of ``module:function``."""
    return spec if spec in BUILTIN_METRICS else spec.rpartition(":")[2]


def _as_score(value: Any) -> float:
    if isinstance(value, numbers.Real) and math.isfinite(float(value)):
        return float(value)
    raise TypeError(f"returned {value!r}, expected a finite number")


def score_predictions(
    predictions: Sequence[Any],
    references: Sequence[Any],
    metrics: Sequence[str] = DEFAULT_METRICS,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Score each prediction against its reference; return (per-example dicts, aggregate dict).

    A non-string reference is not scored (``"error"`` in its dict, counted in
    ``n_invalid_reference``); likewise a prediction that is neither a string nor None
    (``n_invalid_prediction``). None and whitespace-only predictions are scored as empty and
    counted in ``n_empty_prediction``. A user metric that raises, or returns something other than
    a finite number (or a dict of them), leaves an ``"error"`` on that example and counts in
    ``n_metric_errors``. The aggregate holds each metric's mean over the examples it scored,
    ``chrf_corpus`` when chrF is requested, and the counts.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    fns: dict[str, MetricFn] = {}
    for spec in metrics:
        name = _metric_name(spec)
        if name in fns:
            raise ValueError(f"metric {spec!r}: two metrics are named {name!r}; rename one function")
        fns[name] = load_metric(spec)

    per_example: list[dict[str, Any]] = []
    values: dict[str, list[float]] = {}
    scored_pairs: list[tuple[str, str]] = []
    counts = Counter(n_invalid_reference=0, n_invalid_prediction=0, n_empty_prediction=0, n_metric_errors=0)
    for prediction, reference in zip(predictions, references):
        if not isinstance(reference, str):
            counts["n_invalid_reference"] += 1
            per_example.append({"error": f"reference is not a string (got {type(reference).__name__})"})
            continue
        if prediction is None:
            prediction = ""
        if not isinstance(prediction, str):
            counts["n_invalid_prediction"] += 1
            per_example.append({"error": f"prediction is not a string (got {type(prediction).__name__})"})
            continue
        if not prediction.strip():
            counts["n_empty_prediction"] += 1
        scored_pairs.append((prediction, reference))
        row: dict[str, Any] = {}
        errors = []
        for name, fn in fns.items():
            try:
                result = fn(prediction, reference)
                if isinstance(result, dict):
                    scores = {f"{name}.{key}": _as_score(value) for key, value in result.items()}
                else:
                    scores = {name: _as_score(result)}
            except Exception as e:  # a user metric must not lose the whole evaluation
                counts["n_metric_errors"] += 1
                errors.append(f"{name}: {type(e).__name__}: {e}")
                continue
            row.update(scores)
            for key, value in scores.items():
                values.setdefault(key, []).append(value)
        if errors:
            row["error"] = "; ".join(errors)
        per_example.append(row)

    aggregate: dict[str, Any] = {key: sum(v) / len(v) for key, v in values.items()}
    if "chrf" in fns and scored_pairs:
        preds, refs = zip(*scored_pairs)
        aggregate["chrf_corpus"] = _corpus_chrf(preds, refs)
    aggregate.update(n=len(predictions), n_scored=len(scored_pairs), **counts)
    return per_example, aggregate


# ----------------------------------------------------------------------------------------------
# tool calls
# ----------------------------------------------------------------------------------------------
def call_key(call: Any) -> tuple[str, Any] | None:
    """(function name, parsed arguments) of an OpenAI-format call; None when it is malformed."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        return None
    args = fn.get("arguments", "{}")
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    return fn["name"], args


def same_calls(predicted: list[tuple[str, Any]], reference: list[tuple[str, Any]]) -> bool:
    """The same calls in any order: a multiset match, arguments compared as parsed JSON (so key
    order and spacing do not matter; 5 and 5.0 are equal, as JSON numbers)."""
    left = list(predicted)
    for ref in reference:
        if ref not in left:
            return False
        left.remove(ref)
    return not left


def score_tool_calls(
    predictions: Sequence[tuple[list[dict], list[str]]],
    references: Sequence[list[dict]],
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Score each reply's tool calls against the reference turn's `tool_calls` (OpenAI format).

    A prediction is (the calls parsed out of the reply, the call blocks that did not parse).
    Per example: ``tool_name_accuracy`` 1.0 when the reply calls the same functions (as a
    multiset: parallel calls in any order), ``tool_arguments_exact_match`` 1.0 when it makes the
    same calls with JSON-equal arguments. The aggregate holds their means, ``n_tool_references``,
    ``n_no_tool_call`` (replies with no parsed call) and ``n_invalid_tool_call`` (replies with a
    call block that is not JSON with a name and object arguments); a reference that does not
    parse is counted in ``n_invalid_tool_reference`` and not scored.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    per_example: list[dict[str, Any]] = []
    names, exact = [], []
    counts = Counter(n_no_tool_call=0, n_invalid_tool_call=0, n_invalid_tool_reference=0)
    for (calls, invalid), reference in zip(predictions, references):
        ref = [call_key(c) for c in reference] if isinstance(reference, list) else [None]
        if not ref or None in ref:
            counts["n_invalid_tool_reference"] += 1
            per_example.append({"error": "the reference's tool_calls do not parse"})
            continue
        pred = [k for k in (call_key(c) for c in calls) if k is not None]
        counts["n_no_tool_call"] += not pred
        counts["n_invalid_tool_call"] += bool(invalid)
        row = {"tool_name_accuracy": float(sorted(n for n, _ in pred) == sorted(n for n, _ in ref)),
               "tool_arguments_exact_match": float(same_calls(pred, ref))}
        names.append(row["tool_name_accuracy"])
        exact.append(row["tool_arguments_exact_match"])
        per_example.append(row)
    aggregate: dict[str, Any] = {}
    if names:
        aggregate = {"tool_name_accuracy": sum(names) / len(names),
                     "tool_arguments_exact_match": sum(exact) / len(exact)}
    aggregate.update(n_tool_references=len(references), **counts)
    return per_example, aggregate
