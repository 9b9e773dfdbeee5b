"""Streamers that hand out each new piece of text with the epistemic uncertainty of its tokens.

`EUTextIteratorStreamer` follows transformers' streamer contract (`put` / `end`, as
`TextIteratorStreamer`): pass it as `streamer=` to `generate` running in a thread, and iterate over it
in yours. Each item is an `EUTextPiece(text, token_ids, eu)`. `EUTextStreamer` is the callback
variant (as `TextStreamer`): it calls `on_piece(piece)` from inside `generate`.

Both work with the wrapper's `generate` (which forwards `streamer=` to the target's) and with the
target's `generate` directly. The EU comes from an `IncrementalScorer` that keeps one KV cache per
draft / proxy, so each new token costs one forward of one position per model; the values equal
`generate(..., return_dict_in_generate=True).epistemic_uncertainty` within float tolerance.

Pieces are token-aligned, not word-aligned as in `TextStreamer`: every generated token is handed out
as soon as it decodes to whole characters (several tokens share a piece only when they form one
character), so a chat UI can colour each piece by its own EU. Joining the pieces' `text` gives the
decoded answer, as with transformers' streamers.

Batch size 1 only (like transformers' text streamers). The prompt is assumed unpadded (its attention
mask all ones), which is what a batch of one is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from transformers import TextIteratorStreamer, TextStreamer

from .incremental import IncrementalScorer

__all__ = ["EUTextPiece", "EUTextIteratorStreamer", "EUTextStreamer"]


@dataclass(frozen=True)
class EUTextPiece:
    """A piece of streamed text and the uncertainty of the tokens it comes from.

    Attributes:
        text: the decoded text of these tokens (may be "" for special tokens skipped by decoding).
        token_ids: the token ids, in order.
        eu: one float per token: its epistemic uncertainty in nats (≥ 0, higher = more uncertain), as
            in `epistemic_uncertainty`; `nan` for prompt tokens (streamed only with `skip_prompt=False`).
    """

    text: str
    token_ids: list[int] = field(default_factory=list)
    eu: list[float] = field(default_factory=list)


class _Failure:
    """An exception raised inside `generate`, queued so the consuming thread re-raises it."""

    def __init__(self, error: BaseException):
        self.error = error


class _EUStreamMixin:
    """The shared part: score each token, group tokens into whole-character pieces, emit them."""

    def _setup(self, eu_model: Any, estimator: str | None) -> None:
        self.scorer = IncrementalScorer(eu_model, estimator=estimator)
        self._expect_prompt = True
        self._pending_ids: list[int] = []
        self._pending_eu: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        """Receive the prompt (first call) or newly generated tokens from `generate`."""
        try:
            self._put(value)
        except Exception as error:
            self._on_failure(error)
            raise

    def _put(self, value: torch.Tensor) -> None:
        if value.dim() > 1 and value.shape[0] > 1:  # generate puts the prompt as (B, P), new tokens as (B,)
            raise ValueError(f"{type(self).__name__} streams one sequence, but generate runs a batch of "
                             f"{value.shape[0]} rows; call generate with one prompt (batch size 1) and "
                             "num_return_sequences=1, or use generate(..., return_dict_in_generate=True) for batches.")
        value = value[0] if value.dim() > 1 else value  # (T,)
        if self._expect_prompt:
            self._expect_prompt = False
            self.scorer.start(value[None, :])
            if not self.skip_prompt:
                self._add(value.tolist(), [math.nan] * value.shape[0])
            return
        eu = [float(self.scorer.step(token.reshape(1)).score[0]) for token in value]  # several with assisted decoding
        self._add(value.tolist(), eu)

    def _add(self, token_ids: list[int], eu: list[float]) -> None:
        self.token_cache.extend(token_ids)
        self._pending_ids.extend(token_ids)
        self._pending_eu.extend(eu)
        text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
        if text.endswith("\ufffd"):
            return  # an incomplete multi-byte character: wait for the token that completes it
        self._emit(text[self.print_len :])
        if text.endswith("\n"):  # as TextStreamer: start decoding afresh after a line break
            self.token_cache = []
            self.print_len = 0
        else:
            self.print_len = len(text)

    def _emit(self, text: str) -> None:
        piece = EUTextPiece(text=text, token_ids=self._pending_ids, eu=self._pending_eu)
        self._pending_ids, self._pending_eu = [], []
        self.on_finalized_piece(piece)

    def end(self) -> None:
        """Flush what is held back, signal the end of the stream, and get ready for the next `generate`."""
        if self._pending_ids:
            text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
            self._emit(text[self.print_len :])
        self.token_cache = []
        self.print_len = 0
        self._expect_prompt = True
        self.scorer.reset()
        self.on_stream_end()

    def _on_failure(self, error: BaseException) -> None:
        self._expect_prompt = True
        self.scorer.reset()

    def on_finalized_piece(self, piece: EUTextPiece) -> None:
        raise NotImplementedError

    def on_stream_end(self) -> None:
        raise NotImplementedError


class EUTextIteratorStreamer(_EUStreamMixin, TextIteratorStreamer):
    """`TextIteratorStreamer` whose items are `EUTextPiece`s: text plus the EU of its tokens.

    Args:
        tokenizer: the target's tokenizer, used to decode.
        eu_model: the `UncertaintyAwareModelForCausalLM` whose drafts/proxy score the tokens (its
            target must be the model that generates).
        skip_prompt: do not stream the prompt (default True, as a chat UI wants).
        timeout: seconds the iterator waits for the next piece (None: forever), as in `TextIteratorStreamer`.
        estimator: registered estimator name; default: the composite's.
        **decode_kwargs: passed to `tokenizer.decode` (e.g. `skip_special_tokens=True`).

    Example:
        >>> from threading import Thread
        >>> streamer = EUTextIteratorStreamer(tokenizer, eu_model, skip_special_tokens=True)
        >>> Thread(target=eu_model.generate, kwargs=dict(**inputs, streamer=streamer, max_new_tokens=64)).start()
        >>> for piece in streamer:
        ...     print(piece.text, piece.eu)

    An error inside `generate` (e.g. a batch of more than one prompt, a `ValueError` naming the batch
    size) is raised again by the iterator, so the consuming loop does not wait forever.
    """

    def __init__(self, tokenizer: Any, eu_model: Any, skip_prompt: bool = True, timeout: float | None = None,
                 estimator: str | None = None, **decode_kwargs: Any):
        super().__init__(tokenizer, skip_prompt=skip_prompt, timeout=timeout, **decode_kwargs)
        self._setup(eu_model, estimator)

    def on_finalized_piece(self, piece: EUTextPiece) -> None:
        self.text_queue.put(piece, timeout=self.timeout)

    def on_stream_end(self) -> None:
        self.text_queue.put(self.stop_signal, timeout=self.timeout)

    def _on_failure(self, error: BaseException) -> None:
        super()._on_failure(error)
        self.text_queue.put(_Failure(error), timeout=self.timeout)

    def __next__(self) -> EUTextPiece:
        value = self.text_queue.get(timeout=self.timeout)
        if isinstance(value, _Failure):
            raise value.error
        if value is self.stop_signal:
            raise StopIteration()
        return value


class EUTextStreamer(_EUStreamMixin, TextStreamer):
    """`TextStreamer` that calls `on_piece(piece)` with each `EUTextPiece` from inside `generate`.

    Args:
        tokenizer, eu_model, skip_prompt, estimator, **decode_kwargs: as for `EUTextIteratorStreamer`.
        on_piece: called with each `EUTextPiece`; default prints the text (as `TextStreamer`).
        on_end: called once when generation ends (optional).
    """

    def __init__(self, tokenizer: Any, eu_model: Any, on_piece: Callable[[EUTextPiece], None] | None = None,
                 skip_prompt: bool = True, on_end: Callable[[], None] | None = None, estimator: str | None = None,
                 **decode_kwargs: Any):
        super().__init__(tokenizer, skip_prompt=skip_prompt, **decode_kwargs)
        self._setup(eu_model, estimator)
        self.on_piece = on_piece or (lambda piece: print(piece.text, flush=True, end=""))
        self.on_end = on_end

    def on_finalized_piece(self, piece: EUTextPiece) -> None:
        self.on_piece(piece)

    def on_stream_end(self) -> None:
        if self.on_end is not None:
            self.on_end()
