"""`POST /v1/embeddings`: an encoder served alone (`leanformers serve -m all-minilm-l6-v2`) or beside a
generative model (`leanformers serve -m DECODER --embedding-model ENCODER`).

Any object with `embed(list[str]) -> Tensor[N, D]` and a `tokenizer` whose `encode(text)` gives the token
ids that usage counts qualifies (`Embedder`): a `leanformers.encoder.Encoder` as `leanformers.load` returns
it for encoder checkpoints (usage counts at most its `max_seq_length` tokens per text, as it truncates).
Inputs are texts (a string or a list of strings); token-id inputs are refused, since ids of which tokenizer
would be ambiguous. `encoding_format` "base64" is the float32 little-endian bytes of each vector, as the
OpenAI API sends it; `dimensions` must be the model's own width (no truncation).
"""

from __future__ import annotations

import base64
from typing import Any, Protocol, runtime_checkable

import torch

from ..errors import InvalidArgumentError
from . import schemas as S

MAX_INPUTS = 2048  # the OpenAI API's limit of inputs per request


@runtime_checkable
class Embedder(Protocol):
    """What the embeddings endpoint needs of a model."""

    tokenizer: Any

    def embed(self, texts: list[str]) -> torch.Tensor:
        """(N, D) float embeddings of N texts."""
        ...


def embed_request(embedder: Embedder, req: S.EmbeddingRequest, model_name: str) -> S.EmbeddingList:
    """Embed the request's inputs; raises InvalidArgumentError for inputs the endpoint does not take."""
    texts = [req.input] if isinstance(req.input, str) else req.input
    if not texts:
        raise InvalidArgumentError("input is empty")
    if not all(isinstance(t, str) for t in texts):
        raise InvalidArgumentError("input must be a string or a list of strings (token ids are not supported)")
    if len(texts) > MAX_INPUTS:
        raise InvalidArgumentError(f"at most {MAX_INPUTS} inputs per request, got {len(texts)}")
    if any(not t for t in texts):
        raise InvalidArgumentError("input contains an empty string")
    vectors = embedder.embed(list(texts)).float().cpu()
    if vectors.dim() != 2 or vectors.shape[0] != len(texts):
        raise RuntimeError(f"the embedder returned shape {tuple(vectors.shape)} for {len(texts)} texts")
    if req.dimensions is not None and req.dimensions != vectors.shape[1]:
        raise InvalidArgumentError(f"dimensions: this model's embeddings have {vectors.shape[1]} dimensions "
                                   f"(other sizes are not supported), got {req.dimensions}")
    data = []
    for i, v in enumerate(vectors):
        if req.encoding_format == "base64":
            value: Any = base64.b64encode(v.numpy().astype("<f4").tobytes()).decode("ascii")
        else:
            value = v.tolist()
        data.append(S.Embedding(index=i, embedding=value))
    limit = getattr(embedder, "max_seq_length", None)  # an Encoder truncates longer texts (with a warning)
    tokens = sum(min(len(embedder.tokenizer.encode(t)), limit or 2**62) for t in texts)
    return S.EmbeddingList(data=data, model=model_name, usage=S.EmbeddingUsage(prompt_tokens=tokens,
                                                                                total_tokens=tokens))
