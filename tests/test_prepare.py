"""mlxtune prepare: every input format in the shapes people export, with the nasty parts, cleaned
into mlx-lm's formats with exact counts and the line of every dropped row."""

import json

import pytest

from mlxtune.errors import ConfigError, DataError
from mlxtune.prepare import PrepareOptions, prepare_dataset
from mlxtune.prepare.fingerprints import FingerprintSet


def read_split(out, split):
    """The examples in one split file."""
    return [json.loads(line) for line in (out / f"{split}.jsonl").read_text().splitlines()]


def all_examples(out):
    """Every example in the three splits, in split order."""
    return [ex for split in ("train", "valid", "test") for ex in read_split(out, split)]


def dropped(report):
    """[(position, reason)] of the dropped rows."""
    return [(row.get("line", row.get("item", row.get("row"))), row["reason"])
            for row in report.dropped_rows]


def write_lines(path, lines, newline="\r\n", bom=False):
    """Lines written the way a Windows tool saves them: CRLF and, optionally, a UTF-8 BOM."""
    path.write_bytes(("\ufeff" if bom else "").encode() + newline.join(lines).encode() +
                     newline.encode())
    return path


NASTY_ALPACA = [
    '{"instruction": "Say hi", "input": "", "output": "hi"}',           # 1 (after the BOM)
    '',                                                                  # 2 blank: not a row
    '{"instruction": "Add", "input": "1+1", "output": "2"}',             # 3
    '{"instruction": "Add", "input": "1+1", "output": "2"',              # 4 malformed
    '{"instruction": "Say hi", "input": "", "output": "hi"}',            # 5 duplicate of 1
    '{"instruction": "   ", "input": "", "output": " "}',                # 6 empty
    '{"instruction": "Name a colour", "input": "", "output": ""}',       # 7 no answer
    '   ',                                                               # 8 blank: not a row
    '["not", "an", "object"]',                                           # 9 malformed
    '{"instruction": "Capital of France?", "output": "Paris"}',          # 10 no input: fine
]


def test_jsonl_alpaca_with_bom_crlf_blank_malformed_duplicate(tmp_path):
    raw = write_lines(tmp_path / "alpaca.jsonl", NASTY_ALPACA, bom=True)
    report = prepare_dataset([raw], tmp_path / "out")
    assert report.format == "completions"
    assert report.files == [{"file": str(raw), "shape": "alpaca", "rows": 8, "kept": 3,
                             "dropped": 5}]
    assert dropped(report) == [(4, "malformed"), (5, "duplicate"), (6, "empty"),
                               (7, "no_answer"), (9, "malformed")]
    assert report.dropped == {"malformed": 2, "duplicate": 1, "empty": 1, "no_answer": 1}
    assert sorted(all_examples(tmp_path / "out"), key=lambda e: e["prompt"]) == [
        {"prompt": "Add\n\n1+1", "completion": "2"},
        {"prompt": "Capital of France?", "completion": "Paris"},
        {"prompt": "Say hi", "completion": "hi"}]
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["kept"] == report.kept and sum(report.kept.values()) == 3
    assert saved["dropped_rows"][0] == {"file": str(raw), "line": 4, "reason": "malformed",
                                        "why": "not valid JSON (Expecting ',' delimiter at "
                                               "column 53)"}


