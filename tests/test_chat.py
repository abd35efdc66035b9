"""`gptrain chat` end to end: the Chainlit server on 127.0.0.1 serving a tiny random GPT-2,
driven in Debian's headless Chromium through Playwright (no browser download).

The reply typed into the page must equal `gptrain generate`'s greedy continuation, arrive as
a stream, and follow a setting changed in the settings panel. The test takes a screenshot of
the page; with GPTRAIN_UPDATE_SCREENSHOT=1 it also replaces the one the README shows
(docs/chat-screenshot.png), which a plain test run leaves alone. Every process it starts (the chat
server with its Chainlit child, Chromium with its helpers) is stopped by process group, and
the groups are checked to be empty.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from conftest import free_port
from gptrain.chat.config import ChatConfig
from gptrain.chat.conversation import Conversation
from gptrain.chat.reply import VerbatimReply
from gptrain.errors import EXIT_BAD_INPUT, GptrainError
from gptrain.models import ModelConfig, Transformer, save_hf_pretrained
from gptrain.tokenizer import get_tokenizer
from test_tokenizer import gpt2, llama_model_file  # noqa: F401 (fixtures: GPT-2's ranks as a Llama 3 rank file)

transformers = pytest.importorskip("transformers")
pytest.importorskip("chainlit")
sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = "/usr/bin/chromium"
# Root needs --no-sandbox; the rest keep Chromium from calling home on a machine without internet.
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
)
README_SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "chat-screenshot.png"
PROMPT = "It was the best of times"
# The generated text of a reply (the code block; inline code in the model description differs).
REPLY_TEXT = ".message-content code.whitespace-pre-wrap"

needs_chromium = pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} missing (scripts/system-deps.sh installs it)"
)


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> Path:
    # With GPT-2's usual init (std 0.02) and tied embeddings a random model's greedy decoding
    # repeats the last token forever; a wider init gives varied text, so that a reply cut
    # short by a setting is visibly a prefix of the full one.
    torch.manual_seed(2)
    config = transformers.GPT2Config(
        n_layer=2, n_head=4, n_embd=64, n_positions=128, vocab_size=50257, initializer_range=0.2
    )
    folder = tmp_path_factory.mktemp("chat-gpt2")
    transformers.GPT2LMHeadModel(config).eval().save_pretrained(folder)
    return folder


def gptrain(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptrain", *args], capture_output=True, text=True, **kwargs)


def greedy_continuation(weights: Path, max_new_tokens: int) -> str:
    result = gptrain("generate", "--weights", str(weights), "--prompt", PROMPT, "--temperature", "0",
                     "--max-new-tokens", str(max_new_tokens), timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(PROMPT) and result.stdout.endswith("\n")
    return result.stdout[len(PROMPT):-1]


def live_processes_in_group(pgid: int) -> list[int]:
    """PIDs of processes in process group `pgid` that have not exited (zombies count as exited)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # exited meanwhile
            continue
        state, _ppid, group = stat.rsplit(")", 1)[1].split()[:3]
        if int(group) == pgid and state != "Z":
            pids.append(int(entry))
    return pids


def stop_group(process: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM the process group `process` leads; SIGKILL what is left after `timeout`."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while live_processes_in_group(process.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = live_processes_in_group(process.pid)
    if left:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)
    assert not left, f"still running {timeout} s after SIGTERM: {left}"


@contextlib.contextmanager
def chat_server(weights: Path, log_file: Path, *options: str):
    """`gptrain chat` on a free 127.0.0.1 port, in its own process group; yields (process, url)."""
    port = free_port()
    with open(log_file, "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "gptrain", "chat", "--weights", str(weights), "--host", "127.0.0.1",
             "--port", str(port), *options],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        yield server, f"http://127.0.0.1:{port}/"
    finally:
        stop_group(server)


