"""Safe loading, key normalisation, clear mismatch errors and atomic saving."""
import os
import pickle

import pytest
import torch

from titan import build_backbone, build_head
from titan.checkpoints import CheckpointError, load_into, load_state_dict, read_meta, save_atomic, save_checkpoint


def test_ddp_prefixed_and_nested_state_dict_loads(tmp_path):
    src = build_backbone("atto")
    nested = {"model": {f"module.{k}": v for k, v in src.state_dict().items()}, "epoch": 3}
    path = tmp_path / "ddp.pth"
    torch.save(nested, path)
    dst = load_into(build_backbone("atto"), path)
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v)


def test_pickle_with_objects_is_refused_not_unpickled(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": Evil()}, f)
    with pytest.raises(CheckpointError, match="evil.pth"):
        load_state_dict(path)


def test_whole_module_pickle_is_refused(tmp_path):
    path = tmp_path / "module.pth"
    torch.save(build_head("linear"), path)
    with pytest.raises(CheckpointError, match="refused"):
        load_state_dict(path)


def test_mismatch_lists_missing_unexpected_and_shapes(tmp_path):
    path = tmp_path / "v38.pth"
    torch.save(build_backbone("v38").state_dict(), path)
    with pytest.raises(CheckpointError) as e:
        load_into(build_backbone("v42"), path)
    msg = str(e.value)
    assert "v38.pth" in msg and "missing (30)" in msg and "stages.2.10.dwconv.weight" in msg
    path2 = tmp_path / "atto.pth"
    torch.save(build_backbone("atto").state_dict(), path2)
    with pytest.raises(CheckpointError, match=r"wrong shape .*downsamples\.0\.0\.weight: file \(40, 9, 4, 4\) vs model \(96, 9, 4, 4\)"):
        load_into(build_backbone("v42"), path2)


def test_empty_and_garbage_files_are_named(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="empty.pth.*empty"):
        load_state_dict(tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match="junk.pth"):
        load_state_dict(tmp_path / "junk.pth")


def test_our_checkpoint_carries_meta_readable_without_model(tmp_path):
    path = save_checkpoint(build_head("linear", 320), tmp_path / "h.pth", variant="atto", img_size=64, epoch=2, metrics={"f1": 0.5})
    assert read_meta(path) == {"variant": "atto", "img_size": 64, "epoch": 2, "metrics": {"f1": 0.5}}
    load_into(build_head("linear", 320), path)


def test_atomic_save_leaves_old_file_when_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "w.pth"
    save_atomic({"a": torch.ones(1)}, path)

    def boom(obj, f, *a, **k):
        open(f, "wb").write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        save_atomic({"a": torch.zeros(1)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(1))
    assert [p.name for p in tmp_path.iterdir()] == ["w.pth"]  # no temp litter


def test_atomic_save_gives_normal_file_mode(tmp_path):
    umask = os.umask(0o022)
    try:
        path = save_atomic({"a": torch.ones(1)}, tmp_path / "m.pth")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644
