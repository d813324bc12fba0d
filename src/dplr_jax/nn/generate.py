"""Autoregressive generation: prefill the prompt, then one `decode_step` per new token."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


def sample(logits, key, *, temperature=1.0, top_k=None, greedy=False):
    """Next tokens int32 [B] from logits [B, V]: argmax, or softmax(logits / temperature)
    restricted to the top_k largest logits."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "top_k", "greedy"))
def _generate(graphdef, state, prompt, key, temperature, *, max_new_tokens, top_k, greedy):
    model = nnx.merge(graphdef, state)
    pick = functools.partial(sample, temperature=temperature, top_k=top_k, greedy=greedy)
    logits, cache = model.prefill(prompt, prompt.shape[1] + max_new_tokens)
    keys = jax.random.split(key, max_new_tokens)
    first = pick(logits[:, -1], keys[0])

    def body(carry, k):
        tok, cache = carry
        logits, cache = model.decode_step(tok, cache)
        nxt = pick(logits, k)
        return (nxt, cache), nxt

    _, rest = jax.lax.scan(body, (first, cache), keys[1:])
    return jnp.concatenate([prompt, first[:, None], rest.T], axis=1)


def generate(model, prompt, max_new_tokens: int, *, rng, temperature=1.0, top_k=None,
             greedy=False):
    """Extends prompt int [B, T0] by max_new_tokens tokens -> int32 [B, T0 + max_new_tokens].

    greedy=True takes the argmax; otherwise samples from softmax(logits / temperature), over
    the top_k most likely tokens when top_k is set. rng: a jax PRNG key. The linear mixers
    decode with a fixed-size state; softmax layers keep a KV cache of T0 + max_new_tokens.
    """
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"generate: argument 'prompt' has shape {prompt.shape}; expected "
                         f"[B, T0] with T0 >= 1")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"generate: argument 'max_new_tokens' = {max_new_tokens!r} must be a "
                         f"positive integer")
    total = prompt.shape[1] + max_new_tokens
    max_len = model.config.max_len
    if total > max_len:
        raise ValueError(f"generate: prompt length + max_new_tokens = {total} exceeds the "
                         f"config's max_len = {max_len}")
    if top_k is not None and not (isinstance(top_k, int) and 1 <= top_k <= model.config.vocab_size):
        raise ValueError(f"generate: argument 'top_k' = {top_k!r} must be in "
                         f"[1, vocab_size = {model.config.vocab_size}] or None")
    if not greedy and not temperature > 0:
        raise ValueError(f"generate: argument 'temperature' = {temperature} must be > 0")
    graphdef, state = nnx.split(model)
    return _generate(graphdef, state, prompt, rng, jnp.float32(temperature),
                     max_new_tokens=max_new_tokens, top_k=top_k, greedy=greedy)
