"""Generated text shown exactly as generated, while it streams.

Chainlit renders every assistant message as Markdown, which would swallow repeated spaces and
line breaks and turn characters like * _ # into formatting. A reply is therefore a fenced code
block with no language, which Chainlit shows as wrapped plain text. The fence is longer than
any run of backticks in the text, so the text cannot close it; when streamed text grows such a
run, the whole reply is sent again with a longer fence.
"""

from __future__ import annotations

MIN_FENCE = 3  # CommonMark's shortest code fence


class VerbatimReply:
    def __init__(self) -> None:
        self.text = ""
        self._fence_length = MIN_FENCE
        self._trailing_backticks = 0

    def add(self, piece: str) -> tuple[str, bool]:
        """Add generated text; return (Markdown to send, whether it replaces all sent so far)."""
        if not piece:
            return "", False
        started = bool(self.text)
        self.text += piece
        longest = 0
        for char in piece:
            self._trailing_backticks = self._trailing_backticks + 1 if char == "`" else 0
            longest = max(longest, self._trailing_backticks)
        if longest >= self._fence_length:
            self._fence_length = longest + 1
            return self.markdown(closed=False), True
        if not started:
            return self.markdown(closed=False), False
        return piece, False

    def markdown(self, closed: bool = True) -> str:
        fence = "`" * self._fence_length
        return f"{fence}\n{self.text}" + (f"\n{fence}" if closed else "")
