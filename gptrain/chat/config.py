"""What `gptrain chat` serves and the initial chat settings, passed to the Chainlit process.

The Chainlit app runs in a process `chainlit run` starts, so the command hands the config over
in one environment variable (JSON). The sampling fields double as the chat settings a user
changes in the settings panel; `with_settings` applies the panel's values.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gptrain.errors import GptrainError
from gptrain.models.loading import CHAT_TEMPLATES
from gptrain.models.sampling import SamplingConfig

CONFIG_ENV = "GPTRAIN_CHAT_CONFIG"


@dataclass(frozen=True)
class ChatConfig:
    weights: str  # a weights folder/file or a gptrain run directory
    tokenizer: str | None = None  # None: the tokenizer stored with the weights
    device: str = "auto"
    dtype: str | None = None  # None keeps the stored dtype
    chat_template: str = "auto"  # see gptrain.models.loading.resolve_chat_template
    system_prompt: str | None = None  # the system message, with a chat template
    # Initial chat settings.
    max_new_tokens: int = 256
    temperature: float = 0.8
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        self.sampling()  # SamplingConfig checks the values
        if self.chat_template not in CHAT_TEMPLATES:
            raise GptrainError(f"chat template {self.chat_template!r}: must be one of {', '.join(CHAT_TEMPLATES)}")

    def sampling(self, stop_ids: tuple[int, ...] = ()) -> SamplingConfig:
        return SamplingConfig(
            max_new_tokens=self.max_new_tokens, temperature=self.temperature,
            top_k=self.top_k, top_p=self.top_p, stop_ids=stop_ids,
        )

    def settings_summary(self) -> str:
        """The sampling settings in a few words, shown under each reply."""
        picking = "greedy" if self.temperature == 0 else (
            f"temperature {self.temperature:g}, top-k {self.top_k or 'off'}, top-p {self.top_p or 'off'}"
        )
        return f"{picking}, at most {self.max_new_tokens} new tokens"

    def with_settings(self, values: Mapping[str, Any]) -> ChatConfig:
        """This config with the settings panel's values: numbers, or strings from its number
        fields ('' for an emptied one). A top-k of 0 and a top-p of 1 mean off."""
        top_k = _number(values, "top_k", int, default=self.top_k)
        top_p = _number(values, "top_p", float, default=self.top_p)
        return dataclasses.replace(
            self,
            max_new_tokens=_number(values, "max_new_tokens", int, default=self.max_new_tokens),
            temperature=_number(values, "temperature", float, default=self.temperature),
            top_k=top_k or None,
            top_p=None if top_p is None or top_p >= 1.0 else top_p,
        )

    def to_env(self) -> dict[str, str]:
        return {CONFIG_ENV: json.dumps(dataclasses.asdict(self))}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> ChatConfig:
        if CONFIG_ENV not in environ:
            raise GptrainError(f"${CONFIG_ENV} is not set: start the chat app with `gptrain chat --weights ...`")
        try:
            return cls(**json.loads(environ[CONFIG_ENV]))
        except (json.JSONDecodeError, TypeError) as err:
            raise GptrainError(f"${CONFIG_ENV}: not a chat config ({err})") from err


def _number(values: Mapping[str, Any], key: str, kind: type, default=None):
    value = values.get(key)
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise GptrainError(f"setting {key}: {value!r} is not a number") from None
    if kind is int and not number.is_integer():
        raise GptrainError(f"setting {key}: {value!r} is not a whole number")
    return kind(number)
