"""The figures of a trained run (allconv.figures, src/visualize.py): each PNG from a tiny trained
checkpoint, its size and tiles checked against the layer shapes and the run's ZCA; bad input is one
line and writes nothing."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from allconv import figures, visualize_run
from allconv.errors import AllConvError
from conftest import CONF, SRC, last_line, run_cli, write_npz

VISUALIZE_PY = SRC / "visualize.py"


def compose(*overrides: str, config_name: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shared_cache_dir) -> Path:
    """One tiny All-CNN-C run (width 0.125, 1 epoch, GCN + ZCA): its checkpoint path."""
    from allconv import training

    tmp = tmp_path_factory.mktemp("trained")
    data = write_npz(tmp / "data.npz", n_train=64, n_test=12)
    cfg = compose("data=npz", f"data.path={data}", f"data.cache_dir={shared_cache_dir}", "model.width=0.125",
                  "trainer.max_epochs=1", "data.batch_size=32", "logger=none", "callbacks.progress_bar=none",
                  "trainer.enable_progress_bar=false",
                  "callbacks.guided_backprop.every_n_epochs=0", config_name="train")
    training.train(cfg, tmp / "run")
    return tmp / "run" / "checkpoints" / "last.ckpt"


def viz_cfg(ckpt: Path, *overrides: str):
    return compose(f"ckpt_path={ckpt}", "device=cpu", *overrides, config_name="visualize")


def png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def grid_size(n_tiles: int, tile: int, cols: int, pad: int) -> tuple[int, int]:
    """(width, height) of torchvision's make_grid: pad-pixel gaps around and between the tiles."""
    rows = math.ceil(n_tiles / cols)
    return cols * (tile + pad) + pad, rows * (tile + pad) + pad


def tile_at(image: np.ndarray, i: int, tile: int, cols: int, pad: int) -> np.ndarray:
    r, c = divmod(i, cols)
    y, x = pad + r * (tile + pad), pad + c * (tile + pad)
    return image[y:y + tile, x:x + tile]


def as_byte(v: torch.Tensor) -> np.ndarray:
    """What save_image writes for values in [0, 1]."""
    return (v.clamp(0, 1) * 255 + 0.5).floor().numpy().astype(int)


# -- filters -----------------------------------------------------------------------------------------
def test_filters_tiles_follow_the_layer_shapes(trained):
    from allconv import checkpoint

    out, paths = visualize_run.render(viz_cfg(trained, "viz.figure=filters"))
    assert out == trained.parent.parent / "visualize" / "filters" and [p.name for p in paths] == ["filters.png"]
    _, module = checkpoint.load(trained)
    w1, w2 = module.net.block1.conv1.weight.detach(), module.net.block1.conv2.weight.detach()
    assert w1.shape == (12, 3, 3, 3) and w2.shape == (12, 12, 3, 3)
    tile, pad = 24, 1  # 3x3 kernels drawn 8x
    cols = math.ceil(math.sqrt(12))
    width, height = grid_size(12, tile, cols, pad)  # each layer's grid: 12 filters
    image = png(paths[0])
    assert image.shape[:2] == (height, 2 * width + figures.FILTERS_GAP)
    first, second = image[:, :width], image[:, width + figures.FILTERS_GAP:]
    assert (image[:, width:width + figures.FILTERS_GAP] == 255).all()  # white between the layers
    for i in range(12):
        # first layer (left): the filter's 3 input channels as RGB, scaled by its largest |weight|
        got = tile_at(first, i, tile, cols, pad)[4::8, 4::8]  # the centre of each kernel cell: (3, 3, RGB)
        expected = as_byte(0.5 + 0.5 * w1[i] / w1[i].abs().max()).transpose(1, 2, 0)
        assert np.abs(got - expected).max() <= 1, i
        # second layer (right): grey tiles of the filter's strongest input channel (L2 norm), not of any other
        strongest = int(w2[i].flatten(1).norm(dim=1).argmax())
        got = tile_at(second, i, tile, cols, pad)[4::8, 4::8]
        assert (got == got[..., :1]).all()  # grey
        kernel = w2[i, strongest]
        assert np.abs(got[..., 0] - as_byte(0.5 + 0.5 * kernel / kernel.abs().max())).max() <= 1, i


def test_filters_of_a_5x5_first_layer_and_a_1x1_second():
    from allconv import models

    net = models.build("b", "base", width=0.125)  # block1: 5x5 conv 12, then 1x1 conv 12
    pictures = figures.filter_pictures(net)
    assert list(pictures) == ["block1.conv1", "block1.conv2"]
    assert tuple(pictures["block1.conv1"].shape) == (3, *grid_size(12, 25, 4, 1)[::-1])  # 5x5 drawn 5x
    assert tuple(pictures["block1.conv2"].shape) == (3, *grid_size(12, 24, 4, 1)[::-1])  # 1x1 drawn 24x
    (w1, h1), (w2, h2) = grid_size(12, 25, 4, 1), grid_size(12, 24, 4, 1)
    both = figures.filters_figure(net)  # side by side, top-aligned, the shorter grid padded with white
    assert tuple(both.shape) == (3, max(h1, h2), w1 + figures.FILTERS_GAP + w2)
    assert (both[:, h2:, w1 + figures.FILTERS_GAP:] == 1).all()


