"""Compiled decoding: the one-token step compiled (AOTInductor packages on CPU), and weights in huge pages.

    from leanformers.compile import compile_decode
    step = compile_decode(lm.model)          # or lm.compile(); the generation loop is handed `step`
"""

from .inductor import default_cache_dir
from .step import DEFAULT_CACHE_LEN, CompiledDecode, compile_decode

__all__ = ["DEFAULT_CACHE_LEN", "CompiledDecode", "compile_decode", "default_cache_dir"]
