import pytest
import torch

from conftest import tiny_bert
from distill.errors import DistillError
from distill.students import derive, layer_stack, uniform_layers


def test_uniform_layers_spread_from_first_to_last():
    assert uniform_layers(12, 6) == [0, 2, 4, 7, 9, 11]  # DistilBERT's choice
    assert uniform_layers(6, 3) == [0, 2, 5]
    assert uniform_layers(6, 2) == [0, 5]
    assert uniform_layers(6, 1) == [5]
    assert uniform_layers(6, 6) == [0, 1, 2, 3, 4, 5]
    with pytest.raises(DistillError, match="cannot keep 7 of 6"):
        uniform_layers(6, 7)


def test_derived_student_copies_embeddings_and_the_kept_layers(tmp_path):
    teacher, _ = tiny_bert(tmp_path / "t", num_labels=2)
    student, info = derive(teacher, layers=[1, 4])
    assert info.layers == [1, 4] and info.teacher_layers == 6 and student.config.num_hidden_layers == 2
    assert info.student_params < info.teacher_params and info.compression > 1
    s, t = student.state_dict(), teacher.state_dict()
    assert torch.equal(s["bert.embeddings.word_embeddings.weight"], t["bert.embeddings.word_embeddings.weight"])
    assert torch.equal(s["classifier.weight"], t["classifier.weight"])
    for mine, theirs in ((0, 1), (1, 4)):
        key = "bert.encoder.layer.{}.attention.self.query.weight"
        assert torch.equal(s[key.format(mine)], t[key.format(theirs)])
    assert "bert.encoder.layer.2.output.dense.weight" not in s
    # the copy is independent of the teacher
    s["bert.embeddings.word_embeddings.weight"].add_(1.0)
    assert not torch.equal(
        student.state_dict()["bert.embeddings.word_embeddings.weight"],
        teacher.state_dict()["bert.embeddings.word_embeddings.weight"],
    )


def test_num_layers_random_init_and_narrower_students(tmp_path):
    teacher, _ = tiny_bert(tmp_path / "t")
    student, info = derive(teacher, num_layers=3)
    assert info.layers == [0, 2, 5]
    random_student, info = derive(teacher, num_layers=3, init="random")
    assert info.init == "random"
    key = "encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(random_student.state_dict()[key], teacher.state_dict()[key])
    narrow, info = derive(teacher, num_layers=2, hidden_size=16)
    assert narrow.config.hidden_size == 16 and narrow.config.intermediate_size == 32 and info.hidden_size == 16
    x = torch.randint(0, 50, (2, 5))
    assert narrow(input_ids=x).last_hidden_state.shape == (2, 5, 16)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"layers": [0, 6]}, "layer 6 is out of range: the teacher has 6 layers \\(0 to 5\\)"),
        ({"layers": [-1]}, "layer -1 is out of range"),
        ({"layers": [2, 2]}, "repeat a layer"),
        ({"layers": []}, "at least one layer"),
        ({"num_layers": 2, "hidden_size": 30}, "divisible by the 4 attention heads"),
    ],
)
def test_derivation_errors(tmp_path, kwargs, message):
    teacher, _ = tiny_bert(tmp_path / "t")
    with pytest.raises(DistillError, match=message):
        derive(teacher, **kwargs)


def test_not_a_transformer():
    with pytest.raises(DistillError, match="not a transformer"):
        layer_stack(torch.nn.Linear(2, 2))
