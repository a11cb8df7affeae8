"""Seeded fuzzing of `leanformers.load` over hostile model files, every load in a capped worker process.

Mutants are built from pristine models (a tiny HF directory, a sharded one, a tiny Q4_1 GGUF with a chat
template, optionally the bundled SmolLM2 GGUF) by corrupting one thing: GGUF header fields and metadata,
safetensors headers, shard indexes and directory contents, config.json, tokenizer files, chat templates.
A worker process (RLIMIT_AS cap, per-load timeout enforced by the parent) loads each one and reports:

  error  a LeanformersError; it passes if its message names a file at fault
  ok     a model whose weights equal the pristine load's, bit for bit; the tokenizer then encodes a text
         and renders a chat (errors there are judged like load errors)

Anything else fails: a raw exception, wrong weights, a hang (timeout), a crash or memory blow-up (the
worker dies). Mutations that make a *valid* file with other content (swapping the offsets of two
same-shaped tensors, retyping F16 as BF16) are not generated: no reader can tell them from the real thing.

tests/test_hostile.py runs a small corpus; bench/fuzz_load.py a large one.
"""

from __future__ import annotations

import copy
import json
import os
import random
import resource
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from fuzz_mutations import (CONFIG_VALUES, HOSTILE_TEMPLATES, TOKENIZER_VALUES, RawGGUF, gguf_string, mutate_gguf,
                            mutate_json, mutate_safetensors, u32, u64)

HERE = Path(__file__).resolve().parent
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


# ------------------------------------------------------------------------------------------------- corpus
@dataclass
class Mutant:
    id: int
    family: str
    what: str
    path: str  # what leanformers.load gets
    base: str  # path of the pristine model the weights are compared with
    names: tuple[str, ...]  # file names an error message may name; () = the load must succeed
    cleanup: Path | None = None


