"""LM data through `datasets` (parquet, Arrow, JSON, CSV, saved folders, Hub ids) read as the same examples as JSONL,
with the same row checks; the text recipes' GLUE data from the Hub (datasets mocked) or their folder. No network."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import tiny_gpt2
from distill import config as cfg
from distill import sources
from distill.errors import DataError, DistillError
from distill.lm_data import Example, read_examples, tokenize_examples
from distill.recipes import sst2, stsb
from distill.sources import HubId, hub_id
from distill.stages import RunContext

datasets = pytest.importorskip("datasets")

ROWS = [
    {"prompt": "q : the dog runs", "completion": "a : the dog plays"},
    {"text": "the cat is happy and the dog is sad"},
    {"question": "q : a fun story", "answer": "a : very funny"},
    {"messages": [{"role": "user", "content": "q : bad food"}, {"role": "assistant", "content": "a : very bad"}]},
    {"messages": [{"role": "user", "content": "q : a great movie"}], "completion": "a : best film of the year"},
]
FLAT = [row for row in ROWS if "messages" not in row]  # what a CSV file can hold


@pytest.fixture(autouse=True)
def offline_and_local_cache(tmp_path, monkeypatch):
    """No network, and datasets' cache of local files under the test's folder (not the user's)."""
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def as_dataset(rows, tmp_path):
    """The rows as datasets reads a JSONL file (columns the union of the rows' keys, None where a row has none)."""
    source = write_jsonl(tmp_path / "for-datasets.jsonl", rows)
    return datasets.load_dataset("json", data_files=str(source), split="train")


def test_parquet_arrow_json_and_saved_folders_read_as_the_same_examples(tmp_path):
    jsonl = read_examples(write_jsonl(tmp_path / "train.jsonl", ROWS))
    dataset = as_dataset(ROWS, tmp_path)
    dataset.to_parquet(str(tmp_path / "train.parquet"))
    dataset.to_json(str(tmp_path / "train.json"))
    dataset.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": dataset, "test": dataset.select([1])}).save_to_disk(str(tmp_path / "splits"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    for source in ("train.parquet", "train.json", "saved", "splits", arrow.name):
        path = arrow if source == arrow.name else tmp_path / source
        assert read_examples(path) == jsonl, source
    assert read_examples(tmp_path / "splits", split="test") == jsonl[1:2]
    assert read_examples(tmp_path / "train.parquet", limit=2) == jsonl[:2]
    with (tmp_path / "flat.csv").open("w", newline="") as handle:  # a CSV file leaves a row's other columns empty
        writer = csv.DictWriter(handle, fieldnames=["prompt", "completion", "text", "question", "answer"])
        writer.writeheader()
        writer.writerows(FLAT)
    assert read_examples(tmp_path / "flat.csv") == read_examples(write_jsonl(tmp_path / "flat.jsonl", FLAT))
    (tmp_path / "texts.txt").write_text("the cat is happy\n\n  the dog is sad \n")  # plain text reads as before
    assert read_examples(tmp_path / "texts.txt") == [Example("", "the cat is happy"), Example("", "the dog is sad")]


def test_a_parquet_file_and_a_saved_folder_train_like_the_jsonl(tmp_path):
    from distill.train_lm import LMJobConfig, run_train_lm

    tiny_gpt2(tmp_path / "student", layers=1, seed=1)
    write_jsonl(tmp_path / "train.jsonl", ROWS * 2)
    dataset = as_dataset(ROWS * 2, tmp_path)
    dataset.to_parquet(str(tmp_path / "train.parquet"))
    dataset.save_to_disk(str(tmp_path / "saved"))
    _, tokenizer = tiny_gpt2()
    prints = {tokenize_examples(tokenizer, read_examples(tmp_path / s, tokenizer), 32).fingerprint()
              for s in ("train.jsonl", "train.parquet", "saved")}  # fmt: skip
    assert len(prints) == 1  # the same token ids and prompt lengths, row for row
    histories = []
    for source in ("train.jsonl", "train.parquet", "saved"):
        job = cfg.resolve(LMJobConfig, {"student": str(tmp_path / "student"), "data": str(tmp_path / source),
                                        "max_length": 32, "train": {"epochs": 2, "batch_size": 4, "lr": 3e-3}})  # fmt: skip
        metrics = run_train_lm(job, RunContext(tmp_path / f"run-{source}"))
        histories.append([(r["step"], r["loss"]) for r in metrics["history"]])
    assert histories[0] == histories[1] == histories[2] and len(histories[0]) == 2


def test_rows_from_datasets_fail_the_same_checks_naming_the_row(tmp_path):
    bad = [{"prompt": "p", "completion": "c"}, {"prompt": "p", "completion": ""}]
    as_dataset(bad, tmp_path).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(DataError, match=r"row 2 of .*bad.parquet: prompt and completion must be strings and the comp"):
        read_examples(tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"line 2 of .*bad.jsonl: prompt and completion must be strings and the comp"):
        read_examples(write_jsonl(tmp_path / "bad.jsonl", bad))
    as_dataset([{"foo": "x"}], tmp_path).to_parquet(str(tmp_path / "keys.parquet"))
    with pytest.raises(DataError, match=r"row 1 of .*keys.parquet: needs prompt/completion, .* \(has foo\)"):
        read_examples(tmp_path / "keys.parquet")
    chat = [{"messages": [{"role": "user", "content": "hi"}]}]
    as_dataset(chat, tmp_path).to_parquet(str(tmp_path / "chat.parquet"))
    with pytest.raises(DataError, match="row 1 of .*: the last message must be the assistant's"):
        read_examples(tmp_path / "chat.parquet")
    as_dataset([{"prompt": "p", "completion": "c"}], tmp_path).select([]).to_parquet(str(tmp_path / "none.parquet"))
    with pytest.raises(DataError, match="none.parquet (could not be read as parquet|has no examples)"):
        read_examples(tmp_path / "none.parquet")  # datasets refuses a split with no rows


def test_unreadable_missing_and_wrong_split_sources_are_one_line_errors(tmp_path):
    (tmp_path / "broken.parquet").write_bytes(b"not a parquet file" * 10)
    with pytest.raises(DataError, match=r"broken.parquet could not be read as parquet \(.*magic bytes"):
        read_examples(tmp_path / "broken.parquet")
    (tmp_path / "broken.json").write_text('[{"prompt": "a", ')
    with pytest.raises(DataError, match="broken.json could not be read as json"):
        read_examples(tmp_path / "broken.json")
    with pytest.raises(DataError, match="data file .*missing.parquet does not exist"):
        read_examples(tmp_path / "missing.parquet")
    with pytest.raises(DataError, match="data file .*missing.jsonl does not exist"):
        read_examples(tmp_path / "missing.jsonl")
    as_dataset(ROWS, tmp_path).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataError, match="holds one Dataset, not splits"):
        read_examples(tmp_path / "saved", split="test")
    datasets.DatasetDict({"train": as_dataset(ROWS, tmp_path)}).save_to_disk(str(tmp_path / "splits"))
    with pytest.raises(DataError, match=r"has no split 'test' \(splits: train\)"):
        read_examples(tmp_path / "splits", split="test")
    as_dataset(ROWS, tmp_path).to_parquet(str(tmp_path / "one.parquet"))
    with pytest.raises(DataError, match="is one file, one split"):
        read_examples(tmp_path / "one.parquet", split="test")


