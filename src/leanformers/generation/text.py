"""From token ids to text while generating: stop strings and UTF-8-safe streaming pieces.

Text is re-decoded from all generated ids at each step (cheap next to a forward pass), so tokenizer
decoders that merge tokens (byte-level BPE, sentencepiece spaces) are always honoured. A piece is
released only when it can no longer change: no incomplete UTF-8 character at its end (decoders
show those as U+FFFD) and no tail that could still become the start of a stop string.
"""

from __future__ import annotations

from typing import Sequence


class TextAssembler:
    """Accumulates generated token ids; `push` returns the newly safe text, `finish` the rest."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""  # the final text so far (stop string excluded once found)
        self.emitted = 0  # characters of self.text already released
        self.stopped = False  # a stop string was found

    def push(self, token_id: int) -> str:
        """Add one token; return the text that became final (may be '')."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        cut = self._find_stop(text)
        if cut is not None:
            self.text, self.stopped = text[:cut], True
            return self._release(len(self.text))
        self.text = text
        safe = len(text)
        while safe > self.emitted and text[safe - 1] == "\ufffd":
            safe -= 1  # possibly an incomplete multi-byte character: wait for the next token
        safe -= self._stop_prefix_len(text[:safe])
        return self._release(max(safe, self.emitted))

    def finish(self) -> str:
        """Release everything still held back (generation ended)."""
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        piece = self.text[self.emitted : upto]
        self.emitted = upto
        return piece

    def _find_stop(self, text: str) -> int | None:
        if not self.stop:
            return None
        start = max(0, self.emitted - max(len(s) for s in self.stop))
        hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
