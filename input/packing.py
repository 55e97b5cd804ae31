"""Packing the EOS-joined token stream into fixed windows.

Documents are joined as `doc0 EOS doc1 EOS ...` and cut into windows of S + 1 tokens
(S = max_sequence_length): `input_ids = window[:-1]`, `labels = window[1:]`. Window k
covers stream[k*S : k*S + S + 1], so window k+1 starts at the last token of window k:
consecutive windows share one token, which is exactly what makes every stream token
(after the first) a label once and an input once. Concatenating the real labels of all
windows gives stream[1:]; nothing is lost or duplicated.

The last window is short unless the stream length is 1 mod S; `finish` pads it with the
pad id (labels there are masked out) or the caller drops it.

Each window also remembers where the next one starts (which document and how far into
it), so preprocessing can resume exactly at a shard border.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from input.records import encode_varints

__all__ = ["Window", "StreamPacker", "split_window"]


@dataclass(frozen=True)
class Window:
    input_ids: np.ndarray            # [S] int64
    labels: np.ndarray               # [S] int64
    num_real: int                    # labels[:num_real] are real tokens (input_mask 1), the rest padding
    payloads: tuple[bytes, bytes]    # packed varints of input_ids and labels
    next_start: tuple[Any, int] | None  # (document tag, token offset in it) of the next window; None at the end


def split_window(window: np.ndarray, seq_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(input_ids [S], labels [S], num_real) of a window of at most S + 1 tokens, padded with pad_id."""
    real = len(window)
    if not 2 <= real <= seq_len + 1:
        raise ValueError(f"a window needs 2..{seq_len + 1} tokens, got {real}")
    padded = np.full(seq_len + 1, pad_id, dtype=np.int64)
    padded[:real] = window
    return padded[:-1], padded[1:], real - 1


class StreamPacker:
    """Cuts a token stream, fed document by document, into windows of S + 1 tokens overlapping by one."""

    def __init__(self, seq_len: int, pad_id: int):
        if seq_len < 1:
            raise ValueError(f"seq_len={seq_len} must be positive")
        self.seq_len = seq_len
        self.pad_id = pad_id
        self._tokens = np.empty(0, dtype=np.int64)      # [buffered] tokens not yet in a finished window
        self._encoded = np.empty(0, dtype=np.uint8)     # their varint bytes
        self._offsets = np.zeros(1, dtype=np.int64)     # [buffered + 1] byte offset of each token
        self._doc_starts: list[int] = []                # buffer position where each buffered doc starts
        self._doc_tags: list[Any] = []

    def add(self, tokens: np.ndarray, tag: Any = None, encoded: tuple[np.ndarray, np.ndarray] | None = None
            ) -> list[Window]:
        """Append one document's tokens (its EOS included) and return the windows it completes.

        `tag` identifies the document in `Window.next_start`; `encoded` as in `add_documents`.
        """
        tokens = np.asarray(tokens)
        return self.add_documents(tokens, [tokens.size], [tag], encoded)

    def add_documents(self, tokens: np.ndarray, lengths: Sequence[int], tags: Sequence[Any],
                      encoded: tuple[np.ndarray, np.ndarray] | None = None) -> list[Window]:
        """Append documents stored back to back and return the windows they complete.

        `tokens` [sum(lengths)] holds document i's tokens (its EOS included) as the i-th run of
        `lengths[i]`, `tags[i]` names it in `Window.next_start`. `encoded` may pass the tokens'
        varints precomputed, (varints, offsets [n + 1]) with token i at varints[offsets[i]:
        offsets[i + 1]] (`encode_varints(tokens)`, or a slice of a larger batch's offsets).
        One concatenation per call, however many documents: feed a whole tokenized batch.
        """
        tokens = np.asarray(tokens, dtype=np.int64)
        if tokens.size == 0:
            return []
        encoded_bytes, offsets = encoded if encoded is not None else encode_varints(tokens)
        if len(offsets) != tokens.size + 1:
            raise ValueError(f"{len(offsets)} varint offsets for {tokens.size} tokens; expected one more")
        ends = np.cumsum(lengths)                                                   # [docs]
        total = int(ends[-1]) if len(ends) else 0
        if len(ends) != len(tags) or total != tokens.size:
            raise ValueError(f"{len(ends)} lengths summing to {total} and {len(tags)} tags for {tokens.size} "
                             "tokens; give one length and one tag per document, the lengths summing to the tokens")
        starts = ends - np.asarray(lengths) + len(self._tokens)                     # [docs] buffer positions
        for start, length, tag in zip(starts.tolist(), lengths, tags):
            if length:                                  # an empty document holds no window start
                self._doc_starts.append(start)
                self._doc_tags.append(tag)
        self._tokens = np.concatenate([self._tokens, tokens])
        self._encoded = np.concatenate([self._encoded, encoded_bytes[offsets[0]:offsets[-1]]])
        self._offsets = np.concatenate([self._offsets[:-1], offsets - offsets[0] + self._offsets[-1]])
        return self._cut()

    def _locate(self, position: int) -> tuple[Any, int]:
        """(tag, offset) of the document holding buffer position `position`."""
        doc = bisect.bisect_right(self._doc_starts, position) - 1
        return self._doc_tags[doc], position - self._doc_starts[doc]

    def _cut(self) -> list[Window]:
        seq_len = self.seq_len
        count = (len(self._tokens) - 1) // seq_len
        if count <= 0:
            return []
        windows = []
        for k in range(count):
            start, end = k * seq_len, k * seq_len + seq_len
            ids_bytes = self._encoded[self._offsets[start]:self._offsets[end]].tobytes()
            label_bytes = self._encoded[self._offsets[start + 1]:self._offsets[end + 1]].tobytes()
            windows.append(Window(self._tokens[start:end], self._tokens[start + 1:end + 1], seq_len,
                                  (ids_bytes, label_bytes), self._locate(end)))
        self._trim(count * seq_len)
        return windows

    def _trim(self, consumed: int) -> None:
        """Forget the first `consumed` buffered tokens (the next window starts there)."""
        self._tokens = self._tokens[consumed:]
        self._encoded = self._encoded[self._offsets[consumed]:]
        self._offsets = self._offsets[consumed:] - self._offsets[consumed]
        keep = bisect.bisect_right(self._doc_starts, consumed) - 1      # the doc holding the new start
        self._doc_starts = [s - consumed for s in self._doc_starts[keep:]]
        self._doc_tags = self._doc_tags[keep:]

    def finish(self) -> Window | None:
        """The last, short window padded to S (None if no label is left), and the packer emptied."""
        window = None
        if len(self._tokens) >= 2:
            input_ids, labels, num_real = split_window(self._tokens, self.seq_len, self.pad_id)
            window = Window(input_ids, labels, num_real,
                            (encode_varints(input_ids)[0].tobytes(), encode_varints(labels)[0].tobytes()),
                            None)
        self._tokens = self._tokens[:0]
        self._encoded = self._encoded[:0]
        self._offsets = self._offsets[:1]
        self._doc_starts, self._doc_tags = [], []
        return window
