"""Old tree against new, generate call by generate call: a drift-free A/B of one decode mode.

    python bench/redesign_alternate.py --old /tmp/lf-old/src --mode int4 --new-tokens 128 --rounds 10

Two processes, one per tree (this checkout's src/ and --old), load the bundled SmolLM2 in the same mode;
then they take turns, one greedy generate of --new-tokens tokens each (EOS ignored, 2 threads), so that
the machine's load drifts equally over both. Prints each side's decode tok/s per turn and the median of
the per-turn new/old ratios. The shared 2-core machine's speed drifts by 20-40% within minutes, more
than the differences this looks for; bench/redesign_check.py runs whole processes per mode and round.
"""
import os, sys, subprocess, statistics, json
import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--old", required=True, help="the pre-redesign source tree (its src/ directory)")
ap.add_argument("--mode", default="int4", choices=["fp32", "bf16", "cbf16", "int4"],
                help="fp32/bf16 eager; cbf16 compiled bfloat16; int4 compiled int4")
ap.add_argument("--new-tokens", type=int, default=128)
ap.add_argument("--rounds", type=int, default=10)
args = ap.parse_args()
mode, n, rounds = args.mode, args.new_tokens, args.rounds
child = r'''
import sys, os, json
src, mode, n, rounds, rfd, wfd = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
sys.path.insert(0, src)
import torch; torch.set_num_threads(2)
import leanformers
path = "smollm2-135m-instruct"
kw = dict(progress=False)
if mode == "int4": kw.update(quantize="int4", compile=True)
elif mode == "cbf16": kw.update(dtype="bfloat16", compile=True)
elif mode == "bf16": kw.update(dtype="bfloat16")
elif mode == "fp32": kw.update(dtype="float32")
lm = leanformers.load(path, **kw)
g = {"temperature": 0.0} if int(sys.argv[7]) else {"temperature": 0.0, "repetition_penalty": 1.0}
chat = list(range(100, 137))
lm.generate(chat, max_new_tokens=32, ignore_eos=True, **g)
r = os.fdopen(rfd, "r"); w = os.fdopen(wfd, "w")
out = []
for i in range(rounds):
    r.readline()
    out.append(lm.generate(chat, max_new_tokens=n, ignore_eos=True, **g).stats["decode_tokens_per_s"])
    w.write("done\n"); w.flush()
print(json.dumps(out))
'''
procs, pipes = [], []
for old, src in ((1, str(Path(args.old).resolve())), (0, str(ROOT / "src"))):
    r1, w1 = os.pipe(); r2, w2 = os.pipe()
    p = subprocess.Popen([sys.executable, "-c", child, src, mode, str(n), str(rounds), str(r1), str(w2), str(old)],
                         pass_fds=(r1, w2), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    procs.append(p); pipes.append((os.fdopen(w1, "w"), os.fdopen(r2, "r")))
for i in range(rounds):
    for w, r in pipes:
        w.write("go\n"); w.flush(); r.readline()
res = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
ratios = [b / a for a, b in zip(*res)]
print(mode, n, "old", [round(x, 1) for x in res[0]], "new", [round(x, 1) for x in res[1]],
      "new/old median", round(statistics.median(ratios), 3))
