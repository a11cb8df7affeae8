"""Distributed fine-tuning (issue 13): torchrun with 2 processes over gloo on CPU against 1 process.

Every multi-process run is a `torch.distributed.run --standalone` subprocess with a timeout, 1 thread per
process; the references are 1-process runs of the same global batch (batch x grad-accum x world size).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import leanformers
from conftest import TINY_VOCAB, write_tiny_tokenizer
from finetune_utils import metrics, write_text_data
from leanformers.errors import InvalidArgumentError

SRC = str(Path(leanformers.__file__).parents[1])
TIMEOUT = 180  # seconds any one launch may take before the test fails (no hangs)

# a torchrun worker: leanformers.finetune with JSON options, per-rank overrides and fault hooks
WORKER = r"""
import json, logging, os, signal, sys, time
import torch
torch.set_num_threads(1)
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
import leanformers
model, data, out, opts = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
rank, restart = int(os.environ["RANK"]), int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
hooks = opts.pop("_hooks", {})
if hooks.get("chdir_rank") == rank:
    os.chdir(hooks["chdir"])                   # this rank sees another filesystem (a relative --data is missing)
mine = opts.get(f"_rank{rank}", {})
opts = {k: v for k, v in opts.items() if not k.startswith("_rank")}
opts.update(mine)
data = opts.pop("data", data)

def callback(row):
    if hooks.get("kill_rank") == rank and hooks.get("kill_at") == row["step"] and restart == 0:
        os.kill(os.getpid(), signal.SIGKILL)   # a worker dies: no cleanup
    if hooks.get("sleep_rank") == rank and hooks.get("sleep_at") == row["step"]:
        time.sleep(hooks["sleep_s"])           # a worker hangs

leanformers.finetune(model, data=data, output_dir=out, callback=callback, **opts)
if hooks.get("threads"):  # gloo worker threads still running after finetune() returned
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    sys.stdout.write("THREADS " + json.dumps({"rank": rank, "gloo_workers": names.count("pt_gloo_runloop")}) + "\n")
if hooks.get("peak_rss"):  # this rank's peak RSS: VmHWM (ru_maxrss would carry the launcher's over fork + exec)
    hwm_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    sys.stdout.write("PEAK_RSS " + json.dumps({"rank": rank, "mb": hwm_kb / 1024}) + "\n")  # one write per line
"""

COMMON = dict(method="full", seq_len=48, precision="fp32", lr=2e-3, warmup_steps=2, weight_decay=0.01, seed=7,
              save_every=None)


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")


def torchrun(tmp: Path, nproc: int, model: Path, data: Path, out: Path, opts: dict, *,
             max_restarts: int = 0, check: bool = True) -> subprocess.CompletedProcess:
    """Launch WORKER on `nproc` processes (torchrun --standalone); fails the test on error unless check=False."""
    script = tmp / "worker.py"
    script.write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "--max-restarts", str(max_restarts), str(script), str(model), str(data), str(out), json.dumps(opts)]
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    if check and p.returncode != 0:
        raise AssertionError(f"torchrun exited {p.returncode}:\n{p.stderr[-6000:]}")
    return p


def single(model: Path, data: Path, out: Path, **opts):
    """The same run in this process (no torchrun), on 1 thread as each worker; the thread count is restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return leanformers.finetune(str(model), data=str(data), output_dir=str(out), **opts)
    finally:
        torch.set_num_threads(threads)


def losses(out: Path) -> list[float]:
    return [m["loss"] for m in metrics(out)]


def assert_close(a: list[float], b: list[float], tol: float = 1e-5) -> None:
    assert len(a) == len(b), (a, b)
    for x, y in zip(a, b):
        assert abs(x - y) <= tol, (a, b)


def weights(out: Path, method: str) -> dict[str, torch.Tensor]:
    return load_file(str(out / ("model.safetensors" if method == "full" else "adapter_model.safetensors")))


def assert_same_weights(a: Path, b: Path, method: str, tol: float = 1e-5) -> None:
    wa, wb = weights(a, method), weights(b, method)
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        assert wa[k].shape == wb[k].shape, k
        assert (wa[k].float() - wb[k].float()).abs().max().item() <= tol, k


