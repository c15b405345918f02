"""FCDMPipeline, `python -m fcdm.export` and the hub round trip, offline on CPU: a tiny FCDM and a tiny random VAE.

The pipeline must give the images sample.py writes for the same seeds (one code path, two front ends), an exported
folder must load to the same model, and push_to_hub must upload exactly that folder (the upload itself is replaced).
"""
import argparse
import json
import os
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import fcdm
from fcdm import export
from fcdm.cli import sample
from fcdm.labels import IMAGENET_ID2LABEL, class_ids
from fcdm.pipeline import FCDMPipeline, FCDMPipelineOutput, image_grid

from .test_load import random_fcdm
from .test_sample_script import assets, common_args  # noqa: F401 (assets: the module fixture)


@pytest.fixture(scope="module")
def pixel_ckpt(tmp_path_factory):
    """A trainer checkpoint in pixel space: its stored args say everything (the demo's layout)."""
    root = tmp_path_factory.mktemp("pixel")
    torch.manual_seed(3)
    model = random_fcdm(num_classes=4, in_channels=3)
    ema = {k: v + 0.01 * torch.randn_like(v) for k, v in model.state_dict().items()}
    args = dict(model="FCDM-T", image_size=8, num_classes=4, in_channels=3, objective="ddpm", vae=None,
                vae_scaling_factor=0.18215)
    torch.save({"model": model.state_dict(), "ema": ema, "args": args}, root / "ckpt.pt")
    return root / "ckpt.pt", ema


