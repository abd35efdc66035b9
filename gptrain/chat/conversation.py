"""What the model is given for the next reply in `gptrain chat`.

A base model continues the text of each message on its own. With a chat template (instruct
weights) the model is given the whole conversation so far, system prompt first, in that
template; when it no longer leaves room for a reply in the context, the oldest exchanges are
forgotten, one user message and its reply at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gptrain.tokenizer import Tokenizer


@dataclass
class Conversation:
    tokenizer: Tokenizer
    template: str | None  # "llama3", or None: each message is text to continue
    system_prompt: str | None = None
    history: list[dict[str, str]] = field(default_factory=list)  # earlier user and assistant messages

    def prompt(self, message: str, room: int) -> list[int]:
        """The token ids to generate the reply to `message` from, at most `room` of them when
        forgetting earlier exchanges can make it so."""
        if self.template is None:
            return self.tokenizer.encode(message)
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt is not None else []
        while True:
            ids = self.tokenizer.encode_chat([*system, *self.history, {"role": "user", "content": message}])
            if len(ids) <= room or not self.history:
                return ids
            del self.history[:2]  # the oldest user message and its reply

    def add_reply(self, message: str, reply: str) -> None:
        if self.template is not None:
            self.history += [{"role": "user", "content": message}, {"role": "assistant", "content": reply}]
