"""ADM .npz batches: arr_0 images streamed in batches, precomputed statistics, a clear error for each bad file, and
writing a batch in resumable shards merged in sample order."""
import zipfile

import numpy as np
import pytest

from fcdm.eval.npz import NpzImages, NpzShards, npz_keys, read_statistics, save_batch


def random_images(rng, count=7, height=5, width=6):
    return rng.integers(0, 256, (count, height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("writer", ["savez", "savez_compressed", "fortran_order"])
def test_images_stream_back_in_batches(tmp_path, writer):
    rng = np.random.default_rng(0)
    images = random_images(rng)
    path = tmp_path / "batch.npz"
    if writer == "fortran_order":
        np.savez(path, arr_0=np.asfortranarray(images), arr_1=rng.integers(0, 1000, 7))
    else:
        getattr(np, writer)(path, arr_0=images, arr_1=rng.integers(0, 1000, 7))  # arr_1: labels, as sample.py writes

    reader = NpzImages(path)
    assert len(reader) == 7 and reader.shape == (7, 5, 6, 3)
    batches = list(reader.batches(3))
    assert [len(batch) for batch in batches] == [3, 3, 1]
    assert all(batch.dtype == np.uint8 and batch.flags.c_contiguous for batch in batches)
    np.testing.assert_array_equal(np.concatenate(batches), images)
    np.testing.assert_array_equal(reader.read_all(), images)


def test_save_batch_round_trip_and_validation(tmp_path):
    rng = np.random.default_rng(1)
    images = random_images(rng)
    save_batch(tmp_path / "ok.npz", images, arr_1=np.arange(7))
    assert sorted(npz_keys(tmp_path / "ok.npz")) == ["arr_0", "arr_1"]
    np.testing.assert_array_equal(NpzImages(tmp_path / "ok.npz").read_all(), images)
    with pytest.raises(ValueError, match="uint8"):
        save_batch(tmp_path / "bad.npz", images.astype(np.float32))


def test_missing_images_key_names_it_and_lists_what_is_there(tmp_path):
    np.savez(tmp_path / "wrong.npz", images=random_images(np.random.default_rng(2)))
    with pytest.raises(ValueError, match=r"--sample-batch: .*no 'arr_0' array \(it holds: images\)"):
        NpzImages(tmp_path / "wrong.npz", "--sample-batch")


def test_wrong_dtype_is_rejected(tmp_path):
    images = random_images(np.random.default_rng(3)).astype(np.float32) / 255
    np.savez(tmp_path / "float.npz", arr_0=images)
    with pytest.raises(ValueError, match=r"--ref-batch: 'arr_0' .* has dtype float32; .*uint8"):
        NpzImages(tmp_path / "float.npz", "--ref-batch")


@pytest.mark.parametrize("shape, match", [
    ((4, 8, 8), r"shape \(4, 8, 8\); expected \(N, H, W, 3\)"),
    ((4, 3, 8, 8), "looks NCHW"),
    ((4, 8, 8, 4), r"expected \(N, H, W, 3\)"),
    ((0, 8, 8, 3), "no images"),
])
def test_wrong_shape_is_rejected(tmp_path, shape, match):
    np.savez(tmp_path / "shape.npz", arr_0=np.random.default_rng(4).integers(0, 256, shape, dtype=np.uint8))
    with pytest.raises(ValueError, match=match):
        NpzImages(tmp_path / "shape.npz")


def test_missing_or_non_npz_file_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="--sample-batch: no such file"):
        NpzImages(tmp_path / "absent.npz", "--sample-batch")
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(ValueError, match=r"not an \.npz"):
        NpzImages(tmp_path / "text.npz")


def test_truncated_images_are_reported(tmp_path):
    # A header promising more images than the member holds (a half-written file) must not yield short batches.
    rng = np.random.default_rng(5)
    header_path = tmp_path / "member.npy"
    with open(header_path, "wb") as stream:
        np.lib.format.write_array_header_1_0(stream, {"descr": "|u1", "fortran_order": False, "shape": (5, 4, 4, 3)})
        stream.write(rng.integers(0, 256, 3 * 4 * 4 * 3, dtype=np.uint8).tobytes())
    with zipfile.ZipFile(tmp_path / "short.npz", "w") as archive:
        archive.write(header_path, "arr_0.npy")
    reader = NpzImages(tmp_path / "short.npz")
    with pytest.raises(ValueError, match="truncated"):
        list(reader.batches(2))


def test_statistics_are_read_in_pairs(tmp_path):
    rng = np.random.default_rng(6)
    a = rng.standard_normal((9, 4))
    mu, sigma = rng.standard_normal(4), a.T @ a
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma, mu_s=mu[:3], sigma_s=sigma[:3, :3])
    stats = read_statistics(tmp_path / "stats.npz")
    np.testing.assert_array_equal(stats["pool"].mu, mu)
    np.testing.assert_array_equal(stats["pool"].sigma, sigma)
    np.testing.assert_array_equal(stats["spatial"].sigma, sigma[:3, :3])

    np.savez(tmp_path / "images_only.npz", arr_0=random_images(rng))
    assert read_statistics(tmp_path / "images_only.npz") == {"pool": None, "spatial": None}