# -- whitening --------------------------------------------------------------------------------------
def test_whitening_shows_the_images_and_the_runs_own_zca(trained):
    from allconv import checkpoint, training

    out, paths = visualize_run.render(viz_cfg(trained, "viz.figure=whitening", "viz.num_images=4"))
    assert [p.name for p in paths] == ["whitening.png"] and out.name == "whitening"
    image = png(paths[0])
    tile, pad, cols = 64, 2, 4  # 32x32 drawn 2x; 4 images; rows: raw, whitened, ZCA rows of R, G, B
    assert (image.shape[1], image.shape[0]) == grid_size(5 * cols, tile, cols, pad)

    run_cfg, _ = checkpoint.load(trained)
    dm = training.build_datamodule(run_cfg)
    dm.setup("test")  # the run's own whitening (from the shared ZCA cache)
    idx = torch.linspace(0, len(dm.raw_test) - 1, 4).long()
    for j, i in enumerate(idx.tolist()):  # row 0: the test images as they are
        assert (tile_at(image, j, tile, cols, pad)[::2, ::2] == dm.raw_test[i].permute(1, 2, 0).numpy()).all()
    P = dm.zca.P
    for channel in range(3):
        for j, (r, c) in enumerate(figures.pixel_positions(4)):
            got = tile_at(image, (2 + channel) * cols + j, tile, cols, pad)[::2, ::2]  # (32, 32, RGB)
            row = P[channel * 1024 + r * 32 + c].reshape(3, 32, 32)
            away = row.clone()
            away[:, r, c] = 0
            expected = as_byte(0.5 + 0.5 * row / away.abs().max()).transpose(1, 2, 0)
            assert np.abs(got - expected).max() <= 1, (channel, j)
            assert got[r, c, channel] == 255  # the pixel itself: the row's peak, saturated


def test_whitening_needs_a_zca_run(trained, tmp_path):
    ckpt = torch.load(trained, map_location="cpu", weights_only=True)
    ckpt["hyper_parameters"]["config"]["data"]["preprocess"] = "standardize"
    other = tmp_path / "run" / "checkpoints" / "last.ckpt"
    other.parent.mkdir(parents=True)
    torch.save(ckpt, other)
    with pytest.raises(AllConvError, match="viz.figure=whitening needs a run trained on GCN \\+ ZCA whitened data; "
                                           "this one used data.preprocess='standardize'"):
        visualize_run.render(viz_cfg(other, "viz.figure=whitening"))
    assert not (tmp_path / "run" / "visualize").exists()


# -- the command ---------------------------------------------------------------------------------------
@pytest.mark.subprocess
def test_cli_draws_the_reconstructions_by_default(trained, tmp_path):
    out_dir = tmp_path / "figs"
    code, out, err = run_cli(f"ckpt_path={trained}", "viz.layer=block2.down", "viz.top_k=4", "viz.num_channels=2",
                             f"out_dir={out_dir}", cwd=tmp_path, script=VISUALIZE_PY, timeout=120)
    assert code == 0, err
    assert last_line(out) == str(out_dir)
    assert sorted(p.name for p in out_dir.iterdir()) == ["methods.png", "top4_block2.down_guided.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figs"]  # Hydra wrote nothing


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if ".allconv-cache" not in p.parts)


@pytest.mark.parametrize("args, message", [
    (["viz.layer=conv9"], "unknown layer 'conv9'; allowed: logits, dropout_input, block1, block1.conv1,"),
    (["viz.layer=block1.relu2", "viz.unit=99"], "unit 99 is out of range for layer 'block1.relu2': allowed 0..11"),
    (["viz.method=lrp"], "unknown viz.method 'lrp'; allowed: guided, deconvnet, backprop"),
    (["viz.figure=weights"], "unknown viz.figure 'weights'; allowed: reconstructions, filters, whitening"),
    (["viz.top_k=50"], "viz.top_k=50 is more than the 12 test images"),
    (["viz.num_images=0"], "viz.num_images must be an integer >= 1, got 0"),
    (["viz.figure=filters", "out_dir=<file>"], "exists and is not a directory"),
])
def test_bad_input_is_one_line_and_writes_nothing(trained, args, message):
    run_dir = trained.parent.parent
    blocker = run_dir / "a-file"
    blocker.write_text("")
    args = [a.replace("<file>", str(blocker)) for a in args]
    before = _files(run_dir)
    with pytest.raises(AllConvError) as e:
        visualize_run.render(viz_cfg(trained, *args))
    assert message in str(e.value) and "\n" not in str(e.value) and e.value.exit_code == 2
    assert _files(run_dir) == before
    blocker.unlink()


def test_a_checkpoint_that_does_not_fit_its_model(trained, tmp_path):
    ckpt = torch.load(trained, map_location="cpu", weights_only=True)
    ckpt["hyper_parameters"]["net"]["width"] = 0.25
    other = tmp_path / "last.ckpt"
    torch.save(ckpt, other)
    with pytest.raises(AllConvError, match="does not match its own model"):
        visualize_run.render(viz_cfg(other, "viz.figure=filters"))
    assert _files(tmp_path) == [other]


@pytest.mark.subprocess
def test_cli_bad_input_is_one_line_exit_2(trained, tmp_path):
    before = _files(trained.parent.parent)
    code, _, err = run_cli(f"ckpt_path={trained}", "viz.layer=conv9", cwd=tmp_path, script=VISUALIZE_PY, timeout=120)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: unknown layer 'conv9'; allowed: logits, dropout_input, block1,")
    assert _files(trained.parent.parent) == before and list(tmp_path.iterdir()) == []
