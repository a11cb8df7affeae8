"""Decode/prefill benchmark of the bundled model (or -m MODEL): a thin wrapper of `leanformers bench`.

    python bench/bench_decode.py                 # writes bench/results/decode.json
    python bench/bench_decode.py --quick -m DIR  # smoke test
    python bench/bench_decode.py --help
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from leanformers.bench import main  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not any(a == "--json" or a.startswith("--json=") for a in argv) and "--quick" not in argv:
        argv += ["--json", str(ROOT / "bench" / "results" / "decode.json")]
    sys.exit(main(argv))