# ------------------------------------------------------------------------------------ parity
@pytest.mark.slow
def test_ddp_cli_matches_one_process(tiny_models, tmp_path):
    """`leanformers finetune` under torchrun (auto: DDP for a model this small; 2 x batch 2) = 1 process batch 4:
    losses, weights, files, one log."""
    model = tiny_models["llama3"]
    data = write_text_data(tmp_path / "train.jsonl", 37)  # 10 global micro-batches, the last one row: rank 1 idles
    steps = 10
    ref = single(model, data, tmp_path / "one", max_steps=steps, batch_size=4, **COMMON)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "leanformers",
           "finetune", "-m", str(model), "--data", str(data), "--output", str(tmp_path / "two"), "--method", "full",
           "--max-steps", str(steps), "--batch-size", "2", "--seq-len", "48", "--precision",
           "fp32", "--lr", "2e-3", "--warmup-steps", "2", "--weight-decay", "0.01", "--seed", "7"]
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, p.stderr[-6000:]
    two = tmp_path / "two"
    rows = metrics(two)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))  # rank 0 alone writes: every step once
    assert [r["tokens"] for r in rows] == [r["tokens"] for r in metrics(ref.output_dir)]  # every row, no overlap
    assert_close(losses(two), losses(ref.output_dir))
    assert_same_weights(two, ref.output_dir, "full")
    assert (p.stdout + p.stderr).count("saved the model to") == 1  # rank 0 reports
    assert "strategy auto -> DDP" in p.stderr and p.stderr.count("-> 37 rows") == 1  # rank-0 log
    visible = lambda d: sorted(x.name for x in d.iterdir() if not x.name.startswith("."))  # noqa: E731
    assert visible(two) == visible(ref.output_dir)  # the same files as one process writes
    lm = leanformers.load(str(two))  # the output is an ordinary model directory
    assert lm.config.vocab_size > 0


@pytest.mark.slow
@pytest.mark.parametrize("strategy,method,extra", [("fsdp", "full", {}), ("ddp", "lora", {}),
                                                   ("fsdp", "lora", {"grad_checkpointing": True})])
def test_two_processes_match_one(tiny_models, tmp_path, strategy, method, extra):
    """DDP / FSDP, full / LoRA, with gradient accumulation (and activation checkpointing under FSDP) and an
    eval set split over the ranks: 2 x batch 2 x accum 2 = 1 x batch 4 x accum 2."""
    model = tiny_models["llama3"]
    data = write_text_data(tmp_path / "train.jsonl", 30)
    evals = write_text_data(tmp_path / "eval.jsonl", 11, seed=3)  # 3 eval batches of 4 (2 x 2): one rank idles
    steps = 10  # 4 steps per epoch: crosses epochs, the last step of each is short
    opts = dict(COMMON, method=method, max_steps=steps, grad_accum=2, eval_data=str(evals), eval_every=5, **extra)
    if method == "lora":
        opts.update(lr=5e-3, lora_r=4, lora_dropout=0.0)
    ref = single(model, data, tmp_path / "one", batch_size=4, **opts)
    two = tmp_path / "two"
    torchrun(tmp_path, 2, model, data, two, dict(opts, batch_size=2, strategy=strategy))
    assert [r["step"] for r in metrics(two)] == list(range(1, steps + 1))
    assert_close(losses(two), losses(ref.output_dir))
    evals_two = [r["eval_loss"] for r in metrics(two) if "eval_loss" in r]
    assert len(evals_two) == 2
    assert_close(evals_two, [r["eval_loss"] for r in metrics(ref.output_dir) if "eval_loss" in r])
    assert_same_weights(two, ref.output_dir, method)
    assert losses(two)[-1] < losses(two)[0]  # it learns


# ------------------------------------------------------------------------------------ memory
MIB = 2**20