class Corpus:
    """Pristine models under `work`, and the seeded mutants made from them."""

    def __init__(self, work: Path, *, hf_single: Path, hf_sharded: Path, smollm2: Path | None = None):
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.hf_single, self.hf_sharded, self.smollm2 = hf_single, hf_sharded, smollm2
        self.gguf = work / "tiny.Q4_1.gguf"
        if not self.gguf.exists():
            from gguf import GGMLQuantizationType

            from gguf_utils import write_gguf_from_hf_dir

            write_gguf_from_hf_dir(hf_sharded, work / "plain.gguf", qtype=GGMLQuantizationType.Q4_1)
            raw = RawGGUF.parse((work / "plain.gguf").read_bytes())
            template = json.loads((hf_single / "tokenizer_config.json").read_text())["chat_template"]
            raw.set_kv("tokenizer.chat_template", 8, gguf_string(template))
            self.gguf.write_bytes(raw.to_bytes())
        self.gguf_raw = RawGGUF.parse(self.gguf.read_bytes())
        self.smol_raw = RawGGUF.parse(_read_header(smollm2)) if smollm2 else None
        self._zeros = work / "zeros"  # stray/outside shards: the real tensor names, all zero
        if not self._zeros.exists():
            self._zeros.mkdir()
            from leanformers.checkpoint.safetensors import read_safetensors, write_safetensors

            for src in [hf_single / "model.safetensors", *sorted(hf_sharded.glob("model-*.safetensors"))]:
                zeros = {k: v.clone().zero_() for k, v in read_safetensors(src).items()}
                write_safetensors(zeros, self._zeros / src.name)
        self._next = 0

    def families(self) -> list[str]:
        families = ["gguf", "safetensors", "index", "config", "tokenizer", "template"]
        return families + (["smollm2"] if self.smollm2 else [])

    def mutant(self, family: str, rng: random.Random) -> Mutant:
        """One fresh mutant of `family` on disk (under work/m<id>/)."""
        self._next += 1
        root = self.work / f"m{self._next}"
        if root.exists():
            shutil.rmtree(root)
        root.mkdir()
        make: Callable = getattr(self, f"_{family}")
        what, path, base, names = make(rng, root)
        return Mutant(self._next, family, what, str(path), str(base), tuple(names), root)

    # --- GGUF ------------------------------------------------------------------------------------------
    def _gguf(self, rng: random.Random, root: Path):
        raw = copy.deepcopy(self.gguf_raw)
        path = root / "model.gguf"
        what, data = mutate_gguf(raw, rng)
        path.write_bytes(data)
        return what, path, self.gguf, [path.name]

    def _smollm2(self, rng: random.Random, root: Path):
        path = root / "smol.gguf"
        shutil.copyfile(self.smollm2, path)
        spans = self.smol_raw.spans
        with open(path, "r+b") as f:
            kind = rng.choice(["flip", "flip", "type", "offset", "dims", "u32"])
            if kind == "flip":  # half of the time in the tensor infos, else anywhere in the header
                low = spans["infos_start"] if rng.random() < 0.5 else 4
                positions = sorted(rng.randrange(low, spans["data_start"]) for _ in range(rng.randint(1, 4)))
                for p in positions:
                    f.seek(p)
                    f.write(bytes([rng.randrange(256)]))
                what = f"header bytes {positions} set at random"
            else:
                i = rng.randrange(len(self.smol_raw.infos))
                name, dims, type_id, offset = self.smol_raw.infos[i]
                if kind == "type":
                    new = rng.choice([t for t in (0, 1, 2, 3, 8, 12, 13, 14, 10, 99) if t != type_id])
                    f.seek(spans[f"type:{i}"])
                    f.write(u32(new))
                    what = f"tensor {name} type {type_id} -> {new}"
                elif kind == "offset":
                    new = rng.choice([offset + 1, offset + 32, max(offset - 32, 0), 0, 2**40])
                    f.seek(spans[f"offset:{i}"])
                    f.write(u64(new))
                    what = f"tensor {name} offset {offset} -> {new}"
                elif kind == "dims":
                    j = rng.randrange(len(dims))
                    new = rng.choice([dims[j] * 2, dims[j] + 32, 0, 2**32 - 1, 2**63])
                    f.seek(spans[f"dims:{i}"] + 8 * j)
                    f.write(u64(new))
                    what = f"tensor {name} dim {j} {dims[j]} -> {new}"
                else:
                    keys = [k for k, vt, _ in self.smol_raw.kvs if vt == 4]
                    key = rng.choice(keys)
                    new = rng.choice([0, 1, 3, 100000, 2**31, 2**32 - 1])
                    f.seek(spans[f"kv:{key}"])
                    f.write(u32(new))
                    what = f"metadata {key} (u32) -> {new}"
        return what, path, self.smollm2, [path.name]

    # --- safetensors -----------------------------------------------------------------------------------
    def _safetensors(self, rng: random.Random, root: Path):
        d = _copy_dir(self.hf_single, root / "m")
        path = d / "model.safetensors"
        what, data = mutate_safetensors(path.read_bytes(), rng)
        path.write_bytes(data)
        return what, d, self.hf_single, [path.name]

    def _index(self, rng: random.Random, root: Path):
        d = _copy_dir(self.hf_sharded, root / "m")
        index = d / "model.safetensors.index.json"
        data = json.loads(index.read_text())
        wm = data["weight_map"]
        shards = sorted(set(wm.values()))
        victim = rng.choice(sorted(wm))
        shard = wm[victim]
        outside = root / shard  # zeroed copy next to (outside) the model directory
        shutil.copyfile(self._zeros / shard, outside)
        names = [index.name, shard]
        kind = rng.choice(["dotdot", "absolute", "subdir", "symlink_out", "symlink_loop", "dir_shard", "wrong_shard",
                           "drop_entry", "missing_shard", "not_object", "bad_value", "stray", "stray_single",
                           "deep", "dup_key", "empty_name"])
        what = kind
        if kind == "dotdot":
            for k, v in wm.items():
                if v == shard:
                    wm[k] = "../" + shard
        elif kind == "absolute":
            for k, v in wm.items():
                if v == shard:
                    wm[k] = str(outside)
        elif kind == "subdir":
            (d / "sub").mkdir()
            shutil.move(d / shard, d / "sub" / shard)
            for k, v in wm.items():
                if v == shard:
                    wm[k] = "sub/" + shard
        elif kind == "symlink_out":
            (d / shard).unlink()
            os.symlink(outside, d / shard)
        elif kind == "symlink_loop":
            (d / shard).unlink()
            os.symlink(d / shard, d / shard)
        elif kind == "dir_shard":
            (d / shard).unlink()
            (d / shard).mkdir()
        elif kind == "wrong_shard":
            others = [s for s in shards if s != shard]
            wm[victim] = others[0] if others else "model-x.safetensors"
        elif kind == "drop_entry":
            del wm[victim]
        elif kind == "missing_shard":
            wm[victim] = "model-99999-of-99999.safetensors"
        elif kind == "not_object":
            data["weight_map"] = rng.choice([list(wm.items()), "x", None, 5])
        elif kind == "bad_value":
            wm[victim] = rng.choice([None, 3, True, [shard], {"f": shard}, "", ".", ".."])
        elif kind == "stray":  # a stray file with the same tensor names next to the shards
            shutil.copyfile(self._zeros / shard, d / "zz-extra.safetensors")
            return f"index: {kind}", d, self.hf_sharded, []
        elif kind == "stray_single":  # a directory without index: model.safetensors + a stray
            d = _copy_dir(self.hf_single, root / "single")
            shutil.copyfile(self._zeros / "model.safetensors", d / "zz-extra.safetensors")
            return kind, d, self.hf_single, []
        elif kind == "deep":
            wm[victim] = "@DEEP@"
            index.write_text(json.dumps(data).replace('"@DEEP@"', "[" * 3000 + "]" * 3000))
            return f"index: {kind}", d, self.hf_sharded, names
        elif kind == "dup_key":
            text = json.dumps(data)
            text = text.replace('"weight_map": {', '"weight_map": {' + json.dumps(victim) + ': "x.safetensors", ', 1)
            index.write_text(text)
            return kind, d, self.hf_sharded, names
        elif kind == "empty_name":
            wm[""] = shard
        index.write_text(json.dumps(data))
        return f"index: {what} ({victim} in {shard})", d, self.hf_sharded, names

    # --- config / tokenizer / template ----------------------------------------------------------------
    def _config(self, rng: random.Random, root: Path):
        d = _copy_dir(self.hf_single, root / "m")
        path = d / "config.json"
        what, text = mutate_json(path.read_text(), rng, CONFIG_VALUES)
        _write_or_replace(path, text, rng)
        return f"config: {what}", d, self.hf_single, [path.name]

    def _tokenizer(self, rng: random.Random, root: Path):
        d = _copy_dir(self.hf_single, root / "m")
        name = rng.choice(["tokenizer.json", "tokenizer_config.json", "tokenizer_config.json", "generation_config.json",
                           "special_tokens_map.json"])
        path = d / name
        if not path.exists():
            path.write_text(json.dumps({"eos_token_id": 2, "bos_token": "<|im_start|>"}))
        what, text = mutate_json(path.read_text(), rng, TOKENIZER_VALUES)
        _write_or_replace(path, text, rng)
        return f"{name}: {what}", d, self.hf_single, [name]

    def _template(self, rng: random.Random, root: Path):
        original = json.loads((self.hf_single / "tokenizer_config.json").read_text())["chat_template"]
        if rng.random() < 0.6:
            template = rng.choice(HOSTILE_TEMPLATES)
        else:  # the real template with a few characters changed
            chars = list(original)
            for _ in range(rng.randint(1, 4)):
                chars.insert(rng.randrange(len(chars)), rng.choice("{}%()[]'\"~*+-.|#"))
            template = "".join(chars)
        if rng.random() < 0.5:
            d = _copy_dir(self.hf_single, root / "m")
            cfg = json.loads((d / "tokenizer_config.json").read_text())
            cfg["chat_template"] = template
            (d / "tokenizer_config.json").write_text(json.dumps(cfg))
            return f"template in tokenizer_config.json: {template[:60]!r}", d, self.hf_single, ["tokenizer_config.json"]
        raw = copy.deepcopy(self.gguf_raw)
        raw.set_kv("tokenizer.chat_template", 8, gguf_string(template))
        path = root / "model.gguf"
        path.write_bytes(raw.to_bytes())
        return f"template in GGUF: {template[:60]!r}", path, self.gguf, [path.name]

