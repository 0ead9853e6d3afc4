"""One content hash for every "is this the same model" question (run ids, eval cache, lineage)."""

from __future__ import annotations

from pathlib import Path

from tracetune.agent.model import content_hash, model_fingerprint
from tracetune.training.grpo import model_md5


def _model_dir(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "config.json").write_text('{"layers": 2}')
    (root / "sub" / "weights.bin").write_bytes(b"\x00\x01")
    return root


def test_the_hash_follows_bytes_and_names_not_the_folder(tmp_path: Path) -> None:
    a = _model_dir(tmp_path / "a")
    b = _model_dir(tmp_path / "b")
    assert content_hash(a) == content_hash(b)  # same files elsewhere: same model
    (b / "sub" / "weights.bin").write_bytes(b"\x00\x02")
    assert content_hash(a) != content_hash(b)
    (b / "sub" / "weights.bin").write_bytes(b"\x00\x01")
    (b / "sub" / "weights.bin").rename(b / "sub" / "other.bin")
    assert content_hash(a) != content_hash(b)


def test_fingerprint_and_lineage_md5_are_views_of_the_same_hash(tmp_path: Path) -> None:
    model = _model_dir(tmp_path / "m")
    assert model_fingerprint(str(model)) == content_hash(model)[:16]
    assert model_md5(model) == content_hash(model, "md5") and len(model_md5(model)) == 32
    hub = model_fingerprint("Qwen/Qwen2.5-0.5B-Instruct")  # not on disk: the id stands for itself
    assert len(hub) == 16 and hub != model_fingerprint("Qwen/Qwen2.5-1.5B-Instruct")