def test_hub_ids_are_parsed_and_refused_offline():
    assert hub_id("org/name") == HubId("org/name", None, "train")
    assert hub_id("org/name:test") == HubId("org/name", None, "test")
    assert hub_id("openai/gsm8k:main:test") == HubId("openai/gsm8k", "main", "test")
    for not_hub in ("data/train.jsonl", "data/train.tsv", "x.parquet", "/abs/org/name", "name", "a/b/c", "org/n:a:b:c"):
        assert hub_id(not_hub) is None, not_hub
    with pytest.raises(DataError, match="org/name is not a file or folder here, and this machine is offline"):
        read_examples("org/name")


def test_hub_data_sets_load_through_datasets_with_the_jsonl_columns(tmp_path, monkeypatch):
    asked = []
    rows = as_dataset(ROWS, tmp_path)

    def load_dataset(name, config=None, split=None, **kwargs):
        asked.append((name, config, split))
        if name == "org/missing":
            raise datasets.exceptions.DatasetNotFoundError("Dataset 'org/missing' doesn't exist on the Hub")
        if name == "org/unreachable":
            raise ConnectionError("Couldn't reach 'org/unreachable' on the Hub")
        return rows

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert read_examples("org/chat:main:test") == read_examples(write_jsonl(tmp_path / "t.jsonl", ROWS))
    assert read_examples("org/chat", split="validation")
    assert asked == [("org/chat", "main", "test"), ("org/chat", None, "validation")]
    with pytest.raises(DataError, match="org/missing: no such data set on the Hugging Face Hub"):
        read_examples("org/missing")
    with pytest.raises(DataError, match="org/unreachable is not a file or folder here, and this machine is offline"):
        read_examples("org/unreachable")


