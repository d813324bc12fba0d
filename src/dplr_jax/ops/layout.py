"""Chunk layout: [B, T, ...] token arrays <-> [B, NC, C, ...] chunks, with packed sequences.

Without cu_seqlens, each batch row is padded at the end to a multiple of C. With
cu_seqlens (B == 1), every packed sequence is moved to start on a chunk boundary, so each
chunk belongs to exactly one sequence and a state reset happens only between chunks. The
number of chunks has the static bound ceil(T / C) + N, so this works on traced offsets and
needs no Python loop over sequences. Padding tokens are zeros, which every op treats as the
identity transition with no update (log decay 0, zero keys and values).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class ChunkLayout:
    B: int
    T: int
    C: int
    NC: int
    token_pos: jnp.ndarray | None  # [T] position of each token in the padded [NC*C] (varlen)
    reset: jnp.ndarray  # [NC] bool: the chunk starts a sequence
    init_idx: jnp.ndarray  # [B, NC] which initial state a resetting chunk loads
    final_row: jnp.ndarray  # [N] batch row holding sequence n's last chunk
    final_chunk: jnp.ndarray  # [N] index of sequence n's last chunk

    @staticmethod
    def make(B, T, C, cu_seqlens=None):
        if cu_seqlens is None:
            NC = max(-(-T // C), 1)
            reset = jnp.arange(NC) == 0
            init_idx = jnp.broadcast_to(jnp.arange(B)[:, None], (B, NC))
            return ChunkLayout(B, T, C, NC, None, reset, init_idx, jnp.arange(B),
                               jnp.full((B,), NC - 1))
        cu = jnp.asarray(cu_seqlens, jnp.int32)
        N = cu.shape[0] - 1
        NC = -(-T // C) + N
        lens = cu[1:] - cu[:-1]
        n_chunks = jnp.maximum(-(-lens // C), 1)  # an empty sequence keeps one identity chunk
        first = jnp.cumsum(n_chunks) - n_chunks
        t = jnp.arange(T)
        seq = jnp.clip(jnp.searchsorted(cu, t, side="right") - 1, 0, N - 1)
        token_pos = first[seq] * C + (t - cu[seq])
        c = jnp.arange(NC)
        chunk_seq = jnp.clip(jnp.searchsorted(first, c, side="right") - 1, 0, N - 1)
        reset = c == first[chunk_seq]
        return ChunkLayout(1, T, C, NC, token_pos, reset, chunk_seq[None], jnp.zeros((N,), jnp.int32),
                           first + n_chunks - 1)

    def to_chunks(self, x):
        """[B, T, *rest] -> [B, NC, C, *rest], zero padded."""
        if x is None:
            return None
        rest = x.shape[2:]
        if self.token_pos is None:
            pad = self.NC * self.C - self.T
            x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * len(rest))
        else:
            x = jnp.zeros((1, self.NC * self.C) + rest, x.dtype).at[:, self.token_pos].set(x)
        return x.reshape(self.B, self.NC, self.C, *rest)

    def from_chunks(self, y):
        """[B, NC, C, *rest] -> [B, T, *rest]."""
        y = y.reshape(self.B, self.NC * self.C, *y.shape[3:])
        return y[:, : self.T] if self.token_pos is None else y[:, self.token_pos]