def _read_header(path: Path, limit: int = 8 << 20) -> bytes:
    with open(path, "rb") as f:
        return f.read(limit)


def _copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _write_or_replace(path: Path, text: str | None, rng: random.Random) -> None:
    """Write the mutated text; None means: replace the file by something that is not a regular file."""
    if text is not None:
        path.write_text(text)
        return
    path.unlink()
    if rng.random() < 0.5:
        path.mkdir()
    else:
        os.symlink(path, path)  # a symlink loop


# ------------------------------------------------------------------------------------------------- worker
_WORKER = r"""
import json, os, resource, sys, time, traceback
sys.path.insert(0, {tests!r})
import fuzz_utils
fuzz_utils.worker_main()
"""


def worker_main() -> None:
    """Read mutants (JSON lines) on stdin, load each, write one JSON result line per mutant on stdout."""
    import torch

    import leanformers
    from leanformers.errors import LeanformersError

    try:
        from leanformers import templates

        templates.TIME_LIMIT = float(os.environ.get("FUZZ_TEMPLATE_SECONDS", "1.0"))
    except ImportError:  # a source tree without bounded templates (to fuzz an older version)
        pass
    torch.set_num_threads(1)
    pristine: dict[str, dict] = {}
    out = sys.stdout
    sys.stdout = sys.stderr  # nothing but results on the pipe
    for line in sys.stdin:
        job = json.loads(line)
        t0 = time.monotonic()
        result = _judge(job, pristine, leanformers, LeanformersError, torch)
        result.update(id=job["id"], seconds=round(time.monotonic() - t0, 3),
                      maxrss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
        out.write(json.dumps(result) + "\n")
        out.flush()


def _judge(job: dict, pristine: dict, leanformers: Any, LeanformersError: type, torch: Any) -> dict:
    import traceback

    def error_result(exc: BaseException, stage: str) -> dict:
        msg = str(exc)
        outcome = ("REFUSED" if not job["names"]  # a mutant that must load (a stray file to ignore)
                   else "error" if any(n in msg for n in job["names"]) else "UNNAMED")
        return {"outcome": outcome, "stage": stage, "error": type(exc).__name__, "message": msg[:400]}

    try:
        if job["base"] not in pristine:
            lm = leanformers.load(job["base"], dtype="float32", progress=False)
            pristine[job["base"]] = {k: v.clone() for k, v in lm.model.state_dict().items()}
        lm = leanformers.load(job["path"], dtype="float32", progress=False)
    except LeanformersError as exc:
        return error_result(exc, "load")
    except BaseException as exc:  # noqa: BLE001 - the point is to catch what should never escape
        return {"outcome": "RAW", "stage": "load", "error": type(exc).__name__, "message": str(exc)[:300],
                "trace": traceback.format_exc()[-1500:]}
    ref = pristine[job["base"]]
    state = lm.model.state_dict()
    same = state.keys() == ref.keys() and all(torch.equal(state[k], ref[k]) for k in ref)
    if not same:
        return {"outcome": "WRONG_WEIGHTS", "stage": "load"}
    try:
        lm.tokenizer.encode("Hello world! 123")
        lm.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True)
    except LeanformersError as exc:
        return error_result(exc, "tokenizer")
    except BaseException as exc:  # noqa: BLE001
        return {"outcome": "RAW", "stage": "tokenizer", "error": type(exc).__name__, "message": str(exc)[:300],
                "trace": traceback.format_exc()[-1500:]}
    return {"outcome": "ok", "stage": "done"}


