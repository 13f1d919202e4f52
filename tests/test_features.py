import pytest
import torch

from conftest import tiny_bert
from distill.config import FeatureLoss
from distill.errors import DistillError, ShapeMismatchError
from distill.features import FeatureDistiller, attention_kl, capture, cosine, find_module, hidden_mse, hook_names
from distill.students import derive


def test_capture_collects_outputs_and_removes_its_hooks(tmp_path):
    model, _ = tiny_bert(tmp_path / "m")
    model.eval()
    x = torch.randint(0, 50, (2, 7))
    names = ["encoder.layer.1", "encoder.layer.5.attention.self.query"]
    result = model(input_ids=x, output_hidden_states=True)
    before = sum(len(m._forward_hooks) for m in model.modules())  # transformers may keep hooks of its own
    with capture(model, names) as out:
        model(input_ids=x)
        assert sum(len(m._forward_hooks) for m in model.modules()) == before + 2
    assert torch.allclose(out["encoder.layer.1"], result.hidden_states[2])
    assert out["encoder.layer.5.attention.self.query"].shape == (2, 7, 32)
    assert sum(len(m._forward_hooks) for m in model.modules()) == before


def test_unknown_module_lists_close_names(tmp_path):
    model, _ = tiny_bert(tmp_path / "m")
    with pytest.raises(DistillError, match="no module named 'encoder.layers.1'; close names: encoder.layer.1"):
        find_module(model, "encoder.layers.1", "student")
    with pytest.raises(DistillError, match="not a self-attention block"):
        hook_names(model, [FeatureLoss(kind="attention_kl", student="encoder.layer.1", teacher="x")], "student")


def test_hidden_mse_and_cosine_values_and_masks():
    a = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    b = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    assert float(hidden_mse(a, b)) == pytest.approx((0 + 2) / 2)  # token 2: (4 + 0) / 2 = 2, token 1: 0
    assert float(hidden_mse(a, b, torch.tensor([[1, 0]]))) == 0.0
    assert float(cosine(a, a)) == pytest.approx(0.0, abs=1e-6)
    assert float(cosine(a, -a)) == pytest.approx(2.0)
    with pytest.raises(ShapeMismatchError):
        hidden_mse(a, torch.zeros(1, 2, 3))


def test_attention_kl_is_zero_for_equal_and_matches_a_direct_computation():
    q, k = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert float(attention_kl((q, k), (q, k), heads=2, mask=mask)) == pytest.approx(0.0, abs=1e-6)
    qs, ks = torch.randn(2, 5, 4), torch.randn(2, 5, 4)  # a narrower student: relation heads make them comparable
    got = attention_kl((qs, ks), (q, k), heads=2, mask=mask)

    def probs(query, key, heads):
        b, t, d = query.shape
        qh = query.view(b, t, heads, d // heads).transpose(1, 2)
        kh = key.view(b, t, heads, d // heads).transpose(1, 2)
        scores = qh @ kh.transpose(-1, -2) / (d // heads) ** 0.5
        scores = scores.masked_fill(mask[:, None, None, :] == 0, -1e9)
        return scores.softmax(-1)

    p, r = probs(q, k, 2), probs(qs, ks, 2)
    kl = torch.where(p > 0, p * (p.clamp_min(1e-30).log() - r.clamp_min(1e-30).log()), 0).sum(-1).mean(1)  # (B, T)
    expected = (kl * mask).sum() / mask.sum()
    assert float(got) == pytest.approx(float(expected), rel=1e-4)


def test_distiller_projects_narrower_students_and_names_terms(tmp_path):
    teacher, _ = tiny_bert(tmp_path / "t")
    student, _ = derive(teacher, num_layers=2, hidden_size=16)
    pairs = [
        FeatureLoss(kind="hidden_mse", student="encoder.layer.1", teacher="encoder.layer.5", weight=2.0),
        FeatureLoss(kind="cosine", student="encoder.layer.0", teacher="encoder.layer.2"),
        FeatureLoss(
            kind="attention_kl",
            student="encoder.layer.1.attention.self",
            teacher="encoder.layer.5.attention.self",
            heads=4,
        ),
    ]
    example = {"input_ids": torch.randint(0, 50, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    distiller = FeatureDistiller.build(pairs, student, teacher, example)
    assert set(distiller.projections) == {"0", "1"}  # hidden 16 -> 32; attention needs none
    assert "encoder.layer.1.attention.self.query" in distiller.student_hooks
    with capture(student, distiller.student_hooks) as s_out, capture(teacher, distiller.teacher_hooks) as t_out:
        student(**example)
        with torch.no_grad():
            teacher(**example)
    terms = distiller(s_out, t_out, example["attention_mask"])
    assert list(terms) == [
        "hidden_mse:encoder.layer.1",
        "cosine:encoder.layer.0",
        "attention_kl:encoder.layer.1.attention.self",
    ]
    total = sum(terms.values())
    total.backward()
    assert distiller.projections["0"].weight.grad is not None
    assert all(torch.isfinite(v) and v > 0 for v in terms.values())
