"""The position maps of the two training-free peers, as their papers and official code define them.

Both keep RoPE and change only which relative position a query-key pair is scored at. For a pair at
distance ``d = i - j`` (query at position ``i``, key at ``j``):

**STRING** ("Why Does the Effective Context Length of LLMs Fall Short?", An et al. 2024,
arXiv 2410.18745; official code github.com/HKUNLP/STRING, ``string_for_llama.py``)::

    P(d) = d              if d < S      (the diagonal band: ordinary positions)
    P(d) = d - S + W      if d >= S     (shifted: the largest, rarely trained distances are dropped
                                         and the well-trained small ones reused; W keeps neighbours apart)

with ``S = int(0.33 * L)`` and ``W = 128`` (the repository's README: ``shifted_offset=int(0.33 * L),
small_local_value=128``). The official code also multiplies the rotated q and k by
``attention_factor = 0.1 * ln(2) + 1`` ("STRING will make the attention map smooth, we use the
attention_factor to recover it, similar with Yarn"), i.e. every logit by its square; it is applied here
the same way, to every pair. (The official flash-attention prefill counts the key at exactly ``d = S``
in both parts -- its sliding window ``[S, 0]`` is inclusive -- while its decoding path splits at
``d < S``; the formula above is the decoding path's and the paper's.) Every relative position stays
below ``L`` only while ``n - S + W <= L``: past about ``1.5 L`` STRING with these parameters does not
keep positions in the trained range.

**DCA**, dual chunk attention ("Training-Free Long-Context Scaling of Large Language Models", An et al.
2024, arXiv 2402.17463; official code github.com/HKUNLP/ChunkLlama, ``chunkllama_attn_replace.py``).
With ``chunk_size = L * 3 // 4``, local window ``w = L // 8`` and chunk length ``c = chunk_size - w``
(``replace_with_chunkllama(pretraining_length=L)``), keys sit at ``j mod c`` and a query at one of
three positions, by the chunk of the key::

    same chunk        (intra):       i mod c                    -> P = i - j
    previous chunk    (successive):  c + min(i mod c, w)        -> P = c + min(i mod c, w) - j mod c
    earlier chunks    (inter):       c + w  (= chunk_size)      -> P = c + w - j mod c

so ``P <= chunk_size < L`` for any input length. For inputs longer than ``L`` the official code scales
q and k by ``mscale = 0.05 * ln(n / L) + 1`` (each; the logits by its square), ``n`` the sequence
length; applied here as a logit scale chosen once per sequence from its length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

STRING_SHIFT_RATIO = 0.33  # S = int(0.33 * L)
STRING_LOCAL = 128  # W
STRING_ATTENTION_FACTOR = 0.1 * math.log(2) + 1  # scales q and k (official code)


@dataclass(frozen=True)
class StringSettings:
    """STRING's two parameters (``shift`` = S, ``local`` = W) on a model trained on ``pretrained_length``."""

    pretrained_length: int
    shift: int
    local: int
    attention_factor: float = STRING_ATTENTION_FACTOR
    block_size: int = 1024

    def __post_init__(self):
        if not 0 < self.local < self.shift:
            raise ValueError(f"STRING needs 0 < W < S (got S={self.shift}, W={self.local}); "
                             f"the defaults are S = int({STRING_SHIFT_RATIO} * L), W = {STRING_LOCAL}")

    @classmethod
    def for_length(cls, pretrained_length: int, shift: int | None = None, local: int | None = None,
                   block_size: int = 1024) -> "StringSettings":
        """The paper's defaults, S = int(0.33 L) and W = 128, unless given."""
        return cls(pretrained_length, int(STRING_SHIFT_RATIO * pretrained_length) if shift is None else shift,
                   STRING_LOCAL if local is None else local, block_size=block_size)

    def relative(self, d: int) -> int:
        """The relative position STRING scores a pair at distance ``d >= 0`` at."""
        return d if d < self.shift else d - self.shift + self.local

    def logit_scale(self, length: int) -> float:
        return self.attention_factor ** 2

    def largest_position(self, length: int) -> int:
        """The largest relative position an input of ``length`` tokens uses."""
        return self.relative(length - 1)

    def describe(self) -> str:
        return f"STRING L={self.pretrained_length} S={self.shift} W={self.local}"


@dataclass(frozen=True)
class DcaSettings:
    """DCA's chunk length ``chunk`` (= chunk_size - w) and local window ``local`` (= w)."""

    pretrained_length: int
    chunk: int
    local: int
    block_size: int = 1024

    def __post_init__(self):
        if not 0 < self.local < self.chunk:
            raise ValueError(f"DCA needs 0 < local window < chunk length (got {self.local}, {self.chunk}); the "
                             "defaults are chunk_size = L * 3 // 4, w = L // 8, chunk length chunk_size - w")

    @classmethod
    def for_length(cls, pretrained_length: int, chunk_size: int | None = None, local: int | None = None,
                   block_size: int = 1024) -> "DcaSettings":
        """ChunkLlama's defaults: chunk_size = L * 3 // 4, w = L // 8, unless given."""
        size = pretrained_length * 3 // 4 if chunk_size is None else chunk_size
        w = pretrained_length // 8 if local is None else local
        return cls(pretrained_length, size - w, w, block_size=block_size)

    @property
    def chunk_size(self) -> int:
        return self.chunk + self.local

    def query_position(self, i: int, j: int) -> int:
        """The position of query ``i`` when it scores key ``j`` (keys sit at ``j mod chunk``)."""
        c, w = self.chunk, self.local
        behind = i // c - j // c
        if behind == 0:
            return i % c
        if behind == 1:
            return c + min(i % c, w)
        return c + w

    def relative(self, i: int, j: int) -> int:
        """The relative position DCA scores the pair (query ``i``, key ``j <= i``) at."""
        return self.query_position(i, j) - j % self.chunk

    def logit_scale(self, length: int) -> float:
        """``mscale ** 2`` for a sequence of ``length`` tokens (1 up to L)."""
        scale = length / self.pretrained_length
        mscale = 1.0 if scale <= 1 else 0.05 * math.log(scale) + 1.0
        return mscale ** 2

    def largest_position(self, length: int) -> int:
        return min(length - 1, self.chunk_size)

    def describe(self) -> str:
        return f"DCA L={self.pretrained_length} chunk={self.chunk} w={self.local}"
