"""Fuzzed inputs: whatever bytes a raw file holds, whatever YAML or --set a user writes, whatever
messages a chat has, the outcome is a result or one MlxtuneError, never another exception and
never a half-written output folder. Seeded (derandomize) and bounded, so the suite stays fast
and every run tries the same cases."""

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlxtune.errors import MlxtuneError
from mlxtune.prepare.run import PrepareOptions, prepare_dataset
from mlxtune.train.config import load_train_config

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

# Raw-file pieces a broken export holds: JSON fragments, quotes, separators, odd bytes.
_PIECES = [b'{"messages": [', b'{"role": "user", "content": "hi"}', b'"prompt": "a", ',
           b'"completion": "b"}', b'{"text": "t"}', b"]", b"}", b"{", b",", b'"', b"\n", b"\r\n",
           b"\x00", b"\xff\xfe", b"\xc3\x28", b"a,b,c\n", b'"x""y",', b"\t", b"null", b"[[[[",
           b"instruction,output\n", b"1e999", b"\\u0000", "é".encode()]
raw_bytes = st.one_of(st.binary(max_size=300),
                      st.lists(st.sampled_from(_PIECES), max_size=40).map(b"".join))


def _prepare_outcome(tmp_path, name: str, data: bytes):
    src = tmp_path / name
    src.write_bytes(data)
    out = tmp_path / "out"
    try:
        report = prepare_dataset([src], out, PrepareOptions(progress=False))
    except MlxtuneError as e:
        assert "\n" not in str(e).strip() or str(e).count("\n") < 20, str(e)
        assert not out.exists()  # all or nothing
        return None
    assert {p.name for p in out.iterdir()} >= {"train.jsonl", "valid.jsonl", "test.jsonl",
                                               "report.json"}
    return report


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".txt"])
@FUZZ
@given(data=raw_bytes)
def test_prepare_ends_in_a_result_or_one_error_for_any_bytes(tmp_path_factory, suffix, data):
    tmp = tmp_path_factory.mktemp("fuzz")
    _prepare_outcome(tmp, "raw" + suffix, data)


@pytest.mark.parametrize("suffix, depth", [(".json", 100_000), (".jsonl", 100_000),
                                           (".json", 5_000)])
def test_deeply_nested_json_is_one_error(tmp_path, suffix, depth):
    data = b"[" * depth + b"]" * depth
    with pytest.raises(MlxtuneError) as e:
        prepare_dataset([_write(tmp_path / ("deep" + suffix), data)], tmp_path / "out",
                        PrepareOptions(progress=False))
    assert "\n" not in str(e.value)


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


_KEYS = ["model", "data", "batch_size", "iters", "learning_rate", "lora_parameters",
         "lora_parameters.rank", "lora_parameters.scale", "lr_schedule", "optimizer", "seed",
         "num_layers", "mask_prompt", "max_seq_length", "fine_tune_type", "bogus", "quantize"]
_VALUES = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20),
                                 st.floats(allow_nan=True), st.text(max_size=12)),
                       lambda inner: st.one_of(st.lists(inner, max_size=3),
                                               st.dictionaries(st.text(max_size=8), inner,
                                                               max_size=3)),
                       max_leaves=6)


@FUZZ
@given(document=st.one_of(st.dictionaries(st.sampled_from(_KEYS), _VALUES, max_size=6),
                          _VALUES),
       overrides=st.lists(st.tuples(st.sampled_from(_KEYS), st.text(max_size=16)), max_size=3))
def test_config_is_a_config_or_one_error_for_any_yaml(tmp_path_factory, document, overrides):
    path = tmp_path_factory.mktemp("cfg") / "config.yaml"
    path.write_text(yaml.safe_dump(document))
    try:
        load_train_config(path, [f"{k}={v}" for k, v in overrides])
    except MlxtuneError:
        pass


@FUZZ
@given(text=st.text(max_size=200))
def test_config_text_that_is_not_yaml_is_one_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("cfg") / "config.yaml"
    path.write_text(text)
    try:
        load_train_config(path)
    except MlxtuneError:
        pass


_ROLES = st.sampled_from(["system", "user", "assistant", "tool", "", "USER", 3, None])
_MESSAGE = st.one_of(st.fixed_dictionaries({"role": _ROLES, "content": st.one_of(
    st.text(max_size=30), st.none(), st.integers())}), st.text(max_size=5), st.none())


@FUZZ
@given(messages=st.lists(_MESSAGE, max_size=5), mask_prompt=st.booleans())
def test_chat_tokenizing_masks_or_errors_for_any_messages(tiny_model_dir, messages, mask_prompt):
    from mlx_lm.utils import load_tokenizer

    from mlxtune.train.data import tokenize_record

    tok = _tokenizer(tiny_model_dir, load_tokenizer)
    try:
        ex = tokenize_record(tok, {"messages": messages}, mask_prompt)
    except MlxtuneError:
        return
    assert len(ex.tokens) == len(ex.loss_mask) > 0
    assert ex.loss_mask.all() or mask_prompt


_TOKENIZERS: dict = {}


def _tokenizer(model_dir, load):
    if str(model_dir) not in _TOKENIZERS:
        _TOKENIZERS[str(model_dir)] = load(model_dir)
    return _TOKENIZERS[str(model_dir)]
