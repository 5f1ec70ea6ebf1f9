"""The verbs that use a model folder (generate, fill-mask, eval, predict, convert, merge-lora), and the rest."""

from __future__ import annotations

import json


def cmd_tokenizer_train(args) -> int:
    from lmforge.data.corpus import load_corpus
    from lmforge.tokenize import Tokenizer

    documents, stats = load_corpus(args.data)
    tokenizer = Tokenizer.train(args.kind, documents, vocab_size=args.vocab_size)
    tokenizer.save(args.out)
    print(f"{tokenizer.kind} tokenizer, {tokenizer.vocab_size} tokens, from {stats.summary()} → {args.out}")
    return 0


def _generation_config(args):
    from lmforge.generate import GenerationConfig

    return GenerationConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        stop=tuple(args.stop or ()), seed=args.seed, compile=getattr(args, "compile", False),
    )


def cmd_generate(args) -> int:
    import torch

    from lmforge.generate import generate, stream
    from lmforge.model_folder import load_model

    config = _generation_config(args)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model_dir)
    if getattr(model, "lora", None) is not None:  # an adapter folder: folded in, int8 and the fused decode step apply
        from lmforge.finetune.lora import merge

        merge(model)
    if args.int8:
        from lmforge.quantize import quantize_int8

        model = quantize_int8(model)
    prompts = shown = args.prompt
    if args.chat:  # each prompt is a user's turn in the folder's chat template; only the reply is printed
        from lmforge.finetune.instruct import chat_prompts

        prompts, shown = chat_prompts(args.model_dir, tokenizer, args.prompt), [""] * len(prompts)
    if args.stream:
        for index, prompt in enumerate(prompts):
            pieces = stream(model, tokenizer, [prompt], config)
            first = next(pieces)  # any error surfaces before anything is printed
            print(("\n" + "-" * 40 + "\n" if index else "") + shown[index] + first[0], end="", flush=True)
            for piece in pieces:
                print(piece[0], end="", flush=True)
            print()
        return 0
    outputs = generate(model, tokenizer, prompts, config)
    for index, (prompt, text) in enumerate(zip(args.prompt, outputs, strict=True)):
        if args.json:
            print(json.dumps({"prompt": prompt, "completion": text}))
            continue
        if index:
            print("-" * 40)
        print(shown[index] + text)
    return 0


def cmd_fill_mask(args) -> int:
    from dataclasses import asdict

    from lmforge.fill_mask import fill_mask_folder

    masks = fill_mask_folder(args.model_dir, args.text, top_k=args.top_k)
    if args.json:
        print(json.dumps({"text": args.text, "masks": [[asdict(p) for p in mask] for mask in masks]},
                         ensure_ascii=False))
        return 0
    for index, predictions in enumerate(masks, 1):
        print(f"mask {index} of {len(masks)}:")
        for p in predictions:
            print(f"  {p.score:.4f}  {json.dumps(p.token_str, ensure_ascii=False)}")
    return 0


def cmd_eval(args) -> int:
    from lmforge.evaluate.tasks import eval_command

    return eval_command(args)


def cmd_predict(args) -> int:
    from lmforge.finetune.predict import predict_command

    return predict_command(args)


def cmd_convert(args) -> int:
    from lmforge.model_folder import convert_from_hf, convert_to_hf

    if args.from_hf:
        model = convert_from_hf(args.from_hf, args.out)
        source, kind = args.from_hf, "Hugging Face"
    else:
        model = convert_to_hf(args.to_hf, args.out)
        source, kind = args.to_hf, "lmforge"
    config = model.config
    print(
        f"{kind} {source} → {args.out}: {config.arch}, {config.n_layer} layers × {config.n_embd}, "
        f"{model.num_parameters() / 1e6:.2f}M parameters"
    )
    return 0


def cmd_merge_lora(args) -> int:
    from lmforge.model_folder import merge_adapter

    model = merge_adapter(args.adapter_dir, args.out)
    print(f"{args.adapter_dir} merged into its base → {args.out}: {model.config.arch}, "
          f"{model.num_parameters() / 1e6:.2f}M parameters")
    return 0


def cmd_demo(args) -> int:
    from lmforge.demo import run_demo

    return run_demo(minutes=args.minutes, out=args.out)
