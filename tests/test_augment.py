"""Specification of certprune.augment: batch-wise random crop (zero padding 4) and horizontal flip, seeded.

The references are written per image, the slow obvious way (pad one image, slice it), so the vectorised gather is
checked against code that has no indexing tricks to share a bug with."""
import pytest
import torch

from certprune.augment import AUGMENTATIONS, PADDING, make_augment, random_crop, random_flip

SHAPE = (3, 32, 32)  # CIFAR-10 / SVHN


def batch(n, seed=0, dtype=torch.float32):
    return torch.rand((n, *SHAPE), generator=torch.Generator().manual_seed(seed)).to(dtype)


def drawn_offsets(seed, n):
    """The offsets random_crop draws from a generator seeded ``seed``: rows, then columns, uniform on 0..8."""
    generator = torch.Generator().manual_seed(seed)
    dy = torch.randint(0, 2 * PADDING + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * PADDING + 1, (n,), generator=generator)
    return dy.tolist(), dx.tolist()


def reference_crop(image, dy, dx):
    channels, height, width = image.shape
    padded = torch.zeros(channels, height + 2 * PADDING, width + 2 * PADDING, dtype=image.dtype)
    padded[:, PADDING:PADDING + height, PADDING:PADDING + width] = image
    return padded[:, dy:dy + height, dx:dx + width]


def test_crop_equals_the_per_image_pad_and_slice_reference_for_the_offsets_drawn():
    x = batch(64)
    out = random_crop(x, torch.Generator().manual_seed(7))
    dys, dxs = drawn_offsets(7, 64)
    assert len(set(zip(dys, dxs))) > 30  # many different offsets in this batch, corners and centre alike
    for i, (dy, dx) in enumerate(zip(dys, dxs)):
        assert torch.equal(out[i], reference_crop(x[i], dy, dx)), f"image {i}, offset ({dy}, {dx})"


def test_crop_offsets_cover_all_81_positions_uniformly_in_a_large_batch():
    """Decoded from the output alone: each pixel value names its source position, so the centre pixel of a crop
    says where the crop was cut (whatever order the implementation draws its numbers in)."""
    n, size = 8100, 32
    positions = torch.arange(size * size, dtype=torch.float64).reshape(1, 1, size, size) + 1
    out = random_crop(positions.expand(n, 1, size, size), torch.Generator().manual_seed(3))
    centre = out[:, 0, size // 2, size // 2].long() - 1  # source pixel of the centre (always inside the image)
    dy = centre // size - size // 2 + PADDING
    dx = centre % size - size // 2 + PADDING
    counts = torch.bincount(dy * 9 + dx, minlength=81)
    assert len(counts) == 81 and bool((counts > 0).all())
    assert counts.min() > 60 and counts.max() < 145  # 100 expected each (sd 10): a bin never drawn, or one draw in 9, fails


def test_flip_mirrors_exactly_the_chosen_images():
    x = batch(256)
    out = random_flip(x, torch.Generator().manual_seed(11))
    chosen = torch.randint(0, 2, (256,), generator=torch.Generator().manual_seed(11)).bool()
    assert 90 < int(chosen.sum()) < 166
    assert torch.equal(out[chosen], torch.flip(x[chosen], dims=[3]))
    assert torch.equal(out[~chosen], x[~chosen])


def test_the_same_generator_state_gives_the_same_augmented_batch():
    augment = make_augment(["crop", "flip"], "cifar10")
    x = batch(128)
    generator = torch.Generator().manual_seed(5)
    saved = generator.get_state()  # what a checkpoint keeps
    first = augment(x, generator)
    second = augment(x, generator)  # the generator moved on: the next batch gets other crops
    assert not torch.equal(first, second)
    generator.set_state(saved)  # a resumed run
    assert torch.equal(augment(x, generator), first)
    assert torch.equal(augment(x, torch.Generator().manual_seed(5)), first)
    assert not torch.equal(augment(x, torch.Generator().manual_seed(6)), first)


def test_the_global_rng_does_not_leak_into_a_seeded_augmentation():
    augment = make_augment(["crop", "flip"], "cifar10")
    x = batch(32)
    torch.manual_seed(1)
    first = augment(x, torch.Generator().manual_seed(0))
    torch.manual_seed(2)
    assert torch.equal(augment(x, torch.Generator().manual_seed(0)), first)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_shape_dtype_and_device_are_kept(dtype):
    augment = make_augment(["crop", "flip"], "cifar10")
    x = batch(16, dtype=dtype)
    out = augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
    channels_last = augment(x.to(memory_format=torch.channels_last), torch.Generator().manual_seed(0))
    assert torch.equal(channels_last, out)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_a_gpu_the_batch_stays_there_and_equals_the_cpu_result():
    augment = make_augment(["crop", "flip"], "cifar10")
    x = batch(64)
    out = augment(x.cuda(), torch.Generator().manual_seed(9))
    assert out.is_cuda
    assert torch.equal(out.cpu(), augment(x, torch.Generator().manual_seed(9)))


def test_names_are_validated_in_one_line():
    assert make_augment([], "cifar10") is None and make_augment(None, "cifar10") is None
    assert AUGMENTATIONS == ("crop", "flip")
    with pytest.raises(ValueError, match=r"^unknown augmentation 'rotate'; choose from crop, flip$"):
        make_augment(["crop", "rotate"], "cifar10")
    with pytest.raises(ValueError, match="listed twice"):
        make_augment(["crop", "crop"], "cifar10")
    with pytest.raises(ValueError, match="must be a list"):
        make_augment("crop", "cifar10")
    with pytest.raises(ValueError, match="needs a batch of images"):
        make_augment(["crop"], "cifar10")(torch.zeros(3, 32, 32), None)


@pytest.mark.parametrize("dataset", ["mnist", "mnist-embedded"])
def test_flipping_handwritten_digits_is_refused_but_cropping_them_is_not(dataset):
    with pytest.raises(ValueError, match=f"'flip' makes no sense for {dataset}") as error:
        make_augment(["crop", "flip"], dataset)
    assert "\n" not in str(error.value)
    crop = make_augment(["crop"], dataset)
    assert crop(torch.rand(4, 1, 28, 28), torch.Generator().manual_seed(0)).shape == (4, 1, 28, 28)


@pytest.mark.parametrize("dataset", ["cifar10", "svhn", "fashion-mnist"])
def test_flip_is_allowed_where_hydra_or_common_practice_flips(dataset):
    """HYDRA's data/svhn.py flips SVHN too (RandomHorizontalFlip, line 24); Fashion-MNIST's clothes are mirror
    symmetric classes."""
    assert make_augment(["crop", "flip"], dataset) is not None
