"""The `leanformers` command line: generate, chat, info, perplexity, embed, finetune, bench, serve.

Every command takes `-m/--model` (default: the bundled smollm2-135m-instruct). Arguments are checked
before a model loads. Errors print one line `leanformers: error: ...` and exit with status 1 (2 for usage
errors), never a traceback. Warnings print one line each; -v/--verbose shows the library's INFO log.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Sequence

from .errors import InvalidArgumentError, LeanformersError
from .hub import DEFAULT_MODEL

EXIT_ERROR = 1
DEFAULT_ENCODER = "all-minilm-l6-v2"


# ------------------------------------------------------------------------------------------ arguments
def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true", help="show the library's log (loading, quantizing, compiling)")


def _add_model_args(p: argparse.ArgumentParser, *, positional: bool = False, default: str = DEFAULT_MODEL) -> None:
    what = f"model: alias, HF directory, org/name[@rev] or .gguf file (default: {default})"
    if positional:
        p.add_argument("model", nargs="?", default=None, help=what)
        p.add_argument("-m", "--model", dest="model_option", default=None, help="same as the positional MODEL")
    else:
        p.add_argument("-m", "--model", default=default, help=what)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="weights/activations dtype (default: the checkpoint's; float32 for GGUF)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--revision", default=None, help="branch, tag or commit for org/name references")
    p.add_argument("--offline", action="store_true", help="never download; use local files and the HF cache only")
    _common(p)


def _add_speed_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", default=None, help="a LoRA adapter directory (PEFT format) to apply")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None, help="weight-only quantization")
    p.add_argument("--group-size", type=int, default=32, help="int4 group size (default: 32)")
    p.add_argument("--compile", action="store_true", help="compile the decode step (cached on disk)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    from .generation.config import DRAFT_NAMES

    d = "default: the model's generation_config.json, else"
    p.add_argument("--max-new-tokens", type=int, default=None, help=f"most tokens to generate ({d} 256)")
    p.add_argument("--temperature", type=float, default=None, help=f"0 = greedy ({d} 0)")
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
                   help=f"speculative decoding: {', '.join(DRAFT_NAMES)}, or a draft MODEL with the same tokenizer")
    p.add_argument("--num-draft-tokens", type=int, default=None, help="fixed draft length (default: adaptive)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leanformers", description=__doc__.splitlines()[0])
    from . import __version__

    parser.add_argument("--version", action="version", version=f"leanformers {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    g = sub.add_parser("generate", help="answer or continue a prompt",
                       description="Generate from PROMPT. With a chat model (one with a chat template) the prompt "
                                   "is sent as a user message; --raw continues the text as it is.")
    g.add_argument("prompt", help="the prompt text ('-' reads it from stdin)")
    g.add_argument("--raw", "--no-chat-template", dest="raw", action="store_true",
                   help="plain continuation: do not apply the model's chat template")
    g.add_argument("--chat", action="store_true", help=argparse.SUPPRESS)  # the default now; kept for old scripts
    g.add_argument("--system", default=None, help="system message (chat models)")
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

    e = sub.add_parser("embed", help="sentence embeddings of texts",
                       description="Embed each TEXT with an encoder model (e.g. all-minilm-l6-v2) and print "
                                   "the vectors: JSON (a list of lists) or a .npy array [N, dim] float32.")
    e.add_argument("texts", nargs="+", metavar="TEXT", help="a text to embed ('-' reads one text per line from stdin)")
    _add_model_args(e, default=DEFAULT_ENCODER)
    e.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="unit-length vectors (default: as the model's directory says)")
    e.add_argument("--format", choices=["json", "npy"], default="json", help="output format (default: json)")
    e.add_argument("-o", "--output", default=None, help="write to this file instead of stdout")
    e.add_argument("--batch-size", type=int, default=64, help="texts per forward pass (default: 64)")
    e.add_argument("--prompt-name", default=None, help="one of the model's prompts (e.g. query)")
    e.add_argument("--no-truncate", action="store_true", help="fail on texts longer than the model's limit")

    _add_finetune_parser(sub)

    _add_serve_parser(sub)

    b = sub.add_parser("bench", help="benchmark decode/prefill speed", add_help=False,
                       description="Benchmark (see `leanformers bench --help`).")
    b.add_argument("bench_args", nargs=argparse.REMAINDER)
    return parser


# ------------------------------------------------------------------------------------------ checks
_GEN_FIELDS = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed", "stop",
               "num_draft_tokens")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The generation arguments the user gave (the others come from the model's defaults)."""
    out = {name: getattr(args, name) for name in _GEN_FIELDS if getattr(args, name) is not None}
    if args.ignore_eos:
        out["ignore_eos"] = True
    if args.truncate:
        out["truncate"] = True
    return out


