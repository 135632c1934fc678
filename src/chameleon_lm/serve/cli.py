"""``chameleon serve``: load a model folder and serve it over HTTP (``serve/app.py``)."""

from __future__ import annotations

import argparse
import os
import torch


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``serve``."""
    from chameleon_lm.generation.cli import add_model_args

    p = subparsers.add_parser("serve", help="serve a model: OpenAI-compatible API and web viewer")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--name", help="the model id clients use (default: the folder's name)")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="cast the weights (default: as stored; bf16 on a GPU is usual)")
    p.add_argument("--max-batch", type=int, default=32, help="requests decoded together (default 32)")
    p.add_argument("--max-concurrent", type=int, default=128,
                   help="requests in flight, queued included; more get 429 (default 128)")
    p.add_argument("--max-prompt-tokens", type=int, help="default: the model's max_seq_len")
    p.add_argument("--max-new-tokens", type=int, default=4096, help="largest max_tokens (default 4096)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request (default 600)")
    p.add_argument("--max-image-mb", type=float, default=16.0, help="bytes per input image (default 16 MB)")
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="require this bearer key on /v1/* (repeatable; also $CHAMELEON_API_KEYS, "
                        "comma-separated)")
    p.add_argument("--allow-remote-images", action="store_true",
                   help="fetch http(s) image URLs in requests (default: data: URLs only)")
    p.add_argument("--prompt-format", choices=["raw", "chat"], default="raw",
                   help="raw: the messages as one document (base models); chat: the sft layout")
    p.add_argument("--threads", type=int, help="CPU threads of the engine process (default: torch's)")
    p.add_argument("--compile", action="store_true",
                   help="decode through torch.compile (faster steps; compiles for a minute at start)")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from chameleon_lm.checkpoints import load_model
    from chameleon_lm.serve.app import ServeConfig, create_app

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    bundle = load_model(args.model, device=device, vqgan=args.vqgan)
    if args.dtype:
        bundle.model.to(getattr(torch, args.dtype))
    keys = args.api_key + [k for k in os.environ.get("CHAMELEON_API_KEYS", "").split(",") if k]
    config = ServeConfig(
        model_name=args.name or args.model.resolve().name, max_batch=args.max_batch,
        max_concurrent=args.max_concurrent, max_prompt_tokens=args.max_prompt_tokens,
        max_new_tokens=args.max_new_tokens, request_timeout_s=args.timeout,
        max_image_bytes=int(args.max_image_mb * 2**20), api_keys=keys,
        allow_remote_images=args.allow_remote_images, prompt_format=args.prompt_format,
        threads=args.threads, compile=args.compile,
    )
    app = create_app(bundle.model, bundle.codec, config)
    print(f"serving {config.model_name} on http://{args.host}:{args.port}/ (viewer at /, API at /v1)",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
