"""Every bad config or data input gives one ConfigError/DataError that says what is wrong and where."""

import json
from pathlib import Path

import pytest

from fastcpu.config import ConfigError
from fastcpu.tasks import DataError, build_task_config, make_task

FIXTURES = Path(__file__).parent / "fixtures"
SQUAD = FIXTURES / "squad_tiny.json"
SST2 = FIXTURES / "sst2_tiny.tsv"


def load(name: str, split: str = "train", **settings):
    return make_task(build_task_config({"name": name, **settings})).examples(split)


def write(tmp_path: Path, text: str, name: str = "data.json") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def squad_json(tmp_path: Path, edit) -> str:
    data = json.loads(SQUAD.read_text())
    edit(data)
    return write(tmp_path, json.dumps(data))


# -- config ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("node", "message"),
    [
        ({"name": "squad"}, "no data source; set task.train_file"),
        ({"name": "sst2"}, "task.dataset"),
        ({"name": "mnli", "train_file": "x"}, "task.name='mnli' is unknown; allowed: squad, sst2"),
        ({"name": "squad", "train_file": "x", "stride": 3}, "unknown key"),
        ({"name": "squad", "train_file": "x", "max_seq_length": 8}, "task.max_seq_length=8 is out of range"),
        ({"name": "squad", "train_file": "x", "doc_stride": 384}, "task.doc_stride=384 is out of range"),
        ({"name": "squad", "train_file": "x", "doc_stride": 0}, "task.doc_stride=0"),
        ({"name": "squad", "train_file": "x", "max_query_length": 0}, "task.max_query_length"),
        ({"name": "squad", "train_file": "x", "n_best_size": 0}, "task.n_best_size"),
        ({"name": "squad", "train_file": "x", "max_train_samples": 0}, "task.max_train_samples=0"),
        ({"name": "squad", "train_file": "x", "holdout_every": 4, "holdout_offset": 4}, "holdout_offset=4"),
        ({"name": "squad", "train_file": "x", "holdout_every": 1}, "task.holdout_every=1"),
        ({"name": "squad", "train_file": "x", "holdout_offset": 2}, "holdout_every is null"),
        ({"name": "squad", "train_file": "a", "eval_file": "b", "holdout_every": 4}, "splits one local file"),
        ({"name": "squad", "dataset": "rajpurkar/squad", "holdout_every": 4}, "splits one local file"),
        ({"name": "squad", "train_file": "a", "eval_file": "a"}, "same file"),
        ({"name": "squad", "train_file": ""}, "empty string"),
        ({"name": "squad", "train_file": 3}, "task.train_file must be a string"),
        ({"name": "sst2", "train_file": "x", "text_column": "label"}, "two different"),
        ({"name": "sst2", "train_file": "d/t.tsv", "eval_file": "d/../d/t.tsv"}, "the same file (d/t.tsv)"),
    ],
)
def test_bad_configs(node: dict, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        build_task_config(node)
    assert message in str(error.value)


def test_one_file_under_two_names_is_the_same_file(tmp_path: Path) -> None:
    """A symlink or another spelling of the training file is refused as the evaluation file too."""
    train = Path(write(tmp_path, "sentence\tlabel\ngood\t1\n"))
    (tmp_path / "link.tsv").symlink_to(train)
    for name in ("sst2", "squad"):
        with pytest.raises(ConfigError, match="are the same file"):
            build_task_config(
                {"name": name, "train_file": str(train), "eval_file": str(tmp_path / "link.tsv")}
            )


def test_missing_split_source_is_named() -> None:
    with pytest.raises(ConfigError, match="no eval data; set task.eval_file or task.dataset"):
        load("squad", "eval", train_file=str(SQUAD))


# -- SQuAD files -------------------------------------------------------------------------------------
def test_squad_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.json: file not found"):
        load("squad", train_file=str(tmp_path / "nope.json"))
    with pytest.raises(DataError, match="file is empty"):
        load("squad", train_file=write(tmp_path, " \n"))


@pytest.mark.parametrize("cut", ["mid-string", "last-brace"])
def test_squad_truncated_json(tmp_path: Path, cut: str) -> None:
    text = SQUAD.read_text().rstrip()
    text = text[: len(text) // 2] if cut == "mid-string" else text[:-1]
    with pytest.raises(DataError, match=r"truncated file\?\): .* \(line \d+, column \d+\)") as error:
        load("squad", train_file=write(tmp_path, text))
    assert "data.json" in str(error.value)


def test_squad_malformed_json(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"malformed JSON: Expecting value \(line 1, column 11\)"):
        load("squad", train_file=write(tmp_path, '{"data": [}, "version": "1.1"}'))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda d: d["data"][1]["paragraphs"][0]["qas"][2].pop("answers"),
            "data[1].paragraphs[0].qas[2]: missing 'answers'",
        ),
        (lambda d: d["data"][0]["paragraphs"][1].pop("context"), "data[0].paragraphs[1]: missing 'context'"),
        (lambda d: d["data"][2].update(paragraphs={}), "data[2].paragraphs: expected list, got dict"),
        (lambda d: d["data"][0]["paragraphs"][0]["qas"][0].update(answers=[]), "answers: empty"),
        (
            lambda d: d["data"][0]["paragraphs"][0]["qas"][1]["answers"][0].update(answer_start="5"),
            "data[0].paragraphs[0].qas[1].answers[0].answer_start: expected int, got str",
        ),
        (
            lambda d: d["data"][0]["paragraphs"][0]["qas"][0]["answers"][0].update(answer_start=3),
            "is not in the context at answer_start=3",
        ),
        (
            lambda d: d["data"][0]["paragraphs"][0]["qas"].append(d["data"][0]["paragraphs"][0]["qas"][0]),
            "appears more than once",
        ),
        (lambda d: d.pop("data"), "top level: missing 'data'"),
        (lambda d: d.update(data=[{"title": "x", "paragraphs": []}]), "no questions"),
    ],
)
def test_squad_wrong_structure(tmp_path: Path, edit, message: str) -> None:
    with pytest.raises(DataError) as error:
        load("squad", train_file=squad_json(tmp_path, edit))
    assert message in str(error.value) and "data.json" in str(error.value)