def wait_until_serving(server: subprocess.Popen, url: str, log_file: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, f"gptrain chat exited with {server.returncode}:\n{log_file.read_text()}"
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        time.sleep(0.5)
    raise AssertionError(f"nothing served at {url} after {timeout} s:\n{log_file.read_text()}")


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium in its own process group, driven by Playwright over the DevTools
    protocol (listening on 127.0.0.1 only)."""
    with tempfile.TemporaryDirectory(prefix="chat-chromium-") as profile:
        chromium = subprocess.Popen(
            [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-address=127.0.0.1",
             "--remote-debugging-port=0", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        try:
            port_file = Path(profile) / "DevToolsActivePort"  # Chromium writes the port it chose here
            deadline = time.monotonic() + 60
            while not (port_file.exists() and port_file.read_text().strip()):
                assert chromium.poll() is None, f"chromium exited with {chromium.returncode}"
                assert time.monotonic() < deadline, "chromium wrote no DevToolsActivePort in 60 s"
                time.sleep(0.1)
            devtools_port = port_file.read_text().split()[0]
            with sync_api.sync_playwright() as playwright:
                connection = playwright.chromium.connect_over_cdp(f"http://127.0.0.1:{devtools_port}")
                try:
                    yield connection
                finally:
                    connection.close()
        finally:
            stop_group(chromium)


def socketio_events(frames: list[str], names: set[str]) -> list[tuple[str, dict]]:
    """(event, data) of the Socket.IO events named `names` among websocket text frames."""
    events = []
    for frame in frames:
        if isinstance(frame, str) and frame.startswith("42["):  # "4" message, "2" event
            name, data = json.loads(frame[2:])[:2]
            if name in names:
                events.append((name, data))
    return events


@pytest.mark.slow
@needs_chromium
def test_chat_streams_the_greedy_continuation_and_applies_settings(tiny_gpt2, browser, tmp_path):
    log_file = tmp_path / "chat.log"
    with chat_server(tiny_gpt2, log_file, "--temperature", "0", "--max-new-tokens", "24") as (server, url):
        expected = greedy_continuation(tiny_gpt2, 24)  # while the server loads
        expected_short = greedy_continuation(tiny_gpt2, 3)
        wait_until_serving(server, url, log_file)

        context = browser.new_context(viewport={"width": 1100, "height": 1150})
        page = context.new_page()
        frames: list[str] = []
        page.on("websocket", lambda ws: ws.on("framereceived", lambda payload: frames.append(payload)))
        page.goto(url)

        # The model and its source.
        about = page.locator(".message-content", has_text="Weights:")
        sync_api.expect(about).to_contain_text(str(tiny_gpt2), timeout=60_000)
        sync_api.expect(about).to_contain_text("gpt2")
        sync_api.expect(about).to_contain_text("on cpu")

        # Record the reply's length at every DOM change, to see it grow while it streams.
        page.evaluate("""selector => {
            window.replyLengths = [];
            new MutationObserver(() => {
                const replies = document.querySelectorAll(selector);
                if (replies.length) window.replyLengths.push(replies[replies.length - 1].textContent.length);
            }).observe(document.body, {subtree: true, childList: true, characterData: true});
        }""", REPLY_TEXT)
        page.fill("#chat-input", PROMPT)
        page.press("#chat-input", "Enter")
        footers = page.locator(".message-content span.italic", has_text=re.compile(r"\d+ tokens in"))
        sync_api.expect(footers).to_have_count(1, timeout=60_000)

        # The rendered reply is the greedy continuation, character for character (a code
        # block's text ends with one newline).
        replies = page.locator(REPLY_TEXT)
        assert replies.nth(0).text_content() == expected + "\n"
        sync_api.expect(footers.nth(0)).to_contain_text("24 tokens in")
        # It streamed: token by token over the websocket, and growing on the page.
        streamed = socketio_events(frames, {"stream_start", "stream_token"})
        assert streamed[0][0] == "stream_start"
        tokens = [data["token"] for name, data in streamed[1:]]
        assert len(tokens) >= 20, tokens  # 24 tokens; a token that ends mid-character sends nothing
        assert streamed[0][1]["output"] + "".join(tokens) == "```\n" + expected
        growing = {n for n in page.evaluate("window.replyLengths") if 0 < n < len(expected)}
        assert len(growing) >= 3, sorted(growing)

        # A setting changed in the settings panel applies to the next reply.
        page.click("#chat-settings-open-modal")
        page.fill("#max_new_tokens", "3")
        page.click("#confirm")
        sync_api.expect(page.locator("#chat-settings")).to_have_count(0)
        page.fill("#chat-input", PROMPT)
        page.press("#chat-input", "Enter")
        sync_api.expect(footers).to_have_count(2, timeout=60_000)
        assert replies.nth(1).text_content() == expected_short + "\n"
        sync_api.expect(footers.nth(1)).to_contain_text("3 tokens in")
        sync_api.expect(footers.nth(1)).to_contain_text("at most 3 new tokens")

        about.scroll_into_view_if_needed()  # the whole conversation, from the model description on
        screenshot = tmp_path / "chat-screenshot.png"
        page.screenshot(path=str(screenshot))
        context.close()
    assert screenshot.read_bytes().startswith(b"\x89PNG")
    if os.environ.get("GPTRAIN_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(screenshot, README_SCREENSHOT)


def test_missing_weights_fail_before_the_server_starts(tmp_path):
    uncommitted_run = tmp_path / "run"
    (uncommitted_run / "checkpoints" / "step-3").mkdir(parents=True)  # a save cut short: no commit.json
    for weights, problem in [(tmp_path / "nope", "no such weights"), (uncommitted_run, "no committed checkpoint")]:
        started = time.monotonic()
        result = gptrain("chat", "--weights", str(weights), "--port", str(free_port()), timeout=60)
        assert result.returncode == EXIT_BAD_INPUT, result.stderr
        assert f"{weights}: " in result.stderr and problem in result.stderr and "Traceback" not in result.stderr
        assert time.monotonic() - started < 30  # no model load, no Chainlit


@pytest.mark.slow
@needs_chromium
def test_unreadable_weights_are_reported_on_the_console_and_in_the_page(tiny_gpt2, browser, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_bytes((tiny_gpt2 / "config.json").read_bytes())
    (broken / "model.safetensors").write_bytes(b"\xff" * 1000)
    log_file = tmp_path / "chat.log"
    with chat_server(broken, log_file) as (server, url):
        wait_until_serving(server, url, log_file)
        assert f"cannot load the model from {broken}" in log_file.read_text()
        assert "not a readable safetensors file" in log_file.read_text()

        context = browser.new_context()
        page = context.new_page()
        page.goto(url)
        sync_api.expect(page.locator(".message-content").first).to_contain_text(
            f"cannot load the model from {broken}", timeout=60_000
        )
        page.fill("#chat-input", PROMPT)
        page.press("#chat-input", "Enter")
        sync_api.expect(page.get_by_text(f"cannot load the model from {broken}")).to_have_count(2, timeout=60_000)
        context.close()

        # SIGTERM to `gptrain chat` alone (as from `kill` or a container runtime) stops its server too.
        server.terminate()
        assert server.wait(timeout=30) == 0
        deadline = time.monotonic() + 30
        while live_processes_in_group(server.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not live_processes_in_group(server.pid)


def test_verbatim_reply_fence_outgrows_backtick_runs():
    reply, shown = VerbatimReply(), ""
    for piece in ["", "a ``", "", "`", "b\n", "````", "` c"]:
        markdown, replaces = reply.add(piece)
        shown = markdown if replaces else shown + markdown  # what Chainlit's stream_token does
        assert shown == (reply.markdown(closed=False) if reply.text else "")
    assert reply.text == "a ```b\n````` c"
    assert reply.markdown() == "``````\na ```b\n````` c\n``````"


def test_chat_config_takes_the_settings_panel_values():
    config = ChatConfig(weights="w", temperature=0.8, top_k=40, max_new_tokens=100)
    assert ChatConfig.from_env(config.to_env()) == config
    changed = config.with_settings({"temperature": 0, "top_k": "0", "top_p": 1, "max_new_tokens": "3"})
    assert (changed.temperature, changed.top_k, changed.top_p, changed.max_new_tokens) == (0, None, None, 3)
    assert changed.sampling().max_new_tokens == 3 and changed.settings_summary() == "greedy, at most 3 new tokens"
    kept = config.with_settings({"temperature": 1.5, "top_k": "", "top_p": 0.9, "max_new_tokens": None})
    assert (kept.temperature, kept.top_k, kept.top_p, kept.max_new_tokens) == (1.5, 40, 0.9, 100)
    with pytest.raises(GptrainError, match="max_new_tokens"):
        config.with_settings({"max_new_tokens": "2.5"})
    with pytest.raises(GptrainError, match="temperature"):
        config.with_settings({"temperature": -1})
    with pytest.raises(GptrainError, match="top_k"):
        config.with_settings({"top_k": "many"})


# --- the Llama 3 chat template ------------------------------------------------------------


LLAMA3_CONVERSATION = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "  And of <|eot_id|> Italy?\n"},
]


def test_llama3_chat_template_token_ids(llama_model_file):
    tokenizer = get_tokenizer(str(llama_model_file))  # GPT-2's 50,256 ranks, then Llama 3's 256 special tokens
    ids = tokenizer.encode_chat(LLAMA3_CONVERSATION)
    # Meta's format, written out: the same ids as the text with its special tokens read as such.
    formatted = (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou answer in one word.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of France?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nParis.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n"
    )
    typed = tokenizer.encode_ordinary("And of <|eot_id|> Italy?")  # what the user typed stays text
    end = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    assert ids == tokenizer.encode(formatted) + typed + tokenizer.encode(end)
    # The special tokens at Llama 3's ids (128000 + k there, 50256 + k here).
    first = 50256
    assert ids[:2] == [first, first + 6] and ids.count(first + 9) == 4 and ids.count(first + 7) == 5
    header = [first + 6, *tokenizer.encode_ordinary("assistant"), first + 7, *tokenizer.encode_ordinary("\n\n")]
    assert ids[-len(header):] == header  # the model writes the next reply
    assert tokenizer.special_tokens["<|eot_id|>"] in tokenizer.stop_ids
    with pytest.raises(GptrainError, match="needs Llama 3's header tokens"):
        get_tokenizer("gpt2").encode_chat(LLAMA3_CONVERSATION)


def chain_model(tokenizer, chain: list[int]) -> Transformer:
    """A tiny Llama whose greedy next token after chain[i] is chain[i + 1]: its blocks add
    nothing to the residual stream, so the logits depend on the last token's embedding only
    (one-hot for the chain's tokens, zero for the rest, whose next token is then id 0)."""
    config = ModelConfig(family="llama", vocab_size=tokenizer.n_vocab, context_length=256, n_layers=1, n_heads=4,
                         n_kv_heads=2, d_model=64, d_ff=128)
    model = Transformer(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.fill_(1.0 if "norm" in name else 0.0)
        for k, (token, next_token) in enumerate(zip(chain, chain[1:])):
            model.tok_emb.weight[token, k] = 1.0
            model.lm_head.weight[next_token, k] = 10.0
    return model.eval()


@pytest.fixture(scope="module")
def llama_instruct(llama_model_file, tmp_path_factory) -> Path:
    """A Llama 3 "instruct" model that answers "Hi!" and ends its turn."""
    tokenizer = get_tokenizer(str(llama_model_file))
    chain = [*tokenizer.encode("\n\n"), *tokenizer.encode("Hi!"), tokenizer.special_tokens["<|eot_id|>"]]
    assert len(chain) == 4 and chain[2] == 0  # "!" is token 0: also what any other token leads to
    folder = tmp_path_factory.mktemp("llama") / "Tiny-Llama-3-Instruct"
    save_hf_pretrained(chain_model(tokenizer, chain), str(folder))
    shutil.copyfile(llama_model_file, folder / "tokenizer.model")
    return folder


def test_generate_applies_the_template_to_instruct_weights_and_stops_at_end_of_turn(llama_instruct, capsys):
    from gptrain.cli import main

    base = llama_instruct.parent / "tiny-llama-base"
    shutil.copytree(llama_instruct, base)
    greedy = ["--temperature", "0", "--max-new-tokens", "20"]

    def generated(*args: str) -> str:
        assert main(["generate", *args, *greedy]) == 0
        return capsys.readouterr().out

    # Instruct weights (told by their name): the prompt is a user message, the reply ends at <|eot_id|>.
    assert generated("--weights", str(llama_instruct), "--prompt", "Hello") == "Hi!\n"
    assert generated("--weights", str(llama_instruct), "--prompt", "Hello", "--system-prompt", "Be kind.") == "Hi!\n"
    # A base model continues the text (and stops at the end-of-turn token too); asked, it chats.
    assert generated("--weights", str(base), "--prompt", "Hello") == "Hello!\n"
    assert generated("--weights", str(base), "--prompt", "Hello", "--chat-template", "llama3") == "Hi!\n"
    assert generated("--weights", str(llama_instruct), "--prompt", "Hello", "--chat-template", "none") == "Hello!\n"
    # Or the generation config says so: eos_token_id includes <|eot_id|>.
    (base / "generation_config.json").write_text(json.dumps({"eos_token_id": [50257, 50265]}))
    assert generated("--weights", str(base), "--prompt", "Hello", "--no-stream") == "Hi!\n"
    assert main(["generate", "--weights", str(base), "--prompt", "x", "--chat-template", "none",
                 "--system-prompt", "Be kind."]) == 2
    assert "--system-prompt needs a chat template" in capsys.readouterr().err


def test_conversation_keeps_history_and_forgets_the_oldest_exchange(llama_model_file):
    tokenizer = get_tokenizer(str(llama_model_file))
    chat = Conversation(tokenizer, "llama3", system_prompt="Be brief.")
    system = {"role": "system", "content": "Be brief."}
    assert chat.prompt("Hello", room=200) == tokenizer.encode_chat([system, {"role": "user", "content": "Hello"}])
    chat.add_reply("Hello", "Hi!")
    second = [system, {"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi!"},
              {"role": "user", "content": "Again"}]
    assert chat.prompt("Again", room=200) == tokenizer.encode_chat(second)
    short = tokenizer.encode_chat([system, {"role": "user", "content": "Again"}])
    assert chat.prompt("Again", room=len(short)) == short and chat.history == []
    base = Conversation(tokenizer, None)
    base.add_reply("Hello", " world")
    assert base.prompt("Hello", room=0) == tokenizer.encode("Hello") and base.history == []


@pytest.mark.slow
@needs_chromium
def test_chat_answers_instruct_weights_in_the_template(llama_instruct, browser, tmp_path):
    log_file = tmp_path / "chat.log"
    with chat_server(llama_instruct, log_file, "--temperature", "0", "--system-prompt", "Be kind.") as (server, url):
        wait_until_serving(server, url, log_file)
        context = browser.new_context()
        page = context.new_page()
        page.goto(url)
        about = page.locator(".message-content", has_text="Weights:")
        sync_api.expect(about).to_contain_text("llama3 chat template", timeout=60_000)
        footers = page.locator(".message-content span.italic", has_text=re.compile(r"\d+ tokens in"))
        for turn, message in enumerate(["Hello", "How are you?"], start=1):
            page.fill("#chat-input", message)
            page.press("#chat-input", "Enter")
            sync_api.expect(footers).to_have_count(turn, timeout=60_000)
            # "Hi" and "!", then the end-of-turn token, which ends the reply (256 were allowed).
            assert page.locator(REPLY_TEXT).nth(turn - 1).text_content() == "Hi!\n"
            sync_api.expect(footers.nth(turn - 1)).to_contain_text("2 tokens in")
        context.close()
