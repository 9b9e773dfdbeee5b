"""Token heatmaps: an answer with each token coloured by its epistemic uncertainty.

- `token_strings(tokenizer, token_ids)`: the tokens as text pieces that concatenate to the decoded answer;
- `eu_colors(eu, ...)`: one hex colour per value from a sequential matplotlib colormap (light = low EU,
  dark = high EU);
- `render_html(tokens, eu, path=None, ...)`: a self-contained HTML page (inline CSS, no script, no
  external file): each token a coloured span whose tooltip gives its EU, a colour scale and the answer's
  sum / mean / max;
- `render_png(tokens, eu, path, ...)`: the same picture as a PNG drawn with matplotlib (Agg canvas, no
  pyplot state), tokens wrapped into lines, with a colorbar.

The colour scale runs from `vmin` (default 0, or the smallest value if negative) to `vmax` (default
the largest value); pass both to compare several answers on one scale. Files are written atomically.
This module draws given numbers; it computes no uncertainty.
"""

from __future__ import annotations

import html
import math
import os
import textwrap
import warnings
from collections.abc import Sequence
from typing import Any

from ._atomic import atomic_output

__all__ = ["token_strings", "eu_colors", "readable_ink", "render_html", "render_png", "DEFAULT_CMAP"]

DEFAULT_CMAP = "YlOrRd"
_MONOSPACE = "DejaVu Sans Mono"  # ships with matplotlib; its advance width is 0.602 em
_CHAR_WIDTH_EM = 0.602


def token_strings(tokenizer: Any, token_ids: Sequence[int] | Any, *, skip_special_tokens: bool = False) -> list[str]:
    """The text each token adds to the decoded sequence, one string per token.

    Decodes growing prefixes, so word-start markers (`Ġ`, `▁`) become spaces exactly where the full
    decode puts them, and a character split over several byte tokens is shown on the token that
    completes it (the earlier pieces are ""). The pieces concatenate to `tokenizer.decode(token_ids)`.

    Args:
        tokenizer: a transformers tokenizer.
        token_ids: 1-D ids (list or tensor), e.g. the answer's new tokens.
        skip_special_tokens: drop special tokens' text (EOS, …) as `decode` does; their piece is then "".
    """
    ids = token_ids.tolist() if hasattr(token_ids, "tolist") else list(token_ids)
    if any(isinstance(i, list) for i in ids):
        raise ValueError(f"`token_ids` must be 1-D (one sequence), got a nested list of {len(ids)} rows; "
                         "pass one row, e.g. `sequences[0, prompt_length:]`.")
    pieces: list[str] = []
    shown = ""
    for end in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:end], skip_special_tokens=skip_special_tokens)
        if text.endswith("\ufffd") and end < len(ids):  # an incomplete UTF-8 character: its bytes continue
            pieces.append("")
            continue
        if text.startswith(shown):
            pieces.append(text[len(shown):])
        else:  # decode rewrote earlier text (e.g. clean-up of spaces): fall back to the token alone
            pieces.append(tokenizer.decode(ids[end - 1 : end], skip_special_tokens=skip_special_tokens))
        shown = text
    return pieces


def _values(tokens: Sequence[str], eu: Any) -> list[float]:
    """Check tokens and EU values and return the values as floats."""
    if isinstance(tokens, str) or not all(isinstance(t, str) for t in tokens):
        raise TypeError("`tokens` must be a list of strings (use `hf_eu.viz.token_strings(tokenizer, ids)`), "
                        f"got {type(tokens).__name__}.")
    values = eu.tolist() if hasattr(eu, "tolist") else list(eu)
    if any(isinstance(v, (list, tuple)) for v in values):
        raise ValueError("`eu` must be 1-D (one value per token); pass one row, e.g. "
                         "`out.epistemic_uncertainty[0][out.uncertainty_mask[0]]`.")
    values = [float(v) for v in values]
    if len(values) != len(tokens):
        raise ValueError(f"Got {len(tokens)} tokens but {len(values)} EU values; pass one value per token "
                         "(drop the masked-out positions from both).")
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise ValueError(f"`eu` holds non-finite values {bad[:3]}; only finite numbers can be coloured.")
    return values


