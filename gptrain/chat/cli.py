"""`gptrain chat --weights DIR_OR_RUN [--host 127.0.0.1 --port 8000]`: chat with one model in the browser.

    gptrain chat --weights runs/debug                      # the run's newest committed checkpoint
    gptrain chat --weights exported/gpt2 --temperature 0 --port 8001
    gptrain chat --weights Llama-3.2-1B-Instruct --system-prompt "Answer briefly."   # chat template

The weights path is checked before anything starts (exit 2 naming the path when there is
nothing to load). Then `chainlit run app.py` serves the chat in a child process, configured
through the environment, with Chainlit's config and scratch files in a temporary folder
rather than the current directory. SIGTERM or Ctrl-C stops both.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile

from gptrain.errors import GptrainError

log = logging.getLogger("gptrain.chat")

APP_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "app.py")

# Chainlit's settings (it reads .chainlit/config.toml under its app root). It refuses a
# config file without [meta] generated_by; user prompts are shown verbatim, not as Markdown.
CHAINLIT_CONFIG = """\
[meta]
generated_by = "{version}"

[features]
user_message_markdown = false
edit_message = false

[features.spontaneous_file_upload]
enabled = false

[UI]
name = "gptrain"
"""

README = """\
# gptrain chat

Serving `{weights}`.

Instruct weights (or `--chat-template llama3`) answer in the Llama 3 chat template and remember
the conversation; a base model continues the text you send, each message afresh. Open the
settings button beside the message box to change the temperature (0 is greedy decoding),
top-k, top-p and the maximum number of new tokens.
"""


def register(subparsers) -> None:
    from gptrain.models.cli import add_model_arguments, add_sampling_arguments

    p = subparsers.add_parser(
        "chat",
        help="chat with a model in the browser (needs gptrain[ui])",
        description="Serve one model in a Chainlit chat page. WEIGHTS is anything `gptrain generate` "
        "loads; a gptrain run directory means its newest committed checkpoint. The sampling options "
        "set the chat's initial settings.",
    )
    add_model_arguments(p)
    add_sampling_arguments(p, max_new_tokens=256)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="default: %(default)s")
    p.set_defaults(func=run_chat)


def run_chat(args: argparse.Namespace) -> int:
    from gptrain.chat.config import ChatConfig
    from gptrain.models.loading import resolve_weights

    config = ChatConfig(
        weights=args.weights, tokenizer=args.tokenizer, device=args.device, dtype=args.dtype,
        chat_template=args.chat_template, system_prompt=args.system_prompt,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
    )
    source = resolve_weights(config.weights)
    version = chainlit_version()
    check_port_free(args.host, args.port)
    with tempfile.TemporaryDirectory(prefix="gptrain-chat-") as app_root:
        os.makedirs(os.path.join(app_root, ".chainlit"))
        with open(os.path.join(app_root, ".chainlit", "config.toml"), "w") as f:
            f.write(CHAINLIT_CONFIG.format(version=version))
        with open(os.path.join(app_root, "chainlit.md"), "w") as f:
            f.write(README.format(weights=source.description))
        command = [sys.executable, "-m", "chainlit", "run", APP_FILE, "--headless",
                   "--host", args.host, "--port", str(args.port)]
        env = {**os.environ, **config.to_env(), "CHAINLIT_APP_ROOT": app_root}
        log.info("loading %s; the chat will be at http://%s:%d", source.description, args.host, args.port)
        return serve(command, env, cwd=app_root)


def chainlit_version() -> str:
    try:
        return importlib.metadata.version("chainlit")
    except importlib.metadata.PackageNotFoundError:
        raise GptrainError("gptrain chat needs Chainlit: pip install 'gptrain[ui]'") from None


def check_port_free(host: str, port: int) -> None:
    """Refuse a busy address now rather than after the model has loaded."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            probe.bind((host, port))
        except OSError as err:
            raise GptrainError(f"cannot listen on {host}:{port}: {err.strerror}") from None


def serve(command: list[str], env: dict[str, str], cwd: str) -> int:
    """Run the server until it exits; SIGTERM is passed on to it."""
    server = subprocess.Popen(command, env=env, cwd=cwd)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: server.terminate())
    try:
        while True:
            try:
                return server.wait()
            except KeyboardInterrupt:  # Ctrl-C reached the server as well: let it shut down
                continue
    finally:
        signal.signal(signal.SIGTERM, previous)
        if server.poll() is None:
            server.kill()
            server.wait()
