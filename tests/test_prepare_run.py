"""mlxtune prepare end to end: strict mode, atomic output, token counting with a real tokenizer,
mlx-lm's own loader reading the result, and the CLI in-process and as a subprocess."""

import json
import os
import subprocess
import sys
import types

import pytest
from typer.testing import CliRunner

from mlxtune.cli import app
from mlxtune.errors import DataError
from mlxtune.prepare import PrepareOptions, prepare_dataset
from tests.test_cli import assert_one_line_error, invoke
from tests.test_prepare import NASTY_ALPACA, SHAREGPT, write_lines


@pytest.fixture
def nasty(tmp_path):
    """The Alpaca JSONL with a BOM, CRLF, blank, malformed, duplicate, empty and unanswered rows."""
    return write_lines(tmp_path / "alpaca.jsonl", NASTY_ALPACA, bom=True)


def test_strict_stops_at_first_bad_row_and_leaves_existing_output(tmp_path, nasty):
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.jsonl").write_text("old\n")
    with pytest.raises(DataError) as e:
        prepare_dataset([nasty], out, PrepareOptions(strict=True))
    assert str(e.value).startswith(f"{nasty}:4: not valid JSON")
    assert [p.name for p in out.iterdir()] == ["train.jsonl"]
    assert (out / "train.jsonl").read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == sorted(["alpaca.jsonl", "out"])


def test_strict_names_json_items_and_clean_data_passes(tmp_path):
    share = tmp_path / "share.json"
    share.write_text(json.dumps(SHAREGPT))
    with pytest.raises(DataError, match=r"share.json: item 3: no assistant answer"):
        prepare_dataset([share], tmp_path / "out", PrepareOptions(strict=True))
    share.write_text(json.dumps(SHAREGPT[:2]))
    report = prepare_dataset([share], tmp_path / "out", PrepareOptions(strict=True))
    assert sum(report.kept.values()) == 2 and not report.dropped


def test_refuses_to_replace_a_folder_of_other_files(tmp_path, nasty):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "thesis.tex").write_text("precious")
    with pytest.raises(DataError, match="holds other files \\(thesis.tex\\)"):
        prepare_dataset([nasty], tmp_path / "work")
    assert (tmp_path / "work" / "thesis.tex").read_text() == "precious"


