"""Final-answer extraction from free-form model text, and answer comparison.

`extract_answer` returns the final number of an answer as a normalized string, trying in order:
"#### N", "\\boxed{N}", "the (final) answer is N", "answer: N", "= N" at the end, and otherwise the
last number in the text. Numbers may carry thousands separators ("1,234"), signs ("-5", "−5"),
currency and units ("$12", "12 apples", "45%"), decimals ("2.50" -> "2.5") and simple fractions
("3/4" -> "0.75"). `answers_match` compares two such strings numerically.
"""

from __future__ import annotations

import re

__all__ = ["extract_answer", "normalize_number", "answers_match"]

_NUMBER = r"[-−–]?\s?\$?\s?\d[\d,]*(?:\.\d+)?(?:\s?/\s?\d+)?|[-−–]?\s?\$?\s?\.\d+"
_PATTERNS = [
    re.compile(r"####\s*(" + _NUMBER + ")"),
    re.compile(r"\\boxed\s*\{\s*\\?\$?\s*(" + _NUMBER + r")\s*\}"),
    re.compile(r"(?:final answer|the answer|answer)\s*(?:is|=|:)?\s*:?\s*\**\s*(" + _NUMBER + ")", re.IGNORECASE),
]
_ANY_NUMBER = re.compile(_NUMBER)


def normalize_number(text: str) -> str | None:
    """'−1,234.50' -> '-1234.5', '3/4' -> '0.75', '$12' -> '12'; None if `text` holds no number."""
    cleaned = text.replace("−", "-").replace("–", "-").replace("$", "").replace(",", "").replace(" ", "")
    if not cleaned or cleaned in {"-", "."}:
        return None
    try:
        if "/" in cleaned:
            numerator, denominator = cleaned.split("/", 1)
            value = float(numerator) / float(denominator)
        else:
            value = float(cleaned)
    except (ValueError, ZeroDivisionError):
        return None
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.6f}".rstrip("0").rstrip(".")


def extract_answer(text: str) -> str | None:
    """The final numeric answer in `text`, normalized (see `normalize_number`), or None if there is none."""
    if not isinstance(text, str):
        raise TypeError(f"`text` must be a string, got {type(text).__name__}.")
    for pattern in _PATTERNS:
        matches = pattern.findall(text)
        if matches:
            value = normalize_number(matches[-1])
            if value is not None:
                return value
    for candidate in reversed(_ANY_NUMBER.findall(text)):
        value = normalize_number(candidate)
        if value is not None:
            return value
    return None


def answers_match(predicted: str | None, gold: str | None, tolerance: float = 1e-6) -> bool:
    """Whether two extracted answers are the same number (relative tolerance); None never matches."""
    if predicted is None or gold is None:
        return False
    left, right = normalize_number(predicted), normalize_number(gold)
    if left is None or right is None:
        return False
    a, b = float(left), float(right)
    return abs(a - b) <= tolerance * max(1.0, abs(a), abs(b))
