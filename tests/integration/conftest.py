"""Integration tests: lct_kernels inside the real timm, diffusers, torch-fidelity,
TensorBoard and torchcfm (``make integration``; each test module skips itself when
its library is missing, so the plain ``make test`` still passes without them).

Every test collected from this folder gets the ``integration`` marker.  With
``LCT_REQUIRE_INSTALLED=1`` (set by ``make integration``) the session refuses to
start unless ``lct_kernels`` is imported from an installed wheel in site-packages,
not from the source tree, with its compiled CPU extension ``_C`` loaded.

Shared fixtures build small real inputs locally (nothing is downloaded): a folder
of class-labelled PNGs, a tiny randomly initialised diffusers ``AutoencoderKL``
saved with ``save_pretrained``, and one short ``lct-train --images --vae`` run.
"""

import os
import sysconfig
from pathlib import Path

import pytest

from integration_support import CLASSES, IMAGE_SIZE, PER_CLASS, draw_image, run_cli, train_args

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def pytest_configure(config):
    if os.environ.get("LCT_REQUIRE_INSTALLED") != "1":
        return
    import lct_kernels

    where = Path(lct_kernels.__file__).resolve()
    site = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")}
    if not any(s in where.parents for s in site) or where.parent == REPO / "lct_kernels":
        raise pytest.UsageError(
            f"LCT_REQUIRE_INSTALLED=1: lct_kernels was imported from {where}, not from an "
            f"installed wheel in {sorted(map(str, site))} (run pytest from outside the tree)")
    ext = lct_kernels.backend_info()["extensions"]["_C"]
    if not ext["loaded"]:
        raise pytest.UsageError(f"LCT_REQUIRE_INSTALLED=1: the installed _C is not loaded: "
                                f"{ext['reason']}")


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """DIR/<class>/NN.png: PER_CLASS images of each class (IMAGE_SIZE x IMAGE_SIZE RGB)."""
    root = tmp_path_factory.mktemp("images")
    for kind in CLASSES:
        (root / kind).mkdir()
        for i in range(PER_CLASS):
            draw_image(kind, i).save(root / kind / f"{i:02d}.png")
    return root


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory):
    """A randomly initialised diffusers AutoencoderKL (2 blocks of 32 channels, 4 latent
    channels, one 2x downsampling), saved with ``save_pretrained``."""
    diffusers = pytest.importorskip("diffusers")
    import torch

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 32), layers_per_block=1, latent_channels=4,
        norm_num_groups=32, sample_size=IMAGE_SIZE,
    )
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def images_run(tmp_path_factory, image_folder, tiny_vae_dir):
    """One short ``lct-train --images DIR --vae PATH`` run (TensorBoard on when installed);
    returns its run folder."""
    out = tmp_path_factory.mktemp("images-run") / "run"
    proc = run_cli("lct-train", train_args(out, image_folder, tiny_vae_dir), out.parent)
    assert proc.returncode == 0, f"lct-train failed:\n{proc.stdout}\n{proc.stderr}"
    return out