def _lengths_by_hand(model_dir, examples):
    """Token lengths from the bare tokenizers library and the template written out by hand."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    rendered = ["".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
                        for m in ex["messages"]) for ex in examples]
    return [len(tok.encode(text).ids) for text in rendered]


def test_token_lengths_with_the_model_tokenizer(tmp_path, tiny_model_dir):
    rows = [{"prompt": "The capital of France is?", "completion": "Paris."},
            {"prompt": "Translate to JSON: name Ada, age 36.",
             "completion": '{"name": "Ada", "age": 36}'},
            {"prompt": "what is two plus two?", "completion": "four."},
            {"prompt": "the quick brown fox " * 6, "completion": "jumps over the lazy dog"}]
    raw = write_lines(tmp_path / "qa.jsonl", [json.dumps(r) for r in rows])
    chats = [{"messages": [{"role": "user", "content": r["prompt"]},
                           {"role": "assistant", "content": r["completion"]}]} for r in rows]
    lengths = _lengths_by_hand(tiny_model_dir, chats)
    assert lengths == [35, 50, 33, 120]

    report = prepare_dataset([raw], tmp_path / "out", PrepareOptions(model=str(tiny_model_dir)))
    assert report.tokens == {"examples": 4, "min": 33, "median": 42.5, "p95": 120, "max": 120}
    assert not report.dropped

    cut = prepare_dataset([raw], tmp_path / "cut", PrepareOptions(model=str(tiny_model_dir),
                                                                  max_tokens=49))
    assert [(r["line"], r["reason"], r["why"]) for r in cut.dropped_rows] == [
        (2, "too_long", "50 tokens, over --max-tokens 49"),
        (4, "too_long", "120 tokens, over --max-tokens 49")]
    assert cut.tokens == {"examples": 2, "min": 33, "median": 34, "p95": 35, "max": 35}
    with pytest.raises(DataError, match=r"qa.jsonl:2: 50 tokens, over --max-tokens 49"):
        prepare_dataset([raw], tmp_path / "strict", PrepareOptions(
            model=str(tiny_model_dir), max_tokens=49, strict=True))


def test_bad_data_is_reported_before_the_tokenizer_loads(tmp_path, monkeypatch):
    from mlxtune.prepare import run

    monkeypatch.setattr(run, "_token_counter", lambda *a: pytest.fail("tokenizer loaded"))
    raw = tmp_path / "x.csv"
    raw.write_text("Foo,Bar\n1,2\n")
    with pytest.raises(DataError, match="cannot tell which fields"):
        prepare_dataset([raw], tmp_path / "out", PrepareOptions(model="no/such-model"))


def _mlx_lm_load(folder, tokenizer):
    from mlx_lm.tuner.datasets import load_dataset

    args = types.SimpleNamespace(data=str(folder), train=True, test=True, hf_dataset=None,
                                 mask_prompt=False)
    return load_dataset(args, tokenizer)


@pytest.mark.parametrize("kind", ["completions", "chat", "text"])
def test_mlx_lm_loads_the_prepared_folder(tmp_path, tiny_model_dir, nasty, kind):
    from mlx_lm.utils import load_tokenizer

    inputs = {"completions": [nasty], "chat": [nasty, tmp_path / "share.json"],
              "text": [tmp_path / "notes.txt"]}[kind]
    (tmp_path / "share.json").write_text(json.dumps(SHAREGPT))
    write_lines(tmp_path / "notes.txt", ["One.", "", "Two.", "", "Three.", "", "Four."])
    report = prepare_dataset(inputs, tmp_path / "out")
    assert report.format == kind
    train, valid, test = _mlx_lm_load(tmp_path / "out", load_tokenizer(tiny_model_dir))
    assert (len(train), len(valid), len(test)) == tuple(report.kept.values())
    assert sum(report.kept.values()) == {"completions": 3, "chat": 6, "text": 4}[kind]
    assert type(train).__name__ == {"completions": "CompletionsDataset", "chat": "ChatDataset",
                                    "text": "TextDataset"}[kind]
    for dataset in (train, valid, test):
        for i in range(len(dataset)):
            tokens, offset = dataset.process(dataset[i])
            assert len(tokens) > 3 and offset == 0


def test_cli_prints_the_summary(tmp_path, nasty, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["prepare", "alpaca.jsonl", "--out", "out", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert "alpaca.jsonl:4" in result.output and "no_answer" in result.output
    assert "wrote" in result.output and "\x1b" not in result.output
    report = json.loads((out / "report.json").read_text())
    assert report["options"]["seed"] == 3 and sum(report["kept"].values()) == 3
    assert [r["line"] for r in report["dropped_rows"]] == [4, 5, 6, 7, 9]


def test_cli_user_error_is_a_data_error(tmp_path, nasty):
    result = invoke("prepare", nasty, "--out", tmp_path / "o", "--strict")
    assert_one_line_error(result, f"{nasty}:4: not valid JSON")
    assert not (tmp_path / "o").exists()


def test_cli_subprocess_one_line_exit_2(tmp_path, nasty):
    env = dict(os.environ, MLXTUNE_FAST_BLAS="0")
    proc = subprocess.run([sys.executable, "-m", "mlxtune", "prepare", str(nasty), "--out",
                           str(tmp_path / "o"), "--strict"], check=False, capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        (f"error: {nasty}:4: not valid JSON (Expecting ',' delimiter at column 53) (--strict "
         "stops at the first row it would drop)")]
    assert proc.stdout == ""
