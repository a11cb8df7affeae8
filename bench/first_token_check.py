"""Why llama.cpp answers the benchmark's question differently: the first token's logits, library by library.

    python bench/first_token_check.py     # bundled SmolLM2-135M-Instruct Q4_1, the benchmark's chat prompt

Every library gets the same prompt ids (tokenized once by leanformers, as in bench/bench_decode.py), so
tokenization and the chat template are the same; the table shows the two best first tokens and their
logit margin: transformers and leanformers float32 (the file's weights dequantized exactly), leanformers
bfloat16 / int8 / int4 (the Q4_1 blocks mapped exactly, bfloat16 activations), and llama.cpp, which
multiplies Q4_1 weights by activations it first rounds to 8-bit blocks (Q8_1).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import leanformers  # noqa: E402
from leanformers import bench  # noqa: E402


def top2(logits: torch.Tensor, tokenizer) -> tuple[str, str, float]:
    v, i = logits.float().topk(2)
    return tokenizer.decode([int(i[0])]), tokenizer.decode([int(i[1])]), float(v[0] - v[1])


def main() -> None:
    torch.set_num_threads(2)
    prompts = bench.prepare_prompts(None, 8)
    ids, path, tok = prompts["chat_ids"], prompts["model_path"], prompts["tokenizer"]
    rows = []
    for name, kw in [("leanformers float32", dict(dtype="float32")), ("leanformers bfloat16", dict(dtype="bfloat16")),
                     ("leanformers int8", dict(quantize="int8")), ("leanformers int4 (exact Q4_1)", dict(quantize="int4"))]:
        lm = leanformers.load(path, progress=False, **kw)
        with torch.inference_mode():
            rows.append((name, *top2(lm.model(torch.tensor([ids]))[0, -1], tok)))
    import transformers

    p = Path(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
    with torch.inference_mode():
        rows.append(("transformers float32", *top2(hf(torch.tensor([ids])).logits[0, -1], tok)))
    import bench_decode
    from llama_cpp import Llama

    bench_decode.no_amx_repack()
    llm = Llama(model_path=path, n_ctx=256, n_threads=2, logits_all=True, verbose=False)
    llm.eval(ids)
    rows.append(("llama.cpp (Q4_1 x Q8_1)", *top2(torch.tensor(llm.scores[len(ids) - 1]), tok)))
    print("| library | first token | runner-up | logit margin |\n|---|---|---|---:|")
    for name, a, b, m in rows:
        print(f"| {name} | {a!r} | {b!r} | {m:.3f} |")


if __name__ == "__main__":
    main()