def _save_llama(directory: Path, *, hidden: int, intermediate: int, layers: int) -> int:
    """A random Llama (fp32, untied head, the tiny tokenizer) saved by transformers; its parameter count."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=hidden, intermediate_size=intermediate,
                                      num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                                      max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=1,
                                      eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(directory)
    write_tiny_tokenizer(directory)
    return sum(p.numel() for p in model.parameters())


def _peak_rss(p: subprocess.CompletedProcess) -> list[float]:
    """Per-rank peak RSS in MiB (rank order), from the PEAK_RSS lines of WORKER's `peak_rss` hook."""
    # found anywhere in the output: the ranks share torchrun's stdout, so one line may run into the other's
    rows = sorted((json.loads(x) for x in re.findall(r"PEAK_RSS (\{[^}]*\})", p.stdout)), key=lambda r: r["rank"])
    assert [r["rank"] for r in rows] == [0, 1], p.stdout[-2000:]
    return [r["mb"] for r in rows]


@pytest.mark.slow
def test_fsdp_peak_rss_per_rank_is_below_ddp(tmp_path):
    """Issue 13: peak RSS per rank under FSDP is below DDP's for the same model (measured, printed).

    Full fine-tuning in fp32 of a ~32M-parameter Llama on 2 processes with tiny batches, so that weights,
    gradients and AdamW's two moments (16 bytes per parameter, ~486 MiB) dominate each process's RSS rather than
    torch's own baseline (~220 MiB) or the activations. Peak RSS is each rank's VmHWM (WORKER's peak_rss hook).

    Both launches run with the default allocator, as a user's would. On CPU the FSDP path fixes glibc's mmap
    threshold (`strategy.fix_mmap_threshold`): by default a freed mmap-ed block raises the threshold (up to
    32 MiB), and the megabyte-sized buffers FSDP all-gathers and reduce-scatters every step then stay on a
    fragmented heap; without the fix this test measured FSDP above DDP (921, 998 MiB against 852, 848 MiB per
    rank; ~620-650 MiB with it). bench/RESULTS.md, "Distributed fine-tuning (issue 13)", shows the same on
    SmolLM2-135M.
    """
    model = tmp_path / "model"
    n = _save_llama(model, hidden=512, intermediate=1536, layers=10)
    data = write_text_data(tmp_path / "train.jsonl", 16)
    opts = dict(method="full", precision="fp32", seq_len=32, batch_size=1, max_steps=3, lr=1e-4, save_every=None,
                _hooks={"peak_rss": True})
    peaks, logged = {}, {}
    for strategy in ("ddp", "fsdp"):
        p = torchrun(tmp_path, 2, model, data, tmp_path / strategy, dict(opts, strategy=strategy))
        peaks[strategy] = _peak_rss(p)
        logged[strategy] = next((x.rsplit(": ", 1)[1] for x in p.stderr.splitlines() if "peak RSS per rank" in x), "")
    ratio = max(peaks["fsdp"]) / max(peaks["ddp"])
    print(f"\n{n / 1e6:.1f}M parameters, fp32, 2 processes; peak RSS per rank (VmHWM, MiB): "
          f"ddp {', '.join(f'{x:.0f}' for x in peaks['ddp'])}; fsdp {', '.join(f'{x:.0f}' for x in peaks['fsdp'])}; "
          f"fsdp / ddp (max over ranks) {ratio:.2f}  [the loop's log: ddp {logged['ddp']}; fsdp {logged['fsdp']}]")
    # What sharding saves: DDP keeps weights + gradients + 2 AdamW moments whole on every rank, 16 bytes per
    # parameter (~486 MiB here); FSDP keeps half of each on each of the 2 ranks, 8 bytes per parameter, so it saves
    # ~243 MiB per rank while training. Every rank still loads the whole weights before sharding them (4-6 bytes
    # per parameter while sharding), and at the end rank 0 gathers them again to save them next to its shards
    # (8 + 4 = 12 bytes per parameter), so FSDP's peak is at least 4 bytes per parameter (~122 MiB) below DDP's
    # on every rank. The margin is half of that (~61 MiB); the other half absorbs FSDP's gathered blocks (one
    # layer is ~12 MiB, two in flight) and allocator noise.
    margin = 0.5 * 4 * n / MIB
    assert max(peaks["fsdp"]) < min(peaks["ddp"]) - margin, (peaks, margin)


