import numpy as np
import pytest
import torch

from distill.data import IGNORE, ArrayDataset, check_labels, concat, dataset_from_file, epoch_order, load_arrays
from distill.errors import DataError


def write(path, text):
    path.write_text(text)
    return path


def test_csv_and_tsv_load(tmp_path):
    x, y = load_arrays(write(tmp_path / "a.csv", "f1,label,f2\n1,0,2\n3,1,4\n\n"))
    assert x.tolist() == [[1, 2], [3, 4]] and y.tolist() == [0, 1]
    x, y = load_arrays(write(tmp_path / "a.tsv", "f1\tf2\tlabel\n1\t2\t3\n"))
    assert x.shape == (1, 2) and y.tolist() == [3]


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty"),
        ("a,b\n1,2\n", "no column 'label'"),
        ("a,label\n1,0\n2\n", "has 1 values but the header has 2"),
        ("a,label\nxyz,0\n", "'xyz' is not a number"),
        ("a,label\n1,0.5\n", "not an integer"),
        ("a,label\n1,cat\n", "'cat' is not an integer"),
        ("a,label\n", "no rows"),
        ("a,label\nnan,1\n", "NaN or infinite"),
        ("label\n1\n", "no feature columns"),
    ],
)
def test_bad_csv_files_get_clear_errors(tmp_path, text, message):
    with pytest.raises(DataError, match=message):
        load_arrays(write(tmp_path / "bad.csv", text))


def test_npz(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.ones((5, 2, 3)), y=np.arange(5))
    x, y = load_arrays(tmp_path / "d.npz")
    assert x.shape == (5, 2, 3) and x.dtype == np.float32 and y.tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"features": np.ones((3, 2)), "y": np.zeros(3)}, "no array 'x'"),
        ({"x": np.ones((3, 2))}, "no labels array 'y'"),
        ({"x": np.ones((3, 2)), "y": np.zeros(4)}, "3 rows of 'x' but 4 labels"),
        ({"x": np.ones(3), "y": np.zeros(3)}, "shape \\(rows, features"),
        ({"x": np.ones((3, 2)), "y": np.array([0.0, 1.5, 2.0])}, "not an integer"),
    ],
)
def test_bad_npz_files(tmp_path, arrays, message):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError, match=message):
        load_arrays(tmp_path / "d.npz")


def test_unreadable_and_unknown_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_arrays(tmp_path / "missing.csv")
    with pytest.raises(DataError, match="must be .csv"):
        load_arrays(write(tmp_path / "d.json", "{}"))
    with pytest.raises(DataError, match="not a readable .npz"):
        load_arrays(write(tmp_path / "d.npz", "garbage"))


def test_labels_out_of_range(tmp_path):
    path = write(tmp_path / "d.csv", "a,label\n1,0\n2,7\n")
    with pytest.raises(DataError, match="label 7 at row 1 .* outside 0..3"):
        dataset_from_file(path, num_classes=4)
    with pytest.raises(DataError, match="label -3"):
        check_labels(torch.tensor([0, -3]), 4, "x")
    check_labels(torch.tensor([0, IGNORE, 3]), 4, "x")  # -100 means no label


def test_reshape_and_unlabeled(tmp_path):
    path = write(tmp_path / "d.csv", "a,b,c,d\n1,2,3,4\n")
    data = dataset_from_file(path, input_shape=(2, 2), require_labels=False)
    assert data.input_shape == (2, 2) and data.labels.tolist() == [IGNORE]
    with pytest.raises(DataError, match="cannot be reshaped"):
        dataset_from_file(path, input_shape=(3, 2), require_labels=False)


def test_concat_fingerprint_and_epoch_order():
    a = ArrayDataset(torch.zeros(3, 2), torch.tensor([0, 1, 2]))
    b = ArrayDataset(torch.ones(2, 2), torch.tensor([0, 0])).unlabeled()
    both = concat(a, b)
    assert len(both) == 5 and both.labeled == 3
    assert both.fingerprint() != a.fingerprint()
    with pytest.raises(DataError):
        concat(a, ArrayDataset(torch.zeros(2, 3), torch.zeros(2)))
    first = epoch_order(10, 4, seed=1, epoch=0)
    assert [len(b) for b in first] == [4, 4, 2]
    assert all(torch.equal(x, y) for x, y in zip(first, epoch_order(10, 4, seed=1, epoch=0)))
    assert not torch.equal(torch.cat(first), torch.cat(epoch_order(10, 4, seed=1, epoch=1)))
