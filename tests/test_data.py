"""Label CSV validation with named rows; robust decoding; datasets of uint8 tensors."""
import numpy as np
import pytest
import torch
from PIL import Image

from titan.data.datasets import FaceDataset
from titan.data.images import ImageDecodeError, ImageIndex, decode_image
from titan.data.labels import LabelCSVError, read_labels


def write(tmp_path, text, name="labels.csv"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_reads_contract_and_aliases(tmp_path):
    df = read_labels(write(tmp_path, "id,target\na,1\nb,0\n"))
    assert list(df.columns) == ["Id", "target_feature", "is_pseudo"]
    assert df.Id.tolist() == ["a", "b"] and df.target_feature.tolist() == [1, 0] and not df.is_pseudo.any()
    df = read_labels(write(tmp_path, "Id,target_feature,is_pseudo\na,1,False\nb,0,True\n"))
    assert df.is_pseudo.tolist() == [False, True]


@pytest.mark.parametrize("text,pattern", [
    ("Id,label2\na,1\n", "missing column"),
    ("name,target_feature\na,1\n", "missing column"),
    ("Id,target_feature\na,1\nb,2\n", r"line 3: label '2' for Id 'b'"),
    ("Id,target_feature\na,1\nb,fake\n", r"line 3: label 'fake'"),
    ("Id,target_feature\na,1\nb,0\na,0\n", r"duplicate Ids — 'a' \(line 2\), 'a' \(line 4\)"),
    ("Id,target_feature\na,1\n../etc/passwd,0\n", r"line 3: Id '../etc/passwd'"),
    ("Id,target_feature\nsub/x,1\n", r"line 2: Id 'sub/x'"),
    ("Id,target_feature\n..,1\n", r"line 2: Id '\.\.'"),
    ("Id,target_feature\na\\b,1\n", r"line 2: Id 'a\\\\b'"),
])
def test_csv_errors_name_the_row(tmp_path, text, pattern):
    with pytest.raises(LabelCSVError, match=pattern):
        read_labels(write(tmp_path, text))


def test_ids_without_images_are_listed(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.new("RGB", (8, 8)).save(imgs / "a.png")
    csv = write(tmp_path, "Id,target_feature\na,1\nb,0\n")
    with pytest.raises(LabelCSVError, match=r"1 Id\(s\) have no image .*'b' \(line 3\)"):
        read_labels(csv, imgs)
    assert read_labels(csv, imgs, allow_missing=True).Id.tolist() == ["a"]


def test_index_finds_any_extension_preferring_jpg(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "x.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "x.jpg")
    Image.new("RGB", (4, 4)).save(tmp_path / "y.JPEG")
    (tmp_path / "notes.txt").write_text("hi")
    idx = ImageIndex(tmp_path)
    assert idx.path("x").name == "x.jpg" and idx.path("y").name == "y.JPEG" and len(idx) == 2
    with pytest.raises(FileNotFoundError, match="'z'"):
        idx.path("z")


def test_decodes_every_mode_to_rgb_uint8(tmp_path):
    arr = (np.arange(20 * 30 * 3) % 256).astype(np.uint8).reshape(20, 30, 3)
    Image.fromarray(arr).convert("L").save(tmp_path / "g.png")
    Image.fromarray(arr).convert("RGBA").save(tmp_path / "a.png")
    Image.fromarray(arr).convert("P").save(tmp_path / "p.png")
    Image.fromarray((np.arange(600).reshape(20, 30) * 100).astype(np.uint16)).save(tmp_path / "i16.png")
    Image.fromarray(arr).convert("CMYK").save(tmp_path / "c.jpg")
    for name in ["g.png", "a.png", "p.png", "i16.png", "c.jpg"]:
        out = decode_image(tmp_path / name)
        assert out.dtype == np.uint8 and out.shape == (20, 30, 3), name
    hi = decode_image(tmp_path / "i16.png")
    assert hi.max() > 200 and hi.min() == 0  # 16-bit scaled, not clipped to white


def test_rgba_transparency_becomes_white_not_black(tmp_path):
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(tmp_path / "t.png")
    assert (decode_image(tmp_path / "t.png") == 255).all()


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° CW on display
    img.save(tmp_path / "r.jpg", exif=exif.tobytes())
    assert decode_image(tmp_path / "r.jpg").shape == (40, 20, 3)


@pytest.mark.parametrize("kind", ["empty", "truncated", "text"])
def test_unreadable_image_is_named_never_black(tmp_path, kind):
    p = tmp_path / f"{kind}.jpg"
    if kind == "empty":
        p.write_bytes(b"")
    elif kind == "text":
        p.write_text("this is not a jpeg")
    else:
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(p, quality=95)
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(ImageDecodeError, match=f"{kind}.jpg"):
        decode_image(p)


def test_dataset_yields_uint8_chw_and_replaces_bad_samples(tmp_path):
    for i in range(3):
        Image.new("RGB", (50, 40), (i * 80, 10, 10)).save(tmp_path / f"{i}.jpg")
    (tmp_path / "1.jpg").write_bytes(b"broken")
    ds = FaceDataset(["0", "1", "2"], tmp_path, 32, labels=[0, 1, 0])
    x, y, j = ds[0]
    assert x.dtype == torch.uint8 and x.shape == (3, 32, 32) and y.item() == 0 and j == 0
    with pytest.raises(ImageDecodeError, match="1.jpg"):
        ds[1]
    ds.on_error = "replace"
    x, y, j = ds[1]
    assert j == 2 and x.float().mean() > 20  # the next readable sample, not a black tensor
