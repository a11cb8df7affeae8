"""The `leanformers` command line: generate, chat, info, perplexity, bench, finetune.

Every command takes `-m/--model` (default: the bundled smollm2-135m-instruct). Errors print one line
`leanformers: error: ...` and exit with status 1 (2 for usage errors), never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

from .errors import LeanformersError
from .hub import DEFAULT_MODEL

EXIT_ERROR = 1


def _add_model_args(p: argparse.ArgumentParser, *, positional: bool = False) -> None:
    if positional:
        p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                       help=f"model: alias, HF directory, org/name[@rev] or .gguf file (default: {DEFAULT_MODEL})")
        p.add_argument("-m", "--model", dest="model_option", default=None, help="same as the positional MODEL")
    else:
        p.add_argument("-m", "--model", default=DEFAULT_MODEL,
                       help=f"model: alias, HF directory, org/name[@rev] or .gguf file (default: {DEFAULT_MODEL})")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="weights/activations dtype (default: the checkpoint's; float32 for GGUF)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--revision", default=None, help="branch, tag or commit for org/name references")
    p.add_argument("--offline", action="store_true", help="never download; use local files and the HF cache only")


def _add_speed_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", default=None, help="a LoRA adapter directory (PEFT format) to apply")  # [finetune]
    p.add_argument("--quantize", choices=["int8", "int4"], default=None, help="weight-only quantization")
    p.add_argument("--group-size", type=int, default=32, help="int4 group size (default: 32)")
    p.add_argument("--compile", action="store_true", help="compile the decode step (cached on disk)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256, help="most tokens to generate (default: 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past EOS (benchmarks)")
    p.add_argument("--truncate", action="store_true", help="keep the end of a prompt longer than the context")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                   help="print text as it is generated (default: on)")
    p.add_argument("--draft", default=None,
                   help="speculative decoding: a draft MODEL with the same tokenizer, self-int4 or prompt-lookup")
    p.add_argument("--num-draft-tokens", type=int, default=None, help="fixed draft length (default: adaptive)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leanformers", description=__doc__.splitlines()[0])
    from . import __version__

    parser.add_argument("--version", action="version", version=f"leanformers {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    g = sub.add_parser("generate", help="continue a prompt", description="Generate a continuation of PROMPT.")
    g.add_argument("prompt", help="the prompt text ('-' reads it from stdin)")
    g.add_argument("--chat", action="store_true", help="wrap PROMPT as a user message in the chat template")
    g.add_argument("--system", default=None, help="system message (with --chat)")
    _add_model_args(g)
    _add_speed_args(g)
    _add_sampling_args(g)
    g.add_argument("--stats", action="store_true", help="print token counts and speed to stderr")

    c = sub.add_parser("chat", help="interactive chat",
                       description="Chat with the model. Commands: /reset clears the history, /exit quits. "
                                   "Reads one message per line from a pipe too.")
    c.add_argument("--system", default=None, help="system message")
    _add_model_args(c)
    _add_speed_args(c)
    _add_sampling_args(c)

    i = sub.add_parser("info", help="describe a model", description="Architecture, size, dtype, context, files.")
    _add_model_args(i, positional=True)

    pp = sub.add_parser("perplexity", help="perplexity of a text file",
                        description="Sliding-window perplexity of FILE (default: the bundled English test text).")
    pp.add_argument("file", nargs="?", default=None, help="text file (default: bundled test text)")
    _add_model_args(pp)
    _add_speed_args(pp)
    pp.add_argument("--context", type=int, default=512, help="window length in tokens (default: 512)")
    pp.add_argument("--stride", type=int, default=256, help="new tokens scored per window (default: 256)")

    _add_finetune_parser(sub)  # [finetune]

    b = sub.add_parser("bench", help="benchmark decode/prefill speed", add_help=False,
                       description="Benchmark (see `leanformers bench --help`).")
    b.add_argument("bench_args", nargs=argparse.REMAINDER)
    return parser


def _load(args: argparse.Namespace):
    from .lm import load

    kwargs: dict[str, Any] = dict(
        dtype=None if args.dtype == "auto" else args.dtype,
        device=args.device,
        revision=args.revision,
        offline=True if args.offline else None,
    )
    if getattr(args, "quantize", None):
        kwargs.update(quantize=args.quantize, group_size=args.group_size)
    if getattr(args, "adapter", None):  # [finetune] a LoRA adapter directory on top of the model
        kwargs["adapter"] = args.adapter
    lm = load(args.model, **kwargs)
    if getattr(args, "compile", False):
        # with --draft, the graph that verifies drafted tokens is built (or loaded) now as well
        lm.compile(speculative=bool(getattr(args, "draft", None)))
    return lm


def _gen_kwargs(args: argparse.Namespace, lm) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop,
        ignore_eos=args.ignore_eos, truncate=args.truncate,
    )
    if args.draft:
        draft: Any = args.draft
        if draft not in ("self-int4", "prompt-lookup"):
            from .lm import load

            draft = load(draft, dtype=lm.dtype, device=args.device, offline=True if args.offline else None)
        kwargs["draft"] = draft
        if args.num_draft_tokens is not None:
            kwargs["num_draft_tokens"] = args.num_draft_tokens
    return kwargs


def _emit(lm, prompt_or_messages, args, *, chat: bool) -> Any:
    """Generate and print (streamed or at the end); returns the GenerationResult."""
    kwargs = _gen_kwargs(args, lm)
    if args.stream:
        stream = lm.chat(prompt_or_messages, stream=True, **kwargs) if chat else lm.stream(prompt_or_messages, **kwargs)
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
        result = stream.result
    else:
        result = lm.chat(prompt_or_messages, **kwargs) if chat else lm.generate(prompt_or_messages, **kwargs)
        sys.stdout.write(result.text)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return result


def cmd_generate(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt:
        raise _usage("the prompt is empty")
    lm = _load(args)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": prompt}
        ]
        result = _emit(lm, messages, args, chat=True)
    else:
        result = _emit(lm, prompt, args, chat=False)
    if args.stats:
        s = result.stats
        print(
            f"[{result.prompt_tokens} prompt tokens, {len(result.token_ids)} new, finish: {result.finish_reason}, "
            f"prefill {s.get('prefill_s', 0):.2f}s, decode {s.get('decode_tokens_per_s', 0):.1f} tok/s]",
            file=sys.stderr,
        )
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    lm = _load(args)
    interactive = sys.stdin.isatty()
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = list(system)
    if interactive:
        print("Chatting with", args.model, "- /reset clears the history, /exit quits.", file=sys.stderr)
    while True:
        if interactive:
            try:
                line = input("> ")
            except EOFError:
                print(file=sys.stderr)
                return 0
        else:
            line = sys.stdin.readline()
            if not line:
                return 0
            line = line.rstrip("\n")
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            return 0
        if text == "/reset":
            history = list(system)
            print("[history cleared]", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        result = _emit(lm, history, args, chat=True)
        history.append({"role": "assistant", "content": result.text})


def cmd_info(args: argparse.Namespace) -> int:
    from .info import describe

    print(describe(args.model_option or args.model, revision=args.revision, offline=True if args.offline else None))
    return 0


def cmd_perplexity(args: argparse.Namespace) -> int:
    from .perplexity import perplexity, perplexity_text

    if args.file is None:
        text = perplexity_text()
    else:
        try:
            with open(args.file, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise _usage(f"cannot read {args.file}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise _usage(f"{args.file} is not UTF-8 text") from None
    lm = _load(args)
    r = perplexity(lm, text, context=args.context, stride=args.stride)
    print(f"tokens: {r.tokens}\nperplexity: {r.ppl:.4f}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import main as bench_main

    return bench_main(args.bench_args)


# ------------------------------------------------------------------------------------------ finetune
def _add_finetune_parser(sub: Any) -> None:
    """`leanformers finetune`: every keyword of leanformers.finetune() as a flag (`lora_r` -> `--lora-r`)."""
    f = sub.add_parser("finetune", help="fine-tune a model (full, LoRA, QLoRA)",
                       description="Fine-tune MODEL on JSONL/JSON/.txt data; writes a PEFT adapter (LoRA/QLoRA) or "
                                   "a Hugging Face model directory (full) to --output.")
    f.add_argument("-m", "--model", default=DEFAULT_MODEL, help=f"base model (default: {DEFAULT_MODEL})")
    f.add_argument("--data", required=True, help="training data: .jsonl/.json (messages, prompt/completion, "
                                                 "instruction/output, text) or .txt")
    f.add_argument("--eval-data", default=None, help="evaluation data, same formats")
    f.add_argument("--output", "--output-dir", dest="output_dir", required=True, help="output directory")
    f.add_argument("--method", choices=["full", "lora", "qlora"], default="lora", help="default: lora")
    f.add_argument("--lora-r", type=int, default=16, help="LoRA rank (default: 16)")
    f.add_argument("--lora-alpha", type=float, default=32, help="LoRA alpha (default: 32)")
    f.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout (default: 0.0)")
    f.add_argument("--target-modules", nargs="+", default=["all-linear"],
                   help="module names (e.g. q_proj v_proj, or q_proj,v_proj) or all-linear (default)")
    f.add_argument("--quantize", choices=["int8", "int4"], default=None, help="qlora base (default: int4)")
    f.add_argument("--epochs", type=float, default=None, help="passes over the data (default: 1)")
    f.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    f.add_argument("--batch-size", type=int, default=8, help="rows per micro-batch (default: 8)")
    f.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default: 1)")
    f.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 2e-4 LoRA, 2e-5 full)")
    f.add_argument("--weight-decay", type=float, default=0.0)
    f.add_argument("--warmup-steps", type=int, default=0)
    f.add_argument("--lr-schedule", choices=["cosine", "linear", "constant"], default="cosine")
    f.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (default: 1.0)")
    f.add_argument("--seq-len", type=int, default=1024, help="tokens per row (default: 1024)")
    f.add_argument("--packing", action="store_true", help="pack short examples into full rows")
    f.add_argument("--no-truncate", dest="truncate", action="store_false",
                   help="refuse examples longer than --seq-len instead of truncating them")
    f.add_argument("--precision", choices=["auto", "fp32", "bf16-mixed", "fp16-mixed", "bf16-true"], default="auto",
                   help="default: bf16-mixed on a GPU with bf16 and for qlora, else fp32")
    f.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward")
    f.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (default: 500)")
    f.add_argument("--save-total-limit", type=int, default=None, help="keep only the newest N checkpoints")
    f.add_argument("--eval-every", type=int, default=None, help="evaluate every N steps (default: at the end)")
    f.add_argument("--seed", type=int, default=42)
    f.add_argument("--resume", nargs="?", const=True, default=False, metavar="DIR",
                   help="continue from the newest checkpoint in --output (or from DIR)")
    f.add_argument("--overwrite", action="store_true", help="replace a previous run in --output")
    f.add_argument("--log", choices=["none", "tensorboard"], default="none", help="also log to TensorBoard")
    f.add_argument("--device", default="cpu", help="torch device (default: cpu)")


def cmd_finetune(args: argparse.Namespace) -> int:
    import logging

    from .train import finetune

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("leanformers: %(message)s"))
    log = logging.getLogger("leanformers")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    options = {k: v for k, v in vars(args).items() if k not in ("command", "model", "data", "output_dir")}
    tm = options["target_modules"]
    options["target_modules"] = tm[0] if len(tm) == 1 and "," not in tm[0] else [
        t for part in tm for t in part.split(",") if t]
    if options["target_modules"] == ["all-linear"]:
        options["target_modules"] = "all-linear"
    result = finetune(args.model, data=args.data, output_dir=args.output_dir, **options)
    what = "LoRA adapter" if result.method != "full" else "model"
    evals = f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""
    loss = f", last loss {result.loss:.4f}" if result.loss is not None else ""
    print(f"saved the {what} to {result.output_dir} ({result.steps} steps{loss}{evals})", file=sys.stderr)
    return 0


def _usage(message: str) -> LeanformersError:
    from .errors import InvalidArgumentError

    return InvalidArgumentError(message)


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "info": cmd_info, "perplexity": cmd_perplexity,
            "bench": cmd_bench, "finetune": cmd_finetune}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # the benchmark has its own options: hand them over untouched
        from .bench import main as bench_main

        return bench_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except LeanformersError as exc:
        print(f"leanformers: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
