"""`gptrain generate`: sample text from pretrained weights or a gptrain run."""

from __future__ import annotations

import argparse
import sys


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--weights and how to load them; shared with `gptrain chat`."""
    p.add_argument("--weights", required=True, help="weights folder/file or gptrain run directory")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer name or tokenizer.model path (default: from the weights)")
    p.add_argument("--device", default="auto", help="default: CUDA, then Apple MPS, then the CPU")
    p.add_argument("--dtype", default=None, help="cast weights (fp32, bf16, fp16); default keeps the stored dtype")
    from gptrain.models.loading import CHAT_TEMPLATES

    p.add_argument("--chat-template", choices=CHAT_TEMPLATES, default="auto",
                   help="llama3: prompts are user messages in Llama 3's chat format, replies end at "
                   "<|eot_id|>; auto (default): llama3 for instruct weights (named *Instruct*, or whose "
                   "eos_token_id is <|eot_id|>), else plain text continuation (none)")
    p.add_argument("--system-prompt", default=None, help="the system message, with a chat template")


def add_sampling_arguments(p: argparse.ArgumentParser, max_new_tokens: int = 64) -> None:
    """How to pick tokens; shared with `gptrain chat` (its initial chat settings)."""
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.8, help="0 means greedy decoding")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate text from a weights folder or a gptrain run",
        description="Generate text with a KV cache. WEIGHTS is an HF-layout folder (GPT-2 or Llama), "
        "OpenAI's GPT-2 TensorFlow checkpoint folder (needs gptrain[tf]), a reference-book .pth state dict, "
        "Meta's original Llama layout, or a gptrain run directory. A base model continues each prompt; "
        "with a chat template, each prompt is a user message and the reply is printed.",
    )
    add_model_arguments(p)
    p.add_argument("--prompt", action="append", required=True,
                   help="prompt text; repeat for a batch (batched prompts are printed at the end)")
    add_sampling_arguments(p)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-stream", action="store_true", help="print the text once generation is finished")
    p.add_argument("--no-cache", action="store_true", help="recompute every position at each step (for checking)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="a gptrain checkpoint: skip the sha256 check of its files (sizes are still checked)")
    p.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from gptrain.models.generation import SamplingConfig, generate, generate_stream
    from gptrain.models.loading import check_system_prompt, load_model_and_tokenizer
    from gptrain.tokenizer import StreamingDecoder

    loaded = load_model_and_tokenizer(args.weights, device=args.device, dtype=args.dtype, tokenizer=args.tokenizer,
                                      chat_template=args.chat_template, verify=args.verify)
    model, tokenizer = loaded.model, loaded.tokenizer
    config = SamplingConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, seed=args.seed, stop_ids=tuple(tokenizer.stop_ids), use_cache=not args.no_cache,
    )
    check_system_prompt(loaded, args.system_prompt)
    if loaded.chat_template is None:
        prompts = [tokenizer.encode(text) for text in args.prompt]
        shown = args.prompt  # a continuation is printed after its prompt; a chat reply alone
    else:
        system = [{"role": "system", "content": args.system_prompt}] if args.system_prompt is not None else []
        prompts = [tokenizer.encode_chat([*system, {"role": "user", "content": text}]) for text in args.prompt]
        shown = [""] * len(prompts)
    if len(prompts) == 1 and not args.no_stream:
        decoder = StreamingDecoder(tokenizer)
        sys.stdout.write(shown[0])
        for step in generate_stream(model, prompts, config):
            if step[0] is not None:
                sys.stdout.write(decoder.push(step[0]))
                sys.stdout.flush()
        sys.stdout.write(decoder.flush() + "\n")
        return 0
    for text, new_tokens in zip(shown, generate(model, prompts, config)):
        print(text + tokenizer.decode(new_tokens))
    return 0