SHAREGPT = [
    {"conversations": [{"from": "system", "value": "You are terse."},
                       {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
    {"conversations": [{"from": "user", "value": "2+2?"}, {"from": "assistant", "value": "4"},
                       {"from": "Human", "value": "3+3?"}, {"from": "GPT", "value": "6"}]},
    {"conversations": [{"from": "human", "value": "Anyone there?"}]},                # no answer
    {"conversations": [{"from": "human", "value": "Hm?"}, {"from": "gpt", "value": " "}]},
    {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"},
                       {"from": "human", "value": "and then?"}]},                     # trimmed
    {"conversations": [{"from": "alien", "value": "zork"}, {"from": "gpt", "value": "?"}]},
    {"conversations": [{"from": "system", "value": "You are terse."},
                       {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
]


def test_json_array_sharegpt_roles_unanswered_and_system(tmp_path):
    raw = tmp_path / "share.json"
    raw.write_text(json.dumps(SHAREGPT, indent=2))
    report = prepare_dataset([raw], tmp_path / "out",
                             PrepareOptions(system="Answer in English."))
    assert report.format == "chat" and report.files[0]["shape"] == "sharegpt"
    assert dropped(report) == [(3, "no_answer"), (4, "no_answer"), (6, "malformed"),
                               (7, "duplicate")]
    assert report.dropped_rows[2]["why"] == "message 1 has unknown role 'alien'"
    examples = {ex["messages"][1]["content"]: ex["messages"] for ex in all_examples(tmp_path /
                                                                                     "out")}
    assert examples["Hi"] == [{"role": "system", "content": "You are terse."},
                              {"role": "user", "content": "Hi"},
                              {"role": "assistant", "content": "Hello."}]
    assert [m["role"] for m in examples["2+2?"]] == ["system", "user", "assistant", "user",
                                                     "assistant"]
    assert examples["2+2?"][0]["content"] == "Answer in English."
    assert examples["Q"][1:] == [{"role": "user", "content": "Q"},
                                 {"role": "assistant", "content": "A"}]


def test_openai_chat_jsonl_content_parts(tmp_path):
    raw = write_lines(tmp_path / "chat.jsonl", [
        json.dumps({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
            {"role": "assistant", "content": "Hello"}]}),
        json.dumps({"messages": [{"role": "user", "content": "q"}]}),
        json.dumps({"messages": "oops"}),
        json.dumps({"messages": [{"role": "user", "content": ""},
                                 {"role": "assistant", "content": "  "}]}),
    ], newline="\n")
    report = prepare_dataset([raw], tmp_path / "out")
    assert dropped(report) == [(2, "no_answer"), (3, "malformed"), (4, "empty")]
    assert all_examples(tmp_path / "out") == [{"messages": [
        {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello"}]}]


def test_spreadsheet_csv_bom_crlf_quoted_commas_multiline_cells(tmp_path):
    raw = tmp_path / "sheet.csv"
    raw.write_bytes("\ufeffQuestion,Answer,Notes\r\n"      # 1
                    '"What is 2+2?",4,\r\n'                 # 2
                    '"Name two colours, please","red\r\n'   # 3: a row over two lines
                    'blue",x\r\n'                           # 4
                    "\r\n"                                  # 5 blank
                    '"A ""quoted"" word?",yes,\r\n'         # 6
                    ",,\r\n"                                # 7 empty
                    '"Only a question",,\r\n'               # 8 no answer
                    '"What is 2+2?",4,\r\n'                 # 9 duplicate
                    '"Too","many",cells,here\r\n'.encode())  # 10 malformed
    report = prepare_dataset([raw], tmp_path / "out")
    assert report.files[0]["shape"] == "columns prompt=Question, completion=Answer"
    assert report.files[0]["rows"] == 7
    assert dropped(report) == [(7, "empty"), (8, "no_answer"), (9, "duplicate"),
                               (10, "malformed")]
    assert sorted(all_examples(tmp_path / "out"), key=lambda e: e["prompt"]) == [
        {"prompt": 'A "quoted" word?', "completion": "yes"},
        {"prompt": "Name two colours, please", "completion": "red\nblue"},
        {"prompt": "What is 2+2?", "completion": "4"}]


def test_multiline_cell_positions_after_it(tmp_path):
    raw = tmp_path / "lines.csv"
    raw.write_text('prompt,completion\n"a\nb\nc",x\nq,\n', encoding="utf-8")
    report = prepare_dataset([raw], tmp_path / "out")
    assert dropped(report) == [(5, "no_answer")]


def test_tsv_and_excel_utf16_tsv(tmp_path):
    tsv = write_lines(tmp_path / "a.tsv", ["instruction\tinput\toutput", "Echo\tping\tping",
                                           "Shout\t\tHEY"])
    utf16 = tmp_path / "b.tsv"
    utf16.write_bytes("prompt\tcompletion\r\nWho?\tMe\r\n".encode("utf-16"))
    report = prepare_dataset([tsv, utf16], tmp_path / "out")
    assert [f["shape"] for f in report.files] == ["alpaca", "completions"]
    assert sorted(ex["prompt"] for ex in all_examples(tmp_path / "out")) == [
        "Echo\n\nping", "Shout", "Who?"]


def test_text_paragraphs_start_lines(tmp_path):
    raw = write_lines(tmp_path / "notes.txt", [
        "First paragraph, line one.", "line two.", "", "", "Second paragraph.", "   ",
        "Third.", "", "Second paragraph."], bom=True)
    report = prepare_dataset([raw], tmp_path / "out")
    assert report.format == "text" and report.files[0]["rows"] == 4
    assert dropped(report) == [(9, "duplicate")]
    assert sorted(ex["text"] for ex in all_examples(tmp_path / "out")) == [
        "First paragraph, line one.\nline two.", "Second paragraph.", "Third."]


def test_parquet_nested_conversations_and_flat_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    chats = tmp_path / "chats.parquet"
    pq.write_table(pa.table({"conversations": [
        [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hey"}],
        [{"from": "human", "value": "Alone"}]]}), chats)
    flat = tmp_path / "flat.parquet"
    pq.write_table(pa.table({"prompt": ["p1", "p2", "p3"], "completion": ["c1", None, "c3"]}),
                   flat, row_group_size=2)
    report = prepare_dataset([chats, flat], tmp_path / "out")
    assert report.format == "chat"
    assert [(f["shape"], f["rows"], f["kept"]) for f in report.files] == [
        ("sharegpt", 2, 1), ("completions", 3, 2)]
    assert [(r["file"], r.get("row"), r["reason"]) for r in report.dropped_rows] == [
        (str(chats), 2, "no_answer"), (str(flat), 2, "no_answer")]
    assert all("messages" in ex for ex in all_examples(tmp_path / "out"))


def test_json_object_holding_an_array_and_json_lines_named_json(tmp_path):
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"version": 2, "data": [
        {"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]}))
    lines = write_lines(tmp_path / "lines.json", ['{"prompt": "e", "completion": "f"}',
                                                  '{"prompt": "g", "completion": "h"}', '{oops'])
    report = prepare_dataset([wrapped, lines], tmp_path / "out")
    assert [f["rows"] for f in report.files] == [2, 3]
    assert sum(report.kept.values()) == 4
    assert [(r["file"], r.get("line"), r["reason"]) for r in report.dropped_rows] == [
        (str(lines), 3, "malformed")]


def test_big_json_array_is_streamed_across_chunks(tmp_path, monkeypatch):
    from mlxtune.prepare import readers

    monkeypatch.setattr(readers, "_CHUNK", 64)  # every item straddles a chunk boundary
    items = [{"prompt": f"question {i} ünïcödé " + "x" * (i % 7) * 30, "completion": f"a{i}"}
             for i in range(60)]
    raw = tmp_path / "big.json"
    raw.write_text(json.dumps(items, indent=1, ensure_ascii=False), encoding="utf-8")
    report = prepare_dataset([raw], tmp_path / "out")
    assert report.files[0]["rows"] == 60 and sum(report.kept.values()) == 60
    assert sorted(all_examples(tmp_path / "out"), key=lambda e: e["completion"]) == \
        sorted(items, key=lambda e: e["completion"])


def test_mixed_inputs_become_chat_and_cross_file_duplicates_drop(tmp_path):
    csv = write_lines(tmp_path / "qa.csv", ["question,answer", "Hi,Hello", "Bye,Ciao"])
    chat = write_lines(tmp_path / "chat.jsonl", [
        json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                 {"role": "assistant", "content": "Hello"}]}),
        json.dumps({"messages": [{"role": "user", "content": "Yo"},
                                 {"role": "assistant", "content": "Sup"}]})])
    report = prepare_dataset([csv, chat], tmp_path / "out")
    assert report.format == "chat"
    assert [(r["file"], r["line"], r["reason"]) for r in report.dropped_rows] == [
        (str(chat), 1, "duplicate")]
    for split in ("train", "valid", "test"):
        assert all(set(ex) == {"messages"} for ex in read_split(tmp_path / "out", split))


def test_splits_deterministic_disjoint_and_independent_of_file_order(tmp_path):
    rows = [json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) for i in range(300)]
    a = write_lines(tmp_path / "a.jsonl", rows[:150])
    b = write_lines(tmp_path / "b.jsonl", rows[150:])

    def membership(out):
        return {s: {ex["prompt"] for ex in read_split(out, s)} for s in ("train", "valid", "test")}

    r1 = prepare_dataset([a, b], tmp_path / "o1", PrepareOptions(seed=7))
    r2 = prepare_dataset([b, a], tmp_path / "o2", PrepareOptions(seed=7))
    r3 = prepare_dataset([a, b], tmp_path / "o3", PrepareOptions(seed=8))
    m1, m2, m3 = membership(tmp_path / "o1"), membership(tmp_path / "o2"), membership(tmp_path /
                                                                                    "o3")
    assert m1 == m2 and m1 != m3
    assert r1.kept == r2.kept == r3.kept == {"train": 240, "valid": 30, "test": 30}
    assert not (m1["train"] & m1["valid"] or m1["train"] & m1["test"] or m1["valid"] & m1["test"])
    assert sum(len(s) for s in m1.values()) == 300 and sum(r3.kept.values()) == 300
    assert (tmp_path / "o1" / "train.jsonl").read_bytes() == (tmp_path / "o1" /
                                                              "train.jsonl").read_bytes()
    again = prepare_dataset([a, b], tmp_path / "o1", PrepareOptions(seed=7))
    assert again.kept == r1.kept and membership(tmp_path / "o1") == m1


@pytest.mark.parametrize("n, valid, test, sizes", [
    (50, 0.1, 0.1, (40, 5, 5)),   # the hash-band split once gave 36/11/3 here
    (7, 0.2, 0.15, (5, 1, 1)),
    (1000, 0.05, 0.0, (950, 50, 0)),
    (3, 0.1, 0.1, (1, 1, 1)),
    (2, 0.1, 0.1, (1, 0, 1)),     # train keeps one example before valid gets one
])
def test_split_sizes_are_exact(tmp_path, n, valid, test, sizes):
    raw = write_lines(tmp_path / "rows.jsonl", [json.dumps({"text": f"doc {i}"}) for i in range(n)])
    report = prepare_dataset([raw], tmp_path / "out", PrepareOptions(valid_fraction=valid,
                                                                      test_fraction=test))
    assert tuple(report.kept.values()) == sizes
    assert tuple(len(read_split(tmp_path / "out", s)) for s in ("train", "valid", "test")) == sizes
    assert sorted(tmp_path.joinpath("out").iterdir()) == [
        tmp_path / "out" / f for f in ("report.json", "test.jsonl", "train.jsonl", "valid.jsonl")]


def test_split_is_by_rank_of_the_seeded_hash(tmp_path):
    from mlxtune.prepare.splits import digest_example

    raw = write_lines(tmp_path / "rows.jsonl", [json.dumps({"text": f"doc {i}"}) for i in range(20)])
    prepare_dataset([raw], tmp_path / "out", PrepareOptions(seed=3, valid_fraction=0.25,
                                                            test_fraction=0.25))
    ranked = sorted((json.dumps(read_split(tmp_path / "out", s)[i], ensure_ascii=False), s)
                    for s in ("train", "valid", "test")
                    for i in range(len(read_split(tmp_path / "out", s))))
    by_score = sorted(ranked, key=lambda ls: digest_example(ls[0].encode(), 3)[1])
    assert [s for _, s in by_score] == ["test"] * 5 + ["valid"] * 5 + ["train"] * 10


def test_small_data_still_gets_a_valid_and_test_example(tmp_path):
    raw = write_lines(tmp_path / "few.jsonl", [json.dumps({"text": f"doc {i}"}) for i in range(4)])
    report = prepare_dataset([raw], tmp_path / "out")
    assert report.kept == {"train": 2, "valid": 1, "test": 1}
    assert len(report.notes) == 2
    none = prepare_dataset([raw], tmp_path / "o2", PrepareOptions(valid_fraction=0,
                                                                  test_fraction=0))
    assert none.kept == {"train": 4, "valid": 0, "test": 0}


ERRORS = [
    ("data.xlsx", b"PK", {}, DataError, "unknown file type '.xlsx'"),
    ("headers.csv", b"Foo,Bar\r\n1,2\r\n", {}, DataError,
     "cannot tell which fields hold the prompt and the answer (found Foo, Bar); pass --columns"),
    ("qa.csv", b"Q,A\n1,2\n", {"columns": "prompt=Question,completion=A"}, DataError,
     "no column 'Question' for --columns prompt=; found Q, A"),
    ("chat.jsonl", b'{"messages": []}\n', {"format": "alpaca"}, DataError,
     "--format alpaca needs 'instruction' and 'output' fields; found messages"),
    ("notes.txt", b"hello\n", {"format": "chat"}, DataError, "holds plain text"),
    ("latin1.csv", "prompt,completion\ncaf\xe9,ok\n".encode("latin-1"), {}, DataError,
     "not UTF-8"),
    ("broken.json", b'[{"prompt": "a", "completion": "b"}, {"prompt": }]', {}, DataError,
     "broken.json: item 2: not valid JSON"),
    ("bad.jsonl", b"{nope\n\n[1]\n", {}, DataError, "no examples left to write (2 malformed)"),
    ("ok.jsonl", b'{"text": "a"}\n', {"max_tokens": 10}, ConfigError,
     "--max-tokens needs --model"),
    ("ok.jsonl", b'{"text": "a"}\n', {"valid_fraction": 0.6, "test_fraction": 0.5}, ConfigError,
     "leaves nothing to train on"),
    ("ok.jsonl", b'{"text": "a"}\n', {"columns": "prompt=Q"}, ConfigError,
     "--columns needs both prompt= and completion="),
    ("ok.jsonl", b'{"text": "a"}\n', {"system": "Be nice."}, DataError,
     "--system needs chat or prompt/completion data"),
]


@pytest.mark.parametrize("name,content,options,error,message", ERRORS,
                         ids=[f"{e[0]}-{e[4][:20]}" for e in ERRORS])
def test_errors_name_the_problem(tmp_path, name, content, options, error, message):
    raw = tmp_path / name
    raw.write_bytes(content)
    with pytest.raises(error) as e:
        prepare_dataset([raw], tmp_path / "out", PrepareOptions(**options))
    assert message in str(e.value)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*"))


def test_missing_file_and_text_mixed_with_chat(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        prepare_dataset([tmp_path / "nope.jsonl"], tmp_path / "out")
    txt = write_lines(tmp_path / "a.txt", ["Some prose."])
    qa = write_lines(tmp_path / "b.jsonl", ['{"prompt": "p", "completion": "c"}'])
    with pytest.raises(DataError, match=r"cannot mix text \(.*a.txt\) with chat"):
        prepare_dataset([txt, qa], tmp_path / "out")


def test_fingerprint_set_grows_and_finds_duplicates():
    seen = FingerprintSet(capacity=4)
    values = [(i * 0x9E3779B97F4A7C15) % 2**64 for i in range(1, 5001)] + [0]
    assert all(seen.add(v) for v in values)
    assert len(seen) == 5001 and len(seen._slots) == 16384
    assert not any(seen.add(v) for v in values)