def _scale(values: Sequence[float], vmin: float | None, vmax: float | None) -> tuple[float, float]:
    low = min(0.0, min(values, default=0.0)) if vmin is None else float(vmin)
    high = max(values, default=low) if vmax is None else float(vmax)
    if high <= low:
        if vmax is not None and vmin is not None:
            raise ValueError(f"`vmax` ({vmax}) must be greater than `vmin` ({vmin}).")
        high = low + 1.0  # all values equal: every token gets the bottom colour
    return low, high


def eu_colors(eu: Any, *, vmin: float | None = None, vmax: float | None = None, cmap: str = DEFAULT_CMAP) -> list[str]:
    """One `#rrggbb` colour per value: the colormap at `(value - vmin) / (vmax - vmin)`, clipped to [0, 1]."""
    import matplotlib
    from matplotlib.colors import Normalize, to_hex

    values = [float(v) for v in (eu.tolist() if hasattr(eu, "tolist") else eu)]
    low, high = _scale(values, vmin, vmax)
    colormap = matplotlib.colormaps[cmap]
    norm = Normalize(low, high, clip=True)
    return [to_hex(colormap(norm(v))) for v in values]


def readable_ink(background: str) -> str:
    """Black or white text, whichever reads better on `background` (by relative luminance)."""
    red, green, blue = (int(background[i : i + 2], 16) / 255 for i in (1, 3, 5))
    luminance = 0.2126 * red + 0.7152 * green + 0.0722 * blue
    return "#000000" if luminance > 0.45 else "#ffffff"


_HTML_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 52em;
       color: #222; }
h1 { font-size: 1.1em; font-weight: 600; }
.answer { font-family: ui-monospace, Menlo, Consolas, monospace; white-space: pre-wrap; overflow-wrap: anywhere;
          line-height: 2; font-size: 0.95em; }
