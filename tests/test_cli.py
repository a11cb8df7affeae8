"""The `leanformers` entry point, run for real in a subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import leanformers

_BESIDE = Path(sys.executable).parent / "leanformers"  # the venv's script, also when the venv is not activated
EXE = str(_BESIDE) if _BESIDE.is_file() else (shutil.which("leanformers") or "")


def run(*args: str, stdin: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [EXE, *args] if EXE else [sys.executable, "-m", "leanformers.cli", *args]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=timeout, env=env)


def assert_clean_error(r: subprocess.CompletedProcess, needle: str) -> None:
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines and needle in lines[-1], r.stderr


def test_entry_point_installed():
    assert EXE, "the `leanformers` console script is not on PATH (pip install -e .)"


def test_help_for_each_command():
    for command in ["generate", "chat", "info", "perplexity"]:
        r = run(command, "--help")
        assert r.returncode == 0 and "--model" in r.stdout, command
    assert "--max-new-tokens" in run("generate", "--help").stdout


def test_generate_matches_python_api(tiny_models):
    model = str(tiny_models["llama3"])
    r = run("generate", "-m", model, "Once upon a time", "--raw", "--max-new-tokens", "12", "--ignore-eos", "--no-stream")
    assert r.returncode == 0, r.stderr
    lm = leanformers.load(model, progress=False)
    expected = lm.generate("Once upon a time", max_new_tokens=12, ignore_eos=True)
    # text-mode pipes read "\r" as "\n" (universal newlines); random tiny models do emit "\r"
    assert r.stdout == (expected.text + "\n").replace("\r\n", "\n").replace("\r", "\n")
    streamed = run("generate", "-m", model, "Once upon a time", "--raw", "--max-new-tokens", "12", "--ignore-eos",
                   "--stream")
    assert streamed.stdout == r.stdout
    assert "Loading" not in r.stderr  # no progress bars when piped
    # without --raw, a model with a chat template gets the prompt as a user message
    chat = run("generate", "-m", model, "Once upon a time", "--max-new-tokens", "12", "--ignore-eos")
    expected = lm.chat([{"role": "user", "content": "Once upon a time"}], max_new_tokens=12, ignore_eos=True)
    assert chat.returncode == 0 and chat.stdout == (expected.text + "\n").replace("\r\n", "\n").replace("\r", "\n")


def test_info(tiny_models):
    r = run("info", str(tiny_models["qwen2"]))
    assert r.returncode == 0, r.stderr
    for needle in ["qwen2", "parameters", "context length:   256", "model.safetensors", "float32"]:
        assert needle in r.stdout


def test_chat_through_a_pipe(tiny_models):
    model = str(tiny_models["llama3"])
    r = run("chat", "-m", model, "--max-new-tokens", "6", "--ignore-eos", "--no-stream",
            stdin="Hello there\n/reset\nHello there\n/exit\nnever read\n")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    lm = leanformers.load(model, progress=False)
    first = lm.chat([{"role": "user", "content": "Hello there"}], max_new_tokens=6, ignore_eos=True).text
    assert r.stdout == (first + "\n") * 2  # /reset: the second answer starts from an empty history
    assert "[history cleared]" in r.stderr and len(lines) >= 2


def test_chat_keeps_history(tiny_models):
    model = str(tiny_models["llama3"])
    r = run("chat", "-m", model, "--max-new-tokens", "4", "--ignore-eos", "--system", "Be brief.",
            stdin="one\ntwo\n")
    assert r.returncode == 0, r.stderr
    lm = leanformers.load(model, progress=False)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "one"}]
    a = lm.chat(msgs, max_new_tokens=4, ignore_eos=True).text
    msgs += [{"role": "assistant", "content": a}, {"role": "user", "content": "two"}]
    b = lm.chat(msgs, max_new_tokens=4, ignore_eos=True).text
    assert r.stdout == f"{a}\n{b}\n"


@pytest.mark.parametrize(
    "args, needle",
    [(["generate", ""], "empty"),
     (["generate", "hi", "--max-new-tokens", "0"], "max_new_tokens"),
     (["generate", "hi", "--temperature", "-1"], "temperature"),
     (["generate", "hi", "--top-p", "1.5"], "top_p"),
     (["generate", "-m", "no-such-model-alias", "hi"], "no-such-model-alias"),
     (["generate", "-m", "./missing/dir", "hi"], "missing"),
     (["info", "/nonexistent/model.gguf"], "nonexistent"),
     (["info", "-m", "a", "b"], "two models"),
     (["generate", "hi", "--device", "cud"], "invalid device 'cud'"),
     (["generate", "hi", "--device", "cuda"], "CUDA is not available"),
     (["generate", "hi", "--draft", "nonsense"], "nonsense"),
     (["generate", "hi", "--num-draft-tokens", "3"], "needs draft"),
     (["generate", "hi", "--raw", "--system", "Be brief."], "--raw"),
     (["generate", "hi", "--quantize", "int4", "--group-size", "7"], "group_size")],
)
def test_bad_input_is_one_clean_line(tiny_models, args, needle):
    if args[0] == "generate" and "-m" not in args:
        args = [args[0], "-m", str(tiny_models["llama3"]), *args[1:]]
    assert_clean_error(run(*args), needle)


def test_prompt_too_long(tiny_models):
    model = str(tiny_models["llama3"])
    long_prompt = "word " * 400  # the tiny model's context is 256 tokens
    assert_clean_error(run("generate", "-m", model, long_prompt, "--max-new-tokens", "4"), "context window")
    r = run("generate", "-m", model, long_prompt, "--max-new-tokens", "4", "--truncate", "--ignore-eos")
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_bundled_model_generate_and_chat():
    r = run("generate", "--chat", "What is the capital of France?", "--max-new-tokens", "24")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    r = run("chat", "--max-new-tokens", "24", stdin="What is the capital of France?\n")
    assert r.returncode == 0 and "Paris" in r.stdout, r.stderr


def test_perplexity_command(tiny_models, tmp_path):
    from leanformers.eval.perplexity import perplexity

    model = str(tiny_models["llama3"])
    text_file = tmp_path / "text.txt"
    text_file.write_text("The quick brown fox jumps over the lazy dog. Once upon a time there was a model. " * 6)
    r = run("perplexity", "-m", model, str(text_file), "--context", "32", "--stride", "16")
    assert r.returncode == 0, r.stderr
    expected = perplexity(leanformers.load(model, progress=False), text_file.read_text(), context=32, stride=16)
    assert f"tokens: {expected.tokens}" in r.stdout and f"perplexity: {expected.ppl:.4f}" in r.stdout
    assert_clean_error(run("perplexity", "-m", model, str(tmp_path / "missing.txt")), "missing.txt")


def test_arguments_are_refused_before_the_model_loads(tiny_models):
    """A bad argument costs no model load: the error comes even when the model would not load at all."""
    r = run("generate", "-m", str(tiny_models["llama3"]), "hi", "--temperature", "-2", "-v")
    assert_clean_error(r, "temperature")
    assert "load" not in r.stderr.lower().replace("leanformers: error", "")


def test_empty_answer_is_explained_on_stderr(tiny_models):
    """A generation that ends with no text (here: the first token is EOS) says so, and why."""
    model = str(tiny_models["llama3"])
    lm = leanformers.load(model, progress=False)
    first = lm.chat([{"role": "user", "content": "hello"}], max_new_tokens=1).token_ids[0]
    import json
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp()) / "m"
    shutil.copytree(model, d)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": first}))
    r = run("generate", "-m", str(d), "hello", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "\n" and "produced no text" in r.stderr and "end-of-sequence" in r.stderr


@pytest.mark.slow
def test_bare_generate_answers_with_the_bundled_model():
    """The first command a newcomer types: the chat template is applied, and the answer is not empty."""
    r = run("generate", "What is the capital of France?")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout and r.stdout.strip()


@pytest.mark.slow
def test_self_int8_draft_from_the_cli(tiny_models):
    model = str(tiny_models["llama3"])
    r = run("generate", "-m", model, "Once upon a time", "--raw", "--max-new-tokens", "12", "--ignore-eos",
            "--draft", "self-int8", "--stats", "--no-stream")
    assert r.returncode == 0, r.stderr
    expected = leanformers.load(model, progress=False).generate("Once upon a time", max_new_tokens=12, ignore_eos=True)
    assert r.stdout == (expected.text + "\n").replace("\r\n", "\n").replace("\r", "\n")
