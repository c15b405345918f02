"""ImageFolder (ADM centre crop), the official .npy layout, and the latent store written by fcdm.data.extract with a
tiny random diffusers AutoencoderKL (no download): each is read correctly and trains a few steps."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from fcdm.data import ImageFolderDataset, LatentStore, NpyFeatureDataset, center_crop_arr
from fcdm.data import extract

from .test_train_common import final_checkpoint, run_train
from .test_vae import tiny_autoencoder

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """3 classes x 4 images of awkward sizes (odd, portrait, landscape, larger than 2x the crop)."""
    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(0)
    for c, name in enumerate(["cat", "dog", "eel"]):
        (root / name).mkdir()
        for i, (w, h) in enumerate([(23, 17), (16, 40), (45, 33), (70, 70)]):
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / name / f"{i}.{'png' if i % 2 else 'jpg'}")
    (root / "cat" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    """A randomly initialised 2x-downsampling AutoencoderKL with 4 latent channels, saved like a hub model."""
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    tiny_autoencoder(latent_channels=4).save_pretrained(path)
    return str(path)


def test_center_crop_matches_adm_semantics():
    arr = np.arange(90 * 40 * 3, dtype=np.uint8).reshape(40, 90, 3)
    out = center_crop_arr(Image.fromarray(arr), 16)
    assert out.shape == (16, 16, 3)
    # 40x90 -> box-halved to 20x45 (short side 40 >= 32), bicubic to 16x36, centre crop columns 10..25.
    ref = Image.fromarray(arr).resize((45, 20), Image.BOX).resize((36, 16), Image.BICUBIC)
    assert np.array_equal(out, np.asarray(ref)[:, 10:26])


def test_image_folder_reads_classes_and_flips_per_sample_seed(image_folder):
    ds = ImageFolderDataset(str(image_folder), 16)
    assert ds.classes == ["cat", "dog", "eel"] and len(ds) == 12 and ds.num_classes == 3
    x, y = ds[(5, (0, 0, 5))]
    assert x.shape == (3, 16, 16) and y.item() == 1 and -1 <= x.min() and x.max() <= 1
    plain = torch.from_numpy(ds.load(5).astype(np.float32)).permute(2, 0, 1) / 127.5 - 1
    flips = [torch.equal(ds[(5, (0, 0, s))][0], plain.flip(-1)) for s in range(20)]
    assert any(flips) and not all(flips)                                     # both orientations occur
    assert all(torch.equal(ds[(5, (0, 0, s))][0], ds[(5, (0, 0, s))][0]) for s in range(3))  # seeded


def test_image_folder_errors_name_the_flag(tmp_path):
    with pytest.raises(ValueError, match="--data-path .* is not a directory"):
        ImageFolderDataset(str(tmp_path / "missing"), 16)
    with pytest.raises(ValueError, match="no class sub-folders"):
        ImageFolderDataset(str(tmp_path), 16)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ImageFolderDataset(str(tmp_path), 16)


def test_image_folder_trains_in_pixel_space(tmp_path, image_folder):
    state, run_dir = run_train(tmp_path, "--data-path", image_folder, "--vae", "none", "--image-size", "16",
                               "--max-train-steps", "3")
    ckpt = final_checkpoint(run_dir)
    assert state.step == 3 and ckpt["args"]["num_classes"] == 3 and ckpt["args"]["input_size"] == 16


def test_npy_official_layout(tmp_path):
    feats, labels = tmp_path / "features", tmp_path / "labels"
    feats.mkdir(), labels.mkdir()
    rng = np.random.default_rng(1)
    xs = rng.standard_normal((8, 1, 4, 8, 8)).astype(np.float32)   # the official files are (1, C, H, W)
    for i in range(8):
        np.save(feats / f"{i}.npy", xs[i])
        np.save(labels / f"{i}.npy", np.array([i % 5]))
    ds = NpyFeatureDataset(str(feats), str(labels))
    x, y = ds[3]
    assert torch.equal(x, torch.from_numpy(xs[3, 0])) and y.item() == 3
    state, run_dir = run_train(tmp_path, "--feature-path", feats, "--label-path", labels, "--num-classes", "5",
                               "--max-train-steps", "2")
    assert state.step == 2 and final_checkpoint(run_dir)["args"]["in_channels"] == 4
    os.remove(labels / "7.npy")
    with pytest.raises(ValueError, match="8 .npy files but --label-path has 7"):
        NpyFeatureDataset(str(feats), str(labels))


@pytest.fixture(scope="module")
def latent_store(tmp_path_factory, image_folder, tiny_vae):
    out = tmp_path_factory.mktemp("store") / "store"
    extract.main(["--data-path", str(image_folder), "--output", str(out), "--vae", tiny_vae, "--image-size", "16",
                  "--batch-size", "5", "--shard-size", "4", "--num-workers", "0", "--vae-scaling-factor", "0.5",
                  "--device", "cpu"])
    return str(out)


def test_extract_stores_posterior_of_both_flips(latent_store, image_folder, tiny_vae):
    with open(os.path.join(latent_store, "index.json")) as f:
        index = json.load(f)
    assert index["num_latents"] == 12 and index["latent_shape"] == [4, 8, 8] and index["scaling_factor"] == 0.5
    assert len(index["shards"]) == 3 and index["classes"] == ["cat", "dog", "eel"]
    store = LatentStore(latent_store)
    images = ImageFolderDataset(str(image_folder), 16, flip=False)
    vae = diffusers.AutoencoderKL.from_pretrained(tiny_vae).eval()
    labels = []
    for i in range(len(store)):
        mean, std, label = store.posterior(i)
        labels.append(label)
        x = images[i][0][None]    # one rank: store order is dataset order
        with torch.no_grad():
            for flip, xi in enumerate((x, x.flip(-1))):
                dist = vae.encode(xi).latent_dist
                torch.testing.assert_close(torch.from_numpy(mean[flip]), dist.mean[0], atol=2e-3, rtol=2e-3)
                torch.testing.assert_close(torch.from_numpy(std[flip]), dist.std[0], atol=2e-3, rtol=2e-3)
    assert labels == [images.items[i][1] for i in range(12)]
    # Each access draws a flip and a sample, scaled; the draw is a function of the sample seed.
    z1, z2 = store[(0, (1, 2, 3))][0], store[(0, (1, 2, 3))][0]
    assert torch.equal(z1, z2) and z1.shape == (4, 8, 8)
    mean, std, _ = store.posterior(0)
    draws = torch.stack([store[(0, (0, 0, s))][0] for s in range(200)]) / 0.5       # unscaled, (200, 4, 8, 8)
    # Standardised against the flip it came from, a draw is N(0, 1): mean square ~1 for one of the two flips.
    ms = torch.stack([((draws - torch.from_numpy(mean[f])) / torch.from_numpy(std[f])).square().mean((1, 2, 3))
                      for f in (0, 1)])                                             # (2, 200)
    best = ms.min(0)
    assert ((best.values > 0.7) & (best.values < 1.4)).all()
    assert set(best.indices.tolist()) == {0, 1}


def test_latent_store_trains_and_decodes_grid_with_the_vae(tmp_path, latent_store, tiny_vae):
    state, run_dir = run_train(tmp_path, "--latent-store", latent_store, "--vae", tiny_vae, "--max-train-steps", "2")
    args = final_checkpoint(run_dir)["args"]
    # The store was extracted with --vae-scaling-factor 0.5; training uses its recorded scale unless told otherwise.
    assert args["vae_scaling_factor"] == 0.5
    assert state.step == 2 and (args["in_channels"], args["input_size"], args["num_classes"]) == (4, 8, 3)
    assert os.path.isfile(os.path.join(run_dir, "samples", "0000002.png"))
    with pytest.raises(SystemExit):
        extract.parse_args(["--data-path", "x", "--output", latent_store])


def test_image_folder_with_vae_encodes_on_the_fly(tmp_path, image_folder, tiny_vae):
    state, run_dir = run_train(tmp_path, "--data-path", image_folder, "--vae", tiny_vae, "--image-size", "16",
                               "--max-train-steps", "2")
    assert state.step == 2 and final_checkpoint(run_dir)["args"]["in_channels"] == 4


def test_extract_under_torchrun_matches_one_process(tmp_path, latent_store, image_folder, tiny_vae):
    import subprocess
    import sys
    out = tmp_path / "store2"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "fcdm.data.extract", "--data-path", str(image_folder), "--output", str(out),
                          "--vae", tiny_vae, "--image-size", "16", "--num-workers", "0", "--device", "cpu"],
                         capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    one, two = LatentStore(latent_store), LatentStore(str(out))
    assert len(two) == 12 and len(two.index["shards"]) == 2
    rows = lambda s: sorted((s.posterior(i)[2], s.posterior(i)[0].sum().round(2)) for i in range(len(s)))
    assert rows(one) == rows(two)


def test_no_random_flip_keeps_images_and_latents_as_stored(image_folder, latent_store):
    ds = ImageFolderDataset(str(image_folder), 16, flip=False)
    plain = torch.from_numpy(ds.load(5).astype(np.float32)).permute(2, 0, 1) / 127.5 - 1
    assert all(torch.equal(ds[(5, (0, 0, s))][0], plain) for s in range(20))
    store = LatentStore(latent_store, flip=False)
    mean, std, _ = store.posterior(0)
    draws = torch.stack([store[(0, (0, 0, s))][0] for s in range(50)]) / store.scaling_factor
    unflipped = ((draws - torch.from_numpy(mean[0])) / torch.from_numpy(std[0])).square().mean((1, 2, 3))
    assert ((unflipped > 0.6) & (unflipped < 1.5)).all()   # every draw comes from the image as stored
    flipping = LatentStore(latent_store)                    # the same seeds draw the same noise, some mirrored
    assert any(not torch.equal(flipping[(0, (0, 0, s))][0], store[(0, (0, 0, s))][0]) for s in range(20))


def test_extract_takes_dit_vae_spellings(image_folder, tmp_path, capsys):
    args = extract.parse_args(["--data-path", str(image_folder), "--output", str(tmp_path / "o"), "--vae", "mse"])
    assert args.vae == "stabilityai/sd-vae-ft-mse"
    assert extract.parse_args(["--data-path", str(image_folder), "--output", str(tmp_path / "o")]).vae == \
        "stabilityai/sd-vae-ft-ema"
    with pytest.raises(SystemExit):
        extract.parse_args(["--data-path", str(image_folder), "--output", str(tmp_path / "o"), "--vae", "none"])
    assert "--vae none: a latent store needs a VAE" in capsys.readouterr().err


def test_interrupted_extraction_resumes_shard_by_shard(tmp_path, image_folder, tiny_vae, latent_store, monkeypatch):
    out = tmp_path / "store"
    argv = ["--data-path", str(image_folder), "--output", str(out), "--vae", tiny_vae, "--image-size", "16",
            "--batch-size", "3", "--shard-size", "4", "--num-workers", "0", "--vae-scaling-factor", "0.5",
            "--device", "cpu"]
    written, real_write = [], extract.write_shard

    def write_then_die(root, prefix, *arrays):
        if len(written) == 2:
            raise KeyboardInterrupt  # the job is killed while encoding the third shard
        written.append(prefix)
        return real_write(root, prefix, *arrays)
    monkeypatch.setattr(extract, "write_shard", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        extract.main(argv)
    assert not (out / "index.json").exists() and written == ["r000_s00000", "r000_s00001"]
    with pytest.raises(SystemExit, match=r"image_size: 16 in the store vs 8 now"):
        extract.main([*argv[:7], "8", *argv[8:]])   # other settings: refused, naming the one that differs
    with pytest.raises(SystemExit, match=r"vae_scaling_factor: 0.5 in the store vs 0.18215 now"):
        extract.main(argv[:-4] + ["--device", "cpu"])
    monkeypatch.setattr(extract, "write_shard", lambda root, prefix, *a: (written.append(prefix),
                                                                          real_write(root, prefix, *a))[1])
    extract.main(argv)                                # the same command: only the missing shard is encoded
    assert written == ["r000_s00000", "r000_s00001", "r000_s00002"]
    resumed, straight = LatentStore(str(out)), LatentStore(latent_store)
    assert resumed.index["shards"] == straight.index["shards"] and len(resumed) == 12
    for i in range(12):
        a, b = resumed.posterior(i), straight.posterior(i)
        # Another batch size than the fixture's (batch size is not a setting): equal up to fp16 storage rounding.
        np.testing.assert_allclose(a[0], b[0], atol=2e-3), np.testing.assert_allclose(a[1], b[1], atol=2e-3)
        assert a[2] == b[2]