class Runner:
    """Feeds mutants to a worker process capped at `memory_gb` of address space, `timeout` seconds per load."""

    def __init__(self, *, memory_gb: float = 6.0, timeout: float = 60.0, src: Path | None = None):
        self.memory = int(memory_gb * 2**30)
        self.timeout = timeout
        self.env = dict(os.environ, PYTHONPATH=str(src or HERE.parent / "src"), TOKENIZERS_PARALLELISM="false",
                        OMP_NUM_THREADS="1")
        self.proc: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        def cap() -> None:
            resource.setrlimit(resource.RLIMIT_AS, (self.memory, self.memory))
            os.setsid()

        return subprocess.Popen([sys.executable, "-c", _WORKER.format(tests=str(HERE))], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=self.env, preexec_fn=cap,
                                text=True, bufsize=1)

    def run(self, mutant: Mutant) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = self._start()
        job = {"id": mutant.id, "path": mutant.path, "base": mutant.base, "names": list(mutant.names)}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.close()
                return {"id": mutant.id, "outcome": "HANG", "seconds": self.timeout}
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                line = self.proc.stdout.readline()
                if not line:  # the worker died (killed at the memory cap, crashed)
                    code = self.proc.wait()
                    self.proc = None
                    return {"id": mutant.id, "outcome": "CRASH", "returncode": code}
                return json.loads(line)

    def close(self) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
            self.proc = None


PASSING = ("ok", "error")


def fuzz(corpus: Corpus, *, count: int, seed: int, runner: Runner, families: list[str] | None = None,
         log: Callable[[str], None] | None = None) -> list[dict]:
    """Run `count` seeded mutants (families in turn) and return one result per mutant, with its description."""
    rng = random.Random(seed)
    families = families or corpus.families()
    results = []
    for n in range(count):
        family = families[n % len(families)]
        mutant = corpus.mutant(family, rng)
        result = runner.run(mutant)
        result.update(family=family, what=mutant.what)
        results.append(result)
        if log:
            why = f"  -> {result.get('error', '')}: {result.get('message', '')[:120]}"
            why = "" if result["outcome"] == "ok" else why
            log(f"{mutant.id:4d} {family:11s} {result['outcome']:13s} {result.get('seconds', 0):6.2f}s  "
                f"{mutant.what[:70]}{why}")
        if mutant.cleanup is not None:
            shutil.rmtree(mutant.cleanup, ignore_errors=True)
    return results