def test_the_pipeline_samples_pil_images_and_latents(pixel_ckpt):
    path, ema = pixel_ckpt
    pipe = fcdm.FCDMPipeline.from_pretrained(str(path), device="cpu")
    assert all(torch.equal(pipe.model.state_dict()[k], v) for k, v in ema.items()), "EMA weights expected"
    out = pipe(class_labels=[0, 3], num_inference_steps=3, seed=0, progress=False)
    assert isinstance(out, FCDMPipelineOutput) and out.class_labels == [0, 3]
    assert [im.size for im in out.images] == [(8, 8), (8, 8)] and out.images[0].mode == "RGB"
    latents = pipe(class_labels=[0, 3], num_inference_steps=3, seed=0, output_type="latent", progress=False).images
    assert latents.shape == (2, 3, 8, 8) and latents.dtype == torch.float32
    pixels = np.clip(127.5 * latents.clamp(-1, 1).numpy() + 128, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    assert np.array_equal(np.stack([np.asarray(im) for im in out.images]), pixels)
    # A seed fixes every image; image i does not depend on the others in the batch (up to the CPU kernels' rounding
    # at another batch size).
    again = pipe(class_labels=[0, 3, 1], num_inference_steps=3, seed=0, output_type="latent", progress=False)
    assert torch.allclose(again.images[:2], latents, rtol=1e-4, atol=1e-4)
    other = pipe(class_labels=[0, 3], num_inference_steps=3, seed=1, output_type="latent", progress=False).images
    assert not torch.allclose(other, latents)
    fast = pipe([2], num_inference_steps=4, scheduler="dpmsolver++", guidance_scale=4.0, seed=0, progress=False)
    assert fast.class_labels == [2] and fast.images[0].size == (8, 8)
    assert image_grid(out.images + fast.images, columns=2).size == (16, 16)


def test_pipeline_errors_name_the_argument(pixel_ckpt):
    pipe = FCDMPipeline.from_pretrained(str(pixel_ckpt[0]), device="cpu")
    for kwargs, message in [(dict(class_labels=[4]), "out of range"), (dict(class_labels=["otter"]), "unknown class"),
                            (dict(class_labels=[0], output_type="jpg"), "output_type"),
                            (dict(class_labels=[0], seed=0, generator=torch.Generator()), "seed or generator"),
                            (dict(class_labels=[]), "empty")]:
        with pytest.raises(ValueError, match=message):
            pipe(num_inference_steps=2, progress=False, **kwargs)
    with pytest.raises(ValueError, match="dtype"):
        FCDMPipeline.from_pretrained(str(pixel_ckpt[0]), device="cpu", dtype="fp16")


def test_imagenet_class_names():
    assert len(IMAGENET_ID2LABEL) == 1000 and IMAGENET_ID2LABEL[207] == "golden retriever"
    assert class_ids([207, "360", "otter", "Tinca tinca", "GOLDEN RETRIEVER", "partridge"], 1000) == \
        [207, 360, 360, 0, 207, 86]
    with pytest.raises(ValueError, match="ambiguous.*55.*57"):
        class_ids(["grass snake"], 1000)
    with pytest.raises(ValueError, match="unknown class name 'dragon'"):
        class_ids(["dragon"], 1000)
    with pytest.raises(ValueError, match="out of range"):
        class_ids([1000], 1000)


def test_the_label_table_ships_in_the_wheel():
    import tomllib
    with open(os.path.join(os.path.dirname(__file__), "..", "pyproject.toml"), "rb") as f:
        package_data = tomllib.load(f)["tool"]["setuptools"]["package-data"]
    assert "imagenet_labels.json" in package_data["fcdm"]


def test_the_pipeline_gives_sample_pys_images(assets, tmp_path, capsys, single_thread):  # noqa: F811
    """Same checkpoint, VAE, seed and settings: the quick-look grid and the .npz hold the same pixels."""
    argv = common_args(assets, tmp_path) + ["--labels", "balanced", "--num-fid-samples", "3",
                                            "--per-proc-batch-size", "3"]
    sample.main(argv)
    with np.load(tmp_path / "run.npz") as f:
        npz = f["arr_0"]
    sample.main(argv + ["--class-labels", "0", "1", "2", "--grid", str(tmp_path / "grid.png")])
    assert "Wrote" in capsys.readouterr().out
    from PIL import Image
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (16, 48, 3)
    assert np.array_equal(grid, np.concatenate(list(npz), axis=1))
    pipe = FCDMPipeline.from_pretrained(str(assets / "ckpt.pt"), vae=str(assets / "vae"), image_size=16,
                                        architecture=dict(model="FCDM-T", num_classes=5), device="cpu")
    images = pipe([0, 1, 2], num_inference_steps=3, seed=0, progress=False, output_type="np").images
    assert np.array_equal(images, npz)


def test_sample_py_scheduler_and_official_flags(assets, tmp_path, capsys):  # noqa: F811
    args = sample.parse_args(common_args(assets, tmp_path) + ["--scheduler", "unipc", "--seed", "7"])
    assert args.scheduler == "unipc" and args.global_seed == 7
    assert sample.parse_args(common_args(assets, tmp_path) + ["--no-ddpm"]).sampler == "ddim"
    assert sample.parse_args(common_args(assets, tmp_path)[:8] + ["--vae", "mse"]).vae == "stabilityai/sd-vae-ft-mse"
    for extra, message in [(["--scheduler", "ddim", "--sampler", "ddim"], "--scheduler drives"),
                           (["--ddpm", "--sampler", "ddim"], "contradict"), (["--scheduler", "lms"], "invalid choice"),
                           (["--grid", "g.png"], "--grid needs --class-labels")]:
        with pytest.raises(SystemExit):
            sample.parse_args(common_args(assets, tmp_path) + extra)
        assert message in capsys.readouterr().err
    sample.main(common_args(assets, tmp_path) + ["--scheduler", "dpmsolver++", "--run-name", "dpm"])
    assert "3 model evaluations" in capsys.readouterr().out


def test_a_missing_diffusers_is_one_line_with_the_install_command(assets, tmp_path, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setitem(sys.modules, "diffusers", None)
    monkeypatch.setitem(sys.modules, "diffusers.models", None)
    with pytest.raises(SystemExit) as exit_info:
        sample.main(common_args(assets, tmp_path) + ["--scheduler", "euler"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "pip install 'fcdm[vae]'" in err and "Traceback" not in err


def test_export_writes_safetensors_and_config_that_load_back(pixel_ckpt, tmp_path, capsys):
    path, ema = pixel_ckpt
    assert export.main([str(path), str(tmp_path / "out")]) == 0
    assert "Wrote" in capsys.readouterr().out
    files = sorted(os.listdir(tmp_path / "out"))
    assert files == ["README.md", "config.json", "model.safetensors"], files  # no temporary files left behind
    state = load_file(tmp_path / "out" / "model.safetensors")
    assert state.keys() == ema.keys() and all(torch.equal(state[k], v.float()) for k, v in ema.items())
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["format"] == "fcdm-pipeline" and config["objective"] == "ddpm" and config["image_size"] == 8
    assert config["architecture"] == dict(model="FCDM-T", hidden_size=None, depth=None, in_channels=3, num_classes=4,
                                          learn_sigma=True, null_label=True)
    assert config["autoencoder"] == {"name": None, "scaling_factor": 0.18215} and config["id2label"] is None

    from_ckpt = FCDMPipeline.from_pretrained(str(path), device="cpu")
    from_dir = FCDMPipeline.from_pretrained(str(tmp_path / "out"), device="cpu")
    kw = dict(class_labels=[1, 2], num_inference_steps=2, seed=0, output_type="latent", progress=False)
    assert torch.equal(from_ckpt(**kw).images, from_dir(**kw).images)
    # Re-exporting over the folder replaces it; a folder without weights is named.
    assert export.main([str(path), str(tmp_path / "out"), "--vae", "ema", "--image-size", "256"]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["autoencoder"]["name"] == \
        "stabilityai/sd-vae-ft-ema"
    os.remove(tmp_path / "out" / "model.safetensors")
    with pytest.raises(Exception, match="model.safetensors is missing"):
        FCDMPipeline.from_pretrained(str(tmp_path / "out"))


def test_an_official_checkpoint_exports_with_one_command(tmp_path, capsys):
    torch.manual_seed(5)
    model = random_fcdm(num_classes=1000)
    official = {"model": model.state_dict(), "ema": model.state_dict(), "opt": {},
                "args": argparse.Namespace(model="FCDM-T", image_size=256, num_classes=1000)}
    torch.save(official, tmp_path / "0400000.pt")
    assert export.main([str(tmp_path / "0400000.pt"), str(tmp_path / "hub")]) == 0
    config = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert config["architecture"]["model"] == "FCDM-T" and config["architecture"]["in_channels"] == 4
    assert config["autoencoder"]["name"] == "stabilityai/sd-vae-ft-ema" and config["id2label"]["207"] == \
        "golden retriever"
    pipe = FCDMPipeline.from_pretrained(str(tmp_path / "hub"), device="cpu")
    assert pipe.get_label_ids(["golden retriever", 360]) == [207, 360]
    latents = pipe(["otter"], num_inference_steps=2, seed=0, output_type="latent", progress=False)
    assert latents.images.shape == (1, 4, 32, 32) and latents.class_labels == [360]


def test_hub_names_and_push_to_hub_offline(pixel_ckpt, tmp_path, monkeypatch):
    import huggingface_hub
    import huggingface_hub.hub_mixin as hub_mixin
    from fcdm import pipeline
    path, _ = pixel_ckpt
    FCDMPipeline.from_pretrained(str(path), device="cpu").save_pretrained(tmp_path / "repo")
    # A hub name resolves to the downloaded snapshot; both downloads are replaced by the local folder.
    monkeypatch.setattr(hub_mixin, "hf_hub_download", lambda repo_id, filename, **kw: str(tmp_path / "repo" / filename))
    asked = {}
    monkeypatch.setattr(pipeline, "snapshot_download",
                        lambda repo_id, **kw: asked.update(repo_id=repo_id, **kw) or str(tmp_path / "repo"))
    pipe = FCDMPipeline.from_pretrained("someone/fcdm-demo", device="cpu")
    assert asked["repo_id"] == "someone/fcdm-demo" and "model.safetensors" in asked["allow_patterns"]
    uploaded = {}

    def upload_folder(self, repo_id, folder_path, **kw):
        uploaded.update(repo_id=repo_id, files=sorted(os.listdir(folder_path)),
                        config=json.loads(open(os.path.join(folder_path, "config.json")).read()),
                        state=load_file(os.path.join(folder_path, "model.safetensors")))
        return "https://huggingface.co/someone/fcdm-copy/commit/0"
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: type("R", (), {
        "repo_id": repo_id})())
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    pipe.push_to_hub("someone/fcdm-copy")
    assert uploaded["repo_id"] == "someone/fcdm-copy"
    assert uploaded["files"] == ["README.md", "config.json", "model.safetensors"]
    assert uploaded["config"] == json.loads((tmp_path / "repo" / "config.json").read_text())
    assert all(torch.equal(uploaded["state"][k], v) for k, v in pipe.model.state_dict().items())
