import json

import pytest
import torch

from conftest import tiny_bert
from distill import hf
from distill.augment import MASK_TOKEN, augment, augment_sentence
from distill.data import TextDataset, concat_text, epoch_order, read_lines, read_table, tokenize
from distill.errors import DataError
from distill.text_models import BiLSTMClassifier, SentenceEncoder, WordVocab, words


def test_text_dataset_pads_each_batch_to_its_longest_row():
    data = TextDataset([[5, 6, 7], [8], [9, 10]], torch.tensor([1, 0, 1]), pad_id=0, token_types=True)
    batch = data.batch(torch.tensor([1, 0]))
    assert batch["inputs"]["input_ids"].tolist() == [[8, 0, 0], [5, 6, 7]]
    assert batch["inputs"]["attention_mask"].tolist() == [[1, 0, 0], [1, 1, 1]]
    assert batch["inputs"]["token_type_ids"].shape == (2, 3)
    assert batch["labels"].tolist() == [0, 1]
    both = concat_text(data, data.unlabeled())
    assert len(both) == 6 and both.labels.tolist() == [1, 0, 1, -100, -100, -100] and both.row(4) == [8]
    assert both.fingerprint() != data.fingerprint()
    with pytest.raises(DataError, match="no tokens"):
        TextDataset([[1], []])


def test_length_bucketing_keeps_every_row_once_and_batches_similar_lengths():
    lengths = torch.tensor([1, 50, 2, 49, 3, 48, 4, 47] * 50)
    batches = epoch_order(len(lengths), 8, seed=0, epoch=0, lengths=lengths)
    assert sorted(torch.cat(batches).tolist()) == list(range(len(lengths)))
    spread = [int(lengths[b].max() - lengths[b].min()) for b in batches]
    assert max(spread) < 10  # sorted within windows
    again = epoch_order(len(lengths), 8, seed=0, epoch=0, lengths=lengths)
    assert all(torch.equal(a, b) for a, b in zip(batches, again))


def test_read_table_errors(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text("sentence\tlabel\nfine\t1\n")
    assert read_table(path, ["sentence", "label"]) == {"sentence": ["fine"], "label": ["1"]}
    with pytest.raises(DataError, match="has no column 'score' \\(columns: sentence, label\\)"):
        read_table(path, ["score"])
    path.write_text("a\tb\tc\n1\t2\n")
    with pytest.raises(DataError, match="line 2 of .* has 2 columns"):
        read_table(path, ["c"])
    with pytest.raises(DataError, match="does not exist"):
        read_table(tmp_path / "none.tsv", ["a"])
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match="no sentences"):
        read_lines(tmp_path / "empty.txt")


def test_augmentation_masks_and_samples_ngrams():
    import random

    rng = random.Random(0)
    sentence = ["the", "movie", "was", "not", "really", "very", "funny"]
    outs = [augment_sentence(sentence, rng, p_mask=0.5, p_ngram=1.0) for _ in range(50)]
    assert all(1 <= len(o) <= 5 for o in outs)
    assert any(MASK_TOKEN in o for o in outs)
    new = augment(["a great film", "the worst movie of the year"], 20, seed=3)
    assert len(new) == len(set(new)) and "a great film" not in new
    assert augment(["a great film"], 5, seed=1) == augment(["a great film"], 5, seed=1)


def test_word_vocab_and_bilstm_round_trip(tmp_path):
    vocab = WordVocab.build(["the movie was great", "the film was [MASK] bad"])
    assert words("It 's a [MASK]!") == ["it", "'s", "a", "[mask]", "!"]
    ids = vocab.encode(["the unknown movie [MASK]"])[0]
    assert ids[0] == vocab.index["the"] and ids[1] == 1 and ids[-1] == 2
    model = BiLSTMClassifier(len(vocab), 2, embed=8, hidden=6, dense=5).eval()
    data = TextDataset(vocab.encode(["the movie", "the film was great"]), torch.tensor([0, 1]))
    inputs = data.batch(torch.arange(2))["inputs"]
    logits = model(**inputs)
    assert logits.shape == (2, 2)
    model.save(tmp_path / "bilstm", vocab)
    loaded, loaded_vocab = BiLSTMClassifier.load(tmp_path / "bilstm")
    assert torch.allclose(loaded(**inputs), logits) and loaded_vocab.tokens == vocab.tokens


def test_padding_does_not_change_the_bilstm_output():
    torch.manual_seed(0)
    model = BiLSTMClassifier(20, 2, embed=8, hidden=6, dense=5).eval()
    short = model(input_ids=torch.tensor([[3, 4]]), attention_mask=torch.tensor([[1, 1]]))
    padded = model(input_ids=torch.tensor([[3, 4, 0, 0]]), attention_mask=torch.tensor([[1, 1, 0, 0]]))
    assert torch.allclose(short, padded, atol=1e-6)


def test_sentence_encoder_exports_a_sentence_transformers_folder(tmp_path):
    bert, tokenizer = tiny_bert(tmp_path / "t")
    encoder = SentenceEncoder(bert).eval()
    data = TextDataset(tokenize(tokenizer, ["a great movie", "the dog runs"]))
    inputs = data.batch(torch.arange(2))["inputs"]
    embeddings = encoder(**inputs)
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(2), atol=1e-5)
    encoder.save(tmp_path / "export", tokenizer)
    modules = json.loads((tmp_path / "export" / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[1] for m in modules] == ["Transformer", "Pooling", "Normalize"]
    reloaded = SentenceEncoder(hf.load_encoder(tmp_path / "export")).eval()  # plain transformers loads it
    assert torch.allclose(reloaded(**inputs), embeddings, atol=1e-5)
    import sentence_transformers as st  # the dev extra installs it

    model = st.SentenceTransformer(str(tmp_path / "export"), device="cpu")
    other = torch.tensor(model.encode(["a great movie", "the dog runs"]))
    assert torch.allclose(other, embeddings, atol=1e-4)


def test_hf_loading_errors(tmp_path):
    from distill.errors import DistillError

    (tmp_path / "empty").mkdir()
    with pytest.raises(DistillError, match="is not a model directory"):
        hf.load_encoder(tmp_path / "empty")
    with pytest.raises(DistillError, match="does not exist"):
        hf.load_encoder(str(tmp_path / "missing"))
    with pytest.raises(DistillError, match="needs a store folder"):
        hf.resolve("minilm-l6", None)


def test_feature_table_serves_what_the_live_teacher_captures(tmp_path):
    from distill.teachers.cached import FeatureTable
    from distill.teachers.local import LocalTeacher

    bert, tokenizer = tiny_bert(tmp_path / "t")
    encoder = SentenceEncoder(bert).eval()
    texts = ["a great movie", "the dog runs very fast on the street", "bad", "the cat plays guitar"]
    data = TextDataset(tokenize(tokenizer, texts))
    live = LocalTeacher(encoder, 0, capture=["pool", "transformer.encoder.layer.3"], has_logits=False)
    table = FeatureTable(live, data, batch_size=3)
    batch = data.batch(torch.tensor([2, 1, 0]))
    served, expected = table(batch).hidden_states, live(batch).hidden_states
    assert served["pool"].shape == (3, 32)
    assert torch.allclose(served["pool"], expected["pool"], atol=2e-3)
    mask = batch["inputs"]["attention_mask"].bool()
    layer = "transformer.encoder.layer.3"
    assert served[layer].shape == expected[layer].shape
    assert torch.allclose(served[layer][mask], expected[layer][mask], atol=2e-2)