@pytest.mark.parametrize("arrays, match", [
    (lambda mu, sigma: dict(mu=mu), "has 'mu' but not 'sigma'"),
    (lambda mu, sigma: dict(sigma_s=sigma), "has 'sigma_s' but not 'mu_s'"),
    (lambda mu, sigma: dict(mu=mu, sigma=sigma[:3]), r"shape \(D, D\)"),
    (lambda mu, sigma: dict(mu=mu.astype(np.int64), sigma=sigma), "'mu' has dtype int64"),
    (lambda mu, sigma: dict(mu=mu, sigma=np.where(sigma > 0, np.nan, sigma)), "'sigma' contains NaN"),
])
def test_bad_statistics_are_rejected(tmp_path, arrays, match):
    rng = np.random.default_rng(7)
    mu, sigma = rng.standard_normal(4) * 5, np.cov(rng.standard_normal((9, 4)), rowvar=False)
    np.savez(tmp_path / "bad.npz", **arrays(mu, sigma))
    with pytest.raises(ValueError, match=match):
        read_statistics(tmp_path / "bad.npz", "--ref-batch")


def test_shards_merge_in_sample_order_whatever_order_they_were_written_in(tmp_path):
    rng = np.random.default_rng(3)
    images = random_images(rng, count=7)
    blocks = [np.arange(0, 3), np.arange(3, 6), np.arange(6, 7)]  # the last block is short
    shards = NpzShards(tmp_path / "run", 7, 3)
    assert all(np.array_equal(a, b) for a, b in zip(shards.blocks, blocks, strict=True))
    assert not any(shards.done(k) for k in range(3)) and shards.todo(1, 2) == ([1], [1])
    for k in (2, 0, 1):  # as several processes might finish them
        shards.write(k, labels=blocks[k] % 4, images=images[blocks[k]])
        assert shards.done(k)
    assert shards.todo(0, 2) == ([0, 2], [])
    assert shards.merge(tmp_path / "run.npz") == (7, 5, 6, 3)
    np.testing.assert_array_equal(NpzImages(tmp_path / "run.npz").read_all(), images)
    assert npz_keys(tmp_path / "run.npz") == ["arr_0"] and not (tmp_path / "run.npz.tmp").exists()


def test_a_torn_or_foreign_shard_is_redone_and_never_merged(tmp_path):
    rng = np.random.default_rng(4)
    blocks = [np.arange(0, 2), np.arange(2, 4)]
    shards = NpzShards(tmp_path, 4, 2)
    shards.write(0, labels=np.zeros(2), images=random_images(rng, count=2))
    with open(shards.path(1), "wb") as f:
        f.write(b"PK\x03\x04 torn")
    assert shards.done(0) and not shards.done(1)
    # Block 0's samples in block 1's file: not done, and the merge refuses it rather than mixing samples.
    np.savez(shards.path(1), indices=blocks[0], labels=np.zeros(2), images=random_images(rng, count=2))
    assert not shards.done(1)
    with pytest.raises(ValueError, match=r"batch_000001.npz does not hold samples 2..3"):
        shards.merge(tmp_path / "out.npz")
    assert not (tmp_path / "out.npz").exists() and not (tmp_path / "out.npz.tmp").exists()
    with pytest.raises(ValueError, match="block 1 has 2 samples, got 2 labels and 3 images"):
        shards.write(1, labels=np.zeros(2), images=random_images(rng, count=3))


def test_a_rerun_with_other_settings_is_refused(tmp_path):
    shards = NpzShards(tmp_path, 2, 2)
    shards.record_settings({"steps": 50, "interval": (0.1, 0.9)})
    NpzShards(tmp_path, 2, 2).record_settings({"steps": 50, "interval": [0.1, 0.9]})  # the same run
    with pytest.raises(ValueError, match=r"other settings \(cfg, steps differ\)"):
        NpzShards(tmp_path, 2, 2).record_settings({"steps": 25, "interval": [0.1, 0.9], "cfg": 1.5})
