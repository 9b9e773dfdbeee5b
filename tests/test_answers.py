"""Answer extraction on messy model output: GSM markers, boxed answers, phrases, commas, units, signs."""

import pytest

from benchmarks.answers import answers_match, extract_answer, normalize_number


@pytest.mark.parametrize("text, expected", [
    ("Natalia sold 48 clips in April.\n#### 72", "72"),
    ("so the total is 1,234 dollars.\n#### 1,234", "1234"),
    ("We get \\boxed{42}.", "42"),
    ("Therefore \\boxed{-3.50} is it", "-3.5"),
    ("The answer is 17.", "17"),
    ("So, the final answer is: **$1,050**", "1050"),
    ("Answer: −8", "-8"),
    ("3 + 4 = 7", "7"),
    ("First 12 apples, then 5 more, so 17 apples in total.", "17"),
    ("The result is 45% of the class", "45"),
    ("6 / 8 simplifies to 3/4", "0.75"),
    ("He has -12 degrees", "-12"),
    ("The answer is 5. Wait, 3 + 3 = 6. The answer is 6", "6"),
    ("Temperature 2.0 hours", "2"),
])
def test_extracts_the_final_number(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("text", ["I don't know.", "", "no digits here!"])
def test_no_number_gives_none(text):
    assert extract_answer(text) is None


def test_extract_rejects_non_strings():
    with pytest.raises(TypeError, match="must be a string"):
        extract_answer(12)


def test_normalize_and_match():
    assert normalize_number("1,000.00") == "1000"
    assert normalize_number("1/0") is None
    assert answers_match("1000", "1,000")
    assert answers_match("0.5", "1/2")
    assert not answers_match("7", "-7")
    assert not answers_match(None, "3")
