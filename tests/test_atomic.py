"""Publishing an output folder never deletes what medvae did not create (issue 11, finding 2)."""

import os

import pytest

from medvae.atomic import DestinationTakenError, atomic_directory


def test_two_runs_into_the_same_folder_keep_both_outputs(tmp_path):
    out = tmp_path / "out"
    first, second = atomic_directory(out), atomic_directory(out)
    a, b = first.__enter__(), second.__enter__()
    (a / "sample_000.nii.gz").write_text("run A")
    (b / "sample_000.nii.gz").write_text("run B")
    first.__exit__(None, None, None)
    with pytest.raises(DestinationTakenError, match="kept at") as err:
        second.__exit__(None, None, None)
    assert (out / "sample_000.nii.gz").read_text() == "run A"
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("out.medvae-")]
    assert len(kept) == 1 and (kept[0] / "sample_000.nii.gz").read_text() == "run B"
    assert str(kept[0]) in str(err.value) and "\n" not in str(err.value)


def test_a_file_put_into_out_meanwhile_is_not_deleted(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DestinationTakenError):
        with atomic_directory(out) as tmp:
            (tmp / "result.txt").write_text("new")
            (out / "notes.txt").write_text("the user's")
    assert (out / "notes.txt").read_text() == "the user's"
    assert not (out / "result.txt").exists()


def test_existing_non_empty_folder_is_refused_before_any_work(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(DestinationTakenError, match="already exists"):
        with atomic_directory(tmp_path / "out"):
            raise AssertionError("the block must not run")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_symlinked_out_is_followed_and_stays_a_link(tmp_path):
    target = tmp_path / "big_disk" / "results"
    target.mkdir(parents=True)
    link = tmp_path / "out"
    link.symlink_to(target)
    with atomic_directory(link) as tmp:
        (tmp / "a.txt").write_text("a")
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert (target / "a.txt").read_text() == "a"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big_disk", "out"]  # nothing stray
    assert [p.name for p in target.parent.iterdir()] == ["results"]


def test_failed_block_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "half.txt").write_text("x")
            raise RuntimeError("bad input")
    assert list(tmp_path.iterdir()) == []


def test_replace_swaps_an_owned_folder_without_leftovers(tmp_path):
    out = tmp_path / "export"
    with atomic_directory(out) as tmp:
        (tmp / "v").write_text("1")
    with atomic_directory(out, replace=True) as tmp:
        (tmp / "v").write_text("2")
    assert (out / "v").read_text() == "2" and [p.name for p in tmp_path.iterdir()] == ["export"]
