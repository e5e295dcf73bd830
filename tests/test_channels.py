"""Channel building per mode, 2.5D order, and the liver config keys that drive it."""
from __future__ import annotations

import numpy as np
import pytest
from detectron2.config import get_cfg

from liver_d2.config import add_liver_config, num_input_channels, set_default_pixel_stats, validate_liver_config
from liver_d2.data.channels import (
    ChannelSpec,
    build_channels,
    centred_context,
    default_pixel_stats,
    neighbour_indices,
    read_dataset_stack,
    stack_from_volume,
)
from liver_d2.data.slice_io import write_hu_slice
from liver_d2.errors import LiverD2Error


def _cfg(**hu) -> object:
    cfg = get_cfg()
    add_liver_config(cfg)
    for key, value in hu.items():
        cfg.INPUT.HU[key] = value
    return cfg


def test_window_values_worked_by_hand() -> None:
    hu = np.array([[-200, -100, 150], [400, 1000, 0]], dtype=np.float32)
    out = build_channels(hu, ChannelSpec("window", [[-100.0, 400.0]], 1))
    assert out.shape == (2, 3, 1) and out.dtype == np.float32
    np.testing.assert_allclose(out[..., 0], [[0.0, 0.0, 0.5], [1.0, 1.0, 0.2]], atol=1e-6)


def test_raw_keeps_hu_exactly() -> None:
    hu = np.array([[-1024, 0, 3071], [-1, 17, 40]], dtype=np.float32)
    out = build_channels(hu, ChannelSpec("raw", num_slices=1))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out[..., 0], hu)


def test_zscore_per_slice_mean0_std1_and_flat_slice_finite() -> None:
    rng = np.random.default_rng(0)
    hu = np.stack([rng.normal(60, 30, (16, 16)), np.full((16, 16), 40.0), rng.normal(-500, 200, (16, 16))], -1)
    out = build_channels(hu.astype(np.float32), ChannelSpec("zscore", num_slices=3))
    assert out.shape == (16, 16, 3)
    for c in (0, 2):
        assert abs(out[..., c].mean()) < 1e-5 and abs(out[..., c].std() - 1) < 1e-4
    np.testing.assert_array_equal(out[..., 1], 0.0)  # std floored, no NaN


def test_multiwindow_and_25d_channel_order_is_window_major() -> None:
    # slices k-1, k, k+1 hold 0, 50, 100 HU; windows A=[-100, 400], B=[0, 100]
    hu = np.stack([np.full((4, 4), v, np.float32) for v in (0.0, 50.0, 100.0)], -1)
    spec = ChannelSpec("multiwindow", [[-100.0, 400.0], [0.0, 100.0]], 3)
    out = build_channels(hu, spec)
    assert spec.num_channels == 6 and out.shape == (4, 4, 6)
    np.testing.assert_allclose(out[0, 0], [0.2, 0.3, 0.4, 0.0, 0.5, 1.0], atol=1e-6)


def test_window_mode_uses_first_window_only() -> None:
    spec = ChannelSpec("window", [[-100.0, 400.0], [0.0, 100.0]], 3)
    assert spec.num_channels == 3


def test_25d_reads_centred_context_in_order(tmp_path) -> None:
    files = []
    for j, v in enumerate((10, 20, 30, 40, 50)):  # slices k-2 .. k+2
        path = str(tmp_path / f"s{j}.png")
        write_hu_slice(path, np.full((8, 6), v, np.int16))
        files.append(path)
    d = {"file_name": files[2], "context_files": files, "hu_offset": 32768}
    assert centred_context(d, 1) == [files[2]]
    assert centred_context(d, 3) == files[1:4]
    stack = read_dataset_stack(d, 3)
    assert stack.shape == (8, 6, 3) and stack.dtype == np.float32
    np.testing.assert_array_equal(stack[0, 0], [20, 30, 40])
    raw = build_channels(stack, ChannelSpec("raw", num_slices=3))
    np.testing.assert_array_equal(raw[0, 0], [20, 30, 40])
    with pytest.raises(LiverD2Error, match="INPUT.HU.NUM_SLICES"):
        centred_context(d, 7)


def test_neighbour_indices_repeat_edges_like_context_files() -> None:
    assert neighbour_indices(0, 10, 5) == [0, 0, 0, 1, 2]
    assert neighbour_indices(9, 10, 3) == [8, 9, 9]
    vol = np.arange(4, dtype=np.int16)[:, None, None] * np.ones((4, 2, 2), np.int16)
    np.testing.assert_array_equal(stack_from_volume(vol, 0, 3)[0, 0], [0, 0, 1])


def test_default_pixel_stats_and_config_channel_count() -> None:
    assert default_pixel_stats("window", 2) == ([0.5, 0.5], [0.25, 0.25])
    assert default_pixel_stats("raw", 1) == ([0.0], [1.0])
    cfg = _cfg(MODE="multiwindow", WINDOWS=[[-100.0, 400.0], [0.0, 200.0]], NUM_SLICES=3)
    assert num_input_channels(cfg) == 6
    set_default_pixel_stats(cfg)
    assert cfg.MODEL.PIXEL_MEAN == [0.5] * 6 and cfg.MODEL.PIXEL_STD == [0.25] * 6
    validate_liver_config(cfg)
    default = _cfg()
    validate_liver_config(default)  # defaults are coherent
    assert default.DATALOADER.FILTER_EMPTY_ANNOTATIONS is False


@pytest.mark.parametrize(
    "hu, other, key",
    [
        ({"MODE": "hounsfield"}, {}, "INPUT.HU.MODE"),
        ({"NUM_SLICES": 2}, {}, "INPUT.HU.NUM_SLICES"),
        ({"WINDOWS": [[400.0, -100.0]]}, {}, "INPUT.HU.WINDOWS"),
        ({"TARGET_SPACING": -1.0}, {}, "INPUT.HU.TARGET_SPACING"),
        ({"NUM_SLICES": 3}, {}, "MODEL.PIXEL_MEAN"),
        ({}, {"MODEL.PIXEL_STD": [1.0, 1.0]}, "MODEL.PIXEL_STD"),
        ({}, {"DATALOADER.FILTER_EMPTY_ANNOTATIONS": True}, "DATALOADER.FILTER_EMPTY_ANNOTATIONS"),
        ({}, {"INPUT.AUG.SCALE_RANGE": [1.2, 0.8]}, "INPUT.AUG.SCALE_RANGE"),
        ({}, {"INPUT.AUG.FLIP_H_PROB": 1.5}, "INPUT.AUG.FLIP_H_PROB"),
    ],
)
def test_bad_config_gives_one_line_error_naming_the_key(hu: dict, other: dict, key: str) -> None:
    cfg = _cfg(**hu)
    cfg.merge_from_list([x for kv in other.items() for x in kv])
    with pytest.raises(LiverD2Error) as err:
        validate_liver_config(cfg)
    message = str(err.value)
    assert key in message and "\n" not in message


def test_bad_mode_message_lists_valid_modes() -> None:
    with pytest.raises(LiverD2Error, match="raw, zscore, window, multiwindow"):
        validate_liver_config(_cfg(MODE="hu"))


def test_pixel_mean_mismatch_names_expected_length() -> None:
    cfg = _cfg(MODE="multiwindow", WINDOWS=[[-100.0, 400.0], [0.0, 200.0], [-1000.0, 1000.0]])
    with pytest.raises(LiverD2Error, match=r"MODEL.PIXEL_MEAN has 1 values but the input has 3 channels"):
        validate_liver_config(cfg)
