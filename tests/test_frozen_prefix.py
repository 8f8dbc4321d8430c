"""The frozen-prefix cache: the same losses, gradients and training as computing every layer."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import load

from mlxtune.fastpath import prepare_for_training
from mlxtune.train.frozen_prefix import FrozenPrefix, first_trained_layer
from mlxtune.train.loop import masked_loss, train
from tests.tiny import make_tiny_llama

pytestmark = pytest.mark.numerics


def _model(tmp_path, top: int = 1, bits: int | None = 4):
    folder = tmp_path / "tiny"
    make_tiny_llama(folder, bits=bits, layers=4)
    model, _ = load(str(folder))
    model.freeze()
    mx.random.seed(0)
    linear_to_lora_layers(model, top, {"rank": 4, "scale": 2.0, "dropout": 0.0})
    # Non-zero B so the adapters change the output (mlx-lm starts them at zero).
    model.update(tree_unflatten([(name, 0.05 * mx.random.normal(value.shape))
                                 for name, value in tree_flatten(model.trainable_parameters())
                                 if name.endswith("lora_b")]))
    return prepare_for_training(model, "cpu")


def _batch(seed: int, width: int = 24):
    rng = np.random.default_rng(seed)
    inputs = rng.integers(3, 300, size=(3, width)).astype(np.int32)
    mask = np.zeros((3, width), np.float32)
    for row, (a, b) in enumerate([(4, 20), (0, 9), (10, 24)]):  # prompt, answer, padding
        mask[row, a:b] = 1
    targets = np.roll(inputs, -1, axis=1)
    return mx.array(inputs), mx.array(targets), mx.array(mask)


def _loss_and_grads(model, inputs, targets, mask):
    fn = nn.value_and_grad(model, lambda m, *a: masked_loss(m, *a)[0])
    loss, grads = fn(model, inputs, targets, mask)
    return loss.item(), dict(tree_flatten(grads))


def test_loss_and_gradients_match_the_full_model(tmp_path):
    model = _model(tmp_path)
    inputs, targets, mask = _batch(0)
    loss, grads = _loss_and_grads(model, inputs, targets, mask)
    prefix = FrozenPrefix(model, max_bytes=1 << 30)
    assert prefix.start == 3  # adapters on the top block only
    for _ in range(2):  # the first pass computes and keeps, the second reads the cache
        cached_loss, cached_grads = _loss_and_grads(model, prefix.hidden(inputs, mask), targets,
                                                    mask)
        assert cached_loss == pytest.approx(loss, rel=1e-5)
        assert cached_grads.keys() == grads.keys()
        for name, g in grads.items():
            np.testing.assert_allclose(np.array(cached_grads[name]), np.array(g), rtol=1e-4,
                                       atol=1e-6)
    assert (prefix.misses, prefix.hits) == (3, 3)
    prefix.remove()
    assert _loss_and_grads(model, inputs, targets, mask)[0] == pytest.approx(loss, rel=1e-6)


def test_rows_are_found_whatever_their_padding_and_neighbours(tmp_path):
    model = _model(tmp_path)
    prefix = FrozenPrefix(model, max_bytes=1 << 30)
    inputs, targets, mask = _batch(1, width=24)
    first = prefix.hidden(inputs, mask)
    # The same examples, reordered and padded wider, next to a new one.
    wide = mx.concatenate([inputs[::-1], mx.zeros((3, 8), mx.int32)], axis=1)
    wide_mask = mx.concatenate([mask[::-1], mx.zeros((3, 8))], axis=1)
    again = prefix.hidden(wide, wide_mask)
    assert prefix.misses == 3 and prefix.hits == 3
    for row in range(3):
        n = int(np.flatnonzero(np.array(mask[row]))[-1]) + 1
        np.testing.assert_array_equal(np.array(again[2 - row, :n]), np.array(first[row, :n]))
        # Past the last trained position nothing is computed: zeros.
        assert not np.array(again[2 - row, n:]).any()


def test_the_cache_holds_what_it_counts(tmp_path):
    """Entries are copies of the kept positions: they do not keep the padded batch alive."""
    import gc

    model = _model(tmp_path)
    prefix = FrozenPrefix(model, max_bytes=1 << 30)
    inputs = mx.array(np.random.default_rng(4).integers(3, 300, size=(3, 512)), mx.int32)
    mask = mx.zeros((3, 512)).at[:, :8].add(1.0)  # 8 trained positions, 504 of padding
    mx.eval(inputs, mask)
    gc.collect()
    before = mx.get_active_memory()
    out = prefix.hidden(inputs, mask)
    del out
    gc.collect()
    assert prefix.bytes == 3 * 8 * 64 * 4
    # The batch's states are 3 x 512 x 64 floats (393 KB); only the 6 KB kept may remain.
    assert mx.get_active_memory() - before < 4 * prefix.bytes


def test_without_room_rows_are_computed_each_time(tmp_path):
    model = _model(tmp_path)
    inputs, targets, mask = _batch(2)
    unbounded = FrozenPrefix(model, max_bytes=1 << 30)
    want = np.array(unbounded.hidden(inputs, mask))
    unbounded.remove()
    prefix = FrozenPrefix(model, max_bytes=0)
    for _ in range(2):
        np.testing.assert_array_equal(np.array(prefix.hidden(inputs, mask)), want)
    assert prefix.bytes == 0 and prefix.misses == 6


def test_models_it_cannot_cache_are_one_config_error(tmp_path):
    from mlxtune.errors import ConfigError

    model = _model(tmp_path)
    model.model.layers[0].drop = nn.Dropout(0.1)  # an untrained layer that is not deterministic
    with pytest.raises(ConfigError, match=r"^cache_frozen_layers: the untrained layers use "
                                          r"dropout, so their outputs differ every epoch"):
        FrozenPrefix(model, max_bytes=1 << 30)
    model.__class__ = type("Other", (type(model),), {})  # defined here: not llama/qwen2/qwen3
    with pytest.raises(ConfigError, match=r"^cache_frozen_layers: supported for llama, qwen2 "
                                          r"and qwen3 models, not test_frozen_prefix$"):
        FrozenPrefix(model, max_bytes=1 << 30)


def test_nothing_to_skip_when_every_layer_trains(tmp_path):
    model = _model(tmp_path, top=4)
    assert first_trained_layer(model) == 0
    prefix = FrozenPrefix(model, max_bytes=1 << 30)
    inputs, _, mask = _batch(3)
    assert prefix.hidden(inputs, mask) is inputs


def test_training_with_the_cache_follows_training_without(tmp_path):
    """A few AdamW steps over two repeating batches: the same losses either way."""
    import mlx.optimizers as optim

    def run(cached: bool):
        model = _model(tmp_path / str(cached), top=2)
        data = [_batch(10), _batch(11)]
        batches = ((i, *data[i % 2]) for i in range(100))
        prefix = FrozenPrefix(model, max_bytes=1 << 30) if cached else None
        if prefix is not None:
            batches = prefix.batches(batches)
        losses = []
        train(model, optim.AdamW(learning_rate=1e-3), batches, 6,
              on_step=lambda step, loss, n, stats: losses.append(loss))
        return losses, prefix

    plain, _ = run(False)
    cached, prefix = run(True)
    np.testing.assert_allclose(cached, plain, rtol=1e-4)
    assert plain[-1] < plain[0]
    assert (prefix.misses, prefix.hits) == (6, 6 * 3 - 6)  # 6 steps of 3 rows, 2 batches


def test_a_training_run_with_the_cache_matches_one_without(tmp_path, tiny_qmodel_dir):
    """`cache_frozen_layers: true` in the YAML: the run says what it caches, its validation
    losses and saved adapters are the run without it (the tiny model: block 0 of 2 cached)."""
    from mlx.utils import tree_flatten as flatten

    from mlxtune.train.run import run_training
    from tests.adapters import train_config

    said, runs = [], {}
    for cached in (False, True):
        config = train_config(tmp_path / str(cached), tiny_qmodel_dir, num_layers=1, iters=24,
                              steps_per_eval=8, save_every=8, cache_frozen_layers=cached)
        runs[cached] = run_training(config, say=said.append)
    assert any(line.startswith("cache_frozen_layers: blocks 0-0 of 2 run once per example")
               for line in said), said

    def val_losses(run):
        rows = (run.run_dir / "metrics.jsonl").read_text().splitlines()
        return [r["val_loss"] for r in map(json.loads, rows) if "val_loss" in r]

    np.testing.assert_allclose(val_losses(runs[True]), val_losses(runs[False]), rtol=1e-3)
    assert val_losses(runs[True])[-1] < 0.7 * val_losses(runs[True])[0]
    saved = {k: dict(flatten(mx.load(str(r.run_dir / "adapters.safetensors"))))
             for k, r in runs.items()}
    assert saved[True].keys() == saved[False].keys() and all("layers.1." in k for k in saved[True])
