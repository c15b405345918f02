"""fcdm.vae: loading, the latent scale in both directions, the latent shape, and the uint8 conversion, checked by hand
and against diffusers' own calls on a tiny random AutoencoderKL (no download)."""
import pytest
import torch

from fcdm import vae as fvae

diffusers = pytest.importorskip("diffusers")


def tiny_autoencoder(latent_channels: int = 4):
    """A randomly initialised 2x-downsampling AutoencoderKL (16 px images <-> 8x8 latents)."""
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, norm_num_groups=4,
                                   down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
                                   layers_per_block=1, sample_size=16)


@pytest.fixture(scope="module")
def saved_vae(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    tiny_autoencoder(latent_channels=3).save_pretrained(path)
    return str(path)


def test_load_vae_reads_a_local_directory_frozen_and_in_eval_mode(saved_vae):
    vae = fvae.load_vae(saved_vae, "cpu")
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    assert fvae.downsampling_factor(vae) == 2
    assert fvae.latent_shape(vae, 16) == (3, 8, 8)
    assert fvae.latent_shape(vae, 12) == (3, 6, 6)


def test_load_vae_names_what_it_cannot_load(tmp_path):
    with pytest.raises(ValueError, match="is not a directory"):
        fvae.load_vae(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"cannot load the VAE '.*empty'"):
        fvae.load_vae(str(tmp_path / "empty"))


def test_encode_and_decode_apply_the_scale_as_diffusers_does():
    vae = tiny_autoencoder().eval()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    scale = 0.3
    latents = fvae.encode(vae, images, scale, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
        expected = posterior.sample(generator=torch.Generator().manual_seed(5)) * scale
        assert latents.dtype == torch.float32 and torch.equal(latents, expected)
        # A sample of the posterior, not its mean.
        assert not torch.allclose(latents, posterior.mean * scale)
        decoded = fvae.decode(vae, latents, scale)
        by_hand = vae.decode(latents / scale).sample.clamp(-1, 1)
    assert decoded.shape == images.shape and torch.allclose(decoded, by_hand, rtol=0, atol=1e-6)
    assert decoded.min() >= -1 and decoded.max() <= 1


def test_to_uint8_rounds_as_dit_and_lays_out_nhwc():
    # DiT: clamp(127.5 x + 128, 0, 255), truncated. -1 -> 0 (0.5 truncated), 0 -> 128, 1 -> 255, beyond: clamped.
    values = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.1, 0.999, 1.0, 3.0])
    expected = [0, 0, 64, 128, 140, 255, 255, 255]  # 127.5 * 0.1 + 128 = 140.75 -> 140; 0.999 -> 255.37 -> 255
    images = values.view(1, 1, 1, 8).expand(1, 3, 2, 8).clone()
    images[:, 1] = 0.0
    out = fvae.to_uint8(images)
    assert out.dtype == torch.uint8 and out.shape == (1, 2, 8, 3)
    assert out[0, 0, :, 0].tolist() == expected and out[0, 1, :, 2].tolist() == expected
    assert (out[..., 1] == 128).all()


def test_resolve_vae_name_maps_dit_spellings_and_passes_others_through():
    assert fvae.resolve_vae_name("ema") == "stabilityai/sd-vae-ft-ema" == fvae.SD_VAE
    assert fvae.resolve_vae_name("MSE") == "stabilityai/sd-vae-ft-mse"
    assert fvae.resolve_vae_name("none") is None and fvae.resolve_vae_name("None") is None
    assert fvae.resolve_vae_name(None) is None
    assert fvae.resolve_vae_name("/data/my-vae") == "/data/my-vae"
    assert fvae.resolve_vae_name("org/other-vae") == "org/other-vae"