def test_plain_jsonl_does_not_import_datasets(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", ROWS)
    code = (
        "import sys; from distill.lm_data import read_examples; "
        f"assert len(read_examples({str(path)!r})) == {len(ROWS)}; print('datasets' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


# ----------------------------------------------------------------------------------------------------------------
# The text recipes: their folder as before, GLUE from the Hub when none is given and the machine is online
# ----------------------------------------------------------------------------------------------------------------

GLUE = {
    ("sst2", "train"): {"sentence": ["a great movie ", "bad food ", "the dog runs and plays all day long ", "fun "],
                        "label": [1, 0, 1, 1], "idx": [0, 1, 2, 3]},
    ("sst2", "validation"): {"sentence": ["very good ", "very bad "], "label": [1, 0], "idx": [0, 1]},
    ("stsb", "train"): {"sentence1": ["a man plays", "a cat"], "sentence2": ["a man is playing", "a dog"],
                        "label": [4.5, 1.0], "idx": [0, 1]},
    ("stsb", "validation"): {"sentence1": ["a child rides", "food"], "sentence2": ["a kid rides", "a car"],
                             "label": [4.75, 0.0], "idx": [0, 1]},
}  # fmt: skip


@pytest.fixture
def glue_hub(monkeypatch):
    """GLUE on the 'Hub': datasets.load_dataset answers nyu-mll/glue from local tables."""
    asked = []

    def load_dataset(name, config=None, split=None, **kwargs):
        asked.append((name, config, split))
        assert name == "nyu-mll/glue"
        return datasets.Dataset.from_dict(GLUE[(config, split)])

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return asked


def test_sst2_and_stsb_read_glue_from_the_hub_with_its_columns(glue_hub):
    texts, labels, test_texts, test_labels, unlabeled = sst2.load_sst2(None, train_size=2, seed=0, unlabeled_size=5)
    train = GLUE[("sst2", "train")]
    by_text = {s.strip(): label for s, label in zip(train["sentence"], train["label"])}
    assert len(texts) == 2 and [by_text[t] for t in texts] == labels.tolist()
    assert sorted(texts + unlabeled) == sorted(by_text)  # the rest of the training split, labels dropped
    assert test_texts == ["very good", "very bad"] and test_labels.tolist() == [1, 0]
    first, second, gold = stsb.stsb_pairs(None)
    assert (first, second) == (["a child rides", "food"], ["a kid rides", "a car"])
    assert gold.dtype == torch.float32 and gold.tolist() == [4.75, 0.0]
    config = cfg.resolve(stsb.StsbConfig, {"sample_size": 0})
    pool = stsb.training_sentences(config, None)
    assert sorted(pool) == sorted(["a man plays", "a cat", "a man is playing", "a dog",
                                   "the dog runs and plays all day long"])  # fmt: skip
    assert ("nyu-mll/glue", "sst2", "validation") in glue_hub and ("nyu-mll/glue", "stsb", "train") in glue_hub


def test_hub_glue_with_other_columns_or_labels_is_refused(glue_hub, monkeypatch):
    monkeypatch.setitem(GLUE, ("sst2", "validation"), {"text": ["x"], "label": [1]})
    with pytest.raises(DataError, match=r"nyu-mll/glue \(sst2\), split validation has no column 'sentence'"):
        sst2.load_sst2(None, train_size=2, seed=0)
    monkeypatch.setitem(GLUE, ("sst2", "validation"), {"sentence": ["x"], "label": [2]})
    with pytest.raises(DataError, match="labels must be 0 or 1"):
        sst2.load_sst2(None, train_size=2, seed=0)


def test_text_recipes_use_their_folder_and_else_need_the_network(tmp_path, monkeypatch):
    config = cfg.resolve(sst2.Sst2Config, {})
    folder = tmp_path / "data"
    folder.mkdir()
    assert sst2.reference_data(config, RunContext(tmp_path, datasets=folder), "sst2") == folder
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    assert sst2.reference_data(config, RunContext(tmp_path), "sst2") is None  # online: GLUE from the Hub
    assert sst2.reference_data(config, RunContext(tmp_path, datasets=folder), "sst2") == folder  # a folder wins
    missing = cfg.resolve(sst2.Sst2Config, {"data_dir": str(tmp_path / "nowhere")})
    with pytest.raises(DistillError, match="needs the reference data sets"):  # a folder given must exist
        sst2.reference_data(missing, RunContext(tmp_path), "sst2")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    for recipe in ("sst2", "stsb"):
        with pytest.raises(DistillError, match=f"the {recipe} recipe needs the reference data sets .* --data-dir"):
            sst2.reference_data(config, RunContext(tmp_path), recipe)
    assert sources.online() is False
