"""Token heatmaps: escaping, colours that rise with EU, valid HTML and PNG files, tokens as text pieces."""

import os
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from matplotlib.colors import to_rgb
from matplotlib.image import imread
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from hf_eu.viz import eu_colors, render_html, render_png, token_strings

TOKENS = [" The", " answer", " is", " <script>alert('x')</script>", " a&b", ' "q"', "\n", "$x$", " 391", "<|im_end|>"]
EU = [0.10, 0.20, 0.05, 1.30, 0.00, 2.50, 0.40, 0.90, 3.20, 0.30]


class _Spans(HTMLParser):
    """Collects the token spans' attributes and text, and every tag seen."""

    def __init__(self):
        super().__init__()
        self.tags, self.spans, self._open = [], [], None

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        if tag == "span" and attrs.get("class") == "tok":
            self._open = {**attrs, "text": ""}

    def handle_data(self, data):
        if self._open is not None:
            self._open["text"] += data

    def handle_endtag(self, tag):
        if tag == "span" and self._open is not None:
            self.spans.append(self._open)
            self._open = None


def luminance(hex_color):
    red, green, blue = to_rgb(hex_color)
    return 0.2126 * red + 0.7152 * green + 0.0722 * blue


def test_colors_darken_monotonically_with_eu_and_clip_to_the_scale():
    values = np.linspace(0.0, 3.0, 25)
    shades = [luminance(c) for c in eu_colors(values)]
    assert all(a > b for a, b in zip(shades, shades[1:])), shades
    clipped = eu_colors([0.0, 1.0, 5.0], vmin=0.0, vmax=1.0)
    assert clipped[1] == clipped[2] != clipped[0]  # above vmax: the top colour
    assert len(set(eu_colors([0.7, 0.7, 0.7]))) == 1  # constant values do not divide by zero


def test_html_escapes_tokens_and_carries_each_value(tmp_path):
    path = tmp_path / "sub" / "answer.html"
    page = render_html(TOKENS, torch.tensor(EU), path, title="Q <b>bold</b>?")
    assert path.read_text(encoding="utf-8") == page
    assert os.listdir(path.parent) == ["answer.html"]  # the temporary file was renamed, nothing left beside
    parser = _Spans()
    parser.feed(page)
    assert "script" not in parser.tags and "b" not in parser.tags
    assert [span["text"] for span in parser.spans] == TOKENS
    assert [float(span["data-eu"]) for span in parser.spans] == pytest.approx(EU)
    assert all(f"EU {v:.4f} nats" in span["title"] for v, span in zip(EU, parser.spans))
    backgrounds = [span["style"].split("background:")[1].split(";")[0] for span in parser.spans]
    order = np.argsort(EU)
    assert all(luminance(backgrounds[a]) >= luminance(backgrounds[b]) for a, b in zip(order, order[1:]))
    assert "linear-gradient" in page and "sum 8.950" in page and "max 3.200" in page
    assert "<link" not in page and "src=" not in page  # self-contained


def test_png_is_valid_and_shows_the_extreme_colours(tmp_path):
    path = tmp_path / "answer.png"
    assert render_png(TOKENS, EU, path, title="What is 17 * 23?", line_chars=24) == str(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = imread(path)[..., :3]  # (H, W, 3) floats in [0, 1]
    assert pixels.shape[0] > 100 and pixels.shape[1] > 300
    lowest, highest = eu_colors([min(EU), max(EU)], vmin=0.0, vmax=max(EU))
    for color in (lowest, highest):
        close = np.abs(pixels - np.array(to_rgb(color))).max(-1) < 0.02
        assert close.sum() > 50, color  # token boxes (and the colorbar ends) are painted in these colours


def test_bad_inputs_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="Got 2 tokens but 3 EU values"):
        render_html(["a", "b"], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="non-finite"):
        render_html(["a"], [float("nan")])
    with pytest.raises(TypeError, match="list of strings"):
        render_html("ab", [0.1, 0.2])
    with pytest.raises(ValueError, match="must be 1-D"):
        render_png(["a"], torch.zeros(1, 1), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE trained on ASCII text, so accented letters and emoji stay split into bytes."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"])
    backend.train_from_iterator(["the cafe is open", "the answer is 391", "open the door"] * 20, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")


def test_token_strings_concatenate_to_the_decoded_text():
    tokenizer = byte_level_tokenizer()
    text = "the café is open 🙂"
    ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    pieces = token_strings(tokenizer, torch.tensor(ids))
    assert len(pieces) == len(ids)
    assert "".join(pieces) == tokenizer.decode(ids) == text + "<eos>"
    assert "é" in pieces and "🙂" in pieces  # multi-byte characters land whole on their last byte token
    assert pieces[pieces.index("🙂") - 1] == ""  # the emoji's earlier byte tokens add no text
    assert token_strings(tokenizer, ids, skip_special_tokens=True)[-1] == ""