# ------------------------------------------------------------------------------------ checkpoints
def _resume_copy(src: Path, dst: Path, step: int) -> Path:
    """A copy of run `src` to resume from its checkpoint-STEP."""
    shutil.copytree(src, dst)
    return dst / f"checkpoint-{step}"


@pytest.mark.slow
def test_checkpoint_of_two_fsdp_processes_resumes_in_one(tiny_models, tmp_path):
    model = tiny_models["llama3"]
    data = write_text_data(tmp_path / "train.jsonl", 24)
    opts = dict(COMMON, max_steps=10, save_every=5)
    two = tmp_path / "two"
    torchrun(tmp_path, 2, model, data, two, dict(opts, batch_size=2, strategy="fsdp"))
    ckpt = two / "checkpoint-5"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["global_batch"] == 4 and state["format"] == "torch.distributed.checkpoint"
    assert (ckpt / ".metadata").is_file() and (ckpt / "rng-0.pt").is_file() and (ckpt / "rng-1.pt").is_file()

    resumed = tmp_path / "resumed"
    ckpt = _resume_copy(two, resumed, 5)
    # another global batch cannot carry the data position over: refused before the model loads, naming it
    with pytest.raises(InvalidArgumentError, match="global batch of 4 rows"):
        single(model, data, resumed, **dict(opts, batch_size=2, resume=str(ckpt)))
    single(model, data, resumed, **dict(opts, batch_size=4, resume=str(ckpt)))  # no torchrun: a world of one
    rows = metrics(resumed)
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert_close(losses(resumed), losses(two))
    assert_same_weights(resumed, two, "full")


@pytest.mark.slow
def test_checkpoint_of_one_process_resumes_in_two(tiny_models, tmp_path):
    """A run under torchrun with 1 process (LoRA) resumed by 2 DDP processes."""
    model = tiny_models["llama3"]
    data = write_text_data(tmp_path / "train.jsonl", 24)
    opts = dict(COMMON, method="lora", lr=5e-3, lora_r=4, lora_dropout=0.0, max_steps=10, save_every=5)
    one = tmp_path / "one"
    torchrun(tmp_path, 1, model, data, one, dict(opts, batch_size=4))
    ckpt = one / "checkpoint-5"
    assert (ckpt / "adapter_model.safetensors").is_file()  # a usable PEFT adapter inside the checkpoint
    resumed = tmp_path / "resumed"
    ckpt = _resume_copy(one, resumed, 5)
    p = torchrun(tmp_path, 2, model, data, resumed, dict(opts, batch_size=2, strategy="ddp", resume=str(ckpt),
                                                      _hooks={"threads": True}))
    assert [r["step"] for r in metrics(resumed)] == list(range(1, 11))
    # the group of our object collectives (tensors made in Python) is gone with its threads when finetune()
    # returns; only the default group DDP keeps alive may remain (2 workers; torch 2.13 leaks it), or none.
    # A worker of ours still releasing tensors at interpreter exit aborts the process (see Group.control_group)
    counts = [json.loads(line.split(" ", 1)[1]) for line in p.stdout.splitlines() if line.startswith("THREADS ")]
    assert sorted(c["rank"] for c in counts) == [0, 1], p.stdout[-2000:]
    assert all(c["gloo_workers"] <= 2 for c in counts), counts
    assert_close(losses(resumed), losses(one))
    assert_same_weights(resumed, one, "lora")


# ------------------------------------------------------------------------------------ elastic
@pytest.mark.slow
def test_killed_worker_restarts_and_every_step_is_logged_once(tiny_models, tmp_path):
    model = tiny_models["llama3"]
    data = write_text_data(tmp_path / "train.jsonl", 24)
    opts = dict(COMMON, max_steps=10, save_every=3)
    ref = single(model, data, tmp_path / "one", batch_size=4, **opts)
    out = tmp_path / "elastic"
    p = torchrun(tmp_path, 2, model, data, out, dict(opts, batch_size=2, strategy="ddp",
                                                       _hooks={"kill_rank": 1, "kill_at": 7}), max_restarts=1)
    # it did die and restart, from checkpoint-6
    assert "torchrun restart 1: continuing from the newest checkpoint" in p.stderr, p.stderr[-4000:]
    assert [r["step"] for r in metrics(out)] == list(range(1, 11))
    assert_close(losses(out), losses(ref.output_dir))
    assert_same_weights(out, ref.output_dir, "full")


