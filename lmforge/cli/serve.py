"""`lmforge serve MODEL_DIR`: the OpenAI-compatible server (lmforge/serve/) on uvicorn."""

from __future__ import annotations

from pathlib import Path

from lmforge.errors import LmforgeError


def register(verbs, parser_class) -> None:
    p = verbs.add_parser("serve", help="serve a model folder over an OpenAI-compatible HTTP API, with a playground")
    p.add_argument("model_dir", help="a model folder (lmforge's, or a Hugging Face one, converted as it loads)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="(default 8000)")
    p.add_argument("--model-name", help="the model's name in the API (default: the folder's name)")
    p.add_argument("--api-key", action="append", help="accept only requests with 'Authorization: Bearer KEY' "
                                                      "(repeatable; also LMFORGE_API_KEYS, comma-separated)")
    p.add_argument("--rate-limit", type=int, help="requests per minute per API key (or per client address)")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together (default 16)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting for a slot; more are refused with 429 (default 64)")
    p.add_argument("--max-prompt-tokens", type=int, help="longer prompts are refused with 413 (default: block size)")
    p.add_argument("--max-tokens", type=int, default=256, help="the most tokens one request may ask for (default 256)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a request may take in all (default 300)")
    p.add_argument("--blocklist", help="file of blocked words (and re:REGEX lines) masked in the output")
    p.add_argument("--int8", action="store_true", help="int8 weights, as generate --int8")
    p.add_argument("--threads", type=int, help="torch threads for the model (default: torch's, one per core); "
                                               "replicas sharing a machine should split its cores")
    p.set_defaults(func=cmd_serve)


def build_app(args):
    """The FastAPI app the flags describe (tests and benchmarks call this too)."""
    import os

    from lmforge.finetune.instruct import chat_template_of
    from lmforge.model_folder import load_model
    from lmforge.serve.app import ServeSettings, create_app
    from lmforge.serve.limits import OutputFilter

    for flag in ("max_batch", "port"):
        if getattr(args, flag) < 1:
            raise LmforgeError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.max_queue < 0:
        raise LmforgeError("--max-queue must be 0 or more")
    if args.max_prompt_tokens is not None and args.max_prompt_tokens < 1:
        raise LmforgeError("--max-prompt-tokens must be at least 1")
    if args.timeout <= 0:
        raise LmforgeError("--timeout must be positive")
    if args.threads is not None:
        if args.threads < 1:
            raise LmforgeError("--threads must be at least 1")
        import torch

        torch.set_num_threads(args.threads)
    keys = list(args.api_key or []) + [k for k in os.environ.get("LMFORGE_API_KEYS", "").split(",") if k]
    output_filter = OutputFilter.from_file(args.blocklist) if args.blocklist else OutputFilter()
    model, tokenizer = load_model(args.model_dir)
    if getattr(model, "lora", None) is not None:  # an adapter folder: folded in, as generate does
        from lmforge.finetune.lora import merge

        merge(model)
    if args.int8:
        from lmforge.quantize import quantize_int8

        model = quantize_int8(model)
    settings = ServeSettings(
        name=args.model_name or Path(args.model_dir).resolve().name, api_keys=keys, rate_limit=args.rate_limit,
        max_batch=args.max_batch, max_queue=args.max_queue, max_prompt_tokens=args.max_prompt_tokens,
        max_tokens=args.max_tokens, timeout=args.timeout, output_filter=output_filter,
        chat_template=chat_template_of(args.model_dir))
    return create_app(model, tokenizer, settings)


def cmd_serve(args) -> int:
    import uvicorn

    app = build_app(args)
    # uvicorn handles SIGTERM and SIGINT: it stops accepting connections, lets open requests
    # finish (the engine keeps decoding until the lifespan ends), then stops the engine.
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=60)
    return 0