.tok { border-radius: 3px; padding: 2px 0; box-shadow: inset -1px 0 0 rgba(255, 255, 255, 0.9); }
.legend { margin-top: 1.5em; font-size: 0.85em; color: #444; }
.bar { height: 12px; width: 320px; border: 1px solid #999; }
.ticks { display: flex; justify-content: space-between; width: 322px; }
""".strip()


def render_html(tokens: Sequence[str], eu: Any, path: str | os.PathLike | None = None, *, title: str | None = None,
                vmin: float | None = None, vmax: float | None = None, cmap: str = DEFAULT_CMAP) -> str:
    """A self-contained HTML page showing `tokens` coloured by `eu`; written to `path` when given.

    Args:
        tokens: the tokens as text (e.g. `token_strings(tokenizer, ids)`); HTML in them is escaped.
        eu: one value per token (list, tensor or array), in nats.
        path: where to write the page (atomically); None only returns it.
        title: a heading (e.g. the question), escaped.
        vmin, vmax: the colour scale's ends (default: 0 and the largest value).
        cmap: a matplotlib colormap name; sequential ones (light to dark) read best.

    Returns:
        The HTML text. Each token is `<span class="tok" data-eu="…" title="…">` with its colour inline.
    """
    values = _values(tokens, eu)
    low, high = _scale(values, vmin, vmax)
    colors = eu_colors(values, vmin=low, vmax=high, cmap=cmap)
    spans = []
    for index, (token, value, color) in enumerate(zip(tokens, values, colors)):
        tooltip = html.escape(f"token {index}: {token!r}  EU {value:.4f} nats", quote=True)
        spans.append(f'<span class="tok" data-eu="{value:.6g}" title="{tooltip}" '
                     f'style="background:{color};color:{readable_ink(color)}">{html.escape(token, quote=False)}</span>')
    stops = ", ".join(eu_colors([low + (high - low) * i / 10 for i in range(11)], vmin=low, vmax=high, cmap=cmap))
    summary = (f"sum {sum(values):.3f} · mean {sum(values) / max(1, len(values)):.3f} · "
               f"max {max(values, default=0.0):.3f} nats over {len(values)} tokens")
    heading = html.escape(title or "Per-token epistemic uncertainty", quote=False)
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{heading}</title>
<style>
{_HTML_STYLE}
</style>
</head>
<body>
<h1>{heading}</h1>
<div class="answer">{"".join(spans)}</div>
<div class="legend">
<div>epistemic uncertainty (nats); hover a token for its value</div>
<div class="bar" style="background:linear-gradient(to right, {stops})"></div>
<div class="ticks"><span>{low:.3g}</span><span>{(low + high) / 2:.3g}</span><span>{high:.3g}</span></div>
<p>{summary}</p>
</div>
</body>
</html>
"""
    if path is not None:
        with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
            handle.write(page)
    return page


def _layout(tokens: Sequence[str], line_chars: int) -> list[tuple[int, int, str, int]]:
    """(row, column, text, token index) per drawn segment: tokens wrapped into lines of `line_chars`."""
    segments, row, column = [], 0, 0
    for index, token in enumerate(tokens):
        parts = token.replace("\r", "").replace("\t", "    ").split("\n")
        for number, part in enumerate(parts):
            if number > 0:  # the token holds a line break
                row, column = row + 1, 0
            while part:
                if column + len(part) > line_chars and column > 0:
                    row, column = row + 1, 0
                piece, part = part[:line_chars], part[line_chars:]
                segments.append((row, column, piece, index))
                column += len(piece)
    return segments


def render_png(tokens: Sequence[str], eu: Any, path: str | os.PathLike, *, title: str | None = None,
               vmin: float | None = None, vmax: float | None = None, cmap: str = DEFAULT_CMAP,
               line_chars: int = 64, fontsize: float = 11.0, dpi: int = 150) -> str:
    """Draw `tokens` coloured by `eu` with a colorbar and write a PNG to `path` (atomically).

    Args:
        tokens, eu, title, vmin, vmax, cmap: as for `render_html`.
        path: the PNG file to write.
        line_chars: characters per line before wrapping (tokens are kept whole unless longer).
        fontsize: points; dpi: resolution.

    Returns:
        `path` as a string.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    values = _values(tokens, eu)
    if line_chars < 8:
        raise ValueError(f"`line_chars` must be at least 8, got {line_chars}.")
    low, high = _scale(values, vmin, vmax)
    colors = eu_colors(values, vmin=low, vmax=high, cmap=cmap)
    segments = _layout(tokens, line_chars)
    num_lines = max((row for row, *_ in segments), default=0) + 1
    title_lines = textwrap.wrap(title, int(line_chars * 1.1)) if title else []

    char_in, line_in, margin_in = _CHAR_WIDTH_EM * fontsize / 72, 1.9 * fontsize / 72, 0.3
    title_in = len(title_lines) * 1.5 * fontsize / 72 + (0.15 if title_lines else 0)
    bar_in = 0.95
    width_in = line_chars * char_in + 2 * margin_in
    height_in = margin_in + title_in + num_lines * line_in + bar_in
    figure = Figure(figsize=(width_in, height_in), dpi=dpi, facecolor="white")
    FigureCanvasAgg(figure)
    text_axes = figure.add_axes((margin_in / width_in, bar_in / height_in, line_chars * char_in / width_in,
                                 num_lines * line_in / height_in))
    text_axes.set_xlim(0, line_chars)  # x in characters, y in lines
    text_axes.set_ylim(num_lines, 0)
    text_axes.axis("off")
    for row, column, piece, index in segments:
        text_axes.add_patch(Rectangle((column, row + 0.12), len(piece), 0.76, facecolor=colors[index],
                                      edgecolor="white", linewidth=0.6))  # white seams mark token boundaries
        text_axes.text(column, row + 0.5, piece, family=_MONOSPACE, fontsize=fontsize, va="center", ha="left",
                       color=readable_ink(colors[index]), parse_math=False)
    if title_lines:
        figure.text(margin_in / width_in, 1 - margin_in / height_in, "\n".join(title_lines), va="top",
                    fontsize=fontsize, weight="bold", parse_math=False)
    bar_axes = figure.add_axes((margin_in / width_in, 0.55 / height_in, 1 - 2 * margin_in / width_in,
                                0.14 / height_in))
    colorbar = figure.colorbar(ScalarMappable(Normalize(low, high), cmap), cax=bar_axes, orientation="horizontal")
    colorbar.set_label("epistemic uncertainty (nats)", fontsize=fontsize * 0.85)
    colorbar.ax.tick_params(labelsize=fontsize * 0.8)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph .* missing from font")  # emoji & co. draw as boxes
        with atomic_output(path) as tmp:
            figure.savefig(tmp, format="png", dpi=dpi, facecolor="white")
    return os.fspath(path)