# ------------------------------------------------------------------------------------ bad input
def test_strategy_without_torchrun_is_refused(tiny_models, tmp_path):
    data = write_text_data(tmp_path / "train.jsonl", 4)
    with pytest.raises(InvalidArgumentError, match="--strategy fsdp.*torchrun"):
        single(tiny_models["llama3"], data, tmp_path / "out", strategy="fsdp", max_steps=1)
    with pytest.raises(InvalidArgumentError, match="strategy"):
        single(tiny_models["llama3"], data, tmp_path / "out", strategy="zero3", max_steps=1)


@pytest.mark.slow
def test_rank_that_cannot_read_the_data_is_reported_by_rank_0(tiny_models, tmp_path, monkeypatch):
    data = write_text_data(tmp_path / "train.jsonl", 8)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(tmp_path)  # the workers inherit it: "train.jsonl" is there for rank 0, not for rank 1
    p = torchrun(tmp_path, 2, tiny_models["llama3"], Path("train.jsonl"), tmp_path / "out",
                 dict(COMMON, max_steps=2, batch_size=2, _hooks={"chdir_rank": 1, "chdir": str(elsewhere)}), check=False)
    assert p.returncode != 0
    assert "reading the data and loading the model failed on 1 of 2 ranks: rank 1" in p.stderr, p.stderr[-4000:]
    assert "train.jsonl" in p.stderr


@pytest.mark.slow
def test_different_data_across_ranks_is_refused(tiny_models, tmp_path):
    data = write_text_data(tmp_path / "train.jsonl", 8)
    other = write_text_data(tmp_path / "other.jsonl", 8, seed=1)
    p = torchrun(tmp_path, 2, tiny_models["llama3"], data, tmp_path / "out",
                 dict(COMMON, max_steps=2, batch_size=2, _rank1={"data": str(other)}), check=False)
    assert p.returncode != 0
    assert "comparing the options of the ranks: rank 1 differs from rank 0: data:" in p.stderr, p.stderr[-4000:]


@pytest.mark.slow
def test_a_hung_rank_times_out_with_a_clear_error(tiny_models, tmp_path):
    data = write_text_data(tmp_path / "train.jsonl", 16)
    p = torchrun(tmp_path, 2, tiny_models["llama3"], data, tmp_path / "out",
                 dict(COMMON, max_steps=4, batch_size=2, strategy="ddp", dist_timeout=5,
                      _hooks={"sleep_rank": 1, "sleep_at": 2, "sleep_s": 60}), check=False)
    assert p.returncode != 0
    assert "training step 3: another rank did not answer within 5 s (--dist-timeout)" in p.stderr, p.stderr[-4000:]


@pytest.mark.slow
def test_what_gloo_or_the_checkpoint_cannot_do_is_refused_by_rank_0(tiny_models, tmp_path):
    model, data = tiny_models["llama3"], write_text_data(tmp_path / "train.jsonl", 8)
    opts = dict(COMMON, max_steps=2, batch_size=2, save_every=1)
    p = torchrun(tmp_path, 2, model, data, tmp_path / "a", dict(opts, cpu_offload=True), check=False)
    assert p.returncode != 0
    assert "cpu_offload (--cpu-offload)" in p.stderr and "drop --cpu-offload" in p.stderr, p.stderr[-4000:]
    # a single-process checkpoint (weights in one file, AdamW by position) is not resharded
    single(model, data, tmp_path / "b", **opts)
    p = torchrun(tmp_path, 2, model, data, tmp_path / "b", dict(opts, batch_size=1, resume=True), check=False)
    assert p.returncode != 0
    assert "checkpoint-1: written by a single process" in p.stderr, p.stderr[-4000:]
    assert not (tmp_path / "a").exists()  # refused before anything was written