def test_squad_top_level_must_be_an_object(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="top level: expected an object, got list"):
        load("squad", train_file=write(tmp_path, "[1, 2]"))


def test_squad_holdout_leaving_a_side_empty(tmp_path: Path) -> None:
    path = squad_json(tmp_path, lambda d: d.update(data=d["data"][:2]))
    with pytest.raises(DataError, match="holdout_every=4, holdout_offset=3 leaves no questions for eval"):
        load("squad", "eval", train_file=path, holdout_every=4, holdout_offset=3)


def test_squad_question_too_long_for_the_window(tmp_path: Path, tokenizer) -> None:
    def long_question(data: dict) -> None:
        qa = data["data"][1]["paragraphs"][1]["qas"][0]
        qa["question"] = "why " * 60 + "?"

    task = make_task(
        build_task_config(
            {
                "name": "squad",
                "train_file": squad_json(tmp_path, long_question),
                "max_seq_length": 64,
                "doc_stride": 16,
                "max_query_length": 50,
            }
        )
    )
    with pytest.raises(DataError) as error:
        task.train_features(tokenizer, ["input_ids", "attention_mask"])
    message = str(error.value)
    qid = json.loads(SQUAD.read_text())["data"][1]["paragraphs"][1]["qas"][0]["id"]
    for part in (
        qid,
        "has 50 tokens",
        "max_query_length=50",
        "max_seq_length=64",
        "doc_stride=16",
        "Raise task.max_seq_length",
    ):
        assert part in message


def test_unknown_model_input(tokenizer) -> None:
    task = make_task(build_task_config({"name": "squad", "train_file": str(SQUAD), "max_train_samples": 2}))
    with pytest.raises(ValueError, match=r"does not produce model input\(s\) \['pixel_values'\]"):
        task.train_features(tokenizer, ["input_ids", "pixel_values"])


# -- SST-2 files -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "file is empty"),
        ("text\tlabel\nfine\t1\n", "line 1 (header): missing column(s) ['sentence']"),
        ("sentence\tlabel\n", "no data rows"),
        ("sentence\tlabel\ngood\t1\nbad\n", "line 3: expected 2 tab-separated columns"),
        ("sentence\tlabel\ngood\t1\nbad\t0\textra\n", "line 3: expected 2"),
        ("sentence\tlabel\ngood\tpositive\n", "line 2: label 'positive' is not an integer"),
        ("sentence\tlabel\ngood\t1\n\nbad\t2\n", "line 4: label '2' must be 0 or 1"),
    ],
)
def test_sst2_bad_files(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(DataError) as error:
        load("sst2", train_file=write(tmp_path, text, "data.tsv"))
    assert message in str(error.value) and "data.tsv" in str(error.value)


def test_sst2_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="file not found"):
        load("sst2", "eval", eval_file=str(tmp_path / "dev.tsv"))


# -- `datasets` --------------------------------------------------------------------------------------
def test_unreachable_dataset_says_to_use_files(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'rajpurkar/squad' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as error:
        load("squad", dataset="rajpurkar/squad")
    message = str(error.value)
    assert "'rajpurkar/squad'" in message and "'train'" in message and "task.train_file" in message


def test_dataset_rows_are_loaded_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    rows = {
        "id": ["a", "b"],
        "title": ["T", "T"],
        "context": ["Paris is in France.", "Paris is in France."],
        "question": ["Where is Paris?", "What is in France?"],
        "answers": [{"text": ["France"], "answer_start": [12]}, {"text": ["Paris"], "answer_start": [0]}],
    }
    calls = []

    def fake(name, config_name=None, split=None):
        calls.append((name, config_name, split))
        return datasets.Dataset.from_dict(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    examples = load("squad", "eval", dataset="rajpurkar/squad")
    assert [e.answers for e in examples] == [["France"], ["Paris"]]
    assert calls == [("rajpurkar/squad", None, "validation")]

    rows["answers"][1] = {"text": ["Paris"], "answer_start": [4]}
    with pytest.raises(DataError, match="row 1.answers"):
        load("squad", dataset="rajpurkar/squad")

    sst2_rows = {"sentence": ["good ", "bad "], "label": [1, -1]}
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_dict(sst2_rows))
    with pytest.raises(DataError, match="row 1: label -1 must be 0 or 1"):
        load("sst2", dataset="nyu-mll/glue", dataset_config="sst2")
    with pytest.raises(DataError, match=r"missing column\(s\) \['text'\]"):
        load("sst2", dataset="nyu-mll/glue", dataset_config="sst2", text_column="text")
