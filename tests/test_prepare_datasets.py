"""mlxtune prepare on Hugging Face datasets, built here with `datasets`: save_to_disk folders and
hub ids resolved from the datasets cache, offline; same shapes, drops and report as files."""

import json
import shutil
import sys
from pathlib import Path

import pytest

datasets = pytest.importorskip("datasets", reason="the datasets extra is not installed")

from mlxtune.errors import ConfigError, DataError  # noqa: E402
from mlxtune.prepare import PrepareOptions, prepare_dataset  # noqa: E402

ALPACA = [{"instruction": f"Say {w}", "input": "", "output": w} for w in
          ("hi", "bye", "yes", "no", "maybe", "later", "now", "never", "soon", "again")]


def _lines(out, split):
    return [json.loads(x) for x in (out / f"{split}.jsonl").read_text().splitlines()]


def _all(out):
    return [ex for s in ("train", "valid", "test") for ex in _lines(out, s)]


def test_saved_dataset_dict_streams_through_shapes_and_report(tmp_path):
    rows = ALPACA + [{"instruction": "Say hi", "input": "", "output": "hi"},  # duplicate, row 11
                     {"instruction": "Say nothing", "input": "", "output": ""}]  # no answer, 12
    saved = tmp_path / "alpaca_ds"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list(ALPACA[:3])}).save_to_disk(saved)
    report = prepare_dataset([saved], tmp_path / "out", PrepareOptions(valid_fraction=0.2,
                                                                       test_fraction=0.1))
    assert report.files == [{"file": f"{saved}[train]", "shape": report.files[0]["shape"],
                             "rows": 12, "kept": 10, "dropped": 2}]
    assert "alpaca" in report.files[0]["shape"] and report.format == "completions"
    assert report.kept == {"train": 7, "valid": 2, "test": 1}
    assert [(r["file"], r["row"], r["reason"]) for r in report.dropped_rows] == [
        (f"{saved}[train]", 11, "duplicate"), (f"{saved}[train]", 12, "no_answer")]
    assert sorted(ex["completion"] for ex in _all(tmp_path / "out")) == sorted(
        r["output"] for r in ALPACA)
    test_only = prepare_dataset([saved], tmp_path / "o2", PrepareOptions(split="test"))
    assert test_only.files[0]["file"] == f"{saved}[test]" and sum(test_only.kept.values()) == 3


def test_saved_chat_dataset_keeps_its_turns(tmp_path):
    chats = [{"messages": [{"role": "user", "content": f"q{i}"},
                           {"role": "assistant", "content": f"a{i}"}]} for i in range(5)]
    saved = tmp_path / "chat_ds"
    datasets.Dataset.from_list(chats).save_to_disk(saved)
    report = prepare_dataset([saved], tmp_path / "out", PrepareOptions(valid_fraction=0.2,
                                                                       test_fraction=0))
    assert report.format == "chat" and report.files[0]["file"] == str(saved)
    assert sorted(map(json.dumps, _all(tmp_path / "out"))) == sorted(map(json.dumps, chats))


def _cache_hub_dataset(cache: Path, repo_id: str, config: str, splits: dict) -> None:
    """Leave in `cache` what load_dataset(repo_id, config) leaves after a download: the
    packaged json builder's Arrow files under namespace___name/config/0.0.0/hash."""
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.json.json import Json

    files = {}
    for split, rows in splits.items():
        files[split] = [str(cache.parent / f"{config}-{split}.jsonl")]
        Path(files[split][0]).write_text("".join(json.dumps(r) + "\n" for r in rows))
    namespace, name = repo_id.split("/")
    builder = Json(cache_dir=str(cache / "build"), dataset_name=name, config_name=config,
                   data_files=DataFilesDict.from_local_or_remote(files), hash="0123abcd")
    builder.download_and_prepare()
    target = cache / f"{namespace}___{name}" / config / "0.0.0"
    target.mkdir(parents=True, exist_ok=True)
    shutil.move(builder.cache_dir, target / "0123abcd")
    shutil.rmtree(cache / "build")


def test_hub_id_is_read_from_the_datasets_cache_offline(tmp_path, monkeypatch):
    cache = tmp_path / "hf-datasets" / "cache"
    cache.mkdir(parents=True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    assert datasets.config.HF_HUB_OFFLINE  # conftest sets HF_HUB_OFFLINE=1 before any import
    _cache_hub_dataset(cache, "acme/greetings", "en", {"train": ALPACA})
    _cache_hub_dataset(cache, "acme/greetings", "fr", {
        "train": [{"instruction": f"Dis {w}", "input": "", "output": w} for w in ("oui", "non")],
        "test": [{"instruction": "Dis merci", "input": "", "output": "merci"}]})
    en = prepare_dataset(["acme/greetings"], tmp_path / "en", PrepareOptions(subset="en"))
    assert en.files[0]["file"] == "acme/greetings[train]" and sum(en.kept.values()) == 10
    fr = prepare_dataset(["acme/greetings"], tmp_path / "fr",
                         PrepareOptions(subset="fr", split="test", valid_fraction=0,
                                        test_fraction=0))
    assert fr.files[0]["file"] == "acme/greetings[test]"
    assert _lines(tmp_path / "fr", "train") == [{"prompt": "Dis merci", "completion": "merci"}]
    with pytest.raises(DataError, match="no split 'valid'; it has train, test"):
        prepare_dataset(["acme/greetings"], tmp_path / "x", PrepareOptions(subset="fr",
                                                                           split="valid"))


def test_dataset_input_errors_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(DataError) as e:
        prepare_dataset(["acme/absent"], tmp_path / "out")
    assert str(e.value).startswith("acme/absent: no such file or folder, and no dataset of that "
                                   "name in the datasets cache (offline: HF_HUB_OFFLINE=1)")
    raw = tmp_path / "a.jsonl"
    raw.write_text('{"text": "x"}\n')
    with pytest.raises(ConfigError, match="--split and --subset choose from Hugging Face"):
        prepare_dataset([raw], tmp_path / "out", PrepareOptions(split="train"))
    saved = tmp_path / "two"
    datasets.DatasetDict({"a": datasets.Dataset.from_list(ALPACA[:2]),
                          "b": datasets.Dataset.from_list(ALPACA[2:4])}).save_to_disk(saved)
    with pytest.raises(DataError, match="has splits a, b; choose one with --split"):
        prepare_dataset([saved], tmp_path / "out")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ConfigError, match=r"needs the datasets package: pip install "
                                          r"'mlxtune\[datasets\]'"):
        prepare_dataset([saved], tmp_path / "out")
    assert not (tmp_path / "out").exists()
