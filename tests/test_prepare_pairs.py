"""mlxtune prepare on preference data: TRL string and conversational pairs, Anthropic HH, and
UltraFeedback scored lists all become one prepared form; bad pairs are dropped and reported."""

import json

import pytest

from mlxtune.errors import DataError
from mlxtune.prepare import PrepareOptions, prepare_dataset
from mlxtune.prepare.pairs import make_pair, to_pair
from mlxtune.prepare.shapes import Drop
from tests.test_prepare import write_lines

U, A = "user", "assistant"


def _m(role, text):
    return {"role": role, "content": text}


PARIS = {"prompt": [_m(U, "Capital of France?")], "chosen": [_m(A, "Paris.")],
         "rejected": [_m(A, "Lyon.")]}


def _read(out):
    return [json.loads(line) for s in ("train", "valid", "test")
            for line in (out / f"{s}.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("record, shape", [
    ({"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."}, "preference"),
    (PARIS, "preference"),
    # UltraFeedback-binarized: chosen and rejected repeat the prompt as their first turn.
    ({"prompt": "Capital of France?",
      "chosen": [_m(U, "Capital of France?"), _m(A, "Paris.")],
      "rejected": [_m(U, "Capital of France?"), _m(A, "Lyon.")]}, "preference"),
    ({"chosen": "\n\nHuman: Capital of France?\n\nAssistant: Paris.",
      "rejected": "\n\nHuman: Capital of France?\n\nAssistant: Lyon."}, "hh"),
    ({"chosen": [_m(U, "Capital of France?"), _m(A, "Paris.")],
      "rejected": [{"from": "human", "value": "Capital of France?"}, _m(A, "Lyon.")]}, "hh"),
    ({"instruction": "Capital of France?", "completions": [
        {"response": "Lyon.", "overall_score": 2}, {"response": "Paris.", "overall_score": 9.5},
        {"response": "Nice.", "overall_score": 4}]}, "ultrafeedback"),
])
def test_every_shape_becomes_the_same_pair(tmp_path, record, shape):
    raw = write_lines(tmp_path / "raw.jsonl", [json.dumps(record)] * 1)
    report = prepare_dataset([raw], tmp_path / "out", PrepareOptions(valid_fraction=0,
                                                                     test_fraction=0))
    assert report.format == "preference"
    assert report.files[0]["shape"] == shape
    assert _read(tmp_path / "out") == [PARIS]


def test_hh_multi_turn_keeps_the_shared_conversation_as_prompt():
    from mlxtune.prepare.pairs import detect_pairs

    common = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Capital of France?\n\nAssistant:"
    record = {"chosen": common + " Paris.", "rejected": common + " Lyon."}
    pair = to_pair(detect_pairs("x", record), record)
    assert pair == {"prompt": [_m(U, "Hi"), _m(A, "Hello!"), _m(U, "Capital of France?")],
                    "chosen": [_m(A, "Paris.")], "rejected": [_m(A, "Lyon.")]}


@pytest.mark.parametrize("prompt, chosen, rejected, reason", [
    ([_m(U, "q")], [_m(A, "same")], [_m(A, "same")], "identical"),
    ([_m(U, "q")], [_m(A, " ")], [_m(A, "no")], "empty"),
    ([_m(U, "q")], [_m(A, "yes")], [], "empty"),
    ([_m(U, " ")], [_m(A, "yes")], [_m(A, "no")], "empty"),
    ([], [_m(U, "q1"), _m(A, "yes")], [_m(U, "q2"), _m(A, "no")], "no_shared_prompt"),
    ([], [_m(A, "yes")], [_m(A, "no")], "no_shared_prompt"),
])
def test_bad_pairs_are_dropped_with_a_reason(prompt, chosen, rejected, reason):
    with pytest.raises(Drop) as e:
        make_pair(prompt, chosen, rejected)
    assert e.value.reason == reason


def test_bad_rows_are_reported_and_good_ones_kept(tmp_path):
    rows = [json.dumps({"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"})
            for i in range(20)]
    rows += [json.dumps({"prompt": "q", "chosen": "same", "rejected": "same"}),
             json.dumps({"prompt": "q", "chosen": "", "rejected": "bad"}),
             json.dumps({"prompt": "q", "chosen": "\n\nHuman: a\n\nAssistant: x",
                         "rejected": "\n\nHuman: b\n\nAssistant: y"}),
             json.dumps({"prompt": "q1", "chosen": "good 1", "rejected": "bad 1"}),  # duplicate
             "{not json"]
    raw = write_lines(tmp_path / "pairs.jsonl", rows)
    report = prepare_dataset([raw], tmp_path / "out", PrepareOptions(system="Be brief."))
    assert sum(report.kept.values()) == 20
    assert report.dropped == {"identical": 1, "empty": 1, "no_shared_prompt": 1, "duplicate": 1,
                              "malformed": 1}
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert {r["line"]: r["reason"] for r in saved["dropped_rows"]} == {
        21: "identical", 22: "empty", 23: "no_shared_prompt", 24: "duplicate", 25: "malformed"}
    pairs = _read(tmp_path / "out")
    assert all(p["prompt"][0] == _m("system", "Be brief.") for p in pairs)


def test_tied_ultrafeedback_scores_are_dropped(tmp_path):
    rows = [json.dumps({"instruction": "q", "completions": [
        {"response": "a", "overall_score": 5}, {"response": "b", "overall_score": 5}]}),
        json.dumps({"instruction": "q2", "completions": [
            {"response": "a", "overall_score": 5}, {"response": "b", "overall_score": 1}]})]
    raw = write_lines(tmp_path / "uf.jsonl", rows)
    report = prepare_dataset([raw], tmp_path / "out", PrepareOptions(valid_fraction=0,
                                                                     test_fraction=0))
    assert report.dropped == {"tied": 1} and report.kept["train"] == 1


def test_pairs_and_sft_examples_do_not_mix(tmp_path):
    pairs = write_lines(tmp_path / "pairs.jsonl", [json.dumps(PARIS)])
    sft = write_lines(tmp_path / "sft.jsonl", [json.dumps({"prompt": "q", "completion": "a"})])
    with pytest.raises(DataError, match="cannot mix preference pairs"):
        prepare_dataset([pairs, sft], tmp_path / "out")
    with pytest.raises(DataError, match="--format preference needs 'chosen' and 'rejected'"):
        prepare_dataset([sft], tmp_path / "out2", PrepareOptions(format="preference"))


def test_prepared_pairs_train_as_they_are(tmp_path, tiny_model_dir):
    """What prepare writes is what training reads: token counts and the DPO data check."""
    from mlxtune.train.data import check_data_folder

    rows = [json.dumps({"prompt": f"question {i}", "chosen": "fox", "rejected": "dog"})
            for i in range(30)]
    raw = write_lines(tmp_path / "pairs.jsonl", rows)
    report = prepare_dataset([raw], tmp_path / "out", PrepareOptions(model=str(tiny_model_dir),
                                                                     max_tokens=64))
    assert report.tokens["examples"] == 30
    assert set(check_data_folder(tmp_path / "out", mode="dpo")) == {"train", "valid", "test"}
    with pytest.raises(DataError, match="holds preference pairs"):
        check_data_folder(tmp_path / "out")