def _check_before_loading(args: argparse.Namespace) -> None:
    """Every argument that can be checked without the model: refused now, not after a long load."""
    from .generation.config import DRAFT_NAMES, GenerationConfig
    from .lm import parse_device

    parse_device(args.device)
    if getattr(args, "quantize", None) == "int4":
        from .quantize import check_scheme

        check_scheme("int4", args.group_size)
    if hasattr(args, "max_new_tokens"):
        draft = args.draft
        GenerationConfig().replace(**_overrides(args), draft="prompt-lookup" if draft else None)
        if draft and draft not in DRAFT_NAMES:
            from .hub import resolve

            resolve(draft, offline=True if args.offline else None, progress=False)  # a draft model must exist


def _configure_logging(verbose: bool) -> None:
    """Warnings as one line each; with -v the INFO log too. On a terminal, slow phases say what they do."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("leanformers: %(levelname)s: %(message)s" if verbose
                                           else "leanformers: %(message)s"))
    root = logging.getLogger("leanformers")
    root.handlers[:] = [handler]
    root.propagate = False
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose and sys.stderr.isatty():  # status of slow phases (compiling) on a terminal
        logging.getLogger("leanformers.status").setLevel(logging.INFO)


# ------------------------------------------------------------------------------------------ commands
def _load(args: argparse.Namespace):
    from .lm import load

    kwargs: dict[str, Any] = dict(dtype=None if args.dtype == "auto" else args.dtype, device=args.device,
                                  revision=args.revision, offline=True if args.offline else None)
    if getattr(args, "quantize", None):
        kwargs.update(quantize=args.quantize, group_size=args.group_size)
    if getattr(args, "adapter", None):  # a LoRA adapter directory on top of the model
        kwargs["adapter"] = args.adapter
    lm = load(args.model, **kwargs)
    if getattr(args, "compile", False):
        # with --draft, the graph that verifies drafted tokens is built (or loaded) now as well
        lm.compile(speculative=bool(getattr(args, "draft", None)))
    return lm


def _generation_config(args: argparse.Namespace, lm):
    from .generation.config import DRAFT_NAMES

    overrides = _overrides(args)
    if args.draft:
        draft: Any = args.draft
        if draft not in DRAFT_NAMES:
            from .lm import load

            draft = load(draft, dtype=lm.dtype, device=args.device, offline=True if args.offline else None)
        overrides["draft"] = draft
    return lm.defaults.replace(**overrides)


def _emit(lm, prompt_or_messages: Any, args: argparse.Namespace, *, chat: bool):
    """Generate and print (streamed or at the end); returns the GenerationResult."""
    cfg = _generation_config(args, lm)
    if args.stream:
        stream = lm.chat(prompt_or_messages, cfg, stream=True) if chat else lm.stream(prompt_or_messages, cfg)
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
        result = stream.result
    else:
        result = lm.chat(prompt_or_messages, cfg) if chat else lm.generate(prompt_or_messages, cfg)
        sys.stdout.write(result.text)
    sys.stdout.write("\n")
    sys.stdout.flush()
    if not result.text:
        print(f"leanformers: the model produced no text: {_why_empty(lm, result)}", file=sys.stderr)
    return result


def _why_empty(lm, result) -> str:
    if result.stop_reason == "eos" and result.token_ids:
        token = lm.tokenizer.id_to_token(result.token_ids[-1])
        return f"it ended at once with its end-of-sequence token {token!r}"
    if result.stop_reason == "stop string":
        return "a stop string came first"
    if result.token_ids:
        return f"its {len(result.token_ids)} token(s) decode to no visible text"
    return "no room was left for new tokens"


def cmd_generate(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt:
        raise InvalidArgumentError("the prompt is empty")
    if args.raw and (args.system or args.chat):
        raise InvalidArgumentError("--system and --chat apply the chat template; they cannot be used with --raw")
    _check_before_loading(args)
    lm = _load(args)
    use_chat = not args.raw and lm.tokenizer.chat_template is not None
    if args.chat and not use_chat:
        raise InvalidArgumentError(f"--chat: {args.model} has no chat template")
    if args.system and not use_chat:
        raise InvalidArgumentError(f"--system needs a chat template, and {args.model} has none")
    if use_chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": prompt}]
        result = _emit(lm, messages, args, chat=True)
    else:
        result = _emit(lm, prompt, args, chat=False)
    if args.stats:
        s = result.stats
        print(f"[{result.prompt_tokens} prompt tokens, {len(result.token_ids)} new, finish: {result.finish_reason}, "
              f"first token {s.get('prefill_s', 0):.2f}s, decode {s.get('decode_tokens_per_s', 0):.1f} tok/s]",
              file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    _check_before_loading(args)
    lm = _load(args)
    if lm.tokenizer.chat_template is None:
        raise InvalidArgumentError(f"{args.model} has no chat template; use `leanformers generate --raw` instead")
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

    if args.model and args.model_option and args.model != args.model_option:
        raise InvalidArgumentError(f"two models given ({args.model!r} and -m {args.model_option!r}); give one")
    print(describe(args.model_option or args.model or DEFAULT_MODEL, revision=args.revision,
                   offline=True if args.offline else None))
    return 0


def cmd_perplexity(args: argparse.Namespace) -> int:
    from .eval.perplexity import perplexity, perplexity_text

    if args.file is None:
        text = perplexity_text()
    else:
        try:
            with open(args.file, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise InvalidArgumentError(f"cannot read {args.file}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise InvalidArgumentError(f"{args.file} is not UTF-8 text") from None
    _check_before_loading(args)
    lm = _load(args)
    r = perplexity(lm, text, context=args.context, stride=args.stride)
    print(f"tokens: {r.tokens}\nperplexity: {r.ppl:.4f}")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    """`leanformers embed`: vectors of the texts as JSON or .npy (stdout or --output)."""
    import json

    import numpy as np

    from .lm import load

    texts: list[str] = []
    for text in args.texts:
        texts += sys.stdin.read().splitlines() if text == "-" else [text]
    if not texts:
        raise InvalidArgumentError("no texts to embed (stdin was empty)")
    if args.batch_size < 1:
        raise InvalidArgumentError(f"--batch-size must be positive, got {args.batch_size}")
    if args.format == "npy" and args.output is None and sys.stdout.isatty():
        raise InvalidArgumentError("--format npy writes binary data: redirect stdout or pass --output FILE")
    model = load(args.model, dtype=None if args.dtype == "auto" else args.dtype, device=args.device,
                 revision=args.revision, offline=True if args.offline else None)
    vectors = model.embed(texts, normalize=args.normalize, batch_size=args.batch_size,
                          prompt_name=args.prompt_name, truncate=not args.no_truncate)
    array = vectors.numpy().astype(np.float32)
    if args.format == "json":
        data = (json.dumps(array.tolist()) + "\n").encode()
    else:
        import io

        buffer = io.BytesIO()
        np.save(buffer, array)
        data = buffer.getvalue()
    if args.output is None:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    else:
        try:
            with open(args.output, "wb") as f:
                f.write(data)
        except OSError as exc:
            raise InvalidArgumentError(f"cannot write {args.output}: {exc.strerror}") from None
    return 0


# ------------------------------------------------------------------------------------------ finetune
def _add_finetune_parser(sub: Any) -> None:
    """`leanformers finetune`: every keyword of leanformers.finetune() as a flag (`lora_r` -> `--lora-r`)."""
    f = sub.add_parser("finetune", help="fine-tune a model (full, LoRA, QLoRA; causal LM or classifier)",
                       description="Fine-tune MODEL on JSONL/JSON/.txt data; writes a PEFT adapter (LoRA/QLoRA) or "
                                   "a Hugging Face model directory (full) to --output. --task classification "
                                   "trains an encoder's sequence classifier.")
    f.add_argument("-m", "--model", default=DEFAULT_MODEL, help=f"base model (default: {DEFAULT_MODEL})")
    f.add_argument("--data", required=True, help="training data: .jsonl/.json (messages, prompt/completion, "
                                                 "instruction/output, text) or .txt")
    f.add_argument("--eval-data", default=None, help="evaluation data, same formats")
    f.add_argument("--task", choices=["causal-lm", "classification"], default="causal-lm",
                   help="causal-lm (default: a decoder on text) or classification (an encoder's sequence classifier: "
                        '{"text", "label"} or {"text", "labels": [...]} records, optional "text_pair")')
    f.add_argument("--labels", default=None, help="classification: label names in id order (a,b,c) for a model "
                                                  "without a classification head (default: the data's, sorted)")
    f.add_argument("--problem-type", default=None,
                   choices=["single_label_classification", "multi_label_classification", "regression"],
                   help="classification: default the checkpoint's, else 'label' -> single, 'labels' -> multi")
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
    f.add_argument("--packing", action="store_true",
                   help="pack examples into rows of --seq-len (best fit; no attention across examples)")
    f.add_argument("--no-truncate", dest="truncate", action="store_false",
                   help="refuse examples longer than --seq-len instead of truncating them")
    f.add_argument("--precision", choices=["auto", "fp32", "bf16-mixed", "fp16-mixed", "bf16-true"], default="auto",
                   help="default: bf16-mixed on a GPU with bf16 and for qlora, else fp32")
    f.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute activations in backward (less memory, slower); on CPU this and --method qlora "
                        "also make freed memory go back to the OS during the run (MALLOC_MMAP_THRESHOLD_ overrides)")
    f.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (default: 500)")
    f.add_argument("--save-total-limit", type=int, default=None, help="keep only the newest N checkpoints")
    f.add_argument("--eval-every", type=int, default=None, help="evaluate every N steps (default: at the end)")
    f.add_argument("--seed", type=int, default=42)
    f.add_argument("--resume", nargs="?", const=True, default=False, metavar="DIR",
                   help="continue from the newest checkpoint in --output (or from DIR)")
    f.add_argument("--overwrite", action="store_true", help="replace a previous run in --output")
    f.add_argument("--log", choices=["none", "tensorboard"], default="none", help="also log to TensorBoard")
    f.add_argument("--device", default="cpu", help="torch device (default: cpu; under torchrun cuda means "
                                                   "cuda:LOCAL_RANK)")
    f.add_argument("--strategy", choices=["auto", "ddp", "fsdp"], default="auto",
                   help="under torchrun: DDP, FSDP, or auto (DDP when model + optimizer fit one device; default)")
    f.add_argument("--cpu-offload", action="store_true", help="FSDP on GPUs: keep the shards in CPU memory")
    f.add_argument("--dist-timeout", type=float, default=1800.0,
                   help="seconds a collective waits for the other ranks before failing (default: 1800)")
    _common(f)


def cmd_finetune(args: argparse.Namespace) -> int:
    from .train import finetune

    logging.getLogger("leanformers").setLevel(logging.INFO)  # a training run reports its progress
    options = {k: v for k, v in vars(args).items() if k not in ("command", "model", "data", "output_dir", "verbose")}
    tm = options["target_modules"]
    options["target_modules"] = tm[0] if len(tm) == 1 and "," not in tm[0] else [
        t for part in tm for t in part.split(",") if t]
    if options["target_modules"] == ["all-linear"]:
        options["target_modules"] = "all-linear"
    result = finetune(args.model, data=args.data, output_dir=args.output_dir, **options)
    if result.rank != 0:  # torchrun: rank 0 reports
        return 0
    what = "LoRA adapter" if result.method != "full" else "model"
    evals = "".join(f", {k.replace('_', ' ')} {v:.4f}"
                    for k, v in (result.eval_metrics or {}).items())
    loss = f", last loss {result.loss:.4f}" if result.loss is not None else ""
    print(f"saved the {what} to {result.output_dir} ({result.steps} steps{loss}{evals})", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------ serve
def _add_serve_parser(sub: Any) -> None:
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (continuous batching)",
                       description="Serve the model over the OpenAI API (/v1/chat/completions, /v1/completions, "
                                   "/v1/models, /health, /metrics) with continuous batching; an encoder model "
                                   "(e.g. all-minilm-l6-v2) is served on /v1/embeddings. Needs the serve "
                                   "extra: pip install 'leanformers[serve]'.")
    _add_model_args(s)
    _add_speed_args(s)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    s.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    s.add_argument("--api-key", default=None,
                   help="require `Authorization: Bearer KEY` on /v1/ routes (default: $LEANFORMERS_API_KEY if set)")
    s.add_argument("--served-model-name", default=None, help="the model name clients send (default: -m's value)")
    s.add_argument("--max-batch-size", type=int, default=16, help="sequences decoded together: KV slots (default: 16)")
    s.add_argument("--max-queue", type=int, default=256,
                   help="sequences that may wait for a slot; beyond, requests get 429 (default: 256)")
    s.add_argument("--max-model-len", type=int, default=None,
                   help="tokens per sequence, prompt + completion: the KV slot size (default: the model's context, "
                        "at most 2048)")
    s.add_argument("--prefill-chunk", type=int, default=256,
                   help="prompt tokens prefilled between two decode steps (default: 256)")
    s.add_argument("--embedding-model", default=None,
                   help="also serve /v1/embeddings with this encoder model (leanformers.load of an encoder)")


def cmd_serve(args: argparse.Namespace) -> int:
    for name, low in (("port", 0), ("max_batch_size", 1), ("max_queue", 0), ("prefill_chunk", 1)):
        if getattr(args, name) < low:
            raise InvalidArgumentError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    if args.port > 65535:
        raise InvalidArgumentError(f"--port must be <= 65535, got {args.port}")
    if args.max_model_len is not None and args.max_model_len < 2:
        raise InvalidArgumentError(f"--max-model-len must be >= 2, got {args.max_model_len}")
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise InvalidArgumentError(f"leanformers serve needs the serve extra ({exc.name} is missing): "
                                   "pip install 'leanformers[serve]'") from None
    _check_before_loading(args)
    api_key = args.api_key if args.api_key is not None else os.environ.get("LEANFORMERS_API_KEY") or None
    from .serve.app import create_app, run
    from .serve.engine import DEFAULT_MAX_MODEL_LEN, Engine, batch_buckets

    from .encoder import Encoder

    lm = _load(argparse.Namespace(**{**vars(args), "compile": False}))
    name = args.served_model_name or args.model
    if isinstance(lm, Encoder):  # an encoder: an embedding server (/v1/embeddings), no engine
        if args.compile or args.embedding_model:
            flag = "--compile" if args.compile else "--embedding-model"
            raise InvalidArgumentError(f"{flag} does not apply: {args.model} is an encoder, served on "
                                       "/v1/embeddings alone")
        print(f"leanformers serve: {name} ({lm.architecture}, {lm.dtype}, {lm.dimension} dimensions, "
              f"max_seq_length {lm.max_seq_length}) on http://{args.host}:{args.port}/v1 - embeddings only"
              f"{', API key required' if api_key else ''}", file=sys.stderr, flush=True)
        app = create_app(None, model_name=name, api_key=api_key, embedder=lm)
        run(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning")
        return 0
    max_len = args.max_model_len if args.max_model_len is not None else min(lm.context_length, DEFAULT_MAX_MODEL_LEN)
    if max_len > lm.context_length:
        raise InvalidArgumentError(f"--max-model-len {max_len} is longer than the model's context "
                                   f"({lm.context_length} tokens)")
    if args.compile:  # one graph per batch bucket, all over the engine's cache length
        lm.compile(cache_bucket=max_len, max_graphs=len(batch_buckets(args.max_batch_size)))
    embedder = None
    if args.embedding_model:
        from .lm import load

        embedder = load(args.embedding_model, offline=True if args.offline else None)
        if not isinstance(embedder, Encoder):
            raise InvalidArgumentError(f"--embedding-model {args.embedding_model}: not an embedding model (an "
                                       "encoder such as all-minilm-l6-v2 is needed)")
    engine = Engine(lm, max_batch_size=args.max_batch_size, max_queue=args.max_queue, max_model_len=max_len,
                    prefill_chunk=args.prefill_chunk)
    print(f"leanformers serve: {engine.describe_memory()}", file=sys.stderr, flush=True)
    engine.start()
    step = "compiled" if lm.step.is_compiled else "eager"
    print(f"leanformers serve: {name} ({lm.dtype}, {lm.quantization or 'not quantized'}, {step} decode step) on "
          f"http://{args.host}:{args.port}/v1 - batch {args.max_batch_size}, queue {args.max_queue}, "
          f"context {max_len}{', API key required' if api_key else ''}", file=sys.stderr, flush=True)
    app = create_app(engine, model_name=name, api_key=api_key, embedder=embedder,
                     embedding_model_name=args.embedding_model)
    run(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning")
    return 0


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "info": cmd_info, "perplexity": cmd_perplexity,
            "embed": cmd_embed, "finetune": cmd_finetune, "serve": cmd_serve}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        # The server's HTTP thread shares the cores with torch's OpenMP workers. Spinning workers (the
        # default) starve it and each other as soon as a core is busy elsewhere: decode ran several times
        # slower (bench/RESULTS.md, "Serving"). Read when torch loads, so set before any import of it;
        # a value the user set wins.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if argv[:1] == ["bench"]:  # the benchmark has its own options: hand them over untouched
        from .bench import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    _configure_logging(getattr(args, "verbose", False))
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
    except (OSError, RuntimeError, MemoryError) as exc:  # the machine, not the arguments: still one line
        print(f"leanformers: error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
              file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
