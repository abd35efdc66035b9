"""The Chainlit app that `gptrain chat` serves: `chainlit run` executes this file.

The model loads while Chainlit imports the file, before the server listens, so the page opens
only once the model is ready. A model that fails to load is reported on the console and in
every chat instead of stopping the server, so the person at the browser sees why.

A reply continues the text of the user's message (base models), or answers the conversation
so far in the Llama 3 chat template (instruct weights; see gptrain/chat/conversation.py),
streamed token by token with the KV cache.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import chainlit as cl
from chainlit.input_widget import NumberInput, Slider

from gptrain.chat.config import ChatConfig
from gptrain.chat.conversation import Conversation
from gptrain.chat.reply import VerbatimReply
from gptrain.errors import GptrainError
from gptrain.models.generation import SamplingConfig, generate_stream
from gptrain.models.loading import LoadedModel, check_system_prompt, load_model_and_tokenizer
from gptrain.models.transformer import Transformer, count_parameters
from gptrain.tokenizer import StreamingDecoder

log = logging.getLogger("gptrain.chat")

CONFIG = ChatConfig.from_env()
# One generation at a time: chats share the device's memory and compute.
GENERATION_LOCK = asyncio.Lock()


def describe(loaded: LoadedModel) -> str:
    """The model and where it came from, in Markdown."""
    config = loaded.model.config
    dtype = str(next(loaded.model.parameters()).dtype).removeprefix("torch.")
    return (
        f"**{config.family}** model with {count_parameters(loaded.model):,} parameters: {config.n_layers} layers, "
        f"{config.n_heads} heads, width {config.d_model}, context {config.context_length} tokens, "
        f"tokenizer {loaded.tokenizer.name}.\n\n"
        f"Weights: `{loaded.source.description}`, on {loaded.device} ({dtype}).\n\n"
        + ("Replies continue the text you send." if loaded.chat_template is None else
           f"Replies follow the {loaded.chat_template} chat template and see the conversation so far.")
        + " Sampling settings are behind the settings button."
    )


def load() -> tuple[LoadedModel | None, str]:
    """The model and its description, or None and why it could not be loaded."""
    try:
        loaded = load_model_and_tokenizer(CONFIG.weights, CONFIG.device, CONFIG.dtype, CONFIG.tokenizer,
                                          CONFIG.chat_template)
        check_system_prompt(loaded, CONFIG.system_prompt)
    except Exception as err:  # whatever went wrong, the chat page must open and say it
        problem = f"cannot load the model from {CONFIG.weights}: {err}"
        log.error(problem)
        return None, problem
    log.info("serving %s", loaded.source.description)
    return loaded, describe(loaded)


LOADED, ABOUT_MODEL = load()


def settings_widgets(config: ChatConfig, context_length: int) -> list:
    return [
        Slider(id="temperature", label="Temperature", initial=config.temperature, min=0, max=2, step=0.05,
               description="0 always picks the most likely token (greedy)"),
        NumberInput(id="top_k", label="Top-k", initial=config.top_k or 0,
                    description="sample among the k most likely tokens; 0 means off"),
        Slider(id="top_p", label="Top-p", initial=config.top_p or 1.0, min=0.05, max=1, step=0.05,
               description="sample among the most likely tokens that together hold this probability; 1 means off"),
        NumberInput(id="max_new_tokens", label="Max new tokens", initial=config.max_new_tokens,
                    description=f"the context holds {context_length} tokens, prompt included"),
    ]


@cl.on_chat_start
async def start_chat() -> None:
    if LOADED is None:
        await cl.ErrorMessage(content=ABOUT_MODEL).send()
        return
    cl.user_session.set("config", CONFIG)
    cl.user_session.set("conversation", Conversation(LOADED.tokenizer, LOADED.chat_template, CONFIG.system_prompt))
    await cl.ChatSettings(settings_widgets(CONFIG, LOADED.model.config.context_length)).send()
    await cl.Message(content=ABOUT_MODEL).send()


@cl.on_settings_update
async def update_settings(values: dict) -> None:
    try:
        cl.user_session.set("config", cl.user_session.get("config").with_settings(values))
    except GptrainError as err:
        await cl.ErrorMessage(content=f"Settings not changed: {err}").send()


async def new_tokens(model: Transformer, prompt: list[int], sampling: SamplingConfig) -> AsyncIterator[int]:
    """The tokens generated after `prompt`; each step runs in a worker thread so that the
    server keeps sending tokens (and serving other chats) meanwhile."""
    steps = generate_stream(model, [prompt], sampling)
    while (step := await asyncio.to_thread(next, steps, None)) is not None and step[0] is not None:
        yield step[0]


@cl.on_message
async def reply(message: cl.Message) -> None:
    if LOADED is None:
        await cl.ErrorMessage(content=ABOUT_MODEL).send()
        return
    config: ChatConfig = cl.user_session.get("config")
    conversation: Conversation = cl.user_session.get("conversation")
    tokenizer = LOADED.tokenizer
    answer = cl.Message(content="")
    text, decoder, count = VerbatimReply(), StreamingDecoder(tokenizer), 0
    async with GENERATION_LOCK:
        start = time.perf_counter()
        try:
            prompt = conversation.prompt(message.content, room=LOADED.model.config.context_length - config.max_new_tokens)
            async for token in new_tokens(LOADED.model, prompt, config.sampling(tokenizer.stop_ids)):
                count += 1
                piece, replaces = text.add(decoder.push(token))
                await answer.stream_token(piece, is_sequence=replaces)
        except GptrainError as err:  # e.g. a prompt longer than the context
            await cl.ErrorMessage(content=str(err)).send()
            return
        seconds = time.perf_counter() - start
    text.add(decoder.flush())
    conversation.add_reply(message.content, text.text)
    footer = f"*{count} tokens in {seconds:.2f} s · {config.settings_summary()}*"
    shown = text.markdown() if text.text else "*(the model ended the text at once)*"
    answer.content = f"{shown}\n\n{footer}"
    await answer.send()
